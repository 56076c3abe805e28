//! Artifacts on the host: a fresh directory per run ([`RunDir`]) and the unpacking of the
//! tar a guest made of each declared path into it ([`unpack`]); and the same unpacking for a
//! directory `agentvm cp` copies out of a sandbox ([`unpack_to`], under [`Rules::COPY`]).
//!
//! The archive is made by a guest that is root in its VM and may be hostile, so nothing in
//! it is trusted (GNU `tar -x` run as root would keep its owners, setuid bits, device nodes
//! and links on the host).
//!
//! Guarantees:
//! - Only regular files and directories are created. Symbolic and hard links, character and
//!   block devices, FIFOs and every other entry type are skipped and reported as a
//!   [`Rejection`] naming the entry and why.
//! - Owners, modes (setuid, setgid, sticky), timestamps and extended attributes recorded in
//!   the archive are ignored: files are [`FILE_MODE`] (0640), directories [`DIR_MODE`]
//!   (0750), owned by this process's user and by the group the caller names (else this
//!   process's group).
//! - Nothing lands outside the run directory and nothing on the host is followed: each path
//!   is walked one component at a time from the run directory's descriptor (`openat` with
//!   `O_NOFOLLOW | O_DIRECTORY`), and files are created with `O_CREAT | O_EXCL | O_NOFOLLOW`
//!   (an entry that exists already is rejected, never overwritten). Absolute paths, `..`,
//!   NUL bytes, names over 255 bytes, paths over [`MAX_PATH_BYTES`] and entries outside the
//!   artifact's own top-level name are rejected.
//! - Limits hold while reading, not after ([`Budget`]): the packed bytes read from the
//!   guest, the bytes of files written and the number of entries. GNU long names and PAX
//!   records are read here (the `tar` crate in raw mode: it frames headers and checks their
//!   checksums; it would otherwise read those records whole, of any size the header claims)
//!   and are at most [`MAX_RECORD_BYTES`] each.
//! - An archive that is malformed (bad checksum, truncated, an entry shorter than its header
//!   says) or goes over a limit is refused as a whole ([`ArchiveError`]): what was unpacked
//!   from it is removed.
//! - [`RunDir::create`] never reuses a directory: a later run of the same name gets another.
//! - [`Rules`] loosen two of the above for `agentvm cp`, and only these: permission bits are
//!   kept (`0o777` of them: never setuid, setgid or sticky), and a symbolic link is created
//!   when its target is relative and cannot leave the copied directory (`..` only at its
//!   start, never climbing above the top; links are never followed while unpacking, so an
//!   entry "through" a link is still rejected). [`unpack_to`] refuses the whole archive for
//!   any rejected entry and renames it into place only when all of it was unpacked.
//!
//! Assumptions: the parent of the run directories is not writable by anyone the host does
//! not trust (the controller's `<stateDir>/artifacts`, 0750; for `agentvm run`, a directory
//! of the user's), and nothing but this module writes into a run directory.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Gid, Mode, OFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

/// Mode of every unpacked regular file.
pub const FILE_MODE: u32 = 0o640;
/// Mode of every unpacked directory, of each run directory and of their parent.
pub const DIR_MODE: u32 = 0o750;
/// Entries (of any type, rejected ones included) unpacked per run, over all its paths.
pub const MAX_ENTRIES: u64 = 10_000;
/// Longest entry path, bytes (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;
/// Largest GNU long name or PAX record block, bytes.
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Rejections kept with their details per run; more are only counted.
pub const MAX_REJECTIONS_KEPT: usize = 100;
/// Longest entry name shown in a rejection, characters.
const SHOWN_NAME_CHARS: usize = 200;

/// What is left of a run's artifact allowance; every [`unpack`] takes from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Archive bytes that may still be read from the guest.
    pub packed_bytes: u64,
    /// Bytes of regular files that may still be written on the host.
    pub file_bytes: u64,
    /// Entries that may still be read.
    pub entries: u64,
}

impl Budget {
    /// `max_bytes` packed and unpacked, [`MAX_ENTRIES`] entries.
    pub fn new(max_bytes: u64) -> Self {
        Budget {
            packed_bytes: max_bytes,
            file_bytes: max_bytes,
            entries: MAX_ENTRIES,
        }
    }
}

