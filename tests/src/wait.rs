//! Bounded waiting: every wait in a test has a deadline and a bounded number of polls.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::{HarnessError, Result};

/// The time [`crate::Node::run`] gives a command before killing it.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `condition` every `interval` until it returns true, at most
/// `timeout / interval + 1` times.
///
/// Returns [`HarnessError::Timeout`] naming `what` if the condition never held.
///
/// ```no_run
/// # use std::time::Duration;
/// # let cluster: safekit_tests::Cluster = todo!();
/// safekit_tests::wait_until("node1 reaches node2", Duration::from_secs(10), Duration::from_millis(100), || {
///     cluster.node(1).run(format!("ping -c1 -W1 {}", cluster.node(2).addr(0))).is_ok_and(|o| o.success())
/// })
/// .expect("link restored");
/// ```
pub fn wait_until(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    let interval = interval.max(Duration::from_millis(1));
    let max_polls = timeout.as_millis() / interval.as_millis() + 1;
    let deadline = Instant::now() + timeout;
    for poll in 0..max_polls {
        if condition() {
            return Ok(());
        }
        if poll + 1 == max_polls || Instant::now() >= deadline {
            break;
        }
        thread::sleep(interval);
    }
    // One last look: the condition may have become true during the last sleep.
    if condition() {
        return Ok(());
    }
    Err(HarnessError::Timeout {
        what: what.to_owned(),
        after: timeout,
    })
}

/// Runs `work` on its own thread and returns its result if it finishes within
/// `timeout`.
///
/// On timeout the thread is left running (Rust cannot kill a thread) and
/// [`HarnessError::Timeout`] naming `what` is returned; a panic in `work` is
/// propagated to the caller.
pub fn with_timeout<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (sender, receiver) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(format!("with_timeout: {what}"))
        .spawn(move || {
            // The receiver is gone only if we already timed out; nobody wants the result then.
            let _ = sender.send(work());
        })
        .map_err(|source| HarnessError::io("start a worker thread", source))?;
    match receiver.recv_timeout(timeout) {
        Ok(value) => Ok(value),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(HarnessError::Timeout {
            what: what.to_owned(),
            after: timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => Err(HarnessError::Setup(format!(
                "{what}: worker ended without a result"
            ))),
        },
    }
}
