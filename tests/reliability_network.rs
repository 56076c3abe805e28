//! Hostile guests on the network, end to end through the controller with real VMs
//! (`qemu:///system`, TCG): a NAT network with an egress filter allowing DNS (udp/53) and
//! tcp/443 only, like `examples/nat-filtered.yaml`, a pool of two VMs attached to it, and an
//! `AgentRun` that probes what it should not reach: blocked ports on "the internet", the
//! host's own services (stand-ins for the metrics port 9090, libvirtd's TCP port 16509 and a
//! service on tcp/443 — a port the filter allows — on the host's address on the bridge), and
//! a server another run keeps open in the other guest. Control probes show the network works
//! (tcp/443 to the internet; DNS over udp and tcp to the host's dnsmasq, the one host service
//! besides DHCP a guest may use) and that every stand-in answers outside the guests' filters.
//! Then the attacker spoofs: UDP with the other guest's (and the gateway's) address as
//! source, and forged ARP replies telling the host that the other guest's address is at the
//! attacker's MAC. A sink on "the internet" and the host's neighbour table show that only its
//! own, honest traffic gets through.
//!
//! The pool also carries limits: `diskWriteMibPerSecond: 10` (a 200 MiB `dd … oflag=direct`
//! in a guest must take 200/10 s, ±20 %), `netInMibPerSecond: 2` (where the host enforces
//! it, a 16 MiB download from the "internet" server on 443 must take 16/2 s, ±20 %; libvirt's
//! shaping needs tc's `sfq` qdisc and `police` action, which the nested CI hosts' kernels
//! lack, and then the pool must say so), and a CPU quota and memory hard limit that this kind
//! of host cannot enforce: the pool must still get Ready and say so in its conditions, and
//! `agentvm describe` shows every resource requested and enforced.
//!
//! Safety (as in `agentvm-backend/tests/tier3_network.rs`): libvirtd must run inside the
//! test network namespace (`$AGENTVM_TEST_NETNS`); the test checks it before anything
//! else. "The internet" is one more namespace joined to the test namespace by a veth pair in
//! 198.18.0.0/30 with no route anywhere else; nothing is sent off this machine. Servers,
//! namespace and veth are removed by drop guards, processes killed by pid.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// The pool's limits: throughput limits to measure, and a CPU quota (100 %: no slower where
/// it is enforced) and memory hard limit that hosts without cgroup controllers for libvirt
/// cannot enforce.
const LIMITS: &str = "diskGib: 2, diskWriteMibPerSecond: 10, netInMibPerSecond: 2, cpuQuotaPercent: 100, memoryHardLimitMib: 2048}";
/// `diskWriteMibPerSecond` of [`LIMITS`].
const DISK_WRITE_MIB_S: f64 = 10.0;
/// `netInMibPerSecond` of [`LIMITS`].
const NET_IN_MIB_S: f64 = 2.0;

/// `python3 PROBE` prints one line per `host:port[/udp]` argument: `TARGET ok|timeout|refused|error`.
const PROBE: &str = r#"
import socket, sys
for t in sys.argv[1:]:
    hp, _, proto = t.partition("/")
    host, port = hp.rsplit(":", 1)
    try:
        if proto == "udp":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(5)
            q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01"
            s.sendto(q, (host, int(port)))
            s.recv(512)
        else:
            s = socket.create_connection((host, int(port)), timeout=5)
        print(t, "ok")
    except socket.timeout:
        print(t, "timeout")
    except ConnectionRefusedError:
        print(t, "refused")
    except OSError as e:
        print(t, "error", e.errno)
"#;

/// A TCP server for guests on the given ports (forks one listener each), then sleeps.
const SERVER: &str = r#"
import os, socket, sys, time
for port in sys.argv[1:]:
    if os.fork() == 0:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))
        s.listen(16)
        while True:
            c, _ = s.accept()
            c.close()
time.sleep(3600)
"#;

