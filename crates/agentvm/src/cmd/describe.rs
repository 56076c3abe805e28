//! `agentvm describe KIND/NAME`: one object in full: identity, manager, spec, status,
//! conditions and, for pools, each resource asked for against what the host enforces, and
//! recent VM events, newest first; for a sandbox or a snapshot, the sandboxes forked from it.

use agentvm_api::time::{human_age, Timestamp};
use agentvm_api::Kind;
use agentvm_controller::Config;
use agentvm_store::{Manager, StoredObject};
use clap::Args;
use serde_json::Value;

use super::objects::{parse_targets, ConnectArgs};

/// Options of `describe`.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// Objects as `KIND/NAME...` or `KIND NAME...`.
    #[arg(value_name = "TARGET", required = true)]
    targets: Vec<String>,
    #[command(flatten)]
    conn: ConnectArgs,
}

fn when(t: &Timestamp) -> String {
    format!("{t} ({} ago)", human_age(t.age()))
}

fn map_line(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        "<none>".into()
    } else {
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn indented_yaml(value: &Value) -> String {
    let text = serde_yaml::to_string(value).unwrap_or_default();
    text.lines().map(|l| format!("  {l}\n")).collect::<String>()
}

/// The text `describe` prints for `obj`.
pub fn describe(obj: &StoredObject) -> String {
    let meta = obj.resource.metadata();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<14}{v}\n", format!("{k}:")));
    line("Name", meta.name.clone());
    line("Kind", obj.resource.kind().to_string());
    line("Labels", map_line(&meta.labels));
    line("Annotations", map_line(&meta.annotations));
    line(
        "Managed by",
        match &obj.manager {
            Manager::Api => "api (agentvm apply)".into(),
            Manager::SpecDir { file } => format!("spec directory, file {file}"),
        },
    );
    if let Some(who) = &obj.submitter {
        line("Submitted by", who.to_string());
    }
    line("Generation", meta.generation.to_string());
    line("Created", when(&obj.created_at));
    line("Updated", when(&obj.updated_at));
    if let Some(t) = &obj.deletion_requested_at {
        line("Deleting", format!("requested {}", when(t)));
    }
    out.push_str("Spec:\n");
    out.push_str(&indented_yaml(&obj.resource.spec_json()));
    let mut status = obj.status_json();
    let conditions = status
        .as_object_mut()
        .and_then(|m| m.remove("conditions"))
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default();
    // A pool's VM events (replacements and why), shown as a table like kubectl's Events.
    let events = status
        .as_object_mut()
        .and_then(|m| m.remove("events"))
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default();
    // A pool's resources: what is asked, and whether this host enforces it.
    let resources = status
        .as_object_mut()
        .and_then(|m| m.remove("resources"))
        .and_then(|c| c.as_array().cloned())
        .unwrap_or_default();
    if status.is_null() {
        out.push_str("Status:       <none> (not reconciled yet)\n");
    } else {
        out.push_str("Status:\n");
        out.push_str(&indented_yaml(&status));
    }
    if conditions.is_empty() {
        out.push_str("Conditions:   <none>\n");
    } else {
        out.push_str("Conditions:\n");
        let s = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let mut rows = vec![["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        for c in &conditions {
            let age = Timestamp::parse(&s(c, "lastTransitionTime"))
                .map(|t| human_age(t.age()))
                .unwrap_or_else(|| "-".into());
            rows.push(vec![
                format!("  {}", s(c, "type")),
                s(c, "status"),
                s(c, "reason"),
                age,
                s(c, "message"),
            ]);
        }
        rows[0][0] = format!("  {}", rows[0][0]);
        out.push_str(&table_text(&rows));
    }
    if !resources.is_empty() {
        out.push_str("Resources:\n");
        let s = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let mut rows = vec![["  RESOURCE", "REQUESTED", "ENFORCED", "HOW"]
            .map(String::from)
            .to_vec()];
        for r in &resources {
            let enforced = match r.get("enforced").and_then(Value::as_bool) {
                Some(true) => "yes",
                _ => "NO",
            };
            rows.push(vec![
                format!("  {}", s(r, "name")),
                s(r, "requested"),
                enforced.to_string(),
                s(r, "detail"),
            ]);
        }
        out.push_str(&table_text(&rows));
    }
    if !events.is_empty() {
        out.push_str("Events:\n");
        let s = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let mut rows = vec![["  AGE", "REASON", "VM", "MESSAGE"]
            .map(String::from)
            .to_vec()];
        for e in events.iter().rev() {
            let age = Timestamp::parse(&s(e, "time"))
                .map(|t| human_age(t.age()))
                .unwrap_or_else(|| "-".into());
            rows.push(vec![
                format!("  {age}"),
                s(e, "reason"),
                s(e, "vm"),
                s(e, "message"),
            ]);
        }
        out.push_str(&table_text(&rows));
    }
    out
}

/// For a `Sandbox` or a `Snapshot`: the sandboxes forked from it (`status.forkedFrom`), one
/// per line with the snapshot they went on from; empty for other kinds.
pub fn forks(obj: &StoredObject, sandboxes: &[StoredObject]) -> String {
    let name = obj.resource.name();
    let field = match obj.resource.kind() {
        Kind::Sandbox => "sandbox",
        Kind::Snapshot => "snapshot",
        _ => return String::new(),
    };
    let mut rows = vec![["  NAME", "SNAPSHOT", "PHASE", "VM"]
        .map(String::from)
        .to_vec()];
    for sb in sandboxes {
        let st = sb.status_json();
        let from = &st["forkedFrom"];
        if from[field].as_str() != Some(name) {
            continue;
        }
        let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
        rows.push(vec![
            format!("  {}", sb.resource.name()),
            s(&from["snapshot"]),
            s(&st["phase"]),
            s(&st["vm"]),
        ]);
    }
    if rows.len() == 1 {
        "Forks:        <none>\n".to_string()
    } else {
        format!("Forks:\n{}", table_text(&rows))
    }
}

fn table_text(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(&format!("{cell:<w$}   ", w = widths[c]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

impl DescribeArgs {
    /// Print each object; exit 1 if one is missing.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let client = self.conn.client(cfg);
        let mut missing = 0;
        for (i, (kind, name)) in parse_targets(&self.targets)?.into_iter().enumerate() {
            match client.get(kind, &name) {
                Ok(obj) => {
                    if i > 0 {
                        println!();
                    }
                    print!("{}", describe(&obj));
                    if matches!(kind, Kind::Sandbox | Kind::Snapshot) {
                        let sandboxes = client.list(Some(Kind::Sandbox), None)?;
                        print!("{}", forks(&obj, &sandboxes));
                    }
                }
                Err(e) if e.is_not_found() => {
                    eprintln!(
                        "error: {} not found",
                        super::objects::object_ref(kind, &name)
                    );
                    missing += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(i32::from(missing > 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_api::time::Timestamp;
    use agentvm_api::{Resource, ResourceStatus, VmPoolStatus};

    #[test]
    fn a_pool_shows_each_resource_requested_and_enforced() {
        let mut pool = match agentvm_api::parse_str(
            "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {name: p}\nspec:\n  template:\n    imageRef: img\n    resources: {profile: light, cpuQuotaPercent: 50}\n",
            "p.yaml",
        )
        .unwrap()
        .remove(0)
        .resource
        {
            Resource::VmPool(p) => p,
            other => panic!("{other:?}"),
        };
        let row = |name: &str, requested: &str, enforced: bool, detail: &str| ResourceStatus {
            name: name.into(),
            requested: requested.into(),
            enforced,
            detail: detail.into(),
        };
        pool.status = Some(VmPoolStatus {
            resources: vec![
                row("diskGib", "10 GiB", true, "the disk's size"),
                row(
                    "cpuQuotaPercent",
                    "50 % per vCPU",
                    false,
                    "not enforced by this host: cgroup cpu is required",
                ),
            ],
            ..VmPoolStatus::default()
        });
        let obj = record(Resource::VmPool(pool));
        let text = describe(&obj);
        let table: Vec<&str> = text
            .lines()
            .skip_while(|l| *l != "Resources:")
            .skip(1)
            .take(3)
            .collect();
        assert_eq!(
            table[0].split_whitespace().collect::<Vec<_>>(),
            ["RESOURCE", "REQUESTED", "ENFORCED", "HOW"],
            "{text}"
        );
        assert!(
            table[1].trim_start().starts_with("diskGib") && table[1].contains("   yes   "),
            "{text}"
        );
        assert!(
            table[2].contains("50 % per vCPU")
                && table[2].contains("   NO   ")
                && table[2].ends_with("not enforced by this host: cgroup cpu is required"),
            "{text}"
        );
        // Not repeated in the generic status dump.
        assert!(!text.contains("detail:"), "{text}");
    }

    fn stored(yaml: &str, status: serde_json::Value) -> StoredObject {
        let mut resource = agentvm_api::parse_str(yaml, "x.yaml")
            .unwrap()
            .remove(0)
            .resource;
        if let Resource::Sandbox(sb) = &mut resource {
            sb.status = serde_json::from_value(status).unwrap();
        }
        record(resource)
    }

    /// `resource` as stored by root through the API, now.
    fn record(resource: Resource) -> StoredObject {
        StoredObject {
            resource,
            manager: Manager::Api,
            submitter: None,
            created_at: Timestamp::now(),
            updated_at: Timestamp::now(),
            deletion_requested_at: None,
            deletion_requested_by: None,
        }
    }

    #[test]
    fn a_sandbox_and_a_snapshot_list_the_sandboxes_forked_from_them() {
        let sb = |name: &str, spec: &str| {
            format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec: {spec}\n")
        };
        let src = stored(
            &sb("dev", "{poolRef: p}"),
            serde_json::json!({"phase": "Running"}),
        );
        let snap = stored(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Snapshot\nmetadata: {name: before}\nspec: {sandboxRef: dev}\n",
            serde_json::Value::Null,
        );
        let fork = stored(
            &sb("f1", "{fromSnapshot: before}"),
            serde_json::json!({"phase": "Running", "vm": "agentvm-sbx-f1",
                "forkedFrom": {"snapshot": "before", "sandbox": "dev", "sourcePauseMs": 1, "tookMs": 2}}),
        );
        let all = [src.clone(), fork];
        for obj in [&src, &snap] {
            let text = forks(obj, &all);
            let rows: Vec<Vec<&str>> = text
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect())
                .collect();
            assert_eq!(
                rows,
                [
                    vec!["NAME", "SNAPSHOT", "PHASE", "VM"],
                    vec!["f1", "before", "Running", "agentvm-sbx-f1"]
                ],
                "{text}"
            );
        }
        assert_eq!(forks(&all[1], &all), "Forks:        <none>\n");
    }
}
