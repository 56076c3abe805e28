use super::*;
use crate::reconcilers::testutil::*;
use crate::reconcilers::{NetworkFilterReconciler, NetworkReconciler};
use agentvm_backend::fake::{FakeBackend, Op};
use agentvm_backend::BackendError;

const IMG: &str =
    "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {name: img}\nspec: {}\n";

fn pool_yaml(min: u32, max: u32, memory: u32) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: p}}\nspec:\n  template:\n    imageRef: img\n    resources: {{profile: custom, vcpu: 1, memoryMib: {memory}, diskGib: 2}}\n  minReady: {min}\n  maxSize: {max}\n")
}

struct Pools {
    t: Setup,
    r: VmPoolReconciler,
}

impl Pools {
    fn new() -> Self {
        let t = Setup::new();
        let r = VmPoolReconciler::new(t.backend(), Arc::new(PoolRegistry::new()));
        Pools { t, r }
    }

    /// Image `img` Ready and pool `p` (`pool_yaml(min, max, memory)`) settled.
    fn settled(min: u32, max: u32, memory: u32) -> Self {
        let p = Pools::new();
        p.t.image_ready();
        p.t.apply(&pool_yaml(min, max, memory));
        p.settle().unwrap();
        p
    }

    /// [`Pools::settled`], writing its audit log to the returned path.
    fn settled_with_audit_log(min: u32, max: u32, memory: u32) -> (Self, std::path::PathBuf) {
        let mut p = Pools::new();
        let log = p.t.ctx.config.state_dir.join("audit.log");
        p.t.ctx.audit = crate::audit::AuditLog::open(&log, 1 << 20, 1).unwrap();
        p.t.image_ready();
        p.t.apply(&pool_yaml(min, max, memory));
        p.settle().unwrap();
        (p, log)
    }

    /// Reconciles until the pool is steady (or fails); returns the last result.
    fn settle(&self) -> Result<Action, ReconcileError> {
        for _ in 0..20 {
            match self.t.reconcile(&self.r, Kind::VmPool, "p") {
                Ok(Action::Requeue(d)) if d == NEXT_STEP => continue,
                other => return other,
            }
        }
        panic!("pool never settled: {:?}", self.t.fake.mutations());
    }

    fn vms(&self) -> Vec<String> {
        self.t
            .fake
            .domains()
            .into_iter()
            .filter(|(_, d)| d.owner.as_ref().is_some_and(|o| o.name == "p"))
            .map(|(n, _)| n)
            .collect()
    }

    fn status(&self) -> serde_json::Value {
        self.t.status(Kind::VmPool, "p")
    }
}

