//! The operator-facing logs of a module: the module log and the application log.
//!
//! SafeKit keeps, per module, a log of what the cluster did and why (state
//! changes, operator actions, script runs, checker verdicts) that operators
//! read with `safekit log`. This module writes such logs as plain append-only
//! text files, one record per line:
//!
//! ```text
//! 2026-11-26 08:40:26.123 | E | PRIM -> ALONE (peer lost on every LAN)
//! ```
//!
//! The timestamp is UTC with milliseconds. The level letter is SafeKit's: `U`
//! (user action), `E` (event or state change), `C` (critical), `S` (script),
//! `I` (information, shown only in the verbose view, like SafeKit's verbose
//! log). A message never spans lines: newlines in it are written as `\n`.
//!
//! Files are bounded: before a line would push the file past its size limit,
//! the file is renamed to `<name>.1` (replacing the previous one) and a new file
//! is started, so a log takes at most about twice its limit on disk.
//! [`tail`] reads across `<name>.1` and `<name>`.
//!
//! All writes go through one dedicated writer thread fed by a channel, so a
//! caller (the agent's main loop, the heartbeat thread) never blocks on the
//! disk: [`ModLog::log`] only queues the line.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The severity/category of a log record, with SafeKit's letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// `U`: an operator action (who asked for what).
    User,
    /// `E`: an event or a state change.
    Event,
    /// `C`: a critical condition.
    Critical,
    /// `S`: a script run.
    Script,
    /// `I`: information; shown only in the verbose view.
    Info,
}

impl Level {
    /// The letter written in the log file.
    pub fn letter(self) -> char {
        match self {
            Level::User => 'U',
            Level::Event => 'E',
            Level::Critical => 'C',
            Level::Script => 'S',
            Level::Info => 'I',
        }
    }

    /// The level for a letter read back from a log file.
    pub fn from_letter(letter: char) -> Option<Level> {
        match letter {
            'U' => Some(Level::User),
            'E' => Some(Level::Event),
            'C' => Some(Level::Critical),
            'S' => Some(Level::Script),
            'I' => Some(Level::Info),
            _ => None,
        }
    }

    /// Whether records of this level appear only in the verbose view.
    pub fn is_verbose_only(self) -> bool {
        self == Level::Info
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.letter())
    }
}

/// Why a log could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum ModLogError {
    /// A file system operation on the log failed.
    #[error("{operation} log {path}: {source}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The log file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Formats `time` as `YYYY-MM-DD HH:MM:SS.mmm` in UTC.
pub fn format_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let total_secs = since_epoch.as_secs();
    let millis = since_epoch.subsec_millis();
    let days = (total_secs / 86_400) as i64;
    let secs_of_day = total_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{millis:03}",
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60
    )
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date
/// (Howard Hinnant's `civil_from_days` algorithm, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats one log record as a complete line (with the trailing newline).
pub fn format_line(time: SystemTime, level: Level, message: &str) -> String {
    let one_line = message.replace('\r', "\\r").replace('\n', "\\n");
    format!("{} | {} | {}\n", format_timestamp(time), level, one_line)
}

/// One record read back from a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// `YYYY-MM-DD HH:MM:SS.mmm`, UTC.
    pub timestamp: String,
    /// The record's level.
    pub level: Level,
    /// The message, as written (newlines escaped).
    pub message: String,
}

impl LogRecord {
    /// Parses a line written by [`format_line`] (without its newline).
    pub fn parse(line: &str) -> Option<LogRecord> {
        let mut fields = line.splitn(3, " | ");
        let timestamp = fields.next()?;
        let level_field = fields.next()?;
        let message = fields.next()?;
        let mut letters = level_field.chars();
        let level = Level::from_letter(letters.next()?)?;
        if letters.next().is_some() {
            return None;
        }
        Some(LogRecord {
            timestamp: timestamp.to_string(),
            level,
            message: message.to_string(),
        })
    }
}

/// The path of the rotated (previous) file of the log at `path`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".1");
    PathBuf::from(name)
}

/// Rotates the log at `path` to `<path>.1` if appending `incoming_len` bytes
/// would make it larger than `max_bytes`. Returns whether it rotated.
///
/// A file that is empty is never rotated, so a single line longer than the
/// limit is still written.
///
/// # Errors
/// The failed file operation (other than the file not existing).
pub fn rotate_if_over(path: &Path, max_bytes: u64, incoming_len: u64) -> io::Result<bool> {
    let current_len = match fs::metadata(path) {
        Ok(metadata) => metadata.len(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(error),
    };
    if current_len == 0 || current_len.saturating_add(incoming_len) <= max_bytes {
        return Ok(false);
    }
    fs::rename(path, rotated_path(path))?;
    Ok(true)
}

/// Reads the last `n_lines` records of the log at `path` (across its rotated
/// file), oldest first. Without `verbose`, `I` records are left out, as in
/// SafeKit's non-verbose log. Lines that do not parse (e.g. a torn last line)
/// are kept as they are in the verbose view and skipped otherwise.
///
/// # Errors
/// [`ModLogError::Io`] if an existing file cannot be read. A log that does not
/// exist yet reads as empty.
pub fn tail(path: &Path, n_lines: usize, verbose: bool) -> Result<Vec<String>, ModLogError> {
    let mut kept = std::collections::VecDeque::with_capacity(n_lines.min(4096));
    if n_lines == 0 {
        return Ok(Vec::new());
    }
    for file_path in [rotated_path(path), path.to_path_buf()] {
        let file = match File::open(&file_path) {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(ModLogError::Io {
                    operation: "open",
                    path: file_path,
                    source,
                });
            }
        };
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| ModLogError::Io {
                operation: "read",
                path: file_path.clone(),
                source,
            })?;
            let shown = match LogRecord::parse(&line) {
                Some(record) => verbose || !record.level.is_verbose_only(),
                None => verbose,
            };
            if shown {
                if kept.len() == n_lines {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        }
    }
    Ok(kept.into())
}

