//! End to end with real libvirt (`qemu:///system`, TCG): the `agentvm controller` binary
//! reconciles a spec directory into pool VMs, networks and filters, repairs drift, survives
//! `kill -9` by adopting what it owns, removes what a deleted file declared, and never touches
//! a domain it does not own. Fails (never skips) without libvirt or the default image.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_agentvm");
const URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(URI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running virsh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn domains_with_prefix(prefix: &str) -> Vec<String> {
    let (ok, out) = virsh(&["list", "--all", "--name"]);
    assert!(ok, "virsh list failed: {out}");
    let mut v: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(String::from)
        .collect();
    v.sort();
    v
}

fn running(name: &str) -> bool {
    virsh(&["domstate", name]).1.contains("running")
}

/// The controller process plus everything a test may leave behind; `Drop` cleans up even
/// when an assertion failed.
struct Env {
    dir: PathBuf,
    controller: Option<Child>,
    domain_prefix: String,
    foreign: Option<String>,
    networks: Vec<String>,
    filters: Vec<String>,
}

impl Env {
    fn new(tag: &str) -> Self {
        // Under /var/lib, readable by libvirt's qemu user.
        let dir = PathBuf::from(format!("/var/lib/agentvm-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("specs")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Env {
            dir,
            controller: None,
            domain_prefix: String::new(),
            foreign: None,
            networks: Vec::new(),
            filters: Vec::new(),
        }
    }

    fn specs(&self) -> PathBuf {
        self.dir.join("specs")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("AGENTVM_STATE_DIR", &self.dir)
            .env("AGENTVM_CACHE_DIR", agentvm_image::default_cache_dir())
            .env("AGENTVM_LIBVIRT_URI", URI)
            .env("AGENTVM_ACCEL", "tcg")
            .env("AGENTVM_SOCKET", self.socket())
            .env("AGENTVM_CONFIG", self.dir.join("no-config.yaml"))
            .env("AGENTVM_LOG", "info")
            .env_remove("AGENTVM_SPEC_DIR")
            .stdin(Stdio::null());
        c
    }

    fn start_controller(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller.log"))
            .unwrap();
        let specs = self.specs();
        let socket = self.socket();
        let child = self
            .cmd(&[
                "controller",
                "--spec-dir",
                specs.to_str().unwrap(),
                "--socket",
                socket.to_str().unwrap(),
                "--resync-seconds",
                "2",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.controller = Some(child);
        self.wait("the controller's socket", Duration::from_secs(20), || {
            std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
        });
    }

    /// `kill -9` of the controller (by its pid).
    fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > timeout {
                let log = self.log();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(40)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                panic!(
                    "timed out after {timeout:?} waiting for {what}\ncontroller log tail:\n{tail}"
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    }

    /// `agentvm get KIND NAME -o json` → the object, `None` when not found.
    fn get(&self, kind: &str, name: &str) -> Option<serde_json::Value> {
        let out = self
            .cmd(&["get", kind, name, "-o", "json"])
            .output()
            .unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("not found"),
                "agentvm get {kind} {name}: {err}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).unwrap())
    }

    fn status(&self, kind: &str, name: &str) -> serde_json::Value {
        self.get(kind, name)
            .map(|o| o["status"].clone())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_controller();
        if !self.domain_prefix.is_empty() {
            for d in domains_with_prefix(&self.domain_prefix) {
                // Only ours: their files live in this test's state dir.
                if virsh(&["dumpxml", &d])
                    .1
                    .contains(self.dir.to_str().unwrap())
                {
                    let _ = virsh(&["destroy", &d]);
                    let _ = virsh(&["undefine", &d, "--snapshots-metadata"]);
                }
            }
        }
        if let Some(f) = &self.foreign {
            let _ = virsh(&["destroy", f]);
            let _ = virsh(&["undefine", f]);
        }
        for f in &self.filters {
            let _ = virsh(&["nwfilter-undefine", f]);
        }
        for n in &self.networks {
            let _ = virsh(&["net-destroy", n]);
            let _ = virsh(&["net-undefine", n]);
        }
        if std::thread::panicking() {
            eprintln!("controller log kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn require_libvirt_and_image() {
    let (ok, out) = virsh(&["version"]);
    assert!(
        ok,
        "libvirt at {URI} is not reachable (run scripts/host-setup.sh): {out}"
    );
    let recipe = agentvm_controller::images::default_recipe();
    let found = agentvm_image::lookup(&recipe, &agentvm_image::default_cache_dir()).unwrap();
    assert!(
        found.is_some(),
        "the default guest image is not built in {}; build it with `agentvm image build`",
        agentvm_image::default_cache_dir().display()
    );
}

/// A domain without agentvm's metadata (defined, never started: it needs no disk).
fn define_foreign_domain(name: &str, dir: &Path) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    );
    let path = dir.join("foreign.xml");
    std::fs::write(&path, xml).unwrap();
    let (ok, out) = virsh(&["define", path.to_str().unwrap()]);
    assert!(ok, "defining {name}: {out}");
}

fn pool_manifest(pool: &str, image: &str, min_ready: u32) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n  minReady: {min_ready}\n  maxSize: 3\n"
    )
}

fn vm_names(status: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = status["vms"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn pool_ready(env: &Env, pool: &str, n: u64) -> bool {
    let s = env.status("pool", pool);
    s["phase"] == "Ready" && s["ready"].as_u64() == Some(n) && s["total"].as_u64() == Some(n)
}

#[test]
fn pool_vms_follow_the_spec_dir_survive_drift_and_kill_9() {
    require_libvirt_and_image();
    let mut env = Env::new("pool");
    let pid = std::process::id();
    let pool = format!("e2e{pid}");
    let image = format!("e2e-img-{pid}");
    let prefix = format!("agentvm-{pool}-");
    env.domain_prefix = prefix.clone();
    let foreign = format!("agentvm-t3-foreign-{pid}");
    define_foreign_domain(&foreign, &env.dir);
    env.foreign = Some(foreign.clone());
    let file = env.specs().join("pool.yaml");
    std::fs::write(&file, pool_manifest(&pool, &image, 1)).unwrap();

    env.start_controller();
    let t_ready = env.wait("pool Ready with 1 VM", Duration::from_secs(180), || {
        pool_ready(&env, &pool, 1)
    });
    let img = env.status("image", &image);
    assert_eq!(img["phase"], "Ready", "{img}");
    assert!(img["diskPath"].as_str().unwrap().ends_with("disk.qcow2"));
    let vms = domains_with_prefix(&prefix);
    assert_eq!(vms.len(), 1, "{vms:?}");
    assert_eq!(vm_names(&env.status("pool", &pool)), vms);
    assert!(running(&vms[0]));
    // The ownership metadata names the pool and carries the template hash.
    let xml = virsh(&["dumpxml", &vms[0]]).1;
    let hash = env.status("pool", &pool)["templateHash"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        xml.contains(&format!("name=\"{pool}\"")) && xml.contains(&hash),
        "{xml}"
    );
    eprintln!("pool Ready with 1 VM after {:.1}s", t_ready.as_secs_f64());

    // Scale up by editing the file.
    std::fs::write(&file, pool_manifest(&pool, &image, 2)).unwrap();
    let t_scale = env.wait("pool Ready with 2 VMs", Duration::from_secs(180), || {
        pool_ready(&env, &pool, 2)
    });
    let vms = domains_with_prefix(&prefix);
    assert_eq!(vms.len(), 2, "{vms:?}");
    eprintln!("scaled to 2 VMs in {:.1}s", t_scale.as_secs_f64());

    // Destroy one by hand: it is replaced.
    let victim = vms[0].clone();
    let (ok, out) = virsh(&["destroy", &victim]);
    assert!(ok, "{out}");
    let t_replace = env.wait(
        "the destroyed VM replaced",
        Duration::from_secs(180),
        || {
            let now = domains_with_prefix(&prefix);
            now.len() == 2 && !now.contains(&victim) && pool_ready(&env, &pool, 2)
        },
    );
    eprintln!(
        "VM destroyed by hand replaced in {:.1}s",
        t_replace.as_secs_f64()
    );
    let vms = domains_with_prefix(&prefix);
    assert!(vms.iter().all(|v| running(v)));

    // kill -9 and restart: the same VMs are adopted, none added.
    env.kill_controller();
    env.start_controller();
    let restarted = Instant::now();
    env.wait("pool Ready after restart", Duration::from_secs(60), || {
        pool_ready(&env, &pool, 2)
    });
    // The status may still be the one written before the kill; wait for the new
    // controller's own pass (it resets adopted VMs) and then compare.
    env.wait("adoption logged", Duration::from_secs(60), || {
        env.log().matches("VM reset to golden").count() >= 2
    });
    let t_adopt = restarted.elapsed();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        domains_with_prefix(&prefix),
        vms,
        "VMs changed after the restart"
    );
    assert!(pool_ready(&env, &pool, 2));
    assert_eq!(vm_names(&env.status("pool", &pool)), vms);
    eprintln!(
        "after kill -9: same {} VMs adopted and reset in {:.1}s",
        vms.len(),
        t_adopt.as_secs_f64()
    );

    // Removing the file removes the VMs and the objects.
    std::fs::remove_file(&file).unwrap();
    let t_gone = env.wait("VMs gone", Duration::from_secs(60), || {
        domains_with_prefix(&prefix).is_empty()
            && env.get("pool", &pool).is_none()
            && env.get("image", &image).is_none()
    });
    eprintln!("file deleted: VMs gone in {:.1}s", t_gone.as_secs_f64());
    assert!(
        !env.dir.join("vms").exists()
            || std::fs::read_dir(env.dir.join("vms"))
                .unwrap()
                .next()
                .is_none(),
        "VM files left behind"
    );

    // The foreign domain survived all of it.
    let (ok, out) = virsh(&["dominfo", &foreign]);
    assert!(ok, "foreign domain {foreign} is gone: {out}");
}

#[test]
fn networks_and_filters_follow_the_spec_dir_inside_the_test_namespace() {
    // Safety first: libvirt's networks must not land in this (the host's) namespace.
    let pidfile = std::fs::read_to_string("/run/libvirtd.pid")
        .expect("libvirtd is not running (no /run/libvirtd.pid)");
    let libvirtd_ns =
        std::fs::read_link(format!("/proc/{}/ns/net", pidfile.trim())).expect("libvirtd netns");
    let own_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        libvirtd_ns, own_ns,
        "libvirtd runs in this process's network namespace; refusing to create networks (start it inside the test namespace: scripts/test.sh)"
    );
    require_libvirt_and_image();

    let mut env = Env::new("net");
    let pid = std::process::id();
    let net = format!("e2e-net-{pid}");
    let filter = format!("e2e-egress-{pid}");
    let (lnet, lfilter) = (format!("agentvm-{net}"), format!("agentvm-{filter}"));
    env.networks.push(lnet.clone());
    env.filters.push(lfilter.clone());
    let third = 100 + pid % 150;
    let file = env.specs().join("net.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {{name: {net}}}\nspec: {{mode: isolated, subnet: 10.213.{third}.0/24}}\n---\n\
             apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {filter}}}\nspec:\n  egress:\n    - {{protocol: tcp, ports: [443]}}\n"
        ),
    )
    .unwrap();
    env.start_controller();
    let net_up = || {
        virsh(&["net-info", &lnet])
            .1
            .contains("Active:         yes")
    };
    let filter_defined = || virsh(&["nwfilter-dumpxml", &lfilter]).0;
    let t = env.wait("network and filter Ready", Duration::from_secs(60), || {
        env.status("network", &net)["phase"] == "Ready"
            && env.status("networkfilter", &filter)["phase"] == "Ready"
    });
    assert!(net_up() && filter_defined());
    eprintln!("network and filter Ready in {:.1}s", t.as_secs_f64());

    // Removed by hand: recreated.
    assert!(virsh(&["net-destroy", &lnet]).0);
    assert!(virsh(&["net-undefine", &lnet]).0);
    assert!(virsh(&["nwfilter-undefine", &lfilter]).0);
    let t = env.wait(
        "network and filter recreated",
        Duration::from_secs(60),
        || net_up() && filter_defined(),
    );
    eprintln!("network and filter recreated in {:.1}s", t.as_secs_f64());
    // Stopped by hand: started again.
    assert!(virsh(&["net-destroy", &lnet]).0);
    env.wait("network restarted", Duration::from_secs(60), net_up);

    // The file goes: so do they.
    std::fs::remove_file(&file).unwrap();
    env.wait(
        "network and filter removed",
        Duration::from_secs(60),
        || {
            !virsh(&["net-info", &lnet]).0
                && !filter_defined()
                && env.get("network", &net).is_none()
                && env.get("networkfilter", &filter).is_none()
        },
    );
}
