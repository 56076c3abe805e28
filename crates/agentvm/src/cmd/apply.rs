//! `agentvm apply -f FILE|DIR|-`: send manifests to the controller; print what each object
//! became (`created`, `configured`, `unchanged`).

use std::path::PathBuf;

use agentvm_api::parse::STDIN_NAME;
use agentvm_api::ParsedResource;
use agentvm_controller::api::ApplyRequest;
use agentvm_controller::Config;
use anyhow::bail;
use clap::Args;

use super::objects::{object_ref, parse_kind, ConnectArgs};

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
    #[command(flatten)]
    conn: ConnectArgs,
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
    /// Apply; exit 1 if any object was refused.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let objects = load_manifests(&self.files, self.recursive)?;
        if objects.is_empty() {
            bail!("no manifests found in {:?}", self.files);
        }
        let request = ApplyRequest {
            objects: objects
                .iter()
                .map(|p| serde_json::to_value(&p.resource))
                .collect::<Result<_, _>>()?,
            sources: objects.iter().map(|p| p.source.to_string()).collect(),
            dry_run: self.dry_run,
            force: self.force,
        };
        let response = self.conn.client(cfg).apply(&request)?;
        let suffix = if response.dry_run { " (dry run)" } else { "" };
        let mut failed = 0;
        for r in &response.results {
            let name = match parse_kind(&r.kind) {
                Ok(kind) => object_ref(kind, &r.name),
                Err(_) => format!("{}/{}", r.kind, r.name),
            };
            match (&r.outcome, &r.error) {
                (Some(outcome), _) => println!("{name} {outcome}{suffix}"),
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
        Ok(i32::from(failed > 0))
    }
}
