//! Validation of a whole configuration before anything is applied.
//!
//! The parsers check each file's shape and types; this module checks what
//! relates several values or files: `timeout > pulse`, replicated directories
//! that are absolute and disjoint, heartbeats on LANs that cluster.xml
//! defines, virtual IPs inside a LAN's subnet, checker idents that are unique
//! and known to the rules, custom checker programs present in the module's
//! `bin/`. It returns every problem found, errors and warnings; a
//! configuration may be applied only when no error is left.
//!
//! Rules that need information the caller may not have (cluster.xml, the
//! module's `bin/` listing, the target platform) are skipped when it is absent.
//!
//! The subnet rule: a virtual IP must share a subnet with at least one node
//! address of cluster.xml, on any LAN. The subnet's mask is the
//! `virtual_addr`'s `netmask` when given (`255.255.255.0` or a prefix length
//! `24`), else /24 for IPv4 and /64 for IPv6. A `virtual_addr` that is not an
//! IP (a host name, or the samples' placeholder `VIRTUAL_TO_BE_DEFINED`) gets
//! a warning only: SafeKit resolves names when the module starts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use super::cluster::ClusterConfig;
use super::diagnostics::{Diagnostic, Severity, sort_diagnostics};
use super::duration::format_duration;
use super::userconfig::{
    Checker, CheckerKind, Failover, Filter, Mode, Proto, UserConfig, VirtualAddr,
};

/// The platform the module will run on, for platform-specific rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    Linux,
    Windows,
}

/// What the validator may know besides the `userconfig.xml` itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct ValidationContext<'a> {
    /// The cluster's `cluster.xml`, for LAN names, node names and subnets.
    pub cluster: Option<&'a ClusterConfig>,
    /// The file names in the module's `bin/` folder (the caller lists it).
    pub module_bin: Option<&'a [String]>,
    /// `None`: accept both POSIX and Windows absolute paths.
    pub platform: Option<Platform>,
}

/// Validates a parsed `userconfig.xml` (and the cluster.xml of `context`, if any).
///
/// Returns every error and warning, sorted by file and position.
pub fn validate(config: &UserConfig, context: &ValidationContext<'_>) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    if let Some(cluster) = context.cluster {
        diagnostics.extend(validate_cluster(cluster));
    }
    check_service(config, context, &mut diagnostics);
    check_heart(config, context, &mut diagnostics);
    check_rfs(config, context, &mut diagnostics);
    check_vip(config, context, &mut diagnostics);
    check_loadbalancing(config, context, &mut diagnostics);
    check_errd(config, &mut diagnostics);
    check_checkers(config, context, &mut diagnostics);
    if let Some(failover) = &config.service.failover_rules {
        check_failover(config, failover, &mut diagnostics);
    }
    sort_diagnostics(&mut diagnostics);
    diagnostics
}

/// Validates a `cluster.xml` on its own: at least one LAN, at least two
/// nodes, the same node names on every LAN, no duplicates.
pub fn validate_cluster(cluster: &ClusterConfig) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let lans = &cluster.lans;
    if lans.lan.is_empty() {
        diagnostics.push(
            lans.origin
                .error("expected at least one <lan> holding every node"),
        );
    }
    let mut lan_names = BTreeSet::new();
    let mut command_lans = 0;
    for lan in &lans.lan {
        if !lan_names.insert(lan.name.as_str()) {
            diagnostics.push(
                lan.origin
                    .attribute_error("name", format!("LAN `{}` is defined twice", lan.name)),
            );
        }
        if lan.command == Some(true) {
            command_lans += 1;
            if command_lans > 1 {
                diagnostics.push(
                    lan.origin
                        .attribute_error("command", "only one LAN may have command=\"on\""),
                );
            }
        }
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for node in &lan.node {
            if !names.insert(node.name.as_str()) {
                diagnostics.push(node.origin.attribute_error(
                    "name",
                    format!("node `{}` appears twice on LAN `{}`", node.name, lan.name),
                ));
            }
            if !addrs.insert(node.addr.as_str()) {
                diagnostics.push(node.origin.attribute_error(
                    "addr",
                    format!(
                        "address `{}` is used twice on LAN `{}`",
                        node.addr, lan.name
                    ),
                ));
            }
            if node.addr.starts_with('[') && parse_ip(&node.addr).is_none() {
                diagnostics.push(node.origin.attribute_error(
                    "addr",
                    format!("`{}` is not an IPv6 address in brackets", node.addr),
                ));
            }
        }
    }
    if let Some(first) = lans.lan.first() {
        if first.node.len() < 2 {
            diagnostics.push(first.origin.error(format!(
                "LAN `{}` has {} node(s): expected at least two nodes",
                first.name,
                first.node.len()
            )));
        }
        let expected: BTreeSet<&str> = first.node.iter().map(|node| node.name.as_str()).collect();
        for lan in &lans.lan[1..] {
            let names: BTreeSet<&str> = lan.node.iter().map(|node| node.name.as_str()).collect();
            if names != expected {
                let list =
                    |set: &BTreeSet<&str>| set.iter().copied().collect::<Vec<_>>().join(", ");
                diagnostics.push(lan.origin.error(format!(
                    "LAN `{}` has nodes {{{}}} but LAN `{}` has {{{}}}: node names must be identical on every LAN",
                    lan.name,
                    list(&names),
                    first.name,
                    list(&expected)
                )));
            }
        }
    }
    sort_diagnostics(&mut diagnostics);
    diagnostics
}

