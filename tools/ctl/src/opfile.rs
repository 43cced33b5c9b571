//! Ops as text: the vocabulary of `refctl add|drop|alloc|update` flags,
//! written one op per line for `refctl submit`, as plain text or as JSON
//! lines (see [`GRAMMAR`]).
//!
//! One builder, [`OpSpec::build`], turns the fields of an op into a
//! [`WireOp`] for both the flags and the file, so the two cannot drift.
//! It checks the op's *shape* (which fields an action and kind take, and
//! that the required ones are there); the *values* (`num_bytes` > 0, level
//! ≤ 7, a non-zero root, seq range, overflow) are left to the daemon,
//! which is the one authority on op validity and answers a bad value with
//! `INVALID_OP` naming the op (refctl maps it back to the file line).
//!
//! [`OpReader`] streams a file: one line at a time, each at most
//! [`LINE_BYTES_MAX`] bytes, so memory does not grow with the file.

use std::fmt;
use std::io::{BufRead, Read};

use refd_client::refd_proto::{KIND_DATA, KIND_TREE_BLOCK};
use refd_client::{
    ExtentOpKey, WireOp, ACTION_ADD_EXTENT, ACTION_ADD_REF, ACTION_DROP_REF, ACTION_UPDATE_HEAD,
};

/// Longest line of an op file, newline excluded.
pub const LINE_BYTES_MAX: usize = 4096;

/// The op file grammar, for `refctl submit --help` (the README has the
/// same text).
pub const GRAMMAR: &str = "\
OP FILE GRAMMAR (one op per line; blank lines and lines starting with # are skipped)

  ACTION KIND FIELD=VALUE ...

  ACTION  add | drop | alloc (ADD_EXTENT) | update (UPDATE_HEAD)
  KIND    data          needs root= objectid= offset=      (EXTENT_DATA_REF, 178)
          tree          needs root= level=                 (TREE_BLOCK_REF, 176)
          shared-data   needs parent=                      (SHARED_DATA_REF, 184)
          shared-block  needs parent= level=               (SHARED_BLOCK_REF, 182)
          update takes data, or tree with level=, and no root/parent/objectid/offset
  FIELDS  bytenr= num_bytes=        required on every op
          seq=S                     optional (tree-mod-log seq, default 0)
          full_backref              alloc of tree/shared-block, and update (FULL_BACKREF)
          key=OBJECTID,TYPE,OFFSET  alloc of tree/shared-block, and update tree (new first key)
          update needs full_backref and/or key.

  Numbers are decimal or 0x-hex; '-' and '_' are the same in names
  (num-bytes = num_bytes); a token starting with # ends the line.
  Example:
    alloc data bytenr=1048576 num_bytes=4096 root=5 objectid=257 offset=0
    add tree bytenr=0x4000000 num_bytes=16384 root=5 level=1 seq=3
    update tree bytenr=0x4000000 num_bytes=16384 level=1 full_backref key=256,84,0

  JSON lines instead (detected when the first op line starts with '{'):
  one object per line, \"op\" and \"kind\" as above, the fields by the same
  names; numbers as JSON integers or strings, full_backref a boolean, key a
  string \"OBJECTID,TYPE,OFFSET\" or an array [OBJECTID, TYPE, OFFSET]:
    {\"op\":\"add\",\"kind\":\"data\",\"bytenr\":1048576,\"num_bytes\":4096,\"root\":5,\"objectid\":257,\"offset\":0}
";

/// What an op does (the SUBMIT `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpAction {
    /// `ADD_REF`.
    Add,
    /// `DROP_REF`.
    Drop,
    /// `ADD_EXTENT`: allocation, creates the extent item.
    Alloc,
    /// `UPDATE_HEAD`: an extent_op only.
    Update,
}

impl OpAction {
    /// The word of the grammar.
    pub fn name(self) -> &'static str {
        match self {
            OpAction::Add => "add",
            OpAction::Drop => "drop",
            OpAction::Alloc => "alloc",
            OpAction::Update => "update",
        }
    }

    fn parse(word: &str) -> Result<OpAction, OpError> {
        Ok(match word {
            "add" => OpAction::Add,
            "drop" => OpAction::Drop,
            "alloc" => OpAction::Alloc,
            "update" => OpAction::Update,
            _ => return Err(OpError::UnknownAction(word.to_owned())),
        })
    }

    fn wire(self) -> u8 {
        match self {
            OpAction::Add => ACTION_ADD_REF,
            OpAction::Drop => ACTION_DROP_REF,
            OpAction::Alloc => ACTION_ADD_EXTENT,
            OpAction::Update => ACTION_UPDATE_HEAD,
        }
    }
}

