//! `refctl format`, `refctl fsck`, `refctl dump`: a refd device (a raw
//! block device or a file) opened through io_uring with O_DIRECT.
//!
//! fsck and dump only read: they never open the device for writing through
//! the durable engine (whose recovery writes a superblock), so they can be
//! run on a device that needs recovery, and say what recovery would replay.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;

use refd_btrfs::export::DumpWriter;
use refd_durable::codec::EXTENT_BYTENR_MAX;
use refd_durable::codec::{decode_record, Record};
pub use refd_durable::progress::Progress;
use refd_durable::progress::PROGRESS_CHECK_ITEMS;
use refd_durable::{
    newer_superblock, ops_in, read_extent_count, read_held, read_newest_superblock, read_service,
    scan_extents, DurableEngine, FormatOptions, OpenOptions,
};
use refd_ioring::btree::{BTree, TreeCheck, TreeConfig, TreeSpace};
use refd_ioring::format::{Superblock, RECOVERY_MODE_NONE};
use refd_ioring::log::{replay_with, LogError, RecoveryMode};
use refd_ioring::{replay, Device, FileAllocation, UringConfig, UringStorage};

/// Problems reported in full (all are counted).
pub const PROBLEMS_SHOWN_MAX: usize = 100;

type Dev = Arc<UringStorage>;

fn open(path: &Path) -> Result<Dev, String> {
    UringStorage::open(path, 0, UringConfig::default())
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// Parse a size like `64M`, `2G`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (K, M, G, T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: not a number"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?}: too large"))
}

/// What `format` did.
#[derive(Debug)]
pub struct Formatted {
    /// The new superblock.
    pub superblock: Superblock,
    /// The file was created.
    pub created: bool,
}

/// Format `path` (creating a file of `size` if it does not exist). An
/// existing refd file system is only overwritten with `force`.
pub fn format(
    path: &Path,
    size: Option<u64>,
    log_bytes: Option<u64>,
    force: bool,
) -> Result<Formatted, String> {
    let created = !path.exists();
    let storage: Dev = if created {
        let size = size.ok_or_else(|| {
            format!(
                "{} does not exist: give --size to create it",
                path.display()
            )
        })?;
        let device =
            Device::create_file(path, size, FileAllocation::Reserve).map_err(|e| e.to_string())?;
        Arc::new(
            UringStorage::new(device, UringConfig::default())
                .map_err(|e| format!("{}: io_uring setup: {e}", path.display()))?,
        )
    } else {
        if size.is_some() {
            return Err(format!(
                "{} exists: --size only creates new files",
                path.display()
            ));
        }
        open(path)?
    };
    if !force {
        if let Ok(choice) = read_newest_superblock(&storage) {
            return Err(format!(
                "{} holds a refd file system (superblock generation {}): use --force to overwrite it",
                path.display(),
                choice.superblock.generation
            ));
        }
    }
    let superblock = DurableEngine::format(
        &storage,
        FormatOptions {
            log_bytes,
            fs_id: None,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Formatted {
        superblock,
        created,
    })
}

/// The node region's allocator as `refd serve` would open it: its
/// nodes, the bitmap run's and the spare windows' (`docs/btree.md`,
/// "Allocator"). Spare windows live in memory only; these are the ones
/// an open picks from the committed bitmap.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct NodeRegion {
    /// Nodes (16 KiB slots) of the node region.
    pub region_nodes: u64,
    /// Free after the open picked its spare windows.
    pub free_nodes: u64,
    /// Nodes of a free-space bitmap run (`K`), the size of each spare
    /// window.
    pub bitmap_run_nodes: u64,
    /// Nodes of the spare windows.
    pub spare_nodes: u64,
    /// No spare window (no `K` consecutive free slots: a region
    /// fragmented before spares existed): the "NO SPARE WINDOW" fallback,
    /// bitmap runs go first fit and may fail with `NoSpace`.
    pub no_spare_window: bool,
}

impl NodeRegion {
    fn of(space: &TreeSpace) -> NodeRegion {
        NodeRegion {
            region_nodes: space.region_nodes,
            free_nodes: space.free_nodes,
            bitmap_run_nodes: space.run_nodes,
            spare_nodes: space.spare_nodes,
            no_spare_window: space.run_first_fit,
        }
    }
}

