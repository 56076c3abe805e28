//! agentvm's libvirt backend: XML generation, domain lifecycle, guest execution through
//! qemu-guest-agent, and the per-VM files (overlays, logs) that go with each domain.

pub mod accel;
pub mod agent_conn;
pub mod backend;
pub mod error;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
#[cfg(any(test, feature = "fake"))]
pub mod fake_agent;
pub mod filter_guard;
pub mod fork;
pub mod golden;
pub mod guest;
pub mod guest_addr;
pub mod lean;
pub mod libvirt;
pub mod libvirt_net;
pub mod limits;
pub mod netxml;
pub mod reconnect;
pub mod snapshots;
pub mod stats;
pub mod template;
pub mod vm;
pub mod xml;

pub use accel::{Accelerator, AcceleratorChoice};
pub use backend::{Backend, EphemeralVm, LibvirtBackend, VmReport, VmRequest};
pub use error::{BackendError, Result};
pub use golden::{GoldenState, ResetReport, ResetStrategy};
pub use guest::{AgentChannel, ExecOutcome, ExecRequest, Guest, ServedBy, Stream};
pub use libvirt::{Libvirt, PowerState};
pub use limits::{Enforcement, Limit, VmLimits};
pub use stats::DomainStats;
pub use xml::{DiskIoLimits, DomainSpec, NetBandwidth, NicSpec, Owner, OwnerKind};
