//! Objects: their records (manager, submitter, generation, deletion mark), apply with
//! generations and managers, status updates, two-phase deletion, listing and watch events.

use std::fmt;

use agentvm_api::{spec_hash, validate, ImageSpec, Kind, KindStatus, Resource};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::records::Write;
use crate::{Caller, Store, StoreError};
use agentvm_api::Timestamp;

/// How often a write is decided again after other writers changed its records meanwhile.
const CONFLICT_RETRIES: usize = 32;

/// What a decision does to one record.
enum Edit {
    /// Nothing (no write, no event).
    Keep,
    /// Store this record.
    Put(Box<StoredObject>),
    /// Remove the record.
    Remove,
}

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
        (Resource::Sandbox(t), Resource::Sandbox(f)) => t.status.clone_from(&f.status),
        (Resource::Snapshot(t), Resource::Snapshot(f)) => t.status.clone_from(&f.status),
        (Resource::AgentRun(t), Resource::AgentRun(f)) => t.status.clone_from(&f.status),
        // Different kinds: never under one key.
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
    /// a write is visible in the cache once it returns. In a cluster store, a change this
    /// process made is observed when the write returns and again when the cluster's watch
    /// delivers it; changes made by other nodes are observed when the watch delivers them.
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

    /// A change this process committed. In a cluster store subscribers hear of it from the
    /// cluster's watch, like every other node's changes (once, in the cluster's order).
    pub(crate) fn emit(&self, key: &ObjectKey, change: Change) {
        let event = StoreEvent {
            kind: key.kind,
            name: key.name.clone(),
            change,
        };
        self.observers().retain(|observe| observe(&event));
        if !self.inner.records.watched() {
            // No receivers is fine.
            let _ = self.inner.events.send(event);
        }
    }

    /// A change delivered by the cluster's watch.
    pub(crate) fn emit_watched(&self, event: StoreEvent) {
        self.observers().retain(|observe| observe(&event));
        let _ = self.inner.events.send(event);
    }

    /// The record under `db_key` and the version it was read at.
    fn read(&self, db_key: &str) -> Result<Option<(StoredObject, u64)>, StoreError> {
        self.inner
            .records
            .get(db_key)?
            .map(|v| Ok((decode(db_key, &v.bytes)?, v.version)))
            .transpose()
    }

    /// Read → decide → conditional write of the record of `key`. When another writer changed
    /// the record between the read and the write, `decide` runs again on the fresh record.
    fn modify<T>(
        &self,
        key: &ObjectKey,
        mut decide: impl FnMut(Option<StoredObject>) -> Result<(Edit, T), StoreError>,
    ) -> Result<T, StoreError> {
        let db_key = key.db_key();
        for _ in 0..CONFLICT_RETRIES {
            let current = self.read(&db_key)?;
            let expected = current.as_ref().map(|(_, version)| *version);
            let (edit, out) = decide(current.map(|(record, _)| record))?;
            let value = match edit {
                Edit::Keep => return Ok(out),
                Edit::Put(record) => Some(encode(&record)),
                Edit::Remove => None,
            };
            let write = Write {
                key: db_key.clone(),
                expected,
                value,
            };
            if self.inner.records.commit(&[write])? {
                return Ok(out);
            }
        }
        Err(StoreError::Contended(key.clone()))
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

    /// Applies several objects in one transaction (one fsync; in a cluster store, one etcd
    /// transaction per as many objects as it allows); each gets its own result.
    ///
    /// Per object: it is validated; `status` and `generation` of the input are ignored;
    /// a new object gets generation 1; an existing one keeps its status and creation time,
    /// and its generation grows by one if the spec hash changed. The submitter is recorded;
    /// a different submitter counts as a change (`configured`), so an object always runs
    /// with the rights of whoever applied it last. An object managed by
    /// someone else is refused with [`StoreError::Conflict`] unless `force`. Applying an
    /// object whose deletion was requested cancels the deletion. When nothing changes,
    /// nothing is written. The outer error is a store failure (nothing of the transaction
    /// that hit it applied).
    pub fn apply_batch(
        &self,
        items: Vec<ApplyItem>,
        dry_run: bool,
    ) -> Result<Vec<Result<ApplyOutcome, StoreError>>, StoreError> {
        // Images of this batch, for checking the pools of the same batch against.
        let images: std::collections::HashMap<String, ImageSpec> = items
            .iter()
            .filter_map(|i| match &i.resource {
                Resource::Image(img) => Some((img.metadata.name.clone(), img.spec.clone())),
                _ => None,
            })
            .collect();
        let mut results = Vec::with_capacity(items.len());
        for chunk in items.chunks(self.inner.records.max_writes().max(1)) {
            results.extend(self.apply_chunk(chunk, &images, dry_run)?);
        }
        Ok(results)
    }

    /// [`Store::apply_batch`] of objects that fit one transaction.
    fn apply_chunk(
        &self,
        items: &[ApplyItem],
        batch_images: &std::collections::HashMap<String, ImageSpec>,
        dry_run: bool,
    ) -> Result<Vec<Result<ApplyOutcome, StoreError>>, StoreError> {
        let stored_image = |name: &str| -> Result<Option<ImageSpec>, StoreError> {
            Ok(
                match self.read(&ObjectKey::new(Kind::Image, name).db_key())? {
                    Some((
                        StoredObject {
                            resource: Resource::Image(img),
                            ..
                        },
                        _,
                    )) => Some(img.spec),
                    _ => None,
                },
            )
        };
        for _ in 0..CONFLICT_RETRIES {
            let now = Timestamp::now();
            let mut results = Vec::with_capacity(items.len());
            let mut writes = Vec::new();
            let mut changed = Vec::new();
            for item in items.iter().cloned() {
                let key = ObjectKey::new(item.resource.kind(), item.resource.name());
                let db_key = key.db_key();
                let current = self.read(&db_key)?;
                let expected = current.as_ref().map(|(_, version)| *version);
                let decided = decide_apply(
                    current.map(|(record, _)| record),
                    item,
                    batch_images,
                    &stored_image,
                    now,
                )?;
                results.push(decided.map(|(outcome, record)| {
                    if let Some(record) = record {
                        writes.push(Write {
                            key: db_key,
                            expected,
                            value: Some(encode(&record)),
                        });
                        changed.push(key);
                    }
                    outcome
                }));
            }
            if dry_run || writes.is_empty() {
                return Ok(results);
            }
            if self.inner.records.commit(&writes)? {
                for key in &changed {
                    self.emit(key, Change::Applied);
                }
                return Ok(results);
            }
        }
        let key = items
            .first()
            .map(|i| ObjectKey::new(i.resource.kind(), i.resource.name()))
            .unwrap_or_else(|| ObjectKey::new(Kind::Network, ""));
        Err(StoreError::Contended(key))
    }

    /// The object `kind`/`name`, if stored (also while its deletion is pending).
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<StoredObject>, StoreError> {
        Ok(self
            .read(&ObjectKey::new(kind, name).db_key())?
            .map(|(record, _)| record))
    }

    /// Every object of `kind` (all kinds when `None`), sorted by kind (dependency order)
    /// then name.
    pub fn list(&self, kind: Option<Kind>) -> Result<Vec<StoredObject>, StoreError> {
        let prefix = kind.map(|k| format!("{k}/")).unwrap_or_default();
        let mut out = self
            .inner
            .records
            .list(&prefix)?
            .into_iter()
            .map(|(key, v)| decode(&key, &v.bytes))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| {
            (a.resource.kind(), a.resource.name()).cmp(&(b.resource.kind(), b.resource.name()))
        });
        Ok(out)
    }

    /// Number of stored objects.
    pub fn len(&self) -> Result<u64, StoreError> {
        self.inner.records.count()
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
        let changed = self.modify(&key, |record| {
            let Some(mut record) = record else {
                return Err(StoreError::NotFound(key.clone()));
            };
            if S::of(&record.resource) == Some(&status) {
                return Ok((Edit::Keep, false));
            }
            if !status.clone().put(&mut record.resource) {
                return Err(StoreError::BadStatus {
                    key: key.clone(),
                    message: format!("a {} status for a {}", S::KIND, record.resource.kind()),
                });
            }
            record.updated_at = Timestamp::now();
            Ok((Edit::Put(Box::new(record)), true))
        })?;
        if changed {
            self.emit(&key, Change::StatusChanged);
        }
        Ok(changed)
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
        let (marked, now_marked) = self.modify(&key, |record| {
            let Some(mut record) = record else {
                return Ok((Edit::Keep, (false, false)));
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
                return Ok((Edit::Keep, (true, false)));
            }
            let now = Timestamp::now();
            record.deletion_requested_at = Some(now);
            record.deletion_requested_by = by.cloned();
            record.updated_at = now;
            Ok((Edit::Put(Box::new(record)), (true, true)))
        })?;
        if now_marked {
            self.emit(&key, Change::DeleteRequested);
        }
        Ok(marked)
    }

    /// Removes `kind`/`name` (and a run's output) if its deletion was requested. Returns
    /// true if it was removed; false if it is absent or not marked for deletion (an apply
    /// may have cancelled the deletion meanwhile: then the reconciler must reconcile it
    /// back to existence, which it does on its next pass).
    pub fn finalize_delete(&self, kind: Kind, name: &str) -> Result<bool, StoreError> {
        let key = ObjectKey::new(kind, name);
        let removed = self.modify(&key, |record| {
            Ok(match record {
                Some(record) if record.is_deleting() => (Edit::Remove, true),
                _ => (Edit::Keep, false),
            })
        })?;
        if removed {
            if kind == Kind::AgentRun {
                // After the record: a crash in between leaves output of a run that no
                // longer exists, which `prune_output` removes when the store is opened.
                self.remove_output(name)?;
            }
            self.emit(&key, Change::Removed);
        }
        Ok(removed)
    }
}

