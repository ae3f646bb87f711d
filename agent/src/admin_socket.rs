//! The local admin channel between the `safekit` command and `safekitd`.
//!
//! Whoever can talk to the agent can stop applications and take over a
//! cluster, so the channel is a Unix socket that only root (and, optionally,
//! one configured admin group) may use, checked twice:
//!
//! 1. the socket file is owned by root with mode `0600` (`0660` with the admin
//!    group as its group when one is configured); it is created under a
//!    temporary name, given its mode, then renamed into place, so it is never
//!    reachable with looser permissions;
//! 2. every accepted connection's peer credentials (`SO_PEERCRED`, the uid and
//!    gid of the connecting process, from the kernel) are checked: uid 0 is
//!    allowed, any other uid only if its primary gid is the admin group.
//!    Refused peers get a [`Reply::Refused`] and the refusal is logged.
//!
//! # Framing
//!
//! Each message is a frame: a 4-byte big-endian length, then that many bytes
//! of [postcard](https://docs.rs/postcard)-encoded serde value. Postcard was
//! chosen over JSON lines because it is already the workspace's wire encoding,
//! needs no escaping and keeps frames small; frames are limited to
//! [`MAX_FRAME_LEN`]. The client sends a request frame (type `Req`), the server
//! answers with a frame holding a [`Reply<Resp>`]. The request and response
//! types are opaque to this module. A connection may carry several
//! request/response exchanges in turn; [`request`] uses one per connection.
//!
//! Because [`Reply::Refused`] and [`Reply::BadRequest`] are the first variants
//! of the envelope, a client decodes them whatever `Resp` it expects.

use std::future::Future;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// Largest accepted frame payload (16 MiB, room for a long log tail).
pub const MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

/// The server's answer envelope around the handler's response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply<Resp> {
    /// The peer is not allowed to use the admin channel.
    Refused(String),
    /// The request frame could not be decoded as the server's request type
    /// (e.g. a `safekit` of another version).
    BadRequest(String),
    /// The handler's response.
    Response(Resp),
}

/// Who is on the other end of an admin connection, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    /// The peer's effective uid when it connected.
    pub uid: u32,
    /// The peer's effective gid when it connected.
    pub gid: u32,
    /// The peer's process id, when the kernel reports it.
    pub pid: Option<i32>,
}

impl std::fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "uid {} gid {}", self.uid, self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid {pid}")?;
        }
        Ok(())
    }
}

/// Whether `peer` may use the admin channel: root always, others only when
/// their gid is the configured admin group.
pub fn is_allowed(peer: &PeerCredentials, admin_gid: Option<u32>) -> bool {
    peer.uid == 0 || admin_gid.is_some_and(|gid| gid == peer.gid)
}

/// Why the admin socket could not be set up or used by the server.
#[derive(Debug, thiserror::Error)]
pub enum AdminSocketError {
    /// A file or socket operation on the socket path failed.
    #[error("{operation} admin socket {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another agent already answers on the socket.
    #[error("admin socket {path} is in use by a running agent")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
}

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    /// The agent is not running (no socket, or nobody listening).
    #[error("agent not running: cannot connect to {path}: {source}")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: io::Error,
    },
    /// The socket exists but this user may not open it.
    #[error("permission denied on {path}: the agent accepts root only")]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// The agent refused this user.
    #[error("refused by the agent: {0}")]
    Refused(String),
    /// The agent could not decode the request.
    #[error("the agent rejected the request: {0}")]
    BadRequest(String),
    /// No complete answer within the timeout.
    #[error("no answer from the agent on {path} within {timeout:?}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The exchange failed midway.
    #[error("admin channel {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The answer could not be decoded.
    #[error("undecodable answer from the agent: {0}")]
    Decode(postcard::Error),
    /// The request could not be encoded.
    #[error("cannot encode request: {0}")]
    Encode(postcard::Error),
}

/// Writes one frame.
///
/// # Errors
/// `InvalidInput` for a payload over [`MAX_FRAME_LEN`]; write errors.
///
/// # Cancel safety
/// Not cancel safe: a dropped write may leave a partial frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, payload: &[u8]) -> io::Result<()> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {MAX_FRAME_LEN}", payload.len()),
        ));
    }
    let len = u32::try_from(payload.len()).expect("MAX_FRAME_LEN fits in u32");
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    writer.write_all(&frame).await?;
    writer.flush().await
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a frame starts.
///
/// # Errors
/// `InvalidData` for a length over [`MAX_FRAME_LEN`]; `UnexpectedEof` for a
/// truncated frame; read errors.
///
/// # Cancel safety
/// Not cancel safe: a dropped read may consume part of a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len_bytes = [0u8; 4];
    match reader.read_exact(&mut len_bytes).await {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) => return Err(error),
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > MAX_FRAME_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} exceeds {MAX_FRAME_LEN}"),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

