//! [`DurableEngine`]: the core delayed-ref [`Engine`] made durable by the
//! ref log and the copy-on-write B+tree. The ordering is the one of
//! `docs/log.md` ("Wiring commit and recovery") and `docs/btree.md`
//! ("Commit protocol"); `docs/durable.md` describes it end to end.
//!
//! Invariants:
//! - an op is in the core engine iff its record is in the log (both are
//!   done under the read side of the *cut lock*, so a commit's cut, taken
//!   under the write side, splits the ops exactly: LSN < cut ⇔ frozen);
//! - after every successful commit, the working B+tree holds exactly the
//!   encoding of the core engine's committed [`ExtentTree`]
//!   ([`DurableEngine::verify`] checks it);
//! - nothing is acknowledged after a failed write or flush: the first
//!   failure latches and every later call returns [`DurableError::Failed`].
//!
//! v1 limitation: the committed extent tree is held in memory in full (the
//! core engine runs heads against an in-memory [`ExtentTree`]); `open`
//! loads every extent item. Trees larger than memory need the core engine
//! to read items through the B+tree instead.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::engine::{CommitReport, Engine, EngineError, ExtentRefs, TreeRead};
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{Op, OpError};
use refd_ioring::btree::{BTree, BTreeError, Change, Key, TreeCheck, TreeConfig};
use refd_ioring::format::{
    pick_newest, FormatError, FsId, Layout, Superblock, SuperblockChoice, NODE_BYTES,
    SUPERBLOCK_BYTES, SUPERBLOCK_FLAG_CLEAN_UNMOUNT, SUPERBLOCK_REGION_BYTES,
    SUPERBLOCK_SLOT_ADDRS,
};
use refd_ioring::log::{replay, LogConfig, LogError, Lsn, RecoveryReport, RefLog};
use refd_ioring::{Storage, StorageError};

use crate::codec::{self, CodecError, ExtentLoader};

/// Default log region: this fraction of the device ...
pub const LOG_DEVICE_FRACTION: u64 = 8;
/// ... but at least this much when the device has twice that.
pub const LOG_BYTES_MIN_DEFAULT: u64 = 64 << 20;
/// Smallest node region accepted by [`DurableEngine::format`] (in nodes).
pub const NODE_REGION_NODES_MIN: u64 = 16;
/// Fewest concurrent appends a log must admit (see [`DurableEngine::add`]).
pub const APPENDERS_MIN: usize = 2;
const BLOCK: u64 = 4096;

/// Errors of the durable engine, with the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A device read or write outside the log and the tree.
    #[error("{context}: {source}")]
    Storage {
        /// What was being done (device, address).
        context: String,
        /// Cause.
        source: StorageError,
    },
    /// A superblock could not be encoded or no valid copy was found.
    #[error("{context}: {source}")]
    Format {
        /// What was being done.
        context: String,
        /// Cause.
        source: FormatError,
    },
    /// The ref log failed.
    #[error("{context}: {source}")]
    Log {
        /// What was being done.
        context: String,
        /// Cause.
        source: LogError,
    },
    /// The B+tree failed.
    #[error("{context}: {source}")]
    Tree {
        /// What was being done.
        context: String,
        /// Cause.
        source: BTreeError,
    },
    /// A replayed log record does not decode.
    #[error("log record at LSN {lsn}: {source}")]
    Record {
        /// LSN of its batch.
        lsn: u64,
        /// Cause.
        source: CodecError,
    },
    /// The extent items on disk do not decode, or an item does not encode.
    #[error("{context}: {source}")]
    Items {
        /// What was being done.
        context: String,
        /// Cause.
        source: CodecError,
    },
    /// The op is malformed (nothing was logged).
    #[error("op refused: {0}")]
    Op(#[from] OpError),
    /// The core engine refused the op (nothing was logged).
    #[error("core engine refused the op: {0}")]
    Engine(#[from] EngineError),
    /// The device cannot hold the requested layout.
    #[error("layout of {device}: {reason}")]
    Layout {
        /// Device.
        device: String,
        /// Why.
        reason: String,
    },
    /// On-disk and in-memory state disagree ([`DurableEngine::verify`]).
    #[error("inconsistent state: {reason}")]
    Inconsistent {
        /// What differs.
        reason: String,
    },
    /// A seq barrier is held: v1 cannot commit (nothing was changed;
    /// release the barrier and retry).
    #[error("{barriers} seq barriers held: the durable engine cannot commit held heads yet")]
    BarrierHeld {
        /// Barriers held.
        barriers: usize,
    },
    /// An earlier write or flush failed: nothing more is acknowledged;
    /// reopen the device (recovery replays the log).
    #[error("durable engine failed earlier, acknowledging nothing more: {first}")]
    Failed {
        /// The first failure.
        first: Arc<str>,
    },
}

/// Result of this crate.
pub type Result<T, E = DurableError> = std::result::Result<T, E>;

/// Layout choices for [`DurableEngine::format`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FormatOptions {
    /// Log region bytes (multiple of 4096). Default: 1/8 of the device, at
    /// least [`LOG_BYTES_MIN_DEFAULT`] when the device has twice that.
    pub log_bytes: Option<u64>,
    /// File system id. Default: random.
    pub fs_id: Option<FsId>,
}

