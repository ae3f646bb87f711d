//! `safekit waitstart|waitstop|waitstate`: block until a module reaches a state.
//!
//! SafeKit scripts chain commands with these verbs (`safekit start -m M;
//! safekit waitstart -m M`), so they must behave as SafeKit's: they return
//! once the start or stop has completed or the module is in one of the
//! states asked for. They are client-side loops over the `state` request
//! (one every [`POLL_INTERVAL`]), so they work with `safekit -H` as is.
//!
//! What "reached" means ([`reached`]):
//! - `waitstart`: a stable state other than STOP, i.e. ALONE, PRIM, SECOND or
//!   UP with readiness Ready, or WAIT not Transient (a module blocked in WAIT
//!   has finished starting; it waits for the peer or a resource);
//! - `waitstop`: STOP, not Transient;
//! - `waitstate STATE[,STATE...]`: one of the states, stable: Ready for
//!   ALONE, PRIM, SECOND, UP; not Transient for STOP and WAIT (which are never
//!   Ready).
//!
//! `-t SECONDS` bounds the wait; without it the command waits until the state
//! is reached (no default timeout, as SafeKit's). Exit status: 0 reached (the
//! state is printed in one line); 1 timed out (one line on stderr naming the
//! current state), or the agent cannot be asked at the first request, or
//! refuses (unknown module); 2 bad arguments. After a first good answer, a
//! failed request (agent restarting) is retried until the timeout.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use safekit_protocol::admin::{AdminRequest, AdminResponse, ModuleStatus};

use super::control::request;

/// Time between two `state` requests.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The states `waitstate` accepts.
pub const STATE_NAMES: [&str; 6] = ["STOP", "WAIT", "ALONE", "PRIM", "SECOND", "UP"];

/// `safekit waitstart` and `safekit waitstop`.
#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// The module (default: $SAFEMODULE, set for scripts).
    #[arg(short = 'm', long = "module", env = "SAFEMODULE")]
    pub module: String,
    /// Give up after this many seconds (exit 1) [default: wait until reached].
    #[arg(short = 't', long = "timeout", value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// `safekit waitstate`.
#[derive(Debug, Clone, Args)]
pub struct WaitStateArgs {
    /// The module and the timeout.
    #[command(flatten)]
    pub wait: WaitArgs,
    /// The states to wait for: STOP, WAIT, ALONE, PRIM, SECOND, UP (several separated by commas).
    #[arg(required = true, value_delimiter = ',', value_parser = parse_state, value_name = "STATE")]
    pub states: Vec<String>,
}

/// What the command waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The start completed.
    Start,
    /// The module is stopped.
    Stop,
    /// One of these states (upper case), stable.
    States(Vec<String>),
}

impl Target {
    fn verb(&self) -> &'static str {
        match self {
            Target::Start => "waitstart",
            Target::Stop => "waitstop",
            Target::States(_) => "waitstate",
        }
    }
}

/// Parses one STATE of `waitstate` (any case).
///
/// # Errors
/// The name is not one of [`STATE_NAMES`].
pub fn parse_state(text: &str) -> Result<String, String> {
    let upper = text.trim().to_ascii_uppercase();
    if STATE_NAMES.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(format!(
            "unknown state {text:?} (expected {})",
            STATE_NAMES.join(", ")
        ))
    }
}

/// Whether `state` shown with `readiness` is stable: Ready, or for STOP and
/// WAIT (never Ready) not Transient.
fn stable(state: &str, readiness: &str) -> bool {
    match state {
        "STOP" | "WAIT" => readiness != "Transient",
        _ => readiness == "Ready",
    }
}

/// Whether the module, in `state` with `readiness` (as `safekit state`
/// reports them), has reached `target`.
pub fn reached(target: &Target, state: &str, readiness: &str) -> bool {
    stable(state, readiness)
        && match target {
            Target::Start => state != "STOP",
            Target::Stop => state == "STOP",
            Target::States(states) => states.iter().any(|wanted| wanted == state),
        }
}

/// `safekit waitstart`.
pub fn waitstart(args: &WaitArgs) -> ExitCode {
    wait(args, &Target::Start)
}

/// `safekit waitstop`.
pub fn waitstop(args: &WaitArgs) -> ExitCode {
    wait(args, &Target::Stop)
}

/// `safekit waitstate`.
pub fn waitstate(args: &WaitStateArgs) -> ExitCode {
    wait(&args.wait, &Target::States(args.states.clone()))
}

fn describe(status: &ModuleStatus) -> String {
    format!(
        "{} is {} ({})",
        status.module, status.state, status.readiness
    )
}

