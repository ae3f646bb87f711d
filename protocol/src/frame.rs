//! Framing of the replication stream: how messages become bytes on the TCP connection and back.
//!
//! # Wire format (version 1)
//!
//! Every frame is a fixed 24-byte little-endian header followed by `payload_len` bytes:
//!
//! | offset | size | field         | meaning                                                    |
//! |-------:|-----:|---------------|------------------------------------------------------------|
//! | 0      | 4    | magic         | `b"SKRP"`                                                  |
//! | 4      | 1    | version       | [`PROTOCOL_VERSION`] (1)                                   |
//! | 5      | 1    | kind          | [`Kind`] as a number                                       |
//! | 6      | 2    | flags         | reserved, must be 0                                        |
//! | 8      | 8    | seq           | operation sequence number (`Op` frames), else 0            |
//! | 16     | 4    | payload_len   | at most [`MAX_PAYLOAD_LEN`]                                |
//! | 20     | 4    | crc           | CRC-32C of the header with this field zeroed, then payload |
//!
//! The payload is the `postcard` encoding of the kind's body ([`Hello`],
//! [`Challenge`], [`Proof`], [`Refused`], [`Op`], [`Ack`], [`ApplyFailed`],
//! [`ResyncRequest`], [`ResyncReply`]);
//! `Welcome`, `Ping`, `Pong` and `Bye` have an empty payload. A body must use
//! its whole payload (no trailing bytes). Paths in decoded operations are
//! re-validated, so a decoded [`Message`] never carries `..`, an absolute
//! path or a NUL byte.
//!
//! The header is fixed-size so that the sender can checksum a body before it
//! knows its sequence number (the CRC of the payload is computed outside any
//! lock and combined with the header's later, see [`EncodedBody`]).
//!
//! # Decoding
//!
//! [`FrameDecoder`] is incremental: push whatever the socket returned, then
//! take complete frames. It never panics and never allocates more than one
//! frame's bounded payload beyond what was pushed; the first error is final
//! (the connection must be closed, since the stream cannot be resynchronised).

use serde::{Serialize, de::DeserializeOwned};

pub use crate::auth::PROTOCOL_VERSION;
use crate::auth::{Challenge, Hello, Proof, Refused};
use crate::replication::{Ack, ApplyFailed, Op, RelPathError};
use crate::resync::{RequestError, ResyncReply, ResyncRequest};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"SKRP";

/// Size of the fixed header.
pub const HEADER_LEN: usize = 24;

/// The largest payload accepted: a 16 MiB write plus room for its path and encoding.
pub const MAX_PAYLOAD_LEN: u32 = 16 * 1024 * 1024 + 64 * 1024;

/// The type of a frame's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client → server: [`Hello`].
    Hello = 1,
    /// Server → client: [`Challenge`].
    Challenge = 2,
    /// Client → server: [`Proof`].
    Proof = 3,
    /// Server → client: authenticated, operations may flow.
    Welcome = 4,
    /// Server → client: [`Refused`], then the server closes.
    Refused = 5,
    /// Client → server: one [`Op`] with its sequence number in the header.
    Op = 6,
    /// Server → client: cumulative [`Ack`].
    Ack = 7,
    /// Server → client: [`ApplyFailed`].
    ApplyFailed = 8,
    /// Either way: are you there?
    Ping = 9,
    /// Either way: answer to a ping.
    Pong = 10,
    /// Either way: orderly close.
    Bye = 11,
    /// Client → server: [`ResyncRequest`], answered after every earlier operation is applied.
    ResyncRequest = 12,
    /// Server → client: [`ResyncReply`].
    ResyncReply = 13,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Proof,
            4 => Kind::Welcome,
            5 => Kind::Refused,
            6 => Kind::Op,
            7 => Kind::Ack,
            8 => Kind::ApplyFailed,
            9 => Kind::Ping,
            10 => Kind::Pong,
            11 => Kind::Bye,
            12 => Kind::ResyncRequest,
            13 => Kind::ResyncReply,
            _ => return None,
        })
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// See [`Kind::Hello`].
    Hello(Hello),
    /// See [`Kind::Challenge`].
    Challenge(Challenge),
    /// See [`Kind::Proof`].
    Proof(Proof),
    /// See [`Kind::Welcome`].
    Welcome,
    /// See [`Kind::Refused`].
    Refused(Refused),
    /// See [`Kind::Op`].
    Op(Op),
    /// See [`Kind::Ack`].
    Ack(Ack),
    /// See [`Kind::ApplyFailed`].
    ApplyFailed(ApplyFailed),
    /// See [`Kind::Ping`].
    Ping,
    /// See [`Kind::Pong`].
    Pong,
    /// See [`Kind::Bye`].
    Bye,
    /// See [`Kind::ResyncRequest`].
    ResyncRequest(ResyncRequest),
    /// See [`Kind::ResyncReply`].
    ResyncReply(ResyncReply),
}

