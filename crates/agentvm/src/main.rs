//! `agentvm`: run CLI coding agents and untrusted code in libvirt/QEMU VMs, managed the
//! Kubernetes way.

mod cmd;

use clap::{Parser, Subcommand};

/// Run CLI coding agents and untrusted code inside KVM/libvirt virtual machines.
#[derive(Debug, Parser)]
#[command(name = "agentvm", version, propagate_version = true)]
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
    /// Run one command in a fresh, isolated VM and print its output.
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
    let result = (|| {
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
        }
    })();
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
