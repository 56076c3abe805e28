//! `agentvm-bench`: agentvm's benchmark harness. Measures, on real libvirt and QEMU, the
//! pool hand-out (in-process and through the API), the reset cycle against `virsh
//! snapshot-revert`, boot to ready, `apply` → Running with a warm pool, runs per minute on
//! pools of 1, 2 and 4 VMs, controller and idle-guest memory, a no-op resync over 1,000
//! objects, spec-file write → reconcile latency, a waiting run's VM ready → scheduled, and sandboxes (claim, pause/resume,
//! stop/start, snapshot, rollback against `virsh snapshot-revert`, memory of N running,
//! paused and stopped), and the cluster store on etcd against the single-host file; prints
//! one Markdown report.
//!
//! Run it through `scripts/bench.sh` (libvirtd in its network namespace, release build).

mod cluster;
mod controller;
mod egress;
mod idle;
mod inproc;
mod neighbours;
mod report;
mod sandboxes;
mod stats;
mod system;
mod vms;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

use report::Table;

/// agentvm's benchmark harness: prints a Markdown report of medians and p99s.
#[derive(Debug, Parser)]
#[command(name = "agentvm-bench")]
struct Args {
    /// Fewer iterations (a few minutes instead of about ten under TCG).
    #[arg(long)]
    quick: bool,
    /// Only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// The `agentvm` binary whose controller is measured [default: next to this binary].
    #[arg(long, value_name = "PATH")]
    agentvm: Option<PathBuf>,
    /// Scratch state directory (store, VM overlays), removed afterwards; must be readable by
    /// libvirt's QEMU [default: $AGENTVM_STATE_DIR/bench-<pid>, else
    /// /var/lib/agentvm-bench-<pid>].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Also write the report to this file.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// A sentence printed under the machine description (e.g. how loaded the host was).
    #[arg(long, value_name = "TEXT")]
    note: Option<String>,
    /// Network namespace libvirtd runs in (the `egress` part creates a NAT network there and
    /// nowhere else).
    #[arg(long, value_name = "NAME", default_value = "agentvm-test")]
    netns: String,
    /// Keep the scratch state directory (controller logs, store) for inspection.
    #[arg(long)]
    keep: bool,
    /// Write `--output` even when the host is busy (1-minute load average above
    /// [`MAX_LOAD_FOR_RESULTS`] at the start), which makes every VM row an upper bound.
    #[arg(long)]
    force: bool,
}

/// Above this 1-minute load average at the start, `--output` (results meant for
/// BENCHMARKS.md) is refused without `--force`.
const MAX_LOAD_FOR_RESULTS: f64 = 2.0;

/// Parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// In-process pool hand-out.
    Acquire,
    /// Resync over 1,000 objects, spec-file write latency and a waiting run's wake-up
    /// (in-process controller).
    Controller,
    /// Boot to ready, reset cycle and idle guest memory (pool VMs through the backend).
    Vm,
    /// Controller process memory, idle and with 1,000 objects.
    Memory,
    /// Acquire through the API, apply → Running, runs per minute (controller process).
    Runs,
    /// A VM's fsync latency next to another VM flooding its disk, with and without the
    /// flood's `diskWriteMibPerSecond`.
    Neighbours,
    /// Sandboxes: claim, pause/resume, stop/start, snapshot, rollback vs `virsh
    /// snapshot-revert`, memory of N running/paused/stopped.
    Sandboxes,
    /// HTTPS throughput and latency through the egress proxy against plain NAT (a NAT
    /// network in `--netns`).
    Egress,
    /// The cluster store (a real etcd on loopback) against the single-host file: store
    /// calls, apply → reconcile, another node's event.
    Cluster,
}

