//! `PoolRegistry`: the in-memory state of every pool VM (ready, busy, needs reset), shared by
//! the `VmPool` reconciler and the run scheduler. Acquiring a VM is a map lookup under a
//! mutex; the reconciler never destroys or resets a VM while it is busy.
//!
//! After a controller restart the registry is empty; the reconciler adopts the pools' VMs
//! from libvirt (by ownership metadata) as `NeedsReset`, so a VM that was in the middle of a
//! run is reset to its golden state before anyone gets it.
//!
//! Each VM carries its creation time (wall clock; for an adopted VM the pool reconciler
//! restores it from the pool's status) and the pool's TTL: an expired VM is never handed
//! out, and a run that had it gives it back for replacement instead of a reset.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Where a pool VM is in its use cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmPhase {
    /// Idle at the golden state: can be handed out.
    Ready,
    /// Handed out (running an `AgentRun`): the reconciler leaves it alone.
    Busy,
    /// Released or adopted: reset to the golden state before it is ready again.
    NeedsReset,
    /// Being destroyed by the reconciler (scale down, rolling replacement, broken).
    Retiring,
    /// Idle, its guest agent being pinged by the pool reconciler's health check; ready
    /// again right after (or retired when it does not answer).
    Checking,
}

/// One VM of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolVm {
    /// Domain name.
    pub name: String,
    /// Use phase.
    pub phase: VmPhase,
    /// Template hash it was built from (its owner metadata's spec hash).
    pub template_hash: String,
    /// When this controller first saw it (creation or adoption).
    pub since: Instant,
    /// When the VM was created (for an adopted VM: as recorded before, else its adoption).
    pub created: SystemTime,
    /// When its guest agent last answered a health check (or it became known).
    pub last_checked: Instant,
}

impl PoolVm {
    /// Time since the VM's creation.
    pub fn age(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.created)
            .unwrap_or(Duration::ZERO)
    }
}

#[derive(Debug, Default)]
struct Pool {
    current_hash: String,
    vms: BTreeMap<String, PoolVm>,
    waiting: u32,
    ttl: Option<Duration>,
}

impl Pool {
    fn expired(&self, vm: &PoolVm) -> bool {
        self.ttl.is_some_and(|ttl| vm.age() >= ttl)
    }
}

/// Called with a pool's name when one of its VMs becomes ready (see
/// [`PoolRegistry::on_vm_ready`]).
pub type ReadyListener = Arc<dyn Fn(&str) + Send + Sync>;

/// Pool VMs by pool name. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct PoolRegistry {
    pools: Mutex<HashMap<String, Pool>>,
    listeners: Mutex<Vec<ReadyListener>>,
}

impl std::fmt::Debug for PoolRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolRegistry")
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

