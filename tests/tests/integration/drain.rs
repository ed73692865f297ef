//! Agent shutdown: the first signal drains (running jobs finish, no new work), the second
//! cancels running jobs and reports them.

use nix::sys::signal::Signal;
use testbot_e2e::{Fleet, WAIT, wait_for};
use testbot_proto::jobs::{JobId, JobState};

async fn wait_log(fleet: &Fleet, id: JobId, text: &str) {
    wait_for(
        &format!("{text:?} in the log of job {id}"),
        WAIT,
        || async { fleet.log(id).await.contains(text).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_lets_the_running_job_finish_and_takes_no_more() {
    let mut fleet = Fleet::start().await;
    let agent = fleet.add_agent(fleet.agent_config("a1"));
    let running = fleet.submit("echo start; sleep 1.5; echo end").await;
    wait_log(&fleet, running.id, " O start\n").await;

    fleet.agent_shutdown(agent).drain.cancel();
    let later = fleet.submit("echo later").await;
    fleet.agent_exit(agent).await.unwrap();

    let running = fleet.client().job(running.id).await.unwrap();
    assert_eq!(running.state, JobState::Succeeded);
    assert!(fleet.log(running.id).await.contains(" O end\n"));
    let later = fleet.client().job(later.id).await.unwrap();
    assert_eq!(
        later.state,
        JobState::Queued,
        "a draining agent takes no new work"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_cancels_running_jobs_and_reports_them() {
    let mut fleet = Fleet::start().await;
    let agent = fleet.add_agent(fleet.agent_config("a2"));
    let job = fleet.submit("echo begin; sleep 60").await;
    wait_log(&fleet, job.id, " O begin\n").await;

    let shutdown = fleet.agent_shutdown(agent);
    shutdown.drain.cancel();
    shutdown.hard.cancel();
    fleet.agent_exit(agent).await.unwrap();
    let job = fleet.client().job(job.id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.reason.as_deref(), Some("cancelled: agent a2 shut down"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_process_drains_on_sigterm() {
    let fleet = Fleet::start().await;
    let mut agent = fleet.spawn_agent("proc", "concurrency = 2");
    let job = fleet.submit("echo start; sleep 1; echo end").await;
    wait_log(&fleet, job.id, " O start\n").await;
    agent.signal(Signal::SIGTERM);
    let status = agent.wait(WAIT).await;
    assert!(status.success(), "{status}");
    let job = fleet.client().job(job.id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    fleet.stop().await;
}
