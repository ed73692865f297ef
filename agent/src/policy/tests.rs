use std::collections::BTreeMap;
use std::path::PathBuf;

use testbot_proto::jobs::Resources;

use super::*;
use crate::identity::AccountSource;

/// A policy with one executor of each kind a test needs and two rules.
const BASE: &str = r#"
max_concurrent_jobs = 2
max_runtime = "6h"
env_allow = ["OMP_NUM_THREADS", "MY_*"]

[oidc]
audience = "https://testbot.example.org"

[executors.slurm]
max_cpus = 32
max_memory = "64G"
max_gpus = 0
max_time = "2h"
partitions = ["ci", "debug"]
accounts = ["ci"]

[executors.shell]

[executors.docker]
images = ["docker.io/library/ubuntu:*", "ghcr.io/my-org/*"]

[identity]
default_account = "nobody"

[[identity.map]]
actor = "alice"
account = "daemon"

[[identity.map]]
repository = "my-org/special"
account = "bin"

[[rules]]
name = "main-branch"
repositories = ["my-org/*"]
refs = ["refs/heads/main"]
events = ["push", "workflow_dispatch"]
workflows = ["my-org/*/.github/workflows/ci.yml@*"]
actors = ["alice", "bob"]
executors = ["slurm", "docker"]

[[rules]]
name = "deploy"
repositories = ["deploy-org/site"]
environments = ["Production"]
"#;

fn policy() -> SitePolicy {
    SitePolicy::parse(BASE).unwrap()
}

fn claims() -> WorkflowClaims {
    WorkflowClaims {
        iss: "https://token.actions.githubusercontent.com".into(),
        aud: "https://testbot.example.org".into(),
        sub: "repo:my-org/app:ref:refs/heads/main".into(),
        jti: "j".into(),
        exp: 2,
        iat: 1,
        nbf: None,
        repository: "my-org/app".into(),
        repository_id: "1".into(),
        repository_owner: "my-org".into(),
        repository_owner_id: None,
        repository_visibility: None,
        git_ref: "refs/heads/main".into(),
        ref_type: None,
        ref_protected: None,
        sha: "0".repeat(40),
        event_name: "push".into(),
        actor: "alice".into(),
        actor_id: None,
        workflow: None,
        workflow_ref: None,
        job_workflow_ref: "my-org/app/.github/workflows/ci.yml@refs/heads/main".into(),
        environment: None,
        run_id: "1".into(),
        run_number: None,
        run_attempt: None,
        head_ref: None,
        base_ref: None,
        runner_environment: None,
    }
}

fn job() -> JobSpec {
    JobSpec {
        script: "true".into(),
        ..Default::default()
    }
}

fn denial(claims: &WorkflowClaims, spec: &JobSpec, executor: &str) -> String {
    match policy().evaluate(claims, spec, executor) {
        Decision::Deny { reason } => reason,
        allowed => panic!("expected a denial, got {allowed:?}"),
    }
}

fn parse_error(text: &str) -> String {
    SitePolicy::parse(text).unwrap_err().to_string()
}

