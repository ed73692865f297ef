//! Test results: the files a job's agent collects (`JobSpec::results`), what the broker read
//! from each, and the test cases, for one job and across the runs of a batch.
//!
//! The agent uploads each file under the job's lease (`PUT /api/v1/agent/jobs/{id}/files`);
//! the broker keeps it (downloadable as it was) and reads JUnit XML from it with
//! [`crate::junit`]. A file it cannot read is reported with the reason; it never fails the job.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::batches::BatchId;
use crate::jobs::JobId;
use crate::junit::{TestOutcome, Totals};

/// Largest result file the broker takes.
pub const MAX_RESULT_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// Most result files of one job.
pub const MAX_RESULT_FILES: usize = 100;
/// Most bytes of result files of one job, together.
pub const MAX_RESULT_BYTES_PER_JOB: u64 = 128 * 1024 * 1024;
/// Longest failure message kept per attempt, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// The query of `PUT /api/v1/agent/jobs/{id}/files`; the body is the file's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    pub lease: String,
    /// The file's path in the workspace, `/`-separated (see [`validate_result_path`]).
    pub path: String,
}

/// A file's path as a job names it: relative, `/`-separated, without `.` or `..` components,
/// at most 1,000 bytes, and no control characters (it is shown to people).
pub fn validate_result_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 1000 {
        return Err(format!(
            "a result file's path has 1 to 1000 bytes; this one has {}",
            path.len()
        ));
    }
    if path.starts_with('/') {
        return Err(format!("result file path {path:?} is absolute"));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "result file path {path:?} has an empty, \".\" or \"..\" component"
        ));
    }
    if path.chars().any(char::is_control) {
        return Err(format!(
            "result file path {:?} has control characters",
            path.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// What the broker read from one result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileReport {
    /// JUnit XML, read.
    Junit {
        totals: Totals,
        /// The reader stopped at a limit; later cases are missing.
        #[serde(default)]
        truncated: bool,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        warnings: Vec<String>,
    },
    /// An XML file whose root is not `<testsuites>` or `<testsuite>`, or a file that is not
    /// XML at all: kept, not read.
    NotJunit { reason: String },
    /// It looked like JUnit XML but could not be read.
    Unreadable { error: String },
}

impl FileReport {
    /// What was read, in words: `3 tests: 2 passed, 1 failed, 0 errors, 0 skipped`.
    pub fn describe(&self) -> String {
        match self {
            FileReport::Junit {
                totals, truncated, ..
            } => format!(
                "{} tests: {} passed, {} failed, {} errors, {} skipped{}",
                totals.cases,
                totals.passed,
                totals.failed,
                totals.errors,
                totals.skipped,
                if *truncated {
                    " (cut at the broker's limit)"
                } else {
                    ""
                }
            ),
            FileReport::NotJunit { reason } => format!("not read as JUnit XML ({reason})"),
            FileReport::Unreadable { error } => {
                format!("cannot be read as JUnit XML: {error}")
            }
        }
    }
}

/// The answer to an upload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadAck {
    pub path: String,
    pub bytes: u64,
    pub report: FileReport,
}

/// One stored result file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultFile {
    pub path: String,
    pub bytes: u64,
    pub report: FileReport,
}

/// One run of a test, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptResult {
    pub outcome: TestOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// The failure's message, at most [`MAX_MESSAGE_BYTES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One test of a job, with every attempt its file records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The result file it came from.
    pub file: String,
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classname: Option<String>,
    pub name: String,
    pub attempts: Vec<AttemptResult>,
}

impl CaseResult {
    /// `suite > classname.name`, the way people name a test.
    pub fn test_id(&self) -> String {
        test_id(&self.suite, self.classname.as_deref(), &self.name)
    }

    pub fn final_outcome(&self) -> TestOutcome {
        self.attempts
            .last()
            .map_or(TestOutcome::Passed, |a| a.outcome)
    }

