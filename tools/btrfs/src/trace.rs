//! Streaming parser of btrfs delayed-ref ftrace text into refd [`Op`]s.
//!
//! Each line is `<comm>-<pid> [<cpu>] <flags> <timestamp>: <event>: <fsid>:
//! <fields>` (see `../shared/traces/README.md`). `comm` may be `<...>` and
//! may contain dashes and spaces, so the pid is the number after the last
//! dash before the `[cpu]` field.
//!
//! # Pairing and order
//!
//! The kernel queues one operation with one `add_delayed_ref_head` event,
//! printed while `delayed_refs->lock` is held, then (unless the action is
//! `UPDATE_DELAYED_HEAD`) one `add_delayed_tree_ref` / `add_delayed_data_ref`
//! event printed just after the lock is released, from the same task. So:
//! - a ref event pairs with the pending head of the same pid (a task has at
//!   most one: it prints the ref before it can queue anything else);
//! - head events are in the kernel's queue order (they are printed under
//!   the lock and merged by a clock shared by all CPUs), ref events are not:
//!   two tasks' ref events may come in either order.
//!
//! Ops are therefore emitted in *head* order. A head whose ref has not
//! arrived holds back everything behind it; the queue of held-back slots is
//! bounded by [`HOLDBACK_SLOTS_MAX`] (a ref normally follows its head within
//! a few lines; the deepest holdback of each capture is reported in
//! [`TraceStats::holdback_max`]).
//!
//! # Mapping (btrfs vocabulary)
//!
//! | head action | ref event | refd op |
//! |---|---|---|
//! | `ADD_DELAYED_EXTENT` | `ADD_DELAYED_REF` | [`Action::AddExtent`] with the ref's key |
//! | `ADD_DELAYED_REF` | `ADD_DELAYED_REF` | [`Action::AddRef`] |
//! | `DROP_DELAYED_REF` | `DROP_DELAYED_REF` | [`Action::DropRef`] |
//! | `UPDATE_DELAYED_HEAD` | none | [`Action::UpdateHead`] setting `FULL_BACKREF` |
//!
//! - keys: `TREE_BLOCK_REF` → [`RefKey::TreeBlock`] `{root: ref_root}`,
//!   `SHARED_BLOCK_REF` → [`RefKey::SharedBlock`] `{parent}`,
//!   `EXTENT_DATA_REF` → [`RefKey::ExtentData`] `{root: ref_root, objectid:
//!   owner, offset}`, `SHARED_DATA_REF` → [`RefKey::SharedData`] `{parent}`.
//!   For the shared kinds `ref_root` only says who queued the op; it is not
//!   part of the key (it is kept in [`TracedOp::ref_root`]).
//! - `UPDATE_DELAYED_HEAD`: the only producer of a bare extent_op in the
//!   kernel is `btrfs_set_disk_extent_flags()`, and every caller passes
//!   `BTRFS_BLOCK_FLAG_FULL_BACKREF` (README: "in these traces: setting
//!   FULL_BACKREF"); the event does not print the flags, so the op carries
//!   `flags_to_set = BLOCK_FLAG_FULL_BACKREF`. The event has no level
//!   either: the op's kind is `Tree { level: 0 }` as a placeholder, and an
//!   applier must take the level from the extent item.
//! - a tree-block `ADD_DELAYED_EXTENT` whose ref is `SHARED_BLOCK_REF` is a
//!   block allocated for a relocation tree: `btrfs_alloc_tree_block()` then
//!   sets `parent` (to the block itself when none is given) and always adds
//!   `BTRFS_BLOCK_FLAG_FULL_BACKREF` to the extent_op; the op carries that
//!   extent_op too, so the extent is created with the flag the kernel gave
//!   it.
//!
//! # run_* events
//!
//! `run_delayed_tree_ref` / `run_delayed_data_ref` / `run_delayed_ref_head`
//! are not ops: they record what the kernel applied after merging. They are
//! returned as [`TraceItem::Run`] items, in the same order slot as their
//! line, so a consumer can show them next to the ops around a mismatch.
//!
//! # Errors
//!
//! Unknown events and lines that are not ftrace events are counted with
//! examples ([`TraceStats`]). In [`Strictness::Strict`] mode (the default)
//! every anomaly of a known event is a [`TraceError`] with its line number:
//! a malformed line, a ref with no pending head of its pid, a second head
//! before the ref of the first, a head whose ref never arrives, a lost-events
//! marker, another filesystem's fsid, a full holdback queue. In
//! [`Strictness::Lenient`] mode they are counted with examples instead and
//! the offending line or head is dropped: the op stream is then incomplete
//! and the replay invariant no longer holds. I/O errors (a truncated `.zst`)
//! are always errors.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufRead};
use std::path::Path;

