//! Gratuitous ARP: telling the LAN that the virtual IP has moved.
//!
//! When the virtual IP is added on a new primary, clients and routers still
//! map it to the old primary's MAC address until their ARP entry expires,
//! which can take minutes. Broadcasting a gratuitous ARP (an ARP packet whose
//! sender and target protocol address are both the virtual IP, with the new
//! node's MAC as sender hardware address) makes them update at once. Both forms
//! are sent because equipment differs in which one it honours: the request
//! form (RFC 5227 "ARP announcement") and the reply form (`arping -A`).
//! SafeKit's `arpreroute` repeats them (every `arpinterval` for `arpelapse`);
//! [`announce`] does one series.
//!
//! Frames are sent through an `AF_PACKET` raw socket bound to the interface.
//! The binding address (interface index and MAC) comes from `getifaddrs`, so no
//! unsafe code is needed. The socket is opened with protocol 0, so it never
//! receives traffic.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike, bind, send, socket,
};

/// Length of a gratuitous ARP frame, padded to Ethernet's minimum frame size
/// (without the frame check sequence).
pub const FRAME_LEN: usize = 60;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// Which ARP operation a gratuitous ARP frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpForm {
    /// ARP request (operation 1), target hardware address zero.
    Request,
    /// ARP reply (operation 2), target hardware address = sender's.
    Reply,
}

/// Why gratuitous ARP could not be sent. Messages name the interface.
#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    /// No interface has this name, or it has no link-layer address entry.
    #[error("interface {ifname} not found")]
    InterfaceNotFound {
        /// The interface name.
        ifname: String,
    },
    /// The interface has no 6-byte (Ethernet) hardware address.
    #[error("interface {ifname} has no Ethernet address: cannot send ARP")]
    NotEthernet {
        /// The interface name.
        ifname: String,
    },
    /// A socket operation failed.
    #[error("{operation} on {ifname} for {addr}: {source}")]
    Socket {
        /// What was being done.
        operation: &'static str,
        /// The interface name.
        ifname: String,
        /// The announced address.
        addr: Ipv4Addr,
        /// The errno.
        #[source]
        source: Errno,
    },
}

/// Builds a broadcast gratuitous ARP frame announcing that `addr` is at `mac`.
pub fn gratuitous_arp_frame(mac: [u8; 6], addr: Ipv4Addr, form: ArpForm) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    // Ethernet header: broadcast destination, our source, EtherType ARP.
    frame[0..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    // ARP: hardware Ethernet (1), protocol IPv4, lengths 6 and 4.
    frame[14..16].copy_from_slice(&1u16.to_be_bytes());
    frame[16..18].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[18] = 6;
    frame[19] = 4;
    let operation: u16 = match form {
        ArpForm::Request => 1,
        ArpForm::Reply => 2,
    };
    frame[20..22].copy_from_slice(&operation.to_be_bytes());
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&addr.octets());
    let target_mac = match form {
        ArpForm::Request => [0; 6],
        ArpForm::Reply => mac,
    };
    frame[32..38].copy_from_slice(&target_mac);
    frame[38..42].copy_from_slice(&addr.octets());
    // Bytes 42..60 stay zero: padding to the minimum frame size.
    frame
}

/// The link-layer address (index and MAC) of `ifname`, from `getifaddrs`.
///
/// # Errors
/// [`ArpError::InterfaceNotFound`] or [`ArpError::NotEthernet`].
pub fn link_address(ifname: &str) -> Result<LinkAddr, ArpError> {
    let not_found = || ArpError::InterfaceNotFound {
        ifname: ifname.to_string(),
    };
    let interfaces = nix::ifaddrs::getifaddrs().map_err(|_| not_found())?;
    let link = interfaces
        .filter(|interface| interface.interface_name == ifname)
        .find_map(|interface| {
            interface
                .address
                .and_then(|address| address.as_link_addr().copied())
        })
        .ok_or_else(not_found)?;
    if link.halen() != 6 || link.addr().is_none() {
        return Err(ArpError::NotEthernet {
            ifname: ifname.to_string(),
        });
    }
    Ok(link)
}

/// Broadcasts `count` rounds of gratuitous ARP for `addr` on `ifname` (each
/// round: one request, then one reply), waiting `interval` between rounds.
///
/// # Errors
/// [`ArpError`] naming the interface; a failure stops the series.
///
/// # Cancel safety
/// Cancel safe: dropping the future stops the series between frames.
pub async fn announce(
    ifname: &str,
    addr: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<(), ArpError> {
    let socket_error = |operation: &'static str| {
        move |source| ArpError::Socket {
            operation,
            ifname: ifname.to_string(),
            addr,
            source,
        }
    };
    let link = link_address(ifname)?;
    let mac = link.addr().ok_or_else(|| ArpError::NotEthernet {
        ifname: ifname.to_string(),
    })?;
    let packet_socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(socket_error("open packet socket"))?;
    bind(packet_socket.as_raw_fd(), &link as &dyn SockaddrLike)
        .map_err(socket_error("bind packet socket"))?;
    let frames = [
        gratuitous_arp_frame(mac, addr, ArpForm::Request),
        gratuitous_arp_frame(mac, addr, ArpForm::Reply),
    ];
    for round in 0..count {
        if round > 0 {
            tokio::time::sleep(interval).await;
        }
        for frame in &frames {
            send(packet_socket.as_raw_fd(), frame, MsgFlags::empty())
                .map_err(socket_error("send gratuitous ARP"))?;
        }
    }
    tracing::debug!(%addr, ifname, count, "gratuitous ARP sent");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_frame_bytes() {
        let mac = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
        let frame = gratuitous_arp_frame(mac, Ipv4Addr::new(10, 0, 0, 100), ArpForm::Request);
        let expected_head: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // destination: broadcast
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // source MAC
            0x08, 0x06, // EtherType ARP
            0x00, 0x01, // hardware type Ethernet
            0x08, 0x00, // protocol type IPv4
            6, 4, // address lengths
            0x00, 0x01, // operation: request
            0x02, 0x00, 0x00, 0x00, 0x00, 0x01, // sender MAC
            10, 0, 0, 100, // sender IP = VIP
            0, 0, 0, 0, 0, 0, // target MAC: zero in an announcement
            10, 0, 0, 100, // target IP = VIP
        ];
        assert_eq!(frame[..42], expected_head);
        assert_eq!(frame[42..], [0u8; 18]);
    }

    #[test]
    fn reply_frame_has_operation_2_and_our_mac_as_target() {
        let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let frame = gratuitous_arp_frame(mac, Ipv4Addr::new(192, 168, 1, 7), ArpForm::Reply);
        assert_eq!(frame[20..22], [0x00, 0x02]);
        assert_eq!(frame[32..38], mac);
        assert_eq!(frame[38..42], [192, 168, 1, 7]);
    }
}
