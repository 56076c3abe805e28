//! The `Backend` trait: exactly what the controller's reconcilers need from the hypervisor
//! (owned networks, nwfilters and pool VMs), implemented for libvirt by [`LibvirtBackend`] and
//! in memory by [`crate::fake::FakeBackend`].
//!
//! Every method is synchronous (callers run them on blocking threads) and idempotent where it
//! says so. Nothing here touches an object without agentvm's ownership metadata: such objects
//! are never listed, and acting on one by name fails with [`BackendError::NotOwned`].
//!
//! # Scope of a `LibvirtBackend`
//! One libvirt daemon may serve several agentvm state directories (a host controller and
//! tests, say). A backend lists only the owned objects *of its state directory*: domains whose
//! VM directory (`<state>/vms/<name>`) exists, networks and filters with a record under
//! `<state>/owned/`. So a controller garbage-collects only what it (or an earlier controller
//! on the same state directory) created; adoption after a restart still reads the ownership
//! metadata from libvirt.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Room a snapshot needs besides the guest's memory: its tables in the disk file, and
/// clusters the guest writes while it is taken.
const SNAPSHOT_OVERHEAD_BYTES: u64 = 64 << 20;

use crate::accel::{Accelerator, AcceleratorChoice};
use crate::error::{io_err, BackendError, Result};
use crate::golden::{GoldenKind, GoldenState, ResetReport, ResetStrategy, GOLDEN_SNAPSHOT};
use crate::guest::{ExecRequest, Guest};
use crate::libvirt::{DomainState, Libvirt, PowerState};
use crate::libvirt_net::OwnedFilter;
use crate::limits::{Enforcement, VmLimits};
use crate::netxml::{NetworkDef, NwFilterDef};
use crate::reconnect::Reconnecting;
use crate::template::PoolTemplate;
use crate::vm::{
    boot_domain, make_dir_with_mode, resolve_accelerator, write_private, BootImage, VmFiles,
    VmShape, PRIVATE_DIR_MODE,
};
use crate::xml::{NicSpec, Owner};

pub use crate::libvirt_net::DefineOutcome as EnsureOutcome;

/// An owned libvirt network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedNetwork {
    /// libvirt network name.
    pub name: String,
    /// Its ownership metadata.
    pub owner: Owner,
    /// True when it is running.
    pub active: bool,
}

/// File in a VM's directory holding the fingerprint of its libvirt definition at creation.
const DEFINITION_FINGERPRINT: &str = "definition.sha256";

/// An owned domain as the reconcilers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedVm {
    /// Domain name.
    pub name: String,
    /// Its ownership metadata (the pool and the template hash it was built from).
    pub owner: Owner,
    /// Run state.
    pub state: DomainState,
    /// True when its golden state exists (it finished booting, warming up and parking).
    pub golden: bool,
    /// True when its persistent libvirt definition is no longer the one agentvm defined
    /// (edited by hand, e.g. with `virsh edit`).
    pub edited: bool,
}

/// A VM to create: booted from `image`, warmed up, and (for a pool) parked at its golden
/// state. Pools, `agentvm run`, `agentvm exec`, the benchmarks and the tier-3 tests all make
/// their VMs from one of these, so the same shape gets the same limits everywhere.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRequest {
    /// Domain name (unique on the host).
    pub name: String,
    /// What it boots.
    pub image: BootImage,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Network interface; `None` for an isolated VM.
    pub nic: Option<NicSpec>,
    /// Ownership metadata (for a pool VM: kind `VmPool`, the pool's name, the template hash).
    pub owner: Owner,
    /// Commands run once after boot (before parking); each must exit 0.
    pub warmup: Vec<ExecRequest>,
    /// Limits on what the VM takes from the host.
    pub limits: VmLimits,
    /// Virtual disk size in GiB (at least the image's); `None` keeps the image's size.
    pub disk_gib: Option<u64>,
    /// CPU features hidden from the guest (see [`crate::xml::DomainSpec::disabled_cpu_features`]).
    pub disabled_cpu_features: Vec<String>,
    /// Park it at its golden state after the warm-up, to be reset after each use (pool VMs).
    /// `false` for a VM used once and destroyed (`agentvm run`, `agentvm exec`).
    pub park: bool,
    /// Make it from the pool's template when there is one for `owner.spec_hash` (see
    /// [`crate::template`]), and keep a VM that had to boot as the pool's template. Only
    /// with `park`.
    pub from_template: bool,
}

/// What taking a snapshot cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnapshotTaken {
    /// How long the guest was stopped for it.
    pub pause: Duration,
    /// Bytes of memory and device state it holds, when known (`None` for a disk-only one).
    pub memory_bytes: Option<u64>,
    /// A disk-only snapshot: true when the guest's file systems were frozen for it (false:
    /// its vCPUs were stopped instead — it was paused, or its agent could not freeze them —
    /// or it has memory).
    pub fs_frozen: bool,
}