#[test]
fn waits_for_the_image_then_warms_up_to_min_ready() {
    let p = Pools::new();
    p.t.apply(&pool_yaml(2, 4, 512));
    assert_eq!(p.settle().unwrap(), Action::Requeue(WAITING));
    let s = p.status();
    assert_eq!(s["phase"], "Pending");
    assert_eq!(
        cond(&s, "Progressing"),
        ("True".into(), "WaitingForImage".into())
    );
    p.t.apply(IMG);
    p.settle().unwrap();
    assert!(p.status()["conditions"]
        .to_string()
        .contains("Image img is Pending"));
    assert!(p.t.fake.mutations().is_empty());

    p.t.image_ready();
    assert_eq!(
        p.settle().unwrap(),
        Action::Requeue(Duration::from_secs(10))
    );
    let vms = p.vms();
    assert_eq!(vms.len(), 2);
    assert!(vms
        .iter()
        .all(|n| n.starts_with("agentvm-p-") && n.len() == "agentvm-p-".len() + 5));
    let s = p.status();
    assert_eq!(s["phase"], "Ready");
    assert_eq!(
        (s["ready"].as_u64(), s["total"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(s["vms"].as_array().unwrap().len(), 2);
    assert_eq!(cond(&s, "Ready"), ("True".into(), "MinReadyReached".into()));
    assert_eq!(s["observedGeneration"], 1);
    // Ownership metadata carries the pool and the template hash.
    let d = &p.t.fake.domains()[&vms[0]];
    let owner = d.owner.clone().unwrap();
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("VmPool", "p"));
    assert_eq!(Some(owner.spec_hash.as_str()), s["templateHash"].as_str());
    // Steady: another pass only looks.
    p.t.fake.clear_calls();
    p.settle().unwrap();
    assert!(
        p.t.fake.mutations().is_empty(),
        "{:?}",
        p.t.fake.mutations()
    );
}

#[test]
fn scales_up_and_down_without_touching_the_template_hash() {
    let p = Pools::settled(1, 4, 512);
    let hash = p.status()["templateHash"].clone();
    p.t.apply(&pool_yaml(3, 4, 512));
    p.settle().unwrap();
    assert_eq!(p.vms().len(), 3);
    // minReady is not part of the template: no replacement.
    assert_eq!(p.status()["templateHash"], hash);
    assert_eq!(p.status()["observedGeneration"], 2);
    p.t.fake.clear_calls();
    p.t.apply(&pool_yaml(1, 4, 512));
    p.settle().unwrap();
    assert_eq!(p.vms().len(), 1);
    let m = p.t.fake.mutations();
    assert_eq!(m.len(), 2);
    assert!(m.iter().all(|c| c.starts_with("DestroyVm(")), "{m:?}");
}

#[test]
fn a_template_change_replaces_vms_one_at_a_time_new_before_old() {
    let p = Pools::settled(2, 3, 512);
    let old = p.vms();
    p.t.fake.clear_calls();
    p.t.apply(&pool_yaml(2, 3, 768));
    p.settle().unwrap();
    let new = p.vms();
    assert_eq!(new.len(), 2);
    assert!(new.iter().all(|n| !old.contains(n)));
    // Rolling: create (room under maxSize 3), destroy an old one, create, destroy.
    let muts = p.t.fake.mutations();
    let kinds: Vec<&str> = muts
        .iter()
        .map(|m| {
            if m.starts_with("Create") {
                "create"
            } else {
                "destroy"
            }
        })
        .collect();
    assert_eq!(kinds, ["create", "destroy", "create", "destroy"]);
    let s = p.status();
    assert_eq!(s["phase"], "Ready");
    let hash = s["templateHash"].as_str().unwrap();
    assert!(p
        .t
        .fake
        .domains()
        .values()
        .all(|d| d.owner.as_ref().unwrap().spec_hash == hash));
}

#[test]
fn at_max_size_the_old_vm_makes_room_first() {
    let p = Pools::settled(1, 1, 512);
    let old = p.vms();
    p.t.fake.clear_calls();
    p.t.apply(&pool_yaml(1, 1, 768));
    p.settle().unwrap();
    assert_eq!(p.t.fake.mutations()[0], format!("DestroyVm({})", old[0]));
    assert!(p.t.fake.mutations()[1].starts_with("CreatePoolVm("));
    assert_eq!(p.vms().len(), 1);
}

#[test]
fn busy_vms_are_never_destroyed_and_deletion_waits_for_them() {
    let p = Pools::settled(1, 2, 512);
    let busy = p.r.registry().acquire("p").unwrap();
    // A busy VM does not count as ready: a second one is started.
    p.settle().unwrap();
    assert_eq!(p.vms().len(), 2);
    assert_eq!(p.status()["busy"], 1);
    // Template change and scale to zero: the busy VM stays.
    p.t.apply(&pool_yaml(0, 2, 768));
    p.settle().unwrap();
    assert_eq!(p.vms(), std::slice::from_ref(&busy));
    // Deletion waits for the run.
    p.t.store.request_delete(Kind::VmPool, "p", None).unwrap();
    assert_eq!(p.settle().unwrap(), Action::Requeue(Duration::from_secs(2)));
    assert_eq!(cond(&p.status(), "Progressing").1, "WaitingForRuns");
    assert_eq!(p.vms(), std::slice::from_ref(&busy));
    assert!(p.r.registry().release("p", &busy));
    p.settle().unwrap();
    assert!(p.vms().is_empty());
    assert!(p.t.store.get(Kind::VmPool, "p").unwrap().is_none());
    assert!(p.r.registry().vms("p").is_empty());
}

#[test]
fn a_released_vm_is_reset_before_it_is_ready_again() {
    let p = Pools::settled(1, 2, 512);
    let vm = p.r.registry().acquire("p").unwrap();
    p.settle().unwrap();
    p.r.registry().release("p", &vm);
    assert_eq!(p.r.registry().phase("p", &vm), Some(VmPhase::NeedsReset));
    p.t.fake.clear_calls();
    p.settle().unwrap();
    assert_eq!(p.t.fake.mutations()[0], format!("ResetVm({vm})"));
    // Back to ready; now one too many: scaled down to minReady.
    assert_eq!(p.vms().len(), 1);
    assert_eq!(p.status()["ready"], 1);
}

#[test]
fn vms_destroyed_or_undefined_by_hand_are_replaced() {
    let p = Pools::new();
    p.t.image_ready();
    p.t.fake.add_foreign_domain("agentvm-t3-foreign-x");
    p.t.apply(&pool_yaml(2, 4, 512));
    p.settle().unwrap();
    let vms = p.vms();
    p.t.fake.stop_domain_by_hand(&vms[0]);
    p.t.fake.remove_domain_by_hand(&vms[1]);
    p.t.fake.clear_calls();
    p.settle().unwrap();
    let now = p.vms();
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|n| !vms.contains(n)));
    let m = p.t.fake.mutations();
    // Cleanup of both (the shut-off one and the leftovers of the vanished one), then two boots.
    assert_eq!(
        m.iter().filter(|c| c.starts_with("DestroyVm")).count(),
        2,
        "{m:?}"
    );
    assert_eq!(
        m.iter().filter(|c| c.starts_with("CreatePoolVm")).count(),
        2,
        "{m:?}"
    );
    assert!(p.t.fake.domains().contains_key("agentvm-t3-foreign-x"));
}