    /// Both a pass and a failure among its attempts (a rerun that passed).
    pub fn is_flaky(&self) -> bool {
        self.attempts
            .iter()
            .any(|a| a.outcome == TestOutcome::Passed)
            && self.attempts.iter().any(|a| a.outcome.is_failure())
    }
}

/// How a test is named in listings: `suite > classname.name`, leaving out what is empty.
pub fn test_id(suite: &str, classname: Option<&str>, name: &str) -> String {
    let mut id = String::new();
    if !suite.is_empty() {
        id.push_str(suite);
        id.push_str(" > ");
    }
    if let Some(class) = classname.filter(|c| !c.is_empty()) {
        id.push_str(class);
        id.push('.');
    }
    id.push_str(name);
    id
}

/// The body of `GET /api/v1/jobs/{id}/results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResults {
    pub job: JobId,
    pub files: Vec<ResultFile>,
    pub cases: Vec<CaseResult>,
    pub totals: CaseTotals,
    /// The job's failed tests already known to be flaky on its branch (flaky at an earlier
    /// commit, and still in [`Quarantine`]): told apart from new failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub known_flaky: Vec<String>,
}

impl JobResults {
    /// The failed cases that are new, and those of tests known to be flaky.
    pub fn new_and_known_failures(&self) -> (Vec<&CaseResult>, Vec<&CaseResult>) {
        self.cases
            .iter()
            .filter(|c| c.final_outcome().is_failure())
            .partition(|c| !self.known_flaky.contains(&c.test_id()))
    }
}

/// Counts of a job's test cases by final outcome; `flaky` are counted in theirs too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseTotals {
    pub cases: u64,
    pub passed: u64,
    pub failed: u64,
    pub errors: u64,
    pub skipped: u64,
    pub flaky: u64,
}

impl std::fmt::Display for CaseTotals {
    /// `2 passed, 1 failed, 0 errors, 0 skipped, 1 flaky`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} errors, {} skipped, {} flaky",
            self.passed, self.failed, self.errors, self.skipped, self.flaky
        )
    }
}

/// The cases that failed (by their last attempt), and those that failed and then passed on a
/// rerun (flaky), in the order given.
pub fn failed_and_flaky(cases: &[CaseResult]) -> (Vec<&CaseResult>, Vec<&CaseResult>) {
    let failed = cases
        .iter()
        .filter(|c| c.final_outcome().is_failure())
        .collect();
    let flaky = cases.iter().filter(|c| c.is_flaky()).collect();
    (failed, flaky)
}

impl CaseTotals {
    pub fn of(cases: &[CaseResult]) -> CaseTotals {
        let mut totals = CaseTotals {
            cases: cases.len() as u64,
            ..CaseTotals::default()
        };
        for case in cases {
            match case.final_outcome() {
                TestOutcome::Passed => totals.passed += 1,
                TestOutcome::Failed => totals.failed += 1,
                TestOutcome::Error => totals.errors += 1,
                TestOutcome::Skipped => totals.skipped += 1,
            }
            if case.is_flaky() {
                totals.flaky += 1;
            }
        }
        totals
    }
}

/// One test across the runs of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestAcrossRuns {
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classname: Option<String>,
    pub name: String,
    /// Runs that reported it.
    pub runs: u32,
    /// Runs where its final outcome was a pass, a failure or error, a skip.
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
    /// The runs (from 1) where it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_runs: Vec<u32>,
    /// Runs where it failed and then passed on a rerun within the run.
    pub flaky_within: u32,
}

impl TestAcrossRuns {
    /// Flaky at this commit: it both passed and failed in the same batch (one job, one commit),
    /// or failed and passed on a rerun within a run.
    pub fn is_flaky(&self) -> bool {
        (self.passed > 0 && self.failed > 0) || self.flaky_within > 0
    }

    /// It failed in every run that reported it.
    pub fn is_broken(&self) -> bool {
        self.runs > 0 && self.failed == self.runs
    }

