//! Named snapshots of a kept VM (a sandbox): internal qcow2 snapshots holding memory, device
//! state and disk, taken through libvirt (atomically: the guest is stopped meanwhile, so its
//! file systems are consistent) and loaded back in the running QEMU with `loadvm`, like the
//! golden state of pool VMs. They live inside the VM's overlay, so they go with the VM.
//!
//! Disk-only snapshots hold the disk alone: an internal snapshot of the overlay taken by QEMU
//! (`blockdev-snapshot-internal-sync`) while the guest's file systems are frozen through
//! qemu-guest-agent (`guest-fsfreeze-freeze`; when the agent cannot freeze them, the vCPUs
//! are stopped for the moment instead, which QEMU's flush makes crash-consistent). libvirt
//! does not know them (it takes internal snapshots with memory only), so they are found in
//! the overlay itself. Going back to one is done offline: the domain is stopped,
//! `qemu-img snapshot -a` puts the disk back, and the domain boots.

use std::path::Path;
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

    /// Takes disk-only snapshot `name` of running or paused owned domain `domain`: its disk
    /// alone, with the guest's file systems frozen (a running guest whose agent cannot freeze
    /// them has its vCPUs stopped instead). How long the guest's writes were held, and
    /// whether its file systems were frozen.
    pub fn create_disk_snapshot(
        &self,
        domain: &str,
        name: &str,
        agent_timeout: Duration,
    ) -> Result<(Duration, bool)> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        let node = disk_node(&dom, domain)?;
        let running = self.power_state(domain)? == crate::libvirt::PowerState::Running;
        let start = Instant::now();
        let frozen = running && fs_freeze(&dom, domain, agent_timeout);
        let suspended = running && !frozen;
        if suspended {
            self.suspend_domain(domain)?;
        }
        let taken = qmp(
            &dom,
            domain,
            &serde_json::json!({
                "execute": "blockdev-snapshot-internal-sync",
                "arguments": { "device": node, "name": tag },
            }),
        );
        if frozen {
            fs_thaw(&dom, domain, agent_timeout);
        }
        let held = start.elapsed();
        if suspended {
            self.resume_domain(domain)?;
        }
        taken.map(|_| (held, frozen))
    }

    /// Deletes disk-only snapshot `name` of running or paused owned domain `domain`;
    /// succeeds when it does not exist.
    pub fn delete_disk_snapshot(&self, domain: &str, name: &str) -> Result<()> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        let node = disk_node(&dom, domain)?;
        match qmp(
            &dom,
            domain,
            &serde_json::json!({
                "execute": "blockdev-snapshot-delete-internal-sync",
                "arguments": { "device": node, "name": tag },
            }),
        ) {
            Err(BackendError::Protocol { message, .. })
                if message.contains("not found") || message.contains("Can't find") =>
            {
                Ok(())
            }
            other => other.map(|_| ()),
        }
    }

    /// True when libvirt knows snapshot `name` of owned domain `domain` (one with memory);
    /// false when it does not (a disk-only one, or none).
    pub fn has_memory_snapshot(&self, domain: &str, name: &str) -> Result<bool> {
        let dom = self.owned_for_snapshot(domain, name)?;
        let tag = snapshot_tag(name);
        match Domain::lookup_snapshot_by_name(&dom, &tag, 0) {
            Ok(_) => Ok(true),
            Err(e) => match BackendError::from_virt(e, "snapshot", &tag) {
                e if e.is_not_found() => Ok(false),
                e => Err(e),
            },
        }
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

/// Puts disk `disk` (not in use) back to its internal snapshot for `Snapshot` `name`.
pub(crate) fn apply_internal_snapshot(disk: &Path, name: &str) -> Result<()> {
    let tag = snapshot_tag(name);
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-a", &tag])
        .arg(disk)
        .output()
        .map_err(crate::error::io_err("run qemu-img snapshot -a on", disk))?;
    if !out.status.success() {
        return Err(BackendError::Command {
            command: format!("qemu-img snapshot -a {tag} {}", disk.display()),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// The `Snapshot` names of the internal snapshots in disk `disk`, with the bytes of memory
/// and device state each holds (0: disk only).
pub(crate) fn disk_snapshots(disk: &Path) -> Result<Vec<(String, u64)>> {
    let info = crate::vm::qemu_img_info(disk)?;
    Ok(info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| {
                    let name = s["name"].as_str()?.strip_prefix(SNAPSHOT_PREFIX)?;
                    Some((name.to_string(), s["vm-state-size"].as_u64().unwrap_or(0)))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Runs QMP command `command` in `domain`'s QEMU; its `return`, or its `error` as a
/// [`BackendError::Protocol`].
fn qmp(dom: &Domain, domain: &str, command: &serde_json::Value) -> Result<serde_json::Value> {
    let what = || {
        format!(
            "{} in {domain}",
            command["execute"].as_str().unwrap_or("QMP")
        )
    };
    let out = dom
        .qemu_monitor_command(&command.to_string(), 0)
        .map_err(|e| BackendError::from_virt(e, "domain", domain))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| BackendError::Protocol {
            what: what(),
            message: format!("its answer is not JSON: {e}"),
        })?;
    if let Some(err) = v.get("error") {
        return Err(BackendError::Protocol {
            what: what(),
            message: err["desc"].as_str().unwrap_or("failed").to_string(),
        });
    }
    Ok(v["return"].take())
}

/// The node name of `domain`'s disk (its overlay `disk.qcow2`), from `query-block`.
fn disk_node(dom: &Domain, domain: &str) -> Result<String> {
    let blocks = qmp(
        dom,
        domain,
        &serde_json::json!({ "execute": "query-block" }),
    )?;
    disk_node_of(&blocks).ok_or_else(|| BackendError::Protocol {
        what: format!("query-block in {domain}"),
        message: "no block device has the VM's disk.qcow2".into(),
    })
}

/// The node name of the block device whose image is a `disk.qcow2`, in a `query-block`
/// answer.
fn disk_node_of(blocks: &serde_json::Value) -> Option<String> {
    blocks.as_array()?.iter().find_map(|b| {
        let inserted = &b["inserted"];
        inserted["file"]
            .as_str()?
            .ends_with("/disk.qcow2")
            .then(|| inserted["node-name"].as_str().map(String::from))?
    })
}

/// Freezes the guest's file systems through qemu-guest-agent; false (logged) when it could
/// not.
fn fs_freeze(dom: &Domain, domain: &str, timeout: Duration) -> bool {
    let secs = timeout.as_secs().clamp(1, 60) as i32;
    match dom.qemu_agent_command(r#"{"execute":"guest-fsfreeze-freeze"}"#, secs, 0) {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(vm = %domain, error = %e, "could not freeze the guest's file systems; stopping its vCPUs for the snapshot instead");
            // A freeze that half-happened is undone.
            fs_thaw(dom, domain, timeout);
            false
        }
    }
}

/// Thaws the guest's file systems (logged when it fails: the guest would hang on writes).
fn fs_thaw(dom: &Domain, domain: &str, timeout: Duration) {
    let secs = timeout.as_secs().clamp(1, 60) as i32;
    if let Err(e) = dom.qemu_agent_command(r#"{"execute":"guest-fsfreeze-thaw"}"#, secs, 0) {
        tracing::warn!(vm = %domain, error = %e, "thawing the guest's file systems failed");
    }
}

/// Bytes free for unprivileged writers on the file system holding `dir`.
pub(crate) fn free_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
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

    #[test]
    fn the_disk_node_is_the_overlay_s() {
        let blocks = serde_json::json!([
            { "device": "", "qdev": "cdrom", "inserted": { "file": "/x/seed.iso", "node-name": "libvirt-3-format" } },
            { "device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
              "inserted": { "file": "/var/lib/agentvm/vms/a/disk.qcow2", "node-name": "libvirt-1-format" } },
        ]);
        assert_eq!(disk_node_of(&blocks).as_deref(), Some("libvirt-1-format"));
        assert_eq!(disk_node_of(&serde_json::json!([{ "device": "x" }])), None);
    }
}
