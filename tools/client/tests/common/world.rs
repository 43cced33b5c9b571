//! The fake daemon's state: sessions with their kept replies exactly as
//! `docs/protocol.md` ("Exactly once") describes, a refcount and backref
//! map the SUBMITs apply to, barriers, commits with freed lists, and
//! counters the tests check.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use refd_client::refd_proto::*;

/// An op whose `k1` is this is refused with `INVALID_OP` (subcode
/// `MISSING_ROOT`), so tests can mark an op invalid.
pub const POISON_ROOT: u64 = 0xBAD0_BAD0;
/// Barriers per session.
const BARRIERS_MAX: usize = 64;

#[derive(Debug, Default)]
struct SessionLog {
    /// (request number, reply), in log order: every logged number above
    /// `highest - kept_max`.
    kept: VecDeque<(u64, SubmitReply)>,
    /// Highest request number logged.
    highest: u64,
    /// Numbers received and not answered yet (the client's window, as
    /// far as the server can see it).
    outstanding: BTreeSet<u64>,
}

/// What the fake counted.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// SUBMIT frames received.
    pub submits: u64,
    /// SUBMITs applied (one log batch each).
    pub batches_applied: u64,
    /// Ops applied.
    pub ops_applied: u64,
    /// SUBMITs answered from the kept replies.
    pub duplicates: u64,
    /// SUBMITs answered REQUEST_TOO_OLD.
    pub too_old: u64,
    /// SUBMITs answered INVALID_OP.
    pub invalid: u64,
    /// Largest op_count of a SUBMIT answered INVALID_OP.
    pub invalid_batch_ops_max: u32,
    /// SUBMITs received while the session had an unanswered number at or
    /// below `r - session_replies_kept`.
    pub window_violations: u64,
    /// Sessions registered.
    pub sessions: u64,
}

/// The fake daemon's state.
#[derive(Debug)]
pub struct World {
    pub kept_max: usize,
    pub submit_ops_max: u32,
    next_session: u64,
    sessions: HashMap<u64, SessionLog>,
    /// Sessions the test evicted.
    pub evicted: BTreeSet<u64>,
    /// Refcount per bytenr.
    pub refs: HashMap<u64, i64>,
    backrefs: HashMap<u64, BTreeMap<BackrefKey, i64>>,
    extents: HashMap<u64, (u8, u8, u64)>,
    lsn: u64,
    generation: u64,
    ops_since_commit: u64,
    barriers: HashMap<u64, u64>,
    next_barrier: u64,
    consumers: HashMap<String, (u64, u64)>,
    /// Consumers ever subscribed (the last id given).
    consumers_ever: u64,
    freed: Vec<FreedExtent>,
    pub counters: Counters,
}

impl World {
    pub fn new(kept_max: usize, submit_ops_max: u32) -> World {
        World {
            kept_max,
            submit_ops_max,
            next_session: 1,
            sessions: HashMap::new(),
            evicted: BTreeSet::new(),
            refs: HashMap::new(),
            backrefs: HashMap::new(),
            extents: HashMap::new(),
            lsn: 0,
            generation: 1,
            ops_since_commit: 0,
            barriers: HashMap::new(),
            next_barrier: 1,
            consumers: HashMap::new(),
            consumers_ever: 0,
            freed: Vec::new(),
            counters: Counters::default(),
        }
    }

    /// The generation of the last commit.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Marks `session_id` evicted.
    pub fn evict(&mut self, session_id: u64) {
        self.sessions.remove(&session_id);
        self.evicted.insert(session_id);
    }

    /// A SUBMIT was received: window bookkeeping, before it is handled.
    pub fn submit_received(&mut self, body: &[u8]) -> Option<(u64, u64)> {
        let view = SubmitRequest::parse(body).ok()?;
        let log = self.sessions.get_mut(&view.session_id)?;
        let r = view.request_number;
        log.outstanding.insert(r);
        let oldest = *log.outstanding.first()?;
        if r >= oldest + self.kept_max as u64 {
            self.counters.window_violations += 1;
        }
        Some((view.session_id, r))
    }

