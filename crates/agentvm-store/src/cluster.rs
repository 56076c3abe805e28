//! A node's membership of a cluster: its registration under a lease, its heartbeat, and
//! the election of the node that reconciles.
//!
//! Each node holds one etcd lease (TTL [`NODE_LEASE_TTL`]). Its record
//! `<prefix>/nodes/<name>` (what it offers: vCPUs, memory, accelerator) is attached to the
//! lease, so it vanishes when the node stops renewing it. The node campaigns for
//! `<prefix>/leader` with the same lease.
//!
//! Cordon: `<prefix>/cordoned/<name>` (no lease; it outlives restarts) keeps a node from
//! campaigning; a cordoned leader steps down within a third of the lease (`agentvm drain`),
//! and another node takes over.
//!
//! Fencing: [`Membership::may_act`] is true only while this node is the leader and its
//! lease is known to be alive — measured on the monotonic clock from the last renewal etcd
//! confirmed, so a node that was stopped (SIGSTOP, a frozen VM) past its lease sees at once,
//! before anything else runs, that it may not act. A lost lease is never regained: the
//! node's controller stops (see [`Membership::lost`]) and a new start joins afresh.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::etcd::EtcdRecords;
use crate::{ClusterConfig, StoreError};
use agentvm_api::Timestamp;

/// Lifetime of a node's lease without renewal: a node that stops renewing is taken for lost
/// this long after its last renewal.
pub const NODE_LEASE_TTL: Duration = Duration::from_secs(10);

/// What a node offers and how it is doing, as other nodes see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node's name (`--node`).
    pub name: String,
    /// vCPUs of the host.
    pub vcpus: u32,
    /// Memory of the host, MiB.
    pub memory_mib: u64,
    /// `kvm` or `tcg`.
    pub accelerator: String,
    /// agentvm's version on the node.
    pub version: String,
    /// When the node joined (its current lease).
    pub joined_at: Timestamp,
}

/// A node as listed by [`Membership::nodes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeEntry {
    /// What the node published.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// True for the elected node, which reconciles.
    pub leader: bool,
    /// Seconds its lease has left (renewed every third of [`NODE_LEASE_TTL`]).
    pub lease_seconds_left: i64,
    /// True when cordoned: it does not lead (`agentvm cordon`, `agentvm drain`).
    #[serde(default)]
    pub cordoned: bool,
}

struct State {
    /// The lease is alive until then, as far as etcd last confirmed.
    alive_until: Instant,
    leader: bool,
    /// The election key this node holds while it leads (to resign with).
    leader_key: Option<etcd_client::LeaderKey>,
}

/// This node's membership; dropping it stops renewing (the lease then expires).
pub struct Membership {
    records: EtcdRecords,
    name: String,
    lease: i64,
    state: Arc<Mutex<State>>,
    lost: watch::Receiver<Option<String>>,
    leader_rx: watch::Receiver<bool>,
}

