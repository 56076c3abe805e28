//! `NetworkFilter` → a libvirt nwfilter named `agentvm-<name>` with the spec's hash in its
//! ownership record.
//!
//! Every pass ensures the filter (redefined when the spec hash differs, which libvirt applies
//! to running guests at once; recreated when removed by hand). Deletion waits while any
//! `VmPool` still refers to it (`Degraded`/`InUse`), then undefines it and finalizes.

use std::sync::Arc;

use agentvm_api::{Kind, NetworkFilterPhase, NetworkFilterStatus, Reason, Resource};
use agentvm_backend::netxml::{libvirt_name, NwFilterDef};
use agentvm_backend::Backend;

use super::{backend_error, owner_of, pools_using, status_of, write_status, Conditions};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use crate::store::StoredObject;

/// Reconciles `NetworkFilter` objects into libvirt nwfilters.
pub struct NetworkFilterReconciler {
    backend: Arc<dyn Backend>,
}

impl NetworkFilterReconciler {
    /// A reconciler acting through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

impl Reconciler for NetworkFilterReconciler {
    fn kind(&self) -> Kind {
        Kind::NetworkFilter
    }

    fn watches(&self) -> &[Kind] {
        &[Kind::VmPool]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::NetworkFilter(filter) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::NetworkFilter));
        };
        let name = filter.name();
        let lname = libvirt_name(name);
        let mut status: NetworkFilterStatus = status_of(&obj);
        // Ready at this generation before this pass: a change found now is drift.
        let was_ready_here = status.phase == NetworkFilterPhase::Ready
            && status.observed_generation == Some(obj.generation());
        status.libvirt_name = Some(lname.clone());
        status.observed_generation = Some(obj.generation());

        if obj.is_deleting() {
            let users = pools_using(ctx, |p| {
                p.template
                    .network
                    .attachment()
                    .is_some_and(|a| a.filter_ref == name)
            })?;
            let was_ready = status.phase == NetworkFilterPhase::Ready;
            return super::delete_when_unused(
                ctx,
                &obj,
                &mut status,
                |s: &mut NetworkFilterStatus| &mut s.conditions,
                was_ready,
                users,
                &format!("nwfilter {lname}"),
                || self.backend.delete_nwfilter(&lname),
            );
        }

        let def = NwFilterDef {
            name: lname.clone(),
            spec: filter.spec.clone(),
            owner: owner_of(&obj),
        };
        match self.backend.ensure_nwfilter(&def) {
            Ok(outcome) => {
                super::drift_check(ctx, &obj, was_ready_here, outcome);
                tracing::debug!(nwfilter = %lname, ?outcome, "nwfilter ensured");
                status.phase = NetworkFilterPhase::Ready;
                Conditions(&mut status.conditions).ready(
                    Reason::Defined,
                    format!("libvirt nwfilter {lname} is defined"),
                );
                write_status(ctx, &obj, &status)?;
                Ok(Action::AwaitChange)
            }
            Err(e) => {
                status.phase = NetworkFilterPhase::Failed;
                Err(backend_error(&format!("ensuring nwfilter {lname}"), &e)
                    .with_status(&obj, &status))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcilers::testutil::*;
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
