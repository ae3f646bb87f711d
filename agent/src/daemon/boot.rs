//! Start at boot: what the agent does with each module's boot setting when it starts.
//!
//! The rule, the same whatever started the agent (machine boot, `systemctl
//! start`, systemd restarting it after a crash, an operator starting it again
//! after `kill -9`), is written in [`crate::cli::boot`]: every module begins
//! in STOP, and each module whose boot is on is sent `start` by the caller
//! `boot` (module log: `Action start called by boot`) once its
//! `<service boot_delay>` has passed. `start` never resumes a persisted role
//! directly; the machine goes through WAIT and the generation histories
//! decide, as for an operator's start.
//!
//! The setting is read from disk when the agent starts and, for `safekit
//! state -v`, each time it is shown (`usersetting.boot`), so a change made
//! while the agent was down, or while it runs, is always what is displayed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use safekit_core::config::Boot;
use safekit_protocol::admin::{AdminResponse, Verb};
use tokio::sync::oneshot;

use super::runner::{Registry, RunnerEvent};
use crate::cli::boot::{effective, read_switch};
use crate::modlog;

/// The caller named in the module log for starts at boot.
pub const BOOT_CALLER: &str = "boot";

/// Each module's boot inputs: its `<service boot>`, `boot_delay`, and where its switch lives.
#[derive(Debug, Default, Clone)]
pub struct BootSettings {
    /// `SAFEVAR`.
    var: PathBuf,
    /// `<service boot>` and `<service boot_delay>` per running module.
    configured: BTreeMap<String, (Boot, Duration)>,
}

impl BootSettings {
    /// Settings read from `SAFEVAR` for the given modules.
    pub fn new(var: PathBuf) -> BootSettings {
        BootSettings {
            var,
            configured: BTreeMap::new(),
        }
    }

    /// Records a module's configuration.
    pub fn add(&mut self, module: &str, boot: Boot, boot_delay: Duration) {
        self.configured
            .insert(module.to_string(), (boot, boot_delay));
    }

    /// Whether the agent starts `module` when it starts, and the value shown
    /// as `usersetting.boot` (`on`, `off`, with the reason when not the switch alone).
    pub fn decide(&self, module: &str) -> (bool, String) {
        let boot = self
            .configured
            .get(module)
            .map_or(Boot::Ignore, |(boot, _)| *boot);
        match read_switch(&self.var, module) {
            Ok(switch) => effective(boot, switch),
            // An unreadable switch is off: never start an application on a guess.
            Err(error) => (false, format!("off ({error})")),
        }
    }

    /// [`Self::decide`] on a blocking thread (it reads the switch file), for the admin handlers.
    pub async fn decide_off_runtime(&self, module: &str) -> (bool, String) {
        let settings = self.clone();
        let module = module.to_string();
        tokio::task::spawn_blocking(move || settings.decide(&module))
            .await
            .unwrap_or_else(|error| (false, format!("off ({error})")))
    }
}

/// Sends `start` (caller `boot`) to every module whose boot is on, each after
/// its `boot_delay`; the others are left in STOP. Logs the decision of each
/// module in its module log. Returns at once; the starts run as tasks.
pub fn start_modules(registry: &Registry) {
    for (name, handle) in &registry.modules {
        let (on, description) = registry.boot.decide(name);
        tracing::info!(module = %name, boot = %description, "start at boot");
        if !on {
            handle.modlog.log(
                modlog::Level::Info,
                format!("Boot: {description}, module left in STOP"),
            );
            continue;
        }
        let delay = registry
            .boot
            .configured
            .get(name)
            .map_or(Duration::ZERO, |(_, delay)| *delay);
        let events = handle.events.clone();
        let modlog = handle.modlog.clone();
        let name = name.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                modlog.log(
                    modlog::Level::Event,
                    format!("Boot: start in {} s (boot_delay)", delay.as_secs()),
                );
                tokio::time::sleep(delay).await;
            }
            let (reply, answer) = oneshot::channel();
            if events
                .send(RunnerEvent::Control {
                    verb: Verb::Start,
                    caller: BOOT_CALLER.to_string(),
                    reply,
                })
                .is_err()
            {
                tracing::error!(module = %name, "start at boot: the module's runner has stopped");
                return;
            }
            match answer.await {
                Ok(AdminResponse::Refused { reason }) => {
                    tracing::warn!(module = %name, %reason, "start at boot refused");
                }
                Ok(_) => tracing::info!(module = %name, "started at boot"),
                Err(_) => {
                    tracing::error!(module = %name, "start at boot: no answer from the runner")
                }
            }
        });
    }
}
