//! The build pipeline: debootstrap (base packages), the recipe's packages with apt, modules,
//! agentvm's init, setup commands, ext4 file system, qcow2, then an atomic rename into the
//! cache.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::cache::{self, BuildLock, FileEntry, ImageFiles, ImageMetadata};
use crate::command;
use crate::guest;
use crate::kernel::ResolvedKernel;
use crate::mounts::{self, ChrootMounts};
use crate::recipe::{BASE_PACKAGES, KERNEL_CMDLINE};
use crate::{BuildEvent, BuiltImage, ImageError, Recipe};

const MIB: u64 = 1024 * 1024;

/// Host tools a build runs, with the Debian package providing each.
const TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("chroot", "coreutils"),
    ("cp", "coreutils"),
    ("mount", "mount"),
    ("umount", "mount"),
];

/// Environment of commands run inside the image.
const CHROOT_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("TERM", "dumb"),
];

/// Builds the image of `recipe` into `<cache_dir>/images/<hash>/`, or returns
/// the cached one (emitting [`BuildEvent::Reused`]) when it is already there.
///
/// Needs root. Progress goes to `progress`: a [`BuildEvent::Step`] per phase,
/// [`BuildEvent::Line`]s of command output, then [`BuildEvent::Done`]. On any
/// error the partial build is removed and nothing appears in the cache.
pub fn build(
    recipe: &Recipe,
    cache_dir: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<BuiltImage, ImageError> {
    recipe.validate()?;
    let kernel = recipe.kernel.resolve()?;
    let agent = guest::agent_binary()?;
    guest::agent_identity()?;
    let hash = recipe.hash_with(Ok(&kernel));
    let images = cache::images_dir(cache_dir);
    let final_dir = images.join(&hash);
    if let Some(image) = cache::read_image(&final_dir, &hash) {
        progress(BuildEvent::Reused);
        return Ok(image);
    }

    preflight()?;
    cache::create_public_dir(cache_dir)?;
    cache::create_public_dir(&images)?;
    for dir in cache::untraversable_ancestors(&images) {
        progress(BuildEvent::Line(format!(
            "warning: {} is not searchable by other users; libvirt's qemu user will not be able to open images below it (chmod o+x it or use another cache dir)",
            dir.display()
        )));
    }

    let _lock = BuildLock::acquire(&images, &hash, &mut |pid| {
        progress(BuildEvent::Line(format!(
            "waiting for another build of this recipe (pid {pid}) to finish"
        )))
    })?;
    // The build we waited for may have produced the image.
    if let Some(image) = cache::read_image(&final_dir, &hash) {
        progress(BuildEvent::Reused);
        return Ok(image);
    }
    for dead in cache::dead_temp_dirs(&images) {
        progress(BuildEvent::Line(format!(
            "removing leftovers of an interrupted build: {}",
            dead.display()
        )));
        mounts::remove_build_dir(&dead)?;
    }

    let started = Instant::now();
    let temp = TempBuildDir::create(images.join(cache::temp_dir_name(&hash)))?;
    let metadata = run_steps(recipe, &kernel, &agent, &hash, temp.path(), progress)?;

    // Publish: an incomplete leftover under the final name (lookup rejected it) goes first.
    if fs::symlink_metadata(&final_dir).is_ok() {
        let aside = images.join(format!(".tmp-{hash}-{}-old", std::process::id()));
        fs::rename(&final_dir, &aside)
            .map_err(|e| ImageError::io("moving aside", &final_dir, e))?;
        mounts::remove_build_dir(&aside)?;
    }
    fs::rename(temp.path(), &final_dir)
        .map_err(|e| ImageError::io("renaming into place", &final_dir, e))?;
    temp.disarm();
    sync_dir(&images);

    let image =
        cache::read_image(&final_dir, &hash).ok_or_else(|| ImageError::CorruptMetadata {
            path: final_dir.join(cache::METADATA_FILE),
            reason: "unreadable right after the build wrote it".into(),
        })?;
    tracing::info!(dir = %image.dir.display(), rootfs_bytes = metadata.rootfs_bytes, "image built");
    progress(BuildEvent::Done {
        image: image.clone(),
        elapsed: started.elapsed(),
    });
    Ok(image)
}

fn preflight() -> Result<(), ImageError> {
    if !is_root() {
        return Err(ImageError::NotRoot);
    }
    for (tool, package) in TOOLS {
        if !command::on_path(tool) {
            return Err(ImageError::MissingTool {
                tool: (*tool).into(),
                package: (*package).into(),
            });
        }
    }
    Ok(())
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Everything between "empty temp dir" and "complete image dir, not yet published".
fn run_steps(
    recipe: &Recipe,
    kernel: &ResolvedKernel,
    agent: &Path,
    hash: &str,
    dir: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<ImageMetadata, ImageError> {
    const TOTAL: usize = 7;
    let rootfs = dir.join("rootfs");
    let raw = dir.join("disk.raw");
    let mut step_seconds: Vec<(String, f64)> = Vec::new();
    let mut step_started = Instant::now();
    let mut index = 0;
    let mut step =
        |name: String, progress: &mut dyn FnMut(BuildEvent), seconds: &mut Vec<(String, f64)>| {
            if let Some(last) = seconds.last_mut() {
                last.1 = step_started.elapsed().as_secs_f64();
            }
            step_started = Instant::now();
            index += 1;
            tracing::info!(step = index, %name, "image build step");
            seconds.push((name.clone(), 0.0));
            progress(BuildEvent::Step {
                index,
                total: TOTAL,
                name,
            });
        };

    // 1. debootstrap
    step(
        format!("debootstrap {} (minbase)", recipe.suite),
        progress,
        &mut step_seconds,
    );
    debootstrap(recipe, &rootfs, progress)?;

    // 2. the recipe's own packages. Through apt in the new root rather than debootstrap's
    // `--include`: debootstrap configures included packages in one dpkg pass without
    // ordering them, which fails for packages with deep dependency trees (npm: 300 node-*
    // packages whose postinst scripts need each other configured first).
    let extra = recipe.extra_packages();
    step(
        format!("packages ({})", extra.len()),
        progress,
        &mut step_seconds,
    );
    install_packages(&extra, &rootfs, progress)?;

    // 3. kernel modules
    step(
        format!("kernel modules {}", kernel.version),
        progress,
        &mut step_seconds,
    );
    copy_modules(recipe, kernel, &rootfs, progress)?;

    // 4. agentvm's init and guest files
    step(
        "agentvm init and guest files".into(),
        progress,
        &mut step_seconds,
    );
    guest::install(&rootfs, agent)?;

    // 5. setup commands
    step(
        format!("setup commands ({})", recipe.setup_commands.len()),
        progress,
        &mut step_seconds,
    );
    run_setup_commands(&recipe.setup_commands, &rootfs, progress)?;
    guest::finalize(&rootfs)?;

    // 6. ext4 file system
    step(
        format!("ext4 file system ({} MiB)", recipe.disk_size_mib),
        progress,
        &mut step_seconds,
    );
    let rootfs_bytes = tree_size(&rootfs);
    make_filesystem(&rootfs, &raw, recipe.disk_size_mib)?;
    mounts::remove_build_dir(&rootfs)?;

    // 7. qcow2, kernel, initrd, metadata
    step(
        "qcow2 disk, kernel, initrd".into(),
        progress,
        &mut step_seconds,
    );
    let disk = dir.join(cache::DISK_FILE);
    command::run(
        // Uncompressed: `-c` halves the file (190 vs 406 MB) but took 12.5 s
        // instead of 1.4 s, and every guest read would decompress.
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
        None,
    )?;
    fs::remove_file(&raw).map_err(|e| ImageError::io("removing", &raw, e))?;
    copy_file(&kernel.kernel.path, &dir.join(cache::KERNEL_FILE))?;
    copy_file(&kernel.initrd.path, &dir.join(cache::INITRD_FILE))?;
    set_mode(&disk, 0o644)?;
    if let Some(last) = step_seconds.last_mut() {
        last.1 = step_started.elapsed().as_secs_f64();
    }

    let metadata = ImageMetadata {
        format: cache::METADATA_FORMAT,
        recipe_hash: hash.to_owned(),
        recipe: recipe.clone(),
        kernel: kernel.clone(),
        cmdline: KERNEL_CMDLINE.to_owned(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        files: ImageFiles {
            disk: FileEntry::of(dir, cache::DISK_FILE)?,
            kernel: FileEntry::of(dir, cache::KERNEL_FILE)?,
            initrd: FileEntry::of(dir, cache::INITRD_FILE)?,
        },
        disk_virtual_size_mib: recipe.disk_size_mib,
        rootfs_bytes,
        step_seconds,
    };
    for name in [cache::DISK_FILE, cache::KERNEL_FILE, cache::INITRD_FILE] {
        sync_file(&dir.join(name))?;
    }
    // image.json last, via a temp name, so its presence means "complete".
    let meta_tmp = dir.join(".image.json.tmp");
    let meta_path = dir.join(cache::METADATA_FILE);
    let json = serde_json::to_string_pretty(&metadata).expect("image metadata serialises");
    fs::write(&meta_tmp, json + "\n").map_err(|e| ImageError::io("writing", &meta_tmp, e))?;
    set_mode(&meta_tmp, 0o644)?;
    sync_file(&meta_tmp)?;
    fs::rename(&meta_tmp, &meta_path).map_err(|e| ImageError::io("renaming", &meta_path, e))?;
    set_mode(dir, 0o755)?;
    sync_dir(dir);
    Ok(metadata)
}

fn debootstrap(
    recipe: &Recipe,
    rootfs: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", BASE_PACKAGES.join(",")))
        .arg(&recipe.suite)
        .arg(rootfs)
        .args(recipe.mirror.as_deref())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LANG", "C.UTF-8");
    let mut forward = |line: String| progress(BuildEvent::Line(line));
    match command::run(&mut cmd, Some(&mut forward)) {
        Ok(()) => Ok(()),
        Err(ImageError::CommandFailed {
            command,
            status,
            mut output_tail,
        }) => {
            // debootstrap says little on stderr; its log says why.
            let log = rootfs.join("debootstrap/debootstrap.log");
            if let Ok(text) = fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                let from = lines.len().saturating_sub(command::TAIL_LINES);
                output_tail.push(format!("--- last lines of {} ---", log.display()));
                output_tail.extend(lines[from..].iter().map(|l| l.to_string()));
            }
            Err(ImageError::CommandFailed {
                command,
                status,
                output_tail,
            })
        }
        Err(e) => Err(e),
    }
}

fn copy_modules(
    recipe: &Recipe,
    kernel: &ResolvedKernel,
    rootfs: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    let source = PathBuf::from("/lib/modules").join(&kernel.version);
    if !source.is_dir() {
        if matches!(recipe.kernel, crate::KernelSource::Host) {
            return Err(ImageError::Kernel {
                path: source,
                reason: "the host kernel's modules are missing (reinstall its linux-image package)"
                    .into(),
            });
        }
        progress(BuildEvent::Line(format!(
            "warning: {} does not exist; the image gets no kernel modules (virtio drivers must be built in or in the initrd)",
            source.display()
        )));
        return Ok(());
    }
    let target_parent = guest::resolve_in_root(rootfs, Path::new("/lib/modules"))?;
    fs::create_dir_all(&target_parent)
        .map_err(|e| ImageError::io("creating directory", &target_parent, e))?;
    let target = target_parent.join(&kernel.version);
    if target.exists() {
        mounts::remove_build_dir(&target)?;
    }
    command::run(Command::new("cp").arg("-a").arg(&source).arg(&target), None)
}

fn install_packages(
    packages: &[String],
    rootfs: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    if packages.is_empty() {
        return Ok(());
    }
    let install = std::iter::once("apt-get install -y --no-install-recommends".to_owned())
        .chain(packages.iter().map(|p| shell_quote(p)))
        .collect::<Vec<_>>()
        .join(" ");
    let commands = [
        "apt-get update -q".to_owned(),
        install,
        "apt-get clean".to_owned(),
        "rm -rf /var/lib/apt/lists/*".to_owned(),
    ];
    run_in_root(&commands, "packages", rootfs, progress)
}

/// `s` as one word for `sh -c`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'\''"#))
}

fn run_setup_commands(
    commands: &[String],
    rootfs: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    run_in_root(commands, "setup", rootfs, progress)
}

/// Runs each of `commands` with `sh -c` chrooted into `rootfs` (with /proc, /sys, /dev
/// mounted and daemons kept from starting), stopping at the first failure.
fn run_in_root(
    commands: &[String],
    label: &str,
    rootfs: &Path,
    progress: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    if commands.is_empty() {
        return Ok(());
    }
    // Keep package scripts from starting daemons inside the build root.
    let policy = guest::resolve_in_root(rootfs, Path::new("/usr/sbin/policy-rc.d"))?;
    fs::write(&policy, "#!/bin/sh\nexit 101\n")
        .map_err(|e| ImageError::io("writing", &policy, e))?;
    set_mode(&policy, 0o755)?;

    // The host's trust anchors and proxy settings, for the commands' downloads only: a host
    // behind a TLS-inspecting proxy trusts that proxy's CA, the fresh image does not. The
    // copy is removed again, so the image never carries it.
    let host_ca = host_ca_bundle();
    let ca_in_root = guest::resolve_in_root(rootfs, Path::new(BUILD_CA_PATH))?;
    let mut env: Vec<(String, String)> = CHROOT_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(ca) = &host_ca {
        fs::copy(ca, &ca_in_root).map_err(|e| ImageError::io("copying", ca, e))?;
        env.extend(
            CA_ENV_VARS
                .iter()
                .map(|k| (k.to_string(), BUILD_CA_PATH.to_string())),
        );
    }
    env.extend(PROXY_ENV_VARS.iter().filter_map(|k| {
        std::env::var(k)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| (k.to_string(), v))
    }));

    let mounts = ChrootMounts::mount(rootfs)?;
    let mut result = Ok(());
    for (i, cmd) in commands.iter().enumerate() {
        progress(BuildEvent::Line(format!(
            "[{label} {}/{}] {cmd}",
            i + 1,
            commands.len()
        )));
        let mut chroot = Command::new("chroot");
        chroot
            .arg(rootfs)
            .args(["/bin/sh", "-c", cmd])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)));
        let mut forward = |line: String| progress(BuildEvent::Line(line));
        result = command::run(&mut chroot, Some(&mut forward));
        if result.is_err() {
            break;
        }
    }
    let unmounted = mounts.unmount();
    let removed = fs::remove_file(&policy).map_err(|e| ImageError::io("removing", &policy, e));
    let ca_removed = match host_ca {
        Some(_) => {
            fs::remove_file(&ca_in_root).map_err(|e| ImageError::io("removing", &ca_in_root, e))
        }
        None => Ok(()),
    };
    result.and(unmounted).and(removed).and(ca_removed)
}

