//! The replication stream between the primary's data path and the secondary's receiver.
//!
//! One TCP connection per module carries frames. Every frame starts with a fixed
//! little-endian header (magic, version, kind, sequence number, payload length,
//! CRC-32C of header and payload) followed by a payload. The header is fixed so
//! that the hot path can frame, checksum and route a write without decoding its
//! body; bodies of operations and control messages are encoded with `postcard`
//! (maintained, `no_std`-friendly, compact varints) because `bincode` is
//! unmaintained (RUSTSEC-2025-0141).
//!
//! Operations name files by a path relative to one replicated directory
//! ([`RelPath`]), never by a local inode number: the two nodes' inode numbers
//! differ. A [`RelPath`] is validated when it is built and when it is decoded,
//! so a receiver can never be handed `..`, an absolute path, an empty component
//! or a NUL byte. Symlink escapes are the receiver's job: it resolves one
//! component at a time beneath its directory descriptor without following links.
//!
//! Contract between the sides (see ARCHITECTURE.md, "Durability contract"):
//! the receiver applies operations in sequence order and sends cumulative
//! acknowledgements. An acknowledged operation is applied on the receiver (in
//! its page cache); an acknowledged [`Op::Fsync`] is on the receiver's disk
//! with the guarantees fsync(2)/fdatasync(2) give there (the file, and its
//! directory entry when the name changed since the last fsync of that
//! directory). The frame layout and the handshake are in
//! [`crate::frame`] and [`crate::auth`].

use serde::{Deserialize, Serialize};

/// A path relative to one replicated directory, as a list of validated components.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RelPath(Vec<Vec<u8>>);

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelPathError {
    /// The path is absolute.
    #[error("path is absolute")]
    Absolute,
    /// A component is `..` or `.`.
    #[error("path component {0:?} is not allowed")]
    DotComponent(String),
    /// A component is empty (two slashes in a row).
    #[error("path has an empty component")]
    EmptyComponent,
    /// A component contains a NUL byte or a slash.
    #[error("path component contains a NUL byte or a slash")]
    BadByte,
    /// A component is longer than NAME_MAX (255 bytes).
    #[error("path component is longer than 255 bytes")]
    TooLong,
}

impl RelPath {
    /// The replicated directory itself.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Builds a path from components, validating each one.
    ///
    /// # Errors
    /// Returns the first invalid component's reason.
    pub fn from_components(components: Vec<Vec<u8>>) -> Result<Self, RelPathError> {
        for component in &components {
            validate_component(component)?;
        }
        Ok(RelPath(components))
    }

    /// Parses `a/b/c` (no leading slash, no `.` or `..`). The empty string is the root.
    ///
    /// # Errors
    /// Returns why the path is refused.
    pub fn parse(bytes: &[u8]) -> Result<Self, RelPathError> {
        if bytes.is_empty() {
            return Ok(RelPath::root());
        }
        if bytes[0] == b'/' {
            return Err(RelPathError::Absolute);
        }
        Self::from_components(bytes.split(|b| *b == b'/').map(<[u8]>::to_vec).collect())
    }

    /// Appends one component, validated.
    ///
    /// # Errors
    /// Returns why the component is refused.
    pub fn join(&self, component: &[u8]) -> Result<Self, RelPathError> {
        validate_component(component)?;
        let mut components = self.0.clone();
        components.push(component.to_vec());
        Ok(RelPath(components))
    }

    /// The components, each already validated.
    pub fn components(&self) -> &[Vec<u8>] {
        &self.0
    }

    /// The parent path and the last component, or `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &[u8])> {
        let (last, parent) = self.0.split_last()?;
        Some((RelPath(parent.to_vec()), last.as_slice()))
    }

    /// `a/b/c` as bytes (empty for the root).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.join(&b'/')
    }

    /// Re-validates a path that came from the wire (serde cannot run validation itself).
    ///
    /// # Errors
    /// Returns why the path is refused.
    pub fn validate(&self) -> Result<(), RelPathError> {
        self.0.iter().try_for_each(|c| validate_component(c))
    }
}

fn validate_component(component: &[u8]) -> Result<(), RelPathError> {
    if component.is_empty() {
        return Err(RelPathError::EmptyComponent);
    }
    if component == b"." || component == b".." {
        return Err(RelPathError::DotComponent(
            String::from_utf8_lossy(component).into_owned(),
        ));
    }
    if component.iter().any(|b| *b == 0 || *b == b'/') {
        return Err(RelPathError::BadByte);
    }
    if component.len() > 255 {
        return Err(RelPathError::TooLong);
    }
    Ok(())
}

/// A point in time as the file system stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// How a timestamp of a `SetAttr` is to be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    /// Exactly this time (the primary resolves "now" before shipping, so both sides agree).
    At(Timestamp),
}

/// Flags of a rename, as `renameat2` takes them.
pub mod rename_flags {
    /// Fail if the target exists.
    pub const NOREPLACE: u32 = 1;
    /// Swap source and target atomically.
    pub const EXCHANGE: u32 = 2;
}