    pub fn test_id(&self) -> String {
        test_id(&self.suite, self.classname.as_deref(), &self.name)
    }

    /// The failure rate over the runs that reported it, with its 95 % Wilson score interval.
    pub fn failure_rate(&self) -> Option<(f64, f64, f64)> {
        let (low, high) = wilson_interval(u64::from(self.failed), u64::from(self.runs), 1.96)?;
        Some((f64::from(self.failed) / f64::from(self.runs), low, high))
    }
}

/// The Wilson score interval of a rate of `successes` in `n` trials at `z` standard
/// deviations (1.96: 95 %). Unlike the normal approximation it stays within 0 and 1 and is
/// honest for few runs and rare failures, which is what flaky tests are. None for `n` = 0.
pub fn wilson_interval(successes: u64, n: u64, z: f64) -> Option<(f64, f64)> {
    if n == 0 {
        return None;
    }
    let n = n as f64;
    let p = successes.min(n as u64) as f64 / n;
    let z2 = z * z;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = z / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// The body of `GET /api/v1/batches/{id}/results`: every test any run reported, flaky ones
/// first, then broken ones, then by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResults {
    pub batch: BatchId,
    pub runs: u32,
    /// Runs that uploaded at least one readable JUnit file.
    pub runs_with_results: u32,
    pub tests: Vec<TestAcrossRuns>,
}

impl BatchResults {
    /// Builds the summary from `(run, case)` pairs.
    pub fn of(
        batch: BatchId,
        runs: u32,
        cases: impl IntoIterator<Item = (u32, CaseResult)>,
    ) -> BatchResults {
        let mut tests: BTreeMap<(String, Option<String>, String), TestAcrossRuns> = BTreeMap::new();
        let mut seen: BTreeMap<(String, Option<String>, String), Vec<u32>> = BTreeMap::new();
        let mut runs_with_results = std::collections::BTreeSet::new();
        for (run, case) in cases {
            runs_with_results.insert(run);
            let key = (
                case.suite.clone(),
                case.classname.clone(),
                case.name.clone(),
            );
            // A test reported twice in one run (two files) counts once, by its worst outcome.
            let runs_seen = seen.entry(key.clone()).or_default();
            let entry = tests.entry(key).or_insert_with(|| TestAcrossRuns {
                suite: case.suite.clone(),
                classname: case.classname.clone(),
                name: case.name.clone(),
                runs: 0,
                passed: 0,
                failed: 0,
                skipped: 0,
                failed_runs: Vec::new(),
                flaky_within: 0,
            });
            if case.is_flaky() {
                entry.flaky_within += 1;
            }
            let outcome = case.final_outcome();
            if runs_seen.contains(&run) {
                if outcome.is_failure() && !entry.failed_runs.contains(&run) {
                    entry.failed_runs.push(run);
                    entry.failed += 1;
                    entry.passed = entry.passed.saturating_sub(1);
                }
                continue;
            }
            runs_seen.push(run);
            entry.runs += 1;
            match outcome {
                TestOutcome::Passed => entry.passed += 1,
                TestOutcome::Skipped => entry.skipped += 1,
                TestOutcome::Failed | TestOutcome::Error => {
                    entry.failed += 1;
                    entry.failed_runs.push(run);
                }
            }
        }
        let mut tests: Vec<TestAcrossRuns> = tests.into_values().collect();
        for test in &mut tests {
            test.failed_runs.sort_unstable();
        }
        tests.sort_by_key(|t| (!t.is_flaky(), !t.is_broken(), t.test_id()));
        BatchResults {
            batch,
            runs,
            runs_with_results: runs_with_results.len() as u32,
            tests,
        }
    }
}

