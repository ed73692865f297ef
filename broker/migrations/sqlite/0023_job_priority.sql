-- Where a job goes in the queue (store::Priority): 0 someone waits on it, 1 a run after a
-- merge, 2 a repeat, 3 the broker's own runs (history filling, bisection). Agents take queued
-- jobs by priority, then oldest first, along the index below.
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
-- (jobs_queued, by id alone, stays for the readers of the whole queue in submission order.)
CREATE INDEX jobs_queued_by_priority ON jobs (priority, id) WHERE state = 'queued';
