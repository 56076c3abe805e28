//! `WorkQueue`: the reconcile work queue: deduplicated, delayed, and serialised per object.
//!
//! Semantics follow client-go's workqueue (which kube-rs' scheduler mirrors):
//! - a key is in the queue at most once; adding it again is a no-op (the pending pass will
//!   see the latest state anyway, since reconcilers read the store);
//! - a key handed out by [`WorkQueue::next`] is not handed out again until
//!   [`WorkQueue::done`]; adds meanwhile mark it dirty and it comes back after `done`, so
//!   one object is never reconciled twice at the same time, and no trigger is lost;
//! - [`WorkQueue::add_after`] schedules a key; the earliest requested time wins, and an
//!   immediate add beats a delayed one.
//! - Per-key backoff (client-go's rate limiter): [`WorkQueue::record_failure`] counts the
//!   failures of a key in a row, [`WorkQueue::retry_delay`] turns the count into an
//!   exponential delay, [`WorkQueue::forget`] resets it after a success.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use agentvm_store::ObjectKey;

/// The reconcile work queue; share it behind an `Arc`.
#[derive(Debug)]
pub struct WorkQueue {
    state: Mutex<State>,
    notify: Notify,
    /// Failures in a row per key.
    failures: Mutex<HashMap<ObjectKey, u32>>,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl Default for WorkQueue {
    fn default() -> Self {
        Self::with_backoff(Duration::from_secs(1), Duration::from_secs(300))
    }
}

#[derive(Debug, Default)]
struct State {
    /// Keys ready to hand out, in order.
    ready: VecDeque<ObjectKey>,
    /// The keys of `ready`.
    queued: HashSet<ObjectKey>,
    /// Keys waiting for their time.
    delayed: HashMap<ObjectKey, Instant>,
    /// Keys handed out and not done yet.
    processing: HashSet<ObjectKey>,
    /// Keys added while processing: re-added on `done` (now, or at the time).
    dirty: HashMap<ObjectKey, Option<Instant>>,
    shut_down: bool,
}

impl State {
    fn push_ready(&mut self, key: ObjectKey) {
        self.delayed.remove(&key);
        if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    fn schedule(&mut self, key: ObjectKey, at: Instant) {
        if self.queued.contains(&key) {
            return;
        }
        let slot = self.delayed.entry(key).or_insert(at);
        if at < *slot {
            *slot = at;
        }
    }

    fn promote_due(&mut self, now: Instant) {
        let due: Vec<ObjectKey> = self
            .delayed
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut due: Vec<(Instant, ObjectKey)> =
            due.into_iter().map(|k| (self.delayed[&k], k)).collect();
        due.sort();
        for (_, key) in due {
            self.push_ready(key);
        }
    }
}

impl WorkQueue {
    /// An empty queue (retry backoff from 1 s, capped at 5 min).
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue whose retry delays start at `base` and double up to `max`.
    pub fn with_backoff(base: Duration, max: Duration) -> Self {
        Self {
            state: Mutex::default(),
            notify: Notify::new(),
            failures: Mutex::default(),
            backoff_base: base,
            backoff_max: max,
        }
    }

    /// Counts one more failure of `key` in a row; returns the count.
    pub fn record_failure(&self, key: &ObjectKey) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// The delay before retrying `key`: base, 2×base, 4×base, ... capped, by its failures
    /// in a row (the base when it has none).
    pub fn retry_delay(&self, key: &ObjectKey) -> Duration {
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0);
        crate::reconcile::backoff_delay(failures, self.backoff_base, self.backoff_max)
    }

    /// Resets `key`'s failure count (after a success, or when it is gone).
    pub fn forget(&self, key: &ObjectKey) {
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Queues `key` now.
    pub fn add(&self, key: ObjectKey) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.shut_down {
            return;
        }
        if s.processing.contains(&key) {
            s.dirty.insert(key, None);
            return;
        }
        s.push_ready(key);
        drop(s);
        self.notify.notify_one();
    }

    /// Queues `key` after `delay` (keeps an earlier time if one is pending).
    pub fn add_after(&self, key: ObjectKey, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        let at = Instant::now() + delay;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.shut_down {
            return;
        }
        if s.processing.contains(&key) {
            let slot = s.dirty.entry(key).or_insert(Some(at));
            if let Some(t) = slot {
                if at < *t {
                    *t = at;
                }
            }
            return;
        }
        s.schedule(key, at);
        drop(s);
        // A waiting worker may need to wake earlier than it planned.
        self.notify.notify_one();
    }

