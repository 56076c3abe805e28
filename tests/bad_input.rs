//! Bad input through every entry point of the real `agentvm` binary, against a controller
//! without reconcilers (no libvirt needed):
//!
//! - the malformed-manifest corpus (`crates/agentvm-api/tests/malformed`, each file with
//!   its expected errors) through the spec-dir watch, `agentvm apply -f`, and raw API
//!   requests;
//! - raw HTTP abuse of the API socket: oversized, malformed, truncated and slow requests,
//!   wrong content types, unknown paths and methods, connection floods;
//! - the socket's permissions: other users are refused, members of the configured group
//!   are admitted.
//!
//! After each, the controller must be alive, answer, and have stored nothing it refused.

mod plain_controller;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plain_controller::{eventually, PlainController, BIN};

const EXPECT: &str = "# expect: ";

fn api_crate() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agentvm-api")
}

/// The corpus: (file name, bytes, expected error lines).
fn corpus() -> Vec<(String, Vec<u8>, Vec<String>)> {
    let dir = api_crate().join("tests/malformed");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 70, "corpus has {} files", files.len());
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let expected = String::from_utf8_lossy(&bytes)
                .lines()
                .filter_map(|l| l.strip_prefix(EXPECT).map(str::to_string))
                .collect::<Vec<_>>();
            assert!(!expected.is_empty(), "{} has no expectations", p.display());
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                bytes,
                expected,
            )
        })
        .collect()
}

/// An error line without its `…/file.yaml` prefix: `:line:column: field: message`.
fn after_file<'a>(line: &'a str, file: &str) -> &'a str {
    match line.find(file) {
        Some(i) => &line[i + file.len()..],
        None => line,
    }
}

fn controller(tag: &str) -> (tempfile::TempDir, PlainController) {
    let dir = tempfile::Builder::new()
        .prefix(&format!("agentvm-badinput-{tag}-"))
        .tempdir()
        .unwrap();
    let c = PlainController::new(&dir.path().join("state"), &dir.path().join("api.sock"));
    (dir, c)
}

// ---------------------------------------------------------------------------------------
// Raw HTTP on the socket.

/// A raw response: status (0 when the server closed without answering), headers, body.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn parse_raw(bytes: &[u8]) -> Raw {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Raw {
        status,
        head: head.to_string(),
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

/// Sends `request` as is, half-closes, reads the answer to EOF.
fn send(socket: &Path, request: &[u8]) -> Raw {
    let mut s = connect(socket);
    // The server may answer and close before reading everything (413): ignore write errors.
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_raw(&buf)
}

fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: agentvm\r\nConnection: close\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        && (!body.is_empty() || method == "POST")
    {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn post_json(socket: &Path, body: &[u8]) -> Raw {
    send(
        socket,
        &request(
            "POST",
            "/v1/apply",
            &[("Content-Type", "application/json")],
            body,
        ),
    )
}

fn healthy(socket: &Path) -> bool {
    let r = send(socket, &request("GET", "/healthz", &[], b""));
    r.status == 200 && r.json()["ok"] == true
}

fn object_count(socket: &Path) -> u64 {
    let r = send(socket, &request("GET", "/healthz", &[], b""));
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["objects"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------------------

#[test]
fn the_corpus_through_apply_f_fails_with_the_expected_errors_and_stores_nothing() {
    let (_dir, mut c) = controller("apply");
    c.start();
    let mut failures = Vec::new();
    for (name, _, expected) in corpus() {
        let path = format!("tests/malformed/{name}");
        let out = c
            .cmd(&["apply", "-f", &path])
            .current_dir(api_crate())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(1) {
            failures.push(format!("{name}: exit {:?}: {stderr}", out.status.code()));
            continue;
        }
        let missing: Vec<&String> = expected
            .iter()
            .filter(|e| !stderr.lines().any(|l| l.trim_end() == e.as_str()))
            .collect();
        if !missing.is_empty() {
            failures.push(format!("{name}: missing {missing:?} in:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(c.alive());
    assert_eq!(object_count(&c.socket), 0);
    assert!(c.stop(), "{}", c.log_text());
}

#[test]
fn the_corpus_in_the_spec_dir_is_reported_per_file_while_good_files_sync() {
    let (dir, mut c) = controller("specdir");
    let specs = dir.path().join("specs");
    std::fs::create_dir(&specs).unwrap();
    let good = |suite: &str| {
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: good-image\nspec:\n  suite: {suite}\n---\napiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata:\n  name: good-net\nspec:\n  mode: isolated\n  subnet: 10.78.0.0/24\n"
        )
    };
    std::fs::write(specs.join("good.yaml"), good("bookworm")).unwrap();
    c.spec_dir = Some(specs.clone());
    c.start();
    eventually("the good file's objects", 30, || {
        c.names() == ["image/good-image", "network/good-net"]
    });

    // Every corpus file at once.
    let corpus = corpus();
    for (name, bytes, _) in &corpus {
        std::fs::write(specs.join(name), bytes).unwrap();
    }
    // Files that are not manifests at all: too big, a FIFO nobody writes to, a symlink to
    // an endless device. The big one is reported; the others are not regular files and are
    // skipped (opening the FIFO would block the spec-dir pass forever).
    std::fs::write(specs.join("huge.yaml"), vec![b'#'; 5 * 1024 * 1024]).unwrap();
    let mkfifo = Command::new("mkfifo")
        .arg(specs.join("fifo.yaml"))
        .status()
        .unwrap();
    assert!(mkfifo.success());
    std::os::unix::fs::symlink("/dev/zero", specs.join("zero.yaml")).unwrap();
    let reports = || -> serde_json::Value {
        let r = send(&c.socket, &request("GET", "/v1/specdir/errors", &[], b""));
        assert_eq!(r.status, 200, "{r:?}");
        r.json()["specDir"].clone()
    };
    eventually("a report for every corpus file", 60, || {
        reports()["reports"].as_array().map_or(0, Vec::len) > corpus.len()
    });
    let all = reports();
    let huge = all["reports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["file"] == "huge.yaml")
        .expect("huge.yaml reported");
    assert!(
        huge["errors"][0]
            .as_str()
            .unwrap()
            .contains("a manifest source may be at most 4194304 bytes"),
        "{huge}"
    );
    assert_eq!(
        all["reports"].as_array().unwrap().len(),
        corpus.len() + 1,
        "only the corpus and huge.yaml have problems: {all}"
    );
    // The good file still syncs: an edit lands, a new good file lands.
    std::fs::write(specs.join("good.yaml"), good("trixie")).unwrap();
    std::fs::write(
        specs.join("zz-later.yaml"),
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: later\nspec: {}\n",
    )
    .unwrap();
    eventually("the edit and the new file", 60, || {
        let y = c.run(&["get", "img", "good-image", "-o", "yaml"]);
        String::from_utf8_lossy(&y.stdout).contains("suite: trixie")
            && c.run(&["get", "img", "later"]).status.success()
    });

    let state = reports();
    let mut failures = Vec::new();
    for (name, _, expected) in &corpus {
        let Some(report) = state["reports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["file"] == name.as_str())
        else {
            failures.push(format!("{name}: no report"));
            continue;
        };
        let got: Vec<String> = report["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect();
        // Messages that cite another place name it by its path in the spec dir.
        let specs_prefix = format!("{}/", specs.display());
        let got: Vec<String> = got
            .iter()
            .map(|l| l.replace(&specs_prefix, "tests/malformed/"))
            .collect();
        let got_tails: Vec<&str> = got.iter().map(|l| after_file(l, name)).collect();
        let want_tails: Vec<&str> = expected.iter().map(|l| after_file(l, name)).collect();
        if got_tails != want_tails {
            failures.push(format!(
                "{name}:\n  expected {want_tails:#?}\n  got {got:#?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing from the corpus was stored.
    assert_eq!(
        c.names(),
        ["image/good-image", "image/later", "network/good-net"]
    );
    assert!(c.alive());
    assert!(c.stop(), "{}", c.log_text());
}

/// YAML documents as JSON values, the way a client would send them; `None` when the
/// bytes are not YAML a generic parser accepts.
fn yaml_to_json(bytes: &[u8]) -> Option<Vec<serde_json::Value>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc).ok()?;
        if value.is_null() {
            continue;
        }
        out.push(serde_json::to_value(value).ok()?);
    }
    Some(out)
}

use serde::Deserialize;

#[test]
fn the_corpus_as_raw_api_requests_is_refused_and_stores_nothing() {
    let (_dir, mut c) = controller("rawcorpus");
    c.start();
    let mut failures = Vec::new();
    let mut as_json = 0;
    let mut yaml_only = 0;
    for (name, bytes, _) in corpus() {
        // The file itself as the body: not JSON (400), or not JSON-typed (415).
        let r = post_json(&c.socket, &bytes);
        if r.status != 400 || !r.error().starts_with("invalid request body") {
            failures.push(format!("{name} as JSON body: {r:?}"));
        }
        let r = send(
            &c.socket,
            &request(
                "POST",
                "/v1/apply",
                &[("Content-Type", "application/yaml")],
                &bytes,
            ),
        );
        if r.status != 415 || !r.error().contains("send the objects as JSON") {
            failures.push(format!("{name} as YAML body: {r:?}"));
        }
        // Converted to JSON objects the way a client would. Files whose only fault is in
        // the YAML itself (an empty document, say) convert to valid objects: the API must
        // accept exactly those (tried as a dry run), and refuse every other with details.
        let Some(objects) = yaml_to_json(&bytes) else {
            continue;
        };
        if objects.is_empty() {
            continue;
        }
        as_json += 1;
        let reserialised: Vec<String> = objects
            .iter()
            .map(|o| serde_yaml::to_string(o).unwrap())
            .collect();
        let valid_as_objects = agentvm_api::parse_str(&reserialised.join("---\n"), "x").is_ok();
        let body = serde_json::json!({ "objects": objects, "dryRun": valid_as_objects });
        let r = post_json(&c.socket, body.to_string().as_bytes());
        if valid_as_objects {
            yaml_only += 1;
            if r.status != 200 || r.json()["dryRun"] != true {
                failures.push(format!("{name} as valid JSON objects: {r:?}"));
            }
            continue;
        }
        let details = r.json()["details"].as_array().map_or(0, Vec::len);
        if r.status != 422 || r.error() != "invalid objects; nothing was applied" || details == 0 {
            failures.push(format!("{name} as JSON objects: {r:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        as_json >= 50,
        "only {as_json} corpus files converted to JSON"
    );
    assert!(
        yaml_only <= 5,
        "{yaml_only} files were valid as JSON objects"
    );
    assert!(c.alive());
    assert_eq!(object_count(&c.socket), 0);
    assert!(c.stop(), "{}", c.log_text());
}

#[test]
fn malformed_oversized_and_misrouted_requests_get_clear_errors() {
    let (_dir, mut c) = controller("raw");
    c.start();
    let s = c.socket.clone();
    let image =
        r#"{"apiVersion":"agentvm.dev/v1alpha1","kind":"Image","metadata":{"name":"i"},"spec":{}}"#;

    // Oversized: a 9 MiB body, sent in full.
    let big = vec![b' '; 9 * 1024 * 1024];
    let r = post_json(&s, &big);
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.error().contains("larger than 8 MiB"), "{r:?}");
    // Announced as 100 GiB but never sent: refused at once, not awaited.
    let started = Instant::now();
    let r = send(
        &s,
        &request(
            "POST",
            "/v1/apply",
            &[("Content-Length", "107374182400")],
            b"{",
        ),
    );
    assert_eq!(r.status, 413, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // Chunked, without a length, past the limit.
    let mut chunked = b"POST /v1/apply HTTP/1.1\r\nHost: a\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..10 {
        chunked.extend_from_slice(format!("{:x}\r\n", 1024 * 1024).as_bytes());
        chunked.extend(std::iter::repeat_n(b' ', 1024 * 1024));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = send(&s, &chunked);
    assert_eq!(r.status, 413, "{r:?}");

    // Malformed bodies.
    for (body, want) in [
        (&b"{nope"[..], "invalid request body"),
        (b"", "invalid request body"),
        (b"[]", "invalid request body"),
        (b"null", "invalid request body"),
        (br#"{"objects": 5}"#, "invalid request body"),
        (
            br#"{"objects": [], "dryRun": "yes"}"#,
            "invalid request body",
        ),
        (b"\xff\xfe\x00garbage", "invalid request body"),
    ] {
        let r = post_json(&s, body);
        assert_eq!(r.status, 400, "{body:?}: {r:?}");
        assert!(r.error().starts_with(want), "{body:?}: {r:?}");
    }
    // 100 000 nested arrays: refused by the parser's depth limit, no stack overflow.
    let mut deep = br#"{"objects":["#.to_vec();
    deep.extend(std::iter::repeat_n(b'[', 100_000));
    let r = post_json(&s, &deep);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().contains("recursion limit"), "{r:?}");
    // Well-formed JSON, bad objects: 422 with per-object details.
    let body = format!(
        r#"{{"objects":[{image},{{"apiVersion":"agentvm.dev/v1alpha1","kind":"Image","metadata":{{"name":"j"}},"spec":{{"sute":"x"}}}},{{"kind":"Nope"}},{image}]}}"#
    );
    let r = post_json(&s, body.as_bytes());
    assert_eq!(r.status, 422, "{r:?}");
    let details: Vec<String> = r.json()["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(details.len(), 3, "{details:?}");
    assert!(details[0].starts_with("objects[1]: ") && details[0].contains("sute"));
    assert!(details[1].starts_with("objects[2]: "), "{details:?}");
    assert!(details[2].contains("declared twice"), "{details:?}");

    // Content types: JSON (with parameters) or none are accepted; others are 415.
    let ok_body = format!(r#"{{"objects":[{image}],"dryRun":true}}"#);
    for ct in [
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        None,
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|v| ("Content-Type", v)).into_iter().collect();
        let r = send(
            &s,
            &request("POST", "/v1/apply", &headers, ok_body.as_bytes()),
        );
        assert_eq!(r.status, 200, "{ct:?}: {r:?}");
    }
    for ct in [
        "application/yaml",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let r = send(
            &s,
            &request(
                "POST",
                "/v1/apply",
                &[("Content-Type", ct)],
                ok_body.as_bytes(),
            ),
        );
        assert_eq!(r.status, 415, "{ct}: {r:?}");
        assert!(r.error().contains(ct), "{r:?}");
    }

    // Unknown paths and methods, bad query strings and path parts: JSON errors.
    for (method, path, status, want) in [
        ("GET", "/v2/apply", 404, "no such endpoint"),
        ("GET", "/", 404, "no such endpoint"),
        ("GET", "/v1/objects/pool", 404, "no such endpoint"),
        ("PUT", "/v1/apply", 405, "this endpoint accepts POST"),
        ("GET", "/v1/apply", 405, "this endpoint accepts POST"),
        ("POST", "/v1/objects", 405, "this endpoint accepts GET"),
        ("PATCH", "/v1/objects/pool/x", 405, "this endpoint accepts"),
        ("DELETE", "/v1/objects/pool/x?force=maybe", 400, "force"),
        ("GET", "/v1/runs/x/logs?offset=-1", 400, "offset"),
        ("GET", "/v1/objects?kind=vmpol", 400, "did you mean"),
        (
            "GET",
            "/v1/objects?selector=a%20b",
            400,
            "invalid label selector",
        ),
        ("GET", "/v1/objects/nokind/x", 400, "nokind"),
        (
            "GET",
            "/v1/objects/pool/..%2F..%2Fetc%2Fpasswd",
            404,
            "not found",
        ),
        ("GET", "/v1/objects/pool/%ff%fe", 400, ""),
        ("GET", "/v1/runs/nope/logs", 404, "not found"),
        ("BREW", "/v1/apply", 405, "this endpoint accepts POST"),
    ] {
        let r = send(&s, &request(method, path, &[], b""));
        assert_eq!(r.status, status, "{method} {path}: {r:?}");
        assert!(
            r.head
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{method} {path}: {r:?}"
        );
        assert!(r.error().contains(want), "{method} {path}: {r:?}");
    }

    // Not HTTP at all: 400 from the HTTP parser, or the connection closed; a head over
    // 64 KiB: 431.
    for (garbage, status) in [
        (&b"\x00\x01\x02\x03garbage\r\n\r\n"[..], 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 400),
        (b"GET /healthz\r\n\r\n", 400),
    ] {
        let r = send(&s, garbage);
        assert_eq!(r.status, status, "{garbage:?}: {r:?}");
    }
    let long_path = format!("/v1/objects/pool/{}", "a".repeat(200 * 1024));
    let r = send(&s, &request("GET", &long_path, &[], b""));
    assert_eq!(r.status, 431, "{r:?}");
    let many_headers: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("X-Pad-{i}"), "v".repeat(64)))
        .collect();
    let refs: Vec<(&str, &str)> = many_headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r = send(&s, &request("GET", "/healthz", &refs, b""));
    assert_eq!(r.status, 431, "{r:?}");

    // Truncated: the body ends (the client closes) before Content-Length.
    let mut truncated = request(
        "POST",
        "/v1/apply",
        &[
            ("Content-Length", "1000"),
            ("Content-Type", "application/json"),
        ],
        b"",
    );
    truncated.extend_from_slice(&ok_body.as_bytes()[..20]);
    let r = send(&s, &truncated);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.error().starts_with("reading the request body"), "{r:?}");
    // Truncated in the head: closed without an answer.
    let r = send(&s, b"POST /v1/apply HTTP/1.1\r\nContent-Le");
    assert_eq!(r.status, 0, "{r:?}");

    assert!(c.alive(), "{}", c.log_text());
    assert!(healthy(&s));
    assert_eq!(object_count(&s), 0, "a refused request stored something");
    assert!(c.stop(), "{}", c.log_text());
}

#[test]
fn slow_and_flooding_clients_are_cut_off_and_do_not_block_others_or_shutdown() {
    let (_dir, mut c) = controller("slow");
    c.start();
    let s = c.socket.clone();

    // A client that never finishes its head is disconnected after the header timeout (10 s).
    let slow_head = std::thread::spawn({
        let s = s.clone();
        move || {
            let mut conn = connect(&s);
            conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
                .unwrap();
            let started = Instant::now();
            let mut buf = Vec::new();
            let _ = conn.read_to_end(&mut buf);
            (started.elapsed(), parse_raw(&buf))
        }
    });
    // A client that sends its head, then never its body, gets 408 after 30 s.
    let slow_body = std::thread::spawn({
        let s = s.clone();
        move || {
            let mut conn = connect(&s);
            conn.write_all(
                b"POST /v1/apply HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"obj",
            )
            .unwrap();
            let started = Instant::now();
            let mut buf = Vec::new();
            let _ = conn.read_to_end(&mut buf);
            (started.elapsed(), parse_raw(&buf))
        }
    });
    // Meanwhile others are served at once.
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    assert!(healthy(&s));
    assert!(started.elapsed() < Duration::from_secs(2));

    let (took, r) = slow_head.join().unwrap();
    assert!(
        took >= Duration::from_secs(8) && took < Duration::from_secs(30),
        "slow head cut after {took:?}"
    );
    assert!(r.status == 0 || r.status == 408, "{r:?}");
    let (took, r) = slow_body.join().unwrap();
    assert!(
        took >= Duration::from_secs(25) && took < Duration::from_secs(60),
        "slow body cut after {took:?}"
    );
    assert_eq!(r.status, 408, "{r:?}");
    assert!(r.error().contains("did not arrive within 30 s"), "{r:?}");

    // A flood: 400 connections that each send half a head and hang. The server takes at
    // most 256 at a time; the rest wait in the backlog. A normal client is still answered
    // (at worst once the header timeout frees slots), and the controller's open files stay
    // bounded.
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    let fds_before = fds(c.pid());
    let mut flood = Vec::new();
    for _ in 0..400 {
        match UnixStream::connect(&s) {
            Ok(mut conn) => {
                let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\n");
                flood.push(conn);
            }
            Err(_) => break, // the backlog is full: refused, fine
        }
    }
    assert!(
        flood.len() >= 256,
        "only {} connections opened",
        flood.len()
    );
    std::thread::sleep(Duration::from_millis(500));
    let fds_during = fds(c.pid());
    assert!(
        fds_during <= fds_before + 256 + 8,
        "controller holds {fds_during} fds (before: {fds_before})"
    );
    let started = Instant::now();
    let mut conn = connect(&s);
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(&request("GET", "/healthz", &[], b""))
        .unwrap();
    let mut buf = Vec::new();
    let _ = conn.read_to_end(&mut buf);
    let r = parse_raw(&buf);
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "answered after {:?}",
        started.elapsed()
    );
    drop(flood);
    eventually("the flood's connections closed", 30, || {
        fds(c.pid()) <= fds_before + 8
    });

    // Shutdown is not held up by a client that never finishes its request.
    let mut hanging = connect(&s);
    hanging
        .write_all(b"POST /v1/apply HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\n{")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    assert!(c.stop(), "{}", c.log_text());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?}",
        started.elapsed()
    );
    assert!(!s.exists(), "socket left behind");
}

// ---------------------------------------------------------------------------------------
// Socket permissions.

/// Runs `agentvm get all` as uid/gid 65534 (nobody) with the given supplementary groups.
fn as_nobody(c: &PlainController, groups: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534"]);
    match groups {
        Some(g) => cmd.arg(format!("--groups={g}")),
        None => cmd.arg("--clear-groups"),
    };
    let inner = c.cmd(&["get", "all", "-o", "name"]);
    cmd.arg(BIN).args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.env("HOME", "/nonexistent")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_api_socket_refuses_other_users_and_admits_its_group() {
    let (dir, mut c) = controller("perm");
    // nobody must be able to reach the socket's directory and run the binary, so that the
    // socket's own mode is what decides.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start();
    c.ok(&["apply", "-f", "../../examples/hello-isolated.yaml"]);
    let meta = std::fs::metadata(&c.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "owner root, group root");

    // Another user: refused, with a message that says why and what to do; exit 3.
    let out = as_nobody(&c, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("Permission denied")
            && err.contains("mode 0660")
            && err.contains("AGENTVM_SOCKET_GROUP"),
        "{err}"
    );
    // Even a member of some other group.
    let out = as_nobody(&c, Some("4242"));
    assert_eq!(out.status.code(), Some(3));
    assert!(c.stop());

    // With a socket group (a numeric GID here, so the test adds no group to the host):
    // members get in, others still do not.
    c.env.push(("AGENTVM_SOCKET_GROUP".into(), "4242".into()));
    c.start();
    let meta = std::fs::metadata(&c.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, 4242));
    let out = as_nobody(&c, Some("4242"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(names.contains("vmpool/sandbox"), "{names}");
    let out = as_nobody(&c, None);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("group 4242"), "{err}");
    assert!(c.stop());

    // An unknown group name stops the controller from starting, with a clear error.
    let out = c
        .cmd(&["controller", "--without-reconcilers", "--socket"])
        .arg(&c.socket)
        .env("AGENTVM_SOCKET_GROUP", "no-such-group-agentvm")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("group \"no-such-group-agentvm\" is not in /etc/group"),
        "{err}"
    );
    assert!(!c.socket.exists());
}
