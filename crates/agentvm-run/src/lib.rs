//! Executing one `AgentRun` inside a VM that is already up: host-side inputs (secrets, files,
//! workspace), the program itself with live output, secret redaction, and artifact collection.
//! Used by `agentvm run` (one-shot, local) and by the controller's run scheduler.
//!
//! This module: [`prepare`] (inputs), [`execute`] (the program, output through
//! [`Redactor`]), [`collect_artifacts`]. Beside it: [`host_access`] (reading host files and
//! cloning with the submitter's rights), [`artifacts`] (unpacking the guest's tar stream
//! into the run directory), [`monitor`] (sampling the VM while the run goes on) and
//! [`anomaly`] (the rules it applies).

pub mod anomaly;
pub mod artifacts;
pub mod host_access;
pub mod monitor;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_api::{AgentRunSpec, Entrypoint};
use agentvm_backend::guest::{AgentChannel, ExecOutcome, ExecRequest, Guest, Stream, RUN_CGROUP};
use agentvm_backend::BackendError;

use crate::artifacts::{ArchiveError, Budget, RejectReason, Rejection, RunDir};
use crate::host_access::{HostAccess, MAX_INPUT_FILE_BYTES, MAX_WORKSPACE_BYTES};

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
    /// Reading the host inputs did not finish in time (a hung file system, a FIFO, ...).
    #[error("reading the run's host inputs (files, secrets, workspace) did not finish within {}s; the run is failed instead of waiting for them", .after.as_secs())]
    InputsTimedOut {
        /// How long they were waited for.
        after: std::time::Duration,
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

/// Read secrets, input files and the workspace on the host, through `access` (with the
/// rights of whoever submitted the run). `base` resolves relative paths (the manifest's
/// directory); `host_env` looks up host environment variables.
pub fn prepare(
    spec: &AgentRunSpec,
    base: &Path,
    access: &HostAccess,
    host_env: &dyn Fn(&str) -> Option<String>,
) -> Result<PreparedRun, RunError> {
    let mut env = spec.env.clone();
    let mut secret_values = Vec::new();
    for s in &spec.secret_env {
        let secret_err = |message: String| RunError::Secret {
            name: s.name.clone(),
            message,
        };
        let value = match (&s.from_env, &s.from_file) {
            (Some(var), None) => access.env_var(var, host_env).map_err(secret_err)?,
            (None, Some(file)) => {
                let path = resolve(base, file);
                let bytes = access
                    .read_file(&path, MAX_INPUT_FILE_BYTES)
                    .map_err(|m| secret_err(format!("fromFile {}: {m}", path.display())))?;
                let v = String::from_utf8(bytes).map_err(|_| {
                    secret_err(format!("fromFile {}: is not UTF-8 text", path.display()))
                })?;
                v.strip_suffix('\n').unwrap_or(&v).to_string()
            }
            _ => return Err(secret_err("set exactly one of fromEnv and fromFile".into())),
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
                access
                    .read_file(&path, MAX_INPUT_FILE_BYTES)
                    .map_err(|message| RunError::Input {
                        what: "files",
                        path: path.clone(),
                        message,
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
            let (tar, source) = match (&ws.host_path, &ws.git_url) {
                (Some(p), None) => {
                    let dir = resolve(base, p);
                    (access.tar_dir(&dir, MAX_WORKSPACE_BYTES), dir)
                }
                (None, Some(url)) => (
                    access.clone_workspace(url, ws.git_ref.as_deref(), MAX_WORKSPACE_BYTES),
                    PathBuf::from(url),
                ),
                _ => {
                    return Err(RunError::Input {
                        what: "workspace",
                        path: PathBuf::new(),
                        message: "set exactly one of hostPath and gitUrl".into(),
                    })
                }
            };
            let tar = tar.map_err(|message| RunError::Input {
                what: "workspace",
                path: source,
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

/// Rejections listed in [`ArtifactReport::rejected_message`]; the rest are counted.
const REJECTIONS_LISTED: usize = 20;

/// What [`collect_artifacts`] did with each declared path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactReport {
    /// The run's own directory the artifacts were unpacked into.
    pub dir: PathBuf,
    /// Copied to the host.
    pub collected: Vec<Artifact>,
    /// Declared paths that did not exist in the guest.
    pub missing: Vec<String>,
    /// Paths left in the guest because they did not fit in what was left of the size cap,
    /// with their packed size in bytes.
    pub skipped: Vec<(String, u64)>,
    /// Entries not unpacked (links, devices, paths leading out, ...), and archives refused
    /// whole; at most [`artifacts::MAX_REJECTIONS_KEPT`] of them.
    pub rejected: Vec<Rejection>,
    /// How many there were in all.
    pub rejected_total: usize,
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

    /// A one-line summary of the rejected entries, for a condition message.
    pub fn rejected_message(&self) -> String {
        let list: Vec<String> = self
            .rejected
            .iter()
            .take(REJECTIONS_LISTED)
            .map(ToString::to_string)
            .collect();
        let more = self.rejected_total.saturating_sub(list.len());
        format!(
            "not unpacked (only regular files and directories are): {}{}",
            list.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        )
    }

    fn reject(&mut self, r: Rejection) {
        self.rejected_total += 1;
        if self.rejected.len() < artifacts::MAX_REJECTIONS_KEPT {
            self.rejected.push(r);
        }
    }
}

/// Copy `paths` out of the guest into the run's directory `dir` (one tar stream per path,
/// read in chunks and unpacked by [`artifacts::unpack`]: regular files and directories
/// only, nothing outside `dir`, see there). The packed size of everything collected stays
/// within `max_bytes`: a path whose tar the guest says does not fit in what is left is not
/// copied at all (never cut in half) and is reported in [`ArtifactReport::skipped`]; a guest
/// that said less and sends more, or sends a malformed archive, gets that archive refused
/// whole ([`ArtifactReport::rejected`]). The following paths are still tried.
pub fn collect_artifacts<C: AgentChannel + ?Sized>(
    g: &Guest<'_, C>,
    paths: &[String],
    dir: &mut RunDir,
    max_bytes: u64,
) -> Result<ArtifactReport, RunError> {
    let mut report = ArtifactReport {
        dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let mut budget = Budget::new(max_bytes);
    let host_err = |path: &Path, e: &dyn std::fmt::Display| RunError::Input {
        what: "artifacts",
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let tmp = "/var/tmp/agentvm-artifact.tar";
    for p in paths {
        // Pack, then print the tar's size (so an artifact over the cap is never read). Hard
        // links in the guest are stored as the files they are (links are never unpacked).
        let req = ExecRequest::new(
            "/bin/sh",
            [
                "-c",
                r#"[ -e "$1" ] || [ -L "$1" ] || exit 3; tar --hard-dereference -C "$(dirname "$1")" -cf "$2" "$(basename "$1")" && wc -c < "$2""#,
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
        if size > budget.packed_bytes {
            report.skipped.push((p.clone(), size));
            continue;
        }
        let Some(name) = Path::new(p).file_name() else {
            report.missing.push(p.clone());
            continue;
        };
        let mut reader = g.open_reader(tmp)?;
        let unpacked = artifacts::unpack(&mut reader, dir, name.as_bytes(), &mut budget);
        match unpacked {
            Ok(u) => {
                for r in u.rejected {
                    report.reject(r);
                }
                if let Some(host_path) = u.host_path {
                    report.collected.push(Artifact {
                        guest_path: p.clone(),
                        host_path,
                        size_bytes: u.file_bytes,
                        sha256: u.sha256,
                    });
                }
            }
            Err(e) if e.is_archive_fault() => report.reject(Rejection {
                entry: p.clone(),
                reason: RejectReason::Archive(e.to_string()),
            }),
            Err(ArchiveError::Read(e)) => {
                return Err(match reader.take_error() {
                    Some(b) => RunError::Backend(b),
                    None => host_err(Path::new(p), &e),
                })
            }
            Err(e) => return Err(host_err(dir.path(), &e)),
        }
    }
    // Best effort: the VM is reset after the run anyway.
    let _ = g.exec(&ExecRequest::new("/bin/rm", ["-f", tmp]), &mut |_, _| {});
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_and_rejected_artifacts_are_summed_up_in_one_line() {
        let mut report = ArtifactReport {
            skipped: vec![("/root/big".into(), 2_100_000)],
            ..Default::default()
        };
        assert_eq!(
            report.skipped_message(1 << 20),
            "not collected, over the size cap of 1048576 bytes: /root/big (2100000 bytes)"
        );
        for i in 0..25 {
            report.reject(Rejection {
                entry: format!("out/dev{i}"),
                reason: RejectReason::CharDevice,
            });
        }
        let m = report.rejected_message();
        assert!(
            m.starts_with("not unpacked (only regular files and directories are): out/dev0: character device; out/dev1: character device;"),
            "{m}"
        );
        assert!(
            m.ends_with("out/dev19: character device; and 5 more"),
            "{m}"
        );
    }

    /// A tar of `/root/out` as a guest would pack it, with `extra` entries appended.
    fn guest_tar(
        files: &[(&str, &[u8])],
        extra: impl FnOnce(&mut tar::Builder<Vec<u8>>),
    ) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o4755);
            h.set_uid(4242);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        extra(&mut b);
        b.into_inner().unwrap()
    }

    fn collect(
        agent: &agentvm_backend::fake_agent::FakeAgent,
        paths: &[&str],
        cap: u64,
    ) -> (tempfile::TempDir, ArtifactReport) {
        let tmp = tempfile::tempdir().unwrap();
        let mut dir = RunDir::create(&tmp.path().join("artifacts"), "r", None).unwrap();
        let g = Guest::new(agent);
        let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
        let report = collect_artifacts(&g, &paths, &mut dir, cap).unwrap();
        (tmp, report)
    }

    #[test]
    fn collected_artifacts_keep_regular_files_and_name_what_was_skipped() {
        use std::os::unix::fs::PermissionsExt;
        let agent = agentvm_backend::fake_agent::FakeAgent::new("vm");
        let tar = guest_tar(&[("out/a.txt", b"hello\n")], |b| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, "out/shadow", "/etc/shadow").unwrap();
        });
        let size = tar.len() as u64;
        agent.put_artifact("/root/out", tar, size);
        agent.put_artifact(
            "/root/one.txt",
            guest_tar(&[("one.txt", b"1")], |_| {}),
            10240,
        );
        let (_tmp, report) = collect(
            &agent,
            &["/root/out", "/root/nope", "/root/one.txt"],
            1 << 20,
        );
        assert_eq!(report.missing, ["/root/nope"]);
        assert_eq!(report.collected.len(), 2, "{report:?}");
        let out = &report.collected[0];
        assert_eq!(out.host_path, report.dir.join("out"));
        assert_eq!((out.size_bytes, out.sha256.as_deref()), (6, None));
        let mode = std::fs::metadata(report.dir.join("out/a.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert_eq!(report.collected[1].host_path, report.dir.join("one.txt"));
        assert!(report.collected[1].sha256.is_some());
        assert_eq!(report.rejected_total, 1);
        assert_eq!(
            report.rejected[0].to_string(),
            "out/shadow: symbolic link to /etc/shadow"
        );
        assert!(std::fs::symlink_metadata(report.dir.join("out/shadow")).is_err());
    }

    #[test]
    fn a_guest_that_says_its_archive_is_small_and_sends_more_gets_it_refused() {
        let agent = agentvm_backend::fake_agent::FakeAgent::new("vm");
        let big = vec![7u8; 3000];
        let tar = guest_tar(&[("out/a", &big), ("out/b", &big)], |_| {});
        assert_eq!(tar.len(), 8192);
        agent.put_artifact("/root/out", tar, 100);
        let next = guest_tar(&[("next.txt", b"n")], |_| {});
        let next_size = next.len() as u64;
        agent.put_artifact("/root/next.txt", next, next_size);
        let (_tmp, report) = collect(&agent, &["/root/out", "/root/next.txt"], 6000);
        assert_eq!(report.rejected_total, 1, "{report:?}");
        assert_eq!(report.rejected[0].entry, "/root/out");
        assert!(
            matches!(&report.rejected[0].reason, RejectReason::Archive(m) if m.contains("size cap")),
            "{:?}",
            report.rejected[0]
        );
        assert!(!report.dir.join("out").exists(), "nothing of it kept");
        // What was read of it counts: the next path does not fit any more.
        assert!(report.collected.is_empty(), "{report:?}");
        assert_eq!(report.skipped, [("/root/next.txt".to_string(), next_size)]);
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
        let own = HostAccess::own(Duration::from_secs(10));
        let p = prepare(&spec, dir.path(), &own, &|k| {
            (k == "HOST_A").then(|| "from-env".into())
        })
        .unwrap();
        assert_eq!(p.env["A"], "from-env");
        assert_eq!(p.env["B"], "from-file");
        assert!(!format!("{p:?}").contains("from-env"));
        let err = prepare(&spec, dir.path(), &own, &|_| None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "secretEnv A: host environment variable HOST_A is not set; export it before submitting the run"
        );
    }
}
