//! Tier 3: libvirt networks and nwfilters for real, with QEMU guests (TCG) booted from
//! agentvm's guest image: the default egress filter lets a guest reach tcp/443 and not tcp/8080
//! on a host in a fake "internet" (and so does a fork of that guest, with a MAC and an
//! address of its own), an isolated guest has no route anywhere, and guests on one
//! network cannot reach each other.
//!
//! Safety: nothing here may touch the network of the machine the tests run on. libvirtd must
//! run inside the test network namespace (`$AGENTVM_TEST_NETNS`, default `agentvm-test`;
//! `scripts/test.sh` starts it there) — every test checks this before defining a network and
//! panics otherwise. The "internet" is one more namespace joined to the test namespace by a
//! veth pair in the benchmark range 198.18.0.0/30, with no route anywhere else. Everything a
//! test creates (domains, networks, filters, servers, veth, namespace) is removed by drop
//! guards, also when the test fails. Only processes the tests started are killed, by pid.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentvm_api::NetworkFilterSpec;
use agentvm_api::{NetworkMode, NetworkSpec};
use agentvm_backend::guest::{ExecRequest, Guest};
use agentvm_backend::libvirt_net::DefineOutcome;
use agentvm_backend::netxml::{libvirt_name, parse_nwfilter, NetworkDef, NwFilterDef};
use agentvm_backend::vm::default_state_dir;
use agentvm_backend::{AcceleratorChoice, EphemeralVm, LibvirtBackend, VmRequest};
use agentvm_backend::{BackendError, Libvirt, NicSpec, Owner};

mod common;
use common::{libvirt, request};

/// The "internet" host's address, inside the inet namespace.
const INET_HOST: &str = "198.18.0.2";
/// The test namespace's end of the veth pair.
const INET_GATEWAY_CIDR: &str = "198.18.0.1/30";
const INET_HOST_CIDR: &str = "198.18.0.2/30";

/// Connects to `host port` with a timeout and says what happened, one word first:
/// `ok <first bytes of the HTTP reply>`, `timeout`, `refused` or `error <errno name>`.
const PROBE: &str = r#"
import errno, socket, sys
host, port, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(limit)
try:
    s.connect((host, port))
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    print("ok", s.recv(64)[:15].decode("ascii", "replace"))
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", errno.errorcode.get(e.errno, e.errno))
"#;

/// The attacker: for `secs` seconds opens a new TCP connection to `host port` every few
/// milliseconds (non-blocking, each given 2 s) and prints how many were established.
const SYN_FLOOD: &str = r#"
import select, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
end, pending, ok = time.time() + secs, {}, 0
while time.time() < end or pending:
    now = time.time()
    if now < end:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((host, port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        pending[s] = now
    _, w, _ = select.select([], list(pending), [], 0.004)
    for x in w:
        if x.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            ok += 1
        x.close()
        del pending[x]
    for x, t in list(pending.items()):
        if now - t > 2:
            x.close()
            del pending[x]
print(ok)
"#;

/// A tiny HTTP responder for guests: forks one listener per port given, then exits.
/// (No single quotes: it is passed through `sh -c '...'`.)
const GUEST_SERVER: &str = r#"
import os, socket, sys
for port in sys.argv[1:]:
    if os.fork() == 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))
        s.listen(16)
        while True:
            c, _ = s.accept()
            try:
                c.settimeout(5)
                c.recv(1024)
                c.sendall(b"HTTP/1.0 200 OK\r\n\r\nagentvm guest\n")
            except OSError:
                pass
            c.close()
"#;

