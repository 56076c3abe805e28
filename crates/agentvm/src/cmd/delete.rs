//! `agentvm delete KIND/NAME... | KIND NAME... | -f FILE`: request the deletion of objects;
//! their reconcilers tear down what they own, then the objects disappear.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use agentvm_api::Kind;
use agentvm_client::Client;
use agentvm_controller::Config;
use anyhow::bail;
use clap::Args;

use super::objects::{object_ref, parse_targets, ConnectArgs};

/// Options of `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Objects as `KIND/NAME...` or `KIND NAME...`.
    #[arg(value_name = "TARGET")]
    targets: Vec<String>,
    /// Delete the objects declared in these manifests (file, directory or `-`).
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Also read the subdirectories of directories given with `-f`.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Succeed when an object does not exist.
    #[arg(long)]
    ignore_not_found: bool,
    /// Also delete objects managed by the spec directory (they come back when their file
    /// changes: remove them from the file instead).
    #[arg(long)]
    force: bool,
    /// Wait until the objects are gone (their reconcilers finished cleaning up).
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits (`90`, `90s`, `5m`, `1h`).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    conn: ConnectArgs,
}

fn wait_gone(client: &Client, kind: Kind, name: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        match client.get(kind, name) {
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e.into()),
            Ok(_) if Instant::now() >= deadline => {
                bail!(
                    "timed out waiting for {} to be deleted",
                    object_ref(kind, name)
                )
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

impl DeleteArgs {
    /// Delete; exit 1 if an object was missing (without `--ignore-not-found`) or refused.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let mut targets = if self.targets.is_empty() {
            Vec::new()
        } else {
            parse_targets(&self.targets)?
        };
        if !self.files.is_empty() {
            let parsed = super::apply::load_manifests(&self.files, self.recursive)?;
            targets.extend(
                parsed
                    .iter()
                    .map(|p| (p.resource.kind(), p.resource.name().to_string())),
            );
        }
        if targets.is_empty() {
            bail!("name the objects to delete: KIND/NAME..., KIND NAME..., or -f FILE");
        }
        let client = self.conn.client(cfg);
        let deadline = Instant::now() + self.timeout;
        let mut failed = 0;
        for (kind, name) in targets {
            let r = object_ref(kind, &name);
            match client.delete(kind, &name, self.force) {
                Ok(_) if self.wait => {
                    wait_gone(&client, kind, &name, deadline)?;
                    println!("{r} deleted");
                }
                Ok(_) => println!("{r} deletion requested"),
                Err(e) if e.is_not_found() && self.ignore_not_found => {}
                Err(e) if e.is_not_found() => {
                    eprintln!("error: {r} not found");
                    failed += 1;
                }
                Err(e) if e.status().is_some() => {
                    eprintln!("error: {e}");
                    failed += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(i32::from(failed > 0))
    }
}
