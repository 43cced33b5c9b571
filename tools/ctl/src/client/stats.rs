//! `refctl stats`: the daemon's STATS object as a summary a person can
//! read (`--json`: the object as the daemon sent it). A failure latched
//! by the engine comes first and makes the exit status 1. Fields the
//! daemon does not send are shown as `?`; fields this summary does not
//! know are left out (the protocol says clients ignore them).

use std::io::Write;

use serde_json::Value;

use super::args::ConnectArgs;
use super::{connect, CmdError};

/// `refctl stats`.
pub fn stats(c: &ConnectArgs, out: &mut dyn Write) -> Result<bool, CmdError> {
    let client = connect(c)?;
    let text = client.stats()?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        CmdError::Usage(format!(
            "STATS: the daemon sent JSON that does not parse: {e}"
        ))
    })?;
    if c.json {
        writeln!(out, "{}", text.trim_end())?;
        return Ok(healthy(&v));
    }
    render(&v, out)?;
    Ok(healthy(&v))
}

/// No failure latched.
pub fn healthy(v: &Value) -> bool {
    v.get("failed").is_none_or(Value::is_null)
}

/// The value at a dotted path, as text (`?` when missing, `-` when null).
/// Strings come from the daemon and some from its clients (a freed-list
/// consumer's name is any UTF-8 a client subscribed), so control
/// characters are shown escaped: a name with a newline or a terminal
/// escape cannot forge lines or colours in the operator's terminal.
fn at(v: &Value, path: &str) -> String {
    match lookup(v, path) {
        Some(Value::String(s)) => printable(s),
        Some(Value::Null) => "-".into(),
        None => "?".into(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`), the rest as is.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, key| v.get(key))
}

fn number(v: &Value, path: &str) -> Option<f64> {
    lookup(v, path).and_then(Value::as_f64)
}

/// Bytes in binary units.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n:.0} B")
    } else {
        format!("{x:.1} {}", UNITS[unit])
    }
}

fn percent(part: Option<f64>, whole: Option<f64>) -> String {
    match (part, whole) {
        (Some(p), Some(w)) if w > 0.0 => format!("{:.1}%", 100.0 * p / w),
        _ => "?%".into(),
    }
}

/// Writes the summary: the failure first (if any), a title, then one
/// row per part of the daemon.
pub fn render(v: &Value, out: &mut dyn Write) -> std::io::Result<()> {
    if let Some(f) = v.get("failed").filter(|f| !f.is_null()) {
        writeln!(
            out,
            "FAILED: the engine latched a failure and acknowledges nothing more until refd \
             restarts: {} (device {}, operation {}, offset {})",
            at(f, "message"),
            at(f, "device"),
            at(f, "operation"),
            at(f, "offset")
        )?;
    }
    let server = match lookup(v, "server_id").and_then(Value::as_u64) {
        Some(id) => format!("{id:#018x}"),
        None => at(v, "server_id"),
    };
    writeln!(
        out,
        "refd {}, server {server}, up {} s",
        at(v, "version"),
        at(v, "uptime_s")
    )?;
    for (name, text) in engine_rows(v).into_iter().chain(service_rows(v)) {
        writeln!(out, "{name:<12} {text}")?;
    }
    Ok(())
}

/// Device, store, generation, log, commits, cache.
fn engine_rows(v: &Value) -> Vec<(&'static str, String)> {
    let flag = |path| match lookup(v, path) {
        Some(Value::Bool(true)) => "on",
        Some(Value::Bool(false)) => "off",
        _ => "?",
    };
    let (used, size) = (number(v, "log.used_bytes"), number(v, "log.bytes"));
    let (hits, misses) = (number(v, "cache.node_hits"), number(v, "cache.node_misses"));
    let shown = |n: Option<f64>| n.map_or("?".into(), bytes);
    vec![
        (
            "device",
            format!("{} (fs_id {})", at(v, "device"), at(v, "fs_id")),
        ),
        (
            "store",
            format!(
                "{}, ref-verify {}, dry run {}",
                at(v, "store"),
                flag("verify"),
                flag("dry_run")
            ),
        ),
        (
            "generation",
            format!(
                "{}; extents {}, pending ops {}, heads held {}, quarantined {}",
                at(v, "engine.generation"),
                at(v, "engine.extents"),
                at(v, "engine.pending_ops"),
                at(v, "engine.heads_held"),
                at(v, "engine.quarantined")
            ),
        ),
        (
            "log",
            format!(
                "{} used of {} ({}), durable lsn {}",
                shown(used),
                shown(size),
                percent(used, size),
                at(v, "log.durable_lsn")
            ),
        ),
        (
            "commits",
            format!(
                "{} ({} ops), longest {} ms, longest gap {} ms",
                at(v, "commits.count"),
                at(v, "commits.ops"),
                at(v, "commits.longest_ms.total"),
                at(v, "commits.gap_max_ms")
            ),
        ),
        (
            "node space",
            format!(
                "{} free of {} nodes ({} free), tree {}, pending {}, reserved {}; {} refused; \
                 spare windows {} nodes (bitmap runs of {}){}",
                at(v, "space.free_nodes"),
                at(v, "space.region_nodes"),
                percent(
                    number(v, "space.free_nodes"),
                    number(v, "space.region_nodes")
                ),
                at(v, "space.tree_nodes"),
                at(v, "space.pending_nodes"),
                at(v, "space.reserved_nodes"),
                at(v, "space.refused"),
                at(v, "space.spare_nodes"),
                at(v, "space.bitmap_run_nodes"),
                match lookup(v, "space.no_spare_window") {
                    Some(Value::Bool(true)) => ", NO SPARE WINDOW: bitmap runs go first fit",
                    _ => "",
                }
            ),
        ),
        (
            "cache",
            format!(
                "{} extents; tree nodes {} hits, {} misses ({} hits), {}",
                at(v, "cache.extents"),
                at(v, "cache.node_hits"),
                at(v, "cache.node_misses"),
                percent(hits, hits.zip(misses).map(|(h, m)| h + m)),
                shown(number(v, "cache.node_bytes"))
            ),
        ),
    ]
}

/// Refused heads listed under the quarantine row (`--json` has all that
/// STATS sends).
const QUARANTINE_SHOWN: usize = 5;

/// Sessions, connections, freed lists with each consumer's backlog,
/// barriers, status.
fn service_rows(v: &Value) -> Vec<(&'static str, String)> {
    let mut freed = format!(
        "{} lists, {} extents kept (max {}), oldest generation {}",
        at(v, "freed.lists"),
        at(v, "freed.extents"),
        at(v, "freed.kept_max"),
        at(v, "freed.oldest_generation")
    );
    let consumers = lookup(v, "freed.consumers").and_then(Value::as_array);
    for c in consumers.into_iter().flatten() {
        freed += &format!(
            "\n  consumer {} (id {}): acked generation {}, backlog {} generations",
            at(c, "name"),
            at(c, "id"),
            at(c, "acked_generation"),
            at(c, "backlog_generations")
        );
    }
    let mut quarantine = format!(
        "{} heads refused kept ({} since start)",
        at(v, "quarantine.kept"),
        at(v, "quarantine.total")
    );
    let newest = lookup(v, "quarantine.newest").and_then(Value::as_array);
    for q in newest.into_iter().flatten().take(QUARANTINE_SHOWN) {
        quarantine += &format!("\n  generation {}: {}", at(q, "generation"), at(q, "error"));
    }
    let status = if healthy(v) { "ok" } else { "FAILED" };
    vec![
        (
            "sessions",
            format!(
                "{} kept of {} ({} registered)",
                at(v, "sessions.kept"),
                at(v, "sessions.max"),
                at(v, "sessions.registered")
            ),
        ),
        (
            "connections",
            format!(
                "{} open of {} ({} accepted, {} refused)",
                at(v, "connections.open"),
                at(v, "connections.max"),
                at(v, "connections.accepted"),
                at(v, "connections.refused")
            ),
        ),
        ("freed", freed),
        ("quarantine", quarantine),
        (
            "barriers",
            format!(
                "{} held, lease {} ms, seq {}",
                at(v, "barriers.held"),
                at(v, "barriers.lease_ms"),
                at(v, "engine.barrier_seq")
            ),
        ),
        ("status", status.into()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(failed: Value) -> Value {
        serde_json::json!({
            "version": "0.1.0", "server_id": 77, "uptime_s": 1.25, "device": "/dev/x",
            "fs_id": "ab", "store": "lockfree", "verify": false, "dry_run": false,
            "failed": failed,
            "engine": {"generation": 5, "extents": 7, "pending_ops": 3, "heads_held": 0, "quarantined": 0,
                       "barrier_seq": 9},
            "log": {"bytes": 1048576, "used_bytes": 262144, "durable_lsn": 12},
            "commits": {"count": 4, "ops": 100, "gap_max_ms": 1000.5,
                        "longest_ms": {"total": 2.25}},
            "cache": {"extents": 10, "node_hits": 3, "node_misses": 1, "node_bytes": 65536},
            "space": {"region_nodes": 1000, "free_nodes": 250, "pending_nodes": 5, "tree_nodes": 700,
                      "reserved_nodes": 40, "reserved_units": 9, "refused": 2,
                      "bitmap_run_nodes": 2, "spare_nodes": 4, "no_spare_window": false},
            "sessions": {"kept": 2, "max": 1024, "registered": 2},
            "freed": {"lists": 1, "extents": 2, "kept_max": 4194304, "oldest_generation": 4,
                      "consumers": [{"id": 1, "name": "space-map", "acked_generation": 3,
                                     "backlog_generations": 2}]},
            "barriers": {"held": 1, "lease_ms": 30000},
            "quarantine": {"kept": 1, "total": 3, "newest": [{"generation": 4, "bytenr": 8192,
                           "error": "extent 8192: drop of 'x' by 1 but only 0 exist"}]},
            "connections": {"open": 1, "max": 1024, "accepted": 9, "refused": 0},
            "some_future_field": {"x": 1},
        })
    }

    fn text(v: &Value) -> String {
        let mut out = Vec::new();
        render(v, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn summary_of_a_healthy_daemon() {
        let v = sample(Value::Null);
        assert!(healthy(&v));
        let t = text(&v);
        for want in [
            "refd 0.1.0, server 0x000000000000004d, up 1.2 s",
            "device       /dev/x (fs_id ab)",
            "generation   5; extents 7, pending ops 3",
            "log          256.0 KiB used of 1.0 MiB (25.0%), durable lsn 12",
            "commits      4 (100 ops), longest 2.2 ms, longest gap 1000.5 ms",
            "3 hits, 1 misses (75.0% hits), 64.0 KiB",
            "node space   250 free of 1000 nodes (25.0% free), tree 700, pending 5, reserved 40; \
             2 refused; spare windows 4 nodes (bitmap runs of 2)\n",
            "  consumer space-map (id 1): acked generation 3, backlog 2 generations",
            "barriers     1 held, lease 30000 ms, seq 9",
            "quarantine   1 heads refused kept (3 since start)\n  generation 4: extent 8192: \
             drop of 'x' by 1 but only 0 exist",
            "status       ok",
        ] {
            assert!(t.contains(want), "{want:?} not in\n{t}");
        }
        assert!(!t.contains("FAILED"), "{t}");
        let mut v = v;
        v["space"]["no_spare_window"] = true.into();
        let t = text(&v);
        let want = "(bitmap runs of 2), NO SPARE WINDOW: bitmap runs go first fit\n";
        assert!(t.contains(want), "{want:?} not in\n{t}");
    }

    /// A consumer's name is a client's text: shown escaped, it cannot
    /// start a line of its own or colour the terminal.
    #[test]
    fn client_text_is_shown_escaped() {
        let mut v = sample(Value::Null);
        v["freed"]["consumers"][0]["name"] = "x\nstatus       ok\u{1b}[31m".into();
        let t = text(&v);
        assert!(!t.contains('\u{1b}'), "{t}");
        let status_lines = t.lines().filter(|l| l.starts_with("status")).count();
        assert_eq!(status_lines, 1, "{t}");
        assert!(
            t.contains("consumer x\\nstatus       ok\\u{1b}[31m (id 1)"),
            "{t}"
        );
    }

    #[test]
    fn a_latched_failure_comes_first() {
        let v = sample(serde_json::json!({
            "device": "/dev/x", "operation": "log write", "offset": 4096,
            "message": "EIO at 4096"
        }));
        assert!(!healthy(&v));
        let t = text(&v);
        assert!(t.starts_with("FAILED: "), "{t}");
        assert!(t.contains("EIO at 4096 (device /dev/x, operation log write, offset 4096)"));
        assert!(t.ends_with("status       FAILED\n"), "{t}");
    }

    #[test]
    fn missing_fields_show_as_unknown() {
        let t = text(&serde_json::json!({}));
        assert!(
            t.contains("generation   ?; extents ?, pending ops ?"),
            "{t}"
        );
        assert!(t.contains("log          ? used of ? (?%)"), "{t}");
    }

    #[test]
    fn binary_units() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1023.0), "1023 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * (1u64 << 30) as f64), "3.0 GiB");
    }
}