fn check_service(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let service = &config.service;
    let mode_name = match service.mode {
        Mode::Mirror => "mirror",
        Mode::Farm => "farm",
        Mode::Light => "light",
    };
    match service.mode {
        Mode::Mirror => {
            if service.heart.is_none() {
                diagnostics.push(
                    service
                        .origin
                        .error("a mirror module needs <heart> with at least one <heartbeat>"),
                );
            }
            if let Some(farm) = &service.farm {
                diagnostics.push(
                    farm.origin
                        .error("<farm> is for mode=\"farm\": this module is a mirror"),
                );
            }
        }
        Mode::Farm | Mode::Light => {
            if let Some(heart) = &service.heart {
                diagnostics.push(heart.origin.error(format!(
                    "<heart> is for mirror modules: this module is mode=\"{mode_name}\""
                )));
            }
            if let Some(rfs) = &service.rfs {
                diagnostics.push(rfs.origin.error(format!(
                    "<rfs> replication is for mirror modules: this module is mode=\"{mode_name}\""
                )));
            }
        }
    }
    if service.mode == Mode::Farm {
        match &service.farm {
            None => diagnostics.push(
                service
                    .origin
                    .error("a farm module needs <farm> with at least one <lan>"),
            ),
            Some(farm) if farm.lan.is_empty() => diagnostics.push(
                farm.origin
                    .error("expected at least one <lan name=\"...\"/>"),
            ),
            Some(farm) => {
                if let Some(cluster) = context.cluster {
                    for lan in &farm.lan {
                        if cluster.lan(&lan.name).is_none() {
                            diagnostics.push(
                                lan.origin
                                    .attribute_error("name", unknown_lan(&lan.name, cluster)),
                            );
                        }
                    }
                }
            }
        }
    } else if let Some(farm) = &service.farm
        && service.mode == Mode::Light
    {
        diagnostics.push(
            farm.origin
                .error("<farm> is for mode=\"farm\": this module is mode=\"light\""),
        );
    }
    if let (super::userconfig::DefaultPrim::Node(node), Some(cluster)) =
        (&service.defaultprim, context.cluster)
        && !cluster.node_names().contains(&node.as_str())
    {
        diagnostics.push(service.origin.attribute_error(
            "defaultprim",
            format!(
                "`{node}` is not alone, lastprim or a node of cluster.xml ({})",
                cluster.node_names().join(", ")
            ),
        ));
    }
}

fn unknown_lan(name: &str, cluster: &ClusterConfig) -> String {
    let names: Vec<&str> = cluster
        .lans
        .lan
        .iter()
        .map(|lan| lan.name.as_str())
        .collect();
    format!(
        "`{name}` is not a LAN of cluster.xml: expected one of: {}",
        names.join(", ")
    )
}

fn check_timeout_pulse(
    origin: &super::diagnostics::Origin,
    pulse: Duration,
    timeout: Duration,
    diagnostics: &mut Vec<Diagnostic>,
) {
    if timeout <= pulse {
        diagnostics.push(origin.attribute_error(
            "timeout",
            format!(
                "timeout {} must be greater than pulse {} (the peer is lost after `timeout` without heartbeats)",
                format_duration(timeout),
                format_duration(pulse)
            ),
        ));
    }
}

fn check_heart(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(heart) = &config.service.heart else {
        return;
    };
    check_timeout_pulse(&heart.origin, heart.pulse, heart.timeout, diagnostics);
    if heart.heartbeat.is_empty() {
        diagnostics.push(
            heart
                .origin
                .error("expected at least one <heartbeat name=\"LAN\"/>"),
        );
    }
    let mut idents = BTreeSet::new();
    let mut lans = BTreeSet::new();
    for heartbeat in &heart.heartbeat {
        if heartbeat.pulse.is_some() || heartbeat.timeout.is_some() {
            check_timeout_pulse(
                &heartbeat.origin,
                heartbeat.pulse.unwrap_or(heart.pulse),
                heartbeat.timeout.unwrap_or(heart.timeout),
                diagnostics,
            );
        }
        if !idents.insert(heartbeat.resource_ident()) {
            diagnostics.push(heartbeat.origin.attribute_error(
                "ident",
                format!(
                    "two heartbeats have the resource heartbeat.{}: idents must be unique",
                    heartbeat.resource_ident()
                ),
            ));
        }
        if !lans.insert(heartbeat.name.as_str()) {
            diagnostics.push(heartbeat.origin.attribute_error(
                "name",
                format!("two heartbeats use LAN `{}`", heartbeat.name),
            ));
        }
        if let Some(cluster) = context.cluster
            && cluster.lan(&heartbeat.name).is_none()
        {
            diagnostics.push(
                heartbeat
                    .origin
                    .attribute_error("name", unknown_lan(&heartbeat.name, cluster)),
            );
        }
    }
}

