//! The fake against real clients: octocrab, reqwest and the `git` CLI.

use std::process::Stdio;

use octocrab::Octocrab;
use octocrab::models::CheckRunId;
use octocrab::params::checks::{CheckRunConclusion, CheckRunOutput, CheckRunStatus};
use serde_json::{Value, json};

use super::*;

const REPO: &str = "hpc-lab/app";

fn octocrab(github: &FakeGitHub, token: Option<&str>) -> Octocrab {
    let builder = Octocrab::builder().base_uri(github.url.as_str()).unwrap();
    match token {
        Some(token) => builder.personal_token(token.to_string()).build().unwrap(),
        None => builder.build().unwrap(),
    }
}

/// The fake with `hpc-lab/app` (private), the App installed on it, and an installation token
/// obtained the way an App does: an RS256 JWT signed with `ring`, traded at
/// `POST /app/installations/{id}/access_tokens`.
async fn installed() -> (FakeGitHub, Installation, String) {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Private).await;
    let installation = github.install("hpc-lab", &[REPO]).await;
    let token = installation_token(&github, installation.id).await;
    (github, installation, token)
}

async fn installation_token(github: &FakeGitHub, installation_id: u64) -> String {
    let now = jwt::unix_now();
    let jwt = jwt::sign_app_jwt(
        github.app_id,
        &github.app_private_key_pem,
        now - 60,
        now + 540,
    );
    let app = octocrab(github, Some(&jwt));
    let token: octocrab::models::InstallationToken = app
        .post(
            format!("/app/installations/{installation_id}/access_tokens"),
            None::<&()>,
        )
        .await
        .unwrap();
    token.token
}

async fn status_of(
    github: &FakeGitHub,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, format!("{}{path}", github.url));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[test]
fn the_webhook_signature_matches_githubs_test_vector() {
    assert_eq!(
        webhooks::signature("It's a Secret to Everybody", b"Hello, World!"),
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    );
}

#[test]
fn every_example_payload_is_served() {
    let all: Vec<(&str, &Value)> = webhooks::examples().collect();
    // @octokit/webhooks-examples 7.6.1 publishes 329 payloads of 58 events.
    assert_eq!(all.len(), 329);
    let events: std::collections::BTreeSet<&str> = all.iter().map(|(name, _)| *name).collect();
    assert_eq!(events.len(), 58);
    assert!(all.iter().all(|(_, payload)| payload.is_object()));
    for event in [
        "push",
        "pull_request",
        "issue_comment",
        "check_run",
        "installation",
        "ping",
        "pull_request_review",
    ] {
        assert!(events.contains(event), "{event}");
    }
}

#[test]
fn the_app_key_fixtures_are_one_key_pair() {
    let der = jwt::pem_to_der(jwt::APP_PRIVATE_KEY_PEM);
    let key = ring::signature::RsaKeyPair::from_der(&der).unwrap();
    assert_eq!(
        key.public().as_ref(),
        jwt::pem_to_der(jwt::APP_PUBLIC_KEY_PEM).as_slice()
    );
}

#[test]
fn app_jwts_are_checked_by_githubs_rules() {
    let key = jwt::APP_PRIVATE_KEY_PEM;
    let public = jwt::pem_to_der(jwt::APP_PUBLIC_KEY_PEM);
    let now = jwt::unix_now();
    assert_eq!(
        jwt::verify_app_jwt(
            &jwt::sign_app_jwt(APP_ID, key, now - 60, now + 540),
            APP_ID,
            &public
        ),
        Ok(())
    );
    let too_long = jwt::sign_app_jwt(APP_ID, key, now - 60, now + 600);
    assert!(
        jwt::verify_app_jwt(&too_long, APP_ID, &public)
            .unwrap_err()
            .contains("too far in the future")
    );
    let expired = jwt::sign_app_jwt(APP_ID, key, now - 700, now - 100);
    assert!(jwt::verify_app_jwt(&expired, APP_ID, &public).is_err());
    let other_app = jwt::sign_app_jwt(APP_ID + 1, key, now - 60, now + 540);
    assert!(jwt::verify_app_jwt(&other_app, APP_ID, &public).is_err());
    let signed = jwt::sign_app_jwt(APP_ID, key, now - 60, now + 540);
    let middle = signed.len() - 100;
    let flipped = if &signed[middle..=middle] == "A" {
        "B"
    } else {
        "A"
    };
    let tampered = format!("{}{flipped}{}", &signed[..middle], &signed[middle + 1..]);
    assert!(jwt::verify_app_jwt(&tampered, APP_ID, &public).is_err());
}

