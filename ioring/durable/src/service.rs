//! The daemon's durable state beside the extent tree: client sessions
//! (what makes SUBMIT exactly-once), freed-list consumers and the index of
//! the freed lists kept on the device.
//!
//! Every change is a log record appended under the cut lock's read side
//! with the service mutex held, so the state at a commit's cut (taken
//! under the write side) is exactly the state after the records below the
//! cut: the commit writes that snapshot into the B+tree (only what changed
//! since the previous one), and recovery loads it and replays the records
//! after the cut in log order. Session eviction (least recently used, by a
//! use clock advanced only by records) replays identically.
//!
//! Bounds: at most [`ServiceOptions::sessions_max`] sessions with at most
//! [`ServiceOptions::session_replies_kept`] replies each; consumers are
//! bounded by [`CONSUMERS_MAX`] subscribed at once (an unsubscribed one
//! frees its slot); freed lists by
//! [`ServiceOptions::freed_kept_max`] extents.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::codec::service::{
    ConsumerItem, MetaItem, SessionItem, SessionReply, SESSION_REPLIES_KEPT_MAX,
};

/// Most freed-list consumers.
pub const CONSUMERS_MAX: usize = 1024;
/// Default [`ServiceOptions::sessions_max`].
pub const SESSIONS_MAX_DEFAULT: usize = 1024;
/// Default [`ServiceOptions::session_replies_kept`].
pub const SESSION_REPLIES_KEPT_DEFAULT: usize = 64;
/// Default [`ServiceOptions::freed_kept_max`].
pub const FREED_KEPT_MAX_DEFAULT: u64 = 4 << 20;

/// Bounds of the service state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceOptions {
    /// Most sessions; registering one more evicts the least recently used.
    pub sessions_max: usize,
    /// Replies kept per session (1..=128).
    pub session_replies_kept: usize,
    /// Most freed extents kept on the device in all.
    pub freed_kept_max: u64,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        ServiceOptions {
            sessions_max: SESSIONS_MAX_DEFAULT,
            session_replies_kept: SESSION_REPLIES_KEPT_DEFAULT,
            freed_kept_max: FREED_KEPT_MAX_DEFAULT,
        }
    }
}

impl ServiceOptions {
    /// The bounds clamped to what the on-device items hold.
    pub(crate) fn clamped(self) -> Self {
        ServiceOptions {
            sessions_max: self.sessions_max.max(1),
            session_replies_kept: self.session_replies_kept.clamp(1, SESSION_REPLIES_KEPT_MAX),
            freed_kept_max: self.freed_kept_max.max(1),
        }
    }
}

/// What a SUBMIT's session and request number allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A new request: validate, apply, log.
    New,
    /// Already logged: this is its reply; apply nothing.
    Duplicate(SessionReply),
}

/// Why a SUBMIT's session refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The id was never handed out (0 never is).
    #[error("session {session} was never registered")]
    Unknown {
        /// Session id.
        session: u64,
    },
    /// The session was evicted (least recently used).
    #[error("session {session} was evicted (least recently used); register a new one")]
    Evicted {
        /// Session id.
        session: u64,
    },
    /// At or below `highest - kept`: whether it was applied can no longer
    /// be told.
    #[error(
        "request {request} of session {session} is below the oldest request number still \
         answered for ({oldest}); its outcome can no longer be told"
    )]
    TooOld {
        /// Session id.
        session: u64,
        /// Request number.
        request: u64,
        /// The lowest request number still answered for.
        oldest: u64,
    },
    /// Request numbers start at 1.
    #[error("request number 0 of session {session}")]
    ZeroRequest {
        /// Session id.
        session: u64,
    },
}

/// A freed-list consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumer {
    /// Id.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Last generation acknowledged.
    pub acked: u64,
}

/// The freed list of one commit, as kept on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreedList {
    /// Extents in it.
    pub extents: u64,
    /// Its chunks (B+tree items).
    pub chunks: u64,
}

/// What changed since the last snapshot, with the state at the cut.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Changed sessions (`None`: evicted, delete the item).
    pub sessions: Vec<(u64, Option<Arc<SessionItem>>)>,
    /// Changed consumers (`None`: unsubscribed, delete the item).
    pub consumers: Vec<(u64, Option<ConsumerItem>)>,
    /// The counters, if changed.
    pub meta: Option<MetaItem>,
    /// Every consumer's acknowledgement at the cut (retention).
    pub acked: Vec<u64>,
    /// The counters at the cut (written when a commit drops freed lists).
    pub meta_at_cut: MetaItem,
}

