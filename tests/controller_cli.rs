//! End to end: the real `agentvm` binary as controller (spec dir + API socket) and as CLI
//! (apply, get in every format, describe, delete), against a libvirt URI the controller does
//! not need yet (`test:///default`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::Env;

/// Waits up to 20 s for `cond`.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    files
}

#[test]
fn controller_and_cli_end_to_end() {
    let mut env = Env::test_driver("controller-cli");
    env.workdir = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")));

    // Without a controller: a clear error.
    let err = env.fails(&["get", "pools"]);
    assert!(
        err.contains("controller not reachable at")
            && err.contains("agentvm controller --spec-dir DIR"),
        "{err}"
    );

    let specs = env.specs();
    let socket = env.socket();
    env.start_controller_with(&[
        "controller",
        "--spec-dir",
        specs.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
        "--without-reconcilers",
    ]);
    let pid = env.controller.as_ref().unwrap().id();

    // Apply every example.
    let files = examples();
    let mut args = vec!["apply"];
    for f in &files {
        args.extend(["-f", f.as_str()]);
    }
    let out = env.ok(&args);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 10, "{out}");
    assert!(lines.iter().all(|l| l.ends_with(" created")), "{out}");
    assert!(lines.contains(&"vmpool/sandbox created"), "{out}");
    let out = env.ok(&args);
    assert!(out.lines().all(|l| l.ends_with(" unchanged")), "{out}");

    // An invalid manifest: positions, nothing applied.
    let bad = env.state().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: never-applied\nspec: {}\n---\napiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata:\n  name: bad-pool\nspec:\n  template:\n    imageRef: x\n  minReady: 1\n  maxSize: 2\n  sizeGib: 3\n",
    )
    .unwrap();
    let err = env.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(err.contains("bad.yaml:16:3: spec.sizeGib"), "{err}");
    assert!(err.contains("nothing was applied"), "{err}");
    assert!(env
        .fails(&["get", "img", "never-applied"])
        .contains("not found"));

    // get, in every format.
    let table = env.ok(&["get", "pools"]);
    let mut rows = table.lines();
    let header = rows.next().unwrap();
    assert!(header.starts_with("NAME") && header.contains("READY") && header.ends_with("AGE"));
    let sandbox = rows.find(|r| r.starts_with("sandbox ")).unwrap();
    assert!(
        sandbox.contains("debian-base") && sandbox.contains("0/1"),
        "{sandbox}"
    );
    let age = sandbox.split_whitespace().last().unwrap();
    assert!(age.ends_with('s') || age.ends_with('m'), "{age}");
    let no_headers = env.ok(&["get", "pool", "--no-headers"]);
    assert!(!no_headers.contains("NAME"));
    assert_eq!(no_headers.lines().count(), table.lines().count() - 1);
    let wide = env.ok(&["get", "vmpool", "sandbox", "-o", "wide"]);
    assert!(wide.contains("MANAGER") && wide.contains("api"), "{wide}");
    let yaml = env.ok(&["get", "pool", "sandbox", "-o", "yaml"]);
    let parsed = agentvm_api::parse_str(&yaml, "get.yaml").unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].resource.name(), "sandbox");
    let all_yaml = env.ok(&["get", "runs", "-o", "yaml"]);
    let runs = agentvm_api::parse_str(&all_yaml, "runs.yaml").unwrap();
    assert!(runs.len() >= 3);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "img", "debian-base", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "Image");
    assert_eq!(json["metadata"]["generation"], 1);
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["get", "images", "-o", "json"])).unwrap();
    assert_eq!(list["kind"], "List");
    assert!(list["items"].as_array().unwrap().len() >= 3);
    let names = env.ok(&["get", "run", "-o", "name"]);
    assert!(names.lines().any(|l| l == "agentrun/hello"), "{names}");
    let all = env.ok(&["get", "all"]);
    assert!(
        all.contains("network/") && all.contains("vmpool/sandbox"),
        "{all}"
    );
    let selected = env.ok(&["get", "pools", "-l", "tier=untrusted", "-o", "name"]);
    assert_eq!(selected.trim(), "vmpool/sandbox");
    let err = env.fails(&["get", "VmPol"]);
    assert!(err.contains("did you mean `VmPool`"), "{err}");

    // describe.
    let d = env.ok(&["describe", "pool/sandbox"]);
    assert!(d.contains("Name:         sandbox"), "{d}");
    assert!(d.contains("Managed by:   api"), "{d}");
    assert!(d.contains("imageRef: debian-base"), "{d}");
    assert!(d.contains("Status:       <none>"), "{d}");

    // The spec dir: a new file's objects appear, managed by it; deleting it removes them.
    std::fs::write(
        specs.join("team.yaml"),
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: team-image\nspec:\n  suite: trixie\n---\napiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata:\n  name: team-net\nspec:\n  mode: isolated\n  subnet: 10.77.0.0/24\n",
    )
    .unwrap();
    eventually("spec-dir objects", || {
        env.run(&["get", "img", "team-image"]).status.success()
            && env.run(&["get", "net", "team-net"]).status.success()
    });
    let wide = env.ok(&["get", "img", "team-image", "-o", "wide"]);
    assert!(wide.contains("spec-dir:team.yaml"), "{wide}");
    // The API may not change or delete them.
    let err = env.fails(&["delete", "img/team-image"]);
    assert!(err.contains("managed by spec-dir file team.yaml"), "{err}");
    std::fs::remove_file(specs.join("team.yaml")).unwrap();
    eventually("spec-dir objects pruned", || {
        !env.run(&["get", "img", "team-image"]).status.success()
            && !env.run(&["get", "net", "team-net"]).status.success()
    });

    // delete: by KIND/NAME, KIND NAME, -f; missing objects.
    assert_eq!(
        env.ok(&["delete", "run/hello", "--wait"]),
        "agentrun/hello deleted\n"
    );
    assert!(env
        .fails(&["delete", "run", "hello"])
        .contains("agentrun/hello not found"));
    assert_eq!(
        env.ok(&["delete", "run", "hello", "--ignore-not-found"]),
        ""
    );
    let hello = files
        .iter()
        .find(|f| f.ends_with("hello-isolated.yaml"))
        .unwrap();
    let out = env.ok(&["delete", "-f", hello, "--ignore-not-found", "--wait"]);
    assert_eq!(out, "image/debian-base deleted\nvmpool/sandbox deleted\n");

    // Stop the controller by its pid (SIGTERM): it exits cleanly and removes its socket.
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = env.controller.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "controller did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(env.state().join("controller.log")).unwrap();
    assert!(exit.success(), "controller exited with {exit}:\n{log}");
    assert!(!env.socket().exists());
    assert!(log.contains("controller ready"), "{log}");
}