/// How [`unpack_with`] treats what an archive says beyond names and bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Keep each entry's permission bits (`& 0o777`; directories also get `0o700`, so that
    /// they can be filled) instead of [`FILE_MODE`] and [`DIR_MODE`].
    pub keep_permissions: bool,
    /// Create symbolic links whose target stays inside the artifact (see the module
    /// documentation); others are rejected as [`RejectReason::Symlink`] or
    /// [`RejectReason::SymlinkOutside`].
    pub symlinks_inside: bool,
    /// Deepest entry, in path components (the artifact's own name counts).
    pub max_depth: usize,
}

impl Rules {
    /// Run artifacts: fixed modes, no links, any depth the path length allows.
    pub const ARTIFACTS: Rules = Rules {
        keep_permissions: false,
        symlinks_inside: false,
        max_depth: usize::MAX,
    };
    /// `agentvm cp` out of a sandbox: permissions kept, links inside the copy, at most
    /// [`MAX_COPY_DEPTH`] deep.
    pub const COPY: Rules = Rules {
        keep_permissions: true,
        symlinks_inside: true,
        max_depth: MAX_COPY_DEPTH,
    };
}

/// Deepest entry of a directory `agentvm cp` copies out of a sandbox, path components.
pub const MAX_COPY_DEPTH: usize = 64;

/// Why an entry, or a whole archive, was not unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// A symbolic link (never created on the host).
    Symlink {
        /// Where it points.
        target: String,
    },
    /// A symbolic link whose target is absolute or may lead outside the artifact.
    SymlinkOutside {
        /// Where it points.
        target: String,
    },
    /// More path components than [`Rules::max_depth`].
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// A hard link (never created on the host).
    HardLink {
        /// What it links to.
        target: String,
    },
    /// A character device node.
    CharDevice,
    /// A block device node.
    BlockDevice,
    /// A FIFO.
    Fifo,
    /// Any other entry type (GNU sparse files, volume labels, ...), by its type flag.
    OtherType(u8),
    /// The path starts with `/`.
    Absolute,
    /// The path has a `..` component.
    ParentDir,
    /// The path is not under the artifact's own name.
    OutsideArtifact {
        /// The artifact's name (the declared path's last component).
        artifact: String,
    },
    /// The path cannot be a host path (NUL byte, empty, a name over 255 bytes, too long).
    BadName(&'static str),
    /// An entry of that path was unpacked before (entries are never overwritten).
    Duplicate,
    /// A component of the path is not a directory on the host.
    NotUnderDirectory,
    /// The whole archive was refused; nothing of it was kept.
    Archive(String),
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::Symlink { target } => write!(f, "symbolic link to {target}"),
            RejectReason::SymlinkOutside { target } => {
                write!(f, "symbolic link to {target}, outside the copied directory")
            }
            RejectReason::TooDeep { max } => write!(f, "deeper than {max} directories"),
            RejectReason::HardLink { target } => write!(f, "hard link to {target}"),
            RejectReason::CharDevice => f.write_str("character device"),
            RejectReason::BlockDevice => f.write_str("block device"),
            RejectReason::Fifo => f.write_str("FIFO"),
            RejectReason::OtherType(t) => write!(
                f,
                "unsupported entry type {:?}",
                char::from(*t).escape_default().to_string()
            ),
            RejectReason::Absolute => f.write_str("absolute path"),
            RejectReason::ParentDir => f.write_str("path with `..`"),
            RejectReason::OutsideArtifact { artifact } => {
                write!(f, "outside the artifact's directory {artifact}")
            }
            RejectReason::BadName(why) => write!(f, "unusable name ({why})"),
            RejectReason::Duplicate => f.write_str("duplicate entry (not overwritten)"),
            RejectReason::NotUnderDirectory => f.write_str("a parent is not a directory"),
            RejectReason::Archive(why) => write!(f, "archive refused, nothing kept: {why}"),
        }
    }
}

/// One entry (or archive) not unpacked, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The entry's path in the archive (for a refused archive: the declared guest path),
    /// control characters escaped, cut at 200 characters.
    pub entry: String,
    /// Why.
    pub reason: RejectReason,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.entry, self.reason)
    }
}

