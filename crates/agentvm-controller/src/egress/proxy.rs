//! The egress proxy's handling of one guest connection: who is asking (the guest's VM and
//! filter, by source address), where to (the name in the TLS SNI or HTTP `Host`), whether the
//! filter allows that name on that port, whether the address the guest dialled is one the
//! name resolves to, then a byte-for-byte splice to that address — or a close.
//!
//! # Guarantees
//! - Nothing is sent upstream before the name is known and checked; the guest's first bytes
//!   are replayed unchanged after the check (TLS stays end to end: the proxy holds no keys).
//! - Refused: a source that is no known guest with a domain filter, no name (no SNI / no
//!   `Host`), an encrypted ClientHello (ECH), a name that is not a DNS name (IP literals
//!   included), a name or port the filter does not allow, a name whose DNS answers do not
//!   include the address the guest dialled, anything that is neither TLS nor HTTP/1.
//! - Bounded: at most [`MAX_SNIFF_BYTES`] and [`SNIFF_TIMEOUT`] to learn the name, a connect
//!   timeout upstream, an idle timeout on both directions once spliced, at most
//!   `max_connections` at a time (more are refused at once).
//! - A guest naming the proxy itself (`HTTPS_PROXY`, not redirected) gets the same checks
//!   on its `CONNECT host:port` or absolute-form `http://` request, and a tunnel whose SNI
//!   or `Host` is not the `CONNECT`'s host is refused; refusals are answered `403`.
//! - Every connection ends in exactly one [`EgressRecord`] handed to the sink.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use agentvm_api::{domain_pattern_problem, NetworkFilterSpec};

use super::dns::Resolve;
use super::sniff::{sniff, Sniffed, MAX_SNIFF_BYTES};

/// How long a guest has to send its ClientHello or request head.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A spliced connection with no bytes either way for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The guest a connection comes from, as the proxy needs it.
#[derive(Debug, Clone)]
pub struct GuestPolicy {
    /// The VM (domain) name.
    pub vm: String,
    /// The pool the VM belongs to.
    pub pool: String,
    /// The run executing in the VM, if any.
    pub run: Option<String>,
    /// The sandbox holding the VM, if any.
    pub sandbox: Option<String>,
    /// The `NetworkFilter` name.
    pub filter: String,
    /// Its current spec (read at connection time: changes apply to the next connection).
    pub spec: NetworkFilterSpec,
}

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Allowed and spliced.
    Allowed,
    /// The filter does not allow this name on this port.
    Denied,
    /// No name: no SNI, no `Host`, or neither TLS nor HTTP/1.
    NoName,
    /// The name is an IP literal or not a DNS name.
    BadName,
    /// The ClientHello hides the name (ECH).
    Ech,
    /// The address the guest dialled is not among the name's DNS answers.
    AddressMismatch,
    /// The name did not resolve (NXDOMAIN, no A records, resolver failure).
    ResolveFailed,
    /// Connecting upstream failed.
    ConnectFailed,
    /// The source is not a VM with a domain filter.
    UnknownGuest,
    /// The guest sent nothing usable within [`SNIFF_TIMEOUT`].
    Timeout,
    /// Too many connections at once.
    Overloaded,
    /// Through the proxy named explicitly (`HTTPS_PROXY`): the name in the tunnel's TLS SNI
    /// or `Host` is not the one the `CONNECT` asked for.
    NameMismatch,
    /// The name resolves to an address the proxy never connects to (the host itself,
    /// loopback, link-local, multicast, agentvm's own networks).
    ForbiddenAddress,
    /// A DNS query for a name the filter lists, forwarded to the resolver.
    DnsAllowed,
    /// A DNS query for a name the filter does not list, answered NXDOMAIN.
    DnsDenied,
}

impl Verdict {
    /// Label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::NoName => "no_name",
            Verdict::BadName => "bad_name",
            Verdict::Ech => "ech",
            Verdict::AddressMismatch => "address_mismatch",
            Verdict::ResolveFailed => "resolve_failed",
            Verdict::ConnectFailed => "connect_failed",
            Verdict::UnknownGuest => "unknown_guest",
            Verdict::Timeout => "timeout",
            Verdict::Overloaded => "overloaded",
            Verdict::NameMismatch => "name_mismatch",
            Verdict::ForbiddenAddress => "forbidden_address",
            Verdict::DnsAllowed => "dns_allowed",
            Verdict::DnsDenied => "dns_denied",
        }
    }
}

