//! `cargo xtask bench --only failover`: the failover figures of issue 6 (a
//! report, not a test).
//!
//! What a client sees when the primary dies, side by side in one run: our
//! mirror cluster and keepalived (VRRP, Debian's package) holding the same
//! virtual IP in the same kind of namespaces (the `safekit-tests` harness: two
//! nodes and a client on one bridge). The client probes the VIP every 10 ms
//! with the demo's probe (`demo/client.rs`, `GET /whoami`, a new attempt every
//! period without waiting for the previous ones) and the interruption is the
//! time from the last answer of node1 to the first answer of node2.
//!
//! - Faults: the harness's crash of node1 (kill -9 of every process, then its
//!   link down, as a power cut) and node1's link down alone (processes keep
//!   running: node1 also thinks it is alone, as in a split brain).
//! - Ours: the demo module (`modules/demo`: a record store started by
//!   `start_prim`, its directory replicated with `<rfs>`) with heartbeat
//!   timeout 1000 ms and 3000 ms, pulse = timeout / 5 (200 ms and 600 ms: the
//!   demo's and the tests' ratio; SafeKit's defaults, 700 ms / 30 s, give no
//!   ratio that fits a 1 s timeout). node1 `prim`, node2 `second`, probe,
//!   fault, node2 ALONE.
//! - keepalived: `advert_int 1`, node1 MASTER (priority 150), node2 BACKUP
//!   (priority 100: takeover after 3 x 1 s + skew 0.61 s), the same demo
//!   application running on both nodes all the time (keepalived moves an
//!   address, it does not start services).
//!
//! The fault comes after 1 s of answers from node1 and a random pause of 0 to
//! 1 s: runs take about the same time to set up, so without it every fault
//! would hit the same point of keepalived's 1 s advert cycle (its takeover
//! after the fault ranges over 2.61..3.61 s with that point).
//!
//! Every run builds a fresh cluster, so runs are independent; they are
//! interleaved (run 1 of every cell, then run 2, ...) so that drift from
//! other users of the machine spreads over every cell. Median, min and max
//! of 5 runs per cell (1 with `--quick`). A run that fails is reported as such
//! and the bench goes on. Every namespace and process of a run is removed
//! when its cluster is dropped, on error and interrupt too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use safekit_tests::agents::DEFAULT_SECRET;
use safekit_tests::{Cluster, Node};

use super::{env, median, report};
use crate::demo::client::{ProbeMode, Writer, interruption};
use crate::demo::node::{ALONE, DemoNode, ModuleSettings, PRIM, SECOND};
use crate::demo::{MODULE, wait_for};

const BEGIN: &str =
    "<!-- failover bench: begin (written by `cargo xtask bench`; edit outside these markers) -->";
const END: &str = "<!-- failover bench: end -->";

/// The demo application's port.
const PORT: u16 = 8080;
/// How often the client probes the VIP.
const PROBE_PERIOD: Duration = Duration::from_millis(10);
/// Answers from node1 the probe waits for before the fault (1 s of probing).
const ANSWERS_BEFORE: usize = 100;
/// Answers from node2 it waits for after the fault.
const ANSWERS_AFTER: usize = 20;
/// Heartbeat timeouts of our cluster.
const TIMEOUTS_MS: [u32; 2] = [1000, 3000];
/// The issue's target at timeout 1000 ms.
const TARGET_MS: f64 = 1500.0;
/// Runs per cell.
const RUNS: usize = 5;
/// keepalived's `advert_int` (seconds) and the BACKUP's priority.
const ADVERT_INT_S: u32 = 1;
const BACKUP_PRIORITY: u32 = 100;
/// The text in `modules/demo/conf/userconfig.xml` that the bench replaces.
const DEMO_HEART: &str = r#"<heart pulse="200ms" timeout="1000ms">"#;

/// The fault injected into node1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// kill -9 of every process of node1, then its link down (the harness's crash).
    Crash,
    /// node1's link down, its processes running.
    LinkDown,
}

impl Fault {
    const ALL: [Fault; 2] = [Fault::Crash, Fault::LinkDown];

    fn label(self) -> &'static str {
        match self {
            Fault::Crash => "kill -9 of node1 (power cut)",
            Fault::LinkDown => "node1 link down",
        }
    }

    fn inject(self, cluster: &Cluster) -> anyhow::Result<()> {
        let node1 = cluster.node(1);
        match self {
            Fault::Crash => node1.crash().context("crash node1"),
            Fault::LinkDown => cluster.link_down(node1, 0).context("node1's link down"),
        }
    }
}

