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
                if verbose {
                    let (_, boot) = registry.boot.decide_off_runtime(&handle.name).await;
                    status.details.push(("usersetting.boot".into(), boot));
                } else {
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
            ask_runner(handle, |reply| RunnerEvent::Control {
                verb,
                caller,
                reply,
            })
            .await
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
        AdminRequest::Boot { module, on } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            let (_, boot) = registry.boot.decide_off_runtime(&module).await;
            let user = caller_name(
                &peer,
                &Caller::Local {
                    uid: peer.uid,
                    name: String::new(),
                },
            );
            handle.modlog.log(
                modlog::Level::User,
                format!(
                    "Boot set {} by {user}: {boot}",
                    if on { "on" } else { "off" }
                ),
            );
            handle.modlog.flush().await;
            AdminResponse::Ok { message: boot }
        }
        AdminRequest::SetResource {
            module,
            resource,
            up,
            identity,
        } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            ask_runner(handle, |reply| RunnerEvent::SetResource {
                resource,
                up,
                identity,
                reply,
            })
            .await
        }
        AdminRequest::GetResource { module, resource } => {
            let Some(handle) = registry.modules.get(&module) else {
                return unknown(registry, &module);
            };
            ask_runner(handle, |reply| RunnerEvent::GetResource { resource, reply }).await
        }
        AdminRequest::Level => AdminResponse::Ok {
            message: crate::cli::level::build_facts()
                .iter()
                .map(|(key, value)| format!("{key}: {value}"))
                .collect::<Vec<_>>()
                .join("\n"),
        },
        AdminRequest::ApplyConfig { module, caller } => {
            apply_config(registry, caller_name(&peer, &caller), &module).await
        }
        AdminRequest::ApplyClusterConfig { caller } => {
            apply_cluster_config(registry, caller_name(&peer, &caller)).await
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

/// `safekit config -m M`: rebuilds the module's setup from its files and
/// hands it to its runner, which applies it only while the module is STOP.
async fn apply_config(registry: &Registry, caller: String, module: &str) -> AdminResponse {
    let Some(handle) = registry.modules.get(module) else {
        return match registry.rejected.get(module) {
            Some(_) => refused(format!(
                "module {module} was not started by the agent (invalid configuration at start): restart the agent (safekitd) to load it"
            )),
            None => unknown(registry, module),
        };
    };
    let Some(context) = &registry.reload else {
        return refused("this agent cannot reload configurations".into());
    };
    let cluster = match context.cluster.lock() {
        Ok(guard) => guard.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    match reload_module_off_runtime(context, module, &cluster).await {
        Ok(setup) => reload_runner(handle, context, setup, caller).await,
        Err(errors) => refused(format!(
            "{} error(s), nothing applied: {}",
            errors.len(),
            errors.join("; ")
        )),
    }
}

/// `safekit cluster config`: reloads the installed cluster.xml for every
/// module; refused while a module runs, and nothing is applied unless every
/// module's configuration is valid with it.
async fn apply_cluster_config(registry: &Registry, caller: String) -> AdminResponse {
    let Some(context) = &registry.reload else {
        return refused("this agent cannot reload configurations".into());
    };
    let running: Vec<String> = registry
        .modules
        .values()
        .filter_map(|handle| {
            let status = handle.status.borrow();
            (status.state != "STOP" || status.readiness == "Transient")
                .then(|| format!("{} ({})", handle.name, status.state))
        })
        .collect();
    if !running.is_empty() {
        return refused(format!(
            "modules still running: {}; stop them first (safekit stop -m M), then run safekit cluster config again",
            running.join(", ")
        ));
    }
    let paths = context.paths.clone();
    let loaded = tokio::task::spawn_blocking(move || super::load::load_cluster(&paths)).await;
    let cluster = match loaded {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(error)) => return refused(error.to_string().replace('\n', "; ")),
        Err(error) => return refused(format!("reading cluster.xml failed: {error}")),
    };
    match super::load::peer_of(&cluster, &context.node) {
        Ok(peer) if peer == context.peer => {}
        Ok(peer) => {
            return refused(format!(
                "the peer of {} would change from {} to {peer}: restart the agent (safekitd) to apply it",
                context.node, context.peer
            ));
        }
        Err(error) => return refused(error.to_string()),
    }
    let mut setups = Vec::new();
    let mut errors = Vec::new();
    for name in registry.modules.keys() {
        match reload_module_off_runtime(context, name, &cluster).await {
            Ok(setup) => setups.push(setup),
            Err(problems) => errors.push(format!("module {name}: {}", problems.join("; "))),
        }
    }
    if !errors.is_empty() {
        return refused(format!(
            "with this cluster.xml, nothing applied: {}",
            errors.join("; ")
        ));
    }
    // Every runner is asked first (STOP, nothing that needs an agent restart):
    // one refusal and none is changed.
    for setup in &setups {
        let Some(handle) = registry.modules.get(&setup.name) else {
            continue;
        };
        if setup.config.service.rfs.is_some() && !cfg!(feature = "linux-datapath") {
            errors.push(format!(
                "module {}: <rfs> needs the data path: this agent was built without the `linux-datapath` feature",
                setup.name
            ));
            continue;
        }
        let check = ask_runner(handle, |reply| RunnerEvent::CheckReload {
            setup: Box::new(setup.clone()),
            reply,
        })
        .await;
        match check {
            AdminResponse::Ok { .. } => {}
            AdminResponse::Refused { reason } => {
                errors.push(format!("module {}: {reason}", setup.name));
            }
            other => errors.push(format!(
                "module {}: unexpected answer {other:?}",
                setup.name
            )),
        }
    }
    if !errors.is_empty() {
        return refused(format!(
            "with this cluster.xml, nothing applied: {}",
            errors.join("; ")
        ));
    }
    let mut results = Vec::new();
    let mut failed = false;
    for setup in setups {
        let name = setup.name.clone();
        let Some(handle) = registry.modules.get(&name) else {
            continue;
        };
        match reload_runner(handle, context, setup, caller.clone()).await {
            AdminResponse::Ok { .. } => results.push(format!("{name}: applied")),
            AdminResponse::Refused { reason } => {
                failed = true;
                results.push(format!("{name}: not applied: {reason}"));
            }
            other => {
                failed = true;
                results.push(format!("{name}: unexpected answer {other:?}"));
            }
        }
    }
    // The cluster.xml in force changes only when every module took it.
    if !failed {
        match context.cluster.lock() {
            Ok(mut guard) => *guard = cluster,
            Err(poisoned) => *poisoned.into_inner() = cluster,
        }
    }
    let message = if results.is_empty() {
        "cluster configuration reloaded (no module)".to_string()
    } else {
        format!("cluster configuration reloaded: {}", results.join("; "))
    };
    if failed {
        // Only a module's config hook can fail here (every runner accepted the check above).
        refused(format!(
            "cluster configuration not applied to every module: {}; the agent keeps its previous cluster.xml: fix the cause and run safekit cluster config again",
            results.join("; ")
        ))
    } else {
        AdminResponse::Ok { message }
    }
}

/// [`super::load::reload_module`] on a blocking thread (it reads the module's files).
async fn reload_module_off_runtime(
    context: &std::sync::Arc<super::load::ReloadContext>,
    module: &str,
    cluster: &safekit_core::config::ClusterConfig,
) -> Result<super::load::ModuleSetup, Vec<String>> {
    let context = std::sync::Arc::clone(context);
    let module = module.to_string();
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || {
        super::load::reload_module(
            &context.paths,
            &module,
            &cluster,
            &context.node,
            &context.peer,
        )
    })
    .await
    .unwrap_or_else(|error| Err(vec![format!("reading the configuration failed: {error}")]))
}

