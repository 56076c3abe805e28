use super::*;
use crate::reconcilers::testutil::*;
use crate::reconcilers::{VmPhase, VmPoolReconciler};
use agentvm_api::Kind;

const SECRET: &str = "sup3r-s3cret-v4lue";

fn pool_yaml(min: u32, max: u32) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: p}}\nspec:\n  template:\n    imageRef: img\n  minReady: {min}\n  maxSize: {max}\n")
}

/// A run of `source` (interpreted by the fake agent) on pool `p`.
fn run_yaml(name: &str, source: &str, extra: &str) -> String {
    let source = source.replace('\n', "\\n");
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {{name: {name}}}\nspec:\n  poolRef: p\n  script: {{interpreter: sh, source: \"{source}\"}}\n{extra}")
}

struct Runs {
    t: Setup,
    registry: Arc<PoolRegistry>,
    pools: VmPoolReconciler,
    runs: AgentRunReconciler,
}

impl Runs {
    fn new(min: u32, max: u32) -> Self {
        let t = Setup::new();
        t.image_ready();
        t.apply(&pool_yaml(min, max));
        let registry = Arc::new(PoolRegistry::new());
        let pools = VmPoolReconciler::new(t.backend(), registry.clone());
        let runs = AgentRunReconciler::new(t.backend(), registry.clone()).host_env(Arc::new(|k| {
            (k == "HOST_TOKEN").then(|| SECRET.to_string())
        }));
        Runs {
            t,
            registry,
            pools,
            runs,
        }
    }

    fn run_names(&self) -> Vec<String> {
        self.t
            .store
            .list(Some(Kind::AgentRun))
            .unwrap()
            .into_iter()
            .map(|o| o.resource.name().to_string())
            .collect()
    }

    fn phase(&self, run: &str) -> Option<String> {
        let o = self.t.store.get(Kind::AgentRun, run).unwrap()?;
        Some(
            o.status_json()["phase"]
                .as_str()
                .unwrap_or("Pending")
                .to_string(),
        )
    }

    /// One pass: the pool (a few steps), then every run in name order.
    fn pass(&self) {
        for _ in 0..4 {
            let _ = self.t.reconcile(&self.pools, Kind::VmPool, "p");
        }
        for name in self.run_names() {
            if let Some(o) = self.t.store.get(Kind::AgentRun, &name).unwrap() {
                let _ = self.runs.reconcile(Arc::new(o), &self.t.ctx);
            }
        }
    }

    /// Passes until `done` holds (at most 10 s).
    fn drive(&self, mut done: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "runs never settled"
            );
            self.pass();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn a_vm_ready(&self) -> bool {
        self.registry
            .vms("p")
            .iter()
            .any(|v| v.phase == VmPhase::Ready)
    }

    fn all_terminal(&self) -> bool {
        self.run_names().iter().all(|n| {
            let o = self.t.store.get(Kind::AgentRun, n).unwrap().unwrap();
            status_of::<AgentRunStatus>(&o).phase.is_terminal()
        }) && self.runs.executing().is_empty()
    }

    fn status(&self, run: &str) -> AgentRunStatus {
        status_of(&self.t.store.get(Kind::AgentRun, run).unwrap().unwrap())
    }

    fn output(&self, run: &str) -> String {
        let r = self.t.store.read_output(run, 0, 1 << 20).unwrap();
        String::from_utf8(r.bytes()).unwrap()
    }
}

#[test]
fn runs_wait_in_fifo_order_at_max_size_one() {
    let r = Runs::new(1, 1);
    // Applied in this order; names sort the other way, so order comes from creation time.
    let names = ["r9", "r7", "r5", "r3", "r1"];
    for n in names {
        r.t.apply(&run_yaml(
            n,
            &format!("echo hello from {n}\nsleep 0.05"),
            "",
        ));
        std::thread::sleep(Duration::from_millis(3));
    }
    r.drive(Runs::all_terminal);
    let mut started: Vec<(Timestamp, String)> = names
        .iter()
        .map(|n| {
            let s = r.status(n);
            assert_eq!(s.phase, AgentRunPhase::Succeeded, "{n}: {s:?}");
            assert_eq!(s.exit_code, Some(0));
            assert_eq!(s.reason.as_deref(), Some("Completed"));
            assert_eq!(s.stdout_tail, format!("hello from {n}\n"));
            assert_eq!(r.output(n), format!("hello from {n}\n"));
            assert!(s.finished_at.is_some());
            (s.started_at.unwrap(), n.to_string())
        })
        .collect();
    started.sort();
    let order: Vec<&str> = started.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(order, names, "runs started out of submission order");
    // One VM only, reset after every run.
    let domains = r.t.fake.domains();
    assert_eq!(domains.len(), 1);
    let d = domains.values().next().unwrap();
    r.drive(|r| {
        r.registry
            .vms("p")
            .iter()
            .all(|v| v.phase == VmPhase::Ready)
    });
    assert_eq!(
        r.t.fake.domains().values().next().unwrap().resets,
        5,
        "{d:?}"
    );
}

#[test]
fn waiting_runs_make_the_pool_grow_up_to_max_size() {
    let r = Runs::new(0, 3);
    for n in ["a", "b", "c", "d", "e"] {
        r.t.apply(&run_yaml(n, "sleep 0.3", ""));
    }
    r.drive(|r| r.runs.executing().len() == 3);
    assert_eq!(r.t.fake.domains().len(), 3);
    let mut most = 0;
    r.drive(|r| {
        most = most.max(r.t.fake.domains().len());
        r.all_terminal()
    });
    assert_eq!(most, 3, "never beyond maxSize");
    for n in ["a", "b", "c", "d", "e"] {
        assert_eq!(r.status(n).phase, AgentRunPhase::Succeeded);
    }
    // Demand gone: the pool scales back to minReady 0.
    r.drive(|r| r.registry.waiting("p") == 0 && r.t.fake.domains().is_empty());
}

#[test]
fn deleting_a_running_run_kills_it_resets_the_vm_and_finalizes() {
    let r = Runs::new(1, 1);
    r.t.apply(&run_yaml("long", "echo started\nsleep 30", ""));
    r.drive(|r| r.phase("long").as_deref() == Some("Running"));
    let vm = r.status("long").vm.unwrap();
    assert_eq!(r.registry.phase("p", &vm), Some(VmPhase::Busy));
    let t0 = Instant::now();
    r.t.store
        .request_delete(Kind::AgentRun, "long", None)
        .unwrap();
    let mut seen_cancelled = false;
    r.drive(|r| {
        if r.phase("long").as_deref() == Some("Cancelled") {
            seen_cancelled = true;
        }
        r.phase("long").is_none()
    });
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "killed, not waited for"
    );
    let _ = seen_cancelled;
    assert!(r.runs.executing().is_empty());
    r.drive(|r| r.registry.phase("p", &vm) == Some(VmPhase::Ready));
    assert_eq!(r.t.fake.domains()[&vm].resets, 1);
    assert!(r
        .t
        .ctx
        .metrics
        .render()
        .contains("agent_execution_total{status=\"cancelled\"} 1"));
}

