//! A noisy neighbour on the host's disk: one VM floods its disk with direct writes while
//! another measures how long `fsync` of a small file takes. The same probe runs alone, next
//! to an unlimited flood and next to a flood held by the pool's `diskWriteMibPerSecond`
//! (QEMU block throttling), all in one run, so the rows compare like with like.

use std::path::Path;
use std::time::Duration;

use agentvm_backend::backend::VmRequest;
use agentvm_backend::limits::VmLimits;
use agentvm_backend::vm::BootImage;
use agentvm_backend::xml::DiskIoLimits;
use agentvm_backend::{AcceleratorChoice, Backend, ExecRequest, Guest, LibvirtBackend, Owner};
use anyhow::{bail, Context, Result};

use crate::report::{Row, Table};
use crate::stats::summarize;
use crate::vms::{VmGuard, MEMORY_MIB};

/// The flood's write limit in the limited case, MiB/s.
pub const FLOOD_LIMIT_MIB: u64 = 10;

/// Writes `n` files of 4 KiB, each followed by `fsync`, and prints each write+fsync's
/// duration in microseconds, one per line.
const PROBE: &str = r#"
import os, sys, time
n = int(sys.argv[1])
os.makedirs("/root/probe", exist_ok=True)
buf = os.urandom(4096)
for i in range(n):
    t = time.perf_counter()
    fd = os.open("/root/probe/f%d" % i, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, buf)
    os.fsync(fd)
    os.close(fd)
    print(int((time.perf_counter() - t) * 1e6))
"#;

/// Direct writes of 64 MiB, over and over, until killed.
const FLOOD: &str =
    "while :; do dd if=/dev/zero of=/root/flood bs=1M count=64 oflag=direct 2>/dev/null; done";

fn request(name: &str, image: &BootImage, limits: VmLimits) -> VmRequest {
    VmRequest {
        name: name.to_string(),
        image: image.clone(),
        vcpus: 1,
        memory_mib: MEMORY_MIB,
        nic: None,
        owner: Owner {
            kind: agentvm_backend::OwnerKind::Benchmark,
            name: format!("bench{}", std::process::id()),
            spec_hash: String::new(),
            generation: 0,
        },
        warmup: Vec::new(),
        limits,
        disk_gib: None,
        disabled_cpu_features: Vec::new(),
        park: true,
        from_template: false,
    }
}

fn boot<'a>(
    backend: &'a LibvirtBackend,
    name: &str,
    image: &BootImage,
    limits: VmLimits,
) -> Result<VmGuard<'a>> {
    let guard = VmGuard {
        backend,
        name: name.to_string(),
    };
    let report = backend
        .create_vm(&request(name, image, limits))
        .with_context(|| format!("creating {name}"))?;
    for (limit, verdict) in &report.limits {
        if let Err(why) = verdict {
            bail!("{name}: {limit} is not in force on this host: {why}");
        }
    }
    Ok(guard)
}

