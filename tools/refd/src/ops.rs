//! A SUBMIT's 56-byte wire ops into validated [`Op`]s: the wire's own
//! rules (kind byte, reserved bytes, fields an op does not use) first,
//! then the model's ([`RawOp::validate`]); every refusal is an
//! `INVALID_OP` subcode (`docs/protocol.md`, "Errors").

use refd_core::model::{DiskKey, OpError, RawOp, EXTENT_DATA_REF_KEY, EXTENT_OP_FLAGS_SETTABLE};
use refd_core::model::{Op, SHARED_BLOCK_REF_KEY, SHARED_DATA_REF_KEY};
use refd_proto::{OpErrorCode, WireOp, EOP_FLAGS_KNOWN, EOP_FULL_BACKREF, EOP_KEY, KIND_DATA};

/// Why a wire op is invalid: its subcode and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The `INVALID_OP` subcode.
    pub code: OpErrorCode,
    /// What is wrong, for the error frame's message.
    pub message: String,
}

fn invalid(code: OpErrorCode, message: String) -> Invalid {
    Invalid { code, message }
}

/// The validated op of `w`.
pub fn validate(w: &WireOp) -> Result<Op, Invalid> {
    let b = w.bytenr;
    if w.reserved != 0 {
        return Err(invalid(
            OpErrorCode::ReservedNonzero,
            format!("extent {b}: reserved op bytes are {:#x}", w.reserved),
        ));
    }
    if w.kind > KIND_DATA {
        return Err(invalid(
            OpErrorCode::BadKind,
            format!(
                "extent {b}: kind {} is neither 0 (tree) nor 1 (data)",
                w.kind
            ),
        ));
    }
    if w.eop_flags & !EOP_FLAGS_KNOWN != 0 {
        return Err(invalid(
            OpErrorCode::BadExtentOpFlags,
            format!("extent {b}: unknown eop_flags bits {:#x}", w.eop_flags),
        ));
    }
    let is_data = w.kind == KIND_DATA;
    let has_key = w.eop_flags & EOP_KEY != 0;
    if has_key && is_data {
        return Err(invalid(
            OpErrorCode::KeyOnData,
            format!("extent {b}: an extent_op key on a data extent"),
        ));
    }
    let stray = |what: &str| {
        invalid(
            OpErrorCode::StrayFields,
            format!("extent {b}: {what} must be 0 for this op"),
        )
    };
    if is_data && w.level != 0 {
        return Err(stray("level"));
    }
    if !has_key && w.key_type != 0 {
        return Err(stray("key_type"));
    }
    let data_ref = w.ref_type == EXTENT_DATA_REF_KEY;
    if !data_ref && !has_key && (w.k2 != 0 || w.k3 != 0) {
        return Err(stray("k2/k3"));
    }
    let shared = matches!(w.ref_type, SHARED_BLOCK_REF_KEY | SHARED_DATA_REF_KEY);
    let raw = RawOp {
        bytenr: w.bytenr,
        num_bytes: w.num_bytes,
        action: w.action,
        is_data,
        level: w.level,
        ref_type: w.ref_type,
        root: if shared { 0 } else { w.k1 },
        parent: if shared { w.k1 } else { 0 },
        objectid: if data_ref { w.k2 } else { 0 },
        offset: if data_ref { w.k3 } else { 0 },
        seq: w.seq,
        flags_to_set: if w.eop_flags & EOP_FULL_BACKREF != 0 {
            EXTENT_OP_FLAGS_SETTABLE
        } else {
            0
        },
        key: has_key.then_some(DiskKey {
            objectid: w.k2,
            item_type: w.key_type,
            offset: w.k3,
        }),
    };
    raw.validate()
        .map_err(|e| invalid(subcode(&e), e.to_string()))
}

