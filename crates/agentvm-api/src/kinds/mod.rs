//! The seven resource kinds: their objects, specs and statuses.

pub mod agent_run;
pub mod image;
pub mod network;
pub mod network_filter;
pub mod sandbox;
pub mod snapshot;
pub mod vm_pool;

pub(crate) fn default_true() -> bool {
    true
}

/// Declares a top-level object type `{ apiVersion, kind, metadata, spec, status }`.
macro_rules! resource_object {
    ($(#[$doc:meta])* $name:ident, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// API group and version; always `agentvm.dev/v1alpha1`.
            #[schemars(extend("const" = "agentvm.dev/v1alpha1"))]
            pub api_version: String,
            #[doc = concat!("Resource kind; always `", stringify!($name), "`.")]
            #[schemars(extend("const" = stringify!($name)))]
            pub kind: String,
            /// Name, labels and annotations.
            pub metadata: $crate::ObjectMeta,
            /// Desired state, written by users.
            pub spec: $spec,
            /// Observed state, written by the controller. Ignored in manifests.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        impl $name {
            #[doc = concat!("`\"", stringify!($name), "\"`, the value of the `kind` field.")]
            pub const KIND: &'static str = stringify!($name);

            /// An object named `name` with `spec`, no labels and no status.
            pub fn new(name: impl Into<String>, spec: $spec) -> Self {
                Self {
                    api_version: $crate::API_VERSION.to_string(),
                    kind: Self::KIND.to_string(),
                    metadata: $crate::ObjectMeta::named(name),
                    spec,
                    status: None,
                }
            }

            /// The object's name.
            pub fn name(&self) -> &str {
                &self.metadata.name
            }
        }

        impl From<$name> for $crate::Resource {
            fn from(value: $name) -> Self {
                $crate::Resource::$name(value)
            }
        }

        impl $crate::KindStatus for $status {
            const KIND: $crate::Kind = $crate::Kind::$name;

            fn of(resource: &$crate::Resource) -> Option<&Self> {
                match resource {
                    $crate::Resource::$name(o) => o.status.as_ref(),
                    _ => None,
                }
            }

            fn put(self, resource: &mut $crate::Resource) -> bool {
                match resource {
                    $crate::Resource::$name(o) => {
                        o.status = Some(self);
                        true
                    }
                    _ => false,
                }
            }
        }
    };
}
pub(crate) use resource_object;