/// The bound admin socket, ready to [`serve`](AdminListener::serve).
#[derive(Debug)]
pub struct AdminListener {
    listener: UnixListener,
    path: PathBuf,
    admin_gid: Option<u32>,
}

impl AdminListener {
    /// Creates the admin socket at `path` (and its parent directory, mode
    /// 0755, if missing), owned by the current user (root) with mode 0600, or
    /// 0660 with group `admin_gid` when given. A stale socket file left by a
    /// dead agent is replaced.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`AdminSocketError::InUse`] if an agent already answers on `path`;
    /// [`AdminSocketError::Io`] naming the failed step.
    pub async fn bind(
        path: impl Into<PathBuf>,
        admin_gid: Option<u32>,
    ) -> Result<AdminListener, AdminSocketError> {
        let path = path.into();
        let io_error = |operation: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| AdminSocketError::Io {
                operation,
                path,
                source,
            }
        };
        if UnixStream::connect(&path).await.is_ok() {
            return Err(AdminSocketError::InUse { path });
        }
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)
                .map_err(io_error("create directory of", &path))?;
        }
        let mut temp_name = path.as_os_str().to_os_string();
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp_path = PathBuf::from(temp_name);
        let _ = std::fs::remove_file(&temp_path);
        let listener = UnixListener::bind(&temp_path).map_err(io_error("bind", &temp_path))?;
        let setup = || -> Result<(), AdminSocketError> {
            let mode = if admin_gid.is_some() { 0o660 } else { 0o600 };
            std::fs::set_permissions(&temp_path, std::fs::Permissions::from_mode(mode))
                .map_err(io_error("chmod", &temp_path))?;
            if let Some(gid) = admin_gid {
                std::os::unix::fs::chown(&temp_path, None, Some(gid))
                    .map_err(io_error("chown", &temp_path))?;
            }
            std::fs::rename(&temp_path, &path).map_err(io_error("rename into place", &path))
        };
        if let Err(error) = setup() {
            let _ = std::fs::remove_file(&temp_path);
            return Err(error);
        }
        tracing::info!(path = %path.display(), ?admin_gid, "admin socket listening");
        Ok(AdminListener {
            listener,
            path,
            admin_gid,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections forever, checking each peer's credentials, and
    /// answers each request of an allowed peer with `handler(peer, request)`.
    /// Each connection runs in its own task; the handler may be called
    /// concurrently. Accept errors are logged and retried.
    ///
    /// # Cancel safety
    /// Dropping the future stops accepting and removes the socket file;
    /// connections already accepted finish their current exchange.
    pub async fn serve<Req, Resp, Handler, HandlerFuture>(self, handler: Handler)
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        Handler: Fn(PeerCredentials, Req) -> HandlerFuture + Send + Sync + 'static,
        HandlerFuture: Future<Output = Resp> + Send + 'static,
    {
        let _remove_on_drop = RemoveOnDrop(self.path.clone());
        let handler = Arc::new(handler);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _address)) => stream,
                Err(error) => {
                    tracing::warn!(path = %self.path.display(), %error, "admin socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let handler = Arc::clone(&handler);
            let admin_gid = self.admin_gid;
            tokio::spawn(async move {
                if let Err(error) = serve_connection(stream, admin_gid, handler).await {
                    tracing::debug!(%error, "admin connection ended with an error");
                }
            });
        }
    }
}

