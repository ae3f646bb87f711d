//! `cargo xtask bench --only resync`: the reintegration rows of issue 5 (a report, not a test).
//!
//! Two data sets, each on the same two-node test bed as the data-path bench
//! ([`super::env`]): a tree of many 4 KiB files and one big file. For each,
//! side by side in one run:
//!
//! - a full copy to an empty node 2: our full resync (`safekit-rfs resync
//!   --full` to `safekit-rfs receive`), `rsync -a` to an rsync daemon on node 2
//!   over the same veth pair (the link's practical speed), and a local copy
//!   from node 1's file system to node 2's (`cp -a` / `dd`, the disks' speed);
//! - after 1% of the files (or of the big file's 64 KiB blocks) changed on
//!   node 1: our incremental resync (the changed paths, and the big file's
//!   changed ranges, recorded in the dirty log as the mount records writes
//!   made while the peer is absent) against `rsync -a --delete` and
//!   `rsync -a --delete --checksum`, each bringing the same old state on node 2
//!   up to date.
//!
//! Disk: node 2 keeps one copy of the data set. The copy our full resync made
//! is the old state; after each incremental method it is put back to the old
//! state (the changed files' or blocks' old bytes and mtimes, saved before the
//! change) for the next method. Each set's trees are deleted before the next.
//! The run refuses to start without room for its two images.
//!
//! In full mode, the resync race of issue 5 follows: the library test
//! `resync_while_writers_rewrite_create_rename_and_delete_ends_identical` at
//! 1 GiB (CI runs it at 64 MiB), which asserts identical trees.
//!
//! Every copy is checked (`diff -rq`) against node 1 afterwards. Nothing fails
//! on a threshold; the results go to stdout and to the reintegration section
//! of `BENCHMARKS.md`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

use super::env::{self, Env, NODE2_ADDR, path_str, sh};
use super::procs::Helper;
use super::{Store, report};

/// Our receiver's port on node 2.
const RFS_PORT: u16 = 7610;
/// The rsync daemon's port on node 2.
const RSYNC_PORT: u16 = 8730;
/// Block size of the big file's changes (our comparison block).
const BLOCK: u64 = 64 * 1024;

const BEGIN: &str = "<!-- reintegration bench: begin (written by `cargo xtask bench`; edit outside these markers) -->";
const END: &str = "<!-- reintegration bench: end -->";

/// The two data sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataSet {
    /// `files` files of 4 KiB, 1000 per directory.
    Tree { files: u64 },
    /// One file of `bytes`.
    Big { bytes: u64 },
}

impl DataSet {
    fn slug(self) -> &'static str {
        match self {
            DataSet::Tree { .. } => "tree",
            DataSet::Big { .. } => "big",
        }
    }

    fn describe(self) -> String {
        match self {
            DataSet::Tree { files } => format!("{files} files of 4 KiB, 1% rewritten"),
            DataSet::Big { bytes } => {
                format!(
                    "one {} MiB file, 1% of its 64 KiB blocks rewritten",
                    bytes >> 20
                )
            }
        }
    }

    fn bytes(self) -> u64 {
        match self {
            DataSet::Tree { files } => files * 4096,
            DataSet::Big { bytes } => bytes,
        }
    }
}

/// One timed method.
#[derive(Debug, Clone)]
struct Row {
    method: String,
    result: Result<Timed, String>,
    /// `diff -rq` against node 1 afterwards.
    check: String,
    /// Our engine's counters (its `resync:` line), for our rows.
    detail: Option<String>,
    /// Every run's time, sorted, when the row is the median of several.
    runs: Vec<f64>,
}

/// Runs of each incremental method; the table shows the median (one run
/// takes tens of milliseconds, where a busy machine's noise is large).
const INCREMENTAL_RUNS: usize = 3;

