//! libvirt network and nwfilter XML generated from `Network` and `NetworkFilter` specs (with an
//! XML writer, never string concatenation), parsed back for ownership, drift checks and tests.
//!
//! # Ownership
//! Networks carry agentvm's `<metadata>` owner element, exactly like domains (see
//! [`crate::xml::owner_element`]). libvirt nwfilters have no `<metadata>`, so a filter is
//! agentvm's when all three hold:
//! 1. its name starts with [`NAME_PREFIX`] (`agentvm-`), so it can never shadow a built-in
//!    filter such as `clean-traffic`;
//! 2. its final layer-2 drop rule carries an ownership record in its `comment` attribute
//!    ([`OWNER_COMMENT_PREFIX`] followed by the owner as JSON: kind, name, spec hash,
//!    generation). libvirt keeps rule comments verbatim (they are part of the filter
//!    definition; ebtables rules do not install them anywhere);
//! 3. its `<uuid>` equals [`filter_uuid`] of (filter name, owner kind, owner name): a
//!    name-based UUID (SHA-256, RFC 9562 version 8) that anybody can recompute. A filter
//!    written by hand with a copied comment but its own UUID is not ours.
//!
//! # What a filter enforces
//! The generated nwfilter (chain `root`) works on two layers, lowest priority first:
//! - layer 2 (ebtables): drop frames whose source MAC is not the interface's (`$MAC`, filled in
//!   by libvirt); with DHCP allowed, anti-spoofing: drop ARP whose sender MAC is not `$MAC` or
//!   whose sender IP is not the guest's leased address (`$IP`), and IPv4 from any source but
//!   `$IP` (DHCP from 0.0.0.0 to the broadcast address excepted, so leases can be had); then
//!   accept ARP (without it guests cannot reach their gateway) and IPv4, drop every other frame
//!   (IPv6 included) in both directions;
//! - IPv4 (iptables): DHCP (udp 68→67 out, 67→68 in from the host only; stateless), replies of connections the
//!   guest opened (conntrack `ESTABLISHED,RELATED`, both directions), DNS (udp and tcp 53) to
//!   the host and nothing else to it (its address on the guest's network comes in as the
//!   interface parameter [`HOST_VARIABLE`]: the host's own services stay out of reach even on
//!   ports the egress rules allow), with domain rules TCP to the egress proxy and udp/tcp to
//!   the DNS filter on the host ([`EGRESS_PROXY_PORT`], [`EGRESS_DNS_PORT`]; domain rules
//!   themselves open nothing else), one accept rule per
//!   egress protocol × port range × destination for `NEW` connections, then drop everything.
//!
//! libvirt's own jumps into these chains go missing for milliseconds whenever it instantiates
//! any filter; [`crate::filter_guard`] keeps guests filtered meanwhile.
//!
//! `$IP` is learned by libvirt from the DHCP exchange with the host (interface parameters
//! `CTRL_IP_LEARNING=dhcp`, `DHCPSERVER=$AGENTVM_HOST`; until then only DHCP passes), and
//! once the guest has its address agentvm pins it as the interface's `IP` parameter
//! ([`crate::NicSpec::ip`]): libvirt's DHCP snooping would otherwise withdraw the address when
//! the lease runs out, and a pool VM reset to its golden state never renews it.
//!
//! Unsolicited inbound traffic from other guests and from beyond the host is therefore dropped,
//! which also keeps guests on the same bridge apart: a connection from one guest to another
//! dies at the receiver's filter. Exception (a libvirt nwfilter property, measured in tier 3):
//! connections the host itself opens to a guest (from its own address on the bridge) are not
//! filtered, since libvirt hooks its chains into FORWARD and INPUT, not OUTPUT.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::Ipv4Addr;

use agentvm_api::{EgressRule, NetworkFilterSpec, NetworkMode, NetworkSpec, Protocol};
use quick_xml::events::{BytesText, Event};
use quick_xml::{Reader, Writer};
use sha2::{Digest, Sha256};

use crate::xml::{owner_element, parse_owner, Owner, OwnerKind};

/// Prefix of every libvirt network and nwfilter name agentvm creates.
pub const NAME_PREFIX: &str = "agentvm-";
/// Prefix of the host bridge devices of agentvm networks.
pub const BRIDGE_PREFIX: &str = "avm-";
/// Longest Linux interface name (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;
/// Start of the `comment` attribute that holds a filter's ownership record.
pub const OWNER_COMMENT_PREFIX: &str = "agentvm-owner:v1:";
/// Longest `comment` libvirt accepts on a filter rule.
pub const MAX_RULE_COMMENT_LEN: usize = 256;
/// Longest egress rule description copied into a rule comment (longer ones are cut).
pub const MAX_DESCRIPTION_COMMENT_LEN: usize = 200;

/// Priorities of the generated rules (libvirt evaluates lower numbers first).
pub mod priority {
    /// Layer 2: drop frames with a spoofed source MAC.
    pub const MAC_SPOOF: i32 = -800;
    /// Layer 2: drop ARP whose sender hardware address is not the interface's MAC.
    pub const ARP_MAC_SPOOF: i32 = -760;
    /// Layer 2: drop ARP whose sender protocol address is not the guest's leased IP.
    pub const ARP_IP_SPOOF: i32 = -750;
    /// Layer 2: accept DHCP discovery/requests sent before the guest has an address
    /// (from 0.0.0.0 to the broadcast address).
    pub const DHCP_UNCONFIGURED: i32 = -740;
    /// Layer 2: drop IPv4 whose source is not the guest's leased IP.
    pub const IP_SPOOF: i32 = -730;
    /// Layer 2: accept ARP.
    pub const ARP: i32 = -700;
    /// Layer 2: hand IPv4 on to the IPv4 rules.
    pub const IPV4: i32 = -650;
    /// IPv4: DHCP.
    pub const DHCP: i32 = 100;
    /// IPv4: replies of connections the guest opened.
    pub const ESTABLISHED: i32 = 200;
    /// IPv4: DNS to the host (the network's dnsmasq).
    pub const HOST_DNS: i32 = 300;
    /// IPv4: the egress proxy on the host, for filters with domain rules.
    pub const HOST_PROXY: i32 = 305;
    /// IPv4: anything else to the host (its own services) is dropped.
    pub const HOST_DROP: i32 = 310;
    /// IPv4: allowed egress.
    pub const EGRESS: i32 = 500;
    /// Both layers: drop the rest.
    pub const DEFAULT_DROP: i32 = 1000;
}

/// Port of agentvm's egress proxy on the host's address of each network. Guests whose filter
/// has domain rules have their TCP to those rules' ports redirected there (an iptables
/// `REDIRECT` in the network's namespace, kept by the controller); their filter lets them
/// reach the host on this port and on nothing else but DNS and DHCP.
pub const EGRESS_PROXY_PORT: u16 = 15080;

/// Port of agentvm's DNS filter on the host's address of each network: guests whose filter
/// has domain rules have their DNS (udp and tcp 53, to any server) redirected there; it
/// answers only names their filter lists (NXDOMAIN otherwise).
pub const EGRESS_DNS_PORT: u16 = 15053;