/// Which syntax an absolute directory is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathStyle {
    Posix,
    Windows,
}

/// An absolute directory: style, root (`/`, `c:`, `\\server\share`) and components.
type AbsoluteDir = (PathStyle, String, Vec<String>);

/// Splits an absolute directory into its style, root and components
/// (lowercased for Windows, whose paths are case-insensitive).
fn absolute_dir(dir: &str) -> Option<AbsoluteDir> {
    if let Some(rest) = dir.strip_prefix('/') {
        let components = rest
            .split('/')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect();
        return Some((PathStyle::Posix, "/".to_owned(), components));
    }
    let bytes = dir.as_bytes();
    let windows_rest = if bytes.len() >= 3
        && bytes[0].is_ascii_alphabetic()
        && bytes[1] == b':'
        && (bytes[2] == b'\\' || bytes[2] == b'/')
    {
        Some((dir[..2].to_ascii_lowercase(), &dir[3..]))
    } else if let Some(rest) = dir.strip_prefix("\\\\") {
        let mut parts = rest.splitn(3, ['\\', '/']);
        let server = parts.next().unwrap_or("");
        let share = parts.next().unwrap_or("");
        if server.is_empty() || share.is_empty() {
            None
        } else {
            Some((
                format!("\\\\{server}\\{share}").to_lowercase(),
                parts.next().unwrap_or(""),
            ))
        }
    } else {
        None
    };
    let (root, rest) = windows_rest?;
    let components = rest
        .split(['\\', '/'])
        .filter(|part| !part.is_empty())
        .map(str::to_lowercase)
        .collect();
    Some((PathStyle::Windows, root, components))
}

fn check_rfs(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(rfs) = &config.service.rfs else {
        return;
    };
    if rfs.replicated.is_empty() {
        diagnostics.push(
            rfs.origin
                .error("expected at least one <replicated dir=\"...\"/>"),
        );
    }
    if let Some(heart) = &config.service.heart
        && rfs.replication_timeout >= heart.timeout
    {
        diagnostics.push(rfs.origin.attribute_warning(
            "replication_timeout",
            format!(
                "replication_timeout {} is not below the heartbeat timeout {}: the primary would hold application writes until the peer is declared lost",
                format_duration(rfs.replication_timeout),
                format_duration(heart.timeout)
            ),
        ));
    }
    if let (Some(flow), Some(cluster)) = (&rfs.flow, context.cluster)
        && cluster.lan(&flow.name).is_none()
    {
        diagnostics.push(
            flow.origin
                .attribute_error("name", unknown_lan(&flow.name, cluster)),
        );
    }
    let mut seen: Vec<(&str, AbsoluteDir)> = Vec::new();
    for replicated in &rfs.replicated {
        let origin = &replicated.origin;
        let Some(parsed) = absolute_dir(&replicated.dir) else {
            diagnostics.push(origin.attribute_error(
                "dir",
                format!(
                    "`{}` is not an absolute path: expected /path (Linux) or c:\\path (Windows)",
                    replicated.dir
                ),
            ));
            continue;
        };
        let (style, _, components) = &parsed;
        match (context.platform, style) {
            (Some(Platform::Linux), PathStyle::Windows) => {
                diagnostics.push(origin.attribute_error(
                    "dir",
                    format!(
                        "`{}` is a Windows path: expected /path on Linux",
                        replicated.dir
                    ),
                ));
            }
            (Some(Platform::Windows), PathStyle::Posix) => {
                diagnostics.push(origin.attribute_error(
                    "dir",
                    format!(
                        "`{}` is a POSIX path: expected c:\\path on Windows",
                        replicated.dir
                    ),
                ));
            }
            _ => {}
        }
        if components.is_empty() {
            diagnostics.push(origin.attribute_error(
                "dir",
                "a file system root cannot be replicated: expected a directory below it",
            ));
            continue;
        }
        if components.iter().any(|part| part == "." || part == "..") {
            diagnostics.push(origin.attribute_error(
                "dir",
                format!(
                    "`{}` contains `.` or `..`: write the normalized path",
                    replicated.dir
                ),
            ));
        }
        for (other_dir, other) in &seen {
            if other.0 != parsed.0 || other.1 != parsed.1 {
                continue;
            }
            let (shorter, longer) = if other.2.len() <= components.len() {
                (&other.2, components)
            } else {
                (components, &other.2)
            };
            if longer.starts_with(shorter) {
                let message = if other.2.len() == components.len() {
                    format!(
                        "`{}` is replicated twice (same directory as `{other_dir}`)",
                        replicated.dir
                    )
                } else {
                    format!(
                        "`{}` and `{other_dir}` are nested: replicated directories must be disjoint",
                        replicated.dir
                    )
                };
                diagnostics.push(origin.attribute_error("dir", message));
            }
        }
        seen.push((&replicated.dir, parsed));
        for tocheck in &replicated.tocheck {
            if absolute_dir(&tocheck.path).is_some() {
                diagnostics.push(tocheck.origin.attribute_error(
                    "path",
                    "expected a path relative to the replicated directory",
                ));
            }
        }
        for excluded in &replicated.notreplicated {
            if let super::userconfig::NotReplicatedPattern::Path(path) = &excluded.pattern
                && absolute_dir(path).is_some()
            {
                diagnostics.push(excluded.origin.attribute_error(
                    "path",
                    "expected a path relative to the replicated directory",
                ));
            }
        }
    }
}

