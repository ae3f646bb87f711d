//! A simulated mirror cluster: N machines, a virtual clock in milliseconds, a heartbeat network.
//!
//! In the spirit of quinn-proto's test `Pair`: time jumps straight to the next
//! event (a heartbeat pulse, a delivery, a machine deadline, a script or resync
//! completion), so a 30-second timeout costs microseconds and no test sleeps.
//! Heartbeats go through the real wire format (`encode`, `decode` with the
//! cluster secret, the replay guard). The network can cut one direction of one
//! LAN, partition two nodes, delay packets and heal. Scripts and
//! resynchronizations complete after configurable delays; a resynchronization
//! fails if the replication LAN between the nodes is cut when it would finish.
//! With [`Sim::served_resync`], resynchronizations follow the Linux data
//! path's handshake instead: the SECOND's `StartResync` only arms its
//! receiver, the primary's `ServeResync` runs the (simulated) engine and
//! reports `ResyncServed`, and the SECOND completes when it reads that in the
//! primary's heartbeat.
//! Every node's log lines are kept (and printed on failure by the tests) with
//! the node name and the virtual time.

use std::collections::HashSet;
use std::time::Duration;

use safekit_protocol::heartbeat::{self as wire, Heartbeat, ReplayGuard};

use super::generations::Persistent;
use super::heartbeat::Lan;
use super::machine::{
    Action, Command, DefaultPrim, Event, Machine, ModuleParams, ReplicationRole, Script, State,
};

const SECRET: &[u8] = b"simulated cluster secret";
pub const MODULE: &str = "mirror";

/// One simulated node: its machine and what its agent would have done.
#[derive(Debug)]
pub struct SimNode {
    pub name: String,
    pub params: ModuleParams,
    pub machine: Machine,
    /// The last state written by `PersistState` (survives `crash`).
    pub persisted: Persistent,
    pub alive: bool,
    boot: u64,
    seq: u64,
    next_pulse: Duration,
    guard: ReplayGuard,
    pub vip: bool,
    pub application_running: bool,
    pub replication: ReplicationRole,
    /// Every action with its time.
    pub actions: Vec<(Duration, Action)>,
    /// Module log lines as `[time] LEVEL message`.
    pub log: Vec<String>,
    /// Resync epoch: a completion scheduled for an older resync is dropped.
    resync_epoch: u64,
    /// Diverged files were set aside and no resync has consumed that yet.
    set_aside_pending: bool,
    /// Serve epoch: a served resync's end scheduled before a role change is dropped.
    serve_epoch: u64,
    /// Broken promises seen while executing actions (checked by the tests).
    pub violations: Vec<String>,
    /// How many times start_prim / stop_prim ran.
    pub start_prim_runs: usize,
    pub stop_prim_runs: usize,
}

#[derive(Debug)]
enum Delivery {
    Packet {
        from: usize,
        lan: String,
        bytes: Vec<u8>,
    },
    Event(Event),
    ResyncDone {
        epoch: u64,
    },
    ServeDone {
        epoch: u64,
        attempt: u64,
    },
}

#[derive(Debug)]
struct Scheduled {
    at: Duration,
    order: u64,
    to: usize,
    delivery: Delivery,
}

/// The simulated cluster.
#[derive(Debug)]
pub struct Sim {
    pub now: Duration,
    pub nodes: Vec<SimNode>,
    /// Blocked (from, to, lan).
    cut: HashSet<(usize, usize, String)>,
    pub delay: Duration,
    pub script_delay: Duration,
    pub resync_delay: Duration,
    /// Resynchronizations are served by the primary (see the module documentation).
    pub served_resync: bool,
    queue: Vec<Scheduled>,
    order: u64,
    pub lans: Vec<Lan>,
}

pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

