//! Generation histories: the persisted facts that say which node holds the newer data.
//!
//! A node starts a new *generation* (a random id drawn by the caller) whenever
//! it starts running the application without its peer (ALONE). While the pair
//! is PRIM/SECOND in sync both nodes hold the same history: the secondary adopts
//! the primary's history when its resynchronization completes. Comparing two
//! histories therefore says, without any clock, whether one node is ahead of
//! the other (its history extends the other's), whether both ran alone since
//! they last shared a generation (split brain), or whether they never shared
//! one (full resynchronization).
//!
//! Histories are bounded ([`MAX_GENERATIONS`], oldest dropped first). Losing
//! old entries can only turn a verdict into [`Verdict::Unrelated`], which asks
//! for a full resynchronization: the safe side.
//!
//! # Split-brain rule
//!
//! When both sides created generations since their last common one
//! ([`Verdict::Diverged`]), [`split_brain_winner`] decides from the first
//! generation each side created after the common one:
//! 1. a side that was PRIM and kept running when it lost its peer
//!    ([`Origin::ContinuedPrimary`]) beats a side that took over
//!    ([`Origin::Takeover`]), which beats a side that was started alone
//!    ([`Origin::Start`], [`Origin::Forced`]): the former primary kept the
//!    clients that were connected, as SafeKit sacrifices the former SECOND;
//! 2. on a tie, the node whose name sorts first (byte order) wins.
//!
//! Both inputs are persisted facts exchanged in heartbeats, so both nodes reach
//! the same answer independently. The loser keeps its diverged files aside
//! before it resynchronizes: nothing is silently dropped.

use serde::{Deserialize, Serialize};

use safekit_protocol::heartbeat::{GenerationEntry, GenerationOrigin};

pub use safekit_protocol::heartbeat::MAX_GENERATIONS;

/// Identifier of one generation: random, drawn by the node that created it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GenerationId(pub u64);

impl std::fmt::Display for GenerationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How a generation was created; see the module's split-brain rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Origin {
    /// `start` on an up-to-date node whose peer was absent.
    Start,
    /// `prim`: forced by the operator.
    Forced,
    /// A SECOND in sync took over (peer lost or stopped).
    Takeover,
    /// A PRIM lost its peer (or replication) and kept running.
    ContinuedPrimary,
}

impl Origin {
    /// Rank used by the split-brain rule: higher wins.
    fn rank(self) -> u8 {
        match self {
            Origin::Start | Origin::Forced => 0,
            Origin::Takeover => 1,
            Origin::ContinuedPrimary => 2,
        }
    }

    fn to_wire(self) -> GenerationOrigin {
        match self {
            Origin::Start => GenerationOrigin::Start,
            Origin::Forced => GenerationOrigin::Forced,
            Origin::Takeover => GenerationOrigin::Takeover,
            Origin::ContinuedPrimary => GenerationOrigin::ContinuedPrimary,
        }
    }

    fn from_wire(origin: GenerationOrigin) -> Self {
        match origin {
            GenerationOrigin::Start => Origin::Start,
            GenerationOrigin::Forced => Origin::Forced,
            GenerationOrigin::Takeover => Origin::Takeover,
            GenerationOrigin::ContinuedPrimary => Origin::ContinuedPrimary,
        }
    }
}

/// One generation of a history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Generation {
    /// Its random id.
    pub id: GenerationId,
    /// How it was created.
    pub origin: Origin,
}

/// A node's generation history, oldest first; the last one is the current generation.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct History {
    generations: Vec<Generation>,
}

impl History {
    /// An empty history (a freshly installed node: shares nothing with anyone).
    pub fn new() -> Self {
        Self::default()
    }

    /// A history from its generations, oldest first (only the newest [`MAX_GENERATIONS`] are kept).
    pub fn from_generations(generations: Vec<Generation>) -> Self {
        let mut history = History { generations };
        history.trim();
        history
    }

    /// The generations, oldest first.
    pub fn generations(&self) -> &[Generation] {
        &self.generations
    }

    /// The current (newest) generation, if any.
    pub fn current(&self) -> Option<Generation> {
        self.generations.last().copied()
    }

