//! Host memory of idle parked pool VMs: one alone and four side by side, with agentvm's
//! settings (free page reporting of 32 KiB blocks and up, caches dropped before parking) against the same VMs without
//! them, booted and parked the same way in the same run.

use std::path::Path;
use std::time::Duration;

use agentvm_backend::vm::BootImage;
use agentvm_backend::{AcceleratorChoice, Backend, Guest, LibvirtBackend};
use anyhow::{Context, Result};

use crate::report::{Row, Table};
use crate::stats::fmt_kib;
use crate::system::{qemu_memory, QemuMemory};
use crate::vms::{qemu_pid, request, VmGuard, MEMORY_MIB};

/// How many idle VMs are summed.
pub const IDLE_VMS: usize = 4;

/// How long a parked VM idles before it is measured.
pub const IDLE: Duration = Duration::from_secs(3);

/// The guest's own view (`/proc/meminfo`, KiB) and whether its balloon driver is bound.
#[derive(Debug, Default, Clone)]
pub struct GuestMemory {
    pub mem_free: u64,
    pub cached: u64,
    pub slab: u64,
    pub anon: u64,
    pub balloon_bound: bool,
}

impl GuestMemory {
    /// `/proc/meminfo` fields and the balloon driver, through the guest agent.
    pub fn read(backend: &LibvirtBackend, name: &str) -> Result<GuestMemory> {
        let chan = backend.agent(name)?;
        let g = Guest::new(&*chan);
        let meminfo = String::from_utf8_lossy(&g.read_file("/proc/meminfo", 1 << 16)?).into_owned();
        let field = |key: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let req = agentvm_backend::guest::ExecRequest::new(
            "/bin/sh",
            [
                "-c",
                "ls /sys/bus/virtio/drivers/virtio_balloon | grep -q '^virtio'",
            ],
        );
        let balloon_bound = g.exec(&req, &mut |_, _| {})?.success();
        Ok(GuestMemory {
            mem_free: field("MemFree"),
            cached: field("Cached"),
            slab: field("Slab"),
            anon: field("AnonPages"),
            balloon_bound,
        })
    }

    /// `free 400.1 MiB, page cache 30.2 MiB, slab 20.0 MiB, anon 5.1 MiB`.
    pub fn describe(&self) -> String {
        format!(
            "guest: free {}, page cache {}, slab {}, anon {}{}",
            fmt_kib(self.mem_free),
            fmt_kib(self.cached),
            fmt_kib(self.slab),
            fmt_kib(self.anon),
            if self.balloon_bound {
                ""
            } else {
                " (balloon driver not bound)"
            }
        )
    }
}

/// `PSS 140.0 MiB (guest RAM 90.0 MiB of it in 60.0 MiB huge pages, TCG 30.0 MiB, rest
/// 20.0 MiB), RSS 150.0 MiB`.
pub fn describe(m: &QemuMemory) -> String {
    format!(
        "PSS: guest RAM {} ({} of its RSS in huge pages), TCG translation cache {}, rest {}; RSS {}",
        fmt_kib(m.guest_ram_pss_kib),
        fmt_kib(m.guest_ram_huge_kib),
        fmt_kib(m.tcg_pss_kib),
        fmt_kib(m.other_pss_kib()),
        fmt_kib(m.rss_kib)
    )
}

/// What one configuration's idle VMs cost: the first alone, then all [`IDLE_VMS`] summed.
struct Idle {
    alone: QemuMemory,
    guest: GuestMemory,
    sum: QemuMemory,
}

/// Boots [`IDLE_VMS`] VMs of `backend` one after another; measures the first once parked and
/// alone, then the sum over all once the last is parked. Destroys them.
fn idle(backend: &LibvirtBackend, image: &BootImage, label: &str) -> Result<Idle> {
    let pid = std::process::id();
    let mut guards = Vec::new();
    let mut alone = None;
    let mut guest = GuestMemory::default();
    for i in 0..IDLE_VMS {
        let name = format!("agentvm-bench{pid}-{label}{i}");
        guards.push(VmGuard {
            backend,
            name: name.clone(),
        });
        backend
            .create_vm(&request(&name, image, pid))
            .with_context(|| format!("creating {name}"))?;
        if alone.is_none() {
            std::thread::sleep(IDLE);
            alone = Some(qemu_memory(qemu_pid(&name)?).context("reading QEMU's smaps")?);
            guest = GuestMemory::read(backend, &name)?;
        }
    }
    std::thread::sleep(IDLE);
    let mut sum = QemuMemory::default();
    for g in &guards {
        sum.add(&qemu_memory(qemu_pid(&g.name)?).context("reading QEMU's smaps")?);
    }
    let alone = alone.expect("at least one VM");
    eprintln!(
        "  {label}: one idle VM {}; {}; {IDLE_VMS} VMs: PSS {}",
        describe(&alone),
        guest.describe(),
        fmt_kib(sum.pss_kib)
    );
    Ok(Idle { alone, guest, sum })
}

/// The idle-guest memory rows: agentvm's settings against the same VMs without free page
/// reporting (and so without the cache drop before parking), one alone and [`IDLE_VMS`] summed.
/// Returns the first of agentvm's, alone.
pub fn idle_rows(
    uri: &str,
    state_dir: &Path,
    image: &BootImage,
    reset: &QemuMemory,
    memory: &mut Table,
) -> Result<QemuMemory> {
    let accel = AcceleratorChoice::from_env_or(AcceleratorChoice::Tcg)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ours = LibvirtBackend::new(uri, state_dir, accel, Duration::from_secs(300));
    let without = LibvirtBackend::new(uri, state_dir, accel, Duration::from_secs(300))
        .with_lean_memory(false);
    let lean = idle(&ours, image, "lean")?;
    let base = idle(&without, image, "nofpr")?;
    let tb = agentvm_backend::vm::DEFAULT_TCG_TB_CACHE_MIB;
    let order = agentvm_backend::lean::REPORTING_ORDER;
    memory.push(Row::value(
        format!("idle guest, host PSS of its QEMU process ({MEMORY_MIB} MiB guest)"),
        1,
        fmt_kib(lean.alone.pss_kib),
        format!(
            "free page reporting (blocks of order {order} and up), caches dropped before parking; \
             {IDLE:?} after parking, alone; {}; \
             {}; after a run's reset in the same process: PSS {}, RSS {}; TCG translation cache {tb} MiB",
            describe(&lean.alone),
            lean.guest.describe(),
            fmt_kib(reset.pss_kib),
            fmt_kib(reset.rss_kib),
        ),
    ));
    memory.push(Row::value(
        "baseline: the same idle guest without free page reporting",
        1,
        fmt_kib(base.alone.pss_kib),
        format!(
            "booted and parked the same way in this run (no cache drop: it needs reporting to \
             give anything back); {}; {}; agentvm's settings use {:.0} % of its PSS",
            describe(&base.alone),
            base.guest.describe(),
            100.0 * lean.alone.pss_kib as f64 / base.alone.pss_kib.max(1) as f64
        ),
    ));
    memory.push(Row::value(
        format!("{IDLE_VMS} idle guests, sum of host PSS"),
        IDLE_VMS,
        fmt_kib(lean.sum.pss_kib),
        format!(
            "booted one after another, {IDLE:?} after the last parked; RSS sum {}; \
             without free page reporting: PSS sum {}, RSS sum {}",
            fmt_kib(lean.sum.rss_kib),
            fmt_kib(base.sum.pss_kib),
            fmt_kib(base.sum.rss_kib),
        ),
    ));
    Ok(lean.alone)
}
