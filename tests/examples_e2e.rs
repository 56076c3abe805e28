//! The shipped examples, unchanged, as a controller's spec directory on real libvirt: every
//! Network, NetworkFilter, Image and VmPool becomes Ready (the Claude Code and Aider images
//! are built from the registries, cached by recipe), and the runs that need nothing outside
//! this machine succeed — among them `claude --version` from the real Claude Code CLI.
//!
//! libvirtd must run inside the test network namespace (scripts/test.sh): the examples
//! declare a NAT network. That namespace has no route out, so the runs that want the
//! internet (`egress-check`, `aider-docstrings`) fail there, which the test checks too:
//! nothing leaves this machine.
//!
//! Then the real aider of `examples/aider.yaml`'s image edits a file through the egress
//! proxy: in a pool whose filter allows only `llm.test` (the test world's OpenAI-compatible
//! stub, in a namespace of its own next to the test namespace), the edit it is answered with
//! comes back as an artifact.

mod common;

use common::*;
use std::time::{Duration, Instant};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
const TEST_WORLD: &str = include_str!("support/egress_internet.py");

/// aider from the example's image, in a pool whose filter lets it reach the test world's
/// model only, asked to edit `hello.txt`.
const AIDER_STUB: &str = r#"
apiVersion: agentvm.dev/v1alpha1
kind: NetworkFilter
metadata: {name: aider-stub-egress}
spec:
  egress:
    - protocol: tcp
      ports: [80]
      domains: [llm.test]
      description: the test world's OpenAI-compatible model, and nothing else
---
apiVersion: agentvm.dev/v1alpha1
kind: VmPool
metadata: {name: aider-stub}
spec:
  template:
    imageRef: aider
    resources: {profile: custom, vcpu: 2, memoryMib: 2048, diskGib: 8}
    network: {mode: attached, networkRef: agent-nat, filterRef: aider-stub-egress}
  minReady: 0
  maxSize: 1
---
apiVersion: agentvm.dev/v1alpha1
kind: AgentRun
metadata: {name: aider-stub}
spec:
  poolRef: aider-stub
  files:
    - path: /workspace/hello.txt
      content: "hello\n"
  workingDir: /workspace
  env:
    OPENAI_API_KEY: stub-key-not-a-secret
    LITELLM_LOCAL_MODEL_COST_MAP: "True"
  command:
    program: /bin/sh
    args:
      - -c
      - >-
        aider --yes-always --no-git --no-check-update --no-show-release-notes
        --analytics-disable --no-show-model-warnings --no-stream --edit-format whole
        --map-tokens 0 --model openai/stub --openai-api-base http://llm.test/v1
        --message "Greet the reader in hello.txt" hello.txt && cat hello.txt
  artifacts:
    paths: [/workspace/hello.txt]
  timeoutSeconds: 1800
"#;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// libvirtd in the test namespace, and that namespace without a route out, so the examples'
/// runs cannot reach the internet.
fn assert_libvirtd_in_routeless_netns() {
    assert_libvirtd_in_test_netns();
    let pid = std::fs::read_to_string("/run/libvirtd.pid").unwrap();
    let routes =
        std::fs::read_to_string(format!("/proc/{}/net/route", pid.trim())).unwrap_or_default();
    assert!(
        !routes
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000")),
        "libvirtd's network namespace has a default route; the examples' runs could reach the internet"
    );
}