/// Where the host's CA bundle is copied inside the build root while commands run.
const BUILD_CA_PATH: &str = "/etc/agentvm-build-ca.pem";

/// Variables that point the usual tools (OpenSSL, curl, git, Node.js/npm, pip/requests) at
/// [`BUILD_CA_PATH`].
const CA_ENV_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "npm_config_cafile",
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
];

/// Proxy settings passed through from the builder's environment when set.
const PROXY_ENV_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// The host's CA bundle: `$SSL_CERT_FILE` when set and readable, else Debian's
/// `/etc/ssl/certs/ca-certificates.crt`; `None` when neither exists.
fn host_ca_bundle() -> Option<PathBuf> {
    std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/etc/ssl/certs/ca-certificates.crt")])
        .find(|p| p.is_file())
}

fn make_filesystem(rootfs: &Path, raw: &Path, size_mib: u64) -> Result<(), ImageError> {
    let file = fs::File::create(raw).map_err(|e| ImageError::io("creating", raw, e))?;
    file.set_len(size_mib * MIB)
        .map_err(|e| ImageError::io("sizing", raw, e))?;
    drop(file);
    // On a sparse file mke2fs zeroes by punching holes, so every group is
    // marked ITABLE_ZEROED and the guest runs no lazy-init thread writing into
    // its overlay (checked with dumpe2fs). Explicit lazy_itable_init=0 only
    // made mkfs 3x slower for the same result.
    command::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "agentvm-root", "-m", "0"])
            .arg("-d")
            .arg(rootfs)
            .arg(raw),
        None,
    )
}