/// Why a whole archive was refused (or, for [`ArchiveError::Host`] and
/// [`ArchiveError::Read`], could not be unpacked).
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// More archive bytes than were left of the cap.
    #[error("more than the {cap} bytes left of the size cap")]
    PackedCap {
        /// Bytes that were left.
        cap: u64,
    },
    /// Its files add up to more than was left of the cap.
    #[error("{entry}: its files add up to more than the {cap} bytes left of the size cap")]
    FileCap {
        /// The entry that went over.
        entry: String,
        /// Bytes that were left.
        cap: u64,
    },
    /// More entries than were left of [`MAX_ENTRIES`].
    #[error("more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// The archive ended inside an entry's data.
    #[error(
        "{entry}: the archive ends inside this entry (truncated, or its header's size is wrong)"
    )]
    Truncated {
        /// The entry.
        entry: String,
    },
    /// Not a well-formed tar archive.
    #[error("malformed archive: {0}")]
    Malformed(String),
    /// The host could not create or write something (disk full, ...): not the guest's doing.
    #[error("{path}: {source}")]
    Host {
        /// What was being written.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The archive's source failed (e.g. the guest agent stopped answering).
    #[error("reading the archive: {0}")]
    Read(io::Error),
}

impl ArchiveError {
    /// True when the archive itself is to blame (the guest's doing), false for host-side
    /// and transport failures.
    pub fn is_archive_fault(&self) -> bool {
        !matches!(self, ArchiveError::Host { .. } | ArchiveError::Read(_))
    }
}

/// What one [`unpack`] created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unpacked {
    /// Where the artifact is on the host, when its top-level entry was created.
    pub host_path: Option<PathBuf>,
    /// Bytes of the regular files written.
    pub file_bytes: u64,
    /// sha256 (hex) when the artifact is a single regular file.
    pub sha256: Option<String>,
    /// Regular files created.
    pub files: u64,
    /// Directories created.
    pub dirs: u64,
    /// Symbolic links created (only under [`Rules::symlinks_inside`]).
    pub symlinks: u64,
    /// Entries skipped, in archive order.
    pub rejected: Vec<Rejection>,
}

/// A run's own artifact directory, created empty by [`RunDir::create`], and the names its
/// artifacts took in it.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    fd: OwnedFd,
    gid: Option<Gid>,
    names: HashSet<Vec<u8>>,
}

/// `2026-12-03T10:15:02Z` → `20261203T101502Z`.
fn compact_utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

impl RunDir {
    /// Create `<parent>/<run>-<UTC time>/` (with `-2`, `-3`, ... appended if that exists),
    /// mode [`DIR_MODE`], group `gid` if given. `parent` is created (0750, group `gid`)
    /// when missing. An existing directory is never reused.
    pub fn create(parent: &Path, run: &str, gid: Option<u32>) -> io::Result<RunDir> {
        if run.is_empty() || run.starts_with('.') || run.contains('/') || run.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{run:?} cannot name an artifact directory"),
            ));
        }
        let gid = gid.map(Gid::from_raw);
        if !parent.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(parent)?;
            let fd = open_dir(rustix::fs::CWD, parent)?;
            set_owner_mode(&fd, gid, DIR_MODE)?;
        }
        let base = format!("{run}-{}", compact_utc_now());
        for n in 1..=1000 {
            let name = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            let path = parent.join(&name);
            match std::fs::DirBuilder::new().mode(DIR_MODE).create(&path) {
                Ok(()) => {
                    let fd = open_dir(rustix::fs::CWD, &path)?;
                    set_owner_mode(&fd, gid, DIR_MODE)?;
                    return Ok(RunDir {
                        path,
                        fd,
                        gid,
                        names: HashSet::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{}: no free name for {run}", parent.display()),
        ))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A name for an artifact called `name` in the guest that no earlier artifact of this
    /// run took: `name`, else `name-2`, `name-3`, ...
    fn claim(&mut self, name: &[u8]) -> Vec<u8> {
        let mut n = 1;
        loop {
            let candidate = if n == 1 {
                name.to_vec()
            } else {
                let mut c = name.to_vec();
                c.extend_from_slice(format!("-{n}").as_bytes());
                c
            };
            if self.names.insert(candidate.clone()) {
                return candidate;
            }
            n += 1;
        }
    }

    /// Remove what an archive left at `name` (files and directories only: nothing else is
    /// ever created here).
    fn remove(&self, name: &[u8]) {
        let path = self.path.join(OsStr::from_bytes(name));
        let _ = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(_) => Ok(()),
        };
    }
}

fn open_dir<Fd: AsFd, P: rustix::path::Arg>(at: Fd, path: P) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        at,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn set_owner_mode(fd: &OwnedFd, gid: Option<Gid>, mode: u32) -> io::Result<()> {
    if gid.is_some() {
        rustix::fs::fchown(fd, None, gid)?;
    }
    // Explicit, whatever the umask (the controller's is 0o077).
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// A name for messages: lossy UTF-8, control characters escaped, at most 200 characters.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == SHOWN_NAME_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts the archive bytes read and fails the read that would go over the cap.
struct Counted<'r> {
    inner: &'r mut dyn Read,
    left: u64,
    over: bool,
    failed: bool,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // At the cap: fine if the archive ends here, refused if it goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe) {
                Ok(0) => Ok(0),
                Ok(_) => {
                    self.over = true;
                    Err(io::Error::other("over the size cap"))
                }
                Err(e) => {
                    self.failed = true;
                    Err(e)
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..want]) {
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }
}

