//! One VM's life on the host: its directory (qcow2 overlay, serial log), define, boot, wait
//! for the guest agent, and a teardown that leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::accel::Accelerator;
use crate::error::{io_err, BackendError, Result};
use crate::guest::Guest;
use crate::libvirt::Libvirt;
use crate::limits::{Enforcement, Limit, VmLimits};
use crate::xml::{DomainSpec, NetBandwidth, NicSpec, Owner};

/// Environment variable overriding the state directory.
pub const STATE_DIR_ENV: &str = "AGENTVM_STATE_DIR";

/// Where per-VM files live: `$AGENTVM_STATE_DIR` or `/var/lib/agentvm`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os(STATE_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/agentvm"))
}

/// A bootable guest image: base disk plus direct-boot kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    /// Read-only qcow2 base disk; each VM gets an overlay on it.
    pub disk: PathBuf,
    /// Kernel.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
}

/// Shape of a VM to create.
#[derive(Debug, Clone, PartialEq)]
pub struct VmShape {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Network interface, `None` for an isolated guest with no NIC.
    pub nic: Option<NicSpec>,
    /// Accelerator.
    pub accelerator: Accelerator,
    /// How long to wait for the guest agent after start.
    pub boot_timeout: Duration,
    /// Limits on what it takes from the host (CPU weight and quota, memory, disk and network
    /// throughput). Whether the host enforces them: [`crate::backend::VmReport::limits`].
    pub limits: VmLimits,
    /// CPU features hidden from the guest, see [`DomainSpec::disabled_cpu_features`].
    pub disabled_cpu_features: Vec<String>,
    /// QEMU's TCG translation cache, MiB ([`DEFAULT_TCG_TB_CACHE_MIB`] unless configured);
    /// `None` leaves QEMU's default of 1 GiB. Ignored under KVM.
    pub tcg_tb_cache_mib: Option<u64>,
    /// Lean idle memory: free page reporting on the virtio balloon
    /// ([`DomainSpec::free_page_reporting`]; the guest's caches are dropped before parking,
    /// [`crate::lean`]). agentvm's VMs have it; off only to
    /// measure against.
    pub lean_memory: bool,
    /// Virtual size of the VM's disk in GiB (its overlay; the guest grows its root file
    /// system to it at boot); `None` keeps the image's size. Must not be below the image's.
    pub disk_gib: Option<u64>,
}

/// agentvm's size of QEMU's TCG translation cache, MiB. QEMU's own default (1 GiB) fills
/// with translated guest code that an idle guest never runs again: measured on a parked
/// 512 MiB guest, host RSS 452 MiB with QEMU's default, 328 MiB with 64 MiB and 291 MiB
/// with 32 MiB, boot and reset times unchanged; 16 MiB doubled the boot.
pub const DEFAULT_TCG_TB_CACHE_MIB: u64 = 64;

/// Files of one VM under `<state>/vms/<name>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    /// The VM's directory.
    pub dir: PathBuf,
}

impl VmFiles {
    /// The files of VM `name` under `state_dir`.
    pub fn new(state_dir: &Path, name: &str) -> Self {
        VmFiles {
            dir: state_dir.join("vms").join(name),
        }
    }
    /// The writable qcow2 overlay.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// The serial console log.
    pub fn serial_log(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// Remove the directory and everything in it. Succeeds if already gone.
    pub fn remove(&self) -> Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BackendError::Io {
                op: "remove",
                path: self.dir.clone(),
                source,
            }),
        }
    }
}

/// Mode of the directories on the way to a VM's files (the state directory, `vms/`, each
/// VM's): QEMU runs as its own user (`libvirt-qemu` on Debian) and opens the disk overlay by
/// path, so others may traverse them, but not list them. The files in them are 0600 (disks
/// are handed to QEMU's user by libvirt).
pub const VM_DIR_MODE: u32 = 0o711;
/// Mode of the controller's private directories (ownership records).
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of every file agentvm writes in its state directory.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Make `dir` (mode [`VM_DIR_MODE`]) and any missing parents (the same mode): traversable
/// by the QEMU user, listable by root only.
pub fn make_dir(dir: &Path) -> Result<()> {
    make_dir_with_mode(dir, VM_DIR_MODE)
}

