//! `AnomalyDetector`: pure logic that turns one run's VM samples (domain statistics plus the
//! guest's task count) into anomalies and a resource-usage summary.
//!
//! CPU is the run's own: the guest kernel's accounting of the run's cgroup
//! ([`RUN_CGROUP`](agentvm_backend::guest::RUN_CGROUP), `cpu.stat` `usage_usec`), not the
//! VM's vCPU time, which after a boot or a reset includes seconds of the guest re-translating
//! its code and catching up on timers (TCG) that are not the program's. Until the program's
//! cgroup exists (inputs still being copied in) no CPU rule is evaluated; a cgroup that
//! disappears after it was seen (a root program in the guest can remove it) makes the rules
//! fall back to the VM's vCPU time.
//!
//! Rules, each firing at most once per run (thresholds from the pool's `spec.anomalies`):
//! - `CpuSaturated`: CPU percent (CPU time delta / wall delta / vCPUs) at or above
//!   `cpuPercent` for `cpuSustainedSamples` consecutive samples;
//! - `DiskWriteBurst` / `NetworkTxBurst`: disk write / network transmit rate, averaged over
//!   the last `rateWindowSamples` intervals, at or above its MiB/s threshold;
//! - `MemoryNearLimit`: guest memory in use (total minus what the guest could still use
//!   without swapping, so page cache does not count) at or above `memoryPercent` of the
//!   guest's RAM;
//! - `ProcessExplosion`: guest tasks (processes and threads, from `/proc/loadavg`) at or above
//!   `maxProcesses`;
//! - `BaselineDeviation`: CPU, disk write rate, network transmit rate or task count more than
//!   `zScore` standard deviations (and a fixed minimum distance) above the metric's running
//!   mean for `cpuSustainedSamples` consecutive samples, once `baselineSamples` samples formed
//!   the baseline. Deviating samples do not move the baseline.

use std::collections::{BTreeSet, VecDeque};
use std::time::Instant;

use agentvm_api::{AnomalyDetection, ResourceUsage};
use agentvm_backend::stats::DomainStats;

const MIB: f64 = 1024.0 * 1024.0;

/// An anomaly rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// Sustained high CPU.
    CpuSaturated,
    /// High disk write rate.
    DiskWriteBurst,
    /// High network transmit rate.
    NetworkTxBurst,
    /// Guest memory nearly exhausted.
    MemoryNearLimit,
    /// Too many tasks in the guest.
    ProcessExplosion,
    /// A metric far above its running baseline.
    BaselineDeviation,
}

impl Rule {
    /// Every rule (the bounded label set of `agent_vm_anomalies_total{rule}`).
    pub const ALL: [Rule; 6] = [
        Rule::CpuSaturated,
        Rule::DiskWriteBurst,
        Rule::NetworkTxBurst,
        Rule::MemoryNearLimit,
        Rule::ProcessExplosion,
        Rule::BaselineDeviation,
    ];

    /// Its name in statuses, metrics and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::CpuSaturated => "CpuSaturated",
            Rule::DiskWriteBurst => "DiskWriteBurst",
            Rule::NetworkTxBurst => "NetworkTxBurst",
            Rule::MemoryNearLimit => "MemoryNearLimit",
            Rule::ProcessExplosion => "ProcessExplosion",
            Rule::BaselineDeviation => "BaselineDeviation",
        }
    }
}

/// A metric a rule looks at; its name carries the unit of observed values and thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Percent of the VM's vCPUs.
    CpuPercent,
    /// Bytes written to disk per second.
    DiskWriteBytesPerSecond,
    /// Bytes sent on the network per second.
    NetTxBytesPerSecond,
    /// Guest memory in use, bytes.
    MemoryUsedBytes,
    /// Tasks in the guest.
    Processes,
}

