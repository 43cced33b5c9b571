//! refctl's client subcommands: each connects to a running `refd` with
//! [`refd_client`] (`--connect ADDR`, `--token-file F`), does one job and
//! prints its result as text or, with `--json`, as one JSON object (JSON
//! lines for streams: `submit` batches, `freed` extents).
//!
//! - [`ops`]: `add`, `drop`, `alloc`, `update` (one op from flags) and
//!   `submit` (an op file streamed into atomic batches, see
//!   [`crate::opfile`]);
//! - [`read`]: `get`, `backrefs`, `commit`, `freed`, `barrier`;
//! - [`stats`]: the `stats` summary.
//!
//! Exit status (as the rest of refctl): `Ok(true)` 0; `Ok(false)` 1, only
//! from `stats` when the engine latched a failure (the daemon answers, but
//! is not healthy: the "not clean" of fsck); any [`CmdError`] 2. Every
//! loop is bounded: pages of at most 16384 entries, batches of at most the
//! daemon's `submit_ops_max`, op lines of at most
//! [`LINE_BYTES_MAX`](crate::opfile::LINE_BYTES_MAX) bytes; `freed
//! --follow` sleeps a bounded interval between polls.

pub mod args;
pub mod ops;
pub mod read;
pub mod stats;

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use refd_client::refd_proto::{ErrorBody, INDEX_NONE};
use refd_client::{Client, ClientConfig, Error, ErrorCode, OpErrorCode, Outcome};

pub use args::{ClientCmd, ConnectArgs};

use crate::opfile::LineError;

/// Longest wait for one connection attempt (connect and HELLO).
pub const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(5);
/// The client name refctl gives in HELLO.
pub const CLIENT_NAME: &str = "refctl";

/// Why a client subcommand failed (exit status 2).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// Flags that do not make an op or a request.
    #[error("{0}")]
    Usage(String),
    /// The token file cannot be used.
    #[error("token file {}: {reason}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The op file cannot be opened.
    #[error("{file}: {source}")]
    OpenFile {
        /// The file.
        file: String,
        /// The open error.
        source: io::Error,
    },
    /// A line of the op file is not an op.
    #[error("{file}: {error}; {progress}")]
    OpLine {
        /// The file.
        file: String,
        /// The line and why.
        error: LineError,
        /// What was applied before it.
        progress: String,
    },
    /// A SUBMIT batch of an op file failed.
    #[error("{file}: {message}")]
    Batch {
        /// The file.
        file: String,
        /// Which line or batch, why, and what was applied before.
        message: String,
    },
    /// A request failed: the daemon's error, or the connection.
    #[error("{}", describe(.0))]
    Client(#[from] Error),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(#[from] io::Error),
}

/// Runs one client subcommand; see the module doc for the result.
pub fn run(cmd: ClientCmd, out: &mut dyn Write) -> Result<bool, CmdError> {
    use crate::opfile::OpAction;
    match cmd {
        ClientCmd::Add(a) => ops::one(OpAction::Add, &a, out),
        ClientCmd::Drop(a) => ops::one(OpAction::Drop, &a, out),
        ClientCmd::Alloc(a) => ops::one(OpAction::Alloc, &a, out),
        ClientCmd::Update(a) => ops::one(OpAction::Update, &a, out),
        ClientCmd::Submit(a) => ops::submit(&a, out),
        ClientCmd::Get(a) => read::get(&a, out),
        ClientCmd::Backrefs(a) => read::backrefs(&a, out),
        ClientCmd::Commit(a) => read::commit(&a.conn, out),
        ClientCmd::Stats(a) => stats::stats(&a.conn, out),
        ClientCmd::Freed(a) => read::freed(&a, out),
        ClientCmd::Barrier(b) => read::barrier(b, out),
    }
}

/// [`run`] with its output on stdout, buffered (flushed after each batch
/// of `submit` and each page of `freed`, so that they show as they come).
pub fn run_to_stdout(cmd: ClientCmd) -> Result<bool, CmdError> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let result = run(cmd, &mut out);
    let flushed = out.flush();
    let ok = result?;
    flushed?;
    Ok(ok)
}

/// Connects and says HELLO as `refctl`.
pub fn connect(c: &ConnectArgs) -> Result<Client, CmdError> {
    let mut config = ClientConfig::default();
    config.name = CLIENT_NAME.into();
    if let Some(path) = &c.token_file {
        config.token = read_token(path)?;
    }
    let timeout = Duration::from_millis(c.timeout_ms);
    config.request_timeout = timeout;
    config.reconnect_timeout = timeout;
    config.connect_timeout = timeout.min(CONNECT_TIMEOUT_MAX);
    Ok(Client::connect(&c.addr, config)?)
}

/// The token file's bytes without trailing newlines (as `refd serve
/// --token-file` reads it; [`refd_client::read_token_file`]).
pub fn read_token(path: &Path) -> Result<Vec<u8>, CmdError> {
    refd_client::read_token_file(path).map_err(|e| CmdError::TokenFile {
        path: e.path,
        reason: e.reason,
    })
}

