//! Running code in a guest through qemu-guest-agent: files in and out (chunked), exec with
//! env and working directory, live output, an output cap, and timeouts enforced in the guest.
//!
//! Output is redirected to files in the guest and read while the process runs, rather than
//! using the agent's `capture-output` (which holds up to 16 MiB per stream in the agent and
//! only returns it at exit). That gives live following and a cap that protects host memory.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{BackendError, Result};

/// Default cap on captured bytes per output stream (10 MiB).
pub const DEFAULT_OUTPUT_CAP: usize = 10 * 1024 * 1024;
/// Bytes asked for per `guest-file-read` call. libvirt caps every string in its RPC protocol
/// at 4 MiB (`REMOTE_STRING_MAX`) and the data comes back base64 (4/3 larger) inside JSON, so
/// 4 MiB reads fail with "Unable to encode message payload". 1 MiB reads measured ~6 MB/s
/// under TCG.
pub const FILE_CHUNK: usize = 1024 * 1024;
/// Bytes sent per `guest-file-write` call. Measured (QEMU 7.2 agent, libvirt 9): a command
/// whose JSON reaches 256 KiB arrives broken ("QMP input must be a JSON object") or hangs the
/// agent until the call times out, so base64 payloads stay well below that: 128 KiB of data is
/// ~171 KiB of base64 (~44 ms per call under TCG).
pub const WRITE_CHUNK: usize = 128 * 1024;
/// Attempts of one file-data call when the agent is briefly unavailable.
pub const FILE_RETRIES: u32 = 4;
/// The cgroup (v2, mounted by agentvm's PID 1) a run's program and everything it starts are
/// put in, so that the guest kernel accounts their CPU time apart from the guest's own work
/// (the anomaly rules and `resourceUsage` read it).
pub const RUN_CGROUP: &str = "/sys/fs/cgroup/agentvm-run";

/// The `PATH` given to guest processes unless the caller sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A way to send one JSON command to a guest's agent and get its JSON reply.
/// Implemented by the libvirt backend (`virDomainQemuAgentCommand`) and by test fakes.
pub trait AgentChannel {
    /// The VM's name, for error messages.
    fn vm_name(&self) -> &str;
    /// Send `command` (a full `{"execute":..}` object); return the reply's `return` value.
    /// `timeout` bounds how long a connected but silent agent is waited for.
    fn command(&self, command: &Value, timeout: Duration) -> Result<Value>;
    /// The host end (a Unix socket) of the VM's `agentvm-guest` channel, when it has one:
    /// then [`Guest`] runs programs and moves files through agentvm's own agent, and uses
    /// this channel only where that agent does not answer.
    fn agent_socket(&self) -> Option<std::path::PathBuf> {
        None
    }
}

/// Which guest agent carried out a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServedBy {
    /// agentvm's own agent, `agentvm-guest`.
    AgentvmGuest,
    /// qemu-guest-agent (the fallback).
    QemuGuestAgent,
}

impl ServedBy {
    /// `agentvm-guest` or `qemu-guest-agent`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServedBy::AgentvmGuest => "agentvm-guest",
            ServedBy::QemuGuestAgent => "qemu-guest-agent",
        }
    }
}