impl Metric {
    /// Its name (`cpu_percent`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::CpuPercent => "cpu_percent",
            Metric::DiskWriteBytesPerSecond => "disk_write_bytes_per_second",
            Metric::NetTxBytesPerSecond => "net_tx_bytes_per_second",
            Metric::MemoryUsedBytes => "memory_used_bytes",
            Metric::Processes => "processes",
        }
    }

    /// The smallest distance above the mean that counts as a deviation (so a flat baseline
    /// with a tiny standard deviation does not turn noise into anomalies), and the smallest
    /// standard deviation assumed.
    fn deviation_floor(self) -> (f64, f64) {
        match self {
            Metric::CpuPercent => (20.0, 1.0),
            Metric::DiskWriteBytesPerSecond => (5.0 * MIB, 64.0 * 1024.0),
            Metric::NetTxBytesPerSecond => (MIB, 16.0 * 1024.0),
            Metric::MemoryUsedBytes => (64.0 * MIB, MIB),
            Metric::Processes => (100.0, 2.0),
        }
    }

    fn describe(self, v: f64) -> String {
        match self {
            Metric::CpuPercent => format!("{v:.0}% CPU"),
            Metric::DiskWriteBytesPerSecond => format!("{:.1} MiB/s written to disk", v / MIB),
            Metric::NetTxBytesPerSecond => format!("{:.1} MiB/s sent", v / MIB),
            Metric::MemoryUsedBytes => format!("{:.0} MiB of memory in use", v / MIB),
            Metric::Processes => format!("{v:.0} tasks"),
        }
    }
}

/// One sample of a run's VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// The domain's counters.
    pub stats: DomainStats,
    /// Tasks in the guest (4th field of `/proc/loadavg`), when the agent answered.
    pub processes: Option<u64>,
    /// CPU time of the run's cgroup in the guest (cumulative, ns), when it exists and the
    /// agent answered.
    pub run_cpu_ns: Option<u64>,
}

/// A rule that fired.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The rule.
    pub rule: Rule,
    /// The metric it looked at.
    pub metric: Metric,
    /// The value observed, in the metric's unit.
    pub observed: u64,
    /// The threshold reached, in the metric's unit.
    pub threshold: u64,
    /// What happened, with the numbers.
    pub message: String,
}

/// Guest memory in use: its total minus what it could still use without swapping
/// (`usable`, which counts reclaimable cache as free), else minus what is unused.
pub fn guest_memory_used(s: &DomainStats) -> Option<u64> {
    let total = s.memory_available_bytes?;
    let free = s.memory_usable_bytes.or(s.memory_unused_bytes)?;
    Some(total.saturating_sub(free))
}

/// Running mean and standard deviation (Welford), plus the current run of deviating samples.
#[derive(Debug, Clone, Default)]
struct Baseline {
    n: u64,
    mean: f64,
    m2: f64,
    streak: u32,
    streak_sum: f64,
}

impl Baseline {
    fn add(&mut self, v: f64) {
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
    }

    fn stddev(&self) -> f64 {
        if self.n < 2 {
            0.0
        } else {
            (self.m2 / (self.n - 1) as f64).sqrt()
        }
    }
}

/// Growth of a cumulative counter; one that went backwards (QEMU restarted) counts from 0.
fn grew(new: u64, old: u64) -> u64 {
    if new >= old {
        new - old
    } else {
        new
    }
}

/// Detects anomalies in one run's samples and sums up its resource use. See the module docs.
#[derive(Debug, Clone)]
pub struct AnomalyDetector {
    cfg: AnomalyDetection,
    vcpus: u32,
    memory_bytes: u64,
    prev: Option<DomainStats>,
    /// (time, bytes written, bytes sent) of the last `rateWindowSamples + 1` samples.
    window: VecDeque<(Instant, u64, u64)>,
    cpu_streak: u32,
    cpu_streak_sum: f64,
    baselines: [Baseline; 4],
    fired: BTreeSet<Rule>,
    usage: ResourceUsage,
    cpu_ns: u64,
    /// The run cgroup's last reading (time of the sample, cumulative ns).
    run_cpu: Option<(Instant, u64)>,
}

