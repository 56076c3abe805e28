//! A fail-closed guard around libvirt's nwfilter iptables chains.
//!
//! # The hole it closes
//! libvirt hooks its nwfilter chains into the filter table with three jumps at the top of
//! `FORWARD` (`libvirt-in`, `libvirt-out`, `libvirt-in-post`) and one in `INPUT`
//! (`libvirt-host-in`). Every time it instantiates any interface's filter (a VM starts, any
//! nwfilter is defined, which rebuilds every running VM's filter, a DHCP lease is snooped) it
//! *deletes* those jumps and inserts them again, one `iptables` command at a time
//! (`iptablesCreateBaseChainsFW` in libvirt's `nwfilter_ebiptables_driver.c`). For those
//! milliseconds no guest on the host is filtered at layer 3: the network's own `LIBVIRT_FWO`
//! accepts whatever its guests send, and `INPUT` lets them reach every service of the host.
//! In between, `libvirt-in-post` can even sit at the top alone and accept a guest's packets
//! without its egress chain having looked at them. A guest that keeps sending SYNs to a port
//! its filter forbids gets one through and keeps the connection (replies are `ESTABLISHED`);
//! the tier-3 test `default_filter_lets_a_nat_guest_reach_443_but_not_8080` saw it happen.
//!
//! # The guard
//! agentvm owns two chains and one rule pair in libvirt's:
//! - [`FORWARD_CHAIN`], jumped to from `FORWARD` above the network driver's `LIBVIRT_*` jumps:
//!   it runs libvirt's three chains itself (the same verdicts, since they only `RETURN`,
//!   `ACCEPT` or `DROP`), then drops what a guest port on an agentvm bridge sent that no
//!   interface chain accepted (an interface between libvirt's delete and append of its
//!   `libvirt-in-post` rule);
//! - [`INPUT_CHAIN`], jumped to from `INPUT` above `LIBVIRT_INP`: runs `libvirt-host-in`;
//! - `libvirt-in-post` starts with jumps to `libvirt-in` and `libvirt-out` (tagged
//!   [`TAG`]), so its per-interface `ACCEPT` can never be reached by a packet no interface
//!   chain has judged. libvirt only ever appends to that chain.
//!
//! When libvirt's jumps are in place a packet is judged by them and never reaches the guard;
//! while they are missing, the guard judges it the same way. [`ensure`] reads the filter table
//! once and changes only what is missing or out of place; our chains are replaced atomically
//! (`iptables-restore --noflush`), jumps are moved by inserting the new one before deleting
//! the old (two tags, so a delete names exactly one rule).
//!
//! Runs `iptables` in the network namespace given (`ip netns exec`), or in the caller's.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use crate::netxml::BRIDGE_PREFIX;

/// agentvm's chain in the filter table that `FORWARD` jumps to.
pub const FORWARD_CHAIN: &str = "AGENTVM_GUARD";
/// agentvm's chain in the filter table that `INPUT` jumps to.
pub const INPUT_CHAIN: &str = "AGENTVM_GUARD_IN";
/// Comment on the rules agentvm puts into libvirt's `libvirt-in-post`.
pub const TAG: &str = "agentvm-guard";
/// libvirt's nwfilter chains (created empty by the guard when libvirt has not yet).
const LIBVIRT_CHAINS: [&str; 4] = [
    "libvirt-in",
    "libvirt-out",
    "libvirt-in-post",
    "libvirt-host-in",
];
/// Tags of the two interchangeable copies of a jump to a guard chain.
const JUMP_TAGS: [&str; 2] = ["agentvm-guard-1", "agentvm-guard-2"];

/// The rules of [`FORWARD_CHAIN`] and [`INPUT_CHAIN`], as `iptables-save` prints them.
pub fn guard_rules() -> Vec<String> {
    vec![
        format!("-A {FORWARD_CHAIN} -j libvirt-in"),
        format!("-A {FORWARD_CHAIN} -j libvirt-out"),
        format!("-A {FORWARD_CHAIN} -j libvirt-in-post"),
        format!("-A {FORWARD_CHAIN} -i {BRIDGE_PREFIX}+ -m physdev --physdev-in vnet+ -j DROP"),
        format!("-A {INPUT_CHAIN} -j libvirt-host-in"),
    ]
}

fn post_prefix() -> [String; 2] {
    [
        format!("-A libvirt-in-post -m comment --comment {TAG} -j libvirt-in"),
        format!("-A libvirt-in-post -m comment --comment {TAG} -j libvirt-out"),
    ]
}

/// What [`plan`] found wrong in a filter table, in the order [`ensure`] fixes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// libvirt chains to create (empty).
    pub create: Vec<&'static str>,
    /// Our chains' rules differ from [`guard_rules`].
    pub rewrite_guard: bool,
    /// `libvirt-in-post` does not start with exactly our two rules.
    pub fix_post_prefix: bool,
    /// (parent chain, guard chain, tags of the copies now present) for jumps missing, below
    /// a `LIBVIRT_*` jump, or present more than once.
    pub jumps: Vec<(&'static str, &'static str, Vec<&'static str>)>,
}

