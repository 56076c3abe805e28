//! The kubectl-style CLI of the real `agentvm` binary against a running `agentvm controller`
//! on real libvirt (`qemu:///system`, TCG), with one isolated pool of real VMs: apply the
//! examples that need no network (relative `hostPath` resolved against the manifest's
//! directory), `wait` for the pool (progress lines `ready N/M`) and for runs (phase and
//! condition), follow a run's logs, artifacts with size and sha256 (and the size cap cutting
//! one), get every kind in every output format and with a label selector, describe, `diff`
//! of an unchanged (exit 0) and a changed (exit 1) manifest, `delete --wait` and
//! `--ignore-not-found`. Fails (never skips) without libvirt or the default image.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .canonicalize()
        .unwrap()
}

fn example(name: &str) -> String {
    examples_dir().join(name).to_string_lossy().into_owned()
}

/// Runs `agentvm ARGS` with a bounded wait: (exit code, stdout, stderr).
fn code(env: &Env, args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = env
        .cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read both pipes on threads so a chatty child never blocks.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agentvm {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        t_out.join().unwrap(),
        t_err.join().unwrap(),
    )
}

fn ok(env: &Env, args: &[&str]) -> String {
    let (c, out, err) = code(env, args, Duration::from_secs(60));
    assert_eq!(
        c, 0,
        "agentvm {args:?} failed:\nstdout: {out}\nstderr: {err}"
    );
    out
}

