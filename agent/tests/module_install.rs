//! `safekit module install|list|uninstall` as an operator runs them, with the agent down:
//! a good package installs and replaces; every kind of broken package is refused in one
//! line and leaves the installed module byte for byte as it was.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zip::write::SimpleFileOptions;

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn safe(&self) -> PathBuf {
        self.dir.path().join("safe")
    }

    fn module(&self, name: &str) -> PathBuf {
        self.safe().join("modules").join(name)
    }

    fn safekit(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_safekit"))
            .args(args)
            .env("SAFE", self.safe())
            .env("SAFEVAR", self.dir.path().join("var"))
            .env_remove("SAFEMODULE")
            .output()
            .expect("safekit runs")
    }

    fn package(&self, name: &str, entries: &[PackageEntry]) -> PathBuf {
        let path = self.dir.path().join(name);
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).expect("create package"));
        for entry in entries {
            match entry {
                PackageEntry::File { name, mode, data } => {
                    zip.start_file(*name, SimpleFileOptions::default().unix_permissions(*mode))
                        .expect("zip entry");
                    zip.write_all(data).expect("zip data");
                }
                PackageEntry::Symlink { name, target } => {
                    zip.add_symlink(*name, *target, SimpleFileOptions::default())
                        .expect("zip symlink");
                }
            }
        }
        zip.finish().expect("zip finish");
        path
    }
}

enum PackageEntry {
    File {
        name: &'static str,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        name: &'static str,
        target: &'static str,
    },
}

fn file(name: &'static str, mode: u32, data: &[u8]) -> PackageEntry {
    PackageEntry::File {
        name,
        mode,
        data: data.to_vec(),
    }
}

fn userconfig() -> Vec<u8> {
    fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../modules/mirror/conf/userconfig.xml"))
        .expect("the shipped mirror module")
}

fn good_entries(script: &[u8]) -> Vec<PackageEntry> {
    vec![
        file("conf/userconfig.xml", 0o644, &userconfig()),
        file("conf/notes.txt", 0o600, b"operator notes\n"),
        file("bin/start_prim", 0o755, script),
        file("bin/stop_prim", 0o750, b"#!/bin/sh\nexit 0\n"),
    ]
}

