//! Load, end to end with real VMs (`qemu:///system`, TCG): 200 `AgentRun`s queued at once
//! against a pool with `maxSize: 2`. Every run ends (each `Succeeded`, or `Failed` with a
//! reason), none is lost or started twice (one `run_started` and one `run_finished` audit
//! event each, its own output exactly once), at most two VMs are ever used, and the
//! controller's resident memory, sampled all along, stays flat. Fails (never skips) without
//! libvirt or the default image.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// Runs queued at once.
const RUNS: usize = 200;

#[test]
fn two_hundred_queued_runs_on_max_size_2_all_end_once_with_flat_controller_memory() {
    require_libvirt_and_image();
    let (env, pool) = env_with_small_pool("e2eload", 2);
    let rss_idle = controller_rss_kib(&env);

    let names: Vec<String> = (0..RUNS).map(|i| format!("load-{i:03}")).collect();
    let docs: Vec<String> = names
        .iter()
        .map(|n| sh_run(n, &pool, &format!("echo {n}"), ""))
        .collect();
    let t0 = Instant::now();
    apply_yaml(&env, "load.yaml", &docs.join("---\n"));
    eprintln!("applied {RUNS} runs in {:.1}s", t0.elapsed().as_secs_f64());

    // Sample the controller's RSS while the queue drains.
    let mut samples: Vec<(f64, u64, usize)> = vec![(0.0, rss_idle, 0)];
    let mut last_sample = Instant::now();
    let deadline = Duration::from_secs(1800);
    let runs = loop {
        let runs = all_runs(&env);
        let done = runs
            .iter()
            .filter(|r| run_terminal(r["status"]["phase"].as_str().unwrap_or("Pending")))
            .count();
        if last_sample.elapsed() >= Duration::from_secs(10) {
            samples.push((t0.elapsed().as_secs_f64(), controller_rss_kib(&env), done));
            last_sample = Instant::now();
        }
        if done == RUNS {
            break runs;
        }
        assert!(
            t0.elapsed() < deadline,
            "only {done} of {RUNS} runs ended after {deadline:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let took = t0.elapsed();
    samples.push((took.as_secs_f64(), controller_rss_kib(&env), RUNS));
    eprintln!(
        "{RUNS} runs on maxSize 2 in {:.1}s: {:.1} runs/minute",
        took.as_secs_f64(),
        RUNS as f64 * 60.0 / took.as_secs_f64()
    );
    eprintln!("controller RSS samples (seconds since apply, KiB, runs ended):");
    for (t, kib, done) in &samples {
        eprintln!("  {t:7.1}s  {kib:7} KiB  {done:3} ended");
    }

    // Every run once, ended, with a reason when it did not succeed.
    assert_eq!(runs.len(), RUNS, "runs lost or added");
    let mut by_phase: BTreeMap<String, usize> = BTreeMap::new();
    let mut vms = std::collections::BTreeSet::new();
    for r in &runs {
        let name = r["metadata"]["name"].as_str().unwrap();
        let s = &r["status"];
        let phase = s["phase"].as_str().unwrap().to_string();
        *by_phase.entry(phase.clone()).or_default() += 1;
        if phase == "Succeeded" {
            assert_eq!(s["exitCode"], 0, "{name}: {s}");
            assert_eq!(s["stdoutTail"], format!("{name}\n"), "{name}: {s}");
        } else {
            assert!(
                s["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "{name} ended {phase} without a reason: {s}"
            );
        }
        if let Some(vm) = s["vm"].as_str() {
            vms.insert(vm.to_string());
        }
    }
    eprintln!("phases: {by_phase:?}; VMs used: {}", vms.len());
    assert!(vms.len() <= 2, "more than maxSize VMs used: {vms:?}");
    assert_eq!(
        by_phase.get("Succeeded").copied().unwrap_or(0),
        RUNS,
        "trivial runs did not all succeed: {by_phase:?}"
    );

    // Started and finished exactly once each, per the audit log.
    let audit = std::fs::read_to_string(env.dir.join(agentvm_controller::audit::AUDIT_FILE))
        .expect("audit log");
    let mut started: BTreeMap<String, usize> = BTreeMap::new();
    let mut finished: BTreeMap<String, usize> = BTreeMap::new();
    for line in audit.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = e["name"].as_str().unwrap_or_default().to_string();
        match e["event_type"].as_str().or(e["eventType"].as_str()) {
            Some("run_started") => *started.entry(name).or_default() += 1,
            Some("run_finished") => *finished.entry(name).or_default() += 1,
            _ => {}
        }
    }
    for n in &names {
        assert_eq!(
            started.get(n),
            Some(&1),
            "{n} started {:?} times",
            started.get(n)
        );
        assert_eq!(
            finished.get(n),
            Some(&1),
            "{n} finished {:?} times",
            finished.get(n)
        );
    }

    // Memory flat: after the first third of the queue (allocator warm-up), the controller
    // grows by less than 16 MiB while the other two thirds run.
    let warm = samples
        .iter()
        .find(|(_, _, done)| *done >= RUNS / 3)
        .map(|s| s.1)
        .unwrap_or(rss_idle);
    let max = samples.iter().map(|s| s.1).max().unwrap();
    let end = samples.last().unwrap().1;
    eprintln!("RSS idle {rss_idle} KiB, after a third {warm} KiB, max {max} KiB, end {end} KiB");
    assert!(
        end < warm + 16 * 1024,
        "controller memory grew from {warm} KiB to {end} KiB while runs drained"
    );
    assert!(
        max < rss_idle + 64 * 1024,
        "controller memory peaked at {max} KiB (idle {rss_idle} KiB)"
    );

    // Both VMs back in the pool, nothing orphaned, the API still answers.
    wait_consistent(&env, &pool, 1, Duration::from_secs(180));
}
