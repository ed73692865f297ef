-- What migrations/sqlite/0022_history_targets.sql builds, in PostgreSQL's types.
CREATE TABLE github_history_targets (
    repository_id   BIGINT  NOT NULL,
    repository      TEXT    NOT NULL,
    installation_id BIGINT  NOT NULL,
    public          BOOLEAN NOT NULL,
    branch          TEXT    NOT NULL,
    job             TEXT    NOT NULL,
    commits         BIGINT  NOT NULL,
    runs            BIGINT  NOT NULL,
    PRIMARY KEY (repository_id, job)
);
