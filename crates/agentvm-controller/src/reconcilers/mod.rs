//! The per-kind reconcilers (`Network` and `NetworkFilter` on the generic owned-object
//! reconciler, `Image`, `VmPool`, `Sandbox`, `Snapshot`, `AgentRun`), the pool
//! registry they share with the run scheduler, and the garbage collector of owned libvirt
//! objects that no stored object declares any more.
//!
//! Each reconciler is an idempotent function of (object, actual state read from the
//! [`Backend`] on every pass) → backend actions + status. Status always carries `phase`,
//! `observedGeneration` and the conditions `Ready`, `Progressing` and `Degraded` with
//! CamelCase reasons. A backend failure is returned as a [`ReconcileError`] carrying the
//! status the pass computed ([`ReconcileError::with_status`]); the default error policy
//! ([`crate::reconcile::show_failure`]) writes it with `Degraded` and the dispatcher retries
//! with backoff.

use std::sync::Arc;
use std::time::Duration;

use agentvm_api::{set_condition, Condition, ConditionStatus, Kind, KindStatus, Reason, Resource};
use agentvm_backend::{Backend, BackendError, Owner};

use crate::reconcile::{Ctx, FailedStatus, ReconcileError};
use crate::Controller;
use agentvm_api::time::Timestamp;
use agentvm_store::{StoreError, StoredObject};

pub mod agent_run;
pub mod gc;
pub mod image;
pub mod network;
pub mod network_filter;
pub mod owned;
pub mod registry;
pub mod sandbox;
pub mod snapshot;
pub mod vm_pool;

pub use agent_run::AgentRunReconciler;
pub use gc::GarbageCollector;
pub use image::{ImageBuilder, ImageCache, ImageReconciler};
pub use network::NetworkReconciler;
pub use network_filter::NetworkFilterReconciler;
pub use owned::{LibvirtObject, OwnedObjectReconciler};
pub use registry::{PoolRegistry, PoolVm, VmPhase};
pub use sandbox::{SandboxReconciler, Sandboxes};
pub use snapshot::SnapshotReconciler;
pub use vm_pool::VmPoolReconciler;

/// Condition type: the object is usable.
pub const READY: &str = "Ready";
/// Condition type: the controller is working towards the desired state.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something failed; the reason and message say what.
pub const DEGRADED: &str = "Degraded";

/// Registers the seven reconcilers (`AgentRun`, `Sandbox` and `Snapshot` included) and the garbage
/// collector on `controller`, all on `backend`; `registry` is shared with whoever hands out
/// pool VMs. The API serves exec into sandboxes through the same backend.
pub fn register(
    controller: Controller,
    backend: Arc<dyn Backend>,
    registry: Arc<PoolRegistry>,
    images: Arc<dyn ImageBuilder>,
) -> Controller {
    let sandboxes = Arc::new(Sandboxes::new());
    controller
        .sandboxes(backend.clone(), sandboxes.clone())
        .reconciler(Arc::new(SandboxReconciler::new(
            backend.clone(),
            registry.clone(),
            sandboxes.clone(),
        )))
        .reconciler(Arc::new(SnapshotReconciler::new(backend.clone())))
        .reconciler(Arc::new(NetworkReconciler::new(backend.clone())))
        .reconciler(Arc::new(NetworkFilterReconciler::new(backend.clone())))
        .reconciler(Arc::new(ImageReconciler::new(images)))
        .reconciler(Arc::new(VmPoolReconciler::new(
            backend.clone(),
            registry.clone(),
        )))
        .reconciler(Arc::new(
            AgentRunReconciler::new(backend.clone(), registry).sandboxes(sandboxes),
        ))
        .sweeper(Arc::new(GarbageCollector::new(backend)))
}

/// A condition stamped now (the timestamp is kept when the status does not change).
pub(crate) fn condition(
    type_: &str,
    status: bool,
    reason: Reason,
    message: impl Into<String>,
) -> Condition {
    Condition::new(
        type_,
        if status {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason,
        message,
        Some(Timestamp::now()),
    )
}

/// Sets `Ready`, `Progressing` and `Degraded` at once.
pub(crate) struct Conditions<'a>(pub &'a mut Vec<Condition>);