impl AnomalyDetector {
    /// A detector for a VM with `vcpus` vCPUs and `memory_bytes` of RAM, with `cfg`'s
    /// thresholds.
    pub fn new(cfg: &AnomalyDetection, vcpus: u32, memory_bytes: u64) -> Self {
        Self {
            cfg: cfg.clone(),
            vcpus: vcpus.max(1),
            memory_bytes,
            prev: None,
            window: VecDeque::new(),
            cpu_streak: 0,
            cpu_streak_sum: 0.0,
            baselines: Default::default(),
            fired: BTreeSet::new(),
            usage: ResourceUsage::default(),
            cpu_ns: 0,
            run_cpu: None,
        }
    }

    /// The resource-usage summary of the samples seen so far.
    pub fn usage(&self) -> ResourceUsage {
        let mut u = self.usage.clone();
        // The run's own CPU time when the guest reported it, else the VM's.
        u.cpu_milliseconds = self.run_cpu.map_or(self.cpu_ns, |(_, ns)| ns) / 1_000_000;
        u
    }

    /// Adds `obs` to the usage summary only (no rule is evaluated): the last sample of a run.
    pub fn account(&mut self, obs: &Observation) {
        let s = &obs.stats;
        self.usage.samples += 1;
        if let Some(p) = &self.prev {
            self.cpu_ns += grew(s.cpu_time_ns, p.cpu_time_ns);
            self.usage.disk_read_bytes += grew(s.block_rd_bytes, p.block_rd_bytes);
            self.usage.disk_write_bytes += grew(s.block_wr_bytes, p.block_wr_bytes);
            self.usage.net_rx_bytes += grew(s.net_rx_bytes, p.net_rx_bytes);
            self.usage.net_tx_bytes += grew(s.net_tx_bytes, p.net_tx_bytes);
        }
        if let Some(m) = guest_memory_used(s) {
            self.usage.peak_memory_bytes = self.usage.peak_memory_bytes.max(m);
        }
        if let Some(n) = obs.processes {
            self.usage.peak_processes = self.usage.peak_processes.max(n);
        }
        if let Some(ns) = obs.run_cpu_ns {
            self.run_cpu = Some((s.at, ns));
        }
    }

    /// CPU percent of the VM's vCPUs since the previous sample: the run cgroup's when both
    /// readings exist; the VM's when the cgroup was seen before and is gone now; none while
    /// the program has not started (its cgroup does not exist yet) or on a first reading.
    fn cpu_percent(&self, obs: &Observation) -> Option<f64> {
        let s = &obs.stats;
        let percent = match (obs.run_cpu_ns, self.run_cpu) {
            (Some(now), Some((t0, before))) => {
                let dt = s.at.checked_duration_since(t0)?.as_secs_f64();
                (dt > 0.0).then(|| grew(now, before) as f64 / 1e9 / dt)?
            }
            (None, Some(_)) => s.cpu_usage_since(self.prev.as_ref()?)?,
            _ => return None,
        };
        // Capped at 100%: sampling jitter (the two timestamps are not taken exactly when
        // the counters are read) makes a saturated vCPU read 101–103% now and then.
        Some((percent * 100.0 / f64::from(self.vcpus)).min(100.0))
    }

