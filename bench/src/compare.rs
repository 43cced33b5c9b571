//! `refd-bench compare`: how refd stands against what one would use
//! instead, every row measured in one run on the same device and machine,
//! in alternating rounds (each round runs every row once, in an order
//! rotated by one per round) so that drift hits all rows alike.
//!
//! Rows: the refd daemon with the lock-free store and with the mutex
//! store (closed loop over the wire, `load`), the in-process durable
//! engine (`load --in-process`: the ceiling without the wire), RocksDB
//! (`db_bench mergerandom` with the uint64add merge operator and a synced
//! WAL, on ext4 made on the same loop device), the device's own durable
//! write ceiling (sequential writes + flush, as `refd-bench durable`
//! measures it) with refd's fraction of it in bytes, and the kernel
//! btrfs anchor (`../shared/capture/anchor.sh`, once, after the rounds).
//! A row that cannot run here is reported as skipped with its reason.
//! Ratios are to refd lock-free (median of its rounds).
//!
//! The device: as root with `losetup`, a direct-io loop device over an
//! image file in `--dir` (the refd rows use it raw, RocksDB an ext4 made
//! on it each round); otherwise the image file itself for the refd rows
//! and a directory of `--dir` for RocksDB (the row says so).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::Parser;

use crate::load::{LoadArgs, LoadReport};

/// Arguments of `compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Measured seconds per row and round.
    #[arg(long, default_value_t = 8.0)]
    pub duration_s: f64,
    /// Rounds.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// CI's short mode: 1.5 s per row, 1 round, 100k extents, a 1 GiB
    /// device, no prefault, a small anchor (tens of seconds in all).
    #[arg(long)]
    pub short: bool,
    /// Client connections of the refd rows; RocksDB's threads.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Ops per SUBMIT of the refd rows.
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// SUBMITs in flight per client of the refd rows.
    #[arg(long, default_value_t = 2)]
    pub pipeline: usize,
    /// Distinct extents (refd) and keys (RocksDB).
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Size of the device image (GiB).
    #[arg(long, default_value_t = 4)]
    pub device_gib: u64,
    /// Where the device image (and the anchor's work) goes.
    #[arg(long, default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Heap the refd daemons prefault (MiB).
    #[arg(long, default_value_t = crate::durable::PREFAULT_MIB_DEFAULT)]
    pub daemon_prefault_mib: usize,
    /// The refd binary (default: beside this one).
    #[arg(long)]
    pub refd: Option<PathBuf>,
    /// The kernel btrfs anchor script.
    #[arg(long, default_value = "../shared/capture/anchor.sh")]
    pub anchor: PathBuf,
    /// Rows not to run (reported as skipped): refd-mutex, in-process,
    /// rocksdb, device, anchor.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Write the markdown table to this file too.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write an HTML report to DIR (index.html with the table and a chart,
    /// compare.json, compare.md).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// Short name (`refd-lockfree`, `refd-mutex`, `in-process`,
    /// `rocksdb`, `device`, `anchor`).
    pub name: &'static str,
    /// Exactly what ran.
    pub how: String,
    /// Ops per second of each round.
    pub ops_per_sec_rounds: Vec<f64>,
    /// Median of the rounds.
    pub ops_per_sec: Option<f64>,
    /// p99 latency of a request (ms), median of the rounds (refd rows).
    pub p99_ms: Option<f64>,
    /// MB written to the device per second (median of the rounds).
    pub mb_per_sec: Option<f64>,
    /// This row's ops/s over refd lock-free's (the device row: refd
    /// lock-free's MB/s over the device's, the fraction of the ceiling
    /// refd writes).
    pub ratio_to_refd: Option<f64>,
    /// Why it did not run.
    pub skipped: Option<String>,
}

impl Row {
    fn new(name: &'static str, how: String) -> Row {
        Row {
            name,
            how,
            ops_per_sec_rounds: Vec::new(),
            ops_per_sec: None,
            p99_ms: None,
            mb_per_sec: None,
            ratio_to_refd: None,
            skipped: None,
        }
    }

    fn skip(name: &'static str, how: String, why: String) -> Row {
        Row {
            skipped: Some(why),
            ..Row::new(name, how)
        }
    }
}

