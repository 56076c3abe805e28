//! `Controller`: the daemon: opens the store, starts the spec-dir source, the API server and
//! the reconcile dispatcher, and stops them together.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::server::{self, ApiState, ServeError};
use crate::audit::{AuditLog, KEEP_ROTATED};
use crate::health::Readiness;
use crate::metrics::Metrics;
use crate::metrics_server;
use crate::reconcile::{Ctx, Dispatcher, DispatcherHandle, DispatcherOptions, Reconciler, Sweeper};
use crate::source::specdir::SpecDirError;
use crate::source::{SpecDir, WatchOptions};
use crate::vm_stats::{StatsSource, VmStatsHistory, VmStatsSampler, DEFAULT_HISTORY};
use crate::Config;
use agentvm_store::cluster::{Membership, NodeInfo};
use agentvm_store::{ClusterConfig, Store, StoreError, STORE_FILE};

/// How long shutdown waits for reconciles in progress before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the controller could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The spec directory is unusable.
    #[error(transparent)]
    SpecDir(#[from] SpecDirError),
    /// The API socket could not be served.
    #[error(transparent)]
    Api(#[from] ServeError),
    /// A component failed unexpectedly.
    #[error("{0}")]
    Task(String),
    /// The state directory could not be made or its modes set.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The controller daemon, configured builder-style, started with [`Controller::run`].
pub struct Controller {
    config: Config,
    spec_dir: Option<PathBuf>,
    socket: PathBuf,
    reconcilers: Vec<Arc<dyn Reconciler>>,
    sweepers: Vec<Arc<dyn Sweeper>>,
    dispatcher: DispatcherOptions,
    watch: WatchOptions,
    on_ready: Option<Box<dyn FnOnce(DispatcherHandle) + Send>>,
    metrics: Metrics,
    readiness: Readiness,
    vm_stats: VmStatsHistory,
    stats_source: Option<Box<dyn StatsSource>>,
    egress: Option<Arc<dyn agentvm_backend::Backend>>,
    sandboxes: Option<crate::api::server::SandboxAccess>,
    cluster: Option<(ClusterConfig, NodeInfo)>,
}

/// Waits until this node may reconcile: at once on a single host; in a cluster, once it is
/// elected.
async fn leading(membership: &Option<Arc<Membership>>) {
    if let Some(m) = membership {
        m.leadership().await;
    }
}

/// Waits until this node may no longer act (its cluster lease lapsed, or it was drained)
/// and says why; never on a single host.
async fn lease_lost(membership: &Option<Arc<Membership>>) -> String {
    match membership {
        Some(m) => m.lost().await,
        None => std::future::pending().await,
    }
}

impl Controller {
    /// A controller for `config`, serving on [`agentvm_client::default_socket`], without a spec
    /// directory and without reconcilers.
    pub fn new(config: Config) -> Self {
        let socket = agentvm_client::default_socket(&config.state_dir);
        Self {
            config,
            spec_dir: None,
            socket,
            reconcilers: Vec::new(),
            sweepers: Vec::new(),
            dispatcher: DispatcherOptions::default(),
            watch: WatchOptions::default(),
            on_ready: None,
            metrics: Metrics::new(),
            readiness: Readiness::default(),
            vm_stats: VmStatsHistory::new(DEFAULT_HISTORY),
            stats_source: None,
            egress: None,
            sandboxes: None,
            cluster: None,
        }
    }

    /// Keep objects in the etcd cluster `config` names and join it as `node`: every node
    /// serves the whole API; the elected leader reconciles, and a node stops when it loses
    /// its lease (see [`agentvm_store::cluster`]).
    pub fn cluster(mut self, config: ClusterConfig, node: NodeInfo) -> Self {
        self.cluster = Some((config, node));
        self
    }

    /// Sample VM statistics from `source` every `vmStatsIntervalSeconds` into the per-VM
    /// metrics and [`Ctx::vm_stats`]; `/readyz` then also needs the last sample to succeed.
    pub fn vm_stats(mut self, source: impl StatsSource) -> Self {
        self.stats_source = Some(Box::new(source));
        self
    }

    /// Run the egress proxy (domain rules of `NetworkFilter`s; see [`crate::egress`]) with
    /// `backend` as the source of guest addresses.
    pub fn egress(mut self, backend: Arc<dyn agentvm_backend::Backend>) -> Self {
        self.egress = Some(backend);
        self
    }

    /// Serve exec into sandboxes through `backend`, recording each use in `sandboxes` (the
    /// `Sandbox` reconciler's activity record).
    pub fn sandboxes(
        mut self,
        backend: Arc<dyn agentvm_backend::Backend>,
        sandboxes: Arc<crate::reconcilers::Sandboxes>,
    ) -> Self {
        self.sandboxes = Some(crate::api::server::SandboxAccess { backend, sandboxes });
        self
    }

    /// The controller's metrics (the same as [`Ctx::metrics`]), for components built before
    /// it runs.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Watch `dir` as a source of desired objects.
    pub fn spec_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.spec_dir = dir;
        self
    }

    /// Serve the API on `socket`.
    pub fn socket(mut self, socket: PathBuf) -> Self {
        self.socket = socket;
        self
    }

    /// Register the reconciler of one kind.
    pub fn reconciler(mut self, reconciler: Arc<dyn Reconciler>) -> Self {
        self.reconcilers.push(reconciler);
        self
    }

    /// Register periodic work (run at start and at every resync period).
    pub fn sweeper(mut self, sweeper: Arc<dyn Sweeper>) -> Self {
        self.sweepers.push(sweeper);
        self
    }

    /// Tune the dispatcher (resync period, workers, backoff).
    pub fn dispatcher_options(mut self, options: DispatcherOptions) -> Self {
        self.dispatcher = options;
        self
    }

    /// Tune the spec-dir watcher.
    pub fn watch_options(mut self, options: WatchOptions) -> Self {
        self.watch = options;
        self
    }

    /// Called once everything is started (tests and benchmarks use the handle).
    pub fn on_ready(mut self, f: impl FnOnce(DispatcherHandle) + Send + 'static) -> Self {
        self.on_ready = Some(Box::new(f));
        self
    }

    /// Runs until `shutdown` resolves, then stops the API, the watcher and the dispatcher
    /// (waiting up to 30 s for reconciles in progress) and removes the socket.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        crate::state_dir::prepare(&self.config).map_err(|source| ControllerError::StateDir {
            path: self.config.state_dir.clone(),
            source,
        })?;
        let store_path = self.config.state_dir.join(STORE_FILE);
        let cluster = self.cluster.take();
        let (store, membership) = tokio::task::spawn_blocking(move || match cluster {
            None => Ok((Store::open(store_path)?, None)),
            Some((config, node)) => {
                // Run output stays in the local file.
                let store = Store::open_cluster(&config, store_path)?;
                let membership = Membership::join(&config, node)?;
                Ok::<_, agentvm_store::StoreError>((store, Some(Arc::new(membership))))
            }
        })
        .await
        .map_err(|e| ControllerError::Task(e.to_string()))??;
        self.readiness.set_store_open(true);
        // Subscribed before anything can change the store, so every change is audited.
        let store_events = store.subscribe();
        let audit_path = self.config.audit_log_path();
        let max_bytes = self.config.audit_log_max_bytes;
        let audit = tokio::task::spawn_blocking(move || {
            AuditLog::open(&audit_path, max_bytes, KEEP_ROTATED).map_err(|source| {
                ControllerError::Audit {
                    path: audit_path,
                    source,
                }
            })
        })
        .await
        .map_err(|e| ControllerError::Task(e.to_string()))??
        .with_metrics(self.metrics.clone());
        // An unusable metrics address does not stop the controller: it is logged, and
        // Prometheus reports the target down.
        let metrics_listener = match metrics_server::parse_address(&self.config.metrics_address) {
            None => None,
            Some(addr) => match metrics_server::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::error!("metrics endpoint: cannot listen on {addr}: {e}");
                    None
                }
            },
        };
        let spec_dir = match &self.spec_dir {
            Some(dir) => Some(SpecDir::new(dir, store.clone())?),
            None => None,
        };
        let gid = self.config.socket_gid().map_err(|e| ServeError::Socket {
            path: self.socket.clone(),
            message: e.to_string(),
        })?;
        let listener = server::bind_with_group(&self.socket, gid)?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            while !*rx.borrow() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };

        let api_state = ApiState {
            store: store.clone(),
            spec_dir: spec_dir.as_ref().map(SpecDir::state_handle),
            shutdown: stop_rx.clone(),
            sandboxes: self.sandboxes.clone(),
            audit: Some(audit.clone()),
            membership: membership.clone(),
        };
        let mut api = tokio::spawn(server::serve(listener, api_state, stopped(stop_rx.clone())));
        if let Some(m) = membership.clone() {
            // This node's role and lease, for /metrics.
            let (metrics, until) = (self.metrics.clone(), stopped(stop_rx.clone()));
            tokio::spawn(async move {
                tokio::pin!(until);
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    let (leader, left) = m.role();
                    metrics.cluster_node(m.name(), leader, left);
                    tokio::select! {
                        _ = &mut until => break,
                        _ = tick.tick() => {}
                    }
                }
            });
        }
        let mut source = match spec_dir.clone() {
            Some(s) => tokio::spawn(s.run(self.watch, stopped(stop_rx.clone()))),
            None => {
                let until = stopped(stop_rx.clone());
                tokio::spawn(async move {
                    until.await;
                    Ok(())
                })
            }
        };
        let vm_stats = VmStatsSampler::new(
            self.metrics.clone(),
            self.vm_stats.clone(),
            self.readiness.clone(),
        );
        let ctx = Ctx {
            store: store.clone(),
            cache: crate::cache::ObjectCache::new(&store),
            config: Arc::new(self.config.clone()),
            metrics: self.metrics.clone(),
            audit: audit.clone(),
            vm_stats: vm_stats.clone(),
            egress: Default::default(),
            // Connected to the work queue by the dispatcher.
            wake: Default::default(),
            node: membership.as_ref().map(|m| m.name().to_string()),
        };
        if let Some(backend) = self.egress.take() {
            let (ctx, membership) = (ctx.clone(), membership.clone());
            tokio::spawn(async move {
                leading(&membership).await;
                if let Err(e) = crate::egress::start(ctx, backend) {
                    tracing::error!("egress proxy not started: {e}");
                }
            });
        }
        let sweeps: Vec<_> = self
            .sweepers
            .into_iter()
            .map(|sweeper| {
                let ctx = ctx.clone();
                let every = self.dispatcher.resync;
                let until = stopped(stop_rx.clone());
                let membership = membership.clone();
                tokio::spawn(async move {
                    tokio::pin!(until);
                    tokio::select! {
                        _ = &mut until => return,
                        _ = leading(&membership) => {}
                    }
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = &mut until => break,
                            _ = tick.tick() => {}
                        }
                        let (s, c) = (sweeper.clone(), ctx.clone());
                        match tokio::task::spawn_blocking(move || s.sweep(&c)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::warn!("sweep failed: {e}"),
                            Err(e) => tracing::error!("sweep panicked: {e}"),
                        }
                    }
                })
            })
            .collect();
        let mut observers = vec![tokio::spawn(crate::audit::record_store_events(
            store.clone(),
            audit,
            store_events,
            stopped(stop_rx.clone()),
        ))];
        if let Some(listener) = metrics_listener {
            if let Some(addr) = metrics_server::bound_address(&listener) {
                tracing::info!("metrics endpoint on http://{addr} (/metrics, /healthz, /readyz)");
            }
            let serve = metrics_server::serve(
                listener,
                self.metrics.clone(),
                self.readiness.clone(),
                stopped(stop_rx.clone()),
            );
            observers.push(tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!("metrics endpoint stopped: {e}");
                }
            }));
        }
        if let Some(source) = self.stats_source.take() {
            self.readiness.require_libvirt();
            let sampler = vm_stats;
            let every = Duration::from_secs(self.config.vm_stats_interval_seconds.max(1));
            observers.push(tokio::spawn(sampler.run(
                source,
                every,
                stopped(stop_rx.clone()),
            )));
        }
        let mut dispatcher = Dispatcher::new(ctx, self.reconcilers, self.dispatcher);
        if let Some(m) = &membership {
            let m = m.clone();
            dispatcher = dispatcher.fenced_by(Arc::new(move || m.may_act()));
        }
        let handle = dispatcher.handle();
        let readiness = self.readiness.clone();
        readiness.set_standby(membership.is_some());
        let until = stopped(stop_rx.clone());
        let leader = membership.clone();
        let mut dispatch = tokio::spawn(async move {
            tokio::pin!(until);
            tokio::select! {
                _ = &mut until => return,
                _ = leading(&leader) => {}
            }
            readiness.set_standby(false);
            readiness.set_dispatcher_running(true);
            dispatcher.run(until).await;
            readiness.set_dispatcher_running(false);
        });
        tracing::info!(
            "controller ready: API on {}, store {}, spec dir {}",
            self.socket.display(),
            store.path().display(),
            spec_dir
                .as_ref()
                .map(|s| s.dir().display().to_string())
                .unwrap_or_else(|| "none".into())
        );
        if let Some(f) = self.on_ready {
            f(handle);
        }

        let mut failure = None;
        tokio::select! {
            _ = shutdown => tracing::info!("shutting down"),
            r = &mut api => failure = Some(match r {
                Ok(Ok(())) => "the API server stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }),
            r = &mut source => failure = Some(match r {
                Ok(Ok(())) => "the spec-dir watcher stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }),
            _ = &mut dispatch => failure = Some("the dispatcher stopped".to_string()),
            why = lease_lost(&membership) => failure = Some(format!(
                "{why}: it stops so that nothing runs twice; started again it rejoins the cluster (as a standby while cordoned)"
            )),
        }
        let _ = stop_tx.send(true);
        let wait_all = async {
            let _ = api.await;
            let _ = source.await;
            let _ = dispatch.await;
            for s in sweeps {
                let _ = s.await;
            }
            for o in observers {
                let _ = o.await;
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, wait_all)
            .await
            .is_err()
        {
            tracing::warn!("reconciles still running after {SHUTDOWN_GRACE:?}; exiting anyway");
        }
        let _ = std::fs::remove_file(&self.socket);
        match failure {
            Some(msg) => Err(ControllerError::Task(msg)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{Action, ReconcileError};
    use agentvm_api::Kind;
    use agentvm_store::StoredObject;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Records when each Image was first reconciled and marks it Ready.
    struct FirstSeen(Mutex<std::collections::HashMap<String, Instant>>);

    impl Reconciler for FirstSeen {
        fn kind(&self) -> Kind {
            Kind::Image
        }
        fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
            let name = obj.resource.name().to_string();
            self.0
                .lock()
                .unwrap()
                .entry(name.clone())
                .or_insert_with(Instant::now);
            if obj.is_deleting() {
                ctx.store.finalize_delete(Kind::Image, &name)?;
                return Ok(Action::AwaitChange);
            }
            let status = agentvm_api::ImageStatus {
                phase: agentvm_api::ImagePhase::Ready,
                observed_generation: Some(obj.generation()),
                ..Default::default()
            };
            ctx.store.update_status(&name, status)?;
            Ok(Action::AwaitChange)
        }
    }

    /// Records which node reconciled each Image.
    struct Reconciled(&'static str, Arc<Mutex<Vec<(String, &'static str)>>>);

    impl Reconciler for Reconciled {
        fn kind(&self) -> Kind {
            Kind::Image
        }
        fn reconcile(&self, obj: Arc<StoredObject>, _: &Ctx) -> Result<Action, ReconcileError> {
            let name = obj.resource.name().to_string();
            self.1.lock().unwrap().push((name, self.0));
            Ok(Action::AwaitChange)
        }
    }

    /// Two controllers on one real etcd: both serve the API; only the leader reconciles,
    /// and when it stops the other takes over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_one_reconciles_and_the_other_takes_over() {
        let etcd = agentvm_store::testing::shared_etcd();
        let cluster = etcd.config(&format!("/controller-{}", std::process::id()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let tmp = tempfile::tempdir().unwrap();
        let start = |name: &'static str| {
            let dir = tmp.path().join(name);
            let config = Config {
                state_dir: dir.join("state"),
                metrics_address: "off".into(),
                ..Config::default()
            };
            let node = NodeInfo {
                name: name.into(),
                vcpus: 2,
                memory_mib: 1024,
                accelerator: "tcg".into(),
                version: "test".into(),
                joined_at: agentvm_api::Timestamp::now(),
            };
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let controller = Controller::new(config)
                .socket(dir.join("api.sock"))
                .reconciler(Arc::new(Reconciled(name, log.clone())))
                .cluster(cluster.clone(), node);
            let metrics = controller.metrics();
            let task = tokio::spawn(controller.run(async {
                let _ = stopped.await;
            }));
            (
                stop,
                task,
                agentvm_client::Client::new(dir.join("api.sock")),
                metrics,
            )
        };
        let mut nodes = std::collections::HashMap::new();
        for name in ["node-a", "node-b"] {
            nodes.insert(name, start(name));
        }
        let wait_for = |what: &'static str, ok: Box<dyn Fn() -> bool + Send>| async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !ok() {
                assert!(Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let image = |name: &str| agentvm_client::ApplyRequest {
            objects: vec![serde_json::json!({
                "apiVersion": "agentvm.dev/v1alpha1",
                "kind": "Image",
                "metadata": {"name": name},
                "spec": {},
            })],
            sources: vec![],
            dry_run: false,
            force: false,
        };
        // Applied through node-b's API (any node serves it), retried until it is up.
        let apply = |via: &agentvm_client::Client, name: &str| {
            let (c, r) = (via.clone(), image(name));
            async move {
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let (c, r) = (c.clone(), r.clone());
                    let applied = tokio::task::spawn_blocking(move || c.apply(&r))
                        .await
                        .unwrap();
                    if applied.is_ok() {
                        return;
                    }
                    assert!(Instant::now() < deadline, "no API answered: {applied:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        apply(&nodes["node-b"].2, "first").await;
        let l = log.clone();
        wait_for(
            "first reconciled",
            Box::new(move || l.lock().unwrap().iter().any(|(n, _)| n == "first")),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = log.lock().unwrap()[0].1;
        assert!(
            log.lock().unwrap().iter().all(|(_, node)| *node == leader),
            "only the leader reconciles: {:?}",
            log.lock().unwrap()
        );
        // Each node's /metrics tell its role and lease.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        for (name, node) in &nodes {
            let text = node.3.render();
            let want = format!(
                "agentvm_cluster_leader{{node=\"{name}\"}} {}",
                u8::from(*name == leader)
            );
            assert!(text.contains(&want), "{want} in:\n{text}");
            let lease = format!("agentvm_cluster_lease_seconds_left{{node=\"{name}\"}}");
            assert!(text.contains(&lease), "{lease} in:\n{text}");
        }
        // The leader stops: the other is elected and reconciles what is applied next.
        let (stop, task, _, _) = nodes.remove(leader).unwrap();
        let _ = stop.send(());
        task.await.unwrap().unwrap();
        let (other, (stop, task, client, _)) = nodes.into_iter().next().unwrap();
        apply(&client, "second").await;
        let l = log.clone();
        wait_for(
            "the other node reconciles after the leader stopped",
            Box::new(move || {
                l.lock()
                    .unwrap()
                    .iter()
                    .any(|(n, node)| n == "second" && *node == other)
            }),
        )
        .await;
        let _ = stop.send(());
        task.await.unwrap().unwrap();
    }

    /// Prints the latency from a spec-file write to the start of its reconcile (run with
    /// `--nocapture`), through the whole controller: watcher, debounce, store, dispatcher.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spec_file_write_reaches_its_reconciler() {
        let tmp = tempfile::tempdir().unwrap();
        let specs = tmp.path().join("specs");
        std::fs::create_dir(&specs).unwrap();
        let config = Config {
            state_dir: tmp.path().join("state"),
            ..Config::default()
        };
        let seen = Arc::new(FirstSeen(Mutex::default()));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let controller = Controller::new(config)
            .spec_dir(Some(specs.clone()))
            .socket(tmp.path().join("api.sock"))
            .reconciler(seen.clone())
            .on_ready(move |h| {
                let _ = ready_tx.send(h);
            });
        let task = tokio::spawn(controller.run(async {
            let _ = rx.await;
        }));
        let _handle = ready_rx.await.unwrap();
        let client = agentvm_client::Client::new(tmp.path().join("api.sock"));
        let mut latencies = Vec::new();
        for i in 0..5 {
            let name = format!("img-{i}");
            let written = Instant::now();
            std::fs::write(
                specs.join(format!("{name}.yaml")),
                format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec: {{}}\n"),
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let started = loop {
                if let Some(t) = seen.0.lock().unwrap().get(&name) {
                    break *t;
                }
                assert!(Instant::now() < deadline, "{name} never reconciled");
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            latencies.push(started - written);
        }
        println!("spec-file write -> reconcile start: {latencies:?}");
        // The status the reconciler wrote is what the API serves.
        let c = client.clone();
        let obj = tokio::task::spawn_blocking(move || c.get(Kind::Image, "img-0"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(obj.status_json()["phase"], "Ready");
        assert_eq!(obj.status_json()["observedGeneration"], 1);
        // Removing the file removes the object through the reconciler's finalizer.
        std::fs::remove_file(specs.join("img-0.yaml")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = client.clone();
            let r = tokio::task::spawn_blocking(move || c.get(Kind::Image, "img-0"))
                .await
                .unwrap();
            if r.as_ref().is_err_and(|e| e.is_not_found()) {
                break;
            }
            assert!(Instant::now() < deadline, "img-0 not removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
        assert!(!tmp.path().join("api.sock").exists());
    }
}
