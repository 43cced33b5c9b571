//! refctl: the refd command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use refd_btrfs::export::{write_canonical, write_dump_items};
use refd_ctl::client::{self, ClientCmd};
use refd_ctl::device;
use refd_ctl::replay::{load, replay, Impl, ReplayOptions, ReplayReport};

#[global_allocator]
static GLOBAL: refd_alloc::MiMalloc = refd_alloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "refctl", version, about = "refd command line")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// btrfs conformance: replay kernel traces, export extent trees.
    #[command(subcommand)]
    Btrfs(BtrfsCmd),
    /// Format PATH (a block device or a file; a file is created with
    /// --size). Refuses to overwrite a refd file system without --force.
    Format(FormatArgs),
    /// Check PATH read-only: superblocks, every tree node, every extent
    /// (refs = sum of backrefs), the allocator and the log. Exit status 0
    /// only when clean.
    Fsck(FsckArgs),
    /// Print the committed extent tree of PATH in dump-tree's extent-item
    /// format (ops still only in the log are counted by fsck).
    Dump(DumpArgs),
    /// Recover PATH whose log fsck reports damaged, giving up what --mode
    /// says (recorded in the superblock), and commit: afterwards the
    /// device opens normally.
    Recover(RecoverArgs),
    /// Client commands: talk to a running refd (--connect ADDR).
    #[command(flatten)]
    Client(ClientCmd),
}

