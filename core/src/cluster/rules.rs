//! Local-failure rules: what a checker's "down" verdict makes the module do, and `maxloop`.
//!
//! SafeKit's failover machine maps checker resources to actions (`restart`,
//! `stopstart`, `stop`, ...). The agent's checkers only observe; this module,
//! without I/O, decides:
//!
//! - [`Stability`]: a checker's raw observations become a verdict only after
//!   they have stayed the same for a stability delay (the checker's
//!   `interval`; for the built-in checker rules it plays the role of
//!   SafeKit's `handle_time`), so one lost probe does not restart an
//!   application.
//! - [`LoopCounter`] and [`decide`]: a down verdict fires the checker's action,
//!   as a [`Command`] with the rule's name as caller (the machine logs
//!   `Action restart called by <rule>`), or for `wait` as the resource to
//!   wait for ([`super::Event::WaitForResource`]: the machine stops the module
//!   and holds it in WAIT until the resource is up, then SafeKit's implicit
//!   wakeup starts it again). `restart`, `stopstart` and `wait` count toward
//!   `maxloop`; once more than `maxloop` of them happened within
//!   `loop_interval`, the module is stopped instead (`Action stop called by
//!   maxloop`) and the peer takes over. Operator commands reset the counter.
//! - [`parse_rules`]: the `<failover>` rules (`label: if (expr) then
//!   action();`, with `== != ! && ||`, `[local.|remote.]class.id`, `*`/`?`
//!   in ids). The agent evaluates them on every verdict change; a rule fires
//!   once its condition has held for `handle_time` ([`HandleTime`], on top
//!   of the checkers' own stability delays, as in SafeKit), once per
//!   episode. `remote.` resources are read from the peer's values when the
//!   caller has them ([`Condition::holds_with`]), else they are `unknown`;
//!   assignments (`rfs.uptodate=up`) and Lua blocks are reported and ignored.
//!
//! The agent feeds the returned command to [`super::Machine::handle`] and logs
//! [`Decision::log`] in the module log, which says which rule fired and why.

use std::collections::{BTreeMap, VecDeque};
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
    /// Stop the module and hold it in WAIT until the resource is up again
    /// (SafeKit's implicit wakeup then starts it). Counts toward `maxloop`.
    Wait,
    /// Exchange the PRIM and SECOND roles.
    Swap,
}

impl LocalAction {
    /// The action's name in rules and logs.
    pub fn name(self) -> &'static str {
        match self {
            LocalAction::Restart => "restart",
            LocalAction::Stopstart => "stopstart",
            LocalAction::Stop => "stop",
            LocalAction::Noaction => "noaction",
            LocalAction::Wait => "wait",
            LocalAction::Swap => "swap",
        }
    }

    fn counts_toward_maxloop(self) -> bool {
        matches!(
            self,
            LocalAction::Restart | LocalAction::Stopstart | LocalAction::Wait
        )
    }
}

/// A verdict that changes only after it was observed unchanged for `delay`,
/// except the first one when it is `up`: nothing acts on a resource coming
/// up, and a start waiting for its first verdict (WAIT Transient) then goes on
/// at the first good probe, not one to two probe periods later. A first
/// `down` still needs the delay (it may fire the checker's action), and so
/// does the first `up` after [`Stability::reset_after_action`] (the implicit
/// wake-up after a `wait()` waits for a stable link, as before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stability {
    delay: Duration,
    verdict: Option<bool>,
    candidate: Option<(bool, Duration)>,
    /// A first `up` verdict needs no delay.
    quick_first_up: bool,
}

