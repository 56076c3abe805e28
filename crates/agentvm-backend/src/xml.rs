//! libvirt XML documents generated from agentvm's domain descriptions, with an XML writer
//! (never string concatenation), and the ownership metadata agentvm stamps on everything it creates.

use std::io;
use std::path::PathBuf;

use quick_xml::events::{BytesText, Event};
use quick_xml::{Reader, Writer};

use crate::Accelerator;

/// XML namespace of agentvm's ownership metadata inside libvirt `<metadata>`.
pub const OWNER_NS: &str = "https://agentvm.dev/xmlns/owner/v1";
/// Namespace prefix used for [`OWNER_NS`].
pub const OWNER_PREFIX: &str = "agentvm";

/// What kind of thing owns a libvirt object agentvm created: an object of the API, or one of
/// the VMs agentvm makes for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OwnerKind {
    /// An object of the API (`VmPool`, `Sandbox`, `Network`, `NetworkFilter`, ...).
    Object(agentvm_api::Kind),
    /// `agentvm exec`'s throwaway VM.
    Exec,
    /// A VM of the benchmarks.
    Benchmark,
    /// The VM that probes whether the accelerator works.
    AcceleratorProbe,
    /// A VM of the backend's own tests.
    Test,
}

impl OwnerKind {
    /// The name stored in the ownership metadata (a `Kind`'s own name for objects).
    pub fn as_str(&self) -> &'static str {
        match self {
            OwnerKind::Object(k) => k.as_str(),
            OwnerKind::Exec => "Exec",
            OwnerKind::Benchmark => "Benchmark",
            OwnerKind::AcceleratorProbe => "AcceleratorProbe",
            OwnerKind::Test => "Test",
        }
    }

    /// The kind named `s` in ownership metadata; `None` for a name agentvm never writes (the
    /// object is then not taken for ours).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Exec" => OwnerKind::Exec,
            "Benchmark" => OwnerKind::Benchmark,
            "AcceleratorProbe" => OwnerKind::AcceleratorProbe,
            "Test" => OwnerKind::Test,
            other => OwnerKind::Object(other.parse().ok()?),
        })
    }
}

impl From<agentvm_api::Kind> for OwnerKind {
    fn from(k: agentvm_api::Kind) -> Self {
        OwnerKind::Object(k)
    }
}

impl std::fmt::Display for OwnerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who owns a libvirt object agentvm created: the manifest object it realises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Kind of the owner.
    pub kind: OwnerKind,
    /// Name of the owning object.
    pub name: String,
    /// Hash of the owner's spec the object was generated from (drift detection).
    pub spec_hash: String,
    /// The owner's generation when the object was generated.
    pub generation: i64,
}

impl Owner {
    /// `kind`'s `name`, with no spec hash and generation 0 (owners that are not API objects).
    pub fn new(kind: impl Into<OwnerKind>, name: impl Into<String>) -> Self {
        Owner {
            kind: kind.into(),
            name: name.into(),
            spec_hash: String::new(),
            generation: 0,
        }
    }

    /// Whether the owning object is of `kind`.
    pub fn is_kind(&self, kind: agentvm_api::Kind) -> bool {
        self.kind == OwnerKind::Object(kind)
    }
}

/// The guest network interface of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// libvirt network the interface attaches to.
    pub network: String,
    /// nwfilter applied to the interface, if any.
    pub filter: Option<String>,
    /// Fixed MAC address (`52:54:00:..`); libvirt picks one when `None`.
    pub mac: Option<String>,
    /// The host's address on the network (its gateway): agentvm filters drop everything a
    /// guest sends there except DNS. Required with `filter`.
    pub host: Option<std::net::Ipv4Addr>,
    /// The guest gets its IPv4 address by DHCP (the filter lets DHCP through): booting
    /// waits for that address, so a VM is never handed out (or its golden state taken)
    /// before it is on the network. Not part of the domain XML. With a filter, it also turns
    /// on anti-spoofing: libvirt learns the guest's address from the host's DHCP answer
    /// (filter parameters `CTRL_IP_LEARNING=dhcp`, `DHCPSERVER=<host>`).
    pub dhcp: bool,
    /// The guest's address from its DHCP lease, pinned as the filter's `IP` parameter: the
    /// only source address (and ARP sender address) the filter lets it use. `None` until the
    /// guest has its lease (booting pins it, see [`crate::Libvirt::pin_leased_ip`]).
    pub ip: Option<std::net::Ipv4Addr>,
}

