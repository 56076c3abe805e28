//! Named snapshots of a kept VM (a sandbox): internal qcow2 snapshots holding memory, device
//! state and disk, taken through libvirt (atomically: the guest is stopped meanwhile, so its
//! file systems are consistent) and loaded back in the running QEMU with `loadvm`, like the
//! golden state of pool VMs. They live inside the VM's overlay, so they go with the VM.

use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::error::{BackendError, Result};
use crate::libvirt::Libvirt;

/// Prefix of the internal snapshots agentvm takes for `Snapshot` objects.
pub const SNAPSHOT_PREFIX: &str = "agentvm-snap-";

/// The internal snapshot's tag for `Snapshot` object `name` (a DNS label: safe in XML and
/// in a monitor command).
pub fn snapshot_tag(name: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{name}")
}

fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Libvirt {
    pub(crate) fn owned_for_snapshot(&self, domain: &str, name: &str) -> Result<Domain> {
        if !is_plain(name) {
            return Err(BackendError::Protocol {
                what: format!("snapshot of {domain}"),
                message: format!("{name:?} is not a lowercase DNS label"),
            });
        }
        if self.domain_owner(domain)?.is_none() {
            return Err(BackendError::NotOwned {
                kind: "domain",
                name: domain.to_string(),
            });
        }
        self.raw()
            .lookup_domain_by_name(domain)
            .map_err(|e| BackendError::from_virt(e, "domain", domain))
    }

    /// Takes snapshot `name` (memory and disk) of running or paused owned domain `domain`;
    /// how long the guest was stopped for it.
    pub fn create_named_snapshot(&self, domain: &str, name: &str) -> Result<Duration> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        let xml = format!(
            "<domainsnapshot><name>{tag}</name><description>agentvm snapshot</description></domainsnapshot>"
        );
        let start = Instant::now();
        dom.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
            .map_err(|e| BackendError::from_virt(e, "snapshot", &tag))?;
        Ok(start.elapsed())
    }

    /// Brings running or paused owned domain `domain` back to snapshot `name`, in place.
    pub fn revert_named_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        Domain::lookup_snapshot_by_name(&dom, &tag, 0)
            .map_err(|e| BackendError::from_virt(e, "snapshot", &tag))?;
        // The guest's agent goes back in time with it: sync anew.
        crate::agent_conn::forget(domain);
        crate::golden::loadvm(&dom, domain, &tag)
    }

    /// Deletes snapshot `name` of owned domain `domain`; succeeds when it does not exist.
    pub fn delete_named_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        match Domain::lookup_snapshot_by_name(&dom, &tag, 0) {
            Ok(snap) => snap
                .delete(0)
                .map_err(|e| BackendError::from_virt(e, "snapshot", &tag)),
            Err(e) => match BackendError::from_virt(e, "snapshot", &tag) {
                e if e.is_not_found() => Ok(()),
                e => Err(e),
            },
        }
    }

    /// The `Snapshot` names of owned domain `domain`'s snapshots.
    pub fn named_snapshots(&self, domain: &str) -> Result<Vec<String>> {
        let dom = self.owned_for_snapshot(domain, "x")?;
        let snaps = dom
            .list_all_snapshots(0)
            .map_err(|e| BackendError::from_virt(e, "domain", domain))?;
        let mut names: Vec<String> = snaps
            .iter()
            .filter_map(|s| s.name().ok())
            .filter_map(|n| n.strip_prefix(SNAPSHOT_PREFIX).map(String::from))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dns_labels_become_snapshot_tags() {
        assert!(is_plain("before-risky-1"));
        for bad in ["", "A", "a b", "a;quit", "a\nloadvm x", &"a".repeat(64)] {
            assert!(!is_plain(bad), "{bad:?}");
        }
        assert_eq!(snapshot_tag("x"), "agentvm-snap-x");
    }
}