#[test]
fn a_restarted_controller_adopts_vms_by_metadata_and_resets_them() {
    let p = Pools::new();
    p.t.image_ready();
    p.t.fake.add_foreign_domain("agentvm-p-zzzzz");
    p.t.apply(&pool_yaml(2, 4, 512));
    p.settle().unwrap();
    let vms = p.vms();
    // A new reconciler (new registry) over the same hypervisor and store.
    let fresh = VmPoolReconciler::new(p.t.backend(), Arc::new(PoolRegistry::new()));
    p.t.fake.clear_calls();
    for _ in 0..5 {
        p.t.reconcile(&fresh, Kind::VmPool, "p").unwrap();
    }
    let mut m = p.t.fake.mutations();
    m.sort();
    assert_eq!(
        m,
        vms.iter()
            .map(|v| format!("ResetVm({v})"))
            .collect::<Vec<_>>()
    );
    assert_eq!(p.vms(), vms);
    assert_eq!(fresh.registry().vms("p").len(), 2);
    assert!(fresh
        .registry()
        .vms("p")
        .iter()
        .all(|v| v.phase == VmPhase::Ready));
    // The foreign domain with a pool-like name was never adopted or touched.
    assert!(p.t.fake.domains()["agentvm-p-zzzzz"].owner.is_none());
    assert_eq!(p.status()["total"], 2);
}

#[test]
fn adopted_vms_of_an_old_template_or_half_created_are_replaced() {
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&pool_yaml(1, 4, 512));
    let stale = Owner {
        kind: agentvm_api::Kind::VmPool.into(),
        name: "p".into(),
        spec_hash: "edited-by-hand".into(),
        generation: 1,
    };
    p.t.fake
        .add_owned_domain("agentvm-p-stale", stale.clone(), true);
    p.t.fake.add_owned_domain("agentvm-p-half", stale, false);
    p.settle().unwrap();
    let vms = p.vms();
    assert_eq!(vms.len(), 1);
    assert!(!vms.contains(&"agentvm-p-stale".to_string()));
    let m = p.t.fake.mutations();
    // The half-created one goes at once; the stale one only after its replacement is up.
    assert_eq!(m[0], "DestroyVm(agentvm-p-half)");
    assert!(m[1].starts_with("CreatePoolVm("));
    assert_eq!(m[2], "DestroyVm(agentvm-p-stale)");
}

#[test]
fn backend_failures_degrade_the_pool_and_the_next_pass_recovers() {
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&pool_yaml(1, 4, 512));
    p.t.fake.fail_next(
        Op::CreatePoolVm,
        BackendError::Timeout {
            what: "guest agent".into(),
            after: Duration::from_secs(120),
        },
    );
    let err = p.settle().unwrap_err();
    assert_eq!(err.reason, "Timeout");
    let s = p.status();
    assert_eq!(s["phase"], "Degraded");
    assert_eq!(cond(&s, "Degraded"), ("True".into(), "Timeout".into()));
    assert_eq!(cond(&s, "Ready").0, "False");
    p.t.fake
        .fail_next(Op::ListVms, FakeBackend::libvirt_error("connection reset"));
    assert_eq!(p.settle().unwrap_err().reason, "LibvirtError");
    p.settle().unwrap();
    let s = p.status();
    assert_eq!(s["phase"], "Ready");
    assert_eq!(cond(&s, "Degraded").0, "False");
    // A reset that fails replaces the VM instead of handing out a dirty one.
    let vm = p.r.registry().acquire("p").unwrap();
    p.settle().unwrap();
    p.r.registry().release("p", &vm);
    p.t.fake
        .fail_next(Op::ResetVm, FakeBackend::libvirt_error("loadvm failed"));
    p.settle().unwrap();
    assert!(!p.vms().contains(&vm));
    assert_eq!(p.vms().len(), 1);
}

