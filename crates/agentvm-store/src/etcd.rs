//! Object records in an etcd v3 cluster: the store of a cluster of agentvm nodes.
//!
//! Records live under `<prefix>/objects/<Kind>/<name>`, one JSON value each, exactly as the
//! local file holds them. A conditional write is one etcd transaction comparing each key's
//! `mod_revision` (or, for a record that must not exist yet, its `version` with 0). Every
//! change — this node's and the others' — reaches subscribers through one etcd watch, in
//! the cluster's order; after the watch was broken it resumes from the last revision seen,
//! and when etcd compacted that revision away it re-lists and reports every record as
//! applied and every vanished one as removed.
//!
//! The store's calls are synchronous (see the crate docs): each etcd call runs on this
//! module's own small runtime while the caller waits, at most [`ClusterConfig::timeout`].
//! A cluster that does not answer (no quorum, every member down) fails the call with
//! [`StoreError::Unavailable`]; nothing is written and nothing is assumed.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use agentvm_api::Kind;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};

use crate::objects::{decode, Change, StoreEvent, StoredObject};
use crate::records::{RecordStore, Versioned, Write};
use crate::{Inner, Store, StoreError};

/// Most operations etcd allows in one transaction by default (`--max-txn-ops`).
const ETCD_MAX_TXN_OPS: usize = 128;

/// Records fetched per range request when listing.
const LIST_PAGE: i64 = 500;

/// How to reach the cluster store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client URLs (`http://10.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix of this agentvm cluster's data in etcd (`/agentvm`): several clusters, or
    /// other users, may share one etcd.
    pub prefix: String,
    /// Longest wait for one etcd call before it fails with [`StoreError::Unavailable`].
    pub timeout: Duration,
}

impl ClusterConfig {
    /// The cluster at `endpoints`, with the default prefix (`/agentvm`) and a 5 s timeout.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/agentvm".into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The runtime etcd calls run on; shut down without waiting when the store is dropped (the
/// store may be dropped on an async thread, where a blocking shutdown is not allowed).
struct BgRuntime(Option<tokio::runtime::Runtime>);

impl BgRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0
            .as_ref()
            .map(tokio::runtime::Runtime::handle)
            .unwrap_or_else(|| unreachable!("the runtime lives until drop"))
    }
}

impl Drop for BgRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Records in etcd; a cheap `Clone` handle.
#[derive(Clone)]
pub(crate) struct EtcdRecords {
    inner: Arc<EtcdInner>,
}

struct EtcdInner {
    rt: BgRuntime,
    client: Client,
    /// `<prefix>` without a trailing `/`.
    prefix: String,
    /// `<prefix>/objects/`.
    objects: String,
    endpoints: String,
    timeout: Duration,
}

impl EtcdRecords {
    /// Connects to the cluster and checks that it answers.
    pub(crate) fn connect(config: &ClusterConfig) -> Result<EtcdRecords, StoreError> {
        let endpoints = config.endpoints.join(",");
        let unavailable = |message: String| StoreError::Unavailable {
            endpoints: endpoints.clone(),
            message,
        };
        if config.endpoints.is_empty() {
            return Err(unavailable("no etcd endpoint given".into()));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| unavailable(format!("starting the etcd client's runtime: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), config.timeout);
        let eps = config.endpoints.clone();
        // Connecting may try each endpoint for up to the timeout. Waited for on a channel, not
        // with `block_on`, so that it may be called on an async thread too.
        let connect_wait = config.timeout * 2;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let r = tokio::time::timeout(connect_wait, Client::connect(eps, Some(options))).await;
            let _ = tx.send(r);
        });
        let client = rx
            .recv()
            .map_err(|_| unavailable("the etcd client stopped".into()))?
            .map_err(|_| unavailable("no answer while connecting".into()))?
            .map_err(|e| unavailable(format!("connecting: {e}")))?;
        let records = EtcdRecords {
            inner: Arc::new(EtcdInner {
                rt: BgRuntime(Some(rt)),
                client,
                prefix: config.prefix.trim_end_matches('/').to_string(),
                objects: format!("{}/objects/", config.prefix.trim_end_matches('/')),
                endpoints,
                timeout: config.timeout,
            }),
        };
        // Fails now, with a clear error, when no member answers.
        records.count()?;
        Ok(records)
    }

    fn unavailable(&self, message: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.inner.endpoints.clone(),
            message: message.into(),
        }
    }

