//! One connection's requests, as the reader thread reads them: HELLO
//! first, then every opcode mapped onto the durable engine, each engine
//! error onto its wire error (`docs/protocol.md`, "Errors").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use refd_core::delayed::DelayedRefStore;
use refd_core::engine::EngineError;
use refd_core::extent_tree::ExtentItem;
use refd_core::head::Head;
use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{
    Admission, Failure, ServiceError, SessionError, SubmitError, Submitted, Ticket,
};
use refd_ioring::log::Lsn;
use refd_proto::*;

use crate::barrier::BarrierError;
use crate::conn::{Pending, Wait};
use crate::device::Dev;
use crate::ops;
use crate::server::Shared;

/// The wire error of a latched failure.
pub fn failed(f: &Failure) -> ErrorBody {
    ErrorBody::new(ErrorCode::Failed, &f.to_string()).with_detail(f.offset.unwrap_or(u64::MAX))
}

fn internal(what: &dyn std::fmt::Display) -> ErrorBody {
    ErrorBody::new(ErrorCode::Internal, &what.to_string())
}

/// Per-connection request handling.
#[derive(Debug)]
pub struct Handler<D: DelayedRefStore> {
    shared: Arc<Shared<D>>,
    peer: String,
    requires_token: bool,
    helloed: bool,
    /// Reused for each SUBMIT's validated ops.
    ops: Vec<Op>,
}

