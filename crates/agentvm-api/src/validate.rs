//! Validation of objects as pure functions: every error names the field and the fix.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use crate::kind::closest;
use crate::kinds::agent_run::{self, AgentRunSpec};
use crate::kinds::image::{self, ImageSpec};
use crate::kinds::network::{self, NetworkSpec};
use crate::kinds::network_filter::{self, NetworkFilterSpec};
use crate::kinds::sandbox::{self, SandboxSpec};
use crate::kinds::vm_pool::{self, PoolNetworkMode, Profile, VmPoolSpec};
use crate::{Resource, API_VERSION};

/// One step of a [`FieldPath`]: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSegment {
    /// A mapping key, e.g. `spec`.
    Key(String),
    /// A list index, e.g. `[0]`.
    Index(usize),
}

/// Where a value lives in an object, e.g. `spec.egress[0].ports[1]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<PathSegment>);

impl FieldPath {
    /// The object itself (displayed as `.`).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Key(key.into()));
        Self(segments)
    }

    /// This path extended by a list index.
    pub fn index(&self, index: usize) -> Self {
        let mut segments = self.0.clone();
        segments.push(PathSegment::Index(index));
        Self(segments)
    }

    /// The steps from the object's root.
    pub fn segments(&self) -> &[PathSegment] {
        &self.0
    }

    /// Parses the display form (`spec.egress[0].ports`, `metadata.labels["a.b/c"]`).
    pub fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix("[\"") {
                if let Some(end) = after.find("\"]") {
                    segments.push(PathSegment::Key(after[..end].to_string()));
                    rest = &after[end + 2..];
                    continue;
                }
            }
            if let Some(after) = rest.strip_prefix('[') {
                if let Some(end) = after.find(']') {
                    if let Ok(i) = after[..end].parse() {
                        segments.push(PathSegment::Index(i));
                        rest = &after[end + 1..];
                        continue;
                    }
                }
            }
            let rest_trimmed = rest.strip_prefix('.').unwrap_or(rest);
            let end = rest_trimmed.find(['.', '[']).unwrap_or(rest_trimmed.len());
            if end > 0 {
                segments.push(PathSegment::Key(rest_trimmed[..end].to_string()));
            }
            rest = &rest_trimmed[end..];
            if end == 0 && !rest.is_empty() && !rest.starts_with('[') {
                rest = &rest[1..];
            } else if end == 0 && rest.starts_with('[') && !rest.starts_with("[\"") {
                // Malformed index: keep it as a key so parsing terminates.
                let close = rest.find(']').map_or(rest.len(), |i| i + 1);
                segments.push(PathSegment::Key(rest[..close].to_string()));
                rest = &rest[close..];
            }
        }
        Self(segments)
    }
}

fn is_plain_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(key) if is_plain_key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    f.write_str(key)?;
                }
                PathSegment::Key(key) => write!(f, "[{key:?}]")?,
                PathSegment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// One problem with an object: the field and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ValidationError {
    /// The offending field.
    pub path: FieldPath,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Every problem found in one object (never empty when returned as an error).
pub type ValidationErrors = crate::errors::ErrorList<ValidationError>;

/// Checks one object against every rule of its kind. Pure: looks at
/// nothing but the object (references to other objects are checked for
/// syntax only; whether they exist is the controller's business).
pub fn validate(resource: &Resource) -> Result<(), ValidationErrors> {
    let mut v = Validator::default();
    let root = FieldPath::root();
    if resource.api_version() != API_VERSION {
        v.error(
            root.key("apiVersion"),
            format!(
                "{} is not supported; use `{API_VERSION}`",
                show(resource.api_version())
            ),
        );
    }
    if resource.kind_field() != resource.kind().as_str() {
        v.error(
            root.key("kind"),
            format!(
                "{} does not match the object; use `{}`",
                show(resource.kind_field()),
                resource.kind()
            ),
        );
    }
    let meta = resource.metadata();
    let mpath = root.key("metadata");
    v.dns_label(&mpath.key("name"), &meta.name, "name");
    v.labels(&mpath.key("labels"), &meta.labels);
    v.annotations(&mpath.key("annotations"), &meta.annotations);
    let spec = root.key("spec");
    match resource {
        Resource::Network(o) => v.network(&spec, &o.spec),
        Resource::NetworkFilter(o) => v.network_filter(&spec, &o.spec),
        Resource::Image(o) => v.image(&spec, &o.spec),
        Resource::VmPool(o) => v.vm_pool(&spec, &o.spec),
        Resource::Sandbox(o) => v.sandbox(&spec, &o.spec),
        Resource::Snapshot(o) => {
            v.dns_label(&spec.key("sandboxRef"), &o.spec.sandbox_ref, "Sandbox name")
        }
        Resource::AgentRun(o) => v.agent_run(&spec, &o.spec),
    }
    if v.errors.is_empty() {
        Ok(())
    } else {
        Err(crate::errors::ErrorList(v.errors))
    }
}