/// Parses an IP address, IPv6 possibly in brackets.
fn parse_ip(text: &str) -> Option<IpAddr> {
    let text = text.trim();
    let text = text
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(text);
    text.parse().ok()
}

/// The prefix length of a netmask written as `255.255.255.0`, `24` or `/24`.
fn prefix_length(netmask: &str, vip: IpAddr) -> Option<u32> {
    let netmask = netmask.trim();
    let max = if vip.is_ipv4() { 32 } else { 128 };
    if let Ok(length) = netmask.strip_prefix('/').unwrap_or(netmask).parse::<u32>() {
        return (length <= max).then_some(length);
    }
    let mask: std::net::Ipv4Addr = netmask.parse().ok()?;
    let bits = u32::from(mask);
    let length = bits.leading_ones();
    (vip.is_ipv4() && bits.checked_shl(length).unwrap_or(0) == 0).then_some(length)
}

fn same_subnet(a: IpAddr, b: IpAddr, length: u32) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = u32::MAX.checked_shl(32 - length).unwrap_or(0);
            u32::from(a) & mask == u32::from(b) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = u128::MAX.checked_shl(128 - length).unwrap_or(0);
            u128::from(a) & mask == u128::from(b) & mask
        }
        _ => false,
    }
}

fn all_virtual_addrs(config: &UserConfig) -> Vec<&VirtualAddr> {
    let Some(vip) = &config.service.vip else {
        return Vec::new();
    };
    vip.interface_list
        .iter()
        .flat_map(|interface| {
            let real = interface
                .real_interface
                .iter()
                .flat_map(|real| real.virtual_addr.iter());
            let virt = interface
                .virtual_interface
                .iter()
                .flat_map(|virt| virt.virtual_addr.iter());
            real.chain(virt)
        })
        .collect()
}

fn check_vip(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let mut seen = BTreeSet::new();
    for addr in all_virtual_addrs(config) {
        if !seen.insert(addr.addr.as_str()) {
            diagnostics.push(addr.origin.attribute_error(
                "addr",
                format!("virtual address `{}` is given twice", addr.addr),
            ));
        }
        let Some(vip) = parse_ip(&addr.addr) else {
            let message = if addr.addr.contains("TO_BE_DEFINED") {
                format!(
                    "`{}` is a placeholder: replace it by the virtual IP or host name of the module",
                    addr.addr
                )
            } else {
                format!(
                    "`{}` is not an IP address: it will be resolved as a host name when the module starts",
                    addr.addr
                )
            };
            diagnostics.push(addr.origin.attribute_warning("addr", message));
            continue;
        };
        let length = match &addr.netmask {
            Some(netmask) => match prefix_length(netmask, vip) {
                Some(length) => length,
                None => {
                    diagnostics.push(addr.origin.attribute_error(
                        "netmask",
                        format!("`{netmask}` is not a netmask: expected e.g. 255.255.255.0 or a prefix length such as 24"),
                    ));
                    continue;
                }
            },
            None if vip.is_ipv4() => 24,
            None => 64,
        };
        let Some(cluster) = context.cluster else {
            continue;
        };
        let node_ips: Vec<IpAddr> = cluster
            .lans
            .lan
            .iter()
            .flat_map(|lan| lan.node.iter())
            .filter_map(|node| parse_ip(&node.addr))
            .collect();
        if node_ips.is_empty() {
            diagnostics.push(addr.origin.attribute_warning("addr", "cluster.xml gives no node IP address: the subnet of the virtual IP cannot be checked"));
            continue;
        }
        if !node_ips
            .iter()
            .any(|node_ip| same_subnet(vip, *node_ip, length))
        {
            diagnostics.push(addr.origin.attribute_error(
                "addr",
                format!(
                    "virtual IP {vip} is not in the /{length} subnet of any node address of cluster.xml: a virtual IP must be on a LAN of the nodes (set `netmask` if the subnet is not /{length})"
                ),
            ));
        }
    }
}

