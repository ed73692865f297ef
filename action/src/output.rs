//! Rendering jobs and logs for people (and JSON for scripts).

use std::io::Write as _;

use testbot_proto::format_ms;
use testbot_proto::jobs::Job;
use testbot_proto::logs::{Stream, parse_line};
use testbot_proto::repos::Repo;

pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `succeeded`, `failed (exit code 3)`, `cancelled (cancelled by a user)`...
pub fn describe_state(job: &Job) -> String {
    match &job.reason {
        Some(reason) => format!("{} ({})", job.state, sanitize(reason)),
        None => job.state.to_string(),
    }
}

/// One run of a batch, as `run --repeat` reports it when it ends:
/// `run 3/20 (job 45): failed: test failure (exit code 1) on hpc/login1 in 2.1s`.
pub fn describe_run(job: &Job, runs: u32) -> String {
    let run = job.batch.map_or(0, |place| place.run);
    let mut line = format!("run {run}/{runs} (job {}): {}", job.id, job.state);
    if let Some(cause) = job.cause {
        line.push_str(&format!(": {cause}"));
    }
    if let Some(reason) = &job.reason {
        line.push_str(&format!(" ({})", sanitize(reason)));
    }
    if let Some(agent) = &job.agent {
        line.push_str(&format!(" on {agent}"));
    }
    if let (Some(start), Some(end)) = (job.started_at_ms, job.finished_at_ms) {
        line.push_str(&format!(" in {:.1}s", (end - start).max(0) as f64 / 1000.0));
    }
    line
}

/// The totals of an ended batch and how to read the runs that did not succeed.
pub fn print_batch_summary(batch: &testbot_proto::batches::Batch) {
    println!("batch {}: {} runs: {}", batch.id, batch.runs, batch.totals);
    if let (Some(until), Some(verdict)) = (&batch.until, &batch.verdict) {
        use testbot_proto::batches::Verdict;
        let interval = verdict
            .interval
            .map(|(low, high)| format!(" (95% interval {low:.3} to {high:.3})"))
            .unwrap_or_default();
        let said = match verdict.verdict {
            Verdict::Below => format!(
                "below {} with confidence {}",
                until.max_rate, until.confidence
            ),
            Verdict::Above => format!(
                "above {} with confidence {}",
                until.max_rate, until.confidence
            ),
            Verdict::Undecided => format!(
                "not shown below or above {} with confidence {}: more runs are needed",
                until.max_rate, until.confidence
            ),
        };
        println!(
            "failure rate: {} of {} runs failed{interval}: {said}",
            verdict.failures, verdict.runs
        );
    }
    let unsuccessful: Vec<_> = batch
        .jobs
        .iter()
        .filter(|j| j.state != testbot_proto::jobs::JobState::Succeeded)
        // A stopping rule cancels the runs it did not need: they are not failures to read.
        .filter(|j| batch.until.is_none() || j.state != testbot_proto::jobs::JobState::Cancelled)
        .collect();
    if !unsuccessful.is_empty() {
        let ids: Vec<String> = unsuccessful.iter().map(|j| j.id.to_string()).collect();
        println!(
            "not succeeded: jobs {} (read one with `testbot logs JOB`)",
            ids.join(", ")
        );
    }
}

/// A job's result files and its tests that did not pass (`all`: every test).
pub fn print_job_results(results: &testbot_proto::test_results::JobResults, all: bool) {
    use testbot_proto::junit::TestOutcome;
    println!("job {}: {} result files", results.job, results.files.len());
    for file in &results.files {
        println!(
            "  {} ({} bytes): {}",
            sanitize(&file.path),
            file.bytes,
            sanitize(&file.report.describe())
        );
    }
    let t = &results.totals;
    println!("{} tests: {t} (passed on a rerun)", t.cases);
    for case in &results.cases {
        let outcome = case.final_outcome();
        let shown = all || outcome.is_failure() || case.is_flaky();
        if !shown {
            continue;
        }
        let word = match outcome {
            TestOutcome::Passed if case.is_flaky() => "flaky",
            TestOutcome::Passed => "passed",
            TestOutcome::Failed => "failed",
            TestOutcome::Error => "error",
            TestOutcome::Skipped => "skipped",
        };
        let message = case
            .attempts
            .iter()
            .rev()
            .find_map(|a| a.message.as_deref())
            .map(|m| format!(": {}", sanitize(m.lines().next().unwrap_or(""))))
            .unwrap_or_default();
        let known = if outcome.is_failure() && results.known_flaky.contains(&case.test_id()) {
            " (known flaky)"
        } else {
            ""
        };
        println!("  {word:7} {}{known}{message}", sanitize(&case.test_id()));
    }
}

