//! `cargo xtask bench`: the data-path benchmark of issue 4 (a report, not a test).
//!
//! One invocation runs the same jobs (1 MiB sequential write with end fsync,
//! 4 KiB random write buffered, 4 KiB random write + fsync each, small files
//! created and fsynced) side by side on four targets: the plain directory, our
//! FUSE mount with replication off, and our mount replicating to a second node
//! in the default (strict) mode and in the fsync-only mode. Only ratios from
//! one run count, so every figure is printed next to its ratio to plain, with
//! the CPU time the `safekit-rfs` processes of both nodes used during the job.
//!
//! The test bed ([`env`]) is two network namespaces joined by a veth pair,
//! each node with an ext4 file system of its own on a loop device; both
//! images live on the machine's disk in one pass and in RAM (tmpfs) in the
//! other. The plain baseline runs on node 1's file system. The results go to
//! stdout and to the data-path section of `BENCHMARKS.md` ([`report`]), with
//! the targets and whether this run met them.
//!
//! The reintegration rows of issue 5 ([`resync`]: incremental and full
//! resync against rsync, on a tree of small files and on a big file) run on
//! the same kind of test bed after the data-path jobs, into a section of
//! their own. The failover figures of issue 6 ([`failover`]: client-visible
//! interruption on a crash and on a link down, ours at two heartbeat
//! timeouts next to keepalived) come last, on namespaces of their own;
//! `--only datapath|resync|failover` runs one part alone.
//!
//! Nothing here fails on a threshold: a job that errors is reported as such
//! and the bench goes on; the bench fails only when the test bed cannot be
//! built. Everything it creates is removed on exit, error and interrupt
//! (SIGINT/SIGTERM/SIGHUP), and what a bench killed outright left behind is
//! removed by the next one.

mod env;
mod failover;
mod jobs;
mod procs;
mod report;
mod resync;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use nix::sys::signal::{SigSet, Signal};

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Smaller jobs (a few seconds each) to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Where the nodes' ext4 images live: the machine's disk, RAM (tmpfs), or one pass each.
    #[arg(long, value_enum, default_value_t = StoreChoice::Both)]
    store: StoreChoice,
    /// Jobs to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [JobKind::Seq, JobKind::Rand, JobKind::RandFsync, JobKind::Files])]
    jobs: Vec<JobKind>,
    /// Targets to run the jobs on (comma-separated; ratios need `plain`).
    #[arg(long, value_enum, value_delimiter = ',',
          default_values_t = [TargetKind::Plain, TargetKind::Off, TargetKind::Strict, TargetKind::FsyncOnly])]
    targets: Vec<TargetKind>,
    /// Run the target sequence this many times per backing store and report
    /// medians (targets alternate, so drift from other users of the machine
    /// spreads over all of them).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=9))]
    rounds: u32,
    /// Directory on the machine's disk for the disk-backed images (and the bench's work files).
    #[arg(long, default_value = "/var/tmp")]
    disk_dir: PathBuf,
    /// Use this `safekit-rfs` instead of building it (`cargo build --release`).
    #[arg(long)]
    rfs: Option<PathBuf>,
    /// Run only one part: the data-path jobs, the reintegration (resync) rows
    /// or the failover figures (`--quick`: one run per cell instead of 5).
    #[arg(long, value_enum)]
    only: Option<Part>,
    /// Failover part: do not build the agent; use the `safekit` and
    /// `safekitd` next to xtask's own binary.
    #[arg(long)]
    no_build: bool,
    /// Markdown file whose sections are rewritten (relative to the project root).
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
}

/// `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// The data-path jobs (fio on the mount).
    Datapath,
    /// The reintegration rows (incremental and full resync vs rsync).
    Resync,
    /// The failover figures (client-visible interruption, ours vs keepalived).
    Failover,
}

/// `--store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreChoice {
    Disk,
    Ram,
    Both,
}

/// Where both nodes' images live during one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Disk,
    Ram,
}

impl Store {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Store::Disk => "disk",
            Store::Ram => "ram",
        }
    }
}

/// One measured job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum JobKind {
    /// 1 MiB sequential write with end fsync.
    Seq,
    /// 4 KiB random write, buffered.
    Rand,
    /// 4 KiB random write, fsync after each.
    RandFsync,
    /// Small files created, written and fsynced.
    Files,
}

impl JobKind {
    /// The unit of the job's figure.
    pub(crate) fn unit(self) -> &'static str {
        match self {
            JobKind::Seq => "MB/s",
            JobKind::Rand | JobKind::RandFsync => "IOPS",
            JobKind::Files => "files/s",
        }
    }
}

/// Where the jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub(crate) enum TargetKind {
    /// The plain directory on node 1's file system.
    Plain,
    /// Our mount, replication off.
    Off,
    /// Our mount replicating to node 2, default (strict) mode.
    Strict,
    /// Our mount replicating to node 2, fsync-only mode.
    FsyncOnly,
}

