//! `FakeBackend`: an in-memory [`Backend`] for tests of the controller. It keeps networks,
//! filters and domains (owned or foreign), records every call in order, and fails the next
//! call of an operation when told to (a queue of injected errors per operation).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use virt::error::{ErrorNumber, ErrorNumberEnum};

use crate::backend::{Backend, EnsureOutcome, OwnedNetwork, OwnedVm, VmReport, VmRequest};
use crate::error::{BackendError, Result};
use crate::libvirt::{DomainState, PowerState};
use crate::libvirt_net::OwnedFilter;
use crate::netxml::{NetworkDef, NwFilterDef};
use crate::xml::Owner;

/// Memory and device state of every snapshot the fake takes.
pub const FAKE_SNAPSHOT_BYTES: u64 = 1 << 20;

/// An operation of the [`Backend`] trait, for injecting failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Backend::ping`].
    Ping,
    /// [`Backend::list_networks`].
    ListNetworks,
    /// [`Backend::ensure_network`].
    EnsureNetwork,
    /// [`Backend::delete_network`].
    DeleteNetwork,
    /// [`Backend::list_nwfilters`].
    ListNwFilters,
    /// [`Backend::ensure_nwfilter`].
    EnsureNwFilter,
    /// [`Backend::delete_nwfilter`].
    DeleteNwFilter,
    /// [`Backend::list_vms`].
    ListVms,
    /// [`Backend::create_vm`].
    CreatePoolVm,
    /// [`Backend::destroy_vm`].
    DestroyVm,
    /// [`Backend::reset_vm`].
    ResetVm,
    /// [`Backend::agent`].
    Agent,
    /// [`Backend::set_vm_owner`].
    SetVmOwner,
    /// [`Backend::vm_power`].
    VmPower,
    /// [`Backend::set_vm_power`].
    SetVmPower,
    /// [`Backend::snapshot_vm`].
    SnapshotVm,
    /// [`Backend::rollback_vm`].
    RollbackVm,
    /// [`Backend::delete_vm_snapshot`].
    DeleteVmSnapshot,
    /// [`Backend::fork_vm`] (the call names the fork).
    ForkVm,
    /// [`Backend::remove_pool_template`] (the call names the pool).
    RemovePoolTemplate,
}

/// One recorded call: the operation and the object name it acted on (empty for lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The operation.
    pub op: Op,
    /// The libvirt object's name.
    pub name: String,
}

impl Call {
    /// True for calls that change something (not lists or pings).
    pub fn is_mutation(&self) -> bool {
        !matches!(
            self.op,
            Op::Ping | Op::ListNetworks | Op::ListNwFilters | Op::ListVms | Op::Agent | Op::VmPower
        )
    }
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}({})", self.op, self.name)
    }
}

/// A network in the fake hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeNetwork {
    /// Ownership; `None` for a foreign network.
    pub owner: Option<Owner>,
    /// Running.
    pub active: bool,
}

/// A domain in the fake hypervisor.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeDomain {
    /// Ownership; `None` for a foreign domain.
    pub owner: Option<Owner>,
    /// Run state.
    pub state: DomainState,
    /// Parked at a golden state.
    pub golden: bool,
    /// libvirt network its NIC is attached to.
    pub network: Option<String>,
    /// nwfilter on its NIC.
    pub filter: Option<String>,
    /// Resets it went through.
    pub resets: u32,
    /// Its definition was edited by hand.
    pub edited: bool,
}

#[derive(Default)]
struct State {
    networks: BTreeMap<String, FakeNetwork>,
    filters: BTreeMap<String, Option<Owner>>,
    domains: BTreeMap<String, FakeDomain>,
    calls: Vec<Call>,
    failures: HashMap<Op, VecDeque<BackendError>>,
    /// Limits this fake host cannot enforce, with the reason it gives.
    unenforceable: BTreeMap<crate::limits::Limit, String>,
    /// Every pool VM request received, in order (also the failed ones).
    pool_vm_requests: Vec<VmRequest>,
    /// Paused or saved domains (absent: as their `state` says).
    power: BTreeMap<String, PowerState>,
    /// Named snapshots by domain.
    snapshots: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Rollbacks by domain, in order.
    rollbacks: Vec<(String, String)>,
    /// Disk-only snapshots, as (domain, snapshot).
    disk_only: std::collections::BTreeSet<(String, String)>,
}

