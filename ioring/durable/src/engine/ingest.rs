//! Ingest: an op is validated, queued in the core engine and appended to
//! the log under the read side of the cut lock, and acknowledged once its
//! log record is durable ([`Ticket`]). Admission bounds the appends in
//! flight by log space; the commit policy bounds the pending ops.

use std::sync::atomic::Ordering;
use std::sync::RwLockReadGuard;

use refd_core::delayed::DelayedRefStore;
use refd_core::model::Op;
use refd_ioring::log::Lsn;
use refd_ioring::Storage;

use super::{lock, DurableEngine, Ticket};
use crate::codec;
use crate::error::{AddError, Failure};
use crate::policy::CommitPolicy;
use crate::space::{Charge, NoSpace, Reserve};

/// Why [`DurableEngine::admit_reserved`] did not admit.
pub(super) enum Refusal {
    /// The engine failed.
    Failed(Failure),
    /// The node region cannot be sure to hold the commit.
    NoSpace(NoSpace),
}

impl From<Refusal> for AddError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Failed(f) => AddError::Failed(f),
            Refusal::NoSpace(n) => AddError::NoSpace(n),
        }
    }
}

thread_local! {
    /// Each thread's op record buffer for [`DurableEngine::add`] (the log
    /// copies the record into its batch; no allocation per op).
    static RECORD: std::cell::RefCell<Vec<u8>> =
        std::cell::RefCell::new(Vec::with_capacity(codec::OP_RECORD_BYTES_MAX));
}

impl<S: Storage + Clone, D: DelayedRefStore> DurableEngine<S, D> {
    pub(crate) fn check_failed(&self) -> Result<(), Failure> {
        match self.failure() {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Queues `op`: appends its record to the log and adds it to the core
    /// engine (visible to lookups at once). The op is acknowledged only
    /// when the returned ticket's [`Ticket::wait`] succeeds.
    ///
    /// Back-pressure: an append must never wait for log space while it
    /// holds the cut lock (the commit that would free the space needs the
    /// lock: deadlock). So an append proceeds only while the log has room
    /// for every append in flight (`2 × batch cap` each: a lap skip plus a
    /// batch), and at most [`DurableEngine::appenders_max`] run at once;
    /// otherwise the caller commits (or waits for the running commit) and
    /// retries. After the op is queued, the commit policy may make the
    /// caller wait for (or run) a commit (`crate::policy`); if that commit
    /// fails, the error is returned although the op was queued and logged:
    /// the engine is then latched, and the op is one more unacknowledged
    /// op (present after recovery at most once).
    pub fn add(&self, op: &Op) -> Result<Ticket<S>, AddError> {
        self.check_failed().map_err(AddError::Failed)?;
        op.check()?;
        RECORD.with_borrow_mut(|record| {
            record.clear();
            codec::encode_op(op, record);
            debug_assert_eq!(codec::decode_op(record).as_ref(), Ok(op));
            self.add_record(op, record)
        })
    }

    /// [`DurableEngine::add`] and wait: returns once the op is durable.
    pub fn add_durable(&self, op: &Op) -> Result<Lsn, AddError> {
        let ticket = self.add(op)?;
        ticket.wait().map_err(|f| AddError::Failed(self.latch(f)))
    }

    fn add_record(&self, op: &Op, record: &[u8]) -> Result<Ticket<S>, AddError> {
        let drop_only = op.action == refd_core::model::Action::DropRef;
        let charge = Charge::op(op);
        let admitted = self.admit_reserved(charge, drop_only)?;
        let reserved = Reserved::new(&self.space, charge);
        let stamp_order = self.stamp_order(std::slice::from_ref(op));
        // The engine first: it may refuse the op, and nothing may be logged
        // that the engine does not hold.
        self.engine.handle()?.add(op)?;
        let ticket = self
            .append(record, || format!("log append of {op}"))
            .map_err(AddError::Failed)?;
        drop(stamp_order);
        let pending = self.pending_ops.fetch_add(1, Ordering::Relaxed);
        reserved.keep();
        drop(admitted);
        self.after_add(pending, pending + 1)
            .map_err(AddError::Failed)?;
        Ok(ticket)
    }

    /// The stamp order lock if `ops` hold a stamped op (else `None`): held
    /// from the engine's add to the log append, so that stamped ops are
    /// logged in stamp order, which is the order recovery stamps them in.
    /// Plain references take no stamp and merge by sum, in any order, so
    /// they do not wait.
    pub(super) fn stamp_order(&self, ops: &[Op]) -> Option<std::sync::MutexGuard<'_, ()>> {
        ops.iter()
            .any(Op::is_stamped)
            .then(|| lock(&self.stamp_order))
    }

    /// Appends `record` to the log (admitted, under the cut lock): a
    /// failure latches, since the engine already holds what it records.
    pub(super) fn append(
        &self,
        record: &[u8],
        what: impl FnOnce() -> String,
    ) -> Result<Ticket<S>, Failure> {
        self.log.append(record).map(Ticket).map_err(|e| {
            let failure = Failure::of_log(self.device_name(), what(), &e);
            self.latch(failure)
        })
    }

    /// Admission of one append: waits (committing if need be) until the
    /// log has room for every append in flight plus this one, and returns
    /// with the cut lock's read side held (see [`DurableEngine::add`]).
    pub(super) fn admit_append(&self) -> Result<Admitted<'_, S, D>, Failure> {
        let per_append = 2 * self.log.batch_bytes_cap() as u64;
        loop {
            let cut = self.cut.read().unwrap_or_else(|e| e.into_inner());
            let k = self.appenders.fetch_add(1, Ordering::SeqCst) + 1;
            let admitted = Admitted {
                engine: self,
                _cut: cut,
            };
            let need = per_append * k as u64;
            if k <= self.appenders_max && self.log.free_bytes() >= need {
                return Ok(admitted);
            }
            drop(admitted);
            if k > self.appenders_max {
                std::thread::yield_now();
            } else {
                self.make_room(need)?;
            }
        }
    }