impl<D: DelayedRefStore + 'static> Handler<D> {
    /// A connection from `peer`.
    pub fn new(shared: Arc<Shared<D>>, peer: String, requires_token: bool) -> Self {
        Handler {
            shared,
            peer,
            requires_token,
            helloed: false,
            ops: Vec::new(),
        }
    }

    /// The reply to one request frame.
    pub fn handle(&mut self, frame: Frame) -> Pending {
        let id = frame.header.request_id;
        let opcode = frame.header.opcode;
        let name = Opcode::from_u8(opcode).map_or("UNKNOWN", Opcode::name);
        self.shared.metrics.request(name);
        if !self.helloed && opcode != Opcode::Hello as u8 {
            let body = ErrorBody::new(ErrorCode::HelloRequired, "send HELLO first");
            return Pending::error(id, body);
        }
        let pending = if opcode == Opcode::Submit as u8 {
            self.submit(id, &frame.body)
        } else {
            match Request::decode(opcode, &frame.body) {
                Ok(r) => self.request(id, r),
                Err(e) => Err(e.error_body()),
            }
        };
        // Error frames are counted where they are written (`conn.rs`).
        pending.unwrap_or_else(|body| Pending::error(id, body))
    }

    fn request(&mut self, id: u64, r: Request) -> Result<Pending, ErrorBody> {
        let e = &self.shared.engine;
        let reply = match r {
            Request::Hello(h) => return self.hello(id, h),
            Request::Register(_) => {
                self.live()?;
                let (session_id, ticket) = e.register_session().map_err(service_error)?;
                tracing::info!(peer = %self.peer, session = session_id, "session registered");
                let reply = Reply::Register(RegisterReply { session_id });
                return Ok(Pending::after(id, Wait::Ticket(ticket), reply));
            }
            Request::Submit(_) => unreachable!("SUBMIT is parsed in place"),
            Request::Lookup(l) => Reply::Lookup(self.lookup(&l.bytenrs)?),
            Request::Backrefs(b) => Reply::Backrefs(self.backrefs(&b)?),
            Request::BarrierAcquire(b) => {
                e.check_session(b.session_id).map_err(session_error)?;
                let barriers = &self.shared.barriers;
                let (barrier_id, seq) = barriers
                    .acquire(e.core().barrier(), b.session_id, Instant::now())
                    .map_err(barrier_error)?;
                Reply::BarrierAcquire(BarrierAcquireReply {
                    barrier_id,
                    seq,
                    lease_ms: self.shared.config.barrier_lease_ms,
                })
            }
            Request::BarrierRenew(b) => {
                self.shared
                    .barriers
                    .renew(b.barrier_id, Instant::now())
                    .map_err(barrier_error)?;
                Reply::BarrierRenew(BarrierRenewReply {
                    lease_ms: self.shared.config.barrier_lease_ms,
                })
            }
            Request::BarrierRelease(b) => {
                self.shared
                    .barriers
                    .release(b.barrier_id)
                    .map_err(barrier_error)?;
                Reply::BarrierRelease(BarrierReleaseReply)
            }
            Request::Commit(_) => Reply::Commit(self.commit()?),
            Request::FreedSubscribe(f) => {
                self.live()?;
                let (c, ticket) = e.subscribe_freed(&f.name).map_err(service_error)?;
                let oldest_kept = e.service_stats().freed_oldest.unwrap_or(0);
                let reply = Reply::FreedSubscribe(FreedSubscribeReply {
                    consumer_id: c.id,
                    acked_generation: c.acked,
                    oldest_kept,
                });
                return Ok(after_logged(id, ticket, reply));
            }
            Request::Freed(f) => Reply::Freed(self.freed(&f)?),
            Request::FreedAck(a) => {
                self.live()?;
                let (acked_generation, ticket) = e
                    .ack_freed(a.consumer_id, a.generation)
                    .map_err(service_error)?;
                let reply = Reply::FreedAck(FreedAckReply { acked_generation });
                return Ok(after_logged(id, ticket, reply));
            }
            Request::FreedUnsubscribe(u) => {
                self.live()?;
                return Ok(match e.unsubscribe_freed(u.consumer_id) {
                    Ok((c, ticket)) => {
                        tracing::info!(peer = %self.peer, consumer = c.id, name = ?c.name,
                            acked = c.acked, "freed-list consumer unsubscribed");
                        let reply = Reply::FreedUnsubscribe(FreedUnsubscribeReply {
                            acked_generation: c.acked,
                        });
                        Pending::after(id, Wait::Ticket(ticket), reply)
                    }
                    // A retry may find the consumer removed by a record not
                    // durable yet: CONSUMER_UNKNOWN is sent once it is, so
                    // that it means "removed" (`docs/protocol.md`).
                    Err(err @ ServiceError::ConsumerUnknown { .. }) => {
                        let reply = Reply::Error(service_error(err));
                        Pending::after(id, Wait::Lsn(EVERY_LOGGED), reply)
                    }
                    Err(err) => return Err(service_error(err)),
                });
            }
            Request::Stats(_) => Reply::Stats(StatsReply {
                json: crate::stats::json(&self.shared).to_string(),
            }),
            Request::Ping(p) => Reply::Ping(PingReply { payload: p.payload }),
            _ => return Err(ErrorBody::new(ErrorCode::UnknownOpcode, "unknown request")),
        };
        Ok(Pending::now(id, reply))
    }

    /// Whether HELLO succeeded on this connection.
    pub fn helloed(&self) -> bool {
        self.helloed
    }

    /// Writes fail fast once the engine latched a failure.
    fn live(&self) -> Result<(), ErrorBody> {
        match self.shared.engine.failure() {
            Some(f) => Err(failed(&f)),
            None => Ok(()),
        }
    }

    fn hello(&mut self, id: u64, h: HelloRequest) -> Result<Pending, ErrorBody> {
        if self.helloed {
            return Err(ErrorBody::new(ErrorCode::BadRequest, "a second HELLO"));
        }
        if h.version_min > VERSION || h.version_max < VERSION || h.version_max < h.version_min {
            let message = format!(
                "versions {}..={} requested; this server speaks {VERSION}",
                h.version_min, h.version_max
            );
            return Err(ErrorBody::unsupported_version(VERSION, VERSION, &message));
        }
        if let Some(token) = &self.shared.config.token {
            let given_ok = constant_time_eq(token, &h.token);
            if self.requires_token && !given_ok {
                self.shared.metrics.auth_failures.inc();
                tracing::warn!(peer = %self.peer, client = ?h.name, "authentication failed");
                return Err(ErrorBody::new(
                    ErrorCode::AuthFailed,
                    "wrong or missing token",
                ));
            }
        }
        self.helloed = true;
        tracing::debug!(peer = %self.peer, client = ?h.name, "hello");
        Ok(Pending::now(id, Reply::Hello(self.shared.hello())))
    }

    fn submit(&mut self, id: u64, body: &[u8]) -> Result<Pending, ErrorBody> {
        let view = SubmitRequest::parse_limited(body, self.shared.submit_ops_max)
            .map_err(|e| e.error_body())?;
        let no_wait = view.flags & SUBMIT_NO_WAIT != 0;
        // The session and the request number before the ops: a duplicate
        // is answered without looking at them.
        if !self.shared.config.dry_run {
            let admission = self
                .shared
                .engine
                .admit(view.session_id, view.request_number)
                .map_err(session_error)?;
            if let Admission::Duplicate(r) = admission {
                return Ok(self.duplicate(id, &view, Lsn(r.lsn), r.ops, no_wait));
            }
        }
        let stamp = view.flags & SUBMIT_STAMP_SEQ != 0;
        let seq = stamp.then(|| self.shared.engine.core().barrier().current());
        self.ops.clear();
        self.ops.reserve(view.op_count());
        let mut by_action = [0u64; 4];
        for (i, w) in view.ops().enumerate() {
            let mut op = ops::validate(&w)
                .map_err(|e| ErrorBody::invalid_op(e.code, i as u32, w.bytenr, &e.message))?;
            if let Some(seq) = seq.filter(|_| op.seq == 0) {
                op.seq = seq;
            }
            by_action[op.action.code() as usize - 1] += 1;
            self.ops.push(op);
        }
        let reply = |lsn: u64, flags: u32| {
            Reply::Submit(SubmitReply {
                lsn,
                op_count: view.op_count() as u32,
                flags,
                request_number: view.request_number,
            })
        };
        if self.shared.config.dry_run {
            return Ok(Pending::now(id, reply(0, 0)));
        }
        let m = &self.shared.metrics;
        let t = std::time::Instant::now();
        let submitted = self
            .shared
            .engine
            .submit(view.session_id, view.request_number, &self.ops);
        if t.elapsed() > std::time::Duration::from_millis(5) {
            tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "slow engine submit");
        }
        match submitted {
            Ok(Submitted::Queued { ticket, .. }) => {
                m.batches.inc();
                for (action, n) in [
                    Action::AddRef,
                    Action::DropRef,
                    Action::AddExtent,
                    Action::UpdateHead,
                ]
                .iter()
                .zip(by_action)
                {
                    if n > 0 {
                        m.ops(action_name(*action), n);
                    }
                }
                let lsn = ticket.lsn().get();
                Ok(if no_wait {
                    Pending::now(id, reply(lsn, 0))
                } else {
                    Pending::after(id, Wait::Ticket(ticket), reply(lsn, SUBMIT_REPLY_DURABLE))
                })
            }
            Ok(Submitted::Duplicate { lsn, ops }) => {
                Ok(self.duplicate(id, &view, lsn, ops, no_wait))
            }
            Err(SubmitError::NoSpace(n)) => {
                warn_no_space(&self.shared.started, &n);
                let mut message = n.to_string();
                // Held heads keep their room reserved until a commit runs
                // them: say so, or the operator only hears "extend".
                let held = self.shared.engine.heads_held();
                if held > 0 {
                    message = format!(
                        "{held} heads held by seq barriers keep their room reserved until \
                         the barriers are released; {message}"
                    );
                }
                Err(ErrorBody::new(ErrorCode::NoSpace, &message).with_detail(n.nodes_free))
            }
            Err(e) => Err(submit_error(e, &self.ops)),
        }
    }

    /// The stored reply of a request number already applied.
    fn duplicate(
        &self,
        id: u64,
        view: &SubmitView<'_>,
        lsn: Lsn,
        ops: u32,
        no_wait: bool,
    ) -> Pending {
        self.shared.metrics.duplicates.inc();
        if ops as usize != view.op_count() {
            tracing::warn!(
                peer = %self.peer,
                session = view.session_id,
                request = view.request_number,
                "a retried request number carries {} ops, the applied one had {ops}",
                view.op_count()
            );
        }
        let reply = |flags| {
            Reply::Submit(SubmitReply {
                lsn: lsn.get(),
                op_count: view.op_count() as u32,
                flags,
                request_number: view.request_number,
            })
        };
        if no_wait {
            Pending::now(id, reply(SUBMIT_REPLY_DUPLICATE))
        } else {
            let flags = SUBMIT_REPLY_DUPLICATE | SUBMIT_REPLY_DURABLE;
            Pending::after(id, Wait::Lsn(lsn), reply(flags))
        }
    }

    fn lookup(&self, bytenrs: &[u64]) -> Result<LookupReply, ErrorBody> {
        let mut entries = Vec::with_capacity(bytenrs.len());
        for &bytenr in bytenrs {
            let r = self
                .shared
                .engine
                .lookup_extent_ref(bytenr)
                .map_err(|e| internal(&e))?;
            let committed = r.committed.as_ref();
            let pending = r.pending.as_ref();
            let alloc = pending.filter(|p| p.must_insert_reserved());
            let shape = alloc
                .map(|p| (p.num_bytes, p.kind))
                .or(committed.map(|c| (c.num_bytes, c.kind)))
                .or(pending
                    .filter(|p| p.shape_known)
                    .map(|p| (p.num_bytes, p.kind)));
            let mut flags = 0u8;
            if committed.is_some() {
                flags |= LOOKUP_COMMITTED;
            }
            if pending.is_some() {
                flags |= LOOKUP_PENDING;
            }
            if alloc.is_some() {
                flags |= LOOKUP_ALLOC_PENDING;
            }
            if shape.is_some_and(|(_, k)| k.is_data()) {
                flags |= LOOKUP_DATA;
            }
            if committed.is_some_and(ExtentItem::full_backref) {
                flags |= LOOKUP_FULL_BACKREF;
            }
            entries.push(LookupEntry {
                bytenr,
                refs: r.refs,
                committed_refs: committed.map_or(0, |c| c.refs),
                pending_ref_mod: pending.map_or(0, |p| p.total_ref_mod),
                num_bytes: shape.map_or(0, |s| s.0),
                flags,
                level: match shape.map(|s| s.1) {
                    Some(ExtentKind::Tree { level }) => level,
                    _ => 0,
                },
            });
        }
        Ok(LookupReply { entries })
    }

    fn backrefs(&self, b: &BackrefsRequest) -> Result<BackrefsReply, ErrorBody> {
        let (committed, pending) = self
            .shared
            .engine
            .extent_state(b.bytenr)
            .map_err(|e| internal(&e))?;
        let after = b
            .after
            .map(|k| wire_key_order(k.ref_type, k.k1, k.k2, k.k3));
        let page = merged_backrefs(
            committed.as_ref(),
            pending.as_ref(),
            after,
            b.max_entries as usize,
        );
        let (shape, refs, more) = (page.shape, page.refs, page.more);
        let entries = page
            .counts
            .into_iter()
            .map(|(key, count)| {
                let (ref_type, k1, k2, k3) = wire_key(key);
                BackrefEntry {
                    ref_type,
                    count,
                    k1,
                    k2,
                    k3,
                }
            })
            .collect();
        Ok(BackrefsReply {
            bytenr: b.bytenr,
            num_bytes: shape.map_or(0, |s| s.0),
            refs,
            item_flags: committed.as_ref().map_or(0, |c| c.flags),
            kind: match shape.map(|s| s.1) {
                None => BACKREFS_KIND_UNKNOWN,
                Some(ExtentKind::Data) => KIND_DATA,
                Some(ExtentKind::Tree { .. }) => KIND_TREE_BLOCK,
            },
            level: match shape.map(|s| s.1) {
                Some(ExtentKind::Tree { level }) => level,
                _ => 0,
            },
            more,
            entries,
        })
    }

    fn commit(&self) -> Result<CommitReply, ErrorBody> {
        self.live()?;
        let s = self
            .shared
            .engine
            .commit()
            .map_err(|e| failed(e.failure()))?;
        Ok(CommitReply {
            generation: s.generation,
            ops: s.ops,
            heads: s.core.heads as u64,
            applied: s.core.applied as u64,
            freed: s.core.freed.len() as u64,
            held: s.core.held as u64,
            quarantined: s.core.quarantined.len() as u64,
            took_us: s.phases.total.as_micros() as u64,
        })
    }

    fn freed(&self, f: &FreedRequest) -> Result<FreedReply, ErrorBody> {
        let page = self
            .shared
            .engine
            .read_freed(f.generation, f.index, f.max_extents as usize)
            .map_err(service_error)?;
        Ok(FreedReply {
            more: page.more,
            next_generation: page.next.0,
            next_index: page.next.1,
            oldest_kept: page.oldest_kept,
            extents: page
                .extents
                .iter()
                .map(|(generation, x)| FreedExtent {
                    generation: *generation,
                    bytenr: x.bytenr,
                    num_bytes: x.num_bytes,
                    kind: u8::from(x.kind.is_data()),
                    level: match x.kind {
                        ExtentKind::Tree { level } => level,
                        ExtentKind::Data => 0,
                    },
                })
                .collect(),
        })
    }
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::AddRef => "add_ref",
        Action::DropRef => "drop_ref",
        Action::AddExtent => "add_extent",
        Action::UpdateHead => "update_head",
    }
}