/// Options for a simulated pair.
#[derive(Debug, Clone)]
pub struct PairOptions {
    pub pulse: Duration,
    pub timeout: Duration,
    pub failover: bool,
    pub defaultprim: DefaultPrim,
    pub lans: Vec<Lan>,
    pub witness: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            pulse: ms(700),
            timeout: ms(3000),
            failover: true,
            defaultprim: DefaultPrim::Alone,
            lans: vec![Lan {
                name: "default".into(),
                flow: true,
            }],
            witness: false,
        }
    }
}

impl Sim {
    /// Two fresh nodes `node1` and `node2` (empty histories, not up to date), both STOP, at time 0.
    pub fn pair(options: PairOptions) -> Sim {
        let names = ["node1", "node2"];
        let mut nodes = Vec::new();
        for (index, name) in names.iter().enumerate() {
            let params = ModuleParams {
                module: MODULE.into(),
                node: (*name).into(),
                peer: names[1 - index].into(),
                pulse: options.pulse,
                timeout: options.timeout,
                failover: options.failover,
                defaultprim: options.defaultprim.clone(),
                lans: options.lans.clone(),
                witness: options.witness,
            };
            let persisted = Persistent::default();
            nodes.push(SimNode {
                name: (*name).into(),
                machine: Machine::new(
                    params.clone(),
                    persisted.clone(),
                    Duration::ZERO,
                    seed(index, 1),
                ),
                params,
                persisted,
                alive: true,
                boot: 1,
                seq: 0,
                // Nodes do not pulse in lockstep.
                next_pulse: ms(10 + 100 * index as u64),
                guard: ReplayGuard::new(),
                vip: false,
                application_running: false,
                replication: ReplicationRole::Off,
                actions: Vec::new(),
                log: Vec::new(),
                resync_epoch: 0,
                set_aside_pending: false,
                serve_epoch: 0,
                violations: Vec::new(),
                start_prim_runs: 0,
                stop_prim_runs: 0,
            });
        }
        Sim {
            now: Duration::ZERO,
            nodes,
            cut: HashSet::new(),
            delay: ms(1),
            script_delay: ms(50),
            resync_delay: ms(2000),
            served_resync: false,
            queue: Vec::new(),
            order: 0,
            lans: options.lans,
        }
    }

    pub fn state(&self, node: usize) -> State {
        self.nodes[node].machine.state()
    }

    /// Runs an operator command on `node` as root.
    pub fn command(&mut self, node: usize, command: Command) -> Vec<Action> {
        let event = Event::Command {
            command,
            caller: "root".into(),
        };
        self.deliver_event(node, event)
    }

    /// Injects any event on `node` now.
    pub fn deliver_event(&mut self, node: usize, event: Event) -> Vec<Action> {
        let now = self.now;
        let actions = self.nodes[node].machine.handle(now, event);
        self.execute(node, &actions);
        actions
    }

    /// Blocks `from → to` on `lan` (every LAN when `None`).
    pub fn cut_one_way(&mut self, from: usize, to: usize, lan: Option<&str>) {
        for name in self.lan_names(lan) {
            self.cut.insert((from, to, name));
        }
        self.replication_check();
    }

    /// Blocks both directions between `a` and `b` on `lan` (every LAN when `None`).
    pub fn partition(&mut self, a: usize, b: usize, lan: Option<&str>) {
        for name in self.lan_names(lan) {
            self.cut.insert((a, b, name.clone()));
            self.cut.insert((b, a, name));
        }
        self.replication_check();
    }

    /// Removes every cut.
    pub fn heal(&mut self) {
        self.cut.clear();
    }

    fn lan_names(&self, lan: Option<&str>) -> Vec<String> {
        match lan {
            Some(name) => vec![name.to_string()],
            None => self.lans.iter().map(|lan| lan.name.clone()).collect(),
        }
    }

    fn replication_lan(&self) -> String {
        self.lans
            .iter()
            .find(|lan| lan.flow)
            .unwrap_or(&self.lans[0])
            .name
            .clone()
    }

    fn replication_connected(&self, a: usize, b: usize) -> bool {
        let lan = self.replication_lan();
        self.nodes[a].alive
            && self.nodes[b].alive
            && !self.cut.contains(&(a, b, lan.clone()))
            && !self.cut.contains(&(b, a, lan))
    }

