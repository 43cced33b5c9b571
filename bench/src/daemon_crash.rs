//! `refd-bench daemon-crash`: kill -9 a refd daemon in the middle of a
//! pipelined load from several `refd-client` clients, restart it, let the
//! clients reconnect and retry, N rounds; then check, through the daemon
//! and offline:
//!
//! - every acknowledged op is present exactly once, and no batch was
//!   applied twice (each ref op names its own objectid, so a count of 2
//!   is a batch applied twice, a missing one a lost ack);
//! - the freed lists are complete and right: every extent whose last ref
//!   was dropped (and acknowledged) is reported freed exactly once, by a
//!   consumer subscribed before the load, and no extent still referenced
//!   is ever reported;
//! - every extent still allocated has its one ref;
//! - the daemon exits 0 on SIGTERM, and the device verifies (the durable
//!   engine's full check: B+tree, items, log, service state).
//!
//! Load: `--clients` clients (one connection and session each), each
//! shared by `--threads` threads, so a client has several SUBMITs in
//! flight on one connection. A batch holds `--batch - 2` ref ops on the
//! client's shared extents (new refs; once a thread holds 4096, half new
//! refs and half drops of its oldest acknowledged ones), the allocation
//! of a fresh extent and the drop of one allocated by an earlier
//! acknowledged batch of the same thread.
//! A SUBMIT that fails with an unknown outcome is resent with its ticket
//! (same session and request number) until it is answered: the retry a
//! real client does after a restart.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use refd_client::{Client, ClientConfig, Error, FreedCursor, Outcome, SubmitOptions};
use refd_proto::{
    WireOp, ACTION_ADD_EXTENT, ACTION_ADD_REF, ACTION_DROP_REF, SUBMIT_REPLY_DUPLICATE,
};
use serde::Serialize;

use crate::spawn::{DaemonSpec, Spawned};

/// Arguments of `daemon-crash`.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonCrashArgs {
    /// The device (formatted first: its content is destroyed; default: a
    /// new file, removed after).
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Size of a device file created (GiB).
    #[arg(long, default_value_t = 1)]
    pub device_gib: u64,
    /// The refd binary (default: beside this one, else this one's copy).
    #[arg(long)]
    pub refd: Option<PathBuf>,
    /// Kills (each followed by a restart).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Clients (connections and sessions).
    #[arg(long, default_value_t = 3)]
    pub clients: u64,
    /// Threads per client (SUBMITs in flight per connection).
    #[arg(long, default_value_t = 4)]
    pub threads: u64,
    /// Ops per SUBMIT (at least 3).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// A kill comes at a random moment up to this long after the
    /// (re)start (at least 100 ms).
    #[arg(long, default_value_t = 1500)]
    pub kill_after_ms_max: u64,
    /// The daemon's commit interval (commits, and so freed lists, between
    /// kills).
    #[arg(long, default_value_t = 200)]
    pub commit_interval_ms: u64,
    /// Random seed of the kill times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `daemon-crash` found. `ok` is the verdict.
#[derive(Debug, Serialize)]
pub struct DaemonCrashReport {
    /// Every check passed.
    pub ok: bool,
    /// Kills done.
    pub rounds: usize,
    /// SUBMITs acknowledged.
    pub batches_acked: u64,
    /// Ops in them.
    pub ops_acked: u64,
    /// SUBMITs resent with their ticket after an unknown outcome.
    pub resubmits: u64,
    /// Answers with the DUPLICATE flag (answered from a kept reply).
    pub duplicate_answers: u64,
    /// Acknowledged ref ops not present.
    pub lost: u64,
    /// Ref ops present more than once.
    pub duplicated: u64,
    /// Ref ops present that no client sent.
    pub unexpected: u64,
    /// Refs whose drop was acknowledged, still present.
    pub dropped_present: u64,
    /// Extents whose last ref was dropped (acknowledged).
    pub freed_expected: u64,
    /// Of them, not in any freed list.
    pub freed_missing: u64,
    /// Freed extents reported more than once.
    pub freed_twice: u64,
    /// Extents reported freed that were never dropped (still referenced).
    pub freed_wrong: u64,
    /// Allocated extents not dropped whose refs are not 1.
    pub live_wrong: u64,
    /// Commits the daemon had made at the end.
    pub generation: u64,
    /// The daemon's exit status after SIGTERM.
    pub daemon_exit: Option<i32>,
    /// The device passed the durable engine's full check.
    pub verify_clean: bool,
    /// Wall time.
    pub elapsed_s: f64,
}

/// Shared extents per client: its ref ops go round them (a few hundred
/// extents with many refs each, not one extent with millions).
const SHARED_PER_CLIENT: u64 = 256;

