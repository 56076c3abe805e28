//! `Sandbox` → one libvirt domain, claimed from the sandbox's pool (or booted from its
//! template, or forked from a snapshot) and kept.
//!
//! Each pass:
//! 1. finds the domain owned by the sandbox (ownership metadata kind `Sandbox`, its name):
//!    after a controller restart, that is adoption (a fork or a template VM left unfinished
//!    is destroyed and made again);
//! 2. without one, claims a ready VM of `poolRef` from the [`PoolRegistry`] and hands it over
//!    by rewriting its ownership metadata (one libvirt call; the VM is never without an
//!    owner), then drops it from the registry, so the pool boots a replacement; or, with
//!    `template`, waits for its `Image` (and network) to be `Ready` and boots a VM of its own
//!    through [`Backend::create_vm`], owned by the sandbox from its definition on. A sandbox
//!    whose recorded VM vanished is `Failed` (`VmLost`): its files and memory are gone;
//! 3. applies the lifetime rules: `ttlSeconds` (from the claim) and `shutdownTime` end the
//!    sandbox as `shutdownPolicy` says; so does `idleTimeoutSeconds` of running time without
//!    activity (see [`Sandboxes`]). `Stop` saves the VM to disk and records why in
//!    `status.stoppedReason`; an idle-stopped sandbox comes back on the next exec (or
//!    `agentvm start`), an expired one only when its lifetime is raised;
//! 4. drives the VM's power state to `spec.state`: running, paused (vCPUs stopped, memory
//!    kept) or saved to disk (libvirt managed save: no QEMU process, no host memory). A VM
//!    found off (the host rebooted, or it was destroyed by hand) is started again from its
//!    disk.
//!
//! Deletion destroys the domain with its disk and saved state, then finalizes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentvm_api::{
    ForkedFrom, Kind, Reason, Resource, Sandbox, SandboxPhase, SandboxState, SandboxStatus,
    ShutdownPolicy, SnapshotPhase, SnapshotStatus,
};
use agentvm_backend::{Backend, Owner, PowerState};

use super::{backend_error, status_of, write_status, Conditions, PoolRegistry};
use crate::audit::{AuditEvent, AuditEventType};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler, Wake};
use agentvm_api::time::Timestamp;
use agentvm_store::{ObjectKey, StoredObject};

/// Longest wait between passes of a running sandbox (idle accounting, drift).
const RECHECK: Duration = Duration::from_secs(30);
/// Recheck delay while waiting for a ready VM of the pool.
const WAITING_FOR_VM: Duration = Duration::from_secs(1);

/// What the controller knows about one sandbox's use, in memory.
#[derive(Debug, Clone)]
struct Activity {
    /// Last use (or the moment the VM last started running again).
    last: Instant,
    /// Commands, copies and forwarded connections in progress.
    active: u32,
    /// Someone used the sandbox while it was idle-stopped: bring it back.
    wake: bool,
}

/// The sandboxes' activity, shared by the API (which records each exec, copy and forwarded
/// connection) and the reconciler (which ends idle sandboxes). Idle time counts only while
/// the VM runs: starting or resuming a VM counts as activity.
#[derive(Debug, Default)]
pub struct Sandboxes {
    activity: Mutex<HashMap<String, Activity>>,
    wake: Mutex<Wake>,
}

/// Marks one use of a sandbox as in progress until dropped.
#[derive(Debug)]
pub struct InUse {
    sandboxes: Arc<Sandboxes>,
    name: String,
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut map = self.sandboxes.lock();
        if let Some(a) = map.get_mut(&self.name) {
            a.active = a.active.saturating_sub(1);
            a.last = Instant::now();
        }
    }
}

