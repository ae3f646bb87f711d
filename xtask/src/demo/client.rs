//! The client's probe, shared by the demo and the failover bench: requests
//! sent through the virtual IP from the client namespace, each attempt logged
//! with its time and who answered it, and what is concluded from that log
//! (interruptions, acknowledged writes).
//!
//! The demo writes numbered records ([`Writer::start`]); the failover bench
//! (`xtask/src/bench/failover.rs`) asks who serves, every 10 ms
//! ([`Writer::start_probe`] with [`ProbeMode::Read`]). Both measure the
//! client-visible interruption with [`interruption`].

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use safekit_tests::{Node, NodeProcess};

use super::wait_for;

/// Runs in the client namespace: `vip port log stop period mode`. Until the
/// stop file exists, one request every `period` seconds; one line per
/// attempt, `<unix time> ack <n> <node>` or `<unix time> fail <n>`.
///
/// - `write`: `POST /records` of `record <n>`, one attempt after the other
///   (the demo application serves one request at a time and fsyncs each
///   record: overlapping writes would only queue). A record whose answer was
///   lost may still have been stored: only acknowledged ones are promised.
/// - `read`: `GET /whoami`, a new attempt every period whether or not the
///   previous ones have answered (each in its own thread), so that a
///   connection hanging on a vanished address does not blur the measurement;
///   lines may then come out of time order ([`parse`] sorts them).
const PROBE: &str = r#"
import os, socket, sys, threading, time
vip, port, log, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
period, mode = float(sys.argv[5]), sys.argv[6]
out = open(log, "a", buffering=1)
lock = threading.Lock()

def attempt(n, start):
    try:
        if mode == "write":
            body = ("record %d" % n).encode()
            request = b"POST /records HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        else:
            request = b"GET /whoami HTTP/1.0\r\n\r\n"
        s = socket.create_connection((vip, port), timeout=0.3)
        s.settimeout(1.0)
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        head, _, answer = data.partition(b"\r\n\r\n")
        answer = answer.decode().split()
        if mode == "write":
            ok = len(answer) == 2 and answer[0] == "ok"
        else:
            ok = len(answer) == 1
        if head.split()[1] == b"200" and ok:
            line = "%.3f ack %d %s\n" % (start, n, answer[-1])
        else:
            line = "%.3f fail %d\n" % (start, n)
    except Exception:
        line = "%.3f fail %d\n" % (start, n)
    with lock:
        out.write(line)

n = 0
due = time.time()
while not os.path.exists(stop):
    n += 1
    start = time.time()
    if mode == "write":
        attempt(n, start)
    else:
        threading.Thread(target=attempt, args=(n, start), daemon=True).start()
    due += period
    pause = due - time.time()
    if pause > 0:
        time.sleep(pause)
    else:
        due = time.time()
for thread in threading.enumerate():
    if thread is not threading.main_thread():
        thread.join()
"#;

/// What the probe sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeMode {
    /// `POST /records` of numbered records, one after the other (the demo).
    Write,
    /// `GET /whoami`, a new attempt every period without waiting for the previous ones.
    Read,
}

/// One write attempt of the client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Attempt {
    /// When it started (Unix time, seconds).
    pub(crate) time: f64,
    pub(crate) record: u64,
    /// The node that acknowledged it, `None` if it failed.
    pub(crate) acked_by: Option<String>,
}

/// The probe running in the client namespace (the demo's writer).
#[derive(Debug)]
pub(crate) struct Writer {
    log: PathBuf,
    stop_file: PathBuf,
    process: NodeProcess,
}

impl Writer {
    /// The demo's writer: a record written every 20 ms.
    pub(crate) fn start(client: &Node, vip: Ipv4Addr, port: u16) -> anyhow::Result<Writer> {
        Writer::start_probe(
            client,
            vip,
            port,
            Duration::from_millis(20),
            ProbeMode::Write,
        )
    }

    /// Starts the probe in `client`: a request to `vip:port` every `period`.
    pub(crate) fn start_probe(
        client: &Node,
        vip: Ipv4Addr,
        port: u16,
        period: Duration,
        mode: ProbeMode,
    ) -> anyhow::Result<Writer> {
        let script = client.log_dir().join("probe.py");
        std::fs::write(&script, PROBE).context("write the client's script")?;
        let log = client.log_dir().join("probes.txt");
        let stop_file = client.log_dir().join("probe.stop");
        let mode = match mode {
            ProbeMode::Write => "write",
            ProbeMode::Read => "read",
        };
        let process = client.spawn(format!(
            "exec python3 {} {vip} {port} {} {} {} {mode}",
            script.display(),
            log.display(),
            stop_file.display(),
            period.as_secs_f64()
        ))?;
        Ok(Writer {
            log,
            stop_file,
            process,
        })
    }

