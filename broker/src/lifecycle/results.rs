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

/// Each test's history from its rows per commit (ordered by test, then by when each commit
/// first ran).
pub fn histories(rows: Vec<CommitTestRow>) -> Vec<TestHistory> {
    let mut tests: Vec<TestHistory> = Vec::new();
    let mut latest_at = 0;
    let mut key: Option<(Option<String>, String, Option<String>, String)> = None;
    for row in rows {
        let row_key = (
            row.job_name.clone(),
            row.suite.clone(),
            row.classname.clone(),
            row.name.clone(),
        );
        if key.as_ref() != Some(&row_key) {
            tests.push(TestHistory {
                job: row.job_name.clone(),
                suite: row.suite.clone(),
                classname: row.classname.clone(),
                name: row.name.clone(),
                runs: 0,
                failures: 0,
                flaky_within: 0,
                commits: 0,
                flaky_commits: 0,
                failing_commits: 0,
                first_flaky_commit: None,
                last_passing_commit: None,
                latest_commit: String::new(),
                failing_at_latest: false,
            });
            key = Some(row_key);
            latest_at = i64::MIN;
        }
        let test = tests.last_mut().expect("pushed above");
        let (runs, fails, within) = (
            row.runs.max(0) as u64,
            row.fails.max(0) as u64,
            row.within.max(0) as u64,
        );
        test.runs += runs;
        test.failures += fails;
        test.flaky_within += within;
        test.commits += 1;
        let flaky = (fails > 0 && fails < runs) || within > 0;
        if flaky {
            test.flaky_commits += 1;
            test.first_flaky_commit
                .get_or_insert_with(|| row.commit_sha.clone());
        }
        if fails == runs {
            test.failing_commits += 1;
        }
        if fails == 0 && within == 0 {
            test.last_passing_commit = Some(row.commit_sha.clone());
        }
        if row.last_at_ms >= latest_at {
            latest_at = row.last_at_ms;
            test.latest_commit = row.commit_sha.clone();
            test.failing_at_latest = fails == runs && runs > 0;
        }
    }
    tests
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
}