#[test]
fn network_before_vms_and_vms_before_the_network_on_deletion() {
    let t = Setup::new();
    t.image_ready();
    t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {name: lan}\nspec: {mode: nat, subnet: 10.80.0.0/24}\n");
    t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {name: egress}\nspec:\n  egress:\n    - {protocol: tcp, ports: [443]}\n");
    t.apply(&attached_pool("p", "lan", "egress").replace(
        "imageRef: img",
        "imageRef: img\n    resources: {profile: light}",
    ));
    let pools = VmPoolReconciler::new(t.backend(), Arc::new(PoolRegistry::new()));
    let nets = NetworkReconciler::new(t.backend());
    let filters = NetworkFilterReconciler::new(t.backend());
    // The pool first: it waits for its network.
    t.reconcile(&pools, Kind::VmPool, "p").unwrap();
    assert_eq!(
        cond(&t.status(Kind::VmPool, "p"), "Progressing").1,
        "WaitingForNetwork"
    );
    t.reconcile(&nets, Kind::Network, "lan").unwrap();
    t.reconcile(&pools, Kind::VmPool, "p").unwrap();
    assert!(t
        .status(Kind::VmPool, "p")
        .to_string()
        .contains("NetworkFilter egress is not Ready"));
    t.reconcile(&filters, Kind::NetworkFilter, "egress")
        .unwrap();
    for _ in 0..3 {
        t.reconcile(&pools, Kind::VmPool, "p").unwrap();
    }
    let m = t.fake.mutations();
    assert_eq!(
        m[..2],
        [
            "EnsureNetwork(agentvm-lan)",
            "EnsureNwFilter(agentvm-egress)"
        ]
    );
    assert!(m[2].starts_with("CreatePoolVm(agentvm-p-"));
    let vm = t
        .fake
        .domains()
        .into_iter()
        .find(|(_, d)| d.owner.is_some())
        .unwrap()
        .1;
    assert_eq!(vm.network.as_deref(), Some("agentvm-lan"));
    assert_eq!(vm.filter.as_deref(), Some("agentvm-egress"));

    // Delete everything at once (like removing the file): the network and the filter wait.
    t.fake.clear_calls();
    for (k, n) in [
        (Kind::Network, "lan"),
        (Kind::NetworkFilter, "egress"),
        (Kind::VmPool, "p"),
    ] {
        t.store.request_delete(k, n, None).unwrap();
    }
    t.reconcile(&nets, Kind::Network, "lan").unwrap();
    t.reconcile(&filters, Kind::NetworkFilter, "egress")
        .unwrap();
    assert!(t.fake.mutations().is_empty());
    t.reconcile(&pools, Kind::VmPool, "p").unwrap();
    t.reconcile(&nets, Kind::Network, "lan").unwrap();
    t.reconcile(&filters, Kind::NetworkFilter, "egress")
        .unwrap();
    let m = t.fake.mutations();
    assert!(m[0].starts_with("DestroyVm(agentvm-p-"), "{m:?}");
    assert_eq!(
        m[1..],
        [
            "RemovePoolTemplate(p)",
            "DeleteNetwork(agentvm-lan)",
            "DeleteNwFilter(agentvm-egress)"
        ]
    );
    assert_eq!(t.store.len().unwrap(), 1, "only the Image is left");
}

