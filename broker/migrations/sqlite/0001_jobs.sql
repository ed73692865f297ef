-- Jobs, their log chunks, and API tokens (stored as SHA-256 hashes only).

CREATE TABLE jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    spec                TEXT    NOT NULL,            -- the JobSpec as JSON
    labels              TEXT    NOT NULL,            -- JSON array copied from the spec, for matching
    state               TEXT    NOT NULL,
    reason              TEXT,
    exit_code           INTEGER,
    signal              INTEGER,
    attempts            INTEGER NOT NULL DEFAULT 0,
    agent               TEXT,
    lease               TEXT,
    lease_expires_at_ms INTEGER,
    cancel_requested    INTEGER NOT NULL DEFAULT 0,
    log_bytes           INTEGER NOT NULL DEFAULT 0,
    created_at_ms       INTEGER NOT NULL,
    started_at_ms       INTEGER,
    finished_at_ms      INTEGER
);

CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at_ms) WHERE state IN ('assigned', 'running');
CREATE INDEX jobs_by_state ON jobs (state, id);

-- Append-only; (job_id, start_offset) makes a re-sent chunk a no-op.
CREATE TABLE log_chunks (
    job_id       INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    start_offset INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    PRIMARY KEY (job_id, start_offset)
) WITHOUT ROWID;

CREATE TABLE api_tokens (
    token_hash    TEXT    PRIMARY KEY,
    role          TEXT    NOT NULL CHECK (role IN ('operator', 'agent')),
    name          TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL
);
