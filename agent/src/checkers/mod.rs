//! Checkers: probes that watch what SafeKit watches (processes, TCP ports, gateways, links, witnesses).
//!
//! Each probe ([`spawn`]) is a tokio task that polls one thing every period
//! and sends a raw [`Observation`] to the module's runner. The runner keeps a
//! [`CheckerSet`]: it turns observations into verdicts after their stability
//! delay ([`safekit_core::cluster::rules::Stability`]), reports verdict changes
//! to the machine (`Event::CheckerVerdict`, `Event::WitnessReachable`), and
//! when an active checker goes down, asks the core's rules
//! ([`safekit_core::cluster::rules::decide`]) which command to run. Probes
//! never decide anything; all decisions stay in the runner and the core.
//!
//! | config | resource | rule (caller) | period, stability |
//! |---|---|---|---|
//! | config | resource | rule (caller), default action | period, stability |
//! |---|---|---|---|
//! | `<errd polltimer><proc name atleast action class/>` | `proc.<name>` | `errd`, stopstart | `polltimer`, none (as errd) |
//! | `<tcp ident><to addr port/></tcp>` | `tcp.<ident>` | `t_<ident>`, restart (`when="pre"`: wait) | `interval`, `interval` |
//! | `<ping ident><to addr/></ping>` | `ping.<ident>` | `p_<ident>`, wait | `interval`, `interval` |
//! | `<intf ident><to local_addr/></intf>` | `intf.<ident>` | `interface_failure`, wait | `interval`, `interval` |
//! | `<ip ident><to addr/></ip>`, `<virtual_addr check="on">` | `ip.<ident>`, `ip.<addr>` | `ip_failure`, stopstart (on the primary) | `interval` (generated: 3 s), same |
//! | `<custom ident when exec arg action/>` | `custom.<ident>` | `c_<ident>`, noaction | set by its program (`safekit set`), none |
//! | `<module [ident] name><to addr port/></module>` | `module.<ident>_<addr>` | `module_failure`, wait | `interval`, `interval` |
//! | `<splitbrain ident exec="ping" arg="ip1 ip2"/>` | `splitbrain.<ident>` | (fed to the machine before ALONE) | 1 s, none |
//!
//! A checker is *active* (its down verdict fires its rule) only in the states
//! of its class (`prim`: ALONE/PRIM, `both`: ALONE/PRIM/SECOND, `pre`: any
//! running state), and never while a script runs; an inactive checker's
//! verdict is forgotten, so after a restart it must be seen down again for
//! its stability delay before it fires again. A checker whose resource the
//! module waits for (a `wait` rule fired) stays active in WAIT, so that its
//! up verdict can wake the module; it does not fire again meanwhile.
//!
//! A custom checker has no probe: its program ([`custom`]) runs while the
//! checker's class holds and reports with `safekit set -r custom.<ident> -v
//! up|down`, which arrives here through [`CheckerSet::set`].

pub mod custom;
pub mod ping;
pub mod probes;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use safekit_core::cluster::rules::{
    self, Decision, LocalAction, LoopCounter, ResourceValue, Rule, Stability,
};
use safekit_core::cluster::{SecondPhase, State};
use safekit_core::config::{CheckerAction, CheckerKind, ProcAction, UserConfig, When};

/// A raw observation of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    /// The resource (`proc.app`, `tcp.web`).
    pub resource: String,
    /// What the probe saw.
    pub up: bool,
    /// Why, for the log and `safekit state -v` (`1 process`, `connection refused`).
    pub detail: String,
}

/// In which states a checker's down verdict fires its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Any running state (WAIT, ALONE, PRIM, SECOND).
    Pre,
    /// ALONE and PRIM.
    Prim,
    /// SECOND.
    Second,
    /// ALONE, PRIM and SECOND.
    Both,
}

impl Class {
    /// Whether a checker of this class runs in `state`.
    pub fn active_in(self, state: State) -> bool {
        match self {
            Class::Pre => state != State::Stop,
            Class::Prim => matches!(state, State::Alone | State::Prim),
            Class::Second => matches!(state, State::Second(SecondPhase::InSync)),
            Class::Both => matches!(
                state,
                State::Alone | State::Prim | State::Second(SecondPhase::InSync)
            ),
        }
    }

    fn from_when(when: When) -> Class {
        match when {
            When::Pre => Class::Pre,
            When::Prim => Class::Prim,
            When::Second => Class::Second,
            When::Both => Class::Both,
        }
    }
}

