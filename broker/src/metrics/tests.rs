use std::collections::{BTreeMap, HashSet};

use testbot_proto::jobs::JobSpec;

use super::*;
use crate::lifecycle::events::EventBus;

/// The value of the sample `name` whose labels include `labels`, from an exposition.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let found: BTreeMap<&str, &str> = series_labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k, v.trim_matches('"')))
                })
                .collect();
            (series_name == name && labels.iter().all(|(k, v)| found.get(k) == Some(v)))
                .then(|| value.parse().ok())?
        })
}

fn event(id: i64, at_ms: i64, change: JobChange) -> JobEvent {
    JobEvent {
        id: JobId(id),
        change,
        at_ms,
        remote: false,
    }
}

fn queued() -> JobChange {
    JobChange::Queued {
        job: Arc::new(routed(&[], None)),
        again: false,
    }
}

fn routed(labels: &[&str], sites: Option<&[&str]>) -> RoutedJob {
    RoutedJob {
        spec: JobSpec {
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..JobSpec::default()
        },
        sites: sites.map(|s| s.iter().map(|s| s.to_string()).collect()),
        identity: None,
        app_event: None,
    }
}

fn render(metrics: &Metrics) -> String {
    metrics.render(&Scrape {
        database: None,
        waiting_polls: 0,
        backend: "sqlite",
        now_ms: 0,
    })
}

#[test]
fn buckets_rise_and_span_their_ranges() {
    for (buckets, lowest, highest) in [
        (&DISPATCH_LATENCY_BUCKETS[..], 0.005, 3600.0),
        (&JOB_DURATION_BUCKETS[..], 0.1, 8.0 * 3600.0),
        (&HTTP_DURATION_BUCKETS[..], 0.001, 60.0),
    ] {
        assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
        assert!(buckets[0] <= lowest, "{buckets:?}");
        assert!(*buckets.last().unwrap() >= highest, "{buckets:?}");
    }
}

#[test]
fn an_observation_lands_in_the_first_bucket_that_holds_it() {
    let metrics = Metrics::new(None).unwrap();
    let mut clock = JobClock::new(100);
    clock.record(&event(1, 1_000, queued()), &metrics.events);
    clock.record(
        &event(
            1,
            1_300,
            JobChange::Assigned {
                agent: "s/a".into(),
            },
        ),
        &metrics.events,
    );
    let text = render(&metrics);
    let bucket = |le: &str| {
        sample(
            &text,
            "testbot_dispatch_latency_seconds_bucket",
            &[("le", le)],
        )
    };
    assert_eq!(bucket("0.25"), Some(0.0), "{text}");
    assert_eq!(bucket("0.5"), Some(1.0), "{text}");
    assert_eq!(bucket("+Inf"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "testbot_dispatch_latency_seconds_sum", &[]),
        Some(0.3)
    );
}

#[test]
fn the_method_label_names_standard_methods_only() {
    assert_eq!(method_label(&Method::GET), "GET");
    assert_eq!(method_label(&Method::DELETE), "DELETE");
    assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
}

#[test]
fn a_queued_job_counts_for_its_site_label_its_one_allowed_site_or_any() {
    let sites: Vec<SiteModel> = ["hpc", "lab", "idle"]
        .iter()
        .map(|name| SiteModel {
            name: name.to_string(),
            created_at_ms: 0,
            revoked_at_ms: None,
        })
        .collect();
    let jobs = [
        routed(&["gpu", "site:hpc"], None),
        routed(&["site:hpc"], Some(&["hpc", "lab"])),
        routed(&[], Some(&["lab"])),
        routed(&[], Some(&["hpc", "lab"])),
        routed(&["gpu"], None),
        routed(&["site:nowhere"], None),
        routed(&[], Some(&["gone"])),
    ];
    let depth = queue_depth(&sites, &jobs);
    let want: BTreeMap<String, u64> = [
        ("any", 2),
        ("hpc", 2),
        ("idle", 0),
        ("lab", 1),
        ("unknown", 2),
    ]
    .iter()
    .map(|(site, n)| (site.to_string(), *n))
    .collect();
    assert_eq!(depth, want);
}

#[test]
fn agents_are_online_when_seen_lately_or_busy_else_offline_or_revoked() {
    let now = 10_000_000;
    let agent =
        |name: &str, last_seen: Option<i64>, revoked: bool, site_revoked: bool| AgentModel {
            id: name.into(),
            site: "s".into(),
            name: name.into(),
            public_key: vec![],
            policy: None,
            enrolled_at_ms: 0,
            last_seen_ms: last_seen,
            revoked_at_ms: revoked.then_some(1),
            site_revoked_at_ms: site_revoked.then_some(1),
        };
    let stale = now - AGENT_ONLINE_WINDOW.as_millis() as i64 - 1;
    let agents = [
        agent("polling", Some(now - 1_000), false, false),
        agent("busy", Some(stale), false, false),
        agent("quiet", Some(stale), false, false),
        agent("never-polled", None, false, false),
        agent("revoked", Some(now), true, false),
        agent("of-revoked-site", Some(now), false, true),
    ];
    let busy: HashSet<String> = ["s/busy".to_string()].into();
    assert_eq!(
        agent_counts(&agents, &busy, now),
        AgentCounts {
            online: 2,
            offline: 2,
            revoked: 2,
        }
    );
}

