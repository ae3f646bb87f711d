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
//! - Checker resources: the datagram also carries this node's checker
//!   resources (`custom.app up`), which the peer's rules read as `remote.`
//!   resources, as an authenticated extension record
//!   (`safekit_protocol::heartbeat::Extensions`). The runner publishes them
//!   with the status ([`publish`]); the sender sends the first ones that fit
//!   in one datagram ([`encode_fitting`]: names longer than
//!   `MAX_RESOURCE_NAME`, resources beyond `MAX_RESOURCES` and whatever would
//!   make the packet exceed `MAX_PACKET_LEN` are left out, and it logs once,
//!   per LAN, which ones until the set left out changes). A module without
//!   checkers sends no record: its packets are byte for byte the ones of the
//!   releases before the records. The receiver hands the records to the
//!   runner with the heartbeat; the runner gives them to its checkers and
//!   forgets them (`remote.` reads `unknown` again) when the peer is lost.
//!
//! # Compatibility: both nodes must run this release
//!
//! The version 2 decoder committed before the extension records refused any
//! byte after the heartbeat body (`Malformed: trailing bytes`). A node of
//! this release that has checkers sends records, so a peer still running an
//! earlier build would refuse every heartbeat and declare this node lost.
//! Upgrade both nodes together (as for any heartbeat change). The heartbeat
//! version stays 2 and no release number changes: no release of this
//! project has been published yet, so no deployed node can run the older
//! decoder; a version bump would only make this release refuse its own
//! earlier development builds for no user's benefit. Once a release is
//! published, a change that an older decoder refuses must bump
//! `HEARTBEAT_VERSION` instead.
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
//!   replaced under its mutex by a clone, the resource list is an `Arc`
//!   swapped under the same mutex and only cloned by the sender, the
//!   reception record is a short in-memory update; the sender never calls
//!   into the runner). The module log is written only for refused
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

use safekit_protocol::heartbeat::{
    self, Extensions, Heartbeat, HeartbeatError, MAX_RESOURCE_NAME, MAX_RESOURCES, NodeStatus,
    RemoteResource, ReplayGuard,
};

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

/// What the sender thread sends, replaced by the runner after each event ([`publish`]).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The module's status.
    pub status: NodeStatus,
    /// This node's checker resources, in the runner's order (empty: no
    /// extension record is sent). Shared, so the sender's copy is a
    /// reference count, not a list.
    pub resources: Arc<[RemoteResource]>,
}

impl Outgoing {
    /// `status` without resources.
    pub fn new(status: NodeStatus) -> Self {
        Outgoing {
            status,
            resources: Arc::from(Vec::new()),
        }
    }
}

/// The snapshot the runner publishes and the sender thread reads, each
/// holding the lock only to replace or clone it.
pub type SharedStatus = Arc<Mutex<Outgoing>>;

/// Publishes the runner's `status` and checker `resources` for the sender;
/// the resource list is replaced only when it changed.
pub fn publish(shared: &SharedStatus, status: NodeStatus, resources: Vec<RemoteResource>) {
    let mut guard = match shared.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    guard.status = status;
    if *guard.resources != *resources {
        guard.resources = Arc::from(resources);
    }
}