/// What a probe polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// At least `atleast` processes whose name (15 characters, as `comm`) is `name`.
    Process {
        /// The name.
        name: String,
        /// The minimum count.
        atleast: u32,
    },
    /// A TCP connection to `addr` is accepted within the timeout.
    Tcp {
        /// Where.
        addr: std::net::SocketAddr,
    },
    /// One of `addrs` answers an ICMP echo within the timeout.
    Ping {
        /// The targets.
        addrs: Vec<std::net::IpAddr>,
    },
    /// The interface holding `local_addr` has carrier.
    Interface {
        /// The local address.
        local_addr: std::net::IpAddr,
    },
    /// `addr` is configured on one of this node's interfaces (the virtual IP is in place).
    LocalAddress {
        /// The address.
        addr: std::net::IpAddr,
    },
    /// Module `module` runs its application on the agent at `addr` (its `ready.txt` answers 200).
    Module {
        /// The other agent's health check address.
        addr: std::net::SocketAddr,
        /// The watched module.
        module: String,
    },
    /// A program of the module's `bin/` that reports with `safekit set` (never polled).
    Custom {
        /// The program, relative to `SAFEUSERBIN` (or absolute).
        exec: String,
        /// Its arguments (the `arg` attribute, split at white space).
        args: Vec<String>,
    },
}

/// One configured checker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckerSpec {
    /// `class.ident`.
    pub resource: String,
    /// The rule's name (caller of the commands it runs).
    pub rule: String,
    /// The action on down (`None`: unsupported, logged only).
    pub action: Option<LocalAction>,
    /// When it is active.
    pub class: Class,
    /// This is the split-brain witness.
    pub witness: bool,
    /// Polling period.
    pub period: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Stability delay before a verdict changes.
    pub stability: Duration,
    /// What to poll.
    pub probe: Probe,
}

