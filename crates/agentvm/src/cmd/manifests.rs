//! Reading manifests from files, directories and stdin for the CLI, with every error shown.

use std::path::PathBuf;

use agentvm_api::ParsedResource;

/// Parse `paths` (`-` is stdin); print every error as `file:line:column: message` and fail.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Vec<ParsedResource>> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        let res = if p.as_os_str() == "-" {
            agentvm_api::parse_reader(std::io::stdin().lock(), agentvm_api::parse::STDIN_NAME)
        } else {
            agentvm_api::parse_path(p, true)
        };
        match res {
            Ok(v) => out.extend(v),
            Err(e) => errors.extend(e.0),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("{e}");
        }
        anyhow::bail!(
            "{} error(s) in the manifests; nothing was done",
            errors.len()
        );
    }
    Ok(out)
}