/// Timings of a VM's creation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmReport {
    /// Start to the guest agent answering.
    pub boot: Duration,
    /// Warm-up commands.
    pub warmup: Duration,
    /// Taking the golden state (zero when not parked).
    pub park: Duration,
    /// True when it was made from the pool's template (`boot` is then the time to restore
    /// it and give it its own identity), false when it booted.
    pub from_template: bool,
    /// Whether each requested limit is in force on this host (libvirt's reason when not).
    pub limits: Enforcement,
}

/// What the reconcilers need from the hypervisor. See the module docs for ownership rules.
pub trait Backend: Send + Sync {
    /// Checks that the hypervisor answers.
    fn ping(&self) -> Result<()>;

    /// Owned networks (of this backend's scope), sorted by name.
    fn list_networks(&self) -> Result<Vec<OwnedNetwork>>;
    /// Defines the network if missing or if its ownership data (spec hash) differs, and
    /// starts it (a redefined running network is restarted to apply the change). Idempotent.
    fn ensure_network(&self, def: &NetworkDef) -> Result<EnsureOutcome>;
    /// Stops and undefines an owned network; succeeds when it does not exist.
    fn delete_network(&self, name: &str) -> Result<()>;

    /// Owned nwfilters (of this backend's scope), sorted by name.
    fn list_nwfilters(&self) -> Result<Vec<OwnedFilter>>;
    /// Defines the filter if missing or if its ownership data differs. Idempotent.
    fn ensure_nwfilter(&self, def: &NwFilterDef) -> Result<EnsureOutcome>;
    /// Undefines an owned filter; succeeds when it does not exist.
    fn delete_nwfilter(&self, name: &str) -> Result<()>;

    /// Owned domains (of this backend's scope), sorted by name.
    fn list_vms(&self) -> Result<Vec<OwnedVm>>;
    /// Creates a VM: overlay on the image, define with the owner metadata, boot, wait for the
    /// agent, run the warm-up commands, and with [`VmRequest::park`] park it at its golden
    /// state. On failure nothing of it is left behind. Every VM agentvm makes (pools,
    /// `agentvm run`, `agentvm exec`) comes from here; [`Backend::destroy_vm`] removes it.
    fn create_vm(&self, req: &VmRequest) -> Result<VmReport>;
    /// Destroys and undefines an owned VM and removes its snapshots, saved state and
    /// overlays. Succeeds when it is already gone.
    fn destroy_vm(&self, name: &str) -> Result<()>;
    /// Brings an owned, parked VM back to its golden state (memory and disk).
    fn reset_vm(&self, name: &str) -> Result<Duration>;
    /// The guest agent of a VM, to run code in it (wrap it in a [`crate::Guest`]).
    fn agent(&self, name: &str) -> Result<Box<dyn crate::guest::AgentChannel + '_>>;
    /// Hands owned VM `name` to `owner` (rewrites its ownership metadata in one step): a
    /// sandbox claiming a pool VM. From then on it is listed with the new owner.
    fn set_vm_owner(&self, name: &str, owner: &Owner) -> Result<()>;
    /// Power state of an owned VM.
    fn vm_power(&self, name: &str) -> Result<PowerState>;
    /// Drives an owned VM to `to`: [`PowerState::Running`] (resume a paused VM, restore a
    /// saved one; then its clock is set), [`PowerState::Paused`] (stop its vCPUs, memory kept)
    /// or [`PowerState::Saved`] (memory and devices saved to disk, QEMU ended). Idempotent.
    fn set_vm_power(&self, name: &str, to: PowerState) -> Result<()>;
    /// Takes snapshot `snapshot` (a DNS label) of running or paused owned VM `name`: with
    /// `memory`, memory, device state and disk, in one step while the guest is stopped;
    /// without, its disk alone, with the guest's file systems frozen for the moment (see
    /// [`crate::snapshots`]).
    fn snapshot_vm(&self, name: &str, snapshot: &str, memory: bool) -> Result<SnapshotTaken>;
    /// Brings running or paused owned VM `name` back to its snapshot `snapshot` (its clock is
    /// set afterwards when it runs). To a disk-only snapshot: the VM is stopped, its disk put
    /// back, and it boots afresh (then paused again if it was paused).
    fn rollback_vm(&self, name: &str, snapshot: &str) -> Result<()>;
    /// Deletes snapshot `snapshot` of owned VM `name`, freeing its space; succeeds when it
    /// does not exist.
    fn delete_vm_snapshot(&self, name: &str, snapshot: &str) -> Result<()>;
    /// The snapshots of owned VM `name`, sorted.
    fn vm_snapshots(&self, name: &str) -> Result<Vec<String>>;
    /// Bytes of memory and device state snapshot `snapshot` of VM `name` holds, when they
    /// can be read (`None`: not found or not readable).
    fn vm_snapshot_bytes(&self, name: &str, snapshot: &str) -> Option<u64>;
    /// Removes pool `pool`'s template (see [`crate::template`]); succeeds when there is none.
    fn remove_pool_template(&self, pool: &str) -> Result<()>;
    /// Makes `name`, owned by `owner`, a fork of kept VM `source` at its snapshot `snapshot`
    /// (see [`crate::fork`]): running, its agent answering. `source` keeps its power state.
    fn fork_vm(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
        owner: &Owner,
    ) -> Result<crate::fork::ForkReport>;
    /// The name of the reset strategy [`Backend::reset_vm`] uses (a metric label).
    fn reset_strategy(&self) -> &'static str {
        "golden"
    }

    /// Puts agentvm's guard around libvirt's nwfilter chains back in place if anything is
    /// missing (see [`crate::filter_guard`]). Backends that filter no traffic do nothing.
    fn ensure_filter_guard(&self) -> Result<()> {
        Ok(())
    }

    /// The pinned addresses of owned VMs' filtered interfaces, whatever their state (a parked
    /// VM keeps its address), for the egress proxy to tell which VM a connection comes from.
    /// Backends without networking have none.
    fn guest_addresses(&self) -> Result<Vec<crate::guest_addr::GuestAddress>> {
        Ok(Vec::new())
    }

    /// A sample of a running VM's statistics counters (CPU time, memory, disk and network
    /// I/O), for anomaly detection and usage summaries. Backends without statistics fail.
    fn vm_stats(&self, name: &str) -> Result<crate::stats::DomainStats> {
        Err(BackendError::Protocol {
            what: "domain statistics".into(),
            message: format!("this backend has no statistics for {name}"),
        })
    }

    /// The number of virtual CPUs of a running VM (CPU use is reported per vCPU). Backends
    /// that cannot tell fail.
    fn vm_vcpus(&self, name: &str) -> Result<u32> {
        Err(BackendError::Protocol {
            what: "domain vCPUs".into(),
            message: format!("this backend cannot tell the vCPUs of {name}"),
        })
    }
}

