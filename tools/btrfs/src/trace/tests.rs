//! Unit tests of the trace parser: header edge cases, pairing, order,
//! anomalies in strict and lenient modes.

use super::*;
use refd_core::model::{Action, ExtentKind, RefKey, BLOCK_FLAG_FULL_BACKREF};

const FSID: &str = "cfafdca2-1111-2222-3333-444455556666";

fn head(task: &str, bytenr: u64, action: &str, is_data: u8) -> String {
    let n = if is_data == 1 { 8192 } else { 16384 };
    format!(
        "{task:>16} [001] ...1. 2569.958601: add_delayed_ref_head: {FSID}: bytenr={bytenr} num_bytes={n} action={action} is_data={is_data}\n"
    )
}

fn tref(task: &str, bytenr: u64, action: &str, parent: &str, root: &str, ty: &str) -> String {
    format!(
        "{task:>16} [000] ..... 2569.958613: add_delayed_tree_ref: {FSID}: bytenr={bytenr} num_bytes=16384 action={action} parent={parent} ref_root={root} level=1 type={ty} seq=0\n"
    )
}

fn dref(task: &str, bytenr: u64, action: &str, parent: &str, root: &str, ty: &str) -> String {
    format!(
        "{task:>16} [000] ..... 2569.958613: add_delayed_data_ref: {FSID}: bytenr={bytenr} num_bytes=8192 action={action} parent={parent} ref_root={root} owner=257 offset=4096 type={ty} seq=7\n"
    )
}

fn read(text: &str, strictness: Strictness) -> (Vec<Result<TraceItem, TraceError>>, TraceStats) {
    let mut r = TraceReader::new(text.as_bytes(), TraceOptions { strictness });
    let items: Vec<_> = r.by_ref().collect();
    (items, r.into_stats())
}

fn ops(text: &str) -> Vec<TracedOp> {
    let (items, _) = read(text, Strictness::Strict);
    items
        .into_iter()
        .filter_map(|i| match i.unwrap() {
            TraceItem::Op(op) => Some(op),
            TraceItem::Run(_) => None,
        })
        .collect()
}

fn error(text: &str) -> TraceError {
    let (items, _) = read(text, Strictness::Strict);
    let last = items.into_iter().last().expect("an item");
    last.expect_err("must end in an error")
}

#[test]
fn headers_with_odd_comms() {
    for (task, pid) in [
        ("<...>-19711", 19711),
        ("kworker/u8:2-8619", 8619),
        ("btrfs-cleaner-23", 23),
        ("my prog-x-1-42", 42),
        ("a [1] b-7", 7),
        ("-5", 5),
    ] {
        let text = head(task, 4096, "ADD_DELAYED_EXTENT", 1)
            + &dref(
                task,
                4096,
                "ADD_DELAYED_REF",
                "0(-)",
                "5(FS_TREE)",
                "EXTENT_DATA_REF",
            );
        let got = ops(&text);
        assert_eq!(got.len(), 1, "{task}");
        assert_eq!(got[0].pid, pid, "{task}");
        assert_eq!(got[0].head_line, 1);
        assert_eq!(got[0].ref_line, Some(2));
        assert_eq!(got[0].ts_ns, 2_569_958_601_000);
    }
    // No irq/preempt flags column, nanosecond timestamps.
    let line = format!(
        "  python3-1 [000] 12.000000001: add_delayed_ref_head: {FSID}: bytenr=4096 num_bytes=16384 action=UPDATE_DELAYED_HEAD is_data=0\n"
    );
    let got = ops(&line);
    assert_eq!(got[0].ts_ns, 12_000_000_001);
}

