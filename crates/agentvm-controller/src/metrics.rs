//! `Metrics`: the controller's Prometheus registry, with the predecessor's metric names and
//! labels (`agent_vm_*`, `agent_execution_*`) and agentvm's own (`agentvm_*`), the methods
//! the pool, run and reconcile code record through, and the text exposition.
//!
//! Series labelled by a VM or a pool are removed when the VM or pool goes away
//! ([`Metrics::vm_removed`], [`Metrics::pool_removed`]), so label sets stay bounded by what
//! exists.
//!
//! Units: seconds, bytes, percent. `agent_vm_cpu_usage_percent` is the guest's CPU time over
//! wall time between two samples, divided by its vCPU count when known (0–100), else by one
//! host CPU (may exceed 100 with several busy vCPUs).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Content type of [`Metrics::render`] (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Statuses of `agent_execution_total` that exist from the start (at zero), so dashboards and
/// `rate()` see them before the first run ends. The lowercase AgentRun terminal phases.
pub const EXECUTION_STATUSES: [&str; 4] = ["succeeded", "failed", "timedout", "cancelled"];

const SECONDS_FAST: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const SECONDS_RESET: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
const SECONDS_RUN: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// The controller's metrics. Cheap to clone (shared registry and series).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    // The predecessor's names.
    boot_duration: GaugeVec,
    pool_size: IntGaugeVec,
    acquire_duration: HistogramVec,
    cpu_usage: GaugeVec,
    memory_usage: GaugeVec,
    disk_read: IntCounterVec,
    disk_write: IntCounterVec,
    executions: IntCounterVec,
    execution_duration: prometheus::Histogram,
    execution_timeouts: IntCounter,
    anomalies: IntCounterVec,
    // agentvm's.
    reset_duration: HistogramVec,
    run_queue_length: IntGaugeVec,
    reconcile_runs: IntCounterVec,
    reconcile_failures: IntCounterVec,
    reconcile_duration: HistogramVec,
    audit_events: IntCounterVec,
    audit_write_failures: IntCounter,
    egress_connections: IntCounterVec,
    egress_bytes: IntCounterVec,
    libvirt_up: IntGauge,
    cluster_leader: IntGaugeVec,
    cluster_lease_seconds: IntGaugeVec,
    /// Label values in use that Prometheus cannot remove by a partial label set.
    labels: Mutex<LabelIndex>,
}

#[derive(Default)]
struct LabelIndex {
    /// VM → pool (from `vm_booted`).
    vm_pool: HashMap<String, String>,
    /// Pool → reset strategies recorded for it.
    reset_strategies: HashMap<String, BTreeSet<String>>,
    /// Kind → failure reasons recorded for it.
    failure_reasons: HashMap<String, BTreeSet<String>>,
    /// Pool → egress verdicts recorded for it.
    egress_verdicts: HashMap<String, BTreeSet<String>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

fn hopts(name: &str, help: &str, buckets: &[f64]) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(buckets.to_vec())
}

