//! Monitoring: `/metrics` shows what a real fleet did (jobs by state, dispatch latency, job
//! durations, log bytes, requests by route template), `/healthz` and `/readyz` answer, `/readyz`
//! turns 503 when the database was migrated past the broker, and `--metrics-token` guards
//! `/metrics`.

use std::collections::BTreeMap;
use std::time::Duration;

use testbot_e2e::{Fleet, Process, WAIT, free_port, wait_for};
use testbot_proto::jobs::{JobSpec, JobState};

/// One sample of an exposition: its labels and value.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of the Prometheus text format, by series name; panics on a malformed line.
fn parse_exposition(text: &str) -> BTreeMap<String, Vec<Sample>> {
    let mut samples: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            value => value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let rest = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                // Label values here hold no commas or quotes (route templates, states, sites).
                let labels = rest
                    .split(',')
                    .map(|pair| {
                        let (key, value) = pair
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label: {line:?}"));
                        (key.to_string(), value.trim_matches('"').to_string())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, BTreeMap::new()),
        };
        samples
            .entry(name.to_string())
            .or_default()
            .push(Sample { labels, value });
    }
    samples
}

/// A scrape, parsed.
struct Exposition(BTreeMap<String, Vec<Sample>>);

impl Exposition {
    /// The value of the series `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.get(name)?.iter().find_map(|sample| {
            labels
                .iter()
                .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(v))
                .then_some(sample.value)
        })
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    /// Every value the label `label` of series `name` takes.
    fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        self.0
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|sample| sample.labels.get(label).cloned())
            .collect()
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> Exposition {
    let response = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    Exposition(parse_exposition(&response.text().await.unwrap()))
}

