//! The egress proxy against plain NAT, side by side in one run: two pools of one VM on one
//! NAT network, one whose filter allows `tcp/443` (NAT, no proxy) and one whose filter allows
//! only the name `big.test` on 443 (redirected through the controller's SNI proxy). From each
//! guest, `curl` downloads 100 MiB over HTTPS from a server in a namespace of its own ("the
//! world", 198.18.0.2, no route anywhere else), three times, and times 20 small HTTPS
//! requests to their first byte. Needs libvirtd in network namespace `netns` (scripts/bench.sh
//! runs it there): the network, the world and all traffic stay inside this machine.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentvm_api::Kind;
use anyhow::{bail, Context, Result};

use crate::controller::ControllerProcess;
use crate::inproc::apply_request;
use crate::report::{Row, Table};
use crate::stats::summarize;
use crate::vms::virsh;
use crate::wait_until;

/// The world's server (DNS for `big.test`, HTTPS with `/big?N`), shared with the tests.
const WORLD: &str = include_str!("../../../tests/support/egress_internet.py");
const WORLD_HOST: &str = "198.18.0.2";
const DOWNLOAD_BYTES: u64 = 100 << 20;
const DOWNLOADS: usize = 3;
const LATENCY_SAMPLES: usize = 20;

/// The world namespace and its server; removed (by pid, then the namespace) when dropped.
struct World {
    netns: String,
    server: Option<Child>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl World {
    fn start(test_ns: &str, dir: &Path) -> Result<World> {
        let pid = std::process::id() % 100_000;
        let mut w = World {
            netns: format!("agentvm-bench-world-{pid}"),
            server: None,
        };
        let (outer, inner) = (format!("bwo{pid}"), format!("bwi{pid}"));
        ip(&["netns", "add", &w.netns])?;
        ip(&["-n", &w.netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", test_ns, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns",
            &w.netns,
        ])?;
        ip(&["-n", test_ns, "addr", "add", "198.18.0.1/30", "dev", &outer])?;
        ip(&["-n", test_ns, "link", "set", &outer, "up"])?;
        ip(&[
            "-n",
            &w.netns,
            "addr",
            "add",
            "198.18.0.2/30",
            "dev",
            &inner,
        ])?;
        ip(&["-n", &w.netns, "link", "set", &inner, "up"])?;
        let fwd = Command::new("ip")
            .args([
                "netns",
                "exec",
                test_ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .status()?;
        if !fwd.success() {
            bail!("enabling forwarding in {test_ns}");
        }
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=big.test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .context("running openssl")?;
        if !made.success() {
            bail!("openssl could not make a certificate");
        }
        let script = dir.join("world.py");
        std::fs::write(&script, WORLD)?;
        let log = std::fs::File::create(dir.join("world.log"))?;
        w.server = Some(
            Command::new("ip")
                .args(["netns", "exec", &w.netns, "python3", "-u"])
                .arg(&script)
                .arg(format!("big.test={WORLD_HOST}"))
                .env("CERT", &cert)
                .env("KEY", &key)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?,
        );
        let netns = w.netns.clone();
        wait_until("the world's server", Duration::from_secs(20), || {
            let out = Command::new("ip")
                .args(["netns", "exec", &netns, "ss", "-ltnH"])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout).contains(&format!("{WORLD_HOST}:443 ")))
        })?;
        Ok(w)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(c) = &mut self.server {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "delete", &self.netns]);
    }
}

/// Fails unless libvirtd runs in network namespace `netns` (and so not in this machine's).
fn check_libvirtd_in(netns: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let pid = std::fs::read_to_string("/run/libvirtd.pid")
        .context("libvirtd must run (in its network namespace) for the egress benchmark")?;
    let theirs = std::fs::metadata(format!("/proc/{}/ns/net", pid.trim()))?.ino();
    let ours = std::fs::metadata("/proc/self/ns/net")?.ino();
    let named = std::fs::metadata(format!("/run/netns/{netns}"))
        .with_context(|| format!("network namespace {netns}"))?
        .ino();
    if theirs == ours || theirs != named {
        bail!("libvirtd does not run in network namespace {netns}: the egress benchmark creates a NAT network and runs only there");
    }
    Ok(())
}

