//! The unpacker against hand-built hostile tar streams: each test plays a guest that wants
//! something on the host it must not get.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::*;

/// A tar stream built header by header, so that it can say anything a hostile guest would.
#[derive(Default)]
struct Tar(Vec<u8>);

fn octal(field: &mut [u8], v: u64) {
    let s = format!("{:0width$o}\0", v, width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// A GNU-format header.
fn header(name: &[u8], kind: u8, size: u64, link: &[u8], mode: u32, uid: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], u64::from(uid));
    octal(&mut h[116..124], u64::from(uid));
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

impl Tar {
    fn entry(
        &mut self,
        name: &[u8],
        kind: u8,
        data: &[u8],
        link: &[u8],
        mode: u32,
        uid: u32,
    ) -> &mut Self {
        self.0
            .extend_from_slice(&header(name, kind, data.len() as u64, link, mode, uid));
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
        self
    }
    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(name.as_bytes(), b'0', data, b"", 0o644, 0)
    }
    fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name.as_bytes(), b'5', b"", b"", 0o755, 0)
    }
    fn link(&mut self, name: &str, kind: u8, target: &str) -> &mut Self {
        self.entry(name.as_bytes(), kind, b"", target.as_bytes(), 0o777, 0)
    }
    fn special(&mut self, name: &str, kind: u8) -> &mut Self {
        self.entry(name.as_bytes(), kind, b"", b"", 0o666, 0)
    }
    /// A PAX extended header for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            // "LEN KEY=VALUE\n", LEN counting itself.
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.entry(b"././@PaxHeader", b'x', &data, b"", 0o644, 0)
    }
    /// A GNU long name for the next entry.
    fn long_name(&mut self, name: &[u8]) -> &mut Self {
        let mut data = name.to_vec();
        data.push(0);
        self.entry(b"././@LongLink", b'L', &data, b"", 0o644, 0)
    }
    fn finish(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.0);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

/// A state directory with `artifacts/` under it, and a run directory in that.
struct Host {
    tmp: tempfile::TempDir,
    dir: RunDir,
}

