//! The resource kinds, their accepted spellings, and "did you mean" suggestions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the seven resource kinds of `agentvm.dev/v1alpha1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    /// A libvirt network (NAT or isolated).
    Network,
    /// An egress allow-list applied to VM interfaces.
    NetworkFilter,
    /// A guest disk image built from a base distribution.
    Image,
    /// A pool of warm VMs from one template.
    VmPool,
    /// A long-lived VM claimed from a pool, kept until deleted.
    Sandbox,
    /// A point-in-time copy of a sandbox's memory and disk.
    Snapshot,
    /// One execution in a VM taken from a pool.
    AgentRun,
}

impl Kind {
    /// Every kind, in dependency order (things referenced come first).
    pub const ALL: [Kind; 7] = [
        Kind::Network,
        Kind::NetworkFilter,
        Kind::Image,
        Kind::VmPool,
        Kind::Sandbox,
        Kind::Snapshot,
        Kind::AgentRun,
    ];

    /// The canonical name used in manifests (`VmPool`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Kind::Network => "Network",
            Kind::NetworkFilter => "NetworkFilter",
            Kind::Image => "Image",
            Kind::VmPool => "VmPool",
            Kind::Sandbox => "Sandbox",
            Kind::Snapshot => "Snapshot",
            Kind::AgentRun => "AgentRun",
        }
    }

    /// The short name for the command line (`pool`).
    pub fn short_name(&self) -> &'static str {
        match self {
            Kind::Network => "net",
            Kind::NetworkFilter => "nwf",
            Kind::Image => "img",
            Kind::VmPool => "pool",
            Kind::Sandbox => "sbx",
            Kind::Snapshot => "snap",
            Kind::AgentRun => "run",
        }
    }

    /// The lowercase plural (`vmpools`), as in `agentvm get vmpools`.
    pub fn plural(&self) -> &'static str {
        match self {
            Kind::Network => "networks",
            Kind::NetworkFilter => "networkfilters",
            Kind::Image => "images",
            Kind::VmPool => "vmpools",
            Kind::Sandbox => "sandboxes",
            Kind::Snapshot => "snapshots",
            Kind::AgentRun => "agentruns",
        }
    }

    /// Every spelling [`Kind::from_str`] accepts for this kind, lowercase.
    pub fn aliases(&self) -> &'static [&'static str] {
        match self {
            Kind::Network => &["network", "networks", "net", "nets"],
            Kind::NetworkFilter => &[
                "networkfilter",
                "networkfilters",
                "nwf",
                "nwfs",
                "nwfilter",
                "nwfilters",
                "filter",
                "filters",
            ],
            Kind::Image => &["image", "images", "img", "imgs"],
            Kind::VmPool => &["vmpool", "vmpools", "pool", "pools"],
            Kind::Sandbox => &["sandbox", "sandboxes", "sbx", "sbxs"],
            Kind::Snapshot => &["snapshot", "snapshots", "snap", "snaps"],
            Kind::AgentRun => &["agentrun", "agentruns", "run", "runs"],
        }
    }

    /// The closest kind to a misspelt `input` (`VMPoll` -> `VmPool`), if any is
    /// close enough to be a plausible typo.
    pub fn suggest(input: &str) -> Option<Kind> {
        if let Ok(kind) = input.parse::<Kind>() {
            return Some(kind);
        }
        Kind::suggest_typo(&input.to_ascii_lowercase())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown kind name, with the closest known kind if there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown kind `{input}`{}; valid kinds: {}", suggestion.map(|k| format!(" (did you mean `{k}`?)")).unwrap_or_default(), valid_kinds())]
pub struct UnknownKind {
    /// What was given.
    pub input: String,
    /// The closest known kind, if plausible.
    pub suggestion: Option<Kind>,
}

/// `Network, NetworkFilter, Image, VmPool, Sandbox, Snapshot, AgentRun`
pub(crate) fn valid_kinds() -> String {
    Kind::ALL.map(|k| k.as_str()).join(", ")
}

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the canonical name, any letter case, the plural and the short
    /// names (`net`, `nwf`, `img`, `pool`, `run`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Kind::ALL
            .into_iter()
            .find(|k| k.aliases().contains(&lower.as_str()))
            .ok_or_else(|| UnknownKind {
                input: s.to_string(),
                suggestion: Kind::suggest_typo(&lower),
            })
    }
}

