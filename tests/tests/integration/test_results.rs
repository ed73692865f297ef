//! Test results end to end: a job names its result files, the agent collects them from the
//! workspace (not what a symbolic link points at), uploads them also when the job fails, the
//! broker reads the JUnit files and keeps every file; `testbot results` shows a job's tests,
//! and across a batch's runs tells a flaky test from a broken one.

use testbot_e2e::Fleet;
use testbot_proto::jobs::{JobSpec, JobState};

const NEXTEST: &str = include_str!("../../fixtures/junit/nextest-retries.xml");

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_jobs_result_files_are_collected_read_and_kept_but_no_link_is_followed() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let fixture = fleet.dir.path().join("nextest.xml");
    std::fs::write(&fixture, NEXTEST).unwrap();
    let secret = fleet.dir.path().join("agent-secret.txt");
    std::fs::write(&secret, "the agent's secret").unwrap();
    // A file larger than an ordinary request body (1 MiB): 40,000 passing cases.
    let big = fleet.dir.path().join("big.xml");
    let cases: String = (0..40_000)
        .map(|i| format!("<testcase classname=\"big\" name=\"case{i}\"/>\n"))
        .collect();
    std::fs::write(
        &big,
        format!("<testsuite name=\"big\">\n{cases}</testsuite>\n"),
    )
    .unwrap();
    let script = format!(
        "mkdir -p reports/unit && cp {} reports/unit/junit.xml && echo hello > reports/notes.xml \
         && ln -s {} reports/stolen.xml && echo '<testsuite><testcase' > reports/broken.xml \
         && cp {} reports/big.xml && exit 1",
        fixture.display(),
        secret.display(),
        big.display()
    );
    let spec = JobSpec {
        script,
        results: vec!["reports/**/*.xml".into(), "coverage/*.xml".into()],
        ..JobSpec::default()
    };
    let job = fleet.client().submit(&spec).await.unwrap();
    let (done, log) = fleet.finished(&job).await;
    assert_eq!(done.state, JobState::Failed, "{log}");
    assert!(
        log.contains("results: reports/stolen.xml is a symbolic link; not followed"),
        "{log}"
    );
    assert!(
        log.contains("results: \"coverage/*.xml\" matched no file"),
        "{log}"
    );
    assert!(log.contains("results: reports/unit/junit.xml ("), "{log}");
    assert!(
        log.contains("3 tests: 2 passed, 1 failed, 0 errors, 0 skipped"),
        "{log}"
    );

    let results = fleet.client().job_results(job.id).await.unwrap();
    let paths: Vec<&str> = results.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "reports/big.xml",
            "reports/broken.xml",
            "reports/notes.xml",
            "reports/unit/junit.xml"
        ],
        "{log}"
    );
    assert!(
        results.files[0].bytes > 1024 * 1024,
        "{:?}",
        results.files[0]
    );
    use testbot_proto::test_results::FileReport;
    assert!(
        matches!(results.files[1].report, FileReport::Unreadable { .. }),
        "{:?}",
        results.files[1]
    );
    assert!(
        matches!(results.files[2].report, FileReport::NotJunit { .. }),
        "{:?}",
        results.files[2]
    );
    assert_eq!(
        (
            results.totals.cases,
            results.totals.failed,
            results.totals.flaky
        ),
        (40_003, 1, 1)
    );
    let attempts: usize = results.cases.iter().map(|c| c.attempts.len()).sum();
    assert_eq!(attempts, 40_006, "every attempt of a retried test is kept");
    assert!(!format!("{results:?}").contains("the agent's secret"));

    // The file as it was uploaded.
    use secrecy::ExposeSecret as _;
    let raw = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/jobs/{}/results/file?path=reports/unit/junit.xml",
            fleet.url, job.id
        ))
        .bearer_auth(fleet.admin_token.expose_secret())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(raw, NEXTEST);

    let out = fleet.testbot(&["results", &job.id.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("job {}: 4 result files", job.id)),
        "{stdout}"
    );
    assert!(
        stdout.contains("40003 tests: 40002 passed, 1 failed, 0 errors, 0 skipped, 1 flaky"),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("failed")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.trim_start().starts_with("flaky")),
        "{stdout}"
    );
    fleet.stop().await;
}

