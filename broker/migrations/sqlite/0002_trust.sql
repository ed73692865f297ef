-- Trust: registered repositories, used OIDC token ids, and the identity behind each job.

CREATE TABLE repos (
    name          TEXT    PRIMARY KEY COLLATE NOCASE,  -- owner/name
    settings      TEXT    NOT NULL,                     -- RepoSettings as JSON
    registered_by TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);

-- A workflow token creates at most one thing: its `jti` is recorded until the token expires.
CREATE TABLE oidc_jtis (
    jti        TEXT    PRIMARY KEY,
    expires_at INTEGER NOT NULL                         -- Unix seconds
) WITHOUT ROWID;

ALTER TABLE jobs ADD COLUMN repository TEXT;            -- from the token, never the body
ALTER TABLE jobs ADD COLUMN run_id TEXT;
ALTER TABLE jobs ADD COLUMN submitted_by TEXT;
ALTER TABLE jobs ADD COLUMN oidc_token TEXT;            -- handed to the agent, which verifies it

CREATE INDEX jobs_by_repository ON jobs (repository, id);
