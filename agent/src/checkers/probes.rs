//! The probes themselves: one poll of a process count, a TCP port, a gateway, a link.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use super::Probe;

/// Linux keeps 15 characters of a process name in `comm`; SafeKit compares those.
const COMM_LEN: usize = 15;

/// Polls `probe` once (bounded by `timeout`): up or down, and why.
pub async fn poll(probe: &Probe, timeout: Duration) -> (bool, String) {
    match probe {
        Probe::Process { name, atleast } => {
            let name = name.clone();
            let count = tokio::task::spawn_blocking(move || {
                count_processes(std::path::Path::new("/proc"), &name)
            })
            .await;
            match count {
                Ok(Ok(count)) => (
                    count >= usize::try_from(*atleast).unwrap_or(usize::MAX),
                    format!("{count} process(es), at least {atleast} wanted"),
                ),
                Ok(Err(error)) => (false, format!("cannot read /proc: {error}")),
                Err(error) => (false, format!("probe failed: {error}")),
            }
        }
        Probe::Custom { exec, .. } => (
            false,
            format!("custom checker: {exec} reports with safekit set"),
        ),
        Probe::Tcp { addr } => {
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                Ok(Ok(_stream)) => (true, format!("{addr} accepts connections")),
                Ok(Err(error)) => (false, format!("{addr}: {error}")),
                Err(_) => (false, format!("{addr}: no answer within {timeout:?}")),
            }
        }
        Probe::Ping { addrs } => {
            static SEQUENCE: AtomicU16 = AtomicU16::new(1);
            let mut reasons = Vec::new();
            for addr in addrs {
                let addr = *addr;
                let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
                let answered =
                    tokio::task::spawn_blocking(move || super::ping::ping(addr, timeout, sequence))
                        .await;
                match answered {
                    Ok(Ok(true)) => return (true, format!("{addr} answers")),
                    Ok(Ok(false)) => reasons.push(format!("{addr} does not answer")),
                    Ok(Err(error)) => reasons.push(format!("{addr}: {error}")),
                    Err(error) => reasons.push(format!("{addr}: {error}")),
                }
            }
            (false, reasons.join(", "))
        }
        Probe::Interface { local_addr } => {
            let local_addr = *local_addr;
            match tokio::task::spawn_blocking(move || link_up(local_addr)).await {
                Ok(Ok((ifname, true))) => (true, format!("{ifname} has carrier")),
                Ok(Ok((ifname, false))) => (false, format!("{ifname} has no carrier")),
                Ok(Err(reason)) => (false, reason),
                Err(error) => (false, format!("probe failed: {error}")),
            }
        }
        Probe::Link { ifname, addr } => {
            let (ifname, addr) = (ifname.clone(), *addr);
            match tokio::task::spawn_blocking(move || link_of(ifname.as_deref(), addr)).await {
                Ok(Ok((ifname, true))) => (true, format!("{ifname} has carrier")),
                Ok(Ok((ifname, false))) => (false, format!("{ifname} has no carrier")),
                Ok(Err(reason)) => (false, reason),
                Err(error) => (false, format!("probe failed: {error}")),
            }
        }
        Probe::LocalAddress { addr } => {
            let addr = *addr;
            match tokio::task::spawn_blocking(move || link_up(addr)).await {
                Ok(Ok((ifname, _))) => (true, format!("{addr} is set on {ifname}")),
                Ok(Err(reason)) => (false, reason),
                Err(error) => (false, format!("probe failed: {error}")),
            }
        }
        Probe::Module { addr, module } => {
            let path = format!("/var/modules/{module}/ready.txt");
            match tokio::time::timeout(timeout, http_status(*addr, &path)).await {
                Ok(Ok(200)) => (true, format!("{module} runs on {addr}")),
                Ok(Ok(status)) => (
                    false,
                    format!("{module} does not run on {addr} (HTTP {status})"),
                ),
                Ok(Err(error)) => (false, format!("{addr}: {error}")),
                Err(_) => (false, format!("{addr}: no answer within {timeout:?}")),
            }
        }
    }
}

/// The status code of `GET path` on `addr` (HTTP/1.0, one request per connection).
async fn http_status(addr: std::net::SocketAddr, path: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(buffer.get(..read).unwrap_or_default());
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer"))
}

