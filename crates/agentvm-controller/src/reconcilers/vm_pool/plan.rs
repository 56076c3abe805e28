//! The decisions of a `VmPool` pass, as pure functions of a view of the pool: which VMs to
//! repair ([`plan_repairs`]) and which one slow step to take towards the wanted size
//! ([`plan_scaling`]). The reconciler observes (libvirt, the registry), plans, then acts.
//!
//! There are two plans because the second depends on the outcome of the first: a reset or a
//! health check that fails replaces its VM, which changes the counts the scaling is decided
//! on, and only acting tells.

use std::collections::HashSet;
use std::time::Duration;

use agentvm_api::Reason;
use agentvm_backend::libvirt::DomainState;

use crate::reconcilers::{PoolVm, VmPhase};
use agentvm_api::time::human_age;

/// A pool domain as libvirt lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DomainView {
    pub name: String,
    pub state: DomainState,
    /// Its golden state exists (it finished creation).
    pub golden: bool,
    /// Its definition was changed outside agentvm.
    pub edited: bool,
}

/// A pool VM as the registry knows it, with its ages taken when observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct VmView {
    pub name: String,
    pub phase: VmPhase,
    pub template_hash: String,
    /// Since its creation.
    pub age: Duration,
    /// Since its last health check answered (or it became known).
    pub since_checked: Duration,
}

impl From<&PoolVm> for VmView {
    fn from(vm: &PoolVm) -> Self {
        VmView {
            name: vm.name.clone(),
            phase: vm.phase,
            template_hash: vm.template_hash.clone(),
            age: vm.age(),
            since_checked: vm.last_checked.elapsed(),
        }
    }
}

/// What the repairs are decided on.
#[derive(Debug, Clone)]
pub(super) struct RepairView {
    /// The pool's domains, in libvirt's order.
    pub domains: Vec<DomainView>,
    /// The registry's VMs of the pool, by name (after syncing with `domains`).
    pub vms: Vec<VmView>,
    /// The current template's hash.
    pub current_hash: String,
    /// `spec.ttlSeconds`.
    pub ttl_seconds: u32,
    /// `spec.healthCheckSeconds`, as a duration.
    pub health_every: Duration,
}

/// One repair of one VM. Acting on a VM that became busy meanwhile leaves it alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Repair {
    /// Destroy a broken VM (shut off or crashed by hand, or creation interrupted); a VM
    /// that had its golden state is drift, audited as repaired.
    DestroyBroken {
        vm: String,
        why: String,
        drift: bool,
    },
    /// Destroy a VM to be replaced, recording why (status event, audit log).
    Replace {
        vm: String,
        reason: Reason,
        message: String,
    },
    /// Reset an adopted or released VM of the current template to golden; replaced
    /// (`ResetFailed`) when that fails.
    Reset { vm: String },
    /// Ping the guest agent of an idle VM; replaced (`Unhealthy`) when it does not answer.
    HealthCheck { vm: String },
}

/// The repairs, in order: broken domains, definitions edited by hand, idle VMs past their
/// TTL, resets, then health checks (of idle VMs and of those just reset). Each VM gets at
/// most one destroying repair; busy VMs get none.
pub(super) fn plan_repairs(view: &RepairView) -> Vec<Repair> {
    let mut steps = Vec::new();
    let mut gone: HashSet<&str> = HashSet::new();
    for d in &view.domains {
        if d.state != DomainState::Running || !d.golden {
            let why = if d.golden {
                format!("domain is {:?}, not running", d.state)
            } else {
                "no golden state (creation was interrupted)".to_string()
            };
            steps.push(Repair::DestroyBroken {
                vm: d.name.clone(),
                why,
                drift: d.golden,
            });
            gone.insert(&d.name);
        }
    }
    // Definitions edited by hand (`virsh edit`): replaced by a VM of the template once idle.
    for d in &view.domains {
        if d.edited && d.state == DomainState::Running && gone.insert(&d.name) {
            steps.push(Repair::Replace {
                vm: d.name.clone(),
                reason: Reason::EditedByHand,
                message: "its libvirt definition was changed outside agentvm".to_string(),
            });
        }
    }
    let live = |vm: &&VmView| !gone.contains(vm.name.as_str());
    // Idle VMs past their TTL (from creation): replaced, not reset or reused. A busy one
    // finishes its run first (its run hands it back as needing a reset).
    let ttl = Duration::from_secs(u64::from(view.ttl_seconds));
    let mut expired = Vec::new();
    for vm in view.vms.iter().filter(live) {
        if matches!(vm.phase, VmPhase::Ready | VmPhase::NeedsReset) && vm.age >= ttl {
            steps.push(Repair::Replace {
                vm: vm.name.clone(),
                reason: Reason::TtlExpired,
                message: format!(
                    "created {} ago, past ttlSeconds {}",
                    human_age(vm.age),
                    view.ttl_seconds
                ),
            });
            expired.push(vm.name.as_str());
        }
    }
    gone.extend(expired);
    let live = |vm: &&VmView| !gone.contains(vm.name.as_str());
    // Adopted or released VMs of the current template: back to golden (those of an old
    // template are replaced by the scaling instead).
    let mut reset = HashSet::new();
    for vm in view.vms.iter().filter(live) {
        if vm.phase == VmPhase::NeedsReset && vm.template_hash == view.current_hash {
            steps.push(Repair::Reset {
                vm: vm.name.clone(),
            });
            reset.insert(vm.name.as_str());
        }
    }
    // Health checks of idle VMs (a VM reset just now is idle once its reset succeeds).
    for vm in view.vms.iter().filter(live) {
        let idle = vm.phase == VmPhase::Ready || reset.contains(vm.name.as_str());
        if idle && vm.since_checked >= view.health_every {
            steps.push(Repair::HealthCheck {
                vm: vm.name.clone(),
            });
        }
    }
    steps
}