fn manifests() -> String {
    let filter = |name: &str, rule: &str| {
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata: {{name: {name}}}\nspec:\n  egress:\n    - {rule}\n---\n")
    };
    let pool = |name: &str, filter: &str| {
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {name}}}\nspec:\n  template:\n    imageRef: bench-egress-img\n    resources: {{profile: custom, vcpu: 1, memoryMib: 1024, diskGib: 2}}\n    network: {{mode: attached, networkRef: bench-egress-net, filterRef: {filter}}}\n  minReady: 1\n  maxSize: 1\n---\n")
    };
    format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: bench-egress-img}}\nspec: {{}}\n---\n\
         apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata: {{name: bench-egress-net}}\nspec: {{mode: nat, subnet: 10.216.7.0/24}}\n---\n{}{}{}{}",
        filter("bench-nat", "{protocol: tcp, ports: [443, 80]}"),
        filter("bench-proxy", "{protocol: tcp, ports: [443, 80], domains: [big.test]}"),
        pool("bench-nat", "bench-nat"),
        pool("bench-proxy", "bench-proxy"),
    )
    .trim_end_matches("---\n")
    .to_string()
}

/// The guest's measurement: `dl SPEED_BYTES_PER_S SECONDS` per download, `tls SECONDS` and
/// `http SECONDS` (to the first byte, connect included) per small request.
fn script() -> String {
    format!(
        "set -e\nR='--resolve big.test:443:{WORLD_HOST} --resolve big.test:80:{WORLD_HOST}'\n\
         for i in $(seq {DOWNLOADS}); do echo dl $(curl -sSk $R -o /dev/null -w '%{{speed_download}} %{{time_total}}' 'https://big.test/big?{DOWNLOAD_BYTES}'); done\n\
         for i in $(seq {LATENCY_SAMPLES}); do echo tls $(curl -sSk $R -o /dev/null -w '%{{time_starttransfer}}' https://big.test/); \
         echo http $(curl -sS $R -o /dev/null -w '%{{time_starttransfer}}' http://big.test/); done\n"
    )
}

/// What a run of [`script`] printed.
#[derive(Debug, Default)]
struct Sample {
    /// Download rates, bytes/s.
    rates: Vec<f64>,
    /// HTTPS requests to their first byte.
    tls: Vec<Duration>,
    /// HTTP requests to their first byte.
    http: Vec<Duration>,
}

fn parse(out: &str) -> Result<Sample> {
    let mut s = Sample::default();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["dl", speed, _] => s.rates.push(speed.parse::<f64>()?),
            ["tls", t] => s.tls.push(Duration::from_secs_f64(t.parse::<f64>()?)),
            ["http", t] => s.http.push(Duration::from_secs_f64(t.parse::<f64>()?)),
            _ => {}
        }
    }
    if s.rates.len() != DOWNLOADS
        || s.tls.len() != LATENCY_SAMPLES
        || s.http.len() != LATENCY_SAMPLES
    {
        bail!("unexpected output from the guest:\n{out}");
    }
    Ok(s)
}

fn measure(
    client: &agentvm_controller::api::client::Client,
    run: &str,
    pool: &str,
) -> Result<Sample> {
    let source = script()
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect::<String>();
    client.apply(&apply_request(&format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata: {{name: {run}}}\nspec:\n  poolRef: {pool}\n  script:\n    interpreter: sh\n    source: |\n{source}  timeoutSeconds: 1200\n"
    ))?)?;
    let mut status = serde_json::Value::Null;
    wait_until(&format!("run {run}"), Duration::from_secs(1500), || {
        status = client.get(Kind::AgentRun, run)?.status_json();
        Ok(["Succeeded", "Failed", "TimedOut", "Cancelled"]
            .iter()
            .any(|p| status["phase"] == *p))
    })?;
    if status["phase"] != "Succeeded" {
        bail!("run {run}: {status:#}");
    }
    parse(status["stdoutTail"].as_str().unwrap_or_default())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// See the module docs.
