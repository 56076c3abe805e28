//! Typed condition, phase and event reasons.
//!
//! Status objects keep their reasons as strings (`Condition::reason`,
//! `AgentRunStatus::reason`, `PoolEvent::reason`) so the wire format and schemas stay as they
//! are; everything that sets or compares one goes through [`Reason`], whose
//! [`Reason::as_str`] (and serde form) is the CamelCase string on the wire.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident,)*) => {
        /// A machine-readable CamelCase reason, as written in conditions, `AgentRun`
        /// `status.reason`, pool events and reconcile-failure metrics.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The CamelCase string written on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => stringify!($variant),)*
                }
            }
        }
    };
}

reasons! {
    // Conditions of every kind.
    /// Nothing left to do (`Progressing`/`Degraded` false).
    Reconciled,
    /// A network is defined and running.
    Active,
    /// A network filter is defined.
    Defined,
    /// An image is built.
    Built,
    /// An image is being built.
    Building,
    /// An image recipe is invalid.
    RecipeInvalid,
    /// The image cache failed.
    CacheError,
    /// An image build failed.
    BuildFailed,
    /// A deletion waits for pools that still use the object.
    InUse,
    /// A reconciler was handed an object of another kind.
    WrongKind,
    /// The object store failed.
    StoreError,
    /// A thread could not be started.
    ThreadSpawn,
    /// A domain template could not be encoded.
    TemplateEncoding,
    /// A reconciler panicked (metrics only).
    Panic,

    // Backend failures.
    /// A libvirt object was not found.
    NotFound,
    /// A libvirt object already exists.
    AlreadyExists,
    /// A libvirt object is not agentvm's.
    NotOwned,
    /// The guest agent is unavailable.
    GuestAgentUnavailable,
    /// The VM is not running.
    VmNotRunning,
    /// A command in the guest failed.
    GuestCommandFailed,
    /// Something timed out (also: an `AgentRun` killed after `timeoutSeconds`).
    Timeout,
    /// libvirt failed.
    LibvirtError,
    /// Host I/O failed.
    HostIoError,
    /// A host command failed.
    HostCommandFailed,
    /// The guest protocol failed.
    ProtocolError,
    /// The image is larger than the pool's disk.
    DiskTooSmall,
    /// The host file system a VM's files live on is too full for what was asked.
    HostDiskFull,

    // Resource limits.
    /// A limit is in force.
    Applied,
    /// The host cannot enforce a limit.
    HostCannotEnforce,

    // VmPool.
    /// Waiting for runs to finish.
    WaitingForRuns,
    /// A VM was changed by hand.
    EditedByHand,
    /// A VM outlived its TTL.
    TtlExpired,
    /// Resetting a VM failed.
    ResetFailed,
    /// A VM failed its health check.
    Unhealthy,
    /// VMs are being replaced for a new template.
    RollingUpdate,
    /// VMs are being added.
    ScalingUp,
    /// `minReady` VMs are ready.
    MinReadyReached,
    /// The pool is at `maxSize`.
    AtMaxSize,
    /// Waiting for the pool's image.
    WaitingForImage,
    /// Waiting for the pool's network.
    WaitingForNetwork,

    // AgentRun.
    /// The run's pool does not exist.
    PoolNotFound,
    /// The run waits in the queue.
    Queued,
    /// A secret the run needs is unavailable.
    SecretUnavailable,
    /// An input of the run is unavailable.
    InputUnavailable,
    /// The run waits for a VM.
    WaitingForVm,
    /// The run has a VM.
    Scheduled,
    /// The run is executing.
    Running,
    /// Artifacts were collected.
    Collected,
    /// Unsafe artifact entries were rejected.
    UnsafeEntries,
    /// The artifact size cap was reached.
    SizeCapReached,
    /// An artifact path was not found.
    PathNotFound,
    /// Collecting artifacts failed.
    CollectionFailed,
    /// Output beyond `output.maxMib` was dropped.
    OutputCapReached,
    /// The guest stopped answering.
    GuestUnresponsive,
    /// The anomaly policy stopped the run.
    AnomalyPolicy,
    /// The run was cancelled.
    Cancelled,
    /// The program exited 0.
    Completed,
    /// The program exited non-zero.
    NonZeroExit,
    /// The program was killed by a signal.
    Signaled,
    /// The run's VM disappeared.
    VmLost,
    /// Setting the run up failed.
    SetupFailed,
    /// The run was executing when an earlier controller stopped.
    ControllerRestarted,
    /// The cluster node that was running the run stopped or lost its lease; the run is not
    /// started again elsewhere (it may have had effects).
    NodeLost,
    // Sandbox.
    /// The sandbox's VM runs.
    SandboxRunning,
    /// The sandbox's VM is paused (memory kept).
    SandboxPaused,
    /// The sandbox's VM is saved to disk.
    SandboxStopped,
    /// Changing the sandbox's power state failed.
    PowerChangeFailed,
    /// The sandbox was idle for `idleTimeoutSeconds`.
    IdleTimeout,
    /// The sandbox reached its `shutdownTime`.
    ShutdownTime,
    // Snapshot.
    /// The snapshot is taken.
    Taken,
    /// The snapshot's sandbox does not exist.
    SandboxNotFound,
    /// The snapshot waits for its sandbox to run.
    WaitingForSandbox,
    /// The sandbox has `maxSnapshots` snapshots already.
    SnapshotLimit,
    /// The snapshot is gone from its VM.
    SnapshotLost,
    /// A rollback was refused.
    RollbackRefused,
    /// The submitter may not use the object named (a run in someone else's sandbox).
    NotPermitted,
    /// agentvm cannot do this for this object (e.g. fork a VM with two network
    /// interfaces, which agentvm never makes).
    Unsupported,
    /// The fork's `Snapshot` does not exist.
    SnapshotNotFound,
    /// The fork waits for its `Snapshot` to be taken.
    WaitingForSnapshot,
    /// The fork's `Snapshot` holds the disk alone (`memory: false`): there is
    /// no running state to go on from.
    SnapshotHasNoMemory,
    /// The sandbox was forked from a snapshot.
    Forked,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a known [`Reason`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown reason {0:?}")]
pub struct UnknownReason(pub String);

impl std::str::FromStr for Reason {
    type Err = UnknownReason;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .iter()
            .copied()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownReason(s.to_string()))
    }
}

impl From<Reason> for String {
    fn from(r: Reason) -> String {
        r.as_str().to_string()
    }
}

impl AsRef<str> for Reason {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<String> for Reason {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<Reason> for String {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for str {
    fn eq(&self, other: &Reason) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_the_variant_names_and_round_trip() {
        assert_eq!(Reason::TtlExpired.as_str(), "TtlExpired");
        assert_eq!(Reason::NonZeroExit.to_string(), "NonZeroExit");
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>(), Ok(*r));
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), *r);
        }
        assert!("ttlExpired".parse::<Reason>().is_err());
        assert_eq!(String::from(Reason::VmLost), "VmLost");
        assert!(Reason::Completed == "Completed");
        let stored: String = Reason::Unhealthy.into();
        assert!(stored == Reason::Unhealthy);
    }

    #[test]
    fn phase_strings_match_serde() {
        use crate::AgentRunPhase as P;
        for p in [
            P::Pending,
            P::Scheduled,
            P::Running,
            P::Succeeded,
            P::Failed,
            P::TimedOut,
            P::Cancelled,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        }
    }
}