/// The checkers of a module as configured, and configuration problems found on the way.
pub fn specs(config: &UserConfig) -> (Vec<CheckerSpec>, Vec<String>) {
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    let service = &config.service;
    if let Some(errd) = &service.errd {
        for proc in &errd.proc {
            let action = match &proc.action {
                ProcAction::Restart => Some(LocalAction::Restart),
                ProcAction::Stopstart => Some(LocalAction::Stopstart),
                ProcAction::Stop => Some(LocalAction::Stop),
                ProcAction::Noaction => Some(LocalAction::Noaction),
                ProcAction::Handler(handler) => {
                    problems.push(format!(
                        "errd: process {}: handler action {handler} is not supported yet (logged only)",
                        proc.name
                    ));
                    None
                }
            };
            let class = match proc.class.as_deref() {
                Some("both") => Class::Both,
                Some("pre") => Class::Pre,
                Some("second" | "sec") => Class::Second,
                _ => Class::Prim,
            };
            specs.push(CheckerSpec {
                resource: format!("proc.{}", proc.name),
                rule: "errd".into(),
                action,
                class,
                witness: false,
                period: errd.polltimer,
                timeout: errd.polltimer,
                stability: Duration::ZERO,
                probe: Probe::Process {
                    name: proc.name.clone(),
                    atleast: proc.atleast,
                },
            });
        }
    }
    let checkers = service.check.iter().flat_map(|check| check.checkers.iter());
    for checker in checkers {
        let ident = checker.resource_ident().to_string();
        let resource = format!("{}.{ident}", checker.kind.element());
        let action = |default: LocalAction| match checker.action {
            None => Some(default),
            Some(CheckerAction::Restart) => Some(LocalAction::Restart),
            Some(CheckerAction::Stopstart) => Some(LocalAction::Stopstart),
            Some(CheckerAction::Stop) => Some(LocalAction::Stop),
            Some(CheckerAction::Noaction) => Some(LocalAction::Noaction),
            Some(CheckerAction::Wait) => Some(LocalAction::Wait),
            Some(CheckerAction::Swap) => Some(LocalAction::Swap),
        };
        let parse_ip = |text: &str| {
            text.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
        };
        let base = |rule: String, action, probe| CheckerSpec {
            resource: resource.clone(),
            rule,
            action,
            class: Class::from_when(checker.when),
            witness: false,
            period: checker.interval,
            timeout: checker.timeout,
            stability: checker.interval,
            probe,
        };
        // A probe ends before the next one starts (an unset 5 s timeout with a shorter interval).
        let base = |rule: String, action, probe| {
            let mut spec = base(rule, action, probe);
            spec.timeout = spec.timeout.min(spec.period);
            spec
        };
        match checker.kind {
            CheckerKind::Tcp => {
                for to in &checker.to {
                    let addr = to.addr.as_deref().map(parse_ip);
                    match (addr, to.port) {
                        (Some(Ok(ip)), Some(port)) => {
                            // SafeKit: restart, but wait for a checker of every running state.
                            let default = if checker.when == When::Pre {
                                LocalAction::Wait
                            } else {
                                LocalAction::Restart
                            };
                            let mut spec = base(
                                format!("t_{ident}"),
                                action(default),
                                Probe::Tcp {
                                    addr: std::net::SocketAddr::new(ip, port),
                                },
                            );
                            spec.period = to.interval.unwrap_or(spec.period);
                            spec.timeout = to.timeout.unwrap_or(spec.timeout).min(spec.period);
                            specs.push(spec);
                        }
                        _ => problems.push(format!(
                            "tcp checker {ident}: <to> needs a numeric addr and a port"
                        )),
                    }
                }
            }
            CheckerKind::Ping => {
                let addrs: Result<Vec<_>, _> = checker
                    .to
                    .iter()
                    .filter_map(|to| to.addr.as_deref())
                    .map(parse_ip)
                    .collect();
                match addrs {
                    Ok(addrs) if !addrs.is_empty() => specs.push(base(
                        format!("p_{ident}"),
                        action(LocalAction::Wait),
                        Probe::Ping { addrs },
                    )),
                    _ => problems.push(format!(
                        "ping checker {ident}: <to addr> must be numeric addresses"
                    )),
                }
            }
            CheckerKind::Intf => {
                for to in &checker.to {
                    match to.local_addr.as_deref().map(parse_ip) {
                        Some(Ok(local_addr)) => specs.push(base(
                            "interface_failure".into(),
                            // SafeKit's static rule: wait until the link is back.
                            Some(LocalAction::Wait),
                            Probe::Interface { local_addr },
                        )),
                        _ => problems.push(format!(
                            "intf checker {ident}: <to local_addr> must be a numeric address"
                        )),
                    }
                }
            }
            CheckerKind::Splitbrain => {
                let addrs: Result<Vec<_>, _> = checker
                    .arg
                    .as_deref()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(parse_ip)
                    .collect();
                match addrs {
                    Ok(addrs) if !addrs.is_empty() => {
                        let mut spec = base(
                            "splitbrain_failure".into(),
                            Some(LocalAction::Noaction),
                            Probe::Ping { addrs },
                        );
                        spec.witness = true;
                        spec.class = Class::Pre;
                        spec.period = Duration::from_secs(1);
                        spec.timeout = Duration::from_secs(1);
                        spec.stability = Duration::ZERO;
                        specs.push(spec);
                    }
                    _ => problems.push(format!(
                        "splitbrain {ident}: arg must list numeric witness addresses"
                    )),
                }
            }
            CheckerKind::Module => {
                let module = checker.name.clone().unwrap_or_else(|| ident.clone());
                for to in &checker.to {
                    let addr = to.addr.as_deref().map(parse_ip);
                    match addr {
                        Some(Ok(ip)) if !to.secure => {
                            let addr = std::net::SocketAddr::new(
                                ip,
                                to.port.unwrap_or(crate::health_http::DEFAULT_PORT),
                            );
                            let mut spec = base(
                                "module_failure".into(),
                                Some(LocalAction::Wait),
                                Probe::Module {
                                    addr,
                                    module: module.clone(),
                                },
                            );
                            spec.resource = format!("module.{ident}_{ip}");
                            spec.period = to.interval.unwrap_or(spec.period);
                            spec.timeout = to.timeout.unwrap_or(spec.timeout).min(spec.period);
                            specs.push(spec);
                        }
                        Some(Ok(_)) => problems.push(format!(
                            "module checker {ident}: secure (HTTPS) is not supported yet: not run"
                        )),
                        _ => problems.push(format!(
                            "module checker {ident}: <to addr> must be a numeric address"
                        )),
                    }
                }
            }
            CheckerKind::Ip => {
                for to in &checker.to {
                    match to.addr.as_deref().map(parse_ip) {
                        Some(Ok(addr)) => {
                            let mut spec = base(
                                "ip_failure".into(),
                                Some(LocalAction::Stopstart),
                                Probe::LocalAddress { addr },
                            );
                            // The virtual IP is held on the primary only.
                            spec.class = Class::Prim;
                            specs.push(spec);
                        }
                        _ => problems.push(format!(
                            "ip checker {ident}: <to addr> must be a numeric address"
                        )),
                    }
                }
            }
            CheckerKind::Custom => match checker.exec.as_deref().filter(|exec| !exec.is_empty()) {
                Some(exec) => {
                    let mut spec = base(
                        format!("c_{ident}"),
                        action(LocalAction::Noaction),
                        Probe::Custom {
                            exec: exec.to_string(),
                            args: checker
                                .arg
                                .as_deref()
                                .unwrap_or("")
                                .split_whitespace()
                                .map(str::to_string)
                                .collect(),
                        },
                    );
                    // The program decides when a value is stable.
                    spec.stability = Duration::ZERO;
                    specs.push(spec);
                }
                None => problems.push(format!("custom checker {ident}: no exec: not run")),
            },
        }
    }
    // `<virtual_addr check="on">`: an ip checker per address (SafeKit's `ip.<addr>`).
    let virtual_addrs = service
        .vip
        .iter()
        .flat_map(|vip| vip.interface_list.iter())
        .flat_map(|interface| {
            interface
                .real_interface
                .iter()
                .flat_map(|real| real.virtual_addr.iter())
                .chain(
                    interface
                        .virtual_interface
                        .iter()
                        .flat_map(|virt| virt.virtual_addr.iter()),
                )
        })
        .filter(|virtual_addr| virtual_addr.check);
    for virtual_addr in virtual_addrs {
        let text = virtual_addr
            .addr
            .trim_start_matches('[')
            .trim_end_matches(']');
        let resource = format!("ip.{}", virtual_addr.addr);
        if specs.iter().any(|spec| spec.resource == resource) {
            continue;
        }
        match text.parse::<std::net::IpAddr>() {
            Ok(addr) => specs.push(CheckerSpec {
                resource,
                rule: "ip_failure".into(),
                action: Some(LocalAction::Stopstart),
                class: Class::Prim,
                witness: false,
                period: GENERATED_IP_PERIOD,
                timeout: GENERATED_IP_PERIOD,
                stability: GENERATED_IP_PERIOD,
                probe: Probe::LocalAddress { addr },
            }),
            Err(_) => problems.push(format!(
                "virtual_addr {}: check=\"on\" needs a numeric address: not checked",
                virtual_addr.addr
            )),
        }
    }
    if let Some(failover) = &service.failover_rules {
        let (_, rule_problems) = rules::parse_rules(&failover.rules);
        problems.extend(
            rule_problems
                .into_iter()
                .map(|problem| format!("failover: {problem}")),
        );
    }
    (specs, problems)
}