/// Which backref an op names (for `update`: only data or tree, the
/// extent's kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// `EXTENT_DATA_REF` (178): root, objectid, offset.
    Data,
    /// `TREE_BLOCK_REF` (176): root, level.
    Tree,
    /// `SHARED_DATA_REF` (184): parent.
    SharedData,
    /// `SHARED_BLOCK_REF` (182): parent, level.
    SharedBlock,
}

impl OpKind {
    /// The word of the grammar.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Data => "data",
            OpKind::Tree => "tree",
            OpKind::SharedData => "shared-data",
            OpKind::SharedBlock => "shared-block",
        }
    }

    fn parse(word: &str) -> Result<OpKind, OpError> {
        Ok(match normalize(word).as_str() {
            "data" => OpKind::Data,
            "tree" => OpKind::Tree,
            "shared_data" => OpKind::SharedData,
            "shared_block" => OpKind::SharedBlock,
            _ => return Err(OpError::UnknownKind(word.to_owned())),
        })
    }

    fn is_tree_block(self) -> bool {
        matches!(self, OpKind::Tree | OpKind::SharedBlock)
    }
}

/// A field of an op, by its name in the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    /// Extent address.
    Bytenr,
    /// Extent size.
    NumBytes,
    /// Tree-mod-log seq.
    Seq,
    /// Root (data, tree).
    Root,
    /// Inode (data).
    Objectid,
    /// File offset (data).
    Offset,
    /// Parent tree block (shared kinds).
    Parent,
    /// Tree block level.
    Level,
    /// extent_op sets FULL_BACKREF.
    FullBackref,
    /// extent_op new first key.
    Key,
}

impl Field {
    const ALL: [Field; 10] = [
        Field::Bytenr,
        Field::NumBytes,
        Field::Seq,
        Field::Root,
        Field::Objectid,
        Field::Offset,
        Field::Parent,
        Field::Level,
        Field::FullBackref,
        Field::Key,
    ];

    /// The name in the grammar (`num_bytes`).
    pub fn name(self) -> &'static str {
        match self {
            Field::Bytenr => "bytenr",
            Field::NumBytes => "num_bytes",
            Field::Seq => "seq",
            Field::Root => "root",
            Field::Objectid => "objectid",
            Field::Offset => "offset",
            Field::Parent => "parent",
            Field::Level => "level",
            Field::FullBackref => "full_backref",
            Field::Key => "key",
        }
    }

    /// The flag of `refctl add|drop|alloc|update` (`--num-bytes`).
    pub fn flag(self) -> String {
        format!("--{}", self.name().replace('_', "-"))
    }

    fn parse(name: &str) -> Result<Field, OpError> {
        let n = normalize(name);
        Field::ALL
            .into_iter()
            .find(|f| f.name() == n)
            .ok_or_else(|| OpError::UnknownField(name.to_owned()))
    }
}

/// Names compare with '-' and '_' alike.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Why an op (a line, or the flags) is not one.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// The line has no action word.
    MissingAction,
    /// Not add, drop, alloc or update.
    UnknownAction(String),
    /// The action has no kind word.
    MissingKind,
    /// Not data, tree, shared-data or shared-block.
    UnknownKind(String),
    /// `update` names the extent's kind: data or tree.
    UpdateKind(OpKind),
    /// A field name the grammar does not have.
    UnknownField(String),
    /// A text token that is not `NAME=VALUE` (or the bare `full_backref`).
    BadToken(String),
    /// The same field twice.
    Duplicate(Field),
    /// A required field is missing.
    Missing {
        /// The field.
        field: Field,
        /// The op's action.
        action: OpAction,
        /// The op's kind.
        kind: OpKind,
    },
    /// A field this action and kind do not take.
    NotAllowed {
        /// The field.
        field: Field,
        /// The op's action.
        action: OpAction,
        /// The op's kind.
        kind: OpKind,
    },
    /// `update` without `full_backref` or `key`.
    UpdateWithoutExtentOp,
    /// A value that does not parse.
    BadValue {
        /// The field.
        field: Field,
        /// The value as given.
        value: String,
        /// What was expected.
        expected: &'static str,
    },
    /// A JSON line that does not parse, or is not an object.
    Json(String),
    /// A line above [`LINE_BYTES_MAX`].
    LineTooLong,
    /// A line that is not UTF-8.
    NotUtf8,
    /// Reading the file failed.
    Read(String),
}