/// How many live (not zombie) processes under `proc_root` are named `name` (compared on 15 characters, as `comm`).
///
/// # Errors
/// `proc_root` cannot be listed.
pub fn count_processes(proc_root: &std::path::Path, name: &str) -> std::io::Result<usize> {
    let wanted: String = name.chars().take(COMM_LEN).collect();
    let mut count = 0;
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let file_name = entry.file_name();
        let Some(pid) = file_name.to_str() else {
            continue;
        };
        if !pid.bytes().all(|byte| byte.is_ascii_digit()) {
            continue;
        }
        // A process may exit between the listing and this read.
        if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
            && let Some((comm, state)) = parse_stat(&stat)
            && comm == wanted
            // A zombie (or a dying process) no longer runs the application.
            && !matches!(state, 'Z' | 'X' | 'x')
        {
            count += 1;
        }
    }
    Ok(count)
}

/// The name (`comm`) and state letter of a `/proc/<pid>/stat` line: `pid (comm) S ...`.
fn parse_stat(stat: &str) -> Option<(&str, char)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    let state = stat.get(close + 1..)?.trim_start().chars().next()?;
    Some((comm, state))
}

/// The interface holding `local_addr`, and whether it is up with carrier.
fn link_up(local_addr: IpAddr) -> Result<(String, bool), String> {
    use nix::net::if_::InterfaceFlags;
    let addresses =
        nix::ifaddrs::getifaddrs().map_err(|error| format!("cannot list interfaces: {error}"))?;
    for address in addresses {
        let ip = address.address.as_ref().and_then(|storage| {
            storage
                .as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| storage.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        });
        if ip == Some(local_addr) {
            let up = address.flags.contains(InterfaceFlags::IFF_UP)
                && address.flags.contains(InterfaceFlags::IFF_LOWER_UP);
            return Ok((address.interface_name, up));
        }
    }
    Err(format!("no interface holds {local_addr}"))
}

