//! Bounds on what the broker stores: queue quotas per repository and per site (`429
//! quota_exceeded`), and the retention sweep that deletes finished jobs with their logs.

use std::time::Duration;

use testbot_e2e::{Fleet, WAIT, refusal, wait_for};
use testbot_proto::client::ClientError;
use testbot_proto::jobs::{JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

async fn register(fleet: &Fleet, name: &str) {
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: name.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
}

fn spec(labels: &[&str]) -> JobSpec {
    JobSpec {
        script: "true".into(),
        labels: labels.iter().map(|l| l.to_string()).collect(),
        ..Default::default()
    }
}

fn quota_code(result: Result<testbot_proto::jobs::Job, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => (status, code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_that_floods_the_queue_gets_429_and_others_do_not() {
    let fleet = Fleet::start_oidc(|config| config.settings.limits.max_queued_per_repo = 3).await;
    // An enrolled agent that never polls: every job stays queued.
    fleet.enroll_taking_workflow_jobs("offline").await;
    register(&fleet, "flood/repo").await;
    register(&fleet, "quiet/repo").await;

    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(
            fleet
                .workflow("flood/repo")
                .submit(&spec(&[]))
                .await
                .unwrap(),
        );
    }
    let (status, code, message) = quota_code(fleet.workflow("flood/repo").submit(&spec(&[])).await);
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    assert_eq!(
        message,
        "repository flood/repo has 3 jobs waiting in the queue, the most this broker allows \
         (--max-queued-per-repo 3); submit again once some of them have run"
    );
    // Other repositories are not affected, nor are operators.
    fleet
        .workflow("quiet/repo")
        .submit(&spec(&[]))
        .await
        .unwrap();
    fleet.submit("true").await;
    // A job that leaves the queue frees its place.
    fleet.client().cancel(queued[0].id).await.unwrap();
    fleet
        .workflow("flood/repo")
        .submit(&spec(&[]))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sites_queue_is_bounded_across_repositories() {
    let fleet = Fleet::start_oidc(|config| config.settings.limits.max_queued_per_site = 2).await;
    fleet.enroll_taking_workflow_jobs("offline").await;
    for repo in ["a/one", "b/two", "c/three"] {
        register(&fleet, repo).await;
    }
    let for_site = [format!("site:{}", testbot_e2e::TEST_SITE)];
    let for_site: Vec<&str> = for_site.iter().map(String::as_str).collect();
    fleet
        .workflow("a/one")
        .submit(&spec(&for_site))
        .await
        .unwrap();
    fleet
        .workflow("b/two")
        .submit(&spec(&for_site))
        .await
        .unwrap();
    let (status, code, message) =
        quota_code(fleet.workflow("c/three").submit(&spec(&for_site)).await);
    assert_eq!((status, code.as_str()), (429, "quota_exceeded"));
    assert_eq!(
        message,
        format!(
            "site {} has 2 jobs waiting in the queue, the most this broker allows \
             (--max-queued-per-site 2); submit again once some of them have run",
            testbot_e2e::TEST_SITE
        )
    );
    // Jobs for any site are not counted against this one.
    fleet.workflow("c/three").submit(&spec(&[])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_and_their_logs_are_deleted_after_the_retention() {
    let mut fleet =
        Fleet::start_with(|config| config.settings.limits.job_retention = Duration::from_secs(2))
            .await;
    let agent = fleet.agent_config("a1");
    fleet.add_agent(agent);
    let done = fleet.submit("echo kept for a while").await;
    let done = fleet.wait_finished(done.id).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert!(fleet.log(done.id).await.contains("kept for a while"));
    // A queued job is never swept, however old.
    let queued = fleet
        .client()
        .submit(&JobSpec {
            script: "true".into(),
            labels: vec!["nobody-has-this".into()],
            ..Default::default()
        })
        .await
        .unwrap();

    let client = fleet.client();
    let (status, message) = wait_for("the finished job to be deleted", WAIT, || async {
        match client.job(done.id).await {
            Ok(_) => None,
            Err(err) => Some(refusal::<()>(Err(err))),
        }
    })
    .await;
    assert_eq!(
        (status, message),
        (404, format!("job {} does not exist", done.id))
    );
    let (status, _) = refusal(client.log_stream(done.id, 0, false).await.map(|_| ()));
    assert_eq!(status, 404);
    assert_eq!(client.job(queued.id).await.unwrap().state, JobState::Queued);
    fleet.stop().await;
}
