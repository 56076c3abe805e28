//! Shared set-up of the tier-3 tests and the benchmarks: the guest image, the accelerator, the
//! VM shape and the libvirt connection. Each fails loudly (never skips) when its part is missing.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use agentvm_backend::vm::{BootImage, VmShape};
use agentvm_backend::{Accelerator, AcceleratorChoice, Libvirt};

/// The default recipe's guest image (`agentvm image build`; scripts/test.sh builds it).
pub fn image() -> BootImage {
    let cache = agentvm_image::default_cache_dir();
    let img = agentvm_image::lookup(&agentvm_image::Recipe::default(), &cache)
        .expect("reading the image cache")
        .unwrap_or_else(|| {
            panic!(
                "guest image not built under {}: run `agentvm image build` (scripts/test.sh does)",
                cache.display()
            )
        });
    BootImage {
        disk: img.disk,
        kernel: img.kernel,
        initrd: img.initrd,
        cmdline: img.cmdline,
    }
}

/// `$AGENTVM_ACCEL` (kvm or tcg), TCG when unset: KVM cannot boot 64-bit guests on CI hosts.
pub fn accel() -> Accelerator {
    match AcceleratorChoice::from_env_or(AcceleratorChoice::Tcg).unwrap() {
        AcceleratorChoice::Kvm => Accelerator::Kvm,
        _ => Accelerator::Tcg,
    }
}

/// The tier-3 guests' shape: 1 vCPU, 512 MiB, no NIC, 180 s to boot, [`accel`], and the
/// translation cache pools use.
pub fn shape() -> VmShape {
    VmShape {
        vcpus: 1,
        memory_mib: 512,
        nic: None,
        accelerator: accel(),
        boot_timeout: Duration::from_secs(180),
        limits: Default::default(),
        disabled_cpu_features: Vec::new(),
        tcg_tb_cache_mib: Some(agentvm_backend::vm::DEFAULT_TCG_TB_CACHE_MIB),
        lean_memory: true,
        disk_gib: None,
    }
}

/// The system libvirt (`qemu:///system`).
pub fn libvirt() -> Libvirt {
    Libvirt::connect("qemu:///system")
        .unwrap_or_else(|e| panic!("libvirt must be running for tier-3 tests: {e}"))
}

/// Removes a fork's domain and files when the test ends, however it ends.
pub struct ForkGuard<'a>(pub &'a Libvirt, pub String);

impl Drop for ForkGuard<'_> {
    fn drop(&mut self) {
        let files =
            agentvm_backend::vm::VmFiles::new(&agentvm_backend::vm::default_state_dir(), &self.1);
        if let Err(e) = self.0.remove_golden(&self.1, &files) {
            eprintln!("removing fork {}: {e}", self.1);
        }
    }
}
