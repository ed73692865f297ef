//! The agent's own checks, end to end: it verifies each job's OIDC token itself, applies its
//! site policy, and runs allowed jobs as the mapped local account, never as root. A broker that
//! hands it a forbidden job (a compromised broker) gets a refusal and nothing runs.

use std::path::Path;
use std::sync::{Arc, Mutex};

use testbot_e2e::{AUDIENCE, Fleet, TEST_SITE, WAIT, ensure_account, wait_for};
use testbot_proto::client::ClientError;
use testbot_proto::jobs::{JobSpec, JobState, Resources};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";
use testbot_e2e::JOB_ACCOUNT;

fn write_policy(dir: &Path, issuer: &str) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
max_concurrent_jobs = 2
max_runtime = "10m"
env_allow = ["GREETING"]

[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.shell]
max_cpus = 4
max_time = "5m"

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "main-branch"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
executors = ["shell"]
"#
        ),
    )
    .unwrap();
    path
}

fn spec(script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_jobs_run_as_the_mapped_account_and_denied_ones_never_run() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    let operator = fleet.client();
    for repo in [REPO, "elsewhere/tool"] {
        operator
            .register_repo(&RepoRegistration {
                name: repo.into(),
                ..RepoRegistration::default()
            })
            .await
            .unwrap();
    }
    let policy = write_policy(fleet.dir.path(), &fleet.issuer().url);
    let mut config = fleet.agent_config("login1");
    config.policy = Some(policy);
    fleet.add_agent(config);
    fleet.wait_policy_agents(1).await;

    let issuer = fleet.issuer();
    let marker = fleet.dir.path().join("denied-job-ran");
    // Allowed: push to main. It runs as the mapped account; its files belong to that account.
    let token = issuer.mint(&issuer.claims(REPO, AUDIENCE));
    let workflow = fleet.client_with(&token);
    let mut allowed = spec("id -un; touch out; stat -c 'owner %U' out; echo \"$GREETING\"");
    allowed
        .env
        .insert("GREETING".into(), "hello from the site".into());
    let job = workflow.submit(&allowed).await.unwrap();
    let done = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    let out = testbot_e2e::stdout_lines(&log);
    assert_eq!(
        out,
        [
            JOB_ACCOUNT.to_string(),
            format!("owner {JOB_ACCOUNT}"),
            "hello from the site".to_string()
        ],
        "{log}"
    );

    // A ref the site's rules do not allow: the advertised rules carry the refs, so the broker
    // refuses it at submission rather than routing it to a site that would refuse it.
    let mut claims = issuer.claims(REPO, AUDIENCE);
    claims["ref"] = "refs/heads/experiment".into();
    match fleet
        .client_with(&issuer.mint(&claims))
        .submit(&spec(&format!("touch {}", marker.display())))
        .await
    {
        Err(ClientError::Api {
            status: 422,
            message,
            ..
        }) => assert_eq!(
            message,
            format!(
                "no site accepts this job: site {TEST_SITE} (agent login1): ref refs/heads/experiment is not in allowed refs [refs/heads/main] (rule \"main-branch\")"
            )
        ),
        other => panic!("expected 422, got {other:?}"),
    }
    assert!(!marker.exists(), "a denied job ran");

    // Refused at the broker, because no site's advertised policy accepts them.
    let refusals = [
        (
            issuer.mint(&issuer.claims("elsewhere/tool", AUDIENCE)),
            spec("true"),
            format!(
                "no site accepts this job: site {TEST_SITE} (agent login1): repository elsewhere/tool is not allowed"
            ),
        ),
        (
            issuer.mint(&issuer.claims(REPO, AUDIENCE)),
            JobSpec {
                resources: Resources {
                    cpus: Some(64),
                    ..Resources::default()
                },
                ..spec("true")
            },
            format!(
                "no site accepts this job: site {TEST_SITE} (agent login1): resources.cpus 64 is over the cap of 4 for executor shell"
            ),
        ),
    ];
    for (token, spec, message) in refusals {
        match fleet.client_with(&token).submit(&spec).await {
            Err(ClientError::Api {
                status: 422,
                message: got,
                ..
            }) => assert_eq!(got, message),
            other => panic!("expected 422 {message:?}, got {other:?}"),
        }
    }
    fleet.stop().await;
}

