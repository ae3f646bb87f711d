//! One module's runner: the task that owns its state machine and executes its actions.
//!
//! Everything that happens to the module arrives on one channel as a
//! [`RunnerEvent`] (operator commands with the caller's identity, heartbeats
//! accepted by the receiver threads, script outcomes, data-path reports), or
//! is a tick at the machine's [`Machine::next_deadline`]. The runner turns each
//! into a core [`Event`], calls [`Machine::handle`] (the only place where this
//! module's decisions are made), and executes the returned [`Action`]s in
//! order:
//!
//! - `PersistState` is written with [`crate::persist::write_atomic`] and
//!   awaited before the next action (a new generation is on disk before
//!   `start_prim` runs). If it cannot be written the agent exits: the peer
//!   then sees a clean loss of heartbeats instead of a node acting on state it
//!   could not record.
//! - `RunScript` queues the script (SafeKit arguments, environment and
//!   timeouts, from [`crate::scripts`]) on the module's [`ScriptQueue`],
//!   which runs scripts one at a time; its outcome comes back as an event,
//!   so the runner keeps answering heartbeats and commands meanwhile. A
//!   forced `stop_prim` bypasses the queue so it can interrupt a hung one.
//! - `StateChanged` also queues the other SafeKit hooks present in `bin/`
//!   ([`scripts::transition_hooks`]: `transition`, `start_/stop_both`,
//!   `_sec`, `_second`, `poststop`), ahead of the same batch's `start_prim`;
//!   `prestart` runs (awaited) before a start verb reaches the machine.
//! - `restart` ([`scripts::restart_hooks`]): on ALONE/PRIM the machine's
//!   stop_prim;start_prim, with stop_both;start_both queued between them; on
//!   SECOND stop_both;start_both only (the runner answers, state kept); all
//!   with the arguments `<state> <state> restart`.
//! - `TakeVip`/`ReleaseVip` use netlink ([`crate::vip`]) on the interface
//!   named in the config or else the one whose subnet holds the address, and
//!   gratuitous ARP ([`crate::arp`]) when `arpreroute="on"`: a burst at once,
//!   then SafeKit's series every `arpinterval` for `arpelapse`.
//! - What a crash of the agent would leave running (the application from
//!   before `start_prim` until a successful `stop_prim`, the VIPs held, the
//!   custom checkers' process groups) is recorded durably, and cleaned up
//!   when the runner starts, before any command ([`super::leftovers`]).
//! - Data-path actions go to the module's [`DataPath`].
//! - Logs and state changes go to the module log ([`crate::modlog`]) and to
//!   `tracing` (one `info` event with `from`, `to`, `reason` per change).
//! - Checker observations ([`crate::checkers`]) become verdicts after their
//!   stability delay; a verdict change goes to the machine, a down verdict of
//!   an active checker fires its rule (`restart`, `stopstart`, `stop`,
//!   `swap`, or `stop` by `maxloop`: [`safekit_core::cluster::rules`]) as a
//!   command whose caller is the rule, or `wait` as
//!   `Event::WaitForResource`; the `<failover>` rules are evaluated on every
//!   verdict change and act once they held for `handle_time` (a timer wakes
//!   the loop then). After every event the machine learns which resources of
//!   wait rules are still `init` (`Event::WaitResourcesInit`: a started
//!   module stays in WAIT meanwhile). `safekit set`/`get` reach the checkers through
//!   [`RunnerEvent::SetResource`]/[`RunnerEvent::GetResource`]; custom
//!   checkers' programs are started and stopped after every event
//!   ([`crate::checkers::custom`]). Before a tick that may declare the peer
//!   lost, the split-brain witness is probed afresh.
//!
//! After every event the runner publishes the module's status (for
//! `safekit state`) and the heartbeat payload with this node's checker
//! resources (for the sender thread). The peer's resources arrive with its
//! heartbeats and go to the checkers' `remote.` values, which are forgotten
//! (`unknown`) once the peer is lost.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use safekit_core::cluster::{
    Action, Command, Event, Level as CoreLevel, Machine, ReplicationRole, Script, SecondPhase,
    State,
};
use safekit_protocol::admin::{AdminResponse, ModuleStatus, Verb};
use safekit_protocol::heartbeat::Heartbeat;
use tokio::sync::{mpsc, oneshot, watch};

use super::heartbeat::SharedStatus;
use super::load::ModuleSetup;
use crate::datapath::{DataPath, DataPathEvent};
use crate::modlog::{self, ModLog};
use crate::scripts::{self, AppLog, ScriptCall, ScriptEnv, ScriptQueue};
use crate::vip::Netlink;

/// Everything a module's runner reacts to, besides its own ticks.
#[derive(Debug)]
pub enum RunnerEvent {
    /// An operator verb; the answer goes back on `reply`.
    Control {
        /// The verb.
        verb: Verb,
        /// Who asked (`root`, `admin@10.0.0.1`, a checker's identity).
        caller: String,
        /// Where to answer.
        reply: oneshot::Sender<AdminResponse>,
    },
    /// An authenticated, fresh heartbeat from the peer, with the checker
    /// resources it carried (`None`: it sent none).
    Heartbeat(
        Heartbeat,
        Option<Vec<safekit_protocol::heartbeat::RemoteResource>>,
    ),
    /// A script returned.
    ScriptFinished {
        /// Which.
        script: Script,
        /// Exit status 0 (or the hook is absent).
        success: bool,
    },
    /// A report of the data path.
    DataPath(DataPathEvent),
    /// A checker's probe saw something ([`crate::checkers`]).
    Checker(crate::checkers::Observation),
    /// `safekit set -r RESOURCE -v up|down [-i identity]` (a custom checker's program reports).
    SetResource {
        /// The resource (`custom.<ident>`).
        resource: String,
        /// Up or down.
        up: bool,
        /// Who set it (`-i`).
        identity: Option<String>,
        /// Where to answer.
        reply: oneshot::Sender<AdminResponse>,
    },
    /// `safekit get -r RESOURCE`: its value (`up`, `down`, `init`).
    GetResource {
        /// The resource.
        resource: String,
        /// Where to answer.
        reply: oneshot::Sender<AdminResponse>,
    },
    /// `safekit config -m M` or `safekit cluster config`: replace the
    /// module's setup (validated by the sender); refused unless STOP.
    Reload {
        /// The new setup.
        setup: Box<ModuleSetup>,
        /// The scripts' environment for it.
        script_env: ScriptEnv,
        /// A data path for it (nothing mounted or bound yet).
        datapath: Box<dyn DataPath>,
        /// Who asked.
        caller: String,
        /// Where to answer.
        reply: oneshot::Sender<AdminResponse>,
    },
    /// `safekit cluster config`, before anything is applied: would `Reload`
    /// with this setup be accepted now? Nothing changes.
    CheckReload {
        /// The new setup.
        setup: Box<ModuleSetup>,
        /// Where to answer (`Ok` or the reason `Reload` would be refused).
        reply: oneshot::Sender<AdminResponse>,
    },
}

/// A `second` command waiting for a fresh heartbeat of the peer.
#[derive(Debug)]
struct DeferredSecond {
    caller: String,
    reply: oneshot::Sender<AdminResponse>,
    until: tokio::time::Instant,
}

/// One configured virtual IP.
#[derive(Debug, Clone)]
struct VipSpec {
    addr: IpAddr,
    ifname: Option<String>,
    arpreroute: bool,
    arpinterval: Duration,
    arpelapse: Duration,
}

