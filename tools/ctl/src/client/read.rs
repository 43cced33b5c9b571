//! `refctl get`, `backrefs`, `commit`, `freed` and `barrier`.

use std::io::Write;
use std::time::Duration;

use refd_client::refd_proto::{
    BACKREFS_ENTRIES_MAX, BACKREFS_KIND_UNKNOWN, FREED_EXTENTS_MAX, ITEM_FLAG_DATA,
    ITEM_FLAG_FULL_BACKREF, ITEM_FLAG_TREE_BLOCK, KIND_DATA, LOOKUP_ALLOC_PENDING,
    LOOKUP_COMMITTED, LOOKUP_DATA, LOOKUP_FULL_BACKREF, LOOKUP_PENDING, REF_TYPE_EXTENT_DATA,
    REF_TYPE_SHARED_BLOCK, REF_TYPE_SHARED_DATA, REF_TYPE_TREE_BLOCK,
};
use refd_client::{
    BackrefEntry, BackrefKey, Client, ErrorCode, FreedCursor, FreedExtent, LookupEntry,
};
use serde_json::{json, Value};

use super::args::{BackrefsArgs, BarrierCmd, ConnectArgs, FreedArgs, GetArgs};
use super::{connect, count, json_line, CmdError};

/// Names of set bits, `|`-joined (`-` for none).
fn flag_names<T: Copy + std::ops::BitAnd<Output = T> + PartialEq + Default>(
    flags: T,
    names: &[(T, &'static str)],
) -> Vec<&'static str> {
    names
        .iter()
        .filter(|(bit, _)| flags & *bit != T::default())
        .map(|(_, name)| *name)
        .collect()
}

fn joined(names: &[&str]) -> String {
    if names.is_empty() {
        "-".into()
    } else {
        names.join("|")
    }
}

const LOOKUP_FLAG_NAMES: [(u8, &str); 5] = [
    (LOOKUP_COMMITTED, "COMMITTED"),
    (LOOKUP_PENDING, "PENDING"),
    (LOOKUP_ALLOC_PENDING, "ALLOC_PENDING"),
    (LOOKUP_DATA, "DATA"),
    (LOOKUP_FULL_BACKREF, "FULL_BACKREF"),
];

const ITEM_FLAG_NAMES: [(u64, &str); 3] = [
    (ITEM_FLAG_DATA, "DATA"),
    (ITEM_FLAG_TREE_BLOCK, "TREE_BLOCK"),
    (ITEM_FLAG_FULL_BACKREF, "FULL_BACKREF"),
];

/// `data`, `tree` or `None` (nothing known) of a LOOKUP entry.
fn lookup_kind(e: &LookupEntry) -> Option<&'static str> {
    // `num_bytes` 0: nothing known, or only an extent_op pending, which
    // carries no size or kind (`docs/protocol.md`, "LOOKUP"): not a tree.
    if e.num_bytes == 0 {
        None
    } else if e.flags & LOOKUP_DATA != 0 {
        Some("data")
    } else {
        Some("tree")
    }
}

/// `refctl get BYTENR...`: LOOKUP.
pub fn get(a: &GetArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let client = connect(&a.conn)?;
    for e in client.lookup(&a.bytenrs)? {
        let kind = lookup_kind(&e);
        if a.conn.json {
            json_line(
                out,
                &json!({
                    "bytenr": e.bytenr,
                    "refs": e.refs,
                    "committed_refs": e.committed_refs,
                    "pending_ref_mod": e.pending_ref_mod,
                    "num_bytes": e.num_bytes,
                    "flags": flag_names(e.flags, &LOOKUP_FLAG_NAMES),
                    "kind": kind,
                    "level": e.level,
                }),
            )?;
            continue;
        }
        if e.flags == 0 {
            writeln!(
                out,
                "{}: no extent (nothing committed or pending)",
                e.bytenr
            )?;
            continue;
        }
        let kind = match kind {
            Some("tree") => format!("tree level {}", e.level),
            Some(other) => other.to_owned(),
            None => "size and kind unknown (only an extent_op pending)".to_owned(),
        };
        writeln!(
            out,
            "{}: refs {} (committed {}, pending {:+}), num_bytes {}, {kind}, flags {}",
            e.bytenr,
            e.refs,
            e.committed_refs,
            e.pending_ref_mod,
            e.num_bytes,
            joined(&flag_names(e.flags, &LOOKUP_FLAG_NAMES))
        )?;
    }
    Ok(true)
}

