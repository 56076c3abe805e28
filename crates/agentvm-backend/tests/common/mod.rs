//! Shared set-up of the tier-3 tests and the benchmarks: the guest image, the accelerator, the
//! backend every VM is made through (the pools' path), the VM shape and the libvirt
//! connection. Each fails loudly (never skips) when its part is missing.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::Duration;

use agentvm_backend::vm::{default_state_dir, BootImage};
use agentvm_backend::{
    Accelerator, AcceleratorChoice, Libvirt, LibvirtBackend, Owner, ResetStrategy, VmRequest,
};

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

/// How long a tier-3 guest may take to boot.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The backend the tier-3 tests and benchmarks make their VMs with, as the controller does:
/// `qemu:///system`, the default state directory, [`accel`], [`BOOT_TIMEOUT`], the
/// translation cache pools use, and `strategy` for resets.
pub fn backend(strategy: ResetStrategy) -> LibvirtBackend {
    let choice = match accel() {
        Accelerator::Kvm => AcceleratorChoice::Kvm,
        Accelerator::Tcg => AcceleratorChoice::Tcg,
    };
    LibvirtBackend::new(
        Libvirt::default_uri(),
        default_state_dir(),
        choice,
        BOOT_TIMEOUT,
    )
    .with_reset_strategy(strategy)
}

/// Test VM `name` owned by `owner`, of the tier-3 guests' shape: 1 vCPU, 512 MiB, no NIC,
/// the image's disk, no warm-up, no limits; parked (set `park: false` for a VM used once).
pub fn request(name: &str, owner: Owner) -> VmRequest {
    VmRequest {
        name: name.to_string(),
        image: image(),
        vcpus: 1,
        memory_mib: 512,
        nic: None,
        owner,
        warmup: Vec::new(),
        limits: Default::default(),
        disk_gib: None,
        disabled_cpu_features: Vec::new(),
        park: true,
        from_template: false,
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