impl Membership {
    /// Registers `node` under a new lease, starts renewing it and campaigns for leadership.
    /// Fails when a live node of the same name is registered (two controllers must not
    /// share a name) or when the cluster does not answer.
    pub fn join(config: &ClusterConfig, node: NodeInfo) -> Result<Membership, StoreError> {
        let records = EtcdRecords::connect(config)?;
        let key = records.node_key(&node.name);
        let ttl = NODE_LEASE_TTL.as_secs() as i64;
        let client = records.client();
        let value = serde_json::to_vec(&node).unwrap_or_default();
        let (lease, registered) = {
            let key = key.clone();
            records.run(async move {
                let mut client = client;
                let lease = client.lease_grant(ttl, None).await?.id();
                let put = etcd_client::Txn::new()
                    .when(vec![etcd_client::Compare::version(
                        key.clone(),
                        etcd_client::CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![etcd_client::TxnOp::put(
                        key,
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    )]);
                let ok = client.txn(put).await?.succeeded();
                if !ok {
                    client.lease_revoke(lease).await?;
                }
                Ok((lease, ok))
            })?
        };
        if !registered {
            return Err(StoreError::Unavailable {
                endpoints: config.endpoints.join(","),
                message: format!(
                    "a live node named {:?} is already registered; give each controller its own --node name (or wait up to {} s for a stopped one's lease to expire)",
                    node.name,
                    NODE_LEASE_TTL.as_secs()
                ),
            });
        }
        let granted = Instant::now();
        let state = Arc::new(Mutex::new(State {
            alive_until: granted + NODE_LEASE_TTL,
            leader: false,
            leader_key: None,
        }));
        let (lost_tx, lost) = watch::channel(None);
        let (leader_tx, leader_rx) = watch::channel(false);
        let cordon = records.cordon_key(&node.name);
        records.spawn(keep_alive(
            records.client(),
            lease,
            cordon.clone(),
            state.clone(),
            lost_tx,
        ));
        records.spawn(campaign(
            records.client(),
            records.leader_key(),
            cordon,
            node.name.clone(),
            lease,
            state.clone(),
            leader_tx,
        ));
        tracing::info!(
            "cluster: joined as node {} (lease {lease:x}, {} s)",
            node.name,
            NODE_LEASE_TTL.as_secs()
        );
        Ok(Membership {
            records,
            name: node.name,
            lease,
            state,
            lost,
            leader_rx,
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this node leads (may act), and the seconds its lease has left as of the
    /// last renewal etcd confirmed.
    pub fn role(&self) -> (bool, u64) {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let left = s
            .alive_until
            .saturating_duration_since(Instant::now())
            .as_secs();
        (s.leader && left > 0, left)
    }

    /// True while this node is the leader and its lease is alive: only then may it start,
    /// change or remove anything.
    pub fn may_act(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.leader && Instant::now() < s.alive_until
    }

    /// Waits until this node is the leader.
    pub async fn leadership(&self) {
        let mut rx = self.leader_rx.clone();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until this node may no longer act: its lease was lost (not renewed in time,
    /// or expired in etcd), or it stepped down as leader because it was cordoned. Returns
    /// why.
    pub async fn lost(&self) -> String {
        let mut rx = self.lost.clone();
        loop {
            if let Some(why) = rx.borrow_and_update().clone() {
                return why;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Cordons node `node` (or lifts its cordon): a cordoned node does not lead; if it
    /// leads, it steps down. Returns false when no live node has that name (nothing
    /// changed).
    pub fn set_cordoned(&self, node: &str, cordoned: bool) -> Result<bool, StoreError> {
        let client = self.records.client();
        let (node_key, cordon_key) = (self.records.node_key(node), self.records.cordon_key(node));
        self.records.run(async move {
            let mut client = client;
            if client.get(node_key, None).await?.kvs().is_empty() {
                return Ok(false);
            }
            if cordoned {
                client.put(cordon_key, "1", None).await?;
            } else {
                client.delete(cordon_key, None).await?;
            }
            Ok(true)
        })
    }

    /// Every registered node, the leader marked.
    pub fn nodes(&self) -> Result<Vec<NodeEntry>, StoreError> {
        let client = self.records.client();
        let prefix = self.records.node_key("");
        let cordons = self.records.cordon_key("");
        let leader_key = self.records.leader_key();
        self.records.run(async move {
            let mut client = client;
            let leader = match client.leader(leader_key).await {
                Ok(resp) => resp
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                // No leader elected (yet).
                Err(_) => None,
            };
            let cordoned: Vec<String> = client
                .get(cordons.clone(), Some(GetOptions::new().with_prefix()))
                .await?
                .kvs()
                .iter()
                .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&cordons).map(String::from))
                .collect();
            let resp = client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await?;
            let mut out = Vec::new();
            for kv in resp.kvs() {
                let Ok(info) = serde_json::from_slice::<NodeInfo>(kv.value()) else {
                    continue;
                };
                let left = client.lease_time_to_live(kv.lease(), None).await?.ttl();
                out.push(NodeEntry {
                    cordoned: cordoned.contains(&info.name),
                    leader: leader.as_deref() == Some(info.name.as_str()),
                    info,
                    lease_seconds_left: left,
                });
            }
            out.sort_by(|a, b| a.info.name.cmp(&b.info.name));
            Ok(out)
        })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // Leave at once rather than when the lease runs out: the next leader takes over
        // without waiting. Best effort; the lease expires anyway.
        let client = self.records.client();
        let lease = self.lease;
        let _ = self.records.run(async move {
            let mut client = client;
            client.lease_revoke(lease).await.map(|_| ())
        });
    }
}

/// Renews the lease every third of its TTL; marks it lost when etcd says it expired or no
/// renewal was confirmed before it ran out.
async fn keep_alive(
    client: etcd_client::Client,
    lease: i64,
    cordon: String,
    state: Arc<Mutex<State>>,
    lost: watch::Sender<Option<String>>,
) {
    let mut client = client;
    let every = NODE_LEASE_TTL / 3;
    let alive_until =
        |state: &Mutex<State>| state.lock().unwrap_or_else(|e| e.into_inner()).alive_until;
    loop {
        if Instant::now() >= alive_until(&state) {
            break;
        }
        let sent = Instant::now();
        let renewed = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(ttl))) if ttl > 0 => {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                s.alive_until = sent + Duration::from_secs(ttl as u64);
            }
            Ok(Ok(_)) => {
                tracing::error!("cluster: this node's lease expired in etcd");
                break;
            }
            Ok(Err(e)) => tracing::warn!("cluster: renewing this node's lease: {e}"),
            Err(_) => tracing::warn!("cluster: renewing this node's lease: no answer"),
        }
        // A cordoned leader steps down: it stops acting now, then resigns.
        let leading = state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leader_key
            .clone();
        if let Some(key) = leading {
            let cordoned = tokio::time::timeout(every, client.get(cordon.clone(), None)).await;
            if let Ok(Ok(resp)) = cordoned {
                if !resp.kvs().is_empty() {
                    state.lock().unwrap_or_else(|e| e.into_inner()).leader = false;
                    let resign = etcd_client::ResignOptions::new().with_leader(key);
                    if let Err(e) = client.resign(Some(resign)).await {
                        tracing::warn!(
                            "cluster: resigning: {e}; the lease's end hands over instead"
                        );
                    }
                    tracing::warn!("cluster: this node is cordoned: it stepped down as leader");
                    let _ = lost.send(Some(
                        "this node was cordoned (drained) and stepped down as leader".into(),
                    ));
                    return;
                }
            }
        }
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
    {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.leader = false;
        s.alive_until = Instant::now();
    }
    tracing::error!("cluster: this node lost its lease; it may no longer act");
    let _ = lost.send(Some("this node lost its cluster lease".into()));
}

/// Campaigns until elected (each call waits at most the client's timeout, so it is
/// repeated; campaigning again with the same lease keeps the same place in line).
async fn campaign(
    client: etcd_client::Client,
    election: String,
    cordon: String,
    name: String,
    lease: i64,
    state: Arc<Mutex<State>>,
    leader: watch::Sender<bool>,
) {
    let mut client = client;
    loop {
        {
            let s = state.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() >= s.alive_until {
                return;
            }
        }
        // A cordoned node waits outside the election.
        match client.get(cordon.clone(), None).await {
            Ok(resp) if resp.kvs().is_empty() => {}
            Ok(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                tracing::debug!("cluster: reading this node's cordon: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        match client.campaign(election.clone(), name.clone(), lease).await {
            Ok(mut resp) => {
                {
                    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                    s.leader = true;
                    s.leader_key = resp.take_leader();
                }
                tracing::info!("cluster: node {name} is the leader");
                let _ = leader.send(true);
                return;
            }
            Err(e) => {
                tracing::debug!("cluster: campaigning: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
