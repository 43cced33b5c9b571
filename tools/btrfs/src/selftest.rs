//! Round-trip checks of the two text parsers (dump-tree and ftrace),
//! shared by the property test of the normal test run
//! (`tests/fuzz_decoders.rs`) and the cargo-fuzz targets (`fuzz/`, see
//! `docs/fuzzing.md`), so both hold the parsers to the same contract on
//! arbitrary bytes:
//!
//! - no parser panics, and memory stays bounded by the input (lines are
//!   capped at [`crate::LINE_BYTES_MAX`], examples at
//!   [`crate::SAMPLES_MAX`], held-back trace slots at
//!   [`HOLDBACK_SLOTS_MAX`]);
//! - a parser refuses with a typed error naming a line of the input, or
//!   returns a value. Text is not canonical (spacing, names or numbers for
//!   tree ids, headers and items that are skipped), so instead of the
//!   input bytes the value must survive a round trip through the text it
//!   prints as: a dump's extent tree through [`write_dump_items`] (and
//!   that text is a fixed point: printing its parse gives it back), a
//!   trace's items through [`render_trace`] (the same items, line numbers
//!   aside);
//! - the counts agree with the input (lines, bytes, extents, ops and run
//!   records), every extent passes [`ExtentItem::check`] and every op
//!   [`refd_core::model::Op::check`], and the trace's items come in head
//!   order;
//! - a trace the strict reader accepts, the lenient reader accepts with
//!   the same items and nothing skipped; the lenient reader refuses only
//!   what it cannot read (an overlong line);
//!
//! These functions panic when the contract is broken: that is their job.
//! They are public only so that the fuzz crate and the integration tests
//! can call them.
//!
//! [`ExtentItem::check`]: refd_core::extent_tree::ExtentItem::check

use std::fmt::Write as _;

use refd_core::extent_tree::ExtentTree;
use refd_core::model::{Action, ExtentKind, Op, RefKey};

use crate::dump::{parse_dump, DumpError, DumpOptions, DumpStats};
use crate::export::write_dump_items;
use crate::trace::{
    RunEvent, Strictness, TraceError, TraceItem, TraceOptions, TraceReader, TraceStats, TracedOp,
    HOLDBACK_SLOTS_MAX,
};

/// Lines of `text` as the line readers count them (a last line without
/// `\n` counts).
fn line_count(text: &[u8]) -> u64 {
    let ends = memchr::memchr_iter(b'\n', text).count() as u64;
    ends + u64::from(!text.is_empty() && !text.ends_with(b"\n"))
}

/// Parses `text` as dump-tree output and checks the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn dump_round_trip(
    text: &[u8],
    opts: &DumpOptions,
) -> Result<(ExtentTree, DumpStats), DumpError> {
    let lines = line_count(text);
    let (tree, stats) = match parse_dump(text, opts) {
        Ok(parsed) => parsed,
        Err(e) => {
            let _ = e.to_string();
            let line = match &e {
                DumpError::Open(_) => panic!("parsing from memory opened a file: {e}"),
                DumpError::Io { line, .. }
                | DumpError::Malformed { line, .. }
                | DumpError::MissingField { line, .. }
                | DumpError::KeyedWithoutExtent { line, .. }
                | DumpError::DuplicateExtent { line, .. }
                | DumpError::DuplicateBackref { line, .. }
                | DumpError::ItemSize { line, .. }
                | DumpError::InvalidItem { line, .. }
                | DumpError::Nodesize { line, .. } => *line,
            };
            assert!(
                (1..=lines.max(1)).contains(&line),
                "error at line {line} of {lines}: {e}"
            );
            return Err(e);
        }
    };
    assert_eq!((stats.lines, stats.bytes), (lines, text.len() as u64));
    assert_eq!(stats.extents as usize, tree.len());
    assert_eq!(stats.extents, stats.data_extents + stats.tree_extents);
    // An extent takes an item line and a refs line at least.
    assert!(2 * stats.extents <= lines);
    assert!(stats.unrecognized.samples.len() <= crate::SAMPLES_MAX);
    // Items are valid; a fuzzed dump may hold overlapping extents.
    assert_eq!(tree.check_items(), Ok(()));
    if let Some(given) = opts.nodesize {
        assert_eq!(stats.nodesize, given, "a given nodesize is the one used");
    }
    // The printed items have no leaf headers to show the nodesize.
    let printed = print_dump(&tree, stats.nodesize);
    let reread = DumpOptions {
        nodesize: Some(stats.nodesize),
    };
    let (again, _) = parse_dump(printed.as_bytes(), &reread)
        .unwrap_or_else(|e| panic!("printed dump does not parse: {e}\n{printed}"));
    assert!(
        again == tree,
        "printed dump parses to another tree:\n{printed}"
    );
    assert_eq!(
        print_dump(&again, stats.nodesize),
        printed,
        "printed dump is not a fixed point"
    );
    Ok((tree, stats))
}

