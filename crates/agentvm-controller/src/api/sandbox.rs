//! The sandbox routes: exec into a running sandbox (output streamed as newline-delimited
//! [`ExecEvent`]s) and change its desired power state.
//!
//! Only root and the user who last applied the sandbox may use it: a sandbox holds its
//! owner's work. Every exec is recorded in the audit log and counts as activity for the
//! sandbox's idle timeout while it runs; an exec into a sandbox stopped for being idle
//! brings it back first.

// As in `server`: helpers return `Result<_, Response>` to answer early.
#![allow(clippy::result_large_err)]

use std::time::{Duration, Instant};

use agentvm_api::{Kind, Resource, Rollback, SandboxPhase, SandboxState, SnapshotPhase};
use agentvm_backend::guest::{ExecRequest, Guest, Stream};
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;

use super::server::{blocking, caller_of, error, ApiState, SandboxAccess};
use crate::audit::{AuditEvent, AuditEventType};
use agentvm_client::{
    ExecEvent, SandboxExecRequest, SandboxRollbackRequest, SandboxStateRequest,
    MAX_SANDBOX_EXEC_SECONDS,
};
use agentvm_store::caller::Caller;
use agentvm_store::{ApplyItem, StoredObject};

/// How long an exec waits for its sandbox to be running (claimed, resumed or restored).
const READY_WAIT: Duration = Duration::from_secs(120);
/// Default exec timeout.
const DEFAULT_EXEC_SECONDS: u64 = 300;
/// Output kept per stream of one exec (it is streamed, not stored).
const EXEC_OUTPUT_CAP: usize = 1 << 30;

fn access(st: &ApiState) -> Result<&SandboxAccess, Response> {
    st.sandboxes.as_ref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "this controller runs without a hypervisor backend: it cannot reach sandboxes",
            vec![],
        )
    })
}

/// The sandbox `name`, if `caller` may use it.
async fn sandbox_for(st: &ApiState, name: &str, caller: &Caller) -> Result<StoredObject, Response> {
    let store = st.store.clone();
    let n = name.to_string();
    let obj = blocking(move || store.get(Kind::Sandbox, &n))
        .await?
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("Sandbox/{name} not found"),
                vec![],
            )
        })?;
    let owner_uid = obj.submitter.as_ref().map_or(0, |s| s.uid);
    if !caller.is_root() && caller.uid != owner_uid {
        return Err(error(
            StatusCode::FORBIDDEN,
            format!(
                "Sandbox/{name} belongs to {}; only they and root may use it",
                obj.submitter
                    .as_ref()
                    .map_or_else(|| "root".to_string(), |s| s.to_string())
            ),
            vec![],
        ));
    }
    if obj.is_deleting() {
        return Err(error(
            StatusCode::CONFLICT,
            format!("Sandbox/{name} is being deleted"),
            vec![],
        ));
    }
    Ok(obj)
}

fn spec_state(obj: &StoredObject) -> SandboxState {
    match &obj.resource {
        Resource::Sandbox(s) => s.spec.state,
        _ => SandboxState::Running,
    }
}

