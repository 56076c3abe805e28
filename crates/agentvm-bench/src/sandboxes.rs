//! Sandboxes through the `agentvm controller` process (real QEMU): the claim from a warm
//! pool, pause/resume, stop/start (managed save/restore), a snapshot of an idle 1 GiB
//! sandbox and of one holding 500 MiB of dirty memory, rollback against `virsh
//! snapshot-revert` of the same snapshot in the same run, and the host memory of N running,
//! paused and stopped sandboxes.

use std::path::Path;
use std::time::{Duration, Instant};

use agentvm_api::{Kind, Resource, SandboxPhase, SandboxState, SnapshotPhase};
use agentvm_client::Client;
use agentvm_client::SandboxExecRequest;
use anyhow::{bail, Context, Result};

use crate::controller::ControllerProcess;
use crate::inproc::apply_request;
use crate::report::{Row, Table};
use crate::stats::{fmt_duration, fmt_kib, summarize};
use crate::system::rss_kib;
use crate::vms::{qemu_pid, virsh};
use crate::wait_until;

/// Guest RAM of the sandboxes measured, MiB.
const SANDBOX_MEMORY_MIB: u32 = 1024;

fn pool_yaml(pool: &str, image: &str, min_ready: usize, max_size: usize) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: {SANDBOX_MEMORY_MIB}, diskGib: 2}}\n  minReady: {min_ready}\n  maxSize: {max_size}\n"
    )
}

fn sandbox_yaml(name: &str, pool: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec: {{poolRef: {pool}, idleTimeoutSeconds: 0}}\n")
}

fn phase(client: &Client, name: &str) -> Result<(SandboxPhase, i64, Option<i64>, Option<String>)> {
    let o = client.get(Kind::Sandbox, name)?;
    let generation = o.generation();
    match o.resource {
        Resource::Sandbox(s) => {
            let st = s.status.unwrap_or_default();
            Ok((st.phase, generation, st.observed_generation, st.vm))
        }
        _ => bail!("{name} is not a sandbox"),
    }
}

/// Sets `spec.state` and waits for the phase that goes with it; how long that took.
fn set_state(client: &Client, name: &str, state: SandboxState) -> Result<Duration> {
    let want = match state {
        SandboxState::Running => SandboxPhase::Running,
        SandboxState::Paused => SandboxPhase::Paused,
        SandboxState::Stopped => SandboxPhase::Stopped,
    };
    let t = Instant::now();
    let generation = client.sandbox_state(name, state)?.generation();
    wait_until(
        &format!("sandbox {name} {}", want.as_str()),
        Duration::from_secs(300),
        || {
            let (p, _, observed, _) = phase(client, name)?;
            Ok(p == want && observed.unwrap_or(0) >= generation)
        },
    )?;
    Ok(t.elapsed())
}

fn exec(client: &Client, name: &str, script: &str) -> Result<()> {
    let events = client.sandbox_exec(
        name,
        &SandboxExecRequest {
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: Default::default(),
            workdir: None,
            timeout_seconds: Some(600),
        },
    )?;
    for e in events {
        match e? {
            agentvm_client::ExecEvent::Exit { code: Some(0), .. } => return Ok(()),
            agentvm_client::ExecEvent::Exit { code, signal, .. } => {
                bail!("{script:?} in {name}: exit {code:?} signal {signal:?}")
            }
            agentvm_client::ExecEvent::Error(e) => bail!("{script:?} in {name}: {e}"),
            _ => {}
        }
    }
    bail!("{script:?} in {name}: no exit")
}

/// Takes snapshot `snap` of `sandbox`: (time from apply to Ready, guest pause, memory bytes).
fn snapshot(client: &Client, sandbox: &str, snap: &str) -> Result<(Duration, u64, u64)> {
    let t = Instant::now();
    client.apply(&apply_request(&format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Snapshot\nmetadata: {{name: {snap}}}\nspec: {{sandboxRef: {sandbox}}}\n"
    ))?)?;
    let mut got = None;
    wait_until(
        &format!("snapshot {snap}"),
        Duration::from_secs(600),
        || {
            let o = client.get(Kind::Snapshot, snap)?;
            if let Resource::Snapshot(s) = o.resource {
                if let Some(st) = s.status {
                    match st.phase {
                        SnapshotPhase::Ready => {
                            got = Some((st.pause_ms.unwrap_or(0), st.memory_bytes.unwrap_or(0)));
                            return Ok(true);
                        }
                        SnapshotPhase::Failed => {
                            bail!("snapshot {snap} failed: {:?}", st.conditions)
                        }
                        SnapshotPhase::Pending => {}
                    }
                }
            }
            Ok(false)
        },
    )?;
    let took = t.elapsed();
    let (pause_ms, bytes) = got.unwrap_or_default();
    Ok((took, pause_ms, bytes))
}

