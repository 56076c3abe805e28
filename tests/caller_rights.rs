//! End to end, real controller and real socket, one real VM (`qemu:///system`, TCG): an API
//! client that is not root reaches nothing on the host beyond its own rights. A throwaway
//! user in the controller's `socketGroup` applies runs naming `/etc/shadow`, a file under
//! `/root/`, a symlink to `/etc/shadow`, `/root` as workspace and a controller environment
//! variable that is not allow-listed: each run ends `Failed` (`InputUnavailable` /
//! `SecretUnavailable`) with a message naming the path or variable and the user, and nothing
//! of it reaches a guest. A clone that hangs is killed at `gitCloneTimeoutSeconds`. The same
//! user's own file, own directory and an allow-listed variable do reach the guest, and root
//! still reads `/root`. The audit log names the user as actor. In root's sandbox the user
//! can neither exec, pause nor roll back, nor snapshot it or fork root's snapshot. Fails
//! (never skips) without root, libvirt or the default image.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SHARED: &str = "shared-Value-7Hq2";
const ROOT_ONLY: &str = "root-only-Value-p3Xw";

/// A user and a group made for this test with `useradd`/`groupadd`, and a file under
/// `/root`; `Drop` removes all three.
struct Throwaway {
    user: String,
    group: String,
    root_file: PathBuf,
}

impl Throwaway {
    fn new(pid: u32) -> Self {
        let t = Throwaway {
            user: format!("avm-e2e-u{pid}"),
            group: format!("avm-e2e-g{pid}"),
            root_file: PathBuf::from(format!("/root/agentvm-e2e-caller-{pid}.txt")),
        };
        run_ok(Command::new("groupadd").arg(&t.group));
        run_ok(
            Command::new("useradd")
                .args(["-M", "-U", "-s", "/usr/sbin/nologin", "-G"])
                .arg(&t.group)
                .arg(&t.user),
        );
        t
    }

    fn uid(&self) -> u32 {
        let out = Command::new("id")
            .args(["-u", &self.user])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Throwaway {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.root_file);
        let _ = Command::new("userdel").arg(&self.user).status();
        // userdel removes the user's own group; make sure.
        let _ = Command::new("groupdel")
            .arg(&self.user)
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("groupdel").arg(&self.group).status();
    }
}

/// An AgentRun on `pool` running `source` with `sh`, `extra` appended to the spec.
fn run_doc(name: &str, pool: &str, source: &str, extra: &str) -> String {
    format!("---\n{}", sh_run(name, pool, source, extra))
}

