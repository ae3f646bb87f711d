//! The replication connection between the primary's data path and the secondary.
//!
//! One TCP connection per module carries the ordered stream of operations
//! from the [`Sender`] (primary, implements [`crate::replicator::Replicator`])
//! to the [`Receiver`] (secondary, applies them beneath its
//! [`crate::apply::ReplicaRoot`]). Plain blocking std threads, no async runtime:
//! the FUSE threads block in `replicate()` anyway, and a few dedicated threads
//! per connection (connect, write, read acknowledgements, watchdog) are simpler
//! to bound and to reason about than a runtime in the data path.
//!
//! # Wire
//!
//! Frames as [`safekit_protocol::frame`] describes them. A connection starts
//! with the handshake of [`safekit_protocol::auth`] (Hello, Challenge, Proof,
//! Welcome or Refused); then the sender sends `Op` frames with consecutive
//! sequence numbers, and the receiver answers with cumulative `Ack`s and, for
//! an operation it could not apply, an `ApplyFailed` before the `Ack` that
//! covers it. Either side may send `Ping` (answered by `Pong`) and `Bye`.
//! The connection is **not encrypted** (see the auth module's known gap).
//!
//! # Durability contract
//!
//! - An acknowledged operation was applied on the receiver, in order after every
//!   operation before it (at least in its page cache).
//! - An acknowledged `Fsync` is on the receiver's disk (fsync/fdatasync of the
//!   file, plus its directories whose entries changed); the receiver acknowledges
//!   it at once instead of batching.
//! - An operation the receiver could not apply is still acknowledged (the stream
//!   goes on); the sender records its files in the dirty log durably and reports
//!   `FileOutOfSync`.
//! - If the receiver makes no acknowledgement progress for `replication_timeout`
//!   while operations are pending, or the connection breaks, the sender records
//!   every unacknowledged operation's files durably in the dirty log, then
//!   answers every waiter with `Alone`, switches to `Alone` and reports
//!   `PeerLost`. No `replicate()` call waits longer than `replication_timeout`
//!   plus the time of one dirty-log sync.
//! - A sender in `Alone` never reconnects by itself: the replica is behind, and
//!   only the agent, after a resync, may switch it back to `Replicating`.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use safekit_protocol::frame::{EncodeError, EncodedBody, Frame, FrameDecoder, FrameError, Message};

mod receiver;
mod sender;

pub use receiver::{Receiver, ReceiverStats};
pub use sender::{
    ReplicationEvent, RequestFailed, RequestTicket, Role, Sender, SenderConfig, SenderStats,
};

/// Why a handshake or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer sent bytes that are not a valid frame.
    #[error("corrupt frame: {0}")]
    Frame(#[from] FrameError),
    /// A message could not be encoded.
    #[error("cannot encode: {0}")]
    Encode(#[from] EncodeError),
    /// The peer closed the connection.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer sent a message that makes no sense at this point.
    #[error("unexpected {0} message")]
    Unexpected(&'static str),
    /// The peer did not prove knowledge of the secret (or we did not convince it).
    #[error("authentication failed: {0}")]
    Auth(String),
}

/// Writes one message as a frame.
fn send(stream: &mut impl Write, seq: u64, message: &Message) -> Result<(), TransportError> {
    let body = EncodedBody::new(message)?;
    stream.write_all(&body.header(seq))?;
    stream.write_all(body.payload())?;
    Ok(())
}

/// The most a handshake message may take: an unauthenticated peer must not make us
/// buffer a 16 MiB frame per connection.
const MAX_HANDSHAKE_BYTES: usize = 4096;

/// Reads one handshake frame (blocking, honouring the socket's read timeout).
fn receive(stream: &mut TcpStream, decoder: &mut FrameDecoder) -> Result<Frame, TransportError> {
    let mut buf = [0u8; 1024];
    loop {
        if let Some(frame) = decoder.next_frame()? {
            return Ok(frame);
        }
        if decoder.buffered() > MAX_HANDSHAKE_BYTES {
            return Err(TransportError::Unexpected("oversized handshake"));
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return Err(TransportError::Closed),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        decoder.push(&buf[..n]);
    }
}

/// The name of a message's kind, for errors and logs.
fn kind_name(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::Challenge(_) => "Challenge",
        Message::Proof(_) => "Proof",
        Message::Welcome => "Welcome",
        Message::Refused(_) => "Refused",
        Message::Op(_) => "Op",
        Message::Ack(_) => "Ack",
        Message::ApplyFailed(_) => "ApplyFailed",
        Message::Ping => "Ping",
        Message::Pong => "Pong",
        Message::Bye => "Bye",
        Message::ResyncRequest(_) => "ResyncRequest",
        Message::ResyncReply(_) => "ResyncReply",
    }
}

/// A fresh nonce from the kernel's CSPRNG.
fn random_nonce() -> io::Result<safekit_protocol::auth::Nonce> {
    let mut nonce = [0u8; safekit_protocol::auth::NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}
