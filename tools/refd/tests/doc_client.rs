//! `docs/protocol.md` is enough to write a client: `doc_client/refd_doc_client.py`
//! is one, written from the document alone (Python standard library, no
//! refd code), and this test runs it against a live daemon. It exits 0
//! only when every check it makes of the daemon against the document
//! passed. Skipped, with a message, where `python3` is missing.
//!
//! The daemon runs with small bounds (sessions, connections, barrier
//! lease, freed extents kept) so that the client reaches each of them in
//! seconds, with `--verify` (for `REFUSED`), and with a TCP listener that
//! requires a token beside its unix socket. The first run leaves a
//! session, a barrier and a consumer behind; the daemon is killed (-9)
//! and restarted, and a second run checks what the document says
//! survives a restart, then stops the daemon (SIGTERM) to check
//! `SHUTTING_DOWN`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// The bound of one client run: a run takes about 10 s on the 2-core CI
/// machine.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

fn python3() -> bool {
    Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The client run `python3 refd_doc_client.py --connect unix:… --tcp …
/// --token-file … <extra>` against `d`, bounded by [`CLIENT_TIMEOUT`].
fn run_client(d: &Daemon, token: &str, extra: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/doc_client/refd_doc_client.py");
    let tcp = format!("tcp:{}", tcp_listener(&d.ready));
    let mut client = Command::new("python3")
        .arg(&script)
        .arg("--connect")
        .arg(format!("unix:{}", d.socket.display()))
        .args(["--tcp", &tcp, "--token-file", token])
        .args(extra)
        .spawn()
        .expect("run python3");
    let status = wait_bounded(&mut client, CLIENT_TIMEOUT, "the doc client");
    assert!(
        status.success(),
        "the doc client failed ({status}) with {extra:?}; its output says which checks"
    );
}

/// N of the ready line's "with N ops replayed".
fn ops_replayed(ready: &str) -> u64 {
    let end = ready
        .find(" ops replayed")
        .expect("ops replayed in the ready line");
    let start = ready[..end].rfind(' ').expect("a count") + 1;
    ready[start..end].parse().expect("a number of ops")
}

#[test]
fn a_client_written_from_the_protocol_document_passes() {
    if !python3() {
        println!("skipped: python3 is not installed (the doc client is a Python script)");
        return;
    }
    let Some(t) = Target::new("refd-doc-client", 256 * MIB, false) else {
        return;
    };
    let token = t.scratch.path().join("token");
    std::fs::write(&token, "doc-client-token\n").unwrap();
    let token = token.to_str().unwrap();
    let state = t.scratch.path().join("state.json");
    let state = state.to_str().unwrap();
    // Commits only when the client asks (or at a stop), so that the
    // batches it leaves before the kill are replayed from the log.
    let args = [
        "--listen",
        "tcp:127.0.0.1:0",
        "--token-file",
        token,
        "--verify",
        "--sessions-max",
        "16",
        "--connections-max",
        "8",
        "--barrier-lease-ms",
        "1000",
        "--freed-kept-max",
        "8",
        "--commit-interval-ms",
        "600000",
        // Frames of 2 MiB: a SUBMIT of submit_ops_max + 1 ops (bound by
        // the log record) fits in a frame, so TOO_MANY_OPS is reached.
        "--frame-bytes-max",
        "2097152",
    ];
    let mut d = Daemon::start(&t, &args);
    run_client(&d, token, &["--fill-consumers", "--save-state", state]);
    d.kill9();
    drop(d);
    let mut d = Daemon::start(&t, &args);
    assert!(ops_replayed(&d.ready) >= 1, "nothing replayed: {}", d.ready);
    let pid = d.child.id().to_string();
    run_client(&d, token, &["--check-state", state, "--stop-pid", &pid]);
    // The client stopped the daemon: a clean stop.
    let stopped = wait_bounded(&mut d.child, CLIENT_TIMEOUT, "refd's stop after SIGTERM");
    assert!(
        stopped.success(),
        "refd exited {stopped} after SIGTERM:\n{}",
        d.log()
    );
}