impl Host {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::create(&tmp.path().join("artifacts"), "run", None).unwrap();
        Host { tmp, dir }
    }
    fn unpack(&mut self, tar: &[u8], cap: u64) -> Result<Unpacked, ArchiveError> {
        let mut budget = Budget::new(cap);
        unpack(&mut &tar[..], &mut self.dir, b"out", &mut budget)
    }
    /// Everything under the temporary directory (never following links): relative path,
    /// kind (`d`, `f`, `l`, `?`), mode bits, owner.
    fn tree(&self) -> Vec<(String, char, u32, u32)> {
        fn walk(root: &Path, p: &Path, out: &mut Vec<(String, char, u32, u32)>) {
            for e in std::fs::read_dir(p).unwrap() {
                let path = e.unwrap().path();
                let m = std::fs::symlink_metadata(&path).unwrap();
                let kind = if m.is_dir() {
                    'd'
                } else if m.is_file() {
                    'f'
                } else if m.file_type().is_symlink() {
                    'l'
                } else {
                    '?'
                };
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, kind, m.permissions().mode() & 0o7777, m.uid()));
                if kind == 'd' {
                    walk(root, &path, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(self.tmp.path(), self.tmp.path(), &mut out);
        out.sort();
        out
    }
    /// The run directory's own name.
    fn run(&self) -> String {
        format!(
            "artifacts/{}",
            self.dir.path().file_name().unwrap().to_string_lossy()
        )
    }
    /// What `tree` must be when `extra` (paths under the run directory, kind) is all that
    /// was unpacked: files 0640, directories 0750, all owned by this process's user.
    fn expect(&self, extra: &[(&str, char)]) -> Vec<(String, char, u32, u32)> {
        let me = rustix::process::geteuid().as_raw();
        let mut v = vec![
            ("artifacts".to_string(), 'd', 0o750, me),
            (self.run(), 'd', 0o750, me),
        ];
        for (p, k) in extra {
            let mode = if *k == 'd' { 0o750 } else { 0o640 };
            v.push((format!("{}/{p}", self.run()), *k, mode, me));
        }
        v.sort();
        v
    }
}

fn reasons(u: &Unpacked) -> Vec<(String, RejectReason)> {
    u.rejected
        .iter()
        .map(|r| (r.entry.clone(), r.reason.clone()))
        .collect()
}

#[test]
fn regular_files_and_directories_arrive_with_fixed_modes_and_our_owner() {
    let mut h = Host::new();
    let tar = Tar::default()
        .entry(b"out/", b'5', b"", b"", 0o7777, 4242)
        .entry(b"out/suid.sh", b'0', b"#!/bin/sh\nid\n", b"", 0o4755, 0)
        .entry(b"out/sgid", b'0', b"g", b"", 0o2775, 0)
        .entry(b"out/owned-by-4242", b'0', b"mine", b"", 0o666, 4242)
        .entry(b"out/sticky/", b'5', b"", b"", 0o1777, 0)
        .file("out/implicit/parent/file.txt", b"deep")
        .finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert!(u.rejected.is_empty(), "{:?}", u.rejected);
    assert_eq!((u.files, u.dirs), (4, 4));
    assert_eq!(u.file_bytes, 13 + 1 + 4 + 4);
    assert_eq!(u.sha256, None, "a directory has no sha256");
    assert_eq!(u.host_path.as_deref(), Some(&*h.dir.path().join("out")));
    assert_eq!(
        h.tree(),
        h.expect(&[
            ("out", 'd'),
            ("out/suid.sh", 'f'),
            ("out/sgid", 'f'),
            ("out/owned-by-4242", 'f'),
            ("out/sticky", 'd'),
            ("out/implicit", 'd'),
            ("out/implicit/parent", 'd'),
            ("out/implicit/parent/file.txt", 'f'),
        ])
    );
    assert_eq!(
        std::fs::read(h.dir.path().join("out/suid.sh")).unwrap(),
        b"#!/bin/sh\nid\n"
    );
}

#[test]
fn a_single_file_artifact_is_hashed() {
    let mut h = Host::new();
    let tar = Tar::default().file("out", b"hello\n").finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(u.file_bytes, 6);
    assert_eq!(
        u.sha256.as_deref(),
        Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
    );
    assert_eq!(h.tree(), h.expect(&[("out", 'f')]));
}

#[test]
fn links_devices_and_fifos_are_skipped_and_named() {
    let mut h = Host::new();
    let tar = Tar::default()
        .dir("out/")
        .link("out/shadow", b'2', "/etc/shadow")
        .link("out/up", b'2', "../../../../etc/passwd")
        .link("out/passwd", b'1', "/etc/passwd")
        .special("out/null", b'3')
        .special("out/sda", b'4')
        .special("out/pipe", b'6')
        .entry(b"out/sparse", b'S', b"", b"", 0o644, 0)
        .file("out/kept.txt", b"ok")
        .finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(
        reasons(&u),
        [
            (
                "out/shadow".into(),
                RejectReason::Symlink {
                    target: "/etc/shadow".into()
                }
            ),
            (
                "out/up".into(),
                RejectReason::Symlink {
                    target: "../../../../etc/passwd".into()
                }
            ),
            (
                "out/passwd".into(),
                RejectReason::HardLink {
                    target: "/etc/passwd".into()
                }
            ),
            ("out/null".into(), RejectReason::CharDevice),
            ("out/sda".into(), RejectReason::BlockDevice),
            ("out/pipe".into(), RejectReason::Fifo),
            ("out/sparse".into(), RejectReason::OtherType(b'S')),
        ]
    );
    assert_eq!(
        u.rejected[0].to_string(),
        "out/shadow: symbolic link to /etc/shadow"
    );
    assert_eq!(h.tree(), h.expect(&[("out", 'd'), ("out/kept.txt", 'f')]));
}

#[test]
fn paths_that_climb_out_are_absolute_or_elsewhere_are_rejected() {
    let mut h = Host::new();
    let tar = Tar::default()
        .file("out/../../x", b"escaped")
        .file("out/a/../../../x", b"escaped")
        .file("../x", b"escaped")
        .file("/etc/cron.d/evil", b"* * * * * root id\n")
        .file("other/x", b"not this artifact")
        .entry(b"out/nul\0hidden", b'0', b"n", b"", 0o644, 0)
        .file("./out/./fine", b"dots are fine")
        .finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(
        reasons(&u),
        [
            ("out/../../x".into(), RejectReason::ParentDir),
            ("out/a/../../../x".into(), RejectReason::ParentDir),
            ("../x".into(), RejectReason::ParentDir),
            ("/etc/cron.d/evil".into(), RejectReason::Absolute),
            (
                "other/x".into(),
                RejectReason::OutsideArtifact {
                    artifact: "out".into()
                }
            ),
        ]
    );
    // A NUL ends a header name: `out/nul` is what the archive says.
    assert_eq!(
        h.tree(),
        h.expect(&[("out", 'd'), ("out/nul", 'f'), ("out/fine", 'f')])
    );
}

#[test]
fn a_pax_or_gnu_long_path_that_escapes_is_rejected() {
    let mut h = Host::new();
    let deep = format!("out/{}../../../../../../../../etc/evil", "a/".repeat(120));
    let tar = Tar::default()
        .pax(&[("path", deep.as_bytes())])
        .file("out/harmless-looking", b"pax")
        .long_name(format!("out/{}/../../../../x", "b".repeat(150)).as_bytes())
        .file("out/also-harmless", b"gnu")
        .pax(&[("path", b"/etc/shadow")])
        .file("out/third", b"abs")
        .pax(&[("path", format!("out/{}", "c".repeat(300)).as_bytes())])
        .file("out/fourth", b"long")
        .pax(&[("path", b"out/pax-named"), ("uid", b"0"), ("mode", b"4755")])
        .file("out/x", b"renamed by pax")
        .finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    let r = reasons(&u);
    assert_eq!(r.len(), 4, "{r:?}");
    assert_eq!(r[0].1, RejectReason::ParentDir);
    assert!(r[0].0.ends_with('…'), "long names are cut: {}", r[0].0);
    assert_eq!(r[1].1, RejectReason::ParentDir);
    assert_eq!(r[2], ("/etc/shadow".into(), RejectReason::Absolute));
    assert_eq!(
        r[3].1,
        RejectReason::BadName("a name longer than 255 bytes")
    );
    assert_eq!(h.tree(), h.expect(&[("out", 'd'), ("out/pax-named", 'f')]));
}

#[test]
fn a_header_whose_size_lies_or_a_cut_archive_is_refused_and_nothing_is_kept() {
    // The header claims 1000 bytes; the archive ends after 10.
    let mut h = Host::new();
    let mut tar = Tar::default().file("out/first", b"complete").0.clone();
    tar.extend_from_slice(&header(b"out/liar", b'0', 1000, b"", 0o644, 0));
    tar.extend_from_slice(b"0123456789");
    let e = h.unpack(&tar, 1 << 20).unwrap_err();
    assert!(
        matches!(e, ArchiveError::Truncated { ref entry } if entry == "out/liar"),
        "{e}"
    );
    assert!(e.is_archive_fault());
    assert_eq!(h.tree(), h.expect(&[]), "partial output removed");

    // Cut inside a header.
    let mut h = Host::new();
    let full = Tar::default()
        .file("out/a", b"a")
        .file("out/b", b"b")
        .finish();
    let e = h.unpack(&full[..512 + 512 + 300], 1 << 20).unwrap_err();
    assert!(matches!(e, ArchiveError::Malformed(_)), "{e}");
    assert_eq!(h.tree(), h.expect(&[]));

    // A header claiming less than its data: the rest is read as a header, and fails its
    // checksum.
    let mut h = Host::new();
    let mut tar = header(b"out/short", b'0', 4, b"", 0o644, 0).to_vec();
    tar.extend_from_slice(&[b'A'; 1024]);
    let e = h.unpack(&tar, 1 << 20).unwrap_err();
    assert!(matches!(e, ArchiveError::Malformed(_)), "{e}");
    assert!(e.to_string().contains("cksum"), "{e}");
    assert_eq!(h.tree(), h.expect(&[]));
}

#[test]
fn more_bytes_than_the_cap_stop_reading_and_nothing_is_kept() {
    let mut h = Host::new();
    let tar = Tar::default()
        .file("out/a", &[1u8; 3000])
        .file("out/b", &[2u8; 3000])
        .finish();
    /// Fails the test if more than `limit` bytes are asked of it.
    struct Source<'a>(&'a [u8], usize);
    impl Read for Source<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1 += n;
            assert!(self.1 <= 4097, "read {} bytes past a cap of 4096", self.1);
            Ok(n)
        }
    }
    // (Plenty of file bytes: the packed bytes run out first.)
    let mut budget = Budget::new(4096);
    budget.file_bytes = 1 << 20;
    let mut src = Source(&tar, 0);
    let e = unpack(&mut src, &mut h.dir, b"out", &mut budget).unwrap_err();
    assert!(matches!(e, ArchiveError::PackedCap { cap: 4096 }), "{e}");
    assert_eq!(budget.packed_bytes, 0);
    assert_eq!(h.tree(), h.expect(&[]));

    // Exactly at the cap is fine.
    let mut h = Host::new();
    let small = Tar::default().file("out", b"x").finish();
    let u = h.unpack(&small, small.len() as u64).unwrap();
    assert_eq!(u.file_bytes, 1);
}

