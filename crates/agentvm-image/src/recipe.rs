//! What an image is made of (`Recipe`) and the hash that names it in the cache.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guest;
use crate::kernel::{KernelSource, ResolvedKernel};
use crate::ImageError;

/// Bump when the build procedure changes in a way the other inputs do not show,
/// so old cached images stop matching.
pub(crate) const BUILD_FORMAT: u32 = 1;

/// Packages every image gets (debootstrap `--variant=minbase --include=…`).
///
/// `kmod` matters: without `modprobe` no virtio driver loads after the initrd. `e2fsprogs`
/// brings `resize2fs`, with which agentvm-init grows the root file system to the VM's disk.
pub const BASE_PACKAGES: &[&str] = &[
    "python3",
    "qemu-guest-agent",
    "kmod",
    "e2fsprogs",
    "iproute2",
    "isc-dhcp-client",
    "ca-certificates",
    "git",
    "curl",
];

/// Kernel command line for booting a built image with direct kernel boot.
pub const KERNEL_CMDLINE: &str = "root=/dev/vda rw console=ttyS0 init=/sbin/agentvm-init quiet";

/// Default size of the image's root file system.
pub const DEFAULT_DISK_SIZE_MIB: u64 = 2048;

/// How to build a guest image. Two recipes with the same [`Recipe::hash`] build the same image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Debian suite to debootstrap, e.g. `bookworm`.
    pub suite: String,
    /// Extra Debian packages on top of [`BASE_PACKAGES`].
    pub packages: Vec<String>,
    /// Shell commands run in the image (`chroot ROOTFS /bin/sh -c CMD`) after the
    /// packages are installed, in order; e.g. `npm install -g …`.
    pub setup_commands: Vec<String>,
    /// Where the kernel, initrd and modules come from.
    pub kernel: KernelSource,
    /// Size of the root file system (the disk a VM sees), MiB.
    pub disk_size_mib: u64,
    /// Debian mirror URL for debootstrap; `None` uses debootstrap's default mirror.
    pub mirror: Option<String>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            suite: "bookworm".into(),
            packages: Vec::new(),
            setup_commands: Vec::new(),
            kernel: KernelSource::Host,
            disk_size_mib: DEFAULT_DISK_SIZE_MIB,
            mirror: None,
        }
    }
}

/// Everything that decides the image's content, in a fixed order; hashed into the cache key.
#[derive(Serialize)]
struct CanonicalRecipe<'a> {
    build_format: u32,
    suite: &'a str,
    base_packages: &'a [&'a str],
    packages: Vec<&'a str>,
    setup_commands: &'a [String],
    disk_size_mib: u64,
    mirror: Option<&'a str>,
    kernel: Result<&'a ResolvedKernel, String>,
    cmdline: &'a str,
    guest_files: Vec<(&'a str, &'a str)>,
    guest_agent: Result<String, String>,
}

impl Recipe {
    /// The cache key: sha256 (hex) of a canonical form of the recipe that also
    /// covers the init script and the other files agentvm installs (the
    /// `agentvm-guest` binary by its sha256), the base
    /// package list, the kernel command line and the resolved kernel (version,
    /// banner, size and mtime of the kernel and initrd). Changing any of these
    /// gives another key. Package order and duplicates do not matter.
    ///
    /// If the kernel cannot be resolved, the error text takes its place (and
    /// [`crate::build`] reports the error).
    pub fn hash(&self) -> String {
        let kernel = self.kernel.resolve();
        self.hash_with(kernel.as_ref().map_err(|e| e.to_string()))
    }

    /// Like [`Recipe::hash`], but fails when the kernel cannot be resolved.
    pub fn try_hash(&self) -> Result<String, ImageError> {
        let kernel = self.kernel.resolve()?;
        guest::agent_identity()?;
        Ok(self.hash_with(Ok(&kernel)))
    }