    /// Adds a sample; returns the rules that fired on it (each at most once per detector).
    pub fn observe(&mut self, obs: Observation) -> Vec<Finding> {
        let cpu = self.cpu_percent(&obs);
        self.account(&obs);
        let mut out = Vec::new();
        let s = &obs.stats;
        self.prev = Some(s.clone());

        // CPU over threshold for N consecutive samples.
        if let Some(cpu) = cpu {
            if cpu >= f64::from(self.cfg.cpu_percent) {
                self.cpu_streak += 1;
                self.cpu_streak_sum += cpu;
            } else {
                self.cpu_streak = 0;
                self.cpu_streak_sum = 0.0;
            }
            if self.cpu_streak >= self.cfg.cpu_sustained_samples.max(1) {
                let mean = self.cpu_streak_sum / f64::from(self.cpu_streak);
                self.fire(
                    &mut out,
                    Rule::CpuSaturated,
                    Metric::CpuPercent,
                    mean,
                    u64::from(self.cfg.cpu_percent),
                    format!(
                        "CPU at {mean:.0}% of {} vCPU(s) on average for {} consecutive samples (threshold {}%)",
                        self.vcpus, self.cpu_streak, self.cfg.cpu_percent
                    ),
                );
            }
        }

        // Disk and network rates over a window.
        let per_sample = self.window.back().and_then(|&(t, wr, tx)| {
            let dt = s.at.checked_duration_since(t)?.as_secs_f64();
            (dt > 0.0).then(|| {
                (
                    grew(s.block_wr_bytes, wr) as f64 / dt,
                    grew(s.net_tx_bytes, tx) as f64 / dt,
                )
            })
        });
        self.window
            .push_back((s.at, s.block_wr_bytes, s.net_tx_bytes));
        let w = self.cfg.rate_window_samples.max(1) as usize;
        while self.window.len() > w + 1 {
            self.window.pop_front();
        }
        if self.window.len() == w + 1 {
            let (t0, wr0, tx0) = self.window[0];
            let dt = s.at.saturating_duration_since(t0).as_secs_f64();
            if dt > 0.0 {
                let wr = grew(s.block_wr_bytes, wr0) as f64 / dt;
                let tx = grew(s.net_tx_bytes, tx0) as f64 / dt;
                let disk_limit = f64::from(self.cfg.disk_write_mib_per_second) * MIB;
                if wr >= disk_limit {
                    self.fire(
                        &mut out,
                        Rule::DiskWriteBurst,
                        Metric::DiskWriteBytesPerSecond,
                        wr,
                        disk_limit as u64,
                        format!(
                            "{:.1} MiB/s written to disk over {dt:.1} s (threshold {} MiB/s)",
                            wr / MIB,
                            self.cfg.disk_write_mib_per_second
                        ),
                    );
                }
                let net_limit = f64::from(self.cfg.net_tx_mib_per_second) * MIB;
                if tx >= net_limit {
                    self.fire(
                        &mut out,
                        Rule::NetworkTxBurst,
                        Metric::NetTxBytesPerSecond,
                        tx,
                        net_limit as u64,
                        format!(
                            "{:.1} MiB/s sent over {dt:.1} s (threshold {} MiB/s)",
                            tx / MIB,
                            self.cfg.net_tx_mib_per_second
                        ),
                    );
                }
            }
        }

        // Memory near the guest's RAM.
        if let Some(used) = guest_memory_used(s) {
            let total = s
                .memory_available_bytes
                .filter(|&t| t > 0)
                .unwrap_or(self.memory_bytes);
            let limit = total as f64 * f64::from(self.cfg.memory_percent) / 100.0;
            if total > 0 && used as f64 >= limit {
                self.fire(
                    &mut out,
                    Rule::MemoryNearLimit,
                    Metric::MemoryUsedBytes,
                    used as f64,
                    limit as u64,
                    format!(
                        "{:.0} MiB of {:.0} MiB in use ({:.0}%, threshold {}%)",
                        used as f64 / MIB,
                        total as f64 / MIB,
                        used as f64 * 100.0 / total as f64,
                        self.cfg.memory_percent
                    ),
                );
            }
        }

        // Task count.
        if let Some(n) = obs.processes {
            if n >= u64::from(self.cfg.max_processes) {
                self.fire(
                    &mut out,
                    Rule::ProcessExplosion,
                    Metric::Processes,
                    n as f64,
                    u64::from(self.cfg.max_processes),
                    format!(
                        "{n} tasks in the guest (threshold {})",
                        self.cfg.max_processes
                    ),
                );
            }
        }

        // Baselines.
        let values = [
            (0, Metric::CpuPercent, cpu),
            (1, Metric::DiskWriteBytesPerSecond, per_sample.map(|p| p.0)),
            (2, Metric::NetTxBytesPerSecond, per_sample.map(|p| p.1)),
            (3, Metric::Processes, obs.processes.map(|n| n as f64)),
        ];
        for (i, metric, v) in values {
            if let Some(v) = v {
                self.baseline(&mut out, i, metric, v);
            }
        }
        out
    }

