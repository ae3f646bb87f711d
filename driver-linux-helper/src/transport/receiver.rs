//! The secondary's end of the replication stream: authenticates the primary and applies its operations.
//!
//! One listening socket per module. Each incoming connection is authenticated
//! on its own short-lived thread (bounded by [`HANDSHAKE_TIMEOUT`] and
//! [`MAX_HANDSHAKES`]), so a silent or hostile client cannot block the real
//! primary. An authenticated connection replaces the current one: the old
//! session is shut down and the new one starts applying only after the old one
//! has finished its operation in progress (the [`ReplicaRoot`] is behind a
//! mutex held for a whole session). A corrupt frame closes the connection
//! without being applied; operations before it stay applied and acknowledged.
//!
//! Resync requests (see [`safekit_protocol::resync`]) arrive in the same
//! stream and are answered in order, after every operation before them was
//! applied, by [`crate::resync::serve`]. A receiver made with
//! [`Receiver::bind_serving_resync`] answers them; one made with
//! [`Receiver::bind`] answers `Failed { errno: ENOTSUP }`. One made with
//! [`Receiver::bind_serving_resync_with_activity`] also reports the files of
//! this node's activity log (loaded at bind time) and clears it once told the
//! resync completed.

use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use safekit_protocol::auth::{self, Challenge, PROTOCOL_VERSION, Refused};
use safekit_protocol::frame::{FrameDecoder, Message};
use safekit_protocol::replication::{Ack, ApplyFailed};
use safekit_protocol::resync::{ReplyBody, RequestBody, ResyncReply};

use super::{TransportError, kind_name, random_nonce, receive, send};
use crate::apply::ReplicaRoot;
use crate::resync::serve::ReceiverActivity;

/// Bytes asked of the socket per read.
const RECEIVE_CHUNK: usize = 256 * 1024;

/// How long a client may take to authenticate.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections may be authenticating at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 16;

/// Counters of a receiver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Connections that authenticated.
    pub connections_accepted: u64,
    /// Connections refused (authentication, protocol or limit).
    pub connections_refused: u64,
    /// Operations applied successfully.
    pub ops_applied: u64,
    /// Operations that failed to apply (reported with `ApplyFailed`).
    pub apply_errors: u64,
    /// Connections closed because of a corrupt or unexpected frame.
    pub protocol_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    ops_applied: AtomicU64,
    apply_errors: AtomicU64,
    protocol_errors: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    secret: Vec<u8>,
    module: String,
    root: Mutex<ReplicaRoot>,
    /// Descriptors of the replicated directories for answering resync requests.
    resync_dirs: Option<Vec<OwnedFd>>,
    /// This node's activity log, for resync requests.
    activity: Option<ReceiverActivity>,
    stopping: AtomicBool,
    current: Mutex<Option<TcpStream>>,
    handshakes: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
    counters: Counters,
}

/// A listening receiver; dropping it stops accepting, closes the connection and waits for its threads.
#[derive(Debug)]
pub struct Receiver {
    local_addr: SocketAddr,
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on `addr` and applies authenticated streams beneath `root`.
    ///
    /// # Errors
    /// The socket could not be bound.
    pub fn bind(
        addr: impl ToSocketAddrs,
        secret: impl Into<Vec<u8>>,
        module_name: impl Into<String>,
        root: ReplicaRoot,
    ) -> io::Result<Receiver> {
        Self::bind_inner(addr, secret.into(), module_name.into(), root, None, None)
    }

    /// Like [`Receiver::bind`], and also answers resync requests: `dirs` are the
    /// replicated directories (index = replicated directory index), opened with
    /// `O_PATH | O_DIRECTORY` before any mount; the receiver applies beneath
    /// them and reads beneath duplicates of them.
    ///
    /// # Errors
    /// A descriptor could not be duplicated or the socket could not be bound.
    pub fn bind_serving_resync(
        addr: impl ToSocketAddrs,
        secret: impl Into<Vec<u8>>,
        module_name: impl Into<String>,
        dirs: Vec<OwnedFd>,
    ) -> io::Result<Receiver> {
        Self::bind_serving(addr, secret.into(), module_name.into(), dirs, None)
    }

