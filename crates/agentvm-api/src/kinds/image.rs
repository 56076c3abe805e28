//! `Image`: a guest disk image built reproducibly from a base distribution.

use crate::time::Timestamp;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;

resource_object!(
    /// A guest image: a qcow2 base disk (plus kernel/initrd) built from a
    /// base distribution with extra packages and setup commands. Pools boot
    /// copy-on-write overlays of it.
    Image,
    ImageSpec,
    ImageStatus
);

/// Default base suite.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Default image disk size in MiB.
pub const DEFAULT_DISK_SIZE_MIB: u32 = 2048;
/// Smallest image disk, MiB.
pub const MIN_DISK_SIZE_MIB: u32 = 1024;
/// Largest image disk, MiB (256 GiB).
pub const MAX_DISK_SIZE_MIB: u32 = 262_144;
/// Debian suites the image builder knows.
pub const KNOWN_DEBIAN_SUITES: &[&str] = &[
    "bullseye",
    "bookworm",
    "trixie",
    "forky",
    "sid",
    "oldstable",
    "stable",
    "testing",
    "unstable",
];

fn default_suite() -> String {
    DEFAULT_SUITE.to_string()
}

fn default_disk_size_mib() -> u32 {
    DEFAULT_DISK_SIZE_MIB
}

/// Desired state of an `Image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageSpec {
    /// Base distribution. Only `debian` is supported (default).
    #[serde(default)]
    pub distro: Distro,
    /// Release of the distribution, e.g. `bookworm` (default) or `trixie`.
    #[serde(default = "default_suite")]
    pub suite: String,
    /// Extra packages installed on top of the minimal base, e.g.
    /// `[git, python3, nodejs, npm]`. A version pin `name=version` is allowed.
    /// `qemu-guest-agent` is always installed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Shell commands run as root inside the image after the packages are
    /// installed, in order, e.g. `npm install -g @anthropic-ai/claude-code`.
    /// The build fails if one exits non-zero.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup_commands: Vec<String>,
    /// Which kernel boots the guest: `host` (default; the host's kernel
    /// and a generated initrd, fastest to build) or `distro` (the
    /// distribution's own kernel package installed in the image).
    #[serde(default)]
    pub kernel: KernelSource,
    /// Size of the image's disk and root file system in MiB (1024 to
    /// 262144). Default 2048. It is only the base: each VM's disk is an
    /// overlay with its pool's `diskGib` (which must be at least this), and
    /// the guest grows its file system to that size at boot.
    #[serde(default = "default_disk_size_mib")]
    #[schemars(range(min = 1024, max = 262_144))]
    pub disk_size_mib: u32,
    /// Package mirror URL (`http://` or `https://`), e.g. a local apt cache.
    /// Default: the distribution's official mirror.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
}

impl Default for ImageSpec {
    fn default() -> Self {
        Self {
            distro: Distro::default(),
            suite: default_suite(),
            packages: Vec::new(),
            setup_commands: Vec::new(),
            kernel: KernelSource::default(),
            disk_size_mib: DEFAULT_DISK_SIZE_MIB,
            mirror: None,
        }
    }
}

/// Base distribution of an `Image`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Distro {
    /// Debian GNU/Linux, bootstrapped with debootstrap/mmdebstrap.
    #[default]
    Debian,
}

/// Where an `Image`'s kernel comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KernelSource {
    /// The host's kernel (the newest `/boot/vmlinuz-*` with its initrd and modules), booted
    /// directly. The only choice for now.
    #[default]
    Host,
}

/// Lifecycle phase of an `Image`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ImagePhase {
    /// Not built yet.
    #[default]
    Pending,
    /// Being built.
    Building,
    /// Built and usable by pools.
    Ready,
    /// The build failed; see `conditions`.
    Failed,
}

/// Observed state of an `Image`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// Where the image is in its lifecycle.
    #[serde(default)]
    pub phase: ImagePhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, `Built`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Path of the built qcow2 on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_path: Option<String>,
    /// Path of the kernel the image boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_path: Option<String>,
    /// Path of the initrd the image boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// sha256 of the built disk, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Spec hash the current build was made from (see `spec_hash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_spec_hash: Option<String>,
    /// When the build finished (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_at: Option<Timestamp>,
}
