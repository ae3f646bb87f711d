//! The four measured jobs, the same on every target.
//!
//! Three are fio jobs (psync, one job, JSON output parsed for bandwidth, IOPS
//! and the fsync latency percentiles); the small-file job is a loop in this
//! process (create, write 4 KiB, fsync, close), which counts exactly what the
//! issue asks for (files per second) without fio's per-file setup phase.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::JobKind;
use super::env::path_str;

/// Job sizes: full run, or `--quick`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    seq_mib: u64,
    rand_file_mib: u64,
    rand_seconds: u64,
    fsync_file_mib: u64,
    fsync_seconds: u64,
    pub(crate) files: u32,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                seq_mib: 128,
                rand_file_mib: 64,
                rand_seconds: 3,
                fsync_file_mib: 16,
                fsync_seconds: 3,
                files: 2000,
            }
        } else {
            Sizes {
                seq_mib: 512,
                rand_file_mib: 256,
                rand_seconds: 10,
                fsync_file_mib: 64,
                fsync_seconds: 10,
                files: 20_000,
            }
        }
    }

    /// What a job does, for progress lines and the report.
    pub(crate) fn describe(&self, job: JobKind) -> String {
        match job {
            JobKind::Seq => format!("1 MiB seq write, {} MiB + end fsync", self.seq_mib),
            JobKind::Rand => format!(
                "4 KiB randwrite buffered, {} s over {} MiB",
                self.rand_seconds, self.rand_file_mib
            ),
            JobKind::RandFsync => format!(
                "4 KiB randwrite + fsync each, {} s over {} MiB",
                self.fsync_seconds, self.fsync_file_mib
            ),
            JobKind::Files => format!("{} x 4 KiB files created + fsynced", self.files),
        }
    }
}

/// What one job measured.
#[derive(Debug, Clone)]
pub(crate) struct Measured {
    /// The job's figure: MB/s (seq), IOPS (random writes), files/s.
    pub(crate) value: f64,
    /// p50 of fsync latency in µs (write+fsync job).
    pub(crate) fsync_p50_us: Option<f64>,
    /// The job stopped on an error after measuring `value` over what it did.
    pub(crate) failed: Option<String>,
}

/// Runs `job` in `dir`.
pub(crate) fn run(job: JobKind, sizes: &Sizes, dir: &Path) -> anyhow::Result<Measured> {
    let mut args: Vec<String> = vec![
        "--ioengine=psync".into(),
        "--numjobs=1".into(),
        "--output-format=json".into(),
        format!("--directory={}", path_str(dir)?),
    ];
    match job {
        JobKind::Files => return small_files(sizes.files, dir),
        JobKind::Seq => args.extend([
            "--name=seqwrite".into(),
            "--rw=write".into(),
            "--bs=1M".into(),
            format!("--size={}M", sizes.seq_mib),
            "--end_fsync=1".into(),
            "--runtime=300".into(),
        ]),
        JobKind::Rand => args.extend([
            "--name=randwrite".into(),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--size={}M", sizes.rand_file_mib),
            "--time_based=1".into(),
            format!("--runtime={}", sizes.rand_seconds),
        ]),
        JobKind::RandFsync => args.extend([
            "--name=randwrite-fsync".into(),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--size={}M", sizes.fsync_file_mib),
            "--fsync=1".into(),
            "--time_based=1".into(),
            format!("--runtime={}", sizes.fsync_seconds),
        ]),
    }
    let output = Command::new("fio")
        .args(&args)
        .output()
        .context("cannot start fio (apt-get install -y fio)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "fio failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let json_start = stdout.find('{').context("fio printed no JSON")?;
    let report: serde_json::Value =
        serde_json::from_str(&stdout[json_start..]).context("cannot parse fio's JSON")?;
    let job_report = &report["jobs"][0];
    let error = job_report["error"].as_i64().unwrap_or(0);
    if error != 0 {
        bail!(
            "fio job error {error}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let write = &job_report["write"];
    let value = match job {
        JobKind::Seq => write["bw_bytes"].as_f64().context("no bw_bytes")? / 1e6,
        _ => write["iops"].as_f64().context("no iops")?,
    };
    let fsync_p50_us = (job == JobKind::RandFsync)
        .then(|| job_report["sync"]["lat_ns"]["percentile"]["50.000000"].as_f64())
        .flatten()
        .map(|ns| ns / 1000.0);
    Ok(Measured {
        value,
        fsync_p50_us,
        failed: None,
    })
}

/// Creates `count` files of 4 KiB, each fsynced before close, in 100-file
/// directories; files per second. Stops early (and counts what was done)
/// after a bound, so a stuck target cannot hang the bench.
fn small_files(count: u32, dir: &Path) -> anyhow::Result<Measured> {
    const PER_DIR: u32 = 1000;
    const BOUND: Duration = Duration::from_secs(90);
    let root = dir.join("smallfiles");
    let dirs = count.div_ceil(PER_DIR);
    for d in 0..dirs {
        std::fs::create_dir_all(root.join(format!("d{d:03}")))
            .with_context(|| format!("cannot create directories in {}", root.display()))?;
    }
    let block = [0x5au8; 4096];
    let start = Instant::now();
    let mut done = 0u32;
    for i in 0..count {
        let path = root.join(format!("d{:03}/f{i:06}", i / PER_DIR));
        let one = || -> anyhow::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.write_all(&block)
                .with_context(|| format!("cannot write {}", path.display()))?;
            file.sync_all()
                .with_context(|| format!("cannot fsync {}", path.display()))
        };
        if let Err(error) = one() {
            // The rate so far still says something; the failure is reported with it.
            return Ok(Measured {
                value: f64::from(done) / start.elapsed().as_secs_f64().max(1e-9),
                fsync_p50_us: None,
                failed: Some(format!("stopped after {done} files: {error:#}")),
            });
        }
        done += 1;
        if start.elapsed() > BOUND {
            break;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(Measured {
        value: f64::from(done) / seconds.max(1e-9),
        fsync_p50_us: None,
        failed: None,
    })
}
