//! A pool's resources against what its host enforces: the limits a template asks of the
//! backend, the conditions saying whether each is in force (`CpuSharesApplied`,
//! `CpuQuotaApplied`, `MemoryLimitApplied`, `DiskIoLimitApplied`,
//! `NetworkBandwidthApplied`), and the per-resource summary in `status.resources` that
//! `agentvm describe pool/NAME` shows.

use agentvm_api::{Condition, Reason, ResourceStatus, Resources};
use agentvm_backend::{DiskIoLimits, Enforcement, Limit, NetBandwidth, VmLimits};

use crate::reconcilers::condition;

/// Condition type saying whether `resources.cpuShares` is in force (set only when given).
pub const CPU_SHARES_APPLIED: &str = "CpuSharesApplied";
/// Condition type saying whether `resources.cpuQuotaPercent` is in force.
pub const CPU_QUOTA_APPLIED: &str = "CpuQuotaApplied";
/// Condition type saying whether `resources.memoryHardLimitMib` is in force.
pub const MEMORY_LIMIT_APPLIED: &str = "MemoryLimitApplied";
/// Condition type saying whether the disk throughput limits are in force.
pub const DISK_IO_LIMIT_APPLIED: &str = "DiskIoLimitApplied";
/// Condition type saying whether the network bandwidth limits are in force.
pub const NETWORK_BANDWIDTH_APPLIED: &str = "NetworkBandwidthApplied";

const MIB: u64 = 1 << 20;

/// The condition type reporting `limit`.
pub fn condition_type(limit: Limit) -> &'static str {
    match limit {
        Limit::CpuShares => CPU_SHARES_APPLIED,
        Limit::CpuQuota => CPU_QUOTA_APPLIED,
        Limit::MemoryHardLimit => MEMORY_LIMIT_APPLIED,
        Limit::DiskIo => DISK_IO_LIMIT_APPLIED,
        Limit::NetBandwidth => NETWORK_BANDWIDTH_APPLIED,
    }
}

/// The limits a VM of these resources asks of its host: the CPU weight only when the
/// manifest sets it, throughput limits from the fields or the profile.
pub fn vm_limits(r: &Resources) -> VmLimits {
    let res = r.resolved();
    let mib = |v: u32| u64::from(v) * MIB;
    VmLimits {
        cpu_shares: r.cpu_shares.map(u64::from),
        cpu_quota_percent: res.cpu_quota_percent,
        memory_hard_limit_mib: res.memory_hard_limit_mib.map(u64::from),
        disk_io: DiskIoLimits {
            read_bytes_per_second: mib(res.io.disk_read_mib_per_second),
            write_bytes_per_second: mib(res.io.disk_write_mib_per_second),
            iops: u64::from(res.io.disk_iops),
        },
        net_bandwidth: NetBandwidth {
            in_bytes_per_second: mib(res.io.net_in_mib_per_second),
            out_bytes_per_second: mib(res.io.net_out_mib_per_second),
        },
    }
}