/// Every test of a batch that did not pass in every run (`all`: every test), flaky first.
pub fn print_batch_results(results: &testbot_proto::test_results::BatchResults, all: bool) {
    let flaky = results.tests.iter().filter(|t| t.is_flaky()).count();
    let broken = results.tests.iter().filter(|t| t.is_broken()).count();
    println!(
        "batch {}: {} runs, {} with test results, {} tests: {flaky} flaky, {broken} broken",
        results.batch,
        results.runs,
        results.runs_with_results,
        results.tests.len()
    );
    for test in &results.tests {
        let verdict = if test.is_flaky() {
            "flaky"
        } else if test.is_broken() {
            "broken"
        } else if all {
            "ok"
        } else {
            continue;
        };
        let mut line = format!("  {verdict:6} {}", sanitize(&test.test_id()));
        if test.failed > 0 {
            line.push_str(&format!(
                ": failed in {} of {} runs",
                test.failed, test.runs
            ));
            if let Some((rate, low, high)) = test.failure_rate() {
                line.push_str(&format!(
                    ", rate {rate:.2} (95% interval {low:.2} to {high:.2})"
                ));
            }
            if !test.is_broken() {
                let runs: Vec<String> = test.failed_runs.iter().map(u32::to_string).collect();
                line.push_str(&format!("; runs {}", runs.join(", ")));
            }
        }
        if test.flaky_within > 0 {
            line.push_str(&format!(
                "; passed on a rerun in {} runs",
                test.flaky_within
            ));
        }
        println!("{line}");
    }
}

/// A repository's tests that failed recently, across its history.
pub fn print_flaky(report: &testbot_proto::test_results::FlakyReport) {
    let short = |sha: &str| sha.get(..12).unwrap_or(sha).to_string();
    println!(
        "{}{} since {}: {} tests failed at least once",
        report.repository,
        report
            .git_ref
            .as_deref()
            .map(|r| format!(" on {r}"))
            .unwrap_or_default(),
        format_ms(report.since_ms),
        report.tests.len()
    );
    for test in &report.tests {
        let verdict = test.verdict();
        let job = test
            .job
            .as_deref()
            .map(|j| format!("{}: ", sanitize(j)))
            .unwrap_or_default();
        let mut line = format!("  {verdict:6} {job}{}", sanitize(&test.test_id()));
        if test.is_broken() {
            line.push_str(&format!(
                ": failing in every run since {}",
                short(test.broken_since.as_deref().unwrap_or(&test.latest_commit))
            ));
            if let Some(good) = &test.last_passing_commit {
                line.push_str(&format!(", last passing at {}", short(good)));
            }
        } else if let Some(cluster) = test.clusters.first() {
            line.push_str(&format!(": {}", sanitize(&cluster.to_string())));
        } else if test.is_flaky() {
            line.push_str(&format!(
                ": flaky at {} of {} commits, first at {}",
                test.flaky_commits,
                test.commits,
                short(test.first_flaky_commit.as_deref().unwrap_or(""))
            ));
        }
        if let Some((rate, low, high)) = test.failure_rate() {
            line.push_str(&format!(
                "; failed {} of {} runs, rate {rate:.2} (95% interval {low:.2} to {high:.2})",
                test.failures, test.runs
            ));
        }
        println!("{line}");
    }
}

/// A test's record: per job, its verdict and where it ran, then a line per commit.
pub fn print_test_record(record: &testbot_proto::test_results::TestRecord, test: &str) {
    if record.jobs.is_empty() {
        println!(
            "{}: no failure of {} on record since {}",
            record.repository,
            sanitize(test),
            format_ms(record.since_ms)
        );
        return;
    }
    for job in &record.jobs {
        let h = &job.history;
        let rate = h
            .failure_rate()
            .map(|(rate, low, high)| {
                format!(", rate {rate:.2} (95% interval {low:.2} to {high:.2})")
            })
            .unwrap_or_default();
        println!(
            "{} {}{}: {}; failed {} of {} runs{rate}",
            sanitize(&record.repository),
            h.job
                .as_deref()
                .map(|j| format!("{}: ", sanitize(j)))
                .unwrap_or_default(),
            sanitize(&h.test_id()),
            h.verdict(),
            h.failures,
            h.runs
        );
        for place in &h.placements {
            println!(
                "  {} {}: failed {} of {} runs",
                place.dimension.as_str(),
                sanitize(&place.value),
                place.failures,
                place.runs
            );
        }
        for cluster in &h.clusters {
            println!("  {}", sanitize(&cluster.to_string()));
        }
        for c in &job.commits {
            let mark = if c.failures == c.runs && c.runs > 0 {
                "failing"
            } else if c.failures > 0 || c.flaky_within > 0 {
                "flaky"
            } else {
                "passing"
            };
            println!(
                "  {}  {}  {:>4} runs  {:>4} failed  {mark}",
                format_ms(c.first_at_ms),
                c.commit.get(..12).unwrap_or(&c.commit),
                c.runs,
                c.failures
            );
        }
    }
}

