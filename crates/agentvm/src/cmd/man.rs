//! `agentvm man [--dir DIR]`: the manual pages, generated from the same definitions as
//! `--help` (so they document every flag).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

/// Options of `man`.
///
/// Read a page with `agentvm man wait | man -l -`, or install them all:
/// `agentvm man --dir /usr/local/share/man/man1`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The command whose page to print (`wait`, `image build`); default: `agentvm(1)`,
    /// which lists the commands.
    #[arg(value_name = "COMMAND", conflicts_with = "dir")]
    command: Vec<String>,
    /// Write `agentvm.1` and one `agentvm-COMMAND.1` per command into this directory
    /// instead of printing `agentvm(1)`.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl ManArgs {
    /// Print the page of one command of `cli` (the whole CLI), or write every page to
    /// `--dir`.
    pub fn run(self, cli: clap::Command) -> anyhow::Result<i32> {
        match self.dir {
            None => {
                let mut page = cli;
                let mut name = "agentvm".to_string();
                for word in &self.command {
                    page.build();
                    let Some(sub) = page.find_subcommand(word).cloned() else {
                        anyhow::bail!(
                            "{name} has no command {word:?}; see `{name} --help` for the list"
                        );
                    };
                    name = format!("{name}-{}", sub.get_name());
                    page = sub.display_name(name.clone());
                }
                let rendered = clap_mangen::Man::new(page).render(&mut std::io::stdout().lock());
                match rendered {
                    Ok(()) => {}
                    // `agentvm man | head`: the reader stopped early, nothing is wrong.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
                    Err(e) => return Err(e).context("writing the manual page"),
                }
            }
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                clap_mangen::generate_to(cli, &dir)
                    .with_context(|| format!("writing manual pages into {}", dir.display()))?;
                println!("manual pages written to {}", dir.display());
            }
        }
        Ok(0)
    }
}
