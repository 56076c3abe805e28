//! `AgentRun` → one execution in a VM taken from its pool.
//!
//! Lifecycle: `Pending → Scheduled → Running → Succeeded | Failed | TimedOut | Cancelled`.
//!
//! - **Scheduling** is fair FIFO per pool: only the oldest pending run of a pool (store
//!   creation time, then name) may take a VM; the others wait (`Queued`). The number of
//!   waiting runs is published in the [`PoolRegistry`], so the pool reconciler starts VMs
//!   beyond `minReady`, up to `maxSize`. A VM is handed out from memory
//!   ([`PoolRegistry::acquire`]).
//! - **Execution** runs on a thread of its own (never on the dispatcher's workers): host
//!   inputs are read first ([`run::prepare`]: secrets from the controller's environment or
//!   files, never stored; every host path with the rights of the run's submitter, see
//!   [`agentvm_run::host_access`]), then [`run::execute`] streams redacted output into the store
//!   ([`Store::append_output`](agentvm_store::Store::append_output)) so `agentvm logs -f`
//!   follows it, artifacts are collected to a fresh `<stateDir>/artifacts/<run>-<time>/`
//!   (regular files and directories only, see [`agentvm_run::artifacts`]) and the final
//!   status is written. The VM is then reset to golden on the same thread (still busy, so
//!   the pool leaves it alone) and made ready again; a failed reset hands it to the pool
//!   reconciler as needing one (which retries or replaces it). A VM whose QEMU died
//!   (`VmLost`) or whose agent stopped answering until the timeout (`TimedOut` /
//!   `GuestUnresponsive`) is destroyed instead, and the pool starts another.
//! - **Anomalies**: while the program runs, a [`RunMonitor`] samples the VM about once a
//!   second against the pool's `spec.anomalies`; anomalies go into the status as they are
//!   found, and with policy `kill` the run is killed in the guest and ends `Failed` with
//!   reason `AnomalyPolicy`. The same samples give the final `resourceUsage`.
//! - **Cancellation**: deleting a running run kills its process group in the guest; the run
//!   ends `Cancelled`, its VM is reset, and the deletion is finalized.
//! - **Restart recovery**: a run found `Scheduled` or `Running` that this process is not
//!   executing was left by an earlier controller: it ends `Failed` with reason
//!   `ControllerRestarted` (the pool adopts its VM as needing a reset).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use agentvm_api::{
    AgentRun, AgentRunPhase, AgentRunStatus, CollectedArtifact, Kind, Reason, Resource,
};
use agentvm_backend::{Backend, BackendError, Guest, Stream};

use super::{condition, status_of, write_status, PoolRegistry, VmPhase};
use crate::audit::{AuditEvent, AuditEventType};
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler, Wake};
use agentvm_api::time::Timestamp;
use agentvm_run::artifacts::RunDir;
use agentvm_run::host_access::HostAccess;
use agentvm_run::monitor::{MonitorReport, MonitorTarget, RunMonitor, SAMPLE_INTERVAL};
use agentvm_run::{self as run, Redactor, RunError};
use agentvm_store::{ObjectKey, OutputStream, StoredObject};

mod outcome;
use outcome::{classify, Ending, ProgramEnd, Verdict};

/// Bytes of each output stream kept in `status.stdoutTail` / `stderrTail`.
pub const TAIL_BYTES: usize = 4096;
/// Condition type: the run has (or has not yet) been given a VM.
pub const SCHEDULED: &str = "Scheduled";
/// Condition type: the run has ended.
pub const COMPLETED: &str = "Completed";

/// Condition type: whether the declared artifacts were copied to the host (`False` with
/// reason `CollectionFailed` when copying failed).
pub const ARTIFACTS_COLLECTED: &str = "ArtifactsCollected";
/// Condition type: some artifacts were left in the guest because of `maxSizeMib`.
pub const ARTIFACTS_TRUNCATED: &str = "ArtifactsTruncated";
/// Condition type: output beyond `output.maxMib` was dropped (reason `OutputCapReached`, the
/// byte counts in its message).
pub const OUTPUT_TRUNCATED: &str = "OutputTruncated";
/// Condition type: some declared artifact paths did not exist in the guest.
pub const ARTIFACTS_MISSING: &str = "ArtifactsMissing";
/// Condition type: some entries of the guest's artifact archives were not unpacked (links,
/// device nodes, FIFOs, paths leading out of the run's directory), or a whole archive was
/// refused (malformed, or over the cap); the message names each and why.
pub const ARTIFACTS_REJECTED: &str = "ArtifactsRejected";
/// Where runs' artifact directories are, under the state directory.
pub const ARTIFACTS_DIR: &str = "artifacts";

/// How long after its timeout a run's program may take to end once killed in the guest. A
/// guest that has not ended it by then (its agent starved by a fork bomb, stopped, or
/// hung) gets its VM destroyed: `timeoutSeconds` is a hard limit whatever the guest does.
pub const KILL_GRACE: Duration = Duration::from_secs(5);

/// Looks up a host environment variable (the controller's own environment by default).
pub type HostEnv = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

struct Active {
    cancel: Arc<AtomicBool>,
}

/// Reconciles `AgentRun`s: schedules them on pool VMs and executes them on threads.
pub struct AgentRunReconciler {
    backend: Arc<dyn Backend>,
    registry: Arc<PoolRegistry>,
    host_env: HostEnv,
    active: Arc<Mutex<HashMap<String, Active>>>,
    waiting: Arc<Mutex<Waiting>>,
    wake: Arc<OnceLock<Wake>>,
    sandboxes: Arc<super::Sandboxes>,
    /// Overrides the inputs timeout (tests); otherwise the clone timeout + [`INPUTS_GRACE`].
    inputs_timeout: Option<Duration>,
}

/// How long reading a run's inputs may take beyond the `gitUrl` clone timeout before the run
/// fails (`InputUnavailable`): files and secrets are small, but a host path may hang.
pub const INPUTS_GRACE: Duration = Duration::from_secs(60);

/// How long a queued or waiting run goes without a look of its own. A backstop only: a VM
/// becoming ready wakes the first run in line, a run leaving the queue wakes the next, and
/// read inputs wake their run.
const BACKSTOP: Duration = Duration::from_secs(5);

/// The runs that wait, per pool, and the host inputs of the first in line.
#[derive(Default)]
struct Waiting {
    pools: HashMap<String, PoolQueue>,
    /// By run name, with the (creation time, generation) they were read for.
    inputs: HashMap<String, ((Timestamp, i64), Inputs)>,
}