#[test]
fn the_validator_catches_a_response_that_breaks_githubs_schema() {
    let api = openapi::github();
    let op = api.operation("POST", "/repos/o/r/check-runs").unwrap();
    assert_eq!(op.template, "/repos/{owner}/{repo}/check-runs");
    let problems = api.check_response(&op, 201, Some(&json!({"id": 1, "name": "x"})));
    assert!(
        problems.iter().any(|p| p.contains("head_sha")),
        "{problems:?}"
    );
    let problems = api.check_response(&op, 200, Some(&json!({})));
    assert!(
        problems
            .iter()
            .any(|p| p.contains("does not document status 200")),
        "{problems:?}"
    );
    // Errors GitHub answers everywhere need only its `message`.
    assert!(
        api.check_response(&op, 404, Some(&json!({"message": "Not Found"})))
            .is_empty()
    );
    // An enum outside its values is a problem of the body.
    let get = api.operation("GET", "/repos/o/r/check-runs/5").unwrap();
    assert_eq!(get.param("check_run_id"), "5");
    let bad_status = api.check_request(
        &op,
        &[],
        Some(&json!({"name": "x", "head_sha": "a", "status": "done"})),
    );
    assert!(
        bad_status.body.iter().any(|p| p.contains("status")),
        "{bad_status:?}"
    );
    assert!(bad_status.parameters.is_empty(), "{bad_status:?}");
    // Parameters: of their type, and only those GitHub documents.
    let pull = api.operation("GET", "/repos/o/r/pulls/abc").unwrap();
    let problems = api.check_request(&pull, &[("per_page".into(), "5".into())], None);
    assert!(
        problems
            .parameters
            .iter()
            .any(|p| p.contains("pull_number")),
        "{problems:?}"
    );
    assert!(
        problems.parameters.iter().any(|p| p.contains("per_page")),
        "{problems:?}"
    );
    let contents = api
        .operation("GET", "/repos/o/r/contents/src/lib.rs")
        .unwrap();
    assert_eq!(contents.param("path"), "src/lib.rs");
    assert!(api.operation("GET", "/repos/o/r/no-such-thing").is_none());
}

#[tokio::test]
async fn octocrab_reads_a_repository_its_contents_and_commits() {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Public).await;
    let sha = github
        .commit(REPO, "main", &[("ci/testbot.toml", "jobs = 1\n")], "Add CI")
        .await;
    github.create_branch(REPO, "topic", &sha).await;
    let token = github.user_token("hpc-lab");
    let client = octocrab(&github, Some(&token));

    let repo = client.repos("hpc-lab", "app").get().await.unwrap();
    assert_eq!(repo.id.0, repository_id(REPO));
    assert_eq!(repo.default_branch.as_deref(), Some("main"));
    assert_eq!(repo.clone_url.unwrap().as_str(), github.git_url(REPO));
    assert!(repo.permissions.unwrap().admin);

    let mut contents = client
        .repos("hpc-lab", "app")
        .get_content()
        .path("ci/testbot.toml")
        .r#ref(sha.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        contents.take_items()[0].decoded_content().as_deref(),
        Some("jobs = 1\n")
    );
    let listing = client
        .repos("hpc-lab", "app")
        .get_content()
        .path("ci")
        .send()
        .await
        .unwrap();
    assert_eq!(listing.items.len(), 1);
    assert_eq!(
        (
            listing.items[0].path.as_str(),
            listing.items[0].r#type.as_str()
        ),
        ("ci/testbot.toml", "file")
    );
    let missing = client
        .repos("hpc-lab", "app")
        .get_content()
        .path("nope.txt")
        .send()
        .await;
    assert!(
        matches!(missing, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == 404),
        "{missing:?}"
    );

    let commit = client.commits("hpc-lab", "app").get(&sha).await.unwrap();
    assert_eq!(commit.sha, sha);
    assert_eq!(commit.files.unwrap()[0].filename, "ci/testbot.toml");

    let branch: Value = client
        .get("/repos/hpc-lab/app/branches/topic", None::<&()>)
        .await
        .unwrap();
    assert_eq!(branch["commit"]["sha"], sha.as_str());

    // Anonymous reads of a public repository work.
    let anonymous = octocrab(&github, None);
    assert_eq!(
        anonymous.repos("hpc-lab", "app").get().await.unwrap().id.0,
        repository_id(REPO)
    );
    github.assert_conforms();
}