fn check_loadbalancing(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(loadbalancing) = config
        .service
        .vip
        .as_ref()
        .and_then(|vip| vip.loadbalancing.as_ref())
    else {
        return;
    };
    for group in &loadbalancing.group {
        if let (Some(hosts), Some(cluster)) = (&group.cluster, context.cluster) {
            let nodes = cluster.node_names();
            for host in hosts {
                if !nodes.contains(&host.name.as_str()) {
                    diagnostics.push(host.origin.attribute_error(
                        "name",
                        format!(
                            "`{}` is not a node of cluster.xml: expected one of: {}",
                            host.name,
                            nodes.join(", ")
                        ),
                    ));
                }
            }
        }
        for rule in &group.rule {
            match (rule.proto, rule.filter) {
                (Proto::Arp, Filter::OnAddr) | (Proto::Tcp | Proto::Udp, _) => {}
                (Proto::Arp, _) => diagnostics.push(rule.origin.attribute_error(
                    "filter",
                    "proto=\"arp\" balances on the client address: expected filter=\"on_addr\"",
                )),
            }
            if rule.filter == Filter::OnIpid && rule.proto != Proto::Udp {
                diagnostics.push(
                    rule.origin
                        .attribute_error("filter", "on_ipid is for proto=\"udp\""),
                );
            }
        }
    }
}

fn check_errd(config: &UserConfig, diagnostics: &mut Vec<Diagnostic>) {
    let Some(errd) = &config.service.errd else {
        return;
    };
    if config.service.user.is_none() {
        diagnostics.push(errd.origin.error(
            "<errd> needs <user> in <service> (SafeKit runs scripts and errd only with <user>)",
        ));
    }
    for proc in &errd.proc {
        if proc.atmax < -1 {
            diagnostics.push(proc.origin.attribute_error(
                "atmax",
                format!(
                    "`{}` is not valid: expected -1 (no limit) or a count",
                    proc.atmax
                ),
            ));
        } else if proc.atmax >= 0 && i64::from(proc.atmax) < i64::from(proc.atleast) {
            diagnostics.push(proc.origin.attribute_error(
                "atmax",
                format!("atmax {} is less than atleast {}", proc.atmax, proc.atleast),
            ));
        }
    }
}

fn check_checkers(
    config: &UserConfig,
    context: &ValidationContext<'_>,
    diagnostics: &mut Vec<Diagnostic>,
) {
    let Some(check) = &config.service.check else {
        return;
    };
    let mut resources = BTreeSet::new();
    let mut splitbrain_seen = false;
    for checker in &check.checkers {
        let resource = format!("{}.{}", checker.kind.element(), checker.resource_ident());
        if !resources.insert(resource.clone()) {
            diagnostics.push(checker.origin.attribute_error(
                "ident",
                format!("duplicate checker ident: resource {resource} is defined twice"),
            ));
        }
        if checker.kind == CheckerKind::Splitbrain {
            if splitbrain_seen {
                diagnostics.push(
                    checker
                        .origin
                        .error("only one <splitbrain> checker is allowed per module"),
                );
            }
            splitbrain_seen = true;
        }
        check_checker_period(checker, diagnostics);
        if checker.kind != CheckerKind::Custom {
            continue;
        }
        if let (Some(exec), Some(bin)) = (&checker.exec, context.module_bin)
            && !exec_in_bin(exec, bin)
        {
            diagnostics.push(checker.origin.attribute_error(
                "exec",
                format!("`{exec}` is not in the module's bin/ folder: a custom checker runs a program of the module"),
            ));
        }
    }
}

