//! The files agentvm puts into every guest: its PID 1, power scripts, host name.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::ImageError;

/// agentvm's PID 1 (`/sbin/agentvm-init`): mounts, virtio modules, lo + DHCP,
/// qemu-guest-agent in a respawn loop, then reaps zombies.
pub const INIT_SCRIPT: &str = include_str!("guest/agentvm-init.sh");

/// `/sbin/shutdown`, `/sbin/poweroff`, `/sbin/halt`, `/sbin/reboot`: sync, then
/// `/proc/sysrq-trigger` (no systemd in the guest; qemu-ga's guest-shutdown calls these).
pub const POWER_SCRIPT: &str = include_str!("guest/power.sh");

/// Where agentvm's own guest agent is installed in the guest (PID 1 starts it).
pub const AGENT_PATH: &str = "/usr/local/sbin/agentvm-guest";

/// The environment variable naming the `agentvm-guest` binary to install.
pub const AGENT_BIN_ENV: &str = "AGENTVM_GUEST_BIN";

/// The `agentvm-guest` binary to put into images: `$AGENTVM_GUEST_BIN`, else the one next
/// to the running executable (installed beside `agentvm`), else one directory up (cargo's
/// test and bench binaries run from `target/<profile>/deps`).
pub fn agent_binary() -> Result<PathBuf, ImageError> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os(AGENT_BIN_ENV) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(p);
    } else if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let p = dir.join("agentvm-guest");
            if p.is_file() {
                return Ok(p);
            }
            looked.push(p);
        }
    }
    Err(ImageError::GuestAgentMissing { looked })
}

/// sha256 (hex) of the `agentvm-guest` binary [`agent_binary`] finds: part of the recipe
/// hash, so a changed agent builds a new image. Cached per path, size and mtime.
pub fn agent_identity() -> Result<String, ImageError> {
    use sha2::{Digest, Sha256};
    use std::sync::Mutex;
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static CACHE: Mutex<Option<(Key, String)>> = Mutex::new(None);
    let path = agent_binary()?;
    let meta = fs::metadata(&path).map_err(|e| ImageError::io("reading", &path, e))?;
    let key = (path.clone(), meta.len(), meta.modified().ok());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((k, hash)) = &*cache {
        if *k == key {
            return Ok(hash.clone());
        }
    }
    let bytes = fs::read(&path).map_err(|e| ImageError::io("reading", &path, e))?;
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    *cache = Some((key, hash.clone()));
    Ok(hash)
}

/// Host name of every guest.
pub const GUEST_HOSTNAME: &str = "agentvm";

/// A file agentvm installs into the guest root file system.
#[derive(Debug, Clone, Copy)]
pub struct GuestFile {
    /// Absolute path inside the guest.
    pub path: &'static str,
    /// Contents.
    pub content: &'static str,
    /// Permission bits.
    pub mode: u32,
}

/// Every file agentvm installs (all of them are part of the recipe hash).
pub const FILES: &[GuestFile] = &[
    GuestFile {
        path: "/sbin/agentvm-init",
        content: INIT_SCRIPT,
        mode: 0o755,
    },
    GuestFile {
        path: "/sbin/shutdown",
        content: POWER_SCRIPT,
        mode: 0o755,
    },
    GuestFile {
        path: "/sbin/poweroff",
        content: POWER_SCRIPT,
        mode: 0o755,
    },
    GuestFile {
        path: "/sbin/halt",
        content: POWER_SCRIPT,
        mode: 0o755,
    },
    GuestFile {
        path: "/sbin/reboot",
        content: POWER_SCRIPT,
        mode: 0o755,
    },
    GuestFile {
        path: "/etc/hostname",
        content: concat!("agentvm", "\n"),
        mode: 0o644,
    },
    GuestFile {
        path: "/etc/hosts",
        content: "127.0.0.1\tlocalhost\n127.0.1.1\tagentvm\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        mode: 0o644,
    },
    GuestFile {
        path: "/etc/fstab",
        content: "# Mounted by the kernel (root=/dev/vda rw) and /sbin/agentvm-init.\n/dev/vda\t/\text4\trw,relatime\t0\t1\n",
        mode: 0o644,
    },
];

