//! How a job ended, as the agent reports it in `finish`.

use serde::{Deserialize, Serialize};

use crate::jobs::JobState;

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
}

impl Outcome {
    pub fn succeeded() -> Self {
        Outcome {
            state: JobState::Succeeded,
            exit_code: Some(0),
            signal: None,
            reason: None,
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
        }
    }

    pub fn signalled(signal: i32) -> Self {
        Outcome {
            state: JobState::Failed,
            exit_code: None,
            signal: Some(signal),
            reason: Some(format!("killed by signal {signal}")),
        }
    }

    pub fn with_state(state: JobState, reason: impl Into<String>) -> Self {
        Outcome {
            state,
            exit_code: None,
            signal: None,
            reason: Some(reason.into()),
        }
    }
}

/// The body of `POST /api/v1/agent/jobs/{id}/finish`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinishRequest {
    pub lease: String,
    pub outcome: Outcome,
}