/// The interface named `ifname`, or (no name) the one holding an address of
/// `addr`'s subnet (chosen as the virtual IP chooses it:
/// [`crate::vip::choose_interface`]), and whether it is up with carrier.
fn link_of(ifname: Option<&str>, addr: IpAddr) -> Result<(String, bool), String> {
    use nix::net::if_::InterfaceFlags;
    let entries: Vec<_> = nix::ifaddrs::getifaddrs()
        .map_err(|error| format!("cannot list interfaces: {error}"))?
        .collect();
    let ifname = match ifname {
        Some(ifname) => ifname.to_string(),
        None => {
            let ip = |storage: &nix::sys::socket::SockaddrStorage| {
                storage
                    .as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| storage.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            };
            let addresses: Vec<crate::vip::InterfaceAddress> = entries
                .iter()
                .filter_map(|entry| {
                    let address = ip(entry.address.as_ref()?)?;
                    let prefix_len = match ip(entry.netmask.as_ref()?)? {
                        IpAddr::V4(mask) => u32::from(mask).leading_ones(),
                        IpAddr::V6(mask) => u128::from(mask).leading_ones(),
                    };
                    Some(crate::vip::InterfaceAddress {
                        ifname: entry.interface_name.clone(),
                        // Not used to choose.
                        index: 0,
                        addr: address,
                        prefix_len: u8::try_from(prefix_len).unwrap_or(u8::MAX),
                    })
                })
                .collect();
            crate::vip::choose_interface(&addresses, addr)
                .map_err(|error| error.to_string())?
                .ifname
        }
    };
    // Every interface has an entry (its link-layer one) even without an address.
    let entry = entries
        .iter()
        .find(|entry| entry.interface_name == ifname)
        .ok_or_else(|| format!("no interface named {ifname}"))?;
    let up = entry.flags.contains(InterfaceFlags::IFF_UP)
        && entry.flags.contains(InterfaceFlags::IFF_LOWER_UP);
    Ok((ifname, up))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_are_counted_by_their_15_character_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (pid, stat) in [
            ("10", "10 (myapp) S 1 10 10 0 -1\n"),
            ("11", "11 (myapp) R 1 11 11 0 -1\n"),
            ("12", "12 (averyverylongna) S 1 12 12 0 -1\n"),
            ("13", "13 (other) S 1 13 13 0 -1\n"),
            ("14", "14 (myapp) Z 1 14 14 0 -1\n"),
            ("15", "15 (my) app) S 1 15 15 0 -1\n"),
        ] {
            std::fs::create_dir(dir.path().join(pid)).expect("pid dir");
            std::fs::write(dir.path().join(pid).join("stat"), stat).expect("stat");
        }
        std::fs::create_dir(dir.path().join("self")).expect("non-pid dir");
        assert_eq!(count_processes(dir.path(), "myapp").expect("count"), 2);
        assert_eq!(
            count_processes(dir.path(), "averyverylongname_truncated").expect("count"),
            1
        );
        assert_eq!(count_processes(dir.path(), "absent").expect("count"), 0);
        assert_eq!(count_processes(dir.path(), "my) app").expect("count"), 1);
    }

    #[tokio::test]
    async fn a_closed_port_is_down_and_an_open_one_up() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (up, detail) = poll(&Probe::Tcp { addr }, Duration::from_secs(2)).await;
        assert!(up, "{detail}");
        drop(listener);
        let (up, detail) = poll(&Probe::Tcp { addr }, Duration::from_secs(2)).await;
        assert!(!up, "{detail}");
    }

    #[tokio::test]
    async fn a_module_is_up_when_its_ready_txt_answers_200() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "404 Not Found"] {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 512];
                let read = stream.read(&mut request).await.expect("read");
                let request = String::from_utf8_lossy(&request[..read]).to_string();
                assert!(
                    request.starts_with("GET /var/modules/other/ready.txt "),
                    "{request}"
                );
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(answer.as_bytes()).await.expect("write");
            }
        });
        let probe = Probe::Module {
            addr,
            module: "other".into(),
        };
        let (up, detail) = poll(&probe, Duration::from_secs(2)).await;
        assert!(up, "{detail}");
        let (up, detail) = poll(&probe, Duration::from_secs(2)).await;
        assert!(!up, "{detail}");
        assert!(detail.contains("HTTP 404"), "{detail}");
    }

    #[tokio::test]
    async fn a_local_address_is_found_and_a_foreign_one_is_not() {
        let local = Probe::LocalAddress {
            addr: IpAddr::from([127, 0, 0, 1]),
        };
        let (up, detail) = poll(&local, Duration::from_secs(1)).await;
        assert!(up, "{detail}");
        let foreign = Probe::LocalAddress {
            addr: IpAddr::from([192, 0, 2, 77]),
        };
        let (up, detail) = poll(&foreign, Duration::from_secs(1)).await;
        assert!(!up, "{detail}");
    }

    #[tokio::test]
    async fn loopback_link_is_up() {
        let (up, detail) = poll(
            &Probe::Interface {
                local_addr: IpAddr::from([127, 0, 0, 1]),
            },
            Duration::from_secs(1),
        )
        .await;
        assert!(up, "{detail}");
    }

    #[tokio::test]
    async fn a_link_is_found_by_name_or_by_the_subnet_of_a_virtual_ip() {
        let by_subnet = Probe::Link {
            ifname: None,
            addr: IpAddr::from([127, 0, 0, 200]),
        };
        let (up, detail) = poll(&by_subnet, Duration::from_secs(1)).await;
        assert!(up, "{detail}");
        assert_eq!(detail, "lo has carrier");
        let by_name = Probe::Link {
            ifname: Some("lo".into()),
            addr: IpAddr::from([198, 51, 100, 77]),
        };
        let (up, detail) = poll(&by_name, Duration::from_secs(1)).await;
        assert!(up, "{detail}");
        let nowhere = Probe::Link {
            ifname: None,
            addr: IpAddr::from([198, 51, 100, 77]),
        };
        let (up, detail) = poll(&nowhere, Duration::from_secs(1)).await;
        assert!(!up, "{detail}");
        assert!(detail.contains("198.51.100.77"), "{detail}");
        let unknown = Probe::Link {
            ifname: Some("nosuchif0".into()),
            addr: IpAddr::from([127, 0, 0, 200]),
        };
        let (up, detail) = poll(&unknown, Duration::from_secs(1)).await;
        assert!(!up, "{detail}");
        assert_eq!(detail, "no interface named nosuchif0");
    }
}