/// Why [`unpack_entries`] stopped early: an I/O error of the archive stream (to be told
/// apart by [`Counted`]'s flags), or a decision of ours.
enum Stop {
    Stream(io::Error),
    Refused(ArchiveError),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Stop::Stream(e)
    }
}

/// Unpack the tar stream `source`, the guest's archive of an artifact named `name` (the
/// last component of its declared path), into `dir`, taking from `budget`. Entries must all
/// be `name` or under it; on the host the artifact is `name`, or `name-2`, ... when an
/// earlier artifact of the run took that name. See the module documentation for what is
/// created and what is refused. On an error nothing of this archive is kept.
pub fn unpack(
    source: &mut dyn Read,
    dir: &mut RunDir,
    name: &[u8],
    budget: &mut Budget,
) -> Result<Unpacked, ArchiveError> {
    unpack_with(source, dir, name, budget, &Rules::ARTIFACTS)
}

/// [`unpack`] under `rules`.
pub fn unpack_with(
    source: &mut dyn Read,
    dir: &mut RunDir,
    name: &[u8],
    budget: &mut Budget,
    rules: &Rules,
) -> Result<Unpacked, ArchiveError> {
    let host_name = dir.claim(name);
    let mut counted = Counted {
        inner: source,
        left: budget.packed_bytes,
        over: false,
        failed: false,
    };
    let cap = budget.packed_bytes;
    let mut out = Unpacked::default();
    let result = unpack_entries(&mut counted, dir, name, &host_name, budget, rules, &mut out);
    budget.packed_bytes = counted.left;
    let error = match result {
        Ok(()) => None,
        Err(Stop::Refused(e)) => Some(e),
        Err(Stop::Stream(_)) if counted.over => Some(ArchiveError::PackedCap { cap }),
        Err(Stop::Stream(e)) if counted.failed => Some(ArchiveError::Read(e)),
        Err(Stop::Stream(e)) => Some(ArchiveError::Malformed(e.to_string())),
    };
    match error {
        None => Ok(out),
        Some(e) => {
            dir.remove(&host_name);
            Err(e)
        }
    }
}

/// Why [`unpack_to`] copied nothing.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The archive as a whole was refused, or could not be read or written.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// An entry was refused; the first one and why.
    #[error("{0}")]
    Refused(Rejection),
    /// The destination exists already (nothing is merged into or over it).
    #[error("{}: exists already; remove it or name a new path", .0.display())]
    Exists(PathBuf),
    /// The archive held no directory of the expected name.
    #[error("the archive holds no directory {0}")]
    NoDirectory(String),
    /// The host could not make the temporary directory or rename it into place.
    #[error("{}: {source}", path.display())]
    Host {
        /// What was being made.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Unpack the tar stream of a directory called `name` (all entries `name` or under it) to
/// `dest`, which must not exist, under `rules` and `budget`: into a new hidden directory
/// beside `dest`, renamed to `dest` only when every entry was unpacked. On any error (a
/// refused entry, a cap, a malformed archive) nothing is left at `dest` or beside it.
pub fn unpack_to(
    source: &mut dyn Read,
    dest: &Path,
    name: &[u8],
    budget: &mut Budget,
    rules: &Rules,
) -> Result<Unpacked, CopyError> {
    let host = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CopyError::Host { path, source }
    };
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(CopyError::Exists(dest.to_path_buf()));
    }
    let parent = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let staging = tempfile::Builder::new()
        .prefix(".agentvm-cp-")
        .tempdir_in(parent)
        .map_err(host(parent))?;
    let fd = open_dir(rustix::fs::CWD, staging.path()).map_err(host(staging.path()))?;
    let mut dir = RunDir {
        path: staging.path().to_path_buf(),
        fd,
        gid: None,
        names: HashSet::new(),
    };
    let out = unpack_with(source, &mut dir, name, budget, rules)?;
    if let Some(first) = out.rejected.first() {
        return Err(CopyError::Refused(first.clone()));
    }
    let top = staging.path().join(OsStr::from_bytes(name));
    if !std::fs::symlink_metadata(&top).is_ok_and(|m| m.is_dir()) {
        return Err(CopyError::NoDirectory(shown(name)));
    }
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        &top,
        rustix::fs::CWD,
        dest,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| match e {
        Errno::EXIST => CopyError::Exists(dest.to_path_buf()),
        e => CopyError::Host {
            path: dest.to_path_buf(),
            source: e.into(),
        },
    })?;
    // `staging` (now empty) goes when dropped; its removal failing leaves an empty hidden
    // directory, not a copy.
    Ok(out)
}