enum WriterCommand {
    Line(String),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A handle to one bounded log file, written by a dedicated thread.
///
/// Cloning the handle is cheap; the writer thread ends once every handle is
/// dropped and every queued line is written.
#[derive(Debug, Clone)]
pub struct ModLog {
    path: PathBuf,
    sender: mpsc::Sender<WriterCommand>,
}

impl std::fmt::Debug for WriterCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriterCommand::Line(line) => f.debug_tuple("Line").field(line).finish(),
            WriterCommand::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl ModLog {
    /// Opens (creating if needed, with its parent directory) the log at `path`,
    /// bounded to about `max_bytes` per file, and starts its writer thread.
    ///
    /// # Errors
    /// [`ModLogError::Io`] if the directory or the file cannot be created.
    pub fn open(path: impl Into<PathBuf>, max_bytes: u64) -> Result<ModLog, ModLogError> {
        let path = path.into();
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            fs::create_dir_all(parent).map_err(|source| ModLogError::Io {
                operation: "create directory of",
                path: path.clone(),
                source,
            })?;
        }
        let file = open_append(&path).map_err(|source| ModLogError::Io {
            operation: "open",
            path: path.clone(),
            source,
        })?;
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            path: path.clone(),
            max_bytes,
            file: Some(file),
        };
        let thread_name = format!(
            "modlog-{}",
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || writer.run(receiver))
            .map_err(|source| ModLogError::Io {
                operation: "start writer thread for",
                path: path.clone(),
                source,
            })?;
        Ok(ModLog { path, sender })
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues one record, timestamped now. Never blocks on the disk.
    pub fn log(&self, level: Level, message: impl AsRef<str>) {
        let line = format_line(SystemTime::now(), level, message.as_ref());
        if self.sender.send(WriterCommand::Line(line)).is_err() {
            tracing::error!(path = %self.path.display(), "log writer thread is gone; record lost");
        }
    }

    /// Waits until every record queued before this call is written to the file.
    ///
    /// # Cancel safety
    /// Cancel safe: dropping the future only stops waiting; the records are
    /// still written.
    pub async fn flush(&self) {
        let (done_sender, done_receiver) = tokio::sync::oneshot::channel();
        if self.sender.send(WriterCommand::Flush(done_sender)).is_ok() {
            let _ = done_receiver.await;
        }
    }

    /// Waits for queued records to be written, then returns the last `n_lines`
    /// (see [`tail`]).
    ///
    /// # Errors
    /// As [`tail`].
    pub async fn tail(&self, n_lines: usize, verbose: bool) -> Result<Vec<String>, ModLogError> {
        self.flush().await;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || tail(&path, n_lines, verbose))
            .await
            .unwrap_or_else(|join_error| {
                Err(ModLogError::Io {
                    operation: "read",
                    path: self.path.clone(),
                    source: io::Error::other(join_error),
                })
            })
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    max_bytes: u64,
    /// `None` after a failed reopen; retried on the next line.
    file: Option<File>,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<WriterCommand>) {
        while let Ok(command) = receiver.recv() {
            match command {
                WriterCommand::Line(line) => {
                    if let Err(error) = self.write_line(&line) {
                        tracing::warn!(path = %self.path.display(), %error, "cannot write log record");
                    }
                }
                WriterCommand::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    fn write_line(&mut self, line: &str) -> io::Result<()> {
        if rotate_if_over(&self.path, self.max_bytes, line.len() as u64)? {
            self.file = None;
        }
        if self.file.is_none() {
            self.file = Some(open_append(&self.path)?);
        }
        let file = self.file.as_mut().expect("file opened just above");
        file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_calendar_dates_with_milliseconds() {
        assert_eq!(format_timestamp(UNIX_EPOCH), "1970-01-01 00:00:00.000");
        // 2024-02-29 12:34:56.789 UTC (a leap day).
        let leap_day = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(format_timestamp(leap_day), "2024-02-29 12:34:56.789");
        // 2000-12-31 23:59:59.999 UTC.
        let end_of_2000 = UNIX_EPOCH + Duration::from_millis(978_307_199_999);
        assert_eq!(format_timestamp(end_of_2000), "2000-12-31 23:59:59.999");
    }

    #[test]
    fn a_line_parses_back_and_never_spans_lines() {
        let line = format_line(UNIX_EPOCH, Level::Event, "PRIM -> ALONE\n(peer lost)");
        assert_eq!(
            line,
            "1970-01-01 00:00:00.000 | E | PRIM -> ALONE\\n(peer lost)\n"
        );
        let record = LogRecord::parse(line.trim_end_matches('\n')).unwrap();
        assert_eq!(record.level, Level::Event);
        assert_eq!(record.message, "PRIM -> ALONE\\n(peer lost)");
        assert_eq!(LogRecord::parse("garbage"), None);
    }
}
