-- What migrations/sqlite/0019_test_placements.sql does, in PostgreSQL's terms.
ALTER TABLE test_commit_stats
    ADD COLUMN site  TEXT NOT NULL DEFAULT '',
    ADD COLUMN agent TEXT NOT NULL DEFAULT '',
    ADD COLUMN nodes TEXT NOT NULL DEFAULT '',
    ADD COLUMN image TEXT NOT NULL DEFAULT '';
ALTER TABLE test_commit_stats DROP CONSTRAINT test_commit_stats_pkey;
ALTER TABLE test_commit_stats ADD PRIMARY KEY (repository, git_ref, job_name, suite, classname,
    name, commit_sha, site, agent, nodes, image);
