//! Heartbeat loss detection: from "a heartbeat arrived on LAN x at time t" to "the peer is lost".
//!
//! The peer is lost only when **every** LAN has been silent for `timeout`; one
//! silent LAN among live ones is a *degraded* LAN, reported for
//! `safekit state -v` and the module log but never a reason to fail over. This
//! is what keeps a pair PRIM/SECOND when only the production LAN is cut and a
//! dedicated replication LAN (`ident="flow"`) still carries heartbeats.
//!
//! Times are `Duration`s since an arbitrary epoch chosen by the caller; this
//! module never reads a clock.

use std::time::Duration;

/// One heartbeat network of the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lan {
    /// The `<heartbeat name>` (a `<lan>` of cluster.xml).
    pub name: String,
    /// `ident="flow"`: this LAN also carries the replication stream.
    pub flow: bool,
}

/// What is known about the peer's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLink {
    /// Nothing heard yet, and we have not listened for `timeout` yet.
    Unknown,
    /// At least one LAN heard from the peer within `timeout`.
    Alive,
    /// Every LAN silent for `timeout` (or never heard since we listen).
    Lost,
}

/// The health of one LAN, for `safekit state -v`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanStatus {
    /// The LAN's name.
    pub name: String,
    /// Whether it carries replication.
    pub flow: bool,
    /// Heard from the peer on this LAN within `timeout`.
    pub up: bool,
    /// When the peer was last heard on this LAN, if ever.
    pub last_seen: Option<Duration>,
}

#[derive(Debug, Clone)]
struct LanWatch {
    lan: Lan,
    last_seen: Option<Duration>,
    /// The last up/down value reported through [`Monitor::changes`].
    reported_up: bool,
}

/// Per-LAN last-seen times and the peer-loss verdict.
#[derive(Debug, Clone)]
pub struct Monitor {
    lans: Vec<LanWatch>,
    timeout: Duration,
    listening_since: Duration,
}

/// A LAN whose up/down status changed (for the module log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanChange {
    /// The LAN's name.
    pub name: String,
    /// Its new status.
    pub up: bool,
}

impl Monitor {
    /// Starts watching `lans` at `now`; the peer is [`PeerLink::Unknown`] until a
    /// heartbeat arrives or `timeout` passes.
    pub fn new(lans: Vec<Lan>, timeout: Duration, now: Duration) -> Self {
        Monitor {
            lans: lans
                .into_iter()
                .map(|lan| LanWatch {
                    lan,
                    last_seen: None,
                    reported_up: false,
                })
                .collect(),
            timeout,
            listening_since: now,
        }
    }

    /// Records a heartbeat received on `lan` at `now`. Returns false for a LAN that is not configured.
    pub fn record(&mut self, lan: &str, now: Duration) -> bool {
        match self.lans.iter_mut().find(|watch| watch.lan.name == lan) {
            Some(watch) => {
                // A late event must not move the time backwards.
                watch.last_seen = Some(watch.last_seen.map_or(now, |seen| seen.max(now)));
                true
            }
            None => false,
        }
    }

    fn lan_up(&self, watch: &LanWatch, now: Duration) -> bool {
        watch
            .last_seen
            .is_some_and(|seen| now.saturating_sub(seen) < self.timeout)
    }

    /// The peer's liveness at `now`.
    pub fn peer(&self, now: Duration) -> PeerLink {
        if self.lans.iter().any(|watch| self.lan_up(watch, now)) {
            PeerLink::Alive
        } else if self.lans.iter().any(|watch| watch.last_seen.is_some())
            || now.saturating_sub(self.listening_since) >= self.timeout
        {
            PeerLink::Lost
        } else {
            PeerLink::Unknown
        }
    }

    /// Every LAN's status at `now`.
    pub fn lans(&self, now: Duration) -> Vec<LanStatus> {
        self.lans
            .iter()
            .map(|watch| LanStatus {
                name: watch.lan.name.clone(),
                flow: watch.lan.flow,
                up: self.lan_up(watch, now),
                last_seen: watch.last_seen,
            })
            .collect()
    }

