//! Sources of desired state other than the API: the watched spec directory.

pub mod specdir;

pub use specdir::{SpecDir, WatchOptions};
