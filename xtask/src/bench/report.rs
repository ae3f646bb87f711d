//! Turning the bench's measurements into tables, target verdicts and the
//! data-path section of `BENCHMARKS.md`.
//!
//! The section sits between two HTML comment markers; only that part of the
//! file is rewritten, so other benches (and hand-written notes outside the
//! markers, such as why a target was missed) keep their sections.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::env::Machine;
use super::jobs::Sizes;
use super::{BenchArgs, Cell, JobKind, Store, StoreRun, TargetKind};

const BEGIN: &str =
    "<!-- data-path bench: begin (written by `cargo xtask bench`; edit outside these markers) -->";
const END: &str = "<!-- data-path bench: end -->";

/// Ratio to plain of a minimal fuser 0.18 pass-through (1 thread, defaults)
/// on a machine whose plain ext4 did ~1.7 GB/s and 18k fsync IOPS:
/// `linux-facts.md`, low end of each range. Order: seq, write+fsync,
/// buffered, files.
const FAST_DISK_REF: [f64; 4] = [0.50, 0.58, 0.29, 0.56];
/// The same kind of program on a machine whose plain ext4 did ~400 MB/s and
/// 4.7k fsync IOPS: `anchors.md` ("a plain fuser passthrough (1 thread)":
/// ~90%, ~87%, ~10%, ~50%), matching `linux-facts.md` ("about 0.9").
const SLOW_DISK_REF: [f64; 4] = [0.90, 0.87, 0.10, 0.50];
/// Plain figure of each job from which the fast-disk reference applies: the
/// fixed per-request cost of FUSE weighs more when the disk is fast, so the
/// reference ratio depends on how fast plain was in this very run (midway,
/// geometrically, between the two machines). Buffered writes never reach the
/// disk: the fast-disk figure (the stricter) always applies.
const FAST_FROM: [f64; 4] = [800.0, 9000.0, 0.0, 5000.0];
/// Differences under this fraction are noise for the FUSE-floor comparison (`linux-facts.md`).
const NOISE: f64 = 0.15;

fn job_index(job: JobKind) -> usize {
    match job {
        JobKind::Seq => 0,
        JobKind::RandFsync => 1,
        JobKind::Rand => 2,
        JobKind::Files => 3,
    }
}

fn job_label(job: JobKind) -> &'static str {
    match job {
        JobKind::Seq => "1 MiB seq write + end fsync",
        JobKind::Rand => "4 KiB randwrite, buffered",
        JobKind::RandFsync => "4 KiB randwrite + fsync each",
        JobKind::Files => "small files + fsync each",
    }
}

fn store_title(store: Store) -> &'static str {
    match store {
        Store::Disk => "Images on the machine's disk",
        Store::Ram => "Images in RAM (tmpfs)",
    }
}

fn value_text(job: JobKind, value: f64) -> String {
    let number = if job == JobKind::Seq || value < 10_000.0 {
        format!("{value:.0}")
    } else {
        format!("{:.1}k", value / 1000.0)
    };
    format!("{number} {}", job.unit())
}

fn value(run: &StoreRun, target: TargetKind, job: JobKind) -> Option<f64> {
    run.cells
        .get(&(target, job))
        .and_then(|c| c.measured.as_ref().ok())
        .map(|m| m.value)
}

/// Whether the job ran on `target` but failed (a target it is part of is missed).
fn failed(run: &StoreRun, target: TargetKind, job: JobKind) -> bool {
    run.cells
        .get(&(target, job))
        .is_some_and(|c| match &c.measured {
            Ok(m) => m.failed.is_some(),
            Err(_) => true,
        })
}

fn fsync_p50(run: &StoreRun, target: TargetKind) -> Option<f64> {
    run.cells
        .get(&(target, JobKind::RandFsync))
        .and_then(|c| c.measured.as_ref().ok())
        .and_then(|m| m.fsync_p50_us)
}

fn cpu_text(target: TargetKind, cell: &Cell) -> String {
    let s = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
    if target.replicated() {
        format!("{} + {} s", s(cell.cpu.0), s(cell.cpu.1))
    } else {
        format!("{} s", s(cell.cpu.0))
    }
}

