//! The module's virtual IP: adding and removing an address on an interface.
//!
//! Clients reach the application through a virtual IP that lives on the
//! primary node only. The agent adds it when the node becomes PRIM or ALONE,
//! removes it on stop and on failover, and, with `check="on"`, verifies that it
//! is still there. This module does those three operations through rtnetlink
//! (no `ip` command), plus choosing the interface when the configuration names
//! none: the interface whose subnet contains the virtual IP.
//!
//! Adding and removing are idempotent: the agent repeats them after a crash or
//! a restart without first knowing what the previous run left behind. IPv6
//! addresses are added with `nodad` so they are usable at once.
//!
//! The netlink socket belongs to the network namespace of the thread that
//! calls [`Netlink::connect`]; every later call acts in that namespace.

use std::net::IpAddr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::LinkAttribute;

/// `EEXIST`: the address is already on the interface.
const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
/// `EADDRNOTAVAIL`: the address to delete is not on the interface.
const EADDRNOTAVAIL: i32 = nix::errno::Errno::EADDRNOTAVAIL as i32;
/// `ENODEV`: no interface with that name or index.
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;

/// Why a virtual IP operation failed. Every message names the interface
/// and/or the address concerned.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    /// No interface has this name.
    #[error("interface {ifname} not found")]
    InterfaceNotFound {
        /// The interface name looked up.
        ifname: String,
    },
    /// A netlink request failed.
    #[error("{operation} {addr} on {ifname}: {source}")]
    Netlink {
        /// What was being done ("add", "remove", "look up").
        operation: &'static str,
        /// The interface concerned (or "*" for a dump of every interface).
        ifname: String,
        /// The address concerned.
        addr: String,
        /// The netlink error.
        #[source]
        source: Box<rtnetlink::Error>,
    },
    /// The prefix length is too long for the address family.
    #[error("invalid prefix length /{prefix_len} for {addr}")]
    InvalidPrefix {
        /// The address.
        addr: IpAddr,
        /// The rejected prefix length.
        prefix_len: u8,
    },
    /// No interface's subnet contains the virtual IP.
    #[error("no interface has a subnet containing {addr}: name the interface in the configuration")]
    NoInterfaceForAddress {
        /// The virtual IP.
        addr: IpAddr,
    },
    /// Several interfaces' subnets contain the virtual IP.
    #[error("{addr} is in the subnet of several interfaces ({}): name the interface in the configuration", interfaces.join(", "))]
    AmbiguousInterface {
        /// The virtual IP.
        addr: IpAddr,
        /// The candidate interface names.
        interfaces: Vec<String>,
    },
}

/// One address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// Interface name.
    pub ifname: String,
    /// Interface index.
    pub index: u32,
    /// The address.
    pub addr: IpAddr,
    /// Its prefix length.
    pub prefix_len: u8,
}

/// The interface chosen for a virtual IP by [`Netlink::find_interface_for`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceChoice {
    /// Interface name.
    pub ifname: String,
    /// The prefix length of the subnet that contains the virtual IP, to use
    /// when adding it (as SafeKit uses the interface's netmask).
    pub prefix_len: u8,
}

/// Whether `addr` lies in the subnet `network/prefix_len` (families must match).
pub fn subnet_contains(network: IpAddr, prefix_len: u8, addr: IpAddr) -> bool {
    match (network, addr) {
        (IpAddr::V4(network), IpAddr::V4(addr)) if prefix_len <= 32 => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            u32::from(network) & mask == u32::from(addr) & mask
        }
        (IpAddr::V6(network), IpAddr::V6(addr)) if prefix_len <= 128 => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            u128::from(network) & mask == u128::from(addr) & mask
        }
        _ => false,
    }
}

/// The address carried by an address message (`IFA_LOCAL` for IPv4, which is
/// the interface's own address on point-to-point links too; `IFA_ADDRESS`
/// otherwise).
fn message_address(message: &AddressMessage) -> Option<IpAddr> {
    let local = message
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            AddressAttribute::Local(addr) => Some(*addr),
            _ => None,
        });
    local.or_else(|| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Address(addr) => Some(*addr),
                _ => None,
            })
    })
}

fn netlink_errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

