//! The primary's end of the replication stream: ships operations, waits for acknowledgements, never hangs.
//!
//! [`Sender`] implements [`Replicator`]. A FUSE thread calling `replicate()`
//! encodes its operation outside any lock, then, under the state lock, takes
//! the next sequence number and queues the frame; a writer thread sends queued
//! frames in batches (many in flight), a reader thread takes cumulative
//! acknowledgements and wakes the waiters (one `Condvar`), a watchdog thread
//! declares the peer lost when acknowledgements stop, and a connection thread
//! (re)connects and authenticates while the role is `Replicating`.
//!
//! Bounds:
//! - Every wait in `replicate()` has a deadline of `replication_timeout` from
//!   the call; a waiter that reaches it either declares the peer lost (no
//!   acknowledgement progress for the timeout) or, if acknowledgements still
//!   flow, records its own file in the dirty log and returns `Alone` while the
//!   stream goes on.
//!   An operation that waited for room (below) until its deadline is not
//!   shipped at all; its files are in the dirty log, so later operations on
//!   them may fail on the peer (reported, recorded again) but nothing is lost
//!   for the resync.
//! - Unacknowledged bytes are bounded by `max_inflight_bytes`: a caller waits
//!   for room (within the same deadline), so a slow peer slows writers down
//!   instead of growing memory.
//!
//! Outcomes of `replicate()`:
//! - `Confirmed`: the peer acknowledged the operation (for `WaitFor::Durable`,
//!   an fsync of it too: a durable wait on anything but an `Fsync` ships an
//!   `Fsync` of the file, or of the parent directory for a change of names,
//!   right behind it and waits for that one);
//! - `Queued` (`WaitFor::Queued`): sequenced and queued, not waited for;
//! - `Alone`: the file is in the dirty log instead, because the sender is
//!   `Alone`, the peer was lost while waiting, the wait reached its deadline,
//!   or the peer reported that it could not apply the operation (`ApplyFailed`,
//!   also reported as [`ReplicationEvent::FileOutOfSync`]);
//! - `Off`: replication is switched off.
//!
//! See the transport module's durability contract for what each outcome means.
//!
//! Acknowledged, not yet durable: the peer acknowledges an operation once it
//! applied it, maybe only in its page cache, which a power loss of the peer
//! empties. The files of acknowledged operations are therefore remembered
//! until a durable barrier (`syncfs` on the peer) answered after them: the
//! watchdog asks for one every [`SenderConfig::durable_interval`] while such
//! files exist, and the resync's own durable barriers count too. When the
//! peer is lost, those files are recorded in the dirty log with the
//! unacknowledged ones, so the next resync compares them (before, they were
//! the activity log's known gap: a secondary that lost power could come
//! back without the last seconds of acknowledged writes, unnoticed).
//!
//! Resync requests ([`Sender::send_request`], [`Sender::wait_reply`]) are
//! queued in the same output queue as operations, so the receiver answers
//! each one after applying every operation queued before it. A request
//! outstanding when the connection ends fails with [`RequestFailed::Lost`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use safekit_protocol::auth::{self, Hello, PROTOCOL_VERSION, Proof};
use safekit_protocol::frame::{EncodedBody, FrameDecoder, HEADER_LEN, Message};
use safekit_protocol::replication::{Op, RelPath, rename_flags};
use safekit_protocol::resync::{ReplyBody, RequestBody, ResyncRequest};

use super::{TransportError, kind_name, random_nonce, receive, send};
use crate::dirty::{Change, DirtyLog, DirtyRecord, records_of};
use crate::replicator::{ReplicateOutcome, Replicator, WaitFor};

/// What the sender does with operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Primary with a peer: ship every operation and wait for its acknowledgement.
    Replicating,
    /// Primary without a peer: record every touched file in the dirty log, ship nothing.
    Alone,
    /// No replication at all (benchmarks, a module without a peer yet).
    Off,
}

/// Something the agent should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// A connection to the peer was authenticated.
    Connected {
        /// The peer's address.
        peer: SocketAddr,
    },
    /// The peer was declared lost; the sender is now `Alone` and unacknowledged files are in the dirty log.
    PeerLost {
        /// Why (timeout, connection error...).
        reason: String,
    },
    /// The peer could not apply an operation; the file is in the dirty log.
    FileOutOfSync {
        /// The replicated directory.
        dir: u16,
        /// The file.
        path: RelPath,
        /// The errno the peer got.
        errno: i32,
    },
}

/// Default of [`SenderConfig::durable_interval`].
pub const DURABLE_INTERVAL: Duration = Duration::from_secs(5);

/// Files acknowledged but not yet known durable on the peer, at most: past
/// that, they are recorded in the dirty log at once (a peer that never
/// answers durable barriers must not grow memory without bound).
const MAX_UNDURABLE_FILES: usize = 65_536;

/// Records kept per file acknowledged but not yet durable; more become one
/// whole-file record.
const MAX_UNDURABLE_RECORDS: usize = 16;