/// What `compare` measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompareReport {
    /// The rows, refd lock-free first.
    pub rows: Vec<Row>,
    /// Rounds run.
    pub rounds: usize,
    /// Seconds per row and round.
    pub duration_s: f64,
    /// The device the rows ran on, and how it was made.
    pub device: String,
    /// refd lock-free over refd mutex (target ≥ 4).
    pub lockfree_over_mutex: Option<f64>,
    /// refd lock-free over RocksDB (target ≥ 40).
    pub lockfree_over_rocksdb: Option<f64>,
    /// Wall time of the whole comparison.
    pub elapsed_s: f64,
}

/// The device the rows share.
struct Bed {
    image: PathBuf,
    /// The loop device over `image` (root with losetup), else `None`.
    loop_dev: Option<PathBuf>,
    /// Mount point for RocksDB's ext4 (loop) or its directory (file).
    rocks_dir: PathBuf,
}

impl Bed {
    fn make(dir: &Path, gib: u64) -> Result<Bed, String> {
        let base = dir.join(format!("refd-compare-{}", std::process::id()));
        std::fs::create_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
        let image = base.join("device.img");
        let f = std::fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(gib << 30)
            .map_err(|e| format!("{}: {e}", image.display()))?;
        // SAFETY: geteuid has no preconditions and touches no memory.
        let root = unsafe { libc::geteuid() } == 0;
        let loop_dev = if root {
            let out = Command::new("losetup")
                .args(["-f", "--show", "--direct-io=on"])
                .arg(&image)
                .output();
            match out {
                Ok(o) if o.status.success() => Some(PathBuf::from(
                    String::from_utf8_lossy(&o.stdout).trim().to_string(),
                )),
                _ => None,
            }
        } else {
            None
        };
        Ok(Bed {
            image,
            loop_dev,
            rocks_dir: base.join("rocksdb"),
        })
    }

    /// What the refd rows run on.
    fn device(&self) -> &Path {
        self.loop_dev.as_deref().unwrap_or(&self.image)
    }

    fn describe(&self) -> String {
        match &self.loop_dev {
            Some(d) => format!(
                "{} (direct-io loop device over {})",
                d.display(),
                self.image.display()
            ),
            None => format!(
                "{} (a file: no root or no losetup for a loop device)",
                self.image.display()
            ),
        }
    }

