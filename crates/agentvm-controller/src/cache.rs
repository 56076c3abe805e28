//! `ObjectCache`: every stored object in memory, kept current from the store's change
//! events (kube-rs' reflector `Store`), so that the dispatcher and the reconcilers read
//! objects without a read transaction and a JSON decode each.
//!
//! # How it stays current
//! The cache observes the store ([`Store::observe`]): every committed change marks its key
//! on the writing thread, before the write returns. The next read of a marked key reads that
//! one object back from the store (one decode per change, not per read). A read back that
//! raced a newer change is used by its reader but not kept, so the mark stays until a read
//! back after the last change. The first read lists the whole store (a relist), and so does
//! the first read after [`ObjectCache::missed_events`] (the dispatcher calls it when its
//! event stream lagged).
//!
//! # Guarantees
//! - Read your writes: once a store write returned on any thread, every read of the cache
//!   that starts afterwards sees that write or a later one, as a read of the store would.
//!   A read concurrent with a write may see the object as it was just before it.
//! - Lists are sorted like [`Store::list`] (kind in dependency order, then name).
//! - Objects are shared (`Arc`): a read clones a pointer, never the object.
//!
//! # Which reads use it, and why that is safe
//! - The dispatcher: the object handed to a reconciler, and the keys of a resync or of a
//!   watched kind. Reconcilers are level-triggered and not told why they run; what they get
//!   is what a store read at that moment would have returned.
//! - Reconcilers' lookups of other objects (`VmPool`s using a network or filter, a pool's
//!   image, network and filter, a run's pool, the runs waiting for a pool): decisions they
//!   take are re-taken at the next change of those objects (watches) or resync.
//! - Not the writes: status updates ([`Store::update_status`]) read, compare and write in
//!   the store, so a status computed from an object read a moment earlier never goes
//!   unnoticed; generations are assigned by the store at apply. Finalizing a deletion, the
//!   API's reads and the garbage collector's "does any object still declare this?" stay on
//!   the store too.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use agentvm_api::Kind;

use agentvm_store::{ObjectKey, Store, StoreError, StoreEvent, StoredObject};

/// The stored objects in memory; cheap to clone (one shared cache).
#[derive(Clone)]
pub struct ObjectCache {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ObjectCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.shared.lock();
        f.debug_struct("ObjectCache")
            .field("objects", &s.objects.len())
            .field("changed", &s.changed.len())
            .field("listed", &s.listed)
            .finish()
    }
}

