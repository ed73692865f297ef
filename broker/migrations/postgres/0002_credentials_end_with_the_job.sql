-- A job's OIDC token and the values of its secret variables are kept only while an agent may
-- still need them: once the job has ended, each is one more copy of a credential to steal.
-- Every way a job ends sets `finished_at_ms`, so the trigger clears both in the very row that
-- ends it (and in whatever later update touches an ended job): no statement can forget to.
CREATE FUNCTION jobs_drop_credentials_when_finished() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.oidc_token := NULL;
    NEW.secret_env := NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER jobs_drop_credentials_when_finished
BEFORE INSERT OR UPDATE ON jobs
FOR EACH ROW
WHEN (NEW.finished_at_ms IS NOT NULL AND (NEW.oidc_token IS NOT NULL OR NEW.secret_env IS NOT NULL))
EXECUTE FUNCTION jobs_drop_credentials_when_finished();
