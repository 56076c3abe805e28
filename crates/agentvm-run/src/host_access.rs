//! `HostAccess`: how a run's host inputs (`secretEnv`, `files[].fromFile`, `workspace`) are
//! read — with the rights of whoever submitted the run, never with more.
//!
//! The controller usually runs as root; the members of its `socketGroup` are not root. So a
//! host path named by a run that a non-root user submitted is read by a helper process that
//! runs with that user's uid, primary gid and supplementary groups (`setpriv`, then `cat`,
//! `tar` or `git`): the kernel applies exactly the checks it applies to the user — search
//! permission on every directory of the path, symlinks, ACLs, LSMs — at the moment of the
//! read, with no window between a check and the read. A submitter who is root, or the
//! controller's own user, is read for in-process as before.
//!
//! # Guarantees
//! - A non-root submitter's run never gets a byte the submitter could not read itself; a
//!   refused path fails the run with a message naming the path and the submitter.
//! - Host environment variables (`secretEnv[].fromEnv`) are the controller's own: a
//!   non-root submitter may only name those in `secretEnvAllowList` (empty by default); the
//!   allow-list is checked before the variable is looked up, so a refusal says nothing
//!   about whether it is set.
//! - Helper processes get an empty environment (only `PATH`; git also its own settings), so
//!   the controller's secrets never reach a process the submitter could inspect.
//! - `gitUrl` clones run as the submitter (root's clones as root), over https, http, ssh or
//!   git only, with `HOME` an empty directory, no system or global git config, no credential
//!   helper or prompt, and ssh without configuration, identity files or agent: nobody's
//!   credentials are used. They end after `gitCloneTimeoutSeconds`. They use the host's
//!   network.
//! - Every helper is bounded: a file or secret is at most [`MAX_INPUT_FILE_BYTES`], a
//!   workspace archive at most [`MAX_WORKSPACE_BYTES`]; a helper past its deadline or its
//!   size is killed with its whole process group.
//!
//! # Assumptions
//! - `setpriv` (util-linux), `cat`, `tar` and `git` are on the controller's `PATH`.
//! - To act for another user the controller must be root; a non-root controller refuses
//!   other users' host paths.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_store::Caller;

/// Largest input file or secret read from the host: 64 MiB.
pub const MAX_INPUT_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Largest workspace archive (`hostPath` or a clone, as tar): 1 GiB.
pub const MAX_WORKSPACE_BYTES: u64 = 1024 * 1024 * 1024;
/// Time to read one input file for another user.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to pack a workspace.
pub const TAR_TIMEOUT: Duration = Duration::from_secs(300);
/// Default of `gitCloneTimeoutSeconds`.
pub const DEFAULT_GIT_CLONE_TIMEOUT_SECONDS: u64 = 120;

/// `PATH` of helper processes when the controller has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Transports a clone may use (no `file`, no `ext`).
const GIT_PROTOCOLS: &str = "https:http:ssh:git";
/// ssh for clones: no configuration files, no identity files, no agent, never a prompt.
const GIT_SSH_COMMAND: &str = "ssh -F none -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityFile=/dev/null -o IdentityAgent=none -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/dev/null";
/// Bytes of a helper's standard error kept for messages.
const STDERR_KEEP: usize = 16 * 1024;
/// What a run stored before submitters were recorded is told.
const UNKNOWN_SUBMITTER: &str = "the controller does not know who submitted this run (it was stored by an older controller), so it reads no host path or variable for it; apply the run again";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rights {
    /// This process's own: root, the controller's user, or `agentvm run`.
    Own,
    /// Another user's, through a helper process.
    Of(Caller),
    /// Nobody's: the submitter is not known.
    Unknown,
}

/// Reads a run's host inputs with the rights of its submitter; see the module docs.
#[derive(Debug, Clone)]
pub struct HostAccess {
    rights: Rights,
    /// Host environment variables the submitter may use; `None`: all.
    env_allow_list: Option<BTreeSet<String>>,
    clone_timeout: Duration,
}

/// Why a helper process gave no result.
#[derive(Debug)]
enum HelperError {
    Spawn(std::io::Error),
    TooLarge(u64),
    TimedOut(Duration),
    Failed(String),
}

