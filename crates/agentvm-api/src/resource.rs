//! `Resource`: any object of any kind, and the spec hash used for drift detection.

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::kinds::agent_run::AgentRun;
use crate::kinds::image::Image;
use crate::kinds::network::Network;
use crate::kinds::network_filter::NetworkFilter;
use crate::kinds::sandbox::Sandbox;
use crate::kinds::snapshot::Snapshot;
use crate::kinds::vm_pool::VmPool;
use crate::{Kind, ObjectMeta, API_VERSION};

/// The status type of one kind: read from and written into a [`Resource`] without going
/// through JSON. Implemented by every kind's status (`ImageStatus`, `VmPoolStatus`, ...).
pub trait KindStatus:
    Clone
    + Default
    + PartialEq
    + std::fmt::Debug
    + Serialize
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// The kind whose status this is.
    const KIND: Kind;

    /// The status of `resource`; `None` when it has none yet or is of another kind.
    fn of(resource: &Resource) -> Option<&Self>;

    /// Makes `self` the status of `resource`; false (and no change) when it is of another
    /// kind.
    fn put(self, resource: &mut Resource) -> bool;
}

/// An object of any kind. Serializes as the object itself (its `kind`
/// field tells them apart) and deserializes by dispatching on `kind`.
// Variants are unboxed so other crates can match and build them directly;
// objects are few and usually shared behind an `Arc`, so size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A [`Network`].
    Network(Network),
    /// A [`NetworkFilter`].
    NetworkFilter(NetworkFilter),
    /// An [`Image`].
    Image(Image),
    /// A [`VmPool`].
    VmPool(VmPool),
    /// A [`Sandbox`].
    Sandbox(Sandbox),
    /// A [`Snapshot`].
    Snapshot(Snapshot),
    /// An [`AgentRun`].
    AgentRun(AgentRun),
}

macro_rules! each_kind {
    ($self:expr, $obj:ident => $body:expr) => {
        match $self {
            Resource::Network($obj) => $body,
            Resource::NetworkFilter($obj) => $body,
            Resource::Image($obj) => $body,
            Resource::VmPool($obj) => $body,
            Resource::Sandbox($obj) => $body,
            Resource::Snapshot($obj) => $body,
            Resource::AgentRun($obj) => $body,
        }
    };
}

impl Resource {
    /// The kind of object.
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Network(_) => Kind::Network,
            Resource::NetworkFilter(_) => Kind::NetworkFilter,
            Resource::Image(_) => Kind::Image,
            Resource::VmPool(_) => Kind::VmPool,
            Resource::Sandbox(_) => Kind::Sandbox,
            Resource::Snapshot(_) => Kind::Snapshot,
            Resource::AgentRun(_) => Kind::AgentRun,
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.metadata().name
    }

    /// The object's metadata.
    pub fn metadata(&self) -> &ObjectMeta {
        each_kind!(self, o => &o.metadata)
    }

    /// The object's metadata, mutably (the controller bumps `generation`).
    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        each_kind!(self, o => &mut o.metadata)
    }

    /// The `apiVersion` field as written.
    pub fn api_version(&self) -> &str {
        each_kind!(self, o => &o.api_version)
    }

    /// The `kind` field as written (equal to `kind().as_str()` once validated).
    pub fn kind_field(&self) -> &str {
        each_kind!(self, o => &o.kind)
    }

    /// True when the object carries a `status`.
    pub fn has_status(&self) -> bool {
        each_kind!(self, o => o.status.is_some())
    }

    /// Drops the `status` (manifests do not own it).
    pub fn clear_status(&mut self) {
        each_kind!(self, o => o.status = None)
    }

    /// The spec as a JSON value (for diffs and hashing).
    pub fn spec_json(&self) -> serde_json::Value {
        let value = each_kind!(self, o => serde_json::to_value(&o.spec));
        // Specs are plain data with string keys: serializing cannot fail.
        value.unwrap_or(serde_json::Value::Null)
    }

    /// `Kind/name`, e.g. `VmPool/sandbox`, for messages.
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        each_kind!(self, o => o.serialize(serializer))
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        if api_version != Some(API_VERSION) {
            return Err(D::Error::custom(format!(
                "unsupported apiVersion {:?}; expected `{API_VERSION}`",
                api_version.unwrap_or("")
            )));
        }
        let kind = value.get("kind").and_then(|v| v.as_str()).unwrap_or("");
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind)
            .ok_or_else(|| {
                D::Error::custom(format!(
                    "unknown kind {kind:?}; valid kinds: {}",
                    crate::kind::valid_kinds()
                ))
            })?;
        let result = match kind {
            Kind::Network => serde_json::from_value(value).map(Resource::Network),
            Kind::NetworkFilter => serde_json::from_value(value).map(Resource::NetworkFilter),
            Kind::Image => serde_json::from_value(value).map(Resource::Image),
            Kind::VmPool => serde_json::from_value(value).map(Resource::VmPool),
            Kind::Sandbox => serde_json::from_value(value).map(Resource::Sandbox),
            Kind::Snapshot => serde_json::from_value(value).map(Resource::Snapshot),
            Kind::AgentRun => serde_json::from_value(value).map(Resource::AgentRun),
        };
        result.map_err(D::Error::custom)
    }
}

impl JsonSchema for Resource {
    fn schema_name() -> Cow<'static, str> {
        "Resource".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let refs = [
            ("Network", generator.subschema_for::<Network>()),
            ("NetworkFilter", generator.subschema_for::<NetworkFilter>()),
            ("Image", generator.subschema_for::<Image>()),
            ("VmPool", generator.subschema_for::<VmPool>()),
            ("Sandbox", generator.subschema_for::<Sandbox>()),
            ("Snapshot", generator.subschema_for::<Snapshot>()),
            ("AgentRun", generator.subschema_for::<AgentRun>()),
        ];
        let branches: Vec<serde_json::Value> = refs
            .into_iter()
            .map(|(kind, schema)| {
                serde_json::json!({
                    "if": { "properties": { "kind": { "const": kind } }, "required": ["kind"] },
                    "then": schema
                })
            })
            .collect();
        json_schema!({
            "description": "Any agentvm.dev/v1alpha1 object; `kind` selects the schema.",
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": { "const": API_VERSION },
                "kind": { "enum": ["Network", "NetworkFilter", "Image", "VmPool", "Sandbox", "Snapshot", "AgentRun"] }
            },
            "allOf": branches
        })
    }
}

/// A stable hash of the object's spec: sha256 (lowercase hex) of the
/// spec's canonical JSON (object keys sorted, no whitespace). Defaults are
/// materialized before hashing, so writing a default explicitly or leaving it
/// out gives the same hash; metadata and status never affect it.
pub fn spec_hash(resource: &Resource) -> String {
    let mut canonical = String::new();
    write_canonical_json(&resource.spec_json(), &mut canonical);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `value` as JSON with object keys sorted and no whitespace.
pub fn write_canonical_json(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical_json(&map[key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical_json(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}