/// Registers `c` in `r`; names are constants, so a clash is a programming error.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    /// A fresh registry with every metric registered (label-less ones at zero).
    pub fn new() -> Self {
        let r = Registry::new();
        let inner = Inner {
            boot_duration: reg(
                &r,
                GaugeVec::new(
                    opts(
                        "agent_vm_boot_duration_seconds",
                        "Time from defining a VM's domain until its guest agent answered.",
                    ),
                    &["vm_id"],
                )
                .unwrap(),
            ),
            pool_size: reg(
                &r,
                IntGaugeVec::new(
                    opts("agent_vm_pool_size", "VMs in the pool (ready and busy)."),
                    &["pool_id"],
                )
                .unwrap(),
            ),
            acquire_duration: reg(
                &r,
                HistogramVec::new(
                    hopts(
                        "agent_vm_pool_acquire_duration_seconds",
                        "Time a run waited to get a VM from the pool.",
                        SECONDS_FAST,
                    ),
                    &["pool_id"],
                )
                .unwrap(),
            ),
            cpu_usage: reg(
                &r,
                GaugeVec::new(
                    opts(
                        "agent_vm_cpu_usage_percent",
                        "Guest CPU usage between the last two samples, percent of its vCPUs.",
                    ),
                    &["vm_id"],
                )
                .unwrap(),
            ),
            memory_usage: reg(
                &r,
                GaugeVec::new(
                    opts(
                        "agent_vm_memory_usage_bytes",
                        "Memory used by the guest (balloon statistics), else QEMU's RSS.",
                    ),
                    &["vm_id"],
                )
                .unwrap(),
            ),
            disk_read: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agent_vm_disk_read_bytes_total",
                        "Bytes read from the VM's disks.",
                    ),
                    &["vm_id"],
                )
                .unwrap(),
            ),
            disk_write: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agent_vm_disk_write_bytes_total",
                        "Bytes written to the VM's disks.",
                    ),
                    &["vm_id"],
                )
                .unwrap(),
            ),
            executions: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agent_execution_total",
                        "Agent runs that ended, by final status.",
                    ),
                    &["status"],
                )
                .unwrap(),
            ),
            anomalies: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agent_vm_anomalies_total",
                        "Anomalies detected in VMs running agent runs, by rule.",
                    ),
                    &["rule"],
                )
                .unwrap(),
            ),
            execution_duration: reg(
                &r,
                prometheus::Histogram::with_opts(hopts(
                    "agent_execution_duration_seconds",
                    "Duration of agent runs, from start in the VM to end.",
                    SECONDS_RUN,
                ))
                .unwrap(),
            ),
            execution_timeouts: reg(
                &r,
                IntCounter::with_opts(opts(
                    "agent_execution_timeout_total",
                    "Agent runs killed after their timeout.",
                ))
                .unwrap(),
            ),
            reset_duration: reg(
                &r,
                HistogramVec::new(
                    hopts(
                        "agentvm_vm_reset_duration_seconds",
                        "Time to reset a VM to its golden state, by pool and strategy.",
                        SECONDS_RESET,
                    ),
                    &["pool_id", "strategy"],
                )
                .unwrap(),
            ),
            run_queue_length: reg(
                &r,
                IntGaugeVec::new(
                    opts(
                        "agentvm_run_queue_length",
                        "Runs waiting for a VM of the pool.",
                    ),
                    &["pool_id"],
                )
                .unwrap(),
            ),
            reconcile_runs: reg(
                &r,
                IntCounterVec::new(
                    opts("agentvm_reconcile_runs_total", "Reconciler calls, by kind."),
                    &["kind"],
                )
                .unwrap(),
            ),
            reconcile_failures: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agentvm_reconcile_failures_total",
                        "Failed reconciler calls, by kind and short error reason.",
                    ),
                    &["kind", "reason"],
                )
                .unwrap(),
            ),
            reconcile_duration: reg(
                &r,
                HistogramVec::new(
                    hopts(
                        "agentvm_reconcile_duration_seconds",
                        "Duration of reconciler calls, by kind.",
                        SECONDS_FAST,
                    ),
                    &["kind"],
                )
                .unwrap(),
            ),
            audit_events: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agentvm_audit_events_total",
                        "Audit log lines written, by event type.",
                    ),
                    &["event_type"],
                )
                .unwrap(),
            ),
            egress_connections: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agentvm_egress_connections_total",
                        "Guest connections through the egress proxy, by pool and verdict (allowed, denied, no_name, ...).",
                    ),
                    &["pool", "verdict"],
                )
                .unwrap(),
            ),
            egress_bytes: reg(
                &r,
                IntCounterVec::new(
                    opts(
                        "agentvm_egress_bytes_total",
                        "Bytes through the egress proxy, by pool and direction (out: from the guest, in: to it), counted when each connection ends.",
                    ),
                    &["pool", "direction"],
                )
                .unwrap(),
            ),
            audit_write_failures: reg(
                &r,
                IntCounter::with_opts(opts(
                    "agentvm_audit_write_failures_total",
                    "Audit events that could not be written.",
                ))
                .unwrap(),
            ),
            libvirt_up: reg(
                &r,
                IntGauge::with_opts(opts(
                    "agentvm_libvirt_up",
                    "1 when the last VM statistics sample reached libvirt, else 0.",
                ))
                .unwrap(),
            ),
            cluster_leader: reg(
                &r,
                IntGaugeVec::new(
                    opts(
                        "agentvm_cluster_leader",
                        "1 while this cluster node leads (reconciles), else 0; absent on a single host.",
                    ),
                    &["node"],
                )
                .unwrap(),
            ),
            cluster_lease_seconds: reg(
                &r,
                IntGaugeVec::new(
                    opts(
                        "agentvm_cluster_lease_seconds_left",
                        "Seconds this cluster node's lease has left, as of its last renewal (0 once lost).",
                    ),
                    &["node"],
                )
                .unwrap(),
            ),
            labels: Mutex::new(LabelIndex::default()),
            registry: r,
        };
        for status in EXECUTION_STATUSES {
            inner.executions.with_label_values(&[status]);
        }
        for rule in agentvm_run::anomaly::Rule::ALL {
            inner.anomalies.with_label_values(&[rule.as_str()]);
        }
        Metrics {
            inner: Arc::new(inner),
        }
    }

    /// The registry (to register more collectors).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Every metric in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into memory fails only on invalid metric families, which `reg` prevents.
        if let Err(e) = TextEncoder::new().encode(&self.inner.registry.gather(), &mut buf) {
            tracing::error!("encoding metrics failed: {e}");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, LabelIndex> {
        self.inner.labels.lock().unwrap_or_else(|e| e.into_inner())
    }

    // --- VMs -----------------------------------------------------------------------------

    /// VM `vm` of pool `pool` booted in `secs` seconds.
    pub fn vm_booted(&self, vm: &str, pool: &str, secs: f64) {
        self.inner.boot_duration.with_label_values(&[vm]).set(secs);
        self.labels()
            .vm_pool
            .insert(vm.to_string(), pool.to_string());
    }

    /// The pool VM `vm` was booted for, as told to [`Metrics::vm_booted`].
    pub fn pool_of(&self, vm: &str) -> Option<String> {
        self.labels().vm_pool.get(vm).cloned()
    }

    /// Removes every series of VM `vm` (boot time, CPU, memory, disk). Call when it is
    /// destroyed; the statistics sampler also calls it for VMs that disappeared.
    pub fn vm_removed(&self, vm: &str) {
        let i = &self.inner;
        let _ = i.boot_duration.remove_label_values(&[vm]);
        self.vm_usage_removed(vm);
        self.labels().vm_pool.remove(vm);
    }

    /// Removes the resource-usage series of VM `vm` (CPU, memory, disk).
    pub(crate) fn vm_usage_removed(&self, vm: &str) {
        let i = &self.inner;
        let _ = i.cpu_usage.remove_label_values(&[vm]);
        let _ = i.memory_usage.remove_label_values(&[vm]);
        let _ = i.disk_read.remove_label_values(&[vm]);
        let _ = i.disk_write.remove_label_values(&[vm]);
    }

    /// Sets VM `vm`'s CPU usage in percent.
    pub fn vm_cpu_percent(&self, vm: &str, percent: f64) {
        self.inner.cpu_usage.with_label_values(&[vm]).set(percent);
    }

    /// Sets VM `vm`'s memory usage in bytes.
    pub fn vm_memory_bytes(&self, vm: &str, bytes: u64) {
        self.inner
            .memory_usage
            .with_label_values(&[vm])
            .set(bytes as f64);
    }

    /// Adds bytes read from and written to VM `vm`'s disks since the last call.
    pub fn vm_disk_bytes(&self, vm: &str, read: u64, written: u64) {
        self.inner.disk_read.with_label_values(&[vm]).inc_by(read);
        self.inner
            .disk_write
            .with_label_values(&[vm])
            .inc_by(written);
    }

    /// Whether the last statistics sample reached libvirt.
    pub fn libvirt_up(&self, up: bool) {
        self.inner.libvirt_up.set(i64::from(up));
    }

    /// This cluster node's role and lease.
    pub fn cluster_node(&self, node: &str, leader: bool, lease_seconds_left: u64) {
        self.inner
            .cluster_leader
            .with_label_values(&[node])
            .set(i64::from(leader));
        self.inner
            .cluster_lease_seconds
            .with_label_values(&[node])
            .set(i64::try_from(lease_seconds_left).unwrap_or(i64::MAX));
    }

    // --- Pools ---------------------------------------------------------------------------

    /// Pool `pool` has `n` VMs.
    pub fn pool_size(&self, pool: &str, n: usize) {
        self.inner
            .pool_size
            .with_label_values(&[pool])
            .set(n as i64);
    }

    /// A run got a VM from pool `pool` after waiting `secs` seconds.
    pub fn acquire(&self, pool: &str, secs: f64) {
        self.inner
            .acquire_duration
            .with_label_values(&[pool])
            .observe(secs);
    }

    /// A VM of pool `pool` was reset with `strategy` (`loadvm`, `revert`, `restore`,
    /// `reboot`, ...) in `secs` seconds.
    pub fn reset(&self, pool: &str, strategy: &str, secs: f64) {
        self.inner
            .reset_duration
            .with_label_values(&[pool, strategy])
            .observe(secs);
        self.labels()
            .reset_strategies
            .entry(pool.to_string())
            .or_default()
            .insert(strategy.to_string());
    }

    /// `n` runs are waiting for a VM of pool `pool`.
    pub fn queue_length(&self, pool: &str, n: usize) {
        self.inner
            .run_queue_length
            .with_label_values(&[pool])
            .set(n as i64);
    }

    /// Removes every series of pool `pool` (size, acquire and reset times, queue length).
    pub fn pool_removed(&self, pool: &str) {
        let i = &self.inner;
        let _ = i.pool_size.remove_label_values(&[pool]);
        let _ = i.acquire_duration.remove_label_values(&[pool]);
        let _ = i.run_queue_length.remove_label_values(&[pool]);
        let strategies = self.labels().reset_strategies.remove(pool);
        for s in strategies.unwrap_or_default() {
            let _ = i.reset_duration.remove_label_values(&[pool, &s]);
        }
        let verdicts = self.labels().egress_verdicts.remove(pool);
        for v in verdicts.unwrap_or_default() {
            let _ = i.egress_connections.remove_label_values(&[pool, &v]);
        }
        for direction in ["out", "in"] {
            let _ = i.egress_bytes.remove_label_values(&[pool, direction]);
        }
    }

    // --- Runs ----------------------------------------------------------------------------

    /// A run ended with `status` (lowercase AgentRun phase: `succeeded`, `failed`,
    /// `timedout`, `cancelled`) after `secs` seconds. `timedout` also counts in
    /// `agent_execution_timeout_total`.
    pub fn execution_finished(&self, status: &str, secs: f64) {
        let i = &self.inner;
        i.executions.with_label_values(&[status]).inc();
        i.execution_duration.observe(secs);
        if status == "timedout" {
            i.execution_timeouts.inc();
        }
    }

    /// An anomaly of `rule` was detected (the label set is [`agentvm_run::anomaly::Rule::ALL`]).
    pub fn anomaly(&self, rule: agentvm_run::anomaly::Rule) {
        self.inner
            .anomalies
            .with_label_values(&[rule.as_str()])
            .inc();
    }

    // --- Reconciles ----------------------------------------------------------------------

    /// Creates the reconcile series of `kind` at zero (so a kind that never fails still has
    /// a runs series from the start).
    pub fn reconcile_kind(&self, kind: &str) {
        self.inner.reconcile_runs.with_label_values(&[kind]);
        self.inner.reconcile_duration.with_label_values(&[kind]);
    }

    /// Counts a reconcile of `kind` and starts timing it: the duration is recorded when the
    /// guard is dropped, whatever way the reconcile ends.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer {
        self.inner.reconcile_runs.with_label_values(&[kind]).inc();
        ReconcileTimer {
            metrics: self.clone(),
            kind: kind.to_string(),
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile of `kind` with its short `reason` label
    /// (`ReconcileError::reason`, `Panic`).
    pub fn reconcile_failed(&self, kind: &str, reason: &str) {
        self.inner
            .reconcile_failures
            .with_label_values(&[kind, reason])
            .inc();
        self.labels()
            .failure_reasons
            .entry(kind.to_string())
            .or_default()
            .insert(reason.to_string());
    }

    // --- Audit ---------------------------------------------------------------------------

    pub(crate) fn audit_written(&self, event_type: &str) {
        self.inner
            .audit_events
            .with_label_values(&[event_type])
            .inc();
    }

    pub(crate) fn audit_failed(&self) {
        self.inner.audit_write_failures.inc();
    }

    // --- Egress ------------------------------------------------------------------------

    /// One guest connection through the egress proxy ended with `verdict`, having carried
    /// `bytes_out` from the guest and `bytes_in` to it.
    pub fn egress_connection(&self, pool: &str, verdict: &str, bytes_out: u64, bytes_in: u64) {
        self.inner
            .egress_connections
            .with_label_values(&[pool, verdict])
            .inc();
        for (direction, n) in [("out", bytes_out), ("in", bytes_in)] {
            // Both series exist from a pool's first connection on, zero or not.
            self.inner
                .egress_bytes
                .with_label_values(&[pool, direction])
                .inc_by(n);
        }
        self.labels()
            .egress_verdicts
            .entry(pool.to_string())
            .or_default()
            .insert(verdict.to_string());
    }
}

/// Records the duration of one reconcile in `agentvm_reconcile_duration_seconds` when
/// dropped (kube-rs' pattern: measured however the reconcile ends, panics included).
#[must_use = "the duration is recorded when the timer is dropped"]
pub struct ReconcileTimer {
    metrics: Metrics,
    kind: String,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .inner
            .reconcile_duration
            .with_label_values(&[&self.kind])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric name this module promises, as it appears in the exposition.
    pub(crate) const ALL_NAMES: [&str; 21] = [
        "agent_vm_boot_duration_seconds",
        "agent_vm_pool_size",
        "agent_vm_pool_acquire_duration_seconds",
        "agent_vm_cpu_usage_percent",
        "agent_vm_memory_usage_bytes",
        "agent_vm_disk_read_bytes_total",
        "agent_vm_disk_write_bytes_total",
        "agent_execution_total",
        "agent_execution_duration_seconds",
        "agent_execution_timeout_total",
        "agent_vm_anomalies_total",
        "agentvm_vm_reset_duration_seconds",
        "agentvm_run_queue_length",
        "agentvm_reconcile_runs_total",
        "agentvm_reconcile_failures_total",
        "agentvm_reconcile_duration_seconds",
        "agentvm_audit_events_total",
        "agentvm_audit_write_failures_total",
        "agentvm_egress_connections_total",
        "agentvm_egress_bytes_total",
        "agentvm_libvirt_up",
    ];

    fn record_everything(m: &Metrics) {
        m.vm_booted("vm-a", "pool-1", 1.5);
        m.vm_cpu_percent("vm-a", 42.0);
        m.vm_memory_bytes("vm-a", 1 << 20);
        m.vm_disk_bytes("vm-a", 100, 200);
        m.pool_size("pool-1", 3);
        m.egress_connection("pool-1", "allowed", 100, 2000);
        m.acquire("pool-1", 0.02);
        m.reset("pool-1", "loadvm", 0.4);
        m.queue_length("pool-1", 2);
        m.execution_finished("succeeded", 3.0);
        m.execution_finished("timedout", 60.0);
        {
            let _t = m.reconcile_started("VmPool");
            m.reconcile_failed("VmPool", "LibvirtUnavailable");
        }
        m.audit_written("object_applied");
        m.audit_failed();
        m.libvirt_up(true);
    }

    #[test]
    fn exposition_has_every_metric_with_its_labels() {
        let m = Metrics::new();
        record_everything(&m);
        let text = m.render();
        for name in ALL_NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing:\n{text}"
            );
        }
        for line in [
            "agent_vm_boot_duration_seconds{vm_id=\"vm-a\"} 1.5",
            "agent_vm_pool_size{pool_id=\"pool-1\"} 3",
            "agent_vm_pool_acquire_duration_seconds_count{pool_id=\"pool-1\"} 1",
            "agent_vm_cpu_usage_percent{vm_id=\"vm-a\"} 42",
            "agent_vm_memory_usage_bytes{vm_id=\"vm-a\"} 1048576",
            "agent_vm_disk_read_bytes_total{vm_id=\"vm-a\"} 100",
            "agent_vm_disk_write_bytes_total{vm_id=\"vm-a\"} 200",
            "agent_execution_total{status=\"succeeded\"} 1",
            "agent_execution_total{status=\"timedout\"} 1",
            "agent_execution_total{status=\"cancelled\"} 0",
            "agent_execution_duration_seconds_count 2",
            "agent_execution_timeout_total 1",
            "agentvm_vm_reset_duration_seconds_count{pool_id=\"pool-1\",strategy=\"loadvm\"} 1",
            "agentvm_run_queue_length{pool_id=\"pool-1\"} 2",
            "agentvm_reconcile_runs_total{kind=\"VmPool\"} 1",
            "agentvm_reconcile_failures_total{kind=\"VmPool\",reason=\"LibvirtUnavailable\"} 1",
            "agentvm_reconcile_duration_seconds_count{kind=\"VmPool\"} 1",
            "agentvm_egress_connections_total{pool=\"pool-1\",verdict=\"allowed\"} 1",
            "agentvm_egress_bytes_total{direction=\"out\",pool=\"pool-1\"} 100",
            "agentvm_egress_bytes_total{direction=\"in\",pool=\"pool-1\"} 2000",
            "agentvm_libvirt_up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn label_less_metrics_and_statuses_exist_before_anything_happens() {
        let text = Metrics::new().render();
        assert!(text.contains("agent_execution_timeout_total 0"), "{text}");
        assert!(text.contains("agent_execution_duration_seconds_count 0"));
        for s in EXECUTION_STATUSES {
            assert!(text.contains(&format!("agent_execution_total{{status=\"{s}\"}} 0")));
        }
    }

    #[test]
    fn removed_vms_and_pools_leave_no_series() {
        let m = Metrics::new();
        record_everything(&m);
        m.vm_booted("vm-b", "pool-1", 2.0);
        m.reset("pool-1", "revert", 1.0);
        m.pool_size("pool-2", 1);
        assert_eq!(m.pool_of("vm-a").as_deref(), Some("pool-1"));
        m.vm_removed("vm-a");
        m.pool_removed("pool-1");
        let text = m.render();
        assert!(!text.contains("vm-a"), "{text}");
        assert!(!text.contains("pool-1"), "{text}");
        assert!(text.contains("vm_id=\"vm-b\""));
        assert!(text.contains("pool_id=\"pool-2\""));
        assert_eq!(m.pool_of("vm-a"), None);
        // Removing what does not exist is harmless.
        m.vm_removed("never-there");
        m.pool_removed("never-there");
    }

    #[test]
    fn the_drop_guard_records_a_panicking_reconcile() {
        let m = Metrics::new();
        let m2 = m.clone();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _t = m2.reconcile_started("Image");
            panic!("boom");
        }));
        assert!(r.is_err());
        let text = m.render();
        assert!(text.contains("agentvm_reconcile_duration_seconds_count{kind=\"Image\"} 1"));
    }
}