/// One connection, as logged.
#[derive(Debug, Clone)]
pub struct EgressRecord {
    /// When the connection was accepted.
    pub started: SystemTime,
    /// The guest's address.
    pub source: Ipv4Addr,
    /// The guest, if known.
    pub guest: Option<GuestPolicy>,
    /// The name asked for (`None` when none was read).
    pub name: Option<String>,
    /// The address and port the guest dialled.
    pub destination: SocketAddrV4,
    /// The outcome.
    pub verdict: Verdict,
    /// Why, in a few words (for refusals).
    pub reason: String,
    /// Bytes from the guest to the server.
    pub bytes_out: u64,
    /// Bytes from the server to the guest.
    pub bytes_in: u64,
    /// From accept to close.
    pub duration: Duration,
    /// The proxy already answered the guest (explicit proxy: `200 Connection established`).
    pub proxy_replied: bool,
}

/// Reads the address a redirected connection was dialled to.
pub type OriginalDestination = dyn Fn(&TcpStream) -> io::Result<SocketAddrV4> + Send + Sync;

/// What the proxy needs from the rest of the controller.
pub struct ProxyContext {
    /// The guest behind a source address, with its filter (`None`: not a VM with a domain
    /// filter).
    pub guest: Box<dyn Fn(Ipv4Addr) -> Option<GuestPolicy> + Send + Sync>,
    /// Resolver for a connection that reached the proxy on `local` (the network's gateway).
    pub resolver: Box<dyn Fn(Ipv4Addr) -> Box<dyn Resolve> + Send + Sync>,
    /// The DNS server that guests' allowed queries are forwarded to, for a query that
    /// reached the DNS filter on `local` (the network's gateway).
    pub dns_upstream: Box<dyn Fn(Ipv4Addr) -> SocketAddr + Send + Sync>,
    /// The address the guest dialled before it was redirected (`SO_ORIGINAL_DST`).
    pub original_destination: Box<OriginalDestination>,
    /// Why the proxy must not connect to an address whatever the filter says (`None`: it
    /// may); [`forbidden_address`] in the controller.
    pub forbidden: Box<dyn Fn(Ipv4Addr) -> Option<&'static str> + Send + Sync>,
    /// Receives one record per connection.
    pub sink: Box<dyn Fn(EgressRecord) + Send + Sync>,
    /// Most connections at once.
    pub max_connections: usize,
    /// Idle timeout once spliced.
    pub idle_timeout: Duration,
    /// Connections being handled.
    pub active: AtomicUsize,
}

/// Handles one accepted connection to the end (call on a thread of its own).
pub fn handle(ctx: &Arc<ProxyContext>, guest_conn: TcpStream) {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let source = match guest_conn.peer_addr() {
        Ok(SocketAddr::V4(a)) => *a.ip(),
        _ => return,
    };
    let destination = (ctx.original_destination)(&guest_conn)
        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let mut record = EgressRecord {
        started,
        source,
        guest: None,
        name: None,
        destination,
        verdict: Verdict::UnknownGuest,
        reason: String::new(),
        bytes_out: 0,
        bytes_in: 0,
        duration: Duration::ZERO,
        proxy_replied: false,
    };
    let active = ctx.active.fetch_add(1, Ordering::SeqCst) + 1;
    let outcome = if active > ctx.max_connections {
        Err((
            Verdict::Overloaded,
            format!("more than {} connections", ctx.max_connections),
        ))
    } else {
        decide_and_splice(ctx, &guest_conn, &mut record)
    };
    ctx.active.fetch_sub(1, Ordering::SeqCst);
    match outcome {
        Ok(()) => record.verdict = Verdict::Allowed,
        Err((verdict, reason)) => {
            record.verdict = verdict;
            record.reason = reason;
        }
    }
    let _ = guest_conn.shutdown(Shutdown::Both);
    record.duration = t0.elapsed();
    (ctx.sink)(record);
}

type Refusal = (Verdict, String);