/// [`Backend`] on a libvirt daemon: one connection (reopened after it fails), per-VM files
/// under a state directory, and an accelerator (resolved on first use when `auto`).
pub struct LibvirtBackend {
    uri: String,
    conn: Reconnecting<Libvirt>,
    state_dir: PathBuf,
    accel_choice: AcceleratorChoice,
    /// The accelerator once resolved, and why it was chosen.
    accel: Mutex<Option<(Accelerator, String)>>,
    boot_timeout: Duration,
    strategy: ResetStrategy,
    tcg_tb_cache_mib: Option<u64>,
    lean_memory: bool,
    vm_ops: VmOps,
    /// Where [`crate::filter_guard`] runs: `None` off (a libvirt this host's iptables do not
    /// filter for), `Some(None)` this process's network namespace, `Some(Some(ns))` `ns`.
    filter_guard: Option<Option<String>>,
}

/// Names of the kept VMs an operation runs on, and a wake-up for those waiting their turn.
#[derive(Default)]
struct VmOps {
    busy: Mutex<std::collections::HashSet<String>>,
    done: std::sync::Condvar,
}

/// Held while an operation on a kept VM runs; see `LibvirtBackend::vm_op`.
struct VmOpGuard<'a> {
    ops: &'a VmOps,
    name: String,
}

impl Drop for VmOpGuard<'_> {
    fn drop(&mut self) {
        self.ops
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        self.ops.done.notify_all();
    }
}

impl std::fmt::Debug for LibvirtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtBackend")
            .field("uri", &self.uri)
            .field("state_dir", &self.state_dir)
            .finish()
    }
}

impl LibvirtBackend {
    /// A backend for libvirt at `uri` with VM files under `state_dir`. Connects lazily.
    pub fn new(
        uri: impl Into<String>,
        state_dir: impl Into<PathBuf>,
        accelerator: AcceleratorChoice,
        boot_timeout: Duration,
    ) -> Self {
        LibvirtBackend {
            uri: uri.into(),
            conn: Reconnecting::new(),
            state_dir: state_dir.into(),
            accel_choice: accelerator,
            accel: Mutex::new(None),
            boot_timeout,
            strategy: ResetStrategy::default(),
            tcg_tb_cache_mib: Some(crate::vm::DEFAULT_TCG_TB_CACHE_MIB),
            lean_memory: true,
            vm_ops: VmOps::default(),
            filter_guard: None,
        }
    }

    /// Keeps [`crate::filter_guard`] in place in network namespace `netns` (`None`: this
    /// process's), where libvirtd's networks live: after every network start and on each
    /// [`Backend::ensure_filter_guard`]. For a libvirtd on this host only.
    pub fn with_filter_guard(mut self, netns: Option<String>) -> Self {
        self.filter_guard = Some(netns);
        self
    }

    /// Sizes QEMU's TCG translation cache of the VMs it creates (`None`: QEMU's default of
    /// 1 GiB); see [`crate::vm::DEFAULT_TCG_TB_CACHE_MIB`].
    pub fn with_tcg_translation_cache(mut self, mib: Option<u64>) -> Self {
        self.tcg_tb_cache_mib = mib;
        self
    }

