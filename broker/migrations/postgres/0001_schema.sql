-- The broker's schema on PostgreSQL: what the SQLite migrations (migrations/sqlite/) build, in
-- PostgreSQL's own types. Times are Unix milliseconds (BIGINT) unless a column says otherwise.
-- JSON the database looks into (labels, sites, metadata) is JSONB; documents it only stores and
-- hands back whole (the spec, settings, policies, offers) are TEXT, kept byte for byte.

-- Repository names are matched without regard to case, as GitHub matches them.
CREATE COLLATION case_insensitive (provider = icu, locale = 'und-u-ks-level2', deterministic = false);

CREATE TABLE jobs (
    id                  BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    spec                TEXT    NOT NULL,               -- the JobSpec as JSON, secret values masked
    labels              JSONB   NOT NULL,               -- array copied from the spec, for matching
    executor            TEXT,                           -- the spec's executor, for matching
    state               TEXT    NOT NULL CHECK (state IN ('queued', 'assigned', 'running',
                                    'succeeded', 'failed', 'cancelled', 'error')),
    reason              TEXT,
    exit_code           INTEGER,
    signal              INTEGER,
    attempts            BIGINT  NOT NULL DEFAULT 0,
    releases            BIGINT  NOT NULL DEFAULT 0,     -- times handed back without running it
    agent               TEXT,                           -- site/name
    lease               TEXT,
    lease_expires_at_ms BIGINT,
    cancel_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    log_bytes           BIGINT  NOT NULL DEFAULT 0,
    created_at_ms       BIGINT  NOT NULL,
    started_at_ms       BIGINT,
    finished_at_ms      BIGINT,
    repository          TEXT,                           -- from the token, never the body
    run_id              TEXT,
    submitted_by        TEXT,
    oidc_token          TEXT,                           -- handed to the agent, which verifies it
    submit_jti          TEXT,                           -- the id of the token that submitted it
    sites               JSONB,                          -- the registration's sites; NULL: any
    metadata            JSONB,                          -- facts an executor reports (strings)
    secret_env          TEXT                            -- secret variables' values (JSON object)
);

CREATE INDEX jobs_queued ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at_ms) WHERE state IN ('assigned', 'running');
CREATE INDEX jobs_by_state ON jobs (state, id);
CREATE INDEX jobs_by_repository ON jobs (repository, id);
-- Retention finds ended jobs by when they ended.
CREATE INDEX jobs_by_finished_at ON jobs (finished_at_ms) WHERE finished_at_ms IS NOT NULL;

-- Append-only; (job_id, start_offset) makes a re-sent chunk a no-op.
CREATE TABLE log_chunks (
    job_id       BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    start_offset BIGINT NOT NULL,
    data         BYTEA  NOT NULL,
    PRIMARY KEY (job_id, start_offset)
);

-- An agent that handed a job back is not offered it again before `until_ms`.
CREATE TABLE job_holds (
    job_id   BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    agent    TEXT   NOT NULL,                           -- site/name, as recorded on the job
    until_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, agent)
);

CREATE INDEX job_holds_by_until ON job_holds (until_ms);

-- Operator and agent tokens, stored as SHA-256 hashes only.
CREATE TABLE api_tokens (
    token_hash    TEXT   PRIMARY KEY,
    role          TEXT   NOT NULL CHECK (role IN ('operator', 'agent')),
    name          TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE repos (
    name                TEXT   COLLATE case_insensitive PRIMARY KEY,  -- owner/name
    settings            TEXT   NOT NULL,                -- RepoSettings as JSON
    registered_by       TEXT   NOT NULL,
    created_at_ms       BIGINT NOT NULL,
    updated_at_ms       BIGINT NOT NULL,
    repository_id       TEXT,                           -- GitHub's ids; NULL until known
    repository_owner_id TEXT
);

-- A workflow token creates at most one thing: its `jti` is recorded until the token expires.
CREATE TABLE oidc_jtis (
    jti        TEXT   PRIMARY KEY,
    expires_at BIGINT NOT NULL                          -- Unix seconds
);

CREATE TABLE sites (
    name          TEXT   PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);

CREATE TABLE enrollment_tokens (
    token_hash    TEXT   PRIMARY KEY,                   -- SHA-256; the token itself is shown once
    site          TEXT   NOT NULL REFERENCES sites (name),
    uses_left     BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE agents (
    id             TEXT   PRIMARY KEY,
    site           TEXT   NOT NULL REFERENCES sites (name),
    name           TEXT   NOT NULL,
    public_key     BYTEA  NOT NULL,                     -- Ed25519, 32 bytes
    policy         TEXT,                                -- PolicySummary as JSON
    offer          TEXT,                                -- its last poll as routing reads it (JSON)
    enrolled_at_ms BIGINT NOT NULL,
    last_seen_ms   BIGINT,
    revoked_at_ms  BIGINT
);

CREATE UNIQUE INDEX agents_by_site_name ON agents (site, name) WHERE revoked_at_ms IS NULL;

-- A signed request's nonce is kept while its timestamp is inside the accepted clock window.
CREATE TABLE agent_nonces (
    agent_id      TEXT   NOT NULL,
    nonce         TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, nonce)
);

-- When the lease sweeper last ran, by any broker: a broker that starts after every broker was
-- stopped for a while extends running jobs' leases by the time nobody swept.
CREATE TABLE sweeps (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    last_sweep_ms BIGINT  NOT NULL
);