    /// Like [`Receiver::bind_serving_resync`], and also reports the files of
    /// this node's activity log at `activity_log` (read now: the files it may
    /// have changed without shipping them when it last was primary), and
    /// clears that log once the primary says its resync completed.
    ///
    /// # Errors
    /// The activity log cannot be read, a descriptor could not be duplicated
    /// or the socket could not be bound.
    pub fn bind_serving_resync_with_activity(
        addr: impl ToSocketAddrs,
        secret: impl Into<Vec<u8>>,
        module_name: impl Into<String>,
        dirs: Vec<OwnedFd>,
        activity_log: &Path,
    ) -> io::Result<Receiver> {
        let activity = ReceiverActivity::load(activity_log)?;
        Self::bind_serving(
            addr,
            secret.into(),
            module_name.into(),
            dirs,
            Some(activity),
        )
    }

    /// A receiver that also answers resync requests, reading beneath
    /// duplicates of `dirs`.
    fn bind_serving(
        addr: impl ToSocketAddrs,
        secret: Vec<u8>,
        module_name: String,
        dirs: Vec<OwnedFd>,
        activity: Option<ReceiverActivity>,
    ) -> io::Result<Receiver> {
        let readers = dirs
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        Self::bind_inner(
            addr,
            secret,
            module_name,
            ReplicaRoot::new(dirs),
            Some(readers),
            activity,
        )
    }