    /// Resets VMs to their golden state with `strategy` (default
    /// [`ResetStrategy::SnapshotLoadvm`]); VMs are parked the way it needs.
    pub fn with_reset_strategy(mut self, strategy: ResetStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Lean idle memory for the VMs it creates (on unless turned off; off only to measure
    /// against), see [`crate::vm::VmShape::lean_memory`].
    pub fn with_lean_memory(mut self, on: bool) -> Self {
        self.lean_memory = on;
        self
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The files of VM `name` (its directory under the state directory).
    pub fn vm_files(&self, name: &str) -> VmFiles {
        self.files(name)
    }

    /// The accelerator VMs of `image` get, and why (resolved on first use when `auto`, see
    /// [`crate::vm::resolve_accelerator`]).
    pub fn accelerator_for(&self, image: &BootImage) -> Result<(Accelerator, String)> {
        let lv = self.lv()?;
        self.accelerator(&lv, image)?;
        let accel = self.accel.lock().unwrap_or_else(|e| e.into_inner());
        Ok(accel.clone().expect("resolved just now"))
    }

    /// The libvirt daemon's version (e.g. `9.0.0`).
    pub fn libvirt_version(&self) -> Result<String> {
        self.lv()?.version()
    }

    /// Parked VM `name`'s golden state, as this backend keeps it.
    pub fn golden_state(&self, name: &str) -> GoldenState {
        GoldenState {
            name: name.to_string(),
            files: self.files(name),
            kind: self.strategy.kind(),
            strategy: self.strategy,
            park_time: Duration::ZERO,
        }
    }

    /// [`Backend::reset_vm`] with `strategy`, which must fit how the golden state is stored
    /// (the two snapshot strategies share one), and the reset's timings.
    pub fn reset_vm_with(&self, name: &str, strategy: ResetStrategy) -> Result<ResetReport> {
        self.lv()?
            .reset_to_golden_with(&self.golden_state(name), strategy, self.boot_timeout)
    }

    /// The connection, reopened first when the daemon stopped answering on it (libvirtd
    /// restarted): every caller gets a working one without restarting the controller.
    fn lv(&self) -> Result<Arc<Libvirt>> {
        self.conn
            .get(|c| c.answers(), || Libvirt::connect(&self.uri))
    }

    fn marker(&self, kind: &str, name: &str) -> Result<PathBuf> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(BackendError::Protocol {
                what: format!("{kind} name"),
                message: format!("{name:?} cannot name a record file"),
            });
        }
        Ok(self.state_dir.join("owned").join(kind).join(name))
    }

    fn mark(&self, kind: &str, name: &str) -> Result<()> {
        let path = self.marker(kind, name)?;
        if let Some(dir) = path.parent() {
            make_dir_with_mode(dir, PRIVATE_DIR_MODE)?;
        }
        write_private(&path, b"")
    }

    fn unmark(&self, kind: &str, name: &str) -> Result<()> {
        let path = self.marker(kind, name)?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    fn is_marked(&self, kind: &str, name: &str) -> bool {
        self.marker(kind, name).is_ok_and(|p| p.exists())
    }

    fn files(&self, name: &str) -> VmFiles {
        VmFiles::new(&self.state_dir, name)
    }

    fn accelerator(&self, lv: &Libvirt, image: &BootImage) -> Result<Accelerator> {
        let mut accel = self.accel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((a, _)) = &*accel {
            return Ok(*a);
        }
        let (a, why) = resolve_accelerator(lv, &self.state_dir, image, self.accel_choice)?;
        tracing::info!(accelerator = %a, %why, "accelerator for VMs");
        *accel = Some((a, why));
        Ok(a)
    }

    /// True when the domain's persistent definition differs from the one recorded when the
    /// VM was created. Unknown (no record, or libvirt cannot say) counts as not edited.
    /// Whether `name`'s definition differs from the one recorded when it was parked.
    fn edited(&self, name: &str, now: &str) -> bool {
        std::fs::read_to_string(self.files(name).dir.join(DEFINITION_FINGERPRINT))
            .is_ok_and(|recorded| now != recorded.trim())
    }

    /// Records what `name`'s definition looks like now, to notice hand edits later.
    fn record_definition(&self, lv: &Libvirt, name: &str) -> Result<()> {
        let fingerprint = lv.definition_fingerprint(name)?;
        write_private(
            &self.files(name).dir.join(DEFINITION_FINGERPRINT),
            fingerprint.as_bytes(),
        )
    }

    /// Serialises the operations that change a kept VM's power state or snapshots (power
    /// changes, snapshots, rollbacks, forks from it): held while one runs.
    fn vm_op(&self, name: &str) -> VmOpGuard<'_> {
        let mut busy = self.vm_ops.busy.lock().unwrap_or_else(|e| e.into_inner());
        while busy.contains(name) {
            busy = self
                .vm_ops
                .done
                .wait(busy)
                .unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(name.to_string());
        VmOpGuard {
            ops: &self.vm_ops,
            name: name.to_string(),
        }
    }

    fn has_golden(&self, lv: &Libvirt, name: &str) -> bool {
        match self.strategy.kind() {
            GoldenKind::InternalSnapshot => lv
                .raw()
                .lookup_domain_by_name(name)
                .and_then(|d| virt::domain::Domain::lookup_snapshot_by_name(&d, GOLDEN_SNAPSHOT, 0))
                .is_ok(),
            GoldenKind::SavedMemory => self.golden_state(name).save_file().exists(),
        }
    }
}

impl Backend for LibvirtBackend {
    fn ping(&self) -> Result<()> {
        self.lv()?.version().map(|_| ())
    }

    fn list_networks(&self) -> Result<Vec<OwnedNetwork>> {
        Ok(self
            .lv()?
            .list_owned_networks()?
            .into_iter()
            .filter(|n| self.is_marked("networks", &n.name))
            .filter_map(|n| {
                Some(OwnedNetwork {
                    owner: n.owner?,
                    name: n.name,
                    active: n.active,
                })
            })
            .collect())
    }

    fn ensure_network(&self, def: &NetworkDef) -> Result<EnsureOutcome> {
        let lv = self.lv()?;
        self.mark("networks", &def.name)?;
        let outcome = lv.define_network(def)?;
        if outcome == EnsureOutcome::Updated && lv.network_info(&def.name)?.active {
            // A running network keeps its old configuration until restarted.
            lv.destroy_network(&def.name)?;
        }
        lv.start_network(&def.name)?;
        // The network driver's first network in a namespace puts its jumps on top of
        // FORWARD: the guard goes back above them before any guest can use the network.
        self.ensure_filter_guard()?;
        Ok(outcome)
    }

    fn ensure_filter_guard(&self) -> Result<()> {
        let Some(netns) = &self.filter_guard else {
            return Ok(());
        };
        let plan = crate::filter_guard::ensure(netns.as_deref()).map_err(|message| {
            BackendError::Command {
                command: "iptables (agentvm's nwfilter guard)".into(),
                message,
            }
        })?;
        if !plan.is_empty() {
            tracing::info!("nwfilter guard put in place: {plan:?}");
        }
        Ok(())
    }

    fn delete_network(&self, name: &str) -> Result<()> {
        self.lv()?.undefine_network(name)?;
        self.unmark("networks", name)
    }

    fn list_nwfilters(&self) -> Result<Vec<OwnedFilter>> {
        Ok(self
            .lv()?
            .list_owned_nwfilters()?
            .into_iter()
            .filter(|f| self.is_marked("nwfilters", &f.name))
            .collect())
    }

    fn ensure_nwfilter(&self, def: &NwFilterDef) -> Result<EnsureOutcome> {
        let lv = self.lv()?;
        self.mark("nwfilters", &def.name)?;
        lv.define_nwfilter(def)
    }

    fn delete_nwfilter(&self, name: &str) -> Result<()> {
        self.lv()?.undefine_nwfilter(name)?;
        self.unmark("nwfilters", name)
    }

    fn guest_addresses(&self) -> Result<Vec<crate::guest_addr::GuestAddress>> {
        let lv = self.lv()?;
        Ok(lv
            .list_owned_domains()?
            .into_iter()
            .flat_map(|d| {
                d.filtered_addresses.into_iter().map(move |(filter, ip)| {
                    crate::guest_addr::GuestAddress {
                        vm: d.name.clone(),
                        owner: d.owner.clone(),
                        filter,
                        ip,
                    }
                })
            })
            .collect())
    }

    fn list_vms(&self) -> Result<Vec<OwnedVm>> {
        let lv = self.lv()?;
        Ok(lv
            .list_owned_domains()?
            .into_iter()
            .filter(|d| self.files(&d.name).dir.is_dir())
            .map(|d| OwnedVm {
                golden: self.has_golden(&lv, &d.name),
                edited: self.edited(&d.name, &d.definition_sha256),
                name: d.name,
                owner: d.owner,
                state: d.state,
            })
            .collect())
    }

    fn create_vm(&self, req: &VmRequest) -> Result<VmReport> {
        let lv = self.lv()?;
        let templates =
            req.park && req.from_template && self.strategy.kind() == GoldenKind::InternalSnapshot;
        if templates {
            if let Some(t) =
                PoolTemplate::find(&self.state_dir, &req.owner.name, &req.owner.spec_hash)
            {
                match self.pool_vm_from_template(&lv, req, &t) {
                    Ok(report) => return Ok(report),
                    Err(e) => {
                        tracing::warn!(vm = %req.name, pool = %req.owner.name, error = %e, "making a VM from the pool's template failed; booting it, and the template is dropped");
                        PoolTemplate::remove(&self.state_dir, &req.owner.name)?;
                    }
                }
            }
        }
        let shape = VmShape {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            nic: req.nic.clone(),
            accelerator: self.accelerator(&lv, &req.image)?,
            boot_timeout: self.boot_timeout,
            limits: req.limits,
            disabled_cpu_features: req.disabled_cpu_features.clone(),
            tcg_tb_cache_mib: self.tcg_tb_cache_mib,
            lean_memory: self.lean_memory,
            disk_gib: req.disk_gib,
        };
        // Booting removes what it created when it fails; past it we do.
        let booted = boot_domain(
            &lv,
            &self.state_dir,
            &req.name,
            &req.image,
            &shape,
            req.owner.clone(),
        )?;
        let name = req.name.as_str();
        let files = self.files(name);
        let finish = || -> Result<VmReport> {
            let t = Instant::now();
            let agent = lv.agent(name)?;
            Guest::new(&agent).warm_up(&req.warmup)?;
            let warmup = t.elapsed();
            let park = if req.park {
                lv.park_golden(name, &files, self.strategy, self.boot_timeout)?
                    .park_time
            } else {
                Duration::ZERO
            };
            self.record_definition(&lv, name)?;
            if templates {
                // Best effort: without a template the next VM boots too.
                match lv.save_pool_template(
                    &self.state_dir,
                    &req.owner.name,
                    &req.owner.spec_hash,
                    name,
                    &files,
                ) {
                    Ok(pause) => {
                        tracing::info!(vm = %name, pool = %req.owner.name, ?pause, "kept as the pool's template")
                    }
                    Err(e) => {
                        tracing::warn!(vm = %name, error = %e, "keeping the pool's template failed")
                    }
                }
            }
            Ok(VmReport {
                boot: booted.boot_time,
                warmup,
                park,
                limits: booted.limits.clone(),
                from_template: false,
            })
        };
        finish().inspect_err(|_| {
            if let Err(e) = lv.remove_golden(name, &files) {
                tracing::warn!(vm = %name, error = %e, "cleanup after a failed VM creation failed");
            }
        })
    }

    fn destroy_vm(&self, name: &str) -> Result<()> {
        let lv = self.lv()?;
        // Never touch (not even the files of) a domain that is not ours.
        match lv.domain_owner(name) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(BackendError::NotOwned {
                    kind: "domain",
                    name: name.to_string(),
                })
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        lv.remove_golden(name, &self.files(name))
    }

    fn reset_vm(&self, name: &str) -> Result<Duration> {
        Ok(self.reset_vm_with(name, self.strategy)?.total)
    }

    fn agent(&self, name: &str) -> Result<Box<dyn crate::guest::AgentChannel + '_>> {
        let lv = self.lv()?;
        let agent = lv.agent(name)?;
        Ok(Box::new(BackendAgent {
            backend: self,
            name: name.to_string(),
            current: Mutex::new((lv, agent)),
        }))
    }

    fn vm_stats(&self, name: &str) -> Result<crate::stats::DomainStats> {
        self.lv()?.domain_stats(name)
    }

    fn vm_vcpus(&self, name: &str) -> Result<u32> {
        let lv = self.lv()?;
        let err = |e| BackendError::from_virt(e, "domain", name);
        let info = lv
            .raw()
            .lookup_domain_by_name(name)
            .and_then(|d| d.info())
            .map_err(err)?;
        Ok(info.nr_virt_cpu)
    }

    fn set_vm_owner(&self, name: &str, owner: &Owner) -> Result<()> {
        let lv = self.lv()?;
        lv.set_domain_owner(name, owner)?;
        // The metadata is part of the definition: record the new one, so the change is not
        // taken for a hand edit.
        self.record_definition(&lv, name)
    }

    fn vm_power(&self, name: &str) -> Result<PowerState> {
        self.lv()?.power_state(name)
    }

    fn snapshot_vm(&self, name: &str, snapshot: &str, memory: bool) -> Result<SnapshotTaken> {
        let _op = self.vm_op(name);
        let lv = self.lv()?;
        // The snapshot goes into the VM's disk file: memory and device state (at most the
        // guest's memory) plus the snapshot's own tables. Refused up front when it cannot
        // fit, rather than failing half way with the guest stopped.
        let needed = SNAPSHOT_OVERHEAD_BYTES + if memory { lv.memory_bytes(name)? } else { 0 };
        let disk = self.files(name).disk();
        let dir = disk.parent().unwrap_or(&disk).to_path_buf();
        let free =
            crate::snapshots::free_bytes(&dir).map_err(crate::error::io_err("statvfs", &dir))?;
        if free < needed {
            return Err(BackendError::HostDiskFull {
                path: dir,
                what: format!("snapshot {snapshot:?} of {name}"),
                needed_bytes: needed,
                free_bytes: free,
            });
        }
        if !memory {
            let (pause, fs_frozen) =
                lv.create_disk_snapshot(name, snapshot, Duration::from_secs(10))?;
            return Ok(SnapshotTaken {
                pause,
                memory_bytes: None,
                fs_frozen,
            });
        }
        let pause = lv.create_named_snapshot(name, snapshot)?;
        Ok(SnapshotTaken {
            pause,
            memory_bytes: self.vm_snapshot_bytes(name, snapshot),
            fs_frozen: false,
        })
    }

    fn vm_snapshot_bytes(&self, name: &str, snapshot: &str) -> Option<u64> {
        let tag = crate::snapshots::snapshot_tag(snapshot);
        let info = crate::vm::qemu_img_info(&self.files(name).disk()).ok()?;
        info["snapshots"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == tag.as_str())?["vm-state-size"]
            .as_u64()
    }

    fn rollback_vm(&self, name: &str, snapshot: &str) -> Result<()> {
        let _op = self.vm_op(name);
        let lv = self.lv()?;
        if !lv.has_memory_snapshot(name, snapshot)? {
            return self.rollback_disk(&lv, name, snapshot);
        }
        lv.revert_named_snapshot(name, snapshot)?;
        if lv.power_state(name)? == PowerState::Running {
            self.refresh_after_wake(&lv, name)?;
        }
        Ok(())
    }

    fn delete_vm_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        let _op = self.vm_op(name);
        let lv = self.lv()?;
        lv.delete_named_snapshot(name, snapshot)?;
        // A disk-only one, which libvirt does not know.
        let disk = self.files(name).disk();
        let in_disk = crate::snapshots::disk_snapshots(&disk)
            .map(|s| s.iter().any(|(n, _)| n == snapshot))
            .unwrap_or(false);
        if !in_disk {
            return Ok(());
        }
        match lv.power_state(name)? {
            PowerState::Running | PowerState::Paused => lv.delete_disk_snapshot(name, snapshot),
            _ => crate::fork::delete_internal_snapshot(
                &disk,
                &crate::snapshots::snapshot_tag(snapshot),
            ),
        }
    }

