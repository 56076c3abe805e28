//! The DNS filter for guests with domain rules: their DNS (udp and tcp 53, to any server) is
//! redirected here; a query for a name their filter lists is forwarded unchanged to the
//! resolver and its answer relayed, any other query is answered NXDOMAIN (and logged), so a
//! guest cannot even learn the addresses of names it may not reach, and DNS to other
//! resolvers gets the same answers.
//!
//! # Guarantees
//! - Only well-formed queries with exactly one plain question are considered; anything
//!   else from a guest is dropped without an answer.
//! - At most [`MAX_IN_FLIGHT`] queries are handled at once (more are dropped); a forwarded
//!   query waits at most 3 s; a TCP client has 10 s for each message.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::dns::{answer, forward, question_name};
use super::proxy::{EgressRecord, ProxyContext, Verdict};

/// Most queries handled at once.
pub const MAX_IN_FLIGHT: usize = 256;
/// How long a forwarded query may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP client has for each message.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// The reply to `query` from guest `source` that reached the filter on `local`; `None`:
/// no reply (not a guest with domain rules, not a plain query, or the resolver failed).
pub fn reply(
    ctx: &ProxyContext,
    source: Ipv4Addr,
    local: Ipv4Addr,
    query: &[u8],
) -> Option<Vec<u8>> {
    let started = SystemTime::now();
    let t0 = Instant::now();
    let guest = (ctx.guest)(source)?;
    let name = question_name(query)?;
    let allowed = guest
        .spec
        .egress
        .iter()
        .any(|r| !r.domains.is_empty() && r.allows_domain(&name));
    let upstream = (ctx.dns_upstream)(local);
    let (verdict, reason, reply) = if allowed {
        match forward(upstream, query, FORWARD_TIMEOUT) {
            Ok(r) => (Verdict::DnsAllowed, String::new(), Some(r)),
            Err(e) => (
                Verdict::ResolveFailed,
                format!("resolver {upstream}: {e}"),
                None,
            ),
        }
    } else {
        let tunnel = guest.spec.egress.iter().any(|r| {
            r.domains
                .iter()
                .any(|d| agentvm_api::domain_overlong_under(d, &name.to_ascii_lowercase()))
        });
        let why = if tunnel {
            format!(
                "{name} is under a wildcard of NetworkFilter {} but longer than a wildcard \
                 covers ({} bytes before its suffix): refused as a likely DNS tunnel, answered NXDOMAIN",
                guest.filter,
                agentvm_api::MAX_WILDCARD_HEAD
            )
        } else {
            format!(
                "NetworkFilter {} does not list {name}: answered NXDOMAIN",
                guest.filter
            )
        };
        (Verdict::DnsDenied, why, Some(answer(query, None)))
    };
    (ctx.sink)(EgressRecord {
        started,
        source,
        guest: Some(guest),
        name: Some(name),
        destination: SocketAddrV4::new(local, 53),
        verdict,
        reason,
        bytes_out: query.len() as u64,
        bytes_in: reply.as_ref().map_or(0, |r| r.len() as u64),
        duration: t0.elapsed(),
        proxy_replied: false,
    });
    reply
}

