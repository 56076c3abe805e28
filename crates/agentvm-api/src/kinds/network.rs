//! `Network`: a libvirt network guests attach to (NAT or isolated).

use std::net::Ipv4Addr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;
use crate::net::Ipv4Cidr;

resource_object!(
    /// A libvirt network: a bridge with DHCP/DNS (dnsmasq) and, in `nat`
    /// mode, outbound NAT. Pools attach VMs to it with a `NetworkFilter`.
    Network,
    NetworkSpec,
    NetworkStatus
);

/// Smallest subnet prefix accepted (a /8).
pub const MIN_SUBNET_PREFIX: u8 = 8;
/// Largest subnet prefix accepted (a /29 leaves 5 usable guest addresses).
pub const MAX_SUBNET_PREFIX: u8 = 29;

/// Desired state of a `Network`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSpec {
    /// `nat` (default): guests reach the outside through NAT on the host,
    /// restricted by the pool's `NetworkFilter`. `isolated`: guests reach only
    /// the host's DHCP/DNS on this bridge, nothing beyond it.
    #[serde(default)]
    pub mode: NetworkMode,
    /// IPv4 subnet in CIDR notation, e.g. `192.168.101.0/24` (prefix /8 to
    /// /29, no host bits). The host side of the bridge (the guests' gateway,
    /// DHCP and DNS server) takes the first address, e.g. `192.168.101.1`.
    pub subnet: Ipv4Cidr,
    /// Addresses handed out by DHCP. Default: from the 10th address of the
    /// subnet (the 2nd in subnets smaller than /27) to the last one before the
    /// broadcast address, e.g. `192.168.101.10`-`192.168.101.254`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpRange>,
}

/// How a `Network` connects guests to the outside.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    /// Outbound NAT through the host (restricted by a `NetworkFilter`).
    #[default]
    Nat,
    /// No forwarding: guests see only the bridge (DHCP/DNS on the host).
    Isolated,
}

/// An inclusive range of IPv4 addresses handed out by DHCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DhcpRange {
    /// First address handed out, e.g. `192.168.101.10`.
    pub start: Ipv4Addr,
    /// Last address handed out (inclusive), e.g. `192.168.101.254`.
    pub end: Ipv4Addr,
}

impl NetworkSpec {
    /// The host's address on the bridge: the subnet's first address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.nth(1).unwrap_or(self.subnet.network())
    }

    /// The DHCP range in effect: the explicit one or the documented default.
    pub fn dhcp_range(&self) -> DhcpRange {
        if let Some(range) = self.dhcp {
            return range;
        }
        let first = if self.subnet.size() >= 32 { 10 } else { 2 };
        let size = self.subnet.size().min(u64::from(u32::MAX)) as u32;
        DhcpRange {
            start: self.subnet.nth(first).unwrap_or(self.gateway()),
            end: self
                .subnet
                .nth(size.saturating_sub(2))
                .unwrap_or(self.gateway()),
        }
    }
}

/// Lifecycle phase of a `Network`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum NetworkPhase {
    /// Not created yet.
    #[default]
    Pending,
    /// Defined and active in libvirt.
    Ready,
    /// Could not be created; see `conditions`.
    Failed,
}

/// Observed state of a `Network`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// Where the network is in its lifecycle.
    #[serde(default)]
    pub phase: NetworkPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the libvirt network backing this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_name: Option<String>,
    /// Host bridge device, e.g. `avm-br0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
}