fn logs(env: &Env, run: &str) -> String {
    let out = env.cmd(&["logs", &format!("run/{run}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn the_examples_as_a_spec_dir_become_ready_and_their_local_runs_succeed() {
    assert_libvirtd_in_routeless_netns();
    let test_ns = assert_libvirtd_in_test_netns();
    require_libvirt_and_image();

    let mut env = Env::new("examples");
    // Only this test's domains are removed: Drop checks that their files live in its dir.
    env.domain_prefix = "agentvm-".into();
    assert!(
        !virsh(&["net-info", "agentvm-agent-nat"]).0
            && !virsh(&["nwfilter-dumpxml", "agentvm-agent-egress"]).0,
        "the examples' network or filter exists already (another run of the examples?); not touching it"
    );
    env.networks.push("agentvm-agent-nat".into());
    env.filters.push("agentvm-agent-egress".into());
    env.filters.push("agentvm-claude-code-egress".into());
    env.filters.push("agentvm-aider-egress".into());
    env.filters.push("agentvm-aider-stub-egress".into());
    // The test world: DNS that knows llm.test, and the model behind it.
    let mut world = Internet::new(&test_ns, "exw");
    let world_log = env.dir.join("world.log");
    let script = env.write("world.py", TEST_WORLD);
    world.spawn(
        &[
            "/usr/bin/python3",
            "-u",
            &script,
            &format!("llm.test={INTERNET_HOST}"),
        ],
        &world_log,
    );
    world.wait_listening('t', 80);
    world.wait_listening('u', 53);
    env.controller_env.push((
        "AGENTVM_EGRESS_RESOLVER".into(),
        format!("{INTERNET_HOST}:53"),
    ));
    // `claude --version` needs no key, but the manifest names one: any value will do here.
    let key = "sk-ant-examples-e2e-not-a-real-key";
    env.controller_env
        .push(("ANTHROPIC_API_KEY".into(), key.into()));
    for e in std::fs::read_dir(EXAMPLES).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") {
            std::fs::copy(e.path(), env.specs().join(&name)).unwrap();
        } else if name == "data" {
            copy_dir(&e.path(), &env.specs().join("data"));
        }
    }
    let start = Instant::now();
    env.start_controller();

    let ready = [
        ("network", "agent-nat"),
        ("networkfilter", "agent-egress"),
        ("networkfilter", "claude-code-egress"),
        ("networkfilter", "aider-egress"),
        ("image", "debian-base"),
        ("image", "debian-net"),
        ("image", "claude-code"),
        ("image", "aider"),
        ("vmpool", "sandbox"),
        ("vmpool", "net-pool"),
        ("vmpool", "claude-code"),
        ("vmpool", "aider"),
    ];
    let mut seen = std::collections::BTreeSet::new();
    env.wait(
        "every example object Ready",
        Duration::from_secs(40 * 60),
        || {
            let mut all = true;
            for (kind, name) in ready {
                let s = env.status(kind, name);
                if s["phase"] == "Ready" {
                    if seen.insert((kind, name)) {
                        eprintln!(
                            "{:>6.1}s {kind}/{name} Ready",
                            start.elapsed().as_secs_f64()
                        );
                    }
                } else {
                    all = false;
                }
            }
            all
        },
    );

    // net-pool asks for cpuShares 512: its status says whether this host applies it (this
    // sandbox's libvirt has no cgroup CPU controller; a real host does).
    let pool = env.status("vmpool", "net-pool");
    let shares = pool["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "CpuSharesApplied"))
        .unwrap_or_else(|| panic!("no CpuSharesApplied condition: {pool}"))
        .clone();
    eprintln!("net-pool {shares}");
    match shares["status"].as_str() {
        Some("True") => assert_eq!(shares["reason"], "Applied", "{shares}"),
        Some("False") => {
            assert_eq!(shares["reason"], "HostCannotEnforce", "{shares}");
            assert!(
                shares["message"]
                    .as_str()
                    .unwrap()
                    .contains("cpuShares 512 is not applied by this host"),
                "{shares}"
            );
        }
        _ => panic!("{shares}"),
    }
    // The weight is in the domains' definitions either way.
    for vm in vm_names(&pool) {
        let (_, xml) = virsh(&["dumpxml", &vm]);
        assert!(xml.contains("<shares>512</shares>"), "{vm}: {xml}");
    }

    let terminal = |phase: &serde_json::Value| {
        ["Succeeded", "Failed", "TimedOut", "Cancelled"]
            .iter()
            .any(|p| phase == p)
    };
    let runs = [
        "hello",
        "sum-numbers",
        "claude-version",
        "egress-check",
        "aider-docstrings",
    ];
    env.wait(
        "every example run finished",
        Duration::from_secs(20 * 60),
        || {
            runs.iter()
                .all(|r| terminal(&env.status("agentrun", r)["phase"]))
        },
    );
    for r in runs {
        let s = env.status("agentrun", r);
        eprintln!(
            "{:>6.1}s run/{r}: {} {} exit {}",
            start.elapsed().as_secs_f64(),
            s["phase"],
            s["reason"],
            s["exitCode"]
        );
    }

    let hello = env.status("agentrun", "hello");
    assert_eq!(hello["phase"], "Succeeded", "{hello:#}");
    assert!(logs(&env, "hello").contains("hello from"), "{hello:#}");

    let sum = env.status("agentrun", "sum-numbers");
    assert_eq!(sum["phase"], "Succeeded", "{sum:#}");
    assert!(logs(&env, "sum-numbers").contains("total:"), "{sum:#}");
    let artifacts = sum["artifacts"].as_array().expect("artifacts listed");
    let out_dir = artifacts
        .iter()
        .find(|a| a["path"] == "/workspace/out")
        .unwrap_or_else(|| panic!("/workspace/out not collected: {sum:#}"));
    let report = std::path::Path::new(out_dir["hostPath"].as_str().unwrap()).join("report.json");
    let on_host = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("{}: {e}; {sum:#}", report.display()));
    assert!(on_host.contains("\"total\": 42.5"), "{on_host}");

    // The real Claude Code CLI, installed from the npm registry at image build time.
    let claude = env.status("agentrun", "claude-version");
    assert_eq!(claude["phase"], "Succeeded", "{claude:#}");
    let out = logs(&env, "claude-version");
    assert!(
        out.contains("(Claude Code)"),
        "claude --version printed: {out}"
    );
    eprintln!("claude --version in the guest: {}", out.trim());

    // The Sandbox example: a Claude Code VM of that pool, kept, to exec into.
    env.wait(
        "sandbox/claude-session Running",
        Duration::from_secs(300),
        || env.status("sandbox", "claude-session")["phase"] == "Running",
    );
    let out = env.ok(&[
        "exec",
        "sandbox/claude-session",
        "--",
        "claude",
        "--version",
    ]);
    assert!(out.contains("(Claude Code)"), "in the sandbox: {out}");
    env.wait(
        "snapshot/claude-session-fresh Ready",
        Duration::from_secs(120),
        || env.status("snapshot", "claude-session-fresh")["phase"] == "Ready",
    );
    // A fork of that snapshot, as the example's comments show: on the pool's network, with
    // a MAC address and a lease of its own.
    exec_in(&env, "claude-session", "echo mine > /root/mine");
    let out = env.ok(&[
        "fork",
        "snapshot/claude-session-fresh",
        "--name",
        "claude-session-b",
    ]);
    eprintln!("{}", out.trim());
    let addr = |name: &str| {
        exec_in(
            &env,
            name,
            "ip -4 -o addr show scope global; cat /sys/class/net/e*/address",
        )
    };
    let (a, b) = (addr("claude-session"), addr("claude-session-b"));
    assert!(b.contains("inet "), "the fork has an address: {b}");
    assert_ne!(a, b, "the fork's address and MAC are its own");
    assert_eq!(
        exec_code(&env, "claude-session-b", "test -e /root/mine"),
        1,
        "the fork is the snapshot's state, not the source's later one"
    );
    env.ok(&["delete", "sandbox/claude-session-b"]);
    // The claude-code pool (`creation: template`) replaced the VM the sandbox took with one
    // restored from its template, on the pool's network.
    env.wait(
        "a claude-code VM from the template",
        Duration::from_secs(300),
        || {
            std::fs::read_to_string(env.state().join(agentvm_controller::audit::AUDIT_FILE))
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("vm_created")
                        && l.contains("\"claude-code\"")
                        && l.contains("\"fromTemplate\":true")
                })
        },
    );
    env.wait(
        "pool claude-code Ready again",
        Duration::from_secs(300),
        || env.status("pool", "claude-code")["ready"].as_u64() >= Some(1),
    );

    // The real aider through the egress proxy, to the test world's model only.
    std::fs::write(env.specs().join("aider-stub.yaml"), AIDER_STUB).unwrap();
    env.wait(
        "run/aider-stub finished",
        Duration::from_secs(35 * 60),
        || terminal(&env.status("agentrun", "aider-stub")["phase"]),
    );
    let run = env.status("agentrun", "aider-stub");
    let out = logs(&env, "aider-stub");
    eprintln!(
        "{:>6.1}s run/aider-stub: {} exit {}\n{out}\ntest world:\n{}",
        start.elapsed().as_secs_f64(),
        run["phase"],
        run["exitCode"],
        std::fs::read_to_string(&world_log).unwrap_or_default()
    );
    assert_eq!(run["phase"], "Succeeded", "{run:#}");
    let edited = run["artifacts"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["path"] == "/workspace/hello.txt"))
        .unwrap_or_else(|| panic!("hello.txt not collected: {run:#}"));
    let on_host = std::fs::read_to_string(edited["hostPath"].as_str().unwrap()).unwrap();
    assert_eq!(
        on_host, "Hello from the stub model, through agentvm's egress proxy.\n",
        "aider's edit, as an artifact"
    );
    let world_said = std::fs::read_to_string(&world_log).unwrap_or_default();
    assert!(
        world_said.contains("llm llm.test /v1/chat/completions"),
        "aider asked the model by name: {world_said}"
    );
    let allowed = run["egress"]["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["domain"] == "llm.test" && d["verdict"] == "allowed" && d["port"] == 80);
    assert!(allowed, "the run's egress summary lists llm.test: {run:#}");
    // aider also looks up its model list on GitHub at start: refused at DNS, and listed so.
    let refused = run["egress"]["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|d| d["domain"] == "raw.githubusercontent.com" && d["verdict"] != "allowed");
    assert!(
        refused,
        "the run's egress summary lists the refused lookup: {run:#}"
    );
    drop(world);

    // No route out of the test namespace: the internet runs fail, and say why.
    let egress = env.status("agentrun", "egress-check");
    assert_eq!(egress["phase"], "Failed", "{egress:#}");
    let aider = env.status("agentrun", "aider-docstrings");
    assert_eq!(aider["phase"], "Failed", "{aider:#}");
    assert!(aider["reason"].is_string(), "{aider:#}");

    // The key never reached the store or the controller's log.
    let log = env.log();
    assert!(!log.contains(key), "secret in the controller log");
    for entry in walk(&env.dir) {
        if let Ok(bytes) = std::fs::read(&entry) {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                "secret found in {}",
                entry.display()
            );
        }
    }
    eprintln!("examples e2e done in {:.0}s", start.elapsed().as_secs_f64());
}

/// `sh -c script` in sandbox `name`; its stdout (it must exit 0).
fn exec_in(env: &Env, name: &str, script: &str) -> String {
    env.ok(&["exec", &format!("sandbox/{name}"), "--", "sh", "-c", script])
}

/// `sh -c script` in sandbox `name`; its exit code.
fn exec_code(env: &Env, name: &str, script: &str) -> i32 {
    env.code(&["exec", &format!("sandbox/{name}"), "--", "sh", "-c", script])
        .0
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(walk(&p)),
            Ok(t) if t.is_file() && e.metadata().map(|m| m.len() < 256 << 20).unwrap_or(false) => {
                out.push(p)
            }
            _ => {}
        }
    }
    out
}