impl Plan {
    /// True if the table already holds the guard.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// Compares `iptables-save -t filter` output with the guard.
pub fn plan(table: &str) -> Plan {
    let lines: Vec<&str> = table.lines().map(str::trim_end).collect();
    let chain_exists = |c: &str| {
        lines
            .iter()
            .any(|l| l.split_whitespace().next() == Some(&format!(":{c}")))
    };
    let rules_of = |c: &str| -> Vec<&str> {
        let head = format!("-A {c} ");
        lines
            .iter()
            .copied()
            .filter(|l| l.starts_with(&head))
            .collect()
    };
    let mut p = Plan::default();
    for c in LIBVIRT_CHAINS {
        if !chain_exists(c) {
            p.create.push(c);
        }
    }
    let mut ours: Vec<&str> = rules_of(FORWARD_CHAIN);
    ours.extend(rules_of(INPUT_CHAIN));
    p.rewrite_guard = !chain_exists(FORWARD_CHAIN)
        || !chain_exists(INPUT_CHAIN)
        || ours != guard_rules().iter().map(String::as_str).collect::<Vec<_>>();
    let post = rules_of("libvirt-in-post");
    let prefix = post_prefix();
    let tagged = post.iter().filter(|l| l.contains(TAG)).count();
    p.fix_post_prefix =
        tagged != 2 || post.len() < 2 || post[0] != prefix[0] || post[1] != prefix[1];
    for (parent, guard, theirs) in [
        ("FORWARD", FORWARD_CHAIN, "-j LIBVIRT_"),
        ("INPUT", INPUT_CHAIN, "-j LIBVIRT_"),
    ] {
        let rules = rules_of(parent);
        let jump_of = |l: &str| {
            JUMP_TAGS
                .into_iter()
                .find(|t| *l == jump_rule(parent, guard, t))
        };
        let ours: Vec<(usize, &'static str)> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, l)| jump_of(l).map(|t| (i, t)))
            .collect();
        let first_theirs = rules.iter().position(|l| l.contains(theirs));
        let placed = match (ours.first(), first_theirs) {
            (Some(&(i, _)), Some(j)) => i < j,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !placed || ours.len() != 1 {
            let mut tags: Vec<&'static str> = ours.iter().map(|&(_, t)| t).collect();
            tags.sort_unstable();
            tags.dedup();
            p.jumps.push((parent, guard, tags));
        }
    }
    p
}

fn jump_rule(parent: &str, guard: &str, tag: &str) -> String {
    format!("-A {parent} -m comment --comment {tag} -j {guard}")
}

/// Runs `iptables`-family `program` with `args` (and `stdin`) in `netns`, or in the calling
/// thread's namespace.
pub fn run(
    netns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, String> {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("running {program}: {e}"))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to {program}: {e}"))?;
    }
    child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))
}

