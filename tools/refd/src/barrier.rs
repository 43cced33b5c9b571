//! Seq barriers held for clients, as leases: a barrier belongs to the
//! session that acquired it and is released when its lease runs out
//! without a renewal, when it is released, or when the daemon stops (seq
//! barriers live in memory, as btrfs's tree-mod-log seqs do). So a client
//! that dies cannot hold heads forever. A live client renewing forever
//! cannot hold unbounded memory either: when commits hold more heads than
//! `--held-heads-max`, the server revokes the barrier with the lowest seq
//! ([`Barriers::revoke_lowest`]), one per commit.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use refd_core::barrier::{SeqBarrier, SeqGuard};

/// Why a barrier request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// Expired, released or never acquired.
    #[error("barrier {0} is not held (expired, released or never acquired)")]
    Unknown(u64),
    /// The session holds its maximum.
    #[error("session {session} holds {max} barriers already")]
    Limit {
        /// Session.
        session: u64,
        /// The bound.
        max: usize,
    },
}

#[derive(Debug)]
struct Lease {
    session: u64,
    expires: Instant,
    // Released on drop.
    guard: SeqGuard,
}

/// The leases (see the module docs).
#[derive(Debug)]
pub struct Barriers {
    lease: Duration,
    per_session_max: usize,
    leases: Mutex<HashMap<u64, Lease>>,
    /// Barrier ids: a random start and a stride, never 0.
    next_id: Mutex<u64>,
}

impl Barriers {
    /// Leases of `lease`, at most `per_session_max` per session.
    pub fn new(lease: Duration, per_session_max: usize, seed: u64) -> Self {
        Barriers {
            lease,
            per_session_max,
            leases: Mutex::new(HashMap::new()),
            next_id: Mutex::new(seed | 1),
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Lease>> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acquires a barrier of `barrier` for `session`: its id and seq.
    pub fn acquire(
        &self,
        barrier: &SeqBarrier,
        session: u64,
        now: Instant,
    ) -> Result<(u64, u64), BarrierError> {
        let mut leases = self.leases();
        let held = leases.values().filter(|l| l.session == session).count();
        if held >= self.per_session_max {
            return Err(BarrierError::Limit {
                session,
                max: self.per_session_max,
            });
        }
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                // An odd stride walks every u64 before repeating.
                *next = next.wrapping_add(0x9E37_79B9_7F4A_7C15);
                if *next != 0 && !leases.contains_key(&*next) {
                    break *next;
                }
            }
        };
        let guard = barrier.acquire();
        let seq = guard.seq();
        leases.insert(
            id,
            Lease {
                session,
                expires: now + self.lease,
                guard,
            },
        );
        Ok((id, seq))
    }

    /// Extends a lease by the lease time from `now`.
    pub fn renew(&self, id: u64, now: Instant) -> Result<(), BarrierError> {
        match self.leases().get_mut(&id) {
            Some(l) if l.expires > now => {
                l.expires = now + self.lease;
                Ok(())
            }
            _ => Err(BarrierError::Unknown(id)),
        }
    }

    /// Revokes the barrier with the lowest seq (the one that holds the
    /// most heads: every head a later barrier holds, it holds too): its
    /// id, session and seq, or `None` if none is held.
    pub fn revoke_lowest(&self) -> Option<(u64, u64, u64)> {
        let mut leases = self.leases();
        let (&id, l) = leases.iter().min_by_key(|(&id, l)| (l.guard.seq(), id))?;
        let revoked = (id, l.session, l.guard.seq());
        leases.remove(&id);
        Some(revoked)
    }

    /// Releases a barrier.
    pub fn release(&self, id: u64) -> Result<(), BarrierError> {
        self.leases()
            .remove(&id)
            .map(drop)
            .ok_or(BarrierError::Unknown(id))
    }

    /// Releases every expired lease; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut leases = self.leases();
        let before = leases.len();
        leases.retain(|_, l| l.expires > now);
        before - leases.len()
    }

    /// Releases the barriers of sessions `keep` says are gone.
    pub fn retain_sessions(&self, keep: impl Fn(u64) -> bool) {
        let mut leases = self.leases();
        let sessions: std::collections::BTreeSet<u64> =
            leases.values().map(|l| l.session).collect();
        let gone: Vec<u64> = sessions.into_iter().filter(|s| !keep(*s)).collect();
        if !gone.is_empty() {
            leases.retain(|_, l| !gone.contains(&l.session));
            tracing::info!(sessions = ?gone, "barriers of evicted sessions released");
        }
    }

    /// Barriers held.
    pub fn held(&self) -> usize {
        self.leases().len()
    }

    /// The lease time.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Guards are released (so barriers end) when the table goes.
    pub fn release_all(&self) {
        self.leases().clear();
    }

    /// The seq of a held barrier (tests).
    pub fn seq(&self, id: u64) -> Option<u64> {
        self.leases().get(&id).map(|l| l.guard.seq())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_unless_renewed() {
        let seqs = SeqBarrier::new();
        let b = Barriers::new(Duration::from_secs(10), 2, 42);
        let t0 = Instant::now();
        let (a, sa) = b.acquire(&seqs, 1, t0).unwrap();
        let (c, _) = b.acquire(&seqs, 1, t0).unwrap();
        assert_ne!(a, c);
        assert_eq!(
            b.acquire(&seqs, 1, t0),
            Err(BarrierError::Limit { session: 1, max: 2 })
        );
        assert_eq!((seqs.active(), seqs.lowest()), (2, sa));
        b.renew(a, t0 + Duration::from_secs(9)).unwrap();
        assert_eq!(
            b.expire(t0 + Duration::from_secs(11)),
            1,
            "c expired, a renewed"
        );
        assert_eq!(b.renew(c, t0), Err(BarrierError::Unknown(c)));
        assert_eq!(seqs.active(), 1);
        b.release(a).unwrap();
        assert_eq!(b.release(a), Err(BarrierError::Unknown(a)));
        assert_eq!(seqs.active(), 0);
    }

    #[test]
    fn revoking_takes_the_lowest_seq_first() {
        let seqs = SeqBarrier::new();
        let b = Barriers::new(Duration::from_secs(10), 4, 7);
        let t0 = Instant::now();
        let (first, s1) = b.acquire(&seqs, 1, t0).unwrap();
        let (second, s2) = b.acquire(&seqs, 2, t0).unwrap();
        assert!(s2 > s1, "{s1} {s2}");
        assert_eq!(b.revoke_lowest(), Some((first, 1, s1)));
        assert_eq!((seqs.active(), seqs.lowest()), (1, s2));
        assert_eq!(b.renew(first, t0), Err(BarrierError::Unknown(first)));
        assert_eq!(b.revoke_lowest(), Some((second, 2, s2)));
        assert_eq!((b.revoke_lowest(), seqs.active()), (None, 0));
    }
}
