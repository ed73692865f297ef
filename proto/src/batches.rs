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
    /// How many runs: 1 to [`MAX_RUNS`]. With `until`, the most it may take.
    pub runs: u32,
    /// Stop as soon as the runs can say, with this confidence, whether the job's failure rate
    /// is below a threshold; the runs not needed then are cancelled. Default: run them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Until>,
}

impl BatchRequest {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_RUNS).contains(&self.runs) {
            return Err(format!(
                "runs is {}; a batch has 1 to {MAX_RUNS} runs",
                self.runs
            ));
        }
        if let Some(until) = &self.until {
            until.validate()?;
            let needed = until.runs_without_failure();
            if needed > self.runs {
                return Err(format!(
                    "{} runs cannot show a failure rate below {} with confidence {}: that takes at least {needed} runs without a failure",
                    self.runs, until.max_rate, until.confidence
                ));
            }
        }
        self.spec.validate()
    }
}

/// A batch's stopping rule: run until the runs show, with `confidence`, that the job's failure
/// rate is below `max_rate` or that it is above it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Until {
    /// 0.5 to 0.9999, e.g. 0.95.
    pub confidence: f64,
    /// Above 0 and below 1, e.g. 0.01.
    pub max_rate: f64,
}

impl Until {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.5..=0.9999).contains(&self.confidence) {
            return Err(format!(
                "confidence is {}; write 0.5 to 0.9999 (e.g. 0.95)",
                self.confidence
            ));
        }
        if !(self.max_rate > 0.0 && self.max_rate < 1.0) {
            return Err(format!(
                "max_rate is {}; write a rate above 0 and below 1 (e.g. 0.01)",
                self.max_rate
            ));
        }
        Ok(())
    }

    /// The runs it takes, none failing, to say the rate is below `max_rate`:
    /// n = ln(1 − confidence) / ln(1 − max_rate), rounded up.
    pub fn runs_without_failure(&self) -> u32 {
        let n = (1.0 - self.confidence).ln() / (1.0 - self.max_rate).ln();
        (n - 1e-9).ceil().clamp(1.0, f64::from(u32::MAX)) as u32
    }

    /// What `failures` failed runs of `runs` say, by an exact binomial test at `max_rate`: the
    /// rate is below it when so few failures would be rarer than 1 − confidence were the
    /// rate `max_rate`; above it when so many would be.
    pub fn judge(&self, runs: u32, failures: u32) -> RateVerdict {
        let alpha = 1.0 - self.confidence;
        let below = runs > 0 && binomial_cdf(failures, runs, self.max_rate) <= alpha;
        let above = failures > 0 && 1.0 - binomial_cdf(failures - 1, runs, self.max_rate) <= alpha;
        let verdict = if below {
            Verdict::Below
        } else if above {
            Verdict::Above
        } else {
            Verdict::Undecided
        };
        RateVerdict {
            verdict,
            runs,
            failures,
            interval: crate::test_results::wilson_interval(
                u64::from(failures),
                u64::from(runs),
                1.96,
            ),
        }
    }
}

/// P(X ≤ k) for X ~ Binomial(n, p), summed in logarithms so that n up to [`MAX_RUNS`] stays
/// exact enough.
fn binomial_cdf(k: u32, n: u32, p: f64) -> f64 {
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    let mut log_choose = 0.0; // ln C(n, 0)
    let mut sum = 0.0;
    for i in 0..=k.min(n) {
        if i > 0 {
            log_choose += f64::from(n - i + 1).ln() - f64::from(i).ln();
        }
        sum += (log_choose + f64::from(i) * lp + f64::from(n - i) * lq).exp();
    }
    sum.min(1.0)
}

/// What a batch's runs say about the job's failure rate against [`Until::max_rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Below,
    Above,
    /// Not yet (or, once every run ended, not within the batch's runs).
    Undecided,
}

/// A [`Verdict`] with the runs it stands on: runs that succeeded or failed by themselves
/// (runs the fleet failed or that were cancelled say nothing about the rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateVerdict {
    pub verdict: Verdict,
    pub runs: u32,
    pub failures: u32,
    /// The failure rate's 95 % Wilson interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<(f64, f64)>,
}

/// A batch as the broker reports it: its runs, and their results counted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Its stopping rule, and what its runs say so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Until>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<RateVerdict>,
}

impl Batch {
    /// Every run has ended.
    pub fn is_finished(&self) -> bool {
        self.totals.ended() == self.runs
    }

    /// The exit code a CLI ends with: 0 when every run succeeded; 1 when a run failed by
    /// itself; 3 when only the fleet failed runs (they say nothing about the tests); 130 when
    /// a run was cancelled and none failed.
    ///
    /// A batch with a stopping rule exits 0 when the rate is below its threshold, 1 when above,
    /// and 2 when its runs could not say.
    pub fn cli_exit_code(&self) -> i32 {
        if let Some(verdict) = &self.verdict {
            return match verdict.verdict {
                Verdict::Below => 0,
                Verdict::Above => 1,
                Verdict::Undecided => 2,
            };
        }
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

impl Batch {
    /// What its runs say under `until`: from the runs that succeeded or failed by themselves.
    pub fn judge(until: &Until, totals: &BatchTotals) -> RateVerdict {
        until.judge(totals.succeeded + totals.failed, totals.failed)
    }
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
            until: None,
            verdict: None,
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
            until: None,
        };
        assert!(request(0).validate().unwrap_err().contains("1 to 1000"));
        assert!(request(1001).validate().is_err());
        assert!(request(20).validate().is_ok());
    }

    #[test]
    fn a_stopping_rule_says_below_or_above_only_when_the_runs_show_it() {
        let until = Until {
            confidence: 0.95,
            max_rate: 0.01,
        };
        // ln(0.05) / ln(0.99) = 298.07: 299 clean runs.
        assert_eq!(until.runs_without_failure(), 299);
        assert_eq!(until.judge(298, 0).verdict, Verdict::Undecided);
        assert_eq!(until.judge(299, 0).verdict, Verdict::Below);
        // One failure in 299 is not rare at 1 %: more runs are needed.
        assert_eq!(until.judge(299, 1).verdict, Verdict::Undecided);
        assert_eq!(until.judge(600, 1).verdict, Verdict::Below);
        // 8 in 40 at a 1 % rate is all but impossible: above.
        let above = until.judge(40, 8);
        assert_eq!(above.verdict, Verdict::Above);
        let (low, high) = above.interval.unwrap();
        assert!(low < 0.2 && 0.2 < high);
        // Three failures in the first three runs already say it.
        assert_eq!(until.judge(3, 3).verdict, Verdict::Above);
        let loose = Until {
            confidence: 0.9,
            max_rate: 0.2,
        };
        assert_eq!(loose.runs_without_failure(), 11);
        for bad in [
            Until {
                confidence: 1.0,
                max_rate: 0.01,
            },
            Until {
                confidence: 0.95,
                max_rate: 0.0,
            },
            Until {
                confidence: 0.95,
                max_rate: f64::NAN,
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let request = BatchRequest {
            spec: JobSpec {
                script: "true".into(),
                ..JobSpec::default()
            },
            runs: 100,
            until: Some(until),
        };
        assert!(
            request
                .validate()
                .unwrap_err()
                .contains("at least 299 runs")
        );
    }
}
