//! A broker upgraded in place keeps what an older release stored. The fixture
//! (`tests/fixtures/upgrade/`, see its README) is the data directory of a fleet run by an older
//! release; today's broker is started on a copy, migrates it, and must answer for every site,
//! agent, repository, job and log exactly as the old broker did, take the old operator token,
//! let the old agent (its identity and key from the fixture) keep working, and run the job that
//! was still queued.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret as _;
use serde_json::Value;
use testbot_e2e::{BrokerProcess, Process, WAIT, free_port};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{Job, JobId, JobListQuery, JobSpec, JobState};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/upgrade")
        .join(name)
}

fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Fails unless every field of `old` is in `new` with the same value (arrays element by
/// element); `new` may have more fields. `path` names the place for the message.
fn assert_kept(old: &Value, new: &Value, path: &str) {
    match (old, new) {
        (Value::Object(old), Value::Object(new)) => {
            for (key, value) in old {
                let Some(kept) = new.get(key) else {
                    panic!("{path}.{key} is gone after the upgrade (it was {value})");
                };
                assert_kept(value, kept, &format!("{path}.{key}"));
            }
        }
        (Value::Array(old), Value::Array(new)) => {
            assert_eq!(
                old.len(),
                new.len(),
                "{path} had {} entries before the upgrade, {} after",
                old.len(),
                new.len()
            );
            for (i, (old, new)) in old.iter().zip(new).enumerate() {
                assert_kept(old, new, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(old, new, "{path} changed in the upgrade"),
    }
}

/// Runs the `testbot` CLI against the broker; returns its standard output (it must succeed).
async fn cli(broker: &BrokerProcess, log_dir: &Path, args: &[&str]) -> String {
    let mut process = Process::spawn(
        "testbot",
        args,
        &[
            ("TESTBOT_URL", &broker.url),
            ("TESTBOT_TOKEN", broker.admin_token.expose_secret()),
        ],
        log_dir,
    )
    .unwrap();
    let status = process.wait(WAIT).await;
    let read = |ext: &str| {
        std::fs::read_to_string(log_dir.join(format!("{}.{ext}", process.name))).unwrap()
    };
    assert!(
        status.success(),
        "testbot {args:?}: {status}\n{}",
        read("err")
    );
    read("out")
}

async fn log(client: &BrokerClient, id: JobId) -> String {
    use futures_util::StreamExt as _;
    let stream = client.log_stream(id, 0, false).await.expect("log");
    let mut stream = std::pin::pin!(stream);
    let mut out = Vec::new();
    while let Some(bytes) = stream.next().await {
        out.extend_from_slice(&bytes.expect("log bytes"));
    }
    String::from_utf8(out).expect("UTF-8 log")
}

/// Waits until job `id`, meant for `agent`, has its result; fails with the agent's error output
/// if the agent exits or the job does not end in time (e.g. the broker refuses the agent).
async fn finished_by(client: &BrokerClient, id: JobId, agent: &mut Process, dir: &Path) -> Job {
    let stderr = |agent: &Process| {
        std::fs::read_to_string(dir.join(format!("{}.err", agent.name))).unwrap_or_default()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!(
                "the agent exited ({status}) before job {id} ended:\n{}",
                stderr(agent)
            );
        }
        if let Ok(job) = client.job(id).await
            && job.state.is_terminal()
        {
            return job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {id} did not end within {WAIT:?}; the agent's output:\n{}",
            stderr(agent)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a `testbot-agent` process of the fixture's site with `state_dir` and `labels`.
fn spawn_agent(
    broker: &BrokerProcess,
    dir: &Path,
    name: &str,
    labels: &str,
    enrollment_token_file: Option<&Path>,
) -> Process {
    let token = enrollment_token_file
        .map(|file| format!("enrollment_token_file = \"{}\"\n", file.display()))
        .unwrap_or_default();
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "broker_url = \"{}\"\n{token}name = \"{name}\"\nlabels = {labels}\nwork_dir = \"{}\"\nstate_dir = \"{}\"\npoll_wait = \"5s\"\nkill_grace = \"2s\"\n",
            broker.url,
            dir.join(format!("{name}-work")).display(),
            dir.join(format!("{name}-state")).display(),
        ),
    )
    .unwrap();
    Process::spawn(
        "testbot-agent",
        &["run", "--config", config.to_str().unwrap()],
        &[],
        dir,
    )
    .expect("agent process")
}

async fn stop_agent(mut agent: Process) {
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    let status = agent.wait(WAIT).await;
    assert!(status.success(), "the agent stops cleanly: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn todays_broker_keeps_and_serves_what_v0_stored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("broker");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(fixture("v0-testbot.db"), data.join("testbot.db")).unwrap();
    std::fs::copy(fixture("v0-admin.token"), data.join("admin.token")).unwrap();
    set_mode(&data.join("admin.token"), 0o600);

    let broker = BrokerProcess::start(
        free_port(),
        &data,
        dir.path(),
        &[
            // The fixture's jobs ended long ago: keep them.
            "--job-retention",
            "36500days",
            "--poll-timeout",
            "5s",
            // Never contacted; nothing here may leave loopback.
            "--github-api-url",
            "http://127.0.0.1:9",
        ],
    )
    .await;

    // The old operator token still works, and was not rotated.
    let old_token = read_fixture("v0-admin.token");
    assert_eq!(broker.admin_token.expose_secret(), old_token.trim());
    assert_eq!(
        std::fs::read_to_string(data.join("admin.token")).unwrap(),
        old_token
    );
    let client = broker.client();

    // Everything the old broker listed, the new one lists the same (the CLI's JSON).
    for (fixture_file, args) in [
        ("v0-jobs.json", &["jobs", "--json", "--limit", "1000"][..]),
        ("v0-sites.json", &["site", "list", "--json"][..]),
        ("v0-agents.json", &["agent", "list", "--json"][..]),
        ("v0-repos.json", &["repo", "list", "--json"][..]),
    ] {
        let old: Value = serde_json::from_str(&read_fixture(fixture_file)).unwrap();
        let new: Value = serde_json::from_str(&cli(&broker, dir.path(), args).await)
            .unwrap_or_else(|e| panic!("testbot {args:?} prints JSON: {e}"));
        assert_kept(&old, &new, fixture_file.trim_end_matches(".json"));
    }

    // The same, said plainly.
    let jobs = client
        .jobs(&JobListQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .await
        .unwrap()
        .jobs;
    assert_eq!(jobs.len(), 4, "{jobs:#?}");
    let named = |name: &str| -> Job {
        jobs.iter()
            .find(|j| j.spec.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("job {name} is gone: {jobs:#?}"))
            .clone()
    };
    let agent_name = Some("fixture-site/fixture-agent".to_string());
    let success = named("fixture-success");
    assert_eq!(success.state, JobState::Succeeded);
    assert_eq!(success.exit_code, Some(0));
    assert_eq!(success.agent, agent_name);
    assert_eq!(success.spec.env["GREETING"], "hello");
    assert_eq!(success.spec.env["FIXTURE_SECRET"], "***");
    assert_eq!(success.spec.secret_env, ["FIXTURE_SECRET"]);
    assert_eq!(success.spec.timeout_secs, Some(300));
    let failure = named("fixture-failure");
    assert_eq!(failure.state, JobState::Failed);
    assert_eq!(failure.exit_code, Some(3));
    assert_eq!(failure.reason.as_deref(), Some("exit code 3"));
    let cancelled = named("fixture-cancelled");
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(cancelled.reason.as_deref(), Some("cancelled by a user"));
    assert!(cancelled.cancel_requested && cancelled.started_at_ms.is_some());
    let queued = named("fixture-queued");
    assert_eq!(queued.state, JobState::Queued);
    assert_eq!(queued.spec.labels, ["gpu-h100"]);
    assert_eq!(queued.attempts, 0);

    // Every log byte for byte, as the old broker served it.
    for job in &jobs {
        let old = read_fixture(&format!("v0-logs/{}.log", job.id));
        let new = log(&client, job.id).await;
        assert_eq!(new, old, "the log of job {} ({:?})", job.id, job.spec.name);
        assert_eq!(job.log_bytes, old.len() as u64, "job {}", job.id);
    }
    // And through the CLI: stdout lines on stdout, the line without a newline given one.
    assert_eq!(
        cli(&broker, dir.path(), &["logs", &success.id.to_string()]).await,
        "hello from the fixture\na secret: ***\nünïcödé ✓\nno newline at the end\n"
    );
    let repo = client.repo("fixture-org/fixture-repo").await.unwrap();
    assert_eq!(repo.settings.sites, ["fixture-site"]);

    // The old agent, with its identity and key from the fixture (pointed at this broker's
    // address) and no enrollment token, polls and runs a new job.
    let old_agents: Value = serde_json::from_str(&read_fixture("v0-agents.json")).unwrap();
    let old_agent_id = old_agents["agents"][0]["id"].as_str().unwrap().to_string();
    let state = dir.path().join("fixture-agent-state");
    std::fs::create_dir(&state).unwrap();
    set_mode(&state, 0o700);
    let mut identity: Value =
        serde_json::from_str(&read_fixture("v0-agent-state/identity.json")).unwrap();
    assert_eq!(identity["agent_id"], old_agent_id.as_str());
    identity["broker_url"] = Value::from(broker.url.clone());
    std::fs::write(state.join("identity.json"), identity.to_string()).unwrap();
    std::fs::copy(
        fixture("v0-agent-state/agent-key.pk8"),
        state.join("agent-key.pk8"),
    )
    .unwrap();
    for file in ["identity.json", "agent-key.pk8"] {
        set_mode(&state.join(file), 0o600);
    }
    let mut old_agent = spawn_agent(
        &broker,
        dir.path(),
        "fixture-agent",
        "[\"linux\", \"fixture\"]",
        None,
    );
    let new_job = client
        .submit(&JobSpec {
            script: "echo after the upgrade".into(),
            labels: vec!["fixture".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let done = finished_by(&client, new_job.id, &mut old_agent, dir.path()).await;
    let new_log = log(&client, new_job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{new_log}");
    assert_eq!(done.agent, agent_name);
    assert!(new_log.contains(" O after the upgrade\n"), "{new_log}");
    let agents = client.agents().await.unwrap().agents;
    assert_eq!(
        agents.len(),
        1,
        "the old agent did not enroll again: {agents:?}"
    );
    assert_eq!(agents[0].id, old_agent_id);

    // A newly enrolled agent with the label the queued job waited for runs it.
    let enrollment = client
        .create_enrollment_token("fixture-site", &Default::default())
        .await
        .unwrap();
    let token_file = dir.path().join("enrollment.token");
    std::fs::write(&token_file, &enrollment.token).unwrap();
    let mut new_agent = spawn_agent(
        &broker,
        dir.path(),
        "new-agent",
        "[\"gpu-h100\"]",
        Some(&token_file),
    );
    let done = finished_by(&client, queued.id, &mut new_agent, dir.path()).await;
    let queued_log = log(&client, queued.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{queued_log}");
    assert_eq!(done.agent.as_deref(), Some("fixture-site/new-agent"));
    assert_eq!(done.created_at_ms, queued.created_at_ms);
    assert!(
        queued_log.contains(" O queued before the upgrade\n"),
        "{queued_log}"
    );

    stop_agent(old_agent).await;
    stop_agent(new_agent).await;
    broker.stop().await;
}
