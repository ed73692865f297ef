-- Retention: finished jobs are found by when they ended, and deleted after a while.
CREATE INDEX jobs_by_finished_at ON jobs (finished_at_ms) WHERE finished_at_ms IS NOT NULL;

-- A job's OIDC token is kept only while an agent may still need it: once the job has ended,
-- it is one more copy of a credential to steal. Every way a job ends sets `finished_at_ms`.
CREATE TRIGGER jobs_drop_token_when_finished
AFTER UPDATE OF finished_at_ms ON jobs
WHEN NEW.finished_at_ms IS NOT NULL AND NEW.oidc_token IS NOT NULL
BEGIN
    UPDATE jobs SET oidc_token = NULL WHERE id = NEW.id;
END;

UPDATE jobs SET oidc_token = NULL WHERE finished_at_ms IS NOT NULL;
