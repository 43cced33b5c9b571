//! Format, mount and recovery: the newest valid superblock, the B+tree,
//! the extent cache, the held heads, log replay, then a superblock that
//! claims the next generation.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::Duration;

use refd_core::delayed::DelayedRefStore;
use refd_core::engine::Engine;
use refd_core::extent_tree::ExtentTree;
use refd_core::head::{DelayedRef, Head};
use refd_ioring::btree::BTree;
use refd_ioring::format::RecoveryRecord;
use refd_ioring::format::LOG_BATCH_BYTES_MAX;
use refd_ioring::format::{
    pick_newest_decoded, BlockKind, FormatError, FsId, Layout, Superblock, SuperblockChoice,
    NODE_BYTES, SUPERBLOCK_BYTES, SUPERBLOCK_FLAG_CLEAN_UNMOUNT, SUPERBLOCK_REGION_BYTES,
    SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::log::{replay_with, LogError, RecoveryMode, RefLog, Replay};
use refd_ioring::{Storage, StorageError, BLOCK_BYTES};

use super::read::{count_extents, read_extent_count, read_held, scan_extents};
use super::service::load_service;
use super::{
    CommitState, CommitterFlags, DurableEngine, FormatOptions, OpenOptions, APPENDERS_MIN,
    LOG_BYTES_MIN_DEFAULT, LOG_DEVICE_FRACTION, NODE_REGION_NODES_MIN,
};
use crate::codec::service::SessionReply;
use crate::codec::{self, Record};
use crate::error::{FormatDeviceError, OpenError};
use crate::progress::{Progress, PROGRESS_CHECK_ITEMS};
use crate::service::Service;
use crate::stats::{CommitTotals, RecoveryInfo};

/// Extends `sb`'s node region to the end of a device of `device_bytes`
/// (whole nodes), and its recorded device size with it: the node region
/// is the layout's last region and its allocator hands out slots from a
/// high-water mark, so the slots past the old end are simply free. The
/// log region does not move. Returns the node region's old and new size
/// when it grew.
fn grow_node_region(sb: &mut Superblock, device_bytes: u64) -> Option<(u64, u64)> {
    let more = node_region_growable_bytes(sb, device_bytes);
    if more == 0 {
        return None;
    }
    let old = sb.node_region_bytes;
    sb.node_region_bytes += more;
    sb.geometry.size_bytes = device_bytes;
    Some((old, sb.node_region_bytes))
}

/// The bytes [`grow_node_region`] would add to `sb`'s node region on a
/// device of `device_bytes`: the whole nodes past its end. Less than a
/// node past it (the last bytes of a device whose size after the node
/// region's start is not a whole number of nodes) is not counted: no
/// grow can use it, so it is nothing to report.
fn node_region_growable_bytes(sb: &Superblock, device_bytes: u64) -> u64 {
    let node = NODE_BYTES as u64;
    (device_bytes.saturating_sub(sb.node_region_start) / node * node)
        .saturating_sub(sb.node_region_bytes)
}

/// Writes `sb` durably to its slot.
pub(super) fn write_superblock<S: Storage>(
    storage: &S,
    sb: &Superblock,
) -> Result<(), StorageError> {
    // Every superblock the engine writes was validated when it was built
    // from a valid one: a refused encode is a bug.
    let buf = sb
        .encode()
        .expect("a superblock derived from a valid one encodes");
    debug_assert_eq!(
        Superblock::decode(&buf, sb.addr()).as_ref().ok(),
        Some(sb),
        "the superblock decodes to what was encoded"
    );
    storage.write_durable(sb.addr(), &buf)
}

/// Read both superblock copies of `storage` and pick the newest valid one
/// (the choice also says which copies were rejected and why). A slot that
/// cannot be read is a rejected copy ([`FormatError::Unreadable`]), not a
/// failed open: one good copy is enough.
pub fn read_newest_superblock<S: Storage + ?Sized>(
    storage: &S,
) -> Result<SuperblockChoice, OpenError> {
    let device = storage.device_name().to_string();
    let read = |addr: u64| {
        let mut buf = vec![0u8; SUPERBLOCK_BYTES];
        match storage.read(addr, &mut buf) {
            Ok(()) => Superblock::decode(&buf, addr),
            Err(e) => Err(FormatError::Unreadable {
                what: BlockKind::Superblock,
                addr,
                error: e.to_string(),
            }),
        }
    };
    pick_newest_decoded([
        read(SUPERBLOCK_SLOT_ADDRS[0]),
        read(SUPERBLOCK_SLOT_ADDRS[1]),
    ])
    .map_err(|source| OpenError::NoSuperblock { device, source })
}

/// Seq barriers live in memory: none survives a crash, and the new
/// engine's barrier counter restarts at 0, so a recovered ref's seq would
/// hold it behind every new barrier until the counter passed it. Recovery
/// clears the seqs of requeued heads (their refs of one key then merge, as
/// they would at run time with no barrier) and of replayed ops.
fn forget_seq(head: &mut Head) {
    // One ref per key at seq 0: counts and drops summed over the seqs
    // (refs are sorted by key, then seq).
    let mut refs: Vec<DelayedRef> = Vec::with_capacity(head.refs.len());
    for r in &head.refs {
        match refs.last_mut() {
            Some(last) if last.key == r.key => {
                last.ref_mod += r.ref_mod;
                last.drops += r.drops;
            }
            _ => refs.push(DelayedRef { seq: 0, ..*r }),
        }
    }
    refs.retain(DelayedRef::is_kept);
    head.refs = refs;
}

/// Decodes every replayed record, in log order: ops are added to `engine`
/// (pending), SUBMIT batches too (and their replies kept by their
/// sessions), service records applied to `service`. Returns the ops
/// replayed. (Routing ops by bytenr to one worker per core was measured at
/// the same speed on this 2-core machine: the decoding reader is the
/// bound, so replay stays on one thread.)
fn replay_records<D: DelayedRefStore, S: Storage + ?Sized>(
    engine: &Engine<D>,
    service: &mut Service,
    (storage, sb): (&S, &Superblock),
    replayed: &refd_ioring::Replay,
    progress: &mut Progress,
    device: &str,
) -> Result<usize, OpenError> {
    let replay_error = |source| OpenError::Replay {
        device: device.to_string(),
        generation: sb.generation,
        source,
    };
    let refused = |lsn: u64| {
        move |source| OpenError::Refused {
            device: device.to_string(),
            lsn,
            source,
        }
    };
    let mut h = engine.handle().map_err(refused(0))?;
    let mut n: usize = 0;
    // Batch by batch: one read window of records in memory at a time.
    let mut records = replayed.stream(storage);
    while let Some(rec) = records.next_record().map_err(replay_error)? {
        if n > 0 && n.is_multiple_of(PROGRESS_CHECK_ITEMS) {
            progress.tick(|| format!("{device}: recovery: {n} log records replayed"));
        }
        let lsn = rec.lsn.get();
        let record = codec::decode_record(rec.data).map_err(|source| OpenError::Record {
            device: device.to_string(),
            lsn,
            source,
        })?;
        match record {
            Record::Op(mut op) => {
                op.seq = 0; // see `forget_seq`
                h.add(&op).map_err(refused(lsn))?;
                n += 1;
            }
            Record::Submit {
                session,
                request,
                mut ops,
            } => {
                ops.iter_mut().for_each(|op| op.seq = 0);
                h.add_batch(&ops).map_err(|(_, e)| refused(lsn)(e))?;
                let reply = SessionReply {
                    request,
                    lsn,
                    ops: ops.len() as u32,
                };
                service.record_submit(session, reply);
                n += ops.len();
            }
            Record::Register { session } => service.register_id(session),
            Record::Subscribe {
                consumer,
                name,
                acked,
            } => service.subscribe(consumer, &name, acked),
            Record::FreedAck {
                consumer,
                generation,
            } => service.ack(consumer, generation),
            Record::Unsubscribe { consumer } => service.unsubscribe(consumer),
        }
    }
    Ok(n)
}

impl<S: Storage + Clone> DurableEngine<S> {
    /// Writes a fresh file system on `storage`: both superblock copies
    /// (generations 1 and 2), an empty log and an empty tree. Destroys
    /// whatever the device held. Returns the newest superblock.
    pub fn format(storage: &S, options: FormatOptions) -> Result<Superblock, FormatDeviceError> {
        let geometry = storage.geometry();
        let device = storage.device_name().to_string();
        let block = BLOCK_BYTES as u64;
        let size = geometry.size_bytes / block * block;
        let layout_error = |reason: String| FormatDeviceError::Layout {
            device: device.clone(),
            reason,
        };
        let log_bytes = options.log_bytes.unwrap_or_else(|| default_log_bytes(size));
        let layout = format_layout(size, log_bytes).map_err(layout_error)?;
        let fs_id = match options.fs_id {
            Some(id) => id,
            None => FsId::generate().map_err(|source| FormatDeviceError::FsId {
                device: device.clone(),
                source,
            })?,
        };
        let mut sb = Superblock::empty(fs_id, geometry, layout);
        // A random chain seed: no batch of an earlier format of the device
        // (even with the same fs_id) chains to it.
        let seed = FsId::generate().map_err(|source| FormatDeviceError::FsId {
            device: device.clone(),
            source,
        })?;
        sb.log_head_chain = u32::from_le_bytes([seed.0[0], seed.0[1], seed.0[2], seed.0[3]]);
        sb.validate()
            .map_err(|source| FormatDeviceError::Superblock {
                device: device.clone(),
                source,
            })?;
        // Erase both slots first, durably, then write both copies: a
        // format interrupted after the erase leaves the new file system or
        // none, never the old one's superblock beside a new one (whose
        // higher generation `pick_newest` would prefer).
        storage
            .write_durable(0, &[0u8; SUPERBLOCK_REGION_BYTES as usize])
            .map_err(|source| FormatDeviceError::Write {
                device: device.clone(),
                addr: 0,
                source,
            })?;
        for generation in [1, 2] {
            sb.generation = generation;
            write_superblock(storage, &sb).map_err(|source| FormatDeviceError::Write {
                device: device.clone(),
                addr: sb.addr(),
                source,
            })?;
        }
        Ok(sb)
    }

    /// Mounts the device with the lock-free store (see
    /// [`DurableEngine::open_with_store`]).
    pub fn open(storage: S, options: OpenOptions) -> Result<(Self, RecoveryInfo), OpenError> {
        Self::open_with_store(storage, options)
    }
}

impl<S: Storage + Clone, D: DelayedRefStore + Default> DurableEngine<S, D> {
    /// Mounts: newest valid superblock, B+tree, up to
    /// [`OpenOptions::cache_extents_max`] extents into the core engine's
    /// cache, log replay (every replayed op becomes pending),
    /// `RefLog::open`, then a durable superblock that claims the next
    /// generation. Reads only until `RefLog::open`'s flush, so a crash
    /// during recovery recovers again from the same superblock.
    pub fn open_with_store(
        storage: S,
        options: OpenOptions,
    ) -> Result<(Self, RecoveryInfo), OpenError> {
        let device = storage.device_name().to_string();
        let choice = read_newest_superblock(&storage)?;
        let mut sb = choice.superblock;
        // Every size in the superblock was checked against the device
        // size it records; that must not exceed the real device.
        let device_bytes = storage.geometry().size_bytes;
        if sb.geometry.size_bytes > device_bytes {
            return Err(OpenError::Layout {
                device,
                reason: format!(
                    "superblock generation {} describes a {}-byte device, the device has {} \
                     bytes (truncated image, or the superblock of another device)",
                    sb.generation, sb.geometry.size_bytes, device_bytes
                ),
            });
        }
        let node_region_grown = if options.grow {
            grow_node_region(&mut sb, device_bytes)
        } else {
            None
        };
        let device_growable_bytes = node_region_growable_bytes(&sb, device_bytes);
        let tree =
            BTree::open_superblock(storage.clone(), &sb, options.tree).map_err(|source| {
                OpenError::Tree {
                    device: device.clone(),
                    generation: sb.generation,
                    source: Box::new(source),
                }
            })?;
        let bitmap_spare_nodes = tree.space().spare_nodes;
        let mut progress = Progress::new(options.progress.unwrap_or(|_| {}));
        let (cached, cache_complete) =
            warm_cache(&tree, &device, options.cache_extents_max, &mut progress)?;
        let extents_cached = cached.len();
        progress.tick(|| format!("{device}: recovery: reading the log"));
        let (replayed, mut dropped, superblock_lost) =
            replay_log(&storage, &sb, options.recovery_mode, &device)?;
        // A commit lost in the crash may have written nodes stamped
        // sb.generation + 1 (never more: commit g + 2 waits for g + 1's
        // superblock). Below, a durable superblock claims that generation,
        // so the next commit is claimed + 1, and so is the core engine's
        // (the generation stamped into extent items). Going on without a
        // lost newer superblock `l` (a recovery mode), commit `l + 1` may
        // have written nodes: the claim is `l + 1` then.
        let claimed_generation =
            superblock_lost.map_or(sb.generation, |l| l.max(sb.generation)) + 1;
        let mut engine = Engine::with_tree(D::default(), cached, claimed_generation);
        // Heads the last commit held (seq barrier) go back first: their ops
        // are older than every op in the log after the commit.
        let (mut held, held_chunks) = read_held(&tree, &device)?;
        held.iter_mut().for_each(forget_seq);
        let heads_held = held.len();
        let held_units = crate::space::held_units(&held);
        engine
            .requeue(held)
            .map_err(|source| OpenError::HeldRefused {
                device: device.clone(),
                generation: sb.generation,
                source,
            })?;
        if options.verify {
            // Before replay, so that the shadow checks every replayed op
            // against the committed tree plus the held heads.
            engine.enable_verify();
        }
        let mut service = Service::new(options.service);
        load_service(&tree, &device, &mut service)?;
        let (extents, extents_recorded) = match read_extent_count(&tree, &device)? {
            Some(n) => (n, true),
            // Not recorded: a tree written before the count was kept (or a
            // fresh one). Counted once here, recorded by the next commit.
            None if cache_complete => (extents_cached as u64, false),
            None => {
                progress.tick(|| format!("{device}: recovery: counting extents (not recorded)"));
                (count_extents(&tree, &device)?, false)
            }
        };
        service.set_committed(claimed_generation);
        let ops_replayed = replay_records(
            &engine,
            &mut service,
            (&storage, &sb),
            &replayed,
            &mut progress,
            &device,
        )?;
        let log = RefLog::open(storage.clone(), &sb, &replayed, options.log).map_err(|source| {
            OpenError::Log {
                device: device.clone(),
                source,
            }
        })?;
        let appenders_max = appenders_max(&log, &sb, options.log.batch_bytes_max, &device)?;
        // Claim sb.generation + 1 with a durable superblock that changes
        // nothing else, so every later commit's nodes have a generation no
        // lost write can carry (docs/btree.md caveat). The claim goes to
        // the other slot, never over the copy we recovered.
        // (A claim past sb.generation + 1 lands on the recovered copy's
        // slot: the other slot gets sb.generation + 1 first.)
        let mut claim = sb.clone();
        claim.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        if let Some(record) = dropped.as_mut() {
            // The operator's choice is recorded with the generation that
            // made it (the first claim); later superblocks carry it.
            record.generation = sb.generation + 1;
            claim.recovery = *record;
        }
        for generation in (sb.generation + 1..=claimed_generation)
            .filter(|&g| g == sb.generation + 1 || g == claimed_generation)
        {
            claim.generation = generation;
            write_superblock(&storage, &claim).map_err(|source| OpenError::WriteSuperblock {
                device: device.clone(),
                generation,
                addr: claim.addr(),
                source,
            })?;
        }
        // Batches opened from now on say that this superblock is durable
        // (their `txn_id`): see `newer_superblock`.
        log.set_txn_id(claimed_generation)
            .map_err(|source| OpenError::Log {
                device: device.clone(),
                source,
            })?;
        let info = RecoveryInfo {
            superblock_generation: sb.generation,
            superblock_slot: choice.slot,
            superblock_rejected: choice
                .rejected
                .iter()
                .map(|(slot, e)| format!("slot {slot}: {e}"))
                .collect(),
            extents_cached,
            ops_replayed,
            heads_held,
            replay: replayed.report().clone(),
            dropped,
            superblock_lost,
            claimed_generation: claim.generation,
            node_region_grown,
            device_growable_bytes,
            bitmap_spare_nodes,
        };
        let next_generation = claim.generation + 1;
        let engine = DurableEngine {
            storage,
            engine,
            log,
            tree,
            cut: RwLock::new(()),
            appenders: AtomicUsize::new(0),
            appenders_max,
            commit: Mutex::new(CommitState {
                sb: claim,
                next_generation,
                held_chunks,
                extents_recorded,
            }),
            totals: Mutex::new(CommitTotals::default()),
            failed: OnceLock::new(),
            inflight: RwLock::new(Arc::new(Vec::new())),
            cache_extents_max: options.cache_extents_max,
            cache_complete: AtomicBool::new(cache_complete),
            policy: Mutex::new(options.policy),
            pending_ops: AtomicU64::new(ops_replayed as u64),
            space: crate::space::Gate::default(),
            heads_held: AtomicU64::new(heads_held as u64),
            extents: AtomicU64::new(extents),
            trigger_ops: AtomicU64::new(options.policy.pending_ops_trigger),
            op_cost_ps: AtomicU64::new(0),
            dirty_bytes_per_op: AtomicU64::new(0),
            committer: Mutex::new(CommitterFlags::default()),
            committer_cv: Condvar::new(),
            stamp_order: Mutex::new(()),
            service: Mutex::new(service),
            service_cv: Condvar::new(),
            commit_hook: OnceLock::new(),
            generation: AtomicU64::new(claimed_generation),
            fs_id: sb.fs_id,
            throttled: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            paced: AtomicU64::new(0),
            paced_ns: AtomicU64::new(0),
        };
        engine.record_commit(0, Duration::ZERO, 0);
        // Replayed ops were acknowledged: reserved without a check (each
        // as if it were its own SUBMIT); the held heads (their stream and
        // their ops) are the next commit's to write.
        engine.space.committed(held_chunks as u64, held_units);
        engine
            .space
            .force(crate::space::Charge::units(2 * ops_replayed as u64));
        Ok((engine, info))
    }
}

/// Replays the log of `sb` in `mode`. A damaged log in strict mode is
/// [`OpenError::LogDamaged`] with the ops that going on would lose; in the
/// other modes, what was dropped becomes the superblock's recovery record
/// (its generation set by the caller).
pub(crate) fn replay_log<S: Storage + ?Sized>(
    storage: &S,
    sb: &Superblock,
    mode: RecoveryMode,
    device: &str,
) -> Result<(Replay, Option<RecoveryRecord>, Option<u64>), OpenError> {
    let replay_error = |source| OpenError::Replay {
        device: device.to_string(),
        generation: sb.generation,
        source,
    };
    let replayed = match replay_with(storage, sb, mode) {
        Ok(r) => r,
        Err(source @ LogError::Damaged { last, .. }) => {
            let ops_after = replay_with(storage, sb, RecoveryMode::SkipCorrupt)
                .and_then(|r| ops_in(storage, &r, last.get().saturating_add(1)))
                .unwrap_or(0);
            return Err(OpenError::LogDamaged {
                device: device.to_string(),
                generation: sb.generation,
                ops_after,
                source: Box::new(source),
            });
        }
        Err(source) => return Err(replay_error(source)),
    };
    let lost = newer_superblock(sb, &replayed);
    if let Some((newer_generation, lsn)) = lost {
        if mode == RecoveryMode::Strict {
            return Err(OpenError::SuperblockLost {
                device: device.to_string(),
                generation: sb.generation,
                newer_generation,
                lsn,
            });
        }
    }
    let Some(d) = replayed.report().dropped else {
        // Going on without a lost superblock drops nothing from the log,
        // but is the operator's choice: recorded all the same.
        let record = lost.map(|_| RecoveryRecord {
            generation: 0,
            mode: mode.record_code(),
            dropped_batches: 0,
            dropped_first_lsn: 0,
            dropped_last_lsn: 0,
            dropped_ops: 0,
        });
        return Ok((replayed, record, lost.map(|(g, _)| g)));
    };
    // The intact batches tolerate-tail dropped: count their ops.
    let dropped_ops = if d.intact_batches > 0 {
        replay_with(storage, sb, RecoveryMode::SkipCorrupt)
            .and_then(|r| ops_in(storage, &r, d.first.get()))
            .map_err(replay_error)?
    } else {
        0
    };
    let record = RecoveryRecord {
        generation: 0,
        mode: mode.record_code(),
        dropped_batches: u32::try_from(d.batches).unwrap_or(u32::MAX),
        dropped_first_lsn: d.first.get(),
        dropped_last_lsn: d.last.get(),
        dropped_ops,
    };
    Ok((replayed, Some(record), lost.map(|(g, _)| g)))
}

/// A superblock newer than `sb` that the log proves was durable: the engine
/// sets the log's `txn_id` to each superblock generation once that
/// superblock is durable (at open's claim and after each commit's
/// superblock write), so a replayed batch whose `txn_id` exceeds
/// `sb.generation` was opened after a newer superblock was durable.
/// `Some((newest generation named, LSN of the first batch naming one))`;
/// `None` when no replayed batch says so (see `docs/durable.md`, "A
/// rotten newest superblock", for what that does not rule out).
pub fn newer_superblock(sb: &Superblock, replayed: &Replay) -> Option<(u64, u64)> {
    let first = replayed
        .batches()
        .iter()
        .find(|b| b.txn_id > sb.generation)?;
    let newest = replayed.batches().iter().map(|b| b.txn_id).max()?;
    Some((newest, first.lsn.get()))
}

/// Ops in the records of `replayed` with an LSN of at least `from` (a
/// record that does not decode counts none; replay itself reports it),
/// read again from `storage` batch by batch ([`Replay::stream`]).
pub fn ops_in<S: Storage + ?Sized>(
    storage: &S,
    replayed: &Replay,
    from: u64,
) -> Result<u64, LogError> {
    let mut ops = 0u64;
    let mut records = replayed.stream(storage);
    while let Some(r) = records.next_record()? {
        if r.lsn.get() < from {
            continue;
        }
        ops += match codec::decode_record(r.data) {
            Ok(Record::Op(_)) => 1,
            Ok(Record::Submit { ops, .. }) => ops.len() as u64,
            _ => 0,
        };
    }
    Ok(ops)
}

/// Up to `max` committed extents into a new cache; true if that is all of
/// them.
fn warm_cache<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    max: usize,
    progress: &mut Progress,
) -> Result<(ExtentTree, bool), OpenError> {
    let mut cached = ExtentTree::new();
    let mut complete = true;
    scan_extents(tree, device, 0..=codec::EXTENT_BYTENR_MAX, |b, item| {
        if cached.len() >= max {
            complete = false;
            return ControlFlow::Break(());
        }
        cached.insert(b, item);
        if cached.len().is_multiple_of(PROGRESS_CHECK_ITEMS) {
            let n = cached.len();
            progress.tick(|| format!("{device}: recovery: {n} extents cached (bytenr {b})"));
        }
        ControlFlow::Continue(())
    })?;
    Ok((cached, complete))
}

