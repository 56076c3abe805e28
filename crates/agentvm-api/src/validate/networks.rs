//! Validation of Network and NetworkFilter specs.

use super::*;

impl Validator {
    pub(super) fn network(&mut self, path: &FieldPath, spec: &NetworkSpec) {
        let subnet = spec.subnet;
        let sp = path.key("subnet");
        if subnet.prefix_len() < network::MIN_SUBNET_PREFIX
            || subnet.prefix_len() > network::MAX_SUBNET_PREFIX
        {
            self.error(
                sp.clone(),
                format!(
                    "prefix /{} is out of range; use a prefix from /{} to /{}, e.g. `192.168.101.0/24`",
                    subnet.prefix_len(),
                    network::MIN_SUBNET_PREFIX,
                    network::MAX_SUBNET_PREFIX
                ),
            );
            return;
        }
        if subnet.has_host_bits() {
            self.error(
                sp,
                format!(
                    "`{subnet}` has host bits set; write the network address `{}`",
                    subnet.normalized()
                ),
            );
            return;
        }
        let Some(dhcp) = spec.dhcp else { return };
        let dp = path.key("dhcp");
        let gateway = spec.gateway();
        let first = subnet.nth(2).unwrap_or(gateway);
        let last = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
        let mut ok = true;
        for (field, addr) in [("start", dhcp.start), ("end", dhcp.end)] {
            let p = dp.key(field);
            let problem = if !subnet.contains(addr) {
                Some(format!("{addr} is outside the subnet {subnet}"))
            } else if addr == subnet.network() {
                Some(format!("{addr} is the subnet's network address"))
            } else if addr == gateway {
                Some(format!(
                    "{addr} is the gateway (the host's address on the network)"
                ))
            } else if addr == subnet.broadcast() {
                Some(format!("{addr} is the broadcast address"))
            } else {
                None
            };
            if let Some(problem) = problem {
                ok = false;
                self.error(
                    p,
                    format!("{problem}; pick an address from {first} to {last}"),
                );
            }
        }
        if ok && u32::from(dhcp.start) > u32::from(dhcp.end) {
            self.error(
                dp,
                format!("start {} is after end {}; swap them", dhcp.start, dhcp.end),
            );
        }
    }

    pub(super) fn network_filter(&mut self, path: &FieldPath, spec: &NetworkFilterSpec) {
        let ep = path.key("egress");
        if spec.egress.len() > network_filter::MAX_EGRESS_RULES {
            self.error(
                ep.clone(),
                format!(
                    "{} rules; a filter holds at most {} (use port ranges and CIDRs to combine rules)",
                    spec.egress.len(),
                    network_filter::MAX_EGRESS_RULES
                ),
            );
        }
        let domains: usize = spec.egress.iter().map(|r| r.domains.len()).sum();
        if domains > network_filter::MAX_DOMAINS {
            self.error(
                ep.clone(),
                format!(
                    "{domains} domain names; a filter holds at most {} (use `*.` wildcards to combine names)",
                    network_filter::MAX_DOMAINS
                ),
            );
        }
        for (i, rule) in spec.egress.iter().enumerate() {
            let rp = ep.index(i);
            if !rule.domains.is_empty() {
                if rule.protocol != network_filter::Protocol::Tcp {
                    self.error(
                        rp.key("protocol"),
                        format!(
                            "`{}` with `domains`; domain rules are tcp only (names are read from TLS SNI or the HTTP Host header)",
                            rule.protocol.as_str()
                        ),
                    );
                }
                if !rule.destinations.is_empty() {
                    self.error(
                        rp.key("destinations"),
                        "cannot be combined with `domains` (the proxy checks that the address belongs to the name); put addresses in a rule of their own",
                    );
                }
                for (j, d) in rule.domains.iter().enumerate() {
                    if let Some(problem) = network_filter::domain_pattern_problem(d) {
                        self.error(rp.key("domains").index(j), problem);
                    }
                }
            }
            if !rule.protocol.has_ports() && !rule.ports.is_empty() {
                self.error(
                    rp.key("ports"),
                    format!(
                        "ports only apply to tcp and udp, not `{}`; remove `ports` or change `protocol`",
                        rule.protocol.as_str()
                    ),
                );
            } else {
                for (j, port) in rule.ports.iter().enumerate() {
                    let pp = rp.key("ports").index(j);
                    if port.start == 0 || port.end == 0 {
                        self.error(pp, "port 0 is not a valid port; use 1 to 65535");
                    } else if port.start > port.end {
                        self.error(
                            pp,
                            format!(
                                "range {}-{} is reversed; write \"{}-{}\"",
                                port.start, port.end, port.end, port.start
                            ),
                        );
                    }
                }
            }
            for (j, cidr) in rule.destinations.iter().enumerate() {
                if cidr.has_host_bits() {
                    self.error(
                        rp.key("destinations").index(j),
                        format!(
                            "`{cidr}` has host bits set; write `{}` (the network) or `{}/32` (one address)",
                            cidr.normalized(),
                            cidr.addr()
                        ),
                    );
                }
            }
            if let Some(d) = &rule.description {
                if d.len() > 1024 {
                    self.error(
                        rp.key("description"),
                        "is longer than 1024 bytes; shorten it",
                    );
                }
            }
        }
    }
}
