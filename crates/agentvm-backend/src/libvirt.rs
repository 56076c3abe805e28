//! The libvirt connection: domain lifecycle and the guest-agent channel, through the `virt` crate.
//! Every call here is synchronous; async callers run them on blocking threads.

use std::time::{Duration, Instant};

use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorNumber, ErrorNumberEnum};
use virt::sys;

use crate::error::{BackendError, Result};
use crate::guest::AgentChannel;
use crate::xml::{parse_owner, DomainSpec, NicSpec, Owner};

/// The default libvirt URI for real VMs.
pub const DEFAULT_URI: &str = "qemu:///system";
/// Environment variable overriding the libvirt URI.
pub const URI_ENV: &str = "AGENTVM_LIBVIRT_URI";

/// A libvirt connection.
pub struct Libvirt {
    conn: Connect,
    uri: String,
    /// Limits this host was found unable to enforce, with libvirt's reason (see
    /// [`Libvirt::start_with_limits`]).
    unenforceable: std::sync::Mutex<std::collections::BTreeMap<crate::limits::Limit, String>>,
}

/// Run state of a domain, reduced to what agentvm acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    /// Running (or paused/blocked: QEMU is alive).
    Running,
    /// Defined but not running.
    ShutOff,
    /// Crashed or anything else.
    Other,
}

/// Power state of a domain, finer than [`DomainState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PowerState {
    /// vCPUs running.
    Running,
    /// QEMU alive, vCPUs stopped.
    Paused,
    /// No QEMU process; memory and devices saved by libvirt (managed save).
    Saved,
    /// No QEMU process and nothing saved.
    Off,
    /// Crashed or anything else.
    Other,
}

/// An agentvm-owned domain as found in libvirt.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedDomain {
    /// Domain name.
    pub name: String,
    /// Its ownership metadata.
    pub owner: Owner,
    /// Run state.
    pub state: DomainState,
    /// SHA-256 of its persistent (inactive) XML, as [`Libvirt::definition_fingerprint`].
    pub definition_sha256: String,
    /// (nwfilter, pinned guest address) of its filtered interfaces (see
    /// [`crate::guest_addr::filtered_addresses`]).
    pub filtered_addresses: Vec<(String, std::net::Ipv4Addr)>,
}