/// Waits until the sandbox runs (claimed, resumed, restored); its VM name.
async fn running_vm(st: &ApiState, name: &str) -> Result<String, Response> {
    let start = Instant::now();
    loop {
        let store = st.store.clone();
        let n = name.to_string();
        let obj = blocking(move || store.get(Kind::Sandbox, &n)).await?;
        let Some(obj) = obj else {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("Sandbox/{name} not found"),
                vec![],
            ));
        };
        if let Resource::Sandbox(sb) = &obj.resource {
            if sb.spec.state != SandboxState::Running || obj.is_deleting() {
                return Err(error(
                    StatusCode::CONFLICT,
                    format!("Sandbox/{name} is no longer wanted running"),
                    vec![],
                ));
            }
            if let Some(status) = &sb.status {
                match (status.phase, &status.vm) {
                    (SandboxPhase::Running, Some(vm)) if status.stopped_reason.is_none() => {
                        return Ok(vm.clone())
                    }
                    (SandboxPhase::Failed, _) => {
                        let why = agentvm_api::find_condition(&status.conditions, "Degraded")
                            .map_or("", |c| c.message.as_str());
                        return Err(error(
                            StatusCode::CONFLICT,
                            format!("Sandbox/{name} failed: {why}"),
                            vec![],
                        ));
                    }
                    _ => {}
                }
            }
        }
        if start.elapsed() > READY_WAIT {
            return Err(error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "Sandbox/{name} did not become Running within {}s; see `agentvm describe sandbox/{name}`",
                    READY_WAIT.as_secs()
                ),
                vec![],
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Refuses (409, with the verb that helps) a sandbox not wanted running.
fn wanted_running(obj: &StoredObject, name: &str) -> Result<(), Response> {
    let state = spec_state(obj);
    if state == SandboxState::Running {
        return Ok(());
    }
    let verb = if state == SandboxState::Paused {
        "resume"
    } else {
        "start"
    };
    Err(error(
        StatusCode::CONFLICT,
        format!(
            "Sandbox/{name} is {} (spec.state); `agentvm {verb} sandbox/{name}` first",
            state.as_str()
        ),
        vec![],
    ))
}

/// The guest request for `exec`, its output streamed (not kept); `default_timeout` seconds
/// unless it names its own.
fn program(exec: &SandboxExecRequest, default_timeout: u64) -> ExecRequest {
    let mut request = ExecRequest::new(exec.command[0].clone(), exec.command[1..].to_vec());
    request.env = exec.env.clone();
    request.cwd = exec.workdir.clone();
    request.timeout = Duration::from_secs(exec.timeout_seconds.unwrap_or(default_timeout));
    request.output_cap = EXEC_OUTPUT_CAP;
    request.keep_output = false;
    request
}

fn line(event: &ExecEvent) -> Bytes {
    let mut l = serde_json::to_vec(event).unwrap_or_default();
    l.push(b'\n');
    Bytes::from(l)
}

fn check_request(req: &SandboxExecRequest) -> Result<(), String> {
    let Some(program) = req.command.first() else {
        return Err("`command` is empty: give the program and its arguments".into());
    };
    if program.is_empty() {
        return Err("the program name is empty".into());
    }
    if req.command.iter().any(|a| a.contains('\0')) {
        return Err("an argument contains a NUL character".into());
    }
    for (k, v) in &req.env {
        let name_ok = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !name_ok || v.contains('\0') {
            return Err(format!(
                "environment variable {k:?} is not NAME=VALUE with a plain name"
            ));
        }
    }
    if let Some(w) = &req.workdir {
        if !w.starts_with('/') || w.contains('\0') {
            return Err(format!("workdir {w:?} is not an absolute path"));
        }
    }
    if let Some(t) = req.timeout_seconds {
        if t == 0 || t > MAX_SANDBOX_EXEC_SECONDS {
            return Err(format!(
                "timeoutSeconds {t} is not between 1 and {MAX_SANDBOX_EXEC_SECONDS}"
            ));
        }
    }
    Ok(())
}

/// `POST /v1/sandboxes/{name}/exec`.
pub(super) async fn exec(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<SandboxExecRequest>,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let access = match access(&st) {
        Ok(a) => a.clone(),
        Err(resp) => return resp,
    };
    if let Err(message) = check_request(&req) {
        return error(StatusCode::BAD_REQUEST, message, vec![]);
    }
    let obj = match sandbox_for(&st, &name, &caller).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    if let Err(resp) = wanted_running(&obj, &name) {
        return resp;
    }
    // From here on the sandbox is in use (and woken if it was stopped for being idle).
    let in_use = access.sandboxes.begin(&name);
    let vm = match running_vm(&st, &name).await {
        Ok(vm) => vm,
        Err(resp) => return resp,
    };
    let request = program(&req, DEFAULT_EXEC_SECONDS);

    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let audit = st.audit.clone();
    let actor = caller.to_string();
    tokio::task::spawn_blocking(move || {
        let _in_use = in_use;
        let b64 = base64::engine::general_purpose::STANDARD;
        let result = access.backend.agent(&vm).and_then(|agent| {
            Guest::new(&*agent).exec(&request, &mut |stream, data| {
                let event = match stream {
                    Stream::Stdout => ExecEvent::Stdout(b64.encode(data)),
                    Stream::Stderr => ExecEvent::Stderr(b64.encode(data)),
                };
                // A client that hung up does not stop the command; its output is dropped.
                let _ = tx.blocking_send(line(&event));
            })
        });
        let (event, code) = match result {
            Ok(o) => (
                ExecEvent::Exit {
                    code: o.exit_code,
                    signal: o.signal,
                    timed_out: o.timed_out,
                },
                serde_json::json!(o.exit_code),
            ),
            Err(e) => (
                ExecEvent::Error(format!("running in {vm}: {e}")),
                serde_json::Value::Null,
            ),
        };
        if let Some(audit) = audit {
            audit.record(
                AuditEvent::new(AuditEventType::SandboxExec, Kind::Sandbox, &name, actor)
                    .vm(vm.clone())
                    .details(serde_json::json!({
                        "command": request_line(&request),
                        "exitCode": code,
                    })),
            );
        }
        let _ = tx.blocking_send(line(&event));
    });
    streamed(rx, "application/x-ndjson")
}

/// A response whose body is what arrives on `rx`, as it arrives.
fn streamed(rx: tokio::sync::mpsc::Receiver<Bytes>, content_type: &'static str) -> Response {
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<Bytes, std::io::Error>(b), rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn request_line(r: &ExecRequest) -> Vec<String> {
    std::iter::once(r.program.clone())
        .chain(r.args.iter().cloned())
        .collect()
}

/// Applies `edit` to the spec of sandbox `name` for `caller`, keeping its manager; refused
/// for a sandbox declared in the spec directory (which would put its own spec back).
async fn edit_spec(
    st: &ApiState,
    name: &str,
    caller: Caller,
    what: &str,
    edit: impl FnOnce(&mut agentvm_api::SandboxSpec),
) -> Result<StoredObject, Response> {
    let obj = sandbox_for(st, name, &caller).await?;
    if let agentvm_store::Manager::SpecDir { file } = &obj.manager {
        return Err(error(
            StatusCode::CONFLICT,
            format!(
                "Sandbox/{name} is declared in the spec directory (file {file}), which is its truth: set {what} there"
            ),
            vec![],
        ));
    }
    let Resource::Sandbox(mut sb) = obj.resource.clone() else {
        return Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "not a sandbox",
            vec![],
        ));
    };
    edit(&mut sb.spec);
    sb.status = None;
    let store = st.store.clone();
    let item = ApplyItem {
        resource: Resource::Sandbox(sb),
        manager: obj.manager.clone(),
        submitter: caller,
        force: false,
    };
    let n = name.to_string();
    blocking(move || {
        let r = store.apply_batch(vec![item], false)?;
        r.into_iter()
            .next()
            .unwrap_or_else(|| unreachable!("one result per item"))?;
        store.get(Kind::Sandbox, &n)
    })
    .await?
    .ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("Sandbox/{name} not found"),
            vec![],
        )
    })
}

