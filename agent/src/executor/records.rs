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
    /// The chunk being sent: where the log and positions will be once the broker has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sending: Option<Checkpoint>,
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
            sending: None,
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

    /// Writes a record: mode 0600 in a directory of mode 0700, whatever the umask (a record holds
    /// the job's lease, script and environment values).
    pub fn save(&self, record: &JobRecord) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("Cannot create {}", self.dir.display()))?;
        let bytes = serde_json::to_vec(record)?;
        let path = self.path(record.job.job_id);
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&tmp)
            .with_context(|| format!("Cannot create {}", tmp.display()))?;
        // A temporary file left by a crash keeps the mode it was created with.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(&bytes))
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
        self.update(job, |record| {
            record.sending = None;
            record.job.log_offset = checkpoint.log_offset;
            if let Some(pos) = checkpoint.stdout_pos {
                record.stdout_pos = pos;
            }
            if let Some(pos) = checkpoint.stderr_pos {
                record.stderr_pos = pos;
            }
        });
    }

    /// Notes the chunk being sent, which ends at `checkpoint`.
    pub fn sending(&self, job: JobId, checkpoint: Checkpoint) {
        self.update(job, |record| record.sending = Some(checkpoint));
    }

    /// The broker's log of the job is `log_bytes` long: if that is where the chunk being sent
    /// ends, the broker took it, and its positions are acknowledged.
    pub fn settle(&self, job: JobId, log_bytes: u64) {
        let Ok(record) = self.load(job) else {
            return;
        };
        match record.sending {
            Some(sent) if sent.log_offset == log_bytes => self.checkpoint(job, sent),
            Some(_) => self.update(job, |record| record.sending = None),
            None => {}
        }
    }

    fn update(&self, job: JobId, change: impl FnOnce(&mut JobRecord)) {
        let Ok(mut record) = self.load(job) else {
            return;
        };
        change(&mut record);
        if let Err(err) = self.save(&record) {
            tracing::warn!(job_id = %job, ?err, "Cannot save the job record.");
        }
    }

    pub fn remove(&self, job: JobId) {
        let _ = std::fs::remove_file(self.path(job));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(dir: &std::path::Path) -> super::super::JobContext {
        super::super::JobContext {
            id: JobId(4),
            attempt: 1,
            agent: "a".into(),
            spec: testbot_proto::jobs::JobSpec::default(),
            timeout: std::time::Duration::from_secs(60),
            dir: dir.join("job"),
            run_as: None,
            keep_dir: false,
            lease: "l".into(),
            heartbeat_interval_ms: 1000,
            batch: None,
        }
    }

    #[test]
    fn records_are_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode =
            |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        let records = JobRecords::new(dir.path().join("slurm"));
        let saved = records.save(&JobRecord::started("h".into(), &context(dir.path())));
        nix::sys::stat::umask(old);
        saved.unwrap();
        // A record holds the job's lease, script and environment values.
        assert_eq!(mode(&dir.path().join("slurm")), 0o700);
        assert_eq!(mode(&dir.path().join("slurm/job-4.json")), 0o600);
    }

    #[test]
    fn a_chunk_in_flight_counts_only_if_the_broker_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let records = JobRecords::new(dir.path().to_path_buf());
        records
            .save(&JobRecord::started("h".into(), &context(dir.path())))
            .unwrap();
        let acked = Checkpoint {
            log_offset: 100,
            stdout_pos: Some(10),
            stderr_pos: None,
        };
        let in_flight = Checkpoint {
            log_offset: 180,
            stdout_pos: Some(20),
            stderr_pos: Some(5),
        };
        records.checkpoint(JobId(4), acked);
        records.sending(JobId(4), in_flight);

        // The agent stopped before the broker took the chunk: the acknowledged positions stand.
        records.settle(JobId(4), 100);
        let record = records.load(JobId(4)).unwrap();
        assert_eq!(
            (record.job.log_offset, record.stdout_pos, record.stderr_pos),
            (100, 10, 0)
        );
        assert_eq!(record.sending, None);

        // The broker took it, but its acknowledgement was not recorded: the chunk's positions.
        records.sending(JobId(4), in_flight);
        records.settle(JobId(4), 180);
        let record = records.load(JobId(4)).unwrap();
        assert_eq!(
            (record.job.log_offset, record.stdout_pos, record.stderr_pos),
            (180, 20, 5)
        );
        assert_eq!(record.sending, None);
    }
}