    /// [`DurableEngine::admit_append`] that also reserves `charge` of node
    /// space (`crate::space`) for a request of only drops or not. When
    /// they do not fit, it waits for the running commit, or commits what
    /// is pending (a commit frees the old copies of the nodes it
    /// rewrites), and tries again; it refuses only when they still do not
    /// fit after that: the tree itself fills the region.
    pub(super) fn admit_reserved(
        &self,
        charge: Charge,
        drops_only: bool,
    ) -> Result<Admitted<'_, S, D>, Refusal> {
        const ATTEMPTS: usize = 4;
        for attempt in 1..=ATTEMPTS {
            let admitted = self.admit_append().map_err(Refusal::Failed)?;
            match self.space.reserve(charge, drops_only, || self.tree.space()) {
                Reserve::Fits => return Ok(admitted),
                Reserve::Full(no_space) => {
                    drop(admitted);
                    if attempt == ATTEMPTS {
                        self.space.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Refusal::NoSpace(no_space));
                    }
                    let running = self.commit.try_lock().is_err();
                    if attempt == 1 && running {
                        // The running commit's whole bound is charged
                        // until its apply is done; then only its bitmap
                        // run is, and the nodes it replaced count as free
                        // for the next commit: usually enough.
                        self.space.wait_changed(SPACE_WAIT_MAX);
                    } else {
                        self.make_node_room().map_err(Refusal::Failed)?;
                    }
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Waits for the running commit if one runs; else commits what is
    /// pending (if anything is).
    fn make_node_room(&self) -> Result<(), Failure> {
        self.check_failed()?;
        let running = self.commit.try_lock().is_err();
        let mut st = lock(&self.commit);
        if running {
            return Ok(());
        }
        if self.space.live().units > 0 || self.pending_ops() > 0 {
            self.commit_locked(&mut st)
                .map_err(|e| e.failure().clone())?;
        }
        Ok(())
    }

    /// Commits unless another commit already left `need` bytes free.
    fn make_room(&self, need: u64) -> Result<(), Failure> {
        self.check_failed()?;
        let mut st = lock(&self.commit);
        if self.log.free_bytes() >= need {
            return Ok(());
        }
        self.commit_locked(&mut st)
            .map_err(|e| e.failure().clone())?;
        Ok(())
    }

    /// Called by an add that took the pending ops from `before` to
    /// `after`, outside the cut lock: wake the committer, or apply
    /// back-pressure.
    pub(super) fn after_add(&self, before: u64, after: u64) -> Result<(), Failure> {
        let trigger = self.commit_trigger_ops();
        if !CommitPolicy::check_now(before, after, trigger) {
            return Ok(());
        }
        if CommitPolicy::throttles(after, trigger) {
            return self.throttle(trigger);
        }
        let log_full = self
            .policy()
            .log_full(self.log.used_bytes(), self.log.log_bytes());
        if after >= trigger || log_full {
            self.kick_committer();
        }
        self.pace(before, after, trigger);
        Ok(())
    }

    /// Pacing ([`CommitPolicy::pace`]): while a commit runs and the next
    /// one is already past its trigger, sleep in proportion. With no
    /// commit running (the committer was just kicked, or none runs and
    /// the wall at twice the trigger will commit inline), a sleep would
    /// only delay the add.
    fn pace(&self, before: u64, after: u64, trigger: u64) {
        let sleep = CommitPolicy::pace(before, after, trigger, self.commit_cost_ps_per_op());
        if sleep.is_zero() || self.commit.try_lock().is_ok() {
            return;
        }
        std::thread::sleep(sleep);
        self.paced.fetch_add(1, Ordering::Relaxed);
        self.paced_ns
            .fetch_add(sleep.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Back-pressure: wait for the running commit; if the pending ops
    /// still throttle after it, commit here.
    fn throttle(&self, trigger: u64) -> Result<(), Failure> {
        let t = std::time::Instant::now();
        let _count = ThrottleTimer(self, t);
        let mut st = lock(&self.commit);
        if !CommitPolicy::throttles(self.pending_ops(), trigger) {
            return Ok(());
        }
        self.commit_locked(&mut st)
            .map_err(|e| e.failure().clone())?;
        Ok(())
    }
}

/// Counts one throttled add and the time it waited, when it ends.
struct ThrottleTimer<'a, S: Storage + Clone, D: DelayedRefStore>(
    &'a DurableEngine<S, D>,
    std::time::Instant,
);

impl<S: Storage + Clone, D: DelayedRefStore> Drop for ThrottleTimer<'_, S, D> {
    fn drop(&mut self) {
        self.0.throttled.fetch_add(1, Ordering::Relaxed);
        let ns = self.1.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.0.throttled_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// The longest an admission waits for the running commit's apply before
/// it waits for the whole commit.
const SPACE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The charge reserved by a request being admitted: given back on drop
/// unless the request was logged ([`Reserved::keep`]). Dropped before the
/// [`Admitted`] it was reserved under (declared after it).
pub(super) struct Reserved<'a> {
    gate: &'a crate::space::Gate,
    charge: Option<Charge>,
}

impl<'a> Reserved<'a> {
    pub(super) fn new(gate: &'a crate::space::Gate, charge: Charge) -> Self {
        Reserved {
            gate,
            charge: Some(charge),
        }
    }

    /// The request was logged: its charge stays until its commit.
    pub(super) fn keep(mut self) {
        self.charge = None;
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if let Some(charge) = self.charge.take() {
            self.gate.unreserve(charge);
        }
    }
}

/// An admitted append: the cut lock's read side and one appender slot,
/// given back on drop.
pub(super) struct Admitted<'a, S: Storage + Clone, D: DelayedRefStore> {
    engine: &'a DurableEngine<S, D>,
    _cut: RwLockReadGuard<'a, ()>,
}

impl<S: Storage + Clone, D: DelayedRefStore> Drop for Admitted<'_, S, D> {
    fn drop(&mut self) {
        // Before the cut lock's read side goes (the field drops after).
        self.engine.appenders.fetch_sub(1, Ordering::SeqCst);
    }
}
