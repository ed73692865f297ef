//! Checks a parsed policy for what serde cannot see: values that must name something configured,
//! globs that could never match, lists left empty. Each error carries the dotted path of the
//! value (`rules.1.refs.0`) so it can be placed at its line and column.

use std::collections::HashSet;
use std::time::Duration;

use testbot_proto::jobs::{validate_image, validate_word};

use super::SitePolicy;
use super::settings::{ContainerSettings, ExecutorName, KubernetesSettings, format_duration};
use crate::identity::validate_account_name;
use testbot_proto::toml_errors::closest;

/// The events of GitHub Actions a rule may name.
pub const GITHUB_EVENTS: &[&str] = &[
    "branch_protection_rule",
    "check_run",
    "check_suite",
    "create",
    "delete",
    "deployment",
    "deployment_status",
    "discussion",
    "discussion_comment",
    "fork",
    "gollum",
    "issue_comment",
    "issues",
    "label",
    "merge_group",
    "milestone",
    "page_build",
    "public",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
    "pull_request_target",
    "push",
    "registry_package",
    "release",
    "repository_dispatch",
    "schedule",
    "status",
    "watch",
    "workflow_call",
    "workflow_dispatch",
    "workflow_run",
];

/// The longest identity script time limit.
const MAX_SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// A semantic error: the dotted path of the value, and what is wrong with it.
#[derive(Debug)]
pub(super) struct Invalid {
    pub path: String,
    pub message: String,
}

fn bad(path: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid {
        path: path.into(),
        message: message.into(),
    }
}

pub(super) fn validate(policy: &SitePolicy) -> Result<(), Invalid> {
    if policy.max_concurrent_jobs == 0 || policy.max_concurrent_jobs > 1024 {
        return Err(bad(
            "max_concurrent_jobs",
            "max_concurrent_jobs must be between 1 and 1024",
        ));
    }
    for (i, pattern) in policy.env_allow.iter().enumerate() {
        check_env_glob(pattern).map_err(|e| bad(format!("env_allow.{i}"), e))?;
    }
    check_oidc(policy)?;
    check_github(policy)?;
    check_executors(policy)?;
    check_identity(policy)?;
    check_rules(policy)
}

fn check_github(policy: &SitePolicy) -> Result<(), Invalid> {
    let Some(github) = &policy.github else {
        return Ok(());
    };
    if github.accept.is_empty() {
        return Err(bad(
            "github.accept",
            format!(
                "github.accept is empty: name the App events the site takes ({}), or remove [github]",
                super::settings::APP_EVENTS.join(", ")
            ),
        ));
    }
    for (i, event) in github.accept.iter().enumerate() {
        if !super::settings::APP_EVENTS.contains(&event.as_str()) {
            let hint = closest(event, super::settings::APP_EVENTS.iter().copied())
                .map(|c| format!("; did you mean `{c}`?"))
                .unwrap_or_default();
            return Err(bad(
                format!("github.accept.{i}"),
                format!(
                    "{event:?} is not an App event this agent checks (it checks: {}){hint}",
                    super::settings::APP_EVENTS.join(", ")
                ),
            ));
        }
    }
    for (field, url) in [
        ("github.api_url", &github.api_url),
        ("github.git_url", &github.git_url),
    ] {
        let loopback = ["http://127.", "http://localhost:", "http://[::1]:"]
            .iter()
            .any(|prefix| url.starts_with(prefix));
        if !(url.starts_with("https://") || loopback) {
            return Err(bad(
                field,
                format!("{field} {url:?} must be an https:// URL (http:// only on loopback)"),
            ));
        }
    }
    Ok(())
}