/// The btrfs name of a backref type.
fn ref_type_name(t: u8) -> &'static str {
    match t {
        REF_TYPE_TREE_BLOCK => "TREE_BLOCK_REF",
        REF_TYPE_EXTENT_DATA => "EXTENT_DATA_REF",
        REF_TYPE_SHARED_BLOCK => "SHARED_BLOCK_REF",
        REF_TYPE_SHARED_DATA => "SHARED_DATA_REF",
        _ => "UNKNOWN_REF",
    }
}

/// One backref as text: `EXTENT_DATA_REF root 5 objectid 257 offset 0 count 1`.
pub fn backref_text(e: &BackrefEntry) -> String {
    let keys = match e.ref_type {
        REF_TYPE_TREE_BLOCK => format!("root {}", e.k1),
        REF_TYPE_EXTENT_DATA => format!("root {} objectid {} offset {}", e.k1, e.k2, e.k3),
        REF_TYPE_SHARED_BLOCK | REF_TYPE_SHARED_DATA => format!("parent {}", e.k1),
        t => format!("type {t} k1 {} k2 {} k3 {}", e.k1, e.k2, e.k3),
    };
    format!("{} {keys} count {}", ref_type_name(e.ref_type), e.count)
}

/// One backref as JSON, its keys by their btrfs names.
pub fn backref_json(e: &BackrefEntry) -> Value {
    let mut v = json!({"type": ref_type_name(e.ref_type), "ref_type": e.ref_type});
    match e.ref_type {
        REF_TYPE_TREE_BLOCK => v["root"] = json!(e.k1),
        REF_TYPE_EXTENT_DATA => {
            v["root"] = json!(e.k1);
            v["objectid"] = json!(e.k2);
            v["offset"] = json!(e.k3);
        }
        REF_TYPE_SHARED_BLOCK | REF_TYPE_SHARED_DATA => v["parent"] = json!(e.k1),
        _ => {
            v["k1"] = json!(e.k1);
            v["k2"] = json!(e.k2);
            v["k3"] = json!(e.k3);
        }
    }
    v["count"] = json!(e.count);
    v
}

/// `refctl backrefs BYTENR`: every page, printed as it comes (one JSON
/// object with `--json`, its `backrefs` array written page by page).
pub fn backrefs(a: &BackrefsArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let client = connect(&a.conn)?;
    let json = a.conn.json;
    let mut after: Option<BackrefKey> = None;
    let mut shown = 0u64;
    loop {
        let page = client.backrefs_page(a.bytenr, after, BACKREFS_ENTRIES_MAX)?;
        if after.is_none() {
            let kind = match page.kind {
                KIND_DATA => "data".to_owned(),
                BACKREFS_KIND_UNKNOWN => "unknown".to_owned(),
                _ => format!("tree level {}", page.level),
            };
            let flags = flag_names(page.item_flags, &ITEM_FLAG_NAMES);
            if json {
                let head = json!({
                    "bytenr": page.bytenr,
                    "num_bytes": page.num_bytes,
                    "refs": page.refs,
                    "item_flags": flags,
                    "kind": match page.kind {
                        KIND_DATA => Some("data"),
                        BACKREFS_KIND_UNKNOWN => None,
                        _ => Some("tree"),
                    },
                    "level": page.level,
                })
                .to_string();
                // The object without its closing brace, then the array.
                write!(out, "{},\"backrefs\":[", &head[..head.len() - 1])?;
            } else {
                writeln!(
                    out,
                    "{}: refs {}, num_bytes {}, {kind}, item flags {}",
                    page.bytenr,
                    page.refs,
                    page.num_bytes,
                    joined(&flags)
                )?;
            }
        }
        for e in &page.entries {
            if json {
                let sep = if shown == 0 { "" } else { "," };
                write!(out, "{sep}{}", backref_json(e))?;
            } else {
                writeln!(out, "  {}", backref_text(e))?;
            }
            shown += 1;
        }
        after = page.entries.last().map(BackrefEntry::key);
        if !page.more {
            break;
        }
    }
    if json {
        writeln!(out, "]}}")?;
    } else {
        writeln!(out, "{}", count(shown, "backref"))?;
    }
    Ok(true)
}

