//! Coalescing: [`Client::add`] called from many threads at once, each
//! blocking until its op is durable, while the client sends the ops of
//! concurrent callers together as one SUBMIT (as TigerBeetle's client
//! batches concurrent requests).
//!
//! How: an op joins a bounded queue (`add_queue_ops_max`; `add` blocks
//! while it is full). While fewer than `batches_in_flight_max` coalesced
//! SUBMITs are in flight, a waiting caller becomes the *leader* of the
//! next batch: it takes up to `submit_ops_max` ops from the front of the
//! queue, submits them (exactly once, with resends, as
//! [`Client::submit`]) and hands every op's caller the result; ops that
//! arrive meanwhile wait and form the next batch. So under load a batch
//! holds whatever accumulated during one round trip, and 64 threads
//! adding one op at a time get batch throughput. No background thread:
//! the callers' threads do the work.
//!
//! Wake-ups are targeted and never touch the shared lock, since a client
//! may have hundreds of callers blocked and every wake-up costs a
//! context switch: each caller parks its own thread and watches its own
//! op's [`OpSlot`] (an atomic state and the result). A leader hands out
//! its batch's results after it has released the batcher's lock (store
//! the result, mark it done, unpark the thread), so a woken caller reads
//! its result and returns without taking any lock another caller holds.
//! The caller at the front of the queue is unparked with its `lead` flag
//! set when a batch may start (it then leads); only callers waiting for
//! room in a full queue share a condition variable. (Waking every caller
//! on every answer cost more than the round trip with 64 callers on 2
//! cores; waking them one by one while holding the batcher's lock, on a
//! condition variable of that lock, made the woken callers queue again
//! on the lock: twice the wake-ups.)
//!
//! A batch is atomic on the server, so one invalid op refuses it all:
//! for `INVALID_OP` and `REFUSED` (which name the op by index) the
//! leader gives that error to the op's own caller (with `index` 0: its
//! op alone) and resubmits the other ops, without it, under a new request
//! number; each round removes one op, so a batch of `n` ops takes at
//! most `n` rounds. Any other error goes to every caller of the batch.
//!
//! A caller whose deadline passes while its op is still queued takes it
//! out of the queue (never sent: `NotApplied`); once its op is in a
//! batch, it returns `Unknown` and the batch goes on (its result is
//! dropped).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::Instant;

use refd_proto::{SubmitReply, WireOp};

use crate::client::Client;
use crate::conn::{lock, wait_until};
use crate::error::{Error, Outcome};

/// [`OpSlot::state`]: in the queue.
const QUEUED: u8 = 0;
/// [`OpSlot::state`]: in a batch being submitted.
const SENT: u8 = 1;
/// [`OpSlot::state`]: answered; [`OpSlot::result`] holds the result
/// until its caller takes it.
const DONE: u8 = 2;

/// One caller's op: where its leader leaves the result and how it wakes
/// the caller.
#[derive(Debug)]
struct OpSlot {
    /// [`QUEUED`] → [`SENT`] (under the batcher's lock) → [`DONE`]
    /// (after `result` is set; `Release`, read with `Acquire`).
    state: AtomicU8,
    /// Set (then the thread unparked) when this caller is at the front
    /// of the queue and a batch may start.
    lead: AtomicBool,
    result: Mutex<Option<Result<SubmitReply, Error>>>,
    /// The caller's thread.
    thread: Thread,
}

impl OpSlot {
    fn new() -> OpSlot {
        OpSlot {
            state: AtomicU8::new(QUEUED),
            lead: AtomicBool::new(false),
            result: Mutex::new(None),
            thread: std::thread::current(),
        }
    }

    /// Hands the caller its result and wakes it if `unpark` (a caller
    /// that already gave up is not waiting: its thread only sees a
    /// spurious unpark). The first result wins.
    fn finish(&self, result: Result<SubmitReply, Error>, unpark: bool) {
        let mut slot = lock(&self.result);
        if self.state.load(Ordering::Relaxed) == DONE {
            return;
        }
        *slot = Some(result);
        self.state.store(DONE, Ordering::Release);
        drop(slot);
        if unpark {
            self.thread.unpark();
        }
    }