    pub(crate) fn hash_with(&self, kernel: Result<&ResolvedKernel, String>) -> String {
        let json = self.canonical_json(kernel);
        let digest = Sha256::digest(json.as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub(crate) fn canonical_json(&self, kernel: Result<&ResolvedKernel, String>) -> String {
        let mut packages: Vec<&str> = self.packages.iter().map(|p| p.trim()).collect();
        packages.sort_unstable();
        packages.dedup();
        let canonical = CanonicalRecipe {
            build_format: BUILD_FORMAT,
            suite: &self.suite,
            base_packages: BASE_PACKAGES,
            packages,
            setup_commands: &self.setup_commands,
            disk_size_mib: self.disk_size_mib,
            mirror: self.mirror.as_deref(),
            kernel,
            cmdline: KERNEL_CMDLINE,
            guest_files: guest::FILES.iter().map(|f| (f.path, f.content)).collect(),
            guest_agent: guest::agent_identity().map_err(|e| e.to_string()),
        };
        serde_json::to_string(&canonical).expect("canonical recipe serialises")
    }

    /// Checks the recipe for mistakes a user can make; says which field and how to fix it.
    pub fn validate(&self) -> Result<(), ImageError> {
        let suite_ok = !self.suite.is_empty()
            && self
                .suite
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !suite_ok {
            return Err(ImageError::InvalidRecipe {
                field: "suite",
                reason: format!(
                    "{:?} is not a Debian suite name (e.g. \"bookworm\")",
                    self.suite
                ),
            });
        }
        for p in &self.packages {
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.:=".contains(c))
                && !p.starts_with('-');
            if !ok {
                return Err(ImageError::InvalidRecipe {
                    field: "packages",
                    reason: format!("{p:?} is not a Debian package name (lowercase letters, digits, + - . only)"),
                });
            }
        }
        if self.disk_size_mib < 256 {
            return Err(ImageError::InvalidRecipe {
                field: "disk_size_mib",
                reason: format!(
                    "{} MiB is too small for a Debian root file system; use at least 256 (default {DEFAULT_DISK_SIZE_MIB})",
                    self.disk_size_mib
                ),
            });
        }
        Ok(())
    }

    /// The recipe's packages that [`BASE_PACKAGES`] does not already hold, sorted, each once:
    /// what the build installs with apt after debootstrap.
    pub fn extra_packages(&self) -> Vec<String> {
        let mut extra: Vec<String> = self
            .packages
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !BASE_PACKAGES.contains(&p.as_str()))
            .collect();
        extra.sort();
        extra.dedup();
        extra
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_packages_are_the_recipes_own_sorted_once_without_the_base() {
        let r = Recipe {
            packages: vec!["npm".into(), " git".into(), "nodejs".into(), "npm".into()],
            ..Recipe::default()
        };
        assert!(BASE_PACKAGES.contains(&"git"));
        assert_eq!(r.extra_packages(), ["nodejs", "npm"]);
        assert!(Recipe::default().extra_packages().is_empty());
    }
    use crate::kernel::FileIdentity;
    use std::path::PathBuf;

    fn kernel() -> ResolvedKernel {
        ResolvedKernel {
            version: "6.1.0-28-cloud-amd64".into(),
            banner: Some("6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP".into()),
            kernel: FileIdentity {
                path: PathBuf::from("/boot/vmlinuz-6.1.0-28-cloud-amd64"),
                size: 100,
                mtime_ns: 1,
            },
            initrd: FileIdentity {
                path: PathBuf::from("/boot/initrd.img-6.1.0-28-cloud-amd64"),
                size: 200,
                mtime_ns: 2,
            },
        }
    }

    fn hash(r: &Recipe, k: &ResolvedKernel) -> String {
        r.hash_with(Ok(k))
    }

    #[test]
    fn hash_is_stable_hex_sha256() {
        let r = Recipe::default();
        let k = kernel();
        let h = hash(&r, &k);
        assert_eq!(h.len(), 64);
        assert!(h
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(h, hash(&r.clone(), &k.clone()));
        assert_eq!(h, hash(&Recipe::default(), &kernel()));
    }

    #[test]
    fn hash_ignores_package_order_and_duplicates() {
        let k = kernel();
        let a = Recipe {
            packages: vec!["nodejs".into(), "npm".into()],
            ..Recipe::default()
        };
        let b = Recipe {
            packages: vec!["npm".into(), "nodejs".into(), "npm".into()],
            ..Recipe::default()
        };
        assert_eq!(hash(&a, &k), hash(&b, &k));
    }

    #[test]
    fn hash_changes_with_every_recipe_field() {
        let k = kernel();
        let base = hash(&Recipe::default(), &k);
        let variants = [
            Recipe {
                suite: "trixie".into(),
                ..Recipe::default()
            },
            Recipe {
                packages: vec!["nodejs".into()],
                ..Recipe::default()
            },
            Recipe {
                setup_commands: vec!["true".into()],
                ..Recipe::default()
            },
            Recipe {
                disk_size_mib: 4096,
                ..Recipe::default()
            },
        ];
        for v in &variants {
            assert_ne!(hash(v, &k), base, "{v:?}");
        }
        // Setup command order matters.
        let ab = Recipe {
            setup_commands: vec!["a".into(), "b".into()],
            ..Recipe::default()
        };
        let ba = Recipe {
            setup_commands: vec!["b".into(), "a".into()],
            ..Recipe::default()
        };
        assert_ne!(hash(&ab, &k), hash(&ba, &k));
    }

    #[test]
    fn hash_changes_with_the_kernel() {
        let r = Recipe::default();
        let base = hash(&r, &kernel());
        let mut k = kernel();
        k.version = "6.1.0-29-cloud-amd64".into();
        assert_ne!(hash(&r, &k), base);
        let mut k = kernel();
        k.initrd.size += 1;
        assert_ne!(hash(&r, &k), base);
        let mut k = kernel();
        k.kernel.mtime_ns += 1;
        assert_ne!(hash(&r, &k), base);
        let mut k = kernel();
        k.banner = None;
        assert_ne!(hash(&r, &k), base);
        assert_ne!(r.hash_with(Err("no kernel".into())), base);
    }

    #[test]
    fn canonical_form_covers_init_script_base_packages_and_cmdline() {
        let json = Recipe::default().canonical_json(Ok(&kernel()));
        // The init script text itself is part of the key, so editing it rebuilds.
        let init = serde_json::to_string(guest::INIT_SCRIPT).unwrap();
        assert!(json.contains(&init[1..init.len() - 1]));
        for p in BASE_PACKAGES {
            assert!(json.contains(&format!("\"{p}\"")), "{p}");
        }
        assert!(json.contains(&serde_json::to_string(KERNEL_CMDLINE).unwrap()));
    }

    #[test]
    fn hash_with_real_kernel_files_follows_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let kpath = dir.path().join("vmlinuz-9.9.9-test");
        let ipath = dir.path().join("initrd.img-9.9.9-test");
        std::fs::write(&kpath, b"kernel").unwrap();
        std::fs::write(&ipath, b"initrd").unwrap();
        let r = Recipe {
            kernel: KernelSource::Paths {
                kernel: kpath.clone(),
                initrd: ipath.clone(),
            },
            ..Recipe::default()
        };
        let h1 = r.try_hash().unwrap();
        assert_eq!(h1, r.hash());
        std::fs::write(&ipath, b"initrd, regenerated").unwrap();
        assert_ne!(r.try_hash().unwrap(), h1);
        std::fs::remove_file(&kpath).unwrap();
        assert!(r.try_hash().is_err());
    }

    #[test]
    fn recipe_deserialises_with_defaults_and_rejects_unknown_fields() {
        let r: Recipe = serde_json::from_str(r#"{"packages":["nodejs"]}"#).unwrap();
        assert_eq!(r.suite, "bookworm");
        assert_eq!(r.disk_size_mib, DEFAULT_DISK_SIZE_MIB);
        assert_eq!(r.kernel, KernelSource::Host);
        assert!(serde_json::from_str::<Recipe>(r#"{"disk_size":1}"#).is_err());
        let paths: Recipe =
            serde_json::from_str(r#"{"kernel":{"paths":{"kernel":"/k","initrd":"/i"}}}"#).unwrap();
        assert!(matches!(paths.kernel, KernelSource::Paths { .. }));
    }

    #[test]
    fn validate_points_at_the_field() {
        assert!(Recipe::default().validate().is_ok());
        let bad = Recipe {
            packages: vec!["--force-yes".into()],
            ..Recipe::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("packages"));
        let bad = Recipe {
            suite: "bookworm; rm -rf /".into(),
            ..Recipe::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("suite"));
        let bad = Recipe {
            disk_size_mib: 10,
            ..Recipe::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("disk_size_mib"));
    }
}
