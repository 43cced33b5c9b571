//! Fence keys: a static 8-ary search index over a sorted key array, so
//! that finding the last key at most `x` touches one cache line per level
//! (about log8 n of them) instead of one per step of a binary search
//! (log2 n, all but the last three on different lines).
//!
//! A lookup under full ingest searches ~100 runs at once (in lockstep, so
//! that their cache misses overlap: [`last_at_most_each`]): first each
//! run's chunk (the run's `firsts`, up to a few thousand), then the head in
//! that chunk (up to 512). As binary searches that was up to 12 + 9
//! rounds; with fences it is 4 + 3. Measured (`docs/benchmarks.md`,
//! "Issue 13: a small compactor, fences"): the in-chunk search of the
//! slowest zipf lookups took ~20% less time, not the 3x fewer rounds,
//! since what it costs is lines touched per chunk (the `Chunk` itself,
//! two fence lines, the 8 heads of 40 bytes of the last block: ~8 where
//! the binary search touched ~9-10).
//!
//! Layout: for keys `base[0..n]`, level `k` (from the bottom, `k = 0`)
//! holds `base[j * 8^(k+1)]` for every `j` with `j * 8^(k+1) < n`. Levels
//! are added until one has at most 8 keys (the top, one line); `n <= 8`
//! has no levels. Each level is cut into lines of 8 keys, aligned to a
//! cache line, and the lines of all levels are stored top level first.
//! Entry `j` of level `k` is entry `8j` of level `k - 1` (of the base for
//! `k = 0`), so the line below entry `j` is line `j` of the level below.
//! The base itself is not copied: each user reads it in place.

/// Keys per line (and the fan-out of each level).
const FANOUT: usize = 8;
const FANOUT_BITS: u32 = FANOUT.trailing_zeros();

/// One cache line of keys.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
pub(crate) struct Line([u64; FANOUT]);

/// The fence levels of one sorted key array (module doc).
#[derive(Debug, Default)]
pub(crate) struct Fences {
    lines: Box<[Line]>,
}

/// Keys at level `k` of an array of `n`: every `8^(k+1)`-th.
fn level_keys(n: usize, k: u32) -> usize {
    let shift = FANOUT_BITS * (k + 1);
    if shift >= usize::BITS {
        return usize::from(n > 0);
    }
    n.div_ceil(1 << shift)
}

/// Number of levels over `n` keys: until one has at most 8.
fn levels(n: usize) -> u32 {
    let mut m = 0;
    let mut keys = n;
    while keys > FANOUT {
        keys = keys.div_ceil(FANOUT);
        m += 1;
    }
    m
}

impl Fences {
    /// The fences of `n` sorted keys, key `i` being `key(i)`.
    pub fn build(n: usize, key: impl Fn(usize) -> u64) -> Fences {
        let m = levels(n);
        let mut lines = Vec::new();
        for k in (0..m).rev() {
            let keys = level_keys(n, k);
            let stride = 1usize << (FANOUT_BITS * (k + 1));
            for l in 0..keys.div_ceil(FANOUT) {
                let mut line = [u64::MAX; FANOUT];
                for (i, slot) in line.iter_mut().enumerate() {
                    let j = l * FANOUT + i;
                    if j < keys {
                        *slot = key(j * stride);
                    }
                }
                lines.push(Line(line));
            }
        }
        Fences {
            lines: lines.into_boxed_slice(),
        }
    }

    pub fn lines(&self) -> *const Line {
        self.lines.as_ptr()
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.lines)
    }
}

/// A sorted key array with its fences, as a search reads it.
///
/// # Safety
///
/// `fence_lines` points to the lines of [`Fences::build`] over exactly the
/// `len()` keys that `key` gives, and `len()`, the keys and the lines stay
/// alive and unchanged while the implementor is borrowed; `key(i)` may be
/// called for any `i < len()`.
pub(crate) unsafe trait Fenced {
    /// Number of keys.
    fn len(&self) -> usize;
    /// The fence lines of [`Fences::build`] over the keys.
    fn fence_lines(&self) -> *const Line;
    /// Key `i`, for `i < len()`.
    fn key(&self, i: usize) -> u64;
}

/// Where one search stands: at fence level `level - 1` (`level == 0`: in
/// the base), in the line `block` of that level (for the base: keys
/// `8 * block ..`), whose level starts at line `offset`.
#[derive(Clone, Copy)]
struct Step {
    level: u32,
    block: usize,
    offset: usize,
    /// The index found (`Some`) or that there is none (`None`), once done.
    done: Option<Option<usize>>,
}

/// How many of the first `valid` keys are at most `x` (the keys are sorted,
/// so these are the first ones).
fn count_at_most(keys: impl Iterator<Item = u64>, valid: usize, x: u64) -> usize {
    keys.take(valid).map(|k| usize::from(k <= x)).sum()
}