    /// The reply to SUBMIT (`session`, `number`) was written.
    pub fn submit_answered(&mut self, session_id: u64, number: u64) {
        if let Some(log) = self.sessions.get_mut(&session_id) {
            log.outstanding.remove(&number);
        }
    }

    /// Handles one request after HELLO.
    pub fn handle(&mut self, opcode: u8, body: &[u8]) -> Reply {
        if opcode == Opcode::Submit.as_u8() {
            return match self.submit(body) {
                Ok(r) => Reply::Submit(r),
                Err(e) => Reply::Error(e),
            };
        }
        let request = match Request::decode(opcode, body) {
            Ok(r) => r,
            Err(e) => return Reply::Error(e.error_body()),
        };
        match self.other(request) {
            Ok(r) => r,
            Err(e) => Reply::Error(e),
        }
    }

    fn submit(&mut self, body: &[u8]) -> Result<SubmitReply, ErrorBody> {
        self.counters.submits += 1;
        let view =
            SubmitRequest::parse_limited(body, self.submit_ops_max).map_err(|e| e.error_body())?;
        let (sid, r) = (view.session_id, view.request_number);
        if self.evicted.contains(&sid) {
            return Err(ErrorBody::new(ErrorCode::SessionEvicted, "evicted"));
        }
        let Some(log) = self.sessions.get_mut(&sid) else {
            return Err(ErrorBody::new(ErrorCode::SessionUnknown, "no such session"));
        };
        if let Some((_, reply)) = log.kept.iter().find(|(n, _)| *n == r) {
            self.counters.duplicates += 1;
            return Ok(SubmitReply {
                flags: reply.flags | SUBMIT_REPLY_DUPLICATE,
                ..*reply
            });
        }
        let answerable_from = (log.highest + 1).saturating_sub(self.kept_max as u64);
        if r < answerable_from {
            self.counters.too_old += 1;
            return Err(
                ErrorBody::new(ErrorCode::RequestTooOld, "too old").with_detail(answerable_from)
            );
        }
        for (i, op) in view.ops().enumerate() {
            let sub = if op.num_bytes == 0 {
                Some(OpErrorCode::ZeroNumBytes)
            } else if op.k1 == POISON_ROOT {
                Some(OpErrorCode::MissingRoot)
            } else {
                None
            };
            if let Some(sub) = sub {
                self.counters.invalid += 1;
                let n = view.op_count() as u32;
                self.counters.invalid_batch_ops_max = self.counters.invalid_batch_ops_max.max(n);
                return Err(ErrorBody::invalid_op(sub, i as u32, op.bytenr, "marked op"));
            }
        }
        let ops: Vec<WireOp> = view.ops().collect();
        for op in &ops {
            self.apply(op);
        }
        self.lsn += 1;
        self.counters.batches_applied += 1;
        self.counters.ops_applied += ops.len() as u64;
        self.ops_since_commit += ops.len() as u64;
        let reply = SubmitReply {
            lsn: self.lsn,
            op_count: ops.len() as u32,
            flags: SUBMIT_REPLY_DURABLE,
            request_number: r,
        };
        let log = self.sessions.get_mut(&sid).expect("checked above");
        log.kept.push_back((r, reply));
        log.highest = log.highest.max(r);
        let answerable_from = (log.highest + 1).saturating_sub(self.kept_max as u64);
        log.kept.retain(|&(n, _)| n >= answerable_from);
        assert!(log.kept.len() <= self.kept_max);
        Ok(reply)
    }

    fn apply(&mut self, op: &WireOp) {
        let delta = match op.action {
            ACTION_ADD_REF | ACTION_ADD_EXTENT => 1,
            ACTION_DROP_REF => -1,
            _ => 0,
        };
        *self.refs.entry(op.bytenr).or_default() += delta;
        self.extents
            .insert(op.bytenr, (op.kind, op.level, op.num_bytes));
        if delta != 0 {
            let key = BackrefKey {
                ref_type: op.ref_type,
                k1: op.k1,
                k2: op.k2,
                k3: op.k3,
            };
            let map = self.backrefs.entry(op.bytenr).or_default();
            *map.entry(key).or_default() += delta;
            map.retain(|_, c| *c != 0);
        }
    }

