//! The store's unit tests.

use super::*;
use std::path::Path;

use agentvm_api::{AgentRun, AgentRunSpec, ImageStatus, SecretEnvVar};
use agentvm_api::{Kind, KindStatus, Resource};

fn image(name: &str, suite: &str) -> Resource {
    let text = format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  suite: {suite}\n"
    );
    agentvm_api::parse_str(&text, "t.yaml").unwrap()[0]
        .resource
        .clone()
}

pub(super) fn run(name: &str) -> Resource {
    AgentRun::new(
        name,
        AgentRunSpec::command("sandbox", "echo", vec!["hi".into()]),
    )
    .into()
}

fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
    (dir, store)
}

/// The next `n` events of `events`, each within 5 s.
fn next_events(events: &mut broadcast::Receiver<StoreEvent>, n: usize) -> Vec<StoreEvent> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut seen = Vec::with_capacity(n);
        while seen.len() < n {
            let e = tokio::time::timeout(std::time::Duration::from_secs(5), events.recv())
                .await
                .expect("an event within 5 s")
                .unwrap();
            seen.push(e);
        }
        seen
    })
}

fn spec_dir(file: &str) -> Manager {
    Manager::SpecDir { file: file.into() }
}

pub(super) const API: ApplyOptions = ApplyOptions {
    force: false,
    dry_run: false,
};

#[test]
fn the_store_file_is_readable_by_its_owner_only_even_one_made_before() {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let (d, store) = temp_store();
    let path = d.path().join(STORE_FILE);
    store
        .apply(image("i", "bookworm"), spec_dir("a.yaml"), API)
        .unwrap();
    assert_eq!(mode(&path), 0o600);
    drop(store);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let store = Store::open(&path).unwrap();
    assert_eq!(mode(&path), 0o600);
    assert!(
        store.get(Kind::Image, "i").unwrap().is_some(),
        "the data is kept"
    );
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join(STORE_FILE);
    {
        let store = Store::open(&path).unwrap();
        store
            .apply(image("base", "bookworm"), spec_dir("x.yaml"), API)
            .unwrap();
        store
            .update_status(
                "base",
                ImageStatus {
                    phase: agentvm_api::ImagePhase::Ready,
                    ..ImageStatus::default()
                },
            )
            .unwrap();
        store.apply(run("r"), Manager::Api, API).unwrap();
        store
            .append_output("r", OutputStream::Stderr, b"err", 1 << 20)
            .unwrap();
        store.request_delete(Kind::AgentRun, "r", None).unwrap();
        // A second open of the same file fails clearly.
        let err = Store::open(&path).unwrap_err();
        assert!(err.to_string().contains("already open"), "{err}");
    }
    let store = Store::open(&path).unwrap();
    let img = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(img.manager, spec_dir("x.yaml"));
    assert_eq!(img.status_json()["phase"], "Ready");
    let r = store.get(Kind::AgentRun, "r").unwrap().unwrap();
    assert!(r.is_deleting());
    let out = store.read_output("r", 0, 100).unwrap();
    assert_eq!(out.bytes(), b"err");
    assert_eq!(out.chunks[0].stream, OutputStream::Stderr);
}

