//! Tier 2: libvirt networks through libvirt's in-process `test:///default` driver (no daemon,
//! no bridges: nothing reaches the host's network), and the generated network and nwfilter XML
//! checked against libvirt's own RNG schemas. The test driver has no nwfilter support; filters
//! are defined for real in tier 3.

use std::process::Command;

use agentvm_api::{EgressRule, NetworkFilterSpec, NetworkMode, NetworkSpec, PortRange, Protocol};
use agentvm_backend::libvirt_net::DefineOutcome;
use agentvm_backend::netxml::{bridge_name, libvirt_name, NetworkDef, NwFilterDef};
use agentvm_backend::{BackendError, Libvirt, Owner};

fn test_driver() -> Libvirt {
    Libvirt::connect("test:///default").expect("libvirt test driver")
}

fn owner(name: &str, hash: &str) -> Owner {
    Owner {
        kind: agentvm_api::Kind::Network.into(),
        name: name.into(),
        spec_hash: hash.into(),
        generation: 1,
    }
}

fn nat(name: &str, subnet: &str) -> NetworkDef {
    NetworkDef {
        name: libvirt_name(name),
        spec: NetworkSpec {
            mode: NetworkMode::Nat,
            subnet: subnet.parse().unwrap(),
            dhcp: None,
        },
        owner: owner(&format!("{name}<&\"'>"), "h1"),
    }
}

/// Remove leftovers of an earlier, aborted run (the test driver's state is per process, so
/// this only matters within one run, but costs nothing).
fn clear(lv: &Libvirt, name: &str) {
    if let Ok(net) = lv.raw().lookup_network_by_name(name) {
        let _ = net.destroy();
        let _ = net.undefine();
    }
}

#[test]
fn network_define_start_destroy_undefine_through_backend() {
    let lv = test_driver();
    let def = nat("t2-lifecycle", "192.168.201.0/24");
    clear(&lv, &def.name);

    assert_eq!(lv.define_network(&def).unwrap(), DefineOutcome::Created);
    let info = lv.network_info(&def.name).unwrap();
    assert!(!info.active);
    assert!(!info.autostart, "agentvm never autostarts networks");
    assert_eq!(
        info.owner.as_ref(),
        Some(&def.owner),
        "owner metadata survives libvirt"
    );
    assert_eq!(info.bridge, Some(bridge_name(&def.name)));

    assert_eq!(lv.define_network(&def).unwrap(), DefineOutcome::Unchanged);
    let mut changed = def.clone();
    changed.owner.spec_hash = "h2".into();
    changed.owner.generation = 2;
    changed.spec.mode = NetworkMode::Isolated;
    assert_eq!(lv.define_network(&changed).unwrap(), DefineOutcome::Updated);
    let info = lv.network_info(&def.name).unwrap();
    assert_eq!(info.owner.as_ref().unwrap().spec_hash, "h2");

    lv.start_network(&def.name).unwrap();
    assert!(lv.network_info(&def.name).unwrap().active);
    lv.start_network(&def.name)
        .expect("starting a running network succeeds");
    let owned = lv.list_owned_networks().unwrap();
    assert!(
        owned.iter().any(|n| n.name == def.name && n.active),
        "{owned:?}"
    );

    lv.destroy_network(&def.name).unwrap();
    assert!(!lv.network_info(&def.name).unwrap().active);
    lv.destroy_network(&def.name)
        .expect("destroying a stopped network succeeds");

    lv.start_network(&def.name).unwrap();
    lv.undefine_network(&def.name)
        .expect("undefine stops a running network first");
    let err = lv.network_info(&def.name).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    lv.undefine_network(&def.name)
        .expect("undefining a missing network succeeds");
    lv.destroy_network(&def.name)
        .expect("destroying a missing network succeeds");
    let err = lv.start_network(&def.name).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(!lv
        .list_owned_networks()
        .unwrap()
        .iter()
        .any(|n| n.name == def.name));
}

