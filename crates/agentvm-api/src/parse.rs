//! Reading manifests: multi-document YAML from strings, files, directories
//! and stdin, decoded, validated, and every error pinned to `file:line:column`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::kind::{closest, UnknownKind};
use crate::validate::{show, FieldPath, PathSegment, ValidationError};
use crate::{validate, Kind, Resource, API_VERSION};

/// Largest manifest source accepted (file, stdin or string): 4 MiB.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The path that means "read standard input".
pub const STDIN_PATH: &str = "-";

/// Name used for standard input in error messages.
pub const STDIN_NAME: &str = "<stdin>";

/// Where an object was declared.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceLocation {
    /// File name as given (or `<stdin>`, or the name passed to [`parse_str`]).
    pub file: String,
    /// 1-based line of the document's first key.
    pub line: usize,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A decoded, validated object and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResource {
    /// The object; `status` and `metadata.generation` are cleared (the
    /// controller owns them).
    pub resource: Resource,
    /// Where it was declared.
    pub source: SourceLocation,
}

impl ParsedResource {
    /// The directory relative host paths in this object are resolved
    /// against: the manifest's directory, or the current directory for
    /// stdin and in-memory sources.
    pub fn manifest_dir(&self) -> PathBuf {
        let file = Path::new(&self.source.file);
        let from_file = (self.source.file != STDIN_NAME && file.is_file())
            .then(|| file.parent().map(Path::to_path_buf))
            .flatten();
        let dir = from_file.unwrap_or_default();
        if dir.as_os_str().is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            std::path::absolute(&dir).unwrap_or(dir)
        }
    }

    /// Resolves relative host paths of an `AgentRun` against
    /// [`ParsedResource::manifest_dir`], so the object means the same thing
    /// to a controller running elsewhere. Other kinds have no host paths.
    pub fn resolve_host_paths(&mut self) {
        let base = self.manifest_dir();
        if let Resource::AgentRun(run) = &mut self.resource {
            run.spec.resolve_host_paths(&base);
        }
    }
}

/// What is wrong with a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestErrorKind {
    /// The file or stream could not be read.
    #[error("cannot read: {0}")]
    Io(#[source] std::io::Error),
    /// The source exceeds [`MAX_MANIFEST_BYTES`].
    #[error("is {size} bytes; a manifest source may be at most {limit} bytes (4 MiB): split it into several files and move large inline content into host files (`fromFile`)")]
    TooLarge {
        /// Size of the source in bytes (at least, for streams).
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The bytes are not UTF-8.
    #[error("is not valid UTF-8 (byte 0x{byte:02x}); save the file as UTF-8 text")]
    NotUtf8 {
        /// The first offending byte.
        byte: u8,
    },
    /// The source holds no document at all.
    #[error("no manifests found (the source is empty or only has comments); add a manifest or remove the file")]
    NoDocuments,
    /// A document between two `---` separators (or after the last) is empty.
    #[error("empty YAML document (nothing after this `---` separator); remove the extra `---`")]
    EmptyDocument,
    /// The YAML itself is malformed.
    #[error("invalid YAML: {0}")]
    Syntax(String),
    /// The document is a scalar or a list, not a mapping.
    #[error("a manifest must be a mapping with apiVersion, kind, metadata and spec, not {0}")]
    NotAMapping(&'static str),
    /// `apiVersion` or `kind` is missing or not a string.
    #[error("{field}: {problem}; {hint}")]
    BadHeaderField {
        /// `apiVersion` or `kind`.
        field: &'static str,
        /// `missing` or `must be a string`.
        problem: &'static str,
        /// What to write.
        hint: String,
    },
    /// `apiVersion` is not `agentvm.dev/v1alpha1`.
    #[error("apiVersion: {} is not supported; use `{API_VERSION}`", show(found))]
    UnsupportedApiVersion {
        /// What the manifest says.
        found: String,
    },
    /// `kind` names no known kind.
    #[error("kind: {0}")]
    UnknownKind(UnknownKind),
    /// The document does not match its kind's schema (unknown field, wrong
    /// type, missing required field).
    #[error("{}{message}", path.as_ref().map(|p| format!("{p}: ")).unwrap_or_default())]
    Decode {
        /// Field path, when known.
        path: Option<String>,
        /// What is wrong and, where possible, the fix.
        message: String,
    },
    /// The object decoded but breaks a validation rule.
    #[error("{0}")]
    Invalid(ValidationError),
    /// Two documents declare the same kind and name.
    #[error("metadata.name: {kind} `{name}` is already declared at {first}; names must be unique per kind, rename one of them")]
    Duplicate {
        /// The kind.
        kind: Kind,
        /// The name.
        name: String,
        /// Where the first declaration is.
        first: SourceLocation,
    },
}

/// One problem in a manifest source, with its position.
#[derive(Debug, thiserror::Error)]
pub struct ManifestError {
    /// File name as given (or `<stdin>`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    #[source]
    pub kind: ManifestErrorKind,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.kind)
    }
}

