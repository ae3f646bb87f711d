//! `safekit config check` as an operator runs it: the built binary on good and bad inputs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../core/testdata")
        .join(name)
}

fn safekit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safekit"))
        .args(args)
        .output()
        .expect("run the safekit binary")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

const CLUSTER: &str = r#"<cluster><lans port="4800">
  <lan name="default"><node name="node1" addr="192.168.1.67"/><node name="node2" addr="192.168.1.68"/></lan>
  <lan name="repli"><node name="node1" addr="10.10.0.1"/><node name="node2" addr="10.10.0.2"/></lan>
</lans></cluster>
"#;

/// Writes a module folder: conf/userconfig.xml, conf/cluster.xml, bin/<scripts>.
fn module_folder(userconfig: &str, scripts: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary directory");
    fs::create_dir_all(dir.path().join("conf")).expect("conf/");
    fs::create_dir_all(dir.path().join("bin")).expect("bin/");
    fs::write(dir.path().join("conf/userconfig.xml"), userconfig).expect("write userconfig.xml");
    fs::write(dir.path().join("conf/cluster.xml"), CLUSTER).expect("write cluster.xml");
    for script in scripts {
        let path = dir.path().join("bin").join(script);
        fs::write(&path, "#!/bin/sh\n").expect("write script");
        // Programs must be executable (a custom checker's that is not is refused).
        let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        fs::set_permissions(&path, executable).expect("chmod +x");
    }
    dir
}

#[test]
fn a_valid_module_folder_prints_its_summary_and_exits_0() {
    let module = module_folder(
        r#"<safe><service mode="mirror">
  <heart pulse="500ms" timeout="10s"><heartbeat name="default"/><heartbeat name="repli" ident="flow"/></heart>
  <vip><interface_list><interface check="on"><real_interface><virtual_addr addr="192.168.1.20" where="one_side_alias"/></real_interface></interface></interface_list></vip>
  <rfs><replicated dir="/srv/data"/><replicated dir="/srv/logs"/></rfs>
  <user/>
  <check><custom ident="app" exec="check_app"/></check>
</service></safe>"#,
        &["start_prim", "stop_prim", "check_app"],
    );
    let module_path = module.path().to_str().expect("utf-8 path");
    let output = safekit(&["config", "check", "--id", "2", module_path]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for expected in [
        "mode: mirror",
        "nodes: node1, node2",
        "vip: 192.168.1.20",
        "replicated dirs: /srv/data, /srv/logs",
        "checkers: custom.app",
        "ports (module id 2): heartbeat 8889/udp, replication 5604/tcp",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
}

#[test]
fn every_error_of_a_bad_module_is_printed_and_exit_is_1() {
    let module = module_folder(
        r#"<safe><service mode="mirror">
  <heart pulse="30s" timeout="30000"><heartbeat name="public"/></heart>
  <vip><interface_list><interface><real_interface><virtual_addr addr="172.16.0.9"/></real_interface></interface></interface_list></vip>
  <rfs><replicated dir="srv/data"/></rfs>
  <user/>
  <check><custom ident="app" exec="check_app"/></check>
</service></safe>"#,
        &["start_prim"],
    );
    let module_path = module.path().to_str().expect("utf-8 path");
    let output = safekit(&["config", "check", module_path]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let userconfig = format!("{module_path}/conf/userconfig.xml");
    let expected_lines = [
        format!(
            "{userconfig}:2:22: element <heart> attribute timeout: timeout 30s must be greater than pulse 30s"
        ),
        format!(
            "{userconfig}:2:49: element <heartbeat> attribute name: `public` is not a LAN of cluster.xml"
        ),
        format!(
            "{userconfig}:3:65: element <virtual_addr> attribute addr: virtual IP 172.16.0.9 is not in the /24 subnet"
        ),
        format!(
            "{userconfig}:4:20: element <replicated> attribute dir: `srv/data` is not an absolute path"
        ),
        format!(
            "{userconfig}:6:30: element <custom> attribute exec: `check_app` is not in the module's bin/ folder"
        ),
    ];
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected_lines.len() + 1, "{text}");
    for (line, expected) in lines.iter().zip(&expected_lines) {
        assert!(
            line.starts_with(expected.as_str()),
            "expected `{expected}...`, got `{line}`"
        );
    }
    assert_eq!(
        lines[expected_lines.len()],
        "5 error(s): the configuration must not be applied"
    );
}

#[test]
fn the_typographic_quote_sample_is_rejected_with_its_position() {
    let path = testdata("linux_mirror_typographic_quotes.xml");
    let path = path.to_str().expect("utf-8 path");
    let output = safekit(&["config", "check", path]);
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with(&format!(
            "{path}:7:17: element <heartbeat> attribute name: attribute values must be in straight quotes \" or ', found the typographic quote ”"
        )),
        "{text}"
    );
}

#[test]
fn seed_samples_pass_with_warnings_only() {
    for sample in [
        "windows_mirror_userconfig.xml",
        "windows_mirror_aws_userconfig.xml",
        "linux_mirror_userconfig.xml",
    ] {
        let output = safekit(&[
            "config",
            "check",
            testdata(sample).to_str().expect("utf-8 path"),
        ]);
        let text = stdout(&output);
        assert_eq!(output.status.code(), Some(0), "{sample}:\n{text}");
        assert!(text.contains("module: OK"), "{sample}:\n{text}");
    }
}

#[test]
fn a_cluster_xml_is_checked_on_its_own() {
    let output = safekit(&[
        "config",
        "check",
        testdata("cluster.xml").to_str().expect("utf-8 path"),
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("lan repli: node1 10.10.0.1, node2 10.10.0.2"));

    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("cluster.xml");
    fs::write(&path, r#"<cluster><lans><lan name="default"><node name="node1" addr="10.0.0.1"/></lan></lans></cluster>"#).expect("write cluster.xml");
    let output = safekit(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout(&output).contains("LAN `default` has 1 node(s): expected at least two nodes"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn a_missing_file_is_a_usage_error() {
    let output = safekit(&["config", "check", "/nonexistent/userconfig.xml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot read /nonexistent/userconfig.xml")
    );
}
