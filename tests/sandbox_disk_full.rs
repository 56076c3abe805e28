//! A snapshot while the host disk holding the VM's files is full: the VM directory of the
//! controller lives on a small tmpfs that the test fills. The snapshot is refused up front
//! with a `HostDiskFull` condition (it waits, it does not fail), the sandbox runs on, libvirt
//! holds no half-taken snapshot, and once space is freed the snapshot is taken.
//!
//! Needs root (it mounts a tmpfs) and libvirtd started by `scripts/host-setup.sh` (which
//! lets libvirtd see file systems mounted after it started).

mod common;
#[path = "support/tinyfs.rs"]
mod tinyfs;

use std::time::Duration;

use common::*;
use tinyfs::TinyFs;

#[test]
fn a_snapshot_on_a_full_host_disk_waits_clearly_and_is_taken_once_space_returns() {
    require_libvirt_and_image();
    let mut env = Env::new("sbfull");
    // QEMU (libvirt's qemu user) passes through to its files: 0711 like the state dir.
    let fs = TinyFs::mount_on(&env.state().join("vms"), 900, "0711");
    let pid = std::process::id();
    let pool = format!("sbfull{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    std::fs::write(
        env.specs().join("pool.yaml"),
        small_pool(&pool, &format!("sbfull-img-{pid}"), 1, 2, ""),
    )
    .unwrap();
    std::fs::write(
        env.specs().join("sandbox.yaml"),
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: full{pid}}}\nspec:\n  poolRef: {pool}\n"),
    )
    .unwrap();
    env.start_controller();
    let sandbox = format!("full{pid}");
    env.wait("the sandbox Running", Duration::from_secs(300), || {
        env.get("sandbox", &sandbox)
            .is_some_and(|o| o["status"]["phase"] == "Running")
    });
    let vm = env.status("sandbox", &sandbox)["vm"]
        .as_str()
        .unwrap()
        .to_string();

    let filler = fs.fill();
    let snap = format!("snap{pid}");
    // Applied, not `agentvm snapshot`, which would wait for it to be taken.
    apply_yaml(
        &env,
        "snapshot.yaml",
        &format!("apiVersion: agentvm.dev/v1alpha1\nkind: Snapshot\nmetadata: {{name: {snap}}}\nspec: {{sandboxRef: {sandbox}}}\n"),
    );
    env.wait(
        "the HostDiskFull condition",
        Duration::from_secs(60),
        || {
            env.get("snapshot", &snap).is_some_and(|o| {
                condition(&o["status"], "Degraded").is_some_and(|c| c["reason"] == "HostDiskFull")
            })
        },
    );
    let st = env.status("snapshot", &snap);
    assert_ne!(st["phase"], "Failed", "it waits for space: {st}");
    let message = condition(&st, "Degraded").unwrap()["message"].to_string();
    assert!(
        message.contains("MiB free") && message.contains("free space there"),
        "{message}"
    );
    assert_eq!(env.status("sandbox", &sandbox)["phase"], "Running");
    assert!(running(&vm), "the VM runs on");
    let (_, list) = virsh(&["snapshot-list", &vm, "--name"]);
    assert!(
        !list.contains(&snap),
        "no half-taken snapshot in libvirt: {list}"
    );

    std::fs::remove_file(&filler).unwrap();
    let waited = env.wait("the snapshot Ready", Duration::from_secs(120), || {
        env.get("snapshot", &snap)
            .is_some_and(|o| o["status"]["phase"] == "Ready")
    });
    eprintln!("taken {:.1}s after space returned", waited.as_secs_f64());
    let out = env.ok(&["exec", &format!("sandbox/{sandbox}"), "--", "echo", "alive"]);
    assert!(out.contains("alive"), "{out}");
    // VMs first (their files are on the tmpfs), then the mount; the state directory could
    // not be removed while the mount was in it.
    let dir = env.state().to_path_buf();
    drop(env);
    drop(fs);
    let _ = std::fs::remove_dir_all(dir);
}
