//! The mirror heartbeat packet: what one node tells its peer every `pulse`, on every LAN.
//!
//! A heartbeat proves the sender is alive on that LAN and carries its module
//! state, so the peer's state machine can decide (who is up to date, whether
//! the primary is stopping, split brain). It must be cheap to build and to
//! check, fit in one UDP datagram, and be refused when forged or replayed.
//!
//! # Wire format (version 2)
//!
//! Version 2 added the reintegration handshake fields of [`NodeStatus`]
//! ([`NodeStatus::resync_request`], [`NodeStatus::resync_serve`]); a version 1
//! packet is refused with [`HeartbeatError::UnsupportedVersion`] (both nodes of
//! a cluster run the same release).
//!
//! | offset | size     | field    | meaning                                                      |
//! |-------:|---------:|----------|--------------------------------------------------------------|
//! | 0      | 4        | magic    | `b"SKHB"`                                                    |
//! | 4      | 1        | version  | [`HEARTBEAT_VERSION`] (2)                                    |
//! | 5      | 2        | body_len | little-endian, at most [`MAX_PACKET_LEN`] minus the rest     |
//! | 7      | body_len | body     | `postcard` encoding of [`Heartbeat`], using all its bytes    |
//! | 7+len  | 32       | tag      | `HMAC-SHA256(secret, "safekit-heartbeat" ‖ bytes 0..7+len)`  |
//!
//! The body is the `postcard` encoding of [`Heartbeat`], optionally followed
//! by extension records ([`Extensions`]): each is a kind byte, a little-endian
//! `u16` length and that many bytes. Kind 1 carries the sender's checker
//! resources ([`RemoteResource`], at most [`MAX_RESOURCES`] names of at most
//! [`MAX_RESOURCE_NAME`] bytes), for the rules' `remote.` resources; unknown
//! kinds are skipped, so later releases can append records that this one
//! ignores. Compatibility: decoders older than the extension records refuse
//! any byte after the [`Heartbeat`] (`Malformed: trailing bytes`), so a node
//! must not send records to a peer that may run such a release; [`encode`]
//! sends none and is byte for byte what those releases send. The agent sends
//! its checker resources as records (see the agent's `daemon::heartbeat`):
//! no release with the older decoder was ever published, so no version bump
//! was made; once one is, a change like this one must bump the version.
//!
//! The tag covers the header, so the version and length cannot be altered.
//! The body names the module, the sender and the LAN it was sent on, so a
//! packet captured on one LAN or for one module is refused on another.
//!
//! # Replay rule
//!
//! Each heartbeat carries `(boot, seq)`: `boot` grows at every start of the
//! sender's agent (it is persisted and incremented by the agent; see the agent's
//! state file), and `seq` grows by one per packet within a boot, shared by all
//! LANs. A receiver keeps, per `(sender, lan)`, the greatest `(boot, seq)` it
//! accepted ([`ReplayGuard`]) and ignores any packet that is not strictly
//! greater in lexicographic order. The guard is per LAN because the same
//! `(boot, seq)` is legitimately sent once on each LAN; the LAN name inside the
//! authenticated body stops a copy from one LAN being replayed on another.
//! Known limit: the guard lives in memory, so just after the receiver restarts
//! a recorded packet from the sender's current boot could be accepted once; it
//! only makes the sender look alive for one more pulse, and its status is
//! superseded by the next genuine packet.
//!
//! Decoding never panics (see the property test); every refusal is a typed
//! [`HeartbeatError`] that the receiver logs.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The first four bytes of every heartbeat.
pub const MAGIC: [u8; 4] = *b"SKHB";

/// The heartbeat format version this crate speaks.
pub const HEARTBEAT_VERSION: u8 = 2;

/// The largest datagram sent or accepted (fits a 1500-byte MTU with IPv6 and UDP headers).
pub const MAX_PACKET_LEN: usize = 1400;

/// Most generations a heartbeat may carry (the history is bounded the same way in the core).
pub const MAX_GENERATIONS: usize = 32;