/// The end of a progress line: what the job measured.
pub(crate) fn cell_summary(job: JobKind, cell: &Cell) -> String {
    let mut text = match &cell.measured {
        Ok(m) => {
            let mut t = value_text(job, m.value);
            if let Some(p50) = m.fsync_p50_us {
                let _ = write!(t, ", fsync p50 {p50:.0} µs");
            }
            if let Some(failure) = &m.failed {
                let _ = write!(t, " (FAILED: {failure})");
            }
            t
        }
        Err(error) => format!("FAILED: {error}"),
    };
    if cell.cpu.0.is_some() || cell.cpu.1.is_some() {
        let s = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2} s"));
        let _ = write!(
            text,
            "; cpu node1 {} node2 {}",
            s(cell.cpu.0),
            s(cell.cpu.1)
        );
    }
    if cell.alone > 0 {
        let _ = write!(text, "; {} ops NOT replicated (peer lost)", cell.alone);
    }
    text
}

/// Results and CPU tables of one backing store, in Markdown.
pub(crate) fn store_tables(
    run: &StoreRun,
    sizes: &Sizes,
    targets: &[TargetKind],
    jobs: &[JobKind],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### {}\n", store_title(run.store));
    let _ = writeln!(
        out,
        "Backing store: {}. Node 1 -> node 2 ping p50: {}. Load average (other users of \
         the CPUs) at the start and end of this pass: {} / {}.\n",
        run.backing,
        run.rtt_p50_us
            .map_or("not measured".to_owned(), |r| format!("{r:.0} µs")),
        run.load.0,
        run.load.1
    );
    let _ = write!(out, "| job |");
    for t in targets {
        let _ = write!(out, " {} |", t.label());
    }
    let _ = write!(out, "\n|---|");
    for _ in targets {
        let _ = write!(out, "---|");
    }
    out.push('\n');
    let mut footnotes = Vec::new();
    for &job in jobs {
        let _ = write!(out, "| {} |", sizes.describe(job));
        for &target in targets {
            let text = match run.cells.get(&(target, job)) {
                None => "not run".to_owned(),
                Some(cell) => match &cell.measured {
                    Err(error) => {
                        footnotes.push(format!(
                            "{} on {}: {error}",
                            job_label(job),
                            target.label()
                        ));
                        format!("failed [{}]", footnotes.len())
                    }
                    Ok(m) => {
                        let mut t = value_text(job, m.value);
                        if target != TargetKind::Plain
                            && let Some(plain) = value(run, TargetKind::Plain, job)
                        {
                            let _ = write!(t, " ({:.2})", m.value / plain);
                        }
                        if let Some(failure) = &m.failed {
                            footnotes.push(format!(
                                "{} on {}: FAILED, {failure} (the figure is the rate until then)",
                                job_label(job),
                                target.label()
                            ));
                            let _ = write!(t, " failed [{}]", footnotes.len());
                        }
                        if cell.alone > 0 {
                            footnotes.push(format!(
                                "{} on {}: {} operations were not replicated (node 1 went alone)",
                                job_label(job),
                                target.label(),
                                cell.alone
                            ));
                            let _ = write!(t, " [{}]", footnotes.len());
                        }
                        t
                    }
                },
            };
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    if jobs.contains(&JobKind::RandFsync) {
        let _ = write!(out, "| fsync p50 (write+fsync job) |");
        for &target in targets {
            let text = fsync_p50(run, target).map_or("-".to_owned(), |p| format!("{p:.0} µs"));
            let _ = write!(out, " {text} |");
        }
        out.push('\n');
    }
    let helpers: Vec<TargetKind> = targets
        .iter()
        .copied()
        .filter(|t| *t != TargetKind::Plain)
        .collect();
    if !helpers.is_empty() {
        let _ = write!(
            out,
            "\nCPU time (user + system) of our processes during each job and the sync after it \
             (safekit-rfs on node 1 + on node 2):\n\n| job |"
        );
        for t in &helpers {
            let _ = write!(out, " {} |", t.label());
        }
        let _ = write!(out, "\n|---|");
        for _ in &helpers {
            let _ = write!(out, "---|");
        }
        out.push('\n');
        for &job in jobs {
            let _ = write!(out, "| {} |", job_label(job));
            for &target in &helpers {
                let text = run
                    .cells
                    .get(&(target, job))
                    .map_or("not run".to_owned(), |c| cpu_text(target, c));
                let _ = write!(out, " {text} |");
            }
            out.push('\n');
        }
    }
    out.push('\n');
    for (target, check) in &run.peer_checks {
        let _ = writeln!(
            out,
            "- Node 2's copy after the {} run: {check}.",
            target.label()
        );
    }
    for (target, error) in &run.target_errors {
        let _ = writeln!(out, "- {}: {error}", target.label());
    }
    for (index, note) in footnotes.iter().enumerate() {
        let _ = writeln!(out, "- [{}] {note}", index + 1);
    }
    out
}

/// Whether a target was met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Met,
    WithinNoise,
    Missed,
    NotMeasured,
}

impl Status {
    fn text(self) -> &'static str {
        match self {
            Status::Met => "met",
            Status::WithinNoise => "within noise (<15% below)",
            Status::Missed => "MISSED",
            Status::NotMeasured => "not measured",
        }
    }
}

