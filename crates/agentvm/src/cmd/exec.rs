//! `agentvm exec [-i] [-t] -- CMD ARGS..`: one command in a fresh, isolated, throw-away VM,
//! optionally with this terminal's input (`-i`) and on a terminal of its own (`-t`); or
//! `agentvm exec sandbox/NAME -- CMD ARGS..`: in a sandbox, through the controller.

use std::io::Write;
use std::time::Duration;

use agentvm_backend::agent_conn::Interactive;
use agentvm_backend::guest::{ExecRequest, Guest, Stream};
use agentvm_backend::{EphemeralVm, Owner, VmRequest};
use agentvm_controller::Config;
use agentvm_guest::WinSize;
use agentvm_image::Recipe;
use anyhow::Context;
use clap::Args;

/// Options of `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Kill the command after this long (`90`, `90s`, `5m`, `1h`) [default: 5m, or 24h with
    /// -i/-t].
    #[arg(long, alias = "timeout-seconds", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Option<Duration>,
    /// Pass standard input to the command (until it ends).
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal of its own, the size of this one (which is put into raw
    /// mode meanwhile); use with -i for a shell: `agentvm exec -it -- bash`.
    #[arg(short, long)]
    tty: bool,
    /// Environment variable for the command, `KEY=VALUE` (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Forward HOST_PORT on this machine's loopback (127.0.0.1) to GUEST_PORT in the VM while
    /// the command runs, e.g. `-p 8080:8000` (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "HOST_PORT:GUEST_PORT")]
    publish: Vec<String>,
    /// Program and arguments to run in the guest; to run in a sandbox instead of a fresh
    /// VM, put `sandbox/NAME --` first.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
    #[command(flatten)]
    connect: super::objects::ConnectArgs,
}

/// Options of `shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The sandbox: `sandbox/NAME`.
    #[arg(value_name = "sandbox/NAME")]
    target: String,
    /// The shell to run (as a login shell).
    #[arg(long, default_value = "/bin/bash", value_name = "PATH")]
    shell: String,
    /// Environment variable for the shell, `KEY=VALUE` (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    #[command(flatten)]
    connect: super::objects::ConnectArgs,
}

impl ShellArgs {
    /// `exec -it sandbox/NAME -- SHELL -l`.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        super::sandbox::sandbox_name(&self.target)?;
        ExecArgs {
            vcpus: 1,
            memory_mib: 512,
            timeout: None,
            interactive: true,
            tty: true,
            env: self.env,
            workdir: self.workdir,
            publish: Vec::new(),
            command: vec![self.target, "--".into(), self.shell, "-l".into()],
            connect: self.connect,
        }
        .run_in_sandbox(cfg)
    }
}

