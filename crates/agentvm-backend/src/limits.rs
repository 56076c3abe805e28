//! Limits on what a VM may take from its host — CPU weight and quota, a memory hard limit,
//! disk and network throughput — how they go into the domain, and whether this host enforces
//! them.
//!
//! Disk throughput is QEMU's own block throttling and network bandwidth is tc on the host's
//! end of the interface: they need no cgroups. CPU weight and quota and the memory hard
//! limit need cgroup controllers libvirt can use, and where it cannot, libvirt either ignores
//! them silently (CPU weight) or refuses to start the domain (`<cputune><quota>`: "cgroup cpu
//! is required for scheduler tuning"; `<memtune><hard_limit>` in a sandbox without
//! `CAP_SYS_RESOURCE`: "cannot limit locked memory"). A limit never stops a VM from booting:
//! [`Libvirt::start_with_limits`] finds the limits that make the start fail, starts the VM
//! without them and says why each is not in force; then it asks libvirt whether the others
//! are.
//!
//! # Guarantees
//! - A VM starts whenever it would start without its limits.
//! - Every requested limit gets a verdict: in force, or not with libvirt's reason.
//! - A limit is taken for unenforceable only when the domain starts without it and not with
//!   it alone; that verdict is kept for the connection, so later VMs skip the failing start.
//!
//! # Assumptions
//! - Whether a host can enforce a limit does not depend on its value.

use std::collections::BTreeMap;

use crate::error::{BackendError, Result};
use crate::libvirt::Libvirt;
use crate::xml::{DiskIoLimits, DomainSpec, NetBandwidth};

/// One kind of limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Limit {
    /// Relative CPU weight (`cputune/shares`).
    CpuShares,
    /// CPU time per vCPU (`cputune/quota`).
    CpuQuota,
    /// Memory of the whole QEMU process (`memtune/hard_limit`).
    MemoryHardLimit,
    /// Disk throughput (`<iotune>`).
    DiskIo,
    /// Network bandwidth (`<bandwidth>`).
    NetBandwidth,
}

impl Limit {
    /// Every kind, in the order verdicts are reported.
    pub const ALL: [Limit; 5] = [
        Limit::CpuShares,
        Limit::CpuQuota,
        Limit::MemoryHardLimit,
        Limit::DiskIo,
        Limit::NetBandwidth,
    ];

    /// A stable name (`cpuShares`, `cpuQuota`, `memoryHardLimit`, `diskIo`, `netBandwidth`).
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::CpuShares => "cpuShares",
            Limit::CpuQuota => "cpuQuota",
            Limit::MemoryHardLimit => "memoryHardLimit",
            Limit::DiskIo => "diskIo",
            Limit::NetBandwidth => "netBandwidth",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits asked for one VM; `None` / unlimited when not asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VmLimits {
    /// Relative CPU weight (`cputune/shares`).
    pub cpu_shares: Option<u64>,
    /// CPU time per vCPU, percent of one host CPU.
    pub cpu_quota_percent: Option<u32>,
    /// Memory of the whole QEMU process, MiB.
    pub memory_hard_limit_mib: Option<u64>,
    /// Disk throughput.
    pub disk_io: DiskIoLimits,
    /// Network bandwidth (only for a VM with a network interface).
    pub net_bandwidth: NetBandwidth,
}

impl VmLimits {
    /// The limits asked for, in [`Limit::ALL`] order; bandwidth only with a NIC.
    pub fn requested(&self, has_nic: bool) -> Vec<Limit> {
        Limit::ALL
            .into_iter()
            .filter(|l| match l {
                Limit::CpuShares => self.cpu_shares.is_some(),
                Limit::CpuQuota => self.cpu_quota_percent.is_some(),
                Limit::MemoryHardLimit => self.memory_hard_limit_mib.is_some(),
                Limit::DiskIo => !self.disk_io.is_unlimited(),
                Limit::NetBandwidth => has_nic && !self.net_bandwidth.is_unlimited(),
            })
            .collect()
    }

