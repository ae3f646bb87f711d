//! Which opened files are replicated: configured directories, `notreplicated`
//! exclusions and the volume map, compared the way Windows compares names.
//!
//! The agent configures directories as the operator wrote them
//! (`c:\test1replicated`), while Filter Manager hands the driver normalized
//! names in device form (`\Device\HarddiskVolume3\test1replicated\a.txt`). The
//! agent therefore also sends a volume map (`C:` → `\Device\HarddiskVolume3`,
//! `Volume{guid}` → the same device), and every configured path is turned into
//! its device form, upper-cased, once, when it is added. A name seen at run
//! time is upper-cased unit by unit while it is compared, so the I/O path
//! neither allocates nor copies.
//!
//! Storage is fixed: `UNITS` UTF-16 units for all stored names and `ENTRIES`
//! entries (volumes, replicated directories and exclusions together), so the
//! table can live in one non-paged allocation made by the kernel glue. When the
//! agent's configuration or the volume map changes, the glue builds a new
//! table and swaps it in.
//!
//! What this module does not do: `regexpath` exclusions (the agent applies
//! them and answers "allow, not replicated"), volumes mounted on folders, and
//! per-directory case sensitivity. Names must be normalized
//! (`FLT_FILE_NAME_NORMALIZED`), so 8.3 short names and `.`/`..` never reach
//! it; a run-time name with such components is reported as an error.

use core::fmt;

use crate::minifilter::{ConfigEntry, Configure, Utf16Path};

/// Longest path, in UTF-16 units, accepted from a [`Configure`] message: the
/// entries are copied to a stack buffer of this size while they are added.
pub const MAX_CONFIG_PATH_UNITS: usize = 512;

/// Index of a replicated directory, in the order the agent added them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DirIndex(pub u16);

/// Where a name falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// Not under any replicated directory.
    Outside,
    /// The replicated directory itself.
    Root(DirIndex),
    /// Strictly inside a replicated directory and not excluded.
    Replicated(DirIndex),
    /// Inside a replicated directory, under a `notreplicated` path.
    Excluded(DirIndex),
}

/// Why a configuration entry was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigError {
    /// `UNITS` or `ENTRIES` is exhausted.
    Full,
    /// More replicated directories than a `u16` index can number.
    TooManyDirectories,
    /// A volume alias must be a drive (`C:`) or a single name (`Volume{...}`).
    BadAlias,
    /// A device name must start with `\Device\` and have a non-empty name.
    BadDevice,
    /// The alias is already mapped.
    DuplicateAlias,
    /// A path with an empty, `.` or `..` component.
    BadComponent,
    /// A replicated directory must not be a volume root.
    VolumeRoot,
    /// The path's prefix is neither a device nor a mapped alias.
    Unresolved(NameError),
    /// A replicated directory inside, or containing, another one.
    Overlaps(DirIndex),
    /// An exclusion for a directory index that was never added.
    UnknownDirectory(DirIndex),
    /// An exclusion must be a non-empty relative path.
    BadExclusion,
    /// A configured path is longer than [`MAX_CONFIG_PATH_UNITS`].
    PathTooLong,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Full => f.write_str("path table is full"),
            ConfigError::TooManyDirectories => f.write_str("too many replicated directories"),
            ConfigError::BadAlias => f.write_str("volume alias is neither a drive nor a name"),
            ConfigError::BadDevice => f.write_str("device name does not start with \\Device\\"),
            ConfigError::DuplicateAlias => f.write_str("volume alias mapped twice"),
            ConfigError::BadComponent => f.write_str("path has an empty, . or .. component"),
            ConfigError::VolumeRoot => f.write_str("a volume root cannot be replicated"),
            ConfigError::Unresolved(error) => write!(f, "path does not resolve: {error}"),
            ConfigError::Overlaps(dir) => {
                write!(f, "directory overlaps replicated directory {}", dir.0)
            }
            ConfigError::UnknownDirectory(dir) => write!(f, "no replicated directory {}", dir.0),
            ConfigError::BadExclusion => f.write_str("exclusion is not a relative path"),
            ConfigError::PathTooLong => f.write_str("configured path is too long"),
        }
    }
}

impl core::error::Error for ConfigError {}

/// Which entry of a [`Configure`] message was refused, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigEntryError {
    /// Position of the entry in the message.
    pub index: usize,
    /// What was wrong with it.
    pub error: ConfigError,
}

impl fmt::Display for ConfigEntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "configuration entry {}: {}", self.index, self.error)
    }
}

impl core::error::Error for ConfigEntryError {}