/// A JUnit file of three tests: `steady` passes, `always` fails, `wobbly` fails in runs 5 and
/// 10 of the batch (chosen by the run's number, so the test itself is deterministic).
fn junit_script() -> String {
    r#"mkdir -p out
if [ $((TESTBOT_BATCH_RUN % 5)) -eq 0 ]; then wobbly='<failure message="off by one"/>'; else wobbly=''; fi
cat > out/junit.xml <<EOF
<testsuite name="pkg">
  <testcase classname="T" name="steady" time="0.01"/>
  <testcase classname="T" name="always" time="0.02"><failure message="always broken"/></testcase>
  <testcase classname="T" name="wobbly" time="0.03">$wobbly</testcase>
</testsuite>
EOF"#
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn across_a_batch_a_test_that_fails_in_some_runs_is_flaky_with_its_rate_and_one_that_always_fails_broken()
 {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    fleet.add_agent(fleet.agent_config("a2"));
    let script = junit_script();
    let out = fleet
        .testbot(&[
            "run",
            "--repeat",
            "10",
            "--results",
            "out/*.xml",
            "--",
            &script,
        ])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = fleet.testbot(&["results", "--batch", "1"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("batch 1: 10 runs, 10 with test results, 3 tests: 1 flaky, 1 broken"),
        "{stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[1].contains("flaky  pkg > T.wobbly: failed in 2 of 10 runs, rate 0.20 (95% interval 0.06 to 0.51); runs 5, 10"),
        "{stdout}"
    );
    assert!(
        lines[2].contains("broken pkg > T.always: failed in 10 of 10 runs"),
        "{stdout}"
    );
    assert!(!stdout.contains("T.steady"), "{stdout}");
    let all = fleet.testbot(&["results", "--batch", "1", "--all"]).await;
    assert!(String::from_utf8_lossy(&all.stdout).contains("ok     pkg > T.steady"));
    fleet.stop().await;
}

/// One JUnit file per run: `wobbly` fails on the runs `fail_runs` names (a shell test on
/// `TESTBOT_BATCH_RUN`), `lately` fails when `lately_fails`, `steady` always passes.
fn history_script(fail_runs: &str, lately_fails: bool) -> String {
    let lately = if lately_fails {
        "<failure message=\"regressed\"/>"
    } else {
        ""
    };
    format!(
        r#"mkdir -p out
case " {fail_runs} " in *" $TESTBOT_BATCH_RUN "*) wobbly='<failure message="race"/>';; *) wobbly='';; esac
cat > out/junit.xml <<EOF
<testsuite name="pkg">
  <testcase classname="T" name="steady"/>
  <testcase classname="T" name="wobbly">$wobbly</testcase>
  <testcase classname="T" name="lately">{lately}</testcase>
</testsuite>
EOF"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn across_a_branchs_commits_a_flaky_test_and_a_newly_broken_one_are_told_apart() {
    use testbot_proto::repos::RepoRegistration;
    use testbot_proto::test_results::FlakyQuery;
    const REPO: &str = "hpc-lab/solver";
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: REPO.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    let mut agent = fleet.agent_config("a1");
    agent.allow_workflow_jobs_without_policy = true;
    fleet.add_agent(agent);
    fleet.wait_polling_agents(1).await;

    // Four commits of main, four runs each: `wobbly` fails once at commits 2 and 4 (flaky
    // there), `lately` starts failing at commit 3 and keeps failing (broken). A pull request's
    // run, where `steady` would not matter, is on another ref.
    let commits = [
        ("1111111111111111111111111111111111111111", "", false),
        ("2222222222222222222222222222222222222222", "3", false),
        ("3333333333333333333333333333333333333333", "", true),
        ("4444444444444444444444444444444444444444", "1", true),
    ];
    let issuer = fleet.issuer();
    for (sha, fail_runs, lately_fails) in commits {
        let mut claims = issuer.claims(REPO, testbot_e2e::AUDIENCE);
        claims["sha"] = sha.into();
        let spec = JobSpec {
            name: Some("unit".into()),
            script: history_script(fail_runs, lately_fails),
            results: vec!["out/*.xml".into()],
            ..JobSpec::default()
        };
        fleet.workflow_batch(&claims, &spec, 4).await;
    }
    let report = fleet.flaky_on_main(REPO).await;
    let names: Vec<&str> = report.tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["wobbly", "lately"], "{report:#?}");
    let wobbly = &report.tests[0];
    assert!(wobbly.is_flaky() && !wobbly.is_broken(), "{wobbly:?}");
    assert_eq!(
        (
            wobbly.runs,
            wobbly.failures,
            wobbly.commits,
            wobbly.flaky_commits
        ),
        (16, 2, 4, 2)
    );
    assert_eq!(wobbly.first_flaky_commit.as_deref(), Some(commits[1].0));
    let lately = &report.tests[1];
    assert!(lately.is_broken() && !lately.is_flaky(), "{lately:?}");
    assert_eq!(lately.failing_commits, 2);
    assert_eq!(lately.last_passing_commit.as_deref(), Some(commits[1].0));
    assert_eq!(lately.latest_commit, commits[3].0);

    // Another branch has no history yet.
    let other = FlakyQuery {
        branch: Some("release".into()),
        ..FlakyQuery::default()
    };
    assert!(
        fleet
            .client()
            .flaky_tests(REPO, &other)
            .await
            .unwrap()
            .tests
            .is_empty()
    );

    let out = fleet.testbot(&["flaky", REPO, "--branch", "main"]).await;
    let flaky = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{flaky}");
    assert!(
        flaky.contains("flaky  unit: pkg > T.wobbly: flaky at 2 of 4 commits, first at 222222222222; failed 2 of 16 runs"),
        "{flaky}"
    );
    assert!(
        flaky.contains("broken unit: pkg > T.lately: failing in every run since 333333333333, last passing at 222222222222"),
        "{flaky}"
    );
    // One test's record, commit by commit.
    let out = fleet
        .testbot(&["history", REPO, "pkg > T.wobbly", "--branch", "main"])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("hpc-lab/solver unit: pkg > T.wobbly: flaky; failed 2 of 16 runs"),
        "{stdout}"
    );
    let commits: Vec<&str> = stdout.lines().filter(|l| l.contains(" runs ")).collect();
    assert_eq!(commits.len(), 4, "{stdout}");
    assert!(
        commits[0].contains("111111111111     4 runs     0 failed  passing"),
        "{stdout}"
    );
    assert!(
        commits[1].contains("222222222222     4 runs     1 failed  flaky"),
        "{stdout}"
    );
    assert!(stdout.contains("agent a1: failed 2 of 16 runs"), "{stdout}");

    // At a fifth commit, `wobbly` fails again: known to be flaky, told apart from `lately`,
    // which is broken and never in quarantine.
    let mut claims = issuer.claims(REPO, testbot_e2e::AUDIENCE);
    claims["sha"] = "5555555555555555555555555555555555555555".into();
    let spec = JobSpec {
        name: Some("unit".into()),
        script: history_script("1", true),
        results: vec!["out/*.xml".into()],
        ..JobSpec::default()
    };
    let batch = fleet.workflow_batch(&claims, &spec, 1).await;
    let done = &batch.jobs[0];
    let results = fleet.client().job_results(done.id).await.unwrap();
    assert_eq!(results.known_flaky, ["pkg > T.wobbly"], "{results:?}");
    let (new, known) = results.new_and_known_failures();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].name, "lately");
    assert_eq!(known[0].name, "wobbly");
    let out = fleet.testbot(&["results", &done.id.to_string()]).await;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("failed  pkg > T.wobbly (known flaky): race"),
        "{shown}"
    );
    fleet.stop().await;
}

