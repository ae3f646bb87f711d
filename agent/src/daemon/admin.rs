//! Answers the `safekit` command's requests arriving on the admin socket.
//!
//! It decides nothing: control verbs go to the module's runner (which answers
//! once the machine has accepted or refused them), state comes from the
//! status each runner publishes, logs are read from the module log files.
//! The caller's identity logged with a verb comes from the socket's peer
//! credentials (the kernel's word), never from the request alone.

use safekit_protocol::admin::{AdminRequest, AdminResponse, Caller, PrintLevel};
use tokio::sync::oneshot;

use super::runner::{Registry, RunnerEvent};
use crate::admin_socket::PeerCredentials;
use crate::modlog;

/// Largest `-s` accepted by `safekit log`.
pub const MAX_LOG_LINES: u32 = 100_000;

/// Answers one request from `peer`.
pub async fn handle(
    registry: &Registry,
    peer: PeerCredentials,
    request: AdminRequest,
) -> AdminResponse {
    match request {
        AdminRequest::Ping => AdminResponse::Pong,
        AdminRequest::ModuleList => {
            let mut names: Vec<String> = registry.modules.keys().cloned().collect();
            names.extend(
                registry
                    .rejected
                    .keys()
                    .map(|name| format!("{name} (not started: invalid configuration)")),
            );
            AdminResponse::Modules(names)
        }
        AdminRequest::State { module, verbose } => {
            let mut states = Vec::new();
            for handle in registry.modules.values() {
                if module.as_ref().is_some_and(|wanted| *wanted != handle.name) {
                    continue;
                }
                let mut status = handle.status.borrow().clone();
                if !verbose {
                    status.details.clear();
                }
                states.push(status);
            }
            if let Some(wanted) = &module
                && states.is_empty()
            {
                return unknown(registry, wanted);
            }
            AdminResponse::States(states)
        }
        AdminRequest::Control {
            module,
            verb,
            caller,
        } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            let caller = caller_name(&peer, &caller);
            let (reply, answer) = oneshot::channel();
            if handle
                .events
                .send(RunnerEvent::Control {
                    verb,
                    caller,
                    reply,
                })
                .is_err()
            {
                return refused(format!("module {module}: its runner has stopped"));
            }
            answer
                .await
                .unwrap_or_else(|_| refused(format!("module {module}: no answer from its runner")))
        }
        AdminRequest::Log {
            module,
            lines,
            verbose,
        } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            let lines = usize::try_from(lines.min(MAX_LOG_LINES)).unwrap_or(usize::MAX);
            match handle.modlog.tail(lines, verbose).await {
                Ok(lines) => AdminResponse::Log(lines),
                Err(error) => refused(error.to_string()),
            }
        }
        AdminRequest::Print {
            module,
            level,
            message,
        } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            let level = match level {
                PrintLevel::Error => modlog::Level::Critical,
                PrintLevel::Warning => modlog::Level::Event,
                PrintLevel::Info => modlog::Level::Info,
            };
            handle.modlog.log(level, message);
            handle.modlog.flush().await;
            AdminResponse::Ok {
                message: String::new(),
            }
        }
    }
}

fn refused(reason: String) -> AdminResponse {
    AdminResponse::Refused { reason }
}

fn unknown(registry: &Registry, module: &str) -> AdminResponse {
    if let Some(errors) = registry.rejected.get(module) {
        return refused(format!(
            "module {module} is not running: invalid configuration ({})",
            errors.first().map_or("see the agent log", String::as_str)
        ));
    }
    let known: Vec<&str> = registry.modules.keys().map(String::as_str).collect();
    refused(format!(
        "unknown module {module} on node {} (modules: {})",
        registry.node,
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// The name shown in `Action <verb> called by <who>`: the local user from the
/// socket's credentials; an identity given with `-i` is shown beside it.
fn caller_name(peer: &PeerCredentials, claimed: &Caller) -> String {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(peer.uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {}", peer.uid), |user| user.name);
    match claimed {
        Caller::Agent { identity } => format!("{identity} ({user})"),
        Caller::Local { .. } | Caller::Remote { .. } => user,
    }
}
