//! Parts every object shares: `metadata` and the condition list of `status`.

use crate::time::Timestamp;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Identity and free-form tags of an object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// Name, unique per kind. Kubernetes DNS-label rules: lowercase letters,
    /// digits and `-`, starting and ending with a letter or digit, at most 63
    /// characters.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Identifying key/value pairs (Kubernetes label syntax), usable in selectors.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Non-identifying key/value pairs for tools and humans.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Incremented by the controller whenever the spec changes. Owned by the
    /// controller: ignored in manifests. Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

impl ObjectMeta {
    /// Metadata with only a name.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell (yet).
    #[default]
    Unknown,
}

/// One observation about an object, Kubernetes style
/// (e.g. `type: Ready, status: "False", reason: ImageMissing`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// What is observed, in CamelCase (`Ready`, `Reconciled`, `Degraded`).
    #[serde(rename = "type")]
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// Machine-readable CamelCase reason for the last transition.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable details.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When `status` last changed (RFC 3339, e.g. `2025-01-31T12:00:00.000Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Timestamp>,
}

impl Condition {
    /// A condition with all fields set.
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        last_transition_time: Option<Timestamp>,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time,
        }
    }
}

/// Inserts or updates `condition` in `conditions` by type. When the status
/// did not change, the existing `lastTransitionTime` is kept (only reason and
/// message are refreshed), as Kubernetes does. Returns true if anything changed.
pub fn set_condition(conditions: &mut Vec<Condition>, condition: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            let mut updated = condition;
            if existing.status == updated.status {
                updated.last_transition_time = existing.last_transition_time;
            }
            if *existing == updated {
                false
            } else {
                *existing = updated;
                true
            }
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Option<Timestamp> {
        Some(Timestamp(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        ))
    }

    #[test]
    fn set_condition_keeps_transition_time_when_status_unchanged() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            Condition::new("Ready", ConditionStatus::False, "Booting", "", t(1))
        ));
        assert!(set_condition(
            &mut conds,
            Condition::new("Ready", ConditionStatus::False, "StillBooting", "", t(2))
        ));
        assert_eq!(conds[0].last_transition_time, t(1));
        assert_eq!(conds[0].reason, "StillBooting");
        assert!(!set_condition(
            &mut conds,
            Condition::new("Ready", ConditionStatus::False, "StillBooting", "", t(3))
        ));
        assert!(set_condition(
            &mut conds,
            Condition::new("Ready", ConditionStatus::True, "Booted", "", t(4))
        ));
        assert_eq!(conds[0].last_transition_time, t(4));
        assert_eq!(find_condition(&conds, "Ready").unwrap().reason, "Booted");
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn condition_serializes_type_and_skips_empty() {
        let c = Condition::new("Ready", ConditionStatus::True, "", "", None);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"type":"Ready","status":"True"}"#
        );
        let meta = ObjectMeta::named("x");
        assert_eq!(serde_json::to_string(&meta).unwrap(), r#"{"name":"x"}"#);
    }
}
