//! What the object commands (`apply`, `get`, `delete`, `describe`) share: reaching the
//! controller, naming objects on the command line, and printing tables.

use std::path::PathBuf;

use agentvm_api::Kind;
use agentvm_client::Client;
use agentvm_controller::Config;
use anyhow::{bail, Context};
use clap::Args;

/// How to reach the controller.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The controller's API socket [default: $AGENTVM_SOCKET, else <stateDir>/agentvm.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl ConnectArgs {
    /// A client of the controller this configuration points at.
    pub fn client(&self, cfg: &Config) -> Client {
        Client::new(
            self.socket
                .clone()
                .unwrap_or_else(|| agentvm_client::default_socket(&cfg.state_dir)),
        )
    }
}

/// The lowercase kind used in `kind/name` (`vmpool/sandbox`), as kubectl prints.
pub fn lower(kind: Kind) -> String {
    kind.as_str().to_ascii_lowercase()
}

/// `kind/name` for output.
pub fn object_ref(kind: Kind, name: &str) -> String {
    format!("{}/{name}", lower(kind))
}

/// Parses a kind, with a did-you-mean on typos.
pub fn parse_kind(text: &str) -> anyhow::Result<Kind> {
    Ok(text.parse::<Kind>()?)
}

/// Reads `KIND NAME...` or `KIND/NAME...` into (kind, name) pairs.
pub fn parse_targets(args: &[String]) -> anyhow::Result<Vec<(Kind, String)>> {
    let Some(first) = args.first() else {
        bail!("name the objects: KIND/NAME..., KIND NAME..., or -f FILE");
    };
    if first.contains('/') {
        return args
            .iter()
            .map(|a| {
                let (kind, name) = a.split_once('/').with_context(|| {
                    format!("{a:?}: use KIND/NAME for every object, or KIND NAME...")
                })?;
                if name.is_empty() {
                    bail!("{a:?}: the name is missing (KIND/NAME)");
                }
                Ok((parse_kind(kind)?, name.to_string()))
            })
            .collect();
    }
    let kind = parse_kind(first)?;
    if args.len() == 1 {
        bail!("name the {kind} objects: `{} NAME...`", first);
    }
    Ok(args[1..].iter().map(|n| (kind, n.clone())).collect())
}

/// Column widths of `header` and `rows`, at least `min_widths`.
pub fn column_widths(
    header: Option<&[String]>,
    rows: &[Vec<String>],
    min_widths: &[usize],
) -> Vec<usize> {
    let mut all: Vec<&[String]> = Vec::new();
    if let Some(h) = header {
        all.push(h);
    }
    all.extend(rows.iter().map(Vec::as_slice));
    let columns = all
        .iter()
        .map(|r| r.len())
        .max()
        .unwrap_or(0)
        .max(min_widths.len());
    (0..columns)
        .map(|c| {
            all.iter()
                .map(|r| r.get(c).map_or(0, |v| v.chars().count()))
                .max()
                .unwrap_or(0)
                .max(min_widths.get(c).copied().unwrap_or(0))
        })
        .collect()
}

/// The text of a table (columns separated by three spaces, the last column unpadded) and
/// the column widths used, which are at least `min_widths` (so rows printed later, e.g.
/// by `get --watch`, line up with the first table).
pub fn table_text(
    header: Option<&[String]>,
    rows: &[Vec<String>],
    min_widths: &[usize],
) -> (String, Vec<usize>) {
    let widths = column_widths(header, rows, min_widths);
    let mut out = String::new();
    for row in header.into_iter().chain(rows.iter().map(Vec::as_slice)) {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < row.len() {
                let pad = widths[c] - cell.chars().count() + 3;
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    (out, widths)
}

/// Label `apply --prune` puts on every object it applies: the apply set's id. A later
/// `apply --prune` of the same set deletes the objects carrying it that the manifests no
/// longer declare.
pub const APPLY_SET_LABEL: &str = "agentvm.dev/apply-set";

/// The id of an apply set: `name` when given (checked to be a valid label value), else a
/// hash of the given paths made absolute and sorted (so `apply --prune -f deploy/` names the
/// same set wherever it runs from the same checkout).
pub fn apply_set_id(paths: &[PathBuf], name: Option<&str>) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    if let Some(name) = name {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            bail!("--apply-set {name:?}: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit");
        }
        return Ok(name.to_string());
    }
    if paths.iter().any(|p| p.as_os_str() == "-") {
        bail!("--prune with manifests from stdin (`-f -`) needs --apply-set NAME: there is no path to name the set by");
    }
    let mut absolute: Vec<String> = paths
        .iter()
        .map(|p| {
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    absolute.sort();
    absolute.dedup();
    let digest = Sha256::digest(absolute.join("\n").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(format!("paths-{hex}"))
}

/// True when `stream` is a terminal and `NO_COLOR` is unset (colour only then).
pub fn use_color(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// ANSI colours used on terminals.
#[derive(Debug, Clone, Copy)]
pub enum Color {
    /// Created, met, added lines.
    Green,
    /// Configured.
    Yellow,
    /// Pruned, errors, removed lines.
    Red,
    /// Hunk headers.
    Cyan,
}

/// `text` in `color` when `enabled`, else unchanged.
pub fn paint(text: &str, color: Color, enabled: bool) -> String {
    if !enabled {
        return text.to_string();
    }
    let code = match color {
        Color::Green => 32,
        Color::Yellow => 33,
        Color::Red => 31,
        Color::Cyan => 36,
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}
