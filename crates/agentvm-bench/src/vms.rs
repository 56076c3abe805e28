//! Benchmarks of pool VMs through the controller's own backend (`LibvirtBackend`, real
//! QEMU): boot to ready (define → parked golden state), the reset cycle against `virsh
//! snapshot-revert` in the same run, and the host memory of an idle parked guest.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agentvm_backend::backend::VmRequest;
use agentvm_backend::golden::GOLDEN_SNAPSHOT;
use agentvm_backend::vm::BootImage;
use agentvm_backend::{AcceleratorChoice, Backend, Guest, LibvirtBackend, Owner};
use anyhow::{bail, Context, Result};

use crate::idle::idle_rows;
use crate::report::{Row, Table};
use crate::stats::{fmt_duration, fmt_kib, summarize};
use crate::system::{qemu_memory, QemuMemory};

/// Guest RAM of every benchmark VM, MiB (the shape the e2e tests use).
pub const MEMORY_MIB: u64 = 512;

/// Destroys a VM of the backend when dropped (also when a measurement failed).
pub(crate) struct VmGuard<'a> {
    pub(crate) backend: &'a LibvirtBackend,
    pub(crate) name: String,
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.backend.destroy_vm(&self.name) {
            eprintln!("warning: destroying {}: {e}", self.name);
        }
    }
}

