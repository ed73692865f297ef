//! Live logs: lines reach a follower while the job runs; appends are idempotent by offset.

use testbot_e2e::{Fleet, stdout_lines};
use testbot_proto::agents::PollRequest;
use testbot_proto::client::follow_log;
use testbot_proto::error::codes;
use testbot_proto::logs::LogChunk;
use testbot_proto::now_ms;

#[tokio::test(flavor = "multi_thread")]
async fn the_first_line_reaches_the_client_before_the_job_ends() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let job = fleet
        .submit("for i in $(seq 1 15); do echo line $i; sleep 0.2; done")
        .await;

    let mut first_line_at = None;
    let mut received = Vec::new();
    let finished = follow_log(&fleet.client(), job.id, 0, |bytes| {
        received.extend_from_slice(bytes);
        if first_line_at.is_none() && String::from_utf8_lossy(&received).contains(" O line 1\n") {
            first_line_at = Some(now_ms());
        }
    })
    .await
    .unwrap();
    let first_line_at = first_line_at.expect("line 1 arrived");
    let finished_at = finished.finished_at_ms.expect("finished");
    assert!(
        first_line_at < finished_at,
        "line 1 arrived at {first_line_at}, after the job finished at {finished_at}"
    );
    let lines = stdout_lines(&String::from_utf8(received).unwrap());
    let expected: Vec<String> = (1..=15).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, expected);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resent_chunk_is_a_no_op_and_a_gap_is_refused() {
    let fleet = Fleet::start().await;
    let job = fleet.submit("true").await;
    let agent = fleet.agent_client().await;
    let assignment = agent
        .poll(&PollRequest {
            agent: "manual".into(),
            labels: vec![],
            executor: "shell".into(),
            wait_ms: Some(1000),
            policy: None,
            workflow_jobs_without_policy: false,
        })
        .await
        .unwrap()
        .expect("assignment");
    assert_eq!(assignment.job_id, job.id);
    agent.start(job.id, &assignment.lease).await.unwrap();
    let chunk = LogChunk {
        lease: assignment.lease.clone(),
        offset: 0,
        data: "2026-01-01T00:00:00.000Z O one\n".into(),
    };
    let first = agent.append_log(job.id, &chunk).await.unwrap();
    let again = agent.append_log(job.id, &chunk).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first.log_bytes, chunk.data.len() as u64);

    let gap = LogChunk {
        offset: 1000,
        ..chunk.clone()
    };
    let err = agent.append_log(job.id, &gap).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::LOG_GAP), "{err}");
    assert!(err.to_string().contains("resend from byte 31"), "{err}");

    let log = fleet.log(job.id).await;
    assert_eq!(stdout_lines(&log), vec!["one"]);
    fleet.stop().await;
}