#[test]
fn file_bytes_entries_and_records_are_bounded() {
    // A file bigger than what is left of the cap (of file bytes).
    let mut h = Host::new();
    let tar = Tar::default().file("out/big", &[0u8; 5000]).finish();
    let mut budget = Budget::new(1 << 20);
    budget.file_bytes = 4000;
    let e = unpack(&mut &tar[..], &mut h.dir, b"out", &mut budget).unwrap_err();
    assert!(matches!(e, ArchiveError::FileCap { cap: 4000, .. }), "{e}");
    assert_eq!(h.tree(), h.expect(&[]));

    // More entries than allowed.
    let mut h = Host::new();
    let mut t = Tar::default();
    for i in 0..20 {
        t.file(&format!("out/{i}"), b"");
    }
    let tar = t.finish();
    let mut budget = Budget::new(1 << 20);
    budget.entries = 10;
    let e = unpack(&mut &tar[..], &mut h.dir, b"out", &mut budget).unwrap_err();
    assert!(matches!(e, ArchiveError::TooManyEntries), "{e}");
    assert_eq!(h.tree(), h.expect(&[]));

    // A PAX header claiming 100 MiB is refused before anything is allocated for it.
    let mut h = Host::new();
    let mut tar = header(b"././@PaxHeader", b'x', 100 << 20, b"", 0o644, 0).to_vec();
    tar.extend_from_slice(&[b'1'; 512]);
    let e = h.unpack(&tar, 1 << 30).unwrap_err();
    assert!(
        e.to_string().contains("PAX header of 104857600 bytes"),
        "{e}"
    );

    // A PAX size record (another reader would frame the data differently).
    let mut h = Host::new();
    let tar = Tar::default()
        .pax(&[("size", b"0")])
        .file("out", b"hidden entry")
        .finish();
    let e = h.unpack(&tar, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("PAX size record"), "{e}");
}

