//! Tests of the configuration model: the seed samples, defaults, every error
//! class of parsing and validation, ports, and round-trip.

use std::time::Duration;

use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::*;

const WINDOWS_MIRROR: &str = include_str!("../../testdata/windows_mirror_userconfig.xml");
const WINDOWS_MIRROR_AWS: &str = include_str!("../../testdata/windows_mirror_aws_userconfig.xml");
const LINUX_MIRROR: &str = include_str!("../../testdata/linux_mirror_userconfig.xml");
const LINUX_TYPOGRAPHIC: &str = include_str!("../../testdata/linux_mirror_typographic_quotes.xml");
const CLUSTER: &str = include_str!("../../testdata/cluster.xml");
const FULL_MIRROR: &str = include_str!("../../testdata/full_mirror_userconfig.xml");
const FARM: &str = include_str!("../../testdata/farm_userconfig.xml");

fn parse_ok(text: &str) -> UserConfig {
    match parse_userconfig("userconfig.xml", text) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors:\n{errors}"),
    }
}

fn cluster_ok(text: &str) -> ClusterConfig {
    match parse_cluster("cluster.xml", text) {
        Ok(config) => config,
        Err(errors) => panic!("unexpected errors:\n{errors}"),
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|diagnostic| format!("{diagnostic}\n"))
        .collect()
}

/// Parses `text`; then validates it against the sample cluster.xml; renders
/// every diagnostic of whichever step reported.
fn check(text: &str, expect: Expect) {
    let rendered = match parse_userconfig("userconfig.xml", text) {
        Err(errors) => render(&errors.diagnostics),
        Ok(config) => {
            let cluster = cluster_ok(CLUSTER);
            let bin = vec![
                "start_prim".to_owned(),
                "stop_prim".to_owned(),
                "check_app".to_owned(),
            ];
            let context = ValidationContext {
                cluster: Some(&cluster),
                module_bin: Some(&bin),
                platform: None,
            };
            render(&validate(&config, &context))
        }
    };
    expect.assert_eq(&rendered);
}

fn check_cluster(text: &str, expect: Expect) {
    let rendered = match parse_cluster("cluster.xml", text) {
        Err(errors) => render(&errors.diagnostics),
        Ok(config) => render(&validate_cluster(&config)),
    };
    expect.assert_eq(&rendered);
}

/// A valid mirror module; tests replace parts of it.
const BASE: &str = r#"<safe>
<service mode="mirror">
  <heart><heartbeat name="default" ident="flow"/></heart>
  <vip><interface_list><interface check="on"><real_interface>
    <virtual_addr addr="192.168.1.20" where="one_side_alias" check="on"/>
  </real_interface></interface></interface_list></vip>
  <rfs><replicated dir="/data/app"/></rfs>
  <user/>
  RULES
</service>
</safe>"#;

fn base_with(rules: &str) -> String {
    BASE.replace("RULES", rules)
}

