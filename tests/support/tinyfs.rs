//! A small tmpfs for tests that fill a disk. Needs root; fails loudly otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of `size_mib` mounted on a directory; unmounted on drop (lazily when busy).
pub struct TinyFs {
    pub mount: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl TinyFs {
    /// Mounted on a fresh temporary directory.
    #[allow(dead_code)] // not every suite that includes this file uses it
    pub fn new(size_mib: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let mut fs = TinyFs::mount_on(&mount, size_mib, "0755");
        fs._dir = Some(dir);
        fs
    }

    /// Mounted on `dir` (created if missing), with `mode`.
    pub fn mount_on(dir: &Path, size_mib: u32, mode: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode={mode}"))
            .arg("agentvm-test-tinyfs")
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyFs {
            mount: dir.to_path_buf(),
            _dir: None,
        }
    }

    /// Writes a file until the filesystem is full; returns its path.
    pub fn fill(&self) -> PathBuf {
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.raw_os_error(), Some(28), "{e}");
                break;
            }
        }
        // Small writes too, down to the last bytes.
        while f.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}
