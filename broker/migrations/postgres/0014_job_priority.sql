-- What migrations/sqlite/0023_job_priority.sql builds, in PostgreSQL's types.
ALTER TABLE jobs ADD COLUMN priority BIGINT NOT NULL DEFAULT 0;
-- (jobs_queued, by id alone, stays for the readers of the whole queue in submission order.)
CREATE INDEX jobs_queued_by_priority ON jobs (priority, id) WHERE state = 'queued';
