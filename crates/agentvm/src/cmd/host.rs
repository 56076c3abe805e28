//! `agentvm host setup`: install packages and start the libvirt daemons (idempotent);
//! `--service` (or `agentvm host install-service` alone) installs the controller as a
//! systemd service.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;
use clap::{Args, Subcommand};

/// The host setup script, shared with `scripts/host-setup.sh` (the README runs that one
/// before agentvm is built).
const HOST_SETUP: &str = include_str!("../../../../scripts/host-setup.sh");

/// The controller's systemd unit, with `@AGENTVM@` and `@SPEC_DIR@` to fill in.
const UNIT_TEMPLATE: &str = include_str!("../../../../deploy/agentvm-controller.service");

/// The unit's file name.
pub const UNIT_NAME: &str = "agentvm-controller.service";

/// Host preparation commands.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Install system packages and start virtlogd and libvirtd when they are not running.
    Setup(SetupArgs),
    /// Install the controller as a systemd service (binary, unit, spec directory) and start
    /// it when systemd runs this host.
    InstallService(ServiceArgs),
}

/// Where the controller service goes.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// Directory for the unit file.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// Directory the running `agentvm` binary is copied to (the unit runs it from there).
    #[arg(long, value_name = "DIR", default_value = "/usr/local/bin")]
    bin_dir: PathBuf,
    /// The spec directory the service watches (created if missing).
    #[arg(long, value_name = "DIR", default_value = "/etc/agentvm/specs")]
    spec_dir: PathBuf,
    /// Install only: do not enable or start the service.
    #[arg(long)]
    no_start: bool,
}

/// Options of `host setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only install packages; start nothing.
    #[arg(long)]
    packages_only: bool,
    /// Start libvirtd inside this network namespace (used by the test suite).
    #[arg(long, value_name = "NAME")]
    netns: Option<String>,
    /// Then install the controller as a systemd service (see `agentvm host install-service`).
    #[arg(long, conflicts_with_all = ["packages_only", "netns"])]
    service: bool,
    #[command(flatten)]
    service_args: ServiceArgs,
}

impl HostCommand {
    /// Run the subcommand.
    pub fn run(self) -> anyhow::Result<i32> {
        match self {
            HostCommand::Setup(a) => {
                let mut args = vec!["-s".to_string(), "--".to_string()];
                if a.packages_only {
                    args.push("--packages-only".into());
                }
                if let Some(ns) = a.netns {
                    args.push("--netns".into());
                    args.push(ns);
                }
                let mut child = Command::new("bash")
                    .args(&args)
                    .stdin(Stdio::piped())
                    .spawn()
                    .context("starting bash for host setup")?;
                child
                    .stdin
                    .take()
                    .expect("piped stdin")
                    .write_all(HOST_SETUP.as_bytes())
                    .context("sending the setup script to bash")?;
                let status = child.wait()?;
                if !status.success() || !a.service {
                    return Ok(status.code().unwrap_or(1));
                }
                install_service(&a.service_args)?;
                Ok(0)
            }
            HostCommand::InstallService(a) => {
                install_service(&a)?;
                Ok(0)
            }
        }
    }
}

/// The unit for a binary at `agentvm` watching `spec_dir`.
pub fn unit_text(agentvm: &Path, spec_dir: &Path) -> anyhow::Result<String> {
    for (what, p) in [("binary", agentvm), ("spec directory", spec_dir)] {
        let s = p.to_str().context("a path for the unit must be UTF-8")?;
        if !p.is_absolute() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            anyhow::bail!("the {what} {s:?} must be an absolute path without spaces");
        }
    }
    Ok(UNIT_TEMPLATE
        .replace("@AGENTVM@", &agentvm.display().to_string())
        .replace("@SPEC_DIR@", &spec_dir.display().to_string()))
}

/// Writes `data` to `path` through a temporary file beside it, with `mode`.
fn write_atomically(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("agentvm-new");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

fn install_service(a: &ServiceArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this agentvm binary")?;
    let target = a.bin_dir.join("agentvm");
    // Checked before anything is written.
    let unit = unit_text(&target, &a.spec_dir)?;
    std::fs::create_dir_all(&a.bin_dir)
        .with_context(|| format!("creating {}", a.bin_dir.display()))?;
    let same = match (exe.canonicalize(), target.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    };
    if !same {
        let bytes = std::fs::read(&exe).with_context(|| format!("reading {}", exe.display()))?;
        write_atomically(&target, &bytes, 0o755)?;
        eprintln!("installed {} → {}", exe.display(), target.display());
    }
    std::fs::create_dir_all(&a.spec_dir)
        .with_context(|| format!("creating {}", a.spec_dir.display()))?;
    std::fs::create_dir_all(&a.unit_dir)
        .with_context(|| format!("creating {}", a.unit_dir.display()))?;
    let unit_path = a.unit_dir.join(UNIT_NAME);
    write_atomically(&unit_path, unit.as_bytes(), 0o644)?;
    eprintln!(
        "wrote {} (watches {})",
        unit_path.display(),
        a.spec_dir.display()
    );
    if a.no_start {
        return Ok(());
    }
    if !Path::new("/run/systemd/system").exists() {
        eprintln!(
            "systemd does not run this host: the service is installed but not started. \
             Run the controller yourself: {} controller --spec-dir {}",
            target.display(),
            a.spec_dir.display()
        );
        return Ok(());
    }
    for args in [&["daemon-reload"][..], &["enable", "--now", UNIT_NAME][..]] {
        let status = Command::new("systemctl")
            .args(args)
            .status()
            .context("running systemctl")?;
        if !status.success() {
            anyhow::bail!("systemctl {} failed ({status})", args.join(" "));
        }
    }
    eprintln!(
        "started {UNIT_NAME}; see `systemctl status {UNIT_NAME}` and `journalctl -u {UNIT_NAME}`"
    );
    Ok(())
}
