//! Wire formats shared by the agent, the Linux data path and the Windows driver.
//!
//! This crate encodes and decodes bytes and does nothing else: no sockets, no
//! files, no clock, no tokio. Every decoder takes untrusted input and returns a
//! typed error instead of panicking; each one has a fuzz target under `fuzz/`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_remote;
pub mod auth;
pub mod frame;
pub mod heartbeat;
pub mod minifilter;
pub mod replication;
pub mod resync;