/// Pending runs of one pool in FIFO order (creation time, then name).
#[derive(Default)]
struct PoolQueue {
    /// Filled from the store when the pool is first seen, so that after a restart the order
    /// is creation order whatever order the runs are reconciled in.
    seeded: bool,
    runs: BTreeSet<(Timestamp, String)>,
}

/// A run's host inputs (files, secrets, workspace).
enum Inputs {
    /// Being read on a thread of their own since then.
    Reading(Instant),
    /// Read: the run takes them with its VM.
    Read(Result<run::PreparedRun, RunError>),
}

impl std::fmt::Debug for AgentRunReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRunReconciler").finish_non_exhaustive()
    }
}

impl AgentRunReconciler {
    /// Runs on VMs of `registry`'s pools, executed through `backend`; secrets come from the
    /// controller's environment.
    pub fn new(backend: Arc<dyn Backend>, registry: Arc<PoolRegistry>) -> Self {
        let r = AgentRunReconciler {
            backend,
            registry: registry.clone(),
            host_env: Arc::new(|k| std::env::var(k).ok()),
            active: Arc::default(),
            waiting: Arc::default(),
            wake: Arc::default(),
            sandboxes: Arc::default(),
            inputs_timeout: None,
        };
        // A VM becoming ready wakes the first run waiting for one.
        let (waiting, wake) = (r.waiting.clone(), r.wake.clone());
        registry.on_vm_ready(Arc::new(move |pool| {
            let head = waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pools
                .get(pool)
                .and_then(|q| q.runs.first().map(|(_, n)| n.clone()));
            if let (Some(head), Some(wake)) = (head, wake.get()) {
                wake.add(ObjectKey::new(Kind::AgentRun, &head));
            }
        }));
        r
    }

    /// Records runs in sandboxes as their activity in `sandboxes` (the `Sandbox`
    /// reconciler's record).
    pub fn sandboxes(mut self, sandboxes: Arc<super::Sandboxes>) -> Self {
        self.sandboxes = sandboxes;
        self
    }

    /// Fails a run whose inputs take longer than `timeout` to read (tests; the default is
    /// the `gitUrl` clone timeout plus [`INPUTS_GRACE`]).
    pub fn inputs_timeout(mut self, timeout: Duration) -> Self {
        self.inputs_timeout = Some(timeout);
        self
    }

    fn inputs_timeout_in(&self, ctx: &Ctx) -> Duration {
        self.inputs_timeout.unwrap_or_else(|| {
            Duration::from_secs(ctx.config.git_clone_timeout_seconds.max(1)) + INPUTS_GRACE
        })
    }

    /// Reads secrets' host environment variables through `env` instead (tests).
    pub fn host_env(mut self, env: HostEnv) -> Self {
        self.host_env = env;
        self
    }

