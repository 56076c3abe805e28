//! `VmPool`: a set of warm VMs booted from one template and parked at a golden state.

use crate::time::Timestamp;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;

resource_object!(
    /// A pool of VMs from one template. `minReady` VMs are booted ahead of
    /// time, run their warmup steps once, and are parked at a golden state;
    /// an `AgentRun` takes one, and the VM is reset to the golden state after.
    VmPool,
    VmPoolSpec,
    VmPoolStatus
);

/// vCPU bounds for custom resources.
pub const VCPU_RANGE: (u32, u32) = (1, 64);
/// Memory bounds for custom resources, MiB.
pub const MEMORY_MIB_RANGE: (u32, u32) = (128, 262_144);
/// Disk bounds for custom resources, GiB.
pub const DISK_GIB_RANGE: (u32, u32) = (1, 2048);
/// cgroup `cpu.shares` bounds.
pub const CPU_SHARES_RANGE: (u32, u32) = (2, 262_144);
/// Default `cpuShares`.
pub const DEFAULT_CPU_SHARES: u32 = 1024;
/// Bounds of the disk and network MiB/s limits (0 = no limit).
pub const IO_MIB_PER_SECOND_RANGE: (u32, u32) = (0, 100_000);
/// Bounds of `diskIops` (0 = no limit).
pub const DISK_IOPS_RANGE: (u32, u32) = (0, 1_000_000);
/// Bounds of `cpuQuotaPercent`.
pub const CPU_QUOTA_PERCENT_RANGE: (u32, u32) = (1, 100);
/// Largest `memoryHardLimitMib`.
pub const MAX_MEMORY_HARD_LIMIT_MIB: u32 = 1_048_576;
/// QEMU's own memory beyond guest RAM that `memoryHardLimitMib` must leave at least (device
/// emulation, I/O buffers; under TCG its translation cache), MiB.
pub const MEMORY_HARD_LIMIT_HEADROOM_MIB: u32 = 256;
/// Largest `maxSize`.
pub const MAX_POOL_SIZE: u32 = 256;
/// `ttlSeconds` bounds (1 minute to 7 days).
pub const TTL_SECONDS_RANGE: (u32, u32) = (60, 604_800);
/// Default `minReady`.
pub const DEFAULT_MIN_READY: u32 = 1;
/// Default `maxSize`.
pub const DEFAULT_MAX_SIZE: u32 = 4;
/// Default `ttlSeconds` (one hour).
pub const DEFAULT_TTL_SECONDS: u32 = 3600;
/// `healthCheckSeconds` bounds.
pub const HEALTH_CHECK_SECONDS_RANGE: (u32, u32) = (5, 3600);
/// Default `healthCheckSeconds`.
pub const DEFAULT_HEALTH_CHECK_SECONDS: u32 = 30;
/// Most entries kept in `status.events`.
pub const MAX_POOL_EVENTS: usize = 10;
/// Default warmup step timeout.
pub const DEFAULT_WARMUP_TIMEOUT_SECONDS: u32 = 600;
/// Largest warmup step timeout.
pub const MAX_WARMUP_TIMEOUT_SECONDS: u32 = 3600;

fn default_min_ready() -> u32 {
    DEFAULT_MIN_READY
}
fn default_max_size() -> u32 {
    DEFAULT_MAX_SIZE
}
fn default_ttl_seconds() -> u32 {
    DEFAULT_TTL_SECONDS
}
fn default_health_check_seconds() -> u32 {
    DEFAULT_HEALTH_CHECK_SECONDS
}
fn default_warmup_timeout_seconds() -> u32 {
    DEFAULT_WARMUP_TIMEOUT_SECONDS
}

