//! The container executor against a real Docker engine and real rootful podman
//! (`tests/containers/start.sh`, which `scripts/test.sh` runs and which sets `DOCKER_HOST` and
//! `CONTAINERS_CONF`). Jobs run in the locally built `localhost/testbot-busybox:1` as the
//! unprivileged account the site policy maps them to.

use std::path::Path;
use std::time::Duration;

use testbot_agent::config::ExecutorKind;
use testbot_e2e::{
    AUDIENCE, Fleet, JOB_ACCOUNT, SIXTEEN_LINES, WAIT, ensure_account, refusal, wait_for,
};
use testbot_proto::jobs::{Job, JobSpec, JobState, Resources};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";
const IMAGE: &str = "localhost/testbot-busybox:1";

/// Fails at once, with the fix, when the engines are not running for the tests.
fn require_engines() {
    for var in ["DOCKER_HOST", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set: start the test engines with `eval \"$(tests/containers/start.sh)\"` (scripts/test.sh does)"
        );
    }
}

fn policy(issuer: &str) -> String {
    format!(
        r#"
max_concurrent_jobs = 4
max_runtime = "10m"
env_allow = ["GREETING"]

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.docker]
max_cpus = 2
max_memory = "256M"
max_time = "5m"
images = ["localhost/testbot-busybox:*"]
pull = "never"

[executors.podman]
max_cpus = 2
max_memory = "256M"
max_time = "5m"
images = ["localhost/testbot-busybox:*"]
pull = "never"

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
executors = ["docker", "podman"]
"#
    )
}

