//! Shared set-up of the end-to-end tests of the `agentvm` binary: the controller process in a
//! throw-away state directory, `agentvm` CLI calls, virsh helpers, and a `Drop` guard that
//! removes everything a test created. [`Env::new`] is for real libvirt (`qemu:///system`,
//! TCG); [`Env::test_driver`] for libvirt's in-process `test:///default` (no VMs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_agentvm");
pub const URI: &str = "qemu:///system";

pub fn virsh(args: &[&str]) -> (bool, String) {
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

pub fn domains_with_prefix(prefix: &str) -> Vec<String> {
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

pub fn running(name: &str) -> bool {
    virsh(&["domstate", name]).1.contains("running")
}

/// The controller process plus everything a test may leave behind; `Drop` cleans up even
/// when an assertion failed.
pub struct Env {
    pub dir: PathBuf,
    pub controller: Option<Child>,
    pub domain_prefix: String,
    pub foreign: Option<String>,
    pub networks: Vec<String>,
    pub filters: Vec<String>,
    /// Extra environment variables of the controller process.
    pub controller_env: Vec<(String, String)>,
    /// The libvirt URI of the controller and CLI.
    pub uri: String,
    /// The image cache.
    pub cache_dir: PathBuf,
    /// `AGENTVM_LOG` of every command (`None`: unset, only warnings and errors).
    pub log_level: Option<String>,
    /// Working directory of every command (default: the test's).
    pub workdir: Option<PathBuf>,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        // Under /var/lib, readable by libvirt's qemu user.
        let dir = PathBuf::from(format!("/var/lib/agentvm-e2e-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("specs")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Env::new_in(dir)
    }

    /// An environment on libvirt's `test:///default` (in-process, no VMs), its own image
    /// cache, commands logging warnings only.
    pub fn test_driver(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentvm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("specs")).unwrap();
        let mut env = Env::new_in(dir);
        env.uri = "test:///default".into();
        env.cache_dir = env.dir.join("cache");
        env.log_level = None;
        env
    }

    fn new_in(dir: PathBuf) -> Self {
        Env {
            dir,
            controller: None,
            domain_prefix: String::new(),
            foreign: None,
            networks: Vec::new(),
            filters: Vec::new(),
            controller_env: Vec::new(),
            uri: URI.to_string(),
            cache_dir: agentvm_image::default_cache_dir(),
            log_level: Some("info".into()),
            workdir: None,
        }
    }

    /// The state directory.
    pub fn state(&self) -> &Path {
        &self.dir
    }

    pub fn specs(&self) -> PathBuf {
        self.dir.join("specs")
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("AGENTVM_STATE_DIR", &self.dir)
            .env("AGENTVM_CACHE_DIR", &self.cache_dir)
            .env("AGENTVM_LIBVIRT_URI", &self.uri)
            .env("AGENTVM_ACCEL", "tcg")
            .env("AGENTVM_SOCKET", self.socket())
            .env("AGENTVM_CONFIG", self.dir.join("no-config.yaml"))
            .env_remove("AGENTVM_SPEC_DIR")
            .stdin(Stdio::null());
        if self.uri == URI {
            // The egress proxy works where libvirtd's networks are, never in this
            // machine's own namespace.
            c.env("AGENTVM_EGRESS_NETNS", test_netns());
        }
        match &self.log_level {
            Some(level) => c.env("AGENTVM_LOG", level),
            None => c.env_remove("AGENTVM_LOG"),
        };
        if let Some(dir) = &self.workdir {
            c.current_dir(dir);
        }
        c
    }

    /// `agentvm ARGS` run as `user` (uid, primary group and the groups `/etc/group` gives
    /// them, through `setpriv`), with the same environment as [`Env::cmd`] and no home.
    pub fn cmd_as(&self, user: &str, args: &[&str]) -> Command {
        let inner = self.cmd(args);
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={user}"))
            .arg(format!("--regid={user}"))
            .args(["--init-groups", "--"])
            .arg(BIN)
            .args(inner.get_args());
        for (k, v) in inner.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.env("HOME", "/nonexistent").stdin(Stdio::null());
        if let Some(dir) = inner.get_current_dir() {
            c.current_dir(dir);
        }
        c
    }

    /// Runs `agentvm ARGS` to its end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs; returns (exit code, stdout, stderr).
    pub fn code(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.run(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.code(args);
        assert_eq!(
            code, 0,
            "agentvm {args:?} failed:\nstdout: {stdout}\nstderr: {stderr}"
        );
        stdout
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.code(args);
        assert_ne!(code, 0, "agentvm {args:?} should fail; stdout: {stdout}");
        stderr
    }

    /// Writes `text` to `rel` under the state directory; returns the path.
    pub fn write(&self, rel: &str, text: &str) -> String {
        let path = self.dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    }

    /// Starts `agentvm controller` on the spec directory and socket, resyncing every 2 s.
    pub fn start_controller(&mut self) {
        let specs = self.specs();
        let socket = self.socket();
        self.start_controller_with(&[
            "controller",
            "--spec-dir",
            specs.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--resync-seconds",
            "2",
        ]);
    }

    /// Starts `agentvm ARGS` as the controller (output to `controller.log`) and waits for
    /// its socket.
    pub fn start_controller_with(&mut self, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller.log"))
            .unwrap();
        let child = self
            .cmd(args)
            .envs(self.controller_env.iter().map(|(k, v)| (k, v)))
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
    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.socket());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    pub fn wait(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
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
    pub fn get(&self, kind: &str, name: &str) -> Option<serde_json::Value> {
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

    pub fn status(&self, kind: &str, name: &str) -> serde_json::Value {
        self.get(kind, name)
            .map(|o| o["status"].clone())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill_controller();
        if !self.domain_prefix.is_empty() {
            // The pool's VMs, and sandbox forks.
            let mut domains = domains_with_prefix(&self.domain_prefix);
            domains.extend(domains_with_prefix("agentvm-sbx-"));
            for d in domains {
                // Only ours: their files live in this test's state dir.
                if virsh(&["dumpxml", &d])
                    .1
                    .contains(self.dir.to_str().unwrap())
                {
                    let _ = virsh(&["destroy", &d]);
                    let _ = virsh(&["undefine", &d, "--snapshots-metadata", "--managed-save"]);
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

pub fn require_libvirt_and_image() {
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
pub fn define_foreign_domain(name: &str, dir: &Path) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"
    );
    let path = dir.join("foreign.xml");
    std::fs::write(&path, xml).unwrap();
    let (ok, out) = virsh(&["define", path.to_str().unwrap()]);
    assert!(ok, "defining {name}: {out}");
}

pub fn pool_manifest(pool: &str, image: &str, min_ready: u32) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n  minReady: {min_ready}\n  maxSize: 3\n"
    )
}

pub fn vm_names(status: &serde_json::Value) -> Vec<String> {
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

pub fn pool_ready(env: &Env, pool: &str, n: u64) -> bool {
    let s = env.status("pool", pool);
    s["phase"] == "Ready" && s["ready"].as_u64() == Some(n) && s["total"].as_u64() == Some(n)
}

/// Resident set size of the running controller process in KiB (`VmRSS` of its `/proc` entry).
pub fn controller_rss_kib(env: &Env) -> u64 {
    let pid = env.controller.as_ref().expect("controller running").id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("controller /proc");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// `agentvm get runs -o json` → every AgentRun object.
pub fn all_runs(env: &Env) -> Vec<serde_json::Value> {
    let out = env.cmd(&["get", "runs", "-o", "json"]).output().unwrap();
    assert!(
        out.status.success(),
        "get runs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match v.get("items") {
        Some(items) => items.as_array().cloned().unwrap_or_default(),
        None if v.get("metadata").is_some() => vec![v],
        None => Vec::new(),
    }
}

/// An AgentRun document running `source` with `sh`; `extra` is appended to the spec.
pub fn sh_run(name: &str, pool: &str, source: &str, extra: &str) -> String {
    let source = source
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {{name: {name}}}\nspec:\n  poolRef: {pool}\n  script: {{interpreter: sh, source: \"{source}\"}}\n{extra}")
}

/// `agentvm apply -f` of `yaml` (written to `file` in the state directory).
pub fn apply_yaml(env: &Env, file: &str, yaml: &str) {
    let path = env.dir.join(file);
    std::fs::write(&path, yaml).unwrap();
    let out = env
        .cmd(&["apply", "-f", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The condition of type `type_` in an object's `status`.
pub fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> Option<&'a serde_json::Value> {
    status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// True for the phases a run ends in.
pub fn run_terminal(p: &str) -> bool {
    matches!(p, "Succeeded" | "Failed" | "TimedOut" | "Cancelled")
}

/// The phase of run `name` (`Pending` before the controller wrote a status).
pub fn run_phase(env: &Env, name: &str) -> String {
    env.status("run", name)["phase"]
        .as_str()
        .unwrap_or("Pending")
        .to_string()
}

/// A pool (with its Image) of 512 MiB, 1 vCPU VMs; `extra` is appended to the pool spec.
pub fn small_pool(pool: &str, image: &str, min_ready: u32, max_size: u32, extra: &str) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {image}}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {pool}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: 2}}\n{extra}  minReady: {min_ready}\n  maxSize: {max_size}\n"
    )
}

/// A controller (tag `tag`) on a spec directory holding one [`small_pool`] of `max_size` VMs
/// (`minReady: 1`), started and waited for until the pool is Ready. Returns the environment
/// and the pool's name.
pub fn env_with_small_pool(tag: &str, max_size: u32) -> (Env, String) {
    let mut env = Env::new(tag);
    let pid = std::process::id();
    let pool = format!("{tag}{pid}");
    let image = format!("{tag}-img-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    std::fs::write(
        env.specs().join("pool.yaml"),
        small_pool(&pool, &image, 1, max_size, ""),
    )
    .unwrap();
    env.start_controller();
    let t = env.wait("pool Ready", Duration::from_secs(300), || {
        pool_ready(&env, &pool, 1)
    });
    eprintln!("pool Ready after {:.1}s", t.as_secs_f64());
    (env, pool)
}

/// What is inconsistent between libvirt's domains with the test's prefix, the pool's status
/// list and the VM directories (overlays, saved states) under the state directory; `None`
/// when they are the same set of running domains.
pub fn orphan_report(env: &Env, pool: &str) -> Option<String> {
    let domains = domains_with_prefix(&env.domain_prefix);
    let listed = vm_names(&env.status("pool", pool));
    let mut dirs: Vec<String> = std::fs::read_dir(env.dir.join("vms"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    let stopped: Vec<&String> = domains.iter().filter(|d| !running(d)).collect();
    if domains == listed && domains == dirs && stopped.is_empty() {
        None
    } else {
        Some(format!(
            "domains {domains:?}, pool status {listed:?}, VM directories {dirs:?}, not running {stopped:?}"
        ))
    }
}

/// Waits (up to `timeout`) until [`orphan_report`] finds nothing and the pool is Ready with
/// `n` VMs; panics with the last report otherwise.
pub fn wait_consistent(env: &Env, pool: &str, n: u64, timeout: Duration) {
    let start = Instant::now();
    loop {
        let report = orphan_report(env, pool);
        if report.is_none() && pool_ready(env, pool, n) {
            return;
        }
        if start.elapsed() > timeout {
            panic!(
                "pool {pool} not consistent with {n} ready VMs after {timeout:?}: {}\npool status: {}",
                report.unwrap_or_default(),
                env.status("pool", pool)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The network namespace the tests run libvirtd in ($AGENTVM_TEST_NETNS).
pub fn test_netns() -> String {
    std::env::var("AGENTVM_TEST_NETNS").unwrap_or_else(|_| "agentvm-test".to_string())
}

/// Panics unless libvirtd runs in the test namespace (never in this process's own).
pub fn assert_libvirtd_in_test_netns() -> String {
    use std::os::unix::fs::MetadataExt;
    let ns = test_netns();
    let pid = std::fs::read_to_string("/run/libvirtd.pid").expect("libvirtd is not running");
    let pid = pid.trim();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(
        theirs,
        std::fs::read_link("/proc/self/ns/net").unwrap(),
        "SAFETY: libvirtd runs in this machine's own network namespace; refusing to create networks"
    );
    let want = std::fs::metadata(format!("/run/netns/{ns}")).unwrap().ino();
    let have = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(
        want, have,
        "SAFETY: libvirtd is not in network namespace {ns}"
    );
    ns
}

/// A status timestamp (RFC 3339, as the controller writes them) as a time.
pub fn status_time(v: &serde_json::Value) -> std::time::SystemTime {
    humantime::parse_rfc3339_weak(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
        .unwrap_or_else(|e| panic!("not a time: {v}: {e}"))
}

/// `ip netns exec NS ARGS...`.
pub fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Runs `cmd`, panics unless it succeeds; its stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// "The internet" for guests: a namespace of its own joined to the test namespace by a veth
/// pair in 198.18.0.0/30 (it is 198.18.0.2, the test namespace 198.18.0.1), with no route
/// anywhere else, and the processes started in it. Dropping it kills them (by pid) and
/// deletes the namespace (and so the veth pair).
pub struct Internet {
    pub netns: String,
    pub children: Vec<Child>,
}

/// The internet's address.
pub const INTERNET_HOST: &str = "198.18.0.2";

impl Internet {
    /// Creates it next to `test_ns`; `tag` keeps its names apart from other tests'.
    pub fn new(test_ns: &str, tag: &str) -> Self {
        let pid = std::process::id();
        let netns = format!("agentvm-{tag}-{pid}");
        run_ok(Command::new("ip").args(["netns", "add", &netns]));
        let me = Internet {
            netns: netns.clone(),
            children: Vec::new(),
        };
        let short: String = tag.chars().take(4).collect();
        let (outer, inner) = (
            format!("{short}o{}", pid % 1_000_000),
            format!("{short}i{}", pid % 1_000_000),
        );
        run_ok(&mut in_ns(&netns, &["ip", "link", "set", "lo", "up"]));
        run_ok(&mut in_ns(
            test_ns,
            &[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
                &netns,
            ],
        ));
        run_ok(&mut in_ns(
            test_ns,
            &["ip", "addr", "add", "198.18.0.1/30", "dev", &outer],
        ));
        run_ok(&mut in_ns(test_ns, &["ip", "link", "set", &outer, "up"]));
        run_ok(&mut in_ns(
            &netns,
            &["ip", "addr", "add", "198.18.0.2/30", "dev", &inner],
        ));
        run_ok(&mut in_ns(&netns, &["ip", "link", "set", &inner, "up"]));
        run_ok(&mut in_ns(
            test_ns,
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ));
        assert!(!run_ok(&mut in_ns(&netns, &["ip", "-4", "route"])).contains("default"));
        me
    }

    /// Starts `args` in the namespace (output to `log`); killed on drop.
    pub fn spawn(&mut self, args: &[&str], log: &Path) {
        let out = std::fs::File::create(log).unwrap();
        let child = in_ns(&self.netns, args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// Waits until something listens on `proto` (`t` or `u`) `port` in the namespace.
    pub fn wait_listening(&self, proto: char, port: u16) {
        let start = Instant::now();
        let flag = format!("-l{proto}nH");
        while !run_ok(&mut in_ns(&self.netns, &["ss", &flag]))
            .contains(&format!("{INTERNET_HOST}:{port} "))
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nothing listens on {proto} {port} in {}",
                self.netns
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.netns])
            .status();
    }
}
