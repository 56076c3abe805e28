//! Lean idle guests: what a parked VM gives back to the host before its golden state is taken.
//!
//! A booted guest has touched much more memory than it holds: the initrd it unpacked and
//! freed, the page cache of everything it read, slab. Host memory, once touched, stays with
//! the QEMU process. agentvm's VMs have free page reporting on their virtio balloon
//! ([`crate::xml::DomainSpec::free_page_reporting`]): the guest kernel (`CONFIG_PAGE_REPORTING`,
//! `virtio_balloon`) reports free blocks about 2 s after they were freed and QEMU discards
//! them. Right before the golden state is taken, [`settle_before_golden`] lowers the guest's
//! reporting order from 2 MiB blocks to [`REPORTING_ORDER`], drops the guest's caches and
//! compacts its memory. The guest reports what that freed about 2 s later; the park does not
//! wait for it: the golden state holds the pending report, so the guest reports the same
//! pages again after every reset that loads it.
//!
//! Guarantees: best effort; a failure is logged and never fails the park. A VM without free
//! page reporting is left as it is.
//!
//! Assumptions: the guest agent answers (the VM is about to be parked); the guest kernel
//! takes `page_reporting_order` at run time (`/sys/module/page_reporting/parameters`, Linux
//! 5.14 and later; Linux 6.1 overwrites a value given on the kernel command line when
//! `virtio_balloon` registers, so it is written here, after the driver is loaded).

use std::time::{Duration, Instant};

use virt::domain::Domain;

use crate::error::Result;
use crate::guest::{ExecRequest, Guest};
use crate::libvirt::Libvirt;

/// The guest reports free blocks of 2^this pages (32 KiB) and larger, instead of the
/// kernel's 2 MiB (`pageblock_order`): the ~50 MiB an idle guest uses is spread over most of
/// its 2 MiB blocks, so those are never free as a whole. Order 0 (single pages) gave back no
/// more and made every guest exec slower (BENCHMARKS.md, "Lean idle guests").
pub const REPORTING_ORDER: u32 = 3;

/// What the guest runs: report blocks of [`REPORTING_ORDER`] and up (when the kernel lets it
/// be changed), write back, drop page cache and slab, then compact free memory into
/// reportable blocks; prints `MemFree` (KiB) before and after.
fn settle_script() -> String {
    format!(
        "order=/sys/module/page_reporting/parameters/page_reporting_order; \
         [ -w $order ] && echo {REPORTING_ORDER} > $order; \
         memfree() {{ sed -n 's/^MemFree: *\\([0-9]*\\).*/\\1/p' /proc/meminfo; }}; \
         memfree; sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory; memfree"
    )
}

/// Whether a domain XML turns on free page reporting on its balloon.
pub fn has_free_page_reporting(domain_xml: &str) -> bool {
    domain_xml.contains("freePageReporting='on'") || domain_xml.contains("freePageReporting=\"on\"")
}

/// Lowers the guest's reporting order and drops its caches, when the domain has free page
/// reporting; see the module doc. Best effort.
pub(crate) fn settle_before_golden(lv: &Libvirt, name: &str, dom: &Domain) {
    let reporting = dom
        .xml_desc(0)
        .map(|x| has_free_page_reporting(&x))
        .unwrap_or(false);
    if !reporting {
        return;
    }
    let start = Instant::now();
    match drop_guest_caches(lv, name) {
        Ok(freed) => tracing::debug!(
            vm = %name,
            guest_freed_kib = ?freed,
            took = ?start.elapsed(),
            "guest caches dropped before parking"
        ),
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "dropping the guest's caches before parking failed")
        }
    }
}

/// Runs [`settle_script`]; how much more memory the guest has free afterwards, KiB, when it
/// could tell.
fn drop_guest_caches(lv: &Libvirt, name: &str) -> Result<Option<u64>> {
    let agent = lv.agent(name)?;
    let mut req = ExecRequest::new("/bin/sh", ["-c", settle_script().as_str()]);
    req.timeout = Duration::from_secs(60);
    req.output_cap = 4096;
    let out = Guest::new(&agent).exec(&req, &mut |_, _| {})?;
    if !out.success() {
        tracing::warn!(vm = %name, stderr = %String::from_utf8_lossy(&out.stderr), "dropping the guest's caches failed");
    }
    Ok(freed_kib(&String::from_utf8_lossy(&out.stdout)))
}

/// The growth of `MemFree` between the first and the last number printed by [`settle_script`].
fn freed_kib(stdout: &str) -> Option<u64> {
    let mut nums = stdout.lines().filter_map(|l| l.trim().parse::<u64>().ok());
    let before = nums.next()?;
    let after = nums.next_back()?;
    Some(after.saturating_sub(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_is_the_growth_of_memfree() {
        assert_eq!(freed_kib("100000\n130000\n"), Some(30_000));
        assert_eq!(freed_kib("100000\n90000\n"), Some(0));
        assert_eq!(freed_kib("100000\n"), None);
        assert_eq!(freed_kib(""), None);
    }

    #[test]
    fn the_settle_script_lowers_the_reporting_order_then_drops_and_compacts() {
        let script = settle_script();
        let order = script
            .find(&format!("echo {REPORTING_ORDER} > $order"))
            .expect("order written");
        let drop = script.find("drop_caches").expect("caches dropped");
        let compact = script.find("compact_memory").expect("memory compacted");
        assert!(order < drop && drop < compact, "{script}");
        assert!(script.contains("[ -w $order ] &&"), "{script}");
        // The shell sees one sed expression with its escapes intact.
        assert!(
            script.contains(r"sed -n 's/^MemFree: *\([0-9]*\).*/\1/p'"),
            "{script}"
        );
    }

    #[test]
    fn reporting_is_read_from_the_balloon_in_either_quoting() {
        assert!(has_free_page_reporting(
            "<memballoon model='virtio' freePageReporting='on'>"
        ));
        assert!(has_free_page_reporting(
            "<memballoon model=\"virtio\" freePageReporting=\"on\"/>"
        ));
        assert!(!has_free_page_reporting(
            "<memballoon model='virtio' freePageReporting='off'>"
        ));
        assert!(!has_free_page_reporting("<memballoon model='virtio'>"));
    }
}