/// `POST /v1/sandboxes/{name}/state`.
pub(super) async fn set_state(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<SandboxStateRequest>,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let what = format!("`spec.state: {}`", req.state.as_str());
    match edit_spec(&st, &name, caller, &what, |spec| spec.state = req.state).await {
        Ok(obj) => {
            if req.state == SandboxState::Running {
                if let Some(a) = &st.sandboxes {
                    a.sandboxes.wake(&name);
                }
            }
            Json(obj).into_response()
        }
        Err(resp) => resp,
    }
}

/// `POST /v1/sandboxes/{name}/rollback`.
pub(super) async fn rollback(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<SandboxRollbackRequest>,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    // Who may touch the sandbox comes first; then the rollback is refused here already when
    // it cannot work (the reconciler checks again).
    if let Err(resp) = sandbox_for(&st, &name, &caller).await {
        return resp;
    }
    let store = st.store.clone();
    let snap_name = req.snapshot.clone();
    let snapshot = match blocking(move || store.get(Kind::Snapshot, &snap_name)).await {
        Ok(s) => s,
        Err(resp) => return resp,
    };
    let problem = match snapshot.as_ref().map(|o| &o.resource) {
        None => {
            return error(
                StatusCode::NOT_FOUND,
                format!("Snapshot/{} not found", req.snapshot),
                vec![],
            )
        }
        Some(Resource::Snapshot(s)) if s.spec.sandbox_ref != name => Some(format!(
            "Snapshot/{} is of Sandbox/{}, not of Sandbox/{name}",
            req.snapshot, s.spec.sandbox_ref
        )),
        Some(Resource::Snapshot(s))
            if s.status.as_ref().map(|st| st.phase) != Some(SnapshotPhase::Ready) =>
        {
            Some(format!("Snapshot/{} is not Ready", req.snapshot))
        }
        _ => None,
    };
    if let Some(problem) = problem {
        return error(StatusCode::CONFLICT, problem, vec![]);
    }
    let request = Rollback {
        snapshot: req.snapshot.clone(),
        requested_at: agentvm_api::time::Timestamp::now().to_string(),
    };
    let what = format!("`spec.rollback` (snapshot {})", req.snapshot);
    match edit_spec(&st, &name, caller, &what, |spec| {
        spec.rollback = Some(request)
    })
    .await
    {
        Ok(obj) => Json(obj).into_response(),
        Err(resp) => resp,
    }
}

