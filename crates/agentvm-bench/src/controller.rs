//! Benchmarks of the `agentvm controller` process (the release binary) through its API:
//! memory idle and with 1,000 objects, pool acquire and `apply` → Running with a warm pool,
//! and runs per minute on pools of 1, 2 and 4 VMs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use agentvm_api::{find_condition, AgentRunStatus, Kind};
use agentvm_client::Client;
use agentvm_store::StoredObject;
use anyhow::{Context, Result};

use crate::inproc::apply_request;
use crate::report::{Row, Table};
use crate::stats::{fmt_duration, fmt_kib, summarize};
use crate::system::rss_kib;
use crate::vms::MEMORY_MIB;
use crate::wait_until;

/// A running `agentvm controller` with its own state directory; killed when dropped.
pub struct ControllerProcess {
    child: Child,
    dir: PathBuf,
    /// Its API.
    pub client: Client,
}

impl ControllerProcess {
    /// Starts `bin controller` on state directory `dir` (libvirt at `uri`, images from
    /// `cache_dir`) and waits for its socket.
    pub fn start(bin: &Path, dir: &Path, uri: &str, cache_dir: &Path) -> Result<Self> {
        Self::start_with_env(bin, dir, uri, cache_dir, &[])
    }

    /// [`ControllerProcess::start`] with more environment variables for the controller.
    pub fn start_with_env(
        bin: &Path,
        dir: &Path,
        uri: &str,
        cache_dir: &Path,
        env: &[(&str, String)],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("agentvm.sock");
        let log = std::fs::File::create(dir.join("controller.log"))?;
        let child = Command::new(bin)
            .args(["controller", "--metrics-address", "off", "--socket"])
            .arg(&socket)
            .env("AGENTVM_STATE_DIR", dir)
            .env("AGENTVM_CACHE_DIR", cache_dir)
            .env("AGENTVM_LIBVIRT_URI", uri)
            .env(
                "AGENTVM_ACCEL",
                std::env::var("AGENTVM_ACCEL").unwrap_or_else(|_| "tcg".into()),
            )
            .env("AGENTVM_CONFIG", dir.join("no-config.yaml"))
            .env("AGENTVM_LOG", "info")
            .env_remove("AGENTVM_SPEC_DIR")
            .env_remove("AGENTVM_SOCKET")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let p = ControllerProcess {
            child,
            dir: dir.to_path_buf(),
            client: Client::new(&socket),
        };
        wait_until("the controller's socket", Duration::from_secs(60), || {
            Ok(p.client.health().is_ok())
        })
        .with_context(|| p.log_tail())?;
        Ok(p)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "controller log tail:\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Controller RSS idle and with `objects` `Image`s applied and reconciled.
pub fn memory_rows(
    bin: &Path,
    dir: &Path,
    uri: &str,
    cache_dir: &Path,
    objects: usize,
    table: &mut Table,
) -> Result<()> {
    let c = ControllerProcess::start(bin, dir, uri, cache_dir)?;
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(c.pid()).context("reading the controller's memory")?;
    let docs: Vec<String> = (0..objects)
        .map(|i| {
            format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: img-{i:04}\n  labels: {{bench: memory}}\nspec: {{}}\n")
        })
        .collect();
    c.client.apply(&apply_request(&docs.join("---\n"))?)?;
    wait_until("every object reconciled", Duration::from_secs(300), || {
        Ok(c.client
            .list(Some(Kind::Image), None)?
            .iter()
            .filter(|o| o.status_json()["phase"] == "Ready")
            .count()
            == objects)
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let loaded = rss_kib(c.pid()).context("reading the controller's memory")?;
    table.push(Row::value(
        "controller RSS, idle (no objects)",
        1,
        fmt_kib(idle.0),
        "`agentvm controller` (release), all reconcilers, 3 s after start",
    ));
    table.push(Row::value(
        format!("controller RSS with {objects} objects applied"),
        1,
        fmt_kib(loaded.0),
        format!(
            "{objects} `Image`s applied in one request, all Ready; peak (VmHWM) {}",
            fmt_kib(loaded.1)
        ),
    ));
    c.stop();
    Ok(())
}

/// When the watcher first saw each run in each phase (this process's clock).
#[derive(Debug, Default, Clone)]
struct Seen {
    scheduled: Option<Instant>,
    running: Option<Instant>,
    done: Option<Instant>,
    last: Option<StoredObject>,
}

type SeenMap = Arc<Mutex<HashMap<String, Seen>>>;

/// Follows every `AgentRun` through `GET /v1/watch` on a thread of its own.
fn watch_runs(client: &Client) -> Result<SeenMap> {
    let stream = client.watch(Some(Kind::AgentRun), true)?;
    let seen: SeenMap = Arc::default();
    let map = seen.clone();
    std::thread::spawn(move || {
        for event in stream {
            let now = Instant::now();
            let Ok(event) = event else { break };
            let (Some(name), Some(obj)) = (event.name, event.object) else {
                continue;
            };
            let phase = obj.status_json()["phase"]
                .as_str()
                .unwrap_or("Pending")
                .to_string();
            let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
            let s = m.entry(name).or_default();
            let terminal = matches!(
                phase.as_str(),
                "Succeeded" | "Failed" | "TimedOut" | "Cancelled"
            );
            if phase != "Pending" {
                s.scheduled.get_or_insert(now);
            }
            if phase == "Running" || terminal {
                s.running.get_or_insert(now);
            }
            if terminal {
                s.done.get_or_insert(now);
            }
            s.last = Some(*obj);
        }
    });
    Ok(seen)
}

fn seen(map: &SeenMap, name: &str) -> Seen {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .cloned()
        .unwrap_or_default()
}

fn pool_yaml(pool: &str, image: &str, min_ready: u32, max_size: u32) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: {MEMORY_MIB}, diskGib: 2}}\n  minReady: {min_ready}\n  maxSize: {max_size}\n"
    )
}