#[test]
fn output_appends_reads_and_caps() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
    assert!(matches!(
        store.append_output("ghost", OutputStream::Stdout, b"x", 6),
        Err(StoreError::NotFound(_))
    ));
    store.apply(run("r"), Manager::Api, API).unwrap();
    assert_eq!(
        store.read_output("r", 0, 100).unwrap(),
        OutputRead::default()
    );
    assert_eq!(
        store
            .append_output("r", OutputStream::Stdout, b"abcd", 6)
            .unwrap(),
        4
    );
    assert_eq!(
        store
            .append_output("r", OutputStream::Stderr, b"EF", 6)
            .unwrap(),
        2
    );
    let all = store.read_output("r", 0, 100).unwrap();
    assert_eq!(all.bytes(), b"abcdEF");
    assert_eq!(all.next_offset, 6);
    assert!(!all.truncated);
    // From inside the first chunk.
    let part = store.read_output("r", 2, 100).unwrap();
    assert_eq!(part.bytes(), b"cdEF");
    assert_eq!(part.chunks[1].stream, OutputStream::Stderr);
    // Nothing new at the end.
    let end = store.read_output("r", 6, 100).unwrap();
    assert!(end.chunks.is_empty());
    assert_eq!(end.next_offset, 6);
    // The cap (per stream) keeps the first bytes and counts and marks the rest.
    assert_eq!(
        store
            .append_output("r", OutputStream::Stdout, b"123456", 6)
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .append_output("r", OutputStream::Stdout, b"7", 6)
            .unwrap(),
        0
    );
    let all = store.read_output("r", 0, 100).unwrap();
    assert_eq!(all.bytes(), b"abcdEF12");
    assert!(all.truncated);
    assert_eq!(all.dropped, 5);
    // stderr has its own room.
    assert_eq!(
        store
            .append_output("r", OutputStream::Stderr, b"GHIJKL", 6)
            .unwrap(),
        4
    );
    assert_eq!(store.read_output("r", 0, 100).unwrap().dropped, 7);
    // Bounded reads return whole chunks and resume.
    let first = store.read_output("r", 0, 1).unwrap();
    assert_eq!(first.bytes(), b"abcd");
    let next = store.read_output("r", first.next_offset, 1).unwrap();
    assert_eq!(next.bytes(), b"EF");
}

#[test]
fn secrets_never_enter_the_store() {
    let (dir, store) = temp_store();
    std::env::set_var("AGENTVM_TEST_SECRET_VALUE", "s3cr3t-value-xyz");
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, "file-secret-abc\n").unwrap();
    let mut spec = AgentRunSpec::command("sandbox", "true", vec![]);
    spec.secret_env = vec![
        SecretEnvVar {
            name: "TOKEN".into(),
            from_env: Some("AGENTVM_TEST_SECRET_VALUE".into()),
            from_file: None,
        },
        SecretEnvVar {
            name: "OTHER".into(),
            from_env: None,
            from_file: Some(secret_file),
        },
    ];
    store
        .apply(AgentRun::new("s", spec).into(), Manager::Api, API)
        .unwrap();
    drop(store);
    let bytes = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"AGENTVM_TEST_SECRET_VALUE"));
    assert!(!contains(b"s3cr3t-value-xyz"));
    assert!(!contains(b"file-secret-abc"));
}

mod memory {
    use super::*;

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn memory_stays_bounded_however_much_output_runs_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        let chunk = vec![b'a'; 1024 * 1024];
        let before = rss_kib();
        // 200 MiB of output over 20 runs (redb's default cache kept nearly all of it).
        for r in 0..20 {
            let name = format!("r{r}");
            store
                .apply(super::run(&name), Manager::Api, super::API)
                .unwrap();
            for _ in 0..10 {
                store
                    .append_output(&name, OutputStream::Stdout, &chunk, u64::MAX)
                    .unwrap();
            }
        }
        let grew = rss_kib().saturating_sub(before);
        assert!(
            grew < 100 * 1024,
            "RSS grew by {grew} KiB for 200 MiB of output (cache {STORE_CACHE_BYTES} bytes)"
        );
    }
}

/// The store's rules on the local file.
mod local {
    use super::*;

    fn temp_store() -> (Box<dyn std::any::Any>, Store) {
        let (dir, store) = super::temp_store();
        (Box::new(dir), store)
    }

    include!("semantics.rs");
}

/// The same rules on a real etcd (a one-member cluster on loopback).
mod etcd {
    use super::*;

    fn temp_store() -> (Box<dyn std::any::Any>, Store) {
        crate::testing::etcd_store()
    }

    include!("semantics.rs");

