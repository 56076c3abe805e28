//! Tier 3: guest execution limits, golden-state reset and domain statistics against real QEMU
//! (TCG) through `qemu:///system`. These tests fail (never skip) when libvirt or the guest
//! image is missing. VMs are named `agentvm-t3-<test>-<pid>` and torn down by drop guards.
//!
//! Boots are expensive under TCG (~10 s), so one VM serves several checks where sharing does
//! not weaken them; the reset tests boot one VM per kind of golden state.

use std::time::{Duration, Instant};

use agentvm_backend::golden::ResetStrategy;
use agentvm_backend::guest::{ExecRequest, Guest, DEFAULT_OUTPUT_CAP};
use agentvm_backend::vm::default_state_dir;
use agentvm_backend::VmRequest;
use agentvm_backend::{Backend, BackendError, EphemeralVm, Libvirt, LibvirtBackend, Owner};
use sha2::{Digest, Sha256};

mod common;
use common::{backend, libvirt, request};

/// Disk of the reset tests' VMs, GiB: larger than the image's 2 GiB, so every reset shows
/// whether the VM keeps its own size.
const RESET_DISK_GIB: u64 = 3;

/// The guest sees a `gib` disk and its root file system fills it (grown at boot), and the
/// host's overlay has that virtual size.
fn assert_disk_size<C: agentvm_backend::AgentChannel + ?Sized>(
    g: &Guest<'_, C>,
    overlay: &std::path::Path,
    gib: u64,
) {
    let bytes = gib << 30;
    let sectors: u64 = sh(g, "cat /sys/block/vda/size").parse().unwrap();
    assert_eq!(sectors * 512, bytes, "the guest's disk");
    // ext4 keeps a little for itself (journal, group descriptors, inode tables).
    let fs_kib: u64 = sh(g, "df -k / | awk 'NR==2 {print $2}'").parse().unwrap();
    assert!(
        fs_kib * 1024 > bytes / 100 * 95 && fs_kib * 1024 <= bytes,
        "root file system of {fs_kib} KiB on a {gib} GiB disk"
    );
    assert_eq!(
        agentvm_backend::vm::disk_virtual_size(overlay).unwrap(),
        bytes,
        "virtual size of {}",
        overlay.display()
    );
}

fn owner(test: &str) -> Owner {
    Owner {
        kind: agentvm_backend::OwnerKind::Test,
        name: test.into(),
        spec_hash: String::new(),
        generation: 0,
    }
}

fn vm_name(test: &str) -> String {
    format!("agentvm-t3-{test}-{}", std::process::id())
}

