-- A batch may run until its runs can say whether the job's failure rate is below a threshold
-- (`testbot run --until-confidence 0.95 --max-rate 0.01`): its stopping rule, as JSON
-- (testbot_proto::batches::Until); NULL for a batch that runs all its runs.
ALTER TABLE batches ADD COLUMN until TEXT;