impl ManifestError {
    fn new(file: &str, pos: Option<(usize, usize)>, kind: ManifestErrorKind) -> Self {
        Self {
            file: file.to_string(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
            kind,
        }
    }

    /// The field path the error is about, when there is one.
    pub fn field_path(&self) -> Option<String> {
        match &self.kind {
            ManifestErrorKind::Decode { path, .. } => path.clone(),
            ManifestErrorKind::Invalid(e) => Some(e.path.to_string()),
            ManifestErrorKind::UnsupportedApiVersion { .. } => Some("apiVersion".into()),
            ManifestErrorKind::UnknownKind(_) => Some("kind".into()),
            ManifestErrorKind::BadHeaderField { field, .. } => Some((*field).into()),
            ManifestErrorKind::Duplicate { .. } => Some("metadata.name".into()),
            _ => None,
        }
    }
}

/// Every problem found in one parse call (never empty as an error).
pub type ManifestErrors = crate::errors::ErrorList<ManifestError>;

/// Result of parsing: every object, or every error.
pub type ParseResult = Result<Vec<ParsedResource>, ManifestErrors>;

/// Parses every document of `text`; `source` names it in errors.
pub fn parse_str(text: &str, source: &str) -> ParseResult {
    let mut c = Collector::default();
    c.add_str(text, source);
    c.finish()
}

/// Parses every document of `bytes` (must be UTF-8); `source` names it in errors.
pub fn parse_bytes(bytes: &[u8], source: &str) -> ParseResult {
    let mut c = Collector::default();
    c.add_bytes(bytes, source);
    c.finish()
}

/// Parses everything readable from `reader` (at most [`MAX_MANIFEST_BYTES`]).
pub fn parse_reader(reader: impl Read, source: &str) -> ParseResult {
    let mut c = Collector::default();
    c.add_reader(reader, source);
    c.finish()
}

/// Parses one file, whatever its extension.
pub fn parse_file(path: &Path) -> ParseResult {
    let mut c = Collector::default();
    c.add_file(path);
    c.finish()
}

/// Parses every `.yaml`/`.yml` file of a directory in path order (and of
/// its subdirectories when `recursive`). Hidden entries (`.git`, ...) and
/// symlinked directories are skipped. An empty directory gives no objects.
pub fn parse_dir(path: &Path, recursive: bool) -> ParseResult {
    let mut c = Collector::default();
    c.add_dir(path, recursive);
    c.finish()
}

/// Parses `-` (stdin), a directory (see [`parse_dir`]) or a file.
pub fn parse_path(path: &Path, recursive: bool) -> ParseResult {
    parse_paths(&[path], recursive)
}

/// Parses several paths as one set (names must be unique across all of them).
pub fn parse_paths<P: AsRef<Path>>(paths: &[P], recursive: bool) -> ParseResult {
    let mut c = Collector::default();
    for path in paths {
        c.add_path(path.as_ref(), recursive);
    }
    c.finish()
}

/// Lists the manifest files [`parse_dir`] would read, in order.
pub fn manifest_files(dir: &Path, recursive: bool) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    collect_files(dir, recursive, &mut out)?;
    out.sort();
    Ok(out)
}