/// Copies a wire path into `buffer` as UTF-16 units.
fn units_of<'b>(
    path: Utf16Path<'_>,
    buffer: &'b mut [u16; MAX_CONFIG_PATH_UNITS],
) -> Result<&'b [u16], ConfigError> {
    if path.len_units() > MAX_CONFIG_PATH_UNITS {
        return Err(ConfigError::PathTooLong);
    }
    for (slot, unit) in buffer.iter_mut().zip(path.units()) {
        *slot = unit;
    }
    Ok(&buffer[..path.len_units()])
}

/// Why a name could not be placed on a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameError {
    /// Neither `\Device\...`, a DOS-devices prefix, nor `X:`.
    UnknownForm,
    /// A drive or volume alias missing from the volume map.
    UnknownAlias,
    /// An empty, `.` or `..` component: not a normalized name.
    NotNormalized,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::UnknownForm => f.write_str("name has no device or drive prefix"),
            NameError::UnknownAlias => f.write_str("drive or volume alias is not mapped"),
            NameError::NotNormalized => f.write_str("name has an empty, . or .. component"),
        }
    }
}

impl core::error::Error for NameError {}

const BACKSLASH: u16 = b'\\' as u16;
const SLASH: u16 = b'/' as u16;
const COLON: u16 = b':' as u16;
const DOT: u16 = b'.' as u16;
/// Upper case, as compared after upper-casing a name.
const DEVICE_PREFIX: &[u8] = b"\\DEVICE\\";

/// Upper-cases one UTF-16 unit with Unicode's simple mapping, as the NTFS
/// `$UpCase` table does for most units.
///
/// The real table is per volume and was generated by the Windows version that
/// formatted it; a handful of units may differ. The kernel glue can pass
/// `RtlUpcaseUnicodeChar` to [`PathRules::with_upcase`] instead. Surrogates and
/// units whose upper case is several characters or outside the BMP are kept.
pub fn unicode_upcase(unit: u16) -> u16 {
    if unit < 0x80 {
        return if (u16::from(b'a')..=u16::from(b'z')).contains(&unit) {
            unit - 0x20
        } else {
            unit
        };
    }
    let Some(c) = char::from_u32(u32::from(unit)) else {
        return unit;
    };
    let mut upper = c.to_uppercase();
    match (upper.next(), upper.next()) {
        (Some(single), None) => u16::try_from(u32::from(single)).unwrap_or(unit),
        _ => unit,
    }
}

/// A run of units in the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: usize,
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Empty,
    /// `alias` (upper case, e.g. `C:`) stands for `device` (upper case).
    Volume {
        alias: Span,
        device: Span,
    },
    /// A replicated directory, full device form, upper case, no trailing `\`.
    Replicated {
        dir: DirIndex,
        path: Span,
    },
    /// A `notreplicated` path of directory `dir`, full device form.
    Excluded {
        dir: DirIndex,
        path: Span,
    },
}

/// The configured replicated directories and exclusions, with the volume map.
pub struct PathRules<const UNITS: usize, const ENTRIES: usize> {
    units: [u16; UNITS],
    n_units: usize,
    entries: [Entry; ENTRIES],
    n_entries: usize,
    n_dirs: u16,
    upcase: fn(u16) -> u16,
}

impl<const UNITS: usize, const ENTRIES: usize> fmt::Debug for PathRules<UNITS, ENTRIES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PathRules")
            .field("n_units", &self.n_units)
            .field("n_entries", &self.n_entries)
            .field("n_dirs", &self.n_dirs)
            .finish_non_exhaustive()
    }
}

impl<const UNITS: usize, const ENTRIES: usize> Default for PathRules<UNITS, ENTRIES> {
    fn default() -> Self {
        Self::new()
    }
}

/// A name split into the device it lives on and the rest (`\dir\file` or empty).
#[derive(Clone, Copy)]
struct Located<'n> {
    /// Either units of the name itself or a device stored in the arena.
    device: DeviceRef<'n>,
    rest: &'n [u16],
}

#[derive(Clone, Copy)]
enum DeviceRef<'n> {
    InName(&'n [u16]),
    Stored(Span),
}

impl<const UNITS: usize, const ENTRIES: usize> PathRules<UNITS, ENTRIES> {
    /// An empty table using [`unicode_upcase`].
    pub fn new() -> Self {
        Self::with_upcase(unicode_upcase)
    }

    /// An empty table that upper-cases with `upcase` (e.g. a wrapper around
    /// `RtlUpcaseUnicodeChar` in the kernel).
    pub fn with_upcase(upcase: fn(u16) -> u16) -> Self {
        PathRules {
            units: [0; UNITS],
            n_units: 0,
            entries: [Entry::Empty; ENTRIES],
            n_entries: 0,
            n_dirs: 0,
            upcase,
        }
    }