#[test]
fn duplicates_are_never_overwritten_and_nothing_on_the_host_is_followed() {
    let mut h = Host::new();
    let tar = Tar::default()
        .file("out/a", b"first")
        .file("out/a", b"second")
        .file("out/a/under-a-file", b"x")
        .finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(
        reasons(&u),
        [
            ("out/a".into(), RejectReason::Duplicate),
            ("out/a/under-a-file".into(), RejectReason::NotUnderDirectory),
        ]
    );
    assert_eq!(std::fs::read(h.dir.path().join("out/a")).unwrap(), b"first");

    // Even a link planted in the run directory (nothing in an archive can make one) is not
    // followed.
    let mut h = Host::new();
    let elsewhere = h.tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, h.dir.path().join("out")).unwrap();
    let tar = Tar::default().file("out/x", b"x").finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(
        reasons(&u),
        [("out/x".into(), RejectReason::NotUnderDirectory)]
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[test]
fn a_second_artifact_of_the_same_name_gets_its_own() {
    let mut h = Host::new();
    let tar = Tar::default().file("out", b"one").finish();
    h.unpack(&tar, 1 << 20).unwrap();
    let tar = Tar::default().file("out", b"two").finish();
    let u = h.unpack(&tar, 1 << 20).unwrap();
    assert_eq!(u.host_path.as_deref(), Some(&*h.dir.path().join("out-2")));
    assert_eq!(std::fs::read(h.dir.path().join("out")).unwrap(), b"one");
}

#[test]
fn each_run_gets_a_fresh_directory_and_odd_run_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("artifacts");
    let a = RunDir::create(&parent, "build", None).unwrap();
    let b = RunDir::create(&parent, "build", None).unwrap();
    assert_ne!(a.path(), b.path());
    for d in [&a, &b] {
        let name = d.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("build-20"), "{name}");
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750, "{name}");
    }
    let mode = std::fs::metadata(&parent).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    for bad in ["", "..", ".hidden", "a/b", "a\0b"] {
        assert!(RunDir::create(&parent, bad, None).is_err(), "{bad:?}");
    }
}

