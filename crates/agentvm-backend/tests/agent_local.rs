//! agentvm-guest and the host's connection to it, without a VM: the real agent binary serves
//! a Unix socket (`--listen`), the host side is the production `AgentConn`. And the host
//! against hostile agents: a fake guest that lies about lengths, floods past its window or
//! goes silent.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentvm_backend::agent_conn::{AgentConn, Interactive};
use agentvm_backend::{BackendError, ExecRequest, ServedBy, Stream};
use agentvm_guest::{
    encode, scan_for_magic, sync_bytes, ToHost, WinSize, GUEST_SYNC, HOST_SYNC, MAX_FRAME,
};

struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> Agent {
    let bin = agentvm_image::guest::agent_binary()
        .expect("agentvm-guest is built (cargo build --workspace --all-targets)");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let child = Command::new(bin)
        .arg("--listen")
        .arg(&sock)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "agent never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent {
        child,
        sock,
        _dir: dir,
    }
}

fn connect(a: &Agent) -> Arc<AgentConn> {
    AgentConn::connect("local", &a.sock, Duration::from_secs(5)).unwrap()
}

fn run(c: &Arc<AgentConn>, req: &ExecRequest) -> agentvm_backend::ExecOutcome {
    c.exec(req, None, None, &mut |_, _| {}).unwrap()
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new("/bin/sh", ["-c", script])
}

#[test]
fn exec_streams_output_exit_codes_env_and_cwd() {
    let a = agent();
    let c = connect(&a);
    let mut req = sh("echo out; echo err >&2; echo \"$FOO\"; pwd; exit 7");
    req.env.insert("FOO".into(), "bar baz".into());
    req.cwd = Some("/tmp".into());
    let mut live = Vec::new();
    let out = c
        .exec(&req, None, None, &mut |s, d| live.push((s, d.to_vec())))
        .unwrap();
    assert_eq!(out.exit_code, Some(7));
    assert_eq!(out.stdout, b"out\nbar baz\n/tmp\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.served_by, ServedBy::AgentvmGuest);
    assert!(live.iter().any(|(s, _)| *s == Stream::Stderr));
    // PATH, HOME and LANG are set; nothing of the agent's own environment leaks.
    let out = run(&c, &sh("env | sort"));
    let env = String::from_utf8(out.stdout).unwrap();
    assert!(env.contains("PATH=/usr/local/sbin:"), "{env}");
    assert!(env.contains("LANG=C.UTF-8"), "{env}");
    assert!(!env.contains("CARGO"), "{env}");
    // A program that does not exist ends as a shell's would.
    let out = run(
        &c,
        &ExecRequest::new("no-such-program", Vec::<String>::new()),
    );
    assert_eq!(out.exit_code, Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-program"));
    let mut req = sh("true");
    req.cwd = Some("/no/such/dir".into());
    assert_eq!(run(&c, &req).exit_code, Some(126));
    // As another user: uid and gid as asked, no supplementary groups of root's.
    let mut req = sh("id -u; id -g; id -G");
    req.user = Some((65534, 65533));
    let out = run(&c, &req);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "65534\n65533\n65533\n"
    );
    // Killed by a signal.
    let out = run(&c, &sh("kill -TERM $$"));
    assert_eq!((out.exit_code, out.signal), (None, Some(15)));
}

#[test]
fn exec_runs_concurrently_and_the_timeout_kills_the_whole_group() {
    let a = agent();
    let c = connect(&a);
    let start = Instant::now();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || run(&c, &sh(&format!("sleep 1; echo {i}"))))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap().stdout, format!("{i}\n").as_bytes());
    }
    // Four one-second sleeps at once, not one after the other.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("survivor");
    let mut req = sh(&format!("(sleep 3; touch {}) & sleep 30", marker.display()));
    req.timeout = Duration::from_millis(500);
    let out = run(&c, &req);
    assert!(out.timed_out);
    assert_eq!(out.signal, Some(9));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        !marker.exists(),
        "the background child was killed with its group"
    );
    // Cancel works the same way.
    let cancel = Arc::new(AtomicBool::new(false));
    let cl = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cl.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let out = c
        .exec(&sh("sleep 30"), None, Some(&cancel), &mut |_, _| {})
        .unwrap();
    assert_eq!(out.signal, Some(9));
    assert!(!out.timed_out);
}

