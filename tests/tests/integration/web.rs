//! The job page and its live log, over HTTP as a browser asks for them: readable without
//! signing in for a public repository's jobs, hidden for others', job output only ever as text,
//! a long log in pages, and the live stream resuming where it left off.

use secrecy::ExposeSecret as _;
use serde_json::Value;
use testbot_e2e::{AUDIENCE, Fleet, WAIT};
use testbot_proto::jobs::{Job, JobSpec, JobState};
use testbot_proto::repos::RepoRegistration;

const PUBLIC: &str = "hpc-lab/solver";
const PRIVATE: &str = "hpc-lab/secret-sauce";

async fn fleet_for_workflows() -> Fleet {
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    for name in [PUBLIC, PRIVATE] {
        fleet
            .client()
            .register_repo(&RepoRegistration {
                name: name.into(),
                ..RepoRegistration::default()
            })
            .await
            .unwrap();
    }
    let mut agent = fleet.agent_config("a1");
    agent.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(agent);
    fleet.wait_polling_agents(1).await;
    fleet
}

/// Submits `spec` as a workflow of `repo`, whose token says the repository is `visibility`.
async fn submit(fleet: &Fleet, repo: &str, visibility: &str, spec: &JobSpec) -> Job {
    let issuer = fleet.issuer();
    let mut claims = issuer.claims(repo, AUDIENCE);
    claims["repository_visibility"] = visibility.into();
    fleet
        .client_with(&issuer.mint(&claims))
        .submit(spec)
        .await
        .unwrap()
}

async fn get(url: &str) -> reqwest::Response {
    reqwest::Client::new().get(url).send().await.unwrap()
}

/// Every line of a job's log, from the page's "earlier lines" requests, newest page first.
async fn all_pages(fleet: &Fleet, id: i64, log_bytes: u64) -> (Vec<Value>, usize) {
    let mut before = log_bytes;
    let mut pages = Vec::new();
    loop {
        let page: Value = get(&format!(
            "{}/jobs/{id}/log/lines?before={before}",
            fleet.url
        ))
        .await
        .json()
        .await
        .unwrap();
        let start = page["start"].as_u64().unwrap();
        pages.push(page["lines"].as_array().unwrap().clone());
        if start == 0 {
            break;
        }
        assert!(start < before, "no progress at {before}");
        before = start;
    }
    let count = pages.len();
    pages.reverse();
    (pages.into_iter().flatten().collect(), count)
}