#[test]
fn mapping_of_actions_and_keys() {
    let mut text = String::new();
    text += &head("t-1", 4096, "ADD_DELAYED_EXTENT", 1);
    text += &dref(
        "t-1",
        4096,
        "ADD_DELAYED_REF",
        "0(-)",
        "256(-)",
        "EXTENT_DATA_REF",
    );
    text += &head("t-1", 4096, "ADD_DELAYED_REF", 1);
    text += &dref(
        "t-1",
        4096,
        "ADD_DELAYED_REF",
        "65536(-)",
        "5(FS_TREE)",
        "SHARED_DATA_REF",
    );
    text += &head("t-1", 1 << 20, "DROP_DELAYED_REF", 0);
    text += &tref(
        "t-1",
        1 << 20,
        "DROP_DELAYED_REF",
        "0(-)",
        "2(EXTENT_TREE)",
        "TREE_BLOCK_REF",
    );
    text += &head("t-1", 1 << 21, "ADD_DELAYED_EXTENT", 0);
    text += &tref(
        "t-1",
        1 << 21,
        "ADD_DELAYED_REF",
        "2097152(-)",
        "18446744073709551608(TREE_RELOC)",
        "SHARED_BLOCK_REF",
    );
    text += &head("t-1", 1 << 22, "UPDATE_DELAYED_HEAD", 0);
    let got = ops(&text);
    let want_keys = [
        Some(RefKey::ExtentData {
            root: 256,
            objectid: 257,
            offset: 4096,
        }),
        Some(RefKey::SharedData { parent: 65536 }),
        Some(RefKey::TreeBlock { root: 2 }),
        Some(RefKey::SharedBlock { parent: 1 << 21 }),
        None,
    ];
    let want_actions = [
        Action::AddExtent,
        Action::AddRef,
        Action::DropRef,
        Action::AddExtent,
        Action::UpdateHead,
    ];
    assert_eq!(got.len(), 5);
    for (i, op) in got.iter().enumerate() {
        assert_eq!(op.op.key, want_keys[i], "op {i}");
        assert_eq!(op.op.action, want_actions[i], "op {i}");
    }
    assert_eq!(got[0].op.kind, ExtentKind::Data);
    assert_eq!(got[0].op.seq, 7);
    assert_eq!(got[0].op.num_bytes, 8192);
    assert_eq!(got[1].ref_root, 5, "who queued a shared ref is kept aside");
    assert_eq!(got[2].op.kind, ExtentKind::Tree { level: 1 });
    assert_eq!(got[2].op.extent_op, None);
    let reloc = got[3].op.extent_op.expect("reloc block gets FULL_BACKREF");
    assert_eq!(reloc.flags_to_set, BLOCK_FLAG_FULL_BACKREF);
    assert_eq!(got[3].ref_root, progs_tree_reloc());
    let update = got[4];
    assert_eq!(update.ref_line, None);
    assert_eq!(
        update.op.extent_op.map(|e| e.flags_to_set),
        Some(BLOCK_FLAG_FULL_BACKREF)
    );
}

fn progs_tree_reloc() -> u64 {
    crate::progs::TREE_RELOC_OBJECTID
}

#[test]
fn ops_come_in_head_order_whatever_the_ref_order() {
    let mut text = String::new();
    text += &head("a-1", 4096, "ADD_DELAYED_REF", 1); // line 1
    text += &head("b-2", 4096, "DROP_DELAYED_REF", 1); // 2
    text += &head("c-3", 1 << 20, "UPDATE_DELAYED_HEAD", 0); // 3
    text += &dref(
        "b-2",
        4096,
        "DROP_DELAYED_REF",
        "0(-)",
        "5(FS_TREE)",
        "EXTENT_DATA_REF",
    ); // 4
    text += &format!(
        "  kworker-9 [001] ..... 2570.0: run_delayed_ref_head: {FSID}: bytenr=4096 num_bytes=8192 action=0x0 is_data=1\n"
    ); // 5
    text += &dref(
        "a-1",
        4096,
        "ADD_DELAYED_REF",
        "0(-)",
        "5(FS_TREE)",
        "EXTENT_DATA_REF",
    ); // 6
    let (items, stats) = read(&text, Strictness::Strict);
    let lines: Vec<(char, u64)> = items
        .iter()
        .map(|i| match i.as_ref().unwrap() {
            TraceItem::Op(op) => ('o', op.head_line),
            TraceItem::Run(RunEvent::Head { line, .. }) => ('r', *line),
            TraceItem::Run(RunEvent::Ref { line, .. }) => ('R', *line),
        })
        .collect();
    assert_eq!(lines, vec![('o', 1), ('o', 2), ('o', 3), ('r', 5)]);
    assert_eq!(stats.ops, 3);
    assert_eq!(stats.runs, 1);
    assert_eq!(stats.holdback_max, 4);
    assert_eq!(stats.events_of(EventType::AddHead), 3);
    assert_eq!(stats.add_ref_events(), 2);
    assert_eq!(stats.head_action(KernelAction::UpdateHead), 1);
    assert_eq!(stats.fsid.as_deref(), Some(FSID));
}