fn check_oidc(policy: &SitePolicy) -> Result<(), Invalid> {
    let oidc = &policy.oidc;
    // Plain http only for an issuer on this machine (a local test issuer).
    let loopback = ["http://127.", "http://localhost:", "http://[::1]:"]
        .iter()
        .any(|prefix| oidc.issuer.starts_with(prefix));
    if !(oidc.issuer.starts_with("https://") || loopback) || oidc.issuer.trim() != oidc.issuer {
        return Err(bad(
            "oidc.issuer",
            format!(
                "oidc.issuer {:?} must be an https:// URL (http:// only on loopback), e.g. {:?}",
                oidc.issuer,
                testbot_proto::oidc::GITHUB_ISSUER
            ),
        ));
    }
    if oidc.audience.trim().is_empty() {
        return Err(bad(
            "oidc.audience",
            "oidc.audience is empty: set it to the broker's audience (its URL)",
        ));
    }
    if oidc.audience.trim() != oidc.audience {
        return Err(bad(
            "oidc.audience",
            format!(
                "oidc.audience {:?} has spaces around it; tokens would never match",
                oidc.audience
            ),
        ));
    }
    Ok(())
}

fn check_executors(policy: &SitePolicy) -> Result<(), Invalid> {
    let executors = &policy.executors;
    if executors.configured().is_empty() {
        return Err(bad(
            "executors",
            "no executor is configured: add at least one table such as [executors.shell] or [executors.slurm]",
        ));
    }
    for name in executors.configured() {
        let limits = executors.limits(name).expect("configured");
        let base = format!("executors.{name}");
        for (key, value) in [
            ("max_cpus", limits.max_cpus),
            ("max_nodes", limits.max_nodes),
            ("max_ntasks", limits.max_ntasks),
        ] {
            if value == Some(0) {
                return Err(bad(
                    format!("{base}.{key}"),
                    format!(
                        "{base}.{key} must be at least 1 (remove [{base}] to forbid the executor)"
                    ),
                ));
            }
        }
        if limits.default_cpus == Some(0) || limits.default_memory_mib == Some(0) {
            return Err(bad(
                format!(
                    "{base}.{}",
                    if limits.default_cpus == Some(0) {
                        "default_cpus"
                    } else {
                        "default_memory"
                    }
                ),
                format!(
                    "{base}: a default of 0 would give jobs nothing to run with: leave it out to use the cap"
                ),
            ));
        }
        if let (Some(default), Some(cap)) = (limits.default_cpus, limits.max_cpus)
            && default > cap
        {
            return Err(bad(
                format!("{base}.default_cpus"),
                format!(
                    "{base}.default_cpus {default} is over max_cpus {cap}: lower default_cpus or raise max_cpus"
                ),
            ));
        }
        if let (Some(default), Some(cap)) = (limits.default_memory_mib, limits.max_memory_mib)
            && default > cap
        {
            return Err(bad(
                format!("{base}.default_memory"),
                format!(
                    "{base}.default_memory {} is over max_memory {}: lower default_memory or raise max_memory",
                    super::format_mib(default),
                    super::format_mib(cap)
                ),
            ));
        }
        if let Some(max_time) = limits.max_time
            && max_time > policy.max_runtime
        {
            return Err(bad(
                format!("{base}.max_time"),
                format!(
                    "{base}.max_time {} is over the site's max_runtime of {}: raise max_runtime or lower max_time",
                    format_duration(max_time),
                    format_duration(policy.max_runtime)
                ),
            ));
        }
    }
    if let Some(slurm) = &executors.slurm {
        for (key, words) in [
            ("partitions", &slurm.partitions),
            ("accounts", &slurm.accounts),
            ("qos", &slurm.qos),
        ] {
            for (i, word) in words.iter().enumerate() {
                validate_word(&format!("executors.slurm.{key}"), word)
                    .map_err(|e| bad(format!("executors.slurm.{key}.{i}"), e))?;
            }
        }
        for (i, arg) in slurm.extra_args.iter().enumerate() {
            if !arg.starts_with('-') || arg.contains(['\n', '\r', '\0']) {
                return Err(bad(
                    format!("executors.slurm.extra_args.{i}"),
                    format!(
                        "executors.slurm.extra_args: {arg:?} is not an sbatch option: write one option per string, e.g. \"--reservation=ci\""
                    ),
                ));
            }
        }
    }
    for (name, settings) in [
        (ExecutorName::Docker, &executors.docker),
        (ExecutorName::Podman, &executors.podman),
    ] {
        if let Some(settings) = settings {
            check_container(name, settings)?;
        }
    }
    if let Some(kubernetes) = &executors.kubernetes {
        check_kubernetes(kubernetes)?;
    }
    Ok(())
}