use memchr::memchr;
use refd_core::model::{
    Action, ExtentKind, ExtentOp, Op, OpError, RefKey, BLOCK_FLAG_FULL_BACKREF,
};

use crate::lex::{self, parse_u64, LineReader, Tally};
use crate::open::{self, Input, OpenError};

/// Most slots (ops waiting for their ref, completed ops and run events
/// behind them) held back to restore head order. A ref event normally
/// follows its head within a handful of lines; this bound only stops a
/// broken trace from growing memory without limit.
pub const HOLDBACK_SLOTS_MAX: usize = 1 << 16;

/// What to do with anomalies of known events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strictness {
    /// Every anomaly is an error (the default).
    #[default]
    Strict,
    /// Anomalies are counted with examples and skipped.
    Lenient,
}

/// How to read a trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Strict or lenient handling of anomalies.
    pub strictness: Strictness,
}

/// The six btrfs delayed-ref trace events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `add_delayed_ref_head`.
    AddHead,
    /// `add_delayed_tree_ref`.
    AddTreeRef,
    /// `add_delayed_data_ref`.
    AddDataRef,
    /// `run_delayed_ref_head`.
    RunHead,
    /// `run_delayed_tree_ref`.
    RunTreeRef,
    /// `run_delayed_data_ref`.
    RunDataRef,
}

impl EventType {
    /// All events, in [`EventType::index`] order.
    pub const ALL: [EventType; 6] = [
        EventType::AddHead,
        EventType::AddTreeRef,
        EventType::AddDataRef,
        EventType::RunHead,
        EventType::RunTreeRef,
        EventType::RunDataRef,
    ];

    /// The kernel's event name.
    pub fn name(self) -> &'static str {
        match self {
            EventType::AddHead => "add_delayed_ref_head",
            EventType::AddTreeRef => "add_delayed_tree_ref",
            EventType::AddDataRef => "add_delayed_data_ref",
            EventType::RunHead => "run_delayed_ref_head",
            EventType::RunTreeRef => "run_delayed_tree_ref",
            EventType::RunDataRef => "run_delayed_data_ref",
        }
    }

    /// Position in [`EventType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn from_name(name: &[u8]) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .find(|e| e.name().as_bytes() == name)
    }
}

/// The `action=` of an event, as the kernel names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelAction {
    /// `ADD_DELAYED_REF` (`BTRFS_ADD_DELAYED_REF`).
    AddRef,
    /// `DROP_DELAYED_REF`.
    DropRef,
    /// `ADD_DELAYED_EXTENT`.
    AddExtent,
    /// `UPDATE_DELAYED_HEAD`.
    UpdateHead,
}

impl KernelAction {
    /// All actions, in [`KernelAction::index`] order.
    pub const ALL: [KernelAction; 4] = [
        KernelAction::AddRef,
        KernelAction::DropRef,
        KernelAction::AddExtent,
        KernelAction::UpdateHead,
    ];

    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            KernelAction::AddRef => "ADD_DELAYED_REF",
            KernelAction::DropRef => "DROP_DELAYED_REF",
            KernelAction::AddExtent => "ADD_DELAYED_EXTENT",
            KernelAction::UpdateHead => "UPDATE_DELAYED_HEAD",
        }
    }

    /// Position in [`KernelAction::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    fn parse(s: &[u8]) -> Option<KernelAction> {
        KernelAction::ALL
            .into_iter()
            .find(|a| a.name().as_bytes() == s)
    }
}

/// One op of the stream with where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracedOp {
    /// The op.
    pub op: Op,
    /// Task that queued it.
    pub pid: u32,
    /// Line of the `add_delayed_ref_head` event.
    pub head_line: u64,
    /// Line of the ref event (`None` for `UpdateHead`).
    pub ref_line: Option<u64>,
    /// Timestamp of the head event, nanoseconds of `trace_clock=global`.
    pub ts_ns: u64,
    /// `ref_root` of the ref event: the owner for `TREE_BLOCK_REF` and
    /// `EXTENT_DATA_REF`, the tree that queued the op for shared kinds; 0
    /// for `UpdateHead`.
    pub ref_root: u64,
}

