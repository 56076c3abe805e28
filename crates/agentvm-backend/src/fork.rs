//! Forks: a new VM that goes on from a named snapshot of a kept VM (a sandbox) — same files,
//! same memory, same running processes — with its own name, UUID, files, entropy and host
//! name (its owner's name).
//!
//! How (libvirt 9, QEMU 7.2): the snapshot is an internal qcow2 snapshot inside the source's
//! overlay, so the fork's disk is a copy of that overlay, taken while the source's vCPUs are
//! stopped (QEMU flushes its qcow2 caches when it stops the VM, so the file is consistent).
//! Every other internal snapshot is deleted from the copy; the fork is defined from the
//! source's definition with its own name, UUID, owner and file paths, started with its vCPUs
//! stopped, `loadvm`s the snapshot from its copy, drops it, and runs. The guest's RNG is
//! reseeded and its clock set before anything else runs in it, as after every reset: a fork
//! never draws the random bytes its source or a sibling fork draws.
//!
//! The copy makes the fork independent of its source: deleting the source, the snapshot or
//! another fork never touches it. Its cost is a full copy of the source's overlay (memory
//! state of all its snapshots included) while the source is paused; see BENCHMARKS.md.
//!
//! A source with a network interface: the fork's definition drops the interface's MAC address
//! (libvirt picks a new one) and the filter's pinned `IP` parameter. The restored guest still
//! uses its source's MAC and address, which the fork's filter (anti-spoofing on the new MAC)
//! drops, so the first thing run in it moves it: the interface gets the fork's MAC, the old
//! lease is forgotten, and DHCP gives it an address of its own, which the filter learns from
//! the DHCP answer (its `CTRL_IP_LEARNING=dhcp`). The guest's DHCP client keeps the lease.

use std::path::Path;
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::error::{io_err, BackendError, Result};
use crate::guest::Guest;
use crate::libvirt::{Libvirt, PowerState};
use crate::snapshots::snapshot_tag;
use crate::vm::{make_dir, VmFiles};
use crate::xml::Owner;

/// `spec_hash` of a fork's owner metadata until the fork is complete (and of a sandbox's VM
/// booted from its template until it is up): a domain found with it (the controller stopped
/// half-way) is not usable, and its owner destroys it and makes it again.
pub const UNFINISHED: &str = "agentvm-fork-unfinished";

/// What making a fork cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForkReport {
    /// How long the source's vCPUs were stopped for the copy of its disk.
    pub source_pause: Duration,
    /// Bytes copied (the source's overlay).
    pub copied_bytes: u64,
    /// From the start to the fork's guest answering, reseeded and with its clock set.
    pub total: Duration,
}

/// The fork's definition: `source_xml` (the source's persistent definition) with the name,
/// UUID and paths of the fork. Refuses definitions it does not know how to fork: anything
/// with a network interface, and any file of the source's outside its VM directory but the
/// image it is an overlay of (kernel, initrd).
pub(crate) fn fork_definition(
    source_xml: &str,
    source: &str,
    source_dir: &Path,
    name: &str,
    dir: &Path,
) -> Result<String> {
    let refuse = |why: String| BackendError::Unsupported {
        what: format!("forking {source}"),
        why,
    };
    if source_xml.matches("<interface").count() > 1 {
        return Err(refuse(
            "it has more than one network interface; agentvm makes VMs with one".into(),
        ));
    }
    let old_name = format!("<name>{source}</name>");
    if source_xml.matches(&old_name).count() != 1 {
        return Err(refuse(
            "its definition does not name it exactly once".into(),
        ));
    }
    let mut xml = source_xml.replacen(&old_name, &format!("<name>{name}</name>"), 1);
    // A fresh UUID from libvirt.
    while let Some(start) = xml.find("<uuid>") {
        let Some(len) = xml[start..].find("</uuid>") else {
            return Err(refuse("its definition has an unterminated <uuid>".into()));
        };
        xml.replace_range(start..start + len + "</uuid>".len(), "");
    }
    let (from, to) = (
        format!("{}/", source_dir.display()),
        format!("{}/", dir.display()),
    );
    if xml.contains(&format!("'{}", dir.display())) || xml.contains(&format!("\"{}", dir.display()))
    {
        return Err(refuse(
            "its definition already refers to the fork's files".into(),
        ));
    }
    let mut xml = xml.replace(&from, &to);
    // The network identity is the fork's own: a MAC from libvirt, an address by DHCP.
    for element in [
        "<mac address=",
        "<parameter name='IP' ",
        "<parameter name=\"IP\" ",
    ] {
        while let Some(start) = xml.find(element) {
            let Some(len) = xml[start..].find("/>") else {
                return Err(refuse(format!(
                    "its definition has an unterminated {element}"
                )));
            };
            xml.replace_range(start..start + len + 2, "");
        }
    }
    if !xml.contains(&format!("{to}disk.qcow2")) {
        return Err(refuse(format!(
            "its disk is not {from}disk.qcow2, the overlay agentvm made for it"
        )));
    }
    Ok(xml)
}

