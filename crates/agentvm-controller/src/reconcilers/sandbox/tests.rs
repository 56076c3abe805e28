use super::*;
use crate::reconcilers::testutil::*;
use crate::reconcilers::VmPoolReconciler;
use agentvm_backend::fake::Op;

const POOL: &str = "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {name: p}\nspec:\n  template:\n    imageRef: img\n    resources: {profile: custom, vcpu: 1, memoryMib: 256, diskGib: 2}\n  minReady: 1\n  maxSize: 3\n";

fn sandbox(extra: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: s}}\nspec:\n  poolRef: p\n{extra}")
}

struct Boxes {
    t: Setup,
    pools: VmPoolReconciler,
    r: SandboxReconciler,
    activity: Arc<Sandboxes>,
}

impl Boxes {
    fn new() -> Self {
        let t = Setup::new();
        let registry = Arc::new(PoolRegistry::new());
        let activity = Arc::new(Sandboxes::new());
        let pools = VmPoolReconciler::new(t.backend(), registry.clone());
        let r = SandboxReconciler::new(t.backend(), registry, activity.clone());
        t.image_ready();
        t.apply(POOL);
        let b = Boxes {
            t,
            pools,
            r,
            activity,
        };
        b.settle_pool();
        b
    }

    fn settle_pool(&self) {
        for _ in 0..20 {
            match self.t.reconcile(&self.pools, Kind::VmPool, "p") {
                Ok(Action::Requeue(d)) if d < Duration::from_millis(100) => continue,
                _ => return,
            }
        }
    }

    fn pass(&self) -> Result<Action, ReconcileError> {
        self.t.reconcile(&self.r, Kind::Sandbox, "s")
    }

    fn status(&self) -> serde_json::Value {
        self.t.status(Kind::Sandbox, "s")
    }

    fn owned_by_sandbox(&self) -> Vec<String> {
        self.t
            .fake
            .domains()
            .into_iter()
            .filter(|(_, d)| {
                d.owner
                    .as_ref()
                    .is_some_and(|o| o.is_kind(Kind::Sandbox) && o.name == "s")
            })
            .map(|(n, _)| n)
            .collect()
    }
}

#[test]
fn a_sandbox_claims_a_ready_pool_vm_and_the_pool_replaces_it() {
    let b = Boxes::new();
    let pool_vms = b.t.status(Kind::VmPool, "p")["vms"].clone();
    let first = pool_vms[0].as_str().unwrap().to_string();
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Running", "{s}");
    assert_eq!(s["vm"], first.as_str());
    assert_eq!(s["pool"], "p");
    assert!(s["createdAt"].is_string());
    assert_eq!(b.owned_by_sandbox(), vec![first.clone()]);
    // The pool no longer counts it, and boots a replacement.
    b.settle_pool();
    let p = b.t.status(Kind::VmPool, "p");
    assert_eq!(p["ready"], 1, "{p}");
    assert!(!vm_names(&p).contains(&first), "{p}");
    // A second pass (or a restarted controller) keeps the same VM.
    b.pass().unwrap();
    assert_eq!(b.owned_by_sandbox(), vec![first]);
}