impl Message {
    /// The kind byte of this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Challenge(_) => Kind::Challenge,
            Message::Proof(_) => Kind::Proof,
            Message::Welcome => Kind::Welcome,
            Message::Refused(_) => Kind::Refused,
            Message::Op(_) => Kind::Op,
            Message::Ack(_) => Kind::Ack,
            Message::ApplyFailed(_) => Kind::ApplyFailed,
            Message::Ping => Kind::Ping,
            Message::Pong => Kind::Pong,
            Message::Bye => Kind::Bye,
            Message::ResyncRequest(_) => Kind::ResyncRequest,
            Message::ResyncReply(_) => Kind::ResyncReply,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header's sequence number (an operation's; 0 for control frames).
    pub seq: u64,
    /// The message.
    pub message: Message,
}

/// What is wrong with the bytes received.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with `SKRP`: not our protocol, or out of step.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte is unknown.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved flag bits are set.
    #[error("unknown frame flags {0:#06x}")]
    UnknownFlags(u16),
    /// The announced payload is larger than [`MAX_PAYLOAD_LEN`].
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    Oversize(u32),
    /// The CRC does not match: the frame was corrupted.
    #[error("checksum mismatch: header says {expected:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The CRC in the header.
        expected: u32,
        /// The CRC of what was received.
        computed: u32,
    },
    /// The payload is not a valid body for its kind.
    #[error("undecodable {kind:?} body: {reason}")]
    UndecodableBody {
        /// The frame's kind.
        kind: Kind,
        /// What the body decoder said.
        reason: String,
    },
    /// An operation names a path that could leave the replicated directory.
    #[error("invalid path in {kind:?} frame: {source}")]
    InvalidPath {
        /// The frame's kind.
        kind: Kind,
        /// Why the path was refused.
        source: RelPathError,
    },
    /// A resync request or reply is out of bounds or names an invalid path.
    #[error("invalid {kind:?} body: {source}")]
    InvalidResync {
        /// The frame's kind.
        kind: Kind,
        /// What is wrong.
        source: RequestError,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The body is larger than the receiver accepts.
    #[error("payload of {0} bytes exceeds the limit of {MAX_PAYLOAD_LEN}")]
    Oversize(usize),
    /// `postcard` failed (it does not for our types; kept for honesty).
    #[error("cannot encode body: {0}")]
    Body(String),
}

/// A message's payload, encoded and checksummed, waiting for its sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBody {
    kind: Kind,
    payload: Vec<u8>,
    payload_crc: u32,
}

