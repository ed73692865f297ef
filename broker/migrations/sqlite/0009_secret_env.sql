-- Secret job variables: the values of the variables a submitter marks secret (`secret_env` in
-- the spec) are kept here, as a JSON object of name to value, and `spec` holds `***` in their
-- place. Only the agent that claims the job is given them, and they are dropped once the job
-- has ended, like the job's OIDC token: nothing needs them after that, and a stored secret is
-- one more copy to steal. Every way a job ends sets `finished_at_ms`.
ALTER TABLE jobs ADD COLUMN secret_env TEXT;

CREATE TRIGGER jobs_drop_secret_env_when_finished
AFTER UPDATE OF finished_at_ms ON jobs
WHEN NEW.finished_at_ms IS NOT NULL AND NEW.secret_env IS NOT NULL
BEGIN
    UPDATE jobs SET secret_env = NULL WHERE id = NEW.id;
END;
