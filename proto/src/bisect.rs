//! Statistical bisection: for a test that fails now (every run, or only some) and passed at an
//! older commit of a branch, run it on the commits in between, as often at each as the failure
//! rate needs, until the first commit where it started failing is named with its confidence.
//!
//! A commit is **bad** once the test failed there at least once: the good commit's rate is
//! taken to be nil, so one failure tells the two apart. It is **good** once the test passed
//! there `n = ln(1 − c') / ln(1 − r)` times in a row, where `r` is the failure rate at the bad
//! commit and `c' = 1 − (1 − c) / log₂ N` the confidence asked for, shared among the about
//! log₂ N such calls of a bisection: were the commit bad, so many passes would happen with
//! chance at most `1 − c'`. With `K` agents free, each round tests `K` commits spread
//! evenly over the range still open, so the range shrinks `K + 1` ways a round (about
//! `log_{K+1} N` rounds instead of `log₂ N`).
//!
//! [`plan`] is the whole decision, without I/O: the broker records each run's outcome in the
//! [`Bisection`], asks `plan` what to do, and does it.

use serde::{Deserialize, Serialize};

use crate::jobs::JobId;

/// The most commits a bisection spans (GitHub's compare API lists up to 250).
pub const MAX_COMMITS: usize = 250;
/// The most runs one bisection may start in all.
pub const MAX_RUNS: usize = 1000;
/// Runs at the bad commit to measure its failure rate, when its history does not say.
pub const CALIBRATION_RUNS: u32 = 20;
/// The lowest failure rate a bisection plans for: a rarer flake needs more runs per commit
/// than is reasonable (`n` is 59 at 0.05 and 95 % confidence).
pub const MIN_RATE: f64 = 0.05;
/// Default confidence.
pub const CONFIDENCE: f64 = 0.95;

/// The body of `POST /api/v1/repos/{owner}/{name}/bisections`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BisectRequest {
    /// The test, as `testbot flaky` names it: `suite > Class.name`.
    pub test: String,
    /// The config's job that runs it. Default: the job whose history has the test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// A commit where it passed, and a later one where it fails.
    pub good: String,
    pub bad: String,
    /// The branch both are on. Default: the repository's default branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// What the job's `run_tests` gets for `{tests}`. Default: the test's name, or with the
    /// job's `list` the listed tests whose names end with it (`*test_wobbly`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// Default [`CONFIDENCE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confidence: Option<f64>,
}

/// Where a bisection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BisectionState {
    Running,
    /// The first bad commit is named.
    Found,
    /// It could not go on; `message` says why.
    Failed,
}

impl BisectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            BisectionState::Running => "running",
            BisectionState::Found => "found",
            BisectionState::Failed => "failed",
        }
    }
}

/// How one run of the test went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    Passed,
    Failed,
    /// The run ended without a result for the test (the fleet failed it, it was cancelled,
    /// or its results do not name the test): it says nothing.
    NoResult,
}

/// One run at one commit: the job, and once it has ended, its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BisectRun {
    pub job: JobId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<RunOutcome>,
}

/// A commit the bisection ran the test on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Its place in [`Bisection::commits`].
    pub position: usize,
    pub runs: Vec<BisectRun>,
}

impl Point {
    pub fn passes(&self) -> u32 {
        self.count(RunOutcome::Passed)
    }

    pub fn failures(&self) -> u32 {
        self.count(RunOutcome::Failed)
    }

    /// Runs that have not ended.
    pub fn open(&self) -> impl Iterator<Item = JobId> + '_ {
        self.runs
            .iter()
            .filter(|r| r.outcome.is_none())
            .map(|r| r.job)
    }

    fn count(&self, outcome: RunOutcome) -> u32 {
        self.runs
            .iter()
            .filter(|r| r.outcome == Some(outcome))
            .count() as u32
    }
}

