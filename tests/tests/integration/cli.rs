//! The `testbot` CLI against a real fleet: exit codes, both output streams, cancel, timeout.

use std::time::Duration;

use testbot_e2e::{Fleet, WAIT, bin_path, process_alive, wait_for};
use testbot_proto::jobs::{JobListQuery, JobState};

#[tokio::test(flavor = "multi_thread")]
async fn run_prints_both_streams_and_exits_with_the_job_code() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));

    let out = fleet
        .testbot(&["run", "--", "echo hello; echo oops >&2; exit 3"])
        .await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("oops\n"), "{stderr}");
    assert!(stderr.contains("testbot: exit code 3"), "{stderr}");

    let out = fleet.testbot(&["run", "--", "echo fine"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fine\n");

    // --json: the log goes to stderr, the final job to stdout.
    let out = fleet.testbot(&["--json", "run", "--", "echo data"]).await;
    let job: testbot_proto::jobs::Job = serde_json::from_slice(&out.stdout).expect("json job");
    assert_eq!(job.state, JobState::Succeeded);

    let jobs = fleet.client().jobs(&JobListQuery::default()).await.unwrap();
    assert_eq!(jobs.jobs.len(), 3);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_status_logs_and_jobs_commands() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));

    let out = fleet
        .testbot(&[
            "submit",
            "--name",
            "greeting",
            "--env",
            "WHO=world",
            "--",
            "echo hello $WHO",
        ])
        .await;
    assert!(out.status.success(), "{out:?}");
    let id: i64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("job id");
    let out = fleet.testbot(&["logs", "-f", &id.to_string()]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello world\n");
    assert_eq!(out.status.code(), Some(0));

    let out = fleet.testbot(&["status", &id.to_string()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("job {id}: succeeded")), "{text}");
    assert!(
        text.contains("agent:     test-site/a1 (attempt 1)"),
        "{text}"
    );

    let out = fleet.testbot(&["jobs"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("greeting"), "{text}");

    let out = fleet.testbot(&["status", "999"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("job 999 does not exist"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_the_remote_job_and_its_whole_process_group() {
    use secrecy::ExposeSecret as _;
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let pids = fleet.dir.path().join("pids");

    let cli = tokio::process::Command::new(bin_path("testbot"))
        .args(["run", "--env", &format!("PIDS={}", pids.display()), "--"])
        .arg("sleep 300 & echo $! >> $PIDS; (sleep 300; echo never) & echo $! >> $PIDS; echo $$ >> $PIDS; echo started; wait")
        .env("TESTBOT_URL", &fleet.url)
        .env("TESTBOT_TOKEN", fleet.admin_token.expose_secret())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pids: Vec<i32> = wait_for("the job's processes to start", WAIT, || async {
        let text = std::fs::read_to_string(&pids).ok()?;
        let pids: Vec<i32> = text.lines().filter_map(|l| l.parse().ok()).collect();
        (pids.len() == 3).then_some(pids)
    })
    .await;
    assert!(pids.iter().all(|p| process_alive(*p)));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cli.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = tokio::time::timeout(WAIT, cli.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cancelling job 1"), "{stderr}");
    assert!(stderr.contains("cancelled by a user"), "{stderr}");
    for pid in &pids {
        assert!(
            !process_alive(*pid),
            "process {pid} of the cancelled job is still running"
        );
    }
    let job = fleet
        .client()
        .job(testbot_proto::jobs::JobId(1))
        .await
        .unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_its_time_limit_is_stopped_and_fails() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    let started = std::time::Instant::now();
    let out = fleet
        .testbot(&["run", "--timeout", "1s", "--", "echo begin; sleep 60"])
        .await;
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("timed out after 1s"), "{stderr}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_queued_job_ends_it_at_once() {
    // No agent: the job stays queued.
    let fleet = Fleet::start().await;
    let job = fleet.submit("echo never").await;
    let out = fleet.testbot(&["cancel", &job.id.to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    let job = fleet.client().job(job.id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.reason.as_deref(), Some("cancelled before it started"));
    let out = fleet.testbot(&["logs", &job.id.to_string()]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled before it started"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn operators_manage_sites_agents_and_repositories_from_the_cli() {
    let fleet = Fleet::start().await;
    let ok = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = ok(&fleet.testbot(&["site", "create", "hpc"]).await);
    assert!(out.starts_with("created site hpc\n"), "{out}");
    let token = ok(&fleet
        .testbot(&["site", "token", "hpc", "--uses", "2", "--ttl", "1h"])
        .await);
    let token = token.trim();
    assert!(token.starts_with("tbe_"), "{token}");

    // An agent enrolls with it (as a `testbot-agent` would at its first start).
    let enrollment = fleet
        .client()
        .enroll(&testbot_proto::sites::EnrollRequest {
            enrollment_token: token.to_string(),
            name: "login1".into(),
            public_key: testbot_proto::signing::generate_key().unwrap().1,
            policy: None,
        })
        .await
        .unwrap();
    let out = ok(&fleet.testbot(&["agent", "list"]).await);
    assert!(
        out.contains(&format!(
            "{}  hpc/login1  active  no policy  last seen never",
            enrollment.agent_id
        )),
        "{out}"
    );
    let out = ok(&fleet
        .testbot(&["agent", "revoke", &enrollment.agent_id])
        .await);
    assert!(out.starts_with("revoked agent hpc/login1"), "{out}");

    let out = ok(&fleet
        .testbot(&[
            "repo",
            "register",
            "hpc-lab/solver",
            "--ref",
            "refs/heads/main",
            "--site",
            "hpc",
        ])
        .await);
    assert!(out.starts_with("registered hpc-lab/solver\n"), "{out}");
    let out = ok(&fleet.testbot(&["repo", "list"]).await);
    assert_eq!(
        out,
        "hpc-lab/solver  sites: hpc  events: push, workflow_dispatch, schedule, pull_request  refs: refs/heads/main  (registered by operator:admin)\n"
    );
    let out = fleet.testbot(&["repo", "show", "hpc-lab/other"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("repository hpc-lab/other is not registered"),
        "{out:?}"
    );
    ok(&fleet.testbot(&["repo", "remove", "hpc-lab/solver"]).await);
    assert_eq!(
        ok(&fleet.testbot(&["repo", "list"]).await),
        "no repositories registered\n"
    );

    let out = ok(&fleet.testbot(&["site", "revoke", "hpc"]).await);
    assert!(out.starts_with("revoked site hpc"), "{out}");
    let out = ok(&fleet.testbot(&["site", "list"]).await);
    assert!(out.contains("hpc  revoked "), "{out}");
}

/// A log that reaches the broker's limit is cut with a line saying so, the job runs on to its own
/// end with its own result, and `run`, `logs` and `status` all say that the log was cut.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_cut_at_the_limit_says_so_and_the_job_runs_on() {
    let mut fleet = Fleet::start_with(|config| config.settings.max_log_bytes = 64 * 1024).await;
    fleet.add_agent(fleet.agent_config("a1"));

    // About 200 kB of output, then the job's own exit code, long after the cut.
    let script = "for i in $(seq 1 4000); do echo \"line $i of the output, padded to about fifty bytes\"; done; exit 4";
    let out = fleet.testbot(&["run", "--", script]).await;
    assert_eq!(out.status.code(), Some(4), "the job's own result: {out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.starts_with("line 1 of the output"), "{stdout:.200}");
    assert!(!stdout.contains("line 4000 "), "the log was not cut");
    assert!(
        stdout.len() < 64 * 1024 && stdout.len() > 32 * 1024,
        "kept {} bytes",
        stdout.len()
    );
    assert!(
        stderr.contains("testbot: the log reached the broker's limit of 65536 bytes"),
        "{stderr}"
    );
    assert!(
        stderr.contains("note: the log of job 1 was cut at byte"),
        "{stderr}"
    );

    let out = fleet.testbot(&["logs", "1"]).await;
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("note: the log of job 1 was cut"),
        "{stderr}"
    );

    let out = fleet.testbot(&["status", "1"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("job 1: failed"), "{text}");
    assert!(text.contains("log_truncated: at byte"), "{text}");
    fleet.stop().await;
}

/// `--site` sends a job to one site only, and `jobs --site` lists a site's jobs.
#[tokio::test(flavor = "multi_thread")]
async fn site_option_routes_a_job_and_filters_the_list() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));

    let out = fleet
        .testbot(&["submit", "--site", "elsewhere", "--", "echo never"])
        .await;
    assert!(out.status.success(), "{out:?}");
    let out = fleet
        .testbot(&["run", "--site", "test-site", "--", "echo here"])
        .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "here\n");

    let client = fleet.client();
    let waiting = client.job(testbot_proto::jobs::JobId(1)).await.unwrap();
    assert_eq!(
        waiting.state,
        JobState::Queued,
        "no agent of that site: it waits"
    );

    let out = fleet
        .testbot(&["--json", "jobs", "--site", "test-site"])
        .await;
    let list: testbot_proto::jobs::JobList = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<i64> = list.jobs.iter().map(|j| j.id.0).collect();
    assert_eq!(ids, vec![2], "{list:?}");
    let out = fleet
        .testbot(&["--json", "jobs", "--site", "elsewhere"])
        .await;
    let list: testbot_proto::jobs::JobList = serde_json::from_slice(&out.stdout).expect("json");
    let ids: Vec<i64> = list.jobs.iter().map(|j| j.id.0).collect();
    assert_eq!(ids, vec![1], "{list:?}");
    let out = fleet.testbot(&["jobs", "--site", "not a site"]).await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_cannot_drive_the_operators_terminal() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));
    // Clipboard write (OSC 52), window title, screen clear, a carriage return that would print
    // over the line, and a colour that may stay.
    let script = r"printf 'a\033]52;c;cm0gLXJmIH4=\007b\033]0;owned\033\\c\033[2Jd\rFAKE \033[31mred\033[0m\n'";
    let job = fleet
        .client()
        .submit(&testbot_proto::jobs::JobSpec {
            script: script.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        fleet.wait_finished(job.id).await.state,
        testbot_proto::jobs::JobState::Succeeded
    );
    let out = fleet.testbot(&["logs", &job.id.to_string()]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "abcdFAKE \x1b[31mred\x1b[0m\n"
    );
}
