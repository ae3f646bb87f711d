//! The seam between the FUSE file system and the replication transport.
//!
//! The FUSE layer performs an operation locally, then hands it to a
//! [`Replicator`] and answers the application only when `replicate` returns.
//! The transport decides what "returns" means from the module's role:
//! - replicating: after the peer acknowledged (applied, or durable for fsync);
//! - alone (peer absent or silent past the configured bound): at once, after the
//!   touched file was recorded durably for the next resync;
//! - off (no replication, for benchmarks and for a module without a peer yet):
//!   at once.
//!
//! `replicate` never waits longer than the configured replication timeout plus
//! a small margin, and never fails the application's call: a peer problem turns
//! into [`ReplicateOutcome::Alone`], not into an error.

use safekit_protocol::replication::Op;

/// What the caller needs to be true before it answers the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitFor {
    /// The peer applied the operation (in its page cache): write(), namespace operations.
    Applied,
    /// The peer made the operation and everything before it durable: fsync, O_SYNC writes.
    Durable,
    /// Do not wait (the fsync-only mode's plain writes): ordered behind earlier operations, acknowledged later.
    Queued,
}

/// What happened to one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicateOutcome {
    /// The peer confirmed what was asked for.
    Confirmed,
    /// Queued behind earlier operations without waiting (only for [`WaitFor::Queued`]).
    Queued,
    /// The peer is absent or went silent: the file was recorded durably as dirty instead.
    Alone,
    /// Replication is switched off for this mount.
    Off,
}

/// Ships operations to the peer. Implemented by the transport; a test double may count calls.
pub trait Replicator: Send + Sync {
    /// Ships `op` (already applied locally) and waits as `wait_for` asks, within the configured bound.
    fn replicate(&self, op: Op, wait_for: WaitFor) -> ReplicateOutcome;
}

/// A replicator for a mount whose replication is off: every call returns [`ReplicateOutcome::Off`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ReplicationOff;

impl Replicator for ReplicationOff {
    fn replicate(&self, _op: Op, _wait_for: WaitFor) -> ReplicateOutcome {
        ReplicateOutcome::Off
    }
}