/// The log region [`DurableEngine::format`] gives a device of
/// `size_bytes` (block-aligned) by default: 1/8 of it, at least
/// [`LOG_BYTES_MIN_DEFAULT`] when there is twice that, at most half of
/// what the superblocks leave.
pub fn default_log_bytes(size_bytes: u64) -> u64 {
    let block = BLOCK_BYTES as u64;
    let avail = size_bytes.saturating_sub(SUPERBLOCK_REGION_BYTES);
    (size_bytes / LOG_DEVICE_FRACTION)
        .max(LOG_BYTES_MIN_DEFAULT.min(avail / 2))
        .min(avail / 2)
        / block
        * block
}

/// The layout [`DurableEngine::format`] writes on a device of
/// `size_bytes` (a multiple of 4096) with a log of `log_bytes`: the
/// superblocks, the log right after them, and the node region in whole
/// nodes **ending at the device's end**. When what the log leaves is not
/// a whole number of nodes (on every size a multiple of 16 KiB it is 8
/// KiB short: the superblocks take 8 KiB), the rest, less than a node,
/// is padding between the log and the node region: the layout reaches
/// the device's end, so only a device extended since has bytes past it
/// (what `refd serve --grow` uses, and a start without it reports).
/// Errors (the reason) unless the log is at least two blocks, whole
/// blocks, and leaves room for [`NODE_REGION_NODES_MIN`] nodes.
pub fn format_layout(size_bytes: u64, log_bytes: u64) -> Result<Layout, String> {
    let block = BLOCK_BYTES as u64;
    let node = NODE_BYTES as u64;
    debug_assert!(size_bytes.is_multiple_of(block));
    if log_bytes < 2 * block || !log_bytes.is_multiple_of(block) {
        return Err(format!(
            "log of {log_bytes} bytes: need a multiple of {block}, at least {}",
            2 * block
        ));
    }
    let log_start = SUPERBLOCK_REGION_BYTES;
    let log_end = log_start.saturating_add(log_bytes);
    let node_region_bytes = size_bytes.saturating_sub(log_end) / node * node;
    if node_region_bytes < NODE_REGION_NODES_MIN * node {
        return Err(format!(
            "{size_bytes} bytes with a {log_bytes}-byte log leave {node_region_bytes} bytes for \
             nodes; need at least {NODE_REGION_NODES_MIN} nodes"
        ));
    }
    Ok(Layout {
        log_start,
        log_bytes,
        node_region_start: size_bytes - node_region_bytes,
        node_region_bytes,
    })
}