    fn vm_snapshots(&self, name: &str) -> Result<Vec<String>> {
        let mut names = self.lv()?.named_snapshots(name)?;
        // Disk-only ones are in the overlay alone.
        if let Ok(in_disk) = crate::snapshots::disk_snapshots(&self.files(name).disk()) {
            names.extend(in_disk.into_iter().map(|(n, _)| n));
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn remove_pool_template(&self, pool: &str) -> Result<()> {
        PoolTemplate::remove(&self.state_dir, pool)
    }

    fn fork_vm(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
        owner: &Owner,
    ) -> Result<crate::fork::ForkReport> {
        let lv = self.lv()?;
        let _op = self.vm_op(source);
        let report = lv.fork_domain(
            &self.state_dir,
            source,
            snapshot,
            name,
            owner,
            self.boot_timeout,
        )?;
        self.record_definition(&lv, name)?;
        Ok(report)
    }

    fn set_vm_power(&self, name: &str, to: PowerState) -> Result<()> {
        let _op = self.vm_op(name);
        let lv = self.lv()?;
        let now = lv.power_state(name)?;
        match (now, to) {
            (a, b) if a == b => Ok(()),
            (PowerState::Running | PowerState::Paused, PowerState::Saved) => {
                // The new QEMU process after the restore has a new agent socket.
                crate::agent_conn::forget(name);
                lv.save_domain(name)
            }
            (PowerState::Running, PowerState::Paused) => lv.suspend_domain(name),
            (PowerState::Paused, PowerState::Running) => {
                lv.resume_domain(name)?;
                self.refresh_after_wake(&lv, name)
            }
            (PowerState::Saved | PowerState::Off, PowerState::Running | PowerState::Paused) => {
                crate::agent_conn::forget(name);
                lv.start_domain(name)?;
                self.refresh_after_wake(&lv, name)?;
                if to == PowerState::Paused {
                    lv.suspend_domain(name)?;
                }
                Ok(())
            }
            (now, to) => Err(BackendError::Protocol {
                what: format!("power state of {name}"),
                message: format!("cannot go from {now:?} to {to:?}"),
            }),
        }
    }

    fn reset_strategy(&self) -> &'static str {
        self.strategy.as_str()
    }
}

impl LibvirtBackend {
    /// [`Backend::create_vm`] of a pool VM from pool template `t`; removes what it made on
    /// failure.
    fn pool_vm_from_template(
        &self,
        lv: &Libvirt,
        req: &VmRequest,
        t: &PoolTemplate,
    ) -> Result<VmReport> {
        let start = Instant::now();
        if lv.raw().lookup_domain_by_name(&req.name).is_ok() {
            return Err(BackendError::AlreadyExists {
                kind: "domain",
                name: req.name.clone(),
            });
        }
        let files = self.files(&req.name);
        let xml = t.definition_for(&self.state_dir, &req.name, &files)?;
        crate::vm::make_dir(&files.dir)?;
        let made = || -> Result<VmReport> {
            std::fs::copy(t.disk(), files.disk())
                .map_err(io_err("copy the pool template to", &files.disk()))?;
            let addrs = lv.start_from_copy(
                &xml,
                &req.name,
                &files,
                GOLDEN_SNAPSHOT,
                &req.owner,
                self.boot_timeout,
            )?;
            let limits = lv.enforcement_of(&req.name, &req.limits, req.nic.is_some());
            if let Some(nic) = req
                .nic
                .as_ref()
                .filter(|n| n.dhcp && n.filter.is_some() && n.ip.is_none())
            {
                let bandwidth =
                    if crate::limits::not_applied(&limits, crate::limits::Limit::NetBandwidth)
                        .is_none()
                    {
                        req.limits.net_bandwidth
                    } else {
                        crate::xml::NetBandwidth::default()
                    };
                lv.pin_leased_ip(&req.name, nic, bandwidth, &addrs, Duration::from_secs(10))?;
            }
            let boot = start.elapsed();
            // Its own golden state, with its own identity in it.
            let golden = lv.park_golden(&req.name, &files, self.strategy, self.boot_timeout)?;
            self.record_definition(lv, &req.name)?;
            Ok(VmReport {
                boot,
                warmup: Duration::ZERO,
                park: golden.park_time,
                limits,
                from_template: true,
            })
        };
        made().inspect_err(|_| {
            if let Err(e) = lv.remove_golden(&req.name, &files) {
                tracing::warn!(vm = %req.name, error = %e, "cleanup after a failed VM from template failed");
            }
        })
    }

