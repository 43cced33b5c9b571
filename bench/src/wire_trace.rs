//! `refd-bench load --workload btrfs-trace`: a kernel capture replayed
//! through a refd daemon over the wire, and the daemon's answers compared
//! with the kernel's own result, as `refctl btrfs replay` does in-process.
//!
//! 1. The capture's `before` dump goes in through SUBMIT: per extent an
//!    `ADD_EXTENT` of its first backref (with the `FULL_BACKREF`
//!    extent_op where the kernel's item has it), then an `ADD_REF` per
//!    further reference; then a COMMIT. Not timed.
//! 2. The trace (the measured part): its ops in trace order, routed by
//!    bytenr to `--clients` connections (so an extent's ops keep their
//!    order), SUBMITs of `--batch` ops, each waiting until durable. An
//!    allocation waits until every earlier drop of an extent its range
//!    meets, sent on another connection, is answered: the order a client
//!    has (its free is acknowledged before it allocates the range again),
//!    without which a daemon commit in between refuses the allocation as
//!    overlapping a live extent (churn-1 with commits every 5 ms: 622
//!    mismatches without the wait, 0 with it; the waits cost throughput:
//!    218-273k against 925k ops/s in that setting). The
//!    kernel's tree-mod-log seqs go through the barrier requests: the
//!    first op of a new kernel seq acquires a barrier, whose seq the ops
//!    of that kernel seq then carry, so commits in between keep them
//!    pending as btrfs keeps refs newer than a held seq; at most
//!    [`BARRIERS_HELD_MAX`] are held (the oldest released first), all
//!    are released at the end. Before an allocation whose range meets an
//!    earlier drop, the barriers that would hold that drop are released:
//!    the kernel reuses a range only after the transaction that freed it
//!    committed, and no seq outlives a transaction (without this, racy-1
//!    ended with 4-127 extents wrong: its drops held across daemon
//!    commits left live extents that refused the reallocations, which
//!    the daemon now logs at WARN). Then a COMMIT.
//! 3. Every extent of the kernel's `after` dump, and every bytenr the
//!    dump or the trace named, is read back with BACKREFS (all pages):
//!    the extents the daemon has are compared with `after` extent by
//!    extent (`refd_btrfs::compare`: size, kind and level, refs, the
//!    multiset of backrefs, `FULL_BACKREF`); an extent of the daemon's
//!    that `after` does not have counts as a mismatch too. Every extent
//!    the daemon holds came from the dump or the trace, so this is the
//!    whole tree. And the daemon's extent count (STATS `engine.extents`,
//!    what its commits keep) must have grown by exactly the extents of
//!    `after` since the start (a mismatch otherwise). Exact match
//!    required.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::time::Instant;

use refd_btrfs::compare::compare;
use refd_client::{Client, SubmitOptions};
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{
    partition, Action, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF,
};
use refd_proto::{ErrorCode, WireOp, BACKREFS_KIND_UNKNOWN, KIND_DATA, KIND_TREE_BLOCK};
use refd_sync::fanout::Fanout;

use crate::hist::Kind;
use crate::load::{summarize, Endpoint, LoadArgs, LoadReport, Local, Tally};

/// Barriers the replay holds at once (a session may hold 64).
pub const BARRIERS_HELD_MAX: usize = 8;
/// Batches queued per connection before the dispatcher waits.
const QUEUE_BATCHES: usize = 16;
/// Mismatches printed on stderr (all are counted).
const MISMATCHES_SHOWN: usize = 10;

