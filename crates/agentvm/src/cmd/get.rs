//! `agentvm get KIND [NAME...]`: list objects from the controller as a table, YAML, JSON or
//! names.

use std::collections::BTreeMap;

use agentvm_api::time::human_age;
use agentvm_api::Kind;
use agentvm_client::{LabelSelector, WatchChange};
use agentvm_controller::Config;
use agentvm_store::{Manager, StoredObject};
use anyhow::bail;
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::objects::{column_widths, lower, object_ref, parse_kind, table_text, ConnectArgs};

/// Output formats of `get`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A table with more columns (manager, generations, kind-specific details).
    Wide,
    /// The objects as YAML (with status), one document each, separated by `---`.
    Yaml,
    /// The object as JSON; several objects as `{"kind": "List", "items": [...]}`.
    Json,
    /// `kind/name` per line.
    Name,
}

/// Options of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Kind: Network (net), NetworkFilter (nwf), Image (img), VmPool (pool), Sandbox (sb),
    /// Snapshot (snap), AgentRun (run), their plurals, or `all`; `nodes` lists the nodes of
    /// a cluster.
    #[arg(value_name = "KIND")]
    kind: String,
    /// Only these objects (all of the kind when omitted).
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Output format (default: a table).
    #[arg(short = 'o', long = "output", value_enum)]
    output: Option<OutputFormat>,
    /// Only objects whose labels match, e.g. `tier=untrusted,team!=a`.
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    selector: Option<String>,
    /// Print tables without the header line.
    #[arg(long)]
    no_headers: bool,
    /// After printing, keep watching: print one more entry for every change (PHASE
    /// `Deleted` when an object is gone), until interrupted.
    #[arg(short = 'w', long)]
    watch: bool,
    #[command(flatten)]
    conn: ConnectArgs,
}

fn at<'a>(v: &'a Value, pointer: &str) -> Option<&'a Value> {
    v.pointer(pointer).filter(|v| !v.is_null())
}

fn text(v: &Value, pointer: &str) -> String {
    match at(v, pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "<none>".into(),
    }
}

fn phase(obj: &StoredObject, v: &Value) -> String {
    if obj.is_deleting() {
        "Deleting".into()
    } else {
        text(v, "/status/phase")
    }
}

fn manager(obj: &StoredObject) -> String {
    match &obj.manager {
        Manager::Api => "api".into(),
        Manager::SpecDir { file } => format!("spec-dir:{file}"),
    }
}

/// Column names of `kind`'s table.
fn header(kind: Kind, wide: bool) -> Vec<String> {
    let cols: &[&str] = match (kind, wide) {
        (Kind::Network, false) => &["NAME", "MODE", "SUBNET", "PHASE", "AGE"],
        (Kind::Network, true) => &["NAME", "MODE", "SUBNET", "PHASE", "AGE", "BRIDGE"],
        (Kind::NetworkFilter, _) => &["NAME", "RULES", "PHASE", "AGE"],
        (Kind::Image, false) => &["NAME", "SUITE", "PHASE", "AGE"],
        (Kind::Image, true) => &["NAME", "SUITE", "PHASE", "AGE", "KERNEL", "DISK"],
        (Kind::VmPool, false) => &["NAME", "IMAGE", "READY", "MAX", "PHASE", "AGE"],
        (Kind::VmPool, true) => &[
            "NAME", "IMAGE", "READY", "MAX", "PHASE", "AGE", "BUSY", "PROFILE", "NETWORK",
        ],
        (Kind::Sandbox, false) => &["NAME", "POOL", "STATE", "PHASE", "IDLE", "AGE"],
        (Kind::Sandbox, true) => &[
            "NAME", "POOL", "STATE", "PHASE", "IDLE", "AGE", "VM", "EXECS", "REASON",
        ],
        (Kind::Snapshot, false) => &["NAME", "SANDBOX", "PHASE", "MEMORY", "AGE"],
        (Kind::Snapshot, true) => &["NAME", "SANDBOX", "PHASE", "MEMORY", "AGE", "VM", "TAKEN"],
        (Kind::AgentRun, false) => &["NAME", "POOL", "PHASE", "EXIT", "AGE"],
        (Kind::AgentRun, true) => &["NAME", "POOL", "PHASE", "EXIT", "AGE", "VM", "REASON"],
    };
    let mut h: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
    if wide {
        h.extend(["GENERATION", "OBSERVED", "MANAGER"].map(String::from));
    }
    h
}

