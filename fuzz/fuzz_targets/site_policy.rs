//! A site's policy file, and its decisions on job claims that a workflow controls.
//!
//! The input is the policy text, then a NUL byte, then the bytes the claims and the job are
//! drawn from; without a NUL the fixed claims of a real token are used.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use testbot_agent::policy::{Decision, SitePolicy};
use testbot_proto::jobs::JobSpec;
use testbot_proto::oidc::WorkflowClaims;

const REAL_CLAIMS: &str = include_str!("../../tests/fixtures/oidc/real-token-rgl.decoded.json");

fn real_claims() -> WorkflowClaims {
    let decoded: serde_json::Value = serde_json::from_str(REAL_CLAIMS).unwrap();
    serde_json::from_value(decoded["payload"].clone()).unwrap()
}

/// Strings a policy compares claims with are short: mostly pick among words of the policy
/// itself, so the fuzzer reaches the rules that match as well as those that do not.
fn word(u: &mut Unstructured<'_>, words: &[&str]) -> arbitrary::Result<String> {
    if !words.is_empty() && bool::arbitrary(u)? {
        Ok(u.choose(words)?.to_string())
    } else {
        String::arbitrary(u)
    }
}

fn claims(u: &mut Unstructured<'_>, words: &[&str]) -> arbitrary::Result<WorkflowClaims> {
    let mut claims = real_claims();
    claims.repository = word(u, words)?;
    claims.repository_owner = word(u, words)?;
    claims.git_ref = word(u, words)?;
    claims.event_name = word(u, words)?;
    claims.actor = word(u, words)?;
    claims.job_workflow_ref = word(u, words)?;
    claims.environment = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    claims.repository_visibility = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    claims.ref_protected = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    claims.actor_id = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    Ok(claims)
}

fn spec(u: &mut Unstructured<'_>, words: &[&str]) -> arbitrary::Result<JobSpec> {
    let mut spec = JobSpec {
        script: "true".into(),
        ..JobSpec::default()
    };
    spec.executor = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    spec.image = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    spec.timeout_secs = Option::arbitrary(u)?;
    spec.resources.cpus = Option::arbitrary(u)?;
    spec.resources.memory_mib = Option::arbitrary(u)?;
    spec.resources.gpus = Option::arbitrary(u)?;
    spec.resources.nodes = Option::arbitrary(u)?;
    spec.resources.partition = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    spec.resources.account = Option::<()>::arbitrary(u)?
        .map(|()| word(u, words))
        .transpose()?;
    spec.labels = (0..u.int_in_range(0..=3)?)
        .map(|_| word(u, words))
        .collect::<arbitrary::Result<_>>()?;
    Ok(spec)
}

fuzz_target!(|data: &[u8]| {
    let (text, rest) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(policy) = SitePolicy::parse(text) else {
        return;
    };
    let words: Vec<&str> = text
        .split(|c: char| c.is_whitespace() || matches!(c, '"' | '[' | ']' | ',' | '=' | '{' | '}'))
        .filter(|w| !w.is_empty())
        .collect();
    let mut u = Unstructured::new(rest);
    let (claims, spec, executor) = if rest.is_empty() {
        (
            real_claims(),
            JobSpec {
                script: "true".into(),
                ..JobSpec::default()
            },
            "shell".to_string(),
        )
    } else {
        let Ok(claims) = claims(&mut u, &words) else {
            return;
        };
        let Ok(spec) = spec(&mut u, &words) else {
            return;
        };
        let Ok(executor) = word(&mut u, &words) else {
            return;
        };
        (claims, spec, executor)
    };
    let explanation = policy.explain(&claims, &spec, &executor);
    let decision = policy.evaluate(&claims, &spec, &executor);
    assert_eq!(
        decision, explanation.decision,
        "evaluate and explain disagree"
    );
    assert_eq!(explanation.rules.len(), policy.rules().len());
    assert_eq!(
        explanation.executor,
        spec.executor.as_deref().unwrap_or(&executor)
    );
    match &decision {
        Decision::Allow { rule, .. } => {
            // The rule that allowed it is one whose verdict is no denial.
            assert!(
                explanation
                    .rules
                    .iter()
                    .any(|v| &v.rule == rule && v.denial.is_none()),
                "allowed by {rule:?}, which explain denies: {explanation:?}"
            );
        }
        Decision::Deny { reason } => {
            assert!(!reason.trim().is_empty(), "a denial without a reason");
        }
    }
    if explanation.rules.iter().all(|v| v.denial.is_some()) {
        assert!(!decision.is_allowed(), "allowed with every rule denying it");
    }
    let _ = policy.resources(&spec, &explanation.executor);
    let _ = policy.time_limit(&spec, &explanation.executor);
    let _ = policy.summary();
    let _ = policy.describe();
});
