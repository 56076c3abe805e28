//! The reconciler contract (`Reconciler`, `Action`, `Ctx`) and the `Dispatcher` that runs
//! reconcilers from a work queue fed by store events and a periodic resync.
//!
//! The shape is kube-rs' controller: `reconcile(Arc<Obj>, &Ctx) -> Result<Action, Error>`.
//! A reconciler is *not told why* it runs (created, changed, resync, retry, deleted), which
//! forces it to be an idempotent function of (object, actual state).
//!
//! # Guarantees (of the dispatcher)
//! - One object is never reconciled twice at the same time; different objects are
//!   reconciled in parallel (`workers`).
//! - Every object is reconciled after the dispatcher starts, after every apply or deletion
//!   request, after `Requeue(d)`, after a failure (when [`Reconciler::error_policy`] says;
//!   by default exponential backoff from 1 s, doubling, capped at 5 min, reset by a success)
//!   and at every resync (default 30 s): eventual consistency does not depend on events,
//!   which may be lost.
//! - A failed reconcile is handed to [`Reconciler::error_policy`] (also on a blocking
//!   thread, still before the object can be reconciled again), which shows it in the status
//!   and picks the retry; a panicking reconciler is retried with the backoff.
//! - Reconcilers run on blocking threads (`spawn_blocking`): they may call libvirt directly.
//! - A kind without a reconciler has nothing outside the store to clean up: its objects
//!   are removed as soon as their deletion is requested. Its status is left untouched.
//!
//! - The object a reconciler gets, and the keys a resync queues, come from the object cache
//!   ([`crate::cache`], kept current from store events): what a store read at that moment
//!   would return, without decoding it again.
//!
//! # Assumptions (on reconcilers)
//! - A reconciler re-reads what it needs and tolerates running again at any time.
//! - For an object with [`StoredObject::is_deleting`], it tears down what it owns and then
//!   calls [`Store::finalize_delete`]; until then the object stays (finalizer semantics).
//! - It reports progress in the object's status (conditions), through
//!   [`Store::update_status`], which writes nothing when the status is unchanged. A failure
//!   it wants shown is returned with the status the pass computed
//!   ([`ReconcileError::with_status`]); the error policy adds the `Degraded` condition and
//!   writes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentvm_api::{Kind, KindStatus, Reason, Resource};
use tokio::sync::broadcast::error::RecvError;

use crate::audit::AuditLog;
use crate::cache::ObjectCache;
use crate::metrics::Metrics;
use crate::queue::WorkQueue;
use crate::vm_stats::{VmStatsHistory, VmStatsSampler, DEFAULT_HISTORY};
use crate::Config;
use agentvm_store::{Change, ObjectKey, Store, StoreError, StoredObject};

/// What to do after a successful reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconcile again after this long (e.g. while something is still starting).
    Requeue(Duration),
    /// Nothing to do until the object (or a watched kind) changes, or the next resync.
    AwaitChange,
}

/// A failed reconcile: handed to [`Reconciler::error_policy`], which shows it as the
/// `Degraded` condition (when it carries a status) and picks when to retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct ReconcileError {
    /// Short CamelCase label (`LibvirtError`), for conditions and metrics.
    pub reason: Reason,
    /// Human-readable details.
    pub message: String,
    /// What to show in the object's status; `None`: the status is left as it is (e.g. the
    /// store itself failed, or the failure is not the object's state).
    pub shown: Option<Box<FailedStatus>>,
}

/// The status a failed pass had computed, to be written with the error as `Degraded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedStatus {
    /// The object carrying that status.
    pub resource: Resource,
    /// `Ready` keeps its value (a degraded object may still be in service); otherwise it
    /// becomes false with the error.
    pub keep_ready: bool,
}