fn row(obj: &StoredObject, wide: bool, name: String) -> Vec<String> {
    let v = serde_json::to_value(&obj.resource).unwrap_or(Value::Null);
    let age = human_age(obj.created_at.age());
    let mut r = match obj.resource.kind() {
        Kind::Network => {
            let mut r = vec![
                name,
                text(&v, "/spec/mode"),
                text(&v, "/spec/subnet"),
                phase(obj, &v),
                age,
            ];
            if wide {
                r.push(text(&v, "/status/bridge"));
            }
            r
        }
        Kind::NetworkFilter => {
            let rules = at(&v, "/spec/egress")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![name, rules.to_string(), phase(obj, &v), age]
        }
        Kind::Image => {
            let mut r = vec![name, text(&v, "/spec/suite"), phase(obj, &v), age];
            if wide {
                r.push(text(&v, "/spec/kernel"));
                r.push(text(&v, "/status/diskPath"));
            }
            r
        }
        Kind::VmPool => {
            let ready = at(&v, "/status/ready").and_then(Value::as_u64).unwrap_or(0);
            let min = at(&v, "/spec/minReady")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let mut r = vec![
                name,
                text(&v, "/spec/template/imageRef"),
                format!("{ready}/{min}"),
                text(&v, "/spec/maxSize"),
                phase(obj, &v),
                age,
            ];
            if wide {
                r.push(
                    at(&v, "/status/busy")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .to_string(),
                );
                r.push(text(&v, "/spec/template/resources/profile"));
                let net = match at(&v, "/spec/template/network/networkRef") {
                    Some(n) => n.as_str().unwrap_or_default().to_string(),
                    None => text(&v, "/spec/template/network/mode"),
                };
                r.push(net);
            }
            r
        }
        Kind::Sandbox => {
            let idle = at(&v, "/status/idleSeconds")
                .and_then(Value::as_u64)
                .map_or_else(
                    || "-".into(),
                    |s| human_age(std::time::Duration::from_secs(s)),
                );
            let state = at(&v, "/spec/state")
                .and_then(Value::as_str)
                .unwrap_or("Running")
                .to_string();
            // A sandbox booted from its template shows its image instead of a pool.
            let source = match at(&v, "/spec/template/imageRef").and_then(Value::as_str) {
                Some(image) => format!("img/{image}"),
                None => text(&v, "/spec/poolRef"),
            };
            let mut r = vec![name, source, state, phase(obj, &v), idle, age];
            if wide {
                r.push(text(&v, "/status/vm"));
                r.push(
                    at(&v, "/status/activeExecs")
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                        .to_string(),
                );
                r.push(text(&v, "/status/stoppedReason"));
            }
            r
        }
        Kind::Snapshot => {
            let memory = if at(&v, "/status/diskOnly") == Some(&Value::Bool(true)) {
                "disk-only".to_string()
            } else {
                at(&v, "/status/memoryBytes")
                    .and_then(Value::as_u64)
                    .map_or_else(|| "-".into(), |b| format!("{}Mi", b.div_ceil(1 << 20)))
            };
            let mut r = vec![
                name,
                text(&v, "/spec/sandboxRef"),
                phase(obj, &v),
                memory,
                age,
            ];
            if wide {
                r.push(text(&v, "/status/vm"));
                r.push(text(&v, "/status/takenAt"));
            }
            r
        }
        Kind::AgentRun => {
            let exit = at(&v, "/status/exitCode").map_or_else(|| "-".into(), Value::to_string);
            // A run in a sandbox shows where it ran instead of a pool.
            let place = match at(&v, "/spec/sandboxRef").and_then(Value::as_str) {
                Some(sandbox) => format!("sbx/{sandbox}"),
                None => text(&v, "/spec/poolRef"),
            };
            let mut r = vec![name, place, phase(obj, &v), exit, age];
            if wide {
                r.push(text(&v, "/status/vm"));
                r.push(text(&v, "/status/reason"));
            }
            r
        }
    };
    if wide {
        r.push(obj.generation().to_string());
        r.push(at(&v, "/status/observedGeneration").map_or_else(|| "-".into(), Value::to_string));
        r.push(manager(obj));
    }
    r
}

/// Column widths of each kind's table, so rows printed later line up.
pub type TableWidths = BTreeMap<Kind, Vec<usize>>;