/// `limit` as the manifest (or the profile) asks for it, e.g. `cpuQuotaPercent 50`.
fn asked(limit: Limit, r: &Resources) -> String {
    let res = r.resolved();
    let io = res.io;
    let some = |parts: &[(&str, u32, &str)]| {
        parts
            .iter()
            .filter(|(_, v, _)| *v > 0)
            .map(|(f, v, unit)| format!("{f} {v}{unit}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match limit {
        Limit::CpuShares => format!("cpuShares {}", res.cpu_shares),
        Limit::CpuQuota => format!("cpuQuotaPercent {}", res.cpu_quota_percent.unwrap_or(0)),
        Limit::MemoryHardLimit => format!(
            "memoryHardLimitMib {}",
            res.memory_hard_limit_mib.unwrap_or(0)
        ),
        Limit::DiskIo => some(&[
            ("diskReadMibPerSecond", io.disk_read_mib_per_second, ""),
            ("diskWriteMibPerSecond", io.disk_write_mib_per_second, ""),
            ("diskIops", io.disk_iops, ""),
        ]),
        Limit::NetBandwidth => some(&[
            ("netInMibPerSecond", io.net_in_mib_per_second, ""),
            ("netOutMibPerSecond", io.net_out_mib_per_second, ""),
        ]),
    }
}

/// Sets the condition of every limit `enforcement` has a verdict for (found when VM `vm` was
/// created) and removes those of limits no longer asked for.
pub fn set_conditions(
    conditions: &mut Vec<Condition>,
    r: &Resources,
    vm: &str,
    enforcement: &Enforcement,
) {
    for limit in Limit::ALL {
        let type_ = condition_type(limit);
        match enforcement.iter().find(|(l, _)| *l == limit) {
            None => conditions.retain(|c| c.type_ != type_),
            Some((_, Ok(()))) => {
                agentvm_api::set_condition(
                    conditions,
                    condition(
                        type_,
                        true,
                        Reason::Applied,
                        format!("{} is in force for {vm}", asked(limit, r)),
                    ),
                );
            }
            Some((_, Err(why))) => {
                agentvm_api::set_condition(
                    conditions,
                    condition(
                        type_,
                        false,
                        Reason::HostCannotEnforce,
                        format!(
                            "{} is not applied by this host ({why}); the VMs run without it{}",
                            asked(limit, r),
                            match limit {
                                Limit::CpuShares | Limit::CpuQuota | Limit::MemoryHardLimit =>
                                    " (their vCPUs and guest RAM still bound them)",
                                Limit::DiskIo | Limit::NetBandwidth => "",
                            }
                        ),
                    ),
                );
            }
        }
    }
}

/// The per-resource summary of a pool whose newest VM got `enforcement`; `attached` when the
/// VMs have a network interface.
pub fn resource_summary(
    r: &Resources,
    attached: bool,
    enforcement: &Enforcement,
) -> Vec<ResourceStatus> {
    let res = r.resolved();
    let verdict = |limit: Limit, by: &str| -> (bool, String) {
        match enforcement.iter().find(|(l, _)| *l == limit) {
            Some((_, Ok(()))) => (true, by.to_string()),
            Some((_, Err(why))) => (false, format!("not enforced by this host: {why}")),
            None => (false, "not asked of the host".to_string()),
        }
    };
    let row = |name: &str, requested: String, (enforced, detail): (bool, String)| ResourceStatus {
        name: name.into(),
        requested,
        enforced,
        detail,
    };
    let mut rows = vec![
        row(
            "vcpu",
            res.vcpu.to_string(),
            (true, "the VM's virtual CPUs".into()),
        ),
        row(
            "memoryMib",
            format!("{} MiB", res.memory_mib),
            (true, "guest RAM".into()),
        ),
        row(
            "diskGib",
            format!("{} GiB", res.disk_gib),
            (
                true,
                "the disk's size (qcow2 overlay); the root file system grows to it at boot".into(),
            ),
        ),
    ];
    if r.cpu_shares.is_some() {
        rows.push(row(
            "cpuShares",
            res.cpu_shares.to_string(),
            verdict(Limit::CpuShares, "cgroup CPU weight (cputune/shares)"),
        ));
    }
    if let Some(q) = res.cpu_quota_percent {
        rows.push(row(
            "cpuQuotaPercent",
            format!("{q} % per vCPU"),
            verdict(Limit::CpuQuota, "cgroup CPU bandwidth (cputune/quota)"),
        ));
    }
    if let Some(m) = res.memory_hard_limit_mib {
        rows.push(row(
            "memoryHardLimitMib",
            format!("{m} MiB"),
            verdict(
                Limit::MemoryHardLimit,
                "cgroup memory limit (memtune/hard_limit)",
            ),
        ));
    }
    let io = res.io;
    for (name, value, unit) in [
        (
            "diskReadMibPerSecond",
            io.disk_read_mib_per_second,
            " MiB/s",
        ),
        (
            "diskWriteMibPerSecond",
            io.disk_write_mib_per_second,
            " MiB/s",
        ),
        ("diskIops", io.disk_iops, " IOPS"),
    ] {
        if value > 0 {
            rows.push(row(
                name,
                format!("{value}{unit}"),
                verdict(Limit::DiskIo, "QEMU block throttling (iotune)"),
            ));
        }
    }
    for (name, value, how) in [
        (
            "netInMibPerSecond",
            io.net_in_mib_per_second,
            "tc shaping on the host (bandwidth/inbound)",
        ),
        (
            "netOutMibPerSecond",
            io.net_out_mib_per_second,
            "tc policing on the host (bandwidth/outbound)",
        ),
    ] {
        if value > 0 {
            let v = if attached {
                verdict(Limit::NetBandwidth, how)
            } else {
                (true, "isolated: the VMs have no network interface".into())
            };
            rows.push(row(name, format!("{value} MiB/s"), v));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::Profile;

    #[test]
    fn limits_come_from_the_profile_and_the_fields() {
        let l = vm_limits(&Resources::profile(Profile::Standard));
        assert_eq!(l.cpu_shares, None, "the default weight is the host's");
        assert_eq!(l.disk_io.write_bytes_per_second, 100 * MIB);
        assert_eq!(l.disk_io.iops, 2000);
        assert_eq!(l.net_bandwidth.out_bytes_per_second, 25 * MIB);
        let mut r = Resources::custom(1, 512, 2);
        assert_eq!(vm_limits(&r), VmLimits::default());
        r.cpu_shares = Some(512);
        r.cpu_quota_percent = Some(50);
        r.memory_hard_limit_mib = Some(1024);
        r.disk_write_mib_per_second = Some(5);
        let l = vm_limits(&r);
        assert_eq!(
            (l.cpu_shares, l.cpu_quota_percent, l.memory_hard_limit_mib),
            (Some(512), Some(50), Some(1024))
        );
        assert_eq!(l.disk_io.write_bytes_per_second, 5 * MIB);
        assert_eq!(l.disk_io.read_bytes_per_second, 0);
    }

    #[test]
    fn the_summary_says_per_resource_what_is_asked_and_whether_it_is_enforced() {
        let mut r = Resources::profile(Profile::Light);
        r.cpu_quota_percent = Some(50);
        let enforcement: Enforcement = vec![
            (Limit::CpuQuota, Err("cgroup cpu is required".into())),
            (Limit::DiskIo, Ok(())),
        ];
        let rows = resource_summary(&r, false, &enforcement);
        let find = |n: &str| rows.iter().find(|x| x.name == n).unwrap().clone();
        assert_eq!(find("diskGib").requested, "10 GiB");
        assert!(find("diskGib").enforced);
        let q = find("cpuQuotaPercent");
        assert_eq!(q.requested, "50 % per vCPU");
        assert!(!q.enforced);
        assert!(q.detail.contains("cgroup cpu is required"), "{q:?}");
        let w = find("diskWriteMibPerSecond");
        assert_eq!((w.requested.as_str(), w.enforced), ("50 MiB/s", true));
        assert!(find("netInMibPerSecond").detail.contains("isolated"));
        assert!(!rows.iter().any(|x| x.name == "cpuShares"));
        assert!(!rows.iter().any(|x| x.name == "memoryHardLimitMib"));
    }

    #[test]
    fn conditions_follow_the_verdicts_and_go_when_no_longer_asked() {
        let mut r = Resources::custom(1, 512, 2);
        r.cpu_quota_percent = Some(50);
        r.memory_hard_limit_mib = Some(1024);
        let mut conditions = Vec::new();
        let enforcement: Enforcement = vec![
            (Limit::CpuQuota, Ok(())),
            (
                Limit::MemoryHardLimit,
                Err("cannot limit locked memory".into()),
            ),
        ];
        set_conditions(&mut conditions, &r, "vm-1", &enforcement);
        let c = |conditions: &Vec<Condition>, t: &str| {
            conditions.iter().find(|c| c.type_ == t).map(|c| {
                (
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    c.message.clone(),
                )
            })
        };
        assert_eq!(
            c(&conditions, CPU_QUOTA_APPLIED),
            Some((
                "True".into(),
                "Applied".into(),
                "cpuQuotaPercent 50 is in force for vm-1".into()
            ))
        );
        let (status, reason, message) = c(&conditions, MEMORY_LIMIT_APPLIED).unwrap();
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "HostCannotEnforce")
        );
        assert!(
            message.starts_with(
                "memoryHardLimitMib 1024 is not applied by this host (cannot limit locked memory)"
            ),
            "{message}"
        );
        assert_eq!(c(&conditions, DISK_IO_LIMIT_APPLIED), None);
        // The quota is dropped from the manifest: its condition goes with it.
        set_conditions(
            &mut conditions,
            &r,
            "vm-2",
            &vec![(Limit::MemoryHardLimit, Ok(()))],
        );
        assert_eq!(c(&conditions, CPU_QUOTA_APPLIED), None);
        assert_eq!(c(&conditions, MEMORY_LIMIT_APPLIED).unwrap().1, "Applied");
    }
}