/// Checks a pool's disk against the image it boots, which [`validate`] cannot (it sees one
/// object): every VM's disk is a copy-on-write overlay on the image, so `diskGib` (the
/// profile's or the custom one) must be at least the image's `diskSizeMib`. The error points
/// at `spec.template.resources.diskGib` (or `.profile` for a preset).
pub fn validate_pool_disk(
    pool: &VmPoolSpec,
    image_name: &str,
    image: &ImageSpec,
) -> Result<(), ValidationErrors> {
    let Some(message) = pool_disk_too_small(pool, image_name, image) else {
        return Ok(());
    };
    let rp = FieldPath::root()
        .key("spec")
        .key("template")
        .key("resources");
    let path = match pool.template.resources.profile {
        Profile::Custom => rp.key("diskGib"),
        _ => rp.key("profile"),
    };
    Err(crate::errors::ErrorList(vec![ValidationError {
        path,
        message,
    }]))
}

/// Why a pool's disk does not fit its image (see [`validate_pool_disk`]), or `None` when it
/// does.
pub fn pool_disk_too_small(
    pool: &VmPoolSpec,
    image_name: &str,
    image: &ImageSpec,
) -> Option<String> {
    let r = &pool.template.resources;
    let disk_gib = r.resolved().disk_gib;
    let image_mib = u64::from(image.disk_size_mib);
    if u64::from(disk_gib) * 1024 >= image_mib {
        return None;
    }
    let need = image_mib.div_ceil(1024);
    let what = match r.profile {
        Profile::Custom => format!("{disk_gib} GiB"),
        p => format!("profile `{}` has {disk_gib} GiB of disk, which", p.as_str()),
    };
    Some(format!(
        "{what} is smaller than Image {}'s disk ({image_mib} MiB): a VM's disk is an overlay on its image; use a disk of at least {need} GiB (`profile: custom` with `diskGib: {need}`) or a smaller `diskSizeMib` in the Image",
        show(image_name)
    ))
}

/// Checks a name against the Kubernetes DNS-label rules: 1 to 63
/// characters, lowercase ASCII letters, digits and `-`, starting and ending
/// with a letter or digit. Such names are also safe in XML, file paths and
/// libvirt object names.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A DNS label close to `name` (lowercased, invalid characters replaced by
/// `-`, trimmed, at most 63 characters), or `None` if nothing is left.
pub fn suggest_dns_label(name: &str) -> Option<String> {
    let mut out = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(63).collect();
    while out.ends_with('-') {
        out.pop();
    }
    (!out.is_empty()).then_some(out)
}

/// Shows a user value in a message: backticks, control characters escaped,
/// long values shortened.
pub(crate) fn show(value: &str) -> String {
    let mut escaped = String::new();
    for c in value.chars() {
        if c.is_control() {
            escaped.extend(c.escape_debug());
        } else {
            escaped.push(c);
        }
    }
    let quoted = if escaped.contains('`') {
        format!("{value:?}")
    } else {
        format!("`{escaped}`")
    };
    if quoted.chars().count() > 72 {
        let head: String = quoted.chars().take(40).collect();
        format!("{head}…` ({} characters)", value.chars().count())
    } else {
        quoted
    }
}

/// An RFC 3339 time such as `2026-12-31T18:00:00Z`.
pub fn is_rfc3339(text: &str) -> bool {
    humantime::parse_rfc3339_weak(text).is_ok()
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_label_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(is_dns_label)
}

fn is_label_key(key: &str) -> bool {
    match key.split_once('/') {
        Some((prefix, name)) => is_dns_subdomain(prefix) && is_label_name(name),
        None => is_label_name(key),
    }
}

fn is_debian_package(spec: &str) -> bool {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let name_ok = name.len() >= 2
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        });
    let version_ok = version.is_none_or(is_debian_version);
    name_ok && version_ok
}

fn is_debian_version(v: &str) -> bool {
    !v.is_empty()
        && v.as_bytes()[0].is_ascii_digit()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'~' | b':' | b'-'))
}

fn git_url_ok(url: &str) -> bool {
    if url.starts_with('-') || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    for scheme in ["https://", "http://", "ssh://", "git://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            return rest.len() > 1 && !rest.starts_with('/');
        }
    }
    // scp-like: user@host:path
    match url.split_once(':') {
        Some((user_host, path)) => {
            !path.is_empty()
                && !user_host.contains('/')
                && user_host
                    .split_once('@')
                    .is_some_and(|(user, host)| !user.is_empty() && !host.is_empty())
        }
        None => false,
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<ValidationError>,
}

