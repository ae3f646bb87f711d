//! Writes the configuration models back as SafeKit-style XML.
//!
//! The output parses back to an equal model (round-trip). Attributes that
//! SafeKit's own samples always show are always written; the others only when
//! they differ from the default. Durations are written with a unit suffix.

use std::fmt::Write as _;
use std::time::Duration;

use super::cluster::ClusterConfig;
use super::duration::format_duration;
use super::userconfig::{
    AsyncMode, Boot, Check, Checker, CheckerAction, CheckerKind, DefaultPrim, Errd, Failover, Farm,
    Filter, Heart, Interface, Logging, Mode, NotReplicatedPattern, ProcAction, Proto, Replicated,
    Rfs, RfsGuard, Service, SyncMode, User, UserConfig, Vhost, VhostWhen, Vip, VirtualAddr,
    VmacType, When, Where,
};

/// An element being written.
#[derive(Debug, Default)]
struct Out {
    name: &'static str,
    attrs: Vec<(&'static str, String)>,
    children: Vec<Out>,
    cdata: Vec<String>,
}

impl Out {
    fn new(name: &'static str) -> Self {
        Out {
            name,
            ..Out::default()
        }
    }

    fn attr(&mut self, name: &'static str, value: impl Into<String>) -> &mut Self {
        self.attrs.push((name, value.into()));
        self
    }

    fn opt(&mut self, name: &'static str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.attr(name, value);
        }
        self
    }

    fn duration(&mut self, name: &'static str, value: Duration) -> &mut Self {
        self.attr(name, format_duration(value))
    }

    fn duration_if(&mut self, name: &'static str, value: Duration, default: Duration) -> &mut Self {
        if value != default {
            self.duration(name, value);
        }
        self
    }

    fn switch_if(&mut self, name: &'static str, value: bool, default: bool) -> &mut Self {
        if value != default {
            self.attr(name, on_off(value));
        }
        self
    }

    fn render(&self, text: &mut String, depth: usize) {
        let indent = "   ".repeat(depth);
        let _ = write!(text, "{indent}<{}", self.name);
        for (name, value) in &self.attrs {
            let _ = write!(text, " {name}=\"{}\"", escape_attribute(value));
        }
        if self.children.is_empty() && self.cdata.is_empty() {
            text.push_str("/>\n");
            return;
        }
        text.push_str(">\n");
        for child in &self.children {
            child.render(text, depth + 1);
        }
        for block in &self.cdata {
            text.push_str(&indent);
            text.push_str("   ");
            if block.contains("]]>") {
                text.push_str(&escape_text(block));
            } else {
                let _ = write!(text, "<![CDATA[{block}]]>");
            }
            text.push('\n');
        }
        let _ = writeln!(text, "{indent}</{}>", self.name);
    }
}

fn on_off(value: bool) -> &'static str {
    if value { "on" } else { "off" }
}

fn escape_attribute(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\n' => escaped.push_str("&#10;"),
            '\r' => escaped.push_str("&#13;"),
            '\t' => escaped.push_str("&#9;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn escape_text(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn choice_name<T: PartialEq + Copy>(choices: &[(&'static str, T)], value: T) -> &'static str {
    choices
        .iter()
        .find(|(_, choice)| *choice == value)
        .map_or("", |(name, _)| name)
}

impl UserConfig {
    /// The configuration as a `userconfig.xml`.
    pub fn to_xml(&self) -> String {
        let mut safe = Out::new("safe");
        for definition in &self.r#macro {
            let mut element = Out::new("macro");
            element
                .attr("name", &definition.name)
                .attr("value", &definition.value);
            safe.children.push(element);
        }
        safe.children.push(write_service(&self.service));
        let mut text = String::from("<!DOCTYPE safe>\n");
        safe.render(&mut text, 0);
        text
    }
}

