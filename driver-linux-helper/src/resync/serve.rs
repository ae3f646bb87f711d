//! The receiver's side of resync: answers questions about the replica.
//!
//! Called by the receiver's session thread for each `ResyncRequest`, in stream
//! order, so an answer reflects every operation queued before the question
//! (see [`safekit_protocol::resync`]). Reads go through [`super::tree`]
//! beneath the replica's directory descriptors; a request never changes the
//! replica. Checksum requests are bounded by the protocol (at most
//! [`MAX_BLOCKS_PER_REQUEST`] blocks, also in all for a batch of small files),
//! so one answer holds up live operations
//! for at most the time to read and hash that much.
//!
//! The receiving node's own activity log ([`ReceiverActivity`]) is the other
//! thing a request can ask about: when this node crashed as primary, the files
//! it held are the ones it may have changed without shipping the change, so
//! the primary's incremental resync compares them too (`ActivityFiles`), and
//! once the resync completed the node forgets them (`ForgetActivity`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use rustix::fs::{Mode, OFlags};
use safekit_protocol::resync::{
    BlockHash, EntryMeta, FileChecksums, MAX_BLOCKS_PER_REQUEST, MAX_FILES_PER_BATCH,
    MAX_LIST_ENTRIES, ReplyBody, RequestBody, ResyncReply, ResyncRequest,
};

use safekit_protocol::replication::RelPath;

use super::tree;
use crate::activity::ActivityLog;

/// The receiving node's activity log, loaded when its receiver started (this
/// node is not primary, so nothing else writes it meanwhile).
#[derive(Debug)]
pub struct ReceiverActivity {
    path: PathBuf,
    files: Mutex<Vec<(u16, RelPath)>>,
}

impl ReceiverActivity {
    /// The files the activity log at `path` holds (none when it does not exist).
    ///
    /// # Errors
    /// The file cannot be read or is not an activity log.
    pub fn load(path: &Path) -> io::Result<Self> {
        let files = ActivityLog::load(path)?;
        if !files.is_empty() {
            tracing::info!(
                path = %path.display(),
                files = files.len(),
                "activity log of this node's time as primary: its files will be compared by the next resync"
            );
        }
        Ok(ReceiverActivity {
            path: path.to_path_buf(),
            files: Mutex::new(files),
        })
    }

    /// The files still to compare.
    pub fn files(&self) -> Vec<(u16, RelPath)> {
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A resync covered the files: clears the log durably.
    ///
    /// # Errors
    /// The log cannot be rewritten (the files stay listed).
    pub fn forget(&self) -> io::Result<()> {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        ActivityLog::clear(&self.path)?;
        if !files.is_empty() {
            tracing::info!(
                path = %self.path.display(),
                files = files.len(),
                "resync completed: activity log cleared"
            );
        }
        files.clear();
        Ok(())
    }
}

/// Answers one request about the replica beneath `dirs` (index = replicated
/// directory), without an activity log (it reports no files).
pub fn answer(dirs: &[OwnedFd], request: &ResyncRequest) -> ResyncReply {
    answer_with_activity(dirs, None, request)
}

/// Like [`answer`], also answering about this node's activity log.
pub fn answer_with_activity(
    dirs: &[OwnedFd],
    activity: Option<&ReceiverActivity>,
    request: &ResyncRequest,
) -> ResyncReply {
    let body = match body(dirs, activity, &request.body) {
        Ok(body) => body,
        Err(error) => {
            tracing::debug!(%error, "cannot answer a resync request");
            ReplyBody::Failed {
                errno: error.raw_os_error().unwrap_or(libc::EIO),
            }
        }
    };
    ResyncReply {
        id: request.id,
        body,
    }
}

fn root(dirs: &[OwnedFd], dir: u16) -> io::Result<std::os::fd::BorrowedFd<'_>> {
    dirs.get(usize::from(dir))
        .map(AsFd::as_fd)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
}

/// The metadata of `path` and the hashes of its blocks `first_block ..
/// first_block + count` (fewer when the file is shorter; none when it is not
/// a regular file).
fn checksums(
    dirs: &[OwnedFd],
    dir: u16,
    path: &RelPath,
    block_size: u32,
    first_block: u64,
    count: u32,
) -> io::Result<(Option<EntryMeta>, Vec<BlockHash>)> {
    let root = root(dirs, dir)?;
    if count == 0 {
        return Ok((tree::lstat(root, path)?.map(|(_, meta)| meta), Vec::new()));
    }
    // A regular file (the common case) costs one resolution; anything else is looked at with lstat.
    let Some((fd, stat)) = tree::open_regular(root, path)? else {
        return Ok((tree::lstat(root, path)?.map(|(_, meta)| meta), Vec::new()));
    };
    let meta = tree::meta(&stat, Vec::new());
    let block_size = u64::from(block_size);
    // No bigger than the file: a small file's hash costs no 64 KiB of zeroes.
    let buf_len = block_size.min(meta.size.max(1));
    let mut buf = vec![0u8; usize::try_from(buf_len).unwrap_or(usize::MAX)];
    let mut hashes = Vec::new();
    for block in (first_block..).take(count.min(MAX_BLOCKS_PER_REQUEST) as usize) {
        let Some(offset) = block.checked_mul(block_size) else {
            break;
        };
        if offset >= meta.size {
            break;
        }
        let n = tree::read_at(&fd, &mut buf, offset)?;
        if n == 0 {
            break;
        }
        hashes.push(tree::hash(&buf[..n]));
    }
    Ok((Some(meta), hashes))
}