/// Removes the socket file when the server stops.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn serve_connection<Req, Resp, Handler, HandlerFuture>(
    mut stream: UnixStream,
    admin_gid: Option<u32>,
    handler: Arc<Handler>,
) -> io::Result<()>
where
    Req: DeserializeOwned,
    Resp: Serialize,
    Handler: Fn(PeerCredentials, Req) -> HandlerFuture,
    HandlerFuture: Future<Output = Resp>,
{
    let credentials = stream.peer_cred()?;
    let peer = PeerCredentials {
        uid: credentials.uid(),
        gid: credentials.gid(),
        pid: credentials.pid(),
    };
    if !is_allowed(&peer, admin_gid) {
        tracing::warn!(%peer, "admin request refused: peer is not root nor in the admin group");
        let refusal: Reply<()> = Reply::Refused(format!(
            "{peer} may not administer this node (root only{})",
            admin_gid.map_or(String::new(), |gid| format!(" or gid {gid}"))
        ));
        let payload = postcard::to_allocvec(&refusal).map_err(io::Error::other)?;
        return write_frame(&mut stream, &payload).await;
    }
    while let Some(request_bytes) = read_frame(&mut stream).await? {
        let reply = match postcard::from_bytes::<Req>(&request_bytes) {
            Ok(request) => Reply::Response(handler(peer, request).await),
            Err(error) => {
                tracing::warn!(%peer, %error, "undecodable admin request");
                Reply::BadRequest(error.to_string())
            }
        };
        let payload = postcard::to_allocvec(&reply).map_err(io::Error::other)?;
        write_frame(&mut stream, &payload).await?;
    }
    Ok(())
}

/// Sends `request` to the agent listening on `path` and returns its response,
/// failing if the whole exchange takes longer than `timeout`.
///
/// # Errors
/// [`AdminClientError`], whose message says why in one line (agent not
/// running, permission denied, refused, timeout, ...).
///
/// # Cancel safety
/// Cancel safe: dropping the future closes the connection; the agent may
/// still execute a request it has fully received.
pub async fn request<Req, Resp>(
    path: &Path,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, AdminClientError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let payload = postcard::to_allocvec(request).map_err(AdminClientError::Encode)?;
    match tokio::time::timeout(timeout, exchange(path, &payload)).await {
        Ok(result) => result,
        Err(_elapsed) => Err(AdminClientError::Timeout {
            path: path.to_path_buf(),
            timeout,
        }),
    }
}

async fn exchange<Resp: DeserializeOwned>(
    path: &Path,
    payload: &[u8],
) -> Result<Resp, AdminClientError> {
    let io_error = |source| AdminClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            AdminClientError::PermissionDenied {
                path: path.to_path_buf(),
            }
        } else {
            AdminClientError::NotRunning {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    // A refusing server answers without reading, and may close first: a
    // failed write is reported only if no answer can be read.
    let write_result = write_frame(&mut stream, payload).await;
    let answer = match read_frame(&mut stream).await {
        Ok(Some(answer)) => answer,
        Ok(None) => {
            return Err(io_error(write_result.err().unwrap_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection without answering",
                )
            })));
        }
        Err(read_error) => return Err(io_error(write_result.err().unwrap_or(read_error))),
    };
    match postcard::from_bytes::<Reply<Resp>>(&answer).map_err(AdminClientError::Decode)? {
        Reply::Response(response) => Ok(response),
        Reply::Refused(reason) => Err(AdminClientError::Refused(reason)),
        Reply::BadRequest(reason) => Err(AdminClientError::BadRequest(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_or_admin_group_only() {
        let root = PeerCredentials {
            uid: 0,
            gid: 0,
            pid: None,
        };
        let nobody = PeerCredentials {
            uid: 65534,
            gid: 65534,
            pid: Some(42),
        };
        assert!(is_allowed(&root, None));
        assert!(!is_allowed(&nobody, None));
        assert!(!is_allowed(&nobody, Some(4242)));
        assert!(is_allowed(&nobody, Some(65534)));
    }

    #[test]
    fn a_refusal_decodes_whatever_response_type_the_client_expects() {
        let refusal: Reply<()> = Reply::Refused("no".to_string());
        let bytes = postcard::to_allocvec(&refusal).unwrap();
        let decoded: Reply<Vec<String>> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, Reply::Refused("no".to_string()));
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_rejected() {
        let (mut left, mut right) = tokio::io::duplex(1024);
        write_frame(&mut left, b"hello").await.unwrap();
        assert_eq!(read_frame(&mut right).await.unwrap().unwrap(), b"hello");
        let oversized = u32::try_from(MAX_FRAME_LEN + 1).unwrap().to_be_bytes();
        left.write_all(&oversized).await.unwrap();
        let error = read_frame(&mut right).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        drop(left);
        assert!(read_frame(&mut right).await.unwrap().is_none());
    }
}
