//! Who gets which job: the broker routes on what it knows of an agent (its enrolled site, its
//! executor, its advertised policy), never on labels an agent makes up, and an agent runs only
//! what it asked for whatever the broker sends.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, WAIT, ensure_account, refusal, wait_for};
use testbot_proto::agents::PollRequest;
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

fn spec(script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        ..Default::default()
    }
}

/// A poll as an agent with no site policy sends it, from JSON so every field not named keeps
/// its default.
fn poll(agent: &str, labels: &[&str]) -> PollRequest {
    serde_json::from_value(json!({
        "agent": agent, "labels": labels, "executor": "shell", "wait_ms": 0,
    }))
    .expect("poll request")
}

/// A site policy admitting `repositories` on `refs` (any ref when empty), shell only, as the
/// test job account.
fn write_policy(
    dir: &Path,
    file: &str,
    issuer: &str,
    repositories: &[&str],
    refs: &[&str],
) -> PathBuf {
    let identity = format!("default_account = \"{JOB_ACCOUNT}\"");
    write_policy_with(dir, file, issuer, repositories, refs, 4, &identity)
}

/// [`write_policy`] with `max_concurrent_jobs` and the `[identity]` table's body.
fn write_policy_with(
    dir: &Path,
    file: &str,
    issuer: &str,
    repositories: &[&str],
    refs: &[&str],
    max_concurrent_jobs: u32,
    identity: &str,
) -> PathBuf {
    let path = dir.join(file);
    let refs = if refs.is_empty() {
        String::new()
    } else {
        format!("refs = {refs:?}\n")
    };
    std::fs::write(
        &path,
        format!(
            r#"
max_concurrent_jobs = {max_concurrent_jobs}

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.shell]

[identity]
{identity}

[[rules]]
name = "ci"
repositories = {repositories:?}
{refs}events = ["push"]
"#
        ),
    )
    .unwrap();
    path
}

async fn register(fleet: &Fleet, repos: &[&str]) {
    for repo in repos {
        fleet
            .client()
            .register_repo(&RepoRegistration {
                name: repo.to_string(),
                ..RepoRegistration::default()
            })
            .await
            .unwrap();
    }
}

/// An agent of site B that offers the label `site:site-a` is refused, and site A gets the job.
#[tokio::test(flavor = "multi_thread")]
async fn a_forged_site_label_is_refused_and_the_site_gets_its_job() {
    let fleet = Fleet::start().await;
    let a = fleet.enroll_in("site-a", "a1").await;
    let b = fleet.enroll_in("site-b", "b1").await;
    let job = fleet
        .client()
        .submit(&JobSpec {
            labels: vec!["site:site-a".into()],
            ..spec("echo secret work")
        })
        .await
        .unwrap();

    let (status, message) = refusal(b.client.poll(&poll("b1", &["site:site-a"])).await);
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("site:"), "{message}");
    assert!(
        b.client.poll(&poll("b1", &[])).await.unwrap().is_none(),
        "site B must not get site A's job"
    );
    let got = a.client.poll(&poll("a1", &[])).await.unwrap();
    assert_eq!(got.map(|g| g.job_id), Some(job.id), "site A gets its job");
    fleet.stop().await;
}

