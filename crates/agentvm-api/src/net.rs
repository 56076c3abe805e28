//! Network value types used in manifests: IPv4 CIDR blocks and port ranges.

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network in CIDR notation, such as `192.168.101.0/24`.
///
/// Parsing accepts host bits (`192.168.101.1/24`) so that validation can
/// point at the exact mistake; [`Ipv4Cidr::has_host_bits`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix_len: u8,
}

/// Why a string is not an IPv4 CIDR block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The `/prefix` part is missing.
    #[error(
        "`{0}` is not a CIDR block: add a prefix length, e.g. `{0}/24` (or `/32` for one address)"
    )]
    MissingPrefix(String),
    /// The address part is not a dotted-quad IPv4 address.
    #[error("`{0}` is not a CIDR block: `{1}` is not an IPv4 address (IPv6 is not supported); write e.g. `10.0.0.0/8`")]
    BadAddress(String, String),
    /// The prefix length is not a number in 0..=32.
    #[error("`{0}` is not a CIDR block: the prefix length must be a number from 0 to 32")]
    BadPrefix(String),
}

impl Ipv4Cidr {
    /// Builds a CIDR block from an address and prefix length (0..=32).
    pub fn new(addr: Ipv4Addr, prefix_len: u8) -> Result<Self, CidrError> {
        if prefix_len > 32 {
            return Err(CidrError::BadPrefix(format!("{addr}/{prefix_len}")));
        }
        Ok(Self { addr, prefix_len })
    }

    /// The address as written (may have host bits set).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length, 0..=32.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The netmask, e.g. `255.255.255.0` for `/24`.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    fn mask_bits(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask_bits())
    }

    /// The broadcast address (host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask_bits())
    }

    /// True when the address has bits set outside the prefix.
    pub fn has_host_bits(&self) -> bool {
        self.addr != self.network()
    }

    /// The same block with host bits cleared (`192.168.1.7/24` -> `192.168.1.0/24`).
    pub fn normalized(&self) -> Self {
        Self {
            addr: self.network(),
            prefix_len: self.prefix_len,
        }
    }

    /// True when `ip` lies inside this block.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask_bits() == u32::from(self.addr) & self.mask_bits()
    }

    /// The `n`th address of the block counted from the network address
    /// (`nth(1)` is the conventional gateway); `None` past the end.
    pub fn nth(&self, n: u32) -> Option<Ipv4Addr> {
        let size = self.size();
        if u64::from(n) >= size {
            return None;
        }
        Some(Ipv4Addr::from(u32::from(self.network()) + n))
    }

    /// Number of addresses in the block (2^(32 - prefix)).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((addr, prefix)) = s.split_once('/') else {
            return Err(CidrError::MissingPrefix(s.to_string()));
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(s.to_string(), addr.to_string()))?;
        if prefix.is_empty() || prefix.len() > 2 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::BadPrefix(s.to_string()));
        }
        let prefix_len: u8 = prefix
            .parse()
            .map_err(|_| CidrError::BadPrefix(s.to_string()))?;
        if prefix_len > 32 {
            return Err(CidrError::BadPrefix(s.to_string()));
        }
        Ok(Self { addr, prefix_len })
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CidrVisitor;
        impl Visitor<'_> for CidrVisitor {
            type Value = Ipv4Cidr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an IPv4 CIDR block such as `10.0.0.0/8`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ipv4Cidr, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(CidrVisitor)
    }
}

impl JsonSchema for Ipv4Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Ipv4Cidr".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "An IPv4 network in CIDR notation, e.g. `192.168.101.0/24`.",
            "type": "string",
            "pattern": r"^[0-9]{1,3}(\.[0-9]{1,3}){3}/[0-9]{1,2}$"
        })
    }
}

/// One TCP/UDP port or an inclusive range of ports.
///
/// Written in YAML as a number (`443`) or a string (`"8000-8100"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    /// First port of the range.
    pub start: u16,
    /// Last port of the range (inclusive); equal to `start` for one port.
    pub end: u16,
}