fn sh<C: agentvm_backend::AgentChannel + ?Sized>(g: &Guest<'_, C>, script: &str) -> String {
    let out = g
        .exec(&ExecRequest::new("sh", ["-c", script]), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("running {script:?}: {e}"));
    assert_eq!(
        out.exit_code,
        Some(0),
        "{script:?}: stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How many guest processes have `marker` as an argument. The pattern is written with a
/// bracket so the `grep` doing the counting does not match itself.
fn processes_with_arg<C: agentvm_backend::AgentChannel + ?Sized>(
    g: &Guest<'_, C>,
    marker: &str,
) -> usize {
    let (head, last) = marker.split_at(marker.len() - 1);
    let script = format!(
        "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n' | grep -cx '{head}[{last}]' || true"
    );
    sh(g, &script).parse().unwrap()
}

#[test]
fn large_files_timeouts_output_cap_stats_and_a_stopped_agent() {
    let backend = backend(ResetStrategy::default());
    let name = vm_name("limits");
    let req = VmRequest {
        park: false,
        ..request(&name, owner("limits"))
    };
    let vm = EphemeralVm::create(&backend, &req).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    let agent = vm.agent().unwrap();
    let g = Guest::new(&*agent);

    // A large file in and out: 20 MiB of pseudo-random bytes, checked in the guest and back.
    let mut data = Vec::with_capacity(20 << 20);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < 20 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let want = format!("{:x}", Sha256::digest(&data));
    let t = Instant::now();
    g.write_file("/root/big.bin", &data).unwrap();
    let write_time = t.elapsed();
    let got = sh(&g, "sha256sum /root/big.bin");
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()));
    let t = Instant::now();
    let back = g.read_file("/root/big.bin", 64 << 20).unwrap();
    eprintln!(
        "20 MiB: write {:.2}s, read {:.2}s",
        write_time.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert!(back == data, "file read back differs");
    let too_small = g.read_file("/root/big.bin", 1 << 20).unwrap_err();
    assert!(
        matches!(too_small, BackendError::Protocol { .. }),
        "{too_small}"
    );

    // Statistics: a disk write raises block_wr_bytes, burning CPU raises cpu_time.
    let s0 = backend.vm_stats(&name).unwrap();
    sh(
        &g,
        "dd if=/dev/zero of=/root/blob bs=1M count=16 conv=fsync 2>/dev/null",
    );
    let s1 = backend.vm_stats(&name).unwrap();
    assert!(
        s1.block_wr_bytes >= s0.block_wr_bytes + (16 << 20),
        "{s0:?} -> {s1:?}"
    );
    let out = g
        .exec(
            &ExecRequest::new(
                "python3",
                ["-c", "import time\nwhile time.process_time() < 2: pass"],
            ),
            &mut |_, _| {},
        )
        .unwrap();
    assert!(out.success(), "{out:?}");
    let s2 = backend.vm_stats(&name).unwrap();
    assert!(
        s2.cpu_time_ns >= s1.cpu_time_ns + 1_500_000_000,
        "2 s of guest CPU: {} -> {} ns",
        s1.cpu_time_ns,
        s2.cpu_time_ns
    );
    assert!(s2.memory_rss_bytes.unwrap_or(0) > 0, "{s2:?}");
    assert!(s2.memory_actual_bytes.unwrap_or(0) >= 256 << 20, "{s2:?}");
    let usage = s2.cpu_usage_since(&s1).unwrap();
    assert!(usage > 0.3, "cpu usage {usage}");

    // `while True: pass` is killed at its timeout, and the process is gone.
    let mut req = ExecRequest::new("", ["spin-marker-4711"]);
    req.timeout = Duration::from_secs(3);
    let t = Instant::now();
    let out = g
        .run_script("python3", "while True:\n    pass\n", req, &mut |_, _| {})
        .unwrap();
    let took = t.elapsed();
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.signal, Some(9), "{out:?}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "{took:?}"
    );
    assert_eq!(processes_with_arg(&g, "spin-marker-4711"), 0);

    // 100 MB of output is capped at the default 10 MiB; the host keeps only the cap.
    let mut live = 0usize;
    let out = g
        .exec(
            &ExecRequest::new("sh", ["-c", "head -c 100000000 /dev/zero; echo done >&2"]),
            &mut |_, d| live += d.len(),
        )
        .unwrap();
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout.len(), DEFAULT_OUTPUT_CAP);
    assert_eq!(live, DEFAULT_OUTPUT_CAP + out.stderr.len());
    assert!(out.stdout_total >= 100_000_000, "{}", out.stdout_total);
    assert!(out.stdout_truncated());
    assert_eq!(out.stderr, b"done\n");
    assert!(!out.stderr_truncated());

    // Programs run through agentvm-guest; qemu-ga stays for liveness and as a fallback.
    assert_eq!(
        g.exec(
            &ExecRequest::new("true", Vec::<String>::new()),
            &mut |_, _| {}
        )
        .unwrap()
        .served_by,
        agentvm_backend::ServedBy::AgentvmGuest
    );
    let pid_of = |comm: &str| -> u32 {
        let out = sh(
            &g,
            &format!("for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = {comm} ] && echo ${{p#/proc/}}; done; true"),
        );
        out.lines()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or_else(|| panic!("no {comm} pid in {out:?}"))
    };
    // qemu-ga stopped: liveness fails typed, programs still run through agentvm-guest.
    let qga = pid_of("qemu-ga");
    sh(&g, &format!("kill -STOP {qga}"));
    let t = Instant::now();
    let err = g.ping().unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::GuestAgentUnavailable { .. } | BackendError::Timeout { .. }
        ),
        "{err}"
    );
    eprintln!("stopped qemu-ga detected in {:?}", t.elapsed());
    assert_eq!(sh(&g, "echo still"), "still");
    // agentvm-guest stopped as well: a typed error within a bounded time, no hang.
    let own = pid_of("agentvm-guest");
    sh(
        &g,
        &format!("setsid sh -c 'sleep 1; kill -STOP {own}' >/dev/null 2>&1 </dev/null &"),
    );
    std::thread::sleep(Duration::from_secs(3));
    let t = Instant::now();
    let err = g
        .exec(
            &ExecRequest::new("true", Vec::<String>::new()),
            &mut |_, _| {},
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BackendError::GuestAgentUnavailable { .. } | BackendError::Timeout { .. }
        ),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(40),
        "typed errors took {:?}",
        t.elapsed()
    );
    eprintln!("stopped agents detected in {:?}", t.elapsed());

    let dir = vm.files().dir.clone();
    vm.teardown().unwrap();
    assert!(!dir.exists());
}

