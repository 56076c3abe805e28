//! `VmPool` → `minReady` libvirt domains booted from the pool's template, warmed up and
//! parked at their golden state, named `agentvm-<pool>-<random suffix>`.
//!
//! Each pass:
//! 1. waits (`Progressing`: `WaitingForImage` / `WaitingForNetwork`) until the `Image` is
//!    `Ready` and, for an attached pool, its `Network` and `NetworkFilter` are `Ready`;
//! 2. lists the pool's domains **by ownership metadata** (kind `VmPool`, the pool's name) and
//!    syncs the [`PoolRegistry`]: a domain the registry does not know is adopted as
//!    `NeedsReset` (after a restart it may have been in the middle of a run); a known VM that
//!    vanished from libvirt is forgotten (its files removed);
//! 3. destroys idle VMs that are broken (shut off by hand, never finished parking) or past
//!    `ttlSeconds` (counted from creation; a busy VM finishes its run first and is replaced
//!    after it), resets adopted/released ones to golden (replacing one whose reset fails),
//!    and pings the guest agent of each idle VM every `healthCheckSeconds` (replacing one
//!    that does not answer). Each replacement is recorded in `status.events`, in the audit
//!    log (`vm_destroyed` with the reason) and in the `Progressing` condition of the
//!    replacement's creation;
//! 4. takes at most one slow step: create a VM while fewer than `minReady` current VMs are
//!    ready (room permitting under `maxSize`), else destroy one VM of an old template
//!    (rolling: the new one is up first), else scale down idle VMs beyond `minReady`, then
//!    requeues at once. A steady pool is rechecked every `drift_check` (10 s).
//!
//! Busy VMs (handed out to a run) are never destroyed or reset. The template hash stamped on
//! each domain covers the template, the image's artifact paths (a rebuilt image rolls the
//! pool) and the attached network's spec. Deletion destroys the idle VMs, waits for busy
//! ones, then finalizes.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use agentvm_api::{
    spec_hash, ImagePhase, ImageStatus, Kind, NetworkFilterPhase, NetworkFilterStatus,
    NetworkPhase, NetworkStatus, PoolEvent, Reason, Resource, VmPool, VmPoolPhase, VmPoolStatus,
};
use agentvm_backend::backend::{OwnedVm, VmRequest};
use agentvm_backend::guest::ExecRequest;
use agentvm_backend::netxml::libvirt_name;
use agentvm_backend::vm::BootImage;
use agentvm_backend::{Backend, Enforcement, NicSpec, Owner, VmLimits};
use sha2::{Digest, Sha256};

use super::{backend_error, status_of, write_status, Conditions, PoolRegistry, VmPhase};
use crate::audit::{AuditEvent, AuditEventType};
use crate::limits;
#[cfg(test)]
use crate::limits::CPU_SHARES_APPLIED;
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use agentvm_api::time::Timestamp;
use agentvm_store::StoredObject;

mod plan;
use plan::{
    plan_repairs, plan_scaling, DomainView, Repair, RepairView, Scaling, ScalingView, VmView,
};

/// Recheck delay while VMs are busy or runs wait (released VMs are reset promptly).
const BUSY_RECHECK: Duration = Duration::from_millis(200);

/// Requeue delay after a step, to take the next one.
const NEXT_STEP: Duration = Duration::from_millis(50);

/// Requeue delay while waiting for the image or the network (watches usually come first).
const WAITING: Duration = Duration::from_secs(10);
/// How long a health check waits for the guest agent's answer to `guest-ping`.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Reconciles `VmPool` objects into warm, parked VMs.
pub struct VmPoolReconciler {
    backend: Arc<dyn Backend>,
    registry: Arc<PoolRegistry>,
    drift_check: Duration,
}

