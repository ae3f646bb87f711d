//! The `safekit` command line: argument parsing and one module per verb group.
pub mod apply;
pub mod boot;
pub mod config_check;
pub mod control;
pub mod level;
pub mod module;
pub mod remote;
pub mod resource;
pub mod snapshot;
pub mod wait;
