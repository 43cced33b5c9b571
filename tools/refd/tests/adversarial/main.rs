//! Adversarial op streams over the wire, checked against the oracle.
//!
//! Each seed starts `refd serve` on a file device (odd seeds with
//! `--verify`, seeds 2 and 3 modulo 4 with `--impl mutex`), and three refd-client sessions drive it with hostile
//! streams (`gen.rs`): every action and backref kind, counts above one,
//! drops below zero and of refs that never existed, allocations of live
//! extents, overlapping ones and ones of another size or kind, free and
//! re-allocate within a commit and across commits, extent_ops with and
//! without a key, ops invalid at validation (one per batch, anywhere in
//! it, also last in a batch of `submit_ops_max` ops), huge batches,
//! NO_WAIT, STAMP_SEQ under seq barriers held across commits, retries of
//! a SUBMIT, raw SUBMIT frames the client would not send (empty, an
//! `op_count` that disagrees with the body, unknown flags, request
//! number 0), COMMITs at random points, and one or two kill -9 and
//! restarts.
//!
//! What makes the expected state exact with concurrency: each client
//! owns a slice of bytenrs, so the ops of one extent reach the daemon in
//! one client's order (as btrfs queues one extent's refs); the slices are
//! adjacent, so allocations overlap across clients, which the commit
//! decides from the extents' states alone, whatever the interleaving.
//! Commits happen only where the test asks (a commit interval of an hour,
//! the dirty-bytes trigger off; every COMMIT reply's generation is
//! checked to follow the last one): between rounds, when every client has
//! stopped, or inside a round in which one client runs alone. Barriers
//! are taken and released between rounds, so STAMP_SEQ's seq is known.
//!
//! The oracle (`refd_core::oracle::Model`) is fed every batch the daemon
//! accepted, in each client's order, and commits where the daemon did.
//! Every reply is checked against what the test states on its own: a
//! batch with an invalid op gets `INVALID_OP` with its index and subcode
//! (docs/protocol.md); with `--verify`, `REFUSED` exactly where a
//! ref-verify shadow (`expect.rs`) refuses; otherwise it is accepted
//! (durable unless NO_WAIT; a retry is `DUPLICATE` with the same LSN).
//! After each round LOOKUP of every slot equals the model's would-be
//! count; each COMMIT's freed, quarantined and held counts equal the
//! model's; after a commit with no barrier held, and at the end, LOOKUP
//! and BACKREFS of every slot equal the model's extents (counts, every
//! backref, size, kind, level, FULL_BACKREF). At the end also STATS
//! (`engine.extents`, `engine.quarantined`, nothing pending), the FREED
//! stream (per commit, exactly the model's freed ranges minus what the
//! model's extents after it cover, each byte once: `Model::reusable`), a
//! clean SIGTERM, `refctl fsck` of the device, and the device's extent
//! tree opened in-process equal to the model's, tree keys and generations
//! included.
//!
//! The kill: after a COMMIT (with every barrier released, or with one
//! held so that heads stay held across the restart), one round of
//! durable and NO_WAIT batches, then kill -9, without `--verify` while
//! one more durable SUBMIT is on its way (refd-client sends it again
//! after the restart with its request number: it is in the replayed log,
//! or applied once after it, never both). Durable batches must
//! survive; a NO_WAIT batch may be lost, whole. After the restart the
//! test first reads every slot, then sends each NO_WAIT batch again with
//! its request number: `DUPLICATE` means it survived, anything else that
//! it was lost (it is then applied, or refused, as a new batch). The ops
//! of the surviving batches must be the ops the daemon says it replayed,
//! and what it showed before the resends must be the model's with the
//! lost batches left out (the replayed log is committed before serving,
//! held heads with it; with nothing replayed they stay pending, their
//! seqs forgotten). (Choosing the lost batches from what the daemon shows
//! alone is ambiguous: two NO_WAIT batches of one size whose ops were all
//! refused look alike; seed 110 chose the wrong one.) A durable batch
//! retried after the restart is `DUPLICATE`.
//!
//! `REFD_ADVERSARIAL_SEEDS=N` runs N seeds (default 4) from
//! `REFD_ADVERSARIAL_FIRST_SEED` (default 0); `REFD_ADVERSARIAL_SEED=S`
//! only seed S.

#[path = "../common/mod.rs"]
mod common;
mod expect;
mod gen;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use refd_client::{Client, ClientConfig, Error as ClientError, SubmitOptions, SubmitTicket};
use refd_core::model::Op;
use refd_core::oracle::{normalize_tree, Model, ModelCommit, NormExtent};
use refd_proto::*;

use common::{Daemon, Raw, Target};
use expect::{daemon_view, first_difference, Shadow, View};
use gen::{Act, Batch, Belief, RawKind, HUGE_OPS};

const MIB: u64 = 1 << 20;
const CLIENTS: usize = 3;
/// Events (rounds, commits, barrier changes) per seed.
const STEPS: usize = 36;
/// The engine keeps this many refused heads for STATS.
const QUARANTINE_KEEP: u64 = 10_000;