    /// A fresh refd file system on the device.
    fn format_refd(&self) -> Result<(), String> {
        let dev = crate::crash::open_device(self.device())?;
        refd_durable::DurableEngine::format(&dev, refd_durable::FormatOptions::default())
            .map(|_| ())
            .map_err(|e| format!("format {}: {e}", self.device().display()))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if self.loop_dev.is_some() {
            let _ = Command::new("umount").arg(&self.rocks_dir).output();
        }
        if let Some(d) = &self.loop_dev {
            let _ = Command::new("losetup").arg("-d").arg(d).output();
        }
        if let Some(base) = self.image.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// `refd-bench load` arguments parsed as its command line is.
#[derive(Debug, Parser)]
struct LoadCommand {
    #[command(flatten)]
    load: LoadArgs,
}

/// Knobs after `--short`.
struct Plan {
    duration_s: f64,
    warmup_s: f64,
    rounds: usize,
    extents: u64,
    device_gib: u64,
    prefault_mib: usize,
    /// anchor.sh -n, -k.
    anchor_n: u64,
    anchor_k: u64,
}

fn plan(a: &CompareArgs) -> Plan {
    if a.short {
        Plan {
            duration_s: 1.5,
            warmup_s: 0.5,
            rounds: 1,
            extents: 100_000,
            device_gib: 1,
            prefault_mib: 0,
            anchor_n: 2000,
            anchor_k: 2,
        }
    } else {
        Plan {
            duration_s: a.duration_s,
            warmup_s: 1.0,
            rounds: a.rounds.max(1),
            extents: a.extents,
            device_gib: a.device_gib,
            prefault_mib: a.daemon_prefault_mib,
            anchor_n: 10_000,
            anchor_k: 4,
        }
    }
}

/// The rows measured in rounds.
const ROUND_ROWS: [&str; 5] = [
    "refd-lockfree",
    "refd-mutex",
    "in-process",
    "rocksdb",
    "device",
];

/// Runs `compare`.
pub fn run(a: &CompareArgs) -> Result<CompareReport, String> {
    if a.clients == 0 || a.batch == 0 || a.pipeline == 0 {
        return Err("--clients, --batch and --pipeline must be at least 1".into());
    }
    if let Some(bad) = a
        .skip
        .iter()
        .find(|s| !ROUND_ROWS.contains(&s.as_str()) && s.as_str() != "anchor")
    {
        return Err(format!(
            "--skip {bad}: rows are refd-mutex, in-process, rocksdb, device, anchor"
        ));
    }
    let started = Instant::now();
    let p = plan(a);
    let bed = Bed::make(&a.dir, p.device_gib)?;
    let mut rows: Vec<Row> = ROUND_ROWS
        .iter()
        .map(|&name| Row::new(name, how(a, &p, &bed, name)))
        .collect();
    for (row, name) in rows.iter_mut().zip(ROUND_ROWS) {
        if a.skip.iter().any(|s| s == name) && name != "refd-lockfree" {
            row.skipped = Some("--skip".into());
        } else if name == "rocksdb" {
            row.skipped = rocksdb_missing();
        }
    }
    let mut p99s: Vec<Vec<f64>> = vec![Vec::new(); ROUND_ROWS.len()];
    let mut mbs: Vec<Vec<f64>> = vec![Vec::new(); ROUND_ROWS.len()];
    for round in 0..p.rounds {
        for k in 0..ROUND_ROWS.len() {
            let i = (k + round) % ROUND_ROWS.len();
            if rows[i].skipped.is_some() {
                continue;
            }
            if !a.json {
                eprintln!(
                    "compare: round {} of {}: {}",
                    round + 1,
                    p.rounds,
                    ROUND_ROWS[i]
                );
            }
            match measure_row(a, &p, &bed, ROUND_ROWS[i]) {
                Ok(m) => {
                    rows[i].ops_per_sec_rounds.extend(m.ops_per_sec);
                    p99s[i].extend(m.p99_ms);
                    mbs[i].extend(m.mb_per_sec);
                }
                Err(e) if i == 0 => return Err(format!("refd lock-free: {e}")),
                Err(e) => rows[i].skipped = Some(format!("failed: {e}")),
            }
        }
    }
    for (i, row) in rows.iter_mut().enumerate() {
        if ROUND_ROWS[i] != "device" {
            row.ops_per_sec = median(&row.ops_per_sec_rounds);
        }
        row.p99_ms = median(&p99s[i]);
        row.mb_per_sec = median(&mbs[i]);
    }
    rows.push(anchor_row(a, &p));
    Ok(finish(rows, &p, &bed, started))
}

/// Ratios and the report.
fn finish(mut rows: Vec<Row>, p: &Plan, bed: &Bed, started: Instant) -> CompareReport {
    let refd_ops = rows[0].ops_per_sec;
    let refd_mb = rows[0].mb_per_sec;
    for row in &mut rows {
        row.ratio_to_refd = if row.name == "device" {
            refd_mb.zip(row.mb_per_sec).map(|(r, d)| r / d)
        } else {
            row.ops_per_sec.zip(refd_ops).map(|(o, r)| o / r)
        };
    }
    let over = |name: &str| {
        let other = rows.iter().find(|r| r.name == name)?.ops_per_sec?;
        refd_ops.map(|r| r / other)
    };
    CompareReport {
        lockfree_over_mutex: over("refd-mutex"),
        lockfree_over_rocksdb: over("rocksdb"),
        rows,
        rounds: p.rounds,
        duration_s: p.duration_s,
        device: bed.describe(),
        elapsed_s: started.elapsed().as_secs_f64(),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    })
}

/// One measurement of a row.
#[derive(Debug, Default)]
struct Measured {
    ops_per_sec: Option<f64>,
    p99_ms: Option<f64>,
    mb_per_sec: Option<f64>,
}

fn measure_row(a: &CompareArgs, p: &Plan, bed: &Bed, name: &str) -> Result<Measured, String> {
    match name {
        "refd-lockfree" | "refd-mutex" | "in-process" => {
            bed.format_refd()?;
            let r = run_load(&load_args(a, p, bed, name))?;
            Ok(Measured {
                ops_per_sec: Some(r.ops_per_sec),
                p99_ms: Some(r.p99_ms),
                mb_per_sec: r.device_write_mb_per_sec,
            })
        }
        "rocksdb" => rocksdb(a, p, bed).map(|ops| Measured {
            ops_per_sec: Some(ops),
            ..Measured::default()
        }),
        "device" => {
            let dev = crate::crash::open_device(bed.device())?;
            Ok(Measured {
                mb_per_sec: Some(crate::durable::device_rate(&dev)?),
                ..Measured::default()
            })
        }
        other => Err(format!("no row {other}")),
    }
}

/// The `refd-bench load` command line of a refd row.
fn load_args(a: &CompareArgs, p: &Plan, bed: &Bed, name: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "load",
        "--closed",
        "--json",
        "--device",
        &bed.device().display().to_string(),
        "--clients",
        &a.clients.to_string(),
        "--batch",
        &a.batch.to_string(),
        "--pipeline",
        &a.pipeline.to_string(),
        "--extents",
        &p.extents.to_string(),
        "--duration-s",
        &p.duration_s.to_string(),
        "--warmup-s",
        &p.warmup_s.to_string(),
        "--daemon-prefault-mib",
        &p.prefault_mib.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match name {
        "refd-mutex" => v.extend(["--impl".into(), "mutex".into()]),
        "in-process" => v.push("--in-process".into()),
        _ => v.extend(["--impl".into(), "lockfree".into()]),
    }
    if let Some(r) = &a.refd {
        v.extend(["--refd".into(), r.display().to_string()]);
    }
    v
}

fn run_load(args: &[String]) -> Result<LoadReport, String> {
    let c = LoadCommand::try_parse_from(args).map_err(|e| e.to_string())?;
    let r = crate::load::run(&c.load)?;
    match r.daemon_exit {
        Some(0) | None if r.errors == 0 => Ok(r),
        exit => Err(format!(
            "{} errors, daemon exit {exit:?} after SIGTERM",
            r.errors
        )),
    }
}

/// What each row runs, as its row says.
fn how(a: &CompareArgs, p: &Plan, bed: &Bed, name: &str) -> String {
    match name {
        "refd-lockfree" | "refd-mutex" | "in-process" => format!(
            "refd-bench {}",
            load_args(a, p, bed, name)
                .iter()
                .filter(|s| *s != "--json")
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        ),
        "rocksdb" => format!(
            "{}: {}",
            match &bed.loop_dev {
                Some(d) => format!("ext4 (mkfs.ext4 -F -q) on {} mounted at {}", d.display(), bed.rocks_dir.display()),
                None => format!("a directory {} on the file system of {}", bed.rocks_dir.display(), a.dir.display()),
            },
            rocksdb_args(a, p, Path::new("DIR/db")).join(" ")
        ),
        "device" => format!(
            "sequential {} KiB writes + flush for 1 s over the last quarter of {} (refd-bench durable's probe)",
            crate::durable::PROBE_BLOCK_BYTES >> 10,
            bed.device().display()
        ),
        _ => String::new(),
    }
}

/// Why RocksDB cannot run (`None`: it can).
fn rocksdb_missing() -> Option<String> {
    match Command::new("db_bench").arg("--version").output() {
        Ok(_) => None,
        Err(e) => Some(format!(
            "db_bench not found ({e}): apt-get install rocksdb-tools"
        )),
    }
}

/// db_bench's command line: synced merges of 8-byte uint64add operands
/// over `--extents` keys from `--clients` threads. `mergerandom` merges
/// one key per write (db_bench's `-batch_size` does not apply to it); the
/// WAL's group commit batches concurrent writers, the nearest RocksDB has
/// to refd's batches.
fn rocksdb_args(a: &CompareArgs, p: &Plan, db: &Path) -> Vec<String> {
    vec![
        "db_bench".into(),
        "--benchmarks=mergerandom".into(),
        "--merge_operator=uint64add".into(),
        "--sync=1".into(),
        "--disable_wal=0".into(),
        "--value_size=8".into(),
        "--key_size=16".into(),
        format!("--num={}", p.extents),
        format!("--duration={}", p.duration_s.ceil() as u64),
        format!("--threads={}", a.clients),
        format!("--db={}", db.display()),
    ]
}

fn run_quiet(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One RocksDB run: merges per second.
fn rocksdb(a: &CompareArgs, p: &Plan, bed: &Bed) -> Result<f64, String> {
    let dir = &bed.rocks_dir;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Some(dev) = &bed.loop_dev {
        run_quiet(
            Command::new("mkfs.ext4").args(["-F", "-q"]).arg(dev),
            "mkfs.ext4",
        )?;
        run_quiet(Command::new("mount").arg(dev).arg(dir), "mount")?;
    }
    let args = rocksdb_args(a, p, &dir.join("db"));
    let result = run_quiet(Command::new(&args[0]).args(&args[1..]), "db_bench");
    if bed.loop_dev.is_some() {
        run_quiet(Command::new("umount").arg(dir), "umount")?;
    } else {
        let _ = std::fs::remove_dir_all(dir.join("db"));
    }
    let out = result?;
    // "mergerandom  :     312.747 micros/op 12779 ops/sec 3.130 seconds ..."
    out.lines()
        .find(|l| l.starts_with("mergerandom"))
        .and_then(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "ops/sec")?;
            w.get(i - 1)?.parse().ok()
        })
        .ok_or_else(|| format!("db_bench printed no mergerandom line: {out}"))
}

