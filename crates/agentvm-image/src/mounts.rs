//! Mounting kernel file systems into a build root for chroot, and never
//! deleting a directory that still has something mounted below it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::command;
use crate::ImageError;

/// proc, sysfs, devpts and a /dev/shm tmpfs mounted inside a root file system
/// for the duration of chroot commands; unmounted on drop (also on errors and panics).
///
/// Only fresh instances are mounted, never bind mounts of host directories, so
/// even a careless recursive delete below the root could not reach the host.
/// debootstrap already created the device nodes in the root's /dev.
pub(crate) struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    pub(crate) fn mount(root: &Path) -> Result<Self, ImageError> {
        let mut guard = ChrootMounts {
            mounted: Vec::new(),
        };
        for (fstype, target, options) in [
            ("proc", "proc", "nosuid,nodev,noexec"),
            ("sysfs", "sys", "nosuid,nodev,noexec"),
            (
                "devpts",
                "dev/pts",
                "newinstance,gid=5,mode=0620,ptmxmode=0666",
            ),
            ("tmpfs", "dev/shm", "mode=1777,nosuid,nodev"),
        ] {
            let path = root.join(target);
            // Never follow a symlink out of the root.
            if fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
                return Err(ImageError::io(
                    "mounting on",
                    &path,
                    std::io::Error::other("not a directory"),
                ));
            }
            fs::create_dir_all(&path)
                .map_err(|e| ImageError::io("creating directory", &path, e))?;
            command::run(
                Command::new("mount")
                    .args(["-t", fstype, "-o", options, fstype])
                    .arg(&path),
                None,
            )?;
            guard.mounted.push(path);
        }
        Ok(guard)
    }

    /// Unmounts everything (also whatever a setup command mounted below the root).
    pub(crate) fn unmount(mut self) -> Result<(), ImageError> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<(), ImageError> {
        let mut first_error = None;
        while let Some(path) = self.mounted.pop() {
            if let Err(e) = unmount_under(&path) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_all() {
            tracing::warn!(error = %e, "unmounting build root file systems failed");
        }
    }
}

/// Mount points at or below `dir`, deepest first (from /proc/self/mountinfo).
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount at or below `dir`, deepest first (lazily if busy).
pub(crate) fn unmount_under(dir: &Path) -> Result<(), ImageError> {
    for mount in mounts_under(dir) {
        let plain = command::run(Command::new("umount").arg(&mount), None);
        if plain.is_err() {
            command::run(Command::new("umount").arg("-l").arg(&mount), None)?;
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(ImageError::StillMounted {
            path: dir.to_path_buf(),
            mounts: left
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// Removes `dir` recursively, after unmounting anything below it; refuses if
/// something stays mounted. A missing `dir` is fine.
pub(crate) fn remove_build_dir(dir: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    unmount_under(dir)?;
    fs::remove_dir_all(dir).map_err(|e| ImageError::io("removing", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }

    #[test]
    fn proc_is_seen_as_mounted() {
        assert!(mounts_under(Path::new("/proc")).contains(&PathBuf::from("/proc")));
        assert!(mounts_under(Path::new("/nonexistent-agentvm")).is_empty());
    }
}