/// Answers [`Backend::vm_stats`] for a VM name.
pub type StatsFn = dyn Fn(&str) -> Result<crate::stats::DomainStats> + Send + Sync;

/// Answers reads of guest files a fake agent does not hold itself: (VM name, path) → content.
pub type GuestFileFn = dyn Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync;

/// In-memory [`Backend`]. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Default)]
pub struct FakeBackend {
    state: Mutex<State>,
    stats: Mutex<Option<std::sync::Arc<StatsFn>>>,
    guest_files: Mutex<Option<std::sync::Arc<GuestFileFn>>>,
}

impl FakeBackend {
    /// Rollbacks done, as (domain, snapshot), in order.
    pub fn rollbacks(&self) -> Vec<(String, String)> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rollbacks
            .clone()
    }

    fn power_of(s: &State, name: &str) -> Result<PowerState> {
        match s.domains.get(name) {
            None => Err(BackendError::NotFound {
                kind: "domain",
                name: name.to_string(),
            }),
            Some(FakeDomain { owner: None, .. }) => Err(not_owned("domain", name)),
            Some(d) => Ok(match (d.state, s.power.get(name)) {
                (DomainState::Running, Some(PowerState::Paused)) => PowerState::Paused,
                (DomainState::Running, _) => PowerState::Running,
                (DomainState::ShutOff, Some(PowerState::Saved)) => PowerState::Saved,
                (DomainState::ShutOff, _) => PowerState::Off,
                (DomainState::Other, _) => PowerState::Other,
            }),
        }
    }
}

impl std::fmt::Debug for FakeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeBackend").finish_non_exhaustive()
    }
}

fn not_owned(kind: &'static str, name: &str) -> BackendError {
    BackendError::NotOwned {
        kind,
        name: name.to_string(),
    }
}

impl FakeBackend {
    /// An empty hypervisor.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on, VMs created with `limit` report it as not in force, for `why` (they
    /// still boot, as on a real host that cannot enforce it).
    pub fn cannot_enforce(&self, limit: crate::limits::Limit, why: &str) {
        self.lock().unenforceable.insert(limit, why.to_string());
    }