/// `refctl commit`.
pub fn commit(c: &ConnectArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let client = connect(c)?;
    let r = client.commit()?;
    if c.json {
        json_line(
            out,
            &json!({
                "generation": r.generation,
                "ops": r.ops,
                "heads": r.heads,
                "applied": r.applied,
                "freed": r.freed,
                "held": r.held,
                "quarantined": r.quarantined,
                "took_us": r.took_us,
            }),
        )?;
    } else {
        writeln!(
            out,
            "committed generation {}: {} ops, {} heads run ({} applied, {} held by barriers, {} \
             quarantined), {} extents freed, {:.3} ms",
            r.generation,
            r.ops,
            r.heads,
            r.applied,
            r.held,
            r.quarantined,
            r.freed,
            r.took_us as f64 / 1e3
        )?;
    }
    Ok(true)
}

/// `refctl barrier acquire|renew|release`.
pub fn barrier(cmd: BarrierCmd, out: &mut dyn Write) -> Result<bool, CmdError> {
    match cmd {
        BarrierCmd::Acquire(a) => {
            let client = connect(&a.conn)?;
            let r = client.barrier_acquire()?;
            let session = client.session_id().unwrap_or(0);
            if a.conn.json {
                json_line(
                    out,
                    &json!({"barrier_id": r.barrier_id, "seq": r.seq, "lease_ms": r.lease_ms,
                            "session_id": session}),
                )?;
            } else {
                writeln!(
                    out,
                    "barrier {} acquired: seq {}, lease {} ms (session {session}); it is released \
                     unless renewed within the lease: refctl barrier renew {}",
                    r.barrier_id, r.seq, r.lease_ms, r.barrier_id
                )?;
            }
        }
        BarrierCmd::Renew(a) => {
            let client = connect(&a.conn)?;
            let lease_ms = client.barrier_renew(a.id)?;
            if a.conn.json {
                json_line(out, &json!({"barrier_id": a.id, "lease_ms": lease_ms}))?;
            } else {
                writeln!(out, "barrier {} renewed: lease {lease_ms} ms", a.id)?;
            }
        }
        BarrierCmd::Release(a) => {
            let client = connect(&a.conn)?;
            client.barrier_release(a.id)?;
            if a.conn.json {
                json_line(out, &json!({"barrier_id": a.id, "released": true}))?;
            } else {
                writeln!(out, "barrier {} released", a.id)?;
            }
        }
    }
    Ok(true)
}

/// One freed extent as a line.
fn freed_line(x: &FreedExtent, json: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let data = x.kind == KIND_DATA;
    if json {
        return json_line(
            out,
            &json!({
                "generation": x.generation,
                "bytenr": x.bytenr,
                "num_bytes": x.num_bytes,
                "kind": if data { "data" } else { "tree" },
                "level": x.level,
            }),
        );
    }
    let kind = if data {
        "data".to_owned()
    } else {
        format!("tree level {}", x.level)
    };
    writeln!(
        out,
        "generation {} bytenr {} num_bytes {} {kind}",
        x.generation, x.bytenr, x.num_bytes
    )
}

/// Where `freed` reads, and for which consumer.
struct FreedRun<'a> {
    client: &'a Client,
    json: bool,
    cursor: FreedCursor,
    /// The start was not chosen (no --since, and no consumer or one that
    /// acknowledged nothing yet, which is where a new one is): a cursor
    /// behind the lists kept moves up to the oldest one.
    from_oldest: bool,
    consumer: Option<(String, u64)>,
    acked: u64,
    printed: u64,
}

impl FreedRun<'_> {
    /// Reads and prints pages until the daemon has no more.
    fn drain(&mut self, out: &mut dyn Write) -> Result<(), CmdError> {
        loop {
            let page = match self.client.freed(self.cursor, FREED_EXTENTS_MAX) {
                Err(e) if self.from_oldest && e.code() == Some(ErrorCode::FreedExpired) => {
                    let oldest = e.server_error().map_or(0, |s| s.detail);
                    if oldest <= self.cursor.generation {
                        return Err(e.into());
                    }
                    if let Some((name, _)) = &self.consumer {
                        eprintln!(
                            "refctl: consumer {name} has acknowledged nothing yet; it starts at \
                             generation {oldest}, the oldest list kept (lists before it were \
                             dropped: if {name} existed then, their extents are lost to it)"
                        );
                    }
                    self.cursor = FreedCursor {
                        generation: oldest,
                        index: 0,
                    };
                    continue;
                }
                other => other?,
            };
            for x in &page.extents {
                freed_line(x, self.json, out)?;
            }
            out.flush()?;
            self.printed += page.extents.len() as u64;
            self.cursor = FreedCursor::next(&page);
            // Once a page came back, the cursor is within the lists kept.
            self.from_oldest = false;
            if !page.more {
                return Ok(());
            }
        }
    }

    /// Acknowledges every commit whose list was printed entirely: those
    /// before the cursor's generation (a drained cursor starts a list).
    /// Only a cursor that moved says so: a start given by --since may be
    /// past the last commit.
    fn ack(&mut self, moved: bool) -> Result<Option<u64>, CmdError> {
        let Some((_, id)) = &self.consumer else {
            return Ok(None);
        };
        let upto = self.cursor.generation.saturating_sub(1);
        if !moved || upto <= self.acked {
            return Ok(None);
        }
        self.acked = self.client.freed_ack(*id, upto)?;
        Ok(Some(self.acked))
    }
}

