//! `Sandbox`: a VM that is kept — claimed from a pool, made from a template or forked from a
//! snapshot, then used command after command,
//! paused, stopped and started again until it is deleted or its lifetime ends.

use crate::time::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;

resource_object!(
    /// A long-lived VM you exec into. It is claimed from `poolRef` (a warm VM
    /// at once; the pool boots a replacement), booted from `template`, or
    /// forked from a snapshot (`fromSnapshot`), and kept, not reset, until the
    /// sandbox is deleted. `state` is the desired power state; the lifetime
    /// rules (`idleTimeoutSeconds`, `ttlSeconds`, `shutdownTime`) end it the
    /// way `shutdownPolicy` says.
    Sandbox,
    SandboxSpec,
    SandboxStatus
);

/// Default `idleTimeoutSeconds` (30 minutes).
pub const DEFAULT_IDLE_TIMEOUT_SECONDS: u32 = 1800;
/// Largest `idleTimeoutSeconds` and `ttlSeconds` (30 days).
pub const MAX_LIFETIME_SECONDS: u32 = 2_592_000;
/// Smallest non-zero `idleTimeoutSeconds` and `ttlSeconds`.
pub const MIN_LIFETIME_SECONDS: u32 = 10;

fn default_idle_timeout_seconds() -> u32 {
    DEFAULT_IDLE_TIMEOUT_SECONDS
}

/// Desired state of a `Sandbox`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxSpec {
    /// Name of the `VmPool` whose warm VM the sandbox takes. The VM leaves
    /// the pool for good (it is never reset or handed to a run); the pool
    /// boots a replacement. Exactly one of `poolRef`, `template` and
    /// `fromSnapshot`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool_ref: String,
    /// A VM of its own, booted for this sandbox from this template (the
    /// same fields as a `VmPool`'s `template`: image, resources, network,
    /// warm-up steps), without a pool. It waits for the `Image` (and an
    /// attached network) to be `Ready`; booting takes as long as a pool VM's
    /// first boot. Later changes to the template do not rebuild the VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::VmTemplate>,
    /// Name of a `Snapshot` to fork: the sandbox gets a new VM that goes on
    /// from that snapshot of its sandbox — same files, same memory, same
    /// running programs — with its own name, files, host name (the
    /// sandbox's name) and fresh entropy. The source sandbox is paused only
    /// while its disk is copied. The fork does not depend on the snapshot or
    /// its sandbox afterwards; on a network it gets a MAC address and a DHCP
    /// lease of its own. Only root and the source sandbox's owner may fork
    /// it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// Desired power state: `Running` (default), `Paused` (vCPUs stopped,
    /// memory kept in host RAM: resumes in milliseconds) or `Stopped`
    /// (memory and disk saved to the host's disk and the VM's process ended,
    /// so it takes no host memory; starts again where it was, running
    /// programs included, in about a second).
    #[serde(default)]
    pub state: SandboxState,
    /// Seconds without activity after which the sandbox ends the way
    /// `shutdownPolicy` says (10 to 2592000; 0 = never). Activity is any
    /// exec, file copy or forwarded connection through agentvm, and a
    /// command started through agentvm that is still running. Time spent
    /// `Paused` or `Stopped` does not count. Default 1800.
    #[serde(default = "default_idle_timeout_seconds")]
    #[schemars(range(max = 2_592_000))]
    pub idle_timeout_seconds: u32,
    /// Seconds after the sandbox was created after which it ends the way
    /// `shutdownPolicy` says, whatever it is doing (10 to 2592000; unset =
    /// no limit). Wall-clock time: paused and stopped time count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 2_592_000))]
    pub ttl_seconds: Option<u32>,
    /// An RFC 3339 time (`2026-12-31T18:00:00Z`) at which the sandbox ends
    /// the way `shutdownPolicy` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<String>,
    /// What ending a sandbox's lifetime does: `Stop` (default: the VM is
    /// saved to disk and its phase is `Stopped`; nothing is lost, and any
    /// exec or `agentvm start` brings it back) or `Delete` (the sandbox and
    /// its VM are deleted).
    #[serde(default)]
    pub shutdown_policy: ShutdownPolicy,
    /// Roll the sandbox back to one of its `Snapshot`s (memory and disk):
    /// set by `agentvm rollback`. Each value is acted on once; a new
    /// `requestedAt` asks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback: Option<Rollback>,
    /// Most `Snapshot`s the sandbox may have at once (1 to 100); a snapshot
    /// beyond it fails with reason `SnapshotLimit`. Default 10.
    #[serde(default = "default_max_snapshots")]
    #[schemars(range(min = 1, max = 100))]
    pub max_snapshots: u32,
    /// Most memory and device state, in MiB, that the sandbox's `Snapshot`s
    /// may hold together (64 to 1048576; unset = no limit but
    /// `maxSnapshots`). A snapshot's size is known once it is taken: one
    /// that takes the total past the limit is deleted again and fails with
    /// reason `SnapshotLimit`; the others are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 64, max = 1_048_576))]
    pub max_snapshot_mib: Option<u32>,
}

