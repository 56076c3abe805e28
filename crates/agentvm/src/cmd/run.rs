//! `agentvm run -f FILE`: execute the AgentRuns of a manifest set right here, each in a fresh
//! VM of its pool's shape, without a controller. Output streams to the terminal; the exit code
//! is the run's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use agentvm_api::{AgentRun, Image, Resource, VmPool};
use agentvm_backend::guest::{Guest, Stream};
use agentvm_backend::{EphemeralVm, LibvirtBackend, Owner, VmRequest};
use agentvm_controller::images::recipe_for;
use agentvm_controller::Config;
use agentvm_run::artifacts::RunDir;
use agentvm_run::host_access::HostAccess;
use agentvm_run::{collect_artifacts, execute, prepare, warmup_requests};
use anyhow::{bail, Context};
use clap::Args;

/// Options of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Manifest file or directory (`-` for stdin) declaring the AgentRun(s) with their VmPool
    /// and Image.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    files: Vec<PathBuf>,
    /// Only run the AgentRun with this name.
    #[arg(long)]
    name: Option<String>,
    /// Where collected artifacts go (a new subdirectory `<run>-<UTC time>` per run).
    #[arg(long, default_value = "agentvm-artifacts", value_name = "DIR")]
    artifacts_dir: PathBuf,
}