#[test]
fn tracked_jobs_forget_the_older_half_when_full() {
    let mut tracked = TrackedJobs::new(10);
    for id in 0..10 {
        tracked.insert(JobId(id), id, ());
    }
    assert_eq!(tracked.len(), 10);
    // Updating a tracked job does not evict.
    tracked.insert(JobId(9), 9, ());
    assert_eq!(tracked.len(), 10);
    tracked.insert(JobId(10), 10, ());
    assert_eq!(tracked.len(), 6);
    assert!(tracked.get(JobId(4)).is_none());
    assert!((5..=10).all(|id| tracked.get(JobId(id)).is_some()));
}

#[test]
fn log_bytes_count_growth_once_and_forget_a_finished_job() {
    let metrics = Metrics::new(None).unwrap();
    let mut clock = JobClock::new(100);
    for (id, log_bytes) in [(1, 100), (2, 50), (1, 250), (1, 250), (2, 80)] {
        clock.record(
            &event(id, 0, JobChange::LogAppended { log_bytes }),
            &metrics.events,
        );
    }
    assert_eq!(metrics.events.log_bytes.get(), 330);
    clock.record(
        &event(
            1,
            0,
            JobChange::Finished {
                state: JobState::Succeeded,
            },
        ),
        &metrics.events,
    );
    assert!(clock.log_bytes.get(JobId(1)).is_none());
    assert_eq!(clock.log_bytes.len(), 1);
}

#[tokio::test]
async fn the_event_task_measures_dispatch_and_duration_from_the_bus() {
    let metrics = Arc::new(Metrics::new(None).unwrap());
    let bus = EventBus::new(vec![]);
    let task = tokio::spawn(record_job_events(
        metrics.clone(),
        bus.subscribe(),
        CancellationToken::new(),
    ));
    let assigned = || JobChange::Assigned {
        agent: "s/a".into(),
    };
    // Job 1 runs and fails; job 2 loses its lease, is queued again and succeeds; job 3 is
    // cancelled before it starts.
    for (id, change) in [
        (1, queued()),
        (2, queued()),
        (3, queued()),
        (1, assigned()),
        (1, JobChange::Started),
        (1, JobChange::LogAppended { log_bytes: 40 }),
        (
            1,
            JobChange::Finished {
                state: JobState::Failed,
            },
        ),
        (2, assigned()),
        (2, JobChange::Started),
        (2, queued()),
        (2, assigned()),
        (2, JobChange::Started),
        (
            2,
            JobChange::Finished {
                state: JobState::Succeeded,
            },
        ),
        (
            3,
            JobChange::Finished {
                state: JobState::Cancelled,
            },
        ),
    ] {
        bus.publish(JobId(id), change);
    }
    // The stream closes with the bus; the task reads what was published, then ends.
    drop(bus);
    task.await.unwrap();

    let text = render(&metrics);
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(
        value("testbot_dispatch_latency_seconds_count", &[]),
        Some(3.0),
        "{text}"
    );
    for (state, count) in [
        ("failed", Some(1.0)),
        ("succeeded", Some(1.0)),
        ("cancelled", None),
    ] {
        assert_eq!(
            value("testbot_job_duration_seconds_count", &[("state", state)]),
            count,
            "{state}: {text}"
        );
    }
    assert_eq!(value("testbot_log_bytes_ingested_total", &[]), Some(40.0));
    assert_eq!(value("testbot_events_missed_total", &[]), Some(0.0));
}

#[tokio::test]
async fn an_event_task_that_falls_behind_counts_what_it_missed_and_goes_on() {
    let metrics = Arc::new(Metrics::new(None).unwrap());
    let bus = EventBus::new(vec![]);
    let events = bus.subscribe();
    // More than the stream keeps, before the task reads any.
    for id in 0..5_000 {
        bus.publish(JobId(id), JobChange::LogAppended { log_bytes: 1 });
    }
    let task = tokio::spawn(record_job_events(
        metrics.clone(),
        events,
        CancellationToken::new(),
    ));
    drop(bus);
    task.await.unwrap();
    let missed = metrics.events.events_missed.get();
    assert!(missed > 0, "nothing missed");
    assert_eq!(missed + metrics.events.log_bytes.get(), 5_000);
}

