//! The job-event bus: every change of a job's state is published here, once.
//!
//! Subscribers inside the broker (log followers, held heartbeats, the dispatcher) are called as
//! the event is published, so none can miss or lag behind one; anything else (metrics, and
//! later check runs and the dashboard) reads the [`EventBus::subscribe`] stream.

use std::sync::Arc;

use testbot_proto::jobs::{JobId, JobState};
use tokio::sync::broadcast;

use crate::routing::RoutedJob;

/// What changed.
#[derive(Debug, Clone)]
pub enum JobChange {
    /// Queued: submitted (`again: false`), or queued again after a lost lease or a hand-back.
    Queued { job: Arc<RoutedJob>, again: bool },
    /// Claimed by an agent (`site/name`).
    Assigned { agent: String },
    /// The agent started it.
    Started,
    /// Its log grew to `log_bytes`.
    LogAppended { log_bytes: u64 },
    /// Someone asked for it to be cancelled while it runs.
    CancelRequested,
    /// It has its one result.
    Finished { state: JobState },
}

/// One change of one job.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: JobId,
    pub change: JobChange,
    /// When the change was made (ms since the epoch).
    pub at_ms: i64,
    /// Made by another broker sharing the database (see [`crate::store::notify`]).
    pub remote: bool,
}

/// Called for each event as it is published; must not block.
pub trait Subscriber: Send + Sync {
    fn on_event(&self, event: &JobEvent);
}

/// How many events the stream keeps for a subscriber that falls behind.
const STREAM_CAPACITY: usize = 4096;

/// The bus.
pub struct EventBus {
    subscribers: Vec<Arc<dyn Subscriber>>,
    stream: broadcast::Sender<Arc<JobEvent>>,
}

impl EventBus {
    pub fn new(subscribers: Vec<Arc<dyn Subscriber>>) -> EventBus {
        EventBus {
            subscribers,
            stream: broadcast::channel(STREAM_CAPACITY).0,
        }
    }

    /// Publishes a change this broker made now.
    pub fn publish(&self, id: JobId, change: JobChange) {
        self.send(JobEvent {
            id,
            change,
            at_ms: testbot_proto::now_ms(),
            remote: false,
        });
    }

    /// Publishes a change another broker made at `at_ms`.
    pub fn publish_remote(&self, id: JobId, change: JobChange, at_ms: i64) {
        self.send(JobEvent {
            id,
            change,
            at_ms,
            remote: true,
        });
    }

    fn send(&self, event: JobEvent) {
        for subscriber in &self.subscribers {
            subscriber.on_event(&event);
        }
        // Nobody listening is fine.
        let _ = self.stream.send(Arc::new(event));
    }

    /// Every event published from now on. A receiver that falls more than a few thousand
    /// events behind is told how many it missed (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<JobEvent>> {
        self.stream.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Subscriber for Recorder {
        fn on_event(&self, event: &JobEvent) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{} {:?}", event.id, event.change));
        }
    }

    #[tokio::test]
    async fn every_subscriber_and_the_stream_see_each_event_once() {
        let a = Arc::new(Recorder::default());
        let b = Arc::new(Recorder::default());
        let bus = EventBus::new(vec![a.clone(), b.clone()]);
        let mut stream = bus.subscribe();
        bus.publish(JobId(1), JobChange::Started);
        bus.publish(
            JobId(1),
            JobChange::Finished {
                state: JobState::Succeeded,
            },
        );
        assert_eq!(a.0.lock().unwrap().len(), 2);
        assert_eq!(*a.0.lock().unwrap(), *b.0.lock().unwrap());
        assert!(matches!(
            stream.recv().await.unwrap().change,
            JobChange::Started
        ));
        assert!(matches!(
            stream.recv().await.unwrap().change,
            JobChange::Finished { .. }
        ));
        assert!(stream.try_recv().is_err());
    }
}