/// Desired state of a `VmPool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmPoolSpec {
    /// What every VM of the pool looks like.
    pub template: VmTemplate,
    /// VMs kept booted, warmed up and idle at the golden state, ready to be
    /// handed out. 0 means VMs are only booted on demand. Default 1.
    #[serde(default = "default_min_ready")]
    #[schemars(range(max = 256))]
    pub min_ready: u32,
    /// Most VMs the pool may have at once, idle and busy (1 to 256).
    /// Runs wait for a VM when the pool is full. Default 4.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 1, max = 256))]
    pub max_size: u32,
    /// Age in seconds, counted from the VM's creation (not from its last
    /// use), after which an idle VM is destroyed and replaced by a freshly
    /// booted one (60 to 604800). A VM that expires during a run finishes
    /// the run and is replaced after it. Default 3600.
    #[serde(default = "default_ttl_seconds")]
    #[schemars(range(min = 60, max = 604_800))]
    pub ttl_seconds: u32,
    /// How often each idle VM's guest agent is pinged, in seconds (5 to
    /// 3600). A VM that does not answer is destroyed and replaced.
    /// Default 30.
    #[serde(default = "default_health_check_seconds")]
    #[schemars(range(min = 5, max = 3600))]
    pub health_check_seconds: u32,
    /// Anomaly detection on the statistics of VMs running an `AgentRun`:
    /// thresholds and what to do when one is crossed. Default: every rule
    /// on with its default threshold, policy `record`.
    #[serde(default, skip_serializing_if = "AnomalyDetection::is_default")]
    pub anomalies: AnomalyDetection,
    /// How the pool makes VMs: `boot` (default: every VM boots, runs the
    /// warm-up and parks at its golden state) or `template` (the first VM
    /// that boots is also kept on the host's disk as the pool's template,
    /// and every further VM is restored from it — memory and disk, the
    /// warm-up already done — with its own name, files, entropy and, on a
    /// network, MAC address and lease, then parks at a golden state of its
    /// own; a few seconds instead of a boot). A template is made anew when
    /// the pool's template changes and removed with the pool. A VM that
    /// cannot be made from the template boots, and the template is dropped.
    #[serde(default, skip_serializing_if = "VmCreation::is_default")]
    pub creation: VmCreation,
}

/// How a pool makes its VMs (`spec.creation`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmCreation {
    /// Every VM boots.
    #[default]
    Boot,
    /// The first VM boots and is kept as the pool's template; the others are restored from it.
    Template,
}

impl VmCreation {
    /// True for the default, [`VmCreation::Boot`].
    pub fn is_default(&self) -> bool {
        *self == VmCreation::Boot
    }
}

/// What the controller does when a run's VM behaves anomalously.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyPolicy {
    /// Record the anomaly (run status, metrics, audit log); the run goes on.
    #[default]
    Record,
    /// Record it and stop the run: it is killed in the guest and ends
    /// `Failed` with reason `AnomalyPolicy`.
    Kill,
}

/// Default `cpuPercent`.
pub const DEFAULT_ANOMALY_CPU_PERCENT: u32 = 90;
/// Default `cpuSustainedSamples`.
pub const DEFAULT_ANOMALY_CPU_SUSTAINED_SAMPLES: u32 = 10;
/// Default `diskWriteMibPerSecond`.
pub const DEFAULT_ANOMALY_DISK_WRITE_MIB_PER_SECOND: u32 = 50;
/// Default `netTxMibPerSecond`.
pub const DEFAULT_ANOMALY_NET_TX_MIB_PER_SECOND: u32 = 10;
/// Default `rateWindowSamples`.
pub const DEFAULT_ANOMALY_RATE_WINDOW_SAMPLES: u32 = 5;
/// Default `memoryPercent`.
pub const DEFAULT_ANOMALY_MEMORY_PERCENT: u32 = 90;
/// Default `maxProcesses`.
pub const DEFAULT_ANOMALY_MAX_PROCESSES: u32 = 1000;
/// Default `zScore`.
pub const DEFAULT_ANOMALY_Z_SCORE: u32 = 6;
/// Default `baselineSamples`.
pub const DEFAULT_ANOMALY_BASELINE_SAMPLES: u32 = 10;
/// Bounds of the sample counts (`cpuSustainedSamples`, `rateWindowSamples`,
/// `baselineSamples`).
pub const ANOMALY_SAMPLES_RANGE: (u32, u32) = (1, 3600);
/// Bounds of `cpuPercent` and `memoryPercent`.
pub const ANOMALY_PERCENT_RANGE: (u32, u32) = (1, 100);
/// Bounds of the MiB/s rates.
pub const ANOMALY_MIB_PER_SECOND_RANGE: (u32, u32) = (1, 1_000_000);
/// Bounds of `maxProcesses`.
pub const ANOMALY_MAX_PROCESSES_RANGE: (u32, u32) = (16, 4_194_304);
/// Bounds of `zScore` (0 turns the baseline rule off).
pub const ANOMALY_Z_SCORE_RANGE: (u32, u32) = (0, 100);

