//! Secret job variables, the way a submitter uses them: the value reaches the job, and nowhere
//! else (the stored log, what `testbot run` prints, what the API answers, the broker's database
//! once the job has ended).

use testbot_e2e::{Fleet, WAIT, wait_for};
use testbot_proto::jobs::{JobId, JobListQuery, JobSpec, JobState};

/// A value nobody would print by chance.
const VALUE: &str = "tk-7f3a9c21e5";

/// Every column of the job's row in the broker's database, as `sqlite3` prints it.
fn stored_row(fleet: &Fleet, id: JobId) -> String {
    let db = fleet.dir.path().join("broker").join("testbot.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg(format!("SELECT * FROM jobs WHERE id = {id}"))
        .output()
        .expect("sqlite3 runs");
    assert!(out.status.success(), "{out:?}");
    let row = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!row.is_empty(), "job {id} is in the database");
    row
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_variable_reaches_the_job_and_is_masked_everywhere_else() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("a1"));

    // The value comes from the CLI's own environment, never its command line. The job prints it
    // alone, inside a longer line, twice on a line, on stderr, and checks it got it whole.
    let script = format!(
        r#"echo "$TOKEN"; echo "Authorization: Bearer $TOKEN (sent)"; echo "$TOKEN$TOKEN"; echo "err $TOKEN" >&2; {}"#,
        testbot_e2e::check_value("TOKEN", VALUE)
    );
    let out = fleet
        .testbot_with_env(
            &[
                "run",
                "--secret-env",
                "TOKEN",
                "--env",
                "WHO=world",
                "--",
                &script,
            ],
            &[("TOKEN", VALUE)],
        )
        .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(
        stdout, "***\nAuthorization: Bearer *** (sent)\n******\nreceived whole\n",
        "{stderr}"
    );
    assert!(stderr.contains("err ***\n"), "{stderr}");
    assert!(!stderr.contains(VALUE), "{stderr}");

    let jobs = fleet.client().jobs(&JobListQuery::default()).await.unwrap();
    let id = jobs.jobs[0].id;
    // The stored log.
    let log = fleet.log(id).await;
    assert!(!log.contains(VALUE), "{log}");
    assert!(
        log.contains(" O Authorization: Bearer *** (sent)\n"),
        "{log}"
    );
    // What the API answers: the job, the list, and `testbot status`.
    let job = fleet.client().job(id).await.unwrap();
    assert_eq!(job.spec.env["TOKEN"], "***");
    assert_eq!(job.spec.env["WHO"], "world");
    assert_eq!(job.spec.secret_env, ["TOKEN"]);
    assert_eq!(jobs.jobs[0].spec.env["TOKEN"], "***");
    let status = fleet
        .testbot_with_env(&["--json", "status", &id.to_string()], &[])
        .await;
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.contains(r#""TOKEN": "***""#), "{status}");
    assert!(!status.contains(VALUE), "{status}");
    // The broker forgot the value once the job ended.
    let row = stored_row(&fleet, id);
    assert!(!row.contains(VALUE), "{row}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_jobs_secret_is_hidden_from_the_api_but_kept_for_the_agent() {
    let fleet = Fleet::start().await;
    let mut spec = JobSpec {
        script: "echo \"$TOKEN\"".into(),
        ..Default::default()
    };
    spec.env.insert("TOKEN".into(), VALUE.into());
    spec.secret_env.push("TOKEN".into());
    // Submitted while no agent runs: the answer to the submission hides it already.
    let job = fleet.client().submit(&spec).await.unwrap();
    assert_eq!(job.spec.env["TOKEN"], "***");
    assert_eq!(
        fleet.client().job(job.id).await.unwrap().spec.env["TOKEN"],
        "***"
    );
    let mut fleet = fleet;
    fleet.add_agent(fleet.agent_config("a1"));
    let done = fleet.wait_finished(job.id).await;
    assert_eq!(done.state, JobState::Succeeded);
    let log = fleet.log(job.id).await;
    assert!(log.contains(" O ***\n"), "{log}");
    assert!(!log.contains(VALUE), "{log}");

    // A line too long to ship whole is cut into pieces; the value straddles the cut, and
    // neither part of it shows.
    let mut long = spec.clone();
    long.script = "line=$(printf '%16380s' '' | tr ' ' x)$TOKEN; echo \"$line\"".into();
    let job = fleet.client().submit(&long).await.unwrap();
    assert_eq!(fleet.wait_finished(job.id).await.state, JobState::Succeeded);
    let log = fleet.log(job.id).await;
    assert!(
        log.contains("xxx***"),
        "{}",
        &log[log.len().saturating_sub(300)..]
    );
    for part in ["xtk-7", "f3a9c21e5"] {
        assert!(
            !log.contains(part),
            "{part} in {}",
            &log[log.len().saturating_sub(300)..]
        );
    }
    wait_for("the stored value to be dropped", WAIT, || async {
        (!stored_row(&fleet, job.id).contains(VALUE)).then_some(())
    })
    .await;

    // A secret name without a value, or a value too short to mask, is refused with the fix.
    let mut bad = spec.clone();
    bad.secret_env.push("MISSING".into());
    let (status, message) = testbot_e2e::refusal(fleet.client().submit(&bad).await);
    assert_eq!(status, 400);
    assert!(
        message.contains("secret_env names MISSING, which is not in env"),
        "{message}"
    );
    let mut short = spec.clone();
    short.env.insert("TOKEN".into(), "abc".into());
    let (status, message) = testbot_e2e::refusal(fleet.client().submit(&short).await);
    assert_eq!(status, 400);
    assert!(
        message.contains("env.TOKEN is secret but shorter than 4"),
        "{message}"
    );
    fleet.stop().await;
}
