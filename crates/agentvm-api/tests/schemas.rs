//! The JSON Schemas under `specs/` must match the types. Regenerate them with
//! `AGENTVM_UPDATE_SPECS=1 cargo test -p agentvm-api --test schemas`.

use std::path::PathBuf;

use agentvm_api::schema::schema_files;

fn specs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../specs")
}

#[test]
fn checked_in_schemas_match_the_types() {
    let dir = specs_dir();
    let update = std::env::var("AGENTVM_UPDATE_SPECS").is_ok_and(|v| v == "1");
    let mut drifted = Vec::new();
    let files = schema_files();
    for (name, generated) in &files {
        let path = dir.join(name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != *generated {
            if update {
                std::fs::write(&path, generated).unwrap();
            } else {
                drifted.push(name.clone());
            }
        }
    }
    // Stale schema files of kinds that no longer exist.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".schema.json") && !files.iter().any(|(n, _)| *n == name) {
            if update {
                std::fs::remove_file(dir.join(&name)).unwrap();
            } else {
                drifted.push(format!("{name} (no longer generated)"));
            }
        }
    }
    assert!(
        drifted.is_empty(),
        "specs/ is out of date with the agentvm-api types: {}.\n\
         Regenerate with: AGENTVM_UPDATE_SPECS=1 cargo test -p agentvm-api --test schemas\n\
         and commit the result.",
        drifted.join(", ")
    );
}

#[test]
fn schemas_pin_api_version_and_kind() {
    for (name, text) in schema_files() {
        let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            schema["$schema"], "http://json-schema.org/draft-07/schema#",
            "{name} must be draft-07 for editor support"
        );
        if name != agentvm_api::schema::ALL_KINDS_SCHEMA_FILE {
            assert_eq!(
                schema["properties"]["apiVersion"]["const"],
                agentvm_api::API_VERSION,
                "{name}"
            );
            assert!(schema["properties"]["kind"]["const"].is_string(), "{name}");
            assert_eq!(schema["additionalProperties"], false, "{name}");
        }
    }
}
