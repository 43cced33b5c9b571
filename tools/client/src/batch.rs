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
//! Wake-ups are targeted, since a client may have hundreds of callers
//! blocked: each caller sleeps on its own op's condition variable and is
//! woken when its op is answered, or when it is at the front of the
//! queue and a batch may start (it then leads); only callers waiting for
//! room in a full queue share one. (Waking every caller on every answer
//! cost more than the round trip with 64 callers on 2 cores.)
//!
//! A batch is atomic on the server, so one invalid op refuses it all:
//! for `INVALID_OP` and `REFUSED` (which name the op by index) the
//! leader gives that error to the op's own caller (with `index` 0: its
//! op alone) and resubmits the other ops, without it, under a new request
//! number; each round removes one op, so a batch of `n` ops takes at
//! most `n` rounds. Any other error goes to every caller of the batch.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use refd_proto::{SubmitReply, WireOp};

use crate::client::Client;
use crate::conn::{lock, wait_until};
use crate::error::{Error, Outcome};

#[derive(Debug, Default)]
enum OpState {
    /// In the queue.
    #[default]
    Queued,
    /// In a batch being submitted.
    Sent,
    /// Answered.
    Done(Result<SubmitReply, Error>),
}

/// One caller's op.
#[derive(Debug, Default)]
struct OpSlot {
    state: Mutex<OpState>,
    /// Its caller sleeps here, with the batcher's lock
    /// ([`Batcher::state`]); see [`Batcher::wake`].
    wake: Condvar,
}

impl OpSlot {
    fn set(&self, state: OpState) {
        *lock(&self.state) = state;
    }

    fn take_done(&self) -> Option<Result<SubmitReply, Error>> {
        let mut st = lock(&self.state);
        match std::mem::take(&mut *st) {
            OpState::Done(result) => Some(result),
            other => {
                *st = other;
                None
            }
        }
    }

    fn is_queued(&self) -> bool {
        matches!(*lock(&self.state), OpState::Queued)
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

/// The queue of ops waiting to be coalesced; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct Batcher {
    state: Mutex<State>,
    /// Callers waiting for room in a full queue.
    room: Condvar,
}

impl Batcher {
    /// Wakes the caller at the front of the queue if a batch may start
    /// (it leads it).
    fn kick(&self, st: &State, batches_in_flight_max: usize) {
        if st.batches_in_flight < batches_in_flight_max {
            if let Some(front) = st.queue.front() {
                front.slot.wake.notify_one();
            }
        }
    }

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
    pub fn add(&self, op: WireOp) -> Result<SubmitReply, Error> {
        let deadline = self.deadline();
        let slot = Arc::new(OpSlot::default());
        let b = &self.batcher;
        let in_flight_max = self.config.batches_in_flight_max.max(1);
        let mut st = lock(&b.state);
        while st.queue.len() >= self.config.add_queue_ops_max.max(1) {
            st.room_waiters += 1;
            let (next, expired) = wait_until(&b.room, st, deadline);
            st = next;
            st.room_waiters -= 1;
            if expired && st.queue.len() >= self.config.add_queue_ops_max.max(1) {
                return Err(self.timeout("SUBMIT", Outcome::NotApplied));
            }
        }
        st.queue.push_back(Queued {
            op,
            slot: Arc::clone(&slot),
            deadline,
        });
        loop {
            if let Some(result) = slot.take_done() {
                return result;
            }
            if st.batches_in_flight < in_flight_max && !st.queue.is_empty() {
                st = self.lead_batch(st);
                continue;
            }
            let (next, expired) = wait_until(&slot.wake, st, deadline);
            st = next;
            if expired {
                let result = slot
                    .take_done()
                    .unwrap_or_else(|| Err(self.give_up(&mut st, &slot)));
                // This caller may have been woken to lead: pass it on.
                b.kick(&st, in_flight_max);
                return result;
            }
        }
    }

    /// The same as [`add`](Self::add).
    pub fn submit_one(&self, op: WireOp) -> Result<SubmitReply, Error> {
        self.add(op)
    }

    /// Takes the next batch from the queue, submits it (the lock is free
    /// meanwhile) and hands out the results.
    fn lead_batch<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let ops_max = (self.hello().submit_ops_max as usize).max(1);
        let n = st.queue.len().min(ops_max);
        let batch: Vec<Queued> = st.queue.drain(..n).collect();
        for q in &batch {
            q.slot.set(OpState::Sent);
        }
        st.batches_in_flight += 1;
        self.batcher.room_freed(&st);
        // Another batch may start while this one is out.
        self.batcher
            .kick(&st, self.config.batches_in_flight_max.max(1));
        drop(st);
        let outcomes = self.run_batch(batch);
        let mut st = lock(&self.batcher.state);
        for (slot, result) in outcomes {
            slot.set(OpState::Done(result));
            slot.wake.notify_one();
        }
        st.batches_in_flight -= 1;
        self.batcher
            .kick(&st, self.config.batches_in_flight_max.max(1));
        st
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
    /// on; the result is dropped).
    fn give_up(&self, st: &mut MutexGuard<'_, State>, slot: &Arc<OpSlot>) -> Error {
        if slot.is_queued() {
            st.queue.retain(|q| !Arc::ptr_eq(&q.slot, slot));
            self.batcher.room_freed(st);
            return self.timeout("SUBMIT", Outcome::NotApplied);
        }
        self.timeout("SUBMIT", Outcome::Unknown)
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