impl OpError {
    /// The message with fields named as flags (`--num-bytes`), for
    /// `refctl add|drop|alloc|update`.
    pub fn with_flags(&self) -> String {
        self.render(true)
    }

    fn render(&self, flags: bool) -> String {
        let name = |f: &Field| {
            if flags {
                f.flag()
            } else {
                f.name().to_owned()
            }
        };
        match self {
            OpError::MissingAction => "empty op: expected add, drop, alloc or update".into(),
            OpError::UnknownAction(w) => {
                format!("unknown action {w:?}: expected add, drop, alloc or update")
            }
            OpError::MissingKind => {
                "missing kind: expected data, tree, shared-data or shared-block".into()
            }
            OpError::UnknownKind(w) => {
                format!("unknown kind {w:?}: expected data, tree, shared-data or shared-block")
            }
            OpError::UpdateKind(k) => format!(
                "update takes the extent's kind, data or tree (with {}), not {}",
                name(&Field::Level),
                k.name()
            ),
            OpError::UnknownField(w) => format!("unknown field {w:?}"),
            OpError::BadToken(t) => format!("{t:?} is not NAME=VALUE"),
            OpError::Duplicate(f) => format!("{} given twice", name(f)),
            OpError::Missing {
                field,
                action,
                kind,
            } => format!(
                "missing {} (required by {} {})",
                name(field),
                action.name(),
                kind.name()
            ),
            OpError::NotAllowed {
                field,
                action,
                kind,
            } => format!(
                "{} is not a field of {} {}",
                name(field),
                action.name(),
                kind.name()
            ),
            OpError::UpdateWithoutExtentOp => format!(
                "update needs {} and/or {}",
                name(&Field::FullBackref),
                name(&Field::Key)
            ),
            OpError::BadValue {
                field,
                value,
                expected,
            } => format!("{} {value:?}: expected {expected}", name(field)),
            OpError::Json(e) => format!("bad JSON op: {e}"),
            OpError::LineTooLong => format!("line longer than {LINE_BYTES_MAX} bytes"),
            OpError::NotUtf8 => "line is not UTF-8".into(),
            OpError::Read(e) => format!("read error: {e}"),
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for OpError {}

/// An [`OpError`] at a line of an op file (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {error}")]
pub struct LineError {
    /// The line.
    pub line: u64,
    /// What is wrong with it.
    pub error: OpError,
}

/// The fields of one op, as given; [`OpSpec::build`] checks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpFields {
    /// Extent address.
    pub bytenr: Option<u64>,
    /// Extent size.
    pub num_bytes: Option<u64>,
    /// Tree-mod-log seq.
    pub seq: Option<u64>,
    /// Root (data, tree).
    pub root: Option<u64>,
    /// Inode (data).
    pub objectid: Option<u64>,
    /// File offset (data).
    pub offset: Option<u64>,
    /// Parent tree block (shared kinds).
    pub parent: Option<u64>,
    /// Tree block level.
    pub level: Option<u8>,
    /// extent_op sets FULL_BACKREF (`None`: not given).
    pub full_backref: Option<bool>,
    /// extent_op new first key.
    pub key: Option<ExtentOpKey>,
}

impl OpFields {
    fn is_set(&self, field: Field) -> bool {
        match field {
            Field::Bytenr => self.bytenr.is_some(),
            Field::NumBytes => self.num_bytes.is_some(),
            Field::Seq => self.seq.is_some(),
            Field::Root => self.root.is_some(),
            Field::Objectid => self.objectid.is_some(),
            Field::Offset => self.offset.is_some(),
            Field::Parent => self.parent.is_some(),
            Field::Level => self.level.is_some(),
            Field::FullBackref => self.full_backref.is_some(),
            Field::Key => self.key.is_some(),
        }
    }

    /// Sets `field` from its text value (`None`: a bare word, allowed for
    /// `full_backref` only). A field set twice is an error.
    fn set_text(&mut self, field: Field, value: Option<&str>) -> Result<(), OpError> {
        if self.is_set(field) {
            return Err(OpError::Duplicate(field));
        }
        let Some(value) = value else {
            return match field {
                Field::FullBackref => {
                    self.full_backref = Some(true);
                    Ok(())
                }
                _ => Err(OpError::BadToken(field.name().to_owned())),
            };
        };
        let number = || parse_u64(value).ok_or_else(|| bad(field, value, NUMBER));
        match field {
            Field::Bytenr => self.bytenr = Some(number()?),
            Field::NumBytes => self.num_bytes = Some(number()?),
            Field::Seq => self.seq = Some(number()?),
            Field::Root => self.root = Some(number()?),
            Field::Objectid => self.objectid = Some(number()?),
            Field::Offset => self.offset = Some(number()?),
            Field::Parent => self.parent = Some(number()?),
            Field::Level => {
                let level = parse_u64(value).and_then(|v| u8::try_from(v).ok());
                self.level = Some(level.ok_or_else(|| bad(field, value, LEVEL))?);
            }
            Field::FullBackref => {
                let b = match value {
                    "1" | "true" | "yes" => true,
                    "0" | "false" | "no" => false,
                    _ => return Err(bad(field, value, "true/false/1/0")),
                };
                self.full_backref = Some(b);
            }
            Field::Key => self.key = Some(parse_key(value)?),
        }
        Ok(())
    }

    /// Sets `field` from a JSON value: numbers as integers or strings.
    fn set_json(&mut self, field: Field, value: &serde_json::Value) -> Result<(), OpError> {
        use serde_json::Value;
        match (field, value) {
            (Field::FullBackref, Value::Bool(b)) => {
                if self.is_set(field) {
                    return Err(OpError::Duplicate(field));
                }
                self.full_backref = Some(*b);
                Ok(())
            }
            (Field::FullBackref, _) => Err(bad(field, &value.to_string(), "true or false")),
            (Field::Key, Value::Array(parts)) => {
                let text: Vec<String> = parts.iter().map(json_scalar).collect();
                self.set_text(field, Some(&text.join(",")))
            }
            (_, Value::Number(_) | Value::String(_)) => {
                self.set_text(field, Some(&json_scalar(value)))
            }
            _ => Err(bad(field, &value.to_string(), NUMBER)),
        }
    }
}

const NUMBER: &str = "a number (decimal or 0x-hex) 0..=2^64-1";
const LEVEL: &str = "a level 0..=255 (the daemon allows 0..=7)";

fn bad(field: Field, value: &str, expected: &'static str) -> OpError {
    OpError::BadValue {
        field,
        value: value.to_owned(),
        expected,
    }
}

/// A JSON scalar as text (a string without its quotes).
fn json_scalar(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Decimal or `0x` hex.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && !hex.starts_with('+') => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if text.starts_with('+') => None,
        None => text.parse().ok(),
    }
}

/// `OBJECTID,TYPE,OFFSET`.
pub fn parse_key(text: &str) -> Result<ExtentOpKey, OpError> {
    let err = || bad(Field::Key, text, "OBJECTID,TYPE,OFFSET (TYPE 0..=255)");
    let mut parts = text.split(',').map(str::trim);
    let (Some(o), Some(t), Some(f), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(err());
    };
    Ok(ExtentOpKey {
        objectid: parse_u64(o).ok_or_else(err)?,
        key_type: parse_u64(t)
            .and_then(|t| u8::try_from(t).ok())
            .ok_or_else(err)?,
        offset: parse_u64(f).ok_or_else(err)?,
    })
}

/// One op: its action, kind and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSpec {
    /// What it does.
    pub action: OpAction,
    /// Which backref (for update: the extent's kind).
    pub kind: OpKind,
    /// The fields given.
    pub fields: OpFields,
}

