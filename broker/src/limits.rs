//! Bounds on what the broker stores: queue quotas at submission, and a retention sweep that
//! deletes finished jobs and their logs. Everything lives in one SQLite file on one disk; a
//! repository that floods the queue, or years of logs, would otherwise fill it, and then every
//! write fails (heartbeats too, so leases expire everywhere).
//!
//! A finished job's OIDC token is dropped at once (a trigger in the schema), since nothing needs
//! it after the job ended and a stored token is one more copy to steal.

use std::time::Duration;

use testbot_proto::jobs::{JobId, JobSpec};

use crate::error::ApiError;
use crate::store::Store;

/// Default of `--max-queued-per-repo`.
pub const DEFAULT_MAX_QUEUED_PER_REPO: u32 = 500;
/// Default of `--max-queued-per-site`.
pub const DEFAULT_MAX_QUEUED_PER_SITE: u32 = 2000;
/// Default of `--max-log-followers`.
pub const DEFAULT_MAX_LOG_FOLLOWERS: usize = 64;

/// Default of `--job-retention`.
pub const DEFAULT_JOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// The longest time between two retention sweeps.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(600);

/// Jobs deleted per statement, so one sweep never holds the writer for long.
const SWEEP_BATCH: i64 = 500;

/// Quotas and retention, from the broker's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Queued workflow jobs of one repository.
    pub max_queued_per_repo: u32,
    /// Queued workflow jobs for one site.
    pub max_queued_per_site: u32,
    /// How long a finished job is kept after it ended.
    pub job_retention: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_queued_per_repo: DEFAULT_MAX_QUEUED_PER_REPO,
            max_queued_per_site: DEFAULT_MAX_QUEUED_PER_SITE,
            job_retention: DEFAULT_JOB_RETENTION,
        }
    }
}

impl Limits {
    /// How often the retention sweep runs: often enough that a job outlives its retention by at
    /// most half of it.
    pub fn sweep_interval(&self) -> Duration {
        (self.job_retention / 2).clamp(Duration::from_secs(1), MAX_SWEEP_INTERVAL)
    }
}

/// How many clients follow each job's log. Each follower wakes on every append and reads the
/// database, so their number per job is bounded.
#[derive(Debug, Default)]
pub struct Followers {
    counts: std::sync::Mutex<std::collections::HashMap<JobId, usize>>,
}

/// One follower's place; given back when dropped (the stream ended or the client went away).
#[derive(Debug)]
pub struct FollowerSlot {
    followers: std::sync::Arc<Followers>,
    id: JobId,
}

impl Followers {
    /// A place among the followers of job `id`, if fewer than `max` follow it.
    pub fn join(
        self: &std::sync::Arc<Self>,
        id: JobId,
        max: usize,
    ) -> Result<FollowerSlot, ApiError> {
        let mut counts = self.counts.lock().expect("followers poisoned");
        let count = counts.entry(id).or_insert(0);
        if *count >= max {
            return Err(ApiError::QuotaExceeded(format!(
                "job {id} already has {count} clients following its log, the most this broker \
                 allows (--max-log-followers {max}); read it without follow, or try again later"
            )));
        }
        *count += 1;
        Ok(FollowerSlot {
            followers: self.clone(),
            id,
        })
    }
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut counts = self.followers.counts.lock().expect("followers poisoned");
        if let Some(count) = counts.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

/// The sites a job is for: those it asks for with a `site:NAME` label, and the one site its
/// repository's registration allows when it allows only one.
fn sites_of(spec: &JobSpec, allowed_sites: &[String]) -> Vec<String> {
    let mut sites: Vec<String> = spec
        .labels
        .iter()
        .filter_map(|label| label.strip_prefix("site:"))
        .map(str::to_string)
        .collect();
    if let [only] = allowed_sites
        && !sites.contains(only)
    {
        sites.push(only.clone());
    }
    sites
}

/// Refuses a workflow's job when its repository, or a site it is for, has a full queue.
/// Checked before the job is stored: submissions racing each other may pass a quota by a few.
pub async fn check_queue_quota(
    db: &dyn Store,
    limits: &Limits,
    repository: &str,
    spec: &JobSpec,
    allowed_sites: &[String],
    adding: u32,
) -> Result<(), ApiError> {
    let adding_note = if adding > 1 {
        format!(" (and the batch would add {adding})")
    } else {
        String::new()
    };
    let queued = db.queued_jobs_of_repo(repository).await?;
    if queued + i64::from(adding) > i64::from(limits.max_queued_per_repo) {
        return Err(ApiError::QuotaExceeded(format!(
            "repository {repository} has {queued} jobs waiting in the queue{adding_note}, the \
             most this broker allows (--max-queued-per-repo {}); submit again once some of them \
             have run",
            limits.max_queued_per_repo
        )));
    }
    for site in sites_of(spec, allowed_sites) {
        let queued = db.queued_jobs_for_site(&site).await?;
        if queued + i64::from(adding) > i64::from(limits.max_queued_per_site) {
            return Err(ApiError::QuotaExceeded(format!(
                "site {site} has {queued} jobs waiting in the queue{adding_note}, the most this \
                 broker allows (--max-queued-per-site {}); submit again once some of them have \
                 run",
                limits.max_queued_per_site
            )));
        }
    }
    Ok(())
}

/// Deletes the jobs (with their logs) that ended more than `retention` before `now_ms`.
/// Returns how many were deleted.
pub async fn sweep_finished_jobs(
    db: &dyn Store,
    now_ms: i64,
    retention: Duration,
) -> anyhow::Result<u64> {
    let cutoff = now_ms.saturating_sub(retention.as_millis() as i64);
    let mut deleted = 0;
    loop {
        let batch = db.delete_jobs_finished_before(cutoff, SWEEP_BATCH).await?;
        deleted += batch;
        if batch < SWEEP_BATCH as u64 {
            return Ok(deleted);
        }
        // Let heartbeats and log appends in between batches.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(labels: &[&str]) -> JobSpec {
        JobSpec {
            script: "true".into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_is_for_the_sites_it_names_and_its_registrations_only_site() {
        assert_eq!(sites_of(&spec(&["linux"]), &[]), Vec::<String>::new());
        assert_eq!(sites_of(&spec(&["site:a"]), &[]), ["a"]);
        assert_eq!(sites_of(&spec(&[]), &["b".into()]), ["b"]);
        assert_eq!(sites_of(&spec(&["site:b"]), &["b".into()]), ["b"]);
        assert_eq!(
            sites_of(&spec(&[]), &["a".into(), "b".into()]),
            Vec::<String>::new()
        );
    }
}