/// How to reach and authenticate the peer, and the bounds to keep.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The peer's replication address.
    pub peer: SocketAddr,
    /// The per-cluster secret.
    pub secret: Vec<u8>,
    /// The module name (part of the authentication).
    pub module: String,
    /// No acknowledgement progress for this long while operations are pending: the peer is lost.
    pub replication_timeout: Duration,
    /// Timeout of one connection attempt and of the handshake.
    pub connect_timeout: Duration,
    /// Pause between connection attempts.
    pub reconnect_interval: Duration,
    /// Bound of unacknowledged operation bytes.
    pub max_inflight_bytes: usize,
    /// Where touched files are recorded when they cannot be replicated.
    pub dirty_log: Arc<DirtyLog>,
    /// The role to start in.
    pub initial_role: Role,
    /// How often, while files acknowledged but maybe not yet on the peer's
    /// disk exist, a durable barrier asks the peer to flush them (see
    /// [`Sender`]'s "Acknowledged, not yet durable").
    pub durable_interval: Duration,
}

impl SenderConfig {
    /// A configuration with the default bounds (2 s timeout, 64 MiB in flight), starting `Replicating`.
    pub fn new(
        peer: SocketAddr,
        secret: impl Into<Vec<u8>>,
        module: impl Into<String>,
        dirty_log: Arc<DirtyLog>,
    ) -> Self {
        SenderConfig {
            peer,
            secret: secret.into(),
            module: module.into(),
            replication_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_millis(500),
            max_inflight_bytes: 64 * 1024 * 1024,
            dirty_log,
            initial_role: Role::Replicating,
            durable_interval: DURABLE_INTERVAL,
        }
    }
}

/// Counters of a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderStats {
    /// The current role.
    pub role: Role,
    /// Whether an authenticated connection is up.
    pub connected: bool,
    /// Operations shipped.
    pub ops: u64,
    /// Frame bytes shipped (headers and payloads).
    pub bytes: u64,
    /// Operations not yet acknowledged.
    pub in_flight_ops: usize,
    /// Bytes not yet acknowledged.
    pub in_flight_bytes: usize,
    /// Time between queuing and acknowledgement of the last acknowledged operation.
    pub last_ack_latency: Option<Duration>,
    /// Operations the peer could not apply.
    pub apply_errors: u64,
    /// Times the peer was declared lost.
    pub peer_losses: u64,
    /// Calls answered `Alone` after recording their files.
    pub recorded_alone: u64,
    /// Dirty-log writes that failed (each one logged at error).
    pub dirty_log_errors: u64,
    /// Files the peer acknowledged that no durable barrier covers yet: the
    /// ones recorded in the dirty log if the peer is lost now.
    pub undurable_files: usize,
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    touched: Vec<DirtyRecord>,
    bytes: usize,
    queued_at: Instant,
    has_waiter: bool,
}

/// A frame waiting for the writer thread. Its header (the payload's checksum,
/// computed when it was encoded, combined with the header's) is built by the
/// writer thread, outside the state lock that every replicating thread takes.
#[derive(Debug)]
struct OutFrame {
    seq: u64,
    body: EncodedBody,
}

#[derive(Debug)]
struct State {
    role: Role,
    next_seq: u64,
    acked_seq: u64,
    /// Sequence numbers below this that are not acknowledged were answered with `resolved_as`.
    resolved_below: u64,
    resolved_as: ReplicateOutcome,
    pending: VecDeque<Pending>,
    in_flight_bytes: usize,
    outq: VecDeque<OutFrame>,
    /// The current connection (a clone of its stream, to shut it down).
    connection: Option<TcpStream>,
    /// Incremented whenever a connection ends; threads of an older generation stop.
    generation: u64,
    failed_with_waiter: HashSet<u64>,
    last_ack_at: Instant,
    stats: SenderStats,
    /// Outstanding resync requests by id, with their reply once it arrived.
    requests: HashMap<u64, Option<ReplyBody>>,
    next_request_id: u64,
    /// Files whose operations the peer acknowledged (applied, maybe only in
    /// its page cache) since the last durable barrier it answered, with the
    /// last such operation's sequence number and their records.
    undurable: HashMap<(u16, RelPath), (u64, Vec<DirtyRecord>)>,
    /// The durable barrier the watchdog asked for them: `(request id,
    /// generation)`.
    durable_request: Option<(u64, u64)>,
    /// Every durable barrier outstanding (the resync's too), by request id:
    /// the sequence number below which its answer proves operations durable.
    durable_marks: HashMap<u64, u64>,
    last_durable_request: Instant,
}

/// An outstanding resync request (see [`Sender::send_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTicket {
    id: u64,
    generation: u64,
}

/// Why a resync request got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestFailed {
    /// The sender is not `Replicating`.
    #[error("the sender is not replicating")]
    NotReplicating,
    /// The connection ended before the answer came.
    #[error("the replication connection was lost")]
    Lost,
    /// No answer within the time given.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be encoded.
    #[error("cannot encode the request: {0}")]
    Encode(String),
}

