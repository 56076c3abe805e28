//! `Snapshot`: a named point-in-time copy of a sandbox's memory and disk (or its disk
//! alone), to roll the sandbox back to.

use crate::time::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;

resource_object!(
    /// A point-in-time copy of a sandbox: its memory (running programs
    /// included) and its disk, taken in one step while the guest is stopped
    /// for it, so the file systems are consistent; or, with `memory: false`,
    /// its disk alone, taken with the guest's file systems frozen. `agentvm
    /// rollback sandbox/NAME --to snapshot/THIS` brings the sandbox back to
    /// it. Deleting the snapshot frees its storage; deleting the sandbox
    /// deletes its snapshots.
    Snapshot,
    SnapshotSpec,
    SnapshotStatus
);

/// Desired state of a `Snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSpec {
    /// Name of the `Sandbox` to copy. It must be `Running` or `Paused`
    /// when the snapshot is taken (a `Stopped` one is waited for).
    pub sandbox_ref: String,
    /// Keep the guest's memory too (default): a rollback goes on where the
    /// snapshot was taken, running programs included, and the snapshot can
    /// be forked. `false`: the disk alone, taken with the guest's file
    /// systems frozen for a moment (the guest keeps running otherwise) and
    /// holding no memory; a rollback to it restores the disk and boots the
    /// sandbox afresh, and it cannot be forked.
    #[serde(default = "default_memory", skip_serializing_if = "is_true")]
    pub memory: bool,
}

fn default_memory() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Where a snapshot is in its lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    /// Not taken yet (waiting for the sandbox to run).
    #[default]
    Pending,
    /// Taken: the sandbox can be rolled back to it.
    Ready,
    /// It could not be taken, or it is gone; see the conditions.
    Failed,
}

impl SnapshotPhase {
    /// The phase as written on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            SnapshotPhase::Pending => "Pending",
            SnapshotPhase::Ready => "Ready",
            SnapshotPhase::Failed => "Failed",
        }
    }
}

/// Observed state of a `Snapshot`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    /// Where the snapshot is in its lifecycle.
    #[serde(default)]
    pub phase: SnapshotPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, `Progressing`, `Degraded`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The sandbox's VM it was taken of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// When it was taken (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub taken_at: Option<Timestamp>,
    /// Bytes of memory and device state it holds (its disk blocks are
    /// shared with the sandbox's disk until either changes them). Absent
    /// for a disk-only snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// True when it holds the disk alone (`spec.memory: false`): rolling
    /// back to it boots the sandbox afresh, and it cannot be forked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_only: bool,
    /// How long taking it stopped the sandbox, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}
