//! The replication stream end to end on loopback: a sender and a receiver on two temporary
//! directories, no mount. The primary's local operations are applied with the same
//! operation layer the FUSE file system would use, then shipped.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use safekit_linux_helper::apply::ReplicaRoot;
use safekit_linux_helper::dirty::DirtyLog;
use safekit_linux_helper::replicator::{ReplicateOutcome, Replicator, WaitFor};
use safekit_linux_helper::transport::{Receiver, ReplicationEvent, Role, Sender, SenderConfig};
use safekit_protocol::auth::{self, Challenge, Hello, PROTOCOL_VERSION, Proof};
use safekit_protocol::frame::{FrameDecoder, Kind, Message, encode, encode_raw};
use safekit_protocol::replication::{Op, RelPath, TimeSet, Timestamp, TouchedFile, rename_flags};

const SECRET: &[u8] = b"cluster secret for tests";
const MODULE: &str = "mirror";
/// Generous wait for things that happen asynchronously (a connection, a counter).
const PATIENCE: Duration = Duration::from_secs(20);

struct Node {
    _tmp: tempfile::TempDir,
    primary: PathBuf,
    replica: PathBuf,
    outside: PathBuf,
    dirty_path: PathBuf,
    local: ReplicaRoot,
}

fn node() -> Node {
    let tmp = tempfile::tempdir().expect("tempdir");
    let primary = tmp.path().join("primary");
    let replica = tmp.path().join("replica");
    let outside = tmp.path().join("outside");
    for dir in [&primary, &replica, &outside] {
        fs::create_dir(dir).expect("mkdir");
    }
    fs::write(outside.join("secret"), b"do not touch").expect("write outside");
    let local = ReplicaRoot::open(&[&primary]).expect("open primary");
    let dirty_path = tmp.path().join("dirty.log");
    Node {
        _tmp: tmp,
        primary,
        replica,
        outside,
        dirty_path,
        local,
    }
}

fn receiver(node: &Node, secret: &[u8]) -> Receiver {
    let root = ReplicaRoot::open(&[&node.replica]).expect("open replica");
    Receiver::bind("127.0.0.1:0", secret, MODULE, root).expect("bind receiver")
}

fn sender(
    node: &Node,
    peer: SocketAddr,
    secret: &[u8],
    timeout: Duration,
) -> (Sender, mpsc::Receiver<ReplicationEvent>) {
    sender_with(node, peer, secret, timeout, |_| {})
}

fn sender_with(
    node: &Node,
    peer: SocketAddr,
    secret: &[u8],
    timeout: Duration,
    adjust: impl FnOnce(&mut SenderConfig),
) -> (Sender, mpsc::Receiver<ReplicationEvent>) {
    let dirty = Arc::new(DirtyLog::open(&node.dirty_path).expect("open dirty log"));
    let mut config = SenderConfig::new(peer, secret, MODULE, dirty);
    config.replication_timeout = timeout;
    config.reconnect_interval = Duration::from_millis(50);
    adjust(&mut config);
    let sender = Sender::new(config).expect("start sender");
    let events = sender.subscribe();
    (sender, events)
}

fn wait_connected(events: &mpsc::Receiver<ReplicationEvent>) {
    match events.recv_timeout(PATIENCE) {
        Ok(ReplicationEvent::Connected { .. }) => {}
        other => panic!("expected a connection, got {other:?}"),
    }
}

fn p(path: &str) -> RelPath {
    RelPath::parse(path.as_bytes()).expect("valid test path")
}

/// Does what the FUSE layer does: the local operation, then the replication.
fn both(node: &mut Node, sender: &Sender, op: Op, wait_for: WaitFor) -> ReplicateOutcome {
    node.local
        .apply(&op)
        .unwrap_or_else(|error| panic!("local {op:?}: {error}"));
    sender.replicate(op, wait_for)
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    nlink: u64,
    rdev: u64,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    content: Vec<u8>,
}

fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(path, &mut names[..]).expect("listxattr");
    names[..n]
        .split(|b| *b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let mut value = vec![0u8; 64 * 1024];
            let len = rustix::fs::lgetxattr(path, name, &mut value[..]).expect("getxattr");
            (name.to_vec(), value[..len].to_vec())
        })
        .collect()
}