fn vm_names(p: &serde_json::Value) -> Vec<String> {
    p["vms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn without_a_ready_vm_or_a_pool_it_waits_and_says_why() {
    let b = Boxes::new();
    b.t.apply(&sandbox("").replace("poolRef: p", "poolRef: nope"));
    assert_eq!(b.pass().unwrap(), Action::Requeue(WAITING_FOR_VM));
    let s = b.status();
    assert_eq!(s["phase"], "Pending");
    assert_eq!(cond(&s, "Progressing").1, "PoolNotFound");
    assert!(b.owned_by_sandbox().is_empty());
}

#[test]
fn spec_state_drives_pause_save_and_resume() {
    let b = Boxes::new();
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    for (state, phase, power) in [
        ("Paused", "Paused", PowerState::Paused),
        ("Stopped", "Stopped", PowerState::Saved),
        ("Running", "Running", PowerState::Running),
        ("Stopped", "Stopped", PowerState::Saved),
        ("Paused", "Paused", PowerState::Paused),
    ] {
        b.t.apply(&sandbox(&format!("  state: {state}\n")));
        b.pass().unwrap();
        assert_eq!(b.status()["phase"], phase, "{state}");
        assert_eq!(b.t.fake.vm_power(&vm).unwrap(), power, "{state}");
    }
}

#[test]
fn idle_time_stops_a_running_sandbox_and_use_brings_it_back() {
    let b = Boxes::new();
    b.t.apply(&sandbox("  idleTimeoutSeconds: 10\n"));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    // Something in progress keeps it alive however long it lasts.
    let guard = b.activity.begin("s");
    b.activity.lock().get_mut("s").unwrap().last -= Duration::from_secs(60);
    b.activity.take_wake("s");
    b.pass().unwrap();
    assert_eq!(b.status()["phase"], "Running");
    assert_eq!(b.status()["activeExecs"], 1);
    drop(guard);
    // Idle for longer than the timeout: saved to disk, with the reason.
    b.activity.lock().get_mut("s").unwrap().last -= Duration::from_secs(11);
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Stopped", "{s}");
    assert_eq!(s["stoppedReason"], "IdleTimeout");
    assert_eq!(b.t.fake.vm_power(&vm).unwrap(), PowerState::Saved);
    // Another pass leaves it stopped.
    b.pass().unwrap();
    assert_eq!(b.status()["phase"], "Stopped");
    // The next use wakes it.
    b.activity.wake("s");
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Running", "{s}");
    assert!(s.get("stoppedReason").is_none(), "{s}");
    assert_eq!(b.t.fake.vm_power(&vm).unwrap(), PowerState::Running);
}

#[test]
fn paused_time_is_not_idle_time() {
    let b = Boxes::new();
    b.t.apply(&sandbox("  idleTimeoutSeconds: 10\n  state: Paused\n"));
    b.pass().unwrap();
    b.activity.lock().get_mut("s").unwrap().last -= Duration::from_secs(60);
    b.pass().unwrap();
    assert_eq!(b.status()["phase"], "Paused");
    // Resumed after a long pause: the idle clock starts again.
    b.t.apply(&sandbox("  idleTimeoutSeconds: 10\n"));
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Running", "{s}");
    assert!(s["idleSeconds"].as_u64().unwrap() < 10, "{s}");
}

#[test]
fn ttl_with_policy_delete_deletes_the_sandbox_and_its_vm() {
    let b = Boxes::new();
    b.t.apply(&sandbox("  ttlSeconds: 10\n  shutdownPolicy: Delete\n"));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    // Claimed 11 s ago.
    let mut st: SandboxStatus = serde_json::from_value(b.status()).unwrap();
    st.created_at = Some(Timestamp(SystemTime::now() - Duration::from_secs(11)));
    b.t.store.update_status("s", st).unwrap();
    b.pass().unwrap();
    assert!(b
        .t
        .store
        .get(Kind::Sandbox, "s")
        .unwrap()
        .unwrap()
        .is_deleting());
    b.pass().unwrap();
    assert!(b.t.store.get(Kind::Sandbox, "s").unwrap().is_none());
    assert!(!b.t.fake.domains().contains_key(&vm));
}

#[test]
fn a_shutdown_time_in_the_past_stops_it_until_the_time_is_moved() {
    let b = Boxes::new();
    b.t.apply(&sandbox("  shutdownTime: \"2020-01-01T00:00:00Z\"\n"));
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Stopped", "{s}");
    assert_eq!(s["stoppedReason"], "ShutdownTime");
    // A use does not bring it back while the time is past...
    b.activity.wake("s");
    b.pass().unwrap();
    assert_eq!(b.status()["phase"], "Stopped");
    // ...moving the time does.
    b.t.apply(&sandbox("  shutdownTime: \"2999-01-01T00:00:00Z\"\n"));
    b.pass().unwrap();
    assert_eq!(b.status()["phase"], "Running");
}

#[test]
fn a_vanished_vm_fails_the_sandbox_which_can_still_be_deleted() {
    let b = Boxes::new();
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.fake.destroy_vm(&vm).unwrap();
    b.pass().unwrap();
    let s = b.status();
    assert_eq!(s["phase"], "Failed");
    assert_eq!(cond(&s, "Degraded").1, "VmLost");

    // A failed sandbox is deleted like any other.
    b.t.store.request_delete(Kind::Sandbox, "s", None).unwrap();
    b.pass().unwrap();
    assert!(b.t.store.get(Kind::Sandbox, "s").unwrap().is_none());
}

#[test]
fn deletion_destroys_the_claimed_vm_and_a_failed_claim_gives_the_vm_back() {
    let b = Boxes::new();
    b.t.fake.fail_next(
        Op::SetVmOwner,
        agentvm_backend::BackendError::Protocol {
            what: "metadata".into(),
            message: "boom".into(),
        },
    );
    b.t.apply(&sandbox(""));
    assert!(b.pass().is_err());
    assert!(b.owned_by_sandbox().is_empty());
    assert_eq!(cond(&b.status(), "Degraded").0, "True");
    // The VM is still the pool's (reset before it is handed out again).
    b.settle_pool();
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.store.request_delete(Kind::Sandbox, "s", None).unwrap();
    b.pass().unwrap();
    assert!(!b.t.fake.domains().contains_key(&vm));
    assert!(b.t.store.get(Kind::Sandbox, "s").unwrap().is_none());
}

fn snapshot_yaml(name: &str, sandbox: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: Snapshot\nmetadata: {{name: {name}}}\nspec: {{sandboxRef: {sandbox}}}\n")
}

fn rollback_to(snapshot: &str, at: &str) -> String {
    format!("  rollback: {{snapshot: {snapshot}, requestedAt: \"{at}\"}}\n")
}

#[test]
fn snapshots_are_taken_once_the_sandbox_runs_and_rollbacks_happen_once_per_request() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox("  state: Stopped\n"));
    b.pass().unwrap();
    b.t.apply(&snapshot_yaml("one", "s"));
    // Waits while the sandbox is stopped.
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    let st = b.t.status(Kind::Snapshot, "one");
    assert_eq!(st["phase"], "Pending");
    assert_eq!(cond(&st, "Progressing").1, "WaitingForSandbox");
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    let st = b.t.status(Kind::Snapshot, "one");
    assert_eq!(st["phase"], "Ready", "{st}");
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    assert_eq!(st["vm"], vm.as_str());
    b.pass().unwrap();
    assert_eq!(b.status()["snapshots"], serde_json::json!(["one"]));

    // Rolled back once per request.
    b.t.apply(&sandbox(&rollback_to("one", "2026-01-01T00:00:00Z")));
    b.pass().unwrap();
    b.pass().unwrap();
    assert_eq!(b.t.fake.rollbacks(), vec![(vm.clone(), "one".to_string())]);
    assert_eq!(b.status()["lastRollback"]["done"], true);
    b.t.apply(&sandbox(&rollback_to("one", "2026-01-01T00:00:01Z")));
    b.pass().unwrap();
    assert_eq!(b.t.fake.rollbacks().len(), 2);

    // Refused: a snapshot that does not exist, or of another sandbox.
    b.t.apply(&sandbox(&rollback_to("nope", "2026-01-01T00:00:02Z")));
    b.pass().unwrap();
    let last = &b.status()["lastRollback"];
    assert_eq!(last["done"], false, "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("does not exist"),
        "{last}"
    );
    b.t.apply(&snapshot_yaml("other", "elsewhere"));
    b.t.apply(&sandbox(&rollback_to("other", "2026-01-01T00:00:03Z")));
    b.pass().unwrap();
    let last = &b.status()["lastRollback"];
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("not of this one"),
        "{last}"
    );
    assert_eq!(b.t.fake.rollbacks().len(), 2);

    // Gone by hand: the snapshot fails; deleting the sandbox deletes its snapshots.
    b.t.fake.delete_vm_snapshot(&vm, "one").unwrap();
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    let st = b.t.status(Kind::Snapshot, "one");
    assert_eq!(st["phase"], "Failed");
    assert_eq!(cond(&st, "Degraded").1, "SnapshotLost");
    b.t.store.request_delete(Kind::Sandbox, "s", None).unwrap();
    b.pass().unwrap();
    assert!(b
        .t
        .store
        .get(Kind::Snapshot, "one")
        .unwrap()
        .unwrap()
        .is_deleting());
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    assert!(b.t.store.get(Kind::Snapshot, "one").unwrap().is_none());
}