/// Refuses (400) a request that does not ask to switch to `protocol`.
fn wants_upgrade(req: &axum::extract::Request, protocol: &str) -> Result<(), Response> {
    let asked = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(protocol));
    if asked {
        Ok(())
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            format!("send `Connection: Upgrade` and `Upgrade: {protocol}`"),
            vec![],
        ))
    }
}

/// `101 Switching Protocols` to `protocol`.
fn switching_to(protocol: &'static str) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(protocol));
    resp
}

/// Stdin of an interactive exec: the bytes the client sends, until it says stdin ended or
/// goes away.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.rx.recv() {
                Ok(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// `POST /v1/sandboxes/{name}/attach`: see [`agentvm_client::AttachRequest`].
pub(super) async fn attach(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    mut req: axum::extract::Request,
) -> Response {
    use agentvm_client::attach::{self as frames, PROTOCOL};
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let access = match access(&st) {
        Ok(a) => a.clone(),
        Err(resp) => return resp,
    };
    if let Err(resp) = wants_upgrade(&req, PROTOCOL) {
        return resp;
    }
    let obj = match sandbox_for(&st, &name, &caller).await {
        Ok(o) => o,
        Err(resp) => return resp,
    };
    if let Err(resp) = wanted_running(&obj, &name) {
        return resp;
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let audit = st.audit.clone();
    let actor = caller.to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let (mut rd, mut wr) = tokio::io::split(hyper_util::rt::TokioIo::new(upgraded));
        async fn read_frame(
            rd: &mut (impl tokio::io::AsyncRead + Unpin),
        ) -> std::io::Result<Option<(u8, Vec<u8>)>> {
            let mut h = [0u8; 5];
            match rd.read_exact(&mut h).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e),
            }
            let (kind, len) = agentvm_client::attach::header(h)?;
            let mut payload = vec![0u8; len];
            rd.read_exact(&mut payload).await?;
            Ok(Some((kind, payload)))
        }
        let fail = |message: String| frames::encode(frames::ERROR, message.as_bytes());
        let request = match read_frame(&mut rd).await {
            Ok(Some((frames::REQUEST, p))) => {
                serde_json::from_slice::<agentvm_client::AttachRequest>(&p)
                    .map_err(|e| format!("bad attach request: {e}"))
            }
            Ok(_) => Err("the first frame must be the request".to_string()),
            Err(e) => Err(format!("reading the request: {e}")),
        };
        let request = match request.and_then(|r| check_request(&r.exec).map(|()| r)) {
            Ok(r) => r,
            Err(message) => {
                let _ = wr.write_all(&fail(message)).await;
                return;
            }
        };
        let in_use = access.sandboxes.begin(&name);
        let vm = match running_vm(&st, &name).await {
            Ok(vm) => vm,
            Err(_) => {
                let _ = wr
                    .write_all(&fail(format!("Sandbox/{name} is not running")))
                    .await;
                return;
            }
        };
        let exec = request.exec;
        let program = program(&exec, MAX_SANDBOX_EXEC_SECONDS);
        let pty = request
            .tty
            .map(|(rows, cols)| agentvm_guest::WinSize { rows, cols });
        let size = std::sync::Arc::new(std::sync::Mutex::new(pty));
        let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stdin_tx, stdin_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);

        // The client's frames: stdin, its end, resizes. A client that goes away ends the
        // program.
        let (size_in, cancel_in) = (size.clone(), cancel.clone());
        let reader = tokio::spawn(async move {
            let mut stdin_tx = Some(stdin_tx);
            loop {
                match read_frame(&mut rd).await {
                    Ok(Some((frames::DATA, data))) => {
                        if let Some(tx) = &stdin_tx {
                            let _ = tx.send(data);
                        }
                    }
                    Ok(Some((frames::STDERR_OR_EOF, _))) => stdin_tx = None,
                    Ok(Some((frames::RESIZE_OR_EXIT, p))) if p.len() == 4 => {
                        let rows = u16::from_be_bytes([p[0], p[1]]);
                        let cols = u16::from_be_bytes([p[2], p[3]]);
                        if rows > 0 && cols > 0 {
                            *size_in.lock().unwrap_or_else(|e| e.into_inner()) =
                                Some(agentvm_guest::WinSize { rows, cols });
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        cancel_in.store(true, std::sync::atomic::Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(frame) = out_rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let command = request_line(&program);
        let vm_name = vm.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let _in_use = in_use;
            let interactive = agentvm_backend::agent_conn::Interactive {
                stdin: Some(Box::new(ChannelReader {
                    rx: stdin_rx,
                    buf: Vec::new(),
                    pos: 0,
                })),
                pty,
                winsize: pty.map(|_| {
                    Box::new(move || *size.lock().unwrap_or_else(|e| e.into_inner()))
                        as Box<dyn Fn() -> Option<agentvm_guest::WinSize> + Send>
                }),
            };
            let result = access.backend.agent(&vm_name).and_then(|agent| {
                Guest::with_cancel(&*agent, cancel).exec_interactive(
                    &program,
                    interactive,
                    &mut |stream, data| {
                        let kind = match stream {
                            Stream::Stdout => frames::DATA,
                            Stream::Stderr => frames::STDERR_OR_EOF,
                        };
                        let _ = out_tx.blocking_send(frames::encode(kind, data));
                    },
                )
            });
            let (frame, code) = match result {
                Ok(o) => {
                    let exit = ExecEvent::Exit {
                        code: o.exit_code,
                        signal: o.signal,
                        timed_out: o.timed_out,
                    };
                    (
                        frames::encode(
                            frames::RESIZE_OR_EXIT,
                            &serde_json::to_vec(&exit).unwrap_or_default(),
                        ),
                        serde_json::json!(o.exit_code),
                    )
                }
                Err(e) => (
                    frames::encode(
                        frames::ERROR,
                        format!("running in {vm_name}: {e}").as_bytes(),
                    ),
                    serde_json::Value::Null,
                ),
            };
            let _ = out_tx.blocking_send(frame);
            if let Some(audit) = audit {
                audit.record(
                    AuditEvent::new(AuditEventType::SandboxExec, Kind::Sandbox, &name, actor)
                        .vm(vm_name.clone())
                        .details(serde_json::json!({
                            "command": command,
                            "exitCode": code,
                            "interactive": true,
                        })),
                );
            }
        })
        .await;
        let _ = writer.await;
        reader.abort();
    });
    switching_to(agentvm_client::attach::PROTOCOL)
}

/// Query of `/v1/sandboxes/{name}/files`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct FileQuery {
    path: String,
    /// Octal mode of an uploaded file (default 644).
    #[serde(default)]
    mode: Option<String>,
}

/// An absolute guest path without NUL and a mode of at most 0o7777.
fn check_file_query(q: &FileQuery) -> Result<u32, String> {
    if !q.path.starts_with('/') || q.path.contains('\0') || q.path.len() > 4096 {
        return Err(format!("path {:?} is not an absolute guest path", q.path));
    }
    match &q.mode {
        None => Ok(0o644),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| format!("mode {m:?} is not an octal file mode such as 644")),
    }
}

