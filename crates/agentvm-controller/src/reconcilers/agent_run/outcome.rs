//! How a run ended, as a pure function of what its execution left: [`classify`] gives the
//! run's final phase, reason and message, and whether its VM is no longer trusted.

use agentvm_api::{AgentRunPhase, Reason};
use agentvm_backend::BackendError;

use super::KILL_GRACE;
use agentvm_run::RunError;

/// How the program itself ended (when the execution returned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProgramEnd {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Killed in the guest at its timeout.
    pub timed_out: bool,
}

/// What the execution of a run left, for [`classify`].
#[derive(Debug)]
pub(super) struct Ending<'a> {
    /// The deadline thread destroyed the VM (the guest did not carry out the kill).
    pub hard_stopped: bool,
    /// The pool's anomaly policy stopped the run; with its first anomaly ("rule: message").
    pub anomaly_kill: Option<Option<String>>,
    /// The run was deleted while running.
    pub cancelled: bool,
    /// The execution's result.
    pub result: Result<ProgramEnd, &'a RunError>,
    /// `spec.timeoutSeconds`.
    pub timeout_seconds: u32,
    /// How long the run took.
    pub secs: f64,
    /// The VM it ran on.
    pub vm: &'a str,
    /// What becomes of a VM the run lost, for messages.
    pub fate: &'a str,
}

/// The run's final state.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Verdict {
    pub phase: AgentRunPhase,
    pub reason: Reason,
    pub message: String,
    /// The VM's QEMU or guest agent failed under the run: it is not trusted with another.
    pub replace_vm: bool,
    /// The program's own end decided the outcome: its exit code is the run's.
    pub from_program: bool,
}

impl Verdict {
    fn new(phase: AgentRunPhase, reason: Reason, message: String) -> Self {
        Verdict {
            phase,
            reason,
            message,
            replace_vm: false,
            from_program: false,
        }
    }

    fn replacing_the_vm(mut self) -> Self {
        self.replace_vm = true;
        self
    }

    fn decided_by_program(mut self) -> Self {
        self.from_program = true;
        self
    }
}