/// What a pool's VMs (or a template sandbox's VM) are made of, resolved from the store.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    pub(crate) image: BootImage,
    pub(crate) nic: Option<NicSpec>,
    pub(crate) hash: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mib: u64,
    pub(crate) warmup: Vec<ExecRequest>,
    /// The template's resources (for the conditions and `status.resources`).
    pub(crate) resources: agentvm_api::Resources,
    /// Limits asked of the host for each VM.
    pub(crate) limits: VmLimits,
    /// Disk size (the profile's or `diskGib`), GiB.
    pub(crate) disk_gib: u64,
    /// `spec.creation: template`.
    pub(crate) from_template: bool,
}

impl Template {
    /// The request for VM `name`, owned by `owner`: parked at its golden state (a pool VM)
    /// or left running (a sandbox's).
    pub(crate) fn request(&self, name: &str, owner: Owner, park: bool) -> VmRequest {
        VmRequest {
            name: name.to_string(),
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            nic: self.nic.clone(),
            owner,
            warmup: self.warmup.clone(),
            limits: self.limits,
            disk_gib: Some(self.disk_gib),
            disabled_cpu_features: Vec::new(),
            park,
            from_template: park && self.from_template,
        }
    }
}

/// Counts for the status.
#[derive(Debug, Default)]
struct Counts {
    ready_current: u32,
    ready: u32,
    busy: u32,
    starting: u32,
    total: u32,
    names: Vec<String>,
    created: std::collections::BTreeMap<String, Timestamp>,
}

impl VmPoolReconciler {
    /// A reconciler acting through `backend`, sharing `registry` with the run scheduler.
    pub fn new(backend: Arc<dyn Backend>, registry: Arc<PoolRegistry>) -> Self {
        Self {
            backend,
            registry,
            drift_check: Duration::from_secs(10),
        }
    }

    /// How often a steady pool is compared with libvirt again (default 10 s).
    pub fn drift_check(mut self, every: Duration) -> Self {
        self.drift_check = every;
        self
    }

    /// The registry this reconciler keeps up to date.
    pub fn registry(&self) -> &Arc<PoolRegistry> {
        &self.registry
    }

    /// The pool's domains in libvirt, with the registry synced to them.
    fn observe(&self, pool: &str, ctx: &Ctx) -> Result<Vec<OwnedVm>, ReconcileError> {
        let vms: Vec<OwnedVm> = self
            .backend
            .list_vms()
            .map_err(|e| backend_error("listing domains", &e))?
            .into_iter()
            .filter(|v| v.owner.is_kind(Kind::VmPool) && v.owner.name == pool)
            .collect();
        for vm in &vms {
            // Unknown to this controller: adopted; reset before it is handed out.
            self.registry
                .insert(pool, &vm.name, VmPhase::NeedsReset, &vm.owner.spec_hash);
        }
        for known in self.registry.vms(pool) {
            if known.phase != VmPhase::Busy && !vms.iter().any(|v| v.name == known.name) {
                tracing::warn!(pool, vm = %known.name, "VM vanished from libvirt; replacing it");
                self.registry.remove(pool, &known.name);
                // Its files (and anything half-left) go too.
                self.backend
                    .destroy_vm(&known.name)
                    .map_err(|e| backend_error(&format!("cleaning up {}", known.name), &e))?;
                ctx.metrics.vm_removed(&known.name);
                drift_repaired(
                    ctx,
                    pool,
                    &known.name,
                    "domain vanished from libvirt; replaced",
                );
            }
        }
        Ok(vms)
    }

    fn destroy(&self, pool: &str, vm: &str, why: &str, ctx: &Ctx) -> Result<bool, ReconcileError> {
        if !self.registry.retire(pool, vm) {
            return Ok(false);
        }
        tracing::info!(pool, vm, "destroying VM: {why}");
        self.backend
            .destroy_vm(vm)
            .map_err(|e| backend_error(&format!("destroying {vm}"), &e))?;
        self.registry.remove(pool, vm);
        ctx.metrics.vm_removed(vm);
        ctx.audit.record(
            AuditEvent::new(
                AuditEventType::VmDestroyed,
                Kind::VmPool,
                pool,
                "controller",
            )
            .vm(vm)
            .details(serde_json::json!({ "reason": why })),
        );
        Ok(true)
    }