impl PoolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `listener` (outside the registry's lock) every time a VM becomes ready: created
    /// or adopted as ready, reset, health-checked, or given back ready. The run scheduler
    /// wakes the first waiting run of that pool with it instead of polling.
    pub fn on_vm_ready(&self, listener: ReadyListener) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(listener);
    }

    fn vm_ready(&self, pool: &str) {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for l in listeners {
            l(pool);
        }
    }

    /// Takes a ready VM of `pool` (one of the current template when there is one) and marks
    /// it busy. `None` when no VM is ready. A VM past the pool's TTL is never handed out.
    pub fn acquire(&self, pool: &str) -> Option<String> {
        let mut pools = self.lock();
        let p = pools.get_mut(pool)?;
        let current = p.current_hash.clone();
        let name = p
            .vms
            .values()
            .filter(|v| v.phase == VmPhase::Ready && !p.expired(v))
            .min_by_key(|v| v.template_hash != current)?
            .name
            .clone();
        let vm = p.vms.get_mut(&name)?;
        vm.phase = VmPhase::Busy;
        Some(name)
    }

    /// True when `vm` of `pool` has lived past the pool's TTL (it is replaced, not reused).
    pub fn expired(&self, pool: &str, vm: &str) -> bool {
        let pools = self.lock();
        pools
            .get(pool)
            .and_then(|p| p.vms.get(vm).map(|v| p.expired(v)))
            .unwrap_or(false)
    }

    /// Sets the TTL of `pool`'s VMs, counted from each VM's creation.
    pub(crate) fn set_ttl(&self, pool: &str, ttl: Duration) {
        self.lock().entry(pool.to_string()).or_default().ttl = Some(ttl);
    }

    /// Restores the creation time of a VM known from an earlier controller (the earlier of
    /// the recorded time and the one it has now).
    pub(crate) fn seed_created(&self, pool: &str, vm: &str, created: SystemTime) {
        if let Some(v) = self.lock().get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            v.created = v.created.min(created);
        }
    }

    /// Records that `vm`'s guest agent answered a health check now.
    pub(crate) fn mark_checked(&self, pool: &str, vm: &str) {
        if let Some(v) = self.lock().get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            v.last_checked = Instant::now();
        }
    }

    /// Gives a busy VM back: it is reset to the golden state by the pool reconciler before
    /// it is ready again. Returns false when the VM is unknown (e.g. destroyed meanwhile).
    pub fn release(&self, pool: &str, vm: &str) -> bool {
        let mut pools = self.lock();
        match pools.get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            Some(v) => {
                v.phase = VmPhase::NeedsReset;
                true
            }
            None => false,
        }
    }

    /// Records how many runs wait for a VM of `pool`: the pool reconciler keeps that many
    /// more VMs starting or ready (up to `maxSize`) on top of `minReady`.
    pub fn set_waiting(&self, pool: &str, runs: u32) {
        self.lock().entry(pool.to_string()).or_default().waiting = runs;
    }

    /// How many runs wait for a VM of `pool`.
    pub fn waiting(&self, pool: &str) -> u32 {
        self.lock().get(pool).map_or(0, |p| p.waiting)
    }

    /// The VMs of `pool`, by name.
    pub fn vms(&self, pool: &str) -> Vec<PoolVm> {
        self.lock()
            .get(pool)
            .map(|p| p.vms.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Phase of one VM.
    pub fn phase(&self, pool: &str, vm: &str) -> Option<VmPhase> {
        self.lock()
            .get(pool)
            .and_then(|p| p.vms.get(vm))
            .map(|v| v.phase)
    }

    /// Records the template hash VMs of `pool` should have.
    pub(crate) fn set_current_hash(&self, pool: &str, hash: &str) {
        self.lock()
            .entry(pool.to_string())
            .or_default()
            .current_hash = hash.to_string();
    }

    /// Adds a VM (created or adopted) unless it is known already. Public for benchmarks of
    /// the hand-out; in the controller only the `VmPool` reconciler adds VMs.
    pub fn insert(&self, pool: &str, name: &str, phase: VmPhase, template_hash: &str) {
        let mut added = false;
        self.lock()
            .entry(pool.to_string())
            .or_default()
            .vms
            .entry(name.to_string())
            .or_insert_with(|| {
                added = true;
                PoolVm {
                    name: name.to_string(),
                    phase,
                    template_hash: template_hash.to_string(),
                    since: Instant::now(),
                    created: SystemTime::now(),
                    last_checked: Instant::now(),
                }
            });
        if added && phase == VmPhase::Ready {
            self.vm_ready(pool);
        }
    }

    /// Moves a VM from `from` to `to`; false (and no change) when it is not in `from`.
    /// Public for benchmarks of the hand-out (a run gives its reset VM back this way).
    pub fn transition(&self, pool: &str, vm: &str, from: VmPhase, to: VmPhase) -> bool {
        let moved = {
            let mut pools = self.lock();
            match pools.get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
                Some(v) if v.phase == from => {
                    v.phase = to;
                    true
                }
                _ => false,
            }
        };
        if moved && to == VmPhase::Ready {
            self.vm_ready(pool);
        }
        moved
    }

    /// Claims an idle VM for destruction: true when it was not busy (it is `Retiring` now).
    pub(crate) fn retire(&self, pool: &str, vm: &str) -> bool {
        let mut pools = self.lock();
        match pools.get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            Some(v) if v.phase == VmPhase::Busy => false,
            Some(v) => {
                v.phase = VmPhase::Retiring;
                true
            }
            None => true,
        }
    }

    /// Makes `vm`'s last health check `by` older (tests).
    #[cfg(test)]
    pub(crate) fn backdate_check(&self, pool: &str, vm: &str, by: Duration) {
        if let Some(v) = self.lock().get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            v.last_checked -= by;
        }
    }

    /// Forgets one VM.
    pub(crate) fn remove(&self, pool: &str, vm: &str) {
        if let Some(p) = self.lock().get_mut(pool) {
            p.vms.remove(vm);
        }
    }

    /// Forgets a whole pool.
    pub(crate) fn forget(&self, pool: &str) {
        self.lock().remove(pool);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_prefers_the_current_template_and_busy_vms_cannot_be_retired() {
        let r = PoolRegistry::new();
        r.set_current_hash("p", "new");
        r.insert("p", "a-old", VmPhase::Ready, "old");
        r.insert("p", "b-new", VmPhase::Ready, "new");
        assert_eq!(r.acquire("p").as_deref(), Some("b-new"));
        assert!(!r.retire("p", "b-new"));
        assert_eq!(r.acquire("p").as_deref(), Some("a-old"));
        assert_eq!(r.acquire("p"), None);
        assert!(r.release("p", "b-new"));
        assert_eq!(r.phase("p", "b-new"), Some(VmPhase::NeedsReset));
        assert!(r.retire("p", "b-new"));
        assert!(!r.release("p", "gone"));
    }

    #[test]
    fn an_expired_vm_is_never_handed_out_and_ttl_counts_from_creation() {
        let r = PoolRegistry::new();
        r.set_current_hash("p", "h");
        r.set_ttl("p", Duration::from_secs(60));
        r.insert("p", "old", VmPhase::Ready, "h");
        r.insert("p", "young", VmPhase::Ready, "h");
        // Created 61 s ago (e.g. restored from the status after a restart).
        r.seed_created("p", "old", SystemTime::now() - Duration::from_secs(61));
        // A later time never makes a VM younger.
        r.seed_created("p", "old", SystemTime::now());
        assert!(r.expired("p", "old"));
        assert!(!r.expired("p", "young"));
        assert_eq!(r.acquire("p").as_deref(), Some("young"));
        assert_eq!(r.acquire("p"), None, "the expired VM is not handed out");
        // A VM that expires while busy stays busy: nothing takes it from its run.
        r.seed_created("p", "young", SystemTime::now() - Duration::from_secs(120));
        assert!(!r.retire("p", "young"));
        assert_eq!(r.phase("p", "young"), Some(VmPhase::Busy));
    }
}
