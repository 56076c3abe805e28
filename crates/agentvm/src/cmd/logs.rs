//! `agentvm logs run/NAME [-f]`: print an AgentRun's stored output (stdout and stderr
//! interleaved as produced); `-f` follows it until the run ends.

use std::io::{BufRead, Write};

use agentvm_api::Kind;
use agentvm_controller::Config;
use anyhow::{bail, Context};
use clap::Args;

use super::objects::{object_ref, parse_kind, ConnectArgs};

/// Options of `logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The run: `run/NAME` (or `agentrun/NAME`), or just `NAME`.
    #[arg(value_name = "RUN")]
    run: String,
    /// Keep printing new output until the run ends.
    #[arg(short = 'f', long)]
    follow: bool,
    #[command(flatten)]
    conn: ConnectArgs,
}

/// The run's name from `run/NAME` or `NAME`.
fn run_name(target: &str) -> anyhow::Result<&str> {
    let name = match target.split_once('/') {
        Some((kind, name)) => {
            let kind = parse_kind(kind)?;
            if kind != Kind::AgentRun {
                bail!(
                    "only AgentRuns have logs; {} has none (use `agentvm describe {target}`)",
                    object_ref(kind, name)
                );
            }
            name
        }
        None => target,
    };
    if name.is_empty() {
        bail!("{target:?}: the name is missing (run/NAME)");
    }
    Ok(name)
}

impl LogsArgs {
    /// Print the output; exit 1 if the run does not exist.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let name = run_name(&self.run)?;
        let client = self.conn.client(cfg);
        let logs = match client.logs(name, 0, self.follow) {
            Ok(l) => l,
            Err(e) if e.is_not_found() => {
                eprintln!("error: {} not found", object_ref(Kind::AgentRun, name));
                return Ok(1);
            }
            Err(e) => return Err(e.into()),
        };
        let truncated = logs.truncated;
        let mut body = logs.body;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        // Copy as it arrives, flushing each piece (a followed run's output is live).
        loop {
            let buf = body
                .fill_buf()
                .context("reading the run's output from the controller")?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len();
            match out.write_all(buf).and_then(|_| out.flush()) {
                Ok(()) => {}
                // The reader went away (`| head`): stop quietly.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
                Err(e) => return Err(e.into()),
            }
            body.consume(n);
        }
        // Said on stderr, so that stdout stays the program's own output.
        let dropped = client
            .get(Kind::AgentRun, name)
            .ok()
            .and_then(|o| truncation_note(&o.status_json()));
        match dropped {
            Some(note) => eprintln!("{note}"),
            None if truncated => eprintln!(
                "agentvm: output beyond the run's cap (output.maxMib) was dropped; the beginning is shown"
            ),
            None => {}
        }
        Ok(0)
    }
}

/// The line `logs` ends with when the run's output was cut at its cap: its `OutputTruncated`
/// condition's message (which has the byte counts), or `None`.
fn truncation_note(status: &serde_json::Value) -> Option<String> {
    let c = status["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "OutputTruncated" && c["status"] == "True")?;
    Some(format!(
        "agentvm: output truncated: {}",
        c["message"].as_str().unwrap_or("")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_truncation_note_comes_from_the_condition() {
        let status = serde_json::json!({"conditions": [
            {"type": "Completed", "status": "True"},
            {"type": "OutputTruncated", "status": "True", "reason": "OutputCapReached",
             "message": "stdout: 5 of 15 bytes dropped"},
        ]});
        assert_eq!(
            truncation_note(&status).as_deref(),
            Some("agentvm: output truncated: stdout: 5 of 15 bytes dropped")
        );
        assert_eq!(truncation_note(&serde_json::json!({})), None);
    }

    #[test]
    fn names_runs() {
        assert_eq!(run_name("run/hello").unwrap(), "hello");
        assert_eq!(run_name("agentruns/hello").unwrap(), "hello");
        assert_eq!(run_name("hello").unwrap(), "hello");
        let err = run_name("pool/sandbox").unwrap_err().to_string();
        assert!(err.contains("only AgentRuns have logs"), "{err}");
        assert!(run_name("run/").is_err());
    }
}
