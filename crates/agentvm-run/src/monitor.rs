//! `RunMonitor`: watches the VM of a running `AgentRun` about once a second on a thread of its
//! own (domain statistics from a [`StatsFeed`] — in the controller its one sampler, which
//! samples through the backend; the guest's task count from `/proc/loadavg` and the CPU time
//! of the run's cgroup through the guest agent), feeds the [`AnomalyDetector`], and for each
//! anomaly: appends it to the run's status (written at once) and hands it to the
//! [`AnomalySink`] (the controller counts it in `agent_vm_anomalies_total{rule}` and writes
//! an `anomaly` audit event). With policy `kill`
//! the first anomaly also sets the run's cancel flag (the executor kills the process group in
//! the guest) and [`MonitorReport::killed`]. Stopping it returns the anomalies and the
//! resource-usage summary for the final status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentvm_api::time::Timestamp;
use agentvm_api::{AgentRunStatus, Anomaly, AnomalyDetection, AnomalyPolicy, ResourceUsage};
use agentvm_backend::guest::RUN_CGROUP;
use agentvm_backend::{Backend, Guest};

use crate::anomaly::{cgroup_cpu_ns, tasks_from_loadavg, AnomalyDetector, Observation, Rule};

/// Where a [`RunMonitor`] gets the VM's domain statistics: the controller's sampler
/// (`VmStatsWatch`), which samples every watched VM through the backend's one connection.
pub trait StatsFeed: Send {
    /// The next sample (or why none could be taken), waiting at most `wait`.
    fn next(&self, wait: Duration) -> Option<Result<agentvm_backend::DomainStats, String>>;
    /// A fresh sample, taken at once, waiting for it at most `wait`.
    fn now(&self, wait: Duration) -> Option<Result<agentvm_backend::DomainStats, String>>;
}

/// Where a [`RunMonitor`] reports: the controller implements it with its metrics, audit log
/// and store. Called from the monitor's own thread.
pub trait AnomalySink: Send + Sync {
    /// `anomaly` (found by `rule`) was detected on `target`, whose pool's policy is `policy`;
    /// already logged.
    fn anomaly(&self, target: &MonitorTarget, rule: Rule, anomaly: &Anomaly, policy: AnomalyPolicy);

    /// Writes the run's status with the anomalies found so far (`status.anomalies`);
    /// failures are the sink's to log.
    fn write_status(&self, run: &str, status: AgentRunStatus);
}

/// Default time between two samples.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// What to watch.
#[derive(Debug, Clone)]
pub struct MonitorTarget {
    /// The run's name.
    pub run: String,
    /// Its pool.
    pub pool: String,
    /// The VM (libvirt domain).
    pub vm: String,
    /// The pool's thresholds and policy.
    pub settings: AnomalyDetection,
    /// The VM's vCPUs.
    pub vcpus: u32,
    /// The VM's RAM in bytes.
    pub memory_bytes: u64,
}

/// What a stopped monitor observed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MonitorReport {
    /// Anomalies, in the order detected.
    pub anomalies: Vec<Anomaly>,
    /// Resource use over the samples (`None` when no sample could be taken).
    pub usage: Option<ResourceUsage>,
    /// True when policy `kill` stopped the run.
    pub killed: bool,
}

/// A running monitor; [`RunMonitor::stop`] ends it.
pub struct RunMonitor {
    stop: Arc<AtomicBool>,
    closed: Arc<std::sync::Mutex<bool>>,
    killed: Arc<AtomicBool>,
    /// The sampling thread's final report.
    done: std::sync::mpsc::Receiver<MonitorReport>,
    /// What the thread had seen after its last complete sample.
    latest: Arc<std::sync::Mutex<MonitorReport>>,
}

/// How long [`RunMonitor::stop`] waits for the sampling thread to finish its sample in
/// progress. A guest agent call can block in libvirt for good when the agent is stuck; the
/// run must not wait for that, so the thread is then left to end on its own.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for RunMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunMonitor").finish_non_exhaustive()
    }
}

struct Sampler {
    backend: Arc<dyn Backend>,
    /// The VM's domain statistics.
    stats: Box<dyn StatsFeed>,
    target: MonitorTarget,
    sink: Arc<dyn AnomalySink>,
    detector: AnomalyDetector,
    /// The status as the run's thread last wrote it (`Running`); anomalies are added to it.
    status: AgentRunStatus,
    anomalies: Vec<Anomaly>,
    cancel: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    warned: bool,
    /// Set (under its lock) when the monitor is stopped: from then on the run's own thread
    /// owns the status, and a sample that finishes late must not write its stale copy over
    /// the run's final status.
    closed: Arc<std::sync::Mutex<bool>>,
}

impl Sampler {
    /// The guest's task count and the run cgroup's CPU time, as far as the agent answers.
    fn guest_readings(&self) -> (Option<u64>, Option<u64>) {
        let Ok(chan) = self.backend.agent(&self.target.vm) else {
            return (None, None);
        };
        let g = Guest::new(&*chan);
        let read = |path: &str| {
            g.read_file(path, 4096)
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        let tasks = read("/proc/loadavg").and_then(|t| tasks_from_loadavg(&t));
        let cpu = read(&format!("{RUN_CGROUP}/cpu.stat")).and_then(|t| cgroup_cpu_ns(&t));
        (tasks, cpu)
    }

    /// An observation from a sample of the VM's statistics (`None`: it could not be taken).
    fn observation(
        &mut self,
        sample: Result<agentvm_backend::DomainStats, String>,
    ) -> Option<Observation> {
        match sample {
            Ok(stats) => Some(Observation {
                stats,
                processes: None,
                run_cpu_ns: None,
            }),
            Err(e) => {
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(run = %self.target.run, vm = %self.target.vm, error = %e, "sampling the VM's statistics failed");
                }
                None
            }
        }
    }