impl ReconcileError {
    /// An error with a reason label and a message.
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            shown: None,
        }
    }

    /// The error, to be shown in `obj`'s status as `status` plus the `Degraded` condition
    /// (`Ready` false) by the error policy.
    pub fn with_status<S: KindStatus>(mut self, obj: &StoredObject, status: &S) -> Self {
        let mut resource = obj.resource.clone();
        if status.clone().put(&mut resource) {
            self.shown = Some(Box::new(FailedStatus {
                resource,
                keep_ready: false,
            }));
        }
        self
    }

    /// Shown with `Ready` kept as it is in the status (see [`ReconcileError::with_status`]).
    pub fn keeping_ready(mut self, keep: bool) -> Self {
        if let Some(shown) = &mut self.shown {
            shown.keep_ready = keep;
        }
        self
    }
}

impl From<StoreError> for ReconcileError {
    fn from(e: StoreError) -> Self {
        ReconcileError::new(Reason::StoreError, e.to_string())
    }
}

/// What every reconciler gets besides the object.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The object store (write status, finalize deletions; reads that must see the latest
    /// committed state).
    pub store: Store,
    /// The store's objects in memory (reads of other objects; see [`crate::cache`]).
    pub cache: ObjectCache,
    /// Host configuration.
    pub config: Arc<Config>,
    /// Metrics to record pool, VM and run events in.
    pub metrics: Metrics,
    /// The audit log, for VM and run lifecycle events.
    pub audit: AuditLog,
    /// The one sampler of VM statistics: metrics, the latest samples of each running VM,
    /// and the feeds of the runs' anomaly monitors.
    pub vm_stats: VmStatsSampler,
    /// Egress summaries of runs in progress (filled by the egress proxy).
    pub egress: crate::egress::RunSummaries,
    /// Queues other objects for reconciliation (the dispatcher's work queue).
    pub wake: Wake,
    /// This node's name in a cluster (`None` on a single host).
    pub node: Option<String>,
}

/// A handle on the dispatcher's work queue, so that a reconciler (or a callback it installs)
/// can have another object reconciled now instead of polling for it. Does nothing outside a
/// dispatcher (unit tests that drive reconcilers by hand).
#[derive(Debug, Clone, Default)]
pub struct Wake(Option<Arc<WorkQueue>>);

impl Wake {
    /// The delay before retrying `key` after its latest failure: the queue's per-object
    /// exponential backoff over the failures in a row the dispatcher counted. Outside a
    /// dispatcher, the default first delay.
    pub fn retry_delay(&self, key: &ObjectKey) -> Duration {
        match &self.0 {
            Some(q) => q.retry_delay(key),
            None => DispatcherOptions::default().backoff_base,
        }
    }

    /// Queues `key` now.
    pub fn add(&self, key: ObjectKey) {
        if let Some(q) = &self.0 {
            q.add(key);
        }
    }
}

impl Ctx {
    /// A context with fresh metrics, no audit log and a statistics sampler that samples
    /// only the VMs runs watch.
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        let metrics = Metrics::new();
        Ctx {
            cache: ObjectCache::new(&store),
            store,
            config,
            vm_stats: VmStatsSampler::new(
                metrics.clone(),
                VmStatsHistory::new(DEFAULT_HISTORY),
                crate::health::Readiness::default(),
            ),
            metrics,
            audit: AuditLog::disabled(),
            egress: Default::default(),
            wake: Wake::default(),
            node: None,
        }
    }
}

/// Makes the world match one kind's objects. Implementations hold their own handles
/// (backend, image cache, ...).
pub trait Reconciler: Send + Sync + 'static {
    /// The kind this reconciler owns.
    fn kind(&self) -> Kind;

    /// Brings the actual state in line with `obj` and writes its status. Called on a
    /// blocking thread; see the module docs for what it may assume.
    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError>;

    /// What to do after [`Reconciler::reconcile`] failed: kube-rs' `error_policy`. Called by
    /// the dispatcher on a blocking thread; the object is not reconciled meanwhile. The
    /// default shows the error in the status ([`show_failure`]) and retries after the
    /// queue's per-object exponential backoff ([`Wake::retry_delay`]).
    fn error_policy(&self, obj: Arc<StoredObject>, err: &ReconcileError, ctx: &Ctx) -> Action {
        show_failure(ctx, err);
        Action::Requeue(ctx.wake.retry_delay(&obj.key()))
    }

    /// Other kinds whose changes (including status) can change this kind's outcome, e.g. a
    /// `VmPool` waits for its `Image` to be `Ready`. A change of any object of these kinds
    /// requeues every object of [`Reconciler::kind`].
    fn watches(&self) -> &[Kind] {
        &[]
    }
}

