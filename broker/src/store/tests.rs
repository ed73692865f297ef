//! The contract both stores keep: every test here runs against each backend on an empty
//! database. A behaviour one backend has and the other lacks fails here, not in production.
//!
//! The PostgreSQL runs need a server: `TESTBOT_TEST_DATABASE_URL` names a database there that
//! may create others (`postgres://postgres@127.0.0.1:15432/postgres`), and each test gets a
//! database of its own. [`shared`] holds the tests of what only a shared database does;
//! [`lifecycle`] checks the job lifecycle against a model on random interleavings.

use std::time::Duration;

use testbot_proto::jobs::{JobId, JobSpec, JobState};
use testbot_proto::now_ms;
use testbot_proto::results::{FailureCause, Outcome};

use super::*;
use crate::lifecycle::transitions;
use crate::routing::Offer;

mod lifecycle;
mod shared;

/// A fresh, empty store, removed again by [`Fresh::finish`].
pub(crate) struct Fresh {
    pub store: SharedStore,
    place: Place,
}

/// Where a fresh store keeps its data; removed when dropped, also when a test fails.
enum Place {
    Dir(tempfile::TempDir),
    Database(TestDatabase),
}

impl Fresh {
    pub async fn sqlite() -> Fresh {
        let dir = tempfile::Builder::new()
            .prefix("testbot-store-")
            .tempdir()
            .expect("create a data directory");
        let store = open(None, dir.path()).await.expect("open SQLite");
        Fresh {
            store,
            place: Place::Dir(dir),
        }
    }

    pub async fn postgres() -> Fresh {
        let database = TestDatabase::create().await;
        let store = database.open().await;
        Fresh {
            store,
            place: Place::Database(database),
        }
    }

    pub async fn finish(self) {
        self.store.close().await;
        match self.place {
            Place::Dir(dir) => drop(dir),
            Place::Database(database) => drop(database),
        }
    }
}

/// The environment variable naming the test PostgreSQL's maintenance database.
const TEST_DATABASE_URL: &str = "TESTBOT_TEST_DATABASE_URL";

/// An empty database on the test PostgreSQL, dropped when this is dropped.
pub(crate) struct TestDatabase(super::scratch::ScratchDatabase);

impl TestDatabase {
    pub async fn create() -> TestDatabase {
        let admin_url = std::env::var(TEST_DATABASE_URL).unwrap_or_else(|_| {
            panic!(
                "{TEST_DATABASE_URL} is not set: start the test PostgreSQL with \
                 `eval \"$(tests/postgres/start.sh)\"`; scripts/test.sh does"
            )
        });
        TestDatabase(
            super::scratch::ScratchDatabase::create(&admin_url, "testbot_test")
                .await
                .unwrap_or_else(|err| panic!("{err:#}")),
        )
    }

    /// A store on the database, as a broker opens it.
    pub async fn open(&self) -> SharedStore {
        open(Some(&self.0.url), std::path::Path::new("/nonexistent"))
            .await
            .expect("open PostgreSQL")
    }
}

/// Runs each named test against every backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let fresh = super::Fresh::sqlite().await;
                    super::$name(&*fresh.store).await;
                    fresh.finish().await;
                }
            )*
        }

        mod postgres_store {
            $(
                #[tokio::test]
                async fn $name() {
                    let fresh = super::Fresh::postgres().await;
                    super::$name(&*fresh.store).await;
                    fresh.finish().await;
                }
            )*
        }
    };
}

conformance!(
    a_bisection_is_kept_as_a_document_found_by_its_test_and_state,
    a_tests_history_is_read_per_commit_for_tests_that_failed,
    result_files_are_taken_only_under_the_lease_within_the_limits_and_stored_once,
    a_batch_is_stored_with_its_runs_in_one_go_and_goes_with_its_last_run,
    every_end_but_success_records_its_cause,
    a_job_goes_from_queued_to_its_one_result,
    a_late_call_under_an_old_lease_is_refused,
    a_claim_takes_only_jobs_the_offer_admits_oldest_first,
    a_claim_takes_jobs_by_priority_then_oldest_first,
    a_spec_is_kept_as_submitted,
    a_site_at_its_concurrency_limit_claims_nothing,
    a_log_append_is_idempotent_refuses_gaps_and_is_cut_at_the_limit,
    a_chunk_whose_first_line_does_not_fit_is_cut_before_it,
    a_cut_log_takes_no_more_chunks_even_where_they_would_fit,
    an_expired_lease_is_ended_as_decided_unless_it_was_renewed,
    a_hand_back_applies_the_decision_and_holds_the_agent_back,
    cancelling_ends_a_queued_job_and_flags_a_running_one,
    a_token_id_is_used_once_and_a_replay_stores_nothing,
    a_nonce_is_used_once_per_agent,
    a_repository_registration_binds_ids_once,
    a_repository_is_found_whatever_the_case_of_its_name,
    enrollment_spends_a_token_and_refuses_what_it_must,
    credentials_are_dropped_when_a_job_ends_and_retention_deletes_it,
    statistics_sweeps_and_health,
    webhook_deliveries_are_queued_once_claimed_retried_and_finished,
    installations_record_the_repositories_the_app_may_act_on,
    app_jobs_keep_their_provenance_and_check_run_in_step,
    a_comment_is_acted_on_once,
    schedules_keep_their_next_run_and_run_once,
);

/// SQLite alone: a steady stream of log appends never leaves the checkpointer a quiet moment to
/// catch up in, and the writer's own checkpoints keep the WAL bounded all the same.
#[tokio::test]
async fn sqlite_keeps_its_wal_bounded_under_a_steady_stream_of_appends() {
    let fresh = Fresh::sqlite().await;
    let store = &*fresh.store;
    let id = queue(store, &[]).await.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let chunk = format!("{}\n", "x".repeat(1023)).repeat(512);
    let cut = |kept| transitions::log_cut(u64::MAX, kept, 0);
    let mut offset = 0;
    // 256 MiB, sixteen times the writer's threshold.
    for _ in 0..512 {
        let appended = store
            .append_log(id, "l", offset, chunk.as_bytes(), u64::MAX, &cut)
            .await
            .unwrap();
        offset += chunk.len() as u64;
        assert_eq!(appended, AppendResult::Appended(offset));
    }
    let Place::Dir(dir) = &fresh.place else {
        unreachable!("a SQLite store lives in a directory")
    };
    let wal = std::fs::metadata(dir.path().join("testbot.db-wal"))
        .unwrap()
        .len();
    // The writer's threshold is 16 MB, and the WAL runs past it by some chunks before it rewinds
    // (20-29 MB seen on a quiet machine, more when a checkpoint of the checkpointer's holds the
    // writer's off under load). Without the writer's checkpoints it holds all 256 MiB.
    assert!(wal < 96 << 20, "the WAL grew to {wal} bytes");
    assert_eq!(
        store.read_log(id, offset - 10, 100).await.unwrap(),
        &chunk.as_bytes()[chunk.len() - 10..]
    );
    fresh.finish().await;
}

fn spec(labels: &[&str]) -> JobSpec {
    JobSpec {
        script: "true".into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        ..JobSpec::default()
    }
}

fn offer(site: &str, labels: &[&str]) -> Offer {
    Offer {
        site: site.into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        executor: "shell".into(),
        policy: None,
        workflow_jobs_without_policy: true,
    }
}

fn operator() -> JobOrigin {
    JobOrigin {
        submitted_by: "operator admin".into(),
        ..JobOrigin::default()
    }
}

fn later() -> i64 {
    now_ms() + 60_000
}

async fn queue(store: &dyn Store, labels: &[&str]) -> JobModel {
    store
        .insert_job(&spec(labels), &operator(), None)
        .await
        .unwrap()
        .unwrap()
}

async fn claim(store: &dyn Store, agent: &str, offer: &Offer, lease: &str) -> Option<JobModel> {
    let taker = JobTaker { agent, offer };
    store.claim_job(&taker, lease, later()).await.unwrap()
}

