//! Op stream generators for the ingest benchmark.
//!
//! Every stream is generated once, before timing, as one valid sequence
//! (it never drops a reference that is not held, never adds a second
//! reference of one key to a tree block, allocates before use), then dealt
//! round-robin to the ingest threads. Merging is commutative, so any
//! interleaving commits to the same extent tree without quarantine.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use refd_core::extent_tree::ExtentTree;
use refd_core::model::{Action, ExtentKind, Op, RefKey};

/// The workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Uniformly random extents among N, ±1 ops with full data/tree keys.
    Uniform,
    /// Zipf(0.99)-distributed extents among N.
    Zipf,
    /// Few extents (N/1000, at least 16) referenced from many roots: huge heads.
    SnapshotFanout,
    /// Sequential bytenr runs: reflink copies of file ranges added then
    /// removed.
    Reflink,
    /// Add/drop pairs on committed extents that merge away at insert.
    Cancel,
    /// A kernel btrfs capture (`--trace DIR` with before/trace .zst files):
    /// its ops parsed into memory first, then replayed as the load.
    BtrfsTrace,
}

/// Roots a data extent is shared between (snapshots/reflinks).
const ROOTS: u64 = 8;
/// First bytenr used.
const BASE: u64 = 1 << 30;

/// A generated stream: the initial tree and the ops.
#[derive(Debug)]
pub struct Stream {
    /// Extent tree the ops start from.
    pub tree: ExtentTree,
    /// The ops, in a valid order.
    pub ops: Vec<Op>,
}

fn bytenr(e: u64) -> u64 {
    BASE + e * 16384
}

/// The bytenr of extent `e` of the uniform and zipf walks (what `load`
/// looks up).
pub fn extent_bytenr(e: u64) -> u64 {
    bytenr(e)
}

fn key_of(e: u64, tree: bool, r: u64) -> RefKey {
    if tree {
        RefKey::TreeBlock { root: 5 + r }
    } else {
        RefKey::ExtentData {
            root: 5 + r,
            objectid: 257 + e % 4096,
            offset: (e / 4096) * 4096,
        }
    }
}

/// One extent in 8 is a tree block, the rest data.
fn is_tree(e: u64) -> bool {
    e % 8 == 7
}

fn op(e: u64, action: Action, r: u64) -> Op {
    let tree = is_tree(e);
    let (nb, kind) = if tree {
        (16384, ExtentKind::Tree { level: 0 })
    } else {
        (8192, ExtentKind::Data)
    };
    Op::new(bytenr(e), nb, kind, action, key_of(e, tree, r), 0).expect("generator builds valid ops")
}

/// How a [`Walk`] picks its next extent.
#[derive(Debug)]
enum Pick {
    Uniform(u64),
    Zipf(Zipf<f64>),
}

/// An endless stream of ±1 ops on extents picked uniformly or by Zipf,
/// valid in order: per extent a count per root (tree keys at most 1). A
/// walk may own every `stride`-th extent from `offset` only, so that
/// several walks (one per thread) are valid in any interleaving.
#[derive(Debug)]
pub struct Walk {
    rng: SmallRng,
    pick: Pick,
    /// Refs held per (extent, root); an extent is live while any is held
    /// (one cache line per op, not two).
    counts: Vec<u8>,
    stride: u64,
    offset: u64,
    /// The extent of the next op, drawn one op ahead so that its counts
    /// are prefetched while this op is ingested (uniform over a million
    /// extents, every op's counts are a cache miss otherwise).
    next_k: u64,
}

impl Walk {
    /// A walk of `workload` (uniform or zipf; `None` for the others) over
    /// the extents `offset + k × stride` for `k < extents`.
    pub fn new(
        workload: Workload,
        extents: u64,
        seed: u64,
        stride: u64,
        offset: u64,
    ) -> Option<Walk> {
        let extents = extents.max(1);
        let pick = match workload {
            Workload::Uniform => Pick::Uniform(extents),
            Workload::Zipf => Pick::Zipf(Zipf::new(extents, 0.99).expect("zipf parameters")),
            _ => return None,
        };
        let mut walk = Walk {
            rng: SmallRng::seed_from_u64(seed),
            pick,
            counts: vec![0u8; (extents * ROOTS) as usize],
            stride: stride.max(1),
            offset,
            next_k: 0,
        };
        walk.next_k = walk.pick_extent();
        Some(walk)
    }

    fn pick_extent(&mut self) -> u64 {
        match &self.pick {
            Pick::Uniform(n) => self.rng.gen_range(0..*n),
            Pick::Zipf(z) => z.sample(&mut self.rng) as u64 - 1,
        }
    }

