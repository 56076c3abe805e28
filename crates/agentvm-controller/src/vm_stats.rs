//! `VmStatsSampler`: the one sampler of VM statistics. One thread (`vm-stats`) samples every
//! running VM of the backend periodically, publishes the per-VM metrics and keeps the latest
//! samples of each VM (a ring buffer); in between, it samples the VMs that running runs
//! watch ([`VmStatsSampler::watch`]) as often as each watch asks, and hands each of them its
//! VM's samples — the run monitor's anomaly rules get their domain statistics from here.
//!
//! Where samples come from is a [`StatsSource`]: [`BackendStatsSource`] (the backend's one
//! reconnecting connection) in the controller, a closure in tests. The sampler tolerates it
//! failing (libvirt down): the failure is shown by `agentvm_libvirt_up 0` and `/readyz`, the
//! watches get the error, and the next tick tries again.
//!
//! Guarantees: at most one sampling thread per sampler (and its clones); a watch gets its
//! first sample at once and then one about every interval it asked for, and is removed when
//! dropped. The thread ends when the sampler is stopped or every handle on it is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use agentvm_backend::libvirt::DomainState;
use agentvm_backend::stats::DomainStats;
use agentvm_backend::Backend;

use crate::health::Readiness;
use crate::metrics::Metrics;

/// Samples kept per VM by default (10 minutes at the default 5 s interval).
pub const DEFAULT_HISTORY: usize = 120;

/// One VM's statistics at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSample {
    /// The VM (its libvirt domain name).
    pub vm_id: String,
    /// Its vCPU count, when known (CPU percent is per vCPU then).
    pub vcpus: Option<u32>,
    /// The counters.
    pub stats: DomainStats,
}

/// Yields samples of running VMs. Called on the sampler's thread; an error means no VM
/// could be sampled (e.g. libvirt is unreachable).
pub trait StatsSource: Send + 'static {
    /// Samples every running VM now.
    fn sample(&mut self) -> Result<Vec<VmSample>, String>;

    /// Samples VM `vm` now. By default: [`StatsSource::sample`], and its sample of `vm`.
    fn sample_vm(&mut self, vm: &str) -> Result<DomainStats, String> {
        self.sample()?
            .into_iter()
            .find(|s| s.vm_id == vm)
            .map(|s| s.stats)
            .ok_or_else(|| format!("VM {vm} is not running"))
    }
}

impl<F> StatsSource for F
where
    F: FnMut() -> Result<Vec<VmSample>, String> + Send + 'static,
{
    fn sample(&mut self) -> Result<Vec<VmSample>, String> {
        self()
    }
}

/// Samples the running VMs of a backend (for [`agentvm_backend::LibvirtBackend`]: the owned
/// domains of its state directory, through its one connection, reopened after libvirtd
/// restarts).
pub struct BackendStatsSource {
    backend: Arc<dyn Backend>,
}

impl BackendStatsSource {
    /// A source sampling `backend`'s VMs.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

impl StatsSource for BackendStatsSource {
    fn sample(&mut self) -> Result<Vec<VmSample>, String> {
        let vms = self.backend.list_vms().map_err(|e| e.to_string())?;
        Ok(vms
            .into_iter()
            .filter(|vm| vm.state == DomainState::Running)
            // A VM may stop between listing and sampling: skip it.
            .filter_map(|vm| {
                let stats = self.backend.vm_stats(&vm.name).ok()?;
                Some(VmSample {
                    vcpus: self.backend.vm_vcpus(&vm.name).ok(),
                    vm_id: vm.name,
                    stats,
                })
            })
            .collect())
    }

    fn sample_vm(&mut self, vm: &str) -> Result<DomainStats, String> {
        self.backend.vm_stats(vm).map_err(|e| e.to_string())
    }
}

/// The latest samples of every sampled VM, oldest first. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct VmStatsHistory {
    inner: Arc<Mutex<HashMap<String, VecDeque<VmSample>>>>,
    capacity: usize,
}

