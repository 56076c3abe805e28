//! Serves the controller API (see [`crate::api`]) with axum on a Unix socket (mode 0660,
//! group configurable), defending itself against bad clients: at most
//! [`MAX_CONNECTIONS`] at once, [`HEADER_TIMEOUT`] to send the request head and
//! [`BODY_TIMEOUT`] to send a body, bodies up to [`MAX_BODY_BYTES`], and every error as a
//! JSON [`ErrorBody`]. Who calls is the kernel's word (the socket's peer credentials): each
//! applied object records its submitter ([`Caller`]), whose rights its host inputs are read
//! with, and each deletion who asked for it.

// Helpers return `Result<_, Response>` so handlers can return an error response early;
// responses are built once per request, their size does not matter.
#![allow(clippy::result_large_err)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentvm_api::{Kind, Resource};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::net::UnixListener;
use tokio::sync::{broadcast, watch};

use agentvm_client::SpecDirState;
use agentvm_client::{
    ApplyRequest, ApplyResponse, ApplyResult, DeleteResponse, ErrorBody, Health, LabelSelector,
    SpecDirResponse, WatchChange, WatchEvent, MAX_BODY_BYTES, NEXT_OFFSET_HEADER, TRUNCATED_HEADER,
};
use agentvm_store::caller::Caller;
use agentvm_store::{ApplyItem, Change, Manager, Store, StoreError};

/// Bytes per read of run output in a logs response.
const LOG_CHUNK_BYTES: usize = 64 * 1024;

/// Connections served at once; further clients wait in the socket's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Time a client has to send a request's line and headers; then the connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a client has to send a request body; then it gets 408.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head (line and headers) read; larger ones get 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long shutdown waits for requests in progress before dropping their connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The object store.
    pub store: Store,
    /// The spec-dir source's state, when the controller watches a directory.
    pub spec_dir: Option<Arc<RwLock<SpecDirState>>>,
    /// Flips to true on shutdown; long-lived streams end then.
    pub shutdown: watch::Receiver<bool>,
    /// Exec into sandboxes; `None` without a backend (then those routes answer 503).
    pub sandboxes: Option<SandboxAccess>,
    /// The audit log (each sandbox exec is recorded).
    pub audit: Option<crate::audit::AuditLog>,
    /// This node's cluster membership (`None` on a single host).
    pub membership: Option<Arc<agentvm_store::cluster::Membership>>,
}

/// What the sandbox routes need: the backend to reach the VMs, and the activity record.
#[derive(Clone)]
pub struct SandboxAccess {
    /// The hypervisor backend.
    pub backend: Arc<dyn agentvm_backend::Backend>,
    /// Activity of each sandbox (idle timeouts).
    pub sandboxes: Arc<crate::reconcilers::Sandboxes>,
}

/// A problem starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be created.
    #[error("API socket {path}: {message}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Serving failed.
    #[error("API server: {0}")]
    Io(#[from] std::io::Error),
}

/// Binds the socket with the process's own group; see [`bind_with_group`].
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    bind_with_group(path, None)
}