/// xorshift64*: reproducible randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn fix_checksum(block: &mut [u8]) {
    block[148..156].copy_from_slice(b"        ");
    let sum: u32 = block.iter().map(|b| u32::from(*b)).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

#[test]
fn mutated_archives_never_panic_escape_or_leave_anything_but_plain_files() {
    // A base archive using every feature, and where its headers are.
    let mut t = Tar::default();
    let mut headers = Vec::new();
    let mut mark = |t: &mut Tar| headers.push(t.0.len());
    mark(&mut t);
    t.dir("out/");
    mark(&mut t);
    t.file("out/a.txt", b"some content\n");
    mark(&mut t);
    t.pax(&[("path", b"out/pax/long-name.bin")]);
    mark(&mut t);
    t.file("out/x", &[9u8; 700]);
    mark(&mut t);
    t.long_name(format!("out/{}", "n".repeat(120)).as_bytes());
    mark(&mut t);
    t.file("out/y", b"gnu long name");
    mark(&mut t);
    t.link("out/l", b'2', "/etc/shadow");
    mark(&mut t);
    t.special("out/f", b'6');
    let base = t.finish();
    let me = rustix::process::geteuid().as_raw();

    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let (mut ok, mut refused) = (0, 0);
    for round in 0..1500 {
        let mut tar = base.clone();
        for _ in 0..1 + rng.below(6) {
            // Mostly inside headers (where the parser decides), sometimes anywhere.
            let at = if rng.below(4) > 0 {
                headers[rng.below(headers.len())] + rng.below(512)
            } else {
                rng.below(tar.len())
            };
            tar[at] = match rng.below(6) {
                0 => b'/',
                1 => b'.',
                2 => b'0' + rng.below(8) as u8,
                3 => 0,
                4 => 0xff,
                _ => rng.next() as u8,
            };
        }
        if rng.below(3) > 0 {
            for &h in &headers {
                fix_checksum(&mut tar[h..h + 512]);
            }
        }
        if rng.below(5) == 0 {
            tar.truncate(rng.below(tar.len()));
        }
        let mut h = Host::new();
        let cap = if rng.below(4) == 0 {
            rng.below(4096) as u64
        } else {
            1 << 20
        };
        match h.unpack(&tar, cap) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(e.is_archive_fault(), "round {round}: {e}");
                refused += 1;
            }
        }
        let run = h.run();
        for (path, kind, mode, uid) in h.tree() {
            assert_eq!(uid, me, "round {round}: {path}");
            assert!(
                path == "artifacts" || path == run || path.starts_with(&format!("{run}/out")),
                "round {round}: {path} outside the artifact"
            );
            match kind {
                'd' => assert_eq!(mode, 0o750, "round {round}: {path}"),
                'f' => assert_eq!(mode, 0o640, "round {round}: {path}"),
                other => panic!("round {round}: {path} is of kind {other}"),
            }
        }
    }
    // Both outcomes were exercised.
    assert!(ok > 100 && refused > 100, "ok {ok}, refused {refused}");
}

