//! Messages between the Windows minifilter and the user-mode agent.
//!
//! The minifilter sends one message per intercepted operation on a replicated
//! file (create, write, set-information, cleanup) through its filter
//! communication port and holds the I/O until the agent replies; the agent
//! replies after the peer has acknowledged (DESIGN.md section 5). These bytes
//! are the payload that follows Filter Manager's own `FILTER_MESSAGE_HEADER` /
//! `FILTER_REPLY_HEADER`; Filter Manager's `MessageId` is not ours, our request
//! id is.
//!
//! # Why this module looks the way it does
//!
//! The same source file is compiled twice: here, in the `std` protocol crate
//! used by the agent, and inside `safekit-driver-windows` (with `#[path]`),
//! which is `no_std` because it runs in the kernel. So this module uses only
//! `core`, never allocates, never panics on any input, and refers to nothing
//! outside itself. Errors implement `core::fmt::Display` and
//! `core::error::Error` by hand because `thiserror` is not a dependency of the
//! driver.
//!
//! # Layout (version 1), all integers little-endian, offsets in bytes
//!
//! Header, 24 bytes: `0` magic `b"SKMF"`, `4` version `u16`, `6` kind `u16`,
//! `8` request id `u64`, `16` body length `u32`, `20` reserved `u32` (zero).
//! The body follows at 24 and is exactly `body length` bytes long.
//!
//! [`FileRef`], 32 bytes at the start of every driver-to-agent body:
//! `0` volume serial `u64`, `8` file id `u128` (NTFS ids zero-extended),
//! `24` replicated directory index `u16`, `26` reserved `u16`, `28` process id `u32`.
//!
//! | kind | name | fixed body | then |
//! |------|------|------------|------|
//! | 1 | [`Create`] | FileRef, `32` disposition, `36` create options, `40` file attributes, `44` create result, `48` path length, `52` reserved (56 bytes) | path |
//! | 2 | [`PreWrite`] | FileRef, `32` offset `u64`, `40` data length `u32`, `44` [`WriteFlags`] (48 bytes) | data |
//! | 3 | [`PreSetInformation`] | FileRef, `32` class, `36` flags, `40` path length, `44` target length, `48`..`80` four `u64` values, `80` `u32` value, `84` reserved (88 bytes) | path, target |
//! | 4 | [`Cleanup`] | FileRef (32 bytes) | |
//! | 0x8001 | [`Reply`] | `0` NTSTATUS `u32`, `4` reserved (8 bytes) | |
//! | 0x8002 | [`Configure`] | `0` entry count `u32`, `4` reserved (8 bytes) | entries |
//!
//! A [`ConfigEntry`] is 16 bytes, `0` class `u16` (1 volume, 2 replicated
//! directory, 3 exclusion), `2` directory index `u16` (exclusions only), `4`
//! first length `u32`, `8` second length `u32` (volumes only), `12` reserved,
//! then the first path (alias, directory or relative path) and the second
//! (device). The agent passes a `Configure` as the connection context of
//! `FilterConnectCommunicationPort` (so at most 65535 bytes, which Filter
//! Manager hands to the driver in kernel memory); the driver refuses the
//! connection if it cannot apply it. A new configuration means a new connection.
//!
//! Paths are UTF-16LE bytes of the file's normalized name
//! (`\Device\HarddiskVolume3\dir\file.txt`), without a terminating NUL.
//! The decoder is strict: unknown kinds, classes and flag bits, non-zero
//! reserved fields and unused values are errors, so every valid message has
//! exactly one encoding.

use core::fmt;

/// First four bytes of every message.
pub const MAGIC: [u8; 4] = *b"SKMF";
/// The layout version this module reads and writes.
pub const VERSION: u16 = 1;
/// Size of [`Header`] on the wire.
pub const HEADER_LEN: usize = 24;
/// Size of [`FileRef`] on the wire.
pub const FILE_REF_LEN: usize = 32;
/// Fixed part of a [`Create`] body.
pub const CREATE_FIXED_LEN: usize = 56;
/// Fixed part of a [`PreWrite`] body.
pub const PRE_WRITE_FIXED_LEN: usize = 48;
/// Fixed part of a [`PreSetInformation`] body.
pub const PRE_SET_INFORMATION_FIXED_LEN: usize = 88;
/// Size of a [`Cleanup`] body.
pub const CLEANUP_LEN: usize = FILE_REF_LEN;
/// Size of a [`Reply`] body.
pub const REPLY_LEN: usize = 8;
/// Fixed part of a [`Configure`] body.
pub const CONFIGURE_FIXED_LEN: usize = 8;
/// Fixed part of one [`ConfigEntry`].
pub const CONFIG_ENTRY_FIXED_LEN: usize = 16;
/// Longest path in bytes: a `UNICODE_STRING` length is a `u16` of bytes, even.
pub const MAX_PATH_BYTES: usize = 0xFFFE;

/// Message kind numbers (header offset 6).
pub mod kind {
    /// [`super::Create`].
    pub const CREATE: u16 = 1;
    /// [`super::PreWrite`].
    pub const PRE_WRITE: u16 = 2;
    /// [`super::PreSetInformation`].
    pub const PRE_SET_INFORMATION: u16 = 3;
    /// [`super::Cleanup`].
    pub const CLEANUP: u16 = 4;
    /// [`super::Reply`], agent to driver.
    pub const REPLY: u16 = 0x8001;
    /// [`super::Configure`], agent to driver, as the connection context.
    pub const CONFIGURE: u16 = 0x8002;
}

/// Why bytes are not a valid message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    Truncated { needed: usize, available: usize },
    /// The first four bytes are not [`MAGIC`].
    BadMagic([u8; 4]),
    /// A layout version this code does not speak.
    UnsupportedVersion(u16),
    /// A message kind this code does not know.
    UnknownKind(u16),
    /// The header's body length disagrees with the bytes given.
    BodyLengthMismatch { declared: usize, actual: usize },
    /// The body's own lengths (path, data) disagree with its size.
    InnerLengthMismatch { expected: usize, actual: usize },
    /// A reserved or unused field is not zero.
    NonZeroReserved { field: &'static str },
    /// Flag bits this version does not define.
    UnknownFlags { field: &'static str, bits: u32 },
    /// A path field is malformed.
    BadPath(PathError),
    /// A create disposition outside `FILE_SUPERSEDE..=FILE_OVERWRITE_IF`.
    UnknownDisposition(u32),
    /// A create result outside `FILE_SUPERSEDED..=FILE_DOES_NOT_EXIST`.
    UnknownCreateResult(u32),
    /// A set-information class this version does not define.
    UnknownSetInformationClass(u32),
    /// A reply status that is neither success nor an error NTSTATUS.
    BadStatus(u32),
    /// A write at end of file must carry offset 0.
    EndOfFileWithOffset(u64),
    /// A rename without a target path.
    EmptyRenameTarget,
    /// A configuration entry class this version does not define.
    UnknownConfigEntry(u16),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated { needed, available } => {
                write!(
                    f,
                    "message truncated: needed {needed} bytes, got {available}"
                )
            }
            DecodeError::BadMagic(magic) => write!(f, "bad magic {magic:02x?}"),
            DecodeError::UnsupportedVersion(version) => {
                write!(f, "unsupported minifilter message version {version}")
            }
            DecodeError::UnknownKind(kind) => write!(f, "unknown message kind {kind:#x}"),
            DecodeError::BodyLengthMismatch { declared, actual } => {
                write!(
                    f,
                    "header declares a {declared}-byte body, {actual} bytes follow"
                )
            }
            DecodeError::InnerLengthMismatch { expected, actual } => {
                write!(
                    f,
                    "body fields describe {expected} bytes, body has {actual}"
                )
            }
            DecodeError::NonZeroReserved { field } => write!(f, "field {field} must be zero"),
            DecodeError::UnknownFlags { field, bits } => {
                write!(f, "unknown bits {bits:#x} in {field}")
            }
            DecodeError::BadPath(error) => write!(f, "bad path: {error}"),
            DecodeError::UnknownDisposition(value) => {
                write!(f, "unknown create disposition {value}")
            }
            DecodeError::UnknownCreateResult(value) => write!(f, "unknown create result {value}"),
            DecodeError::UnknownSetInformationClass(value) => {
                write!(f, "unknown set-information class {value}")
            }
            DecodeError::BadStatus(status) => {
                write!(
                    f,
                    "reply status {status:#010x} is neither success nor an error"
                )
            }
            DecodeError::EndOfFileWithOffset(offset) => {
                write!(f, "write at end of file carries offset {offset}")
            }
            DecodeError::EmptyRenameTarget => write!(f, "rename without a target path"),
            DecodeError::UnknownConfigEntry(class) => {
                write!(f, "unknown configuration entry class {class}")
            }
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The caller's buffer is shorter than the message.
    BufferTooSmall { needed: usize, available: usize },
    /// The body would not fit the header's `u32` length.
    TooLong { body_len: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::BufferTooSmall { needed, available } => {
                write!(
                    f,
                    "buffer too small: message needs {needed} bytes, buffer has {available}"
                )
            }
            EncodeError::TooLong { body_len } => {
                write!(
                    f,
                    "message body of {body_len} bytes exceeds the u32 length field"
                )
            }
        }
    }
}

