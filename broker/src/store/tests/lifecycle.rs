//! The job lifecycle as a state machine, checked against a model on random interleavings of
//! submit, claim, start, heartbeat, lease expiry (with the sweeper's decision), cancel, finish
//! and hand-back, on each backend. What must hold whatever the order:
//!
//! - a call under a lease succeeds only while that lease is the job's and the job is active;
//!   a late one is refused, as `Finished` once the job has its result, else `Superseded`;
//! - an end state is never left, and each job gets exactly one result;
//! - the sweeper sees exactly the active leases that ran out, and ends only those.
//!
//! Each case works on jobs labelled for it alone, so cases share one store (a store per case
//! would make the PostgreSQL run slow). Lease times are a logical clock that the cases move;
//! holds last past the end of the test.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::*;

/// Cases per backend: enough to find an ordering bug quickly, few enough for a fast suite.
const CASES: u32 = 24;
/// Agents per case: a job handed back holds its agent off, so claims need another.
const AGENTS: usize = 3;
/// The attempts the sweeper allows before a lost job ends `error`.
const MAX_ATTEMPTS: u32 = 3;
/// Hand-backs before a job ends `error`.
const MAX_RELEASES: u32 = 2;
/// How long a lease lasts on the logical clock.
const LEASE_MS: i64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    Submit,
    Claim {
        agent: usize,
    },
    /// The calls made under a lease name it by the order it was issued in, so old leases are
    /// used as often as current ones.
    Start {
        lease: usize,
    },
    Heartbeat {
        lease: usize,
    },
    Finish {
        lease: usize,
        failed: bool,
    },
    Release {
        lease: usize,
    },
    /// The clock moves on, past leases or not.
    Tick {
        ms: i64,
    },
    /// The sweeper: the leases that ran out, each ended as `lease_expired` decides.
    Sweep,
    /// A sweeper that read an expired lease earlier and ends it now, renewed meanwhile or not.
    Expire {
        lease: usize,
    },
    Cancel {
        job: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Submit),
        3 => (0..AGENTS).prop_map(|agent| Op::Claim { agent }),
        2 => (0..8usize).prop_map(|lease| Op::Start { lease }),
        2 => (0..8usize).prop_map(|lease| Op::Heartbeat { lease }),
        2 => (0..8usize, any::<bool>()).prop_map(|(lease, failed)| Op::Finish { lease, failed }),
        1 => (0..8usize).prop_map(|lease| Op::Release { lease }),
        2 => (0..2 * LEASE_MS).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Sweep),
        1 => (0..8usize).prop_map(|lease| Op::Expire { lease }),
        1 => (0..6usize).prop_map(|job| Op::Cancel { job }),
    ]
}

/// One job as the model sees it.
#[derive(Debug, Clone)]
struct ModelJob {
    id: JobId,
    state: JobState,
    lease: Option<String>,
    lease_expires_at_ms: i64,
    attempts: i64,
    releases: u32,
    cancel_requested: bool,
    /// Agents held off it (a hand-back's hold outlasts the test).
    held: Vec<String>,
    /// Transitions into an end state the store reported.
    results: u32,
}

impl ModelJob {
    fn active(&self) -> bool {
        matches!(self.state, JobState::Assigned | JobState::Running)
    }

    /// What the store answers a call under `lease` that it refuses.
    fn refusal(&self) -> LeaseRefusal {
        if self.state.is_terminal() {
            LeaseRefusal::Finished(self.state)
        } else {
            LeaseRefusal::Superseded
        }
    }

    fn holds(&self, lease: &str) -> bool {
        self.active() && self.lease.as_deref() == Some(lease)
    }

    fn end(&mut self, state: JobState) {
        assert!(
            !self.state.is_terminal(),
            "job {} left {:?}",
            self.id,
            self.state
        );
        self.state = state;
        self.lease = None;
        if state.is_terminal() {
            self.results += 1;
        }
    }
}

struct Case<'a> {
    store: &'a dyn Store,
    label: String,
    clock: i64,
    jobs: Vec<ModelJob>,
    /// Every lease issued, in order, with its job's index.
    leases: Vec<(String, usize)>,
}

