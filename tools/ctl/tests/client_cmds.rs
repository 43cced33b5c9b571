//! The client subcommands of the real `refctl` binary against a `refd`
//! started in this process (`refd::start`) on a file device in a scratch
//! directory (created and formatted by the daemon), over a unix socket:
//! every subcommand, text and JSON output, op files in both forms with
//! their errors mapped to lines, freed lists with a consumer (also
//! followed, and removed), barriers, and a daemon that is not there;
//! and over TCP loopback to a daemon that checks a token.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use refd::{Listen, ServeConfig};
use refd_ioring::test_support::Scratch;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The data extent most steps use.
const DATA: u64 = MIB;
/// A tree block.
const TREE: u64 = 0x400_0000;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs refctl with `args` plus `--connect` to the daemon; stdin from
/// `input` if given.
fn refctl_at(socket: &Path, args: &[&str], input: Option<&str>) -> Out {
    refctl_to(&format!("unix:{}", socket.display()), args, input)
}

/// [`refctl_at`] the daemon at `addr`.
fn refctl_to(addr: &str, args: &[&str], input: Option<&str>) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refctl"));
    cmd.args(args)
        .args(["--connect", addr])
        .args(["--timeout-ms", "10000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run refctl");
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(text) = input {
        stdin.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("refctl output");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

struct World {
    scratch: Scratch,
    socket: PathBuf,
}

impl World {
    fn run(&self, args: &[&str]) -> Out {
        refctl_at(&self.socket, args, None)
    }

    /// Runs and expects exit status 0; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.code, 0,
            "refctl {args:?}\nstdout:\n{}\nstderr:\n{}",
            o.stdout, o.stderr
        );
        o.stdout
    }

    /// Runs and expects exit status 2; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_eq!(
            o.code, 2,
            "refctl {args:?}\nstdout:\n{}\nstderr:\n{}",
            o.stdout, o.stderr
        );
        o.stderr
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.ok(&all);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    fn json_lines(&self, args: &[&str]) -> Vec<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        self.ok(&all)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{args:?}: {e}: {l}")))
            .collect()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.scratch.path().join(name);
        std::fs::write(&p, text).expect("write op file");
        p.display().to_string()
    }

    fn refs(&self, bytenr: u64) -> i64 {
        let v = self.json(&["get", &bytenr.to_string()]);
        v["refs"].as_i64().expect("refs")
    }
}

#[test]
fn every_client_subcommand_against_a_live_daemon() {
    let started = Instant::now();
    let Some(scratch) = Scratch::new("refctl-client") else {
        return;
    };
    let socket = scratch.path().join("refd.sock");
    let config = ServeConfig {
        device: scratch.path().join("refd.img"),
        device_create_bytes: 128 * MIB,
        listen: vec![Listen::Unix(socket.clone())],
        metrics: None,
        // Only the test commits: counts stay pending until it does.
        commit_interval_ms: 600_000,
        dirty_trigger_mib: 0,
        ..ServeConfig::default()
    };
    let running = refd::start(config).expect("start refd");
    let w = World { scratch, socket };

    single_ops(&w);
    text_files(&w);
    json_files(&w);
    file_errors(&w);
    many_ops(&w);
    reads(&w);
    freed_and_stats(&w);
    unsubscribe(&w);
    barriers(&w);
    no_daemon(&w);

    running.stop();
    running.wait().expect("refd stopped cleanly");
    eprintln!("client_cmds: {:.1} s", started.elapsed().as_secs_f64());
}