/// `xml` (a domain definition agentvm made) with `owner` as its only metadata: a copy of
/// another domain's definition must never be defined, even for a moment, with that domain's
/// owner, or a controller stopped in that moment leaves a domain its source's owner takes
/// for its own.
pub(crate) fn with_owner(xml: &str, owner: &Owner) -> Result<String> {
    let metadata = format!("<metadata>{}</metadata>", crate::xml::owner_element(owner));
    let mut out = xml.to_string();
    if let (Some(start), Some(end)) = (out.find("<metadata>"), out.find("</metadata>")) {
        if end < start {
            return Err(BackendError::Protocol {
                what: "a domain definition".into(),
                message: "its <metadata> is malformed".into(),
            });
        }
        out.replace_range(start..end + "</metadata>".len(), &metadata);
    } else if let Some(at) = out.find("<metadata/>") {
        out.replace_range(at..at + "<metadata/>".len(), &metadata);
    } else if let Some(at) = out.find("</name>") {
        out.insert_str(at + "</name>".len(), &metadata);
    } else {
        return Err(BackendError::Protocol {
            what: "a domain definition".into(),
            message: "it has no <name>".into(),
        });
    }
    Ok(out)
}

/// The internal snapshots in qcow2 file `disk`.
pub(crate) fn internal_snapshots(disk: &Path) -> Result<Vec<String>> {
    let info = crate::vm::qemu_img_info(disk)?;
    Ok(info["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

pub(crate) fn delete_internal_snapshot(disk: &Path, tag: &str) -> Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-d", tag])
        .arg(disk)
        .output()
        .map_err(io_err("run qemu-img snapshot -d on", disk))?;
    if !out.status.success() {
        return Err(BackendError::Command {
            command: format!("qemu-img snapshot -d {tag} {}", disk.display()),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// Moves the restored guest to the fork's own MAC address (from libvirt's live definition)
/// and a DHCP lease of its own; waits until it has its address, and returns its addresses.
fn readdress_guest(
    dom: &Domain,
    name: &str,
    agent: &crate::libvirt::DomainAgent,
    timeout: Duration,
) -> Result<Vec<String>> {
    let live = dom
        .xml_desc(0)
        .map_err(|e| BackendError::from_virt(e, "domain", name))?;
    let mac = live
        .split_once("<mac address='")
        .and_then(|(_, rest)| rest.split_once('\''))
        .map(|(mac, _)| mac.to_string())
        .filter(|m| is_mac(m))
        .ok_or_else(|| BackendError::Protocol {
            what: format!("the definition of {name}"),
            message: "its interface has no MAC address".into(),
        })?;
    let guest = Guest::new(agent);
    guest.exec_ok(
        &script(READDRESS_SCRIPT, &mac, timeout),
        "moving the guest to its own MAC address and lease",
    )?;
    guest.wait_ipv4(timeout)
}

/// `sh -c script sh arg`, killed after `timeout`.
fn script(script: &str, arg: &str, timeout: Duration) -> crate::guest::ExecRequest {
    let mut req = crate::guest::ExecRequest::new("sh", ["-c", script, "sh", arg]);
    req.timeout = timeout;
    req
}

/// `aa:bb:cc:dd:ee:ff`, lowercase or uppercase hex.
fn is_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()))
}

/// Run in a fork's guest with its new MAC address as `$1`: ends the DHCP client (without a
/// release: the lease is the source's), forgets its lease, moves the interface to the new
/// MAC (live where the device allows it, else down and up) and starts the client again,
/// retrying every 1–2 s instead of dhclient's default backoff: the first DISCOVER after the
/// move often goes unanswered, and dhclient would wait 7–10 s before the next (measured:
/// 9.4–11.5 s to an address with the defaults, 4.4 s with these).
const READDRESS_SCRIPT: &str = r#"set -e
mac=$1 dev=
for p in /sys/class/net/e*; do dev=${p##*/}; done
[ -n "$dev" ] || { echo "no network interface" >&2; exit 1; }
for p in /proc/[0-9]*; do
  c=; read -r c < "$p/comm" 2>/dev/null || true
  [ "$c" = dhclient ] && kill -9 "${p#/proc/}" 2>/dev/null || true
done
rm -f /var/lib/dhcp/dhclient*.leases
ip addr flush dev "$dev"
ip link set dev "$dev" address "$mac" 2>/dev/null || {
  ip link set dev "$dev" down
  ip link set dev "$dev" address "$mac"
  ip link set dev "$dev" up
}
{ cat /etc/dhcp/dhclient.conf 2>/dev/null; echo 'initial-interval 1;'; echo 'backoff-cutoff 2;'; } > /run/dhclient-fork.conf
dhclient -cf /run/dhclient-fork.conf -nw "$dev"
"#;

/// Run in a fork's guest with its host name as `$1` (a DNS label, checked here again).
const HOSTNAME_SCRIPT: &str = r#"set -e
case "$1" in ''|-*|*[!a-z0-9-]*) echo "bad host name" >&2; exit 1;; esac
printf '%s\n' "$1" > /etc/hostname
hostname "$1"
"#;

impl Libvirt {
    /// Makes `name` (owned by `owner`, files under `state_dir`) a fork of owned domain
    /// `source` at its named snapshot `snapshot`, running, its guest agent answering. The
    /// source stays in the power state it was in. On failure nothing of the fork is left; if
    /// this process ends half-way, the domain left behind is owned by `owner` with
    /// `spec_hash` [`UNFINISHED`].
    pub fn fork_domain(
        &self,
        state_dir: &Path,
        source: &str,
        snapshot: &str,
        name: &str,
        owner: &Owner,
        agent_timeout: Duration,
    ) -> Result<ForkReport> {
        let start = Instant::now();
        let src = self.owned_for_snapshot(source, snapshot)?;
        let tag = snapshot_tag(snapshot);
        Domain::lookup_snapshot_by_name(&src, &tag, 0)
            .map_err(|e| BackendError::from_virt(e, "snapshot", &tag))?;
        if self.raw().lookup_domain_by_name(name).is_ok() {
            return Err(BackendError::AlreadyExists {
                kind: "domain",
                name: name.to_string(),
            });
        }
        let source_xml = src
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| BackendError::from_virt(e, "domain", source))?;
        let (source_files, files) = (
            VmFiles::new(state_dir, source),
            VmFiles::new(state_dir, name),
        );
        let xml = fork_definition(&source_xml, source, &source_files.dir, name, &files.dir)?;
        make_dir(&files.dir)?;
        let made = (|| {
            let (source_pause, copied_bytes) =
                self.copy_disk_quiesced(source, &source_files, &files)?;
            self.start_from_copy(
                &xml,
                name,
                &files,
                &tag,
                &Owner {
                    spec_hash: UNFINISHED.to_string(),
                    ..owner.clone()
                },
                agent_timeout,
            )?;
            // Its own host name: its owner's name (a sandbox's, a DNS label).
            Guest::new(&self.agent(name)?).exec_ok(
                &script(HOSTNAME_SCRIPT, &owner.name, agent_timeout),
                "setting the host name",
            )?;
            self.set_domain_owner(name, owner)?;
            Ok(ForkReport {
                source_pause,
                copied_bytes,
                total: start.elapsed(),
            })
        })();
        made.inspect_err(|_| {
            if let Err(e) = self.remove_golden(name, &files) {
                tracing::warn!(vm = %name, error = %e, "cleanup after a failed fork failed");
            }
        })
    }

    /// Defines domain `name` from `xml` over the copied disk in `files` (which holds internal
    /// snapshot `tag`; every other internal snapshot is dropped from it), owned by `owner`,
    /// and makes it go on from `tag`: started paused, `loadvm`, the snapshot dropped, run,
    /// the agent answering, the guest reseeded and its clock set; on a network, moved to its
    /// own MAC address and lease. Returns the guest's addresses (empty when isolated).
    pub(crate) fn start_from_copy(
        &self,
        xml: &str,
        name: &str,
        files: &VmFiles,
        tag: &str,
        owner: &Owner,
        agent_timeout: Duration,
    ) -> Result<Vec<String>> {
        for other in internal_snapshots(&files.disk())? {
            if other != tag {
                delete_internal_snapshot(&files.disk(), &other)?;
            }
        }
        // Defined with its own owner from the first moment.
        let dom = self
            .raw()
            .define_domain_xml(&with_owner(xml, owner)?)
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        dom.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        // The vCPUs stay stopped through the load (they were stopped before it).
        crate::golden::loadvm(&dom, name, tag)?;
        // Its memory state is in the guest now; its clusters in the copy are not needed.
        let out = dom
            .qemu_monitor_command(
                &format!("delvm {tag}"),
                sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
            )
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        if !out.trim().is_empty() {
            tracing::warn!(vm = %name, output = %out.trim(), "dropping the copy's snapshot failed");
        }
        crate::agent_conn::forget(name);
        dom.resume()
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        let agent = self.agent(name)?;
        Guest::new(&agent).wait_ready(agent_timeout)?;
        crate::golden::refresh_guest(&agent, agent_timeout)?;
        if xml.contains("<interface") {
            return readdress_guest(&dom, name, &agent, agent_timeout);
        }
        Ok(Vec::new())
    }

    /// Copies `source`'s overlay to `files`' disk with the source's vCPUs stopped (a running
    /// source runs again afterwards, whatever happened); the pause and the bytes copied.
    pub(crate) fn copy_disk_quiesced(
        &self,
        source: &str,
        source_files: &VmFiles,
        files: &VmFiles,
    ) -> Result<(Duration, u64)> {
        let running = self.power_state(source)? == PowerState::Running;
        if running {
            self.suspend_domain(source)?;
        }
        let t = Instant::now();
        let copied = std::fs::copy(source_files.disk(), files.disk())
            .map_err(io_err("copy the source's overlay to", &files.disk()));
        let pause = t.elapsed();
        if running {
            self.resume_domain(source)?;
        }
        Ok((pause, copied?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "<domain type='qemu'>\n  <name>sbx-a</name>\n  <uuid>0b1f-x</uuid>\n  \
        <devices>\n    <disk type='file' device='disk'>\n      \
        <source file='/var/lib/agentvm/vms/sbx-a/disk.qcow2'/>\n    </disk>\n    \
        <serial type='file'><source path='/var/lib/agentvm/vms/sbx-a/serial.log'/></serial>\n  \
        </devices>\n</domain>\n";

    fn fork(xml: &str) -> Result<String> {
        fork_definition(
            xml,
            "sbx-a",
            Path::new("/var/lib/agentvm/vms/sbx-a"),
            "sbx-b",
            Path::new("/var/lib/agentvm/vms/sbx-b"),
        )
    }

    #[test]
    fn a_fork_is_defined_with_its_own_owner_never_its_source_s() {
        let source_owner = Owner {
            kind: agentvm_api::Kind::Sandbox.into(),
            name: "a".into(),
            spec_hash: String::new(),
            generation: 1,
        };
        let fork_owner = Owner {
            name: "fk".into(),
            spec_hash: UNFINISHED.into(),
            ..source_owner.clone()
        };
        let with_source = with_owner(SOURCE, &source_owner).unwrap();
        let xml = with_owner(&fork(&with_source).unwrap(), &fork_owner).unwrap();
        let parsed = crate::xml::parse_owner(&xml).expect("an owner");
        assert_eq!(parsed, fork_owner, "{xml}");
        assert_eq!(
            xml.matches("<agentvm:owner").count(),
            1,
            "one owner element: {xml}"
        );
        // A definition without metadata gets it after its name.
        let bare = with_owner(SOURCE, &fork_owner).unwrap();
        assert_eq!(crate::xml::parse_owner(&bare), Some(fork_owner));
    }

    #[test]
    fn a_fork_gets_its_own_name_uuid_and_files() {
        let xml = fork(SOURCE).unwrap();
        assert!(xml.contains("<name>sbx-b</name>"), "{xml}");
        assert!(!xml.contains("uuid"), "{xml}");
        assert!(!xml.contains("/vms/sbx-a/"), "{xml}");
        assert!(
            xml.contains("'/var/lib/agentvm/vms/sbx-b/disk.qcow2'"),
            "{xml}"
        );
        assert!(
            xml.contains("'/var/lib/agentvm/vms/sbx-b/serial.log'"),
            "{xml}"
        );
    }

    #[test]
    fn a_fork_s_interface_loses_its_source_s_mac_and_pinned_address() {
        let xml = fork(&SOURCE.replace(
            "</devices>",
            "<interface type='network'>\n<mac address='52:54:00:aa:bb:cc'/>\n<source network='n'/>\n\
             <filterref filter='f'>\n<parameter name='HOST' value='10.0.0.1'/>\n\
             <parameter name='IP' value='10.0.0.5'/>\n</filterref>\n</interface></devices>",
        ))
        .unwrap();
        assert!(!xml.contains("52:54:00:aa:bb:cc"), "{xml}");
        assert!(!xml.contains("10.0.0.5"), "{xml}");
        assert!(
            xml.contains("<parameter name='HOST' value='10.0.0.1'/>"),
            "{xml}"
        );
        assert!(xml.contains("<source network='n'/>"), "{xml}");
        assert!(is_mac("52:54:00:AA:bb:01"));
        for bad in [
            "",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:cc'/><x",
            "5254.00aa.bbcc.dd",
        ] {
            assert!(!is_mac(bad), "{bad}");
        }
    }

    #[test]
    fn definitions_it_cannot_fork_safely_are_refused() {
        let nic = SOURCE.replace(
            "</devices>",
            "<interface type='network'><source network='n'/></interface><interface type='network'><source network='m'/></interface></devices>",
        );
        let elsewhere = SOURCE.replace("/vms/sbx-a/disk.qcow2", "/images/base.qcow2");
        let twice = SOURCE.replace(
            "<devices>",
            "<description><name>sbx-a</name></description><devices>",
        );
        let already = SOURCE.replace("/vms/sbx-a/serial.log", "/vms/sbx-b/serial.log");
        for bad in [nic, elsewhere, twice, already] {
            assert!(
                matches!(fork(&bad), Err(BackendError::Unsupported { .. })),
                "{bad}"
            );
        }
    }
}
