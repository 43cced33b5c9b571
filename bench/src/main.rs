//! refd-bench: load generator and benchmarks for refd.
//!
//! Every benchmark measures the lock-free design and the mutex baseline
//! side by side in one run and prints their ratio (these machines are
//! noisy: compare within a run, not across runs).

mod compare;
mod crash;
mod daemon_crash;
mod durable;
mod hist;
mod hot_extents;
mod ingest;
mod load;
mod merge;
mod report;
mod spawn;
mod wire_trace;
mod workload;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: refd_alloc::Counting = refd_alloc::Counting;

#[derive(Debug, Parser)]
#[command(name = "refd-bench", version, about = "refd benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Ingest throughput, latency, memory per pending ref and commit time.
    Ingest(ingest::IngestArgs),
    /// Real crashes: kill a durable ingest process with SIGKILL, N rounds;
    /// check every acknowledged op survives exactly once. Destroys the
    /// device's content.
    Crash(crash::CrashArgs),
    /// Durable ingest on a device: ops/s, ack latency, commits/s, log and
    /// tree bytes per op, beside the device's own durable write rate.
    /// Destroys the device's content.
    Durable(durable::DurableArgs),
    /// Load over the wire against a refd daemon (started, or --connect
    /// unix:PATH | tcp:HOST:PORT, with --token-file): durable ops/s and
    /// SUBMIT latency as clients see them, LOOKUP latency under load, the
    /// daemon's memory.
    Load(load::LoadArgs),
    /// `refd serve`, for the daemons `load` starts when no `refd` binary
    /// is beside this one (internal).
    #[command(hide = true, name = "refd-serve")]
    RefdServe(refd::cli::Serve),
    /// Real daemon crashes: kill -9 a refd daemon under pipelined load
    /// from several clients, restart, retry, N rounds; check every
    /// acknowledged op is present exactly once, the freed lists are
    /// complete and right, and the device verifies. Destroys the device's
    /// content.
    DaemonCrash(daemon_crash::DaemonCrashArgs),
    /// refd against what one would use instead, one table: the refd
    /// daemon (lock-free and mutex stores), the in-process engine,
    /// RocksDB synced merges, the device's durable write ceiling and the
    /// kernel btrfs anchor, in alternating rounds on one device.
    /// Destroys nothing but what it makes (an image file, a loop device).
    Compare(compare::CompareArgs),
    /// A commit's cost on extents with many backrefs (hot extents): K
    /// extents of B backrefs each, then commits touching every one with a
    /// few ops, timed by phase on the core and the durable engine.
    /// Destroys the device's content.
    HotExtents(hot_extents::HotExtentsArgs),
    /// The background work an op costs after its append: the hand-off's
    /// run build and the compactor's merge passes, single-threaded on
    /// synthetic runs, with and without prefetching ahead, alternating.
    Merge(merge::MergeArgs),
    /// The process `crash` kills (internal).
    #[command(hide = true)]
    CrashChild(crash::ChildArgs),
}

