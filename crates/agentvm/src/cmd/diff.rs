//! `agentvm diff -f FILE|DIR|-`: what `apply` would change, as a unified diff of the
//! objects' YAML (live → manifest); exit 0 when nothing would change, 1 when something
//! would, above 1 on errors (as `kubectl diff`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use agentvm_api::{Kind, Resource};
use agentvm_client::ApplyRequest;
use agentvm_controller::Config;
use agentvm_store::{ApplyOutcome, StoredObject};
use anyhow::bail;
use clap::Args;

use super::apply::{label_apply_set, load_manifests, prune_candidates};
use super::objects::{
    apply_set_id, object_ref, paint, use_color, Color, ConnectArgs, APPLY_SET_LABEL,
};

/// Lines of unchanged context around each change.
const CONTEXT_LINES: usize = 3;

/// Options of `diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Manifest file, directory of `.yaml`/`.yml` files, or `-` for stdin. Repeatable.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Also read the subdirectories of directories.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Compare as `apply --force` would apply (objects of the spec directory included).
    #[arg(long)]
    force: bool,
    /// Also show the objects `apply --prune` would delete.
    #[arg(long)]
    prune: bool,
    /// Name of the apply set for --prune (default: a hash of the paths given with -f).
    #[arg(long, value_name = "NAME", requires = "prune")]
    apply_set: Option<String>,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// An object as a manifest would declare it: no status, no generation, YAML.
