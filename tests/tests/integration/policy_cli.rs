//! `testbot-agent policy check|explain` through the real binary: exit codes and exact output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A policy that lets `rgl/*` run from `main` on push, as the real token fixture does.
const RGL_POLICY: &str = r#"
[oidc]
audience = "https://example.com"

[executors.slurm]
max_cpus = 8
partitions = ["ci"]

[identity]
default_account = "nobody"

[[rules]]
name = "main-branch"
repositories = ["rgl/*"]
refs = ["refs/heads/main"]
events = ["push"]

[[rules]]
name = "tags"
repositories = ["rgl/github-actions-validate-jwt"]
refs = ["refs/tags/v*"]
"#;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/oidc")
        .join(name)
}

fn agent(args: &[&str]) -> Output {
    Command::new(testbot_e2e::bin_path("testbot-agent"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run testbot-agent")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_accepts_the_shipped_examples() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../site-configs");
    for name in [
        "hpc-slurm.toml",
        "cloud-vm-containers.toml",
        "kubernetes.toml",
    ] {
        let file = dir.join(name);
        let out = agent(&["policy", "check", file.to_str().unwrap()]);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert!(
            stdout.starts_with(&format!("{}: ok\n", file.display())),
            "{stdout}"
        );
        assert!(stdout.contains("  rule "), "{stdout}");
    }
}

#[test]
fn check_reports_file_line_col_and_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "policy.toml",
        "[oidc]\naudience = \"a\"\n\n[executors.slurm]\nmax_cpu = 8\n",
    );
    let out = agent(&["policy", "check", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        format!(
            "{file}:5:1: unknown field `max_cpu`, expected one of `max_cpus`, `max_memory`, \
             `max_gpus`, `max_time`, `default_cpus`, `default_memory`, `max_nodes`, `max_ntasks`, \
             `partitions`, `accounts`, `qos`, `extra_args`; did you mean `max_cpus`?\n"
        )
    );

    // A semantic error is placed at the value it is about.
    let file = write(
        dir.path(),
        "refs.toml",
        &RGL_POLICY.replace("refs = [\"refs/heads/main\"]", "refs = [\"main\"]"),
    );
    let out = agent(&["policy", "check", &file]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{file}:15:9: rule \"main-branch\": ref \"main\" must be a full ref such as \
             \"refs/heads/main\" or \"refs/tags/main\"\n"
        )
    );
}

#[test]
fn explain_allows_the_real_token_and_names_the_rule() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "policy.toml", RGL_POLICY);
    let claims = fixture("real-token-rgl.decoded.json");
    let out = agent(&[
        "policy",
        "explain",
        &policy,
        "--claims",
        claims.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "rule \"main-branch\": allows it\n\
         rule \"tags\": denied: ref refs/heads/main is not in allowed refs [refs/tags/v*]\n\
         allowed by rule \"main-branch\" on executor slurm; runs as account nobody (identity.default_account)\n"
    );
    assert_eq!(text(&out.stderr), "");
}

#[test]
fn explain_denies_with_the_reason_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "policy.toml", RGL_POLICY);

    // The other real token: another repository, workflow_dispatch, another audience.
    let claims = fixture("real-token-marchenko.decoded.json");
    let out = agent(&[
        "policy",
        "explain",
        &policy,
        "--claims",
        claims.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with(
            "denied: repository marchenko1985/github_oidc_token_demo is not allowed by any rule\n"
        ),
        "{stdout}"
    );
    assert!(
        text(&out.stderr).starts_with("warning: the token is for issuer"),
        "{}",
        text(&out.stderr)
    );

    // The rgl token on a ref only the tags rule would take.
    let only_tags = write(
        dir.path(),
        "tags.toml",
        &RGL_POLICY.replace("repositories = [\"rgl/*\"]", "repositories = [\"other/*\"]"),
    );
    let claims = fixture("real-token-rgl.decoded.json");
    let out = agent(&[
        "policy",
        "explain",
        &only_tags,
        "--claims",
        claims.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).ends_with(
            "denied: ref refs/heads/main is not in allowed refs [refs/tags/v*] (rule \"tags\")\n"
        ),
        "{}",
        text(&out.stdout)
    );

    // A job over the executor's caps.
    let job = write(
        dir.path(),
        "job.json",
        r#"{"executor": "slurm", "resources": {"cpus": 64, "partition": "ci"}}"#,
    );
    let out = agent(&[
        "policy",
        "explain",
        &policy,
        "--claims",
        claims.to_str().unwrap(),
        "--job",
        &job,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout)
            .ends_with("denied: resources.cpus 64 is over the cap of 8 for executor slurm\n"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn explain_exits_2_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let policy = write(dir.path(), "policy.toml", RGL_POLICY);
    let claims = fixture("real-token-rgl.decoded.json");
    let claims = claims.to_str().unwrap();

    let missing = dir.path().join("nope.json");
    let out = agent(&[
        "policy",
        "explain",
        &policy,
        "--claims",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("nope.json: cannot read it"),
        "{}",
        text(&out.stderr)
    );

    let job = write(dir.path(), "job.json", r#"{"resources": {"cpu": 4}}"#);
    let out = agent(&[
        "policy", "explain", &policy, "--claims", claims, "--job", &job,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown field `cpu`"),
        "{}",
        text(&out.stderr)
    );

    let bad_policy = write(dir.path(), "bad.toml", "[oidc]\n");
    let out = agent(&["policy", "explain", &bad_policy, "--claims", claims]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with(&format!("{bad_policy}:1:1: missing field `audience`")),
        "{}",
        text(&out.stderr)
    );
}