/// Default `maxSnapshots`.
pub const DEFAULT_MAX_SNAPSHOTS: u32 = 10;
/// Bounds of `maxSnapshots`.
pub const MAX_SNAPSHOTS_RANGE: (u32, u32) = (1, 100);
/// Bounds of `maxSnapshotMib`.
pub const MAX_SNAPSHOT_MIB_RANGE: (u32, u32) = (64, 1_048_576);

fn default_max_snapshots() -> u32 {
    DEFAULT_MAX_SNAPSHOTS
}

/// A request to roll a sandbox back to a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rollback {
    /// Name of a `Snapshot` of this sandbox.
    pub snapshot: String,
    /// When it was asked for (RFC 3339); tells two rollbacks to the same
    /// snapshot apart.
    pub requested_at: String,
}

/// What became of the last rollback request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollbackStatus {
    /// The request.
    #[serde(flatten)]
    pub request: Rollback,
    /// True when the sandbox was rolled back; false when it was refused.
    pub done: bool,
    /// Why it was refused, or how long it took.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Desired power state of a sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SandboxState {
    /// Running.
    #[default]
    Running,
    /// vCPUs stopped, memory kept in RAM.
    Paused,
    /// Saved to disk, no QEMU process.
    Stopped,
}

impl SandboxState {
    /// The state as written on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            SandboxState::Running => "Running",
            SandboxState::Paused => "Paused",
            SandboxState::Stopped => "Stopped",
        }
    }
}

/// What ending a sandbox's lifetime does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ShutdownPolicy {
    /// Save the VM to disk (phase `Stopped`); any exec or `agentvm start`
    /// brings it back.
    #[default]
    Stop,
    /// Delete the sandbox and its VM.
    Delete,
}

/// Where a sandbox is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SandboxPhase {
    /// Waiting for a ready VM of the pool (or for the pool).
    #[default]
    Pending,
    /// The VM runs; exec, copy and port-forward work.
    Running,
    /// The VM's vCPUs are stopped; its memory is kept.
    Paused,
    /// The VM is saved to disk; it takes no host memory.
    Stopped,
    /// The VM is gone or broken; see the conditions.
    Failed,
    /// Being deleted.
    Deleting,
}

impl SandboxPhase {
    /// The phase as written on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            SandboxPhase::Pending => "Pending",
            SandboxPhase::Running => "Running",
            SandboxPhase::Paused => "Paused",
            SandboxPhase::Stopped => "Stopped",
            SandboxPhase::Failed => "Failed",
            SandboxPhase::Deleting => "Deleting",
        }
    }
}

/// Observed state of a `Sandbox`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    /// Where the sandbox is in its lifecycle.
    #[serde(default)]
    pub phase: SandboxPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, `Progressing`, `Degraded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The libvirt domain it owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The pool the VM came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// When the VM was claimed (RFC 3339): `ttlSeconds` counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Timestamp>,
    /// When something last used the sandbox (RFC 3339): an exec, copy or
    /// forwarded connection began or ended, or it was started or resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activity_at: Option<Timestamp>,
    /// Seconds of running (not paused or stopped) time since the last
    /// activity, as of this status: what `idleTimeoutSeconds` is compared
    /// with.
    #[serde(default)]
    pub idle_seconds: u64,
    /// Commands started through agentvm that are still running.
    #[serde(default)]
    pub active_execs: u32,
    /// Why the sandbox is stopped although `state` is `Running`
    /// (`IdleTimeout`), or ended (`TtlExpired`, `ShutdownTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<String>,
    /// The snapshots its VM holds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
    /// The last rollback request and what became of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<RollbackStatus>,
    /// Where a fork came from and what making it cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forked_from: Option<ForkedFrom>,
}

/// A fork's origin (`status.forkedFrom`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkedFrom {
    /// The `Snapshot` it was made from.
    pub snapshot: String,
    /// That snapshot's sandbox.
    pub sandbox: String,
    /// Milliseconds the source sandbox was paused for the copy of its disk.
    pub source_pause_ms: u64,
    /// Milliseconds from the start of the fork to its guest answering.
    pub took_ms: u64,
}