/// Every entry beneath `root` (and `root` itself as ""), with what a user would compare.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut entries = BTreeMap::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).expect("lstat");
        let file_type = meta.file_type();
        let (kind, content) = if file_type.is_dir() {
            for child in fs::read_dir(&path).expect("readdir") {
                todo.push(rel.join(child.expect("entry").file_name()));
            }
            ("dir", Vec::new())
        } else if file_type.is_symlink() {
            (
                "symlink",
                fs::read_link(&path)
                    .expect("readlink")
                    .into_os_string()
                    .into_encoded_bytes(),
            )
        } else if file_type.is_file() {
            ("file", fs::read(&path).expect("read"))
        } else if file_type.is_fifo() {
            ("fifo", Vec::new())
        } else {
            ("special", Vec::new())
        };
        entries.insert(
            rel,
            Entry {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: if kind == "dir" { 0 } else { meta.size() },
                mtime: (meta.mtime(), meta.mtime_nsec()),
                nlink: meta.nlink(),
                rdev: meta.rdev(),
                xattrs: if kind == "symlink" {
                    BTreeMap::new()
                } else {
                    xattrs(&path)
                },
                content,
            },
        );
    }
    entries
}

fn at(secs: i64) -> Option<TimeSet> {
    Some(TimeSet::At(Timestamp { secs, nanos: 500 }))
}

