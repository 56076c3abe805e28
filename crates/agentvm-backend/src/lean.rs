//! Lean idle guests: what a parked VM gives back to the host before its golden state is taken.
//!
//! A booted guest has touched much more memory than it holds: the initrd it unpacked and
//! freed, the page cache of everything it read, slab. Host memory, once touched, stays with
//! the QEMU process. agentvm's VMs have free page reporting on their virtio balloon
//! ([`crate::xml::DomainSpec::free_page_reporting`]): the guest kernel (`CONFIG_PAGE_REPORTING`,
//! `virtio_balloon`) reports free 2 MiB blocks about 2 s after they were freed and QEMU
//! discards them. Right before the golden state is taken, [`settle_before_golden`] drops the
//! guest's caches and compacts its memory, then waits until the host has taken the freed
//! memory back, so the golden state (which every reset loads) holds those pages as zero pages.
//!
//! Guarantees: best effort; a failure is logged and never fails the park. A VM without free
//! page reporting is left as it is.
//!
//! Assumptions: the guest agent answers (the VM is about to be parked); the domain's `RSS`
//! memory statistic is the QEMU process's resident memory (libvirt reads it from `/proc`).

use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::error::Result;
use crate::guest::{ExecRequest, Guest};
use crate::libvirt::Libvirt;

/// What the guest runs: write back, drop page cache and slab, then compact free memory into
/// blocks large enough to be reported; prints `MemFree` (KiB) before and after.
const SETTLE_SCRIPT: &str = "memfree() { sed -n 's/^MemFree: *\\([0-9]*\\).*/\\1/p' /proc/meminfo; }; \
     memfree; sync; echo 3 > /proc/sys/vm/drop_caches; echo 1 > /proc/sys/vm/compact_memory; memfree";

/// Below this much memory freed by the drop there is nothing worth waiting for (a VM made
/// from a template starts from a settled golden state).
const WORTH_WAITING_KIB: u64 = 8 * 1024;

/// The guest kernel reports freed memory this long after it was freed
/// (`PAGE_REPORTING_DELAY`, 2 s in Linux 6.1), plus a margin.
const REPORTING_DELAY: Duration = Duration::from_millis(2300);

/// Longest wait for the host's resident memory to settle.
const MAX_WAIT: Duration = Duration::from_secs(6);

/// How often the host's resident memory is sampled while waiting.
const POLL: Duration = Duration::from_millis(200);

/// The resident memory counts as settled when it fell by less than this over [`STABLE_FOR`].
const STABLE_KIB: u64 = 1024;
const STABLE_FOR: Duration = Duration::from_millis(600);

/// Whether a domain XML turns on free page reporting on its balloon.
pub fn has_free_page_reporting(domain_xml: &str) -> bool {
    domain_xml.contains("freePageReporting='on'") || domain_xml.contains("freePageReporting=\"on\"")
}

/// Whether the resident memory samples `(elapsed, kib)` (oldest first) have settled: the
/// reporting delay has passed and the last [`STABLE_FOR`] brought no fall of [`STABLE_KIB`].
pub fn settled(samples: &[(Duration, u64)]) -> bool {
    let Some(&(now, last)) = samples.last() else {
        return false;
    };
    if now < REPORTING_DELAY + STABLE_FOR {
        return false;
    }
    samples
        .iter()
        .filter(|(t, _)| now.saturating_sub(*t) <= STABLE_FOR)
        .all(|&(_, kib)| kib.saturating_sub(last) < STABLE_KIB)
}

/// The QEMU process's resident memory, KiB, from the domain's memory statistics.
fn rss_kib(dom: &Domain) -> Option<u64> {
    dom.memory_stats(0)
        .ok()?
        .into_iter()
        .find(|m| m.tag as i32 == sys::VIR_DOMAIN_MEMORY_STAT_RSS as i32)
        .map(|m| m.val)
}

