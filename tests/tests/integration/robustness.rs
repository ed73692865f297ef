//! Clients that hold the broker's resources: a request trickled in byte by byte, crowds of
//! log followers on one job, floods of idle connections, and headers sent a byte at a time.

use std::time::Duration;

use secrecy::ExposeSecret as _;
use testbot_e2e::{Fleet, Process, WAIT, free_port, refusal, wait_for};
use testbot_proto::jobs::JobSpec;
use testbot_proto::jobs::JobState;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread")]
async fn a_request_trickled_in_is_cut_off_with_408() {
    let fleet = Fleet::start_with(|config| {
        config.settings.request_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = fleet.url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/jobs HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"scr",
        fleet.admin_token.expose_secret()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The rest of the body never comes; the broker must answer anyway.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || String::from_utf8_lossy(&answer).contains("request_timeout") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the broker held the trickled request open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(
            r#""message":"the request was not received and answered within 1s (--request-timeout)""#
        ),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_followers_of_one_job_are_bounded() {
    let fleet = Fleet::start_with(|config| config.settings.max_log_followers = 2).await;
    let client = fleet.client();
    // No agent: the job stays queued and its followers stay connected.
    let job = client
        .submit(&JobSpec {
            script: "true".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let first = client.log_stream(job.id, 0, true).await.unwrap();
    let _second = client.log_stream(job.id, 0, true).await.unwrap();
    let (status, message) = refusal(client.log_stream(job.id, 0, true).await.map(|_| ()));
    assert_eq!(
        (status, message),
        (
            429,
            format!(
                "job {} already has 2 clients following its log, the most this broker allows \
                 (--max-log-followers 2); read it without follow, or try again later",
                job.id
            )
        )
    );
    // Reading without follow is not limited, and a follower that leaves frees its place.
    drop(client.log_stream(job.id, 0, false).await.unwrap());
    drop(first);
    testbot_e2e::wait_for(
        "the follower's place to be freed",
        testbot_e2e::WAIT,
        || async { client.log_stream(job.id, 0, true).await.ok().map(|_| ()) },
    )
    .await;
}

/// Reads from `tcp` until the broker closes it; returns whatever it sent, or `None` if the
/// connection is still open after `limit`.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| String::from_utf8_lossy(&answer).into_owned())
}

/// Sends `GET /api/v1/health` on a fresh connection; returns the whole answer.
async fn raw_health(addr: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET /api/v1/health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    read_until_closed(&mut tcp, Duration::from_secs(10))
        .await
        .expect("the broker answers and closes")
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_past_the_limit_are_refused_and_the_fleet_keeps_working() {
    const LIMIT: usize = 8;
    const EXTRA: usize = 8;
    let mut fleet = Fleet::start_with(|config| {
        config.settings.max_connections = LIMIT;
        config.settings.header_read_timeout = Duration::from_secs(4);
        // Shorter than the job, so it only succeeds if heartbeats get through the flood.
        config.settings.lease_ttl = Duration::from_secs(3);
        config.settings.heartbeat_interval = Duration::from_secs(1);
    })
    .await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    fleet.add_agent(fleet.agent_config("steady"));
    let job = fleet.submit("echo start; sleep 8; echo end").await;
    wait_for("the job to start", WAIT, || async {
        fleet.log(job.id).await.contains(" O start\n").then_some(())
    })
    .await;

    // A flood of connections that never send a byte.
    let mut flood = Vec::new();
    for _ in 0..LIMIT + EXTRA {
        flood.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    // A client connecting now is told to come back, in the API's error shape.
    let answer = raw_health(&addr).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(
        answer.contains(&format!(
            r#""message":"the broker is serving {LIMIT} connections, the most it allows (--max-connections {LIMIT}); try again in a moment""#
        )),
        "{answer}"
    );
    // The connections past the limit are closed at once; at most LIMIT stay open.
    let mut held = Vec::new();
    for mut tcp in flood {
        if read_until_closed(&mut tcp, Duration::from_secs(2))
            .await
            .is_none()
        {
            held.push(tcp);
        }
    }
    assert!(
        held.len() <= LIMIT,
        "{} idle connections held open, more than --max-connections {LIMIT}",
        held.len()
    );
    // Idle connections it does hold are closed after --header-read-timeout.
    for tcp in &mut held {
        assert!(
            read_until_closed(tcp, Duration::from_secs(10))
                .await
                .is_some(),
            "an idle connection was held past --header-read-timeout"
        );
    }
    // The agent kept its lease through the flood and the job ran to its end.
    let done = fleet.wait_finished(job.id).await;
    let log = fleet.log(job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        done.attempts, 1,
        "the lease was lost during the flood: {log}"
    );
    assert!(log.contains(" O end\n"), "{log}");
    assert!(raw_health(&addr).await.starts_with("HTTP/1.1 200"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_trickling_its_headers_is_disconnected() {
    let fleet = Fleet::start_with(|config| {
        config.settings.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(format!("GET /api/v1/health HTTP/1.1\r\nhost: {addr}\r\nx-slow: ").as_bytes())
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // Meanwhile other clients are served as usual.
    fleet.client().health().await.unwrap();
    // One more header byte every 100 ms, for at most 10 s, until the broker hangs up.
    let mut cut_off = None;
    for _ in 0..100 {
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), tcp.read(&mut buf)).await {
            // Still open: trickle on.
            Err(_) => {
                if tcp.write_all(b"a").await.is_err() {
                    cut_off = Some(started.elapsed());
                    break;
                }
            }
            // An answer (408) or the close.
            Ok(_) => {
                cut_off = Some(started.elapsed());
                break;
            }
        }
    }
    let cut_off = cut_off.expect("the broker held a client trickling its headers for 10s");
    assert!(
        cut_off < Duration::from_secs(5),
        "the broker cut off the trickling client only after {cut_off:?}"
    );
    assert!(raw_health(&addr).await.starts_with("HTTP/1.1 200"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_request_do_not_hold_up_shutdown() {
    // The default --header-read-timeout (30s): shutdown must not wait for it.
    let fleet = Fleet::start().await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    let silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut trickling = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickling
        .write_all(format!("GET /api/v1/health HTTP/1.1\r\nhost: {addr}\r\n").as_bytes())
        .await
        .unwrap();
    // A kept-alive connection that has been answered once, and one with a request in progress.
    let client = fleet.client();
    client.health().await.unwrap();
    let job = fleet.submit("true").await;
    let follower = client.log_stream(job.id, 0, true).await.unwrap();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), fleet.stop())
        .await
        .expect("the broker waited for connections that never sent a request");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop((silent, trickling, follower));
}

#[tokio::test(flavor = "multi_thread")]
async fn request_headers_are_bounded_in_size() {
    let fleet = Fleet::start().await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // 100 KiB of headers: each connection may make the broker buffer only so much.
    let mut head = format!("GET /api/v1/health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for i in 0..50 {
        head.push_str(&format!("x-filler-{i}: {}\r\n", "a".repeat(2048)));
    }
    head.push_str("\r\n");
    let _ = tcp.write_all(head.as_bytes()).await;
    let answer = read_until_closed(&mut tcp, Duration::from_secs(10))
        .await
        .expect("the broker answers and closes");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(raw_health(&addr).await.starts_with("HTTP/1.1 200"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_binary_bounds_connections_by_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    // A header bound too short for real clients is refused, saying what would go wrong.
    let mut refused = Process::spawn(
        "testbot-broker",
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            dir.path().join("refused").to_str().unwrap(),
            "--header-read-timeout",
            "500ms",
        ],
        &[],
        dir.path(),
    )
    .unwrap();
    assert!(!refused.wait(WAIT).await.success());
    let stderr = std::fs::read_to_string(dir.path().join(format!("{}.err", refused.name))).unwrap();
    assert!(
        stderr.contains(
            "--header-read-timeout must be at least 1s, or clients on slow links cannot send \
             their requests"
        ),
        "{stderr}"
    );

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _broker = Process::spawn(
        "testbot-broker",
        &[
            "--listen",
            &addr,
            "--data-dir",
            dir.path().join("broker").to_str().unwrap(),
            "--max-connections",
            "2",
            "--header-read-timeout",
            "1s",
        ],
        &[],
        dir.path(),
    )
    .unwrap();
    wait_for("the broker to answer", WAIT, || async {
        tokio::net::TcpStream::connect(&addr).await.ok()?;
        Some(())
    })
    .await;
    // Two idle connections take both places, and a client gets 503. The probe connections
    // above hold a place until the broker sees them close, so an idle connection may find every
    // place taken and not get one: then try again with fresh ones, a bounded number of times.
    let mut answers = Vec::new();
    let mut _idle = Vec::new();
    for _ in 0..10 {
        _idle = vec![
            tokio::net::TcpStream::connect(&addr).await.unwrap(),
            tokio::net::TcpStream::connect(&addr).await.unwrap(),
        ];
        let answer = raw_health(&addr).await;
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("(--max-connections 2)"), "{answer}");
            break;
        }
        answers.push(answer);
    }
    assert!(
        answers.len() < 10,
        "two idle connections never filled --max-connections 2: {answers:?}"
    );
    // The idle connections are closed after --header-read-timeout, and their places freed.
    wait_for("the idle connections' places to be freed", WAIT, || async {
        raw_health(&addr)
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sustained_flood_of_idle_connections_does_not_lock_clients_out() {
    const LIMIT: usize = 8;
    let mut fleet = Fleet::start_with(|config| {
        config.settings.max_connections = LIMIT;
        // Long enough that no idle connection is closed for being idle during the test.
        config.settings.header_read_timeout = Duration::from_secs(60);
        config.settings.lease_ttl = Duration::from_secs(3);
        config.settings.heartbeat_interval = Duration::from_secs(1);
    })
    .await;
    let addr = fleet.url.trim_start_matches("http://").to_string();
    fleet.add_agent(fleet.agent_config("steady"));
    let job = fleet.submit("echo start; sleep 4; echo end").await;
    wait_for("the job to start", WAIT, || async {
        fleet.log(job.id).await.contains(" O start\n").then_some(())
    })
    .await;

    // Twice the limit in connections that never send a byte, each reopened at once when the
    // broker closes it, until the test ends (at most a minute).
    let stop = tokio_util::sync::CancellationToken::new();
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..2 * LIMIT {
        let (addr, stop, opened) = (addr.clone(), stop.clone(), opened.clone());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while !stop.is_cancelled() && tokio::time::Instant::now() < deadline {
                let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = read_until_closed(&mut tcp, Duration::from_secs(60)) => {}
                    _ = stop.cancelled() => {}
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }
    wait_for("the flood to open its connections", WAIT, || async {
        (opened.load(std::sync::atomic::Ordering::Relaxed) >= 2 * LIMIT).then_some(())
    })
    .await;

    // Clients on fresh connections are served, one after another (retrying a 503 for at most
    // 2 s, as agents and the CLI do), and the job runs to its end.
    for _ in 0..20 {
        let client = fleet.client();
        let mut tries = 0;
        while let Err(err) = client.health().await {
            tries += 1;
            assert!(tries < 20, "a fresh client is locked out: {err}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let done = fleet.wait_finished(job.id).await;
    stop.cancel();
    wait_for("the flood to end", WAIT, || async {
        raw_health(&addr)
            .await
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    let log = fleet.log(job.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{log}");
    assert_eq!(
        done.attempts, 1,
        "the lease was lost during the flood: {log}"
    );
    fleet.stop().await;
}
