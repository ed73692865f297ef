-- Where each run of a test ran, so that failures clustering on one site, agent, Slurm node
-- list or image are told apart from a flaky test: `test_commit_stats` counts runs per test,
-- commit and placement. Empty text for a part not known (a job with no image, a run before
-- Slurm named its nodes). SQLite cannot change a primary key, so the table is built again.
CREATE TABLE test_commit_stats_new (
    repository   TEXT    NOT NULL,
    git_ref      TEXT    NOT NULL,
    job_name     TEXT    NOT NULL,
    suite        TEXT    NOT NULL,
    classname    TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    commit_sha   TEXT    NOT NULL,
    site         TEXT    NOT NULL DEFAULT '',
    agent        TEXT    NOT NULL DEFAULT '',
    nodes        TEXT    NOT NULL DEFAULT '',
    image        TEXT    NOT NULL DEFAULT '',
    runs         INTEGER NOT NULL,
    fails        INTEGER NOT NULL,
    within       INTEGER NOT NULL,
    first_at_ms  INTEGER NOT NULL,
    last_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (repository, git_ref, job_name, suite, classname, name, commit_sha, site, agent,
                 nodes, image)
);
INSERT INTO test_commit_stats_new (repository, git_ref, job_name, suite, classname, name,
    commit_sha, runs, fails, within, first_at_ms, last_at_ms)
SELECT repository, git_ref, job_name, suite, classname, name, commit_sha, runs, fails, within,
       first_at_ms, last_at_ms
FROM test_commit_stats;
DROP TABLE test_commit_stats;
ALTER TABLE test_commit_stats_new RENAME TO test_commit_stats;