/// What holds the VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    /// Our agents, heartbeat timeout in ms.
    Ours(u32),
    /// keepalived, `advert_int 1`.
    Keepalived,
}

impl System {
    fn all() -> Vec<System> {
        TIMEOUTS_MS
            .iter()
            .map(|&timeout| System::Ours(timeout))
            .chain([System::Keepalived])
            .collect()
    }

    fn label(self) -> String {
        match self {
            System::Ours(timeout) => format!(
                "ours, timeout {timeout} ms (pulse {} ms)",
                pulse_ms(timeout)
            ),
            System::Keepalived => format!("keepalived, advert_int {ADVERT_INT_S} s"),
        }
    }
}

/// Pulse = timeout / 5.
fn pulse_ms(timeout_ms: u32) -> u32 {
    timeout_ms / 5
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Client-visible interruption: last answer of node1 to first answer of node2.
    interruption_ms: f64,
    /// From the fault to node2 taking over (state ALONE, or keepalived's
    /// "Entering MASTER STATE"), as polled every 50 ms.
    takeover_ms: f64,
}

/// What every run needs.
#[derive(Debug)]
struct Bed {
    root: PathBuf,
    bin_dir: PathBuf,
    /// The replicated directory's path (the same in both nodes).
    data_dir: PathBuf,
}

pub(crate) fn run(
    root: &Path,
    quick: bool,
    build: bool,
    disk_dir: &Path,
    output: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    env::require_failover_tools()?;
    let bin_dir = std::env::current_exe()
        .context("find xtask's own binary")?
        .parent()
        .context("xtask's binary has no directory")?
        .to_path_buf();
    if build {
        println!("bench failover: building the agent (safekit, safekitd)");
        crate::demo::build(&bin_dir)?;
    }
    let safekitd = bin_dir.join("safekitd");
    for binary in ["safekit", "safekitd"] {
        if !bin_dir.join(binary).is_file() {
            bail!(
                "{} is not built: run `cargo build -p safekit-agent --bins` (or drop --no-build)",
                bin_dir.join(binary).display()
            );
        }
    }
    let base = env::bench_base(disk_dir).join("failover");
    let bed = Bed {
        root: root.to_path_buf(),
        bin_dir,
        data_dir: base.join("data"),
    };
    std::fs::create_dir_all(&bed.data_dir)
        .with_context(|| format!("create {}", bed.data_dir.display()))?;
    let result = measure(&bed, quick, interrupted);
    // The harness created the mount point and never removes it: ours, so remove it.
    if let Err(error) = std::fs::remove_dir_all(&base) {
        eprintln!("bench failover: cannot remove {}: {error}", base.display());
    }
    if let Some(parent) = base.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    let (cells, elapsed) = result?;
    let machine = env::Machine::probe(root, &safekitd);
    // keepalived prints its version on stderr.
    let keepalived = std::process::Command::new("keepalived")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "keepalived (version unknown)".to_owned());
    let runs = if quick { 1 } else { RUNS };
    let table = table(&cells);
    let verdicts = verdicts(&cells);
    println!("\n{table}\n{verdicts}");
    let mut section = String::new();
    let _ = writeln!(
        section,
        "{BEGIN}\n## Failover: client-visible interruption\n"
    );
    let _ = writeln!(
        section,
        "Written by `cargo xtask bench --only failover{}` on {} ({:.0} s), commit {}. \
         Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}. Agent: {}. {keepalived}. \
         Load average before and after: {}.\n",
        if quick { " --quick" } else { "" },
        machine.date,
        elapsed.0.as_secs_f64(),
        machine.commit,
        machine.cpus,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.rfs,
        elapsed.1,
    );
    let _ = writeln!(
        section,
        "Setup: the scenario tests' namespaces (two nodes and a client on one bridge, a fresh \
         cluster for every run). The client probes the virtual IP every 10 ms (`GET /whoami` \
         to the demo application, a new attempt every 10 ms whether or not the previous ones \
         answered; 0.3 s connect and 1 s answer timeouts); the interruption runs from the last \
         answer of node1 to the first answer of node2. The fault comes once the client has had \
         1 s of answers from node1, after a random pause of 0 to 1 s (so that faults hit every \
         point of the heartbeat and advert cycles): kill -9 of every process of node1 then its \
         link down (the harness's crash, a power cut), or node1's link down alone.\n\n\
         Ours: the demo module (`modules/demo`: its data directory replicated with `<rfs>`, the \
         application started by `start_prim`), node1 `prim`, node2 `second`; pulse = timeout \
         / 5, so node2 takes over between timeout - pulse and timeout after the fault. \
         keepalived: VRRP between the two nodes, `advert_int {ADVERT_INT_S}`, node1 MASTER \
         priority 150, node2 BACKUP priority {BACKUP_PRIORITY}: node2 takes over 3 x advert_int \
         + skew = {:.2} s after the last advert it received, so between that minus advert_int \
         and that after the fault; the demo application runs on both nodes all the time \
         (keepalived moves an address, it starts nothing). Takeover: fault to node2 ALONE \
         (`safekit state`) or to keepalived's \"Entering MASTER STATE\", polled every 50 ms. \
         {}\n",
        3.0 * f64::from(ADVERT_INT_S)
            + f64::from(256 - BACKUP_PRIORITY) / 256.0 * f64::from(ADVERT_INT_S),
        if runs == 1 {
            "One run per cell (quick mode): the figures are single runs; [ratios] are ours / \
             keepalived's."
                .to_owned()
        } else {
            format!(
                "Median of {runs} runs per cell, (min–max) after it; [ratios] are ours / keepalived's medians."
            )
        }
    );
    section.push_str(&table);
    section.push('\n');
    section.push_str(&verdicts);
    let _ = writeln!(section, "{END}");
    let path = root.join(output);
    report::write_marked(&path, BEGIN, END, &section)?;
    println!("bench failover: results written to {}", path.display());
    Ok(())
}