fn write_service(service: &Service) -> Out {
    let defaults = Service::default();
    let mut out = Out::new("service");
    out.attr("mode", choice_name(&Mode::CHOICES, service.mode));
    out.attr(
        "defaultprim",
        match &service.defaultprim {
            DefaultPrim::Alone => "alone",
            DefaultPrim::Lastprim => "lastprim",
            DefaultPrim::Node(node) => node,
        },
    );
    out.attr("maxloop", service.maxloop.to_string());
    out.duration("loop_interval", service.loop_interval);
    out.attr("failover", on_off(service.failover));
    if service.boot != defaults.boot {
        out.attr("boot", choice_name(&Boot::CHOICES, service.boot));
    }
    out.duration_if("boot_delay", service.boot_delay, defaults.boot_delay);
    out.switch_if(
        "automatic_reboot",
        service.automatic_reboot,
        defaults.automatic_reboot,
    );
    if let Some(heart) = &service.heart {
        out.children.push(write_heart(heart));
    }
    if let Some(farm) = &service.farm {
        out.children.push(write_farm(farm));
    }
    if let Some(vip) = &service.vip {
        out.children.push(write_vip(vip));
    }
    if let Some(errd) = &service.errd {
        out.children.push(write_errd(errd));
    }
    if let Some(rfs) = &service.rfs {
        out.children.push(write_rfs(rfs));
    }
    if let Some(user) = &service.user {
        out.children.push(write_user(user));
    }
    if let Some(vhost) = &service.vhost {
        out.children.push(write_vhost(vhost));
    }
    if let Some(check) = &service.check {
        out.children.push(write_check(check));
    }
    if let Some(failover) = &service.failover_rules {
        out.children.push(write_failover(failover));
    }
    out
}

fn write_heart(heart: &Heart) -> Out {
    let mut out = Out::new("heart");
    out.duration("pulse", heart.pulse)
        .duration("timeout", heart.timeout);
    out.opt("port", heart.port.map(|port| port.to_string()).as_deref());
    out.switch_if("permanent_arp", heart.permanent_arp, false);
    for heartbeat in &heart.heartbeat {
        let mut element = Out::new("heartbeat");
        element
            .attr("name", &heartbeat.name)
            .opt("ident", heartbeat.ident.as_deref());
        if let Some(pulse) = heartbeat.pulse {
            element.duration("pulse", pulse);
        }
        if let Some(timeout) = heartbeat.timeout {
            element.duration("timeout", timeout);
        }
        out.children.push(element);
    }
    out
}

fn write_farm(farm: &Farm) -> Out {
    let defaults = Farm::default();
    let mut out = Out::new("farm");
    out.opt("port", farm.port.map(|port| port.to_string()).as_deref());
    out.duration_if("pulse", farm.pulse, defaults.pulse);
    if farm.mlost_count != defaults.mlost_count {
        out.attr("mlost_count", farm.mlost_count.to_string());
    }
    if farm.slost_count != defaults.slost_count {
        out.attr("slost_count", farm.slost_count.to_string());
    }
    for lan in &farm.lan {
        let mut element = Out::new("lan");
        element.attr("name", &lan.name);
        out.children.push(element);
    }
    out
}

fn write_vip(vip: &Vip) -> Out {
    let mut out = Out::new("vip");
    out.switch_if("tcpreset", vip.tcpreset, false);
    if !vip.interface_list.is_empty() {
        let mut list = Out::new("interface_list");
        list.children = vip.interface_list.iter().map(write_interface).collect();
        out.children.push(list);
    }
    if let Some(loadbalancing) = &vip.loadbalancing {
        let mut element = Out::new("loadbalancing");
        for group in &loadbalancing.group {
            let mut group_element = Out::new("group");
            group_element.attr("name", &group.name);
            if let Some(hosts) = &group.cluster {
                let mut cluster = Out::new("cluster");
                for host in hosts {
                    let mut host_element = Out::new("host");
                    host_element
                        .attr("name", &host.name)
                        .attr("power", host.power.to_string());
                    cluster.children.push(host_element);
                }
                group_element.children.push(cluster);
            }
            for rule in &group.rule {
                let mut rule_element = Out::new("rule");
                rule_element.attr("virtual_addr", rule.virtual_addr.as_deref().unwrap_or("*"));
                rule_element.attr(
                    "port",
                    rule.port
                        .map_or_else(|| "*".to_owned(), |port| port.to_string()),
                );
                rule_element.attr("proto", choice_name(&Proto::CHOICES, rule.proto));
                rule_element.attr("filter", choice_name(&Filter::CHOICES, rule.filter));
                group_element.children.push(rule_element);
            }
            element.children.push(group_element);
        }
        out.children.push(element);
    }
    out
}

