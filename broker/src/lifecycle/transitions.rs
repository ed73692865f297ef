//! The decisions of the job lifecycle, and the words of the `testbot:` lines they leave in a
//! job's log. Pure functions: the store applies what they return.

use testbot_proto::jobs::JobState;
use testbot_proto::logs::{Stream, format_line};
use testbot_proto::results::FailureCause;

use crate::store::{JobModel, LogCut, Transition};

/// The system line `testbot: TEXT` of a job's log, stamped `at_ms`.
pub fn system_line(at_ms: i64, text: &str) -> String {
    format_line(at_ms, Stream::System, &format!("testbot: {text}"))
}

/// An agent's text (a job's reason) as the job keeps it: a NUL character, which means nothing in
/// a sentence and which no PostgreSQL text column can hold, becomes U+FFFD.
pub fn agent_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

fn transition(
    state: JobState,
    cause: Option<FailureCause>,
    reason: String,
    at_ms: i64,
) -> Transition {
    Transition {
        log_line: system_line(at_ms, &reason),
        state,
        cause,
        reason,
    }
}

/// What a lease that ran out means for its job: cancelled if someone had asked for that, `error`
/// after `max_attempts` claims, otherwise queued to run again.
pub fn lease_expired(job: &JobModel, max_attempts: u32, at_ms: i64) -> Transition {
    let agent = job.agent.as_deref().unwrap_or("?");
    let attempts = job.attempts.clamp(0, i64::from(u32::MAX)) as u32;
    let (state, cause, reason) = if job.cancel_requested {
        (
            JobState::Cancelled,
            Some(FailureCause::Cancelled),
            format!("cancelled; agent {agent} was lost before it confirmed"),
        )
    } else if attempts >= max_attempts {
        (
            JobState::Error,
            Some(FailureCause::Infrastructure),
            format!(
                "agent lost: agent {agent} stopped renewing its lease \
                 (attempt {attempts} of {max_attempts})"
            ),
        )
    } else {
        (
            JobState::Queued,
            None,
            format!(
                "requeued: agent {agent} stopped renewing its lease \
                 (attempt {attempts} of {max_attempts})"
            ),
        )
    };
    transition(state, cause, reason, at_ms)
}

/// A queued job that is cancelled ends at once.
pub fn cancelled_before_start(at_ms: i64) -> Transition {
    transition(
        JobState::Cancelled,
        Some(FailureCause::Cancelled),
        "cancelled before it started".to_string(),
        at_ms,
    )
}

/// What a hand-back means, given how often the job was handed back before (`releases`): queued
/// again with `requeue_reason`, unless no other agent may run it (`final_reason`: every site's
/// policy refuses it) or this is hand-back number `max_releases`; then it ends `error`.
pub fn released(
    requeue_reason: &str,
    final_reason: Option<&str>,
    releases: u32,
    max_releases: u32,
    at_ms: i64,
) -> Transition {
    let count = releases.saturating_add(1);
    match final_reason {
        Some(reason) => transition(
            JobState::Error,
            Some(FailureCause::PolicyRefusal),
            reason.to_string(),
            at_ms,
        ),
        None if count >= max_releases => transition(
            JobState::Error,
            Some(FailureCause::Infrastructure),
            format!("{requeue_reason}; handed back {count} times, giving up"),
            at_ms,
        ),
        None => transition(JobState::Queued, None, requeue_reason.to_string(), at_ms),
    }
}

/// What is written when a log reaches `max_log_bytes`, after `kept` bytes.
pub fn log_cut(max_log_bytes: u64, kept: u64, at_ms: i64) -> LogCut {
    LogCut {
        log_line: system_line(
            at_ms,
            &format!(
                "the log reached the broker's limit of {max_log_bytes} bytes ({:.1} MiB, counting \
                 each line with its timestamp and stream); the rest of the job's output is not \
                 stored, and the job runs on to its end. An operator can raise the limit with \
                 `testbot-broker --max-log-bytes`.",
                max_log_bytes as f64 / (1024.0 * 1024.0)
            ),
        ),
        note: format!("at byte {kept} (the limit is {max_log_bytes} bytes)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_text_loses_its_nul_characters() {
        assert_eq!(agent_text("exit\0ed \0"), "exit\u{FFFD}ed \u{FFFD}");
        assert_eq!(agent_text("plain"), "plain");
    }

    fn leased(attempts: i64, cancel_requested: bool) -> JobModel {
        JobModel {
            id: 1,
            spec: "{}".into(),
            state: "running".into(),
            reason: None,
            exit_code: None,
            signal: None,
            attempts,
            agent: Some("hpc/login1".into()),
            lease: Some("l".into()),
            lease_expires_at_ms: Some(0),
            cancel_requested,
            log_bytes: 0,
            created_at_ms: 0,
            started_at_ms: None,
            finished_at_ms: None,
            repository: None,
            run_id: None,
            submitted_by: None,
            oidc_token: None,
            metadata: None,
            secret_env: None,
            public: false,
            cause: None,
            batch_id: None,
            batch_run: None,
            batch_runs: None,
            commit_sha: None,
            git_ref: None,
            job_name: None,
        }
    }

    #[test]
    fn an_expired_lease_requeues_until_the_last_attempt_and_a_cancel_wins() {
        let again = lease_expired(&leased(1, false), 3, 0);
        assert_eq!(again.state, JobState::Queued);
        assert_eq!(
            again.reason,
            "requeued: agent hpc/login1 stopped renewing its lease (attempt 1 of 3)"
        );
        assert!(
            again
                .log_line
                .contains("testbot: requeued: agent hpc/login1")
        );
        assert_eq!(
            lease_expired(&leased(3, false), 3, 0).state,
            JobState::Error
        );
        assert_eq!(
            lease_expired(&leased(3, true), 3, 0).state,
            JobState::Cancelled
        );
    }

    #[test]
    fn a_job_handed_back_too_often_ends() {
        assert_eq!(released("r", None, 0, 3, 0).state, JobState::Queued);
        let last = released("r", None, 2, 3, 0);
        assert_eq!(last.state, JobState::Error);
        assert_eq!(last.reason, "r; handed back 3 times, giving up");
        assert_eq!(
            released("r", Some("nobody else"), 0, 3, 0).reason,
            "nobody else"
        );
    }
}
