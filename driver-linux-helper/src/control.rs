//! The local control socket of a running `safekit-rfs`.
//!
//! The agent (and tests) talk to the helper over a Unix stream socket that
//! only root may use: the socket file is mode 0600 and every connection's peer
//! credentials are checked (`SO_PEERCRED`, uid 0). The protocol is one text
//! command per line, one answer per command, so that `socat` or a shell can
//! drive it:
//!
//! - `stats` -> one line per mounted directory: `dir=<path> key=value ...`, then `end`;
//! - `role` -> `role=<role>` (`primary-replicating`, `primary-alone`, `replication-off`...);
//! - `unmount` -> `ok`, then the helper unmounts every directory and exits.
//!
//! Unknown commands get `error unknown command`. The socket never changes the
//! tree and never sees file data.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Sender;

use crate::fs::FsStats;

/// What the control socket can read from the running helper.
pub trait ControlState: Send + Sync {
    /// Counters of each mounted directory, by path.
    fn stats(&self) -> Vec<(PathBuf, Arc<FsStats>)>;
    /// The replication role, as one word.
    fn role(&self) -> String;
}

/// A request the control socket passes to the helper's main thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    /// Unmount every directory and exit.
    Unmount,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Binding or securing the socket failed.
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Binds the socket at `path` (replacing a stale socket file), mode 0600.
///
/// # Errors
/// [`ControlError::Bind`].
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path).map_err(bind_error)?;
        }
    }
    // Nobody else may connect between bind and chmod: create it under a strict umask.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let listener = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = listener.map_err(bind_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    Ok(listener)
}

/// Serves `listener` on background threads until the process exits.
pub fn serve(
    listener: UnixListener,
    state: Arc<dyn ControlState>,
    requests: Sender<ControlRequest>,
) {
    let spawned = std::thread::Builder::new()
        .name("rfs-control".to_owned())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = state.clone();
                let requests = requests.clone();
                let _ = std::thread::Builder::new()
                    .name("rfs-control-conn".to_owned())
                    .spawn(move || handle_connection(stream, &*state, &requests));
            }
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the control socket thread");
    }
}

fn handle_connection(
    stream: UnixStream,
    state: &dyn ControlState,
    requests: &Sender<ControlRequest>,
) {
    match rustix::net::sockopt::socket_peercred(&stream) {
        Ok(cred) if cred.uid.is_root() => {}
        other => {
            tracing::warn!(?other, "control connection from a non-root peer refused");
            return;
        }
    }
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = std::io::BufWriter::new(write_half);
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        let answer = answer(line.trim(), state, requests);
        if out
            .write_all(answer.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return;
        }
    }
}

/// The answer to one command line (with its final newline).
fn answer(command: &str, state: &dyn ControlState, requests: &Sender<ControlRequest>) -> String {
    match command {
        "stats" => {
            let mut out = String::new();
            for (path, stats) in state.stats() {
                out.push_str(&format!("dir={} {}\n", path.display(), stats.render()));
            }
            out.push_str("end\n");
            out
        }
        "role" => format!("role={}\n", state.role()),
        "unmount" => match requests.send(ControlRequest::Unmount) {
            Ok(()) => "ok\n".to_owned(),
            Err(_) => "error helper is stopping\n".to_owned(),
        },
        _ => "error unknown command\n".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;
    impl ControlState for Fixed {
        fn stats(&self) -> Vec<(PathBuf, Arc<FsStats>)> {
            vec![(PathBuf::from("/data"), Arc::new(FsStats::default()))]
        }
        fn role(&self) -> String {
            "replication-off".to_owned()
        }
    }

    #[test]
    fn commands_are_answered_and_unmount_is_forwarded() {
        let (tx, rx) = std::sync::mpsc::channel();
        assert_eq!(answer("role", &Fixed, &tx), "role=replication-off\n");
        let stats = answer("stats", &Fixed, &tx);
        assert!(stats.starts_with("dir=/data replicated_ops=0 "), "{stats}");
        assert!(stats.ends_with("end\n"));
        assert_eq!(answer("bogus", &Fixed, &tx), "error unknown command\n");
        assert_eq!(answer("unmount", &Fixed, &tx), "ok\n");
        assert_eq!(rx.try_recv(), Ok(ControlRequest::Unmount));
    }

    #[test]
    fn socket_is_private_and_answers_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ctl");
        let listener = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path)
            .expect("socket exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (tx, _rx) = std::sync::mpsc::channel();
        serve(listener, Arc::new(Fixed), tx);
        let mut conn = UnixStream::connect(&path).expect("connect");
        conn.write_all(b"role\n").expect("send");
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).expect("answer");
        assert_eq!(line, "role=replication-off\n");
    }
}