fn write_interface(interface: &Interface) -> Out {
    let defaults = Interface::default();
    let mut out = Out::new("interface");
    out.attr("check", on_off(interface.check));
    out.attr("arpreroute", on_off(interface.arpreroute));
    out.duration_if("arpinterval", interface.arpinterval, defaults.arpinterval);
    out.duration_if("arpelapse", interface.arpelapse, defaults.arpelapse);
    out.opt("name", interface.name.as_deref());
    if let Some(real) = &interface.real_interface {
        let mut element = Out::new("real_interface");
        element.children = real.virtual_addr.iter().map(write_virtual_addr).collect();
        out.children.push(element);
    }
    if let Some(virtual_interface) = &interface.virtual_interface {
        let mut element = Out::new("virtual_interface");
        element.attr(
            "type",
            choice_name(&VmacType::CHOICES, virtual_interface.r#type),
        );
        element.opt("addr", virtual_interface.addr.as_deref());
        element.children = virtual_interface
            .virtual_addr
            .iter()
            .map(write_virtual_addr)
            .collect();
        out.children.push(element);
    }
    out
}

fn write_virtual_addr(addr: &VirtualAddr) -> Out {
    let mut out = Out::new("virtual_addr");
    out.attr("addr", &addr.addr)
        .attr("where", choice_name(&Where::CHOICES, addr.r#where));
    out.switch_if("check", addr.check, false);
    out.switch_if("connections", addr.connections, false);
    out.opt("netmask", addr.netmask.as_deref());
    out
}

fn write_errd(errd: &Errd) -> Out {
    let mut out = Out::new("errd");
    out.duration("polltimer", errd.polltimer);
    for proc in &errd.proc {
        let mut element = Out::new("proc");
        element
            .attr("name", &proc.name)
            .attr("atleast", proc.atleast.to_string());
        if proc.atmax != -1 {
            element.attr("atmax", proc.atmax.to_string());
        }
        element.attr(
            "action",
            match &proc.action {
                ProcAction::Stopstart => "stopstart",
                ProcAction::Restart => "restart",
                ProcAction::Stop => "stop",
                ProcAction::Noaction => "noaction",
                ProcAction::Handler(handler) => handler,
            },
        );
        element.opt("class", proc.class.as_deref());
        element.opt(
            "start_after",
            proc.start_after.map(|value| value.to_string()).as_deref(),
        );
        element
            .opt("nameregex", proc.nameregex.as_deref())
            .opt("argregex", proc.argregex.as_deref());
        if proc.service {
            element.attr("service", "yes");
        }
        element.opt("restart_services", proc.restart_services.as_deref());
        out.children.push(element);
    }
    out
}

fn write_rfs(rfs: &Rfs) -> Out {
    let defaults = Rfs::default();
    let mut out = Out::new("rfs");
    out.switch_if("mountover", rfs.mountover, defaults.mountover);
    out.attr("async", choice_name(&AsyncMode::CHOICES, rfs.r#async));
    out.attr("acl", on_off(rfs.acl));
    out.attr("nbrei", rfs.nbrei.to_string());
    out.switch_if("scripts", rfs.scripts, defaults.scripts);
    out.opt(
        "reiallowedbw",
        rfs.reiallowedbw.map(|value| value.to_string()).as_deref(),
    );
    out.duration_if("locktimeout", rfs.locktimeout, defaults.locktimeout);
    out.duration_if("sendtimeout", rfs.sendtimeout, defaults.sendtimeout);
    out.duration_if("reitimeout", rfs.reitimeout, defaults.reitimeout);
    out.duration_if("iotimeout", rfs.iotimeout, defaults.iotimeout);
    if rfs.namespacepolicy != defaults.namespacepolicy {
        out.attr("namespacepolicy", rfs.namespacepolicy.to_string());
    }
    out.duration_if("syncdelta", rfs.syncdelta, defaults.syncdelta);
    if rfs.nbremconn != defaults.nbremconn {
        out.attr("nbremconn", rfs.nbremconn.to_string());
    }
    out.duration_if(
        "replication_timeout",
        rfs.replication_timeout,
        defaults.replication_timeout,
    );
    if rfs.sync_mode != defaults.sync_mode {
        out.attr("sync_mode", choice_name(&SyncMode::CHOICES, rfs.sync_mode));
    }
    if rfs.guard != defaults.guard {
        out.attr("guard", choice_name(&RfsGuard::CHOICES, rfs.guard));
    }
    out.children = rfs.replicated.iter().map(write_replicated).collect();
    if let Some(flow) = &rfs.flow {
        let mut element = Out::new("flow");
        element.attr("name", &flow.name);
        out.children.push(element);
    }
    out
}

fn write_replicated(replicated: &Replicated) -> Out {
    let mut out = Out::new("replicated");
    out.attr("dir", &replicated.dir).attr("mode", "read_only");
    for excluded in &replicated.notreplicated {
        let mut element = Out::new("notreplicated");
        match &excluded.pattern {
            NotReplicatedPattern::Path(path) => element.attr("path", path),
            NotReplicatedPattern::Regexpath(regexpath) => element.attr("regexpath", regexpath),
        };
        out.children.push(element);
    }
    for tocheck in &replicated.tocheck {
        let mut element = Out::new("tocheck");
        element.attr("path", &tocheck.path);
        out.children.push(element);
    }
    out
}

fn write_user(user: &User) -> Out {
    let defaults = User::default();
    let mut out = Out::new("user");
    out.duration("nicestoptimeout", user.nicestoptimeout)
        .duration("forcestoptimeout", user.forcestoptimeout);
    out.attr("logging", choice_name(&Logging::CHOICES, user.logging));
    if user.userlogsize != defaults.userlogsize {
        out.attr("userlogsize", user.userlogsize.to_string());
    }
    for var in &user.var {
        let mut element = Out::new("var");
        element.attr("name", &var.name).attr("value", &var.value);
        out.children.push(element);
    }
    out
}

fn write_vhost(vhost: &Vhost) -> Out {
    let mut out = Out::new("vhost");
    for name in &vhost.virtualhostname {
        let mut element = Out::new("virtualhostname");
        element
            .attr("name", &name.name)
            .opt("envfile", name.envfile.as_deref());
        if name.when != VhostWhen::Prim {
            element.attr("when", choice_name(&VhostWhen::CHOICES, name.when));
        }
        out.children.push(element);
    }
    out
}

fn write_check(check: &Check) -> Out {
    let mut out = Out::new("check");
    out.children = check.checkers.iter().map(write_checker).collect();
    out
}

fn write_checker(checker: &Checker) -> Out {
    let defaults = Checker::new(checker.kind, None);
    let accepts = |name: &str| checker.kind.attributes().contains(&name);
    let mut out = Out::new(checker.kind.element());
    out.opt("ident", checker.ident.as_deref());
    if accepts("name") {
        out.opt("name", checker.name.as_deref());
    }
    if accepts("when") && checker.when != defaults.when {
        out.attr("when", choice_name(&When::CHOICES, checker.when));
    }
    if accepts("exec") {
        out.opt("exec", checker.exec.as_deref())
            .opt("arg", checker.arg.as_deref());
    }
    if accepts("action")
        && let Some(action) = checker.action
    {
        out.attr("action", choice_name(&CheckerAction::CHOICES, action));
    }
    if accepts("interval") {
        out.duration_if("interval", checker.interval, defaults.interval);
        out.duration_if("timeout", checker.timeout, defaults.timeout);
    }
    for target in &checker.to {
        let mut element = Out::new("to");
        element
            .opt("addr", target.addr.as_deref())
            .opt("local_addr", target.local_addr.as_deref());
        element.opt("port", target.port.map(|port| port.to_string()).as_deref());
        if checker.kind == CheckerKind::Module {
            element.switch_if("secure", target.secure, false);
        }
        if let Some(interval) = target.interval {
            element.duration("interval", interval);
        }
        if let Some(timeout) = target.timeout {
            element.duration("timeout", timeout);
        }
        out.children.push(element);
    }
    out
}

fn write_failover(failover: &Failover) -> Out {
    let defaults = Failover::default();
    let mut out = Out::new("failover");
    out.attr("extends", if failover.extends { "yes" } else { "no" });
    out.duration_if("period", failover.period, defaults.period);
    out.duration_if("handle_time", failover.handle_time, defaults.handle_time);
    out.cdata.clone_from(&failover.rules);
    out
}

impl ClusterConfig {
    /// The configuration as a `cluster.xml`.
    pub fn to_xml(&self) -> String {
        let defaults = super::cluster::Lans::default();
        let mut lans = Out::new("lans");
        lans.attr("port", self.lans.port.to_string());
        lans.duration_if("pulse", self.lans.pulse, defaults.pulse);
        if self.lans.mlost_count != defaults.mlost_count {
            lans.attr("mlost_count", self.lans.mlost_count.to_string());
        }
        if self.lans.slost_count != defaults.slost_count {
            lans.attr("slost_count", self.lans.slost_count.to_string());
        }
        for lan in &self.lans.lan {
            let mut element = Out::new("lan");
            element.attr("name", &lan.name);
            if let Some(command) = lan.command {
                element.attr("command", on_off(command));
            }
            for node in &lan.node {
                let mut node_element = Out::new("node");
                node_element
                    .attr("name", &node.name)
                    .attr("addr", &node.addr)
                    .opt("laddr", node.laddr.as_deref());
                element.children.push(node_element);
            }
            lans.children.push(element);
        }
        let mut cluster = Out::new("cluster");
        cluster.children.push(lans);
        let mut text = String::new();
        cluster.render(&mut text, 0);
        text
    }
}
