//! The agent's identity: enrolled once with a site's enrollment token, then kept in the state
//! directory as `identity.json` (agent id, site, broker URL) and `agent-key.pk8` (its Ed25519
//! private key, mode 0600). The broker holds only the public key; every request is signed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use ring::signature::Ed25519KeyPair;
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};
use testbot_proto::agents::PolicySummary;
use testbot_proto::client::{Backoff, BrokerClient, ClientError};
use testbot_proto::sites::EnrollRequest;

pub(crate) const IDENTITY_FILE: &str = "identity.json";
pub(crate) const KEY_FILE: &str = "agent-key.pk8";

/// Who the agent is at its broker.
#[derive(Clone)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub site: String,
    pub key: Arc<Ed25519KeyPair>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IdentityFile {
    agent_id: String,
    site: String,
    broker_url: String,
    name: String,
}

impl AgentIdentity {
    /// The identity stored in `state_dir` for `broker_url`, if the agent has enrolled.
    pub fn load(state_dir: &Path, broker_url: &str) -> anyhow::Result<Option<AgentIdentity>> {
        let identity_path = state_dir.join(IDENTITY_FILE);
        let text = match std::fs::read_to_string(&identity_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("Cannot read {}", identity_path.display()));
            }
        };
        let identity: IdentityFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid identity file", identity_path.display()))?;
        anyhow::ensure!(
            identity.broker_url.trim_end_matches('/') == broker_url.trim_end_matches('/'),
            "{} holds an identity at broker {}, not {broker_url}; remove it (and {KEY_FILE}) to enroll again",
            identity_path.display(),
            identity.broker_url
        );
        let key_path = state_dir.join(KEY_FILE);
        let pkcs8 = std::fs::read(&key_path)
            .with_context(|| format!("Cannot read the agent key {}", key_path.display()))?;
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 key: {e}", key_path.display()))?;
        Ok(Some(AgentIdentity {
            agent_id: identity.agent_id,
            site: identity.site,
            key: Arc::new(key),
        }))
    }

    /// Loads the stored identity, or enrolls with `token` and stores the new one. Retries with
    /// backoff while the broker is unreachable; a refusal (bad, expired or used-up token) is
    /// final.
    pub async fn load_or_enroll(
        state_dir: &Path,
        broker_url: &str,
        name: &str,
        token: Option<SecretString>,
        policy: Option<&PolicySummary>,
        cancelled: impl Fn() -> bool,
    ) -> anyhow::Result<AgentIdentity> {
        if let Some(identity) = Self::load(state_dir, broker_url)? {
            return Ok(identity);
        }
        let token = token.with_context(|| {
            format!(
                "This agent is not enrolled yet (no {} in {}): set enrollment_token_file to a token from the broker's operator",
                IDENTITY_FILE,
                state_dir.display()
            )
        })?;
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("Cannot create state directory {}", state_dir.display()))?;
        let (pkcs8, public_key) =
            testbot_proto::signing::generate_key().map_err(anyhow::Error::msg)?;
        let client = BrokerClient::new(broker_url, SecretString::from(String::new()))?;
        let request = EnrollRequest {
            enrollment_token: token.expose_secret().to_string(),
            name: name.to_string(),
            public_key,
            policy: policy.cloned(),
        };
        let mut backoff = Backoff::standard();
        let enrollment = loop {
            match client.enroll(&request).await {
                Ok(enrollment) => break enrollment,
                Err(err @ ClientError::Unavailable(_)) if !cancelled() => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, ?delay, "Cannot reach the broker to enroll; retrying.");
                    tokio::time::sleep(delay.min(Duration::from_secs(30))).await;
                }
                Err(err) => return Err(err).context("Enrollment refused"),
            }
        };
        write_private(&state_dir.join(KEY_FILE), &pkcs8)?;
        let identity = IdentityFile {
            agent_id: enrollment.agent_id.clone(),
            site: enrollment.site.clone(),
            broker_url: broker_url.to_string(),
            name: name.to_string(),
        };
        write_private(
            &state_dir.join(IDENTITY_FILE),
            serde_json::to_string_pretty(&identity)?.as_bytes(),
        )?;
        tracing::info!(agent_id = %enrollment.agent_id, site = %enrollment.site, "Enrolled.");
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| anyhow::anyhow!("generated key is unusable: {e}"))?;
        Ok(AgentIdentity {
            agent_id: enrollment.agent_id,
            site: enrollment.site,
            key: Arc::new(key),
        })
    }

    /// A client that signs every request as this agent.
    pub fn client(&self, broker_url: &str) -> anyhow::Result<BrokerClient> {
        Ok(BrokerClient::for_agent(
            broker_url,
            self.agent_id.clone(),
            self.key.clone(),
        )?)
    }
}

/// Writes `bytes` to `path` readable by its owner only, atomically (temp file + rename).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp: PathBuf = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("Cannot create {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("Cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("Cannot write {}", path.display()))?;
    Ok(())
}