/// One page of an extent's backrefs: see [`merged_backrefs`].
#[derive(Debug)]
struct BackrefsPage {
    /// Committed + pending count per backref after the cursor, in key
    /// order, zero counts left out; at most the page size.
    counts: Vec<(RefKey, i64)>,
    /// More non-zero backrefs follow.
    more: bool,
    /// Size and kind, if known.
    shape: Option<(u64, ExtentKind)>,
    /// Committed refs + pending ref_mod.
    refs: i64,
}

/// Committed + pending backrefs of an extent (pending refs merged across
/// seq; zero counts left out) after the wire key `after`, at most
/// `max_entries` of them, with its shape and its refs. The committed
/// lists are sorted, so a page costs a binary search and a merge of what
/// it returns (plus sorting the pending refs after the cursor): an extent
/// with a million backrefs is paged through in linear time, not a full
/// rebuild per page.
fn merged_backrefs(
    committed: Option<&ExtentItem>,
    pending: Option<&Head>,
    after: Option<(u8, u64, u64, u64)>,
    max_entries: usize,
) -> BackrefsPage {
    let past = |key: &RefKey| after.is_none_or(|a| wire_key(*key) > a);
    let empty: &[(RefKey, u64)] = &[];
    let (inline, keyed) = committed.map_or((empty, empty), |c| (&c.inline[..], &c.keyed[..]));
    let tail = |list: &[(RefKey, u64)]| list.partition_point(|(k, _)| !past(k));
    let signed = |&(k, n): &(RefKey, u64)| (k, n as i64);
    let (inline, keyed) = (&inline[tail(inline)..], &keyed[tail(keyed)..]);
    let mut pending_refs: Vec<(RefKey, i64)> = pending
        .map(|h| {
            h.refs
                .iter()
                .filter(|r| past(&r.key))
                .map(|r| (r.key, r.ref_mod))
                .collect()
        })
        .unwrap_or_default();
    pending_refs.sort_by_key(|&(k, _)| k);
    let mut counts = Vec::new();
    let mut more = false;
    let mut merged = merge_by_key(
        merge_by_key(inline.iter().map(signed), keyed.iter().map(signed)),
        pending_refs,
    )
    .peekable();
    while let Some((key, mut sum)) = merged.next() {
        while let Some((_, n)) = merged.next_if(|(k, _)| *k == key) {
            sum += n;
        }
        if sum == 0 {
            continue;
        }
        if counts.len() == max_entries {
            more = true;
            break;
        }
        counts.push((key, sum));
    }
    let summary = pending.map(|h| &h.summary);
    let shape = summary
        .filter(|s| s.must_insert_reserved())
        .map(|s| (s.num_bytes, s.kind))
        .or(committed.map(|c| (c.num_bytes, c.kind)))
        .or(summary
            .filter(|s| s.shape_known)
            .map(|s| (s.num_bytes, s.kind)));
    let refs = committed.map_or(0, |c| c.refs as i64) + summary.map_or(0, |s| s.total_ref_mod);
    BackrefsPage {
        counts,
        more,
        shape,
        refs,
    }
}

