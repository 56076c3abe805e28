//! The iptables rules that steer domain-filtered guests' TCP to the egress proxy: one nat
//! chain, [`CHAIN`], jumped to from `PREROUTING`, rewritten as a whole (atomically, with
//! `iptables-restore --noflush`) whenever the set of guests or their ports changes. Runs the
//! commands in the calling thread's network namespace.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use agentvm_backend::filter_guard::{must, run};
use agentvm_backend::netxml::{BRIDGE_PREFIX, EGRESS_DNS_PORT, EGRESS_PROXY_PORT};

/// The nat chain agentvm owns.
pub const CHAIN: &str = "AGENTVM_EGRESS";
/// Most ports (a range counts two) one `multiport` match takes.
const MULTIPORT_MAX: usize = 15;

/// The `iptables-restore` input redirecting each guest's DNS (udp and tcp 53, to any server)
/// to the DNS filter and its `ports` (inclusive ranges) to the proxy, for traffic entering
/// from agentvm bridges only.
pub fn rules_script(guests: &BTreeMap<Ipv4Addr, Vec<(u16, u16)>>) -> String {
    let mut s = format!("*nat\n:{CHAIN} - [0:0]\n");
    for (ip, ports) in guests {
        for proto in ["udp", "tcp"] {
            s.push_str(&format!(
                "-A {CHAIN} -i {BRIDGE_PREFIX}+ -s {ip}/32 -p {proto} --dport 53 -j REDIRECT --to-ports {EGRESS_DNS_PORT}\n"
            ));
        }
        let mut chunk: Vec<String> = Vec::new();
        let mut weight = 0;
        let flush = |chunk: &mut Vec<String>, s: &mut String| {
            if !chunk.is_empty() {
                s.push_str(&format!(
                    "-A {CHAIN} -i {BRIDGE_PREFIX}+ -s {ip}/32 -p tcp -m multiport --dports {} -j REDIRECT --to-ports {EGRESS_PROXY_PORT}\n",
                    chunk.join(",")
                ));
                chunk.clear();
            }
        };
        for &(start, end) in ports {
            let (item, w) = if start == end {
                (start.to_string(), 1)
            } else {
                (format!("{start}:{end}"), 2)
            };
            if weight + w > MULTIPORT_MAX {
                flush(&mut chunk, &mut s);
                weight = 0;
            }
            chunk.push(item);
            weight += w;
        }
        flush(&mut chunk, &mut s);
    }
    s.push_str("COMMIT\n");
    s
}

/// True if [`CHAIN`] exists in the nat table.
pub fn chain_exists() -> bool {
    Command::new("iptables")
        .args(["-w", "-t", "nat", "-S", CHAIN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// True when the live [`CHAIN`] holds as many rules as `script` and `PREROUTING` jumps to it:
/// false once something else flushed, replaced or unlinked it (the loop then loads `script`
/// again, so a steering rule removed behind the controller's back comes back within one sync).
pub fn in_place(script: &str) -> bool {
    let wanted = script.lines().filter(|l| l.starts_with("-A ")).count();
    // One listing of the nat table answers both questions.
    let Ok(out) = run(None, "iptables", &["-w", "-t", "nat", "-S"], None) else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let rules = format!("-A {CHAIN} ");
    let live = text.lines().filter(|l| l.starts_with(&rules)).count();
    let jump = format!("-A PREROUTING -j {CHAIN}");
    out.status.success() && live == wanted && text.lines().any(|l| l.trim_end() == jump)
}

/// Loads `script` and makes sure `PREROUTING` jumps to [`CHAIN`] first.
pub fn apply(script: &str) -> Result<(), String> {
    must(None, "iptables-restore", &["-w", "--noflush"], Some(script))?;
    let present = run(
        None,
        "iptables",
        &["-w", "-t", "nat", "-C", "PREROUTING", "-j", CHAIN],
        None,
    )?
    .status
    .success();
    if !present {
        must(
            None,
            "iptables",
            &["-w", "-t", "nat", "-I", "PREROUTING", "1", "-j", CHAIN],
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_per_guest_and_port_chunk() {
        let mut g = BTreeMap::new();
        g.insert("10.0.0.5".parse().unwrap(), vec![(80, 80), (443, 443)]);
        let many: Vec<(u16, u16)> = (0..9).map(|i| (1000 + i * 10, 1005 + i * 10)).collect();
        g.insert("10.0.0.6".parse().unwrap(), many);
        let s = rules_script(&g);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "*nat");
        assert_eq!(lines[1], ":AGENTVM_EGRESS - [0:0]");
        assert_eq!(
            lines[2..5],
            [
                "-A AGENTVM_EGRESS -i avm-+ -s 10.0.0.5/32 -p udp --dport 53 -j REDIRECT --to-ports 15053",
                "-A AGENTVM_EGRESS -i avm-+ -s 10.0.0.5/32 -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                "-A AGENTVM_EGRESS -i avm-+ -s 10.0.0.5/32 -p tcp -m multiport --dports 80,443 -j REDIRECT --to-ports 15080",
            ]
        );
        // Nine ranges weigh 18: two rules of at most 15.
        assert!(lines[5].contains("-s 10.0.0.6/32 -p udp --dport 53 "));
        assert!(lines[7].contains(
            "--dports 1000:1005,1010:1015,1020:1025,1030:1035,1040:1045,1050:1055,1060:1065 "
        ));
        assert!(lines[8].contains("--dports 1070:1075,1080:1085 "));
        assert_eq!(lines[9], "COMMIT");
        assert_eq!(
            rules_script(&BTreeMap::new()),
            "*nat\n:AGENTVM_EGRESS - [0:0]\nCOMMIT\n",
            "no guests: an empty chain"
        );
    }
}
