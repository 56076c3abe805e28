//! Egress filtering by domain name, end to end with a real VM (`qemu:///system`, TCG): a NAT
//! network, a `NetworkFilter` whose only egress rule is a domain list, a pool of one VM, and
//! runs that try to get out. "The internet" (its own namespace, 198.18.0.2, see
//! `Internet`) serves DNS for the test names, HTTPS on 443 and HTTP on 80 and 8080; the
//! controller's egress proxy asks that DNS server (`AGENTVM_EGRESS_RESOLVER`) and works in
//! the test namespace (`AGENTVM_EGRESS_NETNS`, set by the harness). Checked: an allowed name works over HTTPS and
//! HTTP; a denied name on an allowed port fails; an IP address without SNI fails; a name
//! whose DNS answers do not include the dialled address fails; a port no rule lists is
//! dropped; the guest's DNS (to its resolver or any other) answers listed names and NXDOMAIN
//! for others, without asking upstream, and NXDOMAIN for a long (tunnel) name under an
//! allowed wildcard; every proxied connection is an `egress` audit event
//! with the right verdict and
//! byte counts; adding a name while a run is live lets that run reach it within seconds;
//! 200 concurrent connections all get through, and a connection that never sends a
//! ClientHello is closed after the proxy's 10 s.
//!
//! Safety: libvirtd runs inside the test namespace (checked first); nothing leaves the
//! machine. Namespace, servers and VMs are removed by drop guards.

mod common;
#[path = "support/exposition.rs"]
mod exposition;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use exposition::{http_get, Exposition};

const SERVER: &str = include_str!("support/egress_internet.py");

