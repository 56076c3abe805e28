//! `AgentRun`: one execution of a script or command in a VM taken from a pool.

use crate::time::Timestamp;
use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::resource_object;
use crate::meta::Condition;

resource_object!(
    /// One execution: take a VM from `poolRef`, copy files and the workspace
    /// in, run the script or command with the given environment, enforce the
    /// timeout, collect output and artifacts, then reset the VM.
    AgentRun,
    AgentRunSpec,
    AgentRunStatus
);

/// Default `timeoutSeconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u32 = 300;
/// Largest `timeoutSeconds` (one hour).
pub const MAX_TIMEOUT_SECONDS: u32 = 3600;
/// Default script interpreter.
pub const DEFAULT_INTERPRETER: &str = "python3";
/// Default guest path of the workspace.
pub const DEFAULT_WORKSPACE_PATH: &str = "/workspace";
/// Default artifact size cap, MiB.
pub const DEFAULT_ARTIFACTS_MAX_SIZE_MIB: u32 = 64;
/// Largest artifact size cap, MiB.
pub const MAX_ARTIFACTS_MAX_SIZE_MIB: u32 = 1024;
/// Default `output.maxMib`: output kept per stream, MiB.
pub const DEFAULT_OUTPUT_MAX_MIB: u32 = 10;
/// Largest `output.maxMib`. The controller stores the kept output (up to twice this per run:
/// stdout and stderr) and holds up to that much in memory while the run goes on.
pub const MAX_OUTPUT_MAX_MIB: u32 = 64;
/// Largest inline content (script source, file content), bytes.
pub const MAX_INLINE_BYTES: usize = 1024 * 1024;
/// Default mode of files copied in.
pub const DEFAULT_FILE_MODE: &str = "0644";

fn default_timeout_seconds() -> u32 {
    DEFAULT_TIMEOUT_SECONDS
}
fn default_interpreter() -> String {
    DEFAULT_INTERPRETER.to_string()
}
fn default_workspace_path() -> String {
    DEFAULT_WORKSPACE_PATH.to_string()
}
fn default_artifacts_max_size_mib() -> u32 {
    DEFAULT_ARTIFACTS_MAX_SIZE_MIB
}
fn default_output_max_mib() -> u32 {
    DEFAULT_OUTPUT_MAX_MIB
}
fn default_file_mode() -> String {
    DEFAULT_FILE_MODE.to_string()
}

/// Desired state of an `AgentRun`. Set exactly one of `script` and `command`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentRunSpec {
    /// Name of the `VmPool` to take a VM from; the VM is reset after the
    /// run. Exclusive with `sandboxRef`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pool_ref: String,
    /// Name of a `Sandbox` to run in instead: its VM is not reset after the
    /// run, so what the run leaves is there for the next command or run
    /// (and the run counts as the sandbox's activity). Exclusive with
    /// `poolRef`. Only root and the sandbox's owner may run in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_ref: Option<String>,
    /// Inline program run by an interpreter. Exclusive with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<Script>,
    /// Program already in the image, with arguments. Exclusive with `script`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    /// Plain environment variables (`NAME: value`). Do not put secrets
    /// here: they are stored and shown; use `secretEnv`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values are read on the host when the run
    /// starts, from a host environment variable or file. The values are never
    /// stored in the manifest store or shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secret_env: Vec<SecretEnvVar>,
    /// Files written into the guest before the run starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<InputFile>,
    /// A directory tree copied into the guest before the run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<Workspace>,
    /// Absolute guest directory the program starts in. Default: the
    /// workspace path when there is a workspace, otherwise `/root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Guest files or directories copied back to the host after the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<Artifacts>,
    /// Seconds the program may run before it is killed and the run ends
    /// `TimedOut` (1 to 3600). Default 300.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,
    /// How much of the program's output is kept. Default: 10 MiB per stream.
    #[serde(default, skip_serializing_if = "OutputLimit::is_default")]
    pub output: OutputLimit,
}

/// The cap on a run's kept output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutputLimit {
    /// MiB kept of each stream (stdout and stderr each), 1 to 64. The first
    /// bytes are kept (shown by `agentvm logs`, stored by the controller);
    /// what the program writes beyond them is counted and dropped, and the
    /// run gets the condition `OutputTruncated` with the byte counts.
    /// Default 10.
    #[serde(default = "default_output_max_mib")]
    #[schemars(range(min = 1, max = 64))]
    pub max_mib: u32,
}

impl Default for OutputLimit {
    fn default() -> Self {
        Self {
            max_mib: DEFAULT_OUTPUT_MAX_MIB,
        }
    }
}

impl OutputLimit {
    /// True when it is the default (then it is not written out).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The cap per stream in bytes.
    pub fn max_bytes(&self) -> u64 {
        u64::from(self.max_mib) << 20
    }
}

