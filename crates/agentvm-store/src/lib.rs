//! The object store: every desired object, its status, who manages it, and the output of runs,
//! in one embedded transactional database file (`<stateDir>/store.redb`, redb).
//!
//! It is the single source of truth for `get` and `describe` and the only input of the
//! reconcilers. All methods are synchronous and short (one redb transaction, microseconds
//! for reads; writes that change objects wait for an fsync, typically well under a
//! millisecond to a few milliseconds). Async callers may call reads directly; callers
//! that write in a loop, or that must never stall a runtime thread, use
//! `tokio::task::spawn_blocking`. [`Store`] is a cheap `Clone` handle.
//!
//! Where things are: `objects.rs` (records, apply, status, deletion, watch events),
//! `output.rs` (run output), `db.rs` (opening the file, and reopening it after an I/O
//! error), [`caller`] (who submitted an object).
//!
//! # Guarantees
//! - Every write is one ACID transaction: after a crash the file holds either the old or
//!   the new state of each object, never a torn one. Object writes are durable when the
//!   call returns; run output is flushed lazily (a crash may lose its last appends, never
//!   corrupt them).
//! - `metadata.generation` is 1 on creation and grows by one exactly when the spec hash
//!   ([`agentvm_api::spec_hash`]) changes; labels, annotations and status never bump it.
//! - `apply` never touches `status`; `update_status` never touches spec or metadata.
//! - An object managed by one source (a spec-dir file, or the API) is not overwritten by
//!   another unless the caller forces it ([`StoreError::Conflict`] names the manager).
//! - Deletion is two-phase, like Kubernetes finalizers: [`Store::request_delete`] only
//!   marks the object (it stays visible with `deletionRequestedAt`); only
//!   [`Store::finalize_delete`], called by the reconciler once nothing outside the store
//!   refers to the object any more, removes it (and a run's output). A deletion cannot be
//!   lost by a missed event: the mark is in the store.
//! - A full disk (or any I/O error) fails only the write that hit it, with
//!   [`StoreError::DiskFull`]; the database is then reopened from its last commit, so reads
//!   go on and writes succeed again once space is freed, without a restart.
//! - Secrets never enter the store: `AgentRun.spec.secretEnv` only names where a value is
//!   read (`fromEnv`, `fromFile`) when the run starts; the store never reads them.
//! - Every object records its submitter ([`Caller`]): whoever applied it last. Applying the
//!   same object as someone else is a change, so an object never keeps an earlier
//!   submitter's rights.
//!
//! # Assumptions
//! - One process opens the file at a time (redb locks it; a second open fails with a
//!   clear error).
//! - Events ([`Store::subscribe`]) are hints, sent after the commit: a slow receiver may
//!   lag and miss some (`RecvError::Lagged`), and must then re-list. Consumers always
//!   re-read the object; they never trust an event's content.

pub mod caller;
pub mod cluster;
mod db;
mod etcd;
mod objects;
mod output;
mod records;

pub use caller::Caller;
pub use db::STORE_CACHE_BYTES;
pub use objects::{
    ApplyItem, ApplyOptions, ApplyOutcome, Change, Manager, ObjectKey, StoreEvent, StoredObject,
};
pub use output::{OutputChunk, OutputRead, OutputStream, MAX_OUTPUT_BYTES_PER_STREAM};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentvm_api::ValidationErrors;
use redb::TableDefinition;
use tokio::sync::broadcast;

pub use etcd::ClusterConfig;
use records::RecordStore;

/// Name of the store file inside the state directory.
pub const STORE_FILE: &str = "store.redb";

/// Capacity of the event channel before slow subscribers start lagging.
const EVENT_CAPACITY: usize = 4096;

