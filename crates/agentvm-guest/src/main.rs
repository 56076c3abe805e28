//! `agentvm-guest`: the agent inside every agentvm guest. agentvm's PID 1 starts it on the
//! virtio-serial port [`agentvm_guest::PORT_NAME`] (next to qemu-guest-agent, which stays for
//! liveness and as a fallback); the host speaks the protocol of [`agentvm_guest`] to it.
//!
//! One thread reads the port and dispatches frames; every program runs under a thread of its
//! own that moves its stdin, stdout and stderr (or its terminal) with `poll`, under the
//! host's credit, and reports the exit once its output is drained. `--listen SOCKET` serves
//! a Unix socket instead of the port (for the host's tests).
//!
//! The host is trusted here and the guest is not the agent's to defend: the agent runs as
//! root in a VM whose every byte the host checks again on its side.

// libc calls without a safe wrapper in std: poll, pidfd_open, waitpid, ioctl, openpty,
// clock_settime, fcntl and sigtimedwait, and the pre_exec hook. Each block says why it is
// sound.
#![allow(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentvm_guest::{
    cost, read_frame, scan_for_magic, sync_bytes, ExecSpec, FrameError, PathKind, PathStat,
    ToGuest, ToHost, WinSize, FRAME_COST, GUEST_SYNC, HOST_SYNC, MAX_CHUNK, PORT_NAME, VERSION,
    WINDOW,
};

/// After the program exits, output still arriving (from children that kept its pipes) is
/// forwarded until the pipes are quiet this long...
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);
/// ...or at most this long.
const MAX_AFTER_EXIT: Duration = Duration::from_secs(2);

fn log(msg: impl std::fmt::Display) {
    eprintln!("agentvm-guest: {msg}");
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let agent = Arc::new(Agent::default());
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--listen", path] => serve_socket(&agent, path),
        ["--port", path] => serve_port(&agent, path),
        [] => match find_port() {
            Some(path) => serve_port(&agent, &path),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio port named {PORT_NAME}"),
            )),
        },
        _ => {
            eprintln!("usage: agentvm-guest [--port DEVICE | --listen SOCKET]");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        log(e);
        std::process::exit(1);
    }
}

/// `/dev/vportNpM` of the port named [`PORT_NAME`].
fn find_port() -> Option<String> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(format!("/dev/{}", entry.file_name().to_string_lossy()));
        }
    }
    None
}

fn serve_socket(agent: &Arc<Agent>, path: &str) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    for conn in listener.incoming() {
        let conn = conn?;
        agent.set_writer(Box::new(conn.try_clone()?));
        serve(agent, BufReader::with_capacity(MAX_CHUNK + 64, conn));
    }
    Ok(())
}

fn serve_port(agent: &Arc<Agent>, path: &str) -> io::Result<()> {
    block_sigio();
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let fd = port.as_raw_fd();
    // SIGIO tells of the host connecting (the kernel's virtio console sends it on every
    // change of the host side), so a disconnected port is waited on without polling.
    // SAFETY: fcntl on a descriptor we own; F_SETOWN/F_SETFL take integer arguments.
    unsafe {
        libc::fcntl(fd, libc::F_SETOWN, libc::getpid());
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_ASYNC);
    }
    agent.set_writer(Box::new(port.try_clone()?));
    loop {
        wait_for_host(fd);
        serve(
            agent,
            BufReader::with_capacity(MAX_CHUNK + 64, PortReader { fd }),
        );
    }
}

fn block_sigio() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; masks only this thread
    // (the first, so every later thread inherits it; std resets the mask in children).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGIO);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait until the host side of the port is connected (no `POLLHUP`).
fn wait_for_host(fd: RawFd) {
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 0) };
        if p.revents & libc::POLLHUP == 0 {
            return;
        }
        // SAFETY: as in block_sigio; waits for the blocked SIGIO, at most 250 ms (a safety net
        // should a notification be missed).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGIO);
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 250_000_000,
            };
            libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
        }
    }
}

/// The port as a stream: a read returns 0 (end of file) when the host side disconnects.
struct PortReader {
    fd: RawFd,
}

impl Read for PortReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // Blocks while the host is connected and has sent nothing; returns 0 once the
            // host side disconnects (the virtio console's read never blocks then).
            // SAFETY: reads into a buffer of the given length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(n as usize);
        }
    }
}