/// Dirty the guest (file on disk, file in tmpfs, background process), reset with `strategy`,
/// and check all three are gone and the agent answers with a current clock.
fn dirty_then_reset(vm: &EphemeralVm<'_>, strategy: ResetStrategy, round: u32) {
    let agent = vm.agent().unwrap();
    let g = Guest::new(&*agent);
    let marker = format!("bg-{}-{round}", strategy.as_str());
    sh(
        &g,
        &format!(
            "echo dirty > /root/marker && echo dirty > /tmp/marker && \
             setsid python3 -c 'import time; time.sleep(100000)' {marker} \
             >/dev/null 2>&1 </dev/null &"
        ),
    );
    assert_eq!(sh(&g, "cat /root/marker /tmp/marker"), "dirty\ndirty");
    assert_eq!(
        sh(&g, "grep ' /tmp ' /proc/mounts | cut -d' ' -f3"),
        "tmpfs"
    );
    assert_eq!(
        processes_with_arg(&g, &marker),
        1,
        "background process runs"
    );

    let report = vm
        .reset_with(strategy)
        .unwrap_or_else(|e| panic!("reset with {strategy}: {e}"));
    eprintln!("{strategy} round {round}: {report:?}");

    let agent = vm.agent().unwrap();
    let g = Guest::new(&*agent);
    g.ping().unwrap();
    assert_disk_size(&g, &vm.files().disk(), RESET_DISK_GIB);
    assert_eq!(
        sh(
            &g,
            "for f in /root/marker /tmp/marker; do [ -e $f ] && echo $f; done; true"
        ),
        "",
        "files written before the reset are gone"
    );
    assert_eq!(processes_with_arg(&g, &marker), 0, "process is gone");
    assert_eq!(
        sh(&g, "cat /root/golden-file"),
        "golden",
        "warm-up state survives"
    );
    assert_eq!(
        sh(
            &g,
            "ls /sys/bus/virtio/drivers/virtio_balloon | grep -c '^virtio'"
        ),
        "1",
        "the balloon driver (free page reporting) is bound after the reset"
    );
    assert_eq!(
        sh(
            &g,
            "cat /sys/module/page_reporting/parameters/page_reporting_order"
        ),
        agentvm_backend::lean::REPORTING_ORDER.to_string(),
        "the guest reports small free blocks after the reset"
    );
    assert!(report.clock_synced, "{report:?}");
    let guest_now: i64 = sh(&g, "date +%s").parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now} vs host {host_now}"
    );
}

fn warmup() -> Vec<ExecRequest> {
    vec![
        ExecRequest::new("python3", ["-c", "import os, sys"]),
        ExecRequest::new("sh", ["-c", "echo golden > /root/golden-file"]),
    ]
}