fn collect_files(dir: &Path, recursive: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            if recursive {
                collect_files(&path, recursive, out)?;
            }
            continue;
        }
        let is_file = file_type.is_file() || (file_type.is_symlink() && path.is_file());
        let is_yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if is_file && is_yaml {
            out.push(path);
        }
    }
    Ok(())
}

#[derive(Default)]
struct Collector {
    resources: Vec<ParsedResource>,
    errors: Vec<ManifestError>,
    seen: BTreeMap<(Kind, String), SourceLocation>,
}

impl Collector {
    fn finish(self) -> ParseResult {
        if self.errors.is_empty() {
            Ok(self.resources)
        } else {
            Err(crate::errors::ErrorList(self.errors))
        }
    }

    fn add_path(&mut self, path: &Path, recursive: bool) {
        if path.as_os_str() == STDIN_PATH {
            self.add_reader(std::io::stdin().lock(), STDIN_NAME);
        } else if path.is_dir() {
            self.add_dir(path, recursive);
        } else {
            self.add_file(path);
        }
    }

    fn add_dir(&mut self, dir: &Path, recursive: bool) {
        match manifest_files(dir, recursive) {
            Ok(files) => {
                for file in files {
                    self.add_file(&file);
                }
            }
            Err(e) => self.errors.push(ManifestError::new(
                &dir.display().to_string(),
                None,
                ManifestErrorKind::Io(e),
            )),
        }
    }

    fn add_file(&mut self, path: &Path) {
        let name = path.display().to_string();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.errors
                    .push(ManifestError::new(&name, None, ManifestErrorKind::Io(e)));
                return;
            }
        };
        if let Ok(meta) = file.metadata() {
            if meta.len() > MAX_MANIFEST_BYTES as u64 {
                self.errors.push(ManifestError::new(
                    &name,
                    None,
                    ManifestErrorKind::TooLarge {
                        size: meta.len(),
                        limit: MAX_MANIFEST_BYTES,
                    },
                ));
                return;
            }
        }
        self.add_reader(file, &name);
    }

    fn add_reader(&mut self, reader: impl Read, source: &str) {
        let mut bytes = Vec::new();
        match reader
            .take(MAX_MANIFEST_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
        {
            Ok(_) => self.add_bytes(&bytes, source),
            Err(e) => self
                .errors
                .push(ManifestError::new(source, None, ManifestErrorKind::Io(e))),
        }
    }

    fn add_bytes(&mut self, bytes: &[u8], source: &str) {
        if bytes.len() > MAX_MANIFEST_BYTES {
            self.errors.push(ManifestError::new(
                source,
                None,
                ManifestErrorKind::TooLarge {
                    size: bytes.len() as u64,
                    limit: MAX_MANIFEST_BYTES,
                },
            ));
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(text) => self.add_str(text, source),
            Err(e) => {
                let valid = &bytes[..e.valid_up_to()];
                // The prefix is valid UTF-8 by definition.
                let prefix = std::str::from_utf8(valid).unwrap_or("");
                let line = prefix.matches('\n').count() + 1;
                let column = prefix.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                self.errors.push(ManifestError::new(
                    source,
                    Some((line, column)),
                    ManifestErrorKind::NotUtf8 {
                        byte: bytes[e.valid_up_to()],
                    },
                ));
            }
        }
    }

    fn add_str(&mut self, text: &str, source: &str) {
        if text.len() > MAX_MANIFEST_BYTES {
            self.errors.push(ManifestError::new(
                source,
                None,
                ManifestErrorKind::TooLarge {
                    size: text.len() as u64,
                    limit: MAX_MANIFEST_BYTES,
                },
            ));
            return;
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let documents = split_documents(text);
        let mut any = false;
        for (i, doc) in documents.iter().enumerate() {
            if is_blank(&doc.text) {
                // Text before a leading `---` (comments, a modeline) is fine.
                if i > 0 {
                    self.errors.push(ManifestError::new(
                        source,
                        Some((doc.separator_line, 1)),
                        ManifestErrorKind::EmptyDocument,
                    ));
                }
                continue;
            }
            any = true;
            match parse_document(&doc.text, doc.first_line, source) {
                Ok(parsed) => self.accept(parsed, &doc.text, doc.first_line),
                Err(errors) => self.errors.extend(errors),
            }
        }
        if !any && !documents.iter().skip(1).any(|d| is_blank(&d.text)) {
            self.errors.push(ManifestError::new(
                source,
                None,
                ManifestErrorKind::NoDocuments,
            ));
        }
    }

    fn accept(&mut self, parsed: ParsedResource, text: &str, first_line: usize) {
        let key = (parsed.resource.kind(), parsed.resource.name().to_string());
        if let Some(first) = self.seen.get(&key) {
            let pos = locate(
                text,
                &FieldPath::root().key("metadata").key("name"),
                first_line,
            );
            self.errors.push(ManifestError::new(
                &parsed.source.file,
                Some(pos),
                ManifestErrorKind::Duplicate {
                    kind: key.0,
                    name: key.1,
                    first: first.clone(),
                },
            ));
            return;
        }
        self.seen.insert(key, parsed.source.clone());
        self.resources.push(parsed);
    }
}

struct Document {
    /// 1-based line number of the document's first line.
    first_line: usize,
    /// Line of the `---` that opened it (0 for the first document).
    separator_line: usize,
    text: String,
}

/// Splits a stream at lines that start with `---` (followed by nothing, a
/// space or a tab). Content after `--- ` stays in the document (the marker
/// is blanked so columns stay right); `...` end markers become blank lines.
fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = vec![Document {
        first_line: 1,
        separator_line: 0,
        text: String::new(),
    }];
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let number = i + 1;
        let body = line.trim_end_matches(['\n', '\r']);
        let is_separator = body == "---" || body.starts_with("--- ") || body.starts_with("---\t");
        if is_separator {
            let rest = &body[3..];
            let mut doc = Document {
                first_line: number,
                separator_line: number,
                text: String::new(),
            };
            if rest.trim().is_empty() || rest.trim_start().starts_with('#') {
                doc.first_line = number + 1;
            } else {
                doc.text.push_str("   ");
                doc.text.push_str(rest);
                doc.text.push('\n');
            }
            docs.push(doc);
            continue;
        }
        let current = docs.last_mut().expect("docs is never empty");
        if body.trim_end() == "..." {
            current.text.push('\n');
        } else {
            current.text.push_str(line);
        }
    }
    docs
}

fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t.starts_with('%')
    })
}

fn yaml_pos(e: &serde_yaml::Error, first_line: usize) -> Option<(usize, usize)> {
    e.location()
        .map(|l| (l.line() + first_line - 1, l.column()))
}

/// serde_yaml's message without its own ` at line L column C` (we print
/// positions ourselves) and with other line numbers shifted to file lines.
fn yaml_message(e: &serde_yaml::Error, first_line: usize) -> String {
    let mut message = e.to_string();
    if let Some(loc) = e.location() {
        let own = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(i) = message.find(&own) {
            message.replace_range(i..i + own.len(), "");
        }
    }
    shift_line_numbers(&message, first_line - 1)
}

fn shift_line_numbers(message: &str, offset: usize) -> String {
    if offset == 0 {
        return message.to_string();
    }
    let mut out = String::new();
    let mut rest = message;
    while let Some(i) = rest.find("line ") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        let digits = rest.bytes().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            let n: usize = rest[..digits].parse().unwrap_or(0);
            out.push_str(&(n + offset).to_string());
            rest = &rest[digits..];
        }
    }
    out.push_str(rest);
    out
}

/// True when the character at the file position `pos` is a tab.
fn tab_at(text: &str, pos: Option<(usize, usize)>, first_line: usize) -> bool {
    let Some((line, column)) = pos else {
        return false;
    };
    text.lines()
        .nth(line.saturating_sub(first_line))
        .and_then(|l| l.chars().nth(column.saturating_sub(1)))
        == Some('\t')
}