impl Stability {
    /// No verdict yet (SafeKit's `init`); changes need `delay` of agreeing
    /// observations, but for a first `up` verdict.
    pub fn new(delay: Duration) -> Self {
        Stability {
            delay,
            verdict: None,
            candidate: None,
            quick_first_up: true,
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
        if self.verdict.is_none() && up && self.quick_first_up {
            self.verdict = Some(true);
            self.candidate = None;
            return Some(true);
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

    /// Forgets the verdict (the checker is not active).
    pub fn reset(&mut self) {
        self.verdict = None;
        self.candidate = None;
        self.quick_first_up = true;
    }

    /// Forgets the verdict after the checker's action ran: the next verdict,
    /// `up` included, needs the delay.
    pub fn reset_after_action(&mut self) {
        self.verdict = None;
        self.candidate = None;
        self.quick_first_up = false;
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
    /// `wait`: the resource the module must wait for, in WAIT, before it starts again
    /// (give it to the machine as [`super::Event::WaitForResource`]).
    pub wait_for: Option<String>,
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
            LocalAction::Swap => Some(Command::Swap),
            _ => None,
        };
        return Decision {
            command,
            then_start: false,
            wait_for: None,
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
            wait_for: None,
            caller: MAXLOOP_CALLER.to_string(),
            log: format!(
                "{trigger}: {} would be action number {count}{window}, more than maxloop {}: the module stops",
                action.name(),
                counter.maxloop
            ),
        };
    }
    let (command, then_start, wait_for) = match action {
        LocalAction::Restart => (Some(Command::Restart), false, None),
        LocalAction::Wait => (None, false, Some(resource.to_string())),
        _ => (Some(Command::Stop), true, None),
    };
    Decision {
        command,
        then_start,
        wait_for,
        caller: rule.to_string(),
        log: format!(
            "{trigger}: action {} ({count}/{} of maxloop{window})",
            action.name(),
            counter.maxloop
        ),
    }
}

/// SafeKit's `<failover period handle_time>` for the explicit rules: a rule
/// whose condition holds runs its action only once the condition has held
/// for `handle_time`, at the engine's next evaluation (every `period`, on a
/// grid starting at `origin`); a condition that stops holding before then
/// runs nothing. Each rule fires once per episode: it must stop holding
/// before it can fire again.
///
/// The delay counts from the moment the resources' *verdicts* make the
/// condition hold, so it comes on top of each checker's own stability delay,
/// as in SafeKit, where a checker first sets its resource and the engine
/// then waits `handle_time` before acting. The agent's built-in checker
/// rules (`interface_failure`, `t_<ident>`, ...) do not go through this:
/// their stability delay (the checker's `interval`) plays that role, so a
/// module without `<failover>` reacts as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleTime {
    period: Duration,
    handle_time: Duration,
    origin: Duration,
    /// Rules whose condition holds: since when, and whether they fired.
    holding: BTreeMap<String, Holding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holding {
    since: Duration,
    fired: bool,
}

impl HandleTime {
    /// Rules evaluated every `period` from `origin`; an action runs once its
    /// condition held for `handle_time` (zero: at once).
    pub fn new(period: Duration, handle_time: Duration, origin: Duration) -> Self {
        HandleTime {
            period,
            handle_time,
            origin,
            holding: BTreeMap::new(),
        }
    }

    /// No delay: a rule fires as soon as its condition holds.
    pub fn immediate() -> Self {
        HandleTime::new(Duration::ZERO, Duration::ZERO, Duration::ZERO)
    }

    /// The configured `handle_time`.
    pub fn handle_time(&self) -> Duration {
        self.handle_time
    }

    /// The labels whose condition holds at `now` (the others are forgotten:
    /// their delay starts again the next time they hold).
    pub fn update<'a>(&mut self, now: Duration, holding: impl IntoIterator<Item = &'a str>) {
        let mut next = BTreeMap::new();
        for label in holding {
            let entry = self.holding.get(label).copied().unwrap_or(Holding {
                since: now,
                fired: false,
            });
            next.insert(label.to_string(), entry);
        }
        self.holding = next;
    }

    /// Whether `label` holds now (fired or not).
    pub fn holds(&self, label: &str) -> bool {
        self.holding.contains_key(label)
    }

    /// When a condition holding since `since` makes its rule fire: the first
    /// evaluation (`origin + k * period`) at or after `since + handle_time`.
    pub fn due_at(&self, since: Duration) -> Duration {
        let ready = since + self.handle_time;
        if self.period.is_zero() || ready <= self.origin {
            return ready;
        }
        let elapsed = (ready - self.origin).as_nanos();
        let period = self.period.as_nanos();
        let evaluations = elapsed.div_ceil(period);
        let offset = evaluations.saturating_mul(period);
        self.origin + Duration::from_nanos(u64::try_from(offset).unwrap_or(u64::MAX))
    }

    /// Whether `label` holds, has not fired in this episode, and is due at `now`.
    pub fn is_due(&self, label: &str, now: Duration) -> bool {
        self.holding
            .get(label)
            .is_some_and(|entry| !entry.fired && self.due_at(entry.since) <= now)
    }

    /// `label` fired: not again until its condition stops holding.
    pub fn mark_fired(&mut self, label: &str) {
        if let Some(entry) = self.holding.get_mut(label) {
            entry.fired = true;
        }
    }

    /// The next time a holding rule becomes due, after `now`.
    pub fn next_deadline(&self, now: Duration) -> Option<Duration> {
        self.holding
            .values()
            .filter(|entry| !entry.fired)
            .map(|entry| self.due_at(entry.since))
            .filter(|at| *at > now)
            .min()
    }

    /// How long `label` has held, and how long until it fires (for `state -v`).
    pub fn pending(&self, now: Duration) -> Vec<(String, Duration, Duration)> {
        self.holding
            .iter()
            .filter(|(_, entry)| !entry.fired)
            .map(|(label, entry)| {
                (
                    label.clone(),
                    now.saturating_sub(entry.since),
                    self.due_at(entry.since).saturating_sub(now),
                )
            })
            .collect()
    }
}

/// A resource's value as rules test it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceValue {
    /// The checker says it works.
    Up,
    /// The checker says it failed.
    Down,
    /// No verdict yet (or the checker is not active).
    Init,
    /// Not known here (`remote.` resources, classes the agent does not report).
    Unknown,
}

