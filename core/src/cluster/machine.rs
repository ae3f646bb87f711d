//! The per-module state machine of a mirror module: STOP, WAIT, ALONE, PRIM, SECOND.
//!
//! [`Machine::handle`] takes one past-tense [`Event`] and the current time and
//! returns the [`Action`]s the agent must execute, **in order** (a
//! [`Action::PersistState`] must be durable before the next action runs: a new
//! generation is on disk before `start_prim` runs). [`Machine::next_deadline`]
//! says when to deliver the next [`Event::Tick`]. Heartbeats are sent by the
//! agent's own thread every `pulse`, carrying [`Machine::heartbeat_payload`].
//! The machine reads no clock and does no I/O.
//!
//! # Decisions
//!
//! - `start`: WAIT until the peer's status is known (a heartbeat, or `timeout`
//!   of silence). Peer absent: ALONE if this node is up to date, else WAIT
//!   (not up to date). Peer primary: SECOND (resync). Peer stopped or waiting:
//!   the generation histories ([`super::generations`]) pick the node with the
//!   newer data; it goes ALONE, the other waits for it and then resyncs.
//! - `prim`: forced ALONE, the only way a node that is not up to date runs
//!   alone; refused if the peer is primary or if this node was stopped during a
//!   resynchronization (then `primforce`).
//! - `second`: forced SECOND; refused if the peer is not primary.
//! - Peer lost (every LAN silent for `timeout`) or stopped: PRIM → ALONE (new
//!   generation); SECOND in sync → ALONE (`failover="on"`), WAIT (`off`, or the
//!   split-brain witness unreachable); a resynchronizing SECOND → WAIT, never
//!   primary on its own.
//! - Split brain (both run the application): [`super::generations::split_brain_winner`]
//!   picks the side that stays; the other stops its application, sets its
//!   diverged files aside, resyncs fully and becomes SECOND.
//! - Impossible combinations are logged at error and resolved to WAIT.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use safekit_protocol::heartbeat::{
    Detail, Heartbeat, ModuleState, NodeStatus, ResyncProgressStatus, ResyncRequestStatus,
    ResyncServeStatus, ServePhase,
};

use super::generations::{
    Generation, GenerationId, History, Origin, Persistent, ResyncKind, Side, Verdict, compare,
    split_brain_winner,
};
use super::heartbeat::{Lan, LanStatus, Monitor, PeerLink};

/// What the machine needs from the configuration (the agent fills it from userconfig.xml and cluster.xml).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleParams {
    /// Module name (heartbeats for other modules are ignored).
    pub module: String,
    /// This node's name.
    pub node: String,
    /// The peer's name.
    pub peer: String,
    /// Heartbeat period (informational here: the heartbeat thread uses it).
    pub pulse: Duration,
    /// The peer is lost when every LAN is silent this long.
    pub timeout: Duration,
    /// `failover="on"`.
    pub failover: bool,
    /// `defaultprim`.
    pub defaultprim: DefaultPrim,
    /// The heartbeat LANs.
    pub lans: Vec<Lan>,
    /// A split-brain witness is configured: going ALONE after losing the peer needs it reachable.
    pub witness: bool,
}

/// `defaultprim`: who is primary once both nodes run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DefaultPrim {
    /// The ALONE node stays primary (no automatic swap).
    Alone,
    /// Automatic swap to this node right after its reintegration.
    Node(String),
    /// Automatic swap to the node that ran the application before its last stop.
    LastPrim,
}

/// A module state with its sub-state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Module not running.
    Stop,
    /// Started but blocked.
    Wait(WaitReason),
    /// Runs the application without its peer.
    Alone,
    /// Runs the application; the peer is SECOND in sync.
    Prim,
    /// Application stopped; receives replication.
    Second(SecondPhase),
}

/// Why a module waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// The peer's status is not known yet.
    PeerUnknown,
    /// Data not up to date; waiting for the peer.
    NotUpToDate,
    /// Stopped during a resynchronization: data may be inconsistent.
    ResyncInterrupted,
    /// The peer holds the newer data and is not primary yet.
    PeerNotPrimary,
    /// `failover="off"`: no automatic takeover.
    FailoverOff,
    /// The split-brain witness could not be reached.
    WitnessUnreachable,
    /// Replication with the primary failed (the primary runs ALONE, degraded); retried after `timeout`.
    ReplicationDegraded,
    /// The last resynchronization failed; retried after `timeout`.
    ResyncFailed,
    /// Neither node holds data known to be up to date: `prim` on the right node.
    NoUpToDateNode,
    /// An impossible combination was seen.
    Inconsistent,
    /// A `wait()` rule fired: held until its resources are up again (then the implicit wakeup).
    ResourceDown,
    /// Started, but a resource used by a `wait()` rule has no verdict yet
    /// (`init`): held until every such resource is known ([`Machine::resources_init`]).
    ResourceInit,
}

/// The two phases of SECOND.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecondPhase {
    /// Resynchronizing: not up to date, never becomes primary on its own.
    Resyncing,
    /// In sync with the primary.
    InSync,
}

impl State {
    /// The state's name as `safekit state` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            State::Stop => "STOP",
            State::Wait(_) => "WAIT",
            State::Alone => "ALONE",
            State::Prim => "PRIM",
            State::Second(_) => "SECOND",
        }
    }

    /// `safekit state -m M -lq` exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            State::Stop => 0,
            State::Wait(_) => 1,
            State::Alone => 2,
            State::Prim => 3,
            State::Second(_) => 4,
        }
    }

    fn runs_application(&self) -> bool {
        matches!(self, State::Alone | State::Prim)
    }

    fn to_wire(self) -> (ModuleState, Detail) {
        match self {
            State::Stop => (ModuleState::Stop, Detail::None),
            State::Alone => (ModuleState::Alone, Detail::None),
            State::Prim => (ModuleState::Prim, Detail::None),
            State::Second(SecondPhase::Resyncing) => (ModuleState::Second, Detail::Resyncing),
            State::Second(SecondPhase::InSync) => (ModuleState::Second, Detail::InSync),
            State::Wait(reason) => (
                ModuleState::Wait,
                match reason {
                    WaitReason::PeerUnknown => Detail::PeerUnknown,
                    WaitReason::NotUpToDate => Detail::NotUpToDate,
                    WaitReason::ResyncInterrupted => Detail::ResyncInterrupted,
                    WaitReason::PeerNotPrimary => Detail::PeerNotPrimary,
                    WaitReason::FailoverOff => Detail::FailoverOff,
                    WaitReason::WitnessUnreachable => Detail::WitnessUnreachable,
                    WaitReason::ReplicationDegraded => Detail::ReplicationDegraded,
                    WaitReason::ResyncFailed => Detail::ResyncFailed,
                    WaitReason::NoUpToDateNode => Detail::NoUpToDateNode,
                    WaitReason::Inconsistent => Detail::Inconsistent,
                    WaitReason::ResourceDown => Detail::ResourceDown,
                    // The wire has no value for it (older peers could not decode one):
                    // for the peer, the node is held by a wait rule either way.
                    WaitReason::ResourceInit => Detail::ResourceDown,
                },
            ),
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            State::Wait(reason) => write!(f, "WAIT ({})", reason.describe()),
            State::Second(SecondPhase::Resyncing) => f.write_str("SECOND (resynchronizing)"),
            State::Second(SecondPhase::InSync) => f.write_str("SECOND (up to date)"),
            other => f.write_str(other.name()),
        }
    }
}

impl WaitReason {
    /// A short description for `safekit state -v` and the module log.
    pub fn describe(&self) -> &'static str {
        match self {
            WaitReason::PeerUnknown => "waiting for the peer's heartbeat",
            WaitReason::NotUpToDate => "not up to date",
            WaitReason::ResyncInterrupted => "stopped during reintegration",
            WaitReason::PeerNotPrimary => "waiting for the peer to become primary",
            WaitReason::FailoverOff => "failover off",
            WaitReason::WitnessUnreachable => "split-brain witness unreachable",
            WaitReason::ReplicationDegraded => "replication degraded",
            WaitReason::ResyncFailed => "resynchronization failed",
            WaitReason::NoUpToDateNode => "no node is known to be up to date",
            WaitReason::Inconsistent => "inconsistent cluster state",
            WaitReason::ResourceDown => "a resource of a wait rule is down",
            WaitReason::ResourceInit => "a resource of a wait rule is not known yet",
        }
    }
}

/// An operator verb (SafeKit names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Normal start.
    Start,
    /// Forced start as primary.
    Prim,
    /// Forced start as primary even after an interrupted resynchronization.
    PrimForce,
    /// Forced start as secondary.
    Second,
    /// Stop (stop_prim, then forced if it fails).
    Stop,
    /// Forced stop (stop_prim with `force`).
    ForceStop,
    /// Restart the application scripts; the state is kept.
    Restart,
    /// Exchange the PRIM and SECOND roles.
    Swap,
}

