//! The `userconfig.xml` model of an application module (parsed by `userconfig_parse`).
//!
//! Field names are the XML names (Rust keywords as raw identifiers:
//! `r#where`, `r#type`, `r#async`). Absent attributes take SafeKit's defaults
//! at parse time, so the model always holds the effective values; durations
//! are [`Duration`]s read in each attribute's historical unit (see
//! [`super::duration`]). Parsing checks the file's shape and types; rules that
//! relate several values or files live in [`super::validate`].

use std::time::Duration;

use super::diagnostics::Origin;

/// A whole `userconfig.xml`: `<safe>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct UserConfig {
    pub origin: Origin,
    /// `<macro name value/>`; their values are already expanded in the model.
    pub r#macro: Vec<Macro>,
    pub service: Service,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Macro {
    pub origin: Origin,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Mirror,
    Farm,
    Light,
}

impl Mode {
    pub const CHOICES: [(&'static str, Mode); 3] = [
        ("mirror", Mode::Mirror),
        ("farm", Mode::Farm),
        ("light", Mode::Light),
    ];
}

/// `defaultprim`: who stays primary when both nodes run.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum DefaultPrim {
    /// The node that ran alone stays primary (SafeKit's default).
    #[default]
    Alone,
    /// The node that was primary before its last stop becomes primary again.
    Lastprim,
    /// This node (a cluster.xml name) becomes primary after its reintegration.
    Node(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Boot {
    On,
    Off,
    Auto,
    /// Follow `safekit boot on|off` (SafeKit's default).
    #[default]
    Ignore,
}

impl Boot {
    pub const CHOICES: [(&'static str, Boot); 4] = [
        ("on", Boot::On),
        ("off", Boot::Off),
        ("auto", Boot::Auto),
        ("ignore", Boot::Ignore),
    ];
}

/// `<service>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub origin: Origin,
    pub mode: Mode,
    pub defaultprim: DefaultPrim,
    /// Restarts, stopstarts and waits allowed within `loop_interval`.
    pub maxloop: u32,
    /// Historical unit: hours; 0 means no limit.
    pub loop_interval: Duration,
    /// The `failover="on|off"` attribute (the `<failover>` element is `failover_rules`).
    pub failover: bool,
    pub boot: Boot,
    /// Historical unit: seconds.
    pub boot_delay: Duration,
    pub automatic_reboot: bool,
    pub heart: Option<Heart>,
    pub farm: Option<Farm>,
    pub vip: Option<Vip>,
    pub errd: Option<Errd>,
    pub rfs: Option<Rfs>,
    pub user: Option<User>,
    pub vhost: Option<Vhost>,
    pub check: Option<Check>,
    /// The `<failover>` element (rules).
    pub failover_rules: Option<Failover>,
}

impl Default for Service {
    fn default() -> Self {
        Service {
            origin: Origin::default(),
            mode: Mode::Mirror,
            defaultprim: DefaultPrim::Alone,
            maxloop: 3,
            loop_interval: Duration::from_secs(24 * 3600),
            failover: true,
            boot: Boot::Ignore,
            boot_delay: Duration::ZERO,
            automatic_reboot: false,
            heart: None,
            farm: None,
            vip: None,
            errd: None,
            rfs: None,
            user: None,
            vhost: None,
            check: None,
            failover_rules: None,
        }
    }
}

/// `<heart>`: the mirror heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heart {
    pub origin: Origin,
    /// Historical unit: milliseconds; default 700 ms.
    pub pulse: Duration,
    /// Historical unit: milliseconds; default 30000 ms.
    pub timeout: Duration,
    /// Overrides the port derived from the module id (8888 + id - 1).
    pub port: Option<u16>,
    pub permanent_arp: bool,
    pub heartbeat: Vec<Heartbeat>,
}

impl Service {
    /// The `<interface>` elements of `<vip>`.
    pub fn vip_interfaces(&self) -> impl Iterator<Item = &Interface> {
        self.vip.iter().flat_map(|vip| vip.interface_list.iter())
    }

