//! Who may read what the controller keeps in its state directory: the process umask and
//! the modes of the directory and of what is under it.
//!
//! Guarantees (the `controller_runs` end-to-end test checks every path under a real
//! controller's state directory after runs with artifacts):
//! - `agentvm controller` runs with umask 0o077 ([`restrict_umask`], called first thing):
//!   whatever it, or a program it starts (`qemu-img`), creates without an explicit mode is
//!   for its owner only.
//! - `<stateDir>` is 0711 ([`STATE_DIR_MODE`]): only its owner lists it; others may only
//!   pass through it, which QEMU needs (it runs as its own user, `libvirt-qemu` on Debian,
//!   and opens its VM's disk overlay under `vms/` by path: with 0700, libvirt refuses to
//!   start the VM). The API socket in it has its own mode (0660, group `socketGroup`).
//! - `vms/` and each VM's directory are 0711 as well; disks, saved states, the serial log
//!   and records in them are 0600 (libvirt hands the disks to QEMU's user).
//! - The store (`store.redb`), the audit log, `accel-probe.json` and the ownership records
//!   (`owned/`, 0700) are 0600.
//! - `artifacts/` and each run's directory in it are 0750, unpacked files 0640, group
//!   `socketGroup` when one is configured (the users of the API, which reports these
//!   paths), else the controller's own group ([`agentvm_run::artifacts`]).
//!
//! Assumptions: the state directory belongs to agentvm (its mode is set, not negotiated),
//! and the controller runs as the user owning it (root, to use `qemu:///system`).

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::reconcilers::agent_run::ARTIFACTS_DIR;
use crate::Config;
use agentvm_run::artifacts;

/// Mode of the state directory (see the module documentation for why others may traverse).
pub const STATE_DIR_MODE: u32 = agentvm_backend::vm::VM_DIR_MODE;
/// The controller process's umask.
pub const CONTROLLER_UMASK: u32 = 0o077;

/// Sets this process's umask to [`CONTROLLER_UMASK`] (for every thread: the umask is per
/// process). Returns the previous one.
pub fn restrict_umask() -> u32 {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(CONTROLLER_UMASK)).as_raw_mode()
}

/// Creates the state directory if needed and sets the modes of what an older version may
/// have left more open: the directory itself ([`STATE_DIR_MODE`]) and `artifacts/` (0750,
/// group `socketGroup` if set). Files get theirs where they are opened (the store, the
/// audit log).
pub fn prepare(config: &Config) -> io::Result<()> {
    let dir = &config.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(dir)?;
    set_mode(dir, STATE_DIR_MODE)?;
    let artifacts_dir = dir.join(ARTIFACTS_DIR);
    if artifacts_dir.is_dir() {
        let gid = config.socket_gid().ok().flatten();
        if gid.is_some() {
            std::os::unix::fs::chown(&artifacts_dir, None, gid)?;
        }
        set_mode(&artifacts_dir, artifacts::DIR_MODE)?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("setting mode {mode:o} on {}: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_state_directory_and_its_artifacts_are_closed_at_start() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(state.join("artifacts/old-run")).unwrap();
        for p in [&state, &state.join("artifacts")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let config = Config {
            state_dir: state.clone(),
            ..Config::default()
        };
        prepare(&config).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&state), 0o711);
        assert_eq!(mode(&state.join("artifacts")), 0o750);

        // A state directory that does not exist yet is made with the same mode.
        let fresh = tmp.path().join("a/b/state");
        prepare(&Config {
            state_dir: fresh.clone(),
            ..Config::default()
        })
        .unwrap();
        assert_eq!(mode(&fresh), 0o711);
    }
}