/// Configuration of an opened engine.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// The ref log.
    pub log: LogConfig,
    /// The B+tree.
    pub tree: TreeConfig,
}

/// What [`DurableEngine::open`] found and did.
#[derive(Debug, Clone)]
pub struct RecoveryInfo {
    /// Generation of the superblock recovery started from.
    pub superblock_generation: u64,
    /// Its slot (0 or 1).
    pub superblock_slot: usize,
    /// Rejected superblock copies and why (normal after a torn write, or
    /// with a freshly formatted device's older copy).
    pub superblock_rejected: Vec<String>,
    /// Extent items loaded from the B+tree.
    pub extents_loaded: usize,
    /// Ops replayed from the log into the core engine (now pending).
    pub ops_replayed: usize,
    /// The log's replay report: where and why the log ended.
    pub replay: RecoveryReport,
    /// Generation written at open to claim any generation a lost commit
    /// may have used (see `docs/durable.md`, "Generations").
    pub claimed_generation: u64,
}

impl fmt::Display for RecoveryInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recovered from superblock generation {} (slot {}), {} extents, {} ops replayed, \
             claimed generation {}; log: {}",
            self.superblock_generation,
            self.superblock_slot,
            self.extents_loaded,
            self.ops_replayed,
            self.claimed_generation,
            self.replay
        )?;
        for r in &self.superblock_rejected {
            write!(f, "; rejected {r}")?;
        }
        Ok(())
    }
}

/// What one [`DurableEngine::commit`] did.
#[derive(Debug, Clone)]
pub struct CommitSummary {
    /// Superblock generation written (the commit point).
    pub generation: u64,
    /// The cut: every op with a lower LSN is in this commit.
    pub cut: Lsn,
    /// The core engine's report (heads run, freed extents, quarantine).
    pub core: CommitReport,
    /// B+tree item changes written.
    pub item_changes: usize,
    /// B+tree nodes written (including the free-space bitmap).
    pub nodes_written: u64,
}

/// An acknowledged-when-durable op: [`Ticket::wait`] returns once its log
/// record is on the media.
#[derive(Debug)]
pub struct Ticket<S: Storage>(refd_ioring::log::Ticket<S>);

impl<S: Storage> Ticket<S> {
    /// The LSN of the log batch holding the op.
    pub fn lsn(&self) -> Lsn {
        self.0.lsn()
    }

    /// Blocks until the op's record is durable.
    pub fn wait(&self) -> Result<Lsn> {
        self.0.wait().map_err(|source| DurableError::Log {
            context: format!("waiting for LSN {}", self.0.lsn().get()),
            source,
        })
    }

