//! Test results end to end: a job names its result files, the agent collects them from the
//! workspace (not what a symbolic link points at), uploads them also when the job fails, the
//! broker reads the JUnit files and keeps every file; `testbot results` shows a job's tests,
//! and across a batch's runs tells a flaky test from a broken one.

use testbot_e2e::{Fleet, WAIT, bin_path};
use testbot_proto::jobs::{JobSpec, JobState};

const NEXTEST: &str = include_str!("../../fixtures/junit/nextest-retries.xml");

async fn testbot(fleet: &Fleet, args: &[&str]) -> std::process::Output {
    use secrecy::ExposeSecret as _;
    let out = tokio::process::Command::new(bin_path("testbot"))
        .args(args)
        .env("TESTBOT_URL", &fleet.url)
        .env("TESTBOT_TOKEN", fleet.admin_token.expose_secret())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, out)
        .await
        .expect("testbot exits")
        .expect("testbot runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_jobs_result_files_are_collected_read_and_kept_but_no_link_is_followed() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let fixture = fleet.dir.path().join("nextest.xml");
    std::fs::write(&fixture, NEXTEST).unwrap();
    let secret = fleet.dir.path().join("agent-secret.txt");
    std::fs::write(&secret, "the agent's secret").unwrap();
    let script = format!(
        "mkdir -p reports/unit && cp {} reports/unit/junit.xml && echo hello > reports/notes.xml \
         && ln -s {} reports/stolen.xml && echo '<testsuite><testcase' > reports/broken.xml \
         && exit 1",
        fixture.display(),
        secret.display()
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
            "reports/broken.xml",
            "reports/notes.xml",
            "reports/unit/junit.xml"
        ]
    );
    use testbot_proto::test_results::FileReport;
    assert!(
        matches!(results.files[0].report, FileReport::Unreadable { .. }),
        "{:?}",
        results.files[0]
    );
    assert!(
        matches!(results.files[1].report, FileReport::NotJunit { .. }),
        "{:?}",
        results.files[1]
    );
    assert_eq!(
        (
            results.totals.cases,
            results.totals.failed,
            results.totals.flaky
        ),
        (3, 1, 1)
    );
    let attempts: usize = results.cases.iter().map(|c| c.attempts.len()).sum();
    assert_eq!(attempts, 6, "every attempt of a retried test is kept");
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

    let out = testbot(&fleet, &["results", &job.id.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("job {}: 3 result files", job.id)),
        "{stdout}"
    );
    assert!(
        stdout.contains("3 tests: 2 passed, 1 failed, 0 errors, 0 skipped, 1 flaky"),
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
    let out = testbot(
        &fleet,
        &[
            "run",
            "--repeat",
            "10",
            "--results",
            "out/*.xml",
            "--",
            &script,
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");

    let out = testbot(&fleet, &["results", "--batch", "1"]).await;
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
    let all = testbot(&fleet, &["results", "--batch", "1", "--all"]).await;
    assert!(String::from_utf8_lossy(&all.stdout).contains("ok     pkg > T.steady"));
    fleet.stop().await;
}
