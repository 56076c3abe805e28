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
pub mod objects;
pub mod run;
pub mod schema;
pub mod version;
pub mod wait;

use std::path::Path;

use agentvm_controller::api::client::ClientError;

use agentvm_controller::config::{default_config_path, Config};

/// Load the configuration from `path` or the default location, plus the environment.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let default = default_config_path();
    Ok(Config::load(path.or(default.as_deref()))?)
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
