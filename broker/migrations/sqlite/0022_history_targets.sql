-- Jobs whose history the broker fills (`history = { commits, runs }` in the default branch's
-- .github/testbot.toml, recorded at each push to it): at least `runs` runs of `job` on each
-- of the last `commits` commits of `branch` that ran it, in idle capacity.
CREATE TABLE github_history_targets (
    repository_id   INTEGER NOT NULL,
    repository      TEXT    NOT NULL,
    installation_id INTEGER NOT NULL,
    public          INTEGER NOT NULL,
    branch          TEXT    NOT NULL,
    job             TEXT    NOT NULL,
    commits         INTEGER NOT NULL,
    runs            INTEGER NOT NULL,
    PRIMARY KEY (repository_id, job)
);