/// A plain HTTP client for the routes outside the API (`/metrics`, `/healthz`, `/readyz`).
fn http_client() -> reqwest::Client {
    testbot_proto::client::install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

/// Status and body of `GET url/path`.
async fn get(http: &reqwest::Client, url: &str, path: &str) -> (u16, String) {
    let response = http.get(format!("{url}{path}")).send().await.expect(path);
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_show_what_the_fleet_did() {
    let mut fleet = Fleet::start().await;
    fleet.add_agent(fleet.agent_config("gauged"));
    let http = http_client();
    let client = fleet.client();
    let passing = client
        .submit(&JobSpec {
            script: "echo all good".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let failing = client
        .submit(&JobSpec {
            script: "echo about to fail; exit 3".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        fleet.wait_finished(passing.id).await.state,
        JobState::Succeeded
    );
    assert_eq!(
        fleet.wait_finished(failing.id).await.state,
        JobState::Failed
    );
    let (status, _) = get(&http, &fleet.url, "/api/v1/no-such-thing/17").await;
    assert_eq!(status, 404);

    // The event task records the results a moment after they are answered.
    let metrics = wait_for("both jobs' durations to be recorded", WAIT, || async {
        let metrics = scrape(&http, &fleet.url).await;
        let durations: f64 = ["succeeded", "failed"]
            .iter()
            .filter_map(|state| {
                metrics.get("testbot_job_duration_seconds_count", &[("state", state)])
            })
            .sum();
        (durations >= 2.0).then_some(metrics)
    })
    .await;
    assert_eq!(metrics.value("testbot_database_up", &[]), 1.0);
    for (state, count) in [
        ("succeeded", 1.0),
        ("failed", 1.0),
        ("queued", 0.0),
        ("running", 0.0),
        ("error", 0.0),
    ] {
        assert_eq!(
            metrics.value("testbot_jobs", &[("state", state)]),
            count,
            "jobs {state}"
        );
    }
    assert_eq!(
        metrics.value("testbot_queue_depth", &[("site", "any")]),
        0.0
    );
    assert_eq!(
        metrics.value("testbot_queue_depth", &[("site", testbot_e2e::TEST_SITE)]),
        0.0
    );
    assert_eq!(metrics.value("testbot_oldest_queued_seconds", &[]), 0.0);
    assert!(metrics.value("testbot_dispatch_latency_seconds_count", &[]) >= 2.0);
    assert_eq!(
        metrics.value("testbot_dispatch_latency_seconds_bucket", &[("le", "+Inf")]),
        metrics.value("testbot_dispatch_latency_seconds_count", &[])
    );
    assert!(metrics.value("testbot_log_bytes_ingested_total", &[]) > 0.0);
    assert_eq!(metrics.value("testbot_events_missed_total", &[]), 0.0);
    assert_eq!(metrics.value("testbot_agents", &[("state", "online")]), 1.0);
    assert_eq!(
        metrics.value("testbot_agents", &[("state", "revoked")]),
        0.0
    );
    assert_eq!(
        metrics.value(
            "testbot_build_info",
            &[
                ("version", env!("CARGO_PKG_VERSION")),
                ("backend", "sqlite")
            ]
        ),
        1.0
    );

    // Requests are counted by route template, never by raw path.
    assert_eq!(
        metrics.value(
            "testbot_http_requests_total",
            &[
                ("route", "/api/v1/jobs"),
                ("method", "POST"),
                ("status", "201")
            ]
        ),
        2.0
    );
    assert!(
        metrics.value(
            "testbot_http_requests_total",
            &[("route", "/api/v1/jobs/{id}"), ("method", "GET")]
        ) >= 2.0
    );
    assert!(
        metrics.value(
            "testbot_http_requests_total",
            &[("route", "/api/v1/agent/poll"), ("method", "POST")]
        ) >= 2.0
    );
    assert_eq!(
        metrics.value(
            "testbot_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    let routes = metrics.label_values("testbot_http_requests_total", "route");
    for route in &routes {
        assert!(
            route == "unmatched" || !route.split('/').any(|s| s.parse::<u64>().is_ok()),
            "a raw path became a label: {route} (all: {routes:?})"
        );
    }
    assert!(
        metrics.value(
            "testbot_http_request_duration_seconds_count",
            &[("route", "/api/v1/jobs")]
        ) >= 2.0
    );

    // The idle agent waits in a poll.
    wait_for("the agent's poll to wait", WAIT, || async {
        let metrics = scrape(&http, &fleet.url).await;
        (metrics.value("testbot_agents_connected", &[]) >= 1.0).then_some(())
    })
    .await;

    assert_eq!(get(&http, &fleet.url, "/healthz").await, (200, "ok".into()));
    assert_eq!(get(&http, &fleet.url, "/readyz").await, (200, "ok".into()));
    // The clients' health route is still there.
    client.health().await.unwrap();
    fleet.stop().await;
}

/// A newer broker sharing the database applied a migration this one does not know: this one
/// keeps running (and `/healthz` says so) but is no longer ready. sqlx refuses to start on
/// such a database, so the migration is applied while the broker runs, as a rolling upgrade
/// would.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_behind_its_database_schema_is_not_ready() {
    let mut fleet = Fleet::start().await;
    let http = http_client();
    assert_eq!(get(&http, &fleet.url, "/readyz").await.0, 200);

    let db_path = fleet.dir.path().join("broker").join("testbot.db");
    let newest = {
        use sqlx::Connection as _;
        let mut db = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db_path.display()))
            .await
            .unwrap();
        let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&mut db)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (?1, 'from a newer broker', 1, x'00', 0)",
        )
        .bind(newest + 1)
        .execute(&mut db)
        .await
        .unwrap();
        db.close().await.unwrap();
        newest
    };

    let (status, body) = get(&http, &fleet.url, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert_eq!(
        body["error"]["message"],
        format!(
            "the broker is not ready: the database schema is at migration {} but this broker \
             expects {newest}",
            newest + 1
        )
    );
    assert_eq!(get(&http, &fleet.url, "/healthz").await, (200, "ok".into()));

    // Started again on that database, the broker refuses to run at all.
    let broker = fleet.broker.take().expect("broker running");
    broker.shutdown().await.unwrap();
    let config = testbot_broker::BrokerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        fleet.dir.path().join("broker"),
    );
    let err = testbot_broker::Broker::start(config)
        .await
        .err()
        .expect("a broker behind its database does not start");
    assert!(
        format!("{err:#}").contains("Cannot migrate database"),
        "{err:#}"
    );
    fleet.stop().await;
}

/// `--metrics-token` (here from `TESTBOT_METRICS_TOKEN`) guards `/metrics` of the real binary;
/// the probes stay open.
#[tokio::test(flavor = "multi_thread")]
async fn the_metrics_token_guards_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let token = "metrics-token-for-the-test";
    let mut broker = Process::spawn(
        "testbot-broker",
        &[
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.path().join("broker").to_str().unwrap(),
        ],
        &[("TESTBOT_METRICS_TOKEN", token)],
        dir.path(),
    )
    .expect("broker process");
    let http = http_client();
    wait_for("the broker to answer", WAIT, || async {
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    assert_eq!(get(&http, &url, "/readyz").await.0, 200);

    for presented in [None, Some("wrong"), Some("metrics-token-for-the-tes")] {
        let mut request = http.get(format!("{url}/metrics"));
        if let Some(presented) = presented {
            request = request.bearer_auth(presented);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{presented:?}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    }
    let response = http
        .get(format!("{url}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let metrics = Exposition(parse_exposition(&response.text().await.unwrap()));
    assert_eq!(metrics.value("testbot_database_up", &[]), 1.0);
    assert_eq!(
        metrics.value(
            "testbot_http_requests_total",
            &[("route", "/metrics"), ("status", "401")]
        ),
        3.0
    );

    broker.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(broker.wait(WAIT).await.success());
}