/// A netlink connection for address management.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's network namespace
    /// and spawns its driver task on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    ///
    /// # Errors
    /// [`VipError::Connect`] if the socket cannot be opened.
    pub fn connect() -> Result<Netlink, VipError> {
        let (connection, handle, _messages) =
            rtnetlink::new_connection().map_err(VipError::Connect)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The index of interface `ifname`.
    ///
    /// # Errors
    /// [`VipError::InterfaceNotFound`], or [`VipError::Netlink`].
    pub async fn interface_index(&self, ifname: &str) -> Result<u32, VipError> {
        let result = self
            .handle
            .link()
            .get()
            .match_name(ifname)
            .execute()
            .try_next()
            .await;
        match result {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(VipError::InterfaceNotFound {
                ifname: ifname.to_string(),
            }),
            Err(error) if netlink_errno(&error) == Some(ENODEV) => {
                Err(VipError::InterfaceNotFound {
                    ifname: ifname.to_string(),
                })
            }
            Err(source) => Err(VipError::Netlink {
                operation: "look up interface for",
                ifname: ifname.to_string(),
                addr: "-".to_string(),
                source: Box::new(source),
            }),
        }
    }

    /// Adds `addr/prefix_len` on `ifname`. Returns `true` if it was added,
    /// `false` if it was already there (not an error).
    ///
    /// # Errors
    /// [`VipError`] naming the interface and the address.
    pub async fn add_address(
        &self,
        ifname: &str,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<bool, VipError> {
        let max_prefix = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max_prefix {
            return Err(VipError::InvalidPrefix { addr, prefix_len });
        }
        let index = self.interface_index(ifname).await?;
        let mut request = self.handle.address().add(index, addr, prefix_len);
        if addr.is_ipv6() {
            request.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        }
        match request.execute().await {
            Ok(()) => {
                tracing::info!(%addr, prefix_len, ifname, "virtual IP added");
                Ok(true)
            }
            Err(error) if netlink_errno(&error) == Some(EEXIST) => {
                tracing::debug!(%addr, ifname, "virtual IP already present");
                Ok(false)
            }
            Err(source) => Err(VipError::Netlink {
                operation: "add",
                ifname: ifname.to_string(),
                addr: format!("{addr}/{prefix_len}"),
                source: Box::new(source),
            }),
        }
    }

    async fn addresses_on(
        &self,
        ifname: &str,
        index: u32,
        addr: IpAddr,
    ) -> Result<Vec<AddressMessage>, VipError> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(addr)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map(|messages| {
                messages
                    .into_iter()
                    .filter(|message| message_address(message) == Some(addr))
                    .collect()
            })
            .map_err(|source| VipError::Netlink {
                operation: "list addresses for",
                ifname: ifname.to_string(),
                addr: addr.to_string(),
                source: Box::new(source),
            })
    }

    /// Removes `addr` (whatever its prefix length) from `ifname`. Returns
    /// `true` if it was removed, `false` if it was not there (not an error).
    ///
    /// # Errors
    /// [`VipError`] naming the interface and the address.
    pub async fn remove_address(&self, ifname: &str, addr: IpAddr) -> Result<bool, VipError> {
        let index = self.interface_index(ifname).await?;
        let mut removed = false;
        for message in self.addresses_on(ifname, index, addr).await? {
            match self.handle.address().del(message).execute().await {
                Ok(()) => removed = true,
                Err(error) if netlink_errno(&error) == Some(EADDRNOTAVAIL) => {}
                Err(source) => {
                    return Err(VipError::Netlink {
                        operation: "remove",
                        ifname: ifname.to_string(),
                        addr: addr.to_string(),
                        source: Box::new(source),
                    });
                }
            }
        }
        if removed {
            tracing::info!(%addr, ifname, "virtual IP removed");
        } else {
            tracing::debug!(%addr, ifname, "virtual IP already absent");
        }
        Ok(removed)
    }

    /// Whether `addr` is configured on `ifname` (for `check="on"`).
    ///
    /// # Errors
    /// [`VipError`] naming the interface and the address (a missing interface
    /// is [`VipError::InterfaceNotFound`], not `false`).
    pub async fn has_address(&self, ifname: &str, addr: IpAddr) -> Result<bool, VipError> {
        let index = self.interface_index(ifname).await?;
        Ok(!self.addresses_on(ifname, index, addr).await?.is_empty())
    }

    /// Every address on every interface.
    ///
    /// # Errors
    /// [`VipError::Netlink`].
    pub async fn list_addresses(&self) -> Result<Vec<InterfaceAddress>, VipError> {
        let dump_error = |operation: &'static str| {
            move |source| VipError::Netlink {
                operation,
                ifname: "*".to_string(),
                addr: "*".to_string(),
                source: Box::new(source),
            }
        };
        let links: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_error("list interfaces for"))?;
        let name_of = |index: u32| {
            links
                .iter()
                .find(|link| link.header.index == index)
                .and_then(|link| {
                    link.attributes
                        .iter()
                        .find_map(|attribute| match attribute {
                            LinkAttribute::IfName(name) => Some(name.clone()),
                            _ => None,
                        })
                })
                .unwrap_or_else(|| format!("if{index}"))
        };
        let messages: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_error("list addresses for"))?;
        Ok(messages
            .iter()
            .filter(|message| {
                matches!(
                    message.header.family,
                    AddressFamily::Inet | AddressFamily::Inet6
                )
            })
            .filter_map(|message| {
                Some(InterfaceAddress {
                    ifname: name_of(message.header.index),
                    index: message.header.index,
                    addr: message_address(message)?,
                    prefix_len: message.header.prefix_len,
                })
            })
            .collect())
    }

    /// Chooses the interface for virtual IP `addr` when the configuration
    /// names none: the one interface with an address whose subnet contains
    /// `addr` (host routes /32 and /128 never match another address).
    ///
    /// # Errors
    /// [`VipError::NoInterfaceForAddress`], [`VipError::AmbiguousInterface`],
    /// or [`VipError::Netlink`].
    pub async fn find_interface_for(&self, addr: IpAddr) -> Result<InterfaceChoice, VipError> {
        let addresses = self.list_addresses().await?;
        choose_interface(&addresses, addr)
    }
}