fn events(p: &Pools) -> Vec<(String, String)> {
    p.status()["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["vm"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn an_idle_vm_past_its_ttl_is_replaced_and_a_busy_one_only_after_its_run() {
    let p = Pools::settled(2, 3, 512);
    let vms = p.vms();
    let created = &p.status()["vmCreatedAt"];
    assert!(created[&vms[0]].is_string(), "{created}");
    // Both VMs were created 2 hours ago (default ttlSeconds 3600); one is running a run.
    let long_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let busy = p.r.registry().acquire("p").unwrap();
    let idle = vms.iter().find(|v| **v != busy).unwrap().clone();
    for vm in &vms {
        p.r.registry().seed_created("p", vm, long_ago);
    }
    p.t.fake.clear_calls();
    p.settle().unwrap();
    let now = p.vms();
    assert!(!now.contains(&idle), "the idle expired VM is replaced");
    assert!(now.contains(&busy), "the busy one is left to its run");
    assert_eq!(now.len(), 3);
    assert_eq!(p.r.registry().phase("p", &busy), Some(VmPhase::Busy));
    assert_eq!(events(&p), vec![("TtlExpired".to_string(), idle.clone())]);
    assert_eq!(
        cond(&p.status(), "Ready"),
        ("True".to_string(), "MinReadyReached".to_string())
    );
    // The run ends: its VM is handed back and replaced instead of reset.
    assert!(p.r.registry().expired("p", &busy));
    p.r.registry().release("p", &busy);
    p.t.fake.clear_calls();
    p.settle().unwrap();
    let m = p.t.fake.mutations();
    assert!(!m.contains(&format!("ResetVm({busy})")), "{m:?}");
    assert!(m.contains(&format!("DestroyVm({busy})")), "{m:?}");
    assert!(!p.vms().contains(&busy));
    assert_eq!(
        events(&p).last().unwrap(),
        &("TtlExpired".to_string(), busy)
    );
}

#[test]
fn ttl_counts_from_creation_across_a_controller_restart() {
    let p = Pools::settled(1, 2, 512);
    let vm = p.vms()[0].clone();
    // Recorded as created 2 hours ago.
    let mut status = p.status();
    status["vmCreatedAt"][&vm] = serde_json::json!(Timestamp(
        std::time::SystemTime::now() - Duration::from_secs(7200)
    )
    .to_string());
    p.t.store
        .update_status_json(Kind::VmPool, "p", status)
        .unwrap();
    // A new controller (empty registry) adopts the VM and knows its real age.
    let restarted = VmPoolReconciler::new(p.t.backend(), Arc::new(PoolRegistry::new()));
    p.t.fake.clear_calls();
    for _ in 0..20 {
        match p.t.reconcile(&restarted, Kind::VmPool, "p") {
            Ok(Action::Requeue(d)) if d == NEXT_STEP => continue,
            other => {
                other.unwrap();
                break;
            }
        }
    }
    let m = p.t.fake.mutations();
    assert!(m.contains(&format!("DestroyVm({vm})")), "{m:?}");
    assert!(!m.contains(&format!("ResetVm({vm})")), "{m:?}");
    assert_eq!(events(&p), vec![("TtlExpired".to_string(), vm)]);
}

#[test]
fn an_idle_vm_whose_agent_does_not_answer_is_replaced() {
    let p = Pools::settled(2, 2, 512);
    let vms = p.vms();
    // Not due yet: no ping.
    p.t.fake.clear_calls();
    p.settle().unwrap();
    assert!(!p
        .t
        .fake
        .calls()
        .iter()
        .any(|c| format!("{c:?}").contains("Agent")));
    // Due: the first one pinged does not answer, the other does.
    for vm in &vms {
        p.r.registry()
            .backdate_check("p", vm, Duration::from_secs(31));
    }
    p.t.fake.fail_next(
        Op::Agent,
        BackendError::GuestAgentUnavailable {
            vm: vms[1].clone(),
            message: "no answer".into(),
        },
    );
    p.t.fake.clear_calls();
    let first = p.t.reconcile(&p.r, Kind::VmPool, "p");
    assert_eq!(first.unwrap(), Action::Requeue(NEXT_STEP));
    assert_eq!(
        cond(&p.status(), "Progressing"),
        ("True".to_string(), "Unhealthy".to_string())
    );
    let status = p.status();
    let progressing = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap();
    assert!(
        progressing["message"]
            .as_str()
            .unwrap()
            .contains("guest agent did not answer"),
        "{progressing}"
    );
    p.settle().unwrap();
    let now = p.vms();
    assert_eq!(now.len(), 2);
    assert_eq!(
        now.iter().filter(|v| vms.contains(v)).count(),
        1,
        "exactly one VM replaced: {now:?}"
    );
    let ev = events(&p);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, "Unhealthy");
    assert_eq!(p.status()["phase"], "Ready");
}

