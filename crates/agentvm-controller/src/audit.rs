//! `AuditLog`: the JSON-lines record of every lifecycle event (objects applied and deleted,
//! VMs created, reset and destroyed, runs started and finished, anomalies, drift repaired).
//!
//! # Guarantees
//! - One event is one line, written with a single `write(2)` on a file opened `O_APPEND`,
//!   then `fdatasync`ed before [`AuditLog::write`] returns: a crash loses at most the line
//!   being written. A torn last line left by a crash is ended with a newline when the log
//!   is reopened, and [`read_events`] skips lines that do not parse.
//! - The file is capped: a line that would take it past `max_bytes` first rotates it
//!   (`audit.log` → `audit.log.1` → … → `audit.log.<keep>`, the oldest dropped).
//! - Secrets never reach the file: every string in an event has each registered secret
//!   value ([`AuditLog::add_secrets`]) replaced by `[REDACTED]`, and string values under
//!   keys that name a secret (`password`, `token`, `secret`, `apiKey`, ...) are replaced
//!   whole.
//! - The file is created mode 0600.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use tokio::sync::broadcast;

use crate::metrics::Metrics;
use agentvm_api::time::Timestamp;
use agentvm_store::{Change, Store, StoreEvent};

/// The audit log's file name in the state directory.
pub const AUDIT_FILE: &str = "audit.log";
/// Default size cap of the audit log (64 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Rotated files kept (`audit.log.1` .. `audit.log.3`).
pub const KEEP_ROTATED: usize = 3;
/// What a redacted secret is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditEventType {
    /// An object was created or its spec, metadata or manager changed.
    ObjectApplied,
    /// An object's deletion was requested, or it was removed (`details.stage`).
    ObjectDeleted,
    /// A VM (libvirt domain) was created.
    VmCreated,
    /// A VM was reset to its golden state.
    VmReset,
    /// A VM was destroyed.
    VmDestroyed,
    /// A run started executing in a VM.
    RunStarted,
    /// A run ended (`details.phase`).
    RunFinished,
    /// Anomalous behaviour was detected in a VM.
    Anomaly,
    /// Actual state that drifted from the declared state was repaired.
    DriftRepaired,
    /// A guest connection through the egress proxy ended (allowed or refused; `details`:
    /// name, address, port, verdict, bytes each way, duration).
    Egress,
    /// A pool VM was claimed by a sandbox (`details.pool`).
    VmClaimed,
    /// A sandbox was made as a fork of a snapshot (`details.snapshot`, `sandbox`,
    /// `sourcePauseMs`, `tookMs`).
    SandboxForked,
    /// A sandbox's VM changed power state (`details.from`, `to`, `reason`).
    SandboxPower,
    /// A command was run in a sandbox (`details.command`, `exitCode`).
    SandboxExec,
    /// A snapshot of a sandbox was taken (`details.sandbox`, `memoryBytes`, `pauseMs`).
    SnapshotTaken,
    /// A sandbox was rolled back to a snapshot, or the rollback refused (`details`).
    SandboxRollback,
}

impl AuditEventType {
    /// The snake_case name written in the log (`object_applied`).
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEventType::ObjectApplied => "object_applied",
            AuditEventType::ObjectDeleted => "object_deleted",
            AuditEventType::VmCreated => "vm_created",
            AuditEventType::VmReset => "vm_reset",
            AuditEventType::VmDestroyed => "vm_destroyed",
            AuditEventType::RunStarted => "run_started",
            AuditEventType::RunFinished => "run_finished",
            AuditEventType::Anomaly => "anomaly",
            AuditEventType::DriftRepaired => "drift_repaired",
            AuditEventType::Egress => "egress",
            AuditEventType::VmClaimed => "vm_claimed",
            AuditEventType::SandboxForked => "sandbox_forked",
            AuditEventType::SandboxPower => "sandbox_power",
            AuditEventType::SandboxExec => "sandbox_exec",
            AuditEventType::SnapshotTaken => "snapshot_taken",
            AuditEventType::SandboxRollback => "sandbox_rollback",
        }
    }
}

