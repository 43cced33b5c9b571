//! `refd-bench crash`: real crashes. A child process ingests ops through
//! the durable engine on PATH and prints the id of every op once
//! `add_durable` has returned (the op is durable); the parent kills it with
//! SIGKILL at a random moment, N rounds (every child first recovers what
//! the previous one left; the last round's kill waits for its child's
//! first acknowledgement), then recovers once more and checks that every
//! acknowledged op is present exactly once and the device verifies.
//!
//! Ops, by id (each round uses its own id range): every fourth id allocates
//! a new extent with the backref `objectid = id`; the three ids after it
//! add a backref `objectid = id` to that extent. So every acknowledged op
//! is one backref that must exist with count exactly 1.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{DurableEngine, FormatOptions, OpenOptions};
use refd_ioring::{Device, FileAllocation, UringConfig, UringStorage};

/// Ids of one round: round r uses `r * ROUND_IDS ..`.
const ROUND_IDS: u64 = 1 << 32;
/// Ops between commits in the child.
const COMMIT_EVERY: u64 = 1000;
/// Size of a device file the benchmark creates.
const DEVICE_BYTES_DEFAULT: u64 = 256 << 20;
/// Longest wait for the last round's first acknowledgement before its
/// kill (see [`run`]).
const LAST_ROUND_ACK_WAIT: Duration = Duration::from_secs(20);
/// How long opening a busy block device or a locked file is retried (see
/// [`open_device`]).
const BUSY_RETRY: Duration = Duration::from_secs(5);

