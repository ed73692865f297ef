-- What migrations/sqlite/0018_test_stats.sql builds, in PostgreSQL's types.
CREATE TABLE test_commit_stats (
    repository   TEXT    NOT NULL,
    git_ref      TEXT    NOT NULL,
    job_name     TEXT    NOT NULL,
    suite        TEXT    NOT NULL,
    classname    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    commit_sha   TEXT    NOT NULL,
    runs         BIGINT  NOT NULL,
    fails        BIGINT  NOT NULL,
    within       BIGINT  NOT NULL,
    first_at_ms  BIGINT  NOT NULL,
    last_at_ms   BIGINT  NOT NULL,
    PRIMARY KEY (repository, git_ref, job_name, suite, classname, name, commit_sha)
);

CREATE TABLE test_stats (
    repository      TEXT    NOT NULL,
    git_ref         TEXT    NOT NULL,
    job_name        TEXT    NOT NULL,
    suite           TEXT    NOT NULL,
    classname       TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    bad_runs        BIGINT  NOT NULL,
    last_bad_at_ms  BIGINT ,
    PRIMARY KEY (repository, git_ref, job_name, suite, classname, name)
);
CREATE INDEX test_stats_bad ON test_stats (repository, last_bad_at_ms) WHERE bad_runs > 0;