/// The text `get` prints for `objects` in `format` (`None`: a table), and the widths of
/// the tables printed.
pub fn render_objects(
    objects: &[StoredObject],
    format: Option<OutputFormat>,
    no_headers: bool,
    single: bool,
    prefix_kind: bool,
) -> anyhow::Result<(String, TableWidths)> {
    let mut out = String::new();
    let mut widths = TableWidths::new();
    match format {
        Some(OutputFormat::Name) => {
            for o in objects {
                out.push_str(&object_ref(o.resource.kind(), o.resource.name()));
                out.push('\n');
            }
        }
        Some(OutputFormat::Json) => {
            let text = if single && objects.len() == 1 {
                serde_json::to_string_pretty(&objects[0].resource)?
            } else {
                let items: Vec<_> = objects.iter().map(|o| &o.resource).collect();
                serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": items}))?
            };
            out.push_str(&text);
            out.push('\n');
        }
        Some(OutputFormat::Yaml) => {
            for (i, o) in objects.iter().enumerate() {
                if i > 0 {
                    out.push_str("---\n");
                }
                out.push_str(&serde_yaml::to_string(&o.resource)?);
            }
        }
        table @ (None | Some(OutputFormat::Wide)) => {
            let wide = table.is_some();
            let mut first = true;
            for kind in Kind::ALL {
                let rows: Vec<Vec<String>> = objects
                    .iter()
                    .filter(|o| o.resource.kind() == kind)
                    .map(|o| row(o, wide, display_name(o, prefix_kind)))
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                if !first {
                    out.push('\n');
                }
                first = false;
                let h = header(kind, wide);
                let (text, w) = table_text((!no_headers).then_some(h.as_slice()), &rows, &[]);
                out.push_str(&text);
                widths.insert(kind, w);
            }
        }
    }
    Ok((out, widths))
}

fn display_name(obj: &StoredObject, prefix_kind: bool) -> String {
    if prefix_kind {
        object_ref(obj.resource.kind(), obj.resource.name())
    } else {
        obj.resource.name().to_string()
    }
}

/// Prints `objects` in `format` (`None`: a table); returns the tables' column widths.
pub fn print_objects(
    objects: &[StoredObject],
    format: Option<OutputFormat>,
    no_headers: bool,
    single: bool,
    prefix_kind: bool,
) -> anyhow::Result<TableWidths> {
    let (text, widths) = render_objects(objects, format, no_headers, single, prefix_kind)?;
    print!("{text}");
    Ok(widths)
}

/// What `get --watch` prints for one changed object (`removed`: it is gone).
fn watch_text(
    obj: &StoredObject,
    removed: bool,
    format: Option<OutputFormat>,
    prefix_kind: bool,
    widths: &mut TableWidths,
) -> anyhow::Result<String> {
    let kind = obj.resource.kind();
    Ok(match format {
        Some(OutputFormat::Name) => format!("{}\n", object_ref(kind, obj.resource.name())),
        Some(OutputFormat::Json) => {
            format!("{}\n", serde_json::to_string_pretty(&obj.resource)?)
        }
        Some(OutputFormat::Yaml) => format!("---\n{}", serde_yaml::to_string(&obj.resource)?),
        table @ (None | Some(OutputFormat::Wide)) => {
            let wide = table.is_some();
            let h = header(kind, wide);
            let mut r = row(obj, wide, display_name(obj, prefix_kind));
            if removed {
                if let Some(i) = h.iter().position(|c| c == "PHASE") {
                    r[i] = "Deleted".into();
                }
            }
            let min = widths
                .get(&kind)
                .cloned()
                .unwrap_or_else(|| column_widths(Some(&h), &[], &[]));
            let (text, w) = table_text(None, &[r], &min);
            widths.insert(kind, w);
            text
        }
    })
}

