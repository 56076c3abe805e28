//! `agentvm doctor`: check the host and print a fix for every problem.

use std::path::Path;
use std::process::Command;

use agentvm_backend::AcceleratorChoice;
use agentvm_controller::Config;
use agentvm_image::Recipe;
use clap::Args;

/// Options of `doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Also resolve the accelerator for `auto` (may boot a short probe VM once per host).
    #[arg(long)]
    probe: bool,
}

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str, detail: impl AsRef<str>) {
        println!("[ok]   {what}: {}", detail.as_ref());
    }
    fn warn(&self, what: &str, detail: impl AsRef<str>, fix: &str) {
        println!("[warn] {what}: {}\n       fix: {fix}", detail.as_ref());
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>, fix: &str) {
        self.failures += 1;
        println!("[FAIL] {what}: {}\n       fix: {fix}", detail.as_ref());
    }
}

/// Free bytes on the filesystem holding `path` (or its nearest existing parent).
fn free_bytes(path: &Path) -> Option<u64> {
    let mut p = path;
    while !p.exists() {
        p = p.parent()?;
    }
    let out = Command::new("df").arg("-Pk").arg(p).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let avail: u64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(avail * 1024)
}

impl DoctorArgs {
    /// Run every check; exit 1 when any failed.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let mut r = Report { failures: 0 };
        let setup = "run `scripts/host-setup.sh` (or `agentvm host setup`) as root";

        let backend = super::local_backend(cfg);
        let lv = match backend.libvirt_version() {
            Ok(version) => {
                r.ok(
                    "libvirt",
                    format!("{} reachable (libvirt {version})", cfg.libvirt_uri),
                );
                Some(&backend)
            }
            Err(e) => {
                r.fail("libvirt", e.to_string(), setup);
                None
            }
        };

        match Command::new("qemu-system-x86_64").arg("--version").output() {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout);
                r.ok("qemu", v.lines().next().unwrap_or("").trim());
            }
            _ => r.fail("qemu", "qemu-system-x86_64 not found", setup),
        }
        for tool in ["qemu-img", "debootstrap", "mkfs.ext4"] {
            let found = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
                .unwrap_or(false);
            if found {
                r.ok(tool, "found");
            } else {
                r.fail(tool, "not found on PATH", setup);
            }
        }

        if agentvm_backend::accel::kvm_device_usable() {
            r.ok("/dev/kvm", "present and usable");
        } else if cfg.accelerator == AcceleratorChoice::Kvm {
            r.fail(
                "/dev/kvm",
                "not usable but accelerator is kvm",
                "load kvm (modprobe kvm_intel / kvm_amd) or set AGENTVM_ACCEL=tcg",
            );
        } else {
            r.warn(
                "/dev/kvm",
                "not usable: guests run under TCG (much slower)",
                "enable virtualisation in firmware and load the kvm module",
            );
        }

        let image = agentvm_image::lookup(&Recipe::default(), &cfg.cache_dir);
        let image = match image {
            Ok(Some(img)) => {
                r.ok("image", format!("default image at {}", img.dir.display()));
                Some(img)
            }
            Ok(None) => {
                r.fail(
                    "image",
                    "default guest image not built",
                    "run `agentvm image build` (about 2 minutes)",
                );
                None
            }
            Err(e) => {
                r.fail("image", e.to_string(), "run `agentvm image build`");
                None
            }
        };

        match (cfg.accelerator, &lv, &image, self.probe) {
            (AcceleratorChoice::Auto, Some(backend), Some(img), true) => {
                match backend.accelerator_for(&super::image::boot_image(img)) {
                    Ok((acc, why)) => r.ok("accelerator", format!("{acc} ({why})")),
                    Err(e) => r.fail("accelerator", e.to_string(), "set AGENTVM_ACCEL=tcg"),
                }
            }
            (AcceleratorChoice::Auto, ..) => r.ok(
                "accelerator",
                "auto (run `agentvm doctor --probe` to resolve it)",
            ),
            (c, ..) => r.ok("accelerator", format!("{c:?} (configured)").to_lowercase()),
        }

        for (what, dir, need) in [
            ("state dir", &cfg.state_dir, 2u64 << 30),
            ("cache dir", &cfg.cache_dir, 3u64 << 30),
        ] {
            match free_bytes(dir) {
                Some(free) if free >= need => r.ok(what, format!("{} ({} GiB free)", dir.display(), free >> 30)),
                Some(free) => r.fail(
                    what,
                    format!("{} has only {} MiB free", dir.display(), free >> 20),
                    &format!("free at least {} GiB there or point AGENTVM_STATE_DIR / AGENTVM_CACHE_DIR elsewhere", need >> 30),
                ),
                None => r.warn(what, format!("cannot tell free space of {}", dir.display()), "check `df`"),
            }
        }

        if r.failures == 0 {
            println!("all checks passed");
            Ok(0)
        } else {
            println!("{} problem(s) found", r.failures);
            Ok(1)
        }
    }
}