/// `Kind/name` -> JSON of [`StoredObject`].
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// (run name, offset of the chunk's first byte) -> stream tag byte + bytes.
const OUTPUT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("run_output");
/// run name -> JSON of `output::OutputMeta`.
const OUTPUT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("run_output_meta");

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened.
    #[error("opening the object store {path}: {message}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The database failed (I/O error, corruption).
    #[error("object store: {0}")]
    Db(Box<redb::Error>),
    /// The filesystem holding the store is full: the write was not stored.
    #[error("the object store's disk is full ({}): this change was not stored; free space on that filesystem and retry", .path.display())]
    DiskFull {
        /// The database file.
        path: PathBuf,
    },
    /// The object breaks a validation rule.
    #[error("{key}: invalid object:\n{errors}")]
    Invalid {
        /// The object.
        key: ObjectKey,
        /// Every problem found.
        errors: ValidationErrors,
    },
    /// The object is managed by another source.
    #[error("{key} is managed by {manager}; change or delete it there, or take it over with `agentvm apply --force`")]
    Conflict {
        /// The object.
        key: ObjectKey,
        /// Its current manager.
        manager: Manager,
    },
    /// No such object.
    #[error("{0} not found")]
    NotFound(ObjectKey),
    /// A status does not fit the kind's status type.
    #[error("{key}: status rejected: {message}")]
    BadStatus {
        /// The object.
        key: ObjectKey,
        /// Why it does not decode.
        message: String,
    },
    /// The cluster store (etcd) did not answer in time or refused the call (no quorum, say).
    #[error("the cluster store ({endpoints}) is unavailable: {message}; nothing was changed by this call, and it can be retried once the store answers")]
    Unavailable {
        /// The etcd endpoints.
        endpoints: String,
        /// What failed.
        message: String,
    },
    /// Other writers kept changing the object while this write was decided on.
    #[error("{0} kept changing while this write was being made; retry")]
    Contended(ObjectKey),
    /// A stored record cannot be decoded (written by an incompatible version).
    #[error("object store record {key:?} cannot be decoded: {message}")]
    Corrupt {
        /// The database key.
        key: String,
        /// Why.
        message: String,
    },
}

macro_rules! db_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_errors!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Handle on the object store; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The local file: run output, and the object records of a single-host store.
    local: Arc<db::LocalDb>,
    /// Where object records live: the local file, or an etcd cluster.
    records: Box<dyn RecordStore>,
    events: broadcast::Sender<StoreEvent>,
    output_events: broadcast::Sender<String>,
    observers: std::sync::Mutex<Vec<ChangeObserver>>,
}

/// Called on the writing thread with every change, after its transaction committed and
/// before the write returns (see [`Store::observe`]); returns false to stop observing. It
/// must not call the store.
pub type ChangeObserver = Box<dyn Fn(&StoreEvent) -> bool + Send + Sync>;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.local.path())
            .finish()
    }
}

impl Store {
    /// Opens (creating if needed) the single-host store at `path`, and its parent
    /// directory: objects and run output in one file.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let local = Arc::new(db::LocalDb::open(path.as_ref())?);
        let records = Box::new(records::LocalRecords { db: local.clone() });
        let store = Self::with_records(local, records);
        store.prune_output()?;
        Ok(store)
    }

    /// Opens a cluster store: objects in the etcd cluster `cluster` names, run output in the
    /// local file at `output_path`. Changes made by any node arrive as events.
    pub fn open_cluster(
        cluster: &ClusterConfig,
        output_path: impl AsRef<Path>,
    ) -> Result<Store, StoreError> {
        let local = Arc::new(db::LocalDb::open(output_path.as_ref())?);
        let records = etcd::EtcdRecords::connect(cluster)?;
        let store = Self::with_records(local, Box::new(records.clone()));
        records.watch(&store)?;
        store.prune_output()?;
        Ok(store)
    }

    fn with_records(local: Arc<db::LocalDb>, records: Box<dyn RecordStore>) -> Store {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (output_events, _) = broadcast::channel(EVENT_CAPACITY);
        Store {
            inner: Arc::new(Inner {
                local,
                records,
                events,
                output_events,
                observers: std::sync::Mutex::default(),
            }),
        }
    }

    /// The local database file (run output; and the objects of a single-host store).
    pub fn path(&self) -> &Path {
        self.inner.local.path()
    }
}

#[cfg(any(test, feature = "test-support"))]
pub mod testing;

#[cfg(test)]
mod tests;