    /// Whether `id` is in this history.
    pub fn contains(&self, id: GenerationId) -> bool {
        self.generations
            .iter()
            .any(|generation| generation.id == id)
    }

    /// Starts a new generation (the node runs the application without its peer).
    pub fn push(&mut self, generation: Generation) {
        self.generations.push(generation);
        self.trim();
    }

    fn trim(&mut self) {
        if self.generations.len() > MAX_GENERATIONS {
            let excess = self.generations.len() - MAX_GENERATIONS;
            self.generations.drain(..excess);
        }
    }

    /// The history as heartbeats carry it.
    pub fn to_wire(&self) -> Vec<GenerationEntry> {
        self.generations
            .iter()
            .map(|generation| GenerationEntry {
                id: generation.id.0,
                origin: generation.origin.to_wire(),
            })
            .collect()
    }

    /// A peer's history from a heartbeat.
    pub fn from_wire(entries: &[GenerationEntry]) -> Self {
        History::from_generations(
            entries
                .iter()
                .map(|entry| Generation {
                    id: GenerationId(entry.id),
                    origin: Origin::from_wire(entry.origin),
                })
                .collect(),
        )
    }
}

/// The result of comparing the local history with the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both histories end in the same generation.
    Equal {
        /// That generation.
        current: GenerationId,
    },
    /// The local history extends the remote one: the peer resyncs from `since`.
    LocalAhead {
        /// The remote's current generation, found in the local history.
        since: GenerationId,
    },
    /// The remote history extends the local one: this node resyncs from `since`.
    RemoteAhead {
        /// The local current generation, found in the remote history.
        since: GenerationId,
    },
    /// Both created generations since `common`: split brain.
    Diverged {
        /// The newest generation both share.
        common: GenerationId,
        /// The first local generation after `common`.
        local_first: Generation,
        /// The first remote generation after `common`.
        remote_first: Generation,
    },
    /// No common generation (fresh node, or history lost): full resync needed.
    Unrelated,
}

impl Verdict {
    /// The same verdict seen from the other side.
    pub fn mirrored(self) -> Verdict {
        match self {
            Verdict::Equal { current } => Verdict::Equal { current },
            Verdict::LocalAhead { since } => Verdict::RemoteAhead { since },
            Verdict::RemoteAhead { since } => Verdict::LocalAhead { since },
            Verdict::Diverged {
                common,
                local_first,
                remote_first,
            } => Verdict::Diverged {
                common,
                local_first: remote_first,
                remote_first: local_first,
            },
            Verdict::Unrelated => Verdict::Unrelated,
        }
    }
}

/// Compares two histories; see [`Verdict`].
pub fn compare(local: &History, remote: &History) -> Verdict {
    let (Some(local_current), Some(remote_current)) = (local.current(), remote.current()) else {
        return Verdict::Unrelated;
    };
    if local_current.id == remote_current.id {
        return Verdict::Equal {
            current: local_current.id,
        };
    }
    if remote.contains(local_current.id) {
        return Verdict::RemoteAhead {
            since: local_current.id,
        };
    }
    if local.contains(remote_current.id) {
        return Verdict::LocalAhead {
            since: remote_current.id,
        };
    }
    // Newest local generation that the remote also has.
    let local_gens = local.generations();
    for (index, generation) in local_gens.iter().enumerate().rev() {
        if let Some(remote_index) = remote
            .generations()
            .iter()
            .position(|g| g.id == generation.id)
        {
            // Both currents differ from the common one (checked above), so both
            // histories have an entry after it.
            let (Some(local_first), Some(remote_first)) = (
                local_gens.get(index + 1),
                remote.generations().get(remote_index + 1),
            ) else {
                return Verdict::Unrelated;
            };
            return Verdict::Diverged {
                common: generation.id,
                local_first: *local_first,
                remote_first: *remote_first,
            };
        }
    }
    Verdict::Unrelated
}

/// Which side of a split brain keeps running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// This node.
    Local,
    /// The peer.
    Remote,
}