impl Case<'_> {
    fn offer(&self) -> Offer {
        offer("s", &[&self.label])
    }

    fn agent(agent: usize) -> String {
        format!("s/a{agent}")
    }

    /// The store's row agrees with the model.
    async fn check(&self, job: &ModelJob) {
        let row = self.store.job(job.id).await.unwrap().unwrap();
        assert_eq!(row.state(), job.state, "state of job {}", job.id);
        assert_eq!(row.lease, job.lease, "lease of job {}", job.id);
        assert_eq!(row.attempts, job.attempts, "attempts of job {}", job.id);
        assert_eq!(row.cancel_requested, job.cancel_requested);
        assert_eq!(row.finished_at_ms.is_some(), job.state.is_terminal());
        if job.active() {
            assert_eq!(row.lease_expires_at_ms, Some(job.lease_expires_at_ms));
        }
        assert!(
            job.results <= 1,
            "job {} has {} results",
            job.id,
            job.results
        );
    }

    fn lease(&self, n: usize) -> Option<(String, usize)> {
        (!self.leases.is_empty()).then(|| self.leases[n % self.leases.len()].clone())
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Submit => {
                let model = self
                    .store
                    .insert_job(&spec(&[&self.label]), &operator(), None)
                    .await
                    .unwrap()
                    .unwrap();
                self.jobs.push(ModelJob {
                    id: model.job_id(),
                    state: JobState::Queued,
                    lease: None,
                    lease_expires_at_ms: 0,
                    attempts: 0,
                    releases: 0,
                    cancel_requested: false,
                    held: Vec::new(),
                    results: 0,
                });
            }
            Op::Claim { agent } => {
                let agent = Self::agent(agent);
                let lease = format!("{}-lease-{}", self.label, self.leases.len());
                let offer = self.offer();
                let taker = JobTaker {
                    agent: &agent,
                    offer: &offer,
                };
                let expires = self.clock + LEASE_MS;
                let claimed = self.store.claim_job(&taker, &lease, expires).await.unwrap();
                // The oldest queued job the agent is not held off.
                let expected = self
                    .jobs
                    .iter()
                    .position(|j| j.state == JobState::Queued && !j.held.contains(&agent));
                assert_eq!(
                    claimed.as_ref().map(|c| c.job_id()),
                    expected.map(|i| self.jobs[i].id),
                    "the claim of {agent}"
                );
                if let Some(i) = expected {
                    let job = &mut self.jobs[i];
                    job.state = JobState::Assigned;
                    job.lease = Some(lease.clone());
                    job.lease_expires_at_ms = expires;
                    job.attempts += 1;
                    self.leases.push((lease, i));
                }
            }
            Op::Start { lease } | Op::Heartbeat { lease } => {
                let Some((lease, i)) = self.lease(lease) else {
                    return;
                };
                let id = self.jobs[i].id;
                let expires = self.clock + LEASE_MS;
                let answer = if matches!(op, Op::Start { .. }) {
                    self.store.start_job(id, &lease, expires).await.unwrap()
                } else {
                    self.store.renew_lease(id, &lease, expires).await.unwrap()
                };
                let job = &mut self.jobs[i];
                if job.holds(&lease) {
                    let renewal = answer.expect("a call under the job's lease");
                    assert_eq!(renewal.cancel_requested, job.cancel_requested);
                    if matches!(op, Op::Start { .. }) {
                        job.state = JobState::Running;
                        job.lease_expires_at_ms = expires;
                    } else {
                        // A heartbeat never shortens the lease.
                        job.lease_expires_at_ms = job.lease_expires_at_ms.max(expires);
                    }
                } else {
                    assert_eq!(answer.unwrap_err(), job.refusal(), "a late call");
                }
            }
            Op::Finish { lease, failed } => {
                let Some((lease, i)) = self.lease(lease) else {
                    return;
                };
                let outcome = if failed {
                    Outcome::exited(1)
                } else {
                    Outcome::succeeded()
                };
                let answer = self
                    .store
                    .finish_job(self.jobs[i].id, &lease, &outcome)
                    .await
                    .unwrap();
                let job = &mut self.jobs[i];
                if job.holds(&lease) {
                    let done = answer.expect("a result under the job's lease");
                    assert_eq!(done.state(), outcome.state);
                    job.end(outcome.state);
                } else {
                    assert_eq!(answer.unwrap_err(), job.refusal(), "a late result");
                }
            }
            Op::Release { lease } => {
                let Some((lease, i)) = self.lease(lease) else {
                    return;
                };
                let agent = self
                    .store
                    .job(self.jobs[i].id)
                    .await
                    .unwrap()
                    .unwrap()
                    .agent;
                let agent = agent.unwrap_or_default();
                let release = Release {
                    lease: &lease,
                    agent: &agent,
                    hold_until_ms: i64::MAX / 2,
                };
                let clock = self.clock;
                let decide = move |releases| {
                    transitions::released("handed back", None, releases, MAX_RELEASES, clock)
                };
                let answer = self
                    .store
                    .release_job(self.jobs[i].id, &release, &decide)
                    .await
                    .unwrap();
                let job = &mut self.jobs[i];
                if job.holds(&lease) {
                    let to = decide(job.releases);
                    let released = answer.expect("a hand-back under the job's lease");
                    assert_eq!(released.state(), to.state);
                    job.releases += 1;
                    job.attempts = (job.attempts - 1).max(0);
                    job.end(to.state);
                    if to.state == JobState::Queued {
                        job.held.push(agent);
                    }
                } else {
                    assert_eq!(answer.unwrap_err(), job.refusal(), "a late hand-back");
                }
            }
            Op::Tick { ms } => self.clock += ms,
            Op::Sweep => {
                let expired = self.store.expired_leases(self.clock).await.unwrap();
                let ours: Vec<JobId> = expired
                    .iter()
                    .map(|j| j.job_id())
                    .filter(|id| self.jobs.iter().any(|j| j.id == *id))
                    .collect();
                let want: Vec<JobId> = self
                    .jobs
                    .iter()
                    .filter(|j| j.active() && j.lease_expires_at_ms < self.clock)
                    .map(|j| j.id)
                    .collect();
                assert_eq!(ours, want, "the leases that ran out at {}", self.clock);
                for model in expired.iter().filter(|j| ours.contains(&j.job_id())) {
                    self.expire(model, model.lease.clone().unwrap()).await;
                }
            }
            Op::Expire { lease } => {
                let Some((lease, i)) = self.lease(lease) else {
                    return;
                };
                let model = self.store.job(self.jobs[i].id).await.unwrap().unwrap();
                self.expire(&model, lease).await;
            }
            Op::Cancel { job } => {
                if self.jobs.is_empty() {
                    return;
                }
                let i = job % self.jobs.len();
                let to = transitions::cancelled_before_start(self.clock);
                let row = self
                    .store
                    .request_cancel(self.jobs[i].id, &to)
                    .await
                    .unwrap()
                    .unwrap();
                let job = &mut self.jobs[i];
                match job.state {
                    JobState::Queued => {
                        job.cancel_requested = true;
                        job.end(JobState::Cancelled);
                    }
                    JobState::Assigned | JobState::Running => job.cancel_requested = true,
                    _ => {}
                }
                assert_eq!(row.state(), job.state);
            }
        }
    }

    /// The sweeper's decision for `read` (the job as it read it), applied to `lease`.
    async fn expire(&mut self, read: &JobModel, lease: String) {
        let to = transitions::lease_expired(read, MAX_ATTEMPTS, self.clock);
        let i = self
            .jobs
            .iter()
            .position(|j| j.id == read.job_id())
            .unwrap();
        let answer = self
            .store
            .expire_lease(read.job_id(), &lease, self.clock, &to)
            .await
            .unwrap();
        let job = &mut self.jobs[i];
        if job.holds(&lease) && job.lease_expires_at_ms < self.clock {
            let ended = answer.expect("an expired lease is ended");
            assert_eq!(ended.state(), to.state);
            job.end(to.state);
        } else if job.holds(&lease) {
            // Renewed (or never run out): the lease stands.
            assert_eq!(answer.unwrap_err(), LeaseRefusal::Superseded);
        } else {
            assert_eq!(answer.unwrap_err(), job.refusal(), "a late expiry");
        }
    }

    /// Ends every job still open, then checks that each has exactly one result and keeps it.
    async fn close(&mut self) {
        for i in 0..self.jobs.len() {
            let id = self.jobs[i].id;
            if let Some(lease) = self.jobs[i].lease.clone().filter(|_| self.jobs[i].active()) {
                self.store
                    .finish_job(id, &lease, &Outcome::succeeded())
                    .await
                    .unwrap()
                    .unwrap();
                self.jobs[i].end(JobState::Succeeded);
            } else if self.jobs[i].state == JobState::Queued {
                let to = transitions::cancelled_before_start(self.clock);
                self.store.request_cancel(id, &to).await.unwrap().unwrap();
                self.jobs[i].cancel_requested = true;
                self.jobs[i].end(JobState::Cancelled);
            }
        }
        for job in &self.jobs {
            assert_eq!(job.results, 1, "job {} ended {} times", job.id, job.results);
            self.check(job).await;
            for (lease, _) in self
                .leases
                .iter()
                .filter(|(_, i)| self.jobs[*i].id == job.id)
            {
                assert_eq!(
                    self.store
                        .finish_job(job.id, lease, &Outcome::succeeded())
                        .await
                        .unwrap()
                        .unwrap_err(),
                    LeaseRefusal::Finished(job.state),
                    "a second result"
                );
            }
        }
    }
}

async fn run_case(store: &dyn Store, case: usize, ops: &[Op]) {
    let mut case = Case {
        store,
        label: format!("case-{case}"),
        clock: 1_000_000,
        jobs: Vec::new(),
        leases: Vec::new(),
    };
    for op in ops {
        case.apply(op).await;
        for job in &case.jobs {
            case.check(job).await;
        }
    }
    case.close().await;
}

/// Runs the property on `store` on a runtime of its own (proptest's runner is synchronous).
fn check_lifecycle(open: impl AsyncFnOnce() -> Fresh) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fresh = runtime.block_on(open());
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    });
    let cases = std::cell::Cell::new(0);
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        cases.set(cases.get() + 1);
        runtime.block_on(run_case(&*fresh.store, cases.get(), &ops));
        Ok::<(), TestCaseError>(())
    });
    runtime.block_on(fresh.finish());
    if let Err(err) = result {
        panic!("{err}");
    }
}

#[test]
fn sqlite_store_keeps_the_job_lifecycle() {
    check_lifecycle(Fresh::sqlite);
}

#[test]
fn postgres_store_keeps_the_job_lifecycle() {
    check_lifecycle(Fresh::postgres);
}