/// [`run`], failing with the command and its stderr unless it exits 0; its stdout.
pub fn must(
    netns: Option<&str>,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    let out = run(netns, program, args, stdin)?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Puts the guard in place in `netns` (see the module documentation); returns what was
/// wrong (empty when nothing was changed).
pub fn ensure(netns: Option<&str>) -> Result<Plan, String> {
    let table = must(netns, "iptables-save", &["-t", "filter"], None)?;
    let p = plan(&table);
    if p.is_empty() {
        return Ok(p);
    }
    for c in &p.create {
        // libvirt may create it between our read and this: that is fine.
        let out = run(netns, "iptables", &["-w", "-N", c], None)?;
        if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("exists") {
            return Err(format!(
                "iptables -N {c}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    if p.rewrite_guard {
        let mut script = format!("*filter\n:{FORWARD_CHAIN} - [0:0]\n:{INPUT_CHAIN} - [0:0]\n");
        for r in guard_rules() {
            script.push_str(&r);
            script.push('\n');
        }
        script.push_str("COMMIT\n");
        must(
            netns,
            "iptables-restore",
            &["-w", "--noflush"],
            Some(&script),
        )?;
    }
    if p.fix_post_prefix {
        for target in ["libvirt-in", "libvirt-out"] {
            let spec = [
                "-w",
                "-D",
                "libvirt-in-post",
                "-m",
                "comment",
                "--comment",
                TAG,
                "-j",
                target,
            ];
            while run(netns, "iptables", &spec, None)?.status.success() {}
        }
        for target in ["libvirt-out", "libvirt-in"] {
            must(
                netns,
                "iptables",
                &[
                    "-w",
                    "-I",
                    "libvirt-in-post",
                    "1",
                    "-m",
                    "comment",
                    "--comment",
                    TAG,
                    "-j",
                    target,
                ],
                None,
            )?;
        }
    }
    for (parent, guard, present) in &p.jumps {
        let delete_all = |tag: &str| -> Result<(), String> {
            let spec = [
                "-w",
                "-D",
                parent,
                "-m",
                "comment",
                "--comment",
                tag,
                "-j",
                guard,
            ];
            while run(netns, "iptables", &spec, None)?.status.success() {}
            Ok(())
        };
        // Both tags present (a move cut short): keep the first tag's copies for now.
        if present.len() == 2 {
            delete_all(JUMP_TAGS[1])?;
        }
        let new = if present.first() == Some(&JUMP_TAGS[0]) {
            JUMP_TAGS[1]
        } else {
            JUMP_TAGS[0]
        };
        must(
            netns,
            "iptables",
            &[
                "-w",
                "-I",
                parent,
                "1",
                "-m",
                "comment",
                "--comment",
                new,
                "-j",
                guard,
            ],
            None,
        )?;
        for old in JUMP_TAGS.into_iter().filter(|t| *t != new) {
            delete_all(old)?;
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBVIRT_ONLY: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWX - [0:0]
:LIBVIRT_INP - [0:0]
:libvirt-host-in - [0:0]
:libvirt-in - [0:0]
:libvirt-in-post - [0:0]
:libvirt-out - [0:0]
-A INPUT -j libvirt-host-in
-A INPUT -j LIBVIRT_INP
-A FORWARD -j libvirt-in
-A FORWARD -j libvirt-out
-A FORWARD -j libvirt-in-post
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A libvirt-in-post -m physdev --physdev-in vnet0 -j ACCEPT
COMMIT
";

    fn guarded(forward_tag: &str) -> String {
        LIBVIRT_ONLY
            .replace(
                ":libvirt-host-in",
                &format!(":{FORWARD_CHAIN} - [0:0]\n:{INPUT_CHAIN} - [0:0]\n:libvirt-host-in"),
            )
            .replace(
                "-A INPUT -j LIBVIRT_INP",
                "-A INPUT -m comment --comment agentvm-guard-1 -j AGENTVM_GUARD_IN\n-A INPUT -j LIBVIRT_INP",
            )
            .replace(
                "-A FORWARD -j LIBVIRT_FWX",
                &format!("-A FORWARD -m comment --comment {forward_tag} -j AGENTVM_GUARD\n-A FORWARD -j LIBVIRT_FWX"),
            )
            .replace(
                "-A libvirt-in-post -m physdev",
                &format!("{}\n{}\n-A libvirt-in-post -m physdev", post_prefix()[0], post_prefix()[1]),
            )
            .replace("COMMIT", &format!("{}\nCOMMIT", guard_rules().join("\n")))
    }

    #[test]
    fn a_table_without_the_guard_gets_all_of_it() {
        let p = plan(LIBVIRT_ONLY);
        assert!(p.create.is_empty());
        assert!(p.rewrite_guard && p.fix_post_prefix);
        assert_eq!(
            p.jumps,
            [
                ("FORWARD", FORWARD_CHAIN, vec![]),
                ("INPUT", INPUT_CHAIN, vec![])
            ]
        );
        let empty = plan("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\nCOMMIT\n");
        assert_eq!(empty.create, LIBVIRT_CHAINS);
    }

    #[test]
    fn a_guarded_table_needs_nothing_and_a_moved_jump_is_put_back_on_top() {
        assert!(
            plan(&guarded("agentvm-guard-2")).is_empty(),
            "{:?}",
            plan(&guarded("agentvm-guard-2"))
        );
        // The network driver inserted its jumps above ours (its first network in this namespace).
        let below = guarded("agentvm-guard-2").replace(
            "-A FORWARD -m comment --comment agentvm-guard-2 -j AGENTVM_GUARD\n-A FORWARD -j LIBVIRT_FWX\n-A FORWARD -j LIBVIRT_FWI",
            "-A FORWARD -j LIBVIRT_FWX\n-A FORWARD -m comment --comment agentvm-guard-2 -j AGENTVM_GUARD\n-A FORWARD -j LIBVIRT_FWI",
        );
        assert_eq!(
            plan(&below).jumps,
            [("FORWARD", FORWARD_CHAIN, vec!["agentvm-guard-2"])]
        );
        // Two copies (a move interrupted between insert and delete).
        let twice = guarded("agentvm-guard-1").replace(
            "-A FORWARD -j libvirt-in\n",
            "-A FORWARD -m comment --comment agentvm-guard-2 -j AGENTVM_GUARD\n-A FORWARD -j libvirt-in\n",
        );
        assert_eq!(
            plan(&twice).jumps,
            [(
                "FORWARD",
                FORWARD_CHAIN,
                vec!["agentvm-guard-1", "agentvm-guard-2"]
            )]
        );
    }

    #[test]
    fn a_changed_guard_chain_or_a_displaced_prefix_is_rewritten() {
        let edited = guarded("agentvm-guard-1").replace(" -j DROP\n", " -j ACCEPT\n");
        let p = plan(&edited);
        assert!(p.rewrite_guard && !p.fix_post_prefix && p.jumps.is_empty());
        // Someone inserted a rule above our prefix in libvirt-in-post.
        let displaced = guarded("agentvm-guard-1").replace(
            &post_prefix()[0],
            &format!("-A libvirt-in-post -j ACCEPT\n{}", post_prefix()[0]),
        );
        assert!(plan(&displaced).fix_post_prefix);
    }
}