/// Refs on the shared extents one thread keeps; past it, each batch drops
/// as many as it adds.
const LIVE_REFS_PER_THREAD: usize = 4096;

/// Shared extent `i` of client `c`.
fn shared_extent(c: u64, i: u64) -> u64 {
    (1 << 30) + (c * SHARED_PER_CLIENT + i) * (1 << 20)
}

/// The `k`-th fresh extent of thread `t` of client `c`.
fn fresh_extent(c: u64, t: u64, k: u64) -> u64 {
    (1 << 40) + ((c << 8 | t) << 28) + k * 4096
}

fn data(action: u8, bytenr: u64, objectid: u64) -> WireOp {
    WireOp::data_ref(action, bytenr, 4096, 5, objectid, 0)
}

/// What one thread had acknowledged.
#[derive(Debug, Default)]
struct ThreadLog {
    /// Its refs on the shared extents, (bytenr, objectid), oldest first.
    refs: std::collections::VecDeque<(u64, u64)>,
    /// Its refs dropped again.
    refs_dropped: Vec<(u64, u64)>,
    /// Ops acknowledged.
    ops: u64,
    /// Fresh extents allocated and still referenced.
    live: Vec<u64>,
    /// Fresh extents dropped.
    dropped: Vec<u64>,
    batches: u64,
    resubmits: u64,
    duplicates: u64,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    batches: AtomicU64,
}

fn client_config(name: String) -> ClientConfig {
    let mut config = ClientConfig::default();
    config.name = name;
    // Long enough for a restart with recovery; a call that still times
    // out is retried with its ticket.
    config.request_timeout = Duration::from_secs(60);
    config.reconnect_timeout = Duration::from_secs(60);
    config.resends_max = 1000;
    config
}

/// Submits `ops` until answered: an unknown outcome is resent with its
/// ticket (exactly once), a refusal before sending is retried as new.
fn submit_until_answered(
    client: &Client,
    ops: &[WireOp],
    log: &mut ThreadLog,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut ticket = None;
    let mut result = client.submit_recorded(ops, SubmitOptions::default(), |t| {
        ticket = Some(t);
        Ok(())
    });
    loop {
        match result {
            Ok(reply) => {
                if reply.flags & SUBMIT_REPLY_DUPLICATE != 0 {
                    log.duplicates += 1;
                }
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => {
                return Err(format!("a SUBMIT was not answered in 300 s: {e}"))
            }
            Err(e) => match (e.outcome(), ticket) {
                (Outcome::NotApplied, _) | (Outcome::Unknown, None) => {
                    std::thread::sleep(Duration::from_millis(50));
                    ticket = None;
                    result = client.submit_recorded(ops, SubmitOptions::default(), |t| {
                        ticket = Some(t);
                        Ok(())
                    });
                }
                (Outcome::Unknown, Some(t)) => {
                    log.resubmits += 1;
                    result = client.resubmit(t, ops, SubmitOptions::default());
                }
                (_, _) => return Err(format!("SUBMIT failed: {e}")),
            },
        }
    }
}

fn load_thread(
    client: &Client,
    c: u64,
    t: u64,
    batch: usize,
    shared: &Shared,
) -> Result<ThreadLog, String> {
    let mut log = ThreadLog::default();
    // Objectids of this thread: disjoint from every other thread's and
    // from the shared extent's own allocation (objectid 1).
    let mut objectid = (c << 40 | t << 32) + 1000;
    let mut fresh = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut ops = Vec::with_capacity(batch);
        // Past its window a thread drops as many refs as it adds, so the
        // shared extents stay the same size (a commit's cost grows with
        // the backrefs of the extents it touches).
        let drops = if log.refs.len() > LIVE_REFS_PER_THREAD {
            (batch - 2) / 2
        } else {
            0
        };
        let mut refs = Vec::with_capacity(batch);
        for _ in 0..batch - 2 - drops {
            objectid += 1;
            let x = shared_extent(c, objectid % SHARED_PER_CLIENT);
            refs.push((x, objectid));
            ops.push(data(ACTION_ADD_REF, x, objectid));
        }
        for &(x, o) in log.refs.iter().take(drops) {
            ops.push(data(ACTION_DROP_REF, x, o));
        }
        let new = fresh_extent(c, t, fresh);
        fresh += 1;
        ops.push(data(ACTION_ADD_EXTENT, new, 1));
        // Drop the oldest fresh extent an earlier batch allocated.
        let drop = (log.live.len() > 4).then(|| log.live.remove(0));
        if let Some(old) = drop {
            ops.push(data(ACTION_DROP_REF, old, 1));
        }
        submit_until_answered(client, &ops, &mut log)?;
        log.ops += ops.len() as u64;
        let dropped: Vec<(u64, u64)> = log.refs.drain(..drops).collect();
        log.refs_dropped.extend(dropped);
        log.refs.extend(refs);
        log.live.push(new);
        log.dropped.extend(drop);
        log.batches += 1;
        shared.batches.fetch_add(1, Ordering::Relaxed);
    }
    Ok(log)
}