/// BASE with `from` replaced by `to` (which must be there once).
fn edited(from: &str, to: &str) -> String {
    assert_eq!(
        BASE.matches(from).count(),
        1,
        "{from:?} must be in BASE once"
    );
    BASE.replace(from, to)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

// ---- Parsing ----

#[test]
fn parses_with_defaults() {
    let policy = SitePolicy::parse(
        "[oidc]\naudience = \"a\"\n[executors.shell]\n[[rules]]\nname = \"r\"\nrepositories = [\"o/*\"]\n",
    )
    .unwrap();
    assert_eq!(policy.max_concurrent_jobs(), 1);
    assert_eq!(policy.max_runtime(), Duration::from_secs(6 * 3600));
    assert!(policy.env_allow().is_empty());
    assert_eq!(
        policy.oidc(),
        OidcSettings {
            issuer: "https://token.actions.githubusercontent.com".into(),
            audience: "a".into()
        }
    );
    assert_eq!(
        policy.rules()[0].events,
        ["push", "schedule", "workflow_dispatch"]
    );
    assert_eq!(policy.rules()[0].refs, None);
}

#[test]
fn memory_and_durations_are_parsed() {
    let policy = policy();
    let slurm = policy.executors().slurm.as_ref().unwrap();
    assert_eq!(slurm.max_memory_mib, Some(65536));
    assert_eq!(slurm.max_time, Some(Duration::from_secs(7200)));
    let docker = policy.executors().docker.as_ref().unwrap();
    assert_eq!(docker.network, settings::ContainerNetwork::None);
    assert_eq!(docker.pull, settings::PullPolicy::IfNotPresent);
    assert!(!docker.read_only_root);
    let mib = SitePolicy::parse(&edited("max_memory = \"64G\"", "max_memory = 4096")).unwrap();
    assert_eq!(
        mib.executors().slurm.as_ref().unwrap().max_memory_mib,
        Some(4096)
    );
}

#[test]
fn unknown_keys_are_placed_and_get_a_suggestion() {
    let text = edited("max_cpus = 32", "max_cpu = 32");
    let err = parse_error(&text);
    let line = line_of(&text, "max_cpu =");
    assert!(
        err.starts_with(&format!(
            "{line}:1: unknown field `max_cpu`, expected one of `max_cpus`"
        )),
        "{err}"
    );
    assert!(err.ends_with("; did you mean `max_cpus`?"), "{err}");

    let text = edited("[executors.shell]", "[executors.shel]");
    let err = parse_error(&text);
    assert!(
        err.starts_with(&format!("{}:", line_of(&text, "shel]"))),
        "{err}"
    );
    assert!(err.contains("unknown field `shel`"), "{err}");
    assert!(err.ends_with("did you mean `shell`?"), "{err}");

    let text = edited(
        "executors = [\"slurm\", \"docker\"]",
        "executors = [\"slrum\"]",
    );
    let err = parse_error(&text);
    assert!(err.contains("unknown variant `slrum`"), "{err}");
    assert!(err.ends_with("did you mean `slurm`?"), "{err}");

    let err = parse_error(&edited("max_runtime =", "max_runtim ="));
    assert!(err.ends_with("did you mean `max_runtime`?"), "{err}");
    let err = parse_error(&edited("[oidc]\n", "[oidc]\naudiance = \"x\"\n"));
    assert!(err.ends_with("did you mean `audience`?"), "{err}");
}

#[test]
fn bad_values_are_placed_at_the_value() {
    let text = edited("max_memory = \"64G\"", "max_memory = \"64X\"");
    let err = parse_error(&text);
    assert_eq!(
        err,
        format!(
            "{}:14: \"64X\" is not a memory size; write e.g. \"512M\", \"64G\" or \"1T\" (powers of 1024)",
            line_of(&text, "64X")
        )
    );
    let err = parse_error(&edited("max_time = \"2h\"", "max_time = \"soon\""));
    assert!(err.contains("\"soon\" is not a duration"), "{err}");
    let err = parse_error(&edited("max_cpus = 32", "max_cpus = -1"));
    assert!(err.contains("invalid value"), "{err}");
    let err = parse_error(&edited(
        "[executors.docker]\n",
        "[executors.docker]\npull = \"sometimes\"\n",
    ));
    assert!(err.contains("unknown variant `sometimes`"), "{err}");
}

#[test]
fn oidc_needs_an_audience() {
    let err = parse_error(&edited("audience = \"https://testbot.example.org\"", ""));
    assert!(err.contains("missing field `audience`"), "{err}");
    let text = edited(
        "audience = \"https://testbot.example.org\"",
        "audience = \"\"",
    );
    let err = parse_error(&text);
    assert_eq!(
        err,
        format!(
            "{}:12: oidc.audience is empty: set it to the broker's audience (its URL)",
            line_of(&text, "audience =")
        )
    );
    let err = parse_error(&edited("[oidc]\n", "[oidc]\nissuer = \"http://x\"\n"));
    assert!(err.contains("must be an https:// URL"), "{err}");
    let err =
        parse_error(&BASE.replace("[oidc]\naudience = \"https://testbot.example.org\"\n", ""));
    assert!(err.contains("missing field `oidc`"), "{err}");
}

#[test]
fn rules_must_name_configured_executors() {
    let text = edited(
        "executors = [\"slurm\", \"docker\"]",
        "executors = [\"slurm\", \"kubernetes\"]",
    );
    let err = parse_error(&text);
    assert_eq!(
        err,
        format!(
            "{}:23: rule \"main-branch\" allows executor kubernetes, which is not configured: add [executors.kubernetes] or remove it (configured: [shell, slurm, docker])",
            line_of(&text, "\"kubernetes\"]")
        )
    );
}

#[test]
fn semantic_errors_name_the_fix() {
    let cases = [
        (
            edited("refs = [\"refs/heads/main\"]", "refs = [\"main\"]"),
            "rule \"main-branch\": ref \"main\" must be a full ref such as \"refs/heads/main\"",
        ),
        (
            edited("refs = [\"refs/heads/main\"]", "refs = []"),
            "rule \"main-branch\": refs is empty, so the rule allows nothing",
        ),
        (
            edited(
                "repositories = [\"my-org/*\"]",
                "repositories = [\"my-org\"]",
            ),
            "repository \"my-org\" must be owner/name or owner/*",
        ),
        (
            edited(
                "events = [\"push\", \"workflow_dispatch\"]",
                "events = [\"pus\"]",
            ),
            "rule \"main-branch\": \"pus\" is not a GitHub Actions event; did you mean \"push\"?",
        ),
        (
            edited(
                "workflows = [\"my-org/*/.github/workflows/ci.yml@*\"]",
                "workflows = [\"my-org/app/.github/workflows/ci.yml\"]",
            ),
            "can never match",
        ),
        (
            edited("\"ghcr.io/my-org/*\"", "\"ubuntu:*\""),
            "image \"ubuntu:*\" is not fully qualified",
        ),
        (
            edited(
                "images = [",
                "default_image = \"docker.io/library/debian:12\"\nimages = [",
            ),
            "executors.docker.default_image docker.io/library/debian:12 is not in executors.docker.images",
        ),
        (
            edited(
                "partitions = [\"ci\", \"debug\"]",
                "partitions = [\"ci debug\"]",
            ),
            "executors.slurm.partitions \"ci debug\" is invalid",
        ),
        (
            edited("max_time = \"2h\"", "max_time = \"12h\""),
            "executors.slurm.max_time 12h is over the site's max_runtime of 6h",
        ),
        (
            edited("default_account = \"nobody\"", "default_account = \"root\""),
            "identity.default_account: account root is never allowed",
        ),
        (
            edited("[[identity.map]]\nactor = \"alice\"", "[[identity.map]]"),
            "identity.map[0] sets neither actor nor repository",
        ),
        (
            edited(
                "default_account = \"nobody\"",
                "default_account = \"nobody\"\n[identity.script]\npath = \"/x\"\nsha256 = \"00\"\n",
            ),
            "set either identity.default_account or identity.script, not both",
        ),
        (
            edited(
                "default_account = \"nobody\"",
                "[identity.script]\npath = \"/x\"\nsha256 = \"abc\"\n",
            ),
            "identity.script.sha256 must be 64 hex digits",
        ),
        (
            edited(
                "default_account = \"nobody\"",
                &format!(
                    "[identity.script]\npath = \"x.sh\"\nsha256 = \"{}\"\n",
                    "a".repeat(64)
                ),
            ),
            "identity.script.path \"x.sh\" must be an absolute path",
        ),
        (
            edited("name = \"deploy\"", "name = \"main-branch\""),
            "two rules are named \"main-branch\"",
        ),
        (
            edited(
                "env_allow = [\"OMP_NUM_THREADS\", \"MY_*\"]",
                "env_allow = [\"MY-VAR\"]",
            ),
            "env_allow: \"MY-VAR\" is not a variable name or glob",
        ),
        (
            edited("max_concurrent_jobs = 2", "max_concurrent_jobs = 0"),
            "max_concurrent_jobs must be between 1 and 1024",
        ),
    ];
    for (text, want) in cases {
        let err = parse_error(&text);
        assert!(err.contains(want), "want {want:?} in {err:?}");
        assert!(
            err.split(':').next().unwrap().parse::<usize>().is_ok(),
            "{err:?} should start with LINE:COL"
        );
    }
    let err = parse_error("[oidc]\naudience = \"a\"\n[executors.shell]\n");
    assert!(err.contains("no rule is configured"), "{err}");
    let err = parse_error(
        "[oidc]\naudience = \"a\"\n[[rules]]\nname = \"r\"\nrepositories = [\"o/r\"]\n",
    );
    assert!(err.contains("no executor is configured"), "{err}");
}

#[test]
fn kubernetes_and_container_settings_are_validated() {
    let base = "[oidc]\naudience = \"a\"\n[[rules]]\nname = \"r\"\nrepositories = [\"o/r\"]\n";
    let ok = format!(
        "{base}[executors.kubernetes]\nnamespace = \"ci-jobs\"\nservice_account = \"runner\"\nimages = [\"ghcr.io/o/*\"]\ndefault_image = \"ghcr.io/o/base:1\"\n"
    );
    let policy = SitePolicy::parse(&ok).unwrap();
    let k8s = policy.executors().kubernetes.as_ref().unwrap();
    assert_eq!(k8s.namespace, "ci-jobs");
    assert_eq!(k8s.gpu_resource, "nvidia.com/gpu");
    assert_eq!(k8s.max_pending, std::time::Duration::from_secs(300));
    assert!(!k8s.automount_service_account_token);
    let err = parse_error(&ok.replace("ci-jobs", "CI_Jobs"));
    assert!(err.contains("is not a Kubernetes namespace name"), "{err}");
    let tuned = format!(
        "{ok}pull = \"never\"\nmax_pending = \"20s\"\nnode_selector = {{ \"testbot.io/pool\" = \"ci\" }}\ngpu_resource = \"amd.com/gpu\"\n"
    );
    let policy = SitePolicy::parse(&tuned).unwrap();
    let k8s = policy.executors().kubernetes.as_ref().unwrap();
    assert_eq!(k8s.max_pending, std::time::Duration::from_secs(20));
    assert_eq!(k8s.node_selector["testbot.io/pool"], "ci");
    let err = parse_error(&tuned.replace("\"ci\" }", "\"c i\" }"));
    assert!(err.contains("is not a Kubernetes label"), "{err}");
    let err = parse_error(&tuned.replace("amd.com/gpu", "gpu"));
    assert!(err.contains("is not an extended resource name"), "{err}");
    let err = parse_error(&format!("{base}[executors.podman]\n"));
    assert!(err.contains("executors.podman.images is empty"), "{err}");
    let err = parse_error(&format!(
        "{base}[executors.podman]\nimages = [\"docker.io/x/y\"]\nnetwork = \"host\"\n"
    ));
    assert!(
        err.contains("unknown variant `host`, expected `none` or `bridge`"),
        "{err}"
    );
}

// ---- Decisions ----

#[test]
fn allows_a_matching_job_and_picks_its_account() {
    let decision = policy().evaluate(&claims(), &job(), "slurm");
    assert_eq!(
        decision,
        Decision::Allow {
            rule: "main-branch".into(),
            account: AccountChoice::Named {
                name: "daemon".into(),
                source: AccountSource::Map { index: 0 }
            }
        }
    );
    let mut c = claims();
    c.actor = "bob".into();
    c.repository = "my-org/special".into();
    c.job_workflow_ref = "my-org/special/.github/workflows/ci.yml@refs/heads/main".into();
    let Decision::Allow { account, .. } = policy().evaluate(&c, &job(), "slurm") else {
        panic!()
    };
    assert_eq!(
        account,
        AccountChoice::Named {
            name: "bin".into(),
            source: AccountSource::Map { index: 1 }
        }
    );
    c.repository = "my-org/other".into();
    c.job_workflow_ref = "my-org/other/.github/workflows/ci.yml@refs/heads/main".into();
    let Decision::Allow { account, .. } = policy().evaluate(&c, &job(), "slurm") else {
        panic!()
    };
    assert_eq!(
        account.to_string(),
        "account nobody (identity.default_account)"
    );
}

#[test]
fn denies_what_no_rule_allows() {
    let mut c = claims();
    c.git_ref = "refs/heads/x".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "ref refs/heads/x is not in allowed refs [refs/heads/main] (rule \"main-branch\")"
    );

    let mut c = claims();
    c.event_name = "pull_request".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "event pull_request is not in allowed events [push, workflow_dispatch] (rule \"main-branch\")"
    );

    let mut c = claims();
    c.actor = "mallory".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "actor mallory is not in allowed actors [alice, bob] (rule \"main-branch\")"
    );

    let mut c = claims();
    c.job_workflow_ref = "my-org/app/.github/workflows/evil.yml@refs/heads/main".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "workflow my-org/app/.github/workflows/evil.yml@refs/heads/main is not in allowed workflows [my-org/*/.github/workflows/ci.yml@*] (rule \"main-branch\")"
    );

    let mut c = claims();
    c.repository = "a/b".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "repository a/b is not allowed by any rule"
    );

    assert_eq!(
        denial(&claims(), &job(), "shell"),
        "executor shell is not in allowed executors [slurm, docker] (rule \"main-branch\")"
    );
}