/// What one stream is doing.
enum Slot {
    /// A program, or a file being sent to the host, run by a thread of its own.
    Task(Arc<Session>),
    /// A file being written from the host's data.
    Upload {
        file: Option<File>,
        error: Option<String>,
    },
}

/// The host's side of a running program or download: what the dispatcher hands to its
/// thread, and an eventfd that wakes the thread.
struct Session {
    ctl: Mutex<Ctl>,
    wake: File,
    pid: Mutex<Option<i32>>,
}

#[derive(Default)]
struct Ctl {
    credit: u64,
    stdin: VecDeque<Vec<u8>>,
    stdin_close: bool,
    signals: Vec<i32>,
    resize: Option<WinSize>,
    closed: bool,
}

impl Session {
    fn new() -> io::Result<Arc<Session>> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Session {
            ctl: Mutex::new(Ctl {
                credit: WINDOW,
                ..Ctl::default()
            }),
            // SAFETY: fd is a fresh descriptor nobody else owns.
            wake: unsafe { File::from_raw_fd(fd) },
            pid: Mutex::new(None),
        }))
    }

    fn update(&self, f: impl FnOnce(&mut Ctl)) {
        f(&mut self.ctl.lock().unwrap_or_else(|e| e.into_inner()));
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }

    fn clear_wake(&self) {
        let mut b = [0u8; 8];
        let _ = (&self.wake).read(&mut b);
    }

    /// Block until woken (or `timeout`).
    fn wait(&self, timeout: Duration) {
        let mut p = libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        self.clear_wake();
    }

    fn kill(&self, sig: i32) {
        if let Some(pid) = *self.pid.lock().unwrap_or_else(|e| e.into_inner()) {
            // SAFETY: signals the process group the program leads (setsid in pre_exec).
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

#[derive(Default)]
struct Agent {
    /// Bumped by every new connection: frames of sessions from an older one are dropped.
    epoch: AtomicU64,
    out: Mutex<Option<Box<dyn Write + Send>>>,
    slots: Mutex<HashMap<u32, Slot>>,
}

impl Agent {
    fn set_writer(&self, w: Box<dyn Write + Send>) {
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
    }

    /// Send a frame for a session of connection `epoch`; false when that connection is gone.
    fn send(&self, epoch: u64, stream: u32, msg: &ToHost) -> bool {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if self.epoch.load(Ordering::SeqCst) != epoch {
            return false;
        }
        match out.as_mut() {
            Some(w) => agentvm_guest::write_frame(w, stream, msg).is_ok(),
            None => false,
        }
    }

    fn send_raw(&self, bytes: &[u8]) {
        if let Some(w) = self.out.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = w.write_all(bytes).and_then(|_| w.flush());
        }
    }

    /// A new connection: end everything the last one started.
    fn reset(&self) -> u64 {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in slots.into_values() {
            if let Slot::Task(s) = slot {
                s.kill(libc::SIGKILL);
                s.update(|c| c.closed = true);
            }
        }
        epoch
    }

    fn remove(&self, epoch: u64, stream: u32) {
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream);
        }
    }
}

