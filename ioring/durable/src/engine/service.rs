//! The daemon's requests on the engine: SUBMIT batches of a session
//! (exactly once), session registration, and the freed-list consumers
//! (subscribe, acknowledge, unsubscribe)
//! (`crate::service` holds the state; this file logs its changes and
//! writes it at commits).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use refd_core::delayed::DelayedRefStore;
use refd_core::model::Op;
use refd_core::run::FreedExtent;
use refd_ioring::btree::{BTree, Change, Key};
use refd_ioring::log::Lsn;
use refd_ioring::Storage;

use super::{lock, DurableEngine, Ticket};
use crate::codec::record::{submit_record_bytes_max, CONSUMER_NAME_BYTES_MAX};
use crate::codec::service::{
    self as items, ConsumerItem, FreedEntry, MetaItem, SessionItem, SessionReply, CONSUMER_KEY,
    FREED_KEY, SERVICE_OBJECTID, SESSION_KEY,
};
use crate::codec::{encode_record, encode_submit, Record};
use crate::error::{Failure, ReadError, ServiceError, SubmitError};
pub use crate::service::Admission;
use crate::service::{Consumer, FreedList, Service, Snapshot, CONSUMERS_MAX};

thread_local! {
    /// Each thread's SUBMIT record buffer (the log copies it into its
    /// batch; the buffer is reused).
    static SUBMIT_RECORD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// What [`DurableEngine::submit`] did.
#[derive(Debug)]
pub enum Submitted<S: Storage> {
    /// Applied and logged now; durable once the ticket says so.
    Queued {
        /// The batch's log ticket.
        ticket: Ticket<S>,
        /// Ops applied.
        ops: u32,
    },
    /// The request number was applied before: nothing was applied now.
    /// Its batch is durable once `lsn` is ([`DurableEngine::wait_durable`]).
    Duplicate {
        /// LSN of the batch that applied it.
        lsn: Lsn,
        /// Ops it applied.
        ops: u32,
    },
}

/// A page of freed extents ([`DurableEngine::read_freed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreedPage {
    /// `(generation, extent)`, in commit order.
    pub extents: Vec<(u64, FreedEntry)>,
    /// The cursor for the next page: generation and index within it.
    pub next: (u64, u32),
    /// More extents are kept after this page.
    pub more: bool,
    /// The oldest generation whose list is kept (0: none).
    pub oldest_kept: u64,
}

/// What the service keeps (for stats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStats {
    /// Sessions kept.
    pub sessions: usize,
    /// Sessions ever registered.
    pub sessions_registered: u64,
    /// Their bound.
    pub sessions_max: usize,
    /// Consumers and their acknowledgements.
    pub consumers: Vec<Consumer>,
    /// Freed lists kept.
    pub freed_lists: usize,
    /// Freed extents kept.
    pub freed_extents: u64,
    /// Their bound.
    pub freed_kept_max: u64,
    /// Oldest generation kept.
    pub freed_oldest: Option<u64>,
}

/// A request number claimed by the SUBMIT applying it
/// ([`crate::service::Service::claim`]): ended with the reply kept, or
/// on drop when the SUBMIT stops before its ops are added (refused for
/// space, a failed engine), so that a copy waiting for it goes on.
struct Claim<'a, S: Storage + Clone, D: DelayedRefStore> {
    engine: &'a DurableEngine<S, D>,
    session: u64,
    request: u64,
}

impl<S: Storage + Clone, D: DelayedRefStore> Claim<'_, S, D> {
    /// Ends the claim under the service lock the caller holds.
    fn end(self, service: &mut crate::service::Service) {
        service.unclaim(self.session, self.request);
        self.engine.service_cv.notify_all();
        std::mem::forget(self);
    }
}