impl OpSpec {
    /// Which fields this action and kind take, and which of them are
    /// required.
    fn shape(&self) -> Result<[(Field, Need); 10], OpError> {
        use Need::{No, Optional as Opt, Yes};
        let (action, kind) = (self.action, self.kind);
        if action == OpAction::Update && !matches!(kind, OpKind::Data | OpKind::Tree) {
            return Err(OpError::UpdateKind(kind));
        }
        let tree = kind.is_tree_block();
        let is = |b: bool| if b { Yes } else { No };
        let eop = match action {
            OpAction::Update => Opt,
            OpAction::Alloc if tree => Opt,
            _ => No,
        };
        let key = if tree { eop } else { No };
        let referenced = action != OpAction::Update;
        Ok([
            (Field::Bytenr, Yes),
            (Field::NumBytes, Yes),
            (Field::Seq, Opt),
            (
                Field::Root,
                is(referenced && matches!(kind, OpKind::Data | OpKind::Tree)),
            ),
            (Field::Objectid, is(referenced && kind == OpKind::Data)),
            (Field::Offset, is(referenced && kind == OpKind::Data)),
            (
                Field::Parent,
                is(referenced && !matches!(kind, OpKind::Data | OpKind::Tree)),
            ),
            (Field::Level, is(tree)),
            (Field::FullBackref, eop),
            (Field::Key, key),
        ])
    }

