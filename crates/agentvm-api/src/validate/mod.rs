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

mod agent_runs;
mod images;
mod networks;
mod sandboxes;
mod vm_pools;

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
    template_disk_too_small(&pool.template, image_name, image)
}

/// Why the disk of VMs made from `template` does not fit its image (every VM's disk is an
/// overlay on it), or `None` when it does.
pub fn template_disk_too_small(
    template: &crate::VmTemplate,
    image_name: &str,
    image: &ImageSpec,
) -> Option<String> {
    let r = &template.resources;
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
}