/// What applying `item` does to its stored record `existing`: the outcome and the record
/// to write (`None`: nothing changes). The inner `Result` is the object's own outcome; the
/// outer one a store failure.
#[allow(clippy::type_complexity)]
fn decide_apply(
    existing: Option<StoredObject>,
    item: ApplyItem,
    batch_images: &std::collections::HashMap<String, ImageSpec>,
    stored_image: &dyn Fn(&str) -> Result<Option<ImageSpec>, StoreError>,
    now: Timestamp,
) -> Result<Result<(ApplyOutcome, Option<StoredObject>), StoreError>, StoreError> {
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
            None => stored_image(name)?,
        };
        if let Some(image) = image {
            if let Err(errors) = agentvm_api::validate_pool_disk(&pool.spec, name, &image) {
                return Ok(Err(StoreError::Invalid { key, errors }));
            }
        }
    }
    let Some(old) = existing else {
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
        return Ok(Ok((ApplyOutcome::Created, Some(record))));
    };
    if old.manager != manager && !force {
        return Ok(Err(StoreError::Conflict {
            key,
            manager: old.manager,
        }));
    }
    let spec_changed = spec_hash(&old.resource) != spec_hash(&resource);
    let old_meta = old.resource.metadata();
    resource.metadata_mut().generation = old_meta.generation.max(1) + i64::from(spec_changed);
    let meta_changed = old_meta.labels != resource.metadata().labels
        || old_meta.annotations != resource.metadata().annotations;
    let changed = spec_changed
        || meta_changed
        || old.manager != manager
        || old.submitter.as_ref() != Some(&submitter)
        || old.deletion_requested_at.is_some();
    if !changed {
        return Ok(Ok((ApplyOutcome::Unchanged, None)));
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
    Ok(Ok((ApplyOutcome::Configured, Some(record))))
}