/// Two iterators sorted by key, merged (equal keys both kept, `a`'s first).
fn merge_by_key(
    a: impl IntoIterator<Item = (RefKey, i64)>,
    b: impl IntoIterator<Item = (RefKey, i64)>,
) -> impl Iterator<Item = (RefKey, i64)> {
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// A backref key on the wire: `(ref_type, k1, k2, k3)`.
fn wire_key(key: RefKey) -> (u8, u64, u64, u64) {
    let (k1, k2, k3) = key.words();
    (key.type_code(), k1, k2, k3)
}

/// The order of wire keys: btrfs's (type, then the words), which is
/// [`RefKey`]'s order.
fn wire_key_order(ref_type: u8, k1: u64, k2: u64, k3: u64) -> (u8, u64, u64, u64) {
    (ref_type, k1, k2, k3)
}

fn session_error(e: SessionError) -> ErrorBody {
    let code = match e {
        SessionError::Unknown { .. } => ErrorCode::SessionUnknown,
        SessionError::Evicted { .. } => ErrorCode::SessionEvicted,
        SessionError::TooOld { oldest, .. } => {
            return ErrorBody::new(ErrorCode::RequestTooOld, &e.to_string()).with_detail(oldest)
        }
        _ => ErrorCode::BadRequest,
    };
    ErrorBody::new(code, &e.to_string())
}

/// Seconds since the daemon started of the last NO_SPACE warning (+1; 0:
/// none yet), and the refusals since it.
static NO_SPACE_WARNED: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));
/// At most one NO_SPACE warning per this many seconds.
const NO_SPACE_WARN_INTERVAL_S: u64 = 10;

