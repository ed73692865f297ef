-- What migrations/sqlite/0015_batches.sql builds, in PostgreSQL's types.
CREATE TABLE batches (
    id             BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    runs           BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    submitted_by   TEXT,
    repository     TEXT
);

ALTER TABLE jobs ADD COLUMN batch_id BIGINT REFERENCES batches (id) ON DELETE SET NULL;
ALTER TABLE jobs ADD COLUMN batch_run BIGINT;
-- The batch's size, kept with each run so that reading a job needs no join.
ALTER TABLE jobs ADD COLUMN batch_runs BIGINT;
CREATE INDEX jobs_by_batch ON jobs (batch_id, batch_run) WHERE batch_id IS NOT NULL;
