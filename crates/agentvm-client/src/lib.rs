//! The controller API: HTTP/1.1 + JSON on a Unix socket, used by the CLI for apply, delete,
//! get, watch and logs. agentvm-controller's `api::server` serves it; [`Client`] calls it;
//! this crate holds the wire types both sides share.
//!
//! A crate of its own rather than part of agentvm-api: the responses carry the store's
//! records ([`StoredObject`], [`ApplyOutcome`]), and agentvm-api stays free of I/O.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /healthz` | [`Health`] |
//! | `POST /v1/apply` | [`ApplyRequest`] → [`ApplyResponse`]; 422 [`ErrorBody`] when any object is invalid (nothing applied); 413 over 8 MiB |
//! | `GET /v1/objects?kind=K&selector=S` | `[StoredObject]`, sorted |
//! | `GET /v1/objects/{kind}/{name}` | `StoredObject`, or 404 |
//! | `DELETE /v1/objects/{kind}/{name}?force=true` | [`DeleteResponse`]; 404; 409 when another source manages it |
//! | `GET /v1/watch?kind=K&initial=true` | newline-delimited [`WatchEvent`]s, until the client hangs up |
//! | `GET /v1/runs/{name}/logs?offset=N&follow=true` | the run's output (stdout and stderr interleaved), chunked; `follow` streams until the run ends |
//! | `GET /v1/specdir/errors` | [`SpecDirResponse`] |
//! | `POST /v1/nodes/{name}/cordon` | [`CordonRequest`] → [`NodesResponse`]; root only; 404 for no live node of that name, 409 on a single host |
//! | `GET /v1/nodes` | [`NodesResponse`]: the cluster's nodes, the leader marked; 503 when the cluster store does not answer |
//! | `POST /v1/sandboxes/{name}/exec` | [`SandboxExecRequest`] → newline-delimited [`ExecEvent`]s (output as it comes, then the exit); 409 when the sandbox is not wanted running |
//! | `PUT /v1/sandboxes/{name}/files?path=P&mode=644` | the body (streamed) becomes guest file `P`; `{"bytes": N}` |
//! | `GET /v1/sandboxes/{name}/files?path=P` | guest file `P` as [`attach`] frames: data, then its size or an error |
//! | `POST /v1/sandboxes/{name}/forward?port=N` | upgraded to `agentvm-forward`: the connection's bytes to and from `127.0.0.1:N` in the guest |
//! | `POST /v1/sandboxes/{name}/attach` | upgraded to `agentvm-exec`: an interactive exec (stdin, terminal, resize) in [`attach`] frames, the first one an [`AttachRequest`] |
//! | `POST /v1/sandboxes/{name}/rollback` | [`SandboxRollbackRequest`] → the `StoredObject` with `spec.rollback` set; 404 without the snapshot, 409 when it is not a ready snapshot of this sandbox |
//! | `POST /v1/sandboxes/{name}/state` | [`SandboxStateRequest`] → the `StoredObject` with `spec.state` changed (and an idle-stopped sandbox woken for `Running`) |
//!
//! `{kind}` accepts every spelling of a kind (`VmPool`, `vmpools`, `pool`). Errors are
//! [`ErrorBody`] with a status code: 400 bad request, 404 not found, 405 wrong method (with
//! `Allow`), 408 body not sent within 30 s, 409 conflict, 413 too large (also when only
//! announced by `Content-Length`), 415 a body that is not `application/json`, 422 invalid
//! objects, 500 store failure, 507 the store's disk is full. A client that does not send its
//! request head within 10 s is disconnected; at most 256 connections are served at once.

pub mod client;

pub use client::{Client, ClientError, ExecStream, Logs, Response, WatchStream};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentvm_api::Timestamp;
use agentvm_store::{ApplyOutcome, StoredObject};
use serde::{Deserialize, Serialize};

/// Environment variable overriding the socket path.
pub const SOCKET_ENV: &str = "AGENTVM_SOCKET";
/// Socket file name inside the state directory.
pub const SOCKET_FILE: &str = "agentvm.sock";
/// Largest request body accepted: 8 MiB.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Header of a logs response: the offset to continue from.
pub const NEXT_OFFSET_HEADER: &str = "x-agentvm-next-offset";
/// Header of a logs response: `true` when output past the per-run cap was dropped.
pub const TRUNCATED_HEADER: &str = "x-agentvm-truncated";

/// The socket: `$AGENTVM_SOCKET`, else `<state_dir>/agentvm.sock` (the configuration's
/// `stateDir`).
pub fn default_socket(state_dir: &Path) -> PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => state_dir.join(SOCKET_FILE),
    }
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// Always true when the controller answers.
    pub ok: bool,
    /// The controller's version.
    pub version: String,
    /// Objects in the store.
    pub objects: u64,
    /// The watched spec directory, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_dir: Option<PathBuf>,
}