/// Runs the capture at `--trace` against the daemon `to`.
pub(crate) fn run(a: &LoadArgs, to: &Endpoint) -> Result<LoadReport, String> {
    let dir = a
        .trace
        .as_deref()
        .ok_or("btrfs-trace needs --trace DIR (a capture: before, trace and after .txt.zst)")?;
    if a.hlog.is_some() {
        return Err("--hlog is for the timed workloads, not btrfs-trace".into());
    }
    let (stream, nodesize) = crate::workload::load_trace(dir)?;
    let after_path = dir.join("after.txt.zst");
    let (after, _) = refd_btrfs::dump::load_dump(
        &after_path,
        // The same filesystem: its leaves must show the same nodesize.
        &refd_btrfs::dump::DumpOptions {
            nodesize: Some(nodesize),
        },
    )
    .map_err(|e| format!("{}: {e}", after_path.display()))?;
    let connect = || to.client("refd-bench");
    let control = connect()?;
    let extents_at_start = stats_u64(&control, "engine", "extents")?;
    let batch = a.batch.min(control.hello().submit_ops_max as usize).max(1);
    submit_all(&control, &before_ops(&stream.tree)?, batch)?;
    control
        .commit()
        .map_err(|e| format!("COMMIT after before: {e}"))?;
    if !a.json {
        eprintln!(
            "btrfs-trace: {} extents of before loaded; replaying {} ops",
            stream.tree.len(),
            stream.ops.len()
        );
    }
    let commits_before = commits(&control)?;
    let tally = Tally::new();
    tally.measuring.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    replay(a, &connect, &control, &stream.ops, batch, &tally)?;
    let started = Instant::now();
    control.commit().map_err(|e| format!("final COMMIT: {e}"))?;
    let mut local = Local::new();
    tally.answered(Kind::Commit, 0, started, started, &mut local);
    tally.merge(&local);
    tally.measuring.store(false, Ordering::SeqCst);
    let measured = t0.elapsed().as_secs_f64();
    let touched: BTreeSet<u64> = stream
        .tree
        .iter()
        .map(|(b, _)| b)
        .chain(stream.ops.iter().map(|o| o.bytenr))
        .chain(after.iter().map(|(b, _)| b))
        .collect();
    let got = read_back(&connect, &touched, a.clients)?;
    let mut mismatches: Vec<String> = compare(&after, &got)
        .iter()
        .map(ToString::to_string)
        .collect();
    let counted = stats_u64(&control, "engine", "extents")?.wrapping_sub(extents_at_start);
    if counted != after.len() as u64 {
        mismatches.push(format!(
            "extent count: the daemon's STATS count grew by {counted}, the kernel's after dump \
             has {} extents",
            after.len()
        ));
    }
    if !a.json {
        for m in mismatches.iter().take(MISMATCHES_SHOWN) {
            eprintln!("btrfs-trace mismatch: {m}");
        }
    }
    let commits = commits(&control)? - commits_before;
    let mut report = summarize(a, &tally, measured, false)?;
    report.pipeline = 1;
    report.commits = commits;
    report.extents = after.len() as u64;
    report.mismatches = Some(mismatches.len() as u64);
    Ok(report)
}

/// The daemon's commits so far (STATS).
fn commits(c: &Client) -> Result<u64, String> {
    stats_u64(c, "commits", "count")
}

/// A number of the daemon's STATS object: `section.field`.
fn stats_u64(c: &Client, section: &str, field: &str) -> Result<u64, String> {
    let json = c.stats().map_err(|e| format!("STATS: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| format!("STATS: {e}"))?;
    v[section][field]
        .as_u64()
        .ok_or_else(|| format!("STATS: no {section}.{field}"))
}

/// The ops that build `tree` from nothing, extent by extent.
fn before_ops(tree: &ExtentTree) -> Result<Vec<WireOp>, String> {
    let mut out = Vec::new();
    for (bytenr, item) in tree.iter() {
        let mut first = true;
        for (key, count) in item.backrefs() {
            for _ in 0..count {
                let action = if first {
                    Action::AddExtent
                } else {
                    Action::AddRef
                };
                let mut op = Op::new(bytenr, item.num_bytes, item.kind, action, key, 0)
                    .map_err(|e| format!("before: extent {bytenr}: {e}"))?;
                if first && item.full_backref() && !item.kind.is_data() {
                    op.extent_op = Some(ExtentOp {
                        flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                        key: None,
                    });
                }
                first = false;
                out.push(refd::ops::wire(&op));
            }
        }
    }
    Ok(out)
}

/// SUBMITs of `ops` in order, `batch` at a time, each waited for.
fn submit_all(c: &Client, ops: &[WireOp], batch: usize) -> Result<(), String> {
    for chunk in ops.chunks(batch) {
        c.submit(chunk, SubmitOptions::default())
            .map_err(|e| format!("SUBMIT: {e}"))?;
    }
    Ok(())
}

/// The kernel's tree-mod-log seqs mapped to barriers of the daemon.
struct Barriers<'a> {
    control: &'a Client,
    /// Kernel seq → the daemon's seq of the barrier acquired for it.
    seqs: BTreeMap<u64, u64>,
    /// Barriers held (id, the daemon's seq), oldest (lowest seq) first.
    held: VecDeque<(u64, u64)>,
    acquired: u64,
}

impl Barriers<'_> {
    /// The daemon's seq for kernel seq `seq` (0 stays 0).
    fn map(&mut self, seq: u64) -> Result<u64, String> {
        if seq == 0 {
            return Ok(0);
        }
        if let Some(&d) = self.seqs.get(&seq) {
            return Ok(d);
        }
        let r = self
            .control
            .barrier_acquire()
            .map_err(|e| format!("BARRIER_ACQUIRE: {e}"))?;
        self.acquired += 1;
        self.seqs.insert(seq, r.seq);
        self.held.push_back((r.barrier_id, r.seq));
        if self.held.len() > BARRIERS_HELD_MAX {
            self.release_oldest()?;
        }
        Ok(r.seq)
    }

    /// Releases every barrier that holds an op of daemon seq `seq` (those
    /// of a seq at or below it).
    fn release_through(&mut self, seq: u64) -> Result<(), String> {
        while self.held.front().is_some_and(|&(_, s)| s <= seq) {
            self.release_oldest()?;
        }
        Ok(())
    }

    fn release_oldest(&mut self) -> Result<(), String> {
        let Some((id, _)) = self.held.pop_front() else {
            return Ok(());
        };
        match self.control.barrier_release(id) {
            // A lease that ran out released it already.
            Err(e) if e.code() != Some(ErrorCode::BarrierUnknown) => {
                Err(format!("BARRIER_RELEASE: {e}"))
            }
            _ => Ok(()),
        }
    }
}

