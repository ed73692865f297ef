-- The GitHub App.

-- Webhook deliveries, queued durably: a delivery is answered as soon as it is stored and
-- processed after, by whichever broker claims it. The delivery id (`X-GitHub-Delivery`) makes a
-- redelivery a no-op.
CREATE TABLE github_deliveries (
    id               TEXT    PRIMARY KEY,
    event            TEXT    NOT NULL,                 -- X-GitHub-Event
    action           TEXT,                             -- the payload's "action", if any
    payload          BLOB    NOT NULL,                 -- the body, as signed
    received_at_ms   INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    not_before_ms    INTEGER NOT NULL,                 -- a retry waits until then
    claimed_until_ms INTEGER,                          -- a broker is processing it until then
    error            TEXT,                             -- why the last attempt failed
    finished_at_ms   INTEGER
);

CREATE INDEX github_deliveries_due ON github_deliveries (not_before_ms) WHERE state = 'queued';
CREATE INDEX github_deliveries_by_finished_at ON github_deliveries (finished_at_ms)
    WHERE finished_at_ms IS NOT NULL;

-- Installations of the App, and the repositories each lets it act on.
CREATE TABLE github_installations (
    id            INTEGER PRIMARY KEY,                 -- GitHub's installation id
    account       TEXT    NOT NULL,                    -- the user or organisation
    updated_at_ms INTEGER NOT NULL
);

CREATE TABLE github_installation_repos (
    installation_id INTEGER NOT NULL REFERENCES github_installations (id) ON DELETE CASCADE,
    repository_id   INTEGER NOT NULL,
    full_name       TEXT    NOT NULL COLLATE NOCASE,
    PRIMARY KEY (installation_id, repository_id)
);

CREATE INDEX github_installation_repos_by_repository ON github_installation_repos (repository_id);

-- What the App knows of each job it created: its provenance (handed to the agent, which
-- verifies it), and the job's check run on the commit with the job state GitHub last heard.
-- A workflow job from the Action of a repository the App is installed on has a row too, for
-- its check run, without a provenance (its OIDC token proves it).
CREATE TABLE github_jobs (
    job_id          INTEGER PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    provenance      TEXT,                              -- Provenance as JSON; NULL: a workflow job
    installation_id INTEGER NOT NULL,
    repository      TEXT    NOT NULL,
    head_sha        TEXT    NOT NULL,
    check_name      TEXT    NOT NULL,                  -- the name GitHub shows
    check_run_id    INTEGER,                           -- NULL until created on GitHub
    synced_state    TEXT,                              -- the job state the check run shows
    sync_attempts   INTEGER NOT NULL DEFAULT 0,
    sync_after_ms   INTEGER NOT NULL DEFAULT 0         -- a failed update is retried after
);

CREATE INDEX github_jobs_by_check_run ON github_jobs (check_run_id);
-- The check runs that may still change: once one shows an ended job it never changes again.
CREATE INDEX github_jobs_unsettled ON github_jobs (job_id)
    WHERE synced_state IS NULL OR synced_state IN ('queued', 'assigned', 'running');

-- Comments and reviews the App acted on: an edit or a repeated event never acts twice.
CREATE TABLE github_comments_handled (
    kind          TEXT    NOT NULL CHECK (kind IN ('comment', 'review')),
    comment_id    INTEGER NOT NULL,  -- GitHub's id of the comment or review
    delivery_id   TEXT    NOT NULL,  -- the delivery that acted on it (a retry of it may again)
    handled_at_ms INTEGER NOT NULL,
    PRIMARY KEY (kind, comment_id)
);

-- The scheduled jobs (`on.schedule`) of each repository, as its default branch's config last
-- said, and when each runs next. The broker that moves `next_run_ms` on runs the job.
CREATE TABLE github_schedules (
    repository_id   INTEGER NOT NULL,
    repository      TEXT    NOT NULL,
    installation_id INTEGER NOT NULL,
    job             TEXT    NOT NULL,
    cron            TEXT    NOT NULL,
    branch          TEXT    NOT NULL,
    next_run_ms     INTEGER NOT NULL,
    PRIMARY KEY (repository_id, job, cron, branch)
);

CREATE INDEX github_schedules_due ON github_schedules (next_run_ms);