/// Bytes of regular files below `dir` (not following symlinks), for the metadata.
fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) if m.is_file() => total += m.len(),
                _ => {}
            }
        }
    }
    total
}

fn copy_file(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::copy(from, to).map_err(|e| ImageError::io("copying", from, e))?;
    set_mode(to, 0o644)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io("setting permissions of", path, e))
}

fn sync_file(path: &Path) -> Result<(), ImageError> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ImageError::io("syncing", path, e))
}

fn sync_dir(path: &Path) {
    if let Ok(f) = fs::File::open(path) {
        let _ = f.sync_all();
    }
}

/// The temp build directory; removed (after unmounting anything below it) on drop unless published.
struct TempBuildDir {
    path: Option<PathBuf>,
}

impl TempBuildDir {
    fn create(path: PathBuf) -> Result<Self, ImageError> {
        mounts::remove_build_dir(&path)?;
        cache::create_public_dir(&path)?;
        Ok(TempBuildDir { path: Some(path) })
    }

    fn path(&self) -> &Path {
        self.path.as_deref().expect("temp dir in use")
    }

    fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for TempBuildDir {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            if let Err(e) = mounts::remove_build_dir(&path) {
                tracing::warn!(error = %e, "could not remove the failed build's directory");
            }
        }
    }
}