/// The query of `GET /api/v1/repos/{owner}/{name}/flaky`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlakyQuery {
    /// Only jobs of this branch (`main`) or ref (`refs/pull/7/merge`). Default: every ref.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// Only jobs submitted within this long (`30d`, `12h`). Default: 30 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// At most this many tests, the flakiest first. Default 100, at most 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl FlakyQuery {
    /// The ref a `branch` names: `main` is `refs/heads/main`; a full ref stays as it is.
    pub fn git_ref(&self) -> Option<String> {
        self.branch.as_ref().map(|b| {
            if b.starts_with("refs/") {
                b.clone()
            } else {
                format!("refs/heads/{b}")
            }
        })
    }
}

/// One test's record over a repository's history (one job's runs of it, across commits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestHistory {
    /// The job's name (its `name`, or the config's job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    pub suite: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classname: Option<String>,
    pub name: String,
    /// Runs of the test in the window, and how many failed (by their last attempt).
    pub runs: u64,
    pub failures: u64,
    /// Runs that failed and then passed on a rerun.
    pub flaky_within: u64,
    /// Commits it ran at; those where it both passed and failed (flaky there); those where it
    /// failed in every run.
    pub commits: u64,
    pub flaky_commits: u64,
    pub failing_commits: u64,
    /// The first commit (by when its first run was submitted) at which it was flaky.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_flaky_commit: Option<String>,
    /// The last commit at which it passed in every run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_passing_commit: Option<String>,
    /// The last commit it ran at, and whether it failed in every run there.
    pub latest_commit: String,
    pub failing_at_latest: bool,
    /// When it fails at the latest commit: the first of the commits since which it has failed
    /// in every run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_since: Option<String>,
    /// Runs and failures per site, agent, Slurm node list and image it ran on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placements: Vec<PlacementRuns>,
    /// Where its failures cluster (see [`clusters`]): a machine's problem, not the test's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<Cluster>,
    /// Runs at the commits after the last one where it failed (all of which passed).
    #[serde(default)]
    pub clean_runs: u64,
}

/// One test's runs at one commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRuns {
    pub commit: String,
    pub runs: u64,
    /// Runs that failed (no attempt passed), and runs that failed and then passed on a rerun.
    pub failures: u64,
    pub flaky_within: u64,
    pub first_at_ms: i64,
    pub last_at_ms: i64,
}

/// The query of `GET /api/v1/repos/{owner}/{name}/history`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// The test, as `testbot flaky` names it.
    pub test: String,
    /// As for [`FlakyQuery`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}

/// The body of `GET /api/v1/repos/{owner}/{name}/history`: a test's record per job that ran
/// it, and its runs at each commit, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    pub since_ms: i64,
    pub jobs: Vec<TestRecordOfJob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRecordOfJob {
    pub history: TestHistory,
    pub commits: Vec<CommitRuns>,
}

/// When a known-flaky test is kept in quarantine: until `clean runs` since its last failure show,
/// with `confidence`, that its failure rate is below `max_rate`
/// (`ln(1 − confidence) / ln(1 − max_rate)` runs: 299 for the defaults 0.95 and 0.01).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quarantine {
    pub max_rate: f64,
    pub confidence: f64,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine {
            max_rate: 0.01,
            confidence: 0.95,
        }
    }
}

impl Quarantine {
    /// Clean runs that take a test out of quarantine.
    pub fn runs_to_leave(&self) -> u64 {
        let n = (1.0 - self.confidence).ln() / (1.0 - self.max_rate).ln();
        (n - 1e-9).ceil().max(1.0) as u64
    }

    /// `test` is known flaky and has not yet passed often enough since to leave quarantine.
    pub fn holds(&self, test: &TestHistory) -> bool {
        test.is_flaky() && !test.is_broken() && test.clean_runs < self.runs_to_leave()
    }
}

/// What a placement is told apart by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Site,
    Agent,
    /// The Slurm node list of the run.
    Node,
    Image,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::Site => "site",
            Dimension::Agent => "agent",
            Dimension::Node => "node",
            Dimension::Image => "image",
        }
    }
}

/// A test's runs at one site, agent, node list or image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRuns {
    pub dimension: Dimension,
    pub value: String,
    pub runs: u64,
    pub failures: u64,
}

