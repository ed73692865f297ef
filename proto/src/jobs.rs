//! Jobs: what a submitter asks for, and what the broker reports back.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::results::Outcome;
use crate::secrets;

/// A job's identifier: a positive integer assigned by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim_start_matches('#')
            .parse::<i64>()
            .ok()
            .filter(|n| *n > 0)
            .map(JobId)
            .ok_or_else(|| format!("{s:?} is not a job id (expected a positive integer)"))
    }
}

/// Limits the broker applies to a submitted [`JobSpec`].
pub mod limits {
    /// Largest script accepted, in bytes.
    pub const MAX_SCRIPT_BYTES: usize = 256 * 1024;
    /// Most environment variables a job may set.
    pub const MAX_ENV_VARS: usize = 128;
    /// Most labels a job may ask for.
    pub const MAX_LABELS: usize = 32;
    /// Longest label or job name, in bytes.
    pub const MAX_NAME_BYTES: usize = 128;
    /// Longest environment variable value, in bytes.
    pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
    /// Tests one job may be asked to run instead of its whole suite.
    pub const MAX_TESTS: usize = 1000;
    pub const MAX_TEST_NAME_BYTES: usize = 1024;
}

/// What to run. Submitted by a client in `POST /api/v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The script, run with `bash --noprofile --norc -eo pipefail` by the shell executor.
    pub script: String,
    /// A short human name shown in listings. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels an agent must all have to take the job. Default: none (any agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Environment variables for the job. Names match `[A-Za-z_][A-Za-z0-9_]*` and must not
    /// start with `TESTBOT_`. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names of `env` variables whose values are secret: the broker shows them as `***` in every
    /// answer but the agent's assignment and forgets them once the job ends, and the agent
    /// masks them in the job's log. Each must be a key of `env`, with a value of at least
    /// [`secrets::MIN_SECRET_CHARS`] characters. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<String>,
    /// Wall-clock limit in seconds; the agent stops the job after it. Default: the agent's own
    /// limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// The executor the job asks for (`shell`, `slurm`, `docker`, `podman`, `kubernetes`).
    /// Default: whatever the agent runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<String>,
    /// The container image, for container and Kubernetes executors. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources the job asks for; the site's policy caps them. Default: none asked.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub resources: Resources,
    /// Test result files the agent collects from the workspace once the script has ended
    /// (also when it failed or timed out) and hands to the broker, as globs relative to the
    /// workspace (`build/**/junit*.xml`). JUnit XML files among them are read into test
    /// results. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<String>,
    /// How to run a chosen few of the job's tests: a command with `{tests}` where they go
    /// (`pytest {tests}`), each quoted as one shell word. Default: none (the job always runs its
    /// whole `script`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_tests: Option<String>,
    /// How to list the job's tests, one per line as `run_tests` names them (`pytest
    /// --collect-only -q`). With it, chosen `tests` are patterns (`*` any text, `?` one
    /// character) matched against the list in the job before `run_tests` gets the names that
    /// match; a choice that matches no listed test fails the run, saying so. Default: none
    /// (the chosen tests are passed as given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list: Option<String>,
    /// The tests to run instead of the whole suite, as `run_tests` names them
    /// (`tests/test_io.py::test_wobbly`), or patterns of them with `list`: the agent runs
    /// `run_tests` with them in place of `script`. Default: none (the whole `script`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<String>,
    /// Tests known to be flaky on the job's branch do not fail its check run (or the
    /// action's step): a job that failed only in such tests is reported as passing, with them
    /// named apart, until enough clean runs show a test's rate below 1 %
    /// ([`crate::test_results::Quarantine`]). Default: false (every failure counts).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub quarantine: bool,
}

/// Resources a job asks for. Every field is optional; an executor that cannot honour a field
/// ignores it, and the agent's site policy refuses a request over its caps before anything runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU cores (Slurm `--cpus-per-task`, container `--cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// Slurm partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Slurm account to charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Slurm quality of service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Slurm nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Slurm tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ntasks: Option<u32>,
    /// Slurm node feature constraint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }

    fn validate(&self) -> Result<(), String> {
        for (field, value) in [
            ("partition", &self.partition),
            ("account", &self.account),
            ("qos", &self.qos),
        ] {
            if let Some(value) = value {
                validate_word(&format!("resources.{field}"), value)?;
            }
        }
        if let Some(constraint) = &self.constraint {
            // Slurm constraint syntax: features joined by & | , with brackets and counts.
            let ok = !constraint.is_empty()
                && constraint.len() <= limits::MAX_NAME_BYTES
                && constraint
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-&|,[]*".contains(c));
            if !ok {
                return Err(format!(
                    "resources.constraint {constraint:?} is invalid: use features of A-Z a-z 0-9 _ . - joined by & | ,"
                ));
            }
        }
        for (field, value) in [
            ("cpus", self.cpus),
            ("nodes", self.nodes),
            ("ntasks", self.ntasks),
        ] {
            if value == Some(0) {
                return Err(format!("resources.{field} must be at least 1"));
            }
        }
        if self.memory_mib == Some(0) {
            return Err("resources.memory_mib must be at least 1".into());
        }
        Ok(())
    }
}