/// What an `AgentRun` executes: its `script` or its `command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entrypoint<'a> {
    /// An inline script.
    Script(&'a Script),
    /// A program with arguments.
    Command(&'a Command),
}

impl AgentRunSpec {
    /// A run of `command` on `pool` with everything else defaulted.
    pub fn command(pool: impl Into<String>, program: impl Into<String>, args: Vec<String>) -> Self {
        Self::with_entry(
            pool,
            None,
            Some(Command {
                program: program.into(),
                args,
            }),
        )
    }

    /// A run of a python3 `source` on `pool` with everything else defaulted.
    pub fn python(pool: impl Into<String>, source: impl Into<String>) -> Self {
        Self::with_entry(
            pool,
            Some(Script {
                interpreter: default_interpreter(),
                source: source.into(),
            }),
            None,
        )
    }

    fn with_entry(
        pool: impl Into<String>,
        script: Option<Script>,
        command: Option<Command>,
    ) -> Self {
        Self {
            pool_ref: pool.into(),
            sandbox_ref: None,
            script,
            command,
            env: BTreeMap::new(),
            secret_env: Vec::new(),
            files: Vec::new(),
            workspace: None,
            working_dir: None,
            artifacts: None,
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
            output: OutputLimit::default(),
        }
    }

    /// The script or command; `None` if neither or both are set (invalid).
    pub fn entrypoint(&self) -> Option<Entrypoint<'_>> {
        match (&self.script, &self.command) {
            (Some(s), None) => Some(Entrypoint::Script(s)),
            (None, Some(c)) => Some(Entrypoint::Command(c)),
            _ => None,
        }
    }

    /// Makes every relative host path (`workspace.hostPath`, `files[].fromFile`,
    /// `secretEnv[].fromFile`) absolute by joining it to `base`, normally the
    /// directory of the manifest (see `ParsedResource::manifest_dir`).
    /// Absolute paths are left alone.
    pub fn resolve_host_paths(&mut self, base: &std::path::Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                // `./data` becomes `<base>/data`, not `<base>/./data`.
                *p = base
                    .join(&*p)
                    .components()
                    .filter(|c| *c != std::path::Component::CurDir)
                    .collect();
            }
        };
        if let Some(path) = self.workspace.as_mut().and_then(|w| w.host_path.as_mut()) {
            fix(path);
        }
        for path in self.files.iter_mut().filter_map(|f| f.from_file.as_mut()) {
            fix(path);
        }
        for path in self
            .secret_env
            .iter_mut()
            .filter_map(|s| s.from_file.as_mut())
        {
            fix(path);
        }
    }

    /// The working directory in effect (see `workingDir`).
    pub fn effective_working_dir(&self) -> &str {
        match (&self.working_dir, &self.workspace) {
            (Some(dir), _) => dir,
            (None, Some(ws)) => &ws.path,
            (None, None) => "/root",
        }
    }
}

/// An inline program and the interpreter that runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Script {
    /// Program that runs the source, by name on the guest's `PATH` or as an
    /// absolute path: `python3` (default), `bash`, `node`, ... The source is
    /// written to a file in the guest and passed as the only argument.
    #[serde(default = "default_interpreter")]
    pub interpreter: String,
    /// The program text (at most 1 MiB).
    pub source: String,
}

/// A program in the image and its arguments (no shell involved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Command {
    /// Program name on the guest's `PATH` (`claude`) or absolute path.
    /// Use `program: /bin/sh` with `args: ["-c", "..."]` for shell syntax.
    pub program: String,
    /// Arguments, passed as-is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
}

/// An environment variable whose value comes from the host at run time.
/// Set exactly one of `fromEnv` and `fromFile`; literal values are not
/// accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretEnvVar {
    /// Variable name in the guest, e.g. `ANTHROPIC_API_KEY`.
    pub name: String,
    /// Name of the host environment variable holding the value: the
    /// controller's for a run applied to it (users other than root may name
    /// only those in its `secretEnvAllowList`), yours with `agentvm run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    /// Host file holding the value (trailing newline stripped, at most
    /// 64 MiB). Relative paths are resolved against the directory of the
    /// manifest. Read with the rights of whoever submitted the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<PathBuf>,
}

/// A file written into the guest. Set exactly one of `content` and `fromFile`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputFile {
    /// Absolute guest path, e.g. `/workspace/input.csv`. Parent
    /// directories are created.
    pub path: String,
    /// Inline text content (at most 1 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Host file to copy (at most 64 MiB). Relative paths are resolved
    /// against the directory of the manifest. Read with the rights of
    /// whoever submitted the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<PathBuf>,
    /// Octal permission bits, e.g. `"0755"` for an executable. Default `"0644"`.
    #[serde(default = "default_file_mode")]
    #[schemars(regex(pattern = r"^0?[0-7]{3}$"))]
    pub mode: String,
}