    /// Every `<virtual_addr>` of the module: those of `<real_interface>` and
    /// of `<virtual_interface>`, in document order per interface.
    pub fn virtual_addrs(&self) -> impl Iterator<Item = &VirtualAddr> {
        self.vip_interfaces().flat_map(Interface::virtual_addrs)
    }
}

impl Default for Heart {
    fn default() -> Self {
        Heart {
            origin: Origin::default(),
            pulse: Duration::from_millis(700),
            timeout: Duration::from_millis(30_000),
            port: None,
            permanent_arp: false,
            heartbeat: Vec::new(),
        }
    }
}

/// `<heartbeat name ident pulse timeout/>`: one heartbeat per LAN.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Heartbeat {
    pub origin: Origin,
    /// A `<lan>` of cluster.xml.
    pub name: String,
    /// Labels resource `heartbeat.<ident>`; `flow` also carries replication.
    pub ident: Option<String>,
    pub pulse: Option<Duration>,
    pub timeout: Option<Duration>,
}

impl Heartbeat {
    /// The resource id: `ident`, or the LAN name when there is none.
    pub fn resource_ident(&self) -> &str {
        self.ident.as_deref().unwrap_or(&self.name)
    }
}

/// `<farm>`: the farm membership protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Farm {
    pub origin: Origin,
    /// Overrides the port derived from the module id (4803 + 3 × (id - 1)).
    pub port: Option<u16>,
    /// Historical unit: milliseconds; default 100 ms.
    pub pulse: Duration,
    pub mlost_count: u32,
    pub slost_count: u32,
    pub lan: Vec<FarmLan>,
}

impl Default for Farm {
    fn default() -> Self {
        Farm {
            origin: Origin::default(),
            port: None,
            pulse: Duration::from_millis(100),
            mlost_count: 20,
            slost_count: 10,
            lan: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FarmLan {
    pub origin: Origin,
    pub name: String,
}

/// `<vip>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Vip {
    pub origin: Origin,
    pub tcpreset: bool,
    /// The `<interface>` elements of `<interface_list>`.
    pub interface_list: Vec<Interface>,
    /// Farm load balancing: which node serves which share of the traffic.
    pub loadbalancing: Option<Loadbalancing>,
}

/// `<loadbalancing>`: the farm's load-balancing groups.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Loadbalancing {
    pub origin: Origin,
    pub group: Vec<Group>,
}

/// `<group name>`: node weights and the traffic they share.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Group {
    pub origin: Origin,
    pub name: String,
    /// `<cluster><host name power/></cluster>`; `None`: an even split.
    pub cluster: Option<Vec<Host>>,
    pub rule: Vec<LbRule>,
}

/// `<host name power/>`: a cluster.xml node and its number of buckets (0: no traffic).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Host {
    pub origin: Origin,
    pub name: String,
    pub power: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
    Arp,
}

impl Proto {
    pub const CHOICES: [(&'static str, Proto); 3] = [
        ("tcp", Proto::Tcp),
        ("udp", Proto::Udp),
        ("arp", Proto::Arp),
    ];
}

/// Which client field is hashed into the 256 buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Filter {
    /// Client IP: session affinity.
    #[default]
    OnAddr,
    /// Client port: stateless spread.
    OnPort,
    /// IP id (UDP, IPv4 only).
    OnIpid,
}

impl Filter {
    pub const CHOICES: [(&'static str, Filter); 3] = [
        ("on_addr", Filter::OnAddr),
        ("on_port", Filter::OnPort),
        ("on_ipid", Filter::OnIpid),
    ];
}

/// `<rule virtual_addr port proto filter/>`: traffic balanced by a group.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LbRule {
    pub origin: Origin,
    /// `*` (every virtual address) when absent.
    pub virtual_addr: Option<String>,
    /// A port number, or `*` (every port) when absent.
    pub port: Option<u16>,
    pub proto: Proto,
    pub filter: Filter,
}

/// `<interface>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub origin: Origin,
    pub check: bool,
    pub arpreroute: bool,
    /// Historical unit: seconds; default 60 s.
    pub arpinterval: Duration,
    /// Historical unit: seconds; default 1200 s.
    pub arpelapse: Duration,
    pub name: Option<String>,
    pub real_interface: Option<RealInterface>,
    pub virtual_interface: Option<VirtualInterface>,
}

