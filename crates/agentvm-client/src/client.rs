//! `Client`: a small synchronous HTTP/1.1 client of the controller API over its Unix socket,
//! for the CLI (no async runtime needed). One connection per request (`Connection: close`);
//! responses with `Content-Length`, chunked bodies and streams are all read incrementally.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_api::Kind;

use crate::{
    ApplyRequest, ApplyResponse, DeleteResponse, ErrorBody, Health, SpecDirResponse, SpecDirState,
    WatchEvent, NEXT_OFFSET_HEADER, TRUNCATED_HEADER,
};
use agentvm_store::StoredObject;

/// Time allowed for a non-streaming request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest response header block accepted.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket.
    #[error("{}", unreachable_message(socket, source))]
    Unreachable {
        /// The socket.
        socket: PathBuf,
        /// Why connecting failed.
        source: std::io::Error,
    },
    /// The controller answered with an error.
    #[error("{message}{}", details.iter().map(|d| format!("\n  {d}")).collect::<String>())]
    Api {
        /// The HTTP status.
        status: u16,
        /// The error.
        message: String,
        /// Per-object or per-field details.
        details: Vec<String>,
    },
    /// The conversation broke (I/O error, malformed response).
    #[error("talking to the controller at {}: {message}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        message: String,
    },
}

fn unreachable_message(socket: &std::path::Path, source: &std::io::Error) -> String {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        use std::os::unix::fs::MetadataExt;
        let group = std::fs::metadata(socket)
            .map(|m| format!("group {}", m.gid()))
            .unwrap_or_else(|_| "its group".into());
        return format!(
            "controller not reachable at {}: {source}; the socket is mode 0660: run as root, or as a member of {group} (the controller's `socketGroup` / AGENTVM_SOCKET_GROUP)",
            socket.display()
        );
    }
    format!(
        "controller not reachable at {}: {source}; start it with `agentvm controller --spec-dir DIR` (or set AGENTVM_SOCKET to its socket)",
        socket.display()
    )
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for a 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}

/// A client of the controller API at one socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

/// A response whose body is read as it arrives.
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The decoded body.
    pub body: Box<dyn BufRead + Send>,
}

impl Response {
    /// The first header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads an HTTP/1.1 chunked body.
struct Chunked<R> {
    inner: R,
    remaining: u64,
    done: bool,
}

fn invalid(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.into())
}

impl<R: BufRead> Chunked<R> {
    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        (&mut self.inner).take(4096).read_line(&mut line)?;
        if !line.ends_with('\n') {
            return Err(invalid("truncated chunk header"));
        }
        Ok(line.trim_end().to_string())
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.remaining == 0 {
            if self.done {
                return Ok(0);
            }
            let line = self.read_line()?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.read_line()?.is_empty() {}
                self.done = true;
                return Ok(0);
            }
            self.remaining = size;
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(invalid("connection closed inside a chunk"));
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            let crlf = self.read_line()?;
            if !crlf.is_empty() {
                return Err(invalid("missing CRLF after chunk"));
            }
        }
        Ok(n)
    }
}

/// Percent-encodes a query or path value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Newline-delimited [`WatchEvent`]s from `GET /v1/watch`.
pub struct WatchStream {
    body: Box<dyn BufRead + Send>,
    socket: PathBuf,
}

impl Iterator for WatchStream {
    type Item = Result<WatchEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let mut line = String::new();
            match self.body.read_line(&mut line) {
                Ok(0) => return None,
                Ok(_) if line.trim().is_empty() => continue,
                Ok(_) => {
                    return Some(
                        serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
                            socket: self.socket.clone(),
                            message: format!("bad watch event: {e}"),
                        }),
                    )
                }
                Err(e) => {
                    return Some(Err(ClientError::Protocol {
                        socket: self.socket.clone(),
                        message: e.to_string(),
                    }))
                }
            }
        }
    }
}

