//! Webhook deliveries as GitHub sends them: GitHub's example payloads (vendored from
//! `@octokit/webhooks-examples`, gzipped), the headers (`X-GitHub-Event`, `X-GitHub-Delivery`,
//! `X-GitHub-Hook-ID`, `X-Hub-Signature-256`, ...) and a deliverer. One more example, of a
//! comment on a pull request, comes from GitHub's documentation.

use std::io::Read as _;
use std::sync::LazyLock;

use anyhow::Context as _;
use serde_json::Value;

/// `@octokit/webhooks-examples`' `api.github.com/index.json`, gzipped by `update.sh`.
const EXAMPLES_GZ: &[u8] = include_bytes!("../../fixtures/github/webhooks-examples.json.gz");

static EXAMPLES: LazyLock<Vec<(String, Value)>> = LazyLock::new(|| {
    let mut json = String::new();
    flate2::read::GzDecoder::new(EXAMPLES_GZ)
        .read_to_string(&mut json)
        .expect("webhooks-examples.json.gz is gzipped UTF-8");
    let events: Vec<Value> = serde_json::from_str(&json).expect("the webhook examples are JSON");
    events
        .into_iter()
        .flat_map(|event| {
            let name = event["name"].as_str().unwrap_or_default().to_string();
            let examples = event["examples"].as_array().cloned().unwrap_or_default();
            examples
                .into_iter()
                .map(move |example| (name.clone(), example))
        })
        .collect()
});

/// Every example GitHub publishes: (event name, as in `X-GitHub-Event`; payload).
pub fn examples() -> impl Iterator<Item = (&'static str, &'static Value)> {
    EXAMPLES
        .iter()
        .map(|(name, payload)| (name.as_str(), payload))
}

/// GitHub's example of an `issue_comment` created on a pull request (GitHub's published examples
/// are all on issues), from GitHub's documentation.
const ISSUE_COMMENT_ON_PULL_REQUEST: &str =
    include_str!("../../fixtures/github/issue_comment.created-on-pr.json");

/// GitHub's example of a comment on a pull request (`issue_comment` created; `issue` has
/// `pull_request`).
pub fn issue_comment_on_pull_request() -> Value {
    serde_json::from_str(ISSUE_COMMENT_ON_PULL_REQUEST).expect("the example is JSON")
}

/// GitHub's example of `event` with `action` (the first one without an action when `None`).
pub fn example(event: &str, action: Option<&str>) -> Value {
    examples()
        .find(|(name, payload)| *name == event && payload["action"].as_str() == action)
        .map(|(_, payload)| payload.clone())
        .unwrap_or_else(|| panic!("GitHub publishes no example of {event} {action:?}"))
}

/// The `X-Hub-Signature-256` of `body` with webhook secret `secret`: `sha256=<hex HMAC>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// A uuid-like delivery id, as GitHub gives each delivery.
pub fn new_delivery_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("randomness");
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// One webhook delivery. Send it as often as you like: a redelivery keeps its id, as GitHub's
/// "Redeliver" does.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// `X-GitHub-Event`.
    pub event: String,
    /// `X-GitHub-Delivery`.
    pub id: String,
    /// `X-GitHub-Hook-ID`.
    pub hook_id: u64,
    /// `X-GitHub-Hook-Installation-Target-ID`: the App's id (its webhook belongs to the App).
    pub installation_target_id: u64,
    pub payload: Value,
}

impl Delivery {
    pub fn new(event: &str, hook_id: u64, payload: Value) -> Delivery {
        Delivery {
            event: event.to_string(),
            id: new_delivery_id(),
            hook_id,
            installation_target_id: 0,
            payload,
        }
    }

    /// The `action` of the payload, if it has one.
    pub fn action(&self) -> Option<&str> {
        self.payload["action"].as_str()
    }

    /// The body as sent.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&self.payload).expect("a payload serialises")
    }

    /// The headers GitHub sends, signed with `secret`.
    pub fn headers(&self, secret: &str) -> Vec<(&'static str, String)> {
        self.headers_with_signature(&signature(secret, &self.body()))
    }

    fn headers_with_signature(&self, signature: &str) -> Vec<(&'static str, String)> {
        vec![
            ("Content-Type", "application/json".into()),
            ("User-Agent", "GitHub-Hookshot/7f7ae17".into()),
            ("X-GitHub-Event", self.event.clone()),
            ("X-GitHub-Delivery", self.id.clone()),
            ("X-GitHub-Hook-ID", self.hook_id.to_string()),
            (
                "X-GitHub-Hook-Installation-Target-ID",
                self.installation_target_id.to_string(),
            ),
            (
                "X-GitHub-Hook-Installation-Target-Type",
                "integration".into(),
            ),
            ("X-Hub-Signature-256", signature.to_string()),
        ]
    }

    /// POSTs it to `url` signed with `secret`; the status the receiver answered.
    pub async fn send(&self, url: &str, secret: &str) -> anyhow::Result<u16> {
        self.send_with_signature(url, &signature(secret, &self.body()))
            .await
    }

    /// POSTs it to `url` with `signature` as its `X-Hub-Signature-256` (a wrong one, say).
    pub async fn send_with_signature(&self, url: &str, signature: &str) -> anyhow::Result<u16> {
        let mut request = reqwest::Client::new().post(url).body(self.body());
        for (name, value) in self.headers_with_signature(signature) {
            request = request.header(name, value);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("Cannot deliver the {} webhook to {url}", self.event))?;
        Ok(response.status().as_u16())
    }
}

/// Overwrites `target`'s fields with `source`'s (both objects); other fields stay.
pub fn merge_into(target: &mut Value, source: Value) {
    match (target.as_object_mut(), source) {
        (Some(target), Value::Object(source)) => {
            for (key, value) in source {
                target.insert(key, value);
            }
        }
        (_, source) => *target = source,
    }
}