/// The effective uid of this process.
fn process_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn search_path() -> std::ffi::OsString {
    std::env::var_os("PATH")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

impl HostAccess {
    /// This process's own rights and environment (`agentvm run`, run by the user itself).
    pub fn own(clone_timeout: Duration) -> Self {
        HostAccess {
            rights: Rights::Own,
            env_allow_list: None,
            clone_timeout,
        }
    }

    /// The rights of `submitter` under the controller's configuration: root and the
    /// controller's own user read as the controller does; anyone else through a helper
    /// process running as them, with `secret_env_allow_list` (the controller's
    /// `secretEnvAllowList`); an unknown submitter reads nothing. Clones may take
    /// `clone_timeout`.
    pub fn of_submitter(
        submitter: Option<&Caller>,
        secret_env_allow_list: &[String],
        clone_timeout: Duration,
    ) -> Self {
        let allow_list = || Some(secret_env_allow_list.iter().cloned().collect());
        match submitter {
            None => HostAccess {
                rights: Rights::Unknown,
                env_allow_list: Some(BTreeSet::new()),
                clone_timeout,
            },
            Some(c) if c.is_root() || Some(c.uid) == process_uid() => {
                HostAccess::own(clone_timeout)
            }
            Some(c) => HostAccess {
                rights: Rights::Of(c.clone()),
                env_allow_list: allow_list(),
                clone_timeout,
            },
        }
    }

    /// The value of the controller's environment variable `var`, looked up with `host_env`
    /// when the submitter may use it.
    pub fn env_var(
        &self,
        var: &str,
        host_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<String, String> {
        match (&self.rights, &self.env_allow_list) {
            (Rights::Unknown, _) => return Err(UNKNOWN_SUBMITTER.into()),
            (Rights::Of(c), Some(allowed)) if !allowed.contains(var) => {
                return Err(format!(
                    "host environment variable {var} is not in the controller's secretEnvAllowList, so {c}, who submitted the run, may not use it; ask the controller's administrator to allow it, or use fromFile with a file you can read"
                ))
            }
            _ => {}
        }
        host_env(var).ok_or_else(|| {
            format!(
                "host environment variable {var} is not set; export it before submitting the run"
            )
        })
    }

    /// The content of the host file `path` (at most `max` bytes).
    pub fn read_file(&self, path: &Path, max: u64) -> Result<Vec<u8>, String> {
        match &self.rights {
            Rights::Unknown => Err(UNKNOWN_SUBMITTER.into()),
            Rights::Own => read_capped(path, max),
            Rights::Of(c) => {
                let mut cmd = self.command("cat", true);
                cmd.arg("--").arg(path);
                run_bounded(cmd, max, READ_TIMEOUT).map_err(|e| refused(c, "read", e))
            }
        }
    }

    /// The host directory `dir` as a tar archive (at most `max` bytes).
    pub fn tar_dir(&self, dir: &Path, max: u64) -> Result<Vec<u8>, String> {
        let mut cmd = match &self.rights {
            Rights::Unknown => return Err(UNKNOWN_SUBMITTER.into()),
            Rights::Own => self.command("tar", false),
            Rights::Of(_) => self.command("tar", true),
        };
        cmd.arg("-C").arg(dir).args(["-cf", "-", "."]);
        run_bounded(cmd, max, TAR_TIMEOUT).map_err(|e| match &self.rights {
            Rights::Of(c) => refused(c, "read", e),
            _ => plain(e),
        })
    }

    /// Clones `url` (checking out `git_ref`) into a temporary directory and returns it as a
    /// tar archive (at most `max` bytes); see the module docs for what the clone may use.
    pub fn clone_workspace(
        &self,
        url: &str,
        git_ref: Option<&str>,
        max: u64,
    ) -> Result<Vec<u8>, String> {
        if self.rights == Rights::Unknown {
            return Err(UNKNOWN_SUBMITTER.into());
        }
        let tmp = tempfile::Builder::new()
            .prefix("agentvm-clone-")
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        let home = tmp.path().join("home");
        std::fs::create_dir(&home).map_err(|e| format!("creating {}: {e}", home.display()))?;
        if let Rights::Of(c) = &self.rights {
            for dir in [tmp.path(), home.as_path()] {
                std::os::unix::fs::chown(dir, Some(c.uid), Some(c.gid))
                    .map_err(|e| format!("giving {} to {c}: {e}", dir.display()))?;
            }
        }
        let repo = tmp.path().join("repo");
        let deadline = Instant::now() + self.clone_timeout;
        let mut clone = self.git(&home);
        clone.args(["clone", "--quiet", "--"]).arg(url).arg(&repo);
        self.run_git(clone, deadline)?;
        if let Some(r) = git_ref {
            let mut checkout = self.git(&home);
            checkout
                .arg("-C")
                .arg(&repo)
                .args(["checkout", "--quiet", r]);
            self.run_git(checkout, deadline)?;
        }
        self.tar_dir(&repo, max)
    }

    /// `program` with the submitter's rights; `clean_env`: with nothing of the controller's
    /// environment but `PATH` (always so for another user).
    fn command(&self, program: &str, clean_env: bool) -> Command {
        let mut cmd = match &self.rights {
            Rights::Of(c) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={}", c.uid))
                    .arg(format!("--regid={}", c.gid));
                if c.groups.is_empty() {
                    cmd.arg("--clear-groups");
                } else {
                    let groups: Vec<String> = c.groups.iter().map(u32::to_string).collect();
                    cmd.arg(format!("--groups={}", groups.join(",")));
                }
                cmd.args(["--inh-caps=-all", "--no-new-privs", "--", program]);
                cmd
            }
            _ => Command::new(program),
        };
        if clean_env || matches!(self.rights, Rights::Of(_)) {
            cmd.env_clear().env("PATH", search_path());
        }
        cmd.current_dir("/");
        cmd
    }

    /// git without anyone's configuration or credentials, `HOME` at the empty `home`.
    fn git(&self, home: &Path) -> Command {
        let mut cmd = self.command("git", true);
        cmd.env("HOME", home)
            .env("XDG_CONFIG_HOME", home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ALLOW_PROTOCOL", GIT_PROTOCOLS)
            .env("GIT_SSH_COMMAND", GIT_SSH_COMMAND)
            .args([
                "-c",
                "credential.helper=",
                "-c",
                "core.askPass=",
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "protocol.file.allow=never",
            ]);
        cmd
    }

    fn run_git(&self, cmd: Command, deadline: Instant) -> Result<(), String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match run_bounded(cmd, 1024 * 1024, left) {
            Ok(_) => Ok(()),
            Err(HelperError::TimedOut(_)) => Err(format!(
                "git did not finish within {} s (gitCloneTimeoutSeconds)",
                self.clone_timeout.as_secs()
            )),
            Err(e) => Err(match &self.rights {
                Rights::Of(c) => refused(c, "clone", e),
                _ => plain(e),
            }),
        }
    }
}

/// Reads at most `max` bytes of `path` in this process.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut data = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| e.to_string())?;
    if data.len() as u64 > max {
        return Err(format!("larger than {max} bytes"));
    }
    Ok(data)
}