fn parse_document(
    text: &str,
    first_line: usize,
    source: &str,
) -> Result<ParsedResource, Vec<ManifestError>> {
    let err = |pos: Option<(usize, usize)>, kind| vec![ManifestError::new(source, pos, kind)];
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let pos = yaml_pos(&e, first_line).or(Some((first_line, 1)));
        let message = yaml_message(&e, first_line);
        let message = if message.contains("repetition limit exceeded") {
            "too many alias expansions (a \"billion laughs\" alias bomb?); expand fewer aliases"
                .to_string()
        } else if message.contains("recursion limit exceeded") {
            "nesting is too deep (recursion limit exceeded); manifests are never nested this deeply"
                .to_string()
        } else if message.contains("cannot start any token") && tab_at(text, pos, first_line) {
            format!("{message} (a tab: YAML is indented with spaces only)")
        } else {
            message
        };
        err(pos, ManifestErrorKind::Syntax(message))
    })?;
    let root_pos = locate(text, &FieldPath::root(), first_line);
    let mapping = match &value {
        serde_yaml::Value::Mapping(m) => m,
        other => {
            let what = match other {
                serde_yaml::Value::Null => "null",
                serde_yaml::Value::Bool(_) => "a boolean",
                serde_yaml::Value::Number(_) => "a number",
                serde_yaml::Value::String(_) => "a string",
                serde_yaml::Value::Sequence(_) => "a list",
                _ => "a tagged value",
            };
            return Err(err(Some(root_pos), ManifestErrorKind::NotAMapping(what)));
        }
    };

    let mut errors = Vec::new();
    let field_pos = |field: &str| locate(text, &FieldPath::root().key(field), first_line);
    match mapping.get("apiVersion") {
        None => errors.push(ManifestError::new(
            source,
            Some(root_pos),
            ManifestErrorKind::BadHeaderField {
                field: "apiVersion",
                problem: "missing",
                hint: format!("add `apiVersion: {API_VERSION}`"),
            },
        )),
        Some(serde_yaml::Value::String(v)) if v == API_VERSION => {}
        Some(serde_yaml::Value::String(v)) => errors.push(ManifestError::new(
            source,
            Some(field_pos("apiVersion")),
            ManifestErrorKind::UnsupportedApiVersion { found: v.clone() },
        )),
        Some(_) => errors.push(ManifestError::new(
            source,
            Some(field_pos("apiVersion")),
            ManifestErrorKind::BadHeaderField {
                field: "apiVersion",
                problem: "must be a string",
                hint: format!("write `apiVersion: {API_VERSION}`"),
            },
        )),
    }
    let kinds = Kind::ALL.map(|k| k.as_str()).join(", ");
    let kind = match mapping.get("kind") {
        None => {
            errors.push(ManifestError::new(
                source,
                Some(root_pos),
                ManifestErrorKind::BadHeaderField {
                    field: "kind",
                    problem: "missing",
                    hint: format!("add `kind:` with one of {kinds}"),
                },
            ));
            None
        }
        Some(serde_yaml::Value::String(v)) => match Kind::ALL.into_iter().find(|k| k.as_str() == v)
        {
            Some(kind) => Some(kind),
            None => {
                errors.push(ManifestError::new(
                    source,
                    Some(field_pos("kind")),
                    ManifestErrorKind::UnknownKind(UnknownKind {
                        input: v.clone(),
                        suggestion: Kind::suggest(v),
                    }),
                ));
                None
            }
        },
        Some(_) => {
            errors.push(ManifestError::new(
                source,
                Some(field_pos("kind")),
                ManifestErrorKind::BadHeaderField {
                    field: "kind",
                    problem: "must be a string",
                    hint: format!("write one of {kinds}"),
                },
            ));
            None
        }
    };
    let Some(kind) = kind else { return Err(errors) };
    if !errors.is_empty() {
        return Err(errors);
    }

    let decoded: Result<Resource, serde_yaml::Error> = match kind {
        Kind::Network => serde_yaml::from_str(text).map(Resource::Network),
        Kind::NetworkFilter => serde_yaml::from_str(text).map(Resource::NetworkFilter),
        Kind::Image => serde_yaml::from_str(text).map(Resource::Image),
        Kind::VmPool => serde_yaml::from_str(text).map(Resource::VmPool),
        Kind::Sandbox => serde_yaml::from_str(text).map(Resource::Sandbox),
        Kind::Snapshot => serde_yaml::from_str(text).map(Resource::Snapshot),
        Kind::AgentRun => serde_yaml::from_str(text).map(Resource::AgentRun),
    };
    let mut resource = decoded.map_err(|e| {
        let pos = yaml_pos(&e, first_line).or(Some(root_pos));
        let (path, message) = explain_decode_error(&yaml_message(&e, first_line));
        err(pos, ManifestErrorKind::Decode { path, message })
    })?;
    resource.clear_status();
    resource.metadata_mut().generation = 0;

    if let Err(invalid) = validate(&resource) {
        return Err(invalid
            .into_iter()
            .map(|e| {
                let pos = locate(text, &e.path, first_line);
                ManifestError::new(source, Some(pos), ManifestErrorKind::Invalid(e))
            })
            .collect());
    }
    Ok(ParsedResource {
        resource,
        source: SourceLocation {
            file: source.to_string(),
            line: root_pos.0,
        },
    })
}

