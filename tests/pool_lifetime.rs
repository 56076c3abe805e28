//! End to end with real VMs (`qemu:///system`, TCG): the lifetime of pool VMs under the
//! `agentvm controller` binary. A VM whose guest agent stops answering (its `agentvm-guest`
//! is frozen with SIGSTOP inside the guest) is replaced with reason `Unhealthy`; a VM past
//! `ttlSeconds` (counted from its creation) is replaced with reason `TtlExpired`, except that
//! a VM running an AgentRun keeps it until the run ends and is replaced after. Fails (never
//! skips) without libvirt or the default image.

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::Value;

const TTL: u64 = 60;

fn manifest(pool: &str, image: &str, ttl: u64) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n  minReady: 2\n  maxSize: 3\n  ttlSeconds: {ttl}\n  healthCheckSeconds: 5\n"
    )
}

fn time(v: &Value) -> SystemTime {
    status_time(v)
}

fn events(env: &Env, pool: &str) -> Vec<Value> {
    env.status("pool", pool)["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn event_for(env: &Env, pool: &str, vm: &str) -> Option<Value> {
    events(env, pool).into_iter().find(|e| e["vm"] == vm)
}

#[test]
fn unhealthy_and_expired_vms_are_replaced_but_never_taken_from_a_run() {
    require_libvirt_and_image();
    let mut env = Env::new("lifetime");
    let pid = std::process::id();
    let pool = format!("e2el{pid}");
    let image = format!("e2e-limg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    env.start_controller();
    // First a long TTL: the health check is what replaces the VM, whatever the load.
    apply_yaml(&env, "pool.yaml", &manifest(&pool, &image, 3600));
    env.wait("pool Ready", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 2)
    });
    let idle = vm_names(&env.status("pool", &pool))[0].clone();

    // Freeze the idle VM's agentvm-guest (which runs programs) from inside the guest;
    // qemu-ga goes on answering its pings, so only the check of agentvm-guest can see it.
    let cmd = r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 1; for p in /proc/[0-9]*; do [ \"$(cat $p/comm 2>/dev/null)\" = agentvm-guest ] && kill -STOP ${p#/proc/}; done"]}}"#;
    let (ok, out) = virsh(&["qemu-agent-command", &idle, cmd]);
    assert!(ok, "guest-exec in {idle}: {out}");
    let t = env.wait(
        "the unhealthy VM replaced",
        Duration::from_secs(180),
        || event_for(&env, &pool, &idle).is_some(),
    );
    let ev = event_for(&env, &pool, &idle).unwrap();
    eprintln!(
        "frozen guest agent detected and its VM replaced {:.1}s later: {ev}",
        t.as_secs_f64()
    );
    assert_eq!(ev["reason"], "Unhealthy", "{ev}");
    assert!(
        !vm_names(&env.status("pool", &pool)).contains(&idle),
        "{idle} still listed"
    );
    env.wait("the unhealthy domain gone", Duration::from_secs(60), || {
        !domains_with_prefix(&env.domain_prefix).contains(&idle)
    });
    env.wait("pool Ready again", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 2)
    });

    // Now ttlSeconds 60 (not part of the template: no rolling update). A run long enough
    // for its VM to expire under it.
    apply_yaml(&env, "pool.yaml", &manifest(&pool, &image, TTL));
    apply_yaml(
        &env,
        "run.yaml",
        &format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {{name: long}}\nspec:\n  poolRef: {pool}\n  script: {{interpreter: sh, source: \"sleep {}; echo survived\"}}\n  timeoutSeconds: 600\n",
            TTL + 10
        ),
    );
    env.wait("the run Running", Duration::from_secs(300), || {
        env.status("run", "long")["phase"] == "Running"
    });
    let busy = env.status("run", "long")["vm"]
        .as_str()
        .unwrap()
        .to_string();

    // The busy VM expires during the run: the run goes on and succeeds, then the VM is
    // replaced (not reset, not reused).
    let created = time(&env.status("pool", &pool)["vmCreatedAt"][&busy]);
    env.wait("the run done", Duration::from_secs(300), || {
        env.status("run", "long")["phase"]
            .as_str()
            .is_some_and(|p| p != "Running" && p != "Scheduled")
    });
    let status = env.status("run", "long");
    assert_eq!(status["phase"], "Succeeded", "{status}");
    assert_eq!(status["stdoutTail"], "survived\n");
    let finished = time(&status["finishedAt"]);
    assert!(
        finished.duration_since(created).unwrap() >= Duration::from_secs(TTL),
        "the run ended before its VM expired"
    );
    env.wait(
        "the expired busy VM replaced",
        Duration::from_secs(180),
        || event_for(&env, &pool, &busy).is_some(),
    );
    let ev = event_for(&env, &pool, &busy).unwrap();
    assert_eq!(ev["reason"], "TtlExpired", "{ev}");
    assert!(
        time(&ev["time"]) >= finished,
        "replaced before its run ended: {ev}"
    );

    // Idle VMs expire too: each replacement comes at least ttlSeconds after its creation.
    // One snapshot of the status: a VM can be replaced between two reads.
    let snapshot = env.status("pool", &pool);
    let born: Vec<(String, SystemTime)> = vm_names(&snapshot)
        .iter()
        .map(|v| {
            let at = &snapshot["vmCreatedAt"][v];
            assert!(at.is_string(), "no creation time for {v}: {snapshot}");
            (v.clone(), time(at))
        })
        .collect();
    let (vm, created) = born[0].clone();
    env.wait("an idle VM expired", Duration::from_secs(TTL + 240), || {
        event_for(&env, &pool, &vm).is_some()
    });
    let ev = event_for(&env, &pool, &vm).unwrap();
    assert_eq!(ev["reason"], "TtlExpired", "{ev}");
    let lived = time(&ev["time"]).duration_since(created).unwrap();
    assert!(
        lived >= Duration::from_secs(TTL),
        "replaced after {lived:?}"
    );
    eprintln!(
        "idle VM replaced {:.1}s after its creation (ttlSeconds {TTL})",
        lived.as_secs_f64()
    );

    // The audit log says why, too.
    let audit = std::fs::read_to_string(env.dir.join("audit.log")).unwrap();
    for (vm, reason) in [(&idle, "Unhealthy"), (&busy, "TtlExpired")] {
        assert!(
            audit.lines().any(|l| l.contains("vm_destroyed")
                && l.contains(vm.as_str())
                && l.contains(reason)),
            "no vm_destroyed {reason} for {vm} in the audit log"
        );
    }
    // `describe` shows the events.
    let out = env
        .cmd(&["describe", &format!("pool/{pool}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let events = text
        .split("Events:\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no Events in describe: {text}"));
    assert!(events.starts_with("  AGE"), "{events}");
    assert!(
        events.contains("Unhealthy") && events.contains("TtlExpired"),
        "{events}"
    );
}