/// The reason of a `cat` or `tar` error line (`cat: /etc/shadow: Permission denied` →
/// `Permission denied`).
fn reason(stderr: &str) -> &str {
    let line = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.rsplit(": ").next().unwrap_or(line)
}

/// The message of a helper error when the controller acts as itself.
fn plain(e: HelperError) -> String {
    match e {
        HelperError::Spawn(e) => format!("running a helper: {e}"),
        HelperError::TooLarge(max) => format!("larger than {max} bytes"),
        HelperError::TimedOut(d) => format!("not read within {} s", d.as_secs()),
        HelperError::Failed(stderr) => stderr,
    }
}

/// The message of a helper error when the controller acts for `c`, trying to `verb` a path.
fn refused(c: &Caller, verb: &str, e: HelperError) -> String {
    match e {
        HelperError::Failed(stderr) if stderr.starts_with("setpriv:") => format!(
            "the controller cannot take the rights of {c}, who submitted the run, to {verb} it ({}); run the controller as root",
            stderr.lines().next().unwrap_or_default()
        ),
        HelperError::Failed(stderr) if verb == "clone" => {
            format!("cloning with the rights of {c}, who submitted the run, failed: {stderr}")
        }
        HelperError::Failed(stderr) => format!(
            "not readable with the rights of {c}, who submitted the run: {}",
            reason(&stderr)
        ),
        other => plain(other),
    }
}