fn body(
    dirs: &[OwnedFd],
    activity: Option<&ReceiverActivity>,
    request: &RequestBody,
) -> io::Result<ReplyBody> {
    match request {
        RequestBody::ActivityFiles => Ok(ReplyBody::ActivityFiles(
            activity.map(ReceiverActivity::files).unwrap_or_default(),
        )),
        RequestBody::ForgetActivity => {
            if let Some(activity) = activity {
                activity.forget()?;
            }
            Ok(ReplyBody::ActivityForgotten)
        }
        RequestBody::Stat { dir, path } => Ok(ReplyBody::Stat(
            tree::lstat(root(dirs, *dir)?, path)?.map(|(_, meta)| meta),
        )),
        RequestBody::Checksums {
            dir,
            path,
            block_size,
            first_block,
            count,
        } => {
            let (meta, hashes) = checksums(dirs, *dir, path, *block_size, *first_block, *count)?;
            Ok(ReplyBody::Checksums { meta, hashes })
        }
        RequestBody::ChecksumsBatch { block_size, files } => Ok(ReplyBody::ChecksumsBatch(
            files
                .iter()
                .take(MAX_FILES_PER_BATCH as usize)
                .map(|file| {
                    match checksums(
                        dirs,
                        file.dir,
                        &file.path,
                        *block_size,
                        file.first_block,
                        file.count,
                    ) {
                        Ok((meta, hashes)) => FileChecksums::Found { meta, hashes },
                        Err(error) => FileChecksums::Failed {
                            errno: error.raw_os_error().unwrap_or(libc::EIO),
                        },
                    }
                })
                .collect(),
        )),
        RequestBody::ListDir {
            dir,
            path,
            start_after,
        } => {
            let (entries, more) = tree::list_dir_page(
                root(dirs, *dir)?,
                path,
                start_after.as_deref(),
                MAX_LIST_ENTRIES as usize,
            )?;
            Ok(ReplyBody::ListDir { entries, more })
        }
        RequestBody::Xattrs { dir, path } => match tree::xattrs(root(dirs, *dir)?, path)? {
            Some(xattrs) => Ok(ReplyBody::Xattrs(xattrs)),
            None => Err(io::Error::from_raw_os_error(libc::ENOENT)),
        },
        RequestBody::Barrier { durable } => {
            if *durable {
                sync_durably(dirs)?;
            }
            Ok(ReplyBody::Barrier)
        }
    }
}