    /// LANs whose status changed since the last call (each change reported once).
    pub fn changes(&mut self, now: Duration) -> Vec<LanChange> {
        let mut changes = Vec::new();
        for index in 0..self.lans.len() {
            let up = self.lan_up(&self.lans[index], now);
            let watch = &mut self.lans[index];
            if up != watch.reported_up {
                watch.reported_up = up;
                changes.push(LanChange {
                    name: watch.lan.name.clone(),
                    up,
                });
            }
        }
        changes
    }

    /// The next time at which [`Monitor::peer`] or a LAN's status can change
    /// without a new heartbeat, if any.
    pub fn next_deadline(&self, now: Duration) -> Option<Duration> {
        let mut deadline: Option<Duration> = None;
        let mut consider = |at: Duration| {
            if at > now {
                deadline = Some(deadline.map_or(at, |d| d.min(at)));
            }
        };
        for watch in &self.lans {
            if let Some(seen) = watch.last_seen {
                consider(seen + self.timeout);
            }
        }
        if self.lans.iter().all(|watch| watch.last_seen.is_none()) {
            consider(self.listening_since + self.timeout);
        }
        deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn two_lans(now: Duration) -> Monitor {
        Monitor::new(
            vec![
                Lan {
                    name: "prod".into(),
                    flow: false,
                },
                Lan {
                    name: "repl".into(),
                    flow: true,
                },
            ],
            1000 * MS,
            now,
        )
    }

    #[test]
    fn the_peer_is_unknown_until_heard_or_timeout() {
        let monitor = two_lans(100 * MS);
        assert_eq!(monitor.peer(100 * MS), PeerLink::Unknown);
        assert_eq!(monitor.peer(1099 * MS), PeerLink::Unknown);
        assert_eq!(monitor.next_deadline(100 * MS), Some(1100 * MS));
        assert_eq!(monitor.peer(1100 * MS), PeerLink::Lost);
    }

    #[test]
    fn the_peer_is_lost_exactly_when_every_lan_is_silent_for_timeout() {
        let mut monitor = two_lans(Duration::ZERO);
        assert!(monitor.record("prod", 200 * MS));
        assert!(monitor.record("repl", 500 * MS));
        assert_eq!(monitor.peer(1199 * MS), PeerLink::Alive);
        // prod is silent for a full timeout, repl is not: degraded, not lost.
        assert_eq!(monitor.peer(1200 * MS), PeerLink::Alive);
        let lans = monitor.lans(1200 * MS);
        assert!(!lans[0].up && lans[1].up);
        assert_eq!(monitor.next_deadline(1200 * MS), Some(1500 * MS));
        assert_eq!(monitor.peer(1499 * MS), PeerLink::Alive);
        assert_eq!(monitor.peer(1500 * MS), PeerLink::Lost);
    }

    #[test]
    fn lan_changes_are_reported_once() {
        let mut monitor = two_lans(Duration::ZERO);
        monitor.record("prod", 10 * MS);
        monitor.record("repl", 10 * MS);
        assert_eq!(monitor.changes(10 * MS).len(), 2);
        assert_eq!(monitor.changes(20 * MS), vec![]);
        monitor.record("repl", 900 * MS);
        assert_eq!(
            monitor.changes(1010 * MS),
            vec![LanChange {
                name: "prod".into(),
                up: false
            }]
        );
        assert_eq!(monitor.changes(1020 * MS), vec![]);
    }

    #[test]
    fn an_unknown_lan_is_not_recorded() {
        let mut monitor = two_lans(Duration::ZERO);
        assert!(!monitor.record("elsewhere", 10 * MS));
        assert_eq!(monitor.peer(10 * MS), PeerLink::Unknown);
    }
}