/// The virtual IPs of a configuration.
fn vip_specs(config: &safekit_core::config::UserConfig) -> Vec<VipSpec> {
    config
        .service
        .vip_interfaces()
        .flat_map(|interface| {
            interface
                .real_virtual_addrs()
                .filter_map(move |virtual_addr| {
                    let text = virtual_addr.addr.trim_start_matches('[').trim_end_matches(']');
                    match text.parse::<IpAddr>() {
                        Ok(addr) => Some(VipSpec {
                            addr,
                            ifname: interface.name.clone(),
                            arpreroute: interface.arpreroute,
                            arpinterval: interface.arpinterval,
                            arpelapse: interface.arpelapse,
                        }),
                        Err(_) => {
                            tracing::error!(addr = %virtual_addr.addr, "virtual IP is not an IP address (host names are not resolved yet); ignored");
                            None
                        }
                    }
                })
        })
        .collect()
}

/// The runner of one module.
#[derive(Debug)]
pub struct Runner {
    setup: ModuleSetup,
    machine: Machine,
    origin: Instant,
    events: mpsc::UnboundedSender<RunnerEvent>,
    modlog: ModLog,
    applog: AppLog,
    script_env: ScriptEnv,
    scripts_enabled: bool,
    state_path: PathBuf,
    netlink: Option<Netlink>,
    vips: Vec<VipSpec>,
    vip_held: Vec<(String, IpAddr)>,
    arp_tasks: Vec<tokio::task::JoinHandle<()>>,
    datapath: Box<dyn DataPath>,
    status: watch::Sender<ModuleStatus>,
    heartbeat_status: SharedStatus,
    checkers: crate::checkers::CheckerSet,
    checker_specs: Vec<crate::checkers::CheckerSpec>,
    checker_problems: Vec<String>,
    /// A `stopstart` rule fired: start again (as this caller) once stopped.
    start_after_stop: Option<String>,
    /// Runs the scripts one after the other ([`ScriptQueue`]).
    script_queue: ScriptQueue,
    /// The stop under way is a `forcestop`: stop hooks get `force` at once.
    forced_stop: bool,
    /// A `restart` is under way: stop_prim/start_prim get `<state> <state>
    /// restart`, and stop_both/start_both run between them.
    restarting: bool,
    /// Bumped when the checkers are replaced (configuration applied): older probes end.
    checker_generation: Arc<std::sync::atomic::AtomicU64>,
    /// A `second` waiting for the peer's next heartbeat ([`Runner::second_needs_fresh_peer_state`]).
    deferred_second: Option<DeferredSecond>,
    /// The programs of the custom checkers ([`crate::checkers::custom`]).
    custom_programs: crate::checkers::custom::CustomPrograms,
    /// What a crash of the agent would leave running ([`super::leftovers`]).
    leftovers: super::leftovers::Recorder,
}

/// What [`Runner::new`] needs besides the module's setup.
#[derive(Debug)]
pub struct RunnerParts {
    /// The machine, built from the persisted state.
    pub machine: Machine,
    /// The agent's time origin (`now` for the machine is `Instant::now() - origin`).
    pub origin: Instant,
    /// A sender to the runner's own channel (for script outcomes).
    pub events: mpsc::UnboundedSender<RunnerEvent>,
    /// The module log.
    pub modlog: ModLog,
    /// The script environment.
    pub script_env: ScriptEnv,
    /// `SAFEVAR/modules/<AM>/state`.
    pub state_path: PathBuf,
    /// The data path.
    pub datapath: Box<dyn DataPath>,
    /// Where the status for `safekit state` is published.
    pub status: watch::Sender<ModuleStatus>,
    /// Where the heartbeat payload is published.
    pub heartbeat_status: SharedStatus,
}

