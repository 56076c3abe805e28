//! Benchmark (not a test): reset time of every golden-state strategy against plain
//! `virsh snapshot-revert`, the round trip of `Guest::exec("/bin/true")` through
//! agentvm-guest against the qemu-guest-agent path and a raw `guest-exec` +
//! `guest-exec-status` loop, and 20 MiB files through each agent. Real QEMU through
//! `qemu:///system`.
//!
//! `AGENTVM_ACCEL=tcg cargo bench -p agentvm-backend --bench reset`
//! Knobs: `AGENTVM_BENCH_CYCLES` (reset cycles, default 5), `AGENTVM_BENCH_EXECS` (default 20),
//! `AGENTVM_BENCH_SMALL_MIB` (guest RAM of the extra small-RAM rows, default 256; 0 skips them),
//! `AGENTVM_BENCH_ONLY=exec` (only the exec round trip and the files).

use std::process::Command;
use std::time::{Duration, Instant};

use agentvm_backend::golden::{ResetStrategy, GOLDEN_SNAPSHOT};
use agentvm_backend::guest::{AgentChannel, ExecRequest, Guest};
use agentvm_backend::{EphemeralVm, Libvirt, LibvirtBackend, Owner, VmRequest};
use serde_json::json;

#[path = "../tests/common/mod.rs"]
mod common;
use common::{backend, request};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Order statistics of a sample.
struct Summary {
    n: usize,
    median: Duration,
    p90: Duration,
    min: Duration,
    max: Duration,
}

fn summary(mut xs: Vec<Duration>) -> Summary {
    xs.sort();
    let n = xs.len();
    let at = |q: f64| xs[(((n as f64) * q).ceil() as usize).clamp(1, n) - 1];
    Summary {
        n,
        median: at(0.5),
        p90: at(0.9),
        min: xs[0],
        max: xs[n - 1],
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

struct Row {
    what: String,
    total: Summary,
    restore: Option<Duration>,
    agent: Option<Duration>,
    /// Median of the guest step after the restore (RNG reseed and clock).
    clock: Option<Duration>,
}

fn print_rows(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "| {:<44} | {:>2} | {:>7} | {:>7} | {:>7} | {:>7} | {:>11} | {:>9} | {:>9} |",
        "what", "n", "median", "p90", "min", "max", "restore med", "agent med", "refresh med"
    );
    println!(
        "|{:-<46}|{:->4}|{:->9}|{:->9}|{:->9}|{:->9}|{:->13}|{:->11}|{:->11}|",
        "", "", "", "", "", "", "", "", ""
    );
    let opt = |d: Option<Duration>| d.map(ms).unwrap_or_else(|| "-".into());
    for r in rows {
        println!(
            "| {:<44} | {:>2} | {:>7} | {:>7} | {:>7} | {:>7} | {:>11} | {:>9} | {:>9} |",
            r.what,
            r.total.n,
            ms(r.total.median),
            ms(r.total.p90),
            ms(r.total.min),
            ms(r.total.max),
            opt(r.restore),
            opt(r.agent),
            opt(r.clock)
        );
    }
}

fn median(xs: &[Duration]) -> Duration {
    summary(xs.to_vec()).median
}

/// Dirty the guest a little so a reset has something to undo.
fn dirty(vm: &EphemeralVm<'_>) {
    let agent = vm.agent().unwrap();
    Guest::new(&*agent)
        .write_file("/root/bench-dirty", b"dirty")
        .unwrap();
}

fn bench_strategy(
    vm: &EphemeralVm<'_>,
    strategy: ResetStrategy,
    cycles: usize,
    label: &str,
) -> Row {
    let (mut total, mut restore, mut agent, mut clock) = (vec![], vec![], vec![], vec![]);
    for _ in 0..cycles {
        dirty(vm);
        let r = vm
            .reset_with(strategy)
            .unwrap_or_else(|e| panic!("{strategy}: {e}"));
        total.push(r.total);
        restore.push(r.restore);
        agent.push(r.agent);
        clock.push(r.refresh);
    }
    Row {
        what: label.to_string(),
        total: summary(total),
        restore: Some(median(&restore)),
        agent: Some(median(&agent)),
        clock: Some(median(&clock)),
    }
}

/// Baseline: `virsh snapshot-revert` of the same snapshot, then wait for the agent.
fn bench_virsh_revert(vm: &EphemeralVm<'_>, cycles: usize) -> Row {
    let uri = Libvirt::default_uri();
    let (mut total, mut restore, mut agent) = (vec![], vec![], vec![]);
    for _ in 0..cycles {
        dirty(vm);
        let t = Instant::now();
        let out = Command::new("virsh")
            .args(["-c", &uri, "snapshot-revert", vm.name(), GOLDEN_SNAPSHOT])
            .arg("--running")
            .output()
            .expect("running virsh");
        assert!(
            out.status.success(),
            "virsh snapshot-revert: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = t.elapsed();
        let ch = vm.agent().unwrap();
        let a = Guest::new(&*ch)
            .wait_ready(Duration::from_secs(120))
            .unwrap();
        total.push(t.elapsed());
        restore.push(r);
        agent.push(a);
    }
    Row {
        what: "baseline: virsh snapshot-revert + ping".into(),
        total: summary(total),
        restore: Some(median(&restore)),
        agent: Some(median(&agent)),
        clock: None,
    }
}

/// Baseline: one `guest-exec /bin/true` and `guest-exec-status` polled every 5 ms.
fn raw_exec_true<C: AgentChannel + ?Sized>(ch: &C, poll: Duration) -> Duration {
    raw_exec(ch, json!({"path": "/bin/true"}), poll)
}

/// The process chain `Guest::exec` starts (setsid, a shell redirecting output, the program),
/// run raw: the floor of what `Guest::exec` can cost without giving up process-group kills
/// and output files.
fn raw_exec_chain<C: AgentChannel + ?Sized>(ch: &C, poll: Duration) -> Duration {
    raw_exec(
        ch,
        json!({"path": "/usr/bin/setsid", "arg": ["/bin/sh", "-c",
            "exec >/dev/null 2>&1; cd / || exit 126; exec /bin/true"]}),
        poll,
    )
}

fn raw_exec<C: AgentChannel + ?Sized>(
    ch: &C,
    arguments: serde_json::Value,
    poll: Duration,
) -> Duration {
    let t = Instant::now();
    let r = ch
        .command(
            &json!({"execute": "guest-exec", "arguments": arguments}),
            Duration::from_secs(10),
        )
        .unwrap();
    let pid = r["pid"].as_i64().unwrap();
    loop {
        let s = ch
            .command(
                &json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
                Duration::from_secs(10),
            )
            .unwrap();
        if s["exited"].as_bool() == Some(true) {
            assert_eq!(s["exitcode"], 0);
            return t.elapsed();
        }
        std::thread::sleep(poll);
    }
}

/// The same guest agent channel without agentvm-guest's socket: `Guest` then serves
/// everything through qemu-guest-agent (the fallback path), for a same-run baseline.
struct QemuGaOnly<'a, C: AgentChannel + ?Sized>(&'a C);

impl<C: AgentChannel + ?Sized> AgentChannel for QemuGaOnly<'_, C> {
    fn vm_name(&self) -> &str {
        self.0.vm_name()
    }
    fn command(
        &self,
        command: &serde_json::Value,
        timeout: Duration,
    ) -> agentvm_backend::Result<serde_json::Value> {
        self.0.command(command, timeout)
    }
}