/// Most resources one heartbeat carries ([`Extensions::resources`]).
pub const MAX_RESOURCES: usize = 64;

/// Longest resource name carried (`class.ident`), in bytes.
pub const MAX_RESOURCE_NAME: usize = 96;

/// Extension record kind: the sender's checker resources.
const EXT_RESOURCES: u8 = 1;

/// Length of the authentication tag.
pub const TAG_LEN: usize = 32;

const HEADER_LEN: usize = 7;
const MAC_LABEL: &[u8] = b"safekit-heartbeat";

/// One heartbeat datagram's authenticated content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The module this heartbeat belongs to.
    pub module: String,
    /// The sender's node name (as in cluster.xml).
    pub sender: String,
    /// The LAN (cluster.xml `<lan name>`) this copy was sent on.
    pub lan: String,
    /// The sender's boot number: grows at every start of the sender's agent.
    pub boot: u64,
    /// Packet number within the boot, shared by all LANs.
    pub seq: u64,
    /// What the sender's module is doing.
    pub status: NodeStatus,
}

/// A module's state as its peer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// STOP, WAIT, ALONE, PRIM or SECOND.
    pub state: ModuleState,
    /// Why, or which phase (WAIT reason, SECOND resynchronizing or up to date).
    pub detail: Detail,
    /// The sender is stopping its application (operator stop, swap): SafeKit's "remote stop".
    pub stopping: bool,
    /// The sender (now SECOND after a swap) hands the primary role to the receiver.
    pub handover: bool,
    /// The sender (SECOND) asks its primary to swap roles.
    pub swap_requested: bool,
    /// The sender's data is up to date as far as it knows (it was the last to run the application).
    pub up_to_date: bool,
    /// The sender was stopped in the middle of a resynchronization.
    pub resync_interrupted: bool,
    /// The sender runs ALONE because replication to its peer failed while heartbeats still arrive.
    pub replication_degraded: bool,
    /// The sender ran the application before its last stop (for `defaultprim="lastprim"`).
    pub was_primary: bool,
    /// Resynchronization progress in percent (0..=100), meaningful while resynchronizing.
    pub resync_percent: u8,
    /// The sender's generation history, oldest first, at most [`MAX_GENERATIONS`].
    pub generations: Vec<GenerationEntry>,
    /// SECOND resynchronizing: the reintegration it asks its primary to serve.
    pub resync_request: Option<ResyncRequestStatus>,
    /// Primary (ALONE or PRIM): the reintegration it serves to its peer, and how far it got.
    pub resync_serve: Option<ResyncServeStatus>,
}

/// What a resynchronizing SECOND asks of its primary (reintegration handshake).
///
/// The primary runs the resync engine (it owns the tree and the replication
/// stream); the SECOND only receives. `attempt` identifies one attempt: the
/// primary serves each attempt once, and the SECOND accepts an outcome only
/// for the attempt it is waiting for, so a stale outcome of an older attempt
/// is never taken for the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequestStatus {
    /// Identifies this attempt (random, drawn by the SECOND at each attempt).
    pub attempt: u64,
    /// The SECOND needs a full comparison (its interrupted resync was full).
    pub full: bool,
}

/// The primary's side of the reintegration handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncServeStatus {
    /// The attempt served ([`ResyncRequestStatus::attempt`]).
    pub attempt: u64,
    /// Full comparison (else incremental from the dirty log).
    pub full: bool,
    /// Where it is.
    pub phase: ServePhase,
}

/// Where a served reintegration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServePhase {
    /// Running; progress so far.
    Running(ResyncProgressStatus),
    /// Completed after a durable barrier: the replica equals the primary's tree
    /// as of the primary's generation `generation`, and live replication keeps it so.
    Served {
        /// The primary's current generation when the resync completed.
        generation: u64,
        /// Final counters.
        progress: ResyncProgressStatus,
    },
    /// Failed; the SECOND retries with a new attempt.
    Failed,
}