/// On a broker that accepts workflow tokens, an agent without a site policy takes operator jobs
/// only, unless its configuration says otherwise in so many words.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_a_policy_takes_operator_jobs_only() {
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["attacker/x"]).await;
    fleet.add_agent(fleet.agent_config("plain"));
    fleet.wait_enrolled(1).await;
    let marker = fleet.dir.path().join("attacker-ran");
    let attack = spec(&format!("touch {}", marker.display()));

    let submitted = fleet.workflow("attacker/x").submit(&attack).await;
    let operator = fleet.submit("echo operator job").await;
    let done = fleet.wait_finished(operator.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    match submitted {
        Err(err) => {
            let (status, message) = refusal::<()>(Err(err));
            assert_eq!(status, 422, "{message}");
            assert!(message.contains("operator jobs only"), "{message}");
        }
        Ok(job) => {
            let job = fleet.client().job(job.id).await.unwrap();
            assert_eq!(
                job.state,
                JobState::Queued,
                "a policy-less agent took {job:?}"
            );
        }
    }
    assert!(
        !marker.exists(),
        "a workflow job ran on an agent without a site policy"
    );

    // An agent whose configuration opts in takes them.
    let mut opted_in = fleet.spawn_agent("opted-in", "allow_workflow_jobs_without_policy = true");
    fleet.wait_enrolled(2).await;
    let client = fleet.client();
    wait_for("the opted-in agent to poll", WAIT, || async {
        let agents = client.agents().await.ok()?.agents;
        agents
            .iter()
            .any(|a| a.name == "opted-in" && a.last_seen_ms.is_some())
            .then_some(())
    })
    .await;
    let job = fleet
        .workflow("attacker/x")
        .submit(&JobSpec {
            labels: vec![],
            ..spec("echo allowed")
        })
        .await
        .unwrap();
    let done = fleet.wait_finished(job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.agent.as_deref(), Some("test-site/opted-in"));
    opted_in.kill9().await;
    fleet.stop().await;
}