impl Conditions<'_> {
    pub(crate) fn set(
        &mut self,
        type_: &str,
        status: bool,
        reason: Reason,
        message: impl Into<String>,
    ) {
        set_condition(self.0, condition(type_, status, reason, message));
    }

    /// Ready and stable.
    pub(crate) fn ready(&mut self, reason: Reason, message: impl Into<String>) {
        self.set(READY, true, reason, message);
        self.set(PROGRESSING, false, Reason::Reconciled, "");
        self.set(DEGRADED, false, Reason::Reconciled, "");
    }

    /// Not ready yet, working on it (or waiting for something).
    pub(crate) fn progressing(&mut self, reason: Reason, message: impl Into<String>) {
        let message = message.into();
        self.set(READY, false, reason, message.clone());
        self.set(PROGRESSING, true, reason, message);
        self.set(DEGRADED, false, Reason::Reconciled, "");
    }

    /// Failed: `Degraded` with the error; `Ready` keeps `ready_still` (a degraded network
    /// may still be up).
    pub(crate) fn degraded(&mut self, err: &ReconcileError, ready_still: bool) {
        if !ready_still {
            self.set(READY, false, err.reason, err.message.clone());
        }
        self.set(PROGRESSING, false, err.reason, "");
        self.set(DEGRADED, true, err.reason, err.message.clone());
    }
}

/// A backend failure as a reconcile error with a short reason label.
pub(crate) fn backend_error(doing: &str, e: &BackendError) -> ReconcileError {
    let reason = match e {
        BackendError::NotFound { .. } => Reason::NotFound,
        BackendError::AlreadyExists { .. } => Reason::AlreadyExists,
        BackendError::NotOwned { .. } => Reason::NotOwned,
        BackendError::GuestAgentUnavailable { .. } => Reason::GuestAgentUnavailable,
        BackendError::VmNotRunning { .. } => Reason::VmNotRunning,
        BackendError::GuestCommand { .. } => Reason::GuestCommandFailed,
        BackendError::Timeout { .. } => Reason::Timeout,
        BackendError::Libvirt { .. } => Reason::LibvirtError,
        BackendError::Io { .. } => Reason::HostIoError,
        BackendError::Command { .. } => Reason::HostCommandFailed,
        BackendError::Protocol { .. } => Reason::ProtocolError,
        BackendError::DiskTooSmall { .. } => Reason::DiskTooSmall,
        BackendError::HostDiskFull { .. } => Reason::HostDiskFull,
        BackendError::Unsupported { .. } => Reason::Unsupported,
    };
    ReconcileError::new(reason, format!("{doing}: {e}"))
}

/// The kind's status of `obj` (default when there is none yet).
pub(crate) fn status_of<S: KindStatus>(obj: &StoredObject) -> S {
    S::of(&obj.resource).cloned().unwrap_or_default()
}

/// Writes `status` as the status of `obj`.
pub(crate) fn write_status<S: KindStatus>(
    ctx: &Ctx,
    obj: &StoredObject,
    status: &S,
) -> Result<(), ReconcileError> {
    ctx.store
        .update_status(obj.resource.name(), status.clone())?;
    Ok(())
}

/// Writes the status `shown` carries with `Degraded` set from `err` (the default error
/// policy's write), through the kind's typed [`crate::Store::update_status`].
pub(crate) fn write_degraded(
    ctx: &Ctx,
    shown: &FailedStatus,
    err: &ReconcileError,
) -> Result<bool, StoreError> {
    fn write<S: KindStatus>(
        ctx: &Ctx,
        shown: &FailedStatus,
        err: &ReconcileError,
        conditions: fn(&mut S) -> &mut Vec<Condition>,
    ) -> Result<bool, StoreError> {
        let mut status: S = S::of(&shown.resource).cloned().unwrap_or_default();
        Conditions(conditions(&mut status)).degraded(err, shown.keep_ready);
        ctx.store.update_status(shown.resource.name(), status)
    }
    use agentvm_api as api;
    match shown.resource.kind() {
        Kind::Network => write::<api::NetworkStatus>(ctx, shown, err, |s| &mut s.conditions),
        Kind::NetworkFilter => {
            write::<api::NetworkFilterStatus>(ctx, shown, err, |s| &mut s.conditions)
        }
        Kind::Image => write::<api::ImageStatus>(ctx, shown, err, |s| &mut s.conditions),
        Kind::VmPool => write::<api::VmPoolStatus>(ctx, shown, err, |s| &mut s.conditions),
        Kind::Sandbox => write::<api::SandboxStatus>(ctx, shown, err, |s| &mut s.conditions),
        Kind::Snapshot => write::<api::SnapshotStatus>(ctx, shown, err, |s| &mut s.conditions),
        Kind::AgentRun => write::<api::AgentRunStatus>(ctx, shown, err, |s| &mut s.conditions),
    }
}