    /// Destroys an idle VM that has to be replaced and records why (status event, audit log).
    /// False when it was busy (left alone).
    fn replace(
        &self,
        ctx: &Ctx,
        pool: &str,
        vm: &str,
        reason: Reason,
        message: String,
        status: &mut VmPoolStatus,
    ) -> Result<bool, ReconcileError> {
        // `destroy` writes the audit event, with the reason in front of the message.
        if !self.destroy(pool, vm, &format!("{reason}: {message}"), ctx)? {
            return Ok(false);
        }
        status.push_event(PoolEvent {
            time: Timestamp::now().to_string(),
            reason: reason.into(),
            vm: vm.to_string(),
            message,
        });
        Ok(true)
    }

    /// `guest-ping` through qemu-guest-agent and a ping through agentvm-guest (which runs
    /// the programs, on a VM that has its channel), each bounded by [`HEALTH_TIMEOUT`].
    fn health_check(&self, vm: &str) -> Result<(), agentvm_backend::BackendError> {
        let chan = self.backend.agent(vm)?;
        chan.command(
            &serde_json::json!({"execute": "guest-ping"}),
            HEALTH_TIMEOUT,
        )?;
        if let Some(path) = chan.agent_socket() {
            agentvm_backend::agent_conn::connect_within(vm, &path, HEALTH_TIMEOUT)?
                .ping_within(HEALTH_TIMEOUT)?;
        }
        Ok(())
    }

    fn counts(&self, pool: &str, current: &str) -> Counts {
        let mut c = Counts::default();
        for vm in self.registry.vms(pool) {
            c.total += 1;
            c.names.push(vm.name.clone());
            c.created.insert(vm.name.clone(), Timestamp(vm.created));
            match vm.phase {
                VmPhase::Ready | VmPhase::Checking => {
                    c.ready += 1;
                    if vm.template_hash == current {
                        c.ready_current += 1;
                    }
                }
                VmPhase::Busy => c.busy += 1,
                VmPhase::NeedsReset | VmPhase::Retiring => c.starting += 1,
            }
        }
        c
    }

    fn fill_status(&self, status: &mut VmPoolStatus, c: &Counts, ctx: &Ctx, pool: &str) {
        ctx.metrics.pool_size(pool, c.total as usize);
        status.ready = c.ready;
        status.busy = c.busy;
        status.starting = c.starting;
        status.total = c.total;
        status.vms = c.names.clone();
        status.vm_created_at = c.created.clone();
    }

    fn delete(
        &self,
        obj: &StoredObject,
        pool: &str,
        ctx: &Ctx,
        status: &mut VmPoolStatus,
    ) -> Result<Action, ReconcileError> {
        let result = (|| {
            let vms = self.observe(pool, ctx)?;
            let mut busy = Vec::new();
            for vm in &vms {
                if !self.destroy(pool, &vm.name, "pool deleted", ctx)? {
                    busy.push(vm.name.clone());
                }
            }
            Ok::<_, ReconcileError>(busy)
        })();
        match result {
            Ok(busy) if busy.is_empty() => {
                self.backend.remove_pool_template(pool).map_err(|e| {
                    backend_error(&format!("removing the template of pool {pool}"), &e)
                })?;
                self.registry.forget(pool);
                ctx.metrics.pool_removed(pool);
                ctx.store.finalize_delete(Kind::VmPool, pool)?;
                Ok(Action::AwaitChange)
            }
            Ok(busy) => {
                let c = self.counts(pool, "");
                self.fill_status(status, &c, ctx, pool);
                Conditions(&mut status.conditions).progressing(
                    Reason::WaitingForRuns,
                    format!("deletion waits for busy VMs: {}", busy.join(", ")),
                );
                write_status(ctx, obj, status)?;
                Ok(Action::Requeue(Duration::from_secs(2)))
            }
            Err(err) => Err(err.with_status(obj, status)),
        }
    }