#[test]
fn a_sandbox_at_max_snapshots_fails_the_next_one() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox("  maxSnapshots: 1\n"));
    b.pass().unwrap();
    b.t.apply(&snapshot_yaml("a", "s"));
    b.t.apply(&snapshot_yaml("b", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "a").unwrap();
    b.t.reconcile(&snaps, Kind::Snapshot, "b").unwrap();
    assert_eq!(b.t.status(Kind::Snapshot, "a")["phase"], "Ready");
    let st = b.t.status(Kind::Snapshot, "b");
    assert_eq!(st["phase"], "Failed");
    assert_eq!(cond(&st, "Degraded").1, "SnapshotLimit");
}

#[test]
fn a_snapshot_past_max_snapshot_mib_is_deleted_again_and_fails() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox("  maxSnapshotMib: 64\n"));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.apply(&snapshot_yaml("a", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "a").unwrap();
    assert_eq!(b.t.status(Kind::Snapshot, "a")["phase"], "Ready");
    // `a` holds 63.5 MiB; the fake takes 1 MiB per snapshot, so `b` crosses 64 MiB.
    let obj = b.t.store.get(Kind::Snapshot, "a").unwrap().unwrap();
    let Resource::Snapshot(a) = &obj.resource else {
        unreachable!()
    };
    let mut st = a.status.clone().unwrap();
    st.memory_bytes = Some(127 << 19);
    b.t.store.update_status("a", st).unwrap();
    b.t.apply(&snapshot_yaml("b", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "b").unwrap();
    let st = b.t.status(Kind::Snapshot, "b");
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "SnapshotLimit");
    let message = st["conditions"].to_string();
    assert!(
        message.contains("would hold 64 MiB") && message.contains("maxSnapshotMib of 64"),
        "{message}"
    );
    // Deleted again in the VM: only `a` is left.
    assert_eq!(b.t.fake.vm_snapshots(&vm).unwrap(), vec!["a".to_string()]);
}

