//! Job events across brokers that share a PostgreSQL database, with `LISTEN/NOTIFY`.
//!
//! Every event a broker publishes on its bus is sent, a batch at a time, as a notification on
//! [`CHANNEL`]; every broker listens there and publishes the events of the others on its own
//! bus (marked remote, so they are not sent again). So a log follower connected to broker A
//! wakes when an agent connected to broker B appends a line, a held heartbeat on A returns
//! when a user cancels through B, and a job queued through B wakes an agent polling A.
//!
//! PostgreSQL delivers a notification only after the sending transaction commits, and the
//! events are sent after the store has committed the change they report, so a broker that
//! hears of a change reads it from the database. A notification lost while a connection is
//! re-established is made up for by the safety nets every broker has anyway: waiting polls are
//! re-offered the queue every few seconds, log followers and held heartbeats re-check.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use testbot_proto::jobs::{JobId, JobState};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::lifecycle::events::{EventBus, JobChange, JobEvent, Subscriber};
use crate::store::SharedStore;

/// The notification channel.
pub const CHANNEL: &str = "testbot_job_events";
/// Events waiting to be sent; past this, events are dropped (and counted) rather than let a
/// slow database grow the broker's memory.
const OUTBOX: usize = 65_536;
/// Most events sent in one statement.
const BATCH: usize = 512;
/// The longest a notification payload may be (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7_900;
/// Wait before sending again after the database refused.
const RETRY: Duration = Duration::from_millis(500);

/// One event as it travels between brokers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEvent {
    /// The sending broker.
    pub broker: String,
    pub job: i64,
    pub at_ms: i64,
    pub change: WireChange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireChange {
    Queued { again: bool },
    Assigned { agent: String },
    Started,
    LogAppended { log_bytes: u64 },
    CancelRequested,
    Finished { state: JobState },
}

impl WireEvent {
    fn from_event(broker: &str, event: &JobEvent) -> WireEvent {
        let change = match &event.change {
            JobChange::Queued { again, .. } => WireChange::Queued { again: *again },
            JobChange::Assigned { agent } => WireChange::Assigned {
                agent: agent.clone(),
            },
            JobChange::Started => WireChange::Started,
            JobChange::LogAppended { log_bytes } => WireChange::LogAppended {
                log_bytes: *log_bytes,
            },
            JobChange::CancelRequested => WireChange::CancelRequested,
            JobChange::Finished { state } => WireChange::Finished { state: *state },
        };
        WireEvent {
            broker: broker.to_string(),
            job: event.id.0,
            at_ms: event.at_ms,
            change,
        }
    }
}

/// The bus subscriber that queues this broker's own events for the other brokers.
pub struct Outbox {
    broker: String,
    tx: mpsc::Sender<WireEvent>,
    dropped: AtomicU64,
}

impl Subscriber for Outbox {
    fn on_event(&self, event: &JobEvent) {
        if event.remote {
            return;
        }
        if self
            .tx
            .try_send(WireEvent::from_event(&self.broker, event))
            .is_err()
        {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "Job events for other brokers were dropped: the database is slow or unreachable."
                );
            }
        }
    }
}

/// The relay before it runs: its outbox is a subscriber of the bus being built.
pub struct Relay {
    pub outbox: Arc<Outbox>,
    rx: mpsc::Receiver<WireEvent>,
}

impl Relay {
    /// A relay for a broker with a fresh random id.
    pub fn new() -> Relay {
        let (tx, rx) = mpsc::channel(OUTBOX);
        Relay {
            outbox: Arc::new(Outbox {
                broker: testbot_proto::signing::random_hex(8),
                tx,
                dropped: AtomicU64::new(0),
            }),
            rx,
        }
    }

    /// Connects to the database at `url` and starts sending and listening until `shutdown`.
    /// Returns once it listens: from then on no event of another broker is missed.
    pub async fn start(
        self,
        url: &str,
        bus: Arc<EventBus>,
        store: SharedStore,
        shutdown: CancellationToken,
    ) -> anyhow::Result<JoinHandle<()>> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(|err| anyhow::anyhow!("Cannot connect to PostgreSQL for job events: {err}"))?;
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(CHANNEL).await?;
        let broker = self.outbox.broker.clone();
        let sender = tokio::spawn(send_events(self.rx, pool.clone(), shutdown.clone()));
        Ok(tokio::spawn(async move {
            receive_events(listener, &broker, &bus, &store, &shutdown).await;
            let _ = sender.await;
            pool.close().await;
        }))
    }
}

impl Default for Relay {
    fn default() -> Self {
        Relay::new()
    }
}

