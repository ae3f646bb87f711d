//! Requests of the `safekit` command to the local agent, and the agent's answers.
//!
//! The admin channel is a root-only Unix socket on each node (and, for `-H`,
//! the same messages over an authenticated TCP channel). Messages are
//! `postcard`-encoded and length-prefixed by the transport; this module only
//! defines them, so that the CLI and the daemon cannot disagree.
//!
//! This is an API boundary: new variants may be added at the end, existing
//! ones keep their meaning.

use serde::{Deserialize, Serialize};

/// An operator's verb on one module, with SafeKit's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verb {
    /// Normal start: primary only if up to date, otherwise WAIT for the peer.
    Start,
    /// Stop the application, the VIP and replication; a PRIM's peer fails over.
    Stop,
    /// Stop for when a plain stop has no effect (stop scripts get `force`).
    ForceStop,
    /// Restart the application scripts only; the state is kept.
    Restart,
    /// Stop then start automatically (on PRIM this causes a failover).
    StopStart,
    /// Exchange the PRIM and SECOND roles.
    Swap,
    /// Force a start as primary (ALONE), even when not up to date.
    Prim,
    /// Force a start as secondary; fails if the peer is not primary.
    Second,
    /// Force a start as primary even after an interrupted resynchronization.
    PrimForce,
}

impl Verb {
    /// The verb as the operator types it.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::ForceStop => "forcestop",
            Verb::Restart => "restart",
            Verb::StopStart => "stopstart",
            Verb::Swap => "swap",
            Verb::Prim => "prim",
            Verb::Second => "second",
            Verb::PrimForce => "primforce",
        }
    }
}

/// Who asked for something, for the module log (`Action start called by root`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    /// A local user, by uid and name.
    Local { uid: u32, name: String },
    /// A remote admin request, by peer address.
    Remote { addr: String },
    /// The agent itself (a checker, a rule, maxloop), with an identity.
    Agent { identity: String },
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Run a control verb on a module.
    Control {
        module: String,
        verb: Verb,
        caller: Caller,
    },
    /// The state of one module, or of every module.
    State {
        module: Option<String>,
        verbose: bool,
    },
    /// The last `lines` lines of a module's log (`verbose`: the verbose log).
    Log {
        module: String,
        lines: u32,
        verbose: bool,
    },
    /// A message from a script for the module log (`printe`, `printi`, `printw`).
    Print {
        module: String,
        level: PrintLevel,
        message: String,
    },
    /// The installed modules.
    ModuleList,
    /// Liveness probe.
    Ping,
    /// `safekit boot on|off`: the switch file was just written; the agent
    /// logs who changed it (the file, not this message, is the setting).
    Boot { module: String, on: bool },
    /// `safekit set -r RESOURCE -v up|down [-i identity]`: a custom checker's program reports.
    SetResource {
        module: String,
        resource: String,
        up: bool,
        identity: Option<String>,
    },
    /// `safekit get -r RESOURCE`: the resource's value (`up`, `down`, `init`) in `Ok`'s message.
    GetResource { module: String, resource: String },
    /// `safekit level`: the agent's version, protocol versions and build features.
    Level,
    /// `safekit config -m M`: reload the module's (already validated)
    /// `userconfig.xml`; refused unless the module is STOP.
    ApplyConfig { module: String, caller: Caller },
    /// `safekit cluster config`: reload `SAFEVAR/cluster/cluster.xml` (already
    /// installed) for every module; refused while a module runs.
    ApplyClusterConfig { caller: Caller },
}

/// Levels of `safekit printe|printw|printi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrintLevel {
    /// Error, shown in the main log.
    Error,
    /// Warning, shown in the main log.
    Warning,
    /// Information, verbose log only.
    Info,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResponse {
    /// Done; the text is shown to the operator.
    Ok { message: String },
    /// Refused or failed; the text says why, in one line.
    Refused { reason: String },
    /// Module states.
    States(Vec<ModuleStatus>),
    /// Log lines, oldest first.
    Log(Vec<String>),
    /// Installed module names.
    Modules(Vec<String>),
    /// Answer to [`AdminRequest::Ping`].
    Pong,
}

/// The state of one module on one node, as `safekit state` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Module name.
    pub module: String,
    /// This node's name.
    pub node: String,
    /// STOP, WAIT, ALONE, PRIM, SECOND or UP.
    pub state: String,
    /// Ready, Transient or NotReady.
    pub readiness: String,
    /// Details for `-v`: one `key: value` line each (peer, VIP, resync, last transition, checkers).
    pub details: Vec<(String, String)>,
}

/// `safekit state -m M -lq` exit codes, as SafeKit documents them.
pub fn state_exit_code(state: &str) -> i32 {
    match state {
        "STOP" => 0,
        "WAIT" => 1,
        "ALONE" | "UP" => 2,
        "PRIM" => 3,
        "SECOND" => 4,
        _ => 5,
    }
}

/// Encodes a message for the wire (the transport adds a length prefix).
///
/// # Errors
/// Fails only if the value cannot be serialized (never for these types in practice).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_allocvec(message)
}

/// Decodes a message received from the wire.
///
/// # Errors
/// Returns the decoder's error for truncated or malformed input.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let request = AdminRequest::Control {
            module: "mirror".into(),
            verb: Verb::Prim,
            caller: Caller::Local {
                uid: 0,
                name: "root".into(),
            },
        };
        let bytes = encode(&request).expect("encodes");
        assert_eq!(decode::<AdminRequest>(&bytes).expect("decodes"), request);
    }

    #[test]
    fn truncated_requests_are_errors_not_panics() {
        let bytes = encode(&AdminRequest::Log {
            module: "m".into(),
            lines: 10,
            verbose: true,
        })
        .expect("encodes");
        for len in 0..bytes.len() {
            assert!(
                decode::<AdminRequest>(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
    }

    #[test]
    fn exit_codes_match_safekit() {
        let codes: Vec<i32> = ["STOP", "WAIT", "ALONE", "PRIM", "SECOND", "UP"]
            .iter()
            .map(|s| state_exit_code(s))
            .collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 2]);
    }
}