#[test]
fn run_ref_events_are_typed() {
    let text = format!(
        "  kworker/u8:0-6533    [001] .....  3852.717529: run_delayed_data_ref: {FSID}: bytenr=13631488 num_bytes=36864 action=ADD_DELAYED_REF parent=0(-) ref_root=256(-) owner=260 offset=0 type=EXTENT_DATA_REF seq=0\n\
         kworker/u8:2-12606   [001] .....  3852.800654: run_delayed_tree_ref: {FSID}: bytenr=22036480 num_bytes=16384 action=DROP_DELAYED_REF parent=0(-) ref_root=3(CHUNK_TREE) level=0 type=TREE_BLOCK_REF seq=0\n"
    );
    let (items, stats) = read(&text, Strictness::Strict);
    assert_eq!(items.len(), 2);
    match items[1].as_ref().unwrap() {
        TraceItem::Run(RunEvent::Ref {
            line,
            pid,
            op,
            ref_root,
            ..
        }) => {
            assert_eq!((*line, *pid, *ref_root), (2, 12606, 3));
            assert_eq!(op.action, Action::DropRef);
            assert_eq!(op.key, Some(RefKey::TreeBlock { root: 3 }));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stats.events_of(EventType::RunDataRef), 1);
    assert_eq!(stats.ops, 0);
}

#[test]
fn unknown_events_and_noise_are_counted() {
    let mut text = String::new();
    text += "# tracer: nop\n";
    text += &format!("  a-1 [000] ..... 1.000001: btrfs_cow_block: {FSID}: root=5\n");
    text += "\n";
    let (items, stats) = read(&text, Strictness::Strict);
    assert!(items.is_empty());
    assert_eq!(stats.unknown_events.count, 1);
    assert_eq!(stats.unknown_events.samples[0].line, 2);
    assert_eq!(stats.unparsed_lines.count, 2);
    assert_eq!(stats.unparsed_lines.samples[0].text, "# tracer: nop");
}

#[test]
fn strict_errors_carry_line_numbers() {
    let ok_head = head("a-1", 4096, "ADD_DELAYED_REF", 1);
    let ok_ref = dref(
        "a-1",
        4096,
        "ADD_DELAYED_REF",
        "0(-)",
        "5(FS_TREE)",
        "EXTENT_DATA_REF",
    );

    // Garbled number in a known event.
    let e = error(&(ok_head.clone() + &ok_ref.replace("owner=257", "owner=25x7")));
    assert!(
        matches!(e, TraceError::Malformed { line: 2, ref reason, .. } if reason.contains("owner")),
        "{e}"
    );
    assert!(e.to_string().starts_with("line 2:"), "{e}");
    // Missing field.
    let e = error(&ok_ref.replace(" seq=7", ""));
    assert!(
        matches!(e, TraceError::Malformed { line: 1, ref reason, .. } if reason.contains("seq")),
        "{e}"
    );
    // Duplicate and unknown fields, bad names in parentheses.
    assert!(matches!(
        error(&ok_ref.replace("seq=7", "seq=7 seq=7")),
        TraceError::Malformed { .. }
    ));
    assert!(matches!(
        error(&ok_ref.replace("seq=7", "seq=7 extra=1")),
        TraceError::Malformed { .. }
    ));
    assert!(matches!(
        error(&ok_ref.replace("5(FS_TREE)", "5(FS_TREE")),
        TraceError::Malformed { .. }
    ));
    assert!(matches!(
        error(&ok_ref.replace("EXTENT_DATA_REF", "TREE_BLOCK_REF")),
        TraceError::Malformed { .. }
    ));
    assert!(matches!(
        error(&ok_head.replace("ADD_DELAYED_REF", "ADD_SOMETHING")),
        TraceError::Malformed { .. }
    ));
    // Header garbled around a known event name.
    let e = error(&ok_head.replace("[001]", "[0x1]"));
    assert!(matches!(e, TraceError::Malformed { line: 1, .. }), "{e}");
    // Root-keyed backref with a parent.
    assert!(matches!(
        error(
            &(ok_head.clone()
                + &dref(
                    "a-1",
                    4096,
                    "ADD_DELAYED_REF",
                    "8192(-)",
                    "5(FS_TREE)",
                    "EXTENT_DATA_REF"
                ))
        ),
        TraceError::Malformed { line: 2, .. }
    ));
    // Invalid op: shared ref with parent 0.
    let e = error(
        &(ok_head.clone()
            + &dref(
                "a-1",
                4096,
                "ADD_DELAYED_REF",
                "0(-)",
                "5(FS_TREE)",
                "SHARED_DATA_REF",
            )),
    );
    assert!(matches!(e, TraceError::InvalidOp { line: 2, .. }), "{e}");
    // Orphan ref.
    let e = error(&ok_ref);
    assert!(
        matches!(
            e,
            TraceError::OrphanRef {
                line: 1,
                pid: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = error(&(ok_head.clone() + &ok_ref.replace("a-1", "b-2")));
    assert!(
        matches!(
            e,
            TraceError::OrphanRef {
                line: 2,
                pid: 2,
                ..
            }
        ),
        "{e}"
    );
    // Head whose ref never comes.
    let e = error(&(ok_head.clone() + &head("b-2", 8192, "UPDATE_DELAYED_HEAD", 0)));
    assert!(
        matches!(
            e,
            TraceError::HeadWithoutRef {
                head_line: 1,
                pid: 1,
                bytenr: 4096,
                eof_line: 2
            }
        ),
        "{e}"
    );
    // Second head before the ref of the first.
    let e = error(&(ok_head.clone() + &ok_head));
    assert!(
        matches!(
            e,
            TraceError::HeadBeforeRef {
                line: 2,
                head_line: 1,
                ..
            }
        ),
        "{e}"
    );
    // Mismatched pair.
    let e = error(&(ok_head.clone() + &ok_ref.replace("bytenr=4096", "bytenr=8192")));
    assert!(
        matches!(
            e,
            TraceError::PairMismatch {
                line: 2,
                head_line: 1,
                ..
            }
        ),
        "{e}"
    );
    let e = error(&(ok_head.replace("ADD_DELAYED_REF", "DROP_DELAYED_REF") + &ok_ref));
    assert!(matches!(e, TraceError::PairMismatch { .. }), "{e}");
    let e = error(&(head("a-1", 4096, "ADD_DELAYED_REF", 0) + &ok_ref));
    assert!(matches!(e, TraceError::PairMismatch { .. }), "{e}");
    // Lost events, other filesystem.
    let e = error(&(ok_head.clone() + &ok_ref + "CPU:1 [LOST 12 EVENTS]\n"));
    assert!(matches!(e, TraceError::LostEvents { line: 3, .. }), "{e}");
    let e = error(&(ok_head.clone() + &ok_ref + &ok_head.replace(FSID, "deadbeef-0000")));
    assert!(matches!(e, TraceError::OtherFsid { line: 3, .. }), "{e}");
    // Nothing after an error.
    let mut r = TraceReader::new(ok_ref.as_bytes(), TraceOptions::default());
    assert!(r.next().unwrap().is_err());
    assert!(r.next().is_none());
}

#[test]
fn lenient_mode_counts_and_continues() {
    let ok_head = head("a-1", 4096, "ADD_DELAYED_REF", 1);
    let ok_ref = dref(
        "a-1",
        4096,
        "ADD_DELAYED_REF",
        "0(-)",
        "5(FS_TREE)",
        "EXTENT_DATA_REF",
    );
    let mut text = String::new();
    text += &ok_ref; // orphan
    text += &ok_head.replace("bytenr=4096", "bytenr=40x96"); // malformed
    text += &ok_head; // waiting, then replaced
    text += &ok_head;
    text += &ok_ref; // pairs with line 4
    text += "CPU:0 [LOST 3 EVENTS]\n";
    text += &head("z-9", 1 << 20, "DROP_DELAYED_REF", 0); // never paired
    let (items, stats) = read(&text, Strictness::Lenient);
    let ops: Vec<u64> = items
        .into_iter()
        .map(|i| match i.unwrap() {
            TraceItem::Op(op) => op.head_line,
            TraceItem::Run(_) => 0,
        })
        .collect();
    assert_eq!(ops, vec![4]);
    assert_eq!(stats.orphan_refs.count, 1);
    assert_eq!(stats.malformed.count, 1);
    assert_eq!(stats.malformed.samples[0].line, 2);
    assert_eq!(stats.unpaired_heads.count, 2);
    assert_eq!(stats.lost_markers.count, 1);
    assert_eq!(stats.skipped(), 5);
}

#[test]
fn holdback_is_bounded() {
    let mut text = head("a-1", 4096, "ADD_DELAYED_REF", 1);
    let update = head("b-2", 8192, "UPDATE_DELAYED_HEAD", 0);
    for _ in 0..HOLDBACK_SLOTS_MAX {
        text += &update;
    }
    let e = error(&text);
    assert!(
        matches!(
            e,
            TraceError::HoldbackFull {
                head_line: 1,
                pid: 1,
                bytenr: 4096,
                bound: HOLDBACK_SLOTS_MAX,
                ..
            }
        ),
        "{e}"
    );
    let (items, stats) = read(&text, Strictness::Lenient);
    assert_eq!(items.len(), HOLDBACK_SLOTS_MAX);
    assert_eq!(stats.unpaired_heads.count, 1);
}

#[test]
fn truncated_zst_is_an_io_error_with_position() {
    let mut text = String::new();
    for i in 0..30000u64 {
        text += &head("a-1", 4096 * (i + 1), "ADD_DELAYED_REF", 1);
        text += &dref(
            "a-1",
            4096 * (i + 1),
            "ADD_DELAYED_REF",
            "0(-)",
            "5(FS_TREE)",
            "EXTENT_DATA_REF",
        );
    }
    let packed = zstd::encode_all(text.as_bytes(), 3).unwrap();
    let cut = packed[..packed.len() / 2].to_vec();
    let input = crate::open::from_reader(std::io::Cursor::new(cut)).unwrap();
    let mut r = TraceReader::new(input, TraceOptions::default());
    let mut n = 0;
    let err = loop {
        match r.next() {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => break e,
            None => panic!("truncated stream read to the end"),
        }
    };
    assert!(n > 0);
    assert!(
        matches!(err, TraceError::Io { line, offset, .. } if line > 1 && offset > 0),
        "{err}"
    );
}

/// Found by the `trace` property test (a `\r` inserted before the `:`
/// after the fsid): the first event's fsid was kept through `show`, which
/// drops trailing whitespace and replaces invalid UTF-8, and compared
/// with each later event's raw bytes. A capture whose fsid ends in `\r`
/// or is not UTF-8 was refused at its second event with `OtherFsid`
/// naming the same fsid twice; fsids differing only in such bytes were
/// reported under one name. They are now kept escaped and compared one
/// to one.
#[test]
fn regression_fsid_compared_byte_for_byte() {
    for fsid in [
        "1260dcc0-55e9-453f-8dbf-2e1d81813d6c\r",
        "a\u{FFFD}b",
        "x\ty",
    ] {
        let text = [
            head("a-1", 4096, "ADD_DELAYED_EXTENT", 1),
            dref(
                "a-1",
                4096,
                "ADD_DELAYED_REF",
                "0(-)",
                "5(FS_TREE)",
                "EXTENT_DATA_REF",
            ),
        ]
        .concat()
        .replace(FSID, fsid);
        let (items, stats) = read(&text, Strictness::Strict);
        assert_eq!(items.len(), 1, "{fsid:?}: {items:?}");
        assert!(items[0].is_ok(), "{fsid:?}: {items:?}");
        assert_eq!(stats.fsid, Some(fsid.as_bytes().escape_ascii().to_string()));
    }
    // Invalid UTF-8 on both lines.
    let mut raw = (head("a-1", 4096, "ADD_DELAYED_REF", 1)
        + &dref(
            "a-1",
            4096,
            "ADD_DELAYED_REF",
            "0(-)",
            "5(FS_TREE)",
            "EXTENT_DATA_REF",
        ))
        .into_bytes();
    let mut at = 0;
    while let Some(i) = raw[at..]
        .windows(FSID.len())
        .position(|w| w == FSID.as_bytes())
    {
        raw[at + i] = 0xFF;
        at += i + 1;
    }
    let mut r = TraceReader::new(&raw[..], TraceOptions::default());
    assert!(r.next().expect("an item").is_ok());
    assert_eq!(
        r.stats().fsid.as_deref(),
        Some("\\xfffafdca2-1111-2222-3333-444455556666")
    );
    // Different fsids that `show` would have printed alike are told apart.
    let text = head("a-1", 4096, "ADD_DELAYED_REF", 1)
        + &head("b-2", 4096, "ADD_DELAYED_REF", 1).replace(FSID, &format!("{FSID}\r"));
    match error(&text) {
        TraceError::OtherFsid { fsid, expected, .. } => {
            assert_eq!(expected, FSID);
            assert_eq!(fsid, format!("{FSID}\\r"));
        }
        other => panic!("{other}"),
    }
}

/// Four lines of the capture racy-1 (kernel 6.18.44): a DROP queued by one
/// worker, its node run by another worker, and the ref event printed after
/// that from the freed node, whose seq is a slab freelist pointer.
const REF_AFTER_RUN: &str = "   kworker/u8:10-7968    [001] ...1.  1341.343673: add_delayed_ref_head: c8c10eec-1451-4cc1-9a9f-4b04ae85e1e9: bytenr=994705408 num_bytes=16384 action=DROP_DELAYED_REF is_data=0
    kworker/u8:5-7641    [000] .....  1341.343765: run_delayed_tree_ref: c8c10eec-1451-4cc1-9a9f-4b04ae85e1e9: bytenr=994705408 num_bytes=16384 action=DROP_DELAYED_REF parent=0(-) ref_root=256(-) level=0 type=TREE_BLOCK_REF seq=2
    kworker/u8:5-7641    [000] .....  1341.343768: run_delayed_ref_head: c8c10eec-1451-4cc1-9a9f-4b04ae85e1e9: bytenr=994705408 num_bytes=16384 action=0x0 is_data=0
   kworker/u8:10-7968    [001] .....  1341.343814: add_delayed_tree_ref: c8c10eec-1451-4cc1-9a9f-4b04ae85e1e9: bytenr=994705408 num_bytes=16384 action=DROP_DELAYED_REF parent=0(-) ref_root=256(-) level=0 type=TREE_BLOCK_REF seq=7398869659294574876
";

/// Regression: the strict reader refused racy-1 at its line 4242546 ("seq
/// 7398869659294574876 above the maximum"); the op is the DROP with the
/// seq its run event printed.
#[test]
fn regression_ref_printed_after_its_node_ran_takes_the_runs_seq() {
    let (items, stats) = read(REF_AFTER_RUN, Strictness::Strict);
    let ops: Vec<TracedOp> = items
        .into_iter()
        .filter_map(|i| match i.unwrap() {
            TraceItem::Op(op) => Some(op),
            TraceItem::Run(_) => None,
        })
        .collect();
    assert_eq!(ops.len(), 1);
    let op = ops[0].op;
    assert_eq!(
        (op.bytenr, op.action, op.key, op.seq),
        (
            994705408,
            Action::DropRef,
            Some(RefKey::TreeBlock { root: 256 }),
            2
        )
    );
    assert_eq!((ops[0].head_line, ops[0].ref_line), (1, Some(4)));
    assert_eq!((stats.seq_from_run, stats.runs), (1, 2));
}

/// Only the run of the same node lends its seq: without one (here the run
/// event names another root) the garbage seq is still an invalid op.
#[test]
fn a_seq_above_the_maximum_without_a_run_of_its_node_is_refused() {
    let text = REF_AFTER_RUN.replacen("ref_root=256(-) level=0", "ref_root=257(-) level=0", 1);
    let e = error(&text);
    assert!(
        e.to_string().contains("line 4") && e.to_string().contains("7398869659294574876"),
        "{e}"
    );
    let no_run: String = REF_AFTER_RUN
        .lines()
        .filter(|l| !l.contains("run_delayed"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(error(&no_run).to_string().contains("above the maximum"));
}
