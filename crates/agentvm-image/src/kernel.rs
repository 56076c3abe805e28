//! Finding the guest kernel and initrd, and identifying them for the recipe hash.

use std::cmp::Ordering;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::ImageError;

/// Where the guest kernel (and its initrd and modules) come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum KernelSource {
    /// The newest `/boot/vmlinuz-*` of the host with its `/boot/initrd.img-*`
    /// (Debian's `linux-image-cloud-amd64` is the intended one) and
    /// `/lib/modules/<version>`.
    #[default]
    Host,
    /// Explicit files. The version is read from the kernel image header (or
    /// from a `vmlinuz-<version>` file name); modules are copied from
    /// `/lib/modules/<version>` when the host has them.
    Paths {
        /// The kernel image (bzImage).
        kernel: PathBuf,
        /// Its initramfs; it must be able to mount a virtio-blk ext4 root.
        initrd: PathBuf,
    },
}

/// A kernel source resolved to concrete files, with what identifies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedKernel {
    /// Kernel release, e.g. `6.1.0-28-cloud-amd64` (what `uname -r` prints in the guest).
    pub version: String,
    /// The full version banner from the image header, when it has one
    /// (includes the build number and date).
    pub banner: Option<String>,
    /// The kernel image.
    pub kernel: FileIdentity,
    /// The initrd.
    pub initrd: FileIdentity,
}

/// A file plus the cheap facts (size, modification time) that change when it is replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Path of the file (symlinks resolved).
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u128,
}

impl FileIdentity {
    fn of(path: &Path) -> Result<Self, ImageError> {
        let real = fs::canonicalize(path).map_err(|e| ImageError::Kernel {
            path: path.to_path_buf(),
            reason: format!("cannot open it: {e}"),
        })?;
        let meta =
            fs::metadata(&real).map_err(|e| ImageError::io("reading metadata of", &real, e))?;
        if !meta.is_file() {
            return Err(ImageError::Kernel {
                path: real,
                reason: "not a regular file".into(),
            });
        }
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Ok(FileIdentity {
            path: real,
            size: meta.len(),
            mtime_ns,
        })
    }
}

impl KernelSource {
    /// Finds the files this source names and identifies them.
    pub fn resolve(&self) -> Result<ResolvedKernel, ImageError> {
        match self {
            KernelSource::Host => resolve_host(Path::new("/boot")),
            KernelSource::Paths { kernel, initrd } => resolve_paths(kernel, initrd),
        }
    }
}

pub(crate) fn resolve_host(boot: &Path) -> Result<ResolvedKernel, ImageError> {
    let entries = fs::read_dir(boot).map_err(|e| ImageError::Kernel {
        path: boot.to_path_buf(),
        reason: format!("cannot list it: {e}"),
    })?;
    let mut candidates: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
        .filter(|suffix| boot.join(format!("initrd.img-{suffix}")).is_file())
        .collect();
    candidates.sort_by(|a, b| compare_versions(a, b));
    let Some(newest) = candidates.pop() else {
        return Err(ImageError::Kernel {
            path: boot.to_path_buf(),
            reason: "no vmlinuz-<version> with a matching initrd.img-<version>".into(),
        });
    };
    resolve_paths(
        &boot.join(format!("vmlinuz-{newest}")),
        &boot.join(format!("initrd.img-{newest}")),
    )
}

fn resolve_paths(kernel: &Path, initrd: &Path) -> Result<ResolvedKernel, ImageError> {
    let kernel_id = FileIdentity::of(kernel)?;
    let initrd_id = FileIdentity::of(initrd)?;
    let banner = read_bzimage_banner(&kernel_id.path);
    let version = banner
        .as_deref()
        .and_then(|b| b.split_whitespace().next())
        .map(str::to_owned)
        .or_else(|| {
            kernel
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_owned)
        })
        .ok_or_else(|| ImageError::Kernel {
            path: kernel.to_path_buf(),
            reason: "cannot tell its version: no version string in the image header and the file is not named vmlinuz-<version>".into(),
        })?;
    Ok(ResolvedKernel {
        version,
        banner,
        kernel: kernel_id,
        initrd: initrd_id,
    })
}