/// `POST /v1/apply`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRequest {
    /// The objects, as JSON (`apiVersion`, `kind`, `metadata`, `spec`).
    pub objects: Vec<serde_json::Value>,
    /// Where each object came from (`file:line`), same order; used in messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// Report what would happen; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Take objects over from another manager (e.g. the spec directory).
    #[serde(default)]
    pub force: bool,
}

/// The outcome for one object of an apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// The kind (canonical name).
    pub kind: String,
    /// The name.
    pub name: String,
    /// What happened, when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ApplyOutcome>,
    /// Why it failed (e.g. managed by another source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where it was declared, as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Response to `POST /v1/apply`: one result per object, in request order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    /// Per object.
    pub results: Vec<ApplyResult>,
    /// True when nothing was written.
    pub dry_run: bool,
}

/// Response to `DELETE /v1/objects/{kind}/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteResponse {
    /// The kind (canonical name).
    pub kind: String,
    /// The name.
    pub name: String,
    /// True once deletion is requested; the object goes away when its reconciler has
    /// cleaned up.
    pub deletion_requested: bool,
}

/// An error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// Per-object or per-field details (`file:line: spec.x: message`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// What a watch event reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchChange {
    /// The object existed when the watch started (`initial=true`).
    Initial,
    /// Created, or its spec, metadata or manager changed.
    Applied,
    /// Its status changed.
    StatusChanged,
    /// Its deletion was requested.
    DeleteRequested,
    /// It is gone.
    Removed,
    /// The watch fell behind and missed events: re-list.
    Lagged,
}

/// One line of `GET /v1/watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchEvent {
    /// What happened.
    pub change: WatchChange,
    /// The object's kind (absent for `Lagged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<agentvm_api::Kind>,
    /// The object's name (absent for `Lagged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The object as it is now (absent once removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Box<StoredObject>>,
}

/// Response to `GET /v1/specdir/errors`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDirResponse {
    /// The spec directory's state, or `None` when the controller watches none.
    pub spec_dir: Option<SpecDirState>,
}

/// Response to `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodesResponse {
    /// False for a single-host controller (no `--cluster`): it has no nodes to list.
    pub cluster: bool,
    /// The registered nodes, by name.
    pub nodes: Vec<agentvm_store::cluster::NodeEntry>,
}

/// Body of `POST /v1/nodes/{name}/cordon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CordonRequest {
    /// True to cordon (the node does not lead; a leading node steps down), false to lift it.
    pub cordoned: bool,
}

/// A label selector, Kubernetes equality-based syntax: `a=b,c!=d,e,!f`
/// (`==` is accepted for `=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e,!f`; empty matches everything.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let key = match &req {
                Requirement::Equals(k, _)
                | Requirement::NotEquals(k, _)
                | Requirement::Exists(k)
                | Requirement::NotExists(k) => k,
            };
            if key.is_empty() || key.contains(|c: char| c.is_whitespace() || "=!".contains(c)) {
                return Err(format!(
                    "invalid label selector {part:?}: use key=value, key!=value, key or !key, separated by commas"
                ));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    /// True when `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors() {
        let labels: BTreeMap<String, String> = [
            ("tier".to_string(), "untrusted".to_string()),
            ("team".into(), "a".into()),
        ]
        .into_iter()
        .collect();
        for (sel, want) in [
            ("", true),
            ("tier=untrusted", true),
            ("tier==untrusted,team=a", true),
            ("tier=trusted", false),
            ("tier!=trusted", true),
            ("team", true),
            ("!team", false),
            ("!owner", true),
            ("owner", false),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).unwrap().matches(&labels),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("=x").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }
}

/// Problems of one manifest file in the spec directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDirReport {
    /// The file, relative to the spec directory.
    pub file: String,
    /// Each problem as `file:line:column: field: message`.
    pub errors: Vec<String>,
}