    /// Makes [`Backend::vm_stats`] answer with `f` (by default it has no statistics).
    pub fn set_vm_stats(
        &self,
        f: impl Fn(&str) -> Result<crate::stats::DomainStats> + Send + Sync + 'static,
    ) {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(f));
    }

    /// Makes the guests' agents answer reads of files they do not hold with `f` (e.g. a
    /// run cgroup's `cpu.stat` that grows with time).
    pub fn set_guest_files(
        &self,
        f: impl Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) {
        *self.guest_files.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(f));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the call and returns the injected error, if one is queued for `op`.
    fn enter(&self, op: Op, name: &str) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.lock();
        s.calls.push(Call {
            op,
            name: name.to_string(),
        });
        if let Some(err) = s.failures.get_mut(&op).and_then(VecDeque::pop_front) {
            return Err(err);
        }
        Ok(s)
    }

    /// Makes the next call of `op` fail with `error` (queued after earlier injections).
    pub fn fail_next(&self, op: Op, error: BackendError) {
        self.lock().failures.entry(op).or_default().push_back(error);
    }

    /// A libvirt-style error for injection.
    pub fn libvirt_error(message: &str) -> BackendError {
        BackendError::Libvirt {
            code: ErrorNumberEnum::Known(ErrorNumber::InternalError),
            message: message.into(),
        }
    }

    /// Every [`Backend::create_vm`] request so far, in order.
    pub fn pool_vm_requests(&self) -> Vec<VmRequest> {
        self.lock().pool_vm_requests.clone()
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The calls that changed something, in order, as `Op(name)` strings.
    pub fn mutations(&self) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.is_mutation())
            .map(Call::to_string)
            .collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The networks (owned and foreign).
    pub fn networks(&self) -> BTreeMap<String, FakeNetwork> {
        self.lock().networks.clone()
    }

    /// The filters (owned and foreign) with their owners.
    pub fn filters(&self) -> BTreeMap<String, Option<Owner>> {
        self.lock().filters.clone()
    }

    /// The domains (owned and foreign).
    pub fn domains(&self) -> BTreeMap<String, FakeDomain> {
        self.lock().domains.clone()
    }

    /// Adds a domain without ownership metadata (someone else's).
    pub fn add_foreign_domain(&self, name: &str) {
        self.lock().domains.insert(
            name.to_string(),
            FakeDomain {
                owner: None,
                state: DomainState::Running,
                golden: false,
                network: None,
                filter: None,
                resets: 0,
                edited: false,
            },
        );
    }

    /// Adds an owned domain directly (e.g. left by an earlier controller).
    pub fn add_owned_domain(&self, name: &str, owner: Owner, golden: bool) {
        self.lock().domains.insert(
            name.to_string(),
            FakeDomain {
                owner: Some(owner),
                state: DomainState::Running,
                golden,
                network: None,
                filter: None,
                resets: 0,
                edited: false,
            },
        );
    }

    /// Adds a network without ownership metadata.
    pub fn add_foreign_network(&self, name: &str) {
        self.lock().networks.insert(
            name.to_string(),
            FakeNetwork {
                owner: None,
                active: true,
            },
        );
    }

    /// Adds a filter without ownership metadata.
    pub fn add_foreign_filter(&self, name: &str) {
        self.lock().filters.insert(name.to_string(), None);
    }

    /// Adds an owned network directly.
    pub fn add_owned_network(&self, name: &str, owner: Owner) {
        self.lock().networks.insert(
            name.to_string(),
            FakeNetwork {
                owner: Some(owner),
                active: true,
            },
        );
    }

    /// Adds an owned filter directly.
    pub fn add_owned_filter(&self, name: &str, owner: Owner) {
        self.lock().filters.insert(name.to_string(), Some(owner));
    }

    /// `virsh destroy` by hand: the domain stays defined, shut off.
    pub fn stop_domain_by_hand(&self, name: &str) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.state = DomainState::ShutOff;
        }
    }

    /// `virsh edit` by hand (the definition no longer matches what was defined).
    pub fn edit_domain_by_hand(&self, name: &str) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.edited = true;
        }
    }

    /// `virsh destroy` + `undefine` by hand.
    pub fn remove_domain_by_hand(&self, name: &str) {
        self.lock().domains.remove(name);
    }

    /// `virsh net-destroy` + `net-undefine` by hand.
    pub fn remove_network_by_hand(&self, name: &str) {
        self.lock().networks.remove(name);
    }

    /// `virsh nwfilter-undefine` by hand.
    pub fn remove_filter_by_hand(&self, name: &str) {
        self.lock().filters.remove(name);
    }
}

impl Backend for FakeBackend {
    fn ping(&self) -> Result<()> {
        self.enter(Op::Ping, "").map(|_| ())
    }

    fn list_networks(&self) -> Result<Vec<OwnedNetwork>> {
        let s = self.enter(Op::ListNetworks, "")?;
        Ok(s.networks
            .iter()
            .filter_map(|(name, n)| {
                Some(OwnedNetwork {
                    name: name.clone(),
                    owner: n.owner.clone()?,
                    active: n.active,
                })
            })
            .collect())
    }

    fn ensure_network(&self, def: &NetworkDef) -> Result<EnsureOutcome> {
        let mut s = self.enter(Op::EnsureNetwork, &def.name)?;
        let outcome = match s.networks.get(&def.name) {
            None => EnsureOutcome::Created,
            Some(FakeNetwork { owner: None, .. }) => return Err(not_owned("network", &def.name)),
            Some(FakeNetwork {
                owner: Some(owner), ..
            }) if *owner == def.owner => EnsureOutcome::Unchanged,
            Some(_) => EnsureOutcome::Updated,
        };
        s.networks.insert(
            def.name.clone(),
            FakeNetwork {
                owner: Some(def.owner.clone()),
                active: true,
            },
        );
        Ok(outcome)
    }

