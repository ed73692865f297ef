//! A revoked agent stops the jobs it is running: the broker no longer renews its leases and
//! hands the jobs on, so a job left running there would run twice, on a host the operator no
//! longer trusts.

use testbot_e2e::{Fleet, WAIT, process_alive, wait_for};

#[tokio::test(flavor = "multi_thread")]
async fn revoking_an_agent_stops_its_running_job() {
    let mut fleet = Fleet::start().await;
    let config = fleet.agent_config("doomed");
    fleet.add_agent(config);
    let job = fleet.submit("echo pid $$; exec sleep 300").await;
    let pid: i32 = wait_for("the job to start", WAIT, || async {
        let log = fleet.log(job.id).await;
        log.lines()
            .find_map(|line| {
                line.split_once(" O pid ")
                    .map(|(_, pid)| pid.trim().parse().ok())
            })
            .flatten()
    })
    .await;
    assert!(process_alive(pid));

    let operator = fleet.client();
    let agent = operator
        .agents()
        .await
        .unwrap()
        .agents
        .into_iter()
        .find(|a| a.name == "doomed")
        .expect("the agent enrolled");
    operator.revoke_agent(&agent.id).await.unwrap();

    wait_for("the revoked agent to stop its job", WAIT, || async {
        (!process_alive(pid)).then_some(())
    })
    .await;
    testbot_e2e::kill_group(pid);
}