impl Sandboxes {
    /// No sandbox known yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Activity>> {
        self.activity.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry<'a>(map: &'a mut HashMap<String, Activity>, name: &str) -> &'a mut Activity {
        map.entry(name.to_string()).or_insert_with(|| Activity {
            last: Instant::now(),
            active: 0,
            wake: false,
        })
    }

    /// Records the start of a use of `name` (an exec, a copy, a forwarded connection); it
    /// lasts until the returned guard is dropped. A sandbox stopped for being idle is brought
    /// back.
    pub fn begin(self: &Arc<Self>, name: &str) -> InUse {
        {
            let mut map = self.lock();
            let a = Self::entry(&mut map, name);
            a.active += 1;
            a.last = Instant::now();
            a.wake = true;
        }
        self.requeue(name);
        InUse {
            sandboxes: self.clone(),
            name: name.to_string(),
        }
    }

    /// Asks for `name` to be brought back if it was stopped for being idle.
    pub fn wake(&self, name: &str) {
        {
            let mut map = self.lock();
            let a = Self::entry(&mut map, name);
            a.last = Instant::now();
            a.wake = true;
        }
        self.requeue(name);
    }

    fn requeue(&self, name: &str) {
        self.wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(ObjectKey::new(Kind::Sandbox, name));
    }

    fn set_wake(&self, wake: &Wake) {
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = wake.clone();
    }

    /// Resets the idle clock (the VM starts running again now).
    fn touch(&self, name: &str) {
        Self::entry(&mut self.lock(), name).last = Instant::now();
    }

    /// After a restart: the idle clock starts from the recorded last activity.
    fn seed(&self, name: &str, last: Option<SystemTime>) {
        let mut map = self.lock();
        if map.contains_key(name) {
            return;
        }
        let ago = last
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or_default();
        let last = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
        Self::entry(&mut map, name).last = last;
    }

    /// (idle time, uses in progress).
    fn idle(&self, name: &str) -> (Duration, u32) {
        let mut map = self.lock();
        let a = Self::entry(&mut map, name);
        (a.last.elapsed(), a.active)
    }

    fn take_wake(&self, name: &str) -> bool {
        std::mem::take(&mut Self::entry(&mut self.lock(), name).wake)
    }

    fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Uses of `name` in progress.
    pub fn in_progress(&self, name: &str) -> u32 {
        self.lock().get(name).map_or(0, |a| a.active)
    }
}

/// Reconciles `Sandbox` objects; see the module docs.
pub struct SandboxReconciler {
    backend: Arc<dyn Backend>,
    registry: Arc<PoolRegistry>,
    sandboxes: Arc<Sandboxes>,
}

impl SandboxReconciler {
    /// A reconciler acting through `backend`, claiming VMs from `registry`'s pools and
    /// reading activity from `sandboxes`.
    pub fn new(
        backend: Arc<dyn Backend>,
        registry: Arc<PoolRegistry>,
        sandboxes: Arc<Sandboxes>,
    ) -> Self {
        Self {
            backend,
            registry,
            sandboxes,
        }
    }

    fn owner(obj: &StoredObject) -> Owner {
        Owner {
            kind: Kind::Sandbox.into(),
            name: obj.resource.name().to_string(),
            // The VM is not rebuilt when the spec changes: no drift hash.
            spec_hash: String::new(),
            generation: obj.generation(),
        }
    }

    /// The domain this sandbox owns, if any. A fork left unfinished (the controller stopped
    /// while making it) is destroyed here, so the sandbox forks again.
    fn find_vm(&self, name: &str) -> Result<Option<String>, ReconcileError> {
        let Some(vm) = self
            .backend
            .list_vms()
            .map_err(|e| backend_error("listing domains", &e))?
            .into_iter()
            .find(|v| v.owner.is_kind(Kind::Sandbox) && v.owner.name == name)
        else {
            return Ok(None);
        };
        if vm.owner.spec_hash == agentvm_backend::fork::UNFINISHED {
            tracing::warn!(sandbox = name, vm = %vm.name, "destroying a fork left unfinished");
            self.backend.destroy_vm(&vm.name).map_err(|e| {
                backend_error(&format!("destroying unfinished fork {}", vm.name), &e)
            })?;
            return Ok(None);
        }
        Ok(Some(vm.name))
    }

