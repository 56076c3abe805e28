//! `agentvm exec -- CMD ARGS..`: one command in a fresh, isolated, throw-away VM.

use std::io::Write;
use std::time::Duration;

use agentvm_backend::guest::{ExecRequest, Guest, Stream};
use agentvm_backend::vm::{resolve_accelerator, EphemeralVm, VmShape};
use agentvm_backend::{Libvirt, Owner};
use agentvm_controller::Config;
use agentvm_image::Recipe;
use anyhow::Context;
use clap::Args;

/// Options of `exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// Kill the command after this long (`90`, `90s`, `5m`, `1h`).
    #[arg(long, alias = "timeout-seconds", default_value = "5m", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    /// Environment variable for the command, `KEY=VALUE` (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    /// Program and arguments to run in the guest.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

impl ExecArgs {
    /// Boot, run, print, tear down. Exits with the guest command's exit code.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let img = super::image::ensure_image(cfg, &Recipe::default())?;
        let image = super::image::boot_image(&img);
        let lv = Libvirt::connect(&cfg.libvirt_uri)?;
        let (accel, why) = resolve_accelerator(&lv, &cfg.state_dir, &image, cfg.accelerator)?;
        tracing::info!(%accel, %why, "accelerator");
        let shape = VmShape {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            nic: None,
            accelerator: accel,
            boot_timeout: Duration::from_secs(cfg.boot_timeout_seconds),
            limits: Default::default(),
            disabled_cpu_features: Vec::new(),
            tcg_tb_cache_mib: cfg.tcg_tb_cache(),
            disk_gib: None,
        };
        let name = format!("agentvm-exec-{}", std::process::id());
        eprintln!("booting isolated VM {name} ({accel})...");
        let owner = Owner {
            kind: "Exec".into(),
            name: name.clone(),
            ..Owner::default()
        };
        let vm = EphemeralVm::boot(&lv, &cfg.state_dir, &name, &image, &shape, owner)
            .context("booting the VM")?;
        eprintln!(
            "guest agent answered after {:.1}s",
            vm.boot_time.as_secs_f64()
        );
        let mut req = ExecRequest::new(&self.command[0], self.command[1..].iter().cloned());
        req.timeout = self.timeout;
        req.cwd = self.workdir.clone();
        for kv in &self.env {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--env {kv:?}: expected KEY=VALUE"))?;
            req.env.insert(k.to_string(), v.to_string());
        }
        let agent = vm.agent()?;
        let outcome = Guest::new(&agent).exec(&req, &mut |s, data| {
            let _ = match s {
                Stream::Stdout => std::io::stdout().write_all(data),
                Stream::Stderr => std::io::stderr().write_all(data),
            };
        });
        let _ = std::io::stdout().flush();
        vm.teardown().context("tearing the VM down")?;
        let outcome = outcome?;
        if outcome.stdout_truncated() || outcome.stderr_truncated() {
            eprintln!(
                "note: output truncated at {} bytes per stream (stdout {} B, stderr {} B in total)",
                req.output_cap, outcome.stdout_total, outcome.stderr_total
            );
        }
        if outcome.timed_out {
            eprintln!(
                "killed after the {} timeout",
                humantime::format_duration(self.timeout)
            );
            return Ok(124);
        }
        Ok(match (outcome.exit_code, outcome.signal) {
            (Some(c), _) => c,
            (None, Some(sig)) => 128 + sig,
            _ => 1,
        })
    }
}