/// Splits serde's `path: message` and rewrites the common messages into
/// ones that say how to fix them.
fn explain_decode_error(raw: &str) -> (Option<String>, String) {
    // serde_yaml prints `path: message`; paths have no spaces and no `: `.
    let (path, message) = match raw.split_once(": ") {
        Some((p, m)) if !p.contains(' ') && !p.is_empty() => (Some(p.to_string()), m.to_string()),
        _ => (None, raw.to_string()),
    };
    let join = |field: &str| match &path {
        Some(p) => format!("{p}.{field}"),
        None => field.to_string(),
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let valid = backticked(expected);
            let full = join(field);
            if field == "value" && full.contains("secretEnv[") {
                return (
                    Some(full),
                    "secret values never go in manifests; read the value on the host with `fromEnv` (an environment variable) or `fromFile` (a file)".into(),
                );
            }
            if field == "namespace" && full == "metadata.namespace" {
                return (Some(full), "agentvm has no namespaces; remove it".into());
            }
            let fix = match closest(field, valid.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`?"),
                None if valid.is_empty() => "remove it".into(),
                None => format!("valid fields here: {}", valid.join(", ")),
            };
            return (Some(full), format!("unknown field; {fix}"));
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((variant, expected)) = rest.split_once('`') {
            let valid = backticked(expected);
            let fix = match closest(variant, valid.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`? "),
                None => String::new(),
            };
            return (
                path,
                format!(
                    "{} is not a valid value; {fix}valid values: {}",
                    show(variant),
                    valid.join(", ")
                ),
            );
        }
    }
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.strip_suffix('`'))
    {
        return (
            Some(join(field)),
            "required field is missing; add it".into(),
        );
    }
    let message = message
        .replace("expected a map", "expected a mapping (`key: value` lines)")
        .replace("expected a sequence", "expected a list")
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        )
        .replace("expected u16", "expected a whole number from 0 to 65535")
        .replace("expected i64", "expected a whole number")
        .replace("expected i32", "expected a whole number");
    (path, message)
}

/// The backticked words of serde's "expected one of `a`, `b`" tail.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

const LOCATOR_SENTINEL: &str = "\u{0}agentvm-locate\u{0}";

/// The (line, column) in the file of the node at `path` in a document
/// (its key, for a mapping entry), or of the deepest existing ancestor.
/// Uses serde_yaml's own parser, so flow style, quoting and anchors are
/// handled exactly as when decoding.
pub(crate) fn locate(text: &str, path: &FieldPath, first_line: usize) -> (usize, usize) {
    let de = serde_yaml::Deserializer::from_str(text);
    let result = Locate {
        path: path.segments(),
    }
    .deserialize(de);
    match result {
        Err(e) => yaml_pos(&e, first_line).unwrap_or((first_line, 1)),
        Ok(()) => (first_line, 1),
    }
}

struct Locate<'p> {
    path: &'p [PathSegment],
}

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("anything")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((PathSegment::Key(key), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(LOCATOR_SENTINEL));
        };
        while let Some(found) = map.next_key_seed(KeyMatch {
            key,
            last: rest.is_empty(),
        })? {
            if found {
                return map.next_value_seed(Locate { path: rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom(LOCATOR_SENTINEL))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((PathSegment::Index(index), rest)) = self.path.split_first() else {
            return Err(de::Error::custom(LOCATOR_SENTINEL));
        };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(LOCATOR_SENTINEL));
            }
        }
        match seq.next_element_seed(Locate { path: rest })? {
            Some(()) | None => Err(de::Error::custom(LOCATOR_SENTINEL)),
        }
    }
    // Scalars fall through to the default visitor methods, which return an
    // error: serde_yaml stamps it with the scalar's position, which is what
    // we want.
}