fn check_container(name: ExecutorName, settings: &ContainerSettings) -> Result<(), Invalid> {
    let base = format!("executors.{name}");
    check_images(&base, &settings.images, settings.default_image.as_deref())?;
    if let Some(runtime) = &settings.runtime {
        validate_word(&format!("{base}.runtime"), runtime)
            .map_err(|e| bad(format!("{base}.runtime"), e))?;
    }
    Ok(())
}

fn check_kubernetes(settings: &KubernetesSettings) -> Result<(), Invalid> {
    let base = "executors.kubernetes";
    check_images(base, &settings.images, settings.default_image.as_deref())?;
    if !is_dns_label(&settings.namespace) {
        return Err(bad(
            format!("{base}.namespace"),
            format!(
                "{base}.namespace {:?} is not a Kubernetes namespace name: use 1-63 characters of a-z 0-9 -, starting and ending with a letter or digit",
                settings.namespace
            ),
        ));
    }
    if !is_label_key(&settings.gpu_resource) || !settings.gpu_resource.contains('/') {
        return Err(bad(
            format!("{base}.gpu_resource"),
            format!(
                "{base}.gpu_resource {:?} is not an extended resource name: write DOMAIN/NAME, e.g. \"nvidia.com/gpu\"",
                settings.gpu_resource
            ),
        ));
    }
    for (key, value) in &settings.node_selector {
        if !is_label_key(key) || !is_label_value(value) {
            return Err(bad(
                format!("{base}.node_selector"),
                format!(
                    "{base}.node_selector {key:?} = {value:?} is not a Kubernetes label: keys are [PREFIX/]NAME, values up to 63 characters of a-z A-Z 0-9 - _ ."
                ),
            ));
        }
    }
    if let Some(account) = &settings.service_account
        && !(account.len() <= 253 && account.split('.').all(is_dns_label))
    {
        return Err(bad(
            format!("{base}.service_account"),
            format!(
                "{base}.service_account {account:?} is not a Kubernetes service account name: use a-z 0-9 - and ."
            ),
        ));
    }
    Ok(())
}

fn check_images(base: &str, images: &[String], default: Option<&str>) -> Result<(), Invalid> {
    if images.is_empty() {
        return Err(bad(
            format!("{base}.images"),
            format!(
                "{base}.images is empty: list the images jobs may use, e.g. [\"docker.io/library/ubuntu:24.04\"]"
            ),
        ));
    }
    for (i, pattern) in images.iter().enumerate() {
        check_image_glob(pattern).map_err(|e| bad(format!("{base}.images.{i}"), e))?;
    }
    if let Some(image) = default {
        validate_image(image).map_err(|e| bad(format!("{base}.default_image"), e))?;
        if !testbot_proto::glob::any_match(images, image) {
            return Err(bad(
                format!("{base}.default_image"),
                format!(
                    "{base}.default_image {image} is not in {base}.images {}",
                    super::list(images)
                ),
            ));
        }
    }
    Ok(())
}

