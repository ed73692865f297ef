//! `testbot config check` through the real binary: a repository's `.github/testbot.toml`
//! checked on a laptop, with exit codes and exact output.

use std::path::Path;
use std::process::{Command, Output};

fn testbot(args: &[&str], dir: &Path) -> Output {
    Command::new(testbot_e2e::bin_path("testbot"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "off")
        .env_remove("TESTBOT_TOKEN")
        .output()
        .expect("run testbot")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

#[test]
fn check_describes_the_documented_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/testbot.toml");
    let dir = tempfile::tempdir().unwrap();
    let out = testbot(&["config", "check", example.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}: ok (2 jobs)\n", example.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "    runs on: site hpc; executor slurm; 4 CPUs; memory 8G; partition short; timeout 30m\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("    when:    push to main, release/* (changing src/**"),
        "{stdout}"
    );

    // --json prints the parsed file for scripts.
    let out = testbot(
        &["--json", "config", "check", example.to_str().unwrap()],
        dir.path(),
    );
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(parsed["jobs"]["unit"]["site"], "hpc");
}

#[test]
fn check_reads_the_repository_file_by_default_and_places_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(".github")).unwrap();
    std::fs::write(
        dir.path().join(".github/testbot.toml"),
        "[jobs.unit]\nscript = \"make test\"\n\n[jobs.unit.on]\npush = { branches = [\"main\"] }\nschedule = [{ cron = \"0 3 * *\" }]\n",
    )
    .unwrap();
    let out = testbot(&["config", "check"], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stdout), "");
    assert_eq!(
        text(&out.stderr),
        ".github/testbot.toml:6:22: \"0 3 * *\" has 4 fields; write five: minute hour \
         day-of-month month day-of-week (e.g. \"0 3 * * *\")\n"
    );

    // A file that is not there is an error of the command (2), not of the file (1).
    let empty = tempfile::tempdir().unwrap();
    let out = testbot(&["config", "check"], empty.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("Cannot read .github/testbot.toml"),
        "{}",
        text(&out.stderr)
    );
}
