//! `PoolRegistry`: the in-memory state of every pool VM (ready, busy, needs reset), shared by
//! the `VmPool` reconciler and the run scheduler. Acquiring a VM is a map lookup under a
//! mutex; the reconciler never destroys or resets a VM while it is busy.
//!
//! After a controller restart the registry is empty; the reconciler adopts the pools' VMs
//! from libvirt (by ownership metadata) as `NeedsReset`, so a VM that was in the middle of a
//! run is reset to its golden state before anyone gets it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

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
}

#[derive(Debug, Default)]
struct Pool {
    current_hash: String,
    vms: BTreeMap<String, PoolVm>,
    waiting: u32,
}

/// Pool VMs by pool name. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct PoolRegistry {
    pools: Mutex<HashMap<String, Pool>>,
}

impl PoolRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pool>> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a ready VM of `pool` (one of the current template when there is one) and marks
    /// it busy. `None` when no VM is ready.
    pub fn acquire(&self, pool: &str) -> Option<String> {
        let mut pools = self.lock();
        let p = pools.get_mut(pool)?;
        let current = p.current_hash.clone();
        let vm = p
            .vms
            .values_mut()
            .filter(|v| v.phase == VmPhase::Ready)
            .min_by_key(|v| v.template_hash != current)?;
        vm.phase = VmPhase::Busy;
        Some(vm.name.clone())
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
        self.lock()
            .entry(pool.to_string())
            .or_default()
            .vms
            .entry(name.to_string())
            .or_insert_with(|| PoolVm {
                name: name.to_string(),
                phase,
                template_hash: template_hash.to_string(),
                since: Instant::now(),
            });
    }

    /// Moves a VM from `from` to `to`; false (and no change) when it is not in `from`.
    /// Public for benchmarks of the hand-out (a run gives its reset VM back this way).
    pub fn transition(&self, pool: &str, vm: &str, from: VmPhase, to: VmPhase) -> bool {
        let mut pools = self.lock();
        match pools.get_mut(pool).and_then(|p| p.vms.get_mut(vm)) {
            Some(v) if v.phase == from => {
                v.phase = to;
                true
            }
            _ => false,
        }
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
}