impl<S: Storage + Clone, D: DelayedRefStore> Drop for Claim<'_, S, D> {
    fn drop(&mut self) {
        let mut service = lock(&self.engine.service);
        service.unclaim(self.session, self.request);
        self.engine.service_cv.notify_all();
    }
}

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    /// Applies `ops` of `session`'s request `request`, all or nothing,
    /// exactly once: a request number the session already logged is not
    /// applied again ([`Submitted::Duplicate`] carries its reply). The
    /// batch is one log record, so after a crash it is entirely present or
    /// absent, together with its request number.
    pub fn submit(
        &self,
        session: u64,
        request: u64,
        ops: &[Op],
    ) -> Result<Submitted<S>, SubmitError> {
        self.check_failed().map_err(SubmitError::Failed)?;
        let max = self.log.record_bytes_max();
        if submit_record_bytes_max(ops.len()) > max {
            // Only then encode to see whether it really is too large.
            let mut record = Vec::new();
            encode_submit(session, request, ops, &mut record);
            if record.len() > max {
                return Err(SubmitError::TooLarge {
                    ops: ops.len(),
                    bytes: record.len(),
                    max,
                });
            }
        }
        SUBMIT_RECORD.with_borrow_mut(|record| {
            record.clear();
            encode_submit(session, request, ops, record);
            self.submit_record(session, request, ops, record)
        })
    }

    fn submit_record(
        &self,
        session: u64,
        request: u64,
        ops: &[Op],
        record: &[u8],
    ) -> Result<Submitted<S>, SubmitError> {
        let drops_only = ops
            .iter()
            .all(|op| op.action == refd_core::model::Action::DropRef);
        // The request number first, before any space is reserved: a copy
        // of a request applied before (a retry whose reply was lost) is
        // answered with its reply, which needs no room, also when the
        // node region is full (`NoSpace` would say it was not applied).
        // The number is claimed from its check to its reply being kept: a
        // copy of it on another connection (a retry) waits, then finds it
        // kept. Other requests go on meanwhile: the ops are added to the
        // engine outside the service lock.
        let mut service = lock(&self.service);
        loop {
            match service.admit(session, request)? {
                Admission::Duplicate(reply) => {
                    return Ok(Submitted::Duplicate {
                        lsn: Lsn(reply.lsn),
                        ops: reply.ops,
                    })
                }
                Admission::New if service.claim(session, request) => break,
                Admission::New => {
                    service = self
                        .service_cv
                        .wait(service)
                        .unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        drop(service);
        let claim = Claim {
            engine: self,
            session,
            request,
        };
        // One unit per op, with the bytes its action can add, and one for
        // the record (its session reply).
        let charge = crate::space::Charge::submit(ops);
        let admitted = self
            .admit_reserved(charge, drops_only)
            .map_err(|r| match r {
                super::ingest::Refusal::Failed(f) => SubmitError::Failed(f),
                super::ingest::Refusal::NoSpace(n) => SubmitError::NoSpace(n),
            })?;
        let reserved = super::ingest::Reserved::new(&self.space, charge);
        // Stamped ops are logged in the order they are stamped (recovery
        // stamps in log order): held to the append.
        let stamp_order = self.stamp_order(ops);
        // The engine first: it may refuse an op, and nothing may be logged
        // that the engine does not hold. (A handle is always available:
        // admission bounds the appends in flight below the shards.)
        let added = self
            .engine
            .handle()
            .map_err(|source| SubmitError::Refused { index: 0, source })
            .and_then(|mut h| {
                h.add_batch(ops)
                    .map_err(|(index, source)| SubmitError::Refused { index, source })
            });
        let mut service = lock(&self.service);
        claim.end(&mut service);
        added?;
        // Appended under the service lock: the log's order of SUBMIT
        // records is the order their replies are kept in (replay repeats
        // it exactly).
        let ticket = self
            .append(record, || {
                format!("log append of request {request} of session {session}")
            })
            .map_err(SubmitError::Failed)?;
        drop(stamp_order);
        let n = ops.len() as u64;
        service.record_submit(
            session,
            SessionReply {
                request,
                lsn: ticket.lsn().get(),
                ops: n as u32,
            },
        );
        let before = self.pending_ops.fetch_add(n, Ordering::Relaxed);
        reserved.keep();
        drop(service);
        drop(admitted);
        self.after_add(before, before + n)
            .map_err(SubmitError::Failed)?;
        Ok(Submitted::Queued {
            ticket,
            ops: n as u32,
        })
    }

    /// What request `request` of `session` is now (a duplicate's stored
    /// reply, a new request, or a session error). [`DurableEngine::submit`]
    /// checks again under the same lock it logs under.
    pub fn admit(
        &self,
        session: u64,
        request: u64,
    ) -> Result<Admission, crate::service::SessionError> {
        lock(&self.service).admit(session, request)
    }

    /// Whether `session` is registered and kept (barriers of an evicted
    /// session are released).
    pub fn check_session(&self, session: u64) -> Result<(), crate::service::SessionError> {
        lock(&self.service).check(session)
    }

    /// Returns once the log is durable up to `lsn` (a duplicate SUBMIT's
    /// reply waits for its original batch).
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), Failure> {
        self.log.wait_for(lsn).map_err(|e| {
            let failure = Failure::of_log(
                self.device_name(),
                format!("wait for LSN {}", lsn.get()),
                &e,
            );
            self.latch(failure)
        })
    }

    /// Logs one service record (admitted, with the service lock held by
    /// the caller through `f`, which changes the state and returns the
    /// record).
    fn log_service<T>(
        &self,
        f: impl FnOnce(&mut Service) -> Result<(T, Option<Record>), ServiceError>,
    ) -> Result<(T, Option<Ticket<S>>), ServiceError> {
        self.check_failed().map_err(ServiceError::Failed)?;
        let admitted = self.admit_append().map_err(ServiceError::Failed)?;
        let mut service = lock(&self.service);
        let (value, record) = f(&mut service)?;
        if record.is_some() {
            // Tiny and bounded by the service state: reserved, not refused.
            self.space.force(crate::space::Charge::units(
                crate::space::SERVICE_RECORD_UNITS,
            ));
        }
        let ticket = match record {
            Some(record) => {
                let mut buf = Vec::with_capacity(32);
                encode_record(&record, &mut buf);
                let what = || format!("log append of {record:?}");
                Some(self.append(&buf, what).map_err(ServiceError::Failed)?)
            }
            None => None,
        };
        drop(service);
        drop(admitted);
        Ok((value, ticket))
    }

    /// Registers a new session (evicting the least recently used one at
    /// the bound). The session exists once the ticket is durable.
    pub fn register_session(&self) -> Result<(u64, Ticket<S>), ServiceError> {
        let (session, ticket) = self.log_service(|service| {
            let session = service.register();
            Ok((session, Some(Record::Register { session })))
        })?;
        Ok((session, ticket.expect("a registration is logged")))
    }

    /// Subscribes a freed-list consumer by name (or finds it): its id and
    /// last acknowledged generation; durable once the ticket (if any) is.
    pub fn subscribe_freed(
        &self,
        name: &str,
    ) -> Result<(Consumer, Option<Ticket<S>>), ServiceError> {
        if name.is_empty() || name.len() > CONSUMER_NAME_BYTES_MAX {
            return Err(ServiceError::BadName { len: name.len() });
        }
        self.log_service(|service| {
            if let Some(c) = service.consumer_by_name(name) {
                return Ok((c.clone(), None));
            }
            let consumer = service
                .next_consumer()
                .ok_or(ServiceError::ConsumersFull { max: CONSUMERS_MAX })?;
            // Acknowledged up to the newest dropped list: it starts with
            // what is kept, never behind it.
            let acked = service.freed_dropped_upto();
            service.subscribe(consumer, name, acked);
            let c = service.consumer(consumer).expect("just subscribed").clone();
            let record = Record::Subscribe {
                consumer,
                name: name.to_string(),
                acked,
            };
            Ok((c, Some(record)))
        })
    }

    /// Acknowledges every freed list up to `generation` (the last committed
    /// one at most) for `consumer`: lists every consumer acknowledged are
    /// dropped by the next commits. Returns the acknowledged generation;
    /// durable once the ticket (if any) is.
    pub fn ack_freed(
        &self,
        consumer: u64,
        generation: u64,
    ) -> Result<(u64, Option<Ticket<S>>), ServiceError> {
        self.log_service(|service| {
            let committed = service.committed();
            let Some(c) = service.consumer(consumer) else {
                return Err(ServiceError::ConsumerUnknown { consumer });
            };
            if generation > committed {
                return Err(ServiceError::AckBeyondCommitted {
                    generation,
                    committed,
                });
            }
            if generation <= c.acked {
                return Ok((c.acked, None));
            }
            service.ack(consumer, generation);
            Ok((
                generation,
                Some(Record::FreedAck {
                    consumer,
                    generation,
                }),
            ))
        })
    }

    /// Removes freed-list consumer `consumer`: its acknowledgement no
    /// longer holds lists back (the next commit drops every list the
    /// remaining consumers acknowledged, as an ACK would), its slot no
    /// longer counts against [`CONSUMERS_MAX`], and its name may subscribe
    /// again as a new consumer (a new id). Removed once the ticket is
    /// durable; returns the consumer as it was. An id not subscribed
    /// (never, or removed already) is [`ServiceError::ConsumerUnknown`].
    pub fn unsubscribe_freed(&self, consumer: u64) -> Result<(Consumer, Ticket<S>), ServiceError> {
        let (removed, ticket) = self.log_service(|service| {
            let Some(c) = service.consumer(consumer).cloned() else {
                return Err(ServiceError::ConsumerUnknown { consumer });
            };
            service.unsubscribe(consumer);
            Ok((c, Some(Record::Unsubscribe { consumer })))
        })?;
        Ok((removed, ticket.expect("an unsubscription is logged")))
    }

    /// Up to `max` freed extents from cursor `(generation, index)`: the
    /// extents freed by commit `generation` from its `index`-th on, then by
    /// later commits, in commit order.
    pub fn read_freed(
        &self,
        generation: u64,
        index: u32,
        max: usize,
    ) -> Result<FreedPage, ServiceError> {
        let (lists, dropped_upto, oldest, committed) = {
            let service = lock(&self.service);
            let lists: Vec<(u64, FreedList)> = service
                .freed()
                .range(generation..)
                .map(|(g, l)| (*g, *l))
                .collect();
            let committed = service.committed();
            (
                lists,
                service.freed_dropped_upto(),
                service.freed_oldest(),
                committed,
            )
        };
        let expired = || ServiceError::FreedExpired {
            dropped_upto,
            oldest,
        };
        // `dropped_upto` 0 means no list was dropped: then no cursor, not
        // even generation 0, is behind a dropped list.
        if dropped_upto > 0 && generation <= dropped_upto {
            return Err(expired());
        }
        let device = self.device_name();
        let mut page = FreedPage {
            extents: Vec::new(),
            next: (generation, index),
            more: false,
            oldest_kept: oldest.unwrap_or(0),
        };
        for (g, list) in lists {
            if page.extents.len() >= max {
                page.more = true;
                break;
            }
            let skip = if g == generation { index as u64 } else { 0 };
            if skip >= list.extents {
                page.next = (g + 1, 0);
                continue;
            }
            let entries = read_freed_list(&self.tree, device, g)?;
            if entries.len() as u64 != list.extents {
                // Dropped by a commit since the index was read.
                return Err(expired());
            }
            let take = (max - page.extents.len()).min(entries.len() - skip as usize);
            page.extents.extend(
                entries[skip as usize..skip as usize + take]
                    .iter()
                    .map(|e| (g, *e)),
            );
            let end = skip as usize + take;
            page.next = if end == entries.len() {
                (g + 1, 0)
            } else {
                page.more = true;
                (g, end as u32)
            };
            if page.more {
                break;
            }
        }
        // Everything up to the last committed generation was read: the
        // cursor moves past it (a consumer may acknowledge it), even when
        // its last commits freed nothing.
        if !page.more && page.next.0 <= committed {
            page.next = (committed + 1, 0);
        }
        Ok(page)
    }

    /// What the service keeps.
    pub fn service_stats(&self) -> ServiceStats {
        let service = lock(&self.service);
        ServiceStats {
            sessions: service.sessions(),
            sessions_registered: service.next_session() - 1,
            sessions_max: service.options().sessions_max,
            consumers: service.consumers(),
            freed_lists: service.freed().len(),
            freed_extents: service.freed_extents(),
            freed_kept_max: service.options().freed_kept_max,
            freed_oldest: service.freed_oldest(),
        }
    }

    /// The service's changes at a commit's cut (under the cut's write
    /// lock).
    pub(super) fn service_snapshot(&self) -> Snapshot {
        lock(&self.service).snapshot()
    }

    /// The B+tree changes of the service state for commit `generation`:
    /// the snapshot's sessions, consumers and counters, this commit's freed
    /// list, and the freed lists it drops (returned too), in key order.
    pub(super) fn service_changes(
        &self,
        snap: &Snapshot,
        generation: u64,
        freed: &[FreedExtent],
    ) -> (Vec<(Key, Change)>, Vec<u64>, Option<FreedList>) {
        let service = lock(&self.service);
        let dropped = service.freed_to_drop(freed.len() as u64, &snap.acked);
        let mut changes: Vec<(Key, Change)> = Vec::new();
        for (id, s) in &snap.sessions {
            let change = match s {
                Some(s) => Change::Put(items::encode_session(s)),
                None => Change::Delete,
            };
            changes.push((items::session_key(*id), change));
        }
        for g in &dropped {
            let list = service.freed()[g];
            for chunk in 0..list.chunks {
                changes.push((items::freed_key(*g, chunk), Change::Delete));
            }
        }
        drop(service);
        let added = (!freed.is_empty()).then(|| {
            let entries: Vec<FreedEntry> = freed
                .iter()
                .map(|f| FreedEntry {
                    bytenr: f.bytenr,
                    num_bytes: f.num_bytes,
                    kind: f.kind,
                })
                .collect();
            let chunks = items::encode_freed_chunks(&entries);
            let list = FreedList {
                extents: entries.len() as u64,
                chunks: chunks.len() as u64,
            };
            for (i, value) in chunks.into_iter().enumerate() {
                changes.push((items::freed_key(generation, i as u64), Change::Put(value)));
            }
            list
        });
        for (id, c) in &snap.consumers {
            let change = match c {
                Some(c) => Change::Put(items::encode_consumer(c)),
                None => Change::Delete,
            };
            changes.push((items::consumer_key(*id), change));
        }
        let mut meta = snap.meta;
        if let Some(&newest) = dropped.last() {
            let mut m = meta.unwrap_or(snap.meta_at_cut);
            m.freed_dropped_upto = m.freed_dropped_upto.max(newest);
            meta = Some(m);
        }
        if let Some(m) = meta {
            changes.push((items::meta_key(), Change::Put(items::encode_meta(&m))));
        }
        debug_assert!(
            changes.windows(2).all(|w| w[0].0 < w[1].0),
            "service changes in key order"
        );
        (changes, dropped, added)
    }

    /// After commit `generation` is durable: its freed list is kept, the
    /// dropped ones are gone.
    pub(super) fn service_committed(
        &self,
        generation: u64,
        added: Option<FreedList>,
        dropped: &[u64],
    ) {
        lock(&self.service).freed_committed(generation, added, dropped);
    }
}

/// The freed list of commit `generation`, read from the B+tree.
fn read_freed_list<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    generation: u64,
) -> Result<Vec<FreedEntry>, ReadError> {
    let range = items::freed_key(generation, 0)
        ..=Key::new(
            SERVICE_OBJECTID,
            FREED_KEY,
            generation << items::FREED_CHUNK_BITS | ((1 << items::FREED_CHUNK_BITS) - 1),
        );
    let mut out = Vec::new();
    for item in tree.range(range) {
        let (key, value) = item.map_err(|source| ReadError::Tree {
            device: device.to_string(),
            what: "freed lists",
            source: Box::new(source),
        })?;
        out.extend(
            items::decode_freed_chunk(&value).map_err(|source| ReadError::Items {
                device: device.to_string(),
                key: Some(key),
                source,
            })?,
        );
    }
    Ok(out)
}

