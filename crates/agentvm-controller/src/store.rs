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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use agentvm_api::{spec_hash, validate, Kind, KindStatus, Resource, ValidationErrors};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::caller::Caller;
use crate::time::Timestamp;

/// Name of the store file inside the state directory.
pub const STORE_FILE: &str = "store.redb";

/// Most output bytes kept per stream of a run, whatever cap the caller asks for: the largest
/// `output.maxMib` (64 MiB).
pub const MAX_OUTPUT_BYTES_PER_STREAM: u64 =
    (agentvm_api::kinds::agent_run::MAX_OUTPUT_MAX_MIB as u64) << 20;

/// Bytes of the store file redb keeps cached in memory. Its default (1 GiB) let the
/// controller's memory grow with the total output runs ever wrote, up to that size.
pub const STORE_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Capacity of the event channel before slow subscribers start lagging.
const EVENT_CAPACITY: usize = 4096;

/// `Kind/name` -> JSON of [`StoredObject`].
const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// (run name, offset of the chunk's first byte) -> stream tag byte + bytes.
const OUTPUT: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("run_output");
/// run name -> JSON of [`OutputMeta`].
const OUTPUT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("run_output_meta");

/// Who declares an object; only its manager may change or delete it (unless forced).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Manager {
    /// A manifest file in the watched spec directory (path relative to the directory).
    SpecDir {
        /// The file, relative to the spec directory (`pools/sandbox.yaml`).
        file: String,
    },
    /// `agentvm apply` / the controller API.
    Api,
}

impl fmt::Display for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Manager::SpecDir { file } => write!(f, "spec-dir file {file}"),
            Manager::Api => f.write_str("api (agentvm apply)"),
        }
    }
}

/// Options of [`Store::apply`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Take the object over from another manager instead of failing with a conflict.
    pub force: bool,
    /// Compute the outcome but write nothing (`agentvm diff`, `apply --dry-run`).
    pub dry_run: bool,
}

/// What an apply did to one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// The object did not exist.
    Created,
    /// The spec, labels, annotations or manager changed (or a pending deletion was cancelled).
    Configured,
    /// Nothing changed; nothing was written.
    Unchanged,
}

impl fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

/// Identity of an object: kind and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// The key of `kind`/`name`.
    pub fn new(kind: Kind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }

    fn db_key(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// An object as stored: the resource with its status, plus bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredObject {
    /// The object, with `metadata.generation` and `status`.
    #[serde(rename = "object")]
    pub resource: Resource,
    /// Who declares it.
    pub manager: Manager,
    /// Who submitted its current spec: the API client (from the socket) or the spec
    /// directory's owner. A run's host inputs are read with these rights. `None` for objects
    /// stored before submitters were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitter: Option<Caller>,
    /// When it was first applied.
    pub created_at: Timestamp,
    /// When its spec, metadata, manager or status last changed.
    pub updated_at: Timestamp,
    /// When its deletion was requested; it is removed once its reconciler finalizes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_requested_at: Option<Timestamp>,
    /// Who requested the deletion, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_requested_by: Option<Caller>,
}

impl StoredObject {
    /// Kind and name.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.resource.kind(), self.resource.name())
    }

    /// True once deletion was requested.
    pub fn is_deleting(&self) -> bool {
        self.deletion_requested_at.is_some()
    }

    /// `metadata.generation`.
    pub fn generation(&self) -> i64 {
        self.resource.metadata().generation
    }

    /// The status as JSON (`null` when there is none yet).
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.resource)
            .ok()
            .and_then(|mut v| v.get_mut("status").map(serde_json::Value::take))
            .unwrap_or(serde_json::Value::Null)
    }
}

/// What happened to an object; see [`StoreEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Change {
    /// Created, or its spec, metadata or manager changed.
    Applied,
    /// Its status changed.
    StatusChanged,
    /// Its deletion was requested.
    DeleteRequested,
    /// It was removed from the store (finalized).
    Removed,
}

/// A change notification, sent after the transaction committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreEvent {
    /// The object's kind.
    pub kind: Kind,
    /// The object's name.
    pub name: String,
    /// What happened.
    pub change: Change,
}

impl StoreEvent {
    /// The object's key.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.kind, self.name.clone())
    }
}

/// Which output stream of a run bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    fn tag(self) -> u8 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
        }
    }

    fn from_tag(tag: u8) -> Self {
        if tag == 2 {
            OutputStream::Stderr
        } else {
            OutputStream::Stdout
        }
    }
}

impl FromStr for OutputStream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(OutputStream::Stdout),
            "stderr" => Ok(OutputStream::Stderr),
            other => Err(format!("unknown stream {other:?}: use stdout or stderr")),
        }
    }
}

/// Bytes of one stream, in the order they were appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The stream.
    pub stream: OutputStream,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Result of [`Store::read_output`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputRead {
    /// The chunks from the requested offset on, both streams interleaved in append order.
    pub chunks: Vec<OutputChunk>,
    /// Offset to read from next time.
    pub next_offset: u64,
    /// Bytes stored so far (both streams).
    pub total: u64,
    /// True when output beyond the run's cap was dropped.
    pub truncated: bool,
    /// Bytes dropped at the cap, both streams.
    pub dropped: u64,
}

impl OutputRead {
    /// Both streams' bytes concatenated.
    pub fn bytes(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.data.clone()).collect()
    }
}

/// Size bookkeeping of a run's output.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct OutputMeta {
    /// Bytes kept, both streams.
    len: u64,
    truncated: bool,
    /// Bytes kept of stdout.
    #[serde(default)]
    stdout: u64,
    /// Bytes kept of stderr.
    #[serde(default)]
    stderr: u64,
    /// Bytes dropped at the cap, both streams.
    #[serde(default)]
    dropped: u64,
}

