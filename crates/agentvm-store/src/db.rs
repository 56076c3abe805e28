//! Opening the database file, and reopening it after an I/O error: redb refuses every call
//! on a handle that hit one (a full disk, say), so every call goes through
//! `LocalDb::with_db`, which reopens the file from its last commit and retries once.

use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use redb::Database;

use crate::{StoreError, OBJECTS, OUTPUT, OUTPUT_META};

/// Bytes of the store file redb keeps cached in memory. Its default (1 GiB) let the
/// controller's memory grow with the total output runs ever wrote, up to that size.
pub const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Opens (creating, or repairing after an unclean stop) the database file and creates the
/// tables so read transactions never see them missing.
/// The store holds every object, its status and run output: mode 0600 from its creation
/// (an empty file is a new store to redb), and a store made by an older version is
/// tightened.
fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
}

fn open_database(path: &Path) -> Result<Database, StoreError> {
    let open_err = |message: String| StoreError::Open {
        path: path.to_path_buf(),
        message,
    };
    let db = Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .create(path)
        .map_err(|e| {
            match e {
        redb::DatabaseError::DatabaseAlreadyOpen => open_err(
            "it is already open (is another agentvm controller running with this state directory?)"
                .into(),
        ),
        redb::DatabaseError::Storage(s) if is_disk_full(&s) => StoreError::DiskFull {
            path: path.to_path_buf(),
        },
        other => open_err(other.to_string()),
    }
        })?;
    let txn = db.begin_write()?;
    txn.open_table(OBJECTS)?;
    txn.open_table(OUTPUT)?;
    txn.open_table(OUTPUT_META)?;
    txn.commit()?;
    Ok(db)
}

fn is_disk_full(e: &redb::StorageError) -> bool {
    matches!(e, redb::StorageError::Io(io) if io_is_disk_full(io))
}

/// ENOSPC or EDQUOT.
fn io_is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28 | 122))
}

/// What a database error means for the open handle.
enum DbFailure {
    /// An earlier I/O error poisoned the handle (redb refuses every call until it is
    /// reopened); this call did nothing.
    Poisoned,
    /// This call hit an I/O error: it did not complete and the handle is now poisoned.
    Io { disk_full: bool },
}

impl StoreError {
    fn db_failure(&self) -> Option<DbFailure> {
        let StoreError::Db(e) = self else {
            return None;
        };
        match e.as_ref() {
            redb::Error::PreviousIo => Some(DbFailure::Poisoned),
            redb::Error::Io(io) => Some(DbFailure::Io {
                disk_full: io_is_disk_full(io),
            }),
            _ => None,
        }
    }
}

/// The local redb file: object records of a single-host store, and run output always.
pub(crate) struct LocalDb {
    /// The open database and how often it was reopened. `None` while a reopen failed
    /// (the next call tries again).
    db: RwLock<(Option<Database>, u64)>,
    path: PathBuf,
}

impl LocalDb {
    /// Runs `f` on the database. redb refuses every call after an I/O error (a full disk,
    /// say) until the file is reopened, so such a failure reopens the database (repairing
    /// it from its last commit); a call refused that way is retried once on the reopened
    /// handle, and a disk-full error becomes [`StoreError::DiskFull`]. Reads and writes
    /// therefore work again as soon as the cause is gone, without a controller restart.
    pub(crate) fn with_db<T>(
        &self,
        mut f: impl FnMut(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let (result, seen) = {
                let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
                match &guard.0 {
                    Some(db) => (f(db), guard.1),
                    None => (
                        Err(StoreError::Db(Box::new(redb::Error::PreviousIo))),
                        guard.1,
                    ),
                }
            };
            let Err(e) = result else {
                return result;
            };
            match e.db_failure() {
                None => return Err(e),
                Some(DbFailure::Poisoned) => {
                    self.reopen(seen)?;
                    if retried {
                        return Err(e);
                    }
                    retried = true;
                }
                Some(DbFailure::Io { disk_full }) => {
                    // Reopen now so later calls work once the cause is gone; a failed
                    // reopen is retried by the next call.
                    if let Err(reopen) = self.reopen(seen) {
                        tracing::error!("object store: reopening after an I/O error: {reopen}");
                    }
                    return Err(if disk_full {
                        StoreError::DiskFull {
                            path: self.path.clone(),
                        }
                    } else {
                        e
                    });
                }
            }
        }
    }

    /// Closes and reopens the database unless another thread already did since the handle
    /// `seen` was taken.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if guard.1 != seen && guard.0.is_some() {
            return Ok(());
        }
        // The old handle must be closed first: redb locks the file.
        guard.0 = None;
        guard.1 += 1;
        let db = open_database(&self.path)?;
        tracing::warn!(
            "object store {}: reopened after an I/O error",
            self.path.display()
        );
        guard.0 = Some(db);
        Ok(())
    }

    /// Opens (creating if needed) the database at `path`, and its parent directory.
    pub(crate) fn open(path: &Path) -> Result<LocalDb, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: path.to_path_buf(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
        }
        make_private(path).map_err(|e| open_err(e.to_string()))?;
        let db = open_database(path)?;
        Ok(LocalDb {
            db: RwLock::new((Some(db), 0)),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}