    /// Waits for the next key that is due and not being processed; `None` once shut down.
    /// The caller must call [`WorkQueue::done`] with the key when finished.
    pub async fn next(&self) -> Option<ObjectKey> {
        loop {
            let notified = self.notify.notified();
            let deadline = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.shut_down {
                    return None;
                }
                s.promote_due(Instant::now());
                if let Some(key) = s.ready.pop_front() {
                    s.queued.remove(&key);
                    s.processing.insert(key.clone());
                    let more = !s.ready.is_empty();
                    drop(s);
                    if more {
                        // Let another worker take the next one.
                        self.notify.notify_one();
                    }
                    return Some(key);
                }
                s.delayed.values().min().copied()
            };
            match deadline {
                Some(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Marks `key` finished; if it was added meanwhile, it is queued again.
    pub fn done(&self, key: &ObjectKey) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.processing.remove(key);
        match s.dirty.remove(key) {
            None => return,
            Some(None) => s.push_ready(key.clone()),
            Some(Some(at)) => s.schedule(key.clone(), at),
        }
        drop(s);
        self.notify.notify_one();
    }

    /// Stops handing out keys: every [`WorkQueue::next`] returns `None`.
    pub fn shut_down(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shut_down = true;
        self.notify.notify_waiters();
        self.notify.notify_one();
    }

    /// Keys queued or scheduled (not counting those being processed).
    pub fn len(&self) -> usize {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.ready.len() + s.delayed.len()
    }

    /// True when nothing is queued, scheduled or being processed.
    pub fn is_idle(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.ready.is_empty() && s.delayed.is_empty() && s.processing.is_empty()
    }

    /// True when nothing is queued or scheduled (keys may still be processing).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::Kind;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Kind::Image, name)
    }

    #[tokio::test]
    async fn deduplicates_and_keeps_order() {
        let q = WorkQueue::new();
        q.add(key("a"));
        q.add(key("b"));
        q.add(key("a"));
        assert_eq!(q.len(), 2);
        assert_eq!(q.next().await, Some(key("a")));
        assert_eq!(q.next().await, Some(key("b")));
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn a_key_in_progress_is_not_handed_out_again() {
        let q = WorkQueue::new();
        q.add(key("a"));
        let k = q.next().await.unwrap();
        q.add(key("a"));
        q.add(key("b"));
        // `a` is dirty, not ready: `b` comes first, then nothing.
        assert_eq!(q.next().await, Some(key("b")));
        let none = tokio::time::timeout(Duration::from_millis(50), q.next()).await;
        assert!(none.is_err(), "a was handed out twice");
        q.done(&k);
        assert_eq!(q.next().await, Some(key("a")));
    }

    #[tokio::test(start_paused = true)]
    async fn delays_and_earliest_wins() {
        let q = WorkQueue::new();
        let start = Instant::now();
        q.add_after(key("a"), Duration::from_secs(10));
        q.add_after(key("a"), Duration::from_secs(3));
        q.add_after(key("a"), Duration::from_secs(20));
        assert_eq!(q.next().await, Some(key("a")));
        assert_eq!(start.elapsed().as_secs(), 3);
        q.done(&key("a"));
        // An immediate add beats a pending delayed one.
        q.add_after(key("b"), Duration::from_secs(60));
        q.add(key("b"));
        let t = Instant::now();
        assert_eq!(q.next().await, Some(key("b")));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Delayed add while processing: comes back at its time after done.
        q.add_after(key("b"), Duration::from_secs(5));
        q.done(&key("b"));
        let t = Instant::now();
        assert_eq!(q.next().await, Some(key("b")));
        assert_eq!(t.elapsed().as_secs(), 5);
    }

    #[test]
    fn retry_delay_grows_per_key_and_resets() {
        let q = WorkQueue::with_backoff(Duration::from_secs(1), Duration::from_secs(5));
        assert_eq!(q.retry_delay(&key("a")), Duration::from_secs(1));
        let delays: Vec<u64> = (0..4)
            .map(|_| {
                q.record_failure(&key("a"));
                q.retry_delay(&key("a")).as_secs()
            })
            .collect();
        assert_eq!(delays, [1, 2, 4, 5]);
        assert_eq!(q.retry_delay(&key("b")), Duration::from_secs(1));
        q.forget(&key("a"));
        assert_eq!(q.retry_delay(&key("a")), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn shut_down_wakes_waiters() {
        let q = std::sync::Arc::new(WorkQueue::new());
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.shut_down();
        assert_eq!(waiter.await.unwrap(), None);
    }
}