#[test]
fn output_beyond_the_cap_is_counted_not_kept_and_the_program_is_not_held_up() {
    let a = agent();
    let c = connect(&a);
    // 8 MiB on stdout (past the 1 MiB window many times over), a cap of 100 000 bytes.
    let mut req = sh("head -c 8388608 /dev/zero; echo done >&2");
    req.output_cap = 100_000;
    let out = run(&c, &req);
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(out.stdout.len(), 100_000);
    assert_eq!(out.stdout_total, 8 << 20);
    assert!(out.stdout_truncated());
    assert_eq!(out.stderr, b"done\n");
}

#[test]
fn a_slow_reader_stops_the_program_instead_of_growing_a_buffer() {
    let a = agent();
    let c = connect(&a);
    // The consumer sleeps 20 ms per chunk: the program (writing 16 MiB as fast as it can)
    // must wait for it. Then the output arrives whole and in order.
    let mut got = 0usize;
    let mut chunks = 0;
    let mut req = sh("i=0; while [ $i -lt 4096 ]; do head -c 4096 /dev/zero; i=$((i+1)); done");
    req.keep_output = false;
    req.output_cap = usize::MAX;
    let out = c
        .exec(&req, None, None, &mut |_, d| {
            got += d.len();
            chunks += 1;
            if chunks < 20 {
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .unwrap();
    assert_eq!(out.exit_code, Some(0));
    assert_eq!(got, 16 << 20);
    assert_eq!(out.stdout_total, 16 << 20);
}

#[test]
fn stdin_and_a_terminal() {
    let a = agent();
    let c = connect(&a);
    // 3 MiB through stdin (more than the window), counted by wc in the guest.
    let data = vec![b'x'; 3 << 20];
    let out = c
        .exec(
            &sh("wc -c"),
            Some(Interactive {
                stdin: Some(Box::new(std::io::Cursor::new(data))),
                pty: None,
                winsize: None,
            }),
            None,
            &mut |_, _| {},
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3145728");
    // On a terminal: the program sees a tty of the given size, and input is echoed.
    let out = c
        .exec(
            &sh("test -t 0 && stty size; read line; echo got:$line"),
            Some(Interactive {
                stdin: Some(Box::new(std::io::Cursor::new(b"hello\n".to_vec()))),
                pty: Some(WinSize {
                    rows: 33,
                    cols: 101,
                }),
                winsize: None,
            }),
            None,
            &mut |_, _| {},
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("33 101"), "{text:?}");
    assert!(text.contains("got:hello"), "{text:?}");
    assert_eq!(out.exit_code, Some(0));
}

#[test]
fn files_go_in_and_out_whole() {
    let a = agent();
    let c = connect(&a);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.bin");
    let data: Vec<u8> = (0..(20u32 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    c.write_file(path.to_str().unwrap(), &data).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    let back = c.read_file(path.to_str().unwrap(), 20 << 20).unwrap();
    assert!(back == data);
    // Over the caller's limit: an error, not a truncated file.
    assert!(c.read_file(path.to_str().unwrap(), 1 << 20).is_err());
    // Missing files and unwritable paths are the guest's errors, and the connection lives.
    let e = c.read_file("/no/such/file", 10).unwrap_err();
    assert!(matches!(e, BackendError::GuestCommand { .. }), "{e}");
    let e = c.write_file("/no/such/dir/f", b"x").unwrap_err();
    assert!(matches!(e, BackendError::GuestCommand { .. }), "{e}");
    assert!(c.ping().is_ok());
}

#[test]
fn a_new_connection_resets_the_agent_and_ends_what_the_old_one_started() {
    let a = agent();
    let c = connect(&a);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("m");
    let c2 = c.clone();
    let m = marker.clone();
    let t = std::thread::spawn(move || {
        c2.exec(
            &sh(&format!("sleep 2; touch {}", m.display())),
            None,
            None,
            &mut |_, _| {},
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    // The listener serves one connection at a time: the old one is closed first.
    c.close();
    let c3 = connect(&a);
    assert!(c3.ping().is_ok());
    // The exec of the old connection fails at once, and its program is killed.
    assert!(t.join().unwrap().is_err());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !marker.exists(),
        "the program of the old connection was killed"
    );
}

/// A fake guest: answers the sync, then writes what `script` gives it.
fn hostile(
    script: impl FnOnce(&mut std::os::unix::net::UnixStream) + Send + 'static,
) -> (PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("evil.sock");
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let nonce = scan_for_magic(&mut r, &HOST_SYNC).unwrap();
        s.write_all(&sync_bytes(&GUEST_SYNC, nonce)).unwrap();
        script(&mut s);
        // Keep the socket open and drain whatever the host sends.
        let mut sink = [0u8; 4096];
        while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
    });
    (sock, dir)
}

fn started_then(frames: Vec<Vec<u8>>) -> impl FnOnce(&mut std::os::unix::net::UnixStream) + Send {
    move |s| {
        // The host's first exec is stream 1.
        s.write_all(&encode(1, &ToHost::Started { pid: 1 }))
            .unwrap();
        for f in frames {
            if s.write_all(&f).is_err() {
                return;
            }
        }
    }
}

fn exec_against(sock: &Path) -> Result<agentvm_backend::ExecOutcome, BackendError> {
    let c = AgentConn::connect("evil", sock, Duration::from_secs(5)).unwrap();
    let mut req = sh("x");
    req.timeout = Duration::from_secs(5);
    c.exec(&req, None, None, &mut |_, _| {})
}

#[test]
fn hostile_agent_lengths_floods_and_silence_end_the_connection_not_the_host() {
    // A length over the maximum: refused before anything is allocated.
    let mut huge = (MAX_FRAME as u32 + 1).to_le_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    let (sock, _d) = hostile(started_then(vec![huge]));
    let e = exec_against(&sock).unwrap_err();
    assert!(e.to_string().contains("frame of"), "{e}");
    // Garbage that does not decode.
    let (sock, _d) = hostile(started_then(vec![vec![3, 0, 0, 0, 1, 250, 250]]));
    let e = exec_against(&sock).unwrap_err();
    assert!(e.to_string().contains("undecodable"), "{e}");
    // Output past the window without waiting for credit: 64 MiB sent blindly.
    let flood: Vec<Vec<u8>> = (0..1024)
        .map(|_| encode(1, &ToHost::Stdout(vec![b'A'; 64 * 1024])))
        .collect();
    let (sock, _d) = hostile(started_then(flood));
    let c = AgentConn::connect("evil", &sock, Duration::from_secs(5)).unwrap();
    let mut req = sh("x");
    req.timeout = Duration::from_secs(20);
    // The consumer is slow, so the window fills: the host notices and drops the guest.
    let e = c
        .exec(&req, None, None, &mut |_, _| {
            std::thread::sleep(Duration::from_millis(50))
        })
        .unwrap_err();
    assert!(e.to_string().contains("flow control"), "{e}");
    // A second Started, an answer of the wrong kind: a protocol error.
    let (sock, _d) = hostile(started_then(vec![encode(1, &ToHost::Started { pid: 2 })]));
    assert!(exec_against(&sock).is_err());
    // Silence after the sync: the call times out instead of hanging.
    let (sock, _d) = hostile(|_| std::thread::sleep(Duration::from_secs(60)));
    let c = AgentConn::connect("evil", &sock, Duration::from_secs(5)).unwrap();
    let start = Instant::now();
    assert!(c.ping().is_err());
    assert!(start.elapsed() < Duration::from_secs(15));
    // A long error text is cut before it reaches a status.
    let long = encode(
        1,
        &ToHost::Error {
            message: "e".repeat(100_000),
        },
    );
    let (sock, _d) = hostile(move |s| s.write_all(&long).unwrap());
    let e = exec_against(&sock).unwrap_err().to_string();
    assert!(e.len() < 2000, "{}", e.len());
}

#[test]
fn an_agent_that_never_syncs_is_reported_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("mute.sock");
    let l = UnixListener::bind(&sock).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Talks, but never the sync answer.
        let _ = s.write_all(&[0u8; 1000]);
        std::thread::sleep(Duration::from_secs(30));
    });
    let start = Instant::now();
    let e = match AgentConn::connect("mute", &sock, Duration::from_millis(500)) {
        Err(e) => e,
        Ok(_) => panic!("connected to an agent that never answered the sync"),
    };
    assert!(
        matches!(e, BackendError::GuestAgentUnavailable { .. }),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_host_connection_is_forwarded_to_a_guest_port_both_ways() {
    use std::net::{Shutdown, TcpListener, TcpStream};
    let a = agent();
    let c = connect(&a);
    // The "guest" service: upper-cases what it gets, then closes.
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in service.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut all = Vec::new();
                s.read_to_end(&mut all).unwrap();
                s.write_all(&all.to_ascii_uppercase()).unwrap();
            });
        }
    });
    // A host client whose accepted side is forwarded; 3 MiB to go past every window.
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
    let (accepted, _) = front.accept().unwrap();
    let c2 = c.clone();
    let fwd = std::thread::spawn(move || c2.forward(port, accepted));
    let data: Vec<u8> = (0..3 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let mut w = client.try_clone().unwrap();
    let d2 = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&d2).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    client.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(
        back == data.to_ascii_uppercase(),
        "{} bytes back",
        back.len()
    );
    let (sent, received) = fwd.join().unwrap().unwrap();
    assert_eq!((sent, received), (3 << 20, 3 << 20));
    // A port nothing listens on: the guest's error, and the connection lives on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let (x, _) = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        l.accept().unwrap()
    };
    let e = c.forward(dead, x).unwrap_err();
    assert!(matches!(e, BackendError::GuestCommand { .. }), "{e}");
    assert!(c.ping().is_ok());
}

