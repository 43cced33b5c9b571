//! The typed requests other than SUBMIT: one method per opcode, each
//! checking that the reply matches its request (counts, bytenrs, page
//! sizes), and resending after a broken connection only where
//! `docs/protocol.md` ("Retrying other requests") says it is harmless.

use std::time::{Duration, Instant};

use refd_proto::{
    BackrefEntry, BackrefKey, BackrefsReply, BackrefsRequest, BarrierAcquireReply,
    BarrierAcquireRequest, BarrierReleaseRequest, BarrierRenewRequest, CommitReply, CommitRequest,
    ErrorCode, FreedAckRequest, FreedReply, FreedRequest, FreedSubscribeReply,
    FreedSubscribeRequest, FreedUnsubscribeRequest, LookupEntry, LookupRequest, PingRequest,
    RegisterRequest, Reply, RequestMessage, StatsRequest, BACKREFS_ENTRIES_MAX, FREED_EXTENTS_MAX,
    LOOKUP_COUNT_MAX,
};

use crate::client::{Attempts, Client};
use crate::error::{Error, ProtocolViolation};

/// Most backrefs [`Client::backrefs`] collects over all pages; page with
/// [`Client::backrefs_page`] beyond it.
pub const BACKREFS_COLLECT_MAX: usize = 1 << 22;

/// All backrefs of one extent, from every page of BACKREFS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backrefs {
    /// The extent.
    pub bytenr: u64,
    /// Its size (0: nothing known), as of the last page.
    pub num_bytes: u64,
    /// Committed + pending refs, as of the last page.
    pub refs: i64,
    /// Flags of the committed extent item (`ITEM_FLAG_*`; 0: none).
    pub item_flags: u64,
    /// 0 tree block, 1 data, 255 nothing known.
    pub kind: u8,
    /// Tree block level.
    pub level: u8,
    /// Every backref with its count, in btrfs key order.
    pub entries: Vec<BackrefEntry>,
}

/// Where a FREED read starts: the extents freed by commit `generation`,
/// from its `index`-th on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FreedCursor {
    /// The commit.
    pub generation: u64,
    /// The first extent of its list to return.
    pub index: u32,
}

impl FreedCursor {
    /// Where a consumer that acknowledged `acked_generation` starts.
    pub fn after_ack(acked_generation: u64) -> FreedCursor {
        FreedCursor {
            generation: acked_generation + 1,
            index: 0,
        }
    }

    /// The cursor for the page after `reply`.
    pub fn next(reply: &FreedReply) -> FreedCursor {
        FreedCursor {
            generation: reply.next_generation,
            index: reply.next_index,
        }
    }
}

fn mismatch(request: &'static str, field: &'static str, expected: u64, got: u64) -> Error {
    Error::Protocol {
        request,
        violation: ProtocolViolation::Mismatch {
            field,
            expected,
            got,
        },
    }
}

fn wrong_reply(request: &'static str, reply: &Reply) -> Error {
    Error::Protocol {
        request,
        violation: ProtocolViolation::WrongOpcode {
            expected: request,
            got: reply.opcode().as_u8(),
        },
    }
}

fn invalid(request: &'static str, reason: String) -> Error {
    Error::InvalidArgument { request, reason }
}

impl Client {
    /// Sends one typed request (see [`Client::call`]).
    fn request<M: RequestMessage>(
        &self,
        what: &'static str,
        request: &M,
        resend: bool,
        attempts: &mut Attempts,
    ) -> Result<Reply, Error> {
        let mut body = Vec::new();
        request.encode(&mut body);
        self.call(what, M::OPCODE, &body, resend, self.deadline(), attempts)
    }

