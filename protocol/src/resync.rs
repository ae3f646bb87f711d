//! Resynchronisation requests and replies, carried in the replication stream itself.
//!
//! The resync engine on the primary compares its tree with the replica's by
//! asking the receiver questions. The questions travel in the **same ordered
//! stream** as the operations (frame kind `ResyncRequest`), and the receiver
//! answers one only after it applied every operation queued before it; the
//! answer (frame kind `ResyncReply`, same `id`) therefore describes the replica
//! as of that point of the stream. This is what lets the engine compare a
//! block while the application keeps writing: every operation shipped after
//! the question is applied after the answer was computed.
//!
//! Requests are bounded so that the receiver, which answers on its applying
//! thread, never stalls live operations for long: a checksum request covers at
//! most [`MAX_BLOCKS_PER_REQUEST`] blocks of at most [`MAX_BLOCK_SIZE`] bytes,
//! and a listing returns at most [`MAX_LIST_ENTRIES`] entries (the engine pages
//! with `start_after`).
//!
//! Block hashes are SHA-256 of the block's bytes (the last block of a file may
//! be short). SHA-256 rather than a weak rolling checksum: the engine compares
//! fixed-size blocks at equal offsets (see the resync engine's documentation
//! for why), so no rolling hash is needed, and a strong hash makes a false
//! "equal" practically impossible.

use serde::{Deserialize, Serialize};

use crate::replication::{RelPath, RelPathError, Timestamp};

/// Most blocks one checksum request may cover.
pub const MAX_BLOCKS_PER_REQUEST: u32 = 1024;

/// Largest block size a checksum request may use (16 MiB).
pub const MAX_BLOCK_SIZE: u32 = 16 * 1024 * 1024;

/// Smallest block size a checksum request may use.
pub const MIN_BLOCK_SIZE: u32 = 4096;

/// Most entries one listing reply carries.
pub const MAX_LIST_ENTRIES: u32 = 4096;

/// Most files one batched checksum request ([`RequestBody::ChecksumsBatch`]) may name.
pub const MAX_FILES_PER_BATCH: u32 = 256;

/// A block's strong hash (SHA-256).
pub type BlockHash = [u8; 32];

/// The type of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// FIFO, socket, character or block device.
    Special,
}

/// Metadata of one entry, as `lstat` gives it (symlinks are never followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    /// Type.
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number of a device node (0 otherwise).
    pub rdev: u64,
    /// Target of a symbolic link (empty otherwise).
    pub link_target: Vec<u8>,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// The entry's name (one component).
    pub name: Vec<u8>,
    /// Its metadata.
    pub meta: EntryMeta,
}

/// A question to the receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// `lstat` of one path.
    Stat {
        /// Replicated directory.
        dir: u16,
        /// The path.
        path: RelPath,
    },
    /// Metadata and block hashes of blocks `first_block .. first_block + count`
    /// of a regular file (fewer when the file is shorter).
    Checksums {
        /// Replicated directory.
        dir: u16,
        /// The file.
        path: RelPath,
        /// Block size in bytes, within [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
        block_size: u32,
        /// First block.
        first_block: u64,
        /// Number of blocks, at most [`MAX_BLOCKS_PER_REQUEST`].
        count: u32,
    },
    /// The entries of a directory, sorted by name, after `start_after` (exclusive).
    ListDir {
        /// Replicated directory.
        dir: u16,
        /// The directory.
        path: RelPath,
        /// Resume after this name (paging).
        start_after: Option<Vec<u8>>,
    },
    /// Answer once everything before this point is applied (and, when
    /// `durable`, on disk: `syncfs` of every replicated directory).
    Barrier {
        /// Also make everything durable.
        durable: bool,
    },
    /// The files the receiving node's activity log held when its receiver
    /// started: those it may have changed, as primary, without shipping the
    /// change before it crashed. An incremental resync compares them too.
    ActivityFiles,
    /// The resync completed (after its final durable barrier): the receiving
    /// node may forget the files its activity log held, they now equal the
    /// primary's.
    ForgetActivity,
    /// [`RequestBody::Checksums`] of several files in one question (small
    /// files: one round trip and one wake-up of the receiver for many files).
    /// At most [`MAX_FILES_PER_BATCH`] files and [`MAX_BLOCKS_PER_REQUEST`]
    /// blocks in all.
    ChecksumsBatch {
        /// Block size in bytes, within [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
        block_size: u32,
        /// The files, answered in this order.
        files: Vec<ChecksumItem>,
    },
    /// The extended attributes of one path (not following a symlink), for a
    /// resync that replicates them (`<rfs acl="on">`).
    Xattrs {
        /// Replicated directory.
        dir: u16,
        /// The path.
        path: RelPath,
    },
}

