//! Typed errors of the backend, classified by libvirt error code (never by message text).

use std::path::PathBuf;
use std::time::Duration;

use virt::error::{ErrorNumber, ErrorNumberEnum};

/// What can go wrong talking to libvirt, QEMU or the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The named libvirt object does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Object kind: `domain`, `network`, `nwfilter`, `snapshot`.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// An object with that name exists already.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// The object exists but was not created by agentvm, so agentvm will not touch it.
    #[error("{kind} {name:?} exists but is not owned by agentvm; rename the manifest or remove the foreign object by hand")]
    NotOwned {
        /// Object kind.
        kind: &'static str,
        /// Object name.
        name: String,
    },
    /// The guest agent did not answer (not started yet, crashed, or the guest hangs).
    #[error("guest agent of {vm} unavailable: {message}")]
    GuestAgentUnavailable {
        /// Domain name.
        vm: String,
        /// What libvirt said.
        message: String,
    },
    /// The VM's domain exists but is not running (destroyed or shut off meanwhile): nothing
    /// in the guest can answer, so no wait on it goes on.
    #[error("VM {vm} is not running")]
    VmNotRunning {
        /// Domain name.
        vm: String,
    },
    /// The guest agent answered with an error.
    #[error("guest agent of {vm} failed {command}: {message}")]
    GuestCommand {
        /// Domain name.
        vm: String,
        /// The agent command, e.g. `guest-exec`.
        command: String,
        /// The agent's error description.
        message: String,
    },
    /// An operation did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// Any other libvirt error.
    #[error("libvirt error {}: {message}", code_label(*.code))]
    Libvirt {
        /// libvirt's error number (virErrorNumber), as libvirt gave it.
        code: ErrorNumberEnum,
        /// libvirt's message.
        message: String,
    },
    /// A host file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A host command (e.g. `qemu-img`) failed.
    #[error("{command} failed: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr.
        message: String,
    },
    /// A VM's disk was asked to be smaller than the image it is an overlay of: the guest's
    /// root file system (the image's size) would not fit on it.
    #[error("a disk of {wanted_bytes} bytes is smaller than its image {} ({image_bytes} bytes); make the disk at least as big as the image", .image.display())]
    DiskTooSmall {
        /// The base image.
        image: PathBuf,
        /// The image's virtual size, bytes.
        image_bytes: u64,
        /// The size asked for, bytes.
        wanted_bytes: u64,
    },
    /// The host file system a VM's files live on has too little free space for what was
    /// asked; nothing was changed.
    #[error("the host file system holding {} has {} MiB free; {what} needs about {} MiB: nothing was changed; free space there (or delete snapshots) and it is retried", .path.display(), .free_bytes >> 20, .needed_bytes >> 20)]
    HostDiskFull {
        /// A directory on that file system.
        path: PathBuf,
        /// What was asked.
        what: String,
        /// Bytes it needs, about.
        needed_bytes: u64,
        /// Bytes free for unprivileged writers.
        free_bytes: u64,
    },
    /// agentvm cannot do this (yet) for this object; nothing was changed.
    #[error("{what}: not supported: {why}")]
    Unsupported {
        /// What was asked.
        what: String,
        /// Why it cannot be done.
        why: String,
    },
    /// The guest agent's reply could not be understood.
    #[error("unexpected reply from {what}: {message}")]
    Protocol {
        /// Which call.
        what: String,
        /// What was wrong.
        message: String,
    },
}

/// Maps an I/O error on `path` during `op` to [`BackendError::Io`].
pub(crate) fn io_err<'p>(
    op: &'static str,
    path: &'p std::path::Path,
) -> impl FnOnce(std::io::Error) -> BackendError + 'p {
    move |source| BackendError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Result alias of the backend.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

impl BackendError {
    /// Classify a libvirt error for an object of `kind` named `name`.
    pub fn from_virt(err: virt::error::Error, kind: &'static str, name: &str) -> Self {
        match err.code() {
            ErrorNumberEnum::Known(
                ErrorNumber::NoDomain
                | ErrorNumber::NoNetwork
                | ErrorNumber::NoNwfilter
                | ErrorNumber::NoDomainSnapshot,
            ) => BackendError::NotFound {
                kind,
                name: name.to_string(),
            },
            ErrorNumberEnum::Known(ErrorNumber::DomExist) => BackendError::AlreadyExists {
                kind,
                name: name.to_string(),
            },
            ErrorNumberEnum::Known(ErrorNumber::AgentUnresponsive | ErrorNumber::AgentUnsynced) => {
                BackendError::GuestAgentUnavailable {
                    vm: name.to_string(),
                    message: err.message().to_string(),
                }
            }
            _ => BackendError::Libvirt {
                code: err.code(),
                message: err.message().to_string(),
            },
        }
    }

    /// True when the guest agent or libvirtd may answer again shortly: the agent did not
    /// answer ([`BackendError::GuestAgentUnavailable`]), or the connection to libvirtd broke
    /// or could not be opened (it is restarting). False when the domain is gone or refused.
    pub fn is_transient(&self) -> bool {
        match self {
            BackendError::GuestAgentUnavailable { .. } => true,
            BackendError::Libvirt { code, .. } => matches!(
                code,
                ErrorNumberEnum::Known(
                    ErrorNumber::SystemError
                        | ErrorNumber::Rpc
                        | ErrorNumber::NoConnect
                        | ErrorNumber::InternalError
                )
            ),
            _ => false,
        }
    }

    /// True when the VM is gone or stopped ([`BackendError::NotFound`] or
    /// [`BackendError::VmNotRunning`]): waiting on its guest is pointless.
    pub fn is_vm_gone(&self) -> bool {
        matches!(
            self,
            BackendError::NotFound { .. } | BackendError::VmNotRunning { .. }
        )
    }

    /// True for [`BackendError::NotFound`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, BackendError::NotFound { .. })
    }
}

/// libvirt's error number as a name (`OperationInvalid`), or the raw number if unknown.
pub fn code_label(code: ErrorNumberEnum) -> String {
    match code {
        ErrorNumberEnum::Known(n) => format!("{n:?}"),
        ErrorNumberEnum::Unknown(n) => n.to_string(),
    }
}