/// Drops the guest's caches and waits for the host to take the freed memory back, when the
/// domain has free page reporting; see the module doc. Best effort.
pub(crate) fn settle_before_golden(lv: &Libvirt, name: &str, dom: &Domain) {
    let reporting = dom
        .xml_desc(0)
        .map(|x| has_free_page_reporting(&x))
        .unwrap_or(false);
    if !reporting {
        return;
    }
    let start = Instant::now();
    let before = rss_kib(dom);
    let freed = match drop_guest_caches(lv, name) {
        Ok(freed) => freed,
        Err(e) => {
            tracing::warn!(vm = %name, error = %e, "dropping the guest's caches before parking failed");
            return;
        }
    };
    if freed.is_some_and(|kib| kib < WORTH_WAITING_KIB) {
        tracing::debug!(vm = %name, freed_kib = ?freed, "guest caches dropped before parking; little to give back");
        return;
    }
    let dropped = Instant::now();
    let mut samples = Vec::new();
    while dropped.elapsed() < MAX_WAIT {
        std::thread::sleep(POLL);
        let Some(kib) = rss_kib(dom) else { break };
        samples.push((dropped.elapsed(), kib));
        if settled(&samples) {
            break;
        }
    }
    tracing::info!(
        vm = %name,
        rss_before_kib = ?before,
        rss_after_kib = ?samples.last().map(|s| s.1),
        guest_freed_kib = ?freed,
        took = ?start.elapsed(),
        "guest caches dropped before parking"
    );
}

/// Runs [`SETTLE_SCRIPT`]; how much more memory the guest has free afterwards, KiB, when it
/// could tell.
fn drop_guest_caches(lv: &Libvirt, name: &str) -> Result<Option<u64>> {
    let agent = lv.agent(name)?;
    let mut req = ExecRequest::new("/bin/sh", ["-c", SETTLE_SCRIPT]);
    req.timeout = Duration::from_secs(60);
    req.output_cap = 4096;
    let out = Guest::new(&agent).exec(&req, &mut |_, _| {})?;
    if !out.success() {
        tracing::warn!(vm = %name, stderr = %String::from_utf8_lossy(&out.stderr), "dropping the guest's caches failed");
    }
    Ok(freed_kib(&String::from_utf8_lossy(&out.stdout)))
}

/// The growth of `MemFree` between the first and the last number printed by [`SETTLE_SCRIPT`].
fn freed_kib(stdout: &str) -> Option<u64> {
    let mut nums = stdout.lines().filter_map(|l| l.trim().parse::<u64>().ok());
    let before = nums.next()?;
    let after = nums.next_back()?;
    Some(after.saturating_sub(before))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn freed_memory_is_the_growth_of_memfree() {
        assert_eq!(freed_kib("100000\n130000\n"), Some(30_000));
        assert_eq!(freed_kib("100000\n90000\n"), Some(0));
        assert_eq!(freed_kib("100000\n"), None);
        assert_eq!(freed_kib(""), None);
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

    #[test]
    fn settled_waits_out_the_reporting_delay_then_for_a_flat_stretch() {
        // Flat from the start: still not before the guest could have reported anything.
        let flat: Vec<_> = (1..=15).map(|i| (ms(200 * i), 300_000)).collect();
        assert!(!settled(&flat[..14]), "2.8 s < delay + stable stretch");
        assert!(settled(&flat), "3.0 s, flat");
        // Falling until 3.0 s, then flat: settled 600 ms later, not before.
        let mut falling: Vec<_> = (1..=15)
            .map(|i| (ms(200 * i), 300_000 - 10_000 * i))
            .collect();
        assert!(!settled(&falling));
        let low = falling.last().unwrap().1;
        falling.extend((16..=17).map(|i| (ms(200 * i), low)));
        assert!(
            !settled(&falling),
            "3.4 s: the fall at 3.0 s is within the stretch"
        );
        falling.push((ms(3600), low));
        assert!(settled(&falling));
        // Small jitter does not count as falling.
        falling.push((ms(3800), low - 100));
        assert!(settled(&falling));
        assert!(!settled(&[]));
    }
}
