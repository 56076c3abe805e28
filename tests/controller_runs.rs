//! End to end with real VMs (`qemu:///system`, TCG): `AgentRun`s applied to the `agentvm
//! controller` binary run in pool VMs. Many runs submitted at once against `maxSize: 2` all
//! succeed, once each, started in submission order; a run's files and background processes
//! are gone for the next run on the same VM; a cancelled and a timed-out run leave their VM
//! clean and Ready; a run in flight at `kill -9` of the controller ends `Failed` with reason
//! `ControllerRestarted` and its VM is reset; a secret from the controller's environment never shows up in status,
//! `agentvm logs`, the controller log, the audit log or the store file; a run's hostile
//! artifacts (a setuid file, a device node, a FIFO, links to `/etc/shadow` and out of the
//! directory, a file owned by uid 4242) arrive as plain 0640 files and 0750 directories
//! owned by the controller, the rest is named in `ArtifactsRejected`, and a second run of
//! the same name gets a new directory; nothing under the state directory is open to
//! others beyond the documented modes. Fails (never skips) without libvirt or the default
//! image.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Runs submitted at once against a pool of at most 2 VMs.
const BATCH: usize = 20;
const SECRET: &str = "e2e-s3cret-Zq81vX";

fn pool_manifest(pool: &str, image: &str, max_size: u32) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n  minReady: 1\n  maxSize: {max_size}\n"
    )
}