/// Applies the split-brain rule (module docs) to the first diverged generation of each side.
pub fn split_brain_winner(
    local_first: Origin,
    remote_first: Origin,
    local_node: &str,
    remote_node: &str,
) -> Side {
    match local_first.rank().cmp(&remote_first.rank()) {
        std::cmp::Ordering::Greater => Side::Local,
        std::cmp::Ordering::Less => Side::Remote,
        std::cmp::Ordering::Equal => {
            if local_node.as_bytes() <= remote_node.as_bytes() {
                Side::Local
            } else {
                Side::Remote
            }
        }
    }
}

/// Which resynchronization a SECOND runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResyncKind {
    /// Copy what changed on the primary since the generation both nodes last shared.
    Incremental {
        /// The last shared generation.
        since: GenerationId,
    },
    /// Copy everything.
    Full,
}

/// What a node persists for the cluster logic (the caller writes it atomically).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Persistent {
    /// The generation history.
    pub history: History,
    /// This node was the last to run the application as far as it knows.
    pub up_to_date: bool,
    /// A resynchronization was started and not completed (it was interrupted if
    /// this is set when the agent starts).
    pub resync_in_progress: Option<ResyncKind>,
    /// The newest generation this node knows it shared with its peer.
    pub last_shared: Option<GenerationId>,
    /// The application ran here the last time this was written (`defaultprim="lastprim"`).
    pub was_primary: bool,
}

/// Why persisted bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistentDecodeError {
    /// Not a state file of this format.
    #[error("cluster state file has a bad magic or version")]
    BadHeader,
    /// Cut short.
    #[error("cluster state file is truncated")]
    Truncated,
    /// An impossible value.
    #[error("cluster state file has an invalid {0}")]
    Invalid(&'static str),
}

const PERSIST_MAGIC: &[u8; 4] = b"SKCS";
const PERSIST_VERSION: u8 = 1;