/// The default error policy's status write: the status `err` carries, with `Degraded` true
/// (and `Progressing` false, `Ready` false unless kept) on the error's reason and message.
/// Nothing when the error carries no status; a failed write is logged (the retry writes
/// again).
pub fn show_failure(ctx: &Ctx, err: &ReconcileError) {
    let Some(shown) = &err.shown else { return };
    if let Err(e) = crate::reconcilers::write_degraded(ctx, shown, err) {
        tracing::warn!(
            "{}/{}: writing the status of a failed reconcile: {e}",
            shown.resource.kind(),
            shown.resource.name()
        );
    }
}

/// Periodic work that is not about one object: garbage collection of owned libvirt objects
/// that no stored object declares. Run on a blocking thread at start and at every resync.
pub trait Sweeper: Send + Sync + 'static {
    /// One pass; errors are logged and the next pass tries again.
    fn sweep(&self, ctx: &Ctx) -> Result<(), ReconcileError>;
}

/// Tuning of the [`Dispatcher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatcherOptions {
    /// Reconciles running at the same time (different objects).
    pub workers: usize,
    /// Every object is requeued this often (default 30 s).
    pub resync: Duration,
    /// First retry delay after a failure (default 1 s).
    pub backoff_base: Duration,
    /// Longest retry delay (default 5 min).
    pub backoff_max: Duration,
}