/// Binds the socket: creates its directory, replaces a stale socket file (refusing when
/// a live controller answers on it), and gives it mode 0660 and group `gid` (the
/// process's group when `None`). The socket is made under a temporary name and renamed
/// into place once its mode and group are set, so no client ever sees it with others.
pub fn bind_with_group(path: &Path, gid: Option<u32>) -> Result<UnixListener, ServeError> {
    let err = |message: String| ServeError::Socket {
        path: path.to_path_buf(),
        message,
    };
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    if path.exists() && std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(
            "another controller is already listening here; stop it or use another --socket".into(),
        ));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| err("not a file path".into()))?;
    let staging = parent.join(format!(
        ".{}.{}.new",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(|e| err(e.to_string()))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err(format!("setting mode 0660: {e}")))
        .and_then(|()| match gid {
            Some(gid) => std::os::unix::fs::chown(&staging, None, Some(gid))
                .map_err(|e| err(format!("setting group {gid}: {e}"))),
            None => Ok(()),
        })
        .and_then(|()| {
            std::fs::rename(&staging, path)
                .map_err(|e| err(format!("replacing the stale socket: {e}")))
        });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok(listener)
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/healthz", get(health))
        .route("/v1/apply", axum::routing::post(apply))
        .route("/v1/objects", get(list))
        .route("/v1/objects/{kind}/{name}", get(get_one).delete(delete))
        .route("/v1/watch", get(watch_events))
        .route("/v1/runs/{name}/logs", get(logs))
        .route("/v1/specdir/errors", get(specdir_errors))
        .route("/v1/nodes", get(nodes))
        .route("/v1/nodes/{name}/cordon", axum::routing::post(cordon))
        .route(
            "/v1/sandboxes/{name}/exec",
            axum::routing::post(super::sandbox::exec),
        )
        .route(
            "/v1/sandboxes/{name}/state",
            axum::routing::post(super::sandbox::set_state),
        )
        .route(
            "/v1/sandboxes/{name}/files",
            get(super::sandbox::download).put(super::sandbox::upload),
        )
        .route(
            "/v1/sandboxes/{name}/dirs",
            get(super::sandbox::download_dir).put(super::sandbox::upload_dir),
        )
        .route("/v1/sandboxes/{name}/stat", get(super::sandbox::stat))
        .route(
            "/v1/sandboxes/{name}/forward",
            axum::routing::post(super::sandbox::forward),
        )
        .route(
            "/v1/sandboxes/{name}/attach",
            axum::routing::post(super::sandbox::attach),
        )
        .route(
            "/v1/sandboxes/{name}/rollback",
            axum::routing::post(super::sandbox::rollback),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint", vec![]) })
        .with_state(state);
    // Outside the routes, so that it also sees what method routing adds (`Allow`).
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::map_response(json_errors))
}

/// Turns the plain-text error responses of axum's extractors and method routing (a bad
/// query string, a wrong method) into [`ErrorBody`] JSON like every other error.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let reason = status.canonical_reason().unwrap_or("error").to_lowercase();
    let message = match parts.headers.get(header::ALLOW) {
        _ if !text.is_empty() => text,
        Some(allow) => format!(
            "{reason}: this endpoint accepts {}",
            allow.to_str().unwrap_or_default()
        ),
        None => reason,
    };
    let mut out = error(status, message, vec![]);
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// Serves `router(state)` on `listener` until `shutdown` resolves; open streams (watch,
/// logs -f) end when `state.shutdown` flips. Requests in progress then get
/// `SHUTDOWN_GRACE` to finish.
pub async fn serve(
    listener: UnixListener,
    state: ApiState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    crate::http_serve::serve(
        "API",
        listener,
        router(state),
        crate::http_serve::unix_peer,
        crate::http_serve::Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            max_head_bytes: MAX_HEAD_BYTES,
            shutdown_grace: SHUTDOWN_GRACE,
        },
        shutdown,
    )
    .await;
    Ok(())
}

pub(super) fn error(
    status: StatusCode,
    message: impl Into<String>,
    details: Vec<String>,
) -> Response {
    let body = ErrorBody {
        error: message.into(),
        details,
    };
    (status, Json(body)).into_response()
}

/// The client of this request, from its connection; refused when unknown.
pub(super) fn caller_of(ext: Option<Extension<Caller>>) -> Result<Caller, Response> {
    ext.map(|Extension(c)| c).ok_or_else(|| {
        error(
            StatusCode::FORBIDDEN,
            "the controller cannot tell who is calling (no peer credentials on this connection); nothing was changed",
            vec![],
        )
    })
}

fn store_error(e: StoreError) -> Response {
    let status = match &e {
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict { .. } => StatusCode::CONFLICT,
        StoreError::Invalid { .. } | StoreError::BadStatus { .. } => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        StoreError::DiskFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::Unavailable { .. } | StoreError::Contended(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.to_string(), vec![])
}

/// True when reading a body failed because it exceeded the limit.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn parse_kind(text: &str) -> Result<Kind, Response> {
    text.parse::<Kind>()
        .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string(), vec![]))
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(store_error),
        Err(e) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
            vec![],
        )),
    }
}

