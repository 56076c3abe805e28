//! The body of `POST /v1/apply` on arbitrary bytes: JSON decoding of the request, then
//! `resources_from_json` (object decoding, validation, duplicates) — what the controller
//! runs on every apply before touching the store. Must never panic; every accepted object
//! must validate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

/// The wire shape of the controller's `ApplyRequest` (crates/agentvm-client/src/lib.rs).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct ApplyRequest {
    objects: Vec<serde_json::Value>,
    #[serde(default)]
    sources: Vec<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    force: bool,
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<ApplyRequest>(data) else {
        return;
    };
    if let Ok(resources) = agentvm_api::resources_from_json(req.objects, &req.sources) {
        for (resource, _) in resources {
            agentvm_api::validate(&resource).expect("an accepted object must validate");
        }
    }
});
