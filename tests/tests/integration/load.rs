//! Many jobs, several agents: every job runs exactly once.

use std::collections::BTreeMap;

use testbot_e2e::Fleet;
use testbot_proto::jobs::{JobSpec, JobState};

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_run_200_jobs_each_exactly_once() {
    let mut fleet = Fleet::start().await;
    let ran = fleet.dir.path().join("ran");
    for name in ["a1", "a2"] {
        let mut config = fleet.agent_config(name);
        config.concurrency = 2;
        fleet.add_agent(config);
    }
    let client = fleet.client();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let spec = JobSpec {
            script: "echo $TESTBOT_JOB_ID $TESTBOT_AGENT >> $RAN".into(),
            env: [("RAN".to_string(), ran.display().to_string())].into(),
            ..Default::default()
        };
        ids.push(client.submit(&spec).await.unwrap().id);
    }
    let mut per_agent = BTreeMap::<String, usize>::new();
    for id in &ids {
        let job = fleet.wait_finished(*id).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        assert_eq!(job.attempts, 1, "{job:?}");
        *per_agent.entry(job.agent.unwrap()).or_default() += 1;
    }
    let text = std::fs::read_to_string(&ran).unwrap();
    let mut runs = BTreeMap::<i64, usize>::new();
    for line in text.lines() {
        let id: i64 = line.split_whitespace().next().unwrap().parse().unwrap();
        *runs.entry(id).or_default() += 1;
    }
    assert_eq!(runs.len(), 200, "every job ran");
    assert!(runs.values().all(|n| *n == 1), "a job ran twice: {runs:?}");
    assert_eq!(per_agent.len(), 2, "both agents took work: {per_agent:?}");
    fleet.stop().await;
}