/// One object to apply, with its manager and submitter (see [`Store::apply_batch`]).
#[derive(Debug, Clone)]
pub struct ApplyItem {
    /// The object; its `status` and `metadata.generation` are ignored.
    pub resource: Resource,
    /// Who declares it.
    pub manager: Manager,
    /// Who submits it (the API client, the spec directory's owner).
    pub submitter: Caller,
    /// Take it over from another manager.
    pub force: bool,
}

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
    /// The open database and how often it was reopened. `None` while a reopen failed
    /// (the next call tries again).
    db: RwLock<(Option<Database>, u64)>,
    path: PathBuf,
    events: broadcast::Sender<StoreEvent>,
    output_events: broadcast::Sender<String>,
    observers: Mutex<Vec<ChangeObserver>>,
}

/// Called on the writing thread with every change, after its transaction committed and
/// before the write returns (see [`Store::observe`]); returns false to stop observing. It
/// must not call the store.
pub type ChangeObserver = Box<dyn Fn(&StoreEvent) -> bool + Send + Sync>;

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<StoredObject, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn encode(obj: &StoredObject) -> Vec<u8> {
    // Plain data with string keys: serialising cannot fail.
    serde_json::to_vec(obj).unwrap_or_default()
}

/// Copies `from`'s status into `to` (same kind).
fn carry_status(to: &mut Resource, from: &Resource) {
    match (to, from) {
        (Resource::Network(t), Resource::Network(f)) => t.status.clone_from(&f.status),
        (Resource::NetworkFilter(t), Resource::NetworkFilter(f)) => t.status.clone_from(&f.status),
        (Resource::Image(t), Resource::Image(f)) => t.status.clone_from(&f.status),
        (Resource::VmPool(t), Resource::VmPool(f)) => t.status.clone_from(&f.status),
        (Resource::AgentRun(t), Resource::AgentRun(f)) => t.status.clone_from(&f.status),
        _ => {}
    }
}

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

