//! Per-job change notifications: log appends, cancel requests, results.
//!
//! Log followers and held heartbeats subscribe to a job and wake when it changes, instead of
//! polling the database.

use std::collections::HashMap;
use std::sync::Mutex;

use testbot_proto::jobs::JobId;
use tokio::sync::watch;

#[derive(Default)]
pub struct JobEvents {
    channels: Mutex<HashMap<JobId, watch::Sender<u64>>>,
}

impl JobEvents {
    /// A receiver that sees every change to `id` made after this call.
    pub fn subscribe(&self, id: JobId) -> watch::Receiver<u64> {
        let mut channels = self.channels.lock().expect("job events poisoned");
        channels
            .entry(id)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Job `id` changed.
    pub fn notify(&self, id: JobId) {
        let mut channels = self.channels.lock().expect("job events poisoned");
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
        let mut channels = self.channels.lock().expect("job events poisoned");
        if channels.get(&id).is_some_and(|tx| tx.receiver_count() == 0) {
            channels.remove(&id);
        }
    }

    /// How many jobs have subscribers (or had them and were not notified since).
    pub fn len(&self) -> usize {
        self.channels.lock().expect("job events poisoned").len()
    }

    /// Whether no job has subscribers.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Job `id` has its result: wake its subscribers one last time and forget it.
    pub fn finished(&self, id: JobId) {
        let mut channels = self.channels.lock().expect("job events poisoned");
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
        let events = JobEvents::default();
        let rx = events.subscribe(JobId(7));
        drop(rx);
        events.forget_unused(JobId(7));
        assert!(events.is_empty());
        let _rx = events.subscribe(JobId(8));
        events.forget_unused(JobId(8));
        assert_eq!(events.len(), 1);
    }
}