impl Persistent {
    /// Encodes the state (little-endian, versioned; no serde format needed by the caller).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 9 * self.history.generations.len());
        out.extend_from_slice(PERSIST_MAGIC);
        out.push(PERSIST_VERSION);
        let flags = u8::from(self.up_to_date) | (u8::from(self.was_primary) << 1);
        out.push(flags);
        match self.resync_in_progress {
            None => out.push(0),
            Some(ResyncKind::Full) => out.push(1),
            Some(ResyncKind::Incremental { since }) => {
                out.push(2);
                out.extend_from_slice(&since.0.to_le_bytes());
            }
        }
        match self.last_shared {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                out.extend_from_slice(&id.0.to_le_bytes());
            }
        }
        out.push(self.history.generations.len() as u8);
        for generation in &self.history.generations {
            out.extend_from_slice(&generation.id.0.to_le_bytes());
            out.push(match generation.origin {
                Origin::Start => 0,
                Origin::Forced => 1,
                Origin::Takeover => 2,
                Origin::ContinuedPrimary => 3,
            });
        }
        out
    }

    /// Decodes what [`Persistent::encode`] wrote.
    ///
    /// # Errors
    /// A [`PersistentDecodeError`] for anything else; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Persistent, PersistentDecodeError> {
        let mut reader = Reader { bytes };
        if reader.take(4)? != PERSIST_MAGIC || reader.u8()? != PERSIST_VERSION {
            return Err(PersistentDecodeError::BadHeader);
        }
        let flags = reader.u8()?;
        if flags & !0b11 != 0 {
            return Err(PersistentDecodeError::Invalid("flags"));
        }
        let resync_in_progress = match reader.u8()? {
            0 => None,
            1 => Some(ResyncKind::Full),
            2 => Some(ResyncKind::Incremental {
                since: GenerationId(reader.u64()?),
            }),
            _ => return Err(PersistentDecodeError::Invalid("resync kind")),
        };
        let last_shared = match reader.u8()? {
            0 => None,
            1 => Some(GenerationId(reader.u64()?)),
            _ => return Err(PersistentDecodeError::Invalid("last shared generation")),
        };
        let count = usize::from(reader.u8()?);
        if count > MAX_GENERATIONS {
            return Err(PersistentDecodeError::Invalid("generation count"));
        }
        let mut generations = Vec::with_capacity(count);
        for _ in 0..count {
            let id = GenerationId(reader.u64()?);
            let origin = match reader.u8()? {
                0 => Origin::Start,
                1 => Origin::Forced,
                2 => Origin::Takeover,
                3 => Origin::ContinuedPrimary,
                _ => return Err(PersistentDecodeError::Invalid("generation origin")),
            };
            generations.push(Generation { id, origin });
        }
        if !reader.bytes.is_empty() {
            return Err(PersistentDecodeError::Invalid("length (trailing bytes)"));
        }
        Ok(Persistent {
            history: History { generations },
            up_to_date: flags & 1 != 0,
            resync_in_progress,
            last_shared,
            was_primary: flags & 2 != 0,
        })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], PersistentDecodeError> {
        if self.bytes.len() < len {
            return Err(PersistentDecodeError::Truncated);
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, PersistentDecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, PersistentDecodeError> {
        let bytes: [u8; 8] = self.take(8)?.try_into().expect("take returned 8 bytes");
        Ok(u64::from_le_bytes(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn generation(id: u64) -> Generation {
        Generation {
            id: GenerationId(id),
            origin: Origin::Start,
        }
    }

    fn history(ids: &[u64]) -> History {
        History::from_generations(ids.iter().copied().map(generation).collect())
    }

    #[test]
    fn fresh_nodes_share_nothing() {
        assert_eq!(
            compare(&History::new(), &History::new()),
            Verdict::Unrelated
        );
        assert_eq!(compare(&History::new(), &history(&[1])), Verdict::Unrelated);
    }

    #[test]
    fn the_node_that_ran_alone_is_ahead() {
        assert_eq!(
            compare(&history(&[1, 2]), &history(&[1])),
            Verdict::LocalAhead {
                since: GenerationId(1)
            }
        );
        assert_eq!(
            compare(&history(&[1]), &history(&[1, 2, 3])),
            Verdict::RemoteAhead {
                since: GenerationId(1)
            }
        );
    }

    #[test]
    fn both_ran_alone_is_a_split_brain_from_the_newest_common_generation() {
        let verdict = compare(&history(&[1, 2, 3, 5]), &history(&[1, 2, 4]));
        assert_eq!(
            verdict,
            Verdict::Diverged {
                common: GenerationId(2),
                local_first: generation(3),
                remote_first: generation(4)
            }
        );
    }

    #[test]
    fn the_former_primary_wins_a_split_brain_then_the_first_name() {
        use Origin::*;
        assert_eq!(
            split_brain_winner(Takeover, ContinuedPrimary, "a", "b"),
            Side::Remote
        );
        assert_eq!(
            split_brain_winner(ContinuedPrimary, Takeover, "b", "a"),
            Side::Local
        );
        assert_eq!(split_brain_winner(Forced, Takeover, "a", "b"), Side::Remote);
        assert_eq!(
            split_brain_winner(Forced, Start, "node2", "node1"),
            Side::Remote
        );
        assert_eq!(
            split_brain_winner(Takeover, Takeover, "node1", "node2"),
            Side::Local
        );
    }

    #[test]
    fn histories_are_bounded_and_lose_the_oldest() {
        let mut h = History::new();
        for id in 0..(MAX_GENERATIONS as u64 + 5) {
            h.push(generation(id));
        }
        assert_eq!(h.generations().len(), MAX_GENERATIONS);
        assert_eq!(h.generations()[0].id, GenerationId(5));
        // A peer that only knows a dropped generation is unrelated: full resync, the safe side.
        assert_eq!(compare(&h, &history(&[0])), Verdict::Unrelated);
    }

    fn arb_history(prefix: u64) -> impl Strategy<Value = Vec<u64>> {
        arb_history_len(prefix, 0)
    }

    /// Distinct ids (at least `min_len`), from a range per `prefix` so that unrelated histories never collide.
    fn arb_history_len(prefix: u64, min_len: usize) -> impl Strategy<Value = Vec<u64>> {
        proptest::collection::btree_set(0..1_000_000u64, min_len..10)
            .prop_map(move |ids| ids.into_iter().map(|id| prefix * 1_000_000 + id).collect())
    }

    fn arb_persistent() -> impl Strategy<Value = Persistent> {
        (
            arb_history(1),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(proptest::option::of(any::<u64>())),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(ids, up_to_date, was_primary, resync, last_shared)| Persistent {
                    history: History::from_generations(
                        ids.iter()
                            .enumerate()
                            .map(|(index, id)| Generation {
                                id: GenerationId(*id),
                                origin: [
                                    Origin::Start,
                                    Origin::Forced,
                                    Origin::Takeover,
                                    Origin::ContinuedPrimary,
                                ][index % 4],
                            })
                            .collect(),
                    ),
                    up_to_date,
                    resync_in_progress: resync.map(|since| match since {
                        None => ResyncKind::Full,
                        Some(id) => ResyncKind::Incremental {
                            since: GenerationId(id),
                        },
                    }),
                    last_shared: last_shared.map(GenerationId),
                    was_primary,
                },
            )
    }

    proptest! {
        #[test]
        fn compare_is_antisymmetric(a in arb_history(1), b in arb_history(1)) {
            let (a, b) = (history(&a), history(&b));
            prop_assert_eq!(compare(&a, &b), compare(&b, &a).mirrored());
        }

        #[test]
        fn a_history_equals_itself(ids in arb_history(1)) {
            let h = history(&ids);
            let expected = match h.current() {
                Some(current) => Verdict::Equal { current: current.id },
                None => Verdict::Unrelated,
            };
            prop_assert_eq!(compare(&h, &h), expected);
        }

        #[test]
        fn running_alone_puts_a_node_ahead(common in arb_history_len(1, 1), extra in arb_history_len(2, 1)) {
            let ahead: Vec<u64> = common.iter().chain(extra.iter()).copied().collect();
            let since = GenerationId(*common.last().expect("not empty"));
            prop_assert_eq!(compare(&history(&ahead), &history(&common)), Verdict::LocalAhead { since });
            prop_assert_eq!(compare(&history(&common), &history(&ahead)), Verdict::RemoteAhead { since });
        }

        #[test]
        fn two_extensions_diverge_at_the_common_generation(
            common in arb_history_len(1, 1), left in arb_history_len(2, 1), right in arb_history_len(3, 1),
        ) {
            let l: Vec<u64> = common.iter().chain(left.iter()).copied().collect();
            let r: Vec<u64> = common.iter().chain(right.iter()).copied().collect();
            let verdict = compare(&history(&l), &history(&r));
            prop_assert_eq!(verdict, Verdict::Diverged {
                common: GenerationId(*common.last().expect("not empty")),
                local_first: generation(left[0]),
                remote_first: generation(right[0]),
            });
        }

        #[test]
        fn histories_without_a_shared_id_are_unrelated(a in arb_history(1), b in arb_history(2)) {
            prop_assert_eq!(compare(&history(&a), &history(&b)), Verdict::Unrelated);
        }

        #[test]
        fn split_brain_rule_picks_exactly_one_side(
            a in 0..4usize, b in 0..4usize, name_a in "[a-z0-9]{1,8}", name_b in "[a-z0-9]{1,8}",
        ) {
            prop_assume!(name_a != name_b);
            let origins = [Origin::Start, Origin::Forced, Origin::Takeover, Origin::ContinuedPrimary];
            let seen_from_a = split_brain_winner(origins[a], origins[b], &name_a, &name_b);
            let seen_from_b = split_brain_winner(origins[b], origins[a], &name_b, &name_a);
            prop_assert_ne!(seen_from_a, seen_from_b, "both sides must agree on one winner");
        }

        #[test]
        fn persistent_state_round_trips(state in arb_persistent()) {
            prop_assert_eq!(Persistent::decode(&state.encode()), Ok(state));
        }

        #[test]
        fn persistent_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Persistent::decode(&bytes);
        }

        #[test]
        fn truncated_persistent_state_is_refused(state in arb_persistent(), cut in any::<usize>()) {
            let bytes = state.encode();
            let cut = cut % bytes.len();
            prop_assert!(Persistent::decode(&bytes[..cut]).is_err());
        }
    }
}
