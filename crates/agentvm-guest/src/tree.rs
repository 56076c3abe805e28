//! Directories as tar streams, both ways, for `agentvm cp`: [`pack`] makes the archive of a
//! directory (on the host for a copy into a guest, in the guest for a copy out of it) and
//! [`unpack_new`] makes a new directory from one (in the guest; the host unpacks with its
//! own hardened unpacker, `agentvm_run::artifacts::unpack_to`).
//!
//! Archive layout: every entry is `NAME` or under `NAME/`, where `NAME` is the copied
//! directory's name; the first entry is `NAME/` itself.
//!
//! Guarantees of [`pack`]: regular files, directories and symbolic links (as links, never
//! followed) with their permission bits; any other entry (socket, FIFO, device) stops it with
//! an error naming the entry. Guarantees of [`unpack_new`]: nothing is created outside the
//! new directory (absolute paths, `..`, entries outside `NAME` and entries under a link are
//! refused), only files, directories and links are created, at most [`MAX_ENTRIES`]; it
//! unpacks beside the target and renames into place only when all of it was unpacked, so a
//! refused archive leaves nothing at the target.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Entries a copied directory may have.
pub const MAX_ENTRIES: u64 = 100_000;
/// Deepest entry, path components (the directory's own name counts).
pub const MAX_DEPTH: usize = 64;

fn refused(entry: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", entry.display()),
    )
}

/// Write the tar archive of directory `dir` to `out`, its entries under `name`.
pub fn pack(dir: &Path, name: &str, out: impl Write) -> io::Result<()> {
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(refused(dir, "not a directory"));
    }
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
    header.set_mode(meta.permissions().mode() & 0o7777);
    b.append_data(&mut header, name, io::empty())?;
    pack_dir(&mut b, dir, Path::new(name), 1)?;
    b.into_inner()?.flush()
}

fn pack_dir<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    at: &Path,
    depth: usize,
) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for n in names {
        let path = dir.join(&n);
        let entry = at.join(&n);
        if depth + 1 > MAX_DEPTH {
            return Err(refused(
                &path,
                format!("deeper than {MAX_DEPTH} directories"),
            ));
        }
        let meta = fs::symlink_metadata(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        header.set_mode(meta.permissions().mode() & 0o7777);
        let kind = meta.file_type();
        if kind.is_symlink() {
            header.set_size(0);
            b.append_link(&mut header, &entry, fs::read_link(&path)?)?;
        } else if kind.is_dir() {
            b.append_data(&mut header, &entry, io::empty())?;
            pack_dir(b, &path, &entry, depth + 1)?;
        } else if kind.is_file() {
            let f = fs::File::open(&path)?;
            // The header's size is the file's at the time of its stat; a file that grows
            // meanwhile is cut there, one that shrinks fails the copy (never a bad archive).
            b.append_data(&mut header, &entry, f.take(meta.len()))?;
        } else {
            return Err(refused(
                &path,
                "not a regular file, directory or symbolic link (sockets, FIFOs and devices are not copied)",
            ));
        }
    }
    Ok(())
}

/// The components of `entry`, checked: relative, no `..`, first `name`, at most
/// [`MAX_DEPTH`].
fn checked<'p>(entry: &'p Path, name: &str) -> io::Result<Vec<&'p std::ffi::OsStr>> {
    let mut parts = Vec::new();
    for c in entry.components() {
        match c {
            Component::Normal(p) => parts.push(p),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(refused(entry, "absolute path"))
            }
            Component::ParentDir => return Err(refused(entry, "path with `..`")),
        }
    }
    if parts.first().map(|p| p.as_bytes()) != Some(name.as_bytes()) {
        return Err(refused(entry, format!("not under {name}/")));
    }
    if parts.len() > MAX_DEPTH {
        return Err(refused(
            entry,
            format!("deeper than {MAX_DEPTH} directories"),
        ));
    }
    Ok(parts)
}

/// Make the new directory `target` (which must not exist; its parent must) from the archive
/// `src` of a directory called `name`. Returns the number of entries.
pub fn unpack_new(src: impl Read, target: &Path, name: &str) -> io::Result<u64> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(refused(target, "exists already"));
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("/"),
    };
    let staging = parent.join(format!(
        ".agentvm-cp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| refused(parent, e))?;
    let result = unpack_entries(src, &staging, name).and_then(|n| {
        let top = staging.join(name);
        if !fs::symlink_metadata(&top).is_ok_and(|m| m.is_dir()) {
            return Err(refused(
                Path::new(name),
                "the archive holds no such directory",
            ));
        }
        if fs::symlink_metadata(target).is_ok() {
            return Err(refused(target, "exists already"));
        }
        fs::rename(&top, target).map_err(|e| refused(target, e))?;
        Ok(n)
    });
    let _ = fs::remove_dir_all(&staging);
    result
}

fn unpack_entries(src: impl Read, staging: &Path, name: &str) -> io::Result<u64> {
    let mut archive = tar::Archive::new(src);
    let mut count = 0u64;
    // Directory modes are set last: a read-only directory is still filled first.
    let mut dir_modes: Vec<(PathBuf, u32)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        count += 1;
        let entry_path = entry.path()?.into_owned();
        if count > MAX_ENTRIES {
            return Err(refused(
                &entry_path,
                format!("more than {MAX_ENTRIES} entries"),
            ));
        }
        let parts = checked(&entry_path, name)?;
        // Every parent must be a directory made by this unpacking, never a link.
        let mut at = staging.to_path_buf();
        for p in &parts[..parts.len() - 1] {
            at.push(p);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refused(&entry_path, "a parent is not a directory")),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::DirBuilder::new().mode(0o755).create(&at)?
                }
                Err(e) => return Err(e),
            }
        }
        let dest = at.join(parts[parts.len() - 1]);
        let mode = entry.header().mode()? & 0o7777;
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => return Err(refused(&entry_path, "exists and is not a directory")),
                    Err(_) => fs::DirBuilder::new().mode(0o700).create(&dest)?,
                }
                dir_modes.push((dest, mode));
            }
            T::Regular | T::Continuous => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|e| refused(&entry_path, e))?;
                io::copy(&mut entry, &mut f)?;
                f.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            T::Symlink => {
                let link = entry
                    .link_name()?
                    .ok_or_else(|| refused(&entry_path, "a link with no target"))?;
                std::os::unix::fs::symlink(&link, &dest).map_err(|e| refused(&entry_path, e))?;
            }
            other => {
                return Err(refused(
                    &entry_path,
                    format!("entry type {:?} is not copied", other.as_byte() as char),
                ))
            }
        }
    }
    for (dir, mode) in dir_modes.into_iter().rev() {
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode))?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests;
