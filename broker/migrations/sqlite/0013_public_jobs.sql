-- Whether a job's repository is public, as GitHub said when the job was submitted (the OIDC
-- token's `repository_visibility`, or the App's signed webhook payload): its page and log are
-- readable without signing in. Jobs from before this column, and jobs of no repository, are not.
ALTER TABLE jobs ADD COLUMN public INTEGER NOT NULL DEFAULT 0;
