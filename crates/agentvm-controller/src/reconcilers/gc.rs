//! `GarbageCollector`: removes owned libvirt objects whose owner object is no longer in the
//! store (e.g. the store was replaced, or an object vanished while the controller was down).
//!
//! Only objects the backend lists as owned are considered, and only those created for the
//! kinds the controller reconciles (`VmPool` and `Sandbox` domains, `Network` networks, `NetworkFilter`
//! filters); objects without agentvm's metadata are never listed, so never touched. Order:
//! domains first, then filters, then networks (a network is not removed from under a VM).
//! Objects whose owner still exists are their reconciler's business (drift repair).

use std::sync::Arc;

use agentvm_api::Kind;
use agentvm_backend::Backend;

use super::backend_error;
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

    fn exists(ctx: &Ctx, kind: Kind, name: &str) -> Result<bool, ReconcileError> {
        Ok(ctx.store.get(kind, name)?.is_some())
    }

    /// One sweep. Continues past individual failures and reports the first one.
    pub fn collect(&self, ctx: &Ctx) -> Result<GcReport, ReconcileError> {
        let mut report = GcReport::default();
        let mut first_err = None;
        let mut note = |r: Result<(), ReconcileError>| {
            if let Err(e) = r {
                tracing::warn!("garbage collection: {e}");
                first_err.get_or_insert(e);
            }
        };
        let vms = self
            .backend
            .list_vms()
            .map_err(|e| backend_error("listing domains", &e))?;
        for vm in vms {
            let owner_kind = [Kind::VmPool, Kind::Sandbox]
                .into_iter()
                .find(|k| vm.owner.is_kind(*k));
            let Some(kind) = owner_kind else { continue };
            if !Self::exists(ctx, kind, &vm.owner.name)? {
                tracing::info!(vm = %vm.name, owner = %vm.owner.name, %kind, "removing VM whose owner no longer exists");
                let r = self.backend.destroy_vm(&vm.name);
                if r.is_ok() {
                    report.domains.push(vm.name.clone());
                }
                note(r.map_err(|e| backend_error(&format!("destroying {}", vm.name), &e)));
            }
        }
        let filters = self
            .backend
            .list_nwfilters()
            .map_err(|e| backend_error("listing nwfilters", &e))?;
        for f in filters {
            if f.owner.is_kind(Kind::NetworkFilter)
                && !Self::exists(ctx, Kind::NetworkFilter, &f.owner.name)?
            {
                tracing::info!(nwfilter = %f.name, "removing nwfilter no object declares");
                let r = self.backend.delete_nwfilter(&f.name);
                if r.is_ok() {
                    report.filters.push(f.name.clone());
                }
                note(r.map_err(|e| backend_error(&format!("deleting {}", f.name), &e)));
            }
        }
        let networks = self
            .backend
            .list_networks()
            .map_err(|e| backend_error("listing networks", &e))?;
        for n in networks {
            if n.owner.is_kind(Kind::Network) && !Self::exists(ctx, Kind::Network, &n.owner.name)? {
                tracing::info!(network = %n.name, "removing network no object declares");
                let r = self.backend.delete_network(&n.name);
                if r.is_ok() {
                    report.networks.push(n.name.clone());
                }
                note(r.map_err(|e| backend_error(&format!("deleting {}", n.name), &e)));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }
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
    use agentvm_backend::Owner;

    fn owner(kind: &str, name: &str) -> Owner {
        Owner {
            kind: kind.into(),
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