#[test]
fn a_snapshot_on_a_full_host_disk_waits_with_a_clear_condition_then_is_taken() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.fake.fail_next(
        Op::SnapshotVm,
        agentvm_backend::BackendError::HostDiskFull {
            path: "/var/lib/agentvm/vms/x".into(),
            what: format!("snapshot \"full\" of {vm}"),
            needed_bytes: 320 << 20,
            free_bytes: 12 << 20,
        },
    );
    b.t.apply(&snapshot_yaml("full", "s"));
    assert!(b.t.reconcile(&snaps, Kind::Snapshot, "full").is_err());
    let st = b.t.status(Kind::Snapshot, "full");
    assert_ne!(st["phase"], "Failed", "it waits for space: {st}");
    assert_ne!(st["phase"], "Ready", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "HostDiskFull", "{st}");
    let message = st["conditions"].to_string();
    assert!(
        message.contains("12 MiB free") && message.contains("about 320 MiB"),
        "{message}"
    );
    assert!(
        b.t.fake.vm_snapshots(&vm).unwrap().is_empty(),
        "nothing taken"
    );
    assert_eq!(b.status()["phase"], "Running", "the sandbox runs on");
    // Space is back: the next pass takes it.
    b.t.reconcile(&snaps, Kind::Snapshot, "full").unwrap();
    assert_eq!(b.t.status(Kind::Snapshot, "full")["phase"], "Ready");
}

#[test]
fn only_the_sandbox_s_owner_and_root_may_snapshot_it() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.apply(&snapshot_yaml("theirs", "s"));
    b.t.resubmit_as(Kind::Snapshot, "theirs", 4242);
    assert_eq!(
        b.t.reconcile(&snaps, Kind::Snapshot, "theirs").unwrap(),
        Action::AwaitChange
    );
    let st = b.t.status(Kind::Snapshot, "theirs");
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "NotPermitted");
    assert!(
        st["conditions"]
            .to_string()
            .contains("only they and root may snapshot it"),
        "{st}"
    );
    assert!(
        b.t.fake.vm_snapshots(&vm).unwrap().is_empty(),
        "nothing taken"
    );
    // Root's own is taken.
    b.t.apply(&snapshot_yaml("roots", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "roots").unwrap();
    assert_eq!(b.t.status(Kind::Snapshot, "roots")["phase"], "Ready");
}