impl Validator {
    fn error(&mut self, path: FieldPath, message: impl Into<String>) {
        self.errors.push(ValidationError {
            path,
            message: message.into(),
        });
    }

    fn dns_label(&mut self, path: &FieldPath, name: &str, what: &str) {
        if is_dns_label(name) {
            return;
        }
        if name.is_empty() {
            self.error(
                path.clone(),
                format!(
                    "is empty; a {what} uses lowercase letters, digits and '-', e.g. `sandbox`"
                ),
            );
            return;
        }
        let length = name.chars().count();
        let mut message = if length > 63 {
            format!(
                "{} is {length} characters long; a {what} has at most 63 characters",
                show(name)
            )
        } else {
            format!(
                "{} is not a valid {what}: use lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
                show(name)
            )
        };
        if let Some(suggestion) = suggest_dns_label(name) {
            if suggestion != name {
                message.push_str(&format!(" (e.g. `{suggestion}`)"));
            }
        }
        self.error(path.clone(), message);
    }

    fn range(&mut self, path: FieldPath, value: u32, (min, max): (u32, u32), hint: &str) {
        if value < min {
            self.error(path, format!("{value} is below the minimum {min}{hint}"));
        } else if value > max {
            self.error(path, format!("{value} is above the maximum {max}{hint}"));
        }
    }

    fn no_nul(&mut self, path: FieldPath, value: &str) -> bool {
        if value.contains('\0') {
            self.error(path, "contains a NUL character; remove it");
            false
        } else {
            true
        }
    }

    fn non_empty(&mut self, path: FieldPath, value: &str, hint: &str) -> bool {
        if value.trim().is_empty() {
            self.error(path, format!("is empty; {hint}"));
            false
        } else {
            self.no_nul(path, value)
        }
    }

    fn guest_path(&mut self, path: FieldPath, value: &str) {
        if !value.starts_with('/') {
            self.error(
                path,
                format!(
                    "{} is not an absolute guest path; start it with `/`, e.g. `/workspace/{}`",
                    show(value),
                    value.trim_start_matches("./")
                ),
            );
        } else if value.split('/').any(|c| c == "..") {
            self.error(
                path,
                format!(
                    "{} contains `..`; write the absolute path without `..`",
                    show(value)
                ),
            );
        } else if value.len() > 4096 {
            self.error(
                path,
                format!(
                    "is {} bytes long; guest paths are at most 4096 bytes",
                    value.len()
                ),
            );
        } else {
            self.no_nul(path, value);
        }
    }

    fn host_path(&mut self, path: FieldPath, value: &std::path::Path) {
        let text = value.to_string_lossy();
        if text.is_empty() {
            self.error(path, "is empty; give a host path");
        } else {
            self.no_nul(path, &text);
        }
    }

    fn inline_size(&mut self, path: FieldPath, value: &str) {
        if value.len() > agent_run::MAX_INLINE_BYTES {
            self.error(
                path,
                format!(
                    "is {} bytes; inline content is limited to {} bytes (1 MiB): put the content in a host file and use `fromFile`, or a workspace",
                    value.len(),
                    agent_run::MAX_INLINE_BYTES
                ),
            );
        }
    }