/// What a committed B+tree holds of the service state (for fsck): every
/// item decoded and checked.
pub fn read_service<S: Storage>(tree: &BTree<S>, device: &str) -> Result<ServiceStats, ReadError> {
    let mut service = Service::new(crate::service::ServiceOptions {
        sessions_max: usize::MAX,
        ..Default::default()
    });
    load_service(tree, device, &mut service)?;
    Ok(ServiceStats {
        sessions: service.sessions(),
        sessions_registered: service.next_session() - 1,
        sessions_max: 0,
        consumers: service.consumers(),
        freed_lists: service.freed().len(),
        freed_extents: service.freed_extents(),
        freed_kept_max: 0,
        freed_oldest: service.freed_oldest(),
    })
}

/// The service state a committed B+tree holds (sessions, consumers,
/// counters, the index of the freed lists), read at open.
pub(super) fn load_service<S: Storage>(
    tree: &BTree<S>,
    device: &str,
    service: &mut Service,
) -> Result<(), ReadError> {
    let tree_err = |source| ReadError::Tree {
        device: device.to_string(),
        what: "service items",
        source: Box::new(source),
    };
    let items_err = |key: Key| {
        move |source| ReadError::Items {
            device: device.to_string(),
            key: Some(key),
            source,
        }
    };
    let mut sessions: Vec<(u64, SessionItem)> = Vec::new();
    let mut consumers: Vec<(u64, ConsumerItem)> = Vec::new();
    let mut freed: BTreeMap<u64, FreedList> = BTreeMap::new();
    let mut meta: Option<MetaItem> = None;
    let range = Key::new(SERVICE_OBJECTID, SESSION_KEY, 0)..=Key::MAX;
    for item in tree.range(range) {
        let (key, value) = item.map_err(tree_err)?;
        match key.item_type {
            SESSION_KEY => sessions.push((
                key.offset,
                items::decode_session(&value).map_err(items_err(key))?,
            )),
            FREED_KEY => {
                let (g, chunk) = items::freed_key_parts(key.offset);
                let n = items::decode_freed_chunk(&value)
                    .map_err(items_err(key))?
                    .len() as u64;
                let list = freed.entry(g).or_insert(FreedList {
                    extents: 0,
                    chunks: 0,
                });
                if chunk != list.chunks {
                    return Err(items_err(key)(crate::codec::CodecError::Invalid {
                        field: "freed chunk number",
                        value: chunk,
                    }));
                }
                list.extents += n;
                list.chunks += 1;
            }
            CONSUMER_KEY => consumers.push((
                key.offset,
                items::decode_consumer(&value).map_err(items_err(key))?,
            )),
            items::META_KEY if key.offset == 0 => {
                meta = Some(items::decode_meta(&value).map_err(items_err(key))?)
            }
            // Not service state: read by open (`read_extent_count`), only
            // checked here.
            items::EXTENTS_KEY if key.offset == 0 => {
                items::decode_extent_count(&value).map_err(items_err(key))?;
            }
            other => {
                return Err(items_err(key)(crate::codec::CodecError::Invalid {
                    field: "service item type",
                    value: u64::from(other),
                }))
            }
        }
    }
    service.load(meta, sessions, consumers, freed);
    Ok(())
}
