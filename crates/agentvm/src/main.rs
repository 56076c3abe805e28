//! `agentvm`: run CLI coding agents and untrusted code in libvirt/QEMU VMs, managed the
//! Kubernetes way.

mod cmd;

use agentvm_api::SandboxState;
use clap::{CommandFactory, Parser, Subcommand};

const LONG_ABOUT: &str =
    "Run CLI coding agents and untrusted code inside KVM/libvirt virtual machines.

Objects (Network, NetworkFilter, Image, VmPool, Sandbox, Snapshot, AgentRun) are declared in YAML manifests and \
managed by `agentvm controller`, the Kubernetes way: `apply` them, `get`, `describe`, `wait` \
for them, `diff` a changed manifest, read a run's `logs`, `delete` them. Kinds have short \
names: net, nwf, img, pool, sbx, snap, run. A Sandbox is a VM that is kept: `exec` into it, \
`pause`, `resume`, `stop` and `start` it, `snapshot` it, `rollback` to a snapshot and `fork` a snapshot into a new sandbox.";

const AFTER_LONG_HELP: &str = "Exit status:
  0  success (`diff`: no differences)
  1  failure: an error, a missing or refused object, a `wait` timeout (`diff`: differences found)
  2  bad usage: unknown flag or missing argument (`diff`: an error)
  3  the controller is not reachable (start it with `agentvm controller --spec-dir DIR`)

Environment:
  AGENTVM_SOCKET     the controller's API socket (default <stateDir>/agentvm.sock)
  AGENTVM_CONFIG     the config file (default ~/.config/agentvm/config.yaml)
  AGENTVM_LOG        log filter, e.g. debug or agentvm_controller=trace
  NO_COLOR           no colour even on a terminal (colour is only used on terminals)";

