use super::*;

fn err(text: &str) -> String {
    RepoConfig::parse(text).unwrap_err().to_string()
}

/// The example in the docs is what maintainers copy: it must stay valid.
#[test]
fn the_documented_example_parses() {
    let config = RepoConfig::parse(include_str!("../../../docs/examples/testbot.toml")).unwrap();
    let unit = config.job("unit").unwrap();
    assert!(unit.on.runs_on_push("main"));
    assert!(unit.on.runs_on_push("release/1.2"));
    assert!(!unit.on.runs_on_push("feature"));
    assert_eq!(
        unit.on.pull_request.as_ref().unwrap().automatic,
        Automatic::Writers
    );
    let spec = unit.spec("unit").unwrap();
    assert_eq!(spec.name.as_deref(), Some("unit"));
    assert_eq!(spec.timeout_secs, Some(1800));
    assert_eq!(spec.resources.memory_mib, Some(8192));
    assert_eq!(spec.resources.partition.as_deref(), Some("short"));
    let gpu = config.job("gpu").unwrap();
    assert!(gpu.on.comment);
    assert!(gpu.on.push.is_none());
    assert_eq!(gpu.on.schedule[0].cron, "0 3 * * *");
}

#[test]
fn a_job_with_no_triggers_runs_only_on_request() {
    let config = RepoConfig::parse("[jobs.a]\nscript = \"true\"\n").unwrap();
    let a = config.job("a").unwrap();
    assert_eq!(a.on, Triggers::default());
    assert!(a.on.comment);
    assert!(!a.on.runs_on_push("main"));
    assert_eq!(a.repeat, 1);
}

#[test]
fn unknown_keys_are_refused_at_their_place_with_a_suggestion() {
    assert_eq!(
        err("[jobs.a]\nscript = \"true\"\ntimout = \"1m\"\n"),
        "3:1: unknown field `timout`, expected one of `script`, `site`, `labels`, `executor`, \
         `image`, `timeout`, `resources`, `env`, `results`, `run_tests`, `list`, `bisect`, `quarantine`, `history`, `repeat`, `on`; did you mean `timeout`?"
    );
    let e = err("[jobs.a]\nscript = \"true\"\n[jobs.a.on]\npush = { branch = [\"main\"] }\n");
    assert!(e.starts_with("4:10: unknown field `branch`"), "{e}");
    assert!(e.ends_with("did you mean `branches`?"), "{e}");
    let e = err("[jobs.a]\nscript = \"true\"\non.pull_request = { automatic = \"always\" }\n");
    assert!(e.starts_with("3:33: unknown variant `always`"), "{e}");
}

#[test]
fn a_list_command_needs_run_tests_and_reaches_the_spec() {
    let e = err("[jobs.a]\nscript = \"pytest\"\nlist = \"pytest --collect-only -q\"\n");
    assert!(e.starts_with("3:8: "), "{e}");
    assert!(e.contains("no run_tests to run them with"), "{e}");
    let config = RepoConfig::parse(
        "[jobs.a]\nscript = \"pytest\"\nrun_tests = \"pytest {tests}\"\nlist = \"pytest --collect-only -q\"\n",
    )
    .unwrap();
    let spec = config.jobs["a"].spec("a").unwrap();
    assert_eq!(spec.list.as_deref(), Some("pytest --collect-only -q"));
}

#[test]
fn a_missing_script_is_named() {
    let e = err("[jobs.a]\nsite = \"hpc\"\n");
    assert!(e.contains("missing field `script`"), "{e}");
}

#[test]
fn values_are_checked_where_they_are_written() {
    let cases = [
        (
            "[jobs.a]\nscript = \"true\"\ntimeout = \"soon\"\n",
            "3:11: \"soon\" is not a duration",
        ),
        (
            "[jobs.a]\nscript = \"true\"\nresources = { memory = \"8X\" }\n",
            "3:24: \"8X\" is not a memory size",
        ),
        (
            "[jobs.a]\nscript = \"true\"\nrepeat = 0\n",
            "3:10: repeat is 0",
        ),
        (
            "[jobs.a]\nscript = \"true\"\nrepeat = 101\n",
            "3:10: repeat is 101",
        ),
        ("[jobs.a]\nscript = \"  \"\n", "2:10: script is empty"),
        (
            "[jobs.a]\nscript = \"true\"\nresults = [\"../etc/passwd\"]\n",
            "3:12: pattern \"../etc/passwd\" has a \"..\" component",
        ),
        (
            "[jobs.a]\nscript = \"true\"\n[jobs.a.on]\npush = { branches = [] }\n",
            "4:21: name at least one branch",
        ),
        (
            "[jobs.a]\nscript = \"true\"\n[jobs.a.on]\npush = { branches = [\"refs/heads/main\"] }\n",
            "4:22: \"refs/heads/main\" is not a branch or tag name",
        ),
        (
            "[jobs.a]\nscript = \"true\"\n[jobs.a.on]\nschedule = [{ cron = \"0 3 * *\" }]\n",
            "4:22: \"0 3 * *\" has 4 fields",
        ),
        (
            "[jobs.a]\nscript = \"true\"\n[jobs.a.on]\nschedule = [{ cron = \"0 25 * * *\" }]\n",
            "4:22: \"0 25 * * *\" is not a cron expression",
        ),
        (
            "[jobs.a]\nscript = \"true\"\nsite = \"a site\"\n",
            "3:8: site \"a site\" is invalid",
        ),
        (
            "[jobs.\"-x\"]\nscript = \"true\"\n",
            "1:1: job name \"-x\" is invalid",
        ),
        (
            "[jobs.a]\nscript = \"true\"\nenv = { TESTBOT_X = \"1\" }\n",
            "3:7: ",
        ),
        (
            "[jobs.a]\nscript = \"true\"\n[jobs.a.on]\npush = { branches = [\"main\"], paths = [\"src/[\"] }\n",
            "4:40: \"src/[\" is not a glob",
        ),
    ];
    for (text, expected) in cases {
        let e = err(text);
        assert!(
            e.starts_with(expected),
            "{text:?}\n gave {e:?}\n not {expected:?}"
        );
    }
}

#[test]
fn path_filters_match_like_git_pathspecs() {
    let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(paths_match(&[], &p(&["anything"])));
    assert!(paths_match(
        &p(&["src/**"]),
        &p(&["README.md", "src/a/b.c"])
    ));
    assert!(!paths_match(&p(&["src/**"]), &p(&["docs/src/a.c"])));
    // `*` stays within a directory.
    assert!(paths_match(&p(&["*.md"]), &p(&["README.md"])));
    assert!(!paths_match(&p(&["*.md"]), &p(&["docs/guide.md"])));
    assert!(paths_match(&p(&["**/*.md"]), &p(&["docs/guide.md"])));
    assert!(!paths_match(&p(&["src/**"]), &[]));
}

#[test]
fn the_spec_is_the_same_on_both_sides() {
    let text = "[jobs.a]\nscript = \"make\"\nlabels = [\"x\"]\nexecutor = \"shell\"\n";
    let one = RepoConfig::parse(text).unwrap();
    let two = RepoConfig::parse(text).unwrap();
    assert_eq!(
        one.job("a").unwrap().spec("a").unwrap(),
        two.job("a").unwrap().spec("a").unwrap()
    );
}

#[test]
fn oversized_files_and_too_many_jobs_are_refused() {
    let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
    assert!(err(&big).contains("the limit is"));
    let many: String = (0..=MAX_JOBS)
        .map(|i| format!("[jobs.j{i}]\nscript = \"true\"\n"))
        .collect();
    assert!(err(&many).contains("the limit is 64"));
}