/// Serve one connection: sync, then frames until the transport ends (returns) or a frame
/// is malformed (back to sync).
fn serve<R: Read>(agent: &Arc<Agent>, mut r: R) {
    let mut buf = Vec::new();
    loop {
        let nonce = match scan_for_magic(&mut r, &HOST_SYNC) {
            Ok(n) => n,
            Err(_) => return,
        };
        let epoch = agent.reset();
        agent.send_raw(&sync_bytes(&GUEST_SYNC, nonce));
        loop {
            match read_frame::<ToGuest>(&mut r, &mut buf) {
                Ok(f) => dispatch(agent, epoch, f.stream, f.msg),
                Err(FrameError::Io(_)) => return,
                Err(e) => {
                    log(format!("{e}; waiting for the host to sync again"));
                    break;
                }
            }
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn dispatch(agent: &Arc<Agent>, epoch: u64, stream: u32, msg: ToGuest) {
    let reply = |m: ToHost| {
        agent.send(epoch, stream, &m);
    };
    let done = |r: io::Result<()>| match r {
        Ok(()) => ToHost::Done,
        Err(e) => ToHost::Error {
            message: e.to_string(),
        },
    };
    match msg {
        ToGuest::Ping => reply(ToHost::Pong {
            unix_nanos: now_nanos(),
            version: VERSION,
        }),
        ToGuest::SetClock { unix_nanos } => reply(done(set_clock(unix_nanos))),
        ToGuest::Reseed { entropy } => reply(done(reseed(&entropy))),
        ToGuest::Exec(spec) => start_task(agent, epoch, stream, move |a, s| {
            run_exec(a, epoch, stream, &spec, s)
        }),
        ToGuest::ReadFile { path, max } => start_task(agent, epoch, stream, move |a, s| {
            run_download(a, epoch, stream, &path, max, s)
        }),
        ToGuest::Connect { port } => start_task(agent, epoch, stream, move |a, s| {
            run_forward(a, epoch, stream, port, s)
        }),
        ToGuest::Stat { path } => reply(ToHost::Stat(stat(&path))),
        ToGuest::ReadTree { path, max } => start_task(agent, epoch, stream, move |a, s| {
            run_tree_download(a, epoch, stream, &path, max, s)
        }),
        ToGuest::WriteTree { path, name } => start_task(agent, epoch, stream, move |a, s| {
            run_tree_upload(a, epoch, stream, &path, &name, s)
        }),
        ToGuest::WriteFile { path, mode } => {
            use std::os::unix::fs::OpenOptionsExt;
            let (file, error) = match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
            {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(format!("{path}: {e}"))),
            };
            agent
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(stream, Slot::Upload { file, error });
        }
        ToGuest::FileData(data) => {
            let mut slots = agent.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get_mut(&stream) {
                Some(Slot::Upload { file, error }) => {
                    if let (Some(f), None) = (file.as_mut(), error.as_ref()) {
                        if let Err(e) = f.write_all(&data) {
                            *error = Some(e.to_string());
                        }
                    }
                    drop(slots);
                    reply(ToHost::Credit(cost(data.len())));
                }
                // A directory being unpacked: its thread reads the data and gives credit.
                Some(Slot::Task(s)) => {
                    let s = s.clone();
                    drop(slots);
                    s.update(|c| c.stdin.push_back(data));
                }
                None => {}
            }
        }
        ToGuest::FileEnd => {
            let mut slots = agent.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(Slot::Task(s)) = slots.get(&stream) {
                let s = s.clone();
                drop(slots);
                s.update(|c| c.stdin_close = true);
                return;
            }
            let slot = slots.remove(&stream);
            drop(slots);
            if let Some(Slot::Upload { file, error }) = slot {
                reply(match (file, error) {
                    (_, Some(message)) => ToHost::Error { message },
                    (Some(f), None) => done(f.sync_data()),
                    (None, None) => ToHost::Error {
                        message: "no file".into(),
                    },
                });
            }
        }
        ToGuest::Stdin(data) => with_session(agent, stream, |c| c.stdin.push_back(data)),
        ToGuest::StdinClose => with_session(agent, stream, |c| c.stdin_close = true),
        ToGuest::Signal(sig) => with_session(agent, stream, |c| c.signals.push(sig)),
        ToGuest::Resize(ws) => with_session(agent, stream, |c| c.resize = Some(ws)),
        ToGuest::Credit(n) => with_session(agent, stream, |c| {
            c.credit = c.credit.saturating_add(n).min(WINDOW)
        }),
        ToGuest::Close => {
            let slot = agent
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&stream);
            if let Some(Slot::Task(s)) = slot {
                s.kill(libc::SIGKILL);
                s.update(|c| c.closed = true);
            }
        }
    }
}

fn with_session(agent: &Agent, stream: u32, f: impl FnOnce(&mut Ctl)) {
    let s = match agent
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&stream)
    {
        Some(Slot::Task(s)) => s.clone(),
        _ => return,
    };
    s.update(f);
}

fn start_task(
    agent: &Arc<Agent>,
    epoch: u64,
    stream: u32,
    task: impl FnOnce(&Agent, &Session) + Send + 'static,
) {
    let session = match Session::new() {
        Ok(s) => s,
        Err(e) => {
            agent.send(
                epoch,
                stream,
                &ToHost::Error {
                    message: e.to_string(),
                },
            );
            return;
        }
    };
    agent
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(stream, Slot::Task(session.clone()));
    let a = agent.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("stream-{stream}"))
        .spawn(move || {
            task(&a, &session);
            a.remove(epoch, stream);
        });
    if let Err(e) = spawned {
        agent.remove(epoch, stream);
        agent.send(
            epoch,
            stream,
            &ToHost::Error {
                message: format!("no thread: {e}"),
            },
        );
    }
}