macro_rules! anomaly_defaults {
    ($($f:ident = $c:ident),* $(,)?) => {
        $(fn $f() -> u32 { $c })*
    };
}
anomaly_defaults!(
    default_cpu_percent = DEFAULT_ANOMALY_CPU_PERCENT,
    default_cpu_sustained_samples = DEFAULT_ANOMALY_CPU_SUSTAINED_SAMPLES,
    default_disk_write_mib_per_second = DEFAULT_ANOMALY_DISK_WRITE_MIB_PER_SECOND,
    default_net_tx_mib_per_second = DEFAULT_ANOMALY_NET_TX_MIB_PER_SECOND,
    default_rate_window_samples = DEFAULT_ANOMALY_RATE_WINDOW_SAMPLES,
    default_memory_percent = DEFAULT_ANOMALY_MEMORY_PERCENT,
    default_max_processes = DEFAULT_ANOMALY_MAX_PROCESSES,
    default_z_score = DEFAULT_ANOMALY_Z_SCORE,
    default_baseline_samples = DEFAULT_ANOMALY_BASELINE_SAMPLES,
);

/// Anomaly detection settings of a pool. The VM running a run is sampled
/// about once a second (libvirt domain statistics, plus the guest's process
/// count through its agent); each rule below fires at most once per run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AnomalyDetection {
    /// `record` (default) or `kill` (stop the run on the first anomaly).
    #[serde(default)]
    pub policy: AnomalyPolicy,
    /// `CpuSaturated` fires when CPU use in percent of the VM's vCPUs (its
    /// vCPU time over wall time) stays at or above this (1 to 100) for
    /// `cpuSustainedSamples` consecutive samples. Default 90.
    #[serde(default = "default_cpu_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub cpu_percent: u32,
    /// Consecutive samples a CPU or baseline rule must hold before it fires
    /// (1 to 3600). Default 10.
    #[serde(default = "default_cpu_sustained_samples")]
    #[schemars(range(min = 1, max = 3600))]
    pub cpu_sustained_samples: u32,
    /// `DiskWriteBurst`: disk write rate in MiB/s, averaged over
    /// `rateWindowSamples` samples, at or above this (1 to 1000000).
    /// Default 50.
    #[serde(default = "default_disk_write_mib_per_second")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub disk_write_mib_per_second: u32,
    /// `NetworkTxBurst`: network transmit rate in MiB/s, averaged over
    /// `rateWindowSamples` samples, at or above this (1 to 1000000).
    /// Default 10.
    #[serde(default = "default_net_tx_mib_per_second")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub net_tx_mib_per_second: u32,
    /// Samples the disk and network rates are averaged over (1 to 3600).
    /// Default 5.
    #[serde(default = "default_rate_window_samples")]
    #[schemars(range(min = 1, max = 3600))]
    pub rate_window_samples: u32,
    /// `MemoryNearLimit`: memory the guest uses (not counting reclaimable
    /// cache) at or above this percent of its RAM (1 to 100). Default 90.
    #[serde(default = "default_memory_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub memory_percent: u32,
    /// `ProcessExplosion`: tasks (processes and threads) in the guest at or
    /// above this (16 to 4194304). Default 1000.
    #[serde(default = "default_max_processes")]
    #[schemars(range(min = 16, max = 4_194_304))]
    pub max_processes: u32,
    /// `BaselineDeviation`: a metric (CPU, disk write rate, network
    /// transmit rate, processes) this many standard deviations above its
    /// running mean, for `cpuSustainedSamples` consecutive samples once
    /// `baselineSamples` were seen (0 to 100; 0 turns the rule off).
    /// Default 6.
    #[serde(default = "default_z_score")]
    #[schemars(range(min = 0, max = 100))]
    pub z_score: u32,
    /// Samples that form a metric's baseline before `zScore` applies
    /// (1 to 3600). Default 10.
    #[serde(default = "default_baseline_samples")]
    #[schemars(range(min = 1, max = 3600))]
    pub baseline_samples: u32,
}