    fn baseline(&mut self, out: &mut Vec<Finding>, i: usize, metric: Metric, v: f64) {
        let z = f64::from(self.cfg.z_score);
        let needed = u64::from(self.cfg.baseline_samples.max(2));
        let sustained = self.cfg.cpu_sustained_samples.max(1);
        let (min_distance, min_sd) = metric.deviation_floor();
        let b = &mut self.baselines[i];
        if z <= 0.0 || b.n < needed {
            b.add(v);
            return;
        }
        let limit = b.mean + (z * b.stddev().max(min_sd)).max(min_distance);
        if v <= limit {
            b.streak = 0;
            b.streak_sum = 0.0;
            b.add(v);
            return;
        }
        b.streak += 1;
        b.streak_sum += v;
        if b.streak < sustained {
            return;
        }
        let (mean, sd, streak) = (b.mean, b.stddev(), b.streak);
        let observed = b.streak_sum / f64::from(streak);
        let message = format!(
            "{} on average for {streak} consecutive samples, {:.1} standard deviations above its baseline of {} (over {} samples)",
            metric.describe(observed),
            (observed - mean) / sd.max(min_sd),
            metric.describe(mean),
            b.n
        );
        self.fire(
            out,
            Rule::BaselineDeviation,
            metric,
            observed,
            limit.round() as u64,
            message,
        );
    }

    fn fire(
        &mut self,
        out: &mut Vec<Finding>,
        rule: Rule,
        metric: Metric,
        observed: f64,
        threshold: u64,
        message: String,
    ) {
        if self.fired.insert(rule) {
            out.push(Finding {
                rule,
                metric,
                observed: observed.max(0.0).round() as u64,
                threshold,
                message,
            });
        }
    }
}

