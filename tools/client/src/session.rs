//! The client's session: its id, the next request number, and the
//! numbers sent but not answered yet (the window).
//!
//! The window rule (`docs/protocol.md`, "Exactly once"): a new number
//! `r` is handed out only while every unanswered number of the session is
//! above `r - session_replies_kept`; otherwise the caller blocks until an
//! older SUBMIT is answered (or given up). Then the server can answer
//! every resend from its kept replies, never `REQUEST_TOO_OLD`.

use std::collections::BTreeSet;
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use crate::conn::{lock, wait_until};
use crate::error::SubmitTicket;

#[derive(Debug, Default)]
struct State {
    /// 0: none registered.
    session_id: u64,
    next_number: u64,
    unanswered: BTreeSet<u64>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub(crate) struct Session {
    state: Mutex<State>,
    changed: Condvar,
}

/// Why [`Session::allocate`] gave no number.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AllocateError {
    /// The window stayed full until the deadline.
    Timeout,
    /// The session is not (or no longer) `session_id`.
    Changed,
}

impl Session {
    /// The current session id, if one is registered.
    pub(crate) fn current(&self) -> Option<u64> {
        let id = lock(&self.state).session_id;
        (id != 0).then_some(id)
    }

    /// Uses `session_id` from now on, numbering from `next_number`. The
    /// old session's unanswered SUBMITs no longer count in the window.
    pub(crate) fn install(&self, session_id: u64, next_number: u64) {
        assert!(session_id != 0 && next_number != 0);
        let mut st = lock(&self.state);
        *st = State {
            session_id,
            next_number,
            unanswered: BTreeSet::new(),
        };
        self.changed.notify_all();
    }

    /// Forgets `session_id` if it is the current one (evicted): the next
    /// SUBMIT registers a new session.
    pub(crate) fn forget(&self, session_id: u64) {
        let mut st = lock(&self.state);
        if st.session_id == session_id {
            *st = State::default();
            self.changed.notify_all();
        }
    }

    /// The next request number of `session_id`, once the window allows it
    /// (`kept` = the server's `session_replies_kept`).
    pub(crate) fn allocate(
        &self,
        session_id: u64,
        kept: u32,
        deadline: Instant,
    ) -> Result<SubmitTicket, AllocateError> {
        let mut st = lock(&self.state);
        loop {
            if st.session_id != session_id {
                return Err(AllocateError::Changed);
            }
            let oldest = st.unanswered.first().copied();
            if oldest.is_none_or(|u| st.next_number - u < u64::from(kept)) {
                break;
            }
            let (next, expired) = wait_until(&self.changed, st, deadline);
            st = next;
            if expired {
                return Err(AllocateError::Timeout);
            }
        }
        let request_number = st.next_number;
        st.next_number += 1;
        st.unanswered.insert(request_number);
        Ok(SubmitTicket {
            session_id,
            request_number,
        })
    }

    /// The SUBMIT of `ticket` is answered or given up: it leaves the
    /// window.
    pub(crate) fn release(&self, ticket: SubmitTicket) {
        let mut st = lock(&self.state);
        if st.session_id == ticket.session_id && st.unanswered.remove(&ticket.request_number) {
            self.changed.notify_all();
        }
    }

    /// The next request number of the current session (0: none).
    pub(crate) fn next_number(&self) -> u64 {
        lock(&self.state).next_number
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn window_blocks_beyond_kept_numbers() {
        let s = Session::default();
        s.install(7, 1);
        let soon = || Instant::now() + Duration::from_millis(20);
        let t: Vec<_> = (0..3).map(|_| s.allocate(7, 3, soon()).unwrap()).collect();
        assert_eq!(t[2].request_number, 3);
        assert_eq!(s.allocate(7, 3, soon()), Err(AllocateError::Timeout));
        // Answering a newer one does not help: the oldest still holds it.
        s.release(t[1]);
        assert_eq!(s.allocate(7, 3, soon()), Err(AllocateError::Timeout));
        s.release(t[0]);
        assert_eq!(s.allocate(7, 3, soon()).unwrap().request_number, 4);
        assert_eq!(s.allocate(7, 3, soon()).unwrap().request_number, 5);
        assert_eq!(s.allocate(7, 3, soon()), Err(AllocateError::Timeout));
        assert_eq!(s.allocate(8, 3, soon()), Err(AllocateError::Changed));
        s.forget(7);
        assert_eq!(s.current(), None);
    }
}