/// Reads a GNU long name/link or PAX record block, at most [`MAX_RECORD_BYTES`].
fn read_record(entry: &mut impl Read, size: u64, what: &str) -> Result<Vec<u8>, Stop> {
    if size > MAX_RECORD_BYTES {
        return Err(Stop::Refused(ArchiveError::Malformed(format!(
            "a {what} of {size} bytes (at most {MAX_RECORD_BYTES})"
        ))));
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.take(size).read_to_end(&mut data)?;
    if (data.len() as u64) < size {
        return Err(Stop::Refused(ArchiveError::Truncated {
            entry: format!("({what})"),
        }));
    }
    Ok(data)
}

/// A NUL-terminated record value (GNU long names end with one).
fn until_nul(mut v: Vec<u8>) -> Vec<u8> {
    if let Some(i) = v.iter().position(|b| *b == 0) {
        v.truncate(i);
    }
    v
}

fn unpack_entries(
    source: &mut Counted<'_>,
    dir: &RunDir,
    name: &[u8],
    host_name: &[u8],
    budget: &mut Budget,
    rules: &Rules,
    out: &mut Unpacked,
) -> Result<(), Stop> {
    use tar::EntryType as T;
    let mut archive = tar::Archive::new(source);
    // Long names and PAX records describe the entry that follows them.
    let mut long_path: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    for entry in archive.entries()?.raw(true) {
        let mut entry = entry?;
        let kind = entry.header().entry_type();
        let size = entry.header().entry_size()?;
        match kind {
            T::GNULongName => {
                long_path = Some(until_nul(read_record(&mut entry, size, "GNU long name")?));
                continue;
            }
            T::GNULongLink => {
                long_link = Some(until_nul(read_record(&mut entry, size, "GNU long link")?));
                continue;
            }
            T::XHeader | T::XGlobalHeader => {
                let data = read_record(&mut entry, size, "PAX header")?;
                for ext in tar::PaxExtensions::new(&data) {
                    let ext = ext.map_err(|e| {
                        Stop::Refused(ArchiveError::Malformed(format!("PAX record: {e}")))
                    })?;
                    if kind == T::XGlobalHeader {
                        continue;
                    }
                    match ext.key_bytes() {
                        b"path" => long_path = Some(ext.value_bytes().to_vec()),
                        b"linkpath" => long_link = Some(ext.value_bytes().to_vec()),
                        // Another reader would frame the data by this size: refuse rather
                        // than read the archive differently from it.
                        b"size" => {
                            return Err(Stop::Refused(ArchiveError::Malformed(
                                "a PAX size record (files over 8 GiB are never collected)".into(),
                            )))
                        }
                        _ => {}
                    }
                }
                continue;
            }
            _ => {}
        }
        if budget.entries == 0 {
            return Err(Stop::Refused(ArchiveError::TooManyEntries));
        }
        budget.entries -= 1;
        let path = long_path
            .take()
            .unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let link = long_link
            .take()
            .or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
        let target = || shown(link.as_deref().unwrap_or_default());
        let reject = |out: &mut Unpacked, reason| {
            out.rejected.push(Rejection {
                entry: shown(&path),
                reason,
            })
        };
        let reason = match kind {
            T::Regular | T::Directory => None,
            T::Symlink if rules.symlinks_inside => None,
            T::Symlink => Some(RejectReason::Symlink { target: target() }),
            T::Link => Some(RejectReason::HardLink { target: target() }),
            T::Char => Some(RejectReason::CharDevice),
            T::Block => Some(RejectReason::BlockDevice),
            T::Fifo => Some(RejectReason::Fifo),
            other => Some(RejectReason::OtherType(other.as_byte())),
        };
        if let Some(reason) = reason {
            reject(out, reason);
            continue;
        }
        let components = match components(&path, name) {
            Ok(c) => c,
            Err(reason) => {
                reject(out, reason);
                continue;
            }
        };
        if components.len() > rules.max_depth {
            reject(
                out,
                RejectReason::TooDeep {
                    max: rules.max_depth,
                },
            );
            continue;
        }
        let is_top = components.len() == 1;
        // On the host the first component is the artifact's own (maybe renamed) name.
        let mut host: Vec<&[u8]> = components;
        host[0] = host_name;
        let mode = rules
            .keep_permissions
            .then(|| entry.header().mode().map(|m| m & 0o777))
            .transpose()?;
        let result = if kind == T::Directory {
            make_dirs(dir, &host, out).and_then(|fd| match mode {
                Some(m) => set_owner_mode(&fd, dir.gid, m | 0o700)
                    .map_err(|e| host_error(dir.path.join(OsStr::from_bytes(&path)), e)),
                None => Ok(()),
            })
        } else if kind == T::Symlink {
            let target = link.as_deref().unwrap_or_default();
            if !link_stays_inside(host.len() - 1, target) {
                reject(
                    out,
                    RejectReason::SymlinkOutside {
                        target: shown(target),
                    },
                );
                continue;
            }
            make_link(dir, &host, target, out)
        } else {
            if size > budget.file_bytes {
                return Err(Stop::Refused(ArchiveError::FileCap {
                    entry: shown(&path),
                    cap: budget.file_bytes,
                }));
            }
            budget.file_bytes -= size;
            let file = NewFile {
                entry: &shown(&path),
                size,
                mode: mode.unwrap_or(FILE_MODE),
                is_top,
            };
            write_file(dir, &host, &file, &mut entry, out)
        };
        match result {
            Ok(()) => {}
            Err(Place::Reject(reason)) => reject(out, reason),
            Err(Place::Stop(s)) => return Err(s),
        }
    }
    if long_path.is_some() || long_link.is_some() {
        return Err(Stop::Refused(ArchiveError::Malformed(
            "a long name or PAX record describes no entry".into(),
        )));
    }
    if out.files + out.dirs + out.symlinks > 0 {
        out.host_path = Some(dir.path.join(OsStr::from_bytes(host_name)));
    }
    Ok(())
}

/// The components of an entry's `path`, checked: relative, no `..`, no NUL, under `name`.
fn components<'p>(path: &'p [u8], name: &[u8]) -> Result<Vec<&'p [u8]>, RejectReason> {
    if path.len() > MAX_PATH_BYTES {
        return Err(RejectReason::BadName("path longer than 4096 bytes"));
    }
    if path.starts_with(b"/") {
        return Err(RejectReason::Absolute);
    }
    if path.contains(&0) {
        return Err(RejectReason::BadName("NUL byte"));
    }
    let parts: Vec<&[u8]> = path
        .split(|b| *b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect();
    if parts.contains(&&b".."[..]) {
        return Err(RejectReason::ParentDir);
    }
    if parts.first() != Some(&name) {
        return Err(if parts.is_empty() {
            RejectReason::BadName("empty path")
        } else {
            RejectReason::OutsideArtifact {
                artifact: shown(name),
            }
        });
    }
    if parts.iter().any(|c| c.len() > 255) {
        return Err(RejectReason::BadName("a name longer than 255 bytes"));
    }
    Ok(parts)
}

