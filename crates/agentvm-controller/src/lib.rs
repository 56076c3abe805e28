//! agentvm controller: configuration now; object store, reconcilers, pools and runs build on it.

pub mod config;
pub mod images;
pub mod run;

pub use config::Config;