/// The service state (see the module docs).
#[derive(Debug)]
pub(crate) struct Service {
    options: ServiceOptions,
    sessions: HashMap<u64, Arc<SessionItem>>,
    /// `last_use → session`: the least recently used first.
    lru: BTreeMap<u64, u64>,
    consumers: BTreeMap<u64, Consumer>,
    meta: MetaItem,
    dirty_sessions: BTreeSet<u64>,
    dirty_consumers: BTreeSet<u64>,
    meta_dirty: bool,
    /// Request numbers being applied now (checked, not yet logged).
    claimed: std::collections::HashSet<(u64, u64)>,
    /// Freed lists kept on the device, by generation.
    freed: BTreeMap<u64, FreedList>,
    /// The last committed generation (with `freed`: a reader sees a
    /// commit's list exactly when it sees its generation).
    committed: u64,
    freed_extents: u64,
}

impl Service {
    pub(crate) fn new(options: ServiceOptions) -> Self {
        Service {
            options: options.clamped(),
            sessions: HashMap::new(),
            lru: BTreeMap::new(),
            consumers: BTreeMap::new(),
            meta: MetaItem {
                next_session: 1,
                next_consumer: 1,
                use_clock: 0,
                freed_dropped_upto: 0,
            },
            dirty_sessions: BTreeSet::new(),
            dirty_consumers: BTreeSet::new(),
            meta_dirty: false,
            claimed: std::collections::HashSet::new(),
            freed: BTreeMap::new(),
            committed: 0,
            freed_extents: 0,
        }
    }

    pub(crate) fn options(&self) -> ServiceOptions {
        self.options
    }

    /// State read from the B+tree at open (before replay).
    pub(crate) fn load(
        &mut self,
        meta: Option<MetaItem>,
        sessions: Vec<(u64, SessionItem)>,
        consumers: Vec<(u64, ConsumerItem)>,
        freed: BTreeMap<u64, FreedList>,
    ) {
        if let Some(m) = meta {
            self.meta = m;
        }
        for (id, s) in sessions {
            self.lru.insert(s.last_use, id);
            self.sessions.insert(id, Arc::new(s));
        }
        for (id, c) in consumers {
            self.consumers.insert(
                id,
                Consumer {
                    id,
                    name: c.name,
                    acked: c.acked,
                },
            );
        }
        self.freed_extents = freed.values().map(|f| f.extents).sum();
        self.freed = freed;
        // The options may have shrunk since the state was written.
        while self.sessions.len() > self.options.sessions_max {
            self.evict_oldest();
        }
    }

    fn tick(&mut self) -> u64 {
        self.meta.use_clock += 1;
        self.meta_dirty = true;
        self.meta.use_clock
    }

    fn evict_oldest(&mut self) {
        if let Some((_, id)) = self.lru.pop_first() {
            self.sessions.remove(&id);
            self.dirty_sessions.insert(id);
        }
    }

    /// A new session (evicting the least recently used one at the bound).
    /// The caller logs a REGISTER record with the id.
    pub(crate) fn register(&mut self) -> u64 {
        let id = self.meta.next_session;
        self.register_id(id);
        id
    }

    /// Replay (or [`Service::register`]) of a REGISTER record.
    pub(crate) fn register_id(&mut self, id: u64) {
        if self.sessions.contains_key(&id) {
            return;
        }
        while self.sessions.len() >= self.options.sessions_max {
            self.evict_oldest();
        }
        let last_use = self.tick();
        self.meta.next_session = self.meta.next_session.max(id + 1);
        self.sessions.insert(
            id,
            Arc::new(SessionItem {
                last_use,
                replies: Vec::new(),
            }),
        );
        self.lru.insert(last_use, id);
        self.dirty_sessions.insert(id);
    }

    /// Whether `session` is kept.
    pub(crate) fn check(&self, session: u64) -> Result<(), SessionError> {
        if self.sessions.contains_key(&session) {
            Ok(())
        } else if session == 0 || session >= self.meta.next_session {
            Err(SessionError::Unknown { session })
        } else {
            Err(SessionError::Evicted { session })
        }
    }

