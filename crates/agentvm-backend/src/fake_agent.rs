//! `FakeAgent`: an in-memory qemu-guest-agent for tests of code that runs programs in guests
//! (the controller's run executor) without a VM. It keeps files, hands out handles, and
//! "executes" scripts written into it with a tiny interpreter that understands one command
//! per line: `echo TEXT` (`$NAME` expands from the process env; `>&2` at the end writes to
//! stderr), `bytes N` (N bytes of `a` on stdout, `>&2`: on stderr), `sleep SECONDS` and
//! `exit CODE`. Any other process (mkdir, chmod, rm, ...)
//! exits 0 at once; a `kill -s KILL -- -PGID` kills that process.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use crate::error::{BackendError, Result};
use crate::guest::AgentChannel;

#[derive(Debug)]
struct Proc {
    start: Instant,
    runs_for: Duration,
    code: i32,
    killed: bool,
}

#[derive(Debug, Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    handles: HashMap<i64, (String, usize)>,
    procs: HashMap<i64, Proc>,
    next: i64,
    scripts: Vec<String>,
    /// Artifact archives by guest path, with the size the "guest" reports for them.
    artifacts: HashMap<String, (Vec<u8>, u64)>,
}

/// An in-memory guest agent; see the module documentation.
pub struct FakeAgent {
    name: String,
    state: Mutex<State>,
    guest_files: Option<std::sync::Arc<crate::fake::GuestFileFn>>,
}

impl std::fmt::Debug for FakeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAgent")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl FakeAgent {
    /// A fresh agent of VM `name` (no files, no processes).
    pub fn new(name: &str) -> Self {
        FakeAgent {
            name: name.to_string(),
            state: Mutex::new(State {
                next: 100,
                ..State::default()
            }),
            guest_files: None,
        }
    }

    /// Answers reads of files it does not hold with `files` (VM name, path → content).
    pub fn with_guest_files(
        mut self,
        files: Option<std::sync::Arc<crate::fake::GuestFileFn>>,
    ) -> Self {
        self.guest_files = files;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes packing the artifact at `guest_path` succeed: the archive is `tar`, and the
    /// size printed for it is `reported_size` (a lying guest prints less than it sends).
    pub fn put_artifact(&self, guest_path: &str, tar: Vec<u8>, reported_size: u64) {
        self.lock()
            .artifacts
            .insert(guest_path.to_string(), (tar, reported_size));
    }

    /// Texts of the scripts executed so far.
    pub fn scripts(&self) -> Vec<String> {
        self.lock().scripts.clone()
    }

    fn bad(&self, message: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            what: format!("fake agent of {}", self.name),
            message: message.into(),
        }
    }
}

/// Runs `script`: (stdout, stderr, run time, exit code).
fn interpret(script: &str, env: &BTreeMap<String, String>) -> (Vec<u8>, Vec<u8>, Duration, i32) {
    let (mut out, mut err, mut t, mut code) = (Vec::new(), Vec::new(), 0.0f64, 0);
    for line in script.lines().map(str::trim) {
        if let Some(text) = line.strip_prefix("echo ") {
            let (text, to_err) = match text.strip_suffix(">&2") {
                Some(t) => (t.trim_end(), true),
                None => (text, false),
            };
            let mut s = text.trim_matches('"').to_string();
            for (k, v) in env {
                s = s.replace(&format!("${k}"), v);
            }
            s.push('\n');
            if to_err {
                err.extend_from_slice(s.as_bytes());
            } else {
                out.extend_from_slice(s.as_bytes());
            }
        } else if let Some(n) = line.strip_prefix("bytes ") {
            let (n, to) = match n.strip_suffix(">&2") {
                Some(n) => (n, &mut err),
                None => (n, &mut out),
            };
            to.resize(to.len() + n.trim().parse::<usize>().unwrap_or(0), b'a');
        } else if let Some(n) = line.strip_prefix("sleep ") {
            t += n.trim().parse::<f64>().unwrap_or(0.0);
        } else if let Some(n) = line.strip_prefix("exit ") {
            code = n.trim().parse().unwrap_or(1);
            break;
        }
    }
    (out, err, Duration::from_secs_f64(t), code)
}

impl AgentChannel for FakeAgent {
    fn vm_name(&self) -> &str {
        &self.name
    }

