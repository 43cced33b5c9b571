use super::*;
use refd_client::refd_proto::{
    EOP_FULL_BACKREF, EOP_KEY, REF_TYPE_EXTENT_DATA, REF_TYPE_SHARED_BLOCK, REF_TYPE_SHARED_DATA,
    REF_TYPE_TREE_BLOCK,
};

fn text(line: &str) -> WireOp {
    parse_text_line(line)
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
        .unwrap_or_else(|| panic!("{line:?}: no op"))
}

fn text_err(line: &str) -> OpError {
    match parse_text_line(line) {
        Err(e) => e,
        Ok(op) => panic!("{line:?} parsed: {op:?}"),
    }
}

fn read_all(file: &str) -> Result<Vec<(u64, WireOp)>, LineError> {
    OpReader::new(file.as_bytes()).collect()
}

const KEY: ExtentOpKey = ExtentOpKey {
    objectid: 256,
    key_type: 84,
    offset: 9,
};

#[test]
fn every_action_on_every_kind() {
    for (word, action) in [
        ("add", ACTION_ADD_REF),
        ("drop", ACTION_DROP_REF),
        ("alloc", ACTION_ADD_EXTENT),
    ] {
        let d = text(&format!(
            "{word} data bytenr=1048576 num_bytes=4096 root=5 objectid=257 offset=8192"
        ));
        assert_eq!(
            d,
            WireOp::data_ref(action, 1048576, 4096, 5, 257, 8192),
            "{word}"
        );
        assert_eq!((d.ref_type, d.kind), (REF_TYPE_EXTENT_DATA, KIND_DATA));
        let t = text(&format!(
            "{word} tree bytenr=0x4000000 num_bytes=16384 root=5 level=1"
        ));
        assert_eq!(t, WireOp::tree_ref(action, 0x4000000, 16384, 5, 1));
        assert_eq!(t.ref_type, REF_TYPE_TREE_BLOCK);
        let sd = text(&format!(
            "{word} shared-data bytenr=8192 num_bytes=4096 parent=0x30000"
        ));
        assert_eq!(sd, WireOp::shared_data_ref(action, 8192, 4096, 0x30000));
        assert_eq!(sd.ref_type, REF_TYPE_SHARED_DATA);
        let sb = text(&format!(
            "{word} shared_block bytenr=16384 num-bytes=16384 parent=77 level=2"
        ));
        assert_eq!(sb, WireOp::shared_tree_ref(action, 16384, 16384, 77, 2));
        assert_eq!(sb.ref_type, REF_TYPE_SHARED_BLOCK);
    }
}

#[test]
fn seq_extent_ops_and_updates() {
    let op = text("add data bytenr=1 num_bytes=2 root=5 objectid=6 offset=7 seq=42");
    assert_eq!(op.seq, 42);
    let alloc =
        text("alloc tree bytenr=4096 num_bytes=16384 root=5 level=0 full_backref key=256,84,9");
    assert_eq!(
        alloc,
        WireOp::tree_ref(ACTION_ADD_EXTENT, 4096, 16384, 5, 0).with_extent_op(true, Some(KEY))
    );
    assert_eq!(alloc.eop_flags, EOP_FULL_BACKREF | EOP_KEY);
    let alloc_shared =
        text("alloc shared-block bytenr=4096 num_bytes=16384 parent=8 level=1 full_backref=1");
    assert_eq!(alloc_shared.eop_flags, EOP_FULL_BACKREF);
    let plain_alloc =
        text("alloc tree bytenr=4096 num_bytes=16384 root=5 level=0 full_backref=false");
    assert_eq!(plain_alloc.eop_flags, 0);
    let up = text("update tree bytenr=4096 num_bytes=16384 level=3 full_backref key=256,84,9");
    assert_eq!(
        up,
        WireOp::update_head(4096, 16384, KIND_TREE_BLOCK, 3, true, Some(KEY))
    );
    let up_key = text("update tree bytenr=4096 num_bytes=16384 level=0 key=0x100,84,0x9 seq=3");
    assert_eq!(
        up_key,
        WireOp::update_head(4096, 16384, KIND_TREE_BLOCK, 0, false, Some(KEY)).with_seq(3)
    );
    let up_data = text("update data bytenr=8192 num_bytes=4096 full_backref");
    assert_eq!(
        up_data,
        WireOp::update_head(8192, 4096, KIND_DATA, 0, true, None)
    );
}

#[test]
fn blank_comments_and_trailing_comments() {
    assert_eq!(parse_text_line("").unwrap(), None);
    assert_eq!(parse_text_line("   \t").unwrap(), None);
    assert_eq!(parse_text_line("# a comment").unwrap(), None);
    let op = text("  drop tree bytenr=1 num_bytes=2 root=3 level=0   # dropped by snapshot delete");
    assert_eq!(op.action, ACTION_DROP_REF);
}