#[test]
fn a_snapshot_taken_but_not_recorded_before_a_restart_is_adopted_not_retaken() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    // The earlier controller took it, then died.
    b.t.fake.snapshot_vm(&vm, "one", true).unwrap();
    b.t.apply(&snapshot_yaml("one", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    let st = b.t.status(Kind::Snapshot, "one");
    assert_eq!(st["phase"], "Ready", "{st}");
    assert!(cond(&st, "Ready").1 == "Taken");
    let taken =
        b.t.fake
            .calls()
            .iter()
            .filter(|c| c.op == Op::SnapshotVm)
            .count();
    assert_eq!(taken, 1, "taken once, by the earlier controller");
}

fn fork_yaml(name: &str, snapshot: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec: {{fromSnapshot: {snapshot}}}\n")
}

#[test]
fn a_fork_waits_for_its_snapshot_then_gets_its_own_vm_and_only_owners_may_fork() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    let fork = |name: &str| b.t.reconcile(&b.r, Kind::Sandbox, name);
    let forks = || -> Vec<String> {
        b.t.fake
            .calls()
            .into_iter()
            .filter(|c| c.op == Op::ForkVm)
            .map(|c| c.name)
            .collect()
    };
    // No such snapshot yet: it waits and says why.
    b.t.apply(&fork_yaml("f", "one"));
    assert_eq!(fork("f").unwrap(), Action::Requeue(WAITING_FOR_VM));
    let st = b.t.status(Kind::Sandbox, "f");
    assert_eq!(st["phase"], "Pending", "{st}");
    assert_eq!(cond(&st, "Progressing").1, "SnapshotNotFound");
    // Taken: the fork gets a VM of its own, made from the source's VM at that snapshot.
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let source_vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.apply(&snapshot_yaml("one", "s"));
    fork("f").unwrap();
    assert_eq!(
        cond(&b.t.status(Kind::Sandbox, "f"), "Progressing").1,
        "WaitingForSnapshot"
    );
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    fork("f").unwrap();
    let st = b.t.status(Kind::Sandbox, "f");
    assert_eq!(st["phase"], "Running", "{st}");
    assert_eq!(st["vm"], "agentvm-sbx-f");
    assert_eq!(st["pool"], "p");
    assert_eq!(st["forkedFrom"]["snapshot"], "one");
    assert_eq!(st["forkedFrom"]["sandbox"], "s");
    assert_eq!(forks(), vec!["agentvm-sbx-f".to_string()]);
    // Its VM is its own: a second pass forks nothing more, the source keeps its VM.
    fork("f").unwrap();
    assert_eq!(forks().len(), 1);
    assert_eq!(b.owned_by_sandbox(), vec![source_vm]);

    // Someone else's sandbox: refused for good, nothing made.
    b.t.apply(&fork_yaml("g", "one"));
    b.t.resubmit_as(Kind::Sandbox, "g", 4242);
    assert_eq!(fork("g").unwrap(), Action::AwaitChange);
    let st = b.t.status(Kind::Sandbox, "g");
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "NotPermitted");
    assert_eq!(forks().len(), 1);

    // The backend cannot fork it (a VM with two network interfaces, which agentvm never
    // makes): failed, with its reason.
    b.t.apply(&fork_yaml("h", "one"));
    b.t.fake.fail_next(
        Op::ForkVm,
        agentvm_backend::BackendError::Unsupported {
            what: "forking x".into(),
            why: "it has more than one network interface".into(),
        },
    );
    assert_eq!(fork("h").unwrap(), Action::AwaitChange);
    let st = b.t.status(Kind::Sandbox, "h");
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "Unsupported");
    assert!(
        st["conditions"]
            .to_string()
            .contains("more than one network interface"),
        "{st}"
    );
}

#[test]
fn a_fork_left_unfinished_by_a_stopped_controller_is_destroyed_and_made_again() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    b.t.apply(&snapshot_yaml("one", "s"));
    b.t.reconcile(&snaps, Kind::Snapshot, "one").unwrap();
    b.t.apply(&fork_yaml("f", "one"));
    // What a controller killed in the middle of `fork_vm` leaves: a domain owned by the
    // fork, marked unfinished (possibly paused, its snapshot not loaded).
    b.t.fake.add_owned_domain(
        "agentvm-sbx-f",
        Owner {
            kind: agentvm_api::Kind::Sandbox.into(),
            name: "f".into(),
            spec_hash: agentvm_backend::fork::UNFINISHED.into(),
            generation: 1,
        },
        false,
    );
    b.t.reconcile(&b.r, Kind::Sandbox, "f").unwrap();
    let st = b.t.status(Kind::Sandbox, "f");
    assert_eq!(st["phase"], "Running", "{st}");
    let calls: Vec<String> =
        b.t.fake
            .calls()
            .into_iter()
            .filter(|c| matches!(c.op, Op::DestroyVm | Op::ForkVm))
            .map(|c| format!("{:?}({})", c.op, c.name))
            .collect();
    assert_eq!(
        calls,
        vec!["DestroyVm(agentvm-sbx-f)", "ForkVm(agentvm-sbx-f)"]
    );
    let owner = b.t.fake.domains()["agentvm-sbx-f"].owner.clone().unwrap();
    assert_ne!(owner.spec_hash, agentvm_backend::fork::UNFINISHED);
}

