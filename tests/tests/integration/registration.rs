//! Who may create, change and remove a repository's registration, and what a registration is
//! bound to. A workflow token is held by any branch or pull request of the repository, so it
//! may at most create the first registration, and only when the operator allows that.

use testbot_e2e::refusal;
use testbot_e2e::{AUDIENCE, Fleet};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

fn main_push_only() -> RepoRegistration {
    RepoRegistration {
        name: REPO.into(),
        refs: vec!["refs/heads/main".into()],
        events: vec!["push".into()],
        ..RepoRegistration::default()
    }
}

/// A token of a pull request from a feature branch of `REPO`.
fn feature_branch_token(fleet: &Fleet) -> String {
    let issuer = fleet.issuer();
    let mut claims = issuer.claims(REPO, AUDIENCE);
    claims["ref"] = "refs/heads/feature".into();
    claims["event_name"] = "pull_request".into();
    issuer.mint(&claims)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_feature_branch_workflow_cannot_widen_or_remove_its_registration() {
    // Even with self-registration on, a workflow never changes an existing registration.
    let fleet = Fleet::start_oidc(|config| config.settings.allow_self_registration = true).await;
    let operator = fleet.client();
    operator.register_repo(&main_push_only()).await.unwrap();
    let before = operator.repo(REPO).await.unwrap();

    let widened = RepoRegistration {
        name: REPO.into(),
        refs: vec!["*".into()],
        events: vec![
            "push".into(),
            "pull_request".into(),
            "pull_request_target".into(),
        ],
        sites: vec![],
    };
    let attacker = fleet.client_with(&feature_branch_token(&fleet));
    let (status, message) = refusal(attacker.register_repo(&widened).await);
    assert_eq!(status, 403, "{message}");
    assert_eq!(
        message,
        format!(
            "repository {REPO} is registered already, and a workflow token cannot change a \
             registration; the operator or an admin of {REPO} (with a GitHub token) changes it"
        )
    );
    // Nor by removing it first and registering it again.
    let (status, message) = refusal(attacker.remove_repo(REPO).await);
    assert_eq!(status, 403, "{message}");
    assert_eq!(
        message,
        format!(
            "a workflow token cannot remove a registration; the operator or an admin of {REPO} \
             (with a GitHub token) removes it"
        )
    );
    let (status, message) = refusal(fleet.workflow(REPO).remove_repo(REPO).await);
    assert_eq!(status, 403, "{message}");

    assert_eq!(operator.repo(REPO).await.unwrap(), before);
    // The refused attempts did not open the gate either.
    let (status, message) = refusal(
        attacker
            .submit(&testbot_proto::jobs::JobSpec {
                script: "true".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(
        (status, message.as_str()),
        (
            403,
            "event pull_request is not enabled for repository hpc-lab/solver (enabled: [push])"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workflows_register_their_repository_only_when_the_operator_allows_it() {
    let fleet = Fleet::start_oidc(|_| {}).await;
    let (status, message) = refusal(
        fleet
            .workflow(REPO)
            .register_repo(&RepoRegistration {
                name: REPO.into(),
                ..RepoRegistration::default()
            })
            .await,
    );
    assert_eq!(status, 403, "{message}");
    assert_eq!(
        message,
        format!(
            "this broker does not let workflows register repositories: the operator registers \
             {REPO} (or an admin of it, with a GitHub token), or starts the broker with \
             --allow-self-registration"
        )
    );
    assert!(fleet.client().repos().await.unwrap().repos.is_empty());

    let fleet = Fleet::start_oidc(|config| config.settings.allow_self_registration = true).await;
    let repo = fleet
        .workflow(REPO)
        .register_repo(&main_push_only())
        .await
        .expect("the first registration");
    assert!(repo.registered_by.starts_with("workflow:"), "{repo:?}");
}

/// Submits a job from a token of `REPO` whose claims `change` alters.
async fn submit_as(fleet: &Fleet, change: impl FnOnce(&mut serde_json::Value)) -> (u16, String) {
    let issuer = fleet.issuer();
    let mut claims = issuer.claims(REPO, AUDIENCE);
    change(&mut claims);
    match fleet
        .client_with(&issuer.mint(&claims))
        .submit(&testbot_proto::jobs::JobSpec {
            script: "true".into(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => (201, String::new()),
        Err(err) => refusal::<()>(Err(err)),
    }
}

fn recreated_message(bound: (&str, &str), presented: (&str, &str)) -> String {
    format!(
        "repository {REPO} is registered for repository id {} (owner id {}), but this token \
         comes from repository id {} (owner id {}): the repository or its owner was renamed, \
         transferred or deleted and the name taken again; the operator removes the registration \
         and registers the repository again if this one is meant",
        bound.0, bound.1, presented.0, presented.1
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_recreated_under_a_registered_name_does_not_inherit_the_registration() {
    let fleet = Fleet::start_oidc(|_| {}).await;
    fleet.enroll_taking_workflow_jobs("any-job").await;
    let operator = fleet.client();
    operator
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    assert_eq!(operator.repo(REPO).await.unwrap().repository_id, None);

    // The first token binds the operator's registration to its repository (the test issuer's
    // claims carry repository_id 123456 and repository_owner_id 1000).
    assert_eq!(submit_as(&fleet, |_| {}).await.0, 201);
    let repo = operator.repo(REPO).await.unwrap();
    assert_eq!(repo.repository_id.as_deref(), Some("123456"));
    assert_eq!(repo.repository_owner_id.as_deref(), Some("1000"));
    assert_eq!(submit_as(&fleet, |_| {}).await.0, 201);

    // The repository was deleted and another one created under its name.
    let (status, message) = submit_as(&fleet, |c| c["repository_id"] = "999999".into()).await;
    assert_eq!(
        (status, message),
        (
            403,
            recreated_message(("123456", "1000"), ("999999", "1000"))
        )
    );
    // The owner account was deleted and its name taken by someone else, who made a repository
    // of the same name (it gets a new id too, but the owner id alone must also be refused).
    let (status, message) = submit_as(&fleet, |c| c["repository_owner_id"] = "666".into()).await;
    assert_eq!(
        (status, message),
        (
            403,
            recreated_message(("123456", "1000"), ("123456", "666"))
        )
    );
    let (status, _) = submit_as(&fleet, |c| {
        c.as_object_mut().unwrap().remove("repository_owner_id");
    })
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        operator.repo(REPO).await.unwrap().repository_id.as_deref(),
        Some("123456")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_github_admin_registration_is_bound_to_the_ids_github_reports() {
    use testbot_e2e::github::{FakeGitHub, FakeUser, owner_id, repository_id};
    let github = FakeGitHub::start(std::collections::HashMap::from([(
        "ghp_admin".to_string(),
        FakeUser {
            login: "maintainer".into(),
            admin_of: vec![REPO.into()],
            reader_of: vec![],
        },
    )]))
    .await;
    let github_url = github.url.clone();
    let fleet = Fleet::start_oidc(move |config| config.github_api_url = github_url).await;
    fleet.enroll_taking_workflow_jobs("any-job").await;
    let repo = fleet
        .client_with("ghp_admin")
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let (id, owner) = (
        repository_id(REPO).to_string(),
        owner_id("hpc-lab").to_string(),
    );
    assert_eq!(repo.repository_id.as_deref(), Some(id.as_str()));
    assert_eq!(repo.repository_owner_id.as_deref(), Some(owner.as_str()));

    // A token of another repository that took the name is refused from the start.
    let (status, message) = submit_as(&fleet, |_| {}).await;
    assert_eq!(
        (status, message),
        (403, recreated_message((&id, &owner), ("123456", "1000")))
    );
    let (status, _) = submit_as(&fleet, |c| {
        c["repository_id"] = id.clone().into();
        c["repository_owner_id"] = owner.clone().into();
    })
    .await;
    assert_eq!(status, 201);
}