/// Resync progress as the primary's engine measures it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgressStatus {
    /// Percent done (0..=100).
    pub percent: u8,
    /// Files finished.
    pub files_done: u64,
    /// Files to examine.
    pub files_total: u64,
    /// Bytes of finished files.
    pub bytes_done: u64,
    /// Bytes of the files to examine.
    pub bytes_total: u64,
    /// Data bytes actually shipped.
    pub bytes_sent: u64,
    /// Bytes per second.
    pub rate: u64,
    /// Estimated seconds left, when known.
    pub eta_secs: Option<u64>,
}

/// The five module states of a mirror module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModuleState {
    /// Module not running.
    Stop,
    /// Started but blocked; [`Detail`] says why.
    Wait,
    /// Runs the application without its peer.
    Alone,
    /// Runs the application; the peer is SECOND and in sync.
    Prim,
    /// Application stopped; receives replication.
    Second,
}

/// A checker resource's value, as the peer's rules read it (`remote.class.id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResourceState {
    /// No verdict yet.
    Init,
    /// The checker says it works.
    Up,
    /// The checker says it failed.
    Down,
}

/// One checker resource of the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteResource {
    /// `class.ident` (`custom.app`, `intf.10.0.0.0`), at most [`MAX_RESOURCE_NAME`] bytes.
    pub name: String,
    /// Its value.
    pub state: ResourceState,
}

/// What may follow the [`Heartbeat`] in the authenticated body (see the
/// module's wire format).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// The sender's checker resources; `None`: the sender did not send them
    /// (the peer's `remote.` resources stay unknown).
    pub resources: Option<Vec<RemoteResource>>,
}

/// Sub-state carried with [`ModuleState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Detail {
    /// No sub-state.
    None,
    /// SECOND: resynchronization in progress (not up to date).
    Resyncing,
    /// SECOND: in sync with the primary.
    InSync,
    /// WAIT: the peer's status is not known yet.
    PeerUnknown,
    /// WAIT: data not up to date, waiting for the peer.
    NotUpToDate,
    /// WAIT: stopped during a resynchronization; data may be inconsistent.
    ResyncInterrupted,
    /// WAIT: waiting for the peer, which holds the newer data, to become primary.
    PeerNotPrimary,
    /// WAIT: `failover="off"` and the primary disappeared.
    FailoverOff,
    /// WAIT: the split-brain witness could not be reached.
    WitnessUnreachable,
    /// WAIT: replication with the primary failed (degraded).
    ReplicationDegraded,
    /// WAIT: the last resynchronization failed; it is retried.
    ResyncFailed,
    /// WAIT: neither node holds data known to be up to date; `prim` is needed.
    NoUpToDateNode,
    /// WAIT: an impossible combination was seen; resolved to the safe side.
    Inconsistent,
    /// WAIT: a `wait()` rule holds the module until its resource is up again.
    ResourceDown,
}

/// One generation of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GenerationEntry {
    /// Random identifier drawn when the generation was created.
    pub id: u64,
    /// How it was created (used by the split-brain rule).
    pub origin: GenerationOrigin,
}

