//! `agentvm run -f FILE` end to end on a real VM (TCG): pool warm-up steps, env, a secret from
//! the host environment that is redacted when the agent prints it, artifacts copied back, and
//! the run's exit code as the command's. Fails (never skips) when libvirt or the image is
//! missing.

use std::process::Command;

const MANIFEST: &str = r#"
apiVersion: agentvm.dev/v1alpha1
kind: Image
metadata: {name: base}
spec: {}
---
apiVersion: agentvm.dev/v1alpha1
kind: VmPool
metadata: {name: warm}
spec:
  template:
    imageRef: base
    resources: {profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}
    warmup:
      - name: prepare data
        run: "mkdir -p /srv/data && echo 42 > /srv/data/answer"
---
apiVersion: agentvm.dev/v1alpha1
kind: AgentRun
metadata: {name: local-check}
spec:
  poolRef: warm
  env: {WHO: "world <&>"}
  secretEnv:
    - {name: API_KEY, fromEnv: AGENTVM_TEST_SECRET}
  artifacts: {paths: [/root/out]}
  script:
    source: |
      import json, os, sys
      os.makedirs("/root/out", exist_ok=True)
      open("/root/out/result.json", "w").write(json.dumps({"ok": True}))
      print(json.dumps({"answer": open("/srv/data/answer").read().strip(), "who": os.environ["WHO"]}))
      print("key is", os.environ["API_KEY"])
      sys.exit(3)
"#;

#[test]
fn local_run_executes_in_a_real_vm_with_warmup_env_secrets_and_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let state = state_dir();
    let manifest = dir.path().join("run.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let secret = "s3cr3t-4f9a-value";
    let out = agentvm_cmd(state.path())
        .args(["run", "-f"])
        .arg(&manifest)
        .arg("--artifacts-dir")
        .arg(dir.path().join("artifacts"))
        .env("AGENTVM_TEST_SECRET", secret)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains(r#"{"answer": "42", "who": "world <&>"}"#),
        "warm-up and env reach the run: {stdout}"
    );
    assert!(stdout.contains("key is [REDACTED]"), "{stdout}");
    assert!(!stdout.contains(secret) && !stderr.contains(secret));
    assert!(
        stderr.contains("run/local-check: Failed (exit 3)"),
        "{stderr}"
    );
    // A new directory per run, `<run>-<UTC time>`, files 0640 (the controller's unpacker).
    let runs: Vec<_> = std::fs::read_dir(dir.path().join("artifacts"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}\n{stderr}");
    let name = runs[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("local-check-20"), "{name}");
    let artifact = runs[0].join("out/result.json");
    assert_eq!(
        std::fs::read_to_string(&artifact)
            .unwrap_or_else(|e| panic!("{}: {e}\n{stderr}", artifact.display())),
        r#"{"ok": true}"#
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&artifact).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o640);
    assert!(
        stderr.contains(&format!("-> {}", runs[0].join("out").display())),
        "{stderr}"
    );
    // The VM is gone: no domain and no files left in the state directory.
    let vms = state.path().join("vms");
    let left: Vec<_> = std::fs::read_dir(&vms)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "VM files left behind: {left:?}");
    let list = Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&list.stdout).contains("agentvm-run-local-check-"));
}

/// A state directory of the test's own under /var/lib (QEMU's user must pass through it).
fn state_dir() -> tempfile::TempDir {
    let state = tempfile::Builder::new()
        .prefix("agentvm-local-")
        .tempdir_in("/var/lib")
        .unwrap();
    std::fs::set_permissions(
        state.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    state
}

fn agentvm_cmd(state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_agentvm"));
    c.env("AGENTVM_STATE_DIR", state).env(
        "AGENTVM_ACCEL",
        std::env::var("AGENTVM_ACCEL").unwrap_or("tcg".into()),
    );
    c
}

#[test]
fn exec_i_feeds_stdin_p_forwards_a_port_and_exec_t_runs_on_a_terminal_of_this_size() {
    use std::io::Write;
    use std::process::Stdio;
    let state = state_dir();
    // -i: 1 MiB through stdin, counted and checksummed in the guest.
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    let want = {
        use sha2::Digest;
        format!("{:x}", sha2::Sha256::digest(&data))
    };
    // -p: a host port forwarded to a web server in the guest while the command runs; the
    // command ends once the server has logged the host's request.
    let host_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = agentvm_cmd(state.path())
        .args([
            "exec",
            "-i",
            "-p",
            &format!("{host_port}:8000"),
            "--",
            "sh",
            "-c",
        ])
        .arg(
            "mkdir -p /srv && cd /srv && echo served-from-guest > index.html; \
             python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>/tmp/log & \
             tee /tmp/in | wc -c; sha256sum /tmp/in; \
             while ! grep -q 'GET /index.html' /tmp/log 2>/dev/null; do sleep 0.2; done",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    // Fetch the page through the forwarded port (once the VM is up).
    let page = (0..240)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            let mut s = std::net::TcpStream::connect(("127.0.0.1", host_port)).ok()?;
            s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
            let mut body = String::new();
            std::io::Read::read_to_string(&mut s, &mut body).ok()?;
            body.contains("served-from-guest").then_some(body)
        })
        .expect("the guest's web server answers through the forwarded port");
    assert!(page.starts_with("HTTP/1.0 200"), "{page}");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.starts_with("1048576\n"), "{stdout}");
    assert!(
        stderr.contains(&format!("forwarding 127.0.0.1:{host_port} -> port 8000")),
        "{stderr}"
    );
    assert!(stdout.contains(&want), "{stdout}");

    // -t (under `script`, which gives agentvm a terminal of 30x90): the program sees a
    // terminal of that size; with -i, what is typed reaches it.
    let out = Command::new("script")
        .args(["-qec"])
        .arg(format!(
            "stty rows 30 cols 90; {} exec -it -- sh -c 'tty; stty size; read x; echo got:$x'",
            env!("CARGO_BIN_EXE_agentvm")
        ))
        .arg("/dev/null")
        .env("AGENTVM_STATE_DIR", state.path())
        .env(
            "AGENTVM_ACCEL",
            std::env::var("AGENTVM_ACCEL").unwrap_or("tcg".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            let mut i = c.stdin.take().unwrap();
            std::thread::spawn(move || {
                // Typed once the program waits for it (the VM boots first).
                for _ in 0..120 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    if i.write_all(b"typed\n").is_err() {
                        break;
                    }
                }
            });
            c.wait_with_output()
        })
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("/dev/pts/"), "{stdout}");
    assert!(stdout.contains("30 90"), "{stdout}");
    assert!(stdout.contains("got:typed"), "{stdout}");
}
