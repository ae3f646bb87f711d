//! The agent: the tokio shell around `safekit-core`.
//!
//! It turns the world (sockets, timers, scripts, the data path) into events for
//! the core and executes the actions the core returns. The `safekit` command
//! lives here too, because it shares the agent's admin protocol.
#![forbid(unsafe_code)]

pub mod admin_socket;
pub mod arp;
pub mod checkers;
pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod health_http;
pub mod modlog;
pub mod persist;
pub mod remote_admin;
pub mod scripts;
pub mod vip;