impl Runner {
    /// A runner for `setup`.
    pub fn new(setup: ModuleSetup, parts: RunnerParts) -> Runner {
        let (checker_specs, checker_problems) = crate::checkers::specs(&setup.config);
        let checkers = crate::checkers::CheckerSet::new(
            checker_specs.clone(),
            setup.config.service.maxloop,
            setup.config.service.loop_interval,
        )
        .with_rules(crate::checkers::failover_rules(&setup.config))
        .with_failover_timing(&setup.config);
        let user = setup.config.service.user.clone();
        let applog = AppLog {
            path: parts.script_env.uservar.join("userlog.ulog"),
            max_bytes: u64::from(user.as_ref().map_or(2048, |user| user.userlogsize)) * 1024,
        };
        let vips = vip_specs(&setup.config);
        let leftovers =
            super::leftovers::Recorder::new(super::leftovers::record_beside(&parts.state_path));
        Runner {
            scripts_enabled: user.is_some(),
            setup,
            machine: parts.machine,
            origin: parts.origin,
            events: parts.events,
            modlog: parts.modlog,
            applog,
            script_env: parts.script_env,
            state_path: parts.state_path,
            netlink: None,
            vips,
            vip_held: Vec::new(),
            arp_tasks: Vec::new(),
            datapath: parts.datapath,
            status: parts.status,
            heartbeat_status: parts.heartbeat_status,
            checkers,
            checker_specs,
            checker_problems,
            start_after_stop: None,
            script_queue: ScriptQueue::spawn(),
            forced_stop: false,
            restarting: false,
            checker_generation: Arc::default(),
            deferred_second: None,
            custom_programs: crate::checkers::custom::CustomPrograms::default(),
            leftovers,
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Runs until every sender of the channel is gone.
    ///
    /// # Cancel safety
    /// Not meant to be cancelled: it is spawned as the module's task.
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<RunnerEvent>) {
        match Netlink::connect() {
            Ok(netlink) => self.netlink = Some(netlink),
            Err(error) => {
                tracing::error!(%error, "netlink unavailable: the virtual IP cannot be managed");
                self.modlog.log(
                    modlog::Level::Critical,
                    format!("Virtual IP management unavailable: {error}"),
                );
            }
        }
        // What a killed agent left running is stopped before the module can start.
        self.clean_up_leftovers().await;
        // A stopped module holds no virtual IP, even if a killed agent left one behind.
        self.release_vip().await;
        for problem in std::mem::take(&mut self.checker_problems) {
            tracing::warn!(%problem, "checker");
            self.modlog.log(modlog::Level::Event, problem);
        }
        self.spawn_checkers();
        self.sync_wait_resources_init().await;
        self.modlog.log(
            modlog::Level::Event,
            format!(
                "Module started by the agent in STOP (module id {}, heartbeat port {}, {})",
                self.setup.id.get(),
                self.setup.ports.heartbeat,
                if self.machine.persistent().up_to_date {
                    "data up to date"
                } else {
                    "data not known to be up to date"
                }
            ),
        );
        self.publish();
        loop {
            // The machine's timers, and when a `<failover>` rule's handle_time ends.
            let deadline = [
                self.machine.next_deadline(),
                self.checkers.next_rule_deadline(self.now()),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|at| tokio::time::Instant::from_std(self.origin + at));
            let deadline = match (&self.deferred_second, deadline) {
                (Some(deferred), Some(at)) => Some(at.min(deferred.until)),
                (Some(deferred), None) => Some(deferred.until),
                (None, deadline) => deadline,
            };
            let event = tokio::select! {
                received = events.recv() => match received {
                    Some(event) => Some(event),
                    None => return,
                },
                () = sleep_until_or_forever(deadline) => None,
            };
            match event {
                None => {
                    self.refresh_witness().await;
                    let actions = self.machine.handle(self.now(), Event::Tick);
                    self.execute(actions, None).await;
                }
                Some(RunnerEvent::Control {
                    verb: Verb::Second,
                    caller,
                    reply,
                }) if self.deferred_second.is_none() && self.second_needs_fresh_peer_state() => {
                    let wait = self.setup.params.pulse * 2 + Duration::from_millis(100);
                    self.deferred_second = Some(DeferredSecond {
                        caller,
                        reply,
                        until: tokio::time::Instant::now() + wait,
                    });
                }
                Some(RunnerEvent::Control {
                    verb,
                    caller,
                    reply,
                }) => {
                    let response = self.control(verb, &caller).await;
                    // The caller may have given up waiting; nothing to do then.
                    let _ = reply.send(response);
                }
                Some(RunnerEvent::Heartbeat(heartbeat, resources)) => {
                    let actions = self
                        .machine
                        .handle(self.now(), Event::HeartbeatReceived(heartbeat));
                    self.execute(actions, None).await;
                    self.set_remote_resources(resources.as_deref()).await;
                }
                Some(RunnerEvent::ScriptFinished { script, success }) => {
                    if success && matches!(script, Script::StopPrim { .. }) {
                        self.leftovers.application_stopped().await;
                    }
                    let actions = self
                        .machine
                        .handle(self.now(), Event::ScriptFinished { script, success });
                    self.execute(actions, None).await;
                }
                Some(RunnerEvent::DataPath(DataPathEvent::Notice { critical, message })) => {
                    let level = if critical {
                        modlog::Level::Critical
                    } else {
                        modlog::Level::Event
                    };
                    self.modlog.log(level, message);
                }
                Some(RunnerEvent::DataPath(report)) => {
                    let event = match report {
                        DataPathEvent::ResyncProgress(percent) => Event::ResyncProgress { percent },
                        DataPathEvent::ResyncCompleted => Event::ResyncCompleted,
                        DataPathEvent::ResyncFailed(reason) => Event::ResyncFailed { reason },
                        DataPathEvent::PeerLost => Event::ReplicationPeerLost,
                        DataPathEvent::ServeProgress { attempt, progress } => {
                            Event::ResyncServeProgress { attempt, progress }
                        }
                        DataPathEvent::Served { attempt, progress } => {
                            Event::ResyncServed { attempt, progress }
                        }
                        DataPathEvent::ServeFailed { attempt, reason } => {
                            Event::ResyncServeFailed { attempt, reason }
                        }
                        // Handled by the arm above.
                        DataPathEvent::Notice { .. } => continue,
                    };
                    let actions = self.machine.handle(self.now(), event);
                    self.execute(actions, None).await;
                }
                Some(RunnerEvent::Checker(observation)) => self.on_checker(observation).await,
                Some(RunnerEvent::SetResource {
                    resource,
                    up,
                    identity,
                    reply,
                }) => {
                    let response = self.set_resource(&resource, up, identity.as_deref()).await;
                    let _ = reply.send(response);
                }
                Some(RunnerEvent::Reload {
                    setup,
                    script_env,
                    datapath,
                    caller,
                    reply,
                }) => {
                    let response = self.reload(*setup, script_env, datapath, &caller).await;
                    let _ = reply.send(response);
                }
                Some(RunnerEvent::CheckReload { setup, reply }) => {
                    let response = match self.reload_refusal(&setup) {
                        Some(reason) => AdminResponse::Refused { reason },
                        None => AdminResponse::Ok {
                            message: String::new(),
                        },
                    };
                    let _ = reply.send(response);
                }
                Some(RunnerEvent::GetResource { resource, reply }) => {
                    let response = match self.checkers.get(&resource) {
                        Ok(value) => AdminResponse::Ok {
                            message: value.to_string(),
                        },
                        Err(reason) => AdminResponse::Refused { reason },
                    };
                    let _ = reply.send(response);
                }
            }
            self.start_if_stopstart().await;
            self.resolve_deferred_second().await;
            self.sync_custom_programs();
            self.run_due_rules().await;
            if self.machine.peer_state().is_none() {
                // Peer lost: its resources are unknown again.
                self.set_remote_resources(None).await;
            }
            self.sync_wait_resources_init().await;
            self.probe_at_start();
            self.datapath
                .set_peer_in_sync(self.machine.state() == State::Prim);
            self.publish();
        }
    }

    async fn control(&mut self, verb: Verb, caller: &str) -> AdminResponse {
        let command = match verb {
            Verb::Start => Command::Start,
            Verb::Stop => Command::Stop,
            Verb::ForceStop => Command::ForceStop,
            Verb::Restart => Command::Restart,
            Verb::Swap => Command::Swap,
            Verb::Prim => Command::Prim,
            Verb::PrimForce => Command::PrimForce,
            Verb::Second => Command::Second,
            // A stopped module is simply started; a running one is stopped and
            // started again by `start_if_stopstart` once stopped.
            Verb::StopStart if self.machine.state() == State::Stop => Command::Start,
            Verb::StopStart => Command::Stop,
        };
        self.modlog.log(
            modlog::Level::Info,
            format!("Command {} received from {caller}", verb.name()),
        );
        // An operator command: the maxloop count starts again, a pending stopstart is dropped.
        self.checkers.reset_loop();
        self.start_after_stop = None;
        match command {
            Command::ForceStop => self.forced_stop = true,
            Command::Stop => {}
            _ => self.forced_stop = false,
        }
        if let Err(reason) = self.prestart(command).await {
            return AdminResponse::Refused { reason };
        }
        if command == Command::Restart
            && let Some(response) = self.restart_second()
        {
            return response;
        }
        self.restarting = command == Command::Restart;
        if verb == Verb::StopStart && command == Command::Stop {
            self.start_after_stop = Some(caller.to_string());
        }
        let actions = self.machine.handle(
            self.now(),
            Event::Command {
                command,
                caller: caller.to_string(),
            },
        );
        let mut refusal = None;
        self.execute(actions, Some(&mut refusal)).await;
        if refusal.is_some() {
            self.restarting = false;
        }
        match refusal {
            Some(reason) => {
                if verb == Verb::StopStart {
                    self.start_after_stop = None;
                }
                AdminResponse::Refused { reason }
            }
            None if verb == Verb::StopStart && command == Command::Stop => AdminResponse::Ok {
                message: format!(
                    "stopstart {}: stopping (now {}); the module starts again once stopped{}",
                    self.setup.name,
                    self.machine.state(),
                    if self.machine.state() == State::Prim {
                        " and the peer has taken over"
                    } else {
                        ""
                    }
                ),
            },
            None => AdminResponse::Ok {
                message: format!(
                    "{} {}: done, now {}",
                    verb.name(),
                    self.setup.name,
                    self.machine.state()
                ),
            },
        }
    }

    /// Why [`Self::reload`] would refuse `setup` now (not STOP, or a change that needs an agent restart).
    fn reload_refusal(&self, setup: &ModuleSetup) -> Option<String> {
        let name = &self.setup.name;
        let state = self.machine.state();
        if state != State::Stop || self.machine.is_transient() {
            return Some(format!(
                "module {name} is {state}{}: stop it first (safekit stop -m {name}), apply, then start it again; nothing changed",
                if self.machine.is_transient() {
                    " (Transient)"
                } else {
                    ""
                }
            ));
        }
        super::load::needs_agent_restart(&self.setup, setup).map(|why| {
            format!(
                "{why}: restart the agent (safekitd) to apply this configuration; nothing changed"
            )
        })
    }

    /// Replaces the module's setup with `setup` (`safekit config`, `safekit
    /// cluster config`): only while STOP, with the `config` hook before and
    /// `postconfig` after; `start` then uses it.
    async fn reload(
        &mut self,
        setup: ModuleSetup,
        script_env: ScriptEnv,
        datapath: Box<dyn DataPath>,
        caller: &str,
    ) -> AdminResponse {
        if let Some(reason) = self.reload_refusal(&setup) {
            return AdminResponse::Refused { reason };
        }
        let name = self.setup.name.clone();
        let hook = |name: &'static str| scripts::Hook {
            name,
            current_state: "STOP",
            next_state: "STOP",
            action: "config",
            stop: false,
        };
        let scripts_enabled = setup.config.service.user.is_some();
        let previous_env = std::mem::replace(&mut self.script_env, script_env);
        let previous_enabled = std::mem::replace(&mut self.scripts_enabled, scripts_enabled);
        let (done, outcome) = oneshot::channel();
        self.queue_hook(hook("config"), Some(done));
        if outcome.await == Ok(false) {
            self.script_env = previous_env;
            self.scripts_enabled = previous_enabled;
            return AdminResponse::Refused {
                reason: "the config hook failed (see the module log and the application log); nothing changed".into(),
            };
        }
        let (checker_specs, checker_problems) = crate::checkers::specs(&setup.config);
        self.checkers = crate::checkers::CheckerSet::new(
            checker_specs.clone(),
            setup.config.service.maxloop,
            setup.config.service.loop_interval,
        )
        .with_rules(crate::checkers::failover_rules(&setup.config))
        .with_failover_timing(&setup.config);
        self.checker_specs = checker_specs;
        for problem in checker_problems {
            self.modlog.log(modlog::Level::Event, problem);
        }
        self.applog.max_bytes = u64::from(
            setup
                .config
                .service
                .user
                .as_ref()
                .map_or(2048, |user| user.userlogsize),
        ) * 1024;
        self.vips = vip_specs(&setup.config);
        self.machine = Machine::new(
            setup.params.clone(),
            self.machine.persistent().clone(),
            self.now(),
            rand::random::<u64>(),
        );
        self.datapath = datapath;
        self.setup = setup;
        self.start_after_stop = None;
        self.spawn_checkers();
        for warning in &self.setup.warnings {
            self.modlog.log(
                modlog::Level::Info,
                format!("Configuration warning: {warning}"),
            );
        }
        self.modlog.log(
            modlog::Level::User,
            format!("Configuration applied by {caller}"),
        );
        let (done, outcome) = oneshot::channel();
        self.queue_hook(hook("postconfig"), Some(done));
        let postconfig = if outcome.await == Ok(false) {
            " (the postconfig hook failed: see the module log)"
        } else {
            ""
        };
        AdminResponse::Ok {
            message: format!(
                "configuration of {name} applied{postconfig}; it is used at the next start"
            ),
        }
    }

