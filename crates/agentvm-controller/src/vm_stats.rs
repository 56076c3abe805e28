//! `VmStatsSampler`: samples every running agentvm-owned domain's statistics periodically,
//! publishes them as the per-VM metrics, and keeps the latest samples of each VM (a ring
//! buffer) for anomaly detection.
//!
//! Where samples come from is a [`StatsSource`]: [`LibvirtStatsSource`] in the controller,
//! a closure in tests. The sampler calls it on a blocking thread every
//! `vmStatsIntervalSeconds` (default 5 s) and tolerates it failing (libvirt down): the
//! failure is shown by `agentvm_libvirt_up 0` and `/readyz`, and the next tick tries again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentvm_backend::libvirt::{DomainState, Libvirt};
use agentvm_backend::stats::DomainStats;

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

/// Yields a sample of every running VM. Called on a blocking thread; an error means no VM
/// could be sampled (e.g. libvirt is unreachable).
pub trait StatsSource: Send + 'static {
    /// Samples every running VM now.
    fn sample(&mut self) -> Result<Vec<VmSample>, String>;
}

impl<F> StatsSource for F
where
    F: FnMut() -> Result<Vec<VmSample>, String> + Send + 'static,
{
    fn sample(&mut self) -> Result<Vec<VmSample>, String> {
        self()
    }
}

/// Samples the running agentvm-owned domains of a libvirt connection, (re)connecting as
/// needed.
pub struct LibvirtStatsSource {
    uri: String,
    conn: Option<Libvirt>,
}

impl LibvirtStatsSource {
    /// A source connecting to `uri` on first use.
    pub fn new(uri: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            conn: None,
        }
    }
}

impl StatsSource for LibvirtStatsSource {
    fn sample(&mut self) -> Result<Vec<VmSample>, String> {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => Libvirt::connect(&self.uri).map_err(|e| e.to_string())?,
        };
        let domains = match conn.list_owned_domains() {
            Ok(d) => d,
            // Drop the connection: the next tick reconnects.
            Err(e) => return Err(e.to_string()),
        };
        let mut out = Vec::new();
        for d in domains
            .into_iter()
            .filter(|d| d.state == DomainState::Running)
        {
            // A domain may stop between listing and sampling: skip it.
            let Ok(stats) = conn.domain_stats(&d.name) else {
                continue;
            };
            let vcpus = conn
                .raw()
                .lookup_domain_by_name(&d.name)
                .and_then(|dom| dom.info())
                .ok()
                .map(|i| i.nr_virt_cpu);
            out.push(VmSample {
                vm_id: d.name,
                vcpus,
                stats,
            });
        }
        self.conn = Some(conn);
        Ok(out)
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

/// Turns samples into metrics and history. See the module docs.
#[derive(Debug, Clone)]
pub struct VmStatsSampler {
    metrics: Metrics,
    history: VmStatsHistory,
    health: Readiness,
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

impl VmStatsSampler {
    /// A sampler publishing into `metrics` and `health`, keeping `history`.
    pub fn new(metrics: Metrics, history: VmStatsHistory, health: Readiness) -> Self {
        Self {
            metrics,
            history,
            health,
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

    /// Samples `source` now and then every `every` until `shutdown` resolves.
    pub async fn run(
        self,
        source: Box<dyn StatsSource>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let source = Arc::new(Mutex::new(source));
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tick.tick() => {}
            }
            let src = source.clone();
            let result = tokio::task::spawn_blocking(move || {
                src.lock().unwrap_or_else(|e| e.into_inner()).sample()
            })
            .await
            .unwrap_or_else(|e| Err(format!("statistics source panicked: {e}")));
            self.record(result);
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
    fn libvirt_source_on_the_test_driver_lists_only_owned_domains() {
        // test:///default has one foreign domain ("test"), which is not sampled.
        let mut src = LibvirtStatsSource::new("test:///default");
        let samples = src.sample().unwrap();
        assert!(samples.iter().all(|s| s.vm_id != "test"), "{samples:?}");
        // An unknown URI is an error, not a panic.
        let mut bad = LibvirtStatsSource::new("nope:///nothing");
        assert!(bad.sample().is_err());
    }
}
