//! `NetworkFilter`: an egress allow-list applied to VM interfaces.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{default_true, resource_object};
use crate::meta::Condition;
use crate::net::{Ipv4Cidr, PortRange};

resource_object!(
    /// An egress allow-list for guest interfaces, rendered as a libvirt
    /// nwfilter: listed outbound traffic is accepted, replies to it come back
    /// in (established/related), everything else is dropped.
    NetworkFilter,
    NetworkFilterSpec,
    NetworkFilterStatus
);

/// Most egress rules one filter may hold.
pub const MAX_EGRESS_RULES: usize = 256;

/// Desired state of a `NetworkFilter`. Anything not allowed here is
/// dropped (there is no way to change the default action).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkFilterSpec {
    /// Outbound traffic that is allowed. Empty: nothing leaves the guest
    /// (apart from DHCP when `allowDhcp` is true).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub egress: Vec<EgressRule>,
    /// Let DHCP through (udp 67/68 between the guest and the network's
    /// gateway, plus the broadcast discovery), so guests get an address.
    /// Default true; turn off only for statically configured guests.
    #[serde(default = "default_true")]
    pub allow_dhcp: bool,
    /// Accept inbound packets of connections the guest opened
    /// (conntrack ESTABLISHED,RELATED); unsolicited inbound traffic is always
    /// dropped. Default true — without it, allowed egress gets no replies.
    #[serde(default = "default_true")]
    pub allow_established: bool,
}

/// Transport protocol an egress rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (ports apply).
    Tcp,
    /// UDP (ports apply).
    Udp,
    /// ICMP, e.g. ping (no ports).
    Icmp,
    /// Every IP protocol (no ports).
    All,
}

impl Protocol {
    /// True for protocols that have ports (tcp, udp).
    pub fn has_ports(&self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }

    /// Lowercase name as written in manifests.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::All => "all",
        }
    }
}

/// One allowed kind of outbound traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// `tcp`, `udp`, `icmp` or `all`.
    pub protocol: Protocol,
    /// Destination ports for `tcp`/`udp`: numbers (`443`) or ranges
    /// (`"8000-8100"`). Empty: every port. Must be empty for `icmp`/`all`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortRange>,
    /// Destination IPv4 networks in CIDR notation (`140.82.112.0/20`).
    /// Empty: any destination.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Ipv4Cidr>,
    /// Why this rule exists (free text, shown in `describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl EgressRule {
    /// A rule for `protocol` to `ports` on any destination.
    pub fn new(protocol: Protocol, ports: impl IntoIterator<Item = PortRange>) -> Self {
        Self {
            protocol,
            ports: ports.into_iter().collect(),
            destinations: Vec::new(),
            description: None,
        }
    }

    fn described(mut self, text: &str) -> Self {
        self.description = Some(text.to_string());
        self
    }
}

impl NetworkFilterSpec {
    /// The predecessor's `agent-network-filter`: DNS (udp 53), HTTP/HTTPS
    /// (tcp 80, 443), SSH and git (tcp 22, 9418), replies in, everything else
    /// dropped — plus DHCP to the gateway, which the predecessor forgot.
    pub fn predecessor_default() -> Self {
        Self {
            egress: vec![
                EgressRule::new(Protocol::Udp, [PortRange::single(53)]).described("DNS"),
                EgressRule::new(
                    Protocol::Tcp,
                    [PortRange::single(80), PortRange::single(443)],
                )
                .described("HTTP and HTTPS"),
                EgressRule::new(
                    Protocol::Tcp,
                    [PortRange::single(22), PortRange::single(9418)],
                )
                .described("git over SSH and the git protocol"),
            ],
            allow_dhcp: true,
            allow_established: true,
        }
    }
}

/// Lifecycle phase of a `NetworkFilter`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum NetworkFilterPhase {
    /// Not defined yet.
    #[default]
    Pending,
    /// Defined in libvirt.
    Ready,
    /// Could not be defined; see `conditions`.
    Failed,
}

/// Observed state of a `NetworkFilter`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkFilterStatus {
    /// Where the filter is in its lifecycle.
    #[serde(default)]
    pub phase: NetworkFilterPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Ready`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the libvirt nwfilter backing this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_name: Option<String>,
}
