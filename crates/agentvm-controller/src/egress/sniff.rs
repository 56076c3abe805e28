//! Reading the destination name a guest's connection asks for from its first bytes: the
//! server name (SNI) of a TLS ClientHello, or the `Host` header of an HTTP/1 request.
//! Pure functions on untrusted bytes: every length is checked against what was received.

/// Most bytes read from a guest before the name must be known.
pub const MAX_SNIFF_BYTES: usize = 16 * 1024;

/// TLS extension `server_name`.
const EXT_SERVER_NAME: u16 = 0x0000;
/// TLS extension `encrypted_client_hello` (draft-ietf-tls-esni).
const EXT_ECH: u16 = 0xfe0d;

/// What the first bytes of a connection say about where it is going.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A TLS ClientHello with this server name (`None`: no SNI extension).
    Tls {
        /// The SNI host name, as sent (not yet validated as a DNS name).
        sni: Option<String>,
        /// The hello carries an encrypted ClientHello (ECH): the real name is hidden.
        ech: bool,
    },
    /// An HTTP/1 request with this `Host` header (port removed).
    Http {
        /// The host, as sent (not yet validated as a DNS name).
        host: String,
    },
    /// Neither (or malformed): the connection is refused.
    Unrecognised(&'static str),
}

/// Looks at the bytes received so far.
pub fn sniff(buf: &[u8]) -> Sniffed {
    match buf.first() {
        None => Sniffed::NeedMore,
        Some(0x16) => sniff_tls(buf),
        Some(b) if b.is_ascii_uppercase() => sniff_http(buf),
        Some(_) => Sniffed::Unrecognised("neither TLS nor HTTP"),
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
}

/// Concatenates the payloads of the leading TLS handshake records (a ClientHello may span
/// several; a record cut short contributes what arrived). Fails on a record that is not a
/// handshake record or has an impossible length.
fn handshake_bytes(buf: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::new();
    let mut c = Cursor { buf, pos: 0 };
    loop {
        let Some(header) = c.take(5) else {
            return Ok(out);
        };
        if header[0] != 0x16 {
            return Err("TLS record that is not a handshake before the ClientHello ended");
        }
        if header[1] != 3 {
            return Err("not a TLS record version");
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len == 0 || len > 16384 {
            return Err("TLS record length out of range");
        }
        match c.take(len) {
            Some(payload) => out.extend_from_slice(payload),
            None => {
                let rest = &buf[c.pos..];
                out.extend_from_slice(rest);
                return Ok(out);
            }
        }
        if c.pos == buf.len() {
            return Ok(out);
        }
    }
}

fn sniff_tls(buf: &[u8]) -> Sniffed {
    let hs = match handshake_bytes(buf) {
        Ok(x) => x,
        Err(e) => return Sniffed::Unrecognised(e),
    };
    let mut c = Cursor { buf: &hs, pos: 0 };
    let (Some(kind), Some(len)) = (c.u8(), c.u24()) else {
        return Sniffed::NeedMore;
    };
    if kind != 1 {
        return Sniffed::Unrecognised("TLS handshake that is not a ClientHello");
    }
    if len + 4 > MAX_SNIFF_BYTES {
        return Sniffed::Unrecognised("ClientHello larger than the proxy reads");
    }
    let Some(body) = c.take(len) else {
        return Sniffed::NeedMore;
    };
    parse_client_hello(body).unwrap_or(Sniffed::Unrecognised("malformed ClientHello"))
}

fn parse_client_hello(body: &[u8]) -> Option<Sniffed> {
    let mut c = Cursor { buf: body, pos: 0 };
    c.take(2 + 32)?; // version, random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    if c.pos == body.len() {
        return Some(Sniffed::Tls {
            sni: None,
            ech: false,
        });
    }
    let ext_len = c.u16()?;
    let exts = c.take(ext_len)?;
    let mut e = Cursor { buf: exts, pos: 0 };
    let mut sni = None;
    let mut ech = false;
    let mut seen_sni = false;
    while e.pos < exts.len() {
        let kind = e.u16()? as u16;
        let len = e.u16()?;
        let data = e.take(len)?;
        match kind {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Some(Sniffed::Unrecognised("two server_name extensions"));
                }
                seen_sni = true;
                let mut s = Cursor { buf: data, pos: 0 };
                let list = s.u16()?;
                let list = s.take(list)?;
                let mut l = Cursor { buf: list, pos: 0 };
                while l.pos < list.len() {
                    let name_type = l.u8()?;
                    let n = l.u16()?;
                    let name = l.take(n)?;
                    if name_type == 0 {
                        if sni.is_some() {
                            return Some(Sniffed::Unrecognised("two host names in SNI"));
                        }
                        sni = Some(String::from_utf8(name.to_vec()).ok()?);
                    }
                }
            }
            EXT_ECH => ech = true,
            _ => {}
        }
    }
    Some(Sniffed::Tls { sni, ech })
}