impl Interface {
    /// The addresses of `<real_interface>`: the aliases a mirror sets on its
    /// primary's real interface.
    pub fn real_virtual_addrs(&self) -> impl Iterator<Item = &VirtualAddr> {
        self.real_interface
            .iter()
            .flat_map(|real| real.virtual_addr.iter())
    }

    /// The addresses of `<real_interface>` then of `<virtual_interface>`.
    pub fn virtual_addrs(&self) -> impl Iterator<Item = &VirtualAddr> {
        self.real_virtual_addrs().chain(
            self.virtual_interface
                .iter()
                .flat_map(|virt| virt.virtual_addr.iter()),
        )
    }
}

impl Default for Interface {
    fn default() -> Self {
        Interface {
            origin: Origin::default(),
            check: false,
            arpreroute: false,
            arpinterval: Duration::from_secs(60),
            arpelapse: Duration::from_secs(1200),
            name: None,
            real_interface: None,
            virtual_interface: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RealInterface {
    pub origin: Origin,
    pub virtual_addr: Vec<VirtualAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VmacType {
    #[default]
    VmacInvisible,
    VmacDirected,
}

impl VmacType {
    pub const CHOICES: [(&'static str, VmacType); 2] = [
        ("vmac_invisible", VmacType::VmacInvisible),
        ("vmac_directed", VmacType::VmacDirected),
    ];
}

/// `<virtual_interface type [addr]>` (farm, or mirror with a virtual MAC).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VirtualInterface {
    pub origin: Origin,
    pub r#type: VmacType,
    pub addr: Option<String>,
    pub virtual_addr: Vec<VirtualAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Where {
    #[default]
    OneSideAlias,
    Alias,
}

impl Where {
    pub const CHOICES: [(&'static str, Where); 2] = [
        ("one_side_alias", Where::OneSideAlias),
        ("alias", Where::Alias),
    ];
}

/// `<virtual_addr addr where check connections netmask/>`.
///
/// `addr` is an IP address or a host name (SafeKit accepts both; a name is
/// resolved when the module starts), so the samples' placeholder
/// `VIRTUAL_TO_BE_DEFINED` parses; validation warns about it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VirtualAddr {
    pub origin: Origin,
    pub addr: String,
    pub r#where: Where,
    pub check: bool,
    pub connections: bool,
    /// A dotted mask (`255.255.255.0`) or a prefix length (`24`).
    pub netmask: Option<String>,
}

/// `<errd>`: process monitoring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Errd {
    pub origin: Origin,
    /// Historical unit: seconds; default 30 s.
    pub polltimer: Duration,
    pub proc: Vec<Proc>,
}

impl Default for Errd {
    fn default() -> Self {
        Errd {
            origin: Origin::default(),
            polltimer: Duration::from_secs(30),
            proc: Vec::new(),
        }
    }
}

/// What errd does when a process count leaves its bounds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum ProcAction {
    #[default]
    Stopstart,
    Restart,
    Stop,
    Noaction,
    /// A handler executable; exit 0 means handled.
    Handler(String),
}

/// `<proc name atleast atmax action class start_after nameregex argregex service/>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub origin: Origin,
    pub name: String,
    pub atleast: u32,
    /// -1: no upper bound.
    pub atmax: i32,
    pub action: ProcAction,
    /// `prim`, `both`, `pre`, `second`, `sec` or a custom class; `None`: the mode's default.
    pub class: Option<String>,
    pub start_after: Option<u32>,
    pub nameregex: Option<String>,
    pub argregex: Option<String>,
    /// `name` is a service (Windows service or systemd unit).
    pub service: bool,
    pub restart_services: Option<String>,
}

impl Default for Proc {
    fn default() -> Self {
        Proc {
            origin: Origin::default(),
            name: String::new(),
            atleast: 1,
            atmax: -1,
            action: ProcAction::Stopstart,
            class: None,
            start_after: None,
            nameregex: None,
            argregex: None,
            service: false,
            restart_services: None,
        }
    }
}

/// `async`: when the secondary acknowledges a replicated write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AsyncMode {
    /// On receipt, before its disk write (SafeKit's default).
    #[default]
    Second,
    /// After its disk write.
    None,
}

impl AsyncMode {
    pub const CHOICES: [(&'static str, AsyncMode); 2] =
        [("second", AsyncMode::Second), ("none", AsyncMode::None)];
}

/// Extension `sync_mode`: which operations wait for the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Every write waits for the peer's acknowledgement (the durability contract).
    #[default]
    Write,
    /// Only fsync/O_SYNC writes wait; faster, and weaker: a write that
    /// returned may be missing on the peer until the next fsync.
    Fsync,
}

impl SyncMode {
    pub const CHOICES: [(&'static str, SyncMode); 2] =
        [("write", SyncMode::Write), ("fsync", SyncMode::Fsync)];
}

/// Extension `guard`: what keeps the replicated directories from changing
/// behind the replication's back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RfsGuard {
    /// Primary: writes that bypass the replication are recorded and healed on
    /// the peer; secondary: the replica is read-only for applications.
    #[default]
    Record,
    /// Like `record`, and on the primary processes other than the agent are
    /// refused the opening of replicated files beneath the mount.
    Deny,
    /// No guard.
    Off,
}

impl RfsGuard {
    pub const CHOICES: [(&'static str, RfsGuard); 3] = [
        ("record", RfsGuard::Record),
        ("deny", RfsGuard::Deny),
        ("off", RfsGuard::Off),
    ];
}

/// `<rfs>`: file replication.
///
/// Extensions (ours, not SafeKit's): `replication_timeout`, `sync_mode` and `guard`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rfs {
    pub origin: Origin,
    pub r#async: AsyncMode,
    pub acl: bool,
    /// Parallel resync threads; default 6 (SafeKit 8.2.5.3+); 0 is rejected.
    pub nbrei: u32,
    pub mountover: bool,
    pub scripts: bool,
    /// Resync bandwidth cap, KB/s; `None`: unlimited.
    pub reiallowedbw: Option<u32>,
    /// Historical unit: seconds; default 100 s.
    pub locktimeout: Duration,
    /// Historical unit: seconds; default 30 s.
    pub sendtimeout: Duration,
    /// Historical unit: seconds; default 150 s.
    pub reitimeout: Duration,
    /// Historical unit: seconds; default 300 s.
    pub iotimeout: Duration,
    /// 0 to 4; default 4.
    pub namespacepolicy: u8,
    /// Historical unit: minutes; default 0 (off).
    pub syncdelta: Duration,
    pub nbremconn: u32,
    /// Extension: how long the primary waits for a silent peer before it
    /// continues alone (recording what changed). Historical unit for a bare
    /// number: milliseconds. Default 2 s; must stay below the heartbeat timeout.
    pub replication_timeout: Duration,
    /// Extension: which operations wait for the peer; default `write`.
    pub sync_mode: SyncMode,
    /// Extension: the guard of the replicated directories; default `record`.
    pub guard: RfsGuard,
    pub replicated: Vec<Replicated>,
    /// Legacy `<flow name>`: the LAN carrying replication.
    pub flow: Option<Flow>,
}

impl Default for Rfs {
    fn default() -> Self {
        Rfs {
            origin: Origin::default(),
            r#async: AsyncMode::Second,
            acl: false,
            nbrei: 6,
            mountover: true,
            scripts: false,
            reiallowedbw: None,
            locktimeout: Duration::from_secs(100),
            sendtimeout: Duration::from_secs(30),
            reitimeout: Duration::from_secs(150),
            iotimeout: Duration::from_secs(300),
            namespacepolicy: 4,
            syncdelta: Duration::ZERO,
            nbremconn: 1,
            replication_timeout: Duration::from_secs(2),
            sync_mode: SyncMode::Write,
            guard: RfsGuard::Record,
            replicated: Vec::new(),
            flow: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReplicatedMode {
    /// Read-only on the secondary (the only mode SafeKit documents).
    #[default]
    ReadOnly,
}

/// `<replicated dir mode>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Replicated {
    pub origin: Origin,
    /// Absolute; POSIX (`/data`) or Windows (`c:\data`) style.
    pub dir: String,
    pub mode: ReplicatedMode,
    pub notreplicated: Vec<NotReplicated>,
    pub tocheck: Vec<ToCheck>,
}

/// The pattern of a `<notreplicated>`: exactly one of `path` or `regexpath`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotReplicatedPattern {
    /// Relative to the replicated dir.
    Path(String),
    /// A POSIX ERE; a leading `!` means "replicate only matches".
    Regexpath(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReplicated {
    pub origin: Origin,
    pub pattern: NotReplicatedPattern,
}

/// `<tocheck path/>`: a file that must exist before replication starts.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ToCheck {
    pub origin: Origin,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Flow {
    pub origin: Origin,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Logging {
    #[default]
    Userlog,
    None,
}

impl Logging {
    pub const CHOICES: [(&'static str, Logging); 2] =
        [("userlog", Logging::Userlog), ("none", Logging::None)];
}

/// `<user>`: scripts run only when it is present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub origin: Origin,
    /// Historical unit: seconds; default 300 s.
    pub nicestoptimeout: Duration,
    /// Historical unit: seconds; default 300 s.
    pub forcestoptimeout: Duration,
    pub logging: Logging,
    /// KB; default 2048.
    pub userlogsize: u32,
    pub var: Vec<Var>,
}

impl Default for User {
    fn default() -> Self {
        User {
            origin: Origin::default(),
            nicestoptimeout: Duration::from_secs(300),
            forcestoptimeout: Duration::from_secs(300),
            logging: Logging::Userlog,
            userlogsize: 2048,
            var: Vec::new(),
        }
    }
}

/// `<var name value/>`: exported to the scripts.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Var {
    pub origin: Origin,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VhostWhen {
    #[default]
    Prim,
    Second,
    Both,
}

impl VhostWhen {
    pub const CHOICES: [(&'static str, VhostWhen); 3] = [
        ("prim", VhostWhen::Prim),
        ("second", VhostWhen::Second),
        ("both", VhostWhen::Both),
    ];
}

/// `<vhost>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Vhost {
    pub origin: Origin,
    pub virtualhostname: Vec<VirtualHostName>,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct VirtualHostName {
    pub origin: Origin,
    pub name: String,
    pub envfile: Option<String>,
    pub when: VhostWhen,
}

/// `<failover extends period handle_time>` and its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub origin: Origin,
    pub extends: bool,
    /// Historical unit: milliseconds; default 5000 ms.
    pub period: Duration,
    /// Historical unit: milliseconds; default 15000 ms; a multiple of `period`.
    pub handle_time: Duration,
    /// The rule blocks verbatim: each CDATA section, and each run of
    /// non-blank text, in file order.
    pub rules: Vec<String>,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            origin: Origin::default(),
            extends: true,
            period: Duration::from_millis(5000),
            handle_time: Duration::from_millis(15_000),
            rules: Vec::new(),
        }
    }
}

/// `<check>`: the checkers, in file order.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Check {
    pub origin: Origin,
    pub checkers: Vec<Checker>,
}

/// The element a checker is written with; it is also its resource class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckerKind {
    Tcp,
    Ping,
    Intf,
    Ip,
    Custom,
    Module,
    Splitbrain,
}

impl CheckerKind {
    pub const ALL: [CheckerKind; 7] = [
        CheckerKind::Tcp,
        CheckerKind::Ping,
        CheckerKind::Intf,
        CheckerKind::Ip,
        CheckerKind::Custom,
        CheckerKind::Module,
        CheckerKind::Splitbrain,
    ];