impl NicSpec {
    /// The `<filterref>` parameters of this interface, in document order.
    pub fn filter_parameters(&self) -> Vec<(&'static str, String)> {
        use crate::netxml::{
            DHCP_SERVER_VARIABLE, HOST_VARIABLE, IP_LEARNING_VARIABLE, IP_VARIABLE,
        };
        let mut params = Vec::new();
        if let Some(host) = self.host {
            params.push((HOST_VARIABLE, host.to_string()));
        }
        if self.dhcp {
            params.push((IP_LEARNING_VARIABLE, "dhcp".to_string()));
            if let Some(host) = self.host {
                params.push((DHCP_SERVER_VARIABLE, host.to_string()));
            }
        }
        if let Some(ip) = self.ip {
            params.push((IP_VARIABLE, ip.to_string()));
        }
        params
    }

    /// The `<interface>` element alone, as `virDomainUpdateDeviceFlags` takes it, with the
    /// bandwidth limits in force on it.
    pub fn interface_xml(&self, bandwidth: NetBandwidth) -> String {
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        write_interface(&mut w, self, bandwidth).expect("writing to a Vec cannot fail");
        String::from_utf8(w.into_inner()).expect("XML writer emits UTF-8")
    }
}

/// Throughput limits of a VM's disk, enforced by QEMU's block throttling (libvirt `<iotune>`:
/// no cgroups needed); 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DiskIoLimits {
    /// Bytes read per second.
    pub read_bytes_per_second: u64,
    /// Bytes written per second.
    pub write_bytes_per_second: u64,
    /// Operations (reads and writes) per second.
    pub iops: u64,
}

impl DiskIoLimits {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// Bandwidth limits of a VM's network interface, enforced with tc on the host's end of the
/// interface (libvirt `<bandwidth>`: traffic into the guest is shaped, traffic out of it
/// policed); 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NetBandwidth {
    /// Bytes per second into the guest.
    pub in_bytes_per_second: u64,
    /// Bytes per second out of the guest.
    pub out_bytes_per_second: u64,
}

impl NetBandwidth {
    /// True when nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// libvirt's `<bandwidth>` rates are in kilobytes (1000 bytes, tc's `kbps`) per second;
/// rounded up so that a limit is never 0 (which would mean none).
fn kilobytes(bytes_per_second: u64) -> u64 {
    bytes_per_second.div_ceil(1000)
}

/// `cputune/period` used with a CPU quota, microseconds (libvirt's and the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;

/// `cputune/quota` (per vCPU, microseconds of each [`CPU_PERIOD_US`]) for `percent` of a CPU.
pub fn cpu_quota_us(percent: u32) -> u64 {
    CPU_PERIOD_US * u64::from(percent.clamp(1, 100)) / 100
}

/// Everything needed to define one agentvm guest domain.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainSpec {
    /// Domain name (a DNS label; unique on the host).
    pub name: String,
    /// Number of virtual CPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Relative CPU weight (`cputune/shares`), if set.
    pub cpu_shares: Option<u64>,
    /// Hard memory limit for the whole QEMU process in MiB (`memtune/hard_limit`), if set.
    /// It must leave headroom above guest RAM, see [`memory_hard_limit_mib`].
    pub memory_hard_limit_mib: Option<u64>,
    /// CPU time each vCPU may use, percent of one host CPU (`cputune/period` + `quota`).
    pub cpu_quota_percent: Option<u32>,
    /// Disk throughput limits (`<iotune>` on the disk).
    pub disk_io: DiskIoLimits,
    /// Network bandwidth limits (`<bandwidth>` on the interface; nothing without one).
    pub net_bandwidth: NetBandwidth,
    /// Per-VM qcow2 overlay (writable root disk).
    pub disk: PathBuf,
    /// Kernel for direct boot.
    pub kernel: PathBuf,
    /// Initrd for direct boot.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// File the guest's serial console is written to (boot log).
    pub serial_log: PathBuf,
    /// Network interface; `None` means isolated: the guest has no NIC at all.
    pub nic: Option<NicSpec>,
    /// Hardware acceleration (`kvm` or `qemu`/TCG domain type).
    pub accelerator: Accelerator,
    /// CPU features taken away from the CPU model (`<feature policy='disable'>`), e.g.
    /// `rdrand` and `rdseed` to run a guest whose CPU has no hardware random number
    /// generator (how tests show that the reseed after a reset is agentvm's doing).
    /// Empty for pool VMs: the guest sees everything its CPU mode offers.
    pub disabled_cpu_features: Vec<String>,
    /// Size of QEMU's TCG translation cache, MiB (`<features><tcg><tb-cache>`); `None`
    /// leaves QEMU's default (1 GiB, filled as guest code is translated). Only for TCG.
    pub tcg_tb_cache_mib: Option<u64>,
    /// Free page reporting on the virtio balloon (`<memballoon freePageReporting='on'>`):
    /// the guest kernel reports the free memory it holds in 2 MiB blocks and QEMU gives it
    /// back to the host, so memory a guest touched once (boot, the initrd, dropped caches)
    /// stops counting on the host. See [`crate::lean`].
    pub free_page_reporting: bool,
    /// Ownership metadata.
    pub owner: Owner,
}