/// The nwfilter variable holding the host's address on the guest's network (its gateway).
/// Every interface referencing an agentvm filter must set it ([`crate::NicSpec::host`]).
pub const HOST_VARIABLE: &str = "AGENTVM_HOST";

/// libvirt's nwfilter variable holding the guest's IPv4 address. Filters that allow DHCP use
/// it for anti-spoofing: libvirt learns it from the DHCP lease the host's dnsmasq gives
/// (interface parameters [`IP_LEARNING_VARIABLE`]` = dhcp` and [`DHCP_SERVER_VARIABLE`]` =
/// ` the host), and agentvm then pins it on the interface ([`crate::NicSpec::ip`]).
pub const IP_VARIABLE: &str = "IP";
/// libvirt's reserved nwfilter variable choosing how `$IP` is learned.
pub const IP_LEARNING_VARIABLE: &str = "CTRL_IP_LEARNING";
/// libvirt's reserved nwfilter variable naming the DHCP servers whose leases are trusted.
pub const DHCP_SERVER_VARIABLE: &str = "DHCPSERVER";

/// Why a network or filter definition cannot be turned into libvirt XML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetXmlError {
    /// The libvirt object name lacks the `agentvm-` prefix.
    #[error("libvirt name {0:?} must start with `agentvm-` (use `netxml::libvirt_name`)")]
    NameWithoutPrefix(String),
    /// The ownership record does not fit in a libvirt rule comment.
    #[error("ownership record of filter {name:?} is {len} bytes; libvirt allows {max} in a rule comment (owner kind and name too long)")]
    OwnerRecordTooLong {
        /// Filter name.
        name: String,
        /// Record length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// The libvirt name of the network or filter realising manifest object `name`
/// (`agentvm-<name>`; networks and filters live in separate libvirt namespaces).
pub fn libvirt_name(name: &str) -> String {
    format!("{NAME_PREFIX}{name}")
}

/// The host bridge of libvirt network `network_name`: `avm-` and the first 11 hex digits of
/// the name's SHA-256, always 15 characters (the Linux limit), stable across restarts.
pub fn bridge_name(network_name: &str) -> String {
    let digest = Sha256::digest(network_name.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{BRIDGE_PREFIX}{}",
        &hex[..MAX_IFNAME_LEN - BRIDGE_PREFIX.len()]
    )
}

/// The `<uuid>` an agentvm nwfilter named `filter_name` owned by (`owner_kind`,
/// `owner_name`) must have: SHA-256 of the three (NUL-separated, after a fixed label) with
/// the RFC 9562 version-8 and variant bits set.
pub fn filter_uuid(filter_name: &str, owner_kind: &str, owner_name: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        "agentvm.dev/nwfilter-owner/v1",
        filter_name,
        owner_kind,
        owner_name,
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

type W = Writer<Vec<u8>>;

fn finish(w: W) -> String {
    String::from_utf8(w.into_inner()).expect("XML writer emits UTF-8")
}

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

/// A libvirt network to define: its name, the `Network` spec it realises and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    /// libvirt network name (see [`libvirt_name`]).
    pub name: String,
    /// The desired network.
    pub spec: NetworkSpec,
    /// Ownership metadata stamped into `<metadata>`.
    pub owner: Owner,
}

impl NetworkDef {
    /// The host bridge device of this network ([`bridge_name`]).
    pub fn bridge(&self) -> String {
        bridge_name(&self.name)
    }

    /// The libvirt network XML. NAT mode has `<forward mode='nat'/>`; isolated mode has no
    /// `<forward>` at all (guests see the bridge's DHCP/DNS and nothing beyond it).
    pub fn to_xml(&self) -> Result<String, NetXmlError> {
        self.to_xml_with_uuid(None)
    }

    /// [`NetworkDef::to_xml`] with an explicit `<uuid>`: redefining an existing network must
    /// repeat its UUID, or libvirt refuses the name as taken.
    pub fn to_xml_with_uuid(&self, uuid: Option<&str>) -> Result<String, NetXmlError> {
        if !self.name.starts_with(NAME_PREFIX) {
            return Err(NetXmlError::NameWithoutPrefix(self.name.clone()));
        }
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        self.write(&mut w, uuid)
            .expect("writing to a Vec cannot fail");
        Ok(finish(w))
    }

    fn write(&self, w: &mut W, uuid: Option<&str>) -> io::Result<()> {
        let gateway = self.spec.gateway().to_string();
        let netmask = self.spec.subnet.netmask().to_string();
        let range = self.spec.dhcp_range();
        let (start, end) = (range.start.to_string(), range.end.to_string());
        let bridge = self.bridge();
        w.create_element("network").write_inner_content(|w| {
            text(w, "name", &self.name)?;
            if let Some(uuid) = uuid {
                text(w, "uuid", uuid)?;
            }
            w.create_element("metadata").write_inner_content(|w| {
                // `owner_element` is itself produced by an XML writer.
                w.write_event(Event::Text(BytesText::from_escaped(owner_element(
                    &self.owner,
                ))))
            })?;
            if self.spec.mode == NetworkMode::Nat {
                w.create_element("forward")
                    .with_attribute(("mode", "nat"))
                    .write_empty()?;
            }
            w.create_element("bridge")
                .with_attribute(("name", bridge.as_str()))
                .with_attribute(("stp", "on"))
                .with_attribute(("delay", "0"))
                .write_empty()?;
            w.create_element("ip")
                .with_attribute(("address", gateway.as_str()))
                .with_attribute(("netmask", netmask.as_str()))
                .write_inner_content(|w| {
                    w.create_element("dhcp").write_inner_content(|w| {
                        w.create_element("range")
                            .with_attribute(("start", start.as_str()))
                            .with_attribute(("end", end.as_str()))
                            .write_empty()?;
                        Ok(())
                    })?;
                    Ok(())
                })?;
            Ok(())
        })?;
        Ok(())
    }
}

/// A libvirt nwfilter to define: its name, the `NetworkFilter` spec it realises and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NwFilterDef {
    /// libvirt filter name; must start with `agentvm-` (see [`libvirt_name`]).
    pub name: String,
    /// The desired filter.
    pub spec: NetworkFilterSpec,
    /// Owner, recorded in the final drop rule's comment and in the UUID.
    pub owner: Owner,
}

/// The ownership record as stored in a rule comment.
fn owner_comment(owner: &Owner) -> String {
    let record = serde_json::json!({
        "kind": owner.kind.as_str(),
        "name": owner.name,
        "specHash": owner.spec_hash,
        "generation": owner.generation,
    });
    format!("{OWNER_COMMENT_PREFIX}{record}")
}

fn owner_from_comment(comment: &str) -> Option<Owner> {
    let json = comment.strip_prefix(OWNER_COMMENT_PREFIX)?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(Owner {
        kind: OwnerKind::parse(v.get("kind")?.as_str()?)?,
        name: v.get("name")?.as_str()?.to_string(),
        spec_hash: v.get("specHash")?.as_str()?.to_string(),
        generation: v.get("generation")?.as_i64()?,
    })
}