impl Command {
    /// The verb as the operator types it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Start => "start",
            Command::Prim => "prim",
            Command::PrimForce => "primforce",
            Command::Second => "second",
            Command::Stop => "stop",
            Command::ForceStop => "forcestop",
            Command::Restart => "restart",
            Command::Swap => "swap",
        }
    }
}

/// A fact reported to the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An operator (or a script, a checker) ran a verb; `caller` is shown in the log (`root`, `admin@10.0.0.1`).
    Command {
        /// The verb.
        command: Command,
        /// Who asked.
        caller: String,
    },
    /// An authenticated, non-replayed heartbeat arrived (the agent checked the tag and the [`safekit_protocol::heartbeat::ReplayGuard`]).
    HeartbeatReceived(Heartbeat),
    /// A deadline from [`Machine::next_deadline`] passed.
    Tick,
    /// A script returned.
    ScriptFinished {
        /// Which one.
        script: Script,
        /// Exit code 0 (a killed script is a failure).
        success: bool,
    },
    /// Resynchronization progress.
    ResyncProgress {
        /// Percent done.
        percent: u8,
    },
    /// The resynchronization completed: the replicated directories equal the primary's.
    ResyncCompleted,
    /// The resynchronization failed.
    ResyncFailed {
        /// Why, for the log.
        reason: String,
    },
    /// The replication connection to the peer broke (send timeout, reset).
    ReplicationPeerLost,
    /// Primary: progress of the reintegration served for `attempt`.
    ResyncServeProgress {
        /// The attempt of [`Action::ServeResync`].
        attempt: u64,
        /// The engine's progress.
        progress: ResyncProgressStatus,
    },
    /// Primary: the reintegration served for `attempt` completed (the resync
    /// engine's final durable barrier passed; live replication keeps the peer in sync).
    ResyncServed {
        /// The attempt of [`Action::ServeResync`].
        attempt: u64,
        /// Final counters.
        progress: ResyncProgressStatus,
    },
    /// Primary: the reintegration served for `attempt` failed.
    ResyncServeFailed {
        /// The attempt of [`Action::ServeResync`].
        attempt: u64,
        /// Why, for the log.
        reason: String,
    },
    /// A checker's verdict changed (logged; an up verdict may end a `wait()`).
    CheckerVerdict {
        /// The resource (`intf.eth0`, `custom.app`).
        resource: String,
        /// Up or down.
        up: bool,
    },
    /// The split-brain witness is (not) reachable.
    WitnessReachable(bool),
    /// A `wait()` rule fired for `resource` (down): stop the module and hold
    /// it in WAIT until the resource is up again ([`Event::CheckerVerdict`]),
    /// then start it again as a `start` would (SafeKit's implicit wakeup).
    WaitForResource {
        /// The resource (`intf.eth0`, `custom.app`).
        resource: String,
        /// The rule, shown as `Action wait called by <caller>`.
        caller: String,
    },
    /// The resources used by `wait()` rules that have no verdict yet (`init`):
    /// a started node stays in WAIT while any is (SafeKit's "WAIT
    /// (Transient)" at start). Sent whenever the set changes; empty: none.
    WaitResourcesInit(BTreeSet<String>),
}

/// A script of the module's `bin/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Script {
    /// `start_prim`.
    StartPrim,
    /// `stop_prim` (with argument `force` when forced).
    StopPrim {
        /// Forced stop.
        force: bool,
    },
}

/// What the data path does for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicationRole {
    /// Nothing: no interception, replicated directories released.
    Off,
    /// Intercept and replicate every write synchronously to the peer.
    Primary,
    /// Intercept and record what changes (dirty files) for a later reintegration; no peer.
    Alone,
    /// Receive writes (and resynchronization) from the peer; directories read-only for others.
    Secondary,
}

/// Log levels of the module log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Information (operator actions, transitions' details, progress).
    Info,
    /// Main log, warning.
    Warn,
    /// Main log, error.
    Error,
}

/// Something the agent must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write this state durably (atomically) before running the next action.
    PersistState(Persistent),
    /// Run a script; report [`Event::ScriptFinished`].
    RunScript(Script),
    /// Add the virtual IP and announce it (gratuitous ARP).
    TakeVip,
    /// Remove the virtual IP.
    ReleaseVip,
    /// Switch the data path.
    SetReplicationRole(ReplicationRole),
    /// Start a resynchronization from the peer; report progress and completion.
    StartResync {
        /// Incremental or full.
        kind: ResyncKind,
    },
    /// Primary: run the resync engine towards the resynchronizing peer (the
    /// replication role is already `Primary`); report
    /// [`Event::ResyncServeProgress`], then [`Event::ResyncServed`] or
    /// [`Event::ResyncServeFailed`] with the same `attempt`.
    ServeResync {
        /// Incremental (the peer's generation is in our history) or full.
        kind: ResyncKind,
        /// The peer's attempt, echoed in the reports.
        attempt: u64,
    },
    /// Move the files changed here since `since` (all differing files when `None`)
    /// into a dated folder and log where; done before a resync overwrites them.
    SetAsideDivergedFiles {
        /// The last generation shared with the peer.
        since: Option<GenerationId>,
        /// Why, for the module log.
        reason: String,
    },
    /// A line for the module log.
    Log {
        /// Its level.
        level: Level,
        /// The text.
        message: String,
    },
    /// The state changed (one `info` event with these fields; the module log renders it).
    StateChanged {
        /// Previous state.
        from: State,
        /// New state.
        to: State,
        /// Why.
        reason: String,
    },
    /// The command was refused; tell the operator (one line) and exit non-zero.
    RefuseCommand {
        /// The refused verb.
        command: Command,
        /// Why.
        reason: String,
    },
}

/// The last transition, for `safekit state -v`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// When.
    pub at: Duration,
    /// From.
    pub from: State,
    /// To.
    pub to: State,
    /// Why.
    pub reason: String,
}

#[derive(Debug, Clone)]
struct PeerView {
    status: NodeStatus,
    history: History,
    boot: u64,
    seq: u64,
}

impl PeerView {
    fn runs_application(&self) -> bool {
        matches!(self.status.state, ModuleState::Alone | ModuleState::Prim)
    }

    fn in_sync_second(&self) -> bool {
        self.status.state == ModuleState::Second && self.status.detail == Detail::InSync
    }
}

/// What happens once `stop_prim` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterStop {
    Stop {
        persist_up_to_date: bool,
    },
    Wait(WaitReason),
    /// A `wait()` rule: WAIT until the resources are up (up to date unless the peer took over).
    WaitResource {
        persist_up_to_date: bool,
    },
    /// Split-brain loser: set files aside, then join as SECOND.
    SecondAfterSplitBrain {
        since: Option<GenerationId>,
        reason: String,
    },
    /// Swap: become SECOND in sync and hand the primary role over.
    Handover,
    /// `restart`: run start_prim again; the state is kept.
    Restart,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Busy {
    StartingPrim { then_stop: Option<bool> },
    StoppingPrim { force: bool, then: AfterStop },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Prim { force: bool, caller: String },
    Second { caller: String },
}

