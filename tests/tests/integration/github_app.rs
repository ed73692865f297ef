//! The GitHub App end to end, against the fake GitHub (every request checked against GitHub's
//! OpenAPI description): webhooks verified before anything reads them, a push to main running
//! the repository's configured job at a site whose agent checked the job with GitHub itself and
//! checked out the commit, its check run from queued to success; and an agent refusing what a
//! lying broker hands it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testbot_broker::github::app::AppCredentials;
use testbot_broker::server::GitHubAppConfig;
use testbot_e2e::github::{APP_ID, FakeGitHub, Visibility, webhooks};
use testbot_e2e::{AUDIENCE, Fleet, JOB_ACCOUNT, WAIT, ensure_account, wait_for};
use testbot_proto::jobs::{Job, JobListQuery, JobState};

const REPO: &str = "hpc-lab/solver";

const CONFIG: &str = r#"
[jobs.unit]
executor = "shell"
timeout = "5m"
results = ["reports/*.xml"]
script = """
echo "reading $(cat src/greeting.txt) from the checkout"
test -f .github/testbot.toml
mkdir -p reports
echo '<testsuite name="unit"><testcase name="reads"/><testcase name="retried"><flakyFailure/></testcase></testsuite>' > reports/junit.xml
"""

run_tests = "echo {tests}"

[jobs.unit.on]
push = { branches = ["main"] }

[jobs.docs]
script = "echo docs"

[jobs.docs.on]
push = { branches = ["main"], paths = ["docs/**"] }
"#;

/// The App's key and webhook secret in files, as an operator gives them to the broker.
fn app_config(fake: &FakeGitHub, dir: &Path) -> GitHubAppConfig {
    let key = dir.join("app.pem");
    let secret = dir.join("webhook.secret");
    std::fs::write(&key, &fake.app_private_key_pem).unwrap();
    std::fs::write(&secret, format!("{}\n", fake.webhook_secret)).unwrap();
    GitHubAppConfig {
        credentials: AppCredentials::load(APP_ID, &key, &secret).expect("App credentials"),
        public_url: "https://testbot.example.org".into(),
    }
}

async fn app_fleet(fake: &FakeGitHub) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let app = app_config(fake, dir.path());
    let url = fake.url.clone();
    let fleet = Fleet::start_oidc(move |config| {
        config.github_api_url = url;
        config.github_app = Some(app);
    })
    .await;
    drop(dir);
    fleet
}

/// The fake GitHub with `REPO` (public) and the App installed on it, and a fleet whose broker
/// runs the App and receives its webhooks.
async fn installed_app() -> (FakeGitHub, Fleet) {
    let fake = FakeGitHub::start_app().await;
    fake.create_repo(REPO, Visibility::Public).await;
    let fleet = app_fleet(&fake).await;
    fake.deliver_webhooks_to(Some(&webhook_url(&fleet)));
    fake.install("hpc-lab", &[REPO]).await;
    (fake, fleet)
}

fn webhook_url(fleet: &Fleet) -> String {
    format!("{}/api/v1/github/webhook", fleet.url)
}

/// A site that takes push jobs of `hpc-lab/*` on main, checked with the fake GitHub.
fn app_policy(fleet: &Fleet, fake: &FakeGitHub) -> PathBuf {
    let path = fleet.dir.path().join("app-policy.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[oidc]
issuer = "{issuer}"
audience = "{AUDIENCE}"

[github]
accept = ["push"]
api_url = "{github}"
git_url = "{github}"

[executors.shell]
max_time = "5m"

[identity]
default_account = "{JOB_ACCOUNT}"

[[rules]]
name = "post-merge"
repositories = ["hpc-lab/*"]
refs = ["refs/heads/main"]
events = ["push"]
"#,
            issuer = fleet.issuer().url,
            github = fake.url,
        ),
    )
    .unwrap();
    path
}

async fn jobs_of(fleet: &Fleet) -> Vec<Job> {
    fleet
        .client()
        .jobs(&JobListQuery::default())
        .await
        .unwrap()
        .jobs
}

