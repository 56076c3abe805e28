//! The host side of `agentvm-guest`, agentvm's own agent in every guest: one connection per
//! VM over the Unix socket of its virtio-serial channel ([`agentvm_guest::PORT_NAME`]),
//! multiplexed streams under credit-based flow control, exec with live output, stdin and a
//! terminal, files in and out, TCP connections to guest ports, and the clock/entropy
//! refresh after a reset.
//!
//! The guest is hostile: the reader thread bounds every frame ([`agentvm_guest::MAX_FRAME`],
//! checked before anything is allocated), charges every message to its stream's window and
//! ends the connection when a guest sends past it, drops frames of streams nobody waits for,
//! and every call has a timeout. A connection that fails is dropped; the next call makes a
//! new one (and a guest whose agent does not answer is served by qemu-guest-agent, see
//! [`crate::guest::Guest`]).

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentvm_guest::{
    cost, read_frame, scan_for, sync_bytes, write_frame, ExecSpec, PathStat, ToGuest, ToHost,
    WinSize, FRAME_COST, GUEST_SYNC, HOST_SYNC, MAX_CHUNK, MAX_FRAME, TREE_VERSION, WINDOW,
};

use crate::error::{BackendError, Result};
use crate::guest::{ExecOutcome, ExecRequest, ServedBy, Stream, DEFAULT_PATH};

/// How long the sync answer is waited for on one attempt.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Timeout of a call that should answer at once (ping, clock, start of an exec).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for one chunk of a file transfer to be acknowledged.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// Non-data messages a stream may have queued on top of its data window (a legitimate agent
/// sends a handful: `Started`, `Exited`, credits).
const CONTROL_SLACK: u64 = 1024 * FRAME_COST;
/// Bytes of output the sync answer may be preceded by (stale output of an earlier
/// connection) before the agent counts as not answering.
const SYNC_SCAN_LIMIT: usize = 4 * 1024 * 1024;
/// A guest whose agent did not answer is not asked again for this long (its calls go to
/// qemu-guest-agent meanwhile).
const ABSENT_FOR: Duration = Duration::from_secs(30);

type Shared = Mutex<HashMap<u32, Slot>>;

struct Slot {
    tx: Sender<ToHost>,
    queued: Arc<AtomicU64>,
}

/// One connection to a VM's `agentvm-guest`.
pub struct AgentConn {
    vm: String,
    path: PathBuf,
    w: Mutex<UnixStream>,
    streams: Arc<Shared>,
    dead: Arc<Mutex<Option<String>>>,
    next: AtomicU32,
}

/// The receiving end of one stream.
struct StreamRx {
    conn: Arc<AgentConn>,
    id: u32,
    rx: Receiver<ToHost>,
    queued: Arc<AtomicU64>,
    /// Credit earned by consumed data, not yet sent back.
    owed: u64,
}

impl StreamRx {
    /// The next message within `timeout`: `Ok(None)` on timeout.
    fn recv(&mut self, timeout: Duration) -> Result<Option<ToHost>> {
        match self.rx.recv_timeout(timeout) {
            Ok(m) => {
                let c = m.cost();
                self.queued.fetch_sub(c, Ordering::SeqCst);
                if matches!(
                    m,
                    ToHost::Stdout(_) | ToHost::Stderr(_) | ToHost::FileData(_)
                ) {
                    self.owed += c;
                    // Acknowledge in batches (a credit frame per quarter window).
                    if self.owed >= WINDOW / 4 {
                        let n = std::mem::take(&mut self.owed);
                        self.conn.send(self.id, &ToGuest::Credit(n))?;
                    }
                }
                Ok(Some(m))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self.conn.gone()),
        }
    }

    /// Acknowledge everything consumed so far now (a reader that waits for more).
    fn flush_credit(&mut self) -> Result<()> {
        if self.owed > 0 {
            let n = std::mem::take(&mut self.owed);
            self.conn.send(self.id, &ToGuest::Credit(n))?;
        }
        Ok(())
    }
}

impl Drop for StreamRx {
    fn drop(&mut self) {
        self.conn
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u64::from_le_bytes(b) ^ now_nanos()
}

/// A host connection [`AgentConn::forward`] carries to a guest port: a TCP connection, or
/// one end of a Unix socket pair (the controller bridging an API client).
pub trait ForwardStream: Read + Write + Send + 'static {
    /// A second handle to read from while this one writes.
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>>;
    /// Shuts down one or both directions.
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()>;
}