    /// Adds every entry of an agent's [`Configure`] message, in order.
    ///
    /// # Errors
    ///
    /// The first entry refused; the table then holds the entries before it,
    /// so the caller should discard it rather than use it.
    pub fn apply(&mut self, configure: &Configure<'_>) -> Result<(), ConfigEntryError> {
        let mut first = [0u16; MAX_CONFIG_PATH_UNITS];
        let mut second = [0u16; MAX_CONFIG_PATH_UNITS];
        for (index, entry) in configure.entries().enumerate() {
            let added = match entry {
                ConfigEntry::Volume { alias, device } => {
                    units_of(alias, &mut first).and_then(|alias| {
                        let device = units_of(device, &mut second)?;
                        self.add_volume(alias, device)
                    })
                }
                ConfigEntry::Replicated { path } => units_of(path, &mut first)
                    .and_then(|path| self.add_replicated(path).map(|_| ())),
                ConfigEntry::Excluded {
                    dir_index,
                    relative,
                } => units_of(relative, &mut first)
                    .and_then(|relative| self.add_excluded(DirIndex(dir_index), relative)),
            };
            added.map_err(|error| ConfigEntryError { index, error })?;
        }
        Ok(())
    }

    /// Number of replicated directories added.
    pub fn n_dirs(&self) -> u16 {
        self.n_dirs
    }

    /// Maps a DOS alias (`C:`, `Volume{guid}`) to a device (`\Device\HarddiskVolume3`).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if either name is malformed, the alias is mapped, or the table is full.
    pub fn add_volume(&mut self, alias: &[u16], device: &[u16]) -> Result<(), ConfigError> {
        let alias = strip_trailing_separators(alias);
        if alias.is_empty() || alias.iter().any(|unit| is_separator(*unit)) {
            return Err(ConfigError::BadAlias);
        }
        let device = strip_trailing_separators(device);
        let name_part = device.get(DEVICE_PREFIX.len()..).unwrap_or_default();
        if !self.starts_with_ascii(device, DEVICE_PREFIX) || name_part.is_empty() {
            return Err(ConfigError::BadDevice);
        }
        if !components_are_normal(device) {
            return Err(ConfigError::BadComponent);
        }
        if self.lookup_alias(alias).is_some() {
            return Err(ConfigError::DuplicateAlias);
        }
        let start = self.n_units;
        let stored = self.push_folded(alias).and_then(|()| {
            let alias = Span {
                start,
                len: self.n_units - start,
            };
            let device_start = self.n_units;
            self.push_folded(device)?;
            let device = Span {
                start: device_start,
                len: self.n_units - device_start,
            };
            self.push_entry(Entry::Volume { alias, device })
        });
        stored.inspect_err(|_| self.n_units = start)
    }

    /// Adds a replicated directory, as the operator wrote it (`c:\dir`,
    /// `\??\C:\dir`, `\Device\HarddiskVolume3\dir`), and returns its index.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the path does not resolve through the volume map, is
    /// a volume root, overlaps another replicated directory, or the table is full.
    pub fn add_replicated(&mut self, path: &[u16]) -> Result<DirIndex, ConfigError> {
        let located =
            self.locate(strip_trailing_separators(path))
                .map_err(|error| match error {
                    NameError::NotNormalized => ConfigError::BadComponent,
                    other => ConfigError::Unresolved(other),
                })?;
        if located.rest.is_empty() {
            return Err(ConfigError::VolumeRoot);
        }
        let index = DirIndex(self.n_dirs);
        let next = self
            .n_dirs
            .checked_add(1)
            .ok_or(ConfigError::TooManyDirectories)?;
        // Nested replicated directories would make "which one" ambiguous, and
        // SafeKit requires distinct directories anyway.
        for entry in &self.entries[..self.n_entries] {
            if let Entry::Replicated {
                dir,
                path: existing,
            } = *entry
            {
                let existing_units = self.span(existing);
                let ours_in_theirs = self
                    .compare(existing_units.iter().copied(), located)
                    .is_some();
                let theirs_in_ours = self.is_inside_or_equal(existing_units, located);
                if ours_in_theirs || theirs_in_ours {
                    return Err(ConfigError::Overlaps(dir));
                }
            }
        }
        let saved = self.n_units;
        let span = self.store_located(located)?;
        self.push_entry(Entry::Replicated {
            dir: index,
            path: span,
        })
        .inspect_err(|_| self.n_units = saved)?;
        self.n_dirs = next;
        Ok(index)
    }