    fn tick(&mut self, sample: Result<agentvm_backend::DomainStats, String>) {
        let Some(mut obs) = self.observation(sample) else {
            return;
        };
        (obs.processes, obs.run_cpu_ns) = self.guest_readings();
        let findings = self.detector.observe(obs);
        if findings.is_empty() {
            return;
        }
        let policy = self.target.settings.policy;
        for f in findings {
            let a = Anomaly {
                rule: f.rule.as_str().to_string(),
                metric: f.metric.as_str().to_string(),
                observed: f.observed,
                threshold: f.threshold,
                message: f.message,
                detected_at: Some(Timestamp::now()),
            };
            tracing::warn!(run = %self.target.run, vm = %self.target.vm, rule = %a.rule, "anomaly: {}", a.message);
            self.sink.anomaly(&self.target, f.rule, &a, policy);
            self.anomalies.push(a);
        }
        if policy == AnomalyPolicy::Kill && !self.killed.swap(true, Ordering::SeqCst) {
            tracing::warn!(run = %self.target.run, "policy kill: stopping the run");
            self.cancel.store(true, Ordering::SeqCst);
        }
        let closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            return;
        }
        let mut st = self.status.clone();
        st.anomalies = self.anomalies.clone();
        self.sink.write_status(&self.target.run, st);
    }
}

impl RunMonitor {
    /// Starts sampling `target` every `every`. `status` is the run's status as last written
    /// (anomalies are written on top of it while the run goes on); `cancel` is the run's
    /// cancel flag (set by policy `kill`).
    pub fn start(
        backend: Arc<dyn Backend>,
        sink: Arc<dyn AnomalySink>,
        stats: Box<dyn StatsFeed>,
        target: MonitorTarget,
        status: AgentRunStatus,
        cancel: Arc<AtomicBool>,
        every: Duration,
    ) -> std::io::Result<RunMonitor> {
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(std::sync::Mutex::new(false));
        let mut s = Sampler {
            stats,
            detector: AnomalyDetector::new(&target.settings, target.vcpus, target.memory_bytes),
            backend,
            sink,
            status,
            anomalies: Vec::new(),
            cancel,
            killed: killed.clone(),
            warned: false,
            closed: closed.clone(),
            target,
        };
        let stopping = stop.clone();
        let (tx, done) = std::sync::mpsc::channel();
        let latest = Arc::new(std::sync::Mutex::new(MonitorReport::default()));
        let shared = latest.clone();
        std::thread::Builder::new()
            .name(format!("watch-{}", s.target.run))
            .spawn(move || {
                let every = every.max(Duration::from_millis(50));
                let report = |s: &Sampler| {
                    let usage = s.detector.usage();
                    MonitorReport {
                        anomalies: s.anomalies.clone(),
                        usage: (usage.samples > 0).then_some(usage),
                        killed: s.killed.load(Ordering::SeqCst),
                    }
                };
                loop {
                    if let Some(sample) = s.stats.next(Duration::from_millis(25).min(every)) {
                        s.tick(sample);
                        *shared.lock().unwrap_or_else(|e| e.into_inner()) = report(&s);
                    }
                    if stopping.load(Ordering::SeqCst) {
                        // A last reading so the usage covers the whole run.
                        if let Some(sample) = s.stats.now(STOP_WAIT) {
                            if let Some(mut obs) = s.observation(sample) {
                                obs.run_cpu_ns = s.guest_readings().1;
                                s.detector.account(&obs);
                            }
                        }
                        // The receiver may have stopped waiting; nothing to do then.
                        let _ = tx.send(report(&s));
                        return;
                    }
                }
            })?;
        Ok(RunMonitor {
            stop,
            closed,
            killed,
            done,
            latest,
        })
    }

    /// True once policy `kill` stopped the run.
    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// Stops sampling and returns what was seen. Waits for a sample in progress, but at most
    /// [`STOP_WAIT`]; after that the report of the last complete sample is returned.
    pub fn stop(self) -> MonitorReport {
        self.stop_within(STOP_WAIT)
    }

    /// [`RunMonitor::stop`], waiting at most `wait` (zero: the last complete sample at once,
    /// e.g. when the VM is gone and no further sample can be taken).
    pub fn stop_within(self, wait: Duration) -> MonitorReport {
        self.stop.store(true, Ordering::SeqCst);
        // Waits for a status write in progress; none follows.
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        match self.done.recv_timeout(wait) {
            Ok(report) => report,
            Err(_) => {
                if !wait.is_zero() {
                    tracing::warn!(
                        "the anomaly monitor is stuck in a call to the VM (its guest agent does not answer); the run goes on without it"
                    );
                }
                self.latest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
            }
        }
    }
}

impl Drop for RunMonitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
