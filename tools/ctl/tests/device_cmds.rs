//! `refctl format`, `fsck` and `dump` on a file opened with O_DIRECT: a
//! device written by the durable engine (committed extents, ops only in the
//! log) is clean; a flipped bit in a tree node is found; with one superblock
//! copy destroyed the device still opens from the other.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use refd_core::model::{Action, ExtentKind, Op, RefKey};
use refd_durable::{DurableEngine, OpenOptions};
use refd_ioring::format::SUPERBLOCK_SLOT_ADDRS;
use refd_ioring::{Device, UringConfig, UringStorage};

fn refctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_refctl"))
        .args(args)
        .output()
        .expect("run refctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn image(name: &str) -> PathBuf {
    let p =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn fsck_json(p: &Path) -> (i32, serde_json::Value) {
    let (code, out, err) = refctl(&["fsck", "--json", p.to_str().unwrap()]);
    let v =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("fsck JSON ({e}): {out} {err}"));
    (code, v)
}

/// fsck's `bitmap_run_nodes`, `spare_nodes` and `no_spare_window`.
fn spare_windows(v: &serde_json::Value) -> serde_json::Value {
    serde_json::json!([
        v["bitmap_run_nodes"],
        v["spare_nodes"],
        v["no_spare_window"]
    ])
}

fn data(bytenr: u64, action: Action, objectid: u64) -> Op {
    Op::new(
        bytenr,
        4096,
        ExtentKind::Data,
        action,
        RefKey::ExtentData {
            root: 5,
            objectid,
            offset: 0,
        },
        0,
    )
    .unwrap()
}

/// Write 50 extents (one with 300 refs, spilling into keyed items), commit
/// with one ref held by a seq barrier (kept in the tree as a held head),
/// then queue more ops that stay only in the log.
fn populate(p: &Path) {
    let device = Device::open(p, 0).expect("open image");
    let storage = Arc::new(UringStorage::new(device, UringConfig::default()).expect("io_uring"));
    let (engine, _) = DurableEngine::open(storage, OpenOptions::default()).expect("recover");
    for e in 0..50u64 {
        engine
            .add_durable(&data((1 << 30) + e * 4096, Action::AddExtent, 257))
            .unwrap();
    }
    for i in 0..300u64 {
        engine
            .add_durable(&data(1 << 30, Action::AddRef, 1000 + i))
            .unwrap();
    }
    engine.commit().expect("commit");
    let barrier = engine.core().barrier().acquire();
    let mut held = data((1 << 30) + 4096, Action::AddRef, 5000);
    held.seq = engine.core().barrier().current();
    engine.add_durable(&held).unwrap();
    let s = engine.commit().expect("commit with a held head");
    assert_eq!(s.core.held, 1);
    drop(barrier);
    for e in 0..5u64 {
        engine
            .add_durable(&data((1 << 30) + e * 4096, Action::AddRef, 999))
            .unwrap();
    }
}

