//! The portable part of the Windows minifilter.
//!
//! The WDK glue builds only on Windows; what it decides (which paths are
//! replicated, how a pre-write becomes a message to the agent) lives here,
//! `no_std` outside tests, so that it is compiled and tested on Linux.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