/// A test's failures all ran at one place, and its runs elsewhere passed often enough that
/// chance is an unlikely explanation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub dimension: Dimension,
    pub value: String,
    /// Its failures, all of which ran there, of `runs` there.
    pub failures: u64,
    pub runs: u64,
    /// Runs elsewhere (none of which failed).
    pub other_runs: u64,
    /// The chance that every failure lands there if failures fell on runs at random.
    pub p_value: f64,
}

impl std::fmt::Display for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fails only on {} {}: {} of {} runs there failed, none of {} elsewhere (p = {:.3})",
            self.dimension.as_str(),
            self.value,
            self.failures,
            self.runs,
            self.other_runs,
            self.p_value
        )
    }
}

/// The most a cluster's chance may be: below it, failures that all ran at one place say
/// something about the place.
pub const CLUSTER_P_VALUE: f64 = 0.05;

/// Where a test's failures cluster: for each dimension with runs at two or more places, the
/// place where every failure (at least two) ran, when the chance of that under failures that
/// fall on runs at random, (runs there / runs)^failures, is below [`CLUSTER_P_VALUE`].
pub fn clusters(placements: &[PlacementRuns]) -> Vec<Cluster> {
    let mut found = Vec::new();
    for dimension in [
        Dimension::Site,
        Dimension::Agent,
        Dimension::Node,
        Dimension::Image,
    ] {
        let places: Vec<&PlacementRuns> = placements
            .iter()
            .filter(|p| p.dimension == dimension)
            .collect();
        if places.len() < 2 {
            continue;
        }
        let runs: u64 = places.iter().map(|p| p.runs).sum();
        let failures: u64 = places.iter().map(|p| p.failures).sum();
        if failures < 2 || runs == 0 {
            continue;
        }
        for place in &places {
            if place.failures != failures || place.value.is_empty() {
                continue;
            }
            let p_value = (place.runs as f64 / runs as f64).powi(failures.min(1000) as i32);
            if p_value < CLUSTER_P_VALUE {
                found.push(Cluster {
                    dimension,
                    value: place.value.clone(),
                    failures,
                    runs: place.runs,
                    other_runs: runs - place.runs,
                    p_value,
                });
            }
        }
    }
    found
}

impl TestHistory {
    pub fn test_id(&self) -> String {
        test_id(&self.suite, self.classname.as_deref(), &self.name)
    }

    /// Flaky: it both passed and failed at one commit (or passed on a rerun), where nothing
    /// but chance differs between the runs, and its failures do not cluster on one place.
    pub fn is_flaky(&self) -> bool {
        self.flaky_commits > 0 && self.clusters.is_empty()
    }

    /// Broken: it fails in every run at the latest commit and is not flaky there.
    pub fn is_broken(&self) -> bool {
        self.failing_at_latest
    }

    /// One word for what its record says: `broken`, `flaky`, `placed` (its failures cluster on
    /// one site, agent, node or image), or `failed` (failed, but too seldom to say more).
    pub fn verdict(&self) -> &'static str {
        if self.is_broken() {
            "broken"
        } else if !self.clusters.is_empty() {
            "placed"
        } else if self.is_flaky() {
            "flaky"
        } else {
            "failed"
        }
    }

    /// The failure rate over its runs with the 95 % Wilson interval.
    pub fn failure_rate(&self) -> Option<(f64, f64, f64)> {
        let (low, high) = wilson_interval(self.failures, self.runs, 1.96)?;
        Some((self.failures as f64 / self.runs as f64, low, high))
    }
}

