-- What migrations/sqlite/0017_job_commits.sql adds: the commit, ref and name of a job.
ALTER TABLE jobs ADD COLUMN commit_sha TEXT;
ALTER TABLE jobs ADD COLUMN git_ref TEXT;
ALTER TABLE jobs ADD COLUMN job_name TEXT;
CREATE INDEX jobs_by_repository_ref ON jobs (repository, git_ref, created_at_ms)
    WHERE commit_sha IS NOT NULL;
