//! `Network` → a libvirt network named `agentvm-<name>`, defined and running with the spec's
//! hash in its ownership metadata.
//!
//! Every pass ensures the network (redefined when the spec hash differs, recreated when it
//! was removed by hand, restarted when stopped by hand). Deletion waits while any `VmPool`
//! still refers to the network (`Degraded`/`InUse`), then undefines it and finalizes.

use std::sync::Arc;

use agentvm_api::{Kind, NetworkPhase, NetworkStatus, Reason, Resource};
use agentvm_backend::backend::EnsureOutcome;
use agentvm_backend::netxml::{libvirt_name, NetworkDef};
use agentvm_backend::Backend;

use super::{backend_error, owner_of, pools_using, status_of, write_status, Conditions};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use crate::store::StoredObject;

/// Reconciles `Network` objects into libvirt networks.
pub struct NetworkReconciler {
    backend: Arc<dyn Backend>,
}

impl NetworkReconciler {
    /// A reconciler acting through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }
}

impl Reconciler for NetworkReconciler {
    fn kind(&self) -> Kind {
        Kind::Network
    }

    fn watches(&self) -> &[Kind] {
        // A pool going away may unblock a deletion.
        &[Kind::VmPool]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::Network(net) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::Network));
        };
        let name = net.name();
        let lname = libvirt_name(name);
        let mut status: NetworkStatus = status_of(&obj);
        // Ready at this generation before this pass: a change found now is drift.
        let was_ready_here = status.phase == NetworkPhase::Ready
            && status.observed_generation == Some(obj.generation());
        status.libvirt_name = Some(lname.clone());
        status.observed_generation = Some(obj.generation());

        if obj.is_deleting() {
            let users = pools_using(ctx, |p| {
                p.template
                    .network
                    .attachment()
                    .is_some_and(|a| a.network_ref == name)
            })?;
            let was_ready = status.phase == NetworkPhase::Ready;
            return super::delete_when_unused(
                ctx,
                &obj,
                &mut status,
                |s: &mut NetworkStatus| &mut s.conditions,
                was_ready,
                users,
                &format!("network {lname}"),
                || self.backend.delete_network(&lname),
            );
        }

        let def = NetworkDef {
            name: lname.clone(),
            spec: net.spec.clone(),
            owner: owner_of(&obj),
        };
        match self.backend.ensure_network(&def) {
            Ok(outcome) => {
                super::drift_check(ctx, &obj, was_ready_here, outcome);
                if outcome != EnsureOutcome::Unchanged {
                    tracing::info!(network = %lname, ?outcome, "network ensured");
                }
                status.phase = NetworkPhase::Ready;
                status.bridge = Some(def.bridge());
                Conditions(&mut status.conditions).ready(
                    Reason::Active,
                    format!("libvirt network {lname} is defined and running"),
                );
                write_status(ctx, &obj, &status)?;
                Ok(Action::AwaitChange)
            }
            Err(e) => {
                status.phase = NetworkPhase::Failed;
                Err(backend_error(&format!("ensuring network {lname}"), &e)
                    .with_status(&obj, &status))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcilers::testutil::*;
    use agentvm_backend::fake::Op;

    const NET: &str = "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {name: lan}\nspec: {mode: nat, subnet: 10.80.0.0/24}\n";

    #[test]
    fn creates_then_is_idempotent_and_redefines_on_spec_change() {
        let t = Setup::new();
        t.apply(NET);
        let r = NetworkReconciler::new(t.backend());
        assert_eq!(
            t.reconcile(&r, Kind::Network, "lan").unwrap(),
            Action::AwaitChange
        );
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        assert_eq!(
            t.fake.mutations(),
            ["EnsureNetwork(agentvm-lan)", "EnsureNetwork(agentvm-lan)"]
        );
        let s = t.status(Kind::Network, "lan");
        assert_eq!(s["phase"], "Ready");
        assert_eq!(s["observedGeneration"], 1);
        assert_eq!(s["libvirtName"], "agentvm-lan");
        assert_eq!(cond(&s, "Ready"), ("True".into(), "Active".into()));
        assert_eq!(cond(&s, "Degraded").0, "False");
        let first = t.fake.networks()["agentvm-lan"].owner.clone().unwrap();
        t.apply(&NET.replace("10.80.0.0", "10.81.0.0"));
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        let second = t.fake.networks()["agentvm-lan"].owner.clone().unwrap();
        assert_ne!(first.spec_hash, second.spec_hash);
        assert_eq!(second.generation, 2);
        assert_eq!(t.status(Kind::Network, "lan")["observedGeneration"], 2);
    }

    #[test]
    fn recreates_a_network_removed_by_hand() {
        let mut t = Setup::new();
        let log = t.ctx.config.state_dir.join("audit.log");
        t.ctx.audit = crate::audit::AuditLog::open(&log, 1 << 20, 1).unwrap();
        t.apply(NET);
        let r = NetworkReconciler::new(t.backend());
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        // Creating it the first time is no drift; an unchanged pass neither.
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        assert!(!std::fs::read_to_string(&log)
            .unwrap()
            .contains("drift_repaired"));
        t.fake.remove_network_by_hand("agentvm-lan");
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        assert!(t.fake.networks()["agentvm-lan"].active);
        let audit = std::fs::read_to_string(&log).unwrap();
        let drift: Vec<serde_json::Value> = audit
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|e| e["event_type"] == "drift_repaired")
            .collect();
        assert_eq!(drift.len(), 1, "{audit}");
        assert_eq!(drift[0]["kind"], "Network");
        assert_eq!(drift[0]["name"], "lan");
        assert!(drift[0]["details"]["repair"]
            .as_str()
            .unwrap()
            .contains("recreated"));
    }

    #[test]
    fn backend_failure_is_degraded_and_an_error() {
        let t = Setup::new();
        t.apply(NET);
        let r = NetworkReconciler::new(t.backend());
        t.fake.fail_next(
            Op::EnsureNetwork,
            agentvm_backend::fake::FakeBackend::libvirt_error("boom"),
        );
        let err = t.reconcile(&r, Kind::Network, "lan").unwrap_err();
        assert_eq!(err.reason, "LibvirtError");
        let s = t.status(Kind::Network, "lan");
        assert_eq!(s["phase"], "Failed");
        assert_eq!(cond(&s, "Degraded"), ("True".into(), "LibvirtError".into()));
        assert!(s["conditions"].to_string().contains("boom"));
        // The next pass recovers.
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        let s = t.status(Kind::Network, "lan");
        assert_eq!(s["phase"], "Ready");
        assert_eq!(cond(&s, "Degraded").0, "False");
    }

    #[test]
    fn a_foreign_network_of_the_same_name_is_not_taken_over() {
        let t = Setup::new();
        t.fake.add_foreign_network("agentvm-lan");
        t.apply(NET);
        let r = NetworkReconciler::new(t.backend());
        assert_eq!(
            t.reconcile(&r, Kind::Network, "lan").unwrap_err().reason,
            "NotOwned"
        );
        assert!(t.fake.networks()["agentvm-lan"].owner.is_none());
    }

    #[test]
    fn deletion_waits_for_pools_using_the_network() {
        let t = Setup::new();
        t.apply(NET);
        t.apply(&attached_pool("p", "lan", "egress"));
        let r = NetworkReconciler::new(t.backend());
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        t.store.request_delete(Kind::Network, "lan", None).unwrap();
        assert_eq!(
            t.reconcile(&r, Kind::Network, "lan").unwrap(),
            Action::Requeue(crate::reconcilers::IN_USE_RETRY)
        );
        let s = t.status(Kind::Network, "lan");
        assert_eq!(cond(&s, "Degraded"), ("True".into(), "InUse".into()));
        assert!(t.fake.networks().contains_key("agentvm-lan"));
        // The pool goes: the network follows.
        t.store.request_delete(Kind::VmPool, "p", None).unwrap();
        t.store.finalize_delete(Kind::VmPool, "p").unwrap();
        t.reconcile(&r, Kind::Network, "lan").unwrap();
        assert!(t.fake.networks().is_empty());
        assert!(t.store.get(Kind::Network, "lan").unwrap().is_none());
    }
}