fn check_identity(policy: &SitePolicy) -> Result<(), Invalid> {
    let identity = &policy.identity;
    if identity.default_account.is_some() && identity.script.is_some() {
        return Err(bad(
            "identity.script",
            "set either identity.default_account or identity.script, not both: the script decides every job the map does not",
        ));
    }
    if let Some(account) = &identity.default_account {
        validate_account_name(account).map_err(|e| {
            bad(
                "identity.default_account",
                format!("identity.default_account: {e}"),
            )
        })?;
    }
    for (i, entry) in identity.map.iter().enumerate() {
        let base = format!("identity.map.{i}");
        if entry.actor.is_none() && entry.repository.is_none() {
            return Err(bad(
                &base,
                format!("identity.map[{i}] sets neither actor nor repository: set one or both"),
            ));
        }
        if let Some(actor) = &entry.actor
            && (actor.is_empty() || actor.contains(char::is_whitespace))
        {
            return Err(bad(
                format!("{base}.actor"),
                format!("identity.map[{i}].actor {actor:?} is not a GitHub login"),
            ));
        }
        if let Some(repository) = &entry.repository {
            check_repository_glob(repository).map_err(|e| bad(format!("{base}.repository"), e))?;
        }
        if entry.actor_id.is_some() && entry.actor.is_none() {
            return Err(bad(
                format!("{base}.actor_id"),
                format!(
                    "identity.map[{i}].actor_id pins a login, but the entry names no actor: set actor to the login whose id this is"
                ),
            ));
        }
        validate_account_name(&entry.account).map_err(|e| {
            bad(
                format!("{base}.account"),
                format!("identity.map[{i}].account: {e}"),
            )
        })?;
    }
    if let Some(script) = &identity.script {
        if !script.path.is_absolute() {
            return Err(bad(
                "identity.script.path",
                format!(
                    "identity.script.path {:?} must be an absolute path",
                    script.path.display().to_string()
                ),
            ));
        }
        if script.sha256.len() != 64 || !script.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad(
                "identity.script.sha256",
                format!(
                    "identity.script.sha256 must be 64 hex digits (the first word of `sha256sum {}`); got {:?}",
                    script.path.display(),
                    script.sha256
                ),
            ));
        }
        if script.timeout > MAX_SCRIPT_TIMEOUT {
            return Err(bad(
                "identity.script.timeout",
                format!(
                    "identity.script.timeout is at most {}",
                    format_duration(MAX_SCRIPT_TIMEOUT)
                ),
            ));
        }
    }
    Ok(())
}

