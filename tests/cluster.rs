//! A cluster of two nodes on a real etcd, through the real binary: `agentvm controller
//! --cluster` on each, the CLI against either node's socket: shared objects, one leader,
//! a duplicate name refused, drain and uncordon, kill -9 of the leader, etcd gone. Reconcilers are off (no
//! libvirt needed); the dispatcher still finalizes deletions, which only the leader does.

use std::time::Duration;

mod common;

use common::{sh_run, Env};

fn controller_args<'a>(env: &Env, etcd: &'a str, name: &'a str) -> Vec<String> {
    [
        "controller",
        "--socket",
        env.socket().to_str().unwrap(),
        "--without-reconcilers",
        "--metrics-address",
        "off",
        "--cluster",
        etcd,
        "--node",
        name,
    ]
    .map(String::from)
    .to_vec()
}

fn start(env: &mut Env, etcd: &str, name: &str) {
    let args = controller_args(env, etcd, name);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.start_controller_with(&args);
}

fn node(tag: &str, etcd: &str, name: &str) -> Env {
    let mut env = Env::test_driver(tag);
    start(&mut env, etcd, name);
    env
}

/// `get nodes -o json` through `env`: (name, leader) pairs.
fn nodes(env: &Env) -> Vec<(String, bool)> {
    nodes_full(env)
        .into_iter()
        .map(|(n, leader, _)| (n, leader))
        .collect()
}

/// (name, leader, cordoned) of every node.
fn nodes_full(env: &Env) -> Vec<(String, bool, bool)> {
    let out = env.ok(&["get", "nodes", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["leader"].as_bool().unwrap(),
                n["cordoned"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_share_objects_elect_one_leader_and_survive_its_loss() {
    let etcd = agentvm_store::testing::EtcdServer::start();
    let a = node("cluster-a", &etcd.endpoint, "node-a");
    let b = node("cluster-b", &etcd.endpoint, "node-b");

    // Both registered, one of them the leader; the table shows roles and leases.
    b.wait("both nodes and a leader", Duration::from_secs(20), || {
        let n = nodes(&b);
        n.len() == 2 && n.iter().filter(|(_, l)| *l).count() == 1
    });
    let table = a.ok(&["get", "nodes"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("node-a") && table.contains("node-b"),
        "{table}"
    );
    assert!(
        table.contains("leader") && table.contains("standby"),
        "{table}"
    );

    // An object applied through one node is served by the other.
    let file = a.write(
        "image.yaml",
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: shared\nspec: {}\n",
    );
    assert!(a
        .ok(&["apply", "-f", &file])
        .contains("image/shared created"));
    let got = b
        .get("Image", "shared")
        .expect("node-b serves node-a's object");
    assert_eq!(got["metadata"]["generation"], 1);

    // A run's output is kept by the node that ran it; another node says where it is.
    let run = a.write("run.yaml", &sh_run("ran-elsewhere", "p", "echo hi", ""));
    a.ok(&["apply", "-f", &run]);
    let dir = tempfile::tempdir().unwrap();
    let store = agentvm_store::Store::open_cluster(
        &agentvm_store::ClusterConfig::new(vec![etcd.endpoint.clone()]),
        dir.path().join("store.redb"),
    )
    .unwrap();
    store
        .update_status_json(
            agentvm_api::Kind::AgentRun,
            "ran-elsewhere",
            serde_json::json!({"phase": "Succeeded", "node": "node-x"}),
        )
        .unwrap();
    drop(store);
    let err = b.fails(&["logs", "run/ran-elsewhere"]);
    assert!(
        err.contains("ran on node node-x, which keeps its output")
            && err.contains("this is node node-b"),
        "{err}"
    );

    // A second controller under a live node's name is refused, and says why.
    let mut dup = Env::test_driver("cluster-dup");
    let dup_socket = dup.socket();
    let out = dup
        .cmd(&[
            "controller",
            "--socket",
            dup_socket.to_str().unwrap(),
            "--without-reconcilers",
            "--metrics-address",
            "off",
            "--cluster",
            &etcd.endpoint,
            "--node",
            "node-a",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already registered"), "{err}");
    dup.controller = None;

    // Drain the leader: the other node leads, and the drained one stops (a service manager
    // starts it again); started again, it stands by, cordoned, until uncordoned.
    let leader = nodes(&b)
        .into_iter()
        .find(|(_, l)| *l)
        .map(|(n, _)| n)
        .unwrap();
    let (mut drained, other, other_name) = if leader == "node-a" {
        (a, b, "node-b")
    } else {
        (b, a, "node-a")
    };
    let out = other.ok(&["drain", &format!("node/{leader}")]);
    assert!(
        out.contains(&format!("node/{leader} drained: node/{other_name} leads")),
        "{out}"
    );
    let mut child = drained.controller.take().unwrap();
    other.wait(
        "the drained controller to stop",
        Duration::from_secs(20),
        || child.try_wait().unwrap().is_some(),
    );
    assert!(
        drained
            .log()
            .contains("cordoned (drained) and stepped down"),
        "{}",
        drained.log()
    );
    let _ = std::fs::remove_file(drained.socket());
    start(&mut drained, &etcd.endpoint, &leader);
    other.wait(
        "the drained node back, cordoned",
        Duration::from_secs(20),
        || nodes_full(&other).contains(&(leader.clone(), false, true)),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(nodes_full(&other).contains(&(other_name.to_string(), true, false)));
    assert!(other
        .ok(&["uncordon", &format!("node/{leader}")])
        .contains("uncordoned"));
    let table = other.ok(&["get", "nodes"]);
    assert!(
        table.contains("standby") && !table.contains("cordoned"),
        "{table}"
    );

    // kill -9 of the leader: its lease runs out, the other leads alone and finalizes a
    // deletion requested through it.
    let (mut a, b) = (other, drained);
    a.kill_controller();
    let waited = b.wait(
        "the other node alone and leading",
        Duration::from_secs(25),
        || nodes(&b) == vec![(leader.clone(), true)],
    );
    println!("the leader's loss seen after {waited:?} (lease 10 s)");
    b.ok(&["delete", "image/shared"]);
    b.wait("the deletion finalized", Duration::from_secs(20), || {
        b.get("Image", "shared").is_none()
    });

    // etcd gone: writes are refused with a clear error; reads of the API too.
    etcd.kill();
    let err = b.fails(&["apply", "-f", &file]);
    assert!(
        err.contains("cluster store") && err.contains("unavailable"),
        "{err}"
    );
}