/// The body of a request.
enum RequestBody<'a> {
    None,
    /// JSON bytes.
    Json(&'a [u8]),
    /// This many bytes read from a source.
    Stream(&'a mut dyn Read, u64),
}

/// Newline-delimited [`crate::ExecEvent`]s from `POST /v1/sandboxes/{name}/exec`.
pub struct ExecStream {
    body: Box<dyn BufRead + Send>,
    socket: PathBuf,
}

impl std::fmt::Debug for ExecStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecStream").finish_non_exhaustive()
    }
}

impl Iterator for ExecStream {
    type Item = Result<crate::ExecEvent, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.body.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line).map_err(|e| ClientError::Protocol {
                    socket: self.socket.clone(),
                    message: format!("bad exec event: {e}"),
                }),
            ),
            Err(e) => Some(Err(ClientError::Protocol {
                socket: self.socket.clone(),
                message: e.to_string(),
            })),
        }
    }
}

/// Output of `GET /v1/runs/{name}/logs`.
pub struct Logs {
    /// The bytes (stdout and stderr interleaved); streams until the run ends with `follow`.
    pub body: Box<dyn BufRead + Send>,
    /// Offset to continue from (without `follow`).
    pub next_offset: Option<u64>,
    /// True when output past the per-run cap was dropped (without `follow`).
    pub truncated: bool,
}

