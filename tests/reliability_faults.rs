//! Faults, end to end with real VMs (`qemu:///system`, TCG), one pool shared by the cases:
//! - `kill -9` of the controller while it creates a pool VM: the restarted controller
//!   removes the half-made VM (no golden state) and builds the pool again;
//! - `kill -9` of the controller while runs are queued and running: every run ends exactly
//!   once (the one in flight `ControllerRestarted`, the queued ones run by the new process);
//! - a VM's QEMU process killed (SIGKILL) under a run: the run ends `Failed`/`VmLost` and
//!   the VM is replaced;
//! - the guest agents stopped (SIGSTOP) inside the guest under a run: the run ends
//!   `TimedOut`/`GuestUnresponsive` at its timeout and the VM is replaced;
//! - a VM destroyed by hand (`virsh destroy`) while it is reset after a run: replaced within
//!   20 s.
//!
//! After each: the pool is Ready, and libvirt's domains, the pool's status and the VM
//! directories (overlays, saved states) are the same set — nothing orphaned. (`kill -9`
//! during a run and after a steady pool: `controller_runs.rs`, `controller_libvirt.rs`.)
//! Fails (never skips) without libvirt or the default image.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// The QEMU process of domain `vm` (libvirt's pid file).
fn qemu_pid(vm: &str) -> i32 {
    let path = format!("/run/libvirt/qemu/{vm}.pid");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn kill(pid: i32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args(["-s", signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -s {signal} {pid}");
}

/// Waits (up to `within`) for `run` to end with `outcome` (phase, reason), printing how long
/// after `since` it ended, then for the pool of 2 to be consistent again without the run's VM
/// (replaced, not reused). Returns that VM.
fn run_ends_and_its_vm_is_replaced(
    env: &Env,
    pool: &str,
    (run, within): (&str, Duration),
    outcome: (&str, &str),
    since: Instant,
) -> String {
    let s = wait_run_ended(env, run, within);
    let vm = s["vm"].as_str().unwrap().to_string();
    assert_eq!(s["phase"], outcome.0, "{s}");
    assert_eq!(s["reason"], outcome.1, "{s}");
    eprintln!(
        "{run}: run {}/{} {:.1}s later: {}",
        outcome.0,
        outcome.1,
        since.elapsed().as_secs_f64(),
        s["conditions"]
    );
    wait_consistent(env, pool, 2, Duration::from_secs(300));
    assert!(
        !domains_with_prefix(&env.domain_prefix).contains(&vm),
        "{vm} was not replaced"
    );
    vm
}

fn wait_run_ended(env: &Env, run: &str, timeout: Duration) -> serde_json::Value {
    env.wait(&format!("{run} ended"), timeout, || {
        run_terminal(&run_phase(env, run))
    });
    env.status("run", run)
}

#[test]
fn controller_kills_qemu_kills_and_a_stopped_agent_leave_no_orphans_and_lose_no_runs() {
    require_libvirt_and_image();
    let mut env = Env::new("faults");
    let pid = std::process::id();
    let pool = format!("e2efault{pid}");
    let image = format!("e2e-fimg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    let file = env.specs().join("pool.yaml");
    std::fs::write(&file, small_pool(&pool, &image, 1, 2, "")).unwrap();
    env.start_controller();
    let t = env.wait("pool Ready", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 1)
    });
    eprintln!("pool Ready after {:.1}s", t.as_secs_f64());
    wait_consistent(&env, &pool, 1, Duration::from_secs(60));

    // 1. kill -9 while the controller creates a VM (scale to 2; kill once the second domain
    //    is defined, i.e. during its boot, before it is parked).
    let before = domains_with_prefix(&env.domain_prefix);
    std::fs::write(&file, small_pool(&pool, &image, 2, 2, "")).unwrap();
    env.wait("a second domain defined", Duration::from_secs(120), || {
        domains_with_prefix(&env.domain_prefix).len() > before.len()
    });
    let half_made: Vec<String> = domains_with_prefix(&env.domain_prefix)
        .into_iter()
        .filter(|d| !before.contains(d))
        .collect();
    env.kill_controller();
    eprintln!("killed the controller while it created {half_made:?}");
    env.start_controller();
    let t = Instant::now();
    wait_consistent(&env, &pool, 2, Duration::from_secs(300));
    let now = domains_with_prefix(&env.domain_prefix);
    eprintln!(
        "after kill -9 mid-creation: consistent with {now:?} in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    assert!(
        env.log().contains("no golden state") || half_made.iter().all(|d| now.contains(d)),
        "the half-made VM was neither removed nor finished"
    );

    // 2. kill -9 with runs queued and one running: every run ends exactly once.
    let names: Vec<String> = (0..6).map(|i| format!("q-{i}")).collect();
    let docs: Vec<String> = names
        .iter()
        .map(|n| sh_run(n, &pool, &format!("echo {n}; sleep 3"), ""))
        .collect();
    apply_yaml(&env, "queued.yaml", &docs.join("---\n"));
    env.wait("a queued run Running", Duration::from_secs(60), || {
        all_runs(&env)
            .iter()
            .any(|r| r["status"]["phase"] == "Running")
    });
    env.kill_controller();
    env.start_controller();
    env.wait("every queued run ended", Duration::from_secs(300), || {
        names.iter().all(|n| run_terminal(&run_phase(&env, n)))
    });
    let mut outcomes = Vec::new();
    for n in &names {
        let s = env.status("run", n);
        let (phase, reason) = (
            s["phase"].as_str().unwrap().to_string(),
            s["reason"].as_str().unwrap_or("").to_string(),
        );
        assert!(
            phase == "Succeeded" || (phase == "Failed" && reason == "ControllerRestarted"),
            "{n}: {s}"
        );
        if phase == "Succeeded" {
            assert_eq!(s["stdoutTail"], format!("{n}\n"), "{n}: {s}");
        }
        outcomes.push(format!("{n}={phase}/{reason}"));
    }
    eprintln!("after kill -9 with queued runs: {outcomes:?}");
    assert!(outcomes.iter().any(|o| o.contains("ControllerRestarted")));
    assert!(outcomes.iter().filter(|o| o.contains("Succeeded")).count() >= 4);
    wait_consistent(&env, &pool, 2, Duration::from_secs(180));

    // 3. QEMU killed under a run.
    apply_yaml(
        &env,
        "qemu.yaml",
        &sh_run("qemu-killed", &pool, "echo up; sleep 600", ""),
    );
    env.wait("qemu-killed Running", Duration::from_secs(60), || {
        run_phase(&env, "qemu-killed") == "Running"
    });
    std::thread::sleep(Duration::from_secs(2));
    let vm = env.status("run", "qemu-killed")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    kill(qemu_pid(&vm), "KILL");
    let t = Instant::now();
    let lost = run_ends_and_its_vm_is_replaced(
        &env,
        &pool,
        ("qemu-killed", Duration::from_secs(120)),
        ("Failed", "VmLost"),
        t,
    );
    assert_eq!(lost, vm);
    eprintln!(
        "QEMU killed: VM replaced, pool consistent {:.1}s after the kill",
        t.elapsed().as_secs_f64()
    );

    // 4. The guest agents stopped (SIGSTOP: they neither answer nor get restarted by init):
    //    agentvm-guest, which runs the program, and qemu-ga, the fallback.
    let stop = "for p in /proc/[0-9]*; do case \"$(cat $p/comm 2>/dev/null)\" in qemu-ga|agentvm-guest) kill -STOP ${p#/proc/};; esac; done; sleep 600";
    apply_yaml(
        &env,
        "agent.yaml",
        &sh_run("agent-stopped", &pool, stop, "  timeoutSeconds: 30\n"),
    );
    let t = Instant::now();
    run_ends_and_its_vm_is_replaced(
        &env,
        &pool,
        ("agent-stopped", Duration::from_secs(240)),
        ("TimedOut", "GuestUnresponsive"),
        t,
    );
    // timeoutSeconds is hard: within 30 s + 15 s of its start the run has ended.
    let s = env.status("run", "agent-stopped");
    let ran = status_time(&s["finishedAt"])
        .duration_since(status_time(&s["startedAt"]))
        .unwrap();
    eprintln!(
        "agent stopped: started to finished {:.1}s",
        ran.as_secs_f64()
    );
    assert!(ran <= Duration::from_secs(45), "ran {ran:?}: {s}");

    // 5. A VM destroyed by hand while it is being reset after a run: the reset gives up at
    //    once (the domain is not running) and the pool starts a replacement within seconds
    //    (it used to wait out the guest agent's boot timeout, two minutes).
    wait_consistent(&env, &pool, 2, Duration::from_secs(300));
    apply_yaml(
        &env,
        "reset.yaml",
        &sh_run("reset-destroyed", &pool, "echo done", ""),
    );
    let s = wait_run_ended(&env, "reset-destroyed", Duration::from_secs(120));
    assert_eq!(s["phase"], "Succeeded", "{s}");
    let vm = s["vm"].as_str().unwrap().to_string();
    let (ok, out) = virsh(&["destroy", &vm]);
    assert!(ok, "virsh destroy {vm}: {out}");
    let t = Instant::now();
    env.wait(
        "a replacement of the VM destroyed mid-reset",
        Duration::from_secs(300),
        || !vm_names(&env.status("pool", &pool)).contains(&vm),
    );
    let replaced = t.elapsed();
    wait_consistent(&env, &pool, 2, Duration::from_secs(300));
    eprintln!(
        "VM destroyed mid-reset: replacement started {:.1}s after the destroy, pool consistent after {:.1}s",
        replaced.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    assert!(
        replaced <= Duration::from_secs(20),
        "the VM destroyed mid-reset was replaced only after {replaced:?}"
    );
    assert!(
        !domains_with_prefix(&env.domain_prefix).contains(&vm),
        "{vm} is still defined"
    );

    // The pool still serves runs.
    apply_yaml(&env, "after.yaml", &sh_run("after", &pool, "echo fine", ""));
    let s = wait_run_ended(&env, "after", Duration::from_secs(120));
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["stdoutTail"], "fine\n");
}