/// Spoofing from a guest (root, python3 on stdin; arguments: the other guest's address, the
/// gateway, "the internet"). A datagram from its own address to udp/53 (allowed egress) as
/// the control, raw IPv4 datagrams to the same place with the other guest's and the
/// gateway's address as source, and forged ARP replies to the host: "the other guest's
/// address is at my MAC". Prints `mac <its MAC>`.
const SPOOF: &str = r#"exec python3 - "$@" <<'EOF'
import os, socket, struct, sys, time
victim, gateway, inet = sys.argv[1:4]
iface = [n for n in sorted(os.listdir("/sys/class/net")) if n.startswith("e")][0]
mymac = open("/sys/class/net/%s/address" % iface).read().strip()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"from-own-address", (inet, 53))
udp.sendto(b"x", (gateway, 53))  # makes sure the gateway is in the ARP table
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for name, src in (("victim", victim), ("gateway", gateway)):
    payload = ("spoofed-" + name).encode()
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(inet))
    for _ in range(3):
        raw.sendto(ip + struct.pack("!HHHH", 40000, 53, 8 + len(payload), 0) + payload, (inet, 0))
time.sleep(1)
gwmac = None
for line in open("/proc/net/arp").read().splitlines()[1:]:
    f = line.split()
    if f[0] == gateway:
        gwmac = f[3]
mac = lambda m: bytes.fromhex(m.replace(":", ""))
frame = (mac(gwmac) + mac(mymac) + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
         + mac(mymac) + socket.inet_aton(victim) + mac(gwmac) + socket.inet_aton(gateway))
arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
arp.bind((iface, 0))
for _ in range(8):
    arp.send(frame)
    time.sleep(0.5)
print("mac", mymac)
EOF"#;

/// The MAC the host's neighbour table in `ns` holds for `ip` (`None` if it has no entry).
fn host_neighbour(ns: &str, ip: &str) -> Option<String> {
    let out = run_ok(&mut in_ns(ns, &["ip", "-4", "neigh", "show", ip]));
    let fields: Vec<&str> = out.split_whitespace().collect();
    fields
        .iter()
        .position(|f| *f == "lladdr")
        .map(|i| fields[i + 1].to_string())
}

/// Bytes the "internet" server on 443 sends on every connection (then it closes it).
const DOWNLOAD_BYTES: u64 = 16 << 20;

/// A listener in namespace `ns` on `addr:port` that accepts and closes connections.
fn listen(inet: &mut Internet, ns: &str, addr: &str, port: u16) {
    serve(
        inet,
        ns,
        addr,
        port,
        "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((sys.argv[1],int(sys.argv[2])))\ns.listen(16)\nwhile True:\n    c,_=s.accept(); c.close()",
    );
}

/// A listener in namespace `ns` on `addr:port` that sends [`DOWNLOAD_BYTES`] on every
/// connection (a client that only connects just closes early), then closes it.
fn listen_sending(inet: &mut Internet, ns: &str, addr: &str, port: u16) {
    let script = format!(
        "import os,signal,socket,sys\nsignal.signal(signal.SIGCHLD,signal.SIG_IGN)\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind((sys.argv[1],int(sys.argv[2])))\ns.listen(16)\nwhile True:\n    c,_=s.accept()\n    if os.fork()==0:\n        try:\n            b=bytes(65536)\n            for _ in range({}):\n                c.sendall(b)\n        except OSError:\n            pass\n        os._exit(0)\n    c.close()",
        DOWNLOAD_BYTES / 65536
    );
    serve(inet, ns, addr, port, &script);
}