impl Kind {
    fn suggest_typo(lower: &str) -> Option<Kind> {
        let mut best: Option<(usize, Kind)> = None;
        for kind in Kind::ALL {
            for alias in kind.aliases() {
                let d = edit_distance(lower, alias);
                if d <= typo_budget(alias).min(typo_budget(lower))
                    && best.is_none_or(|(bd, _)| d < bd)
                {
                    best = Some((d, kind));
                }
            }
        }
        best.map(|(_, k)| k)
    }
}

/// How many edits still count as a typo of `word`.
pub(crate) fn typo_budget(word: &str) -> usize {
    match word.chars().count() {
        0..=5 => 1,
        6..=8 => 2,
        _ => 3,
    }
}

/// Edit distance between two strings, by characters: insertions,
/// deletions, substitutions and transpositions of neighbours each count 1
/// (optimal string alignment).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// The candidate closest to `input` (case-insensitive) within the typo budget.
pub(crate) fn closest<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = input.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&lower, &c.to_ascii_lowercase());
        if d <= typo_budget(c).min(typo_budget(&lower)) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_spellings() {
        for (s, k) in [
            ("Network", Kind::Network),
            ("net", Kind::Network),
            ("NETWORKS", Kind::Network),
            ("NetworkFilter", Kind::NetworkFilter),
            ("nwf", Kind::NetworkFilter),
            ("networkfilters", Kind::NetworkFilter),
            ("img", Kind::Image),
            ("Images", Kind::Image),
            ("VmPool", Kind::VmPool),
            ("vmpool", Kind::VmPool),
            ("pool", Kind::VmPool),
            ("pools", Kind::VmPool),
            ("AgentRun", Kind::AgentRun),
            ("run", Kind::AgentRun),
            ("agentruns", Kind::AgentRun),
        ] {
            assert_eq!(s.parse::<Kind>().unwrap(), k, "{s}");
        }
        for k in Kind::ALL {
            assert_eq!(k.as_str().parse::<Kind>().unwrap(), k);
            assert_eq!(k.short_name().parse::<Kind>().unwrap(), k);
            assert_eq!(k.plural().parse::<Kind>().unwrap(), k);
        }
    }

    #[test]
    fn did_you_mean() {
        assert_eq!(Kind::suggest("VmPol"), Some(Kind::VmPool));
        assert_eq!(Kind::suggest("agentrn"), Some(Kind::AgentRun));
        assert_eq!(Kind::suggest("Netwrok"), Some(Kind::Network));
        assert_eq!(Kind::suggest("imgae"), Some(Kind::Image));
        assert_eq!(Kind::suggest("sandbx"), Some(Kind::Sandbox));
        assert_eq!(Kind::suggest("Deployment"), None);
        let err = "VMPol".parse::<Kind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown kind `VMPol` (did you mean `VmPool`?); valid kinds: Network, NetworkFilter, Image, VmPool, Sandbox, Snapshot, AgentRun"
        );
        let err = "Pod".parse::<Kind>().unwrap_err();
        assert_eq!(err.suggestion, None);
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("imgae", "image"), 1);
        assert_eq!(closest("sctp", ["tcp", "udp", "icmp", "all"]), None);
        assert_eq!(
            closest("memoryMiB", ["vcpu", "memoryMib", "diskGib"]),
            Some("memoryMib")
        );
        assert_eq!(closest("zzz", ["vcpu", "memoryMib"]), None);
    }
}
