//! The Slurm executor against a real single-node Slurm (`tests/slurm/start.sh`, which
//! `scripts/test.sh` runs and which sets `SLURM_CONF`). Jobs run as the unprivileged account the
//! site policy maps them to.

use std::path::Path;
use std::time::Duration;

use testbot_e2e::{
    AUDIENCE, Fleet, JOB_ACCOUNT, SIXTEEN_LINES, WAIT, ensure_account, require_slurm, wait_for,
};
use testbot_proto::client::ClientError;
use testbot_proto::jobs::{JobSpec, JobState, Resources};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn policy(issuer: &str) -> String {
    format!(
        r#"
max_concurrent_jobs = 4
max_runtime = "10m"
env_allow = ["GREETING"]

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.slurm]
max_cpus = 2
# Jobs that ask for nothing get one core, so the tests' jobs share the 2-core node.
default_cpus = 1
max_time = "5m"
partitions = ["debug", "batch"]

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
executors = ["slurm"]
"#
    )
}

/// A fleet whose broker trusts a local issuer, with `REPO` registered and the test directory
/// open to the job account (Slurm runs jobs as that account, in this directory).
async fn slurm_fleet(lease_ttl: Duration) -> (Fleet, std::path::PathBuf) {
    require_slurm();
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start_oidc(|config| {
        config.settings.lease_ttl = lease_ttl;
        config.settings.heartbeat_interval = Duration::from_millis(500);
    })
    .await;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(fleet.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let policy_path = fleet.dir.path().join("policy.toml");
    std::fs::write(&policy_path, policy(&fleet.issuer().url)).unwrap();
    (fleet, policy_path)
}

fn add_slurm_agent(fleet: &mut Fleet, policy: &Path) {
    let mut config = fleet.agent_config("login1");
    config.executor = testbot_agent::config::ExecutorKind::Slurm;
    config.policy = Some(policy.to_path_buf());
    fleet.add_agent(config);
}

/// Adds the agent and waits until it can be given work.
async fn start_slurm_agent(fleet: &mut Fleet, policy: &Path) {
    add_slurm_agent(fleet, policy);
    fleet.wait_policy_agents(1).await;
}

fn spec(script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        ..Default::default()
    }
}

/// The Slurm job id the agent wrote into the job's log.
fn slurm_job_id(log: &str) -> String {
    let marker = "testbot: submitted to Slurm as job ";
    let start = log.find(marker).expect("the log names the Slurm job") + marker.len();
    log[start..].lines().next().unwrap().trim().to_string()
}

