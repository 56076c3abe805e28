//! Per-domain statistics (CPU time, memory, block and network I/O) for metrics and anomaly
//! detection, read from libvirt.

use std::time::Instant;

use quick_xml::events::Event;
use quick_xml::Reader;
use virt::sys;

use crate::error::{BackendError, Result};
use crate::libvirt::Libvirt;

/// One sample of a running domain's counters. Counters are cumulative since QEMU started
/// (a reset that restarts QEMU starts them again from zero).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainStats {
    /// CPU time used by the guest's vCPUs, in nanoseconds (`virDomainGetInfo`).
    pub cpu_time_ns: u64,
    /// Resident set size of the QEMU process in bytes, when reported.
    pub memory_rss_bytes: Option<u64>,
    /// Current balloon size (memory the guest has) in bytes, when reported.
    pub memory_actual_bytes: Option<u64>,
    /// Memory the guest sees as available, in bytes; needs the guest's balloon driver.
    pub memory_available_bytes: Option<u64>,
    /// Memory left unused by the guest, in bytes; needs the guest's balloon driver.
    pub memory_unused_bytes: Option<u64>,
    /// Memory the guest could still use without swapping (unused plus reclaimable cache),
    /// in bytes; needs the guest's balloon driver.
    pub memory_usable_bytes: Option<u64>,
    /// Bytes read from all disks.
    pub block_rd_bytes: u64,
    /// Bytes written to all disks.
    pub block_wr_bytes: u64,
    /// Bytes received on all network interfaces.
    pub net_rx_bytes: u64,
    /// Bytes sent on all network interfaces.
    pub net_tx_bytes: u64,
    /// When the sample was taken.
    pub at: Instant,
}

impl DomainStats {
    /// A sample taken at `at` with `cpu_time_ns` and nothing else counted yet.
    fn new(cpu_time_ns: u64, at: Instant) -> Self {
        DomainStats {
            cpu_time_ns,
            memory_rss_bytes: None,
            memory_actual_bytes: None,
            memory_available_bytes: None,
            memory_unused_bytes: None,
            memory_usable_bytes: None,
            block_rd_bytes: 0,
            block_wr_bytes: 0,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            at,
        }
    }

    /// CPU usage between `earlier` and `self` as a fraction of one host CPU (1.0 = one core
    /// busy). `None` when the samples are not in order or the counter went backwards (QEMU
    /// restarted in between).
    pub fn cpu_usage_since(&self, earlier: &DomainStats) -> Option<f64> {
        let wall = self.at.checked_duration_since(earlier.at)?.as_nanos() as f64;
        let cpu = self.cpu_time_ns.checked_sub(earlier.cpu_time_ns)? as f64;
        (wall > 0.0).then(|| cpu / wall)
    }
}

/// Target device names of a domain's disks and interfaces, from its live XML.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DeviceTargets {
    pub disks: Vec<String>,
    pub interfaces: Vec<String>,
}

/// `<devices><disk><target dev=..>` and `<devices><interface><target dev=..>`.
pub(crate) fn device_targets(xml: &str) -> DeviceTargets {
    let mut reader = Reader::from_str(xml);
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut out = DeviceTargets::default();
    loop {
        let (e, empty) = match reader.read_event() {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(_)) => {
                stack.pop();
                continue;
            }
            Ok(Event::Eof) | Err(_) => return out,
            _ => continue,
        };
        let name = e.name().as_ref().to_vec();
        if name == b"target" && stack.len() >= 2 && stack[stack.len() - 2] == b"devices" {
            let parent = stack.last().map(Vec::as_slice);
            let dev = e
                .attributes()
                .flatten()
                .find(|a| a.key.as_ref() == b"dev")
                .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()));
            if let Some(dev) = dev {
                match parent {
                    Some(b"disk") => out.disks.push(dev),
                    Some(b"interface") => out.interfaces.push(dev),
                    _ => {}
                }
            }
        }
        if !empty {
            stack.push(name);
        }
    }
}

impl Libvirt {
    /// A sample of the running domain `name`'s counters. Works on any domain (statistics are
    /// read-only). Fails with `NotFound` when it does not exist, and with a libvirt error when
    /// it is not running.
    pub fn domain_stats(&self, name: &str) -> Result<DomainStats> {
        let err = |e| BackendError::from_virt(e, "domain", name);
        let dom = self.raw().lookup_domain_by_name(name).map_err(err)?;
        let info = dom.info().map_err(err)?;
        let at = Instant::now();
        let xml = dom.xml_desc(0).map_err(err)?;
        let targets = device_targets(&xml);
        let mut stats = DomainStats::new(info.cpu_time, at);
        // Balloon statistics are in KiB.
        for m in dom.memory_stats(0).map_err(err)? {
            let bytes = Some(m.val.saturating_mul(1024));
            match m.tag as i32 {
                t if t == sys::VIR_DOMAIN_MEMORY_STAT_RSS as i32 => stats.memory_rss_bytes = bytes,
                t if t == sys::VIR_DOMAIN_MEMORY_STAT_ACTUAL_BALLOON as i32 => {
                    stats.memory_actual_bytes = bytes
                }
                t if t == sys::VIR_DOMAIN_MEMORY_STAT_AVAILABLE as i32 => {
                    stats.memory_available_bytes = bytes
                }
                t if t == sys::VIR_DOMAIN_MEMORY_STAT_UNUSED as i32 => {
                    stats.memory_unused_bytes = bytes
                }
                t if t == sys::VIR_DOMAIN_MEMORY_STAT_USABLE as i32 => {
                    stats.memory_usable_bytes = bytes
                }
                _ => {}
            }
        }
        for disk in &targets.disks {
            let b = dom.block_stats(disk).map_err(err)?;
            stats.block_rd_bytes += b.rd_bytes.max(0) as u64;
            stats.block_wr_bytes += b.wr_bytes.max(0) as u64;
        }
        for nic in &targets.interfaces {
            let n = dom.interface_stats(nic).map_err(err)?;
            stats.net_rx_bytes += n.rx_bytes.max(0) as u64;
            stats.net_tx_bytes += n.tx_bytes.max(0) as u64;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn finds_disk_and_interface_targets_but_not_other_targets() {
        let xml = r#"<domain type='qemu'><name>x</name>
          <os><type>hvm</type></os>
          <devices>
            <disk type='file' device='disk'><source file='/a'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='disk'><source file='/b'/><target dev='vdb' bus='virtio'/></disk>
            <interface type='network'><source network='n'/><target dev='vnet&lt;3'/></interface>
            <serial type='file'><target port='0'/></serial>
            <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
          </devices></domain>"#;
        assert_eq!(
            device_targets(xml),
            DeviceTargets {
                disks: vec!["vda".into(), "vdb".into()],
                interfaces: vec!["vnet<3".into()],
            }
        );
    }

    fn sample(cpu: u64, at: Instant) -> DomainStats {
        DomainStats::new(cpu, at)
    }

    #[test]
    fn cpu_usage_is_cpu_time_over_wall_time() {
        let t0 = Instant::now();
        let a = sample(1_000_000_000, t0);
        let b = sample(1_500_000_000, t0 + Duration::from_secs(1));
        assert!((b.cpu_usage_since(&a).unwrap() - 0.5).abs() < 1e-9);
        assert_eq!(a.cpu_usage_since(&b), None, "samples out of order");
        let restarted = sample(10, t0 + Duration::from_secs(2));
        assert_eq!(
            restarted.cpu_usage_since(&b),
            None,
            "counter went backwards"
        );
    }
}
