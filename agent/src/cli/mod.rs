//! The `safekit` command line: argument parsing and one module per verb group.
pub mod config_check;
pub mod control;
pub mod module;
pub mod snapshot;