    /// PING: the round-trip time of an empty echo.
    pub fn ping(&self) -> Result<Duration, Error> {
        let started = Instant::now();
        let payload = *b"refd-client ping";
        let request = PingRequest::new(&payload).map_err(|e| invalid("PING", e.to_string()))?;
        match self.request("PING", &request, true, &mut Attempts::default())? {
            Reply::Ping(p) if p.payload == payload => Ok(started.elapsed()),
            Reply::Ping(p) => Err(mismatch(
                "PING",
                "payload_bytes",
                16,
                p.payload.len() as u64,
            )),
            other => Err(wrong_reply("PING", &other)),
        }
    }

    /// STATS: the daemon's statistics, a JSON object (ignore fields you
    /// do not know).
    pub fn stats(&self) -> Result<String, Error> {
        match self.request("STATS", &StatsRequest, true, &mut Attempts::default())? {
            Reply::Stats(s) => Ok(s.json),
            other => Err(wrong_reply("STATS", &other)),
        }
    }

    /// REGISTER: a new session, used by every later SUBMIT of this client
    /// (the old session's unanswered SUBMITs keep their own). Resent after
    /// a broken connection: at worst that registers an unused session,
    /// which the daemon evicts in time.
    pub fn register(&self) -> Result<u64, Error> {
        let session_id = self.register_call()?;
        self.session.install(session_id, 1);
        Ok(session_id)
    }

    pub(crate) fn register_call(&self) -> Result<u64, Error> {
        match self.request("REGISTER", &RegisterRequest, true, &mut Attempts::default())? {
            Reply::Register(r) if r.session_id != 0 => Ok(r.session_id),
            Reply::Register(_) => Err(mismatch("REGISTER", "session_id", 1, 0)),
            other => Err(wrong_reply("REGISTER", &other)),
        }
    }

    /// The session every new SUBMIT uses, registering one if there is
    /// none (once, however many threads ask at the same time).
    pub(crate) fn ensure_session(&self) -> Result<u64, Error> {
        if let Some(id) = self.session.current() {
            return Ok(id);
        }
        let _one_at_a_time = crate::conn::lock(&self.register_lock);
        if let Some(id) = self.session.current() {
            return Ok(id);
        }
        self.register()
    }

    /// The current session, if one is registered.
    pub fn session_id(&self) -> Option<u64> {
        self.session.current()
    }

    /// LOOKUP: the reference count of every bytenr, in order. More than
    /// 16384 bytenrs go out as several requests (each answered
    /// atomically, not all of them together); none sends nothing.
    pub fn lookup(&self, bytenrs: &[u64]) -> Result<Vec<LookupEntry>, Error> {
        let mut entries = Vec::with_capacity(bytenrs.len());
        for chunk in bytenrs.chunks(LOOKUP_COUNT_MAX as usize) {
            let request =
                LookupRequest::new(chunk.to_vec()).map_err(|e| invalid("LOOKUP", e.to_string()))?;
            let reply = match self.request("LOOKUP", &request, true, &mut Attempts::default())? {
                Reply::Lookup(r) => r,
                other => return Err(wrong_reply("LOOKUP", &other)),
            };
            if reply.entries.len() != chunk.len() {
                let got = reply.entries.len() as u64;
                return Err(mismatch("LOOKUP", "count", chunk.len() as u64, got));
            }
            for (e, &bytenr) in reply.entries.iter().zip(chunk) {
                if e.bytenr != bytenr {
                    return Err(mismatch("LOOKUP", "bytenr", bytenr, e.bytenr));
                }
            }
            entries.extend(reply.entries);
        }
        Ok(entries)
    }

