//! Which byte ranges of one file changed while the agent could not replicate
//! them, in bounded memory.
//!
//! While the agent is disconnected (or did not answer in time), the driver lets
//! writes through and remembers where they landed, so that reintegration
//! copies only those ranges. Ranges are kept sorted, disjoint and
//! non-adjacent (touching ranges merge). At most `N` ranges are kept: a write
//! that would need an `N + 1`-th range turns the whole file dirty, which is
//! always a correct, if slower, answer. Size changes are remembered apart,
//! because a truncation removes bytes that no range describes.

/// A half-open byte range `start..end`, never empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: empty ranges are never stored.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The dirty ranges of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRanges<const N: usize> {
    ranges: [ByteRange; N],
    n_ranges: usize,
    whole_file: bool,
    size_changed: bool,
}

impl<const N: usize> Default for DirtyRanges<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> DirtyRanges<N> {
    /// Nothing dirty.
    pub const fn new() -> Self {
        DirtyRanges {
            ranges: [ByteRange { start: 0, end: 0 }; N],
            n_ranges: 0,
            whole_file: false,
            size_changed: false,
        }
    }

    /// Records a write of `len` bytes at `offset`. A write reaching past
    /// `u64::MAX` is clipped there.
    pub fn record_write(&mut self, offset: u64, len: u64) {
        if self.whole_file || len == 0 {
            return;
        }
        let new = ByteRange {
            start: offset,
            end: offset.saturating_add(len),
        };
        if new.is_empty() {
            return;
        }
        let ranges = &self.ranges[..self.n_ranges];
        // First range that overlaps or touches `new`, and one past the last.
        let first = ranges.partition_point(|range| range.end < new.start);
        let last = ranges.partition_point(|range| range.start <= new.end);
        if first < last {
            let merged = ByteRange {
                start: new.start.min(ranges[first].start),
                end: new.end.max(ranges[last - 1].end),
            };
            self.ranges[first] = merged;
            let removed = last - first - 1;
            self.ranges.copy_within(last..self.n_ranges, first + 1);
            self.n_ranges -= removed;
        } else if self.n_ranges < N {
            self.ranges.copy_within(first..self.n_ranges, first + 1);
            self.ranges[first] = new;
            self.n_ranges += 1;
        } else {
            self.mark_whole_file();
        }
    }

    /// Records a size change (end-of-file or allocation set, supersede):
    /// bytes at and past `new_size` are gone, so ranges are clipped there.
    pub fn record_size(&mut self, new_size: u64) {
        self.size_changed = true;
        let kept = self.ranges[..self.n_ranges].partition_point(|range| range.start < new_size);
        self.n_ranges = kept;
        if let Some(last) = self.ranges[..kept].last_mut() {
            last.end = last.end.min(new_size);
        }
    }

    /// Gives up on ranges: the whole file must be compared.
    pub fn mark_whole_file(&mut self) {
        self.whole_file = true;
        self.n_ranges = 0;
    }

    /// The dirty ranges in increasing order; meaningless if [`Self::is_whole_file`].
    pub fn ranges(&self) -> &[ByteRange] {
        &self.ranges[..self.n_ranges]
    }

    /// The whole file must be compared.
    pub fn is_whole_file(&self) -> bool {
        self.whole_file
    }

    /// The size changed since the last [`Self::clear`].
    pub fn size_changed(&self) -> bool {
        self.size_changed
    }

    /// Nothing to resynchronize.
    pub fn is_clean(&self) -> bool {
        !self.whole_file && !self.size_changed && self.n_ranges == 0
    }

    /// Forgets everything, after the agent took the information.
    pub fn clear(&mut self) {
        *self = Self::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spans<const N: usize>(dirty: &DirtyRanges<N>) -> Vec<(u64, u64)> {
        dirty
            .ranges()
            .iter()
            .map(|range| (range.start, range.end))
            .collect()
    }

    #[test]
    fn overlapping_and_adjacent_writes_merge() {
        let mut dirty = DirtyRanges::<4>::new();
        dirty.record_write(100, 10);
        dirty.record_write(0, 10);
        dirty.record_write(10, 5); // touches [0, 10)
        dirty.record_write(105, 20); // overlaps [100, 110)
        assert_eq!(spans(&dirty), [(0, 15), (100, 125)]);
        dirty.record_write(14, 90); // bridges both
        assert_eq!(spans(&dirty), [(0, 125)]);
        assert!(!dirty.is_whole_file());
    }

    #[test]
    fn one_range_too_many_makes_the_whole_file_dirty() {
        let mut dirty = DirtyRanges::<2>::new();
        dirty.record_write(0, 1);
        dirty.record_write(10, 1);
        dirty.record_write(5, 1);
        assert!(dirty.is_whole_file());
        assert!(dirty.ranges().is_empty());
        // It stays so until the agent clears it.
        dirty.record_write(0, 1);
        assert!(dirty.is_whole_file());
        dirty.clear();
        assert!(dirty.is_clean());
    }

    #[test]
    fn truncation_clips_ranges_and_is_remembered() {
        let mut dirty = DirtyRanges::<4>::new();
        dirty.record_write(0, 10);
        dirty.record_write(20, 10);
        dirty.record_write(40, 10);
        dirty.record_size(25);
        assert_eq!(spans(&dirty), [(0, 10), (20, 25)]);
        assert!(dirty.size_changed());
        assert!(!dirty.is_clean());
    }

    #[test]
    fn empty_writes_change_nothing_and_huge_ones_are_clipped() {
        let mut dirty = DirtyRanges::<4>::new();
        dirty.record_write(7, 0);
        assert!(dirty.is_clean());
        dirty.record_write(u64::MAX - 1, 10);
        assert_eq!(spans(&dirty), [(u64::MAX - 1, u64::MAX)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u64),
        Size(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..200u64, 0..20u64).prop_map(|(offset, len)| Op::Write(offset, len)),
            1 => (0..220u64).prop_map(Op::Size),
        ]
    }

    /// Maximal runs of dirty bytes in a byte map.
    fn runs(bytes: &[bool]) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start = None;
        for (index, dirty) in bytes.iter().chain([&false]).enumerate() {
            match (start, *dirty) {
                (None, true) => start = Some(index as u64),
                (Some(first), false) => {
                    runs.push((first, index as u64));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    proptest! {
        /// Against a byte map: the ranges are exactly the dirty bytes' runs,
        /// unless more than `N` runs were ever needed, then the whole file is dirty.
        #[test]
        fn ranges_are_the_runs_of_dirty_bytes(ops in prop::collection::vec(op(), 0..40)) {
            const N: usize = 4;
            let mut dirty = DirtyRanges::<N>::new();
            let mut model = vec![false; 240];
            let mut overflowed = false;
            for op in &ops {
                match *op {
                    Op::Write(offset, len) => {
                        dirty.record_write(offset, len);
                        for byte in &mut model[offset as usize..(offset + len) as usize] {
                            *byte = true;
                        }
                    }
                    Op::Size(size) => {
                        dirty.record_size(size);
                        for byte in &mut model[size as usize..] {
                            *byte = false;
                        }
                    }
                }
                // Spilling happens on the write that needs one range too many.
                overflowed |= matches!(op, Op::Write(..)) && runs(&model).len() > N;
            }
            prop_assert_eq!(dirty.is_whole_file(), overflowed);
            if !overflowed {
                prop_assert_eq!(spans(&dirty), runs(&model));
            }
            let sized = ops.iter().any(|op| matches!(op, Op::Size(_)));
            prop_assert_eq!(dirty.size_changed(), sized);
        }
    }
}