/// One job a compromised broker hands out, and what the agent reported for it.
#[derive(Clone, Debug, Default)]
struct Reported {
    state: Option<String>,
    reason: Option<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_refuses_what_a_compromised_broker_sends() {
    use axum::Json;
    use axum::extract::{Path as UrlPath, State};
    use serde_json::{Value, json};

    ensure_account(JOB_ACCOUNT);
    let issuer = testbot_e2e::oidc::TestIssuer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let touch = format!("touch {}", marker.display());

    // Jobs the site's policy forbids, each with a token a broker could have.
    let mut evil_repo = issuer.claims("evil/repo", AUDIENCE);
    evil_repo["ref"] = "refs/heads/main".into();
    let assignments: Vec<(Option<String>, String)> = vec![
        (Some(issuer.mint(&evil_repo)), "repository evil/repo is not allowed by any rule".into()),
        (
            Some(issuer.forge(&issuer.claims(REPO, AUDIENCE))),
            "OIDC token refused: the token's signature does not verify".into(),
        ),
        (
            Some(issuer.mint(&issuer.claims(REPO, "https://some-other-broker"))),
            format!(
                "OIDC token refused: the token's audience \"https://some-other-broker\" does not include \"{AUDIENCE}\""
            ),
        ),
        (
            None,
            "the job carries no GitHub OIDC token; this site runs only jobs from verified workflows"
                .into(),
        ),
    ];
    let queue: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(
        assignments
            .iter()
            .enumerate()
            .map(|(i, (token, _))| {
                json!({
                    "job_id": i + 1, "attempt": 1, "lease": format!("lease-{i}"),
                    "lease_ttl_ms": 30000, "heartbeat_interval_ms": 1000, "log_offset": 0,
                    "spec": {"script": touch}, "oidc_token": token,
                })
            })
            .rev()
            .collect(),
    ));
    let reports: Arc<Mutex<Vec<(u64, Reported)>>> = Arc::default();

    #[derive(Clone)]
    struct Fake {
        queue: Arc<Mutex<Vec<Value>>>,
        reports: Arc<Mutex<Vec<(u64, Reported)>>>,
    }
    let fake = Fake {
        queue: queue.clone(),
        reports: reports.clone(),
    };
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
            axum::routing::post(|State(fake): State<Fake>| async move {
                let next = fake.queue.lock().unwrap().pop();
                match next {
                    Some(job) => Json(job).into_response(),
                    None => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        axum::http::StatusCode::NO_CONTENT.into_response()
                    }
                }
            }),
        )
        .route(
            "/api/v1/agent/jobs/{id}/{action}",
            axum::routing::post(
                |State(fake): State<Fake>,
                 UrlPath((id, action)): UrlPath<(u64, String)>,
                 Json(body): Json<Value>| async move {
                    match action.as_str() {
                        "release" => {
                            fake.reports.lock().unwrap().push((
                                id,
                                Reported {
                                    state: Some(format!(
                                        "released:{}",
                                        body["kind"].as_str().unwrap_or("")
                                    )),
                                    reason: body["reason"].as_str().map(str::to_string),
                                },
                            ));
                            Json(json!({"state": "queued", "reason": "released"}))
                        }
                        "finish" => {
                            fake.reports.lock().unwrap().push((
                                id,
                                Reported {
                                    state: body["outcome"]["state"].as_str().map(str::to_string),
                                    reason: body["outcome"]["reason"].as_str().map(str::to_string),
                                },
                            ));
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
    use axum::response::IntoResponse as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let policy = write_policy(dir.path(), &issuer.url);
    let mut config = testbot_agent::AgentConfig::new(
        url,
        secrecy::SecretString::from("tbe_fake".to_string()),
        dir.path().join("agent"),
    );
    config.name = Some("login1".into());
    config.policy = Some(policy);
    let shutdown = testbot_agent::Shutdown::default();
    let agent = tokio::spawn(
        testbot_agent::Agent::new(config)
            .unwrap()
            .run(shutdown.clone()),
    );

    let reported = wait_for("the agent to report every job", WAIT, || async {
        let reports = reports.lock().unwrap().clone();
        (reports.len() == assignments.len()).then_some(reports)
    })
    .await;
    shutdown.drain.cancel();
    agent.await.unwrap().unwrap();
    server.abort();

    // Each is handed back as refused (the broker then ends it, or offers it to another site).
    for (id, report) in reported {
        let want = &assignments[id as usize - 1].1;
        assert_eq!(
            report.state.as_deref(),
            Some("released:refused"),
            "job {id}"
        );
        assert_eq!(report.reason.as_deref(), Some(want.as_str()), "job {id}");
    }
    assert!(!marker.exists(), "a forbidden job ran");
}