/// Sends `setup` (with a fresh data path and script environment) to the module's runner.
async fn reload_runner(
    handle: &super::runner::ModuleHandle,
    context: &super::load::ReloadContext,
    setup: super::load::ModuleSetup,
    caller: String,
) -> AdminResponse {
    let module = setup.name.clone();
    if setup.config.service.rfs.is_some() && !cfg!(feature = "linux-datapath") {
        return refused(
            "<rfs> needs the data path: this agent was built without the `linux-datapath` feature"
                .into(),
        );
    }
    let script_env = super::load::script_env(&context.paths, &setup);
    let (datapath_tx, mut datapath_rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = handle.events.clone();
    tokio::spawn(async move {
        while let Some(report) = datapath_rx.recv().await {
            if forward.send(RunnerEvent::DataPath(report)).is_err() {
                return;
            }
        }
    });
    let datapath = super::data_path(
        &setup,
        &context.secret,
        &context.paths.module_var(&module),
        datapath_tx,
    );
    ask_runner(handle, |reply| RunnerEvent::Reload {
        setup: Box::new(setup),
        script_env,
        datapath,
        caller,
        reply,
    })
    .await
}

/// Sends `handle`'s runner the event `make` builds around a reply channel and
/// waits for its answer; a runner that has stopped is said in one line.
pub async fn ask_runner(
    handle: &super::runner::ModuleHandle,
    make: impl FnOnce(oneshot::Sender<AdminResponse>) -> RunnerEvent,
) -> AdminResponse {
    let (reply, answer) = oneshot::channel();
    if handle.events.send(make(reply)).is_err() {
        return refused(format!("module {}: its runner has stopped", handle.name));
    }
    answer
        .await
        .unwrap_or_else(|_| refused(format!("module {}: no answer from its runner", handle.name)))
}