#[test]
fn pull_request_target_is_denied_unless_named() {
    let mut c = claims();
    c.event_name = "pull_request_target".into();
    assert_eq!(
        denial(&c, &job(), "slurm"),
        "event pull_request_target is not allowed: name it in a rule's events to allow it (rule \"main-branch\")"
    );
    let named = SitePolicy::parse(&edited(
        "events = [\"push\", \"workflow_dispatch\"]",
        "events = [\"pull_request_target\"]",
    ))
    .unwrap();
    assert!(named.evaluate(&c, &job(), "slurm").is_allowed());
}

#[test]
fn environments_are_matched_case_insensitively_and_required() {
    let mut c = claims();
    c.repository = "deploy-org/site".into();
    assert_eq!(
        denial(&c, &job(), "shell"),
        "the job has no GitHub environment; allowed environments are [Production] (rule \"deploy\")"
    );
    c.environment = Some("staging".into());
    assert_eq!(
        denial(&c, &job(), "shell"),
        "environment staging is not in allowed environments [Production] (rule \"deploy\")"
    );
    c.environment = Some("production".into());
    let decision = policy().evaluate(&c, &job(), "shell");
    assert!(decision.is_allowed(), "{decision:?}");
}

#[test]
fn several_rules_for_a_repository_all_give_their_reason() {
    let policy = SitePolicy::parse(&edited(
        "repositories = [\"deploy-org/site\"]",
        "repositories = [\"my-org/*\"]",
    ))
    .unwrap();
    let mut c = claims();
    c.git_ref = "refs/heads/x".into();
    let Decision::Deny { reason } = policy.evaluate(&c, &job(), "slurm") else {
        panic!()
    };
    assert_eq!(
        reason,
        "no rule allows this job: ref refs/heads/x is not in allowed refs [refs/heads/main] (rule \"main-branch\"); the job has no GitHub environment; allowed environments are [Production] (rule \"deploy\")"
    );
}