fn manifest_yaml(resource: &Resource) -> anyhow::Result<String> {
    let mut r = resource.clone();
    r.clear_status();
    r.metadata_mut().generation = 0;
    Ok(serde_yaml::to_string(&r)?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Same,
    Removed,
    Added,
}

/// A line diff (longest common subsequence; manifests are small).
fn line_diff<'a>(old: &[&'a str], new: &[&'a str]) -> Vec<(Op, &'a str)> {
    let (n, m) = (old.len(), new.len());
    // lcs[i][j]: length of the LCS of old[i..] and new[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if old[i] == new[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::with_capacity(n + m);
    while i < n || j < m {
        if i < n && j < m && old[i] == new[j] {
            out.push((Op::Same, old[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push((Op::Removed, old[i]));
            i += 1;
        } else {
            out.push((Op::Added, new[j]));
            j += 1;
        }
    }
    out
}

/// A unified diff of `old` and `new` (empty when equal), with `---`/`+++` headers.
pub fn unified_diff(old: &str, new: &str, old_name: &str, new_name: &str, color: bool) -> String {
    let old_lines: Vec<&str> = old.lines().collect();
    let new_lines: Vec<&str> = new.lines().collect();
    let ops = line_diff(&old_lines, &new_lines);
    if ops.iter().all(|(op, _)| *op == Op::Same) {
        return String::new();
    }
    let mut out = format!("--- {old_name}\n+++ {new_name}\n");
    // Hunks: runs of changes with up to CONTEXT_LINES of context; changes closer than
    // twice that share a hunk.
    let changed: Vec<usize> = (0..ops.len()).filter(|&k| ops[k].0 != Op::Same).collect();
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for &k in &changed {
        let start = k.saturating_sub(CONTEXT_LINES);
        let end = (k + CONTEXT_LINES + 1).min(ops.len());
        match groups.last_mut() {
            Some(g) if start <= g.1 => g.1 = end,
            _ => groups.push((start, end)),
        }
    }
    for (start, end) in groups {
        // Line numbers (1-based) where the hunk starts in old and new.
        let before = &ops[..start];
        let old_start = before.iter().filter(|(o, _)| *o != Op::Added).count();
        let new_start = before.iter().filter(|(o, _)| *o != Op::Removed).count();
        let hunk = &ops[start..end];
        let old_len = hunk.iter().filter(|(o, _)| *o != Op::Added).count();
        let new_len = hunk.iter().filter(|(o, _)| *o != Op::Removed).count();
        let from = |s: usize, len: usize| if len == 0 { s } else { s + 1 };
        out.push_str(&paint(
            &format!(
                "@@ -{},{old_len} +{},{new_len} @@",
                from(old_start, old_len),
                from(new_start, new_len)
            ),
            Color::Cyan,
            color,
        ));
        out.push('\n');
        for (op, line) in hunk {
            let text = match op {
                Op::Same => format!(" {line}"),
                Op::Removed => paint(&format!("-{line}"), Color::Red, color),
                Op::Added => paint(&format!("+{line}"), Color::Green, color),
            };
            out.push_str(&text);
            out.push('\n');
        }
    }
    out
}

impl DiffArgs {
    /// Print the differences; exit 0 (none), 1 (some); errors are returned (exit 2).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let mut objects = load_manifests(&self.files, self.recursive)?;
        if objects.is_empty() {
            bail!("no manifests found in {:?}", self.files);
        }
        let set = if self.prune {
            let id = apply_set_id(&self.files, self.apply_set.as_deref())?;
            label_apply_set(&mut objects, &id);
            Some(id)
        } else {
            None
        };
        let client = self.conn.client(cfg);
        let mut live: Vec<Option<StoredObject>> = Vec::with_capacity(objects.len());
        for p in &mut objects {
            let current = match client.get(p.resource.kind(), p.resource.name()) {
                Ok(o) => Some(o),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            };
            // Without --prune, the apply-set label is bookkeeping of an earlier
            // `apply --prune`, not a difference.
            if set.is_none() {
                if let Some(v) = current
                    .as_ref()
                    .and_then(|o| o.resource.metadata().labels.get(APPLY_SET_LABEL))
                {
                    p.resource
                        .metadata_mut()
                        .labels
                        .entry(APPLY_SET_LABEL.to_string())
                        .or_insert_with(|| v.clone());
                }
            }
            live.push(current);
        }
        // The controller decides what would change (validation, managers, generations).
        let response = client.apply(&ApplyRequest {
            objects: objects
                .iter()
                .map(|p| serde_json::to_value(&p.resource))
                .collect::<Result<_, _>>()?,
            sources: objects.iter().map(|p| p.source.to_string()).collect(),
            dry_run: true,
            force: self.force,
        })?;
        let errors: Vec<String> = response
            .results
            .iter()
            .filter_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("{}: {e}", r.source.as_deref().unwrap_or(r.name.as_str())))
            })
            .collect();
        if !errors.is_empty() {
            bail!("apply would fail:\n  {}", errors.join("\n  "));
        }
        let color = use_color(&std::io::stdout());
        let mut differences = 0;
        for ((p, current), result) in objects.iter().zip(&live).zip(&response.results) {
            if result.outcome == Some(ApplyOutcome::Unchanged) {
                continue;
            }
            differences += 1;
            let r = object_ref(p.resource.kind(), p.resource.name());
            let new = manifest_yaml(&p.resource)?;
            let old = match current {
                Some(o) => manifest_yaml(&o.resource)?,
                None => String::new(),
            };
            let old_name = if current.is_some() {
                format!("{r} (live)")
            } else {
                "/dev/null".to_string()
            };
            let new_name = format!("{r} ({})", p.source);
            let text = unified_diff(&old, &new, &old_name, &new_name, color);
            print!("{text}");
            if let Some(o) = current {
                if o.is_deleting() {
                    println!("# {r}: apply would cancel its pending deletion");
                }
                if o.manager != agentvm_store::Manager::Api {
                    println!("# {r}: apply would take it over from {}", o.manager);
                }
            }
        }
        if let Some(id) = set {
            let keep: BTreeSet<(Kind, String)> = objects
                .iter()
                .map(|p| (p.resource.kind(), p.resource.name().to_string()))
                .collect();
            for obj in prune_candidates(&client, &id, &keep)? {
                differences += 1;
                let r = object_ref(obj.resource.kind(), obj.resource.name());
                let old = manifest_yaml(&obj.resource)?;
                print!(
                    "{}",
                    unified_diff(&old, "", &format!("{r} (live)"), "/dev/null", color)
                );
                println!("# {r}: apply --prune would delete it");
            }
        }
        Ok(i32::from(differences > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unified_diff_hunks() {
        let old = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\nk\nl\nm\nn\n";
        let new = old.replace("d\n", "D\n") + "o\n";
        let d = unified_diff(old, &new, "old", "new", false);
        assert_eq!(
            d,
            "--- old\n+++ new\n@@ -1,7 +1,7 @@\n a\n b\n c\n-d\n+D\n e\n f\n g\n@@ -12,3 +12,4 @@\n l\n m\n n\n+o\n"
        );
        // Changes at most twice the context apart share a hunk.
        let near = unified_diff("a\nb\nc\nd\n", "A\nb\nc\nD\n", "old", "new", false);
        assert_eq!(
            near,
            "--- old\n+++ new\n@@ -1,4 +1,4 @@\n-a\n+A\n b\n c\n-d\n+D\n"
        );
        assert_eq!(unified_diff(old, old, "a", "b", false), "");
        assert_eq!(
            unified_diff("", "x\n", "/dev/null", "new", false),
            "--- /dev/null\n+++ new\n@@ -0,0 +1,1 @@\n+x\n"
        );
        assert_eq!(
            unified_diff("x\ny\n", "", "old", "/dev/null", false),
            "--- old\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-x\n-y\n"
        );
    }
}