/// Arguments of `crash`.
#[derive(Debug, clap::Args)]
pub struct CrashArgs {
    /// Block device or file (created if missing). Its content is destroyed.
    #[arg(long)]
    pub device: PathBuf,
    /// Kill-and-recover rounds.
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Longest time a child runs before it is killed (ms); each round picks
    /// a random moment up to this.
    #[arg(long, default_value_t = 400)]
    pub kill_after_ms_max: u64,
    /// RNG seed of the kill moments.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the hidden child.
#[derive(Debug, clap::Args)]
pub struct ChildArgs {
    /// Device.
    #[arg(long)]
    pub device: PathBuf,
    /// Round number (selects the id range).
    #[arg(long)]
    pub round: u64,
}

/// Open a device or file for the durable engine (errors name the device).
pub(crate) fn open_device(path: &Path) -> Result<Arc<UringStorage>, String> {
    // A killed process's exclusive open of a block device (or flock of a
    // file) is released only when the kernel has torn down its io_uring
    // (asynchronously, after the in-flight I/O): a restart right after a
    // SIGKILL may find the device busy for a moment.
    UringStorage::open_when_free(path, 0, UringConfig::default(), BUSY_RETRY)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn extent_of(id: u64) -> u64 {
    (1 << 30) + (id - id % 4) * 4096
}

fn op_of(id: u64) -> Op {
    let action = if id.is_multiple_of(4) {
        Action::AddExtent
    } else {
        Action::AddRef
    };
    Op::new(
        extent_of(id),
        4096,
        ExtentKind::Data,
        action,
        RefKey::ExtentData {
            root: 5,
            objectid: id,
            offset: 0,
        },
        0,
    )
    .expect("valid op")
}

/// The child: recover, then ingest until killed.
pub fn child(args: &ChildArgs) -> Result<(), String> {
    let (engine, _) = DurableEngine::open(open_device(&args.device)?, OpenOptions::default())
        .map_err(|e| e.to_string())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let base = args.round * ROUND_IDS;
    for i in 0.. {
        let id = base + i;
        engine.add_durable(&op_of(id)).map_err(|e| e.to_string())?;
        // Acknowledged: the op is durable.
        writeln!(out, "{id}")
            .and_then(|()| out.flush())
            .map_err(|e| e.to_string())?;
        if i % COMMIT_EVERY == COMMIT_EVERY - 1 {
            engine.commit().map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Result of a crash run.
#[derive(Debug, serde::Serialize)]
pub struct CrashReport {
    /// Rounds run.
    pub rounds: u64,
    /// Ops acknowledged by the children.
    pub acked: u64,
    /// Acknowledged ops missing after recovery.
    pub lost: u64,
    /// Backrefs present more than once.
    pub duplicated: u64,
    /// Ops present that were never acknowledged (durable but killed before
    /// the acknowledgement was printed): allowed.
    pub unacked_present: u64,
    /// The recovered device passed verification.
    pub verify_clean: bool,
    /// Extents after recovery.
    pub extents: usize,
    /// Wall time.
    pub elapsed_s: f64,
}

/// Run `crash`.
pub fn run(args: &CrashArgs) -> Result<CrashReport, String> {
    let started = Instant::now();
    let path = &args.device;
    if !path.exists() {
        Device::create_file(path, DEVICE_BYTES_DEFAULT, FileAllocation::Reserve)
            .map_err(|e| e.to_string())?;
    }
    DurableEngine::format(&open_device(path)?, FormatOptions::default())
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..args.rounds {
        let mut child = Command::new(&exe)
            .args(["crash-child", "--device"])
            .arg(path)
            .args(["--round", &round.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn child: {e}"))?;
        let stdout = child.stdout.take().ok_or("child stdout")?;
        let seen = Arc::new(AtomicUsize::new(0));
        let reader = std::thread::spawn({
            let seen = Arc::clone(&seen);
            move || {
                // Every parsed id is an acknowledged op: the child prints an
                // id only once its op is durable (a last line cut short by
                // the kill before its newline is still a whole id, or does
                // not parse).
                let mut got = Vec::new();
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(id) = line.trim().parse::<u64>() {
                        got.push(id);
                        seen.store(got.len(), Ordering::Relaxed);
                    }
                }
                got
            }
        });
        std::thread::sleep(Duration::from_millis(
            rng.gen_range(1..=args.kill_after_ms_max.max(1)),
        ));
        if round + 1 == args.rounds {
            // The last round is killed only once its child acknowledged an
            // op (waiting up to LAST_ROUND_ACK_WAIT), so that every run
            // checks acknowledged ops however slow the machine; the
            // earlier rounds may die anywhere, recovery included.
            // A child that ended by itself (its output closed) is not
            // waited for: the exit status below reports it.
            let deadline = Instant::now() + LAST_ROUND_ACK_WAIT;
            while seen.load(Ordering::Relaxed) == 0
                && Instant::now() < deadline
                && !reader.is_finished()
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // SIGKILL on Unix.
        let _ = child.kill();
        let status = child.wait().map_err(|e| format!("wait child: {e}"))?;
        let got = reader.join().map_err(|_| "reader thread panicked")?;
        // Killed by the signal: no exit code. Any exit code means the child
        // stopped by itself (an error, e.g. in recovery): a failure.
        if status.code().is_some() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(format!(
                "round {round}: child exited by itself ({status}): {err}"
            ));
        }
        if !args.json {
            eprintln!("round {round}: {} ops acknowledged, killed", got.len());
        }
        acked.extend(got);
    }
    // Recover once more and check.
    let (engine, info) = DurableEngine::open(open_device(path)?, OpenOptions::default())
        .map_err(|e| e.to_string())?;
    if !args.json {
        eprintln!("recovery: {info}");
    }
    engine.commit().map_err(|e| e.to_string())?;
    let verify_clean = engine.verify().is_ok();
    let tree = engine.committed_extents().map_err(|e| e.to_string())?;
    let mut lost = 0;
    for &id in &acked {
        let key = RefKey::ExtentData {
            root: 5,
            objectid: id,
            offset: 0,
        };
        if tree.get(extent_of(id)).map_or(0, |e| e.count(&key)) == 0 {
            lost += 1;
        }
    }
    let acked_set: std::collections::HashSet<u64> = acked.iter().copied().collect();
    let (mut duplicated, mut unacked_present) = (0, 0);
    for (_, item) in tree.iter() {
        for (key, count) in item.backrefs() {
            if count > 1 {
                duplicated += 1;
            }
            if let RefKey::ExtentData { objectid, .. } = key {
                if !acked_set.contains(&objectid) {
                    unacked_present += 1;
                }
            }
        }
    }
    Ok(CrashReport {
        rounds: args.rounds,
        acked: acked.len() as u64,
        lost,
        duplicated,
        unacked_present,
        verify_clean,
        extents: tree.len(),
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}