/// Every file under `dir`: relative path -> (mode, content).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u32, Vec<u8>)>) {
        for entry in fs::read_dir(dir).expect("list") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            let relative = path.strip_prefix(base).expect("under base").to_path_buf();
            if meta.is_dir() {
                out.insert(relative, (meta.permissions().mode(), Vec::new()));
                walk(base, &path, out);
            } else {
                out.insert(
                    relative,
                    (meta.permissions().mode(), fs::read(&path).expect("read")),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn install_list_reinstall_refuse_broken_packages_and_uninstall() {
    let node = Node::new();
    let v1 = node.package("v1.safe", &good_entries(b"#!/bin/sh\necho v1\n"));

    let out = node.safekit(&[
        "module",
        "install",
        "-m",
        "app",
        v1.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "install: {}", text(&out.stderr));
    let module = node.module("app");
    let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(
        fs::read(module.join("conf/userconfig.xml")).expect("read"),
        userconfig()
    );
    assert_eq!(
        fs::read(module.join("bin/start_prim")).expect("read"),
        b"#!/bin/sh\necho v1\n"
    );
    assert_eq!(mode(&module.join("bin/start_prim")), 0o755);
    assert_eq!(mode(&module.join("bin/stop_prim")), 0o750);
    assert_eq!(mode(&module.join("conf/notes.txt")), 0o600);

    let out = node.safekit(&["module", "list"]);
    assert!(out.status.success(), "list: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "app\n");
    assert!(
        text(&out.stderr).contains("agent not running"),
        "{}",
        text(&out.stderr)
    );

    // Reinstall over it; the module id file the node wrote is kept.
    fs::write(module.join("conf/id"), "7\n").expect("write id");
    let v2 = node.package("v2.safe", &good_entries(b"#!/bin/sh\necho v2\n"));
    let out = node.safekit(&[
        "module",
        "install",
        "-m",
        "app",
        v2.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "reinstall: {}", text(&out.stderr));
    assert_eq!(
        fs::read(module.join("bin/start_prim")).expect("read"),
        b"#!/bin/sh\necho v2\n"
    );
    assert_eq!(
        fs::read_to_string(module.join("conf/id")).expect("id"),
        "7\n"
    );

    let before = snapshot(&node.safe());
    let not_zip = node.dir.path().join("not-zip.safe");
    fs::write(&not_zip, "this is not a zip file").expect("write");
    let broken: Vec<(&str, PathBuf, &str)> = vec![
        ("not a zip", not_zip, "not a zip file"),
        (
            "no userconfig",
            node.package(
                "nouc.safe",
                &[file("bin/start_prim", 0o755, b"#!/bin/sh\n")],
            ),
            "no conf/userconfig.xml",
        ),
        (
            "invalid config",
            node.package(
                "invalid.safe",
                &[file(
                    "conf/userconfig.xml",
                    0o644,
                    b"<safe><service mode=\"nonsense\"/></safe>",
                )],
            ),
            "invalid configuration",
        ),
        (
            "unparsable config",
            node.package(
                "garbage.safe",
                &[file("conf/userconfig.xml", 0o644, b"<safe><serv")],
            ),
            "invalid configuration",
        ),
        (
            "dot-dot",
            node.package(
                "slip.safe",
                &[
                    file("conf/userconfig.xml", 0o644, &userconfig()),
                    file("bin/../../../evil", 0o755, b"#!/bin/sh\n"),
                ],
            ),
            "leaves the module folder",
        ),
        (
            "absolute",
            node.package(
                "abs.safe",
                &[
                    file("conf/userconfig.xml", 0o644, &userconfig()),
                    file("/tmp/evil", 0o755, b"#!/bin/sh\n"),
                ],
            ),
            "absolute",
        ),
        (
            "symlink",
            node.package(
                "link.safe",
                &[
                    file("conf/userconfig.xml", 0o644, &userconfig()),
                    PackageEntry::Symlink {
                        name: "bin/start_prim",
                        target: "/etc/shadow",
                    },
                ],
            ),
            "symbolic link",
        ),
    ];
    for (what, package, reason) in &broken {
        let out = node.safekit(&[
            "module",
            "install",
            "-m",
            "app",
            package.to_str().expect("utf-8"),
        ]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains(reason), "{what}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{what}: one line: {stderr}"
        );
        assert_eq!(
            snapshot(&node.safe()),
            before,
            "{what}: the installed module changed"
        );
    }
    assert!(!node.dir.path().join("evil").exists());

    // A cluster.xml the package's config does not match (its heartbeat LAN is missing) is refused too.
    let cluster = node.dir.path().join("var/cluster/cluster.xml");
    fs::create_dir_all(cluster.parent().expect("parent")).expect("mkdir");
    fs::write(
        &cluster,
        "<cluster><lans><lan name=\"other\"><node name=\"n1\" addr=\"10.0.0.1\"/><node name=\"n2\" addr=\"10.0.0.2\"/></lan></lans></cluster>",
    )
    .expect("write cluster");
    let out = node.safekit(&[
        "module",
        "install",
        "-m",
        "app",
        v1.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("invalid configuration"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        snapshot(&node.safe()),
        before,
        "the installed module changed"
    );
    fs::remove_file(&cluster).expect("rm cluster");

    let out = node.safekit(&[
        "module",
        "install",
        "-m",
        "../x",
        v1.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1), "a name with a slash is refused");

    let out = node.safekit(&["module", "uninstall", "-m", "app"]);
    assert!(out.status.success(), "uninstall: {}", text(&out.stderr));
    assert!(!module.exists());
    assert!(
        fs::read_dir(node.safe().join("modules"))
            .expect("list")
            .next()
            .is_none()
    );
    let out = node.safekit(&["module", "list"]);
    assert!(out.status.success());
    assert_eq!(text(&out.stdout), "");
    let out = node.safekit(&["module", "uninstall", "-m", "app"]);
    assert_eq!(out.status.code(), Some(1), "uninstalling twice is refused");
}