/// The kernel btrfs anchor: `anchor.sh` once; its reflink phases (clone
/// K copies of an N-extent file + sync, then delete them + sync) give the
/// kernel's delayed-ref ops per second.
fn anchor_row(a: &CompareArgs, p: &Plan) -> Row {
    let work = a
        .dir
        .join(format!("refd-compare-anchor-{}", std::process::id()));
    let how = format!(
        "bash {} -n {} -k {} -r 1 -s 1G -w {}: reflink clone + delete phases, ref ops (traced twin run) / seconds (untraced run)",
        a.anchor.display(),
        p.anchor_n,
        p.anchor_k,
        work.display()
    );
    if a.skip.iter().any(|s| s == "anchor") {
        return Row::skip("anchor", how, "--skip".into());
    }
    if let Some(why) = anchor_missing(&a.anchor) {
        return Row::skip("anchor", how, why);
    }
    let result = run_quiet(
        Command::new("bash")
            .arg(&a.anchor)
            .args(["-n", &p.anchor_n.to_string(), "-k", &p.anchor_k.to_string()])
            .args(["-r", "1", "-s", "1G", "-w"])
            .arg(&work),
        "anchor.sh",
    )
    .and_then(|_| anchor_rate(&work.join("anchor/results.json")));
    let _ = std::fs::remove_dir_all(&work);
    match result {
        Ok(ops) => Row {
            ops_per_sec_rounds: vec![ops],
            ops_per_sec: Some(ops),
            ..Row::new("anchor", how)
        },
        Err(e) => Row::skip("anchor", how, format!("failed: {e}")),
    }
}

