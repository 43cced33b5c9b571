//! Pairing: a head event waits in its slot for the ref event of the same
//! task, and becomes an op when it arrives (see the module doc of
//! `trace`, "Pairing and order" and "Mapping").

use std::io::BufRead;

use refd_core::model::{
    Action, ExtentKind, ExtentOp, Op, RefKey, BLOCK_FLAG_FULL_BACKREF, SEQ_MAX,
};

use crate::lex;

use super::fields::{HeadFields, RefFields};
use super::line::Meta;
use super::reader::{Slot, TraceReader, WaitingHead};
use super::{KernelAction, RunEvent, TraceError, TraceItem, TracedOp};

impl<R: BufRead> TraceReader<R> {
    pub(super) fn add_head(&mut self, h: Meta, head: HeadFields) -> Result<(), TraceError> {
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

    pub(super) fn add_ref(&mut self, h: Meta, r: RefFields) -> Result<(), TraceError> {
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
        let mut seq = r.seq;
        if seq > SEQ_MAX {
            // Printed from a node already run and freed (module doc, "Refs
            // printed after their node ran"): the run event has its seq.
            if let Some(run_seq) = pos.and_then(|p| self.seq_of_run(p, &r)) {
                seq = run_seq;
                self.stats.seq_from_run += 1;
            }
        }
        let mut op = Op::new(r.bytenr, r.num_bytes, r.kind(), action, key, seq);
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

    /// The seq of the latest run event, among those after the head at
    /// position `head_pos` (all still held back behind it), of the node
    /// that `r` names: same extent, kind and key.
    fn seq_of_run(&self, head_pos: usize, r: &RefFields) -> Option<u64> {
        let key = Some(r.key());
        self.order
            .iter()
            .skip(head_pos + 1)
            .rev()
            .find_map(|slot| match slot {
                Slot::Ready(TraceItem::Run(RunEvent::Ref { op, .. }))
                    if op.bytenr == r.bytenr && op.kind == r.kind() && op.key == key =>
                {
                    Some(op.seq)
                }
                _ => None,
            })
    }

    /// At end of input: the front head never got its ref.
    pub(super) fn eof_front(&mut self, w: WaitingHead) -> Result<(), TraceError> {
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
}