#[test]
fn a_vm_whose_reset_fails_is_replaced_and_the_event_says_why() {
    let p = Pools::settled(1, 2, 512);
    let vm = p.r.registry().acquire("p").unwrap();
    p.r.registry().release("p", &vm);
    p.t.fake
        .fail_next(Op::ResetVm, FakeBackend::libvirt_error("revert failed"));
    p.settle().unwrap();
    assert!(!p.vms().contains(&vm));
    assert_eq!(p.vms().len(), 1);
    let status = p.status();
    let ev = &status["events"][0];
    assert_eq!(ev["reason"], "ResetFailed");
    assert_eq!(ev["vm"], vm.as_str());
    assert!(
        ev["message"].as_str().unwrap().contains("revert failed"),
        "{ev}"
    );
}

#[test]
fn pool_vms_feed_boot_reset_and_size_metrics_and_the_audit_log_including_drift() {
    let (p, log) = Pools::settled_with_audit_log(2, 3, 512);
    let vms = p.vms();
    let text = p.t.ctx.metrics.render();
    for vm in &vms {
        assert!(
            text.contains(&format!("agent_vm_boot_duration_seconds{{vm_id=\"{vm}\"}}")),
            "{text}"
        );
    }
    assert!(
        text.contains("agent_vm_pool_size{pool_id=\"p\"} 2"),
        "{text}"
    );

    // A released VM is reset: reset duration by strategy.
    let vm = p.r.registry().acquire("p").unwrap();
    p.r.registry().release("p", &vm);
    p.settle().unwrap();
    let text = p.t.ctx.metrics.render();
    assert!(
        text.contains(
            "agentvm_vm_reset_duration_seconds_count{pool_id=\"p\",strategy=\"golden\"} 1"
        ),
        "{text}"
    );

    // Shut off by hand: destroyed, replaced, series gone, drift audited.
    p.t.fake.stop_domain_by_hand(&vms[0]);
    p.settle().unwrap();
    let text = p.t.ctx.metrics.render();
    assert!(!text.contains(&format!("vm_id=\"{}\"", vms[0])), "{text}");

    let events: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |ty: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event_type"] == ty).collect()
    };
    assert_eq!(of("vm_created").len(), 3, "{events:?}");
    assert!(of("vm_created").iter().all(|e| e["kind"] == "VmPool"
        && e["name"] == "p"
        && e["details"]["bootSeconds"].is_number()));
    assert_eq!(of("vm_reset").len(), 1);
    assert_eq!(of("vm_reset")[0]["vm_id"], vm.as_str());
    let destroyed = of("vm_destroyed");
    assert_eq!(destroyed.len(), 1, "{events:?}");
    assert_eq!(destroyed[0]["vm_id"], vms[0].as_str());
    let drift = of("drift_repaired");
    assert_eq!(drift.len(), 1, "{events:?}");
    assert_eq!(drift[0]["vm_id"], vms[0].as_str());
    assert!(drift[0]["details"]["repair"]
        .as_str()
        .unwrap()
        .contains("ShutOff"));
}

#[test]
fn a_definition_edited_by_hand_is_replaced_once_idle_and_audited() {
    let (p, log) = Pools::settled_with_audit_log(2, 3, 512);
    let vms = p.vms();
    assert_eq!(vms.len(), 2);
    // One is busy with a run, the other idle; both are edited by hand.
    let busy = p.r.registry().acquire("p").unwrap();
    let idle = vms.iter().find(|v| **v != busy).unwrap().clone();
    p.t.fake.edit_domain_by_hand(&busy);
    p.t.fake.edit_domain_by_hand(&idle);
    p.settle().unwrap();
    let now = p.vms();
    assert!(!now.contains(&idle), "the idle edited VM stayed: {now:?}");
    assert!(now.contains(&busy), "the busy VM was taken from its run");
    assert_eq!(now.len(), 3, "{now:?}");
    let events = p.status()["events"].to_string();
    assert!(
        events.contains("EditedByHand") && events.contains(&idle),
        "{events}"
    );
    // The run ends: the busy one goes too.
    p.r.registry().release("p", &busy);
    p.settle().unwrap();
    let now = p.vms();
    assert!(!now.contains(&busy), "{now:?}");
    assert_eq!(now.len(), 2, "{now:?}");
    let audit = std::fs::read_to_string(&log).unwrap();
    for vm in [&idle, &busy] {
        assert!(
            audit.lines().any(|l| l.contains("drift_repaired")
                && l.contains(vm.as_str())
                && l.contains("edited by hand")),
            "no drift_repaired for {vm}: {audit}"
        );
    }
}

