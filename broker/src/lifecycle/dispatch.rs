//! Waking idle agents the moment a job they can take is queued.
//!
//! An agent's long poll registers a [`Waiter`] with its routing [`Offer`], then tries to claim a
//! job. When a job is queued, [`Dispatcher::job_queued`] hands one signal to the first waiter whose
//! offer admits the job, so one enqueue wakes one agent that can take it (no thundering herd, no
//! busy polling, and no waking of agents that cannot). A waiter that got a signal but could not
//! use it (it claimed another job, or the job is held back from it) passes it on to a waiter not
//! yet tried, so no wake-up is lost.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::events::{JobChange, JobEvent, Subscriber};
use crate::routing::{Offer, RoutedJob};

/// A wake-up: this job was queued.
#[derive(Debug)]
pub struct Signal {
    pub job: Arc<RoutedJob>,
    /// The polls already handed this signal.
    tried: BTreeSet<u64>,
}

struct Waiter {
    id: u64,
    /// The poll this waiter belongs to (a poll registers again after each wake-up).
    poll: u64,
    offer: Arc<Offer>,
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
    /// A number naming one poll across its registrations.
    pub fn new_poll(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers poll `poll` from an agent with `offer`.
    pub fn register(&self, poll: u64, offer: Arc<Offer>) -> WaitTicket<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .expect("dispatcher poisoned")
            .push_back(Waiter {
                id,
                poll,
                offer,
                tx,
            });
        WaitTicket {
            dispatcher: self,
            id,
            rx,
        }
    }

    /// `job` is queued: wake the longest-waiting agent that may take it.
    pub fn job_queued(&self, job: RoutedJob) {
        self.offer(Arc::new(job));
    }

    fn offer(&self, job: Arc<RoutedJob>) {
        self.send(Signal {
            job,
            tried: BTreeSet::new(),
        });
    }

    /// Poll `poll` was woken by `signal` but did not claim its job: wake another one.
    pub fn pass_on(&self, mut signal: Signal, poll: u64) {
        signal.tried.insert(poll);
        self.send(signal);
    }

    fn send(&self, mut signal: Signal) {
        let mut waiters = self.waiters.lock().expect("dispatcher poisoned");
        let mut i = 0;
        while i < waiters.len() {
            if waiters[i].tx.is_closed() {
                waiters.remove(i);
                continue;
            }
            if !signal.tried.contains(&waiters[i].poll)
                && waiters[i].offer.admits(&signal.job).is_ok()
            {
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

    /// How many polls are waiting.
    pub fn waiting(&self) -> usize {
        self.waiters.lock().expect("dispatcher poisoned").len()
    }
}

impl Subscriber for Dispatcher {
    fn on_event(&self, event: &JobEvent) {
        if let JobChange::Queued { job, .. } = &event.change {
            self.offer(job.clone());
        }
    }
}

impl WaitTicket<'_> {
    /// Waits for a signal. Cancel-safe. None: the dispatcher went away; try to claim anyway.
    pub async fn signalled(&mut self) -> Option<Signal> {
        (&mut self.rx).await.ok()
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
            self.dispatcher.send(signal);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use testbot_proto::jobs::JobSpec;

    fn offer(labels: &[&str]) -> Arc<Offer> {
        Arc::new(Offer {
            site: "s".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            executor: "shell".into(),
            policy: None,
            workflow_jobs_without_policy: false,
        })
    }

    fn job(labels: &[&str]) -> RoutedJob {
        RoutedJob {
            spec: JobSpec {
                labels: labels.iter().map(|s| s.to_string()).collect(),
                ..JobSpec::default()
            },
            sites: None,
            identity: None,
        }
    }

    #[tokio::test]
    async fn one_enqueue_wakes_one_waiter_that_can_take_it() {
        let d = Dispatcher::default();
        let mut gpu = d.register(d.new_poll(), offer(&["gpu"]));
        let mut cpu = d.register(d.new_poll(), offer(&["cpu"]));
        d.job_queued(job(&["cpu"]));
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
    async fn a_job_no_waiter_can_take_wakes_none() {
        let d = Dispatcher::default();
        let mut other_site = d.register(d.new_poll(), offer(&[]));
        d.job_queued(job(&["site:elsewhere"]));
        assert!(other_site.rx.try_recv().is_err());
        assert_eq!(d.waiting(), 1);
    }

    #[tokio::test]
    async fn an_unused_signal_is_passed_on() {
        let d = Dispatcher::default();
        let first = d.register(d.new_poll(), offer(&[]));
        let mut second = d.register(d.new_poll(), offer(&[]));
        d.job_queued(job(&[]));
        // The first waiter got the signal but claimed something else and went away.
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.signalled())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_signal_passed_on_skips_the_polls_that_tried_it() {
        let d = Dispatcher::default();
        let (p1, p2) = (d.new_poll(), d.new_poll());
        let mut first = d.register(p1, offer(&[]));
        d.job_queued(job(&[]));
        let signal = first.signalled().await.unwrap();
        // The first poll could not claim it and waits again, behind the second.
        let mut again = d.register(p1, offer(&[]));
        let mut second = d.register(p2, offer(&[]));
        d.pass_on(signal, p1);
        assert!(
            again.rx.try_recv().is_err(),
            "not handed back to the poll that tried it"
        );
        let signal = second.signalled().await.unwrap();
        d.pass_on(signal, p2);
        assert!(
            again.rx.try_recv().is_err(),
            "every poll tried it: it stops"
        );
    }
}
