//! [`TraceStats`]: what a trace held, and what was skipped with examples.

use crate::lex::Tally;

use super::{EventType, KernelAction};

/// Counts of what was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceStats {
    /// Lines read.
    pub lines: u64,
    /// Bytes read (decompressed).
    pub bytes: u64,
    /// Events by [`EventType::index`].
    pub events: [u64; 6],
    /// `add_delayed_ref_head` events by [`KernelAction::index`].
    pub head_actions: [u64; 4],
    /// Ops emitted.
    pub ops: u64,
    /// Ops with a non-zero tree-mod-log seq.
    pub seq_nonzero_ops: u64,
    /// Run items emitted.
    pub runs: u64,
    /// Ref events whose printed seq cannot be a tree-mod-log seq (above
    /// `SEQ_MAX`) because they were printed from a node the kernel had
    /// already run and freed; the seq is the one its run event printed
    /// (module doc of `trace`, "Refs printed after their node ran").
    pub seq_from_run: u64,
    /// Deepest holdback queue seen.
    pub holdback_max: usize,
    /// The fsid of the first event, with bytes other than printable ASCII
    /// escaped (as `[u8]::escape_ascii` does: a UUID is unchanged).
    pub fsid: Option<String>,
    /// Timestamps (ns) of the first and the last event.
    pub ts_first_ns: Option<u64>,
    /// See `ts_first_ns`.
    pub ts_last_ns: Option<u64>,
    /// Events of names this parser does not know.
    pub unknown_events: Tally,
    /// Lines that are not ftrace events at all.
    pub unparsed_lines: Tally,
    /// Lenient mode: malformed lines of known events, skipped.
    pub malformed: Tally,
    /// Lenient mode: ref events with no pending head of their pid, or not
    /// matching it (the head is then dropped too), skipped.
    pub orphan_refs: Tally,
    /// Lenient mode: heads whose ref never came (replaced by a newer head
    /// of the same pid, pushed out of the holdback queue, or at end of
    /// input), dropped.
    pub unpaired_heads: Tally,
    /// Lenient mode: `[LOST N EVENTS]` markers.
    pub lost_markers: Tally,
    /// Lenient mode: events of another filesystem, skipped.
    pub other_fsid: Tally,
}

impl TraceStats {
    /// Number of events of one type.
    pub fn events_of(&self, event: EventType) -> u64 {
        self.events[event.index()]
    }

    /// `add_delayed_tree_ref` + `add_delayed_data_ref` events (meta.json
    /// `add_ref_events`).
    pub fn add_ref_events(&self) -> u64 {
        self.events_of(EventType::AddTreeRef) + self.events_of(EventType::AddDataRef)
    }

    /// Head events of one action.
    pub fn head_action(&self, action: KernelAction) -> u64 {
        self.head_actions[action.index()]
    }

    /// Total anomalies skipped in lenient mode (0 in strict mode).
    pub fn skipped(&self) -> u64 {
        self.malformed.count
            + self.orphan_refs.count
            + self.unpaired_heads.count
            + self.lost_markers.count
            + self.other_fsid.count
    }
}