type Cells = BTreeMap<(System, Fault), Vec<Result<Measured, String>>>;

/// Every run of every cell, interleaved; the cells and (elapsed, load averages).
fn measure(
    bed: &Bed,
    quick: bool,
    interrupted: &AtomicBool,
) -> anyhow::Result<(Cells, (Duration, String))> {
    let runs = if quick { 1 } else { RUNS };
    let systems = System::all();
    let total = runs * systems.len() * Fault::ALL.len();
    let load_before = super::load_average();
    println!(
        "bench failover: {} mode, {runs} run(s) x {} fault(s) x {} setting(s) = {total} runs, \
         client probing the VIP every {} ms",
        if quick { "quick" } else { "full" },
        Fault::ALL.len(),
        systems.len(),
        PROBE_PERIOD.as_millis()
    );
    let started = Instant::now();
    let mut cells: Cells = BTreeMap::new();
    let mut step = 0;
    for run in 1..=runs {
        for fault in Fault::ALL {
            for &system in &systems {
                if interrupted.load(Ordering::SeqCst) {
                    bail!("interrupted");
                }
                step += 1;
                print!(
                    "[{step}/{total}] {}, {}, run {run}/{runs}... ",
                    system.label(),
                    fault.label()
                );
                let _ = std::io::stdout().flush();
                let outcome = one_run(bed, system, fault).map_err(|error| format!("{error:#}"));
                match &outcome {
                    Ok(m) => println!(
                        "interruption {:.0} ms (takeover {:.0} ms)",
                        m.interruption_ms, m.takeover_ms
                    ),
                    Err(error) => println!("FAILED: {}", first_lines(error, 12)),
                }
                cells.entry((system, fault)).or_default().push(outcome);
            }
        }
    }
    let load = format!("{load_before} / {}", super::load_average());
    Ok((cells, (started.elapsed(), load)))
}

/// The first `n` lines of a long error (diagnostics follow the reason).
fn first_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= n {
        text.to_owned()
    } else {
        format!(
            "{}\n  ... ({} more lines)",
            lines[..n].join("\n"),
            lines.len() - n
        )
    }
}

/// One run on a fresh cluster, torn down before returning (whatever happened).
fn one_run(bed: &Bed, system: System, fault: Fault) -> anyhow::Result<Measured> {
    let mut builder = Cluster::builder().nodes(2).client(true);
    if matches!(system, System::Ours(_)) {
        builder = builder.private_dir(&bed.data_dir);
    }
    let cluster = builder.build().context("create the namespaces")?;
    let id = cluster.id().to_owned();
    let result = match system {
        System::Ours(timeout) => ours(bed, &cluster, timeout, fault),
        System::Keepalived => keepalived(bed, &cluster, fault),
    };
    drop(cluster);
    let left = safekit_tests::leftovers(&id);
    if !left.is_empty() {
        println!(
            "\nbench failover: cluster {id} left behind: {}",
            left.join("; ")
        );
    }
    result
}