    /// Takes a ready VM of the pool and makes it this sandbox's. `None` while none is ready.
    fn claim(
        &self,
        obj: &StoredObject,
        sb: &Sandbox,
        status: &mut SandboxStatus,
        ctx: &Ctx,
    ) -> Result<Option<String>, ReconcileError> {
        let pool = &sb.spec.pool_ref;
        let pending = |status: &mut SandboxStatus, reason: Reason, message: String| {
            status.phase = SandboxPhase::Pending;
            Conditions(&mut status.conditions).progressing(reason, message);
        };
        if ctx.cache.get(Kind::VmPool, pool)?.is_none() {
            pending(
                status,
                Reason::PoolNotFound,
                format!("VmPool {pool} does not exist; apply it or fix poolRef"),
            );
            return Ok(None);
        }
        let Some(vm) = self.registry.acquire(pool) else {
            pending(
                status,
                Reason::WaitingForVm,
                format!("waiting for a ready VM of pool {pool}"),
            );
            return Ok(None);
        };
        if let Err(e) = self.backend.set_vm_owner(&vm, &Self::owner(obj)) {
            // Still the pool's: it is reset before anyone else gets it.
            self.registry.release(pool, &vm);
            return Err(backend_error(&format!("claiming VM {vm}"), &e));
        }
        // No longer the pool's: it boots a replacement.
        self.registry.remove(pool, &vm);
        ctx.wake.add(ObjectKey::new(Kind::VmPool, pool.clone()));
        let now = Timestamp::now();
        status.vm = Some(vm.clone());
        status.pool = Some(pool.clone());
        status.created_at = Some(now);
        status.last_activity_at = Some(now);
        self.sandboxes.touch(sb.name());
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::VmClaimed,
                Kind::Sandbox,
                sb.name(),
                "controller",
            )
            .vm(vm.clone())
            .details(serde_json::json!({ "pool": pool })),
        );
        tracing::info!(sandbox = sb.name(), %vm, %pool, "claimed a pool VM");
        Ok(Some(vm))
    }

    /// Boots this sandbox's VM from its `template` (the one creation path,
    /// [`Backend::create_vm`], not parked). `None` while the image or network is not ready,
    /// or when the template cannot work (phase `Failed`). The VM is owned by the sandbox from
    /// its definition on, marked unfinished until it is up, so one left half-made by a
    /// stopped controller is destroyed and booted again.
    fn create(
        &self,
        obj: &StoredObject,
        sb: &Sandbox,
        template: &agentvm_api::VmTemplate,
        status: &mut SandboxStatus,
        ctx: &Ctx,
    ) -> Result<Option<String>, ReconcileError> {
        let tpl = match super::vm_pool::resolve_template(ctx, template, false)? {
            Ok(t) => t,
            Err(blocked) => {
                status.phase = if blocked.failed {
                    SandboxPhase::Failed
                } else {
                    SandboxPhase::Pending
                };
                if blocked.failed {
                    Conditions(&mut status.conditions)
                        .degraded(&ReconcileError::new(blocked.reason, blocked.message), false);
                } else {
                    Conditions(&mut status.conditions).progressing(
                        blocked.reason,
                        format!("{}; the sandbox's VM boots once it is", blocked.message),
                    );
                }
                return Ok(None);
            }
        };
        let vm = format!("agentvm-sbx-{}", sb.name());
        let owner = Self::owner(obj);
        let req = tpl.request(
            &vm,
            Owner {
                spec_hash: agentvm_backend::fork::UNFINISHED.to_string(),
                ..owner.clone()
            },
            false,
        );
        tracing::info!(sandbox = sb.name(), %vm, image = %template.image_ref, "booting the sandbox's VM from its template");
        let report = self
            .backend
            .create_vm(&req)
            .map_err(|e| backend_error(&format!("creating {vm}"), &e))?;
        self.backend
            .set_vm_owner(&vm, &owner)
            .map_err(|e| backend_error(&format!("recording {vm} as made"), &e))?;
        let now = Timestamp::now();
        status.vm = Some(vm.clone());
        status.created_at = Some(now);
        status.last_activity_at = Some(now);
        self.sandboxes.touch(sb.name());
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::VmCreated,
                Kind::Sandbox,
                sb.name(),
                "controller",
            )
            .vm(vm.clone())
            .details(serde_json::json!({
                "image": template.image_ref,
                "bootSeconds": report.boot.as_secs_f64(),
                "warmupSeconds": report.warmup.as_secs_f64(),
            })),
        );
        tracing::info!(sandbox = sb.name(), %vm, boot = ?report.boot, "booted from the template");
        Ok(Some(vm))
    }

    /// Makes this sandbox's VM a fork of Snapshot `from`. `None` while the snapshot is not
    /// ready, or when the fork cannot be made at all (phase `Failed`, reason in conditions).
    fn fork(
        &self,
        obj: &StoredObject,
        sb: &Sandbox,
        from: &str,
        status: &mut SandboxStatus,
        ctx: &Ctx,
    ) -> Result<Option<String>, ReconcileError> {
        let pending = |status: &mut SandboxStatus, reason: Reason, message: String| {
            status.phase = SandboxPhase::Pending;
            Conditions(&mut status.conditions).progressing(reason, message);
        };
        let failed = |status: &mut SandboxStatus, reason: Reason, message: String| {
            status.phase = SandboxPhase::Failed;
            Conditions(&mut status.conditions)
                .degraded(&ReconcileError::new(reason, message), false);
        };
        let snap_obj = match ctx.store.get(Kind::Snapshot, from)? {
            Some(o) if !o.is_deleting() => o,
            _ => {
                pending(
                    status,
                    Reason::SnapshotNotFound,
                    format!("Snapshot {from} does not exist; take it or fix fromSnapshot"),
                );
                return Ok(None);
            }
        };
        let Resource::Snapshot(snap) = &snap_obj.resource else {
            return Err(super::wrong_kind(&snap_obj, Kind::Snapshot));
        };
        let source = snap.spec.sandbox_ref.as_str();
        let snap_status: SnapshotStatus = status_of(&snap_obj);
        if !snap.spec.memory || snap_status.disk_only {
            failed(
                status,
                Reason::SnapshotHasNoMemory,
                format!(
                    "Snapshot {from} of sandbox {source} holds its disk alone (memory: false): there is no running state to fork. Take a snapshot with memory (`agentvm snapshot sandbox/{source} --name NAME`, without --disk-only) and fork that"
                ),
            );
            return Ok(None);
        }
        match snap_status.phase {
            SnapshotPhase::Ready => {}
            SnapshotPhase::Failed => {
                failed(
                    status,
                    Reason::SnapshotLost,
                    format!("Snapshot {from} failed; there is nothing to fork"),
                );
                return Ok(None);
            }
            _ => {
                pending(
                    status,
                    Reason::WaitingForSnapshot,
                    format!("waiting for Snapshot {from} of sandbox {source} to be taken"),
                );
                return Ok(None);
            }
        }
        let src_obj = match ctx.store.get(Kind::Sandbox, source)? {
            Some(o) if !o.is_deleting() => o,
            _ => {
                failed(
                    status,
                    Reason::SandboxNotFound,
                    format!(
                        "Snapshot {from}'s sandbox {source} is gone, and its snapshots with it"
                    ),
                );
                return Ok(None);
            }
        };
        // A sandbox holds its owner's work: only they (and root) may copy it.
        let owner = src_obj.submitter.as_ref().map_or(0, |c| c.uid);
        let by = obj.submitter.as_ref().map_or(0, |c| c.uid);
        if by != 0 && by != owner {
            let whose = src_obj
                .submitter
                .as_ref()
                .map_or_else(|| "root".to_string(), |c| c.to_string());
            failed(
                status,
                Reason::NotPermitted,
                format!("sandbox {source} belongs to {whose}; only they and root may fork it"),
            );
            return Ok(None);
        }
        let src_status: SandboxStatus = status_of(&src_obj);
        let Some(src_vm) = src_status.vm.clone() else {
            pending(
                status,
                Reason::WaitingForSandbox,
                format!("sandbox {source} has no VM yet"),
            );
            return Ok(None);
        };
        let vm = format!("agentvm-sbx-{}", sb.name());
        let report = match self.backend.fork_vm(&src_vm, from, &vm, &Self::owner(obj)) {
            Ok(r) => r,
            Err(e @ agentvm_backend::BackendError::Unsupported { .. }) => {
                failed(status, Reason::Unsupported, e.to_string());
                return Ok(None);
            }
            Err(e) => return Err(backend_error(&format!("forking {src_vm} at {from}"), &e)),
        };
        let forked = ForkedFrom {
            snapshot: from.to_string(),
            sandbox: source.to_string(),
            source_pause_ms: report.source_pause.as_millis() as u64,
            took_ms: report.total.as_millis() as u64,
        };
        let now = Timestamp::now();
        status.vm = Some(vm.clone());
        status.pool = src_status.pool.clone();
        status.created_at = Some(now);
        status.last_activity_at = Some(now);
        status.forked_from = Some(forked.clone());
        self.sandboxes.touch(sb.name());
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::SandboxForked,
                Kind::Sandbox,
                sb.name(),
                "controller",
            )
            .vm(vm.clone())
            .details(serde_json::to_value(&forked).unwrap_or_default()),
        );
        tracing::info!(sandbox = sb.name(), %vm, snapshot = from, ?report, "forked");
        Ok(Some(vm))
    }

    fn delete(&self, obj: &StoredObject, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let name = obj.resource.name();
        let mut status: SandboxStatus = status_of(obj);
        // Its snapshots live in its VM: they go with it.
        for o in ctx.store.list(Some(Kind::Snapshot))? {
            if let Resource::Snapshot(s) = &o.resource {
                if s.spec.sandbox_ref == name && !o.is_deleting() {
                    ctx.store.request_delete(Kind::Snapshot, s.name(), None)?;
                }
            }
        }
        if let Some(vm) = self.find_vm(name)? {
            if status.phase != SandboxPhase::Deleting {
                status.phase = SandboxPhase::Deleting;
                write_status(ctx, obj, &status)?;
            }
            if let Err(e) = self.backend.destroy_vm(&vm) {
                return Err(
                    backend_error(&format!("destroying VM {vm}"), &e).with_status(obj, &status)
                );
            }
            ctx.audit.record(
                AuditEvent::new(
                    AuditEventType::VmDestroyed,
                    Kind::Sandbox,
                    name,
                    "controller",
                )
                .vm(vm)
                .details(serde_json::json!({ "reason": "SandboxDeleted" })),
            );
        }
        self.sandboxes.forget(name);
        ctx.store.finalize_delete(Kind::Sandbox, name)?;
        Ok(Action::AwaitChange)
    }

    /// Why the sandbox's lifetime is over, if it is (`ttlSeconds`, `shutdownTime`).
    fn expired(sb: &Sandbox, status: &SandboxStatus) -> Option<Reason> {
        let now = SystemTime::now();
        if let (Some(ttl), Some(created)) = (sb.spec.ttl_seconds, status.created_at) {
            if created.0 + Duration::from_secs(ttl.into()) <= now {
                return Some(Reason::TtlExpired);
            }
        }
        if let Some(at) = sb.spec.shutdown_time.as_deref().and_then(Timestamp::parse) {
            if at.0 <= now {
                return Some(Reason::ShutdownTime);
            }
        }
        None
    }

    /// Acts on `spec.rollback` once per request: refused (and said why) unless the snapshot
    /// is a ready snapshot of this sandbox's VM.
    fn rollback(
        &self,
        obj: &StoredObject,
        sb: &Sandbox,
        vm: &str,
        status: &mut SandboxStatus,
        ctx: &Ctx,
    ) -> Result<(), ReconcileError> {
        let Some(req) = &sb.spec.rollback else {
            return Ok(());
        };
        if status
            .last_rollback
            .as_ref()
            .is_some_and(|l| &l.request == req)
        {
            return Ok(());
        }
        let name = sb.name();
        let snapshot = ctx.store.get(Kind::Snapshot, &req.snapshot)?;
        let refused = rollback_refusal(
            snapshot.as_ref().map(|o| &o.resource),
            &req.snapshot,
            name,
            vm,
        );
        let disk_only = snapshot
            .as_ref()
            .is_some_and(|o| matches!(&o.resource, Resource::Snapshot(s) if !s.spec.memory));
        let started = Instant::now();
        let outcome = match refused {
            Some(why) => {
                tracing::warn!(sandbox = name, snapshot = %req.snapshot, "rollback refused: {why}");
                agentvm_api::RollbackStatus {
                    request: req.clone(),
                    done: false,
                    message: why,
                }
            }
            None => {
                if let Err(e) = self.backend.rollback_vm(vm, &req.snapshot) {
                    return Err(backend_error(
                        &format!("rolling {vm} back to {}", req.snapshot),
                        &e,
                    )
                    .with_status(obj, status)
                    .keeping_ready(true));
                }
                self.sandboxes.touch(name);
                let ms = started.elapsed().as_millis();
                agentvm_api::RollbackStatus {
                    request: req.clone(),
                    done: true,
                    message: if disk_only {
                        format!("disk restored and the sandbox booted afresh in {ms} ms (a disk-only snapshot holds no memory: programs that ran were not brought back)")
                    } else {
                        format!("rolled back in {ms} ms")
                    },
                }
            }
        };
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::SandboxRollback,
                Kind::Sandbox,
                name,
                "controller",
            )
            .vm(vm)
            .details(serde_json::json!({
                "snapshot": req.snapshot,
                "done": outcome.done,
                "message": outcome.message,
            })),
        );
        status.last_rollback = Some(outcome);
        Ok(())
    }

    fn record_power(ctx: &Ctx, name: &str, vm: &str, from: PowerState, to: PowerState, why: &str) {
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::SandboxPower,
                Kind::Sandbox,
                name,
                "controller",
            )
            .vm(vm)
            .details(serde_json::json!({
                "from": format!("{from:?}"),
                "to": format!("{to:?}"),
                "reason": why,
            })),
        );
    }

    /// The sandbox's VM: found by its ownership metadata, else claimed from the pool or
    /// forked from the snapshot. `Err(action)`: none (yet, or lost: `Failed`), with the
    /// status written when it changed.
    fn vm_of(
        &self,
        obj: &StoredObject,
        sb: &Sandbox,
        status: &mut SandboxStatus,
        before: &SandboxStatus,
        ctx: &Ctx,
    ) -> Result<Result<String, Action>, ReconcileError> {
        Ok(Ok(match self.find_vm(sb.name())? {
            Some(vm) => {
                if status.vm.as_deref() != Some(&vm) {
                    // Claimed by an earlier controller that stopped before recording it.
                    status.vm = Some(vm.clone());
                    if !sb.spec.pool_ref.is_empty() {
                        status.pool.get_or_insert_with(|| sb.spec.pool_ref.clone());
                    }
                    status.created_at.get_or_insert_with(Timestamp::now);
                }
                vm
            }
            None if status.vm.is_some() => {
                let vm = status.vm.clone().unwrap_or_default();
                status.phase = SandboxPhase::Failed;
                let err = ReconcileError::new(
                    Reason::VmLost,
                    format!("its VM {vm} is gone from libvirt (with its disk and memory); delete the sandbox and make a new one"),
                );
                Conditions(&mut status.conditions).degraded(&err, false);
                if *status != *before {
                    write_status(ctx, obj, status)?;
                }
                return Ok(Err(Action::AwaitChange));
            }
            None => match match (&sb.spec.from_snapshot, &sb.spec.template) {
                (Some(from), _) => self.fork(obj, sb, from, status, ctx),
                (None, Some(template)) => self.create(obj, sb, template, status, ctx),
                (None, None) => self.claim(obj, sb, status, ctx),
            } {
                Ok(Some(vm)) => vm,
                Ok(None) => {
                    if *status != *before {
                        write_status(ctx, obj, status)?;
                    }
                    if status.phase == SandboxPhase::Failed {
                        return Ok(Err(Action::AwaitChange));
                    }
                    return Ok(Err(Action::Requeue(WAITING_FOR_VM)));
                }
                Err(err) => return Err(err.with_status(obj, status)),
            },
        }))
    }

    /// The lifetime rule that ended the sandbox's life, if one did: its `ttlSeconds` or
    /// `shutdownTime` passed, or it ran idle (no exec in progress) for `idleTimeoutSeconds`.
    fn lifetime_over(
        sb: &Sandbox,
        status: &SandboxStatus,
        power: PowerState,
        idle: Duration,
        active: u32,
    ) -> Option<Reason> {
        let expired = Self::expired(sb, status);
        let idle_out = sb.spec.state == SandboxState::Running
            && power == PowerState::Running
            && sb.spec.idle_timeout_seconds != 0
            && active == 0
            && idle >= Duration::from_secs(sb.spec.idle_timeout_seconds.into());
        expired.or(idle_out.then_some(Reason::IdleTimeout))
    }

    /// The power state `sb` wants, given the lifetime rule that `ended` (if any); keeps or
    /// clears `status.stoppedReason` (an idle stop ends at the next use, `woken`).
    fn wanted_power(
        sb: &Sandbox,
        status: &mut SandboxStatus,
        ended: Option<Reason>,
        woken: bool,
    ) -> PowerState {
        match (ended, status.stopped_reason.as_deref()) {
            (Some(reason), _) => status.stopped_reason = Some(reason.as_str().to_string()),
            // Idle-stopped: back on the next use.
            (None, Some("IdleTimeout")) if woken => status.stopped_reason = None,
            (None, Some("IdleTimeout")) => {}
            // The lifetime was raised.
            (None, Some(_)) => status.stopped_reason = None,
            (None, None) => {}
        }
        if sb.spec.state != SandboxState::Running {
            status.stopped_reason = None;
        }
        match (sb.spec.state, &status.stopped_reason) {
            (_, Some(_)) => PowerState::Saved,
            (SandboxState::Running, None) => PowerState::Running,
            (SandboxState::Paused, None) => PowerState::Paused,
            (SandboxState::Stopped, None) => PowerState::Saved,
        }
    }

    /// Phase, `Ready` condition, activity of a sandbox whose VM `vm` is now `want`.
    fn report(
        sb: &Sandbox,
        vm: &str,
        want: PowerState,
        idle: Duration,
        active: u32,
        status: &mut SandboxStatus,
    ) {
        let (phase, reason, message) = match want {
            PowerState::Running => (SandboxPhase::Running, Reason::SandboxRunning, format!("{vm} runs")),
            PowerState::Paused => (
                SandboxPhase::Paused,
                Reason::SandboxPaused,
                format!("{vm} is paused (memory kept)"),
            ),
            _ => (
                SandboxPhase::Stopped,
                Reason::SandboxStopped,
                match status.stopped_reason.as_deref() {
                    Some("IdleTimeout") => format!("{vm} is saved to disk after {}s idle; the next exec or `agentvm start` brings it back", sb.spec.idle_timeout_seconds),
                    Some(r) => format!("{vm} is saved to disk: its lifetime ended ({r})"),
                    None => format!("{vm} is saved to disk"),
                },
            ),
        };
        status.phase = phase;
        Conditions(&mut status.conditions).ready(reason, message);
        status.active_execs = active;
        status.idle_seconds = if want == PowerState::Running {
            idle.as_secs()
        } else {
            0
        };
        let last = SystemTime::now() - idle;
        status.last_activity_at = Some(Timestamp(last));
    }

    /// True when `status` differs from `before` by more than the idle time moving.
    fn changed(status: &SandboxStatus, before: &SandboxStatus) -> bool {
        let mut a = status.clone();
        let mut b = before.clone();
        for s in [&mut a, &mut b] {
            s.idle_seconds = 0;
            s.last_activity_at = None;
        }
        let idle_moved = status.idle_seconds.abs_diff(before.idle_seconds) >= 10
            || (status.idle_seconds == 0) != (before.idle_seconds == 0);
        a != b || idle_moved
    }

    /// When to look again: at the latest [`RECHECK`], or just after the idle timeout, the
    /// TTL or the shutdown time falls due.
    fn next_check(
        sb: &Sandbox,
        status: &SandboxStatus,
        want: PowerState,
        idle: Duration,
        active: u32,
    ) -> Duration {
        let mut next = RECHECK;
        if want == PowerState::Running && sb.spec.idle_timeout_seconds != 0 && active == 0 {
            let timeout = Duration::from_secs(sb.spec.idle_timeout_seconds.into());
            next = next.min(timeout.saturating_sub(idle) + Duration::from_millis(200));
        }
        if let (Some(ttl), Some(created)) = (sb.spec.ttl_seconds, status.created_at) {
            let end = created.0 + Duration::from_secs(ttl.into());
            if let Ok(left) = end.duration_since(SystemTime::now()) {
                next = next.min(left + Duration::from_millis(200));
            }
        }
        if let Some(at) = sb.spec.shutdown_time.as_deref().and_then(Timestamp::parse) {
            if let Ok(left) = at.0.duration_since(SystemTime::now()) {
                next = next.min(left + Duration::from_millis(200));
            }
        }
        next
    }
}

