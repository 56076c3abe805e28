//! The image cache on disk: `<cache>/images/<hash>/` with `image.json`, and
//! the lock and temp-dir conventions that keep it consistent.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::kernel::ResolvedKernel;
use crate::{BuiltImage, ImageError, Recipe};

/// Version of the `image.json` layout.
pub(crate) const METADATA_FORMAT: u32 = 1;
/// Name of the metadata file, written last: an image directory without it is not an image.
pub const METADATA_FILE: &str = "image.json";
/// File name of the base disk inside an image directory.
pub const DISK_FILE: &str = "disk.qcow2";
/// File name of the kernel inside an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// File name of the initrd inside an image directory.
pub const INITRD_FILE: &str = "initrd.img";

/// Where images are cached unless told otherwise: `$AGENTVM_CACHE_DIR`, else
/// `/var/cache/agentvm`. Images live under `<cache>/images/<recipe hash>/`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("AGENTVM_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("/var/cache/agentvm"),
    }
}

pub(crate) fn images_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("images")
}

/// Contents of `image.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMetadata {
    /// Layout version of this file.
    pub format: u32,
    /// The recipe hash (also the directory name).
    pub recipe_hash: String,
    /// The recipe as given.
    pub recipe: Recipe,
    /// The kernel the image was built for.
    pub kernel: ResolvedKernel,
    /// Kernel command line to boot with.
    pub cmdline: String,
    /// When the build finished, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The files of the image, with their sizes.
    pub files: ImageFiles,
    /// Size of the disk as the guest sees it, MiB.
    pub disk_virtual_size_mib: u64,
    /// Size of the root file system tree before it became a disk, bytes.
    pub rootfs_bytes: u64,
    /// How long each build step took, seconds, in order.
    pub step_seconds: Vec<(String, f64)>,
}

/// The files of an image directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFiles {
    /// The qcow2 base disk.
    pub disk: FileEntry,
    /// The kernel.
    pub kernel: FileEntry,
    /// The initrd.
    pub initrd: FileEntry,
}

/// A file in an image directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name relative to the image directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

impl FileEntry {
    pub(crate) fn of(dir: &Path, name: &str) -> Result<Self, ImageError> {
        let path = dir.join(name);
        let meta =
            fs::metadata(&path).map_err(|e| ImageError::io("reading metadata of", &path, e))?;
        Ok(FileEntry {
            name: name.into(),
            size: meta.len(),
        })
    }
}

/// Reads an image directory; `None` when it is absent or incomplete (a
/// missing or corrupt `image.json`, or files missing or of the wrong size).
pub(crate) fn read_image(dir: &Path, recipe_hash: &str) -> Option<BuiltImage> {
    let meta_path = dir.join(METADATA_FILE);
    let text = fs::read_to_string(&meta_path).ok()?;
    let meta: ImageMetadata = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(path = %meta_path.display(), error = %e, "ignoring corrupt image metadata");
            return None;
        }
    };
    if meta.format != METADATA_FORMAT || meta.recipe_hash != recipe_hash {
        tracing::warn!(path = %meta_path.display(), "image metadata does not match its directory; ignoring it");
        return None;
    }
    for entry in [&meta.files.disk, &meta.files.kernel, &meta.files.initrd] {
        let path = dir.join(&entry.name);
        match fs::metadata(&path) {
            Ok(m) if m.is_file() && m.len() == entry.size => {}
            _ => {
                tracing::warn!(path = %path.display(), "image file missing or changed; ignoring the image");
                return None;
            }
        }
    }
    Some(BuiltImage {
        dir: dir.to_path_buf(),
        disk: dir.join(&meta.files.disk.name),
        kernel: dir.join(&meta.files.kernel.name),
        initrd: dir.join(&meta.files.initrd.name),
        cmdline: meta.cmdline,
        recipe_hash: meta.recipe_hash,
    })
}

/// Creates `dir` (and parents) and makes it 0755, so libvirt's qemu user can reach the image.
pub(crate) fn create_public_dir(dir: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dir).map_err(|e| ImageError::io("creating directory", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io("setting permissions of", dir, e))
}

/// Ancestors of `dir` that other users cannot traverse (libvirt's qemu user would fail to open the image).
pub(crate) fn untraversable_ancestors(dir: &Path) -> Vec<PathBuf> {
    dir.ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .filter(|p| fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
        .map(Path::to_path_buf)
        .collect()
}

/// Start time of a process (field 22 of /proc/PID/stat), to tell a live lock
/// holder from a recycled pid.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn lock_owner_alive(content: &str) -> bool {
    let mut parts = content.split_whitespace();
    let (Some(pid), start) = (
        parts.next().and_then(|p| p.parse::<u32>().ok()),
        parts.next(),
    ) else {
        // Being written right now, or garbage: treat as alive, unless garbage persists
        // (callers treat a lock that stays unparsable for long as stale).
        return true;
    };
    match process_start_time(pid) {
        None => false,
        Some(actual) => start
            .and_then(|s| s.parse::<u64>().ok())
            .is_none_or(|s| s == actual),
    }
}

