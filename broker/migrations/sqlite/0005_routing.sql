-- Routing: what each agent offers, and jobs agents handed back.

-- The agent's last poll as routing reads it (site, labels, executor, policy summary), as JSON.
ALTER TABLE agents ADD COLUMN offer TEXT;

-- Times a job was handed back by an agent that did not run it (does not use up an attempt).
ALTER TABLE jobs ADD COLUMN releases INTEGER NOT NULL DEFAULT 0;

-- An agent that handed a job back is not offered it again before `until_ms`.
CREATE TABLE job_holds (
    job_id   INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    agent    TEXT    NOT NULL,                          -- site/name, as recorded on the job
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, agent)
) WITHOUT ROWID;

CREATE INDEX job_holds_by_until ON job_holds (until_ms);