/// Why a rollback of sandbox `name` (VM `vm`) to Snapshot `wanted` is refused, if it is:
/// the snapshot must exist, be `Ready`, and have been taken of this sandbox's VM.
fn rollback_refusal(
    snapshot: Option<&Resource>,
    wanted: &str,
    name: &str,
    vm: &str,
) -> Option<String> {
    match snapshot {
        None => Some(format!("Snapshot {} does not exist", wanted)),
        Some(Resource::Snapshot(s)) if s.spec.sandbox_ref != name => Some(format!(
            "Snapshot {} is of Sandbox {}, not of this one",
            wanted, s.spec.sandbox_ref
        )),
        Some(Resource::Snapshot(s)) => match &s.status {
            Some(st) if st.phase == agentvm_api::SnapshotPhase::Ready => {
                (st.vm.as_deref() != Some(vm)).then(|| {
                    format!(
                        "Snapshot {} was taken of VM {}, not of this sandbox's VM {vm}",
                        wanted,
                        st.vm.as_deref().unwrap_or("-")
                    )
                })
            }
            _ => Some(format!("Snapshot {} is not Ready", wanted)),
        },
        Some(_) => Some(format!("{} is not a Snapshot", wanted)),
    }
}

impl Reconciler for SandboxReconciler {
    fn kind(&self) -> Kind {
        Kind::Sandbox
    }