/// An exclusive lock on building one recipe: the file `<images>/.lock-<hash>`
/// holding "PID STARTTIME". Waits while a live process holds it; takes over a
/// lock whose holder died. Released (deleted) on drop.
pub(crate) struct BuildLock {
    path: PathBuf,
    content: String,
}

impl BuildLock {
    pub(crate) fn acquire(
        images: &Path,
        recipe_hash: &str,
        on_wait: &mut dyn FnMut(&str),
    ) -> Result<Self, ImageError> {
        let path = images.join(format!(".lock-{recipe_hash}"));
        let pid = std::process::id();
        let content = format!("{} {}\n", pid, process_start_time(pid).unwrap_or(0));
        let mut told = false;
        let mut unparsable_since: Option<Instant> = None;
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(content.as_bytes())
                        .map_err(|e| ImageError::io("writing", &path, e))?;
                    return Ok(BuildLock { path, content });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ImageError::io("creating lock file", &path, e)),
            }
            let held = fs::read_to_string(&path).unwrap_or_default();
            let unparsable = held
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<u32>().ok())
                .is_none();
            if unparsable {
                unparsable_since.get_or_insert_with(Instant::now);
            } else {
                unparsable_since = None;
            }
            let stale = !lock_owner_alive(&held)
                || unparsable_since.is_some_and(|t| t.elapsed() > Duration::from_secs(5));
            if stale {
                Self::break_stale(&path, &held);
                continue;
            }
            if !told {
                on_wait(held.split_whitespace().next().unwrap_or("?"));
                told = true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Removes a dead holder's lock without clobbering a lock someone else
    /// took in the meantime: move it aside, check it is the one judged stale,
    /// put it back otherwise.
    fn break_stale(path: &Path, judged: &str) {
        let aside = path.with_extension(format!("stale-{}", std::process::id()));
        if fs::rename(path, &aside).is_err() {
            return;
        }
        let moved = fs::read_to_string(&aside).unwrap_or_default();
        if moved != judged {
            // A live lock; restore it unless yet another one appeared.
            let _ = fs::hard_link(&aside, path);
        }
        let _ = fs::remove_file(&aside);
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        if fs::read_to_string(&self.path).is_ok_and(|c| c == self.content) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Name of the temporary build directory of `recipe_hash` in this process.
pub(crate) fn temp_dir_name(recipe_hash: &str) -> String {
    format!(".tmp-{recipe_hash}-{}", std::process::id())
}

/// Temp build directories (`.tmp-<hash>-<pid>`) whose process is gone.
pub(crate) fn dead_temp_dirs(images: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(images) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(".tmp-")?;
            let pid: u32 = rest.rsplit('-').next()?.parse().ok()?;
            (!Path::new(&format!("/proc/{pid}")).exists()).then(|| e.path())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_the_environment() {
        // Only this test touches the variable.
        std::env::set_var("AGENTVM_CACHE_DIR", "/tmp/agentvm-cache-test");
        assert_eq!(
            default_cache_dir(),
            PathBuf::from("/tmp/agentvm-cache-test")
        );
        std::env::remove_var("AGENTVM_CACHE_DIR");
        assert_eq!(default_cache_dir(), PathBuf::from("/var/cache/agentvm"));
    }

    #[test]
    fn lock_liveness() {
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        assert!(lock_owner_alive(&format!("{me} {start}\n")));
        assert!(!lock_owner_alive(&format!("{me} {}\n", start + 1)));
        // pid_max is at most 2^22, so this pid cannot exist.
        assert!(!lock_owner_alive("99999999 1\n"));
        assert!(lock_owner_alive(""));
    }

    #[test]
    fn stale_lock_is_taken_over_and_live_lock_waits() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join(".lock-abc");
        fs::write(&lock_path, "99999999 1\n").unwrap();
        let mut waited = false;
        let lock = BuildLock::acquire(dir.path(), "abc", &mut |_| waited = true).unwrap();
        assert!(!waited);
        assert!(fs::read_to_string(&lock_path)
            .unwrap()
            .starts_with(&std::process::id().to_string()));

        // A second acquirer (another thread here) waits until the first is dropped.
        let images = dir.path().to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let l = BuildLock::acquire(&images, "abc", &mut |pid| tx.send(pid.to_owned()).unwrap())
                .unwrap();
            drop(l);
        });
        let holder = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(holder, std::process::id().to_string());
        drop(lock);
        waiter.join().unwrap();
        assert!(!lock_path.exists());
    }

    #[test]
    fn dead_temp_dirs_are_found_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join(temp_dir_name("abc"));
        let dead = dir.path().join(".tmp-abc-99999999");
        let image = dir.path().join("abc");
        for d in [&live, &dead, &image] {
            fs::create_dir(d).unwrap();
        }
        assert_eq!(dead_temp_dirs(dir.path()), vec![dead]);
    }
}