/// A `run_delayed_*` event: what the kernel applied after merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEvent {
    /// `run_delayed_tree_ref` / `run_delayed_data_ref`: one merged node was
    /// applied; `op.action` is its sign (`AddRef` or `DropRef`; the merged
    /// count is not printed).
    Ref {
        /// Line number.
        line: u64,
        /// Task that ran it.
        pid: u32,
        /// Timestamp (ns).
        ts_ns: u64,
        /// The node as an op (key, kind, size, seq).
        op: Op,
        /// `ref_root` as printed.
        ref_root: u64,
    },
    /// `run_delayed_ref_head`: the head is fully processed.
    Head {
        /// Line number.
        line: u64,
        /// Task that ran it.
        pid: u32,
        /// Timestamp (ns).
        ts_ns: u64,
        /// Extent.
        bytenr: u64,
        /// Extent size.
        num_bytes: u64,
        /// Data or tree block.
        is_data: bool,
    },
}

/// One item of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceItem {
    /// An op, in the kernel's queue order.
    Op(TracedOp),
    /// A run event, placed after the ops whose heads precede it.
    Run(RunEvent),
}

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
    /// Deepest holdback queue seen.
    pub holdback_max: usize,
    /// The fsid of the first event.
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

/// Why a trace was refused.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Reading failed (for `.zst`: a truncated or corrupt stream).
    #[error("line {line} (byte {offset}): read error: {source}")]
    Io {
        /// Line being read.
        line: u64,
        /// Byte offset of that line in the decompressed stream.
        offset: u64,
        /// The I/O or decoder error.
        #[source]
        source: io::Error,
    },
    /// A line of a known event that does not parse.
    #[error("line {line}: {reason}: {text:?}")]
    Malformed {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// What is wrong.
        reason: String,
    },
    /// The fields do not make a valid op.
    #[error("line {line}: {source}: {text:?}")]
    InvalidOp {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Validation error.
        #[source]
        source: OpError,
    },
    /// A ref event with no pending head of its task.
    #[error("line {line}: ref event of pid {pid} has no pending add_delayed_ref_head: {text:?}")]
    OrphanRef {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
    },
    /// A ref event that does not match its task's pending head.
    #[error("line {line}: ref event does not match the head of pid {pid} at line {head_line} ({reason}): {text:?}")]
    PairMismatch {
        /// Line of the ref event.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
        /// Line of the head event.
        head_line: u64,
        /// Which field differs.
        reason: String,
    },
    /// A head event of a task whose previous head still waits for its ref.
    #[error("line {line}: pid {pid} queued a new head before the ref event of its head at line {head_line}: {text:?}")]
    HeadBeforeRef {
        /// Line of the new head.
        line: u64,
        /// Line text.
        text: String,
        /// Task.
        pid: u32,
        /// Line of the waiting head.
        head_line: u64,
    },
    /// A head whose ref event never arrived.
    #[error("line {head_line}: head of pid {pid} on extent {bytenr} never got its ref event (end of input at line {eof_line})")]
    HeadWithoutRef {
        /// Line of the head.
        head_line: u64,
        /// Task.
        pid: u32,
        /// Extent.
        bytenr: u64,
        /// Last line of the input.
        eof_line: u64,
    },
    /// The holdback queue is full behind a head that waits for its ref.
    #[error("line {line}: {bound} slots held back behind the head at line {head_line} (pid {pid}, extent {bytenr}) whose ref event has not arrived")]
    HoldbackFull {
        /// Line being processed.
        line: u64,
        /// The bound ([`HOLDBACK_SLOTS_MAX`]).
        bound: usize,
        /// Line of the stuck head.
        head_line: u64,
        /// Its task.
        pid: u32,
        /// Its extent.
        bytenr: u64,
    },
    /// ftrace lost events: the op stream is incomplete.
    #[error("line {line}: the trace lost events: {text:?}")]
    LostEvents {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
    },
    /// An event of another filesystem.
    #[error("line {line}: fsid {fsid} differs from {expected} of the first event: {text:?}")]
    OtherFsid {
        /// Line number.
        line: u64,
        /// Line text.
        text: String,
        /// fsid of this line.
        fsid: String,
        /// fsid of the first event.
        expected: String,
    },
}

/// The header of an ftrace line.
#[derive(Debug, Clone, Copy)]
struct Header<'a> {
    pid: u32,
    ts_ns: u64,
    event: &'a [u8],
    fsid: &'a [u8],
    fields: &'a [u8],
}

