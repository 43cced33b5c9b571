//! One line of the trace: parse its header, classify it (a known event,
//! an unknown one, noise, a lost-events marker), check the fsid and the
//! fields, and hand the event to pairing or queue a run record.

use std::io::BufRead;

use refd_core::model::{Action, Op, OpError};

use crate::lex;

use super::fields::{parse_head_fields, parse_ref_fields, HeadFields, RefFields};
use super::header::parse_header;
use super::reader::{Slot, TraceReader};
use super::{EventType, KernelAction, RunEvent, TraceError, TraceItem};

impl<R: BufRead> TraceReader<R> {
    pub(super) fn process_line(&mut self) -> Result<(), TraceError> {
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
        // The fsid is kept escaped (`escape_ascii`, one-to-one), so that
        // fsids that differ only in bytes `show` would drop or replace
        // (a trailing `\r`, invalid UTF-8) are neither mistaken for each
        // other nor reported as different under the same name.
        match &self.stats.fsid {
            None => self.stats.fsid = Some(h.fsid.escape_ascii().to_string()),
            Some(f) if h.fsid.escape_ascii().eq(f.bytes()) => {}
            Some(f) => {
                let err = TraceError::OtherFsid {
                    line: self.lines.line_no,
                    text: lex::show(line),
                    fsid: h.fsid.escape_ascii().to_string(),
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

    pub(super) fn invalid_op(&mut self, source: OpError) -> Result<(), TraceError> {
        let err = TraceError::InvalidOp {
            line: self.lines.line_no,
            text: lex::show(self.lines.line()),
            source,
        };
        self.anomaly(err, |s| &mut s.malformed)
    }
}

/// Who printed an event, and when.
#[derive(Clone, Copy, Debug)]
pub(super) struct Meta {
    pub(super) pid: u32,
    pub(super) ts_ns: u64,
}

/// The fields of one event.
#[derive(Clone, Copy, Debug)]
pub(super) enum Parsed {
    Head(HeadFields),
    Ref(RefFields),
}
