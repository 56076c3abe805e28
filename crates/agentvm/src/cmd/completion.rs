//! `agentvm completion bash|zsh|fish|...`: print a shell completion script.

use clap::Args;
use clap_complete::Shell;

/// Options of `completion`.
///
/// Load it in the current shell, e.g. `source <(agentvm completion bash)`, or install it:
/// `agentvm completion bash > /etc/bash_completion.d/agentvm`,
/// `agentvm completion zsh > "${fpath[1]}/_agentvm"`,
/// `agentvm completion fish > ~/.config/fish/completions/agentvm.fish`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell.
    #[arg(value_enum, value_name = "SHELL")]
    shell: Shell,
}

impl CompletionArgs {
    /// Write the script for `command` (the whole CLI) to stdout.
    pub fn run(self, command: &mut clap::Command) -> anyhow::Result<i32> {
        clap_complete::generate(self.shell, command, "agentvm", &mut std::io::stdout());
        Ok(0)
    }
}
