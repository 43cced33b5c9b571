//! A second client written from `docs/protocol.md` alone, in another
//! language: `c_client/refd_c_client.c` (C, POSIX sockets, its own
//! CRC32C, no refd code). The test compiles it with the system's `cc`,
//! checks that it encodes the document's worked example byte for byte,
//! then runs its checks of the protocol's edges (request ids 0 and
//! reused, errors before HELLO, a refused HELLO, half-close, DURABLE
//! under NO_WAIT, STAMP_SEQ without a barrier, barriers from another
//! connection, BACKREFS and FREED cursors that point nowhere, error
//! order, tokens, BUSY for any first frame, the idle timer) against a
//! live daemon. Skipped, with a message, where `cc` is missing. About
//! 8 s.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// The bound of one client run (it takes about 7 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The daemon's `--idle-timeout-s` in this test: short, so the client
/// sees the idle timer, but long enough that the connections it holds
/// open to reach `--connections-max` stay open while it pings them.
const IDLE_S: &str = "2";

/// Compiles the client into `dir`; `None` (with a message) without `cc`.
fn compile(dir: &Path) -> Option<std::path::PathBuf> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c_client/refd_c_client.c");
    let exe = dir.join("refd_c_client");
    let status = Command::new(&cc)
        .args(["-std=c11", "-O1", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&exe)
        .arg(&source)
        .status();
    match status {
        Ok(s) if s.success() => Some(exe),
        Ok(s) => panic!("{cc} failed to compile {} ({s})", source.display()),
        Err(e) => {
            println!("skipped: no C compiler ({cc}: {e})");
            None
        }
    }
}

/// The bytes of the ```` ```hex NAME ```` block of `docs/protocol.md`.
fn doc_block(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/protocol.md");
    let doc = std::fs::read_to_string(path).expect("read docs/protocol.md");
    let start = format!("```hex {name}\n");
    let at = doc
        .find(&start)
        .unwrap_or_else(|| panic!("no block {name}"))
        + start.len();
    let end = at + doc[at..].find("```").expect("the block's end");
    doc[at..end]
        .lines()
        .flat_map(|l| l.split('|').next().unwrap_or("").split_whitespace())
        .map(|pair| u8::from_str_radix(pair, 16).expect("a hex byte"))
        .collect()
}

fn parse_hex_line(line: &str) -> Vec<u8> {
    line.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("a hex byte"))
        .collect()
}

#[test]
fn a_c_client_written_from_the_protocol_document_passes() {
    let Some(t) = Target::new("refd-c-client", 64 * MIB, false) else {
        return;
    };
    let Some(exe) = compile(t.scratch.path()) else {
        return;
    };

    let out = Command::new(&exe)
        .arg("--examples")
        .output()
        .expect("run it");
    assert!(out.status.success(), "--examples failed");
    let text = String::from_utf8(out.stdout).expect("hex");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(
        parse_hex_line(lines[0]),
        doc_block("hello-request"),
        "the C client's HELLO differs from the document's"
    );
    assert_eq!(
        parse_hex_line(lines[1]),
        doc_block("submit-request"),
        "the C client's SUBMIT differs from the document's"
    );

    // The token file ends in "\r\n": the document says both go.
    let token = t.scratch.path().join("token");
    std::fs::write(&token, "c-client-token\r\n").unwrap();
    let d = Daemon::start(
        &t,
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--token-file",
            token.to_str().unwrap(),
            "--connections-max",
            "4",
            "--idle-timeout-s",
            IDLE_S,
            "--commit-interval-ms",
            "600000",
        ],
    );
    let mut client = Command::new(&exe)
        .arg("--unix")
        .arg(&d.socket)
        .args(["--tcp", &tcp_listener(&d.ready)])
        .args(["--token", "c-client-token", "--idle-s", IDLE_S])
        .stdout(Stdio::inherit())
        .spawn()
        .expect("run the C client");
    let status = wait_bounded(&mut client, CLIENT_TIMEOUT, "the C client");
    assert!(
        status.success(),
        "the C client failed ({status}); its output says which checks:\n{}",
        d.log()
    );
}