async fn container_fleet() -> (Fleet, std::path::PathBuf) {
    require_engines();
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start_oidc(|config| {
        config.settings.lease_ttl = Duration::from_secs(20);
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

fn add_agent(fleet: &mut Fleet, policy: &Path, kind: ExecutorKind, name: &str) {
    let mut config = fleet.agent_config(name);
    config.executor = kind;
    config.policy = Some(policy.to_path_buf());
    config.kill_grace = Duration::from_secs(1);
    fleet.add_agent(config);
}

fn job(engine: &str, script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        executor: Some(engine.into()),
        image: Some(IMAGE.into()),
        ..Default::default()
    }
}

/// Containers the engine still has for a job.
fn containers_of(engine: &str, job: &Job) -> String {
    let out = std::process::Command::new(engine)
        .args([
            "ps",
            "--all",
            "--filter",
            &format!("label=testbot.job={}", job.id),
            "--format",
            "{{.Names}}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The agent removes a job's container right after reporting its result.
async fn no_container_left(engine: &str, job: &Job) {
    wait_for("the job's container to be removed", WAIT, || async {
        containers_of(engine, job).is_empty().then_some(())
    })
    .await
}

async fn exit_codes_ownership_network_and_cancel(engine: &str, kind: ExecutorKind) {
    let (mut fleet, policy) = container_fleet().await;
    add_agent(&mut fleet, &policy, kind, "vm1");
    fleet.wait_policy_agents(1).await;
    let uid = nix::unistd::User::from_name(JOB_ACCOUNT)
        .unwrap()
        .unwrap()
        .uid;

    // Success: output, the mapped uid, files in the job directory owned by it.
    let mut ok = job(
        engine,
        "id -u; echo \"$GREETING\"; echo made > made; ls -ln made | awk '{print \"owner \" $3}'; echo to-stderr >&2",
    );
    ok.env
        .insert("GREETING".into(), "hello from the container".into());
    let submitted = fleet.workflow(REPO).submit(&ok).await.unwrap();
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    let out = testbot_e2e::stdout_lines(&log);
    assert_eq!(
        out,
        [
            uid.to_string(),
            "hello from the container".to_string(),
            format!("owner {uid}")
        ],
        "{log}"
    );
    assert!(log.contains(" E to-stderr\n"), "{log}");
    no_container_left(engine, &done).await;

    // Failure: the exit code; the result file written in the container is collected anyway.
    let mut failing = job(
        engine,
        "echo failing; printf '<testsuite><testcase name=\"t\"><failure message=\"no\"/></testcase></testsuite>' > junit.xml; exit 3",
    );
    failing.results = vec!["junit.xml".into()];
    let failing = fleet.workflow(REPO).submit(&failing).await.unwrap();
    let (done, log) = fleet.finished(&failing).await;
    assert_eq!(
        (done.state, done.exit_code),
        (JobState::Failed, Some(3)),
        "{log}"
    );
    let results = fleet.client().job_results(failing.id).await.unwrap();
    assert_eq!(
        (results.totals.cases, results.totals.failed),
        (1, 1),
        "{results:?}\n{log}"
    );

    // The network is off: the container has only its own loopback, and a port listening on
    // the host's 127.0.0.1 cannot be reached.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let probe = fleet.workflow(REPO)
        .submit(&job(
            engine,
            &format!(
                "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; \
                 if echo hello | nc -w 2 127.0.0.1 {port}; then echo reached; else echo no network; exit 7; fi"
            ),
        ))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&probe).await;
    drop(listener);
    assert_eq!(done.exit_code, Some(7), "{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        ["lo", "no network"],
        "{log}"
    );

    // An image the site does not allow is refused before anything runs.
    let mut evil = job(engine, "true");
    evil.image = Some("docker.io/library/evil:latest".into());
    let (status, message) = refusal(fleet.workflow(REPO).submit(&evil).await);
    assert_eq!(status, 422);
    assert!(
        message.contains("image docker.io/library/evil:latest is not in allowed images"),
        "{message}"
    );

    // Cancel: the container is stopped and removed.
    let long = fleet
        .workflow(REPO)
        .submit(&job(engine, "echo started; sleep 300"))
        .await
        .unwrap();
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
    no_container_left(engine, &done).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_exit_codes_ownership_network_and_cancel() {
    exit_codes_ownership_network_and_cancel("docker", ExecutorKind::Docker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_exit_codes_ownership_network_and_cancel() {
    exit_codes_ownership_network_and_cancel("podman", ExecutorKind::Podman).await;
}

async fn memory_limit(engine: &str, kind: ExecutorKind) {
    let (mut fleet, policy) = container_fleet().await;
    add_agent(&mut fleet, &policy, kind, "vm1");
    fleet.wait_policy_agents(1).await;
    let hog = JobSpec {
        resources: Resources {
            memory_mib: Some(32),
            ..Resources::default()
        },
        // Holds 200 MiB in memory: far over the 32 MiB limit.
        ..job(
            engine,
            "echo allocating; x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo survived ${#x}",
        )
    };
    let submitted = fleet.workflow(REPO).submit(&hog).await.unwrap();
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.starts_with("out of memory") && reason.contains("memory limit of 32 MiB"),
        "{reason}\n{log}"
    );
    assert!(!log.contains("survived"), "{log}");
    fleet.stop().await;
}

/// A cap limits every job, not only those that ask: a container of a job that asks for no
/// memory is limited to the site's `max_memory` (256M), not unlimited.
async fn caps_limit_a_job_that_asks_for_nothing(engine: &str, kind: ExecutorKind) {
    let (mut fleet, policy) = container_fleet().await;
    add_agent(&mut fleet, &policy, kind, "vm1");
    fleet.wait_policy_agents(1).await;
    let submitted = fleet
        .workflow(REPO)
        .submit(&job(
            engine,
            "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
        ))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        [(256u64 << 20).to_string()],
        "{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_caps_limit_a_job_that_asks_for_nothing() {
    caps_limit_a_job_that_asks_for_nothing("docker", ExecutorKind::Docker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_caps_limit_a_job_that_asks_for_nothing() {
    caps_limit_a_job_that_asks_for_nothing("podman", ExecutorKind::Podman).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_memory_limit_is_enforced_and_reported() {
    memory_limit("docker", ExecutorKind::Docker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_memory_limit_is_enforced_and_reported() {
    memory_limit("podman", ExecutorKind::Podman).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_agent_restarts_and_re_attaches_to_its_container() {
    let (fleet, policy) = container_fleet().await;
    let extra = format!("executor = \"docker\"\npolicy = \"{}\"\n", policy.display());
    let mut agent = fleet.spawn_agent("vm1", &extra);
    fleet.wait_policy_agents(1).await;
    let submitted = fleet
        .workflow(REPO)
        .submit(&job("docker", SIXTEEN_LINES))
        .await
        .unwrap();
    let (done, _agent) = fleet
        .kill_agent_and_check_reattach(&mut agent, "vm1", &extra, &submitted)
        .await;
    no_container_left("docker", &done).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn at_start_up_an_agent_removes_containers_of_jobs_it_no_longer_knows() {
    let (mut fleet, policy) = container_fleet().await;
    // A container this agent left behind, for a job it has no record of (a crash at the wrong
    // moment, or a lost state directory).
    let instance = testbot_agent::executor::ContainerExecutor::instance_of(
        &testbot_e2e::state_dir_beside(&fleet.dir.path().join("agent-vm1")),
    );
    let stray = format!("testbot-{instance}-job-999-1");
    let started = std::process::Command::new("docker")
        .args([
            "run",
            "--detach",
            "--name",
            &stray,
            "--label",
            &format!("testbot.agent={instance}"),
            "--label",
            "testbot.job=999",
            "--network",
            "none",
            IMAGE,
            "sleep",
            "300",
        ])
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    add_agent(&mut fleet, &policy, ExecutorKind::Docker, "vm1");
    wait_for("the stray container to be removed", WAIT, || async {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "--all",
                "--filter",
                &format!("name={stray}"),
                "--format",
                "{{.Names}}",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .is_empty()
            .then_some(())
    })
    .await;
    fleet.stop().await;
}

/// A secret variable reaches the container's script, but neither the container's configuration
/// (what `docker inspect` shows any user of the engine) nor the log.
#[tokio::test(flavor = "multi_thread")]
async fn a_docker_job_receives_its_secret_which_stays_out_of_the_container_config_and_log() {
    const VALUE: &str = "hello-secret-0c5e";
    let (mut fleet, policy) = container_fleet().await;
    add_agent(&mut fleet, &policy, ExecutorKind::Docker, "vm1");
    fleet.wait_policy_agents(1).await;
    let mut spec = job(
        "docker",
        &format!(
            "echo \"$GREETING\"; echo \"got:$GREETING:end\"; {}; sleep 4",
            testbot_e2e::check_value("GREETING", VALUE)
        ),
    );
    spec.env.insert("GREETING".into(), VALUE.into());
    spec.secret_env.push("GREETING".into());
    let submitted = fleet.workflow(REPO).submit(&spec).await.unwrap();
    assert_eq!(submitted.spec.env["GREETING"], "***");
    wait_for("the job to print", WAIT, || async {
        fleet
            .log(submitted.id)
            .await
            .contains(" O received whole\n")
            .then_some(())
    })
    .await;
    let instance = testbot_agent::executor::ContainerExecutor::instance_of(
        &testbot_e2e::state_dir_beside(&fleet.dir.path().join("agent-vm1")),
    );
    let name = format!("testbot-{instance}-job-{}-1", submitted.id);
    let inspect = std::process::Command::new("docker")
        .args(["inspect", &name])
        .output()
        .unwrap();
    let inspect = String::from_utf8_lossy(&inspect.stdout).to_string();
    assert!(inspect.contains("TESTBOT_JOB_ID"), "{inspect}");
    assert!(!inspect.contains(VALUE), "{inspect}");
    let (done, log) = fleet.finished(&submitted).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        ["***", "got:***:end", "received whole"],
        "{log}"
    );
    assert!(!log.contains(VALUE), "{log}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forty_docker_runs_find_the_test_that_fails_in_eight_flaky_with_its_rate() {
    let (mut fleet, policy) = container_fleet().await;
    add_agent(&mut fleet, &policy, ExecutorKind::Docker, "vm1");
    fleet.wait_policy_agents(1).await;
    let wobbly =
        testbot_e2e::forty_runs_find_the_flaky_test(&fleet, REPO, job("docker", "true")).await;
    use testbot_proto::test_results::Dimension;
    assert!(
        wobbly
            .placements
            .iter()
            .any(|p| p.dimension == Dimension::Image && p.value == IMAGE && p.runs == 40),
        "{wobbly:#?}"
    );
    fleet.stop().await;
}