    fn watches(&self) -> &[Kind] {
        // Pools for claims; images and networks for template sandboxes waiting on them.
        &[
            Kind::VmPool,
            Kind::Image,
            Kind::Network,
            Kind::NetworkFilter,
        ]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::Sandbox(sb) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::Sandbox));
        };
        self.sandboxes.set_wake(&ctx.wake);
        if obj.is_deleting() {
            return self.delete(&obj, ctx);
        }
        let name = sb.name();
        let mut status: SandboxStatus = status_of(&obj);
        let before = status.clone();
        status.observed_generation = Some(obj.generation());

        let vm = match self.vm_of(&obj, sb, &mut status, &before, ctx)? {
            Ok(vm) => vm,
            Err(action) => return Ok(action),
        };
        self.sandboxes
            .seed(name, status.last_activity_at.map(|t| t.0));

        let power = self
            .backend
            .vm_power(&vm)
            .map_err(|e| backend_error(&format!("reading the power state of {vm}"), &e))?;
        let (idle, active) = self.sandboxes.idle(name);
        let woken = self.sandboxes.take_wake(name);

        let ended = Self::lifetime_over(sb, &status, power, idle, active);
        if let Some(reason) = ended {
            if sb.spec.shutdown_policy == ShutdownPolicy::Delete {
                tracing::info!(
                    sandbox = name,
                    reason = reason.as_str(),
                    "lifetime over; deleting the sandbox"
                );
                ctx.store.request_delete(Kind::Sandbox, name, None)?;
                return Ok(Action::Requeue(Duration::ZERO));
            }
        }
        let want = Self::wanted_power(sb, &mut status, ended, woken);
        let power = if power == PowerState::Off && want == PowerState::Saved {
            // Off without saved memory (the host rebooted, or a hand `virsh destroy`): its
            // disk is all there is; it stays off until wanted running.
            PowerState::Saved
        } else {
            power
        };
        if power != want {
            let why = status
                .stopped_reason
                .clone()
                .unwrap_or_else(|| format!("spec.state {}", sb.spec.state.as_str()));
            tracing::info!(sandbox = name, %vm, from = ?power, to = ?want, %why, "changing power state");
            if let Err(e) = self.backend.set_vm_power(&vm, want) {
                let err = backend_error(&format!("{vm}: {power:?} to {want:?}"), &e);
                return Err(ReconcileError::new(Reason::PowerChangeFailed, err.message)
                    .with_status(&obj, &status));
            }
            if want == PowerState::Running {
                self.sandboxes.touch(name);
            }
            Self::record_power(ctx, name, &vm, power, want, &why);
        }
        if want != PowerState::Saved {
            self.rollback(&obj, sb, &vm, &mut status, ctx)?;
        }
        status.snapshots = self
            .backend
            .vm_snapshots(&vm)
            .map_err(|e| backend_error(&format!("listing snapshots of {vm}"), &e))?;
        let (idle, active) = self.sandboxes.idle(name);
        Self::report(sb, &vm, want, idle, active, &mut status);
        // Only a real change is written (the idle seconds alone move every pass).
        if Self::changed(&status, &before) {
            write_status(ctx, &obj, &status)?;
        }

        Ok(Action::Requeue(Self::next_check(
            sb, &status, want, idle, active,
        )))
    }
}

#[cfg(test)]
mod tests;