/// The probe's `n` write+fsync durations on VM `name`.
fn probe(backend: &LibvirtBackend, name: &str, n: usize) -> Result<Vec<Duration>> {
    let chan = backend.agent(name)?;
    let g = Guest::new(&*chan);
    let mut req = ExecRequest::new("python3", vec![n.to_string()]);
    req.timeout = Duration::from_secs(600);
    let out = g.run_script("python3", PROBE, req, &mut |_, _| {})?;
    if !out.success() {
        bail!(
            "the fsync probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let xs: Vec<Duration> = text
        .lines()
        .map(|l| l.trim().parse::<u64>().map(Duration::from_micros))
        .collect::<Result<_, _>>()
        .context("parsing the probe's output")?;
    if xs.len() != n {
        bail!("the probe printed {} of {n} durations", xs.len());
    }
    // The directory is reused by the next case.
    let _ = g.exec(
        &ExecRequest::new("rm", ["-rf", "/root/probe"]),
        &mut |_, _| {},
    );
    Ok(xs)
}

/// Runs the probe on `probe_vm` while a VM with `limits` floods its disk.
fn probe_next_to_flood(
    backend: &LibvirtBackend,
    image: &BootImage,
    probe_vm: &str,
    flood_vm: &str,
    limits: VmLimits,
    n: usize,
) -> Result<(Vec<Duration>, f64)> {
    let flood = boot(backend, flood_vm, image, limits)?;
    std::thread::scope(|s| {
        let flooding = s.spawn(|| -> Result<()> {
            let chan = backend.agent(flood_vm)?;
            let mut req = ExecRequest::new("sh", ["-c", FLOOD]);
            req.timeout = Duration::from_secs(900);
            // Ends when the VM is destroyed below.
            let _ = Guest::new(&*chan).exec(&req, &mut |_, _| {});
            Ok(())
        });
        // Let the flood get going.
        std::thread::sleep(Duration::from_secs(5));
        let before = backend.vm_stats(flood_vm)?;
        let xs = probe(backend, probe_vm, n);
        let after = backend.vm_stats(flood_vm)?;
        drop(flood);
        let _ = flooding.join();
        // What the flood wrote while the probe ran, MiB/s (the VM's block counters).
        let rate = after.block_wr_bytes.saturating_sub(before.block_wr_bytes) as f64
            / (1u64 << 20) as f64
            / after.at.duration_since(before.at).as_secs_f64();
        Ok((xs?, rate))
    })
}

/// The three probe rows: alone, next to an unlimited flood, next to a flood held to
/// [`FLOOD_LIMIT_MIB`].
pub fn disk_flood_rows(
    uri: &str,
    state_dir: &Path,
    image: &BootImage,
    n: usize,
    timing: &mut Table,
) -> Result<()> {
    let accel = AcceleratorChoice::from_env_or(AcceleratorChoice::Tcg)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let backend = LibvirtBackend::new(uri, state_dir, accel, Duration::from_secs(300));
    let pid = std::process::id();
    let probe_vm = format!("agentvm-bench{pid}-probe");
    let _probe = boot(&backend, &probe_vm, image, VmLimits::default())?;

    eprintln!("  probe alone ({n} × 4 KiB write + fsync)");
    let alone = summarize(probe(&backend, &probe_vm, n)?);
    eprintln!("  probe next to an unlimited flood");
    let (unlimited, unlimited_rate) = probe_next_to_flood(
        &backend,
        image,
        &probe_vm,
        &format!("agentvm-bench{pid}-flood"),
        VmLimits::default(),
        n,
    )?;
    let unlimited = summarize(unlimited);
    eprintln!("  probe next to a flood held to {FLOOD_LIMIT_MIB} MiB/s");
    let limited_limits = VmLimits {
        disk_io: DiskIoLimits {
            write_bytes_per_second: FLOOD_LIMIT_MIB << 20,
            ..DiskIoLimits::default()
        },
        ..VmLimits::default()
    };
    let (limited, limited_rate) = probe_next_to_flood(
        &backend,
        image,
        &probe_vm,
        &format!("agentvm-bench{pid}-flood-limited"),
        limited_limits,
        n,
    )?;
    let limited = summarize(limited);
    let ratio = |s: &crate::stats::Summary| s.p99.as_secs_f64() / alone.p99.as_secs_f64();
    timing.push(Row::timing(
        "fsync probe alone: 4 KiB write + `fsync` in one VM",
        &alone,
        "the baseline of the two rows below, same VM, same run",
    ));
    timing.push(Row::timing(
        "fsync probe next to an unlimited disk flood",
        &unlimited,
        format!(
            "another VM writes 64 MiB with `dd oflag=direct` over and over ({unlimited_rate:.1} MiB/s while the probe ran); p99 {:.1}× alone",
            ratio(&unlimited)
        ),
    ));
    timing.push(Row::timing(
        format!("fsync probe next to a flood held to `diskWriteMibPerSecond: {FLOOD_LIMIT_MIB}`"),
        &limited,
        format!(
            "the same flood with QEMU block throttling on its disk ({limited_rate:.1} MiB/s while the probe ran); p99 {:.1}× alone, {:.2}× unlimited",
            ratio(&limited),
            limited.p99.as_secs_f64() / unlimited.p99.as_secs_f64()
        ),
    ));
    Ok(())
}