impl Default for AnomalyDetection {
    fn default() -> Self {
        Self {
            policy: AnomalyPolicy::default(),
            cpu_percent: DEFAULT_ANOMALY_CPU_PERCENT,
            cpu_sustained_samples: DEFAULT_ANOMALY_CPU_SUSTAINED_SAMPLES,
            disk_write_mib_per_second: DEFAULT_ANOMALY_DISK_WRITE_MIB_PER_SECOND,
            net_tx_mib_per_second: DEFAULT_ANOMALY_NET_TX_MIB_PER_SECOND,
            rate_window_samples: DEFAULT_ANOMALY_RATE_WINDOW_SAMPLES,
            memory_percent: DEFAULT_ANOMALY_MEMORY_PERCENT,
            max_processes: DEFAULT_ANOMALY_MAX_PROCESSES,
            z_score: DEFAULT_ANOMALY_Z_SCORE,
            baseline_samples: DEFAULT_ANOMALY_BASELINE_SAMPLES,
        }
    }
}

impl AnomalyDetection {
    /// True when every setting has its default (then it is not written out).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Template every VM of a pool is created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmTemplate {
    /// Name of the `Image` the VMs boot.
    pub image_ref: String,
    /// vCPUs, memory and disk. Default: the `standard` profile.
    #[serde(default)]
    pub resources: Resources,
    /// Network attachment. Default: `mode: isolated` (no network interface).
    #[serde(default)]
    pub network: PoolNetwork,
    /// Commands run once in every new VM, in order, before it is parked at
    /// the golden state (e.g. warming caches, `git clone` of a mirror).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warmup: Vec<WarmupStep>,
}

/// A named resource profile (the predecessor's `ResourceProfile` presets), with default
/// disk and network throughput limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// 1 vCPU, 1024 MiB, 10 GiB; disk 100 MiB/s read, 50 MiB/s write, 1000
    /// IOPS; network 10 MiB/s each way: simple scripts, quick tests.
    Light,
    /// 2 vCPU, 2048 MiB, 20 GiB; disk 200 MiB/s read, 100 MiB/s write, 2000
    /// IOPS; network 25 MiB/s each way: normal CLI agent work (default).
    #[default]
    Standard,
    /// 4 vCPU, 4096 MiB, 40 GiB; disk 400 MiB/s read, 200 MiB/s write, 4000
    /// IOPS; network 50 MiB/s each way: large codebases, builds.
    Intensive,
    /// `vcpu`, `memoryMib` and `diskGib` given explicitly; no throughput
    /// limit unless given.
    Custom,
}

impl Profile {
    /// The preset as (vcpu, memoryMib, diskGib); `None` for `custom`.
    pub fn preset(&self) -> Option<(u32, u32, u32)> {
        match self {
            Profile::Light => Some((1, 1024, 10)),
            Profile::Standard => Some((2, 2048, 20)),
            Profile::Intensive => Some((4, 4096, 40)),
            Profile::Custom => None,
        }
    }

    /// The profile's default throughput limits (none for `custom`).
    pub fn io_limits(&self) -> IoLimits {
        let (read, write, iops, net) = match self {
            Profile::Light => (100, 50, 1000, 10),
            Profile::Standard => (200, 100, 2000, 25),
            Profile::Intensive => (400, 200, 4000, 50),
            Profile::Custom => return IoLimits::default(),
        };
        IoLimits {
            disk_read_mib_per_second: read,
            disk_write_mib_per_second: write,
            disk_iops: iops,
            net_in_mib_per_second: net,
            net_out_mib_per_second: net,
        }
    }

