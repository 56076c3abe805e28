//! agentvm's manifest API, `agentvm.dev/v1alpha1`: the resource types
//! (`Network`, `NetworkFilter`, `Image`, `VmPool`, `AgentRun`), their
//! validation, manifest parsing with precise error positions, spec hashing
//! and JSON Schema generation. No I/O beyond reading manifests.
//!
//! ```
//! let objects = agentvm_api::parse_str(
//!     "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: debian-base\nspec: {}\n",
//!     "inline.yaml",
//! )
//! .unwrap();
//! assert_eq!(objects[0].resource.kind(), agentvm_api::Kind::Image);
//! ```

pub mod errors;
pub mod json;
pub mod kind;
pub mod kinds;
pub mod meta;
pub mod net;
pub mod parse;
pub mod reason;
pub mod resource;
pub mod schema;
pub mod time;
pub mod validate;

/// API group and version of every object.
pub const API_VERSION: &str = "agentvm.dev/v1alpha1";

pub use json::resources_from_json;
pub use kind::{Kind, UnknownKind};
pub use kinds::agent_run::{
    AgentRun, AgentRunPhase, AgentRunSpec, AgentRunStatus, Anomaly, Artifacts, CollectedArtifact,
    Command, EgressDestination, EgressSummary, Entrypoint, InputFile, OutputCount, OutputLimit,
    ResourceUsage, Script, SecretEnvVar, Workspace,
};
pub use kinds::image::{Distro, Image, ImagePhase, ImageSpec, ImageStatus, KernelSource};
pub use kinds::network::{
    DhcpRange, Network, NetworkMode, NetworkPhase, NetworkSpec, NetworkStatus,
};
pub use kinds::network_filter::{
    domain_matches, domain_overlong_under, domain_pattern_problem, EgressRule, NetworkFilter,
    NetworkFilterPhase, NetworkFilterSpec, NetworkFilterStatus, Protocol, MAX_WILDCARD_HEAD,
};
pub use kinds::sandbox::{
    ForkedFrom, Rollback, RollbackStatus, Sandbox, SandboxPhase, SandboxSpec, SandboxState,
    SandboxStatus, ShutdownPolicy,
};
pub use kinds::snapshot::{Snapshot, SnapshotPhase, SnapshotSpec, SnapshotStatus};
pub use kinds::vm_pool::{
    AnomalyDetection, AnomalyPolicy, IoLimits, NetworkAttachment, PoolEvent, PoolNetwork,
    PoolNetworkMode, Profile, ResolvedResources, ResourceStatus, Resources, VmCreation, VmPool,
    VmPoolPhase, VmPoolSpec, VmPoolStatus, VmTemplate, WarmupStep,
};
pub use meta::{find_condition, set_condition, Condition, ConditionStatus, ObjectMeta};
pub use net::{CidrError, Ipv4Cidr, PortRange, PortRangeError};
pub use parse::{
    manifest_files, parse_bytes, parse_dir, parse_file, parse_path, parse_paths, parse_reader,
    parse_str, ManifestError, ManifestErrorKind, ManifestErrors, ParseResult, ParsedResource,
    SourceLocation, MAX_MANIFEST_BYTES,
};
pub use reason::{Reason, UnknownReason};
pub use resource::{spec_hash, KindStatus, Resource};
pub use time::Timestamp;
pub use validate::{
    is_dns_label, pool_disk_too_small, suggest_dns_label, template_disk_too_small, validate,
    validate_pool_disk, FieldPath, PathSegment, ValidationError, ValidationErrors,
};
