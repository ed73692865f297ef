//! A job's environment variables reach the job, never a program the agent runs as root.
//!
//! The attack: job 1, running as the site's unprivileged account, plants an executable called
//! `setpriv` (or `docker`, `podman`) in a directory it can write; job 2 sets `PATH` to put that
//! directory first (or `DOCKER_HOST` to point the engine's client elsewhere). If the agent
//! applied job 2's variables to the launcher it starts as root, the planted program would run as
//! root. Each planted program appends `id -u` to a marker file, so `0` in it means root ran it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testbot_agent::config::ExecutorKind;
use testbot_agent::executor::{Executor, JobContext, LogSink, ShellExecutor};
use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, ensure_account};
use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;
use tokio_util::sync::CancellationToken;

const REPO: &str = "hpc-lab/solver";
const IMAGE: &str = "localhost/testbot-busybox:1";

/// A directory every account can write, as `/tmp` is on a real host.
fn shared_dir(fleet: &Fleet) -> PathBuf {
    for dir in [
        fleet.dir.path().to_path_buf(),
        fleet.dir.path().join("shared"),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    fleet.dir.path().join("shared")
}

/// A script job 1 runs to plant `name` in `dir`: it records who ran it, then runs the real
/// program so nothing else looks wrong.
fn plant_script(dir: &Path, name: &str, real: &str) -> String {
    format!(
        "printf '#!/bin/sh\\nid -u >> {dir}/ran-as\\nexec {real} \"$@\"\\n' > {dir}/{name}; chmod 755 {dir}/{name}; echo planted",
        dir = dir.display()
    )
}

/// The uids the planted program ran as (empty if it never ran).
fn ran_as(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("ran-as"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn wide_policy(issuer: &str) -> String {
    format!(
        r#"
max_runtime = "10m"
env_allow = ["*"]

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.shell]

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
"#
    )
}

/// A site whose policy lets jobs set any variable (`env_allow = ["*"]`): job 2's `PATH` must not
/// reach the root launcher. The policy refuses `PATH` whatever the glob says.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_cannot_make_the_root_agent_run_a_program_planted_by_an_earlier_job() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let shared = shared_dir(&fleet);
    let policy = fleet.dir.path().join("policy.toml");
    std::fs::write(&policy, wide_policy(&fleet.issuer().url)).unwrap();
    let mut config = fleet.agent_config("login1");
    config.policy = Some(policy);
    fleet.add_agent(config);
    fleet.wait_policy_agents(1).await;

    let plant = JobSpec {
        script: plant_script(&shared, "setpriv", "/usr/bin/setpriv"),
        ..Default::default()
    };
    let job1 = fleet.workflow(REPO).submit(&plant).await.unwrap();
    let (done, log) = fleet.finished(&job1).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");

    let mut hostile = JobSpec {
        script: "echo job 2 ran as $(id -u)".into(),
        ..Default::default()
    };
    hostile.env.insert(
        "PATH".into(),
        format!("{}:/usr/local/bin:/usr/bin:/bin", shared.display()),
    );
    let job2 = fleet.workflow(REPO).submit(&hostile).await.unwrap();
    let (done, log) = fleet.finished(&job2).await;
    assert!(
        !ran_as(&shared).contains(&"0".to_string()),
        "the program job 1 planted ran as root: {:?}\n{log}",
        ran_as(&shared)
    );
    assert_eq!(done.state, JobState::Error, "{log}");
    assert!(
        log.contains("environment variable PATH is never allowed at this site"),
        "{log}"
    );
    fleet.stop().await;
}

/// An executor itself, handed a job whose variables no policy would allow (a compromised
/// broker talking to an agent without a policy, or a policy bug): the variables reach the job,
/// as its account, and nothing the agent starts as root. Job 1 plants `setpriv` and `bash`;
/// job 2 puts them first on its `PATH`.
async fn executor_applies_a_jobs_variables_only_after_switching_accounts(
    fleet: &Fleet,
    executor: std::sync::Arc<dyn Executor>,
) {
    let shared = shared_dir(fleet);
    let account = testbot_agent::identity::lookup_account(JOB_ACCOUNT).unwrap();
    let uid = account.uid.to_string();
    let context = |id: i64, spec: JobSpec| JobContext {
        id: JobId(id),
        attempt: 1,
        agent: "login1".into(),
        spec,
        timeout: Duration::from_secs(60),
        dir: fleet.dir.path().join(format!("job-{id}")),
        run_as: Some(account.clone()),
        keep_dir: false,
        lease: "lease".into(),
        heartbeat_interval_ms: 1000,
        batch: None,
    };
    let run = |job: JobContext| {
        let executor = executor.clone();
        async move {
            std::fs::create_dir_all(&job.dir).unwrap();
            let (sink, mut lines) = LogSink::new(1024);
            let outcome = executor
                .run(&job, sink, CancellationToken::new())
                .await
                .unwrap();
            executor.cleanup(&job).await;
            let mut out = Vec::new();
            while let Ok(line) = lines.try_recv() {
                out.push(line.text.trim_end().to_string());
            }
            (outcome, out)
        }
    };

    let (_, out) = run(context(
        9001,
        JobSpec {
            script: plant_script(&shared, "setpriv", "/usr/bin/setpriv")
                + "; "
                + &plant_script(&shared, "bash", "/bin/bash"),
            ..Default::default()
        },
    ))
    .await;
    assert!(out.contains(&"planted".to_string()), "{out:?}");

    let mut hostile = JobSpec {
        script: "echo \"ran as $(id -u) with $GREETING\"".into(),
        ..Default::default()
    };
    hostile.env.extend([
        (
            "PATH".to_string(),
            format!("{}:/usr/local/bin:/usr/bin:/bin", shared.display()),
        ),
        ("GREETING".to_string(), "hello".to_string()),
    ]);
    let (outcome, out) = run(context(9002, hostile)).await;
    assert!(
        !ran_as(&shared).contains(&"0".to_string()),
        "the planted program ran as root: {:?} {out:?}",
        ran_as(&shared)
    );
    assert_eq!(
        outcome,
        testbot_agent::executor::ExecOutcome::Exited(0),
        "{out:?}"
    );
    assert!(
        out.contains(&format!("ran as {uid} with hello")),
        "the job still gets its variables: {out:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shell_executor_applies_a_jobs_variables_only_after_switching_accounts() {
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start().await;
    let executor = ShellExecutor::new(Duration::from_secs(1), &fleet.dir.path().join("agent"));
    executor_applies_a_jobs_variables_only_after_switching_accounts(
        &fleet,
        std::sync::Arc::new(executor),
    )
    .await;
    fleet.stop().await;
}

/// Against the real Slurm: `sbatch` starts as the job's account, with the job's variables
/// (which `--export=ALL` hands to the batch script).
#[tokio::test(flavor = "multi_thread")]
async fn the_slurm_executor_applies_a_jobs_variables_only_after_switching_accounts() {
    let conf = std::env::var("SLURM_CONF").unwrap_or_default();
    assert!(
        !conf.is_empty() && Path::new(&conf).exists(),
        "SLURM_CONF is not set to a slurm.conf: start the test Slurm (scripts/test.sh does)"
    );
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start().await;
    let executor = testbot_agent::executor::SlurmExecutor {
        settings: Default::default(),
        records: testbot_agent::executor::records::JobRecords::new(
            fleet.dir.path().join("records"),
        ),
    };
    executor_applies_a_jobs_variables_only_after_switching_accounts(
        &fleet,
        std::sync::Arc::new(executor),
    )
    .await;
    fleet.stop().await;
}

/// The engine's client runs with the agent's environment, never the job's: a job's `PATH` does
/// not pick the client program and its `DOCKER_HOST` does not pick the engine, yet the job's
/// variables reach the container. The agent has no policy (a private fleet), which lets jobs
/// set any variable, so only the executor stands between the job and the client.
async fn container_client_ignores_the_jobs_environment(engine: &str, kind: ExecutorKind) {
    for var in ["DOCKER_HOST", "CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"] {
        assert!(
            std::env::var_os(var).is_some(),
            "{var} is not set: start the test engines (scripts/test.sh does)"
        );
    }
    let mut fleet = Fleet::start_with(|config| {
        config.settings.lease_ttl = Duration::from_secs(20);
    })
    .await;
    let shared = shared_dir(&fleet);
    let real = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join(engine))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{engine} is not on the PATH"));
    // What an earlier job would have left in a shared directory.
    let planted = shared.join(engine);
    std::fs::write(
        &planted,
        format!(
            "#!/bin/sh\nid -u >> {}/ran-as\nexec {} \"$@\"\n",
            shared.display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut config = fleet.agent_config("vm1");
    config.executor = kind;
    config.kill_grace = Duration::from_secs(1);
    fleet.add_agent(config);

    let mut hostile = JobSpec {
        script: "echo \"in the container: $DOCKER_HOST $CONTAINERS_CONF $PATH it's $GREETING\""
            .into(),
        executor: Some(engine.into()),
        image: Some(IMAGE.into()),
        ..Default::default()
    };
    let evil_socket = format!("unix://{}/evil.sock", shared.display());
    hostile.env.extend([
        (
            "PATH".to_string(),
            format!("{}:/usr/local/bin:/usr/bin:/bin", shared.display()),
        ),
        ("DOCKER_HOST".to_string(), evil_socket.clone()),
        (
            "CONTAINERS_CONF".to_string(),
            "/nonexistent/containers.conf".to_string(),
        ),
        ("GREETING".to_string(), "a 'quoted'\nvalue".to_string()),
    ]);
    let job = fleet.client().submit(&hostile).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert!(
        ran_as(&shared).is_empty(),
        "the planted {engine} ran: {:?}\n{log}",
        ran_as(&shared)
    );
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        [
            format!(
                "in the container: {evil_socket} /nonexistent/containers.conf {}:/usr/local/bin:/usr/bin:/bin it's a 'quoted'",
                shared.display()
            ),
            "value".to_string()
        ],
        "{log}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_docker_client_ignores_the_jobs_environment() {
    container_client_ignores_the_jobs_environment("docker", ExecutorKind::Docker).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_podman_client_ignores_the_jobs_environment() {
    container_client_ignores_the_jobs_environment("podman", ExecutorKind::Podman).await;
}
