//! Faults around sandboxes, end to end with real VMs (`qemu:///system`, TCG): the controller
//! is killed (`kill -9`) in the middle of each of pause, snapshot, rollback and fork, and
//! started again. After each:
//! - the operation ends one way or the other with a clear status: the sandbox is `Paused`,
//!   the snapshot `Ready` (and in libvirt) or `Failed` (and not in libvirt), the rollback done
//!   or reported, the fork `Running` or `Failed` with a reason;
//! - nothing is lost: a file written before the fault is there, and a process started before
//!   it still runs;
//! - nothing is orphaned: libvirt's domains, the VM directories and the VMs that the pool
//!   and the sandboxes name are the same set; libvirt's snapshots of the sandbox's VM are
//!   exactly its `Ready` snapshots; a half-made fork is removed or finished.
//!
//! Then a snapshot that would take the sandbox's snapshots past `maxSnapshotMib` fails and is
//! deleted again in libvirt.
//!
//! Where the kill lands is observed, not assumed (the guest stopped for the snapshot or the
//! rollback, the fork's domain defined) and printed; a kill that came too late still has to
//! leave everything consistent. Fails (never skips) without libvirt or the default image.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::*;

const PROCESS: &str = "sleep 100000";

fn phase(env: &Env, kind: &str, name: &str) -> String {
    env.status(kind, name)["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn domstate(vm: &str) -> String {
    virsh(&["domstate", vm]).1.trim().to_string()
}

fn exec(env: &Env, name: &str, script: &str) -> (i32, String, String) {
    env.code(&["exec", &format!("sandbox/{name}"), "--", "sh", "-c", script])
}

fn exec_ok(env: &Env, name: &str, script: &str) -> String {
    let (code, out, err) = exec(env, name, script);
    assert_eq!(code, 0, "exec {script:?}: stdout {out} stderr {err}");
    out
}

/// The sandbox's file and its long-running process are both there.
fn nothing_lost(env: &Env, name: &str, file: &str, content: &str) {
    assert_eq!(exec_ok(env, name, &format!("cat {file}")), content);
    let procs = exec_ok(env, name, "cat /proc/[0-9]*/cmdline | tr '\\0' ' '");
    assert!(procs.contains(PROCESS), "{name}: `{PROCESS}` is gone");
}

/// Names of libvirt's snapshots of `vm` that agentvm took (`agentvm-snap-NAME` → NAME).
fn libvirt_snapshots(vm: &str) -> BTreeSet<String> {
    let (ok, out) = virsh(&["snapshot-list", vm, "--name"]);
    assert!(ok, "snapshot-list {vm}: {out}");
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("agentvm-snap-").map(String::from))
        .collect()
}

