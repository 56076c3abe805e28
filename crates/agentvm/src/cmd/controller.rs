//! `agentvm controller`: run the controller daemon: the object store, the spec-directory
//! watch, the API on a Unix socket, and the reconcilers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use agentvm_backend::LibvirtBackend;
use agentvm_controller::reconcile::DispatcherOptions;
use agentvm_controller::reconcilers::{self, ImageCache, PoolRegistry};
use agentvm_controller::vm_stats::BackendStatsSource;
use agentvm_controller::{Config, Controller};
use anyhow::Context;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

/// Options of `controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Watch this directory (e.g. a git checkout) and apply every `.yaml`/`.yml` file in it,
    /// recursively; deleting a file deletes the objects it declared.
    #[arg(long, value_name = "DIR", env = "AGENTVM_SPEC_DIR")]
    spec_dir: Option<PathBuf>,
    /// Serve the API on this Unix socket [default: $AGENTVM_SOCKET, else
    /// <stateDir>/agentvm.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Reconcile every object at least this often (`90`, `30s`, `5m`).
    #[arg(long, alias = "resync-seconds", default_value = "30s", value_name = "DURATION", value_parser = super::parse_duration)]
    resync: Duration,
    /// Only store, watch and serve objects; reconcile nothing into libvirt and build no
    /// images (for trying out manifests and tooling).
    #[arg(long)]
    without_reconcilers: bool,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this TCP address; `off`
    /// disables, port 0 picks a free port [default: $AGENTVM_METRICS_ADDR, else
    /// metricsAddress, else 127.0.0.1:9090].
    #[arg(long, value_name = "ADDR")]
    metrics_address: Option<String>,
    /// Keep objects in this etcd cluster (comma-separated client URLs,
    /// `http://10.0.0.1:2379,http://10.0.0.2:2379`) and join it as a node: every node serves
    /// the whole API, the elected leader reconciles, and a node that loses its lease stops.
    /// Without it, objects stay in <stateDir>/store.redb (one host).
    #[arg(
        long,
        value_name = "URLS",
        env = "AGENTVM_CLUSTER",
        value_delimiter = ','
    )]
    cluster: Vec<String>,
    /// This node's name in the cluster [default: the host name].
    #[arg(long, value_name = "NAME", env = "AGENTVM_NODE", requires = "cluster")]
    node: Option<String>,
    /// Key prefix of this agentvm cluster's data in etcd.
    #[arg(
        long,
        value_name = "PREFIX",
        default_value = "/agentvm",
        requires = "cluster"
    )]
    cluster_prefix: String,
}

impl ControllerArgs {
    /// Run until SIGTERM or SIGINT (a second signal exits at once).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        // Before any thread or file: what the controller creates is private unless given a
        // mode (see agentvm_controller::state_dir).
        agentvm_controller::state_dir::restrict_umask();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(|| agentvm_client::default_socket(&cfg.state_dir));
        let mut cfg = cfg.clone();
        if let Some(addr) = self.metrics_address.clone() {
            cfg.metrics_address = addr;
        }
        let mut controller = Controller::new(cfg.clone())
            .spec_dir(self.spec_dir.clone())
            .socket(socket)
            .dispatcher_options(DispatcherOptions {
                resync: self.resync.max(Duration::from_secs(1)),
                ..DispatcherOptions::default()
            });
        if !self.cluster.is_empty() {
            let node = self.node_info(&cfg)?;
            let cluster = agentvm_store::ClusterConfig {
                prefix: self.cluster_prefix.clone(),
                ..agentvm_store::ClusterConfig::new(self.cluster.clone())
            };
            controller = controller.cluster(cluster, node);
        }
        if !self.without_reconcilers {
            let mut backend = LibvirtBackend::new(
                cfg.libvirt_uri.clone(),
                cfg.state_dir.clone(),
                cfg.accelerator,
                Duration::from_secs(cfg.boot_timeout_seconds),
            )
            .with_tcg_translation_cache(cfg.tcg_tb_cache());
            if libvirt_is_local(&cfg.libvirt_uri) {
                // Put in place with the first network (a Network is not Ready without it),
                // so a host running only isolated pools keeps its firewall untouched.
                backend = backend.with_filter_guard(cfg.egress_netns.clone());
            } else {
                tracing::warn!(
                    "libvirt at {} is not on this host: agentvm's nwfilter guard (see agentvm_backend::filter_guard) is not installed there",
                    cfg.libvirt_uri
                );
            }
            let backend = Arc::new(backend);
            let images = Arc::new(ImageCache {
                dir: cfg.cache_dir.clone(),
            });
            controller = controller
                .egress(backend.clone())
                .vm_stats(BackendStatsSource::new(backend.clone()));
            controller =
                reconcilers::register(controller, backend, Arc::new(PoolRegistry::new()), images);
        }
        runtime.block_on(async move {
            let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
            let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(async move {
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                eprintln!("agentvm controller: shutting down (signal again to exit at once)");
                let _ = stop_tx.send(());
                tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
                eprintln!("agentvm controller: second signal, exiting now");
                std::process::exit(130);
            });
            controller
                .run(async {
                    let _ = stop_rx.await;
                })
                .await?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(0)
    }
}

impl ControllerArgs {
    /// What this node publishes to the cluster.
    fn node_info(&self, cfg: &Config) -> anyhow::Result<agentvm_store::cluster::NodeInfo> {
        let name = match &self.node {
            Some(n) => n.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .context("reading the host name (give --node NAME)")?,
        };
        if !agentvm_api::is_dns_label(&name) {
            anyhow::bail!(
                "--node {name:?}: a node name must be a DNS label (lower-case letters, digits and '-', at most 63)"
            );
        }
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib / 1024);
        Ok(agentvm_store::cluster::NodeInfo {
            name,
            vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_mib,
            // The configured choice (`auto`, `kvm`, `tcg`).
            accelerator: format!("{:?}", cfg.accelerator).to_lowercase(),
            version: env!("CARGO_PKG_VERSION").into(),
            joined_at: agentvm_api::Timestamp::now(),
        })
    }
}

/// True for libvirt URIs without a host part (`qemu:///system`, `qemu+unix:///system`): the
/// daemon runs on this host, so this host's iptables filter its guests.
fn libvirt_is_local(uri: &str) -> bool {
    uri.split_once("://")
        .is_some_and(|(_, rest)| rest.starts_with('/'))
}