impl TargetKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            TargetKind::Plain => "plain ext4",
            TargetKind::Off => "mount, replication off",
            TargetKind::Strict => "replicated, strict",
            TargetKind::FsyncOnly => "replicated, fsync-only",
        }
    }

    pub(crate) fn slug(self) -> &'static str {
        match self {
            TargetKind::Plain => "plain",
            TargetKind::Off => "off",
            TargetKind::Strict => "strict",
            TargetKind::FsyncOnly => "fsync-only",
        }
    }

    pub(crate) fn replicated(self) -> bool {
        matches!(self, TargetKind::Strict | TargetKind::FsyncOnly)
    }
}

/// The outcome of one job on one target.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    pub(crate) measured: Result<jobs::Measured, String>,
    /// CPU seconds of node 1's and node 2's helpers during the job (and the sync after it).
    pub(crate) cpu: (Option<f64>, Option<f64>),
    /// Operations node 1 recorded as "alone" (not replicated) during the job.
    pub(crate) alone: u64,
}

/// Everything one backing store's pass measured.
#[derive(Debug)]
pub(crate) struct StoreRun {
    pub(crate) store: Store,
    pub(crate) backing: String,
    pub(crate) rtt_p50_us: Option<f64>,
    pub(crate) cells: BTreeMap<(TargetKind, JobKind), Cell>,
    /// Per replicated target: whether node 2's tree matched node 1's.
    pub(crate) peer_checks: Vec<(TargetKind, String)>,
    /// Targets that could not run at all, with the reason.
    pub(crate) target_errors: Vec<(TargetKind, String)>,
    /// Load average of the machine when the pass started and ended (other users of the CPUs).
    pub(crate) load: (String, String),
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub(crate) fn run(root: &Path, args: BenchArgs) -> anyhow::Result<()> {
    env::require_root()?;
    let part = |part: Part| args.only.is_none_or(|only| only == part);
    // Every missing tool is reported before anything long starts.
    if part(Part::Failover) {
        env::require_failover_tools()?;
    }
    let data_parts = part(Part::Datapath) || part(Part::Resync);
    if data_parts {
        env::require_tools()?;
    }
    let interrupted = watch_stop_signals()?;
    env::sweep_stale(&args.disk_dir);
    if data_parts {
        let rfs = match &args.rfs {
            Some(path) => path.clone(),
            None => build_rfs(root)?,
        };
        run_data_parts(root, &args, &rfs, &interrupted)?;
    }
    if part(Part::Failover) {
        failover::run(
            root,
            args.quick,
            !args.no_build,
            &args.disk_dir,
            &args.output,
            &interrupted,
        )?;
    }
    Ok(())
}

/// The data-path jobs and the reintegration rows (the parts that need `safekit-rfs`).
fn run_data_parts(
    root: &Path,
    args: &BenchArgs,
    rfs: &Path,
    interrupted: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let part = |part: Part| args.only.is_none_or(|only| only == part);
    if part(Part::Datapath) {
        run_datapath(root, args, rfs, interrupted)?;
    }
    if part(Part::Resync) {
        // One backing store: the machine's disk unless `--store ram`.
        let store = if args.store == StoreChoice::Ram {
            Store::Ram
        } else {
            Store::Disk
        };
        resync::run(
            root,
            args.quick,
            store,
            &args.disk_dir,
            rfs,
            &args.output,
            interrupted,
        )?;
    }
    Ok(())
}

/// The data-path jobs on every target and backing store, and their section.
fn run_datapath(
    root: &Path,
    args: &BenchArgs,
    rfs: &Path,
    interrupted: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let machine = env::Machine::probe(root, rfs);
    let ticks = env::sh("getconf", &["CLK_TCK"])
        .ok()
        .and_then(|t| t.trim().parse::<f64>().ok())
        .unwrap_or(100.0);
    let stores: Vec<Store> = match args.store {
        StoreChoice::Disk => vec![Store::Disk],
        StoreChoice::Ram => vec![Store::Ram],
        StoreChoice::Both => vec![Store::Disk, Store::Ram],
    };
    let sizes = jobs::Sizes::new(args.quick);
    let mut progress = Progress {
        step: 0,
        total: stores.len() * args.rounds as usize * args.targets.len() * args.jobs.len(),
    };
    println!(
        "bench: {} mode, {} round(s) of {} job(s) x {} target(s) x {} backing store(s), safekit-rfs {}",
        if args.quick { "quick" } else { "full" },
        args.rounds,
        args.jobs.len(),
        args.targets.len(),
        stores.len(),
        rfs.display()
    );
    let started = Instant::now();
    let mut runs = Vec::new();
    for store in stores {
        let run = run_store(store, args, &sizes, rfs, ticks, &mut progress, interrupted)?;
        println!(
            "\n{}",
            report::store_tables(&run, &sizes, &args.targets, &args.jobs)
        );
        runs.push(run);
    }
    let section = report::section(&machine, &runs, &sizes, args, started.elapsed());
    let output = root.join(&args.output);
    report::write_section(&output, &section)?;
    println!("{}", report::targets_text(&runs));
    println!("bench: results written to {}", output.display());
    Ok(())
}

/// `[step/total]` progress lines.
#[derive(Debug)]
struct Progress {
    step: usize,
    total: usize,
}

fn run_store(
    store: Store,
    args: &BenchArgs,
    sizes: &jobs::Sizes,
    rfs: &Path,
    ticks: f64,
    progress: &mut Progress,
    interrupted: &AtomicBool,
) -> anyhow::Result<StoreRun> {
    println!(
        "bench: setting up two nodes with images on {}",
        store.name()
    );
    // Room for one target's files (targets run one after the other, each
    // deleting its files): ~1 GiB in a full run, ~0.3 GiB in a quick one.
    let image_mib = if args.quick { 1024 } else { 3072 };
    let env =
        env::Env::setup(store, &args.disk_dir, image_mib).context("cannot build the test bed")?;
    let rtts = env.ping(50).ok();
    let rtt_p50_us = rtts.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    });
    println!(
        "bench: {}; node1 -> node2 ping p50 {}",
        env.backing,
        rtt_p50_us.map_or("?".to_owned(), |r| format!("{r:.0} µs"))
    );
    let mut run = StoreRun {
        store,
        backing: env.backing.clone(),
        rtt_p50_us,
        cells: BTreeMap::new(),
        peer_checks: Vec::new(),
        target_errors: Vec::new(),
        load: (load_average(), String::new()),
    };
    // The first big write into fresh file systems ran up to 2x slower than
    // the same write later (journal, allocator and backing-store warm-up),
    // which would penalize whichever target comes first: one unmeasured
    // sequential write on node 1 and node 2 first.
    println!("bench: warm-up (one unmeasured sequential write per node)");
    for dir in [env.plain_dir(), env.data_dir(2)] {
        if let Err(error) = jobs::run(JobKind::Seq, sizes, &dir) {
            println!("bench: warm-up failed: {error:#}");
        }
    }
    env.clean()?;
    let mut cells: BTreeMap<(TargetKind, JobKind), Vec<Cell>> = BTreeMap::new();
    let rounds = (1..=args.rounds).flat_map(|round| args.targets.iter().map(move |t| (round, *t)));
    for (round, target) in rounds {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if args.rounds > 1 && target == args.targets[0] {
            println!("bench: round {round} of {}", args.rounds);
        }
        let mut running = match procs::start(target, &env, rfs) {
            Ok(running) => running,
            Err(error) => {
                let message = format!("{error:#}");
                println!("bench: {} cannot start: {message}", target.label());
                run.target_errors.push((target, message));
                progress.step += args.jobs.len();
                env.clean()?;
                continue;
            }
        };
        let dir = if target == TargetKind::Plain {
            env.plain_dir()
        } else {
            env.data_dir(1)
        };
        for &job in &args.jobs {
            if interrupted.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            progress.step += 1;
            print!(
                "[{}/{}] {} on {} ({})... ",
                progress.step,
                progress.total,
                sizes.describe(job),
                target.label(),
                store.name()
            );
            let _ = std::io::stdout().flush();
            let cell = run_job(job, sizes, &dir, &env, &mut running, ticks);
            println!("{}", report::cell_summary(job, &cell));
            cells.entry((target, job)).or_default().push(cell);
        }
        if let Err(error) = running.stop() {
            println!("bench: stopping {}: {error:#}", target.label());
            run.target_errors.push((target, format!("stop: {error:#}")));
        }
        if target.replicated() {
            let check = compare_trees(&env.data_dir(1), &env.data_dir(2));
            println!("bench: node2's copy after {}: {check}", target.label());
            // Keep one verdict per target: the first that is not "identical".
            match run.peer_checks.iter_mut().find(|(t, _)| *t == target) {
                Some(entry) if entry.1.starts_with("identical") => entry.1 = check,
                Some(_) => {}
                None => run.peer_checks.push((target, check)),
            }
        }
        drop(running);
        env.clean()?;
    }
    drop(env);
    run.load.1 = load_average();
    run.cells = cells
        .into_iter()
        .map(|(key, list)| (key, median_cell(list)))
        .collect();
    Ok(run)
}