impl ResourceValue {
    fn parse(word: &str) -> Option<ResourceValue> {
        match word {
            "up" => Some(ResourceValue::Up),
            "down" => Some(ResourceValue::Down),
            "init" => Some(ResourceValue::Init),
            "unknown" => Some(ResourceValue::Unknown),
            _ => None,
        }
    }
}

/// `[local.|remote.]class.id` in a rule; `id` may hold `*` and `?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    /// `remote.`: the peer's resource.
    pub remote: bool,
    /// `class.id`.
    pub name: String,
}

impl ResourceRef {
    /// Whether `resource` (`class.id`) is one this reference names.
    pub fn matches(&self, resource: &str) -> bool {
        wildcard_match(self.name.as_bytes(), resource.as_bytes())
    }

    fn is_pattern(&self) -> bool {
        self.name.contains(['*', '?'])
    }
}

fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard_match(&pattern[1..], text)
                || (!text.is_empty() && wildcard_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => wildcard_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// A rule's condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `resource == value` (`equal`) or `resource != value`; with a pattern,
    /// `==` holds when any matching resource has the value.
    Compare {
        /// The resource(s).
        resource: ResourceRef,
        /// `==` or `!=`.
        equal: bool,
        /// The value.
        value: ResourceValue,
    },
    /// `!c`.
    Not(Box<Condition>),
    /// `a && b`.
    And(Box<Condition>, Box<Condition>),
    /// `a || b`.
    Or(Box<Condition>, Box<Condition>),
}

impl Condition {
    /// Evaluates with `values`: every known local resource and its value
    /// (`remote.` resources are `unknown`).
    pub fn holds(&self, values: &[(&str, ResourceValue)]) -> bool {
        self.holds_with(values, &[])
    }

    /// Evaluates with the local resources `local` and the peer's `remote`
    /// (as its heartbeat carried them; empty: unknown). A resource that no
    /// value names is `unknown`.
    pub fn holds_with(
        &self,
        local: &[(&str, ResourceValue)],
        remote: &[(&str, ResourceValue)],
    ) -> bool {
        match self {
            Condition::Compare {
                resource,
                equal,
                value,
            } => {
                let values = if resource.remote { remote } else { local };
                let mut matching = values
                    .iter()
                    .filter(|(name, _)| resource.matches(name))
                    .peekable();
                let any_equal = if matching.peek().is_none() {
                    *value == ResourceValue::Unknown
                } else {
                    matching.any(|(_, current)| current == value)
                };
                any_equal == *equal
            }
            Condition::Not(inner) => !inner.holds_with(local, remote),
            Condition::And(a, b) => a.holds_with(local, remote) && b.holds_with(local, remote),
            Condition::Or(a, b) => a.holds_with(local, remote) || b.holds_with(local, remote),
        }
    }