fn ready_snapshots(env: &Env) -> BTreeSet<String> {
    let out = env.ok(&["get", "snapshots", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let items = match v.get("items") {
        Some(items) => items.as_array().cloned().unwrap_or_default(),
        None if v.get("metadata").is_some() => vec![v],
        None => Vec::new(),
    };
    items
        .iter()
        .filter(|o| o["status"]["phase"] == "Ready")
        .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// What differs between libvirt's domains (the pool's and forks'), the VM directories and
/// the VMs named by the pool's and the sandboxes' statuses; `None` when they agree.
fn orphans(env: &Env, pool: &str, sandboxes: &[&str]) -> Option<String> {
    let mut domains: BTreeSet<String> = domains_with_prefix(&env.domain_prefix)
        .into_iter()
        .collect();
    domains.extend(domains_with_prefix("agentvm-sbx-"));
    let mut named: BTreeSet<String> = vm_names(&env.status("pool", pool)).into_iter().collect();
    for s in sandboxes {
        if let Some(vm) = env.status("sandbox", s)["vm"].as_str() {
            named.insert(vm.to_string());
        }
    }
    let dirs: BTreeSet<String> = std::fs::read_dir(env.state().join("vms"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if domains == named && domains == dirs {
        None
    } else {
        Some(format!(
            "domains {domains:?}, named by pool and sandboxes {named:?}, VM directories {dirs:?}"
        ))
    }
}

fn wait_no_orphans(env: &Env, pool: &str, sandboxes: &[&str]) {
    let mut last = None;
    let ok = Instant::now();
    while ok.elapsed() < Duration::from_secs(120) {
        last = orphans(env, pool, sandboxes);
        if last.is_none() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("orphans: {}", last.unwrap_or_default());
}

/// `agentvm ARGS` started in the background (it waits for the controller's work).
fn spawn(env: &Env, args: &[&str]) -> Child {
    env.cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls `cond` every few ms for up to `within`; whether it held.
fn observe(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Kills the controller, reaps the CLI that was waiting on it and starts a new controller.
fn kill_and_restart(env: &mut Env, cli: Option<Child>, what: &str, landed: bool) {
    env.kill_controller();
    eprintln!(
        "kill -9 during {what}: {}",
        if landed {
            "landed while it was under way"
        } else {
            "came after it had finished (still checked)"
        }
    );
    if let Some(cli) = cli {
        let out = cli.wait_with_output().unwrap();
        eprintln!(
            "  the waiting CLI: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    env.start_controller();
}

#[test]
fn kill_9_during_pause_snapshot_rollback_and_fork_loses_nothing_and_orphans_nothing() {
    require_libvirt_and_image();
    let (mut env, pool) = env_with_small_pool("sbxf", 2);
    apply_yaml(
        &env,
        "a.yaml",
        &format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: a}}\nspec:\n  poolRef: {pool}\n  idleTimeoutSeconds: 0\n"
        ),
    );
    env.wait("sandbox Running", Duration::from_secs(60), || {
        phase(&env, "sandbox", "a") == "Running"
    });
    let vm = env.status("sandbox", "a")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    exec_ok(
        &env,
        "a",
        &format!(
            "echo precious > /root/precious; sync; setsid {PROCESS} </dev/null >/dev/null 2>&1 &"
        ),
    );
    nothing_lost(&env, "a", "/root/precious", "precious\n");

    // 1. pause: the verb records spec.state and returns; the controller dies at once.
    env.ok(&["pause", "sandbox/a", "--no-wait"]);
    let landed = domstate(&vm) == "running";
    kill_and_restart(&mut env, None, "pause", landed);
    env.wait("sandbox Paused", Duration::from_secs(60), || {
        phase(&env, "sandbox", "a") == "Paused"
    });
    assert_eq!(domstate(&vm), "paused");
    env.ok(&["resume", "sandbox/a"]);
    nothing_lost(&env, "a", "/root/precious", "precious\n");
    wait_no_orphans(&env, &pool, &["a"]);

    // 2. snapshot: killed while the guest is stopped for it.
    let cli = spawn(&env, &["snapshot", "sandbox/a", "--name", "s1"]);
    let landed = observe(Duration::from_secs(30), || domstate(&vm) == "paused");
    kill_and_restart(&mut env, Some(cli), "snapshot", landed);
    env.wait("snapshot s1 settled", Duration::from_secs(120), || {
        matches!(phase(&env, "snapshot", "s1").as_str(), "Ready" | "Failed")
    });
    let s1 = env.status("snapshot", "s1");
    eprintln!("snapshot s1 after the restart: {}", s1["phase"]);
    if s1["phase"] == "Failed" {
        assert!(
            s1["conditions"].to_string().contains("reason"),
            "a failed snapshot says why: {s1}"
        );
    }
    env.wait("the sandbox runs again", Duration::from_secs(60), || {
        domstate(&vm) == "running" && phase(&env, "sandbox", "a") == "Running"
    });
    assert_eq!(libvirt_snapshots(&vm), ready_snapshots(&env));
    nothing_lost(&env, "a", "/root/precious", "precious\n");

    // 3. rollback: a snapshot taken without faults, a file written after it, and the
    //    controller killed while the guest is stopped for the rollback.
    env.ok(&["snapshot", "sandbox/a", "--name", "s2"]);
    exec_ok(&env, "a", "echo later > /root/later; sync");
    let cli = spawn(&env, &["rollback", "sandbox/a", "--to", "snapshot/s2"]);
    let landed = observe(Duration::from_secs(30), || domstate(&vm) == "paused");
    kill_and_restart(&mut env, Some(cli), "rollback", landed);
    env.wait("the rollback settled", Duration::from_secs(120), || {
        let st = env.status("sandbox", "a");
        st["lastRollback"]["done"] == true && st["phase"] == "Running"
    });
    let st = env.status("sandbox", "a");
    eprintln!("rollback after the restart: {}", st["lastRollback"]);
    assert_eq!(st["lastRollback"]["snapshot"], "s2", "{st}");
    assert_eq!(domstate(&vm), "running");
    // Rolled back: the later file is gone, the earlier one and the process are there.
    assert_eq!(
        exec(&env, "a", "test -e /root/later").0,
        1,
        "not rolled back"
    );
    nothing_lost(&env, "a", "/root/precious", "precious\n");
    assert_eq!(libvirt_snapshots(&vm), ready_snapshots(&env));

    // 4. fork: killed once the fork's domain is defined.
    let fork_vm = "agentvm-sbx-fk".to_string();
    let cli = spawn(&env, &["fork", "snapshot/s2", "--name", "fk"]);
    let landed = observe(Duration::from_secs(60), || virsh(&["domstate", &fork_vm]).0);
    kill_and_restart(&mut env, Some(cli), "fork", landed);
    env.wait("the fork settled", Duration::from_secs(180), || {
        matches!(phase(&env, "sandbox", "fk").as_str(), "Running" | "Failed")
    });
    let f = env.status("sandbox", "fk");
    eprintln!("fork after the restart: {} {}", f["phase"], f["conditions"]);
    if f["phase"] == "Running" {
        assert_eq!(f["vm"], fork_vm.as_str(), "{f}");
        nothing_lost(&env, "fk", "/root/precious", "precious\n");
        assert_eq!(exec_ok(&env, "fk", "hostname"), "fk\n");
    } else {
        assert!(f["conditions"].to_string().contains("reason"), "{f}");
    }
    // The source is untouched by its fork's fault.
    assert_eq!(domstate(&vm), "running");
    nothing_lost(&env, "a", "/root/precious", "precious\n");
    wait_no_orphans(&env, &pool, &["a", "fk"]);

    // maxSnapshotMib: a snapshot that takes the total past it is deleted again.
    let held: u64 = ["s1", "s2"]
        .iter()
        .filter_map(|s| env.status("snapshot", s)["memoryBytes"].as_u64())
        .sum();
    let cap = (held >> 20) + 1;
    apply_yaml(
        &env,
        "a.yaml",
        &format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: a}}\nspec:\n  poolRef: {pool}\n  idleTimeoutSeconds: 0\n  maxSnapshotMib: {cap}\n"
        ),
    );
    let before = libvirt_snapshots(&vm);
    let (code, _, err) = env.code(&["snapshot", "sandbox/a", "--name", "s3"]);
    assert_ne!(code, 0, "a snapshot past maxSnapshotMib {cap} was kept");
    let s3 = env.status("snapshot", "s3");
    eprintln!("past maxSnapshotMib {cap}: {}", err.trim());
    assert_eq!(s3["phase"], "Failed", "{s3}");
    assert!(
        s3["conditions"].to_string().contains("SnapshotLimit"),
        "{s3}"
    );
    assert_eq!(
        libvirt_snapshots(&vm),
        before,
        "the snapshot was not deleted again"
    );
    nothing_lost(&env, "a", "/root/precious", "precious\n");

    // Deleting everything leaves only the pool's VMs.
    env.ok(&["delete", "sandbox/fk", "sandbox/a"]);
    env.wait("sandboxes gone", Duration::from_secs(120), || {
        env.get("sandbox", "a").is_none() && env.get("sandbox", "fk").is_none()
    });
    wait_no_orphans(&env, &pool, &[]);
    assert!(!virsh(&["domstate", &vm]).0, "{vm} still defined");
    assert!(!virsh(&["domstate", &fork_vm]).0, "{fork_vm} still defined");
}
