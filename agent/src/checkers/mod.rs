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
//! | `<errd polltimer><proc name atleast action class/>` | `proc.<name>` | `errd.<name>` | `polltimer`, none (as errd) |
//! | `<tcp ident><to addr port/></tcp>` | `tcp.<ident>` | `t_<ident>` | `interval`, `interval` |
//! | `<ping ident><to addr/></ping>` | `ping.<ident>` | `p_<ident>` | `interval`, `interval` |
//! | `<intf ident><to local_addr/></intf>` | `intf.<ident>` | `interface_failure` | `interval`, `interval` |
//! | `<ip ident><to addr/></ip>` | `ip.<ident>` | `ip_failure` (stopstart, on the primary) | `interval`, `interval` |
//! | `<module [ident] name><to addr port/></module>` | `module.<ident>_<addr>` | `module_failure` | `interval`, `interval` |
//! | `<splitbrain ident exec="ping" arg="ip1 ip2"/>` | `splitbrain.<ident>` | (fed to the machine before ALONE) | 1 s, none |
//!
//! A checker is *active* (its down verdict fires its rule) only in the states
//! of its class (`prim`: ALONE/PRIM, `both`: ALONE/PRIM/SECOND, `pre`: any
//! running state), and never while a script runs; an inactive checker's
//! verdict is forgotten, so after a restart it must be seen down again for
//! its stability delay before it fires again.
//!
//! `wait` and `swap` actions are not implemented yet: they are logged only.

pub mod ping;
pub mod probes;

use std::collections::BTreeMap;
use std::time::Duration;

use safekit_core::cluster::rules::{self, Decision, LocalAction, LoopCounter, Stability};
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
    fn active_in(self, state: State) -> bool {
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
                rule: format!("errd.{}", proc.name),
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
            Some(CheckerAction::Wait | CheckerAction::Swap) => None,
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
        match checker.kind {
            CheckerKind::Tcp => {
                for to in &checker.to {
                    let addr = to.addr.as_deref().map(parse_ip);
                    match (addr, to.port) {
                        (Some(Ok(ip)), Some(port)) => {
                            let mut spec = base(
                                format!("t_{ident}"),
                                action(LocalAction::Restart),
                                Probe::Tcp {
                                    addr: std::net::SocketAddr::new(ip, port),
                                },
                            );
                            spec.period = to.interval.unwrap_or(spec.period);
                            spec.timeout = to.timeout.unwrap_or(spec.timeout);
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
                        // SafeKit's default is `wait`, not implemented yet.
                        checker.action.and_then(|_| action(LocalAction::Noaction)),
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
                            // SafeKit's static rule is `wait`; until WAIT-until-up
                            // exists, a stopstart moves the application to the peer.
                            Some(LocalAction::Stopstart),
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
                                // SafeKit's `wait` is not implemented yet: logged only.
                                None,
                                Probe::Module {
                                    addr,
                                    module: module.clone(),
                                },
                            );
                            spec.resource = format!("module.{ident}_{ip}");
                            spec.period = to.interval.unwrap_or(spec.period);
                            spec.timeout = to.timeout.unwrap_or(spec.timeout);
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
            CheckerKind::Custom => problems.push(format!(
                "{} checker {ident} is not supported yet: not run",
                checker.kind.element()
            )),
        }
    }
    (specs, problems)
}

/// Starts one probe task per checker; each observation goes to `send` (false: stop).
///
/// # Panics
/// Outside a tokio runtime.
pub fn spawn<F>(specs: &[CheckerSpec], send: F)
where
    F: Fn(Observation) -> bool + Clone + Send + Sync + 'static,
{
    for spec in specs {
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
        }
    }

    /// An operator command: `maxloop` counts from zero again.
    pub fn reset_loop(&mut self) {
        self.counter.reset();
    }

    /// Handles an observation at `now` while the module is in `state` (`transient`: a script runs).
    pub fn observe(
        &mut self,
        now: Duration,
        observation: Observation,
        state: State,
        transient: bool,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let Some(entry) = self.entries.get_mut(&observation.resource) else {
            return outcome;
        };
        entry.last = Some((observation.up, now, observation.detail.clone()));
        outcome.witness = entry.spec.witness;
        // The witness is watched in every state: the machine needs it when the peer goes.
        let active = entry.spec.witness || (!transient && entry.spec.class.active_in(state));
        if !active {
            entry.stability.reset();
            entry.since = None;
            return outcome;
        }
        let Some(up) = entry.stability.observe(now, observation.up) else {
            return outcome;
        };
        entry.since = Some(now);
        outcome.verdict = Some((entry.spec.resource.clone(), up));
        if up || entry.spec.witness {
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
        outcome.decision = Some(decision);
        outcome
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
            rule: "errd.app".into(),
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
    <custom ident="mine" exec="watch"/>
  </check>
</service></safe>"#,
        )
        .expect("valid userconfig");
        let (specs, problems) = specs(&config);
        let resources: Vec<&str> = specs.iter().map(|spec| spec.resource.as_str()).collect();
        assert_eq!(
            resources,
            ["proc.app", "tcp.web", "intf.lan", "splitbrain.witness"]
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
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("custom checker mine is not supported yet"));
    }

    #[test]
    fn a_process_down_on_the_primary_restarts_it() {
        let mut set = CheckerSet::new(
            vec![proc_spec(LocalAction::Restart)],
            3,
            Duration::from_secs(3600),
        );
        let now = Duration::from_secs(1);
        let outcome = set.observe(now, seen(false), State::Alone, false);
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
            set.observe(now, seen(false), second, false),
            Outcome::default()
        );
        assert_eq!(
            set.observe(now, seen(false), State::Prim, true),
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