/// A pause of 0 to 1 s (one advert interval, more than any pulse), from the clock's nanoseconds.
fn random_phase() -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or_default();
    Duration::from_millis(u64::from(nanos / 1_000_000))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or_default()
}

/// Probes the VIP until node1 answered for a while, injects the fault, waits
/// for `took_over` and for node2's answers; the interruption the client saw.
fn probe_fault(
    cluster: &Cluster,
    fault: Fault,
    took_over: impl FnMut() -> bool,
    diagnostics: impl Fn() -> String,
) -> anyhow::Result<Measured> {
    let vip = cluster.spare_addr(0, 0);
    let probe = Writer::start_probe(cluster.client(), vip, PORT, PROBE_PERIOD, ProbeMode::Read)?;
    probe
        .wait_acks("node1", ANSWERS_BEFORE)
        .map_err(|error| explained(error, &diagnostics))?;
    // Each run's setup takes about as long as the last, so without this the
    // fault would hit at nearly the same point of the adverts' (or pulses')
    // cycle every time: keepalived's takeover after the fault is 3.61 s minus
    // the time since its last advert, anywhere in 2.61..3.61 s.
    std::thread::sleep(random_phase());
    let since = unix_now();
    let faulted = Instant::now();
    fault.inject(cluster)?;
    wait_for("node2 to take over", Duration::from_secs(30), took_over)
        .map_err(|error| explained(error, &diagnostics))?;
    let takeover = faulted.elapsed();
    probe
        .wait_acks("node2", ANSWERS_AFTER)
        .map_err(|error| explained(error, &diagnostics))?;
    probe.stop()?;
    let gap = interruption(&probe.attempts(), since, "node1", "node2")
        .context("the client never moved from node1 to node2")?;
    Ok(Measured {
        interruption_ms: gap,
        takeover_ms: takeover.as_secs_f64() * 1000.0,
    })
}

/// `error` followed by the nodes' diagnostics (the reason stays on the first line).
fn explained(error: anyhow::Error, diagnostics: impl Fn() -> String) -> anyhow::Error {
    anyhow::anyhow!("{error:#}\n{}", diagnostics())
}

/// Our pair: the demo module with heartbeat timeout `timeout_ms`.
fn ours(bed: &Bed, cluster: &Cluster, timeout_ms: u32, fault: Fault) -> anyhow::Result<Measured> {
    let settings = ModuleSettings {
        vip: cluster.spare_addr(0, 0),
        data_dir: bed.data_dir.clone(),
        port: PORT,
        replicate: true,
    };
    let module_dir = bed.root.join("modules").join(MODULE);
    let install = |k: usize| -> anyhow::Result<DemoNode<'_>> {
        let node = DemoNode::install(
            cluster.node(k),
            cluster,
            &module_dir,
            &settings,
            DEFAULT_SECRET,
            &bed.bin_dir,
        )?;
        set_heart(&node, timeout_ms)?;
        Ok(node)
    };
    let node1 = install(1)?;
    let node2 = install(2)?;
    let _agents = [node1.start_agent()?, node2.start_agent()?];
    node1.safekit_ok(&format!("prim -m {MODULE}"))?;
    node1.wait_state(ALONE)?;
    wait_for("node2 to see node1 ALONE", Duration::from_secs(30), || {
        node2.detail("peer") == "node1 ALONE"
    })
    .map_err(|error| explained(error, || node2.diagnostics()))?;
    node2.safekit_ok(&format!("second -m {MODULE}"))?;
    node2.wait_state(SECOND)?;
    node1.wait_state(PRIM)?;
    probe_fault(
        cluster,
        fault,
        || node2.state() == ALONE,
        || format!("{}\n{}", node1.diagnostics(), node2.diagnostics()),
    )
}