#[test]
fn format_fsck_dump_and_corruption() {
    let p = image("device-cmds");
    let path = p.to_str().unwrap();
    assert_eq!(refctl(&["format", path]).0, 2, "missing --size is refused");
    let (code, out, err) = refctl(&["format", path, "--size", "64M"]);
    assert_eq!(code, 0, "{out} {err}");
    let (code, _, err) = refctl(&["format", path]);
    assert_eq!(code, 2);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(refctl(&["format", path, "--force"]).0, 0);

    populate(&p);
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["clean"], true);
    assert_eq!(v["extents"], 50);
    assert_eq!(v["extents_recorded"], 50, "the count the commits kept: {v}");
    assert_eq!(v["refs"], 350);
    assert_eq!(v["held_heads"], 1);
    assert_eq!(
        v["log_records"], 5,
        "ops only in the log are what recovery would replay: {v}"
    );
    assert_eq!(v["log_ops"], 5, "one op per record: {v}");
    assert_eq!(
        (v["sessions"].clone(), v["freed_extents"].clone()),
        (0.into(), 0.into())
    );
    assert!(
        v["tree_items"].as_u64().unwrap() > 50,
        "keyed backref items: {v}"
    );

    // The node region's allocator: a run of K = 1 node (64 MiB) and the
    // two spare windows an open keeps beside the committed run.
    assert_eq!(spare_windows(&v), serde_json::json!([1, 2, false]), "{v}");
    let (code, out, _) = refctl(&["fsck", path]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("; bitmap run 1 nodes, spare windows 2 nodes\n"),
        "{out}"
    );

    let (code, out, err) = refctl(&["dump", path]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("EXTENT_ITEM").count(), 50, "{out}");
    assert!(out.contains("EXTENT_DATA_REF"), "keyed items are dumped");
    assert!(!out.contains("spare"), "stdout is the dump alone: {out}");
    assert!(
        err.contains("dumped 50 extents; node region ")
            && err.contains("bitmap run 1 nodes, spare windows 2 nodes"),
        "{err}"
    );

    // A flipped bit in the root node is found and named.
    let root = {
        let dev = Device::open(&p, 0).unwrap();
        let s = UringStorage::new(dev, UringConfig::default()).unwrap();
        refd_durable::read_newest_superblock(&s)
            .unwrap()
            .superblock
            .tree_root_addr
    };
    flip(&p, root + 200);
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["clean"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("checksum"), "{problems}");
    assert!(
        refctl(&["dump", path]).0 != 0,
        "dump refuses a corrupt tree"
    );
    flip(&p, root + 200);
    assert_eq!(fsck_json(&p).0, 0, "flipped back: clean again");

    // Destroy the newest superblock copy: the device opens from the other.
    let (_, v) = fsck_json(&p);
    let slot = v["slot"].as_u64().unwrap() as usize;
    flip(&p, SUPERBLOCK_SLOT_ADDRS[slot] + 64);
    let (code, v) = fsck_json(&p);
    assert_eq!(
        v["rejected_superblocks"].as_array().unwrap().len(),
        1,
        "{v}"
    );
    assert_ne!(v["slot"].as_u64().unwrap() as usize, slot);
    // The log holds batches written after the lost copy was durable (they
    // carry its generation): fsck says a newer superblock is lost, open
    // refuses, and `refctl recover` goes on from the older copy.
    assert_eq!(code, 1, "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("newer superblock lost"), "{problems}");
    {
        let dev = Device::open(&p, 0).unwrap();
        let s = Arc::new(UringStorage::new(dev, UringConfig::default()).unwrap());
        match DurableEngine::open(s, OpenOptions::default()) {
            Err(e @ refd_durable::OpenError::SuperblockLost { .. }) => {
                assert!(e.to_string().contains("recovery-mode"), "{e}")
            }
            other => panic!("expected SuperblockLost, got {:?}", other.map(|(_, i)| i)),
        }
    }
    let (code, out, err) = refctl(&["recover", path, "--mode", "tolerate-tail"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("NEWER SUPERBLOCK"), "{out}");
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 0, "{v}");
    // 350 committed, the held head and the five ops of the log.
    assert_eq!(v["refs"], 356, "{v}");
    std::fs::remove_file(&p).unwrap();
}

/// `refctl format` of a 4 GiB file (sparse: only the superblocks are
/// written) lays the node region out to the file's end. It used to leave
/// 8 KiB past it, and `refd serve` warned at every start that the device
/// was larger than its layout. fsck shows the allocator of the empty
/// tree: runs of K = 2 nodes, three spare windows (no committed run yet).
#[test]
fn format_of_a_round_size_uses_the_whole_device() {
    let p = image("format-4g");
    let size: u64 = 4 << 30;
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    let path = p.to_str().unwrap();
    let (code, out, err) = refctl(&["format", path]);
    assert_eq!(code, 0, "{out} {err}");
    let sb = {
        let dev = Device::open(&p, 0).unwrap();
        let s = UringStorage::new(dev, UringConfig::default()).unwrap();
        refd_durable::read_newest_superblock(&s).unwrap().superblock
    };
    assert_eq!(sb.node_region_start + sb.node_region_bytes, size, "{out}");
    assert!(
        out.contains(&format!(
            "node region {} bytes at {}",
            sb.node_region_bytes, sb.node_region_start
        )),
        "{out}"
    );
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 0, "{v}");
    assert_eq!(spare_windows(&v), serde_json::json!([2, 6, false]), "{v}");
    std::fs::remove_file(&p).unwrap();
}