/// One extended attribute: its full name (`user.x`, `system.posix_acl_access`...) and value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    /// The name, namespace included.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One file of a [`RequestBody::ChecksumsBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksumItem {
    /// Replicated directory.
    pub dir: u16,
    /// The file.
    pub path: RelPath,
    /// First block.
    pub first_block: u64,
    /// Number of blocks.
    pub count: u32,
}

/// The answer about one file of a [`RequestBody::ChecksumsBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileChecksums {
    /// As [`ReplyBody::Checksums`].
    Found {
        /// The file's metadata (`None`: the path does not exist).
        meta: Option<EntryMeta>,
        /// One hash per block that exists, from `first_block` on.
        hashes: Vec<BlockHash>,
    },
    /// The receiver could not answer about this file (`errno`).
    Failed {
        /// The errno.
        errno: i32,
    },
}

/// A question with its identifier (the reply carries the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// Chosen by the sender, unique among its outstanding requests.
    pub id: u64,
    /// The question.
    pub body: RequestBody,
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyBody {
    /// Answer to `Stat`: `None` when the path does not exist.
    Stat(Option<EntryMeta>),
    /// Answer to `Checksums`: `meta` is `None` when the path does not exist;
    /// `hashes` is empty when it is not a regular file.
    Checksums {
        /// The file's metadata.
        meta: Option<EntryMeta>,
        /// One hash per block that exists, from `first_block` on.
        hashes: Vec<BlockHash>,
    },
    /// Answer to `ListDir`.
    ListDir {
        /// Entries, sorted by name, at most [`MAX_LIST_ENTRIES`].
        entries: Vec<DirEntry>,
        /// More entries follow the last one.
        more: bool,
    },
    /// Answer to `Barrier`.
    Barrier,
    /// Answer to `ActivityFiles`: `(replicated directory, path)` of each file.
    ActivityFiles(Vec<(u16, RelPath)>),
    /// Answer to `ForgetActivity`: the activity log is cleared.
    ActivityForgotten,
    /// The receiver could not answer (`errno`), e.g. the directory is missing.
    Failed {
        /// The errno.
        errno: i32,
    },
    /// Answer to `ChecksumsBatch`: one answer per file, in the request's order.
    ChecksumsBatch(Vec<FileChecksums>),
    /// Answer to `Xattrs`, sorted by name (`Failed { ENOENT }` when the path does not exist).
    Xattrs(Vec<Xattr>),
}

/// An answer with the identifier of its question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncReply {
    /// The question's identifier.
    pub id: u64,
    /// The answer.
    pub body: ReplyBody,
}

