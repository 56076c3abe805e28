//! What the controller does with an anomaly a run's monitor found: counts it
//! (`agent_vm_anomalies_total{rule}`), writes an `anomaly` audit event, and writes the run's
//! status with the anomalies so far.

use agentvm_api::{AgentRunStatus, Anomaly, AnomalyPolicy, Kind};
use agentvm_run::anomaly::Rule;
use agentvm_run::monitor::{AnomalySink, MonitorTarget};

use crate::audit::{AuditEvent, AuditEventType};
use crate::reconcile::Ctx;

/// [`AnomalySink`] over the controller's metrics, audit log and store.
pub(super) struct ControllerSink(pub(super) Ctx);

impl AnomalySink for ControllerSink {
    fn anomaly(&self, target: &MonitorTarget, rule: Rule, a: &Anomaly, policy: AnomalyPolicy) {
        self.0.metrics.anomaly(rule);
        self.0.audit.record(
            AuditEvent::new(
                AuditEventType::Anomaly,
                Kind::AgentRun,
                &target.run,
                "controller",
            )
            .vm(&target.vm)
            .details(serde_json::json!({
                "pool": target.pool,
                "rule": a.rule,
                "metric": a.metric,
                "observed": a.observed,
                "threshold": a.threshold,
                "message": a.message,
                "policy": format!("{policy:?}").to_lowercase(),
            })),
        );
    }

    fn write_status(&self, run: &str, status: AgentRunStatus) {
        if let Err(e) = self.0.store.update_status(run, status) {
            tracing::warn!(run = %run, error = %e, "writing anomalies failed");
        }
    }
}