    fn delete_network(&self, name: &str) -> Result<()> {
        let mut s = self.enter(Op::DeleteNetwork, name)?;
        match s.networks.get(name) {
            None => return Ok(()),
            Some(FakeNetwork { owner: None, .. }) => return Err(not_owned("network", name)),
            Some(_) => {}
        }
        // Like libvirt with a running guest attached: refuse.
        if let Some((vm, _)) = s
            .domains
            .iter()
            .find(|(_, d)| d.network.as_deref() == Some(name) && d.state == DomainState::Running)
        {
            return Err(BackendError::Libvirt {
                code: ErrorNumberEnum::Known(ErrorNumber::OperationInvalid),
                message: format!("network {name} is in use by domain {vm}"),
            });
        }
        s.networks.remove(name);
        Ok(())
    }

    fn list_nwfilters(&self) -> Result<Vec<OwnedFilter>> {
        let s = self.enter(Op::ListNwFilters, "")?;
        Ok(s.filters
            .iter()
            .filter_map(|(name, owner)| {
                Some(OwnedFilter {
                    name: name.clone(),
                    owner: owner.clone()?,
                })
            })
            .collect())
    }

    fn ensure_nwfilter(&self, def: &NwFilterDef) -> Result<EnsureOutcome> {
        let mut s = self.enter(Op::EnsureNwFilter, &def.name)?;
        let outcome = match s.filters.get(&def.name) {
            None => EnsureOutcome::Created,
            Some(None) => return Err(not_owned("nwfilter", &def.name)),
            Some(Some(owner)) if *owner == def.owner => EnsureOutcome::Unchanged,
            Some(Some(_)) => EnsureOutcome::Updated,
        };
        s.filters.insert(def.name.clone(), Some(def.owner.clone()));
        Ok(outcome)
    }

    fn delete_nwfilter(&self, name: &str) -> Result<()> {
        let mut s = self.enter(Op::DeleteNwFilter, name)?;
        match s.filters.get(name) {
            None => return Ok(()),
            Some(None) => return Err(not_owned("nwfilter", name)),
            Some(Some(_)) => {}
        }
        if let Some((vm, _)) = s
            .domains
            .iter()
            .find(|(_, d)| d.filter.as_deref() == Some(name) && d.state == DomainState::Running)
        {
            return Err(BackendError::Libvirt {
                code: ErrorNumberEnum::Known(ErrorNumber::OperationInvalid),
                message: format!("nwfilter {name} is in use by domain {vm}"),
            });
        }
        s.filters.remove(name);
        Ok(())
    }

    fn list_vms(&self) -> Result<Vec<OwnedVm>> {
        let s = self.enter(Op::ListVms, "")?;
        Ok(s.domains
            .iter()
            .filter_map(|(name, d)| {
                Some(OwnedVm {
                    name: name.clone(),
                    owner: d.owner.clone()?,
                    state: d.state,
                    golden: d.golden,
                    edited: d.edited,
                })
            })
            .collect())
    }

    fn create_vm(&self, req: &VmRequest) -> Result<VmReport> {
        self.lock().pool_vm_requests.push(req.clone());
        let mut s = self.enter(Op::CreatePoolVm, &req.name)?;
        if s.domains.contains_key(&req.name) {
            return Err(BackendError::AlreadyExists {
                kind: "domain",
                name: req.name.clone(),
            });
        }
        if let Some(nic) = &req.nic {
            if !s.networks.get(&nic.network).is_some_and(|n| n.active) {
                return Err(BackendError::Libvirt {
                    code: ErrorNumberEnum::Known(ErrorNumber::OperationInvalid),
                    message: format!("network '{}' is not active", nic.network),
                });
            }
            if let Some(f) = &nic.filter {
                if !s.filters.contains_key(f) {
                    return Err(BackendError::NotFound {
                        kind: "nwfilter",
                        name: f.clone(),
                    });
                }
            }
        }
        s.domains.insert(
            req.name.clone(),
            FakeDomain {
                owner: Some(req.owner.clone()),
                state: DomainState::Running,
                golden: req.park,
                network: req.nic.as_ref().map(|n| n.network.clone()),
                filter: req.nic.as_ref().and_then(|n| n.filter.clone()),
                resets: 0,
                edited: false,
            },
        );
        let limits = req
            .limits
            .requested(req.nic.is_some())
            .into_iter()
            .map(|l| match s.unenforceable.get(&l) {
                Some(why) => (l, Err(why.clone())),
                None => (l, Ok(())),
            })
            .collect();
        Ok(VmReport {
            boot: Duration::from_millis(1),
            limits,
            ..VmReport::default()
        })
    }