fn test_netns() -> String {
    std::env::var("AGENTVM_TEST_NETNS").unwrap_or_else(|_| "agentvm-test".to_string())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Panics unless libvirtd runs in another network namespace than this test process, and that
/// namespace is the test namespace. Returns the test namespace's name.
fn assert_libvirtd_in_test_netns() -> String {
    use std::os::unix::fs::MetadataExt;
    let ns = test_netns();
    let pid = std::fs::read_to_string("/run/libvirtd.pid")
        .unwrap_or_else(|e| panic!("libvirtd must be running for tier-3 tests (/run/libvirtd.pid: {e}); scripts/test.sh starts it inside network namespace {ns}"));
    let pid = pid.trim();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .unwrap_or_else(|e| panic!("reading libvirtd's (pid {pid}) network namespace: {e}"));
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(
        theirs, ours,
        "SAFETY: libvirtd (pid {pid}) runs in this machine's own network namespace: refusing to \
         create bridges, NAT or DHCP here. Stop it and start it inside `{ns}` \
         (scripts/host-setup.sh --netns {ns})."
    );
    let want = std::fs::metadata(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("network namespace {ns} does not exist: {e}"))
        .ino();
    let have = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(
        want, have,
        "SAFETY: libvirtd (pid {pid}) runs in a network namespace other than {ns}; refusing to \
         create networks there"
    );
    ns
}

fn owner(kind: &str, test: &str) -> Owner {
    Owner {
        kind: agentvm_backend::OwnerKind::parse(kind).expect("a kind agentvm writes"),
        name: test.into(),
        spec_hash: "tier3".into(),
        generation: i64::from(std::process::id()),
    }
}

/// The backend these tests boot their guests through (the pools' path), with 240 s to boot:
/// guests on a network wait for their DHCP lease too.
fn backend() -> LibvirtBackend {
    let choice = match common::accel() {
        agentvm_backend::Accelerator::Kvm => AcceleratorChoice::Kvm,
        agentvm_backend::Accelerator::Tcg => AcceleratorChoice::Tcg,
    };
    LibvirtBackend::new(
        Libvirt::default_uri(),
        default_state_dir(),
        choice,
        Duration::from_secs(240),
    )
}

fn boot<'a>(backend: &'a LibvirtBackend, name: &str, nic: Option<NicSpec>) -> EphemeralVm<'a> {
    let req = VmRequest {
        nic,
        park: false,
        ..request(name, owner("Test", name))
    };
    let vm = EphemeralVm::create(backend, &req).unwrap_or_else(|e| panic!("booting {name}: {e}"));
    eprintln!(
        "{name}: guest agent up {:.1}s after start",
        vm.report.boot.as_secs_f64()
    );
    vm
}

/// Undefines an owned network when dropped.
struct NetGuard<'a> {
    lv: &'a Libvirt,
    name: String,
}

impl Drop for NetGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lv.undefine_network(&self.name) {
            eprintln!("cleanup: undefining network {}: {e}", self.name);
        }
    }
}

/// Undefines an owned nwfilter when dropped.
struct FilterGuard<'a> {
    lv: &'a Libvirt,
    name: String,
}

impl Drop for FilterGuard<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.lv.undefine_nwfilter(&self.name) {
            eprintln!("cleanup: undefining nwfilter {}: {e}", self.name);
        }
    }
}

/// Defines and starts a network (after the namespace check) with the default egress filter.
fn network_with_default_filter<'a>(
    lv: &'a Libvirt,
    test: &str,
    subnet: &str,
) -> (NetGuard<'a>, FilterGuard<'a>) {
    let ns = assert_libvirtd_in_test_netns();
    let name = libvirt_name(&format!("t3-{test}-{}", std::process::id()));
    let filter = NwFilterDef {
        name: name.clone(),
        spec: NetworkFilterSpec::predecessor_default(),
        owner: owner("NetworkFilter", test),
    };
    assert_eq!(lv.define_nwfilter(&filter).unwrap(), DefineOutcome::Created);
    let filter_guard = FilterGuard {
        lv,
        name: name.clone(),
    };
    let net = NetworkDef {
        name: name.clone(),
        spec: NetworkSpec {
            mode: NetworkMode::Nat,
            subnet: subnet.parse().unwrap(),
            dhcp: None,
        },
        owner: owner("Network", test),
    };
    assert_eq!(lv.define_network(&net).unwrap(), DefineOutcome::Created);
    let net_guard = NetGuard {
        lv,
        name: name.clone(),
    };
    let t = Instant::now();
    lv.start_network(&name).unwrap();
    eprintln!(
        "{name}: network started in {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let bridge = net.bridge();
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "SAFETY: bridge {bridge} appeared in this machine's own network namespace"
    );
    run(&mut in_ns(&ns, &["ip", "link", "show", &bridge]));
    // What the controller does after starting a network (see agentvm_backend::filter_guard).
    agentvm_backend::filter_guard::ensure(Some(&ns)).expect("installing the filter guard");
    (net_guard, filter_guard)
}