/// `agentvm cp` out of a sandbox: `unpack_to` into `<tmp>/dest` under [`Rules::COPY`].
struct CopyTo {
    tmp: tempfile::TempDir,
}

impl CopyTo {
    fn new() -> Self {
        CopyTo {
            tmp: tempfile::tempdir().unwrap(),
        }
    }
    fn dest(&self) -> PathBuf {
        self.tmp.path().join("dest")
    }
    fn unpack(&self, tar: &[u8], budget: &mut Budget) -> Result<Unpacked, CopyError> {
        unpack_to(&mut &tar[..], &self.dest(), b"out", budget, &Rules::COPY)
    }
    /// The refusal of `tar`, after checking that nothing was left behind (not at the
    /// destination, not beside it).
    fn refused(&self, tar: &[u8], budget: &mut Budget) -> CopyError {
        let e = self.unpack(tar, budget).unwrap_err();
        let left: Vec<_> = std::fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{e}: left behind: {left:?}");
        e
    }
}

#[test]
fn a_copied_directory_keeps_permissions_and_inside_links() {
    let c = CopyTo::new();
    let tar = Tar::default()
        .dir("out")
        .dir("out/sub/deeper")
        .entry(b"out/sub/run.sh", b'0', b"#!/bin/sh\n", b"", 0o4755, 0)
        .entry(b"out/ro", b'0', b"x", b"", 0o444, 0)
        .entry(b"out/locked", b'5', b"", b"", 0o500, 0)
        .link("out/sub/deeper/up", b'2', "../run.sh")
        .link("out/here", b'2', "./sub")
        .finish();
    let u = c.unpack(&tar, &mut Budget::new(1 << 20)).unwrap();
    assert_eq!((u.files, u.symlinks), (2, 2));
    let d = c.dest();
    let mode = |p: &str| {
        std::fs::symlink_metadata(d.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    // setuid is dropped; the rest of the bits are kept.
    assert_eq!(mode("sub/run.sh"), 0o755);
    assert_eq!(mode("ro"), 0o444);
    // A directory stays fillable by its owner.
    assert_eq!(mode("locked"), 0o700);
    assert_eq!(
        std::fs::read_link(d.join("sub/deeper/up")).unwrap(),
        Path::new("../run.sh")
    );
    assert_eq!(
        std::fs::read(d.join("sub/deeper/up")).unwrap(),
        b"#!/bin/sh\n"
    );
    assert!(d.join("here/run.sh").is_file());
    // Only the destination is left in its parent: the staging directory is gone.
    assert_eq!(std::fs::read_dir(c.tmp.path()).unwrap().count(), 1);
}

#[test]
fn a_copy_with_one_hostile_entry_is_refused_whole_and_names_it() {
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "path traversal",
            Tar::default()
                .file("out/ok", b"fine")
                .file("out/../../escaped", b"x")
                .finish(),
            "out/../../escaped: path with `..`",
        ),
        (
            "absolute path",
            Tar::default()
                .file("out/ok", b"fine")
                .file("/etc/cron.d/x", b"x")
                .finish(),
            "/etc/cron.d/x: absolute path",
        ),
        (
            "symlink out, then a file through it",
            Tar::default()
                .link("out/l", b'2', "/etc")
                .file("out/l/passwd", b"x")
                .finish(),
            "out/l: symbolic link to /etc, outside the copied directory",
        ),
        (
            "symlink climbing out",
            Tar::default().link("out/a", b'2', "../../home").finish(),
            "out/a: symbolic link to ../../home, outside the copied directory",
        ),
        (
            "symlink inside, then a file through it",
            Tar::default()
                .dir("out/sub")
                .link("out/l", b'2', "sub")
                .file("out/l/f", b"x")
                .finish(),
            "out/l/f: a parent is not a directory",
        ),
        (
            "a link whose name goes back up after a link",
            Tar::default().link("out/a/b", b'2', "../c/../..").finish(),
            "out/a/b: symbolic link to ../c/../.., outside the copied directory",
        ),
        (
            "a device",
            Tar::default().special("out/sda", b'4').finish(),
            "out/sda: block device",
        ),
        (
            "a hard link",
            Tar::default().link("out/h", b'1', "/etc/shadow").finish(),
            "out/h: hard link to /etc/shadow",
        ),
        (
            "another directory",
            Tar::default().file("elsewhere/x", b"x").finish(),
            "elsewhere/x: outside the artifact's directory out",
        ),
        (
            "too deep",
            {
                let deep = format!("out/{}f", "d/".repeat(MAX_COPY_DEPTH));
                Tar::default()
                    .long_name(deep.as_bytes())
                    .file("x", b"x")
                    .finish()
            },
            "deeper than 64 directories",
        ),
    ];
    for (what, tar, want) in cases {
        let c = CopyTo::new();
        let e = c.refused(&tar, &mut Budget::new(1 << 20));
        assert!(matches!(e, CopyError::Refused(_)), "{what}: {e}");
        assert!(e.to_string().contains(want), "{what}: {e}");
    }
}

