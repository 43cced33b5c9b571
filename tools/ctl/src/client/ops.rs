//! `refctl add|drop|alloc|update` (one op from flags) and `refctl submit`
//! (an op file streamed into atomic SUBMIT batches).
//!
//! `submit` reads the file one line at a time and holds one batch (at most
//! the daemon's `submit_ops_max` ops, with each op's line number), so
//! memory does not grow with the file. Each batch is one SUBMIT: applied
//! entirely or not at all, durable when its LSN is printed. The first
//! error stops the run: the batches before it stay applied, the batch it
//! is in and everything after are not sent (a parse error) or not applied
//! (`INVALID_OP`, whose op index is mapped back to its line); only an
//! error whose outcome is unknown (a timeout, a lost connection, a
//! latched failure) leaves that one batch undecided, and it says so.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};

use refd_client::refd_proto::INDEX_NONE;
use refd_client::{
    Client, Error, ErrorCode, Outcome, SubmitOptions, SubmitReply, WireOp, SUBMIT_REPLY_DUPLICATE,
    SUBMIT_REPLY_DURABLE,
};
use serde_json::json;

use super::args::{OpCmd, SubmitArgs};
use super::{connect, count, describe, json_line, server_error, CmdError};
use crate::opfile::{OpAction, OpFormat, OpReader};

/// One op from flags: one SUBMIT; prints its LSN and that it is durable.
pub fn one(action: OpAction, a: &OpCmd, out: &mut dyn Write) -> Result<bool, CmdError> {
    let spec = a.spec(action);
    let op = spec
        .build()
        .map_err(|e| CmdError::Usage(format!("{}: {}", action.name(), e.with_flags())))?;
    let client = connect(&a.conn)?;
    let reply = client.submit(&[op], SubmitOptions::default())?;
    let durable = reply.flags & SUBMIT_REPLY_DURABLE != 0;
    if a.conn.json {
        json_line(
            out,
            &json!({
                "action": action.name(),
                "kind": spec.kind.name(),
                "bytenr": op.bytenr,
                "lsn": reply.lsn,
                "durable": durable,
                "duplicate": reply.flags & SUBMIT_REPLY_DUPLICATE != 0,
            }),
        )?;
    } else {
        writeln!(
            out,
            "{} {} {}: lsn {}, {}",
            action.name(),
            spec.kind.name(),
            op.bytenr,
            reply.lsn,
            durability(durable)
        )?;
    }
    Ok(true)
}

fn durability(durable: bool) -> &'static str {
    if durable {
        "durable"
    } else {
        "queued, not yet durable"
    }
}

/// `refctl submit FILE`.
pub fn submit(a: &SubmitArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let (file, input): (String, Box<dyn BufRead>) = if a.file == "-" {
        ("stdin".into(), Box::new(io::stdin().lock()))
    } else {
        let f = File::open(&a.file).map_err(|source| CmdError::OpenFile {
            file: a.file.clone(),
            source,
        })?;
        (a.file.clone(), Box::new(BufReader::new(f)))
    };
    let reader = OpReader::new(input);
    if a.check {
        return check(&file, reader, a.conn.json, out);
    }
    let client = connect(&a.conn)?;
    let max = client.hello().submit_ops_max;
    let batch_ops_max = match a.batch {
        Some(n) if n > max => {
            return Err(CmdError::Usage(format!(
                "--batch {n} is above the daemon's submit_ops_max {max}"
            )))
        }
        Some(n) => n,
        None => max,
    } as usize;
    let mut run = SubmitRun {
        client: &client,
        json: a.conn.json,
        file,
        batch_ops_max,
        ops: Vec::with_capacity(batch_ops_max.min(1 << 16)),
        lines: Vec::with_capacity(batch_ops_max.min(1 << 16)),
        done: Done::default(),
    };
    for item in reader {
        match item {
            Ok((line, op)) => run.push(line, op, out)?,
            Err(error) => {
                return Err(CmdError::OpLine {
                    progress: run.not_sent(error.line),
                    file: run.file,
                    error,
                })
            }
        }
    }
    run.flush(out)?;
    run.total(out)?;
    Ok(true)
}

/// `submit --check`: parse only.
fn check<R: BufRead>(
    file: &str,
    mut reader: OpReader<R>,
    json: bool,
    out: &mut dyn Write,
) -> Result<bool, CmdError> {
    let mut ops = 0u64;
    for item in reader.by_ref() {
        item.map_err(|error| CmdError::OpLine {
            file: file.to_owned(),
            error,
            progress: "nothing was sent (--check)".into(),
        })?;
        ops += 1;
    }
    let format = match reader.format() {
        Some(OpFormat::JsonLines) => "json-lines",
        Some(OpFormat::Text) | None => "text",
    };
    let lines = reader.lines_read();
    if json {
        json_line(
            out,
            &json!({"file": file, "format": format, "ops": ops, "lines": lines}),
        )?;
    } else {
        writeln!(
            out,
            "{file}: {} on {} ({format}), all valid in form",
            count(ops, "op"),
            count(lines, "line")
        )?;
    }
    Ok(true)
}