impl core::error::Error for EncodeError {}

/// Why bytes are not a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// UTF-16 needs an even number of bytes.
    OddLength(usize),
    /// Longer than a `UNICODE_STRING` can hold.
    TooLong(usize),
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathError::OddLength(len) => write!(f, "UTF-16 path of odd length {len}"),
            PathError::TooLong(len) => {
                write!(f, "path of {len} bytes exceeds {MAX_PATH_BYTES} bytes")
            }
        }
    }
}

impl core::error::Error for PathError {}

/// A file name as UTF-16LE bytes, borrowed from a message or a caller.
///
/// Windows names need not be valid UTF-16 (unpaired surrogates are allowed),
/// so only the length is checked.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Utf16Path<'a> {
    bytes: &'a [u8],
}

impl<'a> Utf16Path<'a> {
    /// Wraps UTF-16LE bytes.
    ///
    /// # Errors
    ///
    /// [`PathError`] if the length is odd or above [`MAX_PATH_BYTES`].
    pub fn from_le_bytes(bytes: &'a [u8]) -> Result<Self, PathError> {
        if bytes.len() & 1 == 1 {
            return Err(PathError::OddLength(bytes.len()));
        }
        if bytes.len() > MAX_PATH_BYTES {
            return Err(PathError::TooLong(bytes.len()));
        }
        Ok(Utf16Path { bytes })
    }

    /// The UTF-16LE bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The UTF-16 code units.
    pub fn units(&self) -> impl Iterator<Item = u16> + Clone + 'a {
        self.bytes.chunks_exact(2).map(|pair| match pair {
            [low, high] => u16::from_le_bytes([*low, *high]),
            // `chunks_exact(2)` yields only pairs; the length is even by construction.
            _ => 0,
        })
    }

    /// Number of UTF-16 code units.
    pub fn len_units(&self) -> usize {
        self.bytes.len() / 2
    }

    /// True for the empty path.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl fmt::Debug for Utf16Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"")?;
        for decoded in char::decode_utf16(self.units()) {
            match decoded {
                Ok(c) => write!(f, "{}", c.escape_debug())?,
                Err(unpaired) => write!(f, "\\u{{{:04x}}}", unpaired.unpaired_surrogate())?,
            }
        }
        f.write_str("\"")
    }
}

/// The identity of a file on a volume, stable across renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileKey {
    /// `FILE_ID_INFORMATION.VolumeSerialNumber`.
    pub volume_serial: u64,
    /// `FILE_ID_INFORMATION.FileId` (128 bits for ReFS; NTFS ids zero-extended).
    pub file_id: u128,
}

/// Which file an operation is about, and on whose behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileRef {
    /// The file.
    pub key: FileKey,
    /// Index of the replicated directory holding the file, in the order the
    /// agent configured them.
    pub dir_index: u16,
    /// The requesting process (`FltGetRequestorProcessId`), for logs.
    pub process_id: u32,
}

/// `CreateDisposition` of `IRP_MJ_CREATE` (`FILE_SUPERSEDE` ... `FILE_OVERWRITE_IF`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateDisposition {
    /// `FILE_SUPERSEDE` (0).
    Supersede,
    /// `FILE_OPEN` (1).
    Open,
    /// `FILE_CREATE` (2).
    Create,
    /// `FILE_OPEN_IF` (3).
    OpenIf,
    /// `FILE_OVERWRITE` (4).
    Overwrite,
    /// `FILE_OVERWRITE_IF` (5).
    OverwriteIf,
}

impl CreateDisposition {
    /// The value in `Parameters.Create.Options >> 24`.
    pub fn to_u32(self) -> u32 {
        match self {
            CreateDisposition::Supersede => 0,
            CreateDisposition::Open => 1,
            CreateDisposition::Create => 2,
            CreateDisposition::OpenIf => 3,
            CreateDisposition::Overwrite => 4,
            CreateDisposition::OverwriteIf => 5,
        }
    }

    /// The disposition for a wire value, if defined.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => CreateDisposition::Supersede,
            1 => CreateDisposition::Open,
            2 => CreateDisposition::Create,
            3 => CreateDisposition::OpenIf,
            4 => CreateDisposition::Overwrite,
            5 => CreateDisposition::OverwriteIf,
            _ => return None,
        })
    }
}

/// What the file system did, `IoStatus.Information` of a successful create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateResult {
    /// `FILE_SUPERSEDED` (0).
    Superseded,
    /// `FILE_OPENED` (1).
    Opened,
    /// `FILE_CREATED` (2).
    Created,
    /// `FILE_OVERWRITTEN` (3).
    Overwritten,
    /// `FILE_EXISTS` (4).
    Exists,
    /// `FILE_DOES_NOT_EXIST` (5).
    DoesNotExist,
}

impl CreateResult {
    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            CreateResult::Superseded => 0,
            CreateResult::Opened => 1,
            CreateResult::Created => 2,
            CreateResult::Overwritten => 3,
            CreateResult::Exists => 4,
            CreateResult::DoesNotExist => 5,
        }
    }

    /// The result for a wire value, if defined.
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            0 => CreateResult::Superseded,
            1 => CreateResult::Opened,
            2 => CreateResult::Created,
            3 => CreateResult::Overwritten,
            4 => CreateResult::Exists,
            5 => CreateResult::DoesNotExist,
            _ => return None,
        })
    }
}

/// A create that the file system completed on a replicated file; sent from the
/// post-create callback, which cancels the open (`FltCancelFileOpen`) if the
/// agent fails it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Create<'a> {
    /// The file that was opened or created.
    pub file: FileRef,
    /// `CreateDisposition`.
    pub disposition: CreateDisposition,
    /// `CreateOptions` (the low 24 bits of `Parameters.Create.Options`).
    pub options: u32,
    /// `FileAttributes` requested.
    pub attributes: u32,
    /// What the file system did.
    pub result: CreateResult,
    /// Normalized name of the file.
    pub path: Utf16Path<'a>,
}

/// Where a write lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOffset {
    /// At this byte offset.
    At(u64),
    /// At the current end of file (`FILE_WRITE_TO_END_OF_FILE`); the filter
    /// does not know the offset before the write.
    EndOfFile,
}

/// Flag bits of a [`PreWrite`] (body offset 44).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteFlags {
    /// `IRP_PAGING_IO`: the cache manager or a mapped view writes back.
    pub paging_io: bool,
    /// `FO_WRITE_THROUGH` or `IRP_WRITE_THROUGH`.
    pub write_through: bool,
}

impl WriteFlags {
    const PAGING_IO: u32 = 1;
    const WRITE_THROUGH: u32 = 2;
    /// Not a flag of the caller: encodes [`WriteOffset::EndOfFile`].
    const END_OF_FILE: u32 = 4;
    const KNOWN: u32 = Self::PAGING_IO | Self::WRITE_THROUGH | Self::END_OF_FILE;
}

/// Bytes about to be written to a replicated file; sent from the pre-write
/// callback, which completes the write only after the agent's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreWrite<'a> {
    /// The file written.
    pub file: FileRef,
    /// Where the bytes go.
    pub offset: WriteOffset,
    /// How the write was issued.
    pub flags: WriteFlags,
    /// The bytes.
    pub data: &'a [u8],
}

/// `FILE_BASIC_INFORMATION`: zero in a time means "unchanged", as in NTFS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BasicInfo {
    /// `CreationTime`.
    pub creation_time: i64,
    /// `LastAccessTime`.
    pub last_access_time: i64,
    /// `LastWriteTime`.
    pub last_write_time: i64,
    /// `ChangeTime`.
    pub change_time: i64,
    /// `FileAttributes`.
    pub file_attributes: u32,
}

