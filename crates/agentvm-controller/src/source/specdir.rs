//! `SpecDir`: the watched spec directory (a git checkout, Flux-style) as a source of desired
//! objects: every `.yaml`/`.yml` file applied with `Manager::SpecDir { file }`, objects a file
//! no longer declares pruned, invalid files reported and left alone.
//!
//! Every pass re-reads the whole directory ([`SpecDir::sync`]); the watcher only decides
//! *when* (debounced file events, plus a periodic pass in case an event was lost). That
//! makes editors' atomic renames, half-written files and `git checkout`s of many files
//! simple: whatever the directory holds when the events settle is what is applied.
//!
//! # Guarantees
//! - An invalid file (unreadable, bad YAML, invalid object) is reported with
//!   `file:line:column: field: message` and changes nothing: the objects it declared at its
//!   last good state stay as they are (not pruned, not changed). Every other file still
//!   syncs.
//! - Deleting a file (or a document from it) requests the deletion of the objects it
//!   declared. If the directory itself cannot be listed, nothing is pruned.
//! - The spec dir never overwrites or deletes an object managed by the API; that is
//!   reported as a conflict on the declaring file. An object moved from one file to
//!   another is taken over by the new file, not deleted and recreated.
//! - A kind/name declared by two files is applied from the first (path order) and
//!   reported on the others.
//! - Every object is submitted by the directory's owner (read at every pass): a run from
//!   the spec directory reads its host inputs with the owner's rights, so whoever may
//!   write into the directory acts with its owner's rights — keep it writable by its owner
//!   only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentvm_api::{parse_file, ParsedResource};
use notify::{EventKind, RecursiveMode, Watcher};

use agentvm_api::time::Timestamp;
use agentvm_client::{SpecDirReport, SpecDirState};
use agentvm_store::caller::Caller;
use agentvm_store::{ApplyItem, ApplyOutcome, Manager, ObjectKey, Store, StoreError};

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncSummary {
    /// Objects applied, with their outcome.
    pub applied: Vec<(ObjectKey, ApplyOutcome)>,
    /// Objects whose deletion was requested.
    pub pruned: Vec<ObjectKey>,
    /// Files with problems.
    pub reports: Vec<SpecDirReport>,
}

/// A failure of the spec-dir source as a whole.
#[derive(Debug, thiserror::Error)]
pub enum SpecDirError {
    /// The directory is missing or not a directory.
    #[error("spec directory {path}: {message}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file watcher could not be set up.
    #[error("watching {path}: {source}")]
    Watch {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: notify::Error,
    },
}

/// The spec-directory source; cheap to clone.
#[derive(Debug, Clone)]
pub struct SpecDir {
    dir: PathBuf,
    store: Store,
    state: Arc<RwLock<SpecDirState>>,
}

/// Timing of [`SpecDir::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Quiet time after the last file event before a pass (default 200 ms).
    pub debounce: Duration,
    /// Longest delay of a pass while events keep coming (default 2 s).
    pub max_delay: Duration,
    /// A pass this often even without events (default 60 s).
    pub resync: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            resync: Duration::from_secs(60),
        }
    }
}

fn is_manifest_event_path(path: &Path) -> bool {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else {
        return true;
    };
    if name.starts_with('.') {
        return false;
    }
    match path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
    {
        Some(ext) => ext == "yaml" || ext == "yml",
        // Directories (created, renamed, removed with files inside).
        None => true,
    }
}

fn is_relevant(event: &notify::Result<notify::Event>) -> bool {
    match event {
        Err(_) => true,
        Ok(e) if e.need_rescan() => true,
        Ok(e) if matches!(e.kind, EventKind::Access(_)) => false,
        Ok(e) => e.paths.is_empty() || e.paths.iter().any(|p| is_manifest_event_path(p)),
    }
}