fn decide_and_splice(
    ctx: &ProxyContext,
    guest_conn: &TcpStream,
    record: &mut EgressRecord,
) -> Result<(), Refusal> {
    let guest = (ctx.guest)(record.source).ok_or((
        Verdict::UnknownGuest,
        "the source is no VM with a domain filter".to_string(),
    ))?;
    record.guest = Some(guest.clone());
    if record.destination.port() == 0 {
        return Err((
            Verdict::NoName,
            "not redirected (no original destination)".into(),
        ));
    }
    let local = match guest_conn.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        _ => SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
    };
    if record.destination == local {
        // Not redirected: the guest named the proxy itself (`HTTPS_PROXY`/`HTTP_PROXY`).
        let outcome = explicit(ctx, guest_conn, record, &guest, *local.ip());
        if outcome.is_err() && !record.proxy_replied {
            let _ = (&*guest_conn).write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        return outcome;
    }
    let (first, name) = read_name(guest_conn)?;
    record.name = Some(name.clone());
    let port = record.destination.port();
    let name = check_name(&guest, &name, port)?;
    record.name = Some(name.clone());
    let answers = resolve(ctx, *local.ip(), &name)?;
    if !answers.contains(record.destination.ip()) {
        return Err((
            Verdict::AddressMismatch,
            format!(
                "{} is not an address of {name} ({})",
                record.destination.ip(),
                answers
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let upstream = connect_upstream(ctx, record.destination)?;
    let (out, inn) = splice(guest_conn, upstream, &first, ctx.idle_timeout);
    record.bytes_out = out;
    record.bytes_in = inn;
    Ok(())
}

/// Why the proxy must not connect to `ip` (`None`: it may). A name may resolve anywhere
/// (its owner decides), and the proxy connects from the host, which guests' filters do not
/// stop: the host's own addresses, loopback, link-local (cloud metadata), multicast,
/// broadcast and agentvm's networks (`internal`: other guests, gateways) are refused.
pub fn forbidden_address(
    ip: Ipv4Addr,
    internal: impl Fn(Ipv4Addr) -> bool,
) -> Option<&'static str> {
    if ip.is_loopback() || ip.is_unspecified() {
        Some("loopback or unspecified")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_multicast() || ip.is_broadcast() {
        Some("multicast or broadcast")
    } else if internal(ip) {
        Some("inside an agentvm network")
    } else if std::net::UdpSocket::bind((ip, 0)).is_ok() {
        Some("one of the host's own addresses")
    } else {
        None
    }
}

/// The IPv4 addresses of `name` from the resolver for a connection that reached the proxy
/// on `local`; never empty.
fn resolve(ctx: &ProxyContext, local: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>, Refusal> {
    let answers = (ctx.resolver)(local)
        .resolve(name)
        .map_err(|e| (Verdict::ResolveFailed, format!("resolving {name}: {e}")))?;
    if answers.is_empty() {
        return Err((
            Verdict::ResolveFailed,
            format!("{name} has no IPv4 address"),
        ));
    }
    Ok(answers)
}

/// Connects to `destination` unless the proxy must not connect there.
fn connect_upstream(ctx: &ProxyContext, destination: SocketAddrV4) -> Result<TcpStream, Refusal> {
    let ip = *destination.ip();
    if let Some(why) = (ctx.forbidden)(ip) {
        return Err((
            Verdict::ForbiddenAddress,
            format!("{ip} is {why}; the proxy does not connect there"),
        ));
    }
    TcpStream::connect_timeout(&SocketAddr::V4(destination), CONNECT_TIMEOUT)
        .map_err(|e| (Verdict::ConnectFailed, format!("{destination}: {e}")))
}

/// `name` as a lowercase host name the guest's filter allows on `port`.
fn check_name(guest: &GuestPolicy, name: &str, port: u16) -> Result<String, Refusal> {
    if let Some(problem) = domain_pattern_problem(name).or_else(|| {
        name.starts_with("*.")
            .then(|| "a wildcard is not a host name".to_string())
    }) {
        return Err((Verdict::BadName, problem));
    }
    let name = name.to_ascii_lowercase();
    if !guest.spec.allows_domain(&name, port) {
        return Err((
            Verdict::Denied,
            format!(
                "NetworkFilter {} does not allow {name} on port {port}",
                guest.filter
            ),
        ));
    }
    Ok(name)
}

/// The proxy named explicitly: `CONNECT host:port` (then the tunnel's TLS SNI or `Host` must
/// be that host) or an absolute-form `GET http://host[:port]/...`. The same checks as a
/// redirected connection; the upstream address is the name's first DNS answer.
fn explicit(
    ctx: &ProxyContext,
    guest_conn: &TcpStream,
    record: &mut EgressRecord,
    guest: &GuestPolicy,
    local: Ipv4Addr,
) -> Result<(), Refusal> {
    let head = read_head(guest_conn)?;
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(head.len(), |p| p + 4);
    let line = String::from_utf8_lossy(&head[..head.iter().position(|&b| b == b'\r').unwrap_or(0)])
        .into_owned();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (tunnel, authority) = if method == "CONNECT" {
        (true, target)
    } else if let Some(rest) = target.strip_prefix("http://") {
        (false, rest.split('/').next().unwrap_or(""))
    } else {
        return Err((
            Verdict::NoName,
            "a request to the proxy that is neither CONNECT nor http://".into(),
        ));
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) if p > 0 => (h, p),
            _ => return Err((Verdict::BadName, format!("bad port in {authority:?}"))),
        },
        None if !tunnel => (authority, 80),
        None => {
            return Err((
                Verdict::BadName,
                format!("CONNECT {authority:?} has no port"),
            ))
        }
    };
    record.name = Some(host.to_string());
    // Not resolved yet: the log shows 0.0.0.0 with the asked-for port if refused here.
    record.destination = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
    let name = check_name(guest, host, port)?;
    record.name = Some(name.clone());
    let answers = resolve(ctx, local, &name)?;
    record.destination = SocketAddrV4::new(answers[0], port);
    let upstream = connect_upstream(ctx, record.destination)?;
    let first = if tunnel {
        record.proxy_replied = true;
        (&*guest_conn)
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .map_err(|e| (Verdict::NoName, format!("writing: {e}")))?;
        let mut first = head[end..].to_vec();
        let (more, inner) = read_name_after(guest_conn, std::mem::take(&mut first))?;
        if !inner.eq_ignore_ascii_case(&name) {
            return Err((
                Verdict::NameMismatch,
                format!("CONNECT {name} but the tunnel asks for {inner}"),
            ));
        }
        more
    } else {
        head
    };
    let (out, inn) = splice(guest_conn, upstream, &first, ctx.idle_timeout);
    record.bytes_out = out;
    record.bytes_in = inn;
    Ok(())
}

/// Reads an HTTP request head (through its blank line) within the sniff limits.
fn read_head(conn: &TcpStream) -> Result<Vec<u8>, Refusal> {
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let mut reader = conn;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || buf.len() >= MAX_SNIFF_BYTES {
            return Err((Verdict::Timeout, "no complete request head".into()));
        }
        let _ = conn.set_read_timeout(Some(left));
        let room = (MAX_SNIFF_BYTES - buf.len()).min(chunk.len());
        match reader.read(&mut chunk[..room]) {
            Ok(0) => return Err((Verdict::NoName, "closed before a request".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Err((Verdict::Timeout, "no complete request head".into())),
        }
    }
    Ok(buf)
}

/// Reads until the name is known; returns the bytes read and the name.
fn read_name(conn: &TcpStream) -> Result<(Vec<u8>, String), Refusal> {
    read_name_after(conn, Vec::with_capacity(2048))
}

/// [`read_name`] when `buf` already holds the first bytes.
fn read_name_after(conn: &TcpStream, mut buf: Vec<u8>) -> Result<(Vec<u8>, String), Refusal> {
    if !buf.is_empty() {
        match sniff(&buf) {
            Sniffed::NeedMore => {}
            Sniffed::Tls {
                sni: Some(n),
                ech: false,
            } => return Ok((buf, n)),
            Sniffed::Http { host } => return Ok((buf, host)),
            _ => return Err((Verdict::NoName, "no name in the tunnel".into())),
        }
    }
    let deadline = Instant::now() + SNIFF_TIMEOUT;
    let mut chunk = [0u8; 4096];
    let mut reader = conn;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((
                Verdict::Timeout,
                "no ClientHello or request within 10 s".into(),
            ));
        }
        let _ = conn.set_read_timeout(Some(left));
        let room = (MAX_SNIFF_BYTES - buf.len()).min(chunk.len());
        match reader.read(&mut chunk[..room]) {
            Ok(0) => return Err((Verdict::NoName, "closed before a name was sent".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err((
                    Verdict::Timeout,
                    "no ClientHello or request within 10 s".into(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err((Verdict::NoName, format!("reading: {e}"))),
        }
        match sniff(&buf) {
            Sniffed::NeedMore if buf.len() < MAX_SNIFF_BYTES => continue,
            Sniffed::NeedMore => {
                return Err((Verdict::NoName, "no name in the first 16 KiB".into()))
            }
            Sniffed::Tls { ech: true, .. } => {
                return Err((Verdict::Ech, "encrypted ClientHello hides the name".into()))
            }
            Sniffed::Tls { sni: None, .. } => {
                return Err((Verdict::NoName, "TLS without a server name (SNI)".into()))
            }
            Sniffed::Tls { sni: Some(n), .. } => return Ok((buf, n)),
            Sniffed::Http { host } => return Ok((buf, host)),
            Sniffed::Unrecognised(why) => return Err((Verdict::NoName, why.to_string())),
        }
    }
}

/// Copies both ways until both sides are done or idle; returns (guest→server, server→guest)
/// byte counts (`first` counted in the former).
fn splice(guest: &TcpStream, upstream: TcpStream, first: &[u8], idle: Duration) -> (u64, u64) {
    // A relay passes each write on as its sender made it: with Nagle's algorithm on, a small
    // write waits for the peer's (delayed) ACK of the previous one, 40 ms per round of a
    // TLS handshake.
    let _ = guest.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = guest.set_read_timeout(Some(idle));
    let _ = upstream.set_read_timeout(Some(idle));
    let mut up_w = &upstream;
    if up_w.write_all(first).is_err() {
        return (0, 0);
    }
    let (Ok(guest2), Ok(upstream2)) = (guest.try_clone(), upstream.try_clone()) else {
        return (first.len() as u64, 0);
    };
    let outbound = std::thread::spawn(move || {
        let n = copy(&guest2, &upstream2);
        let _ = upstream2.shutdown(Shutdown::Write);
        n
    });
    let inbound = copy(&upstream, guest);
    let _ = guest.shutdown(Shutdown::Write);
    // The guest may keep its side open after the server finished: the idle timeout ends it.
    let out = outbound.join().unwrap_or(0);
    let _ = upstream.shutdown(Shutdown::Both);
    (first.len() as u64 + out, inbound)
}

fn copy(from: &TcpStream, to: &TcpStream) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let (mut r, mut w) = (from, to);
    loop {
        match r.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return total;
                }
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::sniff::client_hello;
    use agentvm_api::EgressRule;
    use std::net::TcpListener;
    use std::sync::Mutex;

    type Records = Arc<Mutex<Vec<EgressRecord>>>;

    struct Fixed(Vec<Ipv4Addr>);
    impl Resolve for Fixed {
        fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
            Ok(if name.ends_with(".example.com") {
                self.0.clone()
            } else {
                vec![]
            })
        }
    }

    /// An echo server on 127.0.0.1 (the "internet"), a proxy on another port whose
    /// original destination is that server, and the records it logged.
    fn setup(spec: NetworkFilterSpec, answers: Vec<Ipv4Addr>) -> (SocketAddr, Records) {
        setup_with(spec, answers, false).0
    }

    /// `setup`, optionally with the guest naming the proxy itself (no redirect); also
    /// returns the echo server's port.
    fn setup_with(
        mut spec: NetworkFilterSpec,
        answers: Vec<Ipv4Addr>,
        explicit: bool,
    ) -> ((SocketAddr, Records), u16) {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = match server.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        // The filter allows the server's (random) port.
        for rule in &mut spec.egress {
            rule.ports = vec![agentvm_api::PortRange::single(server_addr.port())];
        }
        std::thread::spawn(move || {
            for c in server.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = &c;
                    let _ = io::copy(&mut &c, &mut w);
                });
            }
        });
        let records = Arc::new(Mutex::new(Vec::new()));
        let r2 = records.clone();
        let ctx = Arc::new(ProxyContext {
            guest: Box::new(move |ip| {
                (ip == Ipv4Addr::LOCALHOST).then(|| GuestPolicy {
                    vm: "vm-1".into(),
                    pool: "p".into(),
                    run: Some("r".into()),
                    sandbox: None,
                    filter: "f".into(),
                    spec: spec.clone(),
                })
            }),
            resolver: Box::new(move |_| Box::new(Fixed(answers.clone()))),
            dns_upstream: Box::new(|_| SocketAddr::from(([127, 0, 0, 1], 9))),
            original_destination: Box::new(move |c| match (explicit, c.local_addr()) {
                (true, Ok(SocketAddr::V4(local))) => Ok(local),
                _ => Ok(server_addr),
            }),
            // The test's "internet" is on loopback; 127.0.0.9 stands for a forbidden address.
            forbidden: Box::new(|ip| (ip == Ipv4Addr::new(127, 0, 0, 9)).then_some("test")),
            sink: Box::new(move |r| r2.lock().unwrap().push(r)),
            max_connections: 8,
            idle_timeout: Duration::from_secs(2),
            active: AtomicUsize::new(0),
        });
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in proxy.incoming().flatten() {
                let ctx = ctx.clone();
                std::thread::spawn(move || handle(&ctx, c));
            }
        });
        ((proxy_addr, records), server_addr.port())
    }

    fn spec(domains: &[&str]) -> NetworkFilterSpec {
        NetworkFilterSpec {
            egress: vec![EgressRule::domains(domains.iter().copied())],
            allow_dhcp: true,
            allow_established: true,
        }
    }

    /// Sends `first`, then reads until close; returns what came back.
    fn exchange(proxy: SocketAddr, first: &[u8]) -> Vec<u8> {
        let mut c = TcpStream::connect(proxy).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(first).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        let _ = c.read_to_end(&mut back);
        back
    }

    fn wait_records(r: &Arc<Mutex<Vec<EgressRecord>>>, n: usize) -> Vec<EgressRecord> {
        let t = Instant::now();
        while r.lock().unwrap().len() < n && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        r.lock().unwrap().clone()
    }

    #[test]
    fn allowed_names_are_spliced_with_their_first_bytes_and_counted() {
        // The test's "server" is 127.0.0.1: make the name resolve there.
        let (proxy, records) = setup(spec(&["*.example.com"]), vec![Ipv4Addr::LOCALHOST]);
        let hello = client_hello(Some("api.example.com"), false);
        assert_eq!(exchange(proxy, &hello), hello, "echoed unchanged");
        let http = b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\nbody";
        assert_eq!(exchange(proxy, http), http.to_vec());
        let r = wait_records(&records, 2);
        assert_eq!(r[0].verdict, Verdict::Allowed, "{r:?}");
        assert_eq!(r[0].name.as_deref(), Some("api.example.com"));
        assert_eq!(r[0].bytes_out, hello.len() as u64);
        assert_eq!(r[0].bytes_in, hello.len() as u64);
        assert_eq!(r[1].verdict, Verdict::Allowed);
        assert_eq!(r[1].guest.as_ref().unwrap().run.as_deref(), Some("r"));
    }

    #[test]
    fn refusals_send_nothing_upstream_and_say_why() {
        let (proxy, records) = setup(spec(&["api.example.com"]), vec![Ipv4Addr::LOCALHOST]);
        let cases: Vec<(Vec<u8>, Verdict)> = vec![
            (
                client_hello(Some("other.example.com"), false),
                Verdict::Denied,
            ),
            (client_hello(Some("127.0.0.1"), false), Verdict::BadName),
            (client_hello(None, false), Verdict::NoName),
            (client_hello(Some("api.example.com"), true), Verdict::Ech),
            (
                b"GET / HTTP/1.1\r\nHost: evil.net\r\n\r\n".to_vec(),
                Verdict::Denied,
            ),
            (b"\x00\x00garbage".to_vec(), Verdict::NoName),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), Verdict::NoName),
        ];
        for (i, (first, want)) in cases.iter().enumerate() {
            assert_eq!(exchange(proxy, first), b"", "case {i}: nothing comes back");
            let r = wait_records(&records, i + 1);
            assert_eq!(r[i].verdict, *want, "case {i}: {:?}", r[i]);
            assert_eq!((r[i].bytes_out, r[i].bytes_in), (0, 0));
        }
    }

    #[test]
    fn a_destination_not_among_the_answers_is_refused() {
        let (proxy, records) = setup(
            spec(&["api.example.com"]),
            vec!["192.0.2.7".parse().unwrap()],
        );
        let hello = client_hello(Some("api.example.com"), false);
        assert_eq!(exchange(proxy, &hello), b"");
        let r = wait_records(&records, 1);
        assert_eq!(r[0].verdict, Verdict::AddressMismatch, "{r:?}");
        assert!(r[0].reason.contains("192.0.2.7"), "{}", r[0].reason);
    }

    #[test]
    fn the_proxy_named_explicitly_applies_the_same_checks() {
        let ((proxy, records), port) =
            setup_with(spec(&["*.example.com"]), vec![Ipv4Addr::LOCALHOST], true);
        let hello = client_hello(Some("api.example.com"), false);
        // CONNECT, then a ClientHello for the same name: tunnelled.
        let mut first =
            format!("CONNECT api.example.com:{port} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes();
        first.extend(&hello);
        let back = exchange(proxy, &first);
        let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
        assert!(
            back.starts_with(established),
            "{}",
            String::from_utf8_lossy(&back)
        );
        assert_eq!(&back[established.len()..], &hello[..]);
        wait_records(&records, 1);
        // CONNECT to an allowed name, then a ClientHello for another: refused.
        let mut sneaky = format!("CONNECT api.example.com:{port} HTTP/1.1\r\n\r\n").into_bytes();
        sneaky.extend(client_hello(Some("evil.net"), false));
        assert_eq!(exchange(proxy, &sneaky), established.to_vec());
        wait_records(&records, 2);
        // CONNECT to a name the filter does not list: 403, nothing upstream.
        let denied = format!("CONNECT evil.net:{port} HTTP/1.1\r\n\r\n");
        assert!(String::from_utf8_lossy(&exchange(proxy, denied.as_bytes()))
            .starts_with("HTTP/1.1 403"));
        wait_records(&records, 3);
        // An absolute-form request goes through as it is.
        let get = format!(
            "GET http://www.example.com:{port}/x HTTP/1.1\r\nHost: www.example.com\r\n\r\n"
        );
        assert_eq!(exchange(proxy, get.as_bytes()), get.as_bytes());
        let r = wait_records(&records, 4);
        let verdicts: Vec<Verdict> = r.iter().map(|r| r.verdict).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Allowed,
                Verdict::NameMismatch,
                Verdict::Denied,
                Verdict::Allowed
            ],
            "{r:?}"
        );
    }

    #[test]
    fn forbidden_addresses() {
        let none = |_| false;
        for ip in [
            "127.0.0.1",
            "127.3.2.1",
            "0.0.0.0",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
        ] {
            assert!(
                forbidden_address(ip.parse().unwrap(), none).is_some(),
                "{ip}"
            );
        }
        assert_eq!(
            forbidden_address("10.1.2.3".parse().unwrap(), |ip: Ipv4Addr| ip.octets()[0]
                == 10),
            Some("inside an agentvm network")
        );
        assert_eq!(forbidden_address("192.0.2.1".parse().unwrap(), none), None);
        // Every address of this machine's interfaces counts as the host.
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr"])
            .output();
        if let Ok(out) = out {
            for word in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Some(Ok(ip)) = word.split('/').next().map(str::parse::<Ipv4Addr>) {
                    if word.contains('/') {
                        assert!(forbidden_address(ip, none).is_some(), "{ip}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_name_resolving_to_a_forbidden_address_is_not_connected_to() {
        let ((proxy, records), port) = setup_with(
            spec(&["api.example.com"]),
            vec![Ipv4Addr::new(127, 0, 0, 9)],
            true,
        );
        let connect = format!("CONNECT api.example.com:{port} HTTP/1.1\r\n\r\n");
        let back = exchange(proxy, connect.as_bytes());
        assert!(String::from_utf8_lossy(&back).starts_with("HTTP/1.1 403"));
        let r = wait_records(&records, 1);
        assert_eq!(r[0].verdict, Verdict::ForbiddenAddress, "{r:?}");
        assert!(r[0].reason.contains("127.0.0.9"), "{}", r[0].reason);
    }

    #[test]
    fn a_silent_guest_is_dropped_after_the_sniff_timeout() {
        let (proxy, records) = setup(spec(&["api.example.com"]), vec![Ipv4Addr::LOCALHOST]);
        let c = TcpStream::connect(proxy).unwrap();
        let t = Instant::now();
        let r = {
            while records.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(15) {
                std::thread::sleep(Duration::from_millis(50));
            }
            records.lock().unwrap().clone()
        };
        assert_eq!(r[0].verdict, Verdict::Timeout);
        assert!(
            r[0].duration >= Duration::from_secs(9),
            "{:?}",
            r[0].duration
        );
        drop(c);
    }
}
