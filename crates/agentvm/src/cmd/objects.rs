//! What the object commands (`apply`, `get`, `delete`, `describe`) share: reaching the
//! controller, naming objects on the command line, and printing tables.

use std::path::PathBuf;

use agentvm_api::Kind;
use agentvm_controller::api::client::Client;
use agentvm_controller::Config;
use anyhow::{bail, Context};
use clap::Args;

/// How to reach the controller.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The controller's API socket [default: $AGENTVM_SOCKET, else <stateDir>/agentvm.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl ConnectArgs {
    /// A client of the controller this configuration points at.
    pub fn client(&self, cfg: &Config) -> Client {
        Client::new(
            self.socket
                .clone()
                .unwrap_or_else(|| agentvm_controller::api::default_socket(cfg)),
        )
    }
}

/// The lowercase kind used in `kind/name` (`vmpool/sandbox`), as kubectl prints.
pub fn lower(kind: Kind) -> String {
    kind.as_str().to_ascii_lowercase()
}

/// `kind/name` for output.
pub fn object_ref(kind: Kind, name: &str) -> String {
    format!("{}/{name}", lower(kind))
}

/// Parses a kind, with a did-you-mean on typos.
pub fn parse_kind(text: &str) -> anyhow::Result<Kind> {
    Ok(text.parse::<Kind>()?)
}

/// Reads `KIND NAME...` or `KIND/NAME...` into (kind, name) pairs.
pub fn parse_targets(args: &[String]) -> anyhow::Result<Vec<(Kind, String)>> {
    let Some(first) = args.first() else {
        bail!("name the objects: KIND/NAME..., KIND NAME..., or -f FILE");
    };
    if first.contains('/') {
        return args
            .iter()
            .map(|a| {
                let (kind, name) = a.split_once('/').with_context(|| {
                    format!("{a:?}: use KIND/NAME for every object, or KIND NAME...")
                })?;
                if name.is_empty() {
                    bail!("{a:?}: the name is missing (KIND/NAME)");
                }
                Ok((parse_kind(kind)?, name.to_string()))
            })
            .collect();
    }
    let kind = parse_kind(first)?;
    if args.len() == 1 {
        bail!("name the {kind} objects: `{} NAME...`", first);
    }
    Ok(args[1..].iter().map(|n| (kind, n.clone())).collect())
}

/// Prints rows as columns separated by three spaces (the last column unpadded).
pub fn print_table(header: Option<&[String]>, rows: &[Vec<String>]) {
    let mut all: Vec<&[String]> = Vec::new();
    if let Some(h) = header {
        all.push(h);
    }
    all.extend(rows.iter().map(Vec::as_slice));
    let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            all.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in all {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[c] - cell.chars().count() + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        println!("{}", line.trim_end());
    }
}