fn check_rules(policy: &SitePolicy) -> Result<(), Invalid> {
    if policy.rules.is_empty() {
        return Err(bad(
            "rules",
            "no rule is configured, so no job could run: add a [[rules]] table",
        ));
    }
    let mut names = HashSet::new();
    let configured = policy.executors.configured();
    for (i, rule) in policy.rules.iter().enumerate() {
        let base = format!("rules.{i}");
        if rule.name.trim().is_empty() {
            return Err(bad(
                format!("{base}.name"),
                "a rule's name must not be empty",
            ));
        }
        if !names.insert(rule.name.as_str()) {
            return Err(bad(
                format!("{base}.name"),
                format!(
                    "two rules are named {:?}: rule names must be unique",
                    rule.name
                ),
            ));
        }
        let what = format!("rule {:?}", rule.name);
        if rule.repositories.is_empty() {
            return Err(bad(
                &base,
                format!(
                    "{what} has no repositories: list the repositories it allows, e.g. [\"my-org/*\"]"
                ),
            ));
        }
        for (j, pattern) in rule.repositories.iter().enumerate() {
            check_repository_glob(pattern)
                .map_err(|e| bad(format!("{base}.repositories.{j}"), format!("{what}: {e}")))?;
        }
        for (key, ids) in [
            ("repository_ids", &rule.repository_ids),
            ("repository_owner_ids", &rule.repository_owner_ids),
        ] {
            if ids.as_ref().is_some_and(Vec::is_empty) {
                return Err(bad(
                    format!("{base}.{key}"),
                    format!(
                        "{what}: {key} is empty, so no job could match: list GitHub's ids, or leave {key} out"
                    ),
                ));
            }
        }
        let lists = [
            (
                "refs",
                &rule.refs,
                check_ref_glob as fn(&str) -> Result<(), String>,
            ),
            ("workflows", &rule.workflows, check_workflow_glob),
            ("actors", &rule.actors, check_plain_glob),
            ("environments", &rule.environments, check_plain_glob),
        ];
        for (key, list, check) in lists {
            let Some(list) = list else { continue };
            if list.is_empty() {
                return Err(bad(
                    format!("{base}.{key}"),
                    format!(
                        "{what}: {key} is empty, so the rule allows nothing: list what it allows, or leave {key} out to allow any"
                    ),
                ));
            }
            for (j, pattern) in list.iter().enumerate() {
                check(pattern)
                    .map_err(|e| bad(format!("{base}.{key}.{j}"), format!("{what}: {e}")))?;
            }
        }
        if rule.events.is_empty() {
            return Err(bad(
                format!("{base}.events"),
                format!(
                    "{what}: events is empty, so the rule allows nothing: list the events it allows"
                ),
            ));
        }
        for (j, event) in rule.events.iter().enumerate() {
            if !GITHUB_EVENTS.contains(&event.as_str()) {
                let hint = closest(event, GITHUB_EVENTS.iter().copied())
                    .map(|c| format!("; did you mean {c:?}?"))
                    .unwrap_or_else(|| {
                        "; events are GitHub's names, e.g. \"push\", \"schedule\"".into()
                    });
                return Err(bad(
                    format!("{base}.events.{j}"),
                    format!("{what}: {event:?} is not a GitHub Actions event{hint}"),
                ));
            }
        }
        if let Some(executors) = &rule.executors {
            if executors.is_empty() {
                return Err(bad(
                    format!("{base}.executors"),
                    format!(
                        "{what}: executors is empty, so the rule allows nothing: list executors, or leave it out to allow every configured one"
                    ),
                ));
            }
            for (j, executor) in executors.iter().enumerate() {
                if !configured.contains(executor) {
                    return Err(bad(
                        format!("{base}.executors.{j}"),
                        format!(
                            "{what} allows executor {executor}, which is not configured: add [executors.{executor}] or remove it (configured: {})",
                            super::list(&configured)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Characters that look like glob syntax we do not have (`[a-z]`, `{a,b}`, `!x`).
fn check_plain_glob(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("an empty pattern matches nothing".into());
    }
    if pattern.chars().any(|c| c.is_control()) || pattern.trim() != pattern {
        return Err(format!(
            "{pattern:?} has control characters or spaces around it"
        ));
    }
    Ok(())
}

fn check_repository_glob(pattern: &str) -> Result<(), String> {
    let valid_part = |p: &str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c))
    };
    match pattern.split_once('/') {
        Some((owner, name)) if valid_part(owner) && valid_part(name) => Ok(()),
        _ => Err(format!(
            "repository {pattern:?} must be owner/name or owner/* (only * and ? are wildcards)"
        )),
    }
}

fn check_ref_glob(pattern: &str) -> Result<(), String> {
    check_plain_glob(pattern)?;
    if !(pattern.starts_with("refs/") || pattern == "*") {
        return Err(format!(
            "ref {pattern:?} must be a full ref such as \"refs/heads/{pattern}\" or \"refs/tags/{pattern}\""
        ));
    }
    if let Some(c) = pattern.chars().find(|c| "[]{}~^:\\ ".contains(*c)) {
        return Err(format!(
            "ref {pattern:?} contains {c:?}, which git refs cannot hold; only * and ? are wildcards"
        ));
    }
    Ok(())
}

fn check_workflow_glob(pattern: &str) -> Result<(), String> {
    check_plain_glob(pattern)?;
    if !(pattern.contains('@') || pattern.ends_with('*')) {
        return Err(format!(
            "workflow {pattern:?} can never match: a job_workflow_ref is OWNER/REPO/.github/workflows/FILE@REF; add \"@refs/heads/main\" or \"@*\""
        ));
    }
    Ok(())
}

/// Variables no job may set, whatever `env_allow` says: they change how programs start or which
/// engine a client talks to, so a job setting them could take over a program the agent or the
/// scheduler runs with more privilege than the job (`NAME` exactly, or `PREFIX*`), with why.
const DENIED_ENV: &[(&str, &str)] = &[
    ("LD_*", "the dynamic loader reads it"),
    ("GLIBC_TUNABLES", "the C library reads it at start-up"),
    ("GCONV_PATH", "the C library loads code from it"),
    ("PATH", "it decides which programs run"),
    ("BASH_ENV", "bash runs the file it names"),
    ("ENV", "sh runs the file it names"),
    ("SHELLOPTS", "bash reads its options from it"),
    ("BASHOPTS", "bash reads its options from it"),
    ("PS4", "bash runs commands in it when tracing"),
    ("DOCKER_*", "the docker client reads it"),
    ("CONTAINERS_*", "podman reads it"),
    ("CONTAINER_*", "podman reads it"),
    ("KUBECONFIG", "Kubernetes clients read it"),
    ("SBATCH_*", "Slurm reads it as options"),
    ("SLURM_*", "Slurm reads it as options"),
    ("SALLOC_*", "Slurm reads it as options"),
    ("SRUN_*", "Slurm reads it as options"),
    ("SQUEUE_*", "Slurm reads it as options"),
];

/// Why no job may set variable `name` (see [`DENIED_ENV`]); `None` if it may, as far as the
/// denylist goes.
pub(super) fn denied_env(name: &str) -> Option<&'static str> {
    DENIED_ENV.iter().find_map(|(pattern, why)| {
        let hit = match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == *pattern,
        };
        hit.then_some(*why)
    })
}

fn check_env_glob(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_*?".contains(c))
        && !pattern.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err(format!(
            "env_allow: {pattern:?} is not a variable name or glob: use A-Z a-z 0-9 _ and * ?"
        ));
    }
    // A pattern whose every match is denied (`PATH`, `LD_PRELOAD`, `LD_*`, `DOCKER_HOST*`)
    // would never let anything through: say so rather than let the admin believe it does. A
    // wider glob (`*`, `L*`) is fine; it never admits a denied name.
    let literal = &pattern[..pattern.find(['*', '?']).unwrap_or(pattern.len())];
    let whole = literal.len() == pattern.len();
    let denied = DENIED_ENV
        .iter()
        .find(|(denied, _)| match denied.strip_suffix('*') {
            Some(prefix) => literal.starts_with(prefix),
            None => whole && literal == *denied,
        });
    if let Some((denied, why)) = denied {
        return Err(format!(
            "env_allow: {pattern:?} can never be allowed: no job may set {denied} ({why}, so a job could take over a program that runs with more privilege than the job); remove it"
        ));
    }
    Ok(())
}

fn check_image_glob(pattern: &str) -> Result<(), String> {
    let ok = !pattern.is_empty()
        && !pattern.starts_with('-')
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/:@*?".contains(c));
    if !ok {
        return Err(format!(
            "image {pattern:?} is invalid: expected REGISTRY/NAME[:TAG][@sha256:DIGEST], with * and ? as wildcards"
        ));
    }
    // Short names (`ubuntu`) resolve differently per engine and per host configuration, so the
    // allowlist names registries.
    let registry = pattern.split('/').next().unwrap_or("");
    let qualified =
        pattern.contains('/') && (registry.contains(['.', ':', '*']) || registry == "localhost");
    if !qualified && pattern != "*" {
        return Err(format!(
            "image {pattern:?} is not fully qualified: start it with the registry, e.g. \"docker.io/library/{}\"",
            pattern.rsplit('/').next().unwrap_or(pattern)
        ));
    }
    Ok(())
}

/// A Kubernetes label key: an optional DNS-subdomain prefix and `/`, then a name of up to 63
/// alphanumerics, `-`, `_` and `.` that starts and ends alphanumeric.
fn is_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    prefix.is_none_or(|p| p.len() <= 253 && p.split('.').all(is_dns_label))
        && !name.is_empty()
        && is_label_value(name)
}

/// A Kubernetes label value: up to 63 alphanumerics, `-`, `_` and `.`, starting and ending
/// alphanumeric (or empty).
fn is_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && value
            .chars()
            .next()
            .is_none_or(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_none_or(|c| c.is_ascii_alphanumeric())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
