//! The hostile op streams: each client's script of requests for one
//! round, generated from the seed before the round runs (so a seed
//! replays), with what each request must get written beside it.
//!
//! Every client owns a slice of [`SLOTS`] bytenrs [`SLOT_BYTES`] apart;
//! slices are adjacent, so the last slot of one client can overlap the
//! first of the next (an allocation larger than the spacing). Each slot
//! has a home shape (two data slots of 4 KiB, then a 16 KiB tree block)
//! and is sometimes named with another size or kind (size mismatches,
//! re-allocation with another kind, overlaps). Backrefs come from small
//! pools, so counts above one, drops of refs that never existed and drops
//! below zero are frequent.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::Rng;
use refd_core::model::{
    Action, DiskKey, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF,
};
use refd_proto::*;

/// Bytenrs per client.
pub const SLOTS: u64 = 12;
/// Distance between two slots: a 32 KiB allocation overlaps the next.
pub const SLOT_BYTES: u64 = 16 << 10;
/// First bytenr of client 0.
pub const BASE: u64 = 1 << 30;
/// Ops of a huge batch: the default `submit_ops_max` (1 MiB frames).
pub const HUGE_OPS: usize = 18724;

/// Client `c`'s slot `k`.
pub fn slot(c: usize, k: u64) -> u64 {
    BASE + (c as u64 * SLOTS + k) * SLOT_BYTES
}

/// Every slot of `clients` clients.
pub fn all_slots(clients: usize) -> Vec<u64> {
    (0..clients)
        .flat_map(|c| (0..SLOTS).map(move |k| slot(c, k)))
        .collect()
}

/// A SUBMIT: its ops as the model takes them (before STAMP_SEQ), as they
/// go on the wire, its flags, and the op validation must refuse.
#[derive(Clone, Debug)]
pub struct Batch {
    pub ops: Vec<Op>,
    pub wire: Vec<WireOp>,
    pub no_wait: bool,
    pub stamp_seq: bool,
    /// `(index, subcode)` of the one invalid op (docs/protocol.md,
    /// "INVALID_OP subcodes"), if any.
    pub invalid: Option<(usize, u16)>,
}

/// A SUBMIT frame the client library would not send, and the error it
/// must get (nothing applied, the connection stays open).
#[derive(Clone, Copy, Debug)]
pub enum RawKind {
    /// `op_count` 0 (an empty batch): `TOO_MANY_OPS`.
    Empty,
    /// `op_count` one more than the ops in the body: `BAD_REQUEST`.
    CountAbove,
    /// `op_count` one less than the ops in the body: `BAD_REQUEST`.
    CountBelow,
    /// A flag bit the protocol does not define: `BAD_REQUEST`.
    UnknownFlag,
    /// Request number 0: `BAD_REQUEST`.
    RequestZero,
}

/// One request of a client's script.
#[derive(Clone, Debug)]
pub enum Act {
    /// SUBMIT through refd-client; `retry`: then the same ticket again,
    /// which must be answered `DUPLICATE` with the first LSN (or, for a
    /// refused batch, refused again the same way).
    Submit { batch: Batch, retry: bool },
    /// A raw SUBMIT frame carrying `batch`'s valid ops.
    Raw { kind: RawKind, batch: Batch },
    /// COMMIT (only in a round where this client runs alone).
    Commit,
}

/// What a client believes about its slots while it writes a script
/// (committed refs at the start of the round, then its own ops as if all
/// were accepted): it only steers the generator toward plausible ops.
#[derive(Clone, Debug, Default)]
pub struct Belief {
    pub refs: BTreeMap<u64, BTreeMap<RefKey, i64>>,
}

impl Belief {
    fn live(&self, b: u64) -> bool {
        self.refs
            .get(&b)
            .is_some_and(|r| r.values().any(|&n| n > 0))
    }

    fn held_key(&self, b: u64, rng: &mut SmallRng) -> Option<RefKey> {
        let keys: Vec<RefKey> = self
            .refs
            .get(&b)?
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(k, _)| *k)
            .collect();
        (!keys.is_empty()).then(|| keys[rng.gen_range(0..keys.len())])
    }

    fn apply(&mut self, op: &Op) {
        let refs = self.refs.entry(op.bytenr).or_default();
        if op.action == Action::AddExtent {
            refs.clear();
        }
        if let Some(k) = op.key {
            *refs.entry(k).or_insert(0) += op.ref_mod();
        }
    }
}

/// The shape slot `k` is usually named with.
fn home_shape(k: u64) -> (u64, ExtentKind) {
    if k % 3 == 2 {
        (16 << 10, ExtentKind::Tree { level: 0 })
    } else {
        (4 << 10, ExtentKind::Data)
    }
}

