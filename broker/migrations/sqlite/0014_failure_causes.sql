-- Why a job that ended did not succeed, typed (testbot_proto::results::FailureCause, by name):
-- test_failure, timeout, out_of_memory, cancelled, infrastructure, policy_refusal. NULL while it
-- runs, and for a success. Jobs that ended before this column get the cause their state and
-- reason imply, as an agent that does not report one gets it.
ALTER TABLE jobs ADD COLUMN cause TEXT;
UPDATE jobs SET cause = CASE
    WHEN state = 'cancelled' THEN 'cancelled'
    WHEN state = 'error' THEN 'infrastructure'
    WHEN state = 'failed' AND reason LIKE 'timed out%' THEN 'timeout'
    WHEN state = 'failed' THEN 'test_failure'
END;