    /// Lowercase name as written in manifests.
    pub fn as_str(&self) -> &'static str {
        match self {
            Profile::Light => "light",
            Profile::Standard => "standard",
            Profile::Intensive => "intensive",
            Profile::Custom => "custom",
        }
    }
}

/// Compute resources of each VM: a profile, or `profile: custom` with
/// explicit sizes; throughput limits and caps on top of either.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// `light` (1 vCPU/1024 MiB/10 GiB), `standard` (2/2048/20, default),
    /// `intensive` (4/4096/40) or `custom` (set `vcpu`, `memoryMib` and
    /// `diskGib`). The presets also set default disk and network limits
    /// (see the `*MibPerSecond` and `diskIops` fields).
    #[serde(default)]
    pub profile: Profile,
    /// Virtual CPUs (1 to 64). Only with `profile: custom`, where it is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpu: Option<u32>,
    /// Memory in MiB (128 to 262144). Only with `profile: custom`, where it
    /// is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 128, max = 262_144))]
    pub memory_mib: Option<u32>,
    /// Disk size in GiB (1 to 2048): each VM's disk is a copy-on-write
    /// overlay of this size on the image, and the guest grows its root file
    /// system to it at boot. At least the image's `diskSizeMib` (`apply`
    /// refuses a smaller one). Only with `profile: custom`, where it is
    /// required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2048))]
    pub disk_gib: Option<u32>,
    /// Relative CPU weight against other VMs on the host (cgroup
    /// `cpu.shares`, 2 to 262144). Any profile. Default 1024. When set, the
    /// pool's `CpuSharesApplied` condition says whether this host enforces it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 262_144))]
    pub cpu_shares: Option<u32>,
    /// Most CPU time each vCPU may use, in percent of one host CPU (1 to
    /// 100; cgroup CPU bandwidth, `cputune/quota`). Any profile. Default: no
    /// cap. Needs the host's cgroup CPU controller: where libvirt has none
    /// the VMs run without the cap and the pool's `CpuQuotaApplied`
    /// condition is `False`/`HostCannotEnforce` with libvirt's reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub cpu_quota_percent: Option<u32>,
    /// Hard limit on the memory of each VM's whole QEMU process, MiB
    /// (`memtune/hard_limit`): at least `memoryMib` + 256 (QEMU's own
    /// memory; under TCG also its translation cache), at most 1048576. Any
    /// profile. Default: none (guest RAM still bounds the guest). Where the
    /// host cannot enforce it (no cgroup memory controller, or libvirt may
    /// not raise the locked-memory limit) the VMs run without it and the
    /// pool's `MemoryLimitApplied` condition is `False`/`HostCannotEnforce`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 384, max = 1_048_576))]
    pub memory_hard_limit_mib: Option<u32>,
    /// Disk read limit, MiB/s (QEMU block throttling, `<iotune>`; any
    /// host). 0 = none. Default: the profile's (100/200/400; none for
    /// `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub disk_read_mib_per_second: Option<u32>,
    /// Disk write limit, MiB/s (QEMU block throttling; any host). 0 = none.
    /// Default: the profile's (50/100/200; none for `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub disk_write_mib_per_second: Option<u32>,
    /// Disk operations per second, reads and writes together (QEMU block
    /// throttling; any host). 0 = none. Default: the profile's
    /// (1000/2000/4000; none for `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub disk_iops: Option<u32>,
    /// Network limit on traffic into the VM, MiB/s (libvirt `<bandwidth>`,
    /// shaped with tc on the host; attached pools). 0 = none. Default: the
    /// profile's (10/25/50; none for `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub net_in_mib_per_second: Option<u32>,
    /// Network limit on traffic out of the VM, MiB/s (libvirt
    /// `<bandwidth>`, policed with tc on the host: excess packets are
    /// dropped; attached pools). 0 = none. Default: the profile's
    /// (10/25/50; none for `custom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100_000))]
    pub net_out_mib_per_second: Option<u32>,
}