/// A free-text description made fit for a rule comment: control characters become spaces,
/// at most [`MAX_DESCRIPTION_COMMENT_LEN`] bytes (cut at a character boundary).
pub fn description_comment(description: &str) -> String {
    let mut out = String::new();
    for c in description.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_DESCRIPTION_COMMENT_LEN {
            break;
        }
        out.push(c);
    }
    out
}

/// One `<rule>` to write.
struct RuleOut<'a> {
    action: &'static str,
    direction: &'static str,
    priority: i32,
    statematch: bool,
    protocol: &'static str,
    attrs: Vec<(&'static str, String)>,
    comment: Option<&'a str>,
}

impl RuleOut<'_> {
    fn write(&self, w: &mut W) -> io::Result<()> {
        let priority = self.priority.to_string();
        let mut rule = w
            .create_element("rule")
            .with_attribute(("action", self.action))
            .with_attribute(("direction", self.direction))
            .with_attribute(("priority", priority.as_str()));
        if !self.statematch {
            rule = rule.with_attribute(("statematch", "false"));
        }
        rule.write_inner_content(|w| {
            let mut el = w.create_element(self.protocol);
            for (k, v) in &self.attrs {
                el = el.with_attribute((*k, v.as_str()));
            }
            if let Some(c) = self.comment {
                el = el.with_attribute(("comment", c));
            }
            el.write_empty()?;
            Ok(())
        })?;
        Ok(())
    }
}

fn egress_rules<'a>(rule: &'a EgressRule, stateful: bool, out: &mut Vec<RuleOut<'a>>) {
    if !rule.domains.is_empty() {
        // Domain rules allow nothing directly: their traffic is redirected to the egress
        // proxy, which the filter admits once (see `NwFilterDef::rules`).
        return;
    }
    let protocol = match rule.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Icmp => "icmp",
        Protocol::All => "all",
    };
    let ports: Vec<Option<(u16, u16)>> = if rule.protocol.has_ports() && !rule.ports.is_empty() {
        rule.ports.iter().map(|p| Some((p.start, p.end))).collect()
    } else {
        vec![None]
    };
    let dests: Vec<Option<(Ipv4Addr, u8)>> = if rule.destinations.is_empty() {
        vec![None]
    } else {
        rule.destinations
            .iter()
            .map(|d| Some((d.network(), d.prefix_len())))
            .collect()
    };
    for dest in &dests {
        for port in &ports {
            let mut attrs = Vec::new();
            if let Some((addr, prefix)) = dest {
                attrs.push(("dstipaddr", addr.to_string()));
                attrs.push(("dstipmask", prefix.to_string()));
            }
            if let Some((start, end)) = port {
                attrs.push(("dstportstart", start.to_string()));
                attrs.push(("dstportend", end.to_string()));
            }
            if stateful {
                attrs.push(("state", "NEW".to_string()));
            }
            out.push(RuleOut {
                action: "accept",
                direction: "out",
                priority: priority::EGRESS,
                statematch: stateful,
                protocol,
                attrs,
                comment: None,
            });
        }
    }
}

impl NwFilterDef {
    /// The UUID this filter is defined with ([`filter_uuid`]).
    pub fn uuid(&self) -> String {
        filter_uuid(&self.name, self.owner.kind.as_str(), &self.owner.name)
    }

    /// The libvirt nwfilter XML (see the module documentation for the rules).
    pub fn to_xml(&self) -> Result<String, NetXmlError> {
        if !self.name.starts_with(NAME_PREFIX) {
            return Err(NetXmlError::NameWithoutPrefix(self.name.clone()));
        }
        let owner = owner_comment(&self.owner);
        if owner.len() > MAX_RULE_COMMENT_LEN {
            return Err(NetXmlError::OwnerRecordTooLong {
                name: self.name.clone(),
                len: owner.len(),
                max: MAX_RULE_COMMENT_LEN,
            });
        }
        let descriptions: Vec<Option<String>> = self
            .spec
            .egress
            .iter()
            .map(|r| r.description.as_deref().map(description_comment))
            .collect();
        let rules = self.rules(&owner, &descriptions);
        let uuid = self.uuid();
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        w.create_element("filter")
            .with_attribute(("name", self.name.as_str()))
            .with_attribute(("chain", "root"))
            .write_inner_content(|w| {
                text(w, "uuid", &uuid)?;
                for r in &rules {
                    r.write(w)?;
                }
                Ok(())
            })
            .expect("writing to a Vec cannot fail");
        Ok(finish(w))
    }

    fn rules<'a>(&'a self, owner: &'a str, descriptions: &'a [Option<String>]) -> Vec<RuleOut<'a>> {
        let spec = &self.spec;
        let mut rules = vec![RuleOut {
            action: "drop",
            direction: "out",
            priority: priority::MAC_SPOOF,
            statematch: true,
            protocol: "mac",
            attrs: vec![("match", "no".into()), ("srcmacaddr", "$MAC".into())],
            comment: None,
        }];
        if spec.allow_dhcp {
            rules.extend(anti_spoofing_rules());
        }
        rules.extend([
            RuleOut {
                action: "accept",
                direction: "inout",
                priority: priority::ARP,
                statematch: true,
                protocol: "mac",
                attrs: vec![("protocolid", "arp".into())],
                comment: None,
            },
            RuleOut {
                action: "accept",
                direction: "inout",
                priority: priority::IPV4,
                statematch: true,
                protocol: "mac",
                attrs: vec![("protocolid", "ipv4".into())],
                comment: None,
            },
        ]);
        if spec.allow_dhcp {
            // Discovery goes to the broadcast address from 0.0.0.0, renewals to the server;
            // replies are accepted from the host only (a guest answering DHCP from port 67
            // could hand its neighbours a wrong address, gateway or DNS server). Stateless:
            // broadcast replies do not match conntrack.
            rules.push(RuleOut {
                action: "accept",
                direction: "out",
                priority: priority::DHCP,
                statematch: false,
                protocol: "udp",
                attrs: vec![("srcportstart", "68".into()), ("dstportstart", "67".into())],
                comment: None,
            });
            rules.push(RuleOut {
                action: "accept",
                direction: "in",
                priority: priority::DHCP,
                statematch: false,
                protocol: "udp",
                attrs: vec![
                    ("srcipaddr", format!("${HOST_VARIABLE}")),
                    ("srcportstart", "67".into()),
                    ("dstportstart", "68".into()),
                ],
                comment: None,
            });
        }
        if spec.allow_established {
            rules.push(RuleOut {
                action: "accept",
                direction: "inout",
                priority: priority::ESTABLISHED,
                statematch: true,
                protocol: "all",
                attrs: vec![("state", "ESTABLISHED,RELATED".into())],
                comment: None,
            });
        }
        // The host (the network's gateway, `$AGENTVM_HOST`, set on each interface) answers DNS
        // and DHCP and nothing else: its own services (SSH, a metrics port, anything bound to
        // all addresses) stay out of reach even on ports the egress rules allow.
        for protocol in ["udp", "tcp"] {
            let mut attrs = vec![
                ("dstipaddr", format!("${HOST_VARIABLE}")),
                ("dstportstart", "53".into()),
                ("dstportend", "53".into()),
            ];
            if spec.allow_established {
                attrs.push(("state", "NEW".into()));
            }
            rules.push(RuleOut {
                action: "accept",
                direction: "out",
                priority: priority::HOST_DNS,
                statematch: spec.allow_established,
                protocol,
                attrs,
                comment: None,
            });
        }
        let proxies: &[(&'static str, u16)] = if spec.has_domain_rules() {
            &[
                ("tcp", EGRESS_PROXY_PORT),
                ("udp", EGRESS_DNS_PORT),
                ("tcp", EGRESS_DNS_PORT),
            ]
        } else {
            &[]
        };
        for &(protocol, port) in proxies {
            let mut attrs = vec![
                ("dstipaddr", format!("${HOST_VARIABLE}")),
                ("dstportstart", port.to_string()),
                ("dstportend", port.to_string()),
            ];
            if spec.allow_established {
                attrs.push(("state", "NEW".into()));
            }
            rules.push(RuleOut {
                action: "accept",
                direction: "out",
                priority: priority::HOST_PROXY,
                statematch: spec.allow_established,
                protocol,
                attrs,
                comment: None,
            });
        }
        rules.push(RuleOut {
            action: "drop",
            direction: "out",
            priority: priority::HOST_DROP,
            statematch: true,
            protocol: "all",
            attrs: vec![("dstipaddr", format!("${HOST_VARIABLE}"))],
            comment: None,
        });
        for (rule, description) in spec.egress.iter().zip(descriptions) {
            let first = rules.len();
            // Without `allowEstablished`, `statematch='false'` stops libvirt from adding its
            // implicit reverse-direction ESTABLISHED rule: nothing comes back in.
            egress_rules(rule, spec.allow_established, &mut rules);
            for r in &mut rules[first..] {
                r.comment = description.as_deref();
            }
        }
        rules.push(RuleOut {
            action: "drop",
            direction: "inout",
            priority: priority::DEFAULT_DROP,
            statematch: true,
            protocol: "all",
            attrs: Vec::new(),
            comment: None,
        });
        rules.push(RuleOut {
            action: "drop",
            direction: "inout",
            priority: priority::DEFAULT_DROP,
            statematch: true,
            protocol: "mac",
            attrs: Vec::new(),
            comment: Some(owner),
        });
        rules
    }
}