    /// Checks the shape (see the module doc) and encodes the op.
    pub fn build(&self) -> Result<WireOp, OpError> {
        let (action, kind, f) = (self.action, self.kind, &self.fields);
        for (field, need) in self.shape()? {
            match (need, f.is_set(field)) {
                (Need::Yes, false) => {
                    return Err(OpError::Missing {
                        field,
                        action,
                        kind,
                    })
                }
                (Need::No, true) => {
                    return Err(OpError::NotAllowed {
                        field,
                        action,
                        kind,
                    })
                }
                _ => {}
            }
        }
        // The shape guarantees the required ones.
        let (bytenr, num_bytes) = (f.bytenr.unwrap_or(0), f.num_bytes.unwrap_or(0));
        let level = f.level.unwrap_or(0);
        let full_backref = f.full_backref.unwrap_or(false);
        let a = action.wire();
        let op = match kind {
            OpKind::Data if action == OpAction::Update => {
                WireOp::update_head(bytenr, num_bytes, KIND_DATA, 0, full_backref, f.key)
            }
            OpKind::Tree if action == OpAction::Update => WireOp::update_head(
                bytenr,
                num_bytes,
                KIND_TREE_BLOCK,
                level,
                full_backref,
                f.key,
            ),
            OpKind::Data => WireOp::data_ref(
                a,
                bytenr,
                num_bytes,
                f.root.unwrap_or(0),
                f.objectid.unwrap_or(0),
                f.offset.unwrap_or(0),
            ),
            OpKind::Tree => WireOp::tree_ref(a, bytenr, num_bytes, f.root.unwrap_or(0), level),
            OpKind::SharedData => {
                WireOp::shared_data_ref(a, bytenr, num_bytes, f.parent.unwrap_or(0))
            }
            OpKind::SharedBlock => {
                WireOp::shared_tree_ref(a, bytenr, num_bytes, f.parent.unwrap_or(0), level)
            }
        };
        if action == OpAction::Update && !full_backref && f.key.is_none() {
            return Err(OpError::UpdateWithoutExtentOp);
        }
        let op = if action == OpAction::Alloc && (full_backref || f.key.is_some()) {
            op.with_extent_op(full_backref, f.key)
        } else {
            op
        };
        Ok(op.with_seq(f.seq.unwrap_or(0)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Yes,
    Optional,
    No,
}

/// Parses one text op (`add data bytenr=... ...`); `None` for a blank or
/// comment line.
pub fn parse_text_line(line: &str) -> Result<Option<WireOp>, OpError> {
    let mut words = line.split_whitespace().take_while(|w| !w.starts_with('#'));
    let Some(action) = words.next() else {
        return Ok(None);
    };
    let action = OpAction::parse(action)?;
    let kind = OpKind::parse(words.next().ok_or(OpError::MissingKind)?)?;
    let mut fields = OpFields::default();
    for word in words {
        let (name, value) = match word.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (word, None),
        };
        let field = Field::parse(name).map_err(|e| match value {
            None => OpError::BadToken(word.to_owned()),
            Some(_) => e,
        })?;
        fields.set_text(field, value)?;
    }
    OpSpec {
        action,
        kind,
        fields,
    }
    .build()
    .map(Some)
}

/// Parses one JSON-line op (`{"op":"add","kind":"data",...}`); `None` for
/// a blank line.
pub fn parse_json_line(line: &str) -> Result<Option<WireOp>, OpError> {
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| OpError::Json(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(OpError::Json("not an object".into()));
    };
    let word = |names: &[&str], missing: OpError| -> Result<String, OpError> {
        let mut found = names.iter().filter_map(|n| map.get(*n));
        match (found.next(), found.next()) {
            (Some(serde_json::Value::String(s)), None) => Ok(s.clone()),
            (Some(other), None) => Err(OpError::Json(format!(
                "\"{}\" must be a string, not {other}",
                names[0]
            ))),
            (Some(_), Some(_)) => Err(OpError::Json(format!("both {names:?} given"))),
            (None, _) => Err(missing),
        }
    };
    let action = OpAction::parse(&word(&["op", "action"], OpError::MissingAction)?)?;
    let kind = OpKind::parse(&word(&["kind"], OpError::MissingKind)?)?;
    let mut fields = OpFields::default();
    for (name, value) in &map {
        if matches!(name.as_str(), "op" | "action" | "kind") {
            continue;
        }
        fields.set_json(Field::parse(name)?, value)?;
    }
    OpSpec {
        action,
        kind,
        fields,
    }
    .build()
    .map(Some)
}

/// The two forms of an op file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpFormat {
    /// `add data bytenr=...` lines.
    Text,
    /// One JSON object per line.
    JsonLines,
}

/// Streams the ops of a file: `(line, op)` in order, blank and comment
/// lines skipped. The format is decided by the first non-blank line. The
/// first error ends the stream.
#[derive(Debug)]
pub struct OpReader<R> {
    input: R,
    line: u64,
    buf: Vec<u8>,
    format: Option<OpFormat>,
    done: bool,
}

impl<R: BufRead> OpReader<R> {
    /// A reader of `input`.
    pub fn new(input: R) -> Self {
        OpReader {
            input,
            line: 0,
            buf: Vec::with_capacity(256),
            format: None,
            done: false,
        }
    }