    /// What request `request` of `session` is.
    pub(crate) fn admit(&self, session: u64, request: u64) -> Result<Admission, SessionError> {
        if request == 0 {
            return Err(SessionError::ZeroRequest { session });
        }
        let Some(s) = self.sessions.get(&session) else {
            return Err(if session == 0 || session >= self.meta.next_session {
                SessionError::Unknown { session }
            } else {
                SessionError::Evicted { session }
            });
        };
        if let Some(r) = s.replies.iter().find(|r| r.request == request) {
            return Ok(Admission::Duplicate(*r));
        }
        // The window is one of request numbers (`docs/protocol.md`,
        // "Exactly once"): replies above `highest - kept` are kept, so a
        // number at or below it may have been applied and forgotten.
        let highest = s.replies.last().map_or(0, |r| r.request);
        let kept = self.options.session_replies_kept as u64;
        if highest > kept && request <= highest - kept {
            return Err(SessionError::TooOld {
                session,
                request,
                oldest: highest - kept + 1,
            });
        }
        Ok(Admission::New)
    }

    /// Claims `request` of `session` while it is applied; false if another
    /// thread has it.
    pub(crate) fn claim(&mut self, session: u64, request: u64) -> bool {
        self.claimed.insert((session, request))
    }

    /// Ends a [`Service::claim`].
    pub(crate) fn unclaim(&mut self, session: u64, request: u64) {
        self.claimed.remove(&(session, request));
    }

    /// Records the reply of a logged SUBMIT (also on replay; a session
    /// evicted since is skipped).
    pub(crate) fn record_submit(&mut self, session: u64, reply: SessionReply) {
        if !self.sessions.contains_key(&session) {
            return;
        }
        let last_use = self.tick();
        let kept = self.options.session_replies_kept;
        let s = Arc::make_mut(self.sessions.get_mut(&session).expect("checked above"));
        self.lru.remove(&s.last_use);
        s.last_use = last_use;
        if !s.replies.iter().any(|r| r.request == reply.request) {
            // Rising by request number (numbers may be logged out of
            // order); only those above `highest - kept` are kept.
            let at = s.replies.partition_point(|r| r.request < reply.request);
            s.replies.insert(at, reply);
            let highest = s.replies.last().map_or(0, |r| r.request);
            let floor = highest.saturating_sub(kept as u64);
            s.replies.retain(|r| r.request > floor);
        }
        self.lru.insert(last_use, session);
        self.dirty_sessions.insert(session);
    }

    /// Sessions kept now.
    pub(crate) fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The next session id (ids below it were handed out).
    pub(crate) fn next_session(&self) -> u64 {
        self.meta.next_session
    }

    /// The consumer named `name`, if subscribed.
    pub(crate) fn consumer_by_name(&self, name: &str) -> Option<&Consumer> {
        self.consumers.values().find(|c| c.name == name)
    }

    /// A consumer.
    pub(crate) fn consumer(&self, id: u64) -> Option<&Consumer> {
        self.consumers.get(&id)
    }

    /// Every consumer.
    pub(crate) fn consumers(&self) -> Vec<Consumer> {
        self.consumers.values().cloned().collect()
    }

    /// The id a new consumer gets, or `None` at [`CONSUMERS_MAX`].
    pub(crate) fn next_consumer(&self) -> Option<u64> {
        (self.consumers.len() < CONSUMERS_MAX).then_some(self.meta.next_consumer)
    }

    /// Applies a SUBSCRIBE record (also on replay). A new consumer starts
    /// acknowledged up to `acked` (the newest generation whose list it
    /// cannot read anyway: none is dropped for it before it subscribes).
    pub(crate) fn subscribe(&mut self, id: u64, name: &str, acked: u64) {
        if self.consumers.contains_key(&id) {
            return;
        }
        self.meta.next_consumer = self.meta.next_consumer.max(id + 1);
        self.meta_dirty = true;
        self.consumers.insert(
            id,
            Consumer {
                id,
                name: name.to_string(),
                acked,
            },
        );
        self.dirty_consumers.insert(id);
    }

    /// Applies a FREED_ACK record (also on replay); acknowledgements only
    /// move forward.
    pub(crate) fn ack(&mut self, id: u64, generation: u64) {
        if let Some(c) = self.consumers.get_mut(&id) {
            if generation > c.acked {
                c.acked = generation;
                self.dirty_consumers.insert(id);
            }
        }
    }