/// The sandbox's running VM for a file transfer by `caller`, marked in use until the
/// returned guard is dropped.
async fn transfer_target(
    st: &ApiState,
    name: &str,
    caller: &Caller,
) -> Result<(SandboxAccess, crate::reconcilers::sandbox::InUse, String), Response> {
    let access = access(st)?.clone();
    let obj = sandbox_for(st, name, caller).await?;
    let state = spec_state(&obj);
    if state != SandboxState::Running {
        return Err(error(
            StatusCode::CONFLICT,
            format!(
                "Sandbox/{name} is {} (spec.state); resume or start it first",
                state.as_str()
            ),
            vec![],
        ));
    }
    let in_use = access.sandboxes.begin(name);
    let vm = running_vm(st, name).await?;
    Ok((access, in_use, vm))
}

/// `PUT /v1/sandboxes/{name}/files?path=/abs&mode=644`: the request body becomes that file
/// in the guest (streamed; replaced if it exists). Answers `{"bytes": N}`.
pub(super) async fn upload(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<FileQuery>,
    body: Body,
) -> Response {
    let mode = match check_file_query(&q) {
        Ok(m) => m,
        Err(message) => return error(StatusCode::BAD_REQUEST, message, vec![]),
    };
    let path = q.path.clone();
    receive(&st, caller, &name, &q.path, body, move |conn, src| {
        conn.write_file_from(&path, mode, src)
    })
    .await
}

