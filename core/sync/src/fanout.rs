//! Items dealt to worker threads in batches over bounded channels, with
//! the number of batches each worker was sent (a replay that must know
//! when a worker has taken everything sent before a point compares it
//! with the worker's own count of batches done).

use std::sync::mpsc::SyncSender;

/// One batch being filled per worker, sent when full or on request.
#[derive(Debug)]
pub struct Fanout<T> {
    senders: Vec<SyncSender<Vec<T>>>,
    batches: Vec<Vec<T>>,
    sent: Vec<u64>,
    batch: usize,
}

impl<T> Fanout<T> {
    /// Batches of at most `batch` items (at least 1) to each of `senders`.
    pub fn new(senders: Vec<SyncSender<Vec<T>>>, batch: usize) -> Fanout<T> {
        let batch = batch.max(1);
        Fanout {
            batches: senders.iter().map(|_| Vec::with_capacity(batch)).collect(),
            sent: vec![0; senders.len()],
            senders,
            batch,
        }
    }

    /// Adds `item` to worker `t`'s batch and sends the batch when it is
    /// full. False when the worker is gone (its receiver dropped).
    pub fn push(&mut self, t: usize, item: T) -> bool {
        self.batches[t].push(item);
        self.batches[t].len() < self.batch || self.flush(t)
    }

    /// Sends worker `t` its batch now (nothing when it is empty), counting
    /// it in [`Fanout::sent`]. False when the worker is gone.
    pub fn flush(&mut self, t: usize) -> bool {
        if self.batches[t].is_empty() {
            return true;
        }
        let full = std::mem::replace(&mut self.batches[t], Vec::with_capacity(self.batch));
        if self.senders[t].send(full).is_err() {
            return false;
        }
        self.sent[t] += 1;
        true
    }

    /// Batches sent to worker `t` so far.
    pub fn sent(&self, t: usize) -> u64 {
        self.sent[t]
    }

    /// Sends every worker what is left of its batch (to the workers still
    /// there) and closes the channels: each worker's receiver ends once it
    /// has taken what it was sent.
    pub fn finish(mut self) {
        for t in 0..self.senders.len() {
            self.flush(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Fanout;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn batches_are_sent_full_on_flush_and_at_finish() {
        let (tx0, rx0) = sync_channel(8);
        let (tx1, rx1) = sync_channel(8);
        let mut f = Fanout::new(vec![tx0, tx1], 2);
        assert!(f.push(0, 1) && f.push(1, 10) && f.push(0, 2));
        assert_eq!((f.sent(0), f.sent(1)), (1, 0), "worker 0's batch was full");
        assert!(f.flush(1) && f.flush(1), "an empty batch is not sent");
        assert_eq!(f.sent(1), 1);
        assert!(f.push(0, 3));
        drop(rx1);
        assert!(f.push(1, 11), "not full: kept");
        assert!(!f.flush(1), "worker 1 is gone");
        f.finish();
        assert_eq!(rx0.iter().collect::<Vec<_>>(), vec![vec![1, 2], vec![3]]);
    }
}
