//! Hostile guests, end to end with real VMs (`qemu:///system`, TCG): a fork bomb (ended
//! within its timeout + 15 s, whatever the guest does with the kill), a memory
//! hog driven into the guest's OOM killer, a run filling the guest's disk (the pool's
//! `diskGib: 3` on the 2 GiB image: the guest's file system is 3 GiB, the fill stops there
//! with ENOSPC, and the VM's overlay on the host stays within that size), 200 MiB on stdout
//! and 12 MiB on stderr (each stream kept up to the run's 10 MiB cap, the rest dropped and
//! counted exactly in `OutputTruncated`, which `agentvm logs` reports on stderr), and binary
//! garbage on stdout, one after another on a one-VM pool. Each is contained: the
//! run ends with a phase and a reason, the controller's API keeps answering and its resident
//! memory stays bounded (sampled after every case), captured output stays at its cap, and
//! the next run on the VM (the same VM unless the run's VM had to be replaced) finds no
//! trace of the previous one: no leftover files or processes, the disk and memory as before.
//! Fails (never skips) without libvirt or the default image.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Prints `files=<leftovers> procs=<n> disk=<used KiB> size=<size of / KiB>
/// mem=<MemAvailable KiB>`.
const PROBE: &str =
    "f=''; for p in /var/tmp/fill /root/fill /var/tmp/big; do [ -e $p ] && f=\"$f$p,\"; done\n\
    n=0; for p in /proc/[0-9]*; do n=$((n+1)); done\n\
    used=$(df -k / | awk 'NR==2 {print $3}')\n\
    size=$(df -k / | awk 'NR==2 {print $2}')\n\
    mem=$(awk '/MemAvailable/ {print $2}' /proc/meminfo)\n\
    echo \"files=$f procs=$n disk=$used size=$size mem=$mem\"";

/// The default output cap per stream (`output.maxMib: 10`), bytes.
const CAP: usize = 10 << 20;

/// The pool's disk (`diskGib`), larger than the image's 2 GiB.
const DISK_GIB: u64 = 3;

struct Probe {
    files: String,
    procs: i64,
    disk_kib: i64,
    size_kib: u64,
    mem_kib: i64,
    vm: String,
}

/// True when a root file system of `kib` fills a [`DISK_GIB`] disk (ext4 keeps 1–3 % for its
/// journal and tables).
fn fills_the_disk(kib: u64) -> bool {
    let disk_kib = DISK_GIB << 20;
    kib <= disk_kib && kib >= disk_kib / 100 * 95
}

/// Bytes the file at `path` occupies on the host (allocated blocks, not its length).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// Runs `src` to its end, timing every status call (the API must keep answering).
fn run_to_end(
    env: &Env,
    name: &str,
    pool: &str,
    src: &str,
    extra: &str,
    api: &mut Duration,
) -> serde_json::Value {
    apply_yaml(
        env,
        &format!("{name}.yaml"),
        &sh_run(name, pool, src, extra),
    );
    env.wait(&format!("{name} ended"), Duration::from_secs(600), || {
        let t = Instant::now();
        let p = run_phase(env, name);
        *api = (*api).max(t.elapsed());
        run_terminal(&p)
    });
    env.status("run", name)
}

fn probe(env: &Env, pool: &str, n: &mut u32, api: &mut Duration) -> Probe {
    *n += 1;
    let name = format!("probe-{n}");
    let s = run_to_end(env, &name, pool, PROBE, "", api);
    assert_eq!(s["phase"], "Succeeded", "{name}: {s}");
    let line = s["stdoutTail"].as_str().unwrap().trim().to_string();
    Probe {
        files: field(&line, "files").to_string(),
        procs: field(&line, "procs").parse().unwrap(),
        disk_kib: field(&line, "disk").parse().unwrap(),
        size_kib: field(&line, "size").parse().unwrap(),
        mem_kib: field(&line, "mem").parse().unwrap(),
        vm: s["vm"].as_str().unwrap().to_string(),
    }
}

