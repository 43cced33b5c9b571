//! The `key=value` fields of the head and ref events, each checked once:
//! every field known, present and given once.

use memchr::memchr;
use refd_core::model::{ExtentKind, RefKey};

use crate::lex::{self, parse_u64};

use super::KernelAction;

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
pub(super) enum RefType {
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

    pub(super) fn is_data(self) -> bool {
        matches!(self, RefType::ExtentData | RefType::SharedData)
    }
}

/// Fields of a head event.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeadFields {
    pub(super) bytenr: u64,
    pub(super) num_bytes: u64,
    /// `None` for the run event's `action=0x0`.
    pub(super) action: Option<KernelAction>,
    pub(super) is_data: bool,
}

/// Fields of a tree or data ref event.
#[derive(Clone, Copy, Debug)]
pub(super) struct RefFields {
    pub(super) bytenr: u64,
    pub(super) num_bytes: u64,
    pub(super) action: KernelAction,
    pub(super) parent: u64,
    pub(super) ref_root: u64,
    /// Tree events.
    pub(super) level: u8,
    /// Data events.
    pub(super) owner: u64,
    /// Data events.
    pub(super) offset: u64,
    pub(super) ref_type: RefType,
    pub(super) seq: u64,
}

/// Result of parsing the fields of an event: the reason names the field.
type FieldResult<T> = Result<T, String>;

fn bad(field: &str) -> String {
    format!("bad or missing field '{field}'")
}

pub(super) fn parse_head_fields(fields: &[u8], run: bool) -> FieldResult<HeadFields> {
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

pub(super) fn parse_ref_fields(fields: &[u8], data: bool) -> FieldResult<RefFields> {
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
    pub(super) fn key(&self) -> RefKey {
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

    pub(super) fn kind(&self) -> ExtentKind {
        if self.ref_type.is_data() {
            ExtentKind::Data
        } else {
            ExtentKind::Tree { level: self.level }
        }
    }
}