/// Polls `cond` every 20 ms until it holds; fails after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the scratch directory (and with it any file a failed part left) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn default_image(cache: &Path) -> Result<agentvm_backend::vm::BootImage> {
    let recipe = agentvm_controller::images::default_recipe();
    let img = agentvm_image::lookup(&recipe, cache)
        .context("reading the image cache")?
        .with_context(|| {
            format!(
                "the default guest image is not built under {}: run `agentvm image build`",
                cache.display()
            )
        })?;
    Ok(agentvm_backend::vm::BootImage {
        disk: img.disk,
        kernel: img.kernel,
        initrd: img.initrd,
        cmdline: img.cmdline,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let wants = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let quick = args.quick;
    let uri = std::env::var("AGENTVM_LIBVIRT_URI").unwrap_or_else(|_| "qemu:///system".into());
    let cache = agentvm_image::default_cache_dir();
    let bin = match &args.agentvm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory of this binary")?
            .join("agentvm"),
    };
    let pid = std::process::id();
    let dir =
        args.state_dir
            .clone()
            .unwrap_or_else(|| match std::env::var_os("AGENTVM_STATE_DIR") {
                Some(d) => PathBuf::from(d).join(format!("bench-{pid}")),
                None => PathBuf::from(format!("/var/lib/agentvm-bench-{pid}")),
            });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        for d in dir.ancestors().take(2) {
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755));
        }
    }
    let scratch = (!args.keep).then(|| Scratch(dir.clone()));
    let lv = agentvm_backend::Libvirt::connect(&uri).with_context(|| {
        format!("libvirt at {uri} must be running (scripts/bench.sh starts it)")
    })?;
    let libvirt_version = lv.version().unwrap_or_else(|_| "unknown".into());
    drop(lv);
    let load_before = system::load_average();
    let load1: Option<f64> = load_before
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok());
    if let (Some(path), Some(load)) = (&args.output, load1) {
        if load > MAX_LOAD_FOR_RESULTS && !args.force {
            anyhow::bail!(
                "the host is busy (1-minute load average {load}): results written to {} would \
                 measure the other work as much as agentvm's; wait for an idle host or pass --force",
                path.display()
            );
        }
    }
    let started = Instant::now();

    let mut acquire = Table::new("Pool acquire and `apply` → Running");
    let mut vm = Table::new("Pool VMs: boot and reset");
    let mut runs = Table::new("Throughput");
    let mut memory = Table::new("Memory");
    let mut control = Table::new("Controller: resync and spec-directory watch");
    let mut isolation = Table::new("Isolation: a noisy neighbour on the disk");
    let mut sandbox = Table::new("Sandboxes");
    let mut egress_table = Table::new("Egress: the domain proxy against plain NAT");
    let mut cluster_table = Table::new("Cluster store: etcd against the single-host file");
    let objects = 1000;
    let mut accelerator = std::env::var("AGENTVM_ACCEL").unwrap_or_else(|_| "tcg".into());

    if wants(Part::Acquire) {
        eprintln!("== in-process acquire");
        inproc::acquire_rows(if quick { 100_000 } else { 1_000_000 }, &mut acquire);
    }
    if wants(Part::Controller) {
        eprintln!("== in-process controller: {objects} objects, resync, spec-file writes");
        inproc::controller_rows(
            &dir.join("inproc"),
            &cache,
            objects,
            if quick { 3 } else { 10 },
            if quick { 5 } else { 20 },
            &mut control,
        )?;
        eprintln!("== in-process run scheduler: VM ready → waiting run");
        inproc::wake_rows(
            &dir.join("wake"),
            200,
            if quick { 5 } else { 20 },
            &mut control,
        )?;
    }
    if wants(Part::Vm) || wants(Part::Runs) || wants(Part::Neighbours) || wants(Part::Sandboxes) {
        // Fail early and clearly when the image is missing.
        default_image(&cache)?;
    }
    if wants(Part::Vm) {
        eprintln!("== pool VMs through the backend: boot, reset vs virsh snapshot-revert, memory");
        let facts = vms::vm_rows(
            &uri,
            &dir.join("vms"),
            &default_image(&cache)?,
            if quick { 1 } else { 3 },
            if quick { 4 } else { 10 },
            &mut vm,
            &mut memory,
        )?;
        accelerator = facts.accelerator;
    }
    if wants(Part::Neighbours) {
        eprintln!("== a noisy neighbour on the disk: fsync latency next to a write flood");
        neighbours::disk_flood_rows(
            &uri,
            &dir.join("neighbours"),
            &default_image(&cache)?,
            if quick { 100 } else { 400 },
            &mut isolation,
        )?;
    }
    if wants(Part::Memory) {
        eprintln!("== controller process memory, idle and with {objects} objects");
        controller::memory_rows(
            &bin,
            &dir.join("memory"),
            &uri,
            &cache,
            objects,
            &mut memory,
        )?;
    }
    if wants(Part::Runs) {
        eprintln!("== runs through the controller process");
        let plan = controller::RunPlan {
            latency_runs: if quick { 5 } else { 20 },
            throughput: if quick {
                vec![(1, 4), (2, 6), (4, 8)]
            } else {
                vec![(1, 15), (2, 24), (4, 40)]
            },
        };
        controller::run_rows(
            &bin,
            &dir.join("runs"),
            &uri,
            &cache,
            &plan,
            &mut acquire,
            &mut runs,
        )?;
    }
    if wants(Part::Sandboxes) {
        let count = if quick { 3 } else { 20 };
        eprintln!("== sandboxes through the controller process ({count} of them)");
        sandboxes::sandbox_rows(
            &bin,
            &dir.join("sandboxes"),
            &uri,
            &cache,
            if quick { 3 } else { 10 },
            count,
            &mut sandbox,
            &mut memory,
        )?;
    }
    if wants(Part::Egress) {
        eprintln!(
            "== egress proxy against plain NAT (network namespace {})",
            args.netns
        );
        egress::egress_rows(
            &bin,
            &dir.join("egress"),
            &uri,
            &cache,
            &args.netns,
            &mut egress_table,
        )?;
    }
    if wants(Part::Cluster) {
        eprintln!("== cluster store: etcd against the single-host file");
        cluster::cluster_rows(
            &dir.join("cluster"),
            if quick { 50 } else { 200 },
            &mut cluster_table,
        )?;
    }
    match scratch {
        Some(s) => drop(s),
        None => eprintln!("scratch state kept in {}", dir.display()),
    }

    let mut out = String::from("## Results\n\n");
    for line in system::describe(&accelerator.to_uppercase(), &libvirt_version) {
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "- mode: {}; took {:.0} s; load average (1/5/15 min) {} at the start, {} at the end\n",
        if quick { "`--quick`" } else { "full" },
        started.elapsed().as_secs_f64(),
        load_before,
        system::load_average()
    ));
    if let Some(note) = &args.note {
        out.push_str(&format!("\n{note}\n"));
    }
    for t in [
        &acquire,
        &vm,
        &sandbox,
        &runs,
        &memory,
        &control,
        &isolation,
        &egress_table,
        &cluster_table,
    ] {
        if !t.rows.is_empty() {
            out.push('\n');
            out.push_str(&t.markdown());
        }
    }
    print!("{out}");
    if let Some(path) = &args.output {
        std::fs::write(path, &out).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