    fn bind_inner(
        addr: impl ToSocketAddrs,
        secret: Vec<u8>,
        module: String,
        root: ReplicaRoot,
        resync_dirs: Option<Vec<OwnedFd>>,
        activity: Option<ReceiverActivity>,
    ) -> io::Result<Receiver> {
        let listener = Arc::new(TcpListener::bind(addr)?);
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            secret,
            module,
            root: Mutex::new(root),
            resync_dirs,
            activity,
            stopping: AtomicBool::new(false),
            current: Mutex::new(None),
            handshakes: AtomicUsize::new(0),
            threads: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let accept_thread = {
            let listener = Arc::clone(&listener);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("repl-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        tracing::info!(%local_addr, module = %shared.module, "replication receiver listening");
        Ok(Receiver {
            local_addr,
            listener,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ReceiverStats {
        let c = &self.shared.counters;
        ReceiverStats {
            connections_accepted: c.connections_accepted.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            ops_applied: c.ops_applied.load(Ordering::Relaxed),
            apply_errors: c.apply_errors.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // On Linux, shutting down a listening socket wakes a blocked accept().
        if let Err(error) = rustix::net::shutdown(&*self.listener, rustix::net::Shutdown::Read) {
            tracing::warn!(%error, "cannot shut down the replication listener");
        }
        if let Some(stream) = self
            .shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for thread in threads {
            let _ = thread.join();
        }
        tracing::info!(local_addr = %self.local_addr, "replication receiver stopped");
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::warn!(%error, "accept failed on the replication port");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            shared
                .counters
                .connections_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "too many replication handshakes in progress; connection closed");
            continue;
        }
        let session_shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("repl-session".into())
            .spawn(move || connection(stream, peer, &session_shared));
        match spawned {
            Ok(thread) => {
                let mut threads = shared
                    .threads
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                threads.retain(|thread| !thread.is_finished());
                threads.push(thread);
            }
            Err(error) => {
                shared.handshakes.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(%peer, %error, "cannot start a replication session thread");
            }
        }
    }
}

fn connection(mut stream: TcpStream, peer: SocketAddr, shared: &Shared) {
    let mut decoder = FrameDecoder::new();
    let handshake = handshake(&mut stream, &mut decoder, shared);
    shared.handshakes.fetch_sub(1, Ordering::SeqCst);
    if let Err(error) = handshake {
        shared
            .counters
            .connections_refused
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, %error, "replication peer refused");
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    shared
        .counters
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, module = %shared.module, "replication peer authenticated");
    {
        let mut current = shared
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        if let Some(old) = current.take() {
            tracing::info!(%peer, "a new authenticated connection replaces the current one");
            let _ = old.shutdown(Shutdown::Both);
        }
        match stream.try_clone() {
            Ok(clone) => *current = Some(clone),
            Err(error) => {
                tracing::warn!(%peer, %error, "cannot keep the replication connection");
                return;
            }
        }
        let welcomed = send(&mut stream, 0, &Message::Welcome)
            .and_then(|()| stream.set_write_timeout(None).map_err(TransportError::from));
        if let Err(error) = welcomed {
            tracing::warn!(%peer, %error, "cannot welcome the replication peer");
            return;
        }
    }
    let mut root = shared.root.lock().unwrap_or_else(PoisonError::into_inner);
    let span = tracing::info_span!("replication", %peer);
    let _entered = span.enter();
    match session(&mut stream, decoder, &mut root, shared) {
        Ok(()) => tracing::info!("replication connection closed"),
        Err(TransportError::Frame(error)) => {
            shared
                .counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, "corrupt replication frame; connection closed, frame not applied");
        }
        Err(TransportError::Unexpected(kind)) => {
            shared
                .counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                kind,
                "unexpected message on the replication stream; connection closed"
            );
        }
        Err(error) => tracing::info!(%error, "replication connection ended"),
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn refuse(stream: &mut TcpStream, reason: &str) -> TransportError {
    let _ = send(
        stream,
        0,
        &Message::Refused(Refused {
            reason: reason.to_owned(),
        }),
    );
    TransportError::Auth(reason.to_owned())
}

fn handshake(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    shared: &Shared,
) -> Result<(), TransportError> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let hello = match receive(stream, decoder)?.message {
        Message::Hello(hello) => hello,
        other => return Err(TransportError::Unexpected(kind_name(&other))),
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(refuse(
            stream,
            &format!("unsupported protocol version {}", hello.version),
        ));
    }
    if hello.module != shared.module {
        return Err(refuse(
            stream,
            &format!("unknown module {:?}", hello.module),
        ));
    }
    let server_nonce = random_nonce()?;
    let server_proof = auth::server_proof(
        &shared.secret,
        &shared.module,
        &hello.client_nonce,
        &server_nonce,
    )
    .map_err(|error| TransportError::Auth(error.to_string()))?;
    send(
        stream,
        0,
        &Message::Challenge(Challenge {
            server_nonce,
            server_proof,
        }),
    )?;
    let proof = match receive(stream, decoder)?.message {
        Message::Proof(proof) => proof,
        other => return Err(TransportError::Unexpected(kind_name(&other))),
    };
    if auth::verify_client_proof(
        &shared.secret,
        &shared.module,
        &hello.client_nonce,
        &server_nonce,
        &proof.client_proof,
    )
    .is_err()
    {
        return Err(refuse(stream, "authentication failed"));
    }
    // Welcome is sent by the caller once this connection is registered as the current one,
    // so that of two clients the one welcomed last always wins.
    stream.set_read_timeout(None)?;
    Ok(())
}

/// Applies operations until the peer closes or misbehaves.
///
/// Durable barriers (the resync's "everything before this is on disk") are
/// answered by a syncer thread beside the apply loop: it flushes the file
/// system (`syncfs`) while later operations keep being applied, so that a
/// resync's periodic confirmations cost the primary no pause and the final
/// barrier finds most of the data already written. A flush started after the
/// barrier's place in the stream was reached covers every operation before
/// it; replies are matched by request id, so answering it later is fine.
fn session(
    stream: &mut TcpStream,
    decoder: FrameDecoder,
    root: &mut ReplicaRoot,
    shared: &Shared,
) -> Result<(), TransportError> {
    let writer = Mutex::new(BufWriter::with_capacity(64 * 1024, stream.try_clone()?));
    std::thread::scope(|scope| {
        let syncer = shared.resync_dirs.as_ref().map(|dirs| {
            let (barriers, pending) = mpsc::channel::<u64>();
            let writer = &writer;
            let span = tracing::Span::current();
            std::thread::Builder::new()
                .name("repl-syncer".into())
                .spawn_scoped(scope, move || {
                    let _entered = span.enter();
                    answer_durable_barriers(dirs, &pending, writer);
                })
                .map(|_| barriers)
        });
        let syncer = match syncer.transpose() {
            Ok(syncer) => syncer,
            Err(error) => return Err(TransportError::from(error)),
        };
        apply_loop(stream, decoder, root, shared, &writer, syncer.as_ref())
        // Leaving the scope drops the channel: the syncer finishes its flush and ends.
    })
}

/// Answers the durable barriers handed over by the apply loop, in order: one
/// flush for all those waiting when it starts.
fn answer_durable_barriers(
    dirs: &[OwnedFd],
    pending: &mpsc::Receiver<u64>,
    writer: &Mutex<BufWriter<TcpStream>>,
) {
    while let Ok(first) = pending.recv() {
        let mut ids = vec![first];
        ids.extend(pending.try_iter());
        let body = match crate::resync::serve::sync_durably(dirs) {
            Ok(()) => ReplyBody::Barrier,
            Err(error) => {
                tracing::warn!(%error, "cannot flush the replica for a durable barrier");
                ReplyBody::Failed {
                    errno: error.raw_os_error().unwrap_or(libc::EIO),
                }
            }
        };
        let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = ids
            .into_iter()
            .try_for_each(|id| {
                send(
                    &mut *writer,
                    0,
                    &Message::ResyncReply(ResyncReply {
                        id,
                        body: body.clone(),
                    }),
                )
            })
            .and_then(|()| writer.flush().map_err(TransportError::from));
        if let Err(error) = sent {
            // The apply loop sees the broken connection too and ends the session.
            tracing::debug!(%error, "cannot answer a durable barrier");
            return;
        }
    }
}

fn apply_loop(
    stream: &mut TcpStream,
    mut decoder: FrameDecoder,
    root: &mut ReplicaRoot,
    shared: &Shared,
    writer: &Mutex<BufWriter<TcpStream>>,
    syncer: Option<&mpsc::Sender<u64>>,
) -> Result<(), TransportError> {
    let lock = || writer.lock().unwrap_or_else(PoisonError::into_inner);
    let mut expected_seq: Option<u64> = None;
    let mut last_applied: Option<u64> = None;
    let mut last_acked: Option<u64> = None;
    loop {
        // Apply every complete frame already received, then acknowledge them in one Ack.
        while let Some(frame) = decoder.next_frame()? {
            match frame.message {
                Message::Op(op) => {
                    if expected_seq.is_some_and(|expected| expected != frame.seq) {
                        tracing::warn!(seq = frame.seq, expected = ?expected_seq, "operation out of sequence");
                        return Err(TransportError::Unexpected("out-of-sequence Op"));
                    }
                    expected_seq = frame.seq.checked_add(1);
                    match root.apply(&op) {
                        Ok(()) => {
                            shared.counters.ops_applied.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            shared.counters.apply_errors.fetch_add(1, Ordering::Relaxed);
                            let errno = error.raw_os_error().unwrap_or(libc::EIO);
                            tracing::warn!(seq = frame.seq, %error, path = ?String::from_utf8_lossy(&op.main_path().to_bytes()), "cannot apply a replicated operation");
                            let failed = ApplyFailed {
                                seq: frame.seq,
                                dir: op.dir(),
                                path: op.main_path().clone(),
                                errno,
                            };
                            send(&mut *lock(), 0, &Message::ApplyFailed(failed))?;
                        }
                    }
                    last_applied = Some(frame.seq);
                    if op.is_fsync() {
                        let mut writer = lock();
                        send(
                            &mut *writer,
                            frame.seq,
                            &Message::Ack(Ack {
                                seq: frame.seq,
                                durable: true,
                            }),
                        )?;
                        writer.flush()?;
                        last_acked = last_applied;
                    }
                }
                Message::ResyncRequest(request) => {
                    // Everything before the request is applied: acknowledge it, then answer.
                    flush_ack(&mut lock(), last_applied, &mut last_acked)?;
                    if let (Some(syncer), RequestBody::Barrier { durable: true }) =
                        (syncer, &request.body)
                        && syncer.send(request.id).is_ok()
                    {
                        continue;
                    }
                    let reply = match &shared.resync_dirs {
                        Some(dirs) => crate::resync::serve::answer_with_activity(
                            dirs,
                            shared.activity.as_ref(),
                            &request,
                        ),
                        None => ResyncReply {
                            id: request.id,
                            body: ReplyBody::Failed {
                                errno: libc::ENOTSUP,
                            },
                        },
                    };
                    send(&mut *lock(), 0, &Message::ResyncReply(reply))?;
                }
                Message::Ping => send(&mut *lock(), 0, &Message::Pong)?,
                Message::Pong => {}
                Message::Bye => {
                    flush_ack(&mut lock(), last_applied, &mut last_acked)?;
                    return Ok(());
                }
                other => return Err(TransportError::Unexpected(kind_name(&other))),
            }
        }
        flush_ack(&mut lock(), last_applied, &mut last_acked)?;
        // Straight into the decoder's buffer: replicated data is copied once
        // less on its way to the page cache.
        let n = match stream.read(decoder.spare(RECEIVE_CHUNK)) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error.into()),
        };
        decoder.commit(n);
    }
}

fn flush_ack(
    writer: &mut BufWriter<TcpStream>,
    last_applied: Option<u64>,
    last_acked: &mut Option<u64>,
) -> Result<(), TransportError> {
    if let Some(seq) = last_applied
        && *last_acked != last_applied
    {
        send(
            writer,
            seq,
            &Message::Ack(Ack {
                seq,
                durable: false,
            }),
        )?;
        *last_acked = last_applied;
    }
    writer.flush()?;
    Ok(())
}
