//! [`TraceReader`]: lines in, [`TraceItem`]s out in the kernel's queue
//! order, through a bounded queue of head-ordered slots (see the module
//! doc of `trace`, "Pairing and order").

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::path::Path;

use crate::lex::{self, LineReader, Tally};
use crate::open::{self, Input, OpenError};

use super::fields::HeadFields;
use super::{
    Strictness, TraceError, TraceItem, TraceOptions, TraceStats, TracedOp, HOLDBACK_SLOTS_MAX,
};

/// A head waiting for its ref event.
#[derive(Clone, Copy, Debug)]
pub(super) struct WaitingHead {
    pub(super) line: u64,
    pub(super) pid: u32,
    pub(super) ts_ns: u64,
    pub(super) head: HeadFields,
}

/// One position of the head-ordered output.
#[derive(Clone, Copy, Debug)]
pub(super) enum Slot {
    Waiting(WaitingHead),
    Ready(TraceItem),
    /// A head dropped in lenient mode.
    Dropped,
}

/// The streaming trace reader: an iterator of [`TraceItem`]s in the
/// kernel's queue order. After an error it yields nothing more.
#[derive(Debug)]
pub struct TraceReader<R> {
    pub(super) lines: LineReader<R>,
    pub(super) opts: TraceOptions,
    pub(super) stats: TraceStats,
    /// Head-ordered slots; `order[0]` has absolute index `order_base`.
    pub(super) order: VecDeque<Slot>,
    pub(super) order_base: u64,
    /// pid → absolute slot index of its head waiting for a ref.
    pub(super) waiting: HashMap<u32, u64>,
    pub(super) eof: bool,
    pub(super) failed: bool,
}

impl TraceReader<Input> {
    /// Open a trace file (plain or `.zst`).
    pub fn open(path: impl AsRef<Path>, opts: TraceOptions) -> Result<Self, OpenError> {
        Ok(TraceReader::new(open::open(path)?, opts))
    }
}

impl<R: BufRead> TraceReader<R> {
    /// Read a trace from any buffered reader.
    pub fn new(input: R, opts: TraceOptions) -> Self {
        TraceReader {
            lines: LineReader::new(input),
            opts,
            stats: TraceStats::default(),
            order: VecDeque::new(),
            order_base: 0,
            waiting: HashMap::new(),
            eof: false,
            failed: false,
        }
    }

    /// Counts so far (complete once the iterator returned `None`).
    pub fn stats(&self) -> &TraceStats {
        &self.stats
    }

    /// Consume the reader, returning its counts.
    pub fn into_stats(self) -> TraceStats {
        self.stats
    }

    /// Only the ops, in order (run events are skipped).
    pub fn ops(&mut self) -> impl Iterator<Item = Result<TracedOp, TraceError>> + '_ {
        self.filter_map(|item| match item {
            Ok(TraceItem::Op(op)) => Some(Ok(op)),
            Ok(TraceItem::Run(_)) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn strict(&self) -> bool {
        self.opts.strictness == Strictness::Strict
    }

    /// Record an anomaly: an error in strict mode, a tally in lenient mode.
    pub(super) fn anomaly(
        &mut self,
        err: TraceError,
        tally: fn(&mut TraceStats) -> &mut Tally,
    ) -> Result<(), TraceError> {
        if self.strict() {
            return Err(err);
        }
        let line = self.lines.line_no;
        tally(&mut self.stats).record_note(line, err.to_string());
        Ok(())
    }

    pub(super) fn malformed(&self, reason: impl Into<String>) -> TraceError {
        TraceError::Malformed {
            line: self.lines.line_no,
            text: lex::show(self.lines.line()),
            reason: reason.into(),
        }
    }

    pub(super) fn push(&mut self, slot: Slot) -> Result<(), TraceError> {
        if self.order.len() >= HOLDBACK_SLOTS_MAX {
            // Only a waiting head can hold the queue (ready slots drain).
            if let Some(&Slot::Waiting(w)) = self.order.front() {
                let err = TraceError::HoldbackFull {
                    line: self.lines.line_no,
                    bound: HOLDBACK_SLOTS_MAX,
                    head_line: w.line,
                    pid: w.pid,
                    bytenr: w.head.bytenr,
                };
                self.anomaly(err, |s| &mut s.unpaired_heads)?;
                self.drop_waiting(self.order_base);
            }
        }
        self.order.push_back(slot);
        self.stats.holdback_max = self.stats.holdback_max.max(self.order.len());
        Ok(())
    }

    /// Position in `order` of the slot with absolute index `idx`.
    pub(super) fn slot_pos(&self, idx: u64) -> Option<usize> {
        usize::try_from(idx.checked_sub(self.order_base)?).ok()
    }

    /// Replace the waiting head at absolute index `idx` by `Dropped`.
    pub(super) fn drop_waiting(&mut self, idx: u64) {
        let Some(pos) = self.slot_pos(idx) else {
            return;
        };
        if let Some(slot) = self.order.get_mut(pos) {
            if let Slot::Waiting(w) = *slot {
                if self.waiting.get(&w.pid) == Some(&idx) {
                    self.waiting.remove(&w.pid);
                }
                *slot = Slot::Dropped;
            }
        }
    }

    fn next_item(&mut self) -> Result<Option<TraceItem>, TraceError> {
        loop {
            match self.order.front().copied() {
                Some(Slot::Ready(item)) => {
                    self.order.pop_front();
                    self.order_base += 1;
                    match item {
                        TraceItem::Op(op) => {
                            self.stats.ops += 1;
                            if op.op.seq != 0 {
                                self.stats.seq_nonzero_ops += 1;
                            }
                        }
                        TraceItem::Run(_) => self.stats.runs += 1,
                    }
                    return Ok(Some(item));
                }
                Some(Slot::Dropped) => {
                    self.order.pop_front();
                    self.order_base += 1;
                    continue;
                }
                Some(Slot::Waiting(w)) if self.eof => {
                    self.eof_front(w)?;
                    continue;
                }
                None if self.eof => return Ok(None),
                _ => {}
            }
            match self.lines.next_line() {
                Ok(true) => {
                    self.stats.lines = self.lines.line_no;
                    self.stats.bytes = self.lines.bytes;
                    self.process_line()?;
                }
                Ok(false) => self.eof = true,
                Err(source) => {
                    return Err(TraceError::Io {
                        line: self.lines.line_no,
                        offset: self.lines.line_offset,
                        source,
                    })
                }
            }
        }
    }
}

impl<R: BufRead> Iterator for TraceReader<R> {
    type Item = Result<TraceItem, TraceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.next_item() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}
