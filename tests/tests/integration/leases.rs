//! Leases: a lost agent's job is requeued to another agent or ends `error: agent lost`, and a
//! late result under an expired lease is refused, so every job has exactly one result.

use testbot_e2e::{Fleet, WAIT, kill_group, process_alive, wait_for};
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
    let pids = fleet.dir.path().join("pids");
    let mut doomed = fleet.spawn_agent("doomed", "");
    let job = fleet
        .client()
        .submit(&testbot_proto::jobs::JobSpec {
            // Attempt 1 also starts a process in a session of its own, out of the job's
            // process group.
            script: "echo $$ >> $PIDS; echo attempt $TESTBOT_ATTEMPT on $TESTBOT_AGENT; \
                     if [ $TESTBOT_ATTEMPT = 1 ]; then setsid sleep 1000 & echo $! >> $PIDS; sleep 120; fi; echo done"
                .into(),
            env: [("PIDS".to_string(), pids.display().to_string())].into(),
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

    // Attempt 1's processes outlived the agent killed with SIGKILL; the agent, started again,
    // kills what it had started.
    let attempt_1: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .take(2)
        .map(|pid| pid.parse().unwrap())
        .collect();
    let mut restarted = fleet.spawn_agent("doomed", "");
    let deadline = tokio::time::Instant::now() + WAIT;
    while attempt_1.iter().any(|pid| process_alive(*pid)) && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let alive: Vec<i32> = attempt_1
        .iter()
        .copied()
        .filter(|pid| process_alive(*pid))
        .collect();
    for pid in &alive {
        kill_group(*pid);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        alive.is_empty(),
        "processes of attempt 1 still ran after the agent restarted: {alive:?}"
    );
    // A clean stop removes the agent's (empty) parent cgroup.
    restarted.signal(nix::sys::signal::Signal::SIGTERM);
    restarted.wait(WAIT).await;
    fleet.stop().await;
}

/// A shell job that starts a process in a session of its own (`setsid`, out of its process
/// group) leaves nothing running once it ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_shell_job_leaves_no_process_behind_even_one_that_called_setsid() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("vm1"));
    let job = fleet
        .submit("setsid sleep 1000 & echo escaped $!; nohup setsid sh -c 'sleep 1000' >/dev/null 2>&1 & echo escaped $!")
        .await;
    let finished = fleet.wait_finished(job.id).await;
    assert_eq!(finished.state, JobState::Succeeded, "{finished:?}");
    let log = fleet.log(job.id).await;
    let pids: Vec<i32> = testbot_e2e::stdout_lines(&log)
        .iter()
        .filter_map(|line| line.strip_prefix("escaped ")?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{log}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids.iter().any(|pid| process_alive(*pid)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|pid| process_alive(*pid))
        .collect();
    for pid in &alive {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(alive.is_empty(), "the job left {alive:?} running\n{log}");
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

/// An agent that cannot make cgroups (here: not root, no delegated cgroup v2) says so when it
/// starts, and still runs shell jobs, stopping them by their process group as before.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_a_writable_cgroup_says_so_and_still_runs_jobs() {
    use std::os::unix::fs::PermissionsExt as _;
    testbot_e2e::ensure_account(testbot_e2e::JOB_ACCOUNT);
    let account = nix::unistd::User::from_name(testbot_e2e::JOB_ACCOUNT)
        .unwrap()
        .unwrap();
    let fleet = Fleet::start().await;
    let dir = fleet.dir.path();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = dir.join("agent-unprivileged");
    let state = dir.join("agent-unprivileged-state");
    for path in [&work, &state] {
        std::fs::create_dir(path).unwrap();
        std::os::unix::fs::chown(path, Some(account.uid.as_raw()), Some(account.gid.as_raw()))
            .unwrap();
    }
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let token = dir.join("enrollment.token");
    std::fs::write(
        &token,
        secrecy::ExposeSecret::expose_secret(&fleet.enrollment_token),
    )
    .unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.join("agent-unprivileged.toml");
    std::fs::write(
        &config,
        format!(
            "broker_url = \"{}\"\nenrollment_token_file = \"{}\"\nname = \"unprivileged\"\nwork_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"5s\"\n",
            fleet.url,
            token.display(),
            work.display(),
            state.display()
        ),
    )
    .unwrap();
    let stderr = dir.join("agent-unprivileged.err");
    let mut agent = tokio::process::Command::new(testbot_e2e::bin_path("testbot-agent"))
        .args(["run", "--config", config.to_str().unwrap()])
        .uid(account.uid.as_raw())
        .gid(account.gid.as_raw())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    wait_for("the agent's warning", WAIT, || async {
        std::fs::read_to_string(&stderr)
            .unwrap()
            .contains("No writable cgroup v2: shell jobs run without a cgroup")
            .then_some(())
    })
    .await;
    let job = fleet.submit("id -un").await;
    let finished = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(finished.state, JobState::Succeeded, "{log}");
    assert!(
        log.contains(&format!(" O {}\n", testbot_e2e::JOB_ACCOUNT)),
        "{log}"
    );
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    fleet.stop().await;
}
