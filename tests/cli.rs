//! The kubectl-style commands of the real `agentvm` binary against a running controller
//! (`test:///default`, no VMs): apply --prune, diff exit codes, get in every format and
//! --watch, wait (met, deleted, timed out), logs, schema, completion, version, and the
//! exit codes scripts rely on.

use std::io::BufRead;
use std::process::{Child, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::Env;

/// A controller without reconcilers on `test:///default`, commands run in its state dir.
fn env() -> Env {
    let mut env = Env::test_driver("cli");
    env.workdir = Some(env.dir.clone());
    env
}

/// Starts the controller: the CLI's behaviour against the API is under test here, not
/// libvirt's (the test driver has no nwfilters, so a reconciled filter could never be
/// deleted).
fn start_controller(env: &mut Env) {
    env.start_controller_with(&["controller", "--without-reconcilers"]);
}

fn filter(name: &str, port: u16) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata:\n  name: {name}\n  labels:\n    team: cli\nspec:\n  egress:\n    - protocol: tcp\n      ports: [{port}]\n"
    )
}

/// Reads stdout lines of a child on a thread, so the test can wait with a timeout.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("no line for {what}"))
}

/// Waits for a child that prints little; kills it (by its pid) and fails after `limit`.
fn finish_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn kubectl_style_commands() {
    let mut env = env();

    // No controller: exit 3 and how to start it.
    let (code, _, err) = env.code(&["get", "nwf"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("agentvm controller --spec-dir DIR"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause is said once: {err}"
    );
    // version works without a controller, and says so.
    let v = env.ok(&["version"]);
    assert!(
        v.starts_with(&format!("Client version: {}\n", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(v.contains("Controller: controller not reachable"), "{v}");
    // Commands that need no controller.
    let schema: serde_json::Value = serde_json::from_str(&env.ok(&["schema", "nwf"])).unwrap();
    assert!(schema["properties"]["spec"].is_object(), "{schema}");
    let any: serde_json::Value = serde_json::from_str(&env.ok(&["schema"])).unwrap();
    assert!(any.is_object());
    let (code, _, err) = env.code(&["schema", "netwrk"]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean `Network`"), "{err}");
    for shell in ["bash", "zsh", "fish"] {
        let script = env.ok(&["completion", shell]);
        assert!(script.contains("agentvm"), "{shell}");
        assert!(
            script.contains("apply") && script.contains("wait"),
            "{shell}"
        );
    }
    // Bad usage is exit 2.
    assert_eq!(env.code(&["get"]).0, 2);
    assert_eq!(env.code(&["wait", "nwf/x", "--for=jsonpath=x"]).0, 2);

    start_controller(&mut env);
    let v: serde_json::Value = serde_json::from_str(&env.ok(&["version", "-o", "json"])).unwrap();
    assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["controller"]["version"], env!("CARGO_PKG_VERSION"));

    // apply --prune: a set of two files; idempotent; a removed file's object is pruned.
    let a = env.write("deploy/a.yaml", &filter("cli-a", 443));
    env.write("deploy/b.yaml", &filter("cli-b", 80));
    let deploy = env.state().join("deploy");
    let deploy = deploy.to_str().unwrap();
    // An object applied without --prune is never in the set.
    let outside = env.write("outside.yaml", &filter("cli-outside", 22));
    assert_eq!(
        env.ok(&["apply", "-f", &outside]),
        "networkfilter/cli-outside created\n"
    );
    assert_eq!(
        env.ok(&["apply", "--prune", "-f", deploy]),
        "networkfilter/cli-a created\nnetworkfilter/cli-b created\n"
    );
    assert_eq!(
        env.ok(&["apply", "--prune", "-f", deploy]),
        "networkfilter/cli-a unchanged\nnetworkfilter/cli-b unchanged\n"
    );

    // diff: 0 when nothing would change, 1 (with a unified diff) when something would.
    let (code, out, err) = env.code(&["diff", "-f", deploy]);
    assert_eq!((code, out.as_str()), (0, ""), "{err}");
    std::fs::write(&a, filter("cli-a", 8443)).unwrap();
    let (code, out, err) = env.code(&["diff", "-f", deploy]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("--- networkfilter/cli-a (live)"), "{out}");
    assert!(out.contains("\n-    - 443\n+    - 8443\n"), "{out}");
    assert!(!out.contains("cli-b"), "{out}");
    // A new object is all additions.
    let new = env.write("new.yaml", &filter("cli-new", 1));
    let (code, out, _) = env.code(&["diff", "-f", &new]);
    assert_eq!(code, 1);
    assert!(out.starts_with("--- /dev/null\n"), "{out}");
    // Errors are above 1.
    let (code, _, err) = env.code(&["diff", "-f", "does-not-exist.yaml"]);
    assert_eq!(code, 2, "{err}");

    std::fs::remove_file(env.state().join("deploy/b.yaml")).unwrap();
    let (code, out, _) = env.code(&["diff", "--prune", "-f", deploy]);
    assert_eq!(code, 1);
    assert!(
        out.contains("# networkfilter/cli-b: apply --prune would delete it"),
        "{out}"
    );
    assert_eq!(
        env.ok(&["apply", "--prune", "-f", deploy]),
        "networkfilter/cli-a configured\nnetworkfilter/cli-b pruned\n"
    );
    assert_eq!(
        env.ok(&["wait", "nwf/cli-b", "--for=delete", "--timeout=20s"]),
        "networkfilter/cli-b deleted\n"
    );
    // Not pruned: the object outside the set.
    env.ok(&["get", "nwf", "cli-outside"]);
    let (code, _, err) = env.code(&["diff", "--prune", "-f", deploy]);
    assert_eq!(code, 0, "{err}");

    // get in every format.
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "nwf", "cli-a", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "NetworkFilter");
    assert_eq!(
        json["metadata"]["labels"]["agentvm.dev/apply-set"]
            .as_str()
            .unwrap()
            .len(),
        "paths-".len() + 16
    );
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "networkfilters", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    let yaml = env.ok(&["get", "nwf", "-o", "yaml", "-l", "team=cli"]);
    let parsed = agentvm_api::parse_str(&yaml, "get.yaml").unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(
        env.ok(&["get", "nwf", "-o", "name"]),
        "networkfilter/cli-a\nnetworkfilter/cli-outside\n"
    );
    let wide = env.ok(&["get", "nwf", "-o", "wide"]);
    assert_eq!(
        wide.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "NAME",
            "RULES",
            "PHASE",
            "AGE",
            "GENERATION",
            "OBSERVED",
            "MANAGER"
        ],
        "{wide}"
    );
    assert!(wide.contains("cli-a") && wide.contains(" api"), "{wide}");
    assert!(!env.ok(&["get", "nwf", "--no-headers"]).contains("NAME"));
    // Same output twice: stable for scripts.
    assert_eq!(
        env.ok(&["get", "nwf", "-o", "json"]),
        env.ok(&["get", "nwf", "-o", "json"])
    );
    let (code, _, err) = env.code(&["get", "nwf", "missing"]);
    assert_eq!(code, 1);
    assert!(err.contains("not found"), "{err}");

    // get --watch: the table, then a line per change.
    let mut watch = env
        .cmd(&["get", "nwf", "--watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut watch);
    assert!(next_line(&lines, "header").starts_with("NAME"));
    assert!(next_line(&lines, "first row").starts_with("cli-a "));
    assert!(next_line(&lines, "second row").starts_with("cli-outside "));
    env.ok(&["apply", "-f", &new]);
    let line = next_line(&lines, "the new object");
    assert!(line.starts_with("cli-new "), "{line}");
    // Every --timeout takes the one duration syntax (`90`, `90s`, `5m`, `1h`).
    env.ok(&["delete", "nwf/cli-new", "--wait", "--timeout=5m"]);
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("Deleted")) {
        seen.push(next_line(&lines, "the deletion"));
    }
    assert!(seen.iter().all(|l| l.starts_with("cli-new ")), "{seen:?}");
    // End the watcher by its pid.
    watch.kill().unwrap();
    watch.wait().unwrap();

    // wait: deletion of a missing object is met at once; a condition that never comes
    // times out with exit 1 and says what it saw.
    assert_eq!(
        env.ok(&["wait", "nwf/never-existed", "--for=delete"]),
        "networkfilter/never-existed deleted\n"
    );
    let started = Instant::now();
    let (code, _, err) = env.code(&[
        "wait",
        "nwf/cli-a",
        "--for=condition=NeverHappens",
        "--timeout=1s",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "timed out after 1s waiting for networkfilter/cli-a: condition NeverHappens=True"
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let (code, _, err) = env.code(&["wait", "nwf/absent", "--for=phase=Ready"]);
    assert_eq!(code, 1);
    assert!(err.contains("networkfilter/absent not found"), "{err}");
    // wait --for=delete while it is being deleted.
    let waiter = env
        .cmd(&[
            "wait",
            "nwf",
            "cli-outside",
            "--for",
            "delete",
            "--timeout",
            "20",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["delete", "nwf/cli-outside"]);
    let out = finish_within(waiter, Duration::from_secs(30), "wait --for=delete");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "networkfilter/cli-outside deleted\n"
    );

    // logs: a run without output prints nothing; missing runs and other kinds are errors.
    let run = env.write(
        "run.yaml",
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: quiet\nspec:\n  poolRef: nowhere\n  script:\n    source: pass\n",
    );
    env.ok(&["apply", "-f", &run]);
    assert_eq!(env.ok(&["logs", "run/quiet"]), "");
    assert_eq!(env.ok(&["logs", "quiet"]), "");
    // -f follows until the run ends; a deleted run ends it.
    let follower = env
        .cmd(&["logs", "-f", "run/quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    env.ok(&["delete", "run/quiet"]);
    let out = finish_within(follower, Duration::from_secs(20), "logs -f");
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let (code, _, err) = env.code(&["logs", "run/missing"]);
    assert_eq!(code, 1);
    assert!(err.contains("agentrun/missing not found"), "{err}");
    let (code, _, err) = env.code(&["logs", "pool/x"]);
    assert_eq!(code, 1);
    assert!(err.contains("only AgentRuns have logs"), "{err}");

    // Unknown kinds: did-you-mean, exit 1.
    let (code, _, err) = env.code(&["get", "netwrk"]);
    assert_eq!(code, 1);
    assert!(err.contains("did you mean `Network`"), "{err}");
}
