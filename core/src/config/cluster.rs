//! The `cluster.xml` model (nodes and their addresses on each LAN) and its parser.

use std::time::Duration;

use super::diagnostics::{ConfigErrors, Origin, sort_diagnostics};
use super::duration::TimeUnit;
use super::read::Reader;
use super::userconfig_parse::read_count;
use super::xml::{SourceFile, XmlElement, parse_document};

/// A whole `cluster.xml`: `<cluster><lans>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterConfig {
    pub origin: Origin,
    pub lans: Lans,
}

/// `<lans port pulse mlost_count slost_count>`: the cluster membership protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lans {
    pub origin: Origin,
    /// UDP port of the membership protocol; default 4800.
    pub port: u16,
    /// Historical unit: milliseconds; default 100 ms.
    pub pulse: Duration,
    pub mlost_count: u32,
    pub slost_count: u32,
    pub lan: Vec<Lan>,
}

impl Default for Lans {
    fn default() -> Self {
        Lans {
            origin: Origin::default(),
            port: 4800,
            pulse: Duration::from_millis(100),
            mlost_count: 20,
            slost_count: 10,
            lan: Vec::new(),
        }
    }
}

/// `<lan name command>`: one network and each node's address on it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Lan {
    pub origin: Origin,
    pub name: String,
    /// `command="on"` picks the LAN of distributed commands; `None`: not written.
    pub command: Option<bool>,
    pub node: Vec<Node>,
}

/// `<node name addr laddr/>`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Node {
    pub origin: Origin,
    pub name: String,
    /// The address other nodes use: an IP (IPv6 in brackets) or a host name.
    pub addr: String,
    /// The local address behind NAT.
    pub laddr: Option<String>,
}

impl ClusterConfig {
    /// The node names of the first LAN, in order (validation checks they are
    /// the same on every LAN).
    pub fn node_names(&self) -> Vec<&str> {
        self.lans
            .lan
            .first()
            .map(|lan| lan.node.iter().map(|node| node.name.as_str()).collect())
            .unwrap_or_default()
    }

    /// The LAN named `name`.
    pub fn lan(&self, name: &str) -> Option<&Lan> {
        self.lans.lan.iter().find(|lan| lan.name == name)
    }
}

/// Parses a `cluster.xml`.
///
/// # Errors
/// Every syntax, shape and type problem found. Cross-checks (two nodes, same
/// names on every LAN) are [`super::validate::validate_cluster`]'s job.
pub fn parse_cluster(file_name: &str, text: &str) -> Result<ClusterConfig, ConfigErrors> {
    let mut source = SourceFile::new(file_name, text);
    let root = parse_document(&mut source, text);
    let config = root.map(|root| {
        let mut reader = Reader::new(&mut source);
        read_cluster(&mut reader, &root)
    });
    let mut diagnostics = source.diagnostics;
    sort_diagnostics(&mut diagnostics);
    match config {
        Some(config) if !diagnostics.iter().any(|diagnostic| diagnostic.is_error()) => Ok(config),
        _ => Err(ConfigErrors { diagnostics }),
    }
}

fn read_cluster(reader: &mut Reader<'_, '_>, root: &XmlElement) -> ClusterConfig {
    let mut config = ClusterConfig {
        origin: reader.origin(root),
        ..ClusterConfig::default()
    };
    if root.name != "cluster" {
        reader.element_error(
            root,
            format!(
                "the root element is <{}>: expected <cluster> in a cluster.xml",
                root.name
            ),
        );
        return config;
    }
    reader.expect_shape(root, &[], &["lans"], false);
    let Some(lans) = reader.singleton(root, "lans") else {
        reader.element_error(
            root,
            "missing <lans>: expected <lans> with at least one <lan>",
        );
        return config;
    };
    reader.expect_shape(
        lans,
        &["port", "pulse", "mlost_count", "slost_count"],
        &["lan"],
        false,
    );
    let defaults = Lans::default();
    let port: u16 = reader.number(lans, "port", defaults.port, "a port number from 1 to 65535");
    if port == 0 {
        reader.attribute_error(
            lans,
            "port",
            "`0` is not valid: expected a port number from 1 to 65535",
        );
    }
    let lan = Reader::children(lans, "lan")
        .map(|lan| {
            reader.expect_shape(lan, &["name", "command"], &["node"], false);
            let command = reader
                .string(lan, "command")
                .map(|_| reader.switch(lan, "command", false));
            let node = Reader::children(lan, "node")
                .map(|node| {
                    reader.expect_shape(node, &["name", "addr", "laddr"], &[], false);
                    Node {
                        origin: reader.origin(node),
                        name: reader.required_nonempty(node, "name"),
                        addr: reader.required_nonempty(node, "addr"),
                        laddr: reader.string(node, "laddr"),
                    }
                })
                .collect();
            Lan {
                origin: reader.origin(lan),
                name: reader.required_nonempty(lan, "name"),
                command,
                node,
            }
        })
        .collect();
    config.lans = Lans {
        origin: reader.origin(lans),
        port: if port == 0 { defaults.port } else { port },
        pulse: reader.duration(lans, "pulse", TimeUnit::Milliseconds, false, defaults.pulse),
        mlost_count: read_count(reader, lans, "mlost_count", defaults.mlost_count),
        slost_count: read_count(reader, lans, "slost_count", defaults.slost_count),
        lan,
    };
    config
}
