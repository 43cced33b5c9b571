//! The ftrace line header: `<comm>-<pid> [<cpu>] <flags> <timestamp>:
//! <event>: <fsid>:` (see the module doc of `trace`).

use memchr::memchr;

use crate::lex::{self, parse_u64};

/// The header of an ftrace line.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header<'a> {
    pub(super) pid: u32,
    pub(super) ts_ns: u64,
    pub(super) event: &'a [u8],
    pub(super) fsid: &'a [u8],
    pub(super) fields: &'a [u8],
}

/// Parse `S.FFFFFF` (any number of fraction digits up to 9) as ns.
fn parse_ts_ns(s: &[u8]) -> Option<u64> {
    let dot = memchr(b'.', s)?;
    let secs = parse_u64(&s[..dot])?;
    let frac = &s[dot + 1..];
    if frac.is_empty() || frac.len() > 9 {
        return None;
    }
    let mut ns = parse_u64(frac)?;
    for _ in frac.len()..9 {
        ns *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Split off the first space-delimited token (after leading spaces).
fn token(s: &[u8]) -> (&[u8], &[u8]) {
    let s = lex::trim_start(s);
    match memchr(b' ', s) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &[]),
    }
}

/// Try the ftrace header with the `[cpu]` field at `open`.
fn header_at(line: &[u8], open: usize) -> Option<Header<'_>> {
    // Before `[`: `-<pid>` then at least one space.
    let mut j = open;
    while j > 0 && line[j - 1] == b' ' {
        j -= 1;
    }
    if j == open {
        return None;
    }
    let pid_end = j;
    while j > 0 && line[j - 1].is_ascii_digit() {
        j -= 1;
    }
    if j == pid_end || j == 0 || line[j - 1] != b'-' {
        return None;
    }
    let pid = u32::try_from(parse_u64(&line[j..pid_end])?).ok()?;
    // `[cpu]`.
    let rest = &line[open + 1..];
    let close = memchr(b']', rest)?;
    parse_u64(&rest[..close])?;
    let rest = &rest[close + 1..];
    // Optional irq/preempt flags, then `timestamp:`.
    let (first, after) = token(rest);
    let (ts, rest) = match first.strip_suffix(b":").and_then(parse_ts_ns) {
        Some(ts) => (ts, after),
        None => {
            let (second, after) = token(after);
            (parse_ts_ns(second.strip_suffix(b":")?)?, after)
        }
    };
    let (event, rest) = token(rest);
    let event = event.strip_suffix(b":")?;
    let (fsid, fields) = token(rest);
    let fsid = fsid.strip_suffix(b":")?;
    Some(Header {
        pid,
        ts_ns: ts,
        event,
        fsid,
        fields,
    })
}

/// Parse the ftrace header: the first `[` whose surroundings fit.
pub(super) fn parse_header(line: &[u8]) -> Option<Header<'_>> {
    let mut from = 0;
    while let Some(rel) = memchr(b'[', &line[from..]) {
        let open = from + rel;
        if let Some(h) = header_at(line, open) {
            return Some(h);
        }
        from = open + 1;
    }
    None
}