/// Disk and network throughput limits; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IoLimits {
    /// Disk reads, MiB/s.
    pub disk_read_mib_per_second: u32,
    /// Disk writes, MiB/s.
    pub disk_write_mib_per_second: u32,
    /// Disk operations per second.
    pub disk_iops: u32,
    /// Network into the VM, MiB/s.
    pub net_in_mib_per_second: u32,
    /// Network out of the VM, MiB/s.
    pub net_out_mib_per_second: u32,
}

/// `Resources` with the profile applied: what a VM actually gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResolvedResources {
    /// Virtual CPUs.
    pub vcpu: u32,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Disk (overlay virtual size; the guest's root file system grows to it), GiB.
    pub disk_gib: u32,
    /// cgroup `cpu.shares`.
    pub cpu_shares: u32,
    /// CPU cap per vCPU in percent of a host CPU, if any.
    pub cpu_quota_percent: Option<u32>,
    /// Hard limit on the QEMU process's memory, MiB, if any.
    pub memory_hard_limit_mib: Option<u32>,
    /// Disk and network throughput limits (0 = none).
    pub io: IoLimits,
}

impl Resources {
    /// Resources of a named profile.
    pub fn profile(profile: Profile) -> Self {
        Self {
            profile,
            ..Self::default()
        }
    }

    /// Custom resources.
    pub fn custom(vcpu: u32, memory_mib: u32, disk_gib: u32) -> Self {
        Self {
            profile: Profile::Custom,
            vcpu: Some(vcpu),
            memory_mib: Some(memory_mib),
            disk_gib: Some(disk_gib),
            ..Self::default()
        }
    }

    /// The sizes and limits in effect. For a validated object this is exact; for an invalid
    /// `custom` one, missing sizes fall back to the `standard` preset.
    pub fn resolved(&self) -> ResolvedResources {
        let (std_vcpu, std_mem, std_disk) = Profile::Standard.preset().unwrap_or((2, 2048, 20));
        let (vcpu, memory_mib, disk_gib) = match self.profile.preset() {
            Some(preset) => preset,
            None => (
                self.vcpu.unwrap_or(std_vcpu),
                self.memory_mib.unwrap_or(std_mem),
                self.disk_gib.unwrap_or(std_disk),
            ),
        };
        let d = self.profile.io_limits();
        ResolvedResources {
            vcpu,
            memory_mib,
            disk_gib,
            cpu_shares: self.cpu_shares.unwrap_or(DEFAULT_CPU_SHARES),
            cpu_quota_percent: self.cpu_quota_percent,
            memory_hard_limit_mib: self.memory_hard_limit_mib,
            io: IoLimits {
                disk_read_mib_per_second: self
                    .disk_read_mib_per_second
                    .unwrap_or(d.disk_read_mib_per_second),
                disk_write_mib_per_second: self
                    .disk_write_mib_per_second
                    .unwrap_or(d.disk_write_mib_per_second),
                disk_iops: self.disk_iops.unwrap_or(d.disk_iops),
                net_in_mib_per_second: self
                    .net_in_mib_per_second
                    .unwrap_or(d.net_in_mib_per_second),
                net_out_mib_per_second: self
                    .net_out_mib_per_second
                    .unwrap_or(d.net_out_mib_per_second),
            },
        }
    }
}

/// How a pool's VMs are connected. Isolated unless stated otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolNetwork {
    /// `isolated`: the VM has no network interface at all (the default when
    /// `network` is omitted). `attached`: one interface on `networkRef`,
    /// filtered by `filterRef`. Required when `network` is given.
    pub mode: PoolNetworkMode,
    /// Name of the `Network` to attach to. Required with `mode: attached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_ref: Option<String>,
    /// Name of the `NetworkFilter` applied to the interface. Required with
    /// `mode: attached`: there is no unfiltered attachment (write a filter
    /// allowing `protocol: all` if you really want one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter_ref: Option<String>,
}

/// Whether a pool's VMs have a network interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolNetworkMode {
    /// No network interface: code cannot reach anything.
    #[default]
    Isolated,
    /// One interface on a `Network`, restricted by a `NetworkFilter`.
    Attached,
}

/// A network attachment with both references present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkAttachment<'a> {
    /// The `Network` name.
    pub network_ref: &'a str,
    /// The `NetworkFilter` name.
    pub filter_ref: &'a str,
}

