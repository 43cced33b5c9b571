//! The background work an op costs after its append, timed on synthetic
//! runs: the hand-off's run build (here from a copy of the staged ops'
//! words; the store's hand-off reads the buffer's atomics in place) and the
//! compactor's merge passes, each with and without prefetching ahead,
//! alternating in one process (`refd-bench merge`). Single-threaded, on
//! whatever core the caller runs; nothing here touches a store.

use std::time::Instant;

use super::packed::{
    build_run, encode, merge_cursors, set_prefetching, Chunk, Cursor, RunBuilder, Staged,
};
use crate::model::{Action, ExtentKind, Op, RefKey};

/// One shape of work, timed both ways.
#[derive(Clone, Debug)]
pub struct Timing {
    /// What was timed.
    pub shape: &'static str,
    /// Heads put out (a build: ops read) per timed pass.
    pub heads: usize,
    /// Whether every pass, both ways, put out that many (prefetching
    /// changes no result: false is a bug).
    pub heads_agree: bool,
    /// Nanoseconds per head (a build: per op), with prefetching, one per
    /// round.
    pub prefetch_ns: Vec<f64>,
    /// The same without prefetching.
    pub plain_ns: Vec<f64>,
}

/// Ops in one staging buffer (a hand-off's input).
const BUFFER_OPS: usize = 4096;

/// Fan-in of a compaction (`COMPACT_FANOUT`).
const FANOUT: usize = 8;

/// splitmix64: deterministic, no dependency.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A full staging buffer of the ingest benchmark's uniform walk, as staged:
/// ±1 ops on extents picked at random among `extents`, half data extents
/// (an EXTENT_DATA_REF from one of three roots), half tree blocks (a
/// TREE_BLOCK_REF from one of three roots).
fn buffer(state: &mut u64, extents: u64) -> Vec<Staged> {
    (0..BUFFER_OPS)
        .map(|_| {
            let e = next(state) % extents;
            let root = 5 + next(state) % 3;
            let (kind, key) = if e.is_multiple_of(2) {
                let key = RefKey::ExtentData {
                    root,
                    objectid: 257 + e % 100,
                    offset: e * 4096,
                };
                (ExtentKind::Data, key)
            } else {
                (ExtentKind::Tree { level: 0 }, RefKey::TreeBlock { root })
            };
            let action = if next(state).is_multiple_of(2) {
                Action::AddRef
            } else {
                Action::DropRef
            };
            let bytenr = (1 << 30) + e * 16384;
            let op = Op::new(bytenr, 16384, kind, action, key, 0).expect("a valid op");
            encode(&op, 0)
        })
        .collect()
}

/// Merge `runs` into one; returns it and the heads put out.
fn merge(runs: &[Vec<Chunk>]) -> (Vec<Chunk>, usize) {
    let mut b = RunBuilder::new();
    let cursors = runs
        .iter()
        .map(|r| Cursor::new(r.iter().collect()))
        .collect();
    merge_cursors(cursors, |m| b.push_merged(m));
    let heads = b.heads_total;
    (b.finish(), heads)
}

