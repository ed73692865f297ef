//! Jobs outlive their tokens in the queue: GitHub's tokens are valid for minutes, while an HPC
//! site's queue (or a requeue after a lost agent) can hold a job for hours. The agent checks the
//! token's lifetime at the time the broker accepted the job, within the site's
//! `oidc.max_queue_age`.

use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, TEST_SITE, WAIT, ensure_account, wait_for};
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::oidc::{DEFAULT_LEEWAY, unix_now};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn write_policy(fleet: &Fleet, extra_oidc: &str) -> std::path::PathBuf {
    let path = fleet.dir.path().join("policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[oidc]
issuer = "{}"
audience = "{AUDIENCE}"
{extra_oidc}

[executors.shell]

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "solver"
repositories = ["{REPO}"]
executors = ["shell"]
"#,
            fleet.issuer().url
        ),
    )
    .unwrap();
    path
}

/// A fleet whose one policy agent has enrolled (so the broker admits the site's jobs) and then
/// stopped: jobs submitted now wait in the queue. Returns the agent's configuration.
async fn fleet_with_stopped_site(extra_oidc: &str) -> (Fleet, testbot_agent::AgentConfig) {
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
    let mut config = fleet.agent_config("hpc1");
    config.policy = Some(write_policy(&fleet, extra_oidc));
    let agent = fleet.add_agent(config.clone());
    fleet.wait_policy_agents(1).await;
    let shutdown = fleet.agent_shutdown(agent);
    shutdown.drain.cancel();
    shutdown.hard.cancel();
    fleet.agent_exit(agent).await.unwrap();
    (fleet, config)
}

fn spec() -> JobSpec {
    JobSpec {
        script: "echo ran".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_waited_longer_than_its_token_lives_still_runs() {
    let (mut fleet, config) = fleet_with_stopped_site("").await;
    // A token at the end of its life: with the verifiers' leeway it is good for 3 more seconds,
    // so the broker accepts it, and it is dead by the time the site starts.
    let leeway = DEFAULT_LEEWAY.as_secs() as i64;
    let now = unix_now();
    let exp = now - leeway + 3;
    let issuer = fleet.issuer();
    let mut claims = issuer.claims(REPO, AUDIENCE);
    claims["exp"] = exp.into();
    claims["iat"] = (exp - 300).into();
    claims["nbf"] = (exp - 300).into();
    let job = fleet
        .client_with(&issuer.mint(&claims))
        .submit(&spec())
        .await
        .expect("the broker accepts the token while it is valid");
    wait_for("the token to expire", WAIT, || async {
        (unix_now() > exp + leeway + 1).then_some(())
    })
    .await;

    fleet.add_agent(config);
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    assert_eq!(testbot_e2e::stdout_lines(&log), ["ran"], "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_queued_longer_than_the_site_allows_is_refused() {
    let (mut fleet, config) = fleet_with_stopped_site("max_queue_age = \"1s\"").await;
    let job = fleet.workflow(REPO).submit(&spec()).await.unwrap();
    let accepted = fleet.client().job(job.id).await.unwrap().created_at_ms / 1000;
    wait_for("the job to wait longer than a second", WAIT, || async {
        (unix_now() > accepted + 2).then_some(())
    })
    .await;

    fleet.add_agent(config);
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Error, "{log}");
    let reason = done.reason.unwrap_or_default();
    assert!(
        reason.starts_with(&format!(
            "refused by agent {TEST_SITE}/hpc1: OIDC token refused: the job was accepted at \
             {accepted}, longer ago than this site's oidc.max_queue_age of 1 s (now "
        )),
        "{reason}"
    );
    assert!(
        reason.ends_with("); submit it again; no other enrolled agent may take this job"),
        "{reason}"
    );
    assert!(
        !testbot_e2e::stdout_lines(&log).contains(&"ran".to_string()),
        "{log}"
    );
}