/// Parse `S.FFFFFF` (any number of fraction digits up to 9) as ns.
fn parse_ts_ns(s: &[u8]) -> Option<u64> {
    let dot = memchr(b'.', s)?;
    let secs = parse_u64(&s[..dot])?;
    let frac = &s[dot + 1..];
    if frac.is_empty() || frac.len() > 9 {
        return None;
    }
    let mut ns = parse_u64(frac)?;
    for _ in frac.len()..9 {
        ns *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Split off the first space-delimited token (after leading spaces).
fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let s = lex::trim_start(s);
    match memchr(b' ', s) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

/// Try the ftrace header with the `[cpu]` field at `open`.
fn header_at(line: &[u8], open: usize) -> Option<Header<'_>> {
    // Before `[`: `-<pid>` then at least one space.
    let mut j = open;
    while j > 0 && line[j - 1] == b' ' {
        j -= 1;
    }
    if j == open {
        return None;
    }
    let pid_end = j;
    while j > 0 && line[j - 1].is_ascii_digit() {
        j -= 1;
    }
    if j == pid_end || j == 0 || line[j - 1] != b'-' {
        return None;
    }
    let pid = u32::try_from(parse_u64(&line[j..pid_end])?).ok()?;
    // `[cpu]`.
    let rest = &line[open + 1..];
    let close = memchr(b']', rest)?;
    parse_u64(&rest[..close])?;
    let rest = &rest[close + 1..];
    // Optional irq/preempt flags, then `timestamp:`.
    let (first, after) = token(rest);
    let (ts, rest) = match first.strip_suffix(b":").and_then(parse_ts_ns) {
        Some(ts) => (ts, after),
        None => {
            let (second, after) = token(after);
            (parse_ts_ns(second.strip_suffix(b":")?)?, after)
        }
    };
    let (event, rest) = token(rest);
    let event = event.strip_suffix(b":")?;
    let (fsid, fields) = token(rest);
    let fsid = fsid.strip_suffix(b":")?;
    Some(Header {
        pid,
        ts_ns: ts,
        event,
        fsid,
        fields,
    })
}

/// Parse the ftrace header: the first `[` whose surroundings fit.
fn parse_header(line: &[u8]) -> Option<Header<'_>> {
    let mut from = 0;
    while let Some(rel) = memchr(b'[', &line[from..]) {
        let open = from + rel;
        if let Some(h) = header_at(line, open) {
            return Some(h);
        }
        from = open + 1;
    }
    None
}

/// A number printed as `N`, `N(NAME)` or `N(-)`.
fn parse_num_named(v: &[u8]) -> Option<u64> {
    match memchr(b'(', v) {
        Some(i) if v.last() == Some(&b')') => parse_u64(&v[..i]),
        Some(_) => None,
        None => parse_u64(v),
    }
}

/// The backref `type=` of a ref event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefType {
    TreeBlock,
    SharedBlock,
    ExtentData,
    SharedData,
}

impl RefType {
    fn parse(s: &[u8]) -> Option<RefType> {
        Some(match s {
            b"TREE_BLOCK_REF" => RefType::TreeBlock,
            b"SHARED_BLOCK_REF" => RefType::SharedBlock,
            b"EXTENT_DATA_REF" => RefType::ExtentData,
            b"SHARED_DATA_REF" => RefType::SharedData,
            _ => return None,
        })
    }

    fn is_data(self) -> bool {
        matches!(self, RefType::ExtentData | RefType::SharedData)
    }
}

/// Fields of a head event.
#[derive(Clone, Copy, Debug)]
struct HeadFields {
    bytenr: u64,
    num_bytes: u64,
    /// `None` for the run event's `action=0x0`.
    action: Option<KernelAction>,
    is_data: bool,
}

/// Fields of a tree or data ref event.
#[derive(Clone, Copy, Debug)]
struct RefFields {
    bytenr: u64,
    num_bytes: u64,
    action: KernelAction,
    parent: u64,
    ref_root: u64,
    /// Tree events.
    level: u8,
    /// Data events.
    owner: u64,
    /// Data events.
    offset: u64,
    ref_type: RefType,
    seq: u64,
}

/// Result of parsing the fields of an event: the reason names the field.
type FieldResult<T> = Result<T, String>;

fn bad(field: &str) -> String {
    format!("bad or missing field '{field}'")
}