/// A fleet trusting a local issuer, with `REPO` registered and shell agents `names`, each
/// with the label `machine:NAME`, that take workflow jobs without a policy.
async fn workflow_fleet(repo: &str, names: &[&str]) -> Fleet {
    use testbot_proto::repos::RepoRegistration;
    let mut fleet = Fleet::start_oidc(|_| {}).await;
    fleet
        .client()
        .register_repo(&RepoRegistration {
            name: repo.into(),
            ..RepoRegistration::default()
        })
        .await
        .unwrap();
    for name in names {
        let mut agent = fleet.agent_config(name);
        agent.allow_workflow_jobs_without_policy = true;
        agent.labels = vec![format!("machine:{name}")];
        fleet.add_agent(agent);
    }
    fleet.wait_polling_agents(names.len()).await;
    fleet
}

#[tokio::test(flavor = "multi_thread")]
async fn a_test_that_fails_only_on_one_agent_is_placed_there_not_called_flaky() {
    use testbot_proto::test_results::Dimension;
    const REPO: &str = "hpc-lab/solver";
    let fleet = workflow_fleet(REPO, &["a1", "a2"]).await;
    // Twelve runs on each agent, at one commit: `wobbly` fails in the odd runs on a2 only.
    let script = r#"mkdir -p out
wobbly=''
case "$TESTBOT_AGENT" in *a2) [ $((TESTBOT_BATCH_RUN % 2)) -eq 1 ] && wobbly='<failure message="bad node"/>';; esac
cat > out/junit.xml <<EOF
<testsuite name="pkg"><testcase classname="T" name="wobbly">$wobbly</testcase></testsuite>
EOF"#;
    let issuer = fleet.issuer();
    let claims = issuer.claims(REPO, testbot_e2e::AUDIENCE);
    for machine in ["a1", "a2"] {
        let mut claims = claims.clone();
        claims["jti"] = format!("jti-{machine}").into();
        let spec = JobSpec {
            name: Some("unit".into()),
            script: script.into(),
            labels: vec![format!("machine:{machine}")],
            results: vec!["out/*.xml".into()],
            ..JobSpec::default()
        };
        fleet.workflow_batch(&claims, &spec, 12).await;
    }
    let report = fleet.flaky_on_main(REPO).await;
    let wobbly = &report.tests[0];
    assert_eq!((wobbly.runs, wobbly.failures), (24, 6), "{wobbly:#?}");
    assert_eq!(wobbly.verdict(), "placed", "{wobbly:#?}");
    assert!(!wobbly.is_flaky());
    let clusters: Vec<(Dimension, &str)> = wobbly
        .clusters
        .iter()
        .map(|c| (c.dimension, c.value.as_str()))
        .collect();
    assert_eq!(clusters, [(Dimension::Agent, "a2")], "{wobbly:#?}");

    let out = fleet.testbot(&["flaky", REPO, "--branch", "main"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("placed unit: pkg > T.wobbly: fails only on agent a2: 6 of 12 runs there failed, none of 12 elsewhere (p = 0.016)"),
        "{stdout}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_with_a_stopping_rule_runs_until_its_runs_can_say_and_cancels_the_rest() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    fleet.add_agent(fleet.agent_config("a2"));
    // At confidence 0.9, 11 clean runs show a rate below 0.2; the batch may take 33.
    let out = fleet
        .testbot(&[
            "run",
            "--until-confidence",
            "0.9",
            "--max-rate",
            "0.2",
            "--",
            "sleep 0.2",
        ])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stderr.contains("batch 1: 33 runs queued"), "{stderr}");
    assert!(
        stderr.contains("(11 runs without a failure would)"),
        "{stderr}"
    );
    assert!(
        stdout.contains("failure rate: 0 of ")
            && stdout.contains(": below 0.2 with confidence 0.9"),
        "{stdout}"
    );
    let batch = fleet
        .client()
        .batch(testbot_proto::batches::BatchId(1))
        .await
        .unwrap();
    let t = batch.totals;
    assert!(
        t.succeeded >= 11 && t.cancelled > 0 && t.failed == 0,
        "{t:?}"
    );
    assert_eq!(t.succeeded + t.cancelled, 33, "{t:?}");
    assert!(!stdout.contains("not succeeded"), "{stdout}");

    // A job that always fails shows a rate above 0.2 within a few runs.
    let out = fleet
        .testbot(&[
            "run",
            "--until-confidence",
            "0.9",
            "--max-rate",
            "0.2",
            "--repeat",
            "20",
            "--",
            "sleep 0.2; exit 1",
        ])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(": above 0.2 with confidence 0.9"),
        "{stdout}"
    );
    let batch = fleet
        .client()
        .batch(testbot_proto::batches::BatchId(2))
        .await
        .unwrap();
    assert!(batch.totals.cancelled > 0, "{:?}", batch.totals);

    // Too few runs to ever say is refused before anything runs.
    let out = fleet
        .testbot(&[
            "run",
            "--until-confidence",
            "0.95",
            "--max-rate",
            "0.01",
            "--repeat",
            "100",
            "--",
            "true",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("100 runs cannot show a failure rate below 0.01 with confidence 0.95: that takes at least 299 runs without a failure"),
        "{stderr}"
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chosen_tests_run_through_run_tests_each_as_one_word_instead_of_the_whole_script() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let out = fleet
        .testbot(&[
            "run",
            "--run-tests",
            r#"for t in {tests}; do echo "ran <$t>"; done"#,
            "--tests",
            "t.py::a b",
            "--tests",
            "t.py::it's; touch pwned",
            "--",
            "echo the whole suite",
        ])
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stdout.contains("ran <t.py::a b>"), "{stdout}");
    assert!(stdout.contains("ran <t.py::it's; touch pwned>"), "{stdout}");
    assert!(!stdout.contains("the whole suite"), "{stdout}");
    // A test name the runner would read as an option is refused with the reason.
    let out = fleet
        .testbot(&[
            "run",
            "--run-tests",
            "pytest {tests}",
            "--tests=--junitxml=/root/.bashrc",
            "--",
            "true",
        ])
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("which the test runner would read as an option"),
        "{stderr}"
    );
    fleet.stop().await;
}