/// Median of a value list (upper median for even counts); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// One cell from the rounds' cells: medians of what succeeded, the first
/// error when nothing did, the sum of unreplicated operations.
fn median_cell(list: Vec<Cell>) -> Cell {
    let ok: Vec<&jobs::Measured> = list
        .iter()
        .filter_map(|c| c.measured.as_ref().ok())
        .collect();
    let measured = if ok.is_empty() {
        list.iter()
            .find_map(|c| c.measured.as_ref().err().cloned())
            .map_or_else(|| Err("not run".to_owned()), Err)
    } else {
        Ok(jobs::Measured {
            value: median(ok.iter().map(|m| m.value).collect()).unwrap_or(0.0),
            fsync_p50_us: median(ok.iter().filter_map(|m| m.fsync_p50_us).collect()),
            failed: ok.iter().find_map(|m| m.failed.clone()),
        })
    };
    Cell {
        measured,
        cpu: (
            median(list.iter().filter_map(|c| c.cpu.0).collect()),
            median(list.iter().filter_map(|c| c.cpu.1).collect()),
        ),
        alone: list.iter().map(|c| c.alone).sum(),
    }
}

fn run_job(
    job: JobKind,
    sizes: &jobs::Sizes,
    dir: &Path,
    env: &env::Env,
    running: &mut procs::Running,
    ticks: f64,
) -> Cell {
    if !running.alive() {
        return Cell {
            measured: Err("a safekit-rfs process is no longer running".to_owned()),
            cpu: (None, None),
            alone: 0,
        };
    }
    let syncs = || {
        for fs in [dir, env.node1.as_path(), env.node2.as_path()] {
            let _ = Command::new("sync").arg("-f").arg(fs).status();
        }
    };
    syncs();
    let alone_before = running.stats().map(|s| s.alone).unwrap_or(0);
    let before = running.cpu(ticks);
    let measured = jobs::run(job, sizes, dir).map_err(|e| format!("{e:#}"));
    // Count the flush of what the job left dirty (fsync-only mode) in its CPU time.
    syncs();
    let after = running.cpu(ticks);
    let alone_after = running.stats().map(|s| s.alone).unwrap_or(alone_before);
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Cell {
        measured,
        cpu: (delta(before.0, after.0), delta(before.1, after.1)),
        alone: alone_after.saturating_sub(alone_before),
    }
}