async fn health(State(st): State<ApiState>) -> Response {
    let objects = match st.store.len() {
        Ok(n) => n,
        Err(e) => return store_error(e),
    };
    let spec_dir = st
        .spec_dir
        .as_ref()
        .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).dir.clone());
    Json(Health {
        ok: true,
        version: env!("CARGO_PKG_VERSION").to_string(),
        objects,
        spec_dir,
    })
    .into_response()
}

/// True for `application/json` (with parameters) or no content type at all.
fn is_json_or_unset(headers: &axum::http::HeaderMap) -> bool {
    match headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")),
    }
}

async fn apply(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if !is_json_or_unset(&headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "content type {:?} is not accepted: send the objects as JSON (`Content-Type: application/json`); `agentvm apply -f` converts YAML manifests",
                headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
            ),
            vec![],
        );
    }
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than {} MiB; apply the manifests in several smaller sets",
                MAX_BODY_BYTES / (1024 * 1024)
            ),
            vec![],
        )
    };
    // A body announced as too large is refused before any of it is read.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if is_length_limit(&e) => return too_large(),
        Ok(Err(e)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
                vec![],
            )
        }
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ),
                vec![],
            )
        }
    };
    let req: ApplyRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("invalid request body: {e}"),
                vec![],
            )
        }
    };
    let resources = match agentvm_api::resources_from_json(req.objects, &req.sources) {
        Ok(r) => r,
        Err(details) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid objects; nothing was applied",
                details,
            )
        }
    };
    let (force, dry_run) = (req.force, req.dry_run);
    let sources: Vec<(Kind, String, String)> = resources
        .iter()
        .map(|(r, s)| (r.kind(), r.name().to_string(), s.clone()))
        .collect();
    let items = resources
        .into_iter()
        .map(|(resource, _)| ApplyItem {
            resource,
            manager: Manager::Api,
            submitter: caller.clone(),
            force,
        })
        .collect();
    let store = st.store.clone();
    let results = match blocking(move || store.apply_batch(items, dry_run)).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let results = sources
        .into_iter()
        .zip(results)
        .map(|((kind, name, source), r)| ApplyResult {
            kind: kind.to_string(),
            name,
            outcome: r.as_ref().ok().copied(),
            error: r.err().map(|e| e.to_string()),
            source: Some(source),
        })
        .collect();
    Json(ApplyResponse { results, dry_run }).into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    kind: Option<String>,
    selector: Option<String>,
}

async fn list(State(st): State<ApiState>, Query(q): Query<ListQuery>) -> Response {
    let kind = match q.kind.as_deref().filter(|k| !k.is_empty() && *k != "all") {
        Some(k) => match parse_kind(k) {
            Ok(k) => Some(k),
            Err(resp) => return resp,
        },
        None => None,
    };
    let selector = match LabelSelector::parse(q.selector.as_deref().unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, vec![]),
    };
    match st.store.list(kind) {
        Ok(objects) => {
            let objects: Vec<_> = objects
                .into_iter()
                .filter(|o| selector.matches(&o.resource.metadata().labels))
                .collect();
            Json(objects).into_response()
        }
        Err(e) => store_error(e),
    }
}

async fn get_one(
    State(st): State<ApiState>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> Response {
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    match st.store.get(kind, &name) {
        Ok(Some(obj)) => Json(obj).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("{kind}/{name} not found"),
            vec![],
        ),
        Err(e) => store_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let kind = match parse_kind(&kind) {
        Ok(k) => k,
        Err(resp) => return resp,
    };
    let store = st.store.clone();
    let n = name.clone();
    let result = blocking(move || {
        let check = (!q.force).then_some(Manager::Api);
        store.request_delete_as(kind, &n, check.as_ref(), Some(&caller))
    })
    .await;
    match result {
        Ok(true) => Json(DeleteResponse {
            kind: kind.to_string(),
            name,
            deletion_requested: true,
        })
        .into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("{kind}/{name} not found"),
            vec![],
        ),
        Err(resp) => resp,
    }
}

