//! Real image builds: debootstrap from Debian's mirror (about a minute each).
//! These tests need root, debootstrap, e2fsprogs and qemu-utils; they fail
//! (never skip) when any of them is missing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use agentvm_image::{build, lookup, BuildEvent, BuiltImage, ImageError, ImageMetadata, Recipe};

fn require_host_tools() {
    for tool in ["debootstrap", "mkfs.ext4", "qemu-img", "debugfs"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        assert!(
            found,
            "{tool} is not installed: these tests build a real image (apt-get install debootstrap e2fsprogs qemu-utils)"
        );
    }
}

#[derive(Default, Debug)]
struct Events {
    steps: Vec<String>,
    lines: Vec<String>,
    done: bool,
    reused: bool,
}

impl Events {
    fn record(&mut self, event: BuildEvent) {
        match event {
            BuildEvent::Step { index, total, name } => {
                eprintln!("[{index}/{total}] {name}");
                self.steps.push(name);
            }
            BuildEvent::Line(l) => self.lines.push(l),
            BuildEvent::Done { elapsed, .. } => {
                eprintln!("built in {elapsed:?}");
                self.done = true;
            }
            BuildEvent::Reused => self.reused = true,
        }
    }
}

/// Runs `debugfs -R REQUEST` on the image's file system (converted to raw).
struct RawDisk {
    _dir: tempfile::TempDir,
    raw: PathBuf,
}