/// The trace's ops through `clients` connections; barriers through
/// `control`.
fn replay(
    a: &LoadArgs,
    connect: &(dyn Fn() -> Result<Client, String> + Sync),
    control: &Client,
    ops: &[Op],
    batch: usize,
    tally: &Tally,
) -> Result<(), String> {
    let clients = a.clients.max(1);
    let mut barriers = Barriers {
        control,
        seqs: BTreeMap::new(),
        held: VecDeque::new(),
        acquired: 0,
    };
    // SUBMITs each connection has had answered.
    let answered: Vec<AtomicU64> = (0..clients).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| -> Result<(), String> {
        let mut senders = Vec::with_capacity(clients);
        let mut workers = Vec::with_capacity(clients);
        for done in &answered {
            let (tx, rx) = sync_channel::<Vec<WireOp>>(QUEUE_BATCHES);
            let client = connect()?;
            senders.push(tx);
            workers.push(s.spawn(move || submit_worker(&client, &rx, tally, done)));
        }
        let mut fanout = Fanout::new(senders, batch);
        let mut frees = Frees::default();
        let mut failed = None;
        for op in ops {
            let mut w = refd::ops::wire(op);
            match barriers.map(op.seq) {
                Ok(seq) => w.seq = seq,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            let t = partition(op.bytenr, clients);
            if op.action == Action::AddExtent {
                // Every earlier drop of an extent this allocation's range
                // meets is answered first, as a client's free is before it
                // allocates the range again: else a daemon commit between
                // the two refuses the allocation (it overlaps a live
                // extent).
                for (u, n) in frees.before(op.bytenr, op.num_bytes, t) {
                    if n > fanout.sent(u) {
                        // A failed worker's error is returned below.
                        fanout.flush(u);
                    }
                    while answered[u].load(Ordering::Acquire) < n.min(fanout.sent(u))
                        && !workers[u].is_finished()
                    {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                }
                // The kernel reuses a range only once the transaction that
                // freed it committed, and no tree-mod-log seq outlives a
                // transaction: the barriers that would hold those drops
                // back are gone by then. Here one barrier stands for a
                // kernel seq for the whole replay, so release those that
                // hold a drop this allocation's range meets (else the
                // drop waits past a daemon commit that refuses the
                // allocation: it overlaps the still-live extent).
                let seq = frees.seq_meeting(op.bytenr, op.num_bytes);
                if seq > 0 {
                    if let Err(e) = barriers.release_through(seq) {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if op.action == Action::DropRef {
                frees.record(op.bytenr, op.num_bytes, t, fanout.sent(t) + 1, w.seq);
            }
            if !fanout.push(t, w) {
                break; // the worker failed: its error is returned below
            }
        }
        if failed.is_none() {
            fanout.finish();
        } else {
            drop(fanout); // the workers end without the rest
        }
        for w in workers {
            w.join().map_err(|_| "a replay connection panicked")??;
        }
        failed.map_or(Ok(()), Err)
    })?;
    while !barriers.held.is_empty() {
        barriers.release_oldest()?;
    }
    if !a.json && barriers.acquired > 0 {
        eprintln!(
            "btrfs-trace: {} kernel seqs, {} barriers acquired",
            barriers.seqs.len(),
            barriers.acquired
        );
    }
    Ok(())
}

/// The drops the replay has dispatched, by bytenr: size, connection, and
/// the number of that connection's batch that carries it (the last drop
/// of each bytenr).
#[derive(Debug, Default)]
struct Frees {
    /// Bytenr → (size, connection, batch number, the daemon's seq).
    drops: BTreeMap<u64, (u64, usize, u64, u64)>,
    /// The largest size recorded: how far below a range a drop can start
    /// and still meet it.
    bytes_max: u64,
}

impl Frees {
    fn record(&mut self, bytenr: u64, num_bytes: u64, client: usize, batch_no: u64, seq: u64) {
        self.drops
            .insert(bytenr, (num_bytes, client, batch_no, seq));
        self.bytes_max = self.bytes_max.max(num_bytes);
    }

    /// The drops (of any connection) whose extent meets
    /// `[bytenr, bytenr + num_bytes)`.
    fn meeting(
        &self,
        bytenr: u64,
        num_bytes: u64,
    ) -> impl Iterator<Item = &(u64, usize, u64, u64)> + '_ {
        let from = bytenr.saturating_sub(self.bytes_max);
        let end = bytenr.saturating_add(num_bytes);
        self.drops
            .range(from..end)
            .filter(move |&(&b, &(n, ..))| b.saturating_add(n) > bytenr)
            .map(|(_, d)| d)
    }

    /// The highest daemon seq of the drops meeting the range (0: none).
    fn seq_meeting(&self, bytenr: u64, num_bytes: u64) -> u64 {
        self.meeting(bytenr, num_bytes)
            .map(|&(.., s)| s)
            .max()
            .unwrap_or(0)
    }

    /// `(connection, batch number)` of the drops of other connections than
    /// `client` whose extent meets `[bytenr, bytenr + num_bytes)`.
    fn before(&self, bytenr: u64, num_bytes: u64, client: usize) -> Vec<(usize, u64)> {
        self.meeting(bytenr, num_bytes)
            .filter(|&&(_, c, ..)| c != client)
            .map(|&(_, c, k, _)| (c, k))
            .collect()
    }
}

/// One connection of the replay: each batch a SUBMIT, waited for, then
/// counted in `done`.
fn submit_worker(
    c: &Client,
    rx: &Receiver<Vec<WireOp>>,
    tally: &Tally,
    done: &AtomicU64,
) -> Result<(), String> {
    let mut local = Local::new();
    let result = rx.iter().try_for_each(|ops| {
        let start = Instant::now();
        c.submit(&ops, SubmitOptions::default())
            .map_err(|e| format!("SUBMIT: {e}"))?;
        done.fetch_add(1, Ordering::Release);
        tally.answered(Kind::Submit, ops.len() as u64, start, start, &mut local);
        Ok(())
    });
    tally.merge(&local);
    result
}

/// BACKREFS of every bytenr in `bytenrs` (from `threads` connections): the
/// extents the daemon has, as an extent tree.
fn read_back(
    connect: &(dyn Fn() -> Result<Client, String> + Sync),
    bytenrs: &BTreeSet<u64>,
    threads: usize,
) -> Result<ExtentTree, String> {
    let all: Vec<u64> = bytenrs.iter().copied().collect();
    let per = all.len().div_ceil(threads.max(1)).max(1);
    let parts = std::thread::scope(|s| {
        let handles: Vec<_> = all
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || -> Result<Vec<(u64, ExtentItem)>, String> {
                    let c = connect()?;
                    let mut out = Vec::new();
                    for &b in chunk {
                        if let Some(item) = extent_of(&c, b)? {
                            out.push((b, item));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a BACKREFS reader panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    let mut tree = ExtentTree::new();
    for (b, item) in parts.into_iter().flatten() {
        tree.insert(b, item);
    }
    Ok(tree)
}

/// The daemon's extent at `bytenr` as an [`ExtentItem`] (`None`: it has
/// none). A backref the item cannot hold (an unknown type, a count of 0
/// or less) is an error: the daemon answered something no extent is.
fn extent_of(c: &Client, bytenr: u64) -> Result<Option<ExtentItem>, String> {
    let b = c
        .backrefs(bytenr)
        .map_err(|e| format!("BACKREFS {bytenr}: {e}"))?;
    let kind = match b.kind {
        BACKREFS_KIND_UNKNOWN if b.refs == 0 && b.entries.is_empty() => return Ok(None),
        KIND_DATA => ExtentKind::Data,
        KIND_TREE_BLOCK => ExtentKind::Tree { level: b.level },
        other => {
            return Err(format!(
                "BACKREFS {bytenr}: kind {other} with refs {}",
                b.refs
            ))
        }
    };
    let mut item = ExtentItem::new(b.num_bytes, kind, 0);
    for e in &b.entries {
        let key = RefKey::from_words(e.ref_type, e.k1, e.k2, e.k3)
            .ok_or_else(|| format!("BACKREFS {bytenr}: backref type {}", e.ref_type))?;
        if e.count <= 0 {
            return Err(format!("BACKREFS {bytenr}: {key:?} count {}", e.count));
        }
        item.add_ref(key, e.count);
    }
    item.refs = u64::try_from(b.refs).map_err(|_| format!("BACKREFS {bytenr}: refs {}", b.refs))?;
    item.flags |= b.item_flags & BLOCK_FLAG_FULL_BACKREF;
    Ok(Some(item))
}