#[test]
fn a_copy_over_a_cap_is_refused_and_leaves_nothing() {
    // A file bigger than the cap, after a few good ones.
    let c = CopyTo::new();
    let tar = Tar::default()
        .file("out/a", b"fine")
        .file("out/big", &[7u8; 5000])
        .finish();
    let mut budget = Budget::new(1 << 20);
    budget.file_bytes = 4096;
    let e = c.refused(&tar, &mut budget);
    assert!(e.to_string().starts_with("out/big: "), "{e}");
    assert!(matches!(
        e,
        CopyError::Archive(ArchiveError::FileCap { .. })
    ));

    // A huge number of entries.
    let c = CopyTo::new();
    let mut t = Tar::default();
    for i in 0..500 {
        t.file(&format!("out/{i}"), b"");
    }
    let mut budget = Budget::new(1 << 20);
    budget.entries = 100;
    let e = c.refused(&t.finish(), &mut budget);
    assert!(
        matches!(e, CopyError::Archive(ArchiveError::TooManyEntries)),
        "{e}"
    );

    // More packed bytes than the cap.
    let c = CopyTo::new();
    let tar = Tar::default().file("out/a", &[1u8; 8192]).finish();
    let mut budget = Budget::new(4096);
    budget.file_bytes = 1 << 20;
    let e = c.refused(&tar, &mut budget);
    assert!(
        matches!(e, CopyError::Archive(ArchiveError::PackedCap { .. })),
        "{e}"
    );

    // An archive with no directory of the name.
    let c = CopyTo::new();
    let tar = Tar::default().file("out", b"a file").finish();
    let e = c.refused(&tar, &mut Budget::new(1 << 20));
    assert!(matches!(e, CopyError::NoDirectory(_)), "{e}");
}

#[test]
fn a_copy_never_merges_into_or_replaces_what_exists() {
    let c = CopyTo::new();
    std::fs::create_dir(c.dest()).unwrap();
    let tar = Tar::default().file("out/a", b"x").finish();
    let e = c.unpack(&tar, &mut Budget::new(1 << 20)).unwrap_err();
    assert!(matches!(e, CopyError::Exists(_)), "{e}");
    assert_eq!(std::fs::read_dir(c.dest()).unwrap().count(), 0);
}

#[test]
fn links_that_stay_inside() {
    for (depth, target, inside) in [
        (1, "a", true),
        (1, "./a/b", true),
        (1, "..", false),
        (2, "../a", true),
        (2, "../..", false),
        (3, "../../x/y", true),
        (3, "x/../..", false),
        (3, "/abs", false),
        (3, "", false),
        (0, "a", false),
    ] {
        assert_eq!(
            link_stays_inside(depth, target.as_bytes()),
            inside,
            "{depth} {target}"
        );
    }
}