/// For each array, the index of its last key at most `x` (`None`: every
/// key is greater, or the array is empty), appended to `out` in the order
/// of `arrays`. One line per array per round, all arrays in lockstep, so
/// that their cache misses overlap.
pub(crate) fn last_at_most_each<T: Fenced>(arrays: &[T], x: u64, out: &mut Vec<Option<usize>>) {
    let mut steps: Vec<Step> = arrays
        .iter()
        .map(|a| {
            let n = a.len();
            Step {
                level: levels(n),
                block: 0,
                offset: 0,
                done: (n == 0).then_some(None),
            }
        })
        .collect();
    loop {
        let mut stepped = false;
        for (a, s) in arrays.iter().zip(steps.iter_mut()) {
            if s.done.is_some() {
                continue;
            }
            stepped = true;
            let n = a.len();
            if s.level == 0 {
                let first = s.block * FANOUT;
                let valid = (n - first).min(FANOUT);
                let c = count_at_most((first..first + valid).map(|i| a.key(i)), valid, x);
                s.done = Some(c.checked_sub(1).map(|c| first + c));
                continue;
            }
            let k = s.level - 1;
            let keys = level_keys(n, k);
            // SAFETY: level `k`'s lines start at `offset` and number
            // `keys.div_ceil(8)`; `block` is one of them (0 at the top;
            // below, an entry index of the level above, which has one
            // entry per line of this level), all within the lines built
            // over `n` keys (`Fenced`'s contract).
            let line = unsafe { &*a.fence_lines().add(s.offset + s.block) };
            let valid = (keys - s.block * FANOUT).min(FANOUT);
            let c = count_at_most(line.0.iter().copied(), valid, x);
            if c == 0 {
                // Only at the top: below, the line's first key is the
                // entry chosen above, at most `x`.
                s.done = Some(None);
                continue;
            }
            s.block = s.block * FANOUT + c - 1;
            s.offset += keys.div_ceil(FANOUT);
            s.level = k;
        }
        if !stepped {
            break;
        }
    }
    out.extend(steps.iter().map(|s| s.done.flatten()));
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Keys {
        keys: Vec<u64>,
        fences: Fences,
    }

    impl Keys {
        fn new(keys: Vec<u64>) -> Keys {
            let fences = Fences::build(keys.len(), |i| keys[i]);
            Keys { keys, fences }
        }
    }

    // SAFETY: `fences` was built over `keys`, and neither changes.
    unsafe impl Fenced for &Keys {
        fn len(&self) -> usize {
            self.keys.len()
        }
        fn fence_lines(&self) -> *const Line {
            self.fences.lines()
        }
        fn key(&self, i: usize) -> u64 {
            self.keys[i]
        }
    }

    fn expected(keys: &[u64], x: u64) -> Option<usize> {
        keys.partition_point(|&k| k <= x).checked_sub(1)
    }

    /// Every size across level boundaries, every probe around every key:
    /// the fences find what a partition point finds.
    #[test]
    fn fences_find_the_last_key_at_most() {
        for n in [
            0, 1, 2, 7, 8, 9, 15, 16, 63, 64, 65, 100, 511, 512, 513, 4095, 4097,
        ] {
            let keys = Keys::new((0..n as u64).map(|i| 10 + 3 * i).collect());
            let mut probes: Vec<u64> = vec![0, 9, u64::MAX - 1, u64::MAX];
            for &k in &keys.keys {
                probes.extend([k - 1, k, k + 1]);
            }
            for x in probes {
                let mut out = Vec::new();
                last_at_most_each(&[&keys], x, &mut out);
                assert_eq!(out, vec![expected(&keys.keys, x)], "n {n} x {x}");
            }
        }
    }

    /// Many arrays of different depths searched at once: each answer is
    /// its own array's.
    #[test]
    fn lockstep_searches_answer_each_array() {
        let arrays: Vec<Keys> = [0usize, 5, 70, 600, 5000, 40000]
            .iter()
            .enumerate()
            .map(|(a, &n)| Keys::new((0..n as u64).map(|i| i * (a as u64 + 2)).collect()))
            .collect();
        let refs: Vec<&Keys> = arrays.iter().collect();
        for x in [0, 1, 3, 17, 999, 12345, 79_999, 80_000, 200_000, u64::MAX] {
            let mut out = Vec::new();
            last_at_most_each(&refs, x, &mut out);
            let want: Vec<_> = arrays.iter().map(|a| expected(&a.keys, x)).collect();
            assert_eq!(out, want, "x {x}");
        }
    }

    #[test]
    fn fences_are_about_one_key_in_seven() {
        let n = 512;
        let f = Fences::build(n, |i| i as u64);
        // 64 keys in 8 lines, then 8 keys in 1.
        assert_eq!(f.lines.len(), 9);
        assert_eq!(f.lines[0].0, [0, 64, 128, 192, 256, 320, 384, 448]);
        assert_eq!(f.lines[1].0[..2], [0, 8]);
    }
}