    /// True once the record is durable.
    pub fn is_durable(&self) -> bool {
        self.0.is_durable()
    }
}

#[derive(Debug)]
struct CommitState {
    /// The last durable superblock.
    sb: Superblock,
    /// Generation of the next commit.
    next_generation: u64,
}

/// The durable delayed-ref engine over storage `S` (a cheap handle such as
/// `Arc<SimStorage>` or `Arc<UringStorage>`: the log and the tree each keep
/// a clone).
pub struct DurableEngine<S: Storage + Clone> {
    storage: S,
    engine: Engine<LockFreeStore>,
    log: RefLog<S>,
    tree: BTree<S>,
    /// Read: ingest (append + add). Write: taking the cut and freezing.
    cut: RwLock<()>,
    /// Appends in flight (admission, see [`DurableEngine::add`]).
    appenders: AtomicUsize,
    appenders_max: usize,
    commit: Mutex<CommitState>,
    failed: Mutex<Option<Arc<str>>>,
}

impl<S: Storage + Clone> fmt::Debug for DurableEngine<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableEngine")
            .field("device", &self.storage.device_name())
            .field("failed", &self.failure())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn write_superblock<S: Storage>(storage: &S, sb: &Superblock) -> Result<()> {
    let buf = sb.encode().map_err(|source| DurableError::Format {
        context: format!("encode superblock generation {}", sb.generation),
        source,
    })?;
    storage
        .write_durable(sb.addr(), &buf)
        .map_err(|source| DurableError::Storage {
            context: format!(
                "{}: write superblock generation {} at {}",
                storage.device_name(),
                sb.generation,
                sb.addr()
            ),
            source,
        })
}

/// Read both superblock copies of `storage` and pick the newest valid one
/// (the choice also says which copies were rejected and why).
pub fn read_newest_superblock<S: Storage + ?Sized>(storage: &S) -> Result<SuperblockChoice> {
    let device = storage.device_name().to_string();
    let mut slots = [vec![0u8; SUPERBLOCK_BYTES], vec![0u8; SUPERBLOCK_BYTES]];
    for (addr, buf) in SUPERBLOCK_SLOT_ADDRS.iter().zip(slots.iter_mut()) {
        storage
            .read(*addr, buf)
            .map_err(|source| DurableError::Storage {
                context: format!("{device}: read superblock slot at {addr}"),
                source,
            })?;
    }
    pick_newest(&slots[0], &slots[1]).map_err(|source| DurableError::Format {
        context: format!("{device}: no valid superblock"),
        source,
    })
}

/// Load every extent item of a committed B+tree into an in-memory extent
/// tree (every item is decoded and checked).
pub fn load_extents<S: Storage>(tree: &BTree<S>, device: &str) -> Result<ExtentTree> {
    let mut loader = ExtentLoader::new();
    for item in tree.range(..) {
        let (key, value) = item.map_err(|source| DurableError::Tree {
            context: format!("{device}: load extent items"),
            source,
        })?;
        loader
            .push(&key, &value)
            .map_err(|source| DurableError::Items {
                context: format!(
                    "{device}: item ({} {} {})",
                    key.objectid, key.item_type, key.offset
                ),
                source,
            })?;
    }
    loader.finish().map_err(|source| DurableError::Items {
        context: format!("{device}: last extent item"),
        source,
    })
}