/// `VmPool`s in the store (including those being deleted) for which `uses` holds.
pub(crate) fn pools_using(
    ctx: &Ctx,
    uses: impl Fn(&agentvm_api::VmPoolSpec) -> bool,
) -> Result<Vec<String>, ReconcileError> {
    Ok(ctx
        .cache
        .list(Some(Kind::VmPool))?
        .iter()
        .filter_map(|o| match &o.resource {
            Resource::VmPool(p) if uses(&p.spec) => Some(p.metadata.name.clone()),
            _ => None,
        })
        .collect())
}

/// How long a refused deletion waits before trying again (watches usually come first).
pub(crate) const IN_USE_RETRY: Duration = Duration::from_secs(5);

/// Deletes an object pools attach to (a network or a filter) finalizer-style: while any
/// `VmPool` in `users` still refers to it, the deletion waits (`Degraded`/`InUse`, retried);
/// then `delete` removes it from libvirt (`what` names it in errors) and the object is
/// finalized. `conditions` picks the status's conditions; `was_ready` keeps `Ready` true
/// while the object is still in service.
#[allow(clippy::too_many_arguments)]
pub(crate) fn delete_when_unused<S: KindStatus>(
    ctx: &Ctx,
    obj: &StoredObject,
    status: &mut S,
    conditions: fn(&mut S) -> &mut Vec<Condition>,
    was_ready: bool,
    users: Vec<String>,
    what: &str,
    delete: impl FnOnce() -> Result<(), BackendError>,
) -> Result<crate::reconcile::Action, ReconcileError> {
    if !users.is_empty() {
        let err = ReconcileError::new(
            Reason::InUse,
            format!(
                "deletion waits: still used by VmPool {}; delete those first",
                users.join(", ")
            ),
        );
        Conditions(conditions(status)).degraded(&err, was_ready);
        write_status(ctx, obj, status)?;
        return Ok(crate::reconcile::Action::Requeue(IN_USE_RETRY));
    }
    if let Err(e) = delete() {
        return Err(backend_error(&format!("deleting {what}"), &e).with_status(obj, status));
    }
    ctx.store
        .finalize_delete(obj.resource.kind(), obj.resource.name())?;
    Ok(crate::reconcile::Action::AwaitChange)
}

/// The ownership record stamped on the libvirt object made for `obj`: its kind, name, spec
/// hash and generation.
pub(crate) fn owner_of(obj: &StoredObject) -> Owner {
    Owner {
        kind: obj.resource.kind().into(),
        name: obj.resource.name().to_string(),
        spec_hash: agentvm_api::spec_hash(&obj.resource),
        generation: obj.generation(),
    }
}

fn wrong_kind(obj: &StoredObject, expected: Kind) -> ReconcileError {
    ReconcileError::new(
        Reason::WrongKind,
        format!("{} given to the {expected} reconciler", obj.key()),
    )
}

#[cfg(test)]
pub(crate) mod testutil;

/// Writes a `drift_repaired` audit event when ensuring an object that was `Ready` at this
/// generation had to create or redefine it in libvirt (it was deleted or changed by hand).
/// `was_ready`: the stored status says `Ready` at the object's generation.
pub(crate) fn drift_check(
    ctx: &Ctx,
    obj: &StoredObject,
    was_ready: bool,
    outcome: agentvm_backend::backend::EnsureOutcome,
) {
    use agentvm_backend::backend::EnsureOutcome;
    if outcome == EnsureOutcome::Unchanged || !was_ready {
        return;
    }
    let what = match outcome {
        EnsureOutcome::Created => "recreated (it was missing from libvirt)",
        _ => "redefined (its libvirt definition was changed)",
    };
    let (kind, name) = (obj.resource.kind(), obj.resource.name());
    tracing::warn!(%kind, name, "drift repaired: {what}");
    ctx.audit.record(
        crate::audit::AuditEvent::new(
            crate::audit::AuditEventType::DriftRepaired,
            kind,
            name,
            "controller",
        )
        .details(serde_json::json!({ "repair": what })),
    );
}