impl VmStatsHistory {
    /// An empty history keeping `capacity` (at least 2) samples per VM.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            capacity: capacity.max(2),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<VmSample>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// VM `vm`'s kept samples, oldest first (empty if it is not sampled).
    pub fn samples(&self, vm: &str) -> Vec<VmSample> {
        self.lock()
            .get(vm)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// VM `vm`'s newest sample.
    pub fn latest(&self, vm: &str) -> Option<VmSample> {
        self.lock().get(vm).and_then(|q| q.back().cloned())
    }

    /// The VMs with samples, sorted.
    pub fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

/// Turns samples into metrics, history and the watches' feeds. See the module docs.
/// Clones share one sampler.
#[derive(Clone)]
pub struct VmStatsSampler {
    metrics: Metrics,
    history: VmStatsHistory,
    health: Readiness,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for VmStatsSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmStatsSampler")
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

/// What the sampling thread works from, shared by the sampler's handles.
#[derive(Default)]
struct Shared {
    plan: Mutex<Plan>,
    /// Wakes the thread when the plan changes (a new watch, a sample asked for, stop).
    changed: Condvar,
    source: Mutex<Option<Box<dyn StatsSource>>>,
}

/// When to sample what.
#[derive(Default)]
struct Plan {
    /// A thread is sampling.
    running: bool,
    /// The thread is to end.
    stop: bool,
    /// Every VM at this interval (metrics, history); `None`: only watched VMs.
    every: Option<Duration>,
    next_full: Option<Instant>,
    watches: Vec<WatchEntry>,
    next_id: u64,
}

struct WatchEntry {
    id: u64,
    vm: String,
    every: Duration,
    due: Instant,
    feed: mpsc::Sender<Result<DomainStats, String>>,
}

impl Plan {
    /// What is due at `now`: whether every VM is (a full sample), and the watched VMs that
    /// are, sorted; `None` when nothing is.
    fn due(&self, now: Instant) -> Option<(bool, Vec<String>)> {
        let full = self.every.is_some() && self.next_full.is_some_and(|t| t <= now);
        let mut vms: Vec<String> = self
            .watches
            .iter()
            .filter(|w| w.due <= now)
            .map(|w| w.vm.clone())
            .collect();
        vms.sort();
        vms.dedup();
        (full || !vms.is_empty()).then_some((full, vms))
    }

    /// Next time anything is due.
    fn next_due(&self) -> Option<Instant> {
        let watches = self.watches.iter().map(|w| w.due).min();
        match (self.every.and(self.next_full), watches) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A run's feed of its VM's samples from the [`VmStatsSampler`]; removed when dropped.
pub struct VmStatsWatch {
    shared: Weak<Shared>,
    id: u64,
    feed: mpsc::Receiver<Result<DomainStats, String>>,
}

impl std::fmt::Debug for VmStatsWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmStatsWatch")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl VmStatsWatch {
    /// The next sample (or why none could be taken), waiting at most `wait`.
    pub fn next(&self, wait: Duration) -> Option<Result<DomainStats, String>> {
        self.feed.recv_timeout(wait).ok()
    }

    /// A fresh sample: asks the sampling thread for one at once (one in progress when asked
    /// counts) and waits for it at most `wait`.
    pub fn now(&self, wait: Duration) -> Option<Result<DomainStats, String>> {
        let shared = self.shared.upgrade()?;
        while self.feed.try_recv().is_ok() {}
        {
            let mut plan = lock(&shared.plan);
            if let Some(w) = plan.watches.iter_mut().find(|w| w.id == self.id) {
                w.due = Instant::now();
            }
        }
        shared.changed.notify_all();
        drop(shared);
        self.next(wait)
    }
}

impl agentvm_run::monitor::StatsFeed for VmStatsWatch {
    fn next(&self, wait: Duration) -> Option<Result<DomainStats, String>> {
        VmStatsWatch::next(self, wait)
    }

    fn now(&self, wait: Duration) -> Option<Result<DomainStats, String>> {
        VmStatsWatch::now(self, wait)
    }
}

impl Drop for VmStatsWatch {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            lock(&shared.plan).watches.retain(|w| w.id != self.id);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Memory the guest uses: balloon `available - usable` (or `- unused`) when the guest reports
/// them, else QEMU's resident set, else the balloon size.
pub fn memory_used_bytes(s: &DomainStats) -> Option<u64> {
    agentvm_run::anomaly::guest_memory_used(s).or(s.memory_rss_bytes.or(s.memory_actual_bytes))
}

/// Growth of a cumulative counter between two readings; a counter that went backwards
/// (QEMU restarted) counts from zero.
fn counter_delta(new: u64, old: Option<u64>) -> u64 {
    match old {
        Some(old) if new >= old => new - old,
        _ => new,
    }
}

/// Longest the thread sleeps at once, so that it notices when every handle is gone.
const MAX_SLEEP: Duration = Duration::from_millis(200);

impl VmStatsSampler {
    /// A sampler publishing into `metrics` and `health`, keeping `history`. It samples
    /// nothing before [`VmStatsSampler::start`] or a [`VmStatsSampler::watch`].
    pub fn new(metrics: Metrics, history: VmStatsHistory, health: Readiness) -> Self {
        Self {
            metrics,
            history,
            health,
            shared: Arc::default(),
        }
    }

    /// The history this sampler fills.
    pub fn history(&self) -> &VmStatsHistory {
        &self.history
    }

    /// Applies one sampling result: per-VM CPU percent (against the VM's previous sample),
    /// memory, disk counters; removes every series and the history of VMs sampled before
    /// and absent now. A failed sample changes no VM series and marks libvirt down.
    pub fn record(&self, result: Result<Vec<VmSample>, String>) {
        let samples = match result {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("VM statistics sample failed: {e}");
                self.metrics.libvirt_up(false);
                self.health.set_libvirt(Err(e));
                return;
            }
        };
        self.metrics.libvirt_up(true);
        self.health.set_libvirt(Ok(()));
        let mut history = self.history.lock();
        let present: std::collections::HashSet<&str> =
            samples.iter().map(|s| s.vm_id.as_str()).collect();
        let gone: Vec<String> = history
            .keys()
            .filter(|vm| !present.contains(vm.as_str()))
            .cloned()
            .collect();
        for vm in gone {
            history.remove(&vm);
            self.metrics.vm_removed(&vm);
        }
        for sample in samples {
            let vm = sample.vm_id.as_str();
            let queue = history.entry(vm.to_string()).or_default();
            let prev = queue.back().map(|p| &p.stats);
            if let Some(usage) = prev.and_then(|p| sample.stats.cpu_usage_since(p)) {
                let per = sample.vcpus.filter(|&n| n > 0).unwrap_or(1) as f64;
                self.metrics.vm_cpu_percent(vm, usage * 100.0 / per);
            }
            if let Some(bytes) = memory_used_bytes(&sample.stats) {
                self.metrics.vm_memory_bytes(vm, bytes);
            }
            self.metrics.vm_disk_bytes(
                vm,
                counter_delta(sample.stats.block_rd_bytes, prev.map(|p| p.block_rd_bytes)),
                counter_delta(sample.stats.block_wr_bytes, prev.map(|p| p.block_wr_bytes)),
            );
            if queue.len() == self.history.capacity {
                queue.pop_front();
            }
            queue.push_back(sample);
        }
    }

    /// Samples every VM of `source` now and then every `every` (and the watched VMs as
    /// their watches ask) on the sampling thread, until [`VmStatsSampler::stop`].
    pub fn start(&self, source: Box<dyn StatsSource>, every: Duration) -> std::io::Result<()> {
        *lock(&self.shared.source) = Some(source);
        {
            let mut plan = lock(&self.shared.plan);
            plan.every = Some(every.max(Duration::from_millis(100)));
            plan.next_full = Some(Instant::now());
            plan.stop = false;
        }
        self.spawn()
    }

    /// Ends the sampling thread (after the sample in progress).
    pub fn stop(&self) {
        lock(&self.shared.plan).stop = true;
        self.shared.changed.notify_all();
    }

    /// Samples `source` now and then every `every` until `shutdown` resolves.
    pub async fn run(
        self,
        source: Box<dyn StatsSource>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        if let Err(e) = self.start(source, every) {
            tracing::error!("VM statistics not sampled: cannot start the sampling thread: {e}");
            return;
        }
        shutdown.await;
        self.stop();
    }

    /// A feed of VM `vm`'s samples: the first at once, then about one every `every`. When
    /// the sampler has no source yet (no [`VmStatsSampler::start`]: a context without the
    /// controller's sampler), `fallback` becomes its source, for watched VMs only.
    pub fn watch(
        &self,
        vm: &str,
        every: Duration,
        fallback: impl FnOnce() -> Box<dyn StatsSource>,
    ) -> std::io::Result<VmStatsWatch> {
        {
            let mut source = lock(&self.shared.source);
            if source.is_none() {
                *source = Some(fallback());
            }
        }
        let (tx, feed) = mpsc::channel();
        let id = {
            let mut plan = lock(&self.shared.plan);
            plan.next_id += 1;
            let id = plan.next_id;
            plan.watches.push(WatchEntry {
                id,
                vm: vm.to_string(),
                every: every.max(Duration::from_millis(10)),
                due: Instant::now(),
                feed: tx,
            });
            id
        };
        self.shared.changed.notify_all();
        let watch = VmStatsWatch {
            shared: Arc::downgrade(&self.shared),
            id,
            feed,
        };
        self.spawn()?;
        Ok(watch)
    }

    /// Starts the sampling thread unless one runs.
    fn spawn(&self) -> std::io::Result<()> {
        {
            let mut plan = lock(&self.shared.plan);
            if plan.running {
                drop(plan);
                self.shared.changed.notify_all();
                return Ok(());
            }
            plan.running = true;
        }
        let weak = Arc::downgrade(&self.shared);
        // The thread records through a handle of its own that does not keep the shared
        // plan alive: only `weak` reaches it.
        let recorder = VmStatsSampler {
            metrics: self.metrics.clone(),
            history: self.history.clone(),
            health: self.health.clone(),
            shared: Arc::default(),
        };
        let spawned = std::thread::Builder::new()
            .name("vm-stats".into())
            .spawn(move || recorder.sampling_loop(weak));
        if let Err(e) = spawned {
            lock(&self.shared.plan).running = false;
            return Err(e);
        }
        Ok(())
    }

    /// The sampling thread: `self` is a recorder (metrics, history, health); the plan and
    /// the source are in `weak`, which ends the thread when every handle is gone.
    fn sampling_loop(self, weak: Weak<Shared>) {
        loop {
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let now = Instant::now();
            let (full, due) = {
                let mut plan = lock(&shared.plan);
                if plan.stop {
                    plan.running = false;
                    return;
                }
                match plan.due(now) {
                    Some(due) => due,
                    None => {
                        let wait = plan
                            .next_due()
                            .map_or(MAX_SLEEP, |t| t.saturating_duration_since(now))
                            .min(MAX_SLEEP);
                        let _ = shared
                            .changed
                            .wait_timeout(plan, wait)
                            .unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                }
            };
            let mut source = lock(&shared.source);
            let Some(src) = source.as_mut() else {
                drop(source);
                std::thread::sleep(MAX_SLEEP);
                continue;
            };
            let mut taken: HashMap<String, Result<DomainStats, String>> = HashMap::new();
            if full {
                let result = src.sample();
                if let Ok(samples) = &result {
                    for s in samples {
                        taken.insert(s.vm_id.clone(), Ok(s.stats.clone()));
                    }
                }
                self.record(result);
                let mut plan = lock(&shared.plan);
                plan.next_full = plan.every.map(|every| now + every);
            }
            for vm in due {
                if let std::collections::hash_map::Entry::Vacant(e) = taken.entry(vm) {
                    let sample = src.sample_vm(e.key());
                    e.insert(sample);
                }
            }
            drop(source);
            let mut plan = lock(&shared.plan);
            let done = Instant::now();
            for w in plan.watches.iter_mut() {
                if let Some(sample) = taken.get(&w.vm) {
                    // A dropped receiver's entry goes with its watch.
                    let _ = w.feed.send(sample.clone());
                    w.due = done + w.every;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn stats(at: Instant, cpu_ns: u64, rd: u64, wr: u64) -> DomainStats {
        DomainStats {
            cpu_time_ns: cpu_ns,
            memory_rss_bytes: Some(500 << 20),
            memory_actual_bytes: Some(1 << 30),
            memory_available_bytes: Some(1000 << 20),
            memory_unused_bytes: Some(600 << 20),
            memory_usable_bytes: None,
            block_rd_bytes: rd,
            block_wr_bytes: wr,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            at,
        }
    }

    fn sample(vm: &str, vcpus: u32, s: DomainStats) -> VmSample {
        VmSample {
            vm_id: vm.into(),
            vcpus: Some(vcpus),
            stats: s,
        }
    }

    fn line(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix)?.trim().parse().ok())
    }

    #[test]
    fn samples_become_metrics_history_and_disappear_with_their_vm() {
        let metrics = Metrics::new();
        let health = Readiness::default();
        health.set_store_open(true);
        health.set_dispatcher_running(true);
        let sampler = VmStatsSampler::new(metrics.clone(), VmStatsHistory::new(3), health.clone());
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(5);
        sampler.record(Ok(vec![
            sample("vm-a", 2, stats(t0, 0, 1000, 5000)),
            sample("vm-b", 1, stats(t0, 0, 0, 0)),
        ]));
        // vm-a: 5 s of CPU over 5 s of wall on 2 vCPUs = 50 %.
        sampler.record(Ok(vec![
            sample("vm-a", 2, stats(t1, 5_000_000_000, 1500, 9000)),
            sample("vm-b", 1, stats(t1, 1_000_000_000, 0, 0)),
        ]));
        let text = metrics.render();
        assert_eq!(
            line(&text, "agent_vm_cpu_usage_percent{vm_id=\"vm-a\"}"),
            Some(50.0)
        );
        assert_eq!(
            line(&text, "agent_vm_cpu_usage_percent{vm_id=\"vm-b\"}"),
            Some(20.0)
        );
        // Counters follow the cumulative values.
        assert_eq!(
            line(&text, "agent_vm_disk_read_bytes_total{vm_id=\"vm-a\"}"),
            Some(1500.0)
        );
        assert_eq!(
            line(&text, "agent_vm_disk_write_bytes_total{vm_id=\"vm-a\"}"),
            Some(9000.0)
        );
        // Guest-used memory: available - unused.
        assert_eq!(
            line(&text, "agent_vm_memory_usage_bytes{vm_id=\"vm-a\"}"),
            Some((400u64 << 20) as f64)
        );
        assert_eq!(line(&text, "agentvm_libvirt_up"), Some(1.0));
        assert!(health.check().is_ok());

        // QEMU restarted under vm-a: its counters restart, ours keep growing.
        let t2 = t1 + Duration::from_secs(5);
        sampler.record(Ok(vec![sample("vm-a", 2, stats(t2, 1_000, 100, 100))]));
        let text = metrics.render();
        assert_eq!(
            line(&text, "agent_vm_disk_write_bytes_total{vm_id=\"vm-a\"}"),
            Some(9100.0)
        );
        // vm-b disappeared: no series, no history.
        assert!(!text.contains("vm-b"), "{text}");
        assert_eq!(sampler.history().vms(), ["vm-a"]);
        // The ring buffer keeps the newest 3.
        let t3 = t2 + Duration::from_secs(5);
        sampler.record(Ok(vec![sample("vm-a", 2, stats(t3, 2_000, 100, 100))]));
        let kept = sampler.history().samples("vm-a");
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].stats.at, t1);
        assert_eq!(sampler.history().latest("vm-a").unwrap().stats.at, t3);
    }

    #[test]
    fn an_unreachable_libvirt_keeps_series_and_is_not_ready() {
        let metrics = Metrics::new();
        let health = Readiness::default();
        health.set_store_open(true);
        health.set_dispatcher_running(true);
        health.require_libvirt();
        let sampler = VmStatsSampler::new(metrics.clone(), VmStatsHistory::new(4), health.clone());
        assert!(health.check().unwrap_err().contains("not sampled yet"));
        let t0 = Instant::now();
        sampler.record(Ok(vec![sample("vm-a", 1, stats(t0, 0, 1, 1))]));
        sampler.record(Err("cannot connect to qemu:///system".into()));
        let text = metrics.render();
        assert!(text.contains("agentvm_libvirt_up 0"));
        assert!(text.contains("vm_id=\"vm-a\""), "{text}");
        let why = health.check().unwrap_err();
        assert!(why.contains("cannot connect"), "{why}");
    }

    #[tokio::test]
    async fn the_task_samples_until_shut_down() {
        let metrics = Metrics::new();
        let sampler = VmStatsSampler::new(
            metrics.clone(),
            VmStatsHistory::new(4),
            Readiness::default(),
        );
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = calls.clone();
        let source = move || {
            let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u64;
            Ok(vec![VmSample {
                vm_id: "vm-x".into(),
                vcpus: None,
                stats: stats(Instant::now(), n, n, n),
            }])
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sampler.clone().run(
            Box::new(source),
            Duration::from_millis(100),
            async {
                let _ = rx.await;
            },
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while sampler.history().samples("vm-x").len() < 2 {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(()).unwrap();
        task.await.unwrap();
        assert!(calls.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    }

    #[test]
    fn backend_source_on_the_test_driver_lists_only_owned_domains() {
        // test:///default has one foreign domain ("test"), which is not sampled.
        let dir = tempfile::tempdir().unwrap();
        let backend = agentvm_backend::LibvirtBackend::new(
            "test:///default",
            dir.path(),
            agentvm_backend::AcceleratorChoice::Tcg,
            Duration::from_secs(5),
        );
        let mut src = BackendStatsSource::new(Arc::new(backend));
        let samples = src.sample().unwrap();
        assert!(samples.iter().all(|s| s.vm_id != "test"), "{samples:?}");
        // An unknown URI is an error, not a panic.
        let bad = agentvm_backend::LibvirtBackend::new(
            "nope:///nothing",
            dir.path(),
            agentvm_backend::AcceleratorChoice::Tcg,
            Duration::from_secs(5),
        );
        assert!(BackendStatsSource::new(Arc::new(bad)).sample().is_err());
    }

    /// A source counting its calls: every VM in `vms`, with a CPU counter that grows.
    struct Counting {
        vms: Vec<&'static str>,
        full: Arc<std::sync::atomic::AtomicUsize>,
        single: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl StatsSource for Counting {
        fn sample(&mut self) -> Result<Vec<VmSample>, String> {
            let n = self.full.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as u64;
            Ok(self
                .vms
                .iter()
                .map(|vm| sample(vm, 1, stats(Instant::now(), n, n, n)))
                .collect())
        }

        fn sample_vm(&mut self, vm: &str) -> Result<DomainStats, String> {
            self.single
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if self.vms.contains(&vm) {
                Ok(stats(Instant::now(), 0, 0, 0))
            } else {
                Err(format!("VM {vm} is not running"))
            }
        }
    }

    fn counting(
        vms: Vec<&'static str>,
    ) -> (
        Counting,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let (full, single) = (Arc::default(), Arc::default());
        (
            Counting {
                vms,
                full: Arc::clone(&full),
                single: Arc::clone(&single),
            },
            full,
            single,
        )
    }

    #[test]
    fn one_thread_feeds_the_metrics_and_each_watch_at_its_own_pace() {
        let metrics = Metrics::new();
        let sampler = VmStatsSampler::new(
            metrics.clone(),
            VmStatsHistory::new(4),
            Readiness::default(),
        );
        let (src, full, single) = counting(vec!["vm-a", "vm-b"]);
        // Every VM once an hour: the first full sample now, the next long after the test.
        sampler
            .start(Box::new(src), Duration::from_secs(3600))
            .unwrap();
        let watch = sampler
            .watch("vm-a", Duration::from_millis(20), || {
                unreachable!("has a source")
            })
            .unwrap();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < 5 {
            assert!(
                Instant::now() < deadline,
                "only {got} samples for the watch"
            );
            if let Some(s) = watch.next(Duration::from_millis(100)) {
                s.unwrap();
                got += 1;
            }
        }
        // The watched VM alone was sampled in between; every VM once, for the metrics.
        assert_eq!(full.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(single.load(std::sync::atomic::Ordering::SeqCst) >= 3);
        assert_eq!(sampler.history().vms(), ["vm-a", "vm-b"]);
        assert!(metrics.render().contains("agentvm_libvirt_up 1"));
        // A VM that is not running: the watch hears why.
        let gone = sampler
            .watch("vm-z", Duration::from_millis(20), || unreachable!())
            .unwrap();
        let why = gone.next(Duration::from_secs(5)).unwrap().unwrap_err();
        assert!(why.contains("not running"), "{why}");
        // A sample asked for now arrives at once, without waiting for the interval.
        let slow = sampler
            .watch("vm-b", Duration::from_secs(3600), || unreachable!())
            .unwrap();
        slow.next(Duration::from_secs(5)).unwrap().unwrap();
        slow.now(Duration::from_secs(5)).unwrap().unwrap();
        drop((watch, gone, slow));
        assert!(lock(&sampler.shared.plan).watches.is_empty());
        sampler.stop();
    }

    #[test]
    fn without_the_controller_s_sampler_a_watch_samples_its_vm_only() {
        let sampler =
            VmStatsSampler::new(Metrics::new(), VmStatsHistory::new(4), Readiness::default());
        let (src, full, single) = counting(vec!["vm-a"]);
        let watch = sampler
            .watch("vm-a", Duration::from_millis(10), move || Box::new(src))
            .unwrap();
        for _ in 0..3 {
            watch.next(Duration::from_secs(5)).unwrap().unwrap();
        }
        assert_eq!(full.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(single.load(std::sync::atomic::Ordering::SeqCst) >= 3);
        assert!(sampler.history().vms().is_empty());
    }
}
