//! The `userconfig.xml` parser: from an element tree to [`UserConfig`].
//!
//! Each `read_*` function checks one element's shape (allowed attributes and
//! children), converts its attributes, applies SafeKit's defaults and records
//! every problem; nothing stops at the first error.

use super::diagnostics::{ConfigErrors, sort_diagnostics};
use super::duration::TimeUnit;
use super::read::Reader;
use super::userconfig::*;
use super::xml::{SourceFile, XmlElement, parse_document};

const SERVICE_CHILDREN: [&str; 9] = [
    "heart", "farm", "vip", "errd", "rfs", "user", "vhost", "check", "failover",
];

/// Parses a `userconfig.xml`.
///
/// # Errors
/// Every syntax, shape and type problem found, each with file, line, column,
/// element and attribute. Cross-checks (timeout > pulse, subnets, cluster.xml)
/// are [`super::validate::validate`]'s job.
pub fn parse_userconfig(file_name: &str, text: &str) -> Result<UserConfig, ConfigErrors> {
    let mut source = SourceFile::new(file_name, text);
    let root = parse_document(&mut source, text);
    let config = root.map(|root| {
        let mut reader = Reader::new(&mut source);
        read_safe(&mut reader, &root)
    });
    let mut diagnostics = source.diagnostics;
    sort_diagnostics(&mut diagnostics);
    match config {
        Some(config) if !diagnostics.iter().any(|diagnostic| diagnostic.is_error()) => Ok(config),
        _ => Err(ConfigErrors { diagnostics }),
    }
}

fn read_safe(reader: &mut Reader<'_, '_>, root: &XmlElement) -> UserConfig {
    let mut config = UserConfig {
        origin: reader.origin(root),
        ..UserConfig::default()
    };
    if root.name != "safe" {
        reader.element_error(
            root,
            format!(
                "the root element is <{}>: expected <safe> in a userconfig.xml",
                root.name
            ),
        );
        return config;
    }
    reader.expect_shape(root, &[], &["macro", "service"], false);
    for element in Reader::children(root, "macro") {
        reader.expect_shape(element, &["name", "value"], &[], false);
        let name = reader.required_nonempty(element, "name");
        let value = reader.required(element, "value").unwrap_or_default();
        reader.macros.push((name.clone(), value.clone()));
        config.r#macro.push(Macro {
            origin: reader.origin(element),
            name,
            value,
        });
    }
    match reader.singleton(root, "service") {
        Some(service) => config.service = read_service(reader, service),
        None => reader.element_error(
            root,
            "missing <service>: expected <service mode=\"mirror|farm|light\">",
        ),
    }
    config
}