/// With a list command, chosen tests are patterns matched against what it prints in the job:
/// the runner gets the listed names that match (never one that starts with '-'), and a choice
/// that matches nothing fails the run, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn chosen_patterns_pick_the_tests_the_list_command_prints() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let list = "printf '%s\\n' 'tests/test_io.py::test_wobbly' 'tests/test_io.py::test_steady' \
                'tests/test_net.py::test_wobbly[ipv6]' '--junitxml=/tmp/wobbly' '3 tests collected'";
    let run = |tests: &'static [&'static str]| {
        let mut args = vec![
            "run",
            "--list-tests",
            list,
            "--run-tests",
            r#"for t in {tests}; do echo "ran <$t>"; done"#,
        ];
        for test in tests {
            args.extend(["--tests", test]);
        }
        args.extend(["--", "echo the whole suite"]);
        args
    };
    let out = fleet.testbot(&run(&["*wobbly*"])).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        stdout.contains(
            "ran <tests/test_io.py::test_wobbly>\nran <tests/test_net.py::test_wobbly[ipv6]>\n"
        ),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("testbot: running 2 listed tests"),
        "{stderr}"
    );
    assert!(
        !stdout.contains("ran <--junitxml") && !stdout.contains("test_steady>"),
        "{stdout}"
    );
    assert!(!stdout.contains("the whole suite"), "{stdout}");

    let out = fleet.testbot(&run(&["tests/test_io.py::test_gone"])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("no test the list command printed matches the chosen tests:"),
        "{stderr}"
    );
    assert!(stderr.contains("  tests/test_io.py::test_gone"), "{stderr}");
    fleet.stop().await;
}