    fn destroy_vm(&self, name: &str) -> Result<()> {
        let mut s = self.enter(Op::DestroyVm, name)?;
        match s.domains.get(name) {
            None => Ok(()),
            Some(FakeDomain { owner: None, .. }) => Err(not_owned("domain", name)),
            Some(_) => {
                s.domains.remove(name);
                Ok(())
            }
        }
    }

    fn set_vm_owner(&self, name: &str, owner: &Owner) -> Result<()> {
        let mut s = self.enter(Op::SetVmOwner, name)?;
        match s.domains.get_mut(name) {
            None => Err(BackendError::NotFound {
                kind: "domain",
                name: name.to_string(),
            }),
            Some(FakeDomain { owner: None, .. }) => Err(not_owned("domain", name)),
            Some(d) => {
                d.owner = Some(owner.clone());
                Ok(())
            }
        }
    }

    fn vm_power(&self, name: &str) -> Result<PowerState> {
        let s = self.enter(Op::VmPower, name)?;
        Self::power_of(&s, name)
    }

    fn snapshot_vm(
        &self,
        name: &str,
        snapshot: &str,
        memory: bool,
    ) -> Result<crate::backend::SnapshotTaken> {
        let mut s = self.enter(Op::SnapshotVm, name)?;
        match Self::power_of(&s, name)? {
            PowerState::Running | PowerState::Paused => {}
            _ => {
                return Err(BackendError::VmNotRunning {
                    vm: name.to_string(),
                })
            }
        }
        s.snapshots
            .entry(name.to_string())
            .or_default()
            .insert(snapshot.to_string());
        let key = (name.to_string(), snapshot.to_string());
        if !memory {
            s.disk_only.insert(key);
            return Ok(crate::backend::SnapshotTaken {
                pause: Duration::from_millis(1),
                memory_bytes: None,
                fs_frozen: true,
            });
        }
        s.disk_only.remove(&key);
        Ok(crate::backend::SnapshotTaken {
            pause: Duration::from_millis(1),
            memory_bytes: Some(FAKE_SNAPSHOT_BYTES),
            fs_frozen: false,
        })
    }

    fn rollback_vm(&self, name: &str, snapshot: &str) -> Result<()> {
        let mut s = self.enter(Op::RollbackVm, name)?;
        Self::power_of(&s, name)?;
        if !s.snapshots.get(name).is_some_and(|v| v.contains(snapshot)) {
            return Err(BackendError::NotFound {
                kind: "snapshot",
                name: snapshot.to_string(),
            });
        }
        s.rollbacks.push((name.to_string(), snapshot.to_string()));
        Ok(())
    }

    fn delete_vm_snapshot(&self, name: &str, snapshot: &str) -> Result<()> {
        let mut s = self.enter(Op::DeleteVmSnapshot, name)?;
        Self::power_of(&s, name)?;
        if let Some(v) = s.snapshots.get_mut(name) {
            v.remove(snapshot);
        }
        Ok(())
    }