/// Asks for a rollback to `snap` and waits until the sandbox did it.
fn rollback(client: &Client, sandbox: &str, snap: &str) -> Result<Duration> {
    let t = Instant::now();
    let obj = client.sandbox_rollback(sandbox, snap)?;
    let Resource::Sandbox(sb) = obj.resource else {
        bail!("not a sandbox");
    };
    let request = sb.spec.rollback.context("no rollback recorded")?;
    wait_until(
        &format!("rollback of {sandbox}"),
        Duration::from_secs(120),
        || {
            let o = client.get(Kind::Sandbox, sandbox)?;
            if let Resource::Sandbox(s) = o.resource {
                if let Some(last) = s.status.and_then(|st| st.last_rollback) {
                    if last.request == request {
                        if !last.done {
                            bail!("rollback refused: {}", last.message);
                        }
                        return Ok(true);
                    }
                }
            }
            Ok(false)
        },
    )?;
    Ok(t.elapsed())
}

/// Sum of the QEMU RSS of `vms` (KiB) and how many have a QEMU process.
fn qemu_rss(vms: &[String]) -> (u64, usize) {
    let mut total = 0;
    let mut alive = 0;
    for vm in vms {
        if let Some((rss, _)) = qemu_pid(vm).ok().and_then(rss_kib) {
            total += rss;
            alive += 1;
        }
    }
    (total, alive)
}