    /// One pass over a pool whose template resolved: observe (libvirt, the registry), plan
    /// the repairs and act on them, then plan the one scaling step on the result and take
    /// it. The plans are pure ([`plan`]); this is the acting.
    fn converge(
        &self,
        obj: &StoredObject,
        pool: &VmPool,
        tpl: &Template,
        ctx: &Ctx,
        status: &mut VmPoolStatus,
    ) -> Result<Action, ReconcileError> {
        let name = pool.name();
        let view = self.observe_repairs(pool, tpl, ctx, status)?;
        // The last replacement of this pass, for the condition of the creation that follows.
        let mut replaced = None;
        for step in plan_repairs(&view) {
            if let Some(r) = self.repair(ctx, name, step, status)? {
                replaced = Some(r);
            }
        }
        let view = ScalingView {
            vms: self.registry.vms(name).iter().map(VmView::from).collect(),
            current_hash: tpl.hash.clone(),
            min_ready: pool.spec.min_ready,
            max_size: pool.spec.max_size,
            waiting: self.registry.waiting(name),
            replaced,
        };
        match plan_scaling(&view) {
            Scaling::Create {
                reason,
                replacing,
                ready_current,
                wanted,
            } => {
                let message = |vm: &str| {
                    let progress = format!("creating {vm} ({ready_current} of {wanted} ready)");
                    match &replacing {
                        Some(why) => format!("replacing {why}; {progress}"),
                        None => progress,
                    }
                };
                self.create_one(obj, name, tpl, ctx, status, reason, &message)
            }
            Scaling::DestroyStale { vm, why } => {
                self.destroy(name, &vm, why, ctx)?;
                Ok(Action::Requeue(NEXT_STEP))
            }
            Scaling::ScaleDown { vms } => {
                for vm in vms {
                    self.destroy(name, &vm, "scaling down", ctx)?;
                }
                Ok(Action::Requeue(NEXT_STEP))
            }
            Scaling::Settle => self.settle(obj, pool, &view, ctx, status),
        }
    }

    /// The pool's domains and registry after syncing them, for [`plan_repairs`]; also
    /// seeds the registry with the creation times recorded earlier (adopted VMs keep their
    /// age across restarts) and the pool's TTL.
    fn observe_repairs(
        &self,
        pool: &VmPool,
        tpl: &Template,
        ctx: &Ctx,
        status: &VmPoolStatus,
    ) -> Result<RepairView, ReconcileError> {
        let name = pool.name();
        let domains = self
            .observe(name, ctx)?
            .into_iter()
            .map(|vm| DomainView {
                name: vm.name,
                state: vm.state,
                golden: vm.golden,
                edited: vm.edited,
            })
            .collect();
        for (vm, at) in &status.vm_created_at {
            self.registry.seed_created(name, vm, at.0);
        }
        let ttl = Duration::from_secs(u64::from(pool.spec.ttl_seconds));
        self.registry.set_ttl(name, ttl);
        Ok(RepairView {
            domains,
            vms: self.registry.vms(name).iter().map(VmView::from).collect(),
            current_hash: tpl.hash.clone(),
            ttl_seconds: pool.spec.ttl_seconds,
            health_every: Duration::from_secs(u64::from(pool.spec.health_check_seconds)),
        })
    }

