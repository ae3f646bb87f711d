//! Heartbeat I/O of one module: a sender thread and one receiver thread per LAN.
//!
//! These are OS threads, not tokio tasks, so that a busy runtime (disk-heavy
//! scripts, a resynchronization, netlink calls) never delays a pulse or the
//! reading of one. They decide nothing: the sender sends whatever status the
//! module's runner last published, the receivers authenticate what arrives
//! and forward it to the runner as an event; peer loss is the state machine's
//! verdict, computed from those events and its clock.
//!
//! - Sender: every `pulse`, one datagram per LAN to the peer's address and the
//!   module's heartbeat port, carrying `(boot, seq)` (one `seq` per round,
//!   shared by the LANs, as the replay rule of
//!   `safekit_protocol::heartbeat` requires). It sends in every state, STOP
//!   included. A late round is not caught up: the schedule skips ahead.
//! - Receiver: bound to this node's own address on the LAN (nothing listens
//!   wider than configured). A datagram must carry a valid HMAC under the
//!   cluster secret, name this module, come from the peer node and name the
//!   LAN it arrived on, and be newer than anything accepted before from that
//!   sender on that LAN. Anything else is dropped, with a warning that is rate
//!   limited (one per [`WARN_INTERVAL`], with the count of drops since) in the
//!   agent's log and the module log.

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safekit_protocol::heartbeat::{self, Heartbeat, NodeStatus, ReplayGuard};

use super::load::LanEndpoints;
use crate::modlog::{self, ModLog};

/// Refused heartbeats are reported at most once per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The status the sender thread sends, replaced by the runner after each event.
pub type SharedStatus = Arc<Mutex<NodeStatus>>;

/// What the sender needs.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The module.
    pub module: String,
    /// This node's name.
    pub node: String,
    /// This agent's boot number.
    pub boot: u64,
    /// The period.
    pub pulse: Duration,
    /// The LANs.
    pub lans: Vec<LanEndpoints>,
}

/// Starts the sender thread; it runs for the life of the process.
///
/// # Errors
/// The thread could not be created.
pub fn spawn_sender(
    config: SenderConfig,
    secret: Arc<[u8]>,
    status: SharedStatus,
) -> std::io::Result<()> {
    let span = tracing::info_span!("heartbeat-send", module = %config.module);
    std::thread::Builder::new()
        .name(format!("hb-send-{}", config.module))
        .spawn(move || {
            let _entered = span.enter();
            send_loop(&config, &secret, &status);
        })?;
    Ok(())
}

fn send_loop(config: &SenderConfig, secret: &[u8], status: &SharedStatus) {
    let mut sockets: Vec<(LanEndpoints, Option<UdpSocket>)> =
        config.lans.iter().map(|lan| (lan.clone(), None)).collect();
    let mut warn = RateLimit::default();
    let mut seq: u64 = 0;
    let mut next = Instant::now();
    loop {
        seq += 1;
        let payload = match status.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (lan, socket) in &mut sockets {
            if socket.is_none() {
                // Bound to our own address on this LAN so the datagram leaves on it.
                match UdpSocket::bind(SocketAddr::new(lan.local.ip(), 0)) {
                    Ok(bound) => *socket = Some(bound),
                    Err(error) => {
                        if let Some(suppressed) = warn.allow() {
                            tracing::warn!(lan = %lan.name, %error, suppressed, "cannot open the heartbeat socket");
                        }
                        continue;
                    }
                }
            }
            let heartbeat = Heartbeat {
                module: config.module.clone(),
                sender: config.node.clone(),
                lan: lan.name.clone(),
                boot: config.boot,
                seq,
                status: payload.clone(),
            };
            let packet = match heartbeat::encode(secret, &heartbeat) {
                Ok(packet) => packet,
                Err(error) => {
                    if let Some(suppressed) = warn.allow() {
                        tracing::error!(%error, suppressed, "cannot encode a heartbeat");
                    }
                    continue;
                }
            };
            if let Some(bound) = socket
                && let Err(error) = bound.send_to(&packet, lan.peer)
                && let Some(suppressed) = warn.allow()
            {
                // A LAN that is down (no route, no carrier) is expected during faults.
                tracing::debug!(lan = %lan.name, peer = %lan.peer, %error, suppressed, "heartbeat not sent");
            }
        }
        next += config.pulse;
        let now = Instant::now();
        if next <= now {
            // Late (the machine was frozen): skip the missed rounds rather than burst.
            next = now + config.pulse;
        }
        std::thread::sleep(next - now);
    }
}

/// What a receiver needs.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The module.
    pub module: String,
    /// The only node heartbeats are accepted from.
    pub peer: String,
    /// The LAN and its addresses.
    pub lan: LanEndpoints,
}

/// Binds the receiver socket and starts its thread, which forwards every
/// accepted heartbeat with `forward` for the life of the process.
///
/// # Errors
/// The socket cannot be bound (the node's address is not configured here,
/// the port is taken) or the thread cannot be created.
pub fn spawn_receiver(
    config: ReceiverConfig,
    secret: Arc<[u8]>,
    modlog: ModLog,
    forward: impl Fn(Heartbeat) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let socket = UdpSocket::bind(config.lan.local)?;
    let span =
        tracing::info_span!("heartbeat-recv", module = %config.module, lan = %config.lan.name);
    std::thread::Builder::new()
        .name(format!("hb-recv-{}-{}", config.module, config.lan.name))
        .spawn(move || {
            let _entered = span.enter();
            receive_loop(&config, &socket, &secret, &modlog, &forward);
        })?;
    Ok(())
}

