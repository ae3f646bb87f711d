//! Measures what the dirty log costs a primary running alone (peer absent).
//!
//! Writes 8 KiB blocks at random offsets of a set of files, as PostgreSQL's
//! checkpoint does, each through the same path the FUSE layer uses: the local
//! `pwrite`, then `Sender::replicate`, which in the `Alone` role records the
//! change durably in the dirty log before answering. Prints the time taken and
//! the number of dirty-log records and syncs (also countable from outside
//! with `strace -f -c -e trace=fdatasync`).
//!
//! ```text
//! cargo run --release -p safekit-linux-helper --example alone_dirty_log -- \
//!     [writes=3000] [threads=1] [files=50] [file_mib=8] [sorted=0] [dir=/tmp]
//! ```

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use safekit_linux_helper::dirty::DirtyLog;
use safekit_linux_helper::replicator::{ReplicateOutcome, Replicator, WaitFor};
use safekit_linux_helper::transport::{Role, Sender, SenderConfig};
use safekit_protocol::replication::{Op, RelPath};

const BLOCK: u64 = 8192;

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn arg(args: &[String], index: usize, default: u64) -> anyhow::Result<u64> {
    args.get(index)
        .map_or(Ok(default), |value| value.parse())
        .with_context(|| format!("argument {index}"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let writes = arg(&args, 0, 3000)?;
    let threads = arg(&args, 1, 1)?.max(1);
    let files = arg(&args, 2, 50)?.max(1);
    let file_mib = arg(&args, 3, 8)?.max(1);
    let sorted = arg(&args, 4, 0)? != 0;
    let base = args.get(5).map_or("/tmp", String::as_str);

    let tmp = tempfile::tempdir_in(base).context("temp dir")?;
    let data = tmp.path().join("data");
    fs::create_dir(&data)?;
    let mut handles = Vec::new();
    for index in 0..files {
        let file = File::create(data.join(format!("f{index}")))?;
        file.set_len(file_mib << 20)?;
        handles.push(file);
    }
    let dirty = Arc::new(DirtyLog::open(&tmp.path().join("dirty.log"))?);
    // The peer address is never reached: the sender starts alone.
    let mut config = SenderConfig::new(
        "127.0.0.1:9".parse()?,
        b"secret",
        "mirror",
        Arc::clone(&dirty),
    );
    config.initial_role = Role::Alone;
    let sender = Arc::new(Sender::new(config)?);

    // The workload: (file, block) pairs, optionally sorted as a checkpoint sorts its buffers.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let blocks_per_file = (file_mib << 20) / BLOCK;
    let mut work: Vec<(u64, u64)> = (0..writes)
        .map(|_| (rng.next() % files, rng.next() % blocks_per_file))
        .collect();
    if sorted {
        work.sort_unstable();
    }
    let handles = Arc::new(handles);
    let work = Arc::new(work);

    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|worker| {
            let (sender, handles, work) =
                (Arc::clone(&sender), Arc::clone(&handles), Arc::clone(&work));
            std::thread::spawn(move || -> anyhow::Result<()> {
                let payload = vec![0xA5u8; BLOCK as usize];
                for &(file, block) in work.iter().skip(worker as usize).step_by(threads as usize) {
                    let offset = block * BLOCK;
                    let index = usize::try_from(file)?;
                    handles[index].write_all_at(&payload, offset)?;
                    let op = Op::Write {
                        dir: 0,
                        path: RelPath::parse(format!("f{file}").as_bytes())?,
                        offset,
                        data: payload.clone(),
                    };
                    let outcome = sender.replicate(op, WaitFor::Applied);
                    anyhow::ensure!(outcome == ReplicateOutcome::Alone, "{outcome:?}");
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    let elapsed = started.elapsed();
    let stats = sender.stats();
    anyhow::ensure!(stats.dirty_log_errors == 0, "dirty log errors");
    let log_len = OpenOptions::new()
        .read(true)
        .open(dirty.path())?
        .metadata()?
        .len();
    let loaded = DirtyLog::load(dirty.path())?;
    println!(
        "writes={writes} threads={threads} files={files} file_mib={file_mib} sorted={sorted}: \
         {:.3} s, {} records, {} syncs, log {} bytes",
        elapsed.as_secs_f64(),
        loaded.records.len(),
        dirty.stats().syncs,
        log_len,
    );
    Ok(())
}