    /// The next op.
    pub fn next_op(&mut self) -> Op {
        let k = self.next_k;
        self.next_k = self.pick_extent();
        #[cfg(target_arch = "x86_64")]
        {
            let ahead = &self.counts[(self.next_k * ROOTS) as usize];
            // SAFETY: a prefetch is only a hint: it never faults and reads
            // nothing the program sees; the address is in `counts` anyway.
            // SSE (`_mm_prefetch`'s feature) is part of the x86_64 baseline.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    (ahead as *const u8).cast(),
                )
            };
        }
        let e = self.offset + k * self.stride;
        let c = &mut self.counts[(k * ROOTS) as usize..((k + 1) * ROOTS) as usize];
        let r = self.rng.gen_range(0..ROOTS);
        if c.iter().all(|&x| x == 0) {
            c[r as usize] = 1;
            return op(e, Action::AddExtent, r);
        }
        let max = if is_tree(e) { 1 } else { 200 };
        if self.rng.gen_bool(0.55) && c[r as usize] < max {
            c[r as usize] += 1;
            return op(e, Action::AddRef, r);
        }
        // Drop a held ref (there is one: the extent is live).
        let start = self.rng.gen_range(0..ROOTS);
        let r = (0..ROOTS)
            .map(|i| (start + i) % ROOTS)
            .find(|&r| c[r as usize] > 0)
            .expect("a live extent holds a ref");
        c[r as usize] -= 1;
        op(e, Action::DropRef, r)
    }
}

fn random_walk(workload: Workload, extents: u64, ops: usize, seed: u64) -> Stream {
    let mut walk = Walk::new(workload, extents, seed, 1, 0).expect("a random-walk workload");
    Stream {
        tree: ExtentTree::new(),
        ops: (0..ops).map(|_| walk.next_op()).collect(),
    }
}

/// Generate `ops` ops of `workload` over `extents` extents.
pub fn generate(workload: Workload, extents: u64, ops: usize, seed: u64) -> Stream {
    match workload {
        Workload::Uniform | Workload::Zipf => random_walk(workload, extents, ops, seed),
        Workload::SnapshotFanout => snapshot_fanout(extents, ops, seed),
        Workload::Reflink => reflink(extents, ops, seed),
        Workload::Cancel => cancel(extents, ops, seed),
        Workload::BtrfsTrace => unreachable!("btrfs-trace streams are loaded with load_trace"),
    }
}

/// Load a kernel capture directory (`before.txt.zst`, `trace.txt.zst`):
/// the tree before and every op, parsed into memory before timing. The
/// tree blocks get the nodesize the dump's leaves show, also returned.
pub fn load_trace(dir: &std::path::Path) -> Result<(Stream, u64), String> {
    let (tree, stats) = refd_btrfs::dump::load_dump(
        dir.join("before.txt.zst"),
        &refd_btrfs::dump::DumpOptions::default(),
    )
    .map_err(|e| format!("{}: {e}", dir.join("before.txt.zst").display()))?;
    let trace = dir.join("trace.txt.zst");
    let mut reader = refd_btrfs::trace::TraceReader::open(&trace, Default::default())
        .map_err(|e| e.to_string())?;
    let ops = reader
        .ops()
        .map(|t| t.map(|t| t.op))
        .collect::<Result<Vec<Op>, _>>()
        .map_err(|e| format!("{}: {e}", trace.display()))?;
    Ok((Stream { tree, ops }, stats.nodesize))
}

/// Few extents, each referenced from up to 4096 snapshot roots (tree
/// blocks by TREE_BLOCK_REF, data by EXTENT_DATA_REF): heads with thousands
/// of refs.
fn snapshot_fanout(extents: u64, ops: usize, seed: u64) -> Stream {
    let n = (extents / 1000).max(16);
    let roots = 4096u64;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut held = vec![false; (n * roots) as usize];
    let mut out = Vec::with_capacity(ops);
    for e in 0..n {
        held[(e * roots) as usize] = true;
        out.push(fanout_op(e, Action::AddExtent, 0));
    }
    while out.len() < ops {
        let e = rng.gen_range(0..n);
        let r = rng.gen_range(1..roots);
        let h = &mut held[(e * roots + r) as usize];
        out.push(fanout_op(
            e,
            if *h { Action::DropRef } else { Action::AddRef },
            r,
        ));
        *h = !*h;
    }
    Stream {
        tree: ExtentTree::new(),
        ops: out,
    }
}

