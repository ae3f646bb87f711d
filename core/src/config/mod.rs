//! SafeKit-compatible module configuration: `userconfig.xml` and `cluster.xml`.
//!
//! - [`parse_userconfig`] and [`parse_cluster`] read a file's text (the caller
//!   does the I/O) into a typed model whose field names are the XML names, or
//!   return [`ConfigErrors`] listing every problem with file, line, column,
//!   element and attribute.
//! - [`validate`] then checks the whole configuration (with cluster.xml and the
//!   module's `bin/` listing when the caller has them); nothing may be applied
//!   while it reports an error.
//! - [`UserConfig::to_xml`] and [`ClusterConfig::to_xml`] write the models back;
//!   parse, write, parse gives an equal model.
//! - [`ModulePorts`] derives a module's ports from its id as SafeKit does.
//!
//! Differences from SafeKit, on purpose:
//! - Extensions, both on `<rfs>`: `replication_timeout` (default 2 s; a bare
//!   number is in ms): how long the primary waits for a silent peer before it
//!   continues alone, recording what changed; it should stay well below the
//!   heartbeat timeout (validation warns otherwise). `sync_mode="write|fsync"`
//!   (default `write`): `write` makes every write wait for the peer (the
//!   durability contract); `fsync` makes only fsync/O_SYNC writes wait.
//!   `guard="record|deny|off"` (default `record`): on the primary, writes
//!   that bypass the replication are recorded and healed (`deny` also refuses
//!   other processes the opening of the files beneath the mount); on the
//!   secondary, the replica is read-only for applications; `off`: no guard.
//! - Macros (`<macro name value/>` under `<safe>`) are expanded when parsing;
//!   the model keeps the definitions and the expanded values. Environment
//!   variables (`%SAFE%`...) are left as written: this crate does no I/O.
//! - Booleans accept `on|off`, `yes|no` and `true|false`; the writer uses
//!   SafeKit's word for each attribute.
//! - Interface `virtual_addr addr` may be a host name (SafeKit resolves it at
//!   start); validation only warns about a non-IP address, so the samples'
//!   `VIRTUAL_TO_BE_DEFINED` placeholder passes with a warning.

mod cluster;
mod diagnostics;
mod duration;
mod read;
mod userconfig;
mod userconfig_parse;
mod validate;
mod writer;
mod xml;

pub use cluster::{ClusterConfig, Lan, Lans, Node, parse_cluster};
pub use diagnostics::{ConfigErrors, Diagnostic, Origin, Severity};
pub use duration::{DurationError, TimeUnit, format_duration, parse_duration};
pub use read::expand_macros;
pub use userconfig::{
    AsyncMode, Boot, Check, Checker, CheckerAction, CheckerKind, CheckerTo, DefaultPrim, Errd,
    Failover, Farm, FarmLan, Filter, Flow, Group, Heart, Heartbeat, Host, Interface, LbRule,
    Loadbalancing, Logging, Macro, Mode, NotReplicated, NotReplicatedPattern, Proc, ProcAction,
    Proto, RealInterface, Replicated, ReplicatedMode, Rfs, RfsGuard, Service, SyncMode, ToCheck,
    User, UserConfig, Var, Vhost, VhostWhen, Vip, VirtualAddr, VirtualHostName, VirtualInterface,
    VmacType, When, Where,
};
pub use userconfig_parse::parse_userconfig;
pub use validate::{Platform, ValidationContext, validate, validate_cluster};
pub use xml::root_element_name;

/// A module id as `safekit module install -M id` assigns it: 1 or more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleId(u16);

impl ModuleId {
    /// The largest id whose derived ports all fit in 16 bits
    /// (replication: 5600 + 4 × (id − 1) ≤ 65535).
    pub const MAX: u16 = 14_984;

    /// `None` unless `1 <= id <= ModuleId::MAX`.
    pub fn new(id: u16) -> Option<ModuleId> {
        (1..=Self::MAX).contains(&id).then_some(ModuleId(id))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// The ports a module uses, derived from its id as SafeKit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModulePorts {
    /// UDP heartbeat (mirror): 8888 + (id − 1), or `<heart port>`.
    pub heartbeat: u16,
    /// TCP replication and resync (mirror): 5600 + 4 × (id − 1).
    pub replication: u16,
    /// UDP farm membership: 4803 + 3 × (id − 1), or `<farm port>`.
    pub farm: u16,
}

impl ModulePorts {
    /// The default ports of module `id`.
    pub fn for_module(id: ModuleId) -> ModulePorts {
        let offset = id.0 - 1;
        // ModuleId::MAX keeps every sum below 65536.
        ModulePorts {
            heartbeat: 8888 + offset,
            replication: 5600 + 4 * offset,
            farm: 4803 + 3 * offset,
        }
    }
}

impl UserConfig {
    /// The module's ports for module `id`, with the overrides of `<heart port>`
    /// and `<farm port>` applied.
    pub fn ports(&self, id: ModuleId) -> ModulePorts {
        let mut ports = ModulePorts::for_module(id);
        if let Some(port) = self.service.heart.as_ref().and_then(|heart| heart.port) {
            ports.heartbeat = port;
        }
        if let Some(port) = self.service.farm.as_ref().and_then(|farm| farm.port) {
            ports.farm = port;
        }
        ports
    }
}

#[cfg(test)]
mod tests;