/// Logs a NO_SPACE refusal at WARN, at most once per
/// [`NO_SPACE_WARN_INTERVAL_S`], with the refusals since the last line.
fn warn_no_space(started: &std::time::Instant, n: &refd_durable::NoSpace) {
    let (last, since) = &NO_SPACE_WARNED;
    let refused = since.fetch_add(1, Ordering::Relaxed) + 1;
    let now = started.elapsed().as_secs() + 1;
    let prev = last.load(Ordering::Relaxed);
    let due = prev == 0 || now >= prev + NO_SPACE_WARN_INTERVAL_S;
    if due
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        since.store(0, Ordering::Relaxed);
        tracing::warn!(
            nodes_free = n.nodes_free,
            nodes_needed = n.nodes_needed,
            region_nodes = n.region_nodes,
            refused,
            "SUBMIT refused with NO_SPACE: {n}"
        );
    }
}

fn submit_error(e: SubmitError, ops: &[Op]) -> ErrorBody {
    match e {
        SubmitError::Session(s) => session_error(s),
        SubmitError::Refused { index, source } => {
            let bytenr = ops.get(index).map_or(0, |o| o.bytenr);
            let message = source.to_string();
            match source {
                EngineError::Verify(_) => ErrorBody::new(ErrorCode::Refused, &message)
                    .with_index(index as u32)
                    .with_detail(bytenr),
                EngineError::Store(refd_core::delayed::StoreError::Op(op)) => {
                    ErrorBody::invalid_op(ops::subcode(&op), index as u32, bytenr, &message)
                }
                _ => internal(&message),
            }
        }
        SubmitError::TooLarge { .. } => ErrorBody::new(ErrorCode::TooManyOps, &e.to_string()),
        SubmitError::Failed(f) => failed(&f),
        other => internal(&other),
    }
}

