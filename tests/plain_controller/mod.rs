//! A controller process without reconcilers (`--without-reconcilers`: store, spec-dir
//! watch and API only, no libvirt needed) in a throw-away directory, and `agentvm` CLI calls
//! against it. `Drop` stops the process (by its pid) even when an assertion failed.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_agentvm");

/// Where a controller keeps its state and where it listens.
pub struct PlainController {
    /// Its state directory (the store, the audit log).
    pub state: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its spec directory, if watched.
    pub spec_dir: Option<PathBuf>,
    /// Extra `agentvm controller` arguments.
    pub extra_args: Vec<String>,
    /// Extra environment of the controller process.
    pub env: Vec<(String, String)>,
    /// Where its stderr goes.
    pub log: PathBuf,
    child: Option<Child>,
}

impl PlainController {
    pub fn new(state: &Path, socket: &Path) -> Self {
        std::fs::create_dir_all(state).unwrap();
        Self {
            state: state.to_path_buf(),
            socket: socket.to_path_buf(),
            spec_dir: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            log: socket.with_extension("log"),
            child: None,
        }
    }

    /// An `agentvm` command pointed at this controller.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("AGENTVM_STATE_DIR", &self.state)
            .env("AGENTVM_CACHE_DIR", self.state.join("cache"))
            .env("AGENTVM_LIBVIRT_URI", "test:///default")
            .env("AGENTVM_SOCKET", &self.socket)
            .env("AGENTVM_CONFIG", self.state.join("no-config.yaml"))
            .env("AGENTVM_METRICS_ADDR", "off")
            .env("NO_COLOR", "1")
            .env_remove("AGENTVM_SPEC_DIR")
            .env_remove("AGENTVM_SOCKET_GROUP")
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        c
    }

    /// Starts the controller and waits until its API answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already started");
        let mut args: Vec<String> = vec![
            "controller".into(),
            "--without-reconcilers".into(),
            "--socket".into(),
            self.socket.to_string_lossy().into_owned(),
        ];
        if let Some(dir) = &self.spec_dir {
            args.push("--spec-dir".into());
            args.push(dir.to_string_lossy().into_owned());
        }
        args.extend(self.extra_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .cmd(&args)
            .env("AGENTVM_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.run(&["get", "all", "-o", "name"]).status.success() {
            assert!(self.alive(), "the controller exited:\n{}", self.log_text());
            assert!(
                Instant::now() < deadline,
                "the controller did not answer:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True while the controller process runs.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// The controller's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    /// Stops the controller with SIGTERM and waits for it; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Runs and expects success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "agentvm {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "agentvm {args:?} should fail; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// `get -o name` of every object, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ok(&["get", "all", "-o", "name"])
            .lines()
            .map(String::from)
            .collect();
        v.sort();
        v
    }
}

impl Drop for PlainController {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits up to `secs` for `cond`.
pub fn eventually(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
