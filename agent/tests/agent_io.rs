//! End-to-end tests of the agent's I/O building blocks on the real system.
//!
//! Each test checks what an operator would: the virtual IP shows up in
//! `ip addr` inside a network namespace and goes away, a client's ARP entry
//! follows the gratuitous ARP, scripts get SafeKit's arguments and environment
//! and a timed-out script leaves no process behind, logs rotate and tail,
//! state files survive replacement and reveal corruption, and the admin socket
//! refuses non-root users. They need root (network namespaces, uid switches)
//! and the `ip` command (Debian package `iproute2`).

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use safekit_agent::admin_socket::{AdminClientError, AdminListener, PeerCredentials, request};
use safekit_agent::arp::{self, ArpForm};
use safekit_agent::modlog::{self, Level, ModLog};
use safekit_agent::persist::{self, PersistError};
use safekit_agent::scripts::{
    AppLog, ScriptCall, ScriptEnv, ScriptOutcome, run_script, run_stop_sequence,
};
use safekit_agent::vip::{Netlink, VipError};

// ---------------------------------------------------------------------------
// Network namespace helpers.

/// A network namespace created with `ip netns add`, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new(tag: &str) -> NetNs {
        let name = format!("skio-{tag}-{}", std::process::id());
        // A namespace left by a crashed earlier run with the same pid.
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        run_checked(Command::new("ip").args(["netns", "add", &name]));
        NetNs { name }
    }

    /// Runs `ip <args>` inside the namespace and returns its stdout.
    fn ip(&self, args: &[&str]) -> String {
        run_checked(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a new thread that has joined this namespace (only that
    /// thread changes namespace).
    fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns_file = fs::File::open(format!("/var/run/netns/{}", self.name))
            .expect("open the namespace file");
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    nix::sched::setns(ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns into the test namespace");
                    f()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run_checked(command: &mut Command) -> String {
    let output = command.output().expect("run command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs an async block on a current-thread runtime on this thread (so that
/// sockets are created in this thread's namespace).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime")
        .block_on(future)
}

// ---------------------------------------------------------------------------
// Virtual IP.

#[test]
fn vip_is_added_idempotently_seen_and_removed_inside_a_namespace() {
    let ns = NetNs::new("vip");
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    ns.ip(&["link", "set", "va", "up"]);
    ns.ip(&["addr", "add", "10.77.0.1/24", "dev", "va"]);
    let vip: IpAddr = "10.77.0.100".parse().unwrap();
    let vip6: IpAddr = "fd00:77::100".parse().unwrap();

    ns.run_in(|| {
        block_on(async {
            let netlink = Netlink::connect().unwrap();

            // No interface named in the config: the one whose subnet holds the VIP.
            let choice = netlink.find_interface_for(vip).await.unwrap();
            assert_eq!((choice.ifname.as_str(), choice.prefix_len), ("va", 24));

            assert!(!netlink.has_address("va", vip).await.unwrap());
            assert!(netlink.add_address("va", vip, 24).await.unwrap());
            assert!(
                !netlink.add_address("va", vip, 24).await.unwrap(),
                "adding it again reports already present"
            );
            assert!(netlink.has_address("va", vip).await.unwrap());
            let shown = ns.ip(&["-o", "-4", "addr", "show", "dev", "va"]);
            assert!(shown.contains("inet 10.77.0.100/24"), "{shown}");
            // Still the same choice once the VIP is up.
            let choice = netlink.find_interface_for(vip).await.unwrap();
            assert_eq!(choice.ifname, "va");

            assert!(netlink.add_address("va", vip6, 64).await.unwrap());
            let shown = ns.ip(&["-o", "-6", "addr", "show", "dev", "va"]);
            assert!(shown.contains("inet6 fd00:77::100/64"), "{shown}");
            assert!(netlink.has_address("va", vip6).await.unwrap());

            assert!(netlink.remove_address("va", vip).await.unwrap());
            assert!(
                !netlink.remove_address("va", vip).await.unwrap(),
                "removing it again reports already absent"
            );
            assert!(!netlink.has_address("va", vip).await.unwrap());
            assert!(netlink.remove_address("va", vip6).await.unwrap());
            let shown = ns.ip(&["-o", "addr", "show", "dev", "va"]);
            assert!(!shown.contains("10.77.0.100"), "{shown}");
            assert!(!shown.contains("fd00:77::100"), "{shown}");
            assert!(
                shown.contains("10.77.0.1/24"),
                "the real address stays: {shown}"
            );

            let error = netlink.add_address("nosuch0", vip, 24).await.unwrap_err();
            assert!(matches!(error, VipError::InterfaceNotFound { .. }));
            assert_eq!(error.to_string(), "interface nosuch0 not found");
            let error = netlink
                .find_interface_for("172.31.0.1".parse().unwrap())
                .await
                .unwrap_err();
            assert!(error.to_string().contains("172.31.0.1"), "{error}");
        })
    });
}

// ---------------------------------------------------------------------------
// Gratuitous ARP.

#[test]
fn gratuitous_arp_reaches_the_client_and_updates_its_arp_entry() {
    let server = NetNs::new("arps");
    let client = NetNs::new("arpc");
    server.ip(&[
        "link",
        "add",
        "va",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
        "netns",
        &client.name,
    ]);
    server.ip(&["link", "set", "va", "up"]);
    server.ip(&["addr", "add", "10.77.1.1/24", "dev", "va"]);
    client.ip(&["link", "set", "vb", "up"]);
    client.ip(&["addr", "add", "10.77.1.2/24", "dev", "vb"]);
    let vip = Ipv4Addr::new(10, 77, 1, 100);
    // The client still believes the VIP is at the old primary's MAC.
    client.ip(&[
        "neigh",
        "replace",
        "10.77.1.100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "vb",
        "nud",
        "stale",
    ]);

    let server_mac = server.run_in(|| arp::link_address("va").unwrap().addr().unwrap());
    let (ready_sender, ready_receiver) = std::sync::mpsc::channel();
    let captured = std::thread::scope(|scope| {
        let capture = scope.spawn(|| {
            client.run_in(|| {
                // Accept an update of an entry just written (default: 1 s lock).
                fs::write("/proc/sys/net/ipv4/neigh/vb/locktime", "0").unwrap();
                let capture_socket = packet_capture_socket("vb");
                ready_sender.send(()).unwrap();
                receive_arp_frames(&capture_socket, vip, 2)
            })
        });
        ready_receiver.recv().unwrap();
        server.run_in(|| {
            block_on(async {
                let netlink = Netlink::connect().unwrap();
                netlink
                    .add_address("va", IpAddr::V4(vip), 24)
                    .await
                    .unwrap();
                arp::announce("va", vip, 1, Duration::ZERO).await.unwrap();
            })
        });
        capture.join().expect("capture thread")
    });

    assert_eq!(
        captured,
        vec![
            arp::gratuitous_arp_frame(server_mac, vip, ArpForm::Request).to_vec(),
            arp::gratuitous_arp_frame(server_mac, vip, ArpForm::Reply).to_vec(),
        ]
    );
    let neighbour = client.ip(&["neigh", "show", "10.77.1.100", "dev", "vb"]);
    let mac_text = server_mac
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    assert!(
        neighbour.contains(&format!("lladdr {mac_text}")),
        "client ARP entry not moved to {mac_text}: {neighbour}"
    );

    let error = server.run_in(|| block_on(arp::announce("nosuch0", vip, 1, Duration::ZERO)));
    assert_eq!(
        error.unwrap_err().to_string(),
        "interface nosuch0 not found"
    );
}

/// An `AF_PACKET` socket receiving every frame that arrives on `ifname`, with
/// a receive timeout so that a missing frame fails the test instead of hanging.
fn packet_capture_socket(ifname: &str) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockProtocol, SockType, SockaddrLike, bind, setsockopt, socket,
        sockopt,
    };
    let link = arp::link_address(ifname).unwrap();
    let capture_socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .unwrap();
    bind(capture_socket.as_raw_fd(), &link as &dyn SockaddrLike).unwrap();
    setsockopt(
        &capture_socket,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(10, 0),
    )
    .unwrap();
    capture_socket
}

/// Receives frames until `n_frames` ARP frames about `vip` have arrived.
fn receive_arp_frames(
    capture_socket: &std::os::fd::OwnedFd,
    vip: Ipv4Addr,
    n_frames: usize,
) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut buffer = [0u8; 2048];
    while frames.len() < n_frames {
        let len = nix::sys::socket::recv(
            capture_socket.as_raw_fd(),
            &mut buffer,
            nix::sys::socket::MsgFlags::empty(),
        )
        .expect("no gratuitous ARP received within 10 s");
        let frame = &buffer[..len];
        if len >= 42 && frame[12..14] == [0x08, 0x06] && frame[28..32] == vip.octets() {
            frames.push(frame.to_vec());
        }
    }
    frames
}

// ---------------------------------------------------------------------------
// Scripts.

struct ScriptFixture {
    _dir: tempfile::TempDir,
    env: ScriptEnv,
    log: AppLog,
}

impl ScriptFixture {
    fn new() -> ScriptFixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let env = ScriptEnv {
            safe: root.join("safe"),
            safebin: root.join("safe/private/bin"),
            safevar: root.join("var"),
            module: "mirror".to_string(),
            userbin: root.join("modules/mirror/bin"),
            userconf: root.join("modules/mirror/conf"),
            uservar: root.join("var/modules/mirror"),
            user_vars: BTreeMap::from([("APP_PORT".to_string(), "8080".to_string())]),
        };
        fs::create_dir_all(&env.userbin).unwrap();
        fs::create_dir_all(&env.uservar).unwrap();
        let log = AppLog {
            path: root.join("var/modules/mirror/userlog.ulog"),
            max_bytes: 1024 * 1024,
        };
        ScriptFixture {
            _dir: dir,
            env,
            log,
        }
    }

    fn install(&self, name: &str, body: &str) {
        let path = self.env.userbin.join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log.path).unwrap()
    }
}