/// Sets the heartbeat pulse and timeout in the installed module's userconfig.xml.
fn set_heart(node: &DemoNode<'_>, timeout_ms: u32) -> anyhow::Result<()> {
    let path = node
        .safe
        .join("modules")
        .join(MODULE)
        .join("conf")
        .join("userconfig.xml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    if text.matches(DEMO_HEART).count() != 1 {
        bail!(
            "modules/demo/conf/userconfig.xml no longer has `{DEMO_HEART}` once: \
             update DEMO_HEART in xtask/src/bench/failover.rs"
        );
    }
    let heart = format!(
        r#"<heart pulse="{}ms" timeout="{timeout_ms}ms">"#,
        pulse_ms(timeout_ms)
    );
    std::fs::write(&path, text.replace(DEMO_HEART, &heart))
        .with_context(|| format!("write {}", path.display()))
}

/// keepalived on both nodes for the same VIP, the demo application on both.
fn keepalived(bed: &Bed, cluster: &Cluster, fault: Fault) -> anyhow::Result<Measured> {
    let vip = cluster.spare_addr(0, 0);
    let app = bed
        .root
        .join("modules")
        .join(MODULE)
        .join("bin")
        .join("demo_app.py");
    let mut daemons = Vec::new();
    for k in [1, 2] {
        let node = cluster.node(k);
        let data = node.state_dir().join("app");
        std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
        node.spawn(format!(
            "exec python3 {} {} {PORT}",
            app.display(),
            data.display()
        ))?;
        daemons.push(start_keepalived(node, k == 1, vip)?);
    }
    let outputs = || {
        daemons
            .iter()
            .zip(["node1", "node2"])
            .map(|(daemon, name)| format!("--- {name} keepalived:\n{}", daemon.output()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_for(
        "node2's keepalived to be BACKUP",
        Duration::from_secs(30),
        || daemons[1].output().contains("Entering BACKUP STATE"),
    )
    .map_err(|error| explained(error, outputs))?;
    probe_fault(
        cluster,
        fault,
        || daemons[1].output().contains("Entering MASTER STATE"),
        outputs,
    )
}

/// Starts keepalived (VRRP only, in the foreground, logging to its output) in `node`.
fn start_keepalived(
    node: &Node,
    master: bool,
    vip: std::net::Ipv4Addr,
) -> anyhow::Result<safekit_tests::NodeProcess> {
    let dir = node.config_dir().join("keepalived");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let config = dir.join("keepalived.conf");
    let (state, priority) = if master {
        ("MASTER", 150)
    } else {
        ("BACKUP", BACKUP_PRIORITY)
    };
    std::fs::write(
        &config,
        format!(
            "global_defs {{\n    router_id {name}\n}}\n\
             vrrp_instance bench {{\n    state {state}\n    interface eth0\n    \
             virtual_router_id 51\n    priority {priority}\n    advert_int {ADVERT_INT_S}\n    \
             virtual_ipaddress {{\n        {vip}/24 dev eth0\n    }}\n}}\n",
            name = node.name()
        ),
    )
    .with_context(|| format!("write {}", config.display()))?;
    let pid = |name: &str| dir.join(name).display().to_string();
    Ok(node.spawn(format!(
        "exec keepalived --dont-fork --log-console --log-detail --no-syslog --vrrp \
         -f {} -p {} -r {} -c {} -b {}",
        config.display(),
        pid("keepalived.pid"),
        pid("vrrp.pid"),
        pid("checkers.pid"),
        pid("bfd.pid")
    ))?)
}

/// Median, min and max of a cell's successful runs, and how many failed.
fn stats(list: &[Result<Measured, String>]) -> Option<(f64, f64, f64)> {
    let values: Vec<f64> = list
        .iter()
        .filter_map(|run| run.as_ref().ok())
        .map(|m| m.interruption_ms)
        .collect();
    let min = values.iter().copied().reduce(f64::min)?;
    let max = values.iter().copied().reduce(f64::max)?;
    Some((median(values)?, min, max))
}

fn seconds(ms: f64) -> String {
    format!("{:.2} s", ms / 1000.0)
}

fn cell_text(list: &[Result<Measured, String>], reference: Option<f64>) -> String {
    let failed = list.iter().filter(|run| run.is_err()).count();
    let mut text = match stats(list) {
        Some((median, min, max)) => {
            let mut t = seconds(median);
            if list.len() > 1 {
                let _ = write!(t, " ({}–{})", seconds(min), seconds(max));
            }
            if let Some(reference) = reference.filter(|r| *r > 0.0) {
                let _ = write!(t, " [{:.2}x]", median / reference);
            }
            t
        }
        None => "FAILED".to_owned(),
    };
    if failed > 0 && failed < list.len() {
        let _ = write!(text, ", {failed} of {} runs FAILED", list.len());
    }
    let takeovers: Vec<f64> = list
        .iter()
        .filter_map(|run| run.as_ref().ok())
        .map(|m| m.takeover_ms)
        .collect();
    if let Some(takeover) = median(takeovers) {
        let _ = write!(text, "; takeover {}", seconds(takeover));
    }
    text
}

/// The results table, in Markdown: one row per fault, one column per setting.
fn table(cells: &Cells) -> String {
    let systems = System::all();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| Fault | {} |",
        systems
            .iter()
            .map(|s| s.label())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|---|{}", "---|".repeat(systems.len()));
    for fault in Fault::ALL {
        let reference = cells
            .get(&(System::Keepalived, fault))
            .and_then(|list| stats(list))
            .map(|(median, _, _)| median);
        let row: Vec<String> = systems
            .iter()
            .map(|&system| match cells.get(&(system, fault)) {
                Some(list) if system == System::Keepalived => cell_text(list, None),
                Some(list) => cell_text(list, reference),
                None => "not run".to_owned(),
            })
            .collect();
        let _ = writeln!(out, "| {} | {} |", fault.label(), row.join(" | "));
    }
    let errors: Vec<String> = cells
        .iter()
        .flat_map(|((system, fault), list)| {
            list.iter().filter_map(move |run| {
                run.as_ref().err().map(|error| {
                    format!(
                        "- {}, {}: {}",
                        system.label(),
                        fault.label(),
                        error.lines().next().unwrap_or("")
                    )
                })
            })
        })
        .collect();
    if !errors.is_empty() {
        let _ = writeln!(out, "\nFailed runs:\n{}", errors.join("\n"));
    }
    out
}

/// The target (<= 1.5 s at timeout 1000 ms), met or missed per fault.
fn verdicts(cells: &Cells) -> String {
    let parts: Vec<String> = Fault::ALL
        .iter()
        .map(|&fault| {
            let verdict = match cells
                .get(&(System::Ours(TIMEOUTS_MS[0]), fault))
                .and_then(|list| stats(list))
            {
                Some((median, ..)) if median <= TARGET_MS => format!("met ({})", seconds(median)),
                Some((median, ..)) => format!("MISSED ({})", seconds(median)),
                None => "MISSED (no successful run)".to_owned(),
            };
            format!("{}: {verdict}", fault.label())
        })
        .collect();
    format!(
        "Target: client-visible interruption <= {} at timeout {} ms (median): {}.\n",
        seconds(TARGET_MS),
        TIMEOUTS_MS[0],
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(values: &[f64]) -> Vec<Result<Measured, String>> {
        values
            .iter()
            .map(|&ms| {
                Ok(Measured {
                    interruption_ms: ms,
                    takeover_ms: ms - 100.0,
                })
            })
            .collect()
    }

    fn cells(ours_1000: &[f64]) -> Cells {
        let mut cells = Cells::new();
        for fault in Fault::ALL {
            cells.insert((System::Ours(1000), fault), runs(ours_1000));
            cells.insert((System::Ours(3000), fault), runs(&[3100.0]));
            cells.insert((System::Keepalived, fault), runs(&[3000.0]));
        }
        cells
    }

    #[test]
    fn the_target_is_judged_on_the_median_at_timeout_1000_ms() {
        let met = verdicts(&cells(&[1100.0, 1200.0, 2900.0]));
        assert!(met.contains("power cut): met (1.20 s)"), "{met}");
        let missed = verdicts(&cells(&[1100.0, 1600.0, 1700.0]));
        assert!(missed.contains("power cut): MISSED (1.60 s)"), "{missed}");
    }

    #[test]
    fn each_cell_shows_median_range_and_ratio_to_keepalived() {
        let mut cells = cells(&[900.0, 1500.0, 1200.0]);
        cells
            .get_mut(&(System::Ours(1000), Fault::LinkDown))
            .expect("cell")
            .push(Err("node2 never took over".to_owned()));
        let table = table(&cells);
        assert!(
            table.contains("| 1.20 s (0.90 s–1.50 s) [0.40x]; takeover 1.10 s |"),
            "{table}"
        );
        assert!(table.contains("1 of 4 runs FAILED"), "{table}");
        assert!(
            table.contains("node1 link down: node2 never took over"),
            "{table}"
        );
    }
}