    /// Runs `f` on the client's runtime and waits for it, at most the configured timeout.
    fn call<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.inner.timeout;
        self.inner.rt.handle().spawn(async move {
            let _ = tx.send(tokio::time::timeout(timeout, f).await);
        });
        match rx.recv() {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(self.unavailable(e.to_string())),
            Ok(Err(_)) => {
                Err(self.unavailable(format!("no answer within {} s", timeout.as_secs_f64())))
            }
            Err(_) => Err(self.unavailable("the etcd client stopped")),
        }
    }

    /// [`EtcdRecords::call`] for the cluster's other users (`cluster.rs`).
    pub(crate) fn run<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.call(f)
    }

    /// Runs `f` in the background on the client's runtime (until the last handle drops).
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.inner.rt.handle().spawn(f);
    }

    /// A handle on the etcd client.
    pub(crate) fn client(&self) -> Client {
        self.inner.client.clone()
    }

    /// The key of node `name`'s record (`<prefix>/nodes/<name>`).
    pub(crate) fn node_key(&self, name: &str) -> String {
        format!("{}/nodes/{name}", self.inner.prefix)
    }

    /// The key whose presence cordons node `name` (`<prefix>/cordoned/<name>`).
    pub(crate) fn cordon_key(&self, name: &str) -> String {
        format!("{}/cordoned/{name}", self.inner.prefix)
    }

    /// The election whose leader reconciles.
    pub(crate) fn leader_key(&self) -> String {
        format!("{}/leader", self.inner.prefix)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.inner.objects)
    }

    /// Delivers every change under the records' prefix to `store`'s observers and
    /// subscribers, from now on, until the store is dropped.
    pub(crate) fn watch(&self, store: &Store) -> Result<(), StoreError> {
        // The records now, and the revision they were read at: the watch starts after it.
        let (records, revision) = self.list_at(String::new())?;
        let known: HashSet<String> = records.into_iter().map(|(k, _)| k).collect();
        let watcher = Watcher {
            records: self.clone(),
            store: Arc::downgrade(&store.inner),
            known,
            next: revision + 1,
        };
        self.inner.rt.handle().spawn(watcher.run());
        Ok(())
    }

    /// Every record under `prefix` (relative to the objects' prefix) and the etcd revision
    /// the listing was read at (one consistent revision across pages).
    #[allow(clippy::type_complexity)]
    fn list_at(&self, prefix: String) -> Result<(Vec<(String, Versioned)>, i64), StoreError> {
        let client = self.inner.client.clone();
        let root = self.inner.objects.clone();
        self.call(async move { list_pages(client, &root, &prefix).await })
    }
}

/// Keys from `root` + `prefix` on, page by page at the first page's revision.
async fn list_pages(
    client: Client,
    root: &str,
    prefix: &str,
) -> Result<(Vec<(String, Versioned)>, i64), etcd_client::Error> {
    let mut kv = client.kv_client();
    let start = format!("{root}{prefix}");
    let end = prefix_end(start.as_bytes());
    let mut from = start.clone().into_bytes();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_limit(LIST_PAGE)
            .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Ascend);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = kv.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for item in resp.kvs() {
            let Ok(key) = item.key_str() else { continue };
            let Some(key) = key.strip_prefix(root) else {
                continue;
            };
            out.push((
                key.to_string(),
                Versioned {
                    bytes: item.value().to_vec(),
                    version: item.mod_revision() as u64,
                },
            ));
        }
        match (resp.more(), resp.kvs().last()) {
            (true, Some(last)) => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok((out, revision)),
        }
    }
}

/// The first key after every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl RecordStore for EtcdRecords {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let mut kv = self.inner.client.kv_client();
        let key = self.key(key);
        let resp = self.call(async move { kv.get(key, None).await })?;
        Ok(resp.kvs().first().map(|item| Versioned {
            bytes: item.value().to_vec(),
            version: item.mod_revision() as u64,
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.list_at(prefix.to_string())?.0)
    }

    fn count(&self) -> Result<u64, StoreError> {
        let mut kv = self.inner.client.kv_client();
        let root = self.inner.objects.clone();
        let resp = self.call(async move {
            kv.get(
                root,
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
        })?;
        Ok(resp.count().max(0) as u64)
    }

    fn commit(&self, writes: &[Write]) -> Result<bool, StoreError> {
        let mut compares = Vec::with_capacity(writes.len());
        let mut ops = Vec::with_capacity(writes.len());
        for w in writes {
            let key = self.key(&w.key);
            compares.push(match w.expected {
                None => Compare::version(key.clone(), CompareOp::Equal, 0),
                Some(rev) => Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    i64::try_from(rev).unwrap_or(i64::MAX),
                ),
            });
            ops.push(match &w.value {
                Some(bytes) => TxnOp::put(key, bytes.clone(), None),
                None => TxnOp::delete(key, None),
            });
        }
        let mut kv = self.inner.client.kv_client();
        let txn = Txn::new().when(compares).and_then(ops);
        Ok(self.call(async move { kv.txn(txn).await })?.succeeded())
    }

    fn max_writes(&self) -> usize {
        ETCD_MAX_TXN_OPS
    }

    fn watched(&self) -> bool {
        true
    }
}