#[test]
fn cpu_shares_reach_the_vm_and_the_pool_says_whether_the_host_applies_them() {
    // Not set: nothing asked of the host, no condition.
    let p = Pools::settled(1, 1, 512);
    assert!(p.status()["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["type"] != CPU_SHARES_APPLIED));

    // Set, on a host that applies it.
    let with_shares = pool_yaml(1, 1, 512).replace("diskGib: 2}", "diskGib: 2, cpuShares: 512}");
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&with_shares);
    p.settle().unwrap();
    assert_eq!(
        cond(&p.status(), CPU_SHARES_APPLIED),
        ("True".to_string(), "Applied".to_string())
    );

    // Set, on a host that cannot enforce it: the VM still boots, and the pool says so.
    let p = Pools::new();
    p.t.fake.cannot_enforce(
        agentvm_backend::Limit::CpuShares,
        "cgroup CPU controller is not mounted",
    );
    p.t.image_ready();
    p.t.apply(&with_shares);
    p.settle().unwrap();
    let s = p.status();
    assert_eq!(s["phase"], "Ready", "{s}");
    assert_eq!(
        cond(&s, CPU_SHARES_APPLIED),
        ("False".to_string(), "HostCannotEnforce".to_string())
    );
    let c = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == CPU_SHARES_APPLIED)
        .unwrap();
    assert!(
        c["message"].as_str().unwrap().contains(
            "cpuShares 512 is not applied by this host (cgroup CPU controller is not mounted)"
        ),
        "{c}"
    );
}

#[test]
fn the_disk_size_reaches_the_vm_and_a_disk_smaller_than_the_image_fails_the_pool() {
    // The profile's (or custom) disk size is what each VM is created with.
    let p = Pools::settled(1, 1, 512);
    let reqs = p.t.fake.pool_vm_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].disk_gib, Some(2));
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&pool_yaml(1, 1, 512).replace(
        "{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}",
        "{profile: light}",
    ));
    p.settle().unwrap();
    assert_eq!(p.t.fake.pool_vm_requests()[0].disk_gib, Some(10));

    // The image grows past the pool's disk after the pool was applied: no VM is created,
    // and the pool says why and what to change.
    let p = Pools::new();
    p.t.apply(&pool_yaml(1, 1, 512));
    p.t.image_ready();
    p.t.apply(&IMG.replace("spec: {}", "spec: {diskSizeMib: 4096}"));
    assert_eq!(p.settle().unwrap(), Action::Requeue(WAITING));
    let s = p.status();
    assert_eq!(s["phase"], "Failed", "{s}");
    assert_eq!(cond(&s, "Ready"), ("False".into(), "DiskTooSmall".into()));
    assert_eq!(cond(&s, "Degraded"), ("True".into(), "DiskTooSmall".into()));
    assert!(
        s["conditions"].to_string().contains(
            "2 GiB is smaller than Image `img`'s disk (4096 MiB): a VM's disk is an overlay on its image; use a disk of at least 4 GiB"
        ),
        "{s}"
    );
    assert!(p.t.fake.pool_vm_requests().is_empty());
}