/// Boots test `test`'s VM (a [`RESET_DISK_GIB`] disk) through `backend`, warms it up and
/// parks it with the backend's strategy: a pool VM's path.
fn park<'a>(backend: &'a LibvirtBackend, test: &str) -> (String, EphemeralVm<'a>) {
    let name = vm_name(test);
    let req = VmRequest {
        disk_gib: Some(RESET_DISK_GIB),
        warmup: warmup(),
        ..request(&name, owner(test))
    };
    let vm = EphemeralVm::create(backend, &req)
        .unwrap_or_else(|e| panic!("booting and parking {name}: {e}"));
    (name, vm)
}

fn assert_cleaned_up(lv: &Libvirt, name: &str, dir: &std::path::Path) {
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(lv.domain_state(name).unwrap_err().is_not_found());
    let snapshot_meta = std::path::Path::new("/var/lib/libvirt/qemu/snapshot").join(name);
    assert!(!snapshot_meta.exists(), "{}", snapshot_meta.display());
}

#[test]
fn snapshot_resets_clear_disk_tmpfs_and_processes_with_loadvm_and_libvirt_revert() {
    let lv = libvirt();
    let backend = backend(ResetStrategy::SnapshotLoadvm);
    let (name, vm) = park(&backend, "reset-snap");
    let xml = lv
        .raw()
        .lookup_domain_by_name(&name)
        .and_then(|d| d.xml_desc(0))
        .unwrap();
    assert!(
        agentvm_backend::lean::has_free_page_reporting(&xml),
        "the balloon reports free pages: {xml}"
    );
    eprintln!(
        "boot {:?}, warm-up {:?}, park {:?}",
        vm.report.boot,
        vm.report.warmup,
        vm.golden().park_time
    );
    dirty_then_reset(&vm, ResetStrategy::SnapshotLoadvm, 1);
    dirty_then_reset(&vm, ResetStrategy::SnapshotLoadvm, 2);
    dirty_then_reset(&vm, ResetStrategy::SnapshotRevert, 3);
    dirty_then_reset(&vm, ResetStrategy::SnapshotLoadvm, 4);
    let wrong = vm.reset_with(ResetStrategy::SavedMemory).unwrap_err();
    assert!(matches!(wrong, BackendError::Protocol { .. }), "{wrong}");

    let dir = vm.files().dir.clone();
    vm.teardown().unwrap();
    assert_cleaned_up(&lv, &name, &dir);
}

#[test]
fn saved_memory_resets_clear_disk_tmpfs_and_processes() {
    let lv = libvirt();
    let backend = backend(ResetStrategy::SavedMemory);
    let (name, vm) = park(&backend, "reset-saved");
    let golden = vm.golden().clone();
    assert!(golden.save_file().exists() && golden.golden_disk().exists());
    dirty_then_reset(&vm, ResetStrategy::SavedMemory, 1);
    dirty_then_reset(&vm, ResetStrategy::SavedMemory, 2);

    let dir = vm.files().dir.clone();
    drop(vm); // the drop guard cleans up just like teardown
    assert_cleaned_up(&lv, &name, &dir);
}