/// Mostly the home shape; sometimes another size, level or kind.
fn shape(rng: &mut SmallRng, k: u64) -> (u64, ExtentKind) {
    let (n, kind) = home_shape(k);
    if rng.gen_ratio(85, 100) {
        return (n, kind);
    }
    match (kind, rng.gen_range(0..3)) {
        (ExtentKind::Data, 0) => (8 << 10, kind),
        (ExtentKind::Data, 1) => (32 << 10, kind),
        (ExtentKind::Data, _) => (16 << 10, ExtentKind::Tree { level: 0 }),
        (_, 0) => (32 << 10, kind),
        (_, 1) => (n, ExtentKind::Tree { level: 1 }),
        (_, _) => (4 << 10, ExtentKind::Data),
    }
}

/// A backref of `kind` from a small pool.
fn key(rng: &mut SmallRng, kind: ExtentKind) -> RefKey {
    let i = rng.gen_range(0..4u64);
    match (kind.is_data(), rng.gen_ratio(3, 4)) {
        (true, true) => RefKey::ExtentData {
            root: 5 + i % 2,
            objectid: 257 + i / 2,
            offset: 0,
        },
        (true, false) => RefKey::SharedData {
            parent: (i + 1) << 14,
        },
        (false, true) => RefKey::TreeBlock { root: 5 + i },
        (false, false) => RefKey::SharedBlock {
            parent: (i + 1) << 14,
        },
    }
}

/// An extent_op: FULL_BACKREF and/or a new first key (tree blocks only).
fn extent_op(rng: &mut SmallRng, kind: ExtentKind, update: bool) -> ExtentOp {
    let with_key = !kind.is_data() && rng.gen_bool(0.5);
    let key = with_key.then(|| DiskKey {
        objectid: rng.gen_range(256..260),
        item_type: [1u8, 84, 108][rng.gen_range(0..3)],
        offset: rng.gen_range(0..3) << 12,
    });
    let full = rng.gen_bool(0.5) || (update && key.is_none());
    ExtentOp {
        flags_to_set: if full { BLOCK_FLAG_FULL_BACKREF } else { 0 },
        key,
    }
}

/// The seq of a new op: mostly 0 (then STAMP_SEQ may set it), sometimes
/// around the current barrier seq.
fn seq(rng: &mut SmallRng, seq_current: u64) -> u64 {
    match rng.gen_range(0..12) {
        0 => seq_current,
        1 => seq_current + 1,
        2 => seq_current.saturating_sub(1),
        3 => 1000,
        _ => 0,
    }
}

/// One valid op on client `c`'s slots, steered by `belief`. A `hostile`
/// op is anything valid; otherwise it is one a careful client would send
/// (the slot's home shape, an allocation only of a free slot, a drop only
/// of a backref it holds, a tree backref added once), which still fails
/// where the belief is wrong.
pub fn op(
    rng: &mut SmallRng,
    c: usize,
    belief: &mut Belief,
    seq_current: u64,
    hostile: bool,
) -> Op {
    let k = if rng.gen_ratio(3, 4) {
        rng.gen_range(0..SLOTS.min(5))
    } else {
        rng.gen_range(0..SLOTS)
    };
    let b = slot(c, k);
    let (n, kind) = if hostile {
        shape(rng, k)
    } else {
        home_shape(k)
    };
    let live = belief.live(b);
    let roll = rng.gen_range(0..100);
    let op = if (!live && (!hostile || roll < 60)) || (live && hostile && roll < 4) {
        let op = Op::new(
            b,
            n,
            kind,
            Action::AddExtent,
            key(rng, kind),
            seq(rng, seq_current),
        );
        let op = op.expect("a valid allocation");
        if !kind.is_data() && rng.gen_bool(0.4) {
            op.with_extent_op(extent_op(rng, kind, false))
                .expect("an allocation's extent_op")
        } else {
            op
        }
    } else if roll < 70 && (hostile || !kind.is_data()) {
        Op::update_head(b, n, kind, extent_op(rng, kind, true)).expect("a valid UPDATE_HEAD")
    } else {
        let drop = rng.gen_bool(0.45);
        let held = belief
            .held_key(b, rng)
            .filter(|k| k.is_data() == kind.is_data());
        let k = match (drop, hostile) {
            (true, false) => held.unwrap_or_else(|| key(rng, kind)),
            (_, true) if rng.gen_bool(0.5) => held.unwrap_or_else(|| key(rng, kind)),
            _ => fresh_key(rng, kind, belief, b),
        };
        let action = if drop {
            Action::DropRef
        } else {
            Action::AddRef
        };
        Op::new(b, n, kind, action, k, seq(rng, seq_current)).expect("a valid ref op")
    };
    belief.apply(&op);
    op
}

