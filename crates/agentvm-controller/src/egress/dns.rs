//! A small DNS client for the egress proxy: asks one resolver for a name's IPv4 addresses
//! (type A, over UDP, following the CNAMEs the resolver includes). Answers are untrusted
//! bytes: every offset is bounds-checked, compression pointers may only point backwards.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// Resolves names to IPv4 addresses.
pub trait Resolve: Send + Sync {
    /// The IPv4 addresses of `name` (empty: the name has none).
    fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>>;
}

/// Asks the resolver at `server` over UDP.
#[derive(Debug, Clone)]
pub struct UdpResolver {
    /// The resolver.
    pub server: SocketAddr,
    /// How long to wait for each of two tries.
    pub timeout: Duration,
}

impl Resolve for UdpResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        let socket = UdpSocket::bind(("0.0.0.0", 0))?;
        socket.connect(self.server)?;
        socket.set_read_timeout(Some(self.timeout))?;
        let mut last = io::Error::new(io::ErrorKind::TimedOut, "no answer");
        for _ in 0..2 {
            let id = query_id();
            socket.send(&query(id, name)?)?;
            let mut buf = [0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => match parse_answer(&buf[..n], id) {
                        Ok(Some(addrs)) => return Ok(addrs),
                        Ok(None) => continue, // another query's answer
                        Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                    },
                    Err(e) => {
                        last = e;
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn query_id() -> u16 {
    let mut b = [0u8; 2];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        b = (t.subsec_nanos() as u16).to_be_bytes();
    }
    u16::from_be_bytes(b)
}

/// A recursive type-A query for `name`.
pub fn query(id: u16, name: &str) -> io::Result<Vec<u8>> {
    let mut q = Vec::with_capacity(32 + name.len());
    q.extend(id.to_be_bytes());
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a DNS name"),
            ));
        }
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    Ok(q)
}

/// The name a guest's query asks about (lowercase, no trailing dot): `None` unless it is a
/// query (QR clear, opcode 0) with exactly one question whose name is plain labels.
pub fn question_name(msg: &[u8]) -> Option<String> {
    if msg.len() < 12 || msg[2] & 0x80 != 0 || msg[2] & 0x78 != 0 {
        return None;
    }
    if u16_at(msg, 4).ok()? != 1 {
        return None;
    }
    let mut pos = 12;
    let mut labels: Vec<String> = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = msg.get(pos + 1..pos + 1 + len)?;
        labels.push(String::from_utf8(label.to_vec()).ok()?.to_ascii_lowercase());
        pos += 1 + len;
    }
    msg.get(pos + 1..pos + 5)?;
    let name = labels.join(".");
    (name.len() <= 253).then_some(name)
}

/// Sends `query` as it is to `server` and returns the first reply carrying its ID.
pub fn forward(server: SocketAddr, query: &[u8], timeout: Duration) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind(("0.0.0.0", 0))?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(query)?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf)?;
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// Skips a (possibly compressed) name at `pos`; returns the offset after it.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, &'static str> {
    loop {
        let len = *msg.get(pos).ok_or("name runs past the message")? as usize;
        match len {
            0 => return Ok(pos + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(pos + 1).ok_or("name runs past the message")?;
                return Ok(pos + 2);
            }
            l if l & 0xc0 != 0 => return Err("bad label type"),
            l => pos += 1 + l,
        }
    }
}

fn u16_at(msg: &[u8], pos: usize) -> Result<usize, &'static str> {
    let b = msg.get(pos..pos + 2).ok_or("message cut short")?;
    Ok(u16::from_be_bytes([b[0], b[1]]) as usize)
}