/// Why the anchor cannot run here (`None`: it can).
fn anchor_missing(script: &Path) -> Option<String> {
    if !script.exists() {
        return Some(format!("{} not found", script.display()));
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (loop device, mount, tracefs)".into());
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.split_whitespace().any(|w| w == "btrfs") {
        return Some("the kernel has no btrfs (/proc/filesystems)".into());
    }
    for tool in ["mkfs.btrfs", "btrfs", "bc", "python3"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()));
        if !found {
            return Some(format!("{tool} not found (btrfs-progs, bc, python3)"));
        }
    }
    None
}

/// Ops per second of the reflink phases of an anchor's results.json.
fn anchor_rate(path: &Path) -> Result<f64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ops = 0.0;
    let mut seconds = 0.0;
    for phase in ["reflink_clone", "reflink_delete"] {
        let p = &v[phase];
        ops += p["ref_ops_traced_twin"]
            .as_f64()
            .ok_or("no ref_ops_traced_twin")?;
        seconds += p["seconds"][0].as_f64().ok_or("no seconds")?;
    }
    if seconds <= 0.0 {
        return Err("zero seconds".into());
    }
    Ok(ops / seconds)
}

/// A measured row's cells: ops/s (median), the rounds, p99 ms, device
/// MB/s and the ratio to refd lock-free.
fn cells(row: &Row) -> [String; 5] {
    let num = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |x| format!("{x:.d$}"));
    let rounds: Vec<String> = row
        .ops_per_sec_rounds
        .iter()
        .map(|x| format!("{x:.0}"))
        .collect();
    let ratio = match (row.name, row.ratio_to_refd) {
        ("device", Some(x)) => format!("refd writes {:.1}% of it", x * 100.0),
        (_, Some(x)) if x >= 0.01 => format!("{x:.2}"),
        (_, Some(x)) => format!("{x:.4} (1/{:.0})", 1.0 / x),
        (_, None) => "—".into(),
    };
    [
        num(row.ops_per_sec, 0),
        rounds.join(", "),
        num(row.p99_ms, 2),
        num(row.mb_per_sec, 0),
        ratio,
    ]
}