fn receive_loop(
    config: &ReceiverConfig,
    socket: &UdpSocket,
    secret: &[u8],
    modlog: &ModLog,
    forward: &dyn Fn(Heartbeat) -> bool,
) {
    let mut guard = ReplayGuard::new();
    let mut warn = RateLimit::default();
    let mut buffer = vec![0u8; heartbeat::MAX_PACKET_LEN + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buffer) {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(%error, "heartbeat receive failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match check(config, secret, &mut guard, &buffer[..len]) {
            Ok(heartbeat) => {
                if !forward(heartbeat) {
                    // The runner is gone: the agent is shutting down.
                    return;
                }
            }
            Err(reason) => {
                if let Some(suppressed) = warn.allow() {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} more since the last report)")
                    } else {
                        String::new()
                    };
                    tracing::warn!(%from, %reason, suppressed, "heartbeat refused");
                    modlog.log(
                        modlog::Level::Event,
                        format!(
                            "Heartbeat refused on LAN {} from {from}: {reason}{more}",
                            config.lan.name
                        ),
                    );
                }
            }
        }
    }
}

fn check(
    config: &ReceiverConfig,
    secret: &[u8],
    guard: &mut ReplayGuard,
    packet: &[u8],
) -> Result<Heartbeat, String> {
    let heartbeat = heartbeat::decode(secret, packet).map_err(|error| error.to_string())?;
    if heartbeat.module != config.module {
        return Err(format!("for module {:?}, not this one", heartbeat.module));
    }
    if heartbeat.sender != config.peer {
        return Err(format!(
            "from node {:?}, which is not the peer {:?}",
            heartbeat.sender, config.peer
        ));
    }
    if heartbeat.lan != config.lan.name {
        return Err(format!(
            "sent on LAN {:?} but received on {:?}",
            heartbeat.lan, config.lan.name
        ));
    }
    guard.check(&heartbeat).map_err(|stale| {
        format!(
            "replayed or reordered (boot {} seq {})",
            stale.boot, stale.seq
        )
    })?;
    Ok(heartbeat)
}

/// At most one report per [`WARN_INTERVAL`].
#[derive(Debug, Default)]
struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(number suppressed since the last report)` when a report may be made now.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < WARN_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_protocol::heartbeat::{Detail, ModuleState};

    fn status() -> NodeStatus {
        NodeStatus {
            state: ModuleState::Stop,
            detail: Detail::None,
            stopping: false,
            handover: false,
            swap_requested: false,
            up_to_date: false,
            resync_interrupted: false,
            replication_degraded: false,
            was_primary: false,
            resync_percent: 0,
            generations: Vec::new(),
            resync_request: None,
            resync_serve: None,
        }
    }

    fn config() -> ReceiverConfig {
        ReceiverConfig {
            module: "mirror".into(),
            peer: "node2".into(),
            lan: LanEndpoints {
                name: "default".into(),
                local: "127.0.0.1:0".parse().expect("addr"),
                peer: "127.0.0.1:0".parse().expect("addr"),
            },
        }
    }

    fn packet(secret: &[u8], sender: &str, lan: &str, seq: u64) -> Vec<u8> {
        heartbeat::encode(
            secret,
            &Heartbeat {
                module: "mirror".into(),
                sender: sender.into(),
                lan: lan.into(),
                boot: 1,
                seq,
                status: status(),
            },
        )
        .expect("encodes")
    }

    #[test]
    fn accepts_the_peer_and_refuses_forgeries_replays_and_strangers() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let mut guard = ReplayGuard::new();
        let config = config();
        assert!(
            check(
                &config,
                secret,
                &mut guard,
                &packet(secret, "node2", "default", 1)
            )
            .is_ok()
        );
        let replay = check(
            &config,
            secret,
            &mut guard,
            &packet(secret, "node2", "default", 1),
        );
        assert!(replay.expect_err("replay refused").contains("replayed"));
        let forged = check(
            &config,
            secret,
            &mut guard,
            &packet(b"another secret, not the cluster's", "node2", "default", 2),
        );
        assert!(
            forged
                .expect_err("forgery refused")
                .contains("authentication failed")
        );
        let stranger = check(
            &config,
            secret,
            &mut guard,
            &packet(secret, "node3", "default", 3),
        );
        assert!(
            stranger
                .expect_err("stranger refused")
                .contains("not the peer")
        );
        let wrong_lan = check(
            &config,
            secret,
            &mut guard,
            &packet(secret, "node2", "repli", 4),
        );
        assert!(
            wrong_lan
                .expect_err("other LAN refused")
                .contains("sent on LAN")
        );
    }

    #[test]
    fn rate_limit_reports_once_then_counts() {
        let mut limit = RateLimit::default();
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.suppressed, 2);
    }
}