fn serve(inet: &mut Internet, ns: &str, addr: &str, port: u16, script: &str) {
    let child = in_ns(
        ns,
        &["/usr/bin/python3", "-c", script, addr, &port.to_string()],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    inet.children.push(child);
    let start = Instant::now();
    while !run_ok(&mut in_ns(ns, &["ss", "-ltnH"])).contains(&format!("{addr}:{port}")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "listener {addr}:{port} did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects from namespace `ns` (outside any guest filter): true when it connects.
fn reachable_from(ns: &str, addr: &str, port: u16) -> bool {
    let out = run_ok(&mut in_ns(
        ns,
        &["/usr/bin/python3", "-c", PROBE, &format!("{addr}:{port}")],
    ));
    out.trim().ends_with(" ok")
}

#[test]
fn a_guest_reaches_only_what_its_filter_allows_not_the_host_nor_another_guest() {
    let test_ns = assert_libvirtd_in_test_netns();
    require_libvirt_and_image();
    let pid = std::process::id();

    // The internet: servers on 443 (allowed) and 8080 (not). Every server this test starts
    // (also those in the test namespace) is a child of `inet`: killed when it is dropped,
    // before its namespace is deleted.
    let mut inet = Internet::new(&test_ns, "relinet");
    let inet_ns = inet.netns.clone();
    listen_sending(&mut inet, &inet_ns, INTERNET_HOST, 443);
    listen(&mut inet, &inet_ns, INTERNET_HOST, 8080);

    // The controller, a NAT network, an egress filter (DNS + tcp/443) and a pool of two.
    let mut env = Env::new("netguest");
    let net = format!("e2e-rnet-{pid}");
    let filter = format!("e2e-regress-{pid}");
    let pool = format!("e2enet{pid}");
    let image = format!("e2e-nimg-{pid}");
    env.domain_prefix = format!("agentvm-{pool}-");
    env.networks.push(format!("agentvm-{net}"));
    env.filters.push(format!("agentvm-{filter}"));
    let third = 100 + pid % 150;
    let gateway = format!("10.214.{third}.1");
    let extra =
        format!("    network: {{mode: attached, networkRef: {net}, filterRef: {filter}}}\n");
    std::fs::write(
        env.specs().join("net.yaml"),
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {{name: {net}}}\nspec: {{mode: nat, subnet: 10.214.{third}.0/24}}\n---\n\
             apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {filter}}}\nspec:\n  egress:\n    - {{protocol: udp, ports: [53]}}\n    - {{protocol: tcp, ports: [443]}}\n---\n{}",
            // A low transmit threshold for the flood below (policy record).
            small_pool(&pool, &image, 2, 2, &extra).replace("diskGib: 2}", LIMITS)
                + "  anomalies: {netTxMibPerSecond: 1, rateWindowSamples: 3}\n"
        ),
    )
    .unwrap();
    env.start_controller();
    env.wait("pool Ready with 2 VMs", Duration::from_secs(400), || {
        pool_ready(&env, &pool, 2)
    });
    // The host's services on its address on the guests' bridge (stand-ins, since the real
    // controller serves its API on a unix socket and metrics on 127.0.0.1, and libvirtd on
    // a unix socket): all answer from the host side.
    for port in [9090, 16509, 443] {
        listen(&mut inet, &test_ns, &gateway, port);
        assert!(
            reachable_from(&test_ns, &gateway, port),
            "control {gateway}:{port}"
        );
    }
    assert!(
        reachable_from(&test_ns, INTERNET_HOST, 8080),
        "control internet:8080"
    );

    // Another guest keeps servers open on 443 and 8080 and says where.
    let victim_src = format!(
        "ip -4 -o addr show scope global | awk '{{print \"ip=\" $4}}'; exec python3 -c '{}' 443 8080",
        SERVER.replace('\'', "\"")
    );
    apply_yaml(
        &env,
        "victim.yaml",
        &sh_run("victim", &pool, &victim_src, "  timeoutSeconds: 600\n"),
    );
    let mut victim_ip = String::new();
    env.wait("the victim's address", Duration::from_secs(120), || {
        let out = env.cmd(&["logs", "run/victim"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(ip) = text.lines().find_map(|l| l.strip_prefix("ip=")) {
            victim_ip = ip.split('/').next().unwrap().to_string();
            true
        } else {
            false
        }
    });
    // Its Python server takes seconds to start under TCG on a busy host.
    env.wait(
        "control: the victim's server answers from the host",
        Duration::from_secs(60),
        || reachable_from(&test_ns, &victim_ip, 8080),
    );

    let targets = [
        format!("{INTERNET_HOST}:443"),
        format!("{INTERNET_HOST}:8080"),
        format!("{gateway}:53/udp"),
        format!("{gateway}:53"),
        format!("{gateway}:9090"),
        format!("{gateway}:16509"),
        format!("{gateway}:443"),
        format!("{victim_ip}:443"),
        format!("{victim_ip}:8080"),
    ];
    let attacker_src = format!(
        "exec python3 -c '{}' {}",
        PROBE.replace('\'', "\""),
        targets.join(" ")
    );
    apply_yaml(
        &env,
        "attacker.yaml",
        &sh_run("attacker", &pool, &attacker_src, "  timeoutSeconds: 300\n"),
    );
    env.wait("attacker ended", Duration::from_secs(300), || {
        run_terminal(&run_phase(&env, "attacker"))
    });
    let s = env.status("run", "attacker");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    let out = s["stdoutTail"].as_str().unwrap().to_string();
    eprintln!("probes from a guest:\n{out}");
    let verdict = |t: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{t} ")))
            .unwrap_or_else(|| panic!("no verdict for {t}: {out}"))
            .to_string()
    };
    // Controls: the guest is on the network.
    assert_eq!(verdict(&targets[0]), "ok", "tcp/443 to the internet");
    assert_eq!(verdict(&targets[2]), "ok", "DNS to the host's dnsmasq");
    assert_eq!(
        verdict(&targets[3]),
        "ok",
        "DNS over TCP to the host's dnsmasq"
    );
    // Contained.
    for t in [
        &targets[1],
        &targets[4],
        &targets[5],
        &targets[7],
        &targets[8],
    ] {
        assert_eq!(verdict(t), "timeout", "{t} must be dropped");
    }
    // The host itself on an allowed egress port.
    assert_eq!(
        verdict(&targets[6]),
        "timeout",
        "the host's own service on an allowed egress port (443) must be dropped"
    );

    // The limits: in force (disk, network) or said not to be (CPU quota, memory), and the
    // pool Ready either way.
    let ps = env.status("pool", &pool);
    let cond = |t: &str| -> serde_json::Value {
        ps["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .unwrap_or_else(|| panic!("no {t}: {ps}"))
            .clone()
    };
    assert_eq!(cond("DiskIoLimitApplied")["status"], "True", "{ps}");
    let bandwidth = cond("NetworkBandwidthApplied");
    let bandwidth_enforced = bandwidth["status"] == "True";
    for t in [
        "CpuQuotaApplied",
        "MemoryLimitApplied",
        "NetworkBandwidthApplied",
    ] {
        let c = cond(t);
        eprintln!("{t}: {} {} {}", c["status"], c["reason"], c["message"]);
        assert!(
            c["status"] == "True" || c["reason"] == "HostCannotEnforce",
            "{t}: {c}"
        );
    }
    let described = env.ok(&["describe", &format!("pool/{pool}")]);
    let table: String = described
        .lines()
        .skip_while(|l| *l != "Resources:")
        .take_while(|l| *l != "Events:")
        .map(|l| format!("{l}\n"))
        .collect();
    eprintln!("{table}");
    for (resource, requested) in [
        ("diskGib", "2 GiB"),
        ("diskWriteMibPerSecond", "10 MiB/s"),
        ("netInMibPerSecond", "2 MiB/s"),
        ("cpuQuotaPercent", "100 % per vCPU"),
        ("memoryHardLimitMib", "2048 MiB"),
    ] {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(resource) && l.contains(requested)),
            "{resource} {requested} not in\n{described}"
        );
    }

    // Disk writes held to diskWriteMibPerSecond, a download to netInMibPerSecond.
    let io_src = format!(
        "dd if=/dev/zero of=/root/x bs=1M count=200 oflag=direct 2>&1 | tail -1\n\
         exec python3 -c \"import socket, time
s = socket.create_connection(('{INTERNET_HOST}', 443), timeout=60)
t = time.time()
n = 0
while True:
    b = s.recv(1 << 16)
    if not b:
        break
    n += len(b)
print('down', n, time.time() - t)\""
    );
    apply_yaml(
        &env,
        "io.yaml",
        &sh_run("io", &pool, &io_src, "  timeoutSeconds: 300\n"),
    );
    env.wait("io ended", Duration::from_secs(300), || {
        run_terminal(&run_phase(&env, "io"))
    });
    let s = env.status("run", "io");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    let out = s["stdoutTail"].as_str().unwrap().to_string();
    // `209715200 bytes (210 MB, 200 MiB) copied, 20.1 s, 10.4 MB/s`
    let dd_secs: f64 = out
        .lines()
        .find(|l| l.contains(" copied, "))
        .and_then(|l| l.split(" copied, ").nth(1))
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dd result in {out:?}"));
    let disk_rate = 200.0 / dd_secs;
    let down: Vec<f64> = out
        .lines()
        .find_map(|l| l.strip_prefix("down "))
        .unwrap_or_else(|| panic!("no download result in {out:?}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(down[0] as u64, DOWNLOAD_BYTES, "{out}");
    let net_rate = down[0] / f64::from(1 << 20) / down[1];
    eprintln!(
        "disk writes: 200 MiB in {dd_secs:.1} s = {disk_rate:.2} MiB/s (limit {DISK_WRITE_MIB_S}); download: {} MiB in {:.1} s = {net_rate:.2} MiB/s (limit {NET_IN_MIB_S})",
        down[0] / f64::from(1 << 20),
        down[1]
    );
    let within = |rate: f64, limit: f64| rate >= limit * 0.8 && rate <= limit * 1.2;
    assert!(
        within(disk_rate, DISK_WRITE_MIB_S),
        "disk writes at {disk_rate:.2} MiB/s, limit {DISK_WRITE_MIB_S}: {out}"
    );
    if bandwidth_enforced {
        assert!(
            within(net_rate, NET_IN_MIB_S),
            "download at {net_rate:.2} MiB/s, limit {NET_IN_MIB_S}: {out}"
        );
    } else {
        // libvirt's shaping needs tc's sfq qdisc and police action, which some kernels (these
        // nested CI hosts) lack: then the pool says so, and the VMs run and download without
        // the limit.
        eprintln!(
            "netInMibPerSecond is not enforced on this host ({}): the download ran at {net_rate:.2} MiB/s unlimited",
            bandwidth["message"]
        );
        assert!(
            bandwidth["message"]
                .as_str()
                .unwrap()
                .contains("is not applied by this host"),
            "{bandwidth}"
        );
    }

    // Spoofing. A sink on the internet's udp/53 records what arrives; the host has just
    // talked to the victim, so its neighbour table holds the victim's real MAC.
    let sink = env.dir.join("udp-sink.log");
    let sink_out = std::fs::File::create(&sink).unwrap();
    inet.children.push(
        in_ns(
            &inet_ns,
            &[
                "/usr/bin/python3",
                "-u",
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],53))\nwhile True:\n    print(s.recvfrom(2048)[0].decode(errors='replace'))",
                INTERNET_HOST,
            ],
        )
        .stdin(Stdio::null())
        .stdout(sink_out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    assert!(
        reachable_from(&test_ns, &victim_ip, 8080),
        "control: the host reaches the victim"
    );
    let victim_mac = host_neighbour(&test_ns, &victim_ip)
        .unwrap_or_else(|| panic!("the host has no neighbour entry for {victim_ip}"));
    std::thread::sleep(Duration::from_secs(2)); // past the neighbour table's lock time
    apply_yaml(
        &env,
        "spoofer.yaml",
        &sh_run(
            "spoofer",
            &pool,
            &format!("set -- {victim_ip} {gateway} {INTERNET_HOST}\n{SPOOF}"),
            "  timeoutSeconds: 300\n",
        ),
    );
    env.wait("spoofer ended", Duration::from_secs(300), || {
        run_terminal(&run_phase(&env, "spoofer"))
    });
    let s = env.status("run", "spoofer");
    assert_eq!(s["phase"], "Succeeded", "{s}");
    let attacker_mac = s["stdoutTail"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("mac "))
        .unwrap_or_else(|| panic!("no MAC from the spoofer: {s}"))
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let received = std::fs::read_to_string(&sink).unwrap();
    let neighbour = host_neighbour(&test_ns, &victim_ip);
    eprintln!(
        "the internet's udp/53 received {received:?}; the host's neighbour entry for the victim \
         {victim_ip}: {neighbour:?} (victim {victim_mac}, attacker {attacker_mac})"
    );
    assert!(
        received.contains("from-own-address"),
        "control: a datagram from the guest's own address arrives: {received:?}"
    );
    assert_ne!(attacker_mac, victim_mac, "the two guests are different VMs");
    // Both verdicts in one assertion, so a failure shows every spoof that got through.
    let forged: Vec<&str> = ["spoofed-victim", "spoofed-gateway"]
        .into_iter()
        .filter(|p| received.contains(p))
        .collect();
    let poisoned = neighbour.as_deref() != Some(victim_mac.as_str());
    assert!(
        forged.is_empty() && !poisoned,
        "datagrams with a forged source must be dropped (arrived: {forged:?}), and forged ARP \
         replies must not move the host's entry for {victim_ip} off {victim_mac} (now \
         {neighbour:?}, attacker {attacker_mac})"
    );
    assert!(
        reachable_from(&test_ns, &victim_ip, 8080),
        "the host still reaches the victim"
    );

    // A UDP flood at a blocked port of the "internet": the filter drops it on the host, and
    // the anomaly monitor sees the burst on the guest's interface (NetworkTxBurst).
    let flood_src = format!(
        "exec python3 -c \"import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d = bytes(1400)
n = 0
t = time.time()
while time.time() - t < 15:
    s.sendto(d, ('{INTERNET_HOST}', 8080))
    n += 1
print('sent', n)\""
    );
    apply_yaml(
        &env,
        "flood.yaml",
        &sh_run("flood", &pool, &flood_src, "  timeoutSeconds: 300\n"),
    );
    env.wait("flood ended", Duration::from_secs(300), || {
        run_terminal(&run_phase(&env, "flood"))
    });
    let s = env.status("run", "flood");
    eprintln!(
        "flood: {} {} anomalies {} usage {}",
        s["phase"], s["stdoutTail"], s["anomalies"], s["resourceUsage"]
    );
    assert_eq!(s["phase"], "Succeeded", "{s}");
    assert!(
        s["stdoutTail"].as_str().unwrap().starts_with("sent "),
        "{s}"
    );
    let burst = s["anomalies"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["rule"] == "NetworkTxBurst"))
        .unwrap_or_else(|| panic!("no NetworkTxBurst: {s}"));
    assert_eq!(burst["metric"], "net_tx_bytes_per_second", "{burst}");
    assert!(burst["observed"].as_u64().unwrap() >= 1 << 20, "{burst}");
    assert!(
        s["resourceUsage"]["netTxBytes"].as_u64().unwrap() >= 15 << 20,
        "{s}"
    );

    let _ = env.cmd(&["delete", "run/victim"]).output();
    drop(env);
    drop(inet);
}
