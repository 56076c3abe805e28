//! End to end with real libvirt (`qemu:///system`, TCG): the `agentvm controller` binary
//! reconciles a spec directory into pool VMs, networks and filters, repairs drift (VMs
//! destroyed or edited by hand, networks and filters removed by hand), survives
//! `kill -9` by adopting what it owns, removes what a deleted file declared, and never touches
//! a domain it does not own. Fails (never skips) without libvirt or the default image.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn pool_vms_follow_the_spec_dir_survive_drift_and_kill_9() {
    require_libvirt_and_image();
    let mut env = Env::new("pool");
    let pid = std::process::id();
    let pool = format!("e2e{pid}");
    let image = format!("e2e-img-{pid}");
    let prefix = format!("agentvm-{pool}-");
    env.domain_prefix = prefix.clone();
    let foreign = format!("agentvm-t3-foreign-{pid}");
    define_foreign_domain(&foreign, &env.dir);
    env.foreign = Some(foreign.clone());
    let file = env.specs().join("pool.yaml");
    std::fs::write(&file, pool_manifest(&pool, &image, 1)).unwrap();

    env.start_controller();
    let t_ready = env.wait("pool Ready with 1 VM", Duration::from_secs(180), || {
        pool_ready(&env, &pool, 1)
    });
    let img = env.status("image", &image);
    assert_eq!(img["phase"], "Ready", "{img}");
    assert!(img["diskPath"].as_str().unwrap().ends_with("disk.qcow2"));
    let vms = domains_with_prefix(&prefix);
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vm_names(&env.status("pool", &pool)), vms);
    assert!(running(&vms[0]));
    // The ownership metadata names the pool and carries the template hash.
    let xml = virsh(&["dumpxml", &vms[0]]).1;
    let hash = env.status("pool", &pool)["templateHash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        xml.contains(&format!("name=\"{pool}\"")) && xml.contains(&hash),
        "{xml}"
    );
    eprintln!("pool Ready with 1 VM after {:.1}s", t_ready.as_secs_f64());

    // Scale up by editing the file.
    std::fs::write(&file, pool_manifest(&pool, &image, 2)).unwrap();
    let t_scale = env.wait("pool Ready with 2 VMs", Duration::from_secs(180), || {
        pool_ready(&env, &pool, 2)
    });
    let vms = domains_with_prefix(&prefix);
    assert_eq!(vms.len(), 2, "{vms:?}");
    eprintln!("scaled to 2 VMs in {:.1}s", t_scale.as_secs_f64());

    // Destroy one by hand: it is replaced.
    let victim = vms[0].clone();
    let (ok, out) = virsh(&["destroy", &victim]);
    assert!(ok, "{out}");
    let t_replace = env.wait(
        "the destroyed VM replaced",
        Duration::from_secs(180),
        || {
            let now = domains_with_prefix(&prefix);
            now.len() == 2 && !now.contains(&victim) && pool_ready(&env, &pool, 2)
        },
    );
    eprintln!(
        "VM destroyed by hand replaced in {:.1}s",
        t_replace.as_secs_f64()
    );
    let vms = domains_with_prefix(&prefix);
    assert!(vms.iter().all(|v| running(v)));

    // kill -9 and restart: the same VMs are adopted, none added.
    env.kill_controller();
    env.start_controller();
    let restarted = Instant::now();
    env.wait("pool Ready after restart", Duration::from_secs(60), || {
        pool_ready(&env, &pool, 2)
    });
    // The status may still be the one written before the kill; wait for the new
    // controller's own pass (it resets adopted VMs) and then compare.
    env.wait("adoption logged", Duration::from_secs(60), || {
        env.log().matches("VM reset to golden").count() >= 2
    });
    let t_adopt = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        domains_with_prefix(&prefix),
        vms,
        "VMs changed after the restart"
    );
    assert!(pool_ready(&env, &pool, 2));
    assert_eq!(vm_names(&env.status("pool", &pool)), vms);
    eprintln!(
        "after kill -9: same {} VMs adopted and reset in {:.1}s",
        vms.len(),
        t_adopt.as_secs_f64()
    );

    // A definition edited by hand (`virsh desc --config` changes the persistent XML): that
    // VM is replaced by one of the template; the other one, reset and adopted above with its
    // definition untouched, stays.
    let (edited, kept) = (vms[0].clone(), vms[1].clone());
    let (ok, out) = virsh(&["desc", &edited, "--config", "edited by hand"]);
    assert!(ok, "{out}");
    let t_edit = env.wait("the edited VM replaced", Duration::from_secs(180), || {
        let now = domains_with_prefix(&prefix);
        now.len() == 2 && !now.contains(&edited) && pool_ready(&env, &pool, 2)
    });
    assert!(domains_with_prefix(&prefix).contains(&kept));
    let events = env.status("pool", &pool)["events"].to_string();
    assert!(events.contains("EditedByHand"), "{events}");
    eprintln!("VM edited by hand replaced in {:.1}s", t_edit.as_secs_f64());

    // Removing the file removes the VMs and the objects.
    std::fs::remove_file(&file).unwrap();
    let t_gone = env.wait("VMs gone", Duration::from_secs(60), || {
        domains_with_prefix(&prefix).is_empty()
            && env.get("pool", &pool).is_none()
            && env.get("image", &image).is_none()
    });
    eprintln!("file deleted: VMs gone in {:.1}s", t_gone.as_secs_f64());
    assert!(
        !env.dir.join("vms").exists()
            || std::fs::read_dir(env.dir.join("vms"))
                .unwrap()
                .next()
                .is_none(),
        "VM files left behind"
    );

    // The foreign domain survived all of it.
    let (ok, out) = virsh(&["dominfo", &foreign]);
    assert!(ok, "foreign domain {foreign} is gone: {out}");
}