    /// Acts on one repair; returns the replacement it made, if any: (reason, "vm: message").
    fn repair(
        &self,
        ctx: &Ctx,
        pool: &str,
        step: Repair,
        status: &mut VmPoolStatus,
    ) -> Result<Option<(Reason, String)>, ReconcileError> {
        let (vm, reason, message) = match step {
            Repair::DestroyBroken { vm, why, drift } => {
                if self.destroy(pool, &vm, &why, ctx)? && drift {
                    drift_repaired(ctx, pool, &vm, &format!("{why}; replaced"));
                }
                return Ok(None);
            }
            Repair::Replace {
                vm,
                reason,
                message,
            } => (vm, reason, message),
            Repair::Reset { vm } => match self.backend.reset_vm(&vm) {
                Ok(took) => {
                    tracing::info!(pool, %vm, ?took, "VM reset to golden");
                    vm_reset(ctx, &*self.backend, pool, &vm, took);
                    self.registry
                        .transition(pool, &vm, VmPhase::NeedsReset, VmPhase::Ready);
                    return Ok(None);
                }
                Err(e) => {
                    tracing::warn!(pool, %vm, error = %e, "reset failed; replacing the VM");
                    let message = format!("reset to golden failed: {e}");
                    (vm, Reason::ResetFailed, message)
                }
            },
            Repair::HealthCheck { vm } => {
                // Claimed as `Checking` meanwhile, so no run takes it half-checked.
                if !self
                    .registry
                    .transition(pool, &vm, VmPhase::Ready, VmPhase::Checking)
                {
                    return Ok(None);
                }
                match self.health_check(&vm) {
                    Ok(()) => {
                        self.registry.mark_checked(pool, &vm);
                        self.registry
                            .transition(pool, &vm, VmPhase::Checking, VmPhase::Ready);
                        return Ok(None);
                    }
                    Err(e) => {
                        tracing::warn!(pool, %vm, error = %e, "health check failed; replacing the VM");
                        let message = format!("guest agent did not answer a ping: {e}");
                        (vm, Reason::Unhealthy, message)
                    }
                }
            }
        };
        // A busy VM finishes its run first; `replace` leaves it alone until then.
        if !self.replace(ctx, pool, &vm, reason, message.clone(), status)? {
            return Ok(None);
        }
        if reason == Reason::EditedByHand {
            drift_repaired(ctx, pool, &vm, "definition edited by hand; replaced");
        }
        Ok(Some((reason, format!("{vm}: {message}"))))
    }

    /// Creates one VM: lists it in the status while it boots (`Warming`, `Progressing` with
    /// `reason` and `message(vm)`), then says which of the limits asked for are in force.
    #[allow(clippy::too_many_arguments)]
    fn create_one(
        &self,
        obj: &StoredObject,
        name: &str,
        tpl: &Template,
        ctx: &Ctx,
        status: &mut VmPoolStatus,
        reason: Reason,
        message: &dyn Fn(&str) -> String,
    ) -> Result<Action, ReconcileError> {
        let vm_name = vm_name(name);
        let mut c = self.counts(name, &tpl.hash);
        c.starting += 1;
        c.total += 1;
        c.names.push(vm_name.clone());
        // Listed while it boots, with its creation time (its TTL counts from here).
        c.created.insert(vm_name.clone(), Timestamp::now());
        self.fill_status(status, &c, ctx, name);
        status.phase = VmPoolPhase::Warming;
        Conditions(&mut status.conditions).progressing(reason, message(&vm_name));
        write_status(ctx, obj, status)?;
        let enforcement = self.create(name, &vm_name, tpl, obj.generation(), ctx)?;
        // Say plainly which limits asked for are in force on this host.
        for (limit, verdict) in &enforcement {
            if let Err(why) = verdict {
                tracing::warn!(pool = name, vm = %vm_name, %limit, "limit not applied by this host: {why}");
            }
        }
        limits::set_conditions(
            &mut status.conditions,
            &tpl.resources,
            &vm_name,
            &enforcement,
        );
        status.resources =
            limits::resource_summary(&tpl.resources, tpl.nic.is_some(), &enforcement);
        write_status(ctx, obj, status)?;
        Ok(Action::Requeue(NEXT_STEP))
    }

