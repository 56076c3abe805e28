//! libvirt networks and nwfilters on a [`Libvirt`] connection: define, start, stop, remove and
//! list the ones agentvm owns. Objects without agentvm's ownership mark are reported
//! `NotOwned` and never modified (see [`crate::netxml`] for how ownership is marked).

use virt::error::{ErrorNumber, ErrorNumberEnum};
use virt::network::Network;
use virt::nwfilter::NWFilter;

use crate::error::{BackendError, Result};
use crate::libvirt::Libvirt;
use crate::netxml::{parse_network, parse_nwfilter, NetXmlError, NetworkDef, NwFilterDef};
use crate::xml::Owner;

/// What a define call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefineOutcome {
    /// The object did not exist and was created.
    Created,
    /// It existed with the same owner (kind, name, spec hash, generation): nothing done.
    Unchanged,
    /// It existed, owned by agentvm, with other ownership data and was redefined. A running
    /// network keeps its old configuration until restarted; a filter applies at once.
    Updated,
}

/// A libvirt network as agentvm sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInfo {
    /// libvirt network name.
    pub name: String,
    /// True when the network is running (bridge up, dnsmasq serving).
    pub active: bool,
    /// True when libvirt starts it at daemon start (agentvm never sets this).
    pub autostart: bool,
    /// Host bridge device.
    pub bridge: Option<String>,
    /// agentvm's ownership metadata (including the spec hash); `None` for foreign networks.
    pub owner: Option<Owner>,
}

/// An agentvm-owned nwfilter as found in libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFilter {
    /// libvirt filter name.
    pub name: String,
    /// Its owner (from the ownership record, verified against the UUID).
    pub owner: Owner,
}

fn invalid(e: NetXmlError) -> BackendError {
    BackendError::Libvirt {
        code: ErrorNumberEnum::Known(ErrorNumber::InvalidArg),
        message: e.to_string(),
    }
}

fn net_err(name: &str) -> impl FnOnce(virt::error::Error) -> BackendError + '_ {
    move |e| BackendError::from_virt(e, "network", name)
}

fn filter_err(name: &str) -> impl FnOnce(virt::error::Error) -> BackendError + '_ {
    move |e| BackendError::from_virt(e, "nwfilter", name)
}

fn not_owned(kind: &'static str, name: &str) -> BackendError {
    BackendError::NotOwned {
        kind,
        name: name.to_string(),
    }
}

