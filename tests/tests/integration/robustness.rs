//! Clients that hold the broker's resources: a request trickled in byte by byte, and crowds of
//! log followers on one job.

use std::time::Duration;

use secrecy::ExposeSecret as _;
use testbot_e2e::{Fleet, refusal};
use testbot_proto::jobs::JobSpec;
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
