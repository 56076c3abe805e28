//! Which guest address is behind which agentvm nwfilter: read from a domain's definition
//! (the `IP` parameter agentvm pins on the `<filterref>` once the guest has its lease), so the
//! egress proxy can tell which VM (and so which filter) a connection comes from. The address
//! is trustworthy because the filter's anti-spoofing rules let the guest send from no other.

use std::net::Ipv4Addr;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::netxml::IP_VARIABLE;

/// An owned VM's filtered interface with a pinned address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAddress {
    /// Domain name.
    pub vm: String,
    /// Kind and name of the domain's owner (`VmPool`, pool name).
    pub owner: crate::Owner,
    /// libvirt name of the interface's nwfilter (`agentvm-<NetworkFilter name>`).
    pub filter: String,
    /// The guest's pinned IPv4 address.
    pub ip: Ipv4Addr,
}

/// The `(filter, pinned IP)` of every `<interface>` of domain XML `xml` whose `<filterref>`
/// carries an `IP` parameter that parses as IPv4. Interfaces without a filter or without a
/// pinned address are left out.
pub fn filtered_addresses(xml: &str) -> Vec<(String, Ipv4Addr)> {
    let mut reader = Reader::from_str(xml);
    let mut out = Vec::new();
    let mut depth_in_interface = 0usize;
    let mut filter: Option<String> = None;
    let mut in_filterref = false;
    loop {
        let (e, empty) = match reader.read_event() {
            Ok(Event::Start(e)) => (e, false),
            Ok(Event::Empty(e)) => (e, true),
            Ok(Event::End(e)) => {
                match e.name().as_ref() {
                    b"interface" => {
                        depth_in_interface = depth_in_interface.saturating_sub(1);
                        filter = None;
                    }
                    b"filterref" => in_filterref = false,
                    _ => {}
                }
                continue;
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => continue,
        };
        let attr = |key: &[u8]| attr_of(&e, key);
        match e.name().as_ref() {
            b"interface" if !empty => depth_in_interface += 1,
            b"filterref" if depth_in_interface > 0 => {
                filter = attr(b"filter");
                in_filterref = !empty;
            }
            b"parameter" if in_filterref && attr(b"name").as_deref() == Some(IP_VARIABLE) => {
                if let (Some(f), Some(ip)) = (&filter, attr(b"value").and_then(|v| v.parse().ok()))
                {
                    out.push((f.clone(), ip));
                }
            }
            _ => {}
        }
    }
    out
}

/// The unescaped value of attribute `key` of element `e`.
fn attr_of(e: &quick_xml::events::BytesStart<'_>, key: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == key)
        .and_then(|a| a.unescape_value().ok().map(|v| v.into_owned()))
}

/// The host path of the Unix socket behind the virtio channel named `target` in domain XML
/// `xml` (`<channel type='unix'><source path=.../><target type='virtio' name=target/>`).
pub fn channel_socket(xml: &str, target: &str) -> Option<std::path::PathBuf> {
    let mut reader = Reader::from_str(xml);
    let mut in_channel = false;
    let (mut path, mut name) = (None::<String>, None::<String>);
    loop {
        let e = match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => e,
            Ok(Event::End(e)) if e.name().as_ref() == b"channel" => {
                if in_channel && name.as_deref() == Some(target) {
                    return path.map(Into::into);
                }
                in_channel = false;
                (path, name) = (None, None);
                continue;
            }
            Ok(Event::Eof) | Err(_) => return None,
            Ok(_) => continue,
        };
        let attr = |key: &[u8]| attr_of(&e, key);
        match e.name().as_ref() {
            b"channel" => in_channel = attr(b"type").as_deref() == Some("unix"),
            b"source" if in_channel => path = attr(b"path"),
            b"target" if in_channel => name = attr(b"name"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_addresses_of_filtered_interfaces_only() {
        let xml = r#"<domain><devices>
          <interface type='network'><source network='agentvm-a'/>
            <filterref filter='agentvm-web'>
              <parameter name='AGENTVM_HOST' value='10.0.0.1'/>
              <parameter name='IP' value='10.0.0.23'/>
            </filterref></interface>
          <interface type='network'><source network='agentvm-b'/>
            <filterref filter='agentvm-unpinned'>
              <parameter name='AGENTVM_HOST' value='10.0.1.1'/>
            </filterref></interface>
          <interface type='network'><source network='agentvm-c'/></interface>
          <filterref filter='outside'><parameter name='IP' value='1.2.3.4'/></filterref>
          <interface type='network'><filterref filter='agentvm-bad'>
            <parameter name='IP' value='not-an-ip'/></filterref></interface>
        </devices></domain>"#;
        assert_eq!(
            filtered_addresses(xml),
            vec![("agentvm-web".to_string(), "10.0.0.23".parse().unwrap())]
        );
    }

    #[test]
    fn channel_socket_is_read_from_live_xml() {
        let xml = r#"<domain><devices>
          <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
          <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-vm/org.agentvm.agent.0'/><target type='virtio' name='org.agentvm.agent.0'/></channel>
          <channel type='pty'><target type='virtio' name='other'/></channel>
        </devices></domain>"#;
        assert_eq!(
            channel_socket(xml, "org.agentvm.agent.0").unwrap(),
            std::path::PathBuf::from(
                "/var/lib/libvirt/qemu/channel/target/domain-3-vm/org.agentvm.agent.0"
            )
        );
        assert!(channel_socket(xml, "other").is_none());
        assert!(channel_socket(xml, "missing").is_none());
        // An inactive definition has no path yet.
        let inactive = "<domain><devices><channel type='unix'><target type='virtio' name='org.agentvm.agent.0'/></channel></devices></domain>";
        assert!(channel_socket(inactive, "org.agentvm.agent.0").is_none());
    }
}
