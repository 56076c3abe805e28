//! `agentvm version`: this client's version and, when it answers, the controller's.

use agentvm_controller::Config;
use clap::{Args, ValueEnum};
use serde_json::json;

use super::objects::ConnectArgs;

/// Output formats of `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionFormat {
    /// `{"client": {"version": ...}, "controller": {...} | null}`.
    Json,
    /// The same as YAML.
    Yaml,
}

/// Options of `version`.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Only the client's version; do not contact the controller.
    #[arg(long)]
    client: bool,
    /// Output format (default: text lines).
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<VersionFormat>,
    #[command(flatten)]
    conn: ConnectArgs,
}

impl VersionArgs {
    /// Print the versions; exit 0 even when the controller is not reachable.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let client_version = env!("CARGO_PKG_VERSION");
        let api = self.conn.client(cfg);
        let controller = if self.client {
            None
        } else {
            Some(api.health())
        };
        match self.output {
            None => {
                println!("Client version: {client_version}");
                match controller {
                    None => {}
                    Some(Ok(h)) => println!(
                        "Controller version: {} (socket {}, {} objects)",
                        h.version,
                        api.socket().display(),
                        h.objects
                    ),
                    Some(Err(e)) => println!("Controller: {e}"),
                }
            }
            Some(format) => {
                let controller = match controller {
                    Some(Ok(h)) => json!({
                        "version": h.version,
                        "socket": api.socket(),
                        "objects": h.objects,
                    }),
                    _ => serde_json::Value::Null,
                };
                let value = json!({
                    "client": {"version": client_version},
                    "controller": controller,
                });
                match format {
                    VersionFormat::Json => println!("{}", serde_json::to_string_pretty(&value)?),
                    VersionFormat::Yaml => print!("{}", serde_yaml::to_string(&value)?),
                }
            }
        }
        Ok(0)
    }
}