impl<S: Storage + Clone> DurableEngine<S> {
    /// Writes a fresh file system on `storage`: both superblock copies
    /// (generations 1 and 2), an empty log and an empty tree. Destroys
    /// whatever the device held. Returns the newest superblock.
    pub fn format(storage: &S, options: FormatOptions) -> Result<Superblock> {
        let geometry = storage.geometry();
        let device = storage.device_name().to_string();
        let size = geometry.size_bytes / BLOCK * BLOCK;
        let layout = |reason: String| DurableError::Layout {
            device: device.clone(),
            reason,
        };
        let avail = size.saturating_sub(SUPERBLOCK_REGION_BYTES);
        let log_bytes = match options.log_bytes {
            Some(b) => b,
            None => {
                (size / LOG_DEVICE_FRACTION)
                    .max(LOG_BYTES_MIN_DEFAULT.min(avail / 2))
                    .min(avail / 2)
                    / BLOCK
                    * BLOCK
            }
        };
        if log_bytes < 2 * BLOCK || log_bytes % BLOCK != 0 {
            return Err(layout(format!(
                "log of {log_bytes} bytes: need a multiple of 4096, at least 8192"
            )));
        }
        let log_start = SUPERBLOCK_REGION_BYTES;
        let node_region_start = log_start + log_bytes;
        let node = NODE_BYTES as u64;
        let node_region_bytes = size.saturating_sub(node_region_start) / node * node;
        if node_region_bytes < NODE_REGION_NODES_MIN * node {
            return Err(layout(format!(
                "{size} bytes with a {log_bytes}-byte log leave {node_region_bytes} bytes for \
                 nodes; need at least {NODE_REGION_NODES_MIN} nodes"
            )));
        }
        let fs_id = match options.fs_id {
            Some(id) => id,
            None => FsId::generate().map_err(|e| layout(format!("generate fs id: {e}")))?,
        };
        let mut sb = Superblock::empty(
            fs_id,
            geometry,
            Layout {
                log_start,
                log_bytes,
                node_region_start,
                node_region_bytes,
            },
        );
        sb.validate().map_err(|source| DurableError::Format {
            context: format!("{device}: new superblock"),
            source,
        })?;
        // Both copies, so no leftover of an earlier format is picked.
        write_superblock(storage, &sb)?;
        sb.generation = 2;
        write_superblock(storage, &sb)?;
        Ok(sb)
    }