fn fetch(module: &str) -> Result<ModuleStatus, String> {
    match request(&AdminRequest::State {
        module: Some(module.to_string()),
        verbose: false,
    }) {
        Ok(AdminResponse::States(states)) => states
            .into_iter()
            .find(|status| status.module == module)
            .ok_or_else(|| format!("the agent does not report module {module}")),
        Ok(AdminResponse::Refused { reason }) => Err(reason),
        Ok(other) => Err(format!("unexpected answer from the agent: {other:?}")),
        Err(error) => Err(error),
    }
}

fn wait(args: &WaitArgs, target: &Target) -> ExitCode {
    let verb = target.verb();
    let deadline = args
        .timeout
        .map(|seconds| Instant::now() + Duration::from_secs(seconds));
    let mut last: Option<Result<ModuleStatus, String>> = None;
    loop {
        match fetch(&args.module) {
            Ok(status) if reached(target, &status.state, &status.readiness) => {
                println!("{}", describe(&status));
                return ExitCode::SUCCESS;
            }
            Ok(status) => last = Some(Ok(status)),
            // The first request tells whether the agent and the module are there.
            Err(error) if last.is_none() => {
                eprintln!("safekit: {verb}: {error}");
                return ExitCode::FAILURE;
            }
            Err(error) => last = Some(Err(error)),
        }
        let pause = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let now = match last {
                        Some(Ok(status)) => describe(&status),
                        Some(Err(error)) => format!("state unknown ({error})"),
                        None => "state unknown".into(),
                    };
                    eprintln!(
                        "safekit: {verb}: timeout after {} s: {now}",
                        args.timeout.unwrap_or_default()
                    );
                    return ExitCode::FAILURE;
                }
                left.min(POLL_INTERVAL)
            }
            None => POLL_INTERVAL,
        };
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        verb: Verb,
    }

    #[derive(Debug, clap::Subcommand)]
    enum Verb {
        Waitstart(WaitArgs),
        Waitstate(WaitStateArgs),
    }

    fn parse(args: &[&str]) -> Result<Verb, clap::Error> {
        Cli::try_parse_from(std::iter::once("safekit").chain(args.iter().copied()))
            .map(|cli| cli.verb)
    }

    #[test]
    fn waitstate_takes_several_states_separated_by_commas_in_any_case() {
        let Ok(Verb::Waitstate(args)) =
            parse(&["waitstate", "-m", "M", "second,Alone", "-t", "60"])
        else {
            panic!("waitstate should parse");
        };
        assert_eq!(args.wait.module, "M");
        assert_eq!(args.wait.timeout, Some(60));
        assert_eq!(args.states, ["SECOND", "ALONE"]);
    }

    #[test]
    fn bad_arguments_are_refused_with_exit_status_2() {
        for bad in [
            &["waitstate", "-m", "M", "PRIMARY"][..],
            &["waitstate", "-m", "M"][..],
            &["waitstart", "-m", "M", "-t", "soon"][..],
            &["waitstart", "-m", "M", "-t", "-1"][..],
        ] {
            let error = parse(bad).expect_err("should be refused");
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn waitstart_has_no_timeout_unless_given() {
        let Ok(Verb::Waitstart(args)) = parse(&["waitstart", "-m", "M"]) else {
            panic!("waitstart should parse");
        };
        assert_eq!(args.timeout, None);
    }

    #[test]
    fn waitstart_returns_on_a_ready_state_or_a_settled_wait() {
        for (state, readiness, expected) in [
            ("STOP", "NotReady", false),
            ("STOP", "Transient", false),
            ("WAIT", "Transient", false),
            ("WAIT", "NotReady", true),
            ("ALONE", "Ready", true),
            ("SECOND", "Transient", false),
            ("SECOND", "Ready", true),
            ("PRIM", "Ready", true),
            ("UP", "Ready", true),
        ] {
            assert_eq!(
                reached(&Target::Start, state, readiness),
                expected,
                "{state} ({readiness})"
            );
        }
    }

    #[test]
    fn waitstop_returns_once_stopped_and_settled() {
        assert!(reached(&Target::Stop, "STOP", "NotReady"));
        assert!(!reached(&Target::Stop, "STOP", "Transient"));
        assert!(!reached(&Target::Stop, "PRIM", "Transient"));
        assert!(!reached(&Target::Stop, "WAIT", "NotReady"));
    }

    #[test]
    fn waitstate_needs_one_of_the_states_and_readiness_ready() {
        let wanted = Target::States(vec!["SECOND".into(), "WAIT".into()]);
        assert!(reached(&wanted, "SECOND", "Ready"));
        assert!(!reached(&wanted, "SECOND", "Transient"));
        assert!(reached(&wanted, "WAIT", "NotReady"));
        assert!(!reached(&wanted, "ALONE", "Ready"));
        assert!(!reached(&wanted, "PRIM", "Ready"));
    }
}