/// The wire subcode of a model refusal.
pub fn subcode(e: &OpError) -> OpErrorCode {
    match e {
        OpError::ZeroNumBytes { .. } => OpErrorCode::ZeroNumBytes,
        OpError::RangeOverflow { .. } => OpErrorCode::RangeOverflow,
        OpError::LevelOutOfRange { .. } => OpErrorCode::LevelOutOfRange,
        OpError::SeqOutOfRange { .. } => OpErrorCode::SeqOutOfRange,
        OpError::UnknownAction { .. } => OpErrorCode::UnknownAction,
        // A reference op without a known type has no key at all.
        OpError::UnknownRefType { .. } | OpError::MissingKey { .. } => OpErrorCode::UnknownRefType,
        OpError::KindMismatch { .. } => OpErrorCode::KindMismatch,
        OpError::MissingRoot { .. } => OpErrorCode::MissingRoot,
        OpError::MissingParent { .. } => OpErrorCode::MissingParent,
        OpError::UpdateHeadWithKey { .. } => OpErrorCode::UpdateHeadWithKey,
        OpError::MissingExtentOp { .. } => OpErrorCode::MissingExtentOp,
        OpError::UnexpectedExtentOp { .. } => OpErrorCode::UnexpectedExtentOp,
        OpError::BadExtentOpFlags { .. } => OpErrorCode::BadExtentOpFlags,
        OpError::KeyOnData { .. } => OpErrorCode::KeyOnData,
        // k1 is the root or the parent, never both: only stray fields.
        OpError::StrayDataFields { .. } | OpError::ParentAndRoot { .. } => OpErrorCode::StrayFields,
    }
}

