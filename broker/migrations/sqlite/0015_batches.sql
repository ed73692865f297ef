-- Batches: N runs of one job, submitted together (POST /api/v1/batches). Each run is a job
-- that names its batch and its place in it (1 to runs). A batch outlives its jobs' retention
-- only until the sweep that deletes its last job.
CREATE TABLE batches (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    runs           INTEGER NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    submitted_by   TEXT,
    repository     TEXT
);

ALTER TABLE jobs ADD COLUMN batch_id INTEGER REFERENCES batches (id) ON DELETE SET NULL;
ALTER TABLE jobs ADD COLUMN batch_run INTEGER;
-- The batch's size, kept with each run so that reading a job needs no join.
ALTER TABLE jobs ADD COLUMN batch_runs INTEGER;
CREATE INDEX jobs_by_batch ON jobs (batch_id, batch_run) WHERE batch_id IS NOT NULL;