#[test]
fn hostile_guests_are_contained_and_the_next_run_starts_clean() {
    require_libvirt_and_image();
    let mut env = Env::new("guests");
    let pid = std::process::id();
    let pool = format!("e2ehost{pid}");
    let image = format!("e2e-himg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    let manifest = small_pool(&pool, &image, 1, 1, "")
        .replace("diskGib: 2}", &format!("diskGib: {DISK_GIB}}}"));
    assert!(manifest.contains(&format!("diskGib: {DISK_GIB}")));
    std::fs::write(env.specs().join("pool.yaml"), manifest).unwrap();
    env.start_controller();
    let t = env.wait("pool Ready", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 1)
    });
    eprintln!("pool Ready after {:.1}s", t.as_secs_f64());
    let mut api = Duration::ZERO;
    let mut n = 0;
    let base = probe(&env, &pool, &mut n, &mut api);
    let rss_idle = controller_rss_kib(&env);
    eprintln!(
        "baseline: {} processes, {} KiB used on / of {} KiB, {} KiB available memory; controller RSS {rss_idle} KiB",
        base.procs, base.disk_kib, base.size_kib, base.mem_kib
    );
    // The guest's root file system was grown to the pool's disk at boot.
    assert!(
        fills_the_disk(base.size_kib),
        "/ is {} KiB on a {DISK_GIB} GiB disk",
        base.size_kib
    );
    let mut rss = vec![("idle".to_string(), rss_idle)];
    let mut vm = base.vm.clone();

    let cases: [(&str, &str, &str); 5] = [
        // A fork bomb (dash has no `:` functions; `b` does the same) that keeps the run
        // going until it is killed at the timeout.
        ("fork-bomb", "b() { b | b & }; b; sleep 600", "  timeoutSeconds: 30\n"),
        // Grab memory 10 MB at a time until the guest's OOM killer steps in.
        (
            "memory-hog",
            "exec python3 -c 'a=[]\nwhile True: a.append(bytearray(10**7))'",
            "  timeoutSeconds: 300\n",
        ),
        // Fill the disk until ENOSPC, then report it. The run's output goes to files on the
        // same disk, so the report is made in memory and written once 64 MiB of the fill are
        // given back (the fill file stays: the reset has to remove it).
        (
            "disk-fill",
            "dd if=/dev/zero of=/var/tmp/fill bs=1M 2>/dev/null; r=$?; s=$(df -k / | tail -1)\n\
             truncate -s -64M /var/tmp/fill; echo dd exit $r; echo \"$s\"",
            "  timeoutSeconds: 900\n",
        ),
        // 200 MiB on stdout, 12 MiB on stderr: both past the default cap of 10 MiB each.
        (
            "flood-output",
            "yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 209715200; head -c 12582912 /dev/zero >&2",
            "  timeoutSeconds: 900\n",
        ),
        // Binary garbage (every byte value, NULs and invalid UTF-8) on stdout and stderr.
        (
            "binary-garbage",
            "head -c 1048576 /dev/urandom; head -c 65536 /dev/urandom >&2",
            "  timeoutSeconds: 300\n",
        ),
    ];
    let mut report = Vec::new();
    for (name, src, extra) in cases {
        let t = Instant::now();
        // The largest the VM's overlay gets on the host while the run goes on (the pool's one
        // VM is the one the last probe ran on).
        let overlay = env.state().join("vms").join(&vm).join("disk.qcow2");
        let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let (overlay, sampling) = (overlay.clone(), sampling.clone());
            std::thread::spawn(move || {
                let mut peak = 0;
                while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(allocated_bytes(&overlay));
                    std::thread::sleep(Duration::from_millis(250));
                }
                peak
            })
        };
        let s = run_to_end(&env, name, &pool, src, extra, &mut api);
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let overlay_peak = sampler.join().unwrap();
        let took = t.elapsed();
        let phase = s["phase"].as_str().unwrap().to_string();
        let reason = s["reason"].as_str().unwrap_or("").to_string();
        assert!(!reason.is_empty(), "{name} ended without a reason: {s}");
        let tail = s["stdoutTail"].as_str().unwrap_or("");
        assert!(
            tail.len() <= 3 * 4096,
            "{name}: stdoutTail of {} bytes",
            tail.len()
        );
        // Output through the API: capped.
        let out = env.cmd(&["logs", &format!("run/{name}")]).output().unwrap();
        assert!(
            out.status.success(),
            "logs {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let logged = out.stdout.len();
        assert!(logged <= 2 * CAP, "{name}: {logged} bytes of output kept");
        let kib = controller_rss_kib(&env);
        rss.push((name.to_string(), kib));
        match name {
            "fork-bomb" => {
                assert!(
                    phase == "TimedOut" || phase == "Failed",
                    "fork bomb ended {phase}: {s}"
                );
                // timeoutSeconds is hard: the run ends within its 30 s + 15 s, whether the
                // guest carried out the kill or its VM had to be destroyed.
                let ran = status_time(&s["finishedAt"])
                    .duration_since(status_time(&s["startedAt"]))
                    .unwrap();
                eprintln!(
                    "fork bomb: started to finished {:.1}s ({reason}: {})",
                    ran.as_secs_f64(),
                    s["conditions"]
                );
                assert!(ran <= Duration::from_secs(45), "fork bomb ran {ran:?}: {s}");
            }
            "memory-hog" => assert_eq!(phase, "Failed", "memory hog: {s}"),
            "disk-fill" => {
                // dd stopped at ENOSPC on the pool's 3 GiB, not at the image's 2 GiB.
                assert!(tail.contains("dd exit 1"), "disk fill: {tail:?}");
                let df: Vec<u64> = tail
                    .lines()
                    .find(|l| l.starts_with("/dev/vda"))
                    .unwrap_or_else(|| panic!("no df line in {tail:?}"))
                    .split_whitespace()
                    .skip(1)
                    .take(3)
                    .map(|v| v.parse().unwrap())
                    .collect();
                let (size, used, avail) = (df[0], df[1], df[2]);
                eprintln!(
                    "disk fill: / of {size} KiB, {used} KiB used, {avail} KiB left; overlay peaked at {} MiB on the host",
                    overlay_peak >> 20
                );
                assert!(fills_the_disk(size), "/ is {size} KiB: {tail:?}");
                assert!(avail < 64 * 1024, "{avail} KiB still free: {tail:?}");
                assert!(used > 2 << 20, "only {used} KiB used: {tail:?}");
                // On the host: the overlay holds what the guest wrote (beyond 2 GiB of it,
                // so it was sampled while it grew) and never more than the disk, plus the
                // golden state's memory (a 512 MiB guest) stored in the same file and qcow2
                // metadata.
                assert!(
                    overlay_peak > 2 << 30,
                    "overlay {} peaked at only {overlay_peak} bytes",
                    overlay.display()
                );
                assert!(
                    overlay_peak <= (DISK_GIB << 30) + (512 << 20) + (64 << 20),
                    "overlay {} reached {overlay_peak} bytes",
                    overlay.display()
                );
            }
            "flood-output" => {
                assert_eq!(phase, "Succeeded", "{s}");
                // Exactly the cap of each stream is kept; the rest is counted, to the byte.
                assert_eq!(logged, 2 * CAP, "bytes through `agentvm logs`");
                let dropped = (200 << 20) - CAP + (12 << 20) - CAP;
                assert_eq!(
                    s["output"],
                    serde_json::json!({
                        "stdoutBytes": 200 << 20,
                        "stderrBytes": 12 << 20,
                        "droppedBytes": dropped,
                    }),
                    "{s}"
                );
                let c = s["conditions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["type"] == "OutputTruncated")
                    .unwrap_or_else(|| panic!("no OutputTruncated: {s}"));
                let message = c["message"].as_str().unwrap();
                assert_eq!(c["reason"], "OutputCapReached");
                assert!(
                    message.contains(&format!(
                        "stdout: {} of {} bytes dropped",
                        (200 << 20) - CAP,
                        200 << 20
                    )) && message.contains(&format!(
                        "stderr: {} of {} bytes dropped",
                        (12 << 20) - CAP,
                        12 << 20
                    )),
                    "{message}"
                );
                // `logs` says so on stderr, after the output; stdout stays the program's.
                let err = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    err.lines().last(),
                    Some(format!("agentvm: output truncated: {message}").as_str()),
                    "{err}"
                );
                assert!(!String::from_utf8_lossy(&out.stdout).contains("agentvm:"));
            }
            "binary-garbage" => {
                assert_eq!(phase, "Succeeded", "{s}");
                assert!(logged >= 1024 * 1024, "garbage output lost: {logged} bytes");
            }
            _ => {}
        }
        let after = probe(&env, &pool, &mut n, &mut api);
        vm.clone_from(&after.vm);
        let same_vm = after.vm == s["vm"].as_str().unwrap_or("");
        eprintln!(
            "{name}: {phase}/{reason} in {:.1}s; {logged} bytes of output kept; controller RSS {kib} KiB; next run on {} VM: files={:?} procs={} disk={} KiB mem={} KiB",
            took.as_secs_f64(),
            if same_vm { "the same" } else { "a replacement" },
            after.files,
            after.procs,
            after.disk_kib,
            after.mem_kib
        );
        report.push(format!(
            "{name}: {phase}/{reason}, same VM after: {same_vm}"
        ));
        assert_eq!(after.files, "", "{name} left files behind");
        assert!(
            fills_the_disk(after.size_kib),
            "{name}: / is {} KiB in the next run",
            after.size_kib
        );
        assert!(
            (after.procs - base.procs).abs() <= 3,
            "{name}: {} processes in the next run, {} before",
            after.procs,
            base.procs
        );
        assert!(
            (after.disk_kib - base.disk_kib).abs() <= 8 * 1024,
            "{name}: {} KiB used on / in the next run, {} before",
            after.disk_kib,
            base.disk_kib
        );
        assert!(
            after.mem_kib >= base.mem_kib - 32 * 1024,
            "{name}: {} KiB available in the next run, {} before",
            after.mem_kib,
            base.mem_kib
        );
        wait_consistent(&env, &pool, 1, Duration::from_secs(300));
    }

    eprintln!("outcomes: {report:#?}");
    eprintln!("controller RSS after each case (KiB): {rss:?}");
    eprintln!(
        "slowest API answer during the runs: {:.0} ms",
        api.as_secs_f64() * 1000.0
    );
    let max = rss.iter().map(|r| r.1).max().unwrap();
    assert!(
        max < rss_idle + 128 * 1024,
        "controller RSS reached {max} KiB (idle {rss_idle} KiB)"
    );
    assert!(
        api < Duration::from_secs(10),
        "the API took {api:?} to answer"
    );
}