/// Compares node 2's tree with node 1's (names, types, sizes); a one-line verdict.
fn compare_trees(a: &Path, b: &Path) -> String {
    match (list_tree(a), list_tree(b)) {
        (Ok(left), Ok(right)) => {
            let bytes: u64 = left.values().map(|(_, size)| size).sum();
            if left == right {
                format!(
                    "identical names, types and sizes ({} entries, {} MiB)",
                    left.len(),
                    bytes >> 20
                )
            } else {
                let missing = left.keys().filter(|k| !right.contains_key(*k)).count();
                let extra = right.keys().filter(|k| !left.contains_key(*k)).count();
                let differ = left
                    .iter()
                    .filter(|(k, v)| right.get(*k).is_some_and(|w| w != *v))
                    .count();
                format!(
                    "DIFFERENT: {missing} missing on node2, {extra} extra, {differ} differ in type or size (of {})",
                    left.len()
                )
            }
        }
        (Err(error), _) | (_, Err(error)) => format!("cannot compare: {error:#}"),
    }
}

fn list_tree(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, (bool, u64)>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let meta = entry.metadata()?;
            let rel = entry.path().strip_prefix(root)?.to_path_buf();
            if meta.is_dir() {
                stack.push(entry.path());
                out.insert(rel, (true, 0));
            } else {
                out.insert(rel, (false, meta.len()));
            }
        }
    }
    Ok(out)
}

/// Builds the helper in release mode and returns its path.
fn build_rfs(root: &Path) -> anyhow::Result<PathBuf> {
    crate::run(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "safekit-linux-helper",
        "--bin",
        "safekit-rfs",
    ]))
    .context("cannot build safekit-rfs (pass --rfs PATH to bench an existing build)")?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root.join(d) })
        .unwrap_or_else(|| root.join("target"));
    let rfs = target_dir.join("release").join("safekit-rfs");
    if !rfs.exists() {
        bail!("built safekit-rfs, but {} does not exist", rfs.display());
    }
    Ok(rfs)
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this (still single-threaded) process and
/// turns them into a flag, so that an interrupted bench still cleans up.
/// Children start with an empty signal mask (std resets it), so fio and the
/// helpers still get the terminal's SIGINT and stop on their own.
fn watch_stop_signals() -> anyhow::Result<Arc<AtomicBool>> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals
        .thread_block()
        .context("cannot block the stop signals")?;
    let flag = Arc::new(AtomicBool::new(false));
    let seen = flag.clone();
    std::thread::Builder::new()
        .name("bench-signals".to_owned())
        .spawn(move || {
            while let Ok(signal) = signals.wait() {
                eprintln!("\nbench: {signal:?}: stopping after the current job and cleaning up");
                seen.store(true, Ordering::SeqCst);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(flag)
}