/// Wall time of one raw `guest-exec` of `path args` (stdin `input`) polled to its exit, which
/// must be 0: the unit a reset's guest step costs.
fn timed_exec(
    agent: &dyn agentvm_backend::AgentChannel,
    path: &str,
    args: &[String],
    input: &[u8],
) -> Duration {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(input);
    let t = Instant::now();
    let r = agent
        .command(
            &serde_json::json!({"execute": "guest-exec", "arguments": {
                "path": path, "arg": args, "input-data": b64, "capture-output": true}}),
            Duration::from_secs(10),
        )
        .unwrap();
    loop {
        let st = agent
            .command(
                &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": r["pid"]}}),
                Duration::from_secs(10),
            )
            .unwrap();
        if st["exited"] == true {
            assert_eq!(st["exitcode"], 0, "{path}: {st}");
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 16 bytes from the guest kernel's CRNG, hex (Python's `os.urandom` is `getrandom(2)`).
fn guest_random<C: agentvm_backend::AgentChannel + ?Sized>(g: &Guest<'_, C>) -> String {
    let out = g
        .exec(
            &ExecRequest::new("python3", ["-c", "import os; print(os.urandom(16).hex())"]),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn every_reset_reseeds_the_guest_rng_on_a_cpu_without_rdrand() {
    let lv = libvirt();
    let backend = backend(ResetStrategy::SnapshotLoadvm);
    let name = vm_name("reseed");
    let warmup = vec![
        ExecRequest::new("sh", ["-c", "! grep -qw -e rdrand -e rdseed /proc/cpuinfo"]),
        // Park with a fresh CRNG seed and an uptime past 30 s, so the kernel's own periodic
        // reseed (due when the seed is older than half the uptime, at most 60 s) cannot fall
        // between a reset and the program below: without agentvm's reseed, every reset would
        // hand out exactly the same CRNG state.
        ExecRequest::new(
            "sh",
            [
                "-c",
                "while [ $(cut -d. -f1 /proc/uptime) -lt 30 ]; do sleep 1; done",
            ],
        ),
        ExecRequest::new(
            "python3",
            [
                "-c",
                "import fcntl, os; fcntl.ioctl(os.open('/dev/urandom', os.O_WRONLY), 0x5207)",
            ],
        ),
    ];
    let req = VmRequest {
        // No hardware RNG in the guest's CPU: nothing but agentvm's reseed can tell two
        // resets apart (the kernel mixes RDRAND/RDSEED output in where the CPU has them).
        disabled_cpu_features: vec!["rdrand".into(), "rdseed".into()],
        warmup,
        ..request(&name, owner("reseed"))
    };
    let vm = EphemeralVm::create(&backend, &req)
        .unwrap_or_else(|e| panic!("booting and parking {name}: {e}"));
    let agent = vm.agent().unwrap();
    let g = Guest::new(&*agent);
    let after_park = guest_random(&g);

    // Control: the same memory reset without the reseed (what a reset did before: load the
    // snapshot, wait for the agent) hands runs the same random bytes. Three loads, and two
    // of them must agree: one load can still differ on its own when the host is so loaded
    // that the guest's clock passes the kernel's own reseed deadline (uptime twice the
    // park's) before the read, or when something in the guest drew random bytes first.
    let dom = lv.raw().lookup_domain_by_name(&name).unwrap();
    let mut without_reseed = Vec::new();
    for _ in 0..3 {
        let out = dom
            .qemu_monitor_command(
                &format!("loadvm {}", agentvm_backend::golden::GOLDEN_SNAPSHOT),
                virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
            )
            .unwrap();
        assert_eq!(out.trim(), "", "loadvm");
        // The guest's agentvm-guest went back to the golden moment too: sync anew, as
        // agentvm's reset does (everything of a reset but the reseed).
        agentvm_backend::agent_conn::forget(&name);
        g.wait_ready(Duration::from_secs(60)).unwrap();
        without_reseed.push(guest_random(&g));
        let uptime = g
            .exec(&ExecRequest::new("cat", ["/proc/uptime"]), &mut |_, _| {})
            .unwrap();
        eprintln!(
            "bare load: {} at guest uptime {}",
            without_reseed.last().unwrap(),
            String::from_utf8_lossy(&uptime.stdout).trim()
        );
    }
    let repeated: Vec<&String> = without_reseed
        .iter()
        .enumerate()
        .filter(|(i, r)| without_reseed[i + 1..].contains(r))
        .map(|(_, r)| r)
        .collect();
    assert!(
        !repeated.is_empty(),
        "control: bare snapshot loads repeat the guest's random bytes: {without_reseed:?}"
    );

    // agentvm's reset: fresh host entropy in the guest's CRNG before anything runs.
    let mut with_reseed = Vec::new();
    for round in 0..3 {
        let report = vm.reset().unwrap_or_else(|e| panic!("reset {round}: {e}"));
        eprintln!("reset {round}: {report:?}");
        assert!(report.clock_synced, "{report:?}");
        with_reseed.push(guest_random(&g));
    }
    eprintln!("after park {after_park}, after resets {with_reseed:?}");
    let mut all = with_reseed.clone();
    all.push(after_park);
    all.push(repeated[0].clone());
    let distinct: std::collections::BTreeSet<&String> = all.iter().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "every reset (and the park) must give the guest new random bytes: {all:?}"
    );

    // What the reseed adds to a reset: the guest step before it (`date -s`) against the one
    // now (the Perl program that reseeds and sets the clock), alternated on the same VM.
    let (mut date, mut refresh) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let (secs, nanos) = (now.as_secs().to_string(), now.subsec_nanos().to_string());
        date.push(timed_exec(
            &*agent,
            "/bin/date",
            &["-u".into(), "-s".into(), format!("@{secs}")],
            b"",
        ));
        refresh.push(timed_exec(
            &*agent,
            "/usr/bin/perl",
            &[
                "-e".into(),
                agentvm_backend::golden::REFRESH_SCRIPT.into(),
                secs,
                nanos,
            ],
            &[7u8; agentvm_backend::golden::RESEED_BYTES],
        ));
    }
    date.sort();
    refresh.sort();
    eprintln!(
        "guest step of a reset, median of 7: date -s {:?}, reseed + clock {:?}",
        date[3], refresh[3]
    );
    vm.teardown().unwrap();
}

#[test]
fn a_fork_goes_on_from_the_snapshot_with_its_own_files_and_entropy() {
    let lv = libvirt();
    let backend = backend(ResetStrategy::SnapshotLoadvm);
    let name = vm_name("forksrc");
    let vm = EphemeralVm::create(&backend, &request(&name, owner("fork")))
        .unwrap_or_else(|e| panic!("booting {name}: {e}"));
    let src_agent = vm.agent().unwrap();
    let src = Guest::new(&*src_agent);
    // State the fork must carry over: a file on disk, one in tmpfs, a running process.
    sh(
        &src,
        "echo disk > /root/f && echo mem > /dev/shm/f && \
         (setsid sh -c 'n=0; while :; do n=$((n+1)); echo $n > /dev/shm/count; sleep 0.2; done' \
         </dev/null >/dev/null 2>&1 &)",
    );
    std::thread::sleep(Duration::from_millis(600));
    lv.create_named_snapshot(&name, "base").unwrap();
    // Changed after the snapshot: the fork must not see it.
    sh(&src, "echo later > /root/f");

    let fork = vm_name("fork");
    let _guard = common::ForkGuard(&lv, fork.clone());
    let report = lv
        .fork_domain(
            &default_state_dir(),
            &name,
            "base",
            &fork,
            &owner("fork"),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("forking {name}: {e}"));
    eprintln!("fork: {report:?}");
    assert!(report.copied_bytes > 0, "{report:?}");
    // Marked complete only now (a half-made fork is recognised and remade).
    assert_eq!(lv.domain_owner(&fork).unwrap(), Some(owner("fork")));
    let fork_agent = lv.agent(&fork).unwrap();
    let f = Guest::new(&fork_agent);
    assert_eq!(sh(&f, "cat /root/f /dev/shm/f"), "disk\nmem");
    // Its host name is its owner's; the source's stays.
    assert_eq!(sh(&f, "hostname; cat /etc/hostname"), "fork\nfork");
    assert_eq!(sh(&src, "hostname"), "agentvm");
    let a = sh(&f, "cat /dev/shm/count");
    std::thread::sleep(Duration::from_millis(1000));
    let b = sh(&f, "cat /dev/shm/count");
    assert!(
        b.parse::<u64>().unwrap() > a.parse::<u64>().unwrap(),
        "the process started before the snapshot runs on in the fork: {a} then {b}"
    );
    // Independent from here on, both ways; different random bytes.
    sh(&f, "echo fork > /root/g");
    assert_eq!(
        sh(&src, "cat /root/f; ls /root/g 2>/dev/null || true"),
        "later"
    );
    let rand = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(sh(&f, rand), sh(&src, rand));
    // No internal snapshot of the source's comes along (golden state, other snapshots).
    let fork_files = agentvm_backend::vm::VmFiles::new(&default_state_dir(), &fork);
    let info = agentvm_backend::vm::qemu_img_info(&fork_files.disk()).unwrap();
    assert!(
        info["snapshots"].as_array().is_none_or(|a| a.is_empty()),
        "{info}"
    );
    // The source is gone; the fork goes on.
    vm.teardown().unwrap();
    assert_eq!(sh(&f, "cat /root/g"), "fork");
}

/// Destroys a pool VM made through the backend, and the pool's template, however the test ends.
struct PoolGuard<'a>(&'a agentvm_backend::LibvirtBackend, Vec<String>, String);

impl Drop for PoolGuard<'_> {
    fn drop(&mut self) {
        use agentvm_backend::Backend;
        for vm in &self.1 {
            if let Err(e) = self.0.destroy_vm(vm) {
                eprintln!("destroying {vm}: {e}");
            }
        }
        if let Err(e) = self.0.remove_pool_template(&self.2) {
            eprintln!("removing the template of {}: {e}", self.2);
        }
    }
}

