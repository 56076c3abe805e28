//! Validation of Sandbox specs.

use super::*;

impl Validator {
    pub(super) fn sandbox(&mut self, path: &FieldPath, spec: &SandboxSpec) {
        let sources: Vec<&str> = [
            (!spec.pool_ref.is_empty()).then_some("poolRef"),
            spec.template.is_some().then_some("template"),
            spec.from_snapshot.is_some().then_some("fromSnapshot"),
        ]
        .into_iter()
        .flatten()
        .collect();
        match sources.as_slice() {
            [] => self.error(
                path.key("poolRef"),
                "where does its VM come from? set `poolRef` (a VmPool: a warm VM is taken), `template` (a VM booted for it: imageRef, resources, network as in a VmPool) or `fromSnapshot` (a Snapshot: a fork of it)",
            ),
            [_] => {}
            [.., last] => self.error(
                path.key(*last),
                format!(
                    "{} are {} set; keep exactly one of them",
                    sources
                        .iter()
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(" and "),
                    if sources.len() == 2 { "both" } else { "all" },
                ),
            ),
        }
        if !spec.pool_ref.is_empty() {
            self.dns_label(&path.key("poolRef"), &spec.pool_ref, "VmPool name");
        }
        if let Some(t) = &spec.template {
            self.vm_template(&path.key("template"), t);
        }
        if let Some(snap) = &spec.from_snapshot {
            self.dns_label(&path.key("fromSnapshot"), snap, "Snapshot name");
        }
        let range = (sandbox::MIN_LIFETIME_SECONDS, sandbox::MAX_LIFETIME_SECONDS);
        if spec.idle_timeout_seconds != 0 {
            self.range(
                path.key("idleTimeoutSeconds"),
                spec.idle_timeout_seconds,
                range,
                "; 0 means never",
            );
        }
        if let Some(ttl) = spec.ttl_seconds {
            self.range(
                path.key("ttlSeconds"),
                ttl,
                range,
                "; leave it out for no limit",
            );
        }
        self.range(
            path.key("maxSnapshots"),
            spec.max_snapshots,
            sandbox::MAX_SNAPSHOTS_RANGE,
            "",
        );
        if let Some(mib) = spec.max_snapshot_mib {
            self.range(
                path.key("maxSnapshotMib"),
                mib,
                sandbox::MAX_SNAPSHOT_MIB_RANGE,
                "; leave it out for no limit",
            );
        }
        if let Some(r) = &spec.rollback {
            let rp = path.key("rollback");
            self.dns_label(&rp.key("snapshot"), &r.snapshot, "Snapshot name");
            if !is_rfc3339(&r.requested_at) {
                self.error(
                    rp.key("requestedAt"),
                    format!("{} is not an RFC 3339 time", show(&r.requested_at)),
                );
            }
        }
        if let Some(t) = &spec.shutdown_time {
            if !is_rfc3339(t) {
                self.error(
                    path.key("shutdownTime"),
                    format!(
                        "{} is not an RFC 3339 time; write e.g. `2026-12-31T18:00:00Z`",
                        show(t)
                    ),
                );
            }
        }
    }
}