fn nic(network: &str, host: &str) -> Option<NicSpec> {
    Some(NicSpec {
        network: network.to_string(),
        filter: Some(network.to_string()),
        mac: None,
        host: Some(host.parse().unwrap()),
        dhcp: true,
        ip: None,
    })
}

fn sh(g: &Guest<'_, agentvm_backend::libvirt::DomainAgent>, script: &str) -> String {
    let mut req = ExecRequest::new("sh", ["-c", script]);
    req.timeout = Duration::from_secs(60);
    let out = g.exec(&req, &mut |_, _| {}).unwrap();
    assert!(
        out.success(),
        "`{script}` in the guest: {out:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn probe(
    g: &Guest<'_, agentvm_backend::libvirt::DomainAgent>,
    host: &str,
    port: u16,
    limit: Duration,
) -> String {
    let t = Instant::now();
    let req = ExecRequest::new(
        "python3",
        [
            "-c",
            PROBE,
            host,
            &port.to_string(),
            &limit.as_secs_f64().to_string(),
        ],
    );
    let out = g.exec(&req, &mut |_, _| {}).unwrap();
    assert!(out.success(), "probe: {out:?}");
    let verdict = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!(
        "probe {host}:{port} -> {verdict} ({:.2}s)",
        t.elapsed().as_secs_f64()
    );
    verdict
}

/// Waits until the guest's DHCP client configured an IPv4 address; returns it.
fn wait_for_address(g: &Guest<'_, agentvm_backend::libvirt::DomainAgent>) -> String {
    let start = Instant::now();
    loop {
        let out = sh(g, "ip -4 -o addr show scope global");
        if let Some(addr) = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
        {
            eprintln!(
                "guest got address {addr} after {:.1}s",
                start.elapsed().as_secs_f64()
            );
            return addr.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no DHCP address after 120 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The fake internet: a namespace joined to the test namespace by a veth pair, with HTTP
/// servers on 443 and 8080. Dropping it kills the servers (by pid) and deletes the namespace
/// (which deletes the veth pair).
struct Internet {
    ns: String,
    servers: Vec<Child>,
    dir: std::path::PathBuf,
}

impl Internet {
    fn create(test_ns: &str) -> Internet {
        let pid = std::process::id();
        let ns = format!("agentvm-inet-{pid}");
        let (outer, inner) = (
            format!("avmi{}", pid % 1_000_000),
            format!("avmo{}", pid % 1_000_000),
        );
        run(Command::new("ip").args(["netns", "add", &ns]));
        let dir = std::env::temp_dir().join(&ns);
        let mut inet = Internet {
            ns: ns.clone(),
            servers: Vec::new(),
            dir: dir.clone(),
        };
        run(&mut in_ns(&ns, &["ip", "link", "set", "lo", "up"]));
        // Created inside the test namespace, peer moved straight into the inet namespace:
        // neither end ever exists in this machine's own namespace.
        run(&mut in_ns(
            test_ns,
            &[
                "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns,
            ],
        ));
        run(&mut in_ns(
            test_ns,
            &["ip", "addr", "add", INET_GATEWAY_CIDR, "dev", &outer],
        ));
        run(&mut in_ns(test_ns, &["ip", "link", "set", &outer, "up"]));
        run(&mut in_ns(
            &ns,
            &["ip", "addr", "add", INET_HOST_CIDR, "dev", &inner],
        ));
        run(&mut in_ns(&ns, &["ip", "link", "set", &inner, "up"]));
        run(&mut in_ns(
            test_ns,
            &["sysctl", "-qw", "net.ipv4.ip_forward=1"],
        ));
        let routes = run(&mut in_ns(&ns, &["ip", "-4", "route"]));
        assert!(
            !routes.contains("default"),
            "the inet namespace must have no default route: {routes}"
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("index.html"), "agentvm test internet\n").unwrap();
        for port in ["443", "8080"] {
            let child = in_ns(
                &ns,
                &[
                    "/usr/bin/python3",
                    "-m",
                    "http.server",
                    port,
                    "--bind",
                    INET_HOST,
                ],
            )
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a test server");
            inet.servers.push(child);
        }
        let start = Instant::now();
        loop {
            let listening = run(&mut in_ns(&ns, &["ss", "-ltnH"]));
            if listening.contains(&format!("{INET_HOST}:443"))
                && listening.contains(&format!("{INET_HOST}:8080"))
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "test servers did not start: {listening}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        inet
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.ns])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Probe from the test namespace itself (the guests' NAT host), outside any guest filter.
fn probe_from_test_ns(ns: &str, host: &str, port: u16) -> String {
    run(&mut in_ns(
        ns,
        &[
            "/usr/bin/python3",
            "-c",
            PROBE,
            host,
            &port.to_string(),
            "5",
        ],
    ))
    .trim()
    .to_string()
}

#[test]
fn default_filter_lets_a_nat_guest_reach_443_but_not_8080() {
    let lv = libvirt();
    let backend = backend();
    let test_ns = assert_libvirtd_in_test_netns();
    let inet = Internet::create(&test_ns);
    let (net, _filter) = network_with_default_filter(&lv, "egress", "192.168.231.0/24");
    let vm = boot(&backend, &net.name, nic(&net.name, "192.168.231.1"));
    let agent = lv.agent(vm.name()).unwrap();
    let g = Guest::new(&agent);

    wait_for_address(&g);
    let routes = sh(&g, "ip -4 route");
    assert!(routes.contains("default via 192.168.231.1"), "{routes}");

    // Control: both servers answer when asked from the NAT host, outside any filter.
    assert!(probe_from_test_ns(&test_ns, INET_HOST, 8080).starts_with("ok HTTP/1.0 200"));

    let v443 = probe(&g, INET_HOST, 443, Duration::from_secs(10));
    assert!(
        v443.starts_with("ok HTTP/1.0 200"),
        "tcp/443 must pass: {v443}"
    );
    let v8080 = probe(&g, INET_HOST, 8080, Duration::from_secs(5));
    assert_eq!(
        v8080, "timeout",
        "tcp/8080 must be dropped silently by the filter"
    );

    // The attacker keeps opening connections to the forbidden port while libvirt re-links
    // its nwfilter chains (each redefinition of the guest's filter rebuilds it, deleting and
    // re-inserting libvirt's FORWARD jumps). Without agentvm's guard some get through.
    syn_flood_while_libvirt_relinks(&lv, &g, &net.name, &test_ns);
    assert!(
        probe(&g, INET_HOST, 443, Duration::from_secs(10)).starts_with("ok HTTP/1.0 200"),
        "the guard keeps allowed traffic flowing"
    );

    // A fork of this VM gets a MAC and an address of its own (its filter drops the source's)
    // and the same egress rules; the source keeps its address and its way out.
    let link = |g: &Guest<'_, _>| sh(g, "cat /sys/class/net/e*/address").trim().to_string();
    let (src_addr, src_mac) = (wait_for_address(&g), link(&g));
    lv.create_named_snapshot(vm.name(), "net").unwrap();
    let fork = format!("{}-fork", vm.name());
    let _fork_guard = common::ForkGuard(&lv, fork.clone());
    let report = lv
        .fork_domain(
            &default_state_dir(),
            vm.name(),
            "net",
            &fork,
            &owner("Test", &fork),
            Duration::from_secs(120),
        )
        .unwrap_or_else(|e| panic!("forking {}: {e}", vm.name()));
    eprintln!("fork with a NIC: {report:?}");
    let fork_agent = lv.agent(&fork).unwrap();
    let f = Guest::new(&fork_agent);
    let (fork_addr, fork_mac) = (wait_for_address(&f), link(&f));
    assert_ne!(fork_mac, src_mac);
    assert_ne!(fork_addr, src_addr);
    assert!(
        probe(&f, INET_HOST, 443, Duration::from_secs(10)).starts_with("ok HTTP/1.0 200"),
        "the fork reaches tcp/443"
    );
    assert_eq!(
        probe(&f, INET_HOST, 8080, Duration::from_secs(5)),
        "timeout"
    );
    assert_eq!(wait_for_address(&g), src_addr);
    assert!(probe(&g, INET_HOST, 443, Duration::from_secs(10)).starts_with("ok HTTP/1.0 200"));

    vm.teardown().unwrap();
    drop(inet);
}

/// Floods `INET_HOST:8080` from the guest while redefining its filter `filter` again and
/// again; asserts libvirt's jumps really went missing meanwhile (the control: the window
/// exists in this run) and that no connection was established (the guard held).
fn syn_flood_while_libvirt_relinks(
    lv: &Libvirt,
    g: &Guest<'_, agentvm_backend::libvirt::DomainAgent>,
    filter: &str,
    ns: &str,
) {
    const REDEFINITIONS: i64 = 8;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            let mut req = ExecRequest::new("python3", ["-c", SYN_FLOOD, INET_HOST, "8080", "10"]);
            req.timeout = Duration::from_secs(120);
            g.exec(&req, &mut |_, _| {}).unwrap()
        });
        // The flood's python starts in about a second under TCG.
        std::thread::sleep(Duration::from_secs(2));
        let watcher = s.spawn(|| {
            // Polls FORWARD: how often libvirt's first jump was missing.
            let (mut polls, mut missing) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let rules = run(&mut in_ns(ns, &["iptables", "-w", "-S", "FORWARD"]));
                polls += 1;
                if !rules.lines().any(|l| l == "-A FORWARD -j libvirt-in") {
                    missing += 1;
                }
            }
            (polls, missing)
        });
        let t = Instant::now();
        for generation in 1..=REDEFINITIONS {
            let def = NwFilterDef {
                name: filter.to_string(),
                spec: NetworkFilterSpec::predecessor_default(),
                owner: Owner {
                    generation: 1000 + generation,
                    ..owner("NetworkFilter", "egress")
                },
            };
            assert_eq!(lv.define_nwfilter(&def).unwrap(), DefineOutcome::Updated);
        }
        let took = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (polls, missing) = watcher.join().unwrap();
        eprintln!(
            "{REDEFINITIONS} filter redefinitions in {:.2}s; libvirt's FORWARD jump was missing in {missing} of {polls} polls",
            took.as_secs_f64()
        );
        assert!(
            missing > 0,
            "control: libvirt never deleted its FORWARD jumps while rebuilding the filter \
             ({polls} polls), so this run proves nothing about the guard"
        );
        flood.join().unwrap()
    });
    assert!(flood.success(), "flood: {flood:?}");
    let established = String::from_utf8_lossy(&flood.stdout).trim().to_string();
    eprintln!("connections to the forbidden port established during the rebuilds: {established}");
    assert_eq!(
        established, "0",
        "a forbidden connection got through while libvirt re-linked its chains"
    );
}

#[test]
fn isolated_guest_has_no_route_anywhere() {
    let lv = libvirt();
    let backend = backend();
    let name = format!("agentvm-t3-isolated-{}", std::process::id());
    let vm = boot(&backend, &name, None);
    let agent = lv.agent(vm.name()).unwrap();
    let g = Guest::new(&agent);

    let links = sh(&g, "ip -o link show | cut -d: -f2 | tr -d ' '");
    assert_eq!(links.trim(), "lo", "an isolated guest has no NIC: {links}");
    assert_eq!(sh(&g, "ip -4 route").trim(), "", "no IPv4 route");
    assert_eq!(
        sh(&g, "ip -6 route | grep -v '^::1 ' || true").trim(),
        "",
        "no IPv6 route"
    );
    for host in [INET_HOST, "192.168.231.1", "10.0.2.2"] {
        let v = probe(&g, host, 443, Duration::from_secs(5));
        assert_eq!(v, "error ENETUNREACH", "{host}: {v}");
    }
    vm.teardown().unwrap();
}

#[test]
fn guests_on_one_network_cannot_reach_each_other() {
    let lv = libvirt();
    let backend = backend();
    let (net, _filter) = network_with_default_filter(&lv, "g2g", "192.168.232.0/24");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            boot(
                &backend,
                &format!("{}-a", net.name),
                nic(&net.name, "192.168.232.1"),
            )
        });
        let b = s.spawn(|| {
            boot(
                &backend,
                &format!("{}-b", net.name),
                nic(&net.name, "192.168.232.1"),
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let (agent_a, agent_b) = (lv.agent(a.name()).unwrap(), lv.agent(b.name()).unwrap());
    let (ga, gb) = (Guest::new(&agent_a), Guest::new(&agent_b));
    let addr_a = wait_for_address(&ga);
    let addr_b = wait_for_address(&gb);
    assert_ne!(addr_a, addr_b);

    // B serves on 443 (allowed egress for A) and 8080; both answer locally. (The image has
    // python3-minimal: no http.server, so a few lines of socket code.)
    sh(
        &gb,
        &format!("setsid python3 -c '{GUEST_SERVER}' 443 8080 </dev/null >/dev/null 2>&1 &"),
    );
    let start = Instant::now();
    while !probe(&gb, "127.0.0.1", 443, Duration::from_secs(2)).starts_with("ok")
        || !probe(&gb, "127.0.0.1", 8080, Duration::from_secs(2)).starts_with("ok")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "servers in B did not start"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Control: B's server is reachable across the bridge from the host side (libvirt's
    // nwfilter does not filter the host's own traffic to its guests), so a timeout from A
    // below is A's and B's filters at work, not a dead server or a wrong address.
    let from_host = probe_from_test_ns(&assert_libvirtd_in_test_netns(), &addr_b, 443);
    assert!(
        from_host.starts_with("ok HTTP/1.0 200"),
        "gateway -> B: {from_host}"
    );
    for port in [443, 8080] {
        let v = probe(&ga, &addr_b, port, Duration::from_secs(5));
        assert_eq!(v, "timeout", "A -> B tcp/{port} must be dropped: {v}");
    }
    // The path exists at layer 2 (ARP is allowed, A learned B's MAC): it is the filter that
    // stops the connection, not a wrong address.
    let neigh = sh(&ga, &format!("ip neigh show {addr_b}"));
    assert!(neigh.contains("lladdr"), "A resolved B's MAC: {neigh}");

    a.teardown().unwrap();
    b.teardown().unwrap();
}

#[test]
fn nwfilters_round_trip_through_libvirt_and_foreign_ones_are_untouched() {
    let lv = libvirt();
    assert_libvirtd_in_test_netns();
    let name = libvirt_name(&format!("t3-filter-{}", std::process::id()));
    let mut spec = NetworkFilterSpec::predecessor_default();
    spec.egress[0].description = Some("DNS <&> \"quoted\" 'single'".into());
    let mut def = NwFilterDef {
        name: name.clone(),
        spec,
        owner: Owner {
            kind: agentvm_api::Kind::NetworkFilter.into(),
            name: "filter<&\"'>".into(),
            spec_hash: "ab".repeat(32),
            generation: 1,
        },
    };
    assert_eq!(lv.define_nwfilter(&def).unwrap(), DefineOutcome::Created);
    let _guard = FilterGuard {
        lv: &lv,
        name: name.clone(),
    };
    assert_eq!(lv.define_nwfilter(&def).unwrap(), DefineOutcome::Unchanged);

    let dumped = parse_nwfilter(&lv.nwfilter_xml(&name).unwrap()).unwrap();
    let generated = parse_nwfilter(&def.to_xml().unwrap()).unwrap();
    assert_eq!(
        dumped.rules, generated.rules,
        "libvirt keeps every rule and comment"
    );
    assert_eq!(dumped.owner(), Some(def.owner.clone()));
    assert_eq!(lv.nwfilter_owner(&name).unwrap(), Some(def.owner.clone()));
    assert!(lv
        .list_owned_nwfilters()
        .unwrap()
        .iter()
        .any(|f| f.name == name && f.owner == def.owner));

    def.owner.generation = 2;
    def.spec.egress.pop();
    assert_eq!(lv.define_nwfilter(&def).unwrap(), DefineOutcome::Updated);
    assert_eq!(lv.nwfilter_owner(&name).unwrap().unwrap().generation, 2);

    // Built-in filters are listed by libvirt but never ours.
    let builtin = lv.nwfilter_xml("clean-traffic").unwrap();
    let err = lv.undefine_nwfilter("clean-traffic").unwrap_err();
    assert!(matches!(err, BackendError::NotOwned { .. }), "{err}");
    assert_eq!(lv.nwfilter_xml("clean-traffic").unwrap(), builtin);
    assert!(!lv
        .list_owned_nwfilters()
        .unwrap()
        .iter()
        .any(|f| !f.name.starts_with("agentvm-")));

    lv.undefine_nwfilter(&name).unwrap();
    assert!(lv.nwfilter_owner(&name).unwrap_err().is_not_found());
    lv.undefine_nwfilter(&name)
        .expect("undefining a missing filter succeeds");
}
