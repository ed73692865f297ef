-- Facts an executor reports about a job (e.g. its Slurm job id), shown to users.
ALTER TABLE jobs ADD COLUMN metadata TEXT;  -- JSON object of strings
