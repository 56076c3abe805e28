//! One module per subcommand.

pub mod apply;
pub mod completion;
pub mod controller;
pub mod delete;
pub mod describe;
pub mod diff;
pub mod doctor;
pub mod exec;
pub mod get;
pub mod host;
pub mod image;
pub mod logs;
pub mod man;
pub mod manifests;
pub mod node;
pub mod objects;
pub mod run;
pub mod sandbox;
pub mod schema;
pub mod version;
pub mod wait;

use std::path::Path;
use std::time::Duration;

use agentvm_client::ClientError;

use agentvm_controller::config::{default_config_path, Config};

/// Parses a duration flag, the one syntax of every `--timeout` and time flag: plain seconds
/// (`90`) or units (`90s`, `5m`, `1h30m`, `1500ms`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?}: {e}; use e.g. 90, 90s, 5m or 1h30m"))
}

/// Load the configuration from `path` or the default location, plus the environment.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let default = default_config_path();
    Ok(Config::load(path.or(default.as_deref()))?)
}

/// The backend of the commands that make VMs right here, without a controller (`run`,
/// `exec`, `doctor`): libvirt at the configured URI, VM files under the state directory,
/// the configured accelerator, boot timeout and translation cache, as the controller's.
pub fn local_backend(cfg: &Config) -> agentvm_backend::LibvirtBackend {
    agentvm_backend::LibvirtBackend::new(
        cfg.libvirt_uri.clone(),
        cfg.state_dir.clone(),
        cfg.accelerator,
        Duration::from_secs(cfg.boot_timeout_seconds),
    )
    .with_tcg_translation_cache(cfg.tcg_tb_cache())
}

/// Exit status: the command failed (an error, a missing or refused object, a `wait`
/// timeout), or `diff` found differences.
pub const EXIT_FAILURE: i32 = 1;
/// Exit status: bad usage (unknown flag, missing argument), or `diff` failed.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: the controller is not reachable on its socket.
pub const EXIT_UNREACHABLE: i32 = 3;

/// True when `error` (or what caused it) is "the controller is not reachable".
pub fn is_unreachable(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        matches!(
            e.downcast_ref::<ClientError>(),
            Some(ClientError::Unreachable { .. })
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_seconds_or_units() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        let err = parse_duration("soon").unwrap_err();
        assert!(err.contains("use e.g. 90, 90s, 5m or 1h30m"), "{err}");
    }
}
