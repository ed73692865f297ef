-- What migrations/sqlite/0014_failure_causes.sql adds: why a job that ended did not succeed.
ALTER TABLE jobs ADD COLUMN cause TEXT;
UPDATE jobs SET cause = CASE
    WHEN state = 'cancelled' THEN 'cancelled'
    WHEN state = 'error' THEN 'infrastructure'
    WHEN state = 'failed' AND reason LIKE 'timed out%' THEN 'timeout'
    WHEN state = 'failed' THEN 'test_failure'
END;