impl EncodedBody {
    /// Encodes the body of `message` and checksums it.
    ///
    /// # Errors
    /// [`EncodeError::Oversize`] if the body exceeds [`MAX_PAYLOAD_LEN`].
    pub fn new(message: &Message) -> Result<Self, EncodeError> {
        fn enc<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
            postcard::to_allocvec(value).map_err(|error| EncodeError::Body(error.to_string()))
        }
        let payload = match message {
            Message::Hello(body) => enc(body)?,
            Message::Challenge(body) => enc(body)?,
            Message::Proof(body) => enc(body)?,
            Message::Refused(body) => enc(body)?,
            Message::Op(body) => enc(body)?,
            Message::Ack(body) => enc(body)?,
            Message::ApplyFailed(body) => enc(body)?,
            Message::ResyncRequest(body) => enc(body)?,
            Message::ResyncReply(body) => enc(body)?,
            Message::Welcome | Message::Ping | Message::Pong | Message::Bye => Vec::new(),
        };
        if payload.len() > MAX_PAYLOAD_LEN as usize {
            return Err(EncodeError::Oversize(payload.len()));
        }
        let payload_crc = crc32c::crc32c(&payload);
        Ok(EncodedBody {
            kind: message.kind(),
            payload,
            payload_crc,
        })
    }

    /// The payload's length in bytes.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// The payload bytes (send them right after [`EncodedBody::header`]).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The header for this body with sequence number `seq` (cheap: 24 bytes checksummed).
    pub fn header(&self, seq: u64) -> [u8; HEADER_LEN] {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&MAGIC);
        header[4] = PROTOCOL_VERSION;
        header[5] = self.kind as u8;
        header[6..8].copy_from_slice(&0u16.to_le_bytes());
        header[8..16].copy_from_slice(&seq.to_le_bytes());
        let len = u32::try_from(self.payload.len())
            .expect("payload length was bounded in EncodedBody::new");
        header[16..20].copy_from_slice(&len.to_le_bytes());
        let crc = crc32c_combine(
            crc32c::crc32c(&header),
            self.payload_crc,
            self.payload.len() as u64,
        );
        header[20..24].copy_from_slice(&crc.to_le_bytes());
        header
    }

    /// Header and payload in one buffer.
    pub fn to_frame_bytes(&self, seq: u64) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.payload.len());
        bytes.extend_from_slice(&self.header(seq));
        bytes.extend_from_slice(&self.payload);
        bytes
    }
}

/// CRC-32C (Castagnoli) polynomial, reflected.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// `a * b modulo p(x)` in the reflected representation (zlib's `multmodp`).
const fn crc_multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
    }
    p
}

/// `x^(2^n) modulo p(x)` for n in 0..32.
const CRC_X2N: [u32; 32] = {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    table[0] = p;
    let mut n = 1;
    while n < 32 {
        p = crc_multmodp(p, p);
        table[n] = p;
        n += 1;
    }
    table
};

/// The CRC-32C of `a ‖ b` from the CRCs of `a` and of `b` (`len_b` bytes):
/// `crc_a * x^(8 len_b) + crc_b`, with the powers of x taken from a table,
/// so that it costs tens of operations whatever `len_b` (the `crc32c`
/// crate's combine costs about as much as checksumming `len_b` bytes, which
/// doubled the sender's checksum work for a 1 MiB write).
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    // x^(8 len_b): the bits of len_b select powers x^(2^(k+3)).
    let mut power = 1u32 << 31; // x^0
    let mut n = len_b;
    let mut k = 3;
    while n != 0 {
        if n & 1 != 0 {
            power = crc_multmodp(CRC_X2N[k & 31], power);
        }
        n >>= 1;
        k += 1;
    }
    crc_multmodp(power, crc_a) ^ crc_b
}

/// Encodes one message as a complete frame.
///
/// # Errors
/// See [`EncodedBody::new`].
pub fn encode(seq: u64, message: &Message) -> Result<Vec<u8>, EncodeError> {
    Ok(EncodedBody::new(message)?.to_frame_bytes(seq))
}