#[test]
fn a_disk_only_snapshot_has_no_memory_rolls_back_with_a_boot_and_cannot_be_forked() {
    let b = Boxes::new();
    let snaps = crate::reconcilers::SnapshotReconciler::new(b.t.backend());
    b.t.apply(&sandbox(""));
    b.pass().unwrap();
    let vm = b.status()["vm"].as_str().unwrap().to_string();
    b.t.apply(&snapshot_yaml("disk", "s").replace("s}\n", "s, memory: false}\n"));
    b.t.reconcile(&snaps, Kind::Snapshot, "disk").unwrap();
    let st = b.t.status(Kind::Snapshot, "disk");
    assert_eq!(st["phase"], "Ready", "{st}");
    assert_eq!(st["diskOnly"], true, "{st}");
    assert!(st.get("memoryBytes").is_none(), "{st}");
    assert_eq!(cond(&st, "Ready").1, "Taken");
    assert!(
        st["conditions"]
            .to_string()
            .contains("file systems were frozen"),
        "{st}"
    );
    assert!(b
        .t
        .fake
        .calls()
        .iter()
        .any(|c| c.op == Op::SnapshotVm && c.name == vm));

    // A rollback to it says the sandbox booted afresh.
    b.t.apply(&sandbox(&rollback_to("disk", "2026-01-01T00:00:00Z")));
    b.pass().unwrap();
    assert_eq!(b.t.fake.rollbacks(), vec![(vm.clone(), "disk".to_string())]);
    let last = &b.status()["lastRollback"];
    assert_eq!(last["done"], true, "{last}");
    assert!(
        last["message"].as_str().unwrap().contains("booted afresh"),
        "{last}"
    );

    // A fork of it fails at once, naming the snapshot; nothing is made.
    b.t.apply(&fork_yaml("f", "disk"));
    assert_eq!(
        b.t.reconcile(&b.r, Kind::Sandbox, "f").unwrap(),
        Action::AwaitChange
    );
    let st = b.t.status(Kind::Sandbox, "f");
    assert_eq!(st["phase"], "Failed", "{st}");
    assert_eq!(cond(&st, "Degraded").1, "SnapshotHasNoMemory");
    let conditions = st["conditions"].to_string();
    assert!(
        conditions.contains("Snapshot disk of sandbox s") && conditions.contains("with memory"),
        "{conditions}"
    );
    assert!(st.get("vm").is_none(), "{st}");
    assert!(!b.t.fake.calls().iter().any(|c| c.op == Op::ForkVm));
    assert_eq!(b.owned_by_sandbox(), vec![vm]);
}

fn template_sandbox(name: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec:\n  template:\n    imageRef: img\n    resources: {{profile: custom, vcpu: 1, memoryMib: 384, diskGib: 2}}\n")
}