/// Period (and stability delay) of the ip checkers generated by `<virtual_addr check="on">`.
pub const GENERATED_IP_PERIOD: Duration = Duration::from_secs(3);

/// Starts one probe task per checker; each observation goes to `send` (false: stop).
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn<F>(specs: &[CheckerSpec], send: F)
where
    F: Fn(Observation) -> bool + Clone + Send + Sync + 'static,
{
    for spec in specs {
        if matches!(spec.probe, Probe::Custom { .. }) {
            // Reported by its program, not polled.
            continue;
        }
        let spec = spec.clone();
        let send = send.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(spec.period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let (up, detail) = probes::poll(&spec.probe, spec.timeout).await;
                let observation = Observation {
                    resource: spec.resource.clone(),
                    up,
                    detail,
                };
                if !send(observation) {
                    return;
                }
            }
        });
    }
}

#[derive(Debug)]
struct Entry {
    spec: CheckerSpec,
    stability: Stability,
    last: Option<(bool, Duration, String)>,
    /// When the current verdict was reached.
    since: Option<Duration>,
}

/// What the runner must do after an observation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The verdict changed: tell the machine (`CheckerVerdict` or, for the witness, `WitnessReachable`).
    pub verdict: Option<(String, bool)>,
    /// This is the witness.
    pub witness: bool,
    /// A rule fired.
    pub decision: Option<Decision>,
}

/// The runner's view of its module's checkers.
#[derive(Debug)]
pub struct CheckerSet {
    entries: BTreeMap<String, Entry>,
    counter: LoopCounter,
    /// The `<failover>` rules.
    rules: Vec<Rule>,
    /// Labels of the rules whose condition holds (a rule fires when it starts to hold).
    holding: BTreeSet<String>,
}

/// The module's `<failover>` rules that the agent runs (see [`rules::parse_rules`];
/// what it cannot run is reported by [`specs`]).
pub fn failover_rules(config: &UserConfig) -> Vec<Rule> {
    match &config.service.failover_rules {
        Some(failover) => rules::parse_rules(&failover.rules).0,
        None => Vec::new(),
    }
}