/// fsck finds an extent that starts inside the one before it (a commit
/// never writes one: an overlapping allocation is refused), here written
/// into the B+tree behind the engine's back and committed with the next
/// commit.
#[test]
fn fsck_finds_overlapping_extents() {
    use refd_core::extent_tree::ExtentItem;
    let p = image("device-overlap");
    let path = p.to_str().unwrap();
    assert_eq!(refctl(&["format", path, "--size", "64M"]).0, 0);
    {
        let device = Device::open(&p, 0).expect("open image");
        let storage =
            Arc::new(UringStorage::new(device, UringConfig::default()).expect("io_uring"));
        let (engine, _) = DurableEngine::open(storage, OpenOptions::default()).expect("open");
        let big = Op::new(
            1 << 30,
            64 << 10,
            ExtentKind::Data,
            Action::AddExtent,
            RefKey::ExtentData {
                root: 5,
                objectid: 257,
                offset: 0,
            },
            0,
        )
        .unwrap();
        engine.add_durable(&big).unwrap();
        engine.commit().expect("commit");
        let mut item = ExtentItem::new(4096, ExtentKind::Data, 9);
        item.add_ref(
            RefKey::ExtentData {
                root: 5,
                objectid: 258,
                offset: 0,
            },
            1,
        );
        let mut changes = Vec::new();
        refd_durable::codec::diff_extent((1 << 30) + 8192, None, Some(&item), &mut changes)
            .unwrap();
        engine.btree().apply_sorted(changes).unwrap();
        engine.commit().expect("commit");
    }
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 1, "{v}");
    let problems = v["problems"].to_string();
    assert!(
        problems.contains(&format!(
            "extent {}: starts inside the extent at {} (65536 bytes)",
            (1u64 << 30) + 8192,
            1u64 << 30
        )),
        "{problems}"
    );
    std::fs::remove_file(&p).unwrap();
}

fn flip(p: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x10;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
}

/// The case on the real binaries: a bit flip in one of the
/// acknowledged batches after the last commit (not the last one) made
/// fsck say CLEAN with every later batch dropped. Now fsck fails naming
/// the damage and the ops after it, open refuses, and `refctl recover
/// --mode skip-corrupt` gives up exactly the damaged batch, recorded in
/// the superblock.
#[test]
fn a_rotten_log_batch_is_reported_refused_and_recovered_explicitly() {
    let p = image("rotten-log");
    let path = p.to_str().unwrap();
    assert_eq!(refctl(&["format", path, "--size", "64M"]).0, 0);
    populate(&p);
    let sb = {
        let dev = Device::open(&p, 0).unwrap();
        let s = UringStorage::new(dev, UringConfig::default()).unwrap();
        refd_durable::read_newest_superblock(&s).unwrap().superblock
    };
    // The five one-op batches after the last commit, 4096 bytes each: a
    // bit in the record of the second.
    let batch = |i: u64| sb.log_start + (sb.log_head_offset + i * 4096) % sb.log_bytes;
    flip(&p, batch(1) + 85);
    let (code, v) = fsck_json(&p);
    assert_eq!((code, v["clean"].clone()), (1, false.into()), "{v}");
    let problems = v["problems"].to_string();
    assert!(problems.contains("log corrupt"), "{problems}");
    assert!(
        problems.contains("3 acknowledged ops in the intact batches after the damage"),
        "{problems}"
    );
    {
        let dev = Device::open(&p, 0).unwrap();
        let s = Arc::new(UringStorage::new(dev, UringConfig::default()).unwrap());
        match DurableEngine::open(s, OpenOptions::default()) {
            Err(e @ refd_durable::OpenError::LogDamaged { ops_after: 3, .. }) => {
                assert!(e.to_string().contains("recovery-mode"), "{e}")
            }
            other => panic!("expected LogDamaged, got {:?}", other.map(|(_, i)| i)),
        }
    }
    let (code, out, err) = refctl(&["recover", path, "--mode", "skip-corrupt"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("DROPPED"), "{out}");
    let (code, v) = fsck_json(&p);
    assert_eq!(code, 0, "{v}");
    // 350 committed, the held head and the four intact batches.
    assert_eq!(v["refs"], 355, "{v}");
    assert_eq!(v["log_ops"], 0, "{v}");
    let record = v["recovery_record"].as_str().unwrap();
    assert!(
        record.contains("mode 2") && record.contains("1 batches"),
        "{record}"
    );
    std::fs::remove_file(&p).unwrap();
}