#[test]
fn networks_and_filters_follow_the_spec_dir_inside_the_test_namespace() {
    // Safety first: libvirt's networks must not land in this (the host's) namespace.
    assert_libvirtd_in_test_netns();
    require_libvirt_and_image();

    let mut env = Env::new("net");
    let pid = std::process::id();
    let net = format!("e2e-net-{pid}");
    let filter = format!("e2e-egress-{pid}");
    let (lnet, lfilter) = (format!("agentvm-{net}"), format!("agentvm-{filter}"));
    env.networks.push(lnet.clone());
    env.filters.push(lfilter.clone());
    let third = 100 + pid % 150;
    let file = env.specs().join("net.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {{name: {net}}}\nspec: {{mode: isolated, subnet: 10.213.{third}.0/24}}\n---\n\
             apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {filter}}}\nspec:\n  egress:\n    - {{protocol: tcp, ports: [443]}}\n"
        ),
    )
    .unwrap();
    env.start_controller();
    let net_up = || {
        virsh(&["net-info", &lnet])
            .1
            .contains("Active:         yes")
    };
    let filter_defined = || virsh(&["nwfilter-dumpxml", &lfilter]).0;
    let t = env.wait("network and filter Ready", Duration::from_secs(60), || {
        env.status("network", &net)["phase"] == "Ready"
            && env.status("networkfilter", &filter)["phase"] == "Ready"
    });
    assert!(net_up() && filter_defined());
    eprintln!("network and filter Ready in {:.1}s", t.as_secs_f64());

    // Removed by hand: recreated.
    assert!(virsh(&["net-destroy", &lnet]).0);
    assert!(virsh(&["net-undefine", &lnet]).0);
    assert!(virsh(&["nwfilter-undefine", &lfilter]).0);
    let t = env.wait(
        "network and filter recreated",
        Duration::from_secs(60),
        || net_up() && filter_defined(),
    );
    eprintln!("network and filter recreated in {:.1}s", t.as_secs_f64());
    // Stopped by hand: started again.
    assert!(virsh(&["net-destroy", &lnet]).0);
    env.wait("network restarted", Duration::from_secs(60), net_up);

    // The file goes: so do they.
    std::fs::remove_file(&file).unwrap();
    env.wait(
        "network and filter removed",
        Duration::from_secs(60),
        || {
            !virsh(&["net-info", &lnet]).0
                && !filter_defined()
                && env.get("network", &net).is_none()
                && env.get("networkfilter", &filter).is_none()
        },
    );
}