    /// The format, once the first non-blank line was read.
    pub fn format(&self) -> Option<OpFormat> {
        self.format
    }

    /// Lines read so far.
    pub fn lines_read(&self) -> u64 {
        self.line
    }

    /// The next line, without its newline; `None` at the end.
    fn next_line(&mut self) -> Result<Option<&str>, OpError> {
        self.buf.clear();
        let limit = LINE_BYTES_MAX as u64 + 1;
        let n = (&mut self.input)
            .take(limit)
            .read_until(b'\n', &mut self.buf)
            .map_err(|e| OpError::Read(e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        self.line += 1;
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
        } else if self.buf.len() > LINE_BYTES_MAX {
            return Err(OpError::LineTooLong);
        }
        std::str::from_utf8(&self.buf)
            .map(Some)
            .map_err(|_| OpError::NotUtf8)
    }

    fn next_op(&mut self) -> Result<Option<(u64, WireOp)>, OpError> {
        loop {
            let format = self.format;
            let Some(text) = self.next_line()? else {
                return Ok(None);
            };
            // Blank and comment lines, in either form, and before the
            // first op (they do not decide the form).
            let first = text.trim_start().chars().next();
            if matches!(first, None | Some('#')) {
                continue;
            }
            let format = match (format, first) {
                (Some(f), _) => f,
                (None, Some('{')) => OpFormat::JsonLines,
                (None, _) => OpFormat::Text,
            };
            let parsed = match format {
                OpFormat::Text => parse_text_line(text)?,
                OpFormat::JsonLines => parse_json_line(text)?,
            };
            self.format = Some(format);
            if let Some(op) = parsed {
                return Ok(Some((self.line, op)));
            }
        }
    }
}

impl<R: BufRead> Iterator for OpReader<R> {
    type Item = Result<(u64, WireOp), LineError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.next_op() {
            Ok(Some(item)) => Some(Ok(item)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(error) => {
                self.done = true;
                Some(Err(LineError {
                    line: self.line.max(1),
                    error,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests;