    fn vm_snapshots(&self, name: &str) -> Result<Vec<String>> {
        let s = self.enter(Op::VmPower, name)?;
        Self::power_of(&s, name)?;
        Ok(s.snapshots
            .get(name)
            .map(|v| v.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn vm_snapshot_bytes(&self, name: &str, snapshot: &str) -> Option<u64> {
        let s = self.lock();
        let disk_only = s
            .disk_only
            .contains(&(name.to_string(), snapshot.to_string()));
        s.snapshots
            .get(name)
            .is_some_and(|v| v.contains(snapshot))
            .then_some(if disk_only { 0 } else { FAKE_SNAPSHOT_BYTES })
    }

    fn remove_pool_template(&self, pool: &str) -> Result<()> {
        let _s = self.enter(Op::RemovePoolTemplate, pool)?;
        Ok(())
    }

    fn fork_vm(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
        owner: &Owner,
    ) -> Result<crate::fork::ForkReport> {
        let mut s = self.enter(Op::ForkVm, name)?;
        Self::power_of(&s, source)?;
        if !s
            .snapshots
            .get(source)
            .is_some_and(|v| v.contains(snapshot))
        {
            return Err(BackendError::NotFound {
                kind: "snapshot",
                name: snapshot.to_string(),
            });
        }
        if s.disk_only
            .contains(&(source.to_string(), snapshot.to_string()))
        {
            return Err(BackendError::Unsupported {
                what: format!("forking {source}"),
                why: format!("snapshot {snapshot} holds no memory"),
            });
        }
        if s.domains.contains_key(name) {
            return Err(BackendError::AlreadyExists {
                kind: "domain",
                name: name.to_string(),
            });
        }
        let from = s.domains[source].clone();
        s.domains.insert(
            name.to_string(),
            FakeDomain {
                owner: Some(owner.clone()),
                state: DomainState::Running,
                golden: false,
                resets: 0,
                ..from
            },
        );
        s.power.remove(name);
        Ok(crate::fork::ForkReport {
            source_pause: Duration::from_millis(1),
            copied_bytes: 1 << 20,
            total: Duration::from_millis(2),
        })
    }

    fn set_vm_power(&self, name: &str, to: PowerState) -> Result<()> {
        let mut s = self.enter(Op::SetVmPower, name)?;
        Self::power_of(&s, name)?;
        let d = s.domains.get_mut(name).expect("checked by power_of");
        d.state = match to {
            PowerState::Running | PowerState::Paused => DomainState::Running,
            _ => DomainState::ShutOff,
        };
        s.power.insert(name.to_string(), to);
        Ok(())
    }

    fn reset_vm(&self, name: &str) -> Result<Duration> {
        let mut s = self.enter(Op::ResetVm, name)?;
        match s.domains.get_mut(name) {
            None => Err(BackendError::NotFound {
                kind: "domain",
                name: name.to_string(),
            }),
            Some(FakeDomain { owner: None, .. }) => Err(not_owned("domain", name)),
            Some(d) if !d.golden || d.state != DomainState::Running => {
                Err(BackendError::NotFound {
                    kind: "snapshot",
                    name: crate::golden::GOLDEN_SNAPSHOT.to_string(),
                })
            }
            Some(d) => {
                d.resets += 1;
                Ok(Duration::from_millis(1))
            }
        }
    }

    fn agent(&self, name: &str) -> Result<Box<dyn crate::guest::AgentChannel + '_>> {
        let s = self.enter(Op::Agent, name)?;
        match s.domains.get(name) {
            Some(d) if d.owner.is_some() && d.state == DomainState::Running => {
                let files = self
                    .guest_files
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                Ok(Box::new(
                    crate::fake_agent::FakeAgent::new(name).with_guest_files(files),
                ))
            }
            Some(_) => Err(BackendError::GuestAgentUnavailable {
                vm: name.to_string(),
                message: "domain is not running".into(),
            }),
            None => Err(BackendError::NotFound {
                kind: "domain",
                name: name.to_string(),
            }),
        }
    }

    fn vm_stats(&self, name: &str) -> Result<crate::stats::DomainStats> {
        let f = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match f {
            Some(f) => f(name),
            None => Err(BackendError::Protocol {
                what: "domain statistics".into(),
                message: format!("the fake backend has no statistics for {name}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_failures_are_consumed_in_order_and_calls_recorded() {
        let fake = FakeBackend::new();
        fake.fail_next(Op::Ping, FakeBackend::libvirt_error("one"));
        fake.fail_next(Op::Ping, FakeBackend::libvirt_error("two"));
        assert!(fake.ping().unwrap_err().to_string().contains("one"));
        assert!(fake.ping().unwrap_err().to_string().contains("two"));
        fake.ping().unwrap();
        assert_eq!(fake.calls().len(), 3);
        assert!(fake.mutations().is_empty());
    }

    #[test]
    fn foreign_objects_are_never_listed_or_changed() {
        let fake = FakeBackend::new();
        fake.add_foreign_domain("theirs");
        fake.add_foreign_network("agentvm-net");
        assert!(fake.list_vms().unwrap().is_empty());
        assert!(fake.list_networks().unwrap().is_empty());
        assert!(matches!(
            fake.destroy_vm("theirs"),
            Err(BackendError::NotOwned { .. })
        ));
        assert!(matches!(
            fake.delete_network("agentvm-net"),
            Err(BackendError::NotOwned { .. })
        ));
        assert_eq!(fake.domains().len(), 1);
        assert_eq!(fake.networks().len(), 1);
    }
}
