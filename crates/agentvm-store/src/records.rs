//! Where object records live: the [`RecordStore`] trait and its embedded implementation.
//!
//! The store's rules (generations, managers, finalizers, status) are written once, in
//! `objects.rs`, as read → decide → conditional write: a write names the version of each
//! record it was decided on and is refused when another writer changed one meanwhile, and
//! the decision is then made again on fresh records. Two implementations hold the records:
//! - [`LocalRecords`], the `objects` table of the redb file (one host; the default);
//! - `crate::etcd::EtcdRecords`, a key prefix in an etcd v3 cluster (several hosts), whose
//!   transactions compare each key's `mod_revision`.
//!
//! Run output is never a record: it stays in the local redb file of the node that ran the
//! run (`output.rs`).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use redb::{ReadableTable, ReadableTableMetadata};

use crate::db::LocalDb;
use crate::{StoreError, OBJECTS};

/// A record's bytes and the version they were read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Versioned {
    /// The record (JSON of a `StoredObject`).
    pub bytes: Vec<u8>,
    /// Changes whenever the record is written. Only compared for equality, and only by the
    /// implementation that produced it.
    pub version: u64,
}

/// One conditional write of [`RecordStore::commit`].
#[derive(Debug, Clone)]
pub(crate) struct Write {
    /// The record's key (`Kind/name`).
    pub key: String,
    /// The version the decision was made on; `None`: the record must be absent.
    pub expected: Option<u64>,
    /// The new record; `None` removes it.
    pub value: Option<Vec<u8>>,
}

/// Storage of object records with conditional writes.
pub(crate) trait RecordStore: Send + Sync {
    /// The record under `key`.
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Every record whose key starts with `prefix` (all of them for `""`), in key order.
    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;

    /// Number of records.
    fn count(&self) -> Result<u64, StoreError>;

    /// Makes every write, atomically, if each record is still at its expected version;
    /// otherwise writes nothing and returns false.
    fn commit(&self, writes: &[Write]) -> Result<bool, StoreError>;

    /// Most writes one [`RecordStore::commit`] may hold (etcd limits a transaction's
    /// operations).
    fn max_writes(&self) -> usize {
        usize::MAX
    }

    /// True when every change, this process's own too, is delivered to subscribers by the
    /// record store's watch (so the store must not also send its own).
    fn watched(&self) -> bool {
        false
    }
}

/// The version of a locally stored record: a hash of its bytes. A write transaction of the
/// one process that has the file open compares it with the bytes it finds, so a record
/// changed since it was read is seen as changed (a change back to identical bytes is no
/// change to decide differently on).
pub(crate) fn content_version(bytes: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Records in the `objects` table of the local redb file.
pub(crate) struct LocalRecords {
    pub(crate) db: Arc<LocalDb>,
}

impl RecordStore for LocalRecords {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.db.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let got = table.get(key)?;
            Ok(got.map(|v| versioned(v.value())))
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.db.with_db(|db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OBJECTS)?;
            let mut out = Vec::new();
            for entry in table.range(prefix..)? {
                let (k, v) = entry?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_string(), versioned(v.value())));
            }
            Ok(out)
        })
    }

    fn count(&self) -> Result<u64, StoreError> {
        self.db.with_db(|db| {
            let txn = db.begin_read()?;
            Ok(txn.open_table(OBJECTS)?.len()?)
        })
    }

    fn commit(&self, writes: &[Write]) -> Result<bool, StoreError> {
        self.db.with_db(|db| {
            let txn = db.begin_write()?;
            let unchanged = {
                let table = txn.open_table(OBJECTS)?;
                let mut unchanged = true;
                for w in writes {
                    let current = table
                        .get(w.key.as_str())?
                        .map(|v| content_version(v.value()));
                    unchanged &= current == w.expected;
                }
                unchanged
            };
            if !unchanged {
                txn.abort()?;
                return Ok(false);
            }
            {
                let mut table = txn.open_table(OBJECTS)?;
                for w in writes {
                    match &w.value {
                        Some(bytes) => {
                            table.insert(w.key.as_str(), bytes.as_slice())?;
                        }
                        None => {
                            table.remove(w.key.as_str())?;
                        }
                    }
                }
            }
            txn.commit()?;
            Ok(true)
        })
    }
}

fn versioned(bytes: &[u8]) -> Versioned {
    Versioned {
        bytes: bytes.to_vec(),
        version: content_version(bytes),
    }
}
