//! Manifest parsing and validation on arbitrary bytes: `parse_bytes` (YAML, documents,
//! positions, decoding, validation) must return objects or errors, never panic, hang or
//! blow up memory; a parsed object must validate and survive a YAML round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = agentvm_api::parse_bytes(data, "fuzz.yaml") else {
        return;
    };
    for parsed in objects {
        agentvm_api::validate(&parsed.resource).expect("parse_bytes returned an invalid object");
        // What `agentvm get -o yaml` prints must parse back to the same object.
        let yaml = serde_json::to_value(&parsed.resource)
            .map(|v| serde_json::to_string(&v).unwrap())
            .unwrap();
        let again = agentvm_api::parse_str(&yaml, "again.yaml")
            .unwrap_or_else(|e| panic!("re-parsing {yaml}: {e}"));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].resource, parsed.resource, "{yaml}");
    }
});