    fn command(&self, command: &Value, _timeout: Duration) -> Result<Value> {
        let a = &command["arguments"];
        let mut s = self.lock();
        let handle = a["handle"].as_i64().unwrap_or(-1);
        match command["execute"].as_str().unwrap_or("") {
            "guest-ping" | "guest-file-flush" => Ok(json!({})),
            "guest-file-open" => {
                let path = a["path"].as_str().unwrap_or("").to_string();
                let mode = a["mode"].as_str().unwrap_or("r");
                if !mode.starts_with('w') && !s.files.contains_key(&path) {
                    if let Some(data) = self.guest_files.as_ref().and_then(|f| f(&self.name, &path))
                    {
                        s.files.insert(path.clone(), data);
                    }
                }
                if mode.starts_with('w') {
                    s.files.insert(path.clone(), Vec::new());
                } else if !s.files.contains_key(&path) {
                    return Err(BackendError::GuestCommand {
                        vm: self.name.clone(),
                        command: "guest-file-open".into(),
                        message: format!("No such file: {path}"),
                    });
                }
                s.next += 1;
                let h = s.next;
                s.handles.insert(h, (path, 0));
                Ok(json!(h))
            }
            "guest-file-close" => {
                s.handles.remove(&handle);
                Ok(json!({}))
            }
            "guest-file-write" => {
                let data = B64
                    .decode(a["buf-b64"].as_str().unwrap_or(""))
                    .map_err(|e| self.bad(e.to_string()))?;
                let (path, pos) = s
                    .handles
                    .get(&handle)
                    .cloned()
                    .ok_or_else(|| self.bad("bad handle"))?;
                let f = s.files.entry(path.clone()).or_default();
                f.truncate(pos);
                f.extend_from_slice(&data);
                s.handles.insert(handle, (path, pos + data.len()));
                Ok(json!({"count": data.len()}))
            }
            "guest-file-seek" => {
                let (path, _) = s
                    .handles
                    .get(&handle)
                    .cloned()
                    .ok_or_else(|| self.bad("bad handle"))?;
                let len = s.files.get(&path).map_or(0, Vec::len);
                let off = a["offset"].as_u64().unwrap_or(0) as usize;
                let pos = if a["whence"] == "end" { len + off } else { off };
                s.handles.insert(handle, (path, pos));
                Ok(json!({"position": pos, "eof": pos >= len}))
            }
            "guest-file-read" => {
                let (path, pos) = s
                    .handles
                    .get(&handle)
                    .cloned()
                    .ok_or_else(|| self.bad("bad handle"))?;
                let data = s.files.get(&path).cloned().unwrap_or_default();
                let max = a["count"].as_u64().unwrap_or(4096) as usize;
                let chunk = data.get(pos..).unwrap_or(&[]);
                let chunk = &chunk[..chunk.len().min(max)];
                s.handles.insert(handle, (path, pos + chunk.len()));
                Ok(
                    json!({"count": chunk.len(), "buf-b64": B64.encode(chunk), "eof": pos + chunk.len() >= data.len()}),
                )
            }
            "guest-exec" => {
                let args: Vec<String> = a["arg"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(|x| x.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let env: BTreeMap<String, String> = a["env"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .filter_map(|x| x.as_str()?.split_once('='))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                s.next += 1;
                let pid = s.next;
                let mut proc = Proc {
                    start: Instant::now(),
                    runs_for: Duration::ZERO,
                    code: 0,
                    killed: false,
                };
                if let Some(i) = args.iter().position(|x| x == "kill -s KILL -- -$1") {
                    if let Some(p) = args.get(i + 2).and_then(|p| p.parse::<i64>().ok()) {
                        if let Some(victim) = s.procs.get_mut(&p) {
                            victim.killed = true;
                        }
                    }
                } else if a["path"] == "/usr/bin/setsid" && args.len() >= 9 {
                    // /bin/sh -c WRAPPER agentvm-exec OUT ERR CWD CGROUP PROGRAM ARGS..
                    let (out_path, err_path) = (args[4].clone(), args[5].clone());
                    if args[8..].iter().any(|x| x.contains("|| exit 3")) {
                        // Artifact packing (`/bin/sh -c SCRIPT agentvm PATH TMP`): a path
                        // given to `put_artifact`, or nothing.
                        let (path, tmp) = (args.get(12).cloned(), args.get(13).cloned());
                        match path.and_then(|p| s.artifacts.get(&p).cloned()).zip(tmp) {
                            Some(((tar, reported), tmp)) => {
                                s.files.insert(tmp, tar);
                                s.files
                                    .insert(out_path, format!("{reported}\n").into_bytes());
                                s.files.insert(err_path, Vec::new());
                            }
                            None => proc.code = 3,
                        }
                    } else if let Some(script) =
                        args[8..].iter().find_map(|x| s.files.get(x).cloned())
                    {
                        let script = String::from_utf8_lossy(&script).into_owned();
                        let (out, err, t, code) = interpret(&script, &env);
                        s.scripts.push(script);
                        s.files.insert(out_path, out);
                        s.files.insert(err_path, err);
                        proc.runs_for = t;
                        proc.code = code;
                    }
                }
                s.procs.insert(pid, proc);
                Ok(json!({"pid": pid}))
            }
            "guest-exec-status" => {
                let pid = a["pid"].as_i64().unwrap_or(-1);
                let p = s
                    .procs
                    .get(&pid)
                    .ok_or_else(|| self.bad(format!("no process {pid}")))?;
                if p.killed {
                    Ok(json!({"exited": true, "signal": 9}))
                } else if p.start.elapsed() >= p.runs_for {
                    Ok(json!({"exited": true, "exitcode": p.code}))
                } else {
                    Ok(json!({"exited": false}))
                }
            }
            other => Err(self.bad(format!("unsupported command {other}"))),
        }
    }
}
