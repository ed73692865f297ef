//! Batches: N runs of one job, submitted, followed, cancelled and reported as one (`testbot run
//! --repeat 20`, the action's `repeat`). The runs are ordinary jobs that know their place in
//! the batch (`TESTBOT_BATCH_RUN`); they run in parallel on every agent that takes them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::jobs::{Job, JobSpec, JobState};
use crate::results::FailureCause;

/// Most runs one batch may have.
pub const MAX_RUNS: u32 = 1000;

/// A batch's identifier: a positive integer assigned by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BatchId(pub i64);

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for BatchId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(BatchId)
            .ok_or_else(|| format!("{s:?} is not a batch id (expected a positive integer)"))
    }
}

/// A job's place in its batch: run `run` of `runs` (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPlace {
    pub batch: BatchId,
    pub run: u32,
    pub runs: u32,
}

/// The body of `POST /api/v1/batches`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// What every run runs.
    pub spec: JobSpec,
    /// How many runs: 1 to [`MAX_RUNS`].
    pub runs: u32,
}

impl BatchRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_RUNS).contains(&self.runs) {
            return Err(format!(
                "runs is {}; a batch has 1 to {MAX_RUNS} runs",
                self.runs
            ));
        }
        self.spec.validate()
    }
}

/// A batch as the broker reports it: its runs, and their results counted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Batch {
    pub id: BatchId,
    pub runs: u32,
    /// Who submitted it, as for a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub created_at_ms: i64,
    /// Every run, in run order.
    pub jobs: Vec<Job>,
    pub totals: BatchTotals,
}

impl Batch {
    /// Every run has ended.
    pub fn is_finished(&self) -> bool {
        self.totals.ended() == self.runs
    }

    /// The exit code a CLI ends with: 0 when every run succeeded; 1 when a run failed by
    /// itself; 3 when only the fleet failed runs (they say nothing about the tests); 130 when
    /// a run was cancelled and none failed.
    pub fn cli_exit_code(&self) -> i32 {
        let t = &self.totals;
        if t.failed > 0 {
            1
        } else if t.fleet > 0 {
            3
        } else if t.cancelled > 0 {
            130
        } else {
            0
        }
    }
}

/// How a batch's runs stand. `failed` are the runs that failed by themselves (their tests, a
/// timeout, out of memory); `fleet` those the fleet failed (an agent lost, an executor error,
/// no site that would run it): counted apart, since they say nothing about the tests.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BatchTotals {
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub fleet: u32,
    pub cancelled: u32,
}

impl BatchTotals {
    pub fn of(jobs: &[Job]) -> BatchTotals {
        let mut totals = BatchTotals::default();
        for job in jobs {
            match job.state {
                JobState::Queued => totals.queued += 1,
                JobState::Assigned | JobState::Running => totals.running += 1,
                JobState::Succeeded => totals.succeeded += 1,
                JobState::Failed | JobState::Cancelled | JobState::Error => {
                    match job
                        .cause
                        .or_else(|| FailureCause::infer(job.state, job.reason.as_deref()))
                    {
                        Some(FailureCause::Cancelled) => totals.cancelled += 1,
                        Some(cause) if cause.is_fleets() => totals.fleet += 1,
                        _ => totals.failed += 1,
                    }
                }
            }
        }
        totals
    }

    pub fn ended(&self) -> u32 {
        self.succeeded + self.failed + self.fleet + self.cancelled
    }
}

impl fmt::Display for BatchTotals {
    /// `17 succeeded, 2 failed, 1 failed by the fleet, 0 cancelled` (parts that are 0 left out,
    /// but for `succeeded`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} succeeded", self.succeeded)?;
        for (n, what) in [
            (self.failed, "failed"),
            (self.fleet, "failed by the fleet"),
            (self.cancelled, "cancelled"),
            (self.running, "running"),
            (self.queued, "queued"),
        ] {
            if n > 0 {
                write!(f, ", {n} {what}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobId;

    fn job(state: JobState, cause: Option<FailureCause>) -> Job {
        Job {
            id: JobId(1),
            spec: JobSpec::default(),
            state,
            reason: None,
            exit_code: None,
            signal: None,
            cause,
            attempts: 1,
            agent: None,
            cancel_requested: false,
            log_bytes: 0,
            repository: None,
            submitted_by: None,
            batch: None,
            metadata: Default::default(),
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            waiting: None,
        }
    }

    #[test]
    fn the_fleets_failures_are_counted_apart_from_the_runs_own() {
        let jobs = [
            job(JobState::Succeeded, None),
            job(JobState::Failed, Some(FailureCause::TestFailure)),
            job(JobState::Failed, Some(FailureCause::OutOfMemory)),
            job(JobState::Error, Some(FailureCause::Infrastructure)),
            job(JobState::Error, Some(FailureCause::PolicyRefusal)),
            job(JobState::Cancelled, Some(FailureCause::Cancelled)),
            job(JobState::Running, None),
            // An old job without a cause: inferred from its state.
            job(JobState::Error, None),
        ];
        let totals = BatchTotals::of(&jobs);
        assert_eq!(
            totals,
            BatchTotals {
                queued: 0,
                running: 1,
                succeeded: 1,
                failed: 2,
                fleet: 3,
                cancelled: 1,
            }
        );
        assert_eq!(
            totals.to_string(),
            "1 succeeded, 2 failed, 3 failed by the fleet, 1 cancelled, 1 running"
        );
    }

    #[test]
    fn a_batch_exits_non_zero_when_any_run_failed_and_says_whose_fault() {
        let batch = |jobs: Vec<Job>| Batch {
            id: BatchId(1),
            runs: jobs.len() as u32,
            submitted_by: None,
            repository: None,
            created_at_ms: 0,
            totals: BatchTotals::of(&jobs),
            jobs,
        };
        let ok = job(JobState::Succeeded, None);
        let failed = job(JobState::Failed, Some(FailureCause::TestFailure));
        let lost = job(JobState::Error, Some(FailureCause::Infrastructure));
        assert_eq!(batch(vec![ok.clone(), ok.clone()]).cli_exit_code(), 0);
        assert_eq!(batch(vec![ok.clone(), lost.clone()]).cli_exit_code(), 3);
        assert_eq!(batch(vec![failed, lost]).cli_exit_code(), 1);
        assert!(batch(vec![ok.clone()]).is_finished());
        assert!(!batch(vec![job(JobState::Queued, None)]).is_finished());
    }

    #[test]
    fn requests_outside_the_limits_are_refused_with_the_limit() {
        let request = |runs| BatchRequest {
            spec: JobSpec {
                script: "true".into(),
                ..JobSpec::default()
            },
            runs,
        };
        assert!(request(0).validate().unwrap_err().contains("1 to 1000"));
        assert!(request(1001).validate().is_err());
        assert!(request(20).validate().is_ok());
    }
}