/// The Slurm job's state as `scontrol` reports it.
fn slurm_state(id: &str) -> String {
    let out = std::process::Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|f| f.strip_prefix("JobState="))
        .unwrap_or("UNKNOWN")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slurm_job_streams_live_output_and_runs_as_the_mapped_account() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(5)).await;
    start_slurm_agent(&mut fleet, &policy).await;
    let mut job_spec = spec(
        "echo \"user $(id -un)\"; echo \"$GREETING\"; echo to-stderr >&2; touch made-here; \
         stat -c 'owner %U' made-here; mkdir -p reports; \
         printf '<testsuite name=\"slurm\"><testcase classname=\"node\" name=\"ran\"/></testsuite>' \
         > reports/junit.xml; for i in 1 2 3 4 5 6; do echo tick $i; sleep 0.5; done",
    );
    // The result file is collected from the job's workspace once Slurm says the job ended.
    job_spec.results = vec!["reports/*.xml".into()];
    job_spec
        .env
        .insert("GREETING".into(), "hello from the compute node".into());
    let job = fleet.workflow(REPO).submit(&job_spec).await.unwrap();

    // Live: the first tick is in the broker's log while the job still runs.
    let early = wait_for("the first tick before the job ends", WAIT, || async {
        let job = fleet.client().job(job.id).await.unwrap();
        let log = fleet.log(job.id).await;
        log.contains(" O tick 1\n").then_some(job.state)
    })
    .await;
    assert_eq!(
        early,
        JobState::Running,
        "the first line came only at the end"
    );

    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    let out = testbot_e2e::stdout_lines(&log);
    assert_eq!(out[0], format!("user {JOB_ACCOUNT}"), "{log}");
    assert_eq!(out[1], "hello from the compute node");
    assert_eq!(out[2], format!("owner {JOB_ACCOUNT}"));
    assert_eq!(
        &out[3..],
        ["tick 1", "tick 2", "tick 3", "tick 4", "tick 5", "tick 6"]
    );
    assert!(log.contains(" E to-stderr\n"), "{log}");
    let slurm_id = slurm_job_id(&log);
    assert_eq!(slurm_state(&slurm_id), "COMPLETED");
    // Users see the Slurm job id with the job.
    assert_eq!(
        done.metadata.get("slurm_job_id").map(String::as_str),
        Some(slurm_id.as_str()),
        "{done:?}"
    );
    let results = fleet.client().job_results(job.id).await.unwrap();
    assert_eq!(
        (results.totals.cases, results.totals.passed),
        (1, 1),
        "{results:?}\n{log}"
    );
    assert_eq!(results.cases[0].test_id(), "slurm > node.ran");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exit_codes_cancel_and_refusals_before_sbatch() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(5)).await;
    start_slurm_agent(&mut fleet, &policy).await;

    let failing = fleet
        .workflow(REPO)
        .submit(&spec("echo about to fail; exit 3"))
        .await
        .unwrap();
    let long = fleet
        .workflow(REPO)
        .submit(&spec("echo started; sleep 300"))
        .await
        .unwrap();

    let (done, log) = fleet.finished(&failing).await;
    assert_eq!(
        (done.state, done.exit_code),
        (JobState::Failed, Some(3)),
        "{log}"
    );
    assert!(
        log.contains("Slurm job") && log.contains("ended FAILED with exit code 3:0"),
        "{log}"
    );

    // Cancel: scancel, and nothing stays queued or running in Slurm.
    wait_for("the long job to print", WAIT, || async {
        fleet
            .log(long.id)
            .await
            .contains(" O started\n")
            .then_some(())
    })
    .await;
    fleet.client().cancel(long.id).await.unwrap();
    let (done, log) = fleet.finished(&long).await;
    assert_eq!(done.state, JobState::Cancelled, "{log}");
    let slurm_id = slurm_job_id(&log);
    assert_eq!(slurm_state(&slurm_id), "CANCELLED");

    // Over the policy's caps, or a forbidden partition: refused before anything reaches sbatch.
    let over = JobSpec {
        resources: Resources {
            cpus: Some(16),
            ..Resources::default()
        },
        ..spec("true")
    };
    match fleet.workflow(REPO).submit(&over).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 422);
            assert!(
                message.ends_with("resources.cpus 16 is over the cap of 2 for executor slurm"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A partition carrying an option cannot even be expressed.
    let injected = JobSpec {
        resources: Resources {
            partition: Some("debug --uid=0".into()),
            ..Resources::default()
        },
        ..spec("true")
    };
    match fleet.workflow(REPO).submit(&injected).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(
                message.contains("resources.partition \"debug --uid=0\" is invalid"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Slurm reads SBATCH_* from the environment: a job may not set them (refused by the policy's
    // env allow-list here, which the site advertises so the broker refuses it at submission, and
    // by the executor itself without one).
    let mut sneaky = spec("true");
    sneaky.env.insert("SBATCH_PARTITION".into(), "batch".into());
    match fleet.workflow(REPO).submit(&sneaky).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 422);
            assert!(
                message.contains(
                    "environment variable SBATCH_PARTITION is not in the site's env_allow"
                ),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slurm_time_limit_ends_the_job_as_timed_out() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(5)).await;
    start_slurm_agent(&mut fleet, &policy).await;
    // Slurm's limits are whole minutes: --time=1 ends the job about a minute later.
    let job = fleet
        .workflow(REPO)
        .submit(&JobSpec {
            timeout_secs: Some(60),
            ..spec("echo waiting; sleep 600")
        })
        .await
        .unwrap();
    let done = fleet
        .wait_finished_within(job.id, Duration::from_secs(150))
        .await;
    let log = fleet.log(job.id).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    assert_eq!(done.reason.as_deref(), Some("timed out after 1m"), "{log}");
    assert!(log.contains("ended TIMEOUT"), "{log}");
    assert_eq!(done.cli_exit_code(), 124);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_restarts_and_re_attaches_to_its_slurm_job() {
    // A lease long enough to restart the agent within it.
    let (fleet, policy) = slurm_fleet(Duration::from_secs(20)).await;
    let extra = format!("executor = \"slurm\"\npolicy = \"{}\"\n", policy.display());
    let mut agent = fleet.spawn_agent("login1", &extra);
    fleet.wait_policy_agents(1).await;
    let job = fleet
        .workflow(REPO)
        .submit(&spec(SIXTEEN_LINES))
        .await
        .unwrap();
    let (_done, _agent) = fleet
        .kill_agent_and_check_reattach(&mut agent, "login1", &extra, &job)
        .await;
    let log = fleet.log(job.id).await;
    assert_eq!(log.matches("submitted to Slurm as job").count(), 1, "{log}");
    fleet.stop().await;
}

/// A file only root can read, of random text lines; returns its path and its lines.
fn root_only_secret(dir: &Path) -> (std::path::PathBuf, Vec<String>) {
    use std::os::unix::fs::PermissionsExt as _;
    let rng = ring::rand::SystemRandom::new();
    let lines: Vec<String> = (0..64)
        .map(|_| {
            let bytes: [u8; 16] = ring::rand::generate(&rng).unwrap().expose();
            hex::encode(bytes)
        })
        .collect();
    let path = dir.join("root-only.key");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, lines)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_swaps_its_log_for_a_symlink_does_not_get_the_target_read() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(5)).await;
    start_slurm_agent(&mut fleet, &policy).await;
    let (secret, secret_lines) = root_only_secret(fleet.dir.path());
    // The job owns its directory: it swaps the file Slurm writes its output to for a link to a
    // file only root (the agent) can read. Slurm goes on writing to the unlinked file.
    let script = format!(
        "echo before the swap; sleep 1; log=\"$TESTBOT_JOB_DIR/stdout.log\"; \
         test ! -r {secret}; rm \"$log\"; ln -s {secret} \"$log\"; \
         echo after the swap; sleep 2; echo done",
        secret = secret.display()
    );
    let job = fleet.workflow(REPO).submit(&spec(&script)).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    for line in &secret_lines {
        assert!(
            !log.contains(line.as_str()),
            "the secret reached the log:\n{log}"
        );
    }
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert!(log.contains(" O before the swap\n"), "{log}");
    assert!(
        log.contains(
            "testbot: stopped reading stdout.log: it is a symbolic link, not the file the job was given"
        ),
        "{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_swaps_its_log_for_a_fifo_can_still_be_cancelled() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(5)).await;
    start_slurm_agent(&mut fleet, &policy).await;
    // Opening a FIFO for reading waits for a writer: an agent that did so would hold the job's
    // slot for good, deaf to cancel and to the time limit.
    let script = "echo started; sleep 1; log=\"$TESTBOT_JOB_DIR/stdout.log\"; rm \"$log\"; \
                  mkfifo \"$log\"; touch \"$TESTBOT_JOB_DIR/swapped\"; sleep 300";
    let job = fleet.workflow(REPO).submit(&spec(script)).await.unwrap();
    let swapped = fleet
        .dir
        .path()
        .join(format!("agent-login1/jobs/job-{}-1/swapped", job.id));
    wait_for("the job to swap its log for a FIFO", WAIT, || async {
        swapped.exists().then_some(())
    })
    .await;
    fleet.client().cancel(job.id).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Cancelled, "{log}");
    assert_eq!(slurm_state(&slurm_job_id(&log)), "CANCELLED");
    assert!(
        log.contains("testbot: stopped reading stdout.log: it is a FIFO, not a regular file"),
        "{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forty_slurm_runs_find_the_test_that_fails_in_eight_flaky_with_its_rate_and_node() {
    let (mut fleet, policy) = slurm_fleet(Duration::from_secs(20)).await;
    let mut config = fleet.agent_config("login1");
    config.executor = testbot_agent::config::ExecutorKind::Slurm;
    config.policy = Some(policy.clone());
    config.concurrency = 4;
    fleet.add_agent(config);
    fleet.wait_policy_agents(1).await;
    let wobbly = testbot_e2e::forty_runs_find_the_flaky_test(
        &fleet,
        REPO,
        JobSpec {
            executor: Some("slurm".into()),
            ..JobSpec::default()
        },
    )
    .await;
    // Where each run ran is counted: the site, the agent and Slurm's node.
    use testbot_proto::test_results::Dimension;
    let node = wobbly
        .placements
        .iter()
        .find(|p| p.dimension == Dimension::Node)
        .unwrap_or_else(|| panic!("no node recorded: {wobbly:#?}"));
    assert_eq!((node.runs, node.failures), (40, 8), "{wobbly:#?}");
    assert!(wobbly.clusters.is_empty(), "{wobbly:#?}");
    fleet.stop().await;
}
