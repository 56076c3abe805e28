//! agentvm controller: configuration, the spec-directory source, the API served on a Unix
//! socket, and the reconcile dispatcher the per-kind reconcilers plug into; metrics, audit
//! log and egress. The object store is agentvm-store, the API's wire types and client
//! agentvm-client, the execution of one run agentvm-run.

pub mod api;
pub mod audit;
pub mod cache;
pub mod config;
pub mod controller;
pub mod egress;
pub mod health;
pub mod http_serve;
pub mod images;
pub mod limits;
pub mod metrics;
pub mod metrics_server;
pub mod queue;
pub mod reconcile;
pub mod reconcilers;
pub mod source;
pub mod state_dir;
pub mod vm_stats;

pub use audit::{AuditEvent, AuditEventType, AuditLog};
pub use config::Config;
pub use controller::Controller;
pub use metrics::Metrics;
pub use reconcile::{Action, Ctx, ReconcileError, Reconciler, Sweeper};
