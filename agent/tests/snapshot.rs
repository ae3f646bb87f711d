//! `safekit snapshot` as support uses it: a node's files (agent down) go into a
//! zip that holds every part named in its README and no secret.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use safekit_core::cluster::Persistent;

const SECRET: &str = "Zq7-known-cluster-secret-4f1e9a";
const PASSWORD: &str = "hunter2-db-password";

fn safekit(safe: &Path, var: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safekit"))
        .args(args)
        .env("SAFE", safe)
        .env("SAFEVAR", var)
        .env_remove("SAFEMODULE")
        .output()
        .expect("run safekit")
}

/// A node with module `mirror`: configuration, secret, logs and state.
fn node() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp dir");
    let safe = root.path().join("safe");
    let var = root.path().join("var");
    let module = safe.join("modules/mirror");
    fs::create_dir_all(module.join("conf")).expect("conf/");
    fs::create_dir_all(module.join("bin")).expect("bin/");
    fs::write(
        module.join("conf/userconfig.xml"),
        format!(
            "<safe>\n  <service mode=\"mirror\">\n    <user dbuser=\"app\" password=\"{PASSWORD}\"/>\n  </service>\n</safe>\n"
        ),
    )
    .expect("write userconfig.xml");
    for script in ["start_prim", "stop_prim"] {
        let path = module.join("bin").join(script);
        fs::write(&path, format!("#!/bin/sh\necho {script}\n")).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    fs::create_dir_all(var.join("cluster")).expect("cluster/");
    fs::write(
        var.join("cluster/cluster.xml"),
        "<cluster><lans port=\"4800\"><lan name=\"default\"><node name=\"node1\" addr=\"10.0.0.1\"/><node name=\"node2\" addr=\"10.0.0.2\"/></lan></lans></cluster>\n",
    )
    .expect("write cluster.xml");
    let secret = var.join("cluster/secret");
    fs::write(&secret, format!("{SECRET}\n")).expect("write secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).expect("chmod secret");

    let module_var = var.join("modules/mirror");
    fs::create_dir_all(&module_var).expect("modules/mirror/");
    fs::write(
        module_var.join("log.1"),
        "2026-11-26 09:00:00.000 W resync started: full\n2026-11-26 09:00:01.000 E older line\n",
    )
    .expect("write log.1");
    fs::write(
        module_var.join("log"),
        format!(
            "2026-11-26 10:00:00.000 E agent started\n\
             2026-11-26 10:00:01.000 W debug dump: secret={SECRET}\n\
             2026-11-26 10:00:02.000 E resync finished: 12 files\n\
             2026-11-26 10:00:03.000 E checker tcp app failed: connection refused\n"
        ),
    )
    .expect("write log");
    fs::write(
        module_var.join("userlog.ulog"),
        "start_prim\napp listening on 8080\n",
    )
    .expect("write userlog");
    let persistent = Persistent {
        up_to_date: true,
        was_primary: true,
        ..Persistent::default()
    };
    safekit_agent::persist::write_atomic(&module_var.join("state"), &persistent.encode())
        .expect("write state");
    root
}

fn unzip(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut archive =
        zip::ZipArchive::new(fs::File::open(path).expect("open zip")).expect("read zip");
    let mut entries = BTreeMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).expect("zip entry");
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read entry");
        let name = entry.name().expect("entry name").into_owned();
        entries.insert(name, bytes);
    }
    entries
}

fn text(entries: &BTreeMap<String, Vec<u8>>, name: &str) -> String {
    let bytes = entries
        .get(name)
        .unwrap_or_else(|| panic!("{name} missing from the snapshot: {:?}", entries.keys()));
    assert!(!bytes.is_empty(), "{name} is empty");
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_snapshot_holds_every_part_and_no_secret() {
    let root = node();
    let (safe, var) = (root.path().join("safe"), root.path().join("var"));
    let zip_path = root.path().join("support.zip");
    let output = safekit(
        &safe,
        &var,
        &[
            "snapshot",
            "-m",
            "mirror",
            zip_path.to_str().expect("utf-8 path"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "snapshot failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("added logs/module.log"),
        "no progress line:\n{stdout}"
    );
    let size = fs::metadata(&zip_path).expect("zip written").len();
    assert!(
        stdout.contains(&format!(
            "snapshot written to {} ({size} bytes)",
            zip_path.display()
        )),
        "no final line with path and size:\n{stdout}"
    );

    let entries = unzip(&zip_path);
    let readme = text(&entries, "README.txt");
    for name in [
        "logs/module.log",
        "logs/module.log.1",
        "logs/userlog.ulog",
        "history.txt",
        "conf/userconfig.xml",
        "conf/bin.txt",
        "conf/cluster.xml",
        "state/state.raw",
        "state/state.txt",
        "system/versions.txt",
        "system/mounts.txt",
        "system/addresses.txt",
        "live/state.txt",
    ] {
        text(&entries, name);
        assert!(readme.contains(name), "README.txt does not list {name}");
    }

    // What each part says.
    let log = text(&entries, "logs/module.log");
    assert!(log.contains("agent started") && log.contains("checker tcp app failed"));
    let history = text(&entries, "history.txt");
    assert_eq!(
        history.lines().collect::<Vec<_>>(),
        [
            "2026-11-26 09:00:00.000 W resync started: full",
            "2026-11-26 10:00:02.000 E resync finished: 12 files",
            "2026-11-26 10:00:03.000 E checker tcp app failed: connection refused",
        ]
    );
    let userconfig = text(&entries, "conf/userconfig.xml");
    assert!(
        userconfig.contains("dbuser=\"app\" password=\"REDACTED\""),
        "{userconfig}"
    );
    let bin = text(&entries, "conf/bin.txt");
    assert!(
        bin.contains("755  start_prim") && bin.contains("echo stop_prim"),
        "{bin}"
    );
    assert!(text(&entries, "conf/cluster.xml").contains("node2"));
    let state = text(&entries, "state/state.txt");
    assert!(
        state.contains("up_to_date: true") && state.contains("was_primary: true"),
        "{state}"
    );
    assert!(text(&entries, "system/versions.txt").contains(env!("CARGO_PKG_VERSION")));
    assert!(text(&entries, "system/mounts.txt").contains(" / "));
    assert!(text(&entries, "system/addresses.txt").contains("127.0.0.1"));
    assert!(text(&entries, "live/state.txt").contains("did not answer"));

    // No secret anywhere, and the secret file itself is not included.
    assert!(!entries.keys().any(|name| name.contains("secret")));
    for (name, bytes) in &entries {
        for needle in [SECRET, PASSWORD] {
            assert!(
                !bytes
                    .windows(needle.len())
                    .any(|window| window == needle.as_bytes()),
                "{name} contains {needle:?}"
            );
        }
    }
    let raw_zip = fs::read(&zip_path).expect("read zip");
    assert!(
        !raw_zip
            .windows(SECRET.len())
            .any(|w| w == SECRET.as_bytes())
    );
}

#[test]
fn a_snapshot_of_an_unknown_module_fails_in_one_line() {
    let root = node();
    let (safe, var) = (root.path().join("safe"), root.path().join("var"));
    let zip_path = root.path().join("nope.zip");
    let output = safekit(
        &safe,
        &var,
        &[
            "snapshot",
            "-m",
            "nosuch",
            zip_path.to_str().expect("utf-8 path"),
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("unknown module \"nosuch\""), "{stderr}");
    assert!(!zip_path.exists());
}
