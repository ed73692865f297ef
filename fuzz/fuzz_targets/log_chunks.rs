//! A job's log as agents send it: chunks at byte offsets, re-sent after a lost answer, out of
//! order after a reconnect, past the broker's limit. A stateful target: each input is a sequence
//! of appends and reads on one fresh job of the real SQLite store, checked against a model.
//! One store per process, a fresh job per input (opening a store per input is too slow).
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use testbot_broker::lifecycle::transitions;
use testbot_broker::routing::Offer;
use testbot_broker::store::{AppendResult, JobOrigin, JobTaker, SharedStore};
use testbot_proto::jobs::JobSpec;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Appends `data` at `offset` bytes past (or before) the end of the log as the model knows it.
    Append { back: u8, ahead: u8, data: Vec<u8> },
    /// Reads up to `max` bytes from `offset`.
    Read { offset: u16, max: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The per-job limit: small ones exercise the cut.
    limit: Option<u16>,
    ops: Vec<Op>,
}

struct Env {
    runtime: tokio::runtime::Runtime,
    store: SharedStore,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::Builder::new()
            .prefix("testbot-fuzz-log-")
            .tempdir()
            .unwrap();
        let store = runtime
            .block_on(testbot_broker::store::open(None, dir.path()))
            .unwrap();
        Env {
            runtime,
            store,
            _dir: dir,
        }
    })
}

fuzz_target!(|input: Input| {
    let env = env();
    env.runtime.block_on(run(&env.store, input));
});

async fn run(store: &SharedStore, input: Input) {
    let spec = JobSpec {
        script: "true".into(),
        ..JobSpec::default()
    };
    let origin = JobOrigin {
        submitted_by: "operator fuzz".into(),
        ..JobOrigin::default()
    };
    let job = store
        .insert_job(&spec, &origin, None)
        .await
        .unwrap()
        .unwrap();
    let id = job.job_id();
    let offer = Offer {
        site: "s".into(),
        labels: Vec::new(),
        executor: "shell".into(),
        policy: None,
        workflow_jobs_without_policy: true,
    };
    let lease = format!("lease-{id}");
    let taker = JobTaker {
        agent: "s/a",
        offer: &offer,
    };
    let claimed = store
        .claim_job(&taker, &lease, i64::MAX / 2)
        .await
        .unwrap()
        .expect("the fresh job is claimed");
    assert_eq!(claimed.job_id(), id);

    let limit = input.limit.map_or(u64::MAX, |l| u64::from(l).max(1));
    let cut = move |kept| transitions::log_cut(limit, kept, 0);
    // The bytes the agent meant to send, in order; `log` is what the store must hold.
    let mut log: Vec<u8> = Vec::new();
    let mut cut_at: Option<u64> = None;
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Append { back, ahead, data } => {
                let end = log.len() as u64;
                let offset = (end + u64::from(ahead % 4 / 3) * u64::from(ahead))
                    .saturating_sub(u64::from(back));
                let result = store
                    .append_log(id, &lease, offset, &data, limit, &cut)
                    .await
                    .unwrap();
                if let Some(log_bytes) = cut_at {
                    assert_eq!(
                        result,
                        AppendResult::TooLarge { log_bytes },
                        "after the cut"
                    );
                    continue;
                }
                if offset > end {
                    assert_eq!(result, AppendResult::Gap { log_bytes: end }, "a gap");
                    continue;
                }
                // Bytes the log holds are skipped, the rest appended.
                let skip = ((end - offset) as usize).min(data.len());
                let new_end = end + (data.len() - skip) as u64;
                if new_end <= limit {
                    log.extend_from_slice(&data[skip..]);
                    assert_eq!(
                        result,
                        AppendResult::Appended(new_end),
                        "append at {offset}"
                    );
                } else {
                    let AppendResult::TooLarge { log_bytes } = result else {
                        panic!("{new_end} bytes, over the limit of {limit}, gave {result:?}");
                    };
                    // The whole lines that fit, then the notice.
                    let stored = store.read_log(id, 0, 1 << 30).await.unwrap();
                    assert_eq!(stored.len() as u64, log_bytes);
                    assert!(stored.starts_with(&log), "the cut lost stored bytes");
                    let added = &stored[log.len()..];
                    let new = &data[skip..];
                    let kept = (1..=new.len())
                        .rev()
                        .find(|&k| new[k - 1] == b'\n' && end + k as u64 <= limit)
                        .unwrap_or(0);
                    assert_eq!(&added[..kept], &new[..kept], "the kept lines");
                    assert!(
                        added[kept..].windows(7).any(|w| w == b"testbot"),
                        "no notice after the kept lines"
                    );
                    log = stored;
                    cut_at = Some(log_bytes);
                }
            }
            Op::Read { offset, max } => {
                let offset = u64::from(offset).min(log.len() as u64 + 8);
                let max = usize::from(max);
                let read = store.read_log(id, offset, max).await.unwrap();
                let from = (offset as usize).min(log.len());
                let rest = &log[from..];
                assert!(
                    rest.starts_with(&read),
                    "read at {offset}: not the log's bytes"
                );
                assert!(
                    read.len() >= max.min(rest.len()),
                    "read at {offset} of {max}: {} of {} bytes",
                    read.len(),
                    rest.len()
                );
            }
        }
    }
    let stored = store.read_log(id, 0, 1 << 30).await.unwrap();
    assert_eq!(stored, log, "the log as stored");
    let model = store.job(id).await.unwrap().unwrap();
    assert_eq!(model.log_bytes as usize, log.len());
}