    /// Applies an UNSUBSCRIBE record (also on replay): the consumer no
    /// longer holds lists back and no longer counts against
    /// [`CONSUMERS_MAX`]; its id is never handed out again
    /// (`next_consumer` only grows), so a retry cannot remove a consumer
    /// subscribed since under the same name.
    pub(crate) fn unsubscribe(&mut self, id: u64) {
        if self.consumers.remove(&id).is_some() {
            self.dirty_consumers.insert(id);
        }
    }

    /// What changed since the last snapshot (taken at a commit's cut).
    pub(crate) fn snapshot(&mut self) -> Snapshot {
        let sessions = std::mem::take(&mut self.dirty_sessions)
            .into_iter()
            .map(|id| (id, self.sessions.get(&id).cloned()))
            .collect();
        let consumers = std::mem::take(&mut self.dirty_consumers)
            .into_iter()
            .map(|id| {
                let item = self.consumers.get(&id).map(|c| ConsumerItem {
                    name: c.name.clone(),
                    acked: c.acked,
                });
                (id, item)
            })
            .collect();
        let meta = std::mem::take(&mut self.meta_dirty).then_some(self.meta);
        Snapshot {
            sessions,
            consumers,
            meta,
            acked: self.consumers.values().map(|c| c.acked).collect(),
            meta_at_cut: self.meta,
        }
    }

    /// Freed lists kept, by generation.
    pub(crate) fn freed(&self) -> &BTreeMap<u64, FreedList> {
        &self.freed
    }

    /// Freed extents kept in all.
    pub(crate) fn freed_extents(&self) -> u64 {
        self.freed_extents
    }

    /// The oldest generation whose list is kept.
    pub(crate) fn freed_oldest(&self) -> Option<u64> {
        self.freed.keys().next().copied()
    }

    /// Newest generation whose list was dropped (0: none).
    pub(crate) fn freed_dropped_upto(&self) -> u64 {
        self.meta.freed_dropped_upto
    }

    /// The lists a commit drops when it adds `adding` freed extents, given
    /// the consumers' acknowledgements at its cut: every list all of them
    /// acknowledged (when there is at least one), and the oldest ones
    /// beyond the bound. Returns the generations, oldest first.
    pub(crate) fn freed_to_drop(&self, adding: u64, acked: &[u64]) -> Vec<u64> {
        let min_ack = acked.iter().copied().min();
        let mut total = self.freed_extents + adding;
        let mut drop = Vec::new();
        for (&generation, list) in &self.freed {
            let acked_by_all = min_ack.is_some_and(|a| generation <= a);
            if !acked_by_all && total <= self.options.freed_kept_max {
                break;
            }
            total -= list.extents;
            drop.push(generation);
        }
        drop
    }

    /// The last committed generation.
    pub(crate) fn committed(&self) -> u64 {
        self.committed
    }

    /// The generation the device holds at open.
    pub(crate) fn set_committed(&mut self, generation: u64) {
        self.committed = generation;
    }