/// The table in markdown.
pub fn markdown(r: &CompareReport) -> String {
    let mut s = String::new();
    s.push_str(
        "| row | ops/s (median) | rounds | p99 ms | device MB/s | × refd lock-free | how |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|\n");
    let num = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |x| format!("{x:.d$}"));
    for row in &r.rows {
        let how = row.how.replace('|', "/");
        match &row.skipped {
            Some(why) => s.push_str(&format!(
                "| {} | skipped: {} | | | | | {how} |\n",
                row.name,
                why.replace('|', "/")
            )),
            None => s.push_str(&format!(
                "| {} | {} | {how} |\n",
                row.name,
                cells(row).join(" | ")
            )),
        }
    }
    s.push_str(&format!(
        "\nrefd lock-free / refd mutex: {} (target ≥ 4); refd lock-free / RocksDB: {} (target ≥ 40); {} rounds of {} s per row on {}; {:.0} s in all.\n",
        num(r.lockfree_over_mutex, 2),
        num(r.lockfree_over_rocksdb, 1),
        r.rounds,
        r.duration_s,
        r.device,
        r.elapsed_s
    ));
    s
}

/// Writes DIR/index.html (the table, a bar chart of ops/s per row on a
/// log axis, the machine and the build), DIR/compare.json and
/// DIR/compare.md.
pub fn write_report(dir: &Path, r: &CompareReport) -> Result<(), String> {
    use crate::report::{build_rows, escape, machine, table, STYLE};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let put = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
    };
    put(
        "compare.json",
        &serde_json::to_string_pretty(r).map_err(|e| e.to_string())?,
    )?;
    put("compare.md", &markdown(r))?;
    let mut h = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>refd-bench compare</title>\
         <style>{STYLE}</style></head><body>\n<h1>refd-bench compare</h1>\n<p class=\"lead\">{}</p>\n",
        escape(&summary(r))
    );
    h.push_str(&bar_chart(r)?);
    h.push_str(&html_table(r));
    h.push_str("<h2>Machine</h2>\n");
    h.push_str(&table(&machine(&r.device)));
    h.push_str("<h2>Build</h2>\n");
    h.push_str(&table(&build_rows()));
    h.push_str("<p class=\"files\">Files: <a href=\"compare.json\">compare.json</a>, <a href=\"compare.md\">compare.md</a>.</p>\n</body></html>\n");
    put("index.html", &h)
}

fn summary(r: &CompareReport) -> String {
    let num = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.2}"));
    format!(
        "refd lock-free / refd mutex: {} (target ≥ 4); refd lock-free / RocksDB: {} (target ≥ 40). \
         {} round(s) of {} s per row, rows alternating, on {}; {:.0} s in all.",
        num(r.lockfree_over_mutex),
        num(r.lockfree_over_rocksdb),
        r.rounds,
        r.duration_s,
        r.device,
        r.elapsed_s
    )
}

fn html_table(r: &CompareReport) -> String {
    use crate::report::escape;
    let mut t = String::from(
        "<table>\n<tr><th>row</th><th>ops/s (median)</th><th>rounds</th><th>p99 ms</th>\
         <th>device MB/s</th><th>× refd lock-free</th><th>how</th></tr>\n",
    );
    for row in &r.rows {
        let middle = match &row.skipped {
            Some(why) => format!("<td colspan=\"5\">skipped: {}</td>", escape(why)),
            None => cells(row)
                .iter()
                .map(|c| format!("<td class=\"n\">{}</td>", escape(c)))
                .collect(),
        };
        t.push_str(&format!(
            "<tr><td>{}</td>{middle}<td>{}</td></tr>\n",
            row.name,
            escape(&row.how)
        ));
    }
    t.push_str("</table>\n");
    t
}

/// Ops/s of each measured row, bars on a log axis.
fn bar_chart(r: &CompareReport) -> Result<String, String> {
    use crate::report::draw_err;
    use plotters::prelude::*;
    let bars: Vec<(&str, f64)> = r
        .rows
        .iter()
        .filter_map(|row| row.ops_per_sec.map(|o| (row.name, o.max(1.0))))
        .collect();
    if bars.is_empty() {
        return Ok(String::new());
    }
    let top = bars.iter().map(|b| b.1).fold(10.0, f64::max) * 3.0;
    let names: Vec<String> = bars.iter().map(|b| b.0.to_string()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0f64..bars.len() as f64, (1f64..top).log_scale())
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(bars.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - i as f64 - 0.5).abs() < 0.26 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("ops/s (log)")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(draw_err)?;
        let blue = RGBColor(31, 119, 180);
        chart
            .draw_series(bars.iter().enumerate().map(|(i, b)| {
                Rectangle::new(
                    [(i as f64 + 0.15, 1.0), (i as f64 + 0.85, b.1)],
                    blue.filled(),
                )
            }))
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}