    fn take_done(&self) -> Option<Result<SubmitReply, Error>> {
        if self.state.load(Ordering::Acquire) != DONE {
            return None;
        }
        lock(&self.result).take()
    }

    /// Asks the caller to lead the next batch.
    fn kick(&self) {
        self.lead.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

#[derive(Debug)]
struct Queued {
    op: WireOp,
    slot: Arc<OpSlot>,
    deadline: Instant,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Queued>,
    batches_in_flight: usize,
    /// Callers waiting on [`Batcher::room`].
    room_waiters: usize,
}

impl State {
    /// Whether a caller may lead a batch now.
    fn may_start(&self, batches_in_flight_max: usize) -> bool {
        self.batches_in_flight < batches_in_flight_max && !self.queue.is_empty()
    }

    /// The caller to ask to lead, if a batch may start (kicked once the
    /// lock is released).
    fn next_leader(&self, batches_in_flight_max: usize) -> Option<Arc<OpSlot>> {
        if !self.may_start(batches_in_flight_max) {
            return None;
        }
        self.queue.front().map(|front| Arc::clone(&front.slot))
    }
}

/// The queue of ops waiting to be coalesced; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    state: Mutex<State>,
    /// Callers waiting for room in a full queue.
    room: Condvar,
}

impl Batcher {
    /// Wakes the callers waiting for room in the queue, if any.
    fn room_freed(&self, st: &State) {
        if st.room_waiters > 0 {
            self.room.notify_all();
        }
    }
}

/// One op's result, handed to its caller.
type Outcomes = Vec<(Arc<OpSlot>, Result<SubmitReply, Error>)>;

impl Client {
    /// Submits one op, coalesced with the ops other threads add at the
    /// same time, and blocks until it is durable (or the request timeout
    /// passes). Returns the reply of the SUBMIT that carried it (its LSN,
    /// request number and op count). Exactly once, as
    /// [`submit`](Self::submit); an `INVALID_OP` or `REFUSED` names this
    /// op alone (`index` 0) and does not affect the others.
    ///
    /// The calling thread parks while it waits (a spurious unpark of it
    /// by the client may remain once this returns, as
    /// [`std::thread::park`] allows).
    pub fn add(&self, op: WireOp) -> Result<SubmitReply, Error> {
        let deadline = self.deadline();
        let slot = Arc::new(OpSlot::new());
        let mut st = self.room_in_queue(deadline)?;
        st.queue.push_back(Queued {
            op,
            slot: Arc::clone(&slot),
            deadline,
        });
        if st.may_start(self.in_flight_max()) {
            self.lead_batch(st);
        } else {
            drop(st);
        }
        loop {
            if let Some(result) = slot.take_done() {
                if slot.lead.load(Ordering::Acquire) {
                    // Asked to lead but answered first: pass it on.
                    self.kick_next();
                }
                return result;
            }
            if slot.lead.swap(false, Ordering::AcqRel) {
                let st = lock(&self.batcher.state);
                if st.may_start(self.in_flight_max()) {
                    self.lead_batch(st);
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return self.give_up(&slot);
            }
            std::thread::park_timeout(deadline - now);
        }
    }

    /// The same as [`add`](Self::add).
    pub fn submit_one(&self, op: WireOp) -> Result<SubmitReply, Error> {
        self.add(op)
    }

    fn in_flight_max(&self) -> usize {
        self.config.batches_in_flight_max.max(1)
    }

    /// The batcher's lock once the queue has room for one more op.
    fn room_in_queue(&self, deadline: Instant) -> Result<MutexGuard<'_, State>, Error> {
        let b = &self.batcher;
        let ops_max = self.config.add_queue_ops_max.max(1);
        let mut st = lock(&b.state);
        while st.queue.len() >= ops_max {
            st.room_waiters += 1;
            let (next, expired) = wait_until(&b.room, st, deadline);
            st = next;
            st.room_waiters -= 1;
            if expired && st.queue.len() >= ops_max {
                return Err(self.timeout("SUBMIT", Outcome::NotApplied));
            }
        }
        Ok(st)
    }

