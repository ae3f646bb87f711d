//! Tests of the operation layer on temporary directories (no mount).

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use safekit_protocol::replication::{Op, RelPath, TimeSet, Timestamp, rename_flags};

use super::ReplicaRoot;

struct Fixture {
    _tmp: tempfile::TempDir,
    inside: PathBuf,
    outside: PathBuf,
    root: ReplicaRoot,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let inside = tmp.path().join("replica");
    let outside = tmp.path().join("outside");
    fs::create_dir(&inside).expect("mkdir replica");
    fs::create_dir(&outside).expect("mkdir outside");
    fs::write(outside.join("secret"), b"do not touch").expect("write outside");
    fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let root = ReplicaRoot::open(&[&inside]).expect("open replica");
    Fixture {
        _tmp: tmp,
        inside,
        outside,
        root,
    }
}

fn p(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("valid test path")
}

fn errno_of(result: std::io::Result<()>) -> i32 {
    result
        .expect_err("operation must be refused")
        .raw_os_error()
        .expect("errno")
}

fn assert_outside_untouched(outside: &Path) {
    let secret = outside.join("secret");
    assert_eq!(fs::read(&secret).expect("read outside"), b"do not touch");
    let meta = fs::metadata(&secret).expect("stat outside");
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(
        fs::read_dir(outside).expect("list outside").count(),
        1,
        "nothing created outside"
    );
    assert!(xattr_names(&secret).is_empty(), "no xattr set outside");
}

fn xattr_names(path: &Path) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).expect("listxattr");
    buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[test]
