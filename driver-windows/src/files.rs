//! The state the driver keeps per replicated file, in a fixed-size table.
//!
//! For each file of a replicated directory that is open, has operations
//! waiting for the agent, or changed while the agent was away, the driver
//! keeps: which replicated directory it belongs to, how many file objects are
//! open on it, how many operations are in flight to the agent, and its dirty
//! ranges. Files are keyed by [`FileKey`] (volume serial and file id), which a
//! rename does not change.
//!
//! The table is an open-addressing hash table with linear probing and
//! backward-shift deletion over `[Slot; FILES]`: no allocation after the glue
//! allocates the table once, no tombstones to accumulate. When a file cannot
//! be recorded (table full) while its changes matter, the table raises a
//! sticky *overflow* flag: the agent must then compare every replicated file,
//! never assume the dirty list is complete.
//!
//! Expected calls from the glue: `opened` in post-create, `closed` in
//! `IRP_MJ_CLOSE` (paging writes may arrive after cleanup), `begin_io` /
//! `end_io` around each message to the agent, `record_*` when the agent is
//! disconnected or failed to answer, `take_dirty` when it reconnects.

use core::fmt;

use crate::minifilter::FileKey;
use crate::paths::DirIndex;
use crate::ranges::DirtyRanges;

/// Why a table operation did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackError {
    /// No free slot for a new file.
    TableFull,
    /// The file is not in the table.
    NotTracked,
    /// A close or end of I/O without the matching open or begin.
    Unbalanced,
    /// A counter would pass `u32::MAX`.
    CounterOverflow,
}

impl fmt::Display for TrackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrackError::TableFull => "file table is full",
            TrackError::NotTracked => "file is not tracked",
            TrackError::Unbalanced => "close or end of I/O without a matching open or begin",
            TrackError::CounterOverflow => "per-file counter overflow",
        })
    }
}

impl core::error::Error for TrackError {}

/// What the driver knows about one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState<const RANGES: usize> {
    dir: DirIndex,
    n_opens: u32,
    n_in_flight: u32,
    dirty: DirtyRanges<RANGES>,
}

impl<const RANGES: usize> FileState<RANGES> {
    /// The replicated directory holding the file.
    pub fn dir(&self) -> DirIndex {
        self.dir
    }

    /// File objects open on the file.
    pub fn n_opens(&self) -> u32 {
        self.n_opens
    }

    /// Operations sent to the agent and not yet answered.
    pub fn n_in_flight(&self) -> u32 {
        self.n_in_flight
    }

    /// What changed without being replicated.
    pub fn dirty(&self) -> &DirtyRanges<RANGES> {
        &self.dirty
    }

    fn is_idle(&self) -> bool {
        self.n_opens == 0 && self.n_in_flight == 0 && self.dirty.is_clean()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot<const RANGES: usize> {
    Empty,
    Full(FileKey, FileState<RANGES>),
}

/// Files changed while the agent was away, handed over on reconnection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyFile<const RANGES: usize> {
    /// The file.
    pub key: FileKey,
    /// Its replicated directory.
    pub dir: DirIndex,
    /// What changed.
    pub dirty: DirtyRanges<RANGES>,
}

/// Per-file state of at most `FILES` files, `RANGES` dirty ranges each.
pub struct FileTable<const FILES: usize, const RANGES: usize> {
    slots: [Slot<RANGES>; FILES],
    n_files: usize,
    overflowed: bool,
}

impl<const FILES: usize, const RANGES: usize> fmt::Debug for FileTable<FILES, RANGES> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTable")
            .field("n_files", &self.n_files)
            .field("overflowed", &self.overflowed)
            .finish_non_exhaustive()
    }
}

impl<const FILES: usize, const RANGES: usize> Default for FileTable<FILES, RANGES> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const FILES: usize, const RANGES: usize> FileTable<FILES, RANGES> {
    /// An empty table.
    pub fn new() -> Self {
        const { assert!(FILES > 0, "a file table needs at least one slot") };
        FileTable {
            slots: [Slot::Empty; FILES],
            n_files: 0,
            overflowed: false,
        }
    }