impl InputFile {
    /// The permission bits of `mode`, if it is valid octal.
    pub fn mode_bits(&self) -> Option<u32> {
        u32::from_str_radix(&self.mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
    }
}

/// A directory tree copied into the guest. Set exactly one of `hostPath`
/// and `gitUrl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workspace {
    /// Host directory copied in (at most 1 GiB as tar). Relative paths are
    /// resolved against the directory of the manifest. Read with the rights
    /// of whoever submitted the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<PathBuf>,
    /// Git repository cloned on the host, over the host's network, and
    /// copied in (`https://`, `http://`, `ssh://`, `git://` or
    /// `user@host:path`). Anonymous: no credentials, SSH keys or agent are
    /// used; the controller gives up after `gitCloneTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_url: Option<String>,
    /// Branch, tag or commit to check out. Only with `gitUrl`. Default: the
    /// remote's default branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Absolute guest directory the tree lands in. Default `/workspace`.
    #[serde(default = "default_workspace_path")]
    pub path: String,
}

/// Guest paths copied back to the host when the run ends (also after a
/// failure or timeout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Artifacts {
    /// Absolute guest paths of files or directories (collected recursively).
    /// Missing paths are reported in status (an `ArtifactsMissing`
    /// condition), not an error. Only regular files and directories are
    /// unpacked on the host (modes 0640 and 0750, owned by the host); links,
    /// device nodes and FIFOs are skipped and named in an `ArtifactsRejected`
    /// condition.
    pub paths: Vec<String>,
    /// Cap on the total size collected, MiB (1 to 1024). A path that does
    /// not fit in what is left of the cap is not copied (never cut in half),
    /// and the run gets an `ArtifactsTruncated` condition naming it.
    /// Default 64.
    #[serde(default = "default_artifacts_max_size_mib")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_size_mib: u32,
}

/// Lifecycle phase of an `AgentRun`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AgentRunPhase {
    /// Waiting for a VM from the pool.
    #[default]
    Pending,
    /// A VM has been taken from the pool; inputs are being copied in.
    Scheduled,
    /// Executing in a VM.
    Running,
    /// The program exited 0.
    Succeeded,
    /// The program exited non-zero, or the run could not execute; see
    /// `exitCode`, `reason` and `conditions`.
    Failed,
    /// Killed after `timeoutSeconds`.
    TimedOut,
    /// Stopped on request.
    Cancelled,
}

impl AgentRunPhase {
    /// The phase as written on the wire (`Pending`, `TimedOut`, ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentRunPhase::Pending => "Pending",
            AgentRunPhase::Scheduled => "Scheduled",
            AgentRunPhase::Running => "Running",
            AgentRunPhase::Succeeded => "Succeeded",
            AgentRunPhase::Failed => "Failed",
            AgentRunPhase::TimedOut => "TimedOut",
            AgentRunPhase::Cancelled => "Cancelled",
        }
    }

    /// True once the run has ended and will not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            AgentRunPhase::Succeeded
                | AgentRunPhase::Failed
                | AgentRunPhase::TimedOut
                | AgentRunPhase::Cancelled
        )
    }
}

/// Observed state of an `AgentRun`, written by the controller.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentRunStatus {
    /// Where the run is in its lifecycle.
    #[serde(default)]
    pub phase: AgentRunPhase,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current observations (`Scheduled`, `Completed`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Name of the VM (libvirt domain) the run executes in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// The cluster node that runs (or ran) the program; its output is kept there. Absent
    /// on a single host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Exit code of the program, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// When the program started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When the run ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Last part of standard output (capped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout_tail: String,
    /// Last part of standard error (capped).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
    /// Artifacts collected to the host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<CollectedArtifact>,
    /// Unusual behaviour detected during the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<Anomaly>,
    /// Resources the VM used during the run (once it has ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_usage: Option<ResourceUsage>,
    /// Connections and DNS lookups the egress proxy refused or carried for the run (with a
    /// domain filter; once it has ended): totals and the busiest destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressSummary>,
    /// Output the program wrote and how much of it was dropped at the cap
    /// (`output.maxMib`), once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<OutputCount>,
    /// Which guest agent ran the program: `agentvm-guest` (agentvm's own) or
    /// `qemu-guest-agent` (the fallback, for a guest whose own agent did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<String>,
    /// CamelCase reason for the current phase (`Completed`, `NonZeroExit`,
    /// `Timeout`, `PoolNotFound`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Most destinations an [`EgressSummary`] lists.
pub const MAX_EGRESS_DESTINATIONS: usize = 50;

/// A run's traffic through the egress proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressSummary {
    /// Connections (and refused DNS lookups) in all.
    pub connections: u64,
    /// How many were allowed.
    pub allowed: u64,
    /// How many were refused.
    pub refused: u64,
    /// Bytes from the guest, over all connections.
    pub bytes_out: u64,
    /// Bytes to the guest, over all connections.
    pub bytes_in: u64,
    /// Per (domain, port, verdict), busiest first, at most 50.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<EgressDestination>,
    /// More destinations were seen than listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Connections of a run to one destination with one verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EgressDestination {
    /// The name asked for (`-` when none was sent).
    pub domain: String,
    /// Destination port.
    pub port: u16,
    /// `allowed`, `denied`, `no_name`, `dns_denied`, ...
    pub verdict: String,
    /// How many.
    pub connections: u64,
    /// Bytes from the guest.
    pub bytes_out: u64,
    /// Bytes to the guest.
    pub bytes_in: u64,
}