/// Query of `/v1/sandboxes/{name}/dirs` and `/stat`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct DirQuery {
    path: String,
    /// PUT: the name of the directory the archive holds (its entries' first component).
    #[serde(default)]
    name: Option<String>,
    /// GET: the most archive bytes to send (default [`agentvm_client::MAX_DIR_BYTES`]).
    #[serde(default)]
    max: Option<u64>,
}

/// An absolute guest path without NUL.
fn check_guest_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(format!("path {path:?} is not an absolute guest path"));
    }
    Ok(())
}

/// `PUT /v1/sandboxes/{name}/dirs?path=/abs&name=NAME`: the request body, a tar archive of a
/// directory called NAME (every entry NAME or under it), becomes the new directory `path`
/// in the guest, unpacked by the guest agent (which refuses entries outside it and leaves
/// nothing at `path` when it refuses). Answers `{"bytes": N}`.
pub(super) async fn upload_dir(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<DirQuery>,
    body: Body,
) -> Response {
    if let Err(message) = check_guest_path(&q.path) {
        return error(StatusCode::BAD_REQUEST, message, vec![]);
    }
    let top = match q.name.as_deref() {
        Some(n) if !n.is_empty() && !n.contains('/') && n != "." && n != ".." => n.to_string(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "name= must be the archive's directory name (one path component)",
                vec![],
            )
        }
    };
    let path = q.path.clone();
    receive(&st, caller, &name, &q.path, body, move |conn, src| {
        conn.write_tree_from(&path, &top, src)
    })
    .await
}

/// Streams the request `body` to the guest through `write` (on a blocking thread, with the
/// sandbox's agentvm-guest connection); answers `{"bytes": N}` or why not.
async fn receive(
    st: &ApiState,
    caller: Option<Extension<Caller>>,
    name: &str,
    path: &str,
    body: Body,
    write: impl FnOnce(
            &std::sync::Arc<agentvm_backend::agent_conn::AgentConn>,
            &mut dyn std::io::Read,
        ) -> agentvm_backend::Result<()>
        + Send
        + 'static,
) -> Response {
    use futures::StreamExt;
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let (access, in_use, vm) = match transfer_target(st, name, &caller).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let counted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = counted.clone();
    let shown = path.to_string();
    let written = tokio::task::spawn_blocking(move || {
        let _in_use = in_use;
        let mut src = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let agent = access.backend.agent(&vm).map_err(|e| e.to_string())?;
        let conn = Guest::new(&*agent).agent().ok_or_else(|| {
            format!("agentvm-guest does not answer in {vm}; copying files needs it")
        })?;
        write(&conn, &mut src).map_err(|e| format!("writing {shown} in {vm}: {e}"))
    });
    let mut stream = body.into_data_stream();
    let mut broken = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => {
                count.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if tx.send(b.to_vec()).is_err() {
                    break;
                }
            }
            Err(e) => {
                broken = Some(e.to_string());
                break;
            }
        }
    }
    drop(tx);
    let written = written.await;
    if let Some(e) = broken {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the upload broke off: {e}; {path} may hold part of it"),
            vec![],
        );
    }
    match written {
        Ok(Ok(())) => Json(serde_json::json!({
            "bytes": counted.load(std::sync::atomic::Ordering::Relaxed)
        }))
        .into_response(),
        Ok(Err(message)) => error(StatusCode::BAD_GATEWAY, message, vec![]),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
    }
}