#[test]
fn windows_mirror_sample_parses_with_its_values() {
    let config = parse_ok(WINDOWS_MIRROR);
    let service = &config.service;
    assert_eq!(service.mode, Mode::Mirror);
    assert_eq!(service.defaultprim, DefaultPrim::Alone);
    assert_eq!(service.maxloop, 3);
    assert_eq!(service.loop_interval, Duration::from_secs(24 * 3600));
    assert!(service.failover);
    let heart = service.heart.as_ref().expect("heart");
    assert_eq!(
        (heart.pulse, heart.timeout),
        (Duration::from_millis(700), Duration::from_secs(30))
    );
    assert_eq!(heart.heartbeat[0].name, "default");
    assert_eq!(heart.heartbeat[0].ident.as_deref(), Some("flow"));
    let interface = &service.vip.as_ref().expect("vip").interface_list[0];
    assert!(interface.check && interface.arpreroute);
    let addr = &interface
        .real_interface
        .as_ref()
        .expect("real_interface")
        .virtual_addr[0];
    assert_eq!(
        (addr.addr.as_str(), addr.r#where),
        ("VIRTUAL_TO_BE_DEFINED", Where::OneSideAlias)
    );
    let errd = service.errd.as_ref().expect("errd");
    assert_eq!(errd.polltimer, Duration::from_secs(10));
    assert_eq!(errd.proc[0].name, "PROCESS_NAME");
    assert_eq!(errd.proc[0].action, ProcAction::Restart);
    assert_eq!(errd.proc[0].class.as_deref(), Some("prim"));
    let rfs = service.rfs.as_ref().expect("rfs");
    assert_eq!(
        (rfs.r#async, rfs.acl, rfs.nbrei),
        (AsyncMode::Second, false, 3)
    );
    let dirs: Vec<&str> = rfs
        .replicated
        .iter()
        .map(|replicated| replicated.dir.as_str())
        .collect();
    assert_eq!(dirs, ["c:\\test1replicated", "c:\\test2replicated"]);
    let user = service.user.as_ref().expect("user");
    assert_eq!(user.nicestoptimeout, Duration::from_secs(300));
    assert_eq!(user.logging, Logging::Userlog);
}

#[test]
fn samples_validate_with_only_the_placeholder_warning() {
    let cluster = cluster_ok(CLUSTER);
    let context = ValidationContext {
        cluster: Some(&cluster),
        ..ValidationContext::default()
    };
    expect![[r#"
        userconfig.xml:17:33: warning: element <virtual_addr> attribute addr: `VIRTUAL_TO_BE_DEFINED` is a placeholder: replace it by the virtual IP or host name of the module
    "#]]
    .assert_eq(&render(&validate(&parse_ok(WINDOWS_MIRROR), &context)));
    assert_eq!(validate(&parse_ok(WINDOWS_MIRROR_AWS), &context), vec![]);
    assert_eq!(validate(&parse_ok(LINUX_MIRROR), &context), vec![]);
    let linux = ValidationContext {
        platform: Some(Platform::Linux),
        ..context
    };
    assert_eq!(validate(&parse_ok(LINUX_MIRROR), &linux), vec![]);
    assert!(
        validate(&parse_ok(WINDOWS_MIRROR_AWS), &linux)
            .iter()
            .any(|d| d.is_error() && d.message.contains("Windows path"))
    );
}

#[test]
fn linux_mirror_sample_parses() {
    let config = parse_ok(LINUX_MIRROR);
    let rfs = config.service.rfs.as_ref().expect("rfs");
    assert!(!rfs.mountover);
    assert_eq!(rfs.replicated[0].dir, "/test1replicated");
}

#[test]
fn typographic_quotes_sample_is_rejected_with_file_line_and_column() {
    let errors = parse_userconfig("mirror/conf/userconfig.xml", LINUX_TYPOGRAPHIC)
        .expect_err("must be rejected");
    expect![[r#"
        mirror/conf/userconfig.xml:7:17: element <heartbeat> attribute name: attribute values must be in straight quotes " or ', found the typographic quote ” (U+201D, right double quotation mark)
    "#]]
    .assert_eq(&render(&errors.diagnostics));
}

#[test]
fn defaults_are_safekits() {
    let config = parse_ok(
        r#"<safe><service mode="mirror"><heart><heartbeat name="default"/></heart><rfs><replicated dir="/d"/></rfs><user/><errd><proc name="p"/></errd><failover/><check><tcp ident="t"><to addr="127.0.0.1" port="80"/></tcp><ping ident="p"><to addr="10.0.0.1"/></ping></check></service></safe>"#,
    );
    let service = &config.service;
    assert_eq!(service.defaultprim, DefaultPrim::Alone);
    assert_eq!(service.maxloop, 3);
    assert_eq!(service.loop_interval, Duration::from_secs(86_400));
    assert!(service.failover);
    assert_eq!(service.boot, Boot::Ignore);
    let heart = service.heart.as_ref().expect("heart");
    assert_eq!(heart.pulse, Duration::from_millis(700));
    assert_eq!(heart.timeout, Duration::from_millis(30_000));
    let rfs = service.rfs.as_ref().expect("rfs");
    assert_eq!(rfs.nbrei, 6);
    assert_eq!(rfs.r#async, AsyncMode::Second);
    assert!(!rfs.acl);
    assert_eq!(rfs.locktimeout, Duration::from_secs(100));
    assert_eq!(rfs.replication_timeout, Duration::from_secs(2));
    assert_eq!(rfs.sync_mode, SyncMode::Write);
    let user = service.user.as_ref().expect("user");
    assert_eq!(
        (user.nicestoptimeout, user.forcestoptimeout),
        (Duration::from_secs(300), Duration::from_secs(300))
    );
    assert_eq!(user.userlogsize, 2048);
    let errd = service.errd.as_ref().expect("errd");
    assert_eq!(errd.polltimer, Duration::from_secs(30));
    assert_eq!(
        (
            errd.proc[0].atleast,
            errd.proc[0].atmax,
            &errd.proc[0].action
        ),
        (1, -1, &ProcAction::Stopstart)
    );
    let failover = service.failover_rules.as_ref().expect("failover");
    assert_eq!(
        (failover.period, failover.handle_time),
        (Duration::from_millis(5000), Duration::from_millis(15_000))
    );
    let checkers = &service.check.as_ref().expect("check").checkers;
    assert_eq!(
        (checkers[0].interval, checkers[0].timeout),
        (Duration::from_secs(10), Duration::from_secs(5))
    );
    assert_eq!(
        (checkers[0].when, checkers[1].when),
        (When::Prim, When::Pre)
    );
    let cluster = cluster_ok(
        "<cluster><lans><lan name=\"l\"><node name=\"a\" addr=\"1.1.1.1\"/></lan></lans></cluster>",
    );
    assert_eq!(
        (cluster.lans.port, cluster.lans.pulse),
        (4800, Duration::from_millis(100))
    );
    assert_eq!(
        (cluster.lans.mlost_count, cluster.lans.slost_count),
        (20, 10)
    );
}

#[test]
fn durations_take_units_or_the_historical_unit() {
    let config = parse_ok(
        r#"<safe><service mode="mirror" loop_interval="90m0" ><heart/></service></safe>"#
            .replace(" loop_interval=\"90m0\" ", " loop_interval=\"2d\"")
            .as_str(),
    );
    assert_eq!(
        config.service.loop_interval,
        Duration::from_secs(2 * 86_400)
    );
    let config = parse_ok(
        r#"<safe><service mode="mirror"><heart pulse="1s" timeout="5000"/><errd polltimer="1500ms"/></service></safe>"#,
    );
    let heart = config.service.heart.as_ref().expect("heart");
    assert_eq!(
        (heart.pulse, heart.timeout),
        (Duration::from_secs(1), Duration::from_secs(5))
    );
    assert_eq!(
        config.service.errd.as_ref().expect("errd").polltimer,
        Duration::from_millis(1500)
    );
    check(
        r#"<safe><service mode="mirror" loop_interval="30m"><heart pulse="0"/><errd polltimer="500ms"/><user nicestoptimeout="5x"/></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:30: element <service> attribute loop_interval: `30m` is shorter than one hour, the unit of this attribute, and would round to 0
            userconfig.xml:1:57: element <heart> attribute pulse: 0 is not allowed here: expected a positive duration
            userconfig.xml:1:74: element <errd> attribute polltimer: `500ms` is shorter than one second, the unit of this attribute, and would round to 0
            userconfig.xml:1:99: element <user> attribute nicestoptimeout: `5x` is not a duration: expected a whole number in seconds, or a whole number followed by one of the units d h m s ms us (e.g. `700ms`, `30s`, `24h`)
        "#]],
    );
}

#[test]
fn module_ports_derive_from_the_id_and_can_be_overridden() {
    let id = |n| ModuleId::new(n).expect("valid id");
    assert_eq!(
        ModulePorts::for_module(id(1)),
        ModulePorts {
            heartbeat: 8888,
            replication: 5600,
            farm: 4803
        }
    );
    assert_eq!(
        ModulePorts::for_module(id(2)),
        ModulePorts {
            heartbeat: 8889,
            replication: 5604,
            farm: 4806
        }
    );
    assert_eq!(
        ModulePorts::for_module(id(ModuleId::MAX)).replication,
        65_532
    );
    assert_eq!(ModuleId::new(0), None);
    assert_eq!(ModuleId::new(ModuleId::MAX + 1), None);
    let config = parse_ok(r#"<safe><service mode="mirror"><heart port="9999"/></service></safe>"#);
    assert_eq!(
        config.ports(id(3)),
        ModulePorts {
            heartbeat: 9999,
            replication: 5608,
            farm: 4809
        }
    );
    let farm = parse_ok(
        r#"<safe><service mode="farm"><farm port="7000"><lan name="default"/></farm></service></safe>"#,
    );
    assert_eq!(farm.ports(id(1)).farm, 7000);
}

#[test]
fn all_parse_errors_are_reported_at_once() {
    check(
        r#"<safe>
<service mode="mirrror" maxloop="-1" colour="red">
  <heart pulse="700" timeout="30000"><heartbeat ident="flow"/><beat/></heart>
  <rfs nbrei="0" async="maybe" acl="perhaps"><replicated dir="/a" mode="rw"/></rfs>
  <user/><user/>
  <checks/>
</service>
</safe>"#,
        expect![[r#"
            userconfig.xml:2:10: element <service> attribute mode: `mirrror` is not valid: expected one of: mirror, farm, light
            userconfig.xml:2:25: element <service> attribute maxloop: `-1` is not valid: expected a whole number 0 or more
            userconfig.xml:2:38: element <service> attribute colour: unknown attribute `colour`: expected one of: mode, defaultprim, maxloop, loop_interval, failover, boot, boot_delay, automatic_reboot
            userconfig.xml:3:38: element <heartbeat> attribute name: missing required attribute `name`
            userconfig.xml:3:63: element <beat>: unknown element <beat> inside <heart>: expected one of: <heartbeat>
            userconfig.xml:4:8: element <rfs> attribute nbrei: `0` is not valid: expected at least 1 resync thread
            userconfig.xml:4:18: element <rfs> attribute async: `maybe` is not valid: expected one of: second, none
            userconfig.xml:4:32: element <rfs> attribute acl: `perhaps` is not a switch: expected on or off
            userconfig.xml:4:67: element <replicated> attribute mode: `rw` is not valid: expected one of: read_only
            userconfig.xml:5:10: element <user>: <user> may appear only once inside <service>
            userconfig.xml:6:3: element <checks>: unknown element <checks> inside <service>: expected one of: <heart>, <farm>, <vip>, <errd>, <rfs>, <user>, <vhost>, <check>, <failover>
        "#]],
    );
}

#[test]
fn malformed_xml_is_reported_with_its_position() {
    check(
        "<safe>\n<service mode=\"mirror\">\n</safe>",
        expect![[r#"
            userconfig.xml:3:1: malformed XML: ill-formed document: expected `</service>`, but `</safe>` was found
        "#]],
    );
    check(
        "<cluster/>",
        expect![[r#"
            userconfig.xml:1:1: element <cluster>: the root element is <cluster>: expected <safe> in a userconfig.xml
        "#]],
    );
    check(
        "<safe><service mode=\"mirror\" failover=on/></safe>",
        expect![[r#"
            userconfig.xml:1:39: element <service> attribute failover: attribute values must be in straight quotes " or ', found `o`
        "#]],
    );
}

#[test]
fn heartbeat_timeout_must_exceed_pulse() {
    check(
        r#"<safe><service mode="mirror"><heart pulse="5s" timeout="5000ms"><heartbeat name="default" pulse="1s" timeout="1s"/></heart></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:48: element <heart> attribute timeout: timeout 5s must be greater than pulse 5s (the peer is lost after `timeout` without heartbeats)
            userconfig.xml:1:102: element <heartbeat> attribute timeout: timeout 1s must be greater than pulse 1s (the peer is lost after `timeout` without heartbeats)
        "#]],
    );
}

#[test]
fn heartbeats_must_name_lans_of_cluster_xml() {
    check(
        r#"<safe><service mode="mirror"><heart><heartbeat name="public"/><heartbeat name="repli" ident="public"/></heart></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:48: element <heartbeat> attribute name: `public` is not a LAN of cluster.xml: expected one of: default, repli
            userconfig.xml:1:87: element <heartbeat> attribute ident: two heartbeats have the resource heartbeat.public: idents must be unique
        "#]],
    );
    check(
        r#"<safe><service mode="mirror"><heart/></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:30: element <heart>: expected at least one <heartbeat name="LAN"/>
        "#]],
    );
}

#[test]
fn replicated_dirs_must_be_absolute_and_disjoint() {
    check(
        &BASE.replace(
            "<rfs><replicated dir=\"/data/app\"/></rfs>",
            r#"<rfs><replicated dir="data"/><replicated dir="/data/app"/><replicated dir="/data/app/sub"/><replicated dir="/data/app/"/><replicated dir="/"/><replicated dir="C:\x"/><replicated dir="c:\X\y"><tocheck path="/abs"/></replicated></rfs>"#,
        )
        .replace("RULES", ""),
        expect![[r#"
            userconfig.xml:7:20: element <replicated> attribute dir: `data` is not an absolute path: expected /path (Linux) or c:\path (Windows)
            userconfig.xml:7:73: element <replicated> attribute dir: `/data/app/sub` and `/data/app` are nested: replicated directories must be disjoint
            userconfig.xml:7:106: element <replicated> attribute dir: `/data/app/` and `/data/app/sub` are nested: replicated directories must be disjoint
            userconfig.xml:7:106: element <replicated> attribute dir: `/data/app/` is replicated twice (same directory as `/data/app`)
            userconfig.xml:7:136: element <replicated> attribute dir: a file system root cannot be replicated: expected a directory below it
            userconfig.xml:7:181: element <replicated> attribute dir: `c:\X\y` and `C:\x` are nested: replicated directories must be disjoint
            userconfig.xml:7:203: element <tocheck> attribute path: expected a path relative to the replicated directory
        "#]],
    );
}

#[test]
fn virtual_ips_must_be_in_a_lan_subnet() {
    check(
        &base_with("").replace("192.168.1.20", "172.16.0.5"),
        expect![[r#"
            userconfig.xml:5:19: element <virtual_addr> attribute addr: virtual IP 172.16.0.5 is not in the /24 subnet of any node address of cluster.xml: a virtual IP must be on a LAN of the nodes (set `netmask` if the subnet is not /24)
        "#]],
    );
    // The repli LAN is 10.10.0.0/24; a /16 netmask widens the match.
    check(
        &base_with("").replace("192.168.1.20\"", "10.10.9.9\" netmask=\"255.255.0.0\""),
        expect![[""]],
    );
    check(
        &base_with("").replace("192.168.1.20\"", "10.10.0.9\" netmask=\"255.0.255.0\""),
        expect![[r#"
            userconfig.xml:5:36: element <virtual_addr> attribute netmask: `255.0.255.0` is not a netmask: expected e.g. 255.255.255.0 or a prefix length such as 24
        "#]],
    );
    check(
        &base_with("").replace("192.168.1.20", "vip.example.com"),
        expect![[r#"
            userconfig.xml:5:19: warning: element <virtual_addr> attribute addr: `vip.example.com` is not an IP address: it will be resolved as a host name when the module starts
        "#]],
    );
}

#[test]
fn checker_idents_are_unique_and_custom_programs_exist() {
    check(
        &base_with(
            r#"<check>
    <tcp ident="app" when="prim"><to addr="127.0.0.1" port="80"/></tcp>
    <tcp ident="app"><to addr="127.0.0.1" port="81"/></tcp>
    <ping ident="app"><to addr="192.168.1.1"/></ping>
    <custom ident="c" exec="check_app"/>
    <custom ident="d" exec="missing_checker"/>
    <splitbrain ident="witness" exec="ping" arg="192.168.1.254"/>
    <splitbrain ident="witness2" exec="ping" arg="192.168.1.253"/>
    <module name="other"><to addr="192.168.1.68"/></module>
    <intf ident="eth"><to local_addr="192.168.1.67"/></intf>
  </check>"#,
        ),
        expect![[r#"
            userconfig.xml:11:10: element <tcp> attribute ident: duplicate checker ident: resource tcp.app is defined twice
            userconfig.xml:14:23: element <custom> attribute exec: `missing_checker` is not in the module's bin/ folder: a custom checker runs a program of the module
            userconfig.xml:16:5: element <splitbrain>: only one <splitbrain> checker is allowed per module
        "#]],
    );
}

#[test]
fn rules_must_use_known_resources() {
    check(
        &base_with(
            r#"<check><custom ident="c" exec="check_app"/></check>
  <failover period="5s" handle_time="12s"><![CDATA[
    c_ok: if (custom.c == down) then restart();
    c_bad: if (custom.nope == down || remote.heartbeat.flow == up) then stopstart();
    w: if (proc.PROCESS == down && ip.192.168.1.20 == up && tcp.x == down && foo.bar == up) then wait();
  ]]><![CDATA[--Lua Rules
    Rules.disable("whatever.x")
  ]]></failover>"#,
        ),
        expect![[r#"
            userconfig.xml:10:3: element <failover>: rule uses resource `custom.nope`, but no custom resource has that id: expected one of: custom.c
            userconfig.xml:10:3: element <failover>: rule uses resource `foo.bar`, whose class `foo` is unknown: expected one of: FarmProto, cluster, connections, custom, heart, heartbeat, intf, ip, license, rfs, usersetting
            userconfig.xml:10:3: element <failover>: rule uses resource `proc.PROCESS`, whose class `proc` is unknown: expected one of: FarmProto, cluster, connections, custom, heart, heartbeat, intf, ip, license, rfs, usersetting
            userconfig.xml:10:3: element <failover>: rule uses resource `tcp.x`, whose class `tcp` is unknown: expected one of: FarmProto, cluster, connections, custom, heart, heartbeat, intf, ip, license, rfs, usersetting
            userconfig.xml:10:25: element <failover> attribute handle_time: handle_time 12s is not a multiple of period 5s
        "#]],
    );
}

#[test]
fn module_structure_rules() {
    check(
        r#"<safe><service mode="farm"><heart><heartbeat name="default"/></heart><rfs><replicated dir="/d"/></rfs><errd><proc name="p" atleast="2" atmax="1"/></errd></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:7: element <service>: a farm module needs <farm> with at least one <lan>
            userconfig.xml:1:28: element <heart>: <heart> is for mirror modules: this module is mode="farm"
            userconfig.xml:1:70: element <rfs>: <rfs> replication is for mirror modules: this module is mode="farm"
            userconfig.xml:1:103: element <errd>: <errd> needs <user> in <service> (SafeKit runs scripts and errd only with <user>)
            userconfig.xml:1:136: element <proc> attribute atmax: atmax 1 is less than atleast 2
        "#]],
    );
    check(
        r#"<safe><service mode="mirror" defaultprim="node9"><heart><heartbeat name="default"/></heart><rfs replication_timeout="30s"><replicated dir="/d"/><flow name="backbone"/></rfs></service></safe>"#,
        expect![[r#"
            userconfig.xml:1:30: element <service> attribute defaultprim: `node9` is not alone, lastprim or a node of cluster.xml (node1, node2)
            userconfig.xml:1:97: warning: element <rfs> attribute replication_timeout: replication_timeout 30s is not below the heartbeat timeout 30s: the primary would hold application writes until the peer is declared lost
            userconfig.xml:1:151: element <flow> attribute name: `backbone` is not a LAN of cluster.xml: expected one of: default, repli
        "#]],
    );
}

#[test]
fn cluster_xml_rules() {
    check_cluster(CLUSTER, expect![[""]]);
    check_cluster(
        r#"<cluster><lans port="0" pulse="fast">
  <lan name="a" command="on"><node name="n1" addr="10.0.0.1"/><node name="n1" addr="10.0.0.1"/></lan>
</lans></cluster>"#,
        expect![[r#"
            cluster.xml:1:16: element <lans> attribute port: `0` is not valid: expected a port number from 1 to 65535
            cluster.xml:1:25: element <lans> attribute pulse: `fast` is not a duration: expected a whole number in milliseconds, or a whole number followed by one of the units d h m s ms us (e.g. `700ms`, `30s`, `24h`)
        "#]],
    );
    check_cluster(
        r#"<cluster><lans>
  <lan name="a" command="on"><node name="n1" addr="10.0.0.1"/><node name="n1" addr="10.0.0.1"/></lan>
  <lan name="a" command="on"><node name="n1" addr="10.1.0.1"/><node name="n3" addr="[fe80::zz]"/></lan>
</lans></cluster>"#,
        expect![[r#"
            cluster.xml:2:69: element <node> attribute name: node `n1` appears twice on LAN `a`
            cluster.xml:2:79: element <node> attribute addr: address `10.0.0.1` is used twice on LAN `a`
            cluster.xml:3:3: element <lan>: LAN `a` has nodes {n1, n3} but LAN `a` has {n1}: node names must be identical on every LAN
            cluster.xml:3:8: element <lan> attribute name: LAN `a` is defined twice
            cluster.xml:3:17: element <lan> attribute command: only one LAN may have command="on"
            cluster.xml:3:79: element <node> attribute addr: `[fe80::zz]` is not an IPv6 address in brackets
        "#]],
    );
    check_cluster(
        r#"<cluster><lans/></cluster>"#,
        expect![[r#"
            cluster.xml:1:10: element <lans>: expected at least one <lan> holding every node
        "#]],
    );
    check_cluster(
        r#"<cluster><lans><lan name="a"><node name="n1" addr="10.0.0.1"/></lan></lans></cluster>"#,
        expect![[r#"
            cluster.xml:1:16: element <lan>: LAN `a` has 1 node(s): expected at least two nodes
        "#]],
    );
}

#[test]
fn macros_expand_in_attribute_values() {
    let config = parse_ok(
        r#"<safe><macro name="VIP" value="10.0.0.7"/><service mode="mirror"><vip><interface_list><interface><real_interface><virtual_addr addr="%VIP%"/></real_interface></interface></interface_list></vip></service></safe>"#,
    );
    let interface = &config.service.vip.as_ref().expect("vip").interface_list[0];
    assert_eq!(
        interface
            .real_interface
            .as_ref()
            .expect("real")
            .virtual_addr[0]
            .addr,
        "10.0.0.7"
    );
    assert_eq!(parse_ok(&config.to_xml()), config);
}

#[test]
fn full_sample_parses_validates_and_keeps_every_value() {
    check(FULL_MIRROR, expect![[""]]);
    let config = parse_ok(FULL_MIRROR);
    let service = &config.service;
    assert_eq!(service.defaultprim, DefaultPrim::Node("node1".to_owned()));
    assert_eq!(
        service.heart.as_ref().expect("heart").heartbeat[1].timeout,
        Some(Duration::from_secs(5))
    );
    let rfs = service.rfs.as_ref().expect("rfs");
    assert_eq!(
        (rfs.reitimeout, rfs.syncdelta),
        (Duration::from_secs(120), Duration::from_secs(300))
    );
    assert_eq!(
        rfs.replicated[0].notreplicated[1].pattern,
        NotReplicatedPattern::Regexpath(".*\\.tmp$".to_owned())
    );
    let user = service.user.as_ref().expect("user");
    assert_eq!(user.var[1].value, "192.168.1.20:5432");
    let checkers = &service.check.as_ref().expect("check").checkers;
    let resources: Vec<String> = checkers
        .iter()
        .map(|checker| format!("{}.{}", checker.kind.element(), checker.resource_ident()))
        .collect();
    assert_eq!(
        resources,
        [
            "tcp.pg",
            "ping.gw",
            "intf.eth0",
            "ip.vipcheck",
            "custom.app",
            "module.backend",
            "splitbrain.witness"
        ]
    );
    assert_eq!(checkers[6].arg.as_deref(), Some("192.168.1.254"));
    assert_eq!(
        service
            .failover_rules
            .as_ref()
            .expect("failover")
            .rules
            .len(),
        1
    );
    assert_eq!(config.ports(ModuleId::new(1).expect("id")).heartbeat, 9888);
}

#[test]
fn farm_sample_parses_and_validates() {
    check(FARM, expect![[""]]);
    let config = parse_ok(FARM);
    let vip = config.service.vip.as_ref().expect("vip");
    let virtual_interface = vip.interface_list[0]
        .virtual_interface
        .as_ref()
        .expect("virtual_interface");
    assert_eq!(virtual_interface.r#type, VmacType::VmacInvisible);
    let group = &vip.loadbalancing.as_ref().expect("loadbalancing").group[0];
    let powers: Vec<(&str, u32)> = group
        .cluster
        .iter()
        .flatten()
        .map(|host| (host.name.as_str(), host.power))
        .collect();
    assert_eq!(powers, [("node1", 1), ("node2", 64)]);
    assert_eq!(
        (group.rule[0].port, group.rule[0].proto),
        (Some(9010), Proto::Tcp)
    );
    assert_eq!(
        (group.rule[1].virtual_addr.as_deref(), group.rule[1].port),
        (None, None)
    );
    assert_eq!(config.ports(ModuleId::new(2).expect("id")).farm, 4806);
    check(
        &FARM.replace("node2\" power", "node3\" power").replace(
            "proto=\"arp\" filter=\"on_addr\"",
            "proto=\"arp\" filter=\"on_port\"",
        ),
        expect![[r#"
            userconfig.xml:20:25: element <host> attribute name: `node3` is not a node of cluster.xml: expected one of: node1, node2
            userconfig.xml:23:60: element <rule> attribute filter: proto="arp" balances on the client address: expected filter="on_addr"
        "#]],
    );
}

#[test]
fn samples_round_trip() {
    for sample in [
        WINDOWS_MIRROR,
        WINDOWS_MIRROR_AWS,
        LINUX_MIRROR,
        FARM,
        FULL_MIRROR,
    ] {
        let config = parse_ok(sample);
        let written = config.to_xml();
        assert_eq!(parse_ok(&written), config, "{written}");
    }
    let cluster = cluster_ok(CLUSTER);
    assert_eq!(cluster_ok(&cluster.to_xml()), cluster);
}

#[test]
fn writer_output_is_safekit_style() {
    expect![[r#"
        <!DOCTYPE safe>
        <safe>
           <service mode="mirror" defaultprim="alone" maxloop="3" loop_interval="1d" failover="on">
              <heart pulse="700ms" timeout="30s">
                 <heartbeat name="default" ident="flow"/>
              </heart>
              <errd polltimer="10s">
                 <proc name="PROCESS_NAME" atleast="1" action="restart" class="prim"/>
              </errd>
              <rfs mountover="off" async="second" acl="off" nbrei="3">
                 <replicated dir="/test1replicated" mode="read_only"/>
                 <replicated dir="/test2replicated" mode="read_only"/>
              </rfs>
              <user nicestoptimeout="5m" forcestoptimeout="5m" logging="userlog"/>
           </service>
        </safe>
    "#]]
    .assert_eq(&parse_ok(LINUX_MIRROR).to_xml());
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9_]{0,8}"
}

/// Free text: includes characters the writer must escape.
fn text() -> impl Strategy<Value = String> {
    "[A-Za-z0-9&<>\"'_./:-][A-Za-z0-9 &<>\"'_./:-]{0,11}"
}

fn duration_ms() -> impl Strategy<Value = Duration> {
    (1u64..100_000).prop_map(Duration::from_millis)
}

fn duration_s() -> impl Strategy<Value = Duration> {
    (1u64..100_000).prop_map(Duration::from_secs)
}

fn heart() -> impl Strategy<Value = Heart> {
    (
        duration_ms(),
        duration_ms(),
        proptest::option::of(1u16..),
        any::<bool>(),
        proptest::collection::vec(
            (
                name(),
                proptest::option::of(name()),
                proptest::option::of(duration_ms()),
            ),
            0..3,
        ),
    )
        .prop_map(|(pulse, timeout, port, permanent_arp, heartbeats)| Heart {
            pulse,
            timeout,
            port,
            permanent_arp,
            heartbeat: heartbeats
                .into_iter()
                .map(|(name, ident, pulse)| Heartbeat {
                    name,
                    ident,
                    pulse,
                    timeout: pulse.map(|p| p * 2),
                    ..Heartbeat::default()
                })
                .collect(),
            ..Heart::default()
        })
}

fn vip() -> impl Strategy<Value = Vip> {
    let addr = (
        text(),
        prop_oneof![Just(Where::OneSideAlias), Just(Where::Alias)],
        any::<bool>(),
        proptest::option::of("[0-9]{1,2}"),
    )
        .prop_map(|(addr, r#where, check, netmask)| VirtualAddr {
            addr,
            r#where,
            check,
            connections: !check,
            netmask,
            ..VirtualAddr::default()
        });
    (
        any::<bool>(),
        proptest::collection::vec(
            (
                any::<bool>(),
                duration_s(),
                proptest::option::of(name()),
                proptest::collection::vec(addr, 0..3),
                any::<bool>(),
            ),
            0..3,
        ),
    )
        .prop_map(|(tcpreset, interfaces)| Vip {
            tcpreset,
            interface_list: interfaces
                .into_iter()
                .map(|(check, arpinterval, name, addrs, virtual_mac)| Interface {
                    check,
                    arpreroute: !check,
                    arpinterval,
                    name,
                    real_interface: (!virtual_mac).then(|| RealInterface {
                        virtual_addr: addrs.clone(),
                        ..RealInterface::default()
                    }),
                    virtual_interface: virtual_mac.then(|| VirtualInterface {
                        r#type: VmacType::VmacDirected,
                        addr: None,
                        virtual_addr: addrs,
                        ..VirtualInterface::default()
                    }),
                    ..Interface::default()
                })
                .collect(),
            ..Vip::default()
        })
}

fn rfs() -> impl Strategy<Value = Rfs> {
    let pattern = prop_oneof![
        text().prop_map(NotReplicatedPattern::Path),
        text().prop_map(NotReplicatedPattern::Regexpath)
    ];
    let replicated = (
        text(),
        proptest::collection::vec(pattern, 0..2),
        proptest::collection::vec(text(), 0..2),
    )
        .prop_map(|(dir, patterns, tocheck)| Replicated {
            dir,
            notreplicated: patterns
                .into_iter()
                .map(|pattern| NotReplicated {
                    origin: Origin::default(),
                    pattern,
                })
                .collect(),
            tocheck: tocheck
                .into_iter()
                .map(|path| ToCheck {
                    path,
                    ..ToCheck::default()
                })
                .collect(),
            ..Replicated::default()
        });
    (
        any::<bool>(),
        1u32..20,
        proptest::option::of(1u32..100_000),
        duration_s(),
        0u8..=4,
        duration_ms(),
        any::<bool>(),
        proptest::collection::vec(replicated, 0..3),
        proptest::option::of(name()),
    )
        .prop_map(
            |(
                flag,
                nbrei,
                reiallowedbw,
                locktimeout,
                namespacepolicy,
                replication_timeout,
                fsync,
                replicated,
                flow,
            )| Rfs {
                r#async: if flag {
                    AsyncMode::None
                } else {
                    AsyncMode::Second
                },
                acl: flag,
                nbrei,
                mountover: !flag,
                reiallowedbw,
                locktimeout,
                namespacepolicy,
                syncdelta: Duration::from_secs(60 * u64::from(nbrei)),
                replication_timeout,
                sync_mode: if fsync {
                    SyncMode::Fsync
                } else {
                    SyncMode::Write
                },
                replicated,
                flow: flow.map(|name| Flow {
                    name,
                    ..Flow::default()
                }),
                ..Rfs::default()
            },
        )
}

fn checker() -> impl Strategy<Value = Checker> {
    let kind = proptest::sample::select(CheckerKind::ALL.to_vec());
    let when = proptest::sample::select(vec![When::Pre, When::Prim, When::Second, When::Both]);
    let action = proptest::option::of(proptest::sample::select(
        CheckerAction::CHOICES
            .iter()
            .map(|(_, action)| *action)
            .collect::<Vec<_>>(),
    ));
    (
        kind,
        name(),
        when,
        action,
        duration_s(),
        text(),
        proptest::option::of(1u16..),
        any::<bool>(),
        proptest::option::of(duration_s()),
        1usize..3,
    )
        .prop_map(
            |(kind, ident, when, action, interval, addr, port, secure, to_interval, n_to)| {
                let mut checker = Checker::new(kind, Some(ident.clone()));
                let accepts = |attribute: &str| kind.attributes().contains(&attribute);
                if accepts("when") {
                    checker.when = when;
                }
                if accepts("action") {
                    checker.action = action;
                }
                if accepts("interval") {
                    checker.interval = interval;
                }
                if accepts("exec") {
                    checker.exec = Some(ident.clone());
                    checker.arg = Some(addr.clone());
                }
                if kind == CheckerKind::Module {
                    checker.name = Some(ident);
                    checker.ident = None;
                }
                let to_attributes = kind.to_attributes();
                if !to_attributes.is_empty() {
                    checker.to = (0..n_to)
                        .map(|_| CheckerTo {
                            addr: to_attributes.contains(&"addr").then(|| addr.clone()),
                            local_addr: to_attributes.contains(&"local_addr").then(|| addr.clone()),
                            port: if kind == CheckerKind::Tcp {
                                Some(port.unwrap_or(80))
                            } else if kind == CheckerKind::Module {
                                port
                            } else {
                                None
                            },
                            secure: kind == CheckerKind::Module && secure,
                            interval: to_interval,
                            timeout: None,
                            ..CheckerTo::default()
                        })
                        .collect();
                }
                checker
            },
        )
}

fn user_config() -> impl Strategy<Value = UserConfig> {
    let service_attrs = (
        proptest::sample::select(vec![Mode::Mirror, Mode::Farm, Mode::Light]),
        prop_oneof![
            Just(DefaultPrim::Alone),
            Just(DefaultPrim::Lastprim),
            "node[0-9]".prop_map(DefaultPrim::Node)
        ],
        0u32..10,
        (0u64..100).prop_map(|hours| Duration::from_secs(hours * 3600)),
        any::<bool>(),
        proptest::sample::select(vec![Boot::On, Boot::Off, Boot::Auto, Boot::Ignore]),
    );
    let parts = (
        proptest::option::of(heart()),
        proptest::option::of(vip()),
        proptest::option::of(rfs()),
        proptest::option::of((
            duration_s(),
            proptest::collection::vec((name(), text()), 0..3),
        )),
        proptest::option::of(proptest::collection::vec(checker(), 0..4)),
        proptest::option::of((
            duration_ms(),
            proptest::collection::vec("[a-z :()=.;\n]{1,30}", 0..3),
        )),
        proptest::option::of((
            duration_s(),
            proptest::collection::vec((name(), 0u32..3, -1i32..5, text()), 0..3),
        )),
        proptest::collection::vec((name(), "[A-Za-z0-9 ._-]{0,8}"), 0..2),
    );
    (service_attrs, parts).prop_map(
        |(
            (mode, defaultprim, maxloop, loop_interval, failover, boot),
            (heart, vip, rfs, user, check, rules, errd, macros),
        )| {
            let mut service = Service {
                mode,
                defaultprim,
                maxloop,
                loop_interval,
                failover,
                boot,
                heart,
                vip,
                rfs,
                ..Service::default()
            };
            service.user = user.map(|(nicestoptimeout, vars)| User {
                nicestoptimeout,
                var: vars
                    .into_iter()
                    .map(|(name, value)| Var {
                        name,
                        value,
                        ..Var::default()
                    })
                    .collect(),
                ..User::default()
            });
            service.check = check.map(|checkers| Check {
                checkers,
                ..Check::default()
            });
            service.failover_rules = rules.map(|(period, rules)| Failover {
                period,
                handle_time: period * 3,
                rules,
                extends: false,
                ..Failover::default()
            });
            service.errd = errd.map(|(polltimer, procs)| Errd {
                polltimer,
                proc: procs
                    .into_iter()
                    .map(|(name, atleast, atmax, handler)| Proc {
                        name,
                        atleast,
                        atmax,
                        action: if atleast == 0 {
                            ProcAction::Handler(handler)
                        } else {
                            ProcAction::Restart
                        },
                        class: Some("prim".to_owned()),
                        argregex: Some("a.*".to_owned()),
                        ..Proc::default()
                    })
                    .collect(),
                ..Errd::default()
            });
            if mode == Mode::Farm {
                service.farm = Some(Farm {
                    port: Some(7000),
                    lan: vec![FarmLan {
                        name: "default".to_owned(),
                        ..FarmLan::default()
                    }],
                    ..Farm::default()
                });
                if let Some(vip) = &mut service.vip {
                    vip.loadbalancing = Some(Loadbalancing {
                        group: vec![Group {
                            name: "FarmProto".to_owned(),
                            cluster: (maxloop % 2 == 0).then(|| {
                                vec![Host {
                                    name: "node1".to_owned(),
                                    power: maxloop,
                                    ..Host::default()
                                }]
                            }),
                            rule: vec![
                                LbRule {
                                    port: Some(9010),
                                    filter: Filter::OnPort,
                                    ..LbRule::default()
                                },
                                LbRule {
                                    virtual_addr: Some("10.0.0.1".to_owned()),
                                    proto: Proto::Udp,
                                    filter: Filter::OnIpid,
                                    ..LbRule::default()
                                },
                            ],
                            ..Group::default()
                        }],
                        ..Loadbalancing::default()
                    });
                }
                service.vhost = Some(Vhost {
                    virtualhostname: vec![VirtualHostName {
                        name: "vh".to_owned(),
                        envfile: Some("env".to_owned()),
                        when: VhostWhen::Both,
                        ..VirtualHostName::default()
                    }],
                    ..Vhost::default()
                });
            }
            let r#macro = macros
                .into_iter()
                .map(|(name, value)| Macro {
                    name,
                    value,
                    ..Macro::default()
                })
                .collect();
            UserConfig {
                r#macro,
                service,
                ..UserConfig::default()
            }
        },
    )
}

fn cluster_config() -> impl Strategy<Value = ClusterConfig> {
    (
        1u16..,
        1u64..1000,
        1u32..100,
        proptest::collection::vec(
            (
                name(),
                proptest::option::of(any::<bool>()),
                proptest::collection::vec((name(), text(), proptest::option::of(text())), 0..4),
            ),
            0..3,
        ),
    )
        .prop_map(|(port, pulse, mlost_count, lans)| ClusterConfig {
            lans: Lans {
                port,
                pulse: Duration::from_millis(pulse),
                mlost_count,
                slost_count: mlost_count,
                lan: lans
                    .into_iter()
                    .map(|(name, command, nodes)| Lan {
                        name,
                        command,
                        node: nodes
                            .into_iter()
                            .map(|(name, addr, laddr)| Node {
                                name,
                                addr,
                                laddr,
                                ..Node::default()
                            })
                            .collect(),
                        ..Lan::default()
                    })
                    .collect(),
                ..Lans::default()
            },
            ..ClusterConfig::default()
        })
}

proptest! {
    #[test]
    fn userconfig_round_trips(config in user_config()) {
        let written = config.to_xml();
        let parsed = parse_userconfig("generated.xml", &written);
        prop_assert!(parsed.is_ok(), "{}\n{}", written, parsed.err().map(|errors| errors.to_string()).unwrap_or_default());
        prop_assert_eq!(parsed.ok(), Some(config), "{}", written);
    }

    #[test]
    fn cluster_round_trips(config in cluster_config()) {
        let written = config.to_xml();
        let parsed = parse_cluster("generated.xml", &written);
        prop_assert!(parsed.is_ok(), "{}\n{}", written, parsed.err().map(|errors| errors.to_string()).unwrap_or_default());
        prop_assert_eq!(parsed.ok(), Some(config), "{}", written);
    }

    #[test]
    fn parsers_never_panic(text in "(<[a-z/!?]{0,3}|[a-z =\"'”>&;%]){0,60}") {
        let _ = parse_userconfig("fuzz.xml", &text);
        let _ = parse_cluster("fuzz.xml", &text);
    }
}

#[test]
fn the_rfs_guard_extension_parses_writes_back_and_rejects_unknown_values() {
    let with = |guard: &str| {
        format!(
            r#"<safe><service mode="mirror"><heart><heartbeat name="default"/></heart><rfs{guard}><replicated dir="/d"/></rfs></service></safe>"#
        )
    };
    let guard_of = |config: &UserConfig| config.service.rfs.as_ref().expect("rfs").guard;
    assert_eq!(guard_of(&parse_ok(&with(""))), RfsGuard::Record);
    for (word, guard) in RfsGuard::CHOICES {
        let config = parse_ok(&with(&format!(r#" guard="{word}""#)));
        assert_eq!(guard_of(&config), guard);
        let written = config.to_xml();
        assert_eq!(
            written.contains(&format!(r#"guard="{word}""#)),
            guard != RfsGuard::Record,
            "only a guard other than the default is written: {written}"
        );
        assert_eq!(parse_ok(&written), config);
    }
    let errors = parse_userconfig("userconfig.xml", &with(r#" guard="refuse""#))
        .expect_err("an unknown guard is rejected");
    assert!(
        render(&errors.diagnostics)
            .contains("attribute guard: `refuse` is not valid: expected one of: record, deny, off"),
        "{}",
        render(&errors.diagnostics)
    );
}
