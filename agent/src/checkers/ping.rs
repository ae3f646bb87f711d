//! ICMP echo without shelling out: an unprivileged ping socket, or a raw socket as root.
//!
//! `socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)` works when the caller's group
//! is in `net.ipv4.ping_group_range`; otherwise (the default range is empty)
//! the agent, running as root, uses `SOCK_RAW`, whose replies carry the IP
//! header. The socket is wrapped in a std `UdpSocket` only for its safe
//! `send_to`/`recv_from` with timeouts (the port numbers are ignored).
//! Blocking: call it from `spawn_blocking`.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};

/// Sends one echo request to `addr` and waits up to `timeout` for its reply.
///
/// # Errors
/// The socket could not be created or used; a missing reply is `Ok(false)`.
pub fn ping(addr: IpAddr, timeout: Duration, sequence: u16) -> io::Result<bool> {
    let IpAddr::V4(v4) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "IPv6 witnesses and gateways are not supported yet",
        ));
    };
    let (socket, raw) = open()?;
    let identifier = u16::try_from(std::process::id() & 0xffff).unwrap_or(0);
    let packet = echo_request(identifier, sequence);
    socket.send_to(&packet, SocketAddr::new(IpAddr::V4(v4), 0))?;
    let deadline = Instant::now() + timeout;
    let mut buffer = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        socket.set_read_timeout(Some(left))?;
        let (length, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(error) => return Err(error),
        };
        if from.ip() != IpAddr::V4(v4) {
            continue;
        }
        let mut icmp = buffer.get(..length).unwrap_or_default();
        if raw {
            let header = usize::from(icmp.first().map_or(0, |byte| byte & 0x0f)) * 4;
            icmp = icmp.get(header..).unwrap_or_default();
        }
        // Echo reply (type 0) with our sequence (a ping socket rewrites the identifier).
        if icmp.len() >= 8 && icmp[0] == 0 && icmp[6..8] == sequence.to_be_bytes() {
            return Ok(true);
        }
    }
}

fn open() -> io::Result<(UdpSocket, bool)> {
    let datagram = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Icmp,
    );
    let (fd, raw): (OwnedFd, bool) = match datagram {
        Ok(fd) => (fd, false),
        Err(_) => (
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
            .map_err(io::Error::from)?,
            true,
        ),
    };
    Ok((UdpSocket::from(fd), raw))
}

fn echo_request(identifier: u16, sequence: u16) -> Vec<u8> {
    let mut packet = vec![8, 0, 0, 0];
    packet.extend_from_slice(&identifier.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(b"safekit-checker!");
    let sum = checksum(&packet);
    packet[2..4].copy_from_slice(&sum.to_be_bytes());
    packet
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| {
            u32::from(u16::from_be_bytes([
                pair[0],
                pair.get(1).copied().unwrap_or(0),
            ]))
        })
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn echo_request_checksum_verifies() {
        let packet = echo_request(0x1234, 7);
        assert_eq!(
            checksum(&packet),
            0,
            "a packet with its checksum sums to zero"
        );
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0, 7]);
    }

    #[test]
    fn loopback_answers() {
        // Root (tests run as root): the raw fallback works even with an empty ping_group_range.
        assert!(
            ping(IpAddr::V4(Ipv4Addr::LOCALHOST), Duration::from_secs(2), 1).expect("ping socket")
        );
    }
}