/// Where placing one entry ended, when not created.
enum Place {
    /// This entry is skipped; the archive goes on.
    Reject(RejectReason),
    /// The archive stops.
    Stop(Stop),
}

/// Classifies a failed `openat`/`mkdirat`: what the archive's names caused rejects the
/// entry; anything else is the host's problem (disk full, ...) and stops.
fn place_error(e: Errno, path: PathBuf) -> Place {
    match e {
        Errno::EXIST => Place::Reject(RejectReason::Duplicate),
        Errno::NOTDIR | Errno::LOOP => Place::Reject(RejectReason::NotUnderDirectory),
        Errno::NAMETOOLONG => Place::Reject(RejectReason::BadName("name too long")),
        Errno::INVAL | Errno::ILSEQ => Place::Reject(RejectReason::BadName("invalid name")),
        other => Place::Stop(Stop::Refused(ArchiveError::Host {
            path,
            source: other.into(),
        })),
    }
}

/// Opens (creating as needed, mode [`DIR_MODE`]) the directories `parts` under `dir`,
/// following nothing; returns the last one's descriptor.
fn make_dirs(dir: &RunDir, parts: &[&[u8]], out: &mut Unpacked) -> Result<OwnedFd, Place> {
    let mut cur = open_dir(&dir.fd, ".").map_err(|e| host_error(dir.path.clone(), e))?;
    let mut at = dir.path.clone();
    for part in parts {
        at.push(OsStr::from_bytes(part));
        let created = match rustix::fs::mkdirat(&cur, *part, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(place_error(e, at)),
        };
        let next = rustix::fs::openat(
            &cur,
            *part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| place_error(e, at.clone()))?;
        if created {
            set_owner_mode(&next, dir.gid, DIR_MODE).map_err(|e| host_error(at.clone(), e))?;
            out.dirs += 1;
        }
        cur = next;
    }
    Ok(cur)
}

