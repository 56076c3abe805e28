//! Executing one `AgentRun` inside a VM that is already up: host-side inputs (secrets, files,
//! workspace), the program itself with live output, secret redaction, and artifact collection.
//! Used by `agentvm run` (one-shot, local) and by the controller's run scheduler.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agentvm_api::{AgentRunSpec, Entrypoint};
use agentvm_backend::guest::{AgentChannel, ExecOutcome, ExecRequest, Guest, Stream, RUN_CGROUP};
use agentvm_backend::BackendError;

/// The guest commands of a pool template's warm-up steps (`/bin/sh -c STEP` each, with the
/// step's timeout), run once per VM before it is parked at its golden state.
pub fn warmup_requests(template: &agentvm_api::VmTemplate) -> Vec<ExecRequest> {
    template
        .warmup
        .iter()
        .map(|w| {
            let mut r = ExecRequest::new("/bin/sh", ["-c", w.run.as_str()]);
            r.timeout = Duration::from_secs(u64::from(w.timeout_seconds));
            r
        })
        .collect()
}

/// Problems preparing or executing a run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A secret's source could not be read on the host.
    #[error("secretEnv {name}: {message}")]
    Secret {
        /// The guest variable name.
        name: String,
        /// What went wrong (never the value).
        message: String,
    },
    /// An input file or workspace could not be read on the host.
    #[error("{what} {path}: {message}")]
    Input {
        /// `files` or `workspace`.
        what: &'static str,
        /// The host path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The VM or its agent failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A guest-side setup step failed.
    #[error("{step} failed in the guest (exit {code:?}): {stderr}")]
    GuestStep {
        /// What was being done.
        step: String,
        /// Its exit code.
        code: Option<i32>,
        /// Its standard error.
        stderr: String,
    },
}

/// Host-side inputs of a run, read before a VM is taken: nothing is read twice, and a missing
/// secret fails the run before it costs a VM.
pub struct PreparedRun {
    env: BTreeMap<String, String>,
    secret_values: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
    workspace: Option<(Vec<u8>, String)>,
}

impl PreparedRun {
    /// The secret values (for redaction only: never store or log them).
    pub fn secret_values(&self) -> &[String] {
        &self.secret_values
    }
}

