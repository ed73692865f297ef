//! What executors that outlive the agent (Slurm jobs, containers) keep about each running job,
//! so a restarted agent can pick it up again: one JSON file per job in the executor's state
//! directory, replaced atomically, removed once the job's result is reported.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use testbot_proto::jobs::JobId;

use super::{Checkpoint, Detached};

/// One running job: the scheduler's handle on it and how far the broker has its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The Slurm job id, or the container's name.
    pub handle: String,
    /// The job as the agent runs it: lease, spec, directory, where the broker's log ends.
    pub job: Detached,
    /// Positions (file offsets, or engine timestamps) of the last stdout and stderr lines the
    /// broker has acknowledged.
    pub stdout_pos: u64,
    pub stderr_pos: u64,
}

impl JobRecord {
    /// The record of a job just started under `handle`: nothing of its output acknowledged yet.
    pub fn started(handle: String, job: &super::JobContext) -> JobRecord {
        JobRecord {
            handle,
            job: Detached {
                job_id: job.id,
                attempt: job.attempt,
                lease: job.lease.clone(),
                heartbeat_interval_ms: job.heartbeat_interval_ms,
                log_offset: 0,
                spec: job.spec.clone(),
                timeout: job.timeout,
                dir: job.dir.clone(),
                run_as: job.run_as.as_ref().map(|a| a.name.clone()),
            },
            stdout_pos: 0,
            stderr_pos: 0,
        }
    }
}

/// The records of one executor, in one directory.
#[derive(Debug, Clone)]
pub struct JobRecords {
    dir: PathBuf,
}

impl JobRecords {
    pub fn new(dir: PathBuf) -> JobRecords {
        JobRecords { dir }
    }

    fn path(&self, job: JobId) -> PathBuf {
        self.dir.join(format!("job-{job}.json"))
    }

    pub fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("Cannot create {}", self.dir.display()))?;
        let path = self.path(record.job.job_id);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(record)?)
            .with_context(|| format!("Cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("Cannot write {}", path.display()))?;
        Ok(())
    }

    pub fn load(&self, job: JobId) -> anyhow::Result<JobRecord> {
        let path = self.path(job);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("Cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a job record", path.display()))
    }

    /// Every record; unreadable ones are skipped with a warning.
    pub fn all(&self) -> Vec<JobRecord> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(err) => {
                tracing::error!(dir = %self.dir.display(), ?err, "Cannot read the job records; not re-attaching.");
                return Vec::new();
            }
        };
        let mut records = Vec::new();
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read_to_string(&path)
                .map_err(anyhow::Error::from)
                .and_then(|text| Ok(serde_json::from_str(&text)?))
            {
                Ok(record) => records.push(record),
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "Ignoring an unreadable job record.")
                }
            }
        }
        records
    }

    /// Notes that the broker has the job's output up to `checkpoint`.
    pub fn checkpoint(&self, job: JobId, checkpoint: Checkpoint) {
        let Ok(mut record) = self.load(job) else {
            return;
        };
        record.job.log_offset = checkpoint.log_offset;
        if let Some(pos) = checkpoint.stdout_pos {
            record.stdout_pos = pos;
        }
        if let Some(pos) = checkpoint.stderr_pos {
            record.stderr_pos = pos;
        }
        if let Err(err) = self.save(&record) {
            tracing::warn!(job_id = %job, ?err, "Cannot save the job record.");
        }
    }

    pub fn remove(&self, job: JobId) {
        let _ = std::fs::remove_file(self.path(job));
    }
}
