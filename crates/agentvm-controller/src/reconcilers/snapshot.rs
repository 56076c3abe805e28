//! `Snapshot` → an internal snapshot (memory and disk, or with `memory: false` the disk
//! alone, taken with the guest's file systems frozen) of its sandbox's VM.
//!
//! A pending snapshot waits until its sandbox runs (or is paused), then is taken once; a
//! sandbox at `maxSnapshots` fails it (`SnapshotLimit`). A taken snapshot is checked on
//! every pass: one gone from its VM (the VM was deleted, or the snapshot by hand) is
//! `Failed` (`SnapshotLost`). One found in the VM but not recorded (the controller stopped
//! between taking and recording it) is adopted, never taken twice. Deletion removes it from
//! the VM, freeing its space, then
//! finalizes; deleting the sandbox deletes its snapshots.

use std::sync::Arc;
use std::time::Duration;

use agentvm_api::{
    Kind, Reason, Resource, SandboxPhase, SandboxStatus, Snapshot, SnapshotPhase, SnapshotStatus,
};
use agentvm_backend::Backend;

use super::{backend_error, status_of, write_status, Conditions};
use crate::audit::{AuditEvent, AuditEventType};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use agentvm_api::time::Timestamp;
use agentvm_store::StoredObject;

/// Recheck delay while waiting for the sandbox.
const WAITING: Duration = Duration::from_secs(2);
/// How often a taken snapshot is checked.
const CHECK: Duration = Duration::from_secs(30);

/// Reconciles `Snapshot` objects; see the module docs.
pub struct SnapshotReconciler {
    backend: Arc<dyn Backend>,
}

impl SnapshotReconciler {
    /// A reconciler acting through `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self { backend }
    }

    fn delete(
        &self,
        obj: &StoredObject,
        snap: &Snapshot,
        ctx: &Ctx,
    ) -> Result<Action, ReconcileError> {
        let status: SnapshotStatus = status_of(obj);
        if let Some(vm) = &status.vm {
            match self.backend.delete_vm_snapshot(vm, snap.name()) {
                Ok(()) => {}
                // The VM went first (its snapshots with it).
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(backend_error(&format!("deleting snapshot of {vm}"), &e)),
            }
        }
        ctx.store.finalize_delete(Kind::Snapshot, snap.name())?;
        ctx.wake.add(agentvm_store::ObjectKey::new(
            Kind::Sandbox,
            snap.spec.sandbox_ref.clone(),
        ));
        Ok(Action::AwaitChange)
    }

    /// The snapshots (objects, any phase but `Failed`) of sandbox `sandbox`, other than `name`.
    /// The `Ready` snapshots of `sandbox` other than `name`: how many, and the bytes of
    /// memory and device state they hold together.
    fn siblings(ctx: &Ctx, sandbox: &str, name: &str) -> Result<(usize, u64), ReconcileError> {
        let mut count = 0;
        let mut bytes = 0;
        for o in ctx.store.list(Some(Kind::Snapshot))? {
            let Resource::Snapshot(s) = &o.resource else {
                continue;
            };
            let Some(st) = s.status.as_ref() else {
                continue;
            };
            if s.spec.sandbox_ref == sandbox && s.name() != name && st.phase == SnapshotPhase::Ready
            {
                count += 1;
                bytes += st.memory_bytes.unwrap_or(0);
            }
        }
        Ok((count, bytes))
    }

    /// With snapshot `name` of `vm` holding `bytes`, are sandbox `sandbox`'s snapshots past
    /// its `maxSnapshotMib`? Then the snapshot is deleted again (so the limit holds on disk)
    /// and the error to fail it with is returned.
    fn past_byte_limit(
        &self,
        sandbox: &str,
        limits: Limits,
        others_bytes: u64,
        bytes: Option<u64>,
        vm: &str,
        name: &str,
    ) -> Result<Option<ReconcileError>, ReconcileError> {
        let Some(mib) = limits.max_snapshot_mib else {
            return Ok(None);
        };
        let bytes = bytes.unwrap_or(0);
        let total = others_bytes + bytes;
        if total <= u64::from(mib) << 20 {
            return Ok(None);
        }
        self.backend
            .delete_vm_snapshot(vm, name)
            .map_err(|e| backend_error(&format!("deleting snapshot {name} of {vm}"), &e))?;
        Ok(Some(ReconcileError::new(
            Reason::SnapshotLimit,
            format!(
                "Sandbox {sandbox}'s snapshots would hold {} MiB with this one ({} MiB), past its maxSnapshotMib of {mib}; it was deleted again. Delete a snapshot (or raise maxSnapshotMib) and apply this snapshot again",
                total >> 20,
                bytes >> 20,
            ),
        )))
    }
}

impl Reconciler for SnapshotReconciler {
    fn kind(&self) -> Kind {
        Kind::Snapshot
    }