/// What the scaling is decided on (after the repairs).
#[derive(Debug, Clone)]
pub(super) struct ScalingView {
    /// The registry's VMs of the pool, by name.
    pub vms: Vec<VmView>,
    pub current_hash: String,
    pub min_ready: u32,
    pub max_size: u32,
    /// Runs waiting for a VM of the pool: demand on top of `minReady`.
    pub waiting: u32,
    /// The last replacement the repairs made: (reason, "vm: message").
    pub replaced: Option<(Reason, String)>,
}

impl ScalingView {
    /// VMs wanted ready: `minReady` plus waiting runs, at most `maxSize`.
    pub fn wanted(&self) -> u32 {
        (self.min_ready + self.waiting).min(self.max_size)
    }

    /// Idle VMs (ready, or checking) of the current template.
    pub fn ready_current(&self) -> u32 {
        let n = self.vms.iter().filter(|v| {
            matches!(v.phase, VmPhase::Ready | VmPhase::Checking)
                && v.template_hash == self.current_hash
        });
        n.count() as u32
    }
}

/// The one slow step of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Scaling {
    /// Create a VM; the `Progressing` condition says why.
    Create {
        reason: Reason,
        /// The replacement this creation is for ("vm: message").
        replacing: Option<String>,
        ready_current: u32,
        wanted: u32,
    },
    /// Destroy an idle VM of an old template.
    DestroyStale { vm: String, why: &'static str },
    /// Destroy idle VMs beyond the wanted number.
    ScaleDown { vms: Vec<String> },
    /// Nothing to change: write the status (`Ready`, or `AtMaxSize`) and recheck later.
    Settle,
}