/// A SUBMIT sent as the daemon is killed: its answer (after the
/// client's resends), its client and its batch.
type InFlight = (Result<SubmitReply, ErrorBody>, (usize, Batch));

/// A batch the daemon accepted since the last commit.
#[derive(Clone, Debug)]
struct Accepted {
    ops: Vec<Op>,
    /// A NO_WAIT batch: its client, ticket and batch (to be sent again
    /// after a kill).
    no_wait: Option<(usize, SubmitTicket, Batch)>,
}

/// What a seed exercised, printed at its end.
#[derive(Debug, Default)]
struct Tally {
    accepted: u64,
    ops: u64,
    invalid_op: u64,
    refused: u64,
    retries: u64,
    raw: u64,
    huge: u64,
    no_wait: u64,
    stamped: u64,
    held: u64,
    quarantined: u64,
    freed: u64,
    lost_at_kill: u64,
}

/// The test's own account of what the daemon must hold.
struct Oracle {
    model: Model,
    /// The model right after the last commit (pending: held ops only).
    base: Model,
    since: Vec<Accepted>,
    /// Some with `--verify`.
    shadow: Option<Shadow>,
    /// Model generation → the daemon's.
    gens: BTreeMap<u64, u64>,
    /// Daemon generation → the extents its commit freed.
    freed: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Heads refused since the daemon started.
    quarantined: u64,
    /// Held barriers: (id, seq).
    barriers: Vec<(u64, u64)>,
    /// The seq STAMP_SEQ sets now: the last barrier's.
    seq_current: u64,
    /// The daemon's last committed generation.
    generation: u64,
    tally: Tally,
}

impl Oracle {
    fn new(verify: bool, generation: u64) -> Oracle {
        Oracle {
            model: Model::new(),
            base: Model::new(),
            since: Vec::new(),
            shadow: verify.then(Shadow::default),
            gens: BTreeMap::new(),
            freed: BTreeMap::new(),
            quarantined: 0,
            barriers: Vec::new(),
            seq_current: 0,
            generation,
            tally: Tally::default(),
        }
    }

    fn lowest_barrier(&self) -> u64 {
        self.barriers.iter().map(|b| b.1).min().unwrap_or(0)
    }

    /// The batch's ops as the daemon queues them (STAMP_SEQ applied).
    fn stamped(&self, batch: &Batch) -> Vec<Op> {
        let mut ops = batch.ops.clone();
        if batch.stamp_seq {
            ops.iter_mut()
                .filter(|o| o.seq == 0)
                .for_each(|o| o.seq = self.seq_current);
        }
        ops
    }

    /// What a SUBMIT of `batch` must get: accepted, or `(code, index,
    /// subcode)`. Records the batch in the verify shadow if it passes.
    fn expect_submit(&mut self, batch: &Batch, ops: &[Op]) -> Result<(), (ErrorCode, u32, u16)> {
        if let Some((i, subcode)) = batch.invalid {
            return Err((ErrorCode::InvalidOp, i as u32, subcode));
        }
        match &mut self.shadow {
            Some(s) => s
                .check_batch(ops)
                .map_err(|i| (ErrorCode::Refused, i as u32, 0)),
            None => Ok(()),
        }
    }

    fn accept(&mut self, ops: Vec<Op>, no_wait: Option<(usize, SubmitTicket, Batch)>) {
        self.tally.accepted += 1;
        self.tally.ops += ops.len() as u64;
        ops.iter().for_each(|op| self.model.add(op));
        self.since.push(Accepted { ops, no_wait });
    }

    /// The daemon committed as `generation` what the model committed
    /// into `m`.
    fn record(&mut self, m: &ModelCommit, generation: u64) {
        self.gens.insert(self.model.generation, generation);
        self.generation = generation;
        let reusable = self.model.reusable(&m.freed);
        if !reusable.is_empty() {
            self.freed.insert(generation, reusable);
        }
        self.quarantined += m.quarantined.len() as u64;
        self.tally.quarantined += m.quarantined.len() as u64;
        self.tally.held += m.held.len() as u64;
        self.tally.freed += m.freed.len() as u64;
        if let Some(s) = &mut self.shadow {
            for &b in &m.quarantined {
                s.resync(b, &self.model.extents);
            }
        }
        self.base = self.model.clone();
        self.since.clear();
    }

    /// A COMMIT reply against the model's commit.
    fn commit(&mut self, r: &CommitReply, at: &str) {
        assert_eq!(
            r.generation,
            self.generation + 1,
            "{at}: a commit the test did not ask for happened ({r:?})"
        );
        let m = self.model.commit(self.lowest_barrier());
        self.record(&m, r.generation);
        let want = (m.freed.len(), m.quarantined.len(), m.held.len());
        let got = (r.freed as usize, r.quarantined as usize, r.held as usize);
        assert_eq!(
            got, want,
            "{at}: COMMIT (freed, quarantined, held) against the oracle; oracle {m:?}"
        );
    }
}

/// What one act got.
#[derive(Debug)]
enum Done {
    Submitted {
        ticket: SubmitTicket,
        first: Result<SubmitReply, ErrorBody>,
        again: Option<Result<SubmitReply, ErrorBody>>,
    },
    Raw(Reply),
    Committed(CommitReply),
}