    /// [`Backend::rollback_vm`] to disk-only snapshot `snapshot`: the VM is stopped (what
    /// ran in it is dropped), its disk put back with `qemu-img snapshot -a`, and it boots
    /// (paused again afterwards if it was paused).
    fn rollback_disk(&self, lv: &Libvirt, name: &str, snapshot: &str) -> Result<()> {
        let disk = self.files(name).disk();
        if !crate::snapshots::disk_snapshots(&disk)?
            .iter()
            .any(|(n, _)| n == snapshot)
        {
            return Err(BackendError::NotFound {
                kind: "snapshot",
                name: snapshot.to_string(),
            });
        }
        let was = lv.power_state(name)?;
        crate::agent_conn::forget(name);
        lv.destroy_domain(name)?;
        crate::snapshots::apply_internal_snapshot(&disk, snapshot)?;
        lv.start_domain(name)?;
        self.refresh_after_wake(lv, name)?;
        if was == PowerState::Paused {
            lv.suspend_domain(name)?;
        }
        Ok(())
    }

    /// After a resume or restore: waits for the guest agent, then sets the guest clock (it
    /// stood still meanwhile) and stirs its RNG.
    fn refresh_after_wake(&self, lv: &Libvirt, name: &str) -> Result<()> {
        let agent = lv.agent(name)?;
        Guest::new(&agent).wait_ready(self.boot_timeout)?;
        crate::golden::refresh_guest(&agent, self.boot_timeout).map(|_| ())
    }
}

/// A VM's guest agent that follows the backend's connection: when libvirtd restarts during
/// a run, the next command goes through the new connection.
struct BackendAgent<'a> {
    backend: &'a LibvirtBackend,
    name: String,
    current: Mutex<(Arc<Libvirt>, crate::libvirt::DomainAgent)>,
}