    /// After commit `generation`: its list is kept, the dropped ones are
    /// gone.
    pub(crate) fn freed_committed(
        &mut self,
        generation: u64,
        added: Option<FreedList>,
        dropped: &[u64],
    ) {
        self.committed = self.committed.max(generation);
        for g in dropped {
            if let Some(list) = self.freed.remove(g) {
                self.freed_extents -= list.extents;
            }
            self.meta.freed_dropped_upto = self.meta.freed_dropped_upto.max(*g);
        }
        if let Some(list) = added {
            self.freed_extents += list.extents;
            self.freed.insert(generation, list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(request: u64) -> SessionReply {
        SessionReply {
            request,
            lsn: request * 10,
            ops: 1,
        }
    }

    #[test]
    fn sessions_keep_a_window_of_replies() {
        let mut s = Service::new(ServiceOptions {
            sessions_max: 2,
            session_replies_kept: 3,
            freed_kept_max: 10,
        });
        let a = s.register();
        assert_eq!(s.admit(a, 0), Err(SessionError::ZeroRequest { session: a }));
        assert_eq!(s.admit(a, 1), Ok(Admission::New));
        for r in 1..=5 {
            s.record_submit(a, reply(r));
        }
        assert_eq!(s.admit(a, 5), Ok(Admission::Duplicate(reply(5))));
        assert_eq!(s.admit(a, 3), Ok(Admission::Duplicate(reply(3))));
        assert_eq!(
            s.admit(a, 2),
            Err(SessionError::TooOld {
                session: a,
                request: 2,
                oldest: 3
            })
        );
        assert_eq!(s.admit(a, 7), Ok(Admission::New), "a gap is fine");
        // Numbers logged out of order: a lower one still in the window is
        // kept, and dropped once the window passes it.
        s.record_submit(a, reply(10));
        assert_eq!(s.admit(a, 8), Ok(Admission::New), "8 > 10 - 3");
        s.record_submit(a, reply(8));
        assert_eq!(s.admit(a, 8), Ok(Admission::Duplicate(reply(8))));
        s.record_submit(a, reply(12));
        assert_eq!(
            s.admit(a, 8),
            Err(SessionError::TooOld {
                session: a,
                request: 8,
                oldest: 10
            })
        );
        assert_eq!(s.admit(99, 1), Err(SessionError::Unknown { session: 99 }));
        assert_eq!(s.admit(0, 1), Err(SessionError::Unknown { session: 0 }));
    }

    #[test]
    fn the_least_recently_used_session_is_evicted() {
        let mut s = Service::new(ServiceOptions {
            sessions_max: 2,
            session_replies_kept: 3,
            freed_kept_max: 10,
        });
        let a = s.register();
        let b = s.register();
        s.record_submit(a, reply(1)); // a is now the most recent
        let c = s.register();
        assert_eq!(s.admit(b, 1), Err(SessionError::Evicted { session: b }));
        assert_eq!(s.admit(a, 1), Ok(Admission::Duplicate(reply(1))));
        assert_eq!(s.admit(c, 1), Ok(Admission::New));
        let snap = s.snapshot();
        let ids: Vec<(u64, bool)> = snap
            .sessions
            .iter()
            .map(|(i, s)| (*i, s.is_some()))
            .collect();
        assert_eq!(ids, vec![(a, true), (b, false), (c, true)]);
        assert!(s.snapshot().sessions.is_empty(), "clean after a snapshot");
    }

    #[test]
    fn freed_retention() {
        let mut s = Service::new(ServiceOptions {
            sessions_max: 2,
            session_replies_kept: 3,
            freed_kept_max: 10,
        });
        let list = |extents| Some(FreedList { extents, chunks: 1 });
        s.freed_committed(4, list(4), &[]);
        s.freed_committed(5, list(4), &[]);
        // No consumer: kept up to the bound.
        assert_eq!(s.freed_to_drop(2, &[]), Vec::<u64>::new());
        assert_eq!(s.freed_to_drop(3, &[]), vec![4]);
        // A consumer behind keeps them (within the bound); one that
        // acknowledged generation 4 lets it go.
        assert_eq!(s.freed_to_drop(1, &[3]), Vec::<u64>::new());
        assert_eq!(s.freed_to_drop(1, &[4, 9]), vec![4]);
        s.freed_committed(6, list(1), &[4]);
        assert_eq!((s.freed_oldest(), s.freed_extents()), (Some(5), 5));
    }

    #[test]
    fn an_unsubscribed_consumer_frees_its_slot_and_its_id_is_not_reused() {
        let mut s = Service::new(ServiceOptions::default());
        for _ in 0..CONSUMERS_MAX {
            let id = s.next_consumer().expect("below the bound");
            s.subscribe(id, &format!("c{id}"), 0);
        }
        assert_eq!(s.next_consumer(), None, "at the bound");
        let _ = s.snapshot();
        s.unsubscribe(7);
        assert!(s.consumer(7).is_none() && s.consumer_by_name("c7").is_none());
        let snap = s.snapshot();
        assert_eq!(snap.consumers, vec![(7, None)], "the item is deleted");
        assert_eq!(snap.acked.len(), CONSUMERS_MAX - 1, "no longer retains");
        let id = s.next_consumer().expect("a slot is free again");
        assert_eq!(id, CONSUMERS_MAX as u64 + 1, "ids are never reused");
        s.subscribe(id, "c7", 0);
        assert_eq!(s.consumer_by_name("c7").map(|c| c.id), Some(id));
        let _ = s.snapshot();
        // Replay of the same record again changes nothing.
        s.unsubscribe(7);
        assert!(s.snapshot().consumers.is_empty());
    }
}
