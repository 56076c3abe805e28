//! Hardware acceleration choice: KVM where it works, TCG (software emulation) otherwise.

use std::fmt;
use std::str::FromStr;

/// Environment variable that overrides the configured accelerator.
pub const ACCEL_ENV: &str = "AGENTVM_ACCEL";

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AcceleratorChoice {
    /// KVM when `/dev/kvm` is usable and a probe boot succeeds, else TCG.
    #[default]
    Auto,
    /// Always KVM.
    Kvm,
    /// Always TCG (software emulation; slow but works everywhere).
    Tcg,
}

/// The accelerator a domain is defined with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    /// Hardware virtualisation through `/dev/kvm`.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accelerator {
    /// libvirt `<domain type=...>` value.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "qemu",
        }
    }

    /// Short name (`kvm`, `tcg`).
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bad accelerator name.
#[derive(Debug, thiserror::Error)]
#[error("unknown accelerator {0:?}: use auto, kvm or tcg")]
pub struct UnknownAccelerator(String);

impl FromStr for AcceleratorChoice {
    type Err = UnknownAccelerator;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(AcceleratorChoice::Auto),
            "kvm" => Ok(AcceleratorChoice::Kvm),
            "tcg" | "qemu" => Ok(AcceleratorChoice::Tcg),
            other => Err(UnknownAccelerator(other.to_string())),
        }
    }
}

impl AcceleratorChoice {
    /// The choice from [`ACCEL_ENV`], falling back to `configured`.
    pub fn from_env_or(configured: AcceleratorChoice) -> Result<Self, UnknownAccelerator> {
        match std::env::var(ACCEL_ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(configured),
        }
    }
}

/// Whether `/dev/kvm` exists and can be opened read-write.
pub fn kvm_device_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!(
            "TCG".parse::<AcceleratorChoice>().unwrap(),
            AcceleratorChoice::Tcg
        );
        assert_eq!(
            "kvm".parse::<AcceleratorChoice>().unwrap(),
            AcceleratorChoice::Kvm
        );
        assert_eq!(
            "auto".parse::<AcceleratorChoice>().unwrap(),
            AcceleratorChoice::Auto
        );
        let err = "hvf".parse::<AcceleratorChoice>().unwrap_err();
        assert!(err.to_string().contains("auto, kvm or tcg"));
    }
}