fn parse_head_fields(fields: &[u8], run: bool) -> FieldResult<HeadFields> {
    let (mut bytenr, mut num_bytes, mut action, mut is_data) = (None, None, None, None);
    for tok in lex::tokens(fields) {
        let eq =
            memchr(b'=', tok).ok_or_else(|| format!("field without '=': {}", lex::show(tok)))?;
        let (k, v) = (&tok[..eq], &tok[eq + 1..]);
        let slot_ok = match k {
            b"bytenr" => bytenr
                .replace(parse_u64(v).ok_or_else(|| bad("bytenr"))?)
                .is_none(),
            b"num_bytes" => num_bytes
                .replace(parse_u64(v).ok_or_else(|| bad("num_bytes"))?)
                .is_none(),
            b"action" => {
                let a = if run {
                    // Always printed as 0x0 by run_delayed_ref_head.
                    if !v.starts_with(b"0x") {
                        return Err(bad("action"));
                    }
                    None
                } else {
                    Some(KernelAction::parse(v).ok_or_else(|| bad("action"))?)
                };
                action.replace(a).is_none()
            }
            b"is_data" => is_data
                .replace(match v {
                    b"0" => false,
                    b"1" => true,
                    _ => return Err(bad("is_data")),
                })
                .is_none(),
            _ => return Err(format!("unknown field '{}'", lex::show(k))),
        };
        if !slot_ok {
            return Err(format!("field '{}' given twice", lex::show(k)));
        }
    }
    Ok(HeadFields {
        bytenr: bytenr.ok_or_else(|| bad("bytenr"))?,
        num_bytes: num_bytes.ok_or_else(|| bad("num_bytes"))?,
        action: action.ok_or_else(|| bad("action"))?,
        is_data: is_data.ok_or_else(|| bad("is_data"))?,
    })
}

fn parse_ref_fields(fields: &[u8], data: bool) -> FieldResult<RefFields> {
    let mut v_bytenr = None;
    let mut v_num_bytes = None;
    let mut v_action = None;
    let mut v_parent = None;
    let mut v_ref_root = None;
    let mut v_level = None;
    let mut v_owner = None;
    let mut v_offset = None;
    let mut v_type = None;
    let mut v_seq = None;
    for tok in lex::tokens(fields) {
        let eq =
            memchr(b'=', tok).ok_or_else(|| format!("field without '=': {}", lex::show(tok)))?;
        let (k, v) = (&tok[..eq], &tok[eq + 1..]);
        let fresh = match (k, data) {
            (b"bytenr", _) => v_bytenr
                .replace(parse_u64(v).ok_or_else(|| bad("bytenr"))?)
                .is_none(),
            (b"num_bytes", _) => v_num_bytes
                .replace(parse_u64(v).ok_or_else(|| bad("num_bytes"))?)
                .is_none(),
            (b"action", _) => v_action
                .replace(KernelAction::parse(v).ok_or_else(|| bad("action"))?)
                .is_none(),
            (b"parent", _) => v_parent
                .replace(parse_num_named(v).ok_or_else(|| bad("parent"))?)
                .is_none(),
            (b"ref_root", _) => v_ref_root
                .replace(parse_num_named(v).ok_or_else(|| bad("ref_root"))?)
                .is_none(),
            (b"level", false) => v_level
                .replace(
                    parse_u64(v)
                        .and_then(|l| u8::try_from(l).ok())
                        .ok_or_else(|| bad("level"))?,
                )
                .is_none(),
            (b"owner", true) => v_owner
                .replace(parse_u64(v).ok_or_else(|| bad("owner"))?)
                .is_none(),
            (b"offset", true) => v_offset
                .replace(parse_u64(v).ok_or_else(|| bad("offset"))?)
                .is_none(),
            (b"type", _) => v_type
                .replace(RefType::parse(v).ok_or_else(|| bad("type"))?)
                .is_none(),
            (b"seq", _) => v_seq
                .replace(parse_u64(v).ok_or_else(|| bad("seq"))?)
                .is_none(),
            _ => return Err(format!("unknown field '{}'", lex::show(k))),
        };
        if !fresh {
            return Err(format!("field '{}' given twice", lex::show(k)));
        }
    }
    let f = RefFields {
        bytenr: v_bytenr.ok_or_else(|| bad("bytenr"))?,
        num_bytes: v_num_bytes.ok_or_else(|| bad("num_bytes"))?,
        action: v_action.ok_or_else(|| bad("action"))?,
        parent: v_parent.ok_or_else(|| bad("parent"))?,
        ref_root: v_ref_root.ok_or_else(|| bad("ref_root"))?,
        level: if data {
            0
        } else {
            v_level.ok_or_else(|| bad("level"))?
        },
        owner: if data {
            v_owner.ok_or_else(|| bad("owner"))?
        } else {
            0
        },
        offset: if data {
            v_offset.ok_or_else(|| bad("offset"))?
        } else {
            0
        },
        ref_type: v_type.ok_or_else(|| bad("type"))?,
        seq: v_seq.ok_or_else(|| bad("seq"))?,
    };
    if f.ref_type.is_data() != data {
        return Err(format!(
            "type {:?} does not fit a {} event",
            f.ref_type,
            if data { "data" } else { "tree" }
        ));
    }
    match f.ref_type {
        RefType::TreeBlock | RefType::ExtentData if f.parent != 0 => {
            return Err("parent given on a root-keyed backref".into())
        }
        _ => {}
    }
    Ok(f)
}