/// Sends queued events in batches until shutdown, then what is left.
async fn send_events(mut rx: mpsc::Receiver<WireEvent>, pool: PgPool, shutdown: CancellationToken) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = shutdown.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, BATCH).await
            }
        };
        if received == 0 {
            return;
        }
        let payloads = payloads(&batch);
        batch.clear();
        while let Err(err) =
            sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
                .bind(CHANNEL)
                .bind(&payloads)
                .execute(&pool)
                .await
        {
            if shutdown.is_cancelled() {
                return;
            }
            tracing::warn!(
                ?err,
                "Cannot send job events to the other brokers; retrying."
            );
            tokio::time::sleep(RETRY).await;
        }
    }
}

/// The batch as notification payloads: one JSON array of events each, under the size limit.
/// Log appends of one job in a batch are sent once, with the newest size.
fn payloads(batch: &[WireEvent]) -> Vec<String> {
    let mut kept: Vec<&WireEvent> = Vec::with_capacity(batch.len());
    for (i, event) in batch.iter().enumerate() {
        let superseded = matches!(event.change, WireChange::LogAppended { .. })
            && batch[i + 1..].iter().any(|later| {
                later.job == event.job && matches!(later.change, WireChange::LogAppended { .. })
            });
        if !superseded {
            kept.push(event);
        }
    }
    let mut out = Vec::new();
    let mut current = String::from("[");
    for event in kept {
        let json = serde_json::to_string(event).expect("events serialise");
        if current.len() > 1 && current.len() + json.len() + 2 > MAX_PAYLOAD {
            current.push(']');
            out.push(std::mem::replace(&mut current, String::from("[")));
        }
        if current.len() > 1 {
            current.push(',');
        }
        current.push_str(&json);
    }
    if current.len() > 1 {
        current.push(']');
        out.push(current);
    }
    out
}

/// Publishes the other brokers' events on this broker's bus until shutdown.
async fn receive_events(
    mut listener: PgListener,
    broker: &str,
    bus: &EventBus,
    store: &SharedStore,
    shutdown: &CancellationToken,
) {
    loop {
        let notification = tokio::select! {
            n = listener.try_recv() => n,
            _ = shutdown.cancelled() => return,
        };
        let notification = match notification {
            Ok(Some(notification)) => notification,
            Ok(None) => {
                tracing::warn!(
                    "Lost the connection that hears other brokers' job events; reconnecting."
                );
                continue;
            }
            Err(err) => {
                tracing::warn!(?err, "Cannot hear other brokers' job events; retrying.");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let events: Vec<WireEvent> = match serde_json::from_str(notification.payload()) {
            Ok(events) => events,
            Err(err) => {
                tracing::warn!(
                    ?err,
                    "Ignored a job-event notification that does not parse."
                );
                continue;
            }
        };
        for event in events.into_iter().filter(|e| e.broker != broker) {
            if let Some(change) = local_change(&event, store).await {
                bus.publish_remote(JobId(event.job), change, event.at_ms);
            }
        }
    }
}

/// The event as this broker's bus carries it; a queued job is read for routing.
async fn local_change(event: &WireEvent, store: &SharedStore) -> Option<JobChange> {
    Some(match &event.change {
        WireChange::Queued { again } => {
            let job = match store.routed_job(JobId(event.job)).await {
                Ok(job) => job?,
                Err(err) => {
                    tracing::warn!(
                        job_id = event.job,
                        ?err,
                        "Cannot read a job another broker queued."
                    );
                    return None;
                }
            };
            JobChange::Queued {
                job: Arc::new(job),
                again: *again,
            }
        }
        WireChange::Assigned { agent } => JobChange::Assigned {
            agent: agent.clone(),
        },
        WireChange::Started => JobChange::Started,
        WireChange::LogAppended { log_bytes } => JobChange::LogAppended {
            log_bytes: *log_bytes,
        },
        WireChange::CancelRequested => JobChange::CancelRequested,
        WireChange::Finished { state } => JobChange::Finished { state: *state },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(job: i64, change: WireChange) -> WireEvent {
        WireEvent {
            broker: "b".into(),
            job,
            at_ms: 1,
            change,
        }
    }

    #[test]
    fn a_batch_keeps_order_sends_each_jobs_newest_log_size_and_fits_the_limit() {
        let batch = vec![
            event(1, WireChange::LogAppended { log_bytes: 10 }),
            event(2, WireChange::Started),
            event(1, WireChange::LogAppended { log_bytes: 20 }),
            event(
                1,
                WireChange::Finished {
                    state: JobState::Succeeded,
                },
            ),
        ];
        let sent: Vec<WireEvent> = payloads(&batch)
            .iter()
            .flat_map(|p| serde_json::from_str::<Vec<WireEvent>>(p).unwrap())
            .collect();
        assert_eq!(sent, batch[1..].to_vec());
        let many: Vec<WireEvent> = (0..2000).map(|j| event(j, WireChange::Started)).collect();
        let payloads = payloads(&many);
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        let back: usize = payloads
            .iter()
            .map(|p| serde_json::from_str::<Vec<WireEvent>>(p).unwrap().len())
            .sum();
        assert_eq!(back, 2000);
    }
}