fn print_dump(tree: &ExtentTree, nodesize: u64) -> String {
    let mut out = Vec::new();
    write_dump_items(tree, nodesize, &mut out).expect("writing to memory");
    String::from_utf8(out).expect("dump-tree text is UTF-8")
}

/// What [`trace_round_trip`] read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceOutcome {
    /// Ops read by the strict reader.
    pub ops: u64,
    /// Run records read by the strict reader.
    pub runs: u64,
    /// The strict reader refused the trace.
    pub strict_error: bool,
    /// Anomalies the lenient reader skipped.
    pub lenient_skipped: u64,
}

/// Everything a reader yields, with its stats.
struct Read {
    items: Vec<TraceItem>,
    error: Option<TraceError>,
    stats: TraceStats,
}

fn read_trace(text: &[u8], strictness: Strictness) -> Read {
    let mut r = TraceReader::new(text, TraceOptions { strictness });
    let mut items = Vec::new();
    let mut error = None;
    for item in r.by_ref() {
        match item {
            Ok(item) => items.push(item),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    if error.is_some() {
        assert!(r.next().is_none(), "the reader yields more after an error");
    }
    Read {
        items,
        error,
        stats: r.into_stats(),
    }
}

/// The line an item's slot was queued for: its head for an op, its own
/// for a run record.
fn slot_line(item: &TraceItem) -> u64 {
    match item {
        TraceItem::Op(op) => op.head_line,
        TraceItem::Run(RunEvent::Head { line, .. } | RunEvent::Ref { line, .. }) => *line,
    }
}

fn check_items(read: &Read, lines: u64) {
    let s = &read.stats;
    assert!(s.holdback_max <= HOLDBACK_SLOTS_MAX);
    assert!(s.lines <= lines);
    let ops = read
        .items
        .iter()
        .filter(|i| matches!(i, TraceItem::Op(_)))
        .count() as u64;
    assert_eq!((s.ops, s.runs), (ops, read.items.len() as u64 - ops));
    assert!(
        read.items
            .windows(2)
            .all(|w| slot_line(&w[0]) < slot_line(&w[1])),
        "items not in head order"
    );
    for item in &read.items {
        match item {
            TraceItem::Op(op) => {
                assert_eq!(op.op.check(), Ok(()));
                assert!(op.head_line >= 1 && op.head_line <= s.lines);
                if let Some(ref_line) = op.ref_line {
                    assert!(op.head_line < ref_line && ref_line <= s.lines);
                }
                assert_eq!(op.ref_line.is_none(), op.op.action == Action::UpdateHead);
            }
            TraceItem::Run(RunEvent::Ref { op, .. }) => assert_eq!(op.check(), Ok(())),
            TraceItem::Run(RunEvent::Head { .. }) => {}
        }
    }
}

fn check_error(e: &TraceError, lines: u64) {
    let _ = e.to_string();
    let line = match e {
        TraceError::Io { line, .. }
        | TraceError::Malformed { line, .. }
        | TraceError::InvalidOp { line, .. }
        | TraceError::OrphanRef { line, .. }
        | TraceError::PairMismatch { line, .. }
        | TraceError::HeadBeforeRef { line, .. }
        | TraceError::HoldbackFull { line, .. }
        | TraceError::LostEvents { line, .. }
        | TraceError::OtherFsid { line, .. } => *line,
        TraceError::HeadWithoutRef {
            head_line,
            eof_line,
            ..
        } => {
            assert!(head_line <= eof_line);
            *eof_line
        }
    };
    assert!(line <= lines.max(1), "error at line {line} of {lines}: {e}");
    if let TraceError::OtherFsid { fsid, expected, .. } = e {
        assert_ne!(
            fsid, expected,
            "an event of the same fsid refused as another's: {e:?}"
        );
    }
}

/// Reads `text` as an ftrace capture, strictly and leniently, and checks
/// the contract (module doc).
///
/// # Panics
///
/// If the contract is broken.
pub fn trace_round_trip(text: &[u8]) -> TraceOutcome {
    let lines = line_count(text);
    let strict = read_trace(text, Strictness::Strict);
    let lenient = read_trace(text, Strictness::Lenient);
    check_items(&strict, lines);
    check_items(&lenient, lines);
    if let Some(e) = &strict.error {
        check_error(e, lines);
    }
    if let Some(e) = &lenient.error {
        check_error(e, lines);
        assert!(
            matches!(e, TraceError::Io { .. }),
            "the lenient reader refused an anomaly: {e}"
        );
    }
    if strict.error.is_none() {
        assert_eq!(strict.stats.skipped(), 0);
        assert_eq!(
            (strict.stats.lines, strict.stats.bytes),
            (lines, text.len() as u64)
        );
        assert!(lenient.error.is_none());
        assert_eq!(lenient.items, strict.items, "lenient reader disagrees");
        assert_eq!(lenient.stats, strict.stats, "lenient reader disagrees");
        let fsid = strict.stats.fsid.as_deref().unwrap_or("0");
        let printed = render_trace(&strict.items, fsid);
        let again = read_trace(printed.as_bytes(), Strictness::Strict);
        if let Some(e) = &again.error {
            panic!("rendered trace refused: {e}\n{printed}");
        }
        assert_eq!(
            again.items.iter().map(without_lines).collect::<Vec<_>>(),
            strict.items.iter().map(without_lines).collect::<Vec<_>>(),
            "rendered trace reads back differently:\n{printed}"
        );
    }
    TraceOutcome {
        ops: strict.stats.ops,
        runs: strict.stats.runs,
        strict_error: strict.error.is_some(),
        lenient_skipped: lenient.stats.skipped(),
    }
}

/// An item with its line numbers zeroed.
fn without_lines(item: &TraceItem) -> TraceItem {
    match *item {
        TraceItem::Op(op) => TraceItem::Op(TracedOp {
            head_line: 0,
            ref_line: op.ref_line.map(|_| 0),
            ..op
        }),
        TraceItem::Run(RunEvent::Ref {
            pid,
            ts_ns,
            op,
            ref_root,
            ..
        }) => TraceItem::Run(RunEvent::Ref {
            line: 0,
            pid,
            ts_ns,
            op,
            ref_root,
        }),
        TraceItem::Run(RunEvent::Head {
            pid,
            ts_ns,
            bytenr,
            num_bytes,
            is_data,
            ..
        }) => TraceItem::Run(RunEvent::Head {
            line: 0,
            pid,
            ts_ns,
            bytenr,
            num_bytes,
            is_data,
        }),
    }
}

fn kernel_action(action: Action) -> &'static str {
    match action {
        Action::AddRef => "ADD_DELAYED_REF",
        Action::DropRef => "DROP_DELAYED_REF",
        Action::AddExtent => "ADD_DELAYED_EXTENT",
        Action::UpdateHead => "UPDATE_DELAYED_HEAD",
    }
}

/// `task-PID [000] ..... S.NNNNNNNNN: EVENT: FSID: `
fn line_start(s: &mut String, pid: u32, ts_ns: u64, event: &str, fsid: &str) {
    let (secs, ns) = (ts_ns / 1_000_000_000, ts_ns % 1_000_000_000);
    let _ = write!(
        s,
        "task-{pid} [000] ..... {secs}.{ns:09}: {event}: {fsid}: "
    );
}

/// The fields of a tree or data ref event for `op` (which has a key).
fn ref_fields(s: &mut String, op: &Op, action: &str, ref_root: u64) {
    let (parent, owner, offset) = match op.key {
        Some(RefKey::SharedBlock { parent } | RefKey::SharedData { parent }) => (parent, 0, 0),
        Some(RefKey::ExtentData {
            objectid, offset, ..
        }) => (0, objectid, offset),
        _ => (0, 0, 0),
    };
    let ty = match op.key {
        Some(RefKey::TreeBlock { .. }) => "TREE_BLOCK_REF",
        Some(RefKey::SharedBlock { .. }) => "SHARED_BLOCK_REF",
        Some(RefKey::ExtentData { .. }) => "EXTENT_DATA_REF",
        Some(RefKey::SharedData { .. }) | None => "SHARED_DATA_REF",
    };
    let _ = write!(
        s,
        "bytenr={} num_bytes={} action={action} parent={parent} ref_root={ref_root} ",
        op.bytenr, op.num_bytes
    );
    match op.kind {
        ExtentKind::Tree { level } => {
            let _ = write!(s, "level={level} ");
        }
        ExtentKind::Data => {
            let _ = write!(s, "owner={owner} offset={offset} ");
        }
    }
    let _ = writeln!(s, "type={ty} seq={}", op.seq);
}

/// Prints trace items as the ftrace lines the kernel would have printed
/// for them (each op's head event directly followed by its ref event),
/// for events of filesystem `fsid`. Reading the result gives the same
/// items with other line numbers.
pub fn render_trace(items: &[TraceItem], fsid: &str) -> String {
    let mut s = String::new();
    for item in items {
        match item {
            TraceItem::Op(t) => {
                let op = &t.op;
                line_start(&mut s, t.pid, t.ts_ns, "add_delayed_ref_head", fsid);
                let _ = writeln!(
                    s,
                    "bytenr={} num_bytes={} action={} is_data={}",
                    op.bytenr,
                    op.num_bytes,
                    kernel_action(op.action),
                    u8::from(op.kind.is_data())
                );
                if op.action != Action::UpdateHead {
                    let event = if op.kind.is_data() {
                        "add_delayed_data_ref"
                    } else {
                        "add_delayed_tree_ref"
                    };
                    line_start(&mut s, t.pid, t.ts_ns, event, fsid);
                    let action = if op.action == Action::DropRef {
                        "DROP_DELAYED_REF"
                    } else {
                        "ADD_DELAYED_REF"
                    };
                    ref_fields(&mut s, op, action, t.ref_root);
                }
            }
            TraceItem::Run(RunEvent::Head {
                pid,
                ts_ns,
                bytenr,
                num_bytes,
                is_data,
                ..
            }) => {
                line_start(&mut s, *pid, *ts_ns, "run_delayed_ref_head", fsid);
                let _ = writeln!(
                    s,
                    "bytenr={bytenr} num_bytes={num_bytes} action=0x0 is_data={}",
                    u8::from(*is_data)
                );
            }
            TraceItem::Run(RunEvent::Ref {
                pid,
                ts_ns,
                op,
                ref_root,
                ..
            }) => {
                let event = if op.kind.is_data() {
                    "run_delayed_data_ref"
                } else {
                    "run_delayed_tree_ref"
                };
                line_start(&mut s, *pid, *ts_ns, event, fsid);
                ref_fields(&mut s, op, kernel_action(op.action), *ref_root);
            }
        }
    }
    s
}

/// Node sizes [`fuzz_dump`] picks from (`None`: the dump's leaves say).
pub const FUZZ_NODESIZES: [Option<u64>; 4] = [None, Some(4096), Some(65536), Some(1)];

/// Arbitrary bytes as dump-tree text: the first byte picks the node size
/// ([`FUZZ_NODESIZES`]), the rest is the text.
///
/// # Panics
///
/// If the contract of [`dump_round_trip`] is broken.
pub fn fuzz_dump(data: &[u8]) {
    let Some((&steer, text)) = data.split_first() else {
        return;
    };
    let opts = DumpOptions {
        nodesize: FUZZ_NODESIZES[usize::from(steer % 4)],
    };
    let _ = dump_round_trip(text, &opts);
}

/// Arbitrary bytes as ftrace text.
///
/// # Panics
///
/// If the contract of [`trace_round_trip`] is broken.
pub fn fuzz_trace(data: &[u8]) {
    let _ = trace_round_trip(data);
}
