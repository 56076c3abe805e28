//! The cluster store against the single-host one, side by side in one run: store calls,
//! API apply → start of the object's reconcile through a whole in-process controller, and
//! how soon another node hears of a change. etcd is a real one-member etcd on loopback
//! (`agentvm_store::testing`), started and ended here.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_api::{ImageStatus, Kind};
use agentvm_client::Client;
use agentvm_controller::{Action, Config, Controller, Ctx, ReconcileError, Reconciler};
use agentvm_store::cluster::NodeInfo;
use agentvm_store::testing::EtcdServer;
use agentvm_store::{ApplyOptions, ClusterConfig, Manager, Store, StoredObject, STORE_FILE};
use anyhow::{Context, Result};

use crate::inproc::{apply_request, image_doc, wait_until_some};
use crate::report::{Row, Table};
use crate::stats::{fmt_duration, summarize};

/// Records when each Image's first reconcile started.
struct FirstSeen(Mutex<HashMap<String, Instant>>);

impl Reconciler for FirstSeen {
    fn kind(&self) -> Kind {
        Kind::Image
    }
    fn reconcile(&self, obj: Arc<StoredObject>, _: &Ctx) -> Result<Action, ReconcileError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(obj.resource.name().to_string())
            .or_insert_with(Instant::now);
        Ok(Action::AwaitChange)
    }
}

fn image(name: &str, suite: &str) -> Result<agentvm_api::Resource> {
    let text = format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec:\n  suite: {suite}\n"
    );
    Ok(agentvm_api::parse_str(&text, "bench.yaml")?[0]
        .resource
        .clone())
}

/// `n` of each store call: apply that changes the spec, a status write, a read.
fn store_calls(store: &Store, n: usize) -> Result<[Vec<Duration>; 3]> {
    let api = ApplyOptions::default();
    store.apply(image("bench", "bookworm")?, Manager::Api, api)?;
    let (mut applies, mut statuses, mut gets) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let suite = if i % 2 == 0 { "trixie" } else { "bookworm" };
        let resource = image("bench", suite)?;
        let t = Instant::now();
        store.apply(resource, Manager::Api, api)?;
        applies.push(t.elapsed());
        let status = ImageStatus {
            digest: Some(format!("d{i}")),
            ..Default::default()
        };
        let t = Instant::now();
        store.update_status("bench", status)?;
        statuses.push(t.elapsed());
        let t = Instant::now();
        store.get(Kind::Image, "bench")?.context("the object")?;
        gets.push(t.elapsed());
    }
    Ok([applies, statuses, gets])
}

/// API apply of one Image → the start of its reconcile, `n` times, through a controller on
/// `cluster` (`None`: the single-host store).
fn apply_to_reconcile(
    dir: &Path,
    cluster: Option<ClusterConfig>,
    n: usize,
) -> Result<Vec<Duration>> {
    let socket = dir.join("api.sock");
    let config = Config {
        state_dir: dir.join("state"),
        metrics_address: "off".into(),
        ..Config::default()
    };
    let seen = Arc::new(FirstSeen(Mutex::default()));
    let mut controller = Controller::new(config)
        .socket(socket.clone())
        .reconciler(seen.clone());
    if let Some(cluster) = cluster {
        let node = NodeInfo {
            name: "bench".into(),
            vcpus: 1,
            memory_mib: 1,
            accelerator: "tcg".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            joined_at: agentvm_api::Timestamp::now(),
        };
        controller = controller.cluster(cluster, node);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = controller.on_ready(move |h| {
        let _ = ready_tx.send(h);
    });
    let task = runtime.spawn(controller.run(async {
        let _ = stop_rx.await;
    }));
    let result = (|| -> Result<Vec<Duration>> {
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .context("the in-process controller did not start")?;
        let client = Client::new(&socket);
        let mut times = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("img-{i:03}");
            let request = apply_request(&image_doc(&name))?;
            let t = Instant::now();
            client.apply(&request)?;
            let started = wait_until_some(
                "the applied object's reconcile",
                Duration::from_secs(30),
                || {
                    seen.0
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&name)
                        .copied()
                },
            )?;
            times.push(started.saturating_duration_since(t));
        }
        Ok(times)
    })();
    let _ = stop_tx.send(());
    runtime
        .block_on(task)
        .context("the in-process controller task")?
        .context("the in-process controller")?;
    result
}

/// A write on one node → the event on another, `n` times.
fn watch_delay(etcd: &EtcdServer, dir: &Path, n: usize) -> Result<Vec<Duration>> {
    let config = etcd.config("/bench-watch");
    let a = Store::open_cluster(&config, dir.join("a").join(STORE_FILE))?;
    let b = Store::open_cluster(&config, dir.join("b").join(STORE_FILE))?;
    let mut events = b.subscribe();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("w-{i:03}");
        let t = Instant::now();
        a.apply(
            image(&name, "bookworm")?,
            Manager::Api,
            ApplyOptions::default(),
        )?;
        runtime.block_on(async {
            loop {
                let e = tokio::time::timeout(Duration::from_secs(10), events.recv())
                    .await
                    .context("no event within 10 s")??;
                if e.name == name {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        })?;
        times.push(t.elapsed());
    }
    Ok(times)
}

/// The cluster rows.
pub fn cluster_rows(dir: &Path, n: usize, table: &mut Table) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let etcd = EtcdServer::start();
    let local = Store::open(dir.join("local").join(STORE_FILE))?;
    let cluster = Store::open_cluster(&etcd.config("/bench"), dir.join("node").join(STORE_FILE))?;
    let [l_apply, l_status, l_get] = store_calls(&local, n)?;
    let [c_apply, c_status, c_get] = store_calls(&cluster, n)?;
    for (what, l, c, local_note) in [
        (
            "apply that changes the spec",
            l_apply,
            c_apply,
            "redb, one fsync",
        ),
        ("status write", l_status, c_status, "redb, one fsync"),
        ("read of one object", l_get, c_get, "redb read transaction"),
    ] {
        let (l, c) = (summarize(l), summarize(c));
        table.push(Row::timing(
            format!("store: {what}, etcd"),
            &c,
            format!(
                "one-member etcd on loopback; {:.1}× the local file's median",
                c.median.as_secs_f64() / l.median.as_secs_f64().max(1e-9)
            ),
        ));
        table.push(Row::timing(
            format!("baseline: store: {what}, local file"),
            &l,
            local_note,
        ));
    }
    let controller_n = n.min(50);
    let single = summarize(apply_to_reconcile(&dir.join("single"), None, controller_n)?);
    let clustered = summarize(apply_to_reconcile(
        &dir.join("clustered"),
        Some(etcd.config("/bench-controller")),
        controller_n,
    )?);
    table.push(Row::timing(
        "API apply of one object → start of its reconcile, cluster node (the leader)",
        &clustered,
        format!(
            "in-process controller on etcd: apply through the API, the etcd watch's event, the dispatcher; {} more than the single host at the median",
            fmt_duration(clustered.median.saturating_sub(single.median))
        ),
    ));
    table.push(Row::timing(
        "baseline: the same, single host (local file)",
        &single,
        "the writer's own event, no watch",
    ));
    table.push(Row::timing(
        "a write on one node → the event on another",
        &summarize(watch_delay(&etcd, dir, n)?),
        "two cluster stores on one etcd: the apply's commit plus the watch's delivery",
    ));
    Ok(())
}
