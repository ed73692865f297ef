-- Log chunks move from a WITHOUT ROWID table to an ordinary one. In a WITHOUT ROWID table the
-- whole row is the b-tree's key, and SQLite compares a key that spills onto overflow pages by
-- reading all of it: every step of every search through the log (each append, each read) read
-- whole chunks of up to 512 KiB. Now the primary key is a small separate index and the chunk
-- lives in the row it points to, read only when it is wanted.
ALTER TABLE log_chunks RENAME TO log_chunks_without_rowid;

CREATE TABLE log_chunks (
    job_id       INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    start_offset INTEGER NOT NULL,
    data         BLOB    NOT NULL,
    PRIMARY KEY (job_id, start_offset)
);

INSERT INTO log_chunks (job_id, start_offset, data)
SELECT job_id, start_offset, data FROM log_chunks_without_rowid ORDER BY job_id, start_offset;

DROP TABLE log_chunks_without_rowid;