impl ExecArgs {
    /// `exec sandbox/NAME [--] CMD..`: through the controller, in the sandbox.
    fn run_in_sandbox(self, cfg: &Config) -> anyhow::Result<i32> {
        let name = super::sandbox::sandbox_name(&self.command[0])?;
        let mut command = &self.command[1..];
        if command.first().is_some_and(|a| a == "--") {
            command = &command[1..];
        }
        if command.is_empty() {
            anyhow::bail!("name the command to run: agentvm exec sandbox/{name} -- CMD ARGS..");
        }
        // Bad ports and ports in use fail here, before anything runs.
        let listeners = self
            .publish
            .iter()
            .map(|p| publish_listener(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (listener, guest_port) in listeners {
            super::sandbox::serve_forward(
                self.connect.client(cfg),
                name.clone(),
                listener,
                guest_port,
            )?;
        }
        let mut env = std::collections::BTreeMap::new();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            env.insert(k.to_string(), v.to_string());
        }
        let request = agentvm_client::SandboxExecRequest {
            command: command.to_vec(),
            env,
            workdir: self.workdir.clone(),
            timeout_seconds: self.timeout.map(|t| t.as_secs().max(1)),
        };
        if !(self.interactive || self.tty) {
            return super::sandbox::exec(cfg, &self.connect, &name, request);
        }
        let tty = if self.tty {
            Some(Terminal::open().context("-t needs a terminal on standard input")?)
        } else {
            None
        };
        let attach = agentvm_client::AttachRequest {
            exec: request,
            tty: tty.as_ref().map(|_| {
                let s = Terminal::size();
                (s.rows, s.cols)
            }),
        };
        let (reader, writer) = self.connect.client(cfg).sandbox_attach(&name, &attach)?;
        // Raw mode only while the program runs.
        let _raw = match &tty {
            Some(t) => Some(t.raw().context("putting the terminal into raw mode")?),
            None => None,
        };
        super::sandbox::attached(reader, writer, self.interactive, tty.is_some(), || {
            let s = Terminal::size();
            (s.rows, s.cols)
        })
    }

    /// Boot, run, print, tear down. Exits with the guest command's exit code.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        if self
            .command
            .first()
            .is_some_and(|a| super::sandbox::is_sandbox_ref(a))
        {
            return self.run_in_sandbox(cfg);
        }
        // Bad ports and ports in use fail here, before anything is booted.
        let listeners = self
            .publish
            .iter()
            .map(|p| publish_listener(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let img = super::image::ensure_image(cfg, &Recipe::default())?;
        let image = super::image::boot_image(&img);
        let backend = super::local_backend(cfg);
        let (accel, why) = backend.accelerator_for(&image)?;
        tracing::info!(%accel, %why, "accelerator");
        let name = format!("agentvm-exec-{}", std::process::id());
        eprintln!("booting isolated VM {name} ({accel})...");
        let req = VmRequest {
            name: name.clone(),
            image,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            nic: None,
            owner: Owner {
                kind: agentvm_backend::OwnerKind::Exec,
                name: name.clone(),
                spec_hash: String::new(),
                generation: 0,
            },
            warmup: Vec::new(),
            limits: Default::default(),
            disk_gib: None,
            disabled_cpu_features: Vec::new(),
            park: false,
            from_template: false,
        };
        let vm = EphemeralVm::create(&backend, &req).context("booting the VM")?;
        eprintln!(
            "guest agent answered after {:.1}s",
            vm.report.boot.as_secs_f64()
        );
        let tty = if self.tty {
            Some(Terminal::open().context("-t needs a terminal on standard input")?)
        } else {
            None
        };
        let timeout = self.timeout.unwrap_or(if self.interactive || self.tty {
            Duration::from_secs(24 * 3600)
        } else {
            Duration::from_secs(300)
        });
        let mut req = ExecRequest::new(&self.command[0], self.command[1..].iter().cloned());
        req.timeout = timeout;
        // Printed as it comes; nothing needs keeping.
        req.keep_output = false;
        req.cwd = self.workdir.clone();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            req.env.insert(k.to_string(), v.to_string());
        }
        let agent = vm.agent()?;
        let guest = Guest::new(&*agent);
        if !listeners.is_empty() {
            let conn = guest.agent().context(
                "forwarding ports needs agentvm-guest in the VM, and it does not answer",
            )?;
            for (listener, guest_port) in listeners {
                let conn = conn.clone();
                eprintln!(
                    "forwarding {} -> port {guest_port} in the VM",
                    listener.local_addr()?
                );
                std::thread::spawn(move || {
                    for local in listener.incoming().flatten() {
                        let conn = conn.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = conn.forward(guest_port, local) {
                                tracing::warn!(port = guest_port, error = %e, "forwarded connection failed");
                            }
                        });
                    }
                });
            }
        }
        let mut print = |s: Stream, data: &[u8]| {
            let _ = match s {
                Stream::Stdout => std::io::stdout()
                    .write_all(data)
                    .and_then(|_| std::io::stdout().flush()),
                Stream::Stderr => std::io::stderr().write_all(data),
            };
        };
        let outcome = if self.interactive || self.tty {
            if tty.is_some() {
                req.output_cap = usize::MAX;
            }
            let interactive = Interactive {
                stdin: self
                    .interactive
                    .then(|| Box::new(std::io::stdin()) as Box<dyn std::io::Read + Send>),
                pty: tty.as_ref().map(|_| Terminal::size()),
                winsize: tty
                    .as_ref()
                    .map(|_| Box::new(|| Some(Terminal::size())) as Box<_>),
            };
            // Raw mode only while the program runs: boot messages above stay readable.
            let raw = match &tty {
                Some(t) => Some(t.raw().context("putting the terminal into raw mode")?),
                None => None,
            };
            let outcome = guest.exec_interactive(&req, interactive, &mut print);
            drop(raw);
            outcome
        } else {
            guest.exec(&req, &mut print)
        };
        let _ = std::io::stdout().flush();
        vm.teardown().context("tearing the VM down")?;
        let outcome = outcome?;
        if outcome.stdout_truncated() || outcome.stderr_truncated() {
            eprintln!(
                "note: output truncated at {} bytes per stream (stdout {} B, stderr {} B in total)",
                req.output_cap, outcome.stdout_total, outcome.stderr_total
            );
        }
        if outcome.timed_out {
            eprintln!(
                "killed after the {} timeout",
                humantime::format_duration(timeout)
            );
            return Ok(124);
        }
        Ok(match (outcome.exit_code, outcome.signal) {
            (Some(c), _) => c,
            (None, Some(sig)) => 128 + sig,
            _ => 1,
        })
    }
}

/// `HOST_PORT:GUEST_PORT`: a listener on 127.0.0.1:HOST_PORT and the guest port.
pub(super) fn publish_listener(spec: &str) -> anyhow::Result<(std::net::TcpListener, u16)> {
    let parse = |s: &str| -> anyhow::Result<u16> {
        match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => anyhow::bail!("--publish {spec:?}: {s:?} is not a port (1-65535); expected HOST_PORT:GUEST_PORT, e.g. 8080:8000"),
        }
    };
    let (host, guest) = spec.split_once(':').with_context(|| {
        format!("--publish {spec:?}: expected HOST_PORT:GUEST_PORT, e.g. 8080:8000")
    })?;
    let (host, guest) = (parse(host)?, parse(guest)?);
    let listener = std::net::TcpListener::bind(("127.0.0.1", host))
        .with_context(|| format!("--publish {spec}: listening on 127.0.0.1:{host}"))?;
    Ok((listener, guest))
}

/// The terminal on standard input: its size, and raw mode while a program runs on a guest
/// terminal (restored on drop, also when the program fails).
struct Terminal;

/// The terminal's settings before raw mode.
struct RawGuard(rustix::termios::Termios);

impl Terminal {
    fn open() -> anyhow::Result<Terminal> {
        if !rustix::termios::isatty(std::io::stdin()) {
            anyhow::bail!("standard input is not a terminal");
        }
        Ok(Terminal)
    }

    /// The size of the terminal (80x24 when it cannot be read).
    fn size() -> WinSize {
        match rustix::termios::tcgetwinsize(std::io::stdin()) {
            Ok(w) if w.ws_row > 0 && w.ws_col > 0 => WinSize {
                rows: w.ws_row,
                cols: w.ws_col,
            },
            _ => WinSize { rows: 24, cols: 80 },
        }
    }

    fn raw(&self) -> anyhow::Result<RawGuard> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let saved = tcgetattr(std::io::stdin())?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(std::io::stdin(), OptionalActions::Now, &raw)?;
        Ok(RawGuard(saved))
    }
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}
