//! Trust at the broker: workflow OIDC tokens, repository registration, and the attacks on both.
//! Every case asserts the exact refusal, and that nothing was stored.

use std::collections::HashMap;

use serde_json::{Value, json};
use testbot_e2e::github::{FakeGitHub, FakeUser};
use testbot_e2e::oidc::{sign_hs256, unsigned};
use testbot_e2e::refusal;
use testbot_e2e::{AUDIENCE, Fleet, wait_for};
use testbot_proto::client::BrokerClient;
use testbot_proto::jobs::{JobListQuery, JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn spec(script: &str) -> JobSpec {
    JobSpec {
        script: script.into(),
        ..Default::default()
    }
}

async fn register(fleet: &Fleet, registration: RepoRegistration) {
    fleet
        .client()
        .register_repo(&registration)
        .await
        .expect("operator registers");
}

fn registration(name: &str) -> RepoRegistration {
    RepoRegistration {
        name: name.into(),
        ..RepoRegistration::default()
    }
}

async fn job_count(fleet: &Fleet) -> usize {
    fleet
        .client()
        .jobs(&JobListQuery::default())
        .await
        .unwrap()
        .jobs
        .len()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_token_submits_a_job_and_follows_only_its_own() {
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, registration(REPO)).await;
    let mut agent = fleet.agent_config("a1");
    agent.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(agent);
    fleet.wait_polling_agents(1).await;

    let claims = fleet.issuer().claims(REPO, AUDIENCE);
    let token = fleet.issuer().mint(&claims);
    let workflow = fleet.client_with(&token);
    let job = workflow
        .submit(&spec("echo from the workflow"))
        .await
        .unwrap();
    assert_eq!(job.repository.as_deref(), Some(REPO));
    assert_eq!(
        job.submitted_by.as_deref(),
        Some(format!("workflow:{REPO}@{}", claims["run_id"].as_str().unwrap()).as_str())
    );
    // The same token follows the job it submitted (that is how the action streams the log).
    let done = wait_for("the job to finish", testbot_e2e::WAIT, || async {
        let job = workflow.job(job.id).await.unwrap();
        job.state.is_terminal().then_some(job)
    })
    .await;
    assert_eq!(done.state, JobState::Succeeded);

    // Another run of the same repository may not read it.
    let other_run = fleet.issuer().mint(&fleet.issuer().claims(REPO, AUDIENCE));
    let (status, message) = refusal(fleet.client_with(&other_run).job(job.id).await);
    assert_eq!(status, 403);
    assert!(
        message.starts_with(&format!(
            "job {} was not submitted by this workflow run",
            job.id
        )),
        "{message}"
    );
}

/// One attack: a token and what the broker must answer to a job submission with it.
struct Attack {
    what: &'static str,
    token: String,
    status: u16,
    message: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_and_misused_workflow_tokens_are_refused_with_the_exact_reason() {
    let fleet = Fleet::start_oidc(|_| {}).await;
    register(&fleet, registration(REPO)).await;
    // An enrolled agent without a site policy that takes workflow jobs accepts any job (it
    // polls once, so the broker knows what it takes, and never again).
    fleet.enroll_taking_workflow_jobs("any-job").await;
    register(
        &fleet,
        RepoRegistration {
            name: "hpc-lab/main-only".into(),
            refs: vec!["refs/heads/main".into()],
            events: vec!["push".into()],
            ..RepoRegistration::default()
        },
    )
    .await;
    let issuer = fleet.issuer();
    let good = issuer.claims(REPO, AUDIENCE);
    let now = testbot_proto::oidc::unix_now();
    let with = |changes: Value| {
        let mut claims = issuer.claims(REPO, AUDIENCE);
        for (key, value) in changes.as_object().unwrap() {
            claims[key] = value.clone();
        }
        claims
    };
    let without = |claim: &str| {
        let mut claims = issuer.claims(REPO, AUDIENCE);
        claims.as_object_mut().unwrap().remove(claim);
        claims
    };
    let refused = |why: &str| format!("OIDC token refused: {why}");

    // A token whose payload was changed after signing.
    let tampered = {
        let token = issuer.mint(&good);
        let parts: Vec<&str> = token.split('.').collect();
        let mut forged = good.clone();
        forged["repository"] = "attacker/repo".into();
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&forged).unwrap());
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let replayed = issuer.mint(&good);
    fleet
        .client_with(&replayed)
        .submit(&spec("true"))
        .await
        .expect("first use of the token");
    let jobs_before = job_count(&fleet).await;

    let attacks = vec![
        Attack {
            what: "signed by a key the issuer does not publish",
            token: issuer.forge(&good),
            status: 401,
            message: refused("the token's signature does not verify"),
        },
        Attack {
            what: "payload changed after signing",
            token: tampered,
            status: 401,
            message: refused("the token's signature does not verify"),
        },
        Attack {
            what: "alg none",
            token: unsigned(&good),
            status: 401,
            message: refused("the token's algorithm \"none\" is not accepted; only RS256 is"),
        },
        Attack {
            what: "HS256 signed with the issuer's public key",
            token: sign_hs256(
                &issuer.public_key_der(),
                &json!({"alg": "HS256", "typ": "JWT", "kid": testbot_e2e::oidc::TEST_KID}),
                &good,
            ),
            status: 401,
            message: refused("the token's algorithm \"HS256\" is not accepted; only RS256 is"),
        },
        Attack {
            what: "RS512 header",
            token: issuer.mint_with_header(
                &json!({"alg": "RS512", "kid": testbot_e2e::oidc::TEST_KID}),
                &good,
            ),
            status: 401,
            message: refused("the token's algorithm \"RS512\" is not accepted; only RS256 is"),
        },
        Attack {
            what: "unknown key id",
            token: issuer.mint_with_header(&json!({"alg": "RS256", "kid": "rotated-away"}), &good),
            status: 401,
            message: refused("the token's key id \"rotated-away\" is not in the issuer's key set"),
        },
        Attack {
            what: "no key id",
            token: issuer.mint_with_header(&json!({"alg": "RS256"}), &good),
            status: 401,
            message: refused("the token is not a JWT: the header has no key id (kid)"),
        },
        Attack {
            what: "wrong issuer",
            token: issuer.mint(&with(json!({"iss": "https://token.actions.githubusercontent.com"}))),
            status: 401,
            message: refused(&format!(
                "the token's issuer \"https://token.actions.githubusercontent.com\" is not the accepted issuer \"{}\"",
                issuer.url
            )),
        },
        Attack {
            what: "wrong audience",
            token: issuer.mint(&with(json!({"aud": "https://other-broker.example"}))),
            status: 401,
            message: refused(&format!(
                "the token's audience \"https://other-broker.example\" does not include \"{AUDIENCE}\""
            )),
        },
        Attack {
            what: "expired",
            token: issuer.mint(&with(json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200}))),
            status: 401,
            message: refused(&format!("the token expired at {}", now - 3600)),
        },
        Attack {
            what: "not valid yet",
            token: issuer.mint(&with(json!({"nbf": now + 3600}))),
            status: 401,
            message: refused(&format!("the token is not valid before {}", now + 3600)),
        },
        Attack {
            what: "issued in the future",
            token: issuer.mint(&with(json!({"iat": now + 3600, "nbf": now}))),
            status: 401,
            message: refused(&format!(
                "the token was issued in the future, at {}",
                now + 3600
            )),
        },
        Attack {
            what: "missing repository claim",
            token: issuer.mint(&without("repository")),
            status: 401,
            message: refused("the token lacks the claim \"repository\""),
        },
        Attack {
            what: "missing sha claim",
            token: issuer.mint(&without("sha")),
            status: 401,
            message: refused("the token lacks the claim \"sha\""),
        },
        Attack {
            what: "missing jti claim",
            token: issuer.mint(&without("jti")),
            status: 401,
            message: refused("the token lacks the claim \"jti\""),
        },
        Attack {
            what: "run_id as a number rather than GitHub's string",
            token: issuer.mint(&with(json!({"run_id": 42}))),
            status: 401,
            message: refused("the token's claim \"run_id\" is invalid: expected a string"),
        },
        Attack {
            what: "not a JWT",
            token: "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln".into(),
            status: 401,
            message: refused("the token is not a JWT: the header has no key id (kid)"),
        },
        Attack {
            what: "replayed token (jti seen before)",
            token: replayed.clone(),
            status: 401,
            message: refused(&format!(
                "the token was already used (jti {:?}); request a fresh one",
                good["jti"].as_str().unwrap()
            )),
        },
        Attack {
            what: "unregistered repository",
            token: issuer.mint(&issuer.claims("someone/else", AUDIENCE)),
            status: 403,
            message: "repository someone/else is not registered with this broker; a maintainer \
                      registers it with `testbot repo register someone/else`"
                .into(),
        },
        Attack {
            what: "pull_request_target is not a default event",
            token: issuer.mint(&with(json!({"event_name": "pull_request_target"}))),
            status: 403,
            message: format!(
                "event pull_request_target is not enabled for repository {REPO} (enabled: [push, workflow_dispatch, schedule, pull_request])"
            ),
        },
        Attack {
            what: "ref the registration does not enable",
            token: {
                let mut claims = issuer.claims("hpc-lab/main-only", AUDIENCE);
                claims["ref"] = "refs/heads/feature".into();
                issuer.mint(&claims)
            },
            status: 403,
            message: "ref refs/heads/feature is not enabled for repository hpc-lab/main-only (enabled: [refs/heads/main])".into(),
        },
        Attack {
            what: "an enrollment token cannot submit",
            token: secrecy::ExposeSecret::expose_secret(&fleet.enrollment_token).to_string(),
            status: 401,
            message: "an enrollment token is not a bearer token: give it to an agent (enrollment_token_file), which exchanges it for its own identity".into(),
        },
    ];
    assert!(attacks.len() >= 20);
    for attack in &attacks {
        let (status, message) = refusal(
            fleet
                .client_with(&attack.token)
                .submit(&spec("echo pwned"))
                .await,
        );
        // Time checks also report the broker's clock: `... (now 1795610357)`.
        let message = match message.rsplit_once(" (now ") {
            Some((head, _)) if !attack.message.contains("(now ") => head.to_string(),
            _ => message,
        };
        assert_eq!(
            (status, message.as_str()),
            (attack.status, attack.message.as_str()),
            "case: {}",
            attack.what
        );
    }
    assert_eq!(
        job_count(&fleet).await,
        jobs_before,
        "a refused submission stored a job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_an_audience_refuses_oidc_tokens() {
    let fleet = Fleet::start().await;
    let issuer = testbot_e2e::oidc::TestIssuer::start().await;
    let token = issuer.mint(&issuer.claims(REPO, AUDIENCE));
    let (status, message) = refusal(fleet.client_with(&token).submit(&spec("true")).await);
    assert_eq!(status, 401);
    assert_eq!(
        message,
        "this broker does not accept GitHub OIDC tokens (it has no --oidc-audience)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn repositories_are_registered_only_with_proof_of_control() {
    let users = HashMap::from([
        (
            "ghp_admin".to_string(),
            FakeUser {
                login: "maintainer".into(),
                admin_of: vec![REPO.into()],
                reader_of: vec![],
            },
        ),
        (
            "ghp_reader".to_string(),
            FakeUser {
                login: "contributor".into(),
                admin_of: vec![],
                reader_of: vec![REPO.into()],
            },
        ),
    ]);
    let github = FakeGitHub::start(users).await;
    let github_url = github.url.clone();
    let fleet = Fleet::start_oidc(move |config| {
        config.github_api_url = github_url;
        config.settings.allow_self_registration = true;
    })
    .await;
    let issuer = fleet.issuer();
    let register_with = |token: &str, name: &str| {
        let client: BrokerClient = fleet.client_with(token);
        let registration = registration(name);
        async move { client.register_repo(&registration).await }
    };

    // Refusals first: nothing may be registered by them.
    let cases: Vec<(&str, String, &str, u16, String)> = vec![
        (
            "GitHub user without admin permission",
            "ghp_reader".into(),
            REPO,
            403,
            format!(
                "GitHub user contributor does not have admin permission on {REPO}; only its admins can register it"
            ),
        ),
        (
            "GitHub user who cannot see the repository",
            "ghp_admin".into(),
            "hpc-lab/private",
            403,
            "GitHub does not show /repos/hpc-lab/private to this token (404 Not Found): the repository does not exist or the token cannot see it".into(),
        ),
        (
            "invalid GitHub token",
            "ghp_invalid".into(),
            REPO,
            403,
            "GitHub says the user token is not valid (401)".into(),
        ),
        (
            "workflow of another repository",
            issuer.mint(&issuer.claims("attacker/repo", AUDIENCE)),
            REPO,
            403,
            format!(
                "a workflow of attacker/repo cannot register {REPO}: the OIDC token must come from a workflow of {REPO}"
            ),
        ),
        (
            "enrollment token",
            secrecy::ExposeSecret::expose_secret(&fleet.enrollment_token).to_string(),
            REPO,
            401,
            "an enrollment token is not a bearer token: give it to an agent (enrollment_token_file), which exchanges it for its own identity".into(),
        ),
    ];
    for (what, token, name, status, message) in &cases {
        let (got_status, got_message) = refusal(register_with(token, name).await);
        assert_eq!(
            (got_status, got_message.as_str()),
            (*status, message.as_str()),
            "case: {what}"
        );
    }
    assert!(fleet.client().repos().await.unwrap().repos.is_empty());

    // An admin's GitHub token registers it.
    let repo = register_with("ghp_admin", REPO).await.unwrap();
    assert_eq!(repo.registered_by, "github:maintainer");
    // With self-registration on, a workflow of an unregistered repository registers it (its
    // token is used up by it).
    let own = "hpc-lab/self-registered";
    let claims = issuer.claims(own, AUDIENCE);
    let token = issuer.mint(&claims);
    let repo = register_with(&token, own).await.unwrap();
    assert_eq!(
        repo.registered_by,
        format!("workflow:{own}@{}", claims["run_id"].as_str().unwrap())
    );
    let (status, message) = refusal(register_with(&token, own).await);
    assert_eq!(status, 401);
    assert!(message.contains("was already used"), "{message}");
    // Remove needs the same proof.
    let (status, _) = refusal(fleet.client_with("ghp_reader").remove_repo(REPO).await);
    assert_eq!(status, 403);
    fleet
        .client_with("ghp_admin")
        .remove_repo(REPO)
        .await
        .unwrap();
    let (status, message) = refusal(fleet.client().repo(REPO).await);
    assert_eq!(
        (status, message.as_str()),
        (404, "repository hpc-lab/solver is not registered")
    );
}
