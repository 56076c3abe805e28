//! `agentvm wait KIND/NAME --for=condition=X[=True|False] | --for=phase=Y | --for=delete`:
//! block until every object meets the condition (exit 0) or the timeout passes (exit 1).
//! Driven by the controller's watch stream; re-reads the objects when the stream lags,
//! breaks, or stays quiet for a while.
//!
//! Progress goes to stderr: on a terminal a live line (a bar of ready VMs for a pool,
//! `ready 1/3`, a spinner otherwise); elsewhere one plain line each time the state changes.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentvm_api::Kind;
use agentvm_client::Client;
use agentvm_client::{WatchChange, WatchEvent};
use agentvm_controller::Config;
use agentvm_store::StoredObject;
use anyhow::bail;
use clap::Args;
use serde_json::Value;

use super::objects::{object_ref, parse_targets, ConnectArgs};

/// Longest time without a re-read of the objects (the fallback when events are missed).
const RELIST_EVERY: Duration = Duration::from_secs(5);

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// `status.conditions[type=NAME].status == STATUS` (case-insensitive).
    Condition {
        /// The condition type (`Ready`).
        name: String,
        /// `True`, `False` or `Unknown`.
        status: String,
    },
    /// `status.phase == PHASE` (case-insensitive).
    Phase(String),
    /// The object is gone.
    Delete,
}

impl std::fmt::Display for WaitFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitFor::Condition { name, status } => write!(f, "condition {name}={status}"),
            WaitFor::Phase(p) => write!(f, "phase {p}"),
            WaitFor::Delete => f.write_str("deletion"),
        }
    }
}

/// Parses `condition=X`, `condition=X=True|False|Unknown`, `phase=Y` or `delete`.
pub fn parse_wait_for(text: &str) -> Result<WaitFor, String> {
    let usage = "use --for=condition=NAME[=True|False], --for=phase=PHASE or --for=delete";
    if text == "delete" {
        return Ok(WaitFor::Delete);
    }
    if let Some(rest) = text.strip_prefix("condition=") {
        let (name, status) = rest.split_once('=').unwrap_or((rest, "True"));
        let status = match status.to_ascii_lowercase().as_str() {
            "true" => "True",
            "false" => "False",
            "unknown" => "Unknown",
            _ => {
                return Err(format!(
                    "{status:?} is not a condition status: use True, False or Unknown"
                ))
            }
        };
        if name.is_empty() {
            return Err(format!("the condition name is missing; {usage}"));
        }
        return Ok(WaitFor::Condition {
            name: name.to_string(),
            status: status.to_string(),
        });
    }
    if let Some(phase) = text.strip_prefix("phase=") {
        if phase.is_empty() {
            return Err(format!("the phase is missing; {usage}"));
        }
        return Ok(WaitFor::Phase(phase.to_string()));
    }
    Err(format!("{text:?}: {usage}"))
}

/// Options of `wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Objects as `KIND/NAME...` or `KIND NAME...`.
    #[arg(value_name = "TARGET", required = true)]
    targets: Vec<String>,
    /// The condition: `condition=NAME[=True|False|Unknown]` (status.conditions),
    /// `phase=PHASE` (status.phase) or `delete` (the object is gone; met at once when it
    /// does not exist).
    #[arg(long = "for", value_name = "CONDITION", value_parser = parse_wait_for)]
    wait_for: WaitFor,
    /// Give up after this long (`30s`, `5m`, `1h`, or seconds); exit 1 then.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = super::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// Where one object stands relative to the condition.
#[derive(Debug, PartialEq, Eq)]
enum Check {
    Met,
    /// Not yet; what it is now, for the progress and timeout messages.
    Pending(String),
    /// Can never be met (the object is gone).
    Impossible(String),
}

fn check(wait_for: &WaitFor, obj: Option<&StoredObject>) -> Check {
    let Some(obj) = obj else {
        return match wait_for {
            WaitFor::Delete => Check::Met,
            _ => Check::Impossible("not found".into()),
        };
    };
    let status = obj.status_json();
    match wait_for {
        WaitFor::Delete if obj.is_deleting() => Check::Pending("deletion in progress".into()),
        WaitFor::Delete => Check::Pending("exists, no deletion requested".into()),
        WaitFor::Phase(want) => match status.get("phase").and_then(Value::as_str) {
            Some(p) if p.eq_ignore_ascii_case(want) => Check::Met,
            Some(p) => Check::Pending(format!("phase {p}")),
            None => Check::Pending("no phase yet (not reconciled)".into()),
        },
        WaitFor::Condition { name, status: want } => {
            let found = status
                .get("conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter().find(|c| {
                        c.get("type")
                            .and_then(Value::as_str)
                            .is_some_and(|t| t.eq_ignore_ascii_case(name))
                    })
                });
            let Some(c) = found else {
                return Check::Pending(format!("no condition {name} yet"));
            };
            let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("");
            if s("status").eq_ignore_ascii_case(want) {
                Check::Met
            } else {
                let reason = match (s("reason"), s("message")) {
                    ("", "") => String::new(),
                    (r, "") => format!(" ({r})"),
                    (r, m) => format!(" ({r}: {m})"),
                };
                Check::Pending(format!("{name}={}{reason}", s("status")))
            }
        }
    }
}