/// Incremental decoder of a byte stream into frames.
///
/// Bytes are either copied in ([`FrameDecoder::push`]) or received straight
/// into its buffer ([`FrameDecoder::spare`], then [`FrameDecoder::commit`]),
/// which spares the receiver one copy of every byte of replicated data.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// Storage: `start..end` holds bytes not yet consumed; `end..` is free.
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        let spare = self.spare(bytes.len());
        spare[..bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Free space of at least `min` bytes after the bytes held, to receive
    /// into; then call [`FrameDecoder::commit`] with the number received.
    /// Unconsumed bytes are moved to the front only when the space after
    /// them is short, and the buffer grows only when the whole of it is.
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buffer.len() - self.end < min {
            if self.start > 0 {
                self.buffer.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.buffer.len() - self.end < min {
                self.buffer.resize(self.end + min, 0);
            }
        }
        &mut self.buffer[self.end..]
    }

    /// `n` bytes were received into [`FrameDecoder::spare`]'s slice.
    ///
    /// # Panics
    /// If `n` exceeds the slice's length.
    pub fn commit(&mut self, n: usize) {
        assert!(
            self.end + n <= self.buffer.len(),
            "committed more than the spare space"
        );
        if self.failed.is_none() {
            self.end += n;
        }
    }

    /// Bytes pushed but not yet consumed by a complete frame.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Takes the next complete frame, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// The first problem found; every later call returns it again.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        match self.try_next() {
            Ok(frame) => Ok(frame),
            Err(error) => {
                self.failed = Some(error.clone());
                self.buffer = Vec::new();
                self.start = 0;
                self.end = 0;
                Err(error)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Frame>, FrameError> {
        let available = &self.buffer[self.start..self.end];
        // Check what we can as early as possible so that a peer speaking
        // another protocol is refused before it sends a whole header.
        let magic_prefix = available.len().min(MAGIC.len());
        if available[..magic_prefix] != MAGIC[..magic_prefix] {
            let mut seen = [0u8; 4];
            seen[..magic_prefix].copy_from_slice(&available[..magic_prefix]);
            return Err(FrameError::BadMagic(seen));
        }
        if available.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&available[..HEADER_LEN]);
        let version = header[4];
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let kind = Kind::from_u8(header[5]).ok_or(FrameError::UnknownKind(header[5]))?;
        let flags = u16::from_le_bytes([header[6], header[7]]);
        if flags != 0 {
            return Err(FrameError::UnknownFlags(flags));
        }
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("slice of 8 bytes"));
        let payload_len = u32::from_le_bytes(header[16..20].try_into().expect("slice of 4 bytes"));
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(FrameError::Oversize(payload_len));
        }
        let expected = u32::from_le_bytes(header[20..24].try_into().expect("slice of 4 bytes"));
        let total = HEADER_LEN + payload_len as usize;
        if available.len() < total {
            return Ok(None);
        }
        let payload = &available[HEADER_LEN..total];
        header[20..24].fill(0);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header), payload);
        if computed != expected {
            return Err(FrameError::ChecksumMismatch { expected, computed });
        }
        let message = decode_body(kind, payload)?;
        self.start += total;
        Ok(Some(Frame { seq, message }))
    }
}

fn decode_body(kind: Kind, payload: &[u8]) -> Result<Message, FrameError> {
    fn dec<T: DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, FrameError> {
        let (value, rest) = postcard::take_from_bytes::<T>(payload).map_err(|error| {
            FrameError::UndecodableBody {
                kind,
                reason: error.to_string(),
            }
        })?;
        if !rest.is_empty() {
            return Err(FrameError::UndecodableBody {
                kind,
                reason: format!("{} trailing bytes", rest.len()),
            });
        }
        Ok(value)
    }
    let invalid_path = |source| FrameError::InvalidPath { kind, source };
    Ok(match kind {
        Kind::Hello => Message::Hello(dec(kind, payload)?),
        Kind::Challenge => Message::Challenge(dec(kind, payload)?),
        Kind::Proof => Message::Proof(dec(kind, payload)?),
        Kind::Refused => Message::Refused(dec(kind, payload)?),
        Kind::Op => {
            let op: Op = dec(kind, payload)?;
            op.validate().map_err(invalid_path)?;
            Message::Op(op)
        }
        Kind::Ack => Message::Ack(dec(kind, payload)?),
        Kind::ApplyFailed => {
            let failed: ApplyFailed = dec(kind, payload)?;
            failed.path.validate().map_err(invalid_path)?;
            Message::ApplyFailed(failed)
        }
        Kind::ResyncRequest => {
            let request: ResyncRequest = dec(kind, payload)?;
            request
                .validate()
                .map_err(|source| FrameError::InvalidResync { kind, source })?;
            Message::ResyncRequest(request)
        }
        Kind::ResyncReply => {
            let reply: ResyncReply = dec(kind, payload)?;
            reply
                .validate()
                .map_err(|source| FrameError::InvalidResync { kind, source })?;
            Message::ResyncReply(reply)
        }
        Kind::Welcome | Kind::Ping | Kind::Pong | Kind::Bye => {
            if !payload.is_empty() {
                return Err(FrameError::UndecodableBody {
                    kind,
                    reason: format!("{} bytes where none are expected", payload.len()),
                });
            }
            match kind {
                Kind::Welcome => Message::Welcome,
                Kind::Ping => Message::Ping,
                Kind::Pong => Message::Pong,
                _ => Message::Bye,
            }
        }
    })
}