fn state_of(state: virt::domain::DomainStateEnum) -> DomainState {
    use virt::domain::DomainState as V;
    use virt::enumutil::Enum;
    match state {
        Enum::Known(V::Running | V::Paused | V::Blocked) => DomainState::Running,
        Enum::Known(V::Shutoff) => DomainState::ShutOff,
        _ => DomainState::Other,
    }
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Libvirt {
    /// Connect to `uri` (e.g. `qemu:///system`, `test:///default`).
    pub fn connect(uri: &str) -> Result<Self> {
        // libvirt prints every error to stderr by default; ours are returned as values.
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|e| BackendError::Libvirt {
            code: e.code(),
            message: format!(
                "cannot connect to {uri}: {} (is libvirtd running? `scripts/host-setup.sh` starts it)",
                e.message()
            ),
        })?;
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
            unenforceable: Default::default(),
        })
    }

    /// Limits found unenforceable on this connection's host, with libvirt's reason.
    pub fn unenforceable_limits(&self) -> std::collections::BTreeMap<crate::limits::Limit, String> {
        self.unenforceable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn remember_unenforceable(&self, limit: crate::limits::Limit, why: &str) {
        self.unenforceable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(limit, why.to_string());
    }

    /// The URI from `$AGENTVM_LIBVIRT_URI`, else `qemu:///system`.
    pub fn default_uri() -> String {
        std::env::var(URI_ENV).unwrap_or_else(|_| DEFAULT_URI.to_string())
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The underlying `virt` connection.
    pub fn raw(&self) -> &Connect {
        &self.conn
    }

    /// True when the daemon answers on this connection: a round trip, so it sees a
    /// connection whose daemon restarted (libvirt's own `is_alive` only notices a closed
    /// socket once a call has failed on it).
    pub fn answers(&self) -> bool {
        self.conn.is_alive().unwrap_or(false) && self.conn.hyp_version().is_ok()
    }

    /// libvirt library version as `major.minor.micro`.
    pub fn version(&self) -> Result<String> {
        let v = self
            .conn
            .lib_version()
            .map_err(|e| BackendError::from_virt(e, "connection", &self.uri))?;
        Ok(format!(
            "{}.{}.{}",
            v / 1_000_000,
            (v / 1000) % 1000,
            v % 1000
        ))
    }

    fn lookup(&self, name: &str) -> Result<Domain> {
        self.conn
            .lookup_domain_by_name(name)
            .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// Ownership metadata of domain `name`, `None` if it is not agentvm's.
    pub fn domain_owner(&self, name: &str) -> Result<Option<Owner>> {
        let dom = self.lookup(name)?;
        let xml = dom
            .xml_desc(0)
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(parse_owner(&xml))
    }

    fn owned(&self, name: &str) -> Result<Domain> {
        let dom = self.lookup(name)?;
        let xml = dom
            .xml_desc(0)
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        if parse_owner(&xml).is_none() {
            return Err(BackendError::NotOwned {
                kind: "domain",
                name: name.to_string(),
            });
        }
        Ok(dom)
    }

    /// True when connected to libvirt's in-process `test:///` driver.
    pub fn is_test_driver(&self) -> bool {
        self.uri.starts_with("test:")
    }

    fn domain_type(&self, spec: &DomainSpec) -> &'static str {
        if self.is_test_driver() {
            "test"
        } else {
            spec.accelerator.domain_type()
        }
    }

    /// Define (persistently) a domain. Fails with `AlreadyExists` if the name is taken.
    pub fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        if self.conn.lookup_domain_by_name(&spec.name).is_ok() {
            return Err(BackendError::AlreadyExists {
                kind: "domain",
                name: spec.name.clone(),
            });
        }
        self.conn
            .define_domain_xml(&spec.to_xml_with_type(self.domain_type(spec)))
            .map_err(|e| BackendError::from_virt(e, "domain", &spec.name))?;
        Ok(())
    }

    /// Replace the persistent definition of owned, stopped domain `name` (`spec.name`) with
    /// `spec`.
    pub fn redefine_domain(&self, spec: &DomainSpec) -> Result<()> {
        self.undefine_domain(&spec.name)?;
        self.define_domain(spec)
    }

    /// Start a defined, owned domain.
    pub fn start_domain(&self, name: &str) -> Result<()> {
        self.owned(name)?
            .create()
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(())
    }

    /// Run state of domain `name`.
    pub fn domain_state(&self, name: &str) -> Result<DomainState> {
        let (state, _) = self
            .lookup(name)?
            .state()
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(state_of(state))
    }

    /// Stop an owned domain at once (pull the plug). Succeeds if it is not running.
    pub fn destroy_domain(&self, name: &str) -> Result<()> {
        let dom = self.owned(name)?;
        if dom.is_active().unwrap_or(false) {
            if let Err(e) = dom.destroy() {
                // It may have stopped between the check and the call.
                if dom.is_active().unwrap_or(false) {
                    return Err(BackendError::from_virt(e, "domain", name));
                }
            }
        }
        Ok(())
    }

    /// Undefine an owned, stopped domain together with its snapshot metadata and managed save.
    /// Succeeds when it is already gone. Files (overlays, saved states) are the caller's.
    pub fn undefine_domain(&self, name: &str) -> Result<()> {
        let dom = match self.owned(name) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        };
        dom.undefine_flags(
            sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
        )
        .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// Replaces the ownership metadata of owned domain `name` (its live and persistent
    /// definitions): a pool VM claimed by a sandbox changes hands this way, in one libvirt
    /// call, so it is never without an owner.
    pub fn set_domain_owner(&self, name: &str, owner: &Owner) -> Result<()> {
        let dom = self.owned(name)?;
        let mut flags = sys::VIR_DOMAIN_AFFECT_CONFIG;
        if dom.is_active().unwrap_or(false) {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        dom.set_metadata(
            sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
            Some(&crate::xml::owner_set_metadata_element(owner)),
            Some(crate::xml::OWNER_PREFIX),
            Some(crate::xml::OWNER_NS),
            flags,
        )
        .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// Memory of running domain `name`, bytes.
    pub fn memory_bytes(&self, name: &str) -> Result<u64> {
        let dom = self.lookup(name)?;
        let info = dom
            .info()
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(info.memory.saturating_mul(1024))
    }

    /// Power state of domain `name`, telling paused from running and a domain saved with
    /// [`Libvirt::save_domain`] from one that is merely off.
    pub fn power_state(&self, name: &str) -> Result<PowerState> {
        use virt::domain::DomainState as V;
        use virt::enumutil::Enum;
        let dom = self.lookup(name)?;
        let (state, _) = dom
            .state()
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(match state {
            Enum::Known(V::Running | V::Blocked) => PowerState::Running,
            Enum::Known(V::Paused | V::PMSuspended) => PowerState::Paused,
            Enum::Known(V::Shutoff) => {
                if dom.has_managed_save(0).unwrap_or(false) {
                    PowerState::Saved
                } else {
                    PowerState::Off
                }
            }
            _ => PowerState::Other,
        })
    }

    /// Stops the vCPUs of owned, running domain `name`; its memory stays in host RAM.
    pub fn suspend_domain(&self, name: &str) -> Result<()> {
        self.owned(name)?
            .suspend()
            .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// Lets the vCPUs of owned, paused domain `name` run again.
    pub fn resume_domain(&self, name: &str) -> Result<()> {
        self.owned(name)?
            .resume()
            .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// Saves owned, running or paused domain `name` (memory and device state) to libvirt's
    /// managed-save file and ends its QEMU process; [`Libvirt::start_domain`] restores it.
    pub fn save_domain(&self, name: &str) -> Result<()> {
        self.owned(name)?
            .managed_save(0)
            .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// SHA-256 (hex) of domain `name`'s persistent definition (`virsh dumpxml --inactive`),
    /// which a hand edit (`virsh edit`, `virsh define`) changes and running, snapshots and
    /// resets do not.
    pub fn definition_fingerprint(&self, name: &str) -> Result<String> {
        let xml = self
            .lookup(name)?
            .xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(sha256_hex(&xml))
    }

    /// Whether the host applies CPU weight `wanted` (`cputune/shares`) to running domain
    /// `name`: `Ok` when libvirt reads that weight back, else why not (a host whose cgroup CPU
    /// controller libvirt cannot use starts the domain but ignores the weight).
    pub fn cpu_shares_applied(&self, name: &str, wanted: u64) -> std::result::Result<(), String> {
        let dom = self.lookup(name).map_err(|e| e.to_string())?;
        match dom.scheduler_parameters() {
            Ok(info) => match info.cpu_shares {
                Some(s) if s == wanted => Ok(()),
                Some(s) => Err(format!("libvirt reports weight {s} instead")),
                None => Err(format!(
                    "libvirt reports no CPU weight (scheduler {})",
                    info.scheduler_type
                )),
            },
            Err(e) => Err(e.message().to_string()),
        }
    }

    /// Every domain carrying agentvm's ownership metadata. Foreign domains are not listed.
    pub fn list_owned_domains(&self) -> Result<Vec<OwnedDomain>> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| BackendError::from_virt(e, "domain", "*"))?;
        let mut out = Vec::new();
        // One XML fetch per domain: the persistent definition carries the ownership metadata
        // and is what the drift fingerprint hashes.
        for d in doms {
            let Ok(name) = d.name() else { continue };
            let Ok(xml) = d.xml_desc(virt::sys::VIR_DOMAIN_XML_INACTIVE) else {
                continue;
            };
            if let Some(owner) = parse_owner(&xml) {
                let state = d
                    .state()
                    .map(|(s, _)| state_of(s))
                    .unwrap_or(DomainState::Other);
                out.push(OwnedDomain {
                    name,
                    owner,
                    state,
                    definition_sha256: sha256_hex(&xml),
                    filtered_addresses: crate::guest_addr::filtered_addresses(&xml),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Pin the IPv4 address the network's DHCP server leased to `name`'s interface as its
    /// nwfilter's `IP` parameter, in the running domain and its persistent definition
    /// (`virDomainUpdateDeviceFlags`; libvirt re-applies the filter at once). From then on
    /// the filter's anti-spoofing rules use this address without libvirt's DHCP snooping,
    /// which would withdraw it when the lease runs out (a VM reset to its golden state never
    /// renews it) and drop the guest's traffic. The address comes from the host's DHCP server
    /// (the network's lease table, not the guest), and the guest must be using it: `guest_ips`
    /// are the addresses the guest reports (`interface=address/prefix`). Waits up to `timeout`
    /// for the lease to show up. `nic` is the interface as defined and `bandwidth` the limits
    /// in force on it (the update replaces the whole interface); returns the address.
    pub fn pin_leased_ip(
        &self,
        name: &str,
        nic: &NicSpec,
        bandwidth: crate::xml::NetBandwidth,
        guest_ips: &[String],
        timeout: Duration,
    ) -> Result<std::net::Ipv4Addr> {
        let dom = self.owned(name)?;
        let start = Instant::now();
        let (mac, ip) = loop {
            let leases: Vec<(String, std::net::Ipv4Addr)> = dom
                .interface_addresses(sys::VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0)
                .map_err(|e| BackendError::from_virt(e, "domain", name))?
                .into_iter()
                .flat_map(|i| {
                    let mac = i.hwaddr.unwrap_or_default();
                    i.addrs
                        .into_iter()
                        .filter(|a| a.typed == sys::VIR_IP_ADDR_TYPE_IPV4 as i64)
                        .filter_map(move |a| Some((mac.clone(), a.addr.parse().ok()?)))
                })
                .collect();
            match leases.as_slice() {
                [one] => break one.clone(),
                [] if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(100)),
                other => {
                    return Err(BackendError::Protocol {
                        what: format!("the DHCP lease of {name}"),
                        message: format!(
                            "expected one IPv4 lease for its interface, found {other:?}"
                        ),
                    })
                }
            }
        };
        let in_use = guest_ips.iter().any(|a| {
            a.split_once('=')
                .map_or(a.as_str(), |(_, a)| a)
                .split('/')
                .next()
                == Some(ip.to_string().as_str())
        });
        if !in_use {
            return Err(BackendError::Protocol {
                what: format!("the DHCP lease of {name}"),
                message: format!(
                    "the guest does not use its leased address {ip}: it has {guest_ips:?}"
                ),
            });
        }
        let pinned = NicSpec {
            mac: Some(mac),
            ip: Some(ip),
            ..nic.clone()
        };
        dom.update_device_flags(
            &pinned.interface_xml(bandwidth),
            sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG,
        )
        .map_err(|e| BackendError::from_virt(e, "domain", name))?;
        Ok(ip)
    }

    /// A guest-agent channel to domain `name`.
    pub fn agent(&self, name: &str) -> Result<DomainAgent> {
        Ok(DomainAgent {
            dom: self.lookup(name)?,
            name: name.to_string(),
        })
    }
}

/// How much longer than its own timeout a guest agent call may take before its caller
/// gives up: libvirt first waits up to 30 s for the domain's agent job and syncs with the
/// agent (up to 5 s).
pub const AGENT_CALL_GRACE: Duration = Duration::from_secs(40);

/// The guest agent of one domain, reached through `virDomainQemuAgentCommand`.
pub struct DomainAgent {
    dom: Domain,
    name: String,
}

impl AgentChannel for DomainAgent {
    fn vm_name(&self) -> &str {
        &self.name
    }

    fn agent_socket(&self) -> Option<std::path::PathBuf> {
        // libvirt picks the path (under its own state directory) when the domain starts;
        // the live XML says where.
        let xml = self.dom.xml_desc(0).ok()?;
        crate::guest_addr::channel_socket(&xml, agentvm_guest::PORT_NAME)
    }

    fn command(&self, command: &Value, timeout: Duration) -> Result<Value> {
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        // libvirt bounds the agent's silence by `secs`, but not the wait for the domain's
        // agent job or for its own reply to reach us: the call runs on a helper thread and
        // its caller gives up after `timeout + AGENT_CALL_GRACE` (the thread is left to
        // finish on its own), so no caller ever blocks for good.
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = {
            let (dom, text, tx) = (self.dom.clone(), command.to_string(), tx.clone());
            std::thread::Builder::new()
                .name("agent-call".into())
                .spawn(move || {
                    let _ = tx.send(dom.qemu_agent_command(&text, secs, 0));
                })
        };
        if spawned.is_err() {
            // No thread to spare: the call is made here, unbounded.
            let _ = tx.send(self.dom.qemu_agent_command(&command.to_string(), secs, 0));
        }
        let bound = timeout + AGENT_CALL_GRACE;
        // A domain that stopped (destroyed by hand, QEMU died) answers no agent call: every
        // failure is checked against the domain's state, so callers stop waiting at once.
        let stopped = || -> Option<BackendError> {
            let gone = match self.dom.is_active() {
                Ok(active) => !active,
                // Destroyed and undefined meanwhile.
                Err(e) => BackendError::from_virt(e, "domain", &self.name).is_not_found(),
            };
            gone.then(|| BackendError::VmNotRunning {
                vm: self.name.clone(),
            })
        };
        let answer = rx.recv_timeout(bound).map_err(|_| {
            if let Some(e) = stopped() {
                return e;
            }
            tracing::warn!(vm = %self.name, after = ?bound, "libvirt did not return from a guest agent call");
            BackendError::GuestAgentUnavailable {
                vm: self.name.clone(),
                message: format!("libvirt gave no answer within {} s", bound.as_secs()),
            }
        })?;
        if answer.is_err() {
            if let Some(e) = stopped() {
                return Err(e);
            }
        }
        let reply = answer.map_err(|e| match BackendError::from_virt(e, "domain", &self.name) {
            BackendError::Libvirt {
                code: ErrorNumberEnum::Known(ErrorNumber::OperationTimeout),
                message,
            } => BackendError::GuestAgentUnavailable {
                vm: self.name.clone(),
                message,
            },
            BackendError::Libvirt {
                code:
                    ErrorNumberEnum::Known(
                        ErrorNumber::OperationInvalid
                        | ErrorNumber::AgentCommandFailed
                        | ErrorNumber::AgentCommandTimeout,
                    ),
                message,
            } => {
                // The agent answered with an error (e.g. file not found): a protocol error.
                BackendError::Protocol {
                    what: command["execute"].as_str().unwrap_or("?").to_string(),
                    message,
                }
            }
            other => other,
        })?;
        let v: Value = serde_json::from_str(&reply).map_err(|e| BackendError::Protocol {
            what: command["execute"].as_str().unwrap_or("?").to_string(),
            message: format!("{e}: {reply}"),
        })?;
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }
}