/// Layer-2 anti-spoofing (ebtables, outgoing only): ARP must carry the interface's MAC and the
/// guest's leased address as sender, IPv4 must come from that address (`$IP`), except DHCP sent
/// before the guest has one. Equivalent to libvirt's built-in `no-arp-spoofing` and
/// `no-ip-spoofing`, inlined so the filter does not depend on built-in filters a host may
/// have edited.
fn anti_spoofing_rules<'a>() -> [RuleOut<'a>; 4] {
    let ip = format!("${IP_VARIABLE}");
    [
        RuleOut {
            action: "drop",
            direction: "out",
            priority: priority::ARP_MAC_SPOOF,
            statematch: true,
            protocol: "arp",
            attrs: vec![("match", "no".into()), ("arpsrcmacaddr", "$MAC".into())],
            comment: None,
        },
        RuleOut {
            action: "drop",
            direction: "out",
            priority: priority::ARP_IP_SPOOF,
            statematch: true,
            protocol: "arp",
            attrs: vec![("match", "no".into()), ("arpsrcipaddr", ip.clone())],
            comment: None,
        },
        RuleOut {
            action: "accept",
            direction: "out",
            priority: priority::DHCP_UNCONFIGURED,
            statematch: true,
            protocol: "ip",
            attrs: vec![
                ("srcipaddr", "0.0.0.0".into()),
                ("dstipaddr", "255.255.255.255".into()),
                ("protocol", "udp".into()),
                ("srcportstart", "68".into()),
                ("dstportstart", "67".into()),
            ],
            comment: None,
        },
        RuleOut {
            action: "drop",
            direction: "out",
            priority: priority::IP_SPOOF,
            statematch: true,
            protocol: "ip",
            attrs: vec![("match", "no".into()), ("srcipaddr", ip)],
            comment: None,
        },
    ]
}

/// A libvirt network read back from XML (ours or anybody's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedNetwork {
    /// `<name>`.
    pub name: String,
    /// `<uuid>`, if present.
    pub uuid: Option<String>,
    /// `<forward mode>`; `None` for an isolated network.
    pub forward_mode: Option<String>,
    /// `<bridge name>`.
    pub bridge: Option<String>,
    /// `<ip address>` (the gateway).
    pub address: Option<Ipv4Addr>,
    /// `<ip netmask>`.
    pub netmask: Option<Ipv4Addr>,
    /// `<ip prefix>`, when given instead of a netmask.
    pub prefix: Option<u8>,
    /// First DHCP `<range>` (start, end).
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    /// agentvm's ownership metadata, if present.
    pub owner: Option<Owner>,
}

/// One `<rule>` of an nwfilter read back from XML.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedRule {
    /// `accept`, `drop`, `return`, ...
    pub action: String,
    /// `in`, `out` or `inout`.
    pub direction: String,
    /// The rule priority (libvirt's default is 500).
    pub priority: i32,
    /// `statematch`, if given.
    pub statematch: Option<String>,
    /// The protocol element (`mac`, `tcp`, `udp`, `icmp`, `all`, ...); empty if none.
    pub protocol: String,
    /// The protocol element's attributes, unescaped.
    pub attrs: BTreeMap<String, String>,
}

/// An nwfilter read back from XML (ours or anybody's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedFilter {
    /// `name` attribute.
    pub name: String,
    /// `chain` attribute.
    pub chain: Option<String>,
    /// `<uuid>`.
    pub uuid: Option<String>,
    /// The rules in document order.
    pub rules: Vec<ParsedRule>,
    /// Names of referenced filters (`<filterref filter>`).
    pub filterrefs: Vec<String>,
}

impl ParsedFilter {
    /// The ownership record in a rule comment, without checking name prefix or UUID.
    pub fn recorded_owner(&self) -> Option<Owner> {
        self.rules
            .iter()
            .filter_map(|r| r.attrs.get("comment"))
            .find_map(|c| owner_from_comment(c))
    }

    /// The owner if this filter is agentvm's (prefix, record and UUID all agree; see the
    /// module documentation), else `None`.
    pub fn owner(&self) -> Option<Owner> {
        if !self.name.starts_with(NAME_PREFIX) {
            return None;
        }
        let owner = self.recorded_owner()?;
        let expected = filter_uuid(&self.name, owner.kind.as_str(), &owner.name);
        (self.uuid.as_deref()? == expected).then_some(owner)
    }

    /// The rules without ownership data (comments removed, priorities kept), for comparing
    /// a defined filter with a freshly generated one.
    pub fn rules_without_comments(&self) -> Vec<ParsedRule> {
        self.rules
            .iter()
            .cloned()
            .map(|mut r| {
                r.attrs.remove("comment");
                r
            })
            .collect()
    }
}