/// Times each shape `rounds` times with prefetching and `rounds` times
/// without, alternating (the order swapped every round), over `extents`
/// extents. `progress` is told each shape as it starts. Leaves
/// prefetching on.
///
/// The shapes: a hand-off's run build of one 4096-op buffer (64 buffers
/// per pass); merges of 8 runs of one hand-off each (8 merges per pass),
/// of 8 runs of 8 hand-offs each, and of all 64 hand-offs' runs at once
/// (the heap a commit's merge uses for more than 8 sources).
pub fn measure(extents: u64, rounds: usize, mut progress: impl FnMut(&str)) -> Vec<Timing> {
    let extents = extents.max(1);
    let mut state = 0x5EED;
    let buffers: Vec<Vec<Staged>> = (0..FANOUT * FANOUT)
        .map(|_| buffer(&mut state, extents))
        .collect();
    let level0: Vec<Vec<Chunk>> = buffers.iter().map(|b| build_run(b).finish()).collect();
    let level1: Vec<Vec<Chunk>> = level0.chunks(FANOUT).map(|g| merge(g).0).collect();

    type Pass<'a> = Box<dyn Fn() -> usize + 'a>;
    let shapes: Vec<(&'static str, Pass<'_>)> = vec![
        (
            "hand-off: build a run of 4096 staged ops",
            Box::new(|| {
                let mut ops = 0;
                for b in &buffers {
                    std::hint::black_box(build_run(b).finish());
                    ops += b.len();
                }
                ops
            }),
        ),
        (
            "compaction: merge 8 runs of 4096 ops",
            Box::new(|| level0.chunks(FANOUT).map(|g| merge(g).1).sum()),
        ),
        (
            "compaction: merge 8 runs of 32768 ops",
            Box::new(|| merge(&level1).1),
        ),
        (
            "commit: merge 64 runs of 4096 ops (heap)",
            Box::new(|| merge(&level0).1),
        ),
    ];
    let mut out = Vec::new();
    for (shape, pass) in &shapes {
        progress(shape);
        // One untimed pass each way first: allocator and caches warm.
        for on in [true, false] {
            set_prefetching(on);
            pass();
        }
        let mut t = Timing {
            shape,
            heads: 0,
            heads_agree: true,
            prefetch_ns: Vec::new(),
            plain_ns: Vec::new(),
        };
        for round in 0..rounds {
            for on in [round % 2 == 0, round % 2 != 0] {
                set_prefetching(on);
                let start = Instant::now();
                let heads = pass();
                let ns = start.elapsed().as_nanos() as f64 / heads.max(1) as f64;
                if t.prefetch_ns.is_empty() && t.plain_ns.is_empty() {
                    t.heads = heads;
                }
                t.heads_agree &= heads == t.heads;
                if on {
                    t.prefetch_ns.push(ns);
                } else {
                    t.plain_ns.push(ns);
                }
            }
        }
        out.push(t);
    }
    set_prefetching(true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delayed::packed::decode;
    use crate::head::Head;

    /// The timed passes put out what the shapes say, the same both ways:
    /// 64 × 4096 ops read by the builds; over 1000 extents, each merge of
    /// 8 or 64 buffers' runs (32,768 ops or more: every extent drawn) puts
    /// out each extent once.
    #[test]
    fn shapes_put_out_each_extent_once_per_merge() {
        let t = measure(1000, 2, |_| {});
        assert_eq!(t.len(), 4);
        assert!(t.iter().all(|t| t.heads_agree), "{t:?}");
        assert_eq!(t[1].heads, FANOUT * 1000);
        assert_eq!(t[2].heads, 1000);
        assert_eq!(t[3].heads, 1000);
        assert!(t
            .iter()
            .all(|t| t.prefetch_ns.len() == 2 && t.plain_ns.len() == 2));
        assert!(super::super::packed::prefetching());
    }

    fn heads_of(run: &[Chunk]) -> Vec<Head> {
        let mut out = Vec::new();
        for c in run {
            for i in 0..c.len() {
                let h = c.head(i).to_head();
                if !h.is_noop() {
                    out.push(h);
                }
            }
        }
        out
    }

    /// A merge with and without prefetching gives the heads of a naive
    /// fold of every op, through both paths of `merge_cursors`: the linear
    /// minimum (8 sources) and the heap (64).
    #[test]
    fn merges_agree_with_a_fold_of_the_ops_both_ways() {
        let mut state = 7;
        let buffers: Vec<Vec<Staged>> = (0..FANOUT * FANOUT)
            .map(|_| buffer(&mut state, 3000))
            .collect();
        let runs: Vec<Vec<Chunk>> = buffers.iter().map(|b| build_run(b).finish()).collect();
        for sources in [&runs[..FANOUT], &runs[..]] {
            let ops = sources.len() * BUFFER_OPS;
            let mut want: std::collections::BTreeMap<u64, Head> = Default::default();
            for w in buffers.iter().take(sources.len()).flatten() {
                let (op, stamp) = decode(w);
                want.entry(op.bytenr)
                    .and_modify(|h| h.absorb(&op, stamp))
                    .or_insert_with(|| Head::of_op(&op, stamp));
            }
            let mut want = crate::delayed::merge_heads(want.into_values().collect());
            want.retain(|h| !h.is_noop());
            for on in [true, false] {
                set_prefetching(on);
                let (merged, _) = merge(sources);
                assert_eq!(heads_of(&merged), want, "{ops} ops, prefetch {on}");
            }
            set_prefetching(true);
        }
    }
}