    /// A cut of the replication LAN breaks the replication connection (both ends notice).
    fn replication_check(&mut self) {
        if self.nodes.len() != 2 || self.replication_connected(0, 1) {
            return;
        }
        for node in 0..2 {
            if self.nodes[node].alive
                && matches!(
                    self.nodes[node].replication,
                    ReplicationRole::Primary | ReplicationRole::Secondary
                )
            {
                self.schedule(
                    self.now + self.delay,
                    node,
                    Delivery::Event(Event::ReplicationPeerLost),
                );
            }
        }
    }

    /// kill -9 of every process of `node`: nothing more is sent or handled; the peer's replication breaks.
    pub fn crash(&mut self, node: usize) {
        self.nodes[node].alive = false;
        self.queue.retain(|item| item.to != node);
        self.nodes[node].vip = false;
        self.nodes[node].application_running = false;
        self.replication_check();
    }

    /// Restarts `node`'s agent from its persisted state (module STOP, new boot).
    pub fn restart_agent(&mut self, node: usize) {
        let now = self.now;
        let n = &mut self.nodes[node];
        n.boot += 1;
        n.seq = 0;
        n.alive = true;
        n.replication = ReplicationRole::Off;
        n.machine = Machine::new(
            n.params.clone(),
            n.persisted.clone(),
            now,
            seed(node, n.boot),
        );
        n.next_pulse = now;
        n.log
            .push(format!("[{:>7}ms] agent restarted", now.as_millis()));
    }

    fn schedule(&mut self, at: Duration, to: usize, delivery: Delivery) {
        self.order += 1;
        self.queue.push(Scheduled {
            at,
            order: self.order,
            to,
            delivery,
        });
    }

    fn execute(&mut self, node: usize, actions: &[Action]) {
        let now = self.now;
        for action in actions {
            let n = &mut self.nodes[node];
            n.actions.push((now, action.clone()));
            match action {
                Action::PersistState(state) => n.persisted = state.clone(),
                Action::RunScript(script) => {
                    match script {
                        Script::StartPrim => {
                            n.start_prim_runs += 1;
                            n.application_running = true;
                        }
                        Script::StopPrim { .. } => {
                            n.stop_prim_runs += 1;
                            n.application_running = false;
                        }
                    }
                    let script = *script;
                    let at = now + self.script_delay;
                    self.schedule(
                        at,
                        node,
                        Delivery::Event(Event::ScriptFinished {
                            script,
                            success: true,
                        }),
                    );
                }
                Action::TakeVip => n.vip = true,
                Action::ReleaseVip => n.vip = false,
                Action::SetReplicationRole(role) => {
                    n.replication = *role;
                    if *role != ReplicationRole::Secondary {
                        n.resync_epoch += 1;
                    }
                    if *role != ReplicationRole::Primary {
                        n.serve_epoch += 1;
                    }
                }
                Action::StartResync { .. } => {
                    // Never silently drop data: if this node's current generation is
                    // not in the primary's history, its own changes since then are
                    // about to be overwritten and must have been set aside first.
                    let peer_history = self.nodes[1 - node].persisted.history.clone();
                    let n = &mut self.nodes[node];
                    if let Some(current) = n.persisted.history.current()
                        && !peer_history.contains(current.id)
                        && !n.set_aside_pending
                    {
                        n.violations.push(format!(
                            "[{}ms] resync over generation {} without setting diverged files aside",
                            now.as_millis(),
                            current.id
                        ));
                    }
                    n.set_aside_pending = false;
                    n.resync_epoch += 1;
                    if self.served_resync {
                        // The receiver is armed; the primary serves.
                        continue;
                    }
                    let epoch = n.resync_epoch;
                    let half = now + self.resync_delay / 2;
                    let done = now + self.resync_delay;
                    self.schedule(
                        half,
                        node,
                        Delivery::Event(Event::ResyncProgress { percent: 50 }),
                    );
                    self.schedule(done, node, Delivery::ResyncDone { epoch });
                }
                Action::ServeResync { attempt, .. } => {
                    if !self.served_resync {
                        continue;
                    }
                    let epoch = n.serve_epoch;
                    let attempt = *attempt;
                    let progress = wire::ResyncProgressStatus {
                        percent: 50,
                        files_done: 5,
                        files_total: 10,
                        ..wire::ResyncProgressStatus::default()
                    };
                    self.schedule(
                        now + self.resync_delay / 2,
                        node,
                        Delivery::Event(Event::ResyncServeProgress { attempt, progress }),
                    );
                    self.schedule(
                        now + self.resync_delay,
                        node,
                        Delivery::ServeDone { epoch, attempt },
                    );
                }
                Action::SetAsideDivergedFiles { since, reason } => {
                    n.set_aside_pending = true;
                    n.log.push(format!(
                        "[{:>7}ms] SET ASIDE diverged files since {since:?}: {reason}",
                        now.as_millis()
                    ));
                }
                Action::Log { level, message } => {
                    n.log
                        .push(format!("[{:>7}ms] {level:?} {message}", now.as_millis()));
                }
                Action::StateChanged { from, to, reason } => {
                    n.log.push(format!(
                        "[{:>7}ms] {from} -> {to} ({reason})",
                        now.as_millis()
                    ));
                }
                Action::RefuseCommand { command, reason } => {
                    n.log.push(format!(
                        "[{:>7}ms] REFUSED {}: {reason}",
                        now.as_millis(),
                        command.name()
                    ));
                }
            }
        }
    }