/// Run `daemon-crash`.
pub fn run(a: &DaemonCrashArgs) -> Result<DaemonCrashReport, String> {
    if a.batch < 3 || a.clients == 0 || a.threads == 0 || a.threads > 255 {
        return Err("--batch must be at least 3, --clients and --threads 1..=255".into());
    }
    let started = Instant::now();
    if let Some(device) = &a.device {
        if !device.exists() {
            refd_ioring::Device::create_file(
                device,
                a.device_gib << 30,
                refd_ioring::FileAllocation::Reserve,
            )
            .map_err(|e| format!("create {}: {e}", device.display()))?;
        }
        let storage = crate::crash::open_device(device)?;
        refd_durable::DurableEngine::format(&storage, refd_durable::FormatOptions::default())
            .map_err(|e| format!("format {}: {e}", device.display()))?;
    }
    let mut daemon = Spawned::start(&DaemonSpec {
        refd: a.refd.clone(),
        device: a.device.clone(),
        device_gib: a.device_gib,
        store: "lockfree".into(),
        prefault_mib: 0,
        args: vec![
            "--commit-interval-ms".into(),
            a.commit_interval_ms.to_string(),
        ],
        listen: None,
        quiet: a.json,
    })?;
    let addr = daemon.address().to_string();
    let check = Client::connect(&addr, client_config("daemon-crash-check".into()))
        .map_err(|e| e.to_string())?;
    let consumer = check
        .freed_subscribe("daemon-crash")
        .map_err(|e| e.to_string())?;
    let clients: Vec<Arc<Client>> = (0..a.clients)
        .map(|c| {
            Client::connect(&addr, client_config(format!("daemon-crash-{c}")))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    // Each client allocates its shared extents.
    let mut setup = ThreadLog::default();
    for (c, client) in clients.iter().enumerate() {
        let ops: Vec<WireOp> = (0..SHARED_PER_CLIENT)
            .map(|i| data(ACTION_ADD_EXTENT, shared_extent(c as u64, i), 1))
            .collect();
        submit_until_answered(client, &ops, &mut setup)?;
    }
    let shared = Arc::new(Shared::default());
    let mut threads = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        for t in 0..a.threads {
            let (client, shared, batch) = (Arc::clone(client), Arc::clone(&shared), a.batch);
            threads.push((
                c,
                std::thread::spawn(move || {
                    let r = load_thread(&client, c as u64, t, batch, &shared);
                    if r.is_err() {
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    r
                }),
            ));
        }
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(a.seed);
    let mut killed = Ok(());
    for round in 0..a.rounds {
        let ms = rng.gen_range(100..=a.kill_after_ms_max.max(100));
        std::thread::sleep(Duration::from_millis(ms));
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if let Err(e) = daemon.kill9_and_restart() {
            killed = Err(format!("round {round}: {e}"));
            break;
        }
        if !a.json {
            eprintln!(
                "round {round}: killed after {ms} ms and restarted; {} batches acknowledged so far",
                shared.batches.load(Ordering::Relaxed)
            );
        }
    }
    // Let the clients finish against the last start, then stop them.
    std::thread::sleep(Duration::from_millis(500));
    shared.stop.store(true, Ordering::Relaxed);
    if !a.json {
        eprintln!(
            "{:6.1} s: stopping the clients",
            started.elapsed().as_secs_f64()
        );
    }
    let mut logs: Vec<Vec<ThreadLog>> = (0..a.clients).map(|_| Vec::new()).collect();
    let mut failed = killed.err();
    for (c, h) in threads {
        match h.join().map_err(|_| "a load thread panicked".to_string()) {
            Ok(Ok(log)) => logs[c].push(log),
            Ok(Err(e)) | Err(e) => failed = failed.or(Some(e)),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let say = |what: &str| {
        if !a.json {
            eprintln!("{:6.1} s: {what}", started.elapsed().as_secs_f64());
        }
    };
    say("clients stopped; committing and checking through the daemon");
    let mut report = check_state(&check, consumer.acked_generation, &logs)?;
    say("checked; stopping the daemon (SIGTERM) and verifying the device");
    drop(clients);
    drop(check);
    report.rounds = a.rounds;
    report.daemon_exit = daemon.terminate();
    report.verify_clean = verify_offline(daemon.device());
    let _ = daemon.stop();
    report.elapsed_s = started.elapsed().as_secs_f64();
    report.ok = report.lost == 0
        && report.duplicated == 0
        && report.unexpected == 0
        && report.dropped_present == 0
        && report.freed_missing == 0
        && report.freed_twice == 0
        && report.freed_wrong == 0
        && report.live_wrong == 0
        && report.daemon_exit == Some(0)
        && report.verify_clean;
    Ok(report)
}

/// Commits, then compares the daemon's state with what was acknowledged.
fn check_state(
    client: &Client,
    acked_at_subscribe: u64,
    logs: &[Vec<ThreadLog>],
) -> Result<DaemonCrashReport, String> {
    let err = |e: Error| e.to_string();
    let commit = client.commit().map_err(err)?;
    let mut r = DaemonCrashReport {
        ok: false,
        rounds: 0,
        batches_acked: 0,
        ops_acked: 0,
        resubmits: 0,
        duplicate_answers: 0,
        lost: 0,
        duplicated: 0,
        unexpected: 0,
        dropped_present: 0,
        freed_expected: 0,
        freed_missing: 0,
        freed_twice: 0,
        freed_wrong: 0,
        live_wrong: 0,
        generation: commit.generation,
        daemon_exit: None,
        verify_clean: false,
        elapsed_s: 0.0,
    };
    let mut live = Vec::new();
    let mut dropped: HashMap<u64, u32> = HashMap::new();
    for (c, threads) in logs.iter().enumerate() {
        // Per shared extent: objectid -> whether its ref is live.
        let mut sent: HashMap<u64, HashMap<u64, bool>> = HashMap::new();
        for log in threads {
            r.batches_acked += log.batches;
            r.resubmits += log.resubmits;
            r.duplicate_answers += log.duplicates;
            r.ops_acked += log.ops;
            for &(x, o) in &log.refs {
                sent.entry(x).or_default().insert(o, true);
            }
            for &(x, o) in &log.refs_dropped {
                sent.entry(x).or_default().insert(o, false);
            }
            live.extend(&log.live);
            for &d in &log.dropped {
                dropped.insert(d, 0);
            }
        }
        let none = HashMap::new();
        for i in 0..SHARED_PER_CLIENT {
            let x = shared_extent(c as u64, i);
            let present = backref_counts(client, x)?;
            let sent = sent.get(&x).unwrap_or(&none);
            for (o, &is_live) in sent {
                match (is_live, present.get(o)) {
                    (true, None) => r.lost += 1,
                    (true, Some(1)) | (false, None) => {}
                    (true, Some(_)) => r.duplicated += 1,
                    // An acknowledged drop not applied, or an add applied
                    // twice.
                    (false, Some(_)) => r.dropped_present += 1,
                }
            }
            // Besides these: the extent's allocation (objectid 1, once).
            // Every thread's last batch is acknowledged before it stops,
            // so nothing else was sent.
            for (&o, &n) in &present {
                if o == 1 {
                    r.duplicated += u64::from(n != 1);
                } else if !sent.contains_key(&o) {
                    r.unexpected += 1;
                }
            }
        }
    }
    r.freed_expected = dropped.len() as u64;
    // Every freed list since the consumer subscribed.
    let mut cursor = FreedCursor::after_ack(acked_at_subscribe);
    loop {
        let page = client.freed(cursor, 16384).map_err(err)?;
        for e in &page.extents {
            match dropped.get_mut(&e.bytenr) {
                Some(n) => {
                    *n += 1;
                    if *n == 2 {
                        r.freed_twice += 1;
                    }
                }
                None => r.freed_wrong += 1,
            }
        }
        let next = FreedCursor::next(&page);
        if !page.more || next == cursor {
            break;
        }
        cursor = next;
    }
    r.freed_missing = dropped.values().filter(|&&n| n == 0).count() as u64;
    for chunk in live.chunks(16384) {
        for e in client.lookup(chunk).map_err(err)? {
            if e.refs != 1 {
                r.live_wrong += 1;
            }
        }
    }
    Ok(r)
}

/// objectid -> count of every backref of `bytenr`, page by page.
fn backref_counts(client: &Client, bytenr: u64) -> Result<BTreeMap<u64, i64>, String> {
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let page = client
            .backrefs_page(bytenr, after, 16384)
            .map_err(|e| e.to_string())?;
        for e in &page.entries {
            *out.entry(e.k2).or_insert(0) += e.count;
        }
        after = page.entries.last().map(|e| e.key());
        if !page.more {
            return Ok(out);
        }
    }
}

/// The durable engine's full check of the device (the daemon stopped).
fn verify_offline(device: &std::path::Path) -> bool {
    let Ok(storage) = crate::crash::open_device(device) else {
        return false;
    };
    match refd_durable::DurableEngine::open(storage, refd_durable::OpenOptions::default()) {
        Ok((engine, _)) => engine.verify().is_ok(),
        Err(_) => false,
    }
}