impl ResyncRequest {
    /// Re-validates paths and bounds (serde cannot run validation while decoding).
    ///
    /// # Errors
    /// Why the first invalid path, block size or count is refused.
    pub fn validate(&self) -> Result<(), RequestError> {
        match &self.body {
            RequestBody::Stat { path, .. } | RequestBody::Xattrs { path, .. } => {
                path.validate().map_err(RequestError::Path)
            }
            RequestBody::Checksums {
                path,
                block_size,
                count,
                ..
            } => {
                path.validate().map_err(RequestError::Path)?;
                if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(block_size) {
                    return Err(RequestError::BlockSize(*block_size));
                }
                if *count > MAX_BLOCKS_PER_REQUEST {
                    return Err(RequestError::TooManyBlocks(*count));
                }
                Ok(())
            }
            RequestBody::ListDir {
                path, start_after, ..
            } => {
                path.validate().map_err(RequestError::Path)?;
                if let Some(name) = start_after {
                    RelPath::root().join(name).map_err(RequestError::Path)?;
                }
                Ok(())
            }
            RequestBody::ChecksumsBatch { block_size, files } => {
                if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(block_size) {
                    return Err(RequestError::BlockSize(*block_size));
                }
                let count = u32::try_from(files.len()).unwrap_or(u32::MAX);
                if count > MAX_FILES_PER_BATCH {
                    return Err(RequestError::TooManyFiles(count));
                }
                let blocks = files
                    .iter()
                    .fold(0u32, |sum, file| sum.saturating_add(file.count));
                if blocks > MAX_BLOCKS_PER_REQUEST {
                    return Err(RequestError::TooManyBlocks(blocks));
                }
                for file in files {
                    file.path.validate().map_err(RequestError::Path)?;
                }
                Ok(())
            }
            RequestBody::Barrier { .. }
            | RequestBody::ActivityFiles
            | RequestBody::ForgetActivity => Ok(()),
        }
    }
}

impl ResyncReply {
    /// Re-validates the names of a listing and the paths of activity files (a
    /// receiver must not make the engine build an escaping path).
    ///
    /// # Errors
    /// Why the first invalid name is refused.
    pub fn validate(&self) -> Result<(), RequestError> {
        match &self.body {
            ReplyBody::ListDir { entries, .. } => {
                for entry in entries {
                    RelPath::root()
                        .join(&entry.name)
                        .map_err(RequestError::Path)?;
                }
            }
            ReplyBody::ActivityFiles(files) => {
                for (_, path) in files {
                    path.validate().map_err(RequestError::Path)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Why a request or reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A path or name is invalid.
    #[error("invalid path: {0}")]
    Path(RelPathError),
    /// The block size is out of bounds.
    #[error("block size {0} out of bounds")]
    BlockSize(u32),
    /// Too many blocks in one request.
    #[error("{0} blocks in one request exceed the limit")]
    TooManyBlocks(u32),
    /// Too many files in one batched request.
    #[error("{0} files in one request exceed the limit")]
    TooManyFiles(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let path = RelPath::parse(b"a/b").expect("valid");
        let request = |block_size, count| ResyncRequest {
            id: 1,
            body: RequestBody::Checksums {
                dir: 0,
                path: path.clone(),
                block_size,
                first_block: 0,
                count,
            },
        };
        assert_eq!(request(65536, 16).validate(), Ok(()));
        assert_eq!(request(1, 16).validate(), Err(RequestError::BlockSize(1)));
        assert_eq!(
            request(65536, MAX_BLOCKS_PER_REQUEST + 1).validate(),
            Err(RequestError::TooManyBlocks(MAX_BLOCKS_PER_REQUEST + 1))
        );
        let listing = ResyncRequest {
            id: 2,
            body: RequestBody::ListDir {
                dir: 0,
                path,
                start_after: Some(b"..".to_vec()),
            },
        };
        assert!(matches!(listing.validate(), Err(RequestError::Path(_))));
    }

    #[test]
    fn batched_checksum_requests_are_bounded_in_files_blocks_and_paths() {
        let item = |path: &[u8], count| ChecksumItem {
            dir: 0,
            path: RelPath::parse(path).expect("valid"),
            first_block: 0,
            count,
        };
        let batch = |files: Vec<ChecksumItem>| ResyncRequest {
            id: 3,
            body: RequestBody::ChecksumsBatch {
                block_size: 65536,
                files,
            },
        };
        assert_eq!(
            batch(vec![item(b"a", 1), item(b"b/c", 0)]).validate(),
            Ok(())
        );
        let many = MAX_FILES_PER_BATCH as usize + 1;
        assert_eq!(
            batch(vec![item(b"a", 0); many]).validate(),
            Err(RequestError::TooManyFiles(MAX_FILES_PER_BATCH + 1))
        );
        assert_eq!(
            batch(vec![item(b"a", MAX_BLOCKS_PER_REQUEST), item(b"b", 1)]).validate(),
            Err(RequestError::TooManyBlocks(MAX_BLOCKS_PER_REQUEST + 1))
        );
    }
}