impl CheckerSet {
    /// The set for `specs`, with the module's `maxloop` and `loop_interval`.
    pub fn new(specs: Vec<CheckerSpec>, maxloop: u32, loop_interval: Duration) -> Self {
        CheckerSet {
            entries: specs
                .into_iter()
                .map(|spec| {
                    (
                        spec.resource.clone(),
                        Entry {
                            stability: Stability::new(spec.stability),
                            spec,
                            last: None,
                            since: None,
                        },
                    )
                })
                .collect(),
            counter: LoopCounter::new(maxloop, loop_interval),
            rules: Vec::new(),
            holding: BTreeSet::new(),
        }
    }

    /// The set with the module's explicit `<failover>` rules ([`failover_rules`]).
    #[must_use]
    pub fn with_rules(mut self, rules: Vec<Rule>) -> Self {
        self.rules = rules;
        self
    }

    /// Every resource with its value, for the rules.
    fn values(&self) -> Vec<(&str, ResourceValue)> {
        self.entries
            .values()
            .map(|entry| {
                let value = match entry.stability.verdict() {
                    Some(true) => ResourceValue::Up,
                    Some(false) => ResourceValue::Down,
                    None => ResourceValue::Init,
                };
                (entry.spec.resource.as_str(), value)
            })
            .collect()
    }

    /// Evaluates the explicit rules; returns the first that starts to hold
    /// and whose action does something (`fire`: false only updates which hold).
    fn evaluate_rules(&mut self, fire: bool) -> Option<Rule> {
        let values = self.values();
        let mut fired = None;
        let mut holding = BTreeSet::new();
        for rule in &self.rules {
            if !rule.condition.holds(&values) {
                continue;
            }
            holding.insert(rule.label.clone());
            if fire
                && fired.is_none()
                && rule.action != LocalAction::Noaction
                && !self.holding.contains(&rule.label)
            {
                fired = Some(rule.clone());
            }
        }
        self.holding = holding;
        fired
    }

    /// An operator command: `maxloop` counts from zero again.
    pub fn reset_loop(&mut self) {
        self.counter.reset();
    }

    /// Handles an observation at `now` while the module is in `state`
    /// (`transient`: a script runs; `waited`: the module waits in WAIT for
    /// this resource, after a `wait` rule).
    pub fn observe(
        &mut self,
        now: Duration,
        observation: Observation,
        state: State,
        transient: bool,
        waited: bool,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(entry) = self.entries.get_mut(&observation.resource) else {
            return outcome;
        };
        entry.last = Some((observation.up, now, observation.detail.clone()));
        outcome.witness = entry.spec.witness;
        // The witness is watched in every state: the machine needs it when the peer goes.
        let active =
            entry.spec.witness || waited || (!transient && entry.spec.class.active_in(state));
        if !active {
            if entry.stability.verdict().is_some() {
                entry.stability.reset();
                entry.since = None;
                self.evaluate_rules(false);
            }
            return outcome;
        }
        let Some(up) = entry.stability.observe(now, observation.up) else {
            return outcome;
        };
        entry.since = Some(now);
        outcome.verdict = Some((entry.spec.resource.clone(), up));
        if entry.spec.witness {
            return outcome;
        }
        // Explicit rules, except while the module waits for this resource or scripts run.
        let fire_rules = !waited && !transient && state != State::Stop;
        let explicit = self.evaluate_rules(fire_rules).map(|rule| {
            let resources = rule.condition.resources();
            let resource = if resources.contains(&observation.resource.as_str()) {
                observation.resource.clone()
            } else {
                resources.first().map_or_else(
                    || observation.resource.clone(),
                    |first| (*first).to_string(),
                )
            };
            rules::decide(
                &mut self.counter,
                now,
                &rule.label,
                &resource,
                &observation.detail,
                rule.action,
            )
        });
        let Some(entry) = self.entries.get_mut(&observation.resource) else {
            return outcome;
        };
        let builtin_fires = !up && !waited;
        if !builtin_fires || entry.spec.action == Some(LocalAction::Noaction) {
            // Only an explicit rule acts (a custom checker's default `noaction`).
            if let Some(decision) = explicit {
                self.after_decision(&decision);
                outcome.decision = Some(decision);
            } else if builtin_fires {
                outcome.decision = Some(Decision {
                    command: None,
                    then_start: false,
                    wait_for: None,
                    caller: entry.spec.rule.clone(),
                    log: format!(
                        "Rule {} fired: resource {} down ({}): action noaction",
                        entry.spec.rule, entry.spec.resource, observation.detail
                    ),
                });
            }
            return outcome;
        }
        let decision = match entry.spec.action {
            Some(action) => rules::decide(
                &mut self.counter,
                now,
                &entry.spec.rule,
                &entry.spec.resource,
                &observation.detail,
                action,
            ),
            None => Decision {
                command: None,
                then_start: false,
                wait_for: None,
                caller: entry.spec.rule.clone(),
                log: format!(
                    "Rule {} fired: resource {} down ({}): its action is not supported yet, nothing done",
                    entry.spec.rule, entry.spec.resource, observation.detail
                ),
            },
        };
        if decision.command.is_some() {
            // The action changes things: judge again from scratch afterwards.
            entry.stability.reset();
            entry.since = None;
        }
        self.after_decision(&decision);
        outcome.decision = Some(decision);
        outcome
    }