/// A server error, or the reply; anything else (a timeout, a broken
/// protocol) fails the test.
fn server_result(r: Result<SubmitReply, ClientError>) -> Result<SubmitReply, ErrorBody> {
    match r {
        Ok(reply) => Ok(reply),
        Err(ClientError::Server { error, .. }) => Err(error),
        Err(e) => panic!("SUBMIT failed other than by a server error: {e}"),
    }
}

fn options(batch: &Batch) -> SubmitOptions {
    SubmitOptions {
        no_wait: batch.no_wait,
        stamp_seq: batch.stamp_seq,
    }
}

/// The raw SUBMIT frame of `kind` (request id `id`), carrying `batch`'s
/// ops.
fn raw_frame(kind: RawKind, batch: &Batch, id: u64) -> Vec<u8> {
    let (mut flags, mut number) = (0u32, u64::MAX / 2 + id);
    let mut count = batch.wire.len() as u32;
    match kind {
        RawKind::Empty => count = 0,
        RawKind::CountAbove => count += 1,
        RawKind::CountBelow => count -= 1,
        RawKind::UnknownFlag => flags = 1 << (2 + id % 30),
        RawKind::RequestZero => number = 0,
    }
    let mut body = Vec::new();
    // Session 1: each of these errors comes before the session check.
    encode_submit(1, number, flags, &batch.wire, &mut body);
    if matches!(kind, RawKind::Empty) {
        body.truncate(SUBMIT_FIXED_BYTES);
    }
    body[16..20].copy_from_slice(&count.to_le_bytes());
    let mut frame = Vec::new();
    encode_frame(Opcode::Submit, 0, id, &body, &mut frame);
    frame
}

/// Runs one act of a script.
fn run_act(client: &Client, raw: &mut Option<(Raw, u64)>, socket: &Path, act: &Act) -> Done {
    match act {
        Act::Submit { batch, retry } => {
            let mut ticket: Option<SubmitTicket> = None;
            let first = client.submit_recorded(&batch.wire, options(batch), |t| {
                ticket = Some(t);
                Ok(())
            });
            let first = server_result(first);
            let ticket = ticket.expect("a ticket before the send");
            let again =
                retry.then(|| server_result(client.resubmit(ticket, &batch.wire, options(batch))));
            Done::Submitted {
                ticket,
                first,
                again,
            }
        }
        Act::Raw { kind, batch } => {
            let (r, next_id) = raw.get_or_insert_with(|| (Raw::hello(socket).0, 1_000_000));
            *next_id += 1;
            r.send_raw(&raw_frame(*kind, batch, *next_id));
            let (got, reply) = r.recv();
            assert_eq!(got, *next_id, "the reply to a raw SUBMIT: {reply:?}");
            Done::Raw(reply)
        }
        Act::Commit => Done::Committed(client.commit().expect("COMMIT")),
    }
}

/// A reply must be `want`: accepted (checked against the batch), or the
/// error with that index and subcode.
fn check_submit(
    got: &Result<SubmitReply, ErrorBody>,
    want: Result<(), (ErrorCode, u32, u16)>,
    batch: &Batch,
    duplicate: bool,
    at: &str,
) {
    match (got, want) {
        (Ok(r), Ok(())) => {
            let durable = if batch.no_wait {
                0
            } else {
                SUBMIT_REPLY_DURABLE
            };
            let dup = if duplicate { SUBMIT_REPLY_DUPLICATE } else { 0 };
            assert_eq!(r.flags, durable | dup, "{at}: reply flags {r:?}");
            assert_eq!(r.op_count as usize, batch.wire.len(), "{at}: {r:?}");
        }
        (Err(e), Err((code, index, subcode))) => {
            assert_eq!(
                (e.code, e.index, e.subcode),
                (code, index, subcode),
                "{at}: {e:?}"
            );
        }
        (got, want) => panic!(
            "{at}: the daemon answered {got:?}, the oracle says {want:?}; batch {:?}",
            batch.invalid
        ),
    }
}

/// One seed's daemon, clients and oracle.
struct Run {
    seed: u64,
    rng: SmallRng,
    target: Target,
    args: Vec<String>,
    daemon: Daemon,
    clients: Vec<Client>,
    oracle: Oracle,
    slots: Vec<u64>,
    /// The FREED consumer and where its stream starts.
    consumer: (u64, u64),
    /// A durable batch per client, retried after the restart.
    last_durable: Vec<Option<(SubmitTicket, Batch, u64)>>,
    huge_left: usize,
}