/// What a bisection is started with: the test, where it runs, and who asked.
#[derive(Debug, Clone)]
pub struct NewBisection {
    pub repository: String,
    pub repository_id: i64,
    pub installation_id: i64,
    pub public: bool,
    pub branch: String,
    pub job: String,
    pub suite: String,
    pub classname: Option<String>,
    pub name: String,
    pub select: Option<String>,
    pub confidence: f64,
    /// The failure rate at the bad commit, when its history says.
    pub rate: Option<f64>,
    pub started_by: String,
}

/// A bisection, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bisection {
    pub id: i64,
    pub repository: String,
    pub repository_id: i64,
    pub installation_id: i64,
    /// GitHub says the repository is public: its runs are readable without login.
    #[serde(default)]
    pub public: bool,
    pub branch: String,
    pub job: String,
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classname: Option<String>,
    pub name: String,
    /// What `run_tests` gets, when the job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<String>,
    /// From the good commit (first) to the bad one (last), oldest first.
    pub commits: Vec<String>,
    pub confidence: f64,
    /// The test's failure rate at the bad commit, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    pub state: BisectionState,
    /// The range still open: `commits[lo]` is good, `commits[hi]` bad.
    pub lo: usize,
    pub hi: usize,
    pub rounds: u32,
    pub points: Vec<Point>,
    /// Once found: the first bad commit, and the confidence that the one before it is good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub culprit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub culprit_confidence: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `operator:NAME`, `user:LOGIN`, or `testbot` for one it started on a new flake.
    pub started_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl Bisection {
    /// A running bisection of `new` over `commits` (the good one first, the bad one last; at
    /// least two), started at `at_ms`: the whole range open, nothing run yet.
    pub fn start(new: NewBisection, commits: Vec<String>, at_ms: i64) -> Bisection {
        let hi = commits.len().saturating_sub(1);
        Bisection {
            id: 0,
            repository: new.repository,
            repository_id: new.repository_id,
            installation_id: new.installation_id,
            public: new.public,
            branch: new.branch,
            job: new.job,
            suite: new.suite,
            classname: new.classname,
            name: new.name,
            select: new.select,
            commits,
            confidence: new.confidence,
            rate: new.rate,
            state: BisectionState::Running,
            lo: 0,
            hi,
            rounds: 0,
            points: Vec::new(),
            culprit: None,
            culprit_confidence: None,
            message: None,
            started_by: new.started_by,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
        }
    }

    pub fn test_id(&self) -> String {
        crate::test_results::test_id(&self.suite, self.classname.as_deref(), &self.name)
    }

    /// The runs at a commit of `commits` for the test to be called good there. A bisection
    /// makes about log₂ N such calls, any of which may be wrong, so each is made at the
    /// confidence that leaves the whole at `confidence` (Bonferroni: `1 − (1 − c) / log₂ N`).
    pub fn runs_to_pass(&self) -> Option<u32> {
        let rate = self.rate?.clamp(MIN_RATE, 1.0);
        if rate >= 1.0 {
            return Some(1);
        }
        let calls = (self.commits.len().max(2) as f64).log2().ceil();
        let each = 1.0 - (1.0 - self.confidence) / calls;
        let n = (1.0 - each).ln() / (1.0 - rate).ln();
        Some((n - 1e-9).ceil().max(1.0) as u32)
    }

    pub fn point(&self, position: usize) -> Option<&Point> {
        self.points.iter().find(|p| p.position == position)
    }

    fn point_mut(&mut self, position: usize) -> &mut Point {
        if let Some(i) = self.points.iter().position(|p| p.position == position) {
            return &mut self.points[i];
        }
        self.points.push(Point {
            position,
            runs: Vec::new(),
        });
        self.points.last_mut().expect("pushed")
    }

    /// Records the jobs started at `position`.
    pub fn add_runs(&mut self, position: usize, jobs: impl IntoIterator<Item = JobId>) {
        let point = self.point_mut(position);
        point
            .runs
            .extend(jobs.into_iter().map(|job| BisectRun { job, outcome: None }));
        self.points.sort_by_key(|p| p.position);
    }

    /// Records how run `job` went.
    pub fn set_outcome(&mut self, job: JobId, outcome: RunOutcome) {
        for point in &mut self.points {
            for run in &mut point.runs {
                if run.job == job {
                    run.outcome = Some(outcome);
                }
            }
        }
    }

    pub fn total_runs(&self) -> usize {
        self.points.iter().map(|p| p.runs.len()).sum()
    }

    /// Runs that ran or may still run: all but those cancelled or failed by the fleet, which
    /// the run limit does not count.
    pub fn runs_spent(&self) -> usize {
        self.points
            .iter()
            .flat_map(|p| &p.runs)
            .filter(|r| r.outcome != Some(RunOutcome::NoResult))
            .count()
    }

    /// One line of where it stands.
    pub fn describe(&self) -> String {
        let short = |sha: &str| sha.get(..12).unwrap_or(sha).to_string();
        match self.state {
            BisectionState::Found => format!(
                "{} first fails at {} (the commit before it passed with confidence {:.3}), after {} runs in {} rounds",
                self.test_id(),
                short(self.culprit.as_deref().unwrap_or("")),
                self.culprit_confidence.unwrap_or(0.0),
                self.runs_spent(),
                self.rounds
            ),
            BisectionState::Failed => format!(
                "{}: {}",
                self.test_id(),
                self.message.as_deref().unwrap_or("failed")
            ),
            BisectionState::Running => format!(
                "{}: between {} (good) and {} (bad), {} commits apart; round {}, {} runs so far",
                self.test_id(),
                short(&self.commits[self.lo]),
                short(&self.commits[self.hi]),
                self.hi - self.lo,
                self.rounds,
                self.runs_spent()
            ),
        }
    }
}