/// Why a node started a generation (started running the application without its peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GenerationOrigin {
    /// `start` on an up-to-date node whose peer was absent.
    Start,
    /// `prim`: forced by the operator.
    Forced,
    /// A SECOND in sync took over (peer lost or stopped).
    Takeover,
    /// A PRIM lost its peer (or replication) and kept running.
    ContinuedPrimary,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// Shorter than a header and a tag, or longer than [`MAX_PACKET_LEN`].
    #[error("heartbeat of {0} bytes has an impossible size")]
    BadSize(usize),
    /// Not a heartbeat (other traffic on the port).
    #[error("not a heartbeat (bad magic)")]
    BadMagic,
    /// A heartbeat from a different version.
    #[error("heartbeat version {0} is not supported (this node speaks {HEARTBEAT_VERSION})")]
    UnsupportedVersion(u8),
    /// The length field disagrees with the datagram.
    #[error("heartbeat length field {declared} does not match the datagram")]
    BadLength {
        /// The declared body length.
        declared: usize,
    },
    /// The tag does not match: wrong cluster secret or forged packet.
    #[error("heartbeat authentication failed: wrong cluster secret or forged packet")]
    BadTag,
    /// Authenticated but not decodable (a bug on the sender).
    #[error("heartbeat body is malformed: {0}")]
    Malformed(String),
    /// More generations than allowed.
    #[error("heartbeat carries {0} generations (at most {MAX_GENERATIONS})")]
    TooManyGenerations(usize),
    /// The cluster secret is empty, which would make every tag guessable.
    #[error("the cluster secret is empty")]
    EmptySecret,
    /// The packet is too large to send.
    #[error("heartbeat of {0} bytes exceeds the {MAX_PACKET_LEN}-byte limit")]
    TooLarge(usize),
    /// More resources than a heartbeat carries, or a name too long.
    #[error(
        "heartbeat resources out of bounds: {count} resources (at most {MAX_RESOURCES}), longest name {longest} bytes (at most {MAX_RESOURCE_NAME})"
    )]
    ResourcesOutOfBounds {
        /// How many.
        count: usize,
        /// The longest name's length.
        longest: usize,
    },
}

fn new_mac(secret: &[u8]) -> Result<Hmac<Sha256>, HeartbeatError> {
    if secret.is_empty() {
        return Err(HeartbeatError::EmptySecret);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(MAC_LABEL);
    Ok(mac)
}

/// Encodes and authenticates a heartbeat.
///
/// # Errors
/// [`HeartbeatError::EmptySecret`] for an empty secret,
/// [`HeartbeatError::TooManyGenerations`] or [`HeartbeatError::TooLarge`] when
/// the packet would not be accepted by a receiver.
pub fn encode(secret: &[u8], heartbeat: &Heartbeat) -> Result<Vec<u8>, HeartbeatError> {
    encode_with_extensions(secret, heartbeat, &Extensions::default())
}

fn check_resources(resources: &[RemoteResource]) -> Result<(), HeartbeatError> {
    let longest = resources
        .iter()
        .map(|resource| resource.name.len())
        .max()
        .unwrap_or(0);
    if resources.len() > MAX_RESOURCES || longest > MAX_RESOURCE_NAME {
        return Err(HeartbeatError::ResourcesOutOfBounds {
            count: resources.len(),
            longest,
        });
    }
    Ok(())
}

/// Encodes and authenticates a heartbeat followed by its extension records
/// (none for `Extensions::default()`: the same bytes as [`encode`]). Only
/// for a peer known to decode them (see the module's compatibility note).
///
/// # Errors
/// As [`encode`], and [`HeartbeatError::ResourcesOutOfBounds`].
pub fn encode_with_extensions(
    secret: &[u8],
    heartbeat: &Heartbeat,
    extensions: &Extensions,
) -> Result<Vec<u8>, HeartbeatError> {
    if heartbeat.status.generations.len() > MAX_GENERATIONS {
        return Err(HeartbeatError::TooManyGenerations(
            heartbeat.status.generations.len(),
        ));
    }
    let mut body = postcard::to_allocvec(heartbeat)
        .map_err(|error| HeartbeatError::Malformed(error.to_string()))?;
    if let Some(resources) = &extensions.resources {
        check_resources(resources)?;
        let record = postcard::to_allocvec(resources)
            .map_err(|error| HeartbeatError::Malformed(error.to_string()))?;
        let length = u16::try_from(record.len())
            .map_err(|_| HeartbeatError::TooLarge(HEADER_LEN + body.len() + record.len()))?;
        body.push(EXT_RESOURCES);
        body.extend_from_slice(&length.to_le_bytes());
        body.extend_from_slice(&record);
    }
    let total = HEADER_LEN + body.len() + TAG_LEN;
    if total > MAX_PACKET_LEN {
        return Err(HeartbeatError::TooLarge(total));
    }
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&MAGIC);
    packet.push(HEARTBEAT_VERSION);
    packet.extend_from_slice(&(body.len() as u16).to_le_bytes());
    packet.extend_from_slice(&body);
    let mut mac = new_mac(secret)?;
    mac.update(&packet);
    packet.extend_from_slice(&mac.finalize().into_bytes());
    Ok(packet)
}