/// The client subcommands over TCP loopback (port 0) to a daemon with a
/// token: with the token file they work; with a wrong token or none the
/// daemon's AUTH_FAILED is the error (status 2).
#[test]
fn client_subcommands_over_tcp_with_a_token() {
    let Some(scratch) = Scratch::new("refctl-tcp") else {
        return;
    };
    let config = ServeConfig {
        device: scratch.path().join("refd.img"),
        device_create_bytes: 128 * MIB,
        listen: vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
        metrics: None,
        token: Some(b"s3cret".to_vec()),
        ..ServeConfig::default()
    };
    let running = refd::start(config).expect("start refd");
    let tcp = running.addresses().into_iter().next().expect("a listener");
    assert!(tcp.starts_with("tcp:127.0.0.1:"), "{tcp}");
    let file = |name: &str, text: &str| {
        let p = scratch.path().join(name);
        std::fs::write(&p, text).expect("write token file");
        p.display().to_string()
    };
    let (good, wrong) = (file("token", "s3cret\n"), file("wrong", "s3cre7\n"));
    let data = "--data --bytenr 1048576 --num-bytes 4096 --root 5 --offset 0 --objectid 257";
    for args in [
        words(&format!("alloc {data}")),
        vec!["get", "1048576", "--json"],
        vec!["stats", "--json"],
    ] {
        let o = refctl_to(&tcp, &[&args[..], &["--token-file", &good]].concat(), None);
        assert_eq!(o.code, 0, "{args:?}: {}{}", o.stdout, o.stderr);
    }
    let o = refctl_to(
        &tcp,
        &["get", "1048576", "--json", "--token-file", &good],
        None,
    );
    let v: Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(v["refs"], 1, "{v}");
    for token in [&["--token-file", &wrong][..], &[][..]] {
        let o = refctl_to(&tcp, &[&["stats"][..], token].concat(), None);
        assert_eq!(o.code, 2, "{token:?}: {}{}", o.stdout, o.stderr);
        assert!(
            o.stderr
                .contains("HELLO: AUTH_FAILED: wrong or missing token"),
            "{token:?}: {}",
            o.stderr
        );
    }
    running.stop();
    running.wait().expect("refd stopped cleanly");
}

fn single_ops(w: &World) {
    let data = "--data --bytenr 1048576 --num-bytes 4096 --root 5 --offset 0 --objectid";
    let out = w.ok(&words(&format!("alloc {data} 257")));
    assert!(out.starts_with("alloc data 1048576: lsn "), "{out}");
    assert!(out.trim_end().ends_with(", durable"), "{out}");
    let v = w.json(&words(&format!("add {data} 258")));
    assert_eq!(v["durable"], true);
    assert!(v["lsn"].as_u64().unwrap() > 0);
    w.ok(&words(&format!("drop {data} 258")));
    assert_eq!(w.refs(DATA), 1);

    // A tree block: allocated with an extent_op, updated, shared.
    let tree = "--tree --bytenr 0x4000000 --num-bytes 16384 --level 1";
    w.ok(&words(&format!(
        "alloc {tree} --root 5 --full-backref --key 256,84,0"
    )));
    w.ok(&words(&format!("update {tree} --key 257,84,0")));
    w.ok(&words(
        "add --shared-block --bytenr 0x4000000 --num-bytes 16384 --parent 0x5000000 \
         --level 1 --seq 0",
    ));
    assert_eq!(w.refs(TREE), 2);

    // Bad flags are refused before connecting; a bad value by the daemon.
    let e = w.fails(&words("add --data --bytenr 1 --num-bytes 2 --root 5"));
    assert!(
        e.contains("missing --objectid (required by add data)"),
        "{e}"
    );
    let e = w.fails(&words("update --data --bytenr 1 --num-bytes 2"));
    assert!(
        e.contains("update needs --full-backref and/or --key"),
        "{e}"
    );
    let e = w.fails(&words(
        "add --data --bytenr 8192 --num-bytes 0 --root 5 --objectid 1 --offset 0",
    ));
    assert!(e.contains("SUBMIT: INVALID_OP/ZERO_NUM_BYTES"), "{e}");
    assert!(e.contains("bytenr 8192"), "{e}");
}