#[test]
fn a_template_sandbox_waits_for_its_image_then_boots_a_vm_of_its_own() {
    let t = Setup::new();
    let registry = Arc::new(PoolRegistry::new());
    let r = SandboxReconciler::new(t.backend(), registry.clone(), Arc::new(Sandboxes::new()));
    t.apply(&template_sandbox("t"));
    // No image yet, then one not built: it waits and says so; nothing is made.
    assert_eq!(
        t.reconcile(&r, Kind::Sandbox, "t").unwrap(),
        Action::Requeue(WAITING_FOR_VM)
    );
    let st = t.status(Kind::Sandbox, "t");
    assert_eq!(st["phase"], "Pending", "{st}");
    assert_eq!(cond(&st, "Progressing").1, "WaitingForImage");
    assert!(st["conditions"].to_string().contains("Image img"), "{st}");
    t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {name: img}\nspec: {}\n");
    t.reconcile(&r, Kind::Sandbox, "t").unwrap();
    assert_eq!(
        cond(&t.status(Kind::Sandbox, "t"), "Progressing").1,
        "WaitingForImage"
    );
    assert!(t.fake.domains().is_empty());
    assert!(t.fake.pool_vm_requests().is_empty());

    // Ready: one VM, through create_vm, not parked, the template's shape, owned by the
    // sandbox (marked made once it is up).
    t.image_ready();
    t.reconcile(&r, Kind::Sandbox, "t").unwrap();
    let st = t.status(Kind::Sandbox, "t");
    assert_eq!(st["phase"], "Running", "{st}");
    assert_eq!(st["vm"], "agentvm-sbx-t");
    assert!(st.get("pool").is_none(), "{st}");
    let reqs = t.fake.pool_vm_requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].name, "agentvm-sbx-t");
    assert!(!reqs[0].park && !reqs[0].from_template);
    assert_eq!((reqs[0].vcpus, reqs[0].memory_mib), (1, 384));
    assert_eq!(reqs[0].disk_gib, Some(2));
    assert_eq!(reqs[0].owner.spec_hash, agentvm_backend::fork::UNFINISHED);
    let owner = t.fake.domains()["agentvm-sbx-t"].owner.clone().unwrap();
    assert!(owner.is_kind(Kind::Sandbox) && owner.name == "t");
    assert_ne!(owner.spec_hash, agentvm_backend::fork::UNFINISHED);

    // A restarted controller adopts it: nothing booted twice.
    let r2 = SandboxReconciler::new(t.backend(), registry, Arc::new(Sandboxes::new()));
    t.reconcile(&r2, Kind::Sandbox, "t").unwrap();
    assert_eq!(t.fake.pool_vm_requests().len(), 1);
    // Drift: found off (destroyed by hand), it is started again from its disk.
    t.fake
        .set_vm_power("agentvm-sbx-t", PowerState::Off)
        .unwrap();
    t.reconcile(&r2, Kind::Sandbox, "t").unwrap();
    assert_eq!(
        t.fake.vm_power("agentvm-sbx-t").unwrap(),
        PowerState::Running
    );
    assert_eq!(t.status(Kind::Sandbox, "t")["phase"], "Running");
    // Deletion destroys it.
    t.store.request_delete(Kind::Sandbox, "t", None).unwrap();
    t.reconcile(&r2, Kind::Sandbox, "t").unwrap();
    assert!(t.fake.domains().is_empty());
    assert!(t.store.get(Kind::Sandbox, "t").unwrap().is_none());
}

#[test]
fn a_template_vm_left_unfinished_is_destroyed_and_booted_again_and_a_failed_boot_leaves_nothing() {
    let b = Boxes::new();
    b.t.apply(&template_sandbox("t"));
    // What a controller killed in the middle of create_vm leaves.
    b.t.fake
        .create_vm(&agentvm_backend::VmRequest {
            name: "agentvm-sbx-t".into(),
            owner: Owner {
                kind: Kind::Sandbox.into(),
                name: "t".into(),
                spec_hash: agentvm_backend::fork::UNFINISHED.into(),
                generation: 1,
            },
            ..b.t.fake.pool_vm_requests()[0].clone()
        })
        .unwrap();
    let before = b.t.fake.pool_vm_requests().len();
    b.t.reconcile(&b.r, Kind::Sandbox, "t").unwrap();
    assert!(b
        .t
        .fake
        .calls()
        .iter()
        .any(|c| c.op == Op::DestroyVm && c.name == "agentvm-sbx-t"));
    assert_eq!(b.t.fake.pool_vm_requests().len(), before + 1);
    let owner = b.t.fake.domains()["agentvm-sbx-t"].owner.clone().unwrap();
    assert_ne!(owner.spec_hash, agentvm_backend::fork::UNFINISHED);
    assert_eq!(b.t.status(Kind::Sandbox, "t")["phase"], "Running");

    // A boot that fails: an error (retried), no VM recorded, nothing left.
    b.t.apply(&template_sandbox("u"));
    b.t.fake.fail_next(
        Op::CreatePoolVm,
        agentvm_backend::BackendError::Protocol {
            what: "booting".into(),
            message: "no agent".into(),
        },
    );
    assert!(b.t.reconcile(&b.r, Kind::Sandbox, "u").is_err());
    assert!(!b.t.fake.domains().contains_key("agentvm-sbx-u"));
    assert!(b.t.status(Kind::Sandbox, "u").get("vm").is_none());
    b.t.reconcile(&b.r, Kind::Sandbox, "u").unwrap();
    assert_eq!(b.t.status(Kind::Sandbox, "u")["vm"], "agentvm-sbx-u");
}