/// The information a set-information request changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetInformation<'a> {
    /// `FileRenameInformation(Ex)` (class 1). Flags: bit 0 replace, bit 1 POSIX.
    Rename {
        /// Normalized name of the destination.
        target: Utf16Path<'a>,
        /// `ReplaceIfExists` / `FILE_RENAME_REPLACE_IF_EXISTS`.
        replace_if_exists: bool,
        /// `FILE_RENAME_POSIX_SEMANTICS`.
        posix_semantics: bool,
    },
    /// `FileDispositionInformation(Ex)` (class 2). Flags: bit 0 delete, bit 1 POSIX.
    Delete {
        /// Mark for deletion (true) or clear the mark (false).
        delete: bool,
        /// `FILE_DISPOSITION_POSIX_SEMANTICS`.
        posix_semantics: bool,
    },
    /// `FileEndOfFileInformation` (class 3): value at body offset 48.
    EndOfFile {
        /// New file size.
        size: u64,
    },
    /// `FileAllocationInformation` (class 4): value at body offset 48.
    Allocation {
        /// New allocation size.
        size: u64,
    },
    /// `FileBasicInformation` (class 5): times at 48, 56, 64, 72, attributes at 80.
    Basic(BasicInfo),
}

/// A set-information request on a replicated file; sent from the pre-callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreSetInformation<'a> {
    /// The file changed.
    pub file: FileRef,
    /// Normalized name of the file.
    pub path: Utf16Path<'a>,
    /// What changes.
    pub info: SetInformation<'a>,
}

/// The last handle to a replicated file object was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cleanup {
    /// The file.
    pub file: FileRef,
}

/// An error NTSTATUS (severity bits `11`), with which the agent fails an I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailStatus(u32);

impl FailStatus {
    /// `STATUS_ACCESS_DENIED`.
    pub const ACCESS_DENIED: FailStatus = FailStatus(0xC000_0022);
    /// `STATUS_IO_TIMEOUT`.
    pub const IO_TIMEOUT: FailStatus = FailStatus(0xC000_00B5);
    /// `STATUS_MEDIA_WRITE_PROTECTED`, for writes on a secondary's replica.
    pub const MEDIA_WRITE_PROTECTED: FailStatus = FailStatus(0xC000_00A2);
    /// `STATUS_NOT_SUPPORTED`.
    pub const NOT_SUPPORTED: FailStatus = FailStatus(0xC000_00BB);

    /// The status if `code` has error severity.
    pub fn new(code: u32) -> Option<Self> {
        (code >> 30 == 0b11).then_some(FailStatus(code))
    }

    /// The NTSTATUS value.
    pub fn code(self) -> u32 {
        self.0
    }
}

/// What the agent decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the I/O proceed (`STATUS_SUCCESS`).
    Allow,
    /// Complete the I/O with this error.
    Fail(FailStatus),
}

/// The agent's answer to the request with the same request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Allow or fail.
    pub verdict: Verdict,
}

/// One item of the agent's configuration of the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEntry<'a> {
    /// A DOS alias (`C:`, `Volume{guid}`) and the device it names
    /// (`\Device\HarddiskVolume3`).
    Volume {
        /// The alias.
        alias: Utf16Path<'a>,
        /// The device.
        device: Utf16Path<'a>,
    },
    /// A replicated directory as configured (`c:\safedir`); directories are
    /// numbered in the order of these entries, from 0.
    Replicated {
        /// The directory.
        path: Utf16Path<'a>,
    },
    /// A `notreplicated path="..."` of directory `dir_index`.
    Excluded {
        /// The directory the path is relative to.
        dir_index: u16,
        /// The relative path.
        relative: Utf16Path<'a>,
    },
}

impl<'a> ConfigEntry<'a> {
    /// The first and second path fields on the wire.
    fn paths(&self) -> (Utf16Path<'a>, Utf16Path<'a>) {
        match *self {
            ConfigEntry::Volume { alias, device } => (alias, device),
            ConfigEntry::Replicated { path } => (path, Utf16Path::default()),
            ConfigEntry::Excluded { relative, .. } => (relative, Utf16Path::default()),
        }
    }
}

mod config_class {
    pub const VOLUME: u16 = 1;
    pub const REPLICATED: u16 = 2;
    pub const EXCLUDED: u16 = 3;
}

/// The whole configuration: replaces whatever the driver had.
///
/// Built from a slice by the agent ([`Configure::new`]) or borrowed from the
/// wire by the decoder; either way it is read with [`Configure::entries`].
#[derive(Clone, Copy)]
pub struct Configure<'a> {
    repr: ConfigureRepr<'a>,
}

#[derive(Clone, Copy)]
enum ConfigureRepr<'a> {
    Slice(&'a [ConfigEntry<'a>]),
    /// Entries already validated by the decoder.
    Wire {
        n_entries: u32,
        entries: &'a [u8],
    },
}

impl<'a> Configure<'a> {
    /// A configuration made of `entries`.
    pub fn new(entries: &'a [ConfigEntry<'a>]) -> Self {
        Configure {
            repr: ConfigureRepr::Slice(entries),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self.repr {
            ConfigureRepr::Slice(entries) => entries.len(),
            ConfigureRepr::Wire { n_entries, .. } => usize_from(n_entries),
        }
    }

    /// True without entries (nothing replicated).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entries in order.
    pub fn entries(&self) -> ConfigEntries<'a> {
        let inner = match self.repr {
            ConfigureRepr::Slice(entries) => EntriesInner::Slice(entries.iter()),
            ConfigureRepr::Wire { n_entries, entries } => EntriesInner::Wire {
                remaining: n_entries,
                reader: Reader::new(entries),
            },
        };
        ConfigEntries { inner }
    }
}

impl PartialEq for Configure<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.entries().eq(other.entries())
    }
}

impl Eq for Configure<'_> {}

impl fmt::Debug for Configure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.entries()).finish()
    }
}

/// Iterator over the entries of a [`Configure`].
#[derive(Debug)]
pub struct ConfigEntries<'a> {
    inner: EntriesInner<'a>,
}

#[derive(Debug)]
enum EntriesInner<'a> {
    Slice(core::slice::Iter<'a, ConfigEntry<'a>>),
    Wire { remaining: u32, reader: Reader<'a> },
}

impl<'a> Iterator for ConfigEntries<'a> {
    type Item = ConfigEntry<'a>;

    fn next(&mut self) -> Option<ConfigEntry<'a>> {
        match &mut self.inner {
            EntriesInner::Slice(entries) => entries.next().copied(),
            EntriesInner::Wire { remaining, reader } => {
                *remaining = remaining.checked_sub(1)?;
                // The decoder validated every entry, so this cannot fail; if it
                // did, the iteration would end early rather than panic.
                decode_config_entry(reader).ok()
            }
        }
    }
}

fn decode_config_entry<'a>(reader: &mut Reader<'a>) -> Result<ConfigEntry<'a>, DecodeError> {
    let class = reader.u16()?;
    let dir_index = reader.u16()?;
    let first_len = usize_from(reader.u32()?);
    let second_len = usize_from(reader.u32()?);
    reader.reserved_u32("config_entry.reserved")?;
    if !matches!(
        class,
        config_class::VOLUME | config_class::REPLICATED | config_class::EXCLUDED
    ) {
        return Err(DecodeError::UnknownConfigEntry(class));
    }
    if class != config_class::EXCLUDED && dir_index != 0 {
        return Err(DecodeError::NonZeroReserved {
            field: "config_entry.dir_index",
        });
    }
    if class != config_class::VOLUME && second_len != 0 {
        return Err(DecodeError::NonZeroReserved {
            field: "config_entry.second_len",
        });
    }
    let first = reader.path(first_len)?;
    let second = reader.path(second_len)?;
    Ok(match class {
        config_class::VOLUME => ConfigEntry::Volume {
            alias: first,
            device: second,
        },
        config_class::REPLICATED => ConfigEntry::Replicated { path: first },
        _ => ConfigEntry::Excluded {
            dir_index,
            relative: first,
        },
    })
}