fn sniff_http(buf: &[u8]) -> Sniffed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_SNIFF_BYTES {
            Sniffed::Unrecognised("HTTP request head larger than the proxy reads")
        } else {
            Sniffed::NeedMore
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Sniffed::Unrecognised("HTTP request head is not UTF-8");
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or_default();
    let mut parts = request.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Sniffed::Unrecognised("malformed HTTP request line");
    };
    if !version.starts_with("HTTP/1.") || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Sniffed::Unrecognised("malformed HTTP request line");
    }
    if method == "CONNECT" || !target.starts_with('/') {
        return Sniffed::Unrecognised(
            "HTTP request target is not a path (proxy requests are not taken here)",
        );
    }
    let mut host = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Sniffed::Unrecognised("malformed HTTP header");
        };
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Sniffed::Unrecognised("two Host headers");
            }
            host = Some(value.trim());
        }
    }
    let Some(host) = host else {
        return Sniffed::Unrecognised("HTTP request without a Host header");
    };
    // `name` or `name:port`; a bracketed IPv6 literal stays as it is (and is refused later).
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        match host.split_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host,
        }
    };
    Sniffed::Http {
        host: name.to_string(),
    }
}

/// Builds a TLS ClientHello record (for tests): `sni` as the server name, optionally an ECH
/// extension.
#[cfg(test)]
pub fn client_hello(sni: Option<&str>, ech: bool) -> Vec<u8> {
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        let mut entry = vec![0u8];
        entry.extend((n.len() as u16).to_be_bytes());
        entry.extend(n);
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        exts.extend(0u16.to_be_bytes());
        exts.extend((data.len() as u16).to_be_bytes());
        exts.extend(data);
    }
    if ech {
        exts.extend(EXT_ECH.to_be_bytes());
        exts.extend(4u16.to_be_bytes());
        exts.extend([0, 1, 2, 3]);
    }
    let mut body = vec![3, 3];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend(2u16.to_be_bytes());
    body.extend([0x13, 0x01]);
    body.extend([1, 0]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_server_name_ech_and_missing_sni() {
        let hello = client_hello(Some("api.example.com"), false);
        assert_eq!(
            sniff(&hello),
            Sniffed::Tls {
                sni: Some("api.example.com".into()),
                ech: false
            }
        );
        for cut in [1, 5, 9, hello.len() - 1] {
            assert_eq!(sniff(&hello[..cut]), Sniffed::NeedMore, "cut at {cut}");
        }
        assert_eq!(
            sniff(&client_hello(None, false)),
            Sniffed::Tls {
                sni: None,
                ech: false
            }
        );
        assert_eq!(
            sniff(&client_hello(Some("public.example.com"), true)),
            Sniffed::Tls {
                sni: Some("public.example.com".into()),
                ech: true
            }
        );
    }

    #[test]
    fn a_hello_split_over_two_records_is_joined() {
        let hello = client_hello(Some("split.example.com"), false);
        let hs = &hello[5..];
        let (a, b) = hs.split_at(20);
        let mut two = vec![0x16, 3, 1];
        two.extend((a.len() as u16).to_be_bytes());
        two.extend(a);
        assert_eq!(sniff(&two), Sniffed::NeedMore);
        two.extend([0x16, 3, 1]);
        two.extend((b.len() as u16).to_be_bytes());
        two.extend(b);
        assert_eq!(
            sniff(&two),
            Sniffed::Tls {
                sni: Some("split.example.com".into()),
                ech: false
            }
        );
    }

    #[test]
    fn lying_lengths_are_refused_not_trusted() {
        let mut hello = client_hello(Some("a.example.com"), false);
        // Extension block length claims more than the hello holds.
        let ext_len_at = 5 + 4 + 2 + 32 + 1 + 2 + 2 + 2;
        hello[ext_len_at] = 0xff;
        assert!(matches!(sniff(&hello), Sniffed::Unrecognised(_)));
        assert!(matches!(
            sniff(&[0x16, 3, 1, 0, 0]),
            Sniffed::Unrecognised(_)
        ));
        assert!(matches!(
            sniff(&[0x16, 3, 1, 0xff, 0xff, 1]),
            Sniffed::Unrecognised(_)
        ));
        assert!(matches!(
            sniff(b"\x00\x01garbage"),
            Sniffed::Unrecognised(_)
        ));
    }

    #[test]
    fn http_host_header() {
        assert_eq!(
            sniff(b"GET /x HTTP/1.1\r\nHost: pypi.org:80\r\nAccept: */*\r\n\r\n"),
            Sniffed::Http {
                host: "pypi.org".into()
            }
        );
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nhost:  Example.com \r\n\r\n"),
            Sniffed::Http {
                host: "Example.com".into()
            }
        );
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: a"), Sniffed::NeedMore);
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a.com\r\nHost: b.com\r\n\r\n",
            b"GET http://b.com/ HTTP/1.1\r\nHost: a.com\r\n\r\n",
            b"CONNECT b.com:443 HTTP/1.1\r\nHost: b.com\r\n\r\n",
            b"GET / HTTP/2\r\nHost: a.com\r\n\r\n",
        ] {
            assert!(
                matches!(sniff(bad), Sniffed::Unrecognised(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
            Sniffed::Http {
                host: "[::1]".into()
            }
        );
        assert_eq!(
            sniff(&[b'G'; MAX_SNIFF_BYTES]),
            Sniffed::Unrecognised("HTTP request head larger than the proxy reads")
        );
    }
}
