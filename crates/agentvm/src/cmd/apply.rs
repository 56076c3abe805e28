//! `agentvm apply -f FILE|DIR|-`: send manifests to the controller; print what each object
//! became (`created`, `configured`, `unchanged`), and with `--prune` delete (`pruned`) what
//! an earlier apply of the same set created that the manifests no longer declare.

use std::collections::BTreeSet;
use std::path::PathBuf;

use agentvm_api::parse::STDIN_NAME;
use agentvm_api::Kind;
use agentvm_api::ParsedResource;
use agentvm_client::ApplyRequest;
use agentvm_client::Client;
use agentvm_controller::Config;
use agentvm_store::Manager;
use anyhow::bail;
use clap::Args;

use super::objects::{
    apply_set_id, object_ref, paint, parse_kind, use_color, Color, ConnectArgs, APPLY_SET_LABEL,
};

/// Options of `apply`.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifest file, directory of `.yaml`/`.yml` files, or `-` for stdin. Repeatable.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Also read the subdirectories of directories.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Show what would change; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take over objects managed by the spec directory (which will overwrite them again
    /// the next time their file changes).
    #[arg(long)]
    force: bool,
    /// Delete the objects an earlier `apply --prune` of the same set created that these
    /// manifests no longer declare (only objects managed by `agentvm apply`, never the
    /// spec directory's). The set is named by --apply-set, else by the given paths; its
    /// objects carry the label `agentvm.dev/apply-set`.
    #[arg(long)]
    prune: bool,
    /// Name of the apply set for --prune (default: a hash of the absolute paths given with
    /// -f). Needed with `-f -`.
    #[arg(long, value_name = "NAME", requires = "prune")]
    apply_set: Option<String>,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Labels every object with the apply set `id`.
pub fn label_apply_set(objects: &mut [ParsedResource], id: &str) {
    for o in objects {
        o.resource
            .metadata_mut()
            .labels
            .insert(APPLY_SET_LABEL.to_string(), id.to_string());
    }
}

/// The objects of apply set `id` that `keep` does not name and `agentvm apply` manages:
/// what `--prune` deletes. Objects already being deleted are left out.
pub fn prune_candidates(
    client: &Client,
    id: &str,
    keep: &BTreeSet<(Kind, String)>,
) -> anyhow::Result<Vec<agentvm_store::StoredObject>> {
    let selector = format!("{APPLY_SET_LABEL}={id}");
    Ok(client
        .list(None, Some(&selector))?
        .into_iter()
        .filter(|o| {
            o.manager == Manager::Api
                && !o.is_deleting()
                && !keep.contains(&(o.resource.kind(), o.resource.name().to_string()))
        })
        .collect())
}

/// Parses `paths` (`-` is stdin) as one set. Every error is printed as
/// `file:line:column: field: message`; then nothing is returned.
pub fn load_manifests(paths: &[PathBuf], recursive: bool) -> anyhow::Result<Vec<ParsedResource>> {
    let (stdin, files): (Vec<&PathBuf>, Vec<&PathBuf>) =
        paths.iter().partition(|p| p.as_os_str() == "-");
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    if !files.is_empty() {
        match agentvm_api::parse_paths(&files, recursive) {
            Ok(v) => objects.extend(v),
            Err(e) => errors.extend(e.0),
        }
    }
    if !stdin.is_empty() {
        match agentvm_api::parse_reader(std::io::stdin().lock(), STDIN_NAME) {
            Ok(v) => objects.extend(v),
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        bail!(
            "{} error(s) in the manifests; nothing was applied",
            errors.len()
        );
    }
    for o in &mut objects {
        o.resolve_host_paths();
    }
    Ok(objects)
}

impl ApplyArgs {
    /// Apply (and prune); exit 1 if any object was refused or could not be pruned.
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
        let request = ApplyRequest {
            objects: objects
                .iter()
                .map(|p| serde_json::to_value(&p.resource))
                .collect::<Result<_, _>>()?,
            sources: objects.iter().map(|p| p.source.to_string()).collect(),
            dry_run: self.dry_run,
            force: self.force,
        };
        let client = self.conn.client(cfg);
        let response = client.apply(&request)?;
        let color = use_color(&std::io::stdout());
        let suffix = if response.dry_run { " (dry run)" } else { "" };
        let mut failed = 0;
        for r in &response.results {
            let name = match parse_kind(&r.kind) {
                Ok(kind) => object_ref(kind, &r.name),
                Err(_) => format!("{}/{}", r.kind, r.name),
            };
            match (&r.outcome, &r.error) {
                (Some(outcome), _) => {
                    let word = outcome.to_string();
                    let painted = match word.as_str() {
                        "created" => paint(&word, Color::Green, color),
                        "configured" => paint(&word, Color::Yellow, color),
                        _ => word,
                    };
                    println!("{name} {painted}{suffix}");
                }
                (None, error) => {
                    failed += 1;
                    eprintln!(
                        "error: {}: {}",
                        r.source.as_deref().unwrap_or(&name),
                        error.as_deref().unwrap_or("failed")
                    );
                }
            }
        }
        if let Some(id) = set {
            if failed > 0 {
                eprintln!("error: not pruning apply set {id}: {failed} object(s) were not applied; fix them and apply again");
                return Ok(1);
            }
            let keep: BTreeSet<(Kind, String)> = objects
                .iter()
                .map(|p| (p.resource.kind(), p.resource.name().to_string()))
                .collect();
            for obj in prune_candidates(&client, &id, &keep)? {
                let (kind, name) = (obj.resource.kind(), obj.resource.name());
                let r = object_ref(kind, name);
                if self.dry_run {
                    println!("{r} {}{suffix}", paint("pruned", Color::Red, color));
                    continue;
                }
                match client.delete(kind, name, false) {
                    Ok(_) => println!("{r} {}", paint("pruned", Color::Red, color)),
                    Err(e) if e.is_not_found() => {}
                    Err(e) if e.status().is_some() => {
                        eprintln!("error: pruning {r}: {e}");
                        failed += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(i32::from(failed > 0))
    }
}