    /// Names of the runs this process is executing now.
    pub fn executing(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Active>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `run`'s host inputs on a thread of its own, then wakes the run. Waited for at
    /// most the inputs timeout ([`INPUTS_GRACE`]); a thread still reading then is left to
    /// finish, its result dropped.
    fn read_inputs(&self, obj: &StoredObject, run: &AgentRun, ctx: &Ctx, key: (Timestamp, i64)) {
        let base = base_dir(obj, ctx);
        let access = HostAccess::of_submitter(
            obj.submitter.as_ref(),
            &ctx.config.secret_env_allow_list,
            ctx.config.git_clone_timeout(),
        );
        let (spec, name) = (run.spec.clone(), run.metadata.name.clone());
        let (host_env, waiting, wake) = (
            self.host_env.clone(),
            self.waiting.clone(),
            self.wake.clone(),
        );
        let thread_name = format!("inputs-{name}");
        let read = move || {
            let r = run::prepare(&spec, &base, &access, &*host_env);
            let mut w = waiting.lock().unwrap_or_else(|e| e.into_inner());
            // Only if the run still wants these (not deleted or changed meanwhile).
            if matches!(w.inputs.get(&name), Some((k, Inputs::Reading(_))) if *k == key) {
                w.inputs.insert(name.clone(), (key, Inputs::Read(r)));
                drop(w);
                if let Some(wake) = wake.get() {
                    wake.add(ObjectKey::new(Kind::AgentRun, &name));
                }
            }
        };
        if let Err(e) = std::thread::Builder::new().name(thread_name).spawn(read) {
            tracing::warn!(run = %run.metadata.name, error = %e, "no thread to read the run's inputs; retrying");
            self.waiting().inputs.remove(&run.metadata.name);
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `me` in `pool`'s FIFO (filled from the store the first time the pool is seen)
    /// and drops from its head runs that no longer wait (deleted, started, or replaced by a
    /// new object of the same name). Returns `me`'s position and the queue's length.
    fn enqueue(
        &self,
        ctx: &Ctx,
        pool: &str,
        me: &(Timestamp, String),
    ) -> Result<(usize, usize), ReconcileError> {
        let mut w = self.waiting();
        let q = w.pools.entry(pool.to_string()).or_default();
        if !q.seeded {
            for o in ctx.cache.list(Some(Kind::AgentRun))? {
                if let Resource::AgentRun(r) = &o.resource {
                    if r.spec.pool_ref == pool
                        && !o.is_deleting()
                        && status_of::<AgentRunStatus>(&o).phase == AgentRunPhase::Pending
                    {
                        q.runs.insert((o.created_at, r.metadata.name.clone()));
                    }
                }
            }
            q.seeded = true;
        }
        q.runs.insert(me.clone());
        while let Some(first) = q.runs.first().cloned() {
            if &first == me || self.still_waits(ctx, &first)? {
                break;
            }
            q.runs.remove(&first);
        }
        let position = q.runs.iter().position(|e| e == me).unwrap_or(0);
        Ok((position, q.runs.len()))
    }

    /// Whether the stored run `entry` is still the pending run that was queued.
    fn still_waits(
        &self,
        ctx: &Ctx,
        (created, name): &(Timestamp, String),
    ) -> Result<bool, ReconcileError> {
        if self.lock().contains_key(name) {
            return Ok(false);
        }
        Ok(ctx.cache.get(Kind::AgentRun, name)?.is_some_and(|o| {
            o.created_at == *created
                && !o.is_deleting()
                && status_of::<AgentRunStatus>(&o).phase == AgentRunPhase::Pending
        }))
    }

    /// Takes `entry` out of its pool's queue (and its inputs), and wakes the run now first
    /// in line.
    fn dequeue(&self, pool: &str, entry: &(Timestamp, String)) {
        let head = {
            let mut w = self.waiting();
            w.inputs.remove(&entry.1);
            let Some(q) = w.pools.get_mut(pool) else {
                return;
            };
            q.runs.remove(entry);
            q.runs.first().map(|(_, n)| n.clone())
        };
        if let (Some(head), Some(wake)) = (head, self.wake.get()) {
            wake.add(ObjectKey::new(Kind::AgentRun, &head));
        }
    }

    fn pending(
        &self,
        obj: &StoredObject,
        run: &AgentRun,
        ctx: &Ctx,
        mut status: AgentRunStatus,
    ) -> Result<Action, ReconcileError> {
        if let Some(sandbox) = &run.spec.sandbox_ref {
            return self.pending_in_sandbox(obj, run, ctx, status, sandbox);
        }
        let name = run.metadata.name.as_str();
        let pool = run.spec.pool_ref.as_str();
        let before = status.clone();
        let pool_ok = ctx
            .cache
            .get(Kind::VmPool, pool)?
            .is_some_and(|p| !p.is_deleting());
        if !pool_ok {
            status.reason = Some(Reason::PoolNotFound.into());
            set(
                &mut status,
                SCHEDULED,
                false,
                Reason::PoolNotFound,
                format!("VmPool {pool} does not exist"),
            );
            write_if_changed(ctx, obj, &before, &status)?;
            return Ok(Action::Requeue(Duration::from_secs(2)));
        }
        let me = (obj.created_at, name.to_string());
        let (position, waiting) = self.enqueue(ctx, pool, &me)?;
        self.registry.set_waiting(pool, waiting as u32);
        ctx.metrics.queue_length(pool, waiting);
        if position > 0 {
            status.reason = Some(Reason::Queued.into());
            set(
                &mut status,
                SCHEDULED,
                false,
                Reason::Queued,
                format!("{position} run(s) ahead in the queue of pool {pool}"),
            );
            write_if_changed(ctx, obj, &before, &status)?;
            // Woken when the run ahead of it leaves the queue.
            return Ok(Action::Requeue(BACKSTOP));
        }
        // First in line: read the host inputs before taking a VM (a missing secret must not
        // cost one).
        let read = match self.take_inputs(obj, run, ctx) {
            Ok(read) => read,
            // Woken when they are read, or at their deadline.
            Err(left) => return Ok(Action::Requeue(left.min(BACKSTOP))),
        };
        let prepared = match read {
            Ok(p) => p,
            Err(e) => {
                self.dequeue(pool, &me);
                self.registry
                    .set_waiting(pool, waiting.saturating_sub(1) as u32);
                return inputs_failed(obj, ctx, status, e, "pool", pool);
            }
        };
        let acquired = Instant::now();
        let Some(vm) = self.registry.acquire(pool) else {
            // Kept for the next try.
            self.waiting().inputs.insert(
                name.to_string(),
                (
                    (obj.created_at, obj.generation()),
                    Inputs::Read(Ok(prepared)),
                ),
            );
            status.reason = Some(Reason::WaitingForVm.into());
            set(
                &mut status,
                SCHEDULED,
                false,
                Reason::WaitingForVm,
                format!("no VM of pool {pool} is ready"),
            );
            write_if_changed(ctx, obj, &before, &status)?;
            // Woken when a VM of the pool becomes ready.
            return Ok(Action::Requeue(BACKSTOP));
        };
        ctx.metrics.acquire(pool, acquired.elapsed().as_secs_f64());
        tracing::info!(run = name, pool, vm, took = ?acquired.elapsed(), "run scheduled");
        self.registry
            .set_waiting(pool, waiting.saturating_sub(1) as u32);
        let scheduled = self.schedule(
            obj,
            ctx,
            &mut status,
            &vm,
            format!("VM {vm} of pool {pool}"),
        );
        let cancel = match scheduled {
            Ok(cancel) => cancel,
            Err(e) => {
                self.registry.release(pool, &vm);
                self.waiting().inputs.insert(
                    name.to_string(),
                    (
                        (obj.created_at, obj.generation()),
                        Inputs::Read(Ok(prepared)),
                    ),
                );
                return Err(e);
            }
        };
        self.dequeue(pool, &me);
        self.spawn_job(obj, run, ctx, status, pool, vm, cancel, prepared, None)
    }

    /// Marks the run `Scheduled` on `vm` (`message` says where) and executing in this
    /// process, and writes its status; on a failed write it is not executing. Returns its
    /// cancel flag.
    fn schedule(
        &self,
        obj: &StoredObject,
        ctx: &Ctx,
        status: &mut AgentRunStatus,
        vm: &str,
        message: String,
    ) -> Result<Arc<AtomicBool>, ReconcileError> {
        let name = obj.resource.name();
        status.phase = AgentRunPhase::Scheduled;
        status.vm = Some(vm.to_string());
        status.reason = Some(Reason::Scheduled.into());
        set(status, SCHEDULED, true, Reason::Scheduled, message);
        let cancel = Arc::new(AtomicBool::new(false));
        self.lock().insert(
            name.to_string(),
            Active {
                cancel: cancel.clone(),
            },
        );
        if let Err(e) = write_status(ctx, obj, status) {
            self.lock().remove(name);
            return Err(e);
        }
        Ok(cancel)
    }

    /// The run's host inputs (files, secrets, workspace): read once, on a thread of their
    /// own (a git clone may take a while), which wakes the run when it is done. While they
    /// are being read, how long they may still take; past that, an
    /// [`RunError::InputsTimedOut`] error.
    fn take_inputs(
        &self,
        obj: &StoredObject,
        run: &AgentRun,
        ctx: &Ctx,
    ) -> Result<Result<run::PreparedRun, RunError>, Duration> {
        let name = run.metadata.name.as_str();
        let timeout = self.inputs_timeout_in(ctx);
        let mut w = self.waiting();
        let key = (obj.created_at, obj.generation());
        match w.inputs.remove(name) {
            Some((k, Inputs::Read(r))) if k == key => Ok(r),
            Some((k, Inputs::Reading(since))) if k == key => {
                if since.elapsed() >= timeout {
                    // Left out of the map: the reading thread's late result is dropped.
                    tracing::warn!(run = name, ?timeout, "reading the run's inputs timed out");
                    return Ok(Err(RunError::InputsTimedOut { after: timeout }));
                }
                w.inputs
                    .insert(name.to_string(), (k, Inputs::Reading(since)));
                Err(timeout - since.elapsed())
            }
            _ => {
                w.inputs
                    .insert(name.to_string(), (key, Inputs::Reading(Instant::now())));
                drop(w);
                self.read_inputs(obj, run, ctx, key);
                Err(timeout)
            }
        }
    }

    /// Starts the run's [`Job`] on VM `vm` (of `pool`; kept for `sandbox` when given).
    #[allow(clippy::too_many_arguments)]
    fn spawn_job(
        &self,
        obj: &StoredObject,
        run: &AgentRun,
        ctx: &Ctx,
        status: AgentRunStatus,
        pool: &str,
        vm: String,
        cancel: Arc<AtomicBool>,
        prepared: run::PreparedRun,
        sandbox: Option<super::sandbox::InUse>,
    ) -> Result<Action, ReconcileError> {
        let name = run.metadata.name.as_str();
        let job = Job {
            name: name.to_string(),
            submitter: submitter(obj),
            pool: pool.to_string(),
            vm,
            run: run.clone(),
            generation: obj.generation(),
            ctx: ctx.clone(),
            backend: self.backend.clone(),
            registry: self.registry.clone(),
            active: self.active.clone(),
            cancel,
            status,
            sandbox,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("run-{name}"))
            .spawn(move || job.run(prepared));
        if let Err(e) = spawned {
            self.lock().remove(name);
            return Err(ReconcileError::new(Reason::ThreadSpawn, e.to_string()));
        }
        Ok(Action::AwaitChange)
    }

    /// A run with `sandboxRef`: runs at once (no queue) in the sandbox's VM while the
    /// sandbox runs, and leaves the VM as it is.
    fn pending_in_sandbox(
        &self,
        obj: &StoredObject,
        run: &AgentRun,
        ctx: &Ctx,
        mut status: AgentRunStatus,
        sandbox: &str,
    ) -> Result<Action, ReconcileError> {
        let name = run.metadata.name.as_str();
        let before = status.clone();
        let wait = |status: &mut AgentRunStatus, reason: Reason, message: String| {
            status.reason = Some(reason.into());
            set(status, SCHEDULED, false, reason, message);
        };
        let sb_obj = match ctx.store.get(Kind::Sandbox, sandbox)? {
            Some(o) if !o.is_deleting() => o,
            _ => {
                wait(
                    &mut status,
                    Reason::SandboxNotFound,
                    format!("Sandbox {sandbox} does not exist"),
                );
                write_if_changed(ctx, obj, &before, &status)?;
                return Ok(Action::Requeue(Duration::from_secs(2)));
            }
        };
        let Resource::Sandbox(sb) = &sb_obj.resource else {
            return Err(super::wrong_kind(&sb_obj, Kind::Sandbox));
        };
        // A sandbox holds its owner's work: only they (and root) may run in it.
        let owner = sb_obj.submitter.as_ref().map_or(0, |c| c.uid);
        let by = obj.submitter.as_ref().map_or(0, |c| c.uid);
        if by != 0 && by != owner {
            let message = format!(
                "Sandbox {sandbox} belongs to {}; only they and root may run in it",
                sb_obj
                    .submitter
                    .as_ref()
                    .map_or_else(|| "root".to_string(), |c| c.to_string())
            );
            return refused(
                obj,
                ctx,
                status,
                Reason::NotPermitted,
                message,
                "sandbox",
                sandbox,
            );
        }
        let st = sb.status.clone().unwrap_or_default();
        let vm = match (&st.vm, st.phase) {
            (Some(vm), agentvm_api::SandboxPhase::Running)
                if st.stopped_reason.is_none()
                    && sb.spec.state == agentvm_api::SandboxState::Running =>
            {
                vm.clone()
            }
            _ => {
                if sb.spec.state == agentvm_api::SandboxState::Running {
                    // Stopped for being idle: this run is a use.
                    self.sandboxes.wake(sandbox);
                }
                wait(
                    &mut status,
                    Reason::WaitingForSandbox,
                    format!(
                        "Sandbox {sandbox} is {} (spec.state {}); the run starts when it runs",
                        st.phase.as_str(),
                        sb.spec.state.as_str()
                    ),
                );
                write_if_changed(ctx, obj, &before, &status)?;
                return Ok(Action::Requeue(Duration::from_secs(1)));
            }
        };
        let read = match self.take_inputs(obj, run, ctx) {
            Ok(read) => read,
            Err(left) => return Ok(Action::Requeue(left.min(BACKSTOP))),
        };
        let prepared = match read {
            Ok(p) => p,
            Err(e) => return inputs_failed(obj, ctx, status, e, "sandbox", sandbox),
        };
        let in_use = self.sandboxes.begin(sandbox);
        tracing::info!(run = name, sandbox, vm, "run scheduled in a sandbox");
        let cancel = self.schedule(
            obj,
            ctx,
            &mut status,
            &vm,
            format!("VM {vm} of sandbox {sandbox}"),
        )?;
        let pool = st.pool.clone().unwrap_or_default();
        self.spawn_job(
            obj,
            run,
            ctx,
            status,
            &pool,
            vm,
            cancel,
            prepared,
            Some(in_use),
        )
    }
}

/// Ends a run whose host inputs could not be read (see [`refused`]). `place` and `at` name
/// where it would have run (`pool`/`sandbox`, its name).
fn inputs_failed(
    obj: &StoredObject,
    ctx: &Ctx,
    status: AgentRunStatus,
    e: RunError,
    place: &str,
    at: &str,
) -> Result<Action, ReconcileError> {
    let reason = match e {
        RunError::Secret { .. } => Reason::SecretUnavailable,
        _ => Reason::InputUnavailable,
    };
    refused(obj, ctx, status, reason, e.to_string(), place, at)
}

/// Ends a run before it started: `Failed` with `reason` and `message`, in the audit log.
fn refused(
    obj: &StoredObject,
    ctx: &Ctx,
    mut status: AgentRunStatus,
    reason: Reason,
    message: String,
    place: &str,
    at: &str,
) -> Result<Action, ReconcileError> {
    let name = obj.resource.name();
    tracing::warn!(run = name, submitter = %submitter(obj), reason = reason.as_str(), "{message}");
    finish(&mut status, AgentRunPhase::Failed, reason, message.clone());
    write_status(ctx, obj, &status)?;
    ctx.audit.record(
        AuditEvent::new(
            AuditEventType::RunFinished,
            Kind::AgentRun,
            name,
            submitter(obj),
        )
        .details(serde_json::json!({
            place: at,
            "phase": "Failed",
            "reason": reason,
            "message": message,
        })),
    );
    Ok(Action::AwaitChange)
}

/// Who submitted `obj`, for messages and the audit log.
fn submitter(obj: &StoredObject) -> String {
    obj.submitter
        .as_ref()
        .map_or_else(|| "unknown".to_string(), ToString::to_string)
}

/// The directory relative input paths (`fromFile`, `hostPath`) are resolved against.
/// `agentvm apply -f` and the spec-directory source make them absolute (against the
/// manifest's directory) before they reach the store; a relative path that still arrives
/// (another API client) resolves against the controller's state directory.
fn base_dir(_obj: &StoredObject, ctx: &Ctx) -> PathBuf {
    ctx.config.state_dir.clone()
}

fn set(status: &mut AgentRunStatus, type_: &str, ok: bool, reason: Reason, message: String) {
    agentvm_api::set_condition(
        &mut status.conditions,
        condition(type_, ok, reason, message),
    );
}

fn write_if_changed(
    ctx: &Ctx,
    obj: &StoredObject,
    before: &AgentRunStatus,
    status: &AgentRunStatus,
) -> Result<(), ReconcileError> {
    if before != status {
        write_status(ctx, obj, status)?;
    }
    Ok(())
}

/// Ends `status` in `phase` with `reason` (finishedAt now, `Completed` condition).
fn finish(status: &mut AgentRunStatus, phase: AgentRunPhase, reason: Reason, message: String) {
    status.phase = phase;
    status.reason = Some(reason.into());
    status.finished_at = Some(Timestamp::now());
    set(status, COMPLETED, true, reason, message);
}

/// The artifact conditions of a finished collection.
fn artifact_conditions(status: &mut AgentRunStatus, report: &run::ArtifactReport, cap: u64) {
    set(
        status,
        ARTIFACTS_COLLECTED,
        true,
        Reason::Collected,
        format!(
            "{} artifact(s) collected into {}",
            report.collected.len(),
            report.dir.display()
        ),
    );
    if report.rejected_total > 0 {
        set(
            status,
            ARTIFACTS_REJECTED,
            true,
            Reason::UnsafeEntries,
            report.rejected_message(),
        );
    }
    if !report.skipped.is_empty() {
        set(
            status,
            ARTIFACTS_TRUNCATED,
            true,
            Reason::SizeCapReached,
            report.skipped_message(cap),
        );
    }
    if !report.missing.is_empty() {
        set(
            status,
            ARTIFACTS_MISSING,
            true,
            Reason::PathNotFound,
            format!("not in the guest: {}", report.missing.join(", ")),
        );
    }
}

/// The last `TAIL_BYTES` of a stream, kept as it arrives.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, d: &[u8]) {
        self.0.extend_from_slice(d);
        if self.0.len() > 2 * TAIL_BYTES {
            self.0.drain(..self.0.len() - TAIL_BYTES);
        }
    }
    fn text(&self) -> String {
        let start = self.0.len().saturating_sub(TAIL_BYTES);
        String::from_utf8_lossy(&self.0[start..]).into_owned()
    }
}

/// Ends a run whose guest does not: armed when the program starts, it destroys the VM once
/// the program's timeout plus [`KILL_GRACE`] has passed and the run has not ended. Every
/// call the run's thread is making on that VM then fails at once (the domain is not
/// running), so the run ends within moments.
#[derive(Clone)]
struct Watchdog {
    /// Set when the program starts (deadline = then + timeout + grace); `done` when the
    /// program's execution returned.
    state: Arc<(Mutex<WatchState>, std::sync::Condvar)>,
    fired: Arc<AtomicBool>,
}

/// How long the run's thread still waits for the program's execution once the deadline
/// thread destroyed the VM: a call stuck in libvirt is then left behind (on the execution's
/// own thread) so that the run ends on time.
const ABANDON_AFTER: Duration = Duration::from_secs(4);

#[derive(Default)]
struct WatchState {
    deadline: Option<Instant>,
    done: bool,
}

impl Watchdog {
    /// `destroy`: destroy the VM at the deadline (a pool VM); a sandbox's VM is kept, and
    /// the run is only abandoned.
    fn start(backend: Arc<dyn Backend>, run: String, vm: String, destroy: bool) -> Watchdog {
        let state: Arc<(Mutex<WatchState>, std::sync::Condvar)> = Arc::default();
        let fired = Arc::new(AtomicBool::new(false));
        let (st, f) = (state.clone(), fired.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("deadline-{run}"))
            .spawn(move || {
                let (lock, cv) = &*st;
                let mut w = lock.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if w.done {
                        return;
                    }
                    match w.deadline {
                        None => {
                            w = cv.wait(w).unwrap_or_else(|e| e.into_inner());
                        }
                        Some(d) if Instant::now() < d => {
                            let left = d.saturating_duration_since(Instant::now());
                            w = cv.wait_timeout(w, left).unwrap_or_else(|e| e.into_inner()).0;
                        }
                        Some(_) => {
                            // Decided under the lock: a `finish` that returns false happened
                            // before this, so nobody takes the run as ended on time while
                            // its VM is being destroyed.
                            f.store(true, Ordering::SeqCst);
                            break;
                        }
                    }
                }
                drop(w);
                if !destroy {
                    tracing::warn!(run = %run, %vm, "the program did not end within its timeout and the kill grace; abandoning it (the sandbox's VM is kept)");
                    return;
                }
                tracing::warn!(run = %run, %vm, "the program did not end within its timeout and the kill grace; destroying its VM");
                let t = Instant::now();
                match backend.destroy_vm(&vm) {
                    Ok(()) => tracing::info!(run = %run, %vm, took = ?t.elapsed(), "VM destroyed at the run's hard deadline"),
                    Err(e) => tracing::warn!(run = %run, %vm, error = %e, took = ?t.elapsed(), "destroying the VM at the run's hard deadline failed"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the run's deadline thread; its timeout is enforced in the guest only");
        }
        Watchdog { state, fired }
    }

    fn arm(&self, timeout: Duration) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).deadline =
            Some(Instant::now() + timeout + KILL_GRACE);
        cv.notify_all();
    }

