//! JSON Schemas (draft-07) generated from the types, as checked in under `specs/`.

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;

use crate::{AgentRun, Image, Kind, Network, NetworkFilter, Resource, Sandbox, Snapshot, VmPool};

/// File name of the schema accepting any kind (for multi-kind files).
pub const ALL_KINDS_SCHEMA_FILE: &str = "agentvm.schema.json";

fn generate<T: JsonSchema>() -> serde_json::Value {
    let schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<T>();
    schema.to_value()
}

/// The JSON Schema of one kind.
pub fn schema_for_kind(kind: Kind) -> serde_json::Value {
    match kind {
        Kind::Network => generate::<Network>(),
        Kind::NetworkFilter => generate::<NetworkFilter>(),
        Kind::Image => generate::<Image>(),
        Kind::VmPool => generate::<VmPool>(),
        Kind::Sandbox => generate::<Sandbox>(),
        Kind::Snapshot => generate::<Snapshot>(),
        Kind::AgentRun => generate::<AgentRun>(),
    }
}

/// The JSON Schema accepting any kind (dispatching on `kind`).
pub fn schema_for_any_kind() -> serde_json::Value {
    generate::<Resource>()
}

/// File name of a kind's schema under `specs/`: `vmpool.schema.json`.
pub fn schema_file_name(kind: Kind) -> String {
    format!("{}.schema.json", kind.as_str().to_ascii_lowercase())
}

/// Every schema file as (file name, pretty JSON with a trailing newline),
/// exactly as checked in under `specs/`.
pub fn schema_files() -> Vec<(String, String)> {
    let pretty = |v: serde_json::Value| {
        let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
        text.push('\n');
        text
    };
    let mut files: Vec<(String, String)> = Kind::ALL
        .into_iter()
        .map(|k| (schema_file_name(k), pretty(schema_for_kind(k))))
        .collect();
    files.push((
        ALL_KINDS_SCHEMA_FILE.to_string(),
        pretty(schema_for_any_kind()),
    ));
    files
}