fn host_error(path: PathBuf, source: io::Error) -> Place {
    Place::Stop(Stop::Refused(ArchiveError::Host { path, source }))
}

/// True when a link at depth `depth` (components of its parent directory, the artifact's
/// name included) pointing at `target` resolves inside the artifact whatever the links it
/// names resolve to: relative, `..` only before every other component and never more of
/// them than `depth - 1`.
fn link_stays_inside(depth: usize, target: &[u8]) -> bool {
    if target.is_empty() || target.starts_with(b"/") || target.contains(&0) {
        return false;
    }
    let mut ups = 0usize;
    let mut named = false;
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." if named => return false,
            b".." => ups += 1,
            _ => named = true,
        }
    }
    depth >= 1 && ups < depth
}

/// Creates the symbolic link `parts` (its parents as needed) pointing at `target`.
fn make_link(
    dir: &RunDir,
    parts: &[&[u8]],
    target: &[u8],
    out: &mut Unpacked,
) -> Result<(), Place> {
    let (last, parents) = parts.split_last().expect("at least the artifact's name");
    let parent = make_dirs(dir, parents, out)?;
    let mut at = dir.path.clone();
    at.extend(parts.iter().map(|p| OsStr::from_bytes(p)));
    rustix::fs::symlinkat(OsStr::from_bytes(target), &parent, *last)
        .map_err(|e| place_error(e, at))?;
    out.symlinks += 1;
    Ok(())
}

/// A regular file to create: the entry's shown name, its size and mode, and whether it is
/// the artifact itself.
struct NewFile<'a> {
    entry: &'a str,
    size: u64,
    mode: u32,
    is_top: bool,
}

/// Creates the regular file `parts` (its parents as needed) with the `file.size` bytes of
/// `data`.
fn write_file(
    dir: &RunDir,
    parts: &[&[u8]],
    file_spec: &NewFile<'_>,
    data: &mut impl Read,
    out: &mut Unpacked,
) -> Result<(), Place> {
    let NewFile {
        entry,
        size,
        mode,
        is_top,
    } = *file_spec;
    let (last, parents) = parts.split_last().expect("at least the artifact's name");
    let parent = make_dirs(dir, parents, out)?;
    let mut at = dir.path.clone();
    at.extend(parts.iter().map(|p| OsStr::from_bytes(p)));
    let fd = rustix::fs::openat(
        &parent,
        *last,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|e| place_error(e, at.clone()))?;
    set_owner_mode(&fd, dir.gid, mode).map_err(|e| host_error(at.clone(), e))?;
    out.files += 1;
    let mut file = std::fs::File::from(fd);
    let mut hasher = is_top.then(Sha256::new);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = data
            .read(&mut buf[..want])
            .map_err(|e| Place::Stop(Stop::Stream(e)))?;
        if n == 0 {
            return Err(Place::Stop(Stop::Refused(ArchiveError::Truncated {
                entry: entry.to_string(),
            })));
        }
        file.write_all(&buf[..n])
            .map_err(|e| host_error(at.clone(), e))?;
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..n]);
        }
        left -= n as u64;
    }
    out.file_bytes += size;
    if let Some(h) = hasher {
        out.sha256 = Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