/// Reads the version banner of an x86 bzImage ("6.1.0-28-cloud-amd64 (debian-kernel@…) #1 SMP …").
///
/// The setup header (Documentation/arch/x86/boot.rst) has the magic "HdrS" at
/// 0x202 and, at 0x20E, the offset (minus 0x200) of a NUL-terminated version string.
pub(crate) fn read_bzimage_banner(path: &Path) -> Option<String> {
    let mut head = Vec::with_capacity(0x8000);
    fs::File::open(path)
        .ok()?
        .take(0x8000)
        .read_to_end(&mut head)
        .ok()?;
    if head.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes([*head.get(0x20E)?, *head.get(0x20F)?]) as usize;
    if offset == 0 {
        return None;
    }
    let start = offset + 0x200;
    let rest = head.get(start..)?;
    let end = rest.iter().position(|&b| b == 0)?;
    let banner = std::str::from_utf8(&rest[..end]).ok()?.trim().to_owned();
    (!banner.is_empty()).then_some(banner)
}

/// Orders kernel versions the way people do: digit runs compare as numbers
/// (`6.1.0-10` is newer than `6.1.0-9`), everything else as text.
pub(crate) fn compare_versions(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(cb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(
            compare_versions("6.1.0-10-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Ordering::Greater
        );
        assert_eq!(compare_versions("6.10.0-1", "6.9.0-1"), Ordering::Greater);
        assert_eq!(compare_versions("6.1.0-28", "6.1.0-28"), Ordering::Equal);
        assert_eq!(compare_versions("6.1.0", "6.1.0-1"), Ordering::Less);
        assert_eq!(compare_versions("", ""), Ordering::Equal);
    }

    #[test]
    fn host_lookup_picks_newest_kernel_with_an_initrd() {
        let boot = tempfile::tempdir().unwrap();
        for name in [
            "vmlinuz-6.1.0-9-cloud-amd64",
            "initrd.img-6.1.0-9-cloud-amd64",
            "vmlinuz-6.1.0-10-cloud-amd64",
            "initrd.img-6.1.0-10-cloud-amd64",
            // Newest, but without an initrd: not usable.
            "vmlinuz-6.1.0-11-cloud-amd64",
        ] {
            fs::write(boot.path().join(name), name).unwrap();
        }
        let k = resolve_host(boot.path()).unwrap();
        assert_eq!(k.version, "6.1.0-10-cloud-amd64");
        assert!(k.banner.is_none());
        assert!(k.initrd.path.ends_with("initrd.img-6.1.0-10-cloud-amd64"));
    }

    #[test]
    fn host_lookup_without_kernel_says_how_to_fix() {
        let boot = tempfile::tempdir().unwrap();
        let err = resolve_host(boot.path()).unwrap_err().to_string();
        assert!(err.contains("linux-image-cloud-amd64"), "{err}");
    }

    #[test]
    fn banner_is_read_from_bzimage_header() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; 0x1000];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20E..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
        let banner = b"6.1.0-99-test (someone@example) #1 SMP\0";
        image[0x500..0x500 + banner.len()].copy_from_slice(banner);
        let path = dir.path().join("bzImage");
        fs::write(&path, &image).unwrap();
        let initrd = dir.path().join("initrd");
        fs::write(&initrd, b"x").unwrap();
        let k = resolve_paths(&path, &initrd).unwrap();
        assert_eq!(k.version, "6.1.0-99-test");
        assert_eq!(
            k.banner.as_deref(),
            Some("6.1.0-99-test (someone@example) #1 SMP")
        );
    }

    #[test]
    fn real_host_kernel_banner_matches_its_file_name() {
        // Only meaningful where a Debian kernel is installed (always on agentvm hosts).
        let Ok(k) = resolve_host(Path::new("/boot")) else {
            return;
        };
        let name = k.kernel.path.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            name,
            format!("vmlinuz-{}", k.version),
            "banner {:?}",
            k.banner
        );
    }
}