/// Kills the process group `pgid` (a helper and whatever it started).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs `cmd` in a process group of its own and returns its standard output, which must
/// end (with exit status 0) within `timeout` and be at most `max` bytes; otherwise the
/// group is killed.
fn run_bounded(mut cmd: Command, max: u64, timeout: Duration) -> Result<Vec<u8>, HelperError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().map_err(HelperError::Spawn)?;
    let pgid = child.id();
    let (Some(mut out), Some(mut err)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(pgid);
        let _ = child.wait();
        return Err(HelperError::Spawn(std::io::Error::other("no pipes")));
    };
    let overflow = Arc::new(AtomicBool::new(false));
    let over = overflow.clone();
    let out_reader = std::thread::spawn(move || {
        let mut data = Vec::new();
        let result = (&mut out).take(max + 1).read_to_end(&mut data);
        if data.len() as u64 > max {
            over.store(true, Ordering::SeqCst);
        }
        result.map(|_| data)
    });
    let err_reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match err.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = STDERR_KEEP.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        String::from_utf8_lossy(&kept).trim().to_string()
    });
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) => {}
            Err(e) => break Err(HelperError::Spawn(e)),
        }
        if overflow.load(Ordering::SeqCst) {
            break Err(HelperError::TooLarge(max));
        }
        if Instant::now() >= deadline {
            break Err(HelperError::TimedOut(timeout));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            // Not reaped yet: the group still exists and is ours.
            kill_group(pgid);
            let _ = child.wait();
            let _ = out_reader.join();
            let _ = err_reader.join();
            return Err(e);
        }
    };
    // Something the helper started may still hold its output open.
    while !out_reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !out_reader.is_finished() {
        kill_group(pgid);
    }
    let data = out_reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    if overflow.load(Ordering::SeqCst) {
        return Err(HelperError::TooLarge(max));
    }
    if !status.success() {
        return Err(HelperError::Failed(if stderr.is_empty() {
            format!("exited with {status}")
        } else {
            stderr
        }));
    }
    match data {
        Ok(Ok(data)) => Ok(data),
        Ok(Err(e)) => Err(HelperError::Spawn(e)),
        Err(_) => Err(HelperError::Spawn(std::io::Error::other(
            "the output reader panicked",
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_CLONE_TIMEOUT: Duration = Duration::from_secs(DEFAULT_GIT_CLONE_TIMEOUT_SECONDS);

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn helpers_are_bounded_in_time_and_size_and_their_errors_kept() {
        assert_eq!(
            run_bounded(sh("printf hello"), 5, Duration::from_secs(10)).unwrap(),
            b"hello"
        );
        assert!(matches!(
            run_bounded(sh("printf hello!"), 5, Duration::from_secs(10)),
            Err(HelperError::TooLarge(5))
        ));
        // Endless output is cut off, not read into memory.
        assert!(matches!(
            run_bounded(sh("yes"), 1 << 20, Duration::from_secs(30)),
            Err(HelperError::TooLarge(_))
        ));
        // A helper and its child that outlive the deadline are both killed.
        let t = Instant::now();
        let e = run_bounded(sh("sleep 30 & sleep 30"), 10, Duration::from_millis(300));
        assert!(matches!(e, Err(HelperError::TimedOut(_))), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        match run_bounded(
            sh("echo 'cat: /x: Permission denied' >&2; exit 1"),
            10,
            Duration::from_secs(10),
        ) {
            Err(HelperError::Failed(s)) => assert_eq!(reason(&s), "Permission denied"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            run_bounded(
                Command::new("/nonexistent/helper"),
                10,
                Duration::from_secs(1)
            ),
            Err(HelperError::Spawn(_))
        ));
    }

    fn alice() -> Caller {
        Caller {
            uid: 4321,
            gid: 4321,
            groups: vec![],
            user: Some("alice".into()),
        }
    }

    #[test]
    fn who_reads_what() {
        let allow_list = ["SHARED_TOKEN".to_string()];
        let timeout = Duration::from_secs(7);
        let env = |k: &str| (k != "UNSET").then(|| format!("value-of-{k}"));
        // root: every variable, read in-process.
        let root = HostAccess::of_submitter(Some(&Caller::root()), &allow_list, timeout);
        assert_eq!(root.rights, Rights::Own);
        assert_eq!(
            root.env_var("ROOT_ONLY", &env).unwrap(),
            "value-of-ROOT_ONLY"
        );
        // Another user: only the allow-list, refused before the lookup.
        let a = HostAccess::of_submitter(Some(&alice()), &allow_list, timeout);
        assert_eq!(a.rights, Rights::Of(alice()));
        assert_eq!(a.clone_timeout, Duration::from_secs(7));
        assert_eq!(
            a.env_var("SHARED_TOKEN", &env).unwrap(),
            "value-of-SHARED_TOKEN"
        );
        assert_eq!(
            a.env_var("ROOT_ONLY", &env).unwrap_err(),
            "host environment variable ROOT_ONLY is not in the controller's secretEnvAllowList, so uid=4321(alice), who submitted the run, may not use it; ask the controller's administrator to allow it, or use fromFile with a file you can read"
        );
        assert_eq!(
            a.env_var("UNSET", &env).unwrap_err(),
            a.env_var("ROOT_ONLY", &env)
                .unwrap_err()
                .replace("ROOT_ONLY", "UNSET")
        );
        // Unknown submitter: nothing at all.
        let u = HostAccess::of_submitter(None, &allow_list, timeout);
        assert_eq!(
            u.env_var("SHARED_TOKEN", &env).unwrap_err(),
            UNKNOWN_SUBMITTER
        );
        assert_eq!(
            u.read_file(Path::new("/etc/hostname"), 10).unwrap_err(),
            UNKNOWN_SUBMITTER
        );
        assert_eq!(
            u.tar_dir(Path::new("/etc"), 10).unwrap_err(),
            UNKNOWN_SUBMITTER
        );
        assert_eq!(
            u.clone_workspace("https://example.invalid/r.git", None, 10)
                .unwrap_err(),
            UNKNOWN_SUBMITTER
        );
    }

    #[test]
    fn another_users_helper_gets_only_path_and_their_ids() {
        let a = HostAccess::of_submitter(Some(&alice()), &[], DEFAULT_CLONE_TIMEOUT);
        let cmd = a.command("cat", false);
        assert_eq!(cmd.get_program(), "setpriv");
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--reuid=4321",
                "--regid=4321",
                "--clear-groups",
                "--inh-caps=-all",
                "--no-new-privs",
                "--",
                "cat"
            ]
        );
        let envs: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.to_owned())
            .collect();
        assert_eq!(envs, ["PATH"]);
        let with_groups = Caller {
            groups: vec![10, 998],
            ..alice()
        };
        let a = HostAccess::of_submitter(Some(&with_groups), &[], DEFAULT_CLONE_TIMEOUT);
        let cmd = a.command("tar", false);
        assert!(cmd.get_args().any(|a| a == "--groups=10,998"));
    }

    #[test]
    fn own_reads_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        let own = HostAccess::own(Duration::from_secs(5));
        assert_eq!(own.read_file(&f, 10).unwrap(), b"0123456789");
        assert_eq!(own.read_file(&f, 9).unwrap_err(), "larger than 9 bytes");
        assert!(own
            .read_file(&dir.path().join("missing"), 9)
            .unwrap_err()
            .contains("No such file"));
        let tar = own.tar_dir(dir.path(), 1 << 20).unwrap();
        assert!(tar.windows(10).any(|w| w == b"0123456789"));
    }

    #[test]
    fn clones_use_no_local_paths_and_no_credentials() {
        // A local repository: the file transport is not allowed, whoever asks.
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("r");
        let ok = Command::new("git")
            .args(["init", "--quiet"])
            .arg(&repo)
            .status()
            .unwrap();
        assert!(ok.success());
        let own = HostAccess::own(Duration::from_secs(30));
        for url in [
            format!("file://{}", repo.display()),
            repo.display().to_string(),
        ] {
            let e = own.clone_workspace(&url, None, 1 << 20).unwrap_err();
            assert!(e.contains("transport 'file' not allowed"), "{url}: {e}");
        }
        // ext:: would run a command.
        let e = own
            .clone_workspace("ext::sh -c touch% /tmp/agentvm-ext-pwned", None, 1 << 20)
            .unwrap_err();
        assert!(e.contains("transport 'ext' not allowed"), "{e}");
        assert!(!Path::new("/tmp/agentvm-ext-pwned").exists());
    }

    #[test]
    fn a_clone_that_hangs_is_killed_at_its_timeout() {
        // A git daemon on this machine that accepts and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(conn);
        });
        let own = HostAccess::own(Duration::from_secs(1));
        let t = Instant::now();
        let e = own
            .clone_workspace(&format!("git://127.0.0.1:{port}/r.git"), None, 1 << 20)
            .unwrap_err();
        assert_eq!(e, "git did not finish within 1 s (gitCloneTimeoutSeconds)");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        held.join().unwrap();
    }
}