/// The run with the median time of `rows` (all of one method), with every
/// run's time; the first failed run if one failed, and the first copy that
/// was not identical.
fn median_of(mut rows: Vec<Row>) -> Row {
    if let Some(index) = rows.iter().position(|row| row.result.is_err()) {
        return rows.swap_remove(index);
    }
    let check = rows
        .iter()
        .map(|row| row.check.clone())
        .find(|check| check != "identical")
        .unwrap_or_else(|| "identical".to_owned());
    let seconds = |row: &Row| row.result.as_ref().map_or(f64::MAX, |t| t.seconds);
    rows.sort_by(|a, b| seconds(a).total_cmp(&seconds(b)));
    let runs: Vec<f64> = rows.iter().map(seconds).collect();
    let mut median = rows.swap_remove(rows.len() / 2);
    median.check = check;
    median.runs = runs;
    median
}

/// What [`change`] did: enough to record it and to undo it on a copy.
#[derive(Debug, Default)]
struct Changed {
    /// Changed paths, relative.
    paths: Vec<String>,
    /// The big file's changed byte ranges (`OFFSET+LEN`), for the dirty log.
    ranges: Vec<String>,
    /// Bytes rewritten.
    bytes: u64,
    /// `(path, offset, old bytes)` of every rewrite.
    old: Vec<(String, u64, Vec<u8>)>,
    /// The changed files' mtimes before the change.
    old_mtimes: Vec<(String, SystemTime)>,
}

#[derive(Debug, Clone, Copy)]
struct Timed {
    seconds: f64,
    /// Bytes the method put on the wire (`None` for local copies).
    wire_bytes: Option<u64>,
}

/// Everything measured for one data set.
#[derive(Debug)]
struct SetRun {
    set: DataSet,
    full: Vec<Row>,
    incremental: Vec<Row>,
    changed: String,
}

/// The 1 GiB resync race (full mode).
#[derive(Debug)]
struct RaceRun {
    mib: u64,
    result: Result<f64, String>,
}

/// A tiny deterministic PRNG (xorshift64*): incompressible-enough data, fast.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