fn filter_yaml(name: &str, domains: &[&str]) -> String {
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {name}}}\nspec:\n  egress:\n    - protocol: tcp\n      domains: [{}]\n",
        domains
            .iter()
            .map(|d| format!("\"{d}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `agentvm logs run/NAME` so far.
fn logs(env: &Env, run: &str) -> String {
    let out = env.cmd(&["logs", &format!("run/{run}")]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `egress` audit events (their `details`) of run `run`.
fn egress_events(env: &Env, run: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(env.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event_type"] == "egress" && e["details"]["run"] == run)
        .map(|e| e["details"].clone())
        .collect()
}

fn run_to_end(env: &Env, name: &str, pool: &str, source: &str) -> serde_json::Value {
    apply_yaml(
        env,
        &format!("{name}.yaml"),
        &sh_run(name, pool, source, "  timeoutSeconds: 400\n"),
    );
    env.wait(
        &format!("run {name} ended"),
        Duration::from_secs(500),
        || run_terminal(&run_phase(env, name)),
    );
    env.status("run", name)
}

/// Removes the controller's redirect chain from the test namespace (after the controller is
/// gone): stale rules would steer another test's guest with a reused address to no proxy.
struct SteeringCleanup(String);

impl Drop for SteeringCleanup {
    fn drop(&mut self) {
        for args in [
            &[
                "-w",
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-j",
                "AGENTVM_EGRESS",
            ][..],
            &["-w", "-t", "nat", "-F", "AGENTVM_EGRESS"],
            &["-w", "-t", "nat", "-X", "AGENTVM_EGRESS"],
        ] {
            let mut a = vec!["iptables"];
            a.extend_from_slice(args);
            let _ = in_ns(&self.0, &a).output();
        }
    }
}

fn self_signed(dir: &Path) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    run_ok(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=api.allowed.test",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]));
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

/// One line per check: `LABEL ok BODY` or `LABEL fail`.
const CHECKS: &str = r#"
t() { label=$1; shift; if out=$(curl -sS --max-time 20 "$@" 2>/dev/null); then echo "$label ok $out"; else echo "$label fail"; fi; }
I=198.18.0.2
t https-allowed -k --resolve api.allowed.test:443:$I https://api.allowed.test/
t http-allowed --resolve api.allowed.test:80:$I http://api.allowed.test/
t https-denied -k --resolve denied.test:443:$I https://denied.test/
t http-denied --resolve denied.test:80:$I http://denied.test/
t ip-without-sni -k https://$I/
t address-not-the-names -k --resolve wrongip.allowed.test:443:$I https://wrongip.allowed.test/
t port-not-listed --max-time 5 http://$I:8080/
G=$(ip route | awk '/default/ {print $3; exit}')
t proxy-connect-allowed -k -x http://$G:15080 https://api.allowed.test/
t proxy-connect-denied -k -x http://$G:15080 https://denied.test/
t proxy-http-allowed -x http://$G:15080 http://api.allowed.test/
if a=$(getent hosts api.allowed.test); then echo "dns-allowed ok ${a%% *}"; else echo "dns-allowed fail"; fi
if getent hosts denied.test >/dev/null; then echo "dns-denied ok"; else echo "dns-denied fail"; fi
t https-by-dns -k https://api.allowed.test/
python3 - <<'EOF'
import socket
def q(name):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    labels = b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01", ("198.18.0.2", 53))
    r = s.recv(512)
    return r[3] & 15, r[7]
print("other-resolver-denied rcode=%d answers=%d" % q("denied.test"))
print("other-resolver-allowed rcode=%d answers=%d" % q("api.allowed.test"))
# Data in the labels of a name under the allowed wildcard: a DNS tunnel, refused here.
print("dns-tunnel rcode=%d answers=%d" % q("a" * 40 + "." + "tunnelbbb" * 4 + ".allowed.test"))
EOF
"#;

#[test]
fn guests_reach_only_the_names_their_filter_lists() {
    let test_ns = assert_libvirtd_in_test_netns();
    require_libvirt_and_image();
    let pid = std::process::id();
    let _steering = SteeringCleanup(test_ns.clone());
    let mut env = Env::new("egress");
    let mut inet = Internet::new(&test_ns, "egin");
    let (cert, key) = self_signed(&env.dir);
    let server_log = env.dir.join("internet.log");
    let script = env.write("internet.py", SERVER);
    inet.spawn(
        &[
            "env",
            &format!("CERT={cert}"),
            &format!("KEY={key}"),
            "/usr/bin/python3",
            "-u",
            &script,
            "api.allowed.test=198.18.0.2",
            "later.test=198.18.0.2",
            "denied.test=198.18.0.2",
            "wrongip.allowed.test=198.18.0.99",
        ],
        &server_log,
    );
    for port in [443, 80, 8080] {
        inet.wait_listening('t', port);
    }
    inet.wait_listening('u', 53);

    let net = format!("e2e-egnet-{pid}");
    let filter = format!("e2e-egdom-{pid}");
    let pool = format!("e2eeg{pid}");
    let image = format!("e2e-egimg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    env.networks.push(format!("agentvm-{net}"));
    env.filters.push(format!("agentvm-{filter}"));
    env.controller_env
        .push(("AGENTVM_EGRESS_RESOLVER".into(), "198.18.0.2:53".into()));
    env.controller_env
        .push(("AGENTVM_METRICS_ADDR".into(), "127.0.0.1:0".into()));
    let third = 100 + pid % 150;
    let extra =
        format!("    network: {{mode: attached, networkRef: {net}, filterRef: {filter}}}\n");
    std::fs::write(
        env.specs().join("filter.yaml"),
        filter_yaml(&filter, &["api.allowed.test", "*.allowed.test"]),
    )
    .unwrap();
    std::fs::write(
        env.specs().join("net.yaml"),
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {{name: {net}}}\nspec: {{mode: nat, subnet: 10.215.{third}.0/24}}\n---\n{}",
            small_pool(&pool, &image, 1, 1, &extra)
        ),
    )
    .unwrap();
    env.start_controller();
    env.wait("pool Ready with 1 VM", Duration::from_secs(400), || {
        pool_ready(&env, &pool, 1)
    });

    // 0. The controller keeps the guard around libvirt's nwfilter chains in place
    // (agentvm_backend::filter_guard): its FORWARD jump, deleted here, comes back.
    let iptables = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &test_ns, "iptables", "-w"])
            .args(args)
            .output()
            .unwrap()
    };
    let guard_plan = || {
        let save = Command::new("ip")
            .args(["netns", "exec", &test_ns, "iptables-save", "-t", "filter"])
            .output()
            .unwrap();
        agentvm_backend::filter_guard::plan(&String::from_utf8_lossy(&save.stdout))
    };
    assert!(
        guard_plan().is_empty(),
        "guard after the network started: {:?}",
        guard_plan()
    );
    for tag in ["agentvm-guard-1", "agentvm-guard-2"] {
        let spec = [
            "-D",
            "FORWARD",
            "-m",
            "comment",
            "--comment",
            tag,
            "-j",
            "AGENTVM_GUARD",
        ];
        while iptables(&spec).status.success() {}
    }
    assert!(!guard_plan().jumps.is_empty());
    env.wait(
        "the guard's FORWARD jump back",
        Duration::from_secs(30),
        || guard_plan().is_empty(),
    );
    // The steering rules come back the same way when something flushes their chain.
    let steering = || {
        String::from_utf8_lossy(&iptables(&["-t", "nat", "-S", "AGENTVM_EGRESS"]).stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count()
    };
    env.wait(
        "the guest's steering rules",
        Duration::from_secs(60),
        || steering() > 0,
    );
    let rules = steering();
    assert!(iptables(&["-t", "nat", "-F", "AGENTVM_EGRESS"])
        .status
        .success());
    assert_eq!(steering(), 0);
    env.wait(
        "the steering rules back after a flush",
        Duration::from_secs(30),
        || steering() == rules,
    );

    // 1. What gets through and what does not.
    let s = run_to_end(&env, "checks", &pool, CHECKS);
    // The proxy's connections and bytes reach /metrics.
    let metrics_addr = env
        .log()
        .split("metrics endpoint on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the metrics address in the controller's log")
        .to_string();
    let (code, _, body) = http_get(&metrics_addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    let m = Exposition::parse(&body);
    let metric = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(0.0);
    assert!(
        metric(
            "agentvm_egress_connections_total",
            &[("pool", &pool), ("verdict", "allowed")]
        ) >= 2.0,
        "{body}"
    );
    for direction in ["out", "in"] {
        assert!(
            metric(
                "agentvm_egress_bytes_total",
                &[("pool", &pool), ("direction", direction)]
            ) > 0.0,
            "{direction}: {body}"
        );
    }
    let out = s["stdoutTail"].as_str().unwrap_or_default().to_string();
    eprintln!(
        "checks from the guest:\n{out}\ninternet log:\n{}",
        std::fs::read_to_string(&server_log).unwrap_or_default()
    );
    let verdict = |label: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{label} ")))
            .unwrap_or_else(|| panic!("no line for {label}: {s}"))
            .to_string()
    };
    assert_eq!(verdict("https-allowed"), "ok hello api.allowed.test");
    assert_eq!(verdict("http-allowed"), "ok hello api.allowed.test");
    for label in [
        "https-denied",
        "http-denied",
        "ip-without-sni",
        "address-not-the-names",
        "port-not-listed",
        "dns-denied",
        "proxy-connect-denied",
    ] {
        assert_eq!(verdict(label), "fail", "{label} must fail");
    }
    // DNS answers only listed names, whichever server the guest asks; a denied name never
    // reaches the resolver.
    // The proxy named explicitly (HTTPS_PROXY / HTTP_PROXY) applies the same list.
    assert_eq!(
        verdict("proxy-connect-allowed"),
        "ok hello api.allowed.test"
    );
    assert_eq!(verdict("proxy-http-allowed"), "ok hello api.allowed.test");
    assert_eq!(verdict("dns-allowed"), "ok 198.18.0.2");
    assert_eq!(verdict("https-by-dns"), "ok hello api.allowed.test");
    assert_eq!(verdict("other-resolver-denied"), "rcode=3 answers=0");
    assert_eq!(verdict("other-resolver-allowed"), "rcode=0 answers=1");
    assert_eq!(verdict("dns-tunnel"), "rcode=3 answers=0");
    let asked = std::fs::read_to_string(&server_log).unwrap();
    assert!(!asked.contains("dns denied.test"), "{asked}");
    assert!(
        !asked.contains("tunnelbbb"),
        "the tunnel query reached the resolver: {asked}"
    );
    // The connection log: one event per proxied connection, in order, with its verdict.
    let all_events = egress_events(&env, "checks");
    let dns_denied: Vec<&serde_json::Value> = all_events
        .iter()
        .filter(|e| e["verdict"] == "dns_denied")
        .collect();
    assert!(
        dns_denied.iter().any(|e| e["domain"] == "denied.test")
            && dns_denied.iter().any(|e| e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("likely DNS tunnel")))
            && dns_denied.iter().all(|e| e["domain"] == "denied.test"
                || e["domain"]
                    .as_str()
                    .is_some_and(|d| d.contains("tunnelbbb"))),
        "{dns_denied:#?}"
    );
    assert!(
        all_events.iter().all(|e| e["verdict"] != "dns_allowed"),
        "allowed lookups are counted, not audited"
    );
    let events: Vec<serde_json::Value> =
        all_events.into_iter().filter(|e| e["port"] != 53).collect();
    let seen: Vec<(String, String, u64)> = events
        .iter()
        .map(|e| {
            (
                e["verdict"].as_str().unwrap().to_string(),
                e["domain"].as_str().unwrap_or("-").to_string(),
                e["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("allowed".into(), "api.allowed.test".into(), 443),
            ("allowed".into(), "api.allowed.test".into(), 80),
            ("denied".into(), "denied.test".into(), 443),
            ("denied".into(), "denied.test".into(), 80),
            ("no_name".into(), "-".into(), 443),
            (
                "address_mismatch".into(),
                "wrongip.allowed.test".into(),
                443
            ),
            ("allowed".into(), "api.allowed.test".into(), 443),
            ("denied".into(), "denied.test".into(), 443),
            ("allowed".into(), "api.allowed.test".into(), 80),
            ("allowed".into(), "api.allowed.test".into(), 443),
        ],
        "{events:#?}"
    );
    for e in &events[..2] {
        assert!(e["bytesOut"].as_u64().unwrap() > 50, "{e}");
        assert!(e["bytesIn"].as_u64().unwrap() > 50, "{e}");
        assert_eq!(e["address"], "198.18.0.2");
    }
    for e in &events[2..6] {
        assert_eq!(
            (e["bytesOut"].as_u64(), e["bytesIn"].as_u64()),
            (Some(0), Some(0)),
            "{e}"
        );
    }
    // The run's summary in its status, shown by `describe`.
    let summary = &s["egress"];
    assert_eq!(summary["allowed"], 5, "{summary:#}");
    assert!(summary["refused"].as_u64().unwrap() >= 4, "{summary:#}");
    let dest = |domain: &str, port: u64, verdict: &str| {
        summary["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["domain"] == domain && d["port"] == port && d["verdict"] == verdict)
    };
    assert!(dest("api.allowed.test", 443, "allowed"), "{summary:#}");
    assert!(dest("denied.test", 443, "denied"), "{summary:#}");
    assert!(dest("denied.test", 53, "dns_denied"), "{summary:#}");
    let described = env.ok(&["describe", "run/checks"]);
    assert!(
        described.contains("egress:") && described.contains("address_mismatch"),
        "{described}"
    );
    assert!(
        env.log().contains("egress refused: denied.test"),
        "refusals are logged"
    );

    // 2. A name added while a run is live: reachable within seconds, no reboot.
    let live = r#"for i in $(seq 150); do
  if curl -sk --max-time 5 --resolve later.test:443:198.18.0.2 https://later.test/ >/dev/null; then echo "ok after $i"; exit 0; fi
  echo "fail $i"; sleep 1
done; exit 1"#;
    apply_yaml(
        &env,
        "live.yaml",
        &sh_run("live", &pool, live, "  timeoutSeconds: 400\n"),
    );
    env.wait(
        "the live run failing to reach later.test",
        Duration::from_secs(300),
        || logs(&env, "live").contains("fail 2"),
    );
    std::fs::write(
        env.specs().join("filter.yaml"),
        filter_yaml(
            &filter,
            &["api.allowed.test", "*.allowed.test", "later.test"],
        ),
    )
    .unwrap();
    let changed = Instant::now();
    env.wait("run live ended", Duration::from_secs(300), || {
        run_terminal(&run_phase(&env, "live"))
    });
    let took = changed.elapsed();
    let s = env.status("run", "live");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    eprintln!(
        "filter change to success in the live run: {took:?} ({})",
        s["stdoutTail"]
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    let live_events = egress_events(&env, "live");
    assert!(live_events.iter().any(|e| e["verdict"] == "denied"));
    assert_eq!(live_events.last().unwrap()["verdict"], "allowed");

    // 3. Load: 200 concurrent connections (the server holds each 2 s), and one that never
    // says where it goes.
    let load = r#"exec python3 - <<'EOF'
import socket, threading, time
ok = []
def one():
    try:
        s = socket.create_connection(("198.18.0.2", 80), timeout=120)
        s.sendall(b"GET /slow HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            d = s.recv(4096)
            if not d:
                break
            data += d
        if data.endswith(b"hello api.allowed.test"):
            ok.append(1)
    except Exception as e:
        print("error", e)
t0 = time.time()
ts = [threading.Thread(target=one) for _ in range(200)]
for t in ts: t.start()
for t in ts: t.join()
print("concurrent ok", len(ok), "in %.1f s" % (time.time() - t0))
s = socket.create_connection(("198.18.0.2", 443), timeout=60)
t0 = time.time()
try:
    r = s.recv(1)
    print("silent closed after %.1f s" % (time.time() - t0), r)
except Exception as e:
    print("silent error after %.1f s" % (time.time() - t0), e)
EOF"#;
    let s = run_to_end(&env, "load", &pool, load);
    let out = s["stdoutTail"].as_str().unwrap_or_default().to_string();
    eprintln!("load:\n{out}");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert!(out.contains("concurrent ok 200 in"), "{out}");
    let silent: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("silent closed after "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the silent connection was not closed: {out}"));
    assert!((8.0..40.0).contains(&silent), "{silent}");
    let load_events = egress_events(&env, "load");
    assert_eq!(
        load_events
            .iter()
            .filter(|e| e["verdict"] == "allowed")
            .count(),
        200
    );
    assert!(load_events.iter().any(|e| e["verdict"] == "timeout"));

    // 4. Throughput: 100 MiB over HTTPS through the proxy, then (the filter switched live to
    // a plain tcp/443 rule: no proxy) straight through NAT, on the same VM.
    let download = "curl -sk --resolve api.allowed.test:443:198.18.0.2 -o /dev/null \
        -w '%{size_download} %{time_total}\\n' 'https://api.allowed.test/big?104857600'";
    let bench = |env: &Env, name: &str| -> (u64, f64) {
        let s = run_to_end(env, name, &pool, download);
        assert_eq!(s["phase"], "Succeeded", "{s}");
        let out = s["stdoutTail"].as_str().unwrap().trim().to_string();
        let mut f = out.split(' ');
        (
            f.next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{out}")),
            f.next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{out}")),
        )
    };
    let (bytes, proxied) = bench(&env, "bench-proxy");
    assert_eq!(bytes, 104_857_600);
    let e = egress_events(&env, "bench-proxy");
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0]["bytesIn"].as_u64().unwrap() > 104_857_600, "{e:#?}");
    std::fs::write(
        env.specs().join("filter.yaml"),
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {filter}}}\nspec:\n  egress:\n    - {{protocol: tcp, ports: [443]}}\n"
        ),
    )
    .unwrap();
    env.wait("the redirect rules gone", Duration::from_secs(60), || {
        !run_ok(&mut in_ns(
            &test_ns,
            &["iptables", "-t", "nat", "-S", "AGENTVM_EGRESS"],
        ))
        .contains("REDIRECT")
    });
    std::thread::sleep(Duration::from_secs(3)); // libvirt re-applies the nwfilter
    let (bytes, direct) = bench(&env, "bench-nat");
    assert_eq!(bytes, 104_857_600);
    assert!(egress_events(&env, "bench-nat").is_empty(), "not proxied");
    let mib = |secs: f64| 100.0 / secs;
    eprintln!(
        "100 MiB over HTTPS: through the egress proxy {proxied:.1} s ({:.1} MiB/s), plain NAT {direct:.1} s ({:.1} MiB/s)",
        mib(proxied),
        mib(direct)
    );

    // 5. A sandbox's connections are audited under the sandbox: the domain filter back, a
    // sandbox of the pool, a request that passes and one that does not.
    std::fs::write(
        env.specs().join("filter.yaml"),
        filter_yaml(&filter, &["api.allowed.test"]),
    )
    .unwrap();
    env.wait("the redirect rules back", Duration::from_secs(60), || {
        run_ok(&mut in_ns(
            &test_ns,
            &["iptables", "-t", "nat", "-S", "AGENTVM_EGRESS"],
        ))
        .contains("REDIRECT")
    });
    std::thread::sleep(Duration::from_secs(3)); // libvirt re-applies the nwfilter
    let sandbox = format!("egsbx{pid}");
    std::fs::write(
        env.specs().join("sandbox.yaml"),
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {sandbox}}}\nspec: {{poolRef: {pool}, idleTimeoutSeconds: 0}}\n"),
    )
    .unwrap();
    env.wait("the sandbox Running", Duration::from_secs(300), || {
        env.status("sandbox", &sandbox)["phase"] == "Running"
    });
    let curl = |name: &str| {
        env.code(&[
            "exec",
            &format!("sandbox/{sandbox}"),
            "--",
            "curl",
            "-sS",
            "-k",
            "--max-time",
            "20",
            "--resolve",
            &format!("{name}:443:198.18.0.2"),
            &format!("https://{name}/"),
        ])
    };
    let (code, out, _) = curl("api.allowed.test");
    assert_eq!((code, out.trim()), (0, "hello api.allowed.test"));
    assert_ne!(curl("denied.test").0, 0);
    let events: Vec<serde_json::Value> = std::fs::read_to_string(env.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event_type"] == "egress" && e["kind"] == "Sandbox" && e["name"] == sandbox)
        .collect();
    let verdicts: Vec<&str> = events
        .iter()
        .map(|e| e["details"]["verdict"].as_str().unwrap_or_default())
        .collect();
    assert!(
        verdicts.contains(&"allowed") && verdicts.contains(&"denied"),
        "the sandbox's egress events: {events:#?}"
    );
    assert!(events
        .iter()
        .all(|e| e["details"]["sandbox"] == sandbox.as_str()));

    drop(env);
    drop(inet);
}
