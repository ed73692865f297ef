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
