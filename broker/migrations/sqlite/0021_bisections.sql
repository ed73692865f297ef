-- Statistical bisections (`testbot bisect`, and those the broker starts on a new flake): each
-- is a document (testbot_proto::bisect::Bisection as JSON) that the broker's bisector reads,
-- advances and writes back; the columns beside it are what it is found by.
CREATE TABLE bisections (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    repository    TEXT    NOT NULL,
    test          TEXT    NOT NULL,                  -- the test's id, `suite > Class.name`
    bad_sha       TEXT    NOT NULL,
    state         TEXT    NOT NULL,                  -- running, found, failed
    doc           TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX bisections_running ON bisections (id) WHERE state = 'running';
CREATE INDEX bisections_by_repository ON bisections (repository, test, bad_sha);
