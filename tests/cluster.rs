//! A cluster of two nodes on a real etcd, through the real binary: `agentvm controller
//! --cluster` on each, the CLI against either node's socket. Reconcilers are off (no
//! libvirt needed); the dispatcher still finalizes deletions, which only the leader does.

use std::time::Duration;

mod common;

use common::Env;

fn node(tag: &str, etcd: &str, name: &str) -> Env {
    let mut env = Env::test_driver(tag);
    let socket = env.socket();
    env.start_controller_with(&[
        "controller",
        "--socket",
        socket.to_str().unwrap(),
        "--without-reconcilers",
        "--metrics-address",
        "off",
        "--cluster",
        etcd,
        "--node",
        name,
    ]);
    env
}

/// `get nodes -o json` through `env`: (name, leader) pairs.
fn nodes(env: &Env) -> Vec<(String, bool)> {
    let out = env.ok(&["get", "nodes", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_string(),
                n["leader"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_nodes_share_objects_elect_one_leader_and_survive_its_loss() {
    let etcd = agentvm_store::testing::EtcdServer::start();
    let mut a = node("cluster-a", &etcd.endpoint, "node-a");
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

    // kill -9 of node-a: its lease runs out, node-b is (or stays) the leader alone, and
    // finalizes a deletion requested through it.
    a.kill_controller();
    let waited = b.wait("node-b alone and leading", Duration::from_secs(25), || {
        nodes(&b) == vec![("node-b".to_string(), true)]
    });
    println!("node-a's loss seen after {waited:?} (lease 10 s)");
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