    #[test]
    fn another_node_sees_the_objects_and_hears_of_every_change() {
        let server = crate::testing::shared_etcd();
        let config = server.config(&format!("/test-{}-nodes", std::process::id()));
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Store::open_cluster(&config, d1.path().join(STORE_FILE)).unwrap();
        let b = Store::open_cluster(&config, d2.path().join(STORE_FILE)).unwrap();
        let mut events = b.subscribe();
        a.apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        a.update_status(
            "base",
            ImageStatus {
                digest: Some("x".into()),
                ..Default::default()
            },
        )
        .unwrap();
        a.request_delete(Kind::Image, "base", None).unwrap();
        a.finalize_delete(Kind::Image, "base").unwrap();
        let seen: Vec<_> = next_events(&mut events, 4)
            .into_iter()
            .map(|e| (e.key(), e.change))
            .collect();
        let key = ObjectKey::new(Kind::Image, "base");
        assert_eq!(
            seen,
            vec![
                (key.clone(), Change::Applied),
                (key.clone(), Change::StatusChanged),
                (key.clone(), Change::DeleteRequested),
                (key, Change::Removed),
            ]
        );
        // And reads what the first wrote.
        a.apply(image("other", "trixie"), Manager::Api, API)
            .unwrap();
        let got = b.get(Kind::Image, "other").unwrap().unwrap();
        assert_eq!(got.resource.spec_json()["suite"], "trixie");
    }

    #[test]
    fn a_cluster_that_does_not_answer_refuses_writes_with_a_clear_error() {
        let server = crate::testing::EtcdServer::start();
        let dir = tempfile::tempdir().unwrap();
        let store =
            Store::open_cluster(&server.config("/down"), dir.path().join(STORE_FILE)).unwrap();
        store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        server.kill();
        let started = std::time::Instant::now();
        let err = store
            .apply(image("base", "trixie"), Manager::Api, API)
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains(&server.endpoint), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "failed after {:?}",
            started.elapsed()
        );
        // Opening fails the same way.
        let err =
            Store::open_cluster(&server.config("/down"), dir.path().join("second")).unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    }
}

/// Nodes of a cluster: registration, election, fencing, on a real etcd.
mod membership {
    use crate::cluster::{Membership, NodeInfo, NODE_LEASE_TTL};
    use std::time::{Duration, Instant};

    fn node(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            vcpus: 2,
            memory_mib: 4096,
            accelerator: "tcg".into(),
            version: "test".into(),
            joined_at: agentvm_api::Timestamp::now(),
        }
    }

    fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !ok() {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn one_leader_acts_and_the_other_takes_over_when_it_leaves() {
        let server = crate::testing::shared_etcd();
        let config = server.config(&format!("/test-{}-election", std::process::id()));
        let a = Membership::join(&config, node("a")).unwrap();
        wait_for("a is elected", Duration::from_secs(10), || a.may_act());
        let b = Membership::join(&config, node("b")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert!(!b.may_act(), "only one node acts");
        let err = Membership::join(&config, node("a"))
            .err()
            .expect("a second a");
        assert!(err.to_string().contains("already registered"), "{err}");
        let nodes = b.nodes().unwrap();
        let names: Vec<_> = nodes
            .iter()
            .map(|n| (n.info.name.as_str(), n.leader))
            .collect();
        assert_eq!(names, vec![("a", true), ("b", false)]);
        assert!(nodes
            .iter()
            .all(|n| n.lease_seconds_left > 0 && n.info.vcpus == 2));
        drop(a);
        wait_for("b takes over", Duration::from_secs(10), || b.may_act());
        let nodes = b.nodes().unwrap();
        assert_eq!(nodes.len(), 1, "a's record left with its lease");
        assert!(nodes[0].leader);
    }

    #[test]
    fn a_node_that_cannot_renew_its_lease_stops_acting_before_it_expires() {
        let server = crate::testing::EtcdServer::start();
        let m = Membership::join(&server.config("/fence"), node("solo")).unwrap();
        wait_for("elected", Duration::from_secs(10), || m.may_act());
        server.kill();
        let killed = Instant::now();
        wait_for("fenced", NODE_LEASE_TTL + Duration::from_secs(2), || {
            !m.may_act()
        });
        assert!(killed.elapsed() <= NODE_LEASE_TTL + Duration::from_secs(1));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), m.lost())
                .await
                .expect("lost() resolves once the lease ran out");
        });
    }
}