    fn session_ok(&self, session_id: u64) -> Result<(), ErrorBody> {
        if self.evicted.contains(&session_id) {
            return Err(ErrorBody::new(ErrorCode::SessionEvicted, "evicted"));
        }
        if !self.sessions.contains_key(&session_id) {
            return Err(ErrorBody::new(ErrorCode::SessionUnknown, "no such session"));
        }
        Ok(())
    }

    fn other(&mut self, request: Request) -> Result<Reply, ErrorBody> {
        Ok(match request {
            Request::Hello(_) => {
                return Err(ErrorBody::new(ErrorCode::BadRequest, "second HELLO"));
            }
            Request::Register(_) => {
                let session_id = self.next_session;
                self.next_session += 1;
                self.sessions.insert(session_id, SessionLog::default());
                self.counters.sessions += 1;
                Reply::Register(RegisterReply { session_id })
            }
            Request::Lookup(l) => Reply::Lookup(self.lookup(&l.bytenrs)),
            Request::Backrefs(b) => Reply::Backrefs(self.backrefs_page(&b)),
            Request::BarrierAcquire(b) => {
                self.session_ok(b.session_id)?;
                let held = self
                    .barriers
                    .values()
                    .filter(|&&s| s == b.session_id)
                    .count();
                if held >= BARRIERS_MAX {
                    return Err(ErrorBody::new(ErrorCode::BarrierLimit, "64 barriers"));
                }
                let barrier_id = self.next_barrier;
                self.next_barrier += 1;
                self.barriers.insert(barrier_id, b.session_id);
                Reply::BarrierAcquire(BarrierAcquireReply {
                    barrier_id,
                    seq: self.lsn + 1,
                    lease_ms: 30_000,
                })
            }
            Request::BarrierRenew(b) => {
                self.barrier_known(b.barrier_id)?;
                Reply::BarrierRenew(BarrierRenewReply { lease_ms: 30_000 })
            }
            Request::BarrierRelease(b) => {
                self.barrier_known(b.barrier_id)?;
                self.barriers.remove(&b.barrier_id);
                Reply::BarrierRelease(BarrierReleaseReply)
            }
            Request::Commit(_) => Reply::Commit(self.commit()),
            Request::FreedSubscribe(s) => {
                // Ids are never reused, also after an unsubscribe.
                let next_id = self.consumers_ever + 1;
                if !self.consumers.contains_key(&s.name) {
                    self.consumers_ever += 1;
                }
                let (consumer_id, acked_generation) =
                    *self.consumers.entry(s.name).or_insert((next_id, 0));
                Reply::FreedSubscribe(FreedSubscribeReply {
                    consumer_id,
                    acked_generation,
                    oldest_kept: self.freed.first().map_or(0, |e| e.generation),
                })
            }
            Request::Freed(f) => Reply::Freed(self.freed_page(&f)),
            Request::FreedAck(a) => {
                if a.generation > self.generation {
                    return Err(ErrorBody::new(ErrorCode::BadRequest, "not committed yet"));
                }
                let entry = self
                    .consumers
                    .values_mut()
                    .find(|(id, _)| *id == a.consumer_id);
                let Some((_, acked)) = entry else {
                    return Err(ErrorBody::new(ErrorCode::ConsumerUnknown, "no consumer"));
                };
                *acked = (*acked).max(a.generation);
                Reply::FreedAck(FreedAckReply {
                    acked_generation: *acked,
                })
            }
            Request::FreedUnsubscribe(u) => {
                let name = self
                    .consumers
                    .iter()
                    .find(|(_, (id, _))| *id == u.consumer_id)
                    .map(|(name, _)| name.clone());
                let Some((_, acked_generation)) = name.and_then(|n| self.consumers.remove(&n))
                else {
                    return Err(ErrorBody::new(ErrorCode::ConsumerUnknown, "no consumer"));
                };
                Reply::FreedUnsubscribe(FreedUnsubscribeReply { acked_generation })
            }
            Request::Stats(_) => Reply::Stats(StatsReply {
                json: format!("{{\"ops_applied\":{}}}", self.counters.ops_applied),
            }),
            Request::Ping(p) => Reply::Ping(PingReply { payload: p.payload }),
            _ => return Err(ErrorBody::new(ErrorCode::UnknownOpcode, "unknown")),
        })
    }