    /// Files tracked.
    pub fn len(&self) -> usize {
        self.n_files
    }

    /// No file tracked.
    pub fn is_empty(&self) -> bool {
        self.n_files == 0
    }

    /// The state of `key`, if tracked.
    pub fn get(&self, key: FileKey) -> Option<&FileState<RANGES>> {
        match self.find(key).map(|index| &self.slots[index]) {
            Some(Slot::Full(_, state)) => Some(state),
            _ => None,
        }
    }

    /// A file object was opened on `key`, found in directory `dir` (the
    /// newest name wins if the file was known under another directory).
    ///
    /// # Errors
    ///
    /// [`TrackError::TableFull`] or [`TrackError::CounterOverflow`].
    pub fn opened(&mut self, key: FileKey, dir: DirIndex) -> Result<(), TrackError> {
        let state = self.get_or_insert(key, dir)?;
        state.n_opens = state
            .n_opens
            .checked_add(1)
            .ok_or(TrackError::CounterOverflow)?;
        state.dir = dir;
        Ok(())
    }

    /// A file object on `key` was closed (`IRP_MJ_CLOSE`).
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`] or [`TrackError::Unbalanced`].
    pub fn closed(&mut self, key: FileKey) -> Result<(), TrackError> {
        self.update(key, |state| {
            state.n_opens = state.n_opens.checked_sub(1).ok_or(TrackError::Unbalanced)?;
            Ok(())
        })
    }

    /// An operation on `key` is being sent to the agent; returns the file's directory.
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`] or [`TrackError::CounterOverflow`].
    pub fn begin_io(&mut self, key: FileKey) -> Result<DirIndex, TrackError> {
        self.update(key, |state| {
            state.n_in_flight = state
                .n_in_flight
                .checked_add(1)
                .ok_or(TrackError::CounterOverflow)?;
            Ok(state.dir)
        })
    }

    /// The agent answered (or the wait ended) for an operation on `key`.
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`] or [`TrackError::Unbalanced`].
    pub fn end_io(&mut self, key: FileKey) -> Result<(), TrackError> {
        self.update(key, |state| {
            state.n_in_flight = state
                .n_in_flight
                .checked_sub(1)
                .ok_or(TrackError::Unbalanced)?;
            Ok(())
        })
    }

    /// The file was renamed into directory `dir`.
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`].
    pub fn moved(&mut self, key: FileKey, dir: DirIndex) -> Result<(), TrackError> {
        self.update(key, |state| {
            state.dir = dir;
            Ok(())
        })
    }

    /// A write the agent did not replicate.
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`]; the table is then marked overflowed.
    pub fn record_write(&mut self, key: FileKey, offset: u64, len: u64) -> Result<(), TrackError> {
        self.record(key, |dirty| dirty.record_write(offset, len))
    }

    /// A size change the agent did not replicate.
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`]; the table is then marked overflowed.
    pub fn record_size(&mut self, key: FileKey, new_size: u64) -> Result<(), TrackError> {
        self.record(key, |dirty| dirty.record_size(new_size))
    }

    /// A change that ranges cannot describe (rename, delete, attributes).
    ///
    /// # Errors
    ///
    /// [`TrackError::NotTracked`]; the table is then marked overflowed.
    pub fn record_whole_file(&mut self, key: FileKey) -> Result<(), TrackError> {
        self.record(key, DirtyRanges::mark_whole_file)
    }

    /// Some change could not be recorded: the dirty list is incomplete.
    pub fn is_overflowed(&self) -> bool {
        self.overflowed
    }

    /// Returns the overflow flag and clears it, once the agent has scheduled a
    /// full comparison.
    pub fn take_overflow(&mut self) -> bool {
        core::mem::replace(&mut self.overflowed, false)
    }

    /// Hands over one dirty file and clears its record; `None` when no file is
    /// dirty. Idle files are forgotten.
    pub fn take_dirty(&mut self) -> Option<DirtyFile<RANGES>> {
        let index = self
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Full(_, state) if !state.dirty.is_clean()))?;
        let Slot::Full(key, state) = &mut self.slots[index] else {
            return None;
        };
        let taken = DirtyFile {
            key: *key,
            dir: state.dir,
            dirty: state.dirty,
        };
        state.dirty.clear();
        if state.is_idle() {
            self.remove_at(index);
        }
        Some(taken)
    }

    fn record(
        &mut self,
        key: FileKey,
        change: impl FnOnce(&mut DirtyRanges<RANGES>),
    ) -> Result<(), TrackError> {
        let result = self.update(key, |state| {
            change(&mut state.dirty);
            Ok(())
        });
        if result.is_err() {
            self.overflowed = true;
        }
        result
    }

    /// Applies `change` to a tracked file, then forgets the file if idle.
    fn update<T>(
        &mut self,
        key: FileKey,
        change: impl FnOnce(&mut FileState<RANGES>) -> Result<T, TrackError>,
    ) -> Result<T, TrackError> {
        let index = self.find(key).ok_or(TrackError::NotTracked)?;
        let Slot::Full(_, state) = &mut self.slots[index] else {
            return Err(TrackError::NotTracked);
        };
        let mut changed = *state;
        let value = change(&mut changed)?;
        *state = changed;
        if changed.is_idle() {
            self.remove_at(index);
        }
        Ok(value)
    }

    fn get_or_insert(
        &mut self,
        key: FileKey,
        dir: DirIndex,
    ) -> Result<&mut FileState<RANGES>, TrackError> {
        let index = match self.find(key) {
            Some(index) => index,
            None => {
                if self.n_files == FILES {
                    return Err(TrackError::TableFull);
                }
                let mut index = home(key, FILES);
                while matches!(self.slots[index], Slot::Full(..)) {
                    index = (index + 1) % FILES;
                }
                let state = FileState {
                    dir,
                    n_opens: 0,
                    n_in_flight: 0,
                    dirty: DirtyRanges::new(),
                };
                self.slots[index] = Slot::Full(key, state);
                self.n_files += 1;
                index
            }
        };
        match &mut self.slots[index] {
            Slot::Full(_, state) => Ok(state),
            Slot::Empty => Err(TrackError::NotTracked),
        }
    }

    fn find(&self, key: FileKey) -> Option<usize> {
        let mut index = home(key, FILES);
        for _ in 0..FILES {
            match &self.slots[index] {
                Slot::Empty => return None,
                Slot::Full(stored, _) if *stored == key => return Some(index),
                Slot::Full(..) => index = (index + 1) % FILES,
            }
        }
        None
    }

    /// Empties slot `hole` and shifts later members of its probe run back, so
    /// that every key stays reachable from its home slot without tombstones.
    fn remove_at(&mut self, mut hole: usize) {
        self.slots[hole] = Slot::Empty;
        self.n_files -= 1;
        let mut next = hole;
        loop {
            next = (next + 1) % FILES;
            let Slot::Full(key, _) = self.slots[next] else {
                return;
            };
            let home = home(key, FILES);
            // The key at `next` may move into the hole unless its home lies
            // cyclically in (hole, next].
            let home_after_hole = if hole <= next {
                hole < home && home <= next
            } else {
                home > hole || home <= next
            };
            if !home_after_hole {
                self.slots[hole] = self.slots[next];
                self.slots[next] = Slot::Empty;
                hole = next;
            }
        }
    }
}