/// Any message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Driver to agent.
    Create(Create<'a>),
    /// Driver to agent.
    PreWrite(PreWrite<'a>),
    /// Driver to agent.
    PreSetInformation(PreSetInformation<'a>),
    /// Driver to agent.
    Cleanup(Cleanup),
    /// Agent to driver.
    Reply(Reply),
    /// Agent to driver.
    Configure(Configure<'a>),
}

/// A whole message: the request id and a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Chosen by the driver; a reply carries the id it answers.
    pub request_id: u64,
    /// The operation or the reply.
    pub body: Body<'a>,
}

/// The fixed header, decodable on its own to learn a message's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// One of the [`kind`] numbers.
    pub kind: u16,
    /// The request id.
    pub request_id: u64,
    /// Bytes after the header.
    pub body_len: u32,
}

impl Header {
    /// Reads the header at the start of `bytes` (which may hold more).
    ///
    /// # Errors
    ///
    /// [`DecodeError`] on short input, bad magic, another version, an unknown
    /// kind or a non-zero reserved field.
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        let mut reader = Reader::new(bytes);
        let magic = reader.array::<4>()?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let version = reader.u16()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = reader.u16()?;
        if !matches!(
            kind,
            kind::CREATE
                | kind::PRE_WRITE
                | kind::PRE_SET_INFORMATION
                | kind::CLEANUP
                | kind::REPLY
                | kind::CONFIGURE
        ) {
            return Err(DecodeError::UnknownKind(kind));
        }
        let request_id = reader.u64()?;
        let body_len = reader.u32()?;
        reader.reserved_u32("header.reserved")?;
        Ok(Header {
            kind,
            request_id,
            body_len,
        })
    }

    /// Header plus body: how many bytes the whole message takes.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN.saturating_add(usize_from(self.body_len))
    }
}

impl<'a> Message<'a> {
    /// Bytes the encoded message takes.
    ///
    /// # Errors
    ///
    /// [`EncodeError::TooLong`] if the body does not fit a `u32` length.
    pub fn encoded_len(&self) -> Result<usize, EncodeError> {
        Ok(HEADER_LEN.saturating_add(usize_from(self.body_len()?)))
    }

    fn body_len(&self) -> Result<u32, EncodeError> {
        let body_len = match &self.body {
            Body::Create(create) => CREATE_FIXED_LEN.checked_add(create.path.bytes.len()),
            Body::PreWrite(write) => PRE_WRITE_FIXED_LEN.checked_add(write.data.len()),
            Body::PreSetInformation(set) => PRE_SET_INFORMATION_FIXED_LEN
                .checked_add(set.path.bytes.len())
                .and_then(|len| len.checked_add(rename_target(&set.info).bytes.len())),
            Body::Cleanup(_) => Some(CLEANUP_LEN),
            Body::Reply(_) => Some(REPLY_LEN),
            Body::Configure(configure) => {
                configure
                    .entries()
                    .try_fold(CONFIGURE_FIXED_LEN, |len, entry| {
                        let (first, second) = entry.paths();
                        len.checked_add(CONFIG_ENTRY_FIXED_LEN)?
                            .checked_add(first.bytes.len())?
                            .checked_add(second.bytes.len())
                    })
            }
        };
        body_len
            .and_then(|len| u32::try_from(len).ok())
            .ok_or(EncodeError::TooLong {
                body_len: body_len.unwrap_or(usize::MAX),
            })
    }

    fn kind(&self) -> u16 {
        match self.body {
            Body::Create(_) => kind::CREATE,
            Body::PreWrite(_) => kind::PRE_WRITE,
            Body::PreSetInformation(_) => kind::PRE_SET_INFORMATION,
            Body::Cleanup(_) => kind::CLEANUP,
            Body::Reply(_) => kind::REPLY,
            Body::Configure(_) => kind::CONFIGURE,
        }
    }

    /// Writes the message at the start of `buf` and returns its length.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] if the buffer is too small or the body too long; `buf`
    /// is then left untouched.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let body_len = self.body_len()?;
        let needed = HEADER_LEN.saturating_add(usize_from(body_len));
        let available = buf.len();
        let out = buf
            .get_mut(..needed)
            .ok_or(EncodeError::BufferTooSmall { needed, available })?;
        let mut writer = Writer { buf: out, pos: 0 };
        writer.bytes(&MAGIC);
        writer.u16(VERSION);
        writer.u16(self.kind());
        writer.u64(self.request_id);
        writer.u32(body_len);
        writer.u32(0);
        match &self.body {
            Body::Create(create) => {
                writer.file_ref(&create.file);
                writer.u32(create.disposition.to_u32());
                writer.u32(create.options);
                writer.u32(create.attributes);
                writer.u32(create.result.to_u32());
                writer.u32(len_u32(create.path.bytes.len()));
                writer.u32(0);
                writer.bytes(create.path.bytes);
            }
            Body::PreWrite(write) => {
                writer.file_ref(&write.file);
                let mut flags = 0;
                if write.flags.paging_io {
                    flags |= WriteFlags::PAGING_IO;
                }
                if write.flags.write_through {
                    flags |= WriteFlags::WRITE_THROUGH;
                }
                let offset = match write.offset {
                    WriteOffset::At(offset) => offset,
                    WriteOffset::EndOfFile => {
                        flags |= WriteFlags::END_OF_FILE;
                        0
                    }
                };
                writer.u64(offset);
                writer.u32(len_u32(write.data.len()));
                writer.u32(flags);
                writer.bytes(write.data);
            }
            Body::PreSetInformation(set) => {
                writer.file_ref(&set.file);
                let target = rename_target(&set.info);
                let (class, flags, values) = set_information_fields(&set.info);
                writer.u32(class);
                writer.u32(flags);
                writer.u32(len_u32(set.path.bytes.len()));
                writer.u32(len_u32(target.bytes.len()));
                for value in values.words {
                    writer.u64(value);
                }
                writer.u32(values.attributes);
                writer.u32(0);
                writer.bytes(set.path.bytes);
                writer.bytes(target.bytes);
            }
            Body::Cleanup(cleanup) => writer.file_ref(&cleanup.file),
            Body::Reply(reply) => {
                writer.u32(match reply.verdict {
                    Verdict::Allow => 0,
                    Verdict::Fail(status) => status.code(),
                });
                writer.u32(0);
            }
            Body::Configure(configure) => {
                writer.u32(len_u32(configure.len()));
                writer.u32(0);
                for entry in configure.entries() {
                    let (first, second) = entry.paths();
                    let (class, dir_index) = match entry {
                        ConfigEntry::Volume { .. } => (config_class::VOLUME, 0),
                        ConfigEntry::Replicated { .. } => (config_class::REPLICATED, 0),
                        ConfigEntry::Excluded { dir_index, .. } => {
                            (config_class::EXCLUDED, dir_index)
                        }
                    };
                    writer.u16(class);
                    writer.u16(dir_index);
                    writer.u32(len_u32(first.bytes.len()));
                    writer.u32(len_u32(second.bytes.len()));
                    writer.u32(0);
                    writer.bytes(first.bytes);
                    writer.bytes(second.bytes);
                }
            }
        }
        Ok(writer.pos)
    }

    /// Reads exactly one message from `bytes`.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] for anything but exactly one valid version-1 message;
    /// use [`Header::decode`] and [`Header::frame_len`] to cut a message out of
    /// a larger buffer first.
    pub fn decode(bytes: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        let header = Header::decode(bytes)?;
        let body = bytes.get(HEADER_LEN..).unwrap_or_default();
        let declared = usize_from(header.body_len);
        if body.len() != declared {
            return Err(DecodeError::BodyLengthMismatch {
                declared,
                actual: body.len(),
            });
        }
        let mut reader = Reader::new(body);
        let body = match header.kind {
            kind::CREATE => Body::Create(decode_create(&mut reader)?),
            kind::PRE_WRITE => Body::PreWrite(decode_pre_write(&mut reader)?),
            kind::PRE_SET_INFORMATION => {
                Body::PreSetInformation(decode_pre_set_information(&mut reader)?)
            }
            kind::CLEANUP => {
                reader.expect_len(CLEANUP_LEN)?;
                Body::Cleanup(Cleanup {
                    file: reader.file_ref()?,
                })
            }
            kind::REPLY => {
                reader.expect_len(REPLY_LEN)?;
                let status = reader.u32()?;
                reader.reserved_u32("reply.reserved")?;
                let verdict = if status == 0 {
                    Verdict::Allow
                } else {
                    Verdict::Fail(FailStatus::new(status).ok_or(DecodeError::BadStatus(status))?)
                };
                Body::Reply(Reply { verdict })
            }
            kind::CONFIGURE => {
                let n_entries = reader.u32()?;
                reader.reserved_u32("configure.reserved")?;
                let entries = reader.rest();
                let mut entry_reader = Reader::new(entries);
                for _ in 0..n_entries {
                    decode_config_entry(&mut entry_reader)?;
                }
                if !entry_reader.at_end() {
                    return Err(DecodeError::InnerLengthMismatch {
                        expected: CONFIGURE_FIXED_LEN.saturating_add(entry_reader.pos),
                        actual: CONFIGURE_FIXED_LEN.saturating_add(entries.len()),
                    });
                }
                Body::Configure(Configure {
                    repr: ConfigureRepr::Wire { n_entries, entries },
                })
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        Ok(Message {
            request_id: header.request_id,
            body,
        })
    }
}

fn decode_create<'a>(reader: &mut Reader<'a>) -> Result<Create<'a>, DecodeError> {
    let file = reader.file_ref()?;
    let disposition = reader.u32()?;
    let disposition = CreateDisposition::from_u32(disposition)
        .ok_or(DecodeError::UnknownDisposition(disposition))?;
    let options = reader.u32()?;
    let attributes = reader.u32()?;
    let result = reader.u32()?;
    let result = CreateResult::from_u32(result).ok_or(DecodeError::UnknownCreateResult(result))?;
    let path_len = usize_from(reader.u32()?);
    reader.reserved_u32("create.reserved")?;
    reader.expect_len(CREATE_FIXED_LEN.saturating_add(path_len))?;
    let path = reader.path(path_len)?;
    Ok(Create {
        file,
        disposition,
        options,
        attributes,
        result,
        path,
    })
}

