-- Sites, their enrollment tokens, enrolled agents and the nonces of their signed requests.

CREATE TABLE sites (
    name          TEXT    PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);

CREATE TABLE enrollment_tokens (
    token_hash    TEXT    PRIMARY KEY,                  -- SHA-256; the token itself is shown once
    site          TEXT    NOT NULL REFERENCES sites (name),
    uses_left     INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL
);

CREATE TABLE agents (
    id             TEXT    PRIMARY KEY,
    site           TEXT    NOT NULL REFERENCES sites (name),
    name           TEXT    NOT NULL,
    public_key     BLOB    NOT NULL,                    -- Ed25519, 32 bytes
    policy         TEXT,                                -- PolicySummary as JSON
    enrolled_at_ms INTEGER NOT NULL,
    last_seen_ms   INTEGER,
    revoked_at_ms  INTEGER
);

CREATE UNIQUE INDEX agents_by_site_name ON agents (site, name) WHERE revoked_at_ms IS NULL;

-- A signed request's nonce is kept while its timestamp is inside the accepted clock window.
CREATE TABLE agent_nonces (
    agent_id      TEXT    NOT NULL,
    nonce         TEXT    NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, nonce)
) WITHOUT ROWID;

-- Which sites a job may go to (the repository's registration), copied at submission.
ALTER TABLE jobs ADD COLUMN sites TEXT;