/// The home slot of `key`: a 64-bit mix (SplitMix64's finalizer) of its parts.
fn home(key: FileKey, n_slots: usize) -> usize {
    let id_high = u64::try_from(key.file_id >> 64).unwrap_or(u64::MAX);
    let id_low = u64::try_from(key.file_id & u128::from(u64::MAX)).unwrap_or(u64::MAX);
    let mut mixed = key.volume_serial ^ id_low ^ id_high.rotate_left(32);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    mixed ^= mixed >> 31;
    let n_slots = u64::try_from(n_slots).unwrap_or(u64::MAX);
    usize::try_from(mixed % n_slots).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(id: u128) -> FileKey {
        FileKey {
            volume_serial: 0xABCD,
            file_id: id,
        }
    }

    #[test]
    fn a_file_is_forgotten_when_closed_idle_and_clean() {
        let mut table = FileTable::<8, 4>::new();
        table.opened(key(1), DirIndex(0)).expect("room");
        table.opened(key(1), DirIndex(0)).expect("room");
        assert_eq!(table.begin_io(key(1)), Ok(DirIndex(0)));
        table.closed(key(1)).expect("open");
        table.closed(key(1)).expect("open");
        // A paging write still in flight keeps the entry.
        assert_eq!(table.get(key(1)).map(FileState::n_in_flight), Some(1));
        table.end_io(key(1)).expect("in flight");
        assert_eq!(table.get(key(1)), None);
        assert!(table.is_empty());
        assert_eq!(table.closed(key(1)), Err(TrackError::NotTracked));
    }

    #[test]
    fn unbalanced_calls_are_errors_and_change_nothing() {
        let mut table = FileTable::<8, 4>::new();
        table.opened(key(1), DirIndex(3)).expect("room");
        assert_eq!(table.end_io(key(1)), Err(TrackError::Unbalanced));
        assert_eq!(table.get(key(1)).map(FileState::n_opens), Some(1));
    }

    #[test]
    fn writes_while_disconnected_survive_close_until_taken() {
        let mut table = FileTable::<8, 4>::new();
        table.opened(key(1), DirIndex(0)).expect("room");
        table.record_write(key(1), 0, 10).expect("tracked");
        table.record_write(key(1), 10, 10).expect("tracked");
        table.closed(key(1)).expect("open");
        let taken = table.take_dirty().expect("one dirty file");
        assert_eq!(taken.key, key(1));
        assert_eq!(taken.dir, DirIndex(0));
        assert_eq!(taken.dirty.ranges().len(), 1);
        assert_eq!(
            (taken.dirty.ranges()[0].start, taken.dirty.ranges()[0].end),
            (0, 20)
        );
        assert_eq!(table.take_dirty(), None);
        assert!(table.is_empty());
        assert!(!table.is_overflowed());
    }

    #[test]
    fn an_unrecordable_change_raises_the_overflow_flag() {
        let mut table = FileTable::<2, 4>::new();
        table.opened(key(1), DirIndex(0)).expect("room");
        table.opened(key(2), DirIndex(0)).expect("room");
        assert_eq!(
            table.opened(key(3), DirIndex(0)),
            Err(TrackError::TableFull)
        );
        // Failing to track an open is harmless while the agent is connected...
        assert!(!table.is_overflowed());
        // ...but a write that cannot be recorded makes the dirty list incomplete.
        assert_eq!(
            table.record_write(key(3), 0, 1),
            Err(TrackError::NotTracked)
        );
        assert!(table.take_overflow());
        assert!(!table.is_overflowed());
    }

    #[test]
    fn renames_move_a_file_to_another_directory() {
        let mut table = FileTable::<8, 4>::new();
        table.opened(key(1), DirIndex(0)).expect("room");
        table.moved(key(1), DirIndex(1)).expect("tracked");
        assert_eq!(table.begin_io(key(1)), Ok(DirIndex(1)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Opened(u8, u16),
        Closed(u8),
        Begin(u8),
        End(u8),
        Write(u8, u64, u64),
        Take,
    }

    fn op() -> impl Strategy<Value = Op> {
        let id = 0..12u8;
        prop_oneof![
            3 => (id.clone(), 0..3u16).prop_map(|(id, dir)| Op::Opened(id, dir)),
            3 => id.clone().prop_map(Op::Closed),
            2 => id.clone().prop_map(Op::Begin),
            2 => id.clone().prop_map(Op::End),
            2 => (id, 0..100u64, 1..10u64).prop_map(|(id, offset, len)| Op::Write(id, offset, len)),
            1 => Just(Op::Take),
        ]
    }

    type Model = HashMap<u8, FileState<4>>;

    fn model_update(
        model: &mut Model,
        id: u8,
        change: impl FnOnce(&mut FileState<4>) -> Result<(), TrackError>,
    ) -> Result<(), TrackError> {
        let state = model.get_mut(&id).ok_or(TrackError::NotTracked)?;
        let mut changed = *state;
        change(&mut changed)?;
        *state = changed;
        if changed.is_idle() {
            model.remove(&id);
        }
        Ok(())
    }

    proptest! {
        /// Against a `HashMap` of the same states: every call answers the same
        /// and every key's state is the same, through collisions, a full table
        /// and backward-shift deletions.
        #[test]
        fn the_table_behaves_like_a_map(ops in prop::collection::vec(op(), 0..200)) {
            const FILES: usize = 8;
            let mut table = FileTable::<FILES, 4>::new();
            let mut model = Model::new();
            let mut overflowed = false;
            // Small distinct ids on one volume collide in 8 slots.
            let file = |id: u8| key(u128::from(id) * 0x1_0000_0001);
            for op in ops {
                match op {
                    Op::Opened(id, dir) => {
                        let expected = if model.contains_key(&id) || model.len() < FILES {
                            let state = model.entry(id).or_insert(FileState {
                                dir: DirIndex(dir),
                                n_opens: 0,
                                n_in_flight: 0,
                                dirty: DirtyRanges::new(),
                            });
                            state.n_opens += 1;
                            state.dir = DirIndex(dir);
                            Ok(())
                        } else {
                            Err(TrackError::TableFull)
                        };
                        prop_assert_eq!(table.opened(file(id), DirIndex(dir)), expected);
                    }
                    Op::Closed(id) => {
                        let expected = model_update(&mut model, id, |state| {
                            state.n_opens = state.n_opens.checked_sub(1).ok_or(TrackError::Unbalanced)?;
                            Ok(())
                        });
                        prop_assert_eq!(table.closed(file(id)), expected);
                    }
                    Op::Begin(id) => {
                        let dir = model.get(&id).map(|state| state.dir);
                        let expected = model_update(&mut model, id, |state| {
                            state.n_in_flight += 1;
                            Ok(())
                        });
                        prop_assert_eq!(
                            table.begin_io(file(id)),
                            expected.map(|()| dir.expect("tracked"))
                        );
                    }
                    Op::End(id) => {
                        let expected = model_update(&mut model, id, |state| {
                            state.n_in_flight = state.n_in_flight.checked_sub(1).ok_or(TrackError::Unbalanced)?;
                            Ok(())
                        });
                        prop_assert_eq!(table.end_io(file(id)), expected);
                    }
                    Op::Write(id, offset, len) => {
                        let expected = model_update(&mut model, id, |state| {
                            state.dirty.record_write(offset, len);
                            Ok(())
                        });
                        overflowed |= expected.is_err();
                        prop_assert_eq!(table.record_write(file(id), offset, len), expected);
                    }
                    Op::Take => match table.take_dirty() {
                        None => prop_assert!(model.values().all(|state| state.dirty.is_clean())),
                        Some(taken) => {
                            let id = (0..12u8).find(|id| file(*id) == taken.key).expect("known id");
                            let state = model.get(&id).expect("taken file is tracked");
                            prop_assert_eq!(state.dir, taken.dir);
                            prop_assert_eq!(state.dirty, taken.dirty);
                            model_update(&mut model, id, |state| {
                                state.dirty.clear();
                                Ok(())
                            }).expect("tracked");
                        }
                    },
                }
                prop_assert_eq!(table.len(), model.len());
                prop_assert_eq!(table.is_overflowed(), overflowed);
                for id in 0..12u8 {
                    prop_assert_eq!(table.get(file(id)), model.get(&id));
                }
            }
        }
    }
}