fn set_clock(unix_nanos: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `RNDADDENTROPY` (credit the bytes into the input pool), then `RNDRESEEDCRNG` (reseed the
/// CRNG from it now, not at the next periodic reseed).
fn reseed(entropy: &[u8]) -> io::Result<()> {
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    if entropy.is_empty() || entropy.len() > 256 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "1 to 256 bytes of entropy",
        ));
    }
    let rng = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len() + 4);
    info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    info.extend_from_slice(entropy);
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: the buffer holds a complete rand_pool_info of buf_size bytes.
    if unsafe { libc::ioctl(rng.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(rng.as_raw_fd(), RNDRESEEDCRNG, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn set_winsize(fd: RawFd, ws: WinSize) {
    let w = libc::winsize {
        ws_row: ws.rows,
        ws_col: ws.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &w) };
}

/// The descriptors of a started program, seen from the agent.
struct Child {
    pid: i32,
    /// Its stdin pipe, or the terminal's master.
    stdin: Option<OwnedFd>,
    /// Its stdout pipe, or the terminal's master.
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    pty: bool,
}

fn spawn(spec: &ExecSpec) -> io::Result<Child> {
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    let mut cmd = Command::new(program);
    cmd.args(args).env_clear().envs(spec.env.iter().cloned());
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(gid) = spec.gid {
        cmd.gid(gid);
    }
    if let Some(uid) = spec.uid {
        cmd.uid(uid);
    }
    let procs = match &spec.cgroup {
        Some(dir) => {
            let _ = std::fs::create_dir_all(dir);
            CString::new(format!("{dir}/cgroup.procs")).ok()
        }
        None => None,
    };
    let mut master = None;
    if let Some(ws) = spec.pty {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: openpty writes two descriptors; name, termios and winsize may be null.
        let r = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptors from openpty.
        let (m, s) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        set_winsize(m.as_raw_fd(), ws);
        cmd.stdin(Stdio::from(s.try_clone()?))
            .stdout(Stdio::from(s.try_clone()?))
            .stderr(Stdio::from(s));
        master = Some(m);
    } else {
        cmd.stdin(if spec.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    }
    let pty = master.is_some();
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, ioctl, open,
    // write, close, on a path prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if pty {
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            if let Some(p) = &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let child = match master {
        Some(m) => Child {
            pid,
            stdin: Some(m.try_clone()?),
            stdout: m,
            stderr: None,
            pty: true,
        },
        None => Child {
            pid,
            stdin: child.stdin.take().map(OwnedFd::from),
            stdout: child
                .stdout
                .take()
                .map(OwnedFd::from)
                .ok_or_else(|| io::Error::other("no stdout pipe"))?,
            stderr: child.stderr.take().map(OwnedFd::from),
            pty: false,
        },
    };
    for fd in [
        Some(&child.stdout),
        child.stderr.as_ref(),
        child.stdin.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        set_nonblocking(fd.as_raw_fd());
    }
    Ok(child)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Reap `pid`: (exit code, signal).
fn reap(pid: i32) -> (Option<i32>, Option<i32>) {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r != pid {
        return (None, None);
    }
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into a buffer of the given length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: writes from a buffer of the given length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Write what can be written now of the first pending chunk (from `offset`) to `fd`; a chunk
/// written whole is acknowledged to the host with its credit. An error other than
/// `WouldBlock` drops everything pending (the reader is gone) and is returned.
fn write_pending(
    fd: RawFd,
    pending: &mut VecDeque<Vec<u8>>,
    offset: &mut usize,
    send: &dyn Fn(ToHost) -> bool,
) -> io::Result<()> {
    let Some(chunk) = pending.front() else {
        return Ok(());
    };
    match write_fd(fd, &chunk[*offset..]) {
        Ok(k) => {
            *offset += k;
            if *offset == chunk.len() {
                let done = cost(chunk.len());
                pending.pop_front();
                *offset = 0;
                send(ToHost::Credit(done));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => {
            pending.clear();
            Err(e)
        }
    }
}

fn run_exec(agent: &Agent, epoch: u64, stream: u32, spec: &ExecSpec, s: &Session) {
    let send = |m: ToHost| agent.send(epoch, stream, &m);
    // A program that cannot start ends as a shell's would: 126 (no working directory, not
    // executable), 127 (not found), the reason on stderr.
    let failed = |code: i32, message: String| {
        send(ToHost::Stderr(
            format!("agentvm-guest: {message}\n").into_bytes(),
        ));
        send(ToHost::Exited {
            code: Some(code),
            signal: None,
        });
    };
    if let Some(cwd) = &spec.cwd {
        if !std::path::Path::new(cwd).is_dir() {
            return failed(126, format!("cd {cwd}: no such directory"));
        }
    }
    let child = match spawn(spec) {
        Ok(c) => c,
        Err(e) => {
            let program = spec.argv.first().map_or("", String::as_str);
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return failed(code, format!("{program}: {e}"));
        }
    };
    *s.pid.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.pid);
    send(ToHost::Started {
        pid: child.pid as u32,
    });
    let pidfd = pidfd_open(child.pid).ok();
    let Child {
        pid,
        mut stdin,
        stdout,
        stderr,
        pty,
    } = child;
    // Output descriptors still open: stdout (or the terminal) first, then stderr.
    let mut outs: Vec<(OwnedFd, bool)> = vec![(stdout, true)];
    if let Some(e) = stderr {
        outs.push((e, false));
    }
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut offset = 0usize;
    let mut close_stdin = false;
    let mut exited: Option<(Option<i32>, Option<i32>)> = None;
    let mut exited_at = Instant::now();
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let credit = {
            let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
            for sig in c.signals.drain(..) {
                // SAFETY: signals the program's own process group.
                unsafe { libc::kill(-pid, sig) };
            }
            if let (Some(ws), Some(fd)) = (c.resize.take(), stdin.as_ref()) {
                if pty {
                    set_winsize(fd.as_raw_fd(), ws);
                }
            }
            pending.extend(c.stdin.drain(..));
            close_stdin |= c.stdin_close;
            if c.closed {
                // Abandoned by the host (or its connection ended): kill and reap, send nothing.
                drop(c);
                // SAFETY: as above.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                if exited.is_none() {
                    reap(pid);
                }
                return;
            }
            c.credit
        };
        if pending.is_empty() && close_stdin {
            close_stdin = false;
            if pty {
                // End of file on a terminal: VEOF at the start of a line.
                if let Some(fd) = &stdin {
                    let _ = write_fd(fd.as_raw_fd(), b"\x04");
                }
            } else {
                stdin = None;
            }
        }
        let can_read = credit > FRAME_COST;
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: s.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let pid_idx = match (&pidfd, exited) {
            (Some(p), None) => {
                fds.push(libc::pollfd {
                    fd: p.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        let out_base = fds.len();
        if can_read {
            for (fd, _) in &outs {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let in_idx = match (&stdin, pending.is_empty()) {
            (Some(fd), false) => {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        // Without a pidfd (old kernel), poll for the exit.
        let timeout = match exited {
            Some(_) if can_read => QUIET_AFTER_EXIT.as_millis() as i32,
            Some(_) => -1,
            None if pidfd.is_none() => 20,
            None => -1,
        };
        // SAFETY: a valid array of pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            s.clear_wake();
        }
        let mut got_output = false;
        if can_read {
            let mut closed = Vec::new();
            let mut credit_used = 0u64;
            for (i, (fd, is_stdout)) in outs.iter().enumerate() {
                if fds[out_base + i].revents == 0 {
                    continue;
                }
                let room =
                    (credit.saturating_sub(credit_used + FRAME_COST) as usize).min(MAX_CHUNK);
                if room == 0 {
                    break;
                }
                match read_fd(fd.as_raw_fd(), &mut buf[..room]) {
                    Ok(0) => closed.push(i),
                    Ok(k) => {
                        got_output = true;
                        credit_used += cost(k);
                        let data = buf[..k].to_vec();
                        send(if *is_stdout {
                            ToHost::Stdout(data)
                        } else {
                            ToHost::Stderr(data)
                        });
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // A terminal's master reads EIO once every slave is closed.
                    Err(_) => closed.push(i),
                }
            }
            if credit_used > 0 {
                let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
                c.credit = c.credit.saturating_sub(credit_used);
            }
            for i in closed.into_iter().rev() {
                outs.remove(i);
            }
        }
        if let Some(i) = in_idx {
            if fds[i].revents & (libc::POLLERR | libc::POLLHUP) != 0 && !pty {
                // The program closed its stdin: drop what it will never read.
                pending.clear();
                stdin = None;
            } else if fds[i].revents & libc::POLLOUT != 0 {
                if let Some(fd) = stdin.as_ref() {
                    if write_pending(fd.as_raw_fd(), &mut pending, &mut offset, &send).is_err() {
                        stdin = None;
                    }
                }
            }
        }
        let pid_ended = match pid_idx {
            Some(i) => fds[i].revents != 0,
            None => exited.is_none() && pidfd.is_none(),
        };
        if pid_ended && exited.is_none() {
            if pidfd.is_none() {
                let mut status = 0;
                // SAFETY: polls our own child without blocking.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    exited = Some(if libc::WIFEXITED(status) {
                        (Some(libc::WEXITSTATUS(status)), None)
                    } else {
                        (None, Some(libc::WTERMSIG(status)))
                    });
                    exited_at = Instant::now();
                }
            } else {
                exited = Some(reap(pid));
                exited_at = Instant::now();
            }
        }
        if let Some((code, signal)) = exited {
            let quiet = n == 0 && can_read && !got_output;
            if outs.is_empty() || quiet || exited_at.elapsed() >= MAX_AFTER_EXIT {
                send(ToHost::Exited { code, signal });
                return;
            }
        }
    }
}

fn run_download(agent: &Agent, epoch: u64, stream: u32, path: &str, max: u64, s: &Session) {
    let send = |m: ToHost| agent.send(epoch, stream, &m);
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => {
            send(ToHost::Error {
                message: format!("{path}: {e}"),
            });
            return;
        }
    };
    let mut sent = 0u64;
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let credit = {
            let c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
            if c.closed {
                return;
            }
            c.credit
        };
        if credit <= FRAME_COST {
            s.wait(Duration::from_secs(60));
            continue;
        }
        let room = ((credit - FRAME_COST) as usize)
            .min(MAX_CHUNK)
            .min((max - sent).min(usize::MAX as u64) as usize);
        if room == 0 {
            break;
        }
        match file.read(&mut buf[..room]) {
            Ok(0) => break,
            Ok(k) => {
                s.ctl.lock().unwrap_or_else(|e| e.into_inner()).credit -= cost(k);
                sent += k as u64;
                if !send(ToHost::FileData(buf[..k].to_vec())) {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                send(ToHost::Error {
                    message: format!("{path}: {e}"),
                });
                return;
            }
        }
    }
    send(ToHost::FileEnd { size: sent });
}

fn stat(path: &str) -> PathStat {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) => PathStat {
            kind: if m.is_dir() {
                PathKind::Directory
            } else if m.is_file() {
                PathKind::File
            } else {
                PathKind::Other
            },
            size: m.len(),
            mode: m.permissions().mode() & 0o7777,
        },
        Err(_) => PathStat {
            kind: PathKind::Missing,
            size: 0,
            mode: 0,
        },
    }
}

/// A stream's data to the host as [`ToHost::FileData`] under its credit, at most `max`
/// bytes.
struct ToHostWriter<'a> {
    agent: &'a Agent,
    epoch: u64,
    stream: u32,
    s: &'a Session,
    sent: u64,
    max: u64,
}

impl Write for ToHostWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            let credit = {
                let c = self.s.ctl.lock().unwrap_or_else(|e| e.into_inner());
                if c.closed {
                    return Err(io::Error::other("closed by the host"));
                }
                c.credit
            };
            if credit <= FRAME_COST {
                self.s.wait(Duration::from_secs(60));
                continue;
            }
            let k = ((credit - FRAME_COST) as usize)
                .min(MAX_CHUNK)
                .min(data.len());
            if self.sent + k as u64 > self.max {
                return Err(io::Error::other(format!(
                    "larger than the cap of {} bytes",
                    self.max
                )));
            }
            self.s.ctl.lock().unwrap_or_else(|e| e.into_inner()).credit -= cost(k);
            self.sent += k as u64;
            let msg = ToHost::FileData(data[..k].to_vec());
            if !self.agent.send(self.epoch, self.stream, &msg) {
                return Err(io::Error::other("the host went away"));
            }
            return Ok(k);
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A directory to the host as a tar stream ([`agentvm_guest::tree::pack`]).
fn run_tree_download(agent: &Agent, epoch: u64, stream: u32, path: &str, max: u64, s: &Session) {
    let send = |m: ToHost| agent.send(epoch, stream, &m);
    let name = std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let Some(name) = name else {
        send(ToHost::Error {
            message: format!("{path}: names no directory to copy"),
        });
        return;
    };
    let mut out = ToHostWriter {
        agent,
        epoch,
        stream,
        s,
        sent: 0,
        max,
    };
    let packed = agentvm_guest::tree::pack(
        std::path::Path::new(path),
        &name,
        io::BufWriter::with_capacity(MAX_CHUNK, &mut out),
    );
    match packed {
        Ok(()) => send(ToHost::FileEnd { size: out.sent }),
        Err(e) => send(ToHost::Error {
            message: format!("{path}: {e}"),
        }),
    };
}

/// A stream's data from the host ([`ToGuest::FileData`] queued by the dispatcher), giving
/// credit back as it is read; ends at [`ToGuest::FileEnd`].
struct FromHostReader<'a> {
    agent: &'a Agent,
    epoch: u64,
    stream: u32,
    s: &'a Session,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for FromHostReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            let next = {
                let mut c = self.s.ctl.lock().unwrap_or_else(|e| e.into_inner());
                if c.closed {
                    return Err(io::Error::other("closed by the host"));
                }
                match c.stdin.pop_front() {
                    Some(chunk) => Some(chunk),
                    None if c.stdin_close => return Ok(0),
                    None => None,
                }
            };
            match next {
                Some(chunk) => {
                    self.agent
                        .send(self.epoch, self.stream, &ToHost::Credit(cost(chunk.len())));
                    self.buf = chunk;
                    self.pos = 0;
                }
                None => self.s.wait(Duration::from_secs(60)),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A directory from the host's tar stream ([`agentvm_guest::tree::unpack_new`]).
fn run_tree_upload(agent: &Agent, epoch: u64, stream: u32, path: &str, name: &str, s: &Session) {
    let src = FromHostReader {
        agent,
        epoch,
        stream,
        s,
        buf: Vec::new(),
        pos: 0,
    };
    let msg = match agentvm_guest::tree::unpack_new(src, std::path::Path::new(path), name) {
        Ok(_) => ToHost::Done,
        Err(e) => ToHost::Error {
            message: e.to_string(),
        },
    };
    agent.send(epoch, stream, &msg);
}

/// A forwarded connection: bytes between the host's stream and `127.0.0.1:port`.
fn run_forward(agent: &Agent, epoch: u64, stream: u32, port: u16, s: &Session) {
    use std::net::{Shutdown, SocketAddr, TcpStream};
    let send = |m: ToHost| agent.send(epoch, stream, &m);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(t) => t,
        Err(e) => {
            send(ToHost::Error {
                message: format!("connect {addr}: {e}"),
            });
            return;
        }
    };
    let _ = tcp.set_nonblocking(true);
    send(ToHost::Done);
    let fd = tcp.as_raw_fd();
    let mut pending: VecDeque<Vec<u8>> = VecDeque::new();
    let mut offset = 0usize;
    let (mut reading, mut writing) = (true, true);
    let mut buf = vec![0u8; MAX_CHUNK];
    while reading || writing {
        let credit = {
            let mut c = s.ctl.lock().unwrap_or_else(|e| e.into_inner());
            if c.closed {
                return;
            }
            pending.extend(c.stdin.drain(..));
            if c.stdin_close && pending.is_empty() && writing {
                writing = false;
                let _ = tcp.shutdown(Shutdown::Write);
            }
            c.credit
        };
        let mut events = 0;
        if reading && credit > FRAME_COST {
            events |= libc::POLLIN;
        }
        if writing && !pending.is_empty() {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: s.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd,
                events,
                revents: 0,
            },
        ];
        // SAFETY: a valid array of pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            s.clear_wake();
        }
        let ready = fds[1].revents;
        if ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && events & libc::POLLIN != 0
        {
            let room = ((credit - FRAME_COST) as usize).min(MAX_CHUNK);
            match read_fd(fd, &mut buf[..room]) {
                Ok(k) if k > 0 => {
                    s.ctl.lock().unwrap_or_else(|e| e.into_inner()).credit -= cost(k);
                    if !send(ToHost::Stdout(buf[..k].to_vec())) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // End of file, or the connection failed: nothing more comes from it.
                _ => {
                    reading = false;
                    send(ToHost::Eof);
                }
            }
        }
        if ready & libc::POLLOUT != 0
            && write_pending(fd, &mut pending, &mut offset, &send).is_err()
        {
            writing = false;
        }
    }
    send(ToHost::Exited {
        code: None,
        signal: None,
    });
}
