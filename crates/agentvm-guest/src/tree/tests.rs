//! Packing and unpacking copied directories; the unpacking tests play a host (or a guest
//! program racing it) that wants something outside the target.

use super::*;
use std::os::unix::fs::symlink;

/// One raw tar entry, whatever its name says (the `tar` crate's builder refuses `..`).
fn raw(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8], link: &str) {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
}

fn finish(mut v: Vec<u8>) -> Vec<u8> {
    v.extend_from_slice(&[0u8; 1024]);
    v
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_directory_round_trips_with_links_and_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("a/b/c")).unwrap();
    fs::write(src.join("a/b/c/deep.txt"), b"deep").unwrap();
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(src.join("private"), vec![9u8; 200_000]).unwrap();
    fs::set_permissions(src.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    symlink("a/b/c/deep.txt", src.join("link")).unwrap();
    symlink("/nowhere", src.join("dangling")).unwrap();
    fs::set_permissions(src.join("a/b"), fs::Permissions::from_mode(0o750)).unwrap();

    let mut tar = Vec::new();
    pack(&src, "copy", &mut tar).unwrap();
    let dest = tmp.path().join("dest");
    let n = unpack_new(&tar[..], &dest, "copy").unwrap();
    assert_eq!(n, 9);
    assert_eq!(fs::read(dest.join("a/b/c/deep.txt")).unwrap(), b"deep");
    assert_eq!(fs::read(dest.join("private")).unwrap(), vec![9u8; 200_000]);
    assert_eq!(mode(&dest.join("run.sh")), 0o755);
    assert_eq!(mode(&dest.join("private")), 0o600);
    assert_eq!(mode(&dest.join("a/b")), 0o750);
    assert_eq!(
        fs::read_link(dest.join("link")).unwrap(),
        Path::new("a/b/c/deep.txt")
    );
    assert_eq!(
        fs::read_link(dest.join("dangling")).unwrap(),
        Path::new("/nowhere")
    );
    // Nothing but the new directory beside the source.
    let mut names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["dest", "src"]);
}

#[test]
fn special_files_stop_the_packing_and_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let socket = src.join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let e = pack(&src, "src", io::sink()).unwrap_err();
    assert!(e.to_string().contains("sock: not a regular file"), "{e}");
    // A file is not a directory.
    fs::write(tmp.path().join("file"), b"").unwrap();
    let e = pack(&tmp.path().join("file"), "x", io::sink()).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn entries_escaping_the_target_are_refused_and_nothing_is_left() {
    use tar::EntryType as T;
    let one = |entries: &[(&str, T, &str)]| {
        let mut v = Vec::new();
        for (name, kind, link) in entries {
            let data: &[u8] = if *kind == T::Regular { b"x" } else { b"" };
            raw(&mut v, name, *kind, data, link);
        }
        finish(v)
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "path traversal",
            one(&[("d/", T::Directory, ""), ("d/../../evil", T::Regular, "")]),
            "d/../../evil: path with `..`",
        ),
        (
            "absolute path",
            one(&[("/etc/evil", T::Regular, "")]),
            "/etc/evil: absolute path",
        ),
        (
            "symlink, then a file through it",
            one(&[
                ("d/", T::Directory, ""),
                ("d/l", T::Symlink, "/etc"),
                ("d/l/passwd", T::Regular, ""),
            ]),
            "d/l/passwd: a parent is not a directory",
        ),
        (
            "symlink, then a file of its name",
            one(&[("d/l", T::Symlink, "/etc/passwd"), ("d/l", T::Regular, "")]),
            "d/l: File exists",
        ),
        (
            "another directory",
            one(&[("other/x", T::Regular, "")]),
            "other/x: not under d/",
        ),
        (
            "a device",
            one(&[("d/sda", T::Block, "")]),
            "d/sda: entry type '4' is not copied",
        ),
    ];
    for (what, tar, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("dest");
        let e = unpack_new(&tar[..], &dest, "d").unwrap_err();
        assert!(e.to_string().contains(want), "{what}: {e}");
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "{what}: something was left"
        );
    }
}

#[test]
fn an_existing_target_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let mut v = Vec::new();
    raw(&mut v, "d/", tar::EntryType::Directory, b"", "");
    let e = unpack_new(&finish(v)[..], &dest, "d").unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");
}