#[derive(Debug)]
struct Shared {
    config: SenderConfig,
    state: Mutex<State>,
    /// Waiters of `replicate()` wait here (acknowledgements, role changes).
    changed: Condvar,
    /// Waiters of resync replies wait here (replies, role changes, connection
    /// loss): apart from `changed`, so that acknowledgements do not wake them.
    replied: Condvar,
    /// The watchdog and the connection thread wait here (role changes, connection loss, shutdown).
    control: Condvar,
    /// The writer waits here for frames.
    outq_ready: Condvar,
    subscribers: Mutex<Vec<mpsc::Sender<ReplicationEvent>>>,
    shutdown: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The replication sender of one module.
#[derive(Debug)]
pub struct Sender {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl Sender {
    /// Starts the connection and watchdog threads.
    ///
    /// # Errors
    /// A thread could not be spawned.
    pub fn new(config: SenderConfig) -> io::Result<Sender> {
        let role = config.initial_role;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                role,
                next_seq: 1,
                acked_seq: 0,
                resolved_below: 0,
                resolved_as: ReplicateOutcome::Alone,
                pending: VecDeque::new(),
                in_flight_bytes: 0,
                outq: VecDeque::new(),
                connection: None,
                generation: 0,
                failed_with_waiter: HashSet::new(),
                last_ack_at: Instant::now(),
                requests: HashMap::new(),
                next_request_id: 1,
                undurable: HashMap::new(),
                durable_request: None,
                durable_marks: HashMap::new(),
                last_durable_request: Instant::now(),
                stats: SenderStats {
                    role,
                    connected: false,
                    ops: 0,
                    bytes: 0,
                    in_flight_ops: 0,
                    in_flight_bytes: 0,
                    last_ack_latency: None,
                    apply_errors: 0,
                    peer_losses: 0,
                    recorded_alone: 0,
                    dirty_log_errors: 0,
                    undurable_files: 0,
                },
            }),
            config,
            changed: Condvar::new(),
            replied: Condvar::new(),
            control: Condvar::new(),
            outq_ready: Condvar::new(),
            subscribers: Mutex::new(Vec::new()),
            shutdown: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let connector = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("repl-connect".into())
                .spawn(move || connect_loop(&shared))?
        };
        let watchdog = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("repl-watchdog".into())
                .spawn(move || watchdog_loop(&shared))?
        };
        Ok(Sender {
            shared,
            threads: vec![connector, watchdog],
        })
    }

    /// A new channel of events from now on (events before the call are not replayed).
    pub fn subscribe(&self) -> mpsc::Receiver<ReplicationEvent> {
        let (tx, rx) = mpsc::channel();
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        rx
    }

    /// Switches role. Leaving `Replicating` records every unacknowledged file in the dirty
    /// log and answers their waiters (`Alone`, or `Off`); entering `Replicating` (after a
    /// resync) makes the connection thread connect.
    pub fn set_role(&self, role: Role) {
        let shared = &self.shared;
        let mut state = shared.lock();
        if state.role == role {
            return;
        }
        tracing::info!(from = ?state.role, to = ?role, reason = "set by the agent", "replication role changed");
        match role {
            Role::Replicating => {
                state.role = Role::Replicating;
                state.stats.role = Role::Replicating;
                state.failed_with_waiter.clear();
                state.last_ack_at = Instant::now();
            }
            Role::Alone | Role::Off if state.role == Role::Replicating => {
                shared.stop_replicating(&mut state, role, None);
            }
            Role::Alone | Role::Off => {
                state.role = role;
                state.stats.role = role;
            }
        }
        shared.changed.notify_all();
        shared.replied.notify_all();
        shared.control.notify_all();
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SenderStats {
        let state = self.shared.lock();
        let mut stats = state.stats;
        stats.in_flight_ops = state.pending.len();
        stats.in_flight_bytes = state.in_flight_bytes;
        stats.undurable_files = state.undurable.len();
        stats
    }

    /// The dirty log this sender records into.
    pub fn dirty_log(&self) -> &Arc<DirtyLog> {
        &self.shared.config.dirty_log
    }

    /// Queues a resync request behind every operation queued so far.
    ///
    /// # Errors
    /// [`RequestFailed::NotReplicating`] unless the role is `Replicating`.
    pub fn send_request(&self, body: RequestBody) -> Result<RequestTicket, RequestFailed> {
        let mut state = self.shared.lock();
        if state.role != Role::Replicating {
            return Err(RequestFailed::NotReplicating);
        }
        let id = self
            .shared
            .queue_request(&mut state, body)
            .map_err(|error| RequestFailed::Encode(error.to_string()))?;
        state.requests.insert(id, None);
        Ok(RequestTicket {
            id,
            generation: state.generation,
        })
    }

    /// Waits until the sender is connected to the peer, at most `timeout`;
    /// returns whether it is.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        self.wait_changed(timeout, |state| state.stats.connected.then_some(true))
    }

    /// Waits on the state's changes until `decide` has an answer, at most
    /// `timeout` (then `false`).
    fn wait_changed(&self, timeout: Duration, decide: impl Fn(&State) -> Option<bool>) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if let Some(answer) = decide(&state) {
                return answer;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The answer to a request if it has arrived, without waiting (`None`
    /// while it has not; the ticket stays valid).
    ///
    /// # Errors
    /// [`RequestFailed::Lost`] if the connection ended (or the role changed).
    pub fn try_reply(&self, ticket: &RequestTicket) -> Option<Result<ReplyBody, RequestFailed>> {
        let mut state = self.shared.lock();
        if state.generation != ticket.generation || state.role != Role::Replicating {
            state.requests.remove(&ticket.id);
            return Some(Err(RequestFailed::Lost));
        }
        match state.requests.get(&ticket.id) {
            None => Some(Err(RequestFailed::Lost)),
            Some(None) => None,
            Some(Some(_)) => state.requests.remove(&ticket.id).flatten().map(Ok),
        }
    }

    /// Waits for the answer to a request, at most `timeout`.
    ///
    /// # Errors
    /// [`RequestFailed::Lost`] if the connection ended (or the role changed)
    /// first, [`RequestFailed::Timeout`] after `timeout`.
    pub fn wait_reply(
        &self,
        ticket: RequestTicket,
        timeout: Duration,
    ) -> Result<ReplyBody, RequestFailed> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.generation != ticket.generation || state.role != Role::Replicating {
                state.requests.remove(&ticket.id);
                return Err(RequestFailed::Lost);
            }
            match state.requests.get(&ticket.id) {
                None => return Err(RequestFailed::Lost),
                Some(Some(_)) => {
                    let reply = state
                        .requests
                        .remove(&ticket.id)
                        .flatten()
                        .expect("the reply is there");
                    return Ok(reply);
                }
                Some(None) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                state.requests.remove(&ticket.id);
                return Err(RequestFailed::Timeout(timeout));
            }
            state = self
                .shared
                .replied
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until `bytes` more would keep the unacknowledged bytes within
    /// `limit`, or the role is no longer `Replicating`, at most `timeout`;
    /// returns whether there is room. Lets a background sender (the resync)
    /// leave the rest of the window to live operations.
    pub fn wait_for_room(&self, bytes: usize, limit: usize, timeout: Duration) -> bool {
        self.wait_changed(timeout, |state| {
            if state.role != Role::Replicating {
                Some(false)
            } else {
                (state.pending.is_empty() || state.in_flight_bytes + bytes <= limit).then_some(true)
            }
        })
    }

    /// Where the stream is: `(issued, settled)`. Every operation with a
    /// sequence number below `issued` has been queued; every one below
    /// `settled` is acknowledged by the peer or recorded durably in the dirty
    /// log. While `Alone` or `Off`, no sequence numbers are issued and
    /// `settled == issued`.
    pub fn stream_position(&self) -> (u64, u64) {
        let state = self.shared.lock();
        let settled = (state.acked_seq + 1).max(state.resolved_below);
        (state.next_seq, settled.min(state.next_seq))
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let mut state = self.shared.lock();
            if let Some(stream) = state.connection.take() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            state.generation += 1;
            state.resolved_below = state.next_seq;
        }
        self.shared.changed.notify_all();
        self.shared.replied.notify_all();
        self.shared.control.notify_all();
        self.shared.outq_ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// The records of an operation made while alone: as [`records_of`], except
/// that an fsync of a file already recorded adds nothing (with no peer, its
/// only concern is changes the dirty log already names).
fn alone_records(op: &Op) -> Vec<DirtyRecord> {
    match op {
        // Nothing new to compare: the writes it makes durable were recorded
        // (while alone) or are durable on the peer, or were recorded when the
        // peer was lost (acknowledged, not yet durable: see the module doc).
        Op::Fsync { .. } => Vec::new(),
        // The rename's history, which the resync replays on the replica (an
        // exchange is recorded as two names compared whole).
        Op::Rename {
            dir,
            from,
            to,
            flags,
        } if flags & rename_flags::EXCHANGE == 0 => vec![
            DirtyRecord {
                dir: *dir,
                path: from.clone(),
                change: Change::RenameSource,
            },
            DirtyRecord {
                dir: *dir,
                path: to.clone(),
                change: Change::RenameTarget,
            },
        ],
        _ => records_of(op),
    }
}

impl Replicator for Sender {
    fn replicate(&self, op: Op, wait_for: WaitFor) -> ReplicateOutcome {
        let shared = &self.shared;
        let deadline = Instant::now() + shared.config.replication_timeout;
        // Cheap exits before any encoding.
        let role = shared.lock().role;
        match role {
            Role::Off => return ReplicateOutcome::Off,
            Role::Alone => {
                return shared.record_alone(&alone_records(&op));
            }
            Role::Replicating => {}
        }
        let touched = records_of(&op);
        // A rename of a name the dirty log holds (a change the peer has not got
        // yet: the resync after a reconnection has not run or not finished)
        // moves the peer's stale copy to the new name, which nothing recorded:
        // record both names before the rename ships, so the resync compares them.
        if let Op::Rename { dir, from, to, .. } = &op {
            let dirty_log = &shared.config.dirty_log;
            if (dirty_log.contains_at_or_under(*dir, from)
                || dirty_log.contains_at_or_under(*dir, to))
                && let Err(error) = dirty_log.record_changes(&touched)
            {
                tracing::error!(%error, ?from, ?to, "cannot record a rename of a recorded name; recording it as unconfirmed");
                return shared.record_alone(&touched);
            }
        }
        // A durable wait for anything but an fsync (an O_SYNC write, say) ships an fsync
        // right behind it and waits for that one.
        let durability = (wait_for == WaitFor::Durable && !op.is_fsync())
            .then(|| durability_op(&op))
            .flatten();
        let mut bodies = Vec::with_capacity(2);
        for message in std::iter::once(op).chain(durability).map(Message::Op) {
            match EncodedBody::new(&message) {
                Ok(body) => bodies.push(body),
                Err(error) => {
                    tracing::error!(%error, "cannot encode an operation; recording its file instead");
                    return shared.record_alone(&touched);
                }
            }
        }
        let bytes: usize = bodies
            .iter()
            .map(|body| HEADER_LEN + body.payload_len())
            .sum();
        let mut state = shared.lock();
        // Backpressure: wait for room, within the deadline.
        while state.role == Role::Replicating
            && !state.pending.is_empty()
            && state.in_flight_bytes + bytes > shared.config.max_inflight_bytes
        {
            let now = Instant::now();
            if now >= deadline {
                return shared.deadline_passed(state, now, &touched, &[]);
            }
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        match state.role {
            Role::Off => return ReplicateOutcome::Off,
            Role::Alone => {
                drop(state);
                return shared.record_alone(&touched);
            }
            Role::Replicating => {}
        }
        let mut seqs = Vec::with_capacity(bodies.len());
        for body in bodies {
            let seq = state.next_seq;
            state.next_seq += 1;
            let frame_bytes = HEADER_LEN + body.payload_len();
            state.outq.push_back(OutFrame { seq, body });
            state.pending.push_back(Pending {
                seq,
                touched: touched.clone(),
                bytes: frame_bytes,
                queued_at: Instant::now(),
                has_waiter: wait_for != WaitFor::Queued,
            });
            state.in_flight_bytes += frame_bytes;
            state.stats.ops += 1;
            state.stats.bytes += frame_bytes as u64;
            seqs.push(seq);
        }
        shared.outq_ready.notify_one();
        if wait_for == WaitFor::Queued {
            return ReplicateOutcome::Queued;
        }
        let last_seq = *seqs.last().expect("at least the operation itself");
        loop {
            if state.acked_seq >= last_seq {
                let mut failed = false;
                for seq in &seqs {
                    failed |= state.failed_with_waiter.remove(seq);
                }
                return if failed {
                    ReplicateOutcome::Alone
                } else {
                    ReplicateOutcome::Confirmed
                };
            }
            if last_seq < state.resolved_below {
                return state.resolved_as;
            }
            let now = Instant::now();
            if now >= deadline {
                return shared.deadline_passed(state, now, &touched, &seqs);
            }
            state = shared
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// The fsync that makes `op` durable on the peer: the file itself for data and
/// metadata changes, the parent directory for a change of names only.
fn durability_op(op: &Op) -> Option<Op> {
    let dir = op.dir();
    let parent_of = |path: &RelPath| path.split_last().map(|(parent, _)| parent);
    let (path, datasync) = match op {
        Op::Write { path, .. } | Op::Fallocate { path, .. } => (path.clone(), true),
        Op::Create { path, .. }
        | Op::Mkdir { path, .. }
        | Op::Truncate { path, .. }
        | Op::SetAttr { path, .. }
        | Op::SetXattr { path, .. }
        | Op::RemoveXattr { path, .. } => (path.clone(), false),
        Op::Mknod { path, .. }
        | Op::Symlink { path, .. }
        | Op::Unlink { path, .. }
        | Op::Rmdir { path, .. } => (parent_of(path)?, false),
        Op::Link { new, .. } => (parent_of(new)?, false),
        Op::Rename { to, .. } => (parent_of(to)?, false),
        Op::Fsync { .. } => return None,
    };
    Some(Op::Fsync {
        dir,
        path,
        datasync,
    })
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: ReplicationEvent) {
        let mut subscribers = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        subscribers.retain(|subscriber| subscriber.send(event.clone()).is_ok());
    }

    /// Records files durably and answers `Alone` (the caller holds no lock).
    fn record_alone(&self, touched: &[DirtyRecord]) -> ReplicateOutcome {
        let result = self.config.dirty_log.record_changes(touched);
        let mut state = self.lock();
        state.stats.recorded_alone += 1;
        if let Err(error) = result {
            state.stats.dirty_log_errors += 1;
            tracing::error!(%error, "cannot record touched files in the dirty log");
        }
        ReplicateOutcome::Alone
    }

    /// A waiter reached its deadline: lose the peer if acknowledgements stalled, else
    /// record just this waiter's files and let it go.
    fn deadline_passed(
        &self,
        mut state: MutexGuard<'_, State>,
        now: Instant,
        touched: &[DirtyRecord],
        seqs: &[u64],
    ) -> ReplicateOutcome {
        if state.role == Role::Replicating && self.stalled(&state, now) {
            let reason = format!(
                "no acknowledgement for {:?}",
                self.config.replication_timeout
            );
            self.stop_replicating(&mut state, Role::Alone, Some(reason));
            return ReplicateOutcome::Alone;
        }
        if state.role == Role::Off {
            return ReplicateOutcome::Off;
        }
        // Nobody waits for these any more: a later failure report needs no waiter's answer.
        for pending in state.pending.iter_mut().filter(|p| seqs.contains(&p.seq)) {
            pending.has_waiter = false;
        }
        drop(state);
        tracing::warn!(
            "peer acknowledges too slowly for the replication timeout; file recorded as dirty"
        );
        self.record_alone(touched)
    }

    /// No acknowledgement progress for the timeout while operations are pending.
    fn stalled(&self, state: &State, now: Instant) -> bool {
        state.pending.front().is_some_and(|oldest| {
            let since = oldest.queued_at.max(state.last_ack_at);
            now.duration_since(since) >= self.config.replication_timeout
        })
    }

    /// Leaves `Replicating`: records every unacknowledged file durably, then answers all
    /// waiters, closes the connection and (with a reason) reports `PeerLost`.
    fn stop_replicating(&self, state: &mut State, role: Role, lost_reason: Option<String>) {
        if state.role != Role::Replicating {
            return;
        }
        // Unacknowledged operations, and acknowledged ones the peer may not
        // have on disk yet (a peer that lost power lost them).
        let touched: Vec<DirtyRecord> = state
            .pending
            .iter()
            .flat_map(|p| p.touched.iter().cloned())
            .chain(
                std::mem::take(&mut state.undurable)
                    .into_values()
                    .flat_map(|(_, records)| records),
            )
            .collect();
        state.durable_request = None;
        state.durable_marks.clear();
        if let Err(error) = self.config.dirty_log.record_changes(&touched) {
            state.stats.dirty_log_errors += 1;
            tracing::error!(%error, files = touched.len(), "cannot record unacknowledged files in the dirty log");
        }
        state.role = role;
        state.stats.role = role;
        state.resolved_below = state.next_seq;
        state.resolved_as = if role == Role::Off {
            ReplicateOutcome::Off
        } else {
            ReplicateOutcome::Alone
        };
        state.pending.clear();
        state.outq.clear();
        state.in_flight_bytes = 0;
        state.failed_with_waiter.clear();
        state.requests.clear();
        if let Some(stream) = state.connection.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        state.stats.connected = false;
        state.generation += 1;
        self.changed.notify_all();
        self.replied.notify_all();
        self.control.notify_all();
        self.outq_ready.notify_all();
        if let Some(reason) = lost_reason {
            state.stats.peer_losses += 1;
            tracing::warn!(peer = %self.config.peer, %reason, files = touched.len(), from = "Replicating", to = "Alone", "replication peer lost");
            self.emit(ReplicationEvent::PeerLost { reason });
        }
    }

    /// Asks the peer for a durable barrier when files acknowledged since the
    /// last one exist and `durable_interval` passed (one outstanding at a
    /// time; its answer drops them from `undurable`).
    fn request_durability(&self, state: &mut State, now: Instant) {
        if state.role != Role::Replicating
            || state.connection.is_none()
            || state.undurable.is_empty()
            || now.duration_since(state.last_durable_request) < self.config.durable_interval
        {
            return;
        }
        if let Some((_, generation)) = state.durable_request
            && generation == state.generation
        {
            return;
        }
        let Ok(id) = self.queue_request(state, RequestBody::Barrier { durable: true }) else {
            return;
        };
        state.durable_request = Some((id, state.generation));
        state.last_durable_request = now;
    }

    /// Queues request `body` behind every operation queued so far and
    /// returns its id; a durable barrier's id is remembered with the
    /// operations its answer proves durable.
    fn queue_request(
        &self,
        state: &mut State,
        body: RequestBody,
    ) -> Result<u64, safekit_protocol::frame::EncodeError> {
        let id = state.next_request_id;
        let durable = body == (RequestBody::Barrier { durable: true });
        let encoded = EncodedBody::new(&Message::ResyncRequest(ResyncRequest { id, body }))?;
        state.next_request_id += 1;
        if durable {
            let mark = state.next_seq;
            state.durable_marks.insert(id, mark);
        }
        state.outq.push_back(OutFrame {
            seq: 0,
            body: encoded,
        });
        self.outq_ready.notify_one();
        Ok(id)
    }

    /// Records the files awaiting a durable barrier in the dirty log now
    /// (the next resync compares them) and forgets them.
    fn record_undurable(&self, state: &mut State, why: &str) {
        let records: Vec<DirtyRecord> = std::mem::take(&mut state.undurable)
            .into_values()
            .flat_map(|(_, records)| records)
            .collect();
        tracing::warn!(
            files = records.len(),
            why,
            "recording files not yet known durable on the peer in the dirty log"
        );
        if let Err(error) = self.config.dirty_log.record_changes(&records) {
            state.stats.dirty_log_errors += 1;
            tracing::error!(%error, "cannot record files not yet durable on the peer in the dirty log");
        }
    }

    /// The connection of `generation` failed.
    fn connection_failed(&self, generation: u64, reason: String) {
        let mut state = self.lock();
        if state.generation == generation {
            self.stop_replicating(&mut state, Role::Alone, Some(reason));
        }
    }
}

/// Remembers the records of an operation the peer acknowledged, until a
/// durable barrier covers it.
fn note_undurable(state: &mut State, seq: u64, touched: Vec<DirtyRecord>) {
    for record in touched {
        let entry = state
            .undurable
            .entry((record.dir, record.path.clone()))
            .or_insert_with(|| (seq, Vec::new()));
        entry.0 = seq;
        let whole = entry.1.first().is_some_and(|r| r.change == Change::Whole);
        if whole || entry.1.contains(&record) {
            continue;
        }
        if entry.1.len() < MAX_UNDURABLE_RECORDS {
            entry.1.push(record);
        } else {
            entry.1 = vec![DirtyRecord {
                change: Change::Whole,
                ..record
            }];
        }
    }
}

fn watchdog_loop(shared: &Arc<Shared>) {
    let period = (shared.config.replication_timeout / 4).max(Duration::from_millis(5));
    let mut state = shared.lock();
    while !shared.shutdown.load(Ordering::SeqCst) {
        let now = Instant::now();
        if state.role == Role::Replicating && shared.stalled(&state, now) {
            let reason = format!(
                "no acknowledgement for {:?}",
                shared.config.replication_timeout
            );
            shared.stop_replicating(&mut state, Role::Alone, Some(reason));
        }
        shared.request_durability(&mut state, now);
        state = shared
            .control
            .wait_timeout(state, period)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

fn connect_loop(shared: &Arc<Shared>) {
    let mut logged_failure = false;
    loop {
        {
            let mut state = shared.lock();
            while !(shared.shutdown.load(Ordering::SeqCst)
                || (state.role == Role::Replicating && state.connection.is_none()))
            {
                state = shared
                    .control
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if shared.shutdown.load(Ordering::SeqCst) {
                return;
            }
        }
        match connect(&shared.config) {
            Ok((stream, decoder)) => {
                logged_failure = false;
                if let Err(error) = start_connection(shared, stream, decoder) {
                    tracing::warn!(%error, "cannot start the replication connection threads");
                }
            }
            Err(error) => {
                if logged_failure {
                    tracing::debug!(peer = %shared.config.peer, %error, "replication connection failed");
                } else {
                    tracing::warn!(peer = %shared.config.peer, %error, "replication connection failed");
                    logged_failure = true;
                }
                let state = shared.lock();
                let _ = shared.control.wait_timeout_while(
                    state,
                    shared.config.reconnect_interval,
                    |_| !shared.shutdown.load(Ordering::SeqCst),
                );
            }
        }
    }
}

/// Connects and authenticates (client side of the handshake).
fn connect(config: &SenderConfig) -> Result<(TcpStream, FrameDecoder), TransportError> {
    let mut stream = TcpStream::connect_timeout(&config.peer, config.connect_timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(config.connect_timeout))?;
    stream.set_write_timeout(Some(config.connect_timeout))?;
    let mut decoder = FrameDecoder::new();
    let client_nonce = random_nonce()?;
    let hello = Hello {
        module: config.module.clone(),
        version: PROTOCOL_VERSION,
        client_nonce,
    };
    send(&mut stream, 0, &Message::Hello(hello))?;
    let challenge = match receive(&mut stream, &mut decoder)?.message {
        Message::Challenge(challenge) => challenge,
        Message::Refused(refused) => {
            return Err(TransportError::Auth(format!("refused: {}", refused.reason)));
        }
        other => return Err(TransportError::Unexpected(kind_name(&other))),
    };
    auth::verify_server_proof(
        &config.secret,
        &config.module,
        &client_nonce,
        &challenge.server_nonce,
        &challenge.server_proof,
    )
    .map_err(|error| {
        TransportError::Auth(format!("the receiver did not prove the secret: {error}"))
    })?;
    let client_proof = auth::client_proof(
        &config.secret,
        &config.module,
        &client_nonce,
        &challenge.server_nonce,
    )
    .map_err(|error| TransportError::Auth(error.to_string()))?;
    send(&mut stream, 0, &Message::Proof(Proof { client_proof }))?;
    match receive(&mut stream, &mut decoder)?.message {
        Message::Welcome => {}
        Message::Refused(refused) => {
            return Err(TransportError::Auth(format!("refused: {}", refused.reason)));
        }
        other => return Err(TransportError::Unexpected(kind_name(&other))),
    }
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok((stream, decoder))
}

fn start_connection(
    shared: &Arc<Shared>,
    stream: TcpStream,
    decoder: FrameDecoder,
) -> io::Result<()> {
    let read_stream = stream.try_clone()?;
    let write_stream = stream.try_clone()?;
    let generation = {
        let mut state = shared.lock();
        if state.role != Role::Replicating || shared.shutdown.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        state.connection = Some(stream);
        state.stats.connected = true;
        state.last_ack_at = Instant::now();
        shared.changed.notify_all();
        state.generation
    };
    tracing::info!(peer = %shared.config.peer, "replication connected");
    shared.emit(ReplicationEvent::Connected {
        peer: shared.config.peer,
    });
    let reader = {
        let shared = Arc::clone(shared);
        std::thread::Builder::new()
            .name("repl-read".into())
            .spawn(move || reader_loop(&shared, read_stream, decoder, generation))
    };
    let writer = {
        let shared = Arc::clone(shared);
        std::thread::Builder::new()
            .name("repl-write".into())
            .spawn(move || writer_loop(&shared, write_stream, generation))
    };
    let mut threads = shared
        .threads
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    threads.retain(|thread| !thread.is_finished());
    for thread in [reader, writer] {
        match thread {
            Ok(thread) => threads.push(thread),
            Err(error) => {
                drop(threads);
                shared.connection_failed(
                    generation,
                    format!("cannot spawn a connection thread: {error}"),
                );
                return Err(error);
            }
        }
    }
    Ok(())
}

fn writer_loop(shared: &Shared, stream: TcpStream, generation: u64) {
    let mut writer = BufWriter::with_capacity(256 * 1024, stream);
    loop {
        let batch: Vec<OutFrame> = {
            let mut state = shared.lock();
            while state.outq.is_empty() && state.generation == generation {
                state = shared
                    .outq_ready
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if state.generation != generation {
                return;
            }
            state.outq.drain(..).collect()
        };
        let written = batch
            .iter()
            .try_for_each(|frame| {
                writer.write_all(&frame.body.header(frame.seq))?;
                writer.write_all(frame.body.payload())
            })
            .and_then(|()| writer.flush());
        if let Err(error) = written {
            shared.connection_failed(generation, format!("write to the peer failed: {error}"));
            return;
        }
    }
}

fn reader_loop(shared: &Shared, mut stream: TcpStream, mut decoder: FrameDecoder, generation: u64) {
    let mut buf = vec![0u8; 64 * 1024];
    let reason = loop {
        let frame = match decoder.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                match stream.read(&mut buf) {
                    Ok(0) => break "the peer closed the connection".to_owned(),
                    Ok(n) => decoder.push(&buf[..n]),
                    Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                    Err(error) => break format!("read from the peer failed: {error}"),
                }
                continue;
            }
            Err(error) => break format!("corrupt frame from the peer: {error}"),
        };
        match frame.message {
            Message::Ack(ack) => {
                let mut state = shared.lock();
                if state.generation != generation {
                    return;
                }
                if ack.seq >= state.next_seq {
                    break format!("acknowledgement of {} which was never sent", ack.seq);
                }
                if ack.seq > state.acked_seq {
                    let now = Instant::now();
                    state.acked_seq = ack.seq;
                    state.last_ack_at = now;
                    while state.pending.front().is_some_and(|p| p.seq <= ack.seq) {
                        let done = state.pending.pop_front().expect("front exists");
                        state.in_flight_bytes -= done.bytes;
                        state.stats.last_ack_latency = Some(now.duration_since(done.queued_at));
                        note_undurable(&mut state, done.seq, done.touched);
                    }
                    if state.undurable.len() > MAX_UNDURABLE_FILES {
                        shared.record_undurable(
                            &mut state,
                            "too many files awaiting a durable barrier",
                        );
                    }
                    shared.changed.notify_all();
                }
            }
            Message::ApplyFailed(failed) => {
                let pending = {
                    let state = shared.lock();
                    if state.generation != generation {
                        return;
                    }
                    state
                        .pending
                        .iter()
                        .find(|p| p.seq == failed.seq)
                        .map(|p| p.touched.clone())
                };
                // The failed operation's own records (a write's range) when it is
                // known; its whole file otherwise.
                let touched = match pending {
                    Some(records)
                        if records
                            .iter()
                            .any(|r| r.dir == failed.dir && r.path == failed.path) =>
                    {
                        records
                    }
                    other => {
                        let mut records = other.unwrap_or_default();
                        records.push(DirtyRecord {
                            dir: failed.dir,
                            path: failed.path.clone(),
                            change: Change::Whole,
                        });
                        records
                    }
                };
                // Durable before the Ack that follows is processed (this thread reads it next).
                let recorded = shared.config.dirty_log.record_changes(&touched);
                let mut state = shared.lock();
                state.stats.apply_errors += 1;
                if let Err(error) = recorded {
                    state.stats.dirty_log_errors += 1;
                    tracing::error!(%error, "cannot record an out-of-sync file in the dirty log");
                }
                if state
                    .pending
                    .iter()
                    .any(|p| p.seq == failed.seq && p.has_waiter)
                {
                    state.failed_with_waiter.insert(failed.seq);
                }
                drop(state);
                tracing::warn!(
                    seq = failed.seq,
                    dir = failed.dir,
                    path = %String::from_utf8_lossy(&failed.path.to_bytes()),
                    errno = failed.errno,
                    "the peer could not apply an operation; file out of sync"
                );
                shared.emit(ReplicationEvent::FileOutOfSync {
                    dir: failed.dir,
                    path: failed.path,
                    errno: failed.errno,
                });
            }
            Message::Ping => {
                // Only the writer thread writes to the socket: queue the answer.
                let body = EncodedBody::new(&Message::Pong).expect("an empty body always encodes");
                let mut state = shared.lock();
                if state.generation != generation {
                    return;
                }
                state.outq.push_back(OutFrame { seq: 0, body });
                shared.outq_ready.notify_one();
            }
            Message::ResyncReply(reply) => {
                let mut state = shared.lock();
                if state.generation != generation {
                    return;
                }
                if let Some(covered) = state.durable_marks.remove(&reply.id)
                    && reply.body == ReplyBody::Barrier
                {
                    state
                        .undurable
                        .retain(|_, (last_seq, _)| *last_seq >= covered);
                }
                if state.durable_request.is_some_and(|(id, _)| id == reply.id) {
                    state.durable_request = None;
                    continue;
                }
                match state.requests.get_mut(&reply.id) {
                    Some(slot @ None) => {
                        *slot = Some(reply.body);
                        shared.replied.notify_all();
                    }
                    // A request whose waiter gave up (timeout): drop the late answer.
                    _ => tracing::debug!(id = reply.id, "resync reply nobody waits for"),
                }
            }
            Message::Pong => {}
            Message::Bye => break "the peer said goodbye".to_owned(),
            other => break format!("unexpected {} message from the peer", kind_name(&other)),
        }
    };
    shared.connection_failed(generation, reason);
}