impl std::fmt::Display for NodeRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node region {} nodes, {} free; bitmap run {} nodes, spare windows {} nodes",
            self.region_nodes, self.free_nodes, self.bitmap_run_nodes, self.spare_nodes
        )?;
        if self.no_spare_window {
            f.write_str(
                " (NO SPARE WINDOW: no run's worth of consecutive free nodes, bitmap runs go \
                 first fit and may fail with NoSpace)",
            )?;
        }
        Ok(())
    }
}

/// What fsck found.
#[derive(Debug, Default, serde::Serialize)]
pub struct FsckReport {
    /// Device path.
    pub device: String,
    /// Newest valid superblock generation.
    pub generation: u64,
    /// Its slot.
    pub slot: usize,
    /// Superblock copies rejected, with why.
    pub rejected_superblocks: Vec<String>,
    /// The node region's allocator as an open picks it (all zero when
    /// the tree cannot be opened).
    #[serde(flatten)]
    pub node_region: NodeRegion,
    /// Nodes walked.
    pub tree_nodes: u64,
    /// Tree levels.
    pub tree_levels: u8,
    /// B+tree items.
    pub tree_items: u64,
    /// Extents (extent items, counted by the scan).
    pub extents: usize,
    /// The extent count the tree records (`null`: not recorded, a device
    /// no commit of this build has written yet); a problem if it differs
    /// from `extents`.
    pub extents_recorded: Option<u64>,
    /// Sum of refs.
    pub refs: u64,
    /// Heads the last commit held back (seq barrier), pending on disk.
    pub held_heads: usize,
    /// Log batches that replay would apply.
    pub log_batches: usize,
    /// Log records that replay would apply.
    pub log_records: usize,
    /// Ops in them.
    pub log_ops: usize,
    /// Client sessions kept (exactly-once SUBMIT replies).
    pub sessions: usize,
    /// Freed-list consumers.
    pub consumers: usize,
    /// Freed lists kept.
    pub freed_lists: usize,
    /// Freed extents kept.
    pub freed_extents: u64,
    /// Where and why log replay stops.
    pub log_end: String,
    /// The superblock's record of an earlier recovery that dropped log
    /// batches by an operator's choice (empty: none).
    pub recovery_record: String,
    /// Everything wrong (at most [`PROBLEMS_SHOWN_MAX`]).
    pub problems: Vec<String>,
    /// Count of problems.
    pub problem_count: usize,
}

impl FsckReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < PROBLEMS_SHOWN_MAX {
            self.problems.push(p);
        }
    }

    /// True when nothing is wrong.
    pub fn clean(&self) -> bool {
        self.problem_count == 0
    }
}

/// A device opened read-only: storage, newest superblock, and the tree when
/// it could be opened.
struct Loaded {
    storage: Dev,
    sb: Superblock,
    tree: Option<BTree<Dev>>,
}

/// Open the newest superblock and the tree, read only. Problems found on
/// the way are recorded in `report`.
fn load(path: &Path, report: &mut FsckReport) -> Result<Loaded, String> {
    let storage = open(path)?;
    report.device = path.display().to_string();
    let choice = read_newest_superblock(&storage).map_err(|e| e.to_string())?;
    for (slot, why) in &choice.rejected {
        report
            .rejected_superblocks
            .push(format!("slot {slot}: {why}"));
    }
    let sb = choice.superblock;
    report.generation = sb.generation;
    report.slot = choice.slot;
    let r = &sb.recovery;
    if r.mode != RECOVERY_MODE_NONE {
        report.recovery_record = format!(
            "superblock generation {} recovered with mode {} and dropped log batches lsn \
             {}..={} ({} batches, {} acknowledged ops of intact batches)",
            r.generation,
            r.mode,
            r.dropped_first_lsn,
            r.dropped_last_lsn,
            r.dropped_batches,
            r.dropped_ops
        );
    }
    let tree = match BTree::open_superblock(storage.clone(), &sb, TreeConfig::default()) {
        Ok(t) => Some(t),
        Err(e) => {
            report.problem(format!("extent tree of generation {}: {e}", sb.generation));
            None
        }
    };
    Ok(Loaded { storage, sb, tree })
}