impl std::fmt::Debug for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logs")
            .field("next_offset", &self.next_offset)
            .field("truncated", &self.truncated)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the API at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn protocol(&self, message: impl Into<String>) -> ClientError {
        ClientError::Protocol {
            socket: self.socket.clone(),
            message: message.into(),
        }
    }

    /// Sends one request; returns the response with its body unread. `timeout` bounds
    /// every read (none for streams).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Option<Duration>,
    ) -> Result<Response, ClientError> {
        let body = match body {
            Some(b) => RequestBody::Json(b),
            None => RequestBody::None,
        };
        self.send(method, path, body, timeout, None).map(|(r, _)| r)
    }

    /// [`Client::request`], asking to switch to protocol `upgrade` when given; also returns
    /// a handle to write on the connection (after a `101`).
    fn send(
        &self,
        method: &str,
        path: &str,
        mut body: RequestBody<'_>,
        timeout: Option<Duration>,
        upgrade: Option<&str>,
    ) -> Result<(Response, UnixStream), ClientError> {
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        stream
            .set_read_timeout(timeout)
            .and_then(|_| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(|e| self.protocol(e.to_string()))?;
        let connection = match upgrade {
            Some(p) => format!("Upgrade\r\nUpgrade: {p}\r\nContent-Length: 0"),
            None => "close".to_string(),
        };
        let writer = stream
            .try_clone()
            .map_err(|e| self.protocol(e.to_string()))?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: agentvm\r\nConnection: {connection}\r\nAccept: application/json\r\n"
        );
        match &body {
            RequestBody::None => {}
            RequestBody::Json(b) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )),
            RequestBody::Stream(_, len) => head.push_str(&format!(
                "Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n"
            )),
        }
        head.push_str("\r\n");
        let sent = stream.write_all(head.as_bytes()).and_then(|_| {
            match &mut body {
                RequestBody::None => {}
                RequestBody::Json(b) => stream.write_all(b)?,
                RequestBody::Stream(src, len) => {
                    let copied = std::io::copy(&mut src.take(*len), &mut stream)?;
                    if copied != *len {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the source ended after {copied} of {len} bytes"),
                        ));
                    }
                }
            }
            stream.flush()
        });
        // A server that refuses early (413) may close before reading everything: still
        // try to read its answer.
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        let read = (&mut reader)
            .take(MAX_HEADER_BYTES as u64)
            .read_line(&mut status_line);
        if let Err(e) = read.as_ref().and(sent.as_ref()) {
            if status_line.is_empty() {
                return Err(self.protocol(e.to_string()));
            }
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|_| status_line.starts_with("HTTP/1."))
            .ok_or_else(|| self.protocol(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        let mut header_bytes = status_line.len();
        loop {
            let mut line = String::new();
            let n = (&mut reader)
                .take(MAX_HEADER_BYTES as u64)
                .read_line(&mut line)
                .map_err(|e| self.protocol(e.to_string()))?;
            header_bytes += n;
            if n == 0 || header_bytes > MAX_HEADER_BYTES {
                return Err(self.protocol("truncated or oversized response headers"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            }
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body: Box<dyn BufRead + Send> = if find("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            Box::new(BufReader::new(Chunked {
                inner: reader,
                remaining: 0,
                done: false,
            }))
        } else if let Some(len) = find("content-length") {
            let len: u64 = len
                .parse()
                .map_err(|_| self.protocol(format!("bad content-length {len:?}")))?;
            Box::new(reader.take(len))
        } else {
            Box::new(reader)
        };
        Ok((
            Response {
                status,
                headers,
                body,
            },
            writer,
        ))
    }

    /// Sends a request and decodes a JSON answer; non-2xx statuses become
    /// [`ClientError::Api`].
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ClientError> {
        let mut resp = self.request(method, path, body, Some(REQUEST_TIMEOUT))?;
        let mut bytes = Vec::new();
        resp.body
            .read_to_end(&mut bytes)
            .map_err(|e| self.protocol(format!("reading the response: {e}")))?;
        self.check(resp.status, &bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| self.protocol(format!("bad response: {e}")))
    }

    fn check(&self, status: u16, bytes: &[u8]) -> Result<(), ClientError> {
        if (200..300).contains(&status) {
            return Ok(());
        }
        let (message, details) = match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(e) => (e.error, e.details),
            Err(_) => (
                format!(
                    "controller answered {status}: {}",
                    String::from_utf8_lossy(bytes).trim()
                ),
                vec![],
            ),
        };
        Err(ClientError::Api {
            status,
            message,
            details,
        })
    }

    /// `GET /healthz`.
    pub fn health(&self) -> Result<Health, ClientError> {
        self.call("GET", "/healthz", None)
    }

    /// `POST /v1/apply`.
    pub fn apply(&self, request: &ApplyRequest) -> Result<ApplyResponse, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| self.protocol(e.to_string()))?;
        self.call("POST", "/v1/apply", Some(&body))
    }

    /// `DELETE /v1/objects/{kind}/{name}`; a missing object is a 404 [`ClientError::Api`]
    /// (see [`ClientError::is_not_found`]).
    pub fn delete(
        &self,
        kind: Kind,
        name: &str,
        force: bool,
    ) -> Result<DeleteResponse, ClientError> {
        let path = format!(
            "/v1/objects/{}/{}{}",
            kind,
            encode(name),
            if force { "?force=true" } else { "" }
        );
        self.call("DELETE", &path, None)
    }

    /// `GET /v1/objects/{kind}/{name}`.
    pub fn get(&self, kind: Kind, name: &str) -> Result<StoredObject, ClientError> {
        self.call("GET", &format!("/v1/objects/{kind}/{}", encode(name)), None)
    }

    /// `GET /v1/objects`: every object of `kind` (all when `None`) matching `selector`.
    pub fn list(
        &self,
        kind: Option<Kind>,
        selector: Option<&str>,
    ) -> Result<Vec<StoredObject>, ClientError> {
        let mut query = Vec::new();
        if let Some(kind) = kind {
            query.push(format!("kind={kind}"));
        }
        if let Some(sel) = selector.filter(|s| !s.is_empty()) {
            query.push(format!("selector={}", encode(sel)));
        }
        let path = if query.is_empty() {
            "/v1/objects".to_string()
        } else {
            format!("/v1/objects?{}", query.join("&"))
        };
        self.call("GET", &path, None)
    }

    /// `GET /v1/watch`: events from now on (after one `Initial` per existing object when
    /// `initial`). Blocks while waiting for events.
    pub fn watch(&self, kind: Option<Kind>, initial: bool) -> Result<WatchStream, ClientError> {
        let mut path = format!("/v1/watch?initial={initial}");
        if let Some(kind) = kind {
            path.push_str(&format!("&kind={kind}"));
        }
        let mut resp = self.request("GET", &path, None, None)?;
        if resp.status != 200 {
            let mut bytes = Vec::new();
            let _ = resp.body.read_to_end(&mut bytes);
            self.check(resp.status, &bytes)?;
        }
        Ok(WatchStream {
            body: resp.body,
            socket: self.socket.clone(),
        })
    }

    /// `GET /v1/runs/{name}/logs`.
    pub fn logs(&self, run: &str, offset: u64, follow: bool) -> Result<Logs, ClientError> {
        let path = format!(
            "/v1/runs/{}/logs?offset={offset}&follow={follow}",
            encode(run)
        );
        let timeout = (!follow).then_some(REQUEST_TIMEOUT);
        let mut resp = self.request("GET", &path, None, timeout)?;
        if resp.status != 200 {
            let mut bytes = Vec::new();
            let _ = resp.body.read_to_end(&mut bytes);
            self.check(resp.status, &bytes)?;
        }
        Ok(Logs {
            next_offset: resp.header(NEXT_OFFSET_HEADER).and_then(|v| v.parse().ok()),
            truncated: resp.header(TRUNCATED_HEADER) == Some("true"),
            body: resp.body,
        })
    }

    /// `POST /v1/sandboxes/{name}/exec`: the command's output and exit, as they come.
    pub fn sandbox_exec(
        &self,
        sandbox: &str,
        request: &crate::SandboxExecRequest,
    ) -> Result<ExecStream, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| self.protocol(e.to_string()))?;
        let path = format!("/v1/sandboxes/{}/exec", encode(sandbox));
        let mut resp = self.request("POST", &path, Some(&body), None)?;
        if resp.status != 200 {
            let mut bytes = Vec::new();
            let _ = resp.body.read_to_end(&mut bytes);
            self.check(resp.status, &bytes)?;
        }
        Ok(ExecStream {
            body: resp.body,
            socket: self.socket.clone(),
        })
    }

    /// `POST /v1/sandboxes/{name}/state`: sets the sandbox's desired power state.
    pub fn sandbox_state(
        &self,
        sandbox: &str,
        state: agentvm_api::SandboxState,
    ) -> Result<StoredObject, ClientError> {
        let body = serde_json::to_vec(&crate::SandboxStateRequest { state })
            .map_err(|e| self.protocol(e.to_string()))?;
        let path = format!("/v1/sandboxes/{}/state", encode(sandbox));
        self.call("POST", &path, Some(&body))
    }

    /// `POST path` switched to `protocol`: the connection to read from and to write to.
    fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> Result<(Box<dyn BufRead + Send>, UnixStream), ClientError> {
        let (mut resp, writer) =
            self.send("POST", path, RequestBody::None, None, Some(protocol))?;
        if resp.status != 101 {
            let mut bytes = Vec::new();
            let _ = resp.body.read_to_end(&mut bytes);
            self.check(resp.status, &bytes)?;
            return Err(self.protocol(format!("expected 101, got {}", resp.status)));
        }
        Ok((resp.body, writer))
    }

    /// `POST /v1/sandboxes/{name}/attach`: an interactive exec. Sends `request` as the
    /// first frame; returns the connection to read [`crate::attach`] frames from and one to
    /// write them to. The write side carries no timeout of its own beyond each write's.
    pub fn sandbox_attach(
        &self,
        sandbox: &str,
        request: &crate::AttachRequest,
    ) -> Result<(Box<dyn BufRead + Send>, UnixStream), ClientError> {
        let path = format!("/v1/sandboxes/{}/attach", encode(sandbox));
        let (reader, mut writer) = self.upgrade(&path, crate::attach::PROTOCOL)?;
        let json = serde_json::to_vec(request).map_err(|e| self.protocol(e.to_string()))?;
        writer
            .write_all(&crate::attach::encode(crate::attach::REQUEST, &json))
            .map_err(|e| self.protocol(e.to_string()))?;
        Ok((reader, writer))
    }

    /// `POST /v1/sandboxes/{name}/forward`: a connection to `127.0.0.1:port` in the
    /// sandbox; returns the sides to read from and write to.
    pub fn sandbox_forward(
        &self,
        sandbox: &str,
        port: u16,
    ) -> Result<(Box<dyn BufRead + Send>, UnixStream), ClientError> {
        let path = format!("/v1/sandboxes/{}/forward?port={port}", encode(sandbox));
        self.upgrade(&path, crate::FORWARD_PROTOCOL)
    }

    /// `PUT /v1/sandboxes/{name}/files`: `len` bytes of `src` become guest file `path` (mode
    /// `mode`, octal); the bytes written.
    pub fn sandbox_upload(
        &self,
        sandbox: &str,
        path: &str,
        mode: u32,
        src: &mut dyn Read,
        len: u64,
    ) -> Result<u64, ClientError> {
        let url = format!(
            "/v1/sandboxes/{}/files?path={}&mode={mode:o}",
            encode(sandbox),
            encode(path)
        );
        self.put_stream(&url, src, len)
    }

    /// `PUT /v1/sandboxes/{name}/dirs`: `len` bytes of `src`, the tar archive of a directory
    /// called `name`, become the new guest directory `path`; the archive bytes sent.
    pub fn sandbox_upload_dir(
        &self,
        sandbox: &str,
        path: &str,
        name: &str,
        src: &mut dyn Read,
        len: u64,
    ) -> Result<u64, ClientError> {
        let url = format!(
            "/v1/sandboxes/{}/dirs?path={}&name={}",
            encode(sandbox),
            encode(path),
            encode(name)
        );
        self.put_stream(&url, src, len)
    }

    /// A streamed `PUT` answered `{"bytes": N}`; N.
    fn put_stream(&self, url: &str, src: &mut dyn Read, len: u64) -> Result<u64, ClientError> {
        let (mut resp, _) = self.send(
            "PUT",
            url,
            RequestBody::Stream(src, len),
            Some(REQUEST_TIMEOUT),
            None,
        )?;
        let mut bytes = Vec::new();
        resp.body
            .read_to_end(&mut bytes)
            .map_err(|e| self.protocol(format!("reading the response: {e}")))?;
        self.check(resp.status, &bytes)?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| self.protocol(e.to_string()))?;
        Ok(v["bytes"].as_u64().unwrap_or(0))
    }

    /// `GET /v1/sandboxes/{name}/stat`: what is at guest path `path` (links followed).
    pub fn sandbox_stat(&self, sandbox: &str, path: &str) -> Result<crate::PathStat, ClientError> {
        let url = format!(
            "/v1/sandboxes/{}/stat?path={}",
            encode(sandbox),
            encode(path)
        );
        self.call("GET", &url, None)
    }

    /// `GET /v1/sandboxes/{name}/dirs`: the guest directory `path` as a tar archive of at
    /// most `max` bytes (made by the guest: unpack it as hostile) copied into `dst`; its
    /// size. An error when the guest could not send all of it.
    pub fn sandbox_download_dir(
        &self,
        sandbox: &str,
        path: &str,
        max: u64,
        dst: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let url = format!(
            "/v1/sandboxes/{}/dirs?path={}&max={max}",
            encode(sandbox),
            encode(path)
        );
        self.download_frames(&url, dst)
    }

    /// `GET /v1/sandboxes/{name}/files`: guest file `path` copied into `dst`; its size. An
    /// error when the guest could not send all of it.
    pub fn sandbox_download(
        &self,
        sandbox: &str,
        path: &str,
        dst: &mut dyn Write,
    ) -> Result<u64, ClientError> {
        let url = format!(
            "/v1/sandboxes/{}/files?path={}",
            encode(sandbox),
            encode(path)
        );
        self.download_frames(&url, dst)
    }

    /// A download framed as [`crate::attach`] frames (`DATA`, then the count or `ERROR`)
    /// copied into `dst`; its size.
    fn download_frames(&self, url: &str, dst: &mut dyn Write) -> Result<u64, ClientError> {
        use crate::attach as frames;
        let mut resp = self.request("GET", url, None, Some(REQUEST_TIMEOUT))?;
        if resp.status != 200 {
            let mut bytes = Vec::new();
            let _ = resp.body.read_to_end(&mut bytes);
            self.check(resp.status, &bytes)?;
        }
        let mut written = 0u64;
        loop {
            match frames::read_frame(&mut resp.body).map_err(|e| self.protocol(e.to_string()))? {
                Some((frames::DATA, data)) => {
                    dst.write_all(&data)
                        .map_err(|e| self.protocol(format!("writing the copy: {e}")))?;
                    written += data.len() as u64;
                }
                Some((frames::RESIZE_OR_EXIT, total)) if total.len() == 8 => {
                    let total = u64::from_be_bytes(total.try_into().unwrap_or_default());
                    if total != written {
                        return Err(self.protocol(format!("got {written} of {total} bytes")));
                    }
                    return Ok(written);
                }
                Some((frames::ERROR, text)) => {
                    return Err(ClientError::Api {
                        status: 502,
                        message: String::from_utf8_lossy(&text).into_owned(),
                        details: vec![],
                    })
                }
                Some(_) => return Err(self.protocol("unexpected frame in a download")),
                None => return Err(self.protocol("the download ended before the file did")),
            }
        }
    }

    /// `POST /v1/sandboxes/{name}/rollback`: asks for the sandbox to be rolled back to
    /// `snapshot`.
    pub fn sandbox_rollback(
        &self,
        sandbox: &str,
        snapshot: &str,
    ) -> Result<StoredObject, ClientError> {
        let body = serde_json::to_vec(&crate::SandboxRollbackRequest {
            snapshot: snapshot.to_string(),
        })
        .map_err(|e| self.protocol(e.to_string()))?;
        let path = format!("/v1/sandboxes/{}/rollback", encode(sandbox));
        self.call("POST", &path, Some(&body))
    }

    /// `GET /v1/specdir/errors`: `None` when the controller watches no directory.
    pub fn spec_dir(&self) -> Result<Option<SpecDirState>, ClientError> {
        Ok(self
            .call::<SpecDirResponse>("GET", "/v1/specdir/errors", None)?
            .spec_dir)
    }

    /// `POST /v1/nodes/{name}/cordon`.
    pub fn cordon(&self, node: &str, cordoned: bool) -> Result<crate::NodesResponse, ClientError> {
        let body = serde_json::to_vec(&crate::CordonRequest { cordoned })
            .map_err(|e| self.protocol(e.to_string()))?;
        self.call(
            "POST",
            &format!("/v1/nodes/{}/cordon", encode(node)),
            Some(&body),
        )
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Result<crate::NodesResponse, ClientError> {
        self.call("GET", "/v1/nodes", None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunked_bodies() {
        let raw = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        let mut c = Chunked {
            inner: &raw[..],
            remaining: 0,
            done: false,
        };
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello, world");
        let bad = b"zz\r\n";
        let mut c = Chunked {
            inner: &bad[..],
            remaining: 0,
            done: false,
        };
        assert!(c.read_to_string(&mut String::new()).is_err());
    }

    #[test]
    fn unreachable_says_how_to_start_the_controller() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.sock");
        let err = Client::new(&sock).health().unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("controller not reachable at {}", sock.display())));
        assert!(text.contains("agentvm controller --spec-dir DIR"), "{text}");
    }

    #[test]
    fn encodes_query_values() {
        assert_eq!(encode("tier=a,b!=c"), "tier%3Da%2Cb%21%3Dc");
        assert_eq!(encode("plain-name_1.x~"), "plain-name_1.x~");
    }
}