/// The state machine of one module on one node.
#[derive(Debug, Clone)]
pub struct Machine {
    params: ModuleParams,
    persistent: Persistent,
    state: State,
    monitor: Monitor,
    peer: Option<PeerView>,
    now: Duration,
    busy: Option<Busy>,
    pending: Option<Pending>,
    handover_until: Option<Duration>,
    swap_requested: bool,
    degraded: bool,
    resync_percent: u8,
    resync_target: Option<History>,
    witness: Option<bool>,
    witness_resume: Option<Origin>,
    retry_at: Option<Duration>,
    split_brain_logged: bool,
    seed: u64,
    generation_counter: u64,
    last_transition: Option<Transition>,
    checkers: BTreeMap<String, bool>,
    /// The resources a `wait()` rule holds the module in WAIT for.
    waiting_for: BTreeSet<String>,
    /// The resources of `wait()` rules still `init` ([`Event::WaitResourcesInit`]).
    resources_init: BTreeSet<String>,
    /// SECOND resynchronizing: the attempt it asks its primary to serve.
    resync_attempt: u64,
    attempt_counter: u64,
    /// Primary: the reintegration served to the peer (reintegration handshake).
    serve: Option<ResyncServeStatus>,
    /// The last resync progress reported (served here, or by the primary).
    resync_progress: Option<ResyncProgressStatus>,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Machine {
    /// A machine in STOP, from the persisted state read at agent start.
    ///
    /// `seed` must come from the operating system's CSPRNG at every agent
    /// start: new generation ids are derived from it, and two generations with
    /// the same id would make different data look identical.
    pub fn new(params: ModuleParams, persistent: Persistent, now: Duration, seed: u64) -> Self {
        let monitor = Monitor::new(params.lans.clone(), params.timeout, now);
        Machine {
            params,
            persistent,
            state: State::Stop,
            monitor,
            peer: None,
            now,
            busy: None,
            pending: None,
            handover_until: None,
            swap_requested: false,
            degraded: false,
            resync_percent: 0,
            resync_target: None,
            witness: None,
            witness_resume: None,
            retry_at: None,
            split_brain_logged: false,
            seed,
            generation_counter: 0,
            last_transition: None,
            checkers: BTreeMap::new(),
            waiting_for: BTreeSet::new(),
            resources_init: BTreeSet::new(),
            resync_attempt: 0,
            attempt_counter: 0,
            serve: None,
            resync_progress: None,
        }
    }

    /// The last resynchronization progress: of the reintegration this node
    /// serves (primary) or receives (SECOND), as the primary's engine measures it.
    pub fn resync_progress(&self) -> Option<ResyncProgressStatus> {
        self.resync_progress
    }

    /// Primary: the reintegration served to the peer, if any.
    pub fn serving(&self) -> Option<ResyncServeStatus> {
        self.serve
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// A script is running (the state is Transient).
    pub fn is_transient(&self) -> bool {
        self.busy.is_some() || matches!(self.state, State::Second(SecondPhase::Resyncing))
    }

    /// Resynchronization progress (percent) while SECOND resynchronizing.
    pub fn resync_percent(&self) -> u8 {
        self.resync_percent
    }

    /// What this node persists.
    pub fn persistent(&self) -> &Persistent {
        &self.persistent
    }

    /// The last transition.
    pub fn last_transition(&self) -> Option<&Transition> {
        self.last_transition.as_ref()
    }

    /// Per-LAN heartbeat status (degraded LANs are `up == false` while the peer is alive).
    pub fn lans(&self) -> Vec<LanStatus> {
        self.monitor.lans(self.now)
    }

    /// The peer's last known state, if heard within `timeout`.
    pub fn peer_state(&self) -> Option<ModuleState> {
        match self.monitor.peer(self.now) {
            PeerLink::Alive => self.peer.as_ref().map(|peer| peer.status.state),
            _ => None,
        }
    }

    /// Last verdict of each checker (issue 7).
    pub fn checkers(&self) -> &BTreeMap<String, bool> {
        &self.checkers
    }

    /// The resources a `wait()` rule holds the module in WAIT for (empty otherwise).
    pub fn waiting_for(&self) -> &BTreeSet<String> {
        &self.waiting_for
    }

    /// The resources of `wait()` rules that have no verdict yet: a started
    /// node does not go on from WAIT while this is not empty.
    pub fn resources_init(&self) -> &BTreeSet<String> {
        &self.resources_init
    }

    /// When to deliver the next [`Event::Tick`], if anything is time-driven.
    pub fn next_deadline(&self) -> Option<Duration> {
        [
            self.monitor.next_deadline(self.now),
            self.retry_at,
            self.handover_until,
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > self.now)
        .min()
    }

    /// What the next heartbeats carry (the heartbeat thread adds module, sender, LAN, boot and seq).
    pub fn heartbeat_payload(&self) -> NodeStatus {
        let (state, detail) = self.state.to_wire();
        NodeStatus {
            state,
            detail,
            stopping: matches!(
                self.busy,
                Some(Busy::StoppingPrim { ref then, .. }) if *then != AfterStop::Restart
            ),
            handover: self.handover_until.is_some(),
            swap_requested: self.swap_requested,
            up_to_date: self.persistent.up_to_date,
            resync_interrupted: self.persistent.resync_in_progress.is_some()
                && !matches!(self.state, State::Second(SecondPhase::Resyncing)),
            replication_degraded: self.degraded,
            was_primary: self.persistent.was_primary,
            resync_percent: self.resync_percent,
            generations: self.persistent.history.to_wire(),
            resync_request: matches!(self.state, State::Second(SecondPhase::Resyncing)).then_some(
                ResyncRequestStatus {
                    attempt: self.resync_attempt,
                    full: self.persistent.resync_in_progress == Some(ResyncKind::Full),
                },
            ),
            resync_serve: self.serve,
        }
    }

    /// Handles one event at `now` and returns the actions to execute in order.
    pub fn handle(&mut self, now: Duration, event: Event) -> Vec<Action> {
        // A late event never moves time backwards.
        self.now = self.now.max(now);
        let mut out = Vec::new();
        match event {
            Event::Command { command, caller } => self.on_command(command, &caller, &mut out),
            Event::HeartbeatReceived(heartbeat) => self.on_heartbeat(heartbeat, &mut out),
            Event::Tick => {}
            Event::ScriptFinished { script, success } => self.on_script(script, success, &mut out),
            Event::ResyncProgress { percent } => {
                if matches!(self.state, State::Second(SecondPhase::Resyncing)) {
                    let percent = percent.min(100);
                    if percent / 10 > self.resync_percent / 10 {
                        log(
                            &mut out,
                            Level::Info,
                            format!("Reintegration progress: {percent}%"),
                        );
                    }
                    self.resync_percent = percent;
                }
            }
            Event::ResyncCompleted => self.on_resync_completed(&mut out),
            Event::ResyncFailed { reason } => {
                if let State::Second(_) = self.state {
                    log(
                        &mut out,
                        Level::Error,
                        format!("Reintegration failed: {reason}"),
                    );
                    out.push(Action::SetReplicationRole(ReplicationRole::Off));
                    self.retry_at = Some(self.now + self.params.timeout);
                    self.transition(State::Wait(WaitReason::ResyncFailed), &reason, &mut out);
                }
            }
            Event::ReplicationPeerLost => self.on_replication_lost(&mut out),
            Event::ResyncServeProgress { attempt, progress } => {
                if let Some(serve) = self.serve.as_mut().filter(|serve| serve.attempt == attempt)
                    && matches!(serve.phase, ServePhase::Running(_))
                {
                    serve.phase = ServePhase::Running(progress);
                    self.resync_progress = Some(progress);
                }
            }
            Event::ResyncServed { attempt, progress } => {
                self.on_resync_served(attempt, progress, &mut out);
            }
            Event::ResyncServeFailed { attempt, reason } => {
                if let Some(serve) = self.serve.as_mut().filter(|serve| serve.attempt == attempt)
                    && matches!(serve.phase, ServePhase::Running(_))
                {
                    serve.phase = ServePhase::Failed;
                    log(
                        &mut out,
                        Level::Error,
                        format!(
                            "Reintegration of {} failed on this node: {reason}",
                            self.params.peer
                        ),
                    );
                }
            }
            Event::CheckerVerdict { resource, up } => {
                if self.checkers.insert(resource.clone(), up) != Some(up) {
                    let verdict = if up { "up" } else { "down" };
                    log(
                        &mut out,
                        Level::Info,
                        format!("Resource {resource} set to {verdict}"),
                    );
                }
            }
            Event::WitnessReachable(reachable) => {
                if self.witness != Some(reachable) {
                    let verdict = if reachable { "up" } else { "down" };
                    log(
                        &mut out,
                        Level::Info,
                        format!("Resource splitbrain.witness set to {verdict}"),
                    );
                }
                self.witness = Some(reachable);
            }
            Event::WaitForResource { resource, caller } => {
                self.on_wait_for_resource(resource, &caller, &mut out);
            }
            Event::WaitResourcesInit(resources) => {
                self.resources_init = resources;
            }
        }
        self.evaluate(&mut out);
        out
    }

    // ----- events -----

    fn on_heartbeat(&mut self, heartbeat: Heartbeat, out: &mut Vec<Action>) {
        if heartbeat.module != self.params.module || heartbeat.sender != self.params.peer {
            log(
                out,
                Level::Warn,
                format!(
                    "Ignored a heartbeat for module {} from {} (expected module {} from {})",
                    heartbeat.module, heartbeat.sender, self.params.module, self.params.peer
                ),
            );
            return;
        }
        if !self.monitor.record(&heartbeat.lan, self.now) {
            log(
                out,
                Level::Warn,
                format!("Ignored a heartbeat on unknown LAN {}", heartbeat.lan),
            );
            return;
        }
        // The same packet arrives once per LAN; keep the newest status only.
        let newer = self
            .peer
            .as_ref()
            .is_none_or(|peer| (heartbeat.boot, heartbeat.seq) > (peer.boot, peer.seq));
        if newer {
            self.peer = Some(PeerView {
                history: History::from_wire(&heartbeat.status.generations),
                status: heartbeat.status,
                boot: heartbeat.boot,
                seq: heartbeat.seq,
            });
        }
    }

    fn on_command(&mut self, command: Command, caller: &str, out: &mut Vec<Action>) {
        log(
            out,
            Level::Info,
            format!("Action {} called by {caller}", command.name()),
        );
        let refuse = |out: &mut Vec<Action>, reason: String| {
            log(
                out,
                Level::Warn,
                format!("Action {} refused: {reason}", command.name()),
            );
            out.push(Action::RefuseCommand { command, reason });
        };
        // A forced stop may interrupt anything; every other verb waits for scripts.
        if self.busy.is_some() && !matches!(command, Command::Stop | Command::ForceStop) {
            refuse(
                out,
                "a script is running; try again when it has finished".into(),
            );
            return;
        }
        match command {
            Command::Start => match self.state {
                State::Stop => {
                    self.retry_at = None;
                    self.pending = None;
                    self.transition(State::Wait(WaitReason::PeerUnknown), "start", out);
                }
                State::Wait(_) => {}
                other => refuse(out, format!("the module is already running ({other})")),
            },
            Command::Prim | Command::PrimForce => match self.state {
                State::Stop | State::Wait(_) => {
                    self.pending = Some(Pending::Prim {
                        force: command == Command::PrimForce,
                        caller: caller.to_string(),
                    });
                    if self.state == State::Stop {
                        self.transition(State::Wait(WaitReason::PeerUnknown), command.name(), out);
                    }
                    // Resolved now, or in `evaluate` once the peer's status is known.
                    self.resolve_pending(out);
                }
                other => refuse(out, format!("the module is already running ({other})")),
            },
            Command::Second => match self.state {
                State::Stop | State::Wait(_) => {
                    self.pending = Some(Pending::Second {
                        caller: caller.to_string(),
                    });
                    if self.state == State::Stop {
                        self.transition(State::Wait(WaitReason::PeerUnknown), "second", out);
                    }
                    self.resolve_pending(out);
                }
                other => refuse(out, format!("the module is already running ({other})")),
            },
            Command::Stop | Command::ForceStop => {
                let force = command == Command::ForceStop;
                self.stop(force, out);
            }
            Command::Restart => {
                if self.state.runs_application() {
                    self.stop_application(false, AfterStop::Restart, out);
                } else {
                    refuse(
                        out,
                        format!("the application does not run on this node ({})", self.state),
                    );
                }
            }
            Command::Swap => {
                let peer_in_sync = self.peer_present().is_some_and(PeerView::in_sync_second);
                let peer_prim = self
                    .peer_present()
                    .is_some_and(|peer| peer.status.state == ModuleState::Prim);
                match self.state {
                    State::Prim if peer_in_sync => {
                        self.stop_application(false, AfterStop::Handover, out);
                    }
                    State::Second(SecondPhase::InSync) if peer_prim => {
                        // The primary runs the swap when it sees the request in our heartbeat.
                        self.swap_requested = true;
                    }
                    _ => refuse(out, "swap needs a PRIM and SECOND pair in sync".into()),
                }
            }
        }
    }

    /// A `wait()` rule fired: stop what runs here and WAIT for the resource.
    fn on_wait_for_resource(&mut self, resource: String, caller: &str, out: &mut Vec<Action>) {
        log(out, Level::Info, format!("Action wait called by {caller}"));
        if self.busy.is_some() {
            log(
                out,
                Level::Warn,
                "Action wait refused: a script is running".into(),
            );
            return;
        }
        match self.state {
            State::Stop => return,
            State::Alone | State::Prim => {
                let persist_up_to_date = match self.stop_target() {
                    AfterStop::Stop { persist_up_to_date } => persist_up_to_date,
                    _ => true,
                };
                self.pending = None;
                self.swap_requested = false;
                self.stop_application(false, AfterStop::WaitResource { persist_up_to_date }, out);
            }
            State::Second(_) => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.handover_until = None;
                self.swap_requested = false;
                self.persistent.up_to_date = false;
                self.persistent.was_primary = false;
                self.persist(out);
                self.set_wait(WaitReason::ResourceDown, &format!("{resource} down"), out);
            }
            State::Wait(_) => {
                self.pending = None;
                self.set_wait(WaitReason::ResourceDown, &format!("{resource} down"), out);
            }
        }
        self.waiting_for.insert(resource);
    }

    fn stop(&mut self, force: bool, out: &mut Vec<Action>) {
        self.pending = None;
        self.retry_at = None;
        self.swap_requested = false;
        let target = self.stop_target();
        match (&mut self.busy, self.state) {
            (_, State::Stop) => {}
            (Some(Busy::StartingPrim { then_stop }), _) => {
                // Stop as soon as start_prim returns (a forced stop is forced then).
                *then_stop = Some(then_stop.unwrap_or(false) || force);
            }
            (
                Some(Busy::StoppingPrim {
                    force: running_forced,
                    then,
                }),
                _,
            ) => {
                *then = target;
                if force && !*running_forced {
                    *running_forced = true;
                    out.push(Action::RunScript(Script::StopPrim { force: true }));
                }
            }
            (None, state) if state.runs_application() => {
                self.stop_application(force, target, out);
            }
            (None, State::Second(phase)) => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                if phase == SecondPhase::Resyncing {
                    log(
                        out,
                        Level::Warn,
                        "Stopped during reintegration: the next start resumes it".into(),
                    );
                }
                self.handover_until = None;
                self.persistent.up_to_date = false;
                self.persistent.was_primary = false;
                self.persist(out);
                self.transition(State::Stop, "stop", out);
            }
            (None, _) => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.transition(State::Stop, "stop", out);
            }
        }
    }

    /// After stop_prim on a node running the application: whether it stays up to date.
    fn stop_target(&self) -> AfterStop {
        // With an in-sync SECOND, the peer takes over and becomes the up-to-date node.
        let peer_takes_over = self.state == State::Prim
            && self.peer_present().is_some_and(PeerView::in_sync_second)
            && self.params.failover;
        AfterStop::Stop {
            persist_up_to_date: !peer_takes_over,
        }
    }

    fn on_script(&mut self, script: Script, success: bool, out: &mut Vec<Action>) {
        match (self.busy.take(), script) {
            (Some(Busy::StartingPrim { then_stop }), Script::StartPrim) => {
                if !success {
                    log(
                        out,
                        Level::Error,
                        "start_prim failed (see the application log)".into(),
                    );
                }
                if let Some(force) = then_stop {
                    let then = self.stop_target();
                    self.stop_application(force, then, out);
                }
            }
            (
                Some(Busy::StoppingPrim { force: false, then }),
                Script::StopPrim { force: false },
            ) if !success => {
                log(
                    out,
                    Level::Warn,
                    "stop_prim failed: running stop_prim force".into(),
                );
                out.push(Action::RunScript(Script::StopPrim { force: true }));
                self.busy = Some(Busy::StoppingPrim { force: true, then });
            }
            (
                Some(Busy::StoppingPrim { force, then }),
                Script::StopPrim {
                    force: script_force,
                },
            ) if force == script_force => {
                if !success {
                    log(
                        out,
                        Level::Error,
                        "stop_prim force failed (see the application log)".into(),
                    );
                }
                self.after_application_stopped(then, out);
            }
            (busy, script) => {
                // A graceful stop_prim returning after a forced one was started, or a stray report.
                self.busy = busy;
                log(out, Level::Info, format!("Ignored the end of {script:?}"));
            }
        }
    }

    fn on_resync_completed(&mut self, out: &mut Vec<Action>) {
        if self.state != State::Second(SecondPhase::Resyncing) {
            log(
                out,
                Level::Info,
                "Ignored a reintegration completion outside SECOND".into(),
            );
            return;
        }
        let Some(target) = self.resync_target.take() else {
            self.never("reintegration completed without a target history", out);
            return;
        };
        self.persistent.last_shared = target.current().map(|generation| generation.id);
        self.persistent.history = target;
        self.persistent.resync_in_progress = None;
        self.persistent.up_to_date = false;
        self.persist(out);
        self.resync_percent = 100;
        log(out, Level::Info, "Reintegration completed".into());
        self.transition(
            State::Second(SecondPhase::InSync),
            "reintegration completed",
            out,
        );
    }

    fn on_replication_lost(&mut self, out: &mut Vec<Action>) {
        match self.state {
            State::Prim if self.peer_present().is_some() => {
                // Heartbeats still arrive: replication itself failed. Keep serving, alone.
                log(
                    out,
                    Level::Warn,
                    "Replication to the peer failed: running alone (degraded)".into(),
                );
                self.degraded = true;
                self.alone_while_stopping(out);
                self.go_alone(Origin::ContinuedPrimary, true, "replication degraded", out);
            }
            State::Alone if self.serve.is_some() => self.serve_link_lost(out),
            State::Second(_) => {
                // The primary decides (degraded or dead); its heartbeats tell us which.
                log(
                    out,
                    Level::Warn,
                    "Replication connection from the primary lost".into(),
                );
            }
            _ => {}
        }
    }

    // ----- evaluation -----

    fn peer_present(&self) -> Option<&PeerView> {
        match self.monitor.peer(self.now) {
            PeerLink::Alive => self.peer.as_ref(),
            _ => None,
        }
    }

    fn evaluate(&mut self, out: &mut Vec<Action>) {
        let link = self.monitor.peer(self.now);
        for change in self.monitor.changes(self.now) {
            if change.up {
                log(
                    out,
                    Level::Info,
                    format!("Heartbeat on LAN {} is up", change.name),
                );
            } else if link == PeerLink::Alive {
                log(
                    out,
                    Level::Warn,
                    format!(
                        "Heartbeat on LAN {} lost; the peer is still heard on another LAN (degraded LAN)",
                        change.name
                    ),
                );
            } else {
                log(
                    out,
                    Level::Warn,
                    format!("Heartbeat on LAN {} lost", change.name),
                );
            }
        }
        if self.retry_at.is_some_and(|at| at <= self.now) {
            self.retry_at = None;
        }
        if self.handover_until.is_some_and(|at| at <= self.now) {
            self.handover_until = None;
            if self.state == State::Second(SecondPhase::InSync)
                && self.peer_present().is_some_and(PeerView::in_sync_second)
            {
                log(
                    out,
                    Level::Warn,
                    "Swap: the peer did not take over in time; taking the primary role back".into(),
                );
                self.take_over_from_swap(out);
                return;
            }
        }
        if self.degraded
            && self.state == State::Alone
            && self.busy.is_none()
            && link == PeerLink::Lost
            && self.params.witness
            && self.witness != Some(true)
        {
            // We went ALONE on a replication failure while the peer was still
            // heard; now it is lost too, which is the PRIM → ALONE transition
            // the witness guards.
            self.degraded = false;
            log(
                out,
                Level::Warn,
                "Peer lost and split-brain witness unreachable: stopping the application".into(),
            );
            self.witness_resume = Some(Origin::ContinuedPrimary);
            self.stop_application(false, AfterStop::Wait(WaitReason::WitnessUnreachable), out);
            return;
        }
        if self.degraded
            && !self.peer_present().is_some_and(|peer| {
                peer.in_sync_second() || peer.status.detail == Detail::ReplicationDegraded
            })
        {
            // The peer left the broken session (lost, stopped, restarted a
            // reintegration, or runs alone): the next reintegration starts afresh.
            self.degraded = false;
        }
        let present = self.peer_present().cloned();
        match self.state {
            State::Stop => self.observe_while_stopped(present.as_ref(), out),
            State::Wait(_) => {
                if self.busy.is_none() {
                    self.decide_started(out);
                }
            }
            State::Alone => {
                let Some(peer) = present else {
                    self.serve_peer(None, out);
                    return;
                };
                if self.busy.is_some() {
                    return;
                }
                if peer.runs_application() {
                    self.resolve_split_brain(&peer, out);
                } else if !self.split_brain_logged
                    && peer.status.state == ModuleState::Second
                    && matches!(
                        compare(&self.persistent.history, &peer.history),
                        Verdict::Diverged { .. }
                    )
                {
                    // The loser gave up before we saw it running: the split brain is over.
                    self.split_brain_logged = true;
                    log(
                        out,
                        Level::Warn,
                        format!(
                            "Split brain recovery: staying alone ({} resyncs)",
                            self.params.peer
                        ),
                    );
                } else if peer.in_sync_second()
                    && peer.history.current() == self.persistent.history.current()
                {
                    out.push(Action::SetReplicationRole(ReplicationRole::Primary));
                    self.persistent.last_shared = self.persistent.history.current().map(|g| g.id);
                    self.persist(out);
                    self.transition(State::Prim, "the peer is SECOND and up to date", out);
                    self.serve_peer(Some(&peer), out);
                    self.default_prim_swap(&peer, out);
                } else {
                    self.serve_peer(Some(&peer), out);
                }
            }
            State::Prim => match present {
                None => self.primary_lost_peer("no heartbeat", out),
                Some(peer) if peer.runs_application() => {
                    if self.busy.is_none() {
                        self.resolve_split_brain(&peer, out);
                    }
                }
                Some(peer) if peer.status.state != ModuleState::Second => {
                    self.primary_lost_peer("remote stop", out);
                }
                Some(peer) => {
                    self.serve_peer(Some(&peer), out);
                    if peer.status.swap_requested && peer.in_sync_second() && self.busy.is_none() {
                        log(out, Level::Info, "Action swap called by the peer".into());
                        self.stop_application(false, AfterStop::Handover, out);
                    }
                }
            },
            State::Second(phase) => self.evaluate_second(phase, present, out),
        }
    }

    fn evaluate_second(
        &mut self,
        phase: SecondPhase,
        present: Option<PeerView>,
        out: &mut Vec<Action>,
    ) {
        match present {
            None => self.second_lost_peer(phase, "no heartbeat", out),
            Some(peer) if peer.runs_application() => {
                if peer.status.state == ModuleState::Prim {
                    self.handover_until = None;
                } else {
                    self.swap_requested = false;
                }
                if peer.status.replication_degraded && phase == SecondPhase::InSync {
                    out.push(Action::SetReplicationRole(ReplicationRole::Off));
                    // Unlike SafeKit (manual stop/start), retry a reintegration after `timeout`.
                    self.retry_at = Some(self.now + self.params.timeout);
                    self.transition(
                        State::Wait(WaitReason::ReplicationDegraded),
                        "the primary runs alone after a replication failure (degraded)",
                        out,
                    );
                } else if phase == SecondPhase::Resyncing {
                    self.second_observes_serve(&peer, out);
                } else if phase == SecondPhase::InSync
                    && peer.history.current() != self.persistent.history.current()
                {
                    // The primary started a generation without us: we missed writes.
                    let kind = match compare(&self.persistent.history, &peer.history) {
                        Verdict::RemoteAhead { since } => ResyncKind::Incremental { since },
                        _ => ResyncKind::Full,
                    };
                    self.go_second(kind, &peer, "the primary ran alone: reintegration", out);
                }
            }
            Some(peer)
                if self.handover_until.is_some() && peer.status.state == ModuleState::Second =>
            {
                // Our own swap: waiting for the peer to take over.
            }
            Some(peer) if peer.status.handover && phase == SecondPhase::InSync => {
                self.take_over_from_swap(out);
            }
            Some(peer) if peer.status.state == ModuleState::Second => {
                self.never_wait("both nodes are SECOND", out);
            }
            Some(_) => self.second_lost_peer(phase, "remote stop", out),
        }
    }

    fn observe_while_stopped(&mut self, present: Option<&PeerView>, out: &mut Vec<Action>) {
        // A stopped node keeps listening: if the peer ran alone after us, we are no longer up to date.
        if let Some(peer) = present
            && self.persistent.up_to_date
            && matches!(
                compare(&self.persistent.history, &peer.history),
                Verdict::RemoteAhead { .. }
            )
        {
            self.persistent.up_to_date = false;
            self.persist(out);
            log(
                out,
                Level::Info,
                "The peer ran after this node: data no longer up to date".into(),
            );
        }
    }

    fn resolve_pending(&mut self, out: &mut Vec<Action>) {
        if self.pending.is_none() || self.monitor.peer(self.now) == PeerLink::Unknown {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        let present = self.peer_present().cloned();
        let peer_runs = present.as_ref().is_some_and(PeerView::runs_application);
        let (command, caller) = match &pending {
            Pending::Prim {
                force: true,
                caller,
            } => (Command::PrimForce, caller.clone()),
            Pending::Prim {
                force: false,
                caller,
            } => (Command::Prim, caller.clone()),
            Pending::Second { caller } => (Command::Second, caller.clone()),
        };
        let refuse = |machine: &mut Machine, out: &mut Vec<Action>, reason: String| {
            log(
                out,
                Level::Warn,
                format!("Action {} refused: {reason}", command.name()),
            );
            out.push(Action::RefuseCommand { command, reason });
            if machine.state == State::Wait(WaitReason::PeerUnknown) {
                // Nothing else was asked: back to where the operator started from.
                machine.transition(State::Stop, "command refused", out);
            }
        };
        match pending {
            Pending::Prim { force, .. } => {
                if let Some(peer) = present.as_ref().filter(|_| peer_runs) {
                    let state = peer.status.state;
                    refuse(self, out, format!("the peer node is primary ({state:?})"));
                    return;
                }
                if self.persistent.resync_in_progress.is_some() && !force {
                    refuse(
                        self,
                        out,
                        "Data may be inconsistent: this node was stopped during reintegration; use primforce"
                            .into(),
                    );
                    return;
                }
                if force && self.persistent.resync_in_progress.is_some() {
                    // Our data may be corrupt: forget the shared history so that
                    // the peer's next reintegration is a full copy.
                    log(
                        out,
                        Level::Warn,
                        "primforce: data may be inconsistent; the peer's next reintegration is a full copy".into(),
                    );
                    self.persistent.history = History::new();
                    self.persistent.resync_in_progress = None;
                }
                if !self.persistent.up_to_date {
                    log(
                        out,
                        Level::Warn,
                        format!("Forced start as primary by {caller}: data may not be up to date"),
                    );
                }
                self.go_alone(
                    Origin::Forced,
                    false,
                    &format!("{} called by {caller} (forced)", command.name()),
                    out,
                );
            }
            Pending::Second { .. } => match present {
                Some(peer) if peer_runs => {
                    self.join_as_second(&peer, &format!("second called by {caller}"), out);
                }
                _ => refuse(self, out, "the peer node is not primary".into()),
            },
        }
    }

    /// A started node that does not run the application decides what to do.
    fn decide_started(&mut self, out: &mut Vec<Action>) {
        let link = self.monitor.peer(self.now);
        if link == PeerLink::Unknown {
            if self.state != State::Wait(WaitReason::PeerUnknown) && self.pending.is_some() {
                self.transition(
                    State::Wait(WaitReason::PeerUnknown),
                    "waiting for the peer",
                    out,
                );
            }
            return;
        }
        if self.pending.is_some() {
            self.resolve_pending(out);
            return;
        }
        let present = self.peer_present().cloned();
        let State::Wait(reason) = self.state else {
            return;
        };
        // Reasons that hold until something specific changes.
        match reason {
            WaitReason::ResourceDown => {
                let down: Vec<&String> = self
                    .waiting_for
                    .iter()
                    .filter(|resource| self.checkers.get(*resource) != Some(&true))
                    .collect();
                if !down.is_empty() {
                    return;
                }
                let resources: Vec<String> =
                    std::mem::take(&mut self.waiting_for).into_iter().collect();
                log(
                    out,
                    Level::Info,
                    format!(
                        "Action wakeup called by Implicit_wakeup: {} up again",
                        resources.join(", ")
                    ),
                );
            }
            WaitReason::Inconsistent => return,
            WaitReason::FailoverOff if present.is_none() => return,
            WaitReason::ReplicationDegraded | WaitReason::ResyncFailed
                if self.retry_at.is_some() =>
            {
                return;
            }
            WaitReason::WitnessUnreachable if present.is_none() => {
                if let (Some(true), Some(origin)) = (self.witness, self.witness_resume) {
                    self.witness_resume = None;
                    self.go_alone(origin, false, "split-brain witness reachable again", out);
                }
                return;
            }
            _ => {}
        }
        if !self.resources_init.is_empty() {
            // SafeKit: while a resource used by a wait rule is still init, the
            // module stays in WAIT (Transient) instead of going on.
            let resources: Vec<&str> = self.resources_init.iter().map(String::as_str).collect();
            let why = format!(
                "waiting for the first verdict of {} (used by a wait rule)",
                resources.join(", ")
            );
            self.set_wait(WaitReason::ResourceInit, &why, out);
            return;
        }
        self.witness_resume = None;
        match present {
            Some(peer) if peer.runs_application() => {
                self.join_as_second(&peer, "the peer is primary", out);
            }
            Some(peer) if peer.status.state == ModuleState::Second => {
                // Transient: the peer believes in a primary that is gone; it will take over or stop.
                self.set_wait(WaitReason::PeerNotPrimary, "the peer is SECOND", out);
            }
            None => {
                if self.persistent.resync_in_progress.is_some() {
                    self.set_wait(
                        WaitReason::ResyncInterrupted,
                        "Data may be inconsistent: stopped during reintegration",
                        out,
                    );
                } else if self.persistent.up_to_date {
                    self.go_alone(
                        Origin::Start,
                        false,
                        "start: data up to date, peer absent",
                        out,
                    );
                } else {
                    self.set_wait(
                        WaitReason::NotUpToDate,
                        "Data may be not uptodate for an automatic start: wait for the start of the remote server",
                        out,
                    );
                }
            }
            Some(peer) => self.decide_with_idle_peer(&peer, out),
        }
    }

    /// Both nodes are started or stopped, neither runs the application: who has the newer data?
    fn decide_with_idle_peer(&mut self, peer: &PeerView, out: &mut Vec<Action>) {
        if self.persistent.resync_in_progress.is_some() {
            self.set_wait(
                WaitReason::ResyncInterrupted,
                "Data may be inconsistent: stopped during reintegration",
                out,
            );
            return;
        }
        let mine = self.persistent.up_to_date;
        let theirs = peer.status.up_to_date && !peer.status.resync_interrupted;
        let winner = match compare(&self.persistent.history, &peer.history) {
            Verdict::LocalAhead { .. } => Some(Side::Local),
            Verdict::RemoteAhead { .. } => {
                if self.persistent.up_to_date {
                    self.persistent.up_to_date = false;
                    self.persist(out);
                }
                Some(Side::Remote)
            }
            Verdict::Diverged {
                local_first,
                remote_first,
                ..
            } => Some(split_brain_winner(
                local_first.origin,
                remote_first.origin,
                &self.params.node,
                &self.params.peer,
            )),
            Verdict::Equal { .. } | Verdict::Unrelated => match (mine, theirs) {
                (true, false) => Some(Side::Local),
                (false, true) => Some(Side::Remote),
                (false, false) => None,
                (true, true) => {
                    self.never_wait("both nodes claim to be up to date with the same data", out);
                    return;
                }
            },
        };
        match winner {
            Some(Side::Local) => self.go_alone(Origin::Start, false, "start: this node holds the newer data", out),
            Some(Side::Remote) if peer.status.state == ModuleState::Stop => self.set_wait(
                WaitReason::NotUpToDate,
                "Data may be not uptodate for an automatic start: wait for the start of the remote server",
                out,
            ),
            Some(Side::Remote) => self.set_wait(
                WaitReason::PeerNotPrimary,
                "the peer holds the newer data: waiting for it to become primary",
                out,
            ),
            None => self.set_wait(
                WaitReason::NoUpToDateNode,
                "Data may be not uptodate on either node: start one with prim",
                out,
            ),
        }
    }

    fn join_as_second(&mut self, peer: &PeerView, reason: &str, out: &mut Vec<Action>) {
        let local_empty = self.persistent.history.current().is_none();
        let (kind, set_aside) = match compare(&self.persistent.history, &peer.history) {
            Verdict::RemoteAhead { since } | Verdict::Equal { current: since } => {
                let kind = match self.persistent.resync_in_progress {
                    Some(ResyncKind::Full) => ResyncKind::Full,
                    _ => ResyncKind::Incremental { since },
                };
                (kind, None)
            }
            Verdict::Diverged { common, .. } => (
                ResyncKind::Full,
                Some((
                    Some(common),
                    "split brain: both nodes ran alone; the peer kept running".to_string(),
                )),
            ),
            Verdict::LocalAhead { since } => (
                ResyncKind::Full,
                Some((
                    Some(since),
                    "this node held newer data than the running primary".to_string(),
                )),
            ),
            Verdict::Unrelated if local_empty => (ResyncKind::Full, None),
            Verdict::Unrelated => (
                ResyncKind::Full,
                Some((None, "no generation in common with the primary".to_string())),
            ),
        };
        if let Some((since, why)) = set_aside {
            log(
                out,
                Level::Warn,
                format!("Diverged files are set aside before reintegration: {why}"),
            );
            out.push(Action::SetAsideDivergedFiles { since, reason: why });
            self.persistent.up_to_date = false;
        }
        self.go_second(kind, peer, reason, out);
    }

    fn resolve_split_brain(&mut self, peer: &PeerView, out: &mut Vec<Action>) {
        let verdict = compare(&self.persistent.history, &peer.history);
        let (winner, since) = match verdict {
            Verdict::Diverged {
                common,
                local_first,
                remote_first,
            } => (
                split_brain_winner(
                    local_first.origin,
                    remote_first.origin,
                    &self.params.node,
                    &self.params.peer,
                ),
                Some(common),
            ),
            Verdict::LocalAhead { since } => (Side::Local, Some(since)),
            Verdict::RemoteAhead { since } => (Side::Remote, Some(since)),
            Verdict::Equal { current } => {
                log(
                    out,
                    Level::Error,
                    "Both nodes run the application in the same generation".into(),
                );
                let local = self
                    .persistent
                    .history
                    .current()
                    .map_or(Origin::Start, |g| g.origin);
                let remote = peer.history.current().map_or(Origin::Start, |g| g.origin);
                (
                    split_brain_winner(local, remote, &self.params.node, &self.params.peer),
                    Some(current),
                )
            }
            Verdict::Unrelated => {
                let local = self
                    .persistent
                    .history
                    .current()
                    .map_or(Origin::Start, |g| g.origin);
                let remote = peer.history.current().map_or(Origin::Start, |g| g.origin);
                (
                    split_brain_winner(local, remote, &self.params.node, &self.params.peer),
                    None,
                )
            }
        };
        match winner {
            Side::Local => {
                if !self.split_brain_logged {
                    self.split_brain_logged = true;
                    log(
                        out,
                        Level::Warn,
                        format!(
                            "Split brain recovery: staying alone ({} stops)",
                            self.params.peer
                        ),
                    );
                }
            }
            Side::Remote => {
                log(
                    out,
                    Level::Warn,
                    format!(
                        "Split brain recovery: exiting alone ({} stays primary)",
                        self.params.peer
                    ),
                );
                let reason = format!(
                    "split brain: {} stays primary (it was {}), this node's changes since the last common generation are kept aside",
                    self.params.peer,
                    match peer.history.current().map(|g| g.origin) {
                        Some(Origin::ContinuedPrimary) => "primary when the nodes lost each other",
                        Some(Origin::Takeover) => "the secondary that took over",
                        _ => "started alone",
                    }
                );
                self.stop_application(
                    false,
                    AfterStop::SecondAfterSplitBrain { since, reason },
                    out,
                );
            }
        }
    }

    // ----- reintegration handshake (see the `cluster` module documentation) -----

    /// The primary serves the reintegration its resynchronizing peer asks for,
    /// once per attempt, and forgets it when the peer stops asking.
    fn serve_peer(&mut self, peer: Option<&PeerView>, out: &mut Vec<Action>) {
        let request = peer
            .filter(|peer| {
                peer.status.state == ModuleState::Second && peer.status.detail == Detail::Resyncing
            })
            .and_then(|peer| peer.status.resync_request.map(|request| (peer, request)));
        match request {
            Some((_, request))
                if self
                    .serve
                    .is_some_and(|serve| serve.attempt == request.attempt) => {}
            Some((peer, request)) => {
                let kind = match compare(&self.persistent.history, &peer.history) {
                    Verdict::LocalAhead { since } | Verdict::Equal { current: since }
                        if !request.full =>
                    {
                        ResyncKind::Incremental { since }
                    }
                    _ => ResyncKind::Full,
                };
                self.serve = Some(ResyncServeStatus {
                    attempt: request.attempt,
                    full: kind == ResyncKind::Full,
                    phase: ServePhase::Running(ResyncProgressStatus::default()),
                });
                self.resync_progress = None;
                out.push(Action::SetReplicationRole(ReplicationRole::Primary));
                out.push(Action::ServeResync {
                    kind,
                    attempt: request.attempt,
                });
                let what = match kind {
                    ResyncKind::Full => "full".to_string(),
                    ResyncKind::Incremental { since } => {
                        format!("incremental since generation {since}")
                    }
                };
                log(
                    out,
                    Level::Info,
                    format!(
                        "Reintegration of {} served from this node ({what})",
                        self.params.peer
                    ),
                );
            }
            None => {
                if self.serve.take().is_some() {
                    let joined = peer.is_some_and(|peer| {
                        peer.in_sync_second()
                            && peer.history.current() == self.persistent.history.current()
                    });
                    if self.state == State::Alone && !joined {
                        // The peer left its reintegration (failed, stopped, gone):
                        // stop sending and record every change again.
                        out.push(Action::SetReplicationRole(ReplicationRole::Alone));
                    }
                }
            }
        }
    }

    fn on_resync_served(
        &mut self,
        attempt: u64,
        progress: ResyncProgressStatus,
        out: &mut Vec<Action>,
    ) {
        let generation = self.persistent.history.current().map(|g| g.id);
        let Some(serve) = self.serve.as_mut().filter(|serve| {
            serve.attempt == attempt && matches!(serve.phase, ServePhase::Running(_))
        }) else {
            log(
                out,
                Level::Info,
                "Ignored the end of a reintegration no longer served".into(),
            );
            return;
        };
        let Some(generation) = generation else {
            serve.phase = ServePhase::Failed;
            self.never("reintegration served without a current generation", out);
            return;
        };
        serve.phase = ServePhase::Served {
            generation: generation.0,
            progress,
        };
        self.resync_progress = Some(progress);
        log(
            out,
            Level::Info,
            format!(
                "Reintegration of {} served up to generation {generation}: {} files, {} bytes sent",
                self.params.peer, progress.files_done, progress.bytes_sent
            ),
        );
    }

    /// The replication connection broke while this ALONE node served a reintegration.
    fn serve_link_lost(&mut self, out: &mut Vec<Action>) {
        let Some(serve) = self.serve.as_mut() else {
            return;
        };
        match serve.phase {
            ServePhase::Running(_) => {
                serve.phase = ServePhase::Failed;
                log(
                    out,
                    Level::Warn,
                    "Replication connection lost during the reintegration: the peer retries".into(),
                );
            }
            ServePhase::Served { .. } => {
                // The peer may already count itself in sync with our generation
                // while changes since then were only recorded here: a new
                // generation makes it reintegrate them.
                log(
                    out,
                    Level::Warn,
                    "Replication connection lost after the reintegration: new generation".into(),
                );
                self.go_alone(
                    Origin::ContinuedPrimary,
                    true,
                    "replication lost after reintegration",
                    out,
                );
            }
            ServePhase::Failed => {}
        }
    }

    /// A resynchronizing SECOND reads the outcome of its attempt in the primary's heartbeat.
    fn second_observes_serve(&mut self, peer: &PeerView, out: &mut Vec<Action>) {
        let Some(serve) = peer
            .status
            .resync_serve
            .filter(|serve| serve.attempt == self.resync_attempt)
        else {
            return;
        };
        match serve.phase {
            ServePhase::Running(progress) => {
                // Progress never goes back within one attempt (a data path may also report it).
                let percent = progress.percent.min(100).max(self.resync_percent);
                if percent / 10 > self.resync_percent / 10 {
                    log(
                        out,
                        Level::Info,
                        format!("Reintegration progress: {percent}%"),
                    );
                }
                self.resync_percent = percent;
                self.resync_progress = Some(progress);
            }
            ServePhase::Served {
                generation,
                progress,
            } => {
                if peer.history.current().map(|g| g.id.0) != Some(generation) {
                    // The primary moved to a new generation since: it serves again.
                    return;
                }
                self.resync_progress = Some(progress);
                self.resync_target = Some(peer.history.clone());
                self.on_resync_completed(out);
            }
            ServePhase::Failed => {
                let reason = "the primary reported the reintegration failed".to_string();
                log(out, Level::Error, format!("Reintegration failed: {reason}"));
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.retry_at = Some(self.now + self.params.timeout);
                self.transition(State::Wait(WaitReason::ResyncFailed), &reason, out);
            }
        }
    }

    fn primary_lost_peer(&mut self, why: &str, out: &mut Vec<Action>) {
        if matches!(self.busy, Some(Busy::StoppingPrim { .. })) {
            log(out, Level::Warn, format!("Peer lost while stopping: {why}"));
            self.alone_while_stopping(out);
            self.go_alone(Origin::ContinuedPrimary, true, why, out);
            return;
        }
        if self.params.witness && why == "no heartbeat" && self.witness != Some(true) {
            log(
                out,
                Level::Warn,
                "Split-brain witness unreachable: stopping the application".into(),
            );
            self.witness_resume = Some(Origin::ContinuedPrimary);
            self.stop_application(false, AfterStop::Wait(WaitReason::WitnessUnreachable), out);
            return;
        }
        log(
            out,
            Level::Warn,
            format!("Action alone called by heart: {why}"),
        );
        self.go_alone(Origin::ContinuedPrimary, true, why, out);
    }

    /// The PRIM loses its peer (or replication) while stop_prim runs: a stop
    /// leaves this node up to date (nobody in sync takes over), and a swap is
    /// aborted (the peer no longer holds our data): the application restarts here.
    fn alone_while_stopping(&mut self, out: &mut Vec<Action>) {
        if let Some(Busy::StoppingPrim { then, .. }) = &mut self.busy {
            match then {
                AfterStop::Stop { persist_up_to_date }
                | AfterStop::WaitResource { persist_up_to_date } => *persist_up_to_date = true,
                AfterStop::Handover => {
                    *then = AfterStop::Restart;
                    log(out, Level::Warn, "Swap aborted: the peer is no longer in sync; restarting the application here".into());
                }
                _ => {}
            }
        }
    }

    fn second_lost_peer(&mut self, phase: SecondPhase, why: &str, out: &mut Vec<Action>) {
        self.handover_until = None;
        self.swap_requested = false;
        if phase == SecondPhase::Resyncing {
            out.push(Action::SetReplicationRole(ReplicationRole::Off));
            self.set_wait(
                WaitReason::ResyncInterrupted,
                &format!("{why} during reintegration: not up to date, never primary on its own"),
                out,
            );
            return;
        }
        if !self.params.failover {
            out.push(Action::SetReplicationRole(ReplicationRole::Off));
            log(
                out,
                Level::Warn,
                "Action stopstart called by failover-off".into(),
            );
            self.set_wait(
                WaitReason::FailoverOff,
                &format!("{why}: Failover-off configured"),
                out,
            );
            return;
        }
        if self.params.witness && why == "no heartbeat" && self.witness != Some(true) {
            out.push(Action::SetReplicationRole(ReplicationRole::Off));
            self.witness_resume = Some(Origin::Takeover);
            self.set_wait(
                WaitReason::WitnessUnreachable,
                &format!("{why}: split-brain witness unreachable"),
                out,
            );
            return;
        }
        log(
            out,
            Level::Warn,
            format!("Action alone called by heart: {why}"),
        );
        self.go_alone(Origin::Takeover, false, why, out);
    }

    fn take_over_from_swap(&mut self, out: &mut Vec<Action>) {
        self.swap_requested = false;
        self.persistent.up_to_date = true;
        self.persistent.was_primary = true;
        self.persist(out);
        out.push(Action::SetReplicationRole(ReplicationRole::Primary));
        out.push(Action::TakeVip);
        out.push(Action::RunScript(Script::StartPrim));
        self.busy = Some(Busy::StartingPrim { then_stop: None });
        self.transition(State::Prim, "swap", out);
    }

    fn default_prim_swap(&mut self, peer: &PeerView, out: &mut Vec<Action>) {
        let swap = match &self.params.defaultprim {
            DefaultPrim::Alone => None,
            DefaultPrim::Node(name) if *name == self.params.peer => Some("defaultprim"),
            DefaultPrim::Node(_) => None,
            DefaultPrim::LastPrim if peer.status.was_primary => Some("lastprim"),
            DefaultPrim::LastPrim => None,
        };
        if let Some(rule) = swap {
            log(out, Level::Info, format!("Transition SWAP from {rule}"));
            self.stop_application(false, AfterStop::Handover, out);
        }
    }

    // ----- transitions -----

    fn go_alone(
        &mut self,
        origin: Origin,
        application_running: bool,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        let generation = self.new_generation(origin);
        self.persistent.history.push(generation);
        self.persistent.up_to_date = true;
        self.persistent.was_primary = true;
        self.persistent.resync_in_progress = None;
        self.persist(out);
        // A served reintegration described the previous generation; the peer's
        // request (if it still waits) is served again over the new one.
        self.serve = None;
        self.split_brain_logged = false;
        self.handover_until = None;
        self.swap_requested = false;
        out.push(Action::SetReplicationRole(ReplicationRole::Alone));
        if !application_running {
            out.push(Action::TakeVip);
            out.push(Action::RunScript(Script::StartPrim));
            self.busy = Some(Busy::StartingPrim { then_stop: None });
        }
        log(
            out,
            Level::Info,
            format!("New generation {} ({origin:?})", generation.id),
        );
        self.transition(State::Alone, reason, out);
    }

    fn go_second(
        &mut self,
        kind: ResyncKind,
        peer: &PeerView,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        self.persistent.resync_in_progress = Some(kind);
        self.persistent.up_to_date = false;
        self.persist(out);
        self.resync_target = Some(peer.history.clone());
        self.resync_percent = 0;
        self.resync_progress = None;
        self.attempt_counter += 1;
        self.resync_attempt = splitmix64(
            self.seed.rotate_left(29) ^ splitmix64(self.attempt_counter ^ 0x5e4e_d000_0000_0000),
        );
        out.push(Action::SetReplicationRole(ReplicationRole::Secondary));
        out.push(Action::StartResync { kind });
        let what = match kind {
            ResyncKind::Full => "full".to_string(),
            ResyncKind::Incremental { since } => format!("incremental since generation {since}"),
        };
        log(out, Level::Info, format!("Reintegration started ({what})"));
        self.transition(State::Second(SecondPhase::Resyncing), reason, out);
    }

    fn stop_application(&mut self, force: bool, then: AfterStop, out: &mut Vec<Action>) {
        out.push(Action::RunScript(Script::StopPrim { force }));
        self.busy = Some(Busy::StoppingPrim { force, then });
    }

    fn after_application_stopped(&mut self, then: AfterStop, out: &mut Vec<Action>) {
        if then == AfterStop::Restart {
            out.push(Action::RunScript(Script::StartPrim));
            self.busy = Some(Busy::StartingPrim { then_stop: None });
            return;
        }
        out.push(Action::ReleaseVip);
        match then {
            AfterStop::Restart => {}
            AfterStop::Stop { persist_up_to_date } => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.persistent.up_to_date = persist_up_to_date;
                self.persistent.was_primary = persist_up_to_date;
                self.persist(out);
                self.transition(State::Stop, "stop", out);
            }
            AfterStop::Wait(reason) => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.transition(State::Wait(reason), reason.describe(), out);
            }
            AfterStop::WaitResource { persist_up_to_date } => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                self.persistent.up_to_date = persist_up_to_date;
                self.persistent.was_primary = persist_up_to_date;
                self.persist(out);
                let resources: Vec<String> = self.waiting_for.iter().cloned().collect();
                self.transition(
                    State::Wait(WaitReason::ResourceDown),
                    &format!("{} down", resources.join(", ")),
                    out,
                );
            }
            AfterStop::SecondAfterSplitBrain { since, reason } => {
                out.push(Action::SetReplicationRole(ReplicationRole::Off));
                out.push(Action::SetAsideDivergedFiles {
                    since,
                    reason: reason.clone(),
                });
                self.persistent.up_to_date = false;
                self.persistent.was_primary = false;
                self.persist(out);
                match self
                    .peer_present()
                    .cloned()
                    .filter(PeerView::runs_application)
                {
                    Some(peer) => self.go_second(ResyncKind::Full, &peer, &reason, out),
                    None => self.set_wait(
                        WaitReason::NotUpToDate,
                        "split brain recovery: the peer disappeared",
                        out,
                    ),
                }
            }
            AfterStop::Handover => {
                out.push(Action::SetReplicationRole(ReplicationRole::Secondary));
                self.persistent.up_to_date = false;
                self.persistent.was_primary = false;
                self.persist(out);
                self.handover_until = Some(self.now + self.params.timeout);
                self.transition(State::Second(SecondPhase::InSync), "swap", out);
            }
        }
    }

    fn set_wait(&mut self, reason: WaitReason, why: &str, out: &mut Vec<Action>) {
        self.transition(State::Wait(reason), why, out);
    }

    fn transition(&mut self, to: State, reason: &str, out: &mut Vec<Action>) {
        let from = self.state;
        if from == to {
            return;
        }
        let stopping_to_wait = matches!(
            self.busy,
            Some(Busy::StoppingPrim {
                then: AfterStop::WaitResource { .. },
                ..
            })
        );
        if to != State::Wait(WaitReason::ResourceDown) && !stopping_to_wait {
            // Left the wait (stop, prim, second, wakeup): nothing holds the module any more.
            self.waiting_for.clear();
        }
        self.state = to;
        if !matches!(to, State::Second(_)) {
            self.resync_target = None;
        }
        out.push(Action::StateChanged {
            from,
            to,
            reason: reason.to_string(),
        });
        self.last_transition = Some(Transition {
            at: self.now,
            from,
            to,
            reason: reason.to_string(),
        });
    }

    fn persist(&self, out: &mut Vec<Action>) {
        out.push(Action::PersistState(self.persistent.clone()));
    }

    fn new_generation(&mut self, origin: Origin) -> Generation {
        self.generation_counter += 1;
        let id = splitmix64(self.seed ^ splitmix64(self.generation_counter));
        Generation {
            id: GenerationId(id),
            origin,
        }
    }

    /// An impossible combination: log at error, never guess.
    fn never(&mut self, what: &str, out: &mut Vec<Action>) {
        log(
            out,
            Level::Error,
            format!("Impossible state: {what}; waiting for the operator"),
        );
    }

    fn never_wait(&mut self, what: &str, out: &mut Vec<Action>) {
        self.never(what, out);
        if self.state.runs_application() {
            self.stop_application(true, AfterStop::Wait(WaitReason::Inconsistent), out);
        } else {
            out.push(Action::SetReplicationRole(ReplicationRole::Off));
            self.set_wait(WaitReason::Inconsistent, what, out);
        }
    }
}

fn log(out: &mut Vec<Action>, level: Level, message: String) {
    out.push(Action::Log { level, message });
}