impl GetArgs {
    /// Fetch and print; exit 1 if a named object is missing.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let client = self.conn.client(cfg);
        if matches!(
            self.kind.to_ascii_lowercase().as_str(),
            "node" | "nodes" | "no"
        ) {
            return self.nodes(&client);
        }
        let all = self.kind.eq_ignore_ascii_case("all");
        let kind = if all {
            None
        } else {
            Some(parse_kind(&self.kind)?)
        };
        if all && !self.names.is_empty() {
            bail!("`get all` takes no names; name a kind to get single objects");
        }
        let selector = LabelSelector::parse(self.selector.as_deref().unwrap_or(""))
            .map_err(anyhow::Error::msg)?;
        // Subscribe before listing, so no change in between is missed.
        let events = if self.watch {
            Some(client.watch(kind, false)?)
        } else {
            None
        };
        let mut missing = 0;
        let objects = if self.names.is_empty() {
            client.list(kind, self.selector.as_deref())?
        } else {
            let kind = kind.unwrap_or(Kind::Network);
            let mut out = Vec::new();
            for name in &self.names {
                match client.get(kind, name) {
                    Ok(o) => out.push(o),
                    Err(e) if e.is_not_found() => {
                        if !self.watch {
                            eprintln!("error: {} \"{name}\" not found", lower(kind));
                            missing += 1;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            out
        };
        let table = matches!(self.output, None | Some(OutputFormat::Wide));
        let mut widths = TableWidths::new();
        if objects.is_empty() && missing == 0 && table {
            match kind {
                Some(k) => eprintln!("No {} found.", k.plural()),
                None => eprintln!("No objects found."),
            }
            if kind.is_some() && !self.no_headers {
                // Watching an empty kind: print the header the rows will line up with.
                if let (Some(k), true) = (kind, self.watch) {
                    let h = header(k, self.output.is_some());
                    let (text, w) = table_text(Some(&h), &[], &[]);
                    print!("{text}");
                    widths.insert(k, w);
                }
            }
        } else {
            let single = self.names.len() == 1 && !self.watch;
            widths = print_objects(&objects, self.output, self.no_headers, single, all)?;
        }
        let Some(events) = events else {
            return Ok(i32::from(missing > 0));
        };
        // Watch: one entry per change, until interrupted or the controller stops.
        let mut last: BTreeMap<(Kind, String), StoredObject> = objects
            .into_iter()
            .map(|o| ((o.resource.kind(), o.resource.name().to_string()), o))
            .collect();
        let wanted = |k: Kind, name: &str| {
            self.names.is_empty() || (Some(k) == kind && self.names.iter().any(|n| n == name))
        };
        for event in events {
            let event = event?;
            let (Some(k), Some(name)) = (event.kind, event.name.clone()) else {
                // Lagged: the stream missed events; show the current state of everything.
                for o in client.list(kind, self.selector.as_deref())? {
                    if wanted(o.resource.kind(), o.resource.name()) {
                        print!("{}", watch_text(&o, false, self.output, all, &mut widths)?);
                        last.insert((o.resource.kind(), o.resource.name().to_string()), o);
                    }
                }
                continue;
            };
            if !wanted(k, &name) {
                continue;
            }
            let key = (k, name);
            let (obj, removed) = match (event.change, event.object) {
                (WatchChange::Removed, _) | (_, None) => match last.remove(&key) {
                    Some(o) => (o, true),
                    None => continue,
                },
                (_, Some(o)) => (*o, false),
            };
            let matches = selector.matches(&obj.resource.metadata().labels);
            if !matches {
                // It may have left the selection: report it gone once.
                if last.remove(&key).is_some() {
                    print!("{}", watch_text(&obj, true, self.output, all, &mut widths)?);
                }
                continue;
            }
            print!(
                "{}",
                watch_text(&obj, removed, self.output, all, &mut widths)?
            );
            if !removed {
                last.insert(key, obj);
            }
        }
        Ok(i32::from(missing > 0))
    }
}

impl GetArgs {
    /// `get nodes`: the cluster's nodes (a controller started with `--cluster`).
    fn nodes(&self, client: &agentvm_client::Client) -> anyhow::Result<i32> {
        if self.watch || self.selector.is_some() {
            bail!("`get nodes` takes neither --watch nor --selector");
        }
        let resp = client.nodes()?;
        if !resp.cluster {
            eprintln!(
                "This controller runs on one host (started without --cluster): it has no nodes to list."
            );
            return Ok(0);
        }
        let nodes: Vec<_> = resp
            .nodes
            .into_iter()
            .filter(|n| self.names.is_empty() || self.names.contains(&n.info.name))
            .collect();
        let missing: Vec<_> = self
            .names
            .iter()
            .filter(|name| !nodes.iter().any(|n| &n.info.name == *name))
            .collect();
        for name in &missing {
            eprintln!("error: node \"{name}\" not found");
        }
        match self.output {
            Some(OutputFormat::Json) => println!("{}", serde_json::to_string_pretty(&nodes)?),
            Some(OutputFormat::Yaml) => print!("{}", serde_yaml::to_string(&nodes)?),
            Some(OutputFormat::Name) => {
                for n in &nodes {
                    println!("node/{}", n.info.name);
                }
            }
            None | Some(OutputFormat::Wide) => {
                if nodes.is_empty() && missing.is_empty() {
                    eprintln!("No nodes found.");
                }
                let header: Vec<String> = [
                    "NAME", "ROLE", "VCPUS", "MEMORY", "ACCEL", "LEASE", "AGE", "VERSION",
                ]
                .map(String::from)
                .to_vec();
                let rows: Vec<Vec<String>> = nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.info.name.clone(),
                            match (n.leader, n.cordoned) {
                                (true, false) => "leader",
                                (true, true) => "leader,cordoned",
                                (false, false) => "standby",
                                (false, true) => "cordoned",
                            }
                            .into(),
                            n.info.vcpus.to_string(),
                            format!("{}Mi", n.info.memory_mib),
                            n.info.accelerator.clone(),
                            format!("{}s", n.lease_seconds_left),
                            human_age(n.info.joined_at.age()),
                            n.info.version.clone(),
                        ]
                    })
                    .collect();
                let header = (!self.no_headers && !nodes.is_empty()).then_some(header);
                print!("{}", table_text(header.as_deref(), &rows, &[]).0);
            }
        }
        Ok(if missing.is_empty() { 0 } else { 1 })
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use agentvm_api::time::Timestamp;
    use serde::Deserialize;

    use super::*;

    /// One object of every kind, with statuses, created 15 minutes ago.
    fn objects() -> Vec<StoredObject> {
        let yaml = r#"
apiVersion: agentvm.dev/v1alpha1
kind: Network
metadata: {name: agent-nat, generation: 1}
spec: {mode: nat, subnet: 192.168.101.0/24}
status: {phase: Ready, observedGeneration: 1, bridge: virbr-agent}
---
apiVersion: agentvm.dev/v1alpha1
kind: NetworkFilter
metadata: {name: agent-egress, generation: 2}
spec:
  egress:
    - {protocol: udp, ports: [53]}
    - {protocol: tcp, ports: [443]}
---
apiVersion: agentvm.dev/v1alpha1
kind: Image
metadata: {name: debian-base, generation: 1}
spec: {suite: trixie}
status: {phase: Building, observedGeneration: 1}
---
apiVersion: agentvm.dev/v1alpha1
kind: VmPool
metadata: {name: sandbox, generation: 3, labels: {tier: untrusted}}
spec:
  template: {imageRef: debian-base}
  minReady: 2
  maxSize: 4
status: {phase: Warming, observedGeneration: 2, ready: 1, busy: 1}
---
apiVersion: agentvm.dev/v1alpha1
kind: AgentRun
metadata: {name: hello, generation: 1}
spec:
  poolRef: sandbox
  script: {source: "print(1)"}
status: {phase: Succeeded, exitCode: 0, vm: sandbox-1, reason: Completed}
"#;
        let created = Timestamp(SystemTime::now() - Duration::from_secs(15 * 60));
        serde_yaml::Deserializer::from_str(yaml)
            .map(|doc| {
                let resource = agentvm_api::Resource::deserialize(doc).unwrap();
                let manager = match resource.kind() {
                    Kind::NetworkFilter => Manager::SpecDir {
                        file: "net/egress.yaml".into(),
                    },
                    _ => Manager::Api,
                };
                StoredObject {
                    resource,
                    manager,
                    submitter: None,
                    created_at: created,
                    updated_at: created,
                    deletion_requested_at: None,
                    deletion_requested_by: None,
                }
            })
            .collect()
    }

    /// Compares `actual` with `tests/golden/NAME`; `AGENTVM_BLESS=1` rewrites the file.
    fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("AGENTVM_BLESS").is_some_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, actual).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run with AGENTVM_BLESS=1 to create it",
                path.display()
            )
        });
        assert!(
            expected == actual,
            "{} differs (AGENTVM_BLESS=1 rewrites it if the change is deliberate):\n--- expected\n{expected}\n--- actual\n{actual}",
            path.display()
        );
    }

    #[test]
    fn table_output_is_stable() {
        let mut objs = objects();
        let render = |objs: &[StoredObject], f, nh, prefix| {
            render_objects(objs, f, nh, false, prefix).unwrap().0
        };
        golden("get/all.txt", &render(&objs, None, false, true));
        golden(
            "get/all-wide.txt",
            &render(&objs, Some(OutputFormat::Wide), false, true),
        );
        golden("get/all-no-headers.txt", &render(&objs, None, true, true));
        golden(
            "get/all-name.txt",
            &render(&objs, Some(OutputFormat::Name), false, true),
        );
        objs.retain(|o| o.resource.kind() == Kind::VmPool);
        objs[0].deletion_requested_at = Some(Timestamp(SystemTime::now()));
        golden("get/pools.txt", &render(&objs, None, false, false));
    }

    #[test]
    fn watch_rows_line_up_with_the_table() {
        let objs = objects();
        let pools: Vec<_> = objs
            .iter()
            .filter(|o| o.resource.kind() == Kind::VmPool)
            .cloned()
            .collect();
        let (table, mut widths) = render_objects(&pools, None, false, false, false).unwrap();
        let row = watch_text(&pools[0], true, None, false, &mut widths).unwrap();
        let first_row = table.lines().nth(1).unwrap();
        assert_eq!(
            row.find("Deleted"),
            first_row.find("Warming"),
            "{table}{row}"
        );
    }
}
