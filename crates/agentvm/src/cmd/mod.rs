//! One module per subcommand.

pub mod apply;
pub mod controller;
pub mod delete;
pub mod describe;
pub mod doctor;
pub mod exec;
pub mod get;
pub mod host;
pub mod image;
pub mod manifests;
pub mod objects;
pub mod run;

use std::path::Path;

use agentvm_controller::config::{default_config_path, Config};

/// Load the configuration from `path` or the default location, plus the environment.
pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    let default = default_config_path();
    Ok(Config::load(path.or(default.as_deref()))?)
}
