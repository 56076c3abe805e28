//! Running the external tools of a build, streaming their output as progress lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use crate::ImageError;

/// How many trailing lines of error output an error keeps.
pub(crate) const TAIL_LINES: usize = 20;

/// A command's full text, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", s.replace('\'', "'\\''"))
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion. Each line it prints (stdout or stderr) goes to
/// `on_line` as it arrives, when given. On failure the error carries the last
/// [`TAIL_LINES`] lines of stderr (of stdout if stderr was silent).
pub(crate) fn run(
    cmd: &mut Command,
    mut on_line: Option<&mut dyn FnMut(String)>,
) -> Result<(), ImageError> {
    let command = describe(cmd);
    tracing::debug!(%command, "running");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            command: command.clone(),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let readers: Vec<_> = [
        (
            false,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            true,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ]
    .into_iter()
    .filter_map(|(is_err, stream)| stream.map(|s| (is_err, s)))
    .map(|(is_err, stream)| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                        if tx.send((is_err, line)).is_err() {
                            break;
                        }
                    }
                }
            }
        })
    })
    .collect();
    drop(tx);

    let mut err_tail = VecDeque::with_capacity(TAIL_LINES);
    let mut out_tail = VecDeque::with_capacity(TAIL_LINES);
    for (is_err, line) in rx {
        let tail = if is_err { &mut err_tail } else { &mut out_tail };
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        if let Some(f) = on_line.as_mut() {
            f(line);
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|source| ImageError::Spawn {
        command: command.clone(),
        source,
    })?;
    if status.success() {
        return Ok(());
    }
    let tail = if err_tail.iter().any(|l| !l.trim().is_empty()) {
        err_tail
    } else {
        out_tail
    };
    Err(ImageError::CommandFailed {
        command,
        status: status.to_string(),
        output_tail: tail.into(),
    })
}

/// Whether `tool` is an executable on PATH (or an existing absolute path).
pub(crate) fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if tool.contains('/') {
        return is_exec(std::path::Path::new(tool));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| is_exec(&dir.join(tool)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_stream_and_failures_keep_the_stderr_tail() {
        let mut seen = Vec::new();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo 'I: Retrieving x'; for i in $(seq 1 30); do echo err$i >&2; done; exit 3");
        let mut push = |l: String| seen.push(l);
        let err = run(&mut cmd, Some(&mut push)).unwrap_err();
        assert!(seen.contains(&"I: Retrieving x".to_owned()));
        assert_eq!(seen.len(), 31);
        match &err {
            ImageError::CommandFailed {
                command,
                status,
                output_tail,
            } => {
                assert!(command.starts_with("sh -c 'echo"), "{command}");
                assert!(status.contains('3'), "{status}");
                assert_eq!(output_tail.len(), TAIL_LINES);
                assert_eq!(output_tail.last().unwrap(), "err30");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("err30"));
    }

    #[test]
    fn success_and_missing_programs() {
        run(&mut Command::new("true"), None).unwrap();
        let err = run(&mut Command::new("/nonexistent/tool"), None).unwrap_err();
        assert!(matches!(err, ImageError::Spawn { .. }), "{err:?}");
        assert!(on_path("sh"));
        assert!(!on_path("surely-not-a-real-tool-agentvm"));
    }
}