impl Store {
    /// Runs `f` on the database. redb refuses every call after an I/O error (a full disk,
    /// say) until the file is reopened, so such a failure reopens the database (repairing
    /// it from its last commit); a call refused that way is retried once on the reopened
    /// handle, and a disk-full error becomes [`StoreError::DiskFull`]. Reads and writes
    /// therefore work again as soon as the cause is gone, without a controller restart.
    fn with_db<T>(
        &self,
        mut f: impl FnMut(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let (result, seen) = {
                let guard = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
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
                            path: self.inner.path.clone(),
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
        let mut guard = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if guard.1 != seen && guard.0.is_some() {
            return Ok(());
        }
        // The old handle must be closed first: redb locks the file.
        guard.0 = None;
        guard.1 += 1;
        let db = open_database(&self.inner.path)?;
        tracing::warn!(
            "object store {}: reopened after an I/O error",
            self.inner.path.display()
        );
        guard.0 = Some(db);
        Ok(())
    }

    /// Opens (creating if needed) the store at `path`, and its parent directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let open_err = |message: String| StoreError::Open {
            path: path.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| open_err(e.to_string()))?;
        }
        make_private(&path).map_err(|e| open_err(e.to_string()))?;
        let db = open_database(&path)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (output_events, _) = broadcast::channel(EVENT_CAPACITY);
        Ok(Store {
            inner: Arc::new(Inner {
                db: RwLock::new((Some(db), 0)),
                path,
                events,
                output_events,
                observers: Mutex::default(),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Change notifications from now on (see the module docs: hints, may lag).
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    /// The names of runs whose output grew, from now on (for `logs -f`).
    pub fn subscribe_output(&self) -> broadcast::Receiver<String> {
        self.inner.output_events.subscribe()
    }

    /// Calls `observer` with every change from now on, synchronously (unlike
    /// [`Store::subscribe`], it cannot lag): the object cache (`crate::cache`) uses it so that
    /// a write is visible in the cache once it returns.
    pub fn observe(&self, observer: ChangeObserver) {
        self.observers().push(observer);
    }

    fn observers(&self) -> std::sync::MutexGuard<'_, Vec<ChangeObserver>> {
        self.inner
            .observers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of observers (tests).
    #[cfg(test)]
    pub(crate) fn observer_count(&self) -> usize {
        self.observers().len()
    }

    fn emit(&self, key: &ObjectKey, change: Change) {
        let event = StoreEvent {
            kind: key.kind,
            name: key.name.clone(),
            change,
        };
        self.observers().retain(|observe| observe(&event));
        // No receivers is fine.
        let _ = self.inner.events.send(event);
    }

    /// Applies one object for `manager`, submitted by root (tests and tools; the API and
    /// the spec directory name their submitter in [`Store::apply_batch`]). See
    /// [`Store::apply_batch`] for the rules.
    pub fn apply(
        &self,
        resource: Resource,
        manager: Manager,
        options: ApplyOptions,
    ) -> Result<ApplyOutcome, StoreError> {
        let item = ApplyItem {
            resource,
            manager,
            submitter: Caller::root(),
            force: options.force,
        };
        self.apply_batch(vec![item], options.dry_run)?
            .pop()
            .unwrap_or_else(|| unreachable!("one result per item"))
    }

    /// Applies several objects in one transaction (one fsync); each gets its own result.
    ///
    /// Per object: it is validated; `status` and `generation` of the input are ignored;
    /// a new object gets generation 1; an existing one keeps its status and creation time,
    /// and its generation grows by one if the spec hash changed. The submitter is recorded;
    /// a different submitter counts as a change (`configured`), so an object always runs
    /// with the rights of whoever applied it last. An object managed by
    /// someone else is refused with [`StoreError::Conflict`] unless `force`. Applying an
    /// object whose deletion was requested cancels the deletion. When nothing changes,
    /// nothing is written. The outer error is a database failure (nothing applied).
    pub fn apply_batch(
        &self,
        items: Vec<ApplyItem>,
        dry_run: bool,
    ) -> Result<Vec<Result<ApplyOutcome, StoreError>>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let mut results = Vec::with_capacity(items.len());
            let mut changed = Vec::new();
            {
                let mut table = txn.open_table(OBJECTS)?;
                let now = Timestamp::now();
                // Images of this batch, for checking the pools of the same batch against.
                let images: std::collections::HashMap<String, agentvm_api::ImageSpec> = items
                    .iter()
                    .filter_map(|i| match &i.resource {
                        Resource::Image(img) => Some((img.metadata.name.clone(), img.spec.clone())),
                        _ => None,
                    })
                    .collect();
                for item in items.iter().cloned() {
                    let outcome = Self::apply_one(&mut table, item, &images, now)?;
                    if let Ok((outcome, key)) = &outcome {
                        if *outcome != ApplyOutcome::Unchanged {
                            changed.push(key.clone());
                        }
                    }
                    results.push(outcome.map(|(o, _)| o));
                }
            }
            if dry_run || changed.is_empty() {
                txn.abort()?;
            } else {
                txn.commit()?;
                for key in &changed {
                    self.emit(key, Change::Applied);
                }
            }
            Ok(results)
        })
    }

    /// The inner `Result` is the object's own outcome; the outer one a database failure.
    #[allow(clippy::type_complexity)]
    fn apply_one(
        table: &mut redb::Table<&str, &[u8]>,
        item: ApplyItem,
        batch_images: &std::collections::HashMap<String, agentvm_api::ImageSpec>,
        now: Timestamp,
    ) -> Result<Result<(ApplyOutcome, ObjectKey), StoreError>, StoreError> {
        let ApplyItem {
            mut resource,
            manager,
            submitter,
            force,
        } = item;
        resource.clear_status();
        resource.metadata_mut().generation = 0;
        let key = ObjectKey::new(resource.kind(), resource.name());
        if let Err(errors) = validate(&resource) {
            return Ok(Err(StoreError::Invalid { key, errors }));
        }
        // A pool's disk must hold its image: checked here when the image is known (in this
        // batch or stored); otherwise the pool reports it once the image appears.
        if let Resource::VmPool(pool) = &resource {
            let name = &pool.spec.template.image_ref;
            let image = match batch_images.get(name) {
                Some(spec) => Some(spec.clone()),
                None => {
                    let image_key = ObjectKey::new(Kind::Image, name).db_key();
                    match table.get(image_key.as_str())? {
                        Some(bytes) => match decode(&image_key, bytes.value())?.resource {
                            Resource::Image(img) => Some(img.spec),
                            _ => None,
                        },
                        None => None,
                    }
                }
            };
            if let Some(image) = image {
                if let Err(errors) = agentvm_api::validate_pool_disk(&pool.spec, name, &image) {
                    return Ok(Err(StoreError::Invalid { key, errors }));
                }
            }
        }
        let db_key = key.db_key();
        let existing = match table.get(db_key.as_str())? {
            Some(bytes) => Some(decode(&db_key, bytes.value())?),
            None => None,
        };
        let (record, outcome) = match existing {
            None => {
                resource.metadata_mut().generation = 1;
                let record = StoredObject {
                    resource,
                    manager,
                    submitter: Some(submitter),
                    created_at: now,
                    updated_at: now,
                    deletion_requested_at: None,
                    deletion_requested_by: None,
                };
                (record, ApplyOutcome::Created)
            }
            Some(old) => {
                if old.manager != manager && !force {
                    return Ok(Err(StoreError::Conflict {
                        key,
                        manager: old.manager,
                    }));
                }
                let spec_changed = spec_hash(&old.resource) != spec_hash(&resource);
                let old_meta = old.resource.metadata();
                resource.metadata_mut().generation =
                    old_meta.generation.max(1) + i64::from(spec_changed);
                let meta_changed = old_meta.labels != resource.metadata().labels
                    || old_meta.annotations != resource.metadata().annotations;
                let changed = spec_changed
                    || meta_changed
                    || old.manager != manager
                    || old.submitter.as_ref() != Some(&submitter)
                    || old.deletion_requested_at.is_some();
                if !changed {
                    return Ok(Ok((ApplyOutcome::Unchanged, key)));
                }
                carry_status(&mut resource, &old.resource);
                let record = StoredObject {
                    resource,
                    manager,
                    submitter: Some(submitter),
                    created_at: old.created_at,
                    updated_at: now,
                    deletion_requested_at: None,
                    deletion_requested_by: None,
                };
                (record, ApplyOutcome::Configured)
            }
        };
        table.insert(db_key.as_str(), encode(&record).as_slice())?;
        Ok(Ok((outcome, key)))
    }

    /// The object `kind`/`name`, if stored (also while its deletion is pending).
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<StoredObject>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let db_key = ObjectKey::new(kind, name).db_key();
            let got = table.get(db_key.as_str())?;
            got.map(|v| decode(&db_key, v.value())).transpose()
        })
    }

    /// Every object of `kind` (all kinds when `None`), sorted by kind (dependency order)
    /// then name.
    pub fn list(&self, kind: Option<Kind>) -> Result<Vec<StoredObject>, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let mut out = Vec::new();
            let mut push = |k: &str, v: &[u8]| -> Result<(), StoreError> {
                out.push(decode(k, v)?);
                Ok(())
            };
            match kind {
                Some(kind) => {
                    // `/` + 1 is `0`: the range holds exactly the keys `Kind/...`.
                    let (from, to) = (format!("{kind}/"), format!("{kind}0"));
                    for entry in table.range(from.as_str()..to.as_str())? {
                        let (k, v) = entry?;
                        push(k.value(), v.value())?;
                    }
                }
                None => {
                    for entry in table.iter()? {
                        let (k, v) = entry?;
                        push(k.value(), v.value())?;
                    }
                }
            }
            out.sort_by(|a, b| {
                (a.resource.kind(), a.resource.name()).cmp(&(b.resource.kind(), b.resource.name()))
            });
            Ok(out)
        })
    }

    /// Number of stored objects.
    pub fn len(&self) -> Result<u64, StoreError> {
        self.with_db(|db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(OBJECTS)?.len()?)
        })
    }

    /// True when no object is stored.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }

    /// Replaces the status of the `S::KIND` object `name` with `status`. Spec, metadata and
    /// generation are untouched. Returns whether anything changed (an identical status
    /// writes nothing and sends no event, so a reconciler may write its status on every
    /// pass).
    pub fn update_status<S: KindStatus>(&self, name: &str, status: S) -> Result<bool, StoreError> {
        let key = ObjectKey::new(S::KIND, name);
        // Most writes change nothing (a resync): find that out without a write transaction.
        match self.get(S::KIND, name)? {
            None => return Err(StoreError::NotFound(key)),
            Some(o) if S::of(&o.resource) == Some(&status) => return Ok(false),
            Some(_) => {}
        }
        let db_key = key.db_key();
        self.with_db(|db| {
            let txn = db.begin_write()?;
            let changed = {
                let mut table = txn.open_table(OBJECTS)?;
                let mut record = match table.get(db_key.as_str())? {
                    Some(v) => decode(&db_key, v.value())?,
                    None => return Err(StoreError::NotFound(key.clone())),
                };
                if S::of(&record.resource) == Some(&status) {
                    false
                } else {
                    if !status.clone().put(&mut record.resource) {
                        return Err(StoreError::BadStatus {
                            key: key.clone(),
                            message: format!(
                                "a {} status for a {}",
                                S::KIND,
                                record.resource.kind()
                            ),
                        });
                    }
                    record.updated_at = Timestamp::now();
                    table.insert(db_key.as_str(), encode(&record).as_slice())?;
                    true
                }
            };
            if changed {
                txn.commit()?;
                self.emit(&key, Change::StatusChanged);
            } else {
                txn.abort()?;
            }
            Ok(changed)
        })
    }

    /// [`Store::update_status`] from JSON in the shape of `kind`'s status (tests).
    #[cfg(test)]
    pub(crate) fn update_status_json(
        &self,
        kind: Kind,
        name: &str,
        status: serde_json::Value,
    ) -> Result<bool, StoreError> {
        fn typed<S: KindStatus>(
            store: &Store,
            name: &str,
            v: serde_json::Value,
        ) -> Result<bool, StoreError> {
            let status: S = serde_json::from_value(v).map_err(|e| StoreError::BadStatus {
                key: ObjectKey::new(S::KIND, name),
                message: e.to_string(),
            })?;
            store.update_status(name, status)
        }
        match kind {
            Kind::Network => typed::<agentvm_api::NetworkStatus>(self, name, status),
            Kind::NetworkFilter => typed::<agentvm_api::NetworkFilterStatus>(self, name, status),
            Kind::Image => typed::<agentvm_api::ImageStatus>(self, name, status),
            Kind::VmPool => typed::<agentvm_api::VmPoolStatus>(self, name, status),
            Kind::Sandbox => typed::<agentvm_api::SandboxStatus>(self, name, status),
            Kind::Snapshot => typed::<agentvm_api::SnapshotStatus>(self, name, status),
            Kind::AgentRun => typed::<agentvm_api::AgentRunStatus>(self, name, status),
        }
    }

    /// Marks `kind`/`name` for deletion. With `manager_check`, refuses with a conflict
    /// when another source manages the object. Returns false when there is no such
    /// object; true when it is (now or already) marked. The object stays until
    /// [`Store::finalize_delete`].
    pub fn request_delete(
        &self,
        kind: Kind,
        name: &str,
        manager_check: Option<&Manager>,
    ) -> Result<bool, StoreError> {
        self.request_delete_as(kind, name, manager_check, None)
    }

    /// [`Store::request_delete`], recording `by` as who asked.
    pub fn request_delete_as(
        &self,
        kind: Kind,
        name: &str,
        manager_check: Option<&Manager>,
        by: Option<&Caller>,
    ) -> Result<bool, StoreError> {
        let key = ObjectKey::new(kind, name);
        let db_key = key.db_key();
        self.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(OBJECTS)?;
                let mut record = match table.get(db_key.as_str())? {
                    Some(v) => decode(&db_key, v.value())?,
                    None => return Ok(false),
                };
                if let Some(expected) = manager_check {
                    if *expected != record.manager {
                        return Err(StoreError::Conflict {
                            key: key.clone(),
                            manager: record.manager,
                        });
                    }
                }
                if record.deletion_requested_at.is_some() {
                    return Ok(true);
                }
                let now = Timestamp::now();
                record.deletion_requested_at = Some(now);
                record.deletion_requested_by = by.cloned();
                record.updated_at = now;
                table.insert(db_key.as_str(), encode(&record).as_slice())?;
            }
            txn.commit()?;
            self.emit(&key, Change::DeleteRequested);
            Ok(true)
        })
    }

    /// Removes `kind`/`name` (and a run's output) if its deletion was requested. Returns
    /// true if it was removed; false if it is absent or not marked for deletion (an apply
    /// may have cancelled the deletion meanwhile: then the reconciler must reconcile it
    /// back to existence, which it does on its next pass).
    pub fn finalize_delete(&self, kind: Kind, name: &str) -> Result<bool, StoreError> {
        let key = ObjectKey::new(kind, name);
        let db_key = key.db_key();
        self.with_db(|db| {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(OBJECTS)?;
                let deleting = match table.get(db_key.as_str())? {
                    Some(v) => decode(&db_key, v.value())?.is_deleting(),
                    None => false,
                };
                if !deleting {
                    return Ok(false);
                }
                table.remove(db_key.as_str())?;
                if kind == Kind::AgentRun {
                    txn.open_table(OUTPUT_META)?.remove(name)?;
                    txn.open_table(OUTPUT)?
                        .retain_in((name, 0u64)..=(name, u64::MAX), |_, _| false)?;
                }
            }
            txn.commit()?;
            self.emit(&key, Change::Removed);
            Ok(true)
        })
    }

    /// Appends output of the AgentRun `run` to `stream`. At most `cap` bytes of each stream
    /// are kept (the run's `output.maxMib`; never more than [`MAX_OUTPUT_BYTES_PER_STREAM`]):
    /// bytes past it are dropped and counted, and the output is marked truncated. Returns how
    /// many bytes were kept. Flushed lazily (see the module docs).
    pub fn append_output(
        &self,
        run: &str,
        stream: OutputStream,
        bytes: &[u8],
        cap: u64,
    ) -> Result<usize, StoreError> {
        let key = ObjectKey::new(Kind::AgentRun, run);
        let db_key = key.db_key();
        self.with_db(|db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Eventual);
            let kept = {
                if txn.open_table(OBJECTS)?.get(db_key.as_str())?.is_none() {
                    return Err(StoreError::NotFound(key.clone()));
                }
                let mut meta_table = txn.open_table(OUTPUT_META)?;
                let mut meta: OutputMeta = match meta_table.get(run)? {
                    Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
                    None => OutputMeta::default(),
                };
                let cap = cap.min(MAX_OUTPUT_BYTES_PER_STREAM);
                let stream_len = match stream {
                    OutputStream::Stdout => &mut meta.stdout,
                    OutputStream::Stderr => &mut meta.stderr,
                };
                let room = cap.saturating_sub(*stream_len);
                let kept = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                *stream_len += kept as u64;
                if kept < bytes.len() {
                    meta.truncated = true;
                    meta.dropped += (bytes.len() - kept) as u64;
                }
                if kept > 0 {
                    let mut value = Vec::with_capacity(kept + 1);
                    value.push(stream.tag());
                    value.extend_from_slice(&bytes[..kept]);
                    txn.open_table(OUTPUT)?
                        .insert((run, meta.len), value.as_slice())?;
                    meta.len += kept as u64;
                }
                let meta_bytes = serde_json::to_vec(&meta).unwrap_or_default();
                meta_table.insert(run, meta_bytes.as_slice())?;
                kept
            };
            txn.commit()?;
            let _ = self.inner.output_events.send(run.to_string());
            Ok(kept)
        })
    }

    /// Reads the output of `run` from byte `offset` on (both streams, interleaved as
    /// appended), at most about `max_bytes` (whole chunks; at least one chunk when there is
    /// one). An offset inside a chunk returns the rest of that chunk first.
    pub fn read_output(
        &self,
        run: &str,
        offset: u64,
        max_bytes: usize,
    ) -> Result<OutputRead, StoreError> {
        let key = ObjectKey::new(Kind::AgentRun, run);
        self.with_db(|db| {
            let txn = db.begin_read()?;
            let meta: Option<OutputMeta> = txn
                .open_table(OUTPUT_META)?
                .get(run)?
                .map(|v| serde_json::from_slice(v.value()).unwrap_or_default());
            let Some(meta) = meta else {
                if txn
                    .open_table(OBJECTS)?
                    .get(key.db_key().as_str())?
                    .is_none()
                {
                    return Err(StoreError::NotFound(key.clone()));
                }
                return Ok(OutputRead::default());
            };
            let table = txn.open_table(OUTPUT)?;
            let mut read = OutputRead {
                chunks: Vec::new(),
                next_offset: offset.min(meta.len),
                total: meta.len,
                truncated: meta.truncated,
                dropped: meta.dropped,
            };
            let mut taken = 0usize;
            let push = |start: u64, value: &[u8], read: &mut OutputRead| -> usize {
                let Some((&tag, data)) = value.split_first() else {
                    return 0;
                };
                let end = start + data.len() as u64;
                if end <= read.next_offset {
                    return 0;
                }
                let skip = usize::try_from(read.next_offset.saturating_sub(start)).unwrap_or(0);
                let data = &data[skip..];
                read.next_offset = end;
                read.chunks.push(OutputChunk {
                    stream: OutputStream::from_tag(tag),
                    data: data.to_vec(),
                });
                data.len()
            };
            // The chunk that contains `offset`, then everything after it.
            if let Some(entry) = table.range((run, 0u64)..=(run, offset))?.next_back() {
                let (k, v) = entry?;
                taken += push(k.value().1, v.value(), &mut read);
            }
            if offset < u64::MAX {
                for entry in table.range((run, offset + 1)..=(run, u64::MAX))? {
                    if taken >= max_bytes && !read.chunks.is_empty() {
                        break;
                    }
                    let (k, v) = entry?;
                    taken += push(k.value().1, v.value(), &mut read);
                }
            }
            Ok(read)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::{AgentRun, AgentRunSpec, ImageStatus, SecretEnvVar};

    fn image(name: &str, suite: &str) -> Resource {
        let text = format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  suite: {suite}\n"
        );
        agentvm_api::parse_str(&text, "t.yaml").unwrap()[0]
            .resource
            .clone()
    }

    pub(super) fn run(name: &str) -> Resource {
        AgentRun::new(
            name,
            AgentRunSpec::command("sandbox", "echo", vec!["hi".into()]),
        )
        .into()
    }

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        (dir, store)
    }

    fn spec_dir(file: &str) -> Manager {
        Manager::SpecDir { file: file.into() }
    }

    pub(super) const API: ApplyOptions = ApplyOptions {
        force: false,
        dry_run: false,
    };

    #[test]
    fn the_store_file_is_readable_by_its_owner_only_even_one_made_before() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let (d, store) = temp_store();
        let path = d.path().join(STORE_FILE);
        store
            .apply(image("i", "bookworm"), spec_dir("a.yaml"), API)
            .unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(store);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert!(
            store.get(Kind::Image, "i").unwrap().is_some(),
            "the data is kept"
        );
    }

    #[test]
    fn generation_follows_spec_changes_only() {
        let (_d, store) = temp_store();
        let o = store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        assert_eq!(o, ApplyOutcome::Created);
        let got = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(got.generation(), 1);
        // Same object again: unchanged, nothing written.
        let o = store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        assert_eq!(o, ApplyOutcome::Unchanged);
        assert_eq!(store.get(Kind::Image, "base").unwrap().unwrap(), got);
        // A label: configured, generation unchanged.
        let mut labelled = image("base", "bookworm");
        labelled
            .metadata_mut()
            .labels
            .insert("team".into(), "a".into());
        let o = store.apply(labelled, Manager::Api, API).unwrap();
        assert_eq!(o, ApplyOutcome::Configured);
        assert_eq!(
            store
                .get(Kind::Image, "base")
                .unwrap()
                .unwrap()
                .generation(),
            1
        );
        // A spec change: generation 2; a generation in the input is ignored.
        let mut changed = image("base", "trixie");
        changed.metadata_mut().generation = 40;
        let o = store.apply(changed, Manager::Api, API).unwrap();
        assert_eq!(o, ApplyOutcome::Configured);
        let got = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(got.generation(), 2);
        assert!(got.resource.metadata().labels.is_empty());
        // Dry run reports, writes nothing.
        let o = store
            .apply(
                image("base", "bookworm"),
                Manager::Api,
                ApplyOptions {
                    dry_run: true,
                    ..API
                },
            )
            .unwrap();
        assert_eq!(o, ApplyOutcome::Configured);
        assert_eq!(
            store
                .get(Kind::Image, "base")
                .unwrap()
                .unwrap()
                .generation(),
            2
        );
    }

    #[test]
    fn status_is_kept_by_apply_and_does_not_bump_generation() {
        let (_d, store) = temp_store();
        store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        let status = ImageStatus {
            phase: agentvm_api::ImagePhase::Ready,
            observed_generation: Some(1),
            ..ImageStatus::default()
        };
        assert!(store.update_status("base", status.clone()).unwrap());
        assert!(!store.update_status("base", status).unwrap());
        // A status in the applied object is ignored; the stored one stays.
        let mut with_status = image("base", "trixie");
        if let Resource::Image(i) = &mut with_status {
            i.status = Some(ImageStatus::default());
        }
        store.apply(with_status, Manager::Api, API).unwrap();
        let got = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(got.generation(), 2);
        assert_eq!(got.status_json()["phase"], "Ready");
        assert_eq!(got.status_json()["observedGeneration"], 1);
        // A status of another kind's name is not found.
        let err = store
            .update_status("base", agentvm_api::VmPoolStatus::default())
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        let err = store
            .update_status("nope", ImageStatus::default())
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)));
        // A changed field is written.
        let mut st = ImageStatus::of(&got.resource).cloned().unwrap();
        st.digest = Some("abc".into());
        assert!(store.update_status("base", st).unwrap());
        let got = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(got.status_json()["digest"], "abc");
    }

    #[test]
    fn invalid_objects_are_refused() {
        let (_d, store) = temp_store();
        let mut bad = image("base", "bookworm");
        bad.metadata_mut().name = "Bad_Name".into();
        let err = store.apply(bad, Manager::Api, API).unwrap_err();
        assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("metadata.name"), "{err}");
        assert!(store.is_empty().unwrap());
    }

    #[test]
    fn the_last_submitter_is_recorded_and_a_new_one_is_a_change() {
        let (_d, store) = temp_store();
        let alice = Caller {
            uid: 1000,
            gid: 1000,
            groups: vec![998],
            user: Some("alice".into()),
        };
        let as_ = |who: &Caller| {
            store
                .apply_batch(
                    vec![ApplyItem {
                        resource: run("r"),
                        manager: Manager::Api,
                        submitter: who.clone(),
                        force: false,
                    }],
                    false,
                )
                .unwrap()
                .remove(0)
                .unwrap()
        };
        assert_eq!(as_(&Caller::root()), ApplyOutcome::Created);
        assert_eq!(as_(&Caller::root()), ApplyOutcome::Unchanged);
        // The same spec from someone else: it now runs with their rights.
        assert_eq!(as_(&alice), ApplyOutcome::Configured);
        let got = store.get(Kind::AgentRun, "r").unwrap().unwrap();
        assert_eq!(got.submitter.as_ref(), Some(&alice));
        assert_eq!(got.generation(), 1);
        assert_eq!(as_(&alice), ApplyOutcome::Unchanged);
        // Who asked for the deletion is kept too.
        assert!(store
            .request_delete_as(Kind::AgentRun, "r", Some(&Manager::Api), Some(&alice))
            .unwrap());
        let got = store.get(Kind::AgentRun, "r").unwrap().unwrap();
        assert_eq!(got.deletion_requested_by, Some(alice));
        // Records from before submitters were recorded still load.
        let mut old = serde_json::to_value(&got).unwrap();
        old.as_object_mut().unwrap().remove("submitter");
        let old: StoredObject = serde_json::from_value(old).unwrap();
        assert_eq!(old.submitter, None);
    }

    #[test]
    fn managers_conflict_unless_forced() {
        let (_d, store) = temp_store();
        store
            .apply(image("base", "bookworm"), spec_dir("a.yaml"), API)
            .unwrap();
        let err = store
            .apply(image("base", "trixie"), Manager::Api, API)
            .unwrap_err();
        match &err {
            StoreError::Conflict { manager, .. } => assert_eq!(*manager, spec_dir("a.yaml")),
            other => panic!("{other}"),
        }
        assert!(err.to_string().contains("spec-dir file a.yaml"), "{err}");
        // Another spec-dir file is another manager too.
        let err = store
            .apply(image("base", "bookworm"), spec_dir("b.yaml"), API)
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        // Deleting through the API is refused as well.
        let err = store
            .request_delete(Kind::Image, "base", Some(&Manager::Api))
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }));
        // Forced takeover: configured (the manager changed), generation unchanged.
        let o = store
            .apply(
                image("base", "bookworm"),
                Manager::Api,
                ApplyOptions { force: true, ..API },
            )
            .unwrap();
        assert_eq!(o, ApplyOutcome::Configured);
        let got = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(got.manager, Manager::Api);
        assert_eq!(got.generation(), 1);
    }

    #[test]
    fn deletion_is_two_phase() {
        let (_d, store) = temp_store();
        let mut events = store.subscribe();
        store.apply(run("r1"), Manager::Api, API).unwrap();
        store
            .append_output("r1", OutputStream::Stdout, b"hello", 1 << 20)
            .unwrap();
        assert!(!store.finalize_delete(Kind::AgentRun, "r1").unwrap());
        assert!(store
            .request_delete(Kind::AgentRun, "r1", Some(&Manager::Api))
            .unwrap());
        assert!(store.request_delete(Kind::AgentRun, "r1", None).unwrap());
        let got = store.get(Kind::AgentRun, "r1").unwrap().unwrap();
        assert!(got.is_deleting());
        assert_eq!(store.list(None).unwrap().len(), 1);
        assert!(store.finalize_delete(Kind::AgentRun, "r1").unwrap());
        assert!(store.get(Kind::AgentRun, "r1").unwrap().is_none());
        assert!(!store.request_delete(Kind::AgentRun, "r1", None).unwrap());
        // The output went with the run: a new run of that name starts empty.
        store.apply(run("r1"), Manager::Api, API).unwrap();
        assert_eq!(store.read_output("r1", 0, 1 << 20).unwrap().total, 0);
        let changes: Vec<Change> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.change)
            .collect();
        assert_eq!(
            changes,
            [
                Change::Applied,
                Change::DeleteRequested,
                Change::Removed,
                Change::Applied
            ]
        );
    }

    #[test]
    fn apply_cancels_a_pending_deletion() {
        let (_d, store) = temp_store();
        store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        store.request_delete(Kind::Image, "base", None).unwrap();
        let o = store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        assert_eq!(o, ApplyOutcome::Configured);
        assert!(!store
            .get(Kind::Image, "base")
            .unwrap()
            .unwrap()
            .is_deleting());
        // A reconciler that finished its cleanup meanwhile cannot remove it.
        assert!(!store.finalize_delete(Kind::Image, "base").unwrap());
        assert!(store.get(Kind::Image, "base").unwrap().is_some());
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join(STORE_FILE);
        {
            let store = Store::open(&path).unwrap();
            store
                .apply(image("base", "bookworm"), spec_dir("x.yaml"), API)
                .unwrap();
            store
                .update_status(
                    "base",
                    ImageStatus {
                        phase: agentvm_api::ImagePhase::Ready,
                        ..ImageStatus::default()
                    },
                )
                .unwrap();
            store.apply(run("r"), Manager::Api, API).unwrap();
            store
                .append_output("r", OutputStream::Stderr, b"err", 1 << 20)
                .unwrap();
            store.request_delete(Kind::AgentRun, "r", None).unwrap();
            // A second open of the same file fails clearly.
            let err = Store::open(&path).unwrap_err();
            assert!(err.to_string().contains("already open"), "{err}");
        }
        let store = Store::open(&path).unwrap();
        let img = store.get(Kind::Image, "base").unwrap().unwrap();
        assert_eq!(img.manager, spec_dir("x.yaml"));
        assert_eq!(img.status_json()["phase"], "Ready");
        let r = store.get(Kind::AgentRun, "r").unwrap().unwrap();
        assert!(r.is_deleting());
        let out = store.read_output("r", 0, 100).unwrap();
        assert_eq!(out.bytes(), b"err");
        assert_eq!(out.chunks[0].stream, OutputStream::Stderr);
    }

    #[test]
    fn list_is_sorted_and_filtered() {
        let (_d, store) = temp_store();
        for name in ["zeta", "alpha", "mid"] {
            store
                .apply(image(name, "bookworm"), Manager::Api, API)
                .unwrap();
            store.apply(run(name), Manager::Api, API).unwrap();
        }
        let names: Vec<String> = store
            .list(None)
            .unwrap()
            .iter()
            .map(|o| o.key().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "Image/alpha",
                "Image/mid",
                "Image/zeta",
                "AgentRun/alpha",
                "AgentRun/mid",
                "AgentRun/zeta"
            ]
        );
        assert_eq!(store.list(Some(Kind::AgentRun)).unwrap().len(), 3);
        assert!(store.list(Some(Kind::VmPool)).unwrap().is_empty());
    }

    #[test]
    fn output_appends_reads_and_caps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        assert!(matches!(
            store.append_output("ghost", OutputStream::Stdout, b"x", 6),
            Err(StoreError::NotFound(_))
        ));
        store.apply(run("r"), Manager::Api, API).unwrap();
        assert_eq!(
            store.read_output("r", 0, 100).unwrap(),
            OutputRead::default()
        );
        assert_eq!(
            store
                .append_output("r", OutputStream::Stdout, b"abcd", 6)
                .unwrap(),
            4
        );
        assert_eq!(
            store
                .append_output("r", OutputStream::Stderr, b"EF", 6)
                .unwrap(),
            2
        );
        let all = store.read_output("r", 0, 100).unwrap();
        assert_eq!(all.bytes(), b"abcdEF");
        assert_eq!(all.next_offset, 6);
        assert!(!all.truncated);
        // From inside the first chunk.
        let part = store.read_output("r", 2, 100).unwrap();
        assert_eq!(part.bytes(), b"cdEF");
        assert_eq!(part.chunks[1].stream, OutputStream::Stderr);
        // Nothing new at the end.
        let end = store.read_output("r", 6, 100).unwrap();
        assert!(end.chunks.is_empty());
        assert_eq!(end.next_offset, 6);
        // The cap (per stream) keeps the first bytes and counts and marks the rest.
        assert_eq!(
            store
                .append_output("r", OutputStream::Stdout, b"123456", 6)
                .unwrap(),
            2
        );
        assert_eq!(
            store
                .append_output("r", OutputStream::Stdout, b"7", 6)
                .unwrap(),
            0
        );
        let all = store.read_output("r", 0, 100).unwrap();
        assert_eq!(all.bytes(), b"abcdEF12");
        assert!(all.truncated);
        assert_eq!(all.dropped, 5);
        // stderr has its own room.
        assert_eq!(
            store
                .append_output("r", OutputStream::Stderr, b"GHIJKL", 6)
                .unwrap(),
            4
        );
        assert_eq!(store.read_output("r", 0, 100).unwrap().dropped, 7);
        // Bounded reads return whole chunks and resume.
        let first = store.read_output("r", 0, 1).unwrap();
        assert_eq!(first.bytes(), b"abcd");
        let next = store.read_output("r", first.next_offset, 1).unwrap();
        assert_eq!(next.bytes(), b"EF");
    }

    #[test]
    fn secrets_never_enter_the_store() {
        let (dir, store) = temp_store();
        std::env::set_var("AGENTVM_TEST_SECRET_VALUE", "s3cr3t-value-xyz");
        let secret_file = dir.path().join("token");
        std::fs::write(&secret_file, "file-secret-abc\n").unwrap();
        let mut spec = AgentRunSpec::command("sandbox", "true", vec![]);
        spec.secret_env = vec![
            SecretEnvVar {
                name: "TOKEN".into(),
                from_env: Some("AGENTVM_TEST_SECRET_VALUE".into()),
                from_file: None,
            },
            SecretEnvVar {
                name: "OTHER".into(),
                from_env: None,
                from_file: Some(secret_file),
            },
        ];
        store
            .apply(AgentRun::new("s", spec).into(), Manager::Api, API)
            .unwrap();
        drop(store);
        let bytes = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"AGENTVM_TEST_SECRET_VALUE"));
        assert!(!contains(b"s3cr3t-value-xyz"));
        assert!(!contains(b"file-secret-abc"));
    }

    #[test]
    fn concurrent_readers_see_whole_objects() {
        let (_d, store) = temp_store();
        store
            .apply(image("base", "bookworm"), Manager::Api, API)
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let obj = store.get(Kind::Image, "base").unwrap().unwrap();
                        // Generation and spec always belong together.
                        let suite = obj.resource.spec_json()["suite"].clone();
                        let g = obj.generation();
                        let want = if g % 2 == 1 { "bookworm" } else { "trixie" };
                        assert_eq!(suite, want, "generation {g}");
                        assert_eq!(store.list(None).unwrap().len(), 1);
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        for i in 0..50 {
            let suite = if i % 2 == 0 { "trixie" } else { "bookworm" };
            store
                .apply(image("base", suite), Manager::Api, API)
                .unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
        assert!(reads > 0);
        assert_eq!(
            store
                .get(Kind::Image, "base")
                .unwrap()
                .unwrap()
                .generation(),
            51
        );
    }

    #[test]
    fn batch_results_are_per_object() {
        let (_d, store) = temp_store();
        store
            .apply(image("taken", "bookworm"), spec_dir("a.yaml"), API)
            .unwrap();
        let items = vec![
            ApplyItem {
                resource: image("fresh", "bookworm"),
                manager: Manager::Api,
                submitter: crate::caller::Caller::root(),
                force: false,
            },
            ApplyItem {
                resource: image("taken", "bookworm"),
                manager: Manager::Api,
                submitter: crate::caller::Caller::root(),
                force: false,
            },
        ];
        let results = store.apply_batch(items, false).unwrap();
        assert_eq!(results[0].as_ref().unwrap(), &ApplyOutcome::Created);
        assert!(matches!(results[1], Err(StoreError::Conflict { .. })));
        assert!(store.get(Kind::Image, "fresh").unwrap().is_some());
    }

    #[test]
    fn a_pool_whose_disk_is_smaller_than_its_known_image_is_refused() {
        let (_d, store) = temp_store();
        let parse = |text: &str| {
            agentvm_api::parse_str(text, "t.yaml").unwrap()[0]
                .resource
                .clone()
        };
        let big_image = |name: &str| {
            parse(&format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\nspec: {{diskSizeMib: 4096}}\n"))
        };
        let pool = |name: &str, image: &str, disk: u32| {
            parse(&format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {name}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: {disk}}}\n"))
        };
        let item = |resource| ApplyItem {
            resource,
            manager: Manager::Api,
            submitter: Caller::root(),
            force: false,
        };
        // The image in the same batch.
        let results = store
            .apply_batch(
                vec![item(big_image("big")), item(pool("small", "big", 3))],
                false,
            )
            .unwrap();
        assert_eq!(results[0].as_ref().unwrap(), &ApplyOutcome::Created);
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("spec.template.resources.diskGib: 3 GiB is smaller than Image `big`'s disk (4096 MiB)")
                && err.contains("at least 4 GiB"),
            "{err}"
        );
        // The image already stored.
        let err = store
            .apply(pool("small", "big", 2), Manager::Api, API)
            .unwrap_err()
            .to_string();
        assert!(err.contains("diskGib: 2 GiB is smaller"), "{err}");
        assert_eq!(
            store
                .apply(pool("fits", "big", 4), Manager::Api, API)
                .unwrap(),
            ApplyOutcome::Created
        );
        // The image unknown: accepted (the pool reports it once the image appears).
        assert_eq!(
            store
                .apply(pool("later", "nope", 1), Manager::Api, API)
                .unwrap(),
            ApplyOutcome::Created
        );
        assert!(store.get(Kind::VmPool, "small").unwrap().is_none());
    }
}
#[cfg(test)]
mod memory {
    use super::*;

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    #[test]
    fn memory_stays_bounded_however_much_output_runs_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        let chunk = vec![b'a'; 1024 * 1024];
        let before = rss_kib();
        // 200 MiB of output over 20 runs (redb's default cache kept nearly all of it).
        for r in 0..20 {
            let name = format!("r{r}");
            store
                .apply(tests::run(&name), Manager::Api, tests::API)
                .unwrap();
            for _ in 0..10 {
                store
                    .append_output(&name, OutputStream::Stdout, &chunk, u64::MAX)
                    .unwrap();
            }
        }
        let grew = rss_kib().saturating_sub(before);
        assert!(
            grew < 100 * 1024,
            "RSS grew by {grew} KiB for 200 MiB of output (cache {STORE_CACHE_BYTES} bytes)"
        );
    }
}