impl Default for DispatcherOptions {
    fn default() -> Self {
        Self {
            workers: 4,
            resync: Duration::from_secs(30),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

/// Counters of the dispatcher's work.
#[derive(Debug, Default)]
pub struct DispatchStats {
    /// Reconciler calls.
    pub reconciles: AtomicU64,
    /// Reconciler calls that failed (error or panic).
    pub failures: AtomicU64,
    /// Deletions finalized by the dispatcher for kinds without a reconciler.
    pub finalized: AtomicU64,
    /// Keys taken from the queue (including skipped ones).
    pub processed: AtomicU64,
}

/// Delay before retry number `failures` (1-based): base, 2×base, 4×base, ... capped.
pub fn backoff_delay(failures: u32, base: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    base.checked_mul(1u32 << exp).unwrap_or(max).min(max)
}

/// Runs the registered reconcilers over the store's objects.
pub struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<Ctx>,
    reconcilers: HashMap<Kind, Arc<dyn Reconciler>>,
    queue: Arc<WorkQueue>,
    options: DispatcherOptions,
    stats: DispatchStats,
    /// False while this node may not act (a cluster node that is not the leader, or whose
    /// lease lapsed): nothing is reconciled then.
    may_act: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// A handle on a running dispatcher: trigger a resync, read its counters.
#[derive(Clone)]
pub struct DispatcherHandle {
    shared: Arc<Shared>,
}

impl DispatcherHandle {
    /// Queues every stored object now.
    pub fn resync(&self) -> Result<usize, StoreError> {
        self.shared.enqueue_all()
    }

    /// The counters.
    pub fn stats(&self) -> &DispatchStats {
        &self.shared.stats
    }

    /// True when nothing is queued, scheduled or being reconciled.
    pub fn is_idle(&self) -> bool {
        self.shared.queue.is_idle()
    }
}

impl Dispatcher {
    /// A dispatcher over `ctx.store` with `reconcilers` (at most one per kind; a later one
    /// for the same kind replaces the earlier).
    pub fn new(
        mut ctx: Ctx,
        reconcilers: Vec<Arc<dyn Reconciler>>,
        options: DispatcherOptions,
    ) -> Self {
        let queue = Arc::new(WorkQueue::with_backoff(
            options.backoff_base,
            options.backoff_max,
        ));
        ctx.wake = Wake(Some(queue.clone()));
        let reconcilers: HashMap<Kind, Arc<dyn Reconciler>> =
            reconcilers.into_iter().map(|r| (r.kind(), r)).collect();
        for kind in reconcilers.keys() {
            ctx.metrics.reconcile_kind(kind.as_str());
        }
        Self {
            shared: Arc::new(Shared {
                ctx: Arc::new(ctx),
                reconcilers,
                queue,
                options,
                stats: DispatchStats::default(),
                may_act: Arc::new(|| true),
            }),
        }
    }

    /// Reconcile only while `may_act` says so (checked before every reconcile; see
    /// [`agentvm_store::cluster::Membership::may_act`]). Before [`Dispatcher::run`].
    pub fn fenced_by(mut self, may_act: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.may_act = may_act;
        }
        self
    }

    /// A handle usable while [`Dispatcher::run`] runs.
    pub fn handle(&self) -> DispatcherHandle {
        DispatcherHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs until `shutdown` resolves, then lets the reconciles in progress finish.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let shared = self.shared;
        // Subscribe before listing, so nothing applied in between is missed. The objects
        // themselves come from the cache, which observes the store on its own.
        let mut events = shared.ctx.store.subscribe();
        if let Err(e) = shared.enqueue_all() {
            tracing::error!("initial listing of the store failed: {e}");
        }
        let workers: Vec<_> = (0..shared.options.workers.max(1))
            .map(|_| {
                let shared = shared.clone();
                tokio::spawn(async move {
                    while let Some(key) = shared.queue.next().await {
                        shared.process(&key).await;
                        shared.queue.done(&key);
                    }
                })
            })
            .collect();
        let mut resync = tokio::time::interval(shared.options.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await; // the first tick is immediate; the initial listing did that
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = resync.tick() => {
                    if let Err(e) = shared.enqueue_all() {
                        tracing::error!("resync listing failed: {e}");
                    }
                }
                event = events.recv() => match event {
                    Ok(event) => shared.on_event(event.key(), event.change),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("missed {n} store events; resyncing everything");
                        shared.ctx.cache.missed_events();
                        if let Err(e) = shared.enqueue_all() {
                            tracing::error!("resync listing failed: {e}");
                        }
                    }
                    Err(RecvError::Closed) => break,
                },
            }
        }
        shared.queue.shut_down();
        for w in workers {
            let _ = w.await;
        }
    }
}

impl Shared {
    fn enqueue_all(&self) -> Result<usize, StoreError> {
        let objects = self.ctx.cache.list(None)?;
        let n = objects.len();
        for obj in objects {
            self.queue.add(obj.key());
        }
        Ok(n)
    }

    fn enqueue_kind(&self, kind: Kind) {
        match self.ctx.cache.list(Some(kind)) {
            Ok(objects) => objects.iter().for_each(|o| self.queue.add(o.key())),
            Err(e) => tracing::error!("listing {kind} failed: {e}"),
        }
    }

    fn on_event(&self, key: ObjectKey, change: Change) {
        match change {
            Change::Applied | Change::DeleteRequested => self.queue.add(key.clone()),
            Change::StatusChanged | Change::Removed => {}
        }
        let watchers: Vec<Kind> = self
            .reconcilers
            .values()
            .filter(|r| r.watches().contains(&key.kind))
            .map(|r| r.kind())
            .collect();
        for kind in watchers {
            self.enqueue_kind(kind);
        }
    }

