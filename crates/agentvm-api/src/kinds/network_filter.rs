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

/// Most domain names (over all rules) one filter may hold.
pub const MAX_DOMAINS: usize = 1000;

/// Ports a domain rule allows when it lists none: HTTPS and HTTP.
pub const DEFAULT_DOMAIN_PORTS: [u16; 2] = [443, 80];

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
    /// Empty: any destination. Not allowed together with `domains`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Ipv4Cidr>,
    /// Destination domain names (`api.anthropic.com`) or wildcards of one or more labels
    /// (`*.githubusercontent.com`, which does not match `githubusercontent.com` itself).
    /// Only with `protocol: tcp`; `ports` defaults to 443 and 80. Connections are steered to
    /// agentvm's egress proxy on the host, which reads the name from the TLS ClientHello
    /// (SNI) or the HTTP `Host` header, checks it against this list, resolves it and
    /// connects only if the guest's destination address is among the answers. At most 1000
    /// names per filter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<String>,
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
            domains: Vec::new(),
            description: None,
        }
    }

    /// A rule allowing TCP to `domains` on the default ports (443 and 80).
    pub fn domains<S: Into<String>>(domains: impl IntoIterator<Item = S>) -> Self {
        Self {
            protocol: Protocol::Tcp,
            ports: Vec::new(),
            destinations: Vec::new(),
            domains: domains.into_iter().map(Into::into).collect(),
            description: None,
        }
    }

    /// The ports this rule allows when it is a domain rule: `ports`, or 443 and 80.
    pub fn domain_ports(&self) -> Vec<PortRange> {
        if self.ports.is_empty() {
            DEFAULT_DOMAIN_PORTS
                .iter()
                .map(|p| PortRange::single(*p))
                .collect()
        } else {
            self.ports.clone()
        }
    }

    /// True if `name` (a DNS name, any case, no trailing dot) is one of `domains` or falls
    /// under one of its wildcards.
    pub fn allows_domain(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        self.domains.iter().any(|d| domain_matches(d, &name))
    }

    fn described(mut self, text: &str) -> Self {
        self.description = Some(text.to_string());
        self
    }
}

/// The most a wildcard's `*` stands for: one or more labels, at most this many bytes in all.
/// Longer names under an allowed wildcard are what DNS tunnels look like (data encoded in
/// the labels of queries that the allowed domain's servers get to see), and host names
/// people use are far shorter.
pub const MAX_WILDCARD_HEAD: usize = 63;

/// True if lowercase `name` matches pattern `pattern` (an exact name, or `*.suffix`: any name
/// of one or more labels, [`MAX_WILDCARD_HEAD`] bytes at most, followed by `.suffix`).
/// Case-insensitive in the pattern.
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    wildcard_head(pattern, name).map_or_else(
        || pattern.eq_ignore_ascii_case(name),
        |head| head.len() <= MAX_WILDCARD_HEAD,
    )
}

/// True if lowercase `name` falls under wildcard `pattern` but is longer than
/// [`MAX_WILDCARD_HEAD`] allows (refused as a likely tunnel).
pub fn domain_overlong_under(pattern: &str, name: &str) -> bool {
    wildcard_head(pattern, name).is_some_and(|head| head.len() > MAX_WILDCARD_HEAD)
}

/// The part of `name` a wildcard `pattern` (`*.suffix`) would stand for; `None` when
/// `pattern` is no wildcard or `name` is not under it.
fn wildcard_head<'n>(pattern: &str, name: &'n str) -> Option<&'n str> {
    let suffix = pattern.strip_prefix("*.")?;
    if name.len() <= suffix.len() + 1 {
        return None;
    }
    let (head, tail) = name.split_at(name.len() - suffix.len() - 1);
    (tail.as_bytes()[0] == b'.' && tail[1..].eq_ignore_ascii_case(suffix) && !head.is_empty())
        .then_some(head)
}

/// Why a string is not a valid domain pattern for an egress rule (`None`: it is valid).
pub fn domain_pattern_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("is empty; write a name such as `api.example.com`".into());
    }
    if pattern.len() > 253 {
        return Some(format!(
            "is {} bytes; a DNS name has at most 253",
            pattern.len()
        ));
    }
    if pattern.ends_with('.') {
        return Some(format!(
            "`{pattern}` ends with a dot; write `{}`",
            pattern.trim_end_matches('.')
        ));
    }
    if pattern.parse::<std::net::IpAddr>().is_ok()
        || pattern
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
    {
        return Some(format!(
            "`{pattern}` is an IP address, not a domain name; allow addresses with `destinations` (CIDR) in a rule without `domains`"
        ));
    }
    let (wild, rest) = match pattern.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, pattern),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    for label in &labels {
        if label.contains('*') {
            return Some(format!(
                "`{pattern}` has a `*` that is not the whole first label; only a leading `*.` wildcard is supported (e.g. `*.example.com`)"
            ));
        }
        if label.is_empty() {
            return Some(format!("`{pattern}` has an empty label (`..`)"));
        }
        if label.len() > 63 {
            return Some(format!(
                "`{pattern}` has a label of {} characters; a label has at most 63",
                label.len()
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Some(format!(
                "`{pattern}` has characters other than letters, digits, `-` and `_` (write internationalised names in their `xn--` form)"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some(format!(
                "`{pattern}` has a label starting or ending with `-`"
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!(
            "`{pattern}` ends in a numeric label, which no domain name does; for addresses use `destinations`"
        ));
    }
    if labels.len() < 2 {
        return Some(if wild {
            format!(
                "`{pattern}` matches a whole top-level domain; name at least two labels after `*.`"
            )
        } else {
            format!("`{pattern}` is a single label; write a fully qualified name such as `{pattern}.example.com`")
        });
    }
    None
}

impl NetworkFilterSpec {
    /// True if any egress rule lists domains: the filter's TCP goes through the egress proxy.
    pub fn has_domain_rules(&self) -> bool {
        self.egress.iter().any(|r| !r.domains.is_empty())
    }

    /// True if the filter lets TCP to `name` on `port` through the egress proxy.
    pub fn allows_domain(&self, name: &str, port: u16) -> bool {
        self.egress.iter().any(|r| {
            !r.domains.is_empty()
                && r.domain_ports()
                    .iter()
                    .any(|p| p.start <= port && port <= p.end)
                && r.allows_domain(name)
        })
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_a_bounded_head_and_longer_names_are_tunnels() {
        assert!(domain_matches("*.example.com", "a.example.com"));
        assert!(domain_matches("*.Example.com", "a.b.example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(!domain_matches("*.example.com", "aexample.com"));
        assert!(domain_matches("api.example.com", "api.example.com"));
        let head = "x".repeat(MAX_WILDCARD_HEAD);
        assert!(domain_matches(
            "*.example.com",
            &format!("{head}.example.com")
        ));
        let tunnel = format!("{}.{}.example.com", "a".repeat(40), "b".repeat(40));
        assert!(!domain_matches("*.example.com", &tunnel));
        assert!(domain_overlong_under("*.example.com", &tunnel));
        assert!(!domain_overlong_under("*.example.com", "a.example.com"));
        assert!(!domain_overlong_under("api.example.com", &tunnel));
    }
}