impl std::fmt::Debug for PreparedRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secret values never reach logs, not even through Debug.
        f.debug_struct("PreparedRun")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("secrets", &self.secret_values.len())
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn tar_dir(dir: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .output()
        .map_err(|e| format!("running tar: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(out.stdout)
}

/// Read secrets, input files and the workspace on the host. `base` resolves relative paths
/// (the manifest's directory); `host_env` looks up host environment variables.
pub fn prepare(
    spec: &AgentRunSpec,
    base: &Path,
    host_env: &dyn Fn(&str) -> Option<String>,
) -> Result<PreparedRun, RunError> {
    let mut env = spec.env.clone();
    let mut secret_values = Vec::new();
    for s in &spec.secret_env {
        let value = match (&s.from_env, &s.from_file) {
            (Some(var), None) => host_env(var).ok_or_else(|| RunError::Secret {
                name: s.name.clone(),
                message: format!("host environment variable {var} is not set; export it before submitting the run"),
            })?,
            (None, Some(file)) => {
                let path = resolve(base, file);
                let v = std::fs::read_to_string(&path).map_err(|e| RunError::Secret {
                    name: s.name.clone(),
                    message: format!("cannot read {}: {e}", path.display()),
                })?;
                v.strip_suffix('\n').unwrap_or(&v).to_string()
            }
            _ => {
                return Err(RunError::Secret {
                    name: s.name.clone(),
                    message: "set exactly one of fromEnv and fromFile".into(),
                })
            }
        };
        if !value.is_empty() {
            secret_values.push(value.clone());
        }
        env.insert(s.name.clone(), value);
    }
    let mut files = Vec::new();
    for f in &spec.files {
        let data = match (&f.content, &f.from_file) {
            (Some(c), None) => c.clone().into_bytes(),
            (None, Some(p)) => {
                let path = resolve(base, p);
                std::fs::read(&path).map_err(|e| RunError::Input {
                    what: "files",
                    path: path.clone(),
                    message: e.to_string(),
                })?
            }
            _ => {
                return Err(RunError::Input {
                    what: "files",
                    path: PathBuf::from(&f.path),
                    message: "set exactly one of content and fromFile".into(),
                })
            }
        };
        files.push((f.path.clone(), data, f.mode_bits().unwrap_or(0o644)));
    }
    let workspace = match &spec.workspace {
        None => None,
        Some(ws) => {
            let tmp;
            let dir = match (&ws.host_path, &ws.git_url) {
                (Some(p), None) => resolve(base, p),
                (None, Some(url)) => {
                    tmp = tempfile::tempdir().map_err(|e| RunError::Input {
                        what: "workspace",
                        path: PathBuf::from(url),
                        message: e.to_string(),
                    })?;
                    clone_repo(url, ws.git_ref.as_deref(), tmp.path())?;
                    tmp.path().to_path_buf()
                }
                _ => {
                    return Err(RunError::Input {
                        what: "workspace",
                        path: PathBuf::new(),
                        message: "set exactly one of hostPath and gitUrl".into(),
                    })
                }
            };
            let tar = tar_dir(&dir).map_err(|message| RunError::Input {
                what: "workspace",
                path: dir.clone(),
                message,
            })?;
            Some((tar, ws.path.clone()))
        }
    };
    Ok(PreparedRun {
        env,
        secret_values,
        files,
        workspace,
    })
}

fn clone_repo(url: &str, git_ref: Option<&str>, into: &Path) -> Result<(), RunError> {
    let fail = |message: String| RunError::Input {
        what: "workspace",
        path: PathBuf::from(url),
        message,
    };
    let out = Command::new("git")
        .args(["clone", "--quiet", url])
        .arg(into)
        .output()
        .map_err(|e| fail(format!("running git: {e}")))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    if let Some(r) = git_ref {
        let out = Command::new("git")
            .arg("-C")
            .arg(into)
            .args(["checkout", "--quiet", r])
            .output()
            .map_err(|e| fail(format!("running git: {e}")))?;
        if !out.status.success() {
            return Err(fail(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    Ok(())
}

/// Replaces exact secret values in a byte stream with `[REDACTED]`, including values split
/// across chunk boundaries (it holds back the last `longest - 1` bytes until more arrive).
pub struct Redactor {
    secrets: Vec<Vec<u8>>,
    held: Vec<u8>,
    keep: usize,
}

/// What a redacted secret is replaced with.
pub const REDACTED: &[u8] = b"[REDACTED]";

impl Redactor {
    /// A redactor for `secrets` (empty values are ignored).
    pub fn new(secrets: &[String]) -> Self {
        let mut secrets: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let keep = secrets.first().map(|s| s.len() - 1).unwrap_or(0);
        Redactor {
            secrets,
            held: Vec::new(),
            keep,
        }
    }

    fn replace_all(&self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        'outer: while i < data.len() {
            for s in &self.secrets {
                if data[i..].starts_with(s) {
                    out.extend_from_slice(REDACTED);
                    i += s.len();
                    continue 'outer;
                }
            }
            out.push(data[i]);
            i += 1;
        }
        out
    }

    /// Feed a chunk; returns the bytes that can be emitted now.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.secrets.is_empty() {
            return chunk.to_vec();
        }
        self.held.extend_from_slice(chunk);
        // Emit everything except a tail that could be the start of a secret.
        let tail_start = self.held.len().saturating_sub(self.keep);
        // Never cut inside a secret occurrence that starts before the tail and extends into it.
        let straddling = (tail_start.saturating_sub(self.keep)..tail_start).find(|&start| {
            self.secrets
                .iter()
                .any(|s| self.held[start..].starts_with(s) && start + s.len() > tail_start)
        });
        let mut cut = straddling.unwrap_or(tail_start);
        // A secret without a newline cannot span one: whole lines go out at once (so
        // interleaved stdout and stderr stay line-aligned).
        if !self.secrets.iter().any(|s| s.contains(&b'\n')) {
            if let Some(nl) = self.held.iter().rposition(|&b| b == b'\n') {
                cut = cut.max(nl + 1);
            }
        }
        let emit: Vec<u8> = self.held.drain(..cut).collect();
        self.replace_all(&emit)
    }

    /// Flush what is held back at the end of the stream.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.held);
        self.replace_all(&rest)
    }

    /// Redact a complete buffer in one go.
    pub fn redact_all(secrets: &[String], data: &[u8]) -> Vec<u8> {
        let mut r = Redactor::new(secrets);
        let mut out = r.push(data);
        out.extend(r.finish());
        out
    }
}

/// The result of executing a run's program.
#[derive(Debug)]
pub struct RunResult {
    /// The program's outcome. Its output went (redacted) to `on_output` as it came and is
    /// not kept here: `stdout`/`stderr` are empty, the counts are set.
    pub outcome: ExecOutcome,
    /// Bytes the program wrote per stream and how many were dropped at the cap.
    pub output: agentvm_api::OutputCount,
}

impl RunResult {
    /// The `OutputTruncated` message when output was dropped at the cap of `max_mib` MiB per
    /// stream, else `None`.
    pub fn truncated_message(&self, max_mib: u32) -> Option<String> {
        let o = &self.outcome;
        let cap = u64::from(max_mib) << 20;
        let parts: Vec<String> = [("stdout", o.stdout_total), ("stderr", o.stderr_total)]
            .into_iter()
            .filter(|(_, total)| *total > cap)
            .map(|(name, total)| {
                format!(
                    "{name}: {} of {total} bytes dropped (the first {cap} kept)",
                    total - cap
                )
            })
            .collect();
        (!parts.is_empty()).then(|| {
            format!(
                "output beyond output.maxMib ({max_mib} MiB per stream) was dropped: {}",
                parts.join("; ")
            )
        })
    }
}

fn check(step: &str, out: ExecOutcome) -> Result<(), RunError> {
    if out.success() {
        Ok(())
    } else {
        Err(RunError::GuestStep {
            step: step.to_string(),
            code: out.exit_code,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn shell(
    g: &Guest<'_, impl AgentChannel + ?Sized>,
    step: &str,
    script: &str,
    args: &[&str],
) -> Result<(), RunError> {
    let mut a = vec!["-c".to_string(), script.to_string(), "agentvm".to_string()];
    a.extend(args.iter().map(|s| s.to_string()));
    let mut req = ExecRequest::new("/bin/sh", a);
    req.timeout = Duration::from_secs(600);
    check(step, g.exec(&req, &mut |_, _| {})?)
}

/// Copy inputs into the guest, run the program with live (redacted) output, and return its
/// outcome. `on_output` receives redacted output as it arrives; `on_program_start` is called
/// once, right before the program is started (its timeout counts from then). The program
/// and everything it starts run in the guest cgroup [`RUN_CGROUP`].
pub fn execute<C: AgentChannel + ?Sized>(
    g: &Guest<'_, C>,
    spec: &AgentRunSpec,
    prepared: &PreparedRun,
    on_program_start: &mut dyn FnMut(),
    on_output: &mut dyn FnMut(Stream, &[u8]),
) -> Result<RunResult, RunError> {
    for (path, data, mode) in &prepared.files {
        let dir = Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into());
        shell(
            g,
            "creating the directory of an input file",
            r#"mkdir -p "$1""#,
            &[&dir],
        )?;
        g.write_file(path, data)?;
        shell(
            g,
            "setting an input file's mode",
            r#"chmod "$1" "$2""#,
            &[&format!("{mode:o}"), path],
        )?;
    }
    if let Some((tar, dest)) = &prepared.workspace {
        let tmp = "/var/tmp/agentvm-workspace.tar";
        g.write_file(tmp, tar)?;
        shell(
            g,
            "unpacking the workspace",
            r#"mkdir -p "$1" && tar -C "$1" -xf "$2" && rm -f "$2""#,
            &[dest, tmp],
        )?;
    }
    let cwd = spec.effective_working_dir().to_string();
    shell(
        g,
        "creating the working directory",
        r#"mkdir -p "$1""#,
        &[&cwd],
    )?;

    let mut req = ExecRequest::new("", Vec::<String>::new());
    req.env = prepared.env.clone();
    req.cwd = Some(cwd);
    req.timeout = Duration::from_secs(u64::from(spec.timeout_seconds));
    req.cgroup = Some(RUN_CGROUP.to_string());
    // The run's one output cap, per stream: the guest reads no further (the rest is only
    // counted), and the store keeps the same amount.
    req.output_cap = usize::try_from(spec.output.max_bytes()).unwrap_or(usize::MAX);
    req.keep_output = false;
    let mut out_r = Redactor::new(&prepared.secret_values);
    let mut err_r = Redactor::new(&prepared.secret_values);
    let mut forward = |s: Stream, d: &[u8]| {
        let r = match s {
            Stream::Stdout => out_r.push(d),
            Stream::Stderr => err_r.push(d),
        };
        if !r.is_empty() {
            on_output(s, &r);
        }
    };
    on_program_start();
    let outcome = match spec.entrypoint() {
        Some(Entrypoint::Script(s)) => {
            g.run_script(&s.interpreter, &s.source, req, &mut forward)?
        }
        Some(Entrypoint::Command(c)) => {
            req.program = c.program.clone();
            req.args = c.args.clone();
            g.exec(&req, &mut forward)?
        }
        None => {
            return Err(RunError::GuestStep {
                step: "choosing the entrypoint".into(),
                code: None,
                stderr: "set exactly one of script and command".into(),
            })
        }
    };
    let tail = out_r.finish();
    if !tail.is_empty() {
        on_output(Stream::Stdout, &tail);
    }
    let tail = err_r.finish();
    if !tail.is_empty() {
        on_output(Stream::Stderr, &tail);
    }
    let output = agentvm_api::OutputCount {
        stdout_bytes: outcome.stdout_total,
        stderr_bytes: outcome.stderr_total,
        dropped_bytes: outcome.stdout_total.saturating_sub(outcome.stdout_kept)
            + outcome.stderr_total.saturating_sub(outcome.stderr_kept),
    };
    Ok(RunResult { outcome, output })
}

/// One artifact copied to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    /// Guest path it came from.
    pub guest_path: String,
    /// Where it is on the host.
    pub host_path: PathBuf,
    /// Bytes of content (for a directory: of all regular files in it).
    pub size_bytes: u64,
    /// sha256 of the content, hex (regular files only).
    pub sha256: Option<String>,
}

/// What [`collect_artifacts`] did with each declared path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactReport {
    /// Copied to the host.
    pub collected: Vec<Artifact>,
    /// Declared paths that did not exist in the guest.
    pub missing: Vec<String>,
    /// Paths left in the guest because they did not fit in what was left of the size cap,
    /// with their packed size in bytes.
    pub skipped: Vec<(String, u64)>,
}

impl ArtifactReport {
    /// A one-line summary of the skipped paths, for a condition message.
    pub fn skipped_message(&self, max_bytes: u64) -> String {
        let list: Vec<String> = self
            .skipped
            .iter()
            .map(|(p, n)| format!("{p} ({n} bytes)"))
            .collect();
        format!(
            "not collected, over the size cap of {max_bytes} bytes: {}",
            list.join(", ")
        )
    }
}

/// Size and sha256 (files only) of what was extracted at `path`.
fn measure(path: &Path) -> std::io::Result<(u64, Option<String>)> {
    use sha2::{Digest, Sha256};
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() {
        let mut hasher = Sha256::new();
        let mut f = std::fs::File::open(path)?;
        let n = std::io::copy(&mut f, &mut hasher)?;
        let hex = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        return Ok((n, Some(hex)));
    }
    let mut total = 0;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path)? {
            total += measure(&entry?.path())?.0;
        }
    }
    Ok((total, None))
}

/// Copy `paths` out of the guest into `dest` (one tar stream per path). The packed size of
/// everything collected stays within `max_bytes`: a path whose tar does not fit in what is
/// left is not copied at all (never cut in half) and is reported in
/// [`ArtifactReport::skipped`]; the following paths are still tried.
pub fn collect_artifacts<C: AgentChannel + ?Sized>(
    g: &Guest<'_, C>,
    paths: &[String],
    dest: &Path,
    max_bytes: u64,
) -> Result<ArtifactReport, RunError> {
    let mut report = ArtifactReport::default();
    let mut budget = max_bytes;
    let host_err = |path: &Path, e: &dyn std::fmt::Display| RunError::Input {
        what: "artifacts",
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(dest).map_err(|e| host_err(dest, &e))?;
    let tmp = "/var/tmp/agentvm-artifact.tar";
    for p in paths {
        // Pack, then print the tar's size (so an artifact over the cap is never read).
        let req = ExecRequest::new(
            "/bin/sh",
            [
                "-c",
                r#"[ -e "$1" ] || exit 3; tar -C "$(dirname "$1")" -cf "$2" "$(basename "$1")" && wc -c < "$2""#,
                "agentvm",
                p,
                tmp,
            ],
        );
        let out = g.exec(&req, &mut |_, _| {})?;
        if out.exit_code == Some(3) {
            report.missing.push(p.clone());
            continue;
        }
        let size: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(u64::MAX);
        check("packing an artifact", out)?;
        if size > budget {
            report.skipped.push((p.clone(), size));
            continue;
        }
        let tar = g.read_file(tmp, budget as usize)?;
        budget = budget.saturating_sub(tar.len() as u64);
        let mut child = Command::new("tar")
            .arg("-C")
            .arg(dest)
            .args(["-xf", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| host_err(dest, &e))?;
        let written = child.stdin.take().expect("piped").write_all(&tar);
        let status = child.wait_with_output().map_err(|e| host_err(dest, &e))?;
        if let Err(e) = written {
            return Err(host_err(dest, &e));
        }
        if !status.status.success() {
            return Err(host_err(
                dest,
                &format!(
                    "unpacking {p}: {}",
                    String::from_utf8_lossy(&status.stderr).trim()
                ),
            ));
        }
        let name = Path::new(p)
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_default();
        let host_path = dest.join(name);
        let (size_bytes, sha256) = measure(&host_path).map_err(|e| host_err(&host_path, &e))?;
        report.collected.push(Artifact {
            guest_path: p.clone(),
            host_path,
            size_bytes,
            sha256,
        });
    }
    // Best effort: the VM is reset after the run anyway.
    let _ = g.exec(&ExecRequest::new("/bin/rm", ["-f", tmp]), &mut |_, _| {});
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn artifacts_are_measured_files_hashed_directories_summed_symlinks_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("out");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), b"hello\n").unwrap();
        std::fs::write(root.join("sub/b.bin"), vec![7u8; 1000]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let (size, sha) = measure(&root.join("a.txt")).unwrap();
        assert_eq!(size, 6);
        assert_eq!(
            sha.as_deref(),
            Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
        );
        assert_eq!(measure(&root).unwrap(), (1006, None));
        let report = ArtifactReport {
            skipped: vec![("/root/big".into(), 2_100_000)],
            ..Default::default()
        };
        assert_eq!(
            report.skipped_message(1 << 20),
            "not collected, over the size cap of 1048576 bytes: /root/big (2100000 bytes)"
        );
    }

    #[test]
    fn redacts_secrets_split_across_chunks() {
        let secrets = vec!["s3cr3t-value".to_string(), "tok".to_string()];
        let mut r = Redactor::new(&secrets);
        let mut out = Vec::new();
        for chunk in [&b"key=s3c"[..], b"r3t-va", b"lue and tok", b"en\n"] {
            out.extend(r.push(chunk));
        }
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "key=[REDACTED] and [REDACTED]en\n"
        );
    }

    #[test]
    fn complete_lines_are_not_held_back() {
        let secrets = vec!["a-long-secret".to_string()];
        let mut r = Redactor::new(&secrets);
        assert_eq!(r.push(b"x=a-long-secret\n"), b"x=[REDACTED]\n");
        assert_eq!(r.push(b"y=a-long"), b"");
        assert_eq!(
            r.push(b"-secret and more\nrest"),
            b"y=[REDACTED] and more\n"
        );
        assert_eq!(r.finish(), b"rest");
    }

    #[test]
    fn no_secrets_passes_through() {
        let mut r = Redactor::new(&[]);
        assert_eq!(r.push(b"abc"), b"abc");
        assert!(r.finish().is_empty());
    }

    #[test]
    fn prepare_reads_secrets_from_env_and_file_and_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("key.txt"), "from-file\n").unwrap();
        let mut spec = AgentRunSpec::python("p", "print(1)");
        spec.secret_env =
            serde_yaml::from_str("- {name: A, fromEnv: HOST_A}\n- {name: B, fromFile: key.txt}\n")
                .unwrap();
        let p = prepare(&spec, dir.path(), &|k| {
            (k == "HOST_A").then(|| "from-env".into())
        })
        .unwrap();
        assert_eq!(p.env["A"], "from-env");
        assert_eq!(p.env["B"], "from-file");
        assert!(!format!("{p:?}").contains("from-env"));
        let err = prepare(&spec, dir.path(), &|_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "secretEnv A: host environment variable HOST_A is not set; export it before submitting the run"
        );
    }
}