    fn barrier_known(&self, barrier_id: u64) -> Result<(), ErrorBody> {
        match self.barriers.contains_key(&barrier_id) {
            true => Ok(()),
            false => Err(ErrorBody::new(ErrorCode::BarrierUnknown, "no barrier")),
        }
    }

    fn lookup(&self, bytenrs: &[u64]) -> LookupReply {
        let entries = bytenrs
            .iter()
            .map(|&bytenr| {
                let refs = self.refs.get(&bytenr).copied().unwrap_or(0);
                let (kind, level, num_bytes) =
                    self.extents.get(&bytenr).copied().unwrap_or_default();
                let mut flags = 0;
                if refs != 0 {
                    flags |= LOOKUP_PENDING;
                }
                if kind == KIND_DATA {
                    flags |= LOOKUP_DATA;
                }
                LookupEntry {
                    bytenr,
                    refs,
                    committed_refs: 0,
                    pending_ref_mod: refs,
                    num_bytes,
                    flags,
                    level,
                }
            })
            .collect();
        LookupReply { entries }
    }

    fn backrefs_page(&self, b: &BackrefsRequest) -> BackrefsReply {
        let empty = BTreeMap::new();
        let map = self.backrefs.get(&b.bytenr).unwrap_or(&empty);
        let mut iter: Box<dyn Iterator<Item = (&BackrefKey, &i64)>> = match b.after {
            Some(after) => {
                Box::new(map.range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)))
            }
            None => Box::new(map.iter()),
        };
        let entries: Vec<BackrefEntry> = iter
            .by_ref()
            .take(b.max_entries as usize)
            .map(|(k, &count)| BackrefEntry {
                ref_type: k.ref_type,
                count,
                k1: k.k1,
                k2: k.k2,
                k3: k.k3,
            })
            .collect();
        let more = iter.next().is_some();
        let (kind, level, num_bytes) = self.extents.get(&b.bytenr).copied().unwrap_or((255, 0, 0));
        BackrefsReply {
            bytenr: b.bytenr,
            num_bytes,
            refs: self.refs.get(&b.bytenr).copied().unwrap_or(0),
            item_flags: 0,
            kind,
            level,
            more,
            entries,
        }
    }

    fn commit(&mut self) -> CommitReply {
        self.generation += 1;
        let generation = self.generation;
        let mut gone: Vec<u64> = self
            .refs
            .iter()
            .filter(|&(_, &r)| r == 0)
            .map(|(&b, _)| b)
            .collect();
        gone.sort_unstable();
        for &bytenr in &gone {
            self.refs.remove(&bytenr);
            let (kind, level, num_bytes) = self.extents.remove(&bytenr).unwrap_or_default();
            self.freed.push(FreedExtent {
                generation,
                bytenr,
                num_bytes,
                kind,
                level,
            });
        }
        let ops = std::mem::take(&mut self.ops_since_commit);
        CommitReply {
            generation,
            ops,
            freed: gone.len() as u64,
            ..CommitReply::default()
        }
    }

    fn freed_page(&self, f: &FreedRequest) -> FreedReply {
        // Position of each extent within its generation's list.
        let mut positioned = Vec::new();
        let mut last = (0, 0u32);
        for e in &self.freed {
            let index = if e.generation == last.0 {
                last.1 + 1
            } else {
                0
            };
            last = (e.generation, index);
            positioned.push((e.generation, index, *e));
        }
        let mut rest = positioned
            .into_iter()
            .filter(|&(g, i, _)| (g, i) >= (f.generation, f.index));
        let extents: Vec<FreedExtent> = rest
            .by_ref()
            .take(f.max_extents as usize)
            .map(|(_, _, e)| e)
            .collect();
        let next = rest.next();
        let (next_generation, next_index) = match (next, extents.last()) {
            (Some((g, i, _)), _) => (g, i),
            (None, _) => (self.generation + 1, 0),
        };
        FreedReply {
            more: next.is_some(),
            next_generation,
            next_index,
            oldest_kept: self.freed.first().map_or(0, |e| e.generation),
            extents,
        }
    }
}
