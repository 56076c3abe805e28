//! Objects: their records (manager, submitter, generation, deletion mark), apply with
//! generations and managers, status updates, two-phase deletion, listing and watch events.

use std::fmt;

use agentvm_api::{spec_hash, validate, Kind, KindStatus, Resource};
use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::{Caller, Store, StoreError, OBJECTS, OUTPUT, OUTPUT_META};
use agentvm_api::Timestamp;

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

    pub(crate) fn db_key(&self) -> String {
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

pub(crate) fn decode(key: &str, bytes: &[u8]) -> Result<StoredObject, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

pub(crate) fn encode(obj: &StoredObject) -> Vec<u8> {
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

impl Store {
    /// Change notifications from now on (see the module docs: hints, may lag).
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    /// Calls `observer` with every change from now on, synchronously (unlike
    /// [`Store::subscribe`], it cannot lag): the controller's object cache uses it so that
    /// a write is visible in the cache once it returns.
    pub fn observe(&self, observer: crate::ChangeObserver) {
        self.observers().push(observer);
    }

    fn observers(&self) -> std::sync::MutexGuard<'_, Vec<crate::ChangeObserver>> {
        self.inner
            .observers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of observers (the cache's tests check that a dropped cache stops observing).
    pub fn observer_count(&self) -> usize {
        self.observers().len()
    }

    pub(crate) fn emit(&self, key: &ObjectKey, change: Change) {
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

    /// [`Store::update_status`] from JSON in the shape of `kind`'s status: for tests (here
    /// and, with the `test-support` feature, in the crates that use the store).
    #[cfg(any(test, feature = "test-support"))]
    pub fn update_status_json(
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
}