#[test]
fn a_pool_vm_made_from_the_template_has_the_warm_up_its_own_entropy_and_resets() {
    let pool = format!("t3tpl{}", std::process::id());
    let backend = backend(ResetStrategy::SnapshotLoadvm);
    let request = |name: &str| VmRequest {
        warmup: vec![ExecRequest::new(
            "sh",
            [
                "-c",
                "echo warm > /root/warm; setsid sleep 100000 </dev/null >/dev/null 2>&1 &",
            ],
        )],
        from_template: true,
        ..request(
            name,
            Owner {
                kind: agentvm_api::Kind::VmPool.into(),
                name: pool.clone(),
                spec_hash: "h1".into(),
                generation: 1,
            },
        )
    };
    let (first, second) = (vm_name("tpl-a"), vm_name("tpl-b"));
    let mut guard = PoolGuard(&backend, vec![first.clone()], pool.clone());
    let booted = backend.create_vm(&request(&first)).unwrap();
    assert!(!booted.from_template, "{booted:?}");
    guard.1.push(second.clone());
    let made = backend.create_vm(&request(&second)).unwrap();
    eprintln!("booted: {booted:?}\nfrom the template: {made:?}");
    assert!(made.from_template, "{made:?}");
    let listed = backend.list_vms().unwrap();
    let vm = listed.iter().find(|v| v.name == second).unwrap();
    assert!(vm.golden && !vm.edited, "{vm:?}");

    let agent = backend.agent(&second).unwrap();
    let g = Guest::new(&*agent);
    let first_agent = backend.agent(&first).unwrap();
    let f = Guest::new(&*first_agent);
    // The warm-up's file and process came along; the random bytes did not. (`grep -q`: a
    // process that exits between the glob and the read is an error grep must not count.)
    assert_eq!(
        sh(
            &g,
            "cat /root/warm; grep -qsx sleep /proc/[0-9]*/comm && echo alive"
        ),
        "warm\nalive"
    );
    let rand = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    assert_ne!(sh(&g, rand), sh(&f, rand));
    // Its own golden state: a reset takes away what a run left, and hands out new bytes.
    sh(&g, "echo run > /root/run");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..2 {
        backend.reset_vm(&second).unwrap();
        assert_eq!(
            sh(&g, "cat /root/warm; ls /root/run 2>/dev/null || true"),
            "warm"
        );
        assert!(
            seen.insert(sh(&g, rand)),
            "a reset repeated the random bytes"
        );
    }
    drop(guard);
    assert!(
        agentvm_backend::template::PoolTemplate::find(&default_state_dir(), &pool, "h1").is_none()
    );
}