#[test]
fn shape_errors_name_the_field() {
    use OpError::*;
    assert_eq!(text_err("frob data"), UnknownAction("frob".into()));
    assert_eq!(text_err("add"), MissingKind);
    assert_eq!(text_err("add blob"), UnknownKind("blob".into()));
    assert!(matches!(
        text_err("add data bytenr=1 num_bytes=2 root=5 objectid=6"),
        Missing {
            field: Field::Offset,
            action: OpAction::Add,
            kind: OpKind::Data
        }
    ));
    assert!(matches!(
        text_err("add tree bytenr=1 num_bytes=2 root=5"),
        Missing {
            field: Field::Level,
            ..
        }
    ));
    assert!(matches!(
        text_err("drop shared-data num_bytes=2 parent=5"),
        Missing {
            field: Field::Bytenr,
            ..
        }
    ));
    assert!(matches!(
        text_err("add tree bytenr=1 num_bytes=2 root=5 level=0 parent=9"),
        NotAllowed {
            field: Field::Parent,
            ..
        }
    ));
    assert!(matches!(
        text_err("add data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0 level=0"),
        NotAllowed {
            field: Field::Level,
            ..
        }
    ));
}

#[test]
fn extent_op_placement_and_tokens() {
    use OpError::*;
    // extent_ops only on a tree-block alloc and on update; keys only on tree blocks.
    assert!(matches!(
        text_err("add tree bytenr=1 num_bytes=2 root=5 level=0 full_backref"),
        NotAllowed {
            field: Field::FullBackref,
            action: OpAction::Add,
            ..
        }
    ));
    assert!(matches!(
        text_err("alloc data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0 key=1,2,3"),
        NotAllowed {
            field: Field::Key,
            ..
        }
    ));
    assert!(matches!(
        text_err("update data bytenr=1 num_bytes=2 key=1,2,3"),
        NotAllowed {
            field: Field::Key,
            ..
        }
    ));
    assert!(matches!(
        text_err("update tree bytenr=1 num_bytes=2 level=0 root=5 full_backref"),
        NotAllowed {
            field: Field::Root,
            ..
        }
    ));
    assert_eq!(
        text_err("update tree bytenr=1 num_bytes=2 level=0"),
        UpdateWithoutExtentOp
    );
    assert_eq!(
        text_err("update shared-block bytenr=1 num_bytes=2 parent=3 level=0 full_backref"),
        UpdateKind(OpKind::SharedBlock)
    );
    assert_eq!(
        text_err("add data bytenr=1 bytenr=2"),
        Duplicate(Field::Bytenr)
    );
    assert_eq!(
        text_err("add data bytenr=1 frobs=2"),
        UnknownField("frobs".into())
    );
    assert_eq!(text_err("add data bytenr=1 root"), BadToken("root".into()));
    assert_eq!(text_err("add data bytenr=1 what"), BadToken("what".into()));
}

#[test]
fn value_errors() {
    for (line, field) in [
        ("add data bytenr=x num_bytes=1", Field::Bytenr),
        ("add data bytenr=-1", Field::Bytenr),
        ("add data bytenr=+1", Field::Bytenr),
        ("add data bytenr=0x", Field::Bytenr),
        ("add data bytenr=18446744073709551616", Field::Bytenr),
        ("add tree level=256", Field::Level),
        ("alloc tree key=1,2", Field::Key),
        ("alloc tree key=1,256,3", Field::Key),
        ("alloc tree key=1,2,3,4", Field::Key),
        ("alloc tree full_backref=maybe", Field::FullBackref),
    ] {
        match text_err(line) {
            OpError::BadValue { field: f, .. } => assert_eq!(f, field, "{line}"),
            other => panic!("{line}: {other:?}"),
        }
    }
    // Values are the daemon's to judge: these parse.
    let op = text("add tree bytenr=0xffffffffffffffff num_bytes=0 root=0 level=9");
    assert_eq!(
        (op.bytenr, op.num_bytes, op.k1, op.level),
        (u64::MAX, 0, 0, 9)
    );
}

#[test]
fn messages_as_file_fields_and_as_flags() {
    let e = text_err("add data bytenr=1 root=5 objectid=6 offset=0");
    assert_eq!(e.to_string(), "missing num_bytes (required by add data)");
    assert_eq!(e.with_flags(), "missing --num-bytes (required by add data)");
    let e = text_err("update tree bytenr=1 num_bytes=2 level=0");
    assert_eq!(e.with_flags(), "update needs --full-backref and/or --key");
}

