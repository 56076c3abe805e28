//! `agentvm cordon|uncordon|drain node/NAME`: keep a cluster node from leading, or let it
//! lead again. The leader reconciles everything, so draining a node is cordoning it and
//! waiting until another node leads.

use std::time::{Duration, Instant};

use agentvm_controller::Config;
use anyhow::{bail, Context};
use clap::Args;

use super::objects::ConnectArgs;

/// Options of `cordon`, `uncordon` and `drain`.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node: `node/NAME` (as `agentvm get nodes` lists it).
    #[arg(value_name = "node/NAME")]
    target: String,
    /// `drain`: how long to wait for another node to lead (`90`, `30s`, `5m`).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The name in `node/NAME` (or `no/NAME`, `nodes/NAME`).
fn node_name(target: &str) -> anyhow::Result<&str> {
    let (kind, name) = target
        .split_once('/')
        .with_context(|| format!("{target:?}: name the node as node/NAME"))?;
    if !matches!(kind.to_ascii_lowercase().as_str(), "node" | "nodes" | "no") {
        bail!("{target:?}: only nodes can be cordoned (node/NAME)");
    }
    if name.is_empty() {
        bail!("{target:?}: the name is missing (node/NAME)");
    }
    Ok(name)
}

impl NodeArgs {
    /// Cordons (`true`) or uncordons the node; `drain` also waits until another node leads.
    pub fn run(&self, cfg: &Config, cordoned: bool, drain: bool) -> anyhow::Result<i32> {
        let name = node_name(&self.target)?;
        let client = self.connect.client(cfg);
        client.cordon(name, cordoned)?;
        if !drain {
            println!(
                "node/{name} {}",
                if cordoned { "cordoned" } else { "uncordoned" }
            );
            return Ok(0);
        }
        eprintln!("node/{name} cordoned; waiting for another node to lead");
        let deadline = Instant::now() + self.timeout;
        loop {
            let nodes = client.nodes()?.nodes;
            match nodes.iter().find(|n| n.leader) {
                Some(leader) if leader.info.name != name => {
                    println!("node/{name} drained: node/{} leads", leader.info.name);
                    return Ok(0);
                }
                _ if Instant::now() > deadline => bail!(
                    "node/{name} is cordoned, but no other node leads after {:?} (is another node running? `agentvm get nodes`)",
                    self.timeout
                ),
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }
}