#[tokio::test(flavor = "multi_thread")]
async fn every_github_example_is_acknowledged_and_bad_signatures_change_nothing() {
    let fake = FakeGitHub::start_app().await;
    let fleet = app_fleet(&fake).await;
    let url = webhook_url(&fleet);

    // Every payload GitHub publishes, correctly signed: 2xx, never a 5xx.
    let mut count = 0;
    for (event, payload) in webhooks::examples() {
        let delivery = webhooks::Delivery::new(event, 1, payload.clone());
        let status = delivery.send(&url, &fake.webhook_secret).await.unwrap();
        assert!(
            (200..300).contains(&status),
            "{event} {:?} got {status}",
            delivery.action()
        );
        count += 1;
    }
    assert!(count > 300, "only {count} examples");

    // A redelivery is acknowledged and does nothing more.
    let ping = webhooks::Delivery::new(
        "ping",
        1,
        serde_json::json!({"zen": "Keep it logically awesome.", "hook_id": 1}),
    );
    assert_eq!(ping.send(&url, &fake.webhook_secret).await.unwrap(), 202);
    assert_eq!(ping.send(&url, &fake.webhook_secret).await.unwrap(), 200);

    // Missing, wrong and stale (another secret's) signatures: 401 with what is wrong.
    let http = reqwest::Client::new();
    let push = webhooks::Delivery::new("ping", 1, serde_json::json!({"zen": "x"}));
    let send = |signature: Option<String>, body: Vec<u8>| {
        let mut request = http
            .post(&url)
            .header("X-GitHub-Event", "ping")
            .header("X-GitHub-Delivery", push.id.clone())
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        request.send()
    };
    let cases = [
        (None, push.body(), "no X-Hub-Signature-256 header"),
        (
            Some(webhooks::signature("an old secret", &push.body())),
            push.body(),
            "does not match the body",
        ),
        (
            Some(webhooks::signature(&fake.webhook_secret, &push.body())),
            b"{\"zen\": \"tampered\"}".to_vec(),
            "does not match the body",
        ),
        (Some("sha1=abc".into()), push.body(), "sha256="),
    ];
    for (signature, body, expected) in cases {
        let response = send(signature, body).await.unwrap();
        assert_eq!(response.status().as_u16(), 401);
        let error: serde_json::Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(expected), "{message}");
    }
    // None of them stored anything: the same delivery id, correctly signed, is new.
    assert_eq!(push.send(&url, &fake.webhook_secret).await.unwrap(), 202);

    // Larger than any delivery GitHub sends: refused before the signature is read.
    let huge = vec![b' '; testbot_broker::github::webhook::MAX_WEBHOOK_BYTES + 1];
    let response = send(Some(webhooks::signature(&fake.webhook_secret, &huge)), huge)
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_main_runs_the_configured_job_verified_at_the_site_with_its_check_run() {
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(app_policy(&fleet, &fake));
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;

    let sha = fake
        .commit(
            REPO,
            "main",
            &[
                (".github/testbot.toml", CONFIG),
                ("src/greeting.txt", "hello from the commit"),
            ],
            "Run the unit tests on the HPC site",
        )
        .await;

    // The push runs `unit` (not `docs`: no file under docs/ changed).
    let job = wait_for("the push's job", WAIT, || async {
        jobs_of(&fleet).await.into_iter().next()
    })
    .await;
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert_eq!(job.spec.name.as_deref(), Some("unit"));
    assert!(
        log.contains(&format!("checked out {REPO}@{sha} (verified with GitHub)")),
        "{log}"
    );
    assert!(
        log.contains("reading hello from the commit from the checkout"),
        "{log}"
    );
    assert_eq!(jobs_of(&fleet).await.len(), 1, "only `unit` runs");

    // Its check run went queued → in progress → success, on the pushed commit.
    let run = wait_for("the check run to complete", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|run| run.current().status == "completed")
    })
    .await;
    assert_eq!(run.head_sha, sha);
    let states: Vec<&str> = run.history.iter().map(|s| s.status.as_str()).collect();
    assert_eq!(states.first(), Some(&"queued"), "{states:?}");
    assert!(states.contains(&"in_progress"), "{states:?}");
    let done = run.current();
    assert_eq!(done.name, "unit");
    assert_eq!(done.conclusion.as_deref(), Some("success"));
    assert_eq!(
        done.external_id.as_deref(),
        Some(job.id.to_string().as_str())
    );
    assert!(
        done.output
            .summary
            .as_deref()
            .unwrap_or("")
            .contains("agent `test-site/login1`"),
        "{:?}",
        done.output
    );
    assert!(
        done.output
            .text
            .as_deref()
            .unwrap_or("")
            .contains("reading hello from the commit"),
        "{:?}",
        done.output
    );
    // The job's test results, in the check run's summary.
    let summary = done.output.summary.as_deref().unwrap_or("");
    assert!(
        summary.contains("**Tests**: 2 passed, 0 failed, 0 errors, 0 skipped, 1 flaky"),
        "{summary}"
    );
    assert!(
        summary.contains(r"Flaky (passed on a rerun): unit \> retried"),
        "{summary}"
    );
    // "Details" opens the job's page, which anyone may read: the repository is public.
    assert_eq!(
        done.details_url.as_deref(),
        Some(format!("https://testbot.example.org/jobs/{}", job.id).as_str())
    );
    let page = reqwest::get(format!("{}/jobs/{}", fleet.url, job.id))
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&format!("{}/{REPO}/commit/{sha}", fake.url)),
        "{html}"
    );
    assert!(html.contains("push: to main by"), "{html}");
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_that_does_not_parse_fails_a_check_run_that_says_where() {
    let (fake, fleet) = installed_app().await;
    let sha = fake
        .commit(
            REPO,
            "main",
            &[(
                ".github/testbot.toml",
                "[jobs.unit]\nscript = \"make\"\ntimout = \"5m\"\n",
            )],
            "Add a config with a typo",
        )
        .await;
    let run = wait_for("the config's check run", WAIT, || async {
        fake.check_runs(REPO).into_iter().next()
    })
    .await;
    let state = run.current();
    assert_eq!(run.head_sha, sha);
    assert_eq!(
        (state.status.as_str(), state.conclusion.as_deref()),
        ("completed", Some("failure"))
    );
    assert!(
        state
            .output
            .summary
            .as_deref()
            .unwrap_or("")
            .contains(".github/testbot.toml:3:1: unknown field `timout`"),
        "{:?}",
        state.output
    );
    assert!(
        state
            .output
            .summary
            .as_deref()
            .unwrap_or("")
            .contains("did you mean `timeout`?")
    );
    assert!(jobs_of(&fleet).await.is_empty());
    fake.assert_conforms();
    fleet.stop().await;
}

/// Changes the broker's database behind its back, as a compromised broker would.
async fn tamper(fleet: &Fleet, sql: &str, bind: &str, id: i64) {
    use sqlx::ConnectOptions as _;
    let path = fleet.dir.path().join("broker/testbot.db");
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .busy_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(bind)
        .bind(id)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1, "{sql}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_refuses_what_a_lying_broker_says_about_an_app_job() {
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;

    // Six pushes to main queue six jobs while no agent runs; a commit on a feature branch
    // (with the same config) never reaches main.
    let marker = fleet.dir.path().join("a-lie-ran");
    let mut shas = Vec::new();
    for n in 0..6 {
        shas.push(
            fake.commit(
                REPO,
                "main",
                &[
                    (".github/testbot.toml", CONFIG),
                    ("src/greeting.txt", &format!("push {n}")),
                ],
                "A push",
            )
            .await,
        );
    }
    let feature = fake
        .commit(
            REPO,
            "feature",
            &[("src/greeting.txt", "unreviewed")],
            "Not merged",
        )
        .await;
    let jobs = wait_for("six queued jobs", WAIT, || async {
        let jobs = jobs_of(&fleet).await;
        (jobs.len() == 6).then_some(jobs)
    })
    .await;
    let mut ids: Vec<i64> = jobs.iter().map(|j| j.id.0).collect();
    ids.sort();

    // The broker lies: another script; a commit that is not on main; another repository's id.
    tamper(
        &fleet,
        "UPDATE jobs SET spec = json_set(spec, '$.script', ?1) WHERE id = ?2",
        &format!("touch {}", marker.display()),
        ids[0],
    )
    .await;
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.sha', ?1, '$.config_sha', ?1) WHERE job_id = ?2",
        &feature,
        ids[1],
    )
    .await;
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.repository_id', CAST(?1 AS INTEGER)) WHERE job_id = ?2",
        "4242",
        ids[2],
    )
    .await;
    // A bisection step of a commit that was never merged; chosen tests the runner would read
    // as an option.
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_remove(json_set(provenance, '$.event', 'history', '$.bisection', 1, '$.sha', ?1, '$.config_sha', ?1), '$.pushed_by') WHERE job_id = ?2",
        &feature,
        ids[3],
    )
    .await;
    tamper(
        &fleet,
        "UPDATE jobs SET spec = json_set(spec, '$.tests', json_array(?1)) WHERE id = ?2",
        &format!("--junitxml={}", marker.display()),
        ids[4],
    )
    .await;
    // A list command of its own: it would run as the job, before any test.
    tamper(
        &fleet,
        "UPDATE jobs SET spec = json_set(spec, '$.list', ?1) WHERE id = ?2",
        &format!("touch {}", marker.display()),
        ids[5],
    )
    .await;

    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(app_policy(&fleet, &fake));
    fleet.add_agent(agent);
    let expected = [
        "GitHub does not confirm the job: the job's script differs from job unit in .github/testbot.toml",
        &format!(
            "GitHub does not confirm the job: commit {feature} is not on branch main of {REPO}"
        ),
        &format!("GitHub does not confirm the job: repository {REPO} has id "),
        &format!(
            "GitHub does not confirm the job: commit {feature} is not on branch main of {REPO}"
        ),
        "the job's choice of tests cannot run: test \"--junitxml=",
        "GitHub does not confirm the job: the job's list differs from job unit in .github/testbot.toml",
    ];
    for (id, expected) in ids.iter().zip(expected) {
        let job = fleet.wait_finished(testbot_proto::jobs::JobId(*id)).await;
        assert_eq!(job.state, JobState::Error, "{job:?}");
        let reason = job.reason.clone().unwrap_or_default();
        assert!(reason.contains(expected), "job {id}: {reason}");
    }
    assert!(!marker.exists(), "the lying broker's script ran");
    // Each check run says the job could not run.
    let failed = wait_for("six failed check runs", WAIT, || async {
        let failed: Vec<_> = fake
            .check_runs(REPO)
            .into_iter()
            .filter(|run| run.current().conclusion.as_deref() == Some("failure"))
            .collect();
        (failed.len() == 6).then_some(failed)
    })
    .await;
    assert!(
        failed
            .iter()
            .all(|run| run.current().output.title.as_deref() == Some("Could not run"))
    );
    let _ = shas;
    fake.assert_conforms();
    fleet.stop().await;
}