#[test]
fn a_mixed_sequence_gives_identical_trees() {
    let mut node = node();
    let receiver = receiver(&node, SECRET);
    let (sender, events) = sender(
        &node,
        receiver.local_addr(),
        SECRET,
        Duration::from_secs(10),
    );
    wait_connected(&events);

    let big: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let ops = vec![
        Op::Mkdir {
            dir: 0,
            path: p("d"),
            mode: 0o2775,
            uid: 1000,
            gid: 1001,
        },
        Op::Mkdir {
            dir: 0,
            path: p("d/sub"),
            mode: 0o700,
            uid: 1002,
            gid: 1002,
        },
        Op::Create {
            dir: 0,
            path: p("d/file"),
            mode: 0o640,
            uid: 1000,
            gid: 1001,
            exclusive: true,
        },
        Op::Write {
            dir: 0,
            path: p("d/file"),
            offset: 0,
            data: big.clone(),
        },
        Op::Write {
            dir: 0,
            path: p("d/file"),
            offset: 4096,
            data: vec![7; 4096],
        },
        Op::Create {
            dir: 0,
            path: p("sparse"),
            mode: 0o600,
            uid: 0,
            gid: 0,
            exclusive: true,
        },
        Op::Write {
            dir: 0,
            path: p("sparse"),
            offset: 10 << 20,
            data: b"tail".to_vec(),
        },
        Op::Fallocate {
            dir: 0,
            path: p("d/file"),
            mode: 0x01 | 0x02,
            offset: 8192,
            len: 65536,
        },
        Op::Truncate {
            dir: 0,
            path: p("d/file"),
            size: 900_000,
        },
        Op::Symlink {
            dir: 0,
            path: p("d/link"),
            target: b"file".to_vec(),
            uid: 1000,
            gid: 1001,
        },
        Op::Link {
            dir: 0,
            existing: p("d/file"),
            new: p("d/sub/hard"),
        },
        Op::Mknod {
            dir: 0,
            path: p("fifo"),
            mode: 0o010_620,
            rdev: 0,
            uid: 3,
            gid: 4,
        },
        Op::Create {
            dir: 0,
            path: p("a"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        },
        Op::Write {
            dir: 0,
            path: p("a"),
            offset: 0,
            data: b"content of a".to_vec(),
        },
        Op::Create {
            dir: 0,
            path: p("b"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        },
        Op::Write {
            dir: 0,
            path: p("b"),
            offset: 0,
            data: b"content of b".to_vec(),
        },
        Op::Rename {
            dir: 0,
            from: p("a"),
            to: p("b"),
            flags: rename_flags::EXCHANGE,
        },
        Op::Rename {
            dir: 0,
            from: p("b"),
            to: p("d/sub/moved"),
            flags: rename_flags::NOREPLACE,
        },
        Op::Create {
            dir: 0,
            path: p("gone"),
            mode: 0o644,
            uid: 0,
            gid: 0,
            exclusive: true,
        },
        Op::Unlink {
            dir: 0,
            path: p("gone"),
        },
        Op::Mkdir {
            dir: 0,
            path: p("empty"),
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
        Op::Rmdir {
            dir: 0,
            path: p("empty"),
        },
        Op::SetAttr {
            dir: 0,
            path: p("a"),
            mode: Some(0o4711),
            uid: Some(5),
            gid: Some(6),
            atime: None,
            mtime: None,
        },
        Op::SetXattr {
            dir: 0,
            path: p("a"),
            name: b"user.one".to_vec(),
            value: b"1".to_vec(),
            flags: 0,
        },
        Op::SetXattr {
            dir: 0,
            path: p("d"),
            name: b"user.two".to_vec(),
            value: vec![0, 1, 2],
            flags: 0,
        },
        Op::SetXattr {
            dir: 0,
            path: p("a"),
            name: b"user.gone".to_vec(),
            value: b"x".to_vec(),
            flags: 0,
        },
        Op::RemoveXattr {
            dir: 0,
            path: p("a"),
            name: b"user.gone".to_vec(),
        },
    ];
    for op in ops {
        assert_eq!(
            both(&mut node, &sender, op, WaitFor::Applied),
            ReplicateOutcome::Confirmed
        );
    }
    // Queued writes (the fsync-only mode) followed by an fsync that waits for durability.
    for block in 0..32u64 {
        let op = Op::Write {
            dir: 0,
            path: p("sparse"),
            offset: block * 4096,
            data: vec![block as u8; 4096],
        };
        assert_eq!(
            both(&mut node, &sender, op, WaitFor::Queued),
            ReplicateOutcome::Queued
        );
    }
    let fsync = Op::Fsync {
        dir: 0,
        path: p("sparse"),
        datasync: false,
    };
    assert_eq!(
        both(&mut node, &sender, fsync, WaitFor::Durable),
        ReplicateOutcome::Confirmed
    );
    // An O_SYNC write: the sender ships an fsync right behind it and waits for that one.
    let ops_before = sender.stats().ops;
    let sync_write = Op::Write {
        dir: 0,
        path: p("sparse"),
        offset: 0,
        data: b"osync".to_vec(),
    };
    assert_eq!(
        both(&mut node, &sender, sync_write, WaitFor::Durable),
        ReplicateOutcome::Confirmed
    );
    assert_eq!(
        sender.stats().ops,
        ops_before + 2,
        "the write and its fsync"
    );

    // Writes and creations stamp the receiver's own clock; the FUSE layer ships the
    // primary's times with SetAttr, as here (children before their directories).
    for (path, secs) in [
        ("d/sub/moved", 1_000),
        ("d/sub/hard", 1_001),
        ("d/link", 1_002),
        ("d/sub", 1_003),
        ("d", 1_004),
        ("sparse", 1_005),
        ("fifo", 1_006),
        ("a", 1_007),
        ("", 1_008),
    ] {
        let op = Op::SetAttr {
            dir: 0,
            path: p(path),
            mode: None,
            uid: None,
            gid: None,
            atime: at(secs),
            mtime: at(secs),
        };
        assert_eq!(
            both(&mut node, &sender, op, WaitFor::Applied),
            ReplicateOutcome::Confirmed
        );
    }

    let primary = snapshot(&node.primary);
    let replica = snapshot(&node.replica);
    assert_eq!(
        primary.len(),
        10,
        "the sequence built the expected tree: {:?}",
        primary.keys()
    );
    for (path, entry) in &primary {
        assert_eq!(replica.get(path), Some(entry), "{} differs", path.display());
    }
    assert_eq!(
        primary.keys().collect::<Vec<_>>(),
        replica.keys().collect::<Vec<_>>()
    );
    let stats = sender.stats();
    assert_eq!(
        (stats.in_flight_ops, stats.apply_errors, stats.peer_losses),
        (0, 0, 0)
    );
    assert_eq!(receiver.stats().apply_errors, 0);
}

/// The client side of the handshake, by hand, so a test can then send what it likes.
fn raw_client(addr: SocketAddr, secret: &[u8]) -> (TcpStream, FrameDecoder, Message) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut decoder = FrameDecoder::new();
    let client_nonce = [9u8; 32];
    let hello = Message::Hello(Hello {
        module: MODULE.into(),
        version: PROTOCOL_VERSION,
        client_nonce,
    });
    stream
        .write_all(&encode(0, &hello).expect("encode"))
        .expect("send hello");
    let Message::Challenge(Challenge { server_nonce, .. }) =
        read_message(&mut stream, &mut decoder)
    else {
        panic!("expected a challenge");
    };
    let client_proof =
        auth::client_proof(secret, MODULE, &client_nonce, &server_nonce).expect("proof");
    stream
        .write_all(&encode(0, &Message::Proof(Proof { client_proof })).expect("encode"))
        .expect("send proof");
    let answer = read_message(&mut stream, &mut decoder);
    (stream, decoder, answer)
}

fn read_message(stream: &mut TcpStream, decoder: &mut FrameDecoder) -> Message {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next_frame().expect("valid frame from the receiver") {
            return frame.message;
        }
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "connection closed while a message was expected");
        decoder.push(&buf[..n]);
    }
}