/// XML that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed libvirt XML: {0}")]
pub struct ParseError(pub String);

fn attrs_of(e: &quick_xml::events::BytesStart<'_>) -> Result<BTreeMap<String, String>, ParseError> {
    let mut out = BTreeMap::new();
    for a in e.attributes() {
        let a = a.map_err(|e| ParseError(e.to_string()))?;
        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
        let value = a
            .unescape_value()
            .map_err(|e| ParseError(e.to_string()))?
            .into_owned();
        out.insert(key, value);
    }
    Ok(out)
}

/// Walk `xml`, calling `on_element(path, attrs)` for every start/empty element (path = element
/// names from the root) and collecting the unescaped text of elements whose path is wanted.
fn walk(
    xml: &str,
    mut on_element: impl FnMut(&[String], &BTreeMap<String, String>),
    mut on_text: impl FnMut(&[String], &str),
) -> Result<(), ParseError> {
    let mut reader = Reader::from_str(xml);
    let mut path: Vec<String> = Vec::new();
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                on_element(&path, &attrs_of(&e)?);
            }
            Ok(Event::Empty(e)) => {
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
                on_element(&path, &attrs_of(&e)?);
                path.pop();
            }
            Ok(Event::End(_)) => {
                path.pop();
            }
            Ok(Event::Text(t)) => {
                let raw = t.decode().map_err(|e| ParseError(e.to_string()))?;
                let s = quick_xml::escape::unescape(&raw).map_err(|e| ParseError(e.to_string()))?;
                on_text(&path, &s);
            }
            Ok(Event::GeneralRef(r)) => {
                let s = if let Some(c) = r
                    .resolve_char_ref()
                    .map_err(|e| ParseError(e.to_string()))?
                {
                    c.to_string()
                } else {
                    let name = r.decode().map_err(|e| ParseError(e.to_string()))?;
                    quick_xml::escape::resolve_predefined_entity(&name)
                        .ok_or_else(|| ParseError(format!("unknown entity &{name};")))?
                        .to_string()
                };
                on_text(&path, &s);
            }
            Ok(Event::Eof) => return Ok(()),
            Err(e) => return Err(ParseError(e.to_string())),
            _ => {}
        }
    }
}

fn is(path: &[String], want: &[&str]) -> bool {
    path.len() == want.len() && path.iter().zip(want).all(|(a, b)| a == b)
}

/// Parse libvirt network XML (as written by [`NetworkDef::to_xml`] or dumped by libvirt).
pub fn parse_network(xml: &str) -> Result<ParsedNetwork, ParseError> {
    let mut net = ParsedNetwork::default();
    let mut root_seen = false;
    walk(
        xml,
        |path, attrs| {
            if path.len() == 1 {
                root_seen = path[0] == "network";
            }
            let get = |k: &str| attrs.get(k).cloned();
            if is(path, &["network", "forward"]) {
                net.forward_mode = Some(get("mode").unwrap_or_else(|| "nat".into()));
            } else if is(path, &["network", "bridge"]) {
                net.bridge = get("name");
            } else if is(path, &["network", "ip"]) && net.address.is_none() {
                net.address = get("address").and_then(|a| a.parse().ok());
                net.netmask = get("netmask").and_then(|a| a.parse().ok());
                net.prefix = get("prefix").and_then(|a| a.parse().ok());
            } else if is(path, &["network", "ip", "dhcp", "range"]) && net.dhcp_range.is_none() {
                if let (Some(s), Some(e)) = (
                    get("start").and_then(|a| a.parse().ok()),
                    get("end").and_then(|a| a.parse().ok()),
                ) {
                    net.dhcp_range = Some((s, e));
                }
            }
        },
        |path, t| {
            if is(path, &["network", "name"]) {
                net.name.push_str(t);
            } else if is(path, &["network", "uuid"]) {
                net.uuid.get_or_insert_with(String::new).push_str(t.trim());
            }
        },
    )?;
    if !root_seen {
        return Err(ParseError("root element is not <network>".into()));
    }
    net.owner = parse_owner(xml);
    Ok(net)
}

/// Parse libvirt nwfilter XML (as written by [`NwFilterDef::to_xml`] or dumped by libvirt).
pub fn parse_nwfilter(xml: &str) -> Result<ParsedFilter, ParseError> {
    let mut f = ParsedFilter::default();
    let mut root_seen = false;
    walk(
        xml,
        |path, attrs| {
            if path.len() == 1 && path[0] == "filter" {
                root_seen = true;
                f.name = attrs.get("name").cloned().unwrap_or_default();
                f.chain = attrs.get("chain").cloned();
            } else if is(path, &["filter", "rule"]) {
                f.rules.push(ParsedRule {
                    action: attrs.get("action").cloned().unwrap_or_default(),
                    direction: attrs.get("direction").cloned().unwrap_or_default(),
                    priority: attrs
                        .get("priority")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(500),
                    statematch: attrs.get("statematch").cloned(),
                    ..ParsedRule::default()
                });
            } else if path.len() == 3 && path[0] == "filter" && path[1] == "rule" {
                if let Some(rule) = f.rules.last_mut() {
                    rule.protocol = path[2].clone();
                    rule.attrs = attrs.clone();
                }
            } else if is(path, &["filter", "filterref"]) {
                if let Some(name) = attrs.get("filter") {
                    f.filterrefs.push(name.clone());
                }
            }
        },
        |path, t| {
            if is(path, &["filter", "uuid"]) {
                f.uuid.get_or_insert_with(String::new).push_str(t.trim());
            }
        },
    )?;
    if !root_seen {
        return Err(ParseError("root element is not <filter>".into()));
    }
    Ok(f)
}