/// The packet for `heartbeat` carrying the first `resources` that fit, and
/// the names of those left out, in their order (too long a name, beyond [`MAX_RESOURCES`],
/// or no room left in [`heartbeat::MAX_PACKET_LEN`]). No resources: no
/// extension record, the same bytes as [`heartbeat::encode`]. When all do
/// not fit, the longest prefix that does is found by bisection (a few
/// encodings, only in that case).
///
/// # Errors
/// The heartbeat itself cannot be encoded (see [`heartbeat::encode`]).
pub fn encode_fitting<'r>(
    secret: &[u8],
    heartbeat: &Heartbeat,
    resources: &'r [RemoteResource],
) -> Result<(Vec<u8>, Vec<&'r str>), HeartbeatError> {
    if resources.is_empty() {
        return Ok((heartbeat::encode(secret, heartbeat)?, Vec::new()));
    }
    let eligible: Vec<&RemoteResource> = resources
        .iter()
        .filter(|resource| resource.name.len() <= MAX_RESOURCE_NAME)
        .take(MAX_RESOURCES)
        .collect();
    let attempt = |count: usize| {
        let extensions = Extensions {
            resources: Some(eligible[..count].iter().map(|&r| r.clone()).collect()),
        };
        heartbeat::encode_with_extensions(secret, heartbeat, &extensions)
    };
    let (packet, sent) = match attempt(eligible.len()) {
        Ok(packet) => (packet, eligible.len()),
        Err(HeartbeatError::TooLarge(_)) => {
            // The size grows with the count: bisect for the largest count
            // that fits; every count from `high` on is known not to.
            let (mut low, mut high) = (0, eligible.len());
            let mut fits = None;
            while low < high {
                let middle = low + (high - low) / 2;
                match attempt(middle) {
                    Ok(packet) => {
                        fits = Some((packet, middle));
                        low = middle + 1;
                    }
                    Err(HeartbeatError::TooLarge(_)) => high = middle,
                    Err(error) => return Err(error),
                }
            }
            match fits {
                Some(fitting) => fitting,
                // Not even an empty record fits: send none.
                None => (heartbeat::encode(secret, heartbeat)?, 0),
            }
        }
        Err(error) => return Err(error),
    };
    // In their original order (`resources` is short: at most a few hundred).
    let names: Vec<&str> = if sent == resources.len() {
        Vec::new()
    } else {
        resources
            .iter()
            .filter(|resource| !eligible[..sent].iter().any(|&s| std::ptr::eq(s, *resource)))
            .map(|resource| resource.name.as_str())
            .collect()
    };
    Ok((packet, names))
}

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
    // Per LAN: its socket, and the resources left out of its last packet.
    let mut sockets: Vec<(LanEndpoints, Option<UdpSocket>, Vec<String>)> = config
        .lans
        .iter()
        .map(|lan| (lan.clone(), None, Vec::new()))
        .collect();
    let mut warn = RateLimit::default();
    let mut seq: u64 = 0;
    let mut next = Instant::now();
    loop {
        seq += 1;
        let Outgoing {
            status: payload,
            resources,
        } = match status.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        for (lan, socket, last_left_out) in &mut sockets {
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
            let packet = match encode_fitting(secret, &heartbeat, &resources) {
                Ok((packet, left_out)) => {
                    if left_out != *last_left_out {
                        if !left_out.is_empty() {
                            tracing::warn!(
                                lan = %lan.name,
                                left_out = %left_out.join(", "),
                                "checker resources left out of the heartbeat (they do not fit in one datagram): the peer reads them as unknown"
                            );
                        } else {
                            tracing::info!(lan = %lan.name, "every checker resource fits in the heartbeat again");
                        }
                        *last_left_out = left_out.into_iter().map(str::to_string).collect();
                    }
                    packet
                }
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
/// accepted heartbeat, with its extension records (the peer's checker
/// resources), with `forward` for the life of the process.
///
/// # Errors
/// The socket cannot be bound (the node's address is not configured here,
/// the port is taken) or the thread cannot be created.
pub fn spawn_receiver(
    config: ReceiverConfig,
    secret: Arc<[u8]>,
    modlog: ModLog,
    forward: impl Fn(Heartbeat, Extensions) -> bool + Send + 'static,
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
    forward: &dyn Fn(Heartbeat, Extensions) -> bool,
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
            Ok((heartbeat, extensions)) => {
                record_reception(&config.module, &config.lan.name, Instant::now());
                if !forward(heartbeat, extensions) {
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
) -> Result<(Heartbeat, Extensions), String> {
    let (heartbeat, extensions) =
        heartbeat::decode_with_extensions(secret, packet).map_err(|error| error.to_string())?;
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
    Ok((heartbeat, extensions))
}

/// At most one report per [`WARN_INTERVAL`] (also used by the web service and `safekit -H`).
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// `Some(number suppressed since the last report)` when a report may be made now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
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

    fn heartbeat_of(seq: u64) -> Heartbeat {
        Heartbeat {
            module: "mirror".into(),
            sender: "node1".into(),
            lan: "default".into(),
            boot: 1,
            seq,
            status: status(),
        }
    }

    fn resource(name: String) -> RemoteResource {
        RemoteResource {
            name,
            state: safekit_protocol::heartbeat::ResourceState::Up,
        }
    }

    fn decoded_resources(secret: &[u8], packet: &[u8]) -> Option<Vec<RemoteResource>> {
        heartbeat::decode_with_extensions(secret, packet)
            .expect("the peer accepts the packet")
            .1
            .resources
    }

    #[test]
    fn without_resources_the_packet_is_the_one_older_releases_send() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let (packet, left_out) = encode_fitting(secret, &heartbeat_of(1), &[]).expect("encodes");
        assert_eq!(
            packet,
            heartbeat::encode(secret, &heartbeat_of(1)).expect("encodes")
        );
        assert!(left_out.is_empty());
        assert_eq!(decoded_resources(secret, &packet), None);
    }

    #[test]
    fn resources_that_fit_are_all_sent_in_order() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let resources = vec![
            resource("custom.app".into()),
            resource("proc.watchedapp".into()),
        ];
        let (packet, left_out) =
            encode_fitting(secret, &heartbeat_of(1), &resources).expect("encodes");
        assert!(left_out.is_empty(), "{left_out:?}");
        assert_eq!(decoded_resources(secret, &packet), Some(resources));
    }

    #[test]
    fn resources_beyond_one_datagram_are_cut_to_the_first_that_fit_and_named() {
        let secret = b"0123456789abcdef0123456789abcdef";
        // 64 names of 90 bytes: about 5.9 KB, four times what a datagram holds.
        let resources: Vec<RemoteResource> = (0..64)
            .map(|index| resource(format!("custom.{index:02}{}", "x".repeat(81))))
            .collect();
        let (packet, left_out) =
            encode_fitting(secret, &heartbeat_of(1), &resources).expect("encodes");
        assert!(
            packet.len() <= heartbeat::MAX_PACKET_LEN,
            "{}",
            packet.len()
        );
        let sent = decoded_resources(secret, &packet).expect("a resources record");
        assert!(
            !sent.is_empty() && sent.len() < resources.len(),
            "{}",
            sent.len()
        );
        assert_eq!(sent, resources[..sent.len()], "the first ones, in order");
        let expected: Vec<&str> = resources[sent.len()..]
            .iter()
            .map(|resource| resource.name.as_str())
            .collect();
        assert_eq!(left_out, expected, "every resource not sent is named");
        // As many as fit: one more does not.
        let one_more = Extensions {
            resources: Some(resources[..=sent.len()].to_vec()),
        };
        assert!(matches!(
            heartbeat::encode_with_extensions(secret, &heartbeat_of(1), &one_more),
            Err(HeartbeatError::TooLarge(_))
        ));
    }

    #[test]
    fn too_long_names_and_resources_beyond_the_count_limit_are_left_out() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let too_long = format!("custom.{}", "y".repeat(MAX_RESOURCE_NAME));
        let mut resources = vec![resource(too_long.clone())];
        resources.extend((0..MAX_RESOURCES + 2).map(|index| resource(format!("p.{index}"))));
        let (packet, left_out) =
            encode_fitting(secret, &heartbeat_of(1), &resources).expect("encodes");
        let sent = decoded_resources(secret, &packet).expect("a resources record");
        assert_eq!(sent, resources[1..=MAX_RESOURCES]);
        let beyond_64 = format!("p.{MAX_RESOURCES}");
        let beyond_65 = format!("p.{}", MAX_RESOURCES + 1);
        assert_eq!(
            left_out,
            vec![too_long.as_str(), beyond_64.as_str(), beyond_65.as_str()],
            "in the runner's order"
        );
    }

    #[test]
    fn publish_replaces_the_status_and_keeps_an_unchanged_resource_list() {
        let shared: SharedStatus = Arc::new(Mutex::new(Outgoing::new(status())));
        let resources = vec![resource("custom.app".into())];
        publish(&shared, status(), resources.clone());
        let first = Arc::clone(&shared.lock().expect("lock").resources);
        assert_eq!(*first, *resources);
        let mut prim = status();
        prim.state = ModuleState::Prim;
        publish(&shared, prim.clone(), resources.clone());
        let snapshot = shared.lock().expect("lock").clone();
        assert_eq!(snapshot.status, prim);
        assert!(
            Arc::ptr_eq(&snapshot.resources, &first),
            "an unchanged list is not replaced"
        );
        publish(&shared, prim, Vec::new());
        assert!(shared.lock().expect("lock").resources.is_empty());
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