/// `testbot run --executor slurm` on `testbot up` (one shell agent): the job waits, and
/// `testbot status` says why; it never runs in the shell.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_asking_for_slurm_never_runs_in_the_shell() {
    let dir = tempfile::tempdir().unwrap();
    let port = testbot_e2e::free_port();
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{port}");
    let _up = testbot_e2e::Process::spawn(
        "testbot",
        &[
            "up",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[],
        dir.path(),
    )
    .unwrap();
    let token_file = data.join("admin.token");
    let token = wait_for("testbot up to write its token", WAIT, || async {
        std::fs::read_to_string(&token_file)
            .ok()
            .filter(|t| !t.trim().is_empty())
    })
    .await;
    let url = format!("http://{listen}");
    let testbot = |args: Vec<String>| {
        let out = tokio::process::Command::new(testbot_e2e::bin_path("testbot"))
            .args(args)
            .env("TESTBOT_URL", &url)
            .env("TESTBOT_TOKEN", token.trim())
            .kill_on_drop(true)
            .output();
        async move {
            tokio::time::timeout(WAIT, out)
                .await
                .expect("testbot exits")
                .expect("testbot runs")
        }
    };
    let marker = dir.path().join("ran-in-the-shell");
    let out = testbot(vec![
        "submit".into(),
        "--executor".into(),
        "slurm".into(),
        "--".into(),
        format!("touch {}", marker.display()),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // The shell agent is up and taking work: a shell job runs.
    let out = testbot(vec!["run".into(), "--".into(), "echo shell job".into()]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "shell job\n");

    let out = testbot(vec!["status".into(), id.clone()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("job {id}: queued")), "{text}");
    assert!(
        text.contains("executor slurm"),
        "status says why it waits: {text}"
    );

    // `testbot run` says so too while it waits.
    let logs = dir.path().join("run-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let touch = format!("touch {}", marker.display());
    let run = testbot_e2e::Process::spawn(
        "testbot",
        &["run", "--executor", "slurm", "--", &touch],
        &[
            ("TESTBOT_URL", url.as_str()),
            ("TESTBOT_TOKEN", token.trim()),
        ],
        &logs,
    )
    .unwrap();
    let stderr = logs.join(format!("{}.err", run.name));
    let line = wait_for("testbot run to say why the job waits", WAIT, || async {
        std::fs::read_to_string(&stderr)
            .ok()
            .filter(|t| t.contains("is still queued"))
    })
    .await;
    assert!(
        line.contains("the job asks for executor slurm; this agent runs shell"),
        "{line}"
    );
    drop(run);
    assert!(!marker.exists(), "a slurm job ran in the shell");
}

/// Site A's agent is stopped with 300 of its jobs queued (more than a claim reads at a time); a
/// job only site B admits still runs.
#[tokio::test(flavor = "multi_thread")]
async fn one_sites_backlog_does_not_starve_another_site() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["climate/model", "physics/sim"]).await;
    let issuer = fleet.issuer().url.clone();
    let dir = fleet.dir.path().to_path_buf();
    let mut a = fleet.agent_config("a1");
    a.enrollment_token = Some(fleet.site_enrollment_token("site-a").await);
    a.policy = Some(write_policy(&dir, "a.toml", &issuer, &["climate/*"], &[]));
    let a = fleet.add_agent(a);
    let mut b = fleet.agent_config("b1");
    b.enrollment_token = Some(fleet.site_enrollment_token("site-b").await);
    b.policy = Some(write_policy(&dir, "b.toml", &issuer, &["physics/*"], &[]));
    fleet.add_agent(b);
    fleet.wait_policy_agents(2).await;
    fleet.agent_shutdown(a).drain.cancel();
    fleet.agent_exit(a).await.unwrap();

    for _ in 0..300 {
        fleet
            .workflow("climate/model")
            .submit(&spec("echo climate"))
            .await
            .unwrap();
    }
    let physics = fleet
        .workflow("physics/sim")
        .submit(&spec("echo physics"))
        .await
        .unwrap();
    let done = fleet.wait_finished(physics.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.agent.as_deref(), Some("site-b/b1"));
    fleet.stop().await;
}

/// Two sites: A admits only `refs/heads/main`, B any ref. Feature-branch jobs all go to B and
/// succeed; none ends refused at A.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_a_site_would_refuse_go_to_the_site_that_accepts_them() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["hpc-lab/solver"]).await;
    let issuer = fleet.issuer().url.clone();
    let dir = fleet.dir.path().to_path_buf();
    let mut a = fleet.agent_config("a1");
    a.enrollment_token = Some(fleet.site_enrollment_token("site-a").await);
    a.policy = Some(write_policy(
        &dir,
        "a.toml",
        &issuer,
        &["hpc-lab/*"],
        &["refs/heads/main"],
    ));
    fleet.add_agent(a);
    let mut b = fleet.agent_config("b1");
    b.enrollment_token = Some(fleet.site_enrollment_token("site-b").await);
    b.policy = Some(write_policy(&dir, "b.toml", &issuer, &["hpc-lab/*"], &[]));
    fleet.add_agent(b);
    fleet.wait_policy_agents(2).await;

    let issuer = fleet.issuer();
    let mut jobs = Vec::new();
    for _ in 0..20 {
        let mut claims = issuer.claims("hpc-lab/solver", AUDIENCE);
        claims["ref"] = "refs/heads/feature".into();
        let job = fleet
            .client_with(&issuer.mint(&claims))
            .submit(&spec("echo feature"))
            .await
            .unwrap();
        jobs.push(job);
    }
    for job in jobs {
        let (done, log) = fleet.finished(&job).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
        assert_eq!(done.agent.as_deref(), Some("site-b/b1"), "{done:?}");
    }
    fleet.stop().await;
}

/// The issuer's key set cannot be fetched once when the agent verifies a job's token: the job
/// goes back to the queue and then succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_key_fetch_puts_the_job_back() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["hpc-lab/solver"]).await;
    // The broker fetches the key set now, the agent only when it gets its first job.
    let warm = fleet
        .workflow("hpc-lab/solver")
        .job(testbot_proto::jobs::JobId(1))
        .await;
    assert_eq!(refusal(warm).0, 404);
    let issuer = fleet.issuer().url.clone();
    let mut config = fleet.agent_config("a1");
    config.policy = Some(write_policy(
        fleet.dir.path(),
        "policy.toml",
        &issuer,
        &["hpc-lab/*"],
        &[],
    ));
    fleet.add_agent(config);
    fleet.wait_policy_agents(1).await;
    fleet.issuer().fail_jwks_requests(1);

    let job = fleet
        .workflow("hpc-lab/solver")
        .submit(&spec("echo verified"))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    assert!(log.contains("released"), "{log}");
    fleet.stop().await;
}