/// `virsh -c URI ARGS`; its stdout.
pub(crate) fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .context("running virsh")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The QEMU process of a running domain (libvirt's pid file).
pub fn qemu_pid(name: &str) -> Result<u32> {
    let path = format!("/run/libvirt/qemu/{name}.pid");
    let pid = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {path}"))?;
    Ok(pid)
}

/// Leaves a mark in the guest (a file on its disk) for the reset to undo. Returns true when
/// the guest agent, although it had answered after the previous reset, dropped the first
/// command (then it waits for the agent and tries again, up to 5 times).
fn dirty(backend: &LibvirtBackend, name: &str) -> Result<bool> {
    let mut dropped = false;
    for attempt in 1.. {
        let chan = backend.agent(name)?;
        let g = Guest::new(&*chan);
        match g.write_file("/root/bench-dirty", b"dirty") {
            Ok(()) => return Ok(dropped),
            Err(e) if attempt < 5 => {
                eprintln!("  guest agent dropped a command after a reset ({e}); retrying");
                dropped = true;
                std::thread::sleep(Duration::from_millis(500));
                g.wait_ready(Duration::from_secs(120))?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// A benchmark VM of [`MEMORY_MIB`], 1 vCPU, isolated, no warm-up.
pub(crate) fn request(name: &str, image: &BootImage, pid: u32) -> VmRequest {
    VmRequest {
        name: name.to_string(),
        image: image.clone(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        nic: None,
        owner: Owner {
            kind: agentvm_backend::OwnerKind::Benchmark,
            name: format!("bench{pid}"),
            spec_hash: String::new(),
            generation: 0,
        },
        warmup: Vec::new(),
        limits: Default::default(),
        disk_gib: None,
        disabled_cpu_features: Vec::new(),
        park: true,
        from_template: false,
    }
}

/// What [`vm_rows`] found out besides its rows.
pub struct VmFacts {
    /// `TCG` or `KVM`, from the booted domain's XML.
    pub accelerator: String,
}

/// Boots `boots` pool VMs one after another (timing each), then on the last one runs
/// `cycles` resets through the backend interleaved with `cycles` `virsh snapshot-revert`s, and
/// reads the host memory of its QEMU process while it idles.
pub fn vm_rows(
    uri: &str,
    state_dir: &Path,
    image: &BootImage,
    boots: usize,
    cycles: usize,
    timing: &mut Table,
    memory: &mut Table,
) -> Result<VmFacts> {
    let accel = AcceleratorChoice::from_env_or(AcceleratorChoice::Tcg)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend = LibvirtBackend::new(uri, state_dir, accel, Duration::from_secs(300));
    let pid = std::process::id();
    let (mut total, mut boot, mut park) = (vec![], vec![], vec![]);
    let mut kept = None;
    for b in 0..boots.max(1) {
        let name = format!("agentvm-bench{pid}-vm{b}");
        let req = request(&name, image, pid);
        let t = Instant::now();
        let guard = VmGuard {
            backend: &backend,
            name: name.clone(),
        };
        let report = backend
            .create_vm(&req)
            .with_context(|| format!("creating {name}"))?;
        total.push(t.elapsed());
        boot.push(report.boot);
        park.push(report.park);
        eprintln!(
            "  {name}: ready in {} (boot {}, park {})",
            fmt_duration(t.elapsed()),
            fmt_duration(report.boot),
            fmt_duration(report.park)
        );
        // Only the last one stays up.
        kept = Some(guard);
    }
    let vm = kept.expect("at least one VM");
    let name = vm.name.clone();
    let xml = virsh(uri, &["dumpxml", &name])?;
    let accelerator = if xml.contains("<domain type='kvm'") {
        "KVM"
    } else {
        "TCG"
    }
    .to_string();
    timing.push(Row::timing(
        "boot to ready: define → agent answers → parked at golden",
        &summarize(total),
        format!(
            "`Backend::create_vm`, 1 vCPU, {MEMORY_MIB} MiB, no warm-up; boot part median {}, park median {}",
            fmt_duration(summarize(boot).median),
            fmt_duration(summarize(park).median)
        ),
    ));

    let (mut ours, mut baseline) = (vec![], vec![]);
    // Resets after which the agent answered, then dropped the next command.
    let (mut ours_dropped, mut baseline_dropped) = (0, 0);
    let mut reset_rss = None;
    for i in 0..cycles.max(1) {
        if dirty(&backend, &name)? && i > 0 {
            baseline_dropped += 1;
        }
        let t = Instant::now();
        backend.reset_vm(&name).context("reset_vm")?;
        ours.push(t.elapsed());
        if reset_rss.is_none() {
            // After one reset in the same QEMU process (before any `virsh snapshot-revert`,
            // which starts a new one): how a pool VM idles between runs.
            std::thread::sleep(crate::idle::IDLE);
            reset_rss = Some(qemu_memory(qemu_pid(&name)?).context("reading QEMU's smaps")?);
        }

        if dirty(&backend, &name)? {
            ours_dropped += 1;
        }
        let t = Instant::now();
        virsh(
            uri,
            &["snapshot-revert", &name, GOLDEN_SNAPSHOT, "--running"],
        )?;
        let chan = backend.agent(&name)?;
        Guest::new(&*chan).wait_ready(Duration::from_secs(300))?;
        baseline.push(t.elapsed());
    }
    let ours = summarize(ours);
    let baseline = summarize(baseline);
    timing.push(Row::timing(
        "reset cycle: release → ready (`Backend::reset_vm`, the default strategy)",
        &ours,
        format!(
            "until the agent answers and the clock is set; {:.1}× faster than the baseline below; \
             after {ours_dropped} of {} the agent then dropped the next command",
            baseline.median.as_secs_f64() / ours.median.as_secs_f64(),
            ours.n
        ),
    ));
    timing.push(Row::timing(
        "baseline: `virsh snapshot-revert --running` + agent ping",
        &baseline,
        format!(
            "same VM, same golden snapshot, interleaved with the row above; after {baseline_dropped} of {} the agent then dropped the next command",
            baseline.n.saturating_sub(1)
        ),
    ));

    let reset: QemuMemory = reset_rss.expect("at least one cycle");
    drop(vm);

    // Idle parked guests, alone and side by side, against the same without free page
    // reporting.
    let lean = idle_rows(uri, state_dir, image, &reset, memory)?;

    // The baseline: QEMU's own translation cache (1 GiB) on an otherwise identical VM,
    // booted and parked the same way in this run, alone.
    let qemu_default = {
        let backend = LibvirtBackend::new(uri, state_dir, accel, Duration::from_secs(300))
            .with_tcg_translation_cache(None);
        let name = format!("agentvm-bench{pid}-qemu-tb");
        let req = request(&name, image, pid);
        let guard = VmGuard {
            backend: &backend,
            name: name.clone(),
        };
        backend
            .create_vm(&req)
            .with_context(|| format!("creating {name}"))?;
        std::thread::sleep(crate::idle::IDLE);
        let m = qemu_memory(qemu_pid(&name)?).context("reading QEMU's smaps")?;
        drop(guard);
        m
    };
    memory.push(Row::value(
        "baseline: the same idle guest with QEMU's default translation cache (1 GiB)",
        1,
        fmt_kib(qemu_default.pss_kib),
        format!(
            "PSS; booted and parked the same way in this run (with free page reporting), {:?} after parking; {}; agentvm's default uses {:.0} % of it",
            crate::idle::IDLE,
            crate::idle::describe(&qemu_default),
            100.0 * lean.pss_kib as f64 / qemu_default.pss_kib.max(1) as f64
        ),
    ));
    Ok(VmFacts { accelerator })
}