/// Check a device: superblocks, every tree node (checksum, address, key
/// order, generation, no node referenced twice, allocator agreement), every
/// extent (refs = sum of backrefs, counts, kinds, no extent starting inside
/// an extent before it) and the log (what
/// recovery would replay, every record decodable). Streams the extents:
/// memory does not grow with the tree.
pub fn fsck(path: &Path, progress: &mut Progress) -> Result<FsckReport, String> {
    let mut report = FsckReport::default();
    let Loaded { storage, sb, tree } = load(path, &mut report)?;
    if let Some(tree) = tree {
        report.node_region = NodeRegion::of(&tree.space());
        progress.tick(|| "checking every tree node".to_string());
        match tree.check() {
            Ok(TreeCheck {
                nodes,
                levels,
                items,
                ..
            }) => {
                report.tree_nodes = nodes;
                report.tree_levels = levels;
                report.tree_items = items;
            }
            Err(e) => report.problem(format!("extent tree: {e}")),
        }
        let (mut extents, mut refs) = (0usize, 0u64);
        let mut prev: Option<(u64, u64)> = None;
        // Extents starting inside the one before (damage: refd refuses an
        // allocation that overlaps a live extent), and the first of them.
        let (mut overlaps, mut first_overlap) = (0u64, None);
        let scanned = scan_extents(&tree, &report.device, 0..=EXTENT_BYTENR_MAX, |b, item| {
            extents += 1;
            refs += item.refs;
            if let Some((p, n)) = prev.filter(|&(p, n)| p.saturating_add(n) > b) {
                overlaps += 1;
                first_overlap.get_or_insert((b, p, n));
            }
            if prev.is_none_or(|(p, n)| b.saturating_add(item.num_bytes) > p.saturating_add(n)) {
                prev = Some((b, item.num_bytes));
            }
            if extents.is_multiple_of(PROGRESS_CHECK_ITEMS) {
                progress.tick(|| format!("checked {extents} extents (bytenr {b})"));
            }
            ControlFlow::Continue(())
        });
        report.extents = extents;
        report.refs = refs;
        if let Err(e) = scanned {
            report.problem(e.to_string());
        }
        if let Some((b, p, n)) = first_overlap {
            report.problem(format!(
                "extent {b}: starts inside the extent at {p} ({n} bytes); \
                 {overlaps} extent(s) start inside an extent before them"
            ));
        }
        match read_extent_count(&tree, &report.device) {
            Ok(recorded) => {
                report.extents_recorded = recorded;
                if let Some(n) = recorded.filter(|&n| n != extents as u64) {
                    report.problem(format!(
                        "extent count: the tree records {n} extents, it has {extents}"
                    ));
                }
            }
            Err(e) => report.problem(e.to_string()),
        }
        match read_held(&tree, &report.device) {
            Ok((heads, _)) => report.held_heads = heads.len(),
            Err(e) => report.problem(e.to_string()),
        }
        match read_service(&tree, &report.device) {
            Ok(s) => {
                report.sessions = s.sessions;
                report.consumers = s.consumers.len();
                report.freed_lists = s.freed_lists;
                report.freed_extents = s.freed_extents;
            }
            Err(e) => report.problem(e.to_string()),
        }
    }
    progress.tick(|| "reading the log".to_string());
    match replay(&*storage, &sb) {
        Ok(r) => {
            report.log_batches = r.batches().len();
            report.log_end = r.report().to_string();
            if let Some((newer, lsn)) = newer_superblock(&sb, &r) {
                report.problem(format!(
                    "newer superblock lost: log batch {lsn} was written after superblock                      generation {newer} was durable, but the newest readable copy is generation                      {}: open refuses (go on from this copy only with `refctl recover --mode                      tolerate-tail|skip-corrupt`)",
                    sb.generation
                ));
            }
            let mut records = r.stream(&*storage);
            loop {
                let rec = match records.next_record() {
                    Ok(Some(rec)) => rec,
                    Ok(None) => break,
                    Err(e) => {
                        report.problem(format!("log: {e}"));
                        break;
                    }
                };
                report.log_records += 1;
                if report.log_records.is_multiple_of(PROGRESS_CHECK_ITEMS) {
                    let n = report.log_records;
                    progress.tick(|| format!("decoded {n} log records"));
                }
                match decode_record(rec.data) {
                    Ok(Record::Op(_)) => report.log_ops += 1,
                    Ok(Record::Submit { ops, .. }) => report.log_ops += ops.len(),
                    Ok(_) => {}
                    Err(e) => report.problem(format!("log record at LSN {}: {e}", rec.lsn.get())),
                }
            }
        }
        Err(e @ LogError::Damaged { last, .. }) => {
            // What going on would lose: the ops of the intact batches
            // after the damage.
            let after = replay_with(&*storage, &sb, RecoveryMode::SkipCorrupt)
                .and_then(|r| ops_in(&*storage, &r, last.get().saturating_add(1)))
                .unwrap_or(0);
            report.problem(format!(
                "log: {e}; {after} acknowledged ops in the intact batches after the damage"
            ));
        }
        Err(e) => report.problem(format!("log: {e}")),
    }
    Ok(report)
}

