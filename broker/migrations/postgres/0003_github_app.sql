-- The GitHub App: what migrations/sqlite/0012_github_app.sql builds, in PostgreSQL's types.

CREATE TABLE github_deliveries (
    id               TEXT    PRIMARY KEY,               -- X-GitHub-Delivery
    event            TEXT    NOT NULL,
    action           TEXT,
    payload          BYTEA   NOT NULL,                  -- the body, as signed
    received_at_ms   BIGINT  NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'failed')),
    attempts         BIGINT  NOT NULL DEFAULT 0,
    not_before_ms    BIGINT  NOT NULL,
    claimed_until_ms BIGINT,
    error            TEXT,
    finished_at_ms   BIGINT
);

CREATE INDEX github_deliveries_due ON github_deliveries (not_before_ms) WHERE state = 'queued';
CREATE INDEX github_deliveries_by_finished_at ON github_deliveries (finished_at_ms)
    WHERE finished_at_ms IS NOT NULL;

CREATE TABLE github_installations (
    id            BIGINT PRIMARY KEY,
    account       TEXT   NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE TABLE github_installation_repos (
    installation_id BIGINT NOT NULL REFERENCES github_installations (id) ON DELETE CASCADE,
    repository_id   BIGINT NOT NULL,
    full_name       TEXT   COLLATE case_insensitive NOT NULL,
    PRIMARY KEY (installation_id, repository_id)
);

CREATE INDEX github_installation_repos_by_repository ON github_installation_repos (repository_id);

CREATE TABLE github_jobs (
    job_id          BIGINT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    provenance      TEXT,                              -- Provenance as JSON; NULL: a workflow job
    installation_id BIGINT NOT NULL,
    repository      TEXT   NOT NULL,
    head_sha        TEXT   NOT NULL,
    check_name      TEXT   NOT NULL,                  -- the name GitHub shows
    check_run_id    BIGINT,
    synced_state    TEXT,
    sync_attempts   BIGINT NOT NULL DEFAULT 0,
    sync_after_ms   BIGINT NOT NULL DEFAULT 0
);

CREATE INDEX github_jobs_by_check_run ON github_jobs (check_run_id);
-- The check runs that may still change: once one shows an ended job it never changes again.
CREATE INDEX github_jobs_unsettled ON github_jobs (job_id)
    WHERE synced_state IS NULL OR synced_state IN ('queued', 'assigned', 'running');

CREATE TABLE github_comments_handled (
    kind          TEXT    NOT NULL CHECK (kind IN ('comment', 'review')),
    comment_id    BIGINT NOT NULL,  -- GitHub's id of the comment or review
    delivery_id   TEXT    NOT NULL,  -- the delivery that acted on it (a retry of it may again)
    handled_at_ms BIGINT NOT NULL,
    PRIMARY KEY (kind, comment_id)
);

-- The scheduled jobs (`on.schedule`) of each repository, as its default branch's config last
-- said, and when each runs next. The broker that moves `next_run_ms` on runs the job.
CREATE TABLE github_schedules (
    repository_id   BIGINT NOT NULL,
    repository      TEXT    NOT NULL,
    installation_id BIGINT NOT NULL,
    job             TEXT    NOT NULL,
    cron            TEXT    NOT NULL,
    branch          TEXT    NOT NULL,
    next_run_ms     BIGINT NOT NULL,
    PRIMARY KEY (repository_id, job, cron, branch)
);

CREATE INDEX github_schedules_due ON github_schedules (next_run_ms);