/// Answers UDP queries on `socket` until it fails.
pub fn serve_udp(socket: UdpSocket, ctx: Arc<ProxyContext>) {
    let socket = Arc::new(socket);
    let mut buf = [0u8; 4096];
    loop {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!("DNS filter: receive: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let query = buf[..n].to_vec();
        let (socket, ctx) = (socket.clone(), ctx.clone());
        let local = match socket.local_addr() {
            Ok(SocketAddr::V4(a)) => *a.ip(),
            _ => Ipv4Addr::UNSPECIFIED,
        };
        let spawned = std::thread::Builder::new()
            .name("egress-dns".into())
            .spawn(move || {
                if let Some(r) = reply(&ctx, *from.ip(), local, &query) {
                    let _ = socket.send_to(&r, from);
                }
                IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Answers DNS over TCP (length-prefixed messages) on `listener`.
pub fn serve_tcp(listener: TcpListener, ctx: Arc<ProxyContext>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        if IN_FLIGHT.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let ctx = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("egress-dns-tcp".into())
            .spawn(move || {
                tcp_session(&ctx, conn);
                IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn tcp_session(ctx: &ProxyContext, mut conn: TcpStream) {
    let (Ok(SocketAddr::V4(peer)), Ok(SocketAddr::V4(local))) =
        (conn.peer_addr(), conn.local_addr())
    else {
        return;
    };
    let _ = conn.set_read_timeout(Some(TCP_TIMEOUT));
    let _ = conn.set_write_timeout(Some(TCP_TIMEOUT));
    loop {
        let mut len = [0u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
        if conn.read_exact(&mut query).is_err() {
            return;
        }
        let Some(r) = reply(ctx, *peer.ip(), *local.ip(), &query) else {
            return;
        };
        let Ok(n) = u16::try_from(r.len()) else {
            return;
        };
        if conn.write_all(&n.to_be_bytes()).is_err() || conn.write_all(&r).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::dns::{parse_answer, query};
    use crate::egress::proxy::GuestPolicy;
    use agentvm_api::{EgressRule, NetworkFilterSpec};
    use std::sync::Mutex;

    #[test]
    fn listed_names_are_forwarded_others_get_nxdomain_and_are_logged() {
        // The "resolver": answers every query with 192.0.2.1.
        let upstream = UdpSocket::bind("127.0.0.1:0").unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buf) {
                let r = answer(&buf[..n], Some(&["192.0.2.1".parse().unwrap()]));
                upstream.send_to(&r, from).unwrap();
            }
        });
        let records = Arc::new(Mutex::new(Vec::new()));
        let r2 = records.clone();
        let ctx = ProxyContext {
            guest: Box::new(|ip| {
                (ip == Ipv4Addr::LOCALHOST).then(|| GuestPolicy {
                    vm: "vm".into(),
                    pool: "p".into(),
                    run: None,
                    sandbox: None,
                    filter: "f".into(),
                    spec: NetworkFilterSpec {
                        egress: vec![EgressRule::domains(["*.example.com"])],
                        allow_dhcp: true,
                        allow_established: true,
                    },
                })
            }),
            resolver: Box::new(|_| unreachable!()),
            dns_upstream: Box::new(move |_| upstream_addr),
            original_destination: Box::new(|_| unreachable!()),
            forbidden: Box::new(|_| None),
            sink: Box::new(move |r| r2.lock().unwrap().push(r)),
            max_connections: 1,
            idle_timeout: Duration::from_secs(1),
            active: AtomicUsize::new(0),
        };
        let me = Ipv4Addr::LOCALHOST;
        let q = query(5, "api.example.com").unwrap();
        let r = reply(&ctx, me, me, &q).unwrap();
        assert_eq!(
            parse_answer(&r, 5),
            Ok(Some(vec!["192.0.2.1".parse().unwrap()]))
        );
        let q = query(6, "evil.net").unwrap();
        let r = reply(&ctx, me, me, &q).unwrap();
        assert_eq!(parse_answer(&r, 6), Ok(Some(vec![])), "NXDOMAIN");
        assert_eq!(r[3] & 0x0f, 3);
        assert_eq!(
            reply(&ctx, "10.9.9.9".parse().unwrap(), me, &q),
            None,
            "not a guest"
        );
        assert_eq!(reply(&ctx, me, me, &r), None, "an answer is not a query");
        let verdicts: Vec<(Verdict, Option<String>)> = records
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.verdict, r.name.clone()))
            .collect();
        assert_eq!(
            verdicts,
            [
                (Verdict::DnsAllowed, Some("api.example.com".into())),
                (Verdict::DnsDenied, Some("evil.net".into())),
            ]
        );
    }
}
