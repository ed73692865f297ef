-- What migrations/sqlite/0020_batch_stopping_rules.sql does.
ALTER TABLE batches ADD COLUMN until TEXT;