fn main() {
    refd_alloc::tune();
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Ingest(_)) {
        refd_alloc::count_live();
    }
    let res = match &cli.cmd {
        Cmd::Ingest(a) => ingest::run(a),
        Cmd::Crash(a) => crash::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                println!(
                    "crash: {} rounds, {} ops acknowledged, {} lost, {} duplicated, {} unacknowledged but present (allowed), verify {}, {} extents, {:.1} s",
                    r.rounds, r.acked, r.lost, r.duplicated, r.unacked_present,
                    if r.verify_clean { "clean" } else { "FAILED" }, r.extents, r.elapsed_s
                );
            }
            if r.lost == 0 && r.duplicated == 0 && r.verify_clean {
                Ok(())
            } else {
                Err("acknowledged ops were lost or duplicated, or the device does not verify".into())
            }
        }),
        Cmd::CrashChild(a) => crash::child(a),
        Cmd::HotExtents(a) => hot_extents::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                hot_extents::print(&r);
            }
            Ok(())
        }),
        Cmd::Merge(a) => merge::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                merge::print(&r);
            }
            Ok(())
        }),
        Cmd::DaemonCrash(a) => daemon_crash::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                println!(
                    "daemon-crash: {} kills; {} SUBMITs ({} ops) acknowledged, {} resent after an unknown outcome, {} answered as duplicates; lost {}, duplicated {}, unexpected {}, dropped but present {}; freed {} expected, {} missing, {} twice, {} still referenced; live extents wrong {}; generation {}; daemon exit {:?}; device verifies: {}; {:.1} s",
                    r.rounds, r.batches_acked, r.ops_acked, r.resubmits, r.duplicate_answers,
                    r.lost, r.duplicated, r.unexpected, r.dropped_present, r.freed_expected, r.freed_missing,
                    r.freed_twice, r.freed_wrong, r.live_wrong, r.generation, r.daemon_exit,
                    r.verify_clean, r.elapsed_s
                );
            }
            if r.ok {
                Ok(())
            } else {
                Err("acknowledged ops were lost or duplicated, a freed list is wrong, or the device does not verify".into())
            }
        }),
        Cmd::RefdServe(a) => refd::cli::serve(a.clone()),
        Cmd::Load(a) => load::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                load::print_summary(&r);
            }
            if r.mismatches.unwrap_or(0) > 0 {
                return Err(format!(
                    "{} extents differ from the kernel's after dump",
                    r.mismatches.unwrap_or(0)
                ));
            }
            match r.daemon_exit {
                Some(0) | None => Ok(()),
                Some(code) => Err(format!("the daemon exited with status {code} after SIGTERM")),
            }
        }),
        Cmd::Compare(a) => compare::run(a).and_then(|r| {
            let table = compare::markdown(&r);
            if let Some(path) = &a.markdown {
                std::fs::write(path, &table).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if let Some(dir) = &a.report {
                compare::write_report(dir, &r)?;
            }
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                print!("{table}");
            }
            Ok(())
        }),
        Cmd::Durable(a) => durable::run(a).and_then(|r| {
            if a.json {
                println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
            } else {
                let p = r.commit_phase_ms_mean;
                println!(
                    "durable: {} ops in {:.2} s = {:.0} durable ops/s (worst second {:.0}); ack p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms max {:.1} ms\n  \
                     {} commits ({:.2}/s, longest gap {:.0} ms, {:.0} ms after the first 10 s; by interval/pending/log {:?}); commit mean {:.0} ms, max {:.0} ms, {:.0} ops, {:.0} ns/op; \
                     phases ms: freeze {:.1} items {:.1} run {:.1} diff {:.1} apply {:.1} write {:.1} superblock {:.1}\n  \
                     log {:.1} B/op ({:.0} MB/s, {:.0} batches/s), tree {:.1} B/op; device durable sequential write {:.0} MB/s; {} extents cached; \
                     heap prefaulted {} MiB in {:.1} s",
                    r.ops, r.ingest_s, r.durable_ops_per_sec, r.durable_ops_per_sec_min_1s,
                    r.p50_ack_ms, r.p99_ack_ms, r.p999_ack_ms, r.max_ack_ms,
                    r.commits, r.commits_per_sec, r.commit_gap_ms_max, r.commit_gap_ms_max_after_warmup, r.commits_by_interval_pending_log,
                    r.commit_ms_mean, r.commit_ms_max, r.commit_ops_mean, r.commit_ns_per_op,
                    p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                    r.log_bytes_per_op, r.log_mb_per_sec, r.log_batches_per_sec, r.tree_bytes_per_op,
                    r.device_durable_mb_per_sec, r.extents_cached, r.prefault_mib, r.prefault_s
                );
            }
            Ok(())
        }),
    };
    if let Err(e) = res {
        eprintln!("refd-bench: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::collections::{BTreeMap, BTreeSet};

    /// The `--flag` words of `text`.
    fn flag_words(text: &str) -> BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_lowercase()))
            .map(str::to_string)
            .collect()
    }

    /// The synopses of the workspace README: each `    refd-bench NAME`
    /// line with the lines it continues onto (a trailing `\`), by NAME.
    fn readme_synopses() -> BTreeMap<String, String> {
        let path = format!("{}/../README.md", env!("CARGO_MANIFEST_DIR"));
        let readme = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut synopses = BTreeMap::new();
        let mut lines = readme.lines();
        while let Some(line) = lines.next() {
            let Some(rest) = line.strip_prefix("    refd-bench ") else {
                continue;
            };
            let name = rest.split_whitespace().next().unwrap_or_default();
            let mut text = line.to_string();
            while text.trim_end().ends_with('\\') {
                text.push('\n');
                text.push_str(lines.next().unwrap_or_default());
            }
            let twice = synopses.insert(name.to_string(), text);
            assert!(twice.is_none(), "two synopses of `refd-bench {name}`");
        }
        synopses
    }

    /// The README's synopsis of every `refd-bench` subcommand names each
    /// of its flags and no other (the README says so).
    #[test]
    fn readme_synopses_are_the_flags() {
        let synopses = readme_synopses();
        let cli = Cli::command();
        let mut checked = Vec::new();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            let synopsis = synopses
                .get(name)
                .unwrap_or_else(|| panic!("no README synopsis of `refd-bench {name}`"));
            let flags: BTreeSet<String> = sub
                .get_arguments()
                .filter(|a| !a.is_hide_set())
                .filter_map(|a| Some(format!("--{}", a.get_long()?)))
                .collect();
            assert_eq!(
                flag_words(synopsis),
                flags,
                "README synopsis against `refd-bench {name} --help`:\n{synopsis}"
            );
            checked.push(name);
        }
        assert!(checked.contains(&"durable") && checked.contains(&"crash"));
        let extra: Vec<&String> = synopses
            .keys()
            .filter(|n| !checked.contains(&n.as_str()))
            .collect();
        assert!(
            extra.is_empty(),
            "README synopses of no subcommand: {extra:?}"
        );
    }
}
