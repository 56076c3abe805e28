//! The image builder's error type: every variant says what failed and where.

use std::path::PathBuf;

/// What went wrong while resolving, looking up or building a guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Building needs root (debootstrap, mount, chroot).
    #[error("building a guest image needs root (debootstrap, mount and chroot); run it as root, e.g. with sudo")]
    NotRoot,

    /// A host tool the build needs is not installed.
    #[error("`{tool}` is not installed (or not on PATH); install it with `apt-get install --no-install-recommends {package}`")]
    MissingTool {
        /// The executable that was looked for.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },

    /// No kernel could be found or identified.
    #[error("no usable guest kernel: {reason} ({path}); install one with `apt-get install --no-install-recommends linux-image-cloud-amd64` or give the kernel and initrd paths")]
    Kernel {
        /// The file or directory that was examined.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },

    /// The `agentvm-guest` binary to install into images was not found.
    #[error("agentvm-guest (agentvm's guest agent, installed into every image) not found; looked at {}. Build it with `cargo build -p agentvm-guest` (it belongs next to the agentvm binary) or set AGENTVM_GUEST_BIN to its path", looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    GuestAgentMissing {
        /// Where it was looked for.
        looked: Vec<PathBuf>,
    },

    /// The recipe itself is unusable.
    #[error("invalid image recipe: {field}: {reason}")]
    InvalidRecipe {
        /// The recipe field at fault.
        field: &'static str,
        /// Why, and how to fix it.
        reason: String,
    },

    /// An external command could not be started.
    #[error("could not run `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// An external command exited unsuccessfully.
    #[error("`{command}` failed ({status}){}", format_tail(.output_tail))]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status, e.g. `exit status: 1`.
        status: String,
        /// The last lines of its error output (and of its log, where there is one).
        output_tail: Vec<String>,
    },

    /// A file system operation failed.
    #[error("{action} {}: {source}", .path.display())]
    Io {
        /// What was being done, e.g. "creating directory".
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A cached image's metadata is unreadable.
    #[error("image metadata {} is corrupt: {reason}; delete that image directory and build again", .path.display())]
    CorruptMetadata {
        /// The image.json path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// Something is still mounted inside a build directory, so it was not removed.
    #[error("{} still has file systems mounted below it ({mounts}); unmount them (umount -R) and remove it by hand", .path.display())]
    StillMounted {
        /// The directory that could not be removed.
        path: PathBuf,
        /// The mount points still present.
        mounts: String,
    },
}

fn format_tail(tail: &[String]) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; last output:\n  {}", tail.join("\n  "))
    }
}

impl ImageError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        ImageError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
