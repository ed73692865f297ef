//! Per-job wake-ups: log followers and held heartbeats wait on one job and wake when it
//! changes, instead of polling the database. Each [`JobWatchers`] hears the events of the
//! [`super::events::EventBus`] that matter to its kind of waiter.

use std::collections::HashMap;
use std::sync::Mutex;

use testbot_proto::jobs::JobId;
use tokio::sync::watch;

use super::events::{JobChange, JobEvent, Subscriber};

/// What wakes a kind of waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakes {
    /// Log followers: appends, a requeue's line, the result.
    Log,
    /// Held heartbeats: cancel requests and the result.
    Control,
}

pub struct JobWatchers {
    wakes: Wakes,
    channels: Mutex<HashMap<JobId, watch::Sender<u64>>>,
}

impl Subscriber for JobWatchers {
    fn on_event(&self, event: &JobEvent) {
        match (&event.change, self.wakes) {
            (JobChange::Finished { .. }, _) => self.finished(event.id),
            (JobChange::LogAppended { .. } | JobChange::Queued { again: true, .. }, Wakes::Log)
            | (JobChange::CancelRequested, Wakes::Control) => self.notify(event.id),
            _ => {}
        }
    }
}

impl JobWatchers {
    pub fn new(wakes: Wakes) -> JobWatchers {
        JobWatchers {
            wakes,
            channels: Mutex::default(),
        }
    }

    /// A receiver that sees every change to `id` made after this call.
    pub fn subscribe(&self, id: JobId) -> watch::Receiver<u64> {
        let mut channels = self.channels.lock().expect("job watchers poisoned");
        channels
            .entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Job `id` changed.
    fn notify(&self, id: JobId) {
        let mut channels = self.channels.lock().expect("job watchers poisoned");
        if let Some(tx) = channels.get(&id) {
            if tx.receiver_count() == 0 {
                channels.remove(&id);
            } else {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    /// Forgets job `id` if nobody is subscribed to it any more.
    pub fn forget_unused(&self, id: JobId) {
        let mut channels = self.channels.lock().expect("job watchers poisoned");
        if channels.get(&id).is_some_and(|tx| tx.receiver_count() == 0) {
            channels.remove(&id);
        }
    }

    /// How many jobs have subscribers (or had them and were not notified since).
    pub fn len(&self) -> usize {
        self.channels.lock().expect("job watchers poisoned").len()
    }

    /// Whether no job has subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Job `id` has its result: wake its subscribers one last time and forget it.
    fn finished(&self, id: JobId) {
        let mut channels = self.channels.lock().expect("job watchers poisoned");
        if let Some(tx) = channels.remove(&id) {
            tx.send_modify(|n| *n += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unused_subscription_is_forgotten_and_a_used_one_kept() {
        let events = JobWatchers::new(Wakes::Log);
        let rx = events.subscribe(JobId(7));
        drop(rx);
        events.forget_unused(JobId(7));
        assert!(events.is_empty());
        let _rx = events.subscribe(JobId(8));
        events.forget_unused(JobId(8));
        assert_eq!(events.len(), 1);
    }
}