impl EgressSummary {
    /// Counts one connection, keeping at most [`MAX_EGRESS_DESTINATIONS`] destinations
    /// (a new one beyond that only counts in the totals and sets `truncated`).
    pub fn add(&mut self, domain: &str, port: u16, verdict: &str, bytes_out: u64, bytes_in: u64) {
        self.connections += 1;
        if verdict == "allowed" {
            self.allowed += 1;
        } else {
            self.refused += 1;
        }
        self.bytes_out += bytes_out;
        self.bytes_in += bytes_in;
        let full = self.destinations.len() >= MAX_EGRESS_DESTINATIONS;
        match self
            .destinations
            .iter_mut()
            .find(|d| d.domain == domain && d.port == port && d.verdict == verdict)
        {
            Some(d) => {
                d.connections += 1;
                d.bytes_out += bytes_out;
                d.bytes_in += bytes_in;
            }
            None if full => self.truncated = true,
            None => self.destinations.push(EgressDestination {
                domain: domain.to_string(),
                port,
                verdict: verdict.to_string(),
                connections: 1,
                bytes_out,
                bytes_in,
            }),
        }
        self.destinations
            .sort_by_key(|d| std::cmp::Reverse(d.connections));
    }
}

/// Bytes a run's program wrote, and what of it was not kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputCount {
    /// Bytes written to standard output.
    #[serde(default)]
    pub stdout_bytes: u64,
    /// Bytes written to standard error.
    #[serde(default)]
    pub stderr_bytes: u64,
    /// Bytes dropped beyond the cap, both streams together (0 when all was kept).
    #[serde(default)]
    pub dropped_bytes: u64,
}

/// An artifact copied from the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CollectedArtifact {
    /// Guest path it came from.
    pub path: String,
    /// Where it is on the host.
    pub host_path: String,
    /// Size in bytes (for a directory: of the regular files in it).
    #[serde(default)]
    pub size_bytes: u64,
    /// sha256 of the content, hex (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Unusual behaviour detected from the VM's statistics during a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    /// Which rule fired: `CpuSaturated`, `DiskWriteBurst`, `NetworkTxBurst`,
    /// `MemoryNearLimit`, `ProcessExplosion` or `BaselineDeviation`.
    pub rule: String,
    /// The metric it looked at, with its unit: `cpu_percent`,
    /// `disk_write_bytes_per_second`, `net_tx_bytes_per_second`,
    /// `memory_used_bytes` or `processes`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metric: String,
    /// The value observed, in the metric's unit.
    #[serde(default)]
    pub observed: u64,
    /// The threshold it reached, in the metric's unit.
    #[serde(default)]
    pub threshold: u64,
    /// Human-readable details with the observed values.
    pub message: String,
    /// When it was detected (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detected_at: Option<Timestamp>,
}

/// Resources a run's VM used while the run executed, from the same samples
/// anomaly detection reads (about one a second).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceUsage {
    /// vCPU time used, in milliseconds.
    pub cpu_milliseconds: u64,
    /// Highest memory use seen in the guest (not counting reclaimable
    /// cache), in bytes; 0 when the guest did not report it.
    pub peak_memory_bytes: u64,
    /// Bytes read from the VM's disks.
    pub disk_read_bytes: u64,
    /// Bytes written to the VM's disks.
    pub disk_write_bytes: u64,
    /// Bytes received on the VM's network interfaces.
    pub net_rx_bytes: u64,
    /// Bytes sent on the VM's network interfaces.
    pub net_tx_bytes: u64,
    /// Most tasks (processes and threads) seen in the guest; 0 when unknown.
    #[serde(default)]
    pub peak_processes: u64,
    /// Samples these figures come from.
    pub samples: u64,
}