impl fmt::Display for AuditEventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When (RFC 3339, UTC).
    pub timestamp: Timestamp,
    /// What happened.
    pub event_type: AuditEventType,
    /// Kind of the object concerned (`VmPool`, `AgentRun`).
    pub kind: String,
    /// Its name.
    pub name: String,
    /// The VM concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<String>,
    /// Who caused it: the user who applied or deleted the object (`uid=1000(alice)`, from
    /// the API socket's peer credentials; the spec directory's owner for its files), or
    /// `controller` for what the controller does by itself.
    pub actor: String,
    /// Through what: the object's manager (`api (agentvm apply)`, `spec-dir file x.yaml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Event-specific fields (a JSON object).
    #[serde(default)]
    pub details: Value,
}

impl AuditEvent {
    /// An event now, without VM or details.
    pub fn new(
        event_type: AuditEventType,
        kind: impl fmt::Display,
        name: impl Into<String>,
        actor: impl Into<String>,
    ) -> Self {
        Self {
            timestamp: Timestamp::now(),
            event_type,
            kind: kind.to_string(),
            name: name.into(),
            vm_id: None,
            actor: actor.into(),
            tool: None,
            details: Value::Object(Default::default()),
        }
    }

    /// Sets the VM.
    pub fn vm(mut self, vm_id: impl Into<String>) -> Self {
        self.vm_id = Some(vm_id.into());
        self
    }

    /// Sets the tool (the object's manager).
    pub fn tool(mut self, tool: impl Into<String>) -> Self {
        self.tool = Some(tool.into());
        self
    }

    /// Sets the details (a JSON object).
    pub fn details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }
}

/// Keys whose string values are always redacted (compared lowercase, without `_`/`-`).
const SECRET_KEYS: [&str; 7] = [
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "credential",
    "privatekey",
];

fn is_secret_key(key: &str) -> bool {
    let k: String = key
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_KEYS.iter().any(|s| k.ends_with(s))
}

fn scrub(text: &str, secrets: &BTreeSet<String>) -> Option<String> {
    let mut out: Option<String> = None;
    for s in secrets {
        let cur = out.as_deref().unwrap_or(text);
        if cur.contains(s.as_str()) {
            out = Some(cur.replace(s.as_str(), REDACTED));
        }
    }
    out
}

/// Replaces every occurrence of a secret value in `value`'s strings (and object keys), and
/// string values under secret-naming keys.
pub fn redact(value: &mut Value, secrets: &BTreeSet<String>) {
    match value {
        Value::String(s) => {
            if let Some(clean) = scrub(s, secrets) {
                *s = clean;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, secrets)),
        Value::Object(map) => {
            let entries = std::mem::take(map);
            for (key, mut v) in entries {
                if is_secret_key(&key) && v.is_string() {
                    v = Value::String(REDACTED.into());
                } else {
                    redact(&mut v, secrets);
                }
                map.insert(scrub(&key, secrets).unwrap_or(key), v);
            }
        }
        _ => {}
    }
}

/// The audit log; [`AuditLog::disabled`] writes nothing. Cheap to clone (shared file and
/// redaction list).
#[derive(Clone, Default)]
pub struct AuditLog {
    writer: Option<Arc<Mutex<Writer>>>,
    secrets: Arc<RwLock<BTreeSet<String>>>,
    metrics: Option<Metrics>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path())
            .finish_non_exhaustive()
    }
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    keep: usize,
}

fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::PermissionsExt;
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)?;
    // Also a log that an older version or a hand left readable to others.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl Writer {
    fn open(path: &Path, max_bytes: u64, keep: usize) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = open_append(path)?;
        let mut size = file.metadata()?.len();
        if size > 0 {
            // End a line torn by a crash, so the next event starts on its own line.
            let mut last = [0u8; 1];
            file.seek(SeekFrom::Start(size - 1))?;
            file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                file.write_all(b"\n")?;
                file.sync_data()?;
                size += 1;
            }
        }
        Ok(Writer {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes: max_bytes.max(1),
            keep,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                match std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, rotated(&self.path, 1))?;
        }
        self.file = open_append(&self.path)?;
        self.size = 0;
        sync_dir(&self.path);
        Ok(())
    }

    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.size > 0 && self.size.saturating_add(len) > self.max_bytes {
            self.rotate()?;
        }
        // One write(2) for the whole line; the kernel writes a regular file's O_APPEND
        // write completely unless the disk is full or a signal interrupts it, and then the
        // rest follows.
        let n = self.file.write(line)?;
        if n < line.len() {
            self.file.write_all(&line[n..])?;
        }
        self.size += len;
        self.file.sync_data()
    }
}