    /// Nothing to change: `Ready` when enough VMs are, else `Warming`/`AtMaxSize`; looks
    /// again soon while runs hold or want VMs, else at the next drift or health check.
    fn settle(
        &self,
        obj: &StoredObject,
        pool: &VmPool,
        view: &ScalingView,
        ctx: &Ctx,
        status: &mut VmPoolStatus,
    ) -> Result<Action, ReconcileError> {
        let name = pool.name();
        let min = view.wanted();
        let c = self.counts(name, &view.current_hash);
        self.fill_status(status, &c, ctx, name);
        if c.ready_current >= min {
            status.phase = VmPoolPhase::Ready;
            Conditions(&mut status.conditions).ready(
                Reason::MinReadyReached,
                format!("{} VMs ready (minReady {min}), {} busy", c.ready, c.busy),
            );
        } else {
            status.phase = VmPoolPhase::Warming;
            Conditions(&mut status.conditions).progressing(
                Reason::AtMaxSize,
                format!(
                    "{} of {min} VMs ready; maxSize {} reached with {} busy",
                    c.ready_current, pool.spec.max_size, c.busy
                ),
            );
        }
        write_status(ctx, obj, status)?;
        if c.busy > 0 || view.waiting > 0 {
            // Runs hold or want VMs: look again soon (a released VM is reset promptly).
            return Ok(Action::Requeue(self.drift_check.min(BUSY_RECHECK)));
        }
        let every = Duration::from_secs(u64::from(pool.spec.health_check_seconds));
        Ok(Action::Requeue(self.drift_check.min(every)))
    }

    fn create(
        &self,
        pool: &str,
        vm: &str,
        tpl: &Template,
        generation: i64,
        ctx: &Ctx,
    ) -> Result<Enforcement, ReconcileError> {
        let req = tpl.request(
            vm,
            Owner {
                kind: Kind::VmPool.into(),
                name: pool.to_string(),
                spec_hash: tpl.hash.clone(),
                generation,
            },
            true,
        );
        tracing::info!(pool, vm, "creating VM");
        let report = self
            .backend
            .create_vm(&req)
            .map_err(|e| backend_error(&format!("creating {vm}"), &e))?;
        tracing::info!(pool, vm, boot = ?report.boot, warmup = ?report.warmup, park = ?report.park, "VM ready");
        ctx.metrics.vm_booted(vm, pool, report.boot.as_secs_f64());
        ctx.audit.record(
            AuditEvent::new(AuditEventType::VmCreated, Kind::VmPool, pool, "controller")
                .vm(vm)
                .details(serde_json::json!({
                    "bootSeconds": report.boot.as_secs_f64(),
                    "warmupSeconds": report.warmup.as_secs_f64(),
                    "parkSeconds": report.park.as_secs_f64(),
                "fromTemplate": report.from_template,
                    "templateHash": tpl.hash,
                    "limitsNotApplied": report
                        .limits
                        .iter()
                        .filter_map(|(l, v)| v.as_ref().err().map(|why| (l.as_str(), why)))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                })),
        );
        self.registry.insert(pool, vm, VmPhase::Ready, &tpl.hash);
        Ok(report.limits)
    }
}

/// Records a reset of `vm` of `pool` that took `took`: reset duration metric, `vm_reset` audit
/// event.
pub(crate) fn vm_reset(ctx: &Ctx, backend: &dyn Backend, pool: &str, vm: &str, took: Duration) {
    let strategy = backend.reset_strategy();
    ctx.metrics.reset(pool, strategy, took.as_secs_f64());
    ctx.audit.record(
        AuditEvent::new(AuditEventType::VmReset, Kind::VmPool, pool, "controller")
            .vm(vm)
            .details(serde_json::json!({
                "strategy": strategy,
                "seconds": took.as_secs_f64(),
            })),
    );
}

/// What a pool VM is made from: its hash names the template, and VMs of another hash are
/// replaced (rolling). Field names and order are part of every existing VM's hash.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TemplateIdentity<'a> {
    template: &'a agentvm_api::VmTemplate,
    image: [&'a str; 4],
    /// The attached network's spec hash.
    network: Option<String>,
    /// VMs from before filters took the host's address as a parameter are replaced.
    nic_host: Option<String>,
    /// VMs from before anti-spoofing (the filter's `$IP`, learned from DHCP and pinned at
    /// boot) would have libvirt guess their address from any first packet: replaced.
    nic_ip_from_lease: bool,
}

