//! The portable part of the Windows minifilter.
//!
//! The WDK glue builds only on Windows; what it decides (which paths are
//! replicated, how a pre-write becomes a message to the agent, which ranges
//! changed while the agent was away, what it keeps per file) lives here,
//! `no_std` and allocation-free outside tests, so that it is compiled and
//! tested on Linux and runs unchanged in the kernel.
//!
//! # Why the message layout is included, not depended on
//!
//! The message format is defined once, in `protocol/src/minifilter.rs`, and
//! the agent uses it from `safekit-protocol`. That crate is `std` (serde,
//! postcard, thiserror, hashes), so the kernel build cannot depend on it.
//! Instead this crate compiles the very same source file as its own
//! [`minifilter`] module (`#[path]`): one definition, no copy, and the file is
//! proven `no_std`-clean every time this crate builds. Its tests run in both
//! crates.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod files;
#[path = "../../protocol/src/minifilter.rs"]
pub mod minifilter;
pub mod paths;
pub mod ranges;