fn bench_exec(vm: &EphemeralVm<'_>, n: usize) -> Vec<Row> {
    let ch = vm.agent().unwrap();
    let g = Guest::new(&*ch);
    let ga_only = QemuGaOnly(&*ch);
    let ga = Guest::new(&ga_only);
    let (mut ours, mut fallback, mut raw, mut chain, mut ping, mut own_ping) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let req = ExecRequest::new("/bin/true", Vec::<String>::new());
    // Warm the guest's page cache for every path first.
    let first = g.exec(&req, &mut |_, _| {}).unwrap();
    assert_eq!(first.served_by, agentvm_backend::ServedBy::AgentvmGuest);
    ga.exec(&req, &mut |_, _| {}).unwrap();
    raw_exec_true(&*ch, Duration::from_millis(5));
    let own = g.agent().expect("agentvm-guest answers");
    for _ in 0..n {
        let t = Instant::now();
        let out = g.exec(&req, &mut |_, _| {}).unwrap();
        assert!(out.success());
        ours.push(t.elapsed());
        let t = Instant::now();
        let out = ga.exec(&req, &mut |_, _| {}).unwrap();
        assert!(out.success());
        assert_eq!(out.served_by, agentvm_backend::ServedBy::QemuGuestAgent);
        fallback.push(t.elapsed());
        raw.push(raw_exec_true(&*ch, Duration::from_millis(5)));
        chain.push(raw_exec_chain(&*ch, Duration::from_millis(5)));
        let t = Instant::now();
        g.ping().unwrap();
        ping.push(t.elapsed());
        let t = Instant::now();
        own.ping().unwrap();
        own_ping.push(t.elapsed());
    }
    // 20 MiB into the guest and back, through each agent, alternated.
    let data: Vec<u8> = (0..20u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (mut w_own, mut r_own, mut w_ga, mut r_ga) = (vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        let t = Instant::now();
        g.write_file("/root/bench.bin", &data).unwrap();
        w_own.push(t.elapsed());
        let t = Instant::now();
        assert!(g.read_file("/root/bench.bin", 21 << 20).unwrap() == data);
        r_own.push(t.elapsed());
        let t = Instant::now();
        ga.write_file("/root/bench.bin", &data).unwrap();
        w_ga.push(t.elapsed());
        let t = Instant::now();
        assert!(ga.read_file("/root/bench.bin", 21 << 20).unwrap() == data);
        r_ga.push(t.elapsed());
    }
    let row = |what: &str, xs: Vec<Duration>| Row {
        what: what.into(),
        total: summary(xs),
        restore: None,
        agent: None,
        clock: None,
    };
    vec![
        row("Guest::exec(/bin/true) through agentvm-guest", ours),
        row(
            "Guest::exec(/bin/true) through qemu-guest-agent (fallback)",
            fallback,
        ),
        row("baseline: raw guest-exec + status (5 ms poll)", raw),
        row("raw setsid+sh+true chain (5 ms poll)", chain),
        row("agentvm-guest ping", own_ping),
        row("guest-ping through libvirt", ping),
        row("write 20 MiB through agentvm-guest", w_own),
        row("write 20 MiB through qemu-guest-agent", w_ga),
        row("read 20 MiB through agentvm-guest", r_own),
        row("read 20 MiB through qemu-guest-agent", r_ga),
    ]
}

/// Boots, and parks with its strategy, a VM through `backend` (a pool VM's path).
fn boot<'a>(backend: &'a LibvirtBackend, tag: &str, memory_mib: u64) -> EphemeralVm<'a> {
    let name = format!("agentvm-bench-{tag}-{}", std::process::id());
    let owner = Owner {
        kind: agentvm_backend::OwnerKind::Benchmark,
        name: tag.into(),
        spec_hash: String::new(),
        generation: 0,
    };
    let req = VmRequest {
        memory_mib,
        ..request(&name, owner)
    };
    let vm = EphemeralVm::create(backend, &req).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    let golden = vm.golden();
    eprintln!(
        "{name}: {memory_mib} MiB, boot {:.1}s, park ({}) {:.2}s",
        vm.report.boot.as_secs_f64(),
        golden.strategy.kind_name(),
        golden.park_time.as_secs_f64()
    );
    vm
}