/// The wire op of `op` (for tests and tools: `validate(&wire(op)) == op`).
pub fn wire(op: &Op) -> WireOp {
    let raw = RawOp::from(op);
    let shared = matches!(raw.ref_type, SHARED_BLOCK_REF_KEY | SHARED_DATA_REF_KEY);
    let (k2, k3) = match raw.key {
        Some(k) => (k.objectid, k.offset),
        None => (raw.objectid, raw.offset),
    };
    let mut eop_flags = 0;
    if raw.flags_to_set != 0 {
        eop_flags |= EOP_FULL_BACKREF;
    }
    if raw.key.is_some() {
        eop_flags |= EOP_KEY;
    }
    WireOp {
        bytenr: raw.bytenr,
        num_bytes: raw.num_bytes,
        seq: raw.seq,
        k1: if shared { raw.parent } else { raw.root },
        k2,
        k3,
        action: raw.action,
        ref_type: raw.ref_type,
        kind: u8::from(raw.is_data),
        level: if raw.is_data { 0 } else { raw.level },
        eop_flags,
        key_type: raw.key.map_or(0, |k| k.item_type),
        reserved: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refd_core::model::{Action, ExtentKind, ExtentOp, RefKey};

    fn ops() -> Vec<Op> {
        let tree = ExtentKind::Tree { level: 3 };
        vec![
            Op::new(
                1 << 20,
                4096,
                ExtentKind::Data,
                Action::AddRef,
                RefKey::ExtentData {
                    root: 5,
                    objectid: 257,
                    offset: 8192,
                },
                9,
            )
            .unwrap(),
            Op::new(
                2 << 20,
                4096,
                ExtentKind::Data,
                Action::DropRef,
                RefKey::SharedData { parent: 77 },
                0,
            )
            .unwrap(),
            Op::new(
                3 << 20,
                16384,
                tree,
                Action::AddExtent,
                RefKey::TreeBlock { root: 2 },
                0,
            )
            .unwrap()
            .with_extent_op(ExtentOp {
                flags_to_set: EXTENT_OP_FLAGS_SETTABLE,
                key: Some(DiskKey {
                    objectid: 256,
                    item_type: 1,
                    offset: 0,
                }),
            })
            .unwrap(),
            Op::new(
                4 << 20,
                16384,
                tree,
                Action::AddRef,
                RefKey::SharedBlock { parent: 9 },
                0,
            )
            .unwrap(),
            Op::update_head(
                5 << 20,
                16384,
                tree,
                ExtentOp {
                    flags_to_set: 0,
                    key: Some(DiskKey {
                        objectid: 1,
                        item_type: 84,
                        offset: 2,
                    }),
                },
            )
            .unwrap(),
        ]
    }

    #[test]
    fn every_kind_of_op_round_trips() {
        for op in ops() {
            let w = wire(&op);
            assert_eq!(validate(&w), Ok(op), "{w:?}");
            // And through the 56 bytes.
            assert_eq!(validate(&WireOp::decode(&w.encode())), Ok(op));
        }
    }

    #[test]
    fn wire_rules_have_their_subcodes() {
        let good = wire(&ops()[0]);
        let cases: Vec<(WireOp, OpErrorCode)> = vec![
            (
                WireOp {
                    reserved: 1,
                    ..good
                },
                OpErrorCode::ReservedNonzero,
            ),
            (WireOp { kind: 2, ..good }, OpErrorCode::BadKind),
            (
                WireOp {
                    eop_flags: 4,
                    ..good
                },
                OpErrorCode::BadExtentOpFlags,
            ),
            (
                WireOp {
                    eop_flags: EOP_KEY,
                    ..good
                },
                OpErrorCode::KeyOnData,
            ),
            (WireOp { level: 1, ..good }, OpErrorCode::StrayFields),
            (
                WireOp {
                    key_type: 1,
                    ..good
                },
                OpErrorCode::StrayFields,
            ),
            (
                WireOp {
                    num_bytes: 0,
                    ..good
                },
                OpErrorCode::ZeroNumBytes,
            ),
            (
                WireOp {
                    num_bytes: u64::MAX,
                    ..good
                },
                OpErrorCode::RangeOverflow,
            ),
            (
                WireOp {
                    seq: 1 << 56,
                    ..good
                },
                OpErrorCode::SeqOutOfRange,
            ),
            (WireOp { action: 9, ..good }, OpErrorCode::UnknownAction),
            (
                WireOp {
                    ref_type: 1,
                    k2: 0,
                    k3: 0,
                    ..good
                },
                OpErrorCode::UnknownRefType,
            ),
            (
                WireOp {
                    ref_type: 176,
                    k2: 0,
                    k3: 0,
                    ..good
                },
                OpErrorCode::KindMismatch,
            ),
            (WireOp { k1: 0, ..good }, OpErrorCode::MissingRoot),
        ];
        for (w, code) in cases {
            assert_eq!(validate(&w).map_err(|e| e.code), Err(code), "{w:?}");
        }
        let tree = wire(&ops()[3]);
        let cases: Vec<(WireOp, OpErrorCode)> = vec![
            (WireOp { k1: 0, ..tree }, OpErrorCode::MissingParent),
            (WireOp { k2: 3, ..tree }, OpErrorCode::StrayFields),
            (WireOp { level: 8, ..tree }, OpErrorCode::LevelOutOfRange),
            (
                WireOp {
                    eop_flags: EOP_FULL_BACKREF,
                    ..tree
                },
                OpErrorCode::UnexpectedExtentOp,
            ),
        ];
        for (w, code) in cases {
            assert_eq!(validate(&w).map_err(|e| e.code), Err(code), "{w:?}");
        }
        let update = wire(&ops()[4]);
        let cases: Vec<(WireOp, OpErrorCode)> = vec![
            (
                WireOp {
                    eop_flags: 0,
                    k2: 0,
                    k3: 0,
                    key_type: 0,
                    ..update
                },
                OpErrorCode::MissingExtentOp,
            ),
            (WireOp { k1: 5, ..update }, OpErrorCode::UpdateHeadWithKey),
            (
                WireOp {
                    ref_type: 176,
                    ..update
                },
                OpErrorCode::UpdateHeadWithKey,
            ),
        ];
        for (w, code) in cases {
            assert_eq!(validate(&w).map_err(|e| e.code), Err(code), "{w:?}");
        }
    }
}