/// What the spec-dir source last saw; served by `GET /v1/specdir/errors`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecDirState {
    /// The watched directory.
    pub dir: PathBuf,
    /// When the last pass finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Timestamp>,
    /// Manifest files seen by the last pass.
    pub files: usize,
    /// Objects declared by the valid files.
    pub objects: usize,
    /// Files with problems, by path.
    pub reports: Vec<SpecDirReport>,
    /// A problem with the directory itself (cannot be listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/sandboxes/{name}/exec`: one command in a running sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxExecRequest {
    /// Program and arguments (the program is looked up in the guest's `PATH`).
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Kill the command after this many seconds (default 300, at most 86400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// Longest `timeoutSeconds` of a sandbox exec (one day).
pub const MAX_SANDBOX_EXEC_SECONDS: u64 = 86_400;

/// One line of an exec response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExecEvent {
    /// Bytes the command wrote to standard output (base64).
    Stdout(String),
    /// Bytes the command wrote to standard error (base64).
    Stderr(String),
    /// The command ended: its exit code (`None` when killed by a signal or at its timeout).
    Exit {
        /// Exit code.
        code: Option<i32>,
        /// Signal that killed it.
        signal: Option<i32>,
        /// Killed at `timeoutSeconds`.
        timed_out: bool,
    },
    /// The command could not be run or followed to its end.
    Error(String),
}

/// `POST /v1/sandboxes/{name}/state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxStateRequest {
    /// The desired power state.
    pub state: agentvm_api::SandboxState,
}

/// `POST /v1/sandboxes/{name}/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxRollbackRequest {
    /// Name of a ready `Snapshot` of the sandbox.
    pub snapshot: String,
}

/// Default cap of a directory copied out of a sandbox (`GET /v1/sandboxes/{name}/dirs`),
/// archive bytes.
pub const MAX_DIR_BYTES: u64 = 1 << 30;

/// What a guest path is ([`PathStat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathKind {
    /// Nothing is there.
    Missing,
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A socket, FIFO or device.
    Other,
}

/// `GET /v1/sandboxes/{name}/stat?path=/abs`: what is at a guest path (links followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathStat {
    /// What is there.
    pub kind: PathKind,
    /// Its size, bytes.
    pub size: u64,
    /// Its permission bits.
    pub mode: u32,
}

/// The `Upgrade` protocol of `POST /v1/sandboxes/{name}/forward`: raw bytes both ways.
pub const FORWARD_PROTOCOL: &str = "agentvm-forward";

/// `POST /v1/sandboxes/{name}/attach`: an interactive exec. The request carries
/// `Connection: Upgrade` and `Upgrade: agentvm-exec`; after `101 Switching Protocols` both
/// sides exchange [`attach`] frames, the client's first being this request as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttachRequest {
    /// What to run.
    pub exec: SandboxExecRequest,
    /// Run it on a terminal of (rows, columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<(u16, u16)>,
}

/// The frames of an interactive exec after the upgrade: a kind byte, a 4-byte big-endian
/// length, then that many bytes (at most [`attach::MAX_FRAME`]; a longer one ends the
/// connection).
pub mod attach {
    use std::io::{self, Read};

    /// The `Upgrade` protocol name.
    pub const PROTOCOL: &str = "agentvm-exec";
    /// Largest payload of one frame.
    pub const MAX_FRAME: usize = 1 << 20;
    /// Client → server: the [`super::AttachRequest`] as JSON (first frame only).
    pub const REQUEST: u8 = 0;
    /// Client → server: bytes for the program's stdin. Server → client: its stdout.
    pub const DATA: u8 = 1;
    /// Client → server: stdin ended. Server → client: bytes of the program's stderr.
    pub const STDERR_OR_EOF: u8 = 2;
    /// Client → server: the terminal's new size (rows, columns as 2-byte big-endian each).
    /// Server → client: the program ended: an [`super::ExecEvent::Exit`] as JSON.
    pub const RESIZE_OR_EXIT: u8 = 3;
    /// Server → client: the program could not be run or followed (text).
    pub const ERROR: u8 = 4;

    /// One frame, encoded.
    pub fn encode(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(5 + payload.len());
        f.push(kind);
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Parses a frame header: (kind, payload length), refusing oversized payloads.
    pub fn header(h: [u8; 5]) -> io::Result<(u8, usize)> {
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("frame of {len} bytes (at most {MAX_FRAME})"),
            ));
        }
        Ok((h[0], len))
    }

    /// Reads one frame; `None` at a clean end of the stream.
    pub fn read_frame(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
        let mut h = [0u8; 5];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (kind, len) = header(h)?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        Ok(Some((kind, payload)))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn frames_round_trip_and_oversized_ones_are_refused() {
            let mut bytes = encode(DATA, b"hello");
            bytes.extend(encode(ERROR, b""));
            let mut r = &bytes[..];
            assert_eq!(read_frame(&mut r).unwrap(), Some((DATA, b"hello".to_vec())));
            assert_eq!(read_frame(&mut r).unwrap(), Some((ERROR, vec![])));
            assert_eq!(read_frame(&mut r).unwrap(), None);
            let mut big = vec![DATA];
            big.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
            assert!(read_frame(&mut &big[..]).is_err());
        }
    }
}