/// What the batches sent so far did.
#[derive(Debug, Default)]
struct Done {
    batches: u64,
    ops: u64,
    last_line: u64,
    first_lsn: Option<u64>,
    last_lsn: u64,
    all_durable: bool,
}

impl Done {
    /// "applied before: ..." for an error message.
    fn applied(&self) -> String {
        match self.batches {
            0 => "nothing was applied before".into(),
            n => format!(
                "applied before: {} ({}, lines 1-{}, lsn {}..{})",
                count(n, "batch"),
                count(self.ops, "op"),
                self.last_line,
                self.first_lsn.unwrap_or(0),
                self.last_lsn
            ),
        }
    }
}

struct SubmitRun<'a> {
    client: &'a Client,
    json: bool,
    file: String,
    batch_ops_max: usize,
    /// The batch being filled, and the line of each of its ops.
    ops: Vec<WireOp>,
    lines: Vec<u64>,
    done: Done,
}

impl SubmitRun<'_> {
    fn push(&mut self, line: u64, op: WireOp, out: &mut dyn Write) -> Result<(), CmdError> {
        self.ops.push(op);
        self.lines.push(line);
        if self.ops.len() >= self.batch_ops_max {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Sends the batch being filled, if any.
    fn flush(&mut self, out: &mut dyn Write) -> Result<(), CmdError> {
        let (Some(&first), Some(&last)) = (self.lines.first(), self.lines.last()) else {
            return Ok(());
        };
        let reply = self
            .client
            .submit(&self.ops, SubmitOptions::default())
            .map_err(|e| CmdError::Batch {
                message: self.refused(&e, first, last),
                file: self.file.clone(),
            })?;
        self.applied(&reply, first, last, out)?;
        out.flush()?;
        self.ops.clear();
        self.lines.clear();
        Ok(())
    }

    fn applied(
        &mut self,
        reply: &SubmitReply,
        first: u64,
        last: u64,
        out: &mut dyn Write,
    ) -> io::Result<()> {
        let durable = reply.flags & SUBMIT_REPLY_DURABLE != 0;
        let d = &mut self.done;
        d.all_durable = durable && (d.batches == 0 || d.all_durable);
        d.batches += 1;
        d.ops += self.ops.len() as u64;
        d.last_line = last;
        d.first_lsn.get_or_insert(reply.lsn);
        d.last_lsn = reply.lsn;
        if self.json {
            json_line(
                out,
                &json!({
                    "batch": d.batches,
                    "first_line": first,
                    "last_line": last,
                    "ops": self.ops.len(),
                    "lsn": reply.lsn,
                    "durable": durable,
                    "duplicate": reply.flags & SUBMIT_REPLY_DUPLICATE != 0,
                }),
            )
        } else {
            writeln!(
                out,
                "batch {}: lines {first}-{last}, {}, lsn {}, {}",
                d.batches,
                count(self.ops.len() as u64, "op"),
                reply.lsn,
                durability(durable)
            )
        }
    }

    fn total(&self, out: &mut dyn Write) -> io::Result<()> {
        let d = &self.done;
        if self.json {
            return json_line(
                out,
                &json!({
                    "summary": true,
                    "file": self.file,
                    "batches": d.batches,
                    "ops": d.ops,
                    "first_lsn": d.first_lsn,
                    "last_lsn": d.first_lsn.map(|_| d.last_lsn),
                    "durable": d.all_durable,
                }),
            );
        }
        match d.first_lsn {
            None => writeln!(out, "total: no ops in {}", self.file),
            Some(first) => writeln!(
                out,
                "total: {} in {}, lsn {first}..{}, {}",
                count(d.ops, "op"),
                count(d.batches, "batch"),
                d.last_lsn,
                if d.all_durable {
                    "all durable"
                } else {
                    "not all durable"
                }
            ),
        }
    }

    /// After a parse error at `line`.
    fn not_sent(&self, line: u64) -> String {
        let from = self.lines.first().copied().unwrap_or(line);
        format!(
            "nothing from line {from} on was sent; {}",
            self.done.applied()
        )
    }

    /// The message of a failed batch (lines `first..=last`).
    fn refused(&self, e: &Error, first: u64, last: u64) -> String {
        let batch = format!(
            "batch {} (lines {first}-{last}, {})",
            self.done.batches + 1,
            count(self.ops.len() as u64, "op")
        );
        let op_line = e
            .server_error()
            .filter(|s| matches!(s.code, ErrorCode::InvalidOp | ErrorCode::Refused))
            .filter(|s| s.index != INDEX_NONE)
            .and_then(|s| self.lines.get(s.index as usize).map(|line| (s, *line)));
        let what = match op_line {
            Some((s, line)) => format!("line {line}: {}", server_error(s)),
            None => describe(e),
        };
        let fate = match e.outcome() {
            Outcome::NotApplied => format!("{batch} was not applied, nor anything after it"),
            _ => format!(
                "the outcome of {batch} is unknown (a batch is applied entirely or not at \
                 all: check with `refctl get`); nothing after it was sent"
            ),
        };
        format!("{what}; {fate}; {}", self.done.applied())
    }
}