impl PoolNetwork {
    /// No network interface.
    pub fn isolated() -> Self {
        Self::default()
    }

    /// Attached to `network` through `filter`.
    pub fn attached(network: impl Into<String>, filter: impl Into<String>) -> Self {
        Self {
            mode: PoolNetworkMode::Attached,
            network_ref: Some(network.into()),
            filter_ref: Some(filter.into()),
        }
    }

    /// The attachment, or `None` when isolated (or, for an invalid object,
    /// when a reference is missing).
    pub fn attachment(&self) -> Option<NetworkAttachment<'_>> {
        match (self.mode, &self.network_ref, &self.filter_ref) {
            (PoolNetworkMode::Attached, Some(n), Some(f)) => Some(NetworkAttachment {
                network_ref: n,
                filter_ref: f,
            }),
            _ => None,
        }
    }
}

/// One command run while warming a new VM, before its golden state is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmupStep {
    /// Short label shown in events and logs. Default: the command itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Shell command, run with `/bin/sh -c` as root. Must exit 0, or the VM
    /// is discarded and the pool reports the failure.
    pub run: String,
    /// Seconds the step may take (1 to 3600). Default 600.
    #[serde(default = "default_warmup_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
}

/// Lifecycle phase of a `VmPool`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum VmPoolPhase {
    /// Waiting for its image, network or filter.
    #[default]
    Pending,
    /// Booting and warming VMs up to `minReady`.
    Warming,
    /// At least `minReady` VMs are ready.
    Ready,
    /// Running, but VMs keep failing to boot or warm up; see `conditions`.
    Degraded,
    /// Cannot work (e.g. its image failed); see `conditions`.
    Failed,
}

/// Observed state of a `VmPool`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmPoolStatus {
    /// Where the pool is in its lifecycle.
    #[serde(default)]
    pub phase: VmPoolPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, `ImageReady`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// VMs idle at the golden state.
    #[serde(default)]
    pub ready: u32,
    /// VMs running an `AgentRun`.
    #[serde(default)]
    pub busy: u32,
    /// VMs booting, warming up or resetting.
    #[serde(default)]
    pub starting: u32,
    /// Every VM of the pool, in any state.
    #[serde(default)]
    pub total: u32,
    /// Names of the pool's libvirt domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
    /// Spec hash of the template the ready VMs were built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// When each VM was created (RFC 3339), by domain name: `ttlSeconds`
    /// counts from here, also across controller restarts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_created_at: BTreeMap<String, Timestamp>,
    /// The most recent VM replacements and why (newest last, at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<PoolEvent>,
    /// Each resource of the template: the value in effect and whether this
    /// host enforces it (as found when the newest VM was created).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<ResourceStatus>,
}

/// One resource of a pool's VMs: what is asked and whether it is enforced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceStatus {
    /// The field of `resources`: `vcpu`, `memoryMib`, `diskGib`,
    /// `cpuShares`, `cpuQuotaPercent`, `memoryHardLimitMib`,
    /// `diskReadMibPerSecond`, `diskWriteMibPerSecond`, `diskIops`,
    /// `netInMibPerSecond`, `netOutMibPerSecond`.
    pub name: String,
    /// The value in effect (from the manifest or the profile), with its unit.
    pub requested: String,
    /// True when this host enforces it.
    pub enforced: bool,
    /// What enforces it, or why it is not enforced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Something that happened to one VM of a pool, e.g. its replacement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolEvent {
    /// When it happened (RFC 3339).
    pub time: String,
    /// CamelCase reason: `TtlExpired`, `Unhealthy`, `ResetFailed`.
    pub reason: String,
    /// The VM (libvirt domain) concerned.
    pub vm: String,
    /// Details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl VmPoolStatus {
    /// Appends `event`, keeping the newest [`MAX_POOL_EVENTS`].
    pub fn push_event(&mut self, event: PoolEvent) {
        self.events.push(event);
        if self.events.len() > MAX_POOL_EVENTS {
            let extra = self.events.len() - MAX_POOL_EVENTS;
            self.events.drain(..extra);
        }
    }
}