/// A probe must end before the next one starts: `timeout` ≤ `interval`,
/// for the checker and for each `<to>` that overrides either. The default
/// timeout (5 s) is not an error with a shorter interval: the agent then uses
/// the interval as the timeout.
fn check_checker_period(checker: &Checker, diagnostics: &mut Vec<Diagnostic>) {
    if matches!(checker.kind, CheckerKind::Custom | CheckerKind::Splitbrain) {
        return;
    }
    let element = checker.kind.element();
    let default_timeout = Checker::new(checker.kind, None).timeout;
    if checker.timeout > checker.interval && checker.timeout != default_timeout {
        diagnostics.push(checker.origin.attribute_error(
            "timeout",
            format!(
                "<{element}> checker {}: timeout {} is larger than its interval {}: a probe would still run when the next one starts",
                checker.resource_ident(),
                format_duration(checker.timeout),
                format_duration(checker.interval)
            ),
        ));
        return;
    }
    for to in &checker.to {
        if to.interval.is_none() && to.timeout.is_none() {
            continue;
        }
        let interval = to.interval.unwrap_or(checker.interval);
        let timeout = to.timeout.unwrap_or(checker.timeout);
        if timeout > interval && (to.timeout.is_some() || timeout != default_timeout) {
            let attribute = if to.timeout.is_some() {
                "timeout"
            } else {
                "interval"
            };
            diagnostics.push(to.origin.attribute_error(
                attribute,
                format!(
                    "<{element}> checker {}: timeout {} is larger than the interval {}: a probe would still run when the next one starts",
                    checker.resource_ident(),
                    format_duration(timeout),
                    format_duration(interval)
                ),
            ));
        }
    }
}

/// Whether `exec` names a file of `bin` (absolute paths are not checked;
/// without an extension, a Windows script `exec.cmd`/`.bat`/`.ps1`/`.exe`/`.vbs` counts).
fn exec_in_bin(exec: &str, bin: &[String]) -> bool {
    if absolute_dir(exec).is_some() {
        return true;
    }
    let exec = exec.trim_start_matches("./").trim_start_matches(".\\");
    bin.iter().any(|file| {
        file == exec
            || file.rsplit_once('.').is_some_and(|(stem, extension)| {
                stem == exec
                    && ["cmd", "bat", "ps1", "exe", "vbs"]
                        .contains(&extension.to_ascii_lowercase().as_str())
            })
    })
}

/// Resource classes the engine defines itself; any id is accepted.
const BUILTIN_CLASSES: [&str; 7] = [
    "heart",
    "rfs",
    "usersetting",
    "connections",
    "cluster",
    "license",
    "FarmProto",
];