/// Frames an arbitrary payload under `kind`, with a correct checksum.
///
/// Meant for tests and fuzzing (a well-framed but malicious body); the
/// decoder still validates the body.
///
/// # Errors
/// [`EncodeError::Oversize`] if the payload exceeds [`MAX_PAYLOAD_LEN`].
pub fn encode_raw(kind: Kind, seq: u64, payload: Vec<u8>) -> Result<Vec<u8>, EncodeError> {
    if payload.len() > MAX_PAYLOAD_LEN as usize {
        return Err(EncodeError::Oversize(payload.len()));
    }
    let payload_crc = crc32c::crc32c(&payload);
    Ok(EncodedBody {
        kind,
        payload,
        payload_crc,
    }
    .to_frame_bytes(seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::{RelPath, TimeSet, Timestamp};
    use proptest::prelude::*;

    fn path_strategy() -> impl Strategy<Value = RelPath> {
        prop::collection::vec("[a-zA-Z0-9_.-]{1,12}", 0..4).prop_filter_map(
            "no dot components",
            |parts| {
                RelPath::from_components(parts.into_iter().map(String::into_bytes).collect()).ok()
            },
        )
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        let dir = 0u16..4;
        prop_oneof![
            (
                dir.clone(),
                path_strategy(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<bool>()
            )
                .prop_map(|(dir, path, mode, uid, gid, exclusive)| Op::Create {
                    dir,
                    path,
                    mode,
                    uid,
                    gid,
                    exclusive
                }),
            (
                dir.clone(),
                path_strategy(),
                any::<u64>(),
                prop::collection::vec(any::<u8>(), 0..2048)
            )
                .prop_map(|(dir, path, offset, data)| Op::Write {
                    dir,
                    path,
                    offset,
                    data
                }),
            (dir.clone(), path_strategy(), path_strategy(), 0u32..4).prop_map(
                |(dir, from, to, flags)| Op::Rename {
                    dir,
                    from,
                    to,
                    flags
                }
            ),
            (
                dir.clone(),
                path_strategy(),
                prop::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(dir, path, target)| Op::Symlink {
                    dir,
                    path,
                    target,
                    uid: 0,
                    gid: 0
                }),
            (
                dir.clone(),
                path_strategy(),
                any::<Option<u32>>(),
                any::<i64>(),
                0u32..1_000_000_000
            )
                .prop_map(|(dir, path, mode, secs, nanos)| Op::SetAttr {
                    dir,
                    path,
                    mode,
                    uid: None,
                    gid: Some(7),
                    atime: None,
                    mtime: Some(TimeSet::At(Timestamp { secs, nanos })),
                }),
            (dir.clone(), path_strategy(), any::<bool>()).prop_map(|(dir, path, datasync)| {
                Op::Fsync {
                    dir,
                    path,
                    datasync,
                }
            }),
            (dir, path_strategy(), any::<u64>()).prop_map(|(dir, path, size)| Op::Truncate {
                dir,
                path,
                size
            }),
        ]
    }

    fn message_strategy() -> impl Strategy<Value = Message> {
        prop_oneof![
            op_strategy().prop_map(Message::Op),
            (any::<u64>(), any::<bool>())
                .prop_map(|(seq, durable)| Message::Ack(Ack { seq, durable })),
            ("[a-z]{0,16}", any::<[u8; 32]>()).prop_map(|(module, client_nonce)| Message::Hello(
                Hello {
                    module,
                    version: PROTOCOL_VERSION,
                    client_nonce
                }
            )),
            Just(Message::Welcome),
            Just(Message::Ping),
            Just(Message::Bye),
        ]
    }

    proptest! {
        #[test]
        fn encode_then_decode_gives_the_same_frames(
            messages in prop::collection::vec((any::<u64>(), message_strategy()), 1..8),
            chunk in 1usize..300,
        ) {
            let mut stream = Vec::new();
            for (seq, message) in &messages {
                stream.extend(encode(*seq, message).expect("bounded message"));
            }
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().expect("valid stream") {
                    decoded.push((frame.seq, frame.message));
                }
            }
            prop_assert_eq!(decoded, messages);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn frames_received_into_the_spare_space_decode_like_pushed_ones(
            messages in prop::collection::vec((any::<u64>(), message_strategy()), 1..8),
            reads in prop::collection::vec(1usize..400, 1..40),
            asked in 1usize..600,
        ) {
            let mut stream = Vec::new();
            for (seq, message) in &messages {
                stream.extend(encode(*seq, message).expect("bounded message"));
            }
            // A socket that returns `reads` bytes at a time (cycling), never
            // more than the spare space offered.
            let mut decoder = FrameDecoder::new();
            let mut decoded = Vec::new();
            let mut at = 0;
            for read in reads.iter().cycle() {
                if at == stream.len() {
                    break;
                }
                let spare = decoder.spare(asked);
                prop_assert!(spare.len() >= asked);
                let n = (*read).min(spare.len()).min(stream.len() - at);
                spare[..n].copy_from_slice(&stream[at..at + n]);
                decoder.commit(n);
                at += n;
                while let Some(frame) = decoder.next_frame().expect("valid stream") {
                    decoded.push((frame.seq, frame.message));
                }
            }
            prop_assert_eq!(decoded, messages);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn any_changed_byte_is_refused_or_incomplete(
            message in message_strategy(),
            position in any::<prop::sample::Index>(),
            xor in 1u8..=255,
        ) {
            let mut bytes = encode(5, &message).expect("bounded message");
            let index = position.index(bytes.len());
            bytes[index] ^= xor;
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            let result = decoder.next_frame();
            prop_assert!(matches!(result, Err(_) | Ok(None)), "corrupted frame decoded: {:?}", result);
        }

        #[test]
        fn random_bytes_never_decode_nor_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes);
            // Anything but a panic is fine; random bytes essentially never carry a valid CRC.
            let _ = decoder.next_frame();
        }
    }

    #[test]
    fn the_table_driven_combine_equals_checksumming_the_concatenation() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) as u8)
            .collect();
        for split in [0, 1, 3, 24, 1000, 4096, 65_536, 69_999, 70_000] {
            let (a, b) = data.split_at(split);
            assert_eq!(
                crc32c_combine(crc32c::crc32c(a), crc32c::crc32c(b), b.len() as u64),
                crc32c::crc32c(&data),
                "split at {split}"
            );
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let good = encode(1, &Message::Ping).expect("empty body");
        let check = |bytes: &[u8]| {
            let mut decoder = FrameDecoder::new();
            decoder.push(bytes);
            decoder.next_frame()
        };

        assert_eq!(
            check(b"GET / HTTP/1.1\r\n"),
            Err(FrameError::BadMagic(*b"GET "))
        );

        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(check(&bad_version), Err(FrameError::UnsupportedVersion(9)));

        let mut oversize = good.clone();
        oversize[16..20].copy_from_slice(&(MAX_PAYLOAD_LEN + 1).to_le_bytes());
        assert_eq!(
            check(&oversize),
            Err(FrameError::Oversize(MAX_PAYLOAD_LEN + 1))
        );

        let mut bad_crc = good.clone();
        bad_crc[9] ^= 1;
        assert!(matches!(
            check(&bad_crc),
            Err(FrameError::ChecksumMismatch { .. })
        ));

        let garbage_body = encode_raw(Kind::Ack, 0, vec![0xff; 3]).expect("small payload");
        assert!(matches!(
            check(&garbage_body),
            Err(FrameError::UndecodableBody {
                kind: Kind::Ack,
                ..
            })
        ));

        let trailing = encode_raw(Kind::Ping, 0, vec![0]).expect("small payload");
        assert!(matches!(
            check(&trailing),
            Err(FrameError::UndecodableBody {
                kind: Kind::Ping,
                ..
            })
        ));
    }

    #[test]
    fn escaping_paths_are_refused() {
        let op = Op::Unlink {
            dir: 0,
            path: RelPath::parse(b"aa/bb").expect("valid path"),
        };
        let payload = postcard::to_allocvec(&op).expect("encodable");
        let replace = |from: &[u8], to: &[u8]| {
            let position = payload
                .windows(from.len())
                .position(|w| w == from)
                .expect("component present");
            let mut changed = payload.clone();
            changed[position..position + from.len()].copy_from_slice(to);
            changed
        };
        for evil in [
            replace(b"aa", b".."),
            replace(b"bb", b"a/"),
            replace(b"aa", b"\0x"),
        ] {
            let frame = encode_raw(Kind::Op, 1, evil).expect("small payload");
            let mut decoder = FrameDecoder::new();
            decoder.push(&frame);
            assert!(
                matches!(
                    decoder.next_frame(),
                    Err(FrameError::InvalidPath { kind: Kind::Op, .. })
                ),
                "escaping path accepted"
            );
        }
    }

    #[test]
    fn resync_messages_round_trip_and_bad_names_are_refused() {
        use crate::resync::{DirEntry, EntryKind, EntryMeta, ReplyBody, RequestBody};
        let request = Message::ResyncRequest(ResyncRequest {
            id: 9,
            body: RequestBody::Checksums {
                dir: 1,
                path: RelPath::parse(b"big/file").expect("valid"),
                block_size: 65536,
                first_block: 3,
                count: 2,
            },
        });
        let meta = EntryMeta {
            kind: EntryKind::File,
            size: 5,
            mtime: Timestamp { secs: 1, nanos: 2 },
            mode: 0o100644,
            uid: 1,
            gid: 2,
            rdev: 0,
            link_target: Vec::new(),
        };
        let reply = |name: &[u8]| {
            Message::ResyncReply(ResyncReply {
                id: 9,
                body: ReplyBody::ListDir {
                    entries: vec![DirEntry {
                        name: name.to_vec(),
                        meta: meta.clone(),
                    }],
                    more: false,
                },
            })
        };
        for message in [request, reply(b"ok")] {
            let mut decoder = FrameDecoder::new();
            decoder.push(&encode(0, &message).expect("small"));
            assert_eq!(
                decoder.next_frame().expect("valid").map(|f| f.message),
                Some(message)
            );
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode(0, &reply(b"..")).expect("small"));
        assert!(matches!(
            decoder.next_frame(),
            Err(FrameError::InvalidResync {
                kind: Kind::ResyncReply,
                ..
            })
        ));
    }

    #[test]
    fn a_truncated_frame_waits_and_the_first_error_is_final() {
        let frame = encode(
            3,
            &Message::Ack(Ack {
                seq: 3,
                durable: false,
            }),
        )
        .expect("small");
        let mut decoder = FrameDecoder::new();
        decoder.push(&frame[..frame.len() - 1]);
        assert_eq!(decoder.next_frame(), Ok(None));
        let mut broken = FrameDecoder::new();
        broken.push(b"XXXX");
        assert!(broken.next_frame().is_err());
        broken.push(&frame);
        assert!(
            broken.next_frame().is_err(),
            "a decoder that failed must stay failed"
        );
    }
}
