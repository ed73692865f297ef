//! What only a database shared by several brokers must do: each test opens two or more stores
//! (brokers) on one PostgreSQL database and has them race.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// How long a store waits for another's lock to be released before a test fails.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A test database and `count` stores on it.
async fn brokers(count: usize) -> (TestDatabase, Vec<SharedStore>) {
    let database = TestDatabase::create().await;
    let mut stores = Vec::new();
    for _ in 0..count {
        stores.push(database.open().await);
    }
    (database, stores)
}

async fn close(stores: Vec<SharedStore>) {
    for store in stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_starting_at_once_migrate_the_database_once() {
    let database = TestDatabase::create().await;
    let opened =
        futures_util::future::join_all((0..6).map(|_| open(Some(&database.0.url), "/".as_ref())))
            .await;
    let stores: Vec<SharedStore> = opened
        .into_iter()
        .map(|store| store.expect("every broker opens the database"))
        .collect();
    for store in &stores {
        store.health().await.unwrap();
    }
    close(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_claiming_at_once_take_every_job_once() {
    const JOBS: usize = 200;
    const TASKS_PER_BROKER: usize = 8;
    let (_database, stores) = brokers(2).await;
    for _ in 0..JOBS {
        queue(&*stores[0], &[]).await;
    }
    let mut tasks = Vec::new();
    for (b, store) in stores.iter().enumerate() {
        for t in 0..TASKS_PER_BROKER {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let agent = format!("s/b{b}-t{t}");
                let any = offer("s", &[]);
                let mut claimed = Vec::new();
                while let Some(job) = claim(&*store, &agent, &any, &agent).await {
                    assert_eq!(job.agent.as_deref(), Some(agent.as_str()));
                    claimed.push(job.id);
                }
                claimed
            }));
        }
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let distinct: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "a job was claimed twice");
    assert_eq!(all.len(), JOBS, "every job is claimed");
    assert!(stores[1].queued_jobs(0, 10).await.unwrap().is_empty());
    close(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_cap_holds_across_brokers_claiming_at_once() {
    const JOBS: usize = 40;
    let (_database, stores) = brokers(2).await;
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
    let workflow = JobOrigin {
        repository: Some("lab/solver".into()),
        ..operator()
    };
    for _ in 0..JOBS {
        stores[0]
            .insert_job(&spec(&[]), &workflow, None)
            .await
            .unwrap()
            .unwrap();
    }
    let busy = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for (b, store) in stores.iter().enumerate() {
        for t in 0..4 {
            let (store, limited) = (store.clone(), limited.clone());
            let (busy, finished) = (busy.clone(), finished.clone());
            tasks.push(tokio::spawn(async move {
                let agent = format!("s/b{b}-t{t}");
                while finished.load(Ordering::SeqCst) < JOBS {
                    let Some(job) = claim(&*store, &agent, &limited, &agent).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let others = busy.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(others, 0, "two jobs of a site capped at one ran at once");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                    store
                        .finish_job(job.job_id(), &agent, &Outcome::succeeded())
                        .await
                        .unwrap()
                        .unwrap();
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the jobs are done within a minute")
            .unwrap();
    }
    let by_state = stores[1].jobs_by_state().await.unwrap();
    assert_eq!(by_state, vec![(JobState::Succeeded, JOBS as u64)]);
    close(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_sweeps_and_another_takes_over_when_it_stops() {
    let (_database, mut stores) = brokers(2).await;
    let (first, second) = (stores.remove(0), stores.remove(0));
    assert!(first.lead_sweeper().await.unwrap());
    assert!(!second.lead_sweeper().await.unwrap());
    // It keeps the role while it runs.
    assert!(first.lead_sweeper().await.unwrap());
    assert!(!second.lead_sweeper().await.unwrap());
    first.close().await;
    assert!(matches!(
        first.lead_sweeper().await,
        Err(StoreError::Unavailable(_))
    ));
    let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
    while !second.lead_sweeper().await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second broker did not take over the sweeper within {TAKEOVER_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(second.lead_sweeper().await.unwrap());
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_sent_to_two_brokers_at_once_is_stored_once() {
    let (_database, stores) = brokers(2).await;
    let id = queue(&*stores[0], &[]).await.job_id();
    claim(&*stores[0], "s/a", &offer("s", &[]), "l")
        .await
        .unwrap();
    let mut offset = 0u64;
    for i in 0..20 {
        let chunk = format!("line {i}\n");
        let sends = stores.iter().flat_map(|store| {
            let chunk = chunk.clone();
            (0..4).map(move |_| {
                let (store, chunk) = (store.clone(), chunk.clone());
                tokio::spawn(async move {
                    store
                        .append_log(id, "l", offset, chunk.as_bytes(), 1 << 20, &|k| {
                            transitions::log_cut(1 << 20, k, 0)
                        })
                        .await
                        .unwrap()
                })
            })
        });
        let results = futures_util::future::join_all(sends.collect::<Vec<_>>()).await;
        offset += chunk.len() as u64;
        for result in results {
            assert_eq!(result.unwrap(), AppendResult::Appended(offset));
        }
    }
    let want: String = (0..20).map(|i| format!("line {i}\n")).collect();
    assert_eq!(log_of(&*stores[1], id).await, want);
    close(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_enrolls_as_many_agents_as_it_has_uses_across_brokers() {
    let (_database, stores) = brokers(2).await;
    stores[0].create_site("hpc").await.unwrap();
    stores[0]
        .create_enrollment_token("t", "hpc", 3, later())
        .await
        .unwrap();
    let attempts = (0..12).map(|i| {
        let store = stores[i % 2].clone();
        tokio::spawn(async move {
            store
                .enroll_agent(
                    "t",
                    &format!("id-{i}"),
                    &format!("agent-{i}"),
                    format!("key-{i}").as_bytes(),
                    None,
                )
                .await
                .unwrap()
        })
    });
    let results = futures_util::future::join_all(attempts.collect::<Vec<_>>()).await;
    let enrolled = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(enrolled, 3);
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(Ok(_)) | Ok(Err(EnrollRefusal::UsedUp))))
    );
    assert_eq!(stores[1].agents().await.unwrap().len(), 3);
    close(stores).await;
}