/// A batch, each run on a line, then its totals.
pub fn print_batch(batch: &testbot_proto::batches::Batch) {
    for job in &batch.jobs {
        if job.state.is_terminal() {
            println!("{}", describe_run(job, batch.runs));
        } else {
            let run = job.batch.map_or(0, |place| place.run);
            println!("run {run}/{} (job {}): {}", batch.runs, job.id, job.state);
        }
    }
    print_batch_summary(batch);
}

pub fn print_job(job: &Job) {
    println!("job {}: {}", job.id, describe_state(job));
    if let Some(name) = &job.spec.name {
        println!("  name:      {name}");
    }
    if let Some(cause) = job.cause {
        println!("  cause:     {cause}");
    }
    if let Some(place) = job.batch {
        println!(
            "  batch:     {} (run {} of {})",
            place.batch, place.run, place.runs
        );
    }
    if let Some(agent) = &job.agent {
        println!("  agent:     {agent} (attempt {})", job.attempts);
    }
    if let Some(waiting) = &job.waiting {
        println!("  waiting:   {waiting}");
    }
    if let Some(executor) = &job.spec.executor {
        println!("  executor:  {executor}");
    }
    if !job.spec.labels.is_empty() {
        println!("  labels:    {}", job.spec.labels.join(", "));
    }
    if let Some(repository) = &job.repository {
        println!("  repo:      {repository}");
    }
    if let Some(by) = &job.submitted_by {
        println!("  by:        {by}");
    }
    for (key, value) in &job.metadata {
        println!("  {:<10} {}", format!("{key}:"), sanitize(value));
    }
    println!("  created:   {}", format_ms(job.created_at_ms));
    if let Some(started) = job.started_at_ms {
        println!("  started:   {}", format_ms(started));
    }
    if let Some(finished) = job.finished_at_ms {
        let took = job
            .started_at_ms
            .map(|s| format!(" (ran {:.1}s)", (finished - s) as f64 / 1000.0))
            .unwrap_or_default();
        println!("  finished:  {}{took}", format_ms(finished));
    }
    if job.cancel_requested && !job.state.is_terminal() {
        println!("  cancel:    requested");
    }
    println!("  log:       {} bytes", job.log_bytes);
    println!("  script:    {}", first_line(&job.spec.script, 70));
}

pub fn print_repo(repo: &Repo) {
    let sites = if repo.settings.sites.is_empty() {
        "any".to_string()
    } else {
        repo.settings.sites.join(", ")
    };
    println!(
        "{}  sites: {sites}  events: {}  refs: {}  (registered by {})",
        repo.name,
        repo.settings.events.join(", "),
        repo.settings.refs.join(", "),
        repo.registered_by
    );
}

pub fn print_jobs(jobs: &[Job]) {
    println!(
        "{:>7}  {:<10} {:<16} {:>3}  {:<24} WHAT",
        "ID", "STATE", "AGENT", "TRY", "CREATED"
    );
    for job in jobs {
        let what = job
            .spec
            .name
            .clone()
            .unwrap_or_else(|| first_line(&job.spec.script, 40));
        println!(
            "{:>7}  {:<10} {:<16} {:>3}  {:<24} {what}",
            job.id,
            job.state.as_str(),
            job.agent.as_deref().unwrap_or("-"),
            job.attempts,
            format_ms(job.created_at_ms),
        );
    }
}

/// What `testbot config check` prints for a valid file: each job, where it runs and when.
pub fn print_repo_config(file: &std::path::Path, config: &testbot_proto::repo_config::RepoConfig) {
    let count = config.jobs.len();
    let noun = if count == 1 { "job" } else { "jobs" };
    println!("{}: ok ({count} {noun})", file.display());
    for (name, job) in &config.jobs {
        println!("  {name}");
        println!("    runs on: {}", job.describe_placement());
        println!("    when:    {}", job.on.describe().join("; "));
    }
}

fn first_line(text: &str, max: usize) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    if line.chars().count() > max {
        format!("{}…", line.chars().take(max).collect::<String>())
    } else {
        line.to_string()
    }
}