/// One target's verdict on one run.
#[derive(Debug)]
struct Verdict {
    name: String,
    status: Status,
    detail: String,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    Some(a? / b?)
}

/// The targets, checked against one run.
fn verdicts(run: &StoreRun) -> Vec<Verdict> {
    let mut out = Vec::new();
    for job in [
        JobKind::Seq,
        JobKind::RandFsync,
        JobKind::Rand,
        JobKind::Files,
    ] {
        let index = job_index(job);
        let fast = value(run, TargetKind::Plain, job).is_some_and(|p| p >= FAST_FROM[index]);
        let (reference, source) = if fast {
            (FAST_DISK_REF[index], "fast-disk figure")
        } else {
            (SLOW_DISK_REF[index], "slow-disk figure")
        };
        let r = ratio(
            value(run, TargetKind::Off, job),
            value(run, TargetKind::Plain, job),
        );
        let job_failed = failed(run, TargetKind::Off, job) || failed(run, TargetKind::Plain, job);
        let status = match r {
            _ if job_failed => Status::Missed,
            None => Status::NotMeasured,
            Some(r) if r >= reference => Status::Met,
            Some(r) if r >= reference * (1.0 - NOISE) => Status::WithinNoise,
            Some(_) => Status::Missed,
        };
        out.push(Verdict {
            name: format!(
                "mount off vs plain >= minimal FUSE pass-through: {}",
                job_label(job)
            ),
            status,
            detail: r.map_or(String::new(), |r| {
                let failure = if job_failed { ", job failed" } else { "" };
                format!("{r:.2} vs {reference:.2} ({source}{failure})")
            }),
        });
    }
    for job in [JobKind::Seq, JobKind::RandFsync] {
        let r = ratio(
            value(run, TargetKind::Strict, job),
            value(run, TargetKind::Off, job),
        );
        out.push(Verdict {
            name: format!("strict costs <= 20% over mount off: {}", job_label(job)),
            status: match r {
                None => Status::NotMeasured,
                Some(r) if r >= 0.8 => Status::Met,
                Some(_) => Status::Missed,
            },
            detail: r.map_or(String::new(), |r| format!("strict/off {r:.2} (>= 0.80)")),
        });
    }
    let (strict, off) = (
        fsync_p50(run, TargetKind::Strict),
        fsync_p50(run, TargetKind::Off),
    );
    let bound = (|| Some(off? + 2.0 * run.rtt_p50_us? + 100.0))();
    out.push(Verdict {
        name: "strict fsync p50 <= mount off + 2 RTT + 100 µs".to_owned(),
        status: match (strict, bound) {
            (Some(s), Some(b)) if s <= b => Status::Met,
            (Some(_), Some(_)) => Status::Missed,
            _ => Status::NotMeasured,
        },
        detail: match (strict, bound) {
            (Some(s), Some(b)) => format!("{s:.0} µs vs {b:.0} µs"),
            _ => String::new(),
        },
    });
    let r = ratio(
        value(run, TargetKind::FsyncOnly, JobKind::Rand),
        value(run, TargetKind::Plain, JobKind::Rand),
    );
    out.push(Verdict {
        name: "fsync-only: 4 KiB buffered writes >= 50% of plain".to_owned(),
        status: match r {
            None => Status::NotMeasured,
            Some(r) if r >= 0.5 => Status::Met,
            Some(_) => Status::Missed,
        },
        detail: r.map_or(String::new(), |r| format!("{r:.2} (>= 0.50)")),
    });
    out
}