#[derive(Debug, Deserialize)]
struct WatchQuery {
    kind: Option<String>,
    #[serde(default)]
    initial: bool,
}

fn json_line(event: &WatchEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

async fn watch_events(State(st): State<ApiState>, Query(q): Query<WatchQuery>) -> Response {
    let kind = match q.kind.as_deref().filter(|k| !k.is_empty() && *k != "all") {
        Some(k) => match parse_kind(k) {
            Ok(k) => Some(k),
            Err(resp) => return resp,
        },
        None => None,
    };
    // Subscribe before listing, so nothing in between is missed.
    let events = st.store.subscribe();
    let mut initial = Vec::new();
    if q.initial {
        match st.store.list(kind) {
            Ok(objects) => {
                for obj in objects {
                    initial.push(json_line(&WatchEvent {
                        change: WatchChange::Initial,
                        kind: Some(obj.resource.kind()),
                        name: Some(obj.resource.name().to_string()),
                        object: Some(Box::new(obj)),
                    }));
                }
            }
            Err(e) => return store_error(e),
        }
    }
    let initial = futures::stream::iter(initial.into_iter().map(Ok::<Bytes, std::io::Error>));
    let live = futures::stream::unfold(
        (events, st.store.clone(), st.shutdown.clone()),
        move |(mut events, store, mut shutdown)| async move {
            loop {
                if *shutdown.borrow() {
                    return None;
                }
                let received = tokio::select! {
                    r = events.recv() => r,
                    _ = shutdown.changed() => return None,
                };
                let event = match received {
                    Ok(e) if kind.is_some_and(|k| k != e.kind) => continue,
                    Ok(e) => {
                        let object = match e.change {
                            Change::Removed => None,
                            _ => store.get(e.kind, &e.name).ok().flatten().map(Box::new),
                        };
                        WatchEvent {
                            change: match e.change {
                                Change::Applied => WatchChange::Applied,
                                Change::StatusChanged => WatchChange::StatusChanged,
                                Change::DeleteRequested => WatchChange::DeleteRequested,
                                Change::Removed => WatchChange::Removed,
                            },
                            kind: Some(e.kind),
                            name: Some(e.name),
                            object,
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => WatchEvent {
                        change: WatchChange::Lagged,
                        kind: None,
                        name: None,
                        object: None,
                    },
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                return Some((
                    Ok::<Bytes, std::io::Error>(json_line(&event)),
                    (events, store, shutdown),
                ));
            }
        },
    );
    let stream = futures::StreamExt::chain(initial, live);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    resp
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    follow: bool,
}

/// True when the run will produce no more output: gone, being deleted, or ended.
fn run_finished(store: &Store, name: &str) -> bool {
    match store.get(Kind::AgentRun, name) {
        Ok(Some(obj)) => {
            obj.is_deleting()
                || matches!(&obj.resource, Resource::AgentRun(r)
                    if r.status.as_ref().is_some_and(|s| s.phase.is_terminal()))
        }
        _ => true,
    }
}

async fn logs(
    State(st): State<ApiState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogsQuery>,
) -> Response {
    // In a cluster, a run's output is kept by the node that ran it.
    if let Some(m) = &st.membership {
        if let Ok(Some(obj)) = st.store.get(Kind::AgentRun, &name) {
            let ran_on =
                <agentvm_api::AgentRunStatus as agentvm_api::KindStatus>::of(&obj.resource)
                    .and_then(|s| s.node.clone());
            if let Some(node) = ran_on.filter(|n| n != m.name()) {
                return error(
                    StatusCode::CONFLICT,
                    format!(
                        "AgentRun/{name} ran on node {node}, which keeps its output: ask that node's API (this is node {})",
                        m.name()
                    ),
                    vec![],
                );
            }
        }
    }
    // Subscribe first so output appended between the first read and the wait is seen.
    let output_events = st.store.subscribe_output();
    let first = match st.store.read_output(&name, q.offset, usize::MAX) {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    if !q.follow {
        let mut resp = Response::new(Body::from(first.bytes()));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&first.next_offset.to_string()) {
            headers.insert(NEXT_OFFSET_HEADER, v);
        }
        headers.insert(
            TRUNCATED_HEADER,
            HeaderValue::from_static(if first.truncated { "true" } else { "false" }),
        );
        return resp;
    }
    let state = (
        Some(first),
        output_events,
        st.store.clone(),
        st.shutdown.clone(),
        name,
    );
    let stream = futures::stream::unfold(
        state,
        |(pending, mut events, store, mut shutdown, name)| async move {
            if let Some(read) = pending {
                if !read.chunks.is_empty() {
                    let next = read.next_offset;
                    let bytes = Bytes::from(read.bytes());
                    let after = store.read_output(&name, next, LOG_CHUNK_BYTES).ok();
                    return Some((
                        Ok::<Bytes, std::io::Error>(bytes),
                        (after, events, store, shutdown, name),
                    ));
                }
                let mut offset = read.next_offset;
                loop {
                    // Finished runs end the stream once everything is sent.
                    if run_finished(&store, &name) || *shutdown.borrow() {
                        let rest = store.read_output(&name, offset, usize::MAX).ok()?;
                        if rest.chunks.is_empty() {
                            return None;
                        }
                        let bytes = Bytes::from(rest.bytes());
                        let done = agentvm_store::OutputRead {
                            next_offset: rest.next_offset,
                            ..Default::default()
                        };
                        // Deliver the rest; the next poll sees no chunks and ends.
                        return Some((Ok(bytes), (Some(done), events, store, shutdown, name)));
                    }
                    tokio::select! {
                        changed = shutdown.changed() => if changed.is_err() { return None },
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        r = events.recv() => match r {
                            Ok(run) if run != name => continue,
                            _ => {}
                        },
                    }
                    let read = store.read_output(&name, offset, LOG_CHUNK_BYTES).ok()?;
                    if !read.chunks.is_empty() {
                        let next = read.next_offset;
                        let bytes = Bytes::from(read.bytes());
                        let idle = agentvm_store::OutputRead {
                            next_offset: next,
                            ..Default::default()
                        };
                        return Some((Ok(bytes), (Some(idle), events, store, shutdown, name)));
                    }
                    offset = read.next_offset;
                }
            }
            None
        },
    );
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

async fn nodes(State(st): State<ApiState>) -> Response {
    let Some(m) = st.membership.clone() else {
        return Json(agentvm_client::NodesResponse {
            cluster: false,
            nodes: vec![],
        })
        .into_response();
    };
    match blocking(move || m.nodes()).await {
        Ok(nodes) => Json(agentvm_client::NodesResponse {
            cluster: true,
            nodes,
        })
        .into_response(),
        Err(resp) => resp,
    }
}

/// `POST /v1/nodes/{name}/cordon`: [`agentvm_client::CordonRequest`] → the nodes. Root only.
async fn cordon(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    body: Bytes,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if !caller.is_root() {
        return error(
            StatusCode::FORBIDDEN,
            "only root may cordon or drain a cluster node; nothing was changed",
            vec![],
        );
    }
    let Some(m) = st.membership.clone() else {
        return error(
            StatusCode::CONFLICT,
            "this controller runs on one host (started without --cluster): it has no nodes to cordon",
            vec![],
        );
    };
    let request: agentvm_client::CordonRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("bad request body: {e}"),
                vec![],
            )
        }
    };
    let n = name.clone();
    match blocking(move || {
        let found = m.set_cordoned(&n, request.cordoned)?;
        Ok((found, m.nodes()?))
    })
    .await
    {
        Ok((false, _)) => error(
            StatusCode::NOT_FOUND,
            format!("no live node named {name:?} (see `agentvm get nodes`)"),
            vec![],
        ),
        Ok((true, nodes)) => Json(agentvm_client::NodesResponse {
            cluster: true,
            nodes,
        })
        .into_response(),
        Err(resp) => resp,
    }
}

async fn specdir_errors(State(st): State<ApiState>) -> Response {
    let spec_dir = st
        .spec_dir
        .as_ref()
        .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).clone());
    Json(SpecDirResponse { spec_dir }).into_response()
}