/// See the module docs. `cycles` latency samples per verb; `count` sandboxes for memory.
#[allow(clippy::too_many_arguments)]
pub fn sandbox_rows(
    bin: &Path,
    dir: &Path,
    uri: &str,
    cache_dir: &Path,
    cycles: usize,
    count: usize,
    table: &mut Table,
    memory: &mut Table,
) -> Result<()> {
    let c = ControllerProcess::start(bin, dir, uri, cache_dir)?;
    let client = &c.client;
    let (pool, image) = ("bench-sbx", "bench-sbx-img");
    client.apply(&apply_request(&pool_yaml(pool, image, count, count))?)?;
    let t = Instant::now();
    wait_until(
        &format!("{count} warm VMs"),
        Duration::from_secs(60 * 60),
        || {
            let s = client.get(Kind::VmPool, pool)?.status_json();
            Ok(s["ready"].as_u64() == Some(count as u64))
        },
    )?;
    eprintln!(
        "  {count} warm {SANDBOX_MEMORY_MIB} MiB VMs after {:.0} s",
        t.elapsed().as_secs_f64()
    );

    // Claims: every sandbox at once from the warm pool; then the pool stops refilling.
    let names: Vec<String> = (0..count).map(|i| format!("sbx-{i:02}")).collect();
    let docs: Vec<String> = names.iter().map(|n| sandbox_yaml(n, pool)).collect();
    let t = Instant::now();
    client.apply(&apply_request(&docs.join("---\n"))?)?;
    let mut claimed = vec![None; count];
    wait_until("every sandbox Running", Duration::from_secs(120), || {
        for (i, n) in names.iter().enumerate() {
            if claimed[i].is_none() && phase(client, n)?.0 == SandboxPhase::Running {
                claimed[i] = Some(t.elapsed());
            }
        }
        Ok(claimed.iter().all(Option::is_some))
    })?;
    client.apply(&apply_request(&pool_yaml(pool, image, 0, count))?)?;
    let claims = summarize(claimed.into_iter().flatten().collect());
    table.push(Row::timing(
        format!("`apply` of {count} sandboxes → each Running (claimed from a warm pool)"),
        &claims,
        "one apply request; time until each sandbox's phase is Running, polled every 20 ms",
    ));
    let vms: Vec<String> = names
        .iter()
        .map(|n| phase(client, n).map(|p| p.3.unwrap_or_default()))
        .collect::<Result<_>>()?;

    let one = names[0].as_str();
    let (mut pause, mut resume) = (Vec::new(), Vec::new());
    for _ in 0..cycles {
        pause.push(set_state(client, one, SandboxState::Paused)?);
        resume.push(set_state(client, one, SandboxState::Running)?);
    }
    table.push(Row::timing(
        "pause (spec.state Paused → phase Paused)",
        &summarize(pause),
        "API call to the status saying so; vCPUs stopped, memory kept",
    ));
    table.push(Row::timing(
        "resume (→ Running)",
        &summarize(resume),
        "includes the guest agent answering and the guest clock being set",
    ));
    let (mut stop, mut start) = (Vec::new(), Vec::new());
    for _ in 0..cycles.min(5) {
        stop.push(set_state(client, one, SandboxState::Stopped)?);
        start.push(set_state(client, one, SandboxState::Running)?);
    }
    table.push(Row::timing(
        format!("stop (→ Stopped: managed save of a {SANDBOX_MEMORY_MIB} MiB guest)"),
        &summarize(stop),
        "memory and devices written to disk, QEMU ended",
    ));
    table.push(Row::timing(
        "start (→ Running: restore)",
        &summarize(start),
        "new QEMU from the saved state, the agent answering, the clock set",
    ));
    // A file written before the pause survives pause, stop and start.
    exec(client, one, "echo kept > /root/bench-kept")?;
    set_state(client, one, SandboxState::Paused)?;
    set_state(client, one, SandboxState::Running)?;
    set_state(client, one, SandboxState::Stopped)?;
    set_state(client, one, SandboxState::Running)?;
    exec(client, one, "grep -qx kept /root/bench-kept")?;

    // Snapshots: idle, then with 500 MiB of memory written by a process that keeps it.
    let (took, pause_ms, bytes) = snapshot(client, one, "idle")?;
    table.push(Row::value(
        format!("snapshot of an idle {SANDBOX_MEMORY_MIB} MiB sandbox"),
        1,
        fmt_duration(took),
        format!(
            "apply → Ready; guest stopped {pause_ms} ms; {} of memory state",
            fmt_kib(bytes / 1024)
        ),
    ));
    exec(
        client,
        one,
        "setsid python3 -c 'import os, time; b = os.urandom(500 << 20); time.sleep(1e6)' </dev/null >/dev/null 2>&1 & \
         while [ \"$(awk '/^MemAvailable/ {print $2}' /proc/meminfo)\" -gt 400000 ]; do sleep 1; done",
    )?;
    let (took, pause_ms, bytes) = snapshot(client, one, "dirty")?;
    table.push(Row::value(
        "snapshot with 500 MiB of dirty memory",
        1,
        fmt_duration(took),
        format!(
            "apply → Ready; guest stopped {pause_ms} ms; {} of memory state",
            fmt_kib(bytes / 1024)
        ),
    ));

    // Rollback (in place, `loadvm`) against `virsh snapshot-revert` of the same snapshot.
    let vm = &vms[0];
    let tag = agentvm_backend::snapshots::snapshot_tag("idle");
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..cycles.min(5) {
        ours.push(rollback(client, one, "idle")?);
        let t = Instant::now();
        virsh(uri, &["snapshot-revert", vm, &tag, "--running"])?;
        theirs.push(t.elapsed());
    }
    // Back through agentvm, so the controller's view is current again.
    rollback(client, one, "idle")?;
    table.push(Row::timing(
        "rollback to a snapshot (`agentvm rollback`)",
        &summarize(ours),
        "API call → status says done: `loadvm` in the running QEMU, agent answering, clock set",
    ));
    table.push(Row::timing(
        "baseline: `virsh snapshot-revert --running` of the same snapshot",
        &summarize(theirs),
        "libvirt restarts QEMU; the guest agent is not waited for",
    ));

    // Forks of the idle snapshot (the source holds two snapshots' memory state by now),
    // against the boot of a new pool VM of the same shape: what a fork saves.
    let mut forks = Vec::new();
    let mut pauses = Vec::new();
    for i in 0..cycles.min(5) {
        let name = format!("fork-{i}");
        let t = Instant::now();
        client.apply(&apply_request(&format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec: {{fromSnapshot: idle}}\n"
        ))?)?;
        wait_until(&format!("fork {name}"), Duration::from_secs(300), || {
            Ok(phase(client, &name)?.0 == SandboxPhase::Running)
        })?;
        forks.push(t.elapsed());
        let o = client.get(Kind::Sandbox, &name)?;
        if let Resource::Sandbox(sb) = o.resource {
            if let Some(f) = sb.status.and_then(|s| s.forked_from) {
                pauses.push(Duration::from_millis(f.source_pause_ms));
            }
        }
        exec(client, &name, "grep -qx kept /root/bench-kept")?;
        client.delete(Kind::Sandbox, &name, false)?;
        wait_until("fork deleted", Duration::from_secs(120), || {
            Ok(client.get(Kind::Sandbox, &name).is_err())
        })?;
    }
    table.push(Row::timing(
        format!("fork of a snapshot (`fromSnapshot` → Running, {SANDBOX_MEMORY_MIB} MiB guest)"),
        &summarize(forks),
        format!(
            "copy of the source's overlay, new domain, `loadvm`, agent answering, reseed and clock; source paused median {}",
            if pauses.is_empty() {
                "unknown".to_string()
            } else {
                fmt_duration(summarize(pauses).median)
            }
        ),
    ));
    // A new pool VM by boot, then (`creation: template`: the booted one is kept as the
    // template) one restored from the template: what a sandbox or run without a warm VM waits.
    let templated = |min: usize| -> Result<String> {
        Ok(format!(
            "{}  creation: template\n",
            pool_yaml(pool, image, min, count + 2)
        ))
    };
    let mut new_vm = |min: usize, what: &str, how: &str| -> Result<()> {
        let t = Instant::now();
        client.apply(&apply_request(&templated(min)?)?)?;
        wait_until(what, Duration::from_secs(600), || {
            let s = client.get(Kind::VmPool, pool)?.status_json();
            Ok(s["ready"].as_u64() == Some(min as u64))
        })?;
        table.push(Row::value(
            what,
            1,
            fmt_duration(t.elapsed()),
            format!(
                "pool minReady {} → {min} until the pool says ready; {how}",
                min - 1
            ),
        ));
        Ok(())
    };
    new_vm(
        1,
        "baseline: a new pool VM of the same shape, booted",
        "boot, warm-up, golden snapshot, and kept as the pool's template",
    )?;
    new_vm(
        2,
        "a new pool VM restored from the pool's template (`creation: template`)",
        "copy of the template, new domain, `loadvm`, reseed and clock, golden snapshot of its own",
    )?;
    client.apply(&apply_request(&templated(0)?)?)?;

    // Host memory of every sandbox running, paused, stopped.
    std::thread::sleep(Duration::from_secs(3));
    let (running, n_running) = qemu_rss(&vms);
    for n in &names {
        set_state(client, n, SandboxState::Paused)?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let (paused, n_paused) = qemu_rss(&vms);
    let t = Instant::now();
    for n in &names {
        set_state(client, n, SandboxState::Stopped)?;
    }
    let stop_all = t.elapsed();
    let (stopped, n_stopped) = qemu_rss(&vms);
    let saved: u64 = vms
        .iter()
        .filter_map(|vm| std::fs::metadata(format!("/var/lib/libvirt/qemu/save/{vm}.save")).ok())
        .map(|m| m.len())
        .sum();
    memory.push(Row::value(
        format!("{count} running sandboxes ({SANDBOX_MEMORY_MIB} MiB each), host RSS"),
        n_running,
        fmt_kib(running),
        "sum of their QEMU processes' RSS, idle",
    ));
    memory.push(Row::value(
        format!("the same {count} paused"),
        n_paused,
        fmt_kib(paused),
        "vCPUs stopped: memory stays",
    ));
    memory.push(Row::value(
        format!("the same {count} stopped"),
        n_stopped,
        fmt_kib(stopped),
        format!(
            "no QEMU process; {} of saved state on disk; stopping all took {}",
            fmt_kib(saved / 1024),
            fmt_duration(stop_all)
        ),
    ));

    for n in &names {
        let _ = client.delete(Kind::Sandbox, n, false);
    }
    let _ = client.delete(Kind::VmPool, pool, false);
    wait_until("sandboxes deleted", Duration::from_secs(300), || {
        Ok(client.list(Some(Kind::Sandbox), None)?.is_empty())
    })?;
    c.stop();
    Ok(())
}