/// `GET /v1/sandboxes/{name}/files?path=/abs`: the guest file, as [`agentvm_client::attach`] frames
/// in a chunked body: `DATA` chunks, then `RESIZE_OR_EXIT` with the byte count (8 bytes,
/// big-endian) when it was read to its end, or `ERROR` with why not — so a client can tell a
/// complete file from one cut short.
pub(super) async fn download(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<FileQuery>,
) -> Response {
    if let Err(message) = check_file_query(&q) {
        return error(StatusCode::BAD_REQUEST, message, vec![]);
    }
    let (access, in_use, vm) = match download_target(&st, caller, &name).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let path = q.path.clone();
    tokio::task::spawn_blocking(move || {
        let _in_use = in_use;
        let result = (|| -> Result<u64, String> {
            let agent = access.backend.agent(&vm).map_err(|e| e.to_string())?;
            let guest = Guest::new(&*agent);
            let mut reader = guest
                .open_reader(&path)
                .map_err(|e| format!("reading {path} in {vm}: {e}"))?;
            pump(&mut reader, &tx, &path, &vm)
        })();
        finish(&tx, result);
    });
    streamed(rx, "application/octet-stream")
}

/// `GET /v1/sandboxes/{name}/dirs?path=/abs&max=N`: the guest directory as a tar archive of
/// at most N bytes made by the guest agent (entries under the path's last component),
/// framed as for `/files`. The guest made it: a client unpacks it as hostile.
pub(super) async fn download_dir(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<DirQuery>,
) -> Response {
    if let Err(message) = check_guest_path(&q.path) {
        return error(StatusCode::BAD_REQUEST, message, vec![]);
    }
    let (access, in_use, vm) = match download_target(&st, caller, &name).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let path = q.path.clone();
    let max = q.max.unwrap_or(agentvm_client::MAX_DIR_BYTES);
    tokio::task::spawn_blocking(move || {
        let _in_use = in_use;
        let result = (|| -> Result<u64, String> {
            let agent = access.backend.agent(&vm).map_err(|e| e.to_string())?;
            let conn = Guest::new(&*agent).agent().ok_or_else(|| {
                format!("agentvm-guest does not answer in {vm}; copying directories needs it")
            })?;
            let mut reader = conn
                .open_tree_reader(&path, max)
                .map_err(|e| format!("reading {path} in {vm}: {e}"))?;
            pump(&mut reader, &tx, &path, &vm)
        })();
        finish(&tx, result);
    });
    streamed(rx, "application/octet-stream")
}

/// The caller's sandbox VM for a download (see [`transfer_target`]).
async fn download_target(
    st: &ApiState,
    caller: Option<Extension<Caller>>,
    name: &str,
) -> Result<(SandboxAccess, crate::reconcilers::sandbox::InUse, String), Response> {
    let caller = caller_of(caller)?;
    transfer_target(st, name, &caller).await
}

/// Copies `reader` to `tx` as `DATA` frames; the bytes copied.
fn pump(
    reader: &mut dyn std::io::Read,
    tx: &tokio::sync::mpsc::Sender<Bytes>,
    path: &str,
    vm: &str,
) -> Result<u64, String> {
    use agentvm_client::attach as frames;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("reading {path} in {vm}: {e}"))?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
        if tx
            .blocking_send(Bytes::from(frames::encode(frames::DATA, &buf[..n])))
            .is_err()
        {
            return Err("the client went away".into());
        }
    }
}

