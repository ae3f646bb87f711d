//! Local-failure rules: what a checker's "down" verdict makes the module do, and `maxloop`.
//!
//! SafeKit's failover machine maps checker resources to actions (`restart`,
//! `stopstart`, `stop`, ...). The agent's checkers only observe; this module,
//! without I/O, decides:
//!
//! - [`Stability`]: a checker's raw observations become a verdict only after
//!   they have stayed the same for a stability delay (SafeKit's
//!   `handle_time`), so one lost probe does not restart an application.
//! - [`LoopCounter`] and [`decide`]: a down verdict fires the checker's action,
//!   as a [`Command`] with the rule's name as caller (the machine logs
//!   `Action restart called by <rule>`). `restart`, `stopstart` (and `wait`)
//!   count toward `maxloop`; once more than `maxloop` of them happened within
//!   `loop_interval`, the module is stopped instead (`Action stop called by
//!   maxloop`) and the peer takes over. Operator commands reset the counter.
//!
//! The agent feeds the returned command to [`super::Machine::handle`] and logs
//! [`Decision::log`] in the module log, which says which rule fired and why.

use std::collections::VecDeque;
use std::time::Duration;

use super::machine::Command;

/// The caller shown when `maxloop` stops the module.
pub const MAXLOOP_CALLER: &str = "maxloop";

/// What a rule does when its resource goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalAction {
    /// `stop_prim` then `start_prim` locally; the state is kept. Counts toward `maxloop`.
    Restart,
    /// Stop the module, then start it again (a PRIM fails over). Counts toward `maxloop`.
    Stopstart,
    /// Stop the module (a PRIM fails over).
    Stop,
    /// Only log.
    Noaction,
}

impl LocalAction {
    /// The action's name in rules and logs.
    pub fn name(self) -> &'static str {
        match self {
            LocalAction::Restart => "restart",
            LocalAction::Stopstart => "stopstart",
            LocalAction::Stop => "stop",
            LocalAction::Noaction => "noaction",
        }
    }

    fn counts_toward_maxloop(self) -> bool {
        matches!(self, LocalAction::Restart | LocalAction::Stopstart)
    }
}

/// A verdict that changes only after it was observed unchanged for `delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stability {
    delay: Duration,
    verdict: Option<bool>,
    candidate: Option<(bool, Duration)>,
}

impl Stability {
    /// No verdict yet (SafeKit's `init`); changes need `delay` of agreeing observations.
    pub fn new(delay: Duration) -> Self {
        Stability {
            delay,
            verdict: None,
            candidate: None,
        }
    }

    /// The current verdict (`None`: not known yet).
    pub fn verdict(&self) -> Option<bool> {
        self.verdict
    }

    /// Records an observation at `now`; returns the new verdict when it changes.
    pub fn observe(&mut self, now: Duration, up: bool) -> Option<bool> {
        if self.verdict == Some(up) {
            self.candidate = None;
            return None;
        }
        let since = match self.candidate {
            Some((candidate, since)) if candidate == up => since,
            _ => {
                self.candidate = Some((up, now));
                now
            }
        };
        if now.saturating_sub(since) >= self.delay {
            self.verdict = Some(up);
            self.candidate = None;
            Some(up)
        } else {
            None
        }
    }

    /// Forgets the verdict (the checker is not active, or its action just ran).
    pub fn reset(&mut self) {
        self.verdict = None;
        self.candidate = None;
    }
}

/// The `maxloop` counter (SafeKit's `heart.stopstartloop`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopCounter {
    maxloop: u32,
    /// Zero: the actions never expire.
    loop_interval: Duration,
    hits: VecDeque<Duration>,
}

impl LoopCounter {
    /// A counter allowing `maxloop` actions within `loop_interval` (0: no expiry).
    pub fn new(maxloop: u32, loop_interval: Duration) -> Self {
        LoopCounter {
            maxloop,
            loop_interval,
            hits: VecDeque::new(),
        }
    }

    /// Actions counted within the interval ending at `now`.
    pub fn count(&mut self, now: Duration) -> usize {
        self.expire(now);
        self.hits.len()
    }

    /// An operator command: the count starts again from zero.
    pub fn reset(&mut self) {
        self.hits.clear();
    }

    fn expire(&mut self, now: Duration) {
        if self.loop_interval.is_zero() {
            return;
        }
        while let Some(first) = self.hits.front() {
            if now.saturating_sub(*first) >= self.loop_interval {
                self.hits.pop_front();
            } else {
                break;
            }
        }
    }
}

/// What a rule makes the module do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The command to give the machine (`None`: nothing, only the log).
    pub command: Option<Command>,
    /// Start the module again once it is stopped (`stopstart`).
    pub then_start: bool,
    /// The caller the machine shows (`Action restart called by <caller>`).
    pub caller: String,
    /// Which rule fired and why, for the module log.
    pub log: String,
}