/// Deserializes a mapping key: `Ok(true)` if it is the key we look for,
/// or an error (stamped with the key's position) if it is the last step.
struct KeyMatch<'k> {
    key: &'k str,
    last: bool,
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        if v == self.key {
            if self.last {
                Err(E::custom(LOCATOR_SENTINEL))
            } else {
                Ok(true)
            }
        } else {
            Ok(false)
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(text: &str, path: &str) -> (usize, usize) {
        locate(text, &FieldPath::parse(path), 1)
    }

    #[test]
    fn locate_walks_keys_and_indices() {
        let text = "a: 1\nspec:\n  list:\n    - x: 1\n    - {y: 2, z: [5, 6]}\n  other: 'q'\n";
        assert_eq!(loc(text, "a"), (1, 1));
        assert_eq!(loc(text, "spec"), (2, 1));
        assert_eq!(loc(text, "spec.list"), (3, 3));
        assert_eq!(loc(text, "spec.list[0]"), (4, 7));
        assert_eq!(loc(text, "spec.list[0].x"), (4, 7));
        assert_eq!(loc(text, "spec.list[1].z"), (5, 14));
        assert_eq!(loc(text, "spec.list[1].z[1]"), (5, 21));
        assert_eq!(loc(text, "spec.other"), (6, 3));
        // Missing leaf: the parent mapping.
        assert_eq!(loc(text, "spec.missing"), (3, 3));
        assert_eq!(loc(text, "spec.list[7]"), (4, 5));
        assert_eq!(locate(text, &FieldPath::parse("spec.other"), 10), (15, 3));
    }

    #[test]
    fn splits_documents_keeping_lines() {
        let docs = split_documents("# c\n---\na: 1\n---\n\n---   # x\nb: 2\n...\n--- {c: 3}\n");
        let got: Vec<(usize, usize, &str)> = docs
            .iter()
            .map(|d| (d.first_line, d.separator_line, d.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 0, "# c\n"),
                (3, 2, "a: 1\n"),
                (5, 4, "\n"),
                (7, 6, "b: 2\n\n"),
                (9, 9, "    {c: 3}\n"),
            ]
        );
    }

    #[test]
    fn explains_unknown_fields() {
        let (p, m) = explain_decode_error(
            "spec.template.resources: unknown field `memoryMiB`, expected one of `profile`, `vcpu`, `memoryMib`, `diskGib`, `cpuShares`",
        );
        assert_eq!(p.as_deref(), Some("spec.template.resources.memoryMiB"));
        assert_eq!(m, "unknown field; did you mean `memoryMib`?");
        let (p, m) =
            explain_decode_error("unknown field `foo`, expected one of `apiVersion`, `kind`");
        assert_eq!(p.as_deref(), Some("foo"));
        assert_eq!(m, "unknown field; valid fields here: apiVersion, kind");
    }

    #[test]
    fn shifts_line_numbers() {
        assert_eq!(
            shift_line_numbers("x, while parsing a block mapping at line 2 column 1", 10),
            "x, while parsing a block mapping at line 12 column 1"
        );
    }
}
