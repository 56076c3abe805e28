//! Pool templates: a pool's first VM is booted, warmed up and parked as always; then a copy
//! of its overlay (holding its golden state, memory and disk) and its definition are kept as
//! the pool's template under `<state>/templates/<pool>/`, and every further VM of the pool
//! with the same template hash is made from it instead of booting: the copy becomes its
//! overlay, its definition gets the VM's own name, UUID, paths (and on a network, MAC and
//! lease), it `loadvm`s the golden state, is reseeded, and parks anew — so its own golden
//! state holds its own identity. See [`crate::fork`] for the mechanism, which forks share.
//!
//! A template is only ever read (copied), never run, so copies need no pause. It is
//! replaced when a VM of a newer template hash parks, and removed with the pool.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{io_err, Result};
use crate::golden::GOLDEN_SNAPSHOT;
use crate::libvirt::Libvirt;
use crate::vm::{make_dir, write_private, VmFiles};

const DISK: &str = "disk.qcow2";
const DEFINITION: &str = "domain.xml";
/// The name of the VM the template was taken from (its paths are in the definition).
const SOURCE: &str = "source";
/// The pool template hash the template was made for.
const HASH: &str = "hash";

/// A pool's template on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTemplate {
    dir: PathBuf,
    /// The VM it was taken from.
    pub source: String,
    /// The template hash of the pool it was made for.
    pub hash: String,
}

fn templates_dir(state_dir: &Path, pool: &str) -> PathBuf {
    state_dir.join("templates").join(pool)
}

impl PoolTemplate {
    /// Pool `pool`'s template for template hash `hash`, if there is one.
    pub fn find(state_dir: &Path, pool: &str, hash: &str) -> Option<PoolTemplate> {
        let dir = templates_dir(state_dir, pool);
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        let t = PoolTemplate {
            source: read(SOURCE)?.trim().to_string(),
            hash: read(HASH)?.trim().to_string(),
            dir: dir.clone(),
        };
        (t.hash == hash && dir.join(DISK).is_file() && dir.join(DEFINITION).is_file()).then_some(t)
    }

    /// Removes pool `pool`'s template; succeeds when there is none.
    pub fn remove(state_dir: &Path, pool: &str) -> Result<()> {
        let dir = templates_dir(state_dir, pool);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &dir)(e)),
            _ => Ok(()),
        }
    }

    /// The template's copy of its source's overlay.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(DISK)
    }

    /// The definition of a VM `name` (files `files`) made from this template.
    pub(crate) fn definition_for(
        &self,
        state_dir: &Path,
        name: &str,
        files: &VmFiles,
    ) -> Result<String> {
        let xml = std::fs::read_to_string(self.dir.join(DEFINITION))
            .map_err(io_err("read", &self.dir.join(DEFINITION)))?;
        let source_files = VmFiles::new(state_dir, &self.source);
        crate::fork::fork_definition(&xml, &self.source, &source_files.dir, name, &files.dir)
    }
}

impl Libvirt {
    /// Keeps parked pool VM `name` (files `files`) as pool `pool`'s template for template
    /// hash `hash`, replacing the one there was: its definition, and a copy of its overlay
    /// taken with its vCPUs stopped (for the copy's duration). Returns that pause.
    pub fn save_pool_template(
        &self,
        state_dir: &Path,
        pool: &str,
        hash: &str,
        name: &str,
        files: &VmFiles,
    ) -> Result<Duration> {
        let dir = templates_dir(state_dir, pool);
        let tmp = dir.with_extension(format!("new-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        make_dir(&tmp)?;
        let made = (|| {
            let dom = self
                .raw()
                .lookup_domain_by_name(name)
                .map_err(|e| crate::BackendError::from_virt(e, "domain", name))?;
            let xml = dom
                .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
                .map_err(|e| crate::BackendError::from_virt(e, "domain", name))?;
            let into = VmFiles { dir: tmp.clone() };
            let (pause, _) = self.copy_disk_quiesced(name, files, &into)?;
            // Nothing but the golden state comes along.
            for other in crate::fork::internal_snapshots(&into.disk())? {
                if other != GOLDEN_SNAPSHOT {
                    return Err(crate::BackendError::Protocol {
                        what: format!("the template of pool {pool}"),
                        message: format!(
                            "{name} holds snapshot {other:?} besides its golden state"
                        ),
                    });
                }
            }
            write_private(&tmp.join(DEFINITION), xml.as_bytes())?;
            write_private(&tmp.join(SOURCE), name.as_bytes())?;
            write_private(&tmp.join(HASH), hash.as_bytes())?;
            PoolTemplate::remove(state_dir, pool)?;
            std::fs::rename(&tmp, &dir).map_err(io_err("rename into place", &dir))?;
            Ok(pause)
        })();
        if made.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made
    }
}