/// The rule `rule` fires because `resource` went down (`why`, e.g. `0 process < atleast 1`).
pub fn decide(
    counter: &mut LoopCounter,
    now: Duration,
    rule: &str,
    resource: &str,
    why: &str,
    action: LocalAction,
) -> Decision {
    let trigger = format!("Rule {rule} fired: resource {resource} down ({why})");
    if !action.counts_toward_maxloop() {
        let command = match action {
            LocalAction::Stop => Some(Command::Stop),
            _ => None,
        };
        return Decision {
            command,
            then_start: false,
            caller: rule.to_string(),
            log: format!("{trigger}: action {}", action.name()),
        };
    }
    counter.expire(now);
    counter.hits.push_back(now);
    let count = counter.hits.len();
    let window = if counter.loop_interval.is_zero() {
        String::new()
    } else {
        format!(" within {} s", counter.loop_interval.as_secs())
    };
    if count > usize::try_from(counter.maxloop).unwrap_or(usize::MAX) {
        counter.reset();
        return Decision {
            command: Some(Command::Stop),
            then_start: false,
            caller: MAXLOOP_CALLER.to_string(),
            log: format!(
                "{trigger}: {} would be action number {count}{window}, more than maxloop {}: the module stops",
                action.name(),
                counter.maxloop
            ),
        };
    }
    let (command, then_start) = match action {
        LocalAction::Restart => (Command::Restart, false),
        _ => (Command::Stop, true),
    };
    Decision {
        command: Some(command),
        then_start,
        caller: rule.to_string(),
        log: format!(
            "{trigger}: action {} ({count}/{} of maxloop{window})",
            action.name(),
            counter.maxloop
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_verdict_needs_the_stability_delay() {
        let mut stability = Stability::new(s(2));
        assert_eq!(stability.observe(s(0), true), None);
        assert_eq!(stability.observe(s(2), true), Some(true));
        assert_eq!(stability.observe(s(3), false), None);
        // A flap back to up restarts the delay.
        assert_eq!(stability.observe(s(4), true), None);
        assert_eq!(stability.observe(s(5), false), None);
        assert_eq!(stability.observe(s(6), false), None);
        assert_eq!(stability.observe(s(7), false), Some(false));
        assert_eq!(stability.verdict(), Some(false));
        stability.reset();
        assert_eq!(stability.verdict(), None);
    }

    #[test]
    fn zero_delay_changes_at_once() {
        let mut stability = Stability::new(Duration::ZERO);
        assert_eq!(stability.observe(s(0), false), Some(false));
        assert_eq!(stability.observe(s(1), false), None);
        assert_eq!(stability.observe(s(2), true), Some(true));
    }

    #[test]
    fn restarts_beyond_maxloop_stop_the_module() {
        let mut counter = LoopCounter::new(2, s(3600));
        for round in 1..=2 {
            let decision = decide(
                &mut counter,
                s(round),
                "errd.app",
                "proc.app",
                "0 < 1",
                LocalAction::Restart,
            );
            assert_eq!(decision.command, Some(Command::Restart));
            assert_eq!(decision.caller, "errd.app");
            assert!(
                decision.log.contains("Rule errd.app fired"),
                "{}",
                decision.log
            );
        }
        let decision = decide(
            &mut counter,
            s(3),
            "errd.app",
            "proc.app",
            "0 < 1",
            LocalAction::Restart,
        );
        assert_eq!(decision.command, Some(Command::Stop));
        assert_eq!(decision.caller, MAXLOOP_CALLER);
        assert!(
            decision.log.contains("more than maxloop 2"),
            "{}",
            decision.log
        );
        assert_eq!(counter.count(s(3)), 0);
    }

    #[test]
    fn old_actions_expire_after_loop_interval() {
        let mut counter = LoopCounter::new(1, s(10));
        let first = decide(&mut counter, s(0), "r", "x", "", LocalAction::Stopstart);
        assert_eq!(first.command, Some(Command::Stop));
        assert!(first.then_start);
        let second = decide(&mut counter, s(10), "r", "x", "", LocalAction::Stopstart);
        assert_eq!(second.command, Some(Command::Stop));
        assert!(second.then_start, "the first action expired");
        let third = decide(&mut counter, s(11), "r", "x", "", LocalAction::Stopstart);
        assert_eq!(third.caller, MAXLOOP_CALLER);
        assert!(!third.then_start);
    }

    #[test]
    fn stop_and_noaction_do_not_count() {
        let mut counter = LoopCounter::new(0, Duration::ZERO);
        let stop = decide(&mut counter, s(0), "r", "x", "", LocalAction::Stop);
        assert_eq!(
            (stop.command, stop.caller.as_str()),
            (Some(Command::Stop), "r")
        );
        let none = decide(&mut counter, s(0), "r", "x", "", LocalAction::Noaction);
        assert_eq!(none.command, None);
        assert_eq!(counter.count(s(0)), 0);
    }
}