#[tokio::test]
async fn a_compare_counts_commits_from_the_git_history() {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Public).await;
    let base = github.resolve(REPO, "main").await.unwrap();
    github.create_branch(REPO, "topic", &base).await;
    github.commit(REPO, "topic", &[("a.txt", "a")], "One").await;
    let head = github.commit(REPO, "topic", &[("b.txt", "b")], "Two").await;
    let client = octocrab(&github, None);
    let compare = client
        .commits("hpc-lab", "app")
        .compare("main", "topic")
        .send()
        .await
        .unwrap();
    assert_eq!(
        (compare.ahead_by, compare.behind_by, compare.total_commits),
        (2, 0, 2)
    );
    assert_eq!(format!("{:?}", compare.status), "Ahead");
    github
        .commit(REPO, "main", &[("c.txt", "c")], "Three")
        .await;
    let compare: Value = client
        .get(
            format!("/repos/hpc-lab/app/compare/main...{head}"),
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(
        (
            compare["status"].as_str(),
            compare["ahead_by"].as_u64(),
            compare["behind_by"].as_u64()
        ),
        (Some("diverged"), Some(2), Some(1))
    );
    let compare: Value = client
        .get(
            format!("/repos/hpc-lab/app/compare/{head}...main"),
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(compare["status"], "diverged");
    let identical: Value = client
        .get("/repos/hpc-lab/app/compare/main...main", None::<&()>)
        .await
        .unwrap();
    assert_eq!(identical["status"], "identical");
    github.assert_conforms();
}

#[tokio::test]
async fn check_runs_are_created_and_updated_with_an_installation_token() {
    let (github, _, token) = installed().await;
    let sha = github.resolve(REPO, "main").await.unwrap();
    let client = octocrab(&github, Some(&token));
    let checks = client.checks("hpc-lab", "app");
    let run = checks
        .create_check_run("testbot / gpu", sha.clone())
        .status(CheckRunStatus::InProgress)
        .details_url("https://testbot.example/jobs/1")
        .external_id("job-1")
        .send()
        .await
        .unwrap();
    let updated = checks
        .update_check_run(run.id)
        .conclusion(CheckRunConclusion::Success)
        .output(CheckRunOutput {
            title: "Passed".into(),
            summary: "All 3 tests passed.".into(),
            text: Some("details".into()),
            annotations: vec![],
            images: vec![],
        })
        .send()
        .await
        .unwrap();
    assert_eq!(updated.id, run.id);
    let fetched = checks
        .get_check_run(CheckRunId(run.id.0))
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.conclusion.as_deref(), Some("success"));
    // An injected failure answers once, in GitHub's error shape, and leaves the model alone.
    github.fail_next(
        "PATCH",
        "/repos/{owner}/{repo}/check-runs/{check_run_id}",
        502,
    );
    let failed = checks
        .update_check_run(run.id)
        .status(CheckRunStatus::InProgress)
        .send()
        .await;
    assert!(
        matches!(failed, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == 502),
        "{failed:?}"
    );
    let listed = checks
        .list_check_runs_for_git_ref(octocrab::params::repos::Commitish(sha.clone()))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.total_count, 1);

    let runs = github.check_runs(REPO);
    assert_eq!(runs.len(), 1);
    let history: Vec<(&str, Option<&str>)> = runs[0]
        .history
        .iter()
        .map(|s| (s.status.as_str(), s.conclusion.as_deref()))
        .collect();
    assert_eq!(
        history,
        [("in_progress", None), ("completed", Some("success"))]
    );
    assert_eq!(
        runs[0].current().output.summary.as_deref(),
        Some("All 3 tests passed.")
    );
    assert_eq!(
        runs[0].current().details_url.as_deref(),
        Some("https://testbot.example/jobs/1")
    );

    // A user's token may not create check runs, a read-only one may not write at all.
    let user = github.user_token("hpc-lab");
    let (status, _) = status_of(
        &github,
        reqwest::Method::POST,
        "/repos/hpc-lab/app/check-runs",
        Some(&user),
        Some(json!({"name": "x", "head_sha": sha})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = status_of(
        &github,
        reqwest::Method::POST,
        "/repos/hpc-lab/app/check-runs",
        Some(&token),
        Some(json!({"name": "x", "head_sha": "main"})),
    )
    .await;
    assert_eq!(status, 422, "a check run's head_sha is a full sha");
    let reader = github.read_only_token(&[REPO]);
    let (status, _) = status_of(
        &github,
        reqwest::Method::POST,
        "/repos/hpc-lab/app/check-runs",
        Some(&reader),
        Some(json!({"name": "x", "head_sha": sha})),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        Some(&reader),
        None,
    )
    .await;
    assert_eq!(status, 200);
    github.assert_conforms();
}

#[tokio::test]
async fn a_bad_request_body_is_a_violation_and_answered_422() {
    let (github, _, token) = installed().await;
    let sha = github.resolve(REPO, "main").await.unwrap();
    let (status, body) = status_of(
        &github,
        reqwest::Method::POST,
        "/repos/hpc-lab/app/check-runs",
        Some(&token),
        Some(json!({"head_sha": sha, "conclusion": "great"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(body["message"].is_string());
    let violations = github.violations();
    assert!(
        violations
            .iter()
            .any(|v| v.contains("POST /repos/hpc-lab/app/check-runs") && v.contains("\"name\"")),
        "{violations:?}"
    );
    assert!(
        violations.iter().any(|v| v.contains("great")),
        "{violations:?}"
    );
    // GitHub's schema also ties fields together: completing a run needs a conclusion.
    let run: Value = octocrab(&github, Some(&token))
        .post(
            "/repos/hpc-lab/app/check-runs",
            Some(&json!({"name": "x", "head_sha": sha})),
        )
        .await
        .unwrap();
    let path = format!("/repos/hpc-lab/app/check-runs/{}", run["id"]);
    let (status, _) = status_of(
        &github,
        reqwest::Method::PATCH,
        &path,
        Some(&token),
        Some(json!({"status": "completed"})),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        github
            .violations()
            .iter()
            .any(|v| v.starts_with("PATCH") && v.contains("anyOf")),
        "{:?}",
        github.violations()
    );
    // Neither the bad create nor the bad update reached the model.
    let runs = github.check_runs(REPO);
    assert_eq!((runs.len(), runs[0].history.len()), (1, 1));

    let failed = std::panic::catch_unwind(|| github.assert_conforms());
    assert!(
        failed.is_err(),
        "assert_conforms passes despite a bad body: is the check off?"
    );

    // An unknown route is GitHub's 404, and a violation.
    let github = FakeGitHub::start_app().await;
    let (status, body) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app/no-such-thing",
        None,
        None,
    )
    .await;
    assert_eq!((status, body["message"].as_str()), (404, Some("Not Found")));
    assert!(body["documentation_url"].is_string());
    assert_eq!(github.violations().len(), 1, "{:?}", github.violations());
}

#[tokio::test]
async fn installation_tokens_come_from_a_valid_jwt_and_expire() {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Private).await;
    github
        .create_repo("hpc-lab/other", Visibility::Private)
        .await;
    let installation = github.install("hpc-lab", &[REPO]).await;

    let app = octocrab(&github, Some(&github.app_jwt()));
    let found: Value = app
        .get("/repos/hpc-lab/app/installation", None::<&()>)
        .await
        .unwrap();
    assert_eq!(found["id"], installation.id);
    let me: Value = app.get("/app", None::<&()>).await.unwrap();
    assert_eq!(me["id"], APP_ID);

    // A JWT that lives longer than ten minutes is refused, as GitHub does.
    let now = jwt::unix_now();
    let long = jwt::sign_app_jwt(APP_ID, &github.app_private_key_pem, now, now + 3600);
    let path = format!("/app/installations/{}/access_tokens", installation.id);
    let (status, body) = status_of(&github, reqwest::Method::POST, &path, Some(&long), None).await;
    assert_eq!(status, 401, "{body}");

    let token = installation_token(&github, installation.id).await;
    let client = octocrab(&github, Some(&token));
    let repos: Value = client
        .get("/installation/repositories", None::<&()>)
        .await
        .unwrap();
    assert_eq!(repos["total_count"], 1);
    assert_eq!(repos["repositories"][0]["full_name"], REPO);
    assert!(client.repos("hpc-lab", "app").get().await.is_ok());
    let other = client.repos("hpc-lab", "other").get().await;
    assert!(
        matches!(other, Err(octocrab::Error::GitHub { ref source, .. }) if source.status_code == 404),
        "{other:?}"
    );
    // Private repositories are invisible without a token.
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        None,
        None,
    )
    .await;
    assert_eq!(status, 404);

    github.expire_installation_tokens();
    let (status, body) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("Bad credentials"))
    );
    let fresh = installation_token(&github, installation.id).await;
    assert_ne!(fresh, token);
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        Some(&fresh),
        None,
    )
    .await;
    assert_eq!(status, 200);

    // Tokens live as long as the fake is told; a zero lifetime makes them stale at once.
    github.set_token_lifetime(std::time::Duration::ZERO);
    let stale = installation_token(&github, installation.id).await;
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        Some(&stale),
        None,
    )
    .await;
    assert_eq!(status, 401);

    let requests = github.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.token.as_deref() == Some(fresh.as_str()) && r.status == 200)
    );
    assert!(requests.iter().any(|r| r.identity == Identity::App
        && r.template.as_deref() == Some("/app/installations/{installation_id}/access_tokens")
        && r.status == 201));
    assert!(
        requests
            .iter()
            .any(|r| r.identity == Identity::Installation(installation.id))
    );
    github.assert_conforms();
}