/// Make `dir` with `mode`, and its missing parents with the same mode (whatever the umask);
/// parents that exist are left as they are.
pub fn make_dir_with_mode(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                make_dir_with_mode(parent, mode)?;
            }
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(io_err("create", dir)(e))
                }
                _ => {}
            }
        }
        Err(e) => return Err(io_err("create", dir)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", dir))
}

/// Write `data` to `path` (created or truncated), mode [`PRIVATE_FILE_MODE`] even if the file
/// was there before with another.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
        .map_err(io_err("write", path))?;
    f.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
        .map_err(io_err("chmod", path))?;
    f.write_all(data).map_err(io_err("write", path))
}

/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;

/// `qemu-img info --output=json -U` of `image` (readable while a VM uses it).
pub fn qemu_img_info(image: &Path) -> Result<serde_json::Value> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(image)
        .output()
        .map_err(io_err("run qemu-img info for", image))?;
    let command = || format!("qemu-img info {}", image.display());
    if !out.status.success() {
        return Err(BackendError::Command {
            command: command(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    serde_json::from_slice::<serde_json::Value>(&out.stdout).map_err(|e| BackendError::Protocol {
        what: command(),
        message: format!("its output is not JSON: {e}"),
    })
}

/// The virtual size of the disk image `image` in bytes (`qemu-img info`): the disk a guest
/// booted from it sees.
pub fn disk_virtual_size(image: &Path) -> Result<u64> {
    qemu_img_info(image)?["virtual-size"]
        .as_u64()
        .ok_or_else(|| BackendError::Protocol {
            what: format!("qemu-img info {}", image.display()),
            message: "no virtual-size in its output".into(),
        })
}

/// Create a qcow2 overlay at `overlay` backed by `base` (which stays untouched). Its virtual
/// size is `size_bytes`, or the base's when `None`; a size below the base's is refused with
/// [`BackendError::DiskTooSmall`] (the file system on the base would not fit). Growing the
/// guest's file system into the extra space is the guest's part (agentvm-init runs
/// `resize2fs` at boot).
pub fn create_overlay(base: &Path, overlay: &Path, size_bytes: Option<u64>) -> Result<()> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay);
    if let Some(size) = size_bytes {
        let image_bytes = disk_virtual_size(base)?;
        if size < image_bytes {
            return Err(BackendError::DiskTooSmall {
                image: base.to_path_buf(),
                image_bytes,
                wanted_bytes: size,
            });
        }
        cmd.arg(size.to_string());
    }
    let out = cmd.output().map_err(io_err("run qemu-img for", overlay))?;
    if !out.status.success() {
        return Err(BackendError::Command {
            command: format!(
                "qemu-img create -b {} {}",
                base.display(),
                overlay.display()
            ),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    // Whatever the umask: the guest's disk is for QEMU (libvirt hands it to QEMU's user) and
    // root only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(overlay, std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
        .map_err(io_err("chmod", overlay))?;
    Ok(())
}

/// A domain [`boot_domain`] defined and started, its agent answering.
pub(crate) struct Booted {
    /// Time from `start` to the guest agent answering (and, on a network, the address).
    pub boot_time: Duration,
    /// Whether each limit asked for in its shape is in force (see [`crate::limits`]).
    pub limits: Enforcement,
}

/// Define `name` from `image` with a fresh overlay, start it and wait for its agent (and on
/// a DHCP network for its address, pinned in its filter). On failure everything created
/// so far is removed again; past it the caller owns the domain and its files. The one boot
/// every VM goes through: [`crate::Backend::create_vm`] and the accelerator probe.
pub(crate) fn boot_domain(
    lv: &Libvirt,
    state_dir: &Path,
    name: &str,
    image: &BootImage,
    shape: &VmShape,
    owner: Owner,
) -> Result<Booted> {
    let files = VmFiles::new(state_dir, name);
    make_dir(&files.dir)?;
    let booted = boot_in(lv, &files, name, image, shape, owner);
    match &booted {
        // Not ours to clean up if the name was taken by someone else.
        Err(BackendError::AlreadyExists { .. }) => {
            let _ = files.remove();
        }
        Err(_) => {
            if let Err(e) = lv.remove_golden(name, &files) {
                tracing::warn!(vm = %name, error = %e, "cleanup after a failed boot failed");
            }
        }
        Ok(_) => {}
    }
    booted
}

fn boot_in(
    lv: &Libvirt,
    files: &VmFiles,
    name: &str,
    image: &BootImage,
    shape: &VmShape,
    owner: Owner,
) -> Result<Booted> {
    create_overlay(&image.disk, &files.disk(), shape.disk_gib.map(|g| g * GIB))?;
    let spec = DomainSpec {
        name: name.to_string(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        cpu_shares: None,
        disabled_cpu_features: shape.disabled_cpu_features.clone(),
        memory_hard_limit_mib: None,
        cpu_quota_percent: None,
        disk_io: Default::default(),
        net_bandwidth: Default::default(),
        disk: files.disk(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        cmdline: image.cmdline.clone(),
        serial_log: files.serial_log(),
        nic: shape.nic.clone(),
        accelerator: shape.accelerator,
        tcg_tb_cache_mib: shape.tcg_tb_cache_mib,
        free_page_reporting: shape.lean_memory,
        owner,
    };
    let start = Instant::now();
    let limits = lv.start_with_limits(&spec, &shape.limits)?;
    let agent = lv.agent(name)?;
    let guest = Guest::new(&agent);
    let with_log = |e| match e {
        BackendError::Timeout { what, after } => BackendError::Timeout {
            what: format!("{what}; serial log: {}", files.serial_log().display()),
            after,
        },
        other => other,
    };
    guest.wait_ready(shape.boot_timeout).map_err(with_log)?;
    // A guest on a network is not ready before it has its address: a golden state taken
    // earlier would make every run wait for DHCP again (ISC dhclient backs off for up to
    // two minutes when its first DISCOVER goes unanswered).
    if let Some(nic) = shape.nic.as_ref().filter(|n| n.dhcp) {
        let left = shape.boot_timeout.saturating_sub(start.elapsed());
        let addrs = guest
            .wait_ipv4(left.max(Duration::from_secs(5)))
            .map_err(with_log)?;
        // Anti-spoofing: from now on the filter admits this address only, for good.
        if nic.filter.is_some() && nic.ip.is_none() {
            let in_force = limits
                .iter()
                .any(|(l, r)| *l == Limit::NetBandwidth && r.is_ok());
            let bandwidth = if in_force {
                shape.limits.net_bandwidth
            } else {
                NetBandwidth::default()
            };
            lv.pin_leased_ip(name, nic, bandwidth, &addrs, Duration::from_secs(10))?;
        }
    }
    Ok(Booted {
        boot_time: start.elapsed(),
        limits,
    })
}

/// Resolve the accelerator to use. `Auto` picks KVM only when `/dev/kvm` is usable and a probe
/// boot of `image` under KVM reaches the guest agent (some nested hosts expose `/dev/kvm` but
/// cannot boot 64-bit guests); the probe's verdict is cached in `<state>/accel-probe.json`
/// keyed by kernel and QEMU binary, so it runs once per host. Returns the choice and why.
pub fn resolve_accelerator(
    lv: &Libvirt,
    state_dir: &Path,
    image: &BootImage,
    choice: crate::AcceleratorChoice,
) -> Result<(Accelerator, String)> {
    use crate::AcceleratorChoice as C;
    match choice {
        C::Kvm => return Ok((Accelerator::Kvm, "configured".into())),
        C::Tcg => return Ok((Accelerator::Tcg, "configured".into())),
        C::Auto => {}
    }
    if !crate::accel::kvm_device_usable() {
        return Ok((Accelerator::Tcg, "auto: /dev/kvm is not usable".into()));
    }
    let key = probe_key(image);
    let cache = state_dir.join("accel-probe.json");
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v["key"] == key.as_str() {
                let acc = if v["kvm"].as_bool() == Some(true) {
                    Accelerator::Kvm
                } else {
                    Accelerator::Tcg
                };
                return Ok((
                    acc,
                    format!(
                        "auto: cached probe ({})",
                        v["detail"].as_str().unwrap_or("")
                    ),
                ));
            }
        }
    }
    let shape = VmShape {
        vcpus: 1,
        memory_mib: 512,
        nic: None,
        accelerator: Accelerator::Kvm,
        boot_timeout: Duration::from_secs(30),
        limits: VmLimits::default(),
        disabled_cpu_features: Vec::new(),
        tcg_tb_cache_mib: Some(DEFAULT_TCG_TB_CACHE_MIB),
        lean_memory: true,
        disk_gib: None,
    };
    let name = format!("agentvm-accel-probe-{}", std::process::id());
    let owner = Owner {
        kind: crate::xml::OwnerKind::AcceleratorProbe,
        name: name.clone(),
        spec_hash: String::new(),
        generation: 0,
    };
    let (kvm, detail) = match boot_domain(lv, state_dir, &name, image, &shape, owner) {
        Ok(vm) => {
            lv.remove_golden(&name, &VmFiles::new(state_dir, &name))?;
            (
                true,
                format!("KVM guest booted in {:.1}s", vm.boot_time.as_secs_f64()),
            )
        }
        Err(e) => (false, format!("KVM guest did not boot: {e}")),
    };
    make_dir(state_dir)?;
    let verdict = serde_json::json!({"key": key, "kvm": kvm, "detail": detail});
    write_private(&cache, verdict.to_string().as_bytes())?;
    let acc = if kvm {
        Accelerator::Kvm
    } else {
        Accelerator::Tcg
    };
    Ok((acc, format!("auto: probe ({detail})")))
}

fn probe_key(image: &BootImage) -> String {
    let qemu = ["/usr/bin/qemu-system-x86_64"]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter_map(|m| m.modified().ok())
        .map(|t| format!("{t:?}"))
        .collect::<String>();
    format!("{}|{}", image.kernel.display(), qemu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_take_the_asked_size_or_the_image_s_and_never_less() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("2G")
            .output()
            .expect("qemu-img is installed (qemu-utils)");
        assert!(out.status.success(), "{out:?}");
        let overlay = dir.path().join("o.qcow2");

        create_overlay(&base, &overlay, None).unwrap();
        assert_eq!(disk_virtual_size(&overlay).unwrap(), 2 * GIB);
        std::fs::remove_file(&overlay).unwrap();

        create_overlay(&base, &overlay, Some(3 * GIB)).unwrap();
        assert_eq!(disk_virtual_size(&overlay).unwrap(), 3 * GIB);
        std::fs::remove_file(&overlay).unwrap();

        create_overlay(&base, &overlay, Some(2 * GIB)).unwrap();
        std::fs::remove_file(&overlay).unwrap();

        let err = create_overlay(&base, &overlay, Some(GIB)).unwrap_err();
        assert!(
            matches!(err, BackendError::DiskTooSmall { image_bytes, wanted_bytes, .. }
                if image_bytes == 2 * GIB && wanted_bytes == GIB),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("make the disk at least as big as the image"),
            "{err}"
        );
        assert!(!overlay.exists(), "nothing is created for a refused size");
    }
}
