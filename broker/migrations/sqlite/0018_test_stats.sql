-- Test results summed per test and commit as they arrive, so that reading a repository's flaky
-- tests reads the few tests that failed, not every result: `test_commit_stats` counts, per
-- test (of a job, on a ref) and commit, its runs, those that failed (no attempt passed) and
-- those that failed and passed on a rerun; `test_stats` counts a test's bad runs over all
-- commits, to find the tests worth reading. Empty text, not NULL, for a job or class without a
-- name: they are parts of the keys.
CREATE TABLE test_commit_stats (
    repository   TEXT    NOT NULL,
    git_ref      TEXT    NOT NULL,
    job_name     TEXT    NOT NULL,
    suite        TEXT    NOT NULL,
    classname    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    commit_sha   TEXT    NOT NULL,
    runs         INTEGER NOT NULL,
    fails        INTEGER NOT NULL,
    within       INTEGER NOT NULL,
    first_at_ms  INTEGER NOT NULL,
    last_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (repository, git_ref, job_name, suite, classname, name, commit_sha)
);

CREATE TABLE test_stats (
    repository      TEXT    NOT NULL,
    git_ref         TEXT    NOT NULL,
    job_name        TEXT    NOT NULL,
    suite           TEXT    NOT NULL,
    classname       TEXT    NOT NULL,
    name            TEXT    NOT NULL,
    bad_runs        INTEGER NOT NULL,
    last_bad_at_ms  INTEGER,
    PRIMARY KEY (repository, git_ref, job_name, suite, classname, name)
);
CREATE INDEX test_stats_bad ON test_stats (repository, last_bad_at_ms) WHERE bad_runs > 0;
