//! `agentvm host setup`: install packages and start the libvirt daemons (idempotent).

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::{Args, Subcommand};

/// The host setup script, shared with `scripts/host-setup.sh` (the README runs that one
/// before agentvm is built).
const HOST_SETUP: &str = include_str!("../../../../scripts/host-setup.sh");

/// Host preparation commands.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Install system packages and start virtlogd and libvirtd when they are not running.
    Setup(SetupArgs),
}

/// Options of `host setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only install packages; start nothing.
    #[arg(long)]
    packages_only: bool,
    /// Start libvirtd inside this network namespace (used by the test suite).
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
}

impl HostCommand {
    /// Run the subcommand.
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            HostCommand::Setup(a) => {
                let mut args = vec!["-s".to_string(), "--".to_string()];
                if a.packages_only {
                    args.push("--packages-only".into());
                }
                if let Some(ns) = a.netns {
                    args.push("--netns".into());
                    args.push(ns);
                }
                let mut child = Command::new("bash")
                    .args(&args)
                    .stdin(Stdio::piped())
                    .spawn()
                    .context("starting bash for host setup")?;
                child
                    .stdin
                    .take()
                    .expect("piped stdin")
                    .write_all(HOST_SETUP.as_bytes())
                    .context("sending the setup script to bash")?;
                let status = child.wait()?;
                Ok(status.code().unwrap_or(1))
            }
        }
    }
}