#[test]
fn a_socket_group_member_reads_only_what_they_may_read() {
    require_libvirt_and_image();
    let me = std::fs::metadata("/proc/self").unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(me.uid(), 0, "this test creates users: run it as root");
    assert_eq!(
        std::fs::metadata("/root").unwrap().permissions().mode() & 0o077,
        0,
        "/root must be closed to other users for this test to mean anything"
    );
    let shadow = std::fs::read_to_string("/etc/shadow").expect("/etc/shadow");
    let shadow_first = shadow.lines().next().unwrap().to_string();

    let pid = std::process::id();
    let who = Throwaway::new(pid);
    let uid = who.uid();
    let caller = format!("uid={uid}({})", who.user);
    // Readable by everyone, but inside /root.
    std::fs::write(&who.root_file, format!("root-file-{pid}\n")).unwrap();
    std::fs::set_permissions(&who.root_file, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut env = Env::new("caller");
    let pool = format!("e2ec{pid}");
    let image = format!("e2e-cimg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    for (k, v) in [
        ("AGENTVM_SOCKET_GROUP", who.group.as_str()),
        ("AGENTVM_SECRET_ENV_ALLOW_LIST", "AGENTVM_E2E_SHARED"),
        ("AGENTVM_E2E_SHARED", SHARED),
        ("AGENTVM_E2E_ROOT_ONLY", ROOT_ONLY),
        ("AGENTVM_GIT_CLONE_TIMEOUT_SECONDS", "3"),
    ] {
        env.controller_env.push((k.into(), v.into()));
    }
    std::fs::write(
        env.specs().join("pool.yaml"),
        small_pool(&pool, &image, 1, 1, ""),
    )
    .unwrap();
    env.start_controller();

    // The user's own corner: a private file, a directory, a symlink to /etc/shadow, and the
    // manifests (the CLI reads them as the user).
    let home = env.dir.join("home");
    std::fs::create_dir_all(home.join("ws")).unwrap();
    std::fs::write(home.join("note.txt"), format!("own-note-{pid}\n")).unwrap();
    std::fs::write(home.join("ws/data.txt"), "own-workspace\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", home.join("link")).unwrap();
    for p in [
        &home,
        &home.join("ws"),
        &home.join("note.txt"),
        &home.join("ws/data.txt"),
    ] {
        std::os::unix::fs::lchown(p, Some(uid), Some(uid)).unwrap();
    }
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        home.join("note.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let h = home.display();
    let root_file = who.root_file.display();

    // A git daemon on this machine that accepts and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(60));
        drop(held);
    });

    // Everything the user may not read, in one apply.
    let print =
        "for f in /tmp/x /work/*; do [ -e \"$f\" ] && head -c 200 \"$f\"; done; echo \"S=$S\"";
    let refused = [
        (
            "shadow",
            "InputUnavailable",
            "/etc/shadow".to_string(),
            "  files:\n  - {path: /tmp/x, fromFile: /etc/shadow}\n".to_string(),
        ),
        (
            "rootfile",
            "SecretUnavailable",
            root_file.to_string(),
            format!("  secretEnv:\n  - {{name: S, fromFile: {root_file}}}\n"),
        ),
        (
            "symlink",
            "InputUnavailable",
            format!("{h}/link"),
            format!("  files:\n  - {{path: /tmp/x, fromFile: {h}/link}}\n"),
        ),
        (
            "rootdir",
            "InputUnavailable",
            "/root".to_string(),
            "  workspace: {hostPath: /root, path: /work}\n".to_string(),
        ),
        (
            "rootenv",
            "SecretUnavailable",
            "AGENTVM_E2E_ROOT_ONLY".to_string(),
            "  secretEnv:\n  - {name: S, fromEnv: AGENTVM_E2E_ROOT_ONLY}\n".to_string(),
        ),
        (
            "hang",
            "InputUnavailable",
            format!("git://127.0.0.1:{port}/r.git"),
            format!("  workspace: {{gitUrl: \"git://127.0.0.1:{port}/r.git\", path: /work}}\n"),
        ),
    ];
    let mut manifest = String::new();
    for (name, _, _, extra) in &refused {
        manifest += &run_doc(name, &pool, print, extra);
    }
    // And what is theirs.
    manifest += &run_doc(
        "own",
        &pool,
        print,
        &format!("  files:\n  - {{path: /tmp/x, fromFile: {h}/note.txt}}\n  secretEnv:\n  - {{name: S, fromEnv: AGENTVM_E2E_SHARED}}\n  workspace: {{hostPath: {h}/ws, path: /work}}\n"),
    );
    std::fs::write(home.join("runs.yaml"), &manifest).unwrap();
    std::os::unix::fs::lchown(home.join("runs.yaml"), Some(uid), Some(uid)).unwrap();
    let out = env
        .cmd_as(&who.user, &["apply", "-f", &format!("{h}/runs.yaml")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply as {}: {}",
        who.user,
        String::from_utf8_lossy(&out.stderr)
    );

    // Root applies a run reading /root and a variable that is not allow-listed: as before.
    apply_yaml(
        &env,
        "root-run.yaml",
        &sh_run(
            "asroot",
            &pool,
            print,
            &format!("  files:\n  - {{path: /tmp/x, fromFile: {root_file}}}\n  secretEnv:\n  - {{name: S, fromEnv: AGENTVM_E2E_ROOT_ONLY}}\n"),
        ),
    );

    let names: Vec<&str> = refused
        .iter()
        .map(|r| r.0)
        .chain(["own", "asroot"])
        .collect();
    let t = env.wait("every run to end", Duration::from_secs(300), || {
        names.iter().all(|n| run_terminal(&run_phase(&env, n)))
    });
    eprintln!("all runs ended after {:.1}s", t.as_secs_f64());

    let logs_of = |name: &str| {
        let out = env.run(&["logs", &format!("run/{name}")]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (name, reason, path, _) in &refused {
        let s = env.status("run", name);
        let message = s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Completed"))
            .map(|c| c["message"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();
        assert_eq!(s["phase"], "Failed", "{name}: {s}");
        assert_eq!(s["reason"], *reason, "{name}: {s}");
        assert!(s["vm"].is_null(), "{name} took a VM: {s}");
        assert!(message.contains(path.as_str()), "{name}: {message}");
        if *name == "hang" {
            assert!(
                message.contains("did not finish within 3 s"),
                "{name}: {message}"
            );
        } else {
            assert!(message.contains(&caller), "{name}: {message}");
        }
        if *name == "rootenv" {
            assert!(message.contains("secretEnvAllowList"), "{name}: {message}");
        } else if *name != "hang" {
            assert!(message.contains("Permission denied"), "{name}: {message}");
        }
        eprintln!("{name}: {reason}: {message}");
        let logs = logs_of(name);
        assert!(
            !logs.contains(&shadow_first) && !logs.contains("root-file-"),
            "{name}: {logs}"
        );
    }

    // Their own file, directory and the allow-listed variable reach the guest.
    assert_eq!(
        run_phase(&env, "own"),
        "Succeeded",
        "{}",
        env.status("run", "own")
    );
    let logs = logs_of("own");
    assert!(logs.contains(&format!("own-note-{pid}")), "{logs}");
    assert!(logs.contains("own-workspace"), "{logs}");
    // The secret's value is redacted from output, so it shows as such.
    assert!(logs.contains("S=[REDACTED]"), "{logs}");
    // Root keeps full access.
    assert_eq!(
        run_phase(&env, "asroot"),
        "Succeeded",
        "{}",
        env.status("run", "asroot")
    );
    let logs = logs_of("asroot");
    assert!(
        logs.contains(&format!("root-file-{pid}")) && logs.contains("S=[REDACTED]"),
        "{logs}"
    );

    // `describe` names the submitter; the audit log has the user as actor.
    let d = env.ok(&["describe", "run/own"]);
    assert!(d.contains(&format!("Submitted by: {caller}")), "{d}");
    let audit = std::fs::read_to_string(env.dir.join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let event = |kind: &str, name: &str| {
        events
            .iter()
            .find(|e| e["event_type"] == kind && e["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} of {name} in:\n{audit}"))
    };
    let applied = event("object_applied", "own");
    assert_eq!(applied["actor"], caller.as_str());
    assert_eq!(applied["tool"], "api (agentvm apply)");
    assert_eq!(event("object_applied", "asroot")["actor"], "uid=0(root)");
    let refused_event = event("run_finished", "shadow");
    assert_eq!(refused_event["actor"], caller.as_str());
    assert_eq!(refused_event["details"]["reason"], "InputUnavailable");
    assert!(
        !audit.contains(SHARED) && !audit.contains(ROOT_ONLY) && !audit.contains(&shadow_first)
    );

    // The user may delete their run; the audit log says who did.
    let out = env
        .cmd_as(&who.user, &["delete", "run/own"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait(
        "the deletion in the audit log",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(env.dir.join("audit.log"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|e| {
                    e["event_type"] == "object_deleted"
                        && e["name"] == "own"
                        && e["actor"] == caller.as_str()
                })
        },
    );

    // root's sandbox: the user may neither run anything in it nor change its state.
    apply_yaml(
        &env,
        "rootbox.yaml",
        &format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: rootbox}}\nspec: {{poolRef: {pool}}}\n"),
    );
    env.wait("rootbox Running", Duration::from_secs(300), || {
        env.status("sandbox", "rootbox")["phase"] == "Running"
    });
    for args in [
        &["exec", "sandbox/rootbox", "--", "cat", "/etc/shadow"][..],
        &["pause", "sandbox/rootbox"][..],
        &["rollback", "sandbox/rootbox", "--to", "snapshot/x"][..],
    ] {
        let out = env.cmd_as(&who.user, args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} as {}: {err}", who.user);
        assert!(
            err.contains("Sandbox/rootbox belongs to uid=0(root)"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(env.status("sandbox", "rootbox")["phase"], "Running");
    assert_eq!(
        env.ok(&["exec", "sandbox/rootbox", "--", "echo", "root-may"]),
        "root-may\n"
    );
    // Nor copy it: a snapshot of it, or a fork of root's snapshot, fails `NotPermitted`
    // and nothing is taken or made.
    env.ok(&["snapshot", "sandbox/rootbox", "--name", "rootsnap"]);
    for (args, object, what) in [
        (
            &["snapshot", "sandbox/rootbox", "--name", "theirs"][..],
            ("snapshot", "theirs"),
            "only they and root may snapshot it",
        ),
        (
            &["fork", "snapshot/rootsnap", "--name", "stolen"][..],
            ("sandbox", "stolen"),
            "only they and root may fork it",
        ),
    ] {
        let out = env.cmd_as(&who.user, args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} as {}: {err}", who.user);
        assert!(err.contains(what), "{args:?}: {err}");
        let st = env.status(object.0, object.1);
        assert_eq!(st["phase"], "Failed", "{st}");
        assert!(
            st["conditions"].to_string().contains("NotPermitted"),
            "{st}"
        );
    }
    let vm = env.status("sandbox", "rootbox")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, snaps) = virsh(&["snapshot-list", &vm, "--name"]);
    assert!(!snaps.contains("theirs"), "{snaps}");
    assert!(!virsh(&["domstate", "agentvm-sbx-stolen"]).0);
}
