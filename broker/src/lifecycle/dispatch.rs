//! Waking idle agents the moment a job they can take is queued.
//!
//! An agent's long poll registers a waiter with its routing [`Offer`], then tries to claim a
//! job. When a job is queued, [`Dispatcher::job_queued`] hands one signal to the longest-waiting
//! poll whose offer admits the job, so one enqueue wakes one agent that can take it (no
//! thundering herd, no busy polling, and no waking of agents that cannot). A poll that got a
//! signal but could not use it (it claimed another job, or the job is held back from it) passes
//! it on to a poll not yet tried, so no wake-up is lost.
//!
//! Polls with equal offers (identical agents) wait in one queue, so a queued job is matched
//! once against each distinct offer rather than once per waiting poll: ten thousand idle agents
//! of one kind that cannot take a job add one check to its dispatch, not ten thousand. Within a
//! queue, and across queues, the poll that registered first is woken first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use testbot_proto::jobs::JobId;
use tokio::sync::oneshot;

use super::events::{JobChange, JobEvent, Subscriber};
use crate::routing::{Offer, RoutedJob};

/// A wake-up: this job was queued.
#[derive(Debug)]
pub struct Signal {
    /// The queued job, so a poll that claimed this very job does not pass the wake-up on.
    pub id: JobId,
    pub job: Arc<RoutedJob>,
    /// The polls already handed this signal.
    tried: BTreeSet<u64>,
}

struct Waiter {
    /// The poll this waiter belongs to (a poll registers again after each wake-up).
    poll: u64,
    tx: oneshot::Sender<Signal>,
}

/// The waiting polls: by offer, then by registration (waiter ids rise).
#[derive(Default)]
struct Waiters {
    queues: HashMap<Arc<Offer>, BTreeMap<u64, Waiter>>,
    len: usize,
}

/// The set of polls waiting for work.
#[derive(Default)]
pub struct Dispatcher {
    waiters: Mutex<Waiters>,
    next_id: AtomicU64,
}

/// A registered waiter; deregisters itself when dropped.
pub struct WaitTicket<'a> {
    dispatcher: &'a Dispatcher,
    id: u64,
    offer: Arc<Offer>,
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
        let mut waiters = self.lock();
        waiters
            .queues
            .entry(offer.clone())
            .or_default()
            .insert(id, Waiter { poll, tx });
        waiters.len += 1;
        WaitTicket {
            dispatcher: self,
            id,
            offer,
            rx,
        }
    }

    /// Job `id` is queued: wake the longest-waiting agent that may take it.
    pub fn job_queued(&self, id: JobId, job: RoutedJob) {
        self.offer(id, Arc::new(job));
    }

    fn offer(&self, id: JobId, job: Arc<RoutedJob>) {
        self.send(Signal {
            id,
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
        let mut waiters = self.lock();
        loop {
            // Of the offers that admit the job, the one whose first poll not yet tried
            // registered first. Each offer is checked only if its poll would be woken first.
            let mut first: Option<(u64, &Arc<Offer>)> = None;
            for (offer, queue) in &waiters.queues {
                let Some(&id) = queue
                    .iter()
                    .find(|(_, waiter)| !signal.tried.contains(&waiter.poll))
                    .map(|(id, _)| id)
                else {
                    continue;
                };
                if first.is_some_and(|(earliest, _)| earliest < id) {
                    continue;
                }
                if offer.admits(&signal.job).is_ok() {
                    first = Some((id, offer));
                }
            }
            let Some((id, offer)) = first.map(|(id, offer)| (id, offer.clone())) else {
                return;
            };
            let Some(waiter) = waiters.remove(&offer, id) else {
                return;
            };
            match waiter.tx.send(signal) {
                Ok(()) => return,
                // The poll has gone meanwhile: the next one.
                Err(returned) => signal = returned,
            }
        }
    }

    /// How many polls are waiting.
    pub fn waiting(&self) -> usize {
        self.lock().len
    }

    fn lock(&self) -> MutexGuard<'_, Waiters> {
        self.waiters.lock().expect("dispatcher poisoned")
    }
}

impl Waiters {
    fn remove(&mut self, offer: &Arc<Offer>, id: u64) -> Option<Waiter> {
        let queue = self.queues.get_mut(offer)?;
        let waiter = queue.remove(&id)?;
        if queue.is_empty() {
            self.queues.remove(offer);
        }
        self.len -= 1;
        Some(waiter)
    }
}

impl Subscriber for Dispatcher {
    fn on_event(&self, event: &JobEvent) {
        if let JobChange::Queued { job, .. } = &event.change {
            self.offer(event.id, job.clone());
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
        if self
            .dispatcher
            .lock()
            .remove(&self.offer, self.id)
            .is_some()
        {
            return;
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
            app_event: None,
        }
    }

    #[tokio::test]
    async fn one_enqueue_wakes_one_waiter_that_can_take_it() {
        let d = Dispatcher::default();
        let mut gpu = d.register(d.new_poll(), offer(&["gpu"]));
        let mut cpu = d.register(d.new_poll(), offer(&["cpu"]));
        d.job_queued(JobId(1), job(&["cpu"]));
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
        d.job_queued(JobId(2), job(&["site:elsewhere"]));
        assert!(other_site.rx.try_recv().is_err());
        assert_eq!(d.waiting(), 1);
    }

    #[tokio::test]
    async fn an_unused_signal_is_passed_on() {
        let d = Dispatcher::default();
        let first = d.register(d.new_poll(), offer(&[]));
        let mut second = d.register(d.new_poll(), offer(&[]));
        d.job_queued(JobId(3), job(&[]));
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
        d.job_queued(JobId(4), job(&[]));
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

    #[tokio::test]
    async fn the_longest_waiting_poll_is_woken_whatever_its_offer() {
        let d = Dispatcher::default();
        let mut first = d.register(d.new_poll(), offer(&["cpu"]));
        let mut second = d.register(d.new_poll(), offer(&["cpu", "gpu"]));
        let mut third = d.register(d.new_poll(), offer(&["cpu"]));
        let mut never = d.register(d.new_poll(), offer(&["gpu"]));
        for id in 1..=3 {
            d.job_queued(JobId(id), job(&["cpu"]));
        }
        let woken = |rx: &mut oneshot::Receiver<Signal>| rx.try_recv().map(|signal| signal.id);
        assert_eq!(woken(&mut first.rx), Ok(JobId(1)));
        assert_eq!(woken(&mut second.rx), Ok(JobId(2)));
        assert_eq!(woken(&mut third.rx), Ok(JobId(3)));
        assert!(never.rx.try_recv().is_err());
        assert_eq!(d.waiting(), 1);
        drop(never);
        assert_eq!(d.waiting(), 0);
        assert!(
            d.lock().queues.is_empty(),
            "an offer no poll waits with is forgotten"
        );
    }
}