/// The id of consumer `which` (a name, else a decimal or 0x-hex id)
/// among those STATS lists, with its name if listed.
fn find_consumer(client: &Client, which: &str) -> Result<(u64, Option<String>), CmdError> {
    let stats: Value = serde_json::from_str(&client.stats()?)
        .map_err(|e| CmdError::Usage(format!("the daemon's STATS is not JSON: {e}")))?;
    let listed: Vec<(u64, String)> = stats["freed"]["consumers"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| Some((c["id"].as_u64()?, c["name"].as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    if let Some((id, name)) = listed.iter().find(|(_, name)| name == which) {
        return Ok((*id, Some(name.clone())));
    }
    let Some(id) = crate::opfile::parse_u64(which) else {
        let names: Vec<&str> = listed.iter().map(|(_, n)| n.as_str()).collect();
        return Err(CmdError::Usage(format!(
            "no freed-list consumer is named {which:?} (subscribed: {})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    let name = listed.into_iter().find(|(i, _)| *i == id).map(|(_, n)| n);
    Ok((id, name))
}

/// `refctl freed --unsubscribe NAME|ID`.
fn unsubscribe(
    client: &Client,
    which: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<bool, CmdError> {
    let (id, name) = find_consumer(client, which)?;
    let acked = client.freed_unsubscribe(id)?;
    let label = match &name {
        Some(n) => format!("consumer {n} (id {id})"),
        None => format!("consumer {id}"),
    };
    if json {
        json_line(
            out,
            &json!({"consumer_id": id, "name": name, "unsubscribed": true,
                    "acked_generation": acked}),
        )?;
    } else if let Some(g) = acked {
        writeln!(
            out,
            "{label} unsubscribed (it had acknowledged generation {g}); the next commit \
             drops the freed lists every remaining consumer acknowledged"
        )?;
    } else {
        writeln!(
            out,
            "{label} unsubscribed (by an earlier send of this request)"
        )?;
    }
    Ok(true)
}

/// `refctl freed`.
pub fn freed(a: &FreedArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let client = connect(&a.conn)?;
    if let Some(which) = &a.unsubscribe {
        return unsubscribe(&client, which, a.conn.json, out);
    }
    let subscribed = match &a.consumer {
        Some(name) => Some((name.clone(), client.freed_subscribe(name)?)),
        None => None,
    };
    let acked = subscribed.as_ref().map_or(0, |(_, s)| s.acked_generation);
    let start = a.since.unwrap_or(acked);
    let mut run = FreedRun {
        client: &client,
        json: a.conn.json,
        cursor: FreedCursor::after_ack(start),
        from_oldest: a.since.is_none() && acked == 0,
        consumer: subscribed.map(|(name, s)| (name, s.consumer_id)),
        acked,
        printed: 0,
    };
    loop {
        let before = run.cursor;
        run.drain(out)?;
        let just_acked = if a.ack {
            run.ack(run.cursor != before)?
        } else {
            None
        };
        if !a.follow {
            break;
        }
        if let (Some(g), Some((name, _))) = (just_acked, &run.consumer) {
            eprintln!("refctl: consumer {name} acknowledged generation {g}");
        }
        std::thread::sleep(Duration::from_millis(a.interval_ms));
    }
    let extents = count(run.printed, "freed extent");
    let summary = match (&run.consumer, a.ack && run.acked > acked) {
        (Some((name, _)), true) => {
            format!(
                "{extents}; consumer {name} acknowledged generation {}",
                run.acked
            )
        }
        (Some((name, _)), false) if a.ack => format!(
            "{extents}; consumer {name} stays at generation {} (nothing new to acknowledge)",
            run.acked
        ),
        (Some((name, _)), false) => format!(
            "{extents}; consumer {name} stays at generation {} (--ack to acknowledge)",
            run.acked
        ),
        (None, _) => extents,
    };
    if a.conn.json {
        eprintln!("refctl: {summary}");
    } else {
        writeln!(out, "{summary}")?;
    }
    Ok(true)
}