fn decode_pre_write<'a>(reader: &mut Reader<'a>) -> Result<PreWrite<'a>, DecodeError> {
    let file = reader.file_ref()?;
    let offset = reader.u64()?;
    let data_len = usize_from(reader.u32()?);
    let flags = reader.u32()?;
    let unknown = flags & !WriteFlags::KNOWN;
    if unknown != 0 {
        return Err(DecodeError::UnknownFlags {
            field: "pre_write.flags",
            bits: unknown,
        });
    }
    let offset = if flags & WriteFlags::END_OF_FILE != 0 {
        if offset != 0 {
            return Err(DecodeError::EndOfFileWithOffset(offset));
        }
        WriteOffset::EndOfFile
    } else {
        WriteOffset::At(offset)
    };
    reader.expect_len(PRE_WRITE_FIXED_LEN.saturating_add(data_len))?;
    let data = reader.take(data_len)?;
    let flags = WriteFlags {
        paging_io: flags & WriteFlags::PAGING_IO != 0,
        write_through: flags & WriteFlags::WRITE_THROUGH != 0,
    };
    Ok(PreWrite {
        file,
        offset,
        flags,
        data,
    })
}

mod set_class {
    pub const RENAME: u32 = 1;
    pub const DELETE: u32 = 2;
    pub const END_OF_FILE: u32 = 3;
    pub const ALLOCATION: u32 = 4;
    pub const BASIC: u32 = 5;
    /// Rename: replace; delete: delete.
    pub const FLAG_0: u32 = 1;
    /// POSIX semantics for rename and delete.
    pub const FLAG_POSIX: u32 = 2;
}

/// The value fields of a set-information body (offsets 48 to 84).
#[derive(Default)]
struct SetValues {
    words: [u64; 4],
    attributes: u32,
}

fn set_information_fields(info: &SetInformation<'_>) -> (u32, u32, SetValues) {
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    match *info {
        SetInformation::Rename {
            replace_if_exists,
            posix_semantics,
            ..
        } => (
            set_class::RENAME,
            flag(replace_if_exists, set_class::FLAG_0)
                | flag(posix_semantics, set_class::FLAG_POSIX),
            SetValues::default(),
        ),
        SetInformation::Delete {
            delete,
            posix_semantics,
        } => (
            set_class::DELETE,
            flag(delete, set_class::FLAG_0) | flag(posix_semantics, set_class::FLAG_POSIX),
            SetValues::default(),
        ),
        SetInformation::EndOfFile { size } => (
            set_class::END_OF_FILE,
            0,
            SetValues {
                words: [size, 0, 0, 0],
                attributes: 0,
            },
        ),
        SetInformation::Allocation { size } => (
            set_class::ALLOCATION,
            0,
            SetValues {
                words: [size, 0, 0, 0],
                attributes: 0,
            },
        ),
        SetInformation::Basic(basic) => (
            set_class::BASIC,
            0,
            SetValues {
                words: [
                    u64::from_le_bytes(basic.creation_time.to_le_bytes()),
                    u64::from_le_bytes(basic.last_access_time.to_le_bytes()),
                    u64::from_le_bytes(basic.last_write_time.to_le_bytes()),
                    u64::from_le_bytes(basic.change_time.to_le_bytes()),
                ],
                attributes: basic.file_attributes,
            },
        ),
    }
}

fn rename_target<'a>(info: &SetInformation<'a>) -> Utf16Path<'a> {
    match info {
        SetInformation::Rename { target, .. } => *target,
        _ => Utf16Path::default(),
    }
}

fn decode_pre_set_information<'a>(
    reader: &mut Reader<'a>,
) -> Result<PreSetInformation<'a>, DecodeError> {
    let file = reader.file_ref()?;
    let class = reader.u32()?;
    let flags = reader.u32()?;
    let path_len = usize_from(reader.u32()?);
    let target_len = usize_from(reader.u32()?);
    let mut values = SetValues::default();
    for word in &mut values.words {
        *word = reader.u64()?;
    }
    values.attributes = reader.u32()?;
    reader.reserved_u32("set_information.reserved")?;

    let allowed_flags = match class {
        set_class::RENAME | set_class::DELETE => set_class::FLAG_0 | set_class::FLAG_POSIX,
        set_class::END_OF_FILE | set_class::ALLOCATION | set_class::BASIC => 0,
        other => return Err(DecodeError::UnknownSetInformationClass(other)),
    };
    let unknown = flags & !allowed_flags;
    if unknown != 0 {
        return Err(DecodeError::UnknownFlags {
            field: "set_information.flags",
            bits: unknown,
        });
    }
    if class != set_class::RENAME && target_len != 0 {
        return Err(DecodeError::NonZeroReserved {
            field: "set_information.target_len",
        });
    }
    let [w0, w1, w2, w3] = values.words;
    let (used_words, uses_attributes) = match class {
        set_class::RENAME | set_class::DELETE => (0, false),
        set_class::END_OF_FILE | set_class::ALLOCATION => (1, false),
        _ => (4, true),
    };
    let unused_nonzero = values.words.iter().skip(used_words).any(|word| *word != 0)
        || (!uses_attributes && values.attributes != 0);
    if unused_nonzero {
        return Err(DecodeError::NonZeroReserved {
            field: "set_information.values",
        });
    }

    let expected = PRE_SET_INFORMATION_FIXED_LEN
        .saturating_add(path_len)
        .saturating_add(target_len);
    reader.expect_len(expected)?;
    let path = reader.path(path_len)?;
    let target = reader.path(target_len)?;
    let info = match class {
        set_class::RENAME => {
            if target.is_empty() {
                return Err(DecodeError::EmptyRenameTarget);
            }
            SetInformation::Rename {
                target,
                replace_if_exists: flags & set_class::FLAG_0 != 0,
                posix_semantics: flags & set_class::FLAG_POSIX != 0,
            }
        }
        set_class::DELETE => SetInformation::Delete {
            delete: flags & set_class::FLAG_0 != 0,
            posix_semantics: flags & set_class::FLAG_POSIX != 0,
        },
        set_class::END_OF_FILE => SetInformation::EndOfFile { size: w0 },
        set_class::ALLOCATION => SetInformation::Allocation { size: w0 },
        _ => SetInformation::Basic(BasicInfo {
            creation_time: i64::from_le_bytes(w0.to_le_bytes()),
            last_access_time: i64::from_le_bytes(w1.to_le_bytes()),
            last_write_time: i64::from_le_bytes(w2.to_le_bytes()),
            change_time: i64::from_le_bytes(w3.to_le_bytes()),
            file_attributes: values.attributes,
        }),
    };
    Ok(PreSetInformation { file, path, info })
}