    /// Mounts: newest valid superblock, B+tree, every extent item into the
    /// core engine's in-memory tree, log replay (every replayed op becomes
    /// pending), `RefLog::open`, then a durable superblock that claims the
    /// next generation. Reads only until `RefLog::open`'s flush, so a crash
    /// during recovery recovers again from the same superblock.
    pub fn open(storage: S, options: OpenOptions) -> Result<(Self, RecoveryInfo)> {
        let device = storage.device_name().to_string();
        let choice = read_newest_superblock(&storage)?;
        let sb = choice.superblock;
        let tree =
            BTree::open_superblock(storage.clone(), &sb, options.tree).map_err(|source| {
                DurableError::Tree {
                    context: format!(
                        "{device}: open B+tree of superblock generation {}",
                        sb.generation
                    ),
                    source,
                }
            })?;
        let extents = load_extents(&tree, &device)?;
        let extents_loaded = extents.len();
        let replayed = replay(&storage, &sb).map_err(|source| DurableError::Log {
            context: format!("{device}: replay from generation {}", sb.generation),
            source,
        })?;
        let engine = Engine::with_tree(LockFreeStore::new(), extents, sb.generation);
        let mut ops_replayed = 0;
        {
            let mut h = engine.handle()?;
            for rec in replayed.records() {
                let op = codec::decode_op(rec.data).map_err(|source| DurableError::Record {
                    lsn: rec.lsn.get(),
                    source,
                })?;
                h.add(&op)?;
                ops_replayed += 1;
            }
        }
        let log = RefLog::open(storage.clone(), &sb, &replayed, options.log).map_err(|source| {
            DurableError::Log {
                context: format!("{device}: open log"),
                source,
            }
        })?;
        let cap = log.batch_bytes_cap() as u64;
        let appenders_max = usize::try_from(sb.log_bytes / (4 * cap)).unwrap_or(usize::MAX);
        if appenders_max < APPENDERS_MIN {
            return Err(DurableError::Layout {
                device,
                reason: format!(
                    "log of {} bytes with batches up to {cap} bytes admits {appenders_max} \
                     concurrent appends, need {APPENDERS_MIN}: lower \
                     LogConfig::batch_bytes_max to at most {}",
                    sb.log_bytes,
                    sb.log_bytes / (4 * APPENDERS_MIN as u64)
                ),
            });
        }
        // Each admitted append claims one ingest shard of the lock-free
        // store for its engine add: admitting more appends than there are
        // shards would fail them with ShardsExhausted instead of waiting.
        let appenders_max = appenders_max.min(refd_core::delayed::lockfree::SHARDS_DEFAULT);
        // A commit lost in the crash may have written nodes stamped
        // sb.generation + 1 (never more: commit g + 2 waits for g + 1's
        // superblock). Claim that generation with a durable superblock that
        // changes nothing else, so every later commit's nodes have a
        // generation no lost write can carry (docs/btree.md caveat). The
        // claim goes to the other slot, never over the copy we recovered.
        let mut claim = sb.clone();
        claim.generation = sb.generation + 1;
        claim.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        write_superblock(&storage, &claim)?;
        let info = RecoveryInfo {
            superblock_generation: sb.generation,
            superblock_slot: choice.slot,
            superblock_rejected: choice
                .rejected
                .iter()
                .map(|(slot, e)| format!("slot {slot}: {e}"))
                .collect(),
            extents_loaded,
            ops_replayed,
            replay: replayed.report().clone(),
            claimed_generation: claim.generation,
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
            }),
            failed: Mutex::new(None),
        };
        Ok((engine, info))
    }

    /// The first failure, if the engine has failed (its own latch, the
    /// log's or the storage's).
    pub fn failure(&self) -> Option<Arc<str>> {
        if let Some(f) = lock(&self.failed).clone() {
            return Some(f);
        }
        if let Some(e) = self.log.failure() {
            return Some(format!("log: {e}").into());
        }
        self.storage
            .failure()
            .map(|f| format!("storage: {f}").into())
    }

    fn check_failed(&self) -> Result<()> {
        match self.failure() {
            Some(first) => Err(DurableError::Failed { first }),
            None => Ok(()),
        }
    }

    /// Latches `e` as the first failure (if none yet) and returns it.
    fn latch(&self, e: DurableError) -> DurableError {
        let mut f = lock(&self.failed);
        if f.is_none() {
            *f = Some(e.to_string().into());
        }
        e
    }

    /// Queues `op`: appends its record to the log and adds it to the core
    /// engine (visible to lookups at once). The op is acknowledged only
    /// when the returned ticket's [`Ticket::wait`] succeeds.
    ///
    /// Back-pressure: an append must never wait for log space while it
    /// holds the cut lock (the commit that would free the space needs the
    /// lock: deadlock). So an append proceeds only while the log has room
    /// for every append in flight (`2 × batch cap` each: a lap skip plus a
    /// batch), and at most [`DurableEngine::appenders_max`] run at once;
    /// otherwise the caller commits (or waits for the running commit) and
    /// retries.
    pub fn add(&self, op: &Op) -> Result<Ticket<S>> {
        self.check_failed()?;
        op.check()?;
        let record = codec::op_record(op);
        let per_append = 2 * self.log.batch_bytes_cap() as u64;
        loop {
            let ingest = self.cut.read().unwrap_or_else(|e| e.into_inner());
            let k = self.appenders.fetch_add(1, Ordering::SeqCst) + 1;
            let need = per_append * k as u64;
            if k <= self.appenders_max && self.log.free_bytes() >= need {
                let r = self.add_locked(op, &record);
                self.appenders.fetch_sub(1, Ordering::SeqCst);
                return r;
            }
            self.appenders.fetch_sub(1, Ordering::SeqCst);
            drop(ingest);
            if k > self.appenders_max {
                std::thread::yield_now();
            } else {
                self.make_room(need)?;
            }
        }
    }

    /// Engine add + log append, under the read side of the cut lock.
    fn add_locked(&self, op: &Op, record: &[u8]) -> Result<Ticket<S>> {
        // The engine first: it may refuse the op, and nothing may be logged
        // that the engine does not hold.
        self.engine.handle()?.add(op)?;
        match self.log.append(record) {
            Ok(t) => Ok(Ticket(t)),
            // The engine now holds an op that is not logged: fatal.
            Err(source) => Err(self.latch(DurableError::Log {
                context: format!("append {op}"),
                source,
            })),
        }
    }

    /// Commits unless another commit already left `need` bytes free.
    fn make_room(&self, need: u64) -> Result<()> {
        self.check_failed()?;
        let mut st = lock(&self.commit);
        if self.log.free_bytes() >= need {
            return Ok(());
        }
        self.commit_locked(&mut st).map(|_| ())
    }

    /// Concurrent appends admitted at once (`log_bytes / (4 × batch cap)`).
    pub fn appenders_max(&self) -> usize {
        self.appenders_max
    }

    /// [`DurableEngine::add`] and wait: returns once the op is durable.
    pub fn add_durable(&self, op: &Op) -> Result<Lsn> {
        let ticket = self.add(op)?;
        ticket.wait().map_err(|e| self.latch(e))
    }

    /// Checkpoint: every op added before the call becomes part of the
    /// on-disk extent tree and its log space is released. See
    /// `docs/durable.md` for the order of steps.
    pub fn commit(&self) -> Result<CommitSummary> {
        self.check_failed()?;
        let mut st = lock(&self.commit);
        self.commit_locked(&mut st)
    }

    fn commit_locked(&self, st: &mut CommitState) -> Result<CommitSummary> {
        self.check_failed()?;
        // Heads held back by a seq barrier are requeued in memory, but the
        // trim at the end of this commit would drop their log records: v1
        // refuses to commit while a barrier is held.
        let barriers = self.engine.barrier().active();
        if barriers > 0 {
            return Err(DurableError::BarrierHeld { barriers });
        }
        // 1. Cut + seal, atomically w.r.t. ingest: every op with an LSN
        // below the cut is in the sealed transaction, every later op in the
        // next one. Only this step (microseconds) holds the ingest lock;
        // merging and running the frozen heads does not stall ingest.
        let (cut, sealed) = {
            let _cut = self.cut.write().unwrap_or_else(|e| e.into_inner());
            (self.log.seal(), self.engine.seal())
        };
        let frozen = sealed.merge();
        // The tree changes only in commits, and this one holds the core
        // commit lock: these are the items before this commit.
        let before: Vec<(u64, Option<ExtentItem>)> = {
            let tree = self.engine.tree();
            frozen
                .heads()
                .iter()
                .map(|h| (h.bytenr, tree.get(h.bytenr).cloned()))
                .collect()
        };
        let core = self.engine.run_frozen(frozen);
        self.commit_tail(st, cut, before, core)
            .map_err(|e| self.latch(e))
    }

    fn commit_tail(
        &self,
        st: &mut CommitState,
        cut: Lsn,
        before: Vec<(u64, Option<ExtentItem>)>,
        core: CommitReport,
    ) -> Result<CommitSummary> {
        let device = self.storage.device_name();
        let generation = st.next_generation;
        if core.held > 0 {
            // A barrier was taken between the check and the freeze.
            return Err(DurableError::Inconsistent {
                reason: format!(
                    "commit {generation}: {} heads held by a seq barrier taken during the \
                     commit; their log records cannot be trimmed",
                    core.held
                ),
            });
        }
        // 2. Every record below the cut is durable.
        self.log
            .wait_for(cut.prev())
            .map_err(|source| DurableError::Log {
                context: format!("commit {generation}: wait for LSN {}", cut.prev().get()),
                source,
            })?;
        // 3. Tree nodes: the items of every extent that changed.
        let mut changes: Vec<(Key, Change)> = Vec::new();
        {
            let tree = self.engine.tree();
            let seen: BTreeSet<u64> = before.iter().map(|(b, _)| *b).collect();
            if let Some(f) = core.freed.iter().find(|f| !seen.contains(&f.bytenr)) {
                return Err(DurableError::Inconsistent {
                    reason: format!(
                        "commit {generation}: freed extent {} was not pending",
                        f.bytenr
                    ),
                });
            }
            for (bytenr, old) in &before {
                let new = tree.get(*bytenr);
                if old.as_ref() != new {
                    codec::diff_extent(*bytenr, old.as_ref(), new, &mut changes).map_err(
                        |source| DurableError::Items {
                            context: format!("commit {generation}: extent {bytenr}"),
                            source,
                        },
                    )?;
                }
            }
        }
        changes.sort_by_key(|c| c.0);
        let item_changes = changes.len();
        let tree_err = |what: &str| {
            let context = format!("{device}: commit {generation}: {what}");
            move |source| DurableError::Tree { context, source }
        };
        self.tree
            .apply_sorted(changes)
            .map_err(tree_err("apply item changes"))?;
        let info = self
            .tree
            .commit(generation)
            .map_err(tree_err("write nodes"))?;
        // 4. The superblock: the commit point.
        let mut sb = st.sb.clone();
        info.apply_to(&mut sb);
        let bounds = self.log.bounds(cut).map_err(|source| DurableError::Log {
            context: format!("commit {generation}: log bounds at cut {}", cut.get()),
            source,
        })?;
        bounds.apply_to(&mut sb);
        sb.generation = generation;
        sb.flags &= !SUPERBLOCK_FLAG_CLEAN_UNMOUNT;
        write_superblock(&self.storage, &sb)?;
        st.sb = sb;
        st.next_generation = generation + 1;
        // 5. Only now: the dropped nodes and the log space are reusable.
        self.tree
            .release_pending(generation)
            .map_err(tree_err("release dropped nodes"))?;
        self.log.trim(cut).map_err(|source| DurableError::Log {
            context: format!("commit {generation}: trim to {}", cut.get()),
            source,
        })?;
        Ok(CommitSummary {
            generation,
            cut,
            core,
            item_changes,
            nodes_written: info.nodes_written,
        })
    }

    /// Would-be reference count of `bytenr`: committed tree + pending ops.
    pub fn lookup_extent_ref(&self, bytenr: u64) -> ExtentRefs {
        self.engine.lookup_extent_ref(bytenr)
    }

    /// The committed extent tree (in memory; equal to the on-disk tree
    /// after every successful commit).
    pub fn tree(&self) -> TreeRead<'_> {
        self.engine.tree()
    }

    /// The core engine (lookups, pending store, quarantine).
    pub fn core(&self) -> &Engine<LockFreeStore> {
        &self.engine
    }

    /// The ref log (space: `used_bytes`, `free_bytes`; stats).
    pub fn log(&self) -> &RefLog<S> {
        &self.log
    }

    /// The on-disk B+tree.
    pub fn btree(&self) -> &BTree<S> {
        &self.tree
    }

    /// The last durable superblock.
    pub fn superblock(&self) -> Superblock {
        lock(&self.commit).sb.clone()
    }

    /// fsck: the in-memory tree's invariants, the B+tree's on-disk walk,
    /// and that the B+tree items decode to exactly the in-memory tree.
    /// Call between commits (it takes the commit lock).
    pub fn verify(&self) -> Result<TreeCheck> {
        let _st = lock(&self.commit);
        let tree = self.engine.tree();
        tree.check()
            .map_err(|(bytenr, e)| DurableError::Inconsistent {
                reason: format!("in-memory extent {bytenr}: {e}"),
            })?;
        let check = self.tree.check().map_err(|source| DurableError::Tree {
            context: "check".into(),
            source,
        })?;
        let mut loader = ExtentLoader::new();
        for item in self.tree.range(..) {
            let (key, value) = item.map_err(|source| DurableError::Tree {
                context: "verify: read items".into(),
                source,
            })?;
            loader
                .push(&key, &value)
                .map_err(|source| DurableError::Items {
                    context: "verify".into(),
                    source,
                })?;
        }
        let on_disk: ExtentTree = loader.finish().map_err(|source| DurableError::Items {
            context: "verify".into(),
            source,
        })?;
        if on_disk != *tree {
            let diff = tree
                .iter()
                .find(|(b, i)| on_disk.get(*b) != Some(*i))
                .map(|(b, _)| b)
                .or_else(|| {
                    on_disk
                        .iter()
                        .find(|(b, _)| tree.get(*b).is_none())
                        .map(|(b, _)| b)
                });
            return Err(DurableError::Inconsistent {
                reason: format!(
                    "B+tree holds {} extents, memory {}; first difference at {diff:?}",
                    on_disk.len(),
                    tree.len()
                ),
            });
        }
        Ok(check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::model::{Action, ExtentKind, RefKey};
    use refd_ioring::{FaultPlan, SimConfig, SimStorage};

    type Dev = Arc<SimStorage>;

    fn setup() -> (Dev, DurableEngine<Dev>) {
        let dev: Dev = Arc::new(SimStorage::new(SimConfig::new(8 << 20, 1)).unwrap());
        let sb = DurableEngine::format(
            &dev,
            FormatOptions {
                log_bytes: Some(1 << 20),
                fs_id: Some(FsId([7; 16])),
            },
        )
        .unwrap();
        assert_eq!(sb.generation, 2);
        let opts = OpenOptions {
            log: LogConfig {
                batch_bytes_max: 64 << 10,
                ..LogConfig::default()
            },
            ..OpenOptions::default()
        };
        let (e, info) = DurableEngine::open(Arc::clone(&dev), opts).unwrap();
        assert_eq!(
            (info.superblock_generation, info.claimed_generation),
            (2, 3)
        );
        (dev, e)
    }

    fn data(action: Action, objectid: u64) -> Op {
        Op::new(
            1 << 20,
            4096,
            ExtentKind::Data,
            action,
            RefKey::ExtentData {
                root: 5,
                objectid,
                offset: 0,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn commit_generations_and_barrier() {
        let (_dev, e) = setup();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        let guard = e.core().barrier().acquire();
        assert!(matches!(
            e.commit(),
            Err(DurableError::BarrierHeld { barriers: 1 })
        ));
        drop(guard);
        let s = e.commit().unwrap();
        assert_eq!(s.generation, 4, "one past the claimed generation");
        assert_eq!(e.superblock().generation, 4);
        assert_eq!(e.commit().unwrap().generation, 5);
        e.verify().unwrap();
        // A malformed op is refused before anything is logged.
        let mut bad = data(Action::AddRef, 2);
        bad.num_bytes = 0;
        assert!(matches!(e.add(&bad), Err(DurableError::Op(_))));
        assert!(e.failure().is_none());
    }

    #[test]
    fn a_failed_write_latches() {
        let (dev, e) = setup();
        e.add_durable(&data(Action::AddExtent, 1)).unwrap();
        dev.set_fault_plan(FaultPlan {
            write_eio_at: Some(1),
            ..FaultPlan::default()
        });
        assert!(e.add_durable(&data(Action::AddRef, 2)).is_err());
        assert!(e.failure().is_some());
        for r in [
            e.add(&data(Action::AddRef, 3)).map(|_| ()),
            e.commit().map(|_| ()),
        ] {
            assert!(matches!(r, Err(DurableError::Failed { .. })), "{r:?}");
        }
    }
}