impl crate::guest::AgentChannel for BackendAgent<'_> {
    fn vm_name(&self) -> &str {
        &self.name
    }

    fn command(&self, command: &serde_json::Value, timeout: Duration) -> Result<serde_json::Value> {
        let lv = self.backend.lv()?;
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&cur.0, &lv) {
            *cur = (lv.clone(), lv.agent(&self.name)?);
        }
        cur.1.command(command, timeout)
    }

    fn agent_socket(&self) -> Option<std::path::PathBuf> {
        let lv = self.backend.lv().ok()?;
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if !Arc::ptr_eq(&cur.0, &lv) {
            *cur = (lv.clone(), lv.agent(&self.name).ok()?);
        }
        cur.1.agent_socket()
    }
}

/// A VM made with [`Backend::create_vm`] for one use (`agentvm run`, `agentvm exec`, a
/// benchmark, a test) and destroyed with [`Backend::destroy_vm`] when dropped.
pub struct EphemeralVm<'a> {
    backend: &'a LibvirtBackend,
    name: String,
    torn_down: bool,
    /// What its creation cost, and which limits are in force.
    pub report: VmReport,
}

impl std::fmt::Debug for EphemeralVm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EphemeralVm")
            .field("name", &self.name)
            .field("report", &self.report)
            .finish()
    }
}