#[test]
fn cpu_quota_and_memory_limit_are_reported_applied_or_not_and_never_block_the_pool() {
    use crate::limits::{
        CPU_QUOTA_APPLIED, DISK_IO_LIMIT_APPLIED, MEMORY_LIMIT_APPLIED, NETWORK_BANDWIDTH_APPLIED,
    };
    use agentvm_backend::Limit;
    let capped = pool_yaml(1, 1, 512).replace(
        "diskGib: 2}",
        "diskGib: 2, cpuQuotaPercent: 50, memoryHardLimitMib: 1024, diskWriteMibPerSecond: 5}",
    );
    let resource = |s: &serde_json::Value, name: &str| -> (String, bool, String) {
        let r = s["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {s}"));
        (
            r["requested"].as_str().unwrap().to_string(),
            r["enforced"].as_bool().unwrap(),
            r["detail"].as_str().unwrap_or("").to_string(),
        )
    };

    // A host that enforces them: the VM gets them, the conditions say Applied.
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&capped);
    p.settle().unwrap();
    let limits = p.t.fake.pool_vm_requests()[0].limits;
    assert_eq!(limits.cpu_quota_percent, Some(50));
    assert_eq!(limits.memory_hard_limit_mib, Some(1024));
    assert_eq!(limits.disk_io.write_bytes_per_second, 5 << 20);
    assert_eq!(limits.cpu_shares, None);
    let s = p.status();
    assert_eq!(s["phase"], "Ready", "{s}");
    for c in [
        CPU_QUOTA_APPLIED,
        MEMORY_LIMIT_APPLIED,
        DISK_IO_LIMIT_APPLIED,
    ] {
        assert_eq!(cond(&s, c), ("True".into(), "Applied".into()), "{c}");
    }
    // Isolated: no interface, no bandwidth asked, no condition.
    assert!(!s["conditions"]
        .to_string()
        .contains(NETWORK_BANDWIDTH_APPLIED));
    assert_eq!(
        resource(&s, "cpuQuotaPercent"),
        (
            "50 % per vCPU".into(),
            true,
            "cgroup CPU bandwidth (cputune/quota)".into()
        )
    );
    assert_eq!(resource(&s, "diskGib").0, "2 GiB");

    // A host without the cgroup controllers: the pool still gets Ready, and says what is
    // not enforced and libvirt's reason.
    let p = Pools::new();
    p.t.fake.cannot_enforce(
        Limit::CpuQuota,
        "cgroup cpu is required for scheduler tuning",
    );
    p.t.fake
        .cannot_enforce(Limit::MemoryHardLimit, "cannot limit locked memory");
    p.t.image_ready();
    p.t.apply(&capped);
    p.settle().unwrap();
    let s = p.status();
    assert_eq!(s["phase"], "Ready", "{s}");
    assert_eq!(
        cond(&s, CPU_QUOTA_APPLIED),
        ("False".into(), "HostCannotEnforce".into())
    );
    assert_eq!(
        cond(&s, MEMORY_LIMIT_APPLIED),
        ("False".into(), "HostCannotEnforce".into())
    );
    assert_eq!(
        cond(&s, DISK_IO_LIMIT_APPLIED),
        ("True".into(), "Applied".into())
    );
    let (_, enforced, detail) = resource(&s, "memoryHardLimitMib");
    assert!(!enforced);
    assert_eq!(
        detail,
        "not enforced by this host: cannot limit locked memory"
    );
}

/// The typed template identity hashes exactly as the JSON object it replaced, so that an
/// upgrade does not roll every pool's VMs.
#[test]
fn the_template_identity_keeps_the_hash_of_its_json_form() {
    let parsed = agentvm_api::parse_str(&pool_yaml(1, 2, 512), "p.yaml").unwrap();
    let Resource::VmPool(pool) = &parsed[0].resource else {
        panic!("not a pool")
    };
    let t = &pool.spec.template;
    for (network, host, dhcp) in [
        (None, None, false),
        (Some("abc".to_string()), Some("10.0.0.1".to_string()), true),
    ] {
        let image = ["/d", "/k", "/i", agentvm_image::KERNEL_CMDLINE];
        let old = serde_json::json!({
            "template": t,
            "image": image,
            "network": network.clone().map(serde_json::Value::from).unwrap_or(serde_json::Value::Null),
            "nicHost": host,
            "nicIpFromLease": dhcp,
        });
        let new = serde_json::to_value(TemplateIdentity {
            template: t,
            image,
            network,
            nic_host: host.clone(),
            nic_ip_from_lease: dhcp,
        })
        .unwrap();
        let (mut a, mut b) = (String::new(), String::new());
        agentvm_api::resource::write_canonical_json(&old, &mut a);
        agentvm_api::resource::write_canonical_json(&new, &mut b);
        assert_eq!(a, b);
    }
}

#[test]
fn creation_template_asks_for_vms_from_the_template_and_deletion_removes_it() {
    let p = Pools::new();
    p.t.image_ready();
    p.t.apply(&format!("{}  creation: template\n", pool_yaml(2, 2, 512)));
    p.settle().unwrap();
    let requests = p.t.fake.pool_vm_requests();
    assert_eq!(requests.len(), 2);
    assert!(requests.iter().all(|r| r.from_template), "{requests:?}");
    // The default boots every VM (a new template: its VMs are replaced).
    p.t.apply(&pool_yaml(2, 2, 768));
    p.settle().unwrap();
    assert!(!p.t.fake.pool_vm_requests().last().unwrap().from_template);
    p.t.store.request_delete(Kind::VmPool, "p", None).unwrap();
    p.settle().unwrap();
    assert!(p.t.store.get(Kind::VmPool, "p").unwrap().is_none());
    assert!(p
        .t
        .fake
        .mutations()
        .contains(&"RemovePoolTemplate(p)".to_string()));
}
