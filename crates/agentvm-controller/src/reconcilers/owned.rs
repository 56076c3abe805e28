//! The reconciler of kinds that are one owned libvirt object each (`Network` → a libvirt
//! network, `NetworkFilter` → an nwfilter): [`OwnedObjectReconciler`] over a
//! [`LibvirtObject`], which says how to define, start, list and undefine that object type.
//!
//! Every pass ensures the object, named `agentvm-<name>` with the spec's hash in its
//! ownership metadata: redefined when the hash differs, recreated when it was removed by
//! hand, started when stopped by hand; a repair of an object that was `Ready` at this
//! generation is audited as drift. A failure is `Failed` with `Degraded` (through the error
//! policy). Deletion waits while any `VmPool` still refers to the object (`Degraded`/`InUse`),
//! then undefines it and finalizes.

use std::marker::PhantomData;
use std::sync::Arc;

use agentvm_api::{Condition, Kind, KindStatus, Reason, Resource, VmPoolSpec};
use agentvm_backend::backend::EnsureOutcome;
use agentvm_backend::netxml::libvirt_name;
use agentvm_backend::{Backend, BackendError, Owner};

use super::{backend_error, owner_of, pools_using, status_of, write_status, Conditions};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use agentvm_store::StoredObject;

/// A libvirt object type that one object of a kind owns: how to define, start, list and
/// undefine it, and the parts of the kind's status the reconciler fills in.
pub trait LibvirtObject: Send + Sync + 'static {
    /// The kind's status ([`KindStatus::KIND`] is the kind reconciled).
    type Status: KindStatus;
    /// The libvirt definition of one object.
    type Def;
    /// What libvirt calls this type, in messages and logs: `network`, `nwfilter`.
    const NOUN: &'static str;
    /// The `Ready` condition's reason once ensured.
    const READY_REASON: Reason;
    /// How the `Ready` message describes the ensured object: `defined and running`.
    const READY_STATE: &'static str;

    /// The definition of `resource` (an object of the kind) as libvirt object `name`,
    /// stamped with `owner`; `None` when `resource` is of another kind.
    fn definition(resource: &Resource, name: String, owner: Owner) -> Option<Self::Def>;
    /// Defines it (redefines it when its spec hash differs) and starts it if it runs.
    fn ensure(backend: &dyn Backend, def: &Self::Def) -> Result<EnsureOutcome, BackendError>;
    /// Stops and undefines the libvirt object `name` (it must be owned).
    fn undefine(backend: &dyn Backend, name: &str) -> Result<(), BackendError>;
    /// The owned objects of this type in libvirt: name and ownership metadata.
    fn list_owned(backend: &dyn Backend) -> Result<Vec<(String, Owner)>, BackendError>;
    /// True when `pool` attaches its VMs to the object named `name`.
    fn used_by(pool: &VmPoolSpec, name: &str) -> bool;

    /// The status says `Ready`.
    fn is_ready(status: &Self::Status) -> bool;
    /// Sets the phase: `Ready`, or `Failed`.
    fn set_ready(status: &mut Self::Status, ready: bool);
    /// Fills in what `def` tells about the ensured object (e.g. a network's bridge).
    fn ensured(_status: &mut Self::Status, _def: &Self::Def) {}
    /// `observedGeneration`.
    fn observed_generation(status: &mut Self::Status) -> &mut Option<i64>;
    /// `libvirtName`.
    fn libvirt_name(status: &mut Self::Status) -> &mut Option<String>;
    /// `conditions`.
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition>;
}

/// Reconciles the objects of `T::Status::KIND` into owned libvirt objects; see the module
/// docs.
pub struct OwnedObjectReconciler<T> {
    backend: Arc<dyn Backend>,
    object: PhantomData<fn() -> T>,
}

impl<T: LibvirtObject> OwnedObjectReconciler<T> {
    /// A reconciler acting through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            object: PhantomData,
        }
    }

    fn delete(
        &self,
        ctx: &Ctx,
        obj: &StoredObject,
        status: &mut T::Status,
        lname: &str,
    ) -> Result<Action, ReconcileError> {
        let name = obj.resource.name();
        let users = pools_using(ctx, |p| T::used_by(p, name))?;
        let was_ready = T::is_ready(status);
        super::delete_when_unused(
            ctx,
            obj,
            status,
            T::conditions,
            was_ready,
            users,
            &format!("{} {lname}", T::NOUN),
            || T::undefine(self.backend.as_ref(), lname),
        )
    }
}

impl<T: LibvirtObject> Reconciler for OwnedObjectReconciler<T> {
    fn kind(&self) -> Kind {
        T::Status::KIND
    }

    fn watches(&self) -> &[Kind] {
        // A pool going away may unblock a deletion.
        &[Kind::VmPool]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let lname = libvirt_name(obj.resource.name());
        let Some(def) = T::definition(&obj.resource, lname.clone(), owner_of(&obj)) else {
            return Err(super::wrong_kind(&obj, T::Status::KIND));
        };
        let mut status: T::Status = status_of(&obj);
        // Ready at this generation before this pass: a change found now is drift.
        let was_ready_here =
            T::is_ready(&status) && *T::observed_generation(&mut status) == Some(obj.generation());
        *T::libvirt_name(&mut status) = Some(lname.clone());
        *T::observed_generation(&mut status) = Some(obj.generation());

        if obj.is_deleting() {
            return self.delete(ctx, &obj, &mut status, &lname);
        }

        match T::ensure(self.backend.as_ref(), &def) {
            Ok(outcome) => {
                super::drift_check(ctx, &obj, was_ready_here, outcome);
                if outcome != EnsureOutcome::Unchanged {
                    tracing::info!(name = %lname, ?outcome, "{} ensured", T::NOUN);
                }
                T::set_ready(&mut status, true);
                T::ensured(&mut status, &def);
                Conditions(T::conditions(&mut status)).ready(
                    T::READY_REASON,
                    format!("libvirt {} {lname} is {}", T::NOUN, T::READY_STATE),
                );
                write_status(ctx, &obj, &status)?;
                Ok(Action::AwaitChange)
            }
            Err(e) => {
                T::set_ready(&mut status, false);
                Err(backend_error(&format!("ensuring {} {lname}", T::NOUN), &e)
                    .with_status(&obj, &status))
            }
        }
    }
}
