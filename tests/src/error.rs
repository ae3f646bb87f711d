//! The harness's error type: what failed, with the command and its stderr.

use std::time::Duration;

/// Why a harness operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A command run by the harness exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line, as a human would type it.
        command: String,
        /// Its exit status.
        status: String,
        /// What it wrote to stderr (and stdout, if stderr was empty).
        stderr: String,
    },
    /// A command could not be started at all.
    #[error("could not start `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// Something did not happen within its time bound.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound that expired.
        after: Duration,
    },
    /// Building a cluster failed half-way (what was created is removed).
    #[error("building cluster {id}: {source}")]
    Build {
        /// The cluster's id, for [`crate::leftovers`].
        id: String,
        /// What failed.
        #[source]
        source: Box<HarnessError>,
    },
    /// The cluster could not be set up as asked.
    #[error("{0}")]
    Setup(String),
}

impl HarnessError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}
