//! `agentvm schema [KIND]`: print the JSON Schema (draft-07) of a kind, or of any kind, for
//! editors and validators.

use clap::Args;

use super::objects::parse_kind;

/// Options of `schema`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Kind: Network (net), NetworkFilter (nwf), Image (img), VmPool (pool), AgentRun (run).
    /// Without it: the schema accepting any kind (for files mixing kinds).
    #[arg(value_name = "KIND")]
    kind: Option<String>,
}

impl SchemaArgs {
    /// Print the schema as pretty JSON.
    pub fn run(self) -> anyhow::Result<i32> {
        let schema = match self.kind.as_deref() {
            None | Some("all") => agentvm_api::schema::schema_for_any_kind(),
            Some(k) => agentvm_api::schema::schema_for_kind(parse_kind(k)?),
        };
        println!("{}", serde_json::to_string_pretty(&schema)?);
        Ok(0)
    }
}