fn check_failover(config: &UserConfig, failover: &Failover, diagnostics: &mut Vec<Diagnostic>) {
    if !failover
        .handle_time
        .as_micros()
        .is_multiple_of(failover.period.as_micros().max(1))
    {
        diagnostics.push(failover.origin.attribute_error(
            "handle_time",
            format!(
                "handle_time {} is not a multiple of period {}",
                format_duration(failover.handle_time),
                format_duration(failover.period)
            ),
        ));
    }
    // What the agent's rule engine cannot run is ignored there: say so now
    // (Lua blocks are SafeKit's own engine's: the agent logs them at start).
    let plain_rules: Vec<String> = failover
        .rules
        .iter()
        .filter(|block| !block.trim_start().starts_with("--Lua"))
        .cloned()
        .collect();
    let (_, problems) = crate::cluster::rules::parse_rules(&plain_rules);
    for problem in problems {
        diagnostics.push(failover.origin.diagnostic(Severity::Warning, problem));
    }
    let known = known_resources(config);
    for block in &failover.rules {
        if block.trim_start().starts_with("--Lua") {
            // Lua rules are code; their resources are strings the engine checks at run time.
            continue;
        }
        for resource in resource_references(block) {
            let (class, id) = resource.split_once('.').unwrap_or((resource.as_str(), ""));
            let wildcard = id.contains(['*', '?']);
            let problem = match known.get(class) {
                None if BUILTIN_CLASSES.contains(&class) || class.starts_with("FarmProto") => None,
                None if class == "splitbrain" && id == "uptodate" => None,
                None => Some(format!(
                    "rule uses resource `{resource}`, whose class `{class}` is unknown: expected one of: {}",
                    known_classes(&known)
                )),
                Some(_) if wildcard => None,
                Some(_) if class == "splitbrain" && id == "uptodate" => None,
                Some(ids) if ids.contains(id) || (class == "intf" && !id.is_empty()) => None,
                // Module checker resources are `module.<name>_<addr>`.
                Some(ids)
                    if class == "module"
                        && ids.iter().any(|known_id| id.starts_with(known_id.as_str())) =>
                {
                    None
                }
                Some(ids) => Some(format!(
                    "rule uses resource `{resource}`, but no {class} resource has that id: expected one of: {}",
                    ids.iter()
                        .map(|id| format!("{class}.{id}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            if let Some(message) = problem {
                diagnostics.push(failover.origin.diagnostic(Severity::Error, message));
            }
        }
    }
}

fn known_classes(known: &BTreeMap<&'static str, BTreeSet<String>>) -> String {
    let mut classes: Vec<&str> = known.keys().copied().collect();
    classes.extend(BUILTIN_CLASSES);
    classes.sort_unstable();
    classes.dedup();
    classes.join(", ")
}

/// Resource ids that the module's own elements define, by class.
fn known_resources(config: &UserConfig) -> BTreeMap<&'static str, BTreeSet<String>> {
    let mut known: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    let service = &config.service;
    for checker in service.check.iter().flat_map(|check| check.checkers.iter()) {
        known
            .entry(checker.kind.element())
            .or_default()
            .insert(resource_id(checker));
    }
    for heartbeat in service
        .heart
        .iter()
        .flat_map(|heart| heart.heartbeat.iter())
    {
        known
            .entry("heartbeat")
            .or_default()
            .insert(heartbeat.resource_ident().to_owned());
    }
    for proc in service.errd.iter().flat_map(|errd| errd.proc.iter()) {
        known.entry("proc").or_default().insert(proc.name.clone());
    }
    for addr in all_virtual_addrs(config) {
        if addr.check {
            known.entry("ip").or_default().insert(addr.addr.clone());
        }
    }
    if let Some(vip) = &service.vip
        && vip.interface_list.iter().any(|interface| interface.check)
    {
        known.entry("intf").or_default();
    }
    known
}

fn resource_id(checker: &Checker) -> String {
    checker.resource_ident().to_owned()
}

/// The `class.id` resources a rule text mentions (`local.`/`remote.` removed).
fn resource_references(text: &str) -> Vec<String> {
    let is_token_char = |c: char| c.is_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '-');
    let mut resources = Vec::new();
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("");
        for token in line.split(|c: char| !is_token_char(c)) {
            let token = token.trim_matches('.');
            if !token.contains('.') || token.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            let token = token
                .strip_prefix("local.")
                .or_else(|| token.strip_prefix("remote."))
                .unwrap_or(token);
            if token.contains('.') {
                resources.push(token.to_owned());
            }
        }
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_dirs_in_both_styles() {
        assert_eq!(
            absolute_dir("/data/app").map(|p| p.2),
            Some(vec!["data".to_owned(), "app".to_owned()])
        );
        assert_eq!(
            absolute_dir("c:\\Test1").map(|p| (p.0, p.1, p.2)),
            Some((
                PathStyle::Windows,
                "c:".to_owned(),
                vec!["test1".to_owned()]
            ))
        );
        assert_eq!(absolute_dir("D:/x").map(|p| p.0), Some(PathStyle::Windows));
        assert_eq!(
            absolute_dir("\\\\srv\\share\\d").map(|p| p.2),
            Some(vec!["d".to_owned()])
        );
        for relative in ["data", "c:data", "./data", "\\data", ""] {
            assert!(absolute_dir(relative).is_none(), "{relative}");
        }
    }

    #[test]
    fn netmasks_and_subnets() {
        let vip: IpAddr = "10.0.1.20".parse().expect("ip");
        assert_eq!(prefix_length("255.255.255.0", vip), Some(24));
        assert_eq!(prefix_length("16", vip), Some(16));
        assert_eq!(prefix_length("/30", vip), Some(30));
        assert_eq!(prefix_length("255.0.255.0", vip), None);
        assert_eq!(prefix_length("33", vip), None);
        assert!(same_subnet(vip, "10.0.1.1".parse().expect("ip"), 24));
        assert!(!same_subnet(vip, "10.0.2.1".parse().expect("ip"), 24));
        assert!(same_subnet(vip, "10.0.2.1".parse().expect("ip"), 16));
        assert!(same_subnet(vip, "192.168.0.1".parse().expect("ip"), 0));
        assert_eq!(parse_ip("[fe80::1]"), "fe80::1".parse().ok());
    }

    #[test]
    fn rule_resources_are_extracted() {
        let rules = "c_app: if (custom.app == down) then restart();\nw: if (remote.heartbeat.flow == up && local.tcp.* == down) then wait(); // x.y\n";
        assert_eq!(
            resource_references(rules),
            vec!["custom.app", "heartbeat.flow", "tcp.*"]
        );
    }

    /// The errors (`file:line:col: ...` lines) of a module whose `<service>` holds `body`.
    fn checker_errors(body: &str, bin: &[&str]) -> Vec<String> {
        let text = format!(
            "<safe>\n<service mode=\"mirror\">\n<heart><heartbeat name=\"default\"/></heart>\n<user/>\n{body}\n</service>\n</safe>\n"
        );
        let config = match super::super::parse_userconfig("userconfig.xml", &text) {
            Ok(config) => config,
            Err(errors) => {
                return errors.diagnostics.iter().map(ToString::to_string).collect();
            }
        };
        let bin: Vec<String> = bin.iter().map(|name| (*name).to_owned()).collect();
        let context = ValidationContext {
            module_bin: Some(&bin),
            ..ValidationContext::default()
        };
        validate(&config, &context)
            .iter()
            .filter(|diagnostic| diagnostic.is_error())
            .map(ToString::to_string)
            .collect()
    }

    fn assert_one_error(errors: &[String], position: &str, words: &[&str]) {
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].starts_with(&format!("userconfig.xml:{position}")),
            "the error names the file and position: {}",
            errors[0]
        );
        for word in words {
            assert!(errors[0].contains(word), "`{word}` in: {}", errors[0]);
        }
    }

    #[test]
    fn a_good_checker_configuration_has_no_error() {
        let errors = checker_errors(
            r#"<check>
<tcp ident="web" interval="2" timeout="1"><to addr="127.0.0.1" port="80"/></tcp>
<intf ident="lan" interval="1"><to local_addr="10.0.0.1"/></intf>
<custom ident="app" exec="check_app" action="stopstart"/>
</check>
<failover><![CDATA[
c_app_down: if (custom.app == down && tcp.web == up) then wait();
]]></failover>"#,
            &["check_app"],
        );
        assert!(errors.is_empty(), "{errors:#?}");
    }

    #[test]
    fn a_rule_on_an_unknown_resource_is_refused() {
        let errors = checker_errors(
            r#"<check><custom ident="app" exec="check_app"/></check>
<failover><![CDATA[
r: if (custom.other == down) then stopstart();
]]></failover>"#,
            &["check_app"],
        );
        assert_one_error(&errors, "6:", &["<failover>", "custom.other", "custom.app"]);
        let errors = checker_errors(
            "<failover><![CDATA[\nr: if (foo.bar == down) then stop();\n]]></failover>",
            &[],
        );
        assert_one_error(&errors, "5:", &["`foo.bar`", "class `foo` is unknown"]);
    }

    #[test]
    fn a_rule_the_agent_cannot_run_is_a_warning() {
        let text = "<safe><service mode=\"mirror\"><heart><heartbeat name=\"default\"/></heart>\n<check><custom ident=\"app\" exec=\"check_app\"/></check>\n<failover><![CDATA[\nr: if (custom.app == down) then rfs.uptodate=up;\n]]></failover></service></safe>";
        let config = super::super::parse_userconfig("userconfig.xml", text).expect("parses");
        let diagnostics = validate(&config, &ValidationContext::default());
        assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
        assert!(!diagnostics[0].is_error());
        let line = diagnostics[0].to_string();
        assert!(
            line.contains("rule `r: if (custom.app == down) then rfs.uptodate=up` not understood"),
            "{line}"
        );
    }

    #[test]
    fn a_zero_or_negative_interval_is_refused() {
        for interval in ["0", "-5"] {
            let errors = checker_errors(
                &format!(
                    r#"<check><ping ident="gw" interval="{interval}"><to addr="10.0.0.254"/></ping></check>"#
                ),
                &[],
            );
            assert_one_error(&errors, "5:", &["ping", "interval"]);
        }
    }

    #[test]
    fn a_timeout_larger_than_the_interval_is_refused() {
        let errors = checker_errors(
            r#"<check>
<tcp ident="web" interval="2" timeout="3"><to addr="127.0.0.1" port="80"/></tcp>
</check>"#,
            &[],
        );
        assert_one_error(
            &errors,
            "6:",
            &[
                "tcp",
                "timeout",
                "web",
                "timeout 3s is larger than its interval 2s",
            ],
        );
        let errors = checker_errors(
            r#"<check>
<tcp ident="web" interval="10"><to addr="127.0.0.1" port="80" interval="1" timeout="2"/></tcp>
</check>"#,
            &[],
        );
        assert_one_error(
            &errors,
            "6:",
            &["<to>", "timeout 2s is larger than the interval 1s"],
        );
    }

    #[test]
    fn a_handle_time_that_is_not_a_multiple_of_period_is_refused() {
        let errors = checker_errors(
            r#"<failover period="5000ms" handle_time="12000ms"></failover>"#,
            &[],
        );
        assert_one_error(&errors, "5:", &["handle_time", "not a multiple of period"]);
    }

    #[test]
    fn a_custom_checker_without_its_program_is_refused() {
        let errors = checker_errors(
            r#"<check><custom ident="app" exec="check_app"/></check>"#,
            &["start_prim"],
        );
        assert_one_error(
            &errors,
            "5:",
            &["custom", "exec", "`check_app` is not in the module's bin/"],
        );
        let errors = checker_errors(r#"<check><custom ident="app"/></check>"#, &[]);
        assert_one_error(&errors, "5:", &["custom", "exec"]);
    }

    #[test]
    fn exec_found_with_or_without_windows_extension() {
        let bin = vec!["start_prim".to_owned(), "check_app.ps1".to_owned()];
        assert!(exec_in_bin("start_prim", &bin));
        assert!(exec_in_bin("check_app", &bin));
        assert!(exec_in_bin("/usr/bin/true", &bin));
        assert!(!exec_in_bin("missing", &bin));
    }
}