    /// Adds a `notreplicated path="..."` exclusion, relative to directory `dir`
    /// (`\` or `/` separators).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if `dir` is unknown, the path is empty, absolute or has
    /// `.`/`..` components, or the table is full.
    pub fn add_excluded(&mut self, dir: DirIndex, relative: &[u16]) -> Result<(), ConfigError> {
        let dir_span = self
            .dir_span(dir)
            .ok_or(ConfigError::UnknownDirectory(dir))?;
        let relative = strip_trailing_separators(relative);
        let starts_absolute = relative.first().is_some_and(|unit| is_separator(*unit))
            || relative.get(1) == Some(&COLON);
        if relative.is_empty() || starts_absolute {
            return Err(ConfigError::BadExclusion);
        }
        if !relative
            .split(|unit| is_separator(*unit))
            .all(component_is_normal)
        {
            return Err(ConfigError::BadComponent);
        }
        // The directory's stored units, then `\` and the relative path.
        let start = self.n_units;
        let stored = self
            .copy_stored(dir_span)
            .and_then(|()| self.push_unit(BACKSLASH))
            .and_then(|()| self.push_folded(relative))
            .and_then(|()| {
                let path = Span {
                    start,
                    len: self.n_units - start,
                };
                self.push_entry(Entry::Excluded { dir, path })
            });
        stored.inspect_err(|_| self.n_units = start)
    }

    /// Where `name` (a normalized name, any accepted prefix form) falls.
    ///
    /// # Errors
    ///
    /// [`NameError`] if the name's prefix is not a device, or an alias missing
    /// from the volume map, or the name has `.`/`..`/empty components. A
    /// device absent from the map is not an error: nothing there is replicated.
    pub fn classify(&self, name: &[u16]) -> Result<Classification, NameError> {
        let located = self.locate(name)?;
        let found = self.entries[..self.n_entries]
            .iter()
            .find_map(|entry| match *entry {
                Entry::Replicated { dir, path } => self
                    .compare(self.span(path).iter().copied(), located)
                    .map(|exact| {
                        if exact {
                            Classification::Root(dir)
                        } else {
                            Classification::Replicated(dir)
                        }
                    }),
                _ => None,
            });
        let Some(Classification::Replicated(dir)) = found else {
            return Ok(found.unwrap_or(Classification::Outside));
        };
        let excluded = self.entries[..self.n_entries]
            .iter()
            .any(|entry| match *entry {
                Entry::Excluded {
                    dir: excluded_dir,
                    path,
                } => {
                    excluded_dir == dir
                        && self
                            .compare(self.span(path).iter().copied(), located)
                            .is_some()
                }
                _ => false,
            });
        let found = if excluded {
            Classification::Excluded(dir)
        } else {
            Classification::Replicated(dir)
        };
        Ok(found)
    }