impl RawDisk {
    fn of(image: &BuiltImage) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&image.disk)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        RawDisk { _dir: dir, raw }
    }

    fn debugfs(&self, request: &str) -> String {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(request)
            .arg(&self.raw)
            .output()
            .unwrap();
        assert!(out.status.success(), "debugfs {request}: {out:?}");
        // debugfs prints its banner and lookup errors on stderr.
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn assert_regular_file(&self, path: &str) {
        let stat = self.debugfs(&format!("stat {path}"));
        assert!(
            stat.contains("Type: regular"),
            "{path} in the image: {stat}"
        );
    }

    fn assert_exists(&self, path: &str) {
        let stat = self.debugfs(&format!("stat {path}"));
        assert!(stat.contains("Type: "), "{path} in the image: {stat}");
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

#[test]
fn builds_a_bootable_image_then_reuses_it() {
    require_host_tools();
    let cache = tempfile::tempdir().unwrap();
    let images = cache.path().join("images");

    // Leftovers of a build that died mid-setup (with something still mounted):
    // the next build must unmount and remove them.
    let dead = images.join(".tmp-0000-99999999");
    fs::create_dir_all(dead.join("rootfs/proc")).unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(dead.join("rootfs/proc"))
        .status()
        .unwrap();
    assert!(status.success());

    let recipe = Recipe {
        // A package outside the base set: installed with apt after debootstrap.
        packages: vec!["jq".into()],
        setup_commands: vec![
            // Runs in the image, with /proc and /dev usable.
            "test -r /proc/self/status && echo ok > /dev/null && uname -r > /etc/agentvm-test-marker".into(),
            "echo setup-output-line".into(),
            "echo '{\"a\": 41}' | jq '.a + 1' > /etc/agentvm-test-jq".into(),
            // The host's CA bundle is there for the commands' downloads…
            "test -s \"$SSL_CERT_FILE\" && test \"$NODE_EXTRA_CA_CERTS\" = \"$SSL_CERT_FILE\"".into(),
        ],
        ..Recipe::default()
    };
    assert!(lookup(&recipe, cache.path()).unwrap().is_none());

    // Two builds of one recipe at once: one builds, the other waits and reuses.
    let (first, second) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut events = Events::default();
            let r = build(&recipe, cache.path(), &mut |e| events.record(e));
            (r, events)
        });
        let b = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            let mut events = Events::default();
            let r = build(&recipe, cache.path(), &mut |e| events.record(e));
            (r, events)
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let (image, events) = first;
    let image = image.unwrap_or_else(|e| panic!("build failed: {e}"));
    assert!(events.done && !events.reused, "{events:?}");
    assert_eq!(events.steps.len(), 7, "{:?}", events.steps);
    assert!(events.lines.iter().any(|l| l.starts_with("I: Retrieving")));
    assert!(events.lines.iter().any(|l| l == "setup-output-line"));
    assert!(events
        .lines
        .iter()
        .any(|l| l.contains("removing leftovers")));
    let (image2, events2) = second;
    assert_eq!(image2.unwrap(), image);
    assert!(events2.reused && !events2.done, "{events2:?}");
    assert!(events2
        .lines
        .iter()
        .any(|l| l.contains("waiting for another build")));

    // Leftovers gone, nothing mounted, no temp dirs or locks.
    assert!(!dead.exists());
    assert!(
        mounts_below(cache.path()).is_empty(),
        "{:?}",
        mounts_below(cache.path())
    );
    let names: Vec<String> = fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec![image.recipe_hash.clone()]);

    // The files, readable by libvirt's qemu user.
    assert_eq!(image.dir, images.join(recipe.hash()));
    assert_eq!(image.recipe_hash, recipe.hash());
    for file in [
        &image.disk,
        &image.kernel,
        &image.initrd,
        &image.dir.join("image.json"),
    ] {
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{}", file.display());
    }
    for dir in [&image.dir, &images, &cache.path().to_path_buf()] {
        let mode = fs::metadata(dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{}", dir.display());
    }
    assert!(image.cmdline.contains("root=/dev/vda"));
    assert!(image.cmdline.contains("init=/sbin/agentvm-init"));

    // A valid qcow2 of the requested size.
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&image.disk)
        .output()
        .unwrap();
    assert!(info.status.success());
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 2048u64 * 1024 * 1024);

    let meta: ImageMetadata =
        serde_json::from_str(&fs::read_to_string(image.dir.join("image.json")).unwrap()).unwrap();
    assert_eq!(meta.recipe, recipe);
    eprintln!(
        "rootfs {} MiB, qcow2 {} MiB; steps: {:?}",
        meta.rootfs_bytes / (1 << 20),
        meta.files.disk.size / (1 << 20),
        meta.step_seconds
    );

    // The root file system: agentvm's init, the guest agent, the kernel's modules.
    let disk = RawDisk::of(&image);
    assert!(disk.debugfs("stats").contains("agentvm-root"));
    disk.assert_regular_file("/usr/sbin/agentvm-init");
    disk.assert_regular_file("/usr/sbin/qemu-ga");
    disk.assert_regular_file("/usr/sbin/dhclient");
    disk.assert_exists("/usr/sbin/modprobe");
    disk.assert_exists("/usr/bin/python3");
    disk.assert_regular_file("/usr/sbin/shutdown");
    let init = disk.debugfs("cat /usr/sbin/agentvm-init");
    assert!(init.contains(agentvm_image::guest::INIT_SCRIPT), "{init}");
    let version = &meta.kernel.version;
    let modules = disk.debugfs(&format!("ls -l /usr/lib/modules/{version}"));
    assert!(modules.contains("modules.dep"), "{modules}");
    let marker = disk.debugfs("cat /etc/agentvm-test-marker");
    assert!(!marker.trim().is_empty(), "setup command output missing");
    assert_eq!(disk.debugfs("cat /etc/hostname").trim(), "agentvm");
    assert_eq!(disk.debugfs("cat /etc/agentvm-test-jq").trim(), "42");
    // …and gone from the image afterwards.
    let ca = disk.debugfs("stat /etc/agentvm-build-ca.pem");
    assert!(!ca.contains("Type: "), "the build's CA copy stayed: {ca}");

    // Again: a no-op, well under a second.
    let started = Instant::now();
    let mut events = Events::default();
    let again = build(&recipe, cache.path(), &mut |e| events.record(e)).unwrap();
    let took = started.elapsed();
    eprintln!("reuse took {took:?}");
    assert!(took < Duration::from_secs(1), "reuse took {took:?}");
    assert!(events.reused && !events.done && events.steps.is_empty());
    assert_eq!(again, image);
    assert_eq!(lookup(&recipe, cache.path()).unwrap(), Some(image.clone()));

    // A damaged image is not "found"; the next build replaces it.
    fs::remove_file(&image.initrd).unwrap();
    assert_eq!(lookup(&recipe, cache.path()).unwrap(), None);
}

#[test]
fn failed_setup_command_leaves_nothing_behind() {
    require_host_tools();
    let cache = tempfile::tempdir().unwrap();
    let recipe = Recipe {
        setup_commands: vec!["true".into(), "echo boom >&2; exit 7".into()],
        ..Recipe::default()
    };
    let err = build(&recipe, cache.path(), &mut |_| {}).unwrap_err();
    match &err {
        ImageError::CommandFailed {
            command,
            status,
            output_tail,
        } => {
            assert!(command.contains("exit 7"), "{command}");
            assert!(status.contains('7'), "{status}");
            assert_eq!(output_tail, &vec!["boom".to_owned()]);
        }
        other => panic!("expected CommandFailed, got {other:?}"),
    }
    assert!(err.to_string().contains("boom"));
    assert!(
        mounts_below(cache.path()).is_empty(),
        "{:?}",
        mounts_below(cache.path())
    );
    let left: Vec<_> = fs::read_dir(cache.path().join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(lookup(&recipe, cache.path()).unwrap(), None);
}