/// A scheduler word (partition, account, qos, executor): 1–128 characters of `[A-Za-z0-9_.-]`,
/// so it can never carry an option or a shell metacharacter.
/// The job's metadata key for the Slurm nodes it ran on (`c[041-042]`), as `scontrol` names
/// them: the test statistics tell failures on one node apart from a flaky test with it.
pub const SLURM_NODES: &str = "slurm_nodes";

pub fn validate_word(field: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= limits::MAX_NAME_BYTES
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        && !value.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {value:?} is invalid: use 1-{} characters of A-Z a-z 0-9 _ . - (not starting with -)",
            limits::MAX_NAME_BYTES
        ))
    }
}

/// A container image reference: `[registry/]name[:tag][@sha256:digest]`, no whitespace or shell
/// metacharacters, not starting with `-`.
pub fn validate_image(image: &str) -> Result<(), String> {
    let ok = !image.is_empty()
        && image.len() <= 512
        && !image.starts_with('-')
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/:@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "image {image:?} is invalid: expected [registry/]name[:tag][@sha256:digest]"
        ))
    }
}

impl JobSpec {
    /// Checks the spec against [`limits`] and naming rules; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.script.trim().is_empty() {
            return Err("script is empty".into());
        }
        if self.script.len() > limits::MAX_SCRIPT_BYTES {
            return Err(format!(
                "script is {} bytes; the limit is {} bytes",
                self.script.len(),
                limits::MAX_SCRIPT_BYTES
            ));
        }
        if let Some(name) = &self.name
            && name.len() > limits::MAX_NAME_BYTES
        {
            return Err(format!(
                "name is longer than {} bytes",
                limits::MAX_NAME_BYTES
            ));
        }
        if self.labels.len() > limits::MAX_LABELS {
            return Err(format!(
                "{} labels given; the limit is {}",
                self.labels.len(),
                limits::MAX_LABELS
            ));
        }
        for label in &self.labels {
            validate_label(label)?;
        }
        crate::results::validate_result_patterns(&self.results)
            .map_err(|e| format!("results: {e}"))?;
        validate_selection(self.run_tests.as_deref(), &self.tests)?;
        validate_list(self.list.as_deref())?;
        if self.env.len() > limits::MAX_ENV_VARS {
            return Err(format!(
                "{} environment variables given; the limit is {}",
                self.env.len(),
                limits::MAX_ENV_VARS
            ));
        }
        for (name, value) in &self.env {
            validate_env_name(name)?;
            if value.len() > limits::MAX_ENV_VALUE_BYTES {
                return Err(format!(
                    "env.{name} is longer than {} bytes",
                    limits::MAX_ENV_VALUE_BYTES
                ));
            }
            if value.contains('\0') {
                return Err(format!("env.{name} contains a NUL byte"));
            }
        }
        secrets::validate_secret_env(self)?;
        if self.timeout_secs == Some(0) {
            return Err("timeout_secs must be at least 1".into());
        }
        if let Some(executor) = &self.executor {
            validate_word("executor", executor)?;
        }
        if let Some(image) = &self.image {
            validate_image(image)?;
        }
        self.resources.validate()
    }
}