/// Retries of a repeatable agent command that failed at once because libvirt reported the
/// agent as not connected (200, 400, .. ms apart).
const QUICK_RETRIES: u32 = 5;
/// How long [`Guest::wait_ready`] waits for `agentvm-guest` once qemu-ga answers.
const AGENT_BOOT_WAIT: Duration = Duration::from_secs(5);
/// Timeout for ordinary agent calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout for calls moving a [`FILE_CHUNK`] (the agent's JSON parser is slow under TCG).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    /// Program (absolute path, or a name looked up in `PATH`).
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment (on top of `PATH`, `HOME`, `LANG`).
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/`).
    pub cwd: Option<String>,
    /// Kill the process (its whole process group) after this long.
    pub timeout: Duration,
    /// Keep at most this many bytes of each stream.
    pub output_cap: usize,
    /// A cgroup directory in the guest to start the process in (created if missing); the
    /// process stays in the guest's root cgroup when it cannot be (no cgroup2 mounted).
    pub cgroup: Option<String>,
    /// Run as this user id and group id in the guest (root when unset). Needs
    /// agentvm-guest: qemu-guest-agent runs everything as root, so a request with a user is
    /// refused there rather than run with more rights than asked for.
    pub user: Option<(u32, u32)>,
    /// Keep the captured output in [`ExecOutcome::stdout`] / `stderr`. A caller that takes
    /// the output as it streams (and stores it) turns this off: then only the counts are kept,
    /// and the host holds no copy of up to `output_cap` bytes per stream.
    pub keep_output: bool,
}

impl ExecRequest {
    /// A request for `program args..` with defaults: no extra env, `/`, 300 s, 10 MiB cap.
    pub fn new(
        program: impl Into<String>,
        args: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        ExecRequest {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: BTreeMap::new(),
            cwd: None,
            timeout: Duration::from_secs(300),
            output_cap: DEFAULT_OUTPUT_CAP,
            cgroup: None,
            user: None,
            keep_output: true,
        }
    }
}

/// How a guest process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal number, when it was killed by a signal.
    pub signal: Option<i32>,
    /// True when agentvm killed it at its timeout.
    pub timed_out: bool,
    /// Captured standard output (at most the cap; empty without `keep_output`).
    pub stdout: Vec<u8>,
    /// Captured standard error (at most the cap; empty without `keep_output`).
    pub stderr: Vec<u8>,
    /// Bytes of stdout captured (streamed to the caller), at most the cap.
    pub stdout_kept: u64,
    /// Bytes of stderr captured, at most the cap.
    pub stderr_kept: u64,
    /// Total bytes the process wrote to stdout (may exceed what was captured).
    pub stdout_total: u64,
    /// Total bytes the process wrote to stderr.
    pub stderr_total: u64,
    /// Wall time from start to exit as seen by the host.
    pub duration: Duration,
    /// Which agent ran it.
    pub served_by: ServedBy,
}

impl ExecOutcome {
    /// True when stdout was cut at the cap.
    pub fn stdout_truncated(&self) -> bool {
        self.stdout_total > self.stdout_kept
    }
    /// True when stderr was cut at the cap.
    pub fn stderr_truncated(&self) -> bool {
        self.stderr_total > self.stderr_kept
    }
    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// What has been read of one output stream: the count, and the bytes when they are kept.
struct Capture {
    len: usize,
    keep: bool,
    data: Vec<u8>,
}

impl Capture {
    fn new(keep: bool) -> Self {
        Capture {
            len: 0,
            keep,
            data: Vec::new(),
        }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn push(&mut self, d: &[u8]) {
        self.len += d.len();
        if self.keep {
            self.data.extend_from_slice(d);
        }
    }
}

/// Guest operations over any [`AgentChannel`].
pub struct Guest<'a, C: AgentChannel + ?Sized> {
    chan: &'a C,
    cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

fn agent_err(vm: &str, command: &str, e: BackendError) -> BackendError {
    match e {
        BackendError::Protocol { message, .. } => BackendError::GuestCommand {
            vm: vm.to_string(),
            command: command.to_string(),
            message,
        },
        other => other,
    }
}

static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);

/// First wait between `guest-exec-status` polls; it grows by half each time up to [`POLL_MAX`].
const POLL_FIRST: Duration = Duration::from_millis(4);
/// Longest wait between status polls during a process's first second (short commands are
/// the common case, and their exit should be seen promptly)...
const POLL_MAX_EARLY: Duration = Duration::from_millis(15);
/// ...and after it (each poll costs guest CPU, which matters under TCG).
const POLL_MAX: Duration = Duration::from_millis(50);
/// How often output is read while a process runs.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

impl<'a, C: AgentChannel + ?Sized> Guest<'a, C> {
    /// Operations on the guest behind `chan`.
    pub fn new(chan: &'a C) -> Self {
        Guest { chan, cancel: None }
    }

    /// Operations on the guest behind `chan` whose running processes are killed (their whole
    /// process group) as soon as `cancel` becomes true; the exec then returns once they exit.
    pub fn with_cancel(chan: &'a C, cancel: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        Guest {
            chan,
            cancel: Some(cancel),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
    }

    fn call(&self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        self.call_within(execute, arguments, CALL_TIMEOUT)
    }

    fn call_within(
        &self,
        execute: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let cmd = match arguments {
            Some(a) => json!({"execute": execute, "arguments": a}),
            None => json!({"execute": execute}),
        };
        // Right after a reset libvirt may briefly report the agent as not connected (it
        // re-opens the channel when the restored guest's port reconnects). Commands that can
        // safely be sent twice are retried when that happens; an agent that is silent (the
        // call ran into its timeout) is not waited for here.
        let retry = matches!(
            execute,
            "guest-ping" | "guest-exec-status" | "guest-file-open" | "guest-file-seek"
        );
        let mut attempt = 0u32;
        loop {
            let t = Instant::now();
            match self.chan.command(&cmd, timeout) {
                Err(BackendError::GuestAgentUnavailable { .. })
                    if retry && attempt < QUICK_RETRIES && t.elapsed() < Duration::from_secs(1) =>
                {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
                }
                other => return other.map_err(|e| agent_err(self.chan.vm_name(), execute, e)),
            }
        }
    }

    fn protocol(&self, what: &str, message: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            what: format!("{} on {}", what, self.chan.vm_name()),
            message: message.into(),
        }
    }

    /// The VM's `agentvm-guest` connection, when its channel exists and the agent answers
    /// (made on first use, kept per VM; see [`crate::agent_conn`]).
    pub fn agent(&self) -> Option<std::sync::Arc<crate::agent_conn::AgentConn>> {
        let path = self.chan.agent_socket()?;
        crate::agent_conn::connection(self.chan.vm_name(), &path)
    }

    /// `guest-ping`.
    pub fn ping(&self) -> Result<()> {
        self.call("guest-ping", None).map(|_| ())
    }

    /// Wait until the agent answers a ping, polling every 50 ms until `timeout`.
    pub fn wait_ready(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            match self
                .chan
                .command(&json!({"execute": "guest-ping"}), Duration::from_secs(2))
            {
                Ok(_) => {
                    // agentvm's PID 1 starts agentvm-guest next to qemu-ga: connect to it
                    // now, so the first program already runs through it. A guest without
                    // it (an image from before it) is served by qemu-ga.
                    if let Some(path) = self.chan.agent_socket() {
                        let budget = timeout.saturating_sub(start.elapsed()).min(AGENT_BOOT_WAIT);
                        if let Err(e) =
                            crate::agent_conn::connect_within(self.chan.vm_name(), &path, budget)
                        {
                            tracing::warn!(vm = self.chan.vm_name(), error = %e, "agentvm-guest did not answer; qemu-guest-agent serves this VM");
                        }
                    }
                    return Ok(start.elapsed());
                }
                // The domain is gone or stopped (destroyed meanwhile): no point waiting.
                Err(e) if e.is_vm_gone() => return Err(e),
                Err(e) => {
                    if start.elapsed() >= timeout {
                        return Err(match e {
                            BackendError::GuestAgentUnavailable { .. } => BackendError::Timeout {
                                what: format!(
                                    "guest agent of {} to answer ({e})",
                                    self.chan.vm_name()
                                ),
                                after: timeout,
                            },
                            other => other,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn open(&self, path: &str, mode: &str) -> Result<i64> {
        let r = self.call("guest-file-open", Some(json!({"path": path, "mode": mode})))?;
        r.as_i64()
            .ok_or_else(|| self.protocol("guest-file-open", format!("no handle in {r}")))
    }

    fn close(&self, handle: i64) -> Result<()> {
        self.call("guest-file-close", Some(json!({"handle": handle})))
            .map(|_| ())
    }

    /// Write `data` to `path` in the guest (created or truncated), in chunks of any total size.
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        if let Some(a) = self.agent() {
            return a.write_file(path, data);
        }
        let h = self.open(path, "w")?;
        let res = (|| {
            let mut pos = 0u64;
            for chunk in data.chunks(WRITE_CHUNK) {
                let mut off = 0;
                while off < chunk.len() {
                    let r = self.at_position(h, pos, || {
                        self.call_within(
                            "guest-file-write",
                            Some(json!({"handle": h, "buf-b64": B64.encode(&chunk[off..])})),
                            CHUNK_TIMEOUT,
                        )
                    })?;
                    let n = r["count"].as_u64().ok_or_else(|| {
                        self.protocol("guest-file-write", format!("no count in {r}"))
                    })?;
                    if n == 0 {
                        return Err(
                            self.protocol("guest-file-write", "wrote 0 bytes (guest disk full?)")
                        );
                    }
                    off += n as usize;
                    pos += n;
                }
            }
            self.call("guest-file-flush", Some(json!({"handle": h})))
                .map(|_| ())
        })();
        let closed = self.close(h);
        res.and(closed)
    }

    /// Run `call`, a data-moving call on handle `h` whose data belongs at offset `pos`. When
    /// the agent is briefly unavailable (libvirt gives up on its 5 s `guest-sync` when a busy
    /// host starves the guest), the call is retried after putting the handle back at `pos`,
    /// so a call that did reach the guest is not applied twice. An agent that stays silent
    /// still fails after [`FILE_RETRIES`] attempts.
    fn at_position<T>(&self, h: i64, pos: u64, mut call: impl FnMut() -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            let result = if attempt == 0 {
                call()
            } else {
                std::thread::sleep(Duration::from_millis(250 * attempt as u64));
                self.call(
                    "guest-file-seek",
                    Some(json!({"handle": h, "offset": pos, "whence": "set"})),
                )
                .and_then(|_| call())
            };
            match result {
                Err(BackendError::GuestAgentUnavailable { .. }) if attempt + 1 < FILE_RETRIES => {
                    attempt += 1;
                    tracing::debug!(
                        vm = self.chan.vm_name(),
                        attempt,
                        "agent unavailable; retrying file call"
                    );
                }
                other => return other,
            }
        }
    }

    /// Read one chunk (up to `max` bytes) at offset `pos` of an open handle (the handle's
    /// position must be `pos`). Returns the bytes and the EOF flag.
    fn read_chunk(&self, h: i64, pos: u64, max: usize) -> Result<(Vec<u8>, bool)> {
        let r = self.at_position(h, pos, || {
            self.call_within(
                "guest-file-read",
                Some(json!({"handle": h, "count": max.max(1)})),
                CHUNK_TIMEOUT,
            )
        })?;
        let data = B64
            .decode(r["buf-b64"].as_str().unwrap_or(""))
            .map_err(|e| self.protocol("guest-file-read", e.to_string()))?;
        // The agent answers for the guest: never take more than was asked for.
        if data.len() > max.max(1) {
            return Err(self.protocol(
                "guest-file-read",
                format!("asked for {} bytes, got {}", max.max(1), data.len()),
            ));
        }
        Ok((data, r["eof"].as_bool().unwrap_or(data_is_empty(&r))))
    }

    /// Open `path` in the guest for reading as a stream ([`GuestFileReader`]): one agent call
    /// per [`FILE_CHUNK`], so a large file never sits in host memory whole. The caller
    /// bounds how much it reads.
    pub fn open_reader(&self, path: &str) -> Result<GuestFileReader<'_, 'a, C>> {
        if let Some(a) = self.agent() {
            return Ok(GuestFileReader::Agent(a.open_reader(path, u64::MAX)?));
        }
        let handle = self.open(path, "r")?;
        Ok(GuestFileReader::Ga(GaFileReader {
            guest: self,
            path: path.to_string(),
            handle: Some(handle),
            pos: 0,
            buf: Vec::new(),
            at: 0,
            eof: false,
            error: None,
        }))
    }

    /// Read the whole file at `path`, failing if it is larger than `max` bytes.
    pub fn read_file(&self, path: &str, max: usize) -> Result<Vec<u8>> {
        if let Some(a) = self.agent() {
            return a.read_file(path, max);
        }
        let h = self.open(path, "r")?;
        let res = (|| {
            let mut out = Vec::new();
            loop {
                let (data, eof) = self.read_chunk(h, out.len() as u64, FILE_CHUNK)?;
                out.extend_from_slice(&data);
                if out.len() > max {
                    return Err(self.protocol(
                        "guest-file-read",
                        format!("{path} is larger than the limit of {max} bytes"),
                    ));
                }
                if eof || data.is_empty() {
                    return Ok(out);
                }
            }
        })();
        let closed = self.close(h);
        let out = res?;
        closed?;
        Ok(out)
    }

    /// Size of an open file: seek to its end.
    /// The guest's IPv4 addresses outside loopback (`guest-network-get-interfaces`), as
    /// `interface=address/prefix`.
    pub fn ipv4_addresses(&self) -> Result<Vec<String>> {
        let r = self.call("guest-network-get-interfaces", None)?;
        let ifaces = r.as_array().ok_or_else(|| {
            self.protocol("guest-network-get-interfaces", format!("not a list: {r}"))
        })?;
        Ok(ifaces
            .iter()
            .filter(|i| i["name"] != "lo")
            .flat_map(|i| {
                let name = i["name"].as_str().unwrap_or("?").to_string();
                i["ip-addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|a| a["ip-address-type"] == "ipv4")
                    .filter_map(move |a| {
                        Some(format!(
                            "{name}={}/{}",
                            a["ip-address"].as_str()?,
                            a["prefix"].as_u64().unwrap_or(32)
                        ))
                    })
            })
            .collect())
    }

    /// Wait until the guest has an IPv4 address outside loopback (its DHCP lease), polling
    /// every 100 ms until `timeout`; returns the addresses.
    pub fn wait_ipv4(&self, timeout: Duration) -> Result<Vec<String>> {
        let start = Instant::now();
        loop {
            match self.ipv4_addresses() {
                Ok(a) if !a.is_empty() => return Ok(a),
                Ok(_) => {}
                Err(e) if e.is_transient() => {}
                Err(e) => return Err(e),
            }
            if start.elapsed() >= timeout {
                return Err(BackendError::Timeout {
                    what: format!(
                        "an IPv4 address by DHCP in {} (is DHCP blocked by its filter?)",
                        self.chan.vm_name()
                    ),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn size_of(&self, h: i64) -> Result<u64> {
        let r = self.call(
            "guest-file-seek",
            Some(json!({"handle": h, "offset": 0, "whence": "end"})),
        )?;
        r["position"]
            .as_u64()
            .ok_or_else(|| self.protocol("guest-file-seek", format!("no position in {r}")))
    }

    /// Start a process; returns the guest pid, which is also its process group id.
    fn spawn(&self, req: &ExecRequest, out: &str, err: &str) -> Result<i64> {
        let mut env: BTreeMap<String, String> = BTreeMap::from([
            ("PATH".to_string(), DEFAULT_PATH.to_string()),
            ("HOME".to_string(), "/root".to_string()),
            ("LANG".to_string(), "C.UTF-8".to_string()),
        ]);
        env.extend(req.env.clone());
        let env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        // setsid makes the process a session and group leader, so a timeout kills the whole tree.
        let mut args = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            r#"exec >"$1" 2>"$2"; cd "$3" || exit 126; if [ -n "$4" ]; then mkdir -p "$4" 2>/dev/null && echo $$ >"$4/cgroup.procs" 2>/dev/null; fi; shift 4; exec "$@""#.to_string(),
            "agentvm-exec".to_string(),
            out.to_string(),
            err.to_string(),
            req.cwd.clone().unwrap_or_else(|| "/".to_string()),
            req.cgroup.clone().unwrap_or_default(),
            req.program.clone(),
        ];
        args.extend(req.args.iter().cloned());
        let r = self.call(
            "guest-exec",
            Some(json!({"path": "/usr/bin/setsid", "arg": args, "env": env, "capture-output": false})),
        )?;
        r["pid"]
            .as_i64()
            .ok_or_else(|| self.protocol("guest-exec", format!("no pid in {r}")))
    }

    fn status(&self, pid: i64) -> Result<Option<(Option<i32>, Option<i32>)>> {
        let r = self.call("guest-exec-status", Some(json!({"pid": pid})))?;
        if r["exited"].as_bool() != Some(true) {
            return Ok(None);
        }
        let code = r["exitcode"].as_i64().map(|c| c as i32);
        let sig = r["signal"].as_i64().map(|c| c as i32);
        Ok(Some((code, sig)))
    }

    /// Kill the process group `pgid` with SIGKILL.
    pub fn kill_group(&self, pgid: i64) -> Result<()> {
        let r = self.call(
            "guest-exec",
            Some(json!({"path": "/bin/sh", "arg": ["-c", "kill -s KILL -- -$1", "agentvm-kill", pgid.to_string()]})),
        )?;
        if let Some(pid) = r["pid"].as_i64() {
            // Reap the helper so the agent does not keep its status forever.
            for _ in 0..100 {
                if self.status(pid)?.is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Run a process to completion (or its timeout), streaming output to `on_output` as it
    /// arrives. Output beyond `output_cap` per stream is counted but not kept.
    pub fn exec(
        &self,
        req: &ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        if let Some(a) = self.agent() {
            return a.exec(req, None, self.cancel.as_deref(), on_output);
        }
        if req.user.is_some() {
            return Err(BackendError::GuestAgentUnavailable {
                vm: self.chan.vm_name().to_string(),
                message: "running as another user needs agentvm-guest, which does not answer (qemu-guest-agent runs everything as root)".into(),
            });
        }
        let id = format!(
            "{}-{}",
            std::process::id(),
            EXEC_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let out_path = format!("/var/tmp/agentvm-exec-{id}.out");
        let err_path = format!("/var/tmp/agentvm-exec-{id}.err");
        // "w+" creates each file and gives a handle we can read from while the process writes
        // (one call per file, rather than create + close + reopen).
        let hout = self.open(&out_path, "w+")?;
        let herr = match self.open(&err_path, "w+") {
            Ok(h) => h,
            Err(e) => {
                let _ = self.close(hout);
                return Err(e);
            }
        };
        let result = self.exec_inner(req, &out_path, &err_path, hout, herr, on_output);
        if let Err(e) = &result {
            if e.is_transient() || e.is_vm_gone() || matches!(e, BackendError::Timeout { .. }) {
                // Every cleanup call would wait for a silent agent or fail on a stopped VM;
                // the VM is not reused.
                return result;
            }
        }
        let _ = self.close(hout);
        let _ = self.close(herr);
        // Best effort: remove the output files (the VM is reset after a run anyway).
        let _ = self.call(
            "guest-exec",
            Some(json!({"path": "/bin/rm", "arg": ["-f", out_path, err_path]})),
        );
        result
    }

    fn exec_inner(
        &self,
        req: &ExecRequest,
        out_path: &str,
        err_path: &str,
        hout: i64,
        herr: i64,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let start = Instant::now();
        let pid = self.spawn(req, out_path, err_path)?;
        let mut stdout = Capture::new(req.keep_output);
        let mut stderr = Capture::new(req.keep_output);
        let mut interval = POLL_FIRST;
        let mut timed_out = false;
        let mut killed = false;
        // Reads what is there, up to the cap. Returns true when it stopped at the cap (so the
        // total has to be asked for), false when it reached the current end of the file.
        let mut drain = |g: &Self, h: i64, buf: &mut Capture, s: Stream| -> Result<bool> {
            loop {
                let room = req.output_cap.saturating_sub(buf.len());
                if room == 0 {
                    return Ok(true);
                }
                let (data, eof) = g.read_chunk(h, buf.len() as u64, room.min(FILE_CHUNK))?;
                if !data.is_empty() {
                    on_output(s, &data);
                    buf.push(&data);
                }
                if eof || data.is_empty() {
                    return Ok(false);
                }
            }
        };
        // Output is read while the process runs, at most every DRAIN_EVERY (live following),
        // and once more after it exits; in between only the status is polled, which keeps the
        // number of agent calls (each costs guest CPU) low for short commands.
        //
        // An agent that stops answering (stopped or hung in the guest, or libvirtd restarting
        // under us) does not end the process's run by itself: polling goes on until the
        // process's timeout (then `BackendError::Timeout`). A guest that is gone (QEMU died)
        // fails at once.
        let mut last_drain = Instant::now();
        let mut unreachable: Option<(Instant, BackendError)> = None;
        let (status, out_capped, err_capped) = loop {
            let step = (|| -> Result<Option<_>> {
                let st = self.status(pid)?;
                if unreachable.is_some() {
                    // Answering again. A failed call may have moved the handles: put them back.
                    for (h, at) in [(hout, stdout.len()), (herr, stderr.len())] {
                        self.call(
                            "guest-file-seek",
                            Some(json!({"handle": h, "offset": at, "whence": "set"})),
                        )?;
                    }
                }
                if st.is_some() || last_drain.elapsed() >= DRAIN_EVERY {
                    let out_capped = drain(self, hout, &mut stdout, Stream::Stdout)?;
                    let err_capped = drain(self, herr, &mut stderr, Stream::Stderr)?;
                    last_drain = Instant::now();
                    if let Some(st) = st {
                        return Ok(Some((st, out_capped, err_capped)));
                    }
                }
                if !timed_out && !killed && self.cancelled() {
                    killed = true;
                    self.kill_group(pid)?;
                } else if !timed_out && start.elapsed() >= req.timeout {
                    timed_out = true;
                    self.kill_group(pid)?;
                }
                Ok(None)
            })();
            match step {
                Ok(Some(done)) => break done,
                Ok(None) => {
                    if let Some((since, _)) = unreachable.take() {
                        tracing::info!(vm = self.chan.vm_name(), after = ?since.elapsed(), "guest agent answers again");
                    }
                }
                Err(e) if e.is_transient() && !self.cancelled() => {
                    if unreachable.is_none() {
                        tracing::warn!(vm = self.chan.vm_name(), error = %e, "guest agent not answering; still waiting for the process");
                    }
                    let since = unreachable.map_or_else(Instant::now, |(t, _)| t);
                    if start.elapsed() >= req.timeout {
                        return Err(BackendError::Timeout {
                            what: format!(
                                "process {pid} in {} (its guest agent gave no answer for the last {:.0} s: {e})",
                                self.chan.vm_name(),
                                since.elapsed().as_secs_f64()
                            ),
                            after: req.timeout,
                        });
                    }
                    unreachable = Some((since, e));
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) => return Err(e),
            }
            if timed_out && start.elapsed() >= req.timeout + Duration::from_secs(30) {
                return Err(BackendError::Timeout {
                    what: format!("killed process {pid} in {} to exit", self.chan.vm_name()),
                    after: Duration::from_secs(30),
                });
            }
            std::thread::sleep(interval);
            let cap = if start.elapsed() < Duration::from_secs(1) {
                POLL_MAX_EARLY
            } else {
                POLL_MAX
            };
            interval = (interval * 3 / 2).min(cap);
        };
        let duration = start.elapsed();
        // Below the cap the final drain read to the end, so the total is what was read.
        let total = |capped: bool, h: i64, got: usize| -> Result<u64> {
            Ok(if capped {
                self.size_of(h)?.max(got as u64)
            } else {
                got as u64
            })
        };
        let stdout_total = total(out_capped, hout, stdout.len())?;
        let stderr_total = total(err_capped, herr, stderr.len())?;
        let (stdout_kept, stderr_kept) = (stdout.len() as u64, stderr.len() as u64);
        Ok(ExecOutcome {
            exit_code: status.0,
            signal: status.1,
            timed_out,
            stdout: stdout.data,
            stderr: stderr.data,
            stdout_kept,
            stderr_kept,
            stdout_total,
            stderr_total,
            duration,
            served_by: ServedBy::QemuGuestAgent,
        })
    }

    /// Run a program with its stdin fed from the host and, with a size in
    /// `interactive.pty`, on a terminal. Needs agentvm-guest (qemu-guest-agent has neither).
    pub fn exec_interactive(
        &self,
        req: &ExecRequest,
        interactive: crate::agent_conn::Interactive,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let a = self
            .agent()
            .ok_or_else(|| BackendError::GuestAgentUnavailable {
                vm: self.chan.vm_name().to_string(),
                message:
                    "agentvm-guest does not answer, and qemu-guest-agent has no stdin or terminal"
                        .into(),
            })?;
        a.exec(req, Some(interactive), self.cancel.as_deref(), on_output)
    }

    /// Run warm-up `steps` in order, output discarded; the first that does not exit 0 ends
    /// it with [`BackendError::GuestCommand`] (its exit and stderr).
    pub fn warm_up(&self, steps: &[ExecRequest]) -> Result<()> {
        for step in steps {
            self.exec_ok(
                step,
                &format!("warm-up {} {}", step.program, step.args.join(" ")),
            )?;
        }
        Ok(())
    }

    /// Runs `req`, which must exit 0; otherwise a [`BackendError::GuestCommand`] naming
    /// `what`, with the exit and the program's stderr.
    pub fn exec_ok(&self, req: &ExecRequest, what: &str) -> Result<ExecOutcome> {
        let out = self.exec(req, &mut |_, _| {})?;
        if !out.success() {
            return Err(BackendError::GuestCommand {
                vm: self.chan.vm_name().to_string(),
                command: what.to_string(),
                message: format!(
                    "exit {:?} signal {:?}: {}",
                    out.exit_code,
                    out.signal,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(out)
    }

    /// Write `source` to a temporary file in the guest and run it with `interpreter`.
    pub fn run_script(
        &self,
        interpreter: &str,
        source: &str,
        mut req: ExecRequest,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<ExecOutcome> {
        let path = format!(
            "/var/tmp/agentvm-script-{}-{}",
            std::process::id(),
            EXEC_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        self.write_file(&path, source.as_bytes())?;
        req.program = interpreter.to_string();
        req.args.insert(0, path);
        self.exec(&req, on_output)
    }
}

/// A guest file read as a [`std::io::Read`] stream (see [`Guest::open_reader`]): through
/// agentvm-guest, or a [`FILE_CHUNK`] per qemu-guest-agent call. The handle is closed by [`GuestFileReader::close`] or on drop.
/// An agent failure surfaces as an `io::Error` and is kept: [`GuestFileReader::take_error`]
/// gives it back as the [`BackendError`] it was, so callers can tell a failing guest agent
/// from bad data.
pub enum GuestFileReader<'g, 'a, C: AgentChannel + ?Sized> {
    /// Through agentvm-guest: one stream, under flow control.
    Agent(crate::agent_conn::AgentFileReader),
    /// Through qemu-guest-agent: a [`FILE_CHUNK`] per call.
    Ga(GaFileReader<'g, 'a, C>),
}

impl<C: AgentChannel + ?Sized> GuestFileReader<'_, '_, C> {
    /// The agent failure that ended reading, if any.
    pub fn take_error(&mut self) -> Option<BackendError> {
        match self {
            GuestFileReader::Agent(r) => r.take_error(),
            GuestFileReader::Ga(r) => r.error.take(),
        }
    }

    /// Close the guest handle (also done on drop, ignoring errors).
    pub fn close(self) -> Result<()> {
        match self {
            GuestFileReader::Agent(_) => Ok(()),
            GuestFileReader::Ga(mut r) => match r.handle.take() {
                Some(h) => r.guest.close(h),
                None => Ok(()),
            },
        }
    }
}

impl<C: AgentChannel + ?Sized> std::io::Read for GuestFileReader<'_, '_, C> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        match self {
            GuestFileReader::Agent(r) => r.read(out),
            GuestFileReader::Ga(r) => r.read(out),
        }
    }
}

/// The qemu-guest-agent side of [`GuestFileReader`].
pub struct GaFileReader<'g, 'a, C: AgentChannel + ?Sized> {
    guest: &'g Guest<'a, C>,
    path: String,
    handle: Option<i64>,
    pos: u64,
    buf: Vec<u8>,
    at: usize,
    eof: bool,
    error: Option<BackendError>,
}

impl<C: AgentChannel + ?Sized> std::io::Read for GaFileReader<'_, '_, C> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() && !self.eof && !out.is_empty() {
            let Some(h) = self.handle else {
                return Err(std::io::Error::other(format!("{} is closed", self.path)));
            };
            match self.guest.read_chunk(h, self.pos, FILE_CHUNK) {
                Ok((data, eof)) => {
                    self.eof = eof || data.is_empty();
                    self.pos += data.len() as u64;
                    self.buf = data;
                    self.at = 0;
                }
                Err(e) => {
                    let message = format!("reading {} in the guest: {e}", self.path);
                    self.error = Some(e);
                    return Err(std::io::Error::other(message));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl<C: AgentChannel + ?Sized> Drop for GaFileReader<'_, '_, C> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.guest.close(h);
        }
    }
}

fn data_is_empty(r: &Value) -> bool {
    r["count"].as_u64() == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    /// Answers queued replies in order and records every command.
    struct FakeAgent {
        replies: RefCell<VecDeque<Result<Value>>>,
        calls: RefCell<Vec<Value>>,
        delay: RefCell<Option<(usize, Duration)>>,
    }

    impl FakeAgent {
        fn new(replies: Vec<Result<Value>>) -> Self {
            FakeAgent {
                replies: RefCell::new(replies.into()),
                calls: RefCell::new(vec![]),
                delay: RefCell::new(None),
            }
        }
        /// Make call number `index` (0-based) take `d`.
        fn delay_call(&self, index: usize, d: Duration) {
            *self.delay.borrow_mut() = Some((index, d));
        }
        fn executed(&self) -> Vec<String> {
            self.calls
                .borrow()
                .iter()
                .map(|c| c["execute"].as_str().unwrap().to_string())
                .collect()
        }
    }

    impl AgentChannel for FakeAgent {
        fn vm_name(&self) -> &str {
            "fake"
        }
        fn command(&self, command: &Value, _t: Duration) -> Result<Value> {
            self.calls.borrow_mut().push(command.clone());
            if let Some((i, d)) = *self.delay.borrow() {
                if i + 1 == self.calls.borrow().len() {
                    std::thread::sleep(d);
                }
            }
            self.replies
                .borrow_mut()
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected call {command}"))
        }
    }

    fn read(data: &[u8], eof: bool) -> Result<Value> {
        Ok(json!({"count": data.len(), "buf-b64": B64.encode(data), "eof": eof}))
    }

    /// An agent answering by command name; `exec-status` answers come from `status` (called
    /// with how many status calls came before).
    struct ByName<F: Fn(usize) -> Result<Value>> {
        status: F,
        calls: RefCell<Vec<String>>,
    }

    impl<F: Fn(usize) -> Result<Value>> AgentChannel for ByName<F> {
        fn vm_name(&self) -> &str {
            "fake"
        }
        fn command(&self, command: &Value, _t: Duration) -> Result<Value> {
            let name = command["execute"].as_str().unwrap().to_string();
            let n = self
                .calls
                .borrow()
                .iter()
                .filter(|c| *c == "guest-exec-status")
                .count();
            self.calls.borrow_mut().push(name.clone());
            match name.as_str() {
                "guest-file-open" => Ok(json!(7)),
                "guest-exec" => Ok(json!({"pid": 42})),
                "guest-exec-status" => (self.status)(n),
                "guest-file-read" => read(b"", true),
                "guest-file-seek" => Ok(json!({"position": 0})),
                _ => Ok(json!({})),
            }
        }
    }

    fn unavailable() -> Result<Value> {
        Err(BackendError::GuestAgentUnavailable {
            vm: "fake".into(),
            message: "Guest agent is not responding".into(),
        })
    }

    fn exec_through_outage(failing_polls: usize) -> Vec<String> {
        let agent = ByName {
            status: move |n| {
                if n < failing_polls {
                    unavailable()
                } else {
                    Ok(json!({"exited": true, "exitcode": 0}))
                }
            },
            calls: RefCell::new(vec![]),
        };
        let mut req = ExecRequest::new("/bin/true", Vec::<String>::new());
        req.timeout = Duration::from_secs(60);
        let out = Guest::new(&agent).exec(&req, &mut |_, _| {}).unwrap();
        assert_eq!(out.exit_code, Some(0));
        agent.calls.take()
    }

    #[test]
    fn a_momentarily_disconnected_agent_is_asked_again() {
        let calls = exec_through_outage(2);
        assert_eq!(
            calls.iter().filter(|c| *c == "guest-exec-status").count(),
            3
        );
        assert!(!calls.iter().any(|c| c == "guest-file-seek"), "{calls:?}");
    }

    #[test]
    fn a_process_outlives_a_longer_agent_outage_and_its_output_handles_are_put_back() {
        // The first poll gives up after its quick retries; the exec goes on.
        let calls = exec_through_outage(QUICK_RETRIES as usize + 3);
        let seeks = calls.iter().filter(|c| *c == "guest-file-seek").count();
        assert_eq!(
            seeks, 2,
            "both handles put back after the failed poll: {calls:?}"
        );
    }

    #[test]
    fn an_agent_that_stops_answering_ends_the_exec_with_a_timeout_at_the_deadline() {
        let agent = ByName {
            status: |n| match n {
                0 => Ok(json!({"exited": false})),
                _ => unavailable(),
            },
            calls: RefCell::new(vec![]),
        };
        let mut req = ExecRequest::new("/bin/sleep", ["100"]);
        req.timeout = Duration::from_secs(2);
        let t = Instant::now();
        let err = Guest::new(&agent).exec(&req, &mut |_, _| {}).unwrap_err();
        assert!(matches!(err, BackendError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("gave no answer"), "{err}");
        assert!(t.elapsed() >= Duration::from_secs(2));
        assert!(t.elapsed() < Duration::from_secs(10));
        // No cleanup calls wait on the silent agent afterwards.
        let calls = agent.calls.borrow();
        assert_ne!(calls.last().map(String::as_str), Some("guest-file-close"));
    }

    #[test]
    fn a_briefly_unavailable_agent_gets_the_chunk_again_at_the_same_position() {
        let unavailable = || {
            Err(BackendError::GuestAgentUnavailable {
                vm: "fake".into(),
                message: "Guest agent not available for now".into(),
            })
        };
        let data = vec![1u8; WRITE_CHUNK + 5];
        let agent = FakeAgent::new(vec![
            Ok(json!(9)),                         // open
            Ok(json!({"count": WRITE_CHUNK})),    // first chunk
            unavailable(),                        // second chunk: sync timed out
            Ok(json!({"position": WRITE_CHUNK})), // seek back to where it belongs
            Ok(json!({"count": 5})),              // second chunk again
            Ok(json!({})),                        // flush
            Ok(json!({})),                        // close
        ]);
        Guest::new(&agent).write_file("/x", &data).unwrap();
        let calls = agent.calls.borrow();
        assert_eq!(calls[3]["execute"], "guest-file-seek");
        assert_eq!(calls[3]["arguments"]["offset"], WRITE_CHUNK);
        assert_eq!(calls[3]["arguments"]["whence"], "set");
        assert_eq!(calls[4]["execute"], "guest-file-write");
    }

    #[test]
    fn write_file_chunks_large_data_and_closes() {
        let data = vec![7u8; WRITE_CHUNK + 10];
        let agent = FakeAgent::new(vec![
            Ok(json!(5)),
            Ok(json!({"count": WRITE_CHUNK, "eof": false})),
            Ok(json!({"count": 10, "eof": false})),
            Ok(json!({})),
            Ok(json!({})),
        ]);
        Guest::new(&agent).write_file("/x", &data).unwrap();
        for c in agent.calls.borrow().iter() {
            if let Some(b) = c["arguments"]["buf-b64"].as_str() {
                // The agent breaks on commands of 256 KiB or more.
                assert!(
                    b.len() < 200 * 1024,
                    "{} base64 bytes in one write",
                    b.len()
                );
            }
        }
        assert_eq!(
            agent.executed(),
            [
                "guest-file-open",
                "guest-file-write",
                "guest-file-write",
                "guest-file-flush",
                "guest-file-close"
            ]
        );
    }

    #[test]
    fn exec_collects_output_caps_it_and_reports_exit() {
        let replies = vec![
            Ok(json!(1)),           // open stdout file "w+"
            Ok(json!(2)),           // open stderr file "w+"
            Ok(json!({"pid": 42})), // guest-exec
            Ok(json!({"exited": false})),
            read(b"hel", false),
            read(b"", true), // stdout chunk, then nothing yet
            read(b"", true), // stderr empty
            Ok(json!({"exited": true, "exitcode": 3})),
            read(b"lo", false), // cap is 5: only 2 bytes requested
            read(b"oops", true),
            Ok(json!({"position": 11})), // stdout size (capped); stderr's is known
            Ok(json!({})),
            Ok(json!({})),          // close both
            Ok(json!({"pid": 43})), // rm
        ];
        let agent = FakeAgent::new(replies);
        // The first status poll is slow, so output is drained while the process runs.
        agent.delay_call(3, DRAIN_EVERY + Duration::from_millis(10));
        let mut req = ExecRequest::new("python3", ["-c", "x"]);
        req.output_cap = 5;
        let mut live = Vec::new();
        let out = Guest::new(&agent)
            .exec(&req, &mut |s, d| live.push((s, d.to_vec())))
            .unwrap();
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.stdout, b"hello");
        assert!(out.stdout_truncated());
        assert_eq!(out.stdout_total, 11);
        assert_eq!(out.stderr, b"oops");
        assert_eq!(out.stderr_total, 4);
        assert!(!out.stderr_truncated());
        assert_eq!(live[0], (Stream::Stdout, b"hel".to_vec()));
        let calls = agent.calls.borrow();
        assert_eq!(calls[0]["arguments"]["mode"], "w+");
        assert_eq!(calls[1]["arguments"]["mode"], "w+");
        let spawn = &calls[2];
        assert_eq!(spawn["arguments"]["path"], "/usr/bin/setsid");
        assert!(spawn["arguments"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().starts_with("PATH=")));
        // after the cap only the remaining room is requested
        assert_eq!(calls[8]["arguments"]["count"], 2);
        assert_eq!(calls.len(), 14, "{:?}", agent.executed());
    }

    #[test]
    fn a_short_command_costs_few_agent_calls() {
        let agent = FakeAgent::new(vec![
            Ok(json!(1)),
            Ok(json!(2)),
            Ok(json!({"pid": 7})),
            Ok(json!({"exited": false})),
            Ok(json!({"exited": true, "exitcode": 0})),
            read(b"", true),
            read(b"", true),
            Ok(json!({})),
            Ok(json!({})),
            Ok(json!({"pid": 8})),
        ]);
        let out = Guest::new(&agent)
            .exec(
                &ExecRequest::new("true", Vec::<String>::new()),
                &mut |_, _| {},
            )
            .unwrap();
        assert!(out.success());
        assert_eq!(
            agent.executed(),
            [
                "guest-file-open",
                "guest-file-open",
                "guest-exec",
                "guest-exec-status",
                "guest-exec-status",
                "guest-file-read",
                "guest-file-read",
                "guest-file-close",
                "guest-file-close",
                "guest-exec"
            ]
        );
    }

    #[test]
    fn wait_ipv4_polls_until_dhcp_gave_an_address_and_ignores_loopback() {
        let lo = json!({"name": "lo", "ip-addresses": [
            {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}]});
        let agent = FakeAgent::new(vec![
            Ok(json!([lo.clone(), {"name": "enp1s0"}])),
            Ok(json!([lo.clone(), {"name": "enp1s0", "ip-addresses": [
                {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64}]}])),
            Ok(json!([lo, {"name": "enp1s0", "ip-addresses": [
                {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64},
                {"ip-address-type": "ipv4", "ip-address": "10.9.0.12", "prefix": 24}]}])),
        ]);
        let got = Guest::new(&agent)
            .wait_ipv4(Duration::from_secs(5))
            .unwrap();
        assert_eq!(got, vec!["enp1s0=10.9.0.12/24".to_string()]);
        assert_eq!(agent.executed().len(), 3);
    }

    #[test]
    fn wait_ipv4_without_a_lease_is_a_timeout_naming_dhcp() {
        let agent = FakeAgent::new((0..50).map(|_| Ok(json!([{"name": "enp1s0"}]))).collect());
        let e = Guest::new(&agent)
            .wait_ipv4(Duration::from_millis(250))
            .unwrap_err();
        assert!(matches!(e, BackendError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("DHCP"), "{e}");
    }

    #[test]
    fn wait_ready_turns_a_silent_agent_into_a_timeout() {
        let agent = FakeAgent::new(
            (0..100)
                .map(|_| {
                    Err(BackendError::GuestAgentUnavailable {
                        vm: "fake".into(),
                        message: "not connected".into(),
                    })
                })
                .collect(),
        );
        let err = Guest::new(&agent)
            .wait_ready(Duration::from_millis(120))
            .unwrap_err();
        assert!(matches!(err, BackendError::Timeout { .. }), "{err}");
    }

    #[test]
    fn waits_end_at_once_when_the_vm_stopped() {
        let stopped = || Err(BackendError::VmNotRunning { vm: "fake".into() });
        // A ping wait with a long timeout gives up on the first answer.
        let agent = FakeAgent::new(vec![stopped(), Ok(json!({}))]);
        let t = Instant::now();
        let err = Guest::new(&agent)
            .wait_ready(Duration::from_secs(120))
            .unwrap_err();
        assert!(matches!(err, BackendError::VmNotRunning { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(agent.calls.borrow().len(), 1);
        // So does a running process's exec loop: no retry as for an agent outage.
        let agent = FakeAgent::new(vec![
            Ok(json!(1)),
            Ok(json!(2)),
            Ok(json!({"pid": 42})),
            stopped(),
        ]);
        let mut req = ExecRequest::new("sleep", ["600"]);
        req.timeout = Duration::from_secs(600);
        let err = Guest::new(&agent).exec(&req, &mut |_, _| {}).unwrap_err();
        assert!(err.is_vm_gone(), "{err}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_guest_file_streams_a_chunk_per_call_and_closes_its_handle() {
        use std::io::Read;
        let first = vec![1u8; FILE_CHUNK];
        let agent = FakeAgent::new(vec![
            Ok(json!(5)),
            read(&first, false),
            read(b"tail", true),
            Ok(json!({})),
        ]);
        let g = Guest::new(&agent);
        let mut r = g.open_reader("/var/tmp/x.tar").unwrap();
        let mut small = [0u8; 512];
        r.read_exact(&mut small).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(small.len() + rest.len(), FILE_CHUNK + 4);
        assert!(rest.ends_with(b"tail"));
        drop(r);
        assert_eq!(
            agent.executed(),
            [
                "guest-file-open",
                "guest-file-read",
                "guest-file-read",
                "guest-file-close"
            ]
        );
    }

    #[test]
    fn an_agent_sending_more_than_asked_for_is_refused() {
        use std::io::Read;
        let agent = FakeAgent::new(vec![
            Ok(json!(5)),
            read(&vec![0u8; FILE_CHUNK + 1], false),
            Ok(json!({})),
        ]);
        let g = Guest::new(&agent);
        let mut r = g.open_reader("/var/tmp/x.tar").unwrap();
        let mut buf = [0u8; 16];
        let e = r.read(&mut buf).unwrap_err();
        assert!(e.to_string().contains("got 1048577"), "{e}");
        let kept = r.take_error().expect("the agent's error is kept");
        assert!(matches!(kept, BackendError::Protocol { .. }), "{kept}");
        r.close().unwrap();
    }
}
