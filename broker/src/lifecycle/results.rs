//! Test results above storage: what reading an uploaded result file gives (the report and the
//! rows to store), and the shapes read back: a job's cases from its rows, a test's history
//! from its rows per commit. Pure functions the API and the benchmarks share.

use testbot_proto::junit::{JunitError, JunitLimits, TestOutcome, TestReport, parse_junit};
use testbot_proto::test_results::{
    AttemptResult, CaseResult, FileReport, MAX_MESSAGE_BYTES, TestHistory,
};

use crate::store::test_results::{CommitTestRow, TestResultRow};

/// What the broker reads of a result file: as many cases as a 32 MiB file can hold, texts
/// only as far as it keeps them (the first KiB of a message; outputs are not stored).
fn ingest_limits() -> JunitLimits {
    JunitLimits {
        max_cases: 250_000,
        max_attempts: 1_000_000,
        max_suites: 50_000,
        max_text_bytes: 4 * 1024,
        ..JunitLimits::default()
    }
}

/// What reading `data` as JUnit XML gives: the report and the rows to store. Blocking.
pub fn read_result_file(path: &str, data: &[u8]) -> (FileReport, Vec<TestResultRow>) {
    let start = data
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(data)
        .iter()
        .find(|b| !b.is_ascii_whitespace());
    if start != Some(&b'<') {
        return (
            FileReport::NotJunit {
                reason: "not XML".into(),
            },
            Vec::new(),
        );
    }
    match parse_junit(std::io::Cursor::new(data), &ingest_limits()) {
        Ok(report) => {
            let rows = rows_of(path, &report);
            (
                FileReport::Junit {
                    totals: report.totals,
                    truncated: report.truncated,
                    warnings: report.warnings,
                },
                rows,
            )
        }
        Err(err @ (JunitError::NotJunit { .. } | JunitError::Empty)) => (
            FileReport::NotJunit {
                reason: err.to_string(),
            },
            Vec::new(),
        ),
        Err(err) => (
            FileReport::Unreadable {
                error: err.to_string(),
            },
            Vec::new(),
        ),
    }
}

fn rows_of(path: &str, report: &TestReport) -> Vec<TestResultRow> {
    let mut rows = Vec::new();
    for (seq, case) in report.cases.iter().enumerate() {
        for (i, attempt) in case.attempts.iter().enumerate() {
            rows.push(TestResultRow {
                file: text(path),
                seq: seq as i64,
                attempt: i as i64 + 1,
                suite: text(&case.suite),
                classname: case.classname.as_deref().map(text),
                name: text(&case.name),
                outcome: outcome_name(attempt.outcome).to_string(),
                duration_ms: attempt
                    .duration_secs
                    .filter(|d| d.is_finite() && *d >= 0.0)
                    .map(|d| (d * 1000.0).round().min(i64::MAX as f64) as i64),
                message: attempt
                    .message
                    .as_ref()
                    .map(|m| text(&cut(&m.text, MAX_MESSAGE_BYTES))),
            });
        }
    }
    rows
}

/// A text as it is stored: a NUL (`&#0;` in a file), which no PostgreSQL text can hold,
/// becomes U+FFFD.
fn text(value: &str) -> String {
    value.replace('\0', "\u{FFFD}")
}

fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn outcome_name(outcome: TestOutcome) -> &'static str {
    match outcome {
        TestOutcome::Passed => "passed",
        TestOutcome::Failed => "failed",
        TestOutcome::Error => "error",
        TestOutcome::Skipped => "skipped",
    }
}

fn outcome_of(name: &str) -> TestOutcome {
    match name {
        "passed" => TestOutcome::Passed,
        "failed" => TestOutcome::Failed,
        "skipped" => TestOutcome::Skipped,
        _ => TestOutcome::Error,
    }
}

/// Groups stored rows (ordered by file, case, attempt) into cases.
pub fn cases_of(rows: impl IntoIterator<Item = TestResultRow>) -> Vec<CaseResult> {
    let mut cases: Vec<CaseResult> = Vec::new();
    let mut last: Option<(String, i64)> = None;
    for row in rows {
        let key = (row.file.clone(), row.seq);
        let attempt = AttemptResult {
            outcome: outcome_of(&row.outcome),
            duration_ms: row.duration_ms.map(|d| d.max(0) as u64),
            message: row.message,
        };
        match cases.last_mut() {
            Some(case) if last.as_ref() == Some(&key) => case.attempts.push(attempt),
            _ => cases.push(CaseResult {
                file: row.file,
                suite: row.suite,
                classname: row.classname,
                name: row.name,
                attempts: vec![attempt],
            }),
        }
        last = Some(key);
    }
    cases
}

/// Each test's history from its rows per commit and placement (ordered by test, then by when
/// each commit first ran).
pub fn histories(rows: Vec<CommitTestRow>) -> Vec<TestHistory> {
    let mut tests = Vec::new();
    for group in rows.chunk_by(|a, b| {
        (&a.job_name, &a.suite, &a.classname, &a.name)
            == (&b.job_name, &b.suite, &b.classname, &b.name)
    }) {
        tests.push(history(group).0);
    }
    tests
}