    /// `second` on a stopped node whose peer was last heard not running the
    /// application: the peer may have just turned ALONE, which its next
    /// heartbeat says. The command then waits (at most two pulses) instead of
    /// being refused on a stale view.
    fn second_needs_fresh_peer_state(&self) -> bool {
        use safekit_protocol::heartbeat::ModuleState;
        matches!(self.machine.state(), State::Stop | State::Wait(_))
            && self
                .machine
                .peer_state()
                .is_some_and(|peer| !matches!(peer, ModuleState::Alone | ModuleState::Prim))
    }

    /// Runs a deferred `second` once the peer runs the application, or when its wait is over.
    async fn resolve_deferred_second(&mut self) {
        let ready = self.deferred_second.as_ref().is_some_and(|deferred| {
            !self.second_needs_fresh_peer_state() || tokio::time::Instant::now() >= deferred.until
        });
        if !ready {
            return;
        }
        let Some(deferred) = self.deferred_second.take() else {
            return;
        };
        let response = self.control(Verb::Second, &deferred.caller).await;
        let _ = deferred.reply.send(response);
    }

    /// Runs the `prestart` hook (when present) before a start verb on a
    /// stopped module, before any resource is set up; a failed `prestart`
    /// refuses the start.
    async fn prestart(&mut self, command: Command) -> Result<(), String> {
        let starts = matches!(
            command,
            Command::Start | Command::Prim | Command::PrimForce | Command::Second
        );
        if !starts
            || self.machine.state() != State::Stop
            || self.machine.is_transient()
            || !self.scripts_enabled
        {
            return Ok(());
        }
        let (done, outcome) = oneshot::channel();
        let hook = scripts::Hook {
            name: "prestart",
            current_state: "STOP",
            next_state: "WAIT",
            action: "start",
            stop: false,
        };
        self.queue_hook(hook, Some(done));
        match outcome.await {
            Ok(true) | Err(_) => Ok(()),
            Ok(false) => Err(
                "prestart failed (see the module log and the application log): module not started"
                    .into(),
            ),
        }
    }