#[test]
fn job_requests_are_capped_per_executor() {
    let with = |f: fn(&mut JobSpec)| {
        let mut spec = job();
        f(&mut spec);
        denial(&claims(), &spec, "slurm")
    };
    assert_eq!(
        with(|s| s.resources.cpus = Some(64)),
        "resources.cpus 64 is over the cap of 32 for executor slurm"
    );
    assert_eq!(
        with(|s| s.resources.memory_mib = Some(131072)),
        "resources.memory_mib 131072 (128G) is over the cap of 64G for executor slurm"
    );
    assert_eq!(
        with(|s| s.resources.gpus = Some(1)),
        "resources.gpus 1 is over the cap of 0 for executor slurm"
    );
    assert_eq!(
        with(|s| s.timeout_secs = Some(3 * 3600)),
        "timeout_secs 10800 (3h) is over the cap of 2h for executor slurm"
    );
    assert_eq!(
        with(|s| s.resources.partition = Some("gpu".into())),
        "resources.partition gpu is not in allowed partitions [ci, debug] for executor slurm"
    );
    assert_eq!(
        with(|s| s.resources.account = Some("physics".into())),
        "resources.account physics is not in allowed accounts [ci] for executor slurm"
    );
    assert_eq!(
        with(|s| s.env = BTreeMap::from([("SECRET".into(), "x".into())])),
        "environment variable SECRET is not in the site's env_allow [OMP_NUM_THREADS, MY_*]"
    );
    assert_eq!(
        with(|s| s.image = Some("docker.io/library/ubuntu:24.04".into())),
        "image docker.io/library/ubuntu:24.04 was asked for, but executor slurm does not run container images"
    );
    assert_eq!(
        with(|s| s.executor = Some("kubernetes".into())),
        "executor kubernetes is not in allowed executors [slurm, docker] (rule \"main-branch\")"
    );

    let within = JobSpec {
        resources: Resources {
            cpus: Some(32),
            memory_mib: Some(65536),
            partition: Some("debug".into()),
            ..Default::default()
        },
        timeout_secs: Some(7200),
        env: BTreeMap::from([
            ("OMP_NUM_THREADS".into(), "4".into()),
            ("MY_FLAG".into(), "1".into()),
        ]),
        ..job()
    };
    assert!(policy().evaluate(&claims(), &within, "slurm").is_allowed());
}

#[test]
fn the_site_runtime_caps_executors_without_max_time() {
    let mut c = claims();
    c.repository = "deploy-org/site".into();
    c.environment = Some("Production".into());
    let spec = JobSpec {
        timeout_secs: Some(7 * 3600),
        ..job()
    };
    assert_eq!(
        denial(&c, &spec, "shell"),
        "timeout_secs 25200 (7h) is over the site's max_runtime of 6h"
    );
    let policy = policy();
    assert_eq!(
        policy.time_limit(&job(), "shell"),
        Duration::from_secs(6 * 3600)
    );
    assert_eq!(
        policy.time_limit(&job(), "slurm"),
        Duration::from_secs(2 * 3600)
    );
    let short = JobSpec {
        timeout_secs: Some(60),
        ..job()
    };
    assert_eq!(policy.time_limit(&short, "slurm"), Duration::from_secs(60));
}