#[derive(Debug, Args)]
struct FormatArgs {
    /// Block device or file.
    path: PathBuf,
    /// Create the file with this size (e.g. 1G) if PATH does not exist.
    #[arg(long)]
    size: Option<String>,
    /// Log region size (default: 1/8 of the device).
    #[arg(long)]
    log_bytes: Option<String>,
    /// Overwrite an existing refd file system.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
struct FsckArgs {
    /// Block device or file.
    path: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RecoverArgs {
    /// Block device or file.
    path: PathBuf,
    /// tolerate-tail: keep the log up to the first damaged batch, drop it
    /// and everything after; skip-corrupt: drop only the damaged batches.
    #[arg(long, value_parser = ["tolerate-tail", "skip-corrupt", "strict"])]
    mode: String,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// Block device or file.
    path: PathBuf,
    /// Size printed for tree blocks (METADATA_ITEM).
    #[arg(long, default_value_t = 16384)]
    nodesize: u64,
}

#[derive(Debug, Subcommand)]
enum BtrfsCmd {
    /// Load BEFORE, feed every op of TRACE through refd, compare with AFTER.
    /// Exit status 0 only on an exact match.
    Replay(ReplayArgs),
    /// Print refd's extent tree (BEFORE, plus TRACE replayed if given) in
    /// dump-tree's extent-item format, or the canonical one-line form.
    Export(ExportArgs),
    /// Print a dump-tree file in the canonical one-line-per-extent form
    /// (what replay compares), for diffing against `export --canonical`.
    Normalize(NormalizeArgs),
}

#[derive(Debug, Args)]
struct Common {
    /// Extent tree before (`btrfs inspect-internal dump-tree -t extent`), .zst or text.
    #[arg(long)]
    before: PathBuf,
    /// Delayed-ref events (ftrace text), .zst or text.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Delayed-ref store.
    #[arg(long = "impl", value_enum, default_value = "lockfree")]
    imp: Impl,
    /// Check every op with ref-verify at ingest.
    #[arg(long)]
    verify: bool,
    /// Ingest threads (the trace is partitioned by bytenr).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Commit after this many ops (0: only at the end).
    #[arg(long, default_value_t = 20_000)]
    commit_every: u64,
    /// Tree block size of the filesystem (meta.json: nodesize; default: the
    /// one the leaves of BEFORE show, which AFTER must show too).
    #[arg(long)]
    nodesize: Option<u64>,
}

#[derive(Debug, Args)]
struct ReplayArgs {
    #[command(flatten)]
    common: Common,
    /// Extent tree after, to compare with.
    #[arg(long)]
    after: PathBuf,
    /// Mismatches shown in full (with the ops that touched the extent).
    #[arg(long, default_value_t = 5)]
    show: usize,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ExportArgs {
    #[command(flatten)]
    common: Common,
    /// One canonical line per extent instead of dump-tree items.
    #[arg(long)]
    canonical: bool,
}

#[derive(Debug, Args)]
struct NormalizeArgs {
    /// dump-tree file, .zst or text.
    file: PathBuf,
    /// Tree block size (default: the one the dump's leaves show).
    #[arg(long)]
    nodesize: Option<u64>,
}

fn options(c: &Common, after: Option<PathBuf>, progress: bool) -> Result<ReplayOptions, String> {
    let trace = c.trace.clone().ok_or("--trace is required")?;
    Ok(ReplayOptions {
        before: c.before.clone(),
        trace,
        after,
        imp: c.imp,
        verify: c.verify,
        threads: c.threads,
        commit_every: c.commit_every,
        nodesize: c.nodesize,
        progress,
    })
}

fn print_replay(r: &ReplayReport, json: bool) {
    if json {
        let v = serde_json::json!({
            "impl": r.imp,
            "threads": r.threads,
            "verify": r.verify,
            "ops": r.ops,
            "extents": r.extents,
            "extents_before": r.extents_before,
            "extents_got": r.extents_got,
            "nodesize": r.nodesize,
            "mismatches": r.mismatches.len(),
            "quarantined": r.quarantined.len(),
            "verify_errors": r.verify_errors,
            "commits": r.commits,
            "elapsed_s": r.elapsed.as_secs_f64(),
            "ops_per_sec": r.ops_per_sec(),
            "trace_lines": r.trace_stats.lines,
            "exact": r.exact(),
        });
        println!("{v}");
        return;
    }
    println!(
        "replay ({}, {} threads{}): {} ops, {} commits, {:.3} s, {:.0} ops/s",
        r.imp,
        r.threads,
        if r.verify { ", ref-verify" } else { "" },
        r.ops,
        r.commits,
        r.elapsed.as_secs_f64(),
        r.ops_per_sec()
    );
    println!(
        "extents (nodesize {}): {} before, {} expected after, {} in refd; mismatches: {}; quarantined heads: {}; verify errors: {}",
        r.nodesize,
        r.extents_before,
        r.extents,
        r.extents_got,
        r.mismatches.len(),
        r.quarantined.len(),
        r.verify_errors
    );
    for q in r.quarantined.iter().take(5) {
        println!("quarantined (commit {}): {}", q.generation, q.error);
    }
    for e in &r.verify_samples {
        println!("{e}");
    }
    for m in &r.mismatches {
        if let Some(h) = r.histories.get(&m.bytenr()) {
            println!("mismatch: {m}");
            for item in h {
                println!("    {item}");
            }
        }
    }
    if r.mismatches.len() > r.histories.len() {
        println!(
            "({} more mismatches not shown)",
            r.mismatches.len() - r.histories.len()
        );
    }
    println!("{}", if r.exact() { "EXACT MATCH" } else { "MISMATCH" });
}

fn run(cli: Cli) -> Result<bool, String> {
    match cli.cmd {
        Cmd::Btrfs(BtrfsCmd::Replay(a)) => {
            let opts = options(&a.common, Some(a.after.clone()), !a.json)?;
            let r = replay(&opts, a.show).map_err(|e| e.to_string())?;
            print_replay(&r, a.json);
            Ok(r.exact())
        }
        Cmd::Btrfs(BtrfsCmd::Export(a)) => {
            let (tree, nodesize) = if a.common.trace.is_some() {
                let opts = options(&a.common, None, false)?;
                let r = replay(&opts, 0).map_err(|e| e.to_string())?;
                if !r.exact() {
                    eprintln!(
                        "refctl: warning: {} quarantined heads, {} verify errors during replay",
                        r.quarantined.len(),
                        r.verify_errors
                    );
                }
                (r.tree, r.nodesize)
            } else {
                load(&a.common.before, a.common.nodesize).map_err(|e| e.to_string())?
            };
            let out = std::io::stdout().lock();
            let res = if a.canonical {
                write_canonical(&tree, out)
            } else {
                write_dump_items(&tree, nodesize, out)
            };
            res.map_err(|e| format!("writing to stdout: {e}"))?;
            Ok(true)
        }
        Cmd::Format(a) => {
            let size = a.size.as_deref().map(device::parse_size).transpose()?;
            let log_bytes = a.log_bytes.as_deref().map(device::parse_size).transpose()?;
            let f = device::format(&a.path, size, log_bytes, a.force)?;
            let sb = &f.superblock;
            println!(
                "{} {}: {} bytes, log {} bytes at {}, node region {} bytes at {}, generation {}",
                if f.created {
                    "created and formatted"
                } else {
                    "formatted"
                },
                a.path.display(),
                sb.geometry.size_bytes,
                sb.log_bytes,
                sb.log_start,
                sb.node_region_bytes,
                sb.node_region_start,
                sb.generation
            );
            Ok(true)
        }
        Cmd::Fsck(a) => {
            let r = device::fsck(&a.path, &mut device::Progress::new(progress_line))?;
            if a.json {
                let mut v = serde_json::to_value(&r).map_err(|e| e.to_string())?;
                v["clean"] = serde_json::Value::Bool(r.clean());
                println!("{v}");
            } else {
                println!(
                    "{}: superblock generation {} (slot {}); tree {} levels, {} nodes, {} items; {} extents ({} recorded), {} refs, {} held heads; {} sessions, {} freed-list consumers, {} freed extents kept in {} lists; log: {} batches, {} ops to replay in {} records ({})",
                    r.device, r.generation, r.slot, r.tree_levels, r.tree_nodes, r.tree_items, r.extents, r.extents_recorded.map_or("not".to_string(), |n| n.to_string()), r.refs, r.held_heads, r.sessions, r.consumers, r.freed_extents, r.freed_lists, r.log_batches, r.log_ops, r.log_records, r.log_end
                );
                println!("{}", r.node_region);
                for s in &r.rejected_superblocks {
                    println!("superblock copy rejected: {s}");
                }
                if !r.recovery_record.is_empty() {
                    println!("earlier recovery: {}", r.recovery_record);
                }
                for p in &r.problems {
                    println!("PROBLEM: {p}");
                }
                if r.problem_count > r.problems.len() {
                    println!("({} more problems)", r.problem_count - r.problems.len());
                }
                println!("{}", if r.clean() { "CLEAN" } else { "NOT CLEAN" });
            }
            Ok(r.clean())
        }
        Cmd::Recover(a) => {
            let mode = refd_ioring::log::RecoveryMode::from_name(&a.mode)
                .ok_or_else(|| format!("unknown recovery mode {:?}", a.mode))?;
            let r = device::recover(&a.path, mode)?;
            println!(
                "{}: {}; committed as generation {}",
                a.path.display(),
                r.info,
                r.committed_generation
            );
            Ok(true)
        }
        Cmd::Dump(a) => {
            let d = device::dump(
                &a.path,
                a.nodesize,
                std::io::stdout().lock(),
                &mut device::Progress::new(progress_line),
            )?;
            // On stderr: stdout is the dump alone, to diff.
            progress_line(&format!("dumped {} extents; {}", d.extents, d.node_region));
            Ok(true)
        }
        Cmd::Client(c) => client::run_to_stdout(c).map_err(|e| e.to_string()),
        Cmd::Btrfs(BtrfsCmd::Normalize(a)) => {
            let (tree, _) = load(&a.file, a.nodesize).map_err(|e| e.to_string())?;
            write_canonical(&tree, std::io::stdout().lock())
                .map_err(|e| format!("writing to stdout: {e}"))?;
            Ok(true)
        }
    }
}

/// A progress line of a long command, on stderr (stdout carries the
/// result).
fn progress_line(line: &str) {
    eprintln!("refctl: {line}");
}

fn main() -> ExitCode {
    refd_alloc::tune();
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("refctl: {e}");
            ExitCode::from(2)
        }
    }
}