/// `u32` to `usize`; saturates on (hypothetical) 16-bit targets.
fn usize_from(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// A length already checked by `body_len` to fit a `u32`.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Little-endian reads that fail instead of panicking.
#[derive(Debug)]
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(len);
        let slice =
            end.and_then(|end| self.bytes.get(self.pos..end))
                .ok_or(DecodeError::Truncated {
                    needed: end.unwrap_or(usize::MAX),
                    available: self.bytes.len(),
                })?;
        self.pos += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    fn u128(&mut self) -> Result<u128, DecodeError> {
        self.array().map(u128::from_le_bytes)
    }

    /// Everything not read yet, consumed.
    fn rest(&mut self) -> &'a [u8] {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        self.pos = self.bytes.len();
        rest
    }

    fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    fn reserved_u32(&mut self, field: &'static str) -> Result<(), DecodeError> {
        match self.u32()? {
            0 => Ok(()),
            _ => Err(DecodeError::NonZeroReserved { field }),
        }
    }

    /// The whole body must be `expected` bytes long.
    fn expect_len(&self, expected: usize) -> Result<(), DecodeError> {
        if self.bytes.len() == expected {
            Ok(())
        } else {
            Err(DecodeError::InnerLengthMismatch {
                expected,
                actual: self.bytes.len(),
            })
        }
    }

    fn path(&mut self, len: usize) -> Result<Utf16Path<'a>, DecodeError> {
        Utf16Path::from_le_bytes(self.take(len)?).map_err(DecodeError::BadPath)
    }

    fn file_ref(&mut self) -> Result<FileRef, DecodeError> {
        let volume_serial = self.u64()?;
        let file_id = self.u128()?;
        let dir_index = self.u16()?;
        match self.u16()? {
            0 => {}
            _ => {
                return Err(DecodeError::NonZeroReserved {
                    field: "file_ref.reserved",
                });
            }
        }
        let process_id = self.u32()?;
        Ok(FileRef {
            key: FileKey {
                volume_serial,
                file_id,
            },
            dir_index,
            process_id,
        })
    }
}

