//! libvirtd restarted under a running controller, end to end with real VMs
//! (`qemu:///system`, TCG). The controller is not restarted: it reconnects by itself.
//!
//! - libvirtd restarted while the controller creates a pool VM (mid-reconcile) and while a
//!   run executes in another VM of the pool;
//! - afterwards the same controller process has the pool Ready with both VMs, nothing is
//!   orphaned (domains, pool status and VM directories agree), the run that spanned the
//!   restart ended with a phase and a reason, and a new run succeeds.
//!
//! This restarts THE SHARED libvirtd, exactly as `scripts/host-setup.sh --netns NS` starts
//! it (`ip netns exec NS libvirtd -d`), so it must run alone: no other test may use libvirt
//! meanwhile. It refuses to run unless libvirtd runs inside `$AGENTVM_TEST_NETNS` (the
//! network namespace tests use), and it starts libvirtd again there if it fails halfway.
//! It fails at once unless `AGENTVM_TEST_RESTART_LIBVIRTD=1` (set by `scripts/test.sh`, where
//! cargo runs the test binaries one after another). By hand:
//! `AGENTVM_TEST_RESTART_LIBVIRTD=1 cargo test -p agentvm --test reliability_libvirtd`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const PIDFILE: &str = "/run/libvirtd.pid";

fn netns() -> String {
    std::env::var("AGENTVM_TEST_NETNS")
        .expect("set AGENTVM_TEST_NETNS to the network namespace libvirtd runs in")
}

fn libvirtd_pid() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(PIDFILE).ok()?.trim().parse().ok()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(pid)
}

/// The netns inode of a process, e.g. `net:[4026532...]`.
fn ns_of(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .display()
        .to_string()
}

fn ns_inode(ns: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "readlink", "/proc/self/ns/net"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ip netns exec {ns}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start_libvirtd(ns: &str) {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, "libvirtd", "-d"])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip netns exec {ns} libvirtd -d failed");
    let start = Instant::now();
    while !virsh(&["version"]).0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "libvirtd did not answer after starting"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops libvirtd (SIGTERM to the pid in its pid file), waits for it to exit, starts it
/// again in namespace `ns`. Returns how long libvirt was unavailable.
fn restart_libvirtd(ns: &str) -> Duration {
    let pid = libvirtd_pid().expect("libvirtd is not running");
    let t = Instant::now();
    assert!(Command::new("kill")
        .args(["-s", "TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "libvirtd {pid} did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    start_libvirtd(ns);
    t.elapsed()
}

/// Starts libvirtd again in the test namespace if a failure left it down.
struct LibvirtdGuard(String);

impl Drop for LibvirtdGuard {
    fn drop(&mut self) {
        if libvirtd_pid().is_none() {
            eprintln!("libvirtd is down; starting it again in {}", self.0);
            let _ = Command::new("ip")
                .args(["netns", "exec", &self.0, "libvirtd", "-d"])
                .status();
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

#[test]
fn the_controller_reconnects_after_libvirtd_restarts_mid_reconcile_and_mid_run() {
    // Consent: restarting the daemon breaks every other libvirt user for a few seconds.
    assert_eq!(
        std::env::var("AGENTVM_TEST_RESTART_LIBVIRTD").as_deref(),
        Ok("1"),
        "this test restarts libvirtd: set AGENTVM_TEST_RESTART_LIBVIRTD=1 when nothing else \
         uses it (scripts/test.sh does)"
    );
    // Safety: only the libvirtd of the test namespace is ever restarted.
    let ns = netns();
    let pid = libvirtd_pid().expect("libvirtd is not running (scripts/host-setup.sh --netns)");
    assert_eq!(
        ns_of(&pid.to_string()),
        ns_inode(&ns),
        "libvirtd (pid {pid}) does not run in network namespace {ns}; refusing to restart it"
    );
    require_libvirt_and_image();
    // Declared first, dropped last: after the Env has cleaned up with libvirt.
    let _guard = LibvirtdGuard(ns.clone());
    let mut env = Env::new("libvirtd");
    let me = std::process::id();
    let pool = format!("e2elvd{me}");
    let image = format!("e2e-lvimg-{me}");
    env.domain_prefix = format!("agentvm-{pool}-");
    let file = env.specs().join("pool.yaml");
    std::fs::write(&file, small_pool(&pool, &image, 1, 3, "")).unwrap();
    env.start_controller();
    let controller_pid = env.controller.as_ref().unwrap().id();
    env.wait("pool Ready", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 1)
    });

    // A run in flight across the restart, on the first VM.
    apply_yaml(
        &env,
        "span.yaml",
        &sh_run("span", &pool, "echo before; sleep 120; echo after", ""),
    );
    env.wait("span Running", Duration::from_secs(60), || {
        run_phase(&env, "span") == "Running"
    });
    // The run holds the first VM, so the pool boots a second one to keep one ready; wait
    // until that one is parked, so the next creation is the one the restart interrupts.
    env.wait(
        "a second VM ready beside the busy one",
        Duration::from_secs(300),
        || {
            let st = env.status("pool", &pool);
            domains_with_prefix(&env.domain_prefix).len() == 2
                && st["ready"].as_u64() == Some(1)
                && st["total"].as_u64() == Some(2)
        },
    );
    // Mid-reconcile: a third VM is being created (minReady 2 with one VM busy).
    let before = domains_with_prefix(&env.domain_prefix);
    std::fs::write(&file, small_pool(&pool, &image, 2, 3, "")).unwrap();
    env.wait("a third domain defined", Duration::from_secs(120), || {
        domains_with_prefix(&env.domain_prefix).len() > before.len()
    });
    let down = restart_libvirtd(&ns);
    eprintln!(
        "libvirtd restarted; unavailable for {:.1}s",
        down.as_secs_f64()
    );

    // A VM whose boot was waiting for its agent on the old connection gives up after the
    // boot timeout (120 s) and is built again: allow for that.
    let t = Instant::now();
    wait_consistent(&env, &pool, 2, Duration::from_secs(600));
    eprintln!(
        "pool consistent with 2 ready VMs {:.1}s after the restart",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        env.controller.as_ref().unwrap().id(),
        controller_pid,
        "the controller was restarted"
    );
    assert!(
        env.controller
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "the controller exited"
    );
    assert!(
        env.log().contains("reconnecting"),
        "no reconnect in the controller log"
    );

    let s = env.status("run", "span");
    assert!(run_terminal(s["phase"].as_str().unwrap_or("")), "{s}");
    assert!(s["reason"].as_str().is_some_and(|r| !r.is_empty()), "{s}");
    eprintln!(
        "run spanning the restart: {}/{} stdout {:?}",
        s["phase"], s["reason"], s["stdoutTail"]
    );

    apply_yaml(&env, "after.yaml", &sh_run("after", &pool, "echo fine", ""));
    env.wait("after ended", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "after"))
    });
    let s = env.status("run", "after");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["stdoutTail"], "fine\n");
}