/// Reads until the receiver closes the connection; returns the messages seen on the way.
fn read_until_closed(stream: &mut TcpStream) -> Vec<Message> {
    let mut decoder = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    let mut messages = Vec::new();
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return messages,
            Ok(n) => decoder.push(&buf[..n]),
        }
        while let Ok(Some(frame)) = decoder.next_frame() {
            messages.push(frame.message);
        }
    }
}

fn create_op(path: &str) -> Op {
    Op::Create {
        dir: 0,
        path: p(path),
        mode: 0o644,
        uid: 0,
        gid: 0,
        exclusive: true,
    }
}

fn replica_names(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(&node.replica)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
        .collect();
    names.sort();
    names
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < PATIENCE, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_wrong_secret_is_refused_and_nothing_is_applied() {
    let node = node();
    let receiver = receiver(&node, SECRET);

    // A client that does not know the secret gets Refused, and what it sends next is ignored.
    let (mut stream, _decoder, answer) = raw_client(receiver.local_addr(), b"a wrong secret");
    assert!(matches!(answer, Message::Refused(_)), "got {answer:?}");
    let _ = stream.write_all(&encode(1, &Message::Op(create_op("intruder"))).expect("encode"));
    read_until_closed(&mut stream);
    wait_until("the refusal is counted", || {
        receiver.stats().connections_refused >= 1
    });

    // Our own sender with a wrong secret refuses the receiver (it cannot prove the secret either)
    // and answers Alone after its timeout, with the file recorded.
    let (sender, _events) = sender(
        &node,
        receiver.local_addr(),
        b"another wrong secret",
        Duration::from_millis(300),
    );
    assert_eq!(
        sender.replicate(create_op("never"), WaitFor::Applied),
        ReplicateOutcome::Alone
    );
    wait_until("the second refusal is counted", || {
        receiver.stats().connections_refused >= 2
    });
    assert_eq!(receiver.stats().connections_accepted, 0);
    assert_eq!(receiver.stats().ops_applied, 0);
    assert!(
        replica_names(&node).is_empty(),
        "nothing applied: {:?}",
        replica_names(&node)
    );
    assert!(sender.dirty_log().contains(0, &p("never")));
}

#[test]
fn random_bytes_and_truncated_frames_are_refused_and_files_unchanged() {
    let node = node();
    let receiver = receiver(&node, SECRET);

    // Random bytes instead of a Hello: closed without an answer.
    let mut stream = TcpStream::connect(receiver.local_addr()).expect("connect");
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = stream.write_all(&noise);
    assert_eq!(read_until_closed(&mut stream), vec![]);

    // A truncated Hello, then the client gives up.
    let mut stream = TcpStream::connect(receiver.local_addr()).expect("connect");
    let hello = encode(
        0,
        &Message::Hello(Hello {
            module: MODULE.into(),
            version: PROTOCOL_VERSION,
            client_nonce: [1; 32],
        }),
    )
    .expect("encode");
    stream.write_all(&hello[..hello.len() / 2]).expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(read_until_closed(&mut stream), vec![]);

    // Authenticated, then a good operation, a corrupted one and one after it: only the first is applied.
    let (mut stream, _decoder, answer) = raw_client(receiver.local_addr(), SECRET);
    assert_eq!(answer, Message::Welcome);
    stream
        .write_all(&encode(1, &Message::Op(create_op("good"))).expect("encode"))
        .expect("write");
    let mut corrupted = encode(2, &Message::Op(create_op("corrupted"))).expect("encode");
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0x40;
    stream.write_all(&corrupted).expect("write");
    let _ = stream.write_all(&encode(3, &Message::Op(create_op("after"))).expect("encode"));
    let answers = read_until_closed(&mut stream);
    assert!(
        answers
            .iter()
            .all(|m| matches!(m, Message::Ack(ack) if ack.seq == 1)),
        "only op 1 acknowledged: {answers:?}"
    );
    assert_eq!(replica_names(&node), vec!["good".to_owned()]);

    // Authenticated, then a truncated operation and close: not applied.
    let (mut stream, _decoder, _) = raw_client(receiver.local_addr(), SECRET);
    let frame = encode(1, &Message::Op(create_op("truncated"))).expect("encode");
    stream.write_all(&frame[..frame.len() - 3]).expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert_eq!(read_until_closed(&mut stream), vec![]);
    assert_eq!(replica_names(&node), vec!["good".to_owned()]);
    assert!(receiver.stats().protocol_errors >= 1);
    assert_eq!(
        fs::read(node.outside.join("secret")).expect("read"),
        b"do not touch"
    );
}

#[test]
fn a_frame_with_an_escaping_path_is_refused() {
    let node = node();
    let receiver = receiver(&node, SECRET);
    std::os::unix::fs::symlink(&node.outside, node.replica.join("link")).expect("symlink");

    // `..` can only arrive as a forged body: take a valid one and rewrite the component.
    let body = postcard::to_allocvec(&Op::Unlink {
        dir: 0,
        path: p("xx/outside/secret"),
    })
    .expect("encode");
    let at = body.windows(2).position(|w| w == b"xx").expect("component");
    let mut forged = body.clone();
    forged[at..at + 2].copy_from_slice(b"..");
    let (mut stream, _decoder, _) = raw_client(receiver.local_addr(), SECRET);
    stream
        .write_all(&encode_raw(Kind::Op, 1, forged).expect("frame"))
        .expect("write");
    assert_eq!(
        read_until_closed(&mut stream),
        vec![],
        "closed without acknowledging"
    );

    // An absolute path cannot even be built; a symlink escape is refused with an error report.
    assert!(RelPath::parse(b"/etc/passwd").is_err());
    let (mut stream, _decoder, _) = raw_client(receiver.local_addr(), SECRET);
    let escape = Op::Write {
        dir: 0,
        path: p("link/secret"),
        offset: 0,
        data: b"pwned".to_vec(),
    };
    stream
        .write_all(&encode(1, &Message::Op(escape)).expect("encode"))
        .expect("write");
    stream
        .write_all(&encode(2, &Message::Bye).expect("encode"))
        .expect("write");
    let answers = read_until_closed(&mut stream);
    assert!(
        answers
            .iter()
            .any(|m| matches!(m, Message::ApplyFailed(f) if f.errno == libc::ELOOP)),
        "symlink escape reported: {answers:?}"
    );
    assert_eq!(
        fs::read(node.outside.join("secret")).expect("read"),
        b"do not touch"
    );
    assert_eq!(fs::read_dir(&node.outside).expect("list").count(), 1);
}

/// A receiver that also answers durable barriers (as the agent's do).
fn serving_receiver(node: &Node) -> Receiver {
    let dir = rustix::fs::open(
        &node.replica,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .expect("open the replica");
    Receiver::bind_serving_resync("127.0.0.1:0", SECRET, MODULE, vec![dir]).expect("bind receiver")
}

/// A receiver answering durable barriers, and a sender to it asking one every
/// `durable_interval`, connected.
fn connected_to_serving(
    node: &Node,
    timeout: Duration,
    durable_interval: Duration,
) -> (Receiver, Sender, mpsc::Receiver<ReplicationEvent>) {
    let receiver = serving_receiver(node);
    let (sender, events) = sender_with(node, receiver.local_addr(), SECRET, timeout, |config| {
        config.durable_interval = durable_interval;
    });
    wait_connected(&events);
    (receiver, sender, events)
}

#[test]
fn a_receiver_that_goes_away_mid_stream_leaves_every_touched_file_recorded() {
    let mut node = node();
    let timeout = Duration::from_millis(500);
    let (receiver, sender, events) =
        connected_to_serving(&node, timeout, Duration::from_millis(50));
    assert_eq!(
        both(&mut node, &sender, create_op("before"), WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    // Once a durable barrier covered it, "before" is on the peer's disk.
    wait_until("the peer made the first file durable", || {
        sender.stats().undurable_files == 0
    });
    for writer in 0..4 {
        let op = create_op(&format!("busy{writer}"));
        assert_eq!(
            both(&mut node, &sender, op, WaitFor::Applied),
            ReplicateOutcome::Confirmed
        );
    }

    let sender = Arc::new(sender);
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let sender = Arc::clone(&sender);
            std::thread::spawn(move || {
                let path = p(&format!("busy{writer}"));
                let mut longest = Duration::ZERO;
                for block in 0u64.. {
                    let op = Op::Write {
                        dir: 0,
                        path: path.clone(),
                        offset: block * 4096,
                        data: vec![1; 4096],
                    };
                    let start = Instant::now();
                    let outcome = sender.replicate(op, WaitFor::Applied);
                    longest = longest.max(start.elapsed());
                    if outcome == ReplicateOutcome::Alone {
                        return longest;
                    }
                }
                unreachable!("the loop only ends by returning")
            })
        })
        .collect();
    wait_until("writes flow", || sender.stats().ops > 100);
    drop(receiver);
    for writer in writers {
        let longest = writer.join().expect("writer thread");
        // The promise to applications: bounded by the timeout plus one dirty-log sync.
        assert!(
            longest < timeout + Duration::from_secs(2),
            "a replicate() call waited {longest:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReplicationEvent::PeerLost { .. }))
    );
    assert_eq!(sender.stats().role, Role::Alone);

    // Alone: answered at once, the file recorded once.
    assert_eq!(
        sender.replicate(create_op("while-alone"), WaitFor::Applied),
        ReplicateOutcome::Alone
    );
    let loaded = DirtyLog::load(&node.dirty_path).expect("load dirty log");
    let recorded: Vec<String> = loaded
        .files
        .iter()
        .map(|f: &TouchedFile| String::from_utf8_lossy(&f.path.to_bytes()).into_owned())
        .collect();
    for name in ["busy0", "busy1", "busy2", "busy3", "while-alone"] {
        assert!(
            recorded.iter().any(|r| r == name),
            "{name} missing from the dirty log: {recorded:?}"
        );
    }
    assert!(
        !recorded.iter().any(|r| r == "before"),
        "an acknowledged file a durable barrier covered is not dirty"
    );
    assert!(
        sender.stats().ops > 100,
        "the writers were interrupted mid-stream"
    );
}

#[test]
fn an_acknowledged_write_not_yet_durable_on_the_peer_is_recorded_when_the_peer_is_lost() {
    let mut node = node();
    // No durable barrier before the loss: the peer may have the write only in
    // its page cache, which a power loss empties.
    let (receiver, sender, _events) =
        connected_to_serving(&node, Duration::from_millis(500), Duration::from_secs(3600));
    assert_eq!(
        both(&mut node, &sender, create_op("acked"), WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    let write = Op::Write {
        dir: 0,
        path: p("acked"),
        offset: 0,
        data: b"in the peer's page cache".to_vec(),
    };
    assert_eq!(
        both(&mut node, &sender, write, WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    assert_eq!(sender.stats().undurable_files, 1);
    drop(receiver);
    wait_until("the peer is lost", || sender.stats().role == Role::Alone);
    let recorded: Vec<String> = DirtyLog::load(&node.dirty_path)
        .expect("load dirty log")
        .files
        .iter()
        .map(|f| String::from_utf8_lossy(&f.path.to_bytes()).into_owned())
        .collect();
    assert!(
        recorded.iter().any(|r| r == "acked"),
        "the acknowledged, not yet durable file is recorded: {recorded:?}"
    );
}

#[test]
fn an_fsync_while_alone_records_nothing() {
    let mut node = node();
    let (_receiver, sender, _events) =
        connected_to_serving(&node, Duration::from_millis(500), Duration::from_millis(20));
    assert_eq!(
        both(&mut node, &sender, create_op("db"), WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    wait_until("the file is durable on the peer", || {
        sender.stats().undurable_files == 0
    });
    sender.set_role(Role::Alone);
    // A database's recovery fsyncs every file: none of it changed anything.
    let fsync = Op::Fsync {
        dir: 0,
        path: p("db"),
        datasync: false,
    };
    assert_eq!(
        sender.replicate(fsync, WaitFor::Durable),
        ReplicateOutcome::Alone
    );
    assert!(
        DirtyLog::load(&node.dirty_path)
            .expect("load dirty log")
            .records
            .is_empty(),
        "nothing to compare"
    );
}

/// A "peer" that authenticates, then never reads nor acknowledges (a kill -STOP, a cut link).
/// Join the thread to get the socket, still open.
fn silent_peer() -> (SocketAddr, std::thread::JoinHandle<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let silent = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut decoder = FrameDecoder::new();
        let Message::Hello(hello) = read_message(&mut stream, &mut decoder) else {
            panic!("expected hello")
        };
        let server_nonce = [4u8; 32];
        let server_proof =
            auth::server_proof(SECRET, MODULE, &hello.client_nonce, &server_nonce).expect("proof");
        let challenge = Message::Challenge(Challenge {
            server_nonce,
            server_proof,
        });
        stream
            .write_all(&encode(0, &challenge).expect("encode"))
            .expect("write");
        let _proof = read_message(&mut stream, &mut decoder);
        stream
            .write_all(&encode(0, &Message::Welcome).expect("encode"))
            .expect("write");
        // Keep the socket open (the test holds it) and never read from it again.
        stream
    });
    (addr, silent)
}

#[test]
fn a_silent_peer_is_declared_lost_within_the_timeout() {
    let node = node();
    let (addr, silent) = silent_peer();
    let timeout = Duration::from_millis(400);
    let (sender, events) = sender(&node, addr, SECRET, timeout);
    wait_connected(&events);
    let start = Instant::now();
    let big = Op::Write {
        dir: 0,
        path: p("unconfirmed"),
        offset: 0,
        data: vec![0; 1 << 20],
    };
    assert_eq!(
        sender.replicate(big, WaitFor::Applied),
        ReplicateOutcome::Alone
    );
    assert!(
        start.elapsed() < timeout + Duration::from_secs(2),
        "waited {:?}",
        start.elapsed()
    );
    assert!(matches!(
        events.recv_timeout(PATIENCE),
        Ok(ReplicationEvent::PeerLost { .. })
    ));
    assert!(sender.dirty_log().contains(0, &p("unconfirmed")));
    drop(silent.join().expect("silent peer"));
}

#[test]
fn an_operation_the_peer_cannot_apply_is_reported_and_the_stream_goes_on() {
    let mut node = node();
    let receiver = receiver(&node, SECRET);
    let (sender, events) = sender(
        &node,
        receiver.local_addr(),
        SECRET,
        Duration::from_secs(10),
    );
    wait_connected(&events);
    // The parent exists on the primary only (as if created while the peer was away).
    fs::create_dir(node.primary.join("only-here")).expect("mkdir");
    let outcome = both(
        &mut node,
        &sender,
        create_op("only-here/file"),
        WaitFor::Applied,
    );
    assert_eq!(
        outcome,
        ReplicateOutcome::Alone,
        "not confirmed, recorded instead"
    );
    match events.recv_timeout(PATIENCE) {
        Ok(ReplicationEvent::FileOutOfSync {
            dir: 0,
            path,
            errno,
        }) => {
            assert_eq!(path, p("only-here/file"));
            assert_eq!(errno, libc::ENOENT);
        }
        other => panic!("expected FileOutOfSync, got {other:?}"),
    }
    assert!(sender.dirty_log().contains(0, &p("only-here/file")));
    assert_eq!(
        both(&mut node, &sender, create_op("next"), WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    assert!(node.replica.join("next").exists());
    assert_eq!(sender.stats().role, Role::Replicating);
    assert_eq!(sender.stats().apply_errors, 1);
}

#[test]
fn roles_switch_and_replication_resumes_only_when_asked() {
    let mut node = node();
    let receiver = receiver(&node, SECRET);
    let (sender, events) = sender(
        &node,
        receiver.local_addr(),
        SECRET,
        Duration::from_secs(10),
    );
    wait_connected(&events);
    sender.set_role(Role::Off);
    assert_eq!(
        both(&mut node, &sender, create_op("off"), WaitFor::Applied),
        ReplicateOutcome::Off
    );
    sender.set_role(Role::Alone);
    assert_eq!(
        both(&mut node, &sender, create_op("alone"), WaitFor::Applied),
        ReplicateOutcome::Alone
    );
    assert!(sender.dirty_log().contains(0, &p("alone")));
    assert!(!sender.dirty_log().contains(0, &p("off")));
    // The agent resyncs (here: by hand), then switches back.
    fs::File::create(node.replica.join("alone")).expect("resync by hand");
    fs::File::create(node.replica.join("off")).expect("resync by hand");
    sender.set_role(Role::Replicating);
    wait_connected(&events);
    assert_eq!(
        both(&mut node, &sender, create_op("again"), WaitFor::Applied),
        ReplicateOutcome::Confirmed
    );
    assert_eq!(
        replica_names(&node),
        vec!["again".to_owned(), "alone".to_owned(), "off".to_owned()]
    );
    assert_eq!(receiver.stats().connections_accepted, 2);
}

#[test]
fn a_new_authenticated_connection_replaces_the_current_one() {
    let node = node();
    let receiver = receiver(&node, SECRET);
    let (mut first, _decoder, answer) = raw_client(receiver.local_addr(), SECRET);
    assert_eq!(answer, Message::Welcome);
    let (mut second, mut decoder, answer) = raw_client(receiver.local_addr(), SECRET);
    assert_eq!(answer, Message::Welcome);
    assert_eq!(
        read_until_closed(&mut first),
        vec![],
        "the old connection is closed"
    );
    second
        .write_all(&encode(7, &Message::Op(create_op("from-second"))).expect("encode"))
        .expect("write");
    assert_eq!(
        read_message(&mut second, &mut decoder),
        Message::Ack(safekit_protocol::replication::Ack {
            seq: 7,
            durable: false
        })
    );
    assert_eq!(replica_names(&node), vec!["from-second".to_owned()]);
}

#[test]
fn a_slow_peer_applies_backpressure_instead_of_growing_memory() {
    let node = node();
    let (addr, silent) = silent_peer();
    let bound = 256 * 1024;
    let (sender, events) = sender_with(&node, addr, SECRET, Duration::from_millis(400), |config| {
        config.max_inflight_bytes = bound;
    });
    wait_connected(&events);
    let mut queued = 0usize;
    let outcome = loop {
        let op = Op::Write {
            dir: 0,
            path: p("queued"),
            offset: 0,
            data: vec![0; 4096],
        };
        match sender.replicate(op, WaitFor::Queued) {
            ReplicateOutcome::Queued => {
                queued += 1;
                assert!(
                    sender.stats().in_flight_bytes <= bound,
                    "in flight beyond the bound"
                );
            }
            other => break other,
        }
    };
    assert_eq!(
        outcome,
        ReplicateOutcome::Alone,
        "the writer was held back, then let go alone"
    );
    assert!(
        queued * 4096 <= bound,
        "{queued} writes of 4 KiB queued with a bound of {bound}"
    );
    assert!(sender.dirty_log().contains(0, &p("queued")));
    drop(silent.join().expect("silent peer"));
}
