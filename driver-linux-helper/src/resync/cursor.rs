//! The resync cursor: which files an interrupted resync already finished, durably.
//!
//! The primary keeps one cursor file per module. A run starts with a `Start`
//! record naming its kind (full or incremental), its block size and how many
//! dirty-log records existed when it began; each finished file is then
//! recorded as `Done`, in batches, and only after a durable barrier confirmed
//! that the receiver applied and synced everything the file's resync shipped.
//! A later run of the same kind resumes: it skips a `Done` file unless the
//! dirty log recorded that file again after the original start (a change made
//! while the peer was absent again, or an operation the peer failed to apply).
//! The file is removed when a run completes.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use safekit_protocol::replication::RelPath;
use serde::{Deserialize, Serialize};

use super::records;

const MAGIC: &[u8; 8] = b"SKRSYNC1";

/// How a run began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorStart {
    /// Full tree comparison (else incremental).
    pub full: bool,
    /// Block size of the comparison.
    pub block_size: u32,
    /// Dirty-log records that existed when the run began.
    pub dirty_records: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Record {
    Start(CursorStart),
    Done { dir: u16, path: RelPath },
}

/// An open cursor.
#[derive(Debug)]
pub struct ResyncCursor {
    path: PathBuf,
    /// `None` until the first files are recorded: a run that completes
    /// before any confirmation never writes the file (a resumed one has it).
    file: Option<File>,
    start: CursorStart,
    done: HashSet<(u16, RelPath)>,
}

impl ResyncCursor {
    /// Opens the cursor at `path`: resumes a run that began like `start` (same
    /// kind and block size; its original `dirty_records` is kept), else starts
    /// afresh.
    ///
    /// # Errors
    /// The file cannot be read or written.
    pub fn open(path: &Path, start: CursorStart) -> io::Result<Self> {
        if let Some((records, valid)) = records::load::<Record>(path, MAGIC)?
            && let Some(Record::Start(previous)) = records.first()
            && previous.full == start.full
            && previous.block_size == start.block_size
            && previous.dirty_records <= start.dirty_records
        {
            let done = records
                .iter()
                .filter_map(|record| match record {
                    Record::Done { dir, path } => Some((*dir, path.clone())),
                    Record::Start(_) => None,
                })
                .collect::<HashSet<_>>();
            tracing::info!(done = done.len(), "resuming an interrupted resync");
            return Ok(ResyncCursor {
                path: path.to_path_buf(),
                file: Some(records::open_append(path, valid)?),
                start: *previous,
                done,
            });
        }
        // Any other cursor is of another run: gone now, so that a crash
        // before this run's first record does not resume that one.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(ResyncCursor {
            path: path.to_path_buf(),
            file: None,
            start,
            done: HashSet::new(),
        })
    }

    /// How the (possibly resumed) run began.
    pub fn start(&self) -> CursorStart {
        self.start
    }

    /// Whether a file was finished by an earlier attempt of this run.
    pub fn is_done(&self, dir: u16, path: &RelPath) -> bool {
        self.done.contains(&(dir, path.clone()))
    }

    /// Number of finished files recorded.
    pub fn done_count(&self) -> usize {
        self.done.len()
    }

    /// Records finished files durably (call only after a durable barrier covered them).
    ///
    /// # Errors
    /// The write or sync failed.
    pub fn mark_done(&mut self, files: &[(u16, RelPath)]) -> io::Result<()> {
        let mut bytes = Vec::new();
        for (dir, path) in files {
            records::encode(
                &Record::Done {
                    dir: *dir,
                    path: path.clone(),
                },
                &mut bytes,
            )?;
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(records::rewrite(
                &self.path,
                MAGIC,
                &[Record::Start(self.start)],
            )?),
        };
        records::append(file, &bytes)?;
        self.done.extend(files.iter().cloned());
        Ok(())
    }

    /// Removes the cursor (the run completed).
    ///
    /// # Errors
    /// The file could not be removed.
    pub fn finish(self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        }
    }
}