fn namespace_operations_apply_with_exact_mode_and_owner() {
    let mut f = fixture();
    let r = &mut f.root;
    r.apply(&Op::Mkdir {
        dir: 0,
        path: p("d"),
        mode: 0o750,
        uid: 1000,
        gid: 1001,
    })
    .expect("mkdir");
    r.apply(&Op::Create {
        dir: 0,
        path: p("d/file"),
        mode: 0o4755,
        uid: 1000,
        gid: 1001,
        exclusive: true,
    })
    .expect("create");
    r.apply(&Op::Mknod {
        dir: 0,
        path: p("d/fifo"),
        mode: 0o010_640,
        rdev: 0,
        uid: 5,
        gid: 6,
    })
    .expect("mknod");
    r.apply(&Op::Symlink {
        dir: 0,
        path: p("d/link"),
        target: b"../../outside/secret".to_vec(),
        uid: 7,
        gid: 8,
    })
    .expect("symlink");
    r.apply(&Op::Link {
        dir: 0,
        existing: p("d/file"),
        new: p("hard"),
    })
    .expect("link");

    let dir_meta = fs::metadata(f.inside.join("d")).expect("stat d");
    assert!(dir_meta.is_dir());
    assert_eq!(
        (dir_meta.mode() & 0o7777, dir_meta.uid(), dir_meta.gid()),
        (0o750, 1000, 1001)
    );
    let file_meta = fs::metadata(f.inside.join("d/file")).expect("stat file");
    assert_eq!(
        (file_meta.mode() & 0o7777, file_meta.uid(), file_meta.gid()),
        (0o4755, 1000, 1001)
    );
    assert_eq!(file_meta.nlink(), 2, "hard link counted");
    let fifo_meta = fs::symlink_metadata(f.inside.join("d/fifo")).expect("stat fifo");
    assert!(fifo_meta.file_type().is_fifo());
    assert_eq!(
        (fifo_meta.mode() & 0o7777, fifo_meta.uid(), fifo_meta.gid()),
        (0o640, 5, 6)
    );
    let link_meta = fs::symlink_metadata(f.inside.join("d/link")).expect("stat link");
    assert!(link_meta.file_type().is_symlink());
    assert_eq!((link_meta.uid(), link_meta.gid()), (7, 8));
    assert_eq!(
        fs::read_link(f.inside.join("d/link")).expect("readlink"),
        Path::new("../../outside/secret")
    );

    // Exclusive create of an existing name fails; a plain create keeps the file.
    assert_eq!(
        errno_of(r.apply(&Op::Create {
            dir: 0,
            path: p("hard"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true
        })),
        libc::EEXIST
    );

    r.apply(&Op::Rename {
        dir: 0,
        from: p("hard"),
        to: p("d/file"),
        flags: rename_flags::NOREPLACE,
    })
    .expect_err("noreplace onto an existing name");
    fs::write(f.inside.join("other"), b"other").expect("write other");
    r.apply(&Op::Rename {
        dir: 0,
        from: p("other"),
        to: p("hard"),
        flags: rename_flags::EXCHANGE,
    })
    .expect("exchange");
    assert_eq!(fs::read(f.inside.join("hard")).expect("read"), b"other");
    assert_eq!(
        fs::metadata(f.inside.join("other")).expect("stat").nlink(),
        2,
        "exchanged names"
    );
    r.apply(&Op::Rename {
        dir: 0,
        from: p("other"),
        to: p("renamed"),
        flags: 0,
    })
    .expect("rename");
    assert!(f.inside.join("renamed").exists() && !f.inside.join("other").exists());

    r.apply(&Op::Unlink {
        dir: 0,
        path: p("renamed"),
    })
    .expect("unlink");
    assert_eq!(
        fs::metadata(f.inside.join("d/file")).expect("stat").nlink(),
        1
    );
    assert_eq!(
        errno_of(r.apply(&Op::Rmdir {
            dir: 0,
            path: p("d")
        })),
        libc::ENOTEMPTY
    );
    for name in ["d/file", "d/fifo", "d/link"] {
        r.apply(&Op::Unlink {
            dir: 0,
            path: p(name),
        })
        .expect("unlink");
    }
    r.apply(&Op::Rmdir {
        dir: 0,
        path: p("d"),
    })
    .expect("rmdir");
    assert_eq!(
        fs::read_dir(&f.inside)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect::<Vec<_>>(),
        ["hard"]
    );
    assert_outside_untouched(&f.outside);
}

#[test]
fn data_operations_apply_and_reuse_the_open_descriptor() {
    let mut f = fixture();
    let r = &mut f.root;
    r.apply(&Op::Create {
        dir: 0,
        path: p("data"),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    })
    .expect("create");
    for block in 0..64u64 {
        r.apply(&Op::Write {
            dir: 0,
            path: p("data"),
            offset: block * 4096,
            data: vec![block as u8; 4096],
        })
        .expect("write");
    }
    assert_eq!(r.cached_files(), 1, "one descriptor for a hot file");
    let content = fs::read(f.inside.join("data")).expect("read");
    assert_eq!(content.len(), 64 * 4096);
    assert!(
        content
            .chunks(4096)
            .enumerate()
            .all(|(i, chunk)| chunk.iter().all(|b| *b == i as u8))
    );

    r.apply(&Op::Truncate {
        dir: 0,
        path: p("data"),
        size: 10_000,
    })
    .expect("truncate");
    assert_eq!(
        fs::metadata(f.inside.join("data")).expect("stat").len(),
        10_000
    );
    // Punch a hole (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE): bytes read back as zeros.
    r.apply(&Op::Fallocate {
        dir: 0,
        path: p("data"),
        mode: 0x02 | 0x01,
        offset: 0,
        len: 4096,
    })
    .expect("punch hole");
    let content = fs::read(f.inside.join("data")).expect("read");
    assert_eq!(content.len(), 10_000);
    assert!(content[..4096].iter().all(|b| *b == 0));
    assert!(content[4096..8192].iter().all(|b| *b == 1));

    r.apply(&Op::Fsync {
        dir: 0,
        path: p("data"),
        datasync: false,
    })
    .expect("fsync");
    r.apply(&Op::Fsync {
        dir: 0,
        path: p("data"),
        datasync: true,
    })
    .expect("fdatasync");
    r.apply(&Op::Fsync {
        dir: 0,
        path: RelPath::root(),
        datasync: false,
    })
    .expect("fsync of the directory");

    // The cached descriptor is dropped on unlink: a new file under the same name gets the next write.
    r.apply(&Op::Unlink {
        dir: 0,
        path: p("data"),
    })
    .expect("unlink");
    assert_eq!(r.cached_files(), 0);
    r.apply(&Op::Create {
        dir: 0,
        path: p("data"),
        mode: 0o600,
        uid: 0,
        gid: 0,
        exclusive: true,
    })
    .expect("create again");
    r.apply(&Op::Write {
        dir: 0,
        path: p("data"),
        offset: 0,
        data: b"new".to_vec(),
    })
    .expect("write");
    assert_eq!(fs::read(f.inside.join("data")).expect("read"), b"new");
}

#[test]
fn setattr_and_xattrs_apply() {
    let mut f = fixture();
    let r = &mut f.root;
    r.apply(&Op::Create {
        dir: 0,
        path: p("f"),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    })
    .expect("create");
    let mtime = Timestamp {
        secs: 1_600_000_000,
        nanos: 123_456_789,
    };
    r.apply(&Op::SetAttr {
        dir: 0,
        path: p("f"),
        mode: Some(0o2711),
        uid: Some(42),
        gid: Some(43),
        atime: Some(TimeSet::At(Timestamp {
            secs: 1_500_000_000,
            nanos: 0,
        })),
        mtime: Some(TimeSet::At(mtime)),
    })
    .expect("setattr");
    let meta = fs::metadata(f.inside.join("f")).expect("stat");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o2711, 42, 43)
    );
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_600_000_000, 123_456_789)
    );
    assert_eq!(meta.atime(), 1_500_000_000);

    r.apply(&Op::SetXattr {
        dir: 0,
        path: p("f"),
        name: b"user.color".to_vec(),
        value: b"blue".to_vec(),
        flags: 0,
    })
    .expect("setxattr");
    let mut buf = [0u8; 16];
    let n =
        rustix::fs::lgetxattr(f.inside.join("f"), "user.color", &mut buf[..]).expect("getxattr");
    assert_eq!(&buf[..n], b"blue");
    r.apply(&Op::RemoveXattr {
        dir: 0,
        path: p("f"),
        name: b"user.color".to_vec(),
    })
    .expect("removexattr");
    assert!(xattr_names(&f.inside.join("f")).is_empty());

    // The replicated directory itself.
    r.apply(&Op::SetAttr {
        dir: 0,
        path: RelPath::root(),
        mode: Some(0o755),
        uid: None,
        gid: None,
        atime: None,
        mtime: Some(TimeSet::At(mtime)),
    })
    .expect("setattr root");
    assert_eq!(
        fs::metadata(&f.inside).expect("stat root").mtime(),
        1_600_000_000
    );
}

