//! The object store's disk fills up: the controller's state directory lives on a 16 MiB
//! tmpfs that the test fills. `apply` then fails with a clear error (nothing stored), the
//! controller keeps running and serving reads, the store reopens uncorrupted after a
//! restart, and applies succeed again once space is freed — without a restart.
//!
//! Needs root (it mounts a tmpfs); fails loudly otherwise.

mod plain_controller;
#[path = "support/tinyfs.rs"]
mod tinyfs;

use std::path::{Path, PathBuf};

use plain_controller::PlainController;
use tinyfs::TinyFs;

/// An Image whose annotation makes it about 200 KiB big (redb does not compress).
fn big_image(dir: &Path, name: &str) -> PathBuf {
    let mut filler = String::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ name.len() as u64;
    while filler.len() < 200 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        filler.push_str(&format!("{x:016x}"));
    }
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\n  annotations:\n    example.com/filler: \"{filler}\"\nspec: {{}}\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_full_store_disk_refuses_writes_clearly_and_recovers_when_space_returns() {
    let fs = TinyFs::new(16);
    let outside = tempfile::tempdir().unwrap();
    let state = fs.mount.join("state");
    let mut c = PlainController::new(&state, &outside.path().join("api.sock"));
    c.start();

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let hello = examples.join("hello-isolated.yaml");
    c.ok(&["apply", "-f", hello.to_str().unwrap()]);
    let before = c.names();
    assert_eq!(
        before,
        ["agentrun/hello", "image/debian-base", "vmpool/sandbox"]
    );

    // Fill the filesystem, then apply big objects until the store cannot grow.
    let filler = fs.fill();
    let mut stored = Vec::new();
    let mut refused = None;
    for i in 0..60 {
        let name = format!("big-{i:02}");
        let file = big_image(outside.path(), &name);
        let out = c.run(&["apply", "-f", file.to_str().unwrap()]);
        if out.status.success() {
            stored.push(format!("image/{name}"));
            continue;
        }
        refused = Some((name, String::from_utf8_lossy(&out.stderr).into_owned()));
        break;
    }
    let (refused, err) = refused.expect("a full disk never refused an apply");
    assert!(
        err.contains("the object store's disk is full")
            && err.contains("this change was not stored")
            && err.contains("free space on that filesystem"),
        "{err}"
    );
    assert!(c.alive(), "controller died:\n{}", c.log_text());

    // Reads keep working; the refused object is not there; nothing else changed.
    let mut expected = before.clone();
    expected.extend(stored.iter().cloned());
    expected.sort();
    assert_eq!(c.names(), expected);
    let err = c.fails(&["get", "img", &refused]);
    assert!(err.contains("not found"), "{err}");
    let yaml = c.ok(&["get", "pool", "sandbox", "-o", "yaml"]);
    assert!(yaml.contains("imageRef: debian-base"), "{yaml}");
    // Another write while still full: refused the same way, still alive.
    let err = c.fails(&["delete", "run/hello"]);
    assert!(err.contains("disk is full"), "{err}");
    let err = c.fails(&[
        "apply",
        "-f",
        big_image(outside.path(), "big-again").to_str().unwrap(),
    ]);
    assert!(err.contains("disk is full"), "{err}");
    assert!(c.alive(), "controller died:\n{}", c.log_text());
    assert_eq!(c.names(), expected);

    // Space returns: applies succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    let file = big_image(outside.path(), &refused);
    let out = c.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(out.trim(), format!("image/{refused} created"));
    assert_eq!(
        c.ok(&["delete", "run/hello"]).trim(),
        "agentrun/hello deletion requested"
    );
    expected.push(format!("image/{refused}"));
    expected.retain(|n| n != "agentrun/hello");
    expected.sort();
    // Without reconcilers the controller removes a marked object at once.
    plain_controller::eventually("the run removed", 20, || c.names() == expected);

    // The store was reopened in place after the failed write (redb refuses every call
    // after an I/O error until it is reopened).
    assert!(
        c.log_text().contains("reopened after an I/O error"),
        "{}",
        c.log_text()
    );

    // A restart reopens the same store: nothing lost, nothing corrupt.
    assert!(
        c.stop(),
        "controller did not stop cleanly:\n{}",
        c.log_text()
    );
    c.start();
    assert_eq!(c.names(), expected);
    let json: serde_json::Value =
        serde_json::from_str(&c.ok(&["get", "img", &refused, "-o", "json"])).unwrap();
    assert_eq!(
        json["metadata"]["annotations"]["example.com/filler"]
            .as_str()
            .unwrap()
            .len(),
        200 * 1024
    );
    assert!(c.stop());
}
