//! Bad input gets a 4xx with a JSON error naming the problem, and nothing is stored.

use secrecy::ExposeSecret as _;
use testbot_e2e::Fleet;
use testbot_proto::error::ErrorBody;
use testbot_proto::jobs::JobListQuery;

/// A `Case::token` meaning: sign the request as an enrolled agent.
const SIGNED: &str = "(signed by an enrolled agent)";

struct Case {
    what: &'static str,
    path: &'static str,
    token: Option<String>,
    content_type: &'static str,
    body: String,
    status: u16,
    code: &'static str,
    message: &'static str,
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_with_a_clear_error_and_store_nothing() {
    let fleet = Fleet::start().await;
    let admin = Some(fleet.admin_token.expose_secret().to_string());
    let enrollment = Some(fleet.enrollment_token.expose_secret().to_string());
    // Cases with this token are sent signed by an enrolled agent instead.
    let agent = Some(SIGNED.to_string());
    let enrolled = fleet.enroll("bad-input").await;
    let json = "application/json";
    let cases = [
        Case {
            what: "malformed JSON",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": "echo hi""#.into(),
            status: 400,
            code: "invalid_json",
            message: "request body is not valid JSON: EOF while parsing an object at line 1 column 20",
        },
        Case {
            what: "unknown field",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": "echo hi", "scirpt": "x"}"#.into(),
            status: 400,
            code: "invalid_json",
            message: "unknown field `scirpt`, expected one of `script`, `name`, `labels`, `env`, `secret_env`, `timeout_secs`, `executor`, `image`, `resources`",
        },
        Case {
            what: "wrong type",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": 5}"#.into(),
            status: 400,
            code: "invalid_json",
            message: "script: invalid type: integer `5`, expected a string",
        },
        Case {
            what: "oversized body",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: format!(r#"{{"script": "{}"}}"#, "x".repeat(2 * 1024 * 1024)),
            status: 413,
            code: "payload_too_large",
            message: "request body is larger than the broker accepts",
        },
        Case {
            what: "script over the limit",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: format!(r#"{{"script": "{}"}}"#, "x".repeat(300 * 1024)),
            status: 400,
            code: "bad_request",
            message: "invalid job: script is 307200 bytes; the limit is 262144 bytes",
        },
        Case {
            what: "reserved env name",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": "true", "env": {"TESTBOT_JOB_ID": "7"}}"#.into(),
            status: 400,
            code: "bad_request",
            message: "environment variable TESTBOT_JOB_ID is reserved",
        },
        Case {
            what: "empty script",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": "  "}"#.into(),
            status: 400,
            code: "bad_request",
            message: "invalid job: script is empty",
        },
        Case {
            what: "bad label",
            path: "/jobs",
            token: admin.clone(),
            content_type: json,
            body: r#"{"script": "true", "labels": ["gpu; rm -rf /"]}"#.into(),
            status: 400,
            code: "bad_request",
            message: "label \"gpu; rm -rf /\" is invalid",
        },
        Case {
            what: "not JSON at all",
            path: "/jobs",
            token: admin.clone(),
            content_type: "text/plain",
            body: "echo hi".into(),
            status: 400,
            code: "bad_request",
            message: "expected a body with Content-Type: application/json",
        },
        Case {
            what: "bad token",
            path: "/jobs",
            token: Some("tbo_forged".into()),
            content_type: json,
            body: r#"{"script": "true"}"#.into(),
            status: 401,
            code: "unauthorized",
            message: "the bearer token is not valid",
        },
        Case {
            what: "no token",
            path: "/jobs",
            token: None,
            content_type: json,
            body: r#"{"script": "true"}"#.into(),
            status: 401,
            code: "unauthorized",
            message: "missing Authorization: Bearer <token> header",
        },
        Case {
            what: "enrollment token as a bearer token",
            path: "/jobs",
            token: enrollment.clone(),
            content_type: json,
            body: r#"{"script": "true"}"#.into(),
            status: 401,
            code: "unauthorized",
            message: "an enrollment token is not a bearer token",
        },
        Case {
            what: "operator token on the agent API",
            path: "/agent/poll",
            token: admin.clone(),
            content_type: json,
            body: r#"{"agent": "a", "executor": "shell"}"#.into(),
            status: 401,
            code: "unauthorized",
            message: "agent requests must be signed: the x-testbot-agent header is missing (enroll the agent first)",
        },
        Case {
            what: "bad label",
            path: "/agent/poll",
            token: agent.clone(),
            content_type: json,
            body: r#"{"agent": "a", "labels": ["a b"], "executor": "shell", "wait_ms": 0}"#.into(),
            status: 400,
            code: "bad_request",
            message: "label \"a b\" is invalid",
        },
        Case {
            what: "finish with a non-final state",
            path: "/agent/jobs/1/finish",
            token: agent.clone(),
            content_type: json,
            body: r#"{"lease": "x", "outcome": {"state": "running"}}"#.into(),
            status: 400,
            code: "bad_request",
            message: "outcome.state must be succeeded",
        },
        Case {
            what: "unknown job",
            path: "/agent/jobs/77/start",
            token: agent.clone(),
            content_type: json,
            body: r#"{"lease": "x"}"#.into(),
            status: 404,
            code: "not_found",
            message: "job 77 does not exist",
        },
        Case {
            what: "job id not a number",
            path: "/agent/jobs/abc/start",
            token: agent.clone(),
            content_type: json,
            body: r#"{"lease": "x"}"#.into(),
            status: 400,
            code: "bad_request",
            message: "invalid path",
        },
    ];
    testbot_proto::client::install_crypto_provider();
    // A fresh connection per request: after refusing an oversized body the broker closes the
    // connection it arrived on, and a pooled client could pick that one for the next case.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for case in &cases {
        let mut req = http
            .post(format!("{}/api/v1{}", fleet.url, case.path))
            .header("content-type", case.content_type)
            .body(case.body.clone());
        match case.token.as_deref() {
            Some(SIGNED) => {
                let signed = testbot_proto::signing::sign_request(
                    &enrolled.key,
                    &enrolled.id,
                    "POST",
                    &format!("/api/v1{}", case.path),
                    case.body.as_bytes(),
                );
                req = req
                    .header("x-testbot-agent", signed.agent)
                    .header("x-testbot-timestamp", signed.timestamp_ms)
                    .header("x-testbot-nonce", signed.nonce)
                    .header("x-testbot-signature", signed.signature);
            }
            Some(token) => req = req.bearer_auth(token),
            None => {}
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let body: ErrorBody = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not a JSON error ({e}): {text}", case.what));
        assert_eq!(status, case.status, "{}: {text}", case.what);
        assert_eq!(body.error.code, case.code, "{}: {text}", case.what);
        assert!(
            body.error.message.contains(case.message),
            "{}: expected {:?} in {:?}",
            case.what,
            case.message,
            body.error.message
        );
    }

    // GET errors share the shape.
    let resp = http
        .get(format!("{}/api/v1/jobs?state=done", fleet.url))
        .bearer_auth(admin.as_ref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: ErrorBody = resp.json().await.unwrap();
    assert!(
        body.error.message.contains("unknown variant `done`"),
        "{body:?}"
    );
    let resp = http
        .get(format!("{}/nowhere", fleet.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let body: ErrorBody = resp.json().await.unwrap();
    assert_eq!(body.error.code, "not_found");

    let jobs = fleet.client().jobs(&JobListQuery::default()).await.unwrap();
    assert!(jobs.jobs.is_empty(), "nothing was stored: {:?}", jobs.jobs);
    fleet.stop().await;
}