/// Records a `drift_repaired` audit event for VM `vm` of `pool`.
fn drift_repaired(ctx: &Ctx, pool: &str, vm: &str, what: &str) {
    ctx.audit.record(
        AuditEvent::new(
            AuditEventType::DriftRepaired,
            Kind::VmPool,
            pool,
            "controller",
        )
        .vm(vm)
        .details(serde_json::json!({ "repair": what })),
    );
}

/// `agentvm-<pool>-<5 random base-36 characters>`.
fn vm_name(pool: &str) -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let mut n = h.finish();
    let mut suffix = String::new();
    for _ in 0..5 {
        suffix.push(char::from_digit((n % 36) as u32, 36).unwrap_or('0'));
        n /= 36;
    }
    format!("agentvm-{pool}-{suffix}")
}

/// Why a pool (or a template sandbox) cannot create VMs (yet).
#[derive(Debug)]
pub(crate) struct Blocked {
    /// Condition reason.
    pub(crate) reason: Reason,
    /// Condition message.
    pub(crate) message: String,
    /// True when waiting will not help: the manifests have to change (phase `Failed`).
    pub(crate) failed: bool,
}

/// Waiting for a dependency: (reason, message).
fn waiting(reason: Reason, message: String) -> Blocked {
    Blocked {
        reason,
        message,
        failed: false,
    }
}

fn resolve(ctx: &Ctx, pool: &VmPool) -> Result<Result<Template, Blocked>, ReconcileError> {
    resolve_template(
        ctx,
        &pool.spec.template,
        pool.spec.creation == agentvm_api::VmCreation::Template,
    )
}

/// What VMs made from `t` are made of, once its `Image` (and attached `Network` and
/// `NetworkFilter`) are `Ready`; else why not yet. `from_template`: a pool's `creation:
/// template`.
pub(crate) fn resolve_template(
    ctx: &Ctx,
    t: &agentvm_api::VmTemplate,
    from_template: bool,
) -> Result<Result<Template, Blocked>, ReconcileError> {
    let Some(img) = ctx.cache.get(Kind::Image, &t.image_ref)? else {
        return Ok(Err(waiting(
            Reason::WaitingForImage,
            format!("Image {} does not exist", t.image_ref),
        )));
    };
    // Every VM's disk is an overlay on the image: it cannot be smaller. `apply` refuses such
    // a pool when it knows the image; this catches an image applied (or grown) after it.
    if let Resource::Image(image) = &img.resource {
        if let Some(message) = agentvm_api::template_disk_too_small(t, &t.image_ref, &image.spec) {
            return Ok(Err(Blocked {
                reason: Reason::DiskTooSmall,
                message,
                failed: true,
            }));
        }
    }
    let st: ImageStatus = status_of(&img);
    let (Some(disk), Some(kernel), Some(initrd), ImagePhase::Ready) =
        (&st.disk_path, &st.kernel_path, &st.initrd_path, st.phase)
    else {
        return Ok(Err(waiting(
            Reason::WaitingForImage,
            format!("Image {} is {:?}", t.image_ref, st.phase),
        )));
    };
    let image = BootImage {
        disk: disk.into(),
        kernel: kernel.into(),
        initrd: initrd.into(),
        cmdline: agentvm_image::KERNEL_CMDLINE.to_string(),
    };
    let mut network_hash = None;
    let nic = match t.network.attachment() {
        None => None,
        Some(a) => {
            let net = ctx.cache.get(Kind::Network, a.network_ref)?;
            let filter = ctx.cache.get(Kind::NetworkFilter, a.filter_ref)?;
            let net_ready = net.as_ref().is_some_and(|n| {
                status_of::<NetworkStatus>(n).phase == NetworkPhase::Ready && !n.is_deleting()
            });
            let filter_ready = filter.as_ref().is_some_and(|f| {
                status_of::<NetworkFilterStatus>(f).phase == NetworkFilterPhase::Ready
                    && !f.is_deleting()
            });
            if !net_ready || !filter_ready {
                let what = if !net_ready {
                    format!("Network {}", a.network_ref)
                } else {
                    format!("NetworkFilter {}", a.filter_ref)
                };
                return Ok(Err(waiting(
                    Reason::WaitingForNetwork,
                    format!("{what} is not Ready"),
                )));
            }
            let mut host = None;
            let dhcp = filter.as_ref().is_some_and(
                |f| matches!(&f.resource, Resource::NetworkFilter(f) if f.spec.allow_dhcp),
            );
            if let Some(n) = &net {
                network_hash = Some(spec_hash(&n.resource));
                if let Resource::Network(n) = &n.resource {
                    host = Some(n.spec.gateway());
                }
            }
            Some(NicSpec {
                network: libvirt_name(a.network_ref),
                filter: Some(libvirt_name(a.filter_ref)),
                mac: None,
                host,
                dhcp,
                ip: None,
            })
        }
    };
    let identity = TemplateIdentity {
        template: t,
        image: [disk, kernel, initrd, agentvm_image::KERNEL_CMDLINE],
        network: network_hash,
        nic_host: nic.as_ref().and_then(|n| n.host).map(|h| h.to_string()),
        nic_ip_from_lease: nic.as_ref().is_some_and(|n| n.dhcp),
    };
    let identity = serde_json::to_value(&identity)
        .map_err(|e| ReconcileError::new(Reason::TemplateEncoding, e.to_string()))?;
    let mut canonical = String::new();
    agentvm_api::resource::write_canonical_json(&identity, &mut canonical);
    let hash: String = Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let res = t.resources.resolved();
    let warmup = agentvm_run::warmup_requests(t);
    Ok(Ok(Template {
        image,
        nic,
        hash,
        vcpus: res.vcpu,
        memory_mib: u64::from(res.memory_mib),
        warmup,
        resources: t.resources.clone(),
        limits: limits::vm_limits(&t.resources),
        disk_gib: u64::from(res.disk_gib),
        from_template,
    }))
}