    fn labels(&mut self, path: &FieldPath, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            let p = path.key(key.clone());
            if !is_label_key(key) {
                self.error(p.clone(), format!("{} is not a valid label key: use an optional DNS prefix and `/`, then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (e.g. `app.example.com/team`)", show(key)));
            }
            if !value.is_empty() && !is_label_name(value) {
                self.error(p, format!("{} is not a valid label value: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (put free text in annotations)", show(value)));
            }
        }
    }

    fn annotations(&mut self, path: &FieldPath, annotations: &BTreeMap<String, String>) {
        let mut total = 0;
        for (key, value) in annotations {
            total += key.len() + value.len();
            if !is_label_key(key) {
                self.error(path.key(key.clone()), format!("{} is not a valid annotation key: use an optional DNS prefix and `/`, then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", show(key)));
            }
        }
        if total > 256 * 1024 {
            self.error(
                path.clone(),
                format!("annotations total {total} bytes; the limit is 262144 bytes (256 KiB)"),
            );
        }
    }

    fn network(&mut self, path: &FieldPath, spec: &NetworkSpec) {
        let subnet = spec.subnet;
        let sp = path.key("subnet");
        if subnet.prefix_len() < network::MIN_SUBNET_PREFIX
            || subnet.prefix_len() > network::MAX_SUBNET_PREFIX
        {
            self.error(
                sp.clone(),
                format!(
                    "prefix /{} is out of range; use a prefix from /{} to /{}, e.g. `192.168.101.0/24`",
                    subnet.prefix_len(),
                    network::MIN_SUBNET_PREFIX,
                    network::MAX_SUBNET_PREFIX
                ),
            );
            return;
        }
        if subnet.has_host_bits() {
            self.error(
                sp,
                format!(
                    "`{subnet}` has host bits set; write the network address `{}`",
                    subnet.normalized()
                ),
            );
            return;
        }
        let Some(dhcp) = spec.dhcp else { return };
        let dp = path.key("dhcp");
        let gateway = spec.gateway();
        let first = subnet.nth(2).unwrap_or(gateway);
        let last = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
        let mut ok = true;
        for (field, addr) in [("start", dhcp.start), ("end", dhcp.end)] {
            let p = dp.key(field);
            let problem = if !subnet.contains(addr) {
                Some(format!("{addr} is outside the subnet {subnet}"))
            } else if addr == subnet.network() {
                Some(format!("{addr} is the subnet's network address"))
            } else if addr == gateway {
                Some(format!(
                    "{addr} is the gateway (the host's address on the network)"
                ))
            } else if addr == subnet.broadcast() {
                Some(format!("{addr} is the broadcast address"))
            } else {
                None
            };
            if let Some(problem) = problem {
                ok = false;
                self.error(
                    p,
                    format!("{problem}; pick an address from {first} to {last}"),
                );
            }
        }
        if ok && u32::from(dhcp.start) > u32::from(dhcp.end) {
            self.error(
                dp,
                format!("start {} is after end {}; swap them", dhcp.start, dhcp.end),
            );
        }
    }

    fn network_filter(&mut self, path: &FieldPath, spec: &NetworkFilterSpec) {
        let ep = path.key("egress");
        if spec.egress.len() > network_filter::MAX_EGRESS_RULES {
            self.error(
                ep.clone(),
                format!(
                    "{} rules; a filter holds at most {} (use port ranges and CIDRs to combine rules)",
                    spec.egress.len(),
                    network_filter::MAX_EGRESS_RULES
                ),
            );
        }
        let domains: usize = spec.egress.iter().map(|r| r.domains.len()).sum();
        if domains > network_filter::MAX_DOMAINS {
            self.error(
                ep.clone(),
                format!(
                    "{domains} domain names; a filter holds at most {} (use `*.` wildcards to combine names)",
                    network_filter::MAX_DOMAINS
                ),
            );
        }
        for (i, rule) in spec.egress.iter().enumerate() {
            let rp = ep.index(i);
            if !rule.domains.is_empty() {
                if rule.protocol != network_filter::Protocol::Tcp {
                    self.error(
                        rp.key("protocol"),
                        format!(
                            "`{}` with `domains`; domain rules are tcp only (names are read from TLS SNI or the HTTP Host header)",
                            rule.protocol.as_str()
                        ),
                    );
                }
                if !rule.destinations.is_empty() {
                    self.error(
                        rp.key("destinations"),
                        "cannot be combined with `domains` (the proxy checks that the address belongs to the name); put addresses in a rule of their own",
                    );
                }
                for (j, d) in rule.domains.iter().enumerate() {
                    if let Some(problem) = network_filter::domain_pattern_problem(d) {
                        self.error(rp.key("domains").index(j), problem);
                    }
                }
            }
            if !rule.protocol.has_ports() && !rule.ports.is_empty() {
                self.error(
                    rp.key("ports"),
                    format!(
                        "ports only apply to tcp and udp, not `{}`; remove `ports` or change `protocol`",
                        rule.protocol.as_str()
                    ),
                );
            } else {
                for (j, port) in rule.ports.iter().enumerate() {
                    let pp = rp.key("ports").index(j);
                    if port.start == 0 || port.end == 0 {
                        self.error(pp, "port 0 is not a valid port; use 1 to 65535");
                    } else if port.start > port.end {
                        self.error(
                            pp,
                            format!(
                                "range {}-{} is reversed; write \"{}-{}\"",
                                port.start, port.end, port.end, port.start
                            ),
                        );
                    }
                }
            }
            for (j, cidr) in rule.destinations.iter().enumerate() {
                if cidr.has_host_bits() {
                    self.error(
                        rp.key("destinations").index(j),
                        format!(
                            "`{cidr}` has host bits set; write `{}` (the network) or `{}/32` (one address)",
                            cidr.normalized(),
                            cidr.addr()
                        ),
                    );
                }
            }
            if let Some(d) = &rule.description {
                if d.len() > 1024 {
                    self.error(
                        rp.key("description"),
                        "is longer than 1024 bytes; shorten it",
                    );
                }
            }
        }
    }

    fn image(&mut self, path: &FieldPath, spec: &ImageSpec) {
        if !image::KNOWN_DEBIAN_SUITES.contains(&spec.suite.as_str()) {
            let hint = closest(&spec.suite, image::KNOWN_DEBIAN_SUITES.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            self.error(
                path.key("suite"),
                format!(
                    "{} is not a known Debian suite{hint}; use one of {}",
                    show(&spec.suite),
                    image::KNOWN_DEBIAN_SUITES.join(", ")
                ),
            );
        }
        for (i, package) in spec.packages.iter().enumerate() {
            if !is_debian_package(package) {
                self.error(
                    path.key("packages").index(i),
                    format!("{} is not a Debian package name: use lowercase letters, digits, '+', '-' and '.', optionally `=version` (e.g. `python3` or `git=1:2.39.5-0+deb12u1`)", show(package)),
                );
            }
        }
        for (i, command) in spec.setup_commands.iter().enumerate() {
            self.non_empty(
                path.key("setupCommands").index(i),
                command,
                "remove it or write a shell command",
            );
        }
        self.range(
            path.key("diskSizeMib"),
            spec.disk_size_mib,
            (image::MIN_DISK_SIZE_MIB, image::MAX_DISK_SIZE_MIB),
            "",
        );
        if let Some(mirror) = &spec.mirror {
            let ok = (mirror.starts_with("http://") || mirror.starts_with("https://"))
                && !mirror.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                self.error(
                    path.key("mirror"),
                    format!(
                        "{} is not an http(s) URL; write e.g. `http://deb.debian.org/debian`",
                        show(mirror)
                    ),
                );
            }
        }
    }

    fn vm_pool(&mut self, path: &FieldPath, spec: &VmPoolSpec) {
        let tp = path.key("template");
        let t = &spec.template;
        self.dns_label(&tp.key("imageRef"), &t.image_ref, "Image name");

        let rp = tp.key("resources");
        let r = &t.resources;
        let custom = [
            ("vcpu", r.vcpu),
            ("memoryMib", r.memory_mib),
            ("diskGib", r.disk_gib),
        ];
        match r.profile.preset() {
            Some((vcpu, mem, disk)) => {
                for (field, value) in custom {
                    if value.is_some() {
                        self.error(
                            rp.key(field),
                            format!(
                                "only allowed with `profile: custom` (profile `{}` is {vcpu} vCPU, {mem} MiB, {disk} GiB); set `profile: custom` with vcpu, memoryMib and diskGib, or remove {field}",
                                r.profile.as_str()
                            ),
                        );
                    }
                }
            }
            None => {
                let units = [
                    ("vcpu", "the number of vCPUs, e.g. 2"),
                    ("memoryMib", "the memory in MiB, e.g. 2048"),
                    ("diskGib", "the disk size in GiB, e.g. 20"),
                ];
                for ((field, value), (_, example)) in custom.into_iter().zip(units) {
                    if value.is_none() {
                        self.error(
                            rp.key(field),
                            format!("required with `profile: custom`; set {example}"),
                        );
                    }
                }
            }
        }
        debug_assert_eq!(Profile::Custom.preset(), None);
        if let Some(vcpu) = r.vcpu {
            self.range(rp.key("vcpu"), vcpu, vm_pool::VCPU_RANGE, "");
        }
        if let Some(mem) = r.memory_mib {
            self.range(rp.key("memoryMib"), mem, vm_pool::MEMORY_MIB_RANGE, "");
        }
        if let Some(disk) = r.disk_gib {
            self.range(rp.key("diskGib"), disk, vm_pool::DISK_GIB_RANGE, "");
        }
        if let Some(shares) = r.cpu_shares {
            self.range(rp.key("cpuShares"), shares, vm_pool::CPU_SHARES_RANGE, "");
        }
        if let Some(quota) = r.cpu_quota_percent {
            self.range(
                rp.key("cpuQuotaPercent"),
                quota,
                vm_pool::CPU_QUOTA_PERCENT_RANGE,
                " (percent of one host CPU per vCPU)",
            );
        }
        if let Some(limit) = r.memory_hard_limit_mib {
            let least = r
                .resolved()
                .memory_mib
                .saturating_add(vm_pool::MEMORY_HARD_LIMIT_HEADROOM_MIB);
            if limit < least {
                self.error(
                    rp.key("memoryHardLimitMib"),
                    format!("{limit} leaves QEMU no room above the guest's memory: it limits the whole QEMU process, so use at least memoryMib + {} = {least} (the guest's memory plus QEMU's own; under TCG also its translation cache), or remove it", vm_pool::MEMORY_HARD_LIMIT_HEADROOM_MIB),
                );
            } else {
                self.range(
                    rp.key("memoryHardLimitMib"),
                    limit,
                    (least, vm_pool::MAX_MEMORY_HARD_LIMIT_MIB),
                    "",
                );
            }
        }
        for (field, value, range) in [
            (
                "diskReadMibPerSecond",
                r.disk_read_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            (
                "diskWriteMibPerSecond",
                r.disk_write_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            ("diskIops", r.disk_iops, vm_pool::DISK_IOPS_RANGE),
            (
                "netInMibPerSecond",
                r.net_in_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
            (
                "netOutMibPerSecond",
                r.net_out_mib_per_second,
                vm_pool::IO_MIB_PER_SECOND_RANGE,
            ),
        ] {
            if let Some(v) = value {
                self.range(rp.key(field), v, range, " (0 means no limit)");
            }
        }

        let np = tp.key("network");
        let n = &t.network;
        match n.mode {
            PoolNetworkMode::Isolated => {
                for (field, value) in [("networkRef", &n.network_ref), ("filterRef", &n.filter_ref)]
                {
                    if value.is_some() {
                        self.error(
                            np.key(field),
                            format!("not allowed with `mode: isolated` (no network interface); set `mode: attached` to connect the VMs, or remove {field}"),
                        );
                    }
                }
            }
            PoolNetworkMode::Attached => {
                for (field, value, kind) in [
                    ("networkRef", &n.network_ref, "Network"),
                    ("filterRef", &n.filter_ref, "NetworkFilter"),
                ] {
                    match value {
                        Some(name) => self.dns_label(&np.key(field), name, &format!("{kind} name")),
                        None => self.error(
                            np.key(field),
                            format!("required with `mode: attached`; name the {kind} to use (or use `mode: isolated` for no network)"),
                        ),
                    }
                }
            }
        }

        for (i, step) in t.warmup.iter().enumerate() {
            let wp = tp.key("warmup").index(i);
            self.non_empty(
                wp.key("run"),
                &step.run,
                "write a shell command or remove the step",
            );
            if let Some(name) = &step.name {
                self.no_nul(wp.key("name"), name);
            }
            self.range(
                wp.key("timeoutSeconds"),
                step.timeout_seconds,
                (1, vm_pool::MAX_WARMUP_TIMEOUT_SECONDS),
                "",
            );
        }

        self.range(
            path.key("maxSize"),
            spec.max_size,
            (1, vm_pool::MAX_POOL_SIZE),
            "",
        );
        if spec.min_ready > spec.max_size && spec.max_size >= 1 {
            self.error(
                path.key("minReady"),
                format!(
                    "{} is greater than maxSize {}; lower minReady or raise maxSize",
                    spec.min_ready, spec.max_size
                ),
            );
        }
        self.range(
            path.key("ttlSeconds"),
            spec.ttl_seconds,
            vm_pool::TTL_SECONDS_RANGE,
            "",
        );
        self.range(
            path.key("healthCheckSeconds"),
            spec.health_check_seconds,
            vm_pool::HEALTH_CHECK_SECONDS_RANGE,
            "",
        );
        let ap = path.key("anomalies");
        let a = &spec.anomalies;
        for (field, value, range) in [
            ("cpuPercent", a.cpu_percent, vm_pool::ANOMALY_PERCENT_RANGE),
            (
                "cpuSustainedSamples",
                a.cpu_sustained_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
            (
                "diskWriteMibPerSecond",
                a.disk_write_mib_per_second,
                vm_pool::ANOMALY_MIB_PER_SECOND_RANGE,
            ),
            (
                "netTxMibPerSecond",
                a.net_tx_mib_per_second,
                vm_pool::ANOMALY_MIB_PER_SECOND_RANGE,
            ),
            (
                "rateWindowSamples",
                a.rate_window_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
            (
                "memoryPercent",
                a.memory_percent,
                vm_pool::ANOMALY_PERCENT_RANGE,
            ),
            (
                "maxProcesses",
                a.max_processes,
                vm_pool::ANOMALY_MAX_PROCESSES_RANGE,
            ),
            ("zScore", a.z_score, vm_pool::ANOMALY_Z_SCORE_RANGE),
            (
                "baselineSamples",
                a.baseline_samples,
                vm_pool::ANOMALY_SAMPLES_RANGE,
            ),
        ] {
            self.range(ap.key(field), value, range, "");
        }
    }

    fn sandbox(&mut self, path: &FieldPath, spec: &SandboxSpec) {
        match (spec.pool_ref.is_empty(), &spec.from_snapshot) {
            (true, None) => self.error(
                path.key("poolRef"),
                "where does its VM come from? set `poolRef` (a VmPool: a warm VM is taken) or `fromSnapshot` (a Snapshot: a fork of it)",
            ),
            (false, Some(_)) => self.error(
                path.key("fromSnapshot"),
                "`poolRef` and `fromSnapshot` are both set; keep exactly one of them",
            ),
            (false, None) => self.dns_label(&path.key("poolRef"), &spec.pool_ref, "VmPool name"),
            (true, Some(snap)) => self.dns_label(&path.key("fromSnapshot"), snap, "Snapshot name"),
        }
        let range = (sandbox::MIN_LIFETIME_SECONDS, sandbox::MAX_LIFETIME_SECONDS);
        if spec.idle_timeout_seconds != 0 {
            self.range(
                path.key("idleTimeoutSeconds"),
                spec.idle_timeout_seconds,
                range,
                "; 0 means never",
            );
        }
        if let Some(ttl) = spec.ttl_seconds {
            self.range(
                path.key("ttlSeconds"),
                ttl,
                range,
                "; leave it out for no limit",
            );
        }
        self.range(
            path.key("maxSnapshots"),
            spec.max_snapshots,
            sandbox::MAX_SNAPSHOTS_RANGE,
            "",
        );
        if let Some(mib) = spec.max_snapshot_mib {
            self.range(
                path.key("maxSnapshotMib"),
                mib,
                sandbox::MAX_SNAPSHOT_MIB_RANGE,
                "; leave it out for no limit",
            );
        }
        if let Some(r) = &spec.rollback {
            let rp = path.key("rollback");
            self.dns_label(&rp.key("snapshot"), &r.snapshot, "Snapshot name");
            if !is_rfc3339(&r.requested_at) {
                self.error(
                    rp.key("requestedAt"),
                    format!("{} is not an RFC 3339 time", show(&r.requested_at)),
                );
            }
        }
        if let Some(t) = &spec.shutdown_time {
            if !is_rfc3339(t) {
                self.error(
                    path.key("shutdownTime"),
                    format!(
                        "{} is not an RFC 3339 time; write e.g. `2026-12-31T18:00:00Z`",
                        show(t)
                    ),
                );
            }
        }
    }

    fn agent_run(&mut self, path: &FieldPath, spec: &AgentRunSpec) {
        match (spec.pool_ref.is_empty(), &spec.sandbox_ref) {
            (true, None) => self.error(
                path.key("poolRef"),
                "where should it run? set `poolRef` (a VmPool: a fresh VM, reset after) or `sandboxRef` (a Sandbox: kept)",
            ),
            (false, Some(_)) => self.error(
                path.key("sandboxRef"),
                "`poolRef` and `sandboxRef` are both set; keep exactly one of them",
            ),
            (false, None) => self.dns_label(&path.key("poolRef"), &spec.pool_ref, "VmPool name"),
            (true, Some(s)) => self.dns_label(&path.key("sandboxRef"), s, "Sandbox name"),
        }
        match (&spec.script, &spec.command) {
            (None, None) => self.error(
                path.clone(),
                "nothing to run; set exactly one of `script` (source + interpreter) or `command` (program + args)",
            ),
            (Some(_), Some(_)) => self.error(
                path.key("command"),
                "`script` and `command` are both set; keep exactly one of them",
            ),
            _ => {}
        }
        if let Some(script) = &spec.script {
            let sp = path.key("script");
            let interp = &script.interpreter;
            if interp.is_empty() || interp.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.error(
                    sp.key("interpreter"),
                    format!("{} is not a program name: give one word such as `python3`, `bash` or `/usr/bin/node` (use `command` for arguments)", show(interp)),
                );
            }
            if self.non_empty(sp.key("source"), &script.source, "write the program to run") {
                self.inline_size(sp.key("source"), &script.source);
            }
        }
        if let Some(command) = &spec.command {
            let cp = path.key("command");
            self.non_empty(
                cp.key("program"),
                &command.program,
                "name the program to run, e.g. `claude`",
            );
            for (i, arg) in command.args.iter().enumerate() {
                self.no_nul(cp.key("args").index(i), arg);
            }
        }

        let envp = path.key("env");
        for (name, value) in &spec.env {
            if !is_env_name(name) {
                self.error(envp.key(name.clone()), format!("{} is not a valid environment variable name: use letters, digits and '_', not starting with a digit", show(name)));
            }
            self.no_nul(envp.key(name.clone()), value);
        }
        let mut secret_names = BTreeSet::new();
        for (i, secret) in spec.secret_env.iter().enumerate() {
            let sp = path.key("secretEnv").index(i);
            if !is_env_name(&secret.name) {
                self.error(sp.key("name"), format!("{} is not a valid environment variable name: use letters, digits and '_', not starting with a digit", show(&secret.name)));
            } else if spec.env.contains_key(&secret.name) {
                self.error(
                    sp.key("name"),
                    format!("`{}` is also set in `env`; remove one of them", secret.name),
                );
            } else if !secret_names.insert(secret.name.as_str()) {
                self.error(
                    sp.key("name"),
                    format!("`{}` is listed twice; remove one", secret.name),
                );
            }
            match (&secret.from_env, &secret.from_file) {
                (None, None) => self.error(
                    sp.clone(),
                    "no value source; set `fromEnv` (a host environment variable) or `fromFile` (a host file)",
                ),
                (Some(_), Some(_)) => self.error(sp.key("fromFile"), "`fromEnv` and `fromFile` are both set; keep one"),
                (Some(var), None) => {
                    if !is_env_name(var) {
                        self.error(sp.key("fromEnv"), format!("{} is not a valid environment variable name", show(var)));
                    }
                }
                (None, Some(file)) => self.host_path(sp.key("fromFile"), file),
            }
        }

        let mut file_paths = BTreeSet::new();
        for (i, file) in spec.files.iter().enumerate() {
            let fp = path.key("files").index(i);
            self.guest_path(fp.key("path"), &file.path);
            if file.path.ends_with('/') {
                self.error(
                    fp.key("path"),
                    format!(
                        "{} ends with `/`; give the file's full path",
                        show(&file.path)
                    ),
                );
            }
            if !file_paths.insert(file.path.as_str()) {
                self.error(
                    fp.key("path"),
                    format!(
                        "{} is written by an earlier entry too; remove one",
                        show(&file.path)
                    ),
                );
            }
            match (&file.content, &file.from_file) {
                (None, None) => self.error(
                    fp.clone(),
                    "no content; set `content` (inline text) or `fromFile` (a host file)",
                ),
                (Some(_), Some(_)) => self.error(
                    fp.key("fromFile"),
                    "`content` and `fromFile` are both set; keep one",
                ),
                (Some(content), None) => {
                    self.inline_size(fp.key("content"), content);
                }
                (None, Some(host)) => self.host_path(fp.key("fromFile"), host),
            }
            if file.mode_bits().is_none() || !(3..=4).contains(&file.mode.len()) {
                self.error(
                    fp.key("mode"),
                    format!(
                        "{} is not an octal file mode; write it quoted, e.g. \"0644\" or \"0755\"",
                        show(&file.mode)
                    ),
                );
            }
        }

        if let Some(ws) = &spec.workspace {
            let wp = path.key("workspace");
            match (&ws.host_path, &ws.git_url) {
                (None, None) => self.error(
                    wp.clone(),
                    "no source; set `hostPath` (a host directory) or `gitUrl` (a repository)",
                ),
                (Some(_), Some(_)) => self.error(
                    wp.key("gitUrl"),
                    "`hostPath` and `gitUrl` are both set; keep one",
                ),
                (Some(host), None) => self.host_path(wp.key("hostPath"), host),
                (None, Some(url)) => {
                    if !git_url_ok(url) {
                        self.error(wp.key("gitUrl"), format!("{} is not a git URL; use https://, http://, ssh://, git:// or user@host:path", show(url)));
                    }
                }
            }
            if let Some(git_ref) = &ws.git_ref {
                if ws.git_url.is_none() {
                    self.error(wp.key("gitRef"), "only applies with `gitUrl`; remove it");
                } else if git_ref.is_empty()
                    || git_ref.starts_with('-')
                    || git_ref.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    self.error(
                        wp.key("gitRef"),
                        format!("{} is not a branch, tag or commit name", show(git_ref)),
                    );
                }
            }
            self.guest_path(wp.key("path"), &ws.path);
            if ws.path.trim_end_matches('/').is_empty() && ws.path.starts_with('/') {
                self.error(
                    wp.key("path"),
                    "`/` is the guest's root directory; use a subdirectory such as /workspace",
                );
            }
        }
        if let Some(dir) = &spec.working_dir {
            self.guest_path(path.key("workingDir"), dir);
        }
        if let Some(artifacts) = &spec.artifacts {
            let ap = path.key("artifacts");
            if artifacts.paths.is_empty() {
                self.error(
                    ap.key("paths"),
                    "is empty; list guest paths to collect, or remove `artifacts`",
                );
            }
            for (i, p) in artifacts.paths.iter().enumerate() {
                self.guest_path(ap.key("paths").index(i), p);
            }
            self.range(
                ap.key("maxSizeMib"),
                artifacts.max_size_mib,
                (1, agent_run::MAX_ARTIFACTS_MAX_SIZE_MIB),
                "",
            );
        }
        self.range(
            path.key("timeoutSeconds"),
            spec.timeout_seconds,
            (1, agent_run::MAX_TIMEOUT_SECONDS),
            if spec.timeout_seconds > agent_run::MAX_TIMEOUT_SECONDS {
                " (one hour); split the work into several runs"
            } else {
                ""
            },
        );
        self.range(
            path.key("output").key("maxMib"),
            spec.output.max_mib,
            (1, agent_run::MAX_OUTPUT_MAX_MIB),
            if spec.output.max_mib > agent_run::MAX_OUTPUT_MAX_MIB {
                " per stream; write big results to a file and collect it as an artifact"
            } else {
                ""
            },
        );
    }
}