    async fn execute(&mut self, actions: Vec<Action>, mut refusal: Option<&mut Option<String>>) {
        // The hooks of this batch's state changes run before its start_prim
        // (start_both before start_prim) and after the scripts queued earlier
        // (stop_both after stop_prim).
        let mut hooks = self.hooks_of(&actions);
        let change = actions.iter().rev().find_map(|action| match action {
            Action::StateChanged { from, to, .. } => Some((*from, *to)),
            _ => None,
        });
        // Why the start hooks and start_prim of this batch are not run.
        let mut start_blocked: Option<String> = None;
        for action in actions {
            if matches!(action, Action::StateChanged { .. }) {
                // A restart keeps the state: a change means it was overtaken.
                self.restarting = false;
            }
            if matches!(action, Action::RunScript(_) | Action::StateChanged { .. }) {
                // Whatever a start hook or start_prim runs is recorded first
                // ([`super::leftovers`]); a start that cannot be recorded is refused.
                let starts = hooks
                    .iter()
                    .any(|hook| !hook.stop && hook.name.starts_with("start_"))
                    || matches!(action, Action::RunScript(Script::StartPrim));
                if starts && start_blocked.is_none() {
                    let state = change.map_or(self.machine.state(), |(_, to)| to);
                    if let Err(error) = self.leftovers.application_starting(state.name()).await {
                        start_blocked = Some(error);
                    }
                }
                let stopped = self.leftovers.start_count();
                let mut stop_hooks_done = Vec::new();
                for hook in hooks.drain(..) {
                    if start_blocked.is_some() && !hook.stop && hook.name.starts_with("start_") {
                        continue;
                    }
                    // SECOND stopping runs no stop_prim: its stop hooks clear the record.
                    let done = (hook.stop
                        && hook.current_state == "SECOND"
                        && !["ALONE", "PRIM", "SECOND"].contains(&hook.next_state))
                    .then(|| {
                        let (done, outcome) = oneshot::channel();
                        stop_hooks_done.push(outcome);
                        done
                    });
                    self.queue_hook(hook, done);
                }
                if !stop_hooks_done.is_empty() {
                    let recorder = self.leftovers.clone();
                    tokio::spawn(async move {
                        for outcome in stop_hooks_done {
                            if outcome.await != Ok(true) {
                                return;
                            }
                        }
                        recorder.application_stopped_unless_restarted(stopped).await;
                    });
                }
            }
            match action {
                Action::PersistState(persistent) => {
                    let path = self.state_path.clone();
                    let bytes = persistent.encode();
                    let written = tokio::task::spawn_blocking(move || {
                        crate::persist::write_atomic(&path, &bytes)
                    })
                    .await;
                    let error = match written {
                        Ok(Ok(())) => None,
                        Ok(Err(error)) => Some(error.to_string()),
                        Err(join_error) => Some(join_error.to_string()),
                    };
                    if let Some(error) = error {
                        tracing::error!(%error, "cannot persist the module state; exiting so the peer takes over");
                        self.modlog.log(
                            modlog::Level::Critical,
                            format!("Cannot write the module state ({error}): agent exits"),
                        );
                        self.modlog.flush().await;
                        std::process::exit(1);
                    }
                }
                Action::RunScript(Script::StartPrim) if start_blocked.is_some() => {
                    // Not run: the machine hears that start_prim failed.
                    let _ = self.events.send(RunnerEvent::ScriptFinished {
                        script: Script::StartPrim,
                        success: false,
                    });
                }
                Action::RunScript(script) => {
                    self.spawn_script(script, change);
                    if script == Script::StartPrim {
                        self.restarting = false;
                    }
                }
                Action::TakeVip => self.take_vip().await,
                Action::ReleaseVip => self.release_vip().await,
                Action::SetReplicationRole(role) => {
                    if let Err(error) = self.datapath.set_role(role) {
                        tracing::error!(%error, "data path role change failed");
                        self.modlog.log(modlog::Level::Critical, error.to_string());
                        if matches!(role, ReplicationRole::Primary | ReplicationRole::Secondary) {
                            let _ = self
                                .events
                                .send(RunnerEvent::DataPath(DataPathEvent::PeerLost));
                        }
                    }
                }
                Action::StartResync { kind } => {
                    self.modlog.log(
                        modlog::Level::Event,
                        format!("Reintegration started ({kind:?})"),
                    );
                    if let Err(error) = self.datapath.start_resync(kind) {
                        let _ =
                            self.events
                                .send(RunnerEvent::DataPath(DataPathEvent::ResyncFailed(
                                    error.to_string(),
                                )));
                    }
                }
                Action::ServeResync { kind, attempt } => {
                    self.modlog.log(
                        modlog::Level::Event,
                        format!("Reintegration of the peer served from this node ({kind:?})"),
                    );
                    if let Err(error) = self.datapath.serve_resync(kind, attempt) {
                        let _ =
                            self.events
                                .send(RunnerEvent::DataPath(DataPathEvent::ServeFailed {
                                    attempt,
                                    reason: error.to_string(),
                                }));
                    }
                }
                Action::SetAsideDivergedFiles { since, reason } => {
                    let message = match self.datapath.set_aside(since) {
                        Ok(Some(folder)) => format!(
                            "Split brain recovery ({reason}): files changed here were moved to {}",
                            folder.display()
                        ),
                        Ok(None) => format!(
                            "Split brain recovery ({reason}): no replicated file to set aside"
                        ),
                        Err(error) => format!("Split brain recovery ({reason}): {error}"),
                    };
                    self.modlog.log(modlog::Level::Event, message);
                }
                Action::Log { level, message } => {
                    let level = match level {
                        // Operator and heart actions are SafeKit's `U` lines of the main log.
                        CoreLevel::Info if message.starts_with("Action ") => modlog::Level::User,
                        CoreLevel::Info => modlog::Level::Info,
                        CoreLevel::Warn => modlog::Level::Event,
                        CoreLevel::Error => modlog::Level::Critical,
                    };
                    self.modlog.log(level, message);
                }
                Action::StateChanged { from, to, reason } => {
                    tracing::info!(from = %from, to = %to, reason = %reason, "state changed");
                    self.modlog
                        .log(modlog::Level::Event, format!("{from} -> {to}: {reason}"));
                    if from == State::Alone && to == State::Prim {
                        self.reannounce_vips();
                    }
                    if matches!(to, State::Alone | State::Prim | State::Second(_)) {
                        self.leftovers.application_state(to.name()).await;
                    }
                }
                Action::RefuseCommand { command, reason } => {
                    tracing::info!(command = command.name(), %reason, "command refused");
                    if let Some(slot) = refusal.as_deref_mut() {
                        *slot = Some(reason);
                    }
                }
            }
        }
        if let Some(error) = start_blocked {
            // As for an unwritable state: nothing runs that a crash could leave behind.
            let reason = format!(
                "cannot record what the module runs ({error}): start refused, module stopped"
            );
            tracing::error!(%reason, "start refused");
            self.modlog.log(modlog::Level::Critical, reason.clone());
            if let Some(slot) = refusal {
                *slot = Some(reason);
            }
            let (reply, _) = oneshot::channel();
            let _ = self.events.send(RunnerEvent::Control {
                verb: Verb::ForceStop,
                caller: "agent".into(),
                reply,
            });
        }
    }

    /// Before a tick that may declare the peer lost, probes the split-brain
    /// witness afresh, so that the machine decides on a current verdict.
    async fn refresh_witness(&mut self) {
        if !matches!(
            self.machine.state(),
            State::Prim | State::Second(SecondPhase::InSync)
        ) {
            return;
        }
        let Some(spec) = self.checker_specs.iter().find(|spec| spec.witness).cloned() else {
            return;
        };
        let (up, detail) = crate::checkers::probes::poll(&spec.probe, spec.timeout).await;
        self.on_checker(crate::checkers::Observation {
            resource: spec.resource,
            up,
            detail,
        })
        .await;
    }

    /// A checker's observation: a verdict change goes to the machine, a fired rule runs its command.
    async fn on_checker(&mut self, observation: crate::checkers::Observation) {
        let now = self.now();
        let waited = self.machine.waiting_for().contains(&observation.resource);
        let outcome = self.checkers.observe(
            now,
            observation,
            self.machine.state(),
            self.machine.is_transient(),
            waited,
        );
        self.on_checker_outcome(outcome).await;
    }

    /// `safekit set`: a custom checker's value, handled as its observation.
    async fn set_resource(
        &mut self,
        resource: &str,
        up: bool,
        identity: Option<&str>,
    ) -> AdminResponse {
        let waited = self.machine.waiting_for().contains(resource);
        let outcome = self.checkers.set(
            self.now(),
            resource,
            up,
            identity,
            self.machine.state(),
            self.machine.is_transient(),
            waited,
        );
        match outcome {
            Ok(outcome) => {
                self.on_checker_outcome(outcome).await;
                AdminResponse::Ok {
                    message: String::new(),
                }
            }
            Err(reason) => AdminResponse::Refused { reason },
        }
    }

    /// Starts and stops the custom checkers' programs for the current state.
    fn sync_custom_programs(&mut self) {
        let context = crate::checkers::custom::ProgramContext {
            env: self.script_env.clone(),
            applog: self.applog.clone(),
            modlog: self.modlog.clone(),
            leftovers: Some(self.leftovers.clone()),
        };
        self.custom_programs.sync(
            &self.checker_specs,
            &context,
            self.machine.state(),
            self.machine.waiting_for(),
        );
        self.checkers
            .forget_inactive(self.now(), self.machine.state(), self.machine.waiting_for());
    }