    /// True once it decided to destroy the VM.
    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Disarms it; true when it had already destroyed the VM.
    fn finish(&self) -> bool {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).done = true;
        cv.notify_all();
        self.fired.load(Ordering::SeqCst)
    }
}

/// What executing a run left, for [`Job::record_ending`].
struct Executed {
    result: Result<run::RunResult, RunError>,
    /// The deadline thread destroyed the VM.
    hard_stopped: bool,
    report: MonitorReport,
    artifacts: Vec<CollectedArtifact>,
    /// The last lines of stdout and stderr.
    tails: (String, String),
}

/// One run being executed on its own thread.
struct Job {
    name: String,
    /// Who submitted the run (`uid=1000(alice)`).
    submitter: String,
    pool: String,
    vm: String,
    run: AgentRun,
    generation: i64,
    ctx: Ctx,
    backend: Arc<dyn Backend>,
    registry: Arc<PoolRegistry>,
    active: Arc<Mutex<HashMap<String, Active>>>,
    cancel: Arc<AtomicBool>,
    status: AgentRunStatus,
    /// Set for a run in a sandbox: its VM is kept as the run leaves it (never reset, never
    /// destroyed), and the run counts as the sandbox's activity until this is dropped.
    sandbox: Option<super::sandbox::InUse>,
}