/// Creates while fewer VMs of the current template are ready than wanted (room permitting
/// under `maxSize`, where starting and busy VMs count), else destroys one idle VM of an old
/// template (rolling: the new one is up first, unless the old one has to make room), else
/// scales down idle VMs beyond the wanted number.
pub(super) fn plan_scaling(view: &ScalingView) -> Scaling {
    let wanted = view.wanted();
    let ready_current = view.ready_current();
    let total = view.vms.len() as u32;
    let stale_idle = view.vms.iter().find(|v| {
        v.template_hash != view.current_hash
            && matches!(v.phase, VmPhase::Ready | VmPhase::NeedsReset)
    });
    if ready_current < wanted {
        if total < view.max_size {
            let (reason, replacing) = match &view.replaced {
                Some((reason, why)) => (*reason, Some(why.clone())),
                None if stale_idle.is_some() => (Reason::RollingUpdate, None),
                None => (Reason::ScalingUp, None),
            };
            return Scaling::Create {
                reason,
                replacing,
                ready_current,
                wanted,
            };
        }
        if let Some(old) = stale_idle {
            return Scaling::DestroyStale {
                vm: old.name.clone(),
                why: "template changed (making room)",
            };
        }
    } else if let Some(old) = stale_idle {
        return Scaling::DestroyStale {
            vm: old.name.clone(),
            why: "template changed",
        };
    } else if ready_current > wanted {
        let vms = view
            .vms
            .iter()
            .filter(|v| v.phase == VmPhase::Ready)
            .map(|v| v.name.clone())
            .take((ready_current - wanted) as usize)
            .collect();
        return Scaling::ScaleDown { vms };
    }
    Scaling::Settle
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEW: &str = "new";
    const OLD: &str = "old";

    fn vm(name: &str, phase: VmPhase, hash: &str) -> VmView {
        VmView {
            name: name.into(),
            phase,
            template_hash: hash.into(),
            age: Duration::from_secs(60),
            since_checked: Duration::from_secs(1),
        }
    }

    fn scaling(min: u32, max: u32, waiting: u32, vms: Vec<VmView>) -> ScalingView {
        ScalingView {
            vms,
            current_hash: NEW.into(),
            min_ready: min,
            max_size: max,
            waiting,
            replaced: None,
        }
    }

    fn create(reason: Reason, ready_current: u32, wanted: u32) -> Scaling {
        Scaling::Create {
            reason,
            replacing: None,
            ready_current,
            wanted,
        }
    }

    #[test]
    fn scaling_table() {
        use VmPhase::*;
        let cases: Vec<(&str, ScalingView, Scaling)> = vec![
            (
                "empty pool scales up",
                scaling(2, 3, 0, vec![]),
                create(Reason::ScalingUp, 0, 2),
            ),
            (
                "steady at minReady",
                scaling(1, 3, 0, vec![vm("a", Ready, NEW)]),
                Scaling::Settle,
            ),
            (
                "a checking VM counts as ready",
                scaling(1, 3, 0, vec![vm("a", Checking, NEW)]),
                Scaling::Settle,
            ),
            (
                "starting VMs count towards maxSize",
                scaling(2, 2, 0, vec![vm("a", Ready, NEW), vm("b", NeedsReset, NEW)]),
                Scaling::Settle,
            ),
            (
                "retiring VMs count towards maxSize",
                scaling(1, 1, 0, vec![vm("a", Retiring, NEW)]),
                Scaling::Settle,
            ),
            (
                "busy VMs count towards maxSize, not as ready",
                scaling(1, 2, 0, vec![vm("a", Busy, NEW)]),
                create(Reason::ScalingUp, 0, 1),
            ),
            (
                "waiting runs are demand on top of minReady",
                scaling(1, 4, 2, vec![vm("a", Ready, NEW)]),
                create(Reason::ScalingUp, 1, 3),
            ),
            (
                "waiting runs never go past maxSize",
                scaling(1, 2, 5, vec![vm("a", Busy, NEW), vm("b", Ready, NEW)]),
                Scaling::Settle,
            ),
            (
                "a new template: the new VM first",
                scaling(1, 2, 0, vec![vm("a", Ready, OLD)]),
                create(Reason::RollingUpdate, 0, 1),
            ),
            (
                "a new template at maxSize: the old VM makes room",
                scaling(1, 1, 0, vec![vm("a", Ready, OLD)]),
                Scaling::DestroyStale {
                    vm: "a".into(),
                    why: "template changed (making room)",
                },
            ),
            (
                "the new VM is up: the old one goes",
                scaling(1, 2, 0, vec![vm("a", Ready, OLD), vm("b", Ready, NEW)]),
                Scaling::DestroyStale {
                    vm: "a".into(),
                    why: "template changed",
                },
            ),
            (
                "an old VM needing a reset is replaced, not reset",
                scaling(1, 3, 0, vec![vm("a", NeedsReset, OLD), vm("b", Ready, NEW)]),
                Scaling::DestroyStale {
                    vm: "a".into(),
                    why: "template changed",
                },
            ),
            (
                "a busy old VM finishes its run first",
                scaling(1, 2, 0, vec![vm("a", Busy, OLD), vm("b", Ready, NEW)]),
                Scaling::Settle,
            ),
            (
                "scale down idle VMs beyond minReady, never busy ones",
                scaling(
                    1,
                    4,
                    0,
                    vec![
                        vm("a", Busy, NEW),
                        vm("b", Ready, NEW),
                        vm("c", Ready, NEW),
                        vm("d", Ready, NEW),
                    ],
                ),
                Scaling::ScaleDown {
                    vms: vec!["b".into(), "c".into()],
                },
            ),
            (
                "scale to zero",
                scaling(0, 2, 0, vec![vm("a", Ready, NEW)]),
                Scaling::ScaleDown {
                    vms: vec!["a".into()],
                },
            ),
            (
                "at maxSize with nothing old: wait",
                scaling(3, 2, 0, vec![vm("a", Ready, NEW), vm("b", Busy, NEW)]),
                Scaling::Settle,
            ),
        ];
        for (what, view, want) in cases {
            assert_eq!(plan_scaling(&view), want, "{what}");
        }
    }

    #[test]
    fn a_creation_after_a_replacement_says_what_it_replaces() {
        let mut view = scaling(1, 2, 0, vec![vm("a", VmPhase::Ready, OLD)]);
        view.replaced = Some((Reason::Unhealthy, "agentvm-p-1: no answer".into()));
        assert_eq!(
            plan_scaling(&view),
            Scaling::Create {
                reason: Reason::Unhealthy,
                replacing: Some("agentvm-p-1: no answer".into()),
                ready_current: 0,
                wanted: 1,
            }
        );
    }

    fn domain(name: &str, state: DomainState, golden: bool, edited: bool) -> DomainView {
        DomainView {
            name: name.into(),
            state,
            golden,
            edited,
        }
    }

    fn repairs(domains: Vec<DomainView>, vms: Vec<VmView>) -> RepairView {
        RepairView {
            domains,
            vms,
            current_hash: NEW.into(),
            ttl_seconds: 3600,
            health_every: Duration::from_secs(30),
        }
    }

    fn aged(mut v: VmView, age: u64, since_checked: u64) -> VmView {
        v.age = Duration::from_secs(age);
        v.since_checked = Duration::from_secs(since_checked);
        v
    }

    #[test]
    fn repairs_table() {
        use DomainState::{Running, ShutOff};
        use VmPhase::*;
        let running = |n: &str| domain(n, Running, true, false);
        let cases: Vec<(&str, RepairView, Vec<Repair>)> = vec![
            (
                "a healthy pool needs nothing",
                repairs(vec![running("a")], vec![vm("a", Ready, NEW)]),
                vec![],
            ),
            (
                "shut off by hand: destroyed, as drift",
                repairs(
                    vec![domain("a", ShutOff, true, false)],
                    vec![vm("a", Ready, NEW)],
                ),
                vec![Repair::DestroyBroken {
                    vm: "a".into(),
                    why: "domain is ShutOff, not running".into(),
                    drift: true,
                }],
            ),
            (
                "creation interrupted: destroyed, no drift, nothing else",
                repairs(
                    vec![domain("a", Running, false, true)],
                    vec![aged(vm("a", NeedsReset, NEW), 7200, 60)],
                ),
                vec![Repair::DestroyBroken {
                    vm: "a".into(),
                    why: "no golden state (creation was interrupted)".into(),
                    drift: false,
                }],
            ),
            (
                "edited by hand: replaced",
                repairs(
                    vec![domain("a", Running, true, true)],
                    vec![vm("a", Ready, NEW)],
                ),
                vec![Repair::Replace {
                    vm: "a".into(),
                    reason: Reason::EditedByHand,
                    message: "its libvirt definition was changed outside agentvm".into(),
                }],
            ),
            (
                "past its TTL: replaced, idle or needing a reset, never busy",
                repairs(
                    vec![running("a"), running("b"), running("c")],
                    vec![
                        aged(vm("a", Ready, NEW), 3600, 60),
                        aged(vm("b", NeedsReset, NEW), 7200, 60),
                        aged(vm("c", Busy, NEW), 7200, 60),
                    ],
                ),
                vec![
                    Repair::Replace {
                        vm: "a".into(),
                        reason: Reason::TtlExpired,
                        message: "created 60m ago, past ttlSeconds 3600".into(),
                    },
                    Repair::Replace {
                        vm: "b".into(),
                        reason: Reason::TtlExpired,
                        message: "created 120m ago, past ttlSeconds 3600".into(),
                    },
                ],
            ),
            (
                "needing a reset: reset if of the current template, then checked when due",
                repairs(
                    vec![running("a"), running("b"), running("c")],
                    vec![
                        aged(vm("a", NeedsReset, NEW), 60, 60),
                        vm("b", NeedsReset, OLD),
                        vm("c", NeedsReset, NEW),
                    ],
                ),
                vec![
                    Repair::Reset { vm: "a".into() },
                    Repair::Reset { vm: "c".into() },
                    Repair::HealthCheck { vm: "a".into() },
                ],
            ),
            (
                "health checks of idle VMs when due, not of busy or checking ones",
                repairs(
                    vec![running("a"), running("b"), running("c"), running("d")],
                    vec![
                        aged(vm("a", Ready, NEW), 60, 30),
                        aged(vm("b", Ready, NEW), 60, 29),
                        aged(vm("c", Busy, NEW), 60, 300),
                        aged(vm("d", Checking, NEW), 60, 300),
                    ],
                ),
                vec![Repair::HealthCheck { vm: "a".into() }],
            ),
            (
                "a busy broken VM is still asked for (acting leaves it alone)",
                repairs(
                    vec![domain("a", ShutOff, true, false)],
                    vec![vm("a", Busy, NEW)],
                ),
                vec![Repair::DestroyBroken {
                    vm: "a".into(),
                    why: "domain is ShutOff, not running".into(),
                    drift: true,
                }],
            ),
        ];
        for (what, view, want) in cases {
            assert_eq!(plan_repairs(&view), want, "{what}");
        }
    }
}