    /// The element name and resource class (`tcp`).
    pub fn element(self) -> &'static str {
        match self {
            CheckerKind::Tcp => "tcp",
            CheckerKind::Ping => "ping",
            CheckerKind::Intf => "intf",
            CheckerKind::Ip => "ip",
            CheckerKind::Custom => "custom",
            CheckerKind::Module => "module",
            CheckerKind::Splitbrain => "splitbrain",
        }
    }

    /// The attributes the checker element accepts.
    pub fn attributes(self) -> &'static [&'static str] {
        match self {
            CheckerKind::Tcp | CheckerKind::Ping => {
                &["ident", "when", "action", "interval", "timeout"]
            }
            CheckerKind::Intf | CheckerKind::Ip => &["ident", "when", "interval", "timeout"],
            CheckerKind::Custom => &["ident", "when", "exec", "arg", "action"],
            CheckerKind::Module => &["ident", "name", "interval", "timeout"],
            CheckerKind::Splitbrain => &["ident", "exec", "arg"],
        }
    }

    /// The attributes its `<to>` elements accept; empty: no `<to>`.
    pub fn to_attributes(self) -> &'static [&'static str] {
        match self {
            CheckerKind::Tcp => &["addr", "port", "interval", "timeout"],
            CheckerKind::Ping | CheckerKind::Ip => &["addr", "interval", "timeout"],
            CheckerKind::Intf => &["local_addr", "interval", "timeout"],
            CheckerKind::Module => &["addr", "port", "secure", "interval", "timeout"],
            CheckerKind::Custom | CheckerKind::Splitbrain => &[],
        }
    }

