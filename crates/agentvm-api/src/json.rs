//! Objects that arrive as JSON values (the body of the controller API's apply request, which
//! the CLI builds from manifests): decoded, validated, checked for duplicates, every error
//! prefixed with where the object came from. Pure; fuzzed by `fuzz/`'s `apply_request`.

use std::collections::BTreeSet;

use crate::{validate, Resource};

/// Decodes and validates `objects`; `sources[i]` (`file:line`, as the client sent it) names
/// object `i` in messages, `objects[i]` when absent. Returns every object with its source,
/// or every problem found (`source: field: message`), never a partial result.
pub fn resources_from_json(
    objects: Vec<serde_json::Value>,
    sources: &[String],
) -> Result<Vec<(Resource, String)>, Vec<String>> {
    let mut details = Vec::new();
    let mut resources = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, value) in objects.into_iter().enumerate() {
        let source = sources
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("objects[{i}]"));
        match serde_json::from_value::<Resource>(value) {
            Err(e) => details.push(format!("{source}: {e}")),
            Ok(r) => match validate(&r) {
                Err(errors) => {
                    details.extend(errors.iter().map(|e| format!("{source}: {e}")));
                }
                Ok(()) if !seen.insert((r.kind(), r.name().to_string())) => details.push(format!(
                    "{source}: metadata.name: {} is declared twice in this request",
                    r.key()
                )),
                Ok(()) => resources.push((r, source)),
            },
        }
    }
    if details.is_empty() {
        Ok(resources)
    } else {
        Err(details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_invalid_and_duplicate_objects() {
        let image = serde_json::json!({
            "apiVersion": "agentvm.dev/v1alpha1", "kind": "Image",
            "metadata": {"name": "base"}, "spec": {}
        });
        let ok = resources_from_json(vec![image.clone()], &["a.yaml:1".into()]).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].1, "a.yaml:1");
        let bad = serde_json::json!({
            "apiVersion": "agentvm.dev/v1alpha1", "kind": "Image",
            "metadata": {"name": "Bad_Name"}, "spec": {}
        });
        let errors = resources_from_json(
            vec![image.clone(), image, bad, serde_json::json!([1, 2])],
            &[],
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].starts_with("objects[1]: metadata.name: Image/base is declared twice"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("objects[2]: metadata.name: "),
            "{errors:?}"
        );
        assert!(errors[2].starts_with("objects[3]: "), "{errors:?}");
    }
}