    fn watches(&self) -> &[Kind] {
        &[Kind::Sandbox]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::Snapshot(snap) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::Snapshot));
        };
        if obj.is_deleting() {
            return self.delete(&obj, snap, ctx);
        }
        let name = snap.name();
        let mut status: SnapshotStatus = status_of(&obj);
        let before = status.clone();
        status.observed_generation = Some(obj.generation());
        let write = |status: &SnapshotStatus| -> Result<(), ReconcileError> {
            if *status != before {
                write_status(ctx, &obj, status)?;
            }
            Ok(())
        };
        match status.phase {
            SnapshotPhase::Failed => {
                write(&status)?;
                return Ok(Action::AwaitChange);
            }
            SnapshotPhase::Ready => {
                let vm = status.vm.clone().unwrap_or_default();
                let lost = self.lost(name, &vm)?;
                if let Some(why) = lost {
                    status.phase = SnapshotPhase::Failed;
                    let err = ReconcileError::new(Reason::SnapshotLost, why);
                    Conditions(&mut status.conditions).degraded(&err, false);
                }
                write(&status)?;
                return Ok(Action::Requeue(CHECK));
            }
            SnapshotPhase::Pending => {}
        }

        self.take(&obj, snap, status, &before, ctx)
    }
}

/// The `Ready` message of a snapshot of `vm` just taken.
fn taken_message(
    vm: &str,
    taken: &agentvm_backend::backend::SnapshotTaken,
    memory: bool,
) -> String {
    let ms = taken.pause.as_millis();
    match (memory, taken.fs_frozen) {
        (true, _) => format!("memory and disk of {vm}; the guest was stopped {ms} ms for it"),
        (false, true) => format!(
            "disk of {vm} alone (no memory: a rollback boots the sandbox afresh, and it cannot be forked); the guest's file systems were frozen {ms} ms for it"
        ),
        (false, false) => format!(
            "disk of {vm} alone (no memory: a rollback boots the sandbox afresh, and it cannot be forked); its vCPUs were stopped {ms} ms for it (it was paused, or its guest agent could not freeze its file systems)"
        ),
    }
}

/// Why a snapshot waits for its sandbox: the `Progressing` reason and message.
type WaitsFor = (Reason, String);

/// A sandbox's limits on its snapshots.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `maxSnapshots`.
    max_snapshots: u32,
    /// `maxSnapshotMib`.
    max_snapshot_mib: Option<u32>,
}

impl SnapshotReconciler {
    /// The VM of the snapshot's sandbox (with the sandbox's snapshot limits) once it is
    /// `Running` or `Paused` (and not being deleted); else why the snapshot waits: (reason,
    /// message), or `NotPermitted` when the snapshot's submitter is neither root nor the
    /// sandbox's owner (a sandbox holds its owner's work: only they and root may copy it, as
    /// for forks, execs and rollbacks).
    fn sandbox_vm(
        ctx: &Ctx,
        obj: &StoredObject,
        snap: &Snapshot,
    ) -> Result<Result<(String, Limits), WaitsFor>, ReconcileError> {
        let sandbox_ref = &snap.spec.sandbox_ref;
        let Some(sb_obj) = ctx.store.get(Kind::Sandbox, sandbox_ref)? else {
            return Ok(Err((
                Reason::SandboxNotFound,
                format!("Sandbox {sandbox_ref} does not exist"),
            )));
        };
        let Resource::Sandbox(sb) = &sb_obj.resource else {
            return Err(super::wrong_kind(&sb_obj, Kind::Sandbox));
        };
        let owner = sb_obj.submitter.as_ref().map_or(0, |c| c.uid);
        let by = obj.submitter.as_ref().map_or(0, |c| c.uid);
        if by != 0 && by != owner {
            let whose = sb_obj
                .submitter
                .as_ref()
                .map_or_else(|| "root".to_string(), |c| c.to_string());
            return Ok(Err((
                Reason::NotPermitted,
                format!(
                    "Sandbox {sandbox_ref} belongs to {whose}; only they and root may snapshot it"
                ),
            )));
        }
        let sb_status: SandboxStatus = sb.status.clone().unwrap_or_default();
        Ok(match (&sb_status.vm, sb_status.phase) {
            (Some(vm), SandboxPhase::Running | SandboxPhase::Paused) if !sb_obj.is_deleting() => {
                Ok((
                    vm.clone(),
                    Limits {
                        max_snapshots: sb.spec.max_snapshots,
                        max_snapshot_mib: sb.spec.max_snapshot_mib,
                    },
                ))
            }
            _ => Err((
                Reason::WaitingForSandbox,
                format!(
                    "waiting for Sandbox {sandbox_ref} to be Running or Paused (it is {})",
                    sb_status.phase.as_str()
                ),
            )),
        })
    }

    /// Why snapshot `name` of `vm` is gone, if it is.
    fn lost(&self, name: &str, vm: &str) -> Result<Option<String>, ReconcileError> {
        match self.backend.vm_snapshots(vm) {
            Ok(names) => Ok((!names.iter().any(|n| n == name))
                .then(|| format!("it is gone from VM {vm} (deleted by hand?)"))),
            Err(e) if e.is_not_found() => Ok(Some(format!(
                "its sandbox's VM {vm} is gone, and the snapshot with it"
            ))),
            Err(e) => Err(backend_error(&format!("listing snapshots of {vm}"), &e)),
        }
    }