    /// The time of the next thing that happens, if any.
    fn next_time(&self) -> Option<Duration> {
        let queued = self.queue.iter().map(|item| item.at).min();
        let nodes = self.nodes.iter().filter(|n| n.alive).flat_map(|n| {
            [Some(n.next_pulse), n.machine.next_deadline()]
                .into_iter()
                .flatten()
        });
        queued.into_iter().chain(nodes).min()
    }

    /// Processes everything due at exactly `self.now`.
    fn process_now(&mut self) {
        let now = self.now;
        // Queued deliveries, in scheduling order.
        while let Some(index) = self
            .queue
            .iter()
            .enumerate()
            .filter(|(_, item)| item.at <= now)
            .min_by_key(|(_, item)| (item.at, item.order))
            .map(|(index, _)| index)
        {
            let item = self.queue.swap_remove(index);
            self.deliver(item);
        }
        for node in 0..self.nodes.len() {
            if !self.nodes[node].alive {
                continue;
            }
            if self.nodes[node].next_pulse <= now {
                self.pulse(node);
            }
            if self.nodes[node]
                .machine
                .next_deadline()
                .is_some_and(|at| at <= now)
            {
                let actions = self.nodes[node].machine.handle(now, Event::Tick);
                self.execute(node, &actions);
            }
        }
    }

    fn pulse(&mut self, node: usize) {
        let now = self.now;
        let status = self.nodes[node].machine.heartbeat_payload();
        let n = &mut self.nodes[node];
        n.seq += 1;
        n.next_pulse = now + n.params.pulse;
        let (boot, seq, sender) = (n.boot, n.seq, n.name.clone());
        for lan in self.lans.clone() {
            let heartbeat = Heartbeat {
                module: MODULE.into(),
                sender: sender.clone(),
                lan: lan.name.clone(),
                boot,
                seq,
                status: status.clone(),
            };
            let bytes = wire::encode(SECRET, &heartbeat).expect("a simulated heartbeat fits");
            for to in 0..self.nodes.len() {
                if to != node && !self.cut.contains(&(node, to, lan.name.clone())) {
                    let at = now + self.delay;
                    self.schedule(
                        at,
                        to,
                        Delivery::Packet {
                            from: node,
                            lan: lan.name.clone(),
                            bytes: bytes.clone(),
                        },
                    );
                }
            }
        }
    }