/// Makes everything applied beneath `dirs` so far durable (`syncfs` of each
/// directory's file system): the work of a durable barrier.
///
/// # Errors
/// A directory cannot be reopened or its file system flushed.
pub fn sync_durably(dirs: &[OwnedFd]) -> io::Result<()> {
    for dir in dirs {
        // syncfs refuses O_PATH descriptors: reopen the directory for reading.
        let readable = rustix::fs::open(
            format!("/proc/self/fd/{}", dir.as_raw_fd()).as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        rustix::fs::syncfs(&readable).map_err(io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_protocol::replication::RelPath;
    use safekit_protocol::resync::ChecksumItem;

    fn ask(dirs: &[OwnedFd], body: RequestBody) -> ReplyBody {
        answer(dirs, &ResyncRequest { id: 7, body }).body
    }

    #[test]
    fn the_activity_log_files_are_reported_until_the_primary_says_the_resync_completed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("activity");
        let file = RelPath::parse(b"docs/in-flight").expect("valid");
        {
            // This node, primary, was writing the file when it crashed.
            let log = ActivityLog::open(&path, 16, None).expect("open");
            drop(log.note_write(0, &file).expect("recorded"));
        }
        let dirs = vec![
            rustix::fs::open(
                tmp.path(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .expect("open"),
        ];
        let activity = ReceiverActivity::load(&path).expect("load");
        let ask = |body| {
            answer_with_activity(&dirs, Some(&activity), &ResyncRequest { id: 1, body }).body
        };
        assert_eq!(
            ask(RequestBody::ActivityFiles),
            ReplyBody::ActivityFiles(vec![(0, file.clone())])
        );
        // Until told, the files stay listed (an interrupted resync asks again).
        assert_eq!(
            ask(RequestBody::ActivityFiles),
            ReplyBody::ActivityFiles(vec![(0, file)])
        );
        assert_eq!(
            ask(RequestBody::ForgetActivity),
            ReplyBody::ActivityForgotten
        );
        assert_eq!(
            ask(RequestBody::ActivityFiles),
            ReplyBody::ActivityFiles(Vec::new())
        );
        // Durably: the next start of this node finds nothing to compare.
        assert_eq!(ActivityLog::load(&path).expect("load"), Vec::new());
        // A receiver without an activity log knows of no file.
        assert_eq!(
            answer(
                &dirs,
                &ResyncRequest {
                    id: 2,
                    body: RequestBody::ActivityFiles
                }
            )
            .body,
            ReplyBody::ActivityFiles(Vec::new())
        );
    }

    #[test]
    fn listings_page_and_checksums_describe_the_replica() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let many = tmp.path().join("many");
        std::fs::create_dir(&many).expect("mkdir");
        let count = MAX_LIST_ENTRIES as usize + 5;
        for index in 0..count {
            std::fs::write(many.join(format!("{index:05}")), b"").expect("write");
        }
        std::fs::write(tmp.path().join("data"), vec![7u8; 5000]).expect("write");
        let dirs = vec![
            rustix::fs::open(
                tmp.path(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .expect("open"),
        ];
        let mut names = Vec::new();
        let mut start_after = None;
        loop {
            let ReplyBody::ListDir { entries, more } = ask(
                &dirs,
                RequestBody::ListDir {
                    dir: 0,
                    path: RelPath::parse(b"many").expect("valid"),
                    start_after: start_after.clone(),
                },
            ) else {
                panic!("not a listing");
            };
            names.extend(entries.into_iter().map(|entry| entry.name));
            start_after = names.last().cloned();
            if !more {
                break;
            }
        }
        let expected: Vec<Vec<u8>> = (0..count)
            .map(|index| format!("{index:05}").into_bytes())
            .collect();
        assert_eq!(names, expected);

        let ReplyBody::Checksums { meta, hashes } = ask(
            &dirs,
            RequestBody::Checksums {
                dir: 0,
                path: RelPath::parse(b"data").expect("valid"),
                block_size: 4096,
                first_block: 0,
                count: 8,
            },
        ) else {
            panic!("not checksums");
        };
        assert_eq!(meta.map(|meta| meta.size), Some(5000));
        assert_eq!(
            hashes,
            vec![tree::hash(&[7u8; 4096]), tree::hash(&[7u8; 904])]
        );
        assert_eq!(
            ask(
                &dirs,
                RequestBody::Stat {
                    dir: 0,
                    path: RelPath::parse(b"absent/x").expect("valid"),
                }
            ),
            ReplyBody::Stat(None)
        );
        assert_eq!(
            ask(&dirs, RequestBody::Barrier { durable: true }),
            ReplyBody::Barrier
        );
    }

    #[test]
    fn a_batch_answers_each_file_in_order_as_single_questions_would() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::fs::write(tmp.path().join("a"), vec![1u8; 4096]).expect("write");
        std::fs::write(tmp.path().join("b"), b"short").expect("write");
        std::fs::create_dir(tmp.path().join("d")).expect("mkdir");
        let dirs = vec![
            rustix::fs::open(
                tmp.path(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .expect("open"),
        ];
        let item = |dir, path: &[u8], count| ChecksumItem {
            dir,
            path: RelPath::parse(path).expect("valid"),
            first_block: 0,
            count,
        };
        let files = vec![
            item(0, b"b", 1),
            item(0, b"absent", 1),
            item(0, b"a", 1),
            item(0, b"d", 1),
            item(3, b"a", 1),
        ];
        let ReplyBody::ChecksumsBatch(answers) = ask(
            &dirs,
            RequestBody::ChecksumsBatch {
                block_size: 4096,
                files: files.clone(),
            },
        ) else {
            panic!("not a batch answer");
        };
        assert_eq!(answers.len(), files.len());
        for (file, answer) in files.iter().zip(&answers).take(4) {
            let single = ask(
                &dirs,
                RequestBody::Checksums {
                    dir: file.dir,
                    path: file.path.clone(),
                    block_size: 4096,
                    first_block: 0,
                    count: 1,
                },
            );
            let ReplyBody::Checksums { meta, hashes } = single else {
                panic!("not checksums");
            };
            assert_eq!(answer, &FileChecksums::Found { meta, hashes });
        }
        assert!(matches!(
            &answers[0],
            FileChecksums::Found { meta: Some(meta), hashes } if meta.size == 5 && hashes == &vec![tree::hash(b"short")]
        ));
        assert!(matches!(
            &answers[1],
            FileChecksums::Found { meta: None, .. }
        ));
        assert_eq!(answers[4], FileChecksums::Failed { errno: libc::EBADF });
    }
}