#[tokio::test]
async fn the_event_task_ends_at_shutdown() {
    let metrics = Arc::new(Metrics::new(None).unwrap());
    let bus = EventBus::new(vec![]);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(record_job_events(
        metrics,
        bus.subscribe(),
        shutdown.clone(),
    ));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the task ends")
        .unwrap();
}

#[test]
fn the_exposition_has_every_family_with_help_and_the_database_counts() {
    let metrics = Metrics::new(None).unwrap();
    metrics.observe_http(
        "/api/v1/jobs".into(),
        &Method::POST,
        StatusCode::CREATED,
        Duration::from_millis(3),
    );
    // A family with no samples yet (no job has finished) is left out of the exposition.
    let mut clock = JobClock::new(10);
    for change in [
        JobChange::Started,
        JobChange::Finished {
            state: JobState::Failed,
        },
    ] {
        clock.record(&event(1, 0, change), &metrics.events);
    }
    let now = 100_000;
    let text = metrics.render(&Scrape {
        database: Some(DatabaseCounts {
            jobs_by_state: vec![(JobState::Queued, 3), (JobState::Failed, 1)],
            queue_depth: [("any".to_string(), 2), ("hpc".to_string(), 1)].into(),
            oldest_queued_at_ms: Some(now - 2_500),
            agents: AgentCounts {
                online: 1,
                offline: 2,
                revoked: 0,
            },
        }),
        waiting_polls: 4,
        backend: "sqlite",
        now_ms: now,
    });
    for family in [
        "testbot_database_up",
        "testbot_jobs",
        "testbot_queue_depth",
        "testbot_oldest_queued_seconds",
        "testbot_agents",
        "testbot_agents_connected",
        "testbot_dispatch_latency_seconds",
        "testbot_job_duration_seconds",
        "testbot_log_bytes_ingested_total",
        "testbot_events_missed_total",
        "testbot_http_requests_total",
        "testbot_http_request_duration_seconds",
        "testbot_build_info",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no TYPE for {family}:\n{text}"
        );
    }
    let value = |name: &str, labels: &[(&str, &str)]| sample(&text, name, labels);
    assert_eq!(value("testbot_database_up", &[]), Some(1.0));
    assert_eq!(value("testbot_jobs", &[("state", "queued")]), Some(3.0));
    assert_eq!(value("testbot_jobs", &[("state", "failed")]), Some(1.0));
    assert_eq!(value("testbot_jobs", &[("state", "running")]), Some(0.0));
    assert_eq!(value("testbot_queue_depth", &[("site", "hpc")]), Some(1.0));
    assert_eq!(value("testbot_oldest_queued_seconds", &[]), Some(2.5));
    assert_eq!(value("testbot_agents", &[("state", "offline")]), Some(2.0));
    assert_eq!(value("testbot_agents_connected", &[]), Some(4.0));
    assert_eq!(
        value(
            "testbot_http_requests_total",
            &[
                ("route", "/api/v1/jobs"),
                ("method", "POST"),
                ("status", "201")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "testbot_http_request_duration_seconds_count",
            &[("route", "/api/v1/jobs")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            "testbot_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("backend", "sqlite")
            ]
        ),
        Some(1.0)
    );
}

#[test]
fn without_the_database_the_process_metrics_are_still_served() {
    let text = render(&Metrics::new(None).unwrap());
    assert_eq!(sample(&text, "testbot_database_up", &[]), Some(0.0));
    assert!(!text.contains("testbot_jobs"), "{text}");
    assert!(
        text.contains("# TYPE testbot_dispatch_latency_seconds histogram"),
        "{text}"
    );
    assert!(
        !text.contains(".."),
        "the library ends each HELP with a period: {text}"
    );
}

#[test]
fn a_metrics_token_is_required_when_configured() {
    let bearing = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    };
    let open = Metrics::new(None).unwrap();
    assert!(open.authorize(&HeaderMap::new()).is_ok());

    let guarded = Metrics::new(Some(&SecretString::from("s3cret-metrics"))).unwrap();
    assert!(guarded.authorize(&bearing("Bearer s3cret-metrics")).is_ok());
    for refused in [
        HeaderMap::new(),
        bearing("Bearer s3cret-metric"),
        bearing("Bearer s3cret-metrics2"),
        bearing("Basic s3cret-metrics"),
        bearing("s3cret-metrics"),
    ] {
        let err = guarded.authorize(&refused).unwrap_err();
        assert!(matches!(err, ApiError::Unauthorized(_)), "{err:?}");
    }
    // A token read from a file with its newline is the same token.
    let from_file = Metrics::new(Some(&SecretString::from("s3cret-metrics\n"))).unwrap();
    assert!(
        from_file
            .authorize(&bearing("Bearer s3cret-metrics"))
            .is_ok()
    );
}