/// Checks the tag of a datagram and decodes it.
///
/// The tag is checked (in constant time) before the body is parsed, so an
/// unauthenticated sender cannot reach the body decoder. Replays are not
/// detected here: pass the result through a [`ReplayGuard`].
///
/// # Errors
/// One [`HeartbeatError`] per reason for refusal; never panics.
pub fn decode(secret: &[u8], packet: &[u8]) -> Result<Heartbeat, HeartbeatError> {
    decode_with_extensions(secret, packet).map(|(heartbeat, _)| heartbeat)
}

/// As [`decode`], with the extension records that follow the heartbeat
/// (unknown kinds skipped).
///
/// # Errors
/// As [`decode`]; a record whose length overruns the body, or resources out
/// of bounds, is [`HeartbeatError::Malformed`].
pub fn decode_with_extensions(
    secret: &[u8],
    packet: &[u8],
) -> Result<(Heartbeat, Extensions), HeartbeatError> {
    if packet.len() < HEADER_LEN + TAG_LEN || packet.len() > MAX_PACKET_LEN {
        return Err(HeartbeatError::BadSize(packet.len()));
    }
    if packet[0..4] != MAGIC {
        return Err(HeartbeatError::BadMagic);
    }
    if packet[4] != HEARTBEAT_VERSION {
        return Err(HeartbeatError::UnsupportedVersion(packet[4]));
    }
    let declared = usize::from(u16::from_le_bytes([packet[5], packet[6]]));
    if HEADER_LEN + declared + TAG_LEN != packet.len() {
        return Err(HeartbeatError::BadLength { declared });
    }
    let (signed, tag) = packet.split_at(HEADER_LEN + declared);
    let mut mac = new_mac(secret)?;
    mac.update(signed);
    mac.verify_slice(tag).map_err(|_| HeartbeatError::BadTag)?;
    let (heartbeat, rest) = postcard::take_from_bytes::<Heartbeat>(&signed[HEADER_LEN..])
        .map_err(|error| HeartbeatError::Malformed(error.to_string()))?;
    let extensions = decode_extensions(rest)?;
    if heartbeat.status.generations.len() > MAX_GENERATIONS {
        return Err(HeartbeatError::TooManyGenerations(
            heartbeat.status.generations.len(),
        ));
    }
    Ok((heartbeat, extensions))
}

/// The extension records after the heartbeat body.
fn decode_extensions(mut rest: &[u8]) -> Result<Extensions, HeartbeatError> {
    let mut extensions = Extensions::default();
    while let Some((&kind, after_kind)) = rest.split_first() {
        let (Some(length), Some(after_length)) = (after_kind.get(..2), after_kind.get(2..)) else {
            return Err(HeartbeatError::Malformed(
                "truncated extension record header".into(),
            ));
        };
        let length = usize::from(u16::from_le_bytes([length[0], length[1]]));
        let (Some(record), Some(next)) = (after_length.get(..length), after_length.get(length..))
        else {
            return Err(HeartbeatError::Malformed(format!(
                "extension record of {length} bytes overruns the body"
            )));
        };
        if kind == EXT_RESOURCES {
            let (resources, trailing) = postcard::take_from_bytes::<Vec<RemoteResource>>(record)
                .map_err(|error| HeartbeatError::Malformed(error.to_string()))?;
            if !trailing.is_empty() {
                return Err(HeartbeatError::Malformed(format!(
                    "{} trailing bytes in the resources record",
                    trailing.len()
                )));
            }
            check_resources(&resources)
                .map_err(|error| HeartbeatError::Malformed(error.to_string()))?;
            extensions.resources = Some(resources);
        }
        rest = next;
    }
    Ok(extensions)
}

