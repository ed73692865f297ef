//! The agent's own account and key, end to end, with the agent running as an unprivileged
//! account as the shipped systemd unit runs it: a policy that would run jobs as that account is
//! refused at start, and jobs of an agent holding only the unit's capabilities run as their
//! mapped account with no capabilities and no way into the agent's state directory.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;

use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, TEST_SITE, WAIT, ensure_account};
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";
/// The account the agent itself runs as in these tests (the unit's `User=`).
const AGENT_ACCOUNT: &str = "testbot-agent";
/// The capabilities `packaging/systemd/testbot-agent.service` gives the agent.
const UNIT_CAPS: &str = "+setuid,+setgid,+chown,+dac_override,+fowner,+kill";

fn policy(issuer: &str, identity: &str) -> String {
    format!(
        r#"
[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[executors.shell]

{identity}

[[rules]]
name = "lab"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
"#
    )
}

/// The `[identity]` table mapping every job to `account`.
fn default_account(account: &str) -> String {
    format!("[identity]\ndefault_account = \"{account}\"\n")
}

/// A fleet with `REPO` registered, its directory open to other accounts, a policy with the
/// `[identity]` table `identity`, and the work and state directories of agent `login1` given to
/// the agent's account. Returns the fleet, the policy and the state directory.
async fn fleet_for_unprivileged_agent(identity: &str) -> (Fleet, PathBuf, PathBuf) {
    ensure_account(AGENT_ACCOUNT);
    ensure_account(JOB_ACCOUNT);
    let fleet = Fleet::start_oidc(|_| {}).await;
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
    std::fs::write(&policy_path, policy(&fleet.issuer().url, identity)).unwrap();
    let agent = nix::unistd::User::from_name(AGENT_ACCOUNT)
        .unwrap()
        .unwrap();
    let work = fleet.dir.path().join("agent-login1");
    let state = testbot_e2e::state_dir_beside(&work);
    for dir in [&work, &state] {
        std::fs::create_dir(dir).unwrap();
        // Open as systemd's StateDirectoryMode would leave it: the agent must close it itself.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        nix::unistd::chown(dir.as_path(), Some(agent.uid), Some(agent.gid)).unwrap();
    }
    (fleet, policy_path, state)
}

/// `setpriv` arguments that run a program as the agent's account under umask 022, holding
/// `caps` as ambient capabilities (as systemd's `AmbientCapabilities=` does), or none.
fn as_agent_account(caps: Option<&str>) -> Vec<String> {
    let agent = nix::unistd::User::from_name(AGENT_ACCOUNT)
        .unwrap()
        .unwrap();
    let mut args = vec![
        "/bin/sh".to_string(),
        "-c".into(),
        "umask 022; exec \"$@\"".into(),
        "sh".into(),
        "setpriv".into(),
        format!("--reuid={}", agent.uid),
        format!("--regid={}", agent.gid),
        "--init-groups".into(),
    ];
    if let Some(caps) = caps {
        // Keep the capabilities across the uid change, then make them ambient.
        args.push("--securebits=+no_setuid_fixup".into());
        args.push(format!("--inh-caps={caps}"));
        args.push(format!("--ambient-caps={caps}"));
    }
    args.push("--".into());
    args
}

fn stderr_of(fleet: &Fleet, process: &testbot_e2e::Process) -> String {
    std::fs::read_to_string(fleet.dir.path().join(format!("{}.err", process.name))).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_refuses_to_start_when_jobs_would_run_as_its_own_account() {
    let (fleet, policy, _state) =
        fleet_for_unprivileged_agent(&default_account(AGENT_ACCOUNT)).await;
    let wrapper = as_agent_account(None);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let extra = format!("policy = \"{}\"\n", policy.display());
    let mut agent = fleet.spawn_agent_through(&wrapper, "login1", &extra);
    let status = agent.wait(WAIT).await;
    let stderr = stderr_of(&fleet, &agent);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "maps jobs to account {AGENT_ACCOUNT} (uid {}), which is the account the agent runs as",
            nix::unistd::User::from_name(AGENT_ACCOUNT)
                .unwrap()
                .unwrap()
                .uid
        )) && stderr.contains("set allow_jobs_as_agent_account = true"),
        "{stderr}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_of_an_agent_with_the_units_capabilities_cannot_read_its_key_or_use_its_capabilities()
{
    let (fleet, policy, state_dir) =
        fleet_for_unprivileged_agent(&default_account(JOB_ACCOUNT)).await;
    let wrapper = as_agent_account(Some(UNIT_CAPS));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let extra = format!("policy = \"{}\"\n", policy.display());
    let _agent = fleet.spawn_agent_through(&wrapper, "login1", &extra);
    fleet.wait_policy_agents(1).await;
    let state = state_dir.display();
    let script = format!(
        "id -un; grep -E '^Cap(Prm|Eff|Amb)' /proc/self/status; stat -c 'job dir %a' \"$TESTBOT_JOB_DIR\"; \
         for f in {state}/agent-key.pk8 {state}/identity.json \"$TESTBOT_JOB_DIR\"/../../agent-key.pk8; do \
           if test -r \"$f\"; then echo \"readable $f\"; fi; done; \
         ls {state} >/dev/null 2>&1 || echo state unlistable"
    );
    let job = fleet
        .workflow(REPO)
        .submit(&JobSpec {
            script,
            ..Default::default()
        })
        .await
        .unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}\n{log}");
    assert_eq!(
        testbot_e2e::stdout_lines(&log),
        [
            JOB_ACCOUNT,
            "CapPrm:\t0000000000000000",
            "CapEff:\t0000000000000000",
            "CapAmb:\t0000000000000000",
            "job dir 700",
            "state unlistable",
        ],
        "{log}"
    );
    // The agent closed its state directory and wrote its key for itself alone.
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(
        std::fs::metadata(&state_dir).unwrap().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(state_dir.join("agent-key.pk8"))
            .unwrap()
            .mode()
            & 0o7777,
        0o600
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_the_identity_script_maps_to_the_agents_own_account_is_refused() {
    // The script is only known when the job is about to run, so the start-up check cannot see it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("map-account");
    let body = format!("#!/bin/sh\ncat >/dev/null\necho {AGENT_ACCOUNT}\n");
    std::fs::write(&script, &body).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref());
    let identity = format!(
        "[identity.script]\npath = \"{}\"\nsha256 = \"{sha256}\"\n",
        script.display()
    );
    let (fleet, policy, _state) = fleet_for_unprivileged_agent(&identity).await;
    let wrapper = as_agent_account(Some(UNIT_CAPS));
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let extra = format!("policy = \"{}\"\n", policy.display());
    let _agent = fleet.spawn_agent_through(&wrapper, "login1", &extra);
    fleet.wait_policy_agents(1).await;
    let marker = fleet.dir.path().join("ran-as-the-agent");
    let job = fleet
        .workflow(REPO)
        .submit(&JobSpec {
            script: format!("touch {}", marker.display()),
            ..Default::default()
        })
        .await
        .unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Error, "{log}");
    let uid = nix::unistd::User::from_name(AGENT_ACCOUNT)
        .unwrap()
        .unwrap()
        .uid;
    assert_eq!(
        done.reason.as_deref(),
        Some(
            format!(
                "refused by agent {TEST_SITE}/login1: the site policy maps this job to account {AGENT_ACCOUNT} (uid {uid}), the agent's own account: a job running as the agent could read its private key, so it is refused unless the agent's configuration sets allow_jobs_as_agent_account = true; no other enrolled agent may take this job"
            )
            .as_str()
        ),
        "{log}"
    );
    assert!(!marker.exists(), "the job ran as the agent");
    fleet.stop().await;
}