/// A site's `max_concurrent_jobs` counts the jobs of all its agents, not of each one.
#[tokio::test(flavor = "multi_thread")]
async fn max_concurrent_jobs_counts_every_agent_of_the_site() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["hpc-lab/solver"]).await;
    let issuer = fleet.issuer().url.clone();
    let dir = fleet.dir.path().to_path_buf();
    let identity = format!("default_account = \"{JOB_ACCOUNT}\"");
    let policy = write_policy_with(&dir, "one.toml", &issuer, &["hpc-lab/*"], &[], 1, &identity);
    for name in ["a1", "a2"] {
        let mut config = fleet.agent_config(name);
        config.policy = Some(policy.clone());
        config.concurrency = 2;
        fleet.add_agent(config);
    }
    fleet.wait_policy_agents(2).await;
    let mut jobs = Vec::new();
    for _ in 0..4 {
        jobs.push(
            fleet
                .workflow("hpc-lab/solver")
                .submit(&spec("sleep 0.5"))
                .await
                .unwrap(),
        );
    }
    let mut spans = Vec::new();
    for job in &jobs {
        let (done, log) = fleet.finished(job).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
        spans.push((
            done.started_at_ms.unwrap(),
            done.finished_at_ms.unwrap(),
            done.agent,
        ));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "two jobs ran at once at a site with max_concurrent_jobs = 1: {spans:?}"
        );
    }
    fleet.stop().await;
}

/// A refusal the summary cannot foresee (no local account for the job's actor at site A): the
/// job goes to site B, which maps it; with no other site, it ends `error` with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_job_goes_to_another_site_or_ends_with_the_reason() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, &["hpc-lab/solver"]).await;
    let issuer = fleet.issuer().url.clone();
    let dir = fleet.dir.path().to_path_buf();
    let alice_only = format!("[[identity.map]]\nactor = \"alice\"\naccount = \"{JOB_ACCOUNT}\"");
    let mut a = fleet.agent_config("a1");
    a.enrollment_token = Some(fleet.site_enrollment_token("site-a").await);
    a.policy = Some(write_policy_with(
        &dir,
        "a.toml",
        &issuer,
        &["hpc-lab/*"],
        &[],
        4,
        &alice_only,
    ));
    fleet.add_agent(a);
    fleet.wait_policy_agents(1).await;

    let job = fleet
        .workflow("hpc-lab/solver")
        .submit(&spec("echo unmapped"))
        .await
        .unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Error, "{done:?}\n{log}");
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.starts_with("refused by agent site-a/a1: ")
            && reason.contains("no local account is mapped for actor octocat")
            && reason.ends_with("; no other enrolled agent may take this job"),
        "{reason}"
    );

    let mut b = fleet.agent_config("b1");
    b.enrollment_token = Some(fleet.site_enrollment_token("site-b").await);
    b.policy = Some(write_policy(&dir, "b.toml", &issuer, &["hpc-lab/*"], &[]));
    fleet.add_agent(b);
    fleet.wait_policy_agents(2).await;
    let mut jobs = Vec::new();
    for _ in 0..6 {
        jobs.push(
            fleet
                .workflow("hpc-lab/solver")
                .submit(&spec("echo mapped at b"))
                .await
                .unwrap(),
        );
    }
    for job in jobs {
        let (done, log) = fleet.finished(&job).await;
        assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
        assert_eq!(done.agent.as_deref(), Some("site-b/b1"));
        assert_eq!(done.attempts, 1, "a hand-back uses up no attempt: {done:?}");
    }
    fleet.stop().await;
}

/// What a (compromised) broker hands out, and what the agent reported for each.
#[derive(Clone, Default)]
struct FakeBroker {
    queue: Arc<Mutex<Vec<Value>>>,
    /// (job id, action, body) of every finish and release.
    reports: Arc<Mutex<Vec<(u64, String, Value)>>>,
}