/// The task count of a guest from its `/proc/loadavg` (`0.00 0.01 0.05 1/59 182`: the part
/// after `/` of the 4th field).
pub fn tasks_from_loadavg(text: &str) -> Option<u64> {
    text.split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// The CPU time in ns of a cgroup v2 `cpu.stat` (`usage_usec 1234`), if present.
pub fn cgroup_cpu_ns(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse::<u64>()
        .ok()?
        .checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GIB: u64 = 1 << 30;

    /// A sequence of samples one second apart, built from per-second increments.
    struct Feed {
        t0: Instant,
        i: u64,
        stats: DomainStats,
    }

    impl Feed {
        fn new() -> Self {
            let t0 = Instant::now();
            Feed {
                t0,
                i: 0,
                stats: DomainStats {
                    cpu_time_ns: 0,
                    memory_rss_bytes: Some(GIB),
                    memory_actual_bytes: Some(512 << 20),
                    memory_available_bytes: Some(500 << 20),
                    memory_unused_bytes: Some(400 << 20),
                    memory_usable_bytes: Some(420 << 20),
                    block_rd_bytes: 0,
                    block_wr_bytes: 0,
                    net_rx_bytes: 0,
                    net_tx_bytes: 0,
                    at: t0,
                },
            }
        }

        /// One second later, with `cpu` percent of one vCPU used, `wr` and `tx` bytes more.
        fn next(&mut self, cpu: f64, wr: u64, tx: u64) -> Observation {
            self.i += 1;
            self.stats.at = self.t0 + Duration::from_secs(self.i);
            self.stats.cpu_time_ns += (cpu * 1e7) as u64;
            self.stats.block_wr_bytes += wr;
            self.stats.net_tx_bytes += tx;
            Observation {
                stats: self.stats.clone(),
                processes: Some(60),
                run_cpu_ns: Some(self.stats.cpu_time_ns),
            }
        }
    }

    fn rules(f: &[Finding]) -> Vec<Rule> {
        f.iter().map(|f| f.rule).collect()
    }

    fn cfg() -> AnomalyDetection {
        AnomalyDetection {
            cpu_percent: 50,
            cpu_sustained_samples: 3,
            ..AnomalyDetection::default()
        }
    }

    #[test]
    fn a_quiet_run_with_noise_and_short_spikes_has_no_anomaly() {
        let mut d = AnomalyDetector::new(&cfg(), 1, 512 << 20);
        let mut f = Feed::new();
        let mut all = Vec::new();
        for i in 0..60u64 {
            // 5–8 % CPU, a 2-sample spike to 90 % now and then, a few KiB written.
            let cpu = if i % 20 == 5 || i % 20 == 6 {
                90.0
            } else {
                5.0 + (i % 4) as f64
            };
            all.extend(d.observe(f.next(cpu, 4096 * (i % 3), 0)));
        }
        assert!(all.is_empty(), "{all:?}");
        let u = d.usage();
        assert_eq!(u.samples, 60);
        assert_eq!(u.peak_memory_bytes, 80 << 20);
        assert_eq!(u.peak_processes, 60);
    }

    #[test]
    fn sustained_cpu_fires_once_after_n_consecutive_samples() {
        let mut d = AnomalyDetector::new(&cfg(), 2, 512 << 20);
        let mut f = Feed::new();
        assert!(d.observe(f.next(0.0, 0, 0)).is_empty());
        // 2 vCPUs: 160 % of one core is 80 % of the VM.
        assert!(d.observe(f.next(160.0, 0, 0)).is_empty());
        assert!(d.observe(f.next(160.0, 0, 0)).is_empty());
        // A dip restarts the count.
        assert!(d.observe(f.next(40.0, 0, 0)).is_empty());
        assert!(d.observe(f.next(160.0, 0, 0)).is_empty());
        assert!(d.observe(f.next(160.0, 0, 0)).is_empty());
        let got = d.observe(f.next(160.0, 0, 0));
        assert_eq!(rules(&got), [Rule::CpuSaturated]);
        assert_eq!(got[0].metric, Metric::CpuPercent);
        assert_eq!(got[0].observed, 80);
        assert_eq!(got[0].threshold, 50);
        assert!(got[0].message.contains("2 vCPU"), "{}", got[0].message);
        // At most once per run.
        for _ in 0..10 {
            assert!(d.observe(f.next(200.0, 0, 0)).is_empty());
        }
        // Five samples at 160 % of a core, one at 40 %, ten at 200 %.
        assert_eq!(d.usage().cpu_milliseconds, 5 * 1600 + 10 * 2000 + 400);
    }

    #[test]
    fn disk_write_and_network_rates_are_averaged_over_the_window() {
        let cfg = AnomalyDetection {
            disk_write_mib_per_second: 20,
            net_tx_mib_per_second: 5,
            rate_window_samples: 3,
            ..AnomalyDetection::default()
        };
        let mut d = AnomalyDetector::new(&cfg, 1, 512 << 20);
        let mut f = Feed::new();
        let mib = 1u64 << 20;
        // One 50 MiB burst in a second, then quiet: 50/3 MiB/s over the window, below 20.
        assert!(d.observe(f.next(5.0, 0, 0)).is_empty());
        assert!(d.observe(f.next(5.0, 50 * mib, 0)).is_empty());
        assert!(d.observe(f.next(5.0, 0, 0)).is_empty());
        assert!(d.observe(f.next(5.0, 0, 0)).is_empty());
        // 25 MiB/s for three seconds: 25 MiB/s over the window.
        assert!(d.observe(f.next(5.0, 25 * mib, 0)).is_empty());
        assert!(d.observe(f.next(5.0, 25 * mib, 0)).is_empty());
        let got = d.observe(f.next(5.0, 25 * mib, 6 * mib));
        assert_eq!(rules(&got), [Rule::DiskWriteBurst]);
        assert_eq!(got[0].observed, 25 * mib);
        assert_eq!(got[0].threshold, 20 * mib);
        let got = d.observe(f.next(5.0, 0, 6 * mib));
        assert!(got.is_empty(), "{got:?}");
        let got = d.observe(f.next(5.0, 0, 6 * mib));
        assert_eq!(rules(&got), [Rule::NetworkTxBurst]);
        assert_eq!(got[0].metric, Metric::NetTxBytesPerSecond);
        assert_eq!(d.usage().disk_write_bytes, 125 * mib);
        assert_eq!(d.usage().net_tx_bytes, 18 * mib);
    }

    #[test]
    fn memory_near_the_limit_ignores_reclaimable_cache() {
        let mut d = AnomalyDetector::new(&AnomalyDetection::default(), 1, 512 << 20);
        let mut f = Feed::new();
        // Page cache filled the RAM (unused 20 MiB) but 400 MiB are still usable: fine.
        f.stats.memory_unused_bytes = Some(20 << 20);
        f.stats.memory_usable_bytes = Some(400 << 20);
        assert!(d.observe(f.next(5.0, 0, 0)).is_empty());
        // Really used: 470 of 500 MiB = 94 %.
        f.stats.memory_usable_bytes = Some(30 << 20);
        let got = d.observe(f.next(5.0, 0, 0));
        assert_eq!(rules(&got), [Rule::MemoryNearLimit]);
        assert_eq!(got[0].observed, 470 << 20);
        assert_eq!(got[0].threshold, 450 << 20);
        assert_eq!(d.usage().peak_memory_bytes, 470 << 20);
        // Without `usable`, unused counts.
        let mut s = f.stats.clone();
        s.memory_usable_bytes = None;
        assert_eq!(guest_memory_used(&s), Some(480 << 20));
        s.memory_available_bytes = None;
        assert_eq!(guest_memory_used(&s), None);
    }

    #[test]
    fn process_explosion_reads_the_task_count() {
        let cfg = AnomalyDetection {
            max_processes: 300,
            ..AnomalyDetection::default()
        };
        let mut d = AnomalyDetector::new(&cfg, 1, 512 << 20);
        let mut f = Feed::new();
        let mut obs = f.next(5.0, 0, 0);
        obs.processes = Some(299);
        assert!(d.observe(obs).is_empty());
        let mut obs = f.next(5.0, 0, 0);
        obs.processes = Some(812);
        let got = d.observe(obs);
        assert!(rules(&got).contains(&Rule::ProcessExplosion), "{got:?}");
        assert_eq!(d.usage().peak_processes, 812);
        assert_eq!(tasks_from_loadavg("0.16 0.03 0.01 1/59 182\n"), Some(59));
        assert_eq!(tasks_from_loadavg("27.38 9.03 3.20 2/241 753"), Some(241));
        assert_eq!(tasks_from_loadavg("garbage"), None);
    }

    #[test]
    fn baseline_deviation_needs_a_baseline_a_real_distance_and_persistence() {
        let cfg = AnomalyDetection {
            cpu_percent: 100,
            cpu_sustained_samples: 3,
            z_score: 4,
            baseline_samples: 10,
            max_processes: 100_000,
            ..AnomalyDetection::default()
        };
        let mut d = AnomalyDetector::new(&cfg, 1, 512 << 20);
        let mut f = Feed::new();
        let procs = |d: &mut AnomalyDetector, f: &mut Feed, n: u64| {
            let mut o = f.next(5.0, 0, 0);
            o.processes = Some(n);
            d.observe(o)
        };
        // Baseline: 58–62 tasks.
        for i in 0..12 {
            assert!(procs(&mut d, &mut f, 58 + i % 5).is_empty());
        }
        // 80 tasks is many deviations out but not 100 above the mean: not an anomaly.
        for _ in 0..5 {
            assert!(procs(&mut d, &mut f, 80).is_empty());
        }
        // 400 tasks twice, then back: not persistent.
        assert!(procs(&mut d, &mut f, 400).is_empty());
        assert!(procs(&mut d, &mut f, 400).is_empty());
        assert!(procs(&mut d, &mut f, 60).is_empty());
        // Three in a row.
        assert!(procs(&mut d, &mut f, 400).is_empty());
        assert!(procs(&mut d, &mut f, 420).is_empty());
        let got = procs(&mut d, &mut f, 440);
        assert_eq!(rules(&got), [Rule::BaselineDeviation]);
        assert_eq!(got[0].metric, Metric::Processes);
        assert_eq!(got[0].observed, 420);
        assert!(got[0].message.contains("standard deviations"), "{got:?}");

        // zScore 0 turns the rule off.
        let off = AnomalyDetection {
            z_score: 0,
            ..cfg.clone()
        };
        let mut d = AnomalyDetector::new(&off, 1, 512 << 20);
        let mut f = Feed::new();
        for n in (0..12).map(|_| 60).chain((0..10).map(|_| 5000)) {
            assert!(procs(&mut d, &mut f, n).is_empty());
        }
    }

    #[test]
    fn a_counter_that_restarts_counts_from_zero() {
        let mut d = AnomalyDetector::new(&AnomalyDetection::default(), 1, 512 << 20);
        let mut f = Feed::new();
        d.observe(f.next(10.0, 1000, 0));
        d.observe(f.next(10.0, 1000, 0));
        f.stats.block_wr_bytes = 10;
        f.stats.cpu_time_ns = 0;
        d.observe(f.next(10.0, 0, 0));
        assert_eq!(d.usage().disk_write_bytes, 1000 + 10);
    }

    #[test]
    fn a_vm_warming_up_after_a_reset_is_not_the_quiet_runs_cpu() {
        // The VM's vCPU time: 45 % for the first 12 s (TCG re-translating after a reset),
        // then 6 %; the run's cgroup: a sleeping program, 0.2 % throughout.
        let mut d = AnomalyDetector::new(&cfg(), 1, 512 << 20);
        let mut f = Feed::new();
        let mut run_ns = 0u64;
        let mut all = Vec::new();
        for i in 0..30u64 {
            let mut obs = f.next(if i < 12 { 45.0 } else { 6.0 }, 0, 0);
            run_ns += 2_000_000;
            obs.run_cpu_ns = Some(run_ns);
            all.extend(d.observe(obs));
        }
        assert!(all.is_empty(), "{all:?}");
        // Usage is the run's own CPU time, not the VM's warm-up.
        assert_eq!(d.usage().cpu_milliseconds, 60);
    }

    #[test]
    fn no_cpu_rule_before_the_program_starts_and_the_vm_after_its_cgroup_vanished() {
        let mut d = AnomalyDetector::new(&cfg(), 1, 512 << 20);
        let mut f = Feed::new();
        // Inputs being copied in: the VM busy, no run cgroup yet.
        for _ in 0..6 {
            let mut obs = f.next(95.0, 0, 0);
            obs.run_cpu_ns = None;
            assert!(d.observe(obs).is_empty());
        }
        // The program runs quietly in its cgroup.
        let mut run_ns = 0;
        for _ in 0..3 {
            let mut obs = f.next(95.0, 0, 0);
            run_ns += 1_000_000;
            obs.run_cpu_ns = Some(run_ns);
            assert!(d.observe(obs).is_empty());
        }
        // The guest removed the cgroup: the VM's vCPU time counts again.
        let mut got = Vec::new();
        for _ in 0..3 {
            let mut obs = f.next(95.0, 0, 0);
            obs.run_cpu_ns = None;
            got.extend(d.observe(obs));
        }
        assert_eq!(rules(&got), [Rule::CpuSaturated]);
    }

    #[test]
    fn a_cgroup_cpu_stat_gives_its_usage_in_ns() {
        let text = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n";
        assert_eq!(cgroup_cpu_ns(text), Some(1_234_567_000));
        assert_eq!(cgroup_cpu_ns("user_usec 5\n"), None);
        assert_eq!(cgroup_cpu_ns("usage_usec lots\n"), None);
        assert_eq!(cgroup_cpu_ns(&format!("usage_usec {}\n", u64::MAX)), None);
    }
}