    /// After a rule changed things (a command), its resources are judged
    /// again from scratch: a rule holding now may fire again later.
    fn after_decision(&mut self, decision: &Decision) {
        if decision.command.is_none() {
            return;
        }
        self.evaluate_rules(false);
    }

    /// Forgets the verdicts of custom checkers that are not active in
    /// `state` (their program is stopped): `safekit get` shows `init` then,
    /// not a stale value. Polled checkers forget theirs at their next probe.
    pub fn forget_inactive(&mut self, state: State, waiting_for: &BTreeSet<String>) {
        let mut changed = false;
        for entry in self.entries.values_mut() {
            if matches!(entry.spec.probe, Probe::Custom { .. })
                && !entry.spec.class.active_in(state)
                && !waiting_for.contains(&entry.spec.resource)
                && entry.stability.verdict().is_some()
            {
                entry.stability.reset();
                entry.since = None;
                changed = true;
            }
        }
        if changed {
            self.evaluate_rules(false);
        }
    }

    /// `safekit set -r RESOURCE -v up|down`: a custom checker's program
    /// reports; handled as an observation of that resource.
    ///
    /// # Errors
    /// The resource is not a custom checker of this module: the reason lists those.
    #[expect(clippy::too_many_arguments, reason = "an observation plus its context")]
    pub fn set(
        &mut self,
        now: Duration,
        resource: &str,
        up: bool,
        identity: Option<&str>,
        state: State,
        transient: bool,
        waited: bool,
    ) -> Result<Outcome, String> {
        let custom = self
            .entries
            .get(resource)
            .is_some_and(|entry| matches!(entry.spec.probe, Probe::Custom { .. }));
        if !custom {
            let known: Vec<&str> = self
                .entries
                .values()
                .filter(|entry| matches!(entry.spec.probe, Probe::Custom { .. }))
                .map(|entry| entry.spec.resource.as_str())
                .collect();
            return Err(format!(
                "unknown resource {resource}: resources that can be set: {}",
                if known.is_empty() {
                    "none (no <custom> checker in userconfig.xml)".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
        let detail = match identity {
            Some(identity) => format!("set to {} by {identity}", if up { "up" } else { "down" }),
            None => format!("set to {}", if up { "up" } else { "down" }),
        };
        let observation = Observation {
            resource: resource.to_string(),
            up,
            detail,
        };
        Ok(self.observe(now, observation, state, transient, waited))
    }

    /// `safekit get -r RESOURCE`: `up`, `down` or `init` (no verdict yet, or the checker is not active).
    ///
    /// # Errors
    /// An unknown resource: the reason lists the module's resources.
    pub fn get(&self, resource: &str) -> Result<&'static str, String> {
        match self.entries.get(resource) {
            Some(entry) => Ok(match entry.stability.verdict() {
                Some(true) => "up",
                Some(false) => "down",
                None => "init",
            }),
            None => Err(format!(
                "unknown resource {resource}: this module's resources: {}",
                if self.entries.is_empty() {
                    "none".to_string()
                } else {
                    self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            )),
        }
    }

    /// One line per checker for `safekit state -v`: `(checker <resource>, verdict, last probe)`.
    pub fn details(&self, now: Duration) -> Vec<(String, String)> {
        self.entries
            .values()
            .map(|entry| {
                let verdict = match (entry.stability.verdict(), entry.since) {
                    (Some(up), Some(since)) => format!(
                        "{} for {:.1} s",
                        if up { "up" } else { "down" },
                        now.saturating_sub(since).as_secs_f64()
                    ),
                    (Some(true), None) => "up".into(),
                    (Some(false), None) => "down".into(),
                    (None, _) => "init".into(),
                };
                let last = match &entry.last {
                    Some((up, at, detail)) => format!(
                        ", last probe {} ({detail}) {:.1} s ago",
                        if *up { "up" } else { "down" },
                        now.saturating_sub(*at).as_secs_f64()
                    ),
                    None => ", not probed yet".into(),
                };
                (
                    format!("checker {}", entry.spec.resource),
                    format!("{verdict}{last}"),
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_core::cluster::Command;

    fn proc_spec(action: LocalAction) -> CheckerSpec {
        CheckerSpec {
            resource: "proc.app".into(),
            rule: "errd".into(),
            action: Some(action),
            class: Class::Prim,
            witness: false,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            stability: Duration::ZERO,
            probe: Probe::Process {
                name: "app".into(),
                atleast: 1,
            },
        }
    }

    fn seen(up: bool) -> Observation {
        Observation {
            resource: "proc.app".into(),
            up,
            detail: format!("{} process", u8::from(up)),
        }
    }

    #[test]
    fn userconfig_checkers_become_specs() {
        let config = safekit_core::config::parse_userconfig(
            "userconfig.xml",
            r#"<safe><service mode="mirror">
  <heart><heartbeat name="default"/></heart>
  <errd polltimer="2"><proc name="app" atleast="2" action="restart" class="both"/></errd>
  <check>
    <tcp ident="web" when="prim"><to addr="127.0.0.1" port="80" interval="3"/></tcp>
    <intf ident="lan"><to local_addr="10.0.0.1"/></intf>
    <splitbrain ident="witness" exec="ping" arg="10.0.0.254 10.0.1.254"/>
    <custom ident="mine" exec="watch" arg="-n 1" when="both"/>
  </check>
  <vip><interface_list><interface><real_interface>
    <virtual_addr addr="10.0.0.100" check="on"/>
  </real_interface></interface></interface_list></vip>
</service></safe>"#,
        )
        .expect("valid userconfig");
        let (specs, problems) = specs(&config);
        let resources: Vec<&str> = specs.iter().map(|spec| spec.resource.as_str()).collect();
        assert_eq!(
            resources,
            [
                "proc.app",
                "tcp.web",
                "intf.lan",
                "splitbrain.witness",
                "custom.mine",
                "ip.10.0.0.100"
            ]
        );
        assert_eq!(specs[0].class, Class::Both);
        assert_eq!(specs[0].action, Some(LocalAction::Restart));
        assert_eq!(specs[0].period, Duration::from_secs(2));
        assert_eq!(specs[1].rule, "t_web");
        assert_eq!(specs[1].period, Duration::from_secs(3));
        assert!(specs[3].witness);
        assert_eq!(
            specs[3].probe,
            Probe::Ping {
                addrs: vec![[10, 0, 0, 254].into(), [10, 0, 1, 254].into()]
            }
        );
        assert_eq!(specs[2].rule, "interface_failure");
        assert_eq!(
            specs[2].action,
            Some(LocalAction::Wait),
            "SafeKit's interface rule waits"
        );
        assert_eq!(
            specs[2].timeout,
            Duration::from_secs(5).min(specs[2].period)
        );
        assert_eq!(specs[4].rule, "c_mine");
        assert_eq!(
            specs[4].action,
            Some(LocalAction::Noaction),
            "custom: only explicit rules act"
        );
        assert_eq!(specs[4].class, Class::Both);
        assert_eq!(
            specs[4].probe,
            Probe::Custom {
                exec: "watch".into(),
                args: vec!["-n".into(), "1".into()]
            }
        );
        assert_eq!(specs[5].rule, "ip_failure");
        assert_eq!(specs[5].action, Some(LocalAction::Stopstart));
        assert_eq!(specs[5].class, Class::Prim);
        assert!(problems.is_empty(), "{problems:?}");
    }

    fn custom_spec(action: LocalAction) -> CheckerSpec {
        CheckerSpec {
            resource: "custom.app".into(),
            rule: "c_app".into(),
            action: Some(action),
            class: Class::Prim,
            witness: false,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            stability: Duration::ZERO,
            probe: Probe::Custom {
                exec: "check".into(),
                args: Vec::new(),
            },
        }
    }

    #[test]
    fn safekit_set_feeds_a_custom_checker_and_refuses_other_resources() {
        let mut set = CheckerSet::new(
            vec![
                custom_spec(LocalAction::Stopstart),
                proc_spec(LocalAction::Restart),
            ],
            3,
            Duration::ZERO,
        );
        let now = Duration::from_secs(1);
        assert_eq!(set.get("custom.app"), Ok("init"));
        let up = set
            .set(
                now,
                "custom.app",
                true,
                Some("app"),
                State::Prim,
                false,
                false,
            )
            .expect("a custom resource");
        assert_eq!(up.verdict, Some(("custom.app".into(), true)));
        assert_eq!(set.get("custom.app"), Ok("up"));
        let down = set
            .set(
                now,
                "custom.app",
                false,
                Some("app"),
                State::Prim,
                false,
                false,
            )
            .expect("a custom resource");
        let decision = down.decision.expect("c_app fires");
        assert_eq!(decision.caller, "c_app");
        assert!(decision.then_start, "stopstart");
        assert!(
            decision
                .log
                .contains("Rule c_app fired: resource custom.app down (set to down by app)"),
            "{}",
            decision.log
        );
        let refused = set
            .set(now, "proc.app", false, None, State::Prim, false, false)
            .expect_err("not a custom checker");
        assert!(
            refused.contains("resources that can be set: custom.app"),
            "{refused}"
        );
        let refused = set.get("custom.nope").expect_err("unknown");
        assert!(refused.contains("custom.app, proc.app"), "{refused}");
    }

    #[test]
    fn with_noaction_only_an_explicit_rule_acts() {
        let (rules, problems) = rules::parse_rules(&[
            "app_gone: if (custom.app == down && proc.app == up) then stopstart();".to_string(),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
        let mut set = CheckerSet::new(
            vec![
                custom_spec(LocalAction::Noaction),
                proc_spec(LocalAction::Restart),
            ],
            3,
            Duration::ZERO,
        )
        .with_rules(rules);
        let now = Duration::from_secs(1);
        set.observe(now, seen(true), State::Prim, false, false);
        let set_app = |set: &mut CheckerSet, up| {
            set.set(
                now,
                "custom.app",
                up,
                Some("app"),
                State::Prim,
                false,
                false,
            )
            .expect("custom")
        };
        assert_eq!(set_app(&mut set, true).decision, None);
        let fired = set_app(&mut set, false).decision.expect("app_gone fires");
        assert_eq!(fired.caller, "app_gone");
        assert!(fired.then_start, "stopstart");
        assert!(
            fired
                .log
                .contains("Rule app_gone fired: resource custom.app down (set to down by app)"),
            "{}",
            fired.log
        );
        // Once the module stopped (checkers inactive), the rule may fire again later.
        set.set(now, "custom.app", false, None, State::Stop, false, false)
            .expect("custom");
        set.observe(now, seen(true), State::Prim, false, false);
        assert!(set_app(&mut set, false).decision.is_some(), "fires again");
    }

    #[test]
    fn a_waited_resource_stays_watched_in_wait_and_does_not_fire_again() {
        let mut set = CheckerSet::new(vec![custom_spec(LocalAction::Wait)], 3, Duration::ZERO);
        let now = Duration::from_secs(1);
        let fired = set
            .set(now, "custom.app", false, None, State::Prim, false, false)
            .expect("custom");
        let decision = fired.decision.expect("c_app fires");
        assert_eq!(decision.wait_for.as_deref(), Some("custom.app"));
        let wait = State::Wait(safekit_core::cluster::WaitReason::ResourceDown);
        let again = set
            .set(now, "custom.app", false, None, wait, false, true)
            .expect("custom");
        assert_eq!(again.decision, None, "no second wait while waiting");
        let back = set
            .set(now, "custom.app", true, None, wait, false, true)
            .expect("custom");
        assert_eq!(
            back.verdict,
            Some(("custom.app".into(), true)),
            "the wakeup needs this"
        );
    }

    #[test]
    fn a_process_down_on_the_primary_restarts_it() {
        let mut set = CheckerSet::new(
            vec![proc_spec(LocalAction::Restart)],
            3,
            Duration::from_secs(3600),
        );
        let now = Duration::from_secs(1);
        let outcome = set.observe(now, seen(false), State::Alone, false, false);
        let decision = outcome.decision.expect("the rule fires");
        assert_eq!(decision.command, Some(Command::Restart));
        assert!(
            decision.log.contains("proc.app down (0 process)"),
            "{}",
            decision.log
        );
        assert_eq!(outcome.verdict, Some(("proc.app".into(), false)));
    }

    #[test]
    fn a_prim_checker_does_nothing_on_the_secondary_or_during_scripts() {
        let mut set = CheckerSet::new(vec![proc_spec(LocalAction::Stop)], 3, Duration::ZERO);
        let now = Duration::from_secs(1);
        let second = State::Second(SecondPhase::InSync);
        assert_eq!(
            set.observe(now, seen(false), second, false, false),
            Outcome::default()
        );
        assert_eq!(
            set.observe(now, seen(false), State::Prim, true, false),
            Outcome::default()
        );
        let details = set.details(now);
        assert_eq!(details[0].0, "checker proc.app");
        assert!(
            details[0].1.starts_with("init, last probe down"),
            "{}",
            details[0].1
        );
    }
}