impl Run {
    fn start(seed: u64) -> Option<Run> {
        let target = Target::new(&format!("refd-adversarial-{seed}"), 256 * MIB, false)?;
        let mut args: Vec<String> = [
            "--commit-interval-ms",
            "3600000",
            "--dirty-trigger-mib",
            "0",
            "--barrier-lease-ms",
            "600000",
            "--sessions-max",
            "32",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let verify = seed % 2 == 1;
        if verify {
            args.push("--verify".into());
        }
        if seed % 4 >= 2 {
            args.extend(["--impl".into(), "mutex".into()]);
        }
        let daemon = Daemon::start(
            &target,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let (_, hello) = Raw::hello(&daemon.socket);
        let clients: Vec<Client> = (0..CLIENTS).map(|c| connect(&daemon.socket, c)).collect();
        let sub = clients[0]
            .freed_subscribe("adversarial")
            .expect("subscribe");
        Some(Run {
            seed,
            rng: SmallRng::seed_from_u64(seed ^ 0x5EED_AD5E),
            target,
            args,
            daemon,
            clients,
            oracle: Oracle::new(verify, hello.generation),
            slots: gen::all_slots(CLIENTS),
            consumer: (sub.consumer_id, sub.acked_generation),
            last_durable: vec![None; CLIENTS],
            huge_left: 3,
        })
    }
}

fn connect(socket: &Path, c: usize) -> Client {
    let mut config = ClientConfig::default();
    config.name = format!("adversarial-{c}");
    Client::connect(&format!("unix:{}", socket.display()), config).expect("connect")
}

impl Run {
    fn at(&self, what: &str) -> String {
        format!(
            "seed {} ({}), generation {}: {what}",
            self.seed,
            if self.oracle.shadow.is_some() {
                "--verify"
            } else {
                "no verify"
            },
            self.oracle.generation
        )
    }

    /// What client `c` believes of its slots: the committed refs.
    fn belief(&self, c: usize) -> Belief {
        let mut b = Belief::default();
        for k in 0..gen::SLOTS {
            let s = gen::slot(c, k);
            if let Some(e) = self.oracle.model.extents.get(&s) {
                let refs = e.refs.iter().map(|(k, &n)| (*k, n as i64)).collect();
                b.refs.insert(s, refs);
            }
        }
        b
    }

    /// Client `c`'s script of `len` acts; COMMITs only when `solo`.
    fn script(&mut self, c: usize, len: usize, solo: bool) -> Vec<Act> {
        let mut belief = self.belief(c);
        let seq = self.oracle.seq_current;
        let mut acts = Vec::with_capacity(len);
        for _ in 0..len {
            let roll = self.rng.gen_range(0..100);
            let n = self.rng.gen_range(1..=6);
            acts.push(if solo && roll < 20 {
                Act::Commit
            } else if roll < 25 {
                let mut scratch = belief.clone();
                let mut batch = gen::batch(&mut self.rng, c, &mut scratch, seq, n);
                batch.invalid = None;
                batch.wire = batch.ops.iter().map(gen::wire).collect();
                let kind = [
                    RawKind::Empty,
                    RawKind::CountAbove,
                    RawKind::CountBelow,
                    RawKind::UnknownFlag,
                    RawKind::RequestZero,
                ][self.rng.gen_range(0..5)];
                Act::Raw { kind, batch }
            } else if roll < 27 && self.huge_left > 0 {
                self.huge_left -= 1;
                let batch = gen::batch(&mut self.rng, c, &mut belief, seq, HUGE_OPS);
                Act::Submit {
                    batch,
                    retry: false,
                }
            } else {
                let batch = gen::batch(&mut self.rng, c, &mut belief, seq, n);
                Act::Submit {
                    batch,
                    retry: self.rng.gen_ratio(1, 6),
                }
            });
        }
        acts
    }

    /// Runs the scripts (client `c` runs `scripts[c]`; all at once) and
    /// checks every answer.
    fn round(&mut self, scripts: Vec<Vec<Act>>) {
        let socket = self.daemon.socket.clone();
        let clients = &self.clients;
        let results: Vec<Vec<Done>> = std::thread::scope(|s| {
            let handles: Vec<_> = scripts
                .iter()
                .zip(clients)
                .map(|(acts, client)| {
                    let socket = &socket;
                    s.spawn(move || {
                        let mut raw = None;
                        acts.iter()
                            .map(|a| run_act(client, &mut raw, socket, a))
                            .collect::<Vec<Done>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (c, (acts, dones)) in scripts.iter().zip(results).enumerate() {
            for (i, (act, done)) in acts.iter().zip(dones).enumerate() {
                let at = self.at(&format!("client {c}, act {i}"));
                self.settle(c, act, done, &at);
            }
        }
        self.check_lookups();
    }

    /// Checks one act's answer and feeds the oracle what was accepted.
    fn settle(&mut self, c: usize, act: &Act, done: Done, at: &str) {
        match (act, done) {
            (
                Act::Submit { batch, .. },
                Done::Submitted {
                    ticket,
                    first,
                    again,
                },
            ) => {
                let ops = self.oracle.stamped(batch);
                let want = self.oracle.expect_submit(batch, &ops);
                let t = &mut self.oracle.tally;
                match want {
                    Err((ErrorCode::InvalidOp, ..)) => t.invalid_op += 1,
                    Err(_) => t.refused += 1,
                    Ok(()) => {
                        t.huge += u64::from(batch.wire.len() == HUGE_OPS);
                        t.no_wait += u64::from(batch.no_wait);
                        t.stamped += u64::from(batch.stamp_seq);
                    }
                }
                t.retries += u64::from(again.is_some());
                check_submit(&first, want, batch, false, at);
                if let Some(again) = &again {
                    check_submit(again, want, batch, true, &format!("{at} (retry)"));
                    if let (Ok(a), Ok(b)) = (&first, again) {
                        assert_eq!(a.lsn, b.lsn, "{at}: a retry's LSN");
                    }
                }
                if let Ok(r) = first {
                    let no_wait = batch.no_wait.then(|| (c, ticket, batch.clone()));
                    if !batch.no_wait {
                        self.last_durable[c] = Some((ticket, batch.clone(), r.lsn));
                    }
                    self.oracle.accept(ops, no_wait);
                }
            }
            (Act::Raw { kind, .. }, Done::Raw(reply)) => {
                self.oracle.tally.raw += 1;
                let want = match kind {
                    RawKind::Empty => ErrorCode::TooManyOps,
                    _ => ErrorCode::BadRequest,
                };
                match reply {
                    Reply::Error(e) if e.code == want => {
                        if want == ErrorCode::TooManyOps {
                            assert_eq!(e.detail, HUGE_OPS as u64, "{at}: {e:?}");
                        }
                    }
                    other => panic!("{at}: raw SUBMIT {kind:?}: want {want:?}, got {other:?}"),
                }
            }
            (Act::Commit, Done::Committed(r)) => self.oracle.commit(&r, at),
            (act, done) => panic!("{at}: {act:?} answered by {done:?}"),
        }
    }

    /// LOOKUP of every slot: the model's would-be count.
    fn check_lookups(&self) {
        let got = self.clients[0].lookup(&self.slots).expect("LOOKUP");
        for e in got {
            let want = self.oracle.model.lookup(e.bytenr);
            assert_eq!(
                e.refs,
                want,
                "{}",
                self.at(&format!("LOOKUP {} after a round: {e:?}", e.bytenr))
            );
        }
    }

    /// LOOKUP and BACKREFS of every slot, BACKREFS in pages of a random
    /// size.
    fn views(&mut self) -> BTreeMap<u64, View> {
        let client = &self.clients[0];
        let lookups = client.lookup(&self.slots).expect("LOOKUP");
        let mut out = BTreeMap::new();
        for l in lookups {
            let page = if l.committed_refs > 64 {
                BACKREFS_ENTRIES_MAX
            } else {
                self.rng.gen_range(1..=4)
            };
            let b = backrefs_paged(client, l.bytenr, page);
            out.insert(l.bytenr, daemon_view(&l, &b));
        }
        out
    }

    /// Every slot as the model has it (nothing may be pending).
    fn check_views(&mut self, what: &str) {
        let views = self.views();
        if let Some(d) = first_difference(&self.oracle.model.extents, &views) {
            panic!("{}", self.at(&format!("{what}: {d}")));
        }
    }

    fn commit(&mut self, what: &str) {
        let r = self.clients[0].commit().expect("COMMIT");
        let at = self.at(what);
        self.oracle.commit(&r, &at);
        if self.oracle.barriers.is_empty() {
            self.check_views(what);
        }
    }

    fn acquire(&mut self) {
        let b = self.clients[0].barrier_acquire().expect("BARRIER_ACQUIRE");
        assert!(
            b.seq > self.oracle.seq_current,
            "{}",
            self.at(&format!("a new barrier's seq {b:?} rises"))
        );
        self.oracle.seq_current = b.seq;
        self.oracle.barriers.push((b.barrier_id, b.seq));
    }

    fn release(&mut self, i: usize) {
        let (id, _) = self.oracle.barriers.remove(i);
        self.clients[0]
            .barrier_release(id)
            .expect("BARRIER_RELEASE");
    }
}

/// Every backref of `bytenr`, read `page` at a time.
fn backrefs_paged(client: &Client, bytenr: u64, page: u32) -> refd_client::Backrefs {
    let mut after = None;
    let mut entries = Vec::new();
    loop {
        let r = client.backrefs_page(bytenr, after, page).expect("BACKREFS");
        entries.extend_from_slice(&r.entries);
        after = r.entries.last().map(BackrefEntry::key);
        if !r.more {
            return refd_client::Backrefs {
                bytenr,
                num_bytes: r.num_bytes,
                refs: r.refs,
                item_flags: r.item_flags,
                kind: r.kind,
                level: r.level,
                entries,
            };
        }
    }
}

/// `N` from "… with N ops replayed" and `G` from "(committed as
/// generation G" in the daemon's ready line.
fn recovery(ready: &str) -> (usize, Option<u64>) {
    let number_before = |s: &str, marker: &str| -> Option<u64> {
        let end = s.find(marker)?;
        let digits: String = s[..end]
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        digits.parse().ok()
    };
    let replayed = number_before(ready, " ops replayed").expect("ops replayed in the ready line");
    let committed = ready.find("(committed as generation ").map(|i| {
        let rest = &ready[i + "(committed as generation ".len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("a generation")
    });
    (replayed as usize, committed)
}

/// Where `views` (read after a restart) differ from `model`: with ops
/// pending (held heads requeued, nothing replayed), each extent's
/// committed and would-be counts; else everything LOOKUP and BACKREFS
/// show.
fn differs_after_restart(model: &Model, views: &BTreeMap<u64, View>) -> Option<String> {
    if model.pending().next().is_none() {
        return first_difference(&model.extents, views);
    }
    views.iter().find_map(|(&b, v)| {
        let committed = model.extents.get(&b).map_or(0, |e| e.refs.values().sum());
        let want = (model.lookup(b), committed);
        let got = (v.refs, v.committed_refs);
        (want != got)
            .then(|| format!("extent {b}: (refs, committed_refs) {got:?}, oracle {want:?}"))
    })
}

impl Run {
    /// A COMMIT with no barrier held, a round of durable and NO_WAIT
    /// batches, kill -9, restart; then the oracle goes on from the loss
    /// of NO_WAIT batches that explains what the daemon shows.
    fn kill_and_restart(&mut self) {
        // Barriers kept (half the seeds) hold heads across the restart.
        if self.rng.gen_bool(0.5) {
            while !self.oracle.barriers.is_empty() {
                self.release(0);
            }
        } else if self.oracle.barriers.is_empty() {
            self.acquire();
        }
        self.commit("the COMMIT before the kill");
        let mut scripts: Vec<Vec<Act>> = (0..CLIENTS)
            .map(|c| {
                let len = self.rng.gen_range(2..6);
                self.script(c, len, false)
            })
            .collect();
        for acts in &mut scripts {
            let mut no_wait_left = 2;
            for act in acts.iter_mut() {
                if let Act::Submit { batch, .. } = act {
                    batch.no_wait = no_wait_left > 0 && self.rng.gen_ratio(1, 2);
                    no_wait_left -= usize::from(batch.no_wait);
                }
            }
        }
        self.round(scripts);
        let in_flight = self.in_flight_batch();
        let delay = Duration::from_micros(self.rng.gen_range(0..3000));
        // Killed while the batch may be on its way: the client resends it
        // after the restart with the same request number.
        let in_flight = std::thread::scope(|s| {
            let sent = in_flight.as_ref().map(|(c, batch)| {
                let client = &self.clients[*c];
                s.spawn(move || server_result(client.submit(&batch.wire, options(batch))))
            });
            std::thread::sleep(delay);
            self.daemon.kill9();
            let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
            self.daemon = Daemon::start(&self.target, &args);
            sent.map(|h| h.join().expect("the in-flight SUBMIT"))
        })
        .zip(in_flight);
        let (replayed, committed_as) = recovery(&self.daemon.ready);
        let (_, hello) = Raw::hello(&self.daemon.socket);
        // What the daemon shows before anything is sent again.
        let views = self.views();
        let resent = self.resend_no_wait();
        let lost: Vec<usize> = resent.iter().map(|r| r.0).collect();
        self.oracle.tally.lost_at_kill += lost.len() as u64;
        let (model, m) = self.explain_restart(replayed, &lost, in_flight.as_ref(), &views);
        self.oracle.model = model;
        self.oracle.barriers.clear();
        self.oracle.seq_current = 0;
        self.oracle.quarantined = 0;
        match (m, committed_as) {
            (Some(m), Some(g)) => self.oracle.record(&m, g),
            (None, None) => {
                // Nothing to commit; the restart's durable superblock
                // claims a generation of its own (docs/durable.md).
                assert!(hello.generation >= self.oracle.generation, "{hello:?}");
                self.oracle.generation = hello.generation;
                self.oracle.base = self.oracle.model.clone();
                self.oracle.since.clear();
            }
            (m, g) => panic!(
                "{}",
                self.at(&format!(
                    "replayed {replayed} ops: oracle commit {m:?}, daemon {g:?}"
                ))
            ),
        }
        assert_eq!(
            hello.generation, self.oracle.generation,
            "{}",
            self.daemon.ready
        );
        if let Some(s) = &mut self.oracle.shadow {
            let model = &self.oracle.model;
            *s = Shadow::rebuild_with_pending(&model.extents, model.pending());
        }
        for (_, c, batch, result) in resent {
            let at = self.at(&format!("client {c}: a lost NO_WAIT batch sent again"));
            let ops = self.oracle.stamped(&batch);
            let want = self.oracle.expect_submit(&batch, &ops);
            check_submit(&result, want, &batch, false, &at);
            if result.is_ok() {
                self.oracle.accept(ops, None);
            }
        }
        self.retry_durable_after_restart();
    }

    /// Without `--verify` (where it could be refused before the kill or
    /// after it), a sound durable batch to send as the daemon is killed.
    fn in_flight_batch(&mut self) -> Option<(usize, Batch)> {
        if self.oracle.shadow.is_some() {
            return None;
        }
        let c = self.rng.gen_range(0..CLIENTS);
        let mut belief = self.belief(c);
        let n = self.rng.gen_range(1..=6);
        let mut batch = gen::batch(&mut self.rng, c, &mut belief, 0, n);
        batch.invalid = None;
        batch.wire = batch.ops.iter().map(gen::wire).collect();
        (batch.no_wait, batch.stamp_seq) = (false, false);
        Some((c, batch))
    }

    /// Every NO_WAIT batch accepted since the last commit, sent again
    /// (durable) with its request number: `DUPLICATE` if it survived the
    /// kill, else it was lost and is validated and applied now. Returns
    /// the lost ones: index in `since`, client, batch as sent again, and
    /// the answer.
    #[allow(clippy::type_complexity)]
    fn resend_no_wait(&mut self) -> Vec<(usize, usize, Batch, Result<SubmitReply, ErrorBody>)> {
        let mut lost = Vec::new();
        for (i, a) in self.oracle.since.iter().enumerate() {
            let Some((c, ticket, batch)) = &a.no_wait else {
                continue;
            };
            let batch = Batch {
                no_wait: false,
                ..batch.clone()
            };
            let r = server_result(self.clients[*c].resubmit(*ticket, &batch.wire, options(&batch)));
            match r {
                Ok(r) if r.flags & SUBMIT_REPLY_DUPLICATE != 0 => assert_eq!(
                    r.flags,
                    SUBMIT_REPLY_DUPLICATE | SUBMIT_REPLY_DURABLE,
                    "{}",
                    self.at(&format!("NO_WAIT batch {ticket:?} sent again"))
                ),
                r => lost.push((i, *c, batch, r)),
            }
        }
        lost
    }

    /// The model after the restart: the batches accepted since the last
    /// commit but the `lost` NO_WAIT ones, replayed (their op count must
    /// be what the daemon replayed) and committed if any were (held heads
    /// with them), else left pending with their seqs forgotten; what the
    /// daemon showed before anything was sent again must agree with it.
    fn explain_restart(
        &self,
        replayed: usize,
        lost: &[usize],
        in_flight: Option<&InFlight>,
        views: &BTreeMap<u64, View>,
    ) -> (Model, Option<ModelCommit>) {
        let mut model = self.oracle.base.clone();
        let mut ops = 0;
        for (i, a) in self.oracle.since.iter().enumerate() {
            if !lost.contains(&i) {
                a.ops.iter().for_each(|op| model.add(op));
                ops += a.ops.len();
            }
        }
        // The batch in flight at the kill was logged before it iff the
        // replay holds its ops; else its resend applied it after.
        let mut after = None;
        if let Some((result, (c, batch))) = in_flight {
            let at = self.at(&format!("client {c}: the SUBMIT in flight at the kill"));
            let r = result.as_ref().unwrap_or_else(|e| panic!("{at}: {e:?}"));
            assert_ne!(r.flags & SUBMIT_REPLY_DURABLE, 0, "{at}: {r:?}");
            if replayed == ops + batch.ops.len() {
                batch.ops.iter().for_each(|op| model.add(op));
                ops += batch.ops.len();
            } else {
                assert_eq!(r.flags & SUBMIT_REPLY_DUPLICATE, 0, "{at}: {r:?}");
                after = Some(&batch.ops);
            }
        }
        assert_eq!(
            ops,
            replayed,
            "{}",
            self.at(&format!(
                "ops replayed, with NO_WAIT batches {lost:?} of {} lost",
                self.oracle.since.len()
            ))
        );
        let m = (ops > 0).then(|| model.commit(0));
        if ops == 0 {
            model.forget_seqs();
        }
        after.into_iter().flatten().for_each(|op| model.add(op));
        if let Some(d) = differs_after_restart(&model, views) {
            panic!(
                "{}",
                self.at(&format!(
                    "after the restart, NO_WAIT batches {lost:?} lost: {d}"
                ))
            );
        }
        (model, m)
    }

    /// A durable batch acknowledged before the kill, sent again with its
    /// request number: `DUPLICATE` with the first LSN, nothing applied.
    fn retry_durable_after_restart(&mut self) {
        for c in 0..CLIENTS {
            let Some((ticket, batch, lsn)) = self.last_durable[c].take() else {
                continue;
            };
            let r = self.clients[c]
                .resubmit(ticket, &batch.wire, options(&batch))
                .expect("a retry after the restart");
            assert_eq!(
                (r.lsn, r.flags),
                (lsn, SUBMIT_REPLY_DUPLICATE | SUBMIT_REPLY_DURABLE),
                "{}",
                self.at(&format!(
                    "client {c}: retry of {ticket:?} after the restart"
                ))
            );
        }
        self.check_lookups();
    }

    /// One event of the seed.
    fn step(&mut self, i: usize) {
        let roll = self.rng.gen_range(0..100);
        if roll < 55 {
            let active = self.rng.gen_range(1..=CLIENTS);
            let scripts = (0..CLIENTS)
                .map(|c| {
                    let len = if c < active {
                        self.rng.gen_range(1..10)
                    } else {
                        0
                    };
                    self.script(c, len, false)
                })
                .collect();
            self.round(scripts);
        } else if roll < 65 {
            let solo = self.rng.gen_range(0..CLIENTS);
            let scripts = (0..CLIENTS)
                .map(|c| {
                    let len = if c == solo { 12 } else { 0 };
                    self.script(c, len, true)
                })
                .collect();
            self.round(scripts);
        } else if roll < 85 {
            self.commit(&format!("step {i}: COMMIT"));
        } else if roll < 93 && self.oracle.barriers.len() < 3 {
            self.acquire();
        } else if !self.oracle.barriers.is_empty() {
            let n = self.rng.gen_range(0..self.oracle.barriers.len());
            self.release(n);
        }
    }
}

impl Run {
    /// Release every barrier, COMMIT, and compare everything.
    fn finish(mut self) {
        while !self.oracle.barriers.is_empty() {
            self.release(0);
        }
        self.commit("the last COMMIT");
        let st: serde_json::Value =
            serde_json::from_str(&self.clients[0].stats().expect("STATS")).expect("JSON");
        let engine = &st["engine"];
        let want = (
            self.oracle.model.extents.len() as u64,
            self.oracle.quarantined.min(QUARANTINE_KEEP),
            0,
        );
        let got = (
            engine["extents"].as_u64().unwrap_or(u64::MAX),
            engine["quarantined"].as_u64().unwrap_or(u64::MAX),
            engine["pending_ops"].as_u64().unwrap_or(u64::MAX),
        );
        assert_eq!(
            got,
            want,
            "{}",
            self.at("STATS (extents, quarantined, pending_ops)")
        );
        self.check_freed();
        drop(std::mem::take(&mut self.clients));
        let status = self.daemon.term();
        assert!(status.success(), "{status:?}\n{}", self.daemon.log());
        self.check_device();
    }

    /// The FREED stream from the start: per commit, the model's freed
    /// extents, each once.
    fn check_freed(&mut self) {
        let (_, acked) = self.consumer;
        let mut cursor = refd_client::FreedCursor::after_ack(acked);
        let mut got: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        loop {
            let page = self.rng.gen_range(1..=64);
            let r = self.clients[0].freed(cursor, page).expect("FREED");
            for f in &r.extents {
                got.entry(f.generation)
                    .or_default()
                    .push((f.bytenr, f.num_bytes));
            }
            cursor = refd_client::FreedCursor::next(&r);
            if !r.more {
                break;
            }
        }
        got.values_mut().for_each(|l| l.sort_unstable());
        assert_eq!(got, self.oracle.freed, "{}", self.at("the FREED stream"));
    }

    /// After the daemon stopped: fsck, then the extent tree opened
    /// in-process equals the model's (tree keys and generations too).
    fn check_device(&self) {
        let mut progress = refd_durable::progress::Progress::new(|_| {});
        let report = refd_ctl::device::fsck(&self.target.device, &mut progress).expect("fsck");
        assert!(report.clean(), "fsck: {:?}", report.problems);
        assert_eq!(
            report.extents,
            self.oracle.model.extents.len(),
            "fsck extents"
        );
        assert_eq!((report.held_heads, report.log_ops), (0, 0), "{report:?}");
        let storage = Arc::new(
            refd_ioring::UringStorage::open(
                &self.target.device,
                0,
                refd_ioring::UringConfig::default(),
            )
            .expect("open the device"),
        );
        let (engine, _): (refd_durable::DurableEngine<_>, _) =
            refd_durable::DurableEngine::open(storage, refd_durable::OpenOptions::default())
                .expect("open the engine");
        let tree = normalize_tree(&engine.core().tree());
        let want: Vec<NormExtent> = self
            .oracle
            .model
            .normalized()
            .into_iter()
            .map(|mut e| {
                e.generation = self.oracle.gens[&e.generation];
                e
            })
            .collect();
        if let Some((a, b)) = tree.iter().zip(&want).find(|(a, b)| a != b) {
            panic!("{}", self.at(&format!("device tree {a:?}, oracle {b:?}")));
        }
        assert_eq!(tree.len(), want.len(), "{}", self.at("device tree size"));
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn run_seed(seed: u64) {
    let t = Instant::now();
    let Some(mut run) = Run::start(seed) else {
        return;
    };
    // One kill -9 in the first half, a second one in the second half of
    // every other seed.
    let first_kill = run.rng.gen_range(STEPS / 4..STEPS / 2);
    let second_kill = run.rng.gen_range(STEPS / 2..STEPS);
    let second_kill = if run.rng.gen_bool(0.5) {
        second_kill
    } else {
        STEPS
    };
    for i in 0..STEPS {
        if i == first_kill || i == second_kill {
            run.kill_and_restart();
        } else {
            run.step(i);
        }
    }
    let (commits, extents) = (run.oracle.gens.len(), run.oracle.model.extents.len());
    let tally = std::mem::take(&mut run.oracle.tally);
    run.finish();
    eprintln!(
        "seed {seed}: {commits} commits, {extents} extents at the end, {:.1} s; {tally:?}",
        t.elapsed().as_secs_f64()
    );
}

/// See the module doc.
#[test]
fn adversarial_streams_agree_with_the_oracle() {
    match env_u64("REFD_ADVERSARIAL_SEED") {
        Some(seed) => run_seed(seed),
        None => {
            let first = env_u64("REFD_ADVERSARIAL_FIRST_SEED").unwrap_or(0);
            let seeds = env_u64("REFD_ADVERSARIAL_SEEDS").unwrap_or(4);
            (first..first + seeds).for_each(run_seed)
        }
    }
}