trait KindName {
    fn kind_name(self) -> &'static str;
}
impl KindName for ResetStrategy {
    fn kind_name(self) -> &'static str {
        match self.kind() {
            agentvm_backend::golden::GoldenKind::InternalSnapshot => "internal snapshot",
            agentvm_backend::golden::GoldenKind::SavedMemory => "save",
        }
    }
}

fn main() {
    let cycles = env_usize("AGENTVM_BENCH_CYCLES", 5).max(1);
    let execs = env_usize("AGENTVM_BENCH_EXECS", 20).max(1);
    let small = env_usize("AGENTVM_BENCH_SMALL_MIB", 256) as u64;
    let lv = Libvirt::connect(&Libvirt::default_uri())
        .unwrap_or_else(|e| panic!("libvirt must be running: {e}"));
    let snapshots = backend(ResetStrategy::SnapshotLoadvm);
    let saved = backend(ResetStrategy::SavedMemory);
    let by_strategy = |s: ResetStrategy| match s.kind() {
        agentvm_backend::golden::GoldenKind::InternalSnapshot => &snapshots,
        agentvm_backend::golden::GoldenKind::SavedMemory => &saved,
    };
    let only_exec = std::env::var("AGENTVM_BENCH_ONLY").as_deref() == Ok("exec");
    let mut rows = Vec::new();
    let exec_rows;
    if only_exec {
        let vm = boot(&snapshots, "exec", 512);
        exec_rows = bench_exec(&vm, execs);
        vm.teardown().unwrap();
        print_rows("Guest exec round trip", &exec_rows);
        return;
    }
    {
        let vm = boot(&snapshots, "snap", 512);
        rows.push(bench_strategy(
            &vm,
            ResetStrategy::SnapshotLoadvm,
            cycles,
            "snapshot-loadvm (default), 512 MiB",
        ));
        rows.push(bench_strategy(
            &vm,
            ResetStrategy::SnapshotRevert,
            cycles,
            "snapshot-revert (libvirt API), 512 MiB",
        ));
        rows.push(bench_virsh_revert(&vm, cycles));
        exec_rows = bench_exec(&vm, execs);
        vm.teardown().unwrap();
    }
    {
        let vm = boot(&saved, "saved", 512);
        rows.push(bench_strategy(
            &vm,
            ResetStrategy::SavedMemory,
            cycles,
            "saved-memory, 512 MiB",
        ));
        vm.teardown().unwrap();
    }
    if small > 0 {
        for strategy in [ResetStrategy::SnapshotLoadvm, ResetStrategy::SavedMemory] {
            let vm = boot(by_strategy(strategy), "small", small);
            rows.push(bench_strategy(
                &vm,
                strategy,
                cycles,
                &format!("{strategy}, {small} MiB"),
            ));
            vm.teardown().unwrap();
        }
    }
    println!(
        "\nagentvm reset benchmark: libvirt {}, accelerator {}, times in ms",
        lv.version().unwrap_or_default(),
        common::accel().as_str()
    );
    print_rows(
        "Reset to golden state (total = until the guest agent answers , the RNG is reseeded and the clock set)",
        &rows,
    );
    print_rows("Guest exec round trip", &exec_rows);
}