#[test]
fn json_lines() {
    let op = parse_json_line(
        r#"{"op":"add","kind":"data","bytenr":1048576,"num_bytes":4096,"root":5,"objectid":257,"offset":0}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        op,
        WireOp::data_ref(ACTION_ADD_REF, 1048576, 4096, 5, 257, 0)
    );
    let op = parse_json_line(
        r#"{"action":"alloc","kind":"tree","bytenr":"0x1000","num-bytes":16384,"root":"5","level":1,"full_backref":true,"key":[256,84,9],"seq":7}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        op,
        WireOp::tree_ref(ACTION_ADD_EXTENT, 0x1000, 16384, 5, 1)
            .with_extent_op(true, Some(KEY))
            .with_seq(7)
    );
    let op = parse_json_line(
        r#"{"op":"update","kind":"tree","bytenr":1,"num_bytes":2,"level":0,"key":"256,84,9"}"#,
    )
    .unwrap()
    .unwrap();
    assert_eq!(op.extent_op_key(), Some(KEY));
    assert_eq!(parse_json_line("  ").unwrap(), None);
    for (line, want) in [
        (r#"{"kind":"data"}"#, OpError::MissingAction),
        (r#"{"op":"add"}"#, OpError::MissingKind),
        (
            r#"{"op":"add","kind":"data","rooot":1}"#,
            OpError::UnknownField("rooot".into()),
        ),
    ] {
        assert_eq!(parse_json_line(line).unwrap_err(), want, "{line}");
    }
    for line in [
        "[1,2]",
        "{not json",
        r#"{"op":1,"kind":"data"}"#,
        r#"{"op":"add","action":"drop","kind":"data"}"#,
    ] {
        assert!(
            matches!(parse_json_line(line), Err(OpError::Json(_))),
            "{line}"
        );
    }
    for line in [
        r#"{"op":"add","kind":"data","bytenr":-1}"#,
        r#"{"op":"add","kind":"data","bytenr":1.5}"#,
        r#"{"op":"add","kind":"data","bytenr":null}"#,
        r#"{"op":"alloc","kind":"tree","full_backref":1}"#,
    ] {
        assert!(
            matches!(parse_json_line(line), Err(OpError::BadValue { .. })),
            "{line}"
        );
    }
}

#[test]
fn reader_counts_lines_and_detects_the_form() {
    let file = "# ops\n\nadd data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0\r\n  \ndrop tree bytenr=4096 num_bytes=16384 root=5 level=0";
    let mut r = OpReader::new(file.as_bytes());
    let ops: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(ops.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [3, 5]);
    assert_eq!(ops[1].1.action, ACTION_DROP_REF);
    assert_eq!(r.format(), Some(OpFormat::Text));
    assert_eq!(r.lines_read(), 5);

    let json = "\n  \n{\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":1,\"num_bytes\":2,\"parent\":3}\n# a note\n{\"op\":\"drop\",\"kind\":\"shared-data\",\"bytenr\":1,\"num_bytes\":2,\"parent\":3}\n";
    let mut r = OpReader::new(json.as_bytes());
    let ops: Vec<_> = r.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(ops.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [3, 5]);
    assert_eq!(r.format(), Some(OpFormat::JsonLines));

    // Once JSON, always JSON.
    let mixed = "{\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":1,\"num_bytes\":2,\"parent\":3}\nadd data bytenr=1\n";
    let e = read_all(mixed).unwrap_err();
    assert_eq!(e.line, 2);
    assert!(matches!(e.error, OpError::Json(_)));
    assert!(read_all("").unwrap().is_empty());
    assert!(read_all("\n# nothing\n").unwrap().is_empty());
}

#[test]
fn reader_errors_carry_the_line_and_end_the_stream() {
    let file = "add data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0\n\nadd data bytenr=1 num_bytes=2 root=5\nadd data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0\n";
    let mut r = OpReader::new(file.as_bytes());
    assert_eq!(r.next().unwrap().unwrap().0, 1);
    let e = r.next().unwrap().unwrap_err();
    assert_eq!(e.line, 3);
    assert_eq!(
        e.to_string(),
        "line 3: missing objectid (required by add data)"
    );
    assert!(r.next().is_none(), "the first error ends the stream");
}

#[test]
fn long_lines_and_bad_bytes() {
    let ok = format!(
        "add data bytenr=1 num_bytes=2 root=5 objectid=6 offset=0{}\n",
        " ".repeat(LINE_BYTES_MAX - 56)
    );
    assert_eq!(ok.len(), LINE_BYTES_MAX + 1);
    assert_eq!(read_all(&ok).unwrap().len(), 1);
    let long = format!("{}x\n", " ".repeat(LINE_BYTES_MAX));
    let file = format!("# one\n{long}");
    let e = read_all(&file).unwrap_err();
    assert_eq!((e.line, e.error), (2, OpError::LineTooLong));
    let e = OpReader::new(&b"\xff\xfe\n"[..])
        .next()
        .unwrap()
        .unwrap_err();
    assert_eq!((e.line, e.error), (1, OpError::NotUtf8));
}

#[test]
fn numbers_and_keys() {
    assert_eq!(parse_u64("0"), Some(0));
    assert_eq!(parse_u64("0x10"), Some(16));
    assert_eq!(parse_u64("0XfF"), Some(255));
    assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
    for bad in ["", "x", "0x", "+5", "0x+5", "1e3", " 1"] {
        assert_eq!(parse_u64(bad), None, "{bad:?}");
    }
    assert_eq!(parse_key("256, 84, 9").unwrap(), KEY);
    assert!(parse_key("256,84").is_err());
}
