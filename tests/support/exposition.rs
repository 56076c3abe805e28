//! Shared by the tests that scrape a controller: a parser of the Prometheus text format
//! (version 0.0.4) and a minimal HTTP GET over loopback.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: `# TYPE` of each family and every sample.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the text format (version 0.0.4); panics on a malformed line.
    pub fn parse(text: &str) -> Self {
        let mut out = Exposition::default();
        for line in text.lines() {
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line");
                out.types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples.push(parse_sample(line));
        }
        out
    }

    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels).as_slice() {
            [one] => Some(one.value),
            [] => None,
            many => panic!("{name} {labels:?} matches {} samples", many.len()),
        }
    }
}

pub fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("malformed sample line {line:?}") };
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    let mut name = String::new();
    while i < chars.len()
        && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
    {
        name.push(chars[i]);
        i += 1;
    }
    if name.is_empty() {
        bad();
    }
    let mut labels = BTreeMap::new();
    if chars.get(i) == Some(&'{') {
        i += 1;
        loop {
            match chars.get(i) {
                Some('}') => {
                    i += 1;
                    break;
                }
                Some(',') => i += 1,
                Some(_) => {}
                None => bad(),
            }
            if chars.get(i) == Some(&'}') {
                continue;
            }
            let mut key = String::new();
            while let Some(&c) = chars.get(i).filter(|c| **c != '=') {
                key.push(c);
                i += 1;
            }
            if chars.get(i + 1) != Some(&'"') {
                bad();
            }
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    Some('\\') => {
                        match chars.get(i + 1) {
                            Some('n') => value.push('\n'),
                            Some(&c) => value.push(c),
                            None => bad(),
                        }
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                    None => bad(),
                }
            }
            labels.insert(key, value);
        }
    }
    let rest: String = chars[i..].iter().collect();
    let value = match rest.split_whitespace().next().unwrap_or_else(|| bad()) {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().unwrap_or_else(|_| bad()),
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// `GET path` over loopback: (status, content type, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    // axum answers small bodies with Content-Length; a chunked body is de-chunked here.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, content_type, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").unwrap();
        let size = usize::from_str_radix(size.trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}