    pub(crate) fn attempts(&self) -> Vec<Attempt> {
        parse(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Waits until `node` has acknowledged `count` more writes than now.
    pub(crate) fn wait_acks(&self, node: &str, count: usize) -> anyhow::Result<()> {
        let before = acked_by(&self.attempts(), node).len();
        wait_for(
            &format!("{count} more attempts acknowledged by {node}"),
            Duration::from_secs(30),
            || acked_by(&self.attempts(), node).len() >= before + count,
        )
        .with_context(|| format!("the client's output: {}", self.process.output()))
    }

    /// Stops the probe after its current attempts.
    pub(crate) fn stop(&self) -> anyhow::Result<()> {
        std::fs::write(&self.stop_file, "").context("write the writer's stop file")?;
        if self.process.wait(Duration::from_secs(10)).is_err() {
            self.process.kill();
        }
        Ok(())
    }
}

/// Parses the probe's log (a line cut short by a kill is ignored), in the
/// order the attempts started.
pub(crate) fn parse(text: &str) -> Vec<Attempt> {
    let mut attempts: Vec<Attempt> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let time = words.next()?.parse().ok()?;
            let outcome = words.next()?;
            let record = words.next()?.parse().ok()?;
            let acked_by = match outcome {
                "ack" => Some(words.next()?.to_owned()),
                "fail" => None,
                _ => return None,
            };
            Some(Attempt {
                time,
                record,
                acked_by,
            })
        })
        .collect();
    attempts.sort_by(|a, b| a.time.total_cmp(&b.time));
    attempts
}

/// The records `node` acknowledged.
pub(crate) fn acked_by(attempts: &[Attempt], node: &str) -> BTreeSet<u64> {
    attempts
        .iter()
        .filter(|attempt| attempt.acked_by.as_deref() == Some(node))
        .map(|attempt| attempt.record)
        .collect()
}

/// Milliseconds the client saw no acknowledgement while the service moved
/// from `from` to `to` after Unix time `since`: from the last write `from`
/// acknowledged to the first one `to` acknowledged.
pub(crate) fn interruption(attempts: &[Attempt], since: f64, from: &str, to: &str) -> Option<f64> {
    let acked: Vec<(f64, &str)> = attempts
        .iter()
        .filter_map(|attempt| Some((attempt.time, attempt.acked_by.as_deref()?)))
        .collect();
    let first_to = acked
        .iter()
        .position(|(time, node)| *time >= since && *node == to)?;
    let last_from = acked[..first_to]
        .iter()
        .rev()
        .find(|(_, node)| *node == from)?;
    Some((acked[first_to].0 - last_from.0) * 1000.0)
}

/// The record numbers in a `records.txt` (`record <n>` lines).
pub(crate) fn stored_records(text: &str) -> BTreeSet<u64> {
    text.lines()
        .filter_map(|line| line.strip_prefix("record ")?.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
100.000 ack 1 node1
100.100 ack 2 node1
100.200 fail 3
101.500 fail 4
101.900 ack 5 node2
102.000 ack 6 node2
102.1";

    #[test]
    fn the_interruption_runs_from_the_last_ack_of_the_old_primary_to_the_first_of_the_new() {
        let attempts = parse(LOG);
        assert_eq!(attempts.len(), 6, "the cut line is ignored");
        let gap = interruption(&attempts, 100.150, "node1", "node2").expect("a switch");
        assert!((gap - 1800.0).abs() < 0.5, "{gap}");
        assert_eq!(interruption(&attempts, 100.0, "node2", "node1"), None);
    }

    #[test]
    fn overlapping_probes_logged_out_of_order_are_read_in_start_order() {
        let attempts = parse(
            "100.020 ack 3 node1\n100.000 ack 1 node1\n101.010 ack 102 node2\n100.900 fail 91\n101.000 ack 101 node2\n",
        );
        let records: Vec<u64> = attempts.iter().map(|attempt| attempt.record).collect();
        assert_eq!(records, [1, 3, 91, 101, 102]);
        let gap = interruption(&attempts, 100.5, "node1", "node2").expect("a switch");
        assert!((gap - 980.0).abs() < 0.5, "{gap}");
    }

    #[test]
    fn acknowledged_records_are_grouped_by_node_and_checked_against_the_file() {
        let attempts = parse(LOG);
        assert_eq!(acked_by(&attempts, "node1"), BTreeSet::from([1, 2]));
        assert_eq!(acked_by(&attempts, "node2"), BTreeSet::from([5, 6]));
        assert_eq!(
            stored_records("record 1\nrecord 2\nrecord 3\ngarbage\n"),
            BTreeSet::from([1, 2, 3])
        );
    }
}