    /// The peer's checker resources (`None`: unknown), for `remote.` in the
    /// rules; a rule that now holds runs as after an observation.
    async fn set_remote_resources(
        &mut self,
        resources: Option<&[safekit_protocol::heartbeat::RemoteResource]>,
    ) {
        let decision = self.checkers.set_remote(
            self.now(),
            resources,
            self.machine.state(),
            self.machine.is_transient(),
            self.machine.waiting_for(),
        );
        self.on_rule_decision(decision).await;
    }

    /// Runs the `<failover>` rule whose `handle_time` elapsed, if any.
    async fn run_due_rules(&mut self) {
        let decision = self.checkers.due_rule(
            self.now(),
            self.machine.state(),
            self.machine.is_transient(),
            self.machine.waiting_for(),
        );
        self.on_rule_decision(decision).await;
    }

    /// Acts on a rule that fired outside a checker's observation (a `remote.`
    /// value from a heartbeat, a `handle_time` that elapsed), as after one.
    async fn on_rule_decision(&mut self, decision: Option<safekit_core::cluster::rules::Decision>) {
        if let Some(decision) = decision {
            let outcome = crate::checkers::Outcome {
                decision: Some(decision),
                ..crate::checkers::Outcome::default()
            };
            self.on_checker_outcome(outcome).await;
        }
    }

    /// Tells the machine which resources of wait rules are still `init`
    /// (a started module stays in WAIT while there is one).
    async fn sync_wait_resources_init(&mut self) {
        let init = self.checkers.wait_resources_init();
        if &init != self.machine.resources_init() {
            let actions = self
                .machine
                .handle(self.now(), Event::WaitResourcesInit(init));
            self.execute(actions, None).await;
        }
    }

    /// A verdict change goes to the machine; a fired rule runs its command (or its wait).
    async fn on_checker_outcome(&mut self, outcome: crate::checkers::Outcome) {
        let now = self.now();
        if let Some((resource, up)) = outcome.verdict {
            let event = if outcome.witness {
                Event::WitnessReachable(up)
            } else {
                Event::CheckerVerdict { resource, up }
            };
            let actions = self.machine.handle(now, event);
            self.execute(actions, None).await;
        }
        let Some(decision) = outcome.decision else {
            return;
        };
        tracing::info!(rule = %decision.caller, log = %decision.log, "failover rule fired");
        self.modlog.log(modlog::Level::Event, decision.log.clone());
        if let Some(resource) = decision.wait_for {
            let actions = self.machine.handle(
                self.now(),
                Event::WaitForResource {
                    resource,
                    caller: decision.caller.clone(),
                },
            );
            self.execute(actions, None).await;
        }
        if let Some(command) = decision.command {
            if decision.then_start {
                self.start_after_stop = Some(decision.caller.clone());
            }
            self.restarting = command == Command::Restart;
            let actions = self.machine.handle(
                self.now(),
                Event::Command {
                    command,
                    caller: decision.caller,
                },
            );
            let mut refusal = None;
            self.execute(actions, Some(&mut refusal)).await;
            if refusal.is_some() {
                self.start_after_stop = None;
                self.restarting = false;
            }
        }
    }

    /// The second half of a `stopstart`: once the module is stopped, and the
    /// peer no longer SECOND (it took over, or cannot), start it again.
    async fn start_if_stopstart(&mut self) {
        if self.machine.state() != State::Stop
            || self.machine.is_transient()
            || self.start_after_stop.is_none()
            || self.machine.peer_state() == Some(safekit_protocol::heartbeat::ModuleState::Second)
        {
            return;
        }
        let Some(caller) = self.start_after_stop.take() else {
            return;
        };
        if let Err(reason) = self.prestart(Command::Start).await {
            self.modlog
                .log(modlog::Level::Critical, format!("stopstart: {reason}"));
            return;
        }
        let actions = self.machine.handle(
            self.now(),
            Event::Command {
                command: Command::Start,
                caller,
            },
        );
        self.execute(actions, None).await;
    }

    /// `restart` on SECOND: SafeKit runs stop_both;start_both there (the
    /// application scripts of a SECOND). `None` when this node is not SECOND
    /// or has neither script: the machine then answers (it refuses a restart
    /// where the application does not run).
    fn restart_second(&self) -> Option<AdminResponse> {
        let state = self.machine.state();
        if !matches!(state, State::Second(_)) || !self.scripts_enabled {
            return None;
        }
        let hooks = scripts::restart_hooks(state.name());
        if !hooks
            .iter()
            .any(|hook| self.script_env.userbin.join(hook.name).exists())
        {
            return None;
        }
        for hook in hooks {
            self.queue_hook(hook, None);
        }
        Some(AdminResponse::Ok {
            message: format!(
                "restart {}: stop_both and start_both queued, state kept ({state})",
                self.setup.name
            ),
        })
    }

    /// Runs `start_prim` or `stop_prim` through the script queue (a forced
    /// `stop_prim` at once: it must be able to interrupt a hung graceful one);
    /// the outcome comes back as [`RunnerEvent::ScriptFinished`]. `change` is
    /// the state change of the same batch of actions, for the arguments.
    fn spawn_script(&self, script: Script, change: Option<(State, State)>) {
        let state = self.machine.state();
        let timeouts = self.setup.script_timeouts();
        let stop_action = if self.start_after_stop.is_some() {
            "stopstart"
        } else {
            "stop"
        };
        let restart_hooks = match script {
            Script::StartPrim if self.restarting => scripts::restart_hooks(state.name()),
            _ => Vec::new(),
        };
        let (name, force, action, current, next, timeout) = match script {
            Script::StartPrim if self.restarting => (
                "start_prim",
                false,
                scripts::RESTART_ACTION,
                state,
                state,
                timeouts.start,
            ),
            Script::StopPrim { force } if self.restarting => (
                "stop_prim",
                force,
                scripts::RESTART_ACTION,
                state,
                state,
                if force {
                    timeouts.force_stop
                } else {
                    timeouts.nice_stop
                },
            ),
            Script::StartPrim => {
                let (current, next) = change.unwrap_or((state, state));
                ("start_prim", false, "start", current, next, timeouts.start)
            }
            Script::StopPrim { force } => (
                "stop_prim",
                force,
                stop_action,
                state,
                State::Stop,
                if force {
                    timeouts.force_stop
                } else {
                    timeouts.nice_stop
                },
            ),
        };
        // stop_both;start_both, queued before start_prim (the queue keeps the order).
        for hook in restart_hooks {
            self.queue_hook(hook, None);
        }
        let events = self.events.clone();
        if !self.scripts_enabled {
            tracing::debug!(
                script = name,
                "no <user> in userconfig.xml: scripts are not run"
            );
            let _ = events.send(RunnerEvent::ScriptFinished {
                script,
                success: true,
            });
            return;
        }
        let env = self.script_env.clone();
        let applog = self.applog.clone();
        let modlog = self.modlog.clone();
        let current = current.name();
        let next = next.name();
        let job = async move {
            let call = ScriptCall {
                name,
                current_state: current,
                next_state: next,
                action,
                force,
                timeout,
            };
            let success = match scripts::run_script(&env, &applog, &call).await {
                Ok(outcome) => {
                    let level = if outcome.is_success() {
                        modlog::Level::Script
                    } else {
                        modlog::Level::Critical
                    };
                    modlog.log(
                        level,
                        format!("Script {} {}: {outcome}", name, call.arguments().join(" ")),
                    );
                    outcome.is_success()
                }
                Err(error) => {
                    modlog.log(modlog::Level::Critical, format!("Script {name}: {error}"));
                    false
                }
            };
            let _ = events.send(RunnerEvent::ScriptFinished { script, success });
        };
        if matches!(script, Script::StopPrim { force: true }) {
            tokio::spawn(job);
        } else {
            self.script_queue.push(job);
        }
    }