#[test]
fn images_must_be_allowed() {
    let docker = |image: Option<&str>| JobSpec {
        executor: Some("docker".into()),
        image: image.map(Into::into),
        ..job()
    };
    assert_eq!(
        denial(&claims(), &docker(Some("docker.io/evil:latest")), "slurm"),
        "image docker.io/evil:latest is not in allowed images [docker.io/library/ubuntu:*, ghcr.io/my-org/*] for executor docker"
    );
    assert_eq!(
        denial(&claims(), &docker(None), "slurm"),
        "executor docker runs container images: the job must name one of [docker.io/library/ubuntu:*, ghcr.io/my-org/*]"
    );
    let allowed = policy().evaluate(&claims(), &docker(Some("ghcr.io/my-org/ci:1")), "slurm");
    assert!(allowed.is_allowed(), "{allowed:?}");
}

#[test]
fn unconfigured_executors_and_unmapped_accounts_are_denied() {
    let mut c = claims();
    c.repository = "deploy-org/site".into();
    c.environment = Some("Production".into());
    assert_eq!(
        denial(&c, &job(), "podman"),
        "executor podman is not configured at this site (configured: [shell, slurm, docker])"
    );
    c.actor = "carol".into();
    let no_default = SitePolicy::parse(&edited("default_account = \"nobody\"", "")).unwrap();
    let Decision::Deny { reason } = no_default.evaluate(&c, &job(), "shell") else {
        panic!()
    };
    assert!(
        reason.starts_with(
            "no local account is mapped for actor carol of repository deploy-org/site"
        ),
        "{reason}"
    );
}

#[test]
fn explanations_list_every_rule() {
    let mut c = claims();
    c.git_ref = "refs/heads/x".into();
    let text = policy().explain(&c, &job(), "slurm").to_string();
    assert_eq!(
        text,
        "rule \"main-branch\": denied: ref refs/heads/x is not in allowed refs [refs/heads/main]\n\
         rule \"deploy\": denied: repository my-org/app is not in allowed repositories [deploy-org/site]\n\
         denied: ref refs/heads/x is not in allowed refs [refs/heads/main] (rule \"main-branch\")"
    );
    let text = policy().explain(&claims(), &job(), "slurm").to_string();
    assert!(
        text.ends_with(
            "allowed by rule \"main-branch\" on executor slurm; runs as account daemon (identity.map[0])"
        ),
        "{text}"
    );
}

#[test]
fn summary_lists_what_the_rules_allow() {
    let summary = policy().summary();
    assert_eq!(summary.repositories, ["my-org/*", "deploy-org/site"]);
    let names: Vec<&str> = summary
        .executors
        .iter()
        .map(|e| e.executor.as_str())
        .collect();
    assert_eq!(names, ["shell", "slurm", "docker"]);
    let slurm = &summary.executors[1];
    assert_eq!(slurm.max_cpus, Some(32));
    assert_eq!(slurm.max_memory_mib, Some(65536));
    assert_eq!(slurm.max_gpus, Some(0));
    assert_eq!(slurm.max_time_secs, Some(7200));
    assert_eq!(slurm.partitions, ["ci", "debug"]);
    assert_eq!(summary.executors[0].max_time_secs, Some(6 * 3600));
    assert_eq!(summary.executors[2].images.len(), 2);
}

/// The broker routes on the summary, so it must decide as the policy does on every claim the
/// rules match (what it cannot see, the identity mapping, the agent refuses by handing back).
#[test]
fn the_summary_routes_as_the_policy_decides() {
    let policy = policy();
    let summary = policy.summary();
    assert_eq!(summary.rules.len(), 2);
    assert_eq!(summary.max_concurrent_jobs, Some(2));
    let mut cases: Vec<(WorkflowClaims, JobSpec, &str)> = Vec::new();
    for git_ref in ["refs/heads/main", "refs/heads/feature"] {
        for event in ["push", "pull_request", "workflow_dispatch"] {
            for actor in ["alice", "mallory"] {
                for executor in ["slurm", "shell", "docker"] {
                    let mut c = claims();
                    c.git_ref = git_ref.into();
                    c.event_name = event.into();
                    c.actor = actor.into();
                    cases.push((c, job(), executor));
                }
            }
        }
    }
    let mut deploy = claims();
    deploy.repository = "deploy-org/site".into();
    deploy.job_workflow_ref = "deploy-org/site/.github/workflows/ci.yml@refs/heads/main".into();
    for environment in [None, Some("production"), Some("staging")] {
        let mut c = deploy.clone();
        c.environment = environment.map(str::to_string);
        cases.push((c, job(), "shell"));
    }
    let mut env_job = job();
    env_job.env.insert("SECRET".into(), "x".into());
    cases.push((claims(), env_job, "slurm"));
    let mut workflow = claims();
    workflow.job_workflow_ref = "my-org/app/.github/workflows/evil.yml@refs/heads/main".into();
    cases.push((workflow, job(), "slurm"));
    for image in ["docker.io/library/ubuntu:24.04", "docker.io/library/evil:1"] {
        let mut spec = job();
        spec.image = Some(image.into());
        cases.push((claims(), spec.clone(), "docker"));
        cases.push((claims(), spec, "slurm"));
    }
    for resources in [
        Resources {
            cpus: Some(64),
            ..Resources::default()
        },
        Resources {
            account: Some("other".into()),
            ..Resources::default()
        },
        Resources {
            partition: Some("debug".into()),
            account: Some("ci".into()),
            ..Resources::default()
        },
    ] {
        let mut spec = job();
        spec.resources = resources;
        cases.push((claims(), spec, "slurm"));
    }
    for (claims, spec, executor) in cases {
        let identity = testbot_proto::agents::JobIdentity::from(&claims);
        let routed = summary.admits(Some(&identity), &spec, Some(executor));
        let decided = policy.evaluate(&claims, &spec, executor);
        assert_eq!(
            routed.is_ok(),
            decided.is_allowed(),
            "{claims:?} on {executor}: summary says {routed:?}, policy {decided:?}"
        );
    }
}