/// The A records of an answer to query `id`: `Ok(None)` if it answers another query,
/// `Ok(Some(empty))` for NXDOMAIN or no addresses.
pub fn parse_answer(msg: &[u8], id: u16) -> Result<Option<Vec<Ipv4Addr>>, &'static str> {
    if msg.len() < 12 {
        return Err("message shorter than a header");
    }
    if u16_at(msg, 0)? as u16 != id || msg[2] & 0x80 == 0 {
        return Ok(None);
    }
    let rcode = msg[3] & 0x0f;
    if rcode == 3 {
        return Ok(Some(Vec::new()));
    }
    if rcode != 0 {
        return Err("the resolver answered with an error");
    }
    let qd = u16_at(msg, 4)?;
    let an = u16_at(msg, 6)?;
    let mut pos = 12;
    for _ in 0..qd {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        pos = skip_name(msg, pos)?;
        let kind = u16_at(msg, pos)?;
        let class = u16_at(msg, pos + 2)?;
        let len = u16_at(msg, pos + 8)?;
        let data = msg
            .get(pos + 10..pos + 10 + len)
            .ok_or("record runs past the message")?;
        if kind == 1 && class == 1 && len == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        pos += 10 + len;
    }
    Ok(Some(out))
}

/// An answer to `query` with `addrs` as A records (NXDOMAIN when `None`), as a DNS server
/// in tests sends it.
pub fn answer(query: &[u8], addrs: Option<&[Ipv4Addr]>) -> Vec<u8> {
    let qend = skip_name(query, 12).map(|p| p + 4).unwrap_or(query.len());
    let mut a = query[..qend.min(query.len())].to_vec();
    a[2] |= 0x80;
    a[3] = 0x80 | if addrs.is_none() { 3 } else { 0 };
    let n = addrs.map_or(0, |a| a.len()) as u16;
    a[6..8].copy_from_slice(&n.to_be_bytes());
    a[8..12].fill(0);
    for ip in addrs.unwrap_or_default() {
        a.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        a.extend(ip.octets());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_answer_round_trip() {
        let q = query(0x1234, "api.example.com").unwrap();
        let ips = ["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()];
        let a = answer(&q, Some(&ips));
        assert_eq!(parse_answer(&a, 0x1234), Ok(Some(ips.to_vec())));
        assert_eq!(parse_answer(&a, 0x9999), Ok(None));
        assert_eq!(parse_answer(&answer(&q, None), 0x1234), Ok(Some(vec![])));
        assert!(query(1, "a..b").is_err());
    }

    #[test]
    fn the_question_of_a_query() {
        let q = query(1, "API.Example.com").unwrap();
        assert_eq!(question_name(&q).as_deref(), Some("api.example.com"));
        let a = answer(&q, None);
        assert_eq!(question_name(&a), None, "an answer is not a query");
        for cut in 0..q.len() {
            assert_eq!(question_name(&q[..cut]), None, "cut at {cut}");
        }
        let mut two = q.clone();
        two[5] = 2;
        assert_eq!(question_name(&two), None, "two questions");
        let mut pointer = q.clone();
        pointer[12] = 0xc0;
        assert_eq!(question_name(&pointer), None, "compression in a question");
    }

    #[test]
    fn truncated_or_lying_answers_are_errors() {
        let q = query(7, "a.example.com").unwrap();
        let a = answer(&q, Some(&["192.0.2.1".parse().unwrap()]));
        for cut in 0..a.len() {
            assert!(
                matches!(parse_answer(&a[..cut], 7), Err(_) | Ok(None)),
                "cut at {cut}"
            );
        }
        let mut lying = a.clone();
        lying[7] = 200; // 200 answers claimed
        assert!(parse_answer(&lying, 7).is_err());
    }

    #[test]
    fn udp_resolver_against_a_local_server() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let known = buf[..n].windows(5).any(|w| w == b"known");
                let ips = ["198.18.0.2".parse().unwrap()];
                let reply = answer(&buf[..n], known.then_some(&ips[..]));
                server.send_to(&reply, from).unwrap();
            }
        });
        let r = UdpResolver {
            server: addr,
            timeout: Duration::from_secs(2),
        };
        assert_eq!(
            r.resolve("known.example.com").unwrap(),
            vec!["198.18.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            r.resolve("other.example.com").unwrap(),
            Vec::<Ipv4Addr>::new()
        );
    }
}
