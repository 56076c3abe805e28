//! End to end with real VMs (`qemu:///system`, TCG): a `Sandbox` claims a warm VM from its
//! pool (which boots a replacement) and keeps it: `agentvm exec sandbox/NAME` passes output
//! and exit codes through, `-i` this process's stdin and `-t` a terminal of its size (and
//! `agentvm shell` a login shell on one);
//! `agentvm cp` copies files and directories (nested, with links and modes) in and out intact,
//! and refuses a guest directory with a link leading out of it; `agentvm port-forward`
//! reaches a web server in the sandbox; `pause` stops the vCPUs (an exec is refused until `resume`);
//! `stop` saves memory and disk to the host's disk (no QEMU process) and `start` brings
//! back the same files and the same running processes; a `kill -9` of the controller loses
//! nothing; an idle sandbox is saved to disk after `idleTimeoutSeconds` of running time
//! without activity, never while a command runs, and the next exec brings it back;
//! a snapshot (memory and disk) taken before a risky step brings files and processes back
//! on `rollback`, with the guest clock set to the host's; `fork` makes a new sandbox from a
//! snapshot with its files and running processes, independent of its source; a disk-only
//! snapshot (`--disk-only`) brings files back on rollback with a fresh boot and cannot be
//! forked; a snapshot of a stopped sandbox
//! waits until it runs; an `AgentRun` with `sandboxRef` runs in the sandbox's VM and leaves
//! its files there; the pool (`creation: template`) makes its replacement VM from its
//! template, and that VM serves the second sandbox; deleting the sandbox destroys its VM
//! and its snapshots; a sandbox with a `template` (no pool) boots a VM of its own. Fails (never skips) without libvirt or the default image.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn sandbox_yaml(name: &str, pool: &str, extra: &str) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n  poolRef: {pool}\n{extra}"
    )
}

