//! The Linux data path of a replicated directory.
//!
//! A FUSE file system is mounted over the replicated directory itself and works
//! beneath it through a descriptor opened before the mount. Every change to the
//! tree becomes one operation of an ordered replication stream that the peer
//! applies and acknowledges before the application's call returns.

pub mod activity;
pub mod apply;
pub mod control;
pub mod dirty;
pub mod fs;
pub mod guard;
pub mod mount;
pub mod replicator;
pub mod resync;
pub mod sys;
pub mod transport;