    /// These limits without `limit`.
    pub fn without(mut self, limit: Limit) -> Self {
        match limit {
            Limit::CpuShares => self.cpu_shares = None,
            Limit::CpuQuota => self.cpu_quota_percent = None,
            Limit::MemoryHardLimit => self.memory_hard_limit_mib = None,
            Limit::DiskIo => self.disk_io = DiskIoLimits::default(),
            Limit::NetBandwidth => self.net_bandwidth = NetBandwidth::default(),
        }
        self
    }

    /// Only `limit` of these limits.
    pub fn only(self, limit: Limit) -> Self {
        Limit::ALL
            .into_iter()
            .filter(|l| *l != limit)
            .fold(self, VmLimits::without)
    }

    /// Writes these limits into `spec`.
    pub fn apply_to(&self, spec: &mut DomainSpec) {
        spec.cpu_shares = self.cpu_shares;
        spec.cpu_quota_percent = self.cpu_quota_percent;
        spec.memory_hard_limit_mib = self.memory_hard_limit_mib;
        spec.disk_io = self.disk_io;
        spec.net_bandwidth = self.net_bandwidth;
    }
}

/// Whether each requested limit is in force on a VM: `Err` holds why not.
pub type Enforcement = Vec<(Limit, std::result::Result<(), String>)>;

/// The reasons in `enforcement` for `limit` not being in force, if it was requested and is not.
pub fn not_applied(enforcement: &Enforcement, limit: Limit) -> Option<&str> {
    enforcement
        .iter()
        .find(|(l, _)| *l == limit)
        .and_then(|(_, r)| r.as_ref().err().map(String::as_str))
}

impl Libvirt {
    /// Defines `spec` (whose own limits are ignored) with `limits` and starts it. When the
    /// start fails with limits that the host may not enforce, finds out which of them make it
    /// fail (each alone), and starts it without those. Returns the verdict of every requested
    /// limit. The domain must not exist yet; on failure it may be left defined (the caller
    /// removes it, as after any failed start).
    pub fn start_with_limits(&self, spec: &DomainSpec, limits: &VmLimits) -> Result<Enforcement> {
        let has_nic = spec.nic.is_some();
        let requested = limits.requested(has_nic);
        let known = self.unenforceable_limits();
        let mut dropped: BTreeMap<Limit, String> = requested
            .iter()
            .filter_map(|l| known.get(l).map(|why| (*l, why.clone())))
            .collect();
        let mut current = dropped.keys().fold(*limits, |acc, l| acc.without(*l));
        self.define_domain(&with_limits(spec, &current))?;
        if let Err(first) = self.start_domain(&spec.name) {
            let candidates = current.requested(has_nic);
            if candidates.is_empty() {
                return Err(first);
            }
            tracing::info!(vm = %spec.name, error = %first, "the VM does not start with its limits; finding the ones this host cannot enforce");
            let mut found = BTreeMap::new();
            for limit in candidates {
                self.redefine_domain(&with_limits(spec, &limits.only(limit)))?;
                match self.start_domain(&spec.name) {
                    Ok(()) => self.destroy_domain(&spec.name)?,
                    Err(e) => {
                        found.insert(limit, libvirt_reason(&e));
                    }
                }
            }
            current = found.keys().fold(current, |acc, l| acc.without(*l));
            self.redefine_domain(&with_limits(spec, &current))?;
            self.start_domain(&spec.name)?;
            // Only now is it certain that these limits, and nothing else, were in the way.
            for (limit, why) in &found {
                tracing::warn!(vm = %spec.name, %limit, %why, "this host cannot enforce the limit; VMs run without it");
                self.remember_unenforceable(*limit, why);
            }
            dropped.extend(found);
        }
        Ok(requested
            .into_iter()
            .map(|limit| {
                let verdict = match dropped.get(&limit) {
                    Some(why) => Err(why.clone()),
                    None => self.limit_in_force(&spec.name, limit, limits),
                };
                (limit, verdict)
            })
            .collect())
    }

    /// What of `limits` is in force on running domain `name` (defined elsewhere, e.g. from a
    /// template's definition): limits this host is known not to enforce with its reason,
    /// the others as the running domain shows them.
    pub(crate) fn enforcement_of(
        &self,
        name: &str,
        limits: &VmLimits,
        has_nic: bool,
    ) -> Enforcement {
        let known = self.unenforceable_limits();
        limits
            .requested(has_nic)
            .into_iter()
            .map(|limit| {
                let verdict = match known.get(&limit) {
                    Some(why) => Err(why.clone()),
                    None => self.limit_in_force(name, limit, limits),
                };
                (limit, verdict)
            })
            .collect()
    }