/// The smallest device (a multiple of 4096 bytes) whose default layout
/// ([`default_log_bytes`]) has a log of at least `log_bytes_min` bytes and
/// room for [`NODE_REGION_NODES_MIN`] nodes. Both grow with the size, so
/// a binary search over blocks finds it.
pub fn device_bytes_min_for_log(log_bytes_min: u64) -> u64 {
    let block = BLOCK_BYTES as u64;
    let node = NODE_BYTES as u64;
    let fits = |size: u64| {
        let log = default_log_bytes(size);
        let nodes = size.saturating_sub(SUPERBLOCK_REGION_BYTES + log) / node;
        log >= log_bytes_min && nodes >= NODE_REGION_NODES_MIN
    };
    // The answer is at most 8 × the log plus the superblocks and nodes.
    let (mut lo, mut hi) = (0u64, u64::MAX / block / 2);
    debug_assert!(fits(hi * block) || log_bytes_min > u64::MAX / 32);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if fits(mid * block) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo * block
}

/// Concurrent appends the log admits: each needs `2 × batch cap` bytes in
/// flight, and the log must leave room for a quarter of it in use.
/// Refused below [`APPENDERS_MIN`], saying what log, and so what device,
/// batches of up to `batch_bytes_max` (the configured cap) need.
fn appenders_max<S: Storage>(
    log: &RefLog<S>,
    sb: &Superblock,
    batch_bytes_max: usize,
    device: &str,
) -> Result<usize, OpenError> {
    let cap = log.batch_bytes_cap() as u64;
    let appenders_max = usize::try_from(sb.log_bytes / (4 * cap)).unwrap_or(usize::MAX);
    if appenders_max < APPENDERS_MIN {
        // The cap is also at most half the log: only a log of
        // `4 × APPENDERS_MIN` configured caps lifts it.
        let wanted = batch_bytes_max.min(LOG_BATCH_BYTES_MAX) as u64;
        let log_bytes_min = (4 * APPENDERS_MIN as u64)
            .saturating_mul(wanted)
            .next_multiple_of(BLOCK_BYTES as u64);
        return Err(OpenError::LogTooSmall {
            device: device.to_string(),
            log_bytes: sb.log_bytes,
            batch_bytes_max: wanted,
            log_bytes_min,
            device_bytes: sb.geometry.size_bytes,
            device_bytes_min: device_bytes_min_for_log(log_bytes_min),
        });
    }
    // Each admitted append claims one ingest shard of the lock-free store
    // for its engine add: admitting more appends than there are shards
    // would fail them with ShardsExhausted instead of waiting.
    Ok(appenders_max.min(refd_core::delayed::lockfree::SHARDS_DEFAULT))
}
