//! Tier 2: the real libvirt API through libvirt's in-process `test:///default` driver
//! (no hypervisor, no daemon). Domain lifecycle through agentvm's backend code.

use agentvm_backend::libvirt::DomainState;
use agentvm_backend::{Accelerator, BackendError, DomainSpec, Libvirt, Owner};

fn spec(name: &str) -> DomainSpec {
    DomainSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 256,
        cpu_shares: Some(512),
        disabled_cpu_features: Vec::new(),
        memory_hard_limit_mib: None,
        cpu_quota_percent: None,
        disk_io: Default::default(),
        net_bandwidth: Default::default(),
        disk: "/nonexistent/agentvm/disk.qcow2".into(),
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: "/nonexistent/initrd".into(),
        cmdline: "root=/dev/vda".into(),
        serial_log: "/nonexistent/serial.log".into(),
        nic: None,
        accelerator: Accelerator::Tcg,
        tcg_tb_cache_mib: None,
        free_page_reporting: true,
        owner: Owner {
            kind: agentvm_api::Kind::VmPool.into(),
            name: "pool-<&>".into(),
            spec_hash: "h1".into(),
            generation: 1,
        },
    }
}

#[test]
fn define_start_destroy_undefine_through_backend() {
    let lv = Libvirt::connect("test:///default").expect("test driver");
    let name = "agentvm-t2-lifecycle";
    let _ = lv.destroy_domain(name);
    let _ = lv.undefine_domain(name);

    lv.define_domain(&spec(name)).unwrap();
    assert_eq!(lv.domain_state(name).unwrap(), DomainState::ShutOff);
    let err = lv.define_domain(&spec(name)).unwrap_err();
    assert!(matches!(err, BackendError::AlreadyExists { .. }), "{err}");

    let owner = lv
        .domain_owner(name)
        .unwrap()
        .expect("owner metadata survives libvirt");
    assert_eq!(owner, spec(name).owner);

    lv.start_domain(name).unwrap();
    assert_eq!(lv.domain_state(name).unwrap(), DomainState::Running);
    let owned = lv.list_owned_domains().unwrap();
    assert!(owned
        .iter()
        .any(|d| d.name == name && d.state == DomainState::Running));

    lv.destroy_domain(name).unwrap();
    assert_eq!(lv.domain_state(name).unwrap(), DomainState::ShutOff);
    lv.destroy_domain(name)
        .expect("destroying a stopped domain succeeds");
    lv.undefine_domain(name).unwrap();
    let err = lv.domain_state(name).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    lv.undefine_domain(name)
        .expect("undefining a missing domain succeeds");
}

#[test]
fn foreign_domains_are_never_touched() {
    let lv = Libvirt::connect("test:///default").unwrap();
    // The test driver predefines a running domain called "test", not created by agentvm.
    assert_eq!(lv.domain_owner("test").unwrap(), None);
    assert!(!lv
        .list_owned_domains()
        .unwrap()
        .iter()
        .any(|d| d.name == "test"));
    for res in [
        lv.destroy_domain("test"),
        lv.undefine_domain("test"),
        lv.start_domain("test"),
    ] {
        let err = res.unwrap_err();
        assert!(matches!(err, BackendError::NotOwned { .. }), "{err}");
    }
    assert_eq!(lv.domain_state("test").unwrap(), DomainState::Running);
}

#[test]
fn missing_domain_is_typed_not_found() {
    let lv = Libvirt::connect("test:///default").unwrap();
    let err = lv.start_domain("agentvm-t2-missing").unwrap_err();
    assert!(
        matches!(err, BackendError::NotFound { kind: "domain", .. }),
        "{err}"
    );
}

#[test]
fn golden_snapshot_is_taken_reverted_to_and_removed_with_the_domain() {
    use agentvm_backend::golden::{ResetStrategy, GOLDEN_SNAPSHOT};
    use agentvm_backend::vm::VmFiles;

    let lv = Libvirt::connect("test:///default").unwrap();
    let name = "agentvm-t2-golden";
    let _ = lv.destroy_domain(name);
    let _ = lv.undefine_domain(name);
    let dir = tempfile::tempdir().unwrap();
    let files = VmFiles::new(dir.path(), name);
    std::fs::create_dir_all(&files.dir).unwrap();

    lv.define_domain(&spec(name)).unwrap();
    lv.start_domain(name).unwrap();
    // The test driver has no guest agent: take the golden state without parking's reseed.
    let golden = lv
        .take_golden(name, &files, ResetStrategy::SnapshotRevert)
        .expect("internal snapshot through the backend");
    assert_eq!(golden.strategy, ResetStrategy::SnapshotRevert);

    // The test driver has no guest agent, so revert through the libvirt API the strategy uses.
    let dom = lv.raw().lookup_domain_by_name(name).unwrap();
    let snap = virt::domain::Domain::lookup_snapshot_by_name(&dom, GOLDEN_SNAPSHOT, 0).unwrap();
    lv.destroy_domain(name).unwrap();
    assert_eq!(lv.domain_state(name).unwrap(), DomainState::ShutOff);
    snap.revert(0).unwrap();
    assert_eq!(
        lv.domain_state(name).unwrap(),
        DomainState::Running,
        "reverting to the golden snapshot brings back the running state"
    );

    lv.remove_golden(name, &files).unwrap();
    assert!(lv.domain_state(name).unwrap_err().is_not_found());
    assert!(!files.dir.exists());
}