fn fanout_op(e: u64, action: Action, r: u64) -> Op {
    let tree = e.is_multiple_of(2);
    let (nb, kind, key) = if tree {
        (
            16384,
            ExtentKind::Tree { level: 1 },
            RefKey::TreeBlock { root: 256 + r },
        )
    } else {
        // 16 KiB like the tree blocks: extents are 16 KiB apart, and a
        // larger one would overlap its neighbours (refused by a commit).
        (
            16384,
            ExtentKind::Data,
            RefKey::ExtentData {
                root: 256 + r,
                objectid: 257,
                offset: e * 131072,
            },
        )
    };
    Op::new(bytenr(e), nb, kind, action, key, 0).expect("valid")
}

/// Reflink copies: a run of 64 consecutive extents gets a reference from a
/// new (root, inode) copy; later the copy is deleted. Extents are
/// allocated first.
fn reflink(extents: u64, ops: usize, seed: u64) -> Stream {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(ops);
    let data = |e: u64, action, root: u64, ino: u64| {
        Op::new(
            bytenr(e),
            16384,
            ExtentKind::Data,
            action,
            RefKey::ExtentData {
                root,
                objectid: ino,
                offset: e * 16384,
            },
            0,
        )
        .expect("valid")
    };
    let mut e = 0;
    while e < extents && out.len() < ops {
        out.push(data(e, Action::AddExtent, 5, 257));
        e += 1;
    }
    let mut copies: Vec<(u64, u64, u64)> = Vec::new(); // (start, root, ino)
    let mut next_ino = 1000u64;
    while out.len() < ops {
        if copies.len() < 64 && (copies.is_empty() || rng.gen_bool(0.5)) {
            let start = rng.gen_range(0..extents.saturating_sub(64).max(1));
            let root = 256 + rng.gen_range(0..16);
            next_ino += 1;
            for i in 0..64.min(extents) {
                out.push(data(start + i, Action::AddRef, root, next_ino));
            }
            copies.push((start, root, next_ino));
        } else {
            let k = rng.gen_range(0..copies.len());
            let (start, root, ino) = copies.swap_remove(k);
            for i in 0..64.min(extents) {
                out.push(data(start + i, Action::DropRef, root, ino));
            }
        }
    }
    out.truncate(ops);
    // Truncation may cut a copy in half: still valid (adds without drops).
    Stream {
        tree: ExtentTree::new(),
        ops: out,
    }
}

/// Committed extents each hold one ref; the ops add a ref of another root
/// and drop it again right after (same seq): every pair merges away.
fn cancel(extents: u64, ops: usize, seed: u64) -> Stream {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut tree = ExtentTree::new();
    for e in 0..extents {
        let mut item = refd_core::extent_tree::ExtentItem::new(8192, ExtentKind::Data, 1);
        item.add_ref(key_of(e, false, 0), 1);
        tree.insert(bytenr(e), item);
    }
    let mut out = Vec::with_capacity(ops);
    while out.len() + 1 < ops {
        let e = rng.gen_range(0..extents);
        let r = rng.gen_range(1..ROOTS);
        let mk = |a| {
            Op::new(bytenr(e), 8192, ExtentKind::Data, a, key_of(e, false, r), 0).expect("valid")
        };
        out.push(mk(Action::AddRef));
        out.push(mk(Action::DropRef));
    }
    Stream { tree, ops: out }
}

/// Deal ops to `threads` streams. With `by_bytenr`, an extent's ops stay in
/// one stream in order (needed for trace replay with verify); otherwise
/// round-robin.
pub fn deal(ops: &[Op], threads: usize, by_bytenr: bool) -> Vec<Vec<Op>> {
    let mut out: Vec<Vec<Op>> = (0..threads)
        .map(|_| Vec::with_capacity(ops.len() / threads + 1))
        .collect();
    for (i, op) in ops.iter().enumerate() {
        let t = if by_bytenr {
            refd_core::model::partition(op.bytenr, threads)
        } else {
            i % threads
        };
        out[t].push(*op);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::delayed::mutex::MutexStore;
    use refd_core::engine::Engine;

    /// Every generator produces a stream that commits without quarantine.
    #[test]
    fn streams_are_valid() {
        for w in [
            Workload::Uniform,
            Workload::Zipf,
            Workload::SnapshotFanout,
            Workload::Reflink,
            Workload::Cancel,
        ] {
            let s = generate(w, 2000, 20_000, 7);
            assert_eq!(s.ops.len(), 20_000, "{w:?}");
            let e = Engine::with_tree(MutexStore::new(), s.tree.clone(), 1);
            let mut h = e.handle().unwrap();
            for op in &s.ops {
                h.add(op).unwrap();
            }
            let r = e.commit();
            assert!(
                r.quarantined.is_empty(),
                "{w:?}: {:?}",
                r.quarantined.first()
            );
            // Items valid, and no extent overlaps another (an allocation
            // that would is refused).
            e.tree().check().unwrap();
        }
    }
}