/// A backref from the pool, preferably one a tree block does not hold
/// yet (a data extent may hold one many times).
fn fresh_key(rng: &mut SmallRng, kind: ExtentKind, belief: &Belief, b: u64) -> RefKey {
    let held = |k: &RefKey| {
        belief
            .refs
            .get(&b)
            .is_some_and(|r| r.get(k).is_some_and(|&n| n > 0))
    };
    let mut k = key(rng, kind);
    for _ in 0..4 {
        if kind.is_data() || !held(&k) {
            break;
        }
        k = key(rng, kind);
    }
    k
}

/// One op that the commit must refuse (or ref-verify, with `--verify`)
/// as far as `belief` knows, on an otherwise sound stream: a second
/// reference of a tree backref, a drop of a backref not held (below
/// zero), an allocation of a live extent, an allocation overlapping the
/// next slot's live extent, an op naming another size or kind than the
/// live extent's, FULL_BACKREF on a data extent, a reference to a free
/// extent.
pub fn fault(rng: &mut SmallRng, c: usize, belief: &Belief) -> Op {
    let k = rng.gen_range(0..SLOTS.min(6));
    let b = slot(c, k);
    let (n, kind) = home_shape(k);
    let held = belief
        .held_key(b, rng)
        .filter(|k| k.is_data() == kind.is_data());
    let r = |action, key| Op::new(b, n, kind, action, key, 0).expect("a valid op");
    match rng.gen_range(0..8) {
        0 if !kind.is_data() && held.is_some() => r(Action::AddRef, held.unwrap()),
        1 => {
            let k = (0..8)
                .map(|_| key(rng, kind))
                .find(|k| held != Some(*k))
                .unwrap_or_else(|| key(rng, kind));
            r(Action::DropRef, k)
        }
        2 => r(Action::AddExtent, key(rng, kind)),
        3 => Op::new(b, 32 << 10, kind, Action::AddExtent, key(rng, kind), 0).unwrap(),
        4 => Op::new(b, n * 2, kind, Action::AddRef, key(rng, kind), 0).unwrap(),
        5 => {
            let other = if kind.is_data() {
                ExtentKind::Tree { level: 0 }
            } else {
                ExtentKind::Data
            };
            Op::new(b, n, other, Action::AddRef, key(rng, other), 0).unwrap()
        }
        6 if kind.is_data() => {
            let e = ExtentOp {
                flags_to_set: BLOCK_FLAG_FULL_BACKREF,
                key: None,
            };
            Op::update_head(b, n, kind, e).unwrap()
        }
        _ => {
            let free = (0..SLOTS).map(|k| slot(c, k)).find(|&s| !belief.live(s));
            let b = free.unwrap_or(b);
            let (n, kind) = home_shape((b - slot(c, 0)) / SLOT_BYTES);
            Op::new(b, n, kind, Action::AddRef, key(rng, kind), 0).unwrap()
        }
    }
}

/// The op on the wire, written from docs/protocol.md ("Op").
pub fn wire(op: &Op) -> WireOp {
    let (kind, level) = match op.kind {
        ExtentKind::Data => (KIND_DATA, 0),
        ExtentKind::Tree { level } => (KIND_TREE_BLOCK, level),
    };
    let action = match op.action {
        Action::AddRef => ACTION_ADD_REF,
        Action::DropRef => ACTION_DROP_REF,
        Action::AddExtent => ACTION_ADD_EXTENT,
        Action::UpdateHead => ACTION_UPDATE_HEAD,
    };
    let (ref_type, k1, k2, k3) = match op.key {
        None => (0, 0, 0, 0),
        Some(RefKey::TreeBlock { root }) => (REF_TYPE_TREE_BLOCK, root, 0, 0),
        Some(RefKey::ExtentData {
            root,
            objectid,
            offset,
        }) => (REF_TYPE_EXTENT_DATA, root, objectid, offset),
        Some(RefKey::SharedBlock { parent }) => (REF_TYPE_SHARED_BLOCK, parent, 0, 0),
        Some(RefKey::SharedData { parent }) => (REF_TYPE_SHARED_DATA, parent, 0, 0),
    };
    let w = WireOp {
        bytenr: op.bytenr,
        num_bytes: op.num_bytes,
        seq: op.seq,
        k1,
        k2,
        k3,
        action,
        ref_type,
        kind,
        level,
        ..WireOp::default()
    };
    match op.extent_op {
        Some(e) => w.with_extent_op(
            e.flags_to_set & BLOCK_FLAG_FULL_BACKREF != 0,
            e.key.map(|k| ExtentOpKey {
                objectid: k.objectid,
                key_type: k.item_type,
                offset: k.offset,
            }),
        ),
        None => w,
    }
}