fn read_service(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Service {
    reader.expect_shape(
        element,
        &[
            "mode",
            "defaultprim",
            "maxloop",
            "loop_interval",
            "failover",
            "boot",
            "boot_delay",
            "automatic_reboot",
        ],
        &SERVICE_CHILDREN,
        false,
    );
    let defaults = Service::default();
    let mode = match reader.string(element, "mode") {
        Some(_) => reader.choice(element, "mode", &Mode::CHOICES, Mode::Mirror),
        None => {
            reader.attribute_error(
                element,
                "mode",
                "missing required attribute `mode`: expected mirror, farm or light",
            );
            Mode::Mirror
        }
    };
    let defaultprim = match reader.string(element, "defaultprim").as_deref() {
        None | Some("alone") => DefaultPrim::Alone,
        Some("lastprim") => DefaultPrim::Lastprim,
        Some("") => {
            reader.attribute_error(
                element,
                "defaultprim",
                "must not be empty: expected alone, lastprim or a node name",
            );
            DefaultPrim::Alone
        }
        Some(node) => DefaultPrim::Node(node.to_owned()),
    };
    Service {
        origin: reader.origin(element),
        mode,
        defaultprim,
        maxloop: reader.number(
            element,
            "maxloop",
            defaults.maxloop,
            "a whole number 0 or more",
        ),
        loop_interval: reader.duration(
            element,
            "loop_interval",
            TimeUnit::Hours,
            true,
            defaults.loop_interval,
        ),
        failover: reader.switch(element, "failover", defaults.failover),
        boot: reader.choice(element, "boot", &Boot::CHOICES, defaults.boot),
        boot_delay: reader.duration(
            element,
            "boot_delay",
            TimeUnit::Seconds,
            true,
            defaults.boot_delay,
        ),
        automatic_reboot: reader.switch(element, "automatic_reboot", defaults.automatic_reboot),
        heart: reader
            .singleton(element, "heart")
            .map(|heart| read_heart(reader, heart)),
        farm: reader
            .singleton(element, "farm")
            .map(|farm| read_farm(reader, farm)),
        vip: reader
            .singleton(element, "vip")
            .map(|vip| read_vip(reader, vip)),
        errd: reader
            .singleton(element, "errd")
            .map(|errd| read_errd(reader, errd)),
        rfs: reader
            .singleton(element, "rfs")
            .map(|rfs| read_rfs(reader, rfs)),
        user: reader
            .singleton(element, "user")
            .map(|user| read_user(reader, user)),
        vhost: reader
            .singleton(element, "vhost")
            .map(|vhost| read_vhost(reader, vhost)),
        check: reader
            .singleton(element, "check")
            .map(|check| read_check(reader, check)),
        failover_rules: reader
            .singleton(element, "failover")
            .map(|failover| read_failover(reader, failover)),
    }
}

fn read_port(reader: &mut Reader<'_, '_>, element: &XmlElement, name: &str) -> Option<u16> {
    let port: Option<u16> = reader.opt_number(element, name, "a port number from 1 to 65535");
    if port == Some(0) {
        reader.attribute_error(
            element,
            name,
            "`0` is not valid: expected a port number from 1 to 65535",
        );
        return None;
    }
    port
}

fn read_heart(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Heart {
    reader.expect_shape(
        element,
        &["pulse", "timeout", "port", "permanent_arp"],
        &["heartbeat"],
        false,
    );
    let defaults = Heart::default();
    let heartbeat = Reader::children(element, "heartbeat")
        .map(|heartbeat| {
            reader.expect_shape(
                heartbeat,
                &["name", "ident", "pulse", "timeout"],
                &[],
                false,
            );
            Heartbeat {
                origin: reader.origin(heartbeat),
                name: reader.required_nonempty(heartbeat, "name"),
                ident: reader.string(heartbeat, "ident"),
                pulse: reader.opt_duration(heartbeat, "pulse", TimeUnit::Milliseconds, false),
                timeout: reader.opt_duration(heartbeat, "timeout", TimeUnit::Milliseconds, false),
            }
        })
        .collect();
    Heart {
        origin: reader.origin(element),
        pulse: reader.duration(
            element,
            "pulse",
            TimeUnit::Milliseconds,
            false,
            defaults.pulse,
        ),
        timeout: reader.duration(
            element,
            "timeout",
            TimeUnit::Milliseconds,
            false,
            defaults.timeout,
        ),
        port: read_port(reader, element, "port"),
        permanent_arp: reader.switch(element, "permanent_arp", false),
        heartbeat,
    }
}

fn read_farm(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Farm {
    reader.expect_shape(
        element,
        &["port", "pulse", "mlost_count", "slost_count"],
        &["lan"],
        false,
    );
    let defaults = Farm::default();
    let lan = Reader::children(element, "lan")
        .map(|lan| {
            reader.expect_shape(lan, &["name"], &[], false);
            FarmLan {
                origin: reader.origin(lan),
                name: reader.required_nonempty(lan, "name"),
            }
        })
        .collect();
    Farm {
        origin: reader.origin(element),
        port: read_port(reader, element, "port"),
        pulse: reader.duration(
            element,
            "pulse",
            TimeUnit::Milliseconds,
            false,
            defaults.pulse,
        ),
        mlost_count: read_count(reader, element, "mlost_count", defaults.mlost_count),
        slost_count: read_count(reader, element, "slost_count", defaults.slost_count),
        lan,
    }
}

/// A count of missed pulses: a whole number of at least 1.
pub(crate) fn read_count(
    reader: &mut Reader<'_, '_>,
    element: &XmlElement,
    name: &str,
    default: u32,
) -> u32 {
    let count = reader.number(element, name, default, "a whole number 1 or more");
    if count == 0 {
        reader.attribute_error(
            element,
            name,
            "`0` is not valid: expected a whole number 1 or more",
        );
        return default;
    }
    count
}

fn read_vip(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Vip {
    reader.expect_shape(
        element,
        &["tcpreset"],
        &["interface_list", "loadbalancing"],
        false,
    );
    let mut interface_list = Vec::new();
    if let Some(list) = reader.singleton(element, "interface_list") {
        reader.expect_shape(list, &[], &["interface"], false);
        for interface in Reader::children(list, "interface") {
            interface_list.push(read_interface(reader, interface));
        }
    }
    let loadbalancing = reader
        .singleton(element, "loadbalancing")
        .map(|loadbalancing| read_loadbalancing(reader, loadbalancing));
    Vip {
        origin: reader.origin(element),
        tcpreset: reader.switch(element, "tcpreset", false),
        interface_list,
        loadbalancing,
    }
}

fn read_loadbalancing(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Loadbalancing {
    reader.expect_shape(element, &[], &["group"], false);
    let group = Reader::children(element, "group")
        .map(|group| {
            reader.expect_shape(group, &["name"], &["cluster", "rule"], false);
            let cluster = reader.singleton(group, "cluster").map(|cluster| {
                reader.expect_shape(cluster, &[], &["host"], false);
                Reader::children(cluster, "host")
                    .map(|host| {
                        reader.expect_shape(host, &["name", "power"], &[], false);
                        Host {
                            origin: reader.origin(host),
                            name: reader.required_nonempty(host, "name"),
                            power: reader.number(host, "power", 1, "a whole number 0 or more"),
                        }
                    })
                    .collect()
            });
            let rule = Reader::children(group, "rule")
                .map(|rule| {
                    reader.expect_shape(
                        rule,
                        &["virtual_addr", "port", "proto", "filter"],
                        &[],
                        false,
                    );
                    let virtual_addr = reader
                        .string(rule, "virtual_addr")
                        .filter(|addr| addr != "*");
                    let port = match reader.string(rule, "port").as_deref() {
                        None | Some("*") => None,
                        Some(_) => read_port(reader, rule, "port"),
                    };
                    LbRule {
                        origin: reader.origin(rule),
                        virtual_addr,
                        port,
                        proto: reader.choice(rule, "proto", &Proto::CHOICES, Proto::Tcp),
                        filter: reader.choice(rule, "filter", &Filter::CHOICES, Filter::OnAddr),
                    }
                })
                .collect();
            Group {
                origin: reader.origin(group),
                name: reader.required_nonempty(group, "name"),
                cluster,
                rule,
            }
        })
        .collect();
    Loadbalancing {
        origin: reader.origin(element),
        group,
    }
}

fn read_interface(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Interface {
    reader.expect_shape(
        element,
        &["check", "arpreroute", "arpinterval", "arpelapse", "name"],
        &["real_interface", "virtual_interface"],
        false,
    );
    let defaults = Interface::default();
    let real_interface = reader.singleton(element, "real_interface").map(|real| {
        reader.expect_shape(real, &[], &["virtual_addr"], false);
        RealInterface {
            origin: reader.origin(real),
            virtual_addr: read_virtual_addrs(reader, real),
        }
    });
    let virtual_interface =
        reader
            .singleton(element, "virtual_interface")
            .map(|virtual_interface| {
                reader.expect_shape(
                    virtual_interface,
                    &["type", "addr"],
                    &["virtual_addr"],
                    false,
                );
                VirtualInterface {
                    origin: reader.origin(virtual_interface),
                    r#type: reader.choice(
                        virtual_interface,
                        "type",
                        &VmacType::CHOICES,
                        VmacType::VmacInvisible,
                    ),
                    addr: reader.string(virtual_interface, "addr"),
                    virtual_addr: read_virtual_addrs(reader, virtual_interface),
                }
            });
    if real_interface.is_none() && virtual_interface.is_none() {
        reader.element_error(
            element,
            "expected a <real_interface> or a <virtual_interface> holding the <virtual_addr>",
        );
    }
    Interface {
        origin: reader.origin(element),
        check: reader.switch(element, "check", defaults.check),
        arpreroute: reader.switch(element, "arpreroute", defaults.arpreroute),
        arpinterval: reader.duration(
            element,
            "arpinterval",
            TimeUnit::Seconds,
            false,
            defaults.arpinterval,
        ),
        arpelapse: reader.duration(
            element,
            "arpelapse",
            TimeUnit::Seconds,
            false,
            defaults.arpelapse,
        ),
        name: reader.string(element, "name"),
        real_interface,
        virtual_interface,
    }
}

fn read_virtual_addrs(reader: &mut Reader<'_, '_>, parent: &XmlElement) -> Vec<VirtualAddr> {
    Reader::children(parent, "virtual_addr")
        .map(|element| {
            reader.expect_shape(
                element,
                &["addr", "where", "check", "connections", "netmask"],
                &[],
                false,
            );
            VirtualAddr {
                origin: reader.origin(element),
                addr: reader.required_nonempty(element, "addr"),
                r#where: reader.choice(element, "where", &Where::CHOICES, Where::OneSideAlias),
                check: reader.switch(element, "check", false),
                connections: reader.switch(element, "connections", false),
                netmask: reader.string(element, "netmask"),
            }
        })
        .collect()
}

fn read_errd(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Errd {
    reader.expect_shape(element, &["polltimer"], &["proc"], false);
    let proc = Reader::children(element, "proc")
        .map(|proc| read_proc(reader, proc))
        .collect();
    Errd {
        origin: reader.origin(element),
        polltimer: reader.duration(
            element,
            "polltimer",
            TimeUnit::Seconds,
            false,
            Errd::default().polltimer,
        ),
        proc,
    }
}

fn read_proc(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Proc {
    reader.expect_shape(
        element,
        &[
            "name",
            "atleast",
            "atmax",
            "action",
            "class",
            "start_after",
            "nameregex",
            "argregex",
            "service",
            "restart_services",
        ],
        &[],
        false,
    );
    let defaults = Proc::default();
    let action = match reader.string(element, "action").as_deref() {
        None | Some("stopstart") => ProcAction::Stopstart,
        Some("restart") => ProcAction::Restart,
        Some("stop") => ProcAction::Stop,
        Some("noaction") => ProcAction::Noaction,
        Some("") => {
            reader.attribute_error(
                element,
                "action",
                "must not be empty: expected stopstart, restart, stop, noaction or a handler",
            );
            ProcAction::Stopstart
        }
        Some(handler) => ProcAction::Handler(handler.to_owned()),
    };
    let start_after: Option<u32> =
        reader.opt_number(element, "start_after", "a whole number 1 or more");
    if start_after == Some(0) {
        reader.attribute_error(
            element,
            "start_after",
            "`0` is not valid: expected a whole number 1 or more",
        );
    }
    Proc {
        origin: reader.origin(element),
        name: reader.required_nonempty(element, "name"),
        atleast: reader.number(
            element,
            "atleast",
            defaults.atleast,
            "a whole number 0 or more",
        ),
        atmax: reader.number(
            element,
            "atmax",
            defaults.atmax,
            "a whole number, or -1 for no limit",
        ),
        action,
        class: reader.string(element, "class"),
        start_after: start_after.filter(|value| *value > 0),
        nameregex: reader.string(element, "nameregex"),
        argregex: reader.string(element, "argregex"),
        service: reader.switch(element, "service", false),
        restart_services: reader.string(element, "restart_services"),
    }
}

fn read_rfs(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Rfs {
    reader.expect_shape(
        element,
        &[
            "async",
            "acl",
            "nbrei",
            "mountover",
            "scripts",
            "reiallowedbw",
            "locktimeout",
            "sendtimeout",
            "reitimeout",
            "iotimeout",
            "namespacepolicy",
            "syncdelta",
            "nbremconn",
            "replication_timeout",
            "sync_mode",
            "guard",
        ],
        &["replicated", "flow"],
        false,
    );
    let defaults = Rfs::default();
    let nbrei = reader.number(element, "nbrei", defaults.nbrei, "a whole number 1 or more");
    if nbrei == 0 {
        reader.attribute_error(
            element,
            "nbrei",
            "`0` is not valid: expected at least 1 resync thread",
        );
    }
    let namespacepolicy = reader.number(
        element,
        "namespacepolicy",
        defaults.namespacepolicy,
        "0, 1, 2, 3 or 4",
    );
    if namespacepolicy > 4 {
        reader.attribute_error(
            element,
            "namespacepolicy",
            format!("`{namespacepolicy}` is not valid: expected 0, 1, 2, 3 or 4"),
        );
    }
    let nbremconn = reader.number(
        element,
        "nbremconn",
        defaults.nbremconn,
        "a whole number 1 or more",
    );
    if nbremconn == 0 {
        reader.attribute_error(
            element,
            "nbremconn",
            "`0` is not valid: expected at least 1 connection",
        );
    }
    let replicated = Reader::children(element, "replicated")
        .map(|replicated| read_replicated(reader, replicated))
        .collect();
    let flow = reader.singleton(element, "flow").map(|flow| {
        reader.expect_shape(flow, &["name"], &[], false);
        Flow {
            origin: reader.origin(flow),
            name: reader.required_nonempty(flow, "name"),
        }
    });
    Rfs {
        origin: reader.origin(element),
        r#async: reader.choice(element, "async", &AsyncMode::CHOICES, defaults.r#async),
        acl: reader.switch(element, "acl", defaults.acl),
        nbrei: nbrei.max(1),
        mountover: reader.switch(element, "mountover", defaults.mountover),
        scripts: reader.switch(element, "scripts", defaults.scripts),
        reiallowedbw: reader.opt_number(
            element,
            "reiallowedbw",
            "a bandwidth in KB/s (a whole number)",
        ),
        locktimeout: reader.duration(
            element,
            "locktimeout",
            TimeUnit::Seconds,
            false,
            defaults.locktimeout,
        ),
        sendtimeout: reader.duration(
            element,
            "sendtimeout",
            TimeUnit::Seconds,
            false,
            defaults.sendtimeout,
        ),
        reitimeout: reader.duration(
            element,
            "reitimeout",
            TimeUnit::Seconds,
            false,
            defaults.reitimeout,
        ),
        iotimeout: reader.duration(
            element,
            "iotimeout",
            TimeUnit::Seconds,
            false,
            defaults.iotimeout,
        ),
        namespacepolicy: namespacepolicy.min(4),
        syncdelta: reader.duration(
            element,
            "syncdelta",
            TimeUnit::Minutes,
            true,
            defaults.syncdelta,
        ),
        nbremconn: nbremconn.max(1),
        replication_timeout: reader.duration(
            element,
            "replication_timeout",
            TimeUnit::Milliseconds,
            false,
            defaults.replication_timeout,
        ),
        sync_mode: reader.choice(element, "sync_mode", &SyncMode::CHOICES, defaults.sync_mode),
        guard: reader.choice(element, "guard", &RfsGuard::CHOICES, defaults.guard),
        replicated,
        flow,
    }
}

fn read_replicated(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Replicated {
    reader.expect_shape(
        element,
        &["dir", "mode"],
        &["notreplicated", "tocheck"],
        false,
    );
    let notreplicated = Reader::children(element, "notreplicated")
        .filter_map(|excluded| {
            reader.expect_shape(excluded, &["path", "regexpath"], &[], false);
            let pattern = match (
                reader.string(excluded, "path"),
                reader.string(excluded, "regexpath"),
            ) {
                (Some(path), None) => NotReplicatedPattern::Path(path),
                (None, Some(regexpath)) => NotReplicatedPattern::Regexpath(regexpath),
                _ => {
                    reader.element_error(
                        excluded,
                        "expected exactly one of the attributes `path` or `regexpath`",
                    );
                    return None;
                }
            };
            Some(NotReplicated {
                origin: reader.origin(excluded),
                pattern,
            })
        })
        .collect();
    let tocheck = Reader::children(element, "tocheck")
        .map(|tocheck| {
            reader.expect_shape(tocheck, &["path"], &[], false);
            ToCheck {
                origin: reader.origin(tocheck),
                path: reader.required_nonempty(tocheck, "path"),
            }
        })
        .collect();
    Replicated {
        origin: reader.origin(element),
        dir: reader.required_nonempty(element, "dir"),
        mode: reader.choice(
            element,
            "mode",
            &[("read_only", ReplicatedMode::ReadOnly)],
            ReplicatedMode::ReadOnly,
        ),
        notreplicated,
        tocheck,
    }
}

fn read_user(reader: &mut Reader<'_, '_>, element: &XmlElement) -> User {
    reader.expect_shape(
        element,
        &[
            "nicestoptimeout",
            "forcestoptimeout",
            "logging",
            "userlogsize",
        ],
        &["var"],
        false,
    );
    let defaults = User::default();
    let var = Reader::children(element, "var")
        .map(|var| {
            reader.expect_shape(var, &["name", "value"], &[], false);
            Var {
                origin: reader.origin(var),
                name: reader.required_nonempty(var, "name"),
                value: reader.required(var, "value").unwrap_or_default(),
            }
        })
        .collect();
    User {
        origin: reader.origin(element),
        nicestoptimeout: reader.duration(
            element,
            "nicestoptimeout",
            TimeUnit::Seconds,
            false,
            defaults.nicestoptimeout,
        ),
        forcestoptimeout: reader.duration(
            element,
            "forcestoptimeout",
            TimeUnit::Seconds,
            false,
            defaults.forcestoptimeout,
        ),
        logging: reader.choice(element, "logging", &Logging::CHOICES, defaults.logging),
        userlogsize: reader.number(
            element,
            "userlogsize",
            defaults.userlogsize,
            "a size in KB (a whole number)",
        ),
        var,
    }
}

fn read_vhost(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Vhost {
    reader.expect_shape(element, &[], &["virtualhostname"], false);
    let virtualhostname = Reader::children(element, "virtualhostname")
        .map(|name| {
            reader.expect_shape(name, &["name", "envfile", "when"], &[], false);
            VirtualHostName {
                origin: reader.origin(name),
                name: reader.required_nonempty(name, "name"),
                envfile: reader.string(name, "envfile"),
                when: reader.choice(name, "when", &VhostWhen::CHOICES, VhostWhen::Prim),
            }
        })
        .collect();
    Vhost {
        origin: reader.origin(element),
        virtualhostname,
    }
}

fn read_failover(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Failover {
    reader.expect_shape(element, &["extends", "period", "handle_time"], &[], true);
    let defaults = Failover::default();
    let rules = element
        .texts
        .iter()
        .filter(|text| text.cdata || !text.text.trim().is_empty())
        .map(|text| text.text.clone())
        .collect();
    Failover {
        origin: reader.origin(element),
        extends: reader.switch(element, "extends", defaults.extends),
        period: reader.duration(
            element,
            "period",
            TimeUnit::Milliseconds,
            false,
            defaults.period,
        ),
        handle_time: reader.duration(
            element,
            "handle_time",
            TimeUnit::Milliseconds,
            false,
            defaults.handle_time,
        ),
        rules,
    }
}

fn read_check(reader: &mut Reader<'_, '_>, element: &XmlElement) -> Check {
    let names: Vec<&str> = CheckerKind::ALL.iter().map(|kind| kind.element()).collect();
    reader.expect_shape(element, &[], &names, false);
    let checkers = element
        .children
        .iter()
        .filter_map(|child| {
            CheckerKind::from_element(&child.name).map(|kind| read_checker(reader, child, kind))
        })
        .collect();
    Check {
        origin: reader.origin(element),
        checkers,
    }
}

fn read_checker(reader: &mut Reader<'_, '_>, element: &XmlElement, kind: CheckerKind) -> Checker {
    let to_attributes = kind.to_attributes();
    let children: &[&str] = if to_attributes.is_empty() {
        &[]
    } else {
        &["to"]
    };
    reader.expect_shape(element, kind.attributes(), children, false);
    let mut checker = Checker::new(kind, None);
    checker.origin = reader.origin(element);
    checker.ident = match kind {
        CheckerKind::Module => reader.string(element, "ident"),
        _ => Some(reader.required_nonempty(element, "ident")),
    };
    checker.when = match kind {
        CheckerKind::Splitbrain | CheckerKind::Module => When::Pre,
        _ => reader.choice(element, "when", &When::CHOICES, kind.default_when()),
    };
    if reader.string(element, "action").is_some() {
        checker.action = Some(reader.choice(
            element,
            "action",
            &CheckerAction::CHOICES,
            CheckerAction::Noaction,
        ));
    }
    checker.interval = reader.duration(
        element,
        "interval",
        TimeUnit::Seconds,
        false,
        checker.interval,
    );
    checker.timeout = reader.duration(
        element,
        "timeout",
        TimeUnit::Seconds,
        false,
        checker.timeout,
    );
    match kind {
        CheckerKind::Custom | CheckerKind::Splitbrain => {
            checker.exec = Some(reader.required_nonempty(element, "exec"));
            checker.arg = reader.string(element, "arg");
            if kind == CheckerKind::Splitbrain
                && checker
                    .arg
                    .as_deref()
                    .is_none_or(|arg| arg.trim().is_empty())
            {
                reader.attribute_error(
                    element,
                    "arg",
                    "expected the witness address(es), separated by spaces",
                );
            }
        }
        CheckerKind::Module => checker.name = Some(reader.required_nonempty(element, "name")),
        _ => {}
    }
    for to in Reader::children(element, "to") {
        reader.expect_shape(to, to_attributes, &[], false);
        let mut target = CheckerTo {
            origin: reader.origin(to),
            ..CheckerTo::default()
        };
        if to_attributes.contains(&"addr") {
            target.addr = Some(reader.required_nonempty(to, "addr"));
        }
        if to_attributes.contains(&"local_addr") {
            target.local_addr = Some(reader.required_nonempty(to, "local_addr"));
        }
        match kind {
            CheckerKind::Tcp => {
                target.port = read_port(reader, to, "port");
                if reader.string(to, "port").is_none() && !to.malformed {
                    reader.attribute_error(to, "port", "missing required attribute `port`");
                }
            }
            CheckerKind::Module => {
                target.port = read_port(reader, to, "port");
                target.secure = reader.switch(to, "secure", false);
            }
            _ => {}
        }
        target.interval = reader.opt_duration(to, "interval", TimeUnit::Seconds, false);
        target.timeout = reader.opt_duration(to, "timeout", TimeUnit::Seconds, false);
        checker.to.push(target);
    }
    if !to_attributes.is_empty() && checker.to.is_empty() {
        reader.element_error(
            element,
            format!(
                "<{}> needs at least one <to> naming what it checks",
                kind.element()
            ),
        );
    }
    checker
}