#[tokio::test]
async fn comments_reactions_reviews_and_permissions_through_octocrab() {
    let (github, _, token) = installed().await;
    github.deliver_webhooks_to(None);
    github
        .create_branch(REPO, "topic", &github.resolve(REPO, "main").await.unwrap())
        .await;
    let head = github
        .commit(REPO, "topic", &[("x.txt", "x")], "Change")
        .await;
    let pr = github
        .open_pull_request(REPO, "main", REPO, "topic", "alice", "A change")
        .await;
    github.set_permission(REPO, "alice", Permission::Write);
    github.set_permission(REPO, "bob", Permission::Triage);
    let review = github
        .review(REPO, pr.number, "bob", ReviewState::Approved, "Looks good")
        .await;
    let client = octocrab(&github, Some(&token));

    let comment = client
        .issues("hpc-lab", "app")
        .create_comment(pr.number, "testbot: queued")
        .await
        .unwrap();
    let reaction = client
        .issues("hpc-lab", "app")
        .create_comment_reaction(
            comment.id,
            octocrab::models::reactions::ReactionContent::Rocket,
        )
        .await
        .unwrap();
    // A comment made through the API is announced too, as GitHub does (the App sees its own).
    let announced = github.take_deliveries();
    let last = announced.last().unwrap();
    assert_eq!(
        (last.event.as_str(), last.action()),
        ("issue_comment", Some("created"))
    );
    assert_eq!(
        last.payload["comment"]["user"]["login"],
        "testbot-fake[bot]"
    );
    assert_eq!(last.payload["comment"]["id"], comment.id.0);
    let stored = github.comments(REPO, pr.number);
    assert_eq!(
        (stored.len(), stored[0].id, stored[0].author.as_str()),
        (1, comment.id.0, "testbot-fake[bot]")
    );
    assert_eq!(github.reactions(comment.id.0)[0].id, reaction.id.0);
    let fetched = client
        .issues("hpc-lab", "app")
        .get_comment(comment.id)
        .await
        .unwrap();
    assert_eq!(fetched.body.as_deref(), Some("testbot: queued"));

    let reviews = client
        .pulls("hpc-lab", "app")
        .list_reviews(pr.number)
        .send()
        .await
        .unwrap();
    assert_eq!(reviews.items[0].id.0, review.id);
    assert_eq!(reviews.items[0].commit_id.as_deref(), Some(head.as_str()));
    let one: Value = client
        .get(
            format!(
                "/repos/hpc-lab/app/pulls/{}/reviews/{}",
                pr.number, review.id
            ),
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(one["state"], "APPROVED");
    let fetched = client.pulls("hpc-lab", "app").get(pr.number).await.unwrap();
    assert_eq!(fetched.head.sha, head);
    assert_eq!(
        (fetched.commits, fetched.additions, fetched.changed_files),
        (Some(1), Some(1), Some(1))
    );
    let files = client
        .pulls("hpc-lab", "app")
        .list_files(pr.number)
        .await
        .unwrap();
    assert_eq!(files.items[0].filename, "x.txt");
    let by_commit: Value = client
        .get(
            format!("/repos/hpc-lab/app/commits/{head}/pulls"),
            None::<&()>,
        )
        .await
        .unwrap();
    assert_eq!(by_commit[0]["number"], pr.number);

    for (login, role, legacy) in [
        ("alice", "write", "write"),
        ("bob", "triage", "read"),
        ("hpc-lab", "admin", "admin"),
    ] {
        let permission: Value = client
            .get(
                format!("/repos/hpc-lab/app/collaborators/{login}/permission"),
                None::<&()>,
            )
            .await
            .unwrap();
        assert_eq!(
            (
                permission["role_name"].as_str(),
                permission["permission"].as_str()
            ),
            (Some(role), Some(legacy)),
            "{login}"
        );
    }

    let commit_comment = client
        .commits("hpc-lab", "app")
        .create_comment(&head, "Built.")
        .send()
        .await
        .unwrap();
    assert_eq!(github.commit_comments(REPO)[0].id, commit_comment.id.0);
    github.assert_conforms();
}

async fn git_cli(args: &[&str], dir: &std::path::Path) -> std::process::Output {
    tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn with_credentials(url: &str, token: &str) -> String {
    url.replacen("http://", &format!("http://x-access-token:{token}@"), 1)
}

#[tokio::test]
async fn git_clones_and_fetches_exact_commits_over_http() {
    let (github, _, token) = installed().await;
    github
        .create_repo("hpc-lab/public", Visibility::Public)
        .await;
    let public_sha = github
        .commit("hpc-lab/public", "main", &[("a", "1")], "One")
        .await;
    github
        .commit("hpc-lab/public", "main", &[("a", "2")], "Two")
        .await;
    let work = tempfile::tempdir().unwrap();

    let out = git_cli(
        &[
            "clone",
            "--quiet",
            &github.git_url("hpc-lab/public"),
            "public",
        ],
        work.path(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetch = git_cli(&["init", "--quiet", "exact"], work.path()).await;
    assert!(fetch.status.success());
    let exact = work.path().join("exact");
    let out = git_cli(
        &[
            "fetch",
            "--quiet",
            &github.git_url("hpc-lab/public"),
            &public_sha,
        ],
        &exact,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let private = github.git_url(REPO);
    let refused = git_cli(&["clone", "--quiet", &private, "refused"], work.path()).await;
    assert!(!refused.status.success());
    let wrong = git_cli(
        &[
            "clone",
            "--quiet",
            &with_credentials(&private, "ghs_wrong"),
            "wrong",
        ],
        work.path(),
    )
    .await;
    assert!(!wrong.status.success());
    let out = git_cli(
        &[
            "clone",
            "--quiet",
            &with_credentials(&private, &token),
            "private",
        ],
        work.path(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(work.path().join("private/README.md").exists());
}

#[tokio::test]
async fn a_fork_pull_request_head_is_fetchable_from_the_base() {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Public).await;
    let fork = github.fork(REPO, "contributor").await;
    assert_eq!(fork.parent.as_deref(), Some(REPO));
    let head = github
        .commit("contributor/app", "fix", &[("fix.txt", "fixed")], "Fix")
        .await;
    let pr = github
        .open_pull_request(
            REPO,
            "main",
            "contributor/app",
            "fix",
            "contributor",
            "Fix it",
        )
        .await;
    assert_eq!(
        github
            .resolve(REPO, &format!("refs/pull/{}/head", pr.number))
            .await
            .as_deref(),
        Some(head.as_str())
    );

    let work = tempfile::tempdir().unwrap();
    assert!(
        git_cli(&["init", "--quiet", "."], work.path())
            .await
            .status
            .success()
    );
    let reference = format!("refs/pull/{}/head", pr.number);
    let out = git_cli(
        &["fetch", "--quiet", &github.git_url(REPO), &reference],
        work.path(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rev = git_cli(&["rev-parse", "FETCH_HEAD"], work.path()).await;
    assert_eq!(String::from_utf8_lossy(&rev.stdout).trim(), head);
    // The base itself has the commit: fetch it by sha.
    let out = git_cli(
        &["fetch", "--quiet", &github.git_url(REPO), &head],
        work.path(),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A push to the fork's branch moves the pull request's head in the base.
    let next = github
        .push_to_pull_request(REPO, pr.number, &[("fix.txt", "fixed again")], "Again")
        .await;
    assert_eq!(
        github.resolve(REPO, &reference).await.as_deref(),
        Some(next.as_str())
    );
    assert_eq!(github.pull_request(REPO, pr.number).head_sha, next);

    let pull = octocrab(&github, None)
        .pulls("hpc-lab", "app")
        .get(pr.number)
        .await
        .unwrap();
    assert_eq!(
        pull.head.repo.unwrap().full_name.as_deref(),
        Some("contributor/app")
    );
    github.assert_conforms();
}

#[tokio::test]
async fn model_actions_emit_webhooks_with_the_models_values() {
    let github = FakeGitHub::start_app().await;
    let repo = github.create_repo(REPO, Visibility::Public).await;
    let installation = github.install("hpc-lab", &[REPO]).await;
    let fork = github.fork(REPO, "contributor").await;
    let head = github
        .commit("contributor/app", "fix", &[("f", "1")], "Fix")
        .await;
    let pr = github
        .open_pull_request(REPO, "main", "contributor/app", "fix", "contributor", "Fix")
        .await;
    let next = github
        .push_to_pull_request(REPO, pr.number, &[("f", "2")], "Again")
        .await;
    let comment = github
        .comment(REPO, pr.number, "maintainer", "@testbot run")
        .await;
    github.edit_comment(comment.id, "@testbot run gpu").await;
    let review = github
        .review(REPO, pr.number, "maintainer", ReviewState::Approved, "")
        .await;
    let merge = github.merge(REPO, pr.number, "maintainer").await;
    github.ping().await;

    let deliveries = github.take_deliveries();
    let kinds: Vec<(&str, Option<&str>)> = deliveries
        .iter()
        .map(|d| (d.event.as_str(), d.action()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("installation", Some("created")),
            ("push", None),
            ("pull_request", Some("opened")),
            ("push", None),
            ("pull_request", Some("synchronize")),
            ("issue_comment", Some("created")),
            ("issue_comment", Some("edited")),
            ("pull_request_review", Some("submitted")),
            ("pull_request", Some("closed")),
            ("push", None),
            ("ping", None),
        ]
    );
    let [
        created,
        push,
        opened,
        _,
        sync,
        commented,
        edited,
        reviewed,
        closed,
        merged_push,
        ping,
    ] = deliveries.as_slice()
    else {
        unreachable!()
    };
    assert_eq!(created.payload["installation"]["id"], installation.id);
    assert_eq!(created.payload["repositories"][0]["id"], repo.id);
    assert_eq!(
        (push.payload["after"].as_str(), push.payload["ref"].as_str()),
        (Some(head.as_str()), Some("refs/heads/fix"))
    );
    assert_eq!(push.payload["repository"]["id"], fork.id);
    assert_eq!(opened.payload["pull_request"]["number"], pr.number);
    assert_eq!(
        opened.payload["pull_request"]["head"]["repo"]["full_name"],
        "contributor/app"
    );
    assert_eq!(opened.payload["pull_request"]["head"]["sha"], head.as_str());
    assert_eq!(opened.payload["repository"]["id"], repo.id);
    assert_eq!(opened.payload["installation"]["id"], installation.id);
    assert_eq!(opened.payload["sender"]["login"], "contributor");
    assert_eq!(
        (
            sync.payload["before"].as_str(),
            sync.payload["after"].as_str()
        ),
        (Some(head.as_str()), Some(next.as_str()))
    );
    assert_eq!(commented.payload["comment"]["id"], comment.id);
    assert_eq!(commented.payload["comment"]["user"]["login"], "maintainer");
    assert_eq!(commented.payload["issue"]["number"], pr.number);
    assert!(commented.payload["issue"]["pull_request"].is_object());
    assert_eq!(edited.payload["comment"]["body"], "@testbot run gpu");
    assert_eq!(edited.payload["changes"]["body"]["from"], "@testbot run");
    assert_eq!(reviewed.payload["review"]["id"], review.id);
    assert_eq!(reviewed.payload["review"]["commit_id"], next.as_str());
    assert_eq!(closed.payload["pull_request"]["merged"], true);
    assert_eq!(
        closed.payload["pull_request"]["merge_commit_sha"],
        merge.as_str()
    );
    assert_eq!(
        (
            merged_push.payload["ref"].as_str(),
            merged_push.payload["after"].as_str()
        ),
        (Some("refs/heads/main"), Some(merge.as_str()))
    );
    assert_eq!(ping.payload["hook_id"], 55_500_001);
    assert!(deliveries.iter().all(|d| d.id.len() == 36));
    assert_eq!(push.payload["head_commit"]["id"], head.as_str());
    assert_eq!(push.payload["commits"][0]["added"][0], "f");
    // The broker reads webhooks with octocrab's models: each payload must fit them.
    for delivery in &deliveries {
        let parsed = octocrab::models::webhook_events::WebhookEvent::try_from_header_and_body(
            &delivery.event,
            &delivery.body(),
        );
        assert!(
            parsed.is_ok(),
            "{} {:?}: {parsed:?}",
            delivery.event,
            delivery.action()
        );
    }

    // Check run buttons and uninstalling.
    let sha = github.resolve(REPO, "main").await.unwrap();
    let token = installation_token(&github, installation.id).await;
    // octocrab's builder has no `actions`; the broker posts them as JSON.
    let run: octocrab::models::checks::CheckRun = octocrab(&github, Some(&token))
        .post(
            "/repos/hpc-lab/app/check-runs",
            Some(&json!({
                "name": "testbot",
                "head_sha": sha,
                "actions": [{"label": "Cancel", "description": "Cancel the job", "identifier": "cancel"}],
            })),
        )
        .await
        .unwrap();
    github.rerequest_check_run(run.id.0, "maintainer").await;
    github
        .request_check_run_action(run.id.0, "cancel", "maintainer")
        .await;
    github.uninstall(installation.id).await;
    let deliveries = github.take_deliveries();
    let kinds: Vec<(&str, Option<&str>)> = deliveries
        .iter()
        .map(|d| (d.event.as_str(), d.action()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("check_run", Some("rerequested")),
            ("check_run", Some("requested_action")),
            ("installation", Some("deleted"))
        ]
    );
    assert_eq!(deliveries[0].payload["check_run"]["id"], run.id.0);
    for delivery in &deliveries {
        let parsed = octocrab::models::webhook_events::WebhookEvent::try_from_header_and_body(
            &delivery.event,
            &delivery.body(),
        );
        assert!(
            parsed.is_ok(),
            "{} {:?}: {parsed:?}",
            delivery.event,
            delivery.action()
        );
    }
    assert_eq!(
        deliveries[1].payload["requested_action"]["identifier"],
        "cancel"
    );
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app/check-runs/1",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(status, 401, "an uninstalled App's tokens stop working");
    github.assert_conforms();
}

#[tokio::test]
async fn deliveries_are_signed_and_can_be_sent_twice_or_with_a_wrong_signature() {
    use axum::http::HeaderMap;
    type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;
    let received: Received = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/webhook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push((headers, body.to_vec()));
                axum::http::StatusCode::ACCEPTED
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Public).await;
    github.deliver_webhooks_to(Some(&url));
    github.commit(REPO, "main", &[("a", "1")], "One").await;
    let sent = github.sent_deliveries();
    assert_eq!((sent.len(), sent[0].status.clone()), (1, Ok(202)));
    let delivery = sent[0].delivery.clone();
    assert_eq!(github.send(&delivery, &url).await.unwrap(), 202);
    assert_eq!(
        delivery
            .send_with_signature(&url, "sha256=00")
            .await
            .unwrap(),
        202
    );

    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 3);
    let header = |i: usize, name: &str| {
        received[i]
            .0
            .get(name)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(header(0, "x-github-event"), "push");
    assert_eq!(
        header(0, "x-github-delivery"),
        header(1, "x-github-delivery")
    );
    assert_eq!(header(0, "x-github-hook-id"), "55500001");
    assert_eq!(
        header(0, "x-github-hook-installation-target-id"),
        APP_ID.to_string()
    );
    assert!(header(0, "user-agent").starts_with("GitHub-Hookshot/"));
    assert_eq!(header(0, "content-type"), "application/json");
    assert_eq!(
        header(0, "x-hub-signature-256"),
        webhooks::signature(&github.webhook_secret, &received[0].1)
    );
    assert_eq!(header(2, "x-hub-signature-256"), "sha256=00");
    server.abort();
}

#[tokio::test]
async fn start_keeps_serving_users_by_token() {
    let github = FakeGitHub::start(HashMap::from([(
        "ghp_admin".to_string(),
        FakeUser {
            login: "maintainer".into(),
            admin_of: vec![REPO.into()],
            reader_of: vec![],
        },
    )]))
    .await;
    let (status, user) = status_of(
        &github,
        reqwest::Method::GET,
        "/user",
        Some("ghp_admin"),
        None,
    )
    .await;
    assert_eq!((status, user["login"].as_str()), (200, Some("maintainer")));
    let (status, repo) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/app",
        Some("ghp_admin"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(repo["id"], repository_id(REPO));
    assert_eq!(repo["owner"]["id"], owner_id("hpc-lab"));
    assert_eq!(repo["permissions"]["admin"], true);
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/user",
        Some("ghp_invalid"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = status_of(
        &github,
        reqwest::Method::GET,
        "/repos/hpc-lab/private",
        Some("ghp_admin"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    github.assert_conforms();
}

#[tokio::test]
async fn tags_and_force_pushes_are_pushes() {
    let github = FakeGitHub::start_app().await;
    github.create_repo(REPO, Visibility::Public).await;
    let first = github.resolve(REPO, "main").await.unwrap();
    let second = github.commit(REPO, "main", &[("a", "1")], "One").await;
    github.create_tag(REPO, "v1.0", &second).await;
    github.force_push(REPO, "main", &first).await;
    let deliveries = github.take_deliveries();
    let pushes: Vec<(&str, &str, &str, bool)> = deliveries
        .iter()
        .map(|d| {
            let p = &d.payload;
            let text = |key: &str| p[key].as_str().unwrap_or_default();
            (
                text("ref"),
                text("before"),
                text("after"),
                p["forced"] == true,
            )
        })
        .collect();
    assert_eq!(
        pushes,
        [
            ("refs/heads/main", first.as_str(), second.as_str(), false),
            (
                "refs/tags/v1.0",
                "0000000000000000000000000000000000000000",
                second.as_str(),
                false
            ),
            ("refs/heads/main", second.as_str(), first.as_str(), true),
        ]
    );
    assert_eq!(deliveries[1].payload["created"], true);
    assert_eq!(
        github.resolve(REPO, "v1.0").await.as_deref(),
        Some(second.as_str())
    );
    assert_eq!(
        github.resolve(REPO, "main").await.as_deref(),
        Some(first.as_str())
    );
}