fn json(env: &Env, args: &[&str]) -> Value {
    let out = ok(env, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn cli_against_a_controller_on_real_libvirt() {
    require_libvirt_and_image();
    let mut env = Env::new("cli");
    // The examples' pool is `sandbox`; its domains are ours only if their files are under
    // this test's state directory (the Drop guard checks that).
    env.domain_prefix = "agentvm-sandbox-".into();
    env.start_controller();

    // Apply the examples that need no network; run from another directory, so the
    // workspace's `hostPath: ./data` only works when resolved against the manifest's dir.
    let hello = example("hello-isolated.yaml");
    let artifacts = example("workspace-artifacts.yaml");
    let out = ok(&env, &["apply", "-f", &hello, "-f", &artifacts]);
    assert_eq!(
        out,
        "image/debian-base created\nvmpool/sandbox created\nagentrun/hello created\nagentrun/sum-numbers created\n"
    );
    // Idempotent.
    let out = ok(&env, &["apply", "-f", &hello, "-f", &artifacts]);
    assert!(
        out.lines().all(|l| l.ends_with(" unchanged")),
        "second apply: {out}"
    );
    let run = json(&env, &["get", "run", "sum-numbers", "-o", "json"]);
    assert_eq!(
        run["spec"]["workspace"]["hostPath"],
        examples_dir().join("data").to_string_lossy().as_ref(),
        "hostPath resolved against the manifest's directory"
    );

    // wait for the pool, with plain progress lines (stderr is not a terminal).
    let (c, out, err) = code(
        &env,
        &[
            "wait",
            "pool/sandbox",
            "--for=condition=Ready",
            "--timeout=5m",
        ],
        Duration::from_secs(330),
    );
    assert_eq!(c, 0, "wait pool: {out}\n{err}");
    assert_eq!(out, "vmpool/sandbox condition Ready=True met\n");
    assert!(
        err.lines()
            .any(|l| l.starts_with("waiting for vmpool/sandbox") && l.ends_with("ready 0/1")),
        "no progress line: {err}"
    );
    eprintln!("wait pool progress:\n{err}");

    // Follow a run's logs to its end.
    let (c, out, err) = code(&env, &["logs", "-f", "run/hello"], Duration::from_secs(300));
    assert_eq!(c, 0, "logs -f: {err}");
    assert!(
        out.starts_with("hello from ") && out.contains("Python 3"),
        "{out}"
    );
    // wait for a phase and for a condition.
    let (c, out, err) = code(
        &env,
        &["wait", "run/hello", "--for=phase=Succeeded", "--timeout=1m"],
        Duration::from_secs(90),
    );
    assert_eq!(c, 0, "{out}{err}");
    assert_eq!(out, "agentrun/hello phase Succeeded met\n");
    let (c, out, err) = code(
        &env,
        &[
            "wait",
            "run/sum-numbers",
            "--for=condition=Completed",
            "--timeout=5m",
        ],
        Duration::from_secs(330),
    );
    assert_eq!(c, 0, "{out}{err}");
    // A condition that does not come: exit 1 at the timeout, saying where it stands.
    let (c, _, err) = code(
        &env,
        &["wait", "run/hello", "--for=phase=Failed", "--timeout=2s"],
        Duration::from_secs(30),
    );
    assert_eq!(c, 1);
    assert!(
        err.contains("timed out") && err.contains("phase Succeeded"),
        "{err}"
    );

    // The workspace example: input from ./data, a directory artifact collected.
    let st = env.status("run", "sum-numbers");
    assert_eq!(st["phase"], "Succeeded", "{st}");
    assert_eq!(st["stdoutTail"], "total: 42.5\n", "{st}");
    let art = &st["artifacts"][0];
    assert_eq!(art["path"], "/workspace/out");
    let report = Path::new(art["hostPath"].as_str().unwrap()).join("report.json");
    let text = std::fs::read(&report).unwrap();
    assert_eq!(art["sizeBytes"].as_u64(), Some(text.len() as u64), "{art}");
    assert!(
        art.get("sha256").is_none(),
        "a directory has no sha256: {art}"
    );

    // Artifacts: size and sha256 per file; the size cap leaves one out and says so; a
    // missing path is reported. The input comes from a relative `fromFile`.
    let mdir = env.dir.join("manifests");
    std::fs::create_dir_all(&mdir).unwrap();
    let input = b"relative fromFile input\n";
    std::fs::write(mdir.join("input.txt"), input).unwrap();
    std::fs::write(
        mdir.join("art.yaml"),
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {name: capped, labels: {suite: cli}}\nspec:\n  poolRef: sandbox\n  files:\n    - {path: /root/in.txt, fromFile: ./input.txt}\n  script:\n    interpreter: sh\n    source: |\n      cp /root/in.txt /root/out.txt\n      head -c 2097152 /dev/urandom > /root/big.bin\n  artifacts:\n    paths: [/root/big.bin, /root/out.txt, /root/nope]\n    maxSizeMib: 1\n  timeoutSeconds: 120\n",
    )
    .unwrap();
    let art_file = mdir.join("art.yaml").to_string_lossy().into_owned();
    ok(&env, &["apply", "-f", &art_file]);
    let (c, out, err) = code(
        &env,
        &[
            "wait",
            "run/capped",
            "--for=phase=Succeeded",
            "--timeout=5m",
        ],
        Duration::from_secs(330),
    );
    assert_eq!(c, 0, "{out}{err}\n{}", env.status("run", "capped"));
    let st = env.status("run", "capped");
    let arts = st["artifacts"].as_array().unwrap();
    assert_eq!(arts.len(), 1, "{st}");
    assert_eq!(arts[0]["path"], "/root/out.txt");
    assert_eq!(arts[0]["sizeBytes"].as_u64(), Some(input.len() as u64));
    assert_eq!(arts[0]["sha256"], sha256_hex(input).as_str());
    let host = std::fs::read(arts[0]["hostPath"].as_str().unwrap()).unwrap();
    assert_eq!(host, input);
    let trunc = condition(&st, "ArtifactsTruncated").unwrap_or_else(|| panic!("{st}"));
    assert_eq!(trunc["status"], "True");
    assert_eq!(trunc["reason"], "SizeCapReached");
    assert!(
        trunc["message"].as_str().unwrap().contains("/root/big.bin"),
        "{trunc}"
    );
    let missing = condition(&st, "ArtifactsMissing").unwrap_or_else(|| panic!("{st}"));
    assert!(
        missing["message"].as_str().unwrap().contains("/root/nope"),
        "{missing}"
    );

    // get: every kind, every output format.
    for kind in ["img", "pool", "run", "net", "nwf"] {
        let list = json(&env, &["get", kind, "-o", "json"]);
        assert_eq!(list["kind"], "List", "{kind}");
        let items = list["items"].as_array().unwrap();
        let expect = match kind {
            "img" | "pool" => 1,
            "run" => 3,
            _ => 0,
        };
        assert_eq!(items.len(), expect, "{kind}: {list}");
        let yaml = ok(&env, &["get", kind, "-o", "yaml"]);
        if expect > 0 {
            let parsed = agentvm_api::parse_str(&yaml, "get.yaml").unwrap();
            assert_eq!(parsed.len(), expect, "{kind}: {yaml}");
        }
        let names = ok(&env, &["get", kind, "-o", "name"]);
        assert_eq!(names.lines().count(), expect, "{kind}: {names}");
        for format in [&[][..], &["-o", "wide"][..]] {
            let mut args = vec!["get", kind];
            args.extend_from_slice(format);
            let (c, table, err) = code(&env, &args, Duration::from_secs(30));
            assert_eq!(c, 0, "{err}");
            if expect > 0 {
                assert!(table.starts_with("NAME"), "{kind} {format:?}: {table}");
                assert_eq!(table.lines().count(), expect + 1, "{table}");
            } else {
                assert!(
                    err.starts_with("No ") && err.contains(" found."),
                    "{kind}: {err}"
                );
            }
        }
    }
    // The last run's VM is being reset (busy) for a moment: wait until the pool is Ready.
    ok(
        &env,
        &["wait", "pool/sandbox", "--for=phase=Ready", "--timeout=2m"],
    );
    let pools = ok(&env, &["get", "pool", "-o", "wide"]);
    eprintln!("{pools}");
    let row: Vec<&str> = pools.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..2], ["sandbox", "debian-base"], "{pools}");
    assert!(row[2].ends_with("/1") && row[2] != "0/1", "{pools}");
    assert_eq!(row[3..5], ["2", "Ready"], "{pools}");
    assert_eq!(row[7..9], ["light", "isolated"], "{pools}");
    let runs = ok(&env, &["get", "runs"]);
    assert!(runs.contains("Succeeded"), "{runs}");
    // One object in each format.
    assert_eq!(
        ok(&env, &["get", "pool", "sandbox", "-o", "name"]),
        "vmpool/sandbox\n"
    );
    let one = json(&env, &["get", "img", "debian-base", "-o", "json"]);
    assert_eq!(one["status"]["phase"], "Ready", "{one}");
    // Label selectors.
    assert_eq!(
        ok(&env, &["get", "pool", "-l", "tier=untrusted", "-o", "name"]),
        "vmpool/sandbox\n"
    );
    assert_eq!(
        ok(&env, &["get", "run", "-l", "suite=cli", "-o", "name"]),
        "agentrun/capped\n"
    );
    assert_eq!(
        ok(&env, &["get", "pool", "-l", "tier=trusted", "-o", "name"]),
        ""
    );

    // describe every kind that exists.
    for target in ["img/debian-base", "pool/sandbox", "run/capped"] {
        let text = ok(&env, &["describe", target]);
        assert!(text.contains("Conditions:"), "{target}: {text}");
        assert!(text.contains("Managed by:   api (agentvm apply)"), "{text}");
    }
    let text = ok(&env, &["describe", "run/capped"]);
    assert!(
        text.contains("ArtifactsTruncated") && text.contains("sha256"),
        "{text}"
    );
    let (c, _, err) = code(&env, &["describe", "pool/nope"], Duration::from_secs(30));
    assert_eq!(c, 1);
    assert!(err.contains("not found"), "{err}");

    // diff: unchanged → 0; changed → 1 with the change shown.
    let (c, out, err) = code(&env, &["diff", "-f", &hello], Duration::from_secs(30));
    assert_eq!(c, 0, "unchanged diff: {out}{err}");
    let changed = env.dir.join("manifests/hello-bigger.yaml");
    std::fs::write(
        &changed,
        std::fs::read_to_string(&hello)
            .unwrap()
            .replace("maxSize: 2 ", "maxSize: 3 "),
    )
    .unwrap();
    let (c, out, err) = code(
        &env,
        &["diff", "-f", changed.to_str().unwrap()],
        Duration::from_secs(30),
    );
    assert_eq!(c, 1, "changed diff: {out}{err}");
    assert!(
        out.contains("-  maxSize: 2") && out.contains("+  maxSize: 3"),
        "{out}"
    );

    // delete --wait; --ignore-not-found.
    let (c, out, err) = code(
        &env,
        &["delete", "run/capped", "--wait"],
        Duration::from_secs(120),
    );
    assert_eq!(c, 0, "{out}{err}");
    assert!(env.get("run", "capped").is_none());
    let (c, _, err) = code(&env, &["delete", "run/capped"], Duration::from_secs(30));
    assert_eq!(c, 1);
    assert!(err.contains("not found"), "{err}");
    let (c, _, err) = code(
        &env,
        &["delete", "run/capped", "--ignore-not-found"],
        Duration::from_secs(30),
    );
    assert_eq!(c, 0, "{err}");
    // Everything the examples declared, waiting for the VMs to be destroyed.
    let (c, out, err) = code(
        &env,
        &["delete", "-f", &artifacts, "-f", &hello, "--wait"],
        Duration::from_secs(300),
    );
    assert_eq!(c, 0, "{out}{err}");
    let ours: Vec<String> = domains_with_prefix(&env.domain_prefix)
        .into_iter()
        .filter(|d| virsh(&["dumpxml", d]).1.contains(env.dir.to_str().unwrap()))
        .collect();
    assert!(ours.is_empty(), "domains left: {ours:?}");
    assert_eq!(ok(&env, &["get", "pools", "-o", "name"]), "");
}