/// What to do next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Start this many more runs at these positions.
    pub submit: Vec<(usize, u32)>,
    /// Cancel these runs: their commit is decided, or out of the range still open.
    pub cancel: Vec<JobId>,
}

/// Updates `bisection` from the outcomes recorded in it and says what to run next, with `free`
/// agents to spread a round over. Ends it (`Found` or `Failed`) when it can.
pub fn plan(bisection: &mut Bisection, free: usize) -> Plan {
    let mut plan = Plan::default();
    if bisection.state != BisectionState::Running {
        return plan;
    }
    let hi0 = bisection.commits.len() - 1;
    // The rate at the bad commit, from its own runs when the history did not give one.
    if bisection.rate.is_none() {
        let at_bad = bisection.point(hi0).cloned();
        let (passes, failures, open) = at_bad
            .as_ref()
            .map_or((0, 0, 0), |p| (p.passes(), p.failures(), p.open().count()));
        let runs = passes + failures;
        if (runs >= CALIBRATION_RUNS / 2 && open == 0) || runs >= CALIBRATION_RUNS {
            if failures == 0 {
                fail(
                    bisection,
                    format!(
                        "the test passed in all {runs} runs at the bad commit {}: nothing to bisect",
                        bisection.commits[hi0]
                    ),
                );
                return plan;
            }
            bisection.rate = Some(f64::from(failures) / f64::from(runs));
            plan.cancel.extend(at_bad.iter().flat_map(|p| p.open()));
        } else {
            let started = at_bad.map_or(0, |p| p.runs.len() as u32);
            if started < CALIBRATION_RUNS {
                plan.submit.push((hi0, CALIBRATION_RUNS - started));
            } else if open == 0 {
                // Runs ended without results: try as many again, within the limit below.
                plan.submit.push((hi0, CALIBRATION_RUNS / 2));
            }
            return check_limit(bisection, plan);
        }
    }
    let needed = bisection.runs_to_pass().expect("the rate is known");
    // Narrow the range by what the points say.
    let (lo, hi) = (bisection.lo, bisection.hi);
    let bad = bisection
        .points
        .iter()
        .filter(|p| p.position > lo && p.position < hi && p.failures() > 0)
        .map(|p| p.position)
        .min()
        .unwrap_or(hi);
    let good = bisection
        .points
        .iter()
        .filter(|p| p.position > lo && p.position < bad && p.failures() == 0)
        .filter(|p| p.passes() >= needed)
        .map(|p| p.position)
        .max()
        .unwrap_or(lo);
    bisection.lo = good;
    bisection.hi = bad;
    // Runs no longer needed: at decided commits and outside the open range.
    for point in &bisection.points {
        let inside = point.position > good && point.position < bad;
        let decided = point.failures() > 0 || point.passes() >= needed;
        if point.position != hi0 && (!inside || decided) {
            plan.cancel.extend(point.open());
        }
    }
    if bad - good <= 1 {
        let passes = bisection.point(good).map_or(0, Point::passes);
        bisection.state = BisectionState::Found;
        bisection.culprit = Some(bisection.commits[bad].clone());
        // Were the commit before the culprit bad (at the measured rate), its passes would have
        // happened with this chance; the given good commit is taken as the caller says.
        let rate = bisection.rate.unwrap_or(1.0).clamp(MIN_RATE, 1.0);
        bisection.culprit_confidence = Some(if good == 0 && passes == 0 {
            1.0
        } else {
            1.0 - (1.0 - rate).powi(passes.min(10_000) as i32)
        });
        return plan;
    }
    // Points in the open range still being decided.
    let undecided: Vec<&Point> = bisection
        .points
        .iter()
        .filter(|p| p.position > good && p.position < bad)
        .filter(|p| p.failures() == 0 && p.passes() < needed)
        .collect();
    if undecided.is_empty() {
        // A new round: `free` commits spread evenly over the open range.
        // As many as fit the runs the bisection has left: fewer commits a round rather than
        // none.
        let gap = bad - good - 1;
        let budget = (MAX_RUNS.saturating_sub(bisection.runs_spent()) / needed as usize).max(1);
        let k = free.clamp(1, gap).min(budget);
        let mut positions: Vec<usize> = (1..=k)
            .map(|i| good + (i * (bad - good)).div_ceil(k + 1))
            .filter(|&p| p > good && p < bad)
            .collect();
        positions.dedup();
        bisection.rounds += 1;
        for position in positions {
            let have = bisection.point(position).map_or(0, Point::passes);
            plan.submit
                .push((position, needed.saturating_sub(have).max(1)));
        }
    } else {
        // Top up commits whose runs ended without saying enough.
        for point in undecided {
            let open = point.open().count() as u32;
            let have = point.passes() + open;
            if have < needed {
                plan.submit.push((point.position, needed - have));
            }
        }
    }
    check_limit(bisection, plan)
}

