//! How a job ended, as the agent reports it in `finish`, and why a job that did not succeed
//! did not ([`FailureCause`]).

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
