-- What migrations/sqlite/0016_test_results.sql builds, in PostgreSQL's types.
CREATE TABLE result_files (
    job_id         BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    path           TEXT   NOT NULL,
    bytes          BIGINT NOT NULL,
    data           BYTEA  NOT NULL,
    report         TEXT   NOT NULL,
    uploaded_at_ms BIGINT NOT NULL,
    PRIMARY KEY (job_id, path)
);

CREATE TABLE test_results (
    job_id       BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    file         TEXT   NOT NULL,
    seq          BIGINT NOT NULL,
    attempt      BIGINT NOT NULL,
    suite        TEXT   NOT NULL,
    classname    TEXT,
    name         TEXT   NOT NULL,
    outcome      TEXT   NOT NULL,
    duration_ms  BIGINT,
    message      TEXT,
    PRIMARY KEY (job_id, file, seq, attempt)
);