    /// The hooks of the state changes in `actions` ([`scripts::transition_hooks`]).
    fn hooks_of(&self, actions: &[Action]) -> Vec<scripts::Hook> {
        let mut hooks = Vec::new();
        for action in actions {
            if let Action::StateChanged { from, to, .. } = action {
                let verb = match to {
                    State::Stop if self.start_after_stop.is_some() => "stopstart",
                    State::Stop => "stop",
                    // A `wait()` rule stopped the module (SafeKit's checker-initiated wait).
                    State::Wait(safekit_core::cluster::WaitReason::ResourceDown) => "stopwait",
                    _ => "start",
                };
                hooks.extend(scripts::transition_hooks(from.name(), to.name(), verb));
            }
        }
        hooks
    }

    /// Queues a hook script (absent: nothing runs, nothing is logged). A stop
    /// hook is called gracefully (`nicestoptimeout`), then with `force`
    /// (`forcestoptimeout`) if that failed, or at once with `force` during a
    /// `forcestop`. `done` gets whether it succeeded.
    fn queue_hook(&self, hook: scripts::Hook, done: Option<oneshot::Sender<bool>>) {
        if !self.scripts_enabled {
            if let Some(done) = done {
                let _ = done.send(true);
            }
            return;
        }
        let timeouts = self.setup.script_timeouts();
        let env = self.script_env.clone();
        let applog = self.applog.clone();
        let modlog = self.modlog.clone();
        let mut force = hook.stop && self.forced_stop;
        self.script_queue.push(async move {
            let success = loop {
                let call = ScriptCall {
                    name: hook.name,
                    current_state: hook.current_state,
                    next_state: hook.next_state,
                    action: hook.action,
                    force,
                    timeout: if force {
                        timeouts.force_stop
                    } else if hook.stop || hook.name == "poststop" {
                        timeouts.nice_stop
                    } else {
                        timeouts.start
                    },
                };
                let success = match scripts::run_script(&env, &applog, &call).await {
                    Ok(scripts::ScriptOutcome::Absent) => true,
                    Ok(outcome) => {
                        let level = if outcome.is_success() {
                            modlog::Level::Script
                        } else {
                            modlog::Level::Critical
                        };
                        modlog.log(
                            level,
                            format!(
                                "Script {} {}: {outcome}",
                                hook.name,
                                call.arguments().join(" ")
                            ),
                        );
                        outcome.is_success()
                    }
                    Err(error) => {
                        modlog.log(
                            modlog::Level::Critical,
                            format!("Script {}: {error}", hook.name),
                        );
                        false
                    }
                };
                if success || force || !hook.stop {
                    break success;
                }
                modlog.log(
                    modlog::Level::Event,
                    format!("{} failed: running {} force", hook.name, hook.name),
                );
                force = true;
            };
            if let Some(done) = done {
                let _ = done.send(success);
            }
        });
    }

    /// Starts the checkers' probes; those of an earlier configuration end.
    fn spawn_checkers(&self) {
        use std::sync::atomic::Ordering;
        let generation = Arc::clone(&self.checker_generation);
        let mine = generation.fetch_add(1, Ordering::SeqCst) + 1;
        let checker_events = self.events.clone();
        crate::checkers::spawn(&self.checker_specs, move |observation| {
            generation.load(Ordering::SeqCst) == mine
                && checker_events
                    .send(RunnerEvent::Checker(observation))
                    .is_ok()
        });
    }

    /// A start waiting for the first verdicts of wait rules' resources has
    /// them probed at once ([`crate::checkers::CheckerSet::probe_at_start`]).
    fn probe_at_start(&mut self) {
        let specs = self.checkers.probe_at_start(self.machine.state());
        if specs.is_empty() {
            return;
        }
        let events = self.events.clone();
        crate::checkers::probe_once(specs, move |observation| {
            events.send(RunnerEvent::Checker(observation)).is_ok()
        });
    }

    async fn take_vip(&mut self) {
        let Some(netlink) = self.netlink.clone() else {
            return;
        };
        for vip in self.vips.clone() {
            let choice = match &vip.ifname {
                Some(ifname) => netlink.list_addresses().await.map(|addresses| {
                    let prefix_len = addresses
                        .iter()
                        .find(|address| {
                            &address.ifname == ifname
                                && crate::vip::subnet_contains(
                                    address.addr,
                                    address.prefix_len,
                                    vip.addr,
                                )
                        })
                        .map_or(if vip.addr.is_ipv4() { 32 } else { 128 }, |address| {
                            address.prefix_len
                        });
                    (ifname.clone(), prefix_len)
                }),
                None => netlink
                    .find_interface_for(vip.addr)
                    .await
                    .map(|choice| (choice.ifname, choice.prefix_len)),
            };
            let (ifname, prefix_len) = match choice {
                Ok(choice) => choice,
                Err(error) => {
                    self.modlog.log(
                        modlog::Level::Critical,
                        format!("Virtual IP {} not set: {error}", vip.addr),
                    );
                    continue;
                }
            };
            match netlink.add_address(&ifname, vip.addr, prefix_len).await {
                Ok(_) => {
                    self.modlog.log(
                        modlog::Level::Event,
                        format!("Virtual IP {}/{prefix_len} set on {ifname}", vip.addr),
                    );
                    self.vip_held.push((ifname.clone(), vip.addr));
                    if let (true, IpAddr::V4(v4)) = (vip.arpreroute, vip.addr) {
                        let rounds = u32::try_from(
                            vip.arpelapse.as_millis() / vip.arpinterval.as_millis().max(1),
                        )
                        .unwrap_or(u32::MAX);
                        let interval = vip.arpinterval;
                        self.arp_tasks.push(tokio::spawn(async move {
                            // A burst at once for the failover, then SafeKit's slow series.
                            let burst =
                                crate::arp::announce(&ifname, v4, 3, Duration::from_millis(100))
                                    .await;
                            if let Err(error) = burst {
                                tracing::warn!(%error, "gratuitous ARP failed");
                                return;
                            }
                            tokio::time::sleep(interval).await;
                            if let Err(error) =
                                crate::arp::announce(&ifname, v4, rounds, interval).await
                            {
                                tracing::warn!(%error, "gratuitous ARP failed");
                            }
                        }));
                    }
                }
                Err(error) => self.modlog.log(
                    modlog::Level::Critical,
                    format!("Virtual IP {} not set on {ifname}: {error}", vip.addr),
                ),
            }
        }
        self.leftovers.vips_held(&self.vip_held).await;
    }

    /// A gratuitous ARP burst for the virtual IPs this node holds. When the
    /// peer joins as SECOND after a split brain, it has just released the
    /// same address, and clients still send to its MAC address until told.
    fn reannounce_vips(&mut self) {
        for (ifname, addr) in self.vip_held.clone() {
            let announce = self
                .vips
                .iter()
                .any(|vip| vip.addr == addr && vip.arpreroute);
            let IpAddr::V4(v4) = addr else {
                continue;
            };
            if announce {
                self.arp_tasks.push(tokio::spawn(async move {
                    if let Err(error) =
                        crate::arp::announce(&ifname, v4, 3, Duration::from_millis(100)).await
                    {
                        tracing::warn!(%error, "gratuitous ARP failed");
                    }
                }));
            }
        }
    }