    /// SafeKit's default `when`.
    pub fn default_when(self) -> When {
        match self {
            CheckerKind::Tcp | CheckerKind::Custom => When::Prim,
            _ => When::Pre,
        }
    }

    pub(crate) fn from_element(name: &str) -> Option<CheckerKind> {
        CheckerKind::ALL
            .into_iter()
            .find(|kind| kind.element() == name)
    }
}

/// When a checker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum When {
    /// In every running state.
    #[default]
    Pre,
    Prim,
    Second,
    Both,
}

impl When {
    pub const CHOICES: [(&'static str, When); 4] = [
        ("pre", When::Pre),
        ("prim", When::Prim),
        ("second", When::Second),
        ("both", When::Both),
    ];
}

/// A checker's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckerAction {
    Restart,
    Stopstart,
    Stop,
    Wait,
    Swap,
    Noaction,
}

impl CheckerAction {
    pub const CHOICES: [(&'static str, CheckerAction); 6] = [
        ("restart", CheckerAction::Restart),
        ("stopstart", CheckerAction::Stopstart),
        ("stop", CheckerAction::Stop),
        ("wait", CheckerAction::Wait),
        ("swap", CheckerAction::Swap),
        ("noaction", CheckerAction::Noaction),
    ];
}

/// One checker (`<tcp>`, `<ping>`, `<intf>`, `<ip>`, `<custom>`, `<module>`,
/// `<splitbrain>`); which attributes apply depends on `kind`
/// ([`CheckerKind::attributes`]), the others keep their defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checker {
    pub origin: Origin,
    pub kind: CheckerKind,
    /// Required except for `<module>`, whose resource id defaults to `name`.
    pub ident: Option<String>,
    pub when: When,
    /// `None`: the checker's built-in rule.
    pub action: Option<CheckerAction>,
    /// Historical unit: seconds; default 10 s.
    pub interval: Duration,
    /// Historical unit: seconds; default 5 s.
    pub timeout: Duration,
    /// `<custom>`, `<splitbrain>`: the program (relative to the module's bin/).
    pub exec: Option<String>,
    pub arg: Option<String>,
    /// `<module>`: the watched module.
    pub name: Option<String>,
    pub to: Vec<CheckerTo>,
}

impl Checker {
    /// A checker of `kind` with SafeKit's defaults.
    pub fn new(kind: CheckerKind, ident: Option<String>) -> Self {
        Checker {
            origin: Origin::default(),
            kind,
            ident,
            when: kind.default_when(),
            action: None,
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            exec: None,
            arg: None,
            name: None,
            to: Vec::new(),
        }
    }

    /// The resource id: `ident`, or for `<module>` its `name`.
    pub fn resource_ident(&self) -> &str {
        self.ident.as_deref().or(self.name.as_deref()).unwrap_or("")
    }
}

/// A checker's `<to>`: what it probes. Which fields apply depends on the kind.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct CheckerTo {
    pub origin: Origin,
    pub addr: Option<String>,
    pub port: Option<u16>,
    pub local_addr: Option<String>,
    pub secure: bool,
    /// Overrides the checker's interval for this target.
    pub interval: Option<Duration>,
    /// Overrides the checker's timeout for this target.
    pub timeout: Option<Duration>,
}