#[test]
fn foreign_networks_are_never_touched() {
    let lv = test_driver();

    // libvirt's predefined `default` network: active, no agentvm metadata.
    let before = lv.network_info("default").unwrap();
    assert!(before.active);
    assert_eq!(before.owner, None);
    for (what, r) in [
        ("destroy", lv.destroy_network("default")),
        ("undefine", lv.undefine_network("default")),
        ("start", lv.start_network("default")),
    ] {
        assert!(
            matches!(
                r,
                Err(BackendError::NotOwned {
                    kind: "network",
                    ..
                })
            ),
            "{what} default: {r:?}"
        );
    }
    assert_eq!(lv.network_info("default").unwrap(), before);
    assert!(!lv
        .list_owned_networks()
        .unwrap()
        .iter()
        .any(|n| n.name == "default"));

    // A network named like ours but defined by somebody else.
    let name = libvirt_name("t2-foreign");
    clear(&lv, &name);
    lv.raw()
        .define_network_xml(&format!(
            "<network><name>{name}</name><bridge name='virbr-foreign'/>\
             <ip address='192.168.202.1' netmask='255.255.255.0'/></network>"
        ))
        .unwrap();
    let mut def = nat("t2-foreign", "192.168.203.0/24");
    def.owner.name = "t2-foreign".into();
    let err = lv.define_network(&def).unwrap_err();
    assert!(matches!(err, BackendError::NotOwned { .. }), "{err}");
    assert!(matches!(
        lv.undefine_network(&name),
        Err(BackendError::NotOwned { .. })
    ));
    let info = lv.network_info(&name).unwrap();
    assert_eq!(
        info.bridge.as_deref(),
        Some("virbr-foreign"),
        "not redefined"
    );
    assert_eq!(info.owner, None);
    clear(&lv, &name);
}

#[test]
fn names_without_the_agentvm_prefix_are_refused() {
    let lv = test_driver();
    let mut def = nat("t2-noprefix", "192.168.204.0/24");
    def.name = "t2-noprefix".into();
    let err = lv.define_network(&def).unwrap_err();
    assert!(err.to_string().contains("agentvm-"), "{err}");
    assert!(lv.network_info("t2-noprefix").unwrap_err().is_not_found());
}

#[test]
fn test_driver_has_no_nwfilter_and_says_so_with_a_typed_error() {
    let lv = test_driver();
    let err = lv.list_owned_nwfilters().unwrap_err();
    assert!(matches!(err, BackendError::Libvirt { .. }), "{err}");
}

fn validate(kind: &str, xml: &str) {
    let dir = std::env::temp_dir().join(format!("agentvm-t2-xml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{kind}.xml"));
    std::fs::write(&path, xml).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&path)
        .arg(kind)
        .output()
        .unwrap_or_else(|e| {
            panic!("virt-xml-validate (package libvirt-clients) must be installed: {e}")
        });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{kind} XML does not validate against libvirt's schema:\n{}\n{}\n{xml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn generated_xml_validates_against_libvirts_schemas() {
    let mut def = nat("t2-schema", "10.77.0.0/16");
    validate("network", &def.to_xml().unwrap());
    def.spec.mode = NetworkMode::Isolated;
    def.spec.subnet = "10.78.0.0/29".parse().unwrap();
    validate("network", &def.to_xml().unwrap());

    let filter_owner = Owner {
        kind: agentvm_api::Kind::NetworkFilter.into(),
        name: "egress<&\"'>".into(),
        spec_hash: "ab".repeat(32),
        generation: 3,
    };
    let default = NwFilterDef {
        name: libvirt_name("egress"),
        spec: NetworkFilterSpec::predecessor_default(),
        owner: filter_owner.clone(),
    };
    validate("nwfilter", &default.to_xml().unwrap());
    let mut everything = default.clone();
    everything.spec = NetworkFilterSpec {
        egress: vec![
            EgressRule {
                protocol: Protocol::Udp,
                ports: vec![PortRange::range(1000, 2000)],
                destinations: vec!["203.0.113.0/24".parse().unwrap()],
                domains: vec![],
                description: Some("quotes \" ' and <tags> & ampersands".into()),
            },
            EgressRule::new(Protocol::Icmp, []),
            EgressRule::new(Protocol::All, []),
        ],
        allow_dhcp: false,
        allow_established: false,
    };
    validate("nwfilter", &everything.to_xml().unwrap());
}