/// `w` broken in one way, and the subcode docs/protocol.md gives for it
/// ("INVALID_OP subcodes"; each the first check the op fails).
pub fn invalid(rng: &mut SmallRng, w: WireOp) -> (WireOp, u16) {
    let tree = w.kind == KIND_TREE_BLOCK;
    let keyed = w.action != ACTION_UPDATE_HEAD;
    let mut v = w;
    let subcode = match rng.gen_range(0..17) {
        0 => {
            v.num_bytes = 0;
            1
        }
        1 => {
            v.bytenr = u64::MAX - 4095;
            2
        }
        2 if tree => {
            v.level = 8;
            3
        }
        3 => {
            v.seq = (1 << 56) + rng.gen_range(0..3);
            4
        }
        4 => {
            v.action = [0, 5, 9, 255][rng.gen_range(0..4)];
            // A stray key field would be judged first.
            (v.ref_type, v.k1, v.k2, v.k3, v.eop_flags, v.key_type) = (0, 0, 0, 0, 0, 0);
            5
        }
        5 if keyed && tree => {
            v.ref_type = [0, 177, 183, 255][rng.gen_range(0..4)];
            6
        }
        6 if keyed && tree && w.eop_flags == 0 => {
            v.ref_type = REF_TYPE_EXTENT_DATA;
            7
        }
        7 if keyed && matches!(w.ref_type, REF_TYPE_TREE_BLOCK | REF_TYPE_EXTENT_DATA) => {
            v.k1 = 0;
            8
        }
        8 if keyed && matches!(w.ref_type, REF_TYPE_SHARED_BLOCK | REF_TYPE_SHARED_DATA) => {
            v.k1 = 0;
            9
        }
        9 if !keyed && tree => {
            v.ref_type = REF_TYPE_TREE_BLOCK;
            10
        }
        10 if !keyed => {
            (v.eop_flags, v.k2, v.k3, v.key_type) = (0, 0, 0, 0);
            11
        }
        11 if keyed && tree && w.action != ACTION_ADD_EXTENT => {
            v.eop_flags = EOP_FULL_BACKREF;
            12
        }
        12 => {
            v.eop_flags |= 1 << rng.gen_range(2..8);
            13
        }
        13 if !tree => {
            v.eop_flags |= EOP_KEY;
            14
        }
        14 if !tree => {
            v.level = 1;
            15
        }
        15 => {
            v.kind = rng.gen_range(2..=255);
            16
        }
        _ => {
            v.reserved = rng.gen_range(1..=u16::MAX);
            17
        }
    };
    (v, subcode)
}

/// A batch of `n` ops (huge when `n` is [`HUGE_OPS`]), sometimes with one
/// invalid op.
pub fn batch(
    rng: &mut SmallRng,
    c: usize,
    belief: &mut Belief,
    seq_current: u64,
    n: usize,
) -> Batch {
    let mut trial = belief.clone();
    let mode = rng.gen_range(0..10);
    let mut ops: Vec<Op> = if n >= HUGE_OPS {
        huge(rng, c, n)
    } else {
        (0..n)
            .map(|_| op(rng, c, &mut trial, seq_current, mode < 2))
            .collect()
    };
    if n < HUGE_OPS && (2..5).contains(&mode) {
        let f = fault(rng, c, &trial);
        trial.apply(&f);
        ops.push(f);
    }
    let mut wire: Vec<WireOp> = ops.iter().map(wire).collect();
    let invalid = rng.gen_ratio(1, 8).then(|| {
        let i = if n >= HUGE_OPS {
            n - 1
        } else {
            rng.gen_range(0..n)
        };
        let (w, subcode) = invalid(rng, wire[i]);
        wire[i] = w;
        (i, subcode)
    });
    if invalid.is_none() && n < HUGE_OPS {
        *belief = trial;
    }
    Batch {
        ops,
        wire,
        no_wait: rng.gen_ratio(1, 5),
        stamp_seq: rng.gen_ratio(1, 5),
        invalid,
    }
}

/// A huge batch on client `c`'s slot 0 (a data slot): `n / 2` adds of
/// distinct backrefs then their drops (cancelling: nothing to apply),
/// or `n` adds of distinct backrefs (an extent with thousands of them),
/// or the drops of those.
fn huge(rng: &mut SmallRng, c: usize, n: usize) -> Vec<Op> {
    let b = slot(c, 0);
    let key = |i: usize| RefKey::ExtentData {
        root: 7,
        objectid: 100_000 + i as u64,
        offset: 0,
    };
    let one = |action, i| Op::new(b, 4 << 10, ExtentKind::Data, action, key(i), 0).unwrap();
    match rng.gen_range(0..3) {
        0 => (0..n / 2)
            .map(|i| one(Action::AddRef, i))
            .chain((0..n - n / 2).map(|i| one(Action::DropRef, i)))
            .collect(),
        1 => (0..n).map(|i| one(Action::AddRef, i)).collect(),
        _ => (0..n).map(|i| one(Action::DropRef, i)).collect(),
    }
}