fn phase(env: &Env, name: &str) -> String {
    env.status("sandbox", name)["phase"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn domstate(vm: &str) -> String {
    virsh(&["domstate", vm]).1.trim().to_string()
}

/// `agentvm VERB sandbox/NAME`, timed.
fn verb(env: &Env, verb: &str, name: &str) -> Duration {
    let t = Instant::now();
    let out = env.ok(&[verb, &format!("sandbox/{name}")]);
    let took = t.elapsed();
    assert!(out.contains(&format!("sandbox/{name}")), "{verb}: {out}");
    eprintln!("{verb}: {:.0} ms", took.as_secs_f64() * 1000.0);
    took
}

/// `agentvm ARGS` on a terminal of 33 rows and 111 columns (`script` gives it one), with
/// nothing on its standard input.
fn in_terminal(env: &Env, args: &[&str]) -> std::process::Output {
    let inner = env.cmd(args);
    let line = std::iter::once(inner.get_program().to_string_lossy().into_owned())
        .chain(
            inner
                .get_args()
                .map(|a| format!("'{}'", a.to_string_lossy())),
        )
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = std::process::Command::new("script");
    script.args([
        "-qec",
        &format!("stty rows 33 cols 111; {line}"),
        "/dev/null",
    ]);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    script.stdin(Stdio::null()).output().unwrap()
}

fn exec(env: &Env, name: &str, script: &str) -> (i32, String, String) {
    env.code(&["exec", &format!("sandbox/{name}"), "--", "sh", "-c", script])
}

fn exec_ok(env: &Env, name: &str, script: &str) -> String {
    let (code, out, err) = exec(env, name, script);
    assert_eq!(code, 0, "exec {script:?}: stdout {out} stderr {err}");
    out
}

#[test]
fn a_sandbox_keeps_its_vm_files_and_processes_through_pause_stop_and_restarts() {
    require_libvirt_and_image();
    let mut env = Env::new("sbx");
    let pid = std::process::id();
    let pool = format!("sbx{pid}");
    let image = format!("sbx-img-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    std::fs::write(
        env.specs().join("pool.yaml"),
        // The pool's replacement VMs are restored from its template: the `idle` sandbox
        // below gets one.
        format!("{}  creation: template\n", pool_manifest(&pool, &image, 1)),
    )
    .unwrap();
    env.start_controller();
    let t = env.wait("pool Ready", Duration::from_secs(300), || {
        env.status("pool", &pool)["phase"] == "Ready"
    });
    eprintln!("pool Ready after {:.1}s", t.as_secs_f64());
    let pool_vm = vm_names(&env.status("pool", &pool))[0].clone();

    // Claimed at once from the warm pool.
    let t0 = Instant::now();
    apply_yaml(
        &env,
        "dev.yaml",
        &sandbox_yaml("dev", &pool, "  idleTimeoutSeconds: 0\n"),
    );
    env.wait("sandbox Running", Duration::from_secs(60), || {
        phase(&env, "dev") == "Running"
    });
    eprintln!(
        "apply -> sandbox Running from a warm pool: {:.0} ms",
        t0.elapsed().as_secs_f64() * 1000.0
    );
    let st = env.status("sandbox", "dev");
    let vm = st["vm"].as_str().unwrap().to_string();
    assert_eq!(vm, pool_vm, "the pool's ready VM is the one claimed");
    // It left the pool, which boots a replacement.
    env.wait("the pool's replacement", Duration::from_secs(300), || {
        let p = env.status("pool", &pool);
        p["ready"] == 1 && !vm_names(&p).contains(&vm)
    });

    // Output and exit codes pass through.
    let (code, out, err) = exec(&env, "dev", "echo hello; echo oops >&2; exit 3");
    assert_eq!((code, out.as_str()), (3, "hello\n"), "stderr: {err}");
    assert!(err.contains("oops"), "{err}");
    // -i: this process's stdin reaches the program, to its end.
    let mut child = env
        .cmd(&[
            "exec",
            "-i",
            "sandbox/dev",
            "--",
            "sh",
            "-c",
            "read a; read b; echo \"got $a+$b\"; cat > /root/from-stdin",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\nthe rest\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exec -i: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "got one+two\n");
    assert_eq!(exec_ok(&env, "dev", "cat /root/from-stdin"), "the rest\n");
    // -t: a terminal of its own, the size of this one (`script` gives the CLI a terminal).
    let out = in_terminal(
        &env,
        &[
            "exec",
            "-t",
            "sandbox/dev",
            "--",
            "sh",
            "-c",
            "tty; stty size",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exec -t: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("33 111"), "{text}");
    // shell: a login shell on a terminal of its own, its exit code passed through.
    let out = in_terminal(&env, &["shell", "sandbox/dev", "--shell", "/bin/false"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "shell: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // cp both ways: 3 MiB of random bytes with their mode, round trip intact; a missing
    // guest file leaves nothing behind; a relative guest path is refused.
    let local = env.state().join("up.bin");
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &data).unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    env.ok(&["cp", local.to_str().unwrap(), "sandbox/dev:/root/up.bin"]);
    assert_eq!(
        exec_ok(&env, "dev", "wc -c < /root/up.bin; stat -c %a /root/up.bin"),
        format!("{}\n750\n", data.len())
    );
    let back = env.state().join("down.bin");
    env.ok(&["cp", "sandbox/dev:/root/up.bin", back.to_str().unwrap()]);
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the round trip changed the bytes"
    );
    let missing = env.state().join("missing.bin");
    let err = env.fails(&["cp", "sandbox/dev:/root/nope", missing.to_str().unwrap()]);
    assert!(err.contains("/root/nope"), "{err}");
    assert!(!missing.exists());
    let err = env.fails(&["cp", local.to_str().unwrap(), "sandbox/dev:relative"]);
    assert!(err.contains("must be absolute"), "{err}");

    // cp of a directory both ways: nested directories, a symbolic link and an executable
    // mode arrive as they were; an existing target is never merged into; `-` takes files
    // only; a guest link leading out of the copy refuses the whole copy and leaves nothing.
    let tree = env.state().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/deep.txt"), b"deep\n").unwrap();
    std::fs::write(tree.join("run.sh"), b"#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        tree.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a/b/deep.txt", tree.join("link")).unwrap();
    env.ok(&["cp", tree.to_str().unwrap(), "sandbox/dev:/root"]);
    assert_eq!(
        exec_ok(
            &env,
            "dev",
            "cd /root/tree && cat link && ./run.sh && stat -c %a run.sh && readlink link"
        ),
        "deep\nran\n755\na/b/deep.txt\n"
    );
    let err = env.fails(&[
        "cp",
        tree.to_str().unwrap(),
        "sandbox/dev:/root/tree/a/b/deep.txt",
    ]);
    assert!(err.contains("not a directory"), "{err}");
    exec_ok(&env, "dev", "echo new > /root/tree/a/made-here");
    let out = env.state().join("out");
    std::fs::create_dir(&out).unwrap();
    env.ok(&["cp", "sandbox/dev:/root/tree", out.to_str().unwrap()]);
    let got = out.join("tree");
    assert_eq!(std::fs::read(got.join("link")).unwrap(), b"deep\n");
    assert_eq!(std::fs::read(got.join("a/made-here")).unwrap(), b"new\n");
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap(),
        std::path::Path::new("a/b/deep.txt")
    );
    let mode = std::fs::metadata(got.join("run.sh")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o755
    );
    let err = env.fails(&["cp", "sandbox/dev:/root/tree", out.to_str().unwrap()]);
    assert!(err.contains("exists already"), "{err}");
    let err = env.fails(&["cp", "sandbox/dev:/root/tree", "-"]);
    assert!(
        err.contains("is a directory") && err.contains("`-`"),
        "{err}"
    );
    exec_ok(&env, "dev", "ln -s /etc/shadow /root/tree/a/evil");
    let refused = env.state().join("refused");
    let err = env.fails(&["cp", "sandbox/dev:/root/tree", refused.to_str().unwrap()]);
    assert!(
        err.contains("tree/a/evil: symbolic link to /etc/shadow, outside the copied directory"),
        "{err}"
    );
    assert!(!refused.exists());
    let left: Vec<_> = std::fs::read_dir(env.state())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".agentvm-cp"))
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");

    // port-forward: a web server in the sandbox, reached on this machine's loopback.
    exec_ok(
        &env,
        "dev",
        "cd /root && setsid python3 -m http.server 8000 --bind 127.0.0.1 </dev/null >/dev/null 2>&1 & \
         for i in $(seq 100); do python3 -c 'import urllib.request as u; u.urlopen(\"http://127.0.0.1:8000/\")' 2>/dev/null && exit 0; sleep 0.2; done; exit 1",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut forwarder = env
        .cmd(&["port-forward", "sandbox/dev", &format!("{port}:8000")])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    env.wait("the forwarded port", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /from-stdin HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).unwrap();
    let _ = forwarder.kill();
    let _ = forwarder.wait();
    assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
    assert!(reply.ends_with("the rest\n"), "{reply}");

    // A file on disk and a process that outlives the exec.
    let sleeper = exec_ok(
        &env,
        "dev",
        "echo kept > /root/keep && setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $!",
    );
    let sleeper = sleeper.trim().to_string();
    assert!(sleeper.parse::<u32>().is_ok(), "{sleeper}");
    let alive = format!("cat /root/keep && tr '\\0' ' ' < /proc/{sleeper}/cmdline");

    // Pause: vCPUs stopped, exec refused with the way out.
    verb(&env, "pause", "dev");
    assert_eq!(domstate(&vm), "paused");
    let (code, _, err) = exec(&env, "dev", "true");
    assert_ne!(code, 0);
    assert!(err.contains("agentvm resume sandbox/dev"), "{err}");
    verb(&env, "resume", "dev");
    assert_eq!(domstate(&vm), "running");
    assert_eq!(exec_ok(&env, "dev", &alive), "kept\nsleep 100000 ");

    // Stop: saved to disk, no QEMU process; start: the same files and processes.
    verb(&env, "stop", "dev");
    assert_eq!(domstate(&vm), "shut off");
    let (_, saved) = virsh(&["list", "--all", "--with-managed-save", "--name"]);
    assert!(saved.lines().any(|l| l.trim() == vm), "{saved}");
    verb(&env, "start", "dev");
    assert_eq!(domstate(&vm), "running");
    assert_eq!(exec_ok(&env, "dev", &alive), "kept\nsleep 100000 ");

    // A stopped sandbox across a controller kill -9: started again where it was.
    verb(&env, "stop", "dev");
    env.kill_controller();
    env.start_controller();
    verb(&env, "start", "dev");
    assert_eq!(env.status("sandbox", "dev")["vm"], vm.as_str());
    assert_eq!(exec_ok(&env, "dev", &alive), "kept\nsleep 100000 ");

    // Snapshot before a risky step; the step; roll back: files and processes are back.
    let t = Instant::now();
    let out = env.ok(&["snapshot", "sandbox/dev", "--name", "before"]);
    eprintln!(
        "snapshot: {:.0} ms ({})",
        t.elapsed().as_secs_f64() * 1000.0,
        out.trim()
    );
    let snap = env.status("snapshot", "before");
    assert_eq!(snap["phase"], "Ready", "{snap}");
    assert!(snap["memoryBytes"].as_u64().unwrap() > 1 << 20, "{snap}");
    exec_ok(
        &env,
        "dev",
        &format!("rm /root/keep; kill {sleeper}; echo risky > /root/risky"),
    );
    assert_ne!(exec(&env, "dev", &alive).0, 0);
    let t = Instant::now();
    env.ok(&["rollback", "sandbox/dev", "--to", "snapshot/before"]);
    eprintln!("rollback: {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
    assert_eq!(exec_ok(&env, "dev", &alive), "kept\nsleep 100000 ");
    assert_eq!(exec(&env, "dev", "test -e /root/risky").0, 1);
    // The guest clock is the host's again, not the snapshot's.
    let guest_now: u64 = exec_ok(&env, "dev", "date +%s").trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        host_now.abs_diff(guest_now) <= 2,
        "guest {guest_now}, host {host_now}"
    );
    assert_eq!(
        env.status("sandbox", "dev")["snapshots"],
        serde_json::json!(["before"])
    );

    // Fork the snapshot twice: new sandboxes with the snapshot's files and running
    // processes, each with a VM, host name and entropy of its own; independent of their
    // source from then on.
    let t = Instant::now();
    let out = env.ok(&[
        "fork",
        "snapshot/before",
        "--name",
        "dev-fork",
        "--count",
        "2",
    ]);
    eprintln!(
        "fork x2: {:.0} ms ({})",
        t.elapsed().as_secs_f64() * 1000.0,
        out.trim()
    );
    let fork = env.status("sandbox", "dev-fork-1");
    assert_eq!(fork["phase"], "Running", "{fork}");
    assert_eq!(fork["forkedFrom"]["sandbox"], "dev", "{fork}");
    let fork_vm = fork["vm"].as_str().unwrap().to_string();
    let fork2_vm = env.status("sandbox", "dev-fork-2")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fork_vm != vm && fork2_vm != vm && fork_vm != fork2_vm);
    assert_eq!(exec_ok(&env, "dev-fork-1", &alive), "kept\nsleep 100000 ");
    exec_ok(&env, "dev-fork-1", "echo forked > /root/forked");
    assert_eq!(exec(&env, "dev", "test -e /root/forked").0, 1);
    assert_eq!(exec(&env, "dev-fork-2", "test -e /root/forked").0, 1);
    exec_ok(&env, "dev", "echo source > /root/source-only");
    assert_eq!(exec(&env, "dev-fork-1", "test -e /root/source-only").0, 1);
    assert_eq!(exec_ok(&env, "dev-fork-1", "hostname"), "dev-fork-1\n");
    assert_eq!(exec_ok(&env, "dev-fork-2", "hostname"), "dev-fork-2\n");
    // `describe` lists them, on the source and on the snapshot.
    for target in ["sandbox/dev", "snapshot/before"] {
        let text = env.ok(&["describe", target]);
        let forks = text.split("Forks:").nth(1).unwrap_or_default();
        assert!(
            forks.contains("dev-fork-1") && forks.contains("dev-fork-2"),
            "describe {target}: {text}"
        );
    }
    let random = "head -c 16 /dev/urandom | od -An -tx1";
    let draws: std::collections::BTreeSet<String> = ["dev", "dev-fork-1", "dev-fork-2"]
        .iter()
        .map(|n| exec_ok(&env, n, random))
        .collect();
    assert_eq!(draws.len(), 3, "{draws:?}");
    env.ok(&["delete", "sandbox/dev-fork-2"]);

    // An AgentRun in the sandbox: it runs in the sandbox's VM, which keeps what it left.
    apply_yaml(
        &env,
        "in-dev.yaml",
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {name: in-dev}\nspec:\n  sandboxRef: dev\n  command: {program: sh, args: [-c, 'cat /root/keep; echo from-run > /root/from-run']}\n",
    );
    env.wait("the run in the sandbox", Duration::from_secs(60), || {
        run_terminal(&run_phase(&env, "in-dev"))
    });
    let run = env.status("agentrun", "in-dev");
    assert_eq!(run["phase"], "Succeeded", "{run}");
    assert_eq!(run["vm"], vm.as_str());
    assert_eq!(env.ok(&["logs", "run/in-dev"]), "kept\n");
    assert_eq!(exec_ok(&env, "dev", "cat /root/from-run"), "from-run\n");
    let runs = env.ok(&["get", "runs"]);
    assert!(runs.contains("sbx/dev"), "{runs}");

    // A disk-only snapshot: the guest keeps running (its file systems frozen for a moment);
    // a rollback to it brings the files back and boots afresh, without the processes; a
    // fork of it fails at once and makes nothing.
    let t = Instant::now();
    let out = env.ok(&["snapshot", "sandbox/dev", "--name", "files", "--disk-only"]);
    eprintln!(
        "disk-only snapshot: {:.0} ms ({})",
        t.elapsed().as_secs_f64() * 1000.0,
        out.trim()
    );
    let snap = env.status("snapshot", "files");
    assert_eq!(snap["phase"], "Ready", "{snap}");
    assert_eq!(snap["diskOnly"], true, "{snap}");
    assert!(snap.get("memoryBytes").is_none(), "{snap}");
    assert!(
        snap["conditions"]
            .to_string()
            .contains("file systems were frozen"),
        "{snap}"
    );
    eprintln!(
        "disk-only snapshot: file systems frozen {} ms",
        snap["pauseMs"]
    );
    assert_eq!(exec_ok(&env, "dev", &alive), "kept\nsleep 100000 ");
    exec_ok(&env, "dev", "rm /root/from-run; echo later > /root/later");
    let err = env.fails(&["fork", "snapshot/files", "--name", "nomem"]);
    assert!(
        err.contains("SnapshotHasNoMemory") || err.contains("holds its disk alone"),
        "{err}"
    );
    assert_eq!(env.status("sandbox", "nomem")["phase"], "Failed");
    assert!(!virsh(&["domstate", "agentvm-sbx-nomem"]).0);
    assert!(!env.state().join("vms/agentvm-sbx-nomem").exists());
    env.ok(&["delete", "sandbox/nomem"]);
    let t = Instant::now();
    env.ok(&["rollback", "sandbox/dev", "--to", "snapshot/files"]);
    eprintln!(
        "rollback to a disk-only snapshot (with a boot): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let last = &env.status("sandbox", "dev")["lastRollback"];
    assert!(
        last["message"]
            .as_str()
            .unwrap_or_default()
            .contains("booted afresh"),
        "{last}"
    );
    assert_eq!(exec_ok(&env, "dev", "cat /root/from-run"), "from-run\n");
    assert_eq!(exec(&env, "dev", "test -e /root/later").0, 1);
    assert_ne!(
        exec(&env, "dev", &alive).0,
        0,
        "a fresh boot runs no old process"
    );
    assert_eq!(
        env.status("sandbox", "dev")["snapshots"],
        serde_json::json!(["before", "files"])
    );

    // get shows it.
    let table = env.ok(&["get", "sandboxes"]);
    assert!(
        table.contains("dev") && table.contains("Running"),
        "{table}"
    );

    // Deleting it destroys its VM, and its snapshots go with it.
    env.ok(&["delete", "sandbox/dev"]);
    env.wait("snapshot gone", Duration::from_secs(60), || {
        env.get("snapshot", "before").is_none()
    });
    env.wait("sandbox gone", Duration::from_secs(60), || {
        env.get("sandbox", "dev").is_none()
    });
    assert!(!virsh(&["domstate", &vm]).0, "{vm} still defined");
    // The fork does not depend on its source, nor on the source's snapshot.
    assert_eq!(exec_ok(&env, "dev-fork-1", &alive), "kept\nsleep 100000 ");
    env.ok(&["delete", "sandbox/dev-fork-1"]);
    env.wait("forks gone", Duration::from_secs(60), || {
        env.get("sandbox", "dev-fork-1").is_none() && env.get("sandbox", "dev-fork-2").is_none()
    });
    for vm in [&fork_vm, &fork2_vm] {
        assert!(!virsh(&["domstate", vm]).0, "{vm} still defined");
    }

    // Idle rules on the pool's replacement VM: a running command keeps the sandbox alive
    // past its idle timeout; once idle it is saved to disk; the next exec brings it back.
    apply_yaml(
        &env,
        "idle.yaml",
        &sandbox_yaml("idle", &pool, "  idleTimeoutSeconds: 10\n"),
    );
    env.wait("idle Running", Duration::from_secs(120), || {
        phase(&env, "idle") == "Running"
    });
    let idle_vm = env.status("sandbox", "idle")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    exec_ok(&env, "idle", "echo on-disk > /root/note; sleep 15");
    assert_eq!(
        phase(&env, "idle"),
        "Running",
        "a running command is activity"
    );
    let t = env.wait("idle stop", Duration::from_secs(60), || {
        phase(&env, "idle") == "Stopped"
    });
    eprintln!(
        "idle sandbox stopped {:.1}s after its last exec",
        t.as_secs_f64()
    );
    let st = env.status("sandbox", "idle");
    assert_eq!(st["stoppedReason"], "IdleTimeout", "{st}");
    // A snapshot of a stopped sandbox waits for it to run; a rollback to a snapshot that
    // does not exist is refused.
    apply_yaml(
        &env,
        "idle-snap.yaml",
        "apiVersion: agentvm.dev/v1alpha1\nkind: Snapshot\nmetadata: {name: idle-snap}\nspec: {sandboxRef: idle}\n",
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(env.status("snapshot", "idle-snap")["phase"], "Pending");
    assert_eq!(domstate(&idle_vm), "shut off");
    let t = Instant::now();
    assert_eq!(exec_ok(&env, "idle", "cat /root/note"), "on-disk\n");
    eprintln!(
        "exec into an idle-stopped sandbox (restore included): {:.0} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(phase(&env, "idle"), "Running");
    env.wait("the waiting snapshot", Duration::from_secs(60), || {
        env.status("snapshot", "idle-snap")["phase"] == "Ready"
    });
    let err = env.fails(&["rollback", "sandbox/idle", "--to", "snapshot/nope"]);
    assert!(err.contains("Snapshot/nope not found"), "{err}");
    let audit = std::fs::read_to_string(env.state().join(agentvm_controller::audit::AUDIT_FILE))
        .unwrap_or_default();
    // The replacement VM came from the pool's template, not from a boot.
    assert!(
        audit
            .lines()
            .any(|l| l.contains("vm_created") && l.contains("\"fromTemplate\":true")),
        "no VM made from the template in the audit log"
    );
    for event in [
        "vm_claimed",
        "sandbox_power",
        "sandbox_exec",
        "snapshot_taken",
        "sandbox_rollback",
    ] {
        assert!(audit.contains(event), "no {event} in the audit log");
    }
    env.ok(&["delete", "sandbox/idle"]);
    env.wait("idle gone", Duration::from_secs(60), || {
        env.get("sandbox", "idle").is_none()
    });
    assert!(!virsh(&["domstate", &idle_vm]).0);

    // Without a pool: a sandbox booted from a template (the pool's image) gets a VM of its
    // own, owned by it; deleting it destroys the VM and its files.
    let t = Instant::now();
    apply_yaml(
        &env,
        "tpl.yaml",
        &format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: tpl}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n  idleTimeoutSeconds: 0\n"),
    );
    env.wait(
        "the template sandbox Running",
        Duration::from_secs(300),
        || phase(&env, "tpl") == "Running",
    );
    eprintln!(
        "apply -> sandbox Running from a template (a boot): {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let st = env.status("sandbox", "tpl");
    assert_eq!(st["vm"], "agentvm-sbx-tpl", "{st}");
    assert!(st.get("pool").is_none(), "{st}");
    assert_eq!(
        exec_ok(&env, "tpl", "echo made > /root/m; cat /root/m"),
        "made\n"
    );
    let (ok, xml) = virsh(&["dumpxml", "agentvm-sbx-tpl"]);
    assert!(
        ok && xml.contains("Sandbox")
            && (xml.contains("name='tpl'") || xml.contains("name=\"tpl\"")),
        "{xml}"
    );
    let table = env.ok(&["get", "sandboxes"]);
    assert!(table.contains(&format!("img/{image}")), "{table}");
    env.ok(&["delete", "sandbox/tpl"]);
    env.wait("tpl gone", Duration::from_secs(60), || {
        env.get("sandbox", "tpl").is_none()
    });
    assert!(!virsh(&["domstate", "agentvm-sbx-tpl"]).0);
    assert!(!env.state().join("vms/agentvm-sbx-tpl").exists());
}