    /// Whether running domain `name` has `limit` (as asked in `limits`) in force.
    fn limit_in_force(
        &self,
        name: &str,
        limit: Limit,
        limits: &VmLimits,
    ) -> std::result::Result<(), String> {
        match limit {
            Limit::CpuShares => self.cpu_shares_applied(name, limits.cpu_shares.unwrap_or(0)),
            Limit::CpuQuota => {
                let wanted = crate::xml::cpu_quota_us(limits.cpu_quota_percent.unwrap_or(100));
                let dom = self
                    .raw()
                    .lookup_domain_by_name(name)
                    .map_err(|e| e.to_string())?;
                match dom.scheduler_parameters() {
                    Ok(info) => match info.vcpu_bw.quota {
                        Some(q) if q == wanted as i64 => Ok(()),
                        Some(q) => Err(format!(
                            "libvirt reports a vCPU quota of {q} µs instead of {wanted} µs"
                        )),
                        None => Err(format!(
                            "libvirt reports no vCPU quota (scheduler {})",
                            info.scheduler_type
                        )),
                    },
                    Err(e) => Err(e.message().to_string()),
                }
            }
            Limit::MemoryHardLimit => {
                let wanted_kib = limits.memory_hard_limit_mib.unwrap_or(0) * 1024;
                let dom = self
                    .raw()
                    .lookup_domain_by_name(name)
                    .map_err(|e| e.to_string())?;
                match dom.memory_parameters(0) {
                    Ok(p) => match p.hard_limit {
                        Some(k) if k == wanted_kib => Ok(()),
                        Some(k) => Err(format!(
                            "libvirt reports a hard limit of {k} KiB instead of {wanted_kib} KiB"
                        )),
                        None => Err("libvirt reports no memory hard limit".to_string()),
                    },
                    Err(e) => Err(e.message().to_string()),
                }
            }
            // QEMU's block throttling and tc: libvirt fails the start when it cannot set them.
            Limit::DiskIo | Limit::NetBandwidth => Ok(()),
        }
    }
}

fn with_limits(spec: &DomainSpec, limits: &VmLimits) -> DomainSpec {
    let mut spec = spec.clone();
    limits.apply_to(&mut spec);
    spec
}

/// libvirt's own words for why a start failed.
fn libvirt_reason(e: &BackendError) -> String {
    let text = match e {
        BackendError::Libvirt { message, .. } => message.clone(),
        other => other.to_string(),
    };
    // tc's message ends with a newline; one line reads better in a condition.
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> VmLimits {
        VmLimits {
            cpu_shares: Some(512),
            cpu_quota_percent: Some(50),
            memory_hard_limit_mib: Some(1024),
            disk_io: DiskIoLimits {
                read_bytes_per_second: 1,
                write_bytes_per_second: 2,
                iops: 3,
            },
            net_bandwidth: NetBandwidth {
                in_bytes_per_second: 4,
                out_bytes_per_second: 5,
            },
        }
    }

    #[test]
    fn requested_limits_need_a_nic_for_bandwidth_and_only_and_without_pick_them() {
        assert_eq!(all().requested(true), Limit::ALL.to_vec());
        assert_eq!(
            all().requested(false),
            Limit::ALL[..4].to_vec(),
            "no bandwidth without an interface"
        );
        assert!(VmLimits::default().requested(true).is_empty());
        for l in Limit::ALL {
            assert_eq!(all().only(l).requested(true), vec![l]);
            assert!(!all().without(l).requested(true).contains(&l));
            assert_eq!(all().without(l).requested(true).len(), 4);
        }
    }

    #[test]
    fn not_applied_finds_the_reason() {
        let e: Enforcement = vec![
            (Limit::CpuQuota, Err("no cgroup".into())),
            (Limit::DiskIo, Ok(())),
        ];
        assert_eq!(not_applied(&e, Limit::CpuQuota), Some("no cgroup"));
        assert_eq!(not_applied(&e, Limit::DiskIo), None);
        assert_eq!(not_applied(&e, Limit::MemoryHardLimit), None);
    }
}