async fn serve_fake_broker(fake: FakeBroker) -> (String, tokio::task::JoinHandle<()>) {
    use axum::Json;
    use axum::extract::{Path as UrlPath, State};
    use axum::response::IntoResponse as _;
    let app = axum::Router::new()
        .route(
            "/api/v1/agent/enroll",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::CREATED,
                    Json(json!({"agent_id": "agt_fake", "site": "fake"})),
                )
            }),
        )
        .route(
            "/api/v1/agent/poll",
            axum::routing::post(|State(fake): State<FakeBroker>| async move {
                let next = fake.queue.lock().unwrap().pop();
                match next {
                    Some(job) => Json(job).into_response(),
                    None => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        axum::http::StatusCode::NO_CONTENT.into_response()
                    }
                }
            }),
        )
        .route(
            "/api/v1/agent/jobs/{id}/{action}",
            axum::routing::post(
                |State(fake): State<FakeBroker>,
                 UrlPath((id, action)): UrlPath<(u64, String)>,
                 Json(body): Json<Value>| async move {
                    match action.as_str() {
                        "release" => {
                            fake.reports.lock().unwrap().push((id, action, body));
                            Json(json!({"state": "queued", "reason": "handed back"}))
                        }
                        "finish" => {
                            fake.reports.lock().unwrap().push((id, action, body));
                            Json(json!({"id": id, "spec": {"script": "x"}, "state": "error",
                                "attempts": 1, "log_bytes": 0, "created_at_ms": 0}))
                        }
                        "log" => {
                            Json(json!({"log_bytes": body["data"].as_str().unwrap_or("").len()}))
                        }
                        _ => Json(json!({"cancel_requested": false, "lease_ttl_ms": 30000})),
                    }
                },
            ),
        )
        .with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, server)
}

/// An agent without a site policy does not take the broker's word: it refuses a workflow job
/// (it takes operator jobs only) and a job asking for another executor than its own.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_less_agent_refuses_what_it_did_not_ask_for() {
    let issuer = testbot_e2e::oidc::TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let touch = format!("touch {}", marker.display());
    let job = |id: u64, token: Option<String>, executor: Option<&str>| {
        json!({
            "job_id": id, "attempt": 1, "lease": format!("lease-{id}"),
            "lease_ttl_ms": 30000, "heartbeat_interval_ms": 1000, "log_offset": 0,
            "spec": {"script": touch, "executor": executor}, "oidc_token": token,
        })
    };
    let fake = FakeBroker::default();
    *fake.queue.lock().unwrap() = vec![
        job(2, None, Some("slurm")),
        job(
            1,
            Some(issuer.mint(&issuer.claims("attacker/x", AUDIENCE))),
            None,
        ),
    ];
    let (url, server) = serve_fake_broker(fake.clone()).await;
    let mut config = testbot_agent::AgentConfig::new(
        url,
        secrecy::SecretString::from("tbe_fake".to_string()),
        dir.path().join("agent"),
    );
    config.name = Some("plain".into());
    let shutdown = testbot_agent::Shutdown::default();
    let agent = tokio::spawn(
        testbot_agent::Agent::new(config)
            .unwrap()
            .run(shutdown.clone()),
    );
    let reports = wait_for("the agent to report both jobs", WAIT, || async {
        let reports = fake.reports.lock().unwrap().clone();
        (reports.len() == 2).then_some(reports)
    })
    .await;
    shutdown.drain.cancel();
    agent.await.unwrap().unwrap();
    server.abort();
    assert!(!marker.exists(), "the agent ran a job it did not ask for");
    for (id, action, body) in reports {
        let text = body.to_string();
        match id {
            1 => assert!(
                text.contains("operator jobs only"),
                "job 1 ({action}): {text}"
            ),
            _ => assert!(text.contains("executor slurm"), "job 2 ({action}): {text}"),
        }
    }
}