fn run_yaml(name: &str, pool: &str) -> String {
    run_yaml_with(name, pool, "true")
}

fn run_yaml_with(name: &str, pool: &str, source: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {{name: {name}}}\nspec:\n  poolRef: {pool}\n  script: {{interpreter: sh, source: \"{source}\"}}\n")
}

/// Applies a run of `echo hi` on `pool` and follows its output through the API as `agentvm
/// logs -f` does: the time from sending the apply request to the first byte of output.
fn first_byte(client: &Client, name: &str, pool: &str) -> Result<Duration> {
    use std::io::Read;
    let t0 = Instant::now();
    client.apply(&apply_request(&run_yaml_with(name, pool, "echo hi"))?)?;
    let mut logs = client.logs(name, 0, true)?;
    let mut byte = [0u8; 1];
    let n = logs.body.read(&mut byte)?;
    let took = t0.elapsed();
    if n == 0 {
        anyhow::bail!("run {name} ended without output");
    }
    // The rest, to the end of the run.
    let mut rest = Vec::new();
    logs.body.read_to_end(&mut rest)?;
    Ok(took)
}

/// Waits until `pool` has `n` VMs, all ready and none busy.
fn wait_pool(client: &Client, pool: &str, n: u64, timeout: Duration) -> Result<Duration> {
    wait_until(&format!("pool {pool} with {n} ready VMs"), timeout, || {
        let s = match client.get(Kind::VmPool, pool) {
            Ok(o) => o.status_json(),
            Err(e) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(s["phase"] == "Ready"
            && s["ready"].as_u64() == Some(n)
            && s["total"].as_u64() == Some(n)
            && s["busy"].as_u64() == Some(0))
    })
}

fn between(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or(Duration::ZERO)
}

/// Acquire and start times of a finished run from its status (the controller's clock,
/// millisecond resolution): (created → Scheduled, created → startedAt).
fn server_times(obj: &StoredObject) -> Result<(SystemTime, SystemTime, SystemTime, SystemTime)> {
    let status: AgentRunStatus = serde_json::from_value(obj.status_json())?;
    let created = obj.created_at.0;
    let scheduled = find_condition(&status.conditions, "Scheduled")
        .filter(|c| c.status == agentvm_api::ConditionStatus::True)
        .and_then(|c| c.last_transition_time.map(|t| t.0))
        .context("no Scheduled=True condition")?;
    let started = status.started_at.map(|t| t.0).context("no startedAt")?;
    let finished = status.finished_at.map(|t| t.0).context("no finishedAt")?;
    Ok((created, scheduled, started, finished))
}

/// How many runs and warm-latency iterations.
pub struct RunPlan {
    /// `apply` → Running samples with a warm pool of one VM.
    pub latency_runs: usize,
    /// (maxSize, runs submitted at once).
    pub throughput: Vec<(u32, usize)>,
}

/// Pool acquire through the API, `apply` → Running with a warm pool, and runs per minute.
pub fn run_rows(
    bin: &Path,
    dir: &Path,
    uri: &str,
    cache_dir: &Path,
    plan: &RunPlan,
    latency: &mut Table,
    throughput: &mut Table,
) -> Result<()> {
    let c = ControllerProcess::start(bin, dir, uri, cache_dir)?;
    let result = (|| -> Result<()> {
        let client = &c.client;
        let runs = watch_runs(client)?;
        let pool = format!("bench{}", std::process::id());
        let image = format!("{pool}-img");
        let t = Instant::now();
        client.apply(&apply_request(&pool_yaml(&pool, &image, 1, 1))?)?;
        wait_pool(client, &pool, 1, Duration::from_secs(600))?;
        latency.push(Row::value(
            "pool of 1 VM: `apply` → pool Ready",
            1,
            fmt_duration(t.elapsed()),
            "through the controller: image lookup, one VM booted and parked",
        ));

        let (mut acq_api, mut run_api, mut acq_client, mut run_client, mut apply_call) =
            (vec![], vec![], vec![], vec![], vec![]);
        let mut not_ok = 0;
        for i in 0..plan.latency_runs {
            wait_pool(client, &pool, 1, Duration::from_secs(120))?;
            // The pool status can trail the VM's reset by one recheck.
            std::thread::sleep(Duration::from_millis(1500));
            let name = format!("warm-{i:03}");
            let t0 = Instant::now();
            client.apply(&apply_request(&run_yaml(&name, &pool))?)?;
            apply_call.push(t0.elapsed());
            wait_until(
                &format!("run {name} to finish"),
                Duration::from_secs(300),
                || Ok(seen(&runs, &name).done.is_some()),
            )?;
            let s = seen(&runs, &name);
            let obj = s.last.context("no object seen")?;
            if obj.status_json()["phase"] != "Succeeded" {
                // Counted and shown; its timings still say when it was acquired and started.
                eprintln!("  run {name} did not succeed: {}", obj.status_json());
                not_ok += 1;
            }
            if let Ok((created, scheduled, started, _)) = server_times(&obj) {
                acq_api.push(between(created, scheduled));
                run_api.push(between(created, started));
            }
            if let (Some(sch), Some(run)) = (s.scheduled, s.running) {
                acq_client.push(sch - t0);
                run_client.push(run - t0);
            }
        }
        let mut first = vec![];
        for i in 0..plan.latency_runs {
            wait_pool(client, &pool, 1, Duration::from_secs(120))?;
            std::thread::sleep(Duration::from_millis(1500));
            first.push(first_byte(client, &format!("hi-{i:03}"), &pool)?);
        }
        latency.push(Row::timing(
            "acquire through the API: run created → `Scheduled` (VM acquired)",
            &summarize(acq_api),
            "status timestamps (ms resolution): `creationTimestamp` → `Scheduled` condition's `lastTransitionTime`",
        ));
        latency.push(Row::timing(
            "`apply` → Running, warm pool: run created → `startedAt`",
            &summarize(run_api),
            format!(
                "status timestamps; the program starts right after `startedAt`; {} of {} runs Succeeded",
                plan.latency_runs - not_ok,
                plan.latency_runs
            ),
        ));
        latency.push(Row::timing(
            "`apply` → Running, warm pool, as a client sees it",
            &summarize(run_client),
            format!(
                "apply request sent → `Running` event on `GET /v1/watch`; →`Scheduled` median {}; the apply call alone median {}",
                fmt_duration(summarize(acq_client).median),
                fmt_duration(summarize(apply_call).median)
            ),
        ));

        latency.push(Row::timing(
            "`apply` → first output byte of `echo hi`, warm pool, as a client sees it",
            &summarize(first),
            "apply request sent → first byte read from `GET /v1/runs/NAME/logs?follow=true` (what `agentvm logs -f` reads): scheduling, copying nothing in, starting the program in the guest, and its output reaching the store",
        ));

        for &(size, n) in &plan.throughput {
            let t = Instant::now();
            client.apply(&apply_request(&pool_yaml(&pool, &image, size, size))?)?;
            wait_pool(client, &pool, u64::from(size), Duration::from_secs(900))?;
            eprintln!("  pool at {size} VMs after {}", fmt_duration(t.elapsed()));
            std::thread::sleep(Duration::from_millis(1500));
            let names: Vec<String> = (0..n).map(|i| format!("tp{size}-{i:03}")).collect();
            let docs: Vec<String> = names.iter().map(|r| run_yaml(r, &pool)).collect();
            let t0 = Instant::now();
            client.apply(&apply_request(&docs.join("---\n"))?)?;
            wait_until(
                &format!("{n} runs on {size} VMs"),
                Duration::from_secs(900),
                || Ok(names.iter().all(|r| seen(&runs, r).done.is_some())),
            )?;
            let took = names
                .iter()
                .filter_map(|r| seen(&runs, r).done)
                .max()
                .map(|d| d - t0)
                .unwrap_or_default();
            let mut ok = 0;
            let mut spans = Vec::new();
            let mut failed: std::collections::BTreeMap<String, usize> = Default::default();
            for r in &names {
                let obj = seen(&runs, r).last.context("no object")?;
                let st = obj.status_json();
                if st["phase"] == "Succeeded" {
                    ok += 1;
                } else {
                    let why = format!(
                        "{} ({})",
                        st["phase"].as_str().unwrap_or("?"),
                        st["reason"].as_str().unwrap_or("?")
                    );
                    eprintln!("  run {r}: {why}: {st}");
                    *failed.entry(why).or_default() += 1;
                }
                if let Ok(t) = server_times(&obj) {
                    spans.push(t);
                }
            }
            let failed: Vec<String> = failed.iter().map(|(w, n)| format!("{n} {w}")).collect();
            let failed = if failed.is_empty() {
                String::new()
            } else {
                format!(" (not succeeded: {})", failed.join(", "))
            };
            throughput.push(Row::value(
                format!("runs per minute, trivial runs (`true`), pool maxSize {size}"),
                n,
                format!("{:.1} /min", n as f64 * 60.0 / took.as_secs_f64()),
                format!(
                    "{n} runs applied at once, warm pool of {size}; all done in {}; {ok}/{n} Succeeded{failed}",
                    fmt_duration(took)
                ),
            ));
            if size == 1 && spans.len() > 1 {
                // One VM: each run is scheduled when the previous one's VM is back.
                spans.sort_by_key(|s| s.1);
                let gaps: Vec<Duration> =
                    spans.windows(2).map(|w| between(w[0].3, w[1].1)).collect();
                let exec: Vec<Duration> = spans.iter().map(|s| between(s.2, s.3)).collect();
                throughput.push(Row::timing(
                    "VM turnaround on maxSize 1: run finished → next run scheduled",
                    &summarize(gaps),
                    format!(
                        "reset on the run's thread, then the queued run is woken by the VM becoming ready; the run itself (startedAt → finishedAt) median {}",
                        fmt_duration(summarize(exec).median)
                    ),
                ));
            }
        }
        // Let the controller tear the pool down (its VMs and files).
        let _ = client.delete(Kind::VmPool, &pool, false);
        let _ = wait_until("the pool's deletion", Duration::from_secs(180), || {
            Ok(client
                .get(Kind::VmPool, &pool)
                .is_err_and(|e| e.is_not_found()))
        });
        Ok(())
    })();
    if result.is_err() {
        eprintln!("{}", c.log_tail());
    }
    c.stop();
    result
}