    /// Asks the caller at the front of the queue to lead, if a batch may
    /// start.
    fn kick_next(&self) {
        let next = lock(&self.batcher.state).next_leader(self.in_flight_max());
        if let Some(slot) = next {
            slot.kick();
        }
    }

    /// Takes the next batch from the queue, submits it (with the lock
    /// released) and hands out the results.
    fn lead_batch(&self, mut st: MutexGuard<'_, State>) {
        let ops_max = (self.hello().submit_ops_max as usize).max(1);
        let n = st.queue.len().min(ops_max);
        let batch: Vec<Queued> = st.queue.drain(..n).collect();
        for q in &batch {
            q.slot.state.store(SENT, Ordering::Relaxed);
        }
        st.batches_in_flight += 1;
        self.batcher.room_freed(&st);
        // Another batch may start while this one is out.
        let next = st.next_leader(self.in_flight_max());
        drop(st);
        if let Some(slot) = next {
            slot.kick();
        }
        let outcomes = self.run_batch(batch);
        let next = {
            let mut st = lock(&self.batcher.state);
            st.batches_in_flight -= 1;
            st.next_leader(self.in_flight_max())
        };
        if let Some(slot) = next {
            slot.kick();
        }
        let me = std::thread::current().id();
        for (slot, result) in outcomes {
            // The leader's own op: no unpark (it would only leave a
            // token that makes this thread's next park return at once).
            slot.finish(result, slot.thread.id() != me);
        }
    }

    /// Submits `batch`, splitting off each op the server names as invalid.
    fn run_batch(&self, mut batch: Vec<Queued>) -> Outcomes {
        let mut outcomes = Vec::with_capacity(batch.len());
        let deadline = batch.iter().map(|q| q.deadline).max();
        let Some(deadline) = deadline else {
            return outcomes;
        };
        // Each round answers at least one op, so this ends.
        while !batch.is_empty() {
            let ops: Vec<WireOp> = batch.iter().map(|q| q.op).collect();
            match self.submit_inner(&ops, 0, deadline, &mut |_| Ok(())) {
                Ok(reply) => outcomes.extend(batch.drain(..).map(|q| (q.slot, Ok(reply)))),
                Err(e) => match e.op_index().filter(|&i| i < batch.len()) {
                    Some(i) => {
                        let q = batch.remove(i);
                        outcomes.push((q.slot, Err(for_single_op(e))));
                    }
                    None => outcomes.extend(batch.drain(..).map(|q| (q.slot, Err(e.clone())))),
                },
            }
        }
        outcomes
    }

    /// A caller whose deadline passed: a queued op leaves the queue (it
    /// was never sent); a sent one's outcome is unknown (its batch goes
    /// on; the result is dropped). A caller asked to lead passes that on.
    fn give_up(&self, slot: &Arc<OpSlot>) -> Result<SubmitReply, Error> {
        let mut st = lock(&self.batcher.state);
        // Under the lock: a queued op is not taken into a batch meanwhile.
        let result = if let Some(result) = slot.take_done() {
            result
        } else if slot.state.load(Ordering::Relaxed) == QUEUED {
            st.queue.retain(|q| !Arc::ptr_eq(&q.slot, slot));
            self.batcher.room_freed(&st);
            Err(self.timeout("SUBMIT", Outcome::NotApplied))
        } else {
            Err(self.timeout("SUBMIT", Outcome::Unknown))
        };
        let next = st.next_leader(self.in_flight_max());
        drop(st);
        if let Some(next) = next {
            next.kick();
        }
        result
    }
}

/// The batch's error about one op, as its caller sees it: its op alone.
fn for_single_op(e: Error) -> Error {
    match e {
        Error::Server {
            request,
            mut error,
            outcome,
        } => {
            error.index = 0;
            Error::Server {
                request,
                error,
                outcome,
            }
        }
        other => other,
    }
}
