//! Fuzz target: the userconfig.xml and cluster.xml parsers, the validator and
//! the writer must never panic, whatever the input; what parses must also
//! survive a write and a second parse unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use safekit_core::config::{
    ValidationContext, parse_cluster, parse_userconfig, validate, validate_cluster,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let cluster = parse_cluster("fuzz.xml", &text).ok();
    if let Some(cluster) = &cluster {
        let _ = validate_cluster(cluster);
        let written = cluster.to_xml();
        let reparsed = parse_cluster("fuzz.xml", &written).expect("a written cluster.xml parses");
        assert_eq!(&reparsed, cluster, "cluster.xml round trip");
    }
    if let Ok(config) = parse_userconfig("fuzz.xml", &text) {
        let context = ValidationContext {
            cluster: cluster.as_ref(),
            ..ValidationContext::default()
        };
        let _ = validate(&config, &context);
        let written = config.to_xml();
        let reparsed =
            parse_userconfig("fuzz.xml", &written).expect("a written userconfig.xml parses");
        assert_eq!(reparsed, config, "userconfig.xml round trip");
    }
});