/// The task that turns etcd's watch into store events.
struct Watcher {
    records: EtcdRecords,
    store: Weak<Inner>,
    /// Keys of the records that exist, as far as the watch has seen.
    known: HashSet<String>,
    /// The next revision to deliver.
    next: i64,
}

impl Watcher {
    async fn run(mut self) {
        let root = self.records.inner.objects.clone();
        loop {
            if self.store.strong_count() == 0 {
                return;
            }
            let mut client = self.records.inner.client.clone();
            let options = WatchOptions::new()
                .with_prefix()
                .with_prev_key()
                .with_progress_notify()
                .with_start_revision(self.next);
            let mut stream = match client.watch(root.clone(), Some(options)).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!("cluster store watch: {e}; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if resp.canceled() => {
                        if resp.compact_revision() > 0 {
                            tracing::warn!(
                                "cluster store watch: revision {} was compacted away; re-listing",
                                self.next
                            );
                            self.relist(&root).await;
                        }
                        break;
                    }
                    Ok(Some(resp)) => {
                        for event in resp.events() {
                            self.deliver(event, &root);
                        }
                        if let Some(h) = resp.header() {
                            // Progress notifications carry the revision reached.
                            if resp.events().is_empty() && h.revision() >= self.next {
                                self.next = h.revision() + 1;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("cluster store watch broke: {e}; resuming");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                }
                if self.store.strong_count() == 0 {
                    return;
                }
            }
        }
    }

    fn emit(&self, event: StoreEvent) {
        if let Some(inner) = self.store.upgrade() {
            Store { inner }.emit_watched(event);
        }
    }

    fn deliver(&mut self, event: &etcd_client::Event, root: &str) {
        let Some(kv) = event.kv() else { return };
        self.next = self.next.max(kv.mod_revision() + 1);
        let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(root)) else {
            return;
        };
        let Some((kind, name)) = parse_key(key) else {
            return;
        };
        let change = match event.event_type() {
            EventType::Delete => {
                self.known.remove(key);
                Change::Removed
            }
            EventType::Put => {
                self.known.insert(key.to_string());
                let prev = event.prev_kv().and_then(|p| decode(key, p.value()).ok());
                match decode(key, kv.value()) {
                    Ok(new) => classify(prev.as_ref(), &new),
                    Err(_) => Change::Applied,
                }
            }
        };
        self.emit(StoreEvent {
            kind,
            name: name.to_string(),
            change,
        });
    }

    /// After events were lost: every record is reported applied, every record that
    /// vanished removed, and the watch goes on from the listing's revision.
    async fn relist(&mut self, root: &str) {
        let client = self.records.inner.client.clone();
        let listed = loop {
            match list_pages(client.clone(), root, "").await {
                Ok(listed) => break listed,
                Err(e) => {
                    tracing::warn!("cluster store: re-listing after a compaction: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                } // The store may be gone meanwhile.
            }
        };
        let (records, revision) = listed;
        let now: HashSet<String> = records.iter().map(|(k, _)| k.clone()).collect();
        for gone in self.known.difference(&now) {
            if let Some((kind, name)) = parse_key(gone) {
                self.emit(StoreEvent {
                    kind,
                    name: name.to_string(),
                    change: Change::Removed,
                });
            }
        }
        for key in &now {
            if let Some((kind, name)) = parse_key(key) {
                self.emit(StoreEvent {
                    kind,
                    name: name.to_string(),
                    change: Change::Applied,
                });
            }
        }
        self.known = now;
        self.next = revision + 1;
    }
}

/// `Kind/name` → its parts.
fn parse_key(key: &str) -> Option<(Kind, &str)> {
    let (kind, name) = key.split_once('/')?;
    Some((kind.parse().ok()?, name))
}

/// What a write changed, from the record before and after it.
fn classify(prev: Option<&StoredObject>, new: &StoredObject) -> Change {
    let Some(prev) = prev else {
        return Change::Applied;
    };
    if prev.deletion_requested_at.is_none() && new.deletion_requested_at.is_some() {
        return Change::DeleteRequested;
    }
    let same_declaration = prev.resource.metadata() == new.resource.metadata()
        && prev.resource.spec_json() == new.resource.spec_json()
        && prev.manager == new.manager
        && prev.submitter == new.submitter
        && prev.deletion_requested_at == new.deletion_requested_at;
    if same_declaration {
        Change::StatusChanged
    } else {
        Change::Applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(
            prefix_end(b"/agentvm/objects/"),
            b"/agentvm/objects0".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn keys_name_kind_and_object() {
        assert_eq!(parse_key("VmPool/a"), Some((Kind::VmPool, "a")));
        assert_eq!(parse_key("Nope/a"), None);
        assert_eq!(parse_key("VmPool"), None);
    }
}
