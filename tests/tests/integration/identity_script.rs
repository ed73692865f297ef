//! The identity script through the real agent: the file whose hash was checked is the one that
//! runs (executed from the descriptor the agent opened), and a swapped file is refused.

use std::os::unix::fs::PermissionsExt as _;

use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, ensure_account};
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_as_the_account_the_pinned_identity_script_picks() {
    ensure_account(JOB_ACCOUNT);
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    std::fs::set_permissions(fleet.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let scripts = fleet.dir.path().join("scripts");
    std::fs::create_dir(&scripts).unwrap();
    std::fs::set_permissions(&scripts, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = scripts.join("map-account");
    let body = format!(
        "#!/bin/bash\nset -eu\ninput=$(cat)\ncase \"$input\" in *'\"repository\":\"{REPO}\"'*) echo {JOB_ACCOUNT} ;; *) exit 3 ;; esac\n"
    );
    std::fs::write(&path, &body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = fleet.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            r#"
[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.shell]

[identity.script]
path = "{path}"
sha256 = "{sha256}"

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
"#,
            issuer = fleet.issuer().url,
            path = path.display(),
            sha256 = sha256_hex(body.as_bytes()),
        ),
    )
    .unwrap();
    let mut config = fleet.agent_config("login1");
    config.policy = Some(policy);
    fleet.add_agent(config);
    fleet.wait_policy_agents(1).await;

    let spec = JobSpec {
        script: "id -un".into(),
        ..Default::default()
    };
    let job = fleet.workflow(REPO).submit(&spec).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    assert_eq!(testbot_e2e::stdout_lines(&log), [JOB_ACCOUNT], "{log}");

    // Another file at the path (renamed over it) is not the pinned script.
    let other = scripts.join("other");
    std::fs::write(&other, "#!/bin/bash\necho daemon\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&other, &path).unwrap();
    let job = fleet.workflow(REPO).submit(&spec).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Error, "{log}");
    assert!(
        done.reason
            .as_deref()
            .unwrap_or("")
            .contains("but the policy pins"),
        "{done:?}"
    );
    fleet.stop().await;
}