    fn deliver(&mut self, item: Scheduled) {
        let node = item.to;
        if !self.nodes[node].alive {
            return;
        }
        let event = match item.delivery {
            Delivery::Packet { from, lan, bytes } => {
                // A cut made while the packet was in flight drops it too.
                if self.cut.contains(&(from, node, lan)) {
                    return;
                }
                let heartbeat =
                    wire::decode(SECRET, &bytes).expect("simulated heartbeats are authentic");
                if self.nodes[node].guard.check(&heartbeat).is_err() {
                    return;
                }
                Event::HeartbeatReceived(heartbeat)
            }
            Delivery::Event(event) => event,
            Delivery::ServeDone { epoch, attempt } => {
                if epoch != self.nodes[node].serve_epoch {
                    return;
                }
                let peer = 1 - node;
                if self.replication_connected(node, peer)
                    && self.nodes[peer].replication == ReplicationRole::Secondary
                {
                    Event::ResyncServed {
                        attempt,
                        progress: wire::ResyncProgressStatus {
                            percent: 100,
                            files_done: 10,
                            files_total: 10,
                            ..wire::ResyncProgressStatus::default()
                        },
                    }
                } else {
                    Event::ResyncServeFailed {
                        attempt,
                        reason: "connection to the secondary lost".into(),
                    }
                }
            }
            Delivery::ResyncDone { epoch } => {
                if epoch != self.nodes[node].resync_epoch {
                    return;
                }
                let peer = 1 - node;
                if self.replication_connected(node, peer)
                    && matches!(
                        self.nodes[peer].replication,
                        ReplicationRole::Alone | ReplicationRole::Primary
                    )
                {
                    Event::ResyncCompleted
                } else {
                    Event::ResyncFailed {
                        reason: "connection to the primary lost".into(),
                    }
                }
            }
        };
        let now = self.now;
        let actions = self.nodes[node].machine.handle(now, event);
        self.execute(node, &actions);
    }

    /// Runs the simulation until `until` (inclusive), jumping from event to event.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(next) = self.next_time() {
            if next > until {
                break;
            }
            self.now = next.max(self.now);
            self.process_now();
        }
        self.now = until.max(self.now);
    }

    /// Runs for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        let until = self.now + duration;
        self.run_until(until);
    }

    /// Runs until no state changes and no script or resync is pending for
    /// three `timeout`s (heartbeats keep flowing: "quiet" means nothing new).
    ///
    /// # Panics
    /// If the cluster keeps changing for ten virtual minutes (a livelock).
    pub fn drive(&mut self) {
        let window = self.nodes[0].params.timeout * 3;
        let limit = self.now + Duration::from_secs(600);
        loop {
            let before: Vec<usize> = self.nodes.iter().map(|n| n.log.len()).collect();
            self.run_for(window);
            let busy = self
                .queue
                .iter()
                .any(|item| !matches!(item.delivery, Delivery::Packet { .. }))
                || self
                    .nodes
                    .iter()
                    .any(|n| n.alive && n.machine.is_transient());
            let changed = self
                .nodes
                .iter()
                .zip(&before)
                .any(|(n, len)| n.log.len() != *len);
            if !busy && !changed {
                return;
            }
            assert!(
                self.now < limit,
                "the cluster did not settle:\n{}",
                self.dump()
            );
        }
    }

    /// Every node's log, for failure messages.
    pub fn dump(&self) -> String {
        let mut text = String::new();
        for n in &self.nodes {
            text.push_str(&format!("--- {} ({}) ---\n", n.name, n.machine.state()));
            for line in &n.log {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Whether `node`'s log has a line containing `needle`.
    pub fn logged(&self, node: usize, needle: &str) -> bool {
        self.nodes[node]
            .log
            .iter()
            .any(|line| line.contains(needle))
    }
}

fn seed(node: usize, boot: u64) -> u64 {
    0x5eed_0000_0000_0000 ^ ((node as u64) << 32) ^ boot
}
