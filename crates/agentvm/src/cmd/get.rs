//! `agentvm get KIND [NAME...]`: list objects from the controller as a table, YAML, JSON or
//! names.

use agentvm_api::Kind;
use agentvm_controller::store::{Manager, StoredObject};
use agentvm_controller::time::human_age;
use agentvm_controller::Config;
use anyhow::bail;
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::objects::{lower, object_ref, parse_kind, print_table, ConnectArgs};

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
    /// Kind: Network (net), NetworkFilter (nwf), Image (img), VmPool (pool), AgentRun (run),
    /// their plurals, or `all`.
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
        Kind::AgentRun => {
            let exit = at(&v, "/status/exitCode").map_or_else(|| "-".into(), Value::to_string);
            let mut r = vec![name, text(&v, "/spec/poolRef"), phase(obj, &v), exit, age];
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

/// Prints `objects` in `format` (`None`: a table).
pub fn print_objects(
    objects: &[StoredObject],
    format: Option<OutputFormat>,
    no_headers: bool,
    single: bool,
    prefix_kind: bool,
) -> anyhow::Result<()> {
    match format {
        Some(OutputFormat::Name) => {
            for o in objects {
                println!("{}", object_ref(o.resource.kind(), o.resource.name()));
            }
        }
        Some(OutputFormat::Json) => {
            let text = if single && objects.len() == 1 {
                serde_json::to_string_pretty(&objects[0].resource)?
            } else {
                let items: Vec<_> = objects.iter().map(|o| &o.resource).collect();
                serde_json::to_string_pretty(&serde_json::json!({"kind": "List", "items": items}))?
            };
            println!("{text}");
        }
        Some(OutputFormat::Yaml) => {
            for (i, o) in objects.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_yaml::to_string(&o.resource)?);
            }
        }
        table @ (None | Some(OutputFormat::Wide)) => {
            let wide = table.is_some();
            let mut first = true;
            for kind in Kind::ALL {
                let rows: Vec<Vec<String>> = objects
                    .iter()
                    .filter(|o| o.resource.kind() == kind)
                    .map(|o| {
                        let name = if prefix_kind {
                            object_ref(kind, o.resource.name())
                        } else {
                            o.resource.name().to_string()
                        };
                        row(o, wide, name)
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                if !first {
                    println!();
                }
                first = false;
                let h = header(kind, wide);
                print_table((!no_headers).then_some(h.as_slice()), &rows);
            }
        }
    }
    Ok(())
}

impl GetArgs {
    /// Fetch and print; exit 1 if a named object is missing.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        let client = self.conn.client(cfg);
        let all = self.kind.eq_ignore_ascii_case("all");
        let kind = if all {
            None
        } else {
            Some(parse_kind(&self.kind)?)
        };
        if all && !self.names.is_empty() {
            bail!("`get all` takes no names; name a kind to get single objects");
        }
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
                        eprintln!("error: {} \"{name}\" not found", lower(kind));
                        missing += 1;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            out
        };
        if objects.is_empty()
            && missing == 0
            && matches!(self.output, None | Some(OutputFormat::Wide))
        {
            match kind {
                Some(k) => eprintln!("No {} found.", k.plural()),
                None => eprintln!("No objects found."),
            }
            return Ok(0);
        }
        let single = self.names.len() == 1;
        print_objects(&objects, self.output, self.no_headers, single, all)?;
        Ok(i32::from(missing > 0))
    }
}