/// Someone's job first, then a push's, then a repeat's runs, then the broker's own; oldest
/// first within each, and jobs the offer does not admit are passed over, also more than a
/// page of them.
async fn a_claim_takes_jobs_by_priority_then_oldest_first(store: &dyn Store) {
    let with = |priority| JobOrigin {
        priority,
        ..operator()
    };
    let insert = |priority, labels: &'static [&'static str]| async move {
        store
            .insert_job(&spec(labels), &with(priority), None)
            .await
            .unwrap()
            .unwrap()
            .id
    };
    let mut elsewhere = Vec::new();
    for _ in 0..300 {
        elsewhere.push(insert(Priority::Interactive, &["gpu"]).await);
    }
    let background = insert(Priority::Background, &[]).await;
    let (_, repeats) = store
        .insert_batch(&spec(&[]), &operator(), None, 3, None)
        .await
        .unwrap()
        .unwrap();
    let post_merge = insert(Priority::PostMerge, &[]).await;
    let interactive = insert(Priority::Interactive, &[]).await;
    let later_interactive = insert(Priority::Interactive, &[]).await;
    let mut order = Vec::new();
    while let Some(job) = claim(store, "s/a", &offer("s", &[]), "l").await {
        order.push(job.id);
    }
    let repeats: Vec<i64> = repeats.iter().map(|j| j.id).collect();
    let expected: Vec<i64> = [interactive, later_interactive, post_merge]
        .into_iter()
        .chain(repeats)
        .chain([background])
        .collect();
    assert_eq!(order, expected);
    assert_eq!(
        claim(store, "s/b", &offer("s", &["gpu"]), "l")
            .await
            .map(|j| j.id),
        Some(elsewhere[0])
    );
}

async fn log_of(store: &dyn Store, id: JobId) -> String {
    String::from_utf8(store.read_log(id, 0, 1 << 20).await.unwrap()).unwrap()
}