pub(crate) fn run(
    root: &Path,
    quick: bool,
    store: Store,
    disk_dir: &Path,
    rfs: &Path,
    output: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<()> {
    if Command::new("rsync").arg("--version").output().is_err() {
        bail!("rsync is missing (apt-get install -y rsync)");
    }
    let sets = if quick {
        [
            DataSet::Tree { files: 10_000 },
            DataSet::Big { bytes: 256 << 20 },
        ]
    } else {
        [
            DataSet::Tree { files: 100_000 },
            DataSet::Big { bytes: 4 << 30 },
        ]
    };
    // Node 2 keeps one copy of the largest set (4 GiB in full mode), plus
    // rsync's temporary copy of the big file while it rebuilds it: 8 GiB, and
    // ext4's own overhead. Node 1 holds the set. Both images have one size.
    let image_mib: u64 = if quick { 1024 } else { 9216 };
    // The race test's two 1 GiB files, in the temporary directory, after the images are gone.
    let race_mib: u64 = if quick { 0 } else { 1024 };
    let avail_mib = sh("df", &["--output=avail", "-B1M", &path_str(disk_dir)?])
        .ok()
        .and_then(|out| {
            out.lines()
                .nth(1)
                .and_then(|l| l.trim().parse::<u64>().ok())
        });
    if store == Store::Disk
        && let Some(avail) = avail_mib
        && avail < 2 * image_mib + 512
    {
        bail!(
            "not enough disk space: the reintegration bench ({} mode) needs {} MiB free in {} \
             for its two {image_mib} MiB images, and {avail} MiB are; free some space or run \
             --quick",
            if quick { "quick" } else { "full" },
            2 * image_mib + 512,
            disk_dir.display()
        );
    }
    println!(
        "bench resync: {} mode; setting up two nodes with {image_mib} MiB images on {}",
        if quick { "quick" } else { "full" },
        store.name()
    );
    let started = Instant::now();
    let machine = env::Machine::probe(root, rfs);
    let env = Env::setup(store, disk_dir, image_mib).context("cannot build the test bed")?;
    let rsyncd = start_rsyncd(&env)?;
    let mut runs = Vec::new();
    for set in sets {
        if interrupted.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        let run = run_set(&env, set, rfs, interrupted)?;
        println!("\n{}", set_table(&run));
        runs.push(run);
    }
    drop(rsyncd);
    drop(env);
    let race = (race_mib > 0 && !interrupted.load(Ordering::SeqCst)).then(|| race(root, race_mib));
    if let Some(race) = &race {
        println!("\n{}", race_text(race));
    }
    let rsync_version = sh("rsync", &["--version"])
        .ok()
        .and_then(|v| v.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let mut section = String::new();
    let _ = writeln!(
        section,
        "{BEGIN}\n## Reintegration: incremental and full resync\n"
    );
    let _ = writeln!(
        section,
        "Written by `cargo xtask bench --only resync{}` on {} ({:.0} s), commit {}. \
         Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}. Helper: {}. {rsync_version}.\n",
        if quick { " --quick" } else { "" },
        machine.date,
        started.elapsed().as_secs_f64(),
        machine.commit,
        machine.cpus,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.rfs,
    );
    let _ = writeln!(
        section,
        "Setup: the data-path bench's two nodes (network namespaces joined by a veth pair, each \
         with an ext4 image of its own on a loop device, images on {}). Ours: `safekit-rfs \
         resync` on node 1 (6 workers, 64 KiB blocks) to `safekit-rfs receive` on node 2; the \
         incremental run compares only the paths recorded in node 1's dirty log. rsync: client \
         on node 1 to an rsync daemon on node 2 over the same veth pair (no ssh, delta transfer \
         on). Each incremental method updates the same old state on node 2 (the copy our full \
         resync made, put back to the old state between methods: the changed bytes and \
         mtimes restored). Local copy: `cp -a` / `dd bs=4M conv=fsync` from \
         node 1's file system to node 2's, no network. Wire bytes: our sender's stream bytes, \
         rsync's \"Total bytes sent\". Page caches are warm for every method (the source was \
         just written). Check: `diff -rq` of node 2's copy against node 1 afterwards.\n",
        store.name()
    );
    for run in &runs {
        section.push_str(&set_table(run));
        section.push('\n');
    }
    if let Some(race) = &race {
        let _ = writeln!(section, "### Resync race\n\n{}\n", race_text(race));
    }
    let _ = writeln!(section, "{END}");
    let path = root.join(output);
    report::write_marked(&path, BEGIN, END, &section)?;
    println!("bench resync: results written to {}", path.display());
    Ok(())
}

/// Node 2's rsync daemon serving its file system root as module `n2`.
fn start_rsyncd(env: &Env) -> anyhow::Result<Helper> {
    let config = env.misc.join("rsyncd.conf");
    std::fs::write(
        &config,
        format!(
            "uid = root\ngid = root\nuse chroot = no\nmax connections = 4\n\
             log file = {}\n[n2]\n  path = {}\n  read only = false\n",
            path_str(&env.misc.join("rsyncd.log"))?,
            path_str(&env.node2)?
        ),
    )
    .context("cannot write rsyncd.conf")?;
    let mut command = env.in_node(2, Path::new("rsync"));
    command.args([
        "--daemon",
        "--no-detach",
        &format!("--config={}", path_str(&config)?),
        &format!("--address={NODE2_ADDR}"),
        &format!("--port={RSYNC_PORT}"),
    ]);
    let helper = Helper::spawn("rsync daemon (node2)", command, env.misc.join("rsyncd.out"))?;
    let start = Instant::now();
    loop {
        let probe = env
            .in_node(1, Path::new("rsync"))
            .arg(format!("rsync://{NODE2_ADDR}:{RSYNC_PORT}/"))
            .output();
        if probe.is_ok_and(|o| o.status.success()) {
            return Ok(helper);
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the rsync daemon on node 2 does not answer");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_set(
    env: &Env,
    set: DataSet,
    rfs: &Path,
    interrupted: &AtomicBool,
) -> anyhow::Result<SetRun> {
    let slug = set.slug();
    let src = env.data_dir(1).join(slug);
    let ours = env.data_dir(2).join(slug);
    let ours_rel = ours
        .strip_prefix(&env.node2)
        .context("node 2's data directory is beneath its file system")?
        .to_path_buf();
    let scratch = env.node2.join("scratch").join(slug);
    for dir in [&src, &env.node2.join("scratch")] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    println!("bench resync: {}: writing node 1's data", set.describe());
    let mut rng = Rng(0x5eed_0000_0000_0001 ^ set.bytes());
    populate(&src, set, &mut rng)?;
    sync_all(env);
    let mut run = SetRun {
        set,
        full: Vec::new(),
        incremental: Vec::new(),
        changed: String::new(),
    };
    let secret = env.misc.join("secret");
    if !secret.exists() {
        std::fs::write(&secret, "reintegration bench secret").context("cannot write the secret")?;
    }

    // Full copies to an empty node 2: the baselines into a scratch directory
    // (removed after each), ours last: its copy is the old state below.
    step(&format!("{slug}: rsync -a to an empty node 2"));
    let row = rsync(env, &src, &format!("scratch/{slug}"), &[]);
    let rsync_row = checked("rsync -a (link baseline)", row, &src, &scratch);
    remove(&scratch)?;
    sync_all(env);
    check_stop(interrupted)?;
    step(&format!(
        "{slug}: local copy node 1 -> node 2 (disk baseline)"
    ));
    let row = local_copy(set, &src, &scratch);
    let local_row = checked(
        match set {
            DataSet::Tree { .. } => "local cp -a (disk baseline)",
            DataSet::Big { .. } => "local dd (disk baseline)",
        },
        row,
        &src,
        &scratch,
    );
    remove(&scratch)?;
    sync_all(env);
    check_stop(interrupted)?;
    step(&format!("{slug}: our full resync to an empty node 2"));
    let dirty_log = env.misc.join(format!("dirty-{slug}.log"));
    let row = ours_resync(env, rfs, &secret, &src, &ours, &dirty_log, true);
    run.full
        .push(checked_ours("ours: full resync", row, &src, &ours));
    run.full.push(rsync_row);
    run.full.push(local_row);
    check_stop(interrupted)?;
    if run.full[0].check != "identical" {
        bail!("our full resync did not make an identical copy; no incremental rows");
    }
    sync_all(env);

    // rsync's quick check compares mtimes to the second: change in a later second.
    std::thread::sleep(Duration::from_millis(1100));
    let changed = change(&src, set, &mut rng)?;
    run.changed = format!(
        "{} path(s) and {} range(s) in the dirty log, {} KiB rewritten",
        changed.paths.len(),
        changed.ranges.len(),
        changed.bytes >> 10
    );
    let recorded = record_dirty(rfs, &dirty_log, &changed)?;
    println!(
        "bench resync: {slug}: changed on node 1 ({}); {recorded}",
        run.changed
    );
    sync_all(env);
    check_stop(interrupted)?;

    // Each method brings the same old state up to date, INCREMENTAL_RUNS times.
    let mut rows = Vec::new();
    for attempt in 0..INCREMENTAL_RUNS {
        if attempt > 0 {
            revert(&ours, &changed)?;
            record_dirty(rfs, &dirty_log, &changed)?;
            sync_all(env);
        }
        step(&format!("{slug}: our incremental resync (dirty log)"));
        let row = ours_resync(env, rfs, &secret, &src, &ours, &dirty_log, false);
        rows.push(checked_ours("ours: incremental resync", row, &src, &ours));
        check_stop(interrupted)?;
    }
    run.incremental.push(median_of(rows));
    let ours_dest = path_str(&ours_rel)?;
    for (method, extra) in [
        ("rsync -a --delete", &["--delete"][..]),
        (
            "rsync -a --delete --checksum",
            &["--delete", "--checksum"][..],
        ),
    ] {
        let mut rows = Vec::new();
        for _ in 0..INCREMENTAL_RUNS {
            revert(&ours, &changed)?;
            sync_all(env);
            step(&format!("{slug}: {method}"));
            let row = rsync(env, &src, &ours_dest, extra);
            rows.push(checked(method, row, &src, &ours));
            check_stop(interrupted)?;
        }
        run.incremental.push(median_of(rows));
    }
    for dir in [&src, &ours] {
        remove(dir)?;
    }
    sync_all(env);
    Ok(run)
}

/// Records `changed` in a fresh dirty log (as the mount records writes made
/// while the peer is absent), with no resync cursor; returns what
/// `safekit-rfs dirty-add` said.
fn record_dirty(rfs: &Path, dirty_log: &Path, changed: &Changed) -> anyhow::Result<String> {
    let _ = std::fs::remove_file(dirty_log);
    let _ = std::fs::remove_file(cursor_of(dirty_log));
    let mut add = Command::new(rfs);
    add.args(["dirty-add", "--dirty-log", &path_str(dirty_log)?]);
    for range in &changed.ranges {
        add.arg(format!("--range={range}"));
    }
    add.arg("--");
    add.args(&changed.paths);
    let out = add.output().context("cannot run safekit-rfs dirty-add")?;
    if !out.status.success() {
        bail!(
            "safekit-rfs dirty-add failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Puts node 2's `copy` back to the old state: the changed bytes and mtimes.
fn revert(copy: &Path, changed: &Changed) -> anyhow::Result<()> {
    for (rel, offset, old) in &changed.old {
        let path = copy.join(rel);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        file.write_all_at(old, *offset)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for (rel, mtime) in &changed.old_mtimes {
        let path = copy.join(rel);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|file| file.set_times(std::fs::FileTimes::new().set_modified(*mtime)))
            .with_context(|| format!("cannot set the mtime of {}", path.display()))?;
    }
    Ok(())
}

/// Runs the race test at `mib` MiB (it asserts identical trees).
fn race(root: &Path, mib: u64) -> RaceRun {
    step(&format!(
        "resync race: {mib} MiB file rewritten and files created/renamed/deleted during a full resync"
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let start = Instant::now();
    let out = Command::new(cargo)
        .current_dir(root)
        .args([
            "test",
            "--release",
            "-p",
            "safekit-linux-helper",
            "--test",
            "resync",
            "--",
            "--exact",
            "resync_while_writers_rewrite_create_rename_and_delete_ends_identical",
        ])
        .env("SAFEKIT_RESYNC_RACE_MIB", mib.to_string())
        .output();
    let seconds = start.elapsed().as_secs_f64();
    let result = match out {
        Ok(out) if out.status.success() => Ok(seconds),
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let failure = text
                .lines()
                .chain(String::from_utf8_lossy(&out.stderr).lines())
                .find(|l| l.contains("panicked") || l.contains("error"))
                .unwrap_or("failed")
                .to_owned();
            Err(failure)
        }
        Err(error) => Err(format!("cannot run cargo test: {error}")),
    };
    match &result {
        Ok(seconds) => println!("passed in {seconds:.0} s"),
        Err(error) => println!("FAILED: {error}"),
    }
    RaceRun { mib, result }
}

fn race_text(race: &RaceRun) -> String {
    match &race.result {
        Ok(seconds) => format!(
            "A full resync of a {} MiB file while a writer rewrites random blocks of it (up to \
             64 KiB each) and a second writer creates, renames and deletes files (the big one \
             too): trees identical afterwards (content, type, mode, owner, size; then mtimes \
             after a settling pass). The library test \
             `resync_while_writers_rewrite_create_rename_and_delete_ends_identical` at \
             `SAFEKIT_RESYNC_RACE_MIB={}` (CI runs it at 1024 MiB too, in a debug build), release build, loopback, \
             {seconds:.0} s including the build check and writing the file.",
            race.mib, race.mib
        ),
        Err(error) => format!(
            "The {} MiB resync race FAILED: {}",
            race.mib,
            error.replace('|', "/")
        ),
    }
}

fn check_stop(interrupted: &AtomicBool) -> anyhow::Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(what: &str) {
    print!("bench resync: {what}... ");
    let _ = std::io::stdout().flush();
}

/// Prints the row's summary and adds the `diff -rq` verdict.
fn checked(method: &str, result: anyhow::Result<Timed>, src: &Path, copy: &Path) -> Row {
    let result = result.map_err(|e| format!("{e:#}"));
    let check = match &result {
        Ok(_) => diff(src, copy),
        Err(_) => "-".to_owned(),
    };
    match &result {
        Ok(t) => println!(
            "{:.2} s, {} on the wire; copy {check}",
            t.seconds,
            t.wire_bytes.map_or("-".to_owned(), mib)
        ),
        Err(error) => println!("FAILED: {error}"),
    }
    Row {
        method: method.to_owned(),
        result,
        check,
        detail: None,
        runs: Vec::new(),
    }
}

/// [`checked`] for our runs, keeping the engine's counters.
fn checked_ours(
    method: &str,
    result: anyhow::Result<(Timed, String)>,
    src: &Path,
    copy: &Path,
) -> Row {
    let (result, detail) = match result {
        Ok((timed, detail)) => (Ok(timed), Some(detail)),
        Err(error) => (Err(error), None),
    };
    Row {
        detail,
        ..checked(method, result, src, copy)
    }
}

fn diff(a: &Path, b: &Path) -> String {
    match Command::new("diff").arg("-rq").arg(a).arg(b).output() {
        Ok(out) if out.status.success() => "identical".to_owned(),
        Ok(out) => format!(
            "DIFFERENT ({} lines of diff -rq)",
            String::from_utf8_lossy(&out.stdout).lines().count()
        ),
        Err(error) => format!("cannot diff: {error}"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn remove(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    Ok(())
}

fn sync_all(env: &Env) {
    for fs in [&env.node1, &env.node2] {
        let _ = Command::new("sync").arg("-f").arg(fs).status();
    }
}

fn cursor_of(dirty_log: &Path) -> PathBuf {
    let mut name = dirty_log.to_path_buf().into_os_string();
    name.push(".cursor");
    PathBuf::from(name)
}

/// Writes the data set beneath `dir`.
fn populate(dir: &Path, set: DataSet, rng: &mut Rng) -> anyhow::Result<()> {
    match set {
        DataSet::Tree { files } => {
            let mut buf = vec![0u8; 4096];
            for i in 0..files {
                let sub = dir.join(format!("d{:03}", i / 1000));
                if i % 1000 == 0 {
                    std::fs::create_dir_all(&sub)?;
                }
                rng.fill(&mut buf);
                std::fs::write(sub.join(format!("f{i:06}")), &buf)?;
            }
        }
        DataSet::Big { bytes } => {
            let mut file = std::fs::File::create(dir.join("big.bin"))?;
            let mut buf = vec![0u8; 4 << 20];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64);
                let chunk = &mut buf[..usize::try_from(n)?];
                rng.fill(chunk);
                file.write_all(chunk)?;
                left -= n;
            }
        }
    }
    Ok(())
}

/// Rewrites 1% of the set on node 1, saving what it overwrote.
fn change(dir: &Path, set: DataSet, rng: &mut Rng) -> anyhow::Result<Changed> {
    let mut changed = Changed::default();
    let mtime = |path: &Path| -> anyhow::Result<SystemTime> {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .with_context(|| format!("cannot stat {}", path.display()))
    };
    match set {
        DataSet::Tree { files } => {
            let mut buf = vec![0u8; 4096];
            for i in (0..files).step_by(100) {
                let rel = format!("d{:03}/f{i:06}", i / 1000);
                let path = dir.join(&rel);
                changed.old_mtimes.push((rel.clone(), mtime(&path)?));
                changed.old.push((rel.clone(), 0, std::fs::read(&path)?));
                rng.fill(&mut buf);
                std::fs::write(&path, &buf)?;
                changed.paths.push(rel);
            }
            changed.bytes = changed.paths.len() as u64 * 4096;
        }
        DataSet::Big { bytes } => {
            let blocks = bytes / BLOCK;
            let path = dir.join("big.bin");
            changed
                .old_mtimes
                .push(("big.bin".to_owned(), mtime(&path)?));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)?;
            let mut buf = vec![0u8; usize::try_from(BLOCK)?];
            // Every 100th block, shifted by a random amount within its stride.
            for stride in (0..blocks).step_by(100) {
                let block = (stride + rng.next() % 100).min(blocks - 1);
                let mut old = vec![0u8; usize::try_from(BLOCK)?];
                file.read_exact_at(&mut old, block * BLOCK)?;
                changed.old.push(("big.bin".to_owned(), block * BLOCK, old));
                rng.fill(&mut buf);
                file.write_all_at(&buf, block * BLOCK)?;
                changed.ranges.push(format!("{}+{BLOCK}", block * BLOCK));
                changed.bytes += BLOCK;
            }
            file.sync_all()?;
            changed.paths.push("big.bin".to_owned());
        }
    }
    Ok(changed)
}

/// `safekit-rfs receive` on node 2 serving `dst`, `safekit-rfs resync` on node 1 from `src`.
fn ours_resync(
    env: &Env,
    rfs: &Path,
    secret: &Path,
    src: &Path,
    dst: &Path,
    dirty_log: &Path,
    full: bool,
) -> anyhow::Result<(Timed, String)> {
    std::fs::create_dir_all(dst)?;
    let addr = format!("{NODE2_ADDR}:{RFS_PORT}");
    let mut receive = env.in_node(2, rfs);
    receive
        .args(["receive", "--dir", &path_str(dst)?, "--listen", &addr])
        .args(["--secret-file", &path_str(secret)?, "--module", "bench"]);
    let mut receiver = Helper::spawn(
        "safekit-rfs receive (node2)",
        receive,
        env.misc
            .join(format!("receive-{}.log", if full { "full" } else { "inc" })),
    )?;
    receiver.wait_for(|l| l.contains(": receiving") || l.contains("receiver listening"))?;
    let mut resync = env.in_node(1, rfs);
    resync
        .args(["resync", "--dir", &path_str(src)?, "--peer", &addr])
        .args(["--secret-file", &path_str(secret)?, "--module", "bench"])
        .args(["--dirty-log", &path_str(dirty_log)?]);
    if full {
        resync.arg("--full");
    }
    resync.env("RUST_LOG", "warn").env("NO_COLOR", "1");
    let start = Instant::now();
    let out = resync.output().context("cannot run safekit-rfs resync")?;
    let seconds = start.elapsed().as_secs_f64();
    // Count the replica's flush to disk, as rsync's own close and our local copy do.
    let _ = Command::new("sync").arg("-f").arg(dst).status();
    let seconds_synced = start.elapsed().as_secs_f64();
    let stop = receiver.stop();
    if !out.status.success() {
        bail!(
            "safekit-rfs resync failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    stop.context("the receiver did not stop cleanly")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("resync:"))
        .context("safekit-rfs resync printed no `resync:` line")?;
    let field = |key: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
    };
    print_stats_line(line, seconds);
    Ok((
        Timed {
            seconds: seconds_synced,
            wire_bytes: field("stream_bytes"),
        },
        line.to_owned(),
    ))
}

fn print_stats_line(line: &str, seconds: f64) {
    print!("[{line}; {seconds:.2} s before sync] ");
}

/// rsync from node 1's `src` to `n2/<dest>` on node 2's daemon.
fn rsync(env: &Env, src: &Path, dest: &str, extra: &[&str]) -> anyhow::Result<Timed> {
    let mut command = env.in_node(1, Path::new("rsync"));
    command
        .args(["-a", "--stats"])
        .args(extra)
        .arg(format!("{}/", path_str(src)?))
        .arg(format!("rsync://{NODE2_ADDR}:{RSYNC_PORT}/n2/{dest}/"));
    let start = Instant::now();
    let out = command.output().context("cannot run rsync")?;
    let _ = Command::new("sync").arg("-f").arg(&env.node2).status();
    let seconds = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "rsync failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let sent = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent:"))
        .map(|v| v.trim().replace(',', ""))
        .and_then(|v| v.parse().ok());
    Ok(Timed {
        seconds,
        wire_bytes: sent,
    })
}

/// A local copy from node 1's file system to node 2's.
fn local_copy(set: DataSet, src: &Path, dst: &Path) -> anyhow::Result<Timed> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let start = Instant::now();
    match set {
        DataSet::Tree { .. } => {
            sh("cp", &["-a", &path_str(src)?, &path_str(dst)?])?;
            sh("sync", &["-f", &path_str(dst)?])?;
        }
        DataSet::Big { .. } => {
            std::fs::create_dir_all(dst)?;
            sh(
                "dd",
                &[
                    &format!("if={}", path_str(&src.join("big.bin"))?),
                    &format!("of={}", path_str(&dst.join("big.bin"))?),
                    "bs=4M",
                    "conv=fsync",
                    "status=none",
                ],
            )?;
        }
    }
    Ok(Timed {
        seconds: start.elapsed().as_secs_f64(),
        wire_bytes: None,
    })
}

/// The markdown tables of one data set.
fn set_table(run: &SetRun) -> String {
    let mut out = String::new();
    let total = run.set.bytes();
    let _ = writeln!(out, "### {}\n", run.set.describe());
    let _ = writeln!(out, "Full copy to an empty node 2 ({}):\n", mib(total));
    let _ = writeln!(
        out,
        "| method | time | throughput | wire | vs ours | copy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    let ours_full = run
        .full
        .first()
        .and_then(|r| r.result.as_ref().ok().copied());
    for row in &run.full {
        let _ = writeln!(out, "{}", row_line(row, total, ours_full, true));
    }
    if let Some(ours) = ours_full {
        let share = |name: &str, row: Option<&Row>| {
            row.and_then(|r| r.result.as_ref().ok())
                .map(|t| format!("{:.0}% of {name}", 100.0 * t.seconds / ours.seconds))
        };
        let shares: Vec<String> = [
            share("the link (rsync -a)", run.full.get(1)),
            share("the disks (local copy)", run.full.get(2)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !shares.is_empty() {
            let _ = writeln!(out, "\nOur full resync runs at {}.", shares.join(" and "));
        }
        // The slower of the link and the disks bounds any full copy.
        let bound = run.full[1..]
            .iter()
            .filter_map(|r| r.result.as_ref().ok())
            .map(|t| t.seconds)
            .fold(None, |slowest: Option<f64>, s| {
                Some(slowest.map_or(s, |x| x.max(s)))
            });
        if let Some(bound) = bound {
            let _ = writeln!(
                out,
                "Throughput: ours {:.0} MB/s = {:.0}% of min(disk, link) = {:.0} MB/s (target >= 80%).",
                total as f64 / ours.seconds / 1e6,
                100.0 * bound / ours.seconds,
                total as f64 / bound / 1e6
            );
        }
    }
    let _ = writeln!(
        out,
        "\nIncremental after the change ({}); \"vs ours\" is the method's time / ours:\n",
        run.changed
    );
    let _ = writeln!(
        out,
        "| method | time | throughput | wire | vs ours | copy |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    let ours_inc = run
        .incremental
        .first()
        .and_then(|r| r.result.as_ref().ok().copied());
    for row in &run.incremental {
        let _ = writeln!(out, "{}", row_line(row, total, ours_inc, false));
    }
    if let Some(ours) = ours_inc {
        let ratios: Vec<String> = run.incremental[1..]
            .iter()
            .filter_map(|r| {
                let t = r.result.as_ref().ok()?;
                Some(format!("{} {:.1}x", r.method, t.seconds / ours.seconds))
            })
            .collect();
        let _ = writeln!(
            out,
            "\nOurs is faster than {} (target >= 10x).",
            ratios.join(", ")
        );
    }
    for row in run.full.iter().chain(&run.incremental) {
        if let Some(detail) = &row.detail {
            let _ = writeln!(out, "\n{}: `{detail}`", row.method);
        }
    }
    out
}

/// Seconds with three significant decimals below one second.
fn seconds(s: f64) -> String {
    if s < 1.0 {
        format!("{s:.3} s")
    } else {
        format!("{s:.2} s")
    }
}

fn row_line(row: &Row, total: u64, ours: Option<Timed>, full: bool) -> String {
    match &row.result {
        Ok(t) => {
            let throughput = if full {
                format!("{:.0} MB/s", total as f64 / t.seconds / 1e6)
            } else {
                format!("{:.0} MB/s of data set", total as f64 / t.seconds / 1e6)
            };
            let ratio = ours.map_or("-".to_owned(), |o| format!("{:.2}x", t.seconds / o.seconds));
            let time = match row.runs.as_slice() {
                [first, .., last] => format!(
                    "{} (median of {}: {}-{})",
                    seconds(t.seconds),
                    row.runs.len(),
                    seconds(*first),
                    seconds(*last)
                ),
                _ => seconds(t.seconds),
            };
            format!(
                "| {} | {time} | {throughput} | {} | {ratio} | {} |",
                row.method,
                t.wire_bytes.map_or("-".to_owned(), mib),
                row.check
            )
        }
        Err(error) => format!(
            "| {} | failed: {} | | | | |",
            row.method,
            error.replace('|', "/").lines().next().unwrap_or("")
        ),
    }
}