impl Libvirt {
    fn lookup_network(&self, name: &str) -> Result<Option<Network>> {
        match self.raw().lookup_network_by_name(name) {
            Ok(n) => Ok(Some(n)),
            Err(e) => match BackendError::from_virt(e, "network", name) {
                BackendError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    fn network_info_of(&self, net: &Network, name: &str) -> Result<NetworkInfo> {
        let xml = net.xml_desc(0).map_err(net_err(name))?;
        let parsed = parse_network(&xml).map_err(|e| BackendError::Protocol {
            what: format!("XML of network {name:?}"),
            message: e.to_string(),
        })?;
        Ok(NetworkInfo {
            name: name.to_string(),
            active: net.is_active().map_err(net_err(name))?,
            autostart: net.autostart().map_err(net_err(name))?,
            bridge: parsed.bridge,
            owner: parsed.owner,
        })
    }

    /// The owned network `name`; `Ok(None)` when it does not exist, `NotOwned` when foreign.
    fn owned_network(&self, name: &str) -> Result<Option<(Network, Owner)>> {
        let Some(net) = self.lookup_network(name)? else {
            return Ok(None);
        };
        match self.network_info_of(&net, name)?.owner {
            Some(owner) => Ok(Some((net, owner))),
            None => Err(not_owned("network", name)),
        }
    }

    /// What libvirt reports about network `name` (ours or not). `NotFound` if it does not exist.
    pub fn network_info(&self, name: &str) -> Result<NetworkInfo> {
        let net = self.lookup_network(name)?.ok_or(BackendError::NotFound {
            kind: "network",
            name: name.to_string(),
        })?;
        self.network_info_of(&net, name)
    }

    /// Define (persistently) the network `def`, with autostart off.
    ///
    /// Idempotent: an owned network with the same owner data is left alone (`Unchanged`); one
    /// with other data (e.g. a new spec hash) is redefined in place (`Updated`; restart it to
    /// apply). A network of the same name without agentvm's metadata fails with `NotOwned`.
    pub fn define_network(&self, def: &NetworkDef) -> Result<DefineOutcome> {
        let (outcome, uuid) = match self.owned_network(&def.name)? {
            None => (DefineOutcome::Created, None),
            Some((_, owner)) if owner == def.owner => return Ok(DefineOutcome::Unchanged),
            Some((net, _)) => (
                DefineOutcome::Updated,
                Some(net.uuid_string().map_err(net_err(&def.name))?),
            ),
        };
        let xml = def.to_xml_with_uuid(uuid.as_deref()).map_err(invalid)?;
        let net = self
            .raw()
            .define_network_xml(&xml)
            .map_err(net_err(&def.name))?;
        net.set_autostart(false).map_err(net_err(&def.name))?;
        Ok(outcome)
    }

    /// Start the owned network `name` (bridge, dnsmasq, NAT rules in libvirtd's network
    /// namespace). Succeeds when it is already running.
    pub fn start_network(&self, name: &str) -> Result<()> {
        let (net, _) = self.owned_network(name)?.ok_or(BackendError::NotFound {
            kind: "network",
            name: name.to_string(),
        })?;
        if net.is_active().map_err(net_err(name))? {
            return Ok(());
        }
        net.create().map_err(net_err(name))?;
        Ok(())
    }

    /// Stop the owned network `name`. Succeeds when it is stopped or does not exist.
    pub fn destroy_network(&self, name: &str) -> Result<()> {
        let Some((net, _)) = self.owned_network(name)? else {
            return Ok(());
        };
        if net.is_active().map_err(net_err(name))? {
            if let Err(e) = net.destroy() {
                // It may have stopped between the check and the call.
                if net.is_active().unwrap_or(true) {
                    return Err(BackendError::from_virt(e, "network", name));
                }
            }
        }
        Ok(())
    }

    /// Stop (if running) and undefine the owned network `name`. Succeeds when it does not
    /// exist. libvirt refuses while domains are attached; that error is returned as is.
    pub fn undefine_network(&self, name: &str) -> Result<()> {
        self.destroy_network(name)?;
        let Some((net, _)) = self.owned_network(name)? else {
            return Ok(());
        };
        if net.is_persistent().map_err(net_err(name))? {
            net.undefine().map_err(net_err(name))?;
        }
        Ok(())
    }

    /// Every network carrying agentvm's ownership metadata, sorted by name. Foreign networks
    /// are not listed.
    pub fn list_owned_networks(&self) -> Result<Vec<NetworkInfo>> {
        let nets = self.raw().list_all_networks(0).map_err(net_err("*"))?;
        let mut out = Vec::new();
        for net in nets {
            let Ok(name) = net.name() else { continue };
            // A network may vanish between listing and reading; skip it.
            let Ok(info) = self.network_info_of(&net, &name) else {
                continue;
            };
            if info.owner.is_some() {
                out.push(info);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn lookup_nwfilter(&self, name: &str) -> Result<Option<NWFilter>> {
        match self.raw().lookup_nwfilter_by_name(name) {
            Ok(f) => Ok(Some(f)),
            Err(e) => match BackendError::from_virt(e, "nwfilter", name) {
                BackendError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    fn filter_owner_of(&self, filter: &NWFilter, name: &str) -> Result<Option<Owner>> {
        let xml = filter.xml_desc(0).map_err(filter_err(name))?;
        let parsed = parse_nwfilter(&xml).map_err(|e| BackendError::Protocol {
            what: format!("XML of nwfilter {name:?}"),
            message: e.to_string(),
        })?;
        Ok(parsed.owner())
    }

    /// Ownership of nwfilter `name`: `Some` if agentvm's, `None` if foreign; `NotFound` if it
    /// does not exist.
    pub fn nwfilter_owner(&self, name: &str) -> Result<Option<Owner>> {
        let filter = self.lookup_nwfilter(name)?.ok_or(BackendError::NotFound {
            kind: "nwfilter",
            name: name.to_string(),
        })?;
        self.filter_owner_of(&filter, name)
    }

    /// The libvirt XML of nwfilter `name` as libvirt reports it (for drift checks with
    /// [`crate::netxml::parse_nwfilter`]).
    pub fn nwfilter_xml(&self, name: &str) -> Result<String> {
        let filter = self.lookup_nwfilter(name)?.ok_or(BackendError::NotFound {
            kind: "nwfilter",
            name: name.to_string(),
        })?;
        filter.xml_desc(0).map_err(filter_err(name))
    }

    /// Define the nwfilter `def`. Idempotent like [`Libvirt::define_network`]; redefining an
    /// owned filter applies the new rules to running guests at once (libvirt re-instantiates).
    /// A filter of the same name that is not agentvm's fails with `NotOwned`.
    pub fn define_nwfilter(&self, def: &NwFilterDef) -> Result<DefineOutcome> {
        let xml = def.to_xml().map_err(invalid)?;
        let outcome = match self.lookup_nwfilter(&def.name)? {
            None => DefineOutcome::Created,
            Some(f) => match self.filter_owner_of(&f, &def.name)? {
                None => return Err(not_owned("nwfilter", &def.name)),
                Some(owner) if owner == def.owner => return Ok(DefineOutcome::Unchanged),
                Some(_) => DefineOutcome::Updated,
            },
        };
        self.raw()
            .define_nwfilter_xml(&xml)
            .map_err(filter_err(&def.name))?;
        Ok(outcome)
    }

    /// Undefine the owned nwfilter `name`. Succeeds when it does not exist; `NotOwned` for
    /// foreign filters. libvirt refuses while a running guest uses it.
    pub fn undefine_nwfilter(&self, name: &str) -> Result<()> {
        let Some(filter) = self.lookup_nwfilter(name)? else {
            return Ok(());
        };
        if self.filter_owner_of(&filter, name)?.is_none() {
            return Err(not_owned("nwfilter", name));
        }
        match filter.undefine() {
            Ok(()) => Ok(()),
            Err(e) => match BackendError::from_virt(e, "nwfilter", name) {
                BackendError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Every nwfilter agentvm owns, sorted by name. Built-in and other foreign filters are not
    /// listed.
    pub fn list_owned_nwfilters(&self) -> Result<Vec<OwnedFilter>> {
        let filters = self.raw().list_all_nw_filters(0).map_err(filter_err("*"))?;
        let mut out = Vec::new();
        for f in filters {
            let Ok(name) = f.name() else { continue };
            if let Ok(Some(owner)) = self.filter_owner_of(&f, &name) {
                out.push(OwnedFilter { name, owner });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