impl<'a> EphemeralVm<'a> {
    /// Creates the VM `req` asks for (see [`Backend::create_vm`]).
    pub fn create(backend: &'a LibvirtBackend, req: &VmRequest) -> Result<Self> {
        let report = backend.create_vm(req)?;
        Ok(EphemeralVm {
            backend,
            name: req.name.clone(),
            torn_down: false,
            report,
        })
    }

    /// The domain name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The VM's files.
    pub fn files(&self) -> VmFiles {
        self.backend.files(&self.name)
    }

    /// Its guest agent (through the backend's connection; wrap it in a [`Guest`]).
    pub fn agent(&self) -> Result<Box<dyn crate::guest::AgentChannel + 'a>> {
        self.backend.agent(&self.name)
    }

    /// Its golden state (when it was parked).
    pub fn golden(&self) -> GoldenState {
        GoldenState {
            park_time: self.report.park,
            ..self.backend.golden_state(&self.name)
        }
    }

    /// Resets it to its golden state with the backend's strategy.
    pub fn reset(&self) -> Result<ResetReport> {
        self.backend
            .reset_vm_with(&self.name, self.backend.strategy)
    }

    /// Resets it with `strategy` (see [`LibvirtBackend::reset_vm_with`]).
    pub fn reset_with(&self, strategy: ResetStrategy) -> Result<ResetReport> {
        self.backend.reset_vm_with(&self.name, strategy)
    }

    /// Destroys and undefines the domain and deletes its files.
    pub fn teardown(mut self) -> Result<()> {
        self.torn_down = true;
        self.backend.destroy_vm(&self.name)
    }
}

impl Drop for EphemeralVm<'_> {
    fn drop(&mut self) {
        if !self.torn_down {
            if let Err(e) = self.backend.destroy_vm(&self.name) {
                tracing::warn!(vm = %self.name, error = %e, "teardown of VM failed");
            }
        }
    }
}
