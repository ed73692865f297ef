//! Leases: a lost agent's job is requeued to another agent or ends `error: agent lost`, and a
//! late result under an expired lease is refused, so every job has exactly one result.

use testbot_e2e::{Fleet, WAIT, kill_group, wait_for};
use testbot_proto::agents::{Assignment, PollRequest};
use testbot_proto::client::BrokerClient;
use testbot_proto::error::codes;
use testbot_proto::jobs::{JobId, JobState};
use testbot_proto::logs::LogChunk;
use testbot_proto::results::{FinishRequest, Outcome};

async fn claim(agent: &BrokerClient, name: &str) -> Assignment {
    agent
        .poll(&PollRequest {
            agent: name.into(),
            labels: vec![],
            executor: "shell".into(),
            wait_ms: Some(5000),
            policy: None,
            workflow_jobs_without_policy: false,
        })
        .await
        .unwrap()
        .expect("a job to claim")
}

async fn wait_state(fleet: &Fleet, id: JobId, state: JobState) -> testbot_proto::jobs::Job {
    let client = fleet.client();
    wait_for(&format!("job {id} to be {state}"), WAIT, || async {
        client.job(id).await.ok().filter(|j| j.state == state)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_mid_job_loses_it_to_another_agent() {
    let mut fleet = Fleet::start().await;
    let pgids = fleet.dir.path().join("pgids");
    let mut doomed = fleet.spawn_agent("doomed", "");
    let job = fleet
        .client()
        .submit(&testbot_proto::jobs::JobSpec {
            script: "echo $$ >> $PGIDS; echo attempt $TESTBOT_ATTEMPT on $TESTBOT_AGENT; \
                     if [ $TESTBOT_ATTEMPT = 1 ]; then sleep 120; fi; echo done"
                .into(),
            env: [("PGIDS".to_string(), pgids.display().to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    wait_for("attempt 1 to start", WAIT, || async {
        fleet
            .log(job.id)
            .await
            .contains("attempt 1 on doomed")
            .then_some(())
    })
    .await;
    doomed.kill9().await;

    fleet.add_agent(fleet.agent_config("rescuer"));
    let finished = fleet.wait_finished(job.id).await;
    assert_eq!(finished.state, JobState::Succeeded, "{finished:?}");
    assert_eq!(finished.attempts, 2);
    assert_eq!(finished.agent.as_deref(), Some("test-site/rescuer"));
    let log = fleet.log(job.id).await;
    assert!(
        log.contains(
            "requeued: agent test-site/doomed stopped renewing its lease (attempt 1 of 3)"
        ),
        "{log}"
    );
    assert!(log.contains("attempt 2 on rescuer"), "{log}");
    assert!(log.contains(" O done\n"), "{log}");

    // The killed agent's job process outlived it; stop it.
    for pgid in std::fs::read_to_string(&pgids).unwrap().lines() {
        kill_group(pgid.parse().unwrap());
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_result_under_an_expired_lease_is_refused() {
    let fleet = Fleet::start().await;
    let job = fleet.submit("true").await;
    let agent = fleet.agent_client().await;

    let old = claim(&agent, "slow").await;
    agent.start(job.id, &old.lease).await.unwrap();
    // No heartbeats: the 2 s lease runs out and the job is queued again.
    wait_state(&fleet, job.id, JobState::Queued).await;
    let new = claim(&agent, "fast").await;
    assert_eq!(new.attempt, 2);
    assert!(new.log_offset > 0, "the requeue note is in the log");

    let late = FinishRequest {
        lease: old.lease.clone(),
        outcome: Outcome::exited(0),
    };
    let err = agent.finish(job.id, &late).await.unwrap_err();
    assert_eq!(err.code(), Some(codes::LEASE_LOST), "{err}");
    assert!(
        err.to_string()
            .contains("was requeued after the lease expired"),
        "{err}"
    );
    let err = agent
        .append_log(
            job.id,
            &LogChunk {
                lease: old.lease.clone(),
                offset: new.log_offset,
                data: "2026-01-01T00:00:00.000Z O stale\n".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::LEASE_LOST), "{err}");
    let err = agent
        .heartbeat(job.id, &old.lease, std::time::Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(codes::LEASE_LOST), "{err}");

    agent.start(job.id, &new.lease).await.unwrap();
    let done = agent
        .finish(
            job.id,
            &FinishRequest {
                lease: new.lease.clone(),
                outcome: Outcome::exited(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.exit_code, Some(1));

    // Neither lease can change the result now.
    for lease in [&old.lease, &new.lease] {
        let again = FinishRequest {
            lease: lease.clone(),
            outcome: Outcome::exited(0),
        };
        let err = agent.finish(job.id, &again).await.unwrap_err();
        assert_eq!(err.code(), Some(codes::LEASE_LOST), "{err}");
    }
    let job = fleet.client().job(job.id).await.unwrap();
    assert_eq!((job.state, job.exit_code), (JobState::Failed, Some(1)));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_agents_keep_vanishing_ends_agent_lost() {
    let fleet = Fleet::start_with(|c| c.settings.max_attempts = 2).await;
    let job = fleet.submit("true").await;
    let ghost1 = fleet.enroll("ghost1").await.client;
    let ghost2 = fleet.enroll("ghost2").await.client;
    claim(&ghost1, "ghost1").await;
    wait_state(&fleet, job.id, JobState::Queued).await;
    claim(&ghost2, "ghost2").await;
    let job = wait_state(&fleet, job.id, JobState::Error).await;
    assert_eq!(job.attempts, 2);
    let reason = job.reason.unwrap();
    assert!(
        reason.starts_with("agent lost: agent test-site/ghost2"),
        "{reason}"
    );
    fleet.stop().await;
}