impl RunArgs {
    /// Run every selected AgentRun in order; the exit code is the first failure's (or 0).
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let parsed = super::manifests::load(&self.files)?;
        let mut images: Vec<&Image> = vec![];
        let mut pools: Vec<&VmPool> = vec![];
        let mut runs: Vec<(&AgentRun, PathBuf)> = vec![];
        for p in &parsed {
            match &p.resource {
                Resource::Image(i) => images.push(i),
                Resource::VmPool(v) => pools.push(v),
                Resource::AgentRun(r) => {
                    let base = Path::new(&p.source.file)
                        .parent()
                        .map(Path::to_path_buf)
                        .unwrap_or_default();
                    runs.push((r, base))
                }
                _ => {}
            }
        }
        runs.retain(|(r, _)| self.name.as_deref().is_none_or(|n| r.metadata.name == n));
        if runs.is_empty() {
            bail!(
                "no AgentRun{} in {:?}",
                self.name
                    .as_deref()
                    .map(|n| format!(" named {n}"))
                    .unwrap_or_default(),
                self.files
            );
        }
        let backend = super::local_backend(cfg);
        let mut exit = 0;
        for (run, base) in runs {
            let code = self.one(cfg, &backend, run, &base, &images, &pools)?;
            if exit == 0 {
                exit = code;
            }
        }
        Ok(exit)
    }

    fn one(
        &self,
        cfg: &Config,
        backend: &LibvirtBackend,
        run: &AgentRun,
        base: &Path,
        images: &[&Image],
        pools: &[&VmPool],
    ) -> anyhow::Result<i32> {
        let name = &run.metadata.name;
        if let Some(sandbox) = &run.spec.sandbox_ref {
            bail!("AgentRun {name} runs in Sandbox {sandbox}, which lives in the controller: apply it there (`agentvm apply -f`)");
        }
        let pool = pools
            .iter()
            .find(|p| p.metadata.name == run.spec.pool_ref)
            .with_context(|| format!("AgentRun {name}: VmPool {:?} is not declared in these files; `agentvm run` needs the pool and its image in the same manifest set", run.spec.pool_ref))?;
        if let Some(att) = pool.spec.template.network.attachment() {
            bail!(
                "AgentRun {name}: pool {} attaches network {}; `agentvm run` runs isolated pools only — apply the manifests to a controller for networked pools",
                pool.metadata.name,
                att.network_ref
            );
        }
        let image = images
            .iter()
            .find(|i| i.metadata.name == pool.spec.template.image_ref)
            .with_context(|| {
                format!(
                    "VmPool {}: Image {:?} is not declared in these files",
                    pool.metadata.name, pool.spec.template.image_ref
                )
            })?;
        agentvm_api::validate_pool_disk(&pool.spec, &image.metadata.name, &image.spec)
            .map_err(|e| anyhow::anyhow!("VmPool {}: {e}", pool.metadata.name))?;
        // The user's own rights and environment: this process is theirs.
        let access = HostAccess::own(cfg.git_clone_timeout());
        let prepared = prepare(&run.spec, base, &access, &|k| std::env::var(k).ok())
            .with_context(|| format!("AgentRun {name}"))?;
        let img = super::image::ensure_image(cfg, &recipe_for(&image.spec))?;
        let boot = super::image::boot_image(&img);
        let (accel, why) = backend.accelerator_for(&boot)?;
        tracing::info!(%accel, %why, "accelerator");
        let res = pool.spec.template.resources.resolved();
        let vm_name = format!("agentvm-run-{name}-{}", std::process::id());
        eprintln!(
            "run/{name}: booting VM {vm_name} (pool {}, {} vCPU, {} MiB, {accel})",
            pool.metadata.name, res.vcpu, res.memory_mib
        );
        for step in &pool.spec.template.warmup {
            let label = step.name.as_deref().unwrap_or(&step.run);
            eprintln!("run/{name}: warm-up: {label}");
        }
        // The pool's VM as the controller makes it (same shape, same limits), used once: not
        // parked.
        let req = VmRequest {
            name: vm_name,
            image: boot,
            vcpus: res.vcpu,
            memory_mib: u64::from(res.memory_mib),
            nic: None,
            owner: Owner {
                kind: agentvm_api::Kind::AgentRun.into(),
                name: name.clone(),
                spec_hash: String::new(),
                generation: 0,
            },
            warmup: warmup_requests(&pool.spec.template),
            limits: agentvm_controller::limits::vm_limits(&pool.spec.template.resources),
            disk_gib: Some(u64::from(res.disk_gib)),
            disabled_cpu_features: Vec::new(),
            park: false,
            from_template: false,
        };
        let vm = EphemeralVm::create(backend, &req).with_context(|| {
            format!(
                "AgentRun {name}: VM of pool {} (boot and warm-up)",
                pool.metadata.name
            )
        })?;
        eprintln!(
            "run/{name}: VM ready in {:.1}s; running",
            (vm.report.boot + vm.report.warmup).as_secs_f64()
        );
        for (limit, verdict) in &vm.report.limits {
            if let Err(why) = verdict {
                eprintln!("run/{name}: {limit} is not enforced by this host ({why}); the VM runs without it");
            }
        }
        let agent = vm.agent()?;
        let g = Guest::new(&*agent);
        let started = Instant::now();
        let result = execute(&g, &run.spec, &prepared, &mut || {}, &mut |s, d| {
            let _ = match s {
                Stream::Stdout => std::io::stdout().write_all(d),
                Stream::Stderr => std::io::stderr().write_all(d),
            };
        });
        let _ = std::io::stdout().flush();
        let artifacts = match (&result, &run.spec.artifacts) {
            (Ok(_), Some(a)) => RunDir::create(&self.artifacts_dir, name, None)
                .with_context(|| {
                    format!(
                        "creating a directory for run/{name} in {}",
                        self.artifacts_dir.display()
                    )
                })
                .and_then(|mut dir| {
                    collect_artifacts(&g, &a.paths, &mut dir, u64::from(a.max_size_mib) << 20)
                        .map_err(anyhow::Error::from)
                }),
            _ => Ok(Default::default()),
        };
        vm.teardown()?;
        let result = result.with_context(|| format!("AgentRun {name}"))?;
        if let Some(message) = result.truncated_message(run.spec.output.max_mib) {
            eprintln!("run/{name}: OutputTruncated: {message}");
        }
        let out = result.outcome;
        let report = artifacts?;
        for a in &report.collected {
            let sha = a
                .sha256
                .as_deref()
                .map(|h| format!(", sha256 {h}"))
                .unwrap_or_default();
            eprintln!(
                "run/{name}: artifact {} -> {} ({} bytes{sha})",
                a.guest_path,
                a.host_path.display(),
                a.size_bytes
            );
        }
        for p in &report.missing {
            eprintln!("run/{name}: artifact {p} not found in the guest");
        }
        if report.rejected_total > 0 {
            eprintln!(
                "run/{name}: ArtifactsRejected: {}",
                report.rejected_message()
            );
        }
        if !report.skipped.is_empty() {
            let cap = run
                .spec
                .artifacts
                .as_ref()
                .map_or(0, |a| u64::from(a.max_size_mib) << 20);
            eprintln!(
                "run/{name}: ArtifactsTruncated: {}",
                report.skipped_message(cap)
            );
        }
        let secs = started.elapsed().as_secs_f64();
        let (phase, code) = if out.timed_out {
            ("TimedOut", 124)
        } else if out.success() {
            ("Succeeded", 0)
        } else {
            (
                "Failed",
                out.exit_code.unwrap_or(128 + out.signal.unwrap_or(0)),
            )
        };
        eprintln!(
            "run/{name}: {phase} (exit {}) in {secs:.2}s",
            out.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| format!("signal {}", out.signal.unwrap_or(0)))
        );
        Ok(code)
    }
}
