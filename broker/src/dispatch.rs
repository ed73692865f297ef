//! Waking idle agents the moment a job they can take is queued.
//!
//! An agent's long poll registers a [`Waiter`] with its labels, then tries to claim a job. When a
//! job is queued, [`Dispatcher::job_queued`] hands one signal to the first waiter whose labels
//! cover the job's, so one enqueue wakes one agent (no thundering herd, no busy polling). A
//! waiter that got a signal but claimed a job through another path passes the signal on, so no
//! wake-up is lost.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

/// A wake-up: a job with these labels was queued.
#[derive(Debug)]
pub struct Signal {
    pub labels: Vec<String>,
}

struct Waiter {
    id: u64,
    labels: BTreeSet<String>,
    tx: oneshot::Sender<Signal>,
}

/// The set of polls waiting for work.
#[derive(Default)]
pub struct Dispatcher {
    waiters: Mutex<VecDeque<Waiter>>,
    next_id: AtomicU64,
}

/// A registered waiter; deregisters itself when dropped.
pub struct WaitTicket<'a> {
    dispatcher: &'a Dispatcher,
    id: u64,
    rx: oneshot::Receiver<Signal>,
}

impl Dispatcher {
    /// Registers a poll from an agent offering `labels`.
    pub fn register(&self, labels: &[String]) -> WaitTicket<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("dispatcher poisoned")
            .push_back(Waiter {
                id,
                labels: labels.iter().cloned().collect(),
                tx,
            });
        WaitTicket {
            dispatcher: self,
            id,
            rx,
        }
    }

    /// A job with `labels` was queued: wake the longest-waiting agent that can take it.
    pub fn job_queued(&self, labels: &[String]) {
        let mut signal = Signal {
            labels: labels.to_vec(),
        };
        let mut waiters = self.waiters.lock().expect("dispatcher poisoned");
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].tx.is_closed() {
                waiters.remove(i);
                continue;
            }
            if signal.labels.iter().all(|l| waiters[i].labels.contains(l)) {
                let waiter = waiters.remove(i).expect("index checked");
                match waiter.tx.send(signal) {
                    Ok(()) => return,
                    Err(returned) => signal = returned,
                }
                continue;
            }
            i += 1;
        }
    }

    /// Wakes every waiting agent (a safety net run by the periodic sweeper).
    pub fn wake_all(&self) {
        let mut waiters = self.waiters.lock().expect("dispatcher poisoned");
        for waiter in waiters.drain(..) {
            let _ = waiter.tx.send(Signal { labels: Vec::new() });
        }
    }

    /// How many polls are waiting.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().expect("dispatcher poisoned").len()
    }
}

impl WaitTicket<'_> {
    /// Waits for a signal. Cancel-safe.
    pub async fn signalled(&mut self) {
        // An error means the dispatcher dropped the sender (wake_all with a closed receiver
        // cannot happen); either way, try to claim again.
        let _ = (&mut self.rx).await;
    }
}

impl Drop for WaitTicket<'_> {
    fn drop(&mut self) {
        {
            let mut waiters = self.dispatcher.waiters.lock().expect("dispatcher poisoned");
            if let Some(pos) = waiters.iter().position(|w| w.id == self.id) {
                waiters.remove(pos);
                return;
            }
        }
        // Already popped: if a signal was delivered but not used, hand it on.
        self.rx.close();
        if let Ok(signal) = self.rx.try_recv() {
            self.dispatcher.job_queued(&signal.labels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(ls: &[&str]) -> Vec<String> {
        ls.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn one_enqueue_wakes_one_matching_waiter() {
        let d = Dispatcher::default();
        let mut gpu = d.register(&labels(&["gpu"]));
        let mut cpu = d.register(&labels(&["cpu"]));
        d.job_queued(&labels(&["cpu"]));
        tokio::time::timeout(std::time::Duration::from_secs(1), cpu.signalled())
            .await
            .unwrap();
        assert!(
            gpu.rx.try_recv().is_err(),
            "the gpu agent must not be woken"
        );
        assert_eq!(d.waiting(), 1);
        drop(gpu);
        assert_eq!(d.waiting(), 0);
    }

    #[tokio::test]
    async fn an_unused_signal_is_passed_on() {
        let d = Dispatcher::default();
        let first = d.register(&[]);
        let mut second = d.register(&[]);
        d.job_queued(&[]);
        // The first waiter got the signal but claimed something else and went away.
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.signalled())
            .await
            .unwrap();
    }
}
