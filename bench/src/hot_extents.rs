//! `refd-bench hot-extents`: what a commit costs when the extents it
//! touches hold many backrefs each (a base image block shared by thousands
//! of clones, a dedup target; or an adversary's on purpose).
//!
//! `--extents K` data extents are built with `--backrefs B` backrefs each
//! (`EXTENT_DATA_REF`s of B roots), committed; then `--commits N` commits
//! are timed, each touching every hot extent with `--changes C` ops: half
//! add a backref of a new root, half drop a committed backref to zero (so
//! B stays the same). Each commit is timed whole and by phase, for the
//! in-process core engine (a lock-free store over an in-memory tree:
//! freeze, run, apply) and then for the durable engine on `--device`
//! (freeze, items, run, diff, apply, write, superblock + log trim).

use std::path::PathBuf;
use std::time::Instant;

use refd_core::delayed::lockfree::LockFreeStore;
use refd_core::engine::Engine;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{CommitPolicy, DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::{Device, FileAllocation};

/// Size of a device file the benchmark creates.
const DEVICE_BYTES_DEFAULT: u64 = 8 << 30;
/// First hot extent's bytenr; the extents are `EXTENT_STRIDE` apart.
const BASE: u64 = 1 << 30;
const EXTENT_STRIDE: u64 = 1 << 20;
/// Size of a hot extent.
const EXTENT_BYTES: u64 = 128 << 10;
/// The build commits each at most this many ops (whole extents: every
/// extent is built by one commit); at least one extent each.
const BUILD_COMMIT_OPS_MAX: u64 = 2_000_000;
/// Longest run: K × B backrefs held.
const BACKREFS_TOTAL_MAX: u64 = 64_000_000;

/// Arguments of `hot-extents`.
#[derive(Debug, clap::Args)]
pub struct HotExtentsArgs {
    /// Hot extents.
    #[arg(long, default_value_t = 768)]
    pub extents: u64,
    /// Backrefs of each hot extent.
    #[arg(long, default_value_t = 17_000)]
    pub backrefs: u64,
    /// Timed commits (per engine).
    #[arg(long, default_value_t = 5)]
    pub commits: u64,
    /// Ops per hot extent per timed commit (even: half add a backref,
    /// half drop one to zero).
    #[arg(long, default_value_t = 4)]
    pub changes: u64,
    /// Block device or file (created if missing) for the durable engine;
    /// its content is destroyed. Without it, only the core engine runs.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One timed commit: total and phases (ms).
#[derive(Debug, serde::Serialize)]
pub struct CommitTiming {
    /// The whole commit (ms).
    pub total_ms: f64,
    /// Phases (ms): core `[freeze, run, apply]`; durable `[freeze,
    /// items, run, diff, apply, write, superblock + trim]`.
    pub phase_ms: Vec<f64>,
}

/// What `hot-extents` measured.
#[derive(Debug, serde::Serialize)]
pub struct HotExtentsReport {
    /// Hot extents.
    pub extents: u64,
    /// Backrefs each.
    pub backrefs: u64,
    /// Ops per extent per timed commit.
    pub changes: u64,
    /// Core engine: time to build the extents (s).
    pub core_build_s: f64,
    /// Core engine: the timed commits.
    pub core: Vec<CommitTiming>,
    /// Durable engine: time to build the extents (s).
    pub durable_build_s: Option<f64>,
    /// Durable engine: the timed commits.
    pub durable: Vec<CommitTiming>,
}

fn bytenr(e: u64) -> u64 {
    BASE + e * EXTENT_STRIDE
}

fn key(root: u64) -> RefKey {
    RefKey::ExtentData {
        root: 256 + root,
        objectid: 257,
        offset: 0,
    }
}

fn op(e: u64, action: Action, root: u64) -> Op {
    Op::new(
        bytenr(e),
        EXTENT_BYTES,
        ExtentKind::Data,
        action,
        key(root),
        0,
    )
    .expect("hot-extents builds valid ops")
}

/// The ops building extents `from..to`: an allocation, then B - 1 adds.
fn build_ops(from: u64, to: u64, backrefs: u64) -> Vec<Op> {
    let mut ops = Vec::with_capacity(((to - from) * backrefs) as usize);
    for e in from..to {
        ops.push(op(e, Action::AddExtent, 0));
        ops.extend((1..backrefs).map(|r| op(e, Action::AddRef, r)));
    }
    ops
}

/// The ops of timed commit `c`: on every extent, `half` adds of new roots
/// (`B + c·half + j`) and `half` drops of committed roots, spread over
/// the whole list (root `(c·half + j) · step mod B`, each dropped once:
/// `step` is coprime to B).
fn commit_ops(args: &HotExtentsArgs, c: u64, step: u64) -> Vec<Op> {
    let half = args.changes / 2;
    let mut ops = Vec::with_capacity((args.extents * args.changes) as usize);
    for e in 0..args.extents {
        for j in 0..half {
            let n = c * half + j;
            ops.push(op(e, Action::AddRef, args.backrefs + n));
            ops.push(op(e, Action::DropRef, (n * step) % args.backrefs));
        }
    }
    ops
}

/// A step through `0..b` visiting every root once: the first odd number
/// near b·0.618 coprime to b.
fn coprime_step(b: u64) -> u64 {
    let gcd = |mut x: u64, mut y: u64| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    let mut s = (b as f64 * 0.618) as u64 | 1;
    while gcd(s, b) != 1 {
        s += 2;
    }
    s
}

/// Extents per build commit.
fn build_group(args: &HotExtentsArgs) -> u64 {
    (BUILD_COMMIT_OPS_MAX / args.backrefs).max(1)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn check_args(args: &HotExtentsArgs) -> Result<(), String> {
    if args.extents == 0 || args.backrefs < 2 {
        return Err("--extents must be at least 1 and --backrefs at least 2".into());
    }
    if args.changes == 0 || !args.changes.is_multiple_of(2) {
        return Err("--changes must be even and at least 2".into());
    }
    if args.extents.saturating_mul(args.backrefs) > BACKREFS_TOTAL_MAX {
        return Err(format!(
            "--extents × --backrefs must be at most {BACKREFS_TOTAL_MAX}"
        ));
    }
    if args.changes / 2 * args.commits > args.backrefs {
        return Err("the timed commits would drop more backrefs than an extent has".into());
    }
    Ok(())
}

/// A line on stderr where the timed commits of `engine` start (after a
/// build of many seconds): where a profiler attaches.
fn timed_commits_start(args: &HotExtentsArgs, engine: &str) {
    if !args.json {
        eprintln!("{engine}: built; timed commits start");
    }
}

/// The core engine: build, then time the commits.
fn run_core(args: &HotExtentsArgs, step: u64) -> Result<(f64, Vec<CommitTiming>), String> {
    let engine = Engine::new(LockFreeStore::new());
    let t = Instant::now();
    let group = build_group(args);
    for from in (0..args.extents).step_by(group as usize) {
        let to = (from + group).min(args.extents);
        let ops = build_ops(from, to, args.backrefs);
        let mut h = engine.handle().map_err(|e| e.to_string())?;
        h.add_batch(&ops)
            .map_err(|(i, e)| format!("build op {i}: {e}"))?;
        drop(h);
        let r = engine.commit();
        if !r.quarantined.is_empty() {
            return Err(format!("build: {:?}", r.quarantined[0].error));
        }
    }
    let build_s = t.elapsed().as_secs_f64();
    timed_commits_start(args, "core");
    let mut out = Vec::new();
    for c in 0..args.commits {
        let ops = commit_ops(args, c, step);
        let mut h = engine.handle().map_err(|e| e.to_string())?;
        h.add_batch(&ops)
            .map_err(|(i, e)| format!("commit {c} op {i}: {e}"))?;
        drop(h);
        let t = Instant::now();
        let r = engine.commit();
        let total = t.elapsed();
        if !r.quarantined.is_empty() || r.applied as u64 != args.extents {
            return Err(format!(
                "commit {c}: {} applied, quarantined {:?}",
                r.applied,
                r.quarantined.first().map(|q| &q.error)
            ));
        }
        out.push(CommitTiming {
            total_ms: ms(total),
            phase_ms: vec![ms(r.freeze_time), ms(r.run_time), ms(r.apply_time)],
        });
    }
    Ok((build_s, out))
}

/// The durable engine on `path`: format, build, then time the commits.
fn run_durable(
    args: &HotExtentsArgs,
    path: &std::path::Path,
    step: u64,
) -> Result<(f64, Vec<CommitTiming>), String> {
    if !path.exists() {
        Device::create_file(path, DEVICE_BYTES_DEFAULT, FileAllocation::Reserve)
            .map_err(|e| e.to_string())?;
    }
    let dev = crate::crash::open_device(path)?;
    DurableEngine::format(&dev, FormatOptions::default()).map_err(|e| e.to_string())?;
    let defaults = OpenOptions::default();
    let options = OpenOptions {
        // Commits only when this benchmark calls them.
        policy: CommitPolicy {
            interval_ms: 3_600_000,
            pending_ops_trigger: u64::MAX / 2,
            dirty_bytes_trigger: 0,
            ..CommitPolicy::default()
        },
        ..defaults
    };
    let (engine, _) = DurableEngine::open(dev, options).map_err(|e| e.to_string())?;
    let add_all = |ops: &[Op], what: &str| -> Result<(), String> {
        let mut last = None;
        for (i, o) in ops.iter().enumerate() {
            last = Some(engine.add(o).map_err(|e| format!("{what} op {i}: {e}"))?);
        }
        if let Some(t) = last {
            t.wait().map_err(|e| e.to_string())?;
        }
        Ok(())
    };
    let t = Instant::now();
    let group = build_group(args);
    for from in (0..args.extents).step_by(group as usize) {
        let to = (from + group).min(args.extents);
        add_all(&build_ops(from, to, args.backrefs), "build")?;
        let s = engine.commit().map_err(|e| e.to_string())?;
        if !s.core.quarantined.is_empty() {
            return Err(format!("build: {:?}", s.core.quarantined[0].error));
        }
    }
    let build_s = t.elapsed().as_secs_f64();
    timed_commits_start(args, "durable");
    let mut out = Vec::new();
    for c in 0..args.commits {
        add_all(&commit_ops(args, c, step), "commit")?;
        let t = Instant::now();
        let s = engine.commit().map_err(|e| e.to_string())?;
        let total = t.elapsed();
        if !s.core.quarantined.is_empty() || s.core.applied as u64 != args.extents {
            return Err(format!("commit {c}: {} applied", s.core.applied));
        }
        out.push(CommitTiming {
            total_ms: ms(total),
            phase_ms: crate::durable::phase_ms(&s.phases).to_vec(),
        });
    }
    Ok((build_s, out))
}

/// Run `hot-extents`.
pub fn run(args: &HotExtentsArgs) -> Result<HotExtentsReport, String> {
    check_args(args)?;
    let step = coprime_step(args.backrefs);
    if !args.json {
        eprintln!(
            "core engine: {} extents × {} backrefs...",
            args.extents, args.backrefs
        );
    }
    let (core_build_s, core) = run_core(args, step)?;
    let (durable_build_s, durable) = match &args.device {
        Some(path) => {
            if !args.json {
                eprintln!("durable engine on {}...", path.display());
            }
            let (b, d) = run_durable(args, path, step)?;
            (Some(b), d)
        }
        None => (None, Vec::new()),
    };
    Ok(HotExtentsReport {
        extents: args.extents,
        backrefs: args.backrefs,
        changes: args.changes,
        core_build_s,
        core,
        durable_build_s,
        durable,
    })
}

/// The report as text: one line per commit.
pub fn print(r: &HotExtentsReport) {
    println!(
        "hot-extents: {} extents × {} backrefs, {} ops per extent per commit",
        r.extents, r.backrefs, r.changes
    );
    println!("  core    build {:.1} s", r.core_build_s);
    for (i, c) in r.core.iter().enumerate() {
        println!(
            "  core    commit {i}: {:8.1} ms  (freeze {:.1} run {:.1} apply {:.1})",
            c.total_ms, c.phase_ms[0], c.phase_ms[1], c.phase_ms[2]
        );
    }
    if let Some(b) = r.durable_build_s {
        println!("  durable build {b:.1} s");
    }
    for (i, c) in r.durable.iter().enumerate() {
        let p = &c.phase_ms;
        println!(
            "  durable commit {i}: {:8.1} ms  (freeze {:.1} items {:.1} run {:.1} diff {:.1} apply {:.1} write {:.1} superblock+trim {:.1})",
            c.total_ms, p[0], p[1], p[2], p[3], p[4], p[5], p[6]
        );
    }
}
