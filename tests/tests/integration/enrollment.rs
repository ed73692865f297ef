//! Sites, agent enrollment and signed agent requests: the attacks on them, each refused with
//! its exact reason.

use testbot_e2e::refusal;
use testbot_e2e::{EnrolledAgent, Fleet, TEST_SITE};
use testbot_proto::client::BrokerClient;
use testbot_proto::signing;
use testbot_proto::sites::{EnrollRequest, EnrollmentTokenRequest};

fn enroll_request(token: &str, name: &str) -> EnrollRequest {
    EnrollRequest {
        enrollment_token: token.into(),
        name: name.into(),
        public_key: signing::generate_key().unwrap().1,
        policy: None,
    }
}

const POLL_BODY: &str = testbot_e2e::POLL_BODY;

async fn send_signed(
    fleet: &Fleet,
    agent: &EnrolledAgent,
    timestamp_ms: i64,
    nonce: &str,
    signed_body: &str,
    sent_body: &str,
) -> (u16, String) {
    testbot_e2e::send_signed_poll(
        &fleet.url,
        agent,
        timestamp_ms,
        nonce,
        signed_body,
        sent_body,
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_tokens_expire_run_out_and_die_with_their_site() {
    testbot_proto::client::install_crypto_provider();
    let fleet = Fleet::start().await;
    let operator = fleet.client();
    operator.create_site("hpc").await.unwrap();
    let (status, message) = refusal(operator.create_site("hpc").await);
    assert_eq!((status, message.as_str()), (409, "site hpc exists already"));

    let once = operator
        .create_enrollment_token("hpc", &EnrollmentTokenRequest::default())
        .await
        .unwrap();
    assert!(once.token.starts_with("tbe_"));
    let enrollment = operator
        .enroll(&enroll_request(&once.token, "login1"))
        .await
        .unwrap();
    assert_eq!(enrollment.site, "hpc");

    let short = operator
        .create_enrollment_token(
            "hpc",
            &EnrollmentTokenRequest {
                uses: 5,
                ttl_secs: 1,
            },
        )
        .await
        .unwrap();
    let spare = operator
        .create_enrollment_token(
            "hpc",
            &EnrollmentTokenRequest {
                uses: 5,
                ttl_secs: 3600,
            },
        )
        .await
        .unwrap();
    // Expire `short` without sleeping in the test: wait for the clock instead.
    testbot_e2e::wait_for("the short token to expire", testbot_e2e::WAIT, || async {
        (testbot_proto::now_ms() > short.expires_at_ms).then_some(())
    })
    .await;

    let cases = [
        (
            "used-up token",
            enroll_request(&once.token, "login2"),
            401,
            "the enrollment token has been used up; ask the operator for a new one".to_string(),
        ),
        (
            "expired token",
            enroll_request(&short.token, "login2"),
            401,
            "the enrollment token has expired; ask the operator for a new one".to_string(),
        ),
        (
            "made-up token",
            enroll_request("tbe_0000", "login2"),
            401,
            "the enrollment token is not valid".to_string(),
        ),
        (
            "name taken in the site",
            enroll_request(&spare.token, "login1"),
            409,
            "site hpc already has an agent named login1; choose another name or revoke the old agent"
                .to_string(),
        ),
        (
            "public key of the wrong size",
            EnrollRequest {
                public_key: "AAAA".into(),
                ..enroll_request(&spare.token, "login3")
            },
            400,
            "public_key is 3 bytes; an Ed25519 public key is 32".to_string(),
        ),
    ];
    for (what, request, status, message) in &cases {
        let (got_status, got_message) = refusal(operator.enroll(request).await);
        assert_eq!(
            (got_status, got_message.as_str()),
            (*status, message.as_str()),
            "case: {what}"
        );
    }
    let agents = operator.agents().await.unwrap().agents;
    assert_eq!(agents.len(), 1, "a refused enrollment stored an agent");

    // Revoking the site kills its tokens and its agents.
    operator.revoke_site("hpc").await.unwrap();
    let (status, message) = refusal(
        operator
            .enroll(&enroll_request(&spare.token, "login4"))
            .await,
    );
    assert_eq!(
        (status, message.as_str()),
        (401, "the enrollment token is not valid")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_requests_cannot_be_forged_replayed_or_used_after_revocation() {
    testbot_proto::client::install_crypto_provider();
    let fleet = Fleet::start().await;
    let agent = fleet.enroll("login1").await;
    let now = testbot_proto::now_ms();

    // The genuine request works once...
    let nonce = signing::random_hex(16);
    let (status, _) = send_signed(&fleet, &agent, now, &nonce, POLL_BODY, POLL_BODY).await;
    assert_eq!(status, 204);

    let other = fleet.enroll("login2").await;
    let impostor = EnrolledAgent {
        id: agent.id.clone(),
        key: other.key.clone(),
        client: other.client.clone(),
    };
    let cases: Vec<(&str, (u16, String), &str)> = vec![
        (
            "replayed request (same nonce)",
            send_signed(&fleet, &agent, now, &nonce, POLL_BODY, POLL_BODY).await,
            "the request nonce was used before: a replayed request",
        ),
        (
            "body changed after signing",
            send_signed(
                &fleet,
                &agent,
                now,
                &signing::random_hex(16),
                POLL_BODY,
                r#"{"agent": "x", "executor": "shell", "labels": ["gpu"], "wait_ms": 0}"#,
            )
            .await,
            "the request signature does not verify",
        ),
        (
            "signed by another agent's key",
            send_signed(
                &fleet,
                &impostor,
                now,
                &signing::random_hex(16),
                POLL_BODY,
                POLL_BODY,
            )
            .await,
            "the request signature does not verify",
        ),
        (
            "signed ten minutes ago",
            send_signed(
                &fleet,
                &agent,
                now - 600_000,
                &signing::random_hex(16),
                POLL_BODY,
                POLL_BODY,
            )
            .await,
            "the request was signed 600 s behind the broker's clock (at most 300 s allowed): a replayed request, or the agent's clock is wrong",
        ),
        (
            "unknown agent id",
            send_signed(
                &fleet,
                &EnrolledAgent {
                    id: "agt_000000000000000000000000".into(),
                    key: agent.key.clone(),
                    client: agent.client.clone(),
                },
                now,
                &signing::random_hex(16),
                POLL_BODY,
                POLL_BODY,
            )
            .await,
            "agent agt_000000000000000000000000 is not enrolled",
        ),
    ];
    for (what, (status, message), want) in &cases {
        assert_eq!((*status, message.as_str()), (401, *want), "case: {what}");
    }

    // Revocation takes effect on the very next request.
    let operator = fleet.client();
    operator.revoke_agent(&agent.id).await.unwrap();
    let (status, message) = refusal(agent.client.poll(&poll()).await);
    assert_eq!(
        (status, message),
        (
            401,
            format!("agent {TEST_SITE}/login1 ({}) was revoked", agent.id)
        )
    );
    assert!(other.client.poll(&poll()).await.is_ok());
    operator.revoke_site(TEST_SITE).await.unwrap();
    let (status, message) = refusal(other.client.poll(&poll()).await);
    assert_eq!(
        (status, message),
        (
            401,
            format!("site {TEST_SITE} was revoked; its agents are refused")
        )
    );
    // An enrollment token is not a credential for anything else.
    let (status, _) = refusal(
        BrokerClient::new(&fleet.url, fleet.enrollment_token.clone())
            .unwrap()
            .jobs(&Default::default())
            .await,
    );
    assert_eq!(status, 401);
}

fn poll() -> testbot_proto::agents::PollRequest {
    testbot_proto::agents::PollRequest {
        agent: "x".into(),
        labels: vec![],
        executor: "shell".into(),
        wait_ms: Some(0),
        policy: None,
        workflow_jobs_without_policy: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn timestamps_that_overflow_the_clock_arithmetic_are_refused_not_crashed() {
    let fleet = Fleet::start().await;
    let agent = fleet.enroll("skewed").await;
    for (i, timestamp_ms) in [i64::MIN, i64::MIN + 1, i64::MAX].into_iter().enumerate() {
        let nonce = format!("overflow-nonce-{i:04}");
        let (status, message) =
            send_signed(&fleet, &agent, timestamp_ms, &nonce, POLL_BODY, POLL_BODY).await;
        assert_eq!(status, 401, "timestamp {timestamp_ms}: {message}");
        assert!(
            message.starts_with("the request was signed ")
                && message.ends_with("a replayed request, or the agent's clock is wrong"),
            "timestamp {timestamp_ms}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_public_key_enrolls_one_agent_only() {
    let fleet = Fleet::start().await;
    let token = secrecy::ExposeSecret::expose_secret(&fleet.enrollment_token).to_string();
    let mut first = enroll_request(&token, "login1");
    let operator = fleet.client();
    let enrolled = operator.enroll(&first).await.unwrap();
    // A second agent with the same key would share the first one's identity for signatures.
    first.name = "login2".into();
    let (status, message) = refusal(operator.enroll(&first).await);
    assert_eq!(
        (status, message.as_str()),
        (
            409,
            "this public key belongs to an agent enrolled before: every agent generates its own \
             key (remove the agent's agent-key.pk8 to have it make a new one)"
        )
    );
    // Also after the first one is revoked: a revoked key stays retired.
    operator.revoke_agent(&enrolled.agent_id).await.unwrap();
    let (status, _) = refusal(operator.enroll(&first).await);
    assert_eq!(status, 409);
    let agents = operator.agents().await.unwrap().agents;
    assert_eq!(agents.len(), 1, "{agents:?}");
}