impl ForwardStream for std::net::TcpStream {
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        std::net::TcpStream::shutdown(self, how)
    }
}

impl ForwardStream for std::os::unix::net::UnixStream {
    fn reader(&self) -> std::io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::shutdown(self, how)
    }
}

/// Terminal and stdin of an interactive exec.
pub struct Interactive {
    /// Fed to the program's stdin (or terminal) until it ends; then stdin is closed.
    pub stdin: Option<Box<dyn Read + Send>>,
    /// Run on a terminal of this size.
    pub pty: Option<WinSize>,
    /// Polled while the program runs: a new size is sent to its terminal.
    pub winsize: Option<Box<dyn Fn() -> Option<WinSize> + Send>>,
}

impl AgentConn {
    /// Connect to the agent behind `path` (the VM's channel socket) and sync with it.
    /// Two attempts: the second first fills any frame the agent may be half-way through
    /// (a VM reset to a moment inside a transfer).
    pub fn connect(vm: &str, path: &Path, timeout: Duration) -> Result<Arc<AgentConn>> {
        let unavailable = |message: String| BackendError::GuestAgentUnavailable {
            vm: vm.to_string(),
            message,
        };
        let stream = UnixStream::connect(path)
            .map_err(|e| unavailable(format!("connect {}: {e}", path.display())))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| unavailable(e.to_string()))?;
        let mut reader = BufReader::with_capacity(
            MAX_CHUNK + 64,
            stream.try_clone().map_err(|e| unavailable(e.to_string()))?,
        );
        let mut w = stream;
        let mut synced = false;
        for attempt in 0..2 {
            let nonce = random_u64();
            let pad = if attempt == 0 { 4 } else { MAX_FRAME + 4 };
            let mut hello = vec![0xffu8; pad];
            hello.extend_from_slice(&sync_bytes(&HOST_SYNC, nonce));
            w.write_all(&hello)
                .map_err(|e| unavailable(format!("write: {e}")))?;
            let deadline = Instant::now() + timeout;
            reader
                .get_ref()
                .set_read_timeout(Some(timeout))
                .map_err(|e| unavailable(e.to_string()))?;
            match scan_for(&mut reader, &GUEST_SYNC, nonce, SYNC_SCAN_LIMIT) {
                Ok(true) => {
                    synced = true;
                    break;
                }
                Ok(false) => {
                    return Err(unavailable(
                        "no sync answer in the first 4 MiB of its output".into(),
                    ))
                }
                Err(e) if Instant::now() >= deadline || is_timeout(&e) => continue,
                Err(e) => return Err(unavailable(format!("read: {e}"))),
            }
        }
        if !synced {
            return Err(unavailable(format!(
                "no answer to sync within {} ms",
                timeout.as_millis()
            )));
        }
        reader
            .get_ref()
            .set_read_timeout(None)
            .and_then(|_| w.set_write_timeout(Some(CALL_TIMEOUT)))
            .map_err(|e| unavailable(e.to_string()))?;
        let streams: Arc<Shared> = Arc::default();
        let dead: Arc<Mutex<Option<String>>> = Arc::default();
        {
            let (streams, dead, vm) = (streams.clone(), dead.clone(), vm.to_string());
            std::thread::Builder::new()
                .name(format!("agent-{vm}"))
                .spawn(move || read_loop(reader, &streams, &dead, &vm))
                .map_err(|e| unavailable(format!("no reader thread: {e}")))?;
        }
        Ok(Arc::new(AgentConn {
            vm: vm.to_string(),
            path: path.to_path_buf(),
            w: Mutex::new(w),
            streams,
            dead,
            next: AtomicU32::new(1),
        }))
    }

    /// The VM's name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// End the connection: every waiting call fails, and the agent (once it syncs with a
    /// new connection) kills what this one started.
    pub fn close(&self) {
        self.kill("closed by the host");
    }

    /// Why the connection ended, when it has.
    pub fn dead(&self) -> Option<String> {
        self.dead.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn gone(&self) -> BackendError {
        BackendError::GuestAgentUnavailable {
            vm: self.vm.clone(),
            message: format!(
                "agentvm-guest connection ended: {}",
                self.dead().unwrap_or_else(|| "closed".into())
            ),
        }
    }

    fn kill(&self, why: &str) {
        let mut d = self.dead.lock().unwrap_or_else(|e| e.into_inner());
        d.get_or_insert_with(|| why.to_string());
        drop(d);
        if let Ok(w) = self.w.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }

    fn send(&self, stream: u32, msg: &ToGuest) -> Result<()> {
        if self.dead().is_some() {
            return Err(self.gone());
        }
        let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_frame(&mut *w, stream, msg) {
            drop(w);
            self.kill(&format!("write: {e}"));
            return Err(self.gone());
        }
        Ok(())
    }

    fn open(self: &Arc<Self>) -> Result<StreamRx> {
        if self.dead().is_some() {
            return Err(self.gone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed).max(1);
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicU64::new(0));
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Slot {
                    tx,
                    queued: queued.clone(),
                },
            );
        Ok(StreamRx {
            conn: self.clone(),
            id,
            rx,
            queued,
            owed: 0,
        })
    }

    /// The guest's refusal of request `what`, its text cut to a status-fit length.
    fn refused(&self, what: impl Into<String>, message: &str) -> BackendError {
        BackendError::GuestCommand {
            vm: self.vm.clone(),
            command: what.into(),
            message: bounded(message),
        }
    }

    /// Wait for the answer of stream `rx` until `timeout`, taking credits as they come: the
    /// guest's `Done`, or its refusal, a protocol error, or (silence) a dropped connection.
    fn until_done(
        &self,
        rx: &mut StreamRx,
        what: &str,
        timeout: Duration,
        mut on_credit: impl FnMut(u64) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match rx.recv(deadline.saturating_duration_since(Instant::now()))? {
                Some(ToHost::Credit(n)) => {
                    if on_credit(n) {
                        return Ok(());
                    }
                }
                Some(ToHost::Done) => return Ok(()),
                Some(ToHost::Error { message }) => return Err(self.refused(what, &message)),
                Some(other) => return Err(self.protocol(what, &other)),
                None => {
                    self.kill(&format!("{what}: no answer within {timeout:?}"));
                    return Err(self.gone());
                }
            }
        }
    }

    fn protocol(&self, what: &str, got: &ToHost) -> BackendError {
        let e = BackendError::Protocol {
            what: format!("agentvm-guest {what} on {}", self.vm),
            message: format!("unexpected {}", describe(got)),
        };
        self.kill(&e.to_string());
        e
    }

    /// Wait for the one answer of a one-shot request.
    fn answer(&self, rx: &mut StreamRx, what: &str) -> Result<ToHost> {
        match rx.recv(CALL_TIMEOUT)? {
            Some(m) => Ok(m),
            None => {
                self.kill(&format!("{what}: no answer within {CALL_TIMEOUT:?}"));
                Err(BackendError::Timeout {
                    what: format!("agentvm-guest of {} to answer {what}", self.vm),
                    after: CALL_TIMEOUT,
                })
            }
        }
    }

    fn done(&self, rx: &mut StreamRx, what: &str) -> Result<()> {
        match self.answer(rx, what)? {
            ToHost::Done => Ok(()),
            ToHost::Error { message } => Err(self.refused(what.to_string(), &message)),
            other => Err(self.protocol(what, &other)),
        }
    }

    /// Round trip; returns the guest's clock (nanoseconds since the epoch).
    pub fn ping(self: &Arc<Self>) -> Result<u64> {
        self.ping_within(CALL_TIMEOUT)
    }

    /// [`AgentConn::ping`] with its own timeout (a silent agent loses the connection).
    pub fn ping_within(self: &Arc<Self>, timeout: Duration) -> Result<u64> {
        let mut rx = self.open()?;
        self.send(rx.id, &ToGuest::Ping)?;
        match rx.recv(timeout)? {
            Some(ToHost::Pong { unix_nanos, .. }) => Ok(unix_nanos),
            Some(other) => Err(self.protocol("ping", &other)),
            None => {
                self.kill(&format!("ping: no answer within {timeout:?}"));
                Err(BackendError::Timeout {
                    what: format!("agentvm-guest of {} to answer a ping", self.vm),
                    after: timeout,
                })
            }
        }
    }

    /// Reseed the guest kernel's RNG with `entropy` (credited, then `RNDRESEEDCRNG`).
    pub fn reseed(self: &Arc<Self>, entropy: &[u8]) -> Result<()> {
        let mut rx = self.open()?;
        self.send(
            rx.id,
            &ToGuest::Reseed {
                entropy: entropy.to_vec(),
            },
        )?;
        self.done(&mut rx, "reseed")
    }

    /// Set the guest's clock to the host's.
    pub fn set_clock(self: &Arc<Self>) -> Result<()> {
        let mut rx = self.open()?;
        self.send(
            rx.id,
            &ToGuest::SetClock {
                unix_nanos: now_nanos(),
            },
        )?;
        self.done(&mut rx, "set clock")
    }

    /// Write `data` to `path` in the guest (created with mode 0644, or truncated).
    pub fn write_file(self: &Arc<Self>, path: &str, data: &[u8]) -> Result<()> {
        self.write_file_from(path, 0o644, &mut std::io::Cursor::new(data))
    }

    /// Write what `src` yields to `path` in the guest, streaming under the agent's credit.
    pub fn write_file_from(
        self: &Arc<Self>,
        path: &str,
        mode: u32,
        src: &mut dyn Read,
    ) -> Result<()> {
        let request = ToGuest::WriteFile {
            path: path.to_string(),
            mode,
        };
        self.send_stream(request, path, &format!("write {path}"), src)
    }

    /// The protocol version of the agent (a round trip).
    pub fn version(self: &Arc<Self>) -> Result<u32> {
        let mut rx = self.open()?;
        self.send(rx.id, &ToGuest::Ping)?;
        match self.answer(&mut rx, "ping")? {
            ToHost::Pong { version, .. } => Ok(version),
            other => Err(self.protocol("ping", &other)),
        }
    }

    /// An error unless the agent copies directories (an older one would drop the
    /// connection on the request).
    fn require_trees(self: &Arc<Self>, what: &str) -> Result<()> {
        let version = self.version()?;
        if version < TREE_VERSION {
            return Err(self.refused(
                what,
                &format!(
                    "agentvm-guest in this VM speaks protocol {version}; this needs \
                     {TREE_VERSION} or later: rebuild the image (`agentvm image build`) with \
                     this agentvm's agent"
                ),
            ));
        }
        Ok(())
    }

    /// What is at `path` in the guest (links followed).
    pub fn stat(self: &Arc<Self>, path: &str) -> Result<PathStat> {
        let what = format!("stat {path}");
        self.require_trees(&what)?;
        let mut rx = self.open()?;
        self.send(
            rx.id,
            &ToGuest::Stat {
                path: path.to_string(),
            },
        )?;
        match self.answer(&mut rx, &what)? {
            ToHost::Stat(st) => Ok(st),
            ToHost::Error { message } => Err(self.refused(what, &message)),
            other => Err(self.protocol(&what, &other)),
        }
    }

    /// Make the new directory `path` in the guest from the tar stream `src` of a directory
    /// called `name` (see [`agentvm_guest::tree`]); the agent refuses entries outside it
    /// and leaves nothing at `path` when it refuses.
    pub fn write_tree_from(
        self: &Arc<Self>,
        path: &str,
        name: &str,
        src: &mut dyn Read,
    ) -> Result<()> {
        let what = format!("copy a directory to {path}");
        self.require_trees(&what)?;
        let request = ToGuest::WriteTree {
            path: path.to_string(),
            name: name.to_string(),
        };
        self.send_stream(request, path, &what, src)
    }

    /// The directory `path` in the guest as a tar stream of at most `max` bytes (see
    /// [`agentvm_guest::tree`]; the guest made it: unpack it as hostile).
    pub fn open_tree_reader(self: &Arc<Self>, path: &str, max: u64) -> Result<AgentFileReader> {
        self.require_trees(&format!("copy the directory {path}"))?;
        let request = ToGuest::ReadTree {
            path: path.to_string(),
            max,
        };
        self.start_reading(request, path, max)
    }

    /// Send `request`, then what `src` yields as its data under the agent's credit, then
    /// the end; wait for the agent's answer.
    fn send_stream(
        self: &Arc<Self>,
        request: ToGuest,
        path: &str,
        what: &str,
        src: &mut dyn Read,
    ) -> Result<()> {
        let mut rx = self.open()?;
        self.send(rx.id, &request)?;
        let mut credit = WINDOW;
        let mut buf = vec![0u8; MAX_CHUNK];
        let what = what.to_string();
        loop {
            if credit < cost(MAX_CHUNK) {
                // Wait for credit; a `Done` here would be out of turn.
                self.until_done(&mut rx, &what, TRANSFER_TIMEOUT, |n| {
                    credit = credit.saturating_add(n).min(WINDOW);
                    credit >= cost(MAX_CHUNK)
                })?;
                if credit < cost(MAX_CHUNK) {
                    return Err(self.protocol(&what, &ToHost::Done));
                }
            }
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = self.send(rx.id, &ToGuest::Close);
                    return Err(BackendError::Io {
                        op: "read",
                        path: PathBuf::from(path),
                        source: e,
                    });
                }
            };
            credit -= cost(n);
            self.send(rx.id, &ToGuest::FileData(buf[..n].to_vec()))?;
        }
        self.send(rx.id, &ToGuest::FileEnd)?;
        // Credits of the last chunks may come before the answer.
        self.until_done(&mut rx, &what, TRANSFER_TIMEOUT, |_| false)
    }

    /// Read `path` from the guest, at most `max` bytes: more is an error.
    pub fn read_file(self: &Arc<Self>, path: &str, max: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut r = self.open_reader(path, max as u64 + 1)?;
        r.read_to_end(&mut out).map_err(|e| match r.take_error() {
            Some(be) => be,
            None => BackendError::Io {
                op: "read",
                path: PathBuf::from(path),
                source: e,
            },
        })?;
        if out.len() > max {
            return Err(BackendError::Protocol {
                what: format!("{path} on {}", self.vm),
                message: format!("larger than {max} bytes"),
            });
        }
        Ok(out)
    }

    /// `path` in the guest as a stream of at most `max` bytes.
    pub fn open_reader(self: &Arc<Self>, path: &str, max: u64) -> Result<AgentFileReader> {
        let request = ToGuest::ReadFile {
            path: path.to_string(),
            max,
        };
        self.start_reading(request, path, max)
    }

    /// Sends `request` (a read of `path`, at most `max` bytes) on a new stream and returns
    /// the reader of its answer.
    fn start_reading(
        self: &Arc<Self>,
        request: ToGuest,
        path: &str,
        max: u64,
    ) -> Result<AgentFileReader> {
        let rx = self.open()?;
        self.send(rx.id, &request)?;
        Ok(AgentFileReader {
            rx,
            path: path.to_string(),
            max,
            got: 0,
            buf: Vec::new(),
            pos: 0,
            ended: false,
            error: None,
        })
    }

    /// Forward `local` (a host TCP connection) to `127.0.0.1:port` in the guest, both ways,
    /// until both sides are done; returns the bytes carried (to the guest, from it).
    pub fn forward(self: &Arc<Self>, port: u16, local: impl ForwardStream) -> Result<(u64, u64)> {
        let mut rx = self.open()?;
        let id = rx.id;
        let what = format!("connect to port {port}");
        self.send(id, &ToGuest::Connect { port })?;
        match self.answer(&mut rx, &what)? {
            ToHost::Done => {}
            ToHost::Error { message } => return Err(self.refused(what, &message)),
            other => return Err(self.protocol(&what, &other)),
        }
        let io = |e: std::io::Error| BackendError::Io {
            op: "forwarding",
            path: PathBuf::from(format!("127.0.0.1:{port} in {}", self.vm)),
            source: e,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let counted = CountingReader {
            inner: local.reader().map_err(io)?,
            count: sent.clone(),
        };
        let pump = StdinPump::start(self.clone(), id, Box::new(counted));
        let mut out = local;
        let mut received = 0u64;
        let result = loop {
            match rx.recv(Duration::from_millis(100)) {
                Ok(Some(ToHost::Stdout(d))) => {
                    received += d.len() as u64;
                    if let Err(e) = out.write_all(&d) {
                        break Err(io(e));
                    }
                }
                Ok(Some(ToHost::Credit(n))) => pump.credit(n),
                Ok(Some(ToHost::Eof)) => {
                    let _ = out.shutdown(std::net::Shutdown::Write);
                }
                Ok(Some(ToHost::Exited { .. })) => break Ok(()),
                Ok(Some(ToHost::Error { message })) => {
                    break Err(self.refused(what.clone(), &message))
                }
                Ok(Some(other)) => break Err(self.protocol(&what, &other)),
                Ok(None) => {
                    if let Err(e) = rx.flush_credit() {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        pump.stop();
        let _ = out.shutdown(std::net::Shutdown::Both);
        if result.is_err() {
            let _ = self.send(id, &ToGuest::Close);
        }
        result.map(|()| (sent.load(Ordering::Relaxed), received))
    }

    /// Run a program to completion (or its timeout), streaming output to `on_output`.
    /// Output beyond `req.output_cap` per stream is counted and dropped (the program is never
    /// held up by it). `cancel` kills its process group as soon as it turns true.
    pub fn exec(
        self: &Arc<Self>,
        req: &ExecRequest,
        interactive: Option<Interactive>,
        cancel: Option<&AtomicBool>,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let start = Instant::now();
        let mut env: std::collections::BTreeMap<String, String> = [
            ("PATH", DEFAULT_PATH),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(req.env.clone());
        if interactive.as_ref().is_some_and(|i| i.pty.is_some()) {
            env.entry("TERM".into())
                .or_insert_with(|| "xterm-256color".into());
        }
        let (stdin, pty, winsize) = match interactive {
            Some(i) => (i.stdin, i.pty, i.winsize),
            None => (None, None, None),
        };
        let spec = ExecSpec {
            argv: std::iter::once(req.program.clone())
                .chain(req.args.iter().cloned())
                .collect(),
            env: env.into_iter().collect(),
            cwd: Some(req.cwd.clone().unwrap_or_else(|| "/".into())),
            uid: req.user.map(|(u, _)| u),
            gid: req.user.map(|(_, g)| g),
            cgroup: req.cgroup.clone(),
            stdin: stdin.is_some(),
            pty,
        };
        let mut rx = self.open()?;
        let id = rx.id;
        self.send(id, &ToGuest::Exec(spec))?;
        // Stdin is pumped by a thread of its own, under the agent's credit.
        let pump = stdin.map(|src| StdinPump::start(self.clone(), id, src));
        let result = self.exec_loop(req, &mut rx, start, cancel, winsize, &pump, on_output);
        if let Some(p) = pump {
            p.stop();
        }
        if result.is_err() {
            let _ = self.send(id, &ToGuest::Close);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn exec_loop(
        &self,
        req: &ExecRequest,
        rx: &mut StreamRx,
        start: Instant,
        cancel: Option<&AtomicBool>,
        winsize: Option<Box<dyn Fn() -> Option<WinSize> + Send>>,
        pump: &Option<StdinPump>,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let what = format!("exec {}", req.program);
        let mut outs = [Vec::new(), Vec::new()];
        let mut kept = [0u64; 2];
        let mut total = [0u64; 2];
        let mut started = false;
        let mut timed_out = false;
        let mut killed = false;
        let mut last_size = winsize.as_ref().and_then(|f| f());
        loop {
            let tick = if winsize.is_some() {
                Duration::from_millis(250)
            } else {
                Duration::from_millis(100)
            };
            match rx.recv(tick)? {
                Some(ToHost::Started { .. }) if !started => started = true,
                Some(ToHost::Stdout(d)) | Some(ToHost::Stderr(d)) if d.is_empty() => {}
                Some(m @ (ToHost::Stdout(_) | ToHost::Stderr(_))) => {
                    let (i, s, d) = match m {
                        ToHost::Stdout(d) => (0, Stream::Stdout, d),
                        ToHost::Stderr(d) => (1, Stream::Stderr, d),
                        _ => unreachable!("matched above"),
                    };
                    total[i] += d.len() as u64;
                    let room = (req.output_cap as u64).saturating_sub(kept[i]) as usize;
                    let take = room.min(d.len());
                    if take > 0 {
                        on_output(s, &d[..take]);
                        kept[i] += take as u64;
                        if req.keep_output {
                            outs[i].extend_from_slice(&d[..take]);
                        }
                    }
                }
                Some(ToHost::Credit(n)) => {
                    if let Some(p) = pump {
                        p.credit(n);
                    }
                }
                Some(ToHost::Exited { code, signal }) => {
                    let [stdout, stderr] = outs;
                    return Ok(ExecOutcome {
                        exit_code: code,
                        signal,
                        timed_out,
                        stdout,
                        stderr,
                        stdout_kept: kept[0],
                        stderr_kept: kept[1],
                        stdout_total: total[0],
                        stderr_total: total[1],
                        duration: start.elapsed(),
                        served_by: ServedBy::AgentvmGuest,
                    });
                }
                Some(ToHost::Error { message }) => return Err(self.refused(what, &message)),
                Some(other) => return Err(self.protocol(&what, &other)),
                None => {
                    if !started && start.elapsed() > CALL_TIMEOUT {
                        self.kill(&format!("{what}: not started within {CALL_TIMEOUT:?}"));
                        return Err(BackendError::Timeout {
                            what: format!("agentvm-guest of {} to start {}", self.vm, req.program),
                            after: CALL_TIMEOUT,
                        });
                    }
                    // Output waits for its credit: hand back what was consumed.
                    rx.flush_credit()?;
                }
            }
            if let Some(f) = &winsize {
                let now = f();
                if now.is_some() && now != last_size {
                    last_size = now;
                    if let Some(ws) = now {
                        self.send(rx.id, &ToGuest::Resize(ws))?;
                    }
                }
            }
            if !killed && !timed_out && cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                killed = true;
                self.send(rx.id, &ToGuest::Signal(9))?;
            } else if !timed_out && start.elapsed() >= req.timeout {
                timed_out = true;
                self.send(rx.id, &ToGuest::Signal(9))?;
            }
            if (timed_out || killed) && start.elapsed() >= req.timeout + Duration::from_secs(30) {
                return Err(BackendError::Timeout {
                    what: format!("killed {} in {} to exit", req.program, self.vm),
                    after: Duration::from_secs(30),
                });
            }
        }
    }
}

/// Feeds an interactive exec's stdin from a host reader, under the agent's credit.
struct StdinPump {
    state: Arc<(Mutex<(u64, bool)>, Condvar)>,
}

impl StdinPump {
    fn start(conn: Arc<AgentConn>, id: u32, mut src: Box<dyn Read + Send>) -> StdinPump {
        let state = Arc::new((Mutex::new((WINDOW, false)), Condvar::new()));
        let st = state.clone();
        // Detached: a read from a terminal may block past the program's end; the thread ends
        // at its next read.
        let _ = std::thread::Builder::new()
            .name("agent-stdin".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    {
                        let (m, cv) = &*st;
                        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
                        while g.0 < cost(buf.len()) && !g.1 {
                            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                        if g.1 {
                            return;
                        }
                    }
                    let n = match src.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => 0,
                    };
                    if st.0.lock().unwrap_or_else(|e| e.into_inner()).1 {
                        return;
                    }
                    if n == 0 {
                        let _ = conn.send(id, &ToGuest::StdinClose);
                        return;
                    }
                    st.0.lock().unwrap_or_else(|e| e.into_inner()).0 -= cost(n);
                    if conn.send(id, &ToGuest::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            });
        StdinPump { state }
    }

    fn credit(&self, n: u64) {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_add(n).min(WINDOW);
        cv.notify_all();
    }

    fn stop(&self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap_or_else(|e| e.into_inner()).1 = true;
        cv.notify_all();
    }
}

/// Counts the bytes read through it.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A guest file as a [`Read`] stream (see [`AgentConn::open_reader`]).
pub struct AgentFileReader {
    rx: StreamRx,
    path: String,
    max: u64,
    got: u64,
    buf: Vec<u8>,
    pos: usize,
    ended: bool,
    error: Option<BackendError>,
}

impl AgentFileReader {
    /// The agent failure behind an `io::Error` this reader returned.
    pub fn take_error(&mut self) -> Option<BackendError> {
        self.error.take()
    }

    fn fail(&mut self, e: BackendError) -> std::io::Error {
        let io = std::io::Error::other(e.to_string());
        self.error = Some(e);
        io
    }
}

impl Read for AgentFileReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.ended {
                return Ok(0);
            }
            let conn = self.rx.conn.clone();
            let msg = match self.rx.recv(TRANSFER_TIMEOUT) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    conn.kill(&format!(
                        "reading {}: no data within {TRANSFER_TIMEOUT:?}",
                        self.path
                    ));
                    let e = conn.gone();
                    return Err(self.fail(e));
                }
                Err(e) => return Err(self.fail(e)),
            };
            match msg {
                ToHost::FileData(d) => {
                    self.got += d.len() as u64;
                    if self.got > self.max {
                        let e = conn.protocol(&format!("read {}", self.path), &ToHost::FileData(d));
                        return Err(self.fail(e));
                    }
                    self.buf = d;
                    self.pos = 0;
                    if let Err(e) = self.rx.flush_credit() {
                        return Err(self.fail(e));
                    }
                }
                ToHost::FileEnd { .. } => self.ended = true,
                ToHost::Error { message } => {
                    let e = conn.refused(format!("read {}", self.path), &message);
                    return Err(self.fail(e));
                }
                other => {
                    let e = conn.protocol(&format!("read {}", self.path), &other);
                    return Err(self.fail(e));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for AgentFileReader {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.rx.conn.send(self.rx.id, &ToGuest::Close);
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A guest's text, cut to a length fit for a log line or a status.
fn bounded(s: &str) -> String {
    const MAX: usize = 1024;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

fn describe(m: &ToHost) -> String {
    match m {
        ToHost::Stdout(d) | ToHost::Stderr(d) | ToHost::FileData(d) => {
            format!("data frame of {} bytes", d.len())
        }
        ToHost::Error { message } => format!("error {:?}", bounded(message)),
        other => format!("{other:?}"),
    }
}

/// The reader thread: frames to their streams, each stream's queue bounded by its window.
fn read_loop(
    mut r: BufReader<UnixStream>,
    streams: &Shared,
    dead: &Mutex<Option<String>>,
    vm: &str,
) {
    let mut buf = Vec::new();
    let why = loop {
        let f = match read_frame::<ToHost>(&mut r, &mut buf) {
            Ok(f) => f,
            Err(agentvm_guest::FrameError::Io(e))
                if e.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                break "the channel closed (the VM stopped, or the connection was dropped)".into()
            }
            Err(e) => break e.to_string(),
        };
        let map = streams.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = map.get(&f.stream) else {
            // A stream that ended (or never was): nothing waits for it.
            continue;
        };
        let c = f.msg.cost();
        let queued = slot.queued.fetch_add(c, Ordering::SeqCst) + c;
        if queued > WINDOW + CONTROL_SLACK {
            break format!(
                "stream {} sent {queued} units past its window of {WINDOW}: flow control ignored",
                f.stream
            );
        }
        let _ = slot.tx.send(f.msg);
    };
    tracing::debug!(vm, reason = %why, "agentvm-guest connection ended");
    dead.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert(why);
    let _ = r.get_ref().shutdown(std::net::Shutdown::Both);
    // Every waiting stream sees its sender dropped.
    streams.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

enum Entry {
    Up(Arc<AgentConn>),
    Absent { path: PathBuf, until: Instant },
}

/// Per VM: what is known of its agent, behind a lock of its own (connecting to one VM does
/// not hold up calls to another).
type Registry = Mutex<HashMap<String, Arc<Mutex<Option<Entry>>>>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Mutex::default)
}

fn entry(vm: &str) -> Arc<Mutex<Option<Entry>>> {
    registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(vm.to_string())
        .or_default()
        .clone()
}

/// The live connection to `vm`'s agent behind `path`, made when there is none. `None` when
/// the agent does not answer (then it is not asked again for [`ABSENT_FOR`], unless
/// [`connect_within`] insists).
pub fn connection(vm: &str, path: &Path) -> Option<Arc<AgentConn>> {
    let e = entry(vm);
    let mut e = e.lock().unwrap_or_else(|e| e.into_inner());
    match &*e {
        Some(Entry::Up(c)) if c.path == path && c.dead().is_none() => return Some(c.clone()),
        Some(Entry::Absent { path: p, until }) if p == path && Instant::now() < *until => {
            return None
        }
        _ => {}
    }
    match AgentConn::connect(vm, path, HANDSHAKE_TIMEOUT) {
        Ok(c) => {
            *e = Some(Entry::Up(c.clone()));
            Some(c)
        }
        Err(err) => {
            tracing::info!(vm, error = %err, "agentvm-guest does not answer; using qemu-guest-agent");
            *e = Some(Entry::Absent {
                path: path.to_path_buf(),
                until: Instant::now() + ABSENT_FOR,
            });
            None
        }
    }
}

/// Connect to `vm`'s agent, trying until `timeout` (a guest that is still booting).
pub fn connect_within(vm: &str, path: &Path, timeout: Duration) -> Result<Arc<AgentConn>> {
    let start = Instant::now();
    let e = entry(vm);
    let mut e = e.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(Entry::Up(c)) = &*e {
        if c.path == path && c.dead().is_none() {
            return Ok(c.clone());
        }
    }
    loop {
        match AgentConn::connect(vm, path, HANDSHAKE_TIMEOUT) {
            Ok(c) => {
                *e = Some(Entry::Up(c.clone()));
                return Ok(c);
            }
            Err(err) if start.elapsed() >= timeout => {
                *e = Some(Entry::Absent {
                    path: path.to_path_buf(),
                    until: Instant::now() + ABSENT_FOR,
                });
                return Err(err);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Drop what is known of `vm`'s agent: after a reset its memory (and the agent's state) is
/// the golden moment's, so the next call syncs anew; after a removal nothing is kept.
pub fn forget(vm: &str) {
    let e = registry()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(vm);
    if let Some(e) = e {
        if let Some(Entry::Up(c)) = e.lock().unwrap_or_else(|e| e.into_inner()).take() {
            c.kill("forgotten (reset or removed)");
        }
    }
}