fn text_of(line: &Value) -> String {
    line["g"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g[1].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_jobs_page_needs_no_sign_in_and_shows_job_output_only_as_text() {
    let fleet = fleet_for_workflows().await;
    let spec = JobSpec {
        name: Some("<script>alert('name')</script>".into()),
        script: r#"printf '\033[1;31merror\033[0m <img src=x onerror=alert(1)>\n'
echo '::group::Build'
echo inside the group
echo '::endgroup::'
echo '</pre><script>alert(2)</script>' >&2
cat > junit.xml <<'EOF'
<testsuite name="web"><testcase name="&lt;img src=x onerror=alert(3)&gt;"><failure message="&lt;script&gt;alert(4)&lt;/script&gt;"/></testcase><testcase name="fine"/></testsuite>
EOF"#
            .into(),
        results: vec!["junit.xml".into()],
        ..JobSpec::default()
    };
    let job = submit(&fleet, PUBLIC, "public", &spec).await;
    let done = fleet.wait_finished(job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    let id = job.id.0;

    let page = get(&format!("{}/jobs/{id}", fleet.url)).await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(html.contains("&#60;script&#62;alert("), "{html}");
    // The script runs only from the broker's own file; no inline script or style at all.
    assert!(html.contains(r#"<script src="/assets/job.js" defer></script>"#));
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(!html.contains("style="), "{html}");
    assert!(
        html.contains(&format!("https://github.com/{PUBLIC}")),
        "{html}"
    );
    // Its tests: the one that failed is listed, its name and message as text.
    assert!(
        html.contains("2 tests: 1 passed, 1 failed, 0 errors"),
        "{html}"
    );
    assert!(
        html.contains("&#60;img src=x onerror=alert(3)&#62;"),
        "{html}"
    );
    assert!(
        html.contains("&#60;script&#62;alert(4)&#60;/script&#62;"),
        "{html}"
    );
    assert!(!html.contains("<img"), "{html}");
    let file = get(&format!("{}/jobs/{id}/files?path=junit.xml", fleet.url)).await;
    assert_eq!(file.status(), 200);
    assert_eq!(file.headers()["content-type"], "application/octet-stream");
    assert!(
        file.text()
            .await
            .unwrap()
            .starts_with("<testsuite name=\"web\">")
    );
    assert!(html.contains("Workflow run"), "{html}");
    let script = get(&format!("{}/assets/job.js", fleet.url)).await;
    assert_eq!(
        script.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert!(script.text().await.unwrap().contains("textContent"));

    // The log: colours as classes, the markup the job printed as plain text.
    let (lines, _) = all_pages(&fleet, id, done.log_bytes).await;
    let error = lines
        .iter()
        .find(|l| text_of(l).starts_with("error"))
        .expect("the coloured line");
    assert_eq!(
        error["g"],
        serde_json::json!([["b fg1", "error"], ["", " <img src=x onerror=alert(1)>"]])
    );
    let stderr = lines
        .iter()
        .find(|l| l["s"] == "E")
        .expect("the stderr line");
    assert_eq!(text_of(stderr), "</pre><script>alert(2)</script>");
    assert!(lines.iter().any(|l| text_of(l) == "::group::Build"));
    assert!(lines.iter().any(|l| l["s"] == "S"), "testbot's own lines");

    // The raw log is the stored log, as a file.
    let raw = get(&format!("{}/jobs/{id}/log.txt", fleet.url)).await;
    assert_eq!(raw.status(), 200);
    assert!(
        raw.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert_eq!(raw.text().await.unwrap(), fleet.log(job.id).await);

    // An ended job's stream sends its lines, its state and the end, then closes.
    let stream = get(&format!("{}/jobs/{id}/log/stream?offset=0", fleet.url)).await;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let events = stream.text().await.unwrap();
    assert!(events.contains("event: lines"), "{events}");
    assert!(events.contains(r#""state":"succeeded""#), "{events}");
    assert!(
        events.trim_end().ends_with("event: end\ndata: {}"),
        "{events}"
    );

    let missing = get(&format!("{}/jobs/999999", fleet.url)).await;
    assert_eq!(missing.status(), 404);
    assert!(
        missing
            .text()
            .await
            .unwrap()
            .contains("There is no public job 999999")
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_repositorys_job_is_not_found_without_a_token() {
    let fleet = fleet_for_workflows().await;
    let spec = JobSpec {
        script: "echo the secret recipe".into(),
        ..JobSpec::default()
    };
    let job = submit(&fleet, PRIVATE, "private", &spec).await;
    fleet.wait_finished(job.id).await;
    let id = job.id.0;
    for path in [
        format!("/jobs/{id}"),
        format!("/jobs/{id}/log.txt"),
        format!("/jobs/{id}/log/lines?before=100000"),
        format!("/jobs/{id}/log/stream"),
        format!("/jobs/{id}/files?path=junit.xml"),
    ] {
        let answer = get(&format!("{}{path}", fleet.url)).await;
        assert_eq!(answer.status(), 404, "{path}");
        let body = answer.text().await.unwrap();
        assert!(!body.contains("secret recipe"), "{path}: {body}");
        assert!(
            body.contains(&format!("There is no public job {id}")),
            "{path}: {body}"
        );
    }
    // The operator's token (as the API takes it) opens it.
    let page = reqwest::Client::new()
        .get(format!("{}/jobs/{id}/log.txt", fleet.url))
        .bearer_auth(fleet.admin_token.expose_secret())
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("the secret recipe"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_live_log_streams_while_the_job_runs_resumes_where_it_left_off_and_pages_a_long_log() {
    let fleet = fleet_for_workflows().await;
    let spec = JobSpec {
        script: "for i in $(seq 1 8); do echo step $i; sleep 0.3; done".into(),
        ..JobSpec::default()
    };
    let job = submit(&fleet, PUBLIC, "public", &spec).await;
    let id = job.id.0;
    let mut stream = get(&format!("{}/jobs/{id}/log/stream?offset=0", fleet.url)).await;
    let mut received = String::new();
    while !received.contains("step 1") {
        let chunk = tokio::time::timeout(WAIT, stream.chunk())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("the stream is open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    let job_now = fleet.client().job(job.id).await.unwrap();
    assert!(
        !job_now.state.is_terminal(),
        "step 1 arrived only after the job ended"
    );
    drop(stream);
    // A browser that reconnects sends the last event's id: the stream goes on from there.
    let last_id: u64 = received
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .expect("an event id")
        .parse()
        .unwrap();
    let done = fleet.wait_finished(job.id).await;
    let resumed = reqwest::Client::new()
        .get(format!("{}/jobs/{id}/log/stream", fleet.url))
        .header("last-event-id", last_id.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first_offset = resumed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find_map(|d| serde_json::from_str::<Value>(d).ok()?["lines"][0]["o"].as_u64());
    assert_eq!(first_offset, Some(last_id), "{resumed}");
    let steps = |text: &str| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .flat_map(|d| d["lines"].as_array().cloned().unwrap_or_default())
            .map(|l| text_of(&l))
            .filter(|t| t.starts_with("step "))
            .collect::<Vec<_>>()
    };
    let mut all = steps(&received);
    all.extend(steps(&resumed));
    let expected: Vec<String> = (1..=8).map(|i| format!("step {i}")).collect();
    assert_eq!(all, expected);
    assert_eq!(done.state, JobState::Succeeded);

    // 30,000 lines: the page reads them a page at a time, and the pages join up exactly.
    let spec = JobSpec {
        script: "seq 1 30000 | sed 's/^/line /'".into(),
        ..JobSpec::default()
    };
    let job = submit(&fleet, PUBLIC, "public", &spec).await;
    let done = fleet.wait_finished(job.id).await;
    let (lines, pages) = all_pages(&fleet, job.id.0, done.log_bytes).await;
    assert!(pages > 1, "a {} byte log in one page", done.log_bytes);
    let numbered: Vec<String> = lines
        .iter()
        .filter(|l| l["s"] == "O")
        .map(text_of)
        .collect();
    let expected: Vec<String> = (1..=30000).map(|i| format!("line {i}")).collect();
    assert_eq!(numbered.len(), expected.len());
    assert!(numbered == expected, "lines lost, doubled or out of order");
    let offsets: Vec<u64> = lines.iter().map(|l| l["o"].as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    fleet.stop().await;
}
