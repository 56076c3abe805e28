//! `Network` → a libvirt network named `agentvm-<name>`, defined and running with the spec's
//! hash in its ownership metadata: the network's [`LibvirtObject`] for the generic
//! [`OwnedObjectReconciler`].
//!
//! Every pass ensures the network (redefined when the spec hash differs, recreated when it
//! was removed by hand, restarted when stopped by hand). Deletion waits while any `VmPool`
//! still refers to the network (`Degraded`/`InUse`), then undefines it and finalizes.

use agentvm_api::{Condition, NetworkPhase, NetworkStatus, Reason, Resource, VmPoolSpec};
use agentvm_backend::backend::EnsureOutcome;
use agentvm_backend::netxml::NetworkDef;
use agentvm_backend::{Backend, BackendError, Owner};

use super::owned::{LibvirtObject, OwnedObjectReconciler};

/// A libvirt network, as owned by a `Network`.
pub struct LibvirtNetwork;

/// Reconciles `Network` objects into libvirt networks.
pub type NetworkReconciler = OwnedObjectReconciler<LibvirtNetwork>;

impl LibvirtObject for LibvirtNetwork {
    type Status = NetworkStatus;
    type Def = NetworkDef;
    const NOUN: &'static str = "network";
    const READY_REASON: Reason = Reason::Active;
    const READY_STATE: &'static str = "defined and running";

    fn definition(resource: &Resource, name: String, owner: Owner) -> Option<NetworkDef> {
        let Resource::Network(net) = resource else {
            return None;
        };
        Some(NetworkDef {
            name,
            spec: net.spec.clone(),
            owner,
        })
    }

    fn ensure(backend: &dyn Backend, def: &NetworkDef) -> Result<EnsureOutcome, BackendError> {
        backend.ensure_network(def)
    }

    fn undefine(backend: &dyn Backend, name: &str) -> Result<(), BackendError> {
        backend.delete_network(name)
    }

    fn list_owned(backend: &dyn Backend) -> Result<Vec<(String, Owner)>, BackendError> {
        Ok(backend
            .list_networks()?
            .into_iter()
            .map(|n| (n.name, n.owner))
            .collect())
    }

    fn used_by(pool: &VmPoolSpec, name: &str) -> bool {
        pool.template
            .network
            .attachment()
            .is_some_and(|a| a.network_ref == name)
    }

    fn is_ready(status: &NetworkStatus) -> bool {
        status.phase == NetworkPhase::Ready
    }

    fn set_ready(status: &mut NetworkStatus, ready: bool) {
        status.phase = if ready {
            NetworkPhase::Ready
        } else {
            NetworkPhase::Failed
        };
    }

    fn ensured(status: &mut NetworkStatus, def: &NetworkDef) {
        status.bridge = Some(def.bridge());
    }

    fn observed_generation(status: &mut NetworkStatus) -> &mut Option<i64> {
        &mut status.observed_generation
    }

    fn libvirt_name(status: &mut NetworkStatus) -> &mut Option<String> {
        &mut status.libvirt_name
    }

    fn conditions(status: &mut NetworkStatus) -> &mut Vec<Condition> {
        &mut status.conditions
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::Action;
    use crate::reconcilers::testutil::*;
    use agentvm_api::Kind;
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