#[test]
fn a_run_past_its_timeout_ends_timed_out_and_the_vm_comes_back() {
    let r = Runs::new(1, 1);
    r.t.apply(&run_yaml(
        "slow",
        "echo working\nsleep 20",
        "  timeoutSeconds: 1\n",
    ));
    r.drive(Runs::all_terminal);
    let s = r.status("slow");
    assert_eq!(s.phase, AgentRunPhase::TimedOut, "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("Timeout"));
    assert_eq!(s.stdout_tail, "working\n");
    let vm = s.vm.unwrap();
    r.drive(|r| r.registry.phase("p", &vm) == Some(VmPhase::Ready));
    assert_eq!(r.t.fake.domains()[&vm].resets, 1);
    // The next run gets the same (reset) VM.
    r.t.apply(&run_yaml("next", "exit 3", ""));
    r.drive(Runs::all_terminal);
    let s = r.status("next");
    assert_eq!(
        (s.phase, s.exit_code, s.reason.as_deref()),
        (AgentRunPhase::Failed, Some(3), Some("NonZeroExit"))
    );
    assert_eq!(s.vm.as_deref(), Some(vm.as_str()));
}

#[test]
fn secrets_reach_the_guest_but_never_status_output_or_store_file() {
    let r = Runs::new(1, 1);
    let extra = "  secretEnv:\n  - {name: TOKEN, fromEnv: HOST_TOKEN}\n";
    r.t.apply(&run_yaml(
        "sec",
        "echo token=$TOKEN\necho err $TOKEN >&2",
        extra,
    ));
    r.drive(Runs::all_terminal);
    let s = r.status("sec");
    assert_eq!(s.phase, AgentRunPhase::Succeeded, "{s:?}");
    assert_eq!(s.stdout_tail, "token=[REDACTED]\n");
    assert_eq!(s.stderr_tail, "err [REDACTED]\n");
    let status = r.t.status(Kind::AgentRun, "sec").to_string();
    assert!(!status.contains(SECRET));
    assert!(!r.output("sec").contains(SECRET));
    let stdout: Vec<u8> =
        r.t.store
            .read_output("sec", 0, 1 << 20)
            .unwrap()
            .chunks
            .into_iter()
            .filter(|c| c.stream == OutputStream::Stdout)
            .flat_map(|c| c.data)
            .collect();
    assert_eq!(stdout, b"token=[REDACTED]\n");
    let file = std::fs::read(r.t.store.path()).unwrap();
    assert!(
        !file.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the secret is in the store file"
    );

    // A secret that cannot be read fails the run before it takes a VM.
    let extra = "  secretEnv:\n  - {name: TOKEN, fromEnv: NOT_SET_ANYWHERE}\n";
    r.t.apply(&run_yaml("nosec", "echo hi", extra));
    r.drive(Runs::all_terminal);
    let s = r.status("nosec");
    assert_eq!(s.phase, AgentRunPhase::Failed);
    assert_eq!(s.reason.as_deref(), Some("SecretUnavailable"));
    assert!(s.vm.is_none());
}

#[test]
fn a_run_left_running_by_another_cluster_node_fails_node_lost_once() {
    let r = Runs::new(1, 1);
    r.t.apply(&run_yaml("elsewhere", "echo hi", ""));
    r.t.store
        .update_status_json(
            Kind::AgentRun,
            "elsewhere",
            serde_json::json!({"phase": "Running", "vm": "agentvm-p-old00", "node": "node-a"}),
        )
        .unwrap();
    r.pass();
    let s = r.status("elsewhere");
    assert_eq!(s.phase, AgentRunPhase::Failed);
    assert_eq!(s.reason.as_deref(), Some("NodeLost"));
    assert_eq!(s.node.as_deref(), Some("node-a"), "where its output is");
    let message = s
        .conditions
        .iter()
        .map(|c| c.message.clone())
        .collect::<String>();
    assert!(
        message.contains("node node-a") && message.contains("not started again"),
        "{message}"
    );
    // Terminal: a later pass changes nothing (the run is never started twice).
    let before = r.status("elsewhere");
    r.pass();
    assert_eq!(r.status("elsewhere"), before);
}

#[test]
fn runs_left_in_flight_by_an_earlier_controller_fail_with_controller_restarted() {
    let r = Runs::new(1, 1);
    for (n, phase) in [("was-running", "Running"), ("was-scheduled", "Scheduled")] {
        r.t.apply(&run_yaml(n, "echo hi", ""));
        r.t.store
            .update_status_json(
                Kind::AgentRun,
                n,
                serde_json::json!({"phase": phase, "vm": "agentvm-p-old00"}),
            )
            .unwrap();
    }
    r.pass();
    for n in ["was-running", "was-scheduled"] {
        let s = r.status(n);
        assert_eq!(s.phase, AgentRunPhase::Failed);
        assert_eq!(s.reason.as_deref(), Some("ControllerRestarted"));
        assert!(s.finished_at.is_some());
    }
    // A run of this process is left alone while it executes.
    r.t.apply(&run_yaml("mine", "sleep 0.5", ""));
    r.drive(|r| r.phase("mine").as_deref() == Some("Running"));
    r.pass();
    assert_eq!(r.phase("mine").as_deref(), Some("Running"));
    r.drive(Runs::all_terminal);
    assert_eq!(r.status("mine").phase, AgentRunPhase::Succeeded);
}

#[test]
fn a_run_of_a_missing_pool_waits_with_reason_pool_not_found() {
    let r = Runs::new(1, 1);
    let yaml = run_yaml("orphan", "echo hi", "").replace("poolRef: p", "poolRef: nope");
    r.t.apply(&yaml);
    r.pass();
    let s = r.status("orphan");
    assert_eq!(s.phase, AgentRunPhase::Pending);
    assert_eq!(s.reason.as_deref(), Some("PoolNotFound"));
    // Deleting a run that never started finalizes it at once.
    r.t.store
        .request_delete(Kind::AgentRun, "orphan", None)
        .unwrap();
    r.pass();
    assert!(r.phase("orphan").is_none());
}

#[test]
fn a_vm_whose_agent_is_gone_fails_the_run_with_vm_lost_and_is_replaced() {
    let r = Runs::new(1, 1);
    r.drive(Runs::a_vm_ready);
    r.t.fake.fail_next(
        agentvm_backend::fake::Op::Agent,
        agentvm_backend::BackendError::GuestAgentUnavailable {
            vm: "x".into(),
            message: "gone".into(),
        },
    );
    r.t.apply(&run_yaml("lost", "echo hi", ""));
    r.drive(Runs::all_terminal);
    let s = r.status("lost");
    assert_eq!(s.phase, AgentRunPhase::Failed);
    assert_eq!(s.reason.as_deref(), Some("VmLost"));
    assert!(s.conditions.iter().any(|c| c.message.contains("replaced")));
    let vm = s.vm.unwrap();
    // Destroyed, not reset; the pool starts another VM in its place.
    assert!(!r.t.fake.domains().contains_key(&vm));
    r.drive(|r| {
        r.registry
            .vms("p")
            .iter()
            .any(|v| v.phase == VmPhase::Ready && v.name != vm)
    });
    assert_eq!(r.registry.phase("p", &vm), None);
}

#[test]
fn a_vm_that_expires_during_a_run_finishes_it_and_is_replaced_not_reset() {
    let r = Runs::new(1, 1);
    r.drive(Runs::a_vm_ready);
    let vm = r.registry.vms("p")[0].name.clone();
    r.t.apply(&run_yaml("long", "sleep 0.3\necho done", ""));
    r.drive(|r| r.phase("long").as_deref() == Some("Running"));
    // The VM passes its TTL (default 3600 s) while the run is in it.
    r.registry.seed_created(
        "p",
        &vm,
        std::time::SystemTime::now() - Duration::from_secs(7200),
    );
    r.pass();
    assert_eq!(r.registry.phase("p", &vm), Some(VmPhase::Busy));
    r.t.fake.clear_calls();
    r.drive(|r| r.all_terminal() && r.registry.vms("p").iter().all(|v| v.name != vm));
    assert_eq!(r.status("long").phase, AgentRunPhase::Succeeded);
    let m = r.t.fake.mutations();
    assert!(!m.contains(&format!("ResetVm({vm})")), "{m:?}");
    assert!(m.contains(&format!("DestroyVm({vm})")), "{m:?}");
    // A fresh VM takes its place.
    r.drive(Runs::a_vm_ready);
}

#[test]
fn policy_kill_stops_a_run_on_its_first_anomaly_and_the_summary_is_kept() {
    let r = Runs::new(1, 1);
    r.t.apply(&format!(
        "{}  anomalies: {{policy: kill, cpuPercent: 50, cpuSustainedSamples: 2}}\n",
        pool_yaml(1, 1)
    ));
    // Every vCPU of the (standard, 2 vCPU) VM busy all the time.
    let t0 = Instant::now();
    r.t.fake.set_vm_stats(move |_| {
        let at = Instant::now();
        Ok(agentvm_backend::stats::DomainStats {
            cpu_time_ns: 2 * at.duration_since(t0).as_nanos() as u64,
            memory_rss_bytes: None,
            memory_actual_bytes: None,
            memory_available_bytes: Some(2 << 30),
            memory_unused_bytes: Some(1 << 30),
            memory_usable_bytes: Some(1 << 30),
            block_rd_bytes: 0,
            block_wr_bytes: 4096,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            at,
        })
    });
    // The run's cgroup in the guest: both vCPUs' worth of CPU time.
    r.t.fake.set_guest_files(move |_, path| {
        path.ends_with("agentvm-run/cpu.stat")
            .then(|| format!("usage_usec {}\n", 2 * t0.elapsed().as_micros()).into_bytes())
    });
    r.t.apply(&run_yaml("spin", "echo started\nsleep 60", ""));
    let started = Instant::now();
    r.drive(|r| r.phase("spin").as_deref() == Some("Failed"));
    assert!(started.elapsed() < Duration::from_secs(30));
    let st = r.status("spin");
    assert_eq!(st.reason.as_deref(), Some("AnomalyPolicy"));
    assert_eq!(st.anomalies.len(), 1, "{st:?}");
    let a = &st.anomalies[0];
    assert_eq!(
        (a.rule.as_str(), a.metric.as_str(), a.threshold),
        ("CpuSaturated", "cpu_percent", 50)
    );
    assert!(a.observed >= 90, "{a:?}");
    let usage = st.resource_usage.expect("a usage summary");
    assert!(
        usage.samples >= 3 && usage.cpu_milliseconds > 0,
        "{usage:?}"
    );
    assert_eq!(usage.peak_memory_bytes, 1 << 30);
    let text = r.t.ctx.metrics.render();
    assert!(
        text.contains("agent_vm_anomalies_total{rule=\"CpuSaturated\"} 1"),
        "{text}"
    );
    assert!(text.contains("agent_execution_total{status=\"failed\"} 1"));
    // The VM is reset and ready again.
    let vm = st.vm.unwrap();
    r.drive(|r| r.registry.phase("p", &vm) == Some(VmPhase::Ready));
    assert_eq!(r.t.fake.domains()[&vm].resets, 1);
}

#[test]
fn output_beyond_the_run_s_cap_is_dropped_counted_and_reported() {
    let r = Runs::new(1, 1);
    r.drive(Runs::a_vm_ready);
    // 1 MiB per stream: 3 MiB on stdout and 100 bytes on stderr.
    r.t.apply(&run_yaml(
        "loud",
        "bytes 3145728\nbytes 100 >&2",
        "  output: {maxMib: 1}\n",
    ));
    r.t.apply(&run_yaml("quiet", "echo hi", ""));
    r.drive(Runs::all_terminal);

    let s = r.status("loud");
    assert_eq!(s.phase, AgentRunPhase::Succeeded, "{s:?}");
    assert_eq!(
        s.output,
        Some(agentvm_api::OutputCount {
            stdout_bytes: 3 << 20,
            stderr_bytes: 100,
            dropped_bytes: 2 << 20,
        })
    );
    let c = agentvm_api::find_condition(&s.conditions, OUTPUT_TRUNCATED).unwrap();
    assert_eq!(c.reason, "OutputCapReached");
    assert_eq!(
        c.message,
        "output beyond output.maxMib (1 MiB per stream) was dropped: stdout: 2097152 of 3145728 bytes dropped (the first 1048576 kept)"
    );
    // The store keeps exactly the cap of stdout, and all of stderr.
    let stored = r.t.store.read_output("loud", 0, usize::MAX).unwrap();
    assert_eq!(stored.total, (1 << 20) + 100);
    assert!(!stored.truncated, "the store had nothing more to drop");

    // Below the cap: no condition, nothing dropped.
    let s = r.status("quiet");
    assert!(agentvm_api::find_condition(&s.conditions, OUTPUT_TRUNCATED).is_none());
    assert_eq!(s.output.unwrap().dropped_bytes, 0);
}

#[test]
fn a_run_submitted_by_another_user_reads_nothing_beyond_their_rights() {
    let r = Runs::new(1, 1);
    // A host file only its owner (this process) may read, and a variable the controller has.
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private.txt");
    std::fs::write(&private, "private\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).unwrap();
    let nobody = agentvm_store::caller::Caller {
        uid: 65534,
        gid: 65534,
        groups: vec![],
        user: Some("nobody".into()),
    };
    let submit = |name: &str, extra: &str, who: &agentvm_store::caller::Caller| {
        let yaml = run_yaml(name, "echo hi", extra);
        let parsed = agentvm_api::parse_str(&yaml, "t.yaml").unwrap();
        let items = parsed
            .into_iter()
            .map(|p| agentvm_store::ApplyItem {
                resource: p.resource,
                // As the spec directory would: its owner is the submitter.
                manager: agentvm_store::Manager::SpecDir {
                    file: "runs.yaml".into(),
                },
                submitter: who.clone(),
                force: false,
            })
            .collect();
        for result in r.t.store.apply_batch(items, false).unwrap() {
            result.unwrap();
        }
    };
    let file = format!(
        "  files:\n  - {{path: /tmp/p, fromFile: {}}}\n",
        private.display()
    );
    submit("file", &file, &nobody);
    submit(
        "env",
        "  secretEnv:\n  - {name: T, fromEnv: HOST_TOKEN}\n",
        &nobody,
    );
    // Root submits the same: it runs.
    submit("root", &file, &agentvm_store::caller::Caller::root());
    r.drive(Runs::all_terminal);
    for (name, reason, what) in [
        ("file", "InputUnavailable", private.display().to_string()),
        ("env", "SecretUnavailable", "HOST_TOKEN".to_string()),
    ] {
        let s = r.status(name);
        assert_eq!(s.phase, AgentRunPhase::Failed, "{name}");
        assert_eq!(s.reason.as_deref(), Some(reason), "{name}");
        assert!(s.vm.is_none(), "{name}");
        let message = &s
            .conditions
            .iter()
            .find(|c| c.type_ == COMPLETED)
            .unwrap()
            .message;
        assert!(
            message.contains(&what) && message.contains("uid=65534(nobody)"),
            "{name}: {message}"
        );
    }
    assert_eq!(r.status("root").phase, AgentRunPhase::Succeeded);
}

/// Under the real dispatcher (no test passes): the second run waits for the pool's only VM
/// and is scheduled as soon as the first run gives it back ready — woken by the registry,
/// not by its own next look (which is [`BACKSTOP`] away). Prints the gap.
#[test]
fn a_waiting_run_is_woken_when_a_vm_becomes_ready() {
    use crate::reconcile::{Dispatcher, DispatcherOptions};
    let t = Setup::new();
    t.image_ready();
    t.apply(&pool_yaml(1, 1));
    let registry = Arc::new(PoolRegistry::new());
    let pools = Arc::new(VmPoolReconciler::new(t.backend(), registry.clone()));
    let runs = Arc::new(AgentRunReconciler::new(t.backend(), registry.clone()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let options = DispatcherOptions {
        workers: 4,
        resync: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(80),
    };
    let dispatcher = Dispatcher::new(t.ctx.clone(), vec![pools, runs.clone()], options);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(dispatcher.run(async {
        let _ = rx.await;
    }));
    let phase = |run: &str| {
        t.store
            .get(Kind::AgentRun, run)
            .unwrap()
            .map(|o| status_of::<AgentRunStatus>(&o).phase)
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    wait("a VM ready", &|| {
        registry.vms("p").iter().any(|v| v.phase == VmPhase::Ready)
    });
    t.apply(&run_yaml("first", "sleep 0.3", ""));
    wait("first scheduled", &|| {
        phase("first").is_some_and(|p| p != AgentRunPhase::Pending)
    });
    t.apply(&run_yaml("second", "echo hi", ""));
    wait("second waits for the VM", &|| {
        t.status(Kind::AgentRun, "second")["reason"] == "WaitingForVm"
    });
    wait("first ends", &|| {
        phase("first").is_some_and(|p| p.is_terminal())
    });
    let ended = Instant::now();
    wait("second scheduled", &|| {
        phase("second").is_some_and(|p| p != AgentRunPhase::Pending)
    });
    let gap = ended.elapsed();
    println!("first run ended → second run scheduled: {gap:?}");
    assert!(
        gap < BACKSTOP / 2,
        "the second run was not woken by the VM becoming ready ({gap:?})"
    );
    wait("second ends", &|| {
        phase("second").is_some_and(|p| p.is_terminal())
    });
    assert_eq!(phase("second"), Some(AgentRunPhase::Succeeded));
    tx.send(()).unwrap();
    rt.block_on(task).unwrap();
}

#[test]
fn a_run_in_a_sandbox_runs_in_its_vm_keeps_it_unreset_and_counts_as_activity() {
    use crate::reconcilers::{SandboxReconciler, Sandboxes};
    let r = Runs::new(1, 2);
    let activity = Arc::new(Sandboxes::new());
    let runs =
        AgentRunReconciler::new(r.t.backend(), r.registry.clone()).sandboxes(activity.clone());
    let boxes = SandboxReconciler::new(r.t.backend(), r.registry.clone(), activity.clone());
    r.drive(|r| r.a_vm_ready());
    r.t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: s}\nspec: {poolRef: p}\n");
    r.t.reconcile(&boxes, Kind::Sandbox, "s").unwrap();
    let vm = r.t.status(Kind::Sandbox, "s")["vm"]
        .as_str()
        .unwrap()
        .to_string();
    let in_sandbox = |name: &str, source: &str| {
        run_yaml(name, source, "").replace("  poolRef: p\n", "  sandboxRef: s\n")
    };
    let drive = |name: &str| {
        let start = Instant::now();
        loop {
            let o = r.t.store.get(Kind::AgentRun, name).unwrap().unwrap();
            if status_of::<AgentRunStatus>(&o).phase.is_terminal() && runs.executing().is_empty() {
                return;
            }
            let _ = runs.reconcile(Arc::new(o), &r.t.ctx);
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{name} never ended"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    r.t.apply(&in_sandbox("one", "echo one"));
    drive("one");
    let st = r.status("one");
    assert_eq!(st.phase, AgentRunPhase::Succeeded, "{st:?}");
    assert_eq!(st.vm.as_deref(), Some(vm.as_str()));
    // Never reset: the sandbox keeps what the run left.
    assert_eq!(r.t.fake.domains()[&vm].resets, 0);
    assert_eq!(activity.in_progress("s"), 0);

    // While the sandbox is paused the run waits, and says why.
    r.t.apply("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: s}\nspec: {poolRef: p, state: Paused}\n");
    r.t.reconcile(&boxes, Kind::Sandbox, "s").unwrap();
    r.t.apply(&in_sandbox("two", "echo two"));
    let o = r.t.store.get(Kind::AgentRun, "two").unwrap().unwrap();
    runs.reconcile(Arc::new(o), &r.t.ctx).unwrap();
    let st = r.status("two");
    assert_eq!(st.phase, AgentRunPhase::Pending);
    assert_eq!(st.reason.as_deref(), Some("WaitingForSandbox"));

    // Someone else's sandbox: refused, nothing run.
    r.t.resubmit_as(Kind::AgentRun, "two", 4242);
    let o = r.t.store.get(Kind::AgentRun, "two").unwrap().unwrap();
    runs.reconcile(Arc::new(o), &r.t.ctx).unwrap();
    let st = r.status("two");
    assert_eq!(st.phase, AgentRunPhase::Failed);
    assert_eq!(st.reason.as_deref(), Some("NotPermitted"));
}

#[test]
fn inputs_that_take_too_long_to_read_fail_the_run_without_a_vm() {
    let mut r = Runs::new(1, 1);
    let (release, hold) = std::sync::mpsc::channel::<()>();
    let hold = Mutex::new(hold);
    r.runs = AgentRunReconciler::new(r.t.backend(), r.registry.clone())
        .host_env(Arc::new(move |_| {
            // A host input that hangs until the test ends.
            let _ = hold.lock().unwrap().recv();
            None
        }))
        .inputs_timeout(Duration::from_millis(200));
    let extra = "  secretEnv:\n  - {name: TOKEN, fromEnv: HOST_TOKEN}\n";
    r.t.apply(&run_yaml("slow", "echo hi", extra));
    r.drive(Runs::all_terminal);
    let s = r.status("slow");
    assert_eq!(s.phase, AgentRunPhase::Failed, "{s:?}");
    assert_eq!(s.reason.as_deref(), Some("InputUnavailable"));
    let message = &s
        .conditions
        .iter()
        .find(|c| c.type_ == COMPLETED)
        .unwrap()
        .message;
    assert!(message.contains("did not finish within"), "{message}");
    assert!(s.vm.is_none());
    // No VM was taken.
    assert!(r.registry.vms("p").iter().all(|v| v.phase != VmPhase::Busy));
    drop(release);
}

#[test]
fn a_run_that_ended_after_its_object_was_read_is_not_taken_for_a_restart() {
    let r = Runs::new(1, 1);
    r.t.apply(&run_yaml("r", "true", ""));
    // Read while it ran here; it ends before the reconcile looks at the runs executing.
    r.t.store
        .update_status_json(Kind::AgentRun, "r", serde_json::json!({"phase": "Running"}))
        .unwrap();
    let stale = r.t.store.get(Kind::AgentRun, "r").unwrap().unwrap();
    r.t.store
        .update_status_json(
            Kind::AgentRun,
            "r",
            serde_json::json!({"phase": "Succeeded", "reason": "Completed"}),
        )
        .unwrap();
    r.runs.reconcile(Arc::new(stale), &r.t.ctx).unwrap();
    let st = r.status("r");
    assert_eq!(st.phase, AgentRunPhase::Succeeded, "{st:?}");
    assert_eq!(st.reason.as_deref(), Some("Completed"));
}