fn check_limit(bisection: &mut Bisection, plan: Plan) -> Plan {
    let more: u32 = plan.submit.iter().map(|(_, n)| n).sum();
    let without_result = bisection.total_runs() - bisection.runs_spent();
    if without_result > MAX_RUNS {
        // Runs that keep ending without a result (no site takes them, the fleet fails them)
        // would be asked for again without end.
        fail(
            bisection,
            format!(
                "more than {MAX_RUNS} of its runs ended without a result for the test: is it refused at every site, or missing from the job's results?"
            ),
        );
        return Plan::default();
    }
    if bisection.runs_spent() + more as usize > MAX_RUNS {
        fail(
            bisection,
            format!("it would take more than {MAX_RUNS} runs"),
        );
        let cancel = bisection.points.iter().flat_map(Point::open).collect();
        return Plan {
            submit: Vec::new(),
            cancel,
        };
    }
    plan
}

fn fail(bisection: &mut Bisection, message: String) {
    bisection.state = BisectionState::Failed;
    bisection.message = Some(message);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bisection of `wobbly` over `commits` commits.
    fn bisection(commits: usize, rate: Option<f64>) -> Bisection {
        Bisection::start(
            NewBisection {
                repository: "o/r".into(),
                repository_id: 1,
                installation_id: 1,
                public: true,
                branch: "main".into(),
                job: "unit".into(),
                suite: "pkg".into(),
                classname: None,
                name: "wobbly".into(),
                select: None,
                confidence: 0.95,
                rate,
                started_by: "testbot".into(),
            },
            (0..commits).map(|i| format!("{i:03}{:037}", 0)).collect(),
            0,
        )
    }

    /// Runs the plan to its end against a test that fails in every third run from commit
    /// `culprit` on (by job number, so the simulation is deterministic); returns the rounds.
    fn simulate(b: &mut Bisection, culprit: usize, free: usize) -> u32 {
        let mut next_job = 1;
        for _ in 0..100 {
            let plan = plan(b, free);
            for job in &plan.cancel {
                b.set_outcome(*job, RunOutcome::NoResult);
            }
            if b.state != BisectionState::Running {
                return b.rounds;
            }
            assert!(!plan.submit.is_empty(), "{b:#?}");
            for (position, count) in plan.submit {
                let jobs: Vec<JobId> = (0..count)
                    .map(|_| {
                        next_job += 1;
                        JobId(next_job)
                    })
                    .collect();
                b.add_runs(position, jobs.clone());
                for job in jobs {
                    let fails = position >= culprit && job.0 % 3 == 0;
                    b.set_outcome(
                        job,
                        if fails {
                            RunOutcome::Failed
                        } else {
                            RunOutcome::Passed
                        },
                    );
                }
            }
        }
        panic!("no end: {b:#?}");
    }

    #[test]
    fn a_flake_that_starts_at_commit_7_of_12_is_found_there_with_its_confidence() {
        let mut b = bisection(12, Some(1.0 / 3.0));
        // Four calls for 12 commits, each at 1 − 0.05 / 4: ln(0.0125) / ln(2/3) = 10.8, so
        // eleven passes call a commit good.
        assert_eq!(b.runs_to_pass(), Some(11));
        let rounds = simulate(&mut b, 7, 1);
        assert_eq!(b.state, BisectionState::Found, "{b:#?}");
        assert_eq!(b.culprit.as_deref(), Some(b.commits[7].as_str()));
        assert!(b.culprit_confidence.unwrap() >= 0.95, "{b:#?}");
        assert!(rounds <= 4, "{rounds}");
        assert!(
            b.describe().contains(
                "first fails at 007000000000 (the commit before it passed with confidence 0.988)"
            ),
            "{}",
            b.describe()
        );
    }

    #[test]
    fn more_free_agents_take_fewer_rounds() {
        let mut one = bisection(200, Some(0.5));
        let mut eight = bisection(200, Some(0.5));
        let (r1, r8) = (simulate(&mut one, 123, 1), simulate(&mut eight, 123, 8));
        assert_eq!(one.culprit, eight.culprit);
        assert_eq!(eight.culprit.as_deref(), Some(eight.commits[123].as_str()));
        // log2(200) ≈ 8 rounds against log9(200) ≈ 3.
        assert!(r1 >= 7 && r8 <= 4, "{r1} {r8}");
    }

    #[test]
    fn without_a_known_rate_the_bad_commit_is_measured_first_and_a_test_that_never_fails_there_ends_it()
     {
        let mut b = bisection(12, None);
        let first = plan(&mut b, 4);
        assert_eq!(first.submit, [(11, CALIBRATION_RUNS)]);
        simulate(&mut b, 5, 4);
        assert_eq!(b.culprit.as_deref(), Some(b.commits[5].as_str()), "{b:#?}");
        assert!((b.rate.unwrap() - 0.3).abs() < 0.1, "{:?}", b.rate);

        let mut never = bisection(12, None);
        simulate(&mut never, 99, 4);
        assert_eq!(never.state, BisectionState::Failed);
        assert!(
            never
                .message
                .as_deref()
                .unwrap()
                .contains("passed in all 20 runs at the bad commit"),
            "{never:#?}"
        );
    }

    #[test]
    fn a_broken_test_needs_one_run_a_commit() {
        let mut b = bisection(12, Some(1.0));
        assert_eq!(b.runs_to_pass(), Some(1));
        let mut jobs = 0;
        loop {
            let plan = plan(&mut b, 1);
            if b.state != BisectionState::Running {
                break;
            }
            for (position, count) in plan.submit {
                assert_eq!(count, 1);
                jobs += 1;
                b.add_runs(position, [JobId(jobs)]);
                let outcome = if position >= 9 {
                    RunOutcome::Failed
                } else {
                    RunOutcome::Passed
                };
                b.set_outcome(JobId(jobs), outcome);
            }
        }
        assert_eq!(b.culprit.as_deref(), Some(b.commits[9].as_str()));
        assert!(jobs <= 4, "{jobs}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// Whatever the commits, the culprit, the rate and the runs' luck: the bisection ends,
        /// within its run limit, and never names a commit before the one that broke the test
        /// (those never fail); with enough luck against it, it may name a later one, which is
        /// what its confidence bounds.
        #[test]
        fn a_bisection_ends_and_never_blames_a_commit_before_the_culprit(
            commits in 2usize..80,
            culprit_at in 0.0f64..1.0,
            rate in 0.05f64..=1.0,
            free in 1usize..9,
            luck in proptest::collection::vec(0.0f64..1.0, 2000),
        ) {
            let culprit = 1 + ((commits - 1) as f64 * culprit_at) as usize % (commits - 1);
            let mut b = bisection(commits, Some(rate));
            let mut draws = luck.iter().cycle();
            let mut next = 0;
            for _ in 0..500 {
                let step = plan(&mut b, free);
                for job in &step.cancel {
                    b.set_outcome(*job, RunOutcome::NoResult);
                }
                if b.state != BisectionState::Running {
                    break;
                }
                for (position, count) in step.submit {
                    for _ in 0..count {
                        next += 1;
                        b.add_runs(position, [JobId(next)]);
                        let fails = position >= culprit && *draws.next().unwrap() < rate;
                        b.set_outcome(
                            JobId(next),
                            if fails { RunOutcome::Failed } else { RunOutcome::Passed },
                        );
                    }
                }
            }
            proptest::prop_assert_ne!(b.state, BisectionState::Running);
            proptest::prop_assert!(b.runs_spent() <= MAX_RUNS);
            if b.state == BisectionState::Found {
                let named = b
                    .commits
                    .iter()
                    .position(|c| Some(c) == b.culprit.as_ref())
                    .unwrap();
                proptest::prop_assert!(named >= culprit, "named {} before the culprit {}", named, culprit);
                proptest::prop_assert!(b.culprit_confidence.unwrap() > 0.0);
            }
        }
    }

    #[test]
    fn runs_that_never_say_anything_end_the_bisection_instead_of_running_forever() {
        let mut b = bisection(12, Some(0.5));
        let mut next = 0;
        for _ in 0..10_000 {
            let step = plan(&mut b, 4);
            if b.state != BisectionState::Running {
                break;
            }
            for (position, count) in step.submit {
                for _ in 0..count {
                    next += 1;
                    b.add_runs(position, [JobId(next)]);
                    b.set_outcome(JobId(next), RunOutcome::NoResult);
                }
            }
        }
        assert_eq!(b.state, BisectionState::Failed, "{}", b.describe());
        assert!(
            b.message
                .as_deref()
                .unwrap()
                .contains("ended without a result"),
            "{b:?}"
        );
    }
}