/// Last touches before the root file system becomes an image: drop the
/// build host's resolver (the guest gets one from DHCP; dhclient-script writes
/// it) and apt's downloaded packages.
pub(crate) fn finalize(root: &Path) -> Result<(), ImageError> {
    let resolv = resolve_in_root(root, Path::new("/etc/resolv.conf"))?;
    if fs::symlink_metadata(&resolv).is_ok() {
        fs::remove_file(&resolv).map_err(|e| ImageError::io("removing", &resolv, e))?;
    }
    fs::write(&resolv, "").map_err(|e| ImageError::io("writing", &resolv, e))?;
    fs::set_permissions(&resolv, fs::Permissions::from_mode(0o644))
        .map_err(|e| ImageError::io("setting permissions of", &resolv, e))?;
    let archives = resolve_in_root(root, Path::new("/var/cache/apt/archives"))?;
    if let Ok(entries) = fs::read_dir(&archives) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "deb") {
                fs::remove_file(&path).map_err(|e| ImageError::io("removing", &path, e))?;
            }
        }
    }
    Ok(())
}

/// Writes every [`FILES`] entry into `root`, resolving symlinks inside `root`
/// (bookworm's `/sbin` is a symlink to `usr/sbin`).
pub(crate) fn install(root: &Path, agent: &Path) -> Result<(), ImageError> {
    let target = resolve_in_root(root, Path::new(AGENT_PATH))?;
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir).map_err(|e| ImageError::io("creating", dir, e))?;
    }
    fs::copy(agent, &target).map_err(|e| ImageError::io("copying agentvm-guest to", &target, e))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(|e| ImageError::io("setting permissions of", &target, e))?;
    for file in FILES {
        let target = resolve_in_root(root, Path::new(file.path))?;
        if let Ok(meta) = fs::symlink_metadata(&target) {
            if !meta.is_file() {
                fs::remove_file(&target).map_err(|e| ImageError::io("replacing", &target, e))?;
            }
        }
        fs::write(&target, file.content).map_err(|e| ImageError::io("writing", &target, e))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(file.mode))
            .map_err(|e| ImageError::io("setting permissions of", &target, e))?;
    }
    Ok(())
}