fn logs(env: &Env, run: &str) -> String {
    let out = env.cmd(&["logs", &format!("run/{run}")]).output().unwrap();
    assert!(
        out.status.success(),
        "logs {run}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn agent_runs_execute_in_pool_vms_in_order_clean_and_without_leaking_secrets() {
    require_libvirt_and_image();
    let mut env = Env::new("runs");
    let pid = std::process::id();
    let pool = format!("e2er{pid}");
    let image = format!("e2e-rimg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    env.controller_env
        .push(("AGENTVM_E2E_SECRET".into(), SECRET.into()));
    std::fs::write(
        env.specs().join("pool.yaml"),
        pool_manifest(&pool, &image, 2),
    )
    .unwrap();
    env.start_controller();
    let t = env.wait("pool Ready", Duration::from_secs(300), || {
        env.status("pool", &pool)["phase"] == "Ready"
    });
    eprintln!("pool Ready after {:.1}s", t.as_secs_f64());

    // apply -> Running with a warm pool.
    let t0 = Instant::now();
    apply_yaml(&env, "first.yaml", &sh_run("first", &pool, "sleep 2", ""));
    let latency = loop {
        let p = run_phase(&env, "first");
        if p != "Pending" && p != "Scheduled" {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "first never ran");
    };
    eprintln!(
        "apply -> Running with a warm pool: {:.0} ms (including the apply and get CLI calls)",
        latency.as_secs_f64() * 1000.0
    );
    env.wait("first done", Duration::from_secs(60), || {
        run_terminal(&run_phase(&env, "first"))
    });
    assert_eq!(run_phase(&env, "first"), "Succeeded");

    // Output is followed live: `logs -f` prints the first line long before the run ends,
    // and exits when it ends.
    apply_yaml(
        &env,
        "live.yaml",
        &sh_run("live", &pool, "echo first; sleep 4; echo second", ""),
    );
    let mut follow = env
        .cmd(&["logs", "-f", "run/live"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let _ = tx.send((line.unwrap_or_default(), Instant::now()));
        }
    });
    let (l1, at1) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("first line");
    let (l2, at2) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("second line");
    assert_eq!((l1.as_str(), l2.as_str()), ("first", "second"));
    assert!(
        at2 - at1 >= Duration::from_secs(3),
        "first line not live: {:?} apart",
        at2 - at1
    );
    eprintln!(
        "logs -f: first line {:.1}s after apply, second {:.1}s later",
        (at1 - t0).as_secs_f64(),
        (at2 - at1).as_secs_f64()
    );
    let exited = Instant::now();
    loop {
        if follow.try_wait().unwrap().is_some() {
            break;
        }
        if exited.elapsed() > Duration::from_secs(30) {
            let _ = follow.kill();
            let _ = follow.wait();
            panic!("logs -f did not end with the run");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run_phase(&env, "live"), "Succeeded");

    // (a) A batch submitted at once (one apply: names give the order within it).
    let names: Vec<String> = (0..BATCH).map(|i| format!("batch-{i:02}")).collect();
    let docs: Vec<String> = names
        .iter()
        .map(|n| sh_run(n, &pool, &format!("echo {n} ran on $(hostname)"), ""))
        .collect();
    let t0 = Instant::now();
    apply_yaml(&env, "batch.yaml", &docs.join("---\n"));
    env.wait("the batch done", Duration::from_secs(600), || {
        names.iter().all(|n| run_terminal(&run_phase(&env, n)))
    });
    let took = t0.elapsed();
    eprintln!(
        "{BATCH} trivial runs on maxSize 2 in {:.1}s: {:.1} runs/minute",
        took.as_secs_f64(),
        BATCH as f64 * 60.0 / took.as_secs_f64()
    );
    let mut started = Vec::new();
    let mut vms = std::collections::BTreeSet::new();
    for n in &names {
        let s = env.status("run", n);
        assert_eq!(s["phase"], "Succeeded", "{n}: {s}");
        assert_eq!(s["exitCode"], 0);
        let out = logs(&env, n);
        assert_eq!(out.matches(&format!("{n} ran on")).count(), 1, "{n}: {out}");
        vms.insert(s["vm"].as_str().unwrap().to_string());
        started.push((s["startedAt"].as_str().unwrap().to_string(), n.clone()));
    }
    assert!(vms.len() <= 2, "more than maxSize VMs used: {vms:?}");
    assert!(domains_with_prefix(&env.domain_prefix).len() <= 2);
    let mut by_start = started.clone();
    by_start.sort();
    assert_eq!(
        by_start.iter().map(|(_, n)| n).collect::<Vec<_>>(),
        names.iter().collect::<Vec<_>>(),
        "runs started out of submission order: {started:?}"
    );

    // (b), (c): one VM from here on, so every run follows the previous one on it.
    std::fs::write(
        env.specs().join("pool.yaml"),
        pool_manifest(&pool, &image, 1),
    )
    .unwrap();
    // The spec directory's change must have reached the pool first: a pool that shrank to
    // 1 VM by itself (no demand, minReady 1) still has maxSize 2 and boots a second VM as
    // soon as its only one is busy.
    env.wait("pool down to 1 VM", Duration::from_secs(120), || {
        let Some(o) = env.get("pool", &pool) else {
            return false;
        };
        let s = &o["status"];
        o["spec"]["maxSize"] == 1
            && s["observedGeneration"] == o["metadata"]["generation"]
            && s["phase"] == "Ready"
            && s["total"] == 1
    });
    let dirty = "echo dirty > /tmp/marker; echo dirty > /root/marker; sync\n\
                 setsid sh -c 'exec sleep 4242' </dev/null >/dev/null 2>&1 &\n\
                 sleep 1; grep -qa '424[2]' /proc/[0-9]*/cmdline && echo started";
    apply_yaml(&env, "dirty.yaml", &sh_run("dirty", &pool, dirty, ""));
    env.wait("dirty done", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "dirty"))
    });
    let s = env.status("run", "dirty");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["stdoutTail"], "started\n", "{s}");
    let vm = s["vm"].as_str().unwrap().to_string();

    // A timed-out run (which also leaves a marker behind).
    apply_yaml(
        &env,
        "slow.yaml",
        &sh_run(
            "slow",
            &pool,
            "echo begin; touch /tmp/slow-marker; sleep 611",
            "  timeoutSeconds: 3\n",
        ),
    );
    env.wait("slow done", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "slow"))
    });
    let s = env.status("run", "slow");
    assert_eq!(s["phase"], "TimedOut", "{s}");
    assert_eq!(s["reason"], "Timeout", "{s}");
    assert_eq!(s["vm"], vm.as_str());
    let t = env.wait("the VM Ready again", Duration::from_secs(60), || {
        let p = env.status("pool", &pool);
        p["ready"] == 1 && p["busy"] == 0
    });
    eprintln!(
        "timed-out run's VM Ready again {:.1}s later",
        t.as_secs_f64()
    );

    // A cancelled run: deleted while it runs.
    apply_yaml(
        &env,
        "cancel.yaml",
        &sh_run("cancel", &pool, "touch /tmp/cancel-marker; sleep 622", ""),
    );
    env.wait("cancel Running", Duration::from_secs(60), || {
        run_phase(&env, "cancel") == "Running"
    });
    let t0 = Instant::now();
    let out = env.cmd(&["delete", "run/cancel"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait("cancel gone", Duration::from_secs(60), || {
        env.get("run", "cancel").is_none()
    });
    eprintln!(
        "running run cancelled and removed in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        env.log().contains("phase=Cancelled"),
        "no Cancelled end in the controller log"
    );

    let check = "for f in /tmp/marker /root/marker /tmp/slow-marker /tmp/cancel-marker /tmp/inflight-marker; do [ -e $f ] && echo found $f; done\n\
                 grep -lEa '424[2]|61[1]|62[2]|63[3]' /proc/[0-9]*/cmdline && echo found process\n\
                 echo checked";
    apply_yaml(&env, "check.yaml", &sh_run("check", &pool, check, ""));
    env.wait("check done", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "check"))
    });
    let s = env.status("run", "check");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["vm"], vm.as_str(), "not the same VM");
    assert_eq!(
        s["stdoutTail"], "checked\n",
        "state leaked between runs: {s}"
    );

    // kill -9 of the controller during a run: the new controller settles the run as
    // Failed/ControllerRestarted, and the adopted VM is reset before the next run.
    apply_yaml(
        &env,
        "inflight.yaml",
        &sh_run(
            "inflight",
            &pool,
            "touch /tmp/inflight-marker; sleep 633",
            "",
        ),
    );
    env.wait("inflight Running", Duration::from_secs(60), || {
        run_phase(&env, "inflight") == "Running"
    });
    env.kill_controller();
    env.start_controller();
    let t = env.wait("inflight settled", Duration::from_secs(60), || {
        run_terminal(&run_phase(&env, "inflight"))
    });
    let s = env.status("run", "inflight");
    assert_eq!(s["phase"], "Failed", "{s}");
    assert_eq!(s["reason"], "ControllerRestarted", "{s}");
    eprintln!(
        "run in flight at kill -9 settled ControllerRestarted {:.1}s after the restart",
        t.as_secs_f64()
    );
    apply_yaml(&env, "check2.yaml", &sh_run("check2", &pool, check, ""));
    env.wait("check2 done", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "check2"))
    });
    let s = env.status("run", "check2");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["vm"], vm.as_str(), "the adopted VM was replaced");
    assert_eq!(
        s["stdoutTail"], "checked\n",
        "state survived the restart: {s}"
    );

    // (d) A secret from the controller's environment.
    apply_yaml(
        &env,
        "secret.yaml",
        &sh_run(
            "secret",
            &pool,
            "echo token=$TOKEN; echo \"$TOKEN\" | wc -c; echo err=$TOKEN >&2",
            "  secretEnv:\n  - {name: TOKEN, fromEnv: AGENTVM_E2E_SECRET}\n",
        ),
    );
    env.wait("secret done", Duration::from_secs(120), || {
        run_terminal(&run_phase(&env, "secret"))
    });
    let obj = env.get("run", "secret").unwrap();
    let s = &obj["status"];
    assert_eq!(s["phase"], "Succeeded", "{s}");
    let len = SECRET.len() + 1;
    assert_eq!(
        s["stdoutTail"],
        format!("token=[REDACTED]\n{len}\n"),
        "the guest got the secret"
    );
    assert!(
        !obj.to_string().contains(SECRET),
        "secret in the object: {obj}"
    );
    let out = logs(&env, "secret");
    assert!(
        out.contains("token=[REDACTED]") && !out.contains(SECRET),
        "{out}"
    );
    assert!(!env.log().contains(SECRET), "secret in the controller log");
    let audit = env.dir.join(agentvm_controller::audit::AUDIT_FILE);
    let audit = std::fs::read_to_string(audit).unwrap_or_default();
    assert!(
        audit.contains("run_finished"),
        "no run_finished in the audit log"
    );
    assert!(!audit.contains(SECRET), "secret in the audit log");
    let store = std::fs::read(env.dir.join(agentvm_store::STORE_FILE)).unwrap();
    assert!(
        !store.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "secret in the store file"
    );

    // (e) A run whose artifact directory holds what root in a guest can make to attack the
    // host that unpacks it: only the regular files and directories arrive, 0640/0750 and
    // owned by the controller, and the rest is named in the status. A second run of the
    // same name gets a directory of its own.
    let hostile = "set -e\n\
                   mkdir -p /root/out/sub\n\
                   echo plain > /root/out/plain.txt\n\
                   printf '#!/bin/sh\\nid\\n' > /root/out/suid.sh; chmod 4755 /root/out/suid.sh\n\
                   echo owned > /root/out/owned.txt; chown 4242:4242 /root/out/owned.txt; chmod 666 /root/out/owned.txt\n\
                   chmod 2777 /root/out/sub; echo deep > /root/out/sub/deep.txt\n\
                   mknod /root/out/null c 1 3\n\
                   mkfifo /root/out/pipe\n\
                   ln -s /etc/shadow /root/out/shadow\n\
                   ln -s ../../../../../../etc/passwd /root/out/up\n\
                   ln /root/out/plain.txt /root/out/hard.txt\n\
                   echo packed";
    let hostile_run = sh_run(
        "hostile",
        &pool,
        hostile,
        "  artifacts: {paths: [/root/out]}\n",
    );
    let first = hostile_artifacts(&env, &hostile_run);
    let out = env.cmd(&["delete", "run/hostile"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait("hostile gone", Duration::from_secs(60), || {
        env.get("run", "hostile").is_none()
    });
    let second = hostile_artifacts(&env, &hostile_run);
    assert_ne!(
        first.parent(),
        second.parent(),
        "the same directory for both runs"
    );
    assert_eq!(
        std::fs::read_to_string(first.join("plain.txt")).unwrap(),
        "plain\n",
        "the first run's artifacts were touched"
    );

    // Nothing the controller made under its state directory is open to others beyond the
    // modes `agentvm_controller::state_dir` documents (the test's own files aside: specs/,
    // manifests, the controller's log).
    let mut open = Vec::new();
    let all = walk(&env.dir);
    for must in ["store.redb", "audit.log", "vms", "artifacts", "sock"] {
        assert!(
            all.iter().any(|(rel, _, _)| rel == must),
            "no {must} under the state directory"
        );
    }
    assert!(
        all.iter()
            .any(|(rel, _, _)| rel.starts_with("vms/") && rel.ends_with("/disk.qcow2")),
        "no VM disk under the state directory"
    );
    eprintln!("{} paths under the state directory checked", all.len());
    for (rel, kind, mode) in all {
        let top = rel.split('/').next().unwrap_or_default();
        if top == "specs"
            || rel == "controller.log"
            || (!rel.contains('/') && rel.ends_with(".yaml"))
        {
            continue;
        }
        let ok = match (rel.as_str(), kind) {
            ("", _) => mode == 0o711,
            ("sock", 's') => mode == 0o660,
            (r, 'd') if r == "artifacts" || r.starts_with("artifacts/") => mode == 0o750,
            (r, 'f') if r.starts_with("artifacts/") => mode == 0o640,
            (_, 'd') => mode & 0o066 == 0,
            (_, 'f') => mode & 0o077 == 0,
            _ => false,
        };
        if !ok {
            open.push(format!("{kind} {mode:04o} {rel}"));
        }
    }
    assert!(
        open.is_empty(),
        "too open under the state directory:\n{}",
        open.join("\n")
    );
}

/// Applies `run` (the hostile artifacts run), waits for it and checks what reached the host;
/// returns the host path of its `/root/out`.
fn hostile_artifacts(env: &Env, run: &str) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    apply_yaml(env, "hostile.yaml", run);
    env.wait("hostile done", Duration::from_secs(120), || {
        run_terminal(&run_phase(env, "hostile"))
    });
    let s = env.status("run", "hostile");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert_eq!(s["stdoutTail"], "packed\n", "{s}");
    let arts = s["artifacts"].as_array().unwrap_or_else(|| panic!("{s}"));
    assert_eq!(arts.len(), 1, "{s}");
    let host = std::path::PathBuf::from(arts[0]["hostPath"].as_str().unwrap());
    let run_dir = host.parent().unwrap();
    // (path, kind, mode in octal, owner)
    let mut found: Vec<(String, char, String, u32)> = walk(run_dir)
        .into_iter()
        .filter(|(rel, _, _)| !rel.is_empty())
        .map(|(rel, kind, mode)| {
            let uid = std::fs::symlink_metadata(run_dir.join(&rel)).unwrap().uid();
            (rel, kind, format!("{mode:04o}"), uid)
        })
        .collect();
    found.sort();
    let me = test_uid();
    let mut want: Vec<(String, char, String, u32)> = [
        ("out", 'd'),
        ("out/hard.txt", 'f'),
        ("out/owned.txt", 'f'),
        ("out/plain.txt", 'f'),
        ("out/sub", 'd'),
        ("out/sub/deep.txt", 'f'),
        ("out/suid.sh", 'f'),
    ]
    .into_iter()
    .map(|(p, k)| {
        (
            p.to_string(),
            k,
            if k == 'd' { "0750" } else { "0640" }.to_string(),
            me,
        )
    })
    .collect();
    want.sort();
    assert_eq!(
        found,
        want,
        "what reached the host under {}",
        run_dir.display()
    );
    assert_eq!(
        std::fs::read_to_string(host.join("suid.sh")).unwrap(),
        "#!/bin/sh\nid\n"
    );
    let c = condition(&s, "ArtifactsRejected").unwrap_or_else(|| panic!("{s}"));
    assert_eq!(
        (c["status"].as_str(), c["reason"].as_str()),
        (Some("True"), Some("UnsafeEntries")),
        "{c}"
    );
    let m = c["message"].as_str().unwrap();
    for named in [
        "out/null: character device",
        "out/pipe: FIFO",
        "out/shadow: symbolic link to /etc/shadow",
        "out/up: symbolic link to ../../../../../../etc/passwd",
    ] {
        assert!(m.contains(named), "{named:?} not in {m:?}");
    }
    assert_eq!(run_dir.parent().unwrap(), env.dir.join("artifacts"), "{s}");
    let dir_name = run_dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(dir_name.starts_with("hostile-"), "{dir_name}");
    host
}

/// Every path under `root` (never following links), relative ("" for `root`), with its
/// kind (`d`, `f`, `l`, `s` socket, `?`) and permission bits.
fn walk(root: &std::path::Path) -> Vec<(String, char, u32)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue; // removed meanwhile (a VM's files during a reset)
        };
        let t = m.file_type();
        let kind = if t.is_dir() {
            'd'
        } else if t.is_file() {
            'f'
        } else if t.is_symlink() {
            'l'
        } else if t.is_socket() {
            's'
        } else {
            '?'
        };
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        out.push((rel, kind, m.permissions().mode() & 0o7777));
        if kind == 'd' {
            if let Ok(rd) = std::fs::read_dir(&p) {
                todo.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    out
}

/// This process's effective user (the controller runs as the same user).
fn test_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}