struct Shared {
    store: Store,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<ObjectKey, Arc<StoredObject>>,
    /// Keys changed in the store and not read back since, with the mark of their latest
    /// change.
    changed: HashMap<ObjectKey, u64>,
    /// Counts changes (and missed events): a mark is the value after the increment.
    marks: u64,
    /// False until the first relist, and again after missed events.
    listed: bool,
    /// The mark of the latest [`ObjectCache::missed_events`].
    missed_at: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ObjectCache {
    /// A cache of `store`'s objects, observing its changes from now on; filled by the
    /// first read.
    pub fn new(store: &Store) -> Self {
        let cache = Self::unobserved(store);
        let weak: Weak<Shared> = Arc::downgrade(&cache.shared);
        store.observe(Box::new(move |event: &StoreEvent| match weak.upgrade() {
            Some(shared) => {
                Self::mark(&shared, event.key());
                true
            }
            None => false,
        }));
        cache
    }

    /// A cache that does not observe the store (tests of missed events).
    fn unobserved(store: &Store) -> Self {
        Self {
            shared: Arc::new(Shared {
                store: store.clone(),
                state: Mutex::default(),
            }),
        }
    }

    fn mark(shared: &Shared, key: ObjectKey) {
        let mut s = shared.lock();
        s.marks += 1;
        let mark = s.marks;
        s.changed.insert(key, mark);
    }

    /// Records that changes may have gone unseen: the next read relists the store.
    pub fn missed_events(&self) {
        let mut s = self.shared.lock();
        s.marks += 1;
        s.missed_at = s.marks;
        s.listed = false;
    }

    /// Replaces the contents with a listing of the store; returns the number of objects.
    pub fn relist(&self) -> Result<usize, StoreError> {
        let from = self.shared.lock().marks;
        let objects = self.shared.store.list(None)?;
        let n = objects.len();
        let mut s = self.shared.lock();
        s.objects = objects
            .into_iter()
            .map(|o| (o.key(), Arc::new(o)))
            .collect();
        // Changes marked before the listing started are in it.
        s.changed.retain(|_, mark| *mark > from);
        if s.missed_at <= from {
            s.listed = true;
        }
        Ok(n)
    }

    fn ensure_listed(&self) -> Result<(), StoreError> {
        if !self.shared.lock().listed {
            self.relist()?;
        }
        Ok(())
    }

    /// Reads `key` back from the store if it changed; returns the object as read (or as
    /// cached when it had not changed).
    fn read_back(&self, key: &ObjectKey) -> Result<Option<Arc<StoredObject>>, StoreError> {
        let mark = {
            let s = self.shared.lock();
            match s.changed.get(key) {
                None => return Ok(s.objects.get(key).cloned()),
                Some(m) => *m,
            }
        };
        let read = self.shared.store.get(key.kind, &key.name)?.map(Arc::new);
        let mut s = self.shared.lock();
        // Kept only when no change came after the one this read follows.
        if s.changed.get(key) == Some(&mark) {
            s.changed.remove(key);
            match &read {
                Some(o) => s.objects.insert(key.clone(), o.clone()),
                None => s.objects.remove(key),
            };
        }
        Ok(read)
    }

    /// The object `kind`/`name`, if stored (also while its deletion is pending).
    pub fn get(&self, kind: Kind, name: &str) -> Result<Option<Arc<StoredObject>>, StoreError> {
        self.ensure_listed()?;
        self.read_back(&ObjectKey::new(kind, name))
    }

    /// Every object of `kind` (all kinds when `None`), sorted as [`Store::list`] sorts.
    pub fn list(&self, kind: Option<Kind>) -> Result<Vec<Arc<StoredObject>>, StoreError> {
        self.ensure_listed()?;
        let changed: Vec<ObjectKey> = {
            let s = self.shared.lock();
            s.changed
                .keys()
                .filter(|k| kind.is_none_or(|kind| k.kind == kind))
                .cloned()
                .collect()
        };
        for key in &changed {
            self.read_back(key)?;
        }
        let s = self.shared.lock();
        Ok(match kind {
            None => s.objects.values().cloned().collect(),
            Some(kind) => s
                .objects
                .range(ObjectKey::new(kind, "")..)
                .take_while(|(k, _)| k.kind == kind)
                .map(|(_, o)| o.clone())
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::{Image, ImageSpec, Resource};
    use agentvm_store::{ApplyOptions, Manager, STORE_FILE};

    fn setup() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        (dir, store)
    }

    fn image(name: &str, packages: &[&str]) -> Resource {
        Image::new(
            name,
            ImageSpec {
                packages: packages.iter().map(|p| p.to_string()).collect(),
                ..ImageSpec::default()
            },
        )
        .into()
    }

    fn apply(store: &Store, r: Resource) {
        store
            .apply(r, Manager::Api, ApplyOptions::default())
            .unwrap();
    }

    fn names(objects: &[Arc<StoredObject>]) -> Vec<String> {
        objects
            .iter()
            .map(|o| o.resource.name().to_string())
            .collect()
    }

    /// The cache holds what the store holds, object for object.
    fn assert_same(cache: &ObjectCache, store: &Store) {
        let cached: Vec<StoredObject> = cache
            .list(None)
            .unwrap()
            .iter()
            .map(|o| (**o).clone())
            .collect();
        assert_eq!(cached, store.list(None).unwrap());
    }

    #[test]
    fn changes_are_seen_in_order_by_the_next_read() {
        let (_d, store) = setup();
        apply(&store, image("b", &[]));
        let cache = ObjectCache::new(&store);
        assert_eq!(names(&cache.list(None).unwrap()), ["b"]);
        apply(&store, image("a", &[]));
        apply(&store, image("a", &["git"]));
        apply(&store, image("a", &["git", "curl"]));
        let a = cache.get(Kind::Image, "a").unwrap().unwrap();
        assert_eq!(a.generation(), 3);
        assert_eq!(names(&cache.list(Some(Kind::Image)).unwrap()), ["a", "b"]);
        store
            .update_status_json(Kind::Image, "b", serde_json::json!({"phase": "Ready"}))
            .unwrap();
        let b = cache.get(Kind::Image, "b").unwrap().unwrap();
        assert_eq!(b.status_json()["phase"], "Ready");
        assert_same(&cache, &store);
        // Unchanged objects are shared, not read again.
        let again = cache.get(Kind::Image, "b").unwrap().unwrap();
        assert!(Arc::ptr_eq(&b, &again));
    }

    #[test]
    fn deletions_are_seen_pending_then_gone_and_lists_keep_kind_order() {
        let (_d, store) = setup();
        let cache = ObjectCache::new(&store);
        let run = agentvm_api::AgentRun::new(
            "r",
            agentvm_api::AgentRunSpec::command("p", "true", vec![]),
        );
        apply(&store, run.into());
        apply(&store, image("img", &[]));
        // Images come before runs, as in the store's listing.
        let all = cache.list(None).unwrap();
        assert_eq!(
            all.iter().map(|o| o.resource.kind()).collect::<Vec<_>>(),
            [Kind::Image, Kind::AgentRun]
        );
        assert_eq!(names(&cache.list(Some(Kind::AgentRun)).unwrap()), ["r"]);
        store.request_delete(Kind::Image, "img", None).unwrap();
        assert!(cache
            .get(Kind::Image, "img")
            .unwrap()
            .unwrap()
            .is_deleting());
        store.finalize_delete(Kind::Image, "img").unwrap();
        assert!(cache.get(Kind::Image, "img").unwrap().is_none());
        assert!(cache.list(Some(Kind::Image)).unwrap().is_empty());
        // Applied again under the same name: a new object.
        apply(&store, image("img", &["git"]));
        assert_eq!(
            cache.get(Kind::Image, "img").unwrap().unwrap().generation(),
            1
        );
        assert_same(&cache, &store);
    }

    #[test]
    fn a_relist_after_missed_events_catches_up() {
        let (_d, store) = setup();
        apply(&store, image("kept", &[]));
        apply(&store, image("changed", &[]));
        apply(&store, image("removed", &[]));
        // A cache that sees no events: what an asynchronous stream that lagged would leave.
        let cache = ObjectCache::unobserved(&store);
        assert_eq!(cache.list(None).unwrap().len(), 3);
        apply(&store, image("changed", &["git"]));
        apply(&store, image("added", &[]));
        store.request_delete(Kind::Image, "removed", None).unwrap();
        store.finalize_delete(Kind::Image, "removed").unwrap();
        // Stale until told that events were missed.
        assert_eq!(
            cache
                .get(Kind::Image, "changed")
                .unwrap()
                .unwrap()
                .generation(),
            1
        );
        cache.missed_events();
        assert_eq!(
            names(&cache.list(None).unwrap()),
            ["added", "changed", "kept"]
        );
        assert_same(&cache, &store);
        assert_eq!(cache.relist().unwrap(), 3);
    }

    #[test]
    fn a_dropped_cache_stops_observing() {
        let (_d, store) = setup();
        let cache = ObjectCache::new(&store);
        drop(cache);
        apply(&store, image("a", &[]));
        apply(&store, image("b", &[]));
        assert_eq!(store.observer_count(), 0);
    }
}