#[test]
fn claims_and_jobs_read_from_json() {
    let fixture = include_str!("../../../tests/fixtures/oidc/real-token-rgl.decoded.json");
    let claims = claims_from_json(fixture).unwrap();
    assert_eq!(claims.repository, "rgl/github-actions-validate-jwt");
    let bare: serde_json::Value = serde_json::from_str(fixture).unwrap();
    let bare = claims_from_json(&bare["payload"].to_string()).unwrap();
    assert_eq!(bare, claims);
    assert!(
        claims_from_json("{}")
            .unwrap_err()
            .contains("missing field")
    );

    let spec = job_from_json(r#"{"executor": "slurm", "resources": {"cpus": 4}}"#).unwrap();
    assert_eq!(spec.resources.cpus, Some(4));
    assert!(
        job_from_json(r#"{"resources": {"cpu": 4}}"#)
            .unwrap_err()
            .contains("unknown field")
    );
    assert!(
        job_from_json(r#"{"env": {"TESTBOT_X": "1"}}"#)
            .unwrap_err()
            .contains("reserved")
    );
}

// ---- Example files ----

/// Every site policy shipped in `site-configs/` parses, and says what its comments say.
#[test]
fn shipped_site_configs_parse_and_decide_as_documented() {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../site-configs"));
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let policy = SitePolicy::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match name.as_str() {
            "hpc-slurm.toml" => check_hpc_slurm(&policy),
            "cloud-vm-containers.toml" => check_cloud_vm(&policy),
            "kubernetes.toml" => check_kubernetes_example(&policy),
            // A new example is parsed above; give it decisions here too.
            other => panic!("{other}: add its expected decisions to this test"),
        }
        checked.push(name);
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            "cloud-vm-containers.toml",
            "hpc-slurm.toml",
            "kubernetes.toml"
        ]
    );
}

fn example_claims(repository: &str, git_ref: &str, event: &str, actor: &str) -> WorkflowClaims {
    WorkflowClaims {
        repository: repository.into(),
        repository_owner: repository.split('/').next().unwrap().into(),
        git_ref: git_ref.into(),
        event_name: event.into(),
        actor: actor.into(),
        job_workflow_ref: format!("{repository}/.github/workflows/ci.yml@{git_ref}"),
        // The ids site-configs/hpc-slurm.toml pins.
        repository_owner_id: Some("41001".into()),
        actor_id: Some(if actor == "alice" { "41002" } else { "9" }.into()),
        ..claims()
    }
}

fn check_hpc_slurm(policy: &SitePolicy) {
    let main = example_claims("climate-lab/model", "refs/heads/main", "push", "alice");
    let spec = JobSpec {
        resources: Resources {
            cpus: Some(16),
            partition: Some("ci".into()),
            ..Default::default()
        },
        ..job()
    };
    let decision = policy.evaluate(&main, &spec, "slurm");
    assert!(decision.is_allowed(), "{decision:?}");
    let tag = example_claims("climate-lab/model", "refs/tags/v1.2.0", "push", "carol");
    assert!(policy.evaluate(&tag, &job(), "slurm").is_allowed());
    // The lab's name under another owner, and alice's login under another user: refused.
    let mut taken = main.clone();
    taken.repository_owner_id = Some("666".into());
    assert!(!policy.evaluate(&taken, &spec, "slurm").is_allowed());
    let mut impostor = main.clone();
    impostor.actor_id = Some("666".into());
    assert!(!policy.evaluate(&impostor, &spec, "slurm").is_allowed());
    let branch = example_claims("climate-lab/model", "refs/heads/feature", "push", "alice");
    assert!(!policy.evaluate(&branch, &job(), "slurm").is_allowed());
    let prt = example_claims(
        "climate-lab/model",
        "refs/heads/main",
        "pull_request_target",
        "alice",
    );
    assert!(!policy.evaluate(&prt, &job(), "slurm").is_allowed());
    let big = JobSpec {
        resources: Resources {
            cpus: Some(1000),
            ..Default::default()
        },
        ..job()
    };
    assert!(!policy.evaluate(&main, &big, "slurm").is_allowed());
}

fn check_cloud_vm(policy: &SitePolicy) {
    let claims = example_claims("rust-hpc/solver", "refs/heads/main", "push", "dana");
    let pinned = policy
        .executors()
        .podman
        .as_ref()
        .unwrap()
        .images
        .iter()
        .find(|i| i.contains("@sha256:"))
        .expect("a digest-pinned image")
        .clone();
    let spec = JobSpec {
        executor: Some("podman".into()),
        image: Some(pinned),
        ..job()
    };
    let decision = policy.evaluate(&claims, &spec, "podman");
    assert!(decision.is_allowed(), "{decision:?}");
    let evil = JobSpec {
        image: Some("docker.io/evil/miner:latest".into()),
        ..spec
    };
    assert!(!policy.evaluate(&claims, &evil, "podman").is_allowed());
    let pr = example_claims(
        "rust-hpc/solver",
        "refs/pull/7/merge",
        "pull_request",
        "dana",
    );
    assert!(policy.evaluate(&pr, &job(), "docker").is_allowed());
}

fn check_kubernetes_example(policy: &SitePolicy) {
    let claims = example_claims("data-org/pipeline", "refs/heads/main", "schedule", "eve");
    let decision = policy.evaluate(&claims, &job(), "kubernetes");
    assert!(decision.is_allowed(), "{decision:?}");
    let k8s = policy.executors().kubernetes.as_ref().unwrap();
    assert!(!k8s.namespace.is_empty());
    let other = example_claims("someone/else", "refs/heads/main", "push", "eve");
    assert!(!policy.evaluate(&other, &job(), "kubernetes").is_allowed());
}

#[test]
fn env_allow_never_admits_variables_that_change_how_programs_start() {
    // A literal denied name, or a glob all of whose matches are denied, is a validation error
    // that names it.
    for (pattern, denied) in [
        ("PATH", "PATH"),
        ("LD_PRELOAD", "LD_*"),
        ("LD_LIBRARY_PATH", "LD_*"),
        ("LD_*", "LD_*"),
        ("BASH_ENV", "BASH_ENV"),
        ("ENV", "ENV"),
        ("DOCKER_HOST", "DOCKER_*"),
        ("DOCKER_*", "DOCKER_*"),
        ("CONTAINERS_CONF", "CONTAINERS_*"),
        ("KUBECONFIG", "KUBECONFIG"),
        ("SLURM_CONF", "SLURM_*"),
        ("SBATCH_*", "SBATCH_*"),
        ("GLIBC_TUNABLES", "GLIBC_TUNABLES"),
    ] {
        let err = parse_error(&edited(
            "env_allow = [\"OMP_NUM_THREADS\", \"MY_*\"]",
            &format!("env_allow = [\"OMP_NUM_THREADS\", \"{pattern}\"]"),
        ));
        assert!(
            err.contains(&format!(
                "env_allow: {pattern:?} can never be allowed: no job may set {denied}"
            )),
            "{pattern}: {err}"
        );
        assert!(err.starts_with("4:"), "placed at the line: {err}");
    }

    // Wide globs are valid, but never let a denied name through; what else they match passes.
    let wide = SitePolicy::parse(&edited(
        "env_allow = [\"OMP_NUM_THREADS\", \"MY_*\"]",
        "env_allow = [\"*\", \"L*\", \"P?TH\", \"ENV*\"]",
    ))
    .unwrap();
    let with_env = |name: &str| JobSpec {
        env: BTreeMap::from([(name.to_string(), "x".to_string())]),
        ..job()
    };
    for name in [
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "BASH_ENV",
        "ENV",
        "DOCKER_HOST",
        "DOCKER_CONFIG",
        "CONTAINERS_CONF",
        "CONTAINER_HOST",
        "KUBECONFIG",
        "SLURM_CONF",
        "SBATCH_EXPORT",
    ] {
        match wide.evaluate(&claims(), &with_env(name), "slurm") {
            Decision::Deny { reason } => assert!(
                reason.starts_with(&format!(
                    "environment variable {name} is never allowed at this site"
                )),
                "{name}: {reason}"
            ),
            allowed => panic!("{name} was let through by a glob: {allowed:?}"),
        }
    }
    for name in ["LANG", "OMP_NUM_THREADS", "ENVIRONMENT", "LDFLAGS"] {
        assert!(
            wide.evaluate(&claims(), &with_env(name), "slurm")
                .is_allowed(),
            "{name}"
        );
    }
}

#[test]
fn defaults_must_fit_their_caps() {
    let slurm = "[executors.slurm]\nmax_cpus = 32\nmax_memory = \"64G\"";
    for (to, want) in [
        (
            "[executors.slurm]\nmax_cpus = 32\ndefault_cpus = 64\nmax_memory = \"64G\"",
            "executors.slurm.default_cpus 64 is over max_cpus 32",
        ),
        (
            "[executors.slurm]\nmax_cpus = 32\nmax_memory = \"64G\"\ndefault_memory = \"128G\"",
            "executors.slurm.default_memory 128G is over max_memory 64G",
        ),
        (
            "[executors.slurm]\nmax_cpus = 32\ndefault_cpus = 0\nmax_memory = \"64G\"",
            "a default of 0 would give jobs nothing",
        ),
    ] {
        let err = parse_error(&edited(slurm, to));
        assert!(err.contains(want), "want {want:?} in {err:?}");
    }
    let policy = SitePolicy::parse(&edited(
        slurm,
        "[executors.slurm]\nmax_cpus = 32\ndefault_cpus = 2\nmax_memory = \"64G\"",
    ))
    .unwrap();
    let r = policy.resources(&job(), "slurm");
    assert_eq!((r.cpus, r.memory_mib), (Some(2), Some(65536)));
    // Executors without caps leave a job as it asked.
    let r = policy.resources(&job(), "shell");
    assert_eq!((r.cpus, r.memory_mib), (None, None));
}

// ---- Pinning names to GitHub's ids ----

/// BASE with the main-branch rule pinned to owner id 100 and repository ids 7 and 8, and alice
/// pinned to actor id 42.
fn pinned() -> SitePolicy {
    let text = edited(
        "repositories = [\"my-org/*\"]\n",
        "repositories = [\"my-org/*\"]\nrepository_owner_ids = [100]\nrepository_ids = [7, 8]\n",
    )
    .replace("actor = \"alice\"\n", "actor = \"alice\"\nactor_id = 42\n");
    SitePolicy::parse(&text).unwrap()
}

/// Claims of my-org/app (id 7, owner id 100) run by alice (id 42): what the pins expect.
fn pinned_claims() -> WorkflowClaims {
    let mut c = claims();
    c.repository_id = "7".into();
    c.repository_owner_id = Some("100".into());
    c.actor_id = Some("42".into());
    c
}

#[test]
fn a_repository_name_with_another_owner_id_is_denied_once_pinned() {
    let policy = pinned();
    assert!(
        policy
            .evaluate(&pinned_claims(), &job(), "slurm")
            .is_allowed()
    );
    // The same name, now held by another account (the old owner renamed or deleted itself).
    let mut c = pinned_claims();
    c.repository_owner_id = Some("666".into());
    assert_eq!(
        policy.evaluate(&c, &job(), "slurm"),
        Decision::Deny {
            reason: "owner my-org of repository my-org/app has id 666, not one of the pinned repository_owner_ids [100]: the name may have passed to another account (rule \"main-branch\")".into()
        }
    );
    c.repository_owner_id = None;
    let Decision::Deny { reason } = policy.evaluate(&c, &job(), "slurm") else {
        panic!("a token without the owner's id passed the pin")
    };
    assert!(
        reason.contains("has id none (the token carries no repository_owner_id)"),
        "{reason}"
    );
    // A repository deleted and created again under its name has a new id.
    let mut c = pinned_claims();
    c.repository_id = "9".into();
    let Decision::Deny { reason } = policy.evaluate(&c, &job(), "slurm") else {
        panic!("a new repository under a pinned name passed")
    };
    assert!(
        reason.starts_with(
            "repository my-org/app has id 9, not one of the pinned repository_ids [7, 8]"
        ),
        "{reason}"
    );
    // Without pins, names alone decide, as before.
    assert!(self::policy().evaluate(&c, &job(), "slurm").is_allowed());
}

#[tokio::test]
async fn a_mapped_login_with_another_actor_id_is_refused() {
    let policy = pinned();
    let Decision::Allow { account, .. } = policy.evaluate(&pinned_claims(), &job(), "slurm") else {
        panic!("alice with her own id is allowed")
    };
    assert_eq!(account.to_string(), "account daemon (identity.map[0])");
    // Someone else under alice's login: refused, not mapped to alice's account nor to the
    // default one.
    let mut c = pinned_claims();
    c.actor_id = Some("4242".into());
    let want = "actor alice has id 4242, but identity.map[0] pins that login to id 42: the login may have passed to someone else, so the job is not mapped to account daemon";
    assert_eq!(
        policy.evaluate(&c, &job(), "slurm"),
        Decision::Deny {
            reason: want.into()
        }
    );
    assert_eq!(policy.resolve_account(&c).await.unwrap_err(), want);
    c.actor_id = None;
    assert!(!policy.evaluate(&c, &job(), "slurm").is_allowed());
}

#[test]
fn pins_are_parsed_strictly_and_placed() {
    let text = edited(
        "repositories = [\"my-org/*\"]\n",
        "repositories = [\"my-org/*\"]\nrepository_owner_ids = []\n",
    );
    let err = parse_error(&text);
    assert_eq!(
        err,
        format!(
            "{}:24: rule \"main-branch\": repository_owner_ids is empty, so no job could match: list GitHub's ids, or leave repository_owner_ids out",
            line_of(&text, "repository_owner_ids")
        )
    );
    let text = edited(
        "repositories = [\"my-org/*\"]\n",
        "repositories = [\"my-org/*\"]\nrepository_ids = [\"123\"]\n",
    );
    let err = parse_error(&text);
    assert!(
        err.starts_with(&format!("{}:", line_of(&text, "repository_ids")))
            && err.contains("invalid type: string \"123\""),
        "{err}"
    );
    let text = edited(
        "repository = \"my-org/special\"\n",
        "repository = \"my-org/special\"\nactor_id = 7\n",
    );
    let err = parse_error(&text);
    assert!(
        err.starts_with(&format!("{}:", line_of(&text, "actor_id = 7")))
            && err.ends_with("identity.map[1].actor_id pins a login, but the entry names no actor: set actor to the login whose id this is"),
        "{err}"
    );
    let text = edited(
        "repositories = [\"my-org/*\"]\n",
        "repositories = [\"my-org/*\"]\nrepository_owner_id = 1\n",
    );
    let err = parse_error(&text);
    assert!(
        err.contains("did you mean `repository_owner_ids`?"),
        "{err}"
    );
}

#[test]
fn the_github_table_names_app_events_and_where_to_check_them() {
    let with = |table: &str| {
        edited(
            "[executors.slurm]",
            &format!("{table}\n\n[executors.slurm]"),
        )
    };
    let policy = SitePolicy::parse(&with("[github]\naccept = [\"push\"]")).unwrap();
    let github = policy.github().unwrap();
    assert_eq!(github.accept, vec!["push"]);
    assert_eq!(github.api_url, "https://api.github.com");
    assert_eq!(github.git_url, "https://github.com");
    assert_eq!(policy.summary().app_events, vec!["push"]);
    assert!(policy.describe().contains("github: App jobs of [push]"));
    assert!(
        SitePolicy::parse(BASE)
            .unwrap()
            .summary()
            .app_events
            .is_empty()
    );

    let e = parse_error(&with("[github]\naccept = []"));
    assert!(e.contains("github.accept is empty"), "{e}");
    let e = parse_error(&with("[github]\naccept = [\"psuh\"]"));
    assert!(e.ends_with("did you mean `push`?"), "{e}");
    let e = parse_error(&with(
        "[github]\naccept = [\"push\"]\napi_url = \"http://github.example\"",
    ));
    assert!(e.contains("must be an https:// URL"), "{e}");
    let e = parse_error(&with("[github]\naccept = [\"push\"]\ntoken = \"ghp_x\""));
    assert!(e.contains("unknown field `token`"), "{e}");
}