impl Job {
    /// A fresh directory for this run's artifacts: `<stateDir>/artifacts/<run>-<time>/`,
    /// group-owned by the socket group when one is configured (its members use the API
    /// that reports the paths).
    fn artifact_dir(&self) -> Result<RunDir, RunError> {
        let parent = self.ctx.config.state_dir.join(ARTIFACTS_DIR);
        let gid = self.ctx.config.socket_gid().ok().flatten();
        RunDir::create(&parent, &self.name, gid).map_err(|e| RunError::Input {
            what: "artifacts",
            path: parent,
            message: e.to_string(),
        })
    }

    fn write(&self) {
        if let Err(e) = self
            .ctx
            .store
            .update_status(&self.name, self.status.clone())
        {
            tracing::warn!(run = %self.name, error = %e, "writing the run status failed");
        }
    }

    /// Runs the program on a thread of its own and waits for it, but once the deadline
    /// thread has destroyed the VM at most [`ABANDON_AFTER`] more: a call stuck in libvirt
    /// must not hold the run past its hard timeout (the execution's thread then ends on its
    /// own, its calls failing on the gone VM).
    fn execute(
        &self,
        prepared: run::PreparedRun,
        spec: &agentvm_api::AgentRunSpec,
        watchdog: &Watchdog,
        tails: Arc<Mutex<(Tail, Tail)>>,
    ) -> Result<run::RunResult, RunError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (backend, vm, cancel) = (self.backend.clone(), self.vm.clone(), self.cancel.clone());
        let (store, name, spec, arm) = (
            self.ctx.store.clone(),
            self.name.clone(),
            spec.clone(),
            watchdog.clone(),
        );
        let program_timeout = Duration::from_secs(u64::from(spec.timeout_seconds));
        let output_cap = spec.output.max_bytes();
        let spawned = std::thread::Builder::new()
            .name(format!("exec-{}", self.name))
            .spawn(move || {
                let r = backend.agent(&vm).map_err(RunError::Backend).and_then(|chan| {
                    let g = Guest::with_cancel(&*chan, cancel);
                    run::execute(
                        &g,
                        &spec,
                        &prepared,
                        &mut || arm.arm(program_timeout),
                        &mut |s, d| {
                            let stream = {
                                let mut t = tails.lock().unwrap_or_else(|e| e.into_inner());
                                match s {
                                    Stream::Stdout => {
                                        t.0.push(d);
                                        OutputStream::Stdout
                                    }
                                    Stream::Stderr => {
                                        t.1.push(d);
                                        OutputStream::Stderr
                                    }
                                }
                            };
                            if let Err(e) = store.append_output(&name, stream, d, output_cap) {
                                tracing::warn!(run = %name, error = %e, "storing output failed");
                            }
                        },
                    )
                });
                // The run may have stopped waiting; nothing to do then.
                let _ = tx.send(r);
            });
        if let Err(e) = spawned {
            return Err(RunError::Backend(agentvm_backend::BackendError::Io {
                op: "start a thread for",
                path: PathBuf::from(&self.name),
                source: e,
            }));
        }
        let mut fired_at: Option<Instant> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(r) => return r,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(RunError::Backend(BackendError::VmNotRunning {
                        vm: self.vm.clone(),
                    }))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if watchdog.fired() {
                        let at = *fired_at.get_or_insert_with(Instant::now);
                        if at.elapsed() >= ABANDON_AFTER {
                            tracing::warn!(run = %self.name, vm = %self.vm, "the program's execution did not return after its VM was destroyed; leaving it behind");
                            return Err(RunError::Backend(BackendError::VmNotRunning {
                                vm: self.vm.clone(),
                            }));
                        }
                    }
                }
            }
        }
    }

    /// Starts sampling the VM for anomalies (settings and size from the run's pool).
    fn start_monitor(&self) -> Option<RunMonitor> {
        let pool = match self.ctx.store.get(Kind::VmPool, &self.pool) {
            Ok(Some(o)) => match o.resource {
                Resource::VmPool(p) => p,
                _ => return None,
            },
            _ => return None,
        };
        let res = pool.spec.template.resources.resolved();
        let target = MonitorTarget {
            run: self.name.clone(),
            pool: self.pool.clone(),
            vm: self.vm.clone(),
            settings: pool.spec.anomalies.clone(),
            vcpus: res.vcpu,
            memory_bytes: u64::from(res.memory_mib) << 20,
        };
        let backend = self.backend.clone();
        let stats = self
            .ctx
            .vm_stats
            .watch(&self.vm, SAMPLE_INTERVAL, || {
                Box::new(crate::vm_stats::BackendStatsSource::new(backend))
            })
            .inspect_err(
                |e| tracing::warn!(run = %self.name, error = %e, "cannot watch the VM's statistics"),
            )
            .ok()?;
        RunMonitor::start(
            self.backend.clone(),
            Arc::new(anomalies::ControllerSink(self.ctx.clone())),
            Box::new(stats),
            target,
            self.status.clone(),
            self.cancel.clone(),
            SAMPLE_INTERVAL,
        )
        .inspect_err(
            |e| tracing::warn!(run = %self.name, error = %e, "cannot start the anomaly monitor"),
        )
        .ok()
    }

    /// Executes the run, records how it ended, then hands its VM back.
    fn run(mut self, prepared: run::PreparedRun) {
        let started = Instant::now();
        let spec = self.run.spec.clone();
        let secrets = prepared.secret_values().to_vec();
        let executed = self.execute_run(prepared, &spec, &secrets, started);
        let replace_vm = self.record_ending(executed, &spec, &secrets, started);
        self.hand_back_vm(replace_vm);
    }

    /// Executes the run: marks it `Running`, runs the program under the deadline thread and
    /// the anomaly monitor, and collects its artifacts when it ended by itself.
    fn execute_run(
        &mut self,
        prepared: run::PreparedRun,
        spec: &agentvm_api::AgentRunSpec,
        secrets: &[String],
        started: Instant,
    ) -> Executed {
        let tails: Arc<Mutex<(Tail, Tail)>> = Arc::default();
        let (mut hard_stopped, mut report, mut artifacts) =
            (false, MonitorReport::default(), vec![]);
        let watchdog = Watchdog::start(
            self.backend.clone(),
            self.name.clone(),
            self.vm.clone(),
            self.sandbox.is_none(),
        );
        // The guest agent answers (the channel itself is not kept).
        let reachable = self.backend.agent(&self.vm).map(drop);
        let result = match reachable {
            Err(e) => Err(RunError::Backend(e)),
            Ok(()) => {
                self.mark_running(secrets);
                let monitor = self.start_monitor();
                let r = self.execute(prepared, spec, &watchdog, tails.clone());
                hard_stopped = watchdog.finish();
                tracing::info!(run = %self.name, took = ?started.elapsed(), hard_stopped, ok = r.is_ok(), "the program's execution returned");
                if let Some(m) = monitor {
                    // A VM destroyed at the hard deadline gives no further sample.
                    report = if hard_stopped {
                        m.stop_within(Duration::ZERO)
                    } else {
                        m.stop()
                    };
                }
                if r.is_ok() && !self.cancel.load(Ordering::SeqCst) {
                    if let Some(a) = &spec.artifacts {
                        artifacts = self.collect_artifacts(a);
                    }
                }
                r
            }
        };
        watchdog.finish();
        let t = tails.lock().unwrap_or_else(|e| e.into_inner());
        Executed {
            result,
            hard_stopped,
            report,
            artifacts,
            tails: (t.0.text(), t.1.text()),
        }
    }

    /// `Running` in the status and the audit log (whose lines hide the run's secrets from
    /// now on).
    fn mark_running(&mut self, secrets: &[String]) {
        self.status.phase = AgentRunPhase::Running;
        self.status.reason = Some(Reason::Running.into());
        self.status.started_at = Some(Timestamp::now());
        self.status.node.clone_from(&self.ctx.node);
        self.status.observed_generation = Some(self.generation);
        self.write();
        self.ctx.audit.add_secrets(secrets.iter());
        self.ctx.audit.record(
            AuditEvent::new(
                AuditEventType::RunStarted,
                Kind::AgentRun,
                &self.name,
                "controller",
            )
            .vm(&self.vm)
            .details(serde_json::json!({"pool": self.pool, "submitter": self.submitter})),
        );
    }

    /// Copies the run's artifacts out of the guest; the `ArtifactsCollected` condition says
    /// how that went.
    fn collect_artifacts(&mut self, a: &agentvm_api::Artifacts) -> Vec<CollectedArtifact> {
        let cap = u64::from(a.max_size_mib) * 1024 * 1024;
        let collected = self
            .backend
            .agent(&self.vm)
            .map_err(RunError::Backend)
            .and_then(|chan| {
                let g = Guest::with_cancel(&*chan, self.cancel.clone());
                self.artifact_dir()
                    .and_then(|mut dir| run::collect_artifacts(&g, &a.paths, &mut dir, cap))
            });
        match collected {
            Ok(report) => {
                artifact_conditions(&mut self.status, &report, cap);
                report
                    .collected
                    .into_iter()
                    .map(|a| CollectedArtifact {
                        path: a.guest_path,
                        host_path: a.host_path.display().to_string(),
                        size_bytes: a.size_bytes,
                        sha256: a.sha256,
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(run = %self.name, error = %e, "collecting artifacts failed");
                set(
                    &mut self.status,
                    ARTIFACTS_COLLECTED,
                    false,
                    Reason::CollectionFailed,
                    e.to_string(),
                );
                Vec::new()
            }
        }
    }

    /// Writes the run's final status (output, artifacts, anomalies, usage, egress, and the
    /// phase [`classify`] gives), its metric and its `run_finished` audit event. True when
    /// its VM is not to be trusted with another run.
    fn record_ending(
        &mut self,
        ex: Executed,
        spec: &agentvm_api::AgentRunSpec,
        secrets: &[String],
        started: Instant,
    ) -> bool {
        let cancelled = self.cancel.load(Ordering::SeqCst);
        let redact = |s: String| {
            String::from_utf8_lossy(&Redactor::redact_all(secrets, s.as_bytes())).into_owned()
        };
        let fate = self.fate();
        let st = &mut self.status;
        (st.stdout_tail, st.stderr_tail) = ex.tails;
        st.artifacts = ex.artifacts;
        st.anomalies = ex.report.anomalies;
        st.resource_usage = ex.report.usage;
        // Connections still open now are not in it (they are logged when they end).
        st.egress = self.ctx.egress.take(&self.name);
        if let Ok(r) = &ex.result {
            st.output = Some(r.output);
            st.guest_agent = Some(r.outcome.served_by.as_str().to_string());
            if let Some(message) = r.truncated_message(spec.output.max_mib) {
                set(
                    st,
                    OUTPUT_TRUNCATED,
                    true,
                    Reason::OutputCapReached,
                    message,
                );
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let ending = Ending {
            hard_stopped: ex.hard_stopped,
            anomaly_kill: ex.report.killed.then(|| {
                st.anomalies
                    .first()
                    .map(|a| format!("{}: {}", a.rule, a.message))
            }),
            cancelled,
            result: ex.result.as_ref().map(|r| ProgramEnd {
                exit_code: r.outcome.exit_code,
                signal: r.outcome.signal,
                timed_out: r.outcome.timed_out,
            }),
            timeout_seconds: spec.timeout_seconds,
            secs,
            vm: &self.vm,
            fate,
        };
        let verdict = classify(&ending, &redact);
        if verdict.from_program {
            st.exit_code = ending.result.ok().and_then(|end| end.exit_code);
        }
        let Verdict { phase, reason, .. } = verdict;
        tracing::info!(run = %self.name, vm = %self.vm, ?phase, reason = reason.as_str(), took = ?started.elapsed(), "run finished");
        finish(st, phase, reason, verdict.message);
        let label = phase.as_str().to_lowercase();
        self.ctx.metrics.execution_finished(&label, secs);
        self.write();
        self.ctx.audit.record(
            AuditEvent::new(
                AuditEventType::RunFinished,
                Kind::AgentRun,
                &self.name,
                "controller",
            )
            .vm(&self.vm)
            .details(serde_json::json!({
                "phase": phase.as_str(),
                "reason": reason,
                "exitCode": self.status.exit_code,
                "durationSeconds": secs,
                "anomalies": self.status.anomalies.len(),
            })),
        );
        self.ctx.audit.remove_secrets(secrets.iter());
        verdict.replace_vm
    }

    /// Back to golden right here (the VM is still busy, so the pool leaves it alone), then
    /// ready for the next run: a pool reconciler busy booting another VM does not delay it.
    /// If the reset fails, the pool gets it as needing a reset (and replaces it). A VM that
    /// passed the pool's TTL during the run is handed back unreset: the pool replaces it. A
    /// VM the run lost (QEMU gone, agent silent) is destroyed right here. Then a deletion
    /// requested meanwhile is finalized.
    fn hand_back_vm(mut self, replace_vm: bool) {
        if self.sandbox.is_some() {
            // The sandbox's VM stays as the run left it; the sandbox reconciler watches it.
            self.sandbox = None;
        } else if replace_vm {
            self.destroy_lost_vm();
        } else if self.registry.expired(&self.pool, &self.vm) {
            tracing::info!(pool = %self.pool, vm = %self.vm, "VM past its TTL; the pool replaces it");
            self.registry.release(&self.pool, &self.vm);
        } else {
            self.reset_after_run();
        }
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        if let Ok(Some(o)) = self.ctx.store.get(Kind::AgentRun, &self.name) {
            if o.is_deleting() {
                let _ = self.ctx.store.finalize_delete(Kind::AgentRun, &self.name);
            }
        }
    }

    /// What becomes of a VM the run lost, for messages.
    fn fate(&self) -> &'static str {
        if self.sandbox.is_some() {
            "kept: it is the sandbox's"
        } else {
            "replaced: destroyed, the pool boots another"
        }
    }

    /// Still busy, so the pool leaves it alone while it goes; the pool then starts a
    /// replacement.
    fn destroy_lost_vm(&self) {
        tracing::warn!(pool = %self.pool, vm = %self.vm, "destroying the VM the run lost; the pool replaces it");
        match self.backend.destroy_vm(&self.vm) {
            Ok(()) => {
                self.registry.remove(&self.pool, &self.vm);
                self.ctx.metrics.vm_removed(&self.vm);
                self.ctx.audit.record(
                    AuditEvent::new(
                        AuditEventType::VmDestroyed,
                        Kind::VmPool,
                        &self.pool,
                        "controller",
                    )
                    .vm(&self.vm)
                    .details(serde_json::json!({ "reason": "lost during a run" })),
                );
            }
            Err(e) => {
                tracing::warn!(pool = %self.pool, vm = %self.vm, error = %e, "destroying the lost VM failed; the pool takes over");
                self.registry.release(&self.pool, &self.vm);
            }
        }
    }

    fn reset_after_run(&self) {
        match self.backend.reset_vm(&self.vm) {
            Ok(took) => {
                tracing::info!(pool = %self.pool, vm = %self.vm, ?took, "VM reset to golden");
                super::vm_pool::vm_reset(&self.ctx, &*self.backend, &self.pool, &self.vm, took);
                if !self
                    .registry
                    .transition(&self.pool, &self.vm, VmPhase::Busy, VmPhase::Ready)
                {
                    self.registry.release(&self.pool, &self.vm);
                }
            }
            Err(e) => {
                tracing::warn!(pool = %self.pool, vm = %self.vm, error = %e, "reset after the run failed; the pool takes over");
                self.registry.release(&self.pool, &self.vm);
            }
        }
    }
}

impl Reconciler for AgentRunReconciler {
    fn kind(&self) -> Kind {
        Kind::AgentRun
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::AgentRun(run) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::AgentRun));
        };
        let name = run.metadata.name.as_str();
        self.wake.get_or_init(|| ctx.wake.clone());
        let mut status: AgentRunStatus = status_of(&obj);
        if let Some(a) = self.lock().get(name) {
            // Executing here: the thread owns the status. A deletion cancels it.
            if obj.is_deleting() {
                a.cancel.store(true, Ordering::SeqCst);
                return Ok(Action::Requeue(Duration::from_millis(200)));
            }
            return Ok(Action::AwaitChange);
        }
        let finalize = |ctx: &Ctx| -> Result<Action, ReconcileError> {
            if obj.is_deleting() {
                ctx.store.finalize_delete(Kind::AgentRun, name)?;
            }
            Ok(Action::AwaitChange)
        };
        match status.phase {
            p if p.is_terminal() => finalize(ctx),
            AgentRunPhase::Scheduled | AgentRunPhase::Running => {
                // The run may have ended here between reading `obj` and looking at the
                // runs executing: its final status is in the store then.
                if let Some(now) = ctx.store.get(Kind::AgentRun, name)? {
                    if status_of::<AgentRunStatus>(&now).phase.is_terminal() {
                        return finalize(ctx);
                    }
                }
                // Not executing in this process: an earlier controller, here or on another
                // node, was running it. It is never started again.
                let (reason, message) = match &status.node {
                    Some(node) if ctx.node.as_ref() != Some(node) => (
                        Reason::NodeLost,
                        format!("node {node}, which was running it, stopped or lost its cluster lease; the run is not started again"),
                    ),
                    _ => (
                        Reason::ControllerRestarted,
                        "the controller restarted while the run was in flight".into(),
                    ),
                };
                finish(&mut status, AgentRunPhase::Failed, reason, message);
                write_status(ctx, &obj, &status)?;
                finalize(ctx)
            }
            _ => {
                status.observed_generation = Some(obj.generation());
                if obj.is_deleting() {
                    self.dequeue(&run.spec.pool_ref, &(obj.created_at, name.to_string()));
                    finish(
                        &mut status,
                        AgentRunPhase::Cancelled,
                        Reason::Cancelled,
                        "deleted before it started".into(),
                    );
                    write_status(ctx, &obj, &status)?;
                    return finalize(ctx);
                }
                self.pending(&obj, run, ctx, status)
            }
        }
    }
}

mod anomalies;
#[cfg(test)]
mod tests;