const PR_CONFIG: &str = r#"
[jobs.unit]
executor = "shell"
script = 'echo "reading $(cat src/greeting.txt) from the checkout"'
"#;

/// A site that also takes pull request jobs, with a read-only token of its own (the
/// permission API needs one).
fn pr_policy(fleet: &Fleet, fake: &FakeGitHub) -> PathBuf {
    let token = fleet.dir.path().join("github-read.token");
    std::fs::write(&token, fake.read_only_token(&[REPO])).unwrap();
    let path = fleet.dir.path().join("pr-policy.toml");
    let policy = std::fs::read_to_string(app_policy(fleet, fake))
        .unwrap()
        .replace(
            "accept = [\"push\"]",
            &format!("accept = [\"push\", \"pull_request\"]\ntoken_file = \"{}\"", token.display()),
        )
        .replace(
            "[[rules]]",
            "[[rules]]\nname = \"asked-for\"\nrepositories = [\"hpc-lab/*\"]\nrefs = [\"refs/pull/*\"]\nevents = [\"pull_request\"]\n\n[[rules]]",
        );
    std::fs::write(&path, policy).unwrap();
    path
}

/// The App on `REPO`, whose `maintainer` may write and whose main holds `config` and
/// `src/greeting.txt`, with one agent (`login1`) taking pull request jobs; its index.
async fn pr_site(config: &str) -> (FakeGitHub, Fleet, usize) {
    use testbot_e2e::github::Permission;
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    fake.set_permission(REPO, "maintainer", Permission::Write);
    fake.commit(
        REPO,
        "main",
        &[
            (".github/testbot.toml", config),
            ("src/greeting.txt", "main"),
        ],
        "Config",
    )
    .await;
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(pr_policy(&fleet, &fake));
    let agent = fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;
    (fake, fleet, agent)
}

async fn wait_reply(fake: &FakeGitHub, number: u64, containing: &str) -> String {
    let bot = fake.app_bot_login();
    wait_for(
        &format!("a reply containing {containing:?}"),
        WAIT,
        || async {
            fake.comments(REPO, number)
                .into_iter()
                .find(|c| c.author == bot && c.body.contains(containing))
                .map(|c| c.body)
        },
    )
    .await
}

