-- A registration is bound to the GitHub repository it was made for, not only to its name: a
-- repository (or owner) renamed or deleted and then recreated under the same name has new ids.
ALTER TABLE repos ADD COLUMN repository_id TEXT;        -- NULL until known (bound at first use)
ALTER TABLE repos ADD COLUMN repository_owner_id TEXT;

-- The id of the workflow token that submitted the job. That token is handed to every agent that
-- claims the job, so it may read this job only, and cancel nothing.
ALTER TABLE jobs ADD COLUMN submit_jti TEXT;