/// The outcome, first match wins: hard stop at the deadline, the anomaly policy, deletion,
/// then the program's end (timeout, exit 0, other exit, signal), then why the execution
/// failed (guest unresponsive, VM lost, setup). Messages that quote an error go through
/// `redact` (they may contain a secret's value).
pub(super) fn classify(e: &Ending, redact: &dyn Fn(String) -> String) -> Verdict {
    use AgentRunPhase::{Cancelled, Failed, Succeeded, TimedOut};
    if e.hard_stopped {
        return Verdict::new(
            TimedOut,
            Reason::GuestUnresponsive,
            format!(
                "the program did not end within {} s of its {} s timeout (the guest did not carry out the kill); VM {} {}",
                KILL_GRACE.as_secs(),
                e.timeout_seconds,
                e.vm,
                e.fate,
            ),
        )
        .replacing_the_vm();
    }
    if let Some(first) = &e.anomaly_kill {
        let message = match first {
            Some(a) => format!("stopped by the pool's anomaly policy: {a}"),
            None => "stopped by the pool's anomaly policy".to_string(),
        };
        return Verdict::new(Failed, Reason::AnomalyPolicy, message);
    }
    if e.cancelled {
        return Verdict::new(
            Cancelled,
            Reason::Cancelled,
            "deleted while running; killed in the guest".to_string(),
        );
    }
    match e.result {
        Ok(end) => {
            let v = if end.timed_out {
                Verdict::new(
                    TimedOut,
                    Reason::Timeout,
                    format!(
                        "killed in the guest after its {} s timeout",
                        e.timeout_seconds
                    ),
                )
            } else if end.exit_code == Some(0) {
                Verdict::new(
                    Succeeded,
                    Reason::Completed,
                    format!("exited 0 in {:.1} s", e.secs),
                )
            } else if let Some(code) = end.exit_code {
                Verdict::new(Failed, Reason::NonZeroExit, format!("exited {code}"))
            } else {
                Verdict::new(
                    Failed,
                    Reason::Signaled,
                    format!("killed by signal {:?}", end.signal),
                )
            };
            v.decided_by_program()
        }
        Err(RunError::Backend(err @ BackendError::Timeout { .. })) => Verdict::new(
            TimedOut,
            Reason::GuestUnresponsive,
            redact(format!("VM {} ({}): {err}", e.vm, e.fate)),
        )
        .replacing_the_vm(),
        Err(RunError::Backend(err)) => Verdict::new(
            Failed,
            Reason::VmLost,
            redact(format!("VM {} ({}): {err}", e.vm, e.fate)),
        )
        .replacing_the_vm(),
        Err(err) => Verdict::new(Failed, Reason::SetupFailed, redact(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ended(exit_code: Option<i32>, signal: Option<i32>, timed_out: bool) -> ProgramEnd {
        ProgramEnd {
            exit_code,
            signal,
            timed_out,
        }
    }

    fn ending(result: Result<ProgramEnd, &RunError>) -> Ending<'_> {
        Ending {
            hard_stopped: false,
            anomaly_kill: None,
            cancelled: false,
            result,
            timeout_seconds: 60,
            secs: 1.25,
            vm: "agentvm-p-1",
            fate: "replaced",
        }
    }

    fn hide_secret(s: String) -> String {
        s.replace("hunter2", "***")
    }

    #[test]
    fn classify_table() {
        use AgentRunPhase::*;
        let timeout = RunError::Backend(BackendError::Timeout {
            what: "guest-exec-status hunter2".into(),
            after: Duration::from_secs(10),
        });
        let lost = RunError::Backend(BackendError::VmNotRunning {
            vm: "agentvm-p-1".into(),
        });
        let setup = RunError::Secret {
            name: "TOKEN".into(),
            message: "file hunter2 not found".into(),
        };
        let ok = ended(Some(0), None, false);
        let with = |f: &dyn Fn(&mut Ending)| {
            let mut e = ending(Ok(ok));
            f(&mut e);
            e
        };
        // (what, ending, phase, reason, message, replace_vm, from_program)
        let cases: Vec<(&str, Ending, AgentRunPhase, Reason, &str, bool, bool)> = vec![
            (
                "exit 0",
                ending(Ok(ok)),
                Succeeded,
                Reason::Completed,
                "exited 0 in 1.2 s",
                false,
                true,
            ),
            (
                "non-zero exit",
                ending(Ok(ended(Some(3), None, false))),
                Failed,
                Reason::NonZeroExit,
                "exited 3",
                false,
                true,
            ),
            (
                "signal",
                ending(Ok(ended(None, Some(9), false))),
                Failed,
                Reason::Signaled,
                "killed by signal Some(9)",
                false,
                true,
            ),
            (
                "killed at its timeout",
                ending(Ok(ended(None, Some(9), true))),
                TimedOut,
                Reason::Timeout,
                "killed in the guest after its 60 s timeout",
                false,
                true,
            ),
            (
                "hard stop beats everything",
                with(&|e| {
                    e.hard_stopped = true;
                    e.cancelled = true;
                    e.anomaly_kill = Some(None);
                }),
                TimedOut,
                Reason::GuestUnresponsive,
                "the program did not end within 5 s of its 60 s timeout (the guest did not carry out the kill); VM agentvm-p-1 replaced",
                true,
                false,
            ),
            (
                "anomaly policy beats deletion",
                with(&|e| {
                    e.anomaly_kill = Some(Some("CpuSaturated: 100% for 30 s".into()));
                    e.cancelled = true;
                }),
                Failed,
                Reason::AnomalyPolicy,
                "stopped by the pool's anomaly policy: CpuSaturated: 100% for 30 s",
                false,
                false,
            ),
            (
                "anomaly policy without an anomaly listed",
                with(&|e| e.anomaly_kill = Some(None)),
                Failed,
                Reason::AnomalyPolicy,
                "stopped by the pool's anomaly policy",
                false,
                false,
            ),
            (
                "deleted while running",
                with(&|e| e.cancelled = true),
                Cancelled,
                Reason::Cancelled,
                "deleted while running; killed in the guest",
                false,
                false,
            ),
            (
                "guest agent timeout: unresponsive, redacted",
                ending(Err(&timeout)),
                TimedOut,
                Reason::GuestUnresponsive,
                "VM agentvm-p-1 (replaced): timed out after 10s waiting for guest-exec-status ***",
                true,
                false,
            ),
            (
                "VM gone",
                ending(Err(&lost)),
                Failed,
                Reason::VmLost,
                "VM agentvm-p-1 (replaced): VM agentvm-p-1 is not running",
                true,
                false,
            ),
            (
                "setup failed, redacted",
                ending(Err(&setup)),
                Failed,
                Reason::SetupFailed,
                "secretEnv TOKEN: file *** not found",
                false,
                false,
            ),
        ];
        for (what, e, phase, reason, message, replace_vm, from_program) in cases {
            let v = classify(&e, &hide_secret);
            assert_eq!(
                v,
                Verdict {
                    phase,
                    reason,
                    message: message.to_string(),
                    replace_vm,
                    from_program,
                },
                "{what}"
            );
        }
    }
}