/// The pure part of [`Netlink::find_interface_for`].
///
/// An address equal to `addr` itself (the virtual IP already in place) is
/// ignored unless nothing else matches, so the choice does not change once the
/// virtual IP is up.
///
/// # Errors
/// [`VipError::NoInterfaceForAddress`] or [`VipError::AmbiguousInterface`].
pub fn choose_interface(
    addresses: &[InterfaceAddress],
    addr: IpAddr,
) -> Result<InterfaceChoice, VipError> {
    let matching = |include_self: bool| {
        let mut choices: Vec<InterfaceChoice> = Vec::new();
        for address in addresses {
            if (address.addr == addr && !include_self)
                || !subnet_contains(address.addr, address.prefix_len, addr)
            {
                continue;
            }
            if !choices.iter().any(|choice| choice.ifname == address.ifname) {
                choices.push(InterfaceChoice {
                    ifname: address.ifname.clone(),
                    prefix_len: address.prefix_len,
                });
            }
        }
        choices
    };
    let mut choices = matching(false);
    if choices.is_empty() {
        choices = matching(true);
    }
    match choices.len() {
        0 => Err(VipError::NoInterfaceForAddress { addr }),
        1 => Ok(choices.remove(0)),
        _ => Err(VipError::AmbiguousInterface {
            addr,
            interfaces: choices.into_iter().map(|choice| choice.ifname).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn subnet_membership() {
        assert!(subnet_contains(ip("10.0.0.1"), 24, ip("10.0.0.200")));
        assert!(!subnet_contains(ip("10.0.0.1"), 24, ip("10.0.1.1")));
        assert!(subnet_contains(ip("10.0.0.1"), 0, ip("192.168.1.1")));
        assert!(!subnet_contains(ip("10.0.0.1"), 32, ip("10.0.0.2")));
        assert!(subnet_contains(ip("fd00::1"), 64, ip("fd00::abcd")));
        assert!(!subnet_contains(ip("fd00::1"), 64, ip("fd00:0:0:1::1")));
        assert!(!subnet_contains(ip("10.0.0.1"), 8, ip("fd00::1")));
    }

    fn address(ifname: &str, addr: &str, prefix_len: u8) -> InterfaceAddress {
        InterfaceAddress {
            ifname: ifname.to_string(),
            index: 1,
            addr: ip(addr),
            prefix_len,
        }
    }

    #[test]
    fn the_interface_whose_subnet_contains_the_vip_is_chosen() {
        let addresses = [
            address("lo", "127.0.0.1", 8),
            address("eth0", "10.0.0.1", 24),
            address("eth1", "192.168.5.1", 24),
        ];
        let choice = choose_interface(&addresses, ip("192.168.5.100")).unwrap();
        assert_eq!(choice.ifname, "eth1");
        assert_eq!(choice.prefix_len, 24);
        let error = choose_interface(&addresses, ip("172.16.0.1")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no interface has a subnet containing 172.16.0.1: name the interface in the configuration"
        );
    }

    #[test]
    fn the_vip_itself_does_not_make_the_choice_ambiguous() {
        let addresses = [
            address("eth0", "10.0.0.1", 24),
            address("eth1", "10.0.0.100", 32),
        ];
        let choice = choose_interface(&addresses, ip("10.0.0.100")).unwrap();
        assert_eq!(choice.ifname, "eth0");
        let two_subnets = [
            address("eth0", "10.0.0.1", 24),
            address("eth1", "10.0.0.2", 16),
        ];
        let error = choose_interface(&two_subnets, ip("10.0.0.100")).unwrap_err();
        assert!(error.to_string().contains("eth0, eth1"), "{error}");
    }
}