/// One change to the tree of a replicated directory.
///
/// `dir` selects the replicated directory of the module (its index in the
/// configuration's `<replicated>` list). Ownership (`uid`, `gid`) and `mode` are
/// the values the primary's file ended up with, so the replica matches it
/// regardless of the receiver's own credentials or umask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a regular file (fails if it exists when `exclusive`).
    Create {
        dir: u16,
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    },
    /// Create a directory.
    Mkdir {
        dir: u16,
        path: RelPath,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    /// Create a device node, FIFO or socket.
    Mknod {
        dir: u16,
        path: RelPath,
        mode: u32,
        rdev: u64,
        uid: u32,
        gid: u32,
    },
    /// Create a symbolic link whose target is stored verbatim (never followed by the receiver).
    Symlink {
        dir: u16,
        path: RelPath,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
    },
    /// Create a hard link `new` to `existing`.
    Link {
        dir: u16,
        existing: RelPath,
        new: RelPath,
    },
    /// Remove a non-directory.
    Unlink { dir: u16, path: RelPath },
    /// Remove an empty directory.
    Rmdir { dir: u16, path: RelPath },
    /// Rename, with [`rename_flags`].
    Rename {
        dir: u16,
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    /// Write bytes at an offset.
    Write {
        dir: u16,
        path: RelPath,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Set the size.
    Truncate { dir: u16, path: RelPath, size: u64 },
    /// `fallocate(2)` with its mode bits (punch hole, keep size, zero range...).
    Fallocate {
        dir: u16,
        path: RelPath,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Change metadata; `None` leaves a field as it is.
    SetAttr {
        dir: u16,
        path: RelPath,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        atime: Option<TimeSet>,
        mtime: Option<TimeSet>,
    },
    /// Set an extended attribute (only when `acl="on"`).
    SetXattr {
        dir: u16,
        path: RelPath,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: i32,
    },
    /// Remove an extended attribute.
    RemoveXattr {
        dir: u16,
        path: RelPath,
        name: Vec<u8>,
    },
    /// Make a file durable on the receiver (`datasync`: data only).
    Fsync {
        dir: u16,
        path: RelPath,
        datasync: bool,
    },
}

/// A byte range of a file (for the dirty record: "only this part changed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

/// A file an operation changed, as the dirty record and the out-of-sync report name it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TouchedFile {
    /// The replicated directory.
    pub dir: u16,
    /// The file (or directory) beneath it.
    pub path: RelPath,
    /// The changed range, when the operation changed only part of a regular file's data.
    pub range: Option<ByteRange>,
}

impl Op {
    /// The replicated directory the operation works in.
    pub fn dir(&self) -> u16 {
        match self {
            Op::Create { dir, .. }
            | Op::Mkdir { dir, .. }
            | Op::Mknod { dir, .. }
            | Op::Symlink { dir, .. }
            | Op::Link { dir, .. }
            | Op::Unlink { dir, .. }
            | Op::Rmdir { dir, .. }
            | Op::Rename { dir, .. }
            | Op::Write { dir, .. }
            | Op::Truncate { dir, .. }
            | Op::Fallocate { dir, .. }
            | Op::SetAttr { dir, .. }
            | Op::SetXattr { dir, .. }
            | Op::RemoveXattr { dir, .. }
            | Op::Fsync { dir, .. } => *dir,
        }
    }

    /// The path an error report names: the file the operation is about
    /// (the new name of a link, the source of a rename).
    pub fn main_path(&self) -> &RelPath {
        match self {
            Op::Create { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Mknod { path, .. }
            | Op::Symlink { path, .. }
            | Op::Unlink { path, .. }
            | Op::Rmdir { path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::Fallocate { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattr { path, .. }
            | Op::RemoveXattr { path, .. }
            | Op::Fsync { path, .. } => path,
            Op::Link { new, .. } => new,
            Op::Rename { from, .. } => from,
        }
    }

    /// Every path the operation names.
    pub fn paths(&self) -> Vec<&RelPath> {
        match self {
            Op::Link { existing, new, .. } => vec![existing, new],
            Op::Rename { from, to, .. } => vec![from, to],
            other => vec![other.main_path()],
        }
    }

    /// Re-validates every path (serde cannot run validation while decoding).
    ///
    /// # Errors
    /// Returns why the first invalid path is refused.
    pub fn validate(&self) -> Result<(), RelPathError> {
        self.paths().into_iter().try_for_each(RelPath::validate)
    }

    /// Whether the operation changes nothing and only asks for durability.
    pub fn is_fsync(&self) -> bool {
        matches!(self, Op::Fsync { .. })
    }

    /// The files whose content or metadata the operation changes, with the
    /// byte range where it is known. A rename or link touches both names. An
    /// fsync names its file too: while it is unconfirmed, the file may not be
    /// on the peer's disk.
    pub fn touched(&self) -> Vec<TouchedFile> {
        let dir = self.dir();
        let whole = |path: &RelPath| TouchedFile {
            dir,
            path: path.clone(),
            range: None,
        };
        match self {
            Op::Write {
                path, offset, data, ..
            } => vec![TouchedFile {
                dir,
                path: path.clone(),
                range: Some(ByteRange {
                    offset: *offset,
                    len: data.len() as u64,
                }),
            }],
            Op::Fallocate {
                path, offset, len, ..
            } => vec![TouchedFile {
                dir,
                path: path.clone(),
                range: Some(ByteRange {
                    offset: *offset,
                    len: *len,
                }),
            }],
            other => other.paths().into_iter().map(whole).collect(),
        }
    }
}

/// A cumulative acknowledgement: every operation up to and including `seq` is applied.
///
/// Applying an [`Op::Fsync`] includes making its file durable, so an
/// acknowledgement that covers an fsync's sequence number also confirms its
/// durability; `durable` only says that this acknowledgement was sent right
/// after such an fsync (it is informative, the sender need not track it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The highest sequence number applied.
    pub seq: u64,
    /// Whether the operation at `seq` was an fsync that completed (see above).
    pub durable: bool,
}

/// The receiver could not apply an operation (disk full, permission...).
///
/// The operation still counts as acknowledged (the stream goes on); the primary
/// marks the file out of sync so that the next resync repairs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyFailed {
    /// Sequence number of the failed operation.
    pub seq: u64,
    /// The replicated directory.
    pub dir: u16,
    /// The file that is now out of sync on the receiver.
    pub path: RelPath,
    /// The `errno` the receiver got.
    pub errno: i32,
}