/// A client error for a person: the daemon's error code by name (with
/// the INVALID_OP subcode), its message, the index or detail where the
/// code gives them a meaning, and whether the request may have run.
pub fn describe(e: &Error) -> String {
    let unknown = |outcome: &Outcome| match outcome {
        Outcome::Unknown => "; it may or may not have been executed",
        _ => "",
    };
    match e {
        Error::Server {
            request,
            error,
            outcome,
        } => format!("{request}: {}{}", server_error(error), unknown(outcome)),
        Error::Connect { addr, source, .. } => {
            let hint = match source.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    " (is refd running and listening there? --connect ADDR, default ./refd.sock)"
                }
                _ => "",
            };
            format!("cannot connect to {addr}: {source}{hint}")
        }
        Error::Timeout {
            request,
            timeout_ms,
            outcome,
            ..
        } => format!(
            "{request}: no reply within {timeout_ms} ms (--timeout-ms){}",
            unknown(outcome)
        ),
        Error::ConnectionLost {
            request,
            addr,
            reason,
            outcome,
        } => format!(
            "{request}: connection to {addr} lost: {reason}{}",
            unknown(outcome)
        ),
        other => other.to_string(),
    }
}

/// `CODE[/SUBCODE]: message (detail)` of an error frame.
pub fn server_error(e: &ErrorBody) -> String {
    let mut s = e.code.name().to_owned();
    if e.code == ErrorCode::InvalidOp {
        match OpErrorCode::from_u16(e.subcode) {
            Some(sub) => s = format!("{s}/{}", sub.name()),
            None => s = format!("{s}/subcode {}", e.subcode),
        }
    }
    s = format!("{s}: {}", e.message);
    let detail = match e.code {
        ErrorCode::InvalidOp | ErrorCode::Refused if e.index != INDEX_NONE => {
            format!("op index {} of the batch, bytenr {}", e.index, e.detail)
        }
        ErrorCode::TooManyOps => format!("at most {} ops per SUBMIT", e.detail),
        ErrorCode::RequestTooOld => format!("lowest request number answered {}", e.detail),
        ErrorCode::Failed if e.detail != u64::MAX => format!("device offset {}", e.detail),
        ErrorCode::FreedExpired => format!("oldest generation kept {}", e.detail),
        ErrorCode::FrameTooLarge => format!("limit {} bytes", e.detail),
        ErrorCode::UnsupportedVersion => {
            format!("the daemon speaks versions {}..={}", e.index, e.detail)
        }
        _ => String::new(),
    };
    if !detail.is_empty() {
        s = format!("{s} ({detail})");
    }
    s
}

/// `1 op`, `2 ops`.
pub(crate) fn count(n: u64, noun: &str) -> String {
    match (n, noun.ends_with('h')) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

/// One JSON value as a line.
pub(crate) fn json_line(out: &mut dyn Write, v: &serde_json::Value) -> io::Result<()> {
    writeln!(out, "{v}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn server_errors_name_code_subcode_and_detail() {
        let e = Error::Server {
            request: "SUBMIT",
            error: ErrorBody::invalid_op(OpErrorCode::ZeroNumBytes, 3, 4096, "num_bytes is 0"),
            outcome: Outcome::NotApplied,
        };
        assert_eq!(
            describe(&e),
            "SUBMIT: INVALID_OP/ZERO_NUM_BYTES: num_bytes is 0 (op index 3 of the batch, bytenr 4096)"
        );
        let e = Error::Server {
            request: "FREED",
            error: ErrorBody::new(ErrorCode::FreedExpired, "behind").with_detail(7),
            outcome: Outcome::NotApplied,
        };
        assert_eq!(
            describe(&e),
            "FREED: FREED_EXPIRED: behind (oldest generation kept 7)"
        );
        let e = Error::Server {
            request: "COMMIT",
            error: ErrorBody::new(ErrorCode::Failed, "EIO").with_detail(u64::MAX),
            outcome: Outcome::Unknown,
        };
        assert_eq!(
            describe(&e),
            "COMMIT: FAILED: EIO; it may or may not have been executed"
        );
    }

    #[test]
    fn counts_are_plural_when_not_one() {
        assert_eq!(count(1, "op"), "1 op");
        assert_eq!(count(0, "op"), "0 ops");
        assert_eq!(count(2, "batch"), "2 batches");
        assert_eq!(count(1, "batch"), "1 batch");
    }

    #[test]
    fn connect_errors_give_a_hint() {
        let e = Error::Connect {
            addr: "unix:/nowhere.sock".into(),
            source: Arc::new(io::Error::from(io::ErrorKind::NotFound)),
            outcome: Outcome::NotApplied,
        };
        let s = describe(&e);
        assert!(
            s.starts_with("cannot connect to unix:/nowhere.sock: "),
            "{s}"
        );
        assert!(s.contains("is refd running"), "{s}");
    }

    #[test]
    fn tokens_lose_trailing_newlines() {
        let dir = std::env::temp_dir().join(format!("refctl-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("token");
        std::fs::write(&p, b"secret\r\n\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), b"secret");
        std::fs::write(&p, b"\n").unwrap();
        assert!(matches!(read_token(&p), Err(CmdError::TokenFile { .. })));
        let missing = dir.join("missing");
        assert!(read_token(&missing).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
