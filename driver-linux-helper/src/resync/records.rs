//! A tiny append-only record file, shared by the resync cursor and the activity log.
//!
//! Layout: an 8-byte magic, then records `len: u32 LE | crc: u32 LE | postcard body`
//! (CRC-32C of the body), the same framing as the dirty log. A crash can only
//! tear the last record; [`load`] stops there and reports the valid length so
//! that the file can be cut back before appending again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A record body larger than this is treated as torn.
const MAX_RECORD_LEN: u32 = 1 << 20;

/// Appends the framing of `record` to `out`.
pub(crate) fn encode<T: Serialize>(record: &T, out: &mut Vec<u8>) -> io::Result<()> {
    let body = postcard::to_allocvec(record).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// The records of a file and the length of its valid prefix; `None` when the
/// file does not start with `magic`.
pub(crate) fn parse<T: DeserializeOwned>(bytes: &[u8], magic: &[u8; 8]) -> Option<(Vec<T>, u64)> {
    let mut rest = bytes.strip_prefix(magic.as_slice())?;
    let mut records = Vec::new();
    let mut valid = magic.len() as u64;
    while rest.len() >= 8 {
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > MAX_RECORD_LEN || rest.len() < 8 + len as usize {
            break;
        }
        let body = &rest[8..8 + len as usize];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let Ok((record, tail)) = postcard::take_from_bytes::<T>(body) else {
            break;
        };
        if !tail.is_empty() {
            break;
        }
        records.push(record);
        rest = &rest[8 + len as usize..];
        valid += 8 + u64::from(len);
    }
    Some((records, valid))
}

/// Reads a record file; `Ok(None)` when it does not exist or is not ours.
pub(crate) fn load<T: DeserializeOwned>(
    path: &Path,
    magic: &[u8; 8],
) -> io::Result<Option<(Vec<T>, u64)>> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut file) => file.read_to_end(&mut bytes)?,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    Ok(parse(&bytes, magic))
}

/// Writes a fresh file holding `magic` and `records` durably (temporary file,
/// fsync, rename, fsync of the directory), and returns it opened for appending.
pub(crate) fn rewrite<T: Serialize>(
    path: &Path,
    magic: &[u8; 8],
    records: &[T],
) -> io::Result<File> {
    let mut bytes = magic.to_vec();
    for record in records {
        encode(record, &mut bytes)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    open_append(path, bytes.len() as u64)
}

/// Opens an existing record file for appending after its valid prefix (cutting a torn tail).
pub(crate) fn open_append(path: &Path, valid_len: u64) -> io::Result<File> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    if file.metadata()?.len() != valid_len {
        file.set_len(valid_len)?;
        file.sync_all()?;
    }
    file.seek(SeekFrom::Start(valid_len))?;
    Ok(file)
}

/// Appends already framed records and makes them durable.
pub(crate) fn append(file: &mut File, bytes: &[u8]) -> io::Result<()> {
    let before = file.stream_position()?;
    let result = file.write_all(bytes).and_then(|()| file.sync_data());
    if result.is_err() {
        let _ = file.set_len(before);
        let _ = file.seek(SeekFrom::Start(before));
    }
    result
}
