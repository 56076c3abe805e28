//! The sandbox verbs: `pause`, `resume`, `stop`, `start` (each edits `spec.state` through the
//! controller and waits for the sandbox to get there) and `exec sandbox/NAME -- CMD`.

use std::io::Write;
use std::time::{Duration, Instant};

use agentvm_api::{Kind, Resource, SandboxPhase, SandboxState};
use agentvm_client::{ExecEvent, SandboxExecRequest};
use agentvm_controller::Config;
use anyhow::{bail, Context};
use base64::Engine;
use clap::Args;

use super::objects::{object_ref, ConnectArgs};

/// Options of `pause`, `resume`, `stop` and `start`.
#[derive(Debug, Args)]
pub struct PowerArgs {
    /// The sandbox: `sandbox/NAME` (or `sbx/NAME`).
    #[arg(value_name = "sandbox/NAME")]
    target: String,
    /// Return once the change is recorded, without waiting for the sandbox to get there.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for the sandbox to get there (`90`, `90s`, `5m`).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The name in `sandbox/NAME` (any spelling of the kind).
pub fn sandbox_name(target: &str) -> anyhow::Result<String> {
    let (kind, name) = target
        .split_once('/')
        .with_context(|| format!("{target:?}: name the sandbox as sandbox/NAME"))?;
    let kind: Kind = kind.parse()?;
    if kind != Kind::Sandbox {
        bail!("{target:?}: only sandboxes can be used this way (sandbox/NAME), not {kind}");
    }
    if name.is_empty() {
        bail!("{target:?}: the name is missing (sandbox/NAME)");
    }
    Ok(name.to_string())
}

/// True when `arg` names a sandbox (`sandbox/x`, `sbx/x`).
pub fn is_sandbox_ref(arg: &str) -> bool {
    arg.split_once('/')
        .and_then(|(k, _)| k.parse::<Kind>().ok())
        .is_some_and(|k| k == Kind::Sandbox)
}

impl PowerArgs {
    /// Sets `spec.state` to `state` and waits for the phase that goes with it.
    pub fn run(self, cfg: &Config, state: SandboxState, done: &str) -> anyhow::Result<i32> {
        let name = sandbox_name(&self.target)?;
        let client = self.connect.client(cfg);
        let obj = client.sandbox_state(&name, state)?;
        let what = object_ref(Kind::Sandbox, &name);
        if self.no_wait {
            println!("{what} edited (spec.state: {})", state.as_str());
            return Ok(0);
        }
        let want = match state {
            SandboxState::Running => SandboxPhase::Running,
            SandboxState::Paused => SandboxPhase::Paused,
            SandboxState::Stopped => SandboxPhase::Stopped,
        };
        let generation = obj.generation();
        let start = Instant::now();
        loop {
            let obj = client.get(Kind::Sandbox, &name)?;
            if let Resource::Sandbox(sb) = &obj.resource {
                if let Some(st) = &sb.status {
                    let current = st.observed_generation.unwrap_or(0) >= generation;
                    if current && st.phase == want && st.stopped_reason.is_none() {
                        println!("{what} {done}");
                        return Ok(0);
                    }
                    if current && st.phase == SandboxPhase::Failed {
                        bail!("{what} failed; see `agentvm describe {what}`");
                    }
                }
            }
            if start.elapsed() > self.timeout {
                bail!(
                    "{what} is not {} after {}s; see `agentvm describe {what}`",
                    want.as_str(),
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `agentvm exec sandbox/NAME -- CMD ARGS..`: runs the command in the sandbox through the
/// controller, prints its output as it comes, and returns its exit code (128 + signal when
/// killed, 124 at its timeout).
pub fn exec(
    cfg: &Config,
    connect: &ConnectArgs,
    name: &str,
    request: SandboxExecRequest,
) -> anyhow::Result<i32> {
    let client = connect.client(cfg);
    let events = client.sandbox_exec(name, &request)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    for event in events {
        match event? {
            ExecEvent::Stdout(data) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&b64.decode(data).context("bad output from the controller")?)?;
                out.flush()?;
            }
            ExecEvent::Stderr(data) => {
                std::io::stderr()
                    .write_all(&b64.decode(data).context("bad output from the controller")?)?;
            }
            ExecEvent::Exit {
                code,
                signal,
                timed_out,
            } => {
                if timed_out {
                    eprintln!("error: the command was killed at its timeout");
                    return Ok(124);
                }
                return Ok(match (code, signal) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    (None, None) => 1,
                });
            }
            ExecEvent::Error(e) => bail!("{e}"),
        }
    }
    bail!("the controller ended the exec without saying how the command ended")
}

/// Options of `snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// The sandbox: `sandbox/NAME`.
    #[arg(value_name = "sandbox/NAME")]
    target: String,
    /// Name of the new `Snapshot` object.
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Copy the disk alone, with the guest's file systems frozen for a moment
    /// (no memory: a rollback to it boots the sandbox afresh, and it cannot be
    /// forked).
    #[arg(long)]
    disk_only: bool,
    /// How long to wait for it to be taken (`90`, `90s`, `5m`).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl SnapshotArgs {
    /// Creates the `Snapshot` object and waits until it is taken (or fails).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let sandbox = sandbox_name(&self.target)?;
        let client = self.connect.client(cfg);
        let snapshot = agentvm_api::Snapshot::new(
            self.name.clone(),
            agentvm_api::SnapshotSpec {
                sandbox_ref: sandbox.clone(),
                memory: !self.disk_only,
            },
        );
        create(&client, serde_json::to_value(&snapshot)?)?;
        let what = object_ref(Kind::Snapshot, &self.name);
        let start = Instant::now();
        loop {
            let obj = client.get(Kind::Snapshot, &self.name)?;
            if let Resource::Snapshot(s) = &obj.resource {
                if let Some(st) = &s.status {
                    match st.phase {
                        agentvm_api::SnapshotPhase::Ready => {
                            let mib = st.memory_bytes.map(|b| b.div_ceil(1 << 20));
                            let held = if st.disk_only {
                                " (disk only)".to_string()
                            } else {
                                mib.map(|m| format!(" ({m} MiB of memory)"))
                                    .unwrap_or_default()
                            };
                            println!("{what} taken of sandbox/{sandbox}{held}");
                            return Ok(0);
                        }
                        agentvm_api::SnapshotPhase::Failed => {
                            bail!("{what} failed: {}", degraded(&st.conditions));
                        }
                        agentvm_api::SnapshotPhase::Pending => {}
                    }
                }
            }
            if start.elapsed() > self.timeout {
                bail!(
                    "{what} is not taken after {}s; see `agentvm describe {what}`",
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The message of the `Degraded` condition among `conditions` (empty when there is none):
/// why an object failed.
fn degraded(conditions: &[agentvm_api::Condition]) -> &str {
    agentvm_api::find_condition(conditions, "Degraded").map_or("", |c| c.message.as_str())
}

/// Creates one object through the controller; its refusal is the error.
fn create(client: &agentvm_client::Client, object: serde_json::Value) -> anyhow::Result<()> {
    let request = agentvm_client::ApplyRequest {
        objects: vec![object],
        sources: vec![],
        dry_run: false,
        force: false,
    };
    let response = client.apply(&request)?;
    if let Some(e) = response.results.first().and_then(|r| r.error.clone()) {
        bail!("{e}");
    }
    Ok(())
}

/// Options of `fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The snapshot to fork: `snapshot/NAME`.
    #[arg(value_name = "snapshot/NAME")]
    target: String,
    /// Name of the new `Sandbox` (with `--count`, the forks are NAME-1 … NAME-K).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// How many forks to make (1 to 50).
    #[arg(long, default_value_t = 1, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=50))]
    count: u32,
    /// How long to wait for the forks to run (`90`, `90s`, `5m`).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl ForkArgs {
    /// Creates the `Sandbox`es with `fromSnapshot` and waits until they run (or one fails).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let snapshot = match self.target.split_once('/') {
            Some((kind, name)) if kind.parse::<Kind>().ok() == Some(Kind::Snapshot) => name,
            _ => bail!("{:?}: name a snapshot (snapshot/NAME)", self.target),
        };
        let names: Vec<String> = if self.count == 1 {
            vec![self.name.clone()]
        } else {
            (1..=self.count)
                .map(|i| format!("{}-{i}", self.name))
                .collect()
        };
        let client = self.connect.client(cfg);
        for name in &names {
            let sandbox = agentvm_api::Sandbox::new(
                name.clone(),
                // Every other field at its default.
                serde_json::from_value(serde_json::json!({ "fromSnapshot": snapshot }))?,
            );
            create(&client, serde_json::to_value(&sandbox)?)?;
        }
        let start = Instant::now();
        let mut pending = names;
        while !pending.is_empty() {
            let mut still = Vec::new();
            for name in pending {
                let what = object_ref(Kind::Sandbox, &name);
                let obj = client.get(Kind::Sandbox, &name)?;
                let Resource::Sandbox(sb) = &obj.resource else {
                    bail!("the controller answered with {}", obj.key());
                };
                match sb.status.as_ref().map(|st| (st.phase, st)) {
                    Some((agentvm_api::SandboxPhase::Failed, st)) => {
                        bail!("{what} failed: {}", degraded(&st.conditions));
                    }
                    Some((agentvm_api::SandboxPhase::Running, st)) if st.forked_from.is_some() => {
                        let f = st.forked_from.as_ref().expect("checked");
                        println!(
                            "{what} forked from snapshot/{snapshot} of sandbox/{} in {} ms (the source paused {} ms)",
                            f.sandbox, f.took_ms, f.source_pause_ms
                        );
                    }
                    _ => still.push(name),
                }
            }
            pending = still;
            if pending.is_empty() {
                break;
            }
            if start.elapsed() > self.timeout {
                bail!(
                    "{} not running after {}s; see `agentvm describe sandbox/NAME`",
                    pending.join(", "),
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(0)
    }
}

/// Options of `rollback`.
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The sandbox: `sandbox/NAME`.
    #[arg(value_name = "sandbox/NAME")]
    target: String,
    /// The snapshot to go back to: `snapshot/NAME` (or just `NAME`).
    #[arg(long, value_name = "snapshot/NAME")]
    to: String,
    /// How long to wait for the rollback (`90`, `90s`, `5m`).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl RollbackArgs {
    /// Asks for the rollback and waits until the sandbox did it (or refused).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let sandbox = sandbox_name(&self.target)?;
        let snapshot = match self.to.split_once('/') {
            Some((kind, name)) => {
                if kind.parse::<Kind>()? != Kind::Snapshot {
                    bail!("--to {:?}: name a snapshot (snapshot/NAME)", self.to);
                }
                name.to_string()
            }
            None => self.to.clone(),
        };
        let client = self.connect.client(cfg);
        let obj = client.sandbox_rollback(&sandbox, &snapshot)?;
        let Resource::Sandbox(sb) = &obj.resource else {
            bail!("the controller answered with {}", obj.key());
        };
        let Some(request) = sb.spec.rollback.clone() else {
            bail!("the controller did not record the rollback");
        };
        let what = object_ref(Kind::Sandbox, &sandbox);
        let start = Instant::now();
        loop {
            let obj = client.get(Kind::Sandbox, &sandbox)?;
            if let Resource::Sandbox(sb) = &obj.resource {
                if let Some(last) = sb.status.as_ref().and_then(|s| s.last_rollback.as_ref()) {
                    if last.request == request {
                        if last.done {
                            println!("{what} rolled back to snapshot/{snapshot}");
                            return Ok(0);
                        }
                        bail!("{what}: rollback refused: {}", last.message);
                    }
                }
            }
            if start.elapsed() > self.timeout {
                bail!(
                    "{what} did not roll back within {}s (a stopped sandbox rolls back once started); see `agentvm describe {what}`",
                    self.timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Follows an interactive exec: this process's stdin to the program (with `stdin`), the
/// terminal's size whenever it changes (with `tty`; `size` reads it), the program's output
/// to stdout and stderr; returns its exit code (128 + signal, 124 at its timeout).
pub fn attached(
    mut reader: Box<dyn std::io::BufRead + Send>,
    writer: std::os::unix::net::UnixStream,
    stdin: bool,
    tty: bool,
    size: impl Fn() -> (u16, u16) + Send + 'static,
) -> anyhow::Result<i32> {
    use agentvm_client::attach::{self as frames, read_frame};
    use std::io::Read;
    let writer = std::sync::Arc::new(std::sync::Mutex::new(writer));
    let send = {
        let writer = writer.clone();
        move |kind: u8, payload: &[u8]| -> bool {
            writer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(&frames::encode(kind, payload))
                .is_ok()
        }
    };
    if stdin {
        let send = send.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 32 * 1024];
            let mut input = std::io::stdin();
            loop {
                match input.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        send(frames::STDERR_OR_EOF, &[]);
                        return;
                    }
                    Ok(n) => {
                        if !send(frames::DATA, &buf[..n]) {
                            return;
                        }
                    }
                }
            }
        });
    } else {
        send(frames::STDERR_OR_EOF, &[]);
    }
    if tty {
        let send = send.clone();
        std::thread::spawn(move || {
            let mut last = size();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = size();
                if now != last {
                    last = now;
                    let mut p = now.0.to_be_bytes().to_vec();
                    p.extend_from_slice(&now.1.to_be_bytes());
                    if !send(frames::RESIZE_OR_EXIT, &p) {
                        return;
                    }
                }
            }
        });
    }
    loop {
        match read_frame(&mut reader)? {
            Some((frames::DATA, data)) => {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)?;
                out.flush()?;
            }
            Some((frames::STDERR_OR_EOF, data)) => std::io::stderr().write_all(&data)?,
            Some((frames::RESIZE_OR_EXIT, json)) => {
                let exit: ExecEvent =
                    serde_json::from_slice(&json).context("bad exit frame from the controller")?;
                let ExecEvent::Exit {
                    code,
                    signal,
                    timed_out,
                } = exit
                else {
                    bail!("bad exit frame from the controller");
                };
                if timed_out {
                    eprintln!("\r\nerror: the command was killed at its timeout");
                    return Ok(124);
                }
                return Ok(match (code, signal) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    (None, None) => 1,
                });
            }
            Some((frames::ERROR, text)) => bail!("{}", String::from_utf8_lossy(&text)),
            Some(_) => {}
            None => bail!("the controller closed the connection before the command ended"),
        }
    }
}

/// Options of `cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local file or directory (`-` for stdin) or `sandbox/NAME:/guest/path`.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to: `sandbox/NAME:/guest/path`, or a local file or directory (`-` for stdout,
    /// files only).
    #[arg(value_name = "DST")]
    dst: String,
    /// Mode of the file written in the guest (octal) [default: the local file's, else 644];
    /// files only (a directory's entries keep their own).
    #[arg(long, value_name = "MODE")]
    mode: Option<String>,
    /// Most bytes of a directory copied out of a sandbox (its tar archive; also the cap on
    /// its files' bytes).
    #[arg(long, value_name = "BYTES", default_value_t = agentvm_client::MAX_DIR_BYTES)]
    max_bytes: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The name a copied directory takes: the last component of `path` (`.` and `..` resolved
/// for a local path).
fn dir_name(path: &str, local: bool) -> anyhow::Result<String> {
    let p = std::path::Path::new(path);
    let named = match p.file_name() {
        Some(n) => Some(n.to_os_string()),
        None if local => std::fs::canonicalize(p)?
            .file_name()
            .map(|n| n.to_os_string()),
        None => None,
    };
    let name = named
        .and_then(|n| n.into_string().ok())
        .filter(|n| n != "." && n != "..")
        .with_context(|| {
            format!("{path:?}: name the directory itself (its last component is its name)")
        })?;
    Ok(name)
}

/// `dir/name` for a guest directory.
fn guest_join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// `sandbox/NAME:/path` → (NAME, /path).
fn remote(arg: &str) -> Option<anyhow::Result<(String, String)>> {
    let (target, path) = arg.split_once(':')?;
    if !is_sandbox_ref(target) {
        return None;
    }
    Some(sandbox_name(target).and_then(|name| {
        if !path.starts_with('/') {
            bail!("{arg:?}: the guest path must be absolute (sandbox/NAME:/path)");
        }
        Ok((name, path.to_string()))
    }))
}

impl CpArgs {
    /// Copies one file or directory into or out of a sandbox.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        use std::io::Read;
        let client = self.connect.client(cfg);
        match (
            remote(&self.src).transpose()?,
            remote(&self.dst).transpose()?,
        ) {
            (None, Some((name, path)))
                if self.src != "-" && std::fs::metadata(&self.src).is_ok_and(|m| m.is_dir()) =>
            {
                self.upload_dir(&client, &name, &path)
            }
            (Some((name, path)), None) if self.is_guest_dir(&client, &name, &path) => {
                if self.dst == "-" {
                    bail!(
                        "sandbox/{name}:{path} is a directory: `-` (stdout) takes a file only; \
                         name a local directory to copy it to"
                    );
                }
                self.download_dir(&client, &name, &path)
            }
            (None, Some((name, path))) => {
                let (mut src, len, local_mode): (Box<dyn Read>, u64, Option<u32>) =
                    if self.src == "-" {
                        let mut all = Vec::new();
                        std::io::stdin().read_to_end(&mut all)?;
                        let len = all.len() as u64;
                        (Box::new(std::io::Cursor::new(all)), len, None)
                    } else {
                        let f = std::fs::File::open(&self.src)
                            .with_context(|| format!("opening {}", self.src))?;
                        let meta = f.metadata()?;
                        if !meta.is_file() {
                            bail!("{}: only regular files can be copied", self.src);
                        }
                        use std::os::unix::fs::PermissionsExt;
                        (
                            Box::new(f),
                            meta.len(),
                            Some(meta.permissions().mode() & 0o7777),
                        )
                    };
                let mode = match &self.mode {
                    Some(m) => u32::from_str_radix(m, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .with_context(|| format!("--mode {m:?}: an octal mode such as 644"))?,
                    None => local_mode.unwrap_or(0o644),
                };
                let n = client.sandbox_upload(&name, &path, mode, &mut *src, len)?;
                eprintln!("{n} bytes copied to sandbox/{name}:{path}");
                Ok(0)
            }
            (Some((name, path)), None) => {
                if self.dst == "-" {
                    let mut out = std::io::stdout().lock();
                    client.sandbox_download(&name, &path, &mut out)?;
                    out.flush()?;
                    return Ok(0);
                }
                let mut dst = std::path::PathBuf::from(&self.dst);
                if dst.is_dir() {
                    let file = path.rsplit('/').next().filter(|f| !f.is_empty());
                    dst.push(file.with_context(|| format!("{path:?} names no file"))?);
                }
                // Written next to the destination, then renamed: a failed copy leaves
                // nothing half-written behind.
                let tmp = dst.with_file_name(format!(
                    ".{}.agentvm-cp-{}",
                    dst.file_name().and_then(|f| f.to_str()).unwrap_or("copy"),
                    std::process::id()
                ));
                let mut file = std::fs::File::create(&tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                match client.sandbox_download(&name, &path, &mut file) {
                    Ok(n) => {
                        drop(file);
                        std::fs::rename(&tmp, &dst)
                            .with_context(|| format!("writing {}", dst.display()))?;
                        eprintln!("{n} bytes copied to {}", dst.display());
                        Ok(0)
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        Err(e.into())
                    }
                }
            }
            (Some(_), Some(_)) => {
                bail!("copying between two sandboxes is not supported: copy to a local file first")
            }
            (None, None) => bail!("one side must be a sandbox: sandbox/NAME:/guest/path"),
        }
    }

    /// True when the guest path is a directory. Any failure to tell (an agent too old to
    /// answer, ...) counts as no: the single-file copy then runs and reports its own error.
    fn is_guest_dir(&self, client: &agentvm_client::Client, name: &str, path: &str) -> bool {
        client
            .sandbox_stat(name, path)
            .is_ok_and(|st| st.kind == agentvm_client::PathKind::Directory)
    }

    /// A local directory into the sandbox: packed here (regular files, directories and
    /// links; anything else stops it), unpacked by the guest agent as the new directory
    /// `path`, or `path/<its name>` when `path` is a directory.
    fn upload_dir(
        &self,
        client: &agentvm_client::Client,
        name: &str,
        path: &str,
    ) -> anyhow::Result<i32> {
        use std::io::{Seek, Write};
        if self.mode.is_some() {
            bail!("--mode is for files: a directory's entries keep their own modes");
        }
        let dir = dir_name(&self.src, true)?;
        let target = match client.sandbox_stat(name, path)?.kind {
            agentvm_client::PathKind::Directory => guest_join(path, &dir),
            agentvm_client::PathKind::Missing => path.to_string(),
            _ => bail!("sandbox/{name}:{path} exists and is not a directory"),
        };
        let mut archive = tempfile::tempfile().context("a temporary file for the archive")?;
        {
            let mut w = std::io::BufWriter::new(&mut archive);
            agentvm_guest::tree::pack(std::path::Path::new(&self.src), &dir, &mut w)
                .with_context(|| format!("packing {}", self.src))?;
            w.flush()?;
        }
        let len = archive.stream_position()?;
        archive.rewind()?;
        let n = client.sandbox_upload_dir(name, &target, &dir, &mut archive, len)?;
        eprintln!(
            "{} copied to sandbox/{name}:{target} ({n} bytes packed)",
            self.src
        );
        Ok(0)
    }

    /// A sandbox directory out: the guest's tar archive (hostile) unpacked by the run
    /// artifacts' unpacker under [`agentvm_run::artifacts::Rules::COPY`] as the new
    /// directory DST, or `DST/<its name>` when DST is a directory; all or nothing.
    fn download_dir(
        &self,
        client: &agentvm_client::Client,
        name: &str,
        path: &str,
    ) -> anyhow::Result<i32> {
        use agentvm_run::artifacts::{unpack_to, ArchiveError, Budget, CopyError, Rules};
        let dir = dir_name(path, false)?;
        let mut dest = std::path::PathBuf::from(&self.dst);
        if dest.is_dir() {
            dest.push(&dir);
        }
        let (mut from_guest, mut to_unpack) = std::io::pipe()?;
        let download = {
            let (client, name, path, max) = (
                client.clone(),
                name.to_string(),
                path.to_string(),
                self.max_bytes,
            );
            std::thread::spawn(move || {
                let n = client.sandbox_download_dir(&name, &path, max, &mut to_unpack);
                drop(to_unpack);
                n
            })
        };
        let mut budget = Budget::new(self.max_bytes);
        budget.entries = agentvm_guest::tree::MAX_ENTRIES;
        let unpacked = unpack_to(
            &mut from_guest,
            &dest,
            dir.as_bytes(),
            &mut budget,
            &Rules::COPY,
        );
        if unpacked.is_ok() {
            // The archive's padding after its end.
            let _ = std::io::copy(&mut from_guest, &mut std::io::sink());
        }
        drop(from_guest);
        let downloaded = download
            .join()
            .map_err(|_| anyhow::anyhow!("the download thread panicked"))?;
        let remove = |dest: &std::path::Path| {
            let _ = std::fs::remove_dir_all(dest);
        };
        match (downloaded, unpacked) {
            (Ok(_), Ok(u)) => {
                eprintln!(
                    "{} files, {} directories, {} links ({} bytes) copied to {}",
                    u.files,
                    u.dirs,
                    u.symlinks,
                    u.file_bytes,
                    dest.display()
                );
                Ok(0)
            }
            (Err(e), Ok(_)) => {
                remove(&dest);
                Err(e.into())
            }
            // A cut or failed stream is the download's failure: say why it stopped.
            (
                Err(e),
                Err(CopyError::Archive(
                    ArchiveError::Read(_)
                    | ArchiveError::Truncated { .. }
                    | ArchiveError::Malformed(_),
                )),
            ) => Err(e.into()),
            (_, Err(e)) => Err(anyhow::anyhow!(e).context(format!(
                "copying sandbox/{name}:{path} to {} (nothing was written)",
                dest.display()
            ))),
        }
    }
}

/// Forwards every connection to `listener` to `guest_port` in sandbox `name`, each through
/// its own upgraded API connection, on threads of their own (for as long as this process
/// runs).
pub fn serve_forward(
    client: agentvm_client::Client,
    name: String,
    listener: std::net::TcpListener,
    guest_port: u16,
) -> anyhow::Result<()> {
    eprintln!(
        "forwarding {} -> port {guest_port} in sandbox/{name}",
        listener.local_addr()?
    );
    std::thread::spawn(move || {
        for local in listener.incoming().flatten() {
            let (client, name) = (client.clone(), name.clone());
            std::thread::spawn(move || {
                let (mut from_guest, mut to_guest) = match client.sandbox_forward(&name, guest_port)
                {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("forwarding to port {guest_port} in sandbox/{name}: {e}");
                        return;
                    }
                };
                let Ok(mut local_in) = local.try_clone() else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut local_in, &mut to_guest);
                    let _ = to_guest.shutdown(std::net::Shutdown::Write);
                });
                let mut local_out = local;
                let _ = std::io::copy(&mut from_guest, &mut local_out);
                let _ = local_out.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(())
}

/// Options of `port-forward`.
#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// The sandbox: `sandbox/NAME`.
    #[arg(value_name = "sandbox/NAME")]
    target: String,
    /// `HOST_PORT:GUEST_PORT` pairs: HOST_PORT on this machine's loopback (127.0.0.1) to
    /// GUEST_PORT in the sandbox.
    #[arg(required = true, value_name = "HOST_PORT:GUEST_PORT")]
    ports: Vec<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

impl PortForwardArgs {
    /// Forwards until interrupted.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let name = sandbox_name(&self.target)?;
        let listeners = self
            .ports
            .iter()
            .map(|p| super::exec::publish_listener(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The sandbox must exist and be ours before anything is promised.
        let client = self.connect.client(cfg);
        client.get(Kind::Sandbox, &name)?;
        for (listener, guest_port) in listeners {
            serve_forward(client.clone(), name.clone(), listener, guest_port)?;
        }
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_directory_is_named_by_its_last_component() {
        assert_eq!(dir_name("/root/tree", false).unwrap(), "tree");
        assert_eq!(dir_name("/root/tree/", false).unwrap(), "tree");
        assert!(dir_name("/", false).is_err());
        assert!(dir_name("/root/..", false).is_err());
        let tmp = tempfile::tempdir().unwrap();
        let here = tmp.path().join("here");
        std::fs::create_dir(&here).unwrap();
        let dot = format!("{}/.", here.display());
        assert_eq!(dir_name(&dot, true).unwrap(), "here");
        assert_eq!(guest_join("/root/", "tree"), "/root/tree");
        assert_eq!(guest_join("/", "tree"), "/tree");
    }
}