    /// A `Pending` snapshot: waits for its sandbox to be `Running` or `Paused`, then takes
    /// it (or adopts one taken before a restart) within the sandbox's `maxSnapshots`.
    fn take(
        &self,
        obj: &StoredObject,
        snap: &Snapshot,
        mut status: SnapshotStatus,
        before: &SnapshotStatus,
        ctx: &Ctx,
    ) -> Result<Action, ReconcileError> {
        let name = snap.name();
        let write = |status: &SnapshotStatus| -> Result<(), ReconcileError> {
            if status != before {
                write_status(ctx, obj, status)?;
            }
            Ok(())
        };
        let sandbox_ref = &snap.spec.sandbox_ref;
        let (vm, limits) = match Self::sandbox_vm(ctx, obj, snap)? {
            Ok(found) => found,
            Err((Reason::NotPermitted, why)) => {
                status.phase = SnapshotPhase::Failed;
                let err = ReconcileError::new(Reason::NotPermitted, why);
                Conditions(&mut status.conditions).degraded(&err, false);
                write(&status)?;
                return Ok(Action::AwaitChange);
            }
            Err((reason, message)) => {
                Conditions(&mut status.conditions).progressing(reason, message);
                write(&status)?;
                return Ok(Action::Requeue(WAITING));
            }
        };
        // Taken by an earlier controller that stopped before recording it: adopted, not
        // taken twice.
        let existing = self
            .backend
            .vm_snapshots(&vm)
            .map_err(|e| backend_error(&format!("listing snapshots of {vm}"), &e))?;
        let (others, others_bytes) = Self::siblings(ctx, sandbox_ref, name)?;
        if existing.iter().any(|n| n == name) {
            // Its size counts against maxSnapshotMib like any other.
            let bytes = self
                .backend
                .vm_snapshot_bytes(&vm, name)
                .filter(|_| snap.spec.memory);
            if let Some(err) =
                self.past_byte_limit(sandbox_ref, limits, others_bytes, bytes, &vm, name)?
            {
                status.phase = SnapshotPhase::Failed;
                Conditions(&mut status.conditions).degraded(&err, false);
                write(&status)?;
                return Ok(Action::AwaitChange);
            }
            status.phase = SnapshotPhase::Ready;
            status.vm = Some(vm.clone());
            status.taken_at = Some(Timestamp::now());
            status.memory_bytes = bytes;
            status.disk_only = !snap.spec.memory;
            Conditions(&mut status.conditions).ready(
                Reason::Taken,
                format!("found in {vm}: taken before the controller restarted"),
            );
            write_status(ctx, obj, &status)?;
            return Ok(Action::Requeue(CHECK));
        }
        if others >= limits.max_snapshots as usize {
            status.phase = SnapshotPhase::Failed;
            let err = ReconcileError::new(
                Reason::SnapshotLimit,
                format!(
                    "Sandbox {sandbox_ref} has {others} snapshots, its maxSnapshots; delete one (or raise maxSnapshots) and apply this snapshot again"
                ),
            );
            Conditions(&mut status.conditions).degraded(&err, false);
            write(&status)?;
            return Ok(Action::AwaitChange);
        }
        let taken = match self.backend.snapshot_vm(&vm, name, snap.spec.memory) {
            Ok(t) => t,
            Err(e) => {
                return Err(
                    backend_error(&format!("snapshot of {vm}"), &e).with_status(obj, &status)
                );
            }
        };
        if let Some(err) = self.past_byte_limit(
            sandbox_ref,
            limits,
            others_bytes,
            taken.memory_bytes,
            &vm,
            name,
        )? {
            status.phase = SnapshotPhase::Failed;
            Conditions(&mut status.conditions).degraded(&err, false);
            write(&status)?;
            return Ok(Action::AwaitChange);
        }
        status.phase = SnapshotPhase::Ready;
        status.vm = Some(vm.clone());
        status.taken_at = Some(Timestamp::now());
        status.memory_bytes = taken.memory_bytes.filter(|_| snap.spec.memory);
        status.disk_only = !snap.spec.memory;
        status.pause_ms = Some(taken.pause.as_millis() as u64);
        Conditions(&mut status.conditions)
            .ready(Reason::Taken, taken_message(&vm, &taken, snap.spec.memory));
        write_status(ctx, obj, &status)?;
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::SnapshotTaken,
                Kind::Snapshot,
                name,
                "controller",
            )
            .vm(vm)
            .details(serde_json::json!({
                "sandbox": sandbox_ref,
                "memoryBytes": taken.memory_bytes,
                "memory": snap.spec.memory,
                "pauseMs": taken.pause.as_millis() as u64,
            })),
        );
        // The sandbox lists its snapshots.
        ctx.wake.add(agentvm_store::ObjectKey::new(
            Kind::Sandbox,
            sandbox_ref.clone(),
        ));
        Ok(Action::Requeue(CHECK))
    }
}
