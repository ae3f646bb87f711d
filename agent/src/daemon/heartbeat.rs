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
//! - Reception record: each receiver notes when it accepted the last
//!   heartbeat on its LAN and the largest interval between two accepted ones
//!   since the agent started ([`reception`]), shown by `safekit state -v` as
//!   `heartbeat  lan default: last 0.2 s ago, largest gap 0.91 s`, so an
//!   operator (and the load test) can see how close the timing came to the
//!   timeout.
//!
//! # What keeps heartbeats timely under load
//!
//! - Dedicated OS threads: a pulse never waits for the tokio runtime, a
//!   script, the data path or a checker.
//! - No blocking I/O on their path but the UDP socket itself: no file, no
//!   name resolution, no lock held by a slow holder (the shared status is
//!   replaced under its mutex by a clone, the reception record is a short
//!   in-memory update). The module log is written only for refused
//!   heartbeats, at most once per [`WARN_INTERVAL`].
//! - Raised CPU priority: each heartbeat thread sets its own nice value to
//!   [`HEARTBEAT_NICE`] (Linux applies `setpriority` to a thread id), so the
//!   scheduler runs it ahead of CPU hogs at the default nice 0. It needs
//!   `CAP_SYS_NICE` (root); without it the thread keeps the default and says
//!   so at debug level. A real-time policy (`SCHED_FIFO`) is not used: neither
//!   nix nor rustix offers `sched_setscheduler` safely and this crate forbids
//!   `unsafe`.
//! - Memory is not locked (`mlockall`): it is available safely (rustix `mm`,
//!   nix `mman`) but `MCL_FUTURE` would also lock every tokio thread stack
//!   and buffer of the agent; the heartbeat threads' working set is small and
//!   touched every pulse, so it stays resident unless the machine swaps hard.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use safekit_protocol::heartbeat::{self, Heartbeat, NodeStatus, ReplayGuard};

use super::load::LanEndpoints;
use crate::modlog::{self, ModLog};

/// Refused heartbeats are reported at most once per this interval.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The nice value the heartbeat threads run at (lower is scheduled first; 0 is the default).
pub const HEARTBEAT_NICE: i32 = -10;

/// When the last heartbeat of one LAN was accepted, and the largest interval so far.
#[derive(Debug, Clone, Copy)]
struct Reception {
    last: Instant,
    largest_gap: Duration,
}

/// The reception record of every receiver of this process, by (module, LAN).
/// A process-wide table rather than a handle passed around: receivers write
/// it, the runner's status rendering reads it, nothing else shares state.
static RECEPTIONS: Mutex<BTreeMap<(String, String), Reception>> = Mutex::new(BTreeMap::new());

/// Notes a heartbeat accepted on `lan` of `module` at `now`.
fn record_reception(module: &str, lan: &str, now: Instant) {
    let mut table = match RECEPTIONS.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    table
        .entry((module.to_string(), lan.to_string()))
        .and_modify(|reception| {
            let gap = now.saturating_duration_since(reception.last);
            reception.largest_gap = reception.largest_gap.max(gap);
            reception.last = now;
        })
        .or_insert(Reception {
            last: now,
            largest_gap: Duration::ZERO,
        });
}

/// The `heartbeat` lines of `safekit state -v` for `module`, one per LAN
/// that received at least one heartbeat since the agent started:
/// `lan default: last 0.2 s ago, largest gap 0.91 s`.
pub fn reception(module: &str) -> Vec<String> {
    let table = match RECEPTIONS.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    let now = Instant::now();
    table
        .iter()
        .filter(|((name, _), _)| name == module)
        .map(|((_, lan), reception)| {
            format!(
                "lan {lan}: last {:.1} s ago, largest gap {:.2} s",
                now.saturating_duration_since(reception.last).as_secs_f64(),
                reception.largest_gap.as_secs_f64()
            )
        })
        .collect()
}

/// Lowers the calling thread's nice value to [`HEARTBEAT_NICE`], if allowed.
fn raise_priority() {
    let tid = rustix::thread::gettid();
    if let Err(error) = rustix::process::setpriority_process(Some(tid), HEARTBEAT_NICE) {
        tracing::debug!(%error, "heartbeat thread keeps the default priority");
    }
}

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
            raise_priority();
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
            raise_priority();
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
                record_reception(&config.module, &config.lan.name, Instant::now());
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
    fn reception_keeps_the_largest_gap_per_lan() {
        let start = Instant::now();
        record_reception("gaps", "default", start);
        record_reception("gaps", "default", start + Duration::from_millis(900));
        record_reception("gaps", "default", start + Duration::from_millis(1100));
        record_reception("gaps", "repli", start);
        let lines = reception("gaps");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("lan default: last "), "{lines:?}");
        assert!(lines[0].ends_with(", largest gap 0.90 s"), "{lines:?}");
        assert!(lines[1].ends_with(", largest gap 0.00 s"), "{lines:?}");
        assert!(reception("other").is_empty());
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