/// One test's history from its rows, and its runs per commit (by when each first ran).
pub fn history(
    rows: &[CommitTestRow],
) -> (TestHistory, Vec<testbot_proto::test_results::CommitRuns>) {
    use std::collections::BTreeMap;
    use testbot_proto::test_results::{CommitRuns, Dimension, PlacementRuns, clusters};
    let mut commits: Vec<CommitRuns> = Vec::new();
    let mut places: BTreeMap<(Dimension, &str), (u64, u64)> = BTreeMap::new();
    for row in rows {
        let (runs, fails, within) = (
            row.runs.max(0) as u64,
            row.fails.max(0) as u64,
            row.within.max(0) as u64,
        );
        match commits.iter_mut().find(|c| c.commit == row.commit_sha) {
            Some(c) => {
                c.runs += runs;
                c.failures += fails;
                c.flaky_within += within;
                c.first_at_ms = c.first_at_ms.min(row.first_at_ms);
                c.last_at_ms = c.last_at_ms.max(row.last_at_ms);
            }
            None => commits.push(CommitRuns {
                commit: row.commit_sha.clone(),
                runs,
                failures: fails,
                flaky_within: within,
                first_at_ms: row.first_at_ms,
                last_at_ms: row.last_at_ms,
            }),
        }
        for (dimension, value) in [
            (Dimension::Site, &row.site),
            (Dimension::Agent, &row.agent),
            (Dimension::Node, &row.nodes),
            (Dimension::Image, &row.image),
        ] {
            if !value.is_empty() {
                let place = places.entry((dimension, value)).or_default();
                place.0 += runs;
                place.1 += fails;
            }
        }
    }
    commits.sort_by_key(|c| c.first_at_ms);
    let first = &rows[0];
    let mut test = TestHistory {
        job: first.job_name.clone(),
        suite: first.suite.clone(),
        classname: first.classname.clone(),
        name: first.name.clone(),
        runs: 0,
        failures: 0,
        flaky_within: 0,
        commits: commits.len() as u64,
        flaky_commits: 0,
        failing_commits: 0,
        first_flaky_commit: None,
        last_passing_commit: None,
        latest_commit: String::new(),
        failing_at_latest: false,
        broken_since: None,
        placements: places
            .into_iter()
            .map(|((dimension, value), (runs, failures))| PlacementRuns {
                dimension,
                value: value.to_string(),
                runs,
                failures,
            })
            .collect(),
        clusters: Vec::new(),
        clean_runs: 0,
    };
    test.clusters = clusters(&test.placements);
    test.clean_runs = commits
        .iter()
        .rev()
        .take_while(|c| c.failures == 0 && c.flaky_within == 0)
        .map(|c| c.runs)
        .sum();
    let failing = |c: &CommitRuns| c.runs > 0 && c.failures == c.runs;
    for c in &commits {
        test.runs += c.runs;
        test.failures += c.failures;
        test.flaky_within += c.flaky_within;
        if (c.failures > 0 && c.failures < c.runs) || c.flaky_within > 0 {
            test.flaky_commits += 1;
            test.first_flaky_commit
                .get_or_insert_with(|| c.commit.to_string());
        }
        if failing(c) {
            test.failing_commits += 1;
        }
        if c.failures == 0 && c.flaky_within == 0 {
            test.last_passing_commit = Some(c.commit.to_string());
        }
    }
    // The latest commit is the one that first ran last (in the order the branch's commits
    // were pushed): runs that fill in an older commit's history later do not make it latest.
    if let Some(latest) = commits.iter().max_by_key(|c| c.first_at_ms) {
        test.latest_commit = latest.commit.clone();
        test.failing_at_latest = failing(latest);
        if test.failing_at_latest {
            test.broken_since = commits
                .iter()
                .rev()
                .take_while(|c| failing(c))
                .last()
                .map(|c| c.commit.to_string());
        }
    }
    (test, commits)
}

/// A result file's name as a download's `Content-Disposition` carries it: the last part of
/// its path, with only what every header can hold (the path may have any printable character).
pub fn download_name(path: &str) -> String {
    path.rsplit('/')
        .next()
        .unwrap_or("result")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect()
}

/// Of the failed tests in `cases` of job `model`, those known to be flaky on its branch: flaky
/// at another commit within the window and still held by `rule`. Empty for a job without a
/// vouched-for commit.
pub async fn known_flaky(
    store: &dyn crate::store::Store,
    model: &crate::store::JobModel,
    cases: &[testbot_proto::test_results::CaseResult],
    rule: &testbot_proto::test_results::Quarantine,
) -> crate::store::StoreResult<Vec<String>> {
    let (Some(repository), Some(git_ref), Some(sha)) =
        (&model.repository, &model.git_ref, &model.commit_sha)
    else {
        return Ok(Vec::new());
    };
    let failed: Vec<String> = cases
        .iter()
        .filter(|c| c.final_outcome().is_failure())
        .map(|c| c.test_id())
        .collect();
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    let since = testbot_proto::now_ms() - KNOWN_FLAKY_WINDOW.as_millis() as i64;
    let rows: Vec<CommitTestRow> = store
        .test_history(repository, Some(git_ref), since)
        .await?
        .into_iter()
        .filter(|r| r.commit_sha != *sha && r.job_name == model.job_name)
        .collect();
    Ok(histories(rows)
        .into_iter()
        .filter(|t| rule.holds(t))
        .map(|t| t.test_id())
        .filter(|id| failed.contains(id))
        .collect())
}