impl Reconciler for VmPoolReconciler {
    fn kind(&self) -> Kind {
        Kind::VmPool
    }

    fn watches(&self) -> &[Kind] {
        &[
            Kind::Image,
            Kind::Network,
            Kind::NetworkFilter,
            Kind::AgentRun,
        ]
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::VmPool(pool) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::VmPool));
        };
        let name = pool.name();
        let mut status: VmPoolStatus = status_of(&obj);
        status.observed_generation = Some(obj.generation());
        if obj.is_deleting() {
            return self.delete(&obj, name, ctx, &mut status);
        }
        let tpl = match resolve(ctx, pool)? {
            Ok(t) => t,
            Err(blocked) => {
                // Existing VMs stay as they are while a dependency is not ready.
                let c = self.counts(name, status.template_hash.as_deref().unwrap_or(""));
                self.fill_status(&mut status, &c, ctx, name);
                if blocked.failed {
                    status.phase = VmPoolPhase::Failed;
                    let err = ReconcileError::new(blocked.reason, blocked.message);
                    Conditions(&mut status.conditions).degraded(&err, false);
                } else {
                    status.phase = VmPoolPhase::Pending;
                    Conditions(&mut status.conditions).progressing(blocked.reason, blocked.message);
                }
                write_status(ctx, &obj, &status)?;
                return Ok(Action::Requeue(WAITING));
            }
        };
        self.registry.set_current_hash(name, &tpl.hash);
        status.template_hash = Some(tpl.hash.clone());
        match self.converge(&obj, pool, &tpl, ctx, &mut status) {
            Ok(action) => Ok(action),
            Err(err) => {
                let c = self.counts(name, &tpl.hash);
                self.fill_status(&mut status, &c, ctx, name);
                let min = pool.spec.min_ready.min(pool.spec.max_size);
                status.phase = VmPoolPhase::Degraded;
                Err(err
                    .with_status(&obj, &status)
                    .keeping_ready(c.ready_current >= min))
            }
        }
    }
}

#[cfg(test)]
mod tests;