pub fn egress_rows(
    bin: &Path,
    dir: &Path,
    uri: &str,
    cache_dir: &Path,
    netns: &str,
    table: &mut Table,
) -> Result<()> {
    check_libvirtd_in(netns)?;
    std::fs::create_dir_all(dir)?;
    let world = World::start(netns, dir)?;
    let c = ControllerProcess::start_with_env(
        bin,
        dir,
        uri,
        cache_dir,
        &[
            ("AGENTVM_EGRESS_NETNS", netns.to_string()),
            ("AGENTVM_EGRESS_RESOLVER", format!("{WORLD_HOST}:53")),
        ],
    )?;
    let client = &c.client;
    let result = (|| {
        client.apply(&apply_request(&manifests())?)?;
        wait_until("both pools Ready", Duration::from_secs(30 * 60), || {
            Ok(["bench-nat", "bench-proxy"].iter().all(|p| {
                client
                    .get(Kind::VmPool, p)
                    .is_ok_and(|o| o.status_json()["ready"] == 1)
            }))
        })?;
        // Alternated, so that a change in the host's load does not favour one path.
        let nat1 = measure(client, "bench-nat-1", "bench-nat")?;
        let proxy1 = measure(client, "bench-proxy-1", "bench-proxy")?;
        let nat2 = measure(client, "bench-nat-2", "bench-nat")?;
        let proxy2 = measure(client, "bench-proxy-2", "bench-proxy")?;
        let join = |a: Sample, b: Sample| Sample {
            rates: [a.rates, b.rates].concat(),
            tls: [a.tls, b.tls].concat(),
            http: [a.http, b.http].concat(),
        };
        Ok::<_, anyhow::Error>((join(nat1, nat2), join(proxy1, proxy2)))
    })();
    for run in [
        "bench-nat-1",
        "bench-proxy-1",
        "bench-nat-2",
        "bench-proxy-2",
    ] {
        let _ = client.delete(Kind::AgentRun, run, false);
    }
    for (kind, name) in [
        (Kind::VmPool, "bench-nat"),
        (Kind::VmPool, "bench-proxy"),
        (Kind::NetworkFilter, "bench-nat"),
        (Kind::NetworkFilter, "bench-proxy"),
        (Kind::Network, "bench-egress-net"),
    ] {
        let _ = client.delete(kind, name, false);
    }
    let gone = wait_until(
        "the benchmark's network removed",
        Duration::from_secs(300),
        || Ok(virsh(uri, &["net-info", "agentvm-bench-egress-net"]).is_err()),
    );
    c.stop();
    drop(world);
    gone?;
    let (nat, proxy) = result?;

    let mib = |r: f64| r / f64::from(1 << 20);
    let (nat_rate, proxy_rate) = (median(nat.rates.clone()), median(proxy.rates.clone()));
    table.push(Row::value(
        "HTTPS download of 100 MiB, plain NAT (baseline)",
        nat.rates.len(),
        format!("{:.1} MiB/s", mib(nat_rate)),
        "filter allows tcp/443; curl in the guest, server in the world namespace",
    ));
    table.push(Row::value(
        "HTTPS download of 100 MiB, through the egress proxy",
        proxy.rates.len(),
        format!("{:.1} MiB/s", mib(proxy_rate)),
        format!(
            "filter allows big.test:443 only; {:.2}× the NAT rate (goal ≥ 0.8×)",
            proxy_rate / nat_rate
        ),
    ));
    for (what, nat, proxy, notes) in [
        (
            "HTTPS",
            nat.tls,
            proxy.tls,
            "TCP connect, TLS handshake, request",
        ),
        ("HTTP", nat.http, proxy.http, "TCP connect, request"),
    ] {
        let (n, p) = (summarize(nat), summarize(proxy));
        table.push(Row::timing(
            format!("small {what} request to its first byte, plain NAT (baseline)"),
            &n,
            notes,
        ));
        let added = p.median.as_secs_f64() - n.median.as_secs_f64();
        table.push(Row::timing(
            format!("small {what} request to its first byte, through the egress proxy"),
            &p,
            format!(
                "{:+.1} ms at the median against NAT (goal < 5 ms added): name read, DNS check, upstream connect",
                added * 1000.0
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_parse() {
        let docs = apply_request(&manifests()).unwrap();
        assert_eq!(
            docs.objects.len(),
            6,
            "image, network, two filters, two pools"
        );
    }

    #[test]
    fn the_guest_script_prints_what_parse_reads() {
        let s = script();
        assert!(s.contains("https://big.test/big?104857600"), "{s}");
        let mut out = String::new();
        for _ in 0..DOWNLOADS {
            out.push_str("dl 12345678.000 8.5\n");
        }
        for _ in 0..LATENCY_SAMPLES {
            out.push_str("tls 0.012\nhttp 0.004\n");
        }
        let s = parse(&out).unwrap();
        assert_eq!(s.rates.len(), DOWNLOADS);
        assert_eq!(s.tls[0], Duration::from_millis(12));
        assert_eq!(s.http[0], Duration::from_millis(4));
        assert!(parse("dl x 1\n").is_err());
    }
}