/// The targets table (one column per backing store), in Markdown.
pub(crate) fn targets_text(runs: &[StoreRun]) -> String {
    let mut out = String::from("### Targets of issue 4, as computed from this run\n\n| target |");
    for run in runs {
        let _ = write!(
            out,
            " {} |",
            store_title(run.store).replace("Images ", "images ")
        );
    }
    out.push_str("\n|---|");
    for _ in runs {
        out.push_str("---|");
    }
    out.push('\n');
    let all: Vec<Vec<Verdict>> = runs.iter().map(verdicts).collect();
    let rows = all.first().map_or(0, Vec::len);
    let mut missed = Vec::new();
    for row in 0..rows {
        let _ = write!(out, "| {} |", all[0][row].name);
        for (run, verdicts) in runs.iter().zip(&all) {
            let v = &verdicts[row];
            let _ = write!(out, " {} {} |", v.status.text(), v.detail);
            if v.status == Status::Missed {
                missed.push(format!("{} ({})", v.name, run.store.name()));
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\nReference for the FUSE floor: a minimal fuser pass-through measured on machines of \
         this kind: the fast-disk figures (`linux-facts.md`, 1 thread, defaults, low end of \
         each range) are {FAST_DISK_REF:?}, the slow-disk figures (`anchors.md`, plain fuser \
         passthrough) are {SLOW_DISK_REF:?}, in the order seq, write+fsync, buffered, files; \
         a job takes the fast-disk figure when plain reached {FAST_FROM:?} (MB/s, IOPS, IOPS, \
         files/s) in this pass, as FUSE's fixed cost per request weighs more on a fast disk. \
         Ratios within 15% below the figure are noise there."
    );
    if missed.is_empty() {
        out.push_str("\nNo measured target was missed in this run.\n");
    } else {
        let _ = writeln!(
            out,
            "\nMissed in this run: {}. Why: see the notes after this section.",
            missed.join("; ")
        );
    }
    out
}

/// The whole data-path section.
pub(crate) fn section(
    machine: &Machine,
    runs: &[StoreRun],
    sizes: &Sizes,
    args: &BenchArgs,
    elapsed: Duration,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN}\n## Data path: replicated mount\n");
    let _ = writeln!(
        out,
        "Written by `cargo xtask bench{}{}` on {} ({:.0} s), commit {}.{}\n",
        if args.quick { " --quick" } else { "" },
        if args.rounds > 1 {
            format!(" --rounds {}", args.rounds)
        } else {
            String::new()
        },
        machine.date,
        elapsed.as_secs_f64(),
        machine.commit,
        if args.rounds > 1 {
            format!(" Every figure is the median of {} rounds.", args.rounds)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs ({}), {:.1} GiB RAM, Linux {}, {}. Helper: {}.\n",
        machine.cpus,
        machine.cpu_model,
        machine.memory_gib,
        machine.kernel,
        machine.fio,
        machine.rfs
    );
    let _ = writeln!(
        out,
        "Setup: two nodes as network namespaces joined by a veth pair; each node keeps its data \
         on an ext4 file system of its own (an image file written in full, 3 GiB or 1 GiB in \
         quick mode, on a loop device, never trimmed), both images on the \
         same backing store (named in each table). The plain baseline runs on node 1's file \
         system; our mount is `safekit-rfs mount` over a directory of the same file system; \
         \"mount, replication off\" is the default (strict, no writeback cache) mode with \
         `--replication off`; replicated targets send to `safekit-rfs receive` on node 2 \
         over the veth pair. {}, psync, one job; \
         the small-file job is a loop (create, write 4 KiB, fsync, close; it stops after 90 s and \
         reports the rate so far). Before the first target, one unmeasured sequential write \
         warms each node's file system up. Ratios in brackets \
         are to plain ext4 in the same pass; only ratios from one run count. CPU time is read \
         from /proc/<pid>/stat of the helpers before and after each job (including a `sync -f` \
         after it, so fsync-only mode's deferred writeback is counted).\n",
        machine.fio
    );
    for run in runs {
        out.push_str(&store_tables(run, sizes, &args.targets, &args.jobs));
        out.push('\n');
    }
    out.push_str(&targets_text(runs));
    let _ = writeln!(out, "{END}");
    out
}

/// Replaces the data-path section of `path` (or appends it; or creates the file).
pub(crate) fn write_section(path: &Path, section: &str) -> anyhow::Result<()> {
    write_marked(path, BEGIN, END, section)
}

/// Replaces the section between `begin_marker` and `end_marker` of `path` (or
/// appends it; or creates the file), keeping every other line.
pub(crate) fn write_marked(
    path: &Path,
    begin_marker: &str,
    end_marker: &str,
    section: &str,
) -> anyhow::Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let text = match (existing.find(begin_marker), existing.find(end_marker)) {
        (Some(begin), Some(end)) if end > begin => {
            let after = &existing[end + end_marker.len()..];
            let after = after.strip_prefix('\n').unwrap_or(after);
            format!("{}{section}{after}", &existing[..begin])
        }
        _ if existing.trim().is_empty() => format!(
            "# Benchmarks\n\nEach section is written by the bench that owns it; notes outside \
             a section's markers are kept when it is rewritten.\n\n{section}"
        ),
        _ => format!("{}\n\n{section}", existing.trim_end()),
    };
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