/// Run CLI coding agents and untrusted code inside KVM/libvirt virtual machines.
#[derive(Debug, Parser)]
#[command(
    name = "agentvm",
    version,
    propagate_version = true,
    long_about = LONG_ABOUT,
    after_long_help = AFTER_LONG_HELP
)]
struct Cli {
    /// Config file (default: $AGENTVM_CONFIG or ~/.config/agentvm/config.yaml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this host: packages, libvirt daemons.
    #[command(subcommand)]
    Host(cmd::host::HostCommand),
    /// Check this host and print a fix for every problem found.
    Doctor(cmd::doctor::DoctorArgs),
    /// Build and inspect guest images.
    #[command(subcommand)]
    Image(cmd::image::ImageCommand),
    /// Run one command in a fresh, isolated VM (or in a sandbox) and print its output.
    Exec(cmd::exec::ExecArgs),
    /// Execute the AgentRuns of manifest files here, each in a fresh VM (no controller).
    Run(cmd::run::RunArgs),
    /// Run the controller: object store, spec-directory watch, API socket, reconcilers.
    Controller(cmd::controller::ControllerArgs),
    /// Create or update objects from manifest files through the controller.
    Apply(cmd::apply::ApplyArgs),
    /// List objects (table, YAML, JSON or names).
    Get(cmd::get::GetArgs),
    /// Show one object in detail: spec, status, conditions.
    Describe(cmd::describe::DescribeArgs),
    /// Delete objects by name or by manifest file.
    Delete(cmd::delete::DeleteArgs),
    /// Show what `apply` would change (exit 1 when something would).
    Diff(cmd::diff::DiffArgs),
    /// Pause a sandbox: its vCPUs stop, its memory stays (sets spec.state: Paused).
    Pause(cmd::sandbox::PowerArgs),
    /// Resume a paused sandbox (sets spec.state: Running).
    Resume(cmd::sandbox::PowerArgs),
    /// Stop a sandbox: memory and disk saved to disk, no host memory used (spec.state: Stopped).
    Stop(cmd::sandbox::PowerArgs),
    /// Start a stopped sandbox where it was, running programs included (spec.state: Running).
    Start(cmd::sandbox::PowerArgs),
    /// Forward local ports to ports in a sandbox until interrupted.
    PortForward(cmd::sandbox::PortForwardArgs),
    /// Copy a file or directory into or out of a sandbox (`sandbox/NAME:/path` on one side).
    ///
    /// A directory is copied like `docker cp`: it becomes DST when DST does not exist, else
    /// DST/<its name>; nothing that exists is merged into or replaced. Its regular files,
    /// directories and symbolic links travel with their permission bits; a socket, FIFO or
    /// device in it stops the copy. Out of a sandbox the guest's archive is checked entry
    /// by entry (no absolute paths, no `..`, no links leading outside the copy, no devices,
    /// at most --max-bytes, 100000 entries and 64 levels) and unpacked beside DST, which
    /// appears only when all of it was unpacked. `-` (stdin, stdout) takes a file only.
    Cp(cmd::sandbox::CpArgs),
    /// Take a snapshot (memory and disk, or the disk alone) of a sandbox: creates a Snapshot object.
    Snapshot(cmd::sandbox::SnapshotArgs),
    /// Roll a sandbox back to one of its snapshots (sets spec.rollback).
    Rollback(cmd::sandbox::RollbackArgs),
    /// Fork a snapshot into a new sandbox (same files, memory and programs; its own identity).
    Fork(cmd::sandbox::ForkArgs),
    /// A login shell in a sandbox, on a terminal of its own (`exec -it sandbox/NAME -- bash -l`).
    Shell(cmd::exec::ShellArgs),
    /// Print an AgentRun's output; `-f` follows it until the run ends.
    Logs(cmd::logs::LogsArgs),
    /// Keep a cluster node from leading (the leader reconciles); a leading node steps down.
    Cordon(cmd::node::NodeArgs),
    /// Let a cordoned cluster node lead again.
    Uncordon(cmd::node::NodeArgs),
    /// Cordon a cluster node and wait until another node leads.
    Drain(cmd::node::NodeArgs),
    /// Wait until objects meet a condition, reach a phase or are deleted.
    Wait(cmd::wait::WaitArgs),
    /// Print the JSON Schema of a kind's manifests.
    Schema(cmd::schema::SchemaArgs),
    /// Print the client's and the controller's versions.
    Version(cmd::version::VersionArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion(cmd::completion::CompletionArgs),
    /// Print the manual page (roff), or write one page per command into a directory.
    Man(cmd::man::ManArgs),
}

fn main() {
    let cli = Cli::parse();
    // The controller reports what it does by default; other commands only warn.
    let default_level = match cli.command {
        Command::Controller(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AGENTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let is_diff = matches!(cli.command, Command::Diff(_));
    let result = (|| {
        // Commands that need no configuration work even when it is broken.
        let cli = match cli.command {
            Command::Schema(a) => return a.run(),
            Command::Completion(a) => return a.run(&mut Cli::command()),
            Command::Man(a) => return a.run(Cli::command()),
            _ => cli,
        };
        let cfg = cmd::load_config(cli.config.as_deref())?;
        match cli.command {
            Command::Host(c) => c.run(),
            Command::Doctor(a) => a.run(&cfg),
            Command::Image(c) => c.run(&cfg),
            Command::Exec(a) => a.run(&cfg),
            Command::Run(a) => a.run(&cfg),
            Command::Controller(a) => a.run(&cfg),
            Command::Apply(a) => a.run(&cfg),
            Command::Get(a) => a.run(&cfg),
            Command::Describe(a) => a.run(&cfg),
            Command::Delete(a) => a.run(&cfg),
            Command::Diff(a) => a.run(&cfg),
            Command::Logs(a) => a.run(&cfg),
            Command::Pause(a) => a.run(&cfg, SandboxState::Paused, "paused"),
            Command::Resume(a) => a.run(&cfg, SandboxState::Running, "resumed"),
            Command::Stop(a) => a.run(&cfg, SandboxState::Stopped, "stopped"),
            Command::Start(a) => a.run(&cfg, SandboxState::Running, "started"),
            Command::Snapshot(a) => a.run(&cfg),
            Command::Fork(a) => a.run(&cfg),
            Command::Shell(a) => a.run(&cfg),
            Command::Cp(a) => a.run(&cfg),
            Command::PortForward(a) => a.run(&cfg),
            Command::Rollback(a) => a.run(&cfg),
            Command::Wait(a) => a.run(&cfg),
            Command::Cordon(a) => a.run(&cfg, true, false),
            Command::Uncordon(a) => a.run(&cfg, false, false),
            Command::Drain(a) => a.run(&cfg, true, true),
            Command::Version(a) => a.run(&cfg),
            Command::Schema(a) => a.run(),
            Command::Completion(a) => a.run(&mut Cli::command()),
            Command::Man(a) => a.run(Cli::command()),
        }
    })();
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            let code = if cmd::is_unreachable(&e) {
                cmd::EXIT_UNREACHABLE
            } else if is_diff {
                cmd::EXIT_USAGE
            } else {
                cmd::EXIT_FAILURE
            };
            std::process::exit(code);
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause its effect already quotes.
fn error_text(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