impl AuditLog {
    /// An audit log that writes nothing (tests, tools).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Opens (creating it and its directory) the audit log at `path`, rotated past
    /// `max_bytes`, keeping `keep` rotated files.
    pub fn open(path: impl AsRef<Path>, max_bytes: u64, keep: usize) -> io::Result<Self> {
        let w = Writer::open(path.as_ref(), max_bytes, keep)?;
        Ok(Self {
            writer: Some(Arc::new(Mutex::new(w))),
            ..Self::default()
        })
    }

    /// Counts written events and failures in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The file written, `None` when disabled.
    pub fn path(&self) -> Option<PathBuf> {
        let w = self.writer.as_ref()?;
        Some(w.lock().unwrap_or_else(|e| e.into_inner()).path.clone())
    }

    /// Registers secret values (a run's secret environment, tokens) to scrub from every
    /// later event. Empty values are ignored.
    pub fn add_secrets<I, S>(&self, values: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        set.extend(values.into_iter().map(Into::into).filter(|s| !s.is_empty()));
    }

    /// Forgets secret values registered with [`AuditLog::add_secrets`].
    pub fn remove_secrets<I, S>(&self, values: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        for v in values {
            set.remove(&v.into());
        }
    }

    /// `event` as the line that would be written (redacted, with the newline).
    pub fn line(&self, mut event: AuditEvent) -> Vec<u8> {
        let secrets = self.secrets.read().unwrap_or_else(|e| e.into_inner());
        redact(&mut event.details, &secrets);
        for s in [&mut event.kind, &mut event.name, &mut event.actor]
            .into_iter()
            .chain(event.vm_id.as_mut())
            .chain(event.tool.as_mut())
        {
            if let Some(clean) = scrub(s, &secrets) {
                *s = clean;
            }
        }
        let mut line = serde_json::to_vec(&event).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Writes `event` durably (see the module docs). Blocks for an `fdatasync`: call from a
    /// blocking thread (reconcilers run on one).
    pub fn write(&self, event: AuditEvent) -> io::Result<()> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        let event_type = event.event_type;
        let line = self.line(event);
        let result = w.lock().unwrap_or_else(|e| e.into_inner()).append(&line);
        if let Some(m) = &self.metrics {
            match &result {
                Ok(()) => m.audit_written(event_type.as_str()),
                Err(_) => m.audit_failed(),
            }
        }
        result
    }

    /// [`AuditLog::write`], logging a failure instead of returning it.
    pub fn record(&self, event: AuditEvent) {
        let what = format!("{} {}/{}", event.event_type, event.kind, event.name);
        if let Err(e) = self.write(event) {
            tracing::error!("audit log: writing {what} failed: {e}");
        }
    }
}

/// Writes an `object_applied` or `object_deleted` event for every object change in `store`
/// (from `events`, subscribed by the caller before anything could change), with the user who
/// applied or deleted it as actor and its manager as tool, until `shutdown` resolves. Status changes are not logged (reconcilers
/// log what they do to the world).
pub async fn record_store_events(
    store: Store,
    audit: AuditLog,
    mut events: broadcast::Receiver<StoreEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => return,
            e = events.recv() => e,
        };
        let event = match event {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("audit log: missed {n} store events");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let (store, audit) = (store.clone(), audit.clone());
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(e) = store_event(&store, &event) {
                audit.record(e);
            }
        })
        .await;
    }
}

/// The audit event of one store change, `None` for status changes.
fn store_event(store: &Store, event: &StoreEvent) -> Option<AuditEvent> {
    let (event_type, stage) = match event.change {
        Change::Applied => (AuditEventType::ObjectApplied, None),
        Change::DeleteRequested => (AuditEventType::ObjectDeleted, Some("requested")),
        Change::Removed => (AuditEventType::ObjectDeleted, Some("removed")),
        Change::StatusChanged => return None,
    };
    let obj = store.get(event.kind, &event.name).ok().flatten();
    let who = |c: Option<&agentvm_store::caller::Caller>| {
        c.map_or_else(|| "unknown".to_string(), ToString::to_string)
    };
    let (actor, tool) = match (&obj, event.change) {
        (_, Change::Removed) => ("controller".to_string(), None),
        (Some(o), Change::DeleteRequested) => (
            who(o.deletion_requested_by.as_ref()),
            Some(o.manager.to_string()),
        ),
        (Some(o), _) => (who(o.submitter.as_ref()), Some(o.manager.to_string())),
        (None, _) => ("unknown".to_string(), None),
    };
    let mut details = serde_json::Map::new();
    if let Some(o) = &obj {
        details.insert("generation".into(), o.generation().into());
    }
    if let Some(stage) = stage {
        details.insert("stage".into(), stage.into());
    }
    let mut e = AuditEvent::new(event_type, event.kind, event.name.clone(), actor);
    e.tool = tool;
    Some(e.details(Value::Object(details)))
}