/// Little-endian writes into a buffer whose size was checked beforehand.
struct Writer<'b> {
    buf: &'b mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, bytes: &[u8]) {
        let end = self.pos.saturating_add(bytes.len());
        // `encode` sized the buffer from the same lengths, so this always fits;
        // if it ever did not, the message would fail to decode rather than panic.
        if let Some(out) = self.buf.get_mut(self.pos..end) {
            out.copy_from_slice(bytes);
        }
        self.pos = end;
    }

    fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }

    fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }

    fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    fn file_ref(&mut self, file: &FileRef) {
        self.u64(file.key.volume_serial);
        self.bytes(&file.key.file_id.to_le_bytes());
        self.u16(file.dir_index);
        self.u16(0);
        self.u32(file.process_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn utf16(text: &str) -> Vec<u8> {
        text.encode_utf16().flat_map(u16::to_le_bytes).collect()
    }

    fn path(bytes: &[u8]) -> Utf16Path<'_> {
        Utf16Path::from_le_bytes(bytes).expect("test paths have even length")
    }

    fn encode_to_vec(message: &Message<'_>) -> Vec<u8> {
        let len = message.encoded_len().expect("test messages fit");
        let mut buf = vec![0xAA; len];
        assert_eq!(message.encode(&mut buf), Ok(len));
        buf
    }

    /// The encoding is exactly `expected`, and `expected` decodes back.
    fn check_golden(message: Message<'_>, expected: &[u8]) {
        assert_eq!(encode_to_vec(&message), expected);
        assert_eq!(Message::decode(expected), Ok(message));
        let header = Header::decode(expected).expect("golden header decodes");
        assert_eq!(header.frame_len(), expected.len());
    }

    /// Volume 0x1122334455667788, NTFS file record 42 with sequence number 1,
    /// replicated directory 2, process 0x1234.
    const FILE: FileRef = FileRef {
        key: FileKey {
            volume_serial: 0x1122_3344_5566_7788,
            file_id: 0x0001_0000_0000_002A,
        },
        dir_index: 2,
        process_id: 0x1234,
    };

    #[rustfmt::skip]
    const FILE_BYTES: [u8; 32] = [
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // volume serial
        0x2A, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, // file id
        0x02, 0x00, // dir index
        0x00, 0x00, // reserved
        0x34, 0x12, 0, 0, // process id
    ];

    fn header(kind: u16, request_id: u8, body_len: u8) -> Vec<u8> {
        let mut bytes = b"SKMF".to_vec();
        bytes.extend([0x01, 0x00]);
        bytes.extend(kind.to_le_bytes());
        bytes.extend([request_id, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend([body_len, 0, 0, 0]);
        bytes.extend([0, 0, 0, 0]);
        bytes
    }

    #[test]
    fn header_layout_is_pinned() {
        #[rustfmt::skip]
        let expected = [
            b'S', b'K', b'M', b'F', 0x01, 0x00, 0x04, 0x00,
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,
            0x20, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ];
        let mut bytes = expected.to_vec();
        bytes.extend(FILE_BYTES);
        check_golden(
            Message {
                request_id: 0x0102_0304_0506_0708,
                body: Body::Cleanup(Cleanup { file: FILE }),
            },
            &bytes,
        );
    }

    #[test]
    fn create_layout_is_pinned() {
        let name = utf16("\\a");
        let mut bytes = header(1, 9, 60);
        bytes.extend(FILE_BYTES);
        #[rustfmt::skip]
        bytes.extend([
            0x05, 0, 0, 0, // disposition FILE_OVERWRITE_IF
            0x40, 0, 0, 0, // options FILE_NON_DIRECTORY_FILE
            0x80, 0, 0, 0, // attributes FILE_ATTRIBUTE_NORMAL
            0x02, 0, 0, 0, // result FILE_CREATED
            0x04, 0, 0, 0, // path length
            0, 0, 0, 0,    // reserved
            0x5C, 0, 0x61, 0, // "\a"
        ]);
        check_golden(
            Message {
                request_id: 9,
                body: Body::Create(Create {
                    file: FILE,
                    disposition: CreateDisposition::OverwriteIf,
                    options: 0x40,
                    attributes: 0x80,
                    result: CreateResult::Created,
                    path: path(&name),
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn pre_write_layout_is_pinned() {
        let mut bytes = header(2, 3, 51);
        bytes.extend(FILE_BYTES);
        #[rustfmt::skip]
        bytes.extend([
            0x00, 0x10, 0, 0, 0, 0, 0, 0, // offset 4096
            0x03, 0, 0, 0, // data length
            0x02, 0, 0, 0, // write-through
            b'a', b'b', b'c',
        ]);
        check_golden(
            Message {
                request_id: 3,
                body: Body::PreWrite(PreWrite {
                    file: FILE,
                    offset: WriteOffset::At(4096),
                    flags: WriteFlags {
                        paging_io: false,
                        write_through: true,
                    },
                    data: b"abc",
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn pre_write_at_end_of_file_sets_bit_2_and_offset_0() {
        let mut bytes = header(2, 4, 48);
        bytes.extend(FILE_BYTES);
        bytes.extend([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, 0, 0, 0]);
        check_golden(
            Message {
                request_id: 4,
                body: Body::PreWrite(PreWrite {
                    file: FILE,
                    offset: WriteOffset::EndOfFile,
                    flags: WriteFlags {
                        paging_io: true,
                        write_through: false,
                    },
                    data: b"",
                }),
            },
            &bytes,
        );
        // The same bytes with a non-zero offset are rejected.
        let offset_at = HEADER_LEN + FILE_REF_LEN;
        bytes[offset_at] = 1;
        assert_eq!(
            Message::decode(&bytes),
            Err(DecodeError::EndOfFileWithOffset(1))
        );
    }

    #[test]
    fn rename_layout_is_pinned() {
        let from = utf16("\\a");
        let to = utf16("\\b");
        let mut bytes = header(3, 5, 96);
        bytes.extend(FILE_BYTES);
        bytes.extend([0x01, 0, 0, 0]); // class rename
        bytes.extend([0x03, 0, 0, 0]); // replace + POSIX
        bytes.extend([0x04, 0, 0, 0]); // path length
        bytes.extend([0x04, 0, 0, 0]); // target length
        bytes.extend([0; 40]); // values and reserved
        bytes.extend([0x5C, 0, 0x61, 0, 0x5C, 0, 0x62, 0]);
        check_golden(
            Message {
                request_id: 5,
                body: Body::PreSetInformation(PreSetInformation {
                    file: FILE,
                    path: path(&from),
                    info: SetInformation::Rename {
                        target: path(&to),
                        replace_if_exists: true,
                        posix_semantics: true,
                    },
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn end_of_file_and_basic_info_layouts_are_pinned() {
        let name = utf16("\\a");
        let mut bytes = header(3, 6, 92);
        bytes.extend(FILE_BYTES);
        bytes.extend([0x03, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend([0x00, 0x00, 0x10, 0, 0, 0, 0, 0]); // size 1 MiB
        bytes.extend([0; 32]);
        bytes.extend([0x5C, 0, 0x61, 0]);
        check_golden(
            Message {
                request_id: 6,
                body: Body::PreSetInformation(PreSetInformation {
                    file: FILE,
                    path: path(&name),
                    info: SetInformation::EndOfFile { size: 1 << 20 },
                }),
            },
            &bytes,
        );

        let mut bytes = header(3, 6, 92);
        bytes.extend(FILE_BYTES);
        bytes.extend([0x05, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend([1, 0, 0, 0, 0, 0, 0, 0]); // creation
        bytes.extend([0xFF; 8]); // last access -1: stop updating
        bytes.extend([3, 0, 0, 0, 0, 0, 0, 0]); // last write
        bytes.extend([0; 8]); // change: unchanged
        bytes.extend([0x20, 0, 0, 0, 0, 0, 0, 0]); // FILE_ATTRIBUTE_ARCHIVE, reserved
        bytes.extend([0x5C, 0, 0x61, 0]);
        check_golden(
            Message {
                request_id: 6,
                body: Body::PreSetInformation(PreSetInformation {
                    file: FILE,
                    path: path(&name),
                    info: SetInformation::Basic(BasicInfo {
                        creation_time: 1,
                        last_access_time: -1,
                        last_write_time: 3,
                        change_time: 0,
                        file_attributes: 0x20,
                    }),
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn delete_and_allocation_layouts_are_pinned() {
        let name = utf16("\\a");
        let mut bytes = header(3, 8, 92);
        bytes.extend(FILE_BYTES);
        bytes.extend([0x02, 0, 0, 0]); // class delete
        bytes.extend([0x01, 0, 0, 0]); // delete, not POSIX
        bytes.extend([0x04, 0, 0, 0, 0, 0, 0, 0]); // path length, no target
        bytes.extend([0; 40]);
        bytes.extend([0x5C, 0, 0x61, 0]);
        check_golden(
            Message {
                request_id: 8,
                body: Body::PreSetInformation(PreSetInformation {
                    file: FILE,
                    path: path(&name),
                    info: SetInformation::Delete {
                        delete: true,
                        posix_semantics: false,
                    },
                }),
            },
            &bytes,
        );

        let mut bytes = header(3, 8, 92);
        bytes.extend(FILE_BYTES);
        bytes.extend([0x04, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend([0x00, 0x20, 0, 0, 0, 0, 0, 0]); // 8 KiB
        bytes.extend([0; 32]);
        bytes.extend([0x5C, 0, 0x61, 0]);
        check_golden(
            Message {
                request_id: 8,
                body: Body::PreSetInformation(PreSetInformation {
                    file: FILE,
                    path: path(&name),
                    info: SetInformation::Allocation { size: 8192 },
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn reply_layout_is_pinned() {
        let mut bytes = header(0x8001, 7, 8);
        bytes.extend([0x22, 0x00, 0x00, 0xC0, 0, 0, 0, 0]);
        check_golden(
            Message {
                request_id: 7,
                body: Body::Reply(Reply {
                    verdict: Verdict::Fail(FailStatus::ACCESS_DENIED),
                }),
            },
            &bytes,
        );
        let mut bytes = header(0x8001, 7, 8);
        bytes.extend([0; 8]);
        check_golden(
            Message {
                request_id: 7,
                body: Body::Reply(Reply {
                    verdict: Verdict::Allow,
                }),
            },
            &bytes,
        );
    }

    #[test]
    fn configure_layout_is_pinned() {
        let alias = utf16("C:");
        let device = utf16("\\D");
        let dir = utf16("C:\\r");
        let logs = utf16("l");
        let entries = [
            ConfigEntry::Volume {
                alias: path(&alias),
                device: path(&device),
            },
            ConfigEntry::Replicated { path: path(&dir) },
            ConfigEntry::Excluded {
                dir_index: 0,
                relative: path(&logs),
            },
        ];
        let mut bytes = header(0x8002, 9, 8 + 16 + 8 + 16 + 8 + 16 + 2);
        bytes.extend([0x03, 0, 0, 0, 0, 0, 0, 0]); // three entries, reserved
        bytes.extend([0x01, 0, 0, 0, 0x04, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0]); // volume
        bytes.extend([b'C', 0, b':', 0, b'\\', 0, b'D', 0]);
        bytes.extend([0x02, 0, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // replicated
        bytes.extend([b'C', 0, b':', 0, b'\\', 0, b'r', 0]);
        bytes.extend([0x03, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // excluded, dir 0
        bytes.extend([b'l', 0]);
        check_golden(
            Message {
                request_id: 9,
                body: Body::Configure(Configure::new(&entries)),
            },
            &bytes,
        );
        let decoded = Message::decode(&bytes).expect("golden decodes");
        let Body::Configure(configure) = decoded.body else {
            panic!("not a configuration: {decoded:?}");
        };
        assert_eq!(configure.len(), 3);
        assert!(configure.entries().eq(entries.iter().copied()));

        // An entry class 4 is refused, as is a replicated entry with a device.
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 8] = 4;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::UnknownConfigEntry(4))
        );
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 8 + 24 + 8] = 2;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::NonZeroReserved {
                field: "config_entry.second_len"
            })
        );
        // One entry fewer than the bytes hold.
        let mut bad = bytes.clone();
        bad[HEADER_LEN] = 2;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::InnerLengthMismatch {
                expected: 56,
                actual: 74
            })
        );
    }

    #[test]
    fn malformed_headers_are_named() {
        let mut good = header(4, 1, 32);
        good.extend(FILE_BYTES);
        assert!(Message::decode(&good).is_ok());

        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(Message::decode(&bad), Err(DecodeError::BadMagic(*b"XKMF")));
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut bad = good.clone();
        bad[6] = 9;
        assert_eq!(Message::decode(&bad), Err(DecodeError::UnknownKind(9)));
        let mut bad = good.clone();
        bad[20] = 1;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::NonZeroReserved {
                field: "header.reserved"
            })
        );
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::BodyLengthMismatch {
                declared: 32,
                actual: 33
            })
        );
        assert_eq!(
            Message::decode(&good[..10]),
            Err(DecodeError::Truncated {
                needed: 16,
                available: 10
            })
        );
    }

    #[test]
    fn malformed_bodies_are_named() {
        // A cleanup body whose file reference has a non-zero reserved field.
        let mut bad = header(4, 1, 32);
        bad.extend(FILE_BYTES);
        bad[HEADER_LEN + 26] = 1;
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::NonZeroReserved {
                field: "file_ref.reserved"
            })
        );

        // A create with an odd path length.
        let mut bad = header(1, 1, 57);
        bad.extend(FILE_BYTES);
        bad.extend([
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, b'x',
        ]);
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::BadPath(PathError::OddLength(1)))
        );

        // A reply with a warning status instead of success or an error.
        let mut bad = header(0x8001, 1, 8);
        bad.extend([0x05, 0x00, 0x00, 0x80, 0, 0, 0, 0]);
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::BadStatus(0x8000_0005))
        );

        // A delete carrying a target path.
        let mut bad = header(3, 1, 90);
        bad.extend(FILE_BYTES);
        bad.extend([0x02, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0]);
        bad.extend([0; 40]);
        bad.extend([b'x', 0]);
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::NonZeroReserved {
                field: "set_information.target_len"
            })
        );

        // A write whose data length runs past the body.
        let mut bad = header(2, 1, 49);
        bad.extend(FILE_BYTES);
        bad.extend([0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, b'x']);
        assert_eq!(
            Message::decode(&bad),
            Err(DecodeError::InnerLengthMismatch {
                expected: 50,
                actual: 49
            })
        );
    }

    #[test]
    fn encode_refuses_a_short_buffer_and_leaves_it_untouched() {
        let message = Message {
            request_id: 1,
            body: Body::Cleanup(Cleanup { file: FILE }),
        };
        let mut buf = [0x5A; HEADER_LEN + CLEANUP_LEN - 1];
        assert_eq!(
            message.encode(&mut buf),
            Err(EncodeError::BufferTooSmall {
                needed: 56,
                available: 55
            })
        );
        assert!(buf.iter().all(|byte| *byte == 0x5A));
    }

    #[test]
    fn fail_status_requires_error_severity() {
        assert_eq!(
            FailStatus::new(0xC000_0022),
            Some(FailStatus::ACCESS_DENIED)
        );
        assert_eq!(FailStatus::new(0), None);
        assert_eq!(FailStatus::new(0x8000_0005), None);
        assert_eq!(FailStatus::new(0x4000_0000), None);
    }

    #[test]
    fn utf16_paths_print_readably() {
        let mut bytes = utf16("\\Device\\é");
        bytes.extend([0x00, 0xD8]); // an unpaired high surrogate
        assert_eq!(
            format!("{:?}", path(&bytes)),
            "\"\\\\Device\\\\é\\u{d800}\""
        );
    }

    /// Owned storage from which a borrowed [`Message`] is built.
    #[derive(Debug, Clone)]
    enum Spec {
        Create {
            file: FileRef,
            disposition: u32,
            options: u32,
            attributes: u32,
            result: u32,
            path: Vec<u8>,
        },
        Write {
            file: FileRef,
            offset: Option<u64>,
            paging_io: bool,
            write_through: bool,
            data: Vec<u8>,
        },
        SetInformation {
            file: FileRef,
            path: Vec<u8>,
            class: u8,
            flags: (bool, bool),
            target: Vec<u8>,
            words: [u64; 4],
            attributes: u32,
        },
        Cleanup {
            file: FileRef,
        },
        Reply {
            status: Option<u32>,
        },
        /// Class (0 volume, 1 replicated, 2 excluded), directory, two paths.
        Configure {
            entries: Vec<(u8, u16, Vec<u8>, Vec<u8>)>,
        },
    }

    /// The configuration entries of a spec (empty for other kinds), which
    /// [`build`] borrows.
    fn config_entries(spec: &Spec) -> Vec<ConfigEntry<'_>> {
        let Spec::Configure { entries } = spec else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|(class, dir_index, first, second)| match class {
                0 => ConfigEntry::Volume {
                    alias: path(first),
                    device: path(second),
                },
                1 => ConfigEntry::Replicated { path: path(first) },
                _ => ConfigEntry::Excluded {
                    dir_index: *dir_index,
                    relative: path(first),
                },
            })
            .collect()
    }

    fn build<'a>(request_id: u64, spec: &'a Spec, entries: &'a [ConfigEntry<'a>]) -> Message<'a> {
        let body = match spec {
            Spec::Create {
                file,
                disposition,
                options,
                attributes,
                result,
                path: name,
            } => Body::Create(Create {
                file: *file,
                disposition: CreateDisposition::from_u32(*disposition).expect("strategy range"),
                options: *options,
                attributes: *attributes,
                result: CreateResult::from_u32(*result).expect("strategy range"),
                path: path(name),
            }),
            Spec::Write {
                file,
                offset,
                paging_io,
                write_through,
                data,
            } => Body::PreWrite(PreWrite {
                file: *file,
                offset: offset.map_or(WriteOffset::EndOfFile, WriteOffset::At),
                flags: WriteFlags {
                    paging_io: *paging_io,
                    write_through: *write_through,
                },
                data,
            }),
            Spec::SetInformation {
                file,
                path: name,
                class,
                flags,
                target,
                words,
                attributes,
            } => {
                let info = match class {
                    0 => SetInformation::Rename {
                        target: path(target),
                        replace_if_exists: flags.0,
                        posix_semantics: flags.1,
                    },
                    1 => SetInformation::Delete {
                        delete: flags.0,
                        posix_semantics: flags.1,
                    },
                    2 => SetInformation::EndOfFile { size: words[0] },
                    3 => SetInformation::Allocation { size: words[0] },
                    _ => SetInformation::Basic(BasicInfo {
                        creation_time: words[0] as i64,
                        last_access_time: words[1] as i64,
                        last_write_time: words[2] as i64,
                        change_time: words[3] as i64,
                        file_attributes: *attributes,
                    }),
                };
                Body::PreSetInformation(PreSetInformation {
                    file: *file,
                    path: path(name),
                    info,
                })
            }
            Spec::Cleanup { file } => Body::Cleanup(Cleanup { file: *file }),
            Spec::Reply { status } => Body::Reply(Reply {
                verdict: status.map_or(Verdict::Allow, |code| {
                    Verdict::Fail(FailStatus::new(code | 0xC000_0000).expect("error severity"))
                }),
            }),
            Spec::Configure { .. } => Body::Configure(Configure::new(entries)),
        };
        Message { request_id, body }
    }

    fn file_ref() -> impl Strategy<Value = FileRef> {
        (any::<u64>(), any::<u128>(), any::<u16>(), any::<u32>()).prop_map(
            |(volume_serial, file_id, dir_index, process_id)| FileRef {
                key: FileKey {
                    volume_serial,
                    file_id,
                },
                dir_index,
                process_id,
            },
        )
    }

    fn utf16_bytes(min_units: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u16>(), min_units..40)
            .prop_map(|units| units.into_iter().flat_map(u16::to_le_bytes).collect())
    }

    fn spec() -> impl Strategy<Value = Spec> {
        prop_oneof![
            (
                file_ref(),
                0..6u32,
                any::<u32>(),
                any::<u32>(),
                0..6u32,
                utf16_bytes(0)
            )
                .prop_map(|(file, disposition, options, attributes, result, path)| {
                    Spec::Create {
                        file,
                        disposition,
                        options,
                        attributes,
                        result,
                        path,
                    }
                }),
            (
                file_ref(),
                any::<Option<u64>>(),
                any::<bool>(),
                any::<bool>(),
                prop::collection::vec(any::<u8>(), 0..300)
            )
                .prop_map(|(file, offset, paging_io, write_through, data)| {
                    Spec::Write {
                        file,
                        offset,
                        paging_io,
                        write_through,
                        data,
                    }
                }),
            (
                file_ref(),
                utf16_bytes(0),
                0..5u8,
                any::<(bool, bool)>(),
                utf16_bytes(1),
                any::<[u64; 4]>(),
                any::<u32>()
            )
                .prop_map(|(file, path, class, flags, target, words, attributes)| {
                    Spec::SetInformation {
                        file,
                        path,
                        class,
                        flags,
                        target,
                        words,
                        attributes,
                    }
                }),
            file_ref().prop_map(|file| Spec::Cleanup { file }),
            any::<Option<u32>>().prop_map(|status| Spec::Reply { status }),
            prop::collection::vec((0..3u8, any::<u16>(), utf16_bytes(0), utf16_bytes(0)), 0..5)
                .prop_map(|entries| Spec::Configure { entries }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_decodes_to_itself(request_id in any::<u64>(), spec in spec()) {
            let entries = config_entries(&spec);
            let message = build(request_id, &spec, &entries);
            let bytes = encode_to_vec(&message);
            prop_assert_eq!(Message::decode(&bytes), Ok(message));
            let header = Header::decode(&bytes).expect("header of an encoded message");
            prop_assert_eq!(header.frame_len(), bytes.len());
            prop_assert_eq!(header.request_id, request_id);
        }

        #[test]
        fn every_strict_prefix_is_rejected(request_id in any::<u64>(), spec in spec()) {
            let entries = config_entries(&spec);
            let bytes = encode_to_vec(&build(request_id, &spec, &entries));
            for len in 0..bytes.len() {
                prop_assert!(Message::decode(&bytes[..len]).is_err());
            }
        }

        #[test]
        fn a_decoded_corruption_reencodes_to_the_same_bytes(
            request_id in any::<u64>(),
            spec in spec(),
            position in any::<prop::sample::Index>(),
            value in any::<u8>(),
        ) {
            let entries = config_entries(&spec);
            let mut bytes = encode_to_vec(&build(request_id, &spec, &entries));
            let position = position.index(bytes.len());
            bytes[position] = value;
            if let Ok(decoded) = Message::decode(&bytes) {
                prop_assert_eq!(encode_to_vec(&decoded), bytes);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(decoded) = Message::decode(&bytes) {
                prop_assert_eq!(encode_to_vec(&decoded), bytes);
            }
        }
    }
}