impl fmt::Display for ParsedRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} prio={} {}",
            self.action, self.direction, self.priority, self.protocol
        )?;
        for (k, v) in &self.attrs {
            write!(f, " {k}={v:?}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::{DhcpRange, Ipv4Cidr, PortRange};

    fn owner(kind: agentvm_api::Kind, name: &str) -> Owner {
        Owner {
            kind: kind.into(),
            name: name.into(),
            spec_hash: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            generation: 7,
        }
    }

    fn nat_def() -> NetworkDef {
        NetworkDef {
            name: libvirt_name("sandbox"),
            spec: NetworkSpec {
                mode: NetworkMode::Nat,
                subnet: "192.168.101.0/24".parse().unwrap(),
                dhcp: None,
            },
            owner: owner(agentvm_api::Kind::Network, "sandbox<&\"'>"),
        }
    }

    fn filter_def(spec: NetworkFilterSpec) -> NwFilterDef {
        NwFilterDef {
            name: libvirt_name("egress"),
            spec,
            owner: owner(agentvm_api::Kind::NetworkFilter, "egress"),
        }
    }

    #[test]
    fn bridge_names_are_short_stable_and_distinct() {
        let a = bridge_name("agentvm-sandbox");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("avm-"));
        assert!(a[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, bridge_name("agentvm-sandbox"));
        assert_ne!(a, bridge_name("agentvm-sandbox2"));
        let long = bridge_name(&"x".repeat(300));
        assert_eq!(long.len(), MAX_IFNAME_LEN);
    }

    #[test]
    fn nat_network_round_trips() {
        let def = nat_def();
        let xml = def.to_xml().unwrap();
        let net = parse_network(&xml).unwrap();
        assert_eq!(net.name, "agentvm-sandbox");
        assert_eq!(net.forward_mode.as_deref(), Some("nat"));
        assert_eq!(net.bridge, Some(def.bridge()));
        assert_eq!(net.address, Some(Ipv4Addr::new(192, 168, 101, 1)));
        assert_eq!(net.netmask, Some(Ipv4Addr::new(255, 255, 255, 0)));
        assert_eq!(
            net.dhcp_range,
            Some((
                Ipv4Addr::new(192, 168, 101, 10),
                Ipv4Addr::new(192, 168, 101, 254)
            ))
        );
        assert_eq!(net.owner, Some(def.owner.clone()));
        assert!(xml.contains("sandbox&lt;&amp;&quot;&apos;&gt;"), "{xml}");
    }

    #[test]
    fn isolated_network_has_no_forward_and_keeps_explicit_dhcp_range() {
        let mut def = nat_def();
        def.spec.mode = NetworkMode::Isolated;
        def.spec.subnet = "10.20.30.0/28".parse().unwrap();
        def.spec.dhcp = Some(DhcpRange {
            start: Ipv4Addr::new(10, 20, 30, 4),
            end: Ipv4Addr::new(10, 20, 30, 6),
        });
        let xml = def.to_xml().unwrap();
        assert!(!xml.contains("<forward"), "{xml}");
        let net = parse_network(&xml).unwrap();
        assert_eq!(net.forward_mode, None);
        assert_eq!(net.address, Some(Ipv4Addr::new(10, 20, 30, 1)));
        assert_eq!(net.netmask, Some(Ipv4Addr::new(255, 255, 255, 240)));
        assert_eq!(
            net.dhcp_range,
            Some((Ipv4Addr::new(10, 20, 30, 4), Ipv4Addr::new(10, 20, 30, 6)))
        );
    }

    #[test]
    fn names_without_prefix_are_refused() {
        let mut def = nat_def();
        def.name = "default".into();
        assert_eq!(
            def.to_xml(),
            Err(NetXmlError::NameWithoutPrefix("default".into()))
        );
        let mut f = filter_def(NetworkFilterSpec::predecessor_default());
        f.name = "clean-traffic".into();
        assert!(matches!(f.to_xml(), Err(NetXmlError::NameWithoutPrefix(_))));
    }

    #[test]
    fn foreign_network_xml_has_no_owner() {
        let xml = "<network><name>default</name><forward mode='nat'/><bridge name='virbr0'/>\
                   <ip address='192.168.122.1' prefix='24'/></network>";
        let net = parse_network(xml).unwrap();
        assert_eq!(net.name, "default");
        assert_eq!(net.prefix, Some(24));
        assert_eq!(net.owner, None);
        assert!(parse_network("<filter name='x'/>").is_err());
    }

    /// The rules of `protocol`, except those protecting the host.
    fn rules_with(f: &ParsedFilter, protocol: &str) -> Vec<ParsedRule> {
        f.rules
            .iter()
            .filter(|r| {
                r.protocol == protocol
                    && r.attrs.get("dstipaddr").map(String::as_str) != Some("$AGENTVM_HOST")
            })
            .cloned()
            .collect()
    }

    #[test]
    fn default_filter_round_trips_with_ownership() {
        let def = filter_def(NetworkFilterSpec::predecessor_default());
        let xml = def.to_xml().unwrap();
        let f = parse_nwfilter(&xml).unwrap();
        assert_eq!(f.name, "agentvm-egress");
        assert_eq!(f.chain.as_deref(), Some("root"));
        assert_eq!(f.uuid.as_deref(), Some(def.uuid().as_str()));
        assert_eq!(f.owner(), Some(def.owner.clone()));
        assert!(
            f.filterrefs.is_empty(),
            "self-contained: no built-in filters needed"
        );

        // tcp 80, 443, 22, 9418 and udp 53, each for NEW connections, with their description.
        let tcp = rules_with(&f, "tcp");
        let ports: Vec<&str> = tcp
            .iter()
            .map(|r| r.attrs["dstportstart"].as_str())
            .collect();
        assert_eq!(ports, ["80", "443", "22", "9418"]);
        for r in &tcp {
            assert_eq!((r.action.as_str(), r.direction.as_str()), ("accept", "out"));
            assert_eq!(r.attrs["state"], "NEW");
            assert_eq!(r.attrs["dstportstart"], r.attrs["dstportend"]);
            assert_eq!(r.priority, priority::EGRESS);
            assert!(!r.attrs.contains_key("dstipaddr"));
        }
        assert_eq!(tcp[1].attrs["comment"], "HTTP and HTTPS");
        let udp = rules_with(&f, "udp");
        let dns: Vec<_> = udp
            .iter()
            .filter(|r| r.attrs.get("dstportstart").map(String::as_str) == Some("53"))
            .collect();
        assert_eq!(dns.len(), 1);
        assert_eq!(dns[0].attrs["comment"], "DNS");

        // DHCP both ways, stateless.
        let dhcp: Vec<_> = f
            .rules
            .iter()
            .filter(|r| r.protocol == "udp" && r.priority == priority::DHCP)
            .collect();
        assert_eq!(dhcp.len(), 2);
        assert!(dhcp
            .iter()
            .all(|r| r.statematch.as_deref() == Some("false")));
        assert!(dhcp.iter().any(|r| r.direction == "out"
            && r.attrs["srcportstart"] == "68"
            && r.attrs["dstportstart"] == "67"));
        assert!(dhcp.iter().any(|r| r.direction == "in"
            && r.attrs["srcportstart"] == "67"
            && r.attrs["dstportstart"] == "68"));

        // Replies in, then drop everything on both layers, ARP and IPv4 let through on layer 2.
        let all: Vec<_> = f
            .rules
            .iter()
            .filter(|r| r.protocol == "all" && !r.attrs.contains_key("dstipaddr"))
            .collect();
        assert_eq!(all[0].attrs["state"], "ESTABLISHED,RELATED");
        assert_eq!(
            (all[0].action.as_str(), all[0].direction.as_str()),
            ("accept", "inout")
        );
        let last_ip = all.last().unwrap();
        assert_eq!(
            (last_ip.action.as_str(), last_ip.direction.as_str()),
            ("drop", "inout")
        );
        assert!(last_ip.attrs.is_empty());
        let mac = rules_with(&f, "mac");
        assert!(mac.iter().any(|r| r.action == "accept"
            && r.attrs.get("protocolid").map(String::as_str) == Some("arp")));
        assert!(mac.iter().any(|r| r.action == "drop"
            && r.attrs.get("srcmacaddr").map(String::as_str) == Some("$MAC")
            && r.attrs["match"] == "no"));
        let l2_drop = mac.last().unwrap();
        assert_eq!(l2_drop.action, "drop");
        assert_eq!(l2_drop.priority, priority::DEFAULT_DROP);
        // Every drop-all rule comes after every accept rule.
        let max_accept = f
            .rules
            .iter()
            .filter(|r| r.action == "accept")
            .map(|r| r.priority)
            .max()
            .unwrap();
        assert!(max_accept < priority::DEFAULT_DROP);
    }

    #[test]
    fn with_dhcp_guests_may_send_only_from_their_mac_and_leased_address() {
        let f = parse_nwfilter(
            &filter_def(NetworkFilterSpec::predecessor_default())
                .to_xml()
                .unwrap(),
        )
        .unwrap();
        let rule = |priority: i32| -> &ParsedRule {
            let found: Vec<&ParsedRule> =
                f.rules.iter().filter(|r| r.priority == priority).collect();
            assert_eq!(found.len(), 1, "one rule at {priority}: {found:?}");
            found[0]
        };
        let summary = |r: &ParsedRule| {
            (
                r.action.clone(),
                r.direction.clone(),
                r.protocol.clone(),
                r.attrs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
            )
        };
        let expect = |a: &str, d: &str, p: &str, attrs: &str| {
            (
                a.to_string(),
                d.to_string(),
                p.to_string(),
                attrs.to_string(),
            )
        };
        assert_eq!(
            summary(rule(priority::ARP_MAC_SPOOF)),
            expect("drop", "out", "arp", "arpsrcmacaddr=$MAC match=no")
        );
        assert_eq!(
            summary(rule(priority::ARP_IP_SPOOF)),
            expect("drop", "out", "arp", "arpsrcipaddr=$IP match=no")
        );
        assert_eq!(
            summary(rule(priority::DHCP_UNCONFIGURED)),
            expect(
                "accept",
                "out",
                "ip",
                "dstipaddr=255.255.255.255 dstportstart=67 protocol=udp srcipaddr=0.0.0.0 srcportstart=68"
            )
        );
        assert_eq!(
            summary(rule(priority::IP_SPOOF)),
            expect("drop", "out", "ip", "match=no srcipaddr=$IP")
        );
        // libvirt evaluates lower priorities first: the spoofing drops come after the MAC
        // check and before layer 2 accepts ARP and IPv4; unconfigured DHCP before the IP check.
        const {
            assert!(priority::MAC_SPOOF < priority::ARP_MAC_SPOOF);
            assert!(priority::ARP_MAC_SPOOF < priority::ARP_IP_SPOOF);
            assert!(priority::ARP_IP_SPOOF < priority::DHCP_UNCONFIGURED);
            assert!(priority::DHCP_UNCONFIGURED < priority::IP_SPOOF);
            assert!(priority::IP_SPOOF < priority::ARP);
            assert!(priority::ARP < priority::IPV4);
        };
        assert_eq!(rule(priority::ARP).attrs["protocolid"], "arp");
        assert_eq!(rule(priority::IPV4).attrs["protocolid"], "ipv4");
        // DHCP answers only from the host.
        let dhcp_in = f
            .rules
            .iter()
            .find(|r| r.priority == priority::DHCP && r.direction == "in")
            .unwrap();
        assert_eq!(dhcp_in.attrs["srcipaddr"], "$AGENTVM_HOST");
    }

    #[test]
    fn without_dhcp_no_rule_needs_the_guest_address() {
        let mut spec = NetworkFilterSpec::predecessor_default();
        spec.allow_dhcp = false;
        let xml = filter_def(spec).to_xml().unwrap();
        assert!(!xml.contains("$IP"), "{xml}");
        let f = parse_nwfilter(&xml).unwrap();
        assert!(f
            .rules
            .iter()
            .any(|r| r.priority == priority::MAC_SPOOF && r.attrs["srcmacaddr"] == "$MAC"));
        assert!(f
            .rules
            .iter()
            .all(|r| r.protocol != "arp" && r.protocol != "ip"));
    }

    #[test]
    fn egress_expands_ports_times_destinations_and_escapes_descriptions() {
        let spec = NetworkFilterSpec {
            egress: vec![
                EgressRule {
                    protocol: Protocol::Tcp,
                    ports: vec![PortRange::single(443), PortRange::range(8000, 8100)],
                    destinations: vec![
                        "140.82.112.0/20".parse::<Ipv4Cidr>().unwrap(),
                        "10.1.2.3/32".parse().unwrap(),
                    ],
                    domains: vec![],
                    description: Some("GitHub <&> \"quoted\" 'single'\nnext line".into()),
                },
                EgressRule {
                    protocol: Protocol::Icmp,
                    ports: vec![],
                    destinations: vec!["198.18.0.0/15".parse().unwrap()],
                    domains: vec![],
                    description: None,
                },
                EgressRule::new(Protocol::All, []),
            ],
            allow_dhcp: false,
            allow_established: true,
        };
        let def = filter_def(spec);
        let xml = def.to_xml().unwrap();
        assert!(!xml.contains("GitHub <&>"), "escaped: {xml}");
        let f = parse_nwfilter(&xml).unwrap();
        let tcp = rules_with(&f, "tcp");
        assert_eq!(tcp.len(), 4);
        let combos: Vec<(String, String, String, String)> = tcp
            .iter()
            .map(|r| {
                (
                    r.attrs["dstipaddr"].clone(),
                    r.attrs["dstipmask"].clone(),
                    r.attrs["dstportstart"].clone(),
                    r.attrs["dstportend"].clone(),
                )
            })
            .collect();
        assert!(combos.contains(&(
            "140.82.112.0".into(),
            "20".into(),
            "443".into(),
            "443".into()
        )));
        assert!(combos.contains(&("10.1.2.3".into(), "32".into(), "8000".into(), "8100".into())));
        for r in &tcp {
            assert_eq!(
                r.attrs["comment"], "GitHub <&> \"quoted\" 'single' next line",
                "control characters become spaces, specials survive the round trip"
            );
        }
        let icmp = rules_with(&f, "icmp");
        assert_eq!(icmp.len(), 1);
        assert_eq!(icmp[0].attrs["dstipaddr"], "198.18.0.0");
        assert!(!icmp[0].attrs.contains_key("dstportstart"));
        let all = rules_with(&f, "all");
        assert!(all
            .iter()
            .any(|r| r.action == "accept" && r.direction == "out" && r.attrs["state"] == "NEW"));
        assert!(
            rules_with(&f, "udp").is_empty(),
            "no DHCP rules when disabled"
        );
        assert_eq!(f.owner(), Some(def.owner));
    }

    #[test]
    fn domain_rules_open_only_the_egress_proxy_on_the_host() {
        let spec = NetworkFilterSpec {
            egress: vec![
                EgressRule::domains(["api.example.com", "*.cdn.example.net"]),
                EgressRule::new(Protocol::Udp, [PortRange::single(123)]),
            ],
            allow_dhcp: true,
            allow_established: true,
        };
        let f = parse_nwfilter(&filter_def(spec).to_xml().unwrap()).unwrap();
        assert!(
            rules_with(&f, "tcp").is_empty(),
            "no tcp accept to anywhere but the host: 443 and 80 reach only the proxy"
        );
        let tcp: Vec<(String, i32, Option<&str>, Option<&str>)> = f
            .rules
            .iter()
            .filter(|r| r.protocol == "tcp")
            .map(|r| {
                (
                    r.action.clone(),
                    r.priority,
                    r.attrs.get("dstipaddr").map(String::as_str),
                    r.attrs.get("dstportstart").map(String::as_str),
                )
            })
            .collect();
        let proxy = EGRESS_PROXY_PORT.to_string();
        let dns = EGRESS_DNS_PORT.to_string();
        assert_eq!(
            tcp,
            [
                (
                    "accept".into(),
                    priority::HOST_DNS,
                    Some("$AGENTVM_HOST"),
                    Some("53")
                ),
                (
                    "accept".into(),
                    priority::HOST_PROXY,
                    Some("$AGENTVM_HOST"),
                    Some(proxy.as_str())
                ),
                (
                    "accept".into(),
                    priority::HOST_PROXY,
                    Some("$AGENTVM_HOST"),
                    Some(dns.as_str())
                ),
            ]
        );
        let udp_host: Vec<Option<&str>> = f
            .rules
            .iter()
            .filter(|r| {
                r.protocol == "udp"
                    && r.action == "accept"
                    && r.attrs.get("dstipaddr").map(String::as_str) == Some("$AGENTVM_HOST")
            })
            .map(|r| r.attrs.get("dstportstart").map(String::as_str))
            .collect();
        assert_eq!(udp_host, [Some("53"), Some(dns.as_str())]);
        assert!(rules_with(&f, "udp").iter().any(|r| r
            .attrs
            .get("dstportstart")
            .map(String::as_str)
            == Some("123")));
        const { assert!(priority::HOST_DNS < priority::HOST_PROXY) };
        const { assert!(priority::HOST_PROXY < priority::HOST_DROP) };
    }

    #[test]
    fn the_host_answers_dns_and_nothing_else_even_on_allowed_ports() {
        let f = parse_nwfilter(
            &filter_def(NetworkFilterSpec::predecessor_default())
                .to_xml()
                .unwrap(),
        )
        .unwrap();
        let host: Vec<&ParsedRule> = f
            .rules
            .iter()
            .filter(|r| r.attrs.get("dstipaddr").map(String::as_str) == Some("$AGENTVM_HOST"))
            .collect();
        let summary: Vec<(String, i32, String, Option<&str>)> = host
            .iter()
            .map(|r| {
                (
                    r.action.clone(),
                    r.priority,
                    r.protocol.clone(),
                    r.attrs.get("dstportstart").map(String::as_str),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "accept".into(),
                    priority::HOST_DNS,
                    "udp".into(),
                    Some("53")
                ),
                (
                    "accept".into(),
                    priority::HOST_DNS,
                    "tcp".into(),
                    Some("53")
                ),
                ("drop".into(), priority::HOST_DROP, "all".into(), None),
            ]
        );
        // Before every egress accept (lower priority numbers are evaluated first), after
        // DHCP and replies.
        const { assert!(priority::ESTABLISHED < priority::HOST_DNS) };
        const { assert!(priority::HOST_DROP < priority::EGRESS) };
        assert!(host.iter().all(|r| r.direction == "out"));
    }

    #[test]
    fn without_established_egress_is_stateless_and_nothing_comes_back() {
        let mut spec = NetworkFilterSpec::predecessor_default();
        spec.allow_established = false;
        let f = parse_nwfilter(&filter_def(spec).to_xml().unwrap()).unwrap();
        assert!(f.rules.iter().all(|r| !r
            .attrs
            .get("state")
            .is_some_and(|s| s.contains("ESTABLISHED"))));
        for r in rules_with(&f, "tcp") {
            assert_eq!(r.statematch.as_deref(), Some("false"));
            assert!(!r.attrs.contains_key("state"));
        }
    }

    #[test]
    fn long_descriptions_are_cut_at_a_character_boundary() {
        let long = "é".repeat(300);
        let c = description_comment(&long);
        assert!(c.len() <= MAX_DESCRIPTION_COMMENT_LEN);
        assert!(c.chars().all(|ch| ch == 'é'));
    }

    #[test]
    fn filter_ownership_needs_prefix_record_and_matching_uuid() {
        let def = filter_def(NetworkFilterSpec::predecessor_default());
        let xml = def.to_xml().unwrap();
        let ours = parse_nwfilter(&xml).unwrap();
        assert!(ours.owner().is_some());

        // Same rules, another UUID (e.g. copied by hand): not ours.
        let mut copied = ours.clone();
        copied.uuid = Some("00000000-0000-4000-8000-000000000000".into());
        assert_eq!(copied.owner(), None);
        assert!(copied.recorded_owner().is_some());

        // Renamed: the UUID no longer matches.
        let mut renamed = ours.clone();
        renamed.name = "agentvm-other".into();
        assert_eq!(renamed.owner(), None);

        // Built-in filters are never ours.
        let builtin = parse_nwfilter(
            "<filter name='allow-arp' chain='arp'><uuid>d0a9ef6c-cb27-486b-8f5c-93be42a6f42b</uuid>\
             <rule direction='inout' action='accept'/></filter>",
        )
        .unwrap();
        assert_eq!(builtin.owner(), None);
        assert_eq!(builtin.rules.len(), 1);
        assert_eq!(builtin.rules[0].protocol, "");
    }

    #[test]
    fn filter_uuid_is_a_stable_version_8_uuid() {
        let u = filter_uuid("agentvm-egress", "NetworkFilter", "egress");
        assert_eq!(u, filter_uuid("agentvm-egress", "NetworkFilter", "egress"));
        assert_ne!(u, filter_uuid("agentvm-egress", "NetworkFilter", "egress2"));
        assert_ne!(u, filter_uuid("agentvm-egres", "NetworkFilter", "segress"));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn owner_record_with_special_characters_round_trips() {
        let mut def = filter_def(NetworkFilterSpec::predecessor_default());
        def.owner = owner(agentvm_api::Kind::NetworkFilter, "a<&\"'>b");
        let f = parse_nwfilter(&def.to_xml().unwrap()).unwrap();
        assert_eq!(f.owner(), Some(def.owner.clone()));
        def.owner.name = "n".repeat(250);
        assert!(matches!(
            def.to_xml(),
            Err(NetXmlError::OwnerRecordTooLong { .. })
        ));
    }

    #[test]
    fn regenerated_rules_compare_equal_without_comments() {
        let a = filter_def(NetworkFilterSpec::predecessor_default());
        let mut b = a.clone();
        b.owner.generation = 8;
        let pa = parse_nwfilter(&a.to_xml().unwrap()).unwrap();
        let pb = parse_nwfilter(&b.to_xml().unwrap()).unwrap();
        assert_ne!(pa.rules, pb.rules);
        assert_eq!(pa.rules_without_comments(), pb.rules_without_comments());
    }
}