fn call<'a>(name: &'a str, current: &'a str, next: &'a str, action: &'a str) -> ScriptCall<'a> {
    ScriptCall {
        name,
        current_state: current,
        next_state: next,
        action,
        force: false,
        timeout: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn scripts_get_safekit_arguments_and_environment_and_log_their_output() {
    let fixture = ScriptFixture::new();
    fixture.install(
        "start_prim",
        "echo \"args=$*\"\n\
         echo \"module=$SAFEMODULE userbin=$SAFEUSERBIN uservar=$SAFEUSERVAR\"\n\
         echo \"safe=$SAFE safebin=$SAFEBIN safevar=$SAFEVAR userconf=$SAFEUSERCONF\"\n\
         echo \"port=$APP_PORT cwd=$(pwd)\"\n\
         echo oops >&2",
    );
    let outcome = run_script(
        &fixture.env,
        &fixture.log,
        &call("start_prim", "WAIT", "ALONE", "start"),
    )
    .await
    .unwrap();
    assert_eq!(outcome, ScriptOutcome::Success);

    let env = &fixture.env;
    let text = fixture.log_text();
    let lines: Vec<&str> = text.lines().collect();
    let header = modlog::LogRecord::parse(lines[0]).expect("header line");
    assert_eq!(header.level, Level::Script);
    assert!(
        header.message.contains("start_prim WAIT ALONE start"),
        "{text}"
    );
    assert_eq!(lines[1], "args=WAIT ALONE start");
    assert_eq!(
        lines[2],
        format!(
            "module=mirror userbin={} uservar={}",
            env.userbin.display(),
            env.uservar.display()
        )
    );
    assert_eq!(
        lines[3],
        format!(
            "safe={} safebin={} safevar={} userconf={}",
            env.safe.display(),
            env.safebin.display(),
            env.safevar.display(),
            env.userconf.display()
        )
    );
    assert_eq!(lines[4], format!("port=8080 cwd={}", env.userbin.display()));
    assert_eq!(lines[5], "oops");
    assert!(
        lines[6].ends_with("start_prim WAIT ALONE start: exit status 0"),
        "{text}"
    );
}

#[tokio::test]
async fn stop_scripts_run_graceful_then_with_force() {
    let fixture = ScriptFixture::new();
    fixture.install("stop_prim", "echo \"args=$*\"");
    let (graceful, forced) = run_stop_sequence(
        &fixture.env,
        &fixture.log,
        &call("stop_prim", "PRIM", "STOP", "stop"),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(
        (graceful, forced),
        (ScriptOutcome::Success, ScriptOutcome::Success)
    );
    let text = fixture.log_text();
    let args: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with("args="))
        .collect();
    assert_eq!(args, ["args=PRIM STOP stop", "args=force PRIM STOP stop"]);
}

#[tokio::test]
async fn script_outcomes_absent_failed_and_killed() {
    let fixture = ScriptFixture::new();
    let absent = run_script(
        &fixture.env,
        &fixture.log,
        &call("prestart", "STOP", "WAIT", "start"),
    )
    .await
    .unwrap();
    assert_eq!(absent, ScriptOutcome::Absent);
    assert!(absent.is_success());

    fixture.install("start_second", "exit 3");
    let failed = run_script(
        &fixture.env,
        &fixture.log,
        &call("start_second", "WAIT", "SECOND", "start"),
    )
    .await
    .unwrap();
    assert_eq!(failed, ScriptOutcome::Failed(3));
    assert!(!failed.is_success());

    fixture.install("transition", "kill -TERM $$");
    let killed = run_script(
        &fixture.env,
        &fixture.log,
        &call("transition", "STOP", "WAIT", "start"),
    )
    .await
    .unwrap();
    assert_eq!(killed, ScriptOutcome::Killed(15));
}

/// Waits until process `pid` has exited (it may remain a zombie until init
/// reaps it), polling a pidfd, which becomes readable at exit. Returns `false`
/// if it is still alive after 10 s.
async fn wait_for_exit(pid: i32) -> bool {
    tokio::task::spawn_blocking(move || {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let Some(pid) = rustix::process::Pid::from_raw(pid) else {
            return true;
        };
        let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(pidfd) => pidfd,
            // ESRCH: already exited and reaped.
            Err(_) => return true,
        };
        let mut poll_fds = [PollFd::new(&pidfd, PollFlags::IN)];
        let ten_seconds = Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        poll(&mut poll_fds, Some(&ten_seconds)).expect("poll the pidfd") == 1
    })
    .await
    .expect("pidfd wait")
}

fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn a_timed_out_script_is_killed_with_its_whole_process_group() {
    let fixture = ScriptFixture::new();
    fixture.install(
        "stop_prim",
        "sleep 1000 &\n\
         echo $! > \"$SAFEUSERVAR/child.pid\"\n\
         echo $$ > \"$SAFEUSERVAR/script.pid\"\n\
         echo started\n\
         wait",
    );
    let mut stop_call = call("stop_prim", "PRIM", "STOP", "stop");
    // The script waits forever: the timeout decides the outcome, not timing.
    stop_call.timeout = Duration::from_millis(500);
    let outcome = run_script(&fixture.env, &fixture.log, &stop_call)
        .await
        .unwrap();
    assert_eq!(outcome, ScriptOutcome::TimedOut);

    let script_pid = read_pid(&fixture.env.uservar.join("script.pid"));
    let child_pid = read_pid(&fixture.env.uservar.join("child.pid"));
    let script_gone = wait_for_exit(script_pid).await;
    let child_gone = wait_for_exit(child_pid).await;
    // Clean up before asserting, so a failure leaves no process behind.
    for (pid, gone) in [(script_pid, script_gone), (child_pid, child_gone)] {
        if !gone {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    assert!(script_gone, "script {script_pid} survived");
    assert!(
        child_gone,
        "background child {child_pid} of the script survived"
    );
    let text = fixture.log_text();
    assert!(text.contains("started"), "{text}");
    assert!(
        text.contains("stop_prim PRIM STOP stop: timed out, process group killed"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Module log.

#[tokio::test]
async fn module_log_rotates_when_full_and_tails_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log/module.log");
    let max_bytes = 2000;
    let log = ModLog::open(&path, max_bytes).unwrap();
    for line_idx in 0..100 {
        log.log(Level::Event, format!("event number {line_idx:03}"));
        log.log(Level::Info, format!("verbose detail {line_idx:03}"));
    }
    log.log(Level::User, "safekit stop -m mirror (asked by uid 0)");
    log.flush().await;

    let rotated = modlog::rotated_path(&path);
    assert!(rotated.exists(), "the log was never rotated");
    assert!(fs::metadata(&path).unwrap().len() <= max_bytes);
    assert!(fs::metadata(&rotated).unwrap().len() <= max_bytes);

    let main_view = log.tail(3, false).await.unwrap();
    let messages: Vec<String> = main_view
        .iter()
        .map(|line| modlog::LogRecord::parse(line).unwrap().message)
        .collect();
    assert_eq!(
        messages,
        [
            "event number 098",
            "event number 099",
            "safekit stop -m mirror (asked by uid 0)"
        ]
    );
    let verbose_view = log.tail(3, true).await.unwrap();
    let records: Vec<(Level, String)> = verbose_view
        .iter()
        .map(|line| {
            let record = modlog::LogRecord::parse(line).unwrap();
            (record.level, record.message)
        })
        .collect();
    assert_eq!(
        records,
        [
            (Level::Event, "event number 099".to_string()),
            (Level::Info, "verbose detail 099".to_string()),
            (
                Level::User,
                "safekit stop -m mirror (asked by uid 0)".to_string()
            ),
        ]
    );
    // Tail spans the rotated file: more lines than the current file holds are
    // found, in order, without gaps.
    let current_lines = fs::read_to_string(&path).unwrap().lines().count();
    let long_tail = log.tail(current_lines + 5, true).await.unwrap();
    assert_eq!(long_tail.len(), current_lines + 5);
    let line_format = regex_free_check(&long_tail[0]);
    assert!(line_format, "bad line format: {}", long_tail[0]);
}

/// Checks `YYYY-MM-DD HH:MM:SS.mmm | L | message` without a regex crate.
fn regex_free_check(line: &str) -> bool {
    let bytes = line.as_bytes();
    let digit = |idx: usize| bytes.get(idx).is_some_and(u8::is_ascii_digit);
    let digits_at = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 22];
    digits_at.iter().all(|&idx| digit(idx))
        && &line[4..5] == "-"
        && &line[7..8] == "-"
        && &line[10..11] == " "
        && &line[13..14] == ":"
        && &line[16..17] == ":"
        && &line[19..20] == "."
        && &line[23..26] == " | "
        && &line[27..30] == " | "
}

// ---------------------------------------------------------------------------
// Persistent state.

#[test]
fn state_file_is_replaced_atomically_and_corruption_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mirror.state");
    assert_eq!(persist::read(&path).unwrap(), None, "first start: no state");

    persist::write_atomic(&path, b"generation=1 role=SECOND").unwrap();
    persist::write_atomic(&path, b"generation=2 role=PRIM").unwrap();
    assert_eq!(
        persist::read(&path).unwrap().as_deref(),
        Some(&b"generation=2 role=PRIM"[..])
    );
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["mirror.state"], "no temporary file left behind");

    // A crash while writing leaves a stale temporary file: the state is intact
    // and the next write succeeds.
    fs::write(dir.path().join(".mirror.state.tmp"), b"half").unwrap();
    assert_eq!(
        persist::read(&path).unwrap().as_deref(),
        Some(&b"generation=2 role=PRIM"[..])
    );
    persist::write_atomic(&path, b"generation=3 role=ALONE").unwrap();
    assert_eq!(
        persist::read(&path).unwrap().as_deref(),
        Some(&b"generation=3 role=ALONE"[..])
    );

    // One flipped byte in the payload.
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    let error = persist::read(&path).unwrap_err();
    assert!(matches!(error, PersistError::Corrupt { .. }));
    let message = error.to_string();
    assert!(message.contains("mirror.state"), "{message}");
    assert!(message.contains("checksum mismatch"), "{message}");

    // A truncated file.
    fs::write(&path, &bytes[..10]).unwrap();
    let message = persist::read(&path).unwrap_err().to_string();
    assert!(message.contains("truncated"), "{message}");
}

// ---------------------------------------------------------------------------
// Admin socket.

type TestRequest = String;
type TestResponse = (u32, String);

/// Serves the admin socket at `path`; the handler answers with the caller's
/// uid and the request, and counts its calls.
async fn start_admin_server(
    path: &Path,
    admin_gid: Option<u32>,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let listener = AdminListener::bind(path, admin_gid).await.unwrap();
    let n_calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&n_calls);
    let server = tokio::spawn(listener.serve(
        move |peer: PeerCredentials, request: TestRequest| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                (peer.uid, format!("done: {request}"))
            }
        },
    ));
    (server, n_calls)
}

