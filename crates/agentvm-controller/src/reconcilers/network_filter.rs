//! `NetworkFilter` → a libvirt nwfilter named `agentvm-<name>` with the spec's hash in its
//! ownership record: the nwfilter's [`LibvirtObject`] for the generic
//! [`OwnedObjectReconciler`].
//!
//! Every pass ensures the filter (redefined when the spec hash differs, which libvirt applies
//! to running guests at once; recreated when removed by hand). Deletion waits while any
//! `VmPool` still refers to it (`Degraded`/`InUse`), then undefines it and finalizes.

use agentvm_api::{
    Condition, NetworkFilterPhase, NetworkFilterStatus, Reason, Resource, VmPoolSpec,
};
use agentvm_backend::backend::EnsureOutcome;
use agentvm_backend::netxml::NwFilterDef;
use agentvm_backend::{Backend, BackendError, Owner};

use super::owned::{LibvirtObject, OwnedObjectReconciler};

/// A libvirt nwfilter, as owned by a `NetworkFilter`.
pub struct LibvirtNwFilter;

/// Reconciles `NetworkFilter` objects into libvirt nwfilters.
pub type NetworkFilterReconciler = OwnedObjectReconciler<LibvirtNwFilter>;

impl LibvirtObject for LibvirtNwFilter {
    type Status = NetworkFilterStatus;
    type Def = NwFilterDef;
    const NOUN: &'static str = "nwfilter";
    const READY_REASON: Reason = Reason::Defined;
    const READY_STATE: &'static str = "defined";

    fn definition(resource: &Resource, name: String, owner: Owner) -> Option<NwFilterDef> {
        let Resource::NetworkFilter(filter) = resource else {
            return None;
        };
        Some(NwFilterDef {
            name,
            spec: filter.spec.clone(),
            owner,
        })
    }

    fn ensure(backend: &dyn Backend, def: &NwFilterDef) -> Result<EnsureOutcome, BackendError> {
        // A filter is not started; libvirt applies a redefinition to running guests at once.
        backend.ensure_nwfilter(def)
    }

    fn undefine(backend: &dyn Backend, name: &str) -> Result<(), BackendError> {
        backend.delete_nwfilter(name)
    }

    fn list_owned(backend: &dyn Backend) -> Result<Vec<(String, Owner)>, BackendError> {
        Ok(backend
            .list_nwfilters()?
            .into_iter()
            .map(|f| (f.name, f.owner))
            .collect())
    }

    fn used_by(pool: &VmPoolSpec, name: &str) -> bool {
        pool.template
            .network
            .attachment()
            .is_some_and(|a| a.filter_ref == name)
    }

    fn is_ready(status: &NetworkFilterStatus) -> bool {
        status.phase == NetworkFilterPhase::Ready
    }

    fn set_ready(status: &mut NetworkFilterStatus, ready: bool) {
        status.phase = if ready {
            NetworkFilterPhase::Ready
        } else {
            NetworkFilterPhase::Failed
        };
    }

    fn observed_generation(status: &mut NetworkFilterStatus) -> &mut Option<i64> {
        &mut status.observed_generation
    }

    fn libvirt_name(status: &mut NetworkFilterStatus) -> &mut Option<String> {
        &mut status.libvirt_name
    }

    fn conditions(status: &mut NetworkFilterStatus) -> &mut Vec<Condition> {
        &mut status.conditions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcilers::testutil::*;
    use agentvm_api::Kind;
    use agentvm_backend::fake::{FakeBackend, Op};

    const FILTER: &str = "apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {name: egress}\nspec:\n  egress:\n    - {protocol: tcp, ports: [443]}\n";

    #[test]
    fn defines_recreates_and_redefines() {
        let t = Setup::new();
        t.apply(FILTER);
        let r = NetworkFilterReconciler::new(t.backend());
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        let s = t.status(Kind::NetworkFilter, "egress");
        assert_eq!(s["phase"], "Ready");
        assert_eq!(cond(&s, "Ready"), ("True".into(), "Defined".into()));
        t.fake.remove_filter_by_hand("agentvm-egress");
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        let before = t.fake.filters()["agentvm-egress"].clone().unwrap();
        t.apply(&FILTER.replace("443", "8443"));
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        let after = t.fake.filters()["agentvm-egress"].clone().unwrap();
        assert_ne!(before.spec_hash, after.spec_hash);
    }

    #[test]
    fn failure_then_deletion_order() {
        let t = Setup::new();
        t.apply(FILTER);
        t.apply(&attached_pool("p", "lan", "egress"));
        let r = NetworkFilterReconciler::new(t.backend());
        t.fake.fail_next(
            Op::EnsureNwFilter,
            FakeBackend::libvirt_error("no nwfilter driver"),
        );
        assert_eq!(
            t.reconcile(&r, Kind::NetworkFilter, "egress")
                .unwrap_err()
                .reason,
            "LibvirtError"
        );
        assert_eq!(t.status(Kind::NetworkFilter, "egress")["phase"], "Failed");
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        t.store
            .request_delete(Kind::NetworkFilter, "egress", None)
            .unwrap();
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        let s = t.status(Kind::NetworkFilter, "egress");
        assert_eq!(cond(&s, "Degraded"), ("True".into(), "InUse".into()));
        assert!(t.fake.filters().contains_key("agentvm-egress"));
        t.store.request_delete(Kind::VmPool, "p", None).unwrap();
        t.store.finalize_delete(Kind::VmPool, "p").unwrap();
        t.fake
            .fail_next(Op::DeleteNwFilter, FakeBackend::libvirt_error("busy"));
        assert!(t.reconcile(&r, Kind::NetworkFilter, "egress").is_err());
        assert!(t
            .store
            .get(Kind::NetworkFilter, "egress")
            .unwrap()
            .is_some());
        t.reconcile(&r, Kind::NetworkFilter, "egress").unwrap();
        assert!(t.fake.filters().is_empty());
        assert!(t
            .store
            .get(Kind::NetworkFilter, "egress")
            .unwrap()
            .is_none());
    }
}