impl JobSpec {
    /// The script the job runs: `script`, or for chosen `tests`, `run_tests` with them in
    /// place of `{tests}`, each single-quoted for the shell (so a test name is never read as
    /// shell syntax). The error says why the selection cannot run.
    pub fn selected_script(&self) -> Result<std::borrow::Cow<'_, str>, String> {
        if self.tests.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(&self.script));
        }
        validate_selection(self.run_tests.as_deref(), &self.tests)?;
        validate_list(self.list.as_deref())?;
        let run_tests = self.run_tests.as_deref().unwrap_or_default();
        let Some(list) = &self.list else {
            let words: Vec<String> = self.tests.iter().map(|t| shell_quote(t)).collect();
            return Ok(std::borrow::Cow::Owned(
                run_tests.replace(TESTS_PLACEHOLDER, &words.join(" ")),
            ));
        };
        // The listed names that match any chosen pattern become the positional parameters,
        // which `run_tests` gets as "$@". A listed name starting with '-' is never taken: the
        // runner would read it as an option. The patterns are shell patterns with every
        // character but `*` and `?` quoted, so that no choice is read as shell syntax.
        let patterns: Vec<String> = self.tests.iter().map(|t| glob_word(t)).collect();
        let chosen: Vec<String> = self.tests.iter().map(|t| shell_quote(t)).collect();
        Ok(std::borrow::Cow::Owned(format!(
            r#"testbot_listed=$(
{list}
) || {{ echo "testbot: the job's list command failed" >&2; exit 1; }}
set --
testbot_ifs=$IFS
IFS='
'
set -f
for testbot_test in $testbot_listed; do
  case $testbot_test in
    -*) ;;
    {patterns}) set -- "$@" "$testbot_test" ;;
  esac
done
set +f
IFS=$testbot_ifs
if [ "$#" -eq 0 ]; then
  echo "testbot: no test the list command printed matches the chosen tests:" >&2
  printf '  %s\n' {chosen} >&2
  exit 1
fi
echo "testbot: running $# listed tests" >&2
{run}
"#,
            patterns = patterns.join("|"),
            chosen = chosen.join(" "),
            run = run_tests.replace(TESTS_PLACEHOLDER, "\"$@\""),
        )))
    }
}

/// `pattern` as a shell pattern word: `*` and `?` as they are, everything else quoted.
fn glob_word(pattern: &str) -> String {
    let mut word = String::new();
    let mut literal = String::new();
    for c in pattern.chars() {
        if c == '*' || c == '?' {
            if !literal.is_empty() {
                word.push_str(&shell_quote(&literal));
                literal.clear();
            }
            word.push(c);
        } else {
            literal.push(c);
        }
    }
    if !literal.is_empty() || word.is_empty() {
        word.push_str(&shell_quote(&literal));
    }
    word
}

/// A `list` command is 1 to [`limits::MAX_SCRIPT_BYTES`] bytes.
pub fn validate_list(list: Option<&str>) -> Result<(), String> {
    match list {
        Some(list) if list.trim().is_empty() || list.len() > limits::MAX_SCRIPT_BYTES => {
            Err(format!(
                "list must be a command of 1 to {} bytes",
                limits::MAX_SCRIPT_BYTES
            ))
        }
        _ => Ok(()),
    }
}

/// Where `run_tests` takes the chosen tests.
pub const TESTS_PLACEHOLDER: &str = "{tests}";

/// A test selection is at most [`limits::MAX_TESTS`] names, each 1 to
/// [`limits::MAX_TEST_NAME_BYTES`] bytes of printable text not starting with `-` (it would be
/// read as an option of the test runner: `--junitxml=/home/me/.bashrc`), for a `run_tests`
/// that says where they go.
pub fn validate_selection(run_tests: Option<&str>, tests: &[String]) -> Result<(), String> {
    if let Some(run_tests) = run_tests {
        if run_tests.trim().is_empty() || run_tests.len() > limits::MAX_SCRIPT_BYTES {
            return Err(format!(
                "run_tests must be a command of 1 to {} bytes",
                limits::MAX_SCRIPT_BYTES
            ));
        }
        if !run_tests.contains(TESTS_PLACEHOLDER) {
            return Err(format!(
                "run_tests {run_tests:?} has no {TESTS_PLACEHOLDER} to put the chosen tests in"
            ));
        }
    }
    if tests.is_empty() {
        return Ok(());
    }
    if run_tests.is_none() {
        return Err(
            "tests are chosen, but the job has no run_tests command to run them with".into(),
        );
    }
    if tests.len() > limits::MAX_TESTS {
        return Err(format!(
            "{} tests chosen; the limit is {}",
            tests.len(),
            limits::MAX_TESTS
        ));
    }
    for test in tests {
        if test.is_empty() || test.len() > limits::MAX_TEST_NAME_BYTES {
            return Err(format!(
                "test {test:?} must be 1 to {} bytes",
                limits::MAX_TEST_NAME_BYTES
            ));
        }
        if test.starts_with('-') {
            return Err(format!(
                "test {test:?} starts with '-', which the test runner would read as an option"
            ));
        }
        if test.chars().any(char::is_control) {
            return Err(format!("test {test:?} holds a control character"));
        }
    }
    Ok(())
}