    /// Splits a name into device and rest, resolving DOS aliases.
    fn locate<'n>(&self, name: &'n [u16]) -> Result<Located<'n>, NameError> {
        let located = if self.starts_with_ascii(name, DEVICE_PREFIX) {
            // `\Device\Name\rest`: the device is the first two components.
            let after = name.get(DEVICE_PREFIX.len()..).unwrap_or_default();
            let name_len = after
                .iter()
                .position(|u| *u == BACKSLASH)
                .unwrap_or(after.len());
            if name_len == 0 {
                return Err(NameError::UnknownForm);
            }
            let (device, rest) = name.split_at((DEVICE_PREFIX.len() + name_len).min(name.len()));
            Located {
                device: DeviceRef::InName(device),
                rest,
            }
        } else {
            let after_prefix = self.strip_dos_prefix(name).ok_or(NameError::UnknownForm)?;
            let alias_len = after_prefix
                .iter()
                .position(|u| *u == BACKSLASH)
                .unwrap_or(after_prefix.len());
            let (alias, rest) = after_prefix.split_at(alias_len);
            let device = self.lookup_alias(alias).ok_or(NameError::UnknownAlias)?;
            Located {
                device: DeviceRef::Stored(device),
                rest,
            }
        };
        // `rest` is empty or starts with `\`; every component after it must be normal.
        let components_ok = match located.rest.split_first() {
            None => true,
            Some((_, tail)) => tail.split(|u| *u == BACKSLASH).all(component_is_normal),
        };
        if components_ok {
            Ok(located)
        } else {
            Err(NameError::NotNormalized)
        }
    }

    /// `\??\`, `\DosDevices\`, `\GLOBAL??\`, `\\?\`, `\\.\` or a bare `X:`.
    fn strip_dos_prefix<'n>(&self, name: &'n [u16]) -> Option<&'n [u16]> {
        const PREFIXES: [&[u8]; 5] = [
            b"\\??\\",
            b"\\DOSDEVICES\\",
            b"\\GLOBAL??\\",
            b"\\\\?\\",
            b"\\\\.\\",
        ];
        if let Some(prefix) = PREFIXES
            .iter()
            .find(|prefix| self.starts_with_ascii(name, prefix))
        {
            return name.get(prefix.len()..);
        }
        let is_drive = match name {
            [letter, COLON, ..] => {
                (u16::from(b'A')..=u16::from(b'Z')).contains(&(self.upcase)(*letter))
            }
            _ => false,
        };
        is_drive.then_some(name)
    }

    fn lookup_alias(&self, alias: &[u16]) -> Option<Span> {
        self.entries[..self.n_entries]
            .iter()
            .find_map(|entry| match *entry {
                Entry::Volume {
                    alias: stored,
                    device,
                } if self.equal_folded(self.span(stored), alias) => Some(device),
                _ => None,
            })
    }

    /// Compares a stored (upper-case, device form) path with a located name.
    /// `Some(true)`: the name is the path itself; `Some(false)`: the name is
    /// inside it (next unit `\`, or `:` for a stream of it); `None`: neither.
    fn compare(&self, stored: impl Iterator<Item = u16>, name: Located<'_>) -> Option<bool> {
        let device_units: &[u16] = match name.device {
            DeviceRef::InName(units) => units,
            DeviceRef::Stored(span) => self.span(span),
        };
        let mut name_units = device_units
            .iter()
            .chain(name.rest)
            .map(|u| (self.upcase)(*u));
        for stored_unit in stored {
            if name_units.next() != Some(stored_unit) {
                return None;
            }
        }
        match name_units.next() {
            None => Some(true),
            Some(BACKSLASH | COLON) => Some(false),
            Some(_) => None,
        }
    }

    /// Whether the stored path `stored` lies inside (or is) the located name.
    fn is_inside_or_equal(&self, stored: &[u16], name: Located<'_>) -> bool {
        let device_units: &[u16] = match name.device {
            DeviceRef::InName(units) => units,
            DeviceRef::Stored(span) => self.span(span),
        };
        let mut stored_units = stored.iter().copied();
        for unit in device_units
            .iter()
            .chain(name.rest)
            .map(|u| (self.upcase)(*u))
        {
            if stored_units.next() != Some(unit) {
                return false;
            }
        }
        matches!(stored_units.next(), None | Some(BACKSLASH))
    }

    /// `name` starts with `prefix` (upper-case ASCII), ignoring case.
    fn starts_with_ascii(&self, name: &[u16], prefix: &[u8]) -> bool {
        name.len() >= prefix.len()
            && name
                .iter()
                .zip(prefix)
                .all(|(unit, byte)| (self.upcase)(*unit) == u16::from(*byte))
    }

    fn equal_folded(&self, stored: &[u16], name: &[u16]) -> bool {
        stored.len() == name.len()
            && stored
                .iter()
                .zip(name)
                .all(|(folded, unit)| (self.upcase)(*unit) == *folded)
    }

    /// Stores device and rest of a located name, upper-cased, as one span.
    fn store_located(&mut self, located: Located<'_>) -> Result<Span, ConfigError> {
        let start = self.n_units;
        let result = match located.device {
            DeviceRef::InName(units) => self.push_folded(units),
            DeviceRef::Stored(span) => self.copy_stored(span),
        }
        .and_then(|()| self.push_folded(located.rest));
        match result {
            Ok(()) => Ok(Span {
                start,
                len: self.n_units - start,
            }),
            Err(error) => {
                self.n_units = start;
                Err(error)
            }
        }
    }

    /// Appends a copy of units already in the arena.
    fn copy_stored(&mut self, span: Span) -> Result<(), ConfigError> {
        for offset in 0..span.len {
            let unit = self
                .units
                .get(span.start + offset)
                .copied()
                .ok_or(ConfigError::Full)?;
            self.push_unit(unit)?;
        }
        Ok(())
    }

    /// Appends units upper-cased (`/` becomes `\`).
    fn push_folded(&mut self, units: &[u16]) -> Result<(), ConfigError> {
        for unit in units {
            let folded = if *unit == SLASH {
                BACKSLASH
            } else {
                (self.upcase)(*unit)
            };
            self.push_unit(folded)?;
        }
        Ok(())
    }

    fn push_unit(&mut self, unit: u16) -> Result<(), ConfigError> {
        let slot = self.units.get_mut(self.n_units).ok_or(ConfigError::Full)?;
        *slot = unit;
        self.n_units += 1;
        Ok(())
    }

    fn push_entry(&mut self, entry: Entry) -> Result<(), ConfigError> {
        let slot = self
            .entries
            .get_mut(self.n_entries)
            .ok_or(ConfigError::Full)?;
        *slot = entry;
        self.n_entries += 1;
        Ok(())
    }

    fn span(&self, span: Span) -> &[u16] {
        self.units
            .get(span.start..span.start + span.len)
            .unwrap_or_default()
    }

    fn dir_span(&self, dir: DirIndex) -> Option<Span> {
        self.entries[..self.n_entries]
            .iter()
            .find_map(|entry| match *entry {
                Entry::Replicated { dir: stored, path } if stored == dir => Some(path),
                _ => None,
            })
    }
}

