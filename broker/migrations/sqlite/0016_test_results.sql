-- Result files a job's agent uploaded, kept as they were, with what reading them gave; and the
-- test cases read from JUnit files, one row per attempt.
CREATE TABLE result_files (
    job_id         INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    path           TEXT    NOT NULL,                -- relative to the job's workspace
    bytes          INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    report         TEXT    NOT NULL,                -- testbot_proto::test_results::FileReport, JSON
    uploaded_at_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, path)
);

CREATE TABLE test_results (
    job_id       INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    file         TEXT    NOT NULL,
    seq          INTEGER NOT NULL,                  -- the case's place in its file, from 0
    attempt      INTEGER NOT NULL,                  -- from 1, in the order they ran
    suite        TEXT    NOT NULL,
    classname    TEXT,
    name         TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,                  -- passed, failed, error, skipped
    duration_ms  INTEGER,
    message      TEXT,                              -- at most 1 KiB of the failure's message
    PRIMARY KEY (job_id, file, seq, attempt)
);