async fn a_job_goes_from_queued_to_its_one_result(store: &dyn Store) {
    let job = queue(store, &[]).await;
    assert_eq!(job.state(), JobState::Queued);
    let claimed = claim(store, "s/a", &offer("s", &[]), "l1").await.unwrap();
    assert_eq!(
        (claimed.id, claimed.state(), claimed.attempts),
        (job.id, JobState::Assigned, 1)
    );
    assert_eq!(claimed.agent.as_deref(), Some("s/a"));
    let renewal = store
        .start_job(job.job_id(), "l1", later())
        .await
        .unwrap()
        .unwrap();
    assert!(!renewal.cancel_requested);
    assert_eq!(
        store.job(job.job_id()).await.unwrap().unwrap().state(),
        JobState::Running
    );
    store
        .renew_lease(job.job_id(), "l1", later())
        .await
        .unwrap()
        .unwrap();
    let model = store
        .set_metadata(job.job_id(), "l1", "slurm_job_id", "42")
        .await
        .unwrap()
        .unwrap();
    let metadata: std::collections::BTreeMap<String, String> =
        serde_json::from_str(model.metadata.as_deref().unwrap()).unwrap();
    assert_eq!(metadata["slurm_job_id"], "42");
    let done = store
        .finish_job(job.job_id(), "l1", &Outcome::succeeded())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (done.state(), done.exit_code),
        (JobState::Succeeded, Some(0))
    );
    assert!(done.finished_at_ms.is_some() && done.lease.is_none());
    // Its one result: a second finish is refused.
    assert_eq!(
        store
            .finish_job(job.job_id(), "l1", &Outcome::succeeded())
            .await
            .unwrap()
            .unwrap_err(),
        LeaseRefusal::Finished(JobState::Succeeded)
    );
    let listed = store
        .jobs(Some(JobState::Succeeded), None, 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(store.jobs(None, Some("s"), 10).await.unwrap().len(), 1);
    assert!(
        store
            .jobs(None, Some("other"), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_late_call_under_an_old_lease_is_refused(store: &dyn Store) {
    let job = queue(store, &[]).await;
    claim(store, "s/a", &offer("s", &[]), "old").await.unwrap();
    let to = transitions::lease_expired(&store.job(job.job_id()).await.unwrap().unwrap(), 3, 0);
    store.extend_active_leases(0).await.unwrap();
    // The lease runs out and the job is claimed again under a new one.
    let far = later() + 120_000;
    store
        .expire_lease(job.job_id(), "old", far, &to)
        .await
        .unwrap()
        .unwrap();
    claim(store, "s/b", &offer("s", &[]), "new").await.unwrap();
    let id = job.job_id();
    assert_eq!(
        store.start_job(id, "old", later()).await.unwrap(),
        Err(LeaseRefusal::Superseded)
    );
    assert_eq!(
        store.renew_lease(id, "old", later()).await.unwrap(),
        Err(LeaseRefusal::Superseded)
    );
    assert_eq!(
        store
            .append_log(id, "old", 0, b"x\n", 1 << 20, &|k| transitions::log_cut(
                1, k, 0
            ))
            .await
            .unwrap(),
        AppendResult::Refused(LeaseRefusal::Superseded)
    );
    assert_eq!(
        store
            .finish_job(id, "old", &Outcome::succeeded())
            .await
            .unwrap()
            .unwrap_err(),
        LeaseRefusal::Superseded
    );
    assert_eq!(
        store
            .finish_job(JobId(999_999), "old", &Outcome::succeeded())
            .await
            .unwrap()
            .unwrap_err(),
        LeaseRefusal::NoSuchJob
    );
    store
        .finish_job(id, "new", &Outcome::succeeded())
        .await
        .unwrap()
        .unwrap();
}

async fn a_claim_takes_only_jobs_the_offer_admits_oldest_first(store: &dyn Store) {
    let gpu = queue(store, &["gpu"]).await;
    let plain = queue(store, &[]).await;
    let elsewhere = queue(store, &["site:elsewhere"]).await;
    let plain2 = queue(store, &[]).await;
    // The cpu agent skips the gpu job and takes the plain ones in order.
    let cpu = offer("here", &[]);
    assert_eq!(
        claim(store, "here/cpu", &cpu, "a").await.unwrap().id,
        plain.id
    );
    assert_eq!(
        claim(store, "here/cpu", &cpu, "b").await.unwrap().id,
        plain2.id
    );
    assert!(claim(store, "here/cpu", &cpu, "c").await.is_none());
    assert_eq!(
        claim(store, "here/gpu", &offer("here", &["gpu"]), "d")
            .await
            .unwrap()
            .id,
        gpu.id
    );
    assert_eq!(
        claim(
            store,
            "elsewhere/x",
            &offer("elsewhere", &["site:elsewhere"]),
            "e"
        )
        .await
        .unwrap()
        .id,
        elsewhere.id
    );
    let queued: Vec<i64> = store
        .queued_jobs(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert!(queued.is_empty());
    // Workflow jobs: a taker that takes only operator jobs does not get them.
    let workflow = store
        .insert_job(
            &spec(&[]),
            &JobOrigin {
                repository: Some("lab/solver".into()),
                sites: vec!["here".into()],
                ..operator()
            },
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let operator_only = Offer {
        workflow_jobs_without_policy: false,
        ..offer("here", &[])
    };
    assert!(claim(store, "here/op", &operator_only, "f").await.is_none());
    let routed = store.routed_job(workflow.job_id()).await.unwrap().unwrap();
    assert_eq!(routed.sites, Some(vec!["here".to_string()]));
    assert_eq!(store.queued_jobs_of_repo("lab/solver").await.unwrap(), 1);
    assert_eq!(store.queued_jobs_for_site("here").await.unwrap(), 1);
    assert!(
        claim(store, "other/x", &offer("other", &[]), "g")
            .await
            .is_none()
    );
    assert_eq!(
        claim(store, "here/cpu", &cpu, "h").await.unwrap().id,
        workflow.id
    );
}

async fn a_spec_is_kept_as_submitted(store: &dyn Store) {
    // Whatever a script holds, even a character no SQL text type may: it is JSON-escaped.
    let mut odd = spec(&["gpu"]);
    odd.script = "printf 'a\0b'; echo \"\u{1F980} \\\" '\"".into();
    odd.executor = Some("shell".into());
    odd.name = Some("nul \0 in the name".into());
    let job = store
        .insert_job(&odd, &operator(), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.spec().unwrap(), odd);
    let claimed = claim(store, "s/a", &offer("s", &["gpu"]), "l")
        .await
        .expect("claimed");
    assert_eq!(claimed.spec_for_agent().unwrap(), odd);
    let listed = store.jobs(None, None, 10).await.unwrap();
    assert_eq!(listed[0].spec().unwrap(), odd);
}

async fn a_site_at_its_concurrency_limit_claims_nothing(store: &dyn Store) {
    let summary: testbot_proto::agents::PolicySummary = serde_json::from_value(serde_json::json!({
        "repositories": ["lab/*"],
        "executors": [{ "executor": "shell" }],
        "max_concurrent_jobs": 1,
    }))
    .unwrap();
    let limited = Offer {
        policy: Some(summary),
        ..offer("s", &[])
    };
    // A site with a policy takes workflow jobs only.
    let workflow = JobOrigin {
        repository: Some("lab/solver".into()),
        ..operator()
    };
    queue(store, &[]).await;
    store
        .insert_job(&spec(&[]), &workflow, None)
        .await
        .unwrap()
        .unwrap();
    store
        .insert_job(&spec(&[]), &workflow, None)
        .await
        .unwrap()
        .unwrap();
    let first = claim(store, "s/a", &limited, "l1").await.unwrap();
    assert!(
        first.repository.is_some(),
        "the operator job is not for a site with a policy"
    );
    assert!(
        claim(store, "s/b", &limited, "l2").await.is_none(),
        "the site is at its limit"
    );
    store
        .finish_job(first.job_id(), "l1", &Outcome::succeeded())
        .await
        .unwrap()
        .unwrap();
    assert!(
        claim(store, "s/b", &limited, "l3").await.is_some(),
        "under its limit again"
    );
}

async fn a_log_append_is_idempotent_refuses_gaps_and_is_cut_at_the_limit(store: &dyn Store) {
    let job = queue(store, &[]).await;
    let id = job.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let cut = |kept| transitions::log_cut(64, kept, 0);
    assert_eq!(
        store
            .append_log(id, "l", 0, b"one\n", 64, &cut)
            .await
            .unwrap(),
        AppendResult::Appended(4)
    );
    // Re-sent, and re-sent overlapping: nothing doubled.
    assert_eq!(
        store
            .append_log(id, "l", 0, b"one\n", 64, &cut)
            .await
            .unwrap(),
        AppendResult::Appended(4)
    );
    assert_eq!(
        store
            .append_log(id, "l", 0, b"one\ntwo\n", 64, &cut)
            .await
            .unwrap(),
        AppendResult::Appended(8)
    );
    assert_eq!(
        store
            .append_log(id, "l", 20, b"x\n", 64, &cut)
            .await
            .unwrap(),
        AppendResult::Gap { log_bytes: 8 }
    );
    assert_eq!(log_of(store, id).await, "one\ntwo\n");
    assert_eq!(store.read_log(id, 4, 100).await.unwrap(), b"two\n");
    // Past the limit: the whole lines that fit, then the notice, then nothing more.
    let long = "abcdefghij\n".repeat(10);
    let result = store
        .append_log(id, "l", 8, long.as_bytes(), 64, &cut)
        .await
        .unwrap();
    let AppendResult::TooLarge { log_bytes } = result else {
        panic!("expected the log to be cut, got {result:?}");
    };
    let log = log_of(store, id).await;
    assert_eq!(log.len() as u64, log_bytes);
    assert!(log.starts_with("one\ntwo\nabcdefghij\n"));
    assert!(log.contains("testbot: the log reached the broker's limit of 64 bytes"));
    let model = store.job(id).await.unwrap().unwrap();
    assert!(
        model
            .metadata
            .unwrap()
            .contains("at byte 63 (the limit is 64 bytes)")
    );
    assert!(matches!(
        store
            .append_log(id, "l", log_bytes, b"more\n", 64, &cut)
            .await
            .unwrap(),
        AppendResult::TooLarge { .. }
    ));
    assert_eq!(log_of(store, id).await, log);
}

/// Found by the `log_chunks` fuzz target: the cut's notice can end short of the limit, and a
/// chunk that fit in the room left was stored after it; a re-sent chunk answered `Appended`.
async fn a_cut_log_takes_no_more_chunks_even_where_they_would_fit(store: &dyn Store) {
    let job = queue(store, &[]).await;
    let id = job.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let limit = 4096;
    let cut = |kept| transitions::log_cut(limit, kept, 0);
    store
        .append_log(id, "l", 0, b"one\n", limit, &cut)
        .await
        .unwrap();
    // One line longer than the limit: none of it is kept, the notice follows "one\n".
    let long = format!("{}\n", "x".repeat(5000));
    let result = store
        .append_log(id, "l", 4, long.as_bytes(), limit, &cut)
        .await
        .unwrap();
    let AppendResult::TooLarge { log_bytes } = result else {
        panic!("expected the log to be cut, got {result:?}");
    };
    assert!(
        log_bytes < limit,
        "the notice fills the log: {log_bytes} bytes"
    );
    let log = log_of(store, id).await;
    for (offset, chunk) in [
        (log_bytes, &b"more\n"[..]),
        (0, b"one\n"),
        (4, b""),
        (log_bytes + 1, b"x\n"),
    ] {
        assert_eq!(
            store
                .append_log(id, "l", offset, chunk, limit, &cut)
                .await
                .unwrap(),
            AppendResult::TooLarge { log_bytes },
            "a chunk at {offset} after the cut"
        );
    }
    assert_eq!(log_of(store, id).await, log);
}

async fn a_chunk_whose_first_line_does_not_fit_is_cut_before_it(store: &dyn Store) {
    let job = queue(store, &[]).await;
    let id = job.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let cut = |kept| transitions::log_cut(64, kept, 0);
    store
        .append_log(id, "l", 0, b"one\n", 64, &cut)
        .await
        .unwrap();
    // Not one whole line of it fits: the notice follows the bytes already stored.
    let long = format!("{}\n", "x".repeat(100));
    let result = store
        .append_log(id, "l", 4, long.as_bytes(), 64, &cut)
        .await
        .unwrap();
    let AppendResult::TooLarge { log_bytes } = result else {
        panic!("expected the log to be cut, got {result:?}");
    };
    let log = log_of(store, id).await;
    assert_eq!(log.len() as u64, log_bytes);
    let (kept, notice) = log.split_once('\n').unwrap();
    assert_eq!(kept, "one");
    assert!(notice.contains("testbot: the log reached"), "{log}");
    assert_eq!(
        store.job(id).await.unwrap().unwrap().log_bytes as u64,
        log_bytes
    );
}

async fn a_batch_is_stored_with_its_runs_in_one_go_and_goes_with_its_last_run(store: &dyn Store) {
    use testbot_proto::batches::{BatchId, BatchPlace};
    let origin = JobOrigin {
        submitted_by: "workflow:o/r@1".into(),
        repository: Some("o/r".into()),
        ..JobOrigin::default()
    };
    let (batch, jobs) = store
        .insert_batch(&spec(&[]), &origin, Some(("batch-jti", later())), 3, None)
        .await
        .unwrap()
        .expect("a fresh token");
    assert_eq!((batch.runs, batch.repository.as_deref()), (3, Some("o/r")));
    let places: Vec<_> = jobs.iter().map(JobModel::batch_place).collect();
    let place = |run| {
        Some(BatchPlace {
            batch: BatchId(batch.id),
            run,
            runs: 3,
        })
    };
    assert_eq!(places, [place(1), place(2), place(3)]);
    // The token's id is recorded once, for the whole batch: it submits nothing again.
    assert!(
        store
            .insert_batch(&spec(&[]), &origin, Some(("batch-jti", later())), 3, None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .insert_job(&spec(&[]), &origin, Some(("batch-jti", later())))
            .await
            .unwrap()
            .is_none()
    );
    let id = BatchId(batch.id);
    assert_eq!(store.batch(id).await.unwrap().unwrap().runs, 3);
    let runs: Vec<_> = store
        .batch_jobs(id)
        .await
        .unwrap()
        .iter()
        .map(|j| j.batch_run)
        .collect();
    assert_eq!(runs, [Some(1), Some(2), Some(3)]);
    // A claimed run knows its place too.
    let claimed = claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    assert_eq!(claimed.batch_place(), place(1));
    // Retention: the batch stays while a run does, and goes with the last.
    for (i, job) in store.batch_jobs(id).await.unwrap().iter().enumerate() {
        let lease = format!("l{i}");
        if job.state() == JobState::Queued {
            claim(store, "s/a", &offer("s", &[]), &lease).await.unwrap();
        }
    }
    for (i, job) in store.batch_jobs(id).await.unwrap().iter().enumerate() {
        let lease = if i == 0 {
            "l".to_string()
        } else {
            format!("l{i}")
        };
        store
            .finish_job(job.job_id(), &lease, &Outcome::succeeded())
            .await
            .unwrap()
            .unwrap();
    }
    let cutoff = now_ms() + 60_000;
    store.delete_jobs_finished_before(cutoff, 2).await.unwrap();
    assert!(store.batch(id).await.unwrap().is_some(), "one run is left");
    store.delete_jobs_finished_before(cutoff, 10).await.unwrap();
    assert!(store.batch(id).await.unwrap().is_none());
}

async fn result_files_are_taken_only_under_the_lease_within_the_limits_and_stored_once(
    store: &dyn Store,
) {
    use crate::store::test_results::{NewResultFile, TestResultRow, UploadRefusal};
    let job = queue(store, &[]).await;
    let id = job.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let row = |name: &str, outcome: &str| TestResultRow {
        file: "junit.xml".into(),
        seq: 0,
        attempt: 1,
        suite: "pkg".into(),
        classname: Some("T".into()),
        name: name.into(),
        outcome: outcome.into(),
        duration_ms: Some(5),
        message: None,
    };
    let file = |data: &[u8], rows: Vec<TestResultRow>| NewResultFile {
        path: "junit.xml".into(),
        data: data.to_vec(),
        report: "{}".into(),
        rows,
    };
    // Another agent's lease (or an old one) stores nothing.
    assert_eq!(
        store
            .put_result_file(id, "other", &file(b"x", vec![]), 10, 100)
            .await
            .unwrap(),
        Err(UploadRefusal::Lease(LeaseRefusal::Superseded))
    );
    store
        .put_result_file(id, "l", &file(b"first", vec![row("a", "failed")]), 10, 100)
        .await
        .unwrap()
        .unwrap();
    // A retry of the same path (the agent did not hear the first answer) is kept once.
    store
        .put_result_file(id, "l", &file(b"second", vec![row("a", "passed")]), 10, 100)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .result_file_data(id, "junit.xml")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"first"[..])
    );
    let rows = store.test_results(id).await.unwrap();
    assert_eq!(rows, [row("a", "failed")]);
    // Past the job's limits: refused, naming the limit.
    let other = NewResultFile {
        path: "more.xml".into(),
        ..file(&[0; 200], vec![])
    };
    let refused = store
        .put_result_file(id, "l", &other, 10, 100)
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(UploadRefusal::OverLimit(m)) if m.contains("would hold 205 bytes"))
    );
    let refused = store
        .put_result_file(id, "l", &other, 1, 1000)
        .await
        .unwrap();
    assert!(matches!(refused, Err(UploadRefusal::OverLimit(m)) if m.contains("1 result files")));
    let files = store.result_files(id).await.unwrap();
    assert_eq!(files.len(), 1);
    // Once the job ended, nothing more is taken.
    store
        .finish_job(id, "l", &Outcome::succeeded())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store
            .put_result_file(id, "l", &other, 10, 1000)
            .await
            .unwrap(),
        Err(UploadRefusal::Lease(LeaseRefusal::Finished(
            JobState::Succeeded
        )))
    );
}

async fn a_tests_history_is_read_per_commit_for_tests_that_failed(store: &dyn Store) {
    use crate::store::test_results::{NewResultFile, TestResultRow};
    let run = |sha: &'static str,
               git_ref: &'static str,
               outcomes: Vec<(&'static str, Vec<&'static str>)>| async move {
        let origin = JobOrigin {
            submitted_by: "workflow:o/r@1".into(),
            repository: Some("o/r".into()),
            commit_sha: Some(sha.into()),
            git_ref: Some(git_ref.into()),
            ..JobOrigin::default()
        };
        let mut job_spec = spec(&[]);
        job_spec.name = Some("unit".into());
        let job = store
            .insert_job(&job_spec, &origin, None)
            .await
            .unwrap()
            .unwrap();
        let lease = format!("l{}", job.id);
        claim(store, "s/a", &offer("s", &[]), &lease).await.unwrap();
        let mut rows = Vec::new();
        for (seq, (name, attempts)) in outcomes.into_iter().enumerate() {
            for (i, outcome) in attempts.into_iter().enumerate() {
                rows.push(TestResultRow {
                    file: "junit.xml".into(),
                    seq: seq as i64,
                    attempt: i as i64 + 1,
                    suite: "pkg".into(),
                    classname: None,
                    name: name.into(),
                    outcome: outcome.into(),
                    duration_ms: None,
                    message: None,
                });
            }
        }
        let file = NewResultFile {
            path: "junit.xml".into(),
            data: b"<testsuite/>".to_vec(),
            report: "{}".into(),
            rows,
        };
        store
            .put_result_file(job.job_id(), &lease, &file, 10, 1 << 20)
            .await
            .unwrap()
            .unwrap();
    };
    run(
        "a1",
        "refs/heads/main",
        vec![("ok", vec!["passed"]), ("wobbly", vec!["passed"])],
    )
    .await;
    run(
        "a1",
        "refs/heads/main",
        vec![("ok", vec!["passed"]), ("wobbly", vec!["failed"])],
    )
    .await;
    run(
        "b2",
        "refs/heads/main",
        vec![("ok", vec!["passed"]), ("wobbly", vec!["failed", "passed"])],
    )
    .await;
    run(
        "c3",
        "refs/pull/1/merge",
        vec![("ok", vec!["passed"]), ("wobbly", vec!["error"])],
    )
    .await;
    let rows = store
        .test_history("o/r", Some("refs/heads/main"), 0)
        .await
        .unwrap();
    let seen: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.name.as_str(),
                r.commit_sha.as_str(),
                r.runs,
                r.fails,
                r.within,
            )
        })
        .collect();
    // `ok` never failed: left out. At a1 `wobbly` passed once and failed once; at b2 it
    // failed and passed on a rerun.
    assert_eq!(seen, [("wobbly", "a1", 2, 1, 0), ("wobbly", "b2", 1, 0, 1)]);
    assert_eq!(rows[0].job_name.as_deref(), Some("unit"));
    let every_ref = store.test_history("o/r", None, 0).await.unwrap();
    assert_eq!(every_ref.len(), 3);
    // Retention takes the statistics with the runs they count.
    store
        .delete_jobs_finished_before(now_ms() + 60_000, 100)
        .await
        .unwrap();
    assert!(store.test_history("o/r", None, 0).await.unwrap().is_empty());
    assert!(
        store
            .test_history("o/other", None, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .test_history("o/r", None, now_ms() + 60_000)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_bisection_is_kept_as_a_document_found_by_its_test_and_state(store: &dyn Store) {
    use testbot_proto::bisect::{Bisection, BisectionState, NewBisection, RunOutcome};
    let new = Bisection::start(
        NewBisection {
            repository: "hpc-lab/solver".into(),
            repository_id: 7,
            installation_id: 9,
            public: true,
            branch: "main".into(),
            job: "unit".into(),
            suite: "pkg".into(),
            classname: Some("T".into()),
            name: "wobbly".into(),
            select: None,
            confidence: 0.95,
            rate: None,
            started_by: "testbot".into(),
        },
        vec!["a".repeat(40), "b".repeat(40), "c".repeat(40)],
        1,
    );
    let first = store.insert_bisection(&new).await.unwrap();
    let second = store.insert_bisection(&new).await.unwrap();
    assert!(first.id > 0 && second.id > first.id);
    assert_eq!(
        store.bisection(first.id).await.unwrap(),
        Some(first.clone())
    );
    assert!(
        store
            .bisection_exists("hpc-lab/solver", "pkg > T.wobbly", &"c".repeat(40))
            .await
            .unwrap()
    );
    assert!(
        !store
            .bisection_exists("hpc-lab/solver", "pkg > T.wobbly", &"b".repeat(40))
            .await
            .unwrap()
    );
    let mut done = first.clone();
    done.add_runs(2, [JobId(5)]);
    done.set_outcome(JobId(5), RunOutcome::Failed);
    done.state = BisectionState::Found;
    done.updated_at_ms = 2;
    store.update_bisection(&done).await.unwrap();
    assert_eq!(store.bisection(first.id).await.unwrap(), Some(done));
    let running: Vec<i64> = store
        .running_bisections()
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(running, [second.id]);
    let listed: Vec<i64> = store
        .repo_bisections("hpc-lab/solver", 10)
        .await
        .unwrap()
        .iter()
        .map(|b| b.id)
        .collect();
    assert_eq!(listed, [second.id, first.id]);
    assert!(
        store
            .repo_bisections("other/repo", 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.bisection(9999).await.unwrap(), None);
}

async fn every_end_but_success_records_its_cause(store: &dyn Store) {
    let any = offer("s", &[]);
    let mut ended = Vec::new();
    for (lease, outcome) in [
        ("ok", Outcome::succeeded()),
        ("exit", Outcome::exited(3)),
        (
            "oom",
            Outcome::with_cause(
                JobState::Failed,
                FailureCause::OutOfMemory,
                "out of memory: Slurm killed the job (OUT_OF_MEMORY)",
            ),
        ),
        // An agent that reports no cause: inferred from the state and the reason.
        (
            "old-timeout",
            Outcome {
                cause: None,
                ..Outcome::with_cause(
                    JobState::Failed,
                    FailureCause::Timeout,
                    "timed out after 5s",
                )
            },
        ),
        (
            "old-error",
            Outcome {
                cause: None,
                ..Outcome::with_cause(JobState::Error, FailureCause::Infrastructure, "it broke")
            },
        ),
    ] {
        let job = queue(store, &[]).await;
        claim(store, "s/a", &any, lease).await.unwrap();
        let done = store
            .finish_job(job.job_id(), lease, &outcome)
            .await
            .unwrap()
            .unwrap();
        ended.push(done.to_job().unwrap().cause);
    }
    assert_eq!(
        ended,
        [
            None,
            Some(FailureCause::TestFailure),
            Some(FailureCause::OutOfMemory),
            Some(FailureCause::Timeout),
            Some(FailureCause::Infrastructure),
        ]
    );
    let queued = queue(store, &[]).await;
    let cancelled = store
        .request_cancel(
            queued.job_id(),
            &transitions::cancelled_before_start(now_ms()),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.cause.as_deref(), Some("cancelled"));
}

async fn an_expired_lease_is_ended_as_decided_unless_it_was_renewed(store: &dyn Store) {
    let job = queue(store, &[]).await;
    let id = job.job_id();
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let now = now_ms();
    assert!(store.expired_leases(now).await.unwrap().is_empty());
    store.extend_active_leases(0).await.unwrap();
    let until = later();
    let expired = store.expired_leases(until).await.unwrap();
    assert_eq!(expired.len(), 1);
    let to = transitions::lease_expired(&expired[0], 3, now);
    // Renewed meanwhile: the sweep's decision no longer applies.
    store
        .renew_lease(id, "l", until + 60_000)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .expire_lease(id, "l", until, &to)
            .await
            .unwrap()
            .is_err()
    );
    let requeued = store
        .expire_lease(id, "l", until + 120_000, &to)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(requeued.state(), JobState::Queued);
    assert_eq!(requeued.cause, None);
    assert!(requeued.lease.is_none() && requeued.finished_at_ms.is_none());
    assert!(
        log_of(store, id)
            .await
            .contains("testbot: requeued: agent s/a stopped renewing")
    );
    assert_eq!(requeued.log_bytes as usize, log_of(store, id).await.len());
    // The last attempt ends it.
    let again = claim(store, "s/a", &offer("s", &[]), "l2").await.unwrap();
    let to = transitions::lease_expired(&again, 2, now);
    let ended = store
        .expire_lease(id, "l2", until + 180_000, &to)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state(), JobState::Error);
    assert_eq!(ended.cause.as_deref(), Some("infrastructure"));
    assert!(ended.finished_at_ms.is_some());
}

async fn a_hand_back_applies_the_decision_and_holds_the_agent_back(store: &dyn Store) {
    let job = queue(store, &[]).await;
    let id = job.job_id();
    let any = offer("s", &[]);
    claim(store, "s/a", &any, "l").await.unwrap();
    let release = Release {
        lease: "l",
        agent: "s/a",
        hold_until_ms: later(),
    };
    let seen = std::sync::Mutex::new(None);
    let requeued = store
        .release_job(id, &release, &|releases| {
            *seen.lock().unwrap() = Some(releases);
            transitions::released("queued again", None, releases, 3, 0)
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*seen.lock().unwrap(), Some(0));
    assert_eq!((requeued.state(), requeued.attempts), (JobState::Queued, 0));
    assert_eq!(store.job_releases(id).await.unwrap(), Some(1));
    // Held back from the agent that handed it back, not from others.
    assert!(claim(store, "s/a", &any, "l2").await.is_none());
    assert!(store.end_holds(now_ms()).await.unwrap().is_empty());
    claim(store, "s/b", &any, "l3").await.unwrap();
    let ended = store
        .release_job(
            id,
            &Release {
                lease: "l3",
                ..release
            },
            &|releases| transitions::released("r", Some("nobody else may run it"), releases, 3, 0),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.state(), JobState::Error);
    assert_eq!(ended.reason.as_deref(), Some("nobody else may run it"));
    assert_eq!(
        ended.to_job().unwrap().cause,
        Some(FailureCause::PolicyRefusal)
    );
    assert!(
        log_of(store, id)
            .await
            .contains("testbot: nobody else may run it")
    );
    assert_eq!(
        store.end_holds(later() + 1).await.unwrap(),
        Vec::<JobId>::new()
    );
    let refused = store
        .release_job(id, &release, &|r| transitions::released("r", None, r, 3, 0))
        .await
        .unwrap();
    assert_eq!(
        refused.unwrap_err(),
        LeaseRefusal::Finished(JobState::Error)
    );
}

async fn cancelling_ends_a_queued_job_and_flags_a_running_one(store: &dyn Store) {
    let running = queue(store, &[]).await;
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    let queued = queue(store, &[]).await;
    let to = transitions::cancelled_before_start(0);
    let cancelled = store
        .request_cancel(queued.job_id(), &to)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    assert!(cancelled.finished_at_ms.is_some());
    assert!(
        log_of(store, queued.job_id())
            .await
            .contains("testbot: cancelled before it started")
    );
    let flagged = store
        .request_cancel(running.job_id(), &to)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(flagged.state(), JobState::Assigned);
    assert!(flagged.cancel_requested);
    assert!(
        store
            .renew_lease(running.job_id(), "l", later())
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
    assert!(
        store
            .request_cancel(JobId(999_999), &to)
            .await
            .unwrap()
            .is_none()
    );
    // An ended job stays as it is.
    let again = store
        .request_cancel(queued.job_id(), &to)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.log_bytes, cancelled.log_bytes);
}

async fn a_token_id_is_used_once_and_a_replay_stores_nothing(store: &dyn Store) {
    let exp = now_ms() / 1000 + 600;
    assert!(
        store
            .insert_job(&spec(&[]), &operator(), Some(("jti-1", exp)))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .insert_job(&spec(&[]), &operator(), Some(("jti-1", exp)))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.queued_jobs(0, 10).await.unwrap().len(), 1);
    assert!(store.jti_used("jti-1").await.unwrap());
    assert!(!store.jti_used("jti-2").await.unwrap());
    assert!(store.use_jti("jti-2", exp).await.unwrap());
    assert!(!store.use_jti("jti-2", exp).await.unwrap());
    let job = store.queued_jobs(0, 1).await.unwrap().remove(0);
    assert_eq!(
        store.submit_jti(JobId(job.id)).await.unwrap().as_deref(),
        Some("jti-1")
    );
    assert!(
        store
            .upsert_repo("lab/x", "{}", "someone", None, Some(("jti-2", exp)))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.prune_jtis(exp + 1).await.unwrap(), 2);
    assert!(!store.jti_used("jti-1").await.unwrap());
}

async fn a_nonce_is_used_once_per_agent(store: &dyn Store) {
    let until = later();
    assert!(store.use_nonce("agent-1", "n1", until).await.unwrap());
    assert!(!store.use_nonce("agent-1", "n1", until).await.unwrap());
    assert!(store.use_nonce("agent-2", "n1", until).await.unwrap());
    store
        .insert_nonces(&[("agent-3".into(), "n2".into(), until)])
        .await
        .unwrap();
    assert_eq!(store.live_nonces(now_ms()).await.unwrap().len(), 3);
    assert_eq!(store.prune_nonces(until + 1).await.unwrap(), 3);
    assert!(store.live_nonces(now_ms()).await.unwrap().is_empty());
}

async fn a_repository_registration_binds_ids_once(store: &dyn Store) {
    let ids = RepositoryIds {
        repository_id: "101".into(),
        repository_owner_id: Some("7".into()),
    };
    let created = store
        .insert_repo_if_absent("lab/solver", r#"{"sites":["hpc"]}"#, "workflow", &ids, None)
        .await
        .unwrap();
    assert!(matches!(created, FirstRegistration::Created(_)));
    assert!(matches!(
        store
            .insert_repo_if_absent("lab/solver", "{}", "workflow", &ids, None)
            .await
            .unwrap(),
        FirstRegistration::Exists
    ));
    // Replacing settings keeps the ids; binding other ids changes nothing.
    let updated = store
        .upsert_repo("lab/solver", "{}", "operator", None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.ids(), Some(ids.clone()));
    let other = RepositoryIds {
        repository_id: "999".into(),
        repository_owner_id: None,
    };
    assert_eq!(
        store.bind_repo_ids("lab/solver", &other).await.unwrap(),
        Some(ids.clone())
    );
    assert_eq!(store.bind_repo_ids("lab/none", &other).await.unwrap(), None);
    let unbound = store
        .upsert_repo("lab/new", "{}", "operator", None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unbound.ids(), None);
    assert_eq!(
        store.bind_repo_ids("lab/new", &other).await.unwrap(),
        Some(other)
    );
    assert_eq!(store.repos().await.unwrap().len(), 2);
    assert!(store.delete_repo("lab/new").await.unwrap());
    assert!(!store.delete_repo("lab/new").await.unwrap());
    assert!(store.repo("lab/new").await.unwrap().is_none());
}

async fn a_repository_is_found_whatever_the_case_of_its_name(store: &dyn Store) {
    // GitHub matches names without regard to case; a registration is kept as first spelled.
    store
        .upsert_repo("Lab/Solver", "{}", "operator", None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        store.repo("lab/SOLVER").await.unwrap().unwrap().name,
        "Lab/Solver"
    );
    let updated = store
        .upsert_repo("LAB/solver", r#"{"sites":["hpc"]}"#, "operator", None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(updated.name, "Lab/Solver");
    assert!(updated.settings.contains("hpc"));
    let ids = RepositoryIds {
        repository_id: "101".into(),
        repository_owner_id: None,
    };
    assert!(matches!(
        store
            .insert_repo_if_absent("lab/solver", "{}", "workflow", &ids, None)
            .await
            .unwrap(),
        FirstRegistration::Exists
    ));
    store
        .upsert_repo("lab/other", "{}", "operator", None, None)
        .await
        .unwrap()
        .unwrap();
    let names: Vec<String> = store
        .repos()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    // In the order of the names without case (by bytes, "Lab/Solver" would come first).
    assert_eq!(names, ["lab/other", "Lab/Solver"]);
    assert!(store.delete_repo("lab/solver").await.unwrap());
    assert!(store.repo("Lab/Solver").await.unwrap().is_none());
}

async fn enrollment_spends_a_token_and_refuses_what_it_must(store: &dyn Store) {
    assert!(store.create_site("hpc").await.unwrap().is_some());
    assert!(store.create_site("hpc").await.unwrap().is_none());
    store
        .create_enrollment_token("t1", "hpc", 2, later())
        .await
        .unwrap();
    store
        .create_enrollment_token("old", "hpc", 1, now_ms() - 1)
        .await
        .unwrap();
    assert!(store.enrollment_token_exists("t1").await.unwrap());
    let agent = store
        .enroll_agent("t1", "id-1", "login1", b"key-1", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (agent.site.as_str(), agent.name.as_str()),
        ("hpc", "login1")
    );
    let refusal = |r: StoreResult<Result<AgentModel, EnrollRefusal>>| r.unwrap().unwrap_err();
    assert_eq!(
        refusal(
            store
                .enroll_agent("t1", "id-2", "login2", b"key-1", None)
                .await
        ),
        EnrollRefusal::KeyTaken
    );
    assert_eq!(
        refusal(
            store
                .enroll_agent("t1", "id-2", "login1", b"key-2", None)
                .await
        ),
        EnrollRefusal::NameTaken {
            site: "hpc".into(),
            name: "login1".into()
        }
    );
    assert_eq!(
        refusal(store.enroll_agent("nope", "id-2", "x", b"k", None).await),
        EnrollRefusal::UnknownToken
    );
    assert_eq!(
        refusal(store.enroll_agent("old", "id-2", "x", b"k", None).await),
        EnrollRefusal::Expired
    );
    store
        .enroll_agent("t1", "id-2", "login2", b"key-2", Some("{}"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        refusal(
            store
                .enroll_agent("t1", "id-3", "login3", b"key-3", None)
                .await
        ),
        EnrollRefusal::UsedUp
    );
    store
        .record_offer("id-2", Some("{}"), r#"{"site":"hpc"}"#)
        .await
        .unwrap();
    let offers = store.active_agent_offers().await.unwrap();
    assert_eq!(offers.len(), 2);
    assert!(
        offers
            .iter()
            .any(|o| o.name == "login2" && o.offer.is_some())
    );
    assert!(
        store
            .agent("id-2")
            .await
            .unwrap()
            .unwrap()
            .last_seen_ms
            .is_some()
    );
    assert!(store.revoke_agent("id-1").await.unwrap());
    assert!(!store.revoke_agent("id-9").await.unwrap());
    assert_eq!(store.active_agent_offers().await.unwrap().len(), 1);
    store
        .create_enrollment_token("t2", "hpc", 5, later())
        .await
        .unwrap();
    assert!(store.revoke_site("hpc").await.unwrap());
    assert!(!store.enrollment_token_exists("t2").await.unwrap());
    assert!(
        store
            .agents()
            .await
            .unwrap()
            .iter()
            .all(|a| a.site_revoked_at_ms.is_some())
    );
    assert!(store.active_agent_offers().await.unwrap().is_empty());
    assert_eq!(store.sites().await.unwrap().len(), 1);
    // Operator tokens.
    store
        .upsert_api_token("h1", "operator", "admin")
        .await
        .unwrap();
    store
        .upsert_api_token("h2", "operator", "admin")
        .await
        .unwrap();
    assert_eq!(
        store
            .retire_api_tokens("operator", "admin", "h2")
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.api_tokens().await.unwrap().len(), 1);
}

async fn credentials_are_dropped_when_a_job_ends_and_retention_deletes_it(store: &dyn Store) {
    let mut secret = spec(&[]);
    secret.env.insert("TOKEN".into(), "s3cret".into());
    secret.secret_env = vec!["TOKEN".into()];
    let origin = JobOrigin {
        repository: Some("lab/solver".into()),
        oidc_token: Some("header.payload.signature".into()),
        ..operator()
    };
    let finished = store
        .insert_job(&secret, &origin, None)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !finished.spec.contains("s3cret"),
        "the stored spec is masked"
    );
    let queued = store
        .insert_job(&spec(&[]), &origin, None)
        .await
        .unwrap()
        .unwrap();
    let claimed = claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    assert_eq!(claimed.id, finished.id);
    assert_eq!(claimed.spec_for_agent().unwrap().env["TOKEN"], "s3cret");
    assert!(
        store
            .stored_oidc_token(finished.job_id())
            .await
            .unwrap()
            .is_some()
    );
    store
        .finish_job(
            finished.job_id(),
            "l",
            &Outcome::with_cause(JobState::Failed, FailureCause::TestFailure, "exit 1"),
        )
        .await
        .unwrap()
        .unwrap();
    let ended = store.job(finished.job_id()).await.unwrap().unwrap();
    assert_eq!(ended.secret_env, None);
    assert_eq!(
        store.stored_oidc_token(finished.job_id()).await.unwrap(),
        None
    );
    // A queued job keeps its token: the agent that claims it verifies it.
    assert!(
        store
            .stored_oidc_token(queued.job_id())
            .await
            .unwrap()
            .is_some()
    );
    let cancelled = store
        .insert_job(&spec(&[]), &origin, None)
        .await
        .unwrap()
        .unwrap();
    store
        .request_cancel(cancelled.job_id(), &transitions::cancelled_before_start(0))
        .await
        .unwrap();
    assert_eq!(
        store.stored_oidc_token(cancelled.job_id()).await.unwrap(),
        None
    );

    let retention = Duration::from_secs(3600);
    let now = now_ms();
    assert_eq!(
        crate::limits::sweep_finished_jobs(store, now, retention)
            .await
            .unwrap(),
        0
    );
    let after = now + retention.as_millis() as i64 + 1000;
    assert_eq!(
        crate::limits::sweep_finished_jobs(store, after, retention)
            .await
            .unwrap(),
        2
    );
    assert!(store.job(finished.job_id()).await.unwrap().is_none());
    assert!(
        store
            .read_log(cancelled.job_id(), 0, 1024)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.job(queued.job_id()).await.unwrap().is_some());
}

async fn statistics_sweeps_and_health(store: &dyn Store) {
    store.health().await.unwrap();
    assert_eq!(store.oldest_queued_at().await.unwrap(), None);
    let first = queue(store, &[]).await;
    queue(store, &[]).await;
    claim(store, "s/a", &offer("s", &[]), "l").await.unwrap();
    assert!(store.oldest_queued_at().await.unwrap().is_some());
    let by_state = store.jobs_by_state().await.unwrap();
    assert!(by_state.contains(&(JobState::Queued, 1)));
    assert!(by_state.contains(&(JobState::Assigned, 1)));
    assert_eq!(first.state(), JobState::Queued);
    assert_eq!(store.last_sweep_ms().await.unwrap(), None);
    assert!(store.lead_sweeper().await.unwrap());
    store.record_sweep(1234).await.unwrap();
    store.record_sweep(5678).await.unwrap();
    assert_eq!(store.last_sweep_ms().await.unwrap(), Some(5678));
}

/// The message of a store that fails to open.
fn delivery<'a>(id: &'a str, at: i64) -> crate::store::github::NewDelivery<'a> {
    crate::store::github::NewDelivery {
        id,
        event: "push",
        action: None,
        payload: b"{\"ref\":\"refs/heads/main\"}",
        received_at_ms: at,
    }
}

async fn webhook_deliveries_are_queued_once_claimed_retried_and_finished(store: &dyn Store) {
    use crate::store::github::DeliveryOutcome;
    let now = now_ms();
    assert!(store.queue_delivery(&delivery("d-1", now)).await.unwrap());
    assert!(
        store
            .queue_delivery(&delivery("d-2", now + 1))
            .await
            .unwrap()
    );
    // A redelivery changes nothing.
    assert!(
        !store
            .queue_delivery(&delivery("d-1", now + 5))
            .await
            .unwrap()
    );

    // Oldest first; a claimed delivery is not claimed again while its claim lasts.
    let first = store
        .claim_delivery(now + 10, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((first.id.as_str(), first.attempts), ("d-1", 1));
    assert_eq!(first.payload, b"{\"ref\":\"refs/heads/main\"}");
    let second = store
        .claim_delivery(now + 10, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.id, "d-2");
    assert!(
        store
            .claim_delivery(now + 10, 60_000)
            .await
            .unwrap()
            .is_none()
    );

    // A claim that ran out (its broker died) is taken again.
    let again = store
        .claim_delivery(now + 70_000, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.id.as_str(), again.attempts), ("d-1", 2));

    // A retry waits for its time; done and failed deliveries are not claimed again.
    store
        .finish_delivery(
            "d-1",
            DeliveryOutcome::Retry {
                error: "GitHub is down",
                retry_at_ms: now + 200_000,
            },
        )
        .await
        .unwrap();
    store
        .finish_delivery("d-2", DeliveryOutcome::Done)
        .await
        .unwrap();
    assert!(
        store
            .claim_delivery(now + 150_000, 60_000)
            .await
            .unwrap()
            .is_none()
    );
    let retried = store
        .claim_delivery(now + 200_000, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((retried.id.as_str(), retried.attempts), ("d-1", 3));
    assert_eq!(retried.error.as_deref(), Some("GitHub is down"));
    store
        .finish_delivery(
            "d-1",
            DeliveryOutcome::Failed {
                error: "no such repository",
            },
        )
        .await
        .unwrap();
    assert!(
        store
            .claim_delivery(now + 900_000, 60_000)
            .await
            .unwrap()
            .is_none()
    );
    let failed = store.delivery("d-1").await.unwrap().unwrap();
    assert_eq!(
        (failed.state.as_str(), failed.error.as_deref()),
        ("failed", Some("no such repository"))
    );
    assert_eq!(store.delivery("d-2").await.unwrap().unwrap().state, "done");

    // Processed deliveries are forgotten after the retention; their ids may then come again.
    assert_eq!(store.prune_deliveries(now_ms() + 1).await.unwrap(), 2);
    assert!(store.delivery("d-1").await.unwrap().is_none());
    assert!(store.queue_delivery(&delivery("d-1", now)).await.unwrap());
}

async fn installations_record_the_repositories_the_app_may_act_on(store: &dyn Store) {
    use crate::store::github::InstalledRepo;
    let repo = |id, name: &str| InstalledRepo {
        id,
        full_name: name.into(),
    };
    assert_eq!(store.installation_of(11).await.unwrap(), None);
    store
        .save_installation(
            5,
            "octo-org",
            &[repo(11, "octo-org/a"), repo(12, "octo-org/b")],
        )
        .await
        .unwrap();
    assert_eq!(store.installation_of(11).await.unwrap(), Some(5));
    assert_eq!(store.installation_of(12).await.unwrap(), Some(5));
    // Saving again replaces the list.
    store
        .save_installation(5, "octo-org", &[repo(12, "octo-org/b")])
        .await
        .unwrap();
    assert_eq!(store.installation_of(11).await.unwrap(), None);
    assert!(
        store
            .change_installation_repos(5, &[repo(13, "octo-org/c")], &[12])
            .await
            .unwrap()
    );
    assert_eq!(store.installation_of(12).await.unwrap(), None);
    assert_eq!(store.installation_of(13).await.unwrap(), Some(5));
    // Unknown installations are said to be unknown, not invented.
    assert!(
        !store
            .change_installation_repos(6, &[repo(14, "x/y")], &[])
            .await
            .unwrap()
    );
    assert_eq!(store.installation_of(14).await.unwrap(), None);
    // Uninstalling forgets its repositories.
    assert!(store.delete_installation(5).await.unwrap());
    assert!(!store.delete_installation(5).await.unwrap());
    assert_eq!(store.installation_of(13).await.unwrap(), None);
}

async fn app_jobs_keep_their_provenance_and_check_run_in_step(store: &dyn Store) {
    use crate::store::github::NewAppJob;
    let origin = JobOrigin {
        repository: Some("octo-org/a".into()),
        submitted_by: testbot_proto::provenance::APP_SUBMITTER.into(),
        sites: vec!["hpc".into()],
        ..JobOrigin::default()
    };
    let provenance = serde_json::json!({
        "event": "push", "repository": "octo-org/a", "repository_id": 11,
        "sha": "a".repeat(40), "job": "unit", "config_sha": "a".repeat(40),
        "branch": "main", "pushed_by": "octocat",
    })
    .to_string();
    let app = NewAppJob {
        provenance: &provenance,
        installation_id: 5,
        repository: "octo-org/a",
        head_sha: "abc",
        check_name: "unit",
        check_run: true,
    };
    // The routing columns name the App's submitter literally (they are `concat!`ed).
    assert_eq!(testbot_proto::provenance::APP_SUBMITTER, "github-app");
    let job = store
        .insert_app_job(&spec(&["slurm"]), &origin, &app)
        .await
        .unwrap();
    assert_eq!(job.state(), JobState::Queued);
    assert_eq!(
        job.submitted_by.as_deref(),
        Some(testbot_proto::provenance::APP_SUBMITTER)
    );
    let plain = queue(store, &[]).await;
    assert!(store.app_job(plain.job_id()).await.unwrap().is_none());
    // A workflow job gets a check run without a provenance; routing sees no App job in it.
    let workflow = queue(store, &[]).await;
    store
        .add_workflow_check_run(workflow.job_id(), 5, "octo-org/a", "def", "ci: unit")
        .await
        .unwrap();
    let row = store.app_job(workflow.job_id()).await.unwrap().unwrap();
    assert_eq!(
        (row.provenance, row.check_name.as_str()),
        (None, "ci: unit")
    );
    assert_eq!(
        store
            .routed_job(workflow.job_id())
            .await
            .unwrap()
            .unwrap()
            .app_event,
        None
    );
    store
        .check_run_synced(workflow.job_id(), 70, "queued")
        .await
        .unwrap();

    let row = store.app_job(job.job_id()).await.unwrap().unwrap();
    assert_eq!(row.provenance.as_deref(), Some(provenance.as_str()));
    assert_eq!(
        (row.check_name.as_str(), row.head_sha.as_str()),
        ("unit", "abc")
    );
    assert_eq!(
        (row.check_run_id, row.synced_state.as_deref()),
        (None, None)
    );

    // Behind until synced; in step after; behind again when the job moves on.
    let now = now_ms();
    let due = store.check_runs_to_sync(now, 10).await.unwrap();
    assert_eq!(
        due.iter().map(|r| r.job_id).collect::<Vec<_>>(),
        vec![job.id]
    );
    assert_eq!(due[0].state, "queued");
    store
        .check_run_synced(job.job_id(), 77, "queued")
        .await
        .unwrap();
    assert!(store.check_runs_to_sync(now, 10).await.unwrap().is_empty());
    assert_eq!(
        store
            .app_job_by_check_run(77)
            .await
            .unwrap()
            .unwrap()
            .job_id,
        job.id
    );
    assert!(store.app_job_by_check_run(78).await.unwrap().is_none());
    // Only an agent whose policy takes App push jobs is offered it.
    assert!(
        claim(store, "hpc/a0", &offer("hpc", &["slurm"]), "l0")
            .await
            .is_some_and(|claimed| claimed.id == plain.id)
    );
    let mut takes_pushes = offer("hpc", &["slurm"]);
    takes_pushes.policy = Some(testbot_proto::agents::PolicySummary {
        repositories: vec!["octo-org/*".into()],
        executors: vec![testbot_proto::agents::ExecutorCaps {
            executor: "shell".into(),
            ..Default::default()
        }],
        app_events: vec!["push".into()],
        ..Default::default()
    });
    let claimed = claim(store, "hpc/a1", &takes_pushes, "l1").await.unwrap();
    assert_eq!(claimed.id, job.id);
    let due = store.check_runs_to_sync(now, 10).await.unwrap();
    assert_eq!(
        (due[0].state.as_str(), due[0].check_run_id),
        ("assigned", Some(77))
    );

    let active = store
        .active_app_jobs_of_commit("octo-org/a", "abc")
        .await
        .unwrap();
    assert_eq!(
        active.iter().map(|r| r.job_id).collect::<Vec<_>>(),
        vec![job.id]
    );
    assert!(
        store
            .active_app_jobs_of_commit("octo-org/a", "abd")
            .await
            .unwrap()
            .is_empty()
    );

    // A failed update waits for its retry time.
    store
        .check_run_sync_failed(job.job_id(), now + 10_000)
        .await
        .unwrap();
    assert!(store.check_runs_to_sync(now, 10).await.unwrap().is_empty());
    let due = store.check_runs_to_sync(now + 10_000, 10).await.unwrap();
    assert_eq!(due[0].sync_attempts, 1);
}

async fn a_comment_is_acted_on_once(store: &dyn Store) {
    use crate::store::github::CommentKind::{Comment, Review};
    let now = now_ms();
    assert!(
        store
            .claim_comment(Comment, 1001, "d-1", now)
            .await
            .unwrap()
    );
    // Another delivery of it (an edit, a repeated event) does not act; a retry of the same does.
    assert!(
        !store
            .claim_comment(Comment, 1001, "d-2", now)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_comment(Comment, 1001, "d-1", now)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_comment(Comment, 1002, "d-3", now)
            .await
            .unwrap()
    );
    // A review's id is not a comment's.
    assert!(store.claim_comment(Review, 1001, "d-4", now).await.unwrap());
    assert!(!store.claim_comment(Review, 1001, "d-5", now).await.unwrap());
}

async fn schedules_keep_their_next_run_and_run_once(store: &dyn Store) {
    use crate::store::github::ScheduleModel;
    let entry = |job: &str, cron: &str, next| ScheduleModel {
        repository_id: 11,
        repository: "octo-org/a".into(),
        installation_id: 5,
        job: job.into(),
        cron: cron.into(),
        branch: "main".into(),
        next_run_ms: next,
    };
    store
        .replace_schedules(
            11,
            &[
                entry("nightly", "0 3 * * *", 1000),
                entry("hourly", "0 * * * *", 500),
            ],
        )
        .await
        .unwrap();
    // Recorded again (another push): an entry that stays keeps its next run; a removed one goes.
    store
        .replace_schedules(11, &[entry("nightly", "0 3 * * *", 9000)])
        .await
        .unwrap();
    let due = store.due_schedules(10_000, 10).await.unwrap();
    assert_eq!(due, vec![entry("nightly", "0 3 * * *", 1000)]);
    assert!(store.due_schedules(999, 10).await.unwrap().is_empty());
    // Two brokers move the same run on: one wins.
    assert!(store.advance_schedule(&due[0], 1000, 2000).await.unwrap());
    assert!(!store.advance_schedule(&due[0], 1000, 2000).await.unwrap());
    assert_eq!(store.due_schedules(1999, 10).await.unwrap(), vec![]);
    assert_eq!(
        store.due_schedules(2000, 10).await.unwrap()[0].next_run_ms,
        2000
    );
}

async fn open_error(url: &str) -> String {
    match open(Some(url), std::path::Path::new("/nonexistent")).await {
        Ok(_) => panic!("{url} opened"),
        Err(err) => format!("{err:#}"),
    }
}

#[tokio::test]
async fn a_database_that_cannot_be_opened_is_named_without_its_password() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let unreachable = open_error(&format!(
        "postgres://testbot:hunter2@127.0.0.1:{port}/queue"
    ))
    .await;
    let named =
        format!("Cannot connect to PostgreSQL at postgres://testbot@127.0.0.1:{port}/queue: ");
    assert!(unreachable.starts_with(&named), "{unreachable}");
    let invalid = open_error("postgresql://testbot:hunter2@[::1]:99999/queue").await;
    assert!(invalid.contains("not a valid PostgreSQL URL"), "{invalid}");
    let other = open_error("mysql://root:hunter2@db.example/jobs?x=1").await;
    assert!(
        other.contains("\"mysql://root:***@db.example/jobs?x=1\""),
        "{other}"
    );
    for message in [unreachable, invalid, other] {
        assert!(!message.contains("hunter2"), "{message}");
    }
}