/// The events of the audit log at `path`, oldest first, skipping lines that do not parse
/// (a line torn by a crash).
pub fn read_events(path: &Path) -> io::Result<Vec<AuditEvent>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str) -> AuditEvent {
        AuditEvent::new(
            AuditEventType::ObjectApplied,
            "VmPool",
            name,
            "uid=1000(alice)",
        )
        .tool("api (agentvm apply)")
        .details(json!({"generation": 1}))
    }

    #[test]
    fn each_event_is_one_parseable_line_with_the_documented_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(AUDIT_FILE);
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, KEEP_ROTATED).unwrap();
        log.write(event("p1")).unwrap();
        log.write(
            AuditEvent::new(AuditEventType::VmReset, "VmPool", "p1", "controller")
                .vm("p1-0")
                .details(json!({"strategy": "loadvm", "seconds": 0.4})),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(text.ends_with('\n'));
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["event_type"], "object_applied");
        assert_eq!(first["kind"], "VmPool");
        assert_eq!(first["name"], "p1");
        assert_eq!(first["actor"], "uid=1000(alice)");
        assert_eq!(first["tool"], "api (agentvm apply)");
        assert_eq!(first["details"]["generation"], 1);
        assert!(first.get("vm_id").is_none());
        assert!(lines[1].contains("\"actor\":\"controller\"") && !lines[1].contains("tool"));
        let ts = first["timestamp"].as_str().unwrap();
        assert!(Timestamp::parse(ts).is_some() && ts.ends_with('Z'), "{ts}");
        let second: Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["event_type"], "vm_reset");
        assert_eq!(second["vm_id"], "p1-0");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Every event type has its snake_case name.
        for t in [
            AuditEventType::ObjectDeleted,
            AuditEventType::VmCreated,
            AuditEventType::VmDestroyed,
            AuditEventType::RunStarted,
            AuditEventType::RunFinished,
            AuditEventType::Anomaly,
            AuditEventType::DriftRepaired,
            AuditEventType::Egress,
        ] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }

    #[test]
    fn a_torn_last_line_is_ended_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, KEEP_ROTATED).unwrap();
        log.write(event("before")).unwrap();
        drop(log);
        // A crash in the middle of a write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"timestamp\":\"2025-").unwrap();
        drop(f);
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, KEEP_ROTATED).unwrap();
        log.write(event("after")).unwrap();
        let names: Vec<String> = read_events(&path)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["before", "after"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 3);
    }

    #[test]
    fn rotation_caps_the_size_and_keeps_three_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let line_len = AuditLog::disabled().line(event("n-000")).len() as u64;
        // Room for 4 lines per file.
        let log = AuditLog::open(&path, line_len * 4, KEEP_ROTATED).unwrap();
        for i in 0..30 {
            log.write(event(&format!("n-{i:03}"))).unwrap();
        }
        let mut all = Vec::new();
        for p in [
            rotated(&path, 3),
            rotated(&path, 2),
            rotated(&path, 1),
            path.clone(),
        ] {
            let len = std::fs::metadata(&p).unwrap().len();
            assert!(len <= line_len * 4, "{} is {len} bytes", p.display());
            all.extend(read_events(&p).unwrap().into_iter().map(|e| e.name));
        }
        assert!(!rotated(&path, 4).exists());
        // The newest 14 events survive, in order: 3 full rotated files and 2 current lines.
        let expected: Vec<String> = (16..30).map(|i| format!("n-{i:03}")).collect();
        assert_eq!(all, expected);
        // Reopening continues with the current file's size.
        drop(log);
        let log = AuditLog::open(&path, line_len * 4, KEEP_ROTATED).unwrap();
        log.write(event("n-030")).unwrap();
        log.write(event("n-031")).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 4);
        log.write(event("n-032")).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 1);
    }

    #[test]
    fn secrets_never_reach_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let metrics = Metrics::new();
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, KEEP_ROTATED)
            .unwrap()
            .with_metrics(metrics.clone());
        let secret = "sk-ant-THIS-IS-SECRET-42";
        log.add_secrets([secret, ""]);
        log.write(
            AuditEvent::new(AuditEventType::RunStarted, "AgentRun", "r1", "controller")
                .vm("p-0")
                .details(json!({
                    "command": format!("curl -H 'x-api-key: {secret}' https://api"),
                    "env": {"ANTHROPIC_API_KEY": secret, "HOME": "/root"},
                    "argv": ["--key", secret],
                    secret: "a secret used as a key",
                    "password": "hunter2",
                    "api_token": "tok-123",
                    "secretEnv": ["ANTHROPIC_API_KEY"],
                })),
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(secret), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("tok-123"), "{text}");
        let e = &read_events(&path).unwrap()[0];
        assert_eq!(e.details["env"]["ANTHROPIC_API_KEY"], REDACTED);
        assert_eq!(e.details["env"]["HOME"], "/root");
        assert_eq!(e.details["argv"][1], REDACTED);
        assert_eq!(
            e.details["command"],
            "curl -H 'x-api-key: [REDACTED]' https://api"
        );
        // Names of secret variables are not secret.
        assert_eq!(e.details["secretEnv"][0], "ANTHROPIC_API_KEY");
        assert!(metrics
            .render()
            .contains("agentvm_audit_events_total{event_type=\"run_started\"} 1"));
        // Forgotten secrets are no longer scrubbed (a run ended; its values may be reused).
        log.remove_secrets([secret]);
        assert!(String::from_utf8(log.line(event(secret)))
            .unwrap()
            .contains(secret));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_changes_are_audited_with_their_submitter_and_manager() {
        use agentvm_store::{ApplyOptions, Manager, STORE_FILE};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        let path = dir.path().join(AUDIT_FILE);
        let log = AuditLog::open(&path, DEFAULT_MAX_BYTES, KEEP_ROTATED).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(record_store_events(
            store.clone(),
            log,
            store.subscribe(),
            async {
                let _ = rx.await;
            },
        ));
        let lines = |n: usize| {
            let path = path.clone();
            async move {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                loop {
                    let events = read_events(&path).unwrap_or_default();
                    if events.len() >= n {
                        return events;
                    }
                    assert!(std::time::Instant::now() < deadline, "{events:?}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        };
        let image: agentvm_api::Resource =
            agentvm_api::Image::new("img", agentvm_api::ImageSpec::default()).into();
        store
            .apply(image, Manager::Api, ApplyOptions::default())
            .unwrap();
        store
            .update_status_json(agentvm_api::Kind::Image, "img", json!({"phase": "Ready"}))
            .unwrap();
        lines(1).await;
        let bob = agentvm_store::caller::Caller {
            uid: 1001,
            gid: 1001,
            groups: vec![],
            user: Some("bob".into()),
        };
        store
            .request_delete_as(agentvm_api::Kind::Image, "img", None, Some(&bob))
            .unwrap();
        lines(2).await;
        store
            .finalize_delete(agentvm_api::Kind::Image, "img")
            .unwrap();
        let events = lines(3).await;
        tx.send(()).unwrap();
        task.await.unwrap();
        type Row<'a> = (AuditEventType, &'a str, Option<&'a str>, Option<&'a str>);
        let summary: Vec<Row> = events
            .iter()
            .map(|e| {
                (
                    e.event_type,
                    e.actor.as_str(),
                    e.tool.as_deref(),
                    e.details.get("stage").and_then(Value::as_str),
                )
            })
            .collect();
        let api = Manager::Api.to_string();
        assert_eq!(
            summary,
            [
                (
                    AuditEventType::ObjectApplied,
                    "uid=0(root)",
                    Some(api.as_str()),
                    None
                ),
                (
                    AuditEventType::ObjectDeleted,
                    "uid=1001(bob)",
                    Some(api.as_str()),
                    Some("requested")
                ),
                (
                    AuditEventType::ObjectDeleted,
                    "controller",
                    None,
                    Some("removed")
                ),
            ]
        );
        assert!(events.iter().all(|e| e.kind == "Image"));
        assert_eq!(events[0].details["generation"], 1);
    }

    #[test]
    fn a_disabled_log_writes_nothing() {
        let log = AuditLog::disabled();
        assert_eq!(log.path(), None);
        log.write(event("x")).unwrap();
    }
}
