//! agentvm controller: configuration, the object store, the spec-directory source, the API
//! served on a Unix socket, and the reconcile dispatcher the per-kind reconcilers plug into.

pub mod anomaly;
pub mod api;
pub mod artifacts;
pub mod audit;
pub mod cache;
pub mod caller;
pub mod config;
pub mod controller;
pub mod egress;
pub mod health;
pub mod host_access;
pub mod http_serve;
pub mod images;
pub mod limits;
pub mod metrics;
pub mod metrics_server;
pub mod queue;
pub mod reconcile;
pub mod reconcilers;
pub mod run;
pub mod run_monitor;
pub mod source;
pub mod state_dir;
pub mod store;
pub mod time;
pub mod vm_stats;

pub use audit::{AuditEvent, AuditEventType, AuditLog};
pub use config::Config;
pub use controller::Controller;
pub use metrics::Metrics;
pub use reconcile::{Action, Ctx, ReconcileError, Reconciler, Sweeper};
pub use store::{
    ApplyOptions, ApplyOutcome, Change, Manager, ObjectKey, Store, StoreError, StoreEvent,
    StoredObject,
};