/// A command line split at white space.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn text_files(w: &World) {
    // Text, batches of 2: five ops in three atomic SUBMITs.
    let text = w.file(
        "ops.txt",
        "# five ops on a new data extent\n\
         alloc data bytenr=0x200000 num_bytes=4096 root=5 objectid=300 offset=0\n\
         \n\
         add data bytenr=0x200000 num-bytes=4096 root=5 objectid=260 offset=4096\n\
         add shared-data bytenr=0x200000 num_bytes=4096 parent=0x9000   # via a leaf\n\
         add data bytenr=0x200000 num_bytes=4096 root=5 objectid=260 offset=0\n\
         drop data bytenr=0x200000 num_bytes=4096 root=5 objectid=260 offset=0 seq=0\n",
    );
    let out = w.ok(&["submit", &text, "--batch", "2"]);
    let lines: Vec<&str> = out.lines().collect();
    let want = [
        "batch 1: lines 2-4, 2 ops, lsn ",
        "batch 2: lines 5-6, 2 ops, lsn ",
        "batch 3: lines 7-7, 1 op, lsn ",
        "total: 5 ops in 3 batches, lsn ",
    ];
    assert_eq!(lines.len(), want.len(), "{out}");
    for (line, want) in lines.iter().zip(want) {
        assert!(line.starts_with(want), "{want:?} in\n{out}");
    }
    assert!(lines[3].ends_with("all durable"), "{out}");
    assert_eq!(w.refs(0x200000), 3);
    let out = w.ok(&["submit", &text, "--check"]);
    assert!(out.contains("5 ops on 7 lines (text)"), "{out}");
    let e = w.fails(&["submit", &text, "--batch", "100000"]);
    assert!(e.contains("above the daemon's submit_ops_max"), "{e}");
}

