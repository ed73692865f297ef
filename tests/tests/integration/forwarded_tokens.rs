//! The token that submitted a job is handed to every agent that claims it. An agent (of any
//! site the job could go to) must not be able to use it against the repository's registration
//! or the run's other jobs.

use testbot_e2e::{AUDIENCE, Fleet, refusal};
use testbot_proto::agents::PollRequest;
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

const REPO: &str = "hpc-lab/solver";

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_use_a_claimed_jobs_token_against_the_registration_or_sibling_jobs() {
    let fleet = Fleet::start_oidc(|_| {}).await;
    let operator = fleet.client();
    operator
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let registration = operator.repo(REPO).await.unwrap();
    let agent = fleet.enroll_taking_workflow_jobs("curious").await;

    // Two jobs of one workflow run (a matrix), each submitted with its own token.
    let issuer = fleet.issuer();
    let run = issuer.claims(REPO, AUDIENCE);
    let token_of_run = || {
        let mut claims = issuer.claims(REPO, AUDIENCE);
        claims["run_id"] = run["run_id"].clone();
        issuer.mint(&claims)
    };
    let spec = |script: &str| JobSpec {
        script: script.into(),
        ..Default::default()
    };
    let first_token = token_of_run();
    let first = fleet
        .client_with(&first_token)
        .submit(&spec("echo one"))
        .await
        .unwrap();
    let sibling = fleet
        .client_with(&token_of_run())
        .submit(&spec("echo two"))
        .await
        .unwrap();

    let assignment = agent
        .client
        .poll(&PollRequest {
            agent: "curious".into(),
            labels: vec![],
            executor: "shell".into(),
            wait_ms: Some(0),
            policy: None,
            workflow_jobs_without_policy: true,
        })
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(assignment.job_id, first.id);
    let forwarded = assignment.oidc_token.expect("the job's token");
    assert_eq!(forwarded, first_token);
    let stolen = fleet.client_with(&forwarded);

    let (status, message) = refusal(stolen.remove_repo(REPO).await);
    assert_eq!(status, 403, "{message}");
    let (status, message) = refusal(stolen.cancel(sibling.id).await);
    assert_eq!(status, 403, "{message}");
    assert_eq!(
        message,
        format!(
            "this token was used already (submitting a job hands it to the agents that run it), \
             so it cannot cancel job {}; cancel with a fresh token of the run",
            sibling.id
        )
    );
    let (status, message) = refusal(stolen.job(sibling.id).await);
    assert_eq!(status, 403, "{message}");
    assert_eq!(
        message,
        format!(
            "this token was used already (it submitted another job, which hands it to the agents \
             that run it), so it may read only that job, not job {}; request a fresh token",
            sibling.id
        )
    );
    let (status, _) = refusal(stolen.log_stream(sibling.id, 0, false).await.map(|_| ()));
    assert_eq!(status, 403);
    // Not even the job it came with can be cancelled with it.
    let (status, _) = refusal(stolen.cancel(first.id).await);
    assert_eq!(status, 403);

    // Nothing changed.
    let now = operator.repo(REPO).await.unwrap();
    assert_eq!(
        (now.settings, now.registered_by),
        (registration.settings, registration.registered_by)
    );
    let sibling_now = operator.job(sibling.id).await.unwrap();
    assert_eq!(sibling_now.state, JobState::Queued);
    assert!(!sibling_now.cancel_requested);

    // The submitter still follows its own job with its token, and a fresh token of the run
    // (one never handed to an agent) reads and cancels every job of the run.
    assert_eq!(stolen.job(first.id).await.unwrap().id, first.id);
    let fresh = fleet.client_with(&token_of_run());
    assert_eq!(fresh.job(sibling.id).await.unwrap().id, sibling.id);
    let cancelled = fresh.cancel(sibling.id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
}