/// Remote text made safe to print on a terminal or into a workflow log: C0 and C1 control
/// characters are removed (tab stays; lines are split before this), and so are escape
/// sequences, except SGR colour sequences (`ESC [ digits;... m`), which only change colours.
/// A job (or an agent that holds it) must not be able to move the cursor, rewrite what was
/// printed before, set the window title or the clipboard (OSC 52), or fake a line.
pub fn sanitize(text: &str) -> std::borrow::Cow<'_, str> {
    let is_control = |c: char| (c.is_control() && c != '\t') || c == '\u{7f}';
    if !text.chars().any(is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            if !is_control(c) {
                out.push(c);
            }
            continue;
        }
        match chars.peek() {
            // CSI: parameters and intermediates, then one final byte. Only SGR is kept.
            Some('[') => {
                chars.next();
                let mut body = String::new();
                let mut final_byte = None;
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        final_byte = Some(c);
                        break;
                    }
                    body.push(c);
                }
                if final_byte == Some('m') && body.chars().all(|c| c.is_ascii_digit() || c == ';') {
                    out.push_str("\u{1b}[");
                    out.push_str(&body);
                    out.push('m');
                }
            }
            // OSC, DCS, SOS, PM, APC: strings up to BEL or ESC \.
            Some(']' | 'P' | 'X' | '^' | '_') => {
                chars.next();
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            // Any other escape: drop it with the character it introduces.
            Some(_) => {
                chars.next();
            }
            None => {}
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Prints a stored log as the job printed it: stdout lines to stdout, stderr lines and testbot's
/// own messages to stderr. Pieces may split lines anywhere; partial lines wait for their end.
pub struct LogPrinter {
    partial: Vec<u8>,
    timestamps: bool,
    /// Send everything to stderr (stdout is reserved for JSON).
    all_to_stderr: bool,
}

impl LogPrinter {
    pub fn new(timestamps: bool, all_to_stderr: bool) -> Self {
        LogPrinter {
            partial: Vec::new(),
            timestamps,
            all_to_stderr,
        }
    }

    pub fn write(&mut self, bytes: &[u8]) {
        self.partial.extend_from_slice(bytes);
        let Some(last_nl) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=last_nl).collect();
        self.print(&String::from_utf8_lossy(&complete));
    }

    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.print(&String::from_utf8_lossy(&rest));
        }
    }

    fn print(&self, text: &str) {
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let mut out = stdout.lock();
        let mut err = stderr.lock();
        for line in text.lines() {
            let record = parse_line(line);
            let stamp = if self.timestamps && !record.timestamp.is_empty() {
                format!("{} ", record.timestamp)
            } else {
                String::new()
            };
            let text = sanitize(record.text);
            let _ = match record.stream {
                Stream::Stdout if !self.all_to_stderr => writeln!(out, "{stamp}{text}"),
                _ => writeln!(err, "{stamp}{text}"),
            };
        }
        let _ = out.flush();
        let _ = err.flush();
    }
}

/// The job metadata key the broker sets when it cut the job's log at its size limit.
const LOG_TRUNCATED: &str = "log_truncated";

/// Says on stderr that the log shown was cut at the broker's limit, if it was: the log's own
/// last line says so too, but it may have scrolled far away by now.
pub fn note_log_cut(job: &Job) {
    if let Some(at) = job.metadata.get(LOG_TRUNCATED) {
        eprintln!(
            "testbot: note: the log of job {} was cut {at}; the job's later output is not stored. \
             The broker's --max-log-bytes sets the limit.",
            job.id
        );
    }
}

#[cfg(test)]
mod tests {
    use super::sanitize;

    #[test]
    fn control_characters_and_escape_sequences_are_removed_but_colours_kept() {
        assert_eq!(sanitize("plain\ttext"), "plain\ttext");
        // Colours stay.
        assert_eq!(sanitize("\x1b[1;31mred\x1b[0m"), "\x1b[1;31mred\x1b[0m");
        // Clipboard (OSC 52) and window title, ended by BEL or ST.
        assert_eq!(sanitize("a\x1b]52;c;cm0gLXJmIH4=\x07b"), "ab");
        assert_eq!(sanitize("a\x1b]0;owned\x1b\\b"), "ab");
        // Cursor movement, erasing, and a private CSI that only looks like SGR.
        assert_eq!(sanitize("x\x1b[2J\x1b[1A\x1b[?25ly"), "xy");
        assert_eq!(sanitize("x\x1b[38:5:1my"), "xy");
        // Carriage return (rewrites the line), backspace, bell, DEL, C1 CSI and NEL.
        assert_eq!(sanitize("ok\rFAKE\x08\x07\x7f"), "okFAKE");
        assert_eq!(sanitize("a\u{9b}2Jb\u{85}c"), "a2Jbc");
        // A lone ESC at the end, and two-character escapes.
        assert_eq!(sanitize("end\x1b"), "end");
        assert_eq!(sanitize("a\x1bcb"), "ab");
    }
}
