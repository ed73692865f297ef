-- What migrations/sqlite/0013_public_jobs.sql adds: whether a job's repository is public.
ALTER TABLE jobs ADD COLUMN public BOOLEAN NOT NULL DEFAULT FALSE;