fn is_separator(unit: u16) -> bool {
    unit == BACKSLASH || unit == SLASH
}

fn strip_trailing_separators(path: &[u16]) -> &[u16] {
    let mut path = path;
    while let [head @ .., last] = path {
        if is_separator(*last) {
            path = head;
        } else {
            break;
        }
    }
    path
}

fn component_is_normal(component: &[u16]) -> bool {
    !(component.is_empty() || component == [DOT] || component == [DOT, DOT])
}

/// Every component after the leading `\` is normal.
fn components_are_normal(path: &[u16]) -> bool {
    match path.split_first() {
        Some((&BACKSLASH, tail)) => tail.split(|u| *u == BACKSLASH).all(component_is_normal),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(text: &str) -> Vec<u16> {
        text.encode_utf16().collect()
    }

    /// C: and D: on two volumes, `c:\test1replicated` (0) with exclusions
    /// `logs` and `tmp/cache`, and `d:\Data` (1).
    fn rules() -> PathRules<1024, 16> {
        let mut rules = PathRules::new();
        rules
            .add_volume(&w("C:"), &w("\\Device\\HarddiskVolume3"))
            .expect("volume C");
        rules
            .add_volume(&w("d:"), &w("\\Device\\HarddiskVolume4\\"))
            .expect("volume D");
        rules
            .add_volume(&w("Volume{5a1e}"), &w("\\Device\\HarddiskVolume4"))
            .expect("volume guid");
        assert_eq!(
            rules.add_replicated(&w("c:\\test1replicated")),
            Ok(DirIndex(0))
        );
        assert_eq!(
            rules.add_replicated(&w("\\??\\D:\\Data\\")),
            Ok(DirIndex(1))
        );
        rules
            .add_excluded(DirIndex(0), &w("logs"))
            .expect("exclusion");
        rules
            .add_excluded(DirIndex(0), &w("tmp/cache"))
            .expect("exclusion");
        rules
    }

    fn classify(name: &str) -> Result<Classification, NameError> {
        rules().classify(&w(name))
    }

    #[test]
    fn device_form_names_inside_a_replicated_dir_match_case_insensitively() {
        use Classification::*;
        assert_eq!(
            classify("\\Device\\HarddiskVolume3\\test1replicated\\a.txt"),
            Ok(Replicated(DirIndex(0)))
        );
        assert_eq!(
            classify("\\DEVICE\\HARDDISKVOLUME3\\TEST1REPLICATED\\SUB\\B"),
            Ok(Replicated(DirIndex(0)))
        );
        assert_eq!(
            classify("\\device\\harddiskvolume4\\data\\x"),
            Ok(Replicated(DirIndex(1)))
        );
        assert_eq!(
            classify("\\Device\\HarddiskVolume3\\test1replicated"),
            Ok(Root(DirIndex(0)))
        );
    }

    #[test]
    fn sibling_names_with_a_common_prefix_are_outside() {
        use Classification::*;
        assert_eq!(
            classify("\\Device\\HarddiskVolume3\\test1replicated2\\a"),
            Ok(Outside)
        );
        assert_eq!(classify("\\Device\\HarddiskVolume3\\test1"), Ok(Outside));
        assert_eq!(classify("\\Device\\HarddiskVolume3"), Ok(Outside));
        assert_eq!(
            classify("\\Device\\HarddiskVolume33\\test1replicated\\a"),
            Ok(Outside)
        );
        // The same directory name on another volume is another directory.
        assert_eq!(
            classify("\\Device\\HarddiskVolume4\\test1replicated\\a"),
            Ok(Outside)
        );
        // A device missing from the volume map holds nothing replicated.
        assert_eq!(
            classify("\\Device\\Mup\\server\\share\\test1replicated"),
            Ok(Outside)
        );
    }

    #[test]
    fn dos_prefixes_resolve_through_the_volume_map() {
        use Classification::*;
        for name in [
            "c:\\test1replicated\\a",
            "\\??\\C:\\test1replicated\\a",
            "\\DosDevices\\c:\\Test1Replicated\\a",
            "\\GLOBAL??\\C:\\test1replicated\\a",
            "\\\\?\\C:\\test1replicated\\a",
        ] {
            assert_eq!(classify(name), Ok(Replicated(DirIndex(0))), "{name}");
        }
        assert_eq!(
            classify("\\??\\Volume{5A1E}\\data\\f"),
            Ok(Replicated(DirIndex(1)))
        );
        assert_eq!(
            classify("\\??\\Q:\\test1replicated\\a"),
            Err(NameError::UnknownAlias)
        );
        assert_eq!(classify("test1replicated\\a"), Err(NameError::UnknownForm));
    }

    #[test]
    fn exclusions_apply_by_component_prefix_within_their_directory() {
        use Classification::*;
        let base = "\\Device\\HarddiskVolume3\\test1replicated";
        assert_eq!(
            classify(&format!("{base}\\logs")),
            Ok(Excluded(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}\\LOGS\\today.log")),
            Ok(Excluded(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}\\tmp\\cache\\x")),
            Ok(Excluded(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}\\logs2")),
            Ok(Replicated(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}\\tmp\\other")),
            Ok(Replicated(DirIndex(0)))
        );
        // Exclusions of directory 0 do not apply to directory 1.
        assert_eq!(
            classify("\\Device\\HarddiskVolume4\\data\\logs"),
            Ok(Replicated(DirIndex(1)))
        );
    }

    #[test]
    fn streams_belong_to_their_file() {
        use Classification::*;
        let base = "\\Device\\HarddiskVolume3\\test1replicated";
        assert_eq!(
            classify(&format!("{base}\\a.txt:Zone.Identifier:$DATA")),
            Ok(Replicated(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}:stream")),
            Ok(Replicated(DirIndex(0)))
        );
        assert_eq!(
            classify(&format!("{base}\\logs:s")),
            Ok(Excluded(DirIndex(0)))
        );
    }

    #[test]
    fn non_ascii_names_compare_case_insensitively() {
        let mut rules: PathRules<256, 4> = PathRules::new();
        rules
            .add_volume(&w("C:"), &w("\\Device\\HarddiskVolume1"))
            .expect("volume");
        let dir = rules.add_replicated(&w("C:\\Données\\Ωmega")).expect("dir");
        assert_eq!(
            rules.classify(&w("\\Device\\HarddiskVolume1\\DONNÉES\\ΩMEGA\\f")),
            Ok(Classification::Replicated(dir))
        );
        // ß has no single-unit upper case and stays as it is, as in NTFS.
        assert_eq!(unicode_upcase(u16::from(b'a')), u16::from(b'A'));
        assert_eq!(unicode_upcase(0x00DF), 0x00DF);
        assert_eq!(unicode_upcase(0xD800), 0xD800);
    }

    #[test]
    fn runtime_names_with_dot_components_are_errors() {
        assert_eq!(
            classify("\\Device\\HarddiskVolume3\\x\\..\\test1replicated\\a"),
            Err(NameError::NotNormalized)
        );
        assert_eq!(
            classify("\\Device\\HarddiskVolume3\\\\a"),
            Err(NameError::NotNormalized)
        );
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut rules = rules();
        assert_eq!(
            rules.add_replicated(&w("C:\\test1replicated\\inner")),
            Err(ConfigError::Overlaps(DirIndex(0)))
        );
        assert_eq!(
            rules.add_replicated(&w("D:\\")),
            Err(ConfigError::VolumeRoot)
        );
        assert_eq!(rules.add_replicated(&w("d:")), Err(ConfigError::VolumeRoot));
        assert_eq!(
            rules.add_replicated(&w("\\Device\\HarddiskVolume4")),
            Err(ConfigError::VolumeRoot)
        );
        assert_eq!(
            rules.add_replicated(&w("Q:\\x")),
            Err(ConfigError::Unresolved(NameError::UnknownAlias))
        );
        assert_eq!(
            rules.add_replicated(&w("C:\\a\\..\\b")),
            Err(ConfigError::BadComponent)
        );
        assert_eq!(
            rules.add_excluded(DirIndex(7), &w("x")),
            Err(ConfigError::UnknownDirectory(DirIndex(7)))
        );
        assert_eq!(
            rules.add_excluded(DirIndex(0), &w("\\abs")),
            Err(ConfigError::BadExclusion)
        );
        assert_eq!(
            rules.add_excluded(DirIndex(0), &w("c:x")),
            Err(ConfigError::BadExclusion)
        );
        assert_eq!(
            rules.add_excluded(DirIndex(0), &w("a/../b")),
            Err(ConfigError::BadComponent)
        );
        assert_eq!(
            rules.add_volume(&w("c:"), &w("\\Device\\X")),
            Err(ConfigError::DuplicateAlias)
        );
        assert_eq!(
            rules.add_volume(&w("E:"), &w("\\Dev\\X")),
            Err(ConfigError::BadDevice)
        );
        assert_eq!(
            rules.add_volume(&w("E:\\x"), &w("\\Device\\X")),
            Err(ConfigError::BadAlias)
        );
    }

    #[test]
    fn a_replicated_dir_containing_an_existing_one_is_refused() {
        let mut rules: PathRules<256, 4> = PathRules::new();
        rules
            .add_volume(&w("C:"), &w("\\Device\\HarddiskVolume1"))
            .expect("volume");
        rules.add_replicated(&w("C:\\a\\b")).expect("dir");
        assert_eq!(
            rules.add_replicated(&w("C:\\A")),
            Err(ConfigError::Overlaps(DirIndex(0)))
        );
        assert_eq!(rules.add_replicated(&w("C:\\a\\bc")), Ok(DirIndex(1)));
    }

    #[test]
    fn a_configure_message_fills_the_table() {
        let bytes: Vec<Vec<u8>> = [
            "C:",
            "\\Device\\HarddiskVolume3",
            "c:\\test1replicated",
            "logs",
        ]
        .iter()
        .map(|text| text.encode_utf16().flat_map(u16::to_le_bytes).collect())
        .collect();
        let path = |index: usize| Utf16Path::from_le_bytes(&bytes[index]).expect("even length");
        let entries = [
            ConfigEntry::Volume {
                alias: path(0),
                device: path(1),
            },
            ConfigEntry::Replicated { path: path(2) },
            ConfigEntry::Excluded {
                dir_index: 0,
                relative: path(3),
            },
        ];
        let mut rules: PathRules<256, 8> = PathRules::new();
        assert_eq!(rules.apply(&Configure::new(&entries)), Ok(()));
        let base = "\\Device\\HarddiskVolume3\\TEST1replicated";
        assert_eq!(
            rules.classify(&w(&format!("{base}\\a"))),
            Ok(Classification::Replicated(DirIndex(0)))
        );
        assert_eq!(
            rules.classify(&w(&format!("{base}\\logs\\x"))),
            Ok(Classification::Excluded(DirIndex(0)))
        );

        // The failing entry is named by its position.
        let entries = [ConfigEntry::Replicated { path: path(2) }];
        let mut rules: PathRules<256, 8> = PathRules::new();
        assert_eq!(
            rules.apply(&Configure::new(&entries)),
            Err(ConfigEntryError {
                index: 0,
                error: ConfigError::Unresolved(NameError::UnknownAlias)
            })
        );
        let long: Vec<u8> = [b'a', 0].repeat(MAX_CONFIG_PATH_UNITS + 1);
        let entries = [ConfigEntry::Replicated {
            path: Utf16Path::from_le_bytes(&long).expect("even"),
        }];
        assert_eq!(
            rules.apply(&Configure::new(&entries)),
            Err(ConfigEntryError {
                index: 0,
                error: ConfigError::PathTooLong
            })
        );
    }

    #[test]
    fn a_full_table_refuses_and_keeps_what_it_had() {
        let mut rules: PathRules<60, 3> = PathRules::new();
        rules
            .add_volume(&w("C:"), &w("\\Device\\HarddiskVolume1"))
            .expect("volume");
        assert_eq!(
            rules.add_replicated(&w("C:\\a-long-directory-name")),
            Err(ConfigError::Full)
        );
        let dir = rules.add_replicated(&w("C:\\short")).expect("fits");
        assert_eq!(rules.add_excluded(dir, &w("x")), Err(ConfigError::Full));
        assert_eq!(
            rules.classify(&w("\\Device\\HarddiskVolume1\\short\\x")),
            Ok(Classification::Replicated(dir))
        );
        assert_eq!(
            rules.classify(&w("\\Device\\HarddiskVolume1\\a-long-directory-name\\x")),
            Ok(Classification::Outside)
        );
    }
}
