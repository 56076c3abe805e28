//! The real `agentvm controller` binary's metrics endpoint and audit log: apply manifests
//! with `agentvm apply`, scrape `/metrics` over loopback, parse the Prometheus text format,
//! and check the reconcile, execution, libvirt and audit series; `/healthz`, `/readyz`; the
//! audit log's `object_applied` lines. libvirt is `test:///default` (in-process).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentvm");

#[path = "support/exposition.rs"]
mod exposition;
use exposition::*;

#[test]
fn the_parser_reads_labels_escapes_and_special_values() {
    let s = parse_sample(r#"x_bucket{a="1",b="q\"u\\o\nte",le="+Inf"} 3"#);
    assert_eq!(s.name, "x_bucket");
    assert_eq!(s.labels["b"], "q\"u\\o\nte");
    assert_eq!(s.labels["le"], "+Inf");
    assert_eq!(s.value, 3.0);
    assert_eq!(parse_sample("y 1.5e3").value, 1500.0);
    assert!(parse_sample("z{} +Inf").value.is_infinite());
}

struct Controller {
    child: Option<Child>,
    log: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn agentvm(state: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env("AGENTVM_STATE_DIR", state)
        .env("AGENTVM_CACHE_DIR", state.join("cache"))
        .env("AGENTVM_LIBVIRT_URI", "test:///default")
        .env("AGENTVM_SOCKET", state.join("sock"))
        .env("AGENTVM_CONFIG", state.join("no-config.yaml"))
        .env("AGENTVM_VM_STATS_INTERVAL_SECONDS", "1")
        .env_remove("AGENTVM_SPEC_DIR")
        .env_remove("AGENTVM_METRICS_ADDR")
        .env_remove("AGENTVM_AUDIT_LOG")
        .stdin(Stdio::null());
    c
}

const MANIFEST: &str = "\
apiVersion: agentvm.dev/v1alpha1
kind: Network
metadata:
  name: obs-net
spec:
  mode: isolated
  subnet: 192.168.231.0/24
---
apiVersion: agentvm.dev/v1alpha1
kind: NetworkFilter
metadata:
  name: obs-egress
spec:
  egress:
    - protocol: tcp
      ports: [443]
";

#[test]
fn controller_serves_metrics_health_and_an_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path();
    let log = state.join("controller.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = agentvm(state)
        .args(["controller", "--metrics-address", "127.0.0.1:0"])
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut controller = Controller {
        child: Some(child),
        log: log.clone(),
    };

    // The bound address (port 0 = a free port) is logged.
    let addr = eventually("the metrics address in the log", || {
        let text = std::fs::read_to_string(&controller.log).ok()?;
        let rest = text.split("metrics endpoint on http://").nth(1)?;
        Some(rest.split_whitespace().next()?.to_string())
    });
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let (status, _, body) = http_get(&addr, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Ready once the first statistics sample reached libvirt (test:///default).
    eventually("readiness", || {
        (http_get(&addr, "/readyz").0 == 200).then_some(())
    });

    let manifest = state.join("obs.yaml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let out = agentvm(state)
        .args(["apply", "-f", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Both kinds reconciled (reconcilers are on: no --without-reconcilers).
    let m = eventually("reconcile metrics of both kinds", || {
        let (status, content_type, body) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let m = Exposition::parse(&body);
        let done = ["Network", "NetworkFilter"].iter().all(|k| {
            m.value("agentvm_reconcile_duration_seconds_count", &[("kind", k)])
                .is_some_and(|n| n >= 1.0)
        }) && m
            .value(
                "agentvm_audit_events_total",
                &[("event_type", "object_applied")],
            )
            .is_some_and(|n| n >= 2.0);
        done.then_some(m)
    });

    // Types as documented.
    for (name, ty) in [
        ("agentvm_reconcile_runs_total", "counter"),
        ("agentvm_reconcile_duration_seconds", "histogram"),
        ("agent_execution_total", "counter"),
        ("agent_execution_duration_seconds", "histogram"),
        ("agent_execution_timeout_total", "counter"),
        ("agentvm_libvirt_up", "gauge"),
        ("agentvm_audit_events_total", "counter"),
        ("agentvm_audit_write_failures_total", "counter"),
    ] {
        assert_eq!(
            m.types.get(name).map(String::as_str),
            Some(ty),
            "{name}: {:?}",
            m.types
        );
    }
    // Every sample belongs to a family the exposition typed, with the documented labels.
    for s in &m.samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = s.name.strip_suffix(suffix)?;
                (m.types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&s.name);
        assert!(m.types.contains_key(family), "untyped sample {s:?}");
        assert!(s.value.is_finite() && s.value >= 0.0, "{s:?}");
        let keys: Vec<&str> = s
            .labels
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "le")
            .collect();
        let expected: &[&str] = match family {
            "agentvm_reconcile_runs_total" | "agentvm_reconcile_duration_seconds" => &["kind"],
            "agentvm_reconcile_failures_total" => &["kind", "reason"],
            "agent_execution_total" => &["status"],
            "agentvm_audit_events_total" => &["event_type"],
            "agent_vm_anomalies_total" => &["rule"],
            f if f.starts_with("agent_vm_") && f.contains("pool") => &["pool_id"],
            f if f.starts_with("agent_vm_") => &["vm_id"],
            _ => &[],
        };
        assert_eq!(keys, expected, "{s:?}");
    }

    for kind in ["Network", "NetworkFilter"] {
        let runs = m
            .value("agentvm_reconcile_runs_total", &[("kind", kind)])
            .unwrap();
        let count = m
            .value(
                "agentvm_reconcile_duration_seconds_count",
                &[("kind", kind)],
            )
            .unwrap();
        let sum = m
            .value("agentvm_reconcile_duration_seconds_sum", &[("kind", kind)])
            .unwrap();
        // The drop guard records after the run is counted: never more durations than runs.
        assert!(count >= 1.0 && count <= runs, "{kind}: {count} of {runs}");
        assert!(
            sum >= 0.0 && sum / count < 30.0,
            "{kind}: mean {}",
            sum / count
        );
        // Buckets are cumulative and end with +Inf = count.
        let buckets = m.find(
            "agentvm_reconcile_duration_seconds_bucket",
            &[("kind", kind)],
        );
        assert!(buckets.len() > 5);
        assert!(buckets.windows(2).all(|w| w[0].value <= w[1].value));
        let inf = m
            .value(
                "agentvm_reconcile_duration_seconds_bucket",
                &[("kind", kind), ("le", "+Inf")],
            )
            .unwrap();
        assert_eq!(inf, count);
        // Failures, if any (e.g. no network filters on the test driver), have a short reason
        // and never outnumber runs.
        let failures: f64 = m
            .find("agentvm_reconcile_failures_total", &[("kind", kind)])
            .iter()
            .inspect(|s| {
                assert!(!s.labels["reason"].is_empty() && !s.labels["reason"].contains(' '))
            })
            .map(|s| s.value)
            .sum();
        assert!(
            failures <= runs,
            "{kind}: {failures} failures of {runs} runs"
        );
    }
    // No run has happened: executions at zero, every status present.
    for status in ["succeeded", "failed", "timedout", "cancelled"] {
        assert_eq!(
            m.value("agent_execution_total", &[("status", status)]),
            Some(0.0)
        );
    }
    assert_eq!(m.value("agent_execution_timeout_total", &[]), Some(0.0));
    // Every anomaly rule is there from the start, at zero.
    let rules: Vec<&str> = m
        .find("agent_vm_anomalies_total", &[])
        .iter()
        .map(|s| {
            assert_eq!(s.value, 0.0, "{s:?}");
            s.labels["rule"].as_str()
        })
        .collect();
    assert_eq!(rules.len(), 6, "{rules:?}");
    assert_eq!(
        m.value("agent_execution_duration_seconds_count", &[]),
        Some(0.0)
    );
    assert_eq!(m.value("agentvm_libvirt_up", &[]), Some(1.0));
    assert_eq!(
        m.value("agentvm_audit_write_failures_total", &[]),
        Some(0.0)
    );

    // The audit log: one object_applied line per object, by root through `agentvm apply`.
    let audit = std::fs::read_to_string(state.join("audit.log")).unwrap();
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (kind, name) in [("Network", "obs-net"), ("NetworkFilter", "obs-egress")] {
        let applied: Vec<_> = events
            .iter()
            .filter(|e| {
                e["event_type"] == "object_applied" && e["kind"] == kind && e["name"] == name
            })
            .collect();
        assert_eq!(applied.len(), 1, "{kind}/{name} in:\n{audit}");
        let e = applied[0];
        // Who applied it (this test runs as root), through what.
        assert_eq!(e["actor"], "uid=0(root)");
        assert_eq!(e["tool"], "api (agentvm apply)");
        assert_eq!(e["details"]["generation"], 1);
        assert!(e["timestamp"].as_str().unwrap().ends_with('Z'), "{e}");
    }

    // Stop the controller by its pid (SIGTERM): it exits cleanly and stops serving.
    let status = Command::new("kill").arg(pid.to_string()).status().unwrap();
    assert!(status.success());
    let mut child = controller.child.take().unwrap();
    let exit = eventually("the controller to exit", || child.try_wait().unwrap());
    assert!(
        exit.success(),
        "{exit}: {}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert!(std::net::TcpStream::connect(&addr).is_err());
}