impl RefFields {
    fn key(&self) -> RefKey {
        match self.ref_type {
            RefType::TreeBlock => RefKey::TreeBlock {
                root: self.ref_root,
            },
            RefType::SharedBlock => RefKey::SharedBlock {
                parent: self.parent,
            },
            RefType::ExtentData => RefKey::ExtentData {
                root: self.ref_root,
                objectid: self.owner,
                offset: self.offset,
            },
            RefType::SharedData => RefKey::SharedData {
                parent: self.parent,
            },
        }
    }

    fn kind(&self) -> ExtentKind {
        if self.ref_type.is_data() {
            ExtentKind::Data
        } else {
            ExtentKind::Tree { level: self.level }
        }
    }
}

/// A head waiting for its ref event.
#[derive(Clone, Copy, Debug)]
struct WaitingHead {
    line: u64,
    pid: u32,
    ts_ns: u64,
    head: HeadFields,
}

/// One position of the head-ordered output.
#[derive(Clone, Copy, Debug)]
enum Slot {
    Waiting(WaitingHead),
    Ready(TraceItem),
    /// A head dropped in lenient mode.
    Dropped,
}

/// The streaming trace reader: an iterator of [`TraceItem`]s in the
/// kernel's queue order. After an error it yields nothing more.
#[derive(Debug)]
pub struct TraceReader<R> {
    lines: LineReader<R>,
    opts: TraceOptions,
    stats: TraceStats,
    /// Head-ordered slots; `order[0]` has absolute index `order_base`.
    order: VecDeque<Slot>,
    order_base: u64,
    /// pid → absolute slot index of its head waiting for a ref.
    waiting: HashMap<u32, u64>,
    eof: bool,
    failed: bool,
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
    fn anomaly(
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

    fn malformed(&self, reason: impl Into<String>) -> TraceError {
        TraceError::Malformed {
            line: self.lines.line_no,
            text: lex::show(self.lines.line()),
            reason: reason.into(),
        }
    }

    fn push(&mut self, slot: Slot) -> Result<(), TraceError> {
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
    fn slot_pos(&self, idx: u64) -> Option<usize> {
        usize::try_from(idx.checked_sub(self.order_base)?).ok()
    }

    /// Replace the waiting head at absolute index `idx` by `Dropped`.
    fn drop_waiting(&mut self, idx: u64) {
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

    fn process_line(&mut self) -> Result<(), TraceError> {
        let line = self.lines.line();
        let Some(h) = parse_header(line) else {
            if memchr::memmem::find(line, b"[LOST ").is_some()
                && memchr::memmem::find(line, b" EVENTS]").is_some()
            {
                let err = TraceError::LostEvents {
                    line: self.lines.line_no,
                    text: lex::show(line),
                };
                return self.anomaly(err, |s| &mut s.lost_markers);
            }
            let known = EventType::ALL.iter().any(|e| {
                let name = e.name().as_bytes();
                memchr::memmem::find_iter(line, name)
                    .any(|i| line.get(i + name.len()) == Some(&b':'))
            });
            if known {
                let err = self.malformed("unparsable ftrace header of a known event");
                return self.anomaly(err, |s| &mut s.malformed);
            }
            let no = self.lines.line_no;
            self.stats.unparsed_lines.record(no, line);
            return Ok(());
        };
        let Some(event) = EventType::from_name(h.event) else {
            let no = self.lines.line_no;
            self.stats.unknown_events.record(no, line);
            return Ok(());
        };
        match &self.stats.fsid {
            None => self.stats.fsid = Some(lex::show(h.fsid)),
            Some(f) if f.as_bytes() == h.fsid => {}
            Some(f) => {
                let err = TraceError::OtherFsid {
                    line: self.lines.line_no,
                    text: lex::show(line),
                    fsid: lex::show(h.fsid),
                    expected: f.clone(),
                };
                return self.anomaly(err, |s| &mut s.other_fsid);
            }
        }
        let parsed = match event {
            EventType::AddHead | EventType::RunHead => {
                parse_head_fields(h.fields, event == EventType::RunHead).map(Parsed::Head)
            }
            EventType::AddTreeRef | EventType::RunTreeRef => {
                parse_ref_fields(h.fields, false).map(Parsed::Ref)
            }
            EventType::AddDataRef | EventType::RunDataRef => {
                parse_ref_fields(h.fields, true).map(Parsed::Ref)
            }
        };
        let parsed = match parsed {
            Ok(p) => p,
            Err(reason) => {
                let err = self.malformed(reason);
                return self.anomaly(err, |s| &mut s.malformed);
            }
        };
        let h = Meta {
            pid: h.pid,
            ts_ns: h.ts_ns,
        };
        self.stats.events[event.index()] += 1;
        self.stats.ts_first_ns.get_or_insert(h.ts_ns);
        self.stats.ts_last_ns = Some(h.ts_ns);
        match (event, parsed) {
            (EventType::AddHead, Parsed::Head(head)) => self.add_head(h, head),
            (EventType::AddTreeRef | EventType::AddDataRef, Parsed::Ref(r)) => self.add_ref(h, r),
            (EventType::RunHead, Parsed::Head(head)) => {
                self.push(Slot::Ready(TraceItem::Run(RunEvent::Head {
                    line: self.lines.line_no,
                    pid: h.pid,
                    ts_ns: h.ts_ns,
                    bytenr: head.bytenr,
                    num_bytes: head.num_bytes,
                    is_data: head.is_data,
                })))
            }
            (EventType::RunTreeRef | EventType::RunDataRef, Parsed::Ref(r)) => {
                let action = match r.action {
                    KernelAction::AddRef => Action::AddRef,
                    KernelAction::DropRef => Action::DropRef,
                    KernelAction::AddExtent => Action::AddExtent,
                    KernelAction::UpdateHead => {
                        let err = self.malformed("run event with action UPDATE_DELAYED_HEAD");
                        return self.anomaly(err, |s| &mut s.malformed);
                    }
                };
                let op = match Op::new(r.bytenr, r.num_bytes, r.kind(), action, r.key(), r.seq) {
                    Ok(op) => op,
                    Err(source) => return self.invalid_op(source),
                };
                self.push(Slot::Ready(TraceItem::Run(RunEvent::Ref {
                    line: self.lines.line_no,
                    pid: h.pid,
                    ts_ns: h.ts_ns,
                    op,
                    ref_root: r.ref_root,
                })))
            }
            // parse_* returns the variant of its event.
            _ => Ok(()),
        }
    }

    fn invalid_op(&mut self, source: OpError) -> Result<(), TraceError> {
        let err = TraceError::InvalidOp {
            line: self.lines.line_no,
            text: lex::show(self.lines.line()),
            source,
        };
        self.anomaly(err, |s| &mut s.malformed)
    }

    fn add_head(&mut self, h: Meta, head: HeadFields) -> Result<(), TraceError> {
        let Some(action) = head.action else {
            return Ok(());
        };
        self.stats.head_actions[action.index()] += 1;
        let line = self.lines.line_no;
        if let Some(&prev) = self.waiting.get(&h.pid) {
            let head_line = match self.slot_pos(prev).and_then(|p| self.order.get(p)) {
                Some(Slot::Waiting(w)) => w.line,
                _ => 0,
            };
            let err = TraceError::HeadBeforeRef {
                line,
                text: lex::show(self.lines.line()),
                pid: h.pid,
                head_line,
            };
            self.anomaly(err, |s| &mut s.unpaired_heads)?;
            self.drop_waiting(prev);
        }
        if action == KernelAction::UpdateHead {
            if head.is_data {
                let err = self.malformed("UPDATE_DELAYED_HEAD on a data extent");
                return self.anomaly(err, |s| &mut s.malformed);
            }
            let extent_op = ExtentOp {
                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                key: None,
            };
            // The level is not printed; see the module doc.
            let kind = ExtentKind::Tree { level: 0 };
            let op = match Op::update_head(head.bytenr, head.num_bytes, kind, extent_op) {
                Ok(op) => op,
                Err(source) => return self.invalid_op(source),
            };
            return self.push(Slot::Ready(TraceItem::Op(TracedOp {
                op,
                pid: h.pid,
                head_line: line,
                ref_line: None,
                ts_ns: h.ts_ns,
                ref_root: 0,
            })));
        }
        self.push(Slot::Waiting(WaitingHead {
            line,
            pid: h.pid,
            ts_ns: h.ts_ns,
            head,
        }))?;
        // push() appends (dropping a stuck head only marks its slot), so
        // the new slot is the last one.
        let idx = self.order_base + self.order.len() as u64 - 1;
        self.waiting.insert(h.pid, idx);
        Ok(())
    }

    fn add_ref(&mut self, h: Meta, r: RefFields) -> Result<(), TraceError> {
        let line = self.lines.line_no;
        let Some(idx) = self.waiting.remove(&h.pid) else {
            let err = TraceError::OrphanRef {
                line,
                text: lex::show(self.lines.line()),
                pid: h.pid,
            };
            return self.anomaly(err, |s| &mut s.orphan_refs);
        };
        let pos = self.slot_pos(idx);
        let Some(&Slot::Waiting(w)) = pos.and_then(|p| self.order.get(p)) else {
            // The waiting map only points at waiting slots.
            let err = TraceError::OrphanRef {
                line,
                text: lex::show(self.lines.line()),
                pid: h.pid,
            };
            return self.anomaly(err, |s| &mut s.orphan_refs);
        };
        let head = w.head;
        let paired = match (head.action, r.action) {
            (Some(KernelAction::AddExtent), KernelAction::AddRef) => Ok(Action::AddExtent),
            (Some(KernelAction::AddRef), KernelAction::AddRef) => Ok(Action::AddRef),
            (Some(KernelAction::DropRef), KernelAction::DropRef) => Ok(Action::DropRef),
            (head_action, ref_action) => Err(format!(
                "head action {} vs ref action {}",
                head_action.map_or("?", KernelAction::name),
                ref_action.name()
            )),
        }
        .and_then(|action| {
            if head.bytenr != r.bytenr {
                Err(format!("bytenr {} vs {}", head.bytenr, r.bytenr))
            } else if head.num_bytes != r.num_bytes {
                Err(format!("num_bytes {} vs {}", head.num_bytes, r.num_bytes))
            } else if head.is_data != r.ref_type.is_data() {
                Err(format!(
                    "is_data={} vs a {:?} ref",
                    u8::from(head.is_data),
                    r.ref_type
                ))
            } else {
                Ok(action)
            }
        });
        let action = match paired {
            Ok(action) => action,
            Err(reason) => {
                let err = TraceError::PairMismatch {
                    line,
                    text: lex::show(self.lines.line()),
                    pid: h.pid,
                    head_line: w.line,
                    reason,
                };
                self.anomaly(err, |s| &mut s.orphan_refs)?;
                self.waiting.insert(h.pid, idx);
                self.drop_waiting(idx);
                return Ok(());
            }
        };
        let key = r.key();
        let mut op = Op::new(r.bytenr, r.num_bytes, r.kind(), action, key, r.seq);
        if action == Action::AddExtent && matches!(key, RefKey::SharedBlock { .. }) {
            // Relocation tree block: allocated with FULL_BACKREF (module doc).
            op = op.and_then(|op| {
                op.with_extent_op(ExtentOp {
                    flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                    key: None,
                })
            });
        }
        let op = match op {
            Ok(op) => op,
            Err(source) => {
                self.invalid_op(source)?;
                self.waiting.insert(h.pid, idx);
                self.drop_waiting(idx);
                return Ok(());
            }
        };
        if let Some(slot) = pos.and_then(|p| self.order.get_mut(p)) {
            *slot = Slot::Ready(TraceItem::Op(TracedOp {
                op,
                pid: h.pid,
                head_line: w.line,
                ref_line: Some(line),
                ts_ns: w.ts_ns,
                ref_root: r.ref_root,
            }));
        }
        Ok(())
    }

    /// At end of input: the front head never got its ref.
    fn eof_front(&mut self, w: WaitingHead) -> Result<(), TraceError> {
        let err = TraceError::HeadWithoutRef {
            head_line: w.line,
            pid: w.pid,
            bytenr: w.head.bytenr,
            eof_line: self.lines.line_no,
        };
        self.anomaly(err, |s| &mut s.unpaired_heads)?;
        self.drop_waiting(self.order_base);
        Ok(())
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

/// Who printed an event, and when.
#[derive(Clone, Copy, Debug)]
struct Meta {
    pid: u32,
    ts_ns: u64,
}

/// The fields of one event.
#[derive(Clone, Copy, Debug)]
enum Parsed {
    Head(HeadFields),
    Ref(RefFields),
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

#[cfg(test)]
mod tests;