fn json_files(w: &World) {
    // JSON lines, also through stdin.
    let json = "{\"op\":\"alloc\",\"kind\":\"tree\",\"bytenr\":\"0x600000\",\"num_bytes\":16384,\"root\":5,\"level\":0}\n\
                {\"op\":\"add\",\"kind\":\"tree\",\"bytenr\":6291456,\"num_bytes\":16384,\"root\":7,\"level\":0}\n";
    let jfile = w.file("ops.jsonl", json);
    let v = w.json_lines(&["submit", &jfile]);
    assert_eq!(v.len(), 2, "{v:?}");
    assert_eq!(
        (v[0]["batch"].as_u64(), v[0]["ops"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(v[1]["summary"], true);
    assert_eq!(v[1]["ops"], 2);
    assert_eq!(v[1]["durable"], true);
    let o = refctl_at(
        &w.socket,
        &["submit", "-"],
        Some("add tree bytenr=0x600000 num_bytes=16384 root=8 level=0\n"),
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("total: 1 op in 1 batch,"), "{}", o.stdout);
    assert_eq!(w.refs(0x600000), 3);
}

fn file_errors(w: &World) {
    // An op the daemon refuses: its line, its reason, what was applied.
    let bad = w.file(
        "bad.jsonl",
        "{\"op\":\"alloc\",\"kind\":\"shared-data\",\"bytenr\":7340032,\"num_bytes\":4096,\"parent\":4096}\n\
         {\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":7340032,\"num_bytes\":4096,\"parent\":8192}\n\
         \n\
         {\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":7340032,\"num_bytes\":4096,\"parent\":12288}\n\
         {\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":7340032,\"num_bytes\":0,\"parent\":16384}\n\
         {\"op\":\"add\",\"kind\":\"shared-data\",\"bytenr\":7340032,\"num_bytes\":4096,\"parent\":20480}\n",
    );
    let e = w.fails(&["submit", &bad, "--batch", "2"]);
    assert!(e.contains("line 5: INVALID_OP/ZERO_NUM_BYTES"), "{e}");
    assert!(
        e.contains("batch 2 (lines 4-5, 2 ops) was not applied"),
        "{e}"
    );
    assert!(
        e.contains("applied before: 1 batch (2 ops, lines 1-2"),
        "{e}"
    );
    assert_eq!(w.refs(0x700000), 2, "the first batch only");

    // A line that is not an op: nothing from its batch on is sent.
    let broken = w.file(
        "broken.txt",
        "add shared-data bytenr=0x800000 num_bytes=4096 parent=4096\n\
         add data bytenr=0x800000 num_bytes=4096 root=5 objectid=9\n",
    );
    let e = w.fails(&["submit", &broken]);
    assert!(
        e.contains("line 2: missing offset (required by add data)"),
        "{e}"
    );
    assert!(
        e.contains("nothing from line 1 on was sent; nothing was applied before"),
        "{e}"
    );
    assert_eq!(w.refs(0x800000), 0);
    let e = w.fails(&["submit", &broken, "--check"]);
    assert!(e.contains("line 2: missing offset"), "{e}");
}

fn many_ops(w: &World) {
    // More backrefs than one BACKREFS page (16384), in one SUBMIT.
    let mut many =
        String::from("alloc data bytenr=0x1000000 num_bytes=4096 root=5 objectid=1 offset=0\n");
    for i in 2..=17_000u64 {
        many.push_str(&format!(
            "add data bytenr=0x1000000 num_bytes=4096 root=5 objectid={i} offset=0\n"
        ));
    }
    let many = w.file("many.txt", &many);
    let out = w.ok(&["submit", &many]);
    assert!(out.contains("total: 17000 ops in 1 batch,"), "{out}");
}

fn reads(w: &World) {
    let out = w.ok(&["get", "1048576", "0x4000000", "999"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        "1048576: refs 1 (committed 0, pending +1), num_bytes 4096, data, flags PENDING|ALLOC_PENDING|DATA"
    );
    assert!(
        lines[1].starts_with(
            "67108864: refs 2 (committed 0, pending +2), num_bytes 16384, tree level 1,"
        ),
        "{out}"
    );
    assert_eq!(lines[2], "999: no extent (nothing committed or pending)");

    // btrfs key order: type, then root/parent, objectid, offset.
    let out = w.ok(&["backrefs", "0x200000"]);
    assert_eq!(
        out,
        "2097152: refs 3, num_bytes 4096, data, item flags -\n\
         \x20 EXTENT_DATA_REF root 5 objectid 260 offset 4096 count 1\n\
         \x20 EXTENT_DATA_REF root 5 objectid 300 offset 0 count 1\n\
         \x20 SHARED_DATA_REF parent 36864 count 1\n\
         3 backrefs\n"
    );
    let v = w.json(&["backrefs", "0x4000000"]);
    assert_eq!(v["kind"], "tree");
    assert_eq!(v["level"], 1);
    let refs: Vec<&str> = v["backrefs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(refs, ["TREE_BLOCK_REF", "SHARED_BLOCK_REF"]);
    assert_eq!(v["backrefs"][1]["parent"], 0x500_0000);

    // Two pages.
    let out = w.ok(&["backrefs", "0x1000000"]);
    assert!(
        out.ends_with("\n17000 backrefs\n"),
        "{}",
        &out[out.len() - 200..]
    );
    let v = w.json(&["backrefs", "0x1000000"]);
    let all = v["backrefs"].as_array().unwrap();
    assert_eq!(all.len(), 17_000);
    assert!(all
        .windows(2)
        .all(|p| p[0]["objectid"].as_u64() < p[1]["objectid"].as_u64()));

    let out = w.ok(&["commit"]);
    assert!(out.starts_with("committed generation "), "{out}");
    let v = w.json(&["get", "1048576"]);
    assert_eq!(
        (v["refs"].as_i64(), v["committed_refs"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(v["flags"], serde_json::json!(["COMMITTED", "DATA"]));
    let out = w.ok(&["backrefs", "0x4000000"]);
    assert!(out.contains("item flags TREE_BLOCK|FULL_BACKREF"), "{out}");

    // Only an extent_op pending on an extent nothing else is known of:
    // LOOKUP says PENDING with no size, so no kind either (it was
    // printed as a tree block of level 0).
    w.ok(&[
        "update",
        "--tree",
        "--level",
        "2",
        "--bytenr",
        "0xA000000",
        "--num-bytes",
        "16384",
        "--full-backref",
    ]);
    let out = w.ok(&["get", "0xA000000"]);
    assert_eq!(
        out,
        "167772160: refs 0 (committed 0, pending +0), num_bytes 0, \
         size and kind unknown (only an extent_op pending), flags PENDING\n"
    );
    let v = w.json(&["get", "0xA000000"]);
    assert_eq!(v["kind"], Value::Null, "{v}");
    assert_eq!(v["flags"], serde_json::json!(["PENDING"]));
}

fn freed_and_stats(w: &World) {
    // Subscribe before anything is freed.
    let out = w.ok(&["freed", "--consumer", "space-map"]);
    assert_eq!(
        out,
        "0 freed extents; consumer space-map stays at generation 0 (--ack to acknowledge)\n"
    );
    w.ok(&[
        "drop",
        "--data",
        "--bytenr",
        "1048576",
        "--num-bytes",
        "4096",
        "--root",
        "5",
        "--objectid",
        "257",
        "--offset",
        "0",
    ]);
    let c = w.json(&["commit"]);
    let generation = c["generation"].as_u64().unwrap();
    assert_eq!(c["freed"], 1);

    let v = w.json_lines(&["freed", "--since", &(generation - 1).to_string()]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0]["bytenr"], DATA);
    assert_eq!(v[0]["generation"], generation);
    assert_eq!(v[0]["kind"], "data");
    let out = w.ok(&["freed", "--consumer", "space-map", "--ack"]);
    assert_eq!(
        out,
        format!(
            "generation {generation} bytenr 1048576 num_bytes 4096 data\n\
             1 freed extent; consumer space-map acknowledged generation {generation}\n"
        )
    );
    let out = w.ok(&["freed", "--consumer", "space-map"]);
    assert!(
        out.starts_with("0 freed extents; consumer space-map stays at generation"),
        "{out}"
    );
    let e = w.fails(&["freed", "--ack"]);
    assert!(e.contains("--consumer"), "{e}");

    follow(w);

    let out = w.ok(&["stats"]);
    assert!(out.contains("status       ok"), "{out}");
    assert!(out.contains("consumer space-map (id "), "{out}");
    assert!(
        out.contains(&format!("acked generation {generation}")),
        "{out}"
    );
    assert!(!out.contains("FAILED"), "{out}");
    let v = w.json(&["stats"]);
    assert!(v["engine"]["generation"].as_u64().unwrap() >= generation);
    assert!(v["failed"].is_null());
    assert!(v["freed"]["consumers"].as_array().unwrap().len() >= 2);
}

/// A consumer that never acknowledges holds a freed list until
/// `freed --unsubscribe` removes it (by name or by id); the next commit
/// drops the list, a second removal is `CONSUMER_UNKNOWN`, and the name
/// subscribes again as a new consumer.
fn unsubscribe(w: &World) {
    // Only `space-map` and `dead` are left holding lists.
    let follower = w.json(&["freed", "--unsubscribe", "follower"]);
    assert_eq!(follower["unsubscribed"], true, "{follower}");
    w.ok(&["freed", "--consumer", "dead"]);
    let data = "--data --bytenr 0x9000000 --num-bytes 4096 --root 5 --offset 0 --objectid 300";
    w.ok(&words(&format!("alloc {data}")));
    w.ok(&["commit"]);
    w.ok(&words(&format!("drop {data}")));
    let freed_at = w.json(&["commit"])["generation"].as_u64().unwrap();
    w.ok(&["freed", "--consumer", "space-map", "--ack"]);
    w.ok(&["commit"]);
    let v = w.json(&["stats"]);
    assert!(
        v["freed"]["lists"].as_u64().unwrap() >= 1,
        "held by dead: {v}"
    );
    let dead_id = consumer_id(&v, "dead").expect("dead is listed");
    assert!(dead_id > follower["consumer_id"].as_u64().unwrap());

    let out = w.ok(&["freed", "--unsubscribe", &dead_id.to_string()]);
    assert!(
        out.starts_with(&format!("consumer dead (id {dead_id}) unsubscribed")),
        "{out}"
    );
    w.ok(&["commit"]);
    let v = w.json(&["stats"]);
    assert_eq!(v["freed"]["lists"], 0, "dropped once dead is gone: {v}");
    let names: Vec<&str> = v["freed"]["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["space-map"]);

    let e = w.fails(&["freed", "--unsubscribe", &dead_id.to_string()]);
    assert!(e.contains("FREED_UNSUBSCRIBE: CONSUMER_UNKNOWN"), "{e}");
    let e = w.fails(&["freed", "--unsubscribe", "dead"]);
    assert!(
        e.contains("no freed-list consumer is named \"dead\""),
        "{e}"
    );
    assert!(e.contains("subscribed: space-map"), "{e}");
    let e = w.fails(&["freed", "--unsubscribe", "dead", "--ack"]);
    assert!(e.contains("--ack"), "{e}");
    // The name again: a new consumer, after the dropped list.
    let out = w.ok(&["freed", "--consumer", "dead"]);
    assert!(
        out.contains(&format!("consumer dead stays at generation {freed_at}")),
        "{out}"
    );
    let v = w.json(&["stats"]);
    let again = consumer_id(&v, "dead").expect("dead is listed again");
    assert!(again > dead_id, "a new id");
}

/// The id of consumer `name` in a STATS object.
fn consumer_id(stats: &Value, name: &str) -> Option<u64> {
    stats["freed"]["consumers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["id"].as_u64())
}

/// `freed --follow` prints an extent freed after it started.
fn follow(w: &World) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_refctl"))
        .args([
            "freed",
            "--follow",
            "--interval-ms",
            "20",
            "--consumer",
            "follower",
            "--ack",
        ])
        .arg("--connect")
        .arg(format!("unix:{}", w.socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn refctl freed --follow");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Free the shared tree block and the 0x600000 block once it polls.
    std::thread::sleep(Duration::from_millis(100));
    let drop_file = w.file(
        "drop.txt",
        "drop tree bytenr=0x600000 num_bytes=16384 root=5 level=0\n\
         drop tree bytenr=0x600000 num_bytes=16384 root=7 level=0\n\
         drop tree bytenr=0x600000 num_bytes=16384 root=8 level=0\n",
    );
    w.ok(&["submit", &drop_file]);
    let generation = w.json(&["commit"])["generation"].as_u64().unwrap();
    let want = format!("generation {generation} bytenr 6291456 num_bytes 16384 tree level 0");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while !seen.contains(&want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(
        seen.contains(&want),
        "follow printed {seen:?}, expected {want:?}"
    );
}

fn barriers(w: &World) {
    let out = w.ok(&["barrier", "acquire"]);
    assert!(out.starts_with("barrier "), "{out}");
    assert!(
        out.contains("it is released unless renewed within the lease"),
        "{out}"
    );
    let v = w.json(&["barrier", "acquire"]);
    let id = v["barrier_id"].as_u64().unwrap().to_string();
    assert_eq!(v["lease_ms"], 30_000);
    let out = w.ok(&["barrier", "renew", &id]);
    assert_eq!(out, format!("barrier {id} renewed: lease 30000 ms\n"));
    let out = w.ok(&["barrier", "release", &id]);
    assert_eq!(out, format!("barrier {id} released\n"));
    let e = w.fails(&["barrier", "release", &id]);
    assert!(e.contains("BARRIER_RELEASE: BARRIER_UNKNOWN"), "{e}");
    let v = w.json(&["stats"]);
    assert_eq!(v["barriers"]["held"], 1, "the first barrier is still held");
}

fn no_daemon(w: &World) {
    let missing = w.scratch.path().join("nobody.sock");
    let started = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_refctl"))
        .args(["stats", "--timeout-ms", "300", "--connect"])
        .arg(format!("unix:{}", missing.display()))
        .output()
        .expect("run refctl");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "refctl: cannot connect to unix:{}: ",
            missing.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("is refd running"), "{stderr}");
    assert!(o.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(5));
    // A token file is sent (this daemon needs none and ignores it).
    let token = w.file("token", "secret\n");
    w.ok(&["stats", "--token-file", &token]);
    let e = w.fails(&["stats", "--token-file", "/nonexistent/token"]);
    assert!(e.contains("token file /nonexistent/token"), "{e}");
}
