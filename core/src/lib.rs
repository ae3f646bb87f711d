//! The I/O-free core of the cluster.
//!
//! Everything here is plain data in, plain data out: configuration text is
//! parsed from a `&str`, decisions are taken from events and a `now` passed in
//! by the caller. The core never opens a file, a socket or reads a clock, so it
//! has no failure modes of its own and is tested without a machine.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod config;
