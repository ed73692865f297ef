//! How a job ended, as the agent reports it in `finish`, and why a job that did not succeed
//! did not ([`FailureCause`]).

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use crate::jobs::JobState;

/// Why a job did not succeed, typed, so that counting failures never means reading reasons.
/// A batch counts the fleet's failures (`infrastructure`, `policy_refusal`) apart from the
/// job's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCause {
    /// The script failed: a non-zero exit code, or a signal it did not get from testbot.
    TestFailure,
    /// It ran past its time limit.
    Timeout,
    /// It went over its memory limit and was killed.
    OutOfMemory,
    /// Someone cancelled it.
    Cancelled,
    /// The fleet failed it: an agent lost, a node that failed, an executor that could not run
    /// it, a scheduler that preempted it.
    Infrastructure,
    /// No agent's site policy would run it.
    PolicyRefusal,
}

impl FailureCause {
    pub const ALL: [FailureCause; 6] = [
        FailureCause::TestFailure,
        FailureCause::Timeout,
        FailureCause::OutOfMemory,
        FailureCause::Cancelled,
        FailureCause::Infrastructure,
        FailureCause::PolicyRefusal,
    ];

    /// The name in JSON and in the database (`test_failure`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCause::TestFailure => "test_failure",
            FailureCause::Timeout => "timeout",
            FailureCause::OutOfMemory => "out_of_memory",
            FailureCause::Cancelled => "cancelled",
            FailureCause::Infrastructure => "infrastructure",
            FailureCause::PolicyRefusal => "policy_refusal",
        }
    }

    pub fn parse(name: &str) -> Option<FailureCause> {
        FailureCause::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether the fleet, not the job, is to blame.
    pub fn is_fleets(self) -> bool {
        matches!(
            self,
            FailureCause::Infrastructure | FailureCause::PolicyRefusal
        )
    }

    /// The cause of an end state when the reporter did not say (an agent older than causes):
    /// from the state, and for a failure from whether it timed out.
    pub fn infer(state: JobState, reason: Option<&str>) -> Option<FailureCause> {
        match state {
            JobState::Succeeded | JobState::Queued | JobState::Assigned | JobState::Running => None,
            JobState::Cancelled => Some(FailureCause::Cancelled),
            JobState::Error => Some(FailureCause::Infrastructure),
            JobState::Failed if reason.is_some_and(crate::jobs::is_timeout_reason) => {
                Some(FailureCause::Timeout)
            }
            JobState::Failed => Some(FailureCause::TestFailure),
        }
    }
}

impl std::fmt::Display for FailureCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

/// A job's final result. `state` must be terminal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    pub state: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why it did not succeed; None when it did. Inferred from `state` and `reason` when an
    /// agent does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
}

impl Outcome {
    pub fn succeeded() -> Self {
        Outcome {
            state: JobState::Succeeded,
            exit_code: Some(0),
            signal: None,
            reason: None,
            cause: None,
        }
    }

    pub fn exited(code: i32) -> Self {
        if code == 0 {
            return Outcome::succeeded();
        }
        Outcome {
            state: JobState::Failed,
            exit_code: Some(code),
            signal: None,
            reason: Some(format!("exit code {code}")),
            cause: Some(FailureCause::TestFailure),
        }
    }

    pub fn signalled(signal: i32) -> Self {
        Outcome {
            state: JobState::Failed,
            exit_code: None,
            signal: Some(signal),
            reason: Some(format!("killed by signal {signal}")),
            cause: Some(FailureCause::TestFailure),
        }
    }

    /// An end `state` for `reason`, caused by `cause`.
    pub fn with_cause(state: JobState, cause: FailureCause, reason: impl Into<String>) -> Self {
        Outcome {
            state,
            exit_code: None,
            signal: None,
            reason: Some(reason.into()),
            cause: Some(cause),
        }
    }

    /// The cause as reported, or inferred when it was not; None for a success.
    pub fn cause(&self) -> Option<FailureCause> {
        if self.state == JobState::Succeeded {
            return None;
        }
        self.cause
            .or_else(|| FailureCause::infer(self.state, self.reason.as_deref()))
    }
}

/// The body of `POST /api/v1/agent/jobs/{id}/finish`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub lease: String,
    pub outcome: Outcome,
}

/// Most result-file patterns a job may name (`results = [...]`). One pattern with `**` or
/// `{a,b}` can stand for many files.
pub const MAX_RESULT_PATTERNS: usize = 50;

/// Longest result-file pattern, in bytes.
pub const MAX_RESULT_PATTERN_BYTES: usize = 500;

/// Checks a job's result-file patterns as the agent reads them: at most
/// [`MAX_RESULT_PATTERNS`] of at most [`MAX_RESULT_PATTERN_BYTES`] each, relative to the
/// workspace, without `..`, and valid globs (`*` stays within a directory, `**` crosses them).
/// A leading `./` is allowed. The message names the pattern and what to write instead.
pub fn validate_result_patterns(patterns: &[String]) -> Result<(), String> {
    result_globs(patterns).map(|_| ())
}

/// The patterns, compiled as the agent matches them against workspace paths.
pub fn result_globs(patterns: &[String]) -> Result<GlobSet, String> {
    if patterns.len() > MAX_RESULT_PATTERNS {
        return Err(format!(
            "{} patterns given; at most {MAX_RESULT_PATTERNS} are allowed (one with \"**\" or \"{{a,b}}\" can stand for many files)",
            patterns.len()
        ));
    }
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(pattern_glob(pattern)?);
    }
    set.build().map_err(|err| {
        format!(
            "the patterns together are too complex to match ({}); name fewer",
            err.kind()
        )
    })
}

fn pattern_glob(pattern: &str) -> Result<Glob, String> {
    if pattern.len() > MAX_RESULT_PATTERN_BYTES {
        let start: String = pattern.chars().take(40).collect();
        return Err(format!(
            "pattern \"{}…\" is {} bytes long; at most {MAX_RESULT_PATTERN_BYTES} are allowed",
            start.escape_debug(),
            pattern.len()
        ));
    }
    if pattern.starts_with('/') {
        return Err(format!(
            "pattern {pattern:?} is absolute; patterns are relative to the workspace, e.g. {:?}",
            pattern.trim_start_matches('/')
        ));
    }
    // Paths are matched as the walk spells them, without `.` or empty components, so `./x`
    // and `x//y` are read as `x` and `x/y` rather than never matching.
    let components: Vec<&str> = pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.is_empty() {
        return Err(format!(
            "pattern {pattern:?} names no file; write a glob relative to the workspace, e.g. \"build/**/junit*.xml\""
        ));
    }
    if components.contains(&"..") {
        return Err(format!(
            "pattern {pattern:?} has a \"..\" component; only files inside the workspace are collected, so name them from the workspace down"
        ));
    }
    GlobBuilder::new(&components.join("/"))
        .literal_separator(true)
        .build()
        .map_err(|err| format!("pattern {pattern:?} is not a valid glob: {}", err.kind()))
}
