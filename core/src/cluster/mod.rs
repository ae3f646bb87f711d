//! The mirror module's cluster logic, without I/O: generations, heartbeat loss, the state machine.
//!
//! - [`generations`]: persisted generation histories, the "who is ahead" verdict,
//!   the split-brain rule, and the persisted state's byte encoding.
//! - [`heartbeat`]: per-LAN last-seen times, the peer-loss verdict, degraded LANs.
//! - [`machine`]: the STOP/WAIT/ALONE/PRIM/SECOND machine, `handle(now, Event) -> Vec<Action>`.
//! - [`rules`]: checker verdict stability, local-failure actions and `maxloop`.
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
//! # Reintegration handshake (secondary-driven, primary-served)
//!
//! The resync engine runs on the **primary**: it owns the tree and the one
//! ordered replication stream, so resync data and live writes cannot overtake
//! each other. The SECOND only receives.
//!
//! 1. The joining node goes SECOND (resynchronizing) with
//!    [`Action::SetReplicationRole`]`(Secondary)` (its receiver listens) and
//!    [`Action::StartResync`]; its heartbeat then carries a
//!    `resync_request { attempt, full }`, `attempt` drawn afresh at each attempt.
//! 2. The ALONE (or PRIM) node seeing that request for an attempt it has not
//!    served yet emits `SetReplicationRole(Primary)` (live writes flow to the
//!    peer from now on) and [`Action::ServeResync`]` { kind, attempt }`:
//!    incremental when the peer's current generation is in our history and it
//!    did not ask for a full copy, full otherwise. It stays ALONE meanwhile.
//! 3. The data path reports [`Event::ResyncServeProgress`], then
//!    [`Event::ResyncServed`] (the engine's final durable barrier passed) or
//!    [`Event::ResyncServeFailed`]; the primary's heartbeat carries
//!    `resync_serve { attempt, phase }` with the progress, `Served { generation }`
//!    or `Failed`.
//! 4. The SECOND reads its attempt's phase in the primary's heartbeat: progress
//!    feeds `safekit state -v`; `Served` for the primary's current generation
//!    completes it exactly like [`Event::ResyncCompleted`] (history adopted, in
//!    sync); `Failed` makes it WAIT (resynchronization failed) and retry after
//!    `timeout` with a new attempt.
//! 5. The primary goes PRIM once the peer is an in-sync SECOND with its
//!    current generation. It forgets the serve when the peer stops asking; if
//!    the peer left without joining, it switches back to `Alone` (dirty
//!    recording). A replication loss while ALONE after `Served` starts a new
//!    generation, so a peer that already counted itself in sync reintegrates
//!    what only this node recorded.
//!
//! A data path that completes locally (no `<rfs>`) may still report
//! [`Event::ResyncCompleted`] on the SECOND directly.
//!
//! Nothing here reads a clock or touches the system; the simulated cluster
//! (`sim`, test only) drives two machines through the real heartbeat format.

pub mod generations;
pub mod heartbeat;
pub mod machine;
pub mod rules;

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