/// The body of `GET /api/v1/repos/{owner}/{name}/flaky`: the tests that failed at least once
/// in the window, flaky ones first (most flaky commits, then highest failure rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlakyReport {
    pub repository: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    pub since_ms: i64,
    pub tests: Vec<TestHistory>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(name: &str, outcomes: &[TestOutcome]) -> CaseResult {
        CaseResult {
            file: "junit.xml".into(),
            suite: "pkg".into(),
            classname: Some("T".into()),
            name: name.into(),
            attempts: outcomes
                .iter()
                .map(|&outcome| AttemptResult {
                    outcome,
                    duration_ms: None,
                    message: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_test_that_passed_and_failed_across_runs_is_flaky_and_one_that_always_failed_broken() {
        use TestOutcome::*;
        let mut cases = Vec::new();
        for run in 1..=10 {
            cases.push((run, case("steady", &[Passed])));
            cases.push((run, case("always", &[Failed])));
            let wobbly = if run % 5 == 0 { Failed } else { Passed };
            cases.push((run, case("wobbly", &[wobbly])));
        }
        cases.push((3, case("rerun", &[Failed, Passed])));
        let results = BatchResults::of(BatchId(1), 10, cases);
        let names: Vec<_> = results.tests.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["rerun", "wobbly", "always", "steady"]);
        let wobbly = &results.tests[1];
        assert!(wobbly.is_flaky() && !wobbly.is_broken());
        assert_eq!((wobbly.runs, wobbly.passed, wobbly.failed), (10, 8, 2));
        assert_eq!(wobbly.failed_runs, [5, 10]);
        assert!(results.tests[0].is_flaky());
        assert!(results.tests[2].is_broken() && !results.tests[2].is_flaky());
        assert_eq!(results.runs_with_results, 10);
        assert_eq!(wobbly.test_id(), "pkg > T.wobbly");
    }

    #[test]
    fn the_wilson_interval_matches_published_values_and_stays_in_range() {
        // Newcombe (1998), table I: 81 of 263 gives 0.2553 to 0.3662.
        let (low, high) = wilson_interval(81, 263, 1.959964).unwrap();
        assert!(
            (low - 0.2553).abs() < 5e-4 && (high - 0.3662).abs() < 5e-4,
            "{low} {high}"
        );
        // 8 failures in 40 runs: the interval contains the true rate 0.2.
        let (low, high) = wilson_interval(8, 40, 1.96).unwrap();
        assert!(
            low < 0.2 && 0.2 < high && low > 0.09 && high < 0.36,
            "{low} {high}"
        );
        assert_eq!(wilson_interval(0, 0, 1.96), None);
        let (low, high) = wilson_interval(0, 10, 1.96).unwrap();
        assert_eq!(low, 0.0);
        assert!(high > 0.0 && high < 0.31);
        let (low, high) = wilson_interval(10, 10, 1.96).unwrap();
        assert!(low > 0.69 && high == 1.0);
    }

    #[test]
    fn a_flaky_test_stays_in_quarantine_until_299_clean_runs() {
        let rule = Quarantine::default();
        assert_eq!(rule.runs_to_leave(), 299);
        let mut test = TestHistory {
            job: None,
            suite: "pkg".into(),
            classname: None,
            name: "wobbly".into(),
            runs: 40,
            failures: 8,
            flaky_within: 0,
            commits: 2,
            flaky_commits: 1,
            failing_commits: 0,
            first_flaky_commit: Some("a".into()),
            last_passing_commit: None,
            latest_commit: "b".into(),
            failing_at_latest: false,
            broken_since: None,
            placements: Vec::new(),
            clusters: Vec::new(),
            clean_runs: 298,
        };
        assert!(rule.holds(&test));
        test.clean_runs = 299;
        assert!(!rule.holds(&test), "enough clean runs since take it out");
        test.clean_runs = 0;
        test.failing_at_latest = true;
        assert!(!rule.holds(&test), "a broken test is never in quarantine");
    }

    #[test]
    fn result_paths_are_relative_and_plain() {
        assert!(validate_result_path("build/test-results/junit.xml").is_ok());
        for bad in ["", "/etc/passwd", "a/../b", "./a", "a//b", "a\nb"] {
            assert!(validate_result_path(bad).is_err(), "{bad:?}");
        }
    }
}