/// QEMU needs memory beyond guest RAM (device emulation, TCG translation cache, I/O buffers).
/// A hard limit equal to guest RAM gets QEMU OOM-killed; this gives 50% + 256 MiB of headroom.
pub fn memory_hard_limit_mib(guest_mib: u64) -> u64 {
    guest_mib + guest_mib / 2 + 256
}

fn s(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

type W = Writer<Vec<u8>>;

fn text(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    w.create_element(name)
        .write_text_content(BytesText::new(value))?;
    Ok(())
}

fn owner_xml(w: &mut W, owner: &Owner) -> io::Result<()> {
    let generation = owner.generation.to_string();
    w.create_element(format!("{OWNER_PREFIX}:owner"))
        .with_attribute((format!("xmlns:{OWNER_PREFIX}").as_str(), OWNER_NS))
        .with_attribute(("kind", owner.kind.as_str()))
        .with_attribute(("name", owner.name.as_str()))
        .with_attribute(("specHash", owner.spec_hash.as_str()))
        .with_attribute(("generation", generation.as_str()))
        .write_empty()?;
    Ok(())
}

/// The ownership metadata element with its namespace declaration, as written inside
/// `<metadata>`.
pub fn owner_element(owner: &Owner) -> String {
    let mut w = Writer::new(Vec::new());
    owner_xml(&mut w, owner).expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("XML writer emits UTF-8")
}

/// The ownership metadata element as passed to `virDomainSetMetadata`: without prefix and
/// namespace declaration, which libvirt adds from its `key` and `uri` arguments (it refuses
/// an element that declares them itself).
pub fn owner_set_metadata_element(owner: &Owner) -> String {
    let generation = owner.generation.to_string();
    let mut w = Writer::new(Vec::new());
    w.create_element("owner")
        .with_attribute(("kind", owner.kind.as_str()))
        .with_attribute(("name", owner.name.as_str()))
        .with_attribute(("specHash", owner.spec_hash.as_str()))
        .with_attribute(("generation", generation.as_str()))
        .write_empty()
        .expect("writing to a Vec cannot fail");
    String::from_utf8(w.into_inner()).expect("XML writer emits UTF-8")
}

impl DomainSpec {
    /// The libvirt domain XML.
    pub fn to_xml(&self) -> String {
        self.to_xml_with_type(self.accelerator.domain_type())
    }

    /// The libvirt domain XML with an explicit `<domain type>` (libvirt's `test:///` driver
    /// knows only `test`).
    pub fn to_xml_with_type(&self, domain_type: &str) -> String {
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        self.write(&mut w, domain_type)
            .expect("writing to a Vec cannot fail");
        String::from_utf8(w.into_inner()).expect("XML writer emits UTF-8")
    }

    fn write(&self, w: &mut W, domain_type: &str) -> io::Result<()> {
        let vcpus = self.vcpus.to_string();
        let mem = self.memory_mib.to_string();
        w.create_element("domain")
            .with_attribute(("type", domain_type))
            .write_inner_content(|w| {
                text(w, "name", &self.name)?;
                w.create_element("metadata")
                    .write_inner_content(|w| owner_xml(w, &self.owner))?;
                w.create_element("memory")
                    .with_attribute(("unit", "MiB"))
                    .write_text_content(BytesText::new(&mem))?;
                text(w, "vcpu", &vcpus)?;
                if self.cpu_shares.is_some() || self.cpu_quota_percent.is_some() {
                    w.create_element("cputune").write_inner_content(|w| {
                        if let Some(shares) = self.cpu_shares {
                            text(w, "shares", &shares.to_string())?;
                        }
                        if let Some(pct) = self.cpu_quota_percent {
                            // `quota` applies to each vCPU thread.
                            text(w, "period", &CPU_PERIOD_US.to_string())?;
                            text(w, "quota", &cpu_quota_us(pct).to_string())?;
                        }
                        Ok(())
                    })?;
                }
                if let Some(limit) = self.memory_hard_limit_mib {
                    w.create_element("memtune").write_inner_content(|w| {
                        w.create_element("hard_limit")
                            .with_attribute(("unit", "MiB"))
                            .write_text_content(BytesText::new(&limit.to_string()))?;
                        Ok(())
                    })?;
                }
                w.create_element("os").write_inner_content(|w| {
                    w.create_element("type")
                        .with_attribute(("arch", "x86_64"))
                        .with_attribute(("machine", "q35"))
                        .write_text_content(BytesText::new("hvm"))?;
                    text(w, "kernel", &s(&self.kernel))?;
                    text(w, "initrd", &s(&self.initrd))?;
                    text(w, "cmdline", &self.cmdline)
                })?;
                w.create_element("features").write_inner_content(|w| {
                    w.create_element("acpi").write_empty()?;
                    if let (Accelerator::Tcg, Some(mib)) = (self.accelerator, self.tcg_tb_cache_mib)
                    {
                        w.create_element("tcg").write_inner_content(|w| {
                            w.create_element("tb-cache")
                                .with_attribute(("unit", "MiB"))
                                .write_text_content(BytesText::new(&mib.to_string()))?;
                            Ok(())
                        })?;
                    }
                    Ok(())
                })?;
                // KVM: the host's CPU model. TCG: every feature QEMU emulates (`-cpu max`:
                // SSE4.2, AVX2, BMI…) instead of the bare `qemu64` default, on which binaries
                // built for x86-64-v3 die of SIGILL (Claude Code's native binary does).
                let cpu_mode = match self.accelerator {
                    Accelerator::Kvm => "host-model",
                    Accelerator::Tcg => "maximum",
                };
                let cpu = w.create_element("cpu").with_attribute(("mode", cpu_mode));
                if self.disabled_cpu_features.is_empty() {
                    cpu.write_empty()?;
                } else {
                    cpu.write_inner_content(|w| {
                        for feature in &self.disabled_cpu_features {
                            w.create_element("feature")
                                .with_attribute(("policy", "disable"))
                                .with_attribute(("name", feature.as_str()))
                                .write_empty()?;
                        }
                        Ok(())
                    })?;
                }
                w.create_element("clock")
                    .with_attribute(("offset", "utc"))
                    .write_empty()?;
                text(w, "on_poweroff", "destroy")?;
                text(w, "on_reboot", "restart")?;
                text(w, "on_crash", "destroy")?;
                w.create_element("devices")
                    .write_inner_content(|w| self.write_devices(w))?;
                Ok(())
            })?;
        Ok(())
    }

    fn write_devices(&self, w: &mut W) -> io::Result<()> {
        w.create_element("disk")
            .with_attribute(("type", "file"))
            .with_attribute(("device", "disk"))
            .write_inner_content(|w| {
                // Overlays are throw-away per VM: skipping host flushes is safe and fast.
                w.create_element("driver")
                    .with_attribute(("name", "qemu"))
                    .with_attribute(("type", "qcow2"))
                    .with_attribute(("cache", "unsafe"))
                    .with_attribute(("discard", "unmap"))
                    .write_empty()?;
                w.create_element("source")
                    .with_attribute(("file", s(&self.disk).as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("dev", "vda"))
                    .with_attribute(("bus", "virtio"))
                    .write_empty()?;
                let io = self.disk_io;
                if !io.is_unlimited() {
                    w.create_element("iotune").write_inner_content(|w| {
                        for (name, value) in [
                            ("read_bytes_sec", io.read_bytes_per_second),
                            ("write_bytes_sec", io.write_bytes_per_second),
                            ("total_iops_sec", io.iops),
                        ] {
                            if value > 0 {
                                text(w, name, &value.to_string())?;
                            }
                        }
                        Ok(())
                    })?;
                }
                Ok(())
            })?;
        if let Some(nic) = &self.nic {
            write_interface(w, nic, self.net_bandwidth)?;
        }
        w.create_element("controller")
            .with_attribute(("type", "usb"))
            .with_attribute(("model", "none"))
            .write_empty()?;
        w.create_element("serial")
            .with_attribute(("type", "file"))
            .write_inner_content(|w| {
                w.create_element("source")
                    .with_attribute(("path", s(&self.serial_log).as_str()))
                    .write_empty()?;
                w.create_element("target")
                    .with_attribute(("port", "0"))
                    .write_empty()?;
                Ok(())
            })?;
        w.create_element("channel")
            .with_attribute(("type", "unix"))
            .write_inner_content(|w| {
                w.create_element("target")
                    .with_attribute(("type", "virtio"))
                    .with_attribute(("name", "org.qemu.guest_agent.0"))
                    .write_empty()?;
                Ok(())
            })?;
        // agentvm-guest's port; libvirt picks the socket path when the domain starts.
        w.create_element("channel")
            .with_attribute(("type", "unix"))
            .write_inner_content(|w| {
                w.create_element("target")
                    .with_attribute(("type", "virtio"))
                    .with_attribute(("name", agentvm_guest::PORT_NAME))
                    .write_empty()?;
                Ok(())
            })?;
        w.create_element("rng")
            .with_attribute(("model", "virtio"))
            .write_inner_content(|w| {
                w.create_element("backend")
                    .with_attribute(("model", "random"))
                    .write_text_content(BytesText::new("/dev/urandom"))?;
                Ok(())
            })?;
        let balloon = w
            .create_element("memballoon")
            .with_attribute(("model", "virtio"));
        let balloon = if self.free_page_reporting {
            balloon.with_attribute(("freePageReporting", "on"))
        } else {
            balloon
        };
        balloon.write_inner_content(|w| {
            w.create_element("stats")
                .with_attribute(("period", "5"))
                .write_empty()?;
            Ok(())
        })?;
        Ok(())
    }
}

fn write_interface(w: &mut W, nic: &NicSpec, bw: NetBandwidth) -> io::Result<()> {
    w.create_element("interface")
        .with_attribute(("type", "network"))
        .write_inner_content(|w| {
            w.create_element("source")
                .with_attribute(("network", nic.network.as_str()))
                .write_empty()?;
            if let Some(mac) = &nic.mac {
                w.create_element("mac")
                    .with_attribute(("address", mac.as_str()))
                    .write_empty()?;
            }
            w.create_element("model")
                .with_attribute(("type", "virtio"))
                .write_empty()?;
            if !bw.is_unlimited() {
                w.create_element("bandwidth").write_inner_content(|w| {
                    for (name, value) in [
                        ("inbound", bw.in_bytes_per_second),
                        ("outbound", bw.out_bytes_per_second),
                    ] {
                        if value > 0 {
                            w.create_element(name)
                                .with_attribute(("average", kilobytes(value).to_string().as_str()))
                                .write_empty()?;
                        }
                    }
                    Ok(())
                })?;
            }
            if let Some(filter) = &nic.filter {
                let el = w
                    .create_element("filterref")
                    .with_attribute(("filter", filter.as_str()));
                let params = nic.filter_parameters();
                if params.is_empty() {
                    el.write_empty()?;
                } else {
                    el.write_inner_content(|w| {
                        for (name, value) in &params {
                            w.create_element("parameter")
                                .with_attribute(("name", *name))
                                .with_attribute(("value", value.as_str()))
                                .write_empty()?;
                        }
                        Ok(())
                    })?;
                }
            }
            Ok(())
        })?;
    Ok(())
}

/// Find agentvm's ownership metadata in any libvirt XML document (domain, network, nwfilter).
/// Returns `None` when the object carries none: such objects are not ours and are never touched.
pub fn parse_owner(xml: &str) -> Option<Owner> {
    let mut reader = Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let name = e.name();
                let local = name.local_name();
                let is_owner = local.as_ref() == b"owner"
                    && e.attributes().flatten().any(|a| {
                        a.key.as_ref().starts_with(b"xmlns")
                            && a.unescape_value().map(|v| v == OWNER_NS).unwrap_or(false)
                    });
                if !is_owner {
                    continue;
                }
                let (mut kind, mut owner) = (None, Owner::new(OwnerKind::Test, ""));
                for a in e.attributes().flatten() {
                    let v = a.unescape_value().ok()?.into_owned();
                    match a.key.as_ref() {
                        b"kind" => kind = OwnerKind::parse(&v),
                        b"name" => owner.name = v,
                        b"specHash" => owner.spec_hash = v,
                        b"generation" => owner.generation = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
                // A kind agentvm never writes: not ours.
                owner.kind = kind?;
                return Some(owner);
            }
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "agentvm-sandbox-0".into(),
            vcpus: 2,
            memory_mib: 1024,
            cpu_shares: Some(1024),
            disabled_cpu_features: Vec::new(),
            memory_hard_limit_mib: Some(memory_hard_limit_mib(1024)),
            cpu_quota_percent: None,
            disk_io: Default::default(),
            net_bandwidth: Default::default(),
            disk: "/var/lib/agentvm/vms/a&b/disk.qcow2".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "root=/dev/vda rw init=/sbin/agentvm-init quiet".into(),
            serial_log: "/var/lib/agentvm/vms/x/serial.log".into(),
            nic: None,
            accelerator: Accelerator::Tcg,
            tcg_tb_cache_mib: None,
            free_page_reporting: false,
            owner: Owner {
                kind: agentvm_api::Kind::VmPool.into(),
                name: "p<&\"'>".into(),
                spec_hash: "abc".into(),
                generation: 3,
            },
        }
    }

    #[test]
    fn owner_round_trips_through_domain_xml_with_special_characters() {
        let xml = spec().to_xml();
        assert!(xml.contains("a&amp;b"), "{xml}");
        assert_eq!(parse_owner(&xml), Some(spec().owner));
    }

    #[test]
    fn isolated_domain_has_no_interface_and_nat_one_has_a_filterref() {
        let xml = spec().to_xml();
        assert!(!xml.contains("<interface"));
        let mut s = spec();
        s.nic = Some(NicSpec {
            network: "agentvm-net".into(),
            filter: Some("agentvm-egress".into()),
            mac: None,
            host: Some("10.1.2.1".parse().unwrap()),
            dhcp: true,
            ip: None,
        });
        let xml = s.to_xml();
        assert!(xml.contains("<source network=\"agentvm-net\"/>"), "{xml}");
        assert!(
            xml.contains("<filterref filter=\"agentvm-egress\">")
                && xml.contains("<parameter name=\"AGENTVM_HOST\" value=\"10.1.2.1\"/>"),
            "{xml}"
        );
    }

    /// (element, attributes) of every element in `xml`, in document order.
    fn elements(xml: &str) -> Vec<(String, Vec<(String, String)>)> {
        element_paths(xml)
            .into_iter()
            .map(|(path, attrs, _)| {
                let name = path.rsplit('/').next().unwrap_or_default().to_string();
                (name, attrs)
            })
            .collect()
    }

    fn parameters(xml: &str) -> Vec<(String, String)> {
        elements(xml)
            .into_iter()
            .filter(|(name, _)| name == "parameter")
            .map(|(_, attrs)| {
                let get = |k: &str| attrs.iter().find(|(a, _)| a == k).unwrap().1.clone();
                (get("name"), get("value"))
            })
            .collect()
    }

    #[test]
    fn dhcp_nics_learn_their_address_from_the_host_and_pinned_ones_carry_it() {
        let mut nic = NicSpec {
            network: "agentvm-net".into(),
            filter: Some("agentvm-egress".into()),
            mac: None,
            host: Some("10.1.2.1".parse().unwrap()),
            dhcp: true,
            ip: None,
        };
        let p = |k: &str, v: &str| (k.to_string(), v.to_string());
        let mut s = spec();
        s.nic = Some(nic.clone());
        assert_eq!(
            parameters(&s.to_xml()),
            [
                p("AGENTVM_HOST", "10.1.2.1"),
                p("CTRL_IP_LEARNING", "dhcp"),
                p("DHCPSERVER", "10.1.2.1"),
            ]
        );
        // Pinned: the interface alone, as `virDomainUpdateDeviceFlags` gets it.
        nic.mac = Some("52:54:00:0a:0b:0c".into());
        nic.ip = Some("10.1.2.77".parse().unwrap());
        let xml = nic.interface_xml(NetBandwidth::default());
        assert!(xml.starts_with("<interface type=\"network\">"), "{xml}");
        assert!(elements(&xml).contains(&(
            "mac".into(),
            vec![("address".into(), "52:54:00:0a:0b:0c".into())]
        )));
        assert_eq!(
            parameters(&xml),
            [
                p("AGENTVM_HOST", "10.1.2.1"),
                p("CTRL_IP_LEARNING", "dhcp"),
                p("DHCPSERVER", "10.1.2.1"),
                p("IP", "10.1.2.77"),
            ]
        );
        // Without DHCP nothing is learned.
        nic.dhcp = false;
        nic.ip = None;
        assert_eq!(
            parameters(&nic.interface_xml(NetBandwidth::default())),
            [p("AGENTVM_HOST", "10.1.2.1")]
        );
    }

    #[test]
    fn free_page_reporting_is_an_attribute_of_the_balloon() {
        let balloon = |s: &DomainSpec| -> Vec<(String, String)> {
            elements(&s.to_xml())
                .into_iter()
                .find(|(n, _)| n == "memballoon")
                .expect("a balloon")
                .1
        };
        let mut s = spec();
        assert_eq!(
            balloon(&s),
            vec![("model".to_string(), "virtio".to_string())]
        );
        s.free_page_reporting = true;
        assert_eq!(
            balloon(&s),
            vec![
                ("model".to_string(), "virtio".to_string()),
                ("freePageReporting".to_string(), "on".to_string())
            ]
        );
        assert!(s.to_xml().contains("<stats period=\"5\"/>"), "stats kept");
    }

    #[test]
    fn the_tcg_translation_cache_is_sized_under_tcg_only() {
        let tb = |s: &DomainSpec| -> Vec<(String, Vec<(String, String)>)> {
            elements(&s.to_xml())
                .into_iter()
                .filter(|(n, _)| n == "tcg" || n == "tb-cache")
                .collect()
        };
        let mut s = spec();
        assert!(tb(&s).is_empty(), "QEMU's default unless sized");
        s.tcg_tb_cache_mib = Some(64);
        assert_eq!(
            tb(&s),
            vec![
                ("tcg".to_string(), vec![]),
                (
                    "tb-cache".to_string(),
                    vec![("unit".to_string(), "MiB".to_string())]
                ),
            ]
        );
        assert!(s.to_xml().contains("<tb-cache unit=\"MiB\">64</tb-cache>"));
        s.accelerator = Accelerator::Kvm;
        assert!(tb(&s).is_empty(), "no TCG element for KVM");
    }

    #[test]
    fn disabled_cpu_features_are_listed_under_cpu() {
        let cpu = |s: &DomainSpec| -> Vec<(String, Vec<(String, String)>)> {
            elements(&s.to_xml())
                .into_iter()
                .skip_while(|(n, _)| n != "cpu")
                .take_while(|(n, _)| n == "cpu" || n == "feature")
                .collect()
        };
        assert_eq!(cpu(&spec()).len(), 1, "no features by default");
        let mut s = spec();
        s.disabled_cpu_features = vec!["rdrand".into(), "rdseed".into()];
        let got = cpu(&s);
        let feature = |name: &str| {
            (
                "feature".to_string(),
                vec![
                    ("policy".to_string(), "disable".to_string()),
                    ("name".to_string(), name.to_string()),
                ],
            )
        };
        assert_eq!(
            got,
            [
                (
                    "cpu".to_string(),
                    vec![("mode".to_string(), "maximum".to_string())]
                ),
                feature("rdrand"),
                feature("rdseed"),
            ]
        );
    }

    #[test]
    fn accelerator_selects_domain_type() {
        assert!(spec().to_xml().starts_with("<domain type=\"qemu\">"));
        assert!(spec().to_xml().contains("<cpu mode=\"maximum\"/>"));
        let mut s = spec();
        s.accelerator = Accelerator::Kvm;
        let xml = s.to_xml();
        assert!(xml.starts_with("<domain type=\"kvm\">"));
        assert!(xml.contains("host-model"));
    }

    #[test]
    fn hard_limit_leaves_headroom_above_guest_ram() {
        assert!(memory_hard_limit_mib(512) > 512 + 256);
        assert!(spec()
            .to_xml()
            .contains("<hard_limit unit=\"MiB\">1792</hard_limit>"));
    }

    /// An element's path, attributes (in document order) and text.
    type Element = (String, Vec<(String, String)>, String);

    /// Every element of `xml` with its path from the root (`domain/devices/disk/iotune/..`),
    /// attributes and text: the document parsed back, not searched as a string.
    fn element_paths(xml: &str) -> Vec<Element> {
        let mut reader = Reader::from_str(xml);
        let mut path: Vec<String> = Vec::new();
        let mut out: Vec<Element> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        loop {
            match reader.read_event().expect("well-formed XML") {
                Event::Start(e) => {
                    path.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap());
                    out.push((path.join("/"), attrs(&e), String::new()));
                    open.push(out.len() - 1);
                }
                Event::Empty(e) => {
                    let name = String::from_utf8(e.name().as_ref().to_vec()).unwrap();
                    out.push((
                        format!("{}/{name}", path.join("/")),
                        attrs(&e),
                        String::new(),
                    ));
                }
                Event::Text(t) => {
                    if let Some(&i) = open.last() {
                        out[i].2.push_str(&t.decode().unwrap());
                    }
                }
                Event::End(_) => {
                    path.pop();
                    open.pop();
                }
                Event::Eof => return out,
                _ => {}
            }
        }
    }

    fn attrs(e: &quick_xml::events::BytesStart<'_>) -> Vec<(String, String)> {
        e.attributes()
            .map(|a| {
                let a = a.unwrap();
                (
                    String::from_utf8(a.key.as_ref().to_vec()).unwrap(),
                    a.unescape_value().unwrap().into_owned(),
                )
            })
            .collect()
    }

    fn text_of(xml: &str, path: &str) -> Option<String> {
        element_paths(xml)
            .into_iter()
            .find(|(p, _, _)| p == path)
            .map(|(_, _, t)| t)
    }

    fn attr_of(xml: &str, path: &str, attr: &str) -> Option<String> {
        element_paths(xml)
            .into_iter()
            .find(|(p, _, _)| p == path)
            .and_then(|(_, a, _)| a.into_iter().find(|(k, _)| k == attr).map(|(_, v)| v))
    }

    fn with_nic() -> DomainSpec {
        let mut s = spec();
        s.nic = Some(NicSpec {
            network: "agentvm-net".into(),
            filter: Some("agentvm-egress".into()),
            mac: None,
            host: Some("10.1.2.1".parse().unwrap()),
            dhcp: true,
            ip: None,
        });
        s
    }

    #[test]
    fn disk_throttling_goes_into_iotune_and_only_what_is_limited() {
        assert_eq!(
            text_of(&spec().to_xml(), "domain/devices/disk/iotune"),
            None,
            "no limits, no iotune"
        );
        let mut s = spec();
        s.disk_io = DiskIoLimits {
            read_bytes_per_second: 200 << 20,
            write_bytes_per_second: 5 << 20,
            iops: 0,
        };
        let xml = s.to_xml();
        let at = |e: &str| text_of(&xml, &format!("domain/devices/disk/iotune/{e}"));
        assert_eq!(at("read_bytes_sec").as_deref(), Some("209715200"));
        assert_eq!(at("write_bytes_sec").as_deref(), Some("5242880"));
        assert_eq!(at("total_iops_sec"), None, "0 means no limit");
        s.disk_io.iops = 300;
        assert_eq!(
            text_of(&s.to_xml(), "domain/devices/disk/iotune/total_iops_sec").as_deref(),
            Some("300")
        );
    }

    #[test]
    fn bandwidth_goes_on_the_interface_in_libvirt_kilobytes() {
        let mut s = with_nic();
        assert_eq!(
            attr_of(
                &s.to_xml(),
                "domain/devices/interface/bandwidth/inbound",
                "average"
            ),
            None
        );
        s.net_bandwidth = NetBandwidth {
            in_bytes_per_second: 25 << 20,
            out_bytes_per_second: 1,
        };
        let xml = s.to_xml();
        // tc's kbps: 1000 bytes/s, rounded up (a limit never becomes 0, i.e. none).
        assert_eq!(
            attr_of(
                &xml,
                "domain/devices/interface/bandwidth/inbound",
                "average"
            )
            .as_deref(),
            Some("26215")
        );
        assert_eq!(
            attr_of(
                &xml,
                "domain/devices/interface/bandwidth/outbound",
                "average"
            )
            .as_deref(),
            Some("1")
        );
        // Isolated: no interface, so nowhere to put it.
        let mut isolated = spec();
        isolated.net_bandwidth = s.net_bandwidth;
        assert!(!element_paths(&isolated.to_xml())
            .iter()
            .any(|(p, _, _)| p.contains("bandwidth")));
    }

    #[test]
    fn cpu_quota_and_shares_share_cputune() {
        let mut s = spec();
        s.cpu_quota_percent = Some(50);
        let xml = s.to_xml();
        assert_eq!(
            text_of(&xml, "domain/cputune/shares").as_deref(),
            Some("1024")
        );
        assert_eq!(
            text_of(&xml, "domain/cputune/period").as_deref(),
            Some("100000")
        );
        assert_eq!(
            text_of(&xml, "domain/cputune/quota").as_deref(),
            Some("50000")
        );
        s.cpu_shares = None;
        s.cpu_quota_percent = None;
        assert_eq!(text_of(&s.to_xml(), "domain/cputune"), None);
        assert_eq!(cpu_quota_us(1), 1000);
        assert_eq!(cpu_quota_us(100), 100_000);
    }

    #[test]
    fn foreign_xml_has_no_owner() {
        assert_eq!(parse_owner("<domain><name>test</name></domain>"), None);
        assert_eq!(
            parse_owner(
                "<domain><metadata><x:owner xmlns:x=\"urn:other\" kind=\"a\"/></metadata></domain>"
            ),
            None
        );
    }

    #[test]
    fn owner_kinds_round_trip_and_unknown_ones_are_not_ours() {
        for kind in [
            OwnerKind::Object(agentvm_api::Kind::VmPool),
            OwnerKind::Object(agentvm_api::Kind::Sandbox),
            OwnerKind::Exec,
            OwnerKind::Benchmark,
            OwnerKind::AcceleratorProbe,
            OwnerKind::Test,
        ] {
            assert_eq!(OwnerKind::parse(kind.as_str()), Some(kind));
        }
        let xml = |kind: &str| {
            format!(
                "<domain><metadata><agentvm:owner xmlns:agentvm=\"{OWNER_NS}\" kind=\"{kind}\" name=\"x\" specHash=\"h\" generation=\"1\"/></metadata></domain>"
            )
        };
        assert!(parse_owner(&xml("VmPool")).is_some_and(|o| o.is_kind(agentvm_api::Kind::VmPool)));
        assert_eq!(parse_owner(&xml("SomethingElse")), None);
    }
}