/// A message from the watching thread.
enum Signal {
    /// The stream is (re)connected: re-read, events before it may be missed.
    Connected,
    /// One event.
    Event(WatchEvent),
    /// The stream broke; the thread reconnects.
    Broken,
}

/// Watches every kind on a thread that reconnects when the stream breaks.
fn spawn_watch(client: Client) -> mpsc::Receiver<Signal> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || loop {
        match client.watch(None, false) {
            Ok(stream) => {
                if tx.send(Signal::Connected).is_err() {
                    return;
                }
                for event in stream {
                    let signal = match event {
                        Ok(e) => Signal::Event(e),
                        Err(_) => break,
                    };
                    if tx.send(signal).is_err() {
                        return;
                    }
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
        if tx.send(Signal::Broken).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    });
    rx
}

/// How far a `VmPool` is towards `minReady`: (ready VMs, VMs wanted).
fn pool_ready(obj: Option<&StoredObject>) -> Option<(u64, u64)> {
    let agentvm_api::Resource::VmPool(pool) = &obj?.resource else {
        return None;
    };
    let want = u64::from(pool.spec.min_ready.min(pool.spec.max_size));
    let ready = obj?
        .status_json()
        .get("ready")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some((ready, want))
}

/// Shows progress on stderr: a live line on a terminal (a bar when there is a count), one
/// plain line per change otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: String,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Self {
            bar,
            last: String::new(),
        }
    }

    fn update(&mut self, message: String, count: Option<(u64, u64)>) {
        let line = match count {
            Some((ready, want)) => format!("{message} ready {ready}/{want}"),
            None => message.clone(),
        };
        match &self.bar {
            Some(bar) => {
                if let Some((ready, want)) = count {
                    if bar.length() != Some(want) {
                        bar.set_length(want);
                        bar.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{spinner} [{elapsed}] {bar:20} ready {pos}/{len} {wide_msg}",
                            )
                            .expect("valid template"),
                        );
                    }
                    bar.set_position(ready.min(want));
                }
                bar.set_message(message);
            }
            None if line != self.last => eprintln!("{line}"),
            None => {}
        }
        self.last = line;
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl WaitArgs {
    /// Wait; exit 0 when every object meets the condition, 1 on timeout or when it cannot.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let targets = parse_targets(&self.targets)?;
        let client = self.conn.client(cfg);
        let deadline = Instant::now() + self.timeout;
        let events = spawn_watch(client.clone());
        let get = |kind: Kind, name: &str| -> anyhow::Result<Option<StoredObject>> {
            match client.get(kind, name) {
                Ok(o) => Ok(Some(o)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e.into()),
            }
        };
        for (kind, name) in targets {
            let r = object_ref(kind, &name);
            let what = &self.wait_for;
            let mut state = get(kind, &name)?;
            let mut progress = Progress::new();
            let mut last_read = Instant::now();
            loop {
                let now_state = check(what, state.as_ref());
                match &now_state {
                    Check::Met => {
                        progress.finish();
                        match what {
                            WaitFor::Delete => println!("{r} deleted"),
                            _ => println!("{r} {what} met"),
                        }
                        break;
                    }
                    Check::Impossible(why) => {
                        progress.finish();
                        eprintln!("error: {r} {why}; cannot wait for its {what}");
                        return Ok(1);
                    }
                    Check::Pending(now) => {
                        let message = format!("waiting for {r}: {what} (now: {now})");
                        progress.update(message, pool_ready(state.as_ref()));
                    }
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    progress.finish();
                    let Check::Pending(now) = now_state else {
                        unreachable!("met and impossible return above")
                    };
                    eprintln!(
                        "error: timed out after {} waiting for {r}: {what} (now: {now})",
                        humantime::format_duration(self.timeout)
                    );
                    return Ok(1);
                }
                let reread = match events.recv_timeout(remaining.min(RELIST_EVERY)) {
                    Ok(Signal::Event(e)) => match (&e.kind, &e.name) {
                        (Some(k), Some(n)) if *k == kind && *n == name => {
                            state = match e.change {
                                WatchChange::Removed => None,
                                _ => e.object.map(|o| *o),
                            };
                            last_read = Instant::now();
                            false
                        }
                        (None, _) => true, // lagged
                        _ => last_read.elapsed() >= RELIST_EVERY,
                    },
                    Ok(Signal::Connected | Signal::Broken) => true,
                    Err(mpsc::RecvTimeoutError::Timeout) => true,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        bail!("the watch of the controller stopped")
                    }
                };
                if reread {
                    state = get(kind, &name)?;
                    last_read = Instant::now();
                }
            }
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_for() {
        assert_eq!(parse_wait_for("delete").unwrap(), WaitFor::Delete);
        assert_eq!(
            parse_wait_for("condition=Ready").unwrap(),
            WaitFor::Condition {
                name: "Ready".into(),
                status: "True".into()
            }
        );
        assert_eq!(
            parse_wait_for("condition=Ready=false").unwrap(),
            WaitFor::Condition {
                name: "Ready".into(),
                status: "False".into()
            }
        );
        assert_eq!(
            parse_wait_for("phase=Running").unwrap(),
            WaitFor::Phase("Running".into())
        );
        assert!(parse_wait_for("condition=Ready=maybe").is_err());
        assert!(parse_wait_for("jsonpath={.x}").is_err());
        assert!(parse_wait_for("phase=").is_err());
    }
}
