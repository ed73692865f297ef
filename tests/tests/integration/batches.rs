//! Batches end to end: `testbot run --repeat N` runs N copies in parallel across agents, reports
//! each run as it ends and the totals, exits non-zero when a run failed; a batch is cancelled
//! as one; a workflow's batch is its own.

use testbot_e2e::{AUDIENCE, Fleet, WAIT, wait_for};
use testbot_proto::batches::Batch;
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;
use testbot_proto::results::FailureCause;

#[tokio::test(flavor = "multi_thread")]
async fn run_repeat_reports_each_run_and_the_totals_and_fails_when_a_run_fails() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    fleet.add_agent(fleet.agent_config("a2"));
    fleet.wait_polling_agents(2).await;

    // Runs 3 and 6 fail, chosen by their place in the batch; each run records where it ran.
    let script = "echo run $TESTBOT_BATCH_RUN of $TESTBOT_BATCH_RUNS in batch $TESTBOT_BATCH_ID; \
                  sleep 0.3; test $((TESTBOT_BATCH_RUN % 3)) -ne 0";
    let out = fleet.testbot(&["run", "--repeat", "6", "--", script]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("testbot: batch 1: 6 runs queued"),
        "{stderr}"
    );
    for run in 1..=6 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("run {run}/6 ")))
            .unwrap_or_else(|| panic!("no line for run {run}: {stdout}"));
        if run % 3 == 0 {
            assert!(
                line.contains(": failed: test failure (exit code 1)"),
                "{line}"
            );
        } else {
            assert!(line.contains(": succeeded"), "{line}");
        }
    }
    assert!(
        stdout.contains("batch 1: 6 runs: 4 succeeded, 2 failed\n"),
        "{stdout}"
    );

    let batch: Batch =
        serde_json::from_slice(&fleet.testbot(&["--json", "batch", "1"]).await.stdout).unwrap();
    assert_eq!(batch.runs, 6);
    assert!(batch.is_finished());
    for (i, job) in batch.jobs.iter().enumerate() {
        let place = job.batch.expect("a run knows its batch");
        assert_eq!((place.batch.0, place.run, place.runs), (1, i as u32 + 1, 6));
        let log = fleet.log(job.id).await;
        assert!(
            log.contains(&format!("run {} of 6 in batch 1", i + 1)),
            "{log}"
        );
        let expected = (place.run % 3 == 0).then_some(FailureCause::TestFailure);
        assert_eq!(job.cause, expected, "{job:?}");
    }
    // The runs went to both agents: they ran side by side, not one after another.
    let agents: std::collections::BTreeSet<_> =
        batch.jobs.iter().filter_map(|j| j.agent.clone()).collect();
    assert_eq!(agents.len(), 2, "{agents:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_cancelled_as_one() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    fleet.wait_polling_agents(1).await;
    let spec = JobSpec {
        script: "sleep 60".into(),
        ..JobSpec::default()
    };
    let batch = fleet.client().submit_batch(&spec, 4, None).await.unwrap();
    // One run starts; the other three wait for the one agent.
    wait_for("a run to start", WAIT, || async {
        let now = fleet.client().batch(batch.id).await.unwrap();
        (now.totals.running == 1).then_some(())
    })
    .await;
    let out = fleet
        .testbot(&["batch", &batch.id.to_string(), "--cancel"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let ended = wait_for("every run to end", WAIT, || async {
        let now = fleet.client().batch(batch.id).await.unwrap();
        now.is_finished().then_some(now)
    })
    .await;
    assert_eq!(ended.totals.cancelled, 4, "{:?}", ended.totals);
    assert!(ended.jobs.iter().all(|j| j.state == JobState::Cancelled));
    assert_eq!(ended.cli_exit_code(), 130);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflows_batch_counts_against_its_quota_and_is_its_own() {
    const REPO: &str = "hpc-lab/solver";
    let fleet = Fleet::start_oidc(|config| config.settings.limits.max_queued_per_repo = 5).await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    fleet.enroll_taking_workflow_jobs("any-job").await;
    let spec = JobSpec {
        script: "true".into(),
        ..JobSpec::default()
    };
    // Six runs would pass the repository's queue quota of five: nothing is queued.
    let refused = fleet
        .workflow(REPO)
        .submit_batch(&spec, 6, None)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("has 0 jobs waiting in the queue (and the batch would add 6)"),
        "{refused}"
    );
    let issuer = fleet.issuer();
    let claims = issuer.claims(REPO, AUDIENCE);
    let mine = fleet.client_with(&issuer.mint(&claims));
    let batch = mine.submit_batch(&spec, 5, None).await.unwrap();
    assert_eq!(batch.jobs.len(), 5);
    assert!(
        batch
            .jobs
            .iter()
            .all(|j| j.repository.as_deref() == Some(REPO))
    );
    // Another run of the workflow may not read it.
    let other = fleet.workflow(REPO).batch(batch.id).await.unwrap_err();
    assert!(
        other
            .to_string()
            .contains("was not submitted by this workflow run"),
        "{other}"
    );
    fleet.stop().await;
}

/// A job someone waits for is not held back by a repeat queued before it: the agent takes it
/// as soon as a run ends, ahead of the repeat's remaining runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_submitted_after_a_repeat_runs_before_the_repeats_remaining_runs() {
    let mut fleet = Fleet::start().await;
    let mut agent = fleet.agent_config("a1");
    agent.concurrency = 1;
    fleet.add_agent(agent);
    let client = fleet.client();
    let slow = JobSpec {
        script: "sleep 0.5".into(),
        ..JobSpec::default()
    };
    let batch = client.submit_batch(&slow, 6, None).await.unwrap();
    wait_for("the repeat's first run to start", WAIT, || async {
        let job = client.job(batch.jobs[0].id).await.unwrap();
        (job.state != JobState::Queued).then_some(())
    })
    .await;
    let waiting = client
        .submit(&JobSpec {
            script: "echo someone waits".into(),
            ..JobSpec::default()
        })
        .await
        .unwrap();
    let (done, log) = fleet.finished(&waiting).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    let started = done.started_at_ms.unwrap();
    // At most the run under way when it was submitted (and one the agent had just taken) ran
    // first; the rest of the repeat waited for it.
    let batch = wait_for("the repeat to end", WAIT, || async {
        let batch = client.batch(batch.id).await.unwrap();
        batch
            .jobs
            .iter()
            .all(|j| j.state.is_terminal())
            .then_some(batch)
    })
    .await;
    let before = batch
        .jobs
        .iter()
        .filter(|j| j.started_at_ms.unwrap() < started)
        .count();
    assert!(before <= 2, "{before} of the repeat's runs started first");
    assert!(
        batch.jobs.iter().all(|j| j.state == JobState::Succeeded),
        "{batch:?}"
    );
    fleet.stop().await;
}