/// What `refctl recover` did.
#[derive(Debug)]
pub struct Recovered {
    /// What open found and dropped.
    pub info: refd_durable::RecoveryInfo,
    /// Generation of the commit that put the recovered log behind the head.
    pub committed_generation: u64,
}

/// Opens the device with an explicit recovery `mode` (dropping what it
/// gives up, recorded in the superblock) and commits the recovered ops, so
/// that the next open (in strict mode) starts after the damage.
pub fn recover(path: &Path, mode: RecoveryMode) -> Result<Recovered, String> {
    let storage = open(path)?;
    let options = OpenOptions {
        recovery_mode: mode,
        ..OpenOptions::default()
    };
    let (engine, info) = DurableEngine::open(storage, options).map_err(|e| e.to_string())?;
    let summary = engine.commit().map_err(|e| e.to_string())?;
    Ok(Recovered {
        info,
        committed_generation: summary.generation,
    })
}

/// What `dump` wrote, besides the dump.
#[derive(Debug)]
pub struct Dumped {
    /// Extents dumped.
    pub extents: usize,
    /// The node region's allocator, as fsck reports it.
    pub node_region: NodeRegion,
}

/// Writes the committed extent tree of a device (read only) in dump-tree's
/// extent item format, streaming: memory is one extent however large the
/// tree. Refuses a device whose superblock or tree cannot be opened; an
/// item that does not decode ends the dump with an error after the extents
/// before it.
pub fn dump(
    path: &Path,
    nodesize: u64,
    out: impl std::io::Write,
    progress: &mut Progress,
) -> Result<Dumped, String> {
    let mut report = FsckReport::default();
    let loaded = load(path, &mut report)?;
    let tree = match (loaded.tree, report.problems.first()) {
        (Some(tree), None) => tree,
        (_, Some(p)) => return Err(format!("{}: {p} (run refctl fsck)", path.display())),
        (None, None) => return Err(format!("{}: no extent tree", path.display())),
    };
    let node_region = NodeRegion::of(&tree.space());
    let mut writer = DumpWriter::new(nodesize, out);
    let mut written = Ok(());
    let mut extents = 0usize;
    scan_extents(
        &tree,
        &report.device,
        0..=EXTENT_BYTENR_MAX,
        |bytenr, item| {
            extents += 1;
            if extents.is_multiple_of(PROGRESS_CHECK_ITEMS) {
                progress.tick(|| format!("dumped {extents} extents (bytenr {bytenr})"));
            }
            written = writer.push(bytenr, &item);
            if written.is_ok() {
                ControlFlow::Continue(())
            } else {
                ControlFlow::Break(())
            }
        },
    )
    .map_err(|e| format!("{}: {e} (run refctl fsck)", path.display()))?;
    written
        .and_then(|()| writer.finish())
        .map_err(|e| format!("writing the dump: {e}"))?;
    Ok(Dumped {
        extents,
        node_region,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