async fn wait_jobs(fleet: &Fleet, count: usize) -> Vec<Job> {
    wait_for(&format!("{count} jobs"), WAIT, || async {
        let jobs = jobs_of(fleet).await;
        (jobs.len() == count).then_some(jobs)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn comments_run_pull_requests_and_a_forks_only_for_the_commit_named() {
    let (fake, mut fleet, agent) = pr_site(PR_CONFIG).await;

    // A pull request from a branch of the repository itself.
    fake.commit(
        REPO,
        "feature",
        &[("src/greeting.txt", "the feature")],
        "Change",
    )
    .await;
    let pr = fake
        .open_pull_request(REPO, "main", REPO, "feature", "maintainer", "Change")
        .await;
    // Someone without write permission: a reply, nothing runs.
    fake.comment(REPO, pr.number, "stranger", "/testbot run unit")
        .await;
    wait_reply(&fake, pr.number, "only people with write permission").await;
    // Help lists the base branch's jobs.
    fake.comment(REPO, pr.number, "stranger", "/testbot help")
        .await;
    wait_reply(&fake, pr.number, "| `unit` |").await;
    // Unknown jobs and short shas are explained.
    fake.comment(REPO, pr.number, "maintainer", "/testbot run 0123abc")
        .await;
    wait_reply(&fake, pr.number, "full 40-character sha").await;
    assert!(jobs_of(&fleet).await.is_empty());

    let asked = fake
        .comment(
            REPO,
            pr.number,
            "maintainer",
            "Looks right.\n\n/testbot run unit",
        )
        .await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert!(
        log.contains("reading the feature from the checkout"),
        "{log}"
    );
    let reactions = fake.reactions(asked.id);
    assert!(
        reactions.iter().any(|r| r.content == "eyes"),
        "{reactions:?}"
    );
    // An edit of the same comment runs nothing again.
    fake.edit_comment(asked.id, "/testbot run unit\n/testbot run unit")
        .await;

    // Statistical runs: one command, several jobs of the same commit.
    fake.comment(REPO, pr.number, "maintainer", "/testbot repeat 2 unit")
        .await;
    let jobs = wait_jobs(&fleet, 3).await;
    let mut places = Vec::new();
    for job in &jobs[..2] {
        let job = fleet.wait_finished(job.id).await;
        assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        places.push(job.batch.expect("the runs are one batch"));
    }
    // One batch of two runs, followed and reported together.
    assert_eq!(places[0].batch, places[1].batch);
    let mut runs: Vec<u32> = places.iter().map(|p| p.run).collect();
    runs.sort();
    assert_eq!((runs, places[0].runs), (vec![1, 2], 2));
    let names: Vec<String> = wait_for("three check runs", WAIT, || async {
        let runs = fake.check_runs(REPO);
        (runs.len() == 3).then(|| runs.iter().map(|r| r.current().name.clone()).collect())
    })
    .await;
    assert!(
        names.contains(&"unit (1/2)".to_string()) && names.contains(&"unit (2/2)".to_string()),
        "{names:?}"
    );

    // A fork's pull request: a plain command gets instructions; naming the head runs it.
    fake.fork(REPO, "outsider").await;
    let fork = "outsider/solver";
    fake.commit(
        fork,
        "patch",
        &[("src/greeting.txt", "a fork's change")],
        "Patch",
    )
    .await;
    let fpr = fake
        .open_pull_request(REPO, "main", fork, "patch", "outsider", "Patch")
        .await;
    fake.comment(REPO, fpr.number, "maintainer", "/testbot run")
        .await;
    let reply = wait_reply(&fake, fpr.number, "comes from a fork").await;
    assert!(
        reply.contains(&format!("/testbot run {}", fpr.head_sha)),
        "{reply}"
    );
    assert_eq!(jobs_of(&fleet).await.len(), 3);
    let approval = fake
        .comment(
            REPO,
            fpr.number,
            "maintainer",
            &format!("/testbot run {}", fpr.head_sha),
        )
        .await;
    let jobs = wait_jobs(&fleet, 4).await;
    let job = fleet.wait_finished(jobs[0].id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert!(
        log.contains("reading a fork's change from the checkout"),
        "{log}"
    );

    // A review names the commit it reviewed: `/testbot run` in an approving review runs it.
    fake.review(
        REPO,
        fpr.number,
        "maintainer",
        testbot_e2e::github::ReviewState::Approved,
        "Reviewed the patch.\n\n/testbot run unit",
    )
    .await;
    let jobs = wait_jobs(&fleet, 5).await;
    let job = fleet.wait_finished(jobs[0].id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");

    // A new push to the fork needs a new approval: the old one names the old commit.
    fleet.agent_shutdown(agent).drain.cancel();
    fleet.agent_exit(agent).await.unwrap();
    let new_head = fake
        .push_to_pull_request(REPO, fpr.number, &[("src/greeting.txt", "pwned")], "More")
        .await;
    fake.comment(
        REPO,
        fpr.number,
        "maintainer",
        &format!("/testbot run {}", fpr.head_sha),
    )
    .await;
    wait_reply(&fake, fpr.number, "is not the head of this pull request").await;
    assert_eq!(jobs_of(&fleet).await.len(), 5);
    // A broker that replays the old approval for the new commit is refused at the site.
    fake.comment(
        REPO,
        fpr.number,
        "maintainer",
        &format!("/testbot run {new_head}"),
    )
    .await;
    let jobs = wait_jobs(&fleet, 6).await;
    let replayed = jobs[0].id;
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.approval.comment_id', CAST(?1 AS INTEGER)) WHERE job_id = ?2",
        &approval.id.to_string(),
        replayed.0,
    )
    .await;
    let mut agent = fleet.agent_config("login2");
    agent.policy = Some(pr_policy(&fleet, &fake));
    fleet.add_agent(agent);
    let expected = format!("does not approve commit {new_head} of the fork's pull request");
    let job = wait_for("the site to refuse the replayed approval", WAIT, || async {
        let job = fleet.client().job(replayed).await.unwrap();
        job.reason
            .as_deref()
            .is_some_and(|r| r.contains(&expected))
            .then_some(job)
    })
    .await;
    // Handed back for another agent (the first one is only stopped), never started.
    assert_eq!(job.started_at_ms, None, "{job:?}");
    fake.assert_conforms();
    fleet.stop().await;
}

const SLOW_CONFIG: &str = r#"
[jobs.slow]
executor = "shell"
script = "echo started; sleep 120"

[jobs.slow.on]
push = { branches = ["main"] }
"#;

async fn wait_state(fleet: &Fleet, id: testbot_proto::jobs::JobId, state: JobState) -> Job {
    wait_for(&format!("job {id} to be {state:?}"), WAIT, || async {
        let job = fleet.client().job(id).await.unwrap();
        (job.state == state).then_some(job)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn check_run_buttons_and_comments_cancel_and_re_run_for_writers_only() {
    use testbot_e2e::github::Permission;
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    fake.set_permission(REPO, "maintainer", Permission::Write);
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(pr_policy(&fleet, &fake));
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;

    let sha = fake
        .commit(
            REPO,
            "main",
            &[(".github/testbot.toml", SLOW_CONFIG)],
            "A slow job",
        )
        .await;
    let first = wait_jobs(&fleet, 1).await.remove(0);
    wait_state(&fleet, first.id, JobState::Running).await;
    let run = wait_for("the check run in progress", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|r| r.current().status == "in_progress" && r.head_sha == sha)
    })
    .await;
    assert_eq!(run.current().actions[0]["identifier"], "cancel");

    // Someone without write permission presses Cancel: nothing happens.
    fake.request_check_run_action(run.id, "cancel", "stranger")
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        fleet.client().job(first.id).await.unwrap().state,
        JobState::Running
    );
    // A maintainer does: the job is cancelled, and so is its check run.
    fake.request_check_run_action(run.id, "cancel", "maintainer")
        .await;
    wait_state(&fleet, first.id, JobState::Cancelled).await;
    let cancelled = wait_for("the check run cancelled", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|r| r.id == run.id && r.current().conclusion.as_deref() == Some("cancelled"))
    })
    .await;
    assert_eq!(cancelled.current().actions[0]["identifier"], "rerun");

    // GitHub's Re-run: a new job for the same commit, with a check run of its own.
    fake.rerequest_check_run(run.id, "maintainer").await;
    let again = wait_jobs(&fleet, 2).await.remove(0);
    wait_state(&fleet, again.id, JobState::Running).await;
    let checked_out = format!("checked out {REPO}@{sha}");
    wait_for("the re-run to check out the commit", WAIT, || async {
        fleet
            .log(again.id)
            .await
            .contains(&checked_out)
            .then_some(())
    })
    .await;

    // `/testbot cancel` on a pull request cancels its head's runs.
    fleet.client().cancel(again.id).await.unwrap();
    wait_state(&fleet, again.id, JobState::Cancelled).await;
    fake.commit(REPO, "feature", &[("README.md", "a change")], "Change")
        .await;
    let pr = fake
        .open_pull_request(REPO, "main", REPO, "feature", "maintainer", "Change")
        .await;
    fake.comment(REPO, pr.number, "maintainer", "/testbot run slow")
        .await;
    let on_pr = wait_jobs(&fleet, 3).await.remove(0);
    wait_state(&fleet, on_pr.id, JobState::Running).await;
    fake.comment(REPO, pr.number, "stranger", "/testbot cancel")
        .await;
    wait_reply(&fake, pr.number, "may cancel jobs here").await;
    fake.comment(REPO, pr.number, "maintainer", "/testbot cancel slow")
        .await;
    wait_reply(&fake, pr.number, "cancelled 1 run of `slow`").await;
    wait_state(&fleet, on_pr.id, JobState::Cancelled).await;
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_merge_says_so_on_its_pull_request() {
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(app_policy(&fleet, &fake));
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;
    let config = "[jobs.unit]\nexecutor = \"shell\"\nscript = \"test -f src/fixed.txt || exit 3\"\n\n[jobs.unit.on]\npush = { branches = [\"main\"] }\n";
    fake.commit(
        REPO,
        "feature",
        &[(".github/testbot.toml", config)],
        "Add the tests",
    )
    .await;
    let pr = fake
        .open_pull_request(REPO, "main", REPO, "feature", "maintainer", "Add the tests")
        .await;
    let merge = fake.merge(REPO, pr.number, "maintainer").await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    let bot = fake.app_bot_login();
    let comment = wait_for("a comment on the merged pull request", WAIT, || async {
        fake.comments(REPO, pr.number)
            .into_iter()
            .find(|c| c.author == bot)
            .map(|c| c.body)
    })
    .await;
    assert!(
        comment.starts_with(&format!(
            "Post-merge job **unit** failed on `main` at {merge}"
        )),
        "{comment}"
    );
    assert!(
        comment.contains("exit code 3") || comment.contains("exited with"),
        "{comment}"
    );
    fake.assert_conforms();
    fleet.stop().await;
}

const WRITERS_CONFIG: &str = r#"
[jobs.quick]
executor = "shell"
script = 'echo "reading $(cat src/greeting.txt) from the checkout"'

[jobs.quick.on]
pull_request = { automatic = "writers", paths = ["src/**"] }

[jobs.unit]
executor = "shell"
script = 'echo "reading $(cat src/greeting.txt) from the checkout"'
"#;

#[tokio::test(flavor = "multi_thread")]
async fn writers_pull_requests_run_at_once_and_a_forks_waits_for_approval() {
    let (fake, mut fleet, agent) = pr_site(WRITERS_CONFIG).await;

    // A writer's pull request that changes src/: `quick` runs without being asked.
    fake.commit(
        REPO,
        "feature",
        &[("src/greeting.txt", "the feature")],
        "Change",
    )
    .await;
    fake.open_pull_request(REPO, "main", REPO, "feature", "maintainer", "Change")
        .await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    assert_eq!(job.spec.name.as_deref(), Some("quick"));
    // One that changes no file under src/ runs nothing.
    fake.commit(REPO, "docs", &[("README.md", "docs")], "Docs")
        .await;
    fake.open_pull_request(REPO, "main", REPO, "docs", "maintainer", "Docs")
        .await;

    // A fork's pull request by someone who may not write: an approval check run, no job.
    fake.fork(REPO, "outsider").await;
    fake.commit(
        "outsider/solver",
        "patch",
        &[("src/greeting.txt", "a fork")],
        "Patch",
    )
    .await;
    let fpr = fake
        .open_pull_request(
            REPO,
            "main",
            "outsider/solver",
            "patch",
            "outsider",
            "Patch",
        )
        .await;
    let waiting = wait_for("the approval check run", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|r| r.head_sha == fpr.head_sha)
    })
    .await;
    let state = waiting.current();
    assert_eq!(state.conclusion.as_deref(), Some("action_required"));
    assert!(
        state
            .output
            .summary
            .as_deref()
            .unwrap_or("")
            .contains(&format!("/testbot run {}", fpr.head_sha)),
        "{:?}",
        state.output
    );
    assert_eq!(jobs_of(&fleet).await.len(), 1);

    // A broker that runs an on-request job as if it were automatic is refused at the site.
    fleet.agent_shutdown(agent).drain.cancel();
    fleet.agent_exit(agent).await.unwrap();
    fake.push_to_pull_request(REPO, 1, &[("src/greeting.txt", "again")], "More")
        .await;
    let jobs = wait_jobs(&fleet, 2).await;
    let lie = jobs[0].id;
    tamper(
        &fleet,
        "UPDATE jobs SET spec = json_set(spec, '$.name', ?1) WHERE id = ?2",
        "unit",
        lie.0,
    )
    .await;
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.job', ?1) WHERE job_id = ?2",
        "unit",
        lie.0,
    )
    .await;
    let mut agent = fleet.agent_config("login2");
    agent.policy = Some(pr_policy(&fleet, &fake));
    fleet.add_agent(agent);
    let expected =
        "job unit in .github/testbot.toml does not run on pull requests without being asked";
    wait_for("the site to refuse the job", WAIT, || async {
        let job = fleet.client().job(lie).await.unwrap();
        job.reason
            .as_deref()
            .is_some_and(|r| r.contains(expected))
            .then_some(())
    })
    .await;
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_tag_runs_its_jobs_on_the_tagged_commit() {
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    let policy = std::fs::read_to_string(app_policy(&fleet, &fake))
        .unwrap()
        .replace(
            "refs = [\"refs/heads/main\"]",
            "refs = [\"refs/heads/main\", \"refs/tags/v*\"]",
        );
    let policy_file = fleet.dir.path().join("tag-policy.toml");
    std::fs::write(&policy_file, policy).unwrap();
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(policy_file);
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;
    let config = "[jobs.release]\nexecutor = \"shell\"\nscript = \"cat VERSION\"\n\n[jobs.release.on]\ntag = [\"v*\"]\n";
    let sha = fake
        .commit(
            REPO,
            "main",
            &[(".github/testbot.toml", config), ("VERSION", "1.0.0")],
            "Release 1.0.0",
        )
        .await;
    // The push to main runs nothing (no on.push); the tag runs `release`.
    fake.create_tag(REPO, "nightly-build", &sha).await;
    fake.create_tag(REPO, "v1.0.0", &sha).await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert!(log.contains("1.0.0"), "{log}");
    assert_eq!(jobs_of(&fleet).await.len(), 1);
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workflow_job_of_an_installed_repository_gets_a_check_run_too() {
    let (fake, mut fleet) = installed_app().await;
    let repository = fake.repository(REPO);
    let sha = fake
        .commit(REPO, "main", &[("src/lib.c", "int main;")], "Code")
        .await;
    fleet
        .client()
        .register_repo(&testbot_proto::repos::RepoRegistration {
            name: REPO.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut agent = fleet.agent_config("vm1");
    agent.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(agent);
    fleet.wait_polling_agents(1).await;
    let issuer = fleet.issuer();
    let mut claims = issuer.claims(REPO, AUDIENCE);
    claims["repository_id"] = repository.id.to_string().into();
    claims["sha"] = sha.clone().into();
    claims["workflow"] = "CI".into();
    let workflow = fleet.client_with(&issuer.mint(&claims));
    let job = workflow
        .submit(&testbot_proto::jobs::JobSpec {
            script: "echo from the workflow".into(),
            name: Some("hpc".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let job = fleet.wait_finished(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let run = wait_for("the workflow job's check run to complete", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|r| r.current().status == "completed")
    })
    .await;
    assert_eq!(run.head_sha, sha);
    assert_eq!(run.current().name, "CI: hpc");
    assert_eq!(run.current().conclusion.as_deref(), Some("success"));
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_job_runs_the_branch_head_when_its_time_comes() {
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    let policy = std::fs::read_to_string(app_policy(&fleet, &fake))
        .unwrap()
        .replace("accept = [\"push\"]", "accept = [\"push\", \"schedule\"]")
        .replace("events = [\"push\"]", "events = [\"push\", \"schedule\"]");
    let policy_file = fleet.dir.path().join("schedule-policy.toml");
    std::fs::write(&policy_file, policy).unwrap();
    let mut agent = fleet.agent_config("login1");
    agent.policy = Some(policy_file);
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;
    let config = "[jobs.nightly]\nexecutor = \"shell\"\nscript = \"cat STAMP\"\n\n[jobs.nightly.on]\nschedule = [{ cron = \"0 3 * * *\" }]\n";
    fake.commit(
        REPO,
        "main",
        &[(".github/testbot.toml", config), ("STAMP", "first")],
        "Nightly",
    )
    .await;
    let head = fake
        .commit(REPO, "main", &[("STAMP", "the head")], "Newer")
        .await;
    // Pushes run nothing (no on.push); 03:00 is far: make it now, as the clock would.
    wait_for("the schedule to be recorded", WAIT, || async {
        use sqlx::ConnectOptions as _;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(fleet.dir.path().join("broker/testbot.db"))
            .connect()
            .await
            .ok()?;
        let done = sqlx::query("UPDATE github_schedules SET next_run_ms = 0 WHERE job = 'nightly'")
            .execute(&mut conn)
            .await
            .ok()?;
        (done.rows_affected() == 1).then_some(())
    })
    .await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert!(log.contains(&format!("checked out {REPO}@{head}")), "{log}");
    assert!(log.contains("the head"), "{log}");
    // It ran once, and its next run is tomorrow's 03:00 again.
    tokio::time::sleep(testbot_broker::github::schedule::SCHEDULE_POLL + Duration::from_secs(1))
        .await;
    assert_eq!(jobs_of(&fleet).await.len(), 1);
    fake.assert_conforms();
    fleet.stop().await;
}

/// The issue's own scenario: a merge to main runs the post-merge job on the Slurm site.
#[tokio::test(flavor = "multi_thread")]
async fn a_merge_runs_its_post_merge_job_through_slurm() {
    testbot_e2e::require_slurm();
    ensure_account(JOB_ACCOUNT);
    let (fake, mut fleet) = installed_app().await;
    // Slurm runs the job as the job account, in the fleet's directory.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(fleet.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let policy = std::fs::read_to_string(app_policy(&fleet, &fake))
        .unwrap()
        .replace(
            "[executors.shell]\nmax_time = \"5m\"",
            "[executors.slurm]\nmax_cpus = 2\ndefault_cpus = 1\nmax_time = \"5m\"\npartitions = [\"debug\", \"batch\"]",
        );
    let policy_file = fleet.dir.path().join("slurm-policy.toml");
    std::fs::write(&policy_file, policy).unwrap();
    let mut agent = fleet.agent_config("login1");
    agent.executor = testbot_agent::config::ExecutorKind::Slurm;
    agent.policy = Some(policy_file);
    fleet.add_agent(agent);
    fleet.wait_policy_agents(1).await;

    let config = "[jobs.unit]\nexecutor = \"slurm\"\nresources = { partition = \"debug\" }\nscript = 'echo \"on $SLURM_JOB_PARTITION: $(cat src/greeting.txt)\"'\n\n[jobs.unit.on]\npush = { branches = [\"main\"] }\n";
    fake.commit(
        REPO,
        "feature",
        &[
            (".github/testbot.toml", config),
            ("src/greeting.txt", "merged"),
        ],
        "Tests on Slurm",
    )
    .await;
    let pr = fake
        .open_pull_request(
            REPO,
            "main",
            REPO,
            "feature",
            "maintainer",
            "Tests on Slurm",
        )
        .await;
    let merge = fake.merge(REPO, pr.number, "maintainer").await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert!(log.contains("submitted to Slurm as job"), "{log}");
    assert!(log.contains("on debug: merged"), "{log}");
    let run = wait_for("the check run to complete", WAIT, || async {
        fake.check_runs(REPO)
            .into_iter()
            .find(|r| r.head_sha == merge && r.current().status == "completed")
    })
    .await;
    assert_eq!(run.current().conclusion.as_deref(), Some("success"));
    assert!(
        run.current()
            .output
            .summary
            .as_deref()
            .unwrap_or("")
            .contains("Slurm job `"),
        "{:?}",
        run.current().output
    );
    fake.assert_conforms();
    fleet.stop().await;
}

const LABEL_CONFIG: &str = r#"
[jobs.unit]
executor = "shell"
script = 'echo "unit tests of $(cat src/greeting.txt)"'

[jobs.gpu]
executor = "shell"
script = 'echo "gpu tests of $(cat src/greeting.txt)"'

[jobs.gpu.on]
comment = false
label = ["run-on-hpc"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_label_from_a_writer_runs_its_jobs_and_never_a_forks_code() {
    let (fake, mut fleet, agent) = pr_site(LABEL_CONFIG).await;
    use testbot_e2e::github::Permission;
    fake.set_permission(REPO, "triager", Permission::Triage);

    fake.commit(
        REPO,
        "feature",
        &[("src/greeting.txt", "the feature")],
        "Change",
    )
    .await;
    let pr = fake
        .open_pull_request(REPO, "main", REPO, "feature", "maintainer", "Change")
        .await;
    // Deliveries are processed in order: what runs nothing comes first, then the one that
    // runs; exactly one job shows that the others ran none.
    // Someone who may triage but not write; a label no job names.
    fake.add_label(REPO, pr.number, "run-on-hpc", "triager")
        .await;
    fake.remove_label(REPO, pr.number, "run-on-hpc", "triager")
        .await;
    fake.add_label(REPO, pr.number, "documentation", "maintainer")
        .await;
    fake.add_label(REPO, pr.number, "run-on-hpc", "maintainer")
        .await;
    let job = wait_jobs(&fleet, 1).await.remove(0);
    let job = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{log}");
    assert_eq!(job.spec.name.as_deref(), Some("gpu"));
    assert!(log.contains("gpu tests of the feature"), "{log}");

    // A fork's pull request: a label names no commit, so a maintainer's label gets the
    // approval check run and runs nothing.
    fake.fork(REPO, "outsider").await;
    fake.commit(
        "outsider/solver",
        "patch",
        &[("src/greeting.txt", "a fork")],
        "Patch",
    )
    .await;
    let fpr = fake
        .open_pull_request(
            REPO,
            "main",
            "outsider/solver",
            "patch",
            "outsider",
            "Patch",
        )
        .await;
    fake.add_label(REPO, fpr.number, "run-on-hpc", "maintainer")
        .await;
    wait_for(
        "two approval check runs on the fork's head",
        WAIT,
        || async {
            let waiting = fake
                .check_runs(REPO)
                .into_iter()
                .filter(|r| {
                    r.head_sha == fpr.head_sha
                        && r.current().conclusion.as_deref() == Some("action_required")
                })
                .count();
            (waiting == 2).then_some(())
        },
    )
    .await;
    assert_eq!(jobs_of(&fleet).await.len(), 1);

    // A broker that says someone else added the label, or names a label no job of the
    // config starts on, is refused at the site; so is a job whose label was taken off again.
    fleet.agent_shutdown(agent).drain.cancel();
    fleet.agent_exit(agent).await.unwrap();
    for _ in 0..2 {
        fake.remove_label(REPO, pr.number, "run-on-hpc", "maintainer")
            .await;
        fake.add_label(REPO, pr.number, "run-on-hpc", "maintainer")
            .await;
    }
    let jobs = wait_jobs(&fleet, 3).await;
    let (other_adder, other_label) = (jobs[1].id, jobs[0].id);
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.approval.by', ?1) WHERE job_id = ?2",
        "triager",
        other_adder.0,
    )
    .await;
    tamper(
        &fleet,
        "UPDATE github_jobs SET provenance = json_set(provenance, '$.approval.label', ?1) WHERE job_id = ?2",
        "documentation",
        other_label.0,
    )
    .await;
    let mut config = fleet.agent_config("login2");
    config.policy = Some(pr_policy(&fleet, &fake));
    let agent = fleet.add_agent(config);
    refused(
        &fleet,
        other_adder,
        "label \"run-on-hpc\" on pull request hpc-lab/solver#1 was added by maintainer, not triager",
    )
    .await;
    refused(
        &fleet,
        other_label,
        "job gpu in .github/testbot.toml does not run on the label \"documentation\"",
    )
    .await;

    fleet.agent_shutdown(agent).drain.cancel();
    fleet.agent_exit(agent).await.unwrap();
    fake.remove_label(REPO, pr.number, "run-on-hpc", "maintainer")
        .await;
    fake.add_label(REPO, pr.number, "run-on-hpc", "maintainer")
        .await;
    let late = wait_jobs(&fleet, 4).await[0].id;
    fake.remove_label(REPO, pr.number, "run-on-hpc", "maintainer")
        .await;
    let mut config = fleet.agent_config("login3");
    config.policy = Some(pr_policy(&fleet, &fake));
    fleet.add_agent(config);
    refused(
        &fleet,
        late,
        "pull request hpc-lab/solver#1 does not have the label \"run-on-hpc\"",
    )
    .await;
    fake.assert_conforms();
    fleet.stop().await;
}

/// Waits for a site to refuse job `id` saying `expected` (the job goes back to the queue, or
/// fails when no other agent may take it).
async fn refused(fleet: &Fleet, id: testbot_proto::jobs::JobId, expected: &str) {
    wait_for(&format!("a site to refuse: {expected}"), WAIT, || async {
        let job = fleet.client().job(id).await.unwrap();
        assert_ne!(job.state, JobState::Succeeded, "{job:?}");
        job.reason
            .is_some_and(|r| r.contains(expected))
            .then_some(())
    })
    .await;
}

/// The installed App and a site of two agents that take push jobs.
async fn two_agent_site() -> (FakeGitHub, Fleet) {
    let (fake, mut fleet) = installed_app().await;
    let policy = app_policy(&fleet, &fake);
    for name in ["login1", "login2"] {
        let mut agent = fleet.agent_config(name);
        agent.policy = Some(policy.clone());
        fleet.add_agent(agent);
    }
    fleet.wait_policy_agents(2).await;
    (fake, fleet)
}

/// A job run on pushes to main, six times, that bisects a new flake; `test.sh` writes a JUnit
/// file where `wobbly` fails in every third job (by job id, so the runs are deterministic)
/// once the commit has a file `flaky`, and then exits 1 as a test runner does. Given test names
/// (`run_tests`), it says so.
const BISECT_CONFIG: &str = r#"
[jobs.unit]
executor = "shell"
results = ["out/*.xml"]
repeat = 6
bisect = true
quarantine = true
script = "sh test.sh"
run_tests = "sh test.sh {tests}"
# The runner's names: a bisection step picks the one that ends with the test's name.
list = "echo T.steady; echo T.wobbly"

[jobs.unit.on]
push = { branches = ["main"] }
"#;

const BISECT_TEST: &str = r#"echo "selected: ${*:-all}"
mkdir -p out
wobbly=''
if [ -f flaky ] && [ $((TESTBOT_JOB_ID % 3)) -eq 0 ]; then wobbly='<failure message="race"/>'; fi
steady='<testcase classname="T" name="steady"/>'
[ $# -gt 0 ] && steady=''
cat > out/junit.xml <<END
<testsuite name="pkg">$steady<testcase classname="T" name="wobbly">$wobbly</testcase></testsuite>
END
test -z "$wobbly"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_new_flake_after_a_merge_is_bisected_by_the_broker_to_the_commit_that_made_it() {
    use testbot_proto::bisect::BisectionState;
    ensure_account(JOB_ACCOUNT);
    let (fake, fleet) = two_agent_site().await;

    // Commit 1 passes its six post-merge runs.
    let mut shas = vec![
        fake.commit(
            REPO,
            "main",
            &[
                (".github/testbot.toml", BISECT_CONFIG),
                ("test.sh", BISECT_TEST),
            ],
            "Commit 1",
        )
        .await,
    ];
    wait_for("commit 1's six runs", WAIT, || async {
        let jobs = jobs_of(&fleet).await;
        (jobs.len() == 6 && jobs.iter().all(|j| j.state.is_terminal())).then_some(())
    })
    .await;
    assert!(
        jobs_of(&fleet)
            .await
            .iter()
            .all(|j| j.state == JobState::Succeeded)
    );
    // Commits 2 to 11 land without CI (their pushes are not delivered); commit 7 makes
    // `wobbly` flaky.
    fake.deliver_webhooks_to(None);
    for n in 2..=11 {
        let file = if n == 7 { "flaky" } else { "notes.txt" };
        let content = format!("commit {n}");
        shas.push(
            fake.commit(
                REPO,
                "main",
                &[(file, content.as_str())],
                &format!("Commit {n}"),
            )
            .await,
        );
    }
    fake.deliver_webhooks_to(Some(&webhook_url(&fleet)));
    // Commit 12's post-merge runs show the flake: the broker bisects on its own.
    shas.push(
        fake.commit(REPO, "main", &[("notes.txt", "commit 12")], "Commit 12")
            .await,
    );
    let found = wait_for("the bisection to end", Duration::from_secs(240), || async {
        let bisections = fleet.client().bisections(REPO).await.unwrap();
        bisections
            .into_iter()
            .next()
            .filter(|b| b.state != BisectionState::Running)
    })
    .await;
    assert_eq!(found.state, BisectionState::Found, "{found:#?}");
    assert_eq!(found.test_id(), "pkg > T.wobbly");
    assert_eq!(found.started_by, "testbot");
    assert_eq!(
        found.commits.first(),
        Some(&shas[0]),
        "from the last passing commit"
    );
    assert_eq!(found.commits.last(), Some(&shas[11]));
    assert_eq!(
        found.culprit.as_deref(),
        Some(shas[6].as_str()),
        "{found:#?}"
    );
    assert!(found.culprit_confidence.unwrap() >= 0.95, "{found:#?}");
    // Its runs were verified by the agents like pushes, ran the test alone, and made no
    // check runs on the older commits.
    let runs: Vec<_> = found.points.iter().flat_map(|p| &p.runs).collect();
    let first = fleet.wait_finished(runs[0].job).await;
    let log = fleet.log(first.id).await;
    assert!(log.contains("(verified with GitHub)"), "{log}");
    assert!(log.contains("selected: T.wobbly"), "{log}");
    let checked: std::collections::BTreeSet<String> = fake
        .check_runs(REPO)
        .into_iter()
        .map(|run| run.head_sha)
        .collect();
    assert_eq!(
        checked,
        [shas[0].clone(), shas[11].clone()].into_iter().collect(),
        "check runs only for the two pushes"
    );

    // The CLI follows it, lists it, and starts one by hand over a narrower range.
    let out = fleet
        .testbot(&["bisect", "--follow", &found.id.to_string()])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(&format!("pkg > T.wobbly first fails at {}", &shas[6][..12])),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("first bad commit: {}", shas[6])),
        "{stdout}"
    );
    let out = fleet
        .testbot_within(
            &[
                "bisect",
                REPO,
                "pkg > T.wobbly",
                "--good",
                &shas[3],
                "--bad",
                &shas[9],
            ],
            &[],
            Duration::from_secs(240),
        )
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(&format!("first bad commit: {}", shas[6])),
        "{stdout}"
    );
    let out = fleet
        .testbot(&[
            "bisect",
            REPO,
            "pkg > T.nothing",
            "--good",
            &shas[3],
            "--bad",
            &shas[9],
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("has a failure of test \"pkg > T.nothing\" on record"),
        "{stderr}"
    );
    let out = fleet.testbot(&["bisect", "--list", REPO]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 2, "{stdout}");

    // `wobbly` is known to be flaky now; the job's `quarantine` keeps its failures at
    // commit 13 from failing their check runs, which name it apart.
    let thirteen = fake
        .commit(REPO, "main", &[("notes.txt", "commit 13")], "Commit 13")
        .await;
    let runs = wait_for("commit 13's six check runs", WAIT, || async {
        let runs: Vec<_> = fake
            .check_runs(REPO)
            .into_iter()
            .filter(|run| run.head_sha == thirteen && run.current().status == "completed")
            .collect();
        (runs.len() == 6).then_some(runs)
    })
    .await;
    let quarantined: Vec<_> = runs
        .iter()
        .filter(|run| {
            run.current().output.title.as_deref() == Some("Passed but for known-flaky tests")
        })
        .collect();
    assert_eq!(quarantined.len(), 2, "{runs:#?}");
    for run in &runs {
        assert_eq!(
            run.current().conclusion.as_deref(),
            Some("success"),
            "{run:#?}"
        );
    }
    let summary = quarantined[0]
        .current()
        .output
        .summary
        .clone()
        .unwrap_or_default();
    assert!(
        summary.contains(r"Failed, known flaky (in quarantine): pkg \> T.wobbly"),
        "{summary}"
    );
    fake.assert_conforms();
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_agents_fill_the_history_of_the_last_commits_which_then_shows_a_rare_flake() {
    ensure_account(JOB_ACCOUNT);
    let (fake, fleet) = two_agent_site().await;
    // One post-merge run a push; the history keeps three on each of the last two commits.
    let config = r#"
[jobs.unit]
executor = "shell"
results = ["out/*.xml"]
history = { commits = 2, runs = 3 }
script = "sh test.sh"

[jobs.unit.on]
push = { branches = ["main"] }
"#;
    let mut shas = Vec::new();
    for n in 1..=3 {
        let content = format!("commit {n}");
        let mut files = vec![("notes.txt", content.as_str())];
        if n == 1 {
            files.extend([
                (".github/testbot.toml", config),
                ("test.sh", BISECT_TEST),
                ("flaky", "every third job fails"),
            ]);
        }
        shas.push(
            fake.commit(REPO, "main", &files, &format!("Commit {n}"))
                .await,
        );
    }
    // The last two commits get three runs each; no commit gets more.
    let counts = wait_for(
        "the history to be filled",
        Duration::from_secs(120),
        || async {
            let jobs = jobs_of(&fleet).await;
            if !jobs.iter().all(|j| j.state.is_terminal()) {
                return None;
            }
            let mut counts = Vec::new();
            for sha in &shas {
                let mut n = 0;
                for job in &jobs {
                    // Each run's log names the commit it checked out.
                    if fleet.log(job.id).await.contains(&format!("{REPO}@{sha}")) {
                        n += 1;
                    }
                }
                counts.push(n);
            }
            (counts[1] >= 3 && counts[2] >= 3).then_some(counts)
        },
    )
    .await;
    assert_eq!(&counts[1..], [3, 3], "{counts:?}");
    assert!((1..=3).contains(&counts[0]), "{counts:?}");
    // Only the pushes have check runs.
    assert_eq!(fake.check_runs(REPO).len(), 3);
    // The fill runs count for the branch: the flake shows at the commits they ran.
    let report = fleet.flaky_on_main(REPO).await;
    let wobbly = report.tests.iter().find(|t| t.name == "wobbly");
    assert!(
        wobbly.is_some_and(|t| t.verdict() == "flaky" && t.flaky_commits >= 1),
        "{report:#?}"
    );
    fake.assert_conforms();
    fleet.stop().await;
}