/// Why a value is not a port or port range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a port or port range: write a number from 1 to 65535 (e.g. `443`) or a range such as `\"8000-8100\"`")]
pub struct PortRangeError(pub String);

impl PortRange {
    /// A single port.
    pub const fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    /// An inclusive range (not checked; see validation).
    pub const fn range(start: u16, end: u16) -> Self {
        Self { start, end }
    }

    /// True when the range covers exactly one port.
    pub fn is_single(&self) -> bool {
        self.start == self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

fn parse_port(s: &str) -> Option<u16> {
    let s = s.trim();
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PortRangeError(s.to_string());
        match s.split_once('-') {
            Some((a, b)) => Ok(Self {
                start: parse_port(a).ok_or_else(err)?,
                end: parse_port(b).ok_or_else(err)?,
            }),
            None => parse_port(s).map(Self::single).ok_or_else(err),
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.is_single() {
            serializer.serialize_u16(self.start)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number (e.g. 443) or a range string (e.g. \"8000-8100\")")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(PortRange::single)
                    .map_err(|_| E::custom(PortRangeError(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(PortRange::single)
                    .map_err(|_| E::custom(PortRangeError(v.to_string())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(PortVisitor)
    }
}

impl JsonSchema for PortRange {
    fn schema_name() -> Cow<'static, str> {
        "PortRange".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A port (1-65535) or an inclusive range written as a string, e.g. \"8000-8100\".",
            "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string", "pattern": "^[0-9]{1,5}(-[0-9]{1,5})?$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parse_and_math() {
        let c: Ipv4Cidr = "192.168.101.0/24".parse().unwrap();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(192, 168, 101, 255));
        assert_eq!(c.nth(1), Some(Ipv4Addr::new(192, 168, 101, 1)));
        assert_eq!(c.nth(256), None);
        assert!(c.contains(Ipv4Addr::new(192, 168, 101, 77)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 102, 1)));
        assert!(!c.has_host_bits());
        let h: Ipv4Cidr = "10.1.2.3/8".parse().unwrap();
        assert!(h.has_host_bits());
        assert_eq!(h.normalized().to_string(), "10.0.0.0/8");
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(all.size(), 1 << 32);
    }

    #[test]
    fn cidr_errors() {
        assert!(matches!(
            "10.0.0.0".parse::<Ipv4Cidr>(),
            Err(CidrError::MissingPrefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/33".parse::<Ipv4Cidr>(),
            Err(CidrError::BadPrefix(_))
        ));
        assert!(matches!(
            "10.0.0.0/-1".parse::<Ipv4Cidr>(),
            Err(CidrError::BadPrefix(_))
        ));
        assert!(matches!(
            "10.0.0.256/8".parse::<Ipv4Cidr>(),
            Err(CidrError::BadAddress(..))
        ));
        assert!(matches!(
            "::1/128".parse::<Ipv4Cidr>(),
            Err(CidrError::BadAddress(..))
        ));
    }

    #[test]
    fn ports() {
        assert_eq!("443".parse::<PortRange>().unwrap(), PortRange::single(443));
        assert_eq!(
            "8000-8100".parse::<PortRange>().unwrap(),
            PortRange::range(8000, 8100)
        );
        assert!("70000".parse::<PortRange>().is_err());
        assert!("a-b".parse::<PortRange>().is_err());
        assert!("1-2-3".parse::<PortRange>().is_err());
        assert_eq!(serde_json::to_string(&PortRange::single(22)).unwrap(), "22");
        assert_eq!(
            serde_json::to_string(&PortRange::range(1, 2)).unwrap(),
            "\"1-2\""
        );
        let p: Vec<PortRange> = serde_yaml::from_str("[22, \"80\", \"8000-8100\"]").unwrap();
        assert_eq!(
            p,
            vec![
                PortRange::single(22),
                PortRange::single(80),
                PortRange::range(8000, 8100)
            ]
        );
        assert!(serde_yaml::from_str::<PortRange>("-5").is_err());
        assert!(serde_yaml::from_str::<PortRange>("65536").is_err());
    }
}