/// `text` as one single-quoted shell word.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// A label is 1–128 characters of `[A-Za-z0-9_.:/=-]`.
pub fn validate_label(label: &str) -> Result<(), String> {
    let ok = !label.is_empty()
        && label.len() <= limits::MAX_NAME_BYTES
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:/=-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label {label:?} is invalid: use 1-{} characters of A-Z a-z 0-9 _ . : / = -",
            limits::MAX_NAME_BYTES
        ))
    }
}

/// An environment variable name is `[A-Za-z_][A-Za-z0-9_]*` and not reserved (`TESTBOT_*`).
pub fn validate_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= limits::MAX_NAME_BYTES;
    if !ok {
        return Err(format!(
            "environment variable name {name:?} is invalid: use [A-Za-z_][A-Za-z0-9_]*"
        ));
    }
    if name.starts_with("TESTBOT_") {
        return Err(format!(
            "environment variable {name} is reserved: names starting with TESTBOT_ are set by the agent"
        ));
    }
    Ok(())
}

/// Where a job is in its lifecycle:
/// `queued → assigned (leased) → running → succeeded | failed | cancelled | error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for an agent.
    Queued,
    /// Claimed by an agent under a lease, not started yet.
    Assigned,
    /// The agent started it.
    Running,
    /// Ran and exited 0.
    Succeeded,
    /// Ran and exited non-zero, was killed by a signal, or timed out.
    Failed,
    /// Cancelled by a user before or while it ran.
    Cancelled,
    /// Could not run: the agent was lost too often, or the executor failed.
    Error,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Error => "error",
        }
    }

    /// Whether the job has its one final result.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Error
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                format!(
                    "unknown job state {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// A job as the broker reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Why the job is in its state, when that needs saying ("timed out after 10s", "agent lost").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The script's exit code, when it exited by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the script, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Why it did not succeed, once it ended without success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<crate::results::FailureCause>,
    /// How many times an agent has claimed the job.
    pub attempts: u32,
    /// The agent holding or last holding the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// A user asked to cancel the job; the agent stops it at its next heartbeat.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Bytes of log stored so far.
    pub log_bytes: u64,
    /// The repository the job runs for, from the submitting workflow's verified OIDC token
    /// (none for jobs an operator submitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Who submitted it: `operator:NAME` or `workflow:OWNER/REPO@RUN_ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    /// Its place in a batch, when it is a run of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::batches::BatchPlace>,
    /// Facts its executor reported, e.g. `slurm_job_id`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// For a queued job, in `GET /jobs/{id}`: which agent may take it, or why no enrolled agent
    /// may (the executor it asks for, its labels, the sites' policies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

impl Job {
    /// The job's final result, once it has one.
    pub fn outcome(&self) -> Option<Outcome> {
        self.state.is_terminal().then(|| Outcome {
            state: self.state,
            exit_code: self.exit_code,
            signal: self.signal,
            reason: self.reason.clone(),
            cause: self.cause,
        })
    }

    /// The process exit code a CLI should end with to mirror this job's result:
    /// the job's own exit code, 124 for a timeout, 128+N for signal N, 130 when cancelled,
    /// 1 for other failures and errors.
    pub fn cli_exit_code(&self) -> i32 {
        match self.state {
            JobState::Succeeded => 0,
            JobState::Failed => match (self.exit_code, self.signal) {
                (Some(code), _) => code,
                (None, Some(sig)) => 128 + sig,
                (None, None) if self.reason.as_deref().is_some_and(is_timeout_reason) => 124,
                (None, None) => 1,
            },
            JobState::Cancelled => 130,
            _ => 1,
        }
    }
}

/// Whether a failure reason says the job ran out of time.
pub fn is_timeout_reason(reason: &str) -> bool {
    reason.starts_with("timed out")
}

/// Query parameters of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    /// Only jobs in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    /// Only jobs meant for this site (the label `site:NAME`) or run by one of its agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    /// At most this many jobs, newest first. Default 50, at most 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The body of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_tests_run_through_run_tests_each_as_one_quoted_word() {
        let mut spec = JobSpec {
            script: "pytest".into(),
            run_tests: Some("pytest -q {tests}".into()),
            tests: vec!["t.py::a".into(), "t.py::b[it's; rm -rf ~]".into()],
            ..JobSpec::default()
        };
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(
            spec.selected_script().unwrap(),
            r#"pytest -q 't.py::a' 't.py::b[it'\''s; rm -rf ~]'"#
        );
        // The shell reads each back as the name it was.
        let out = std::process::Command::new("bash")
            .args([
                "-c",
                &format!(
                    "printf '%s\\n' {}",
                    spec.selected_script()
                        .unwrap()
                        .trim_start_matches("pytest -q ")
                ),
            ])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "t.py::a\nt.py::b[it's; rm -rf ~]\n"
        );
        spec.tests.clear();
        assert_eq!(spec.selected_script().unwrap(), "pytest");
        for (run_tests, tests, problem) in [
            (
                Some("pytest {tests}"),
                vec!["--junitxml=/root/.bashrc"],
                "starts with '-'",
            ),
            (Some("pytest {tests}"), vec!["a\nb"], "control character"),
            (Some("pytest {tests}"), vec![""], "1 to 1024 bytes"),
            (Some("pytest"), vec!["a"], "has no {tests}"),
            (None, vec!["a"], "no run_tests command"),
        ] {
            spec.run_tests = run_tests.map(str::to_string);
            spec.tests = tests.into_iter().map(str::to_string).collect();
            let err = spec.validate().unwrap_err();
            assert!(err.contains(problem), "{err}");
            assert!(spec.selected_script().is_err());
        }
    }

    #[test]
    fn with_a_list_command_chosen_patterns_pick_the_listed_tests_they_match() {
        let list = r#"printf '%s\n' 't.py::a_wobbly' 't.py::b' "t.py::it's; touch pwned" '--junitxml=/tmp/wobbly' 't.py::wobbly_2' '' '3 tests collected'"#;
        let mut spec = JobSpec {
            script: "echo the whole suite".into(),
            run_tests: Some(r#"for t in {tests}; do echo "ran <$t>"; done"#.into()),
            list: Some(list.into()),
            tests: vec![
                "*wobbly*".into(),
                "t.py::it's; touch pwned".into(),
                "$(touch x)*".into(),
            ],
            ..JobSpec::default()
        };
        assert_eq!(spec.validate(), Ok(()));
        let dir = tempfile::tempdir().unwrap();
        let run = |spec: &JobSpec, shell: &str| {
            let out = std::process::Command::new(shell)
                .args(["-e", "-c", &spec.selected_script().unwrap()])
                .current_dir(dir.path())
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        for shell in ["sh", "bash"] {
            let (code, stdout, stderr) = run(&spec, shell);
            assert_eq!(code, Some(0), "{shell}: {stdout}{stderr}");
            assert_eq!(
                stdout,
                "ran <t.py::a_wobbly>\nran <t.py::it's; touch pwned>\nran <t.py::wobbly_2>\n",
                "{shell}: {stderr}"
            );
            assert!(
                stderr.contains("testbot: running 3 listed tests"),
                "{stderr}"
            );
            assert!(
                std::fs::read_dir(dir.path()).unwrap().next().is_none(),
                "nothing ran as shell"
            );
        }
        // A choice that matches nothing fails the run, naming the choice.
        spec.tests = vec!["t.py::gone".into()];
        let (code, stdout, stderr) = run(&spec, "sh");
        assert_eq!(code, Some(1), "{stdout}{stderr}");
        assert!(
            stderr.contains("matches the chosen tests:\n  t.py::gone"),
            "{stderr}"
        );
        // A list command that fails fails the run.
        spec.list = Some("echo t.py::gone; false".into());
        let (code, _, stderr) = run(&spec, "sh");
        assert_eq!(code, Some(1));
        assert!(stderr.contains("the job's list command failed"), "{stderr}");
        spec.list = Some(" ".into());
        assert!(
            spec.validate()
                .unwrap_err()
                .contains("list must be a command")
        );
    }

    #[test]
    fn spec_rejects_unknown_fields() {
        let err = serde_json::from_str::<JobSpec>(r#"{"script":"true","scirpt":"x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `scirpt`"), "{err}");
    }

    #[test]
    fn spec_validation_names_the_field() {
        let mut spec = JobSpec {
            script: "true".into(),
            ..Default::default()
        };
        assert_eq!(spec.validate(), Ok(()));
        spec.env.insert("TESTBOT_JOB_ID".into(), "1".into());
        assert!(spec.validate().unwrap_err().contains("reserved"));
        spec.env.clear();
        spec.env.insert("A B".into(), "1".into());
        assert!(spec.validate().unwrap_err().contains("\"A B\""));
        spec.env.clear();
        spec.labels.push("gpu;rm".into());
        assert!(spec.validate().unwrap_err().contains("label"));
    }

    #[test]
    fn job_state_round_trips() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!(
            "done"
                .parse::<JobState>()
                .unwrap_err()
                .contains("succeeded")
        );
    }
}