/// The last frame of a download: the byte count, or why it stopped.
fn finish(tx: &tokio::sync::mpsc::Sender<Bytes>, result: Result<u64, String>) {
    use agentvm_client::attach as frames;
    let last = match result {
        Ok(total) => frames::encode(frames::RESIZE_OR_EXIT, &total.to_be_bytes()),
        Err(message) => frames::encode(frames::ERROR, message.as_bytes()),
    };
    let _ = tx.blocking_send(Bytes::from(last));
}

/// `GET /v1/sandboxes/{name}/stat?path=/abs`: what is at that guest path (links followed):
/// [`agentvm_client::PathStat`].
pub(super) async fn stat(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<DirQuery>,
) -> Response {
    if let Err(message) = check_guest_path(&q.path) {
        return error(StatusCode::BAD_REQUEST, message, vec![]);
    }
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let (access, in_use, vm) = match transfer_target(&st, &name, &caller).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let path = q.path.clone();
    let answer = tokio::task::spawn_blocking(move || -> Result<agentvm_guest::PathStat, String> {
        let _in_use = in_use;
        let agent = access.backend.agent(&vm).map_err(|e| e.to_string())?;
        let conn = Guest::new(&*agent).agent().ok_or_else(|| {
            format!("agentvm-guest does not answer in {vm}; copying files needs it")
        })?;
        conn.stat(&path).map_err(|e| format!("{path} in {vm}: {e}"))
    })
    .await;
    match answer {
        Ok(Ok(st)) => Json(agentvm_client::PathStat {
            kind: match st.kind {
                agentvm_guest::PathKind::Missing => agentvm_client::PathKind::Missing,
                agentvm_guest::PathKind::File => agentvm_client::PathKind::File,
                agentvm_guest::PathKind::Directory => agentvm_client::PathKind::Directory,
                agentvm_guest::PathKind::Other => agentvm_client::PathKind::Other,
            },
            size: st.size,
            mode: st.mode,
        })
        .into_response(),
        Ok(Err(message)) => error(StatusCode::BAD_GATEWAY, message, vec![]),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
    }
}

/// Query of `/v1/sandboxes/{name}/forward`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ForwardQuery {
    port: u16,
}

/// `POST /v1/sandboxes/{name}/forward?port=N`, upgraded to [`agentvm_client::FORWARD_PROTOCOL`]: the
/// connection's bytes go to `127.0.0.1:N` in the guest and back, until both sides are done.
pub(super) async fn forward(
    State(st): State<ApiState>,
    caller: Option<Extension<Caller>>,
    UrlPath(name): UrlPath<String>,
    axum::extract::Query(q): axum::extract::Query<ForwardQuery>,
    mut req: axum::extract::Request,
) -> Response {
    let caller = match caller_of(caller) {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if let Err(resp) = wants_upgrade(&req, agentvm_client::FORWARD_PROTOCOL) {
        return resp;
    }
    if q.port == 0 {
        return error(StatusCode::BAD_REQUEST, "port 0 is not a port", vec![]);
    }
    let (access, in_use, vm) = match transfer_target(&st, &name, &caller).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let Ok((ours, theirs)) = std::os::unix::net::UnixStream::pair() else {
            return;
        };
        let port = q.port;
        let carried = tokio::task::spawn_blocking(move || {
            let _in_use = in_use;
            let agent = access.backend.agent(&vm).map_err(|e| e.to_string())?;
            let conn = Guest::new(&*agent).agent().ok_or_else(|| {
                format!("agentvm-guest does not answer in {vm}; forwarding needs it")
            })?;
            conn.forward(port, theirs).map_err(|e| e.to_string())
        });
        let bridged = async {
            ours.set_nonblocking(true)?;
            let mut ours = tokio::net::UnixStream::from_std(ours)?;
            let mut client = hyper_util::rt::TokioIo::new(upgraded);
            tokio::io::copy_bidirectional(&mut client, &mut ours).await
        };
        if let Err(e) = bridged.await {
            tracing::debug!(sandbox = %name, port, error = %e, "forwarded connection ended");
        }
        if let Ok(Err(e)) = carried.await {
            tracing::info!(sandbox = %name, port, "forwarding failed: {e}");
        }
    });
    switching_to(agentvm_client::FORWARD_PROTOCOL)
}