#[test]
fn directories_go_in_and_out_and_the_agent_refuses_escapes() {
    use std::os::unix::fs::PermissionsExt;
    let a = agent();
    let c = connect(&a);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("a/b")).unwrap();
    std::fs::write(src.join("a/b/f"), vec![5u8; 3 << 20]).unwrap();
    std::fs::write(src.join("x.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("x.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("a/b/f", src.join("l")).unwrap();
    let mut tar = Vec::new();
    agentvm_guest::tree::pack(&src, "src", &mut tar).unwrap();

    let into = dir.path().join("in");
    let into_s = into.to_str().unwrap();
    assert_eq!(
        c.stat(into_s).unwrap().kind,
        agentvm_guest::PathKind::Missing
    );
    c.write_tree_from(into_s, "src", &mut &tar[..]).unwrap();
    assert_eq!(
        c.stat(into_s).unwrap().kind,
        agentvm_guest::PathKind::Directory
    );
    assert_eq!(
        std::fs::read(into.join("a/b/f")).unwrap(),
        vec![5u8; 3 << 20]
    );
    assert_eq!(
        std::fs::metadata(into.join("x.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_link(into.join("l")).unwrap(),
        Path::new("a/b/f")
    );
    // Again: the target exists, the agent refuses and the connection lives.
    let e = c.write_tree_from(into_s, "src", &mut &tar[..]).unwrap_err();
    assert!(e.to_string().contains("exists already"), "{e}");

    // Out again, as a tar of the directory under its own name.
    let mut back = Vec::new();
    c.open_tree_reader(into_s, 64 << 20)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    let out = dir.path().join("out");
    agentvm_guest::tree::unpack_new(&back[..], &out, "in").unwrap();
    assert_eq!(
        std::fs::read(out.join("a/b/f")).unwrap(),
        vec![5u8; 3 << 20]
    );
    // Over the cap: an error, not a cut archive.
    let mut r = c.open_tree_reader(into_s, 1 << 20).unwrap();
    assert!(r.read_to_end(&mut Vec::new()).is_err());

    // A hostile archive: an entry climbing out is refused and nothing is made.
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..11].copy_from_slice(b"d/../../esc");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    let mut evil = h.as_bytes().to_vec();
    evil.push(b'x');
    evil.resize(1024 + 1024, 0);
    let target = dir.path().join("evil");
    let e = c
        .write_tree_from(target.to_str().unwrap(), "d", &mut &evil[..])
        .unwrap_err();
    assert!(e.to_string().contains("d/../../esc: path with `..`"), "{e}");
    assert!(!target.exists() && !dir.path().parent().unwrap().join("esc").exists());
    assert!(c.ping().is_ok());
}