/// Maps an absolute guest path to a host path below `root`, following the
/// guest's symlinks (relative and absolute) as if `root` were `/`, for every
/// component but the last. Never leaves `root`.
pub(crate) fn resolve_in_root(root: &Path, guest_path: &Path) -> Result<PathBuf, ImageError> {
    let mut pending: Vec<std::ffi::OsString> = guest_path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .rev()
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let is_last = pending.is_empty();
        let host: PathBuf = std::iter::once(root.as_os_str().to_owned())
            .chain(resolved.iter().cloned())
            .chain(std::iter::once(part.clone()))
            .collect();
        match fs::read_link(&host) {
            Ok(link) if !is_last => {
                hops += 1;
                if hops > 40 {
                    return Err(ImageError::io(
                        "resolving",
                        host,
                        std::io::Error::other("too many levels of symbolic links"),
                    ));
                }
                if link.is_absolute() {
                    resolved.clear();
                }
                for c in link.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_owned()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    Ok(std::iter::once(root.as_os_str().to_owned())
        .chain(resolved)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::process::Command;

    fn syntax_check(shell: &str, script: &str) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("script.sh");
        fs::write(&path, script).unwrap();
        let out = Command::new(shell).arg("-n").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{shell} -n failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn scripts_parse_with_sh_and_dash() {
        for shell in ["sh", "dash"] {
            syntax_check(shell, INIT_SCRIPT);
            syntax_check(shell, POWER_SCRIPT);
        }
    }

    #[test]
    fn init_script_does_what_pid1_must() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/sh\n"));
        for needle in [
            "mount_fs proc /proc",
            "mount_fs sysfs /sys",
            "mount_fs devtmpfs /dev",
            "mount_fs devpts /dev/pts",
            "mount_fs tmpfs /run",
            "mount_fs cgroup2 /sys/fs/cgroup",
            "mount_fs tmpfs /tmp",
            "virtio_console virtio_net virtio_blk virtio_balloon virtio_rng",
            "ip link set lo up",
            "/sys/class/net/e*",
            "dhclient -nw",
            "/sys/class/virtio-ports/*",
            "org.qemu.guest_agent.0",
            "qemu-ga -m virtio-serial -p \"$port\"",
            "port_named org.agentvm.agent.0",
            "/usr/local/sbin/agentvm-guest --port \"$port\"",
        ] {
            assert!(INIT_SCRIPT.contains(needle), "init script lacks {needle:?}");
        }
        // The agent loop runs in the background, and PID 1 ends in a reaping loop.
        assert!(INIT_SCRIPT.contains(") &\n"));
        assert!(INIT_SCRIPT
            .trim_end()
            .ends_with("while :; do\n    wait\n    sleep 1\ndone"));
    }

    #[test]
    fn power_script_picks_action_from_name_and_flags() {
        // Run it with sysrq and sync replaced, to see which letter it would send.
        let dir = tempfile::tempdir().unwrap();
        let script = POWER_SCRIPT
            .replace("/proc/sysrq-trigger", "\"$SYSRQ\"")
            .replace("sleep 10", "");
        for (name, args, want) in [
            ("poweroff", &[][..], "o"),
            ("reboot", &[][..], "b"),
            (
                "shutdown",
                &["-P", "+0", "hypervisor initiated shutdown"][..],
                "o",
            ),
            (
                "shutdown",
                &["-r", "+0", "hypervisor initiated reboot"][..],
                "b",
            ),
            ("shutdown", &["-H", "+0"][..], "o"),
        ] {
            let path = dir.path().join(name);
            fs::write(&path, &script).unwrap();
            let trigger = dir.path().join("trigger");
            let _ = fs::remove_file(&trigger);
            let status = Command::new("sh")
                .arg(&path)
                .args(args)
                .env("SYSRQ", &trigger)
                .status()
                .unwrap();
            assert!(status.success());
            assert_eq!(
                fs::read_to_string(&trigger).unwrap().trim(),
                want,
                "{name} {args:?}"
            );
        }
    }

    #[test]
    fn paths_resolve_through_guest_symlinks_without_leaving_root() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/sbin")).unwrap();
        symlink("usr/sbin", r.join("sbin")).unwrap();
        // An absolute link must resolve inside the root, not on the host.
        symlink("/usr/sbin", r.join("abs")).unwrap();
        symlink("../../../../..", r.join("usr/escape")).unwrap();
        assert_eq!(
            resolve_in_root(r, Path::new("/sbin/agentvm-init")).unwrap(),
            r.join("usr/sbin/agentvm-init")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/abs/x")).unwrap(),
            r.join("usr/sbin/x")
        );
        assert_eq!(
            resolve_in_root(r, Path::new("/usr/escape/etc/passwd")).unwrap(),
            r.join("etc/passwd")
        );
    }

    #[test]
    fn install_writes_files_with_modes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/sbin")).unwrap();
        fs::create_dir_all(r.join("etc")).unwrap();
        symlink("usr/sbin", r.join("sbin")).unwrap();
        // debootstrap copies the host's resolv.conf; it may also be a symlink.
        symlink("/run/resolvconf/resolv.conf", r.join("etc/resolv.conf")).unwrap();
        let agent = root.path().join("agent-bin");
        fs::write(&agent, b"\x7fELF agent").unwrap();
        install(r, &agent).unwrap();
        // /usr/local/sbin did not exist: made, and the agent is executable there.
        let installed = r.join("usr/local/sbin/agentvm-guest");
        assert_eq!(fs::read(&installed).unwrap(), b"\x7fELF agent");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let init = r.join("usr/sbin/agentvm-init");
        assert_eq!(fs::read_to_string(&init).unwrap(), INIT_SCRIPT);
        assert_eq!(
            fs::metadata(&init).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            "agentvm\n"
        );
        assert_eq!(
            fs::read_to_string(r.join("etc/hostname")).unwrap(),
            format!("{GUEST_HOSTNAME}\n")
        );
        // The host's resolver link survives setup commands, and is gone after finalize.
        assert!(fs::symlink_metadata(r.join("etc/resolv.conf"))
            .unwrap()
            .is_symlink());
        fs::create_dir_all(r.join("var/cache/apt/archives")).unwrap();
        fs::write(r.join("var/cache/apt/archives/x_1_amd64.deb"), b"deb").unwrap();
        finalize(r).unwrap();
        assert!(fs::symlink_metadata(r.join("etc/resolv.conf"))
            .unwrap()
            .is_file());
        assert_eq!(fs::read_to_string(r.join("etc/resolv.conf")).unwrap(), "");
        assert!(!r.join("var/cache/apt/archives/x_1_amd64.deb").exists());
        assert_eq!(
            fs::metadata(r.join("etc/hosts"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o644
        );
    }
}