#[test]
fn dot_dot_and_absolute_paths_never_become_a_relpath() {
    assert!(RelPath::parse(b"../outside/secret").is_err());
    assert!(RelPath::parse(b"a/../../x").is_err());
    assert!(RelPath::parse(b"/etc/passwd").is_err());
}

#[test]
fn a_symlink_in_the_middle_of_a_path_is_not_followed() {
    // Both resolvers: openat2, and the one-component-at-a-time walk for kernels without it.
    for use_openat2 in [true, false] {
        symlink_in_the_middle(use_openat2);
    }
}

fn symlink_in_the_middle(use_openat2: bool) {
    let mut f = fixture();
    f.root.use_openat2.set(use_openat2);
    std::os::unix::fs::symlink(&f.outside, f.inside.join("escape")).expect("symlink");
    let r = &mut f.root;
    let attempts = [
        Op::Create {
            dir: 0,
            path: p("escape/new"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        },
        Op::Write {
            dir: 0,
            path: p("escape/secret"),
            offset: 0,
            data: b"pwned".to_vec(),
        },
        Op::Truncate {
            dir: 0,
            path: p("escape/secret"),
            size: 0,
        },
        Op::Unlink {
            dir: 0,
            path: p("escape/secret"),
        },
        Op::Rename {
            dir: 0,
            from: p("escape/secret"),
            to: p("stolen"),
            flags: 0,
        },
        Op::Link {
            dir: 0,
            existing: p("escape/secret"),
            new: p("stolen"),
        },
        Op::SetAttr {
            dir: 0,
            path: p("escape/secret"),
            mode: Some(0o777),
            uid: Some(1),
            gid: Some(1),
            atime: None,
            mtime: None,
        },
        Op::SetXattr {
            dir: 0,
            path: p("escape/secret"),
            name: b"user.x".to_vec(),
            value: b"1".to_vec(),
            flags: 0,
        },
        Op::Mkdir {
            dir: 0,
            path: p("escape/dir"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
        Op::Symlink {
            dir: 0,
            path: p("escape/l"),
            target: b"x".to_vec(),
            uid: 0,
            gid: 0,
        },
    ];
    for op in &attempts {
        assert_eq!(
            errno_of(r.apply(op)),
            libc::ELOOP,
            "{op:?} must be refused (openat2: {use_openat2})"
        );
    }
    assert!(!f.inside.join("stolen").exists());
    assert_outside_untouched(&f.outside);
}

#[test]
fn a_symlink_as_the_final_component_is_never_followed() {
    let mut f = fixture();
    std::os::unix::fs::symlink(f.outside.join("secret"), f.inside.join("link")).expect("symlink");
    let r = &mut f.root;
    assert_eq!(
        errno_of(r.apply(&Op::Write {
            dir: 0,
            path: p("link"),
            offset: 0,
            data: b"pwned".to_vec()
        })),
        libc::ELOOP
    );
    assert_eq!(
        errno_of(r.apply(&Op::Truncate {
            dir: 0,
            path: p("link"),
            size: 0
        })),
        libc::ELOOP
    );
    assert_eq!(
        errno_of(r.apply(&Op::Create {
            dir: 0,
            path: p("link"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: false
        })),
        libc::ELOOP
    );
    assert_eq!(
        errno_of(r.apply(&Op::Fsync {
            dir: 0,
            path: p("link"),
            datasync: false
        })),
        libc::ELOOP
    );
    // Metadata operations act on the link itself, never on its target.
    r.apply(&Op::SetAttr {
        dir: 0,
        path: p("link"),
        mode: Some(0o777),
        uid: Some(9),
        gid: Some(9),
        atime: None,
        mtime: Some(TimeSet::At(Timestamp { secs: 1, nanos: 0 })),
    })
    .expect("setattr on the link itself");
    assert_eq!(
        fs::symlink_metadata(f.inside.join("link"))
            .expect("lstat")
            .uid(),
        9
    );
    let _ = r.apply(&Op::SetXattr {
        dir: 0,
        path: p("link"),
        name: b"user.x".to_vec(),
        value: b"1".to_vec(),
        flags: 0,
    });
    r.apply(&Op::Link {
        dir: 0,
        existing: p("link"),
        new: p("link2"),
    })
    .expect("hard link to the symlink itself");
    assert!(
        fs::symlink_metadata(f.inside.join("link2"))
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_outside_untouched(&f.outside);
}

#[test]
fn a_fifo_is_never_opened_for_writing() {
    let mut f = fixture();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        f.inside.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o666),
        0,
    )
    .expect("mkfifo");
    let r = &mut f.root;
    // Would block forever (or until a reader comes) if the FIFO were opened.
    assert_eq!(
        errno_of(r.apply(&Op::Write {
            dir: 0,
            path: p("fifo"),
            offset: 0,
            data: b"x".to_vec()
        })),
        libc::EPERM
    );
    assert_eq!(
        errno_of(r.apply(&Op::Create {
            dir: 0,
            path: p("fifo"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: false
        })),
        libc::EPERM
    );
    assert_eq!(
        errno_of(r.apply(&Op::Fsync {
            dir: 0,
            path: p("fifo"),
            datasync: false
        })),
        libc::EPERM
    );
    assert_outside_untouched(&f.outside);
}

#[test]
fn an_unknown_directory_index_is_refused() {
    let mut f = fixture();
    assert_eq!(
        errno_of(f.root.apply(&Op::Unlink {
            dir: 3,
            path: p("x")
        })),
        libc::EBADF
    );
}