/// Waits for every log record appended so far: the log clamps an LSN
/// never assigned to the last assigned one (`RefLog::wait_for`).
const EVERY_LOGGED: Lsn = Lsn(u64::MAX);

/// The reply to a consumer request once its record is durable; one that
/// logged nothing (a name subscribed before, an acknowledgement that does
/// not move) may repeat a change another connection logged a moment ago,
/// so it waits for every record logged so far (`docs/protocol.md`:
/// "Durable before the reply").
fn after_logged(id: u64, ticket: Option<Ticket<Dev>>, reply: Reply) -> Pending {
    match ticket {
        Some(t) => Pending::after(id, Wait::Ticket(t), reply),
        None => Pending::after(id, Wait::Lsn(EVERY_LOGGED), reply),
    }
}

fn service_error(e: ServiceError) -> ErrorBody {
    match e {
        ServiceError::ConsumerUnknown { .. } => {
            ErrorBody::new(ErrorCode::ConsumerUnknown, &e.to_string())
        }
        ServiceError::FreedExpired {
            dropped_upto,
            oldest,
        } => {
            let detail = oldest.unwrap_or(dropped_upto + 1);
            ErrorBody::new(ErrorCode::FreedExpired, &e.to_string()).with_detail(detail)
        }
        ServiceError::BadName { .. }
        | ServiceError::ConsumersFull { .. }
        | ServiceError::AckBeyondCommitted { .. } => {
            ErrorBody::new(ErrorCode::BadRequest, &e.to_string())
        }
        ServiceError::Failed(f) => failed(&f),
        other => internal(&other),
    }
}