impl SpecDir {
    /// The source for `dir` (which must exist) writing into `store`.
    pub fn new(dir: impl AsRef<Path>, store: Store) -> Result<Self, SpecDirError> {
        let dir = dir.as_ref();
        let canonical = std::fs::canonicalize(dir).map_err(|e| SpecDirError::Dir {
            path: dir.to_path_buf(),
            message: format!("{e}; create it or pass another --spec-dir"),
        })?;
        if !canonical.is_dir() {
            return Err(SpecDirError::Dir {
                path: dir.to_path_buf(),
                message: "is not a directory".into(),
            });
        }
        let state = SpecDirState {
            dir: canonical.clone(),
            ..SpecDirState::default()
        };
        Ok(Self {
            dir: canonical,
            store,
            state: Arc::new(RwLock::new(state)),
        })
    }

    /// The watched directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A snapshot of what the last pass saw.
    pub fn state(&self) -> SpecDirState {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A shared view of the state, updated after every pass.
    pub fn state_handle(&self) -> Arc<RwLock<SpecDirState>> {
        self.state.clone()
    }

    fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.dir).unwrap_or(path);
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/")
    }

    /// One full pass: read every manifest file, apply, prune. Blocking (file reads and one
    /// store transaction); call it from `spawn_blocking` in async code.
    pub fn sync(&self) -> Result<SyncSummary, SpecDirError> {
        let paths = match agentvm_api::manifest_files(&self.dir, true) {
            Ok(p) => p,
            Err(e) => {
                let message = format!("cannot list {}: {e}", self.dir.display());
                self.state.write().unwrap_or_else(|e| e.into_inner()).error = Some(message.clone());
                return Err(SpecDirError::Dir {
                    path: self.dir.clone(),
                    message: format!("{e}"),
                });
            }
        };
        let owner = match Caller::owner_of(&self.dir) {
            Ok(o) => o,
            Err(e) => {
                let message = format!("cannot find the owner of {}: {e}", self.dir.display());
                self.state.write().unwrap_or_else(|e| e.into_inner()).error = Some(message.clone());
                return Err(SpecDirError::Dir {
                    path: self.dir.clone(),
                    message,
                });
            }
        };
        let mut reports: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut valid: BTreeMap<String, Vec<ParsedResource>> = BTreeMap::new();
        let mut invalid: BTreeSet<String> = BTreeSet::new();
        for path in &paths {
            let rel = self.relative(path);
            match parse_file(path) {
                Ok(mut objects) => {
                    objects
                        .iter_mut()
                        .for_each(ParsedResource::resolve_host_paths);
                    valid.insert(rel, objects);
                }
                Err(errors) => {
                    let lines = errors
                        .into_iter()
                        .map(|mut e| {
                            e.file = rel.clone();
                            e.to_string()
                        })
                        .collect();
                    reports.insert(rel.clone(), lines);
                    invalid.insert(rel);
                }
            }
        }

        // Which file declares what; the first file (path order) wins a duplicate.
        let mut declared: BTreeMap<ObjectKey, (String, usize)> = BTreeMap::new();
        let mut items = Vec::new();
        let mut item_origin = Vec::new();
        let current: BTreeMap<ObjectKey, (Manager, bool)> = self
            .store
            .list(None)?
            .into_iter()
            .map(|o| (o.key(), (o.manager.clone(), o.is_deleting())))
            .collect();
        for (file, objects) in &valid {
            for parsed in objects {
                let key = ObjectKey::new(parsed.resource.kind(), parsed.resource.name());
                let here = format!("{file}:{}", parsed.source.line);
                if let Some((first, line)) = declared.get(&key) {
                    reports.entry(file.clone()).or_default().push(format!(
                        "{here}: metadata.name: {key} is already declared at {first}:{line}; names must be unique per kind, remove one of them"
                    ));
                    continue;
                }
                declared.insert(key.clone(), (file.clone(), parsed.source.line));
                // Moving an object between files is a takeover, unless the old file is
                // invalid (it may still declare it: keep its last good state).
                let force = matches!(
                    current.get(&key),
                    Some((Manager::SpecDir { file: other }, _)) if other != file && !invalid.contains(other)
                );
                items.push(ApplyItem {
                    resource: parsed.resource.clone(),
                    manager: Manager::SpecDir { file: file.clone() },
                    submitter: owner.clone(),
                    force,
                });
                item_origin.push((key, here));
            }
        }
        let results = self.store.apply_batch(items, false)?;
        let mut summary = SyncSummary::default();
        for ((key, here), result) in item_origin.into_iter().zip(results) {
            match result {
                Ok(outcome) => summary.applied.push((key, outcome)),
                Err(e) => {
                    let file = here.split(':').next().unwrap_or_default().to_string();
                    reports
                        .entry(file)
                        .or_default()
                        .push(format!("{here}: {e}"));
                }
            }
        }

        // Prune what a readable, valid file (or a removed one) no longer declares.
        for (key, (manager, deleting)) in &current {
            let Manager::SpecDir { file } = manager else {
                continue;
            };
            if *deleting || invalid.contains(file) || declared.contains_key(key) {
                continue;
            }
            match self
                .store
                .request_delete_as(key.kind, &key.name, Some(manager), Some(&owner))
            {
                Ok(true) => summary.pruned.push(key.clone()),
                Ok(false) => {}
                // Taken over by someone else meanwhile: not ours to prune any more.
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }

        summary.reports = reports
            .into_iter()
            .map(|(file, errors)| SpecDirReport { file, errors })
            .collect();
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.reports != summary.reports {
            for report in &summary.reports {
                if !state.reports.contains(report) {
                    for e in &report.errors {
                        tracing::warn!("spec dir: {e}");
                    }
                }
            }
            for old in &state.reports {
                let still_there = paths.iter().any(|p| self.relative(p) == old.file);
                if still_there && !summary.reports.iter().any(|r| r.file == old.file) {
                    tracing::info!("spec dir: {} is valid again", old.file);
                }
            }
        }
        *state = SpecDirState {
            dir: self.dir.clone(),
            last_sync: Some(Timestamp::now()),
            files: paths.len(),
            objects: declared.len(),
            reports: summary.reports.clone(),
            error: None,
        };
        drop(state);
        for (key, outcome) in &summary.applied {
            if *outcome != ApplyOutcome::Unchanged {
                tracing::info!("spec dir: {key} {outcome}");
            }
        }
        for key in &summary.pruned {
            tracing::info!("spec dir: {key} no longer declared; deletion requested");
        }
        Ok(summary)
    }

    async fn sync_blocking(&self) {
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.sync()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("spec dir sync failed: {e}"),
            Err(e) => tracing::error!("spec dir sync panicked: {e}"),
        }
    }

    /// Syncs once, then again whenever manifest files change (debounced) and every
    /// `options.resync`, until `shutdown` resolves.
    pub async fn run(
        self,
        options: WatchOptions,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), SpecDirError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })
        .map_err(|source| SpecDirError::Watch {
            path: self.dir.clone(),
            source,
        })?;
        watcher
            .watch(&self.dir, RecursiveMode::Recursive)
            .map_err(|source| SpecDirError::Watch {
                path: self.dir.clone(),
                source,
            })?;
        self.sync_blocking().await;
        let mut resync = tokio::time::interval(options.resync);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = resync.tick() => self.sync_blocking().await,
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    if let Err(e) = &event {
                        tracing::warn!("spec dir watcher: {e}");
                    }
                    if !is_relevant(&event) {
                        continue;
                    }
                    // Debounce: wait for a quiet period, at most `max_delay` in all.
                    let deadline = tokio::time::Instant::now() + options.max_delay;
                    loop {
                        let quiet = tokio::time::sleep(options.debounce);
                        tokio::select! {
                            _ = quiet => break,
                            _ = tokio::time::sleep_until(deadline) => break,
                            more = rx.recv() => if more.is_none() { break },
                        }
                    }
                    self.sync_blocking().await;
                }
            }
        }
        drop(watcher);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::Kind;
    use agentvm_store::{ApplyOptions, STORE_FILE};

    fn image_doc(name: &str, suite: &str) -> String {
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  suite: {suite}\n")
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: PathBuf,
        store: Store,
        source: SpecDir,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("specs");
        std::fs::create_dir(&dir).unwrap();
        let store = Store::open(tmp.path().join(STORE_FILE)).unwrap();
        let source = SpecDir::new(&dir, store.clone()).unwrap();
        Fixture {
            _tmp: tmp,
            dir,
            store,
            source,
        }
    }

    impl Fixture {
        fn write(&self, rel: &str, text: &str) {
            let path = self.dir.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }

        fn object(&self, name: &str) -> Option<agentvm_store::StoredObject> {
            self.store.get(Kind::Image, name).unwrap()
        }
    }

    #[test]
    fn create_edit_invalid_fix_delete() {
        let f = fixture();
        f.write(
            "base.yaml",
            &format!(
                "{}---\n{}",
                image_doc("a", "bookworm"),
                image_doc("b", "bookworm")
            ),
        );
        f.write("nested/deep/c.yml", &image_doc("c", "bookworm"));
        f.write("notes.txt", "not a manifest");
        let s = f.source.sync().unwrap();
        assert_eq!(s.applied.len(), 3);
        assert!(s.reports.is_empty());
        assert_eq!(
            f.object("c").unwrap().manager,
            Manager::SpecDir {
                file: "nested/deep/c.yml".into()
            }
        );
        // Submitted by the directory's owner.
        let owner = Caller::owner_of(f.source.dir()).unwrap();
        assert_eq!(f.object("c").unwrap().submitter, Some(owner));
        // Unchanged files: nothing written.
        let s = f.source.sync().unwrap();
        assert!(s.applied.iter().all(|(_, o)| *o == ApplyOutcome::Unchanged));

        // Edit: configured, generation 2.
        f.write(
            "base.yaml",
            &format!(
                "{}---\n{}",
                image_doc("a", "trixie"),
                image_doc("b", "bookworm")
            ),
        );
        f.source.sync().unwrap();
        assert_eq!(f.object("a").unwrap().generation(), 2);

        // Invalid edit: reported with position and field; objects keep their last good state.
        f.write(
            "base.yaml",
            "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: a\nspec:\n  suite: sid\n  diskSizeMb: 10\n",
        );
        let s = f.source.sync().unwrap();
        assert_eq!(s.reports.len(), 1);
        assert_eq!(s.reports[0].file, "base.yaml");
        assert!(
            s.reports[0].errors[0].starts_with("base.yaml:7:3: spec.diskSizeMb"),
            "{:?}",
            s.reports
        );
        assert!(s.pruned.is_empty());
        assert!(!f.object("b").unwrap().is_deleting());
        assert_eq!(
            f.object("a").unwrap().resource.spec_json()["suite"],
            "trixie"
        );
        assert_eq!(f.source.state().reports, s.reports);
        // The other file still syncs.
        f.write("nested/deep/c.yml", &image_doc("c", "trixie"));
        f.source.sync().unwrap();
        assert_eq!(f.object("c").unwrap().generation(), 2);

        // Fixed, with `b` gone from it: `b` is pruned, the report cleared.
        f.write("base.yaml", &image_doc("a", "trixie"));
        let s = f.source.sync().unwrap();
        assert!(s.reports.is_empty());
        assert_eq!(s.pruned, [ObjectKey::new(Kind::Image, "b")]);
        assert!(f.object("b").unwrap().is_deleting());

        // File deleted: its objects are pruned.
        std::fs::remove_dir_all(f.dir.join("nested")).unwrap();
        let s = f.source.sync().unwrap();
        assert_eq!(s.pruned, [ObjectKey::new(Kind::Image, "c")]);
        assert!(!f.object("a").unwrap().is_deleting());
    }

    #[test]
    fn conflicts_duplicates_and_moves() {
        let f = fixture();
        f.store
            .apply(
                agentvm_api::parse_str(&image_doc("mine", "bookworm"), "x")
                    .unwrap()
                    .remove(0)
                    .resource,
                Manager::Api,
                ApplyOptions::default(),
            )
            .unwrap();
        f.write("a.yaml", &image_doc("mine", "trixie"));
        f.write("b.yaml", &image_doc("dup", "bookworm"));
        f.write("c.yaml", &image_doc("dup", "trixie"));
        let s = f.source.sync().unwrap();
        let errors: Vec<&String> = s.reports.iter().flat_map(|r| &r.errors).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("a.yaml:1: Image/mine is managed by api"),
            "{errors:?}"
        );
        assert!(
            errors[1]
                .starts_with("c.yaml:1: metadata.name: Image/dup is already declared at b.yaml:1"),
            "{errors:?}"
        );
        // The API's object was not touched.
        assert_eq!(f.object("mine").unwrap().manager, Manager::Api);
        assert_eq!(f.object("mine").unwrap().generation(), 1);
        // Deleting a spec file never prunes an API object.
        std::fs::remove_file(f.dir.join("a.yaml")).unwrap();
        assert!(f.source.sync().unwrap().pruned.is_empty());

        // Move `dup` from b.yaml to d.yaml (and drop the duplicate): taken over, not pruned.
        std::fs::remove_file(f.dir.join("b.yaml")).unwrap();
        std::fs::remove_file(f.dir.join("c.yaml")).unwrap();
        f.write("d.yaml", &image_doc("dup", "bookworm"));
        let s = f.source.sync().unwrap();
        assert!(s.pruned.is_empty() && s.reports.is_empty(), "{s:?}");
        let dup = f.object("dup").unwrap();
        assert_eq!(
            dup.manager,
            Manager::SpecDir {
                file: "d.yaml".into()
            }
        );
        assert!(!dup.is_deleting());
    }

    #[test]
    fn missing_directory_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join(STORE_FILE)).unwrap();
        let err = SpecDir::new(tmp.path().join("nope"), store).unwrap_err();
        assert!(err.to_string().contains("create it"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_follows_writes_renames_and_deletes() {
        let f = fixture();
        f.write("initial.yaml", &image_doc("initial", "bookworm"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let options = WatchOptions {
            debounce: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            resync: Duration::from_secs(3600),
        };
        let task = tokio::spawn(f.source.clone().run(options, async {
            let _ = rx.await;
        }));
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !cond() {
                assert!(std::time::Instant::now() < deadline, "timed out: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait("initial sync", &|| f.object("initial").is_some());

        f.write("new.yaml", &image_doc("fresh", "bookworm"));
        wait("new file", &|| f.object("fresh").is_some());

        // Editor-style atomic save: write a temporary file, rename it over the original.
        let tmp = f.dir.join(".new.yaml.swp");
        std::fs::write(&tmp, image_doc("fresh", "trixie")).unwrap();
        std::fs::rename(&tmp, f.dir.join("new.yaml")).unwrap();
        wait("atomic rename", &|| {
            f.object("fresh").is_some_and(|o| o.generation() == 2)
        });

        // A half-written file is reported, then picked up once complete.
        f.write("half.yaml", "apiVersion: agentvm.dev/v1alpha1\nkind: Ima");
        wait("half-written file reported", &|| {
            f.source
                .state()
                .reports
                .iter()
                .any(|r| r.file == "half.yaml")
        });
        f.write("half.yaml", &image_doc("whole", "bookworm"));
        wait("completed file", &|| f.object("whole").is_some());
        assert!(f.source.state().reports.is_empty());

        std::fs::remove_file(f.dir.join("new.yaml")).unwrap();
        wait("pruned", &|| {
            f.object("fresh").is_some_and(|o| o.is_deleting())
        });
        assert!(!f.object("initial").unwrap().is_deleting());

        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }
}
