//! Egress filtering by domain name: for guests whose `NetworkFilter` has domain rules, their
//! TCP to those rules' ports is redirected (iptables `REDIRECT` in the namespace libvirt's
//! networks live in) to this proxy on the network's gateway, which reads the name from the
//! TLS SNI or HTTP `Host`, checks it against the guest's filter, checks the dialled address
//! against the name's DNS answers and splices or closes (see [`proxy`]). Every connection is
//! an `egress` audit event and counts in `agentvm_egress_connections_total{pool,verdict}` and
//! `agentvm_egress_bytes_total{pool,direction}`.
//!
//! # Guarantees
//! - Fail closed: a guest with domain rules can reach nothing directly on TCP (its nwfilter
//!   admits only the proxy port on the host, see `agentvm_backend::netxml`); until its
//!   redirect rule is in place, or while the proxy is down, its connections fail.
//! - The filter's spec is read from the store for each connection: changing the domain list
//!   applies to the next connection of running VMs, no restart or reboot.
//! - Guests are told apart by source address, which their nwfilter pins (anti-spoofing), and
//!   the redirect only applies to traffic entering from agentvm bridges (`avm-*`).
//!
//! # Assumptions
//! - The controller may enter the configured network namespace (`egressNetns`; root) and
//!   run `iptables`/`iptables-restore` there.
//! - The proxy runs for the life of the controller process.

pub mod dns;
pub mod dns_filter;
pub mod proxy;
pub mod sniff;
pub mod steer;

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, UdpSocket};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use agentvm_api::{AgentRunPhase, Kind, NetworkFilterSpec, Resource};
use agentvm_backend::netxml::{EGRESS_DNS_PORT, EGRESS_PROXY_PORT, NAME_PREFIX};
use agentvm_backend::Backend;

use crate::audit::{AuditEvent, AuditEventType};
use crate::reconcile::Ctx;
use dns::{Resolve, UdpResolver};
use proxy::{EgressRecord, GuestPolicy, ProxyContext, Verdict};

/// Most runs whose egress summary is kept until their run ends and takes it.
pub const MAX_SUMMARIES: usize = 1024;

/// Per-run egress summaries, filled by the proxy and taken by the run when it ends.
#[derive(Debug, Clone, Default)]
pub struct RunSummaries(Arc<std::sync::Mutex<HashMap<String, agentvm_api::EgressSummary>>>);

impl RunSummaries {
    /// Counts one record for `run`.
    fn add(&self, run: &str, r: &EgressRecord) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(run) && m.len() >= MAX_SUMMARIES {
            // Runs that ended without taking theirs (deleted, controller restarted): the
            // oldest is unknown, any will do to keep the map bounded.
            if let Some(k) = m.keys().next().cloned() {
                m.remove(&k);
            }
        }
        m.entry(run.to_string()).or_default().add(
            r.name.as_deref().unwrap_or("-"),
            r.destination.port(),
            r.verdict.as_str(),
            r.bytes_out,
            r.bytes_in,
        );
    }

    /// The summary of `run` so far, removed from the map (`None`: no egress through the proxy).
    pub fn take(&self, run: &str) -> Option<agentvm_api::EgressSummary> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(run)
    }
}

/// How often the proxy refreshes its guest table, listeners and redirect rules.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Most guest connections handled at once (more are refused).
pub const MAX_CONNECTIONS: usize = 2048;

/// A guest with a domain filter, as the sync loop last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GuestEntry {
    vm: String,
    pool: String,
    filter: String,
}

type GuestTable = Arc<RwLock<HashMap<Ipv4Addr, GuestEntry>>>;

/// Starts the egress proxy: a thread that enters `config.egress_netns` (if set) and keeps
/// listeners, the guest table and the redirect rules in step with the store and libvirt.
pub fn start(ctx: Ctx, backend: Arc<dyn Backend>) -> std::io::Result<()> {
    let netns = ctx.config.egress_netns.clone();
    std::thread::Builder::new()
        .name("egress".into())
        .spawn(move || {
            if let Some(ns) = &netns {
                if let Err(e) = enter_netns(ns) {
                    tracing::error!("egress proxy: cannot enter network namespace {ns}: {e}; domain-filtered guests get no TCP egress");
                    return;
                }
            }
            run(ctx, backend)
        })?;
    Ok(())
}

fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{name}"))?;
    use std::os::fd::AsFd;
    rustix::thread::move_into_link_name_space(
        f.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )?;
    Ok(())
}

fn run(ctx: Ctx, backend: Arc<dyn Backend>) {
    let guests: GuestTable = Arc::default();
    let proxy_ctx = Arc::new(proxy_context(&ctx, guests.clone()));
    let mut listening: BTreeMap<Ipv4Addr, ()> = BTreeMap::new();
    let mut applied: Option<String> = None;
    loop {
        let gateways = gateways(&ctx);
        if !gateways.is_empty() {
            // Kept in place while there are networks (anyone may flush a table).
            if let Err(e) = backend.ensure_filter_guard() {
                tracing::error!("{e}");
            }
        }
        for gateway in gateways {
            if listening.contains_key(&gateway) {
                continue;
            }
            let bound = (|| {
                Ok::<_, std::io::Error>((
                    TcpListener::bind(SocketAddrV4::new(gateway, EGRESS_PROXY_PORT))?,
                    UdpSocket::bind(SocketAddrV4::new(gateway, EGRESS_DNS_PORT))?,
                    TcpListener::bind(SocketAddrV4::new(gateway, EGRESS_DNS_PORT))?,
                ))
            })();
            match bound {
                Ok((proxy_l, dns_udp, dns_tcp)) => {
                    tracing::info!(
                        "egress proxy listening on {gateway}:{EGRESS_PROXY_PORT}, DNS filter on {gateway}:{EGRESS_DNS_PORT}"
                    );
                    listening.insert(gateway, ());
                    let pc = proxy_ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("egress-{gateway}"))
                        .spawn(move || accept_loop(proxy_l, pc));
                    let pc = proxy_ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("egress-dns-{gateway}"))
                        .spawn(move || dns_filter::serve_udp(dns_udp, pc));
                    let pc = proxy_ctx.clone();
                    let _ = std::thread::Builder::new()
                        .name(format!("egress-dnstcp-{gateway}"))
                        .spawn(move || dns_filter::serve_tcp(dns_tcp, pc));
                }
                Err(e) => tracing::debug!("egress proxy: not yet listening on {gateway}: {e}"),
            }
        }
        match guest_table(&ctx, backend.as_ref()) {
            Ok((table, ports)) => {
                let script = steer::rules_script(&ports);
                *guests.write().unwrap() = table;
                if applied.is_none() && ports.is_empty() && !steer::chain_exists() {
                    // Nothing to steer and nothing left by an earlier controller: the
                    // namespace's tables are not touched at all.
                    applied = Some(script.clone());
                }
                // Loaded again when it changed, or when the live chain no longer matches it
                // (flushed or replaced by something else) while there is something to steer.
                let stale = applied.as_deref() != Some(script.as_str())
                    || (!ports.is_empty() && !steer::in_place(&script));
                if stale {
                    match steer::apply(&script) {
                        Ok(()) => {
                            tracing::info!(
                                "egress redirect rules updated ({} guests)",
                                ports.len()
                            );
                            applied = Some(script);
                        }
                        Err(e) => tracing::error!("egress redirect rules: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("egress proxy: listing guests: {e}"),
        }
        std::thread::sleep(SYNC_INTERVAL);
    }
}

fn accept_loop(listener: TcpListener, ctx: Arc<ProxyContext>) {
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let ctx = ctx.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("egress-conn".into())
                    .spawn(move || proxy::handle(&ctx, c))
                {
                    tracing::warn!("egress proxy: no thread for a connection: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("egress proxy: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The gateway addresses of the declared networks.
fn gateways(ctx: &Ctx) -> Vec<Ipv4Addr> {
    ctx.store
        .list(Some(Kind::Network))
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| match o.resource {
            Resource::Network(n) => Some(n.spec.gateway()),
            _ => None,
        })
        .collect()
}

/// The filter spec of `NetworkFilter` `name`, if it exists.
fn filter_spec(ctx: &Ctx, name: &str) -> Option<NetworkFilterSpec> {
    match ctx.store.get(Kind::NetworkFilter, name).ok()??.resource {
        Resource::NetworkFilter(f) => Some(f.spec),
        _ => None,
    }
}

/// Guests with domain filters (by address) and the ports to redirect for each.
#[allow(clippy::type_complexity)]
fn guest_table(
    ctx: &Ctx,
    backend: &dyn Backend,
) -> Result<
    (
        HashMap<Ipv4Addr, GuestEntry>,
        BTreeMap<Ipv4Addr, Vec<(u16, u16)>>,
    ),
    String,
> {
    let mut table = HashMap::new();
    let mut ports = BTreeMap::new();
    for g in backend.guest_addresses().map_err(|e| e.to_string())? {
        let Some(filter) = g.filter.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let Some(spec) = filter_spec(ctx, filter) else {
            continue;
        };
        if !spec.has_domain_rules() {
            continue;
        }
        let mut p: Vec<(u16, u16)> = spec
            .egress
            .iter()
            .filter(|r| !r.domains.is_empty())
            .flat_map(|r| r.domain_ports())
            .map(|r| (r.start, r.end))
            .collect();
        p.sort_unstable();
        p.dedup();
        ports.insert(g.ip, p);
        table.insert(
            g.ip,
            GuestEntry {
                vm: g.vm,
                pool: g.owner.name,
                filter: filter.to_string(),
            },
        );
    }
    Ok((table, ports))
}

/// The run executing in `vm`, if any.
fn run_in(ctx: &Ctx, vm: &str) -> Option<String> {
    ctx.store
        .list(Some(Kind::AgentRun))
        .ok()?
        .into_iter()
        .find_map(|o| match o.resource {
            Resource::AgentRun(r) => r
                .status
                .as_ref()
                .filter(|s| s.phase == AgentRunPhase::Running && s.vm.as_deref() == Some(vm))
                .map(|_| r.metadata.name.clone()),
            _ => None,
        })
}

/// The sandbox whose VM is `vm`, if any.
fn sandbox_of(ctx: &Ctx, vm: &str) -> Option<String> {
    ctx.store
        .list(Some(Kind::Sandbox))
        .ok()?
        .into_iter()
        .find_map(|o| match o.resource {
            Resource::Sandbox(s) => s
                .status
                .as_ref()
                .filter(|st| st.vm.as_deref() == Some(vm))
                .map(|_| s.metadata.name.clone()),
            _ => None,
        })
}

/// The object a connection is audited under: its run, else its sandbox, else its pool.
fn audited_as(g: Option<&GuestPolicy>) -> (&'static str, String) {
    match g {
        Some(GuestPolicy { run: Some(run), .. }) => ("AgentRun", run.clone()),
        Some(GuestPolicy {
            sandbox: Some(sandbox),
            ..
        }) => ("Sandbox", sandbox.clone()),
        Some(g) => ("VmPool", g.pool.clone()),
        None => ("VmPool", String::new()),
    }
}

fn proxy_context(ctx: &Ctx, guests: GuestTable) -> ProxyContext {
    let c1 = ctx.clone();
    let c2 = ctx.clone();
    let c3 = ctx.clone();
    let configured = ctx.config.egress_resolver;
    ProxyContext {
        guest: Box::new(move |ip| {
            let entry = guests.read().unwrap().get(&ip).cloned()?;
            let spec = filter_spec(&c1, &entry.filter)?;
            if !spec.has_domain_rules() {
                return None;
            }
            Some(GuestPolicy {
                run: run_in(&c1, &entry.vm),
                sandbox: sandbox_of(&c1, &entry.vm),
                vm: entry.vm,
                pool: entry.pool,
                filter: entry.filter,
                spec,
            })
        }),
        resolver: Box::new(move |local| -> Box<dyn Resolve> {
            Box::new(UdpResolver {
                server: configured.unwrap_or(SocketAddr::from((local, 53))),
                timeout: Duration::from_secs(3),
            })
        }),
        dns_upstream: Box::new(move |local| configured.unwrap_or(SocketAddr::from((local, 53)))),
        original_destination: Box::new(|s| {
            rustix::net::sockopt::ip_original_dst(s).map_err(std::io::Error::from)
        }),
        forbidden: Box::new(move |ip| {
            proxy::forbidden_address(ip, |ip| {
                c3.store
                    .list(Some(Kind::Network))
                    .unwrap_or_default()
                    .into_iter()
                    .any(|o| matches!(o.resource, Resource::Network(n) if n.spec.subnet.contains(ip)))
            })
        }),
        sink: Box::new(move |r| record(&c2, r)),
        max_connections: MAX_CONNECTIONS,
        idle_timeout: proxy::IDLE_TIMEOUT,
        active: AtomicUsize::new(0),
    }
}

/// Logs one connection: audit event, metric, and a log line for refusals.
fn record(ctx: &Ctx, r: EgressRecord) {
    let pool = r.guest.as_ref().map_or("", |g| g.pool.as_str()).to_string();
    ctx.metrics
        .egress_connection(&pool, r.verdict.as_str(), r.bytes_out, r.bytes_in);
    let (kind, name) = audited_as(r.guest.as_ref());
    if r.verdict == Verdict::DnsAllowed {
        // Counted, not audited: every lookup of an allowed name would be a line.
        return;
    }
    if r.verdict != Verdict::Allowed {
        tracing::info!(
            "egress refused: {} from {} to {}:{} ({}): {}",
            r.name.as_deref().unwrap_or("-"),
            r.source,
            r.destination.ip(),
            r.destination.port(),
            r.verdict.as_str(),
            r.reason
        );
    }
    if let Some(run) = r.guest.as_ref().and_then(|g| g.run.as_deref()) {
        ctx.egress.add(run, &r);
    }
    let mut event = AuditEvent::new(AuditEventType::Egress, kind, name, "controller").details(
        serde_json::json!({
            "started": agentvm_api::time::Timestamp(r.started).to_string(),
            "run": r.guest.as_ref().and_then(|g| g.run.clone()),
            "sandbox": r.guest.as_ref().and_then(|g| g.sandbox.clone()),
            "pool": pool,
            "filter": r.guest.as_ref().map(|g| g.filter.clone()),
            "source": r.source.to_string(),
            "domain": r.name,
            "address": r.destination.ip().to_string(),
            "port": r.destination.port(),
            "verdict": r.verdict.as_str(),
            "reason": r.reason,
            "bytesOut": r.bytes_out,
            "bytesIn": r.bytes_in,
            "durationMs": r.duration.as_millis() as u64,
        }),
    );
    if let Some(g) = &r.guest {
        event = event.vm(g.vm.clone());
    }
    ctx.audit.record(event);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_audited_under_its_run_then_its_sandbox_then_its_pool() {
        let g = |run: Option<&str>, sandbox: Option<&str>| GuestPolicy {
            vm: "vm".into(),
            pool: "pool".into(),
            run: run.map(String::from),
            sandbox: sandbox.map(String::from),
            filter: "f".into(),
            spec: NetworkFilterSpec::predecessor_default(),
        };
        let both = g(Some("r"), Some("s"));
        assert_eq!(audited_as(Some(&both)), ("AgentRun", "r".to_string()));
        let sandbox = g(None, Some("s"));
        assert_eq!(audited_as(Some(&sandbox)), ("Sandbox", "s".to_string()));
        assert_eq!(
            audited_as(Some(&g(None, None))),
            ("VmPool", "pool".to_string())
        );
        assert_eq!(audited_as(None), ("VmPool", String::new()));
    }
}
