//! The mirror module's cluster logic, without I/O: generations, heartbeat loss, the state machine.
//!
//! - [`generations`]: persisted generation histories, the "who is ahead" verdict,
//!   the split-brain rule, and the persisted state's byte encoding.
//! - [`heartbeat`]: per-LAN last-seen times, the peer-loss verdict, degraded LANs.
//! - [`machine`]: the STOP/WAIT/ALONE/PRIM/SECOND machine, `handle(now, Event) -> Vec<Action>`.
//!
//! # Contract with the agent
//!
//! - One task owns a [`Machine`] per module. It turns sockets, timers and
//!   script exits into [`Event`]s, calls [`Machine::handle`] with a monotonic
//!   `now` (a `Duration` since any fixed origin, e.g. `Instant` at agent start),
//!   and executes the returned [`Action`]s **in order**. A
//!   [`Action::PersistState`] is written atomically and durably (write a
//!   temporary file, fsync, rename, fsync the directory; [`Persistent::encode`])
//!   before the next action runs.
//! - It calls `handle(now, Event::Tick)` when [`Machine::next_deadline`]
//!   passes (re-read it after every `handle`).
//! - A dedicated heartbeat thread sends [`Machine::heartbeat_payload`] every
//!   `pulse` on every LAN (`safekit_protocol::heartbeat::encode`), **in every
//!   state including STOP**: a stopped node still tells its peer its history,
//!   which is how a node that is not up to date learns it must wait. Received
//!   datagrams go through `decode` (tag) and a `ReplayGuard` before becoming
//!   [`Event::HeartbeatReceived`].
//! - `boot` in heartbeats must grow at every agent start (persist a counter);
//!   the `seed` of [`Machine::new`] comes from the OS CSPRNG at every start.
//! - [`Action::RefuseCommand`] answers the `safekit` command that caused it;
//!   a command without one was accepted.
//!
//! Nothing here reads a clock or touches the system; the simulated cluster
//! (`sim`, test only) drives two machines through the real heartbeat format.

pub mod generations;
pub mod heartbeat;
pub mod machine;

#[cfg(test)]
mod scenarios;
#[cfg(test)]
mod sim;

pub use generations::{
    Generation, GenerationId, History, Origin, Persistent, ResyncKind, Verdict, compare,
};
pub use heartbeat::{Lan, LanStatus, PeerLink};
pub use machine::{
    Action, Command, DefaultPrim, Event, Level, Machine, ModuleParams, ReplicationRole, Script,
    SecondPhase, State, Transition, WaitReason,
};