/// Why the replay guard refused an authenticated heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "replayed or out-of-order heartbeat from {sender} on {lan}: (boot {boot}, seq {seq}) is not newer than (boot {last_boot}, seq {last_seq})"
)]
pub struct StaleHeartbeat {
    /// Sender of the refused packet.
    pub sender: String,
    /// LAN of the refused packet.
    pub lan: String,
    /// Its boot number.
    pub boot: u64,
    /// Its sequence number.
    pub seq: u64,
    /// The newest accepted boot number.
    pub last_boot: u64,
    /// The newest accepted sequence number.
    pub last_seq: u64,
}

/// Remembers, per `(sender, lan)`, the newest `(boot, seq)` accepted (see the module's replay rule).
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    newest: std::collections::HashMap<(String, String), (u64, u64)>,
}

impl ReplayGuard {
    /// An empty guard (accepts the first packet of every sender and LAN).
    pub fn new() -> Self {
        Self::default()
    }

    /// Accepts `heartbeat` and records it if it is newer than every packet
    /// accepted before from the same sender on the same LAN.
    ///
    /// # Errors
    /// [`StaleHeartbeat`] for a replayed, duplicated or reordered packet; nothing is recorded.
    pub fn check(&mut self, heartbeat: &Heartbeat) -> Result<(), StaleHeartbeat> {
        let key = (heartbeat.sender.clone(), heartbeat.lan.clone());
        let candidate = (heartbeat.boot, heartbeat.seq);
        match self.newest.get(&key) {
            Some(&last) if candidate <= last => Err(StaleHeartbeat {
                sender: heartbeat.sender.clone(),
                lan: heartbeat.lan.clone(),
                boot: heartbeat.boot,
                seq: heartbeat.seq,
                last_boot: last.0,
                last_seq: last.1,
            }),
            _ => {
                self.newest.insert(key, candidate);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"cluster secret";

    fn sample() -> Heartbeat {
        Heartbeat {
            module: "mirror".into(),
            sender: "node1".into(),
            lan: "default".into(),
            boot: 3,
            seq: 41,
            status: NodeStatus {
                state: ModuleState::Prim,
                detail: Detail::None,
                stopping: false,
                handover: false,
                swap_requested: false,
                up_to_date: true,
                resync_interrupted: false,
                replication_degraded: false,
                was_primary: true,
                resync_percent: 0,
                resync_request: Some(ResyncRequestStatus {
                    attempt: 9,
                    full: true,
                }),
                resync_serve: Some(ResyncServeStatus {
                    attempt: u64::MAX,
                    full: false,
                    phase: ServePhase::Served {
                        generation: u64::MAX,
                        progress: ResyncProgressStatus {
                            percent: 100,
                            files_done: u64::MAX,
                            files_total: u64::MAX,
                            bytes_done: u64::MAX,
                            bytes_total: u64::MAX,
                            bytes_sent: u64::MAX,
                            rate: u64::MAX,
                            eta_secs: Some(u64::MAX),
                        },
                    },
                }),
                generations: vec![
                    GenerationEntry {
                        id: 7,
                        origin: GenerationOrigin::Forced,
                    },
                    GenerationEntry {
                        id: u64::MAX,
                        origin: GenerationOrigin::ContinuedPrimary,
                    },
                ],
            },
        }
    }

    #[test]
    fn a_heartbeat_round_trips_with_the_right_secret() {
        let packet = encode(SECRET, &sample()).expect("encodes");
        assert!(packet.len() <= MAX_PACKET_LEN);
        assert_eq!(decode(SECRET, &packet).expect("decodes"), sample());
    }

    #[test]
    fn a_full_history_with_long_names_fits_one_datagram() {
        let mut heartbeat = sample();
        heartbeat.module = "m".repeat(64);
        heartbeat.sender = "n".repeat(64);
        heartbeat.lan = "l".repeat(64);
        heartbeat.boot = u64::MAX;
        heartbeat.seq = u64::MAX;
        heartbeat.status.generations = vec![
            GenerationEntry {
                id: u64::MAX,
                origin: GenerationOrigin::Takeover
            };
            MAX_GENERATIONS
        ];
        let packet = encode(SECRET, &heartbeat).expect("fits");
        assert_eq!(decode(SECRET, &packet).expect("decodes"), heartbeat);
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let packet = encode(SECRET, &sample()).expect("encodes");
        assert_eq!(
            decode(b"another secret", &packet),
            Err(HeartbeatError::BadTag)
        );
    }

    #[test]
    fn an_empty_secret_is_refused_both_ways() {
        assert_eq!(encode(b"", &sample()), Err(HeartbeatError::EmptySecret));
        let packet = encode(SECRET, &sample()).expect("encodes");
        assert_eq!(decode(b"", &packet), Err(HeartbeatError::EmptySecret));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let packet = encode(SECRET, &sample()).expect("encodes");
        for byte in 0..packet.len() {
            for bit in 0..8 {
                let mut forged = packet.clone();
                forged[byte] ^= 1 << bit;
                assert!(
                    decode(SECRET, &forged).is_err(),
                    "byte {byte} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn too_many_generations_are_refused_on_encode() {
        let mut heartbeat = sample();
        heartbeat.status.generations = vec![
            GenerationEntry {
                id: 1,
                origin: GenerationOrigin::Start
            };
            MAX_GENERATIONS + 1
        ];
        assert_eq!(
            encode(SECRET, &heartbeat),
            Err(HeartbeatError::TooManyGenerations(MAX_GENERATIONS + 1))
        );
    }

    #[test]
    fn replay_guard_refuses_replays_and_reordering_but_not_other_lans() {
        let mut guard = ReplayGuard::new();
        let first = sample();
        assert_eq!(guard.check(&first), Ok(()));
        // The same packet again: a replay.
        assert!(guard.check(&first).is_err());
        // The same (boot, seq) on the other LAN is the legitimate copy for that LAN.
        let mut other_lan = first.clone();
        other_lan.lan = "flow".into();
        assert_eq!(guard.check(&other_lan), Ok(()));
        // An older sequence number: reordered or replayed.
        let mut older = first.clone();
        older.seq -= 1;
        assert!(guard.check(&older).is_err());
        // A newer boot restarts the sequence.
        let mut rebooted = first.clone();
        rebooted.boot += 1;
        rebooted.seq = 0;
        assert_eq!(guard.check(&rebooted), Ok(()));
        // And the previous boot is now refused whatever its sequence number.
        let mut previous_boot = first;
        previous_boot.seq = u64::MAX;
        assert!(guard.check(&previous_boot).is_err());
    }

    fn resources(count: usize) -> Vec<RemoteResource> {
        (0..count)
            .map(|index| RemoteResource {
                name: format!("custom.r{index}"),
                state: [ResourceState::Init, ResourceState::Up, ResourceState::Down][index % 3],
            })
            .collect()
    }

    #[test]
    fn without_extensions_the_packet_is_what_older_releases_send_and_decode() {
        let plain = encode(SECRET, &sample()).expect("encodes");
        let none =
            encode_with_extensions(SECRET, &sample(), &Extensions::default()).expect("encodes");
        assert_eq!(plain, none, "no record appended");
        let (decoded, extensions) = decode_with_extensions(SECRET, &plain).expect("decodes");
        assert_eq!(decoded, sample());
        assert_eq!(
            extensions.resources, None,
            "the peer's resources stay unknown"
        );
    }

    #[test]
    fn resources_travel_after_the_heartbeat_and_unknown_records_are_skipped() {
        let extensions = Extensions {
            resources: Some(resources(3)),
        };
        let packet = encode_with_extensions(SECRET, &sample(), &extensions).expect("encodes");
        let (decoded, received) = decode_with_extensions(SECRET, &packet).expect("decodes");
        assert_eq!(decoded, sample());
        assert_eq!(received, extensions);
        assert_eq!(decode(SECRET, &packet).expect("decodes"), sample());

        // A later release's record of an unknown kind is skipped.
        let mut body = postcard::to_allocvec(&sample()).expect("body");
        body.extend_from_slice(&[200, 3, 0, 1, 2, 3]);
        let packet = sign(&body);
        let (decoded, received) = decode_with_extensions(SECRET, &packet).expect("decodes");
        assert_eq!((decoded, received.resources), (sample(), None));

        // A record overrunning the body is refused.
        let mut body = postcard::to_allocvec(&sample()).expect("body");
        body.extend_from_slice(&[200, 9, 0, 1]);
        assert!(matches!(
            decode(SECRET, &sign(&body)),
            Err(HeartbeatError::Malformed(_))
        ));
    }

    #[test]
    fn resources_are_bounded_both_ways() {
        let too_many = Extensions {
            resources: Some(resources(MAX_RESOURCES + 1)),
        };
        assert!(matches!(
            encode_with_extensions(SECRET, &sample(), &too_many),
            Err(HeartbeatError::ResourcesOutOfBounds { count, .. }) if count == MAX_RESOURCES + 1
        ));
        let long_name = Extensions {
            resources: Some(vec![RemoteResource {
                name: "x".repeat(MAX_RESOURCE_NAME + 1),
                state: ResourceState::Up,
            }]),
        };
        assert!(encode_with_extensions(SECRET, &sample(), &long_name).is_err());
        // Forged by a sender that knows the secret: refused on decode too.
        let mut body = postcard::to_allocvec(&sample()).expect("body");
        let record = postcard::to_allocvec(&resources(MAX_RESOURCES + 1)).expect("record");
        body.push(EXT_RESOURCES);
        body.extend_from_slice(&(record.len() as u16).to_le_bytes());
        body.extend_from_slice(&record);
        assert!(matches!(
            decode(SECRET, &sign(&body)),
            Err(HeartbeatError::Malformed(_))
        ));
        // The most a heartbeat may carry fits one datagram.
        let full = Extensions {
            resources: Some(
                (0..MAX_RESOURCES)
                    .map(|index| RemoteResource {
                        name: format!("{index:0>width$}", width = 8),
                        state: ResourceState::Down,
                    })
                    .collect(),
            ),
        };
        let packet = encode_with_extensions(SECRET, &sample(), &full).expect("fits");
        assert!(packet.len() <= MAX_PACKET_LEN);
    }

    /// A packet with `body`, authenticated with [`SECRET`].
    fn sign(body: &[u8]) -> Vec<u8> {
        let mut packet = Vec::new();
        packet.extend_from_slice(&MAGIC);
        packet.push(HEARTBEAT_VERSION);
        packet.extend_from_slice(&(body.len() as u16).to_le_bytes());
        packet.extend_from_slice(body);
        let mut mac = new_mac(SECRET).expect("secret is not empty");
        mac.update(&packet);
        packet.extend_from_slice(&mac.finalize().into_bytes());
        packet
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
            let _ = decode(SECRET, &bytes);
        }

        #[test]
        fn decoding_mutated_packets_never_panics_and_never_accepts_a_change(
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let packet = encode(SECRET, &sample()).expect("encodes");
            let mut mutated = packet.clone();
            for (position, value) in edits {
                let index = position % mutated.len();
                mutated[index] = value;
            }
            mutated.truncate(cut % (packet.len() + 1));
            if let Ok(decoded) = decode(SECRET, &mutated) {
                prop_assert_eq!(&mutated, &packet);
                prop_assert_eq!(decoded, sample());
            }
        }

        #[test]
        fn authenticated_garbage_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1300)) {
            // A sender that knows the secret but sends a bad body must still not crash the receiver.
            let mut packet = Vec::new();
            packet.extend_from_slice(&MAGIC);
            packet.push(HEARTBEAT_VERSION);
            packet.extend_from_slice(&(body.len() as u16).to_le_bytes());
            packet.extend_from_slice(&body);
            let mut mac = new_mac(SECRET).expect("secret is not empty");
            mac.update(&packet);
            packet.extend_from_slice(&mac.finalize().into_bytes());
            let _ = decode(SECRET, &packet);
        }
    }
}