/// How far back a test's flakiness counts toward its quarantine.
pub const KNOWN_FLAKY_WINDOW: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_as_junit_not_junit_or_unreadable_and_stores_no_nul() {
        let (report, rows) = read_result_file(
            "junit.xml",
            b"<testsuite name=\"s\"><testcase name=\"a&#0;b\"><failure message=\"m&#0;\"/></testcase></testsuite>",
        );
        assert!(matches!(report, FileReport::Junit { .. }), "{report:?}");
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].name.contains('\0') && !format!("{rows:?}").contains('\0'));
        assert_eq!(rows[0].outcome, "failed");
        let (report, rows) = read_result_file("notes.txt", b"hello");
        assert!(matches!(report, FileReport::NotJunit { .. }) && rows.is_empty());
        let (report, _) = read_result_file("pom.xml", b"<project/>");
        assert!(matches!(report, FileReport::NotJunit { .. }), "{report:?}");
        let (report, _) = read_result_file("cut.xml", b"<testsuite><testcase");
        assert!(
            matches!(report, FileReport::Unreadable { .. }),
            "{report:?}"
        );
    }

    #[test]
    fn a_case_failed_when_no_attempt_passed_and_flaky_when_one_did() {
        let row = |seq, attempt, outcome: &str| TestResultRow {
            file: "f".into(),
            seq,
            attempt,
            suite: "s".into(),
            classname: None,
            name: format!("t{seq}"),
            outcome: outcome.into(),
            duration_ms: None,
            message: None,
        };
        let cases = cases_of([row(0, 1, "failed"), row(0, 2, "passed"), row(1, 1, "error")]);
        assert_eq!(cases.len(), 2);
        assert!(cases[0].is_flaky());
        assert_eq!(cases[1].final_outcome(), TestOutcome::Error);
    }

    fn at(commit: &str, agent: &str, runs: i64, fails: i64, at_ms: i64) -> CommitTestRow {
        CommitTestRow {
            job_name: Some("unit".into()),
            suite: "pkg".into(),
            classname: None,
            name: "t".into(),
            commit_sha: commit.into(),
            site: "hpc".into(),
            agent: agent.into(),
            nodes: String::new(),
            image: String::new(),
            runs,
            fails,
            within: 0,
            first_at_ms: at_ms,
            last_at_ms: at_ms,
        }
    }

    #[test]
    fn failures_that_all_ran_on_one_agent_are_placed_there_not_flaky() {
        // 20 runs on each agent; all 8 failures on login2: (20/40)^8 is far below 0.05.
        let placed = histories(vec![
            at("c1", "login1", 20, 0, 1),
            at("c1", "login2", 20, 8, 2),
        ]);
        assert_eq!(placed.len(), 1);
        let test = &placed[0];
        assert_eq!((test.runs, test.failures, test.commits), (40, 8, 1));
        assert_eq!(test.verdict(), "placed");
        assert!(!test.is_flaky());
        let cluster = &test.clusters[0];
        assert_eq!(cluster.dimension.as_str(), "agent");
        assert_eq!(
            (cluster.value.as_str(), cluster.runs, cluster.other_runs),
            ("login2", 20, 20)
        );
        assert!(
            cluster
                .to_string()
                .starts_with("fails only on agent login2: 8 of 20")
        );
        // One site only: no cluster by site. Failures spread over both agents: flaky.
        let spread = histories(vec![
            at("c1", "login1", 20, 4, 1),
            at("c1", "login2", 20, 4, 2),
        ]);
        assert_eq!(spread[0].verdict(), "flaky");
        assert!(spread[0].clusters.is_empty());
        // Two failures on a place that had most runs is chance, not a cluster.
        let chance = histories(vec![
            at("c1", "login1", 2, 0, 1),
            at("c1", "login2", 38, 2, 2),
        ]);
        assert_eq!(chance[0].verdict(), "flaky");
    }

    #[test]
    fn a_test_failing_in_every_run_since_a_commit_is_broken_since_it() {
        let test = &histories(vec![
            at("c1", "login1", 3, 0, 1),
            at("c2", "login1", 3, 1, 2),
            at("c3", "login1", 3, 3, 3),
            at("c4", "login1", 2, 2, 4),
            at("c4", "login2", 1, 1, 5),
        ])[0];
        assert_eq!(test.verdict(), "broken");
        assert_eq!(test.broken_since.as_deref(), Some("c3"));
        assert_eq!(test.last_passing_commit.as_deref(), Some("c1"));
        assert_eq!(test.first_flaky_commit.as_deref(), Some("c2"));
        assert_eq!((test.commits, test.failing_commits), (4, 2));
    }
}