    /// The local, non-pattern resources it compares, in order.
    pub fn resources(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect(&mut out);
        out
    }

    /// The `remote.` non-pattern resources it compares (without `remote.`), in order.
    pub fn remote_resources(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_where(true, &mut out);
        out
    }

    fn collect<'a>(&'a self, out: &mut Vec<&'a str>) {
        self.collect_where(false, out);
    }

    fn collect_where<'a>(&'a self, remote: bool, out: &mut Vec<&'a str>) {
        match self {
            Condition::Compare { resource, .. } => {
                if resource.remote == remote
                    && !resource.is_pattern()
                    && !out.contains(&resource.name.as_str())
                {
                    out.push(&resource.name);
                }
            }
            Condition::Not(inner) => inner.collect_where(remote, out),
            Condition::And(a, b) | Condition::Or(a, b) => {
                a.collect_where(remote, out);
                b.collect_where(remote, out);
            }
        }
    }
}

/// One `label: if (condition) then action();` of `<failover>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The label, shown as the caller (`Action stopstart called by <label>`).
    pub label: String,
    /// When it fires.
    pub condition: Condition,
    /// What it does.
    pub action: LocalAction,
}

/// Parses the `<failover>` rule blocks (each CDATA section); Lua blocks
/// (`--Lua Rules`) are skipped. Returns the rules understood and one problem
/// per statement that is not (assignments such as `rfs.uptodate=up`, other
/// actions), which the caller logs: such statements do nothing.
pub fn parse_rules(blocks: &[String]) -> (Vec<Rule>, Vec<String>) {
    let mut rules = Vec::new();
    let mut problems = Vec::new();
    for block in blocks {
        if block.trim_start().starts_with("--Lua") {
            problems.push("Lua rules are not supported: block ignored".to_string());
            continue;
        }
        let text: String = block
            .lines()
            .map(|line| line.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for statement in text.split(';') {
            let statement = statement.trim();
            if statement.is_empty() {
                continue;
            }
            match parse_rule(statement) {
                Ok(rule) => rules.push(rule),
                Err(reason) => problems.push(format!(
                    "rule `{}` not understood ({reason}): ignored",
                    statement.split_whitespace().collect::<Vec<_>>().join(" ")
                )),
            }
        }
    }
    (rules, problems)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Symbol(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((start, c)) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        let two = text.get(start..start + 2);
        if let Some(symbol) = ["&&", "||", "==", "!="]
            .into_iter()
            .find(|symbol| two == Some(*symbol))
        {
            chars.next();
            tokens.push(Token::Symbol(symbol));
            continue;
        }
        if let Some(symbol) = ["(", ")", "!", ":", "="]
            .into_iter()
            .find(|symbol| symbol.starts_with(c))
        {
            tokens.push(Token::Symbol(symbol));
            continue;
        }
        let is_word = |c: char| c.is_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '-');
        if !is_word(c) {
            return Err(format!("unexpected `{c}`"));
        }
        let mut end = start + c.len_utf8();
        while let Some((index, next)) = chars.peek().copied() {
            if !is_word(next) {
                break;
            }
            end = index + next.len_utf8();
            chars.next();
        }
        tokens.push(Token::Word(text[start..end].to_string()));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn symbol(&mut self, symbol: &'static str) -> Result<(), String> {
        match self.next() {
            Some(Token::Symbol(found)) if found == symbol => Ok(()),
            other => Err(format!(
                "expected `{symbol}`, found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn word(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(word)) => Ok(word),
            other => Err(format!(
                "expected a name, found {}",
                describe(other.as_ref())
            )),
        }
    }

    fn or(&mut self) -> Result<Condition, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Symbol("||")) {
            self.at += 1;
            left = Condition::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Condition, String> {
        let mut left = self.unary()?;
        while self.peek() == Some(&Token::Symbol("&&")) {
            self.at += 1;
            left = Condition::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Condition, String> {
        match self.peek() {
            Some(Token::Symbol("!")) => {
                self.at += 1;
                Ok(Condition::Not(Box::new(self.unary()?)))
            }
            Some(Token::Symbol("(")) => {
                self.at += 1;
                let inner = self.or()?;
                self.symbol(")")?;
                Ok(inner)
            }
            _ => {
                let name = self.word()?;
                let equal = match self.next() {
                    Some(Token::Symbol("==")) => true,
                    Some(Token::Symbol("!=")) => false,
                    other => {
                        return Err(format!(
                            "expected `==` or `!=` after {name}, found {}",
                            describe(other.as_ref())
                        ));
                    }
                };
                let value_word = self.word()?;
                let value = ResourceValue::parse(&value_word).ok_or_else(|| {
                    format!("`{value_word}` is not a value: expected up, down, init or unknown")
                })?;
                let (remote, name) = if let Some(rest) = name.strip_prefix("remote.") {
                    (true, rest.to_string())
                } else {
                    (
                        false,
                        name.strip_prefix("local.").unwrap_or(&name).to_string(),
                    )
                };
                if !name.contains('.') {
                    return Err(format!("`{name}` is not a resource (class.id)"));
                }
                Ok(Condition::Compare {
                    resource: ResourceRef { remote, name },
                    equal,
                    value,
                })
            }
        }
    }
}

fn describe(token: Option<&Token>) -> String {
    match token {
        Some(Token::Word(word)) => format!("`{word}`"),
        Some(Token::Symbol(symbol)) => format!("`{symbol}`"),
        None => "the end".to_string(),
    }
}

fn parse_rule(statement: &str) -> Result<Rule, String> {
    let mut parser = Parser {
        tokens: tokenize(statement)?,
        at: 0,
    };
    let label = parser.word()?;
    parser.symbol(":")?;
    if parser.word()? != "if" {
        return Err("expected `if`".to_string());
    }
    let condition = parser.or()?;
    if parser.word()? != "then" {
        return Err("expected `then`".to_string());
    }
    let action_word = parser.word()?;
    let action = match action_word.as_str() {
        "restart" => LocalAction::Restart,
        "stopstart" => LocalAction::Stopstart,
        "stop" => LocalAction::Stop,
        "wait" => LocalAction::Wait,
        "swap" => LocalAction::Swap,
        "noaction" => LocalAction::Noaction,
        other => return Err(format!("unsupported action `{other}`")),
    };
    parser.symbol("(")?;
    parser.symbol(")")?;
    if let Some(extra) = parser.peek() {
        return Err(format!(
            "unexpected {} after the action",
            describe(Some(extra))
        ));
    }
    Ok(Rule {
        label,
        condition,
        action,
    })
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
        assert_eq!(stability.observe(s(0), false), None);
        assert_eq!(stability.observe(s(1), false), None);
        assert_eq!(stability.observe(s(2), false), Some(false));
        assert_eq!(stability.observe(s(2), true), None);
        assert_eq!(stability.observe(s(4), true), Some(true));
        assert_eq!(stability.observe(s(5), false), None);
        assert_eq!(stability.observe(s(6), true), None);
        assert_eq!(stability.observe(s(7), false), None);
        assert_eq!(stability.observe(s(9), false), Some(false));
        stability.reset();
        assert_eq!(stability.verdict(), None);
    }

    #[test]
    fn a_first_up_verdict_needs_no_delay_a_first_down_does() {
        let mut stability = Stability::new(s(3));
        // A start waiting for its first verdict goes on at the first good probe.
        assert_eq!(stability.observe(s(0), true), Some(true));
        assert_eq!(stability.verdict(), Some(true));
        // Going down afterwards still needs the delay.
        assert_eq!(stability.observe(s(1), false), None);
        assert_eq!(stability.observe(s(4), false), Some(false));
        // Forgotten (inactive): a first down needs the delay again.
        stability.reset();
        assert_eq!(stability.observe(s(5), false), None);
        assert_eq!(stability.observe(s(6), true), Some(true));
        // After the action ran, coming up needs the delay too.
        stability.reset_after_action();
        assert_eq!(stability.observe(s(7), true), None);
        assert_eq!(stability.observe(s(10), true), Some(true));
    }

    #[test]
    fn a_flap_restarts_the_delay() {
        let mut stability = Stability::new(s(2));
        assert_eq!(stability.observe(s(0), true), Some(true));
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
    fn wait_counts_toward_maxloop_and_names_its_resource() {
        let mut counter = LoopCounter::new(1, Duration::ZERO);
        let wait = decide(
            &mut counter,
            s(0),
            "interface_failure",
            "intf.lan",
            "no carrier",
            LocalAction::Wait,
        );
        assert_eq!(wait.command, None);
        assert_eq!(wait.wait_for.as_deref(), Some("intf.lan"));
        assert!(
            wait.log.contains("action wait (1/1 of maxloop)"),
            "{}",
            wait.log
        );
        let again = decide(
            &mut counter,
            s(1),
            "interface_failure",
            "intf.lan",
            "no carrier",
            LocalAction::Wait,
        );
        assert_eq!(
            (again.command, again.caller.as_str()),
            (Some(Command::Stop), MAXLOOP_CALLER)
        );
        assert_eq!(again.wait_for, None);
        let swap = decide(
            &mut counter,
            s(2),
            "c_app",
            "custom.app",
            "set",
            LocalAction::Swap,
        );
        assert_eq!(swap.command, Some(Command::Swap));
        assert_eq!(counter.count(s(2)), 0, "swap does not count");
    }

    /// The simulated pair: a `wait()` rule on the primary hands the application
    /// over, holds the node in WAIT while the resource is down, and the implicit
    /// wakeup makes it SECOND of the new primary once it is up.
    #[test]
    fn wait_on_the_primary_fails_over_and_the_wakeup_joins_as_second() {
        use super::super::machine::{Event, SecondPhase, State, WaitReason};
        use super::super::sim::{PairOptions, Sim, ms};
        const NODE1: usize = 0;
        const NODE2: usize = 1;
        let mut sim = Sim::pair(PairOptions::default());
        sim.run_for(ms(5000));
        sim.command(NODE1, Command::Prim);
        sim.drive();
        sim.command(NODE2, Command::Second);
        sim.drive();
        assert_eq!(sim.state(NODE1), State::Prim, "{}", sim.dump());
        assert_eq!(
            sim.state(NODE2),
            State::Second(SecondPhase::InSync),
            "{}",
            sim.dump()
        );

        let down = Event::CheckerVerdict {
            resource: "intf.lan".into(),
            up: false,
        };
        sim.deliver_event(NODE1, down);
        sim.deliver_event(
            NODE1,
            Event::WaitForResource {
                resource: "intf.lan".into(),
                caller: "interface_failure".into(),
            },
        );
        sim.drive();
        assert_eq!(
            sim.state(NODE1),
            State::Wait(WaitReason::ResourceDown),
            "{}",
            sim.dump()
        );
        assert_eq!(sim.state(NODE2), State::Alone, "{}", sim.dump());
        assert!(!sim.nodes[NODE1].application_running && !sim.nodes[NODE1].vip);
        assert!(
            sim.logged(NODE1, "Action wait called by interface_failure"),
            "{}",
            sim.dump()
        );
        sim.run_for(ms(10_000));
        assert_eq!(
            sim.state(NODE1),
            State::Wait(WaitReason::ResourceDown),
            "held while down"
        );

        sim.deliver_event(
            NODE1,
            Event::CheckerVerdict {
                resource: "intf.lan".into(),
                up: true,
            },
        );
        sim.drive();
        sim.run_for(ms(5000));
        assert!(
            sim.logged(
                NODE1,
                "Action wakeup called by Implicit_wakeup: intf.lan up again"
            ),
            "{}",
            sim.dump()
        );
        assert_eq!(
            sim.state(NODE1),
            State::Second(SecondPhase::InSync),
            "{}",
            sim.dump()
        );
        assert_eq!(sim.state(NODE2), State::Prim, "{}", sim.dump());
    }

    #[test]
    fn wait_on_a_lone_primary_resumes_it_when_the_resource_is_back() {
        use super::super::machine::{Event, State, WaitReason};
        use super::super::sim::{PairOptions, Sim, ms};
        const NODE1: usize = 0;
        let mut sim = Sim::pair(PairOptions::default());
        sim.run_for(ms(5000));
        sim.crash(1);
        sim.command(NODE1, Command::Prim);
        sim.drive();
        assert_eq!(sim.state(NODE1), State::Alone, "{}", sim.dump());
        sim.deliver_event(
            NODE1,
            Event::CheckerVerdict {
                resource: "ping.gw".into(),
                up: false,
            },
        );
        sim.deliver_event(
            NODE1,
            Event::WaitForResource {
                resource: "ping.gw".into(),
                caller: "p_gw".into(),
            },
        );
        sim.drive();
        assert_eq!(
            sim.state(NODE1),
            State::Wait(WaitReason::ResourceDown),
            "{}",
            sim.dump()
        );
        assert!(!sim.nodes[NODE1].application_running);
        sim.deliver_event(
            NODE1,
            Event::CheckerVerdict {
                resource: "ping.gw".into(),
                up: true,
            },
        );
        sim.drive();
        assert_eq!(
            sim.state(NODE1),
            State::Alone,
            "up to date, peer absent: {}",
            sim.dump()
        );
        assert!(sim.nodes[NODE1].application_running);
    }

    #[test]
    fn failover_rules_are_parsed_and_evaluated() {
        let blocks = vec![
            "\n c_app_down: if (custom.app == down && !(tcp.web == up)) then stopstart(); // x\n both: if (remote.custom.app == down || proc.* == down) then wait();\n set_it: if (heartbeat.* == down) then rfs.uptodate=up;\n".to_string(),
            "--Lua Rules\nRules = Rules + {}".to_string(),
        ];
        let (rules, problems) = parse_rules(&blocks);
        assert_eq!(rules.len(), 2, "{rules:#?}");
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[0].contains("rule `set_it: if (heartbeat.* == down) then rfs.uptodate=up`"),
            "{}",
            problems[0]
        );
        assert!(problems[1].contains("Lua"), "{}", problems[1]);
        let first = &rules[0];
        assert_eq!(
            (first.label.as_str(), first.action),
            ("c_app_down", LocalAction::Stopstart)
        );
        assert_eq!(first.condition.resources(), vec!["custom.app", "tcp.web"]);
        let values = |app, web| {
            vec![
                ("custom.app", app),
                ("tcp.web", web),
                ("proc.x", ResourceValue::Up),
            ]
        };
        assert!(
            first
                .condition
                .holds(&values(ResourceValue::Down, ResourceValue::Down))
        );
        assert!(
            !first
                .condition
                .holds(&values(ResourceValue::Down, ResourceValue::Up))
        );
        assert!(
            !first
                .condition
                .holds(&values(ResourceValue::Init, ResourceValue::Down))
        );
        let second = &rules[1];
        assert_eq!(second.action, LocalAction::Wait);
        assert!(
            !second
                .condition
                .holds(&values(ResourceValue::Up, ResourceValue::Up)),
            "remote values are unknown here"
        );
        let remote_down = [("custom.app", ResourceValue::Down)];
        assert!(
            second
                .condition
                .holds_with(&values(ResourceValue::Up, ResourceValue::Up), &remote_down),
            "the peer's custom.app, as its heartbeat carried it"
        );
        assert!(
            !second.condition.holds_with(
                &values(ResourceValue::Down, ResourceValue::Up),
                &[("custom.app", ResourceValue::Up)]
            ),
            "a local value does not stand for the remote one"
        );
        let proc_down = vec![
            ("proc.a", ResourceValue::Up),
            ("proc.b", ResourceValue::Down),
        ];
        assert!(
            second.condition.holds(&proc_down),
            "a pattern matches any resource"
        );
    }

    #[test]
    fn malformed_rules_are_reported_not_guessed() {
        for (text, why) in [
            (
                "r: if (custom.a = down) then stop();",
                "expected `==` or `!=`",
            ),
            (
                "r: if (custom.a == sideways) then stop();",
                "`sideways` is not a value",
            ),
            (
                "r: if (custom.a == down) then reboot();",
                "unsupported action `reboot`",
            ),
            ("r: if (custom.a == down then stop();", "expected `)`"),
            (
                "r: if (app == down) then stop();",
                "`app` is not a resource",
            ),
        ] {
            let (rules, problems) = parse_rules(&[text.to_string()]);
            assert!(rules.is_empty(), "{text}");
            assert!(problems[0].contains(why), "{text}: {}", problems[0]);
        }
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

    #[test]
    fn handle_time_delays_a_rule_to_the_next_evaluation_and_fires_it_once() {
        // SafeKit's defaults: evaluated every 5 s, the action must hold 15 s.
        let mut engine = HandleTime::new(s(5), s(15), s(0));
        engine.update(s(7), ["app_down"]);
        assert!(!engine.is_due("app_down", s(7)));
        // 7 + 15 = 22: the next evaluation is at 25.
        assert_eq!(engine.next_deadline(s(7)), Some(s(25)));
        assert!(!engine.is_due("app_down", s(24)));
        engine.update(s(24), ["app_down"]);
        assert!(engine.is_due("app_down", s(25)), "held long enough");
        engine.mark_fired("app_down");
        assert!(!engine.is_due("app_down", s(60)), "once per episode");
        assert_eq!(engine.next_deadline(s(25)), None);
        // It stops holding, then holds again: a new delay.
        engine.update(s(61), []);
        engine.update(s(62), ["app_down"]);
        assert!(!engine.is_due("app_down", s(70)));
        assert!(
            engine.is_due("app_down", s(80)),
            "62 + 15 = 77, evaluated at 80"
        );
    }

    #[test]
    fn a_condition_that_stops_holding_before_handle_time_runs_nothing() {
        let mut engine = HandleTime::new(s(1), s(3), s(0));
        engine.update(s(10), ["flap"]);
        engine.update(s(12), []);
        assert!(!engine.holds("flap"));
        assert!(!engine.is_due("flap", s(13)));
        assert_eq!(engine.next_deadline(s(12)), None);
        engine.update(s(12), ["flap"]);
        assert_eq!(
            engine.pending(s(14)),
            vec![("flap".to_string(), s(2), s(1))]
        );
        assert!(engine.is_due("flap", s(15)));
    }

    #[test]
    fn without_handle_time_a_rule_is_due_at_once() {
        let mut engine = HandleTime::immediate();
        engine.update(s(3), ["r"]);
        assert!(engine.is_due("r", s(3)));
        assert_eq!(engine.next_deadline(s(3)), None);
    }

    #[test]
    fn a_started_node_waits_while_a_wait_rule_resource_is_init() {
        use super::super::machine::{Event, State, WaitReason};
        use super::super::sim::{PairOptions, Sim, ms};
        use std::collections::BTreeSet;
        const NODE1: usize = 0;
        const NODE2: usize = 1;
        let mut sim = Sim::pair(PairOptions::default());
        sim.run_for(ms(5000));
        sim.command(NODE1, Command::Prim);
        sim.drive();
        sim.command(NODE2, Command::Second);
        sim.drive();
        assert_eq!(sim.state(NODE1), State::Prim, "{}", sim.dump());
        sim.command(NODE2, Command::Stop);
        sim.drive();
        assert_eq!(sim.state(NODE2), State::Stop, "{}", sim.dump());
        let init: BTreeSet<String> = ["custom.app".to_string()].into();
        sim.deliver_event(NODE2, Event::WaitResourcesInit(init.clone()));
        sim.command(NODE2, Command::Start);
        sim.run_for(ms(10_000));
        assert_eq!(
            sim.state(NODE2),
            State::Wait(WaitReason::ResourceInit),
            "the peer is PRIM, but custom.app is still init: {}",
            sim.dump()
        );
        assert!(
            sim.dump()
                .contains("waiting for the first verdict of custom.app"),
            "the reason names the resource: {}",
            sim.dump()
        );
        assert_eq!(sim.state(NODE1), State::Alone, "{}", sim.dump());
        // The checker's first verdict arrives: the start goes on.
        sim.deliver_event(NODE2, Event::WaitResourcesInit(BTreeSet::new()));
        sim.run_for(ms(5000));
        assert_eq!(
            sim.state(NODE2),
            State::Second(super::super::SecondPhase::InSync),
            "{}",
            sim.dump()
        );
        assert_eq!(sim.state(NODE1), State::Prim, "{}", sim.dump());
    }
}
