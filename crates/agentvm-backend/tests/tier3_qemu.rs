//! Tier 3: real QEMU guests through `qemu:///system`, booted from agentvm's guest image, with
//! the real qemu-guest-agent. These tests fail (never skip) when libvirt or the image is missing:
//! `scripts/test.sh` builds the image and starts libvirtd inside a test network namespace.

use agentvm_backend::guest::{ExecRequest, Guest, Stream};
use agentvm_backend::{EphemeralVm, LibvirtBackend, Owner, ResetStrategy, VmRequest};

mod common;
use common::{backend, libvirt, request};

/// Boots test `test`'s VM through the backend, used once (as `agentvm exec` does).
fn boot<'a>(backend: &'a LibvirtBackend, test: &str) -> EphemeralVm<'a> {
    let name = format!("agentvm-t3-{test}-{}", std::process::id());
    let owner = Owner {
        kind: agentvm_backend::OwnerKind::Test,
        name: test.into(),
        spec_hash: String::new(),
        generation: 0,
    };
    let req = VmRequest {
        park: false,
        ..request(&name, owner)
    };
    EphemeralVm::create(backend, &req).unwrap_or_else(|e| panic!("booting {name}: {e}"))
}

#[test]
fn python_runs_in_a_real_guest_and_exit_codes_come_back() {
    let lv = libvirt();
    let backend = backend(ResetStrategy::default());
    let vm = boot(&backend, "python");
    let agent = vm.agent().unwrap();
    let g = Guest::new(&*agent);

    let mut live = Vec::new();
    let req = ExecRequest::new(
        "python3",
        ["-c", "import platform, sys; print('hello from', platform.system(), sys.version_info[0]); print('to stderr', file=sys.stderr)"],
    );
    let out = g
        .exec(&req, &mut |s, d| live.push((s, d.to_vec())))
        .unwrap();
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from Linux 3\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "to stderr\n");
    assert!(live.iter().any(|(s, _)| *s == Stream::Stdout));

    let out = g
        .run_script(
            "python3",
            "import sys\nprint('failing on purpose')\nsys.exit(7)\n",
            ExecRequest::new("", Vec::<String>::new()),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "failing on purpose\n");

    let out = g
        .exec(
            &ExecRequest::new("python3", ["-c", "raise SystemExit(undefined_name)"]),
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NameError"),
        "{out:?}"
    );

    let mut req = ExecRequest::new("sh", ["-c", "pwd; echo $GREETING"]);
    req.cwd = Some("/tmp".into());
    req.env.insert("GREETING".into(), "hi <&> 'there'".into());
    let out = g.exec(&req, &mut |_, _| {}).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/tmp\nhi <&> 'there'\n"
    );

    let dir = vm.files().dir.clone();
    vm.teardown().unwrap();
    assert!(!dir.exists(), "teardown removes the overlay and logs");
    assert!(lv
        .domain_state(&format!("agentvm-t3-python-{}", std::process::id()))
        .unwrap_err()
        .is_not_found());
}