    /// BACKREFS: one page of at most `max_entries` (1 ..= 16384)
    /// backrefs of `bytenr`, after `after` (the last key of the previous
    /// page) or from the first.
    pub fn backrefs_page(
        &self,
        bytenr: u64,
        after: Option<BackrefKey>,
        max_entries: u32,
    ) -> Result<BackrefsReply, Error> {
        if !(1..=BACKREFS_ENTRIES_MAX).contains(&max_entries) {
            let reason = format!("max_entries {max_entries} outside 1..={BACKREFS_ENTRIES_MAX}");
            return Err(invalid("BACKREFS", reason));
        }
        let request = BackrefsRequest {
            bytenr,
            max_entries,
            after,
        };
        let reply = match self.request("BACKREFS", &request, true, &mut Attempts::default())? {
            Reply::Backrefs(r) => r,
            other => return Err(wrong_reply("BACKREFS", &other)),
        };
        if reply.bytenr != bytenr {
            return Err(mismatch("BACKREFS", "bytenr", bytenr, reply.bytenr));
        }
        if reply.entries.len() > max_entries as usize {
            let got = reply.entries.len() as u64;
            return Err(mismatch("BACKREFS", "count", u64::from(max_entries), got));
        }
        // Each page must move forward, or paging would never end.
        let first = reply.entries.first().map(BackrefEntry::key);
        if let (Some(after), Some(first)) = (after, first) {
            if first <= after {
                return Err(mismatch("BACKREFS", "first key after the cursor", 1, 0));
            }
        }
        if reply.more && reply.entries.is_empty() {
            return Err(mismatch("BACKREFS", "count with more set", 1, 0));
        }
        Ok(reply)
    }

    /// BACKREFS over all pages: every backref of `bytenr` (at most
    /// [`BACKREFS_COLLECT_MAX`]). Pages are read one after the other, so
    /// ops applied meanwhile may show in later pages only.
    pub fn backrefs(&self, bytenr: u64) -> Result<Backrefs, Error> {
        let mut after = None;
        let mut entries = Vec::new();
        loop {
            let page = self.backrefs_page(bytenr, after, BACKREFS_ENTRIES_MAX)?;
            if entries.len() + page.entries.len() > BACKREFS_COLLECT_MAX {
                let reason = format!("more than {BACKREFS_COLLECT_MAX} backrefs: page them");
                return Err(invalid("BACKREFS", reason));
            }
            after = page.entries.last().map(BackrefEntry::key);
            entries.extend_from_slice(&page.entries);
            if !page.more {
                return Ok(Backrefs {
                    bytenr,
                    num_bytes: page.num_bytes,
                    refs: page.refs,
                    item_flags: page.item_flags,
                    kind: page.kind,
                    level: page.level,
                    entries,
                });
            }
        }
    }

    /// BARRIER_ACQUIRE for this client's session (registered if none).
    /// Not resent after a broken connection (that would acquire a second
    /// barrier): the error's outcome is then `Unknown`, and a barrier it
    /// may have acquired is released when its lease runs out.
    pub fn barrier_acquire(&self) -> Result<BarrierAcquireReply, Error> {
        let session_id = self.ensure_session()?;
        let request = BarrierAcquireRequest { session_id };
        match self.request("BARRIER_ACQUIRE", &request, false, &mut Attempts::default())? {
            Reply::BarrierAcquire(r) => Ok(r),
            other => Err(wrong_reply("BARRIER_ACQUIRE", &other)),
        }
    }

    /// BARRIER_RENEW: the new lease in milliseconds.
    pub fn barrier_renew(&self, barrier_id: u64) -> Result<u32, Error> {
        let request = BarrierRenewRequest { barrier_id };
        match self.request("BARRIER_RENEW", &request, true, &mut Attempts::default())? {
            Reply::BarrierRenew(r) => Ok(r.lease_ms),
            other => Err(wrong_reply("BARRIER_RENEW", &other)),
        }
    }

    /// BARRIER_RELEASE. A resend answered `BARRIER_UNKNOWN` counts as
    /// released (the first send did it).
    pub fn barrier_release(&self, barrier_id: u64) -> Result<(), Error> {
        let request = BarrierReleaseRequest { barrier_id };
        let mut attempts = Attempts::default();
        match self.request("BARRIER_RELEASE", &request, true, &mut attempts) {
            Ok(Reply::BarrierRelease(_)) => Ok(()),
            Err(e) if attempts.sends > 1 && e.code() == Some(ErrorCode::BarrierUnknown) => Ok(()),
            Err(e) => Err(e),
            Ok(other) => Err(wrong_reply("BARRIER_RELEASE", &other)),
        }
    }