    async fn release_vip(&mut self) {
        for task in self.arp_tasks.drain(..) {
            task.abort();
        }
        let Some(netlink) = self.netlink.clone() else {
            return;
        };
        self.vip_held.clear();
        self.leftovers.vips_held(&[]).await;
        let addresses = match netlink.list_addresses().await {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::error!(%error, "cannot list addresses to release the virtual IP");
                return;
            }
        };
        for vip in &self.vips {
            for address in addresses.iter().filter(|address| address.addr == vip.addr) {
                match netlink.remove_address(&address.ifname, vip.addr).await {
                    Ok(true) => self.modlog.log(
                        modlog::Level::Event,
                        format!("Virtual IP {} removed from {}", vip.addr, address.ifname),
                    ),
                    Ok(false) => {}
                    Err(error) => self.modlog.log(
                        modlog::Level::Critical,
                        format!("Virtual IP {} not removed: {error}", vip.addr),
                    ),
                }
            }
        }
    }

    /// At start, before any command: cleans up what a killed agent left
    /// running for this module ([`super::leftovers::clean_up`]).
    async fn clean_up_leftovers(&mut self) {
        let configured_vips = Some(self.vips.iter().map(|vip| vip.addr).collect());
        let scripts = self
            .scripts_enabled
            .then_some((&self.script_env, &self.applog));
        let report = super::leftovers::clean_up(super::leftovers::Cleanup {
            path: super::leftovers::record_beside(&self.state_path),
            modlog: &self.modlog,
            netlink: self.netlink.as_ref(),
            configured_vips,
            scripts,
            force_stop_timeout: self.setup.script_timeouts().force_stop,
        })
        .await;
        // A failed forced stop stays recorded through the next changes.
        self.leftovers.start_from(report.record);
    }

    fn publish(&self) {
        super::heartbeat::publish(
            &self.heartbeat_status,
            self.machine.heartbeat_payload(),
            self.checkers.heartbeat_resources(),
        );
        self.status.send_replace(self.render());
    }

    /// The `data` line of `state -v`: what an operator needs to know about this node's copy.
    fn data_detail(&self) -> String {
        let peer = &self.setup.params.peer;
        match self.machine.state() {
            State::Second(SecondPhase::InSync) => format!("in sync with the primary {peer}"),
            State::Second(SecondPhase::Resyncing) => {
                format!("being resynchronized from {peer} (not up to date yet)")
            }
            State::Prim => format!("up to date, replicated to {peer}"),
            _ if self.machine.persistent().up_to_date => "up to date".into(),
            _ => "not known to be up to date".into(),
        }
    }

    fn render(&self) -> ModuleStatus {
        let state = self.machine.state();
        // SafeKit shows WAIT (Transient) while resources of wait rules are init.
        let waiting_init = state == State::Wait(safekit_core::cluster::WaitReason::ResourceInit);
        let readiness = if self.machine.is_transient() || waiting_init {
            "Transient"
        } else if matches!(state, State::Stop | State::Wait(_)) {
            "NotReady"
        } else {
            "Ready"
        };
        let mut details: Vec<(String, String)> = vec![
            ("state".into(), state.to_string()),
            (
                "readiness".into(),
                match readiness {
                    "Transient" => {
                        "Transient (a change is under way: script, stop or reintegration)"
                    }
                    "Ready" => "Ready",
                    _ => "Not ready (no application, no replica kept up to date here)",
                }
                .into(),
            ),
            ("module id".into(), self.setup.id.get().to_string()),
            ("data".into(), self.data_detail()),
        ];
        let peer = match self.machine.peer_state() {
            Some(peer_state) => format!(
                "{} {}",
                self.setup.params.peer,
                format!("{peer_state:?}").to_uppercase()
            ),
            None => format!("{} unknown (no heartbeat)", self.setup.params.peer),
        };
        details.push(("peer".into(), peer));
        for lan in self.machine.lans() {
            let endpoints = self
                .setup
                .lans
                .iter()
                .find(|endpoints| endpoints.name == lan.name);
            details.push((
                format!("lan {}", lan.name),
                format!(
                    "{}{}{}",
                    if lan.up { "up" } else { "down" },
                    if lan.flow { " (replication)" } else { "" },
                    endpoints.map_or(String::new(), |endpoints| format!(
                        ", heartbeat {} -> {}",
                        endpoints.local, endpoints.peer
                    )),
                ),
            ));
        }
        for line in super::heartbeat::reception(&self.setup.name) {
            details.push(("heartbeat".into(), line));
        }
        for vip in &self.vips {
            let held = self.vip_held.iter().find(|(_, addr)| *addr == vip.addr);
            details.push((
                "vip".into(),
                match held {
                    Some((ifname, addr)) => format!("{addr} set on {ifname}"),
                    None => format!("{} not set", vip.addr),
                },
            ));
        }
        if state == State::Second(SecondPhase::Resyncing) || self.machine.serving().is_some() {
            details.push((
                "resync".into(),
                crate::datapath::render_resync(&self.machine),
            ));
        }
        details.push((
            "last transition".into(),
            match self.machine.last_transition() {
                Some(transition) => format!(
                    "{} -> {}: {} ({:.1} s ago)",
                    transition.from,
                    transition.to,
                    transition.reason,
                    self.now().saturating_sub(transition.at).as_secs_f64()
                ),
                None => "none since the agent started (see safekit log)".into(),
            },
        ));
        if waiting_init {
            let resources: Vec<&str> = self
                .machine
                .resources_init()
                .iter()
                .map(String::as_str)
                .collect();
            details.push((
                "wait rules".into(),
                format!(
                    "waiting for the first verdict of {} (init)",
                    resources.join(", ")
                ),
            ));
        }
        details.extend(self.checkers.details(self.now()));
        if let Some(remote) = self.checkers.remote_summary() {
            details.push(("remote resources".into(), remote));
        }
        details.extend(self.datapath.stats().details);
        ModuleStatus {
            module: self.setup.name.clone(),
            node: self.setup.params.node.clone(),
            state: state.name().into(),
            readiness: readiness.into(),
            details,
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
///
/// # Cancel safety
/// Cancel safe: nothing is lost when dropped.
async fn sleep_until_or_forever(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The shared handles other parts of the agent keep for a running module.
#[derive(Debug, Clone)]
pub struct ModuleHandle {
    /// The module's name.
    pub name: String,
    /// The runner's channel.
    pub events: mpsc::UnboundedSender<RunnerEvent>,
    /// The latest status.
    pub status: watch::Receiver<ModuleStatus>,
    /// The module log.
    pub modlog: ModLog,
}

/// A shared, immutable list of modules (and of the ones that could not start).
#[derive(Debug, Default)]
pub struct Registry {
    /// Running modules by name.
    pub modules: std::collections::BTreeMap<String, ModuleHandle>,
    /// Modules not started, with their configuration errors.
    pub rejected: std::collections::BTreeMap<String, Vec<String>>,
    /// This node's name.
    pub node: String,
    /// Each module's "start at boot" setting (`safekit boot`, `<service boot>`).
    pub boot: super::boot::BootSettings,
    /// What `safekit config` and `safekit cluster config` need to rebuild a module's setup.
    pub reload: Option<Arc<super::load::ReloadContext>>,
}

/// The registry, shared by the admin socket's connections.
pub type SharedRegistry = Arc<Registry>;