fn barrier_error(e: BarrierError) -> ErrorBody {
    let code = match e {
        BarrierError::Unknown(_) => ErrorCode::BarrierUnknown,
        BarrierError::Limit { .. } => ErrorCode::BarrierLimit,
    };
    ErrorBody::new(code, &e.to_string())
}

/// Equal bytes, in a time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(!constant_time_eq(b"secret", b""));
    }

    /// Paging through an extent with inline, keyed and pending backrefs
    /// (some cancelling to zero) gives, page by page, exactly the sums
    /// of a full merge.
    #[test]
    fn backrefs_pages_are_the_full_merge() {
        let key = |n: u64| {
            if n.is_multiple_of(7) {
                RefKey::SharedData { parent: n << 12 }
            } else {
                RefKey::ExtentData {
                    root: 5,
                    objectid: n,
                    offset: 0,
                }
            }
        };
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        for n in (0..3000).step_by(2) {
            item.add_ref(key(n), 1 + (n % 3) as i64);
        }
        assert!(!item.inline.is_empty() && !item.keyed.is_empty());
        let first = Op::new(1 << 20, 4096, ExtentKind::Data, Action::AddRef, key(1), 0).unwrap();
        let mut head = Head::of_op(&first, 0);
        let mut full: std::collections::BTreeMap<RefKey, i64> = item
            .backrefs()
            .into_iter()
            .map(|(k, n)| (k, n as i64))
            .collect();
        *full.entry(key(1)).or_insert(0) += 1;
        for n in (0..3000).step_by(3) {
            // Drops of committed refs (some to zero) and new adds, at
            // two seqs each.
            let have = item.count(&key(n)) as i64;
            let delta = if have > 0 { -have } else { 1 };
            head.add_ref(key(n), 1, delta);
            head.add_ref(key(n), 2, 1);
            *full.entry(key(n)).or_insert(0) += delta + 1;
        }
        let want: Vec<(RefKey, i64)> = full.into_iter().filter(|&(_, n)| n != 0).collect();
        for page_size in [1, 7, 500, 5000] {
            let mut got = Vec::new();
            let mut after = None;
            loop {
                let page = merged_backrefs(Some(&item), Some(&head), after, page_size);
                assert!(page.counts.len() <= page_size);
                after = page.counts.last().map(|&(k, _)| wire_key(k));
                got.extend(page.counts);
                if !page.more {
                    break;
                }
            }
            assert_eq!(got, want, "pages of {page_size}");
        }
    }

    #[test]
    fn backrefs_merge_committed_and_pending() {
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 1);
        let a = RefKey::ExtentData {
            root: 5,
            objectid: 1,
            offset: 0,
        };
        let b = RefKey::SharedData { parent: 7 };
        item.add_ref(a, 2);
        let mut head = Head::of_op(
            &Op::new(1 << 20, 4096, ExtentKind::Data, Action::DropRef, a, 0).unwrap(),
            0,
        );
        head.add_ref(a, 3, -1);
        head.add_ref(b, 0, 1);
        let page = merged_backrefs(Some(&item), Some(&head), None, 16);
        assert_eq!(page.counts, vec![(b, 1)], "a: 2 - 1 - 1 = 0, left out");
        assert!(!page.more);
        assert_eq!(page.shape, Some((4096, ExtentKind::Data)));
        assert_eq!(page.refs, 2 - 1);
    }
}