    async fn process(self: &Arc<Self>, key: &ObjectKey) {
        if !(self.may_act)() {
            tracing::warn!("{key}: not reconciled: this node may not act (not the cluster's leader, or its lease lapsed)");
            return;
        }
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        let obj = match self.ctx.cache.get(key.kind, &key.name) {
            Ok(Some(obj)) => obj,
            Ok(None) => {
                self.forget(key);
                return;
            }
            Err(e) => {
                tracing::error!("{key}: reading the store failed: {e}");
                self.retry(key, &e.to_string());
                return;
            }
        };
        let Some(reconciler) = self.reconcilers.get(&key.kind).cloned() else {
            if obj.is_deleting() {
                match self.ctx.store.finalize_delete(key.kind, &key.name) {
                    Ok(_) => {
                        self.stats.finalized.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => self.retry(key, &e.to_string()),
                }
            }
            return;
        };
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        let kind = key.kind.as_str();
        let _timer = self.ctx.metrics.reconcile_started(kind);
        let ctx = self.ctx.clone();
        let result = {
            let (reconciler, obj) = (reconciler.clone(), obj.clone());
            tokio::task::spawn_blocking(move || reconciler.reconcile(obj, &ctx)).await
        };
        match result {
            Ok(Ok(action)) => {
                self.queue.forget(key);
                if let Action::Requeue(after) = action {
                    self.queue.add_after(key.clone(), after);
                }
            }
            Ok(Err(e)) => {
                self.ctx.metrics.reconcile_failed(kind, e.reason.as_str());
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let failures = self.queue.record_failure(key);
                let ctx = self.ctx.clone();
                let message = e.to_string();
                let policy =
                    tokio::task::spawn_blocking(move || reconciler.error_policy(obj, &e, &ctx))
                        .await;
                let action = policy.unwrap_or_else(|join| {
                    tracing::error!("{key}: the error policy panicked: {join}");
                    Action::Requeue(self.queue.retry_delay(key))
                });
                self.after_failure(key, failures, action, &message);
            }
            Err(join) => {
                self.ctx
                    .metrics
                    .reconcile_failed(kind, Reason::Panic.as_str());
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let failures = self.queue.record_failure(key);
                let action = Action::Requeue(self.queue.retry_delay(key));
                self.after_failure(
                    key,
                    failures,
                    action,
                    &format!("reconciler panicked: {join}"),
                );
            }
        }
    }

    fn forget(&self, key: &ObjectKey) {
        self.queue.forget(key);
    }

    /// A failure not about a reconciler (reading the store, finalizing): backoff.
    fn retry(&self, key: &ObjectKey, error: &str) {
        let failures = self.queue.record_failure(key);
        let action = Action::Requeue(self.queue.retry_delay(key));
        self.after_failure(key, failures, action, error);
    }

    fn after_failure(&self, key: &ObjectKey, failures: u32, action: Action, error: &str) {
        match action {
            Action::Requeue(delay) => {
                tracing::warn!(
                    "reconcile {key} failed (attempt {failures}, retrying in {delay:?}): {error}"
                );
                self.queue.add_after(key.clone(), delay);
            }
            Action::AwaitChange => {
                tracing::warn!("reconcile {key} failed (attempt {failures}): {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::{Image, ImageSpec, Resource};
    use agentvm_store::{ApplyOptions, Manager, STORE_FILE};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Counts calls per object, can fail the first N calls, detects overlapping calls.
    struct Recorder {
        kind: Kind,
        calls: Mutex<HashMap<String, Vec<Instant>>>,
        fail_first: usize,
        in_flight: Mutex<HashMap<String, bool>>,
        overlaps: AtomicUsize,
        hold: Duration,
        finalize: bool,
        action: Action,
    }

    impl Recorder {
        fn new(kind: Kind) -> Self {
            Self {
                kind,
                calls: Mutex::default(),
                fail_first: 0,
                in_flight: Mutex::default(),
                overlaps: AtomicUsize::new(0),
                hold: Duration::ZERO,
                finalize: true,
                action: Action::AwaitChange,
            }
        }

        fn count(&self, name: &str) -> usize {
            self.calls.lock().unwrap().get(name).map_or(0, Vec::len)
        }
    }

    impl Reconciler for Recorder {
        fn kind(&self) -> Kind {
            self.kind
        }

        fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
            let name = obj.resource.name().to_string();
            {
                let mut f = self.in_flight.lock().unwrap();
                if f.insert(name.clone(), true) == Some(true) {
                    self.overlaps.fetch_add(1, Ordering::SeqCst);
                }
            }
            std::thread::sleep(self.hold);
            let n = {
                let mut calls = self.calls.lock().unwrap();
                let v = calls.entry(name.clone()).or_default();
                v.push(Instant::now());
                v.len()
            };
            self.in_flight.lock().unwrap().insert(name.clone(), false);
            if n <= self.fail_first {
                return Err(ReconcileError::new(
                    Reason::LibvirtError,
                    format!("failure {n}"),
                ));
            }
            if obj.is_deleting() && self.finalize {
                ctx.store.finalize_delete(obj.resource.kind(), &name)?;
            }
            Ok(self.action)
        }
    }

    fn image(name: &str) -> Resource {
        Image::new(name, ImageSpec::default()).into()
    }

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        (dir, store)
    }

    fn ctx(store: &Store) -> Ctx {
        Ctx::new(store.clone(), Arc::new(Config::default()))
    }

    fn fast() -> DispatcherOptions {
        DispatcherOptions {
            workers: 4,
            resync: Duration::from_secs(3600),
            backoff_base: Duration::from_millis(20),
            backoff_max: Duration::from_millis(80),
        }
    }

    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn apply(store: &Store, r: Resource) {
        store
            .apply(r, Manager::Api, ApplyOptions::default())
            .unwrap();
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let (b, m) = (Duration::from_secs(1), Duration::from_secs(300));
        let delays: Vec<u64> = (1..=11).map(|n| backoff_delay(n, b, m).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff_delay(u32::MAX, b, m), m);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconciles_existing_and_new_objects() {
        let (_d, store) = setup();
        apply(&store, image("a"));
        let rec = Arc::new(Recorder::new(Kind::Image));
        let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        eventually("initial reconcile", || rec.count("a") == 1).await;
        apply(&store, image("b"));
        eventually("reconcile of a new object", || rec.count("b") == 1).await;
        // A status write does not retrigger the object itself.
        store
            .update_status_json(Kind::Image, "a", serde_json::json!({"phase": "Ready"}))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rec.count("a"), 1);
        tx.send(()).unwrap();
        task.await.unwrap();
    }

    /// Fails every pass with an error carrying a status; the error policy is either the
    /// default or one that waits for a change.
    struct Failing {
        policy_calls: AtomicUsize,
        calls: AtomicUsize,
        default_policy: bool,
    }

    impl Reconciler for Failing {
        fn kind(&self) -> Kind {
            Kind::Image
        }
        fn reconcile(&self, obj: Arc<StoredObject>, _: &Ctx) -> Result<Action, ReconcileError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let status = agentvm_api::ImageStatus {
                phase: agentvm_api::ImagePhase::Failed,
                ..Default::default()
            };
            Err(ReconcileError::new(Reason::BuildFailed, "no mirror").with_status(&obj, &status))
        }
        fn error_policy(&self, obj: Arc<StoredObject>, err: &ReconcileError, ctx: &Ctx) -> Action {
            self.policy_calls.fetch_add(1, Ordering::SeqCst);
            if self.default_policy {
                show_failure(ctx, err);
                return Action::Requeue(ctx.wake.retry_delay(&obj.key()));
            }
            Action::AwaitChange
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_error_policy_shows_the_failure_and_picks_the_retry() {
        for default_policy in [true, false] {
            let (_d, store) = setup();
            apply(&store, image("img"));
            let rec = Arc::new(Failing {
                policy_calls: AtomicUsize::new(0),
                calls: AtomicUsize::new(0),
                default_policy,
            });
            let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(dispatcher.run(async {
                let _ = rx.await;
            }));
            eventually("a failure", || rec.policy_calls.load(Ordering::SeqCst) >= 1).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            // Stopped first: a pass in progress finishes, its failure with its policy.
            tx.send(()).unwrap();
            task.await.unwrap();
            let calls = rec.calls.load(Ordering::SeqCst);
            assert_eq!(rec.policy_calls.load(Ordering::SeqCst), calls);
            if default_policy {
                // Retried with the backoff (20, 40, 80, 80 ms ...), shown as Degraded.
                assert!(calls >= 3, "{calls} calls");
                let s = store
                    .get(Kind::Image, "img")
                    .unwrap()
                    .unwrap()
                    .status_json();
                assert_eq!(s["phase"], "Failed");
                let degraded = s["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == "Degraded")
                    .unwrap()
                    .clone();
                assert_eq!(degraded["status"], "True");
                assert_eq!(degraded["reason"], "BuildFailed");
                assert_eq!(degraded["message"], "no mirror");
            } else {
                // AwaitChange: no retry until something changes.
                assert_eq!(calls, 1);
                let obj = store.get(Kind::Image, "img").unwrap().unwrap();
                assert!(<agentvm_api::ImageStatus as KindStatus>::of(&obj.resource).is_none());
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_back_off_exponentially_then_succeed() {
        let (_d, store) = setup();
        apply(&store, image("flaky"));
        let mut rec = Recorder::new(Kind::Image);
        rec.fail_first = 4;
        let rec = Arc::new(rec);
        let ctx = ctx(&store);
        let metrics = ctx.metrics.clone();
        let dispatcher = Dispatcher::new(ctx, vec![rec.clone()], fast());
        let handle = dispatcher.handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        eventually("five calls", || rec.count("flaky") == 5).await;
        let calls = rec.calls.lock().unwrap()["flaky"].clone();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        // 20, 40, 80, 80 ms (capped), each at least its backoff.
        for (gap, min_ms) in gaps.iter().zip([20u64, 40, 80, 80]) {
            assert!(*gap >= Duration::from_millis(min_ms), "{gaps:?}");
        }
        assert!(gaps[1] > gaps[0] && gaps[2] > gaps[1], "{gaps:?}");
        // After the success: no more retries.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rec.count("flaky"), 5);
        assert_eq!(handle.stats().failures.load(Ordering::Relaxed), 4);
        // The same counts as metrics, failures labelled by the error's reason.
        let text = metrics.render();
        for line in [
            "agentvm_reconcile_runs_total{kind=\"Image\"} 5",
            "agentvm_reconcile_failures_total{kind=\"Image\",reason=\"LibvirtError\"} 4",
            "agentvm_reconcile_duration_seconds_count{kind=\"Image\"} 5",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in:\n{text}");
        }
        tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_object_is_never_reconciled_concurrently() {
        let (_d, store) = setup();
        for i in 0..4 {
            apply(&store, image(&format!("o{i}")));
        }
        let mut rec = Recorder::new(Kind::Image);
        rec.hold = Duration::from_millis(30);
        let rec = Arc::new(rec);
        let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
        let handle = dispatcher.handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        // Hammer the same objects with triggers while they are being reconciled.
        for _ in 0..10 {
            handle.resync().unwrap();
            let mut labelled = image("o0");
            labelled
                .metadata_mut()
                .labels
                .insert("n".into(), format!("{}", rec.count("o0")));
            apply(&store, labelled);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eventually("idle", || handle.is_idle()).await;
        assert_eq!(rec.overlaps.load(Ordering::SeqCst), 0);
        // Triggers during a pass coalesce: far fewer calls than triggers, but the last
        // change is always seen (a call after the last trigger).
        let n = rec.count("o0");
        assert!((2..=20).contains(&n), "{n} calls");
        tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deletion_waits_for_the_reconciler_and_kinds_without_one_are_finalized() {
        let (_d, store) = setup();
        apply(&store, image("img"));
        let run = agentvm_api::AgentRun::new(
            "r",
            agentvm_api::AgentRunSpec::command("p", "true", vec![]),
        );
        apply(&store, run.into());
        let mut rec = Recorder::new(Kind::Image);
        rec.fail_first = 1;
        rec.action = Action::Requeue(Duration::from_secs(3600));
        let rec = Arc::new(rec);
        let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        eventually("first pass", || rec.count("img") >= 2).await;
        store.request_delete(Kind::AgentRun, "r", None).unwrap();
        store.request_delete(Kind::Image, "img", None).unwrap();
        eventually("both removed", || store.is_empty().unwrap()).await;
        // The AgentRun (no reconciler) was untouched apart from removal; the Image went
        // through its reconciler.
        assert_eq!(rec.count("img"), 3);
        tx.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watched_kinds_requeue_the_watcher() {
        struct PoolWatcher(AtomicUsize);
        impl Reconciler for PoolWatcher {
            fn kind(&self) -> Kind {
                Kind::VmPool
            }
            fn reconcile(&self, _: Arc<StoredObject>, _: &Ctx) -> Result<Action, ReconcileError> {
                self.0.fetch_add(1, Ordering::SeqCst);
                Ok(Action::AwaitChange)
            }
            fn watches(&self) -> &[Kind] {
                &[Kind::Image]
            }
        }
        let (_d, store) = setup();
        let pool = agentvm_api::parse_str(
            "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {name: p}\nspec:\n  template: {imageRef: img}\n",
            "p.yaml",
        )
        .unwrap()
        .remove(0)
        .resource;
        apply(&store, pool);
        apply(&store, image("img"));
        let rec = Arc::new(PoolWatcher(AtomicUsize::new(0)));
        let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        eventually("initial", || rec.0.load(Ordering::SeqCst) == 1).await;
        store
            .update_status_json(Kind::Image, "img", serde_json::json!({"phase": "Ready"}))
            .unwrap();
        eventually("requeue on image status", || {
            rec.0.load(Ordering::SeqCst) == 2
        })
        .await;
        tx.send(()).unwrap();
        task.await.unwrap();
    }

    /// Prints the time of a no-op resync over 1,000 objects (run with `--nocapture`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn noop_resync_of_1000_objects() {
        let (_d, store) = setup();
        let items: Vec<_> = (0..1000)
            .map(|i| agentvm_store::ApplyItem {
                resource: image(&format!("img-{i:04}")),
                manager: Manager::Api,
                submitter: agentvm_store::caller::Caller::root(),
                force: false,
            })
            .collect();
        let t = Instant::now();
        let results = store.apply_batch(items, false).unwrap();
        let apply_time = t.elapsed();
        assert!(results.iter().all(|r| r.is_ok()));
        let rec = Arc::new(Recorder::new(Kind::Image));
        let dispatcher = Dispatcher::new(ctx(&store), vec![rec.clone()], fast());
        let handle = dispatcher.handle();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(dispatcher.run(async {
            let _ = rx.await;
        }));
        eventually("initial sync", || {
            handle.stats().reconciles.load(Ordering::Relaxed) == 1000 && handle.is_idle()
        })
        .await;
        let t = Instant::now();
        assert_eq!(handle.resync().unwrap(), 1000);
        eventually("resync", || {
            handle.stats().reconciles.load(Ordering::Relaxed) == 2000 && handle.is_idle()
        })
        .await;
        let resync_time = t.elapsed();
        println!(
            "apply_batch of 1000 objects: {apply_time:?}; no-op resync of 1000 objects: {resync_time:?}"
        );
        tx.send(()).unwrap();
        task.await.unwrap();
    }
}