/// Sends a request from a thread running as `uid`/`gid` (only that thread
/// changes identity), waiting without blocking the test's runtime.
async fn request_as(uid: u32, gid: u32, path: PathBuf) -> Result<TestResponse, AdminClientError> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        use rustix::process::{Gid, Uid};
        use rustix::thread::{set_thread_groups, set_thread_res_gid, set_thread_res_uid};
        set_thread_groups(&[]).expect("drop supplementary groups");
        let gid = Gid::from_raw(gid);
        set_thread_res_gid(gid, gid, gid).expect("switch thread gid");
        let uid = Uid::from_raw(uid);
        set_thread_res_uid(uid, uid, uid).expect("switch thread uid");
        let result = block_on(request::<TestRequest, TestResponse>(
            &path,
            &"stop".to_string(),
            Duration::from_secs(10),
        ));
        let _ = sender.send(result);
    });
    receiver.await.expect("client thread")
}

#[tokio::test]
async fn admin_socket_serves_root_and_refuses_other_users() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("run/safekitd.sock");
    let (server, n_calls) = start_admin_server(&path, None).await;

    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.mode() & 0o777, 0o600);
    assert_eq!(metadata.uid(), 0);

    let response: TestResponse = request(&path, &"state".to_string(), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(response, (0, "done: state".to_string()));
    assert_eq!(n_calls.load(Ordering::SeqCst), 1);

    // A second agent cannot take over the socket of a running one.
    let error = AdminListener::bind(&path, None).await.unwrap_err();
    assert!(error.to_string().contains("in use"), "{error}");

    // nobody cannot even open the socket file...
    let error = request_as(65534, 65534, path.clone()).await.unwrap_err();
    assert!(
        matches!(error, AdminClientError::PermissionDenied { .. }),
        "{error}"
    );
    // ...and if the file mode is loosened, the peer credential check refuses.
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    let error = request_as(65534, 65534, path.clone()).await.unwrap_err();
    match &error {
        AdminClientError::Refused(reason) => assert!(reason.contains("uid 65534"), "{reason}"),
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(
        n_calls.load(Ordering::SeqCst),
        1,
        "the handler never saw nobody's request"
    );

    server.abort();
    let _ = server.await;
    assert!(
        !path.exists(),
        "the socket file is removed when the server stops"
    );
    let error =
        request::<TestRequest, TestResponse>(&path, &"state".to_string(), Duration::from_secs(10))
            .await
            .unwrap_err();
    assert!(
        error.to_string().starts_with("agent not running"),
        "{error}"
    );
}

#[tokio::test]
async fn admin_socket_accepts_the_configured_admin_group() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("safekitd.sock");
    let admin_gid = 4242;
    let (server, n_calls) = start_admin_server(&path, Some(admin_gid)).await;

    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.mode() & 0o777, 0o660);
    assert_eq!((metadata.uid(), metadata.gid()), (0, admin_gid));

    let response = request_as(65534, admin_gid, path.clone()).await.unwrap();
    assert_eq!(response, (65534, "done: stop".to_string()));
    // Same uid, other group: refused (the file mode already stops it).
    let error = request_as(65534, 65534, path.clone()).await.unwrap_err();
    assert!(
        matches!(error, AdminClientError::PermissionDenied { .. }),
        "{error}"
    );
    assert_eq!(n_calls.load(Ordering::SeqCst), 1);
    server.abort();
}
