//! `GarbageCollector`: removes owned libvirt objects whose owner object is no longer in the
//! store (e.g. the store was replaced, or an object vanished while the controller was down).
//!
//! Only objects the backend lists as owned are considered, and only those created for the
//! kinds the controller reconciles (`VmPool` and `Sandbox` domains, `Network` networks, `NetworkFilter`
//! filters); objects without agentvm's metadata are never listed, so never touched. Order:
//! domains first, then filters, then networks (a network is not removed from under a VM).
//! Objects whose owner still exists are their reconciler's business (drift repair).

use std::sync::Arc;

use agentvm_api::{Kind, KindStatus};
use agentvm_backend::{Backend, Owner};

use super::backend_error;
use super::network::LibvirtNetwork;
use super::network_filter::LibvirtNwFilter;
use super::owned::LibvirtObject;
use crate::reconcile::{Ctx, ReconcileError, Sweeper};

/// What one sweep removed (libvirt names).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Domains destroyed.
    pub domains: Vec<String>,
    /// nwfilters undefined.
    pub filters: Vec<String>,
    /// Networks undefined.
    pub networks: Vec<String>,
}

/// Sweeps orphaned owned objects; see the module docs.
pub struct GarbageCollector {
    backend: Arc<dyn Backend>,
}

impl GarbageCollector {
    /// A collector acting through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    /// One sweep. Continues past individual failures and reports the first one.
    pub fn collect(&self, ctx: &Ctx) -> Result<GcReport, ReconcileError> {
        let backend = self.backend.as_ref();
        let mut report = GcReport::default();
        let mut first_err = None;
        let vms = backend
            .list_vms()
            .map_err(|e| backend_error("listing domains", &e))?
            .into_iter()
            .map(|vm| (vm.name, vm.owner));
        // Domains are destroyed (stopped, disks and golden state removed), not undefined,
        // and belong to two kinds; otherwise the same sweep as networks and filters.
        report.domains = sweep(
            ctx,
            vms,
            &[Kind::VmPool, Kind::Sandbox],
            &mut first_err,
            |n| {
                backend
                    .destroy_vm(n)
                    .map_err(|e| backend_error(&format!("destroying {n}"), &e))
            },
        )?;
        report.filters = self.sweep_owned::<LibvirtNwFilter>(ctx, &mut first_err)?;
        report.networks = self.sweep_owned::<LibvirtNetwork>(ctx, &mut first_err)?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// Undefines the owned objects of type `T` whose owner is gone; the names removed.
    fn sweep_owned<T: LibvirtObject>(
        &self,
        ctx: &Ctx,
        first_err: &mut Option<ReconcileError>,
    ) -> Result<Vec<String>, ReconcileError> {
        let backend = self.backend.as_ref();
        let listed = T::list_owned(backend)
            .map_err(|e| backend_error(&format!("listing {}s", T::NOUN), &e))?;
        sweep(ctx, listed, &[T::Status::KIND], first_err, |n| {
            T::undefine(backend, n).map_err(|e| backend_error(&format!("deleting {n}"), &e))
        })
    }
}

/// Removes (with `remove`) each listed libvirt object (name, owner) owned by an object of
/// one of `kinds` that is not in the store; returns the names removed. A failed removal
/// is logged, kept in `first_err` if it is the first, and the sweep goes on; a failed store
/// read stops it.
fn sweep(
    ctx: &Ctx,
    listed: impl IntoIterator<Item = (String, Owner)>,
    kinds: &[Kind],
    first_err: &mut Option<ReconcileError>,
    remove: impl Fn(&str) -> Result<(), ReconcileError>,
) -> Result<Vec<String>, ReconcileError> {
    let mut removed = Vec::new();
    for (name, owner) in listed {
        let Some(kind) = kinds.iter().copied().find(|k| owner.is_kind(*k)) else {
            continue;
        };
        if ctx.store.get(kind, &owner.name)?.is_some() {
            continue;
        }
        tracing::info!(%name, owner = %owner.name, %kind, "removing a libvirt object whose owner no longer exists");
        match remove(&name) {
            Ok(()) => removed.push(name),
            Err(e) => {
                tracing::warn!("garbage collection: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    Ok(removed)
}

impl Sweeper for GarbageCollector {
    fn sweep(&self, ctx: &Ctx) -> Result<(), ReconcileError> {
        self.collect(ctx).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcilers::testutil::*;
    use agentvm_backend::fake::{FakeBackend, Op};

    fn owner(kind: &str, name: &str) -> Owner {
        Owner {
            kind: agentvm_backend::OwnerKind::parse(kind).unwrap(),
            name: name.into(),
            spec_hash: "h".into(),
            generation: 1,
        }
    }

    #[test]
    fn removes_undeclared_owned_objects_in_order_and_never_foreign_or_declared_ones() {
        let t = Setup::new();
        t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {name: kept}\nspec: {mode: nat, subnet: 10.80.0.0/24}\n");
        let fake = &t.fake;
        fake.add_owned_network("agentvm-kept", owner("Network", "kept"));
        fake.add_owned_network("agentvm-gone", owner("Network", "gone"));
        fake.add_owned_filter("agentvm-gone", owner("NetworkFilter", "gone"));
        fake.add_owned_domain("agentvm-gone-abcde", owner("VmPool", "gone"), true);
        // Owned by agentvm, but not by a kind the controller reconciles (`agentvm exec`).
        fake.add_owned_domain("agentvm-exec-1", owner("Exec", "agentvm-exec-1"), false);
        fake.add_foreign_domain("someone-elses");
        fake.add_foreign_network("default");
        fake.add_foreign_filter("clean-traffic");
        let gc = GarbageCollector::new(t.backend());
        let report = gc.collect(&t.ctx).unwrap();
        assert_eq!(report.domains, ["agentvm-gone-abcde"]);
        assert_eq!(report.filters, ["agentvm-gone"]);
        assert_eq!(report.networks, ["agentvm-gone"]);
        assert_eq!(
            fake.mutations(),
            [
                "DestroyVm(agentvm-gone-abcde)",
                "DeleteNwFilter(agentvm-gone)",
                "DeleteNetwork(agentvm-gone)"
            ]
        );
        let domains = fake.domains();
        assert!(domains.contains_key("someone-elses") && domains.contains_key("agentvm-exec-1"));
        assert!(
            fake.networks().contains_key("default") && fake.networks().contains_key("agentvm-kept")
        );
        assert!(fake.filters().contains_key("clean-traffic"));
        // Nothing left to do: a second sweep changes nothing.
        fake.clear_calls();
        assert_eq!(gc.collect(&t.ctx).unwrap(), GcReport::default());
        assert!(fake.mutations().is_empty());
    }

    #[test]
    fn a_failure_is_reported_and_the_rest_still_collected() {
        let t = Setup::new();
        t.fake
            .add_owned_domain("agentvm-a-1", owner("VmPool", "a"), true);
        t.fake
            .add_owned_domain("agentvm-b-1", owner("VmPool", "b"), true);
        t.fake
            .fail_next(Op::DestroyVm, FakeBackend::libvirt_error("stuck"));
        let gc = GarbageCollector::new(t.backend());
        assert_eq!(gc.collect(&t.ctx).unwrap_err().reason, "LibvirtError");
        assert_eq!(t.fake.domains().len(), 1);
        gc.collect(&t.ctx).unwrap();
        assert!(t.fake.domains().is_empty());
    }
}
