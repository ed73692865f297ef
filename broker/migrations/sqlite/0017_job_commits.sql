-- The commit and ref a job ran, and its name, as GitHub vouched for them at submission (the
-- OIDC token's sha and ref, or the App job's provenance), so test results can be read across
-- a branch's history: which tests are flaky at which commits.
ALTER TABLE jobs ADD COLUMN commit_sha TEXT;
ALTER TABLE jobs ADD COLUMN git_ref TEXT;
ALTER TABLE jobs ADD COLUMN job_name TEXT;
CREATE INDEX jobs_by_repository_ref ON jobs (repository, git_ref, created_at_ms)
    WHERE commit_sha IS NOT NULL;