    /// COMMIT: checkpoint now; every op acknowledged before is in the
    /// on-device extent tree when this returns.
    pub fn commit(&self) -> Result<CommitReply, Error> {
        match self.request("COMMIT", &CommitRequest, true, &mut Attempts::default())? {
            Reply::Commit(r) => Ok(r),
            other => Err(wrong_reply("COMMIT", &other)),
        }
    }

    /// FREED_SUBSCRIBE: the consumer `name` (1 ..= 64 bytes) and its last
    /// acknowledged generation.
    pub fn freed_subscribe(&self, name: &str) -> Result<FreedSubscribeReply, Error> {
        let request = FreedSubscribeRequest::new(name)
            .map_err(|e| invalid("FREED_SUBSCRIBE", e.to_string()))?;
        match self.request("FREED_SUBSCRIBE", &request, true, &mut Attempts::default())? {
            Reply::FreedSubscribe(r) => Ok(r),
            other => Err(wrong_reply("FREED_SUBSCRIBE", &other)),
        }
    }

    /// FREED: at most `max_extents` (1 ..= 16384) freed extents from
    /// `cursor` on; [`FreedCursor::next`] is where the next page starts.
    pub fn freed(&self, cursor: FreedCursor, max_extents: u32) -> Result<FreedReply, Error> {
        if !(1..=FREED_EXTENTS_MAX).contains(&max_extents) {
            let reason = format!("max_extents {max_extents} outside 1..={FREED_EXTENTS_MAX}");
            return Err(invalid("FREED", reason));
        }
        let request = FreedRequest {
            generation: cursor.generation,
            index: cursor.index,
            max_extents,
        };
        let reply = match self.request("FREED", &request, true, &mut Attempts::default())? {
            Reply::Freed(r) => r,
            other => return Err(wrong_reply("FREED", &other)),
        };
        if reply.extents.len() > max_extents as usize {
            let got = reply.extents.len() as u64;
            return Err(mismatch("FREED", "count", u64::from(max_extents), got));
        }
        Ok(reply)
    }

    /// FREED_ACK: every list up to `generation` is applied by the
    /// consumer; returns its acknowledged generation.
    pub fn freed_ack(&self, consumer_id: u64, generation: u64) -> Result<u64, Error> {
        let request = FreedAckRequest {
            consumer_id,
            generation,
        };
        match self.request("FREED_ACK", &request, true, &mut Attempts::default())? {
            Reply::FreedAck(r) => Ok(r.acked_generation),
            other => Err(wrong_reply("FREED_ACK", &other)),
        }
    }

    /// FREED_UNSUBSCRIBE: removes consumer `consumer_id` (its lists are no
    /// longer held for it; its name may subscribe again as a new
    /// consumer). Returns its last acknowledged generation, or `None` when
    /// a resend was answered `CONSUMER_UNKNOWN` (the first send removed
    /// it: ids are never reused).
    pub fn freed_unsubscribe(&self, consumer_id: u64) -> Result<Option<u64>, Error> {
        let request = FreedUnsubscribeRequest { consumer_id };
        let mut attempts = Attempts::default();
        match self.request("FREED_UNSUBSCRIBE", &request, true, &mut attempts) {
            Ok(Reply::FreedUnsubscribe(r)) => Ok(Some(r.acked_generation)),
            Err(e) if attempts.sends > 1 && e.code() == Some(ErrorCode::ConsumerUnknown) => {
                Ok(None)
            }
            Err(e) => Err(e),
            Ok(other) => Err(wrong_reply("FREED_UNSUBSCRIBE", &other)),
        }
    }
}
