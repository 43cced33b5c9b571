//! Bulk load of the copy-on-write B+tree on a file-backed `UringStorage`.
//!
//! ```text
//! cargo run --release -p refd-ioring --example btree_bench -- \
//!     [--items 1000000] [--value-bytes 64] [--chunk 100000] [--region-mib 512] \
//!     [--updates 600000] [--rounds 3] [--dir target/refd-btree-bench]
//! ```
//!
//! Applies `--items` sorted inserts of `--value-bytes`-byte values with
//! `apply_sorted` in chunks of `--chunk`, commits once (all dirty nodes in
//! address order, then a flush), writes the superblock durably, and prints
//! the time of each phase; then `--rounds` transactions of `--updates`
//! replaced values spread evenly over the keys (a durable commit's shape
//! under uniform load: every leaf touched), one `apply_sorted` and one
//! commit each; then reopens and runs `check`. Measures; asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use refd_ioring::btree::{BTree, Change, Key, TreeConfig};
use refd_ioring::format::{FsId, Layout, Superblock, NODE_BYTES};
use refd_ioring::{Device, FileAllocation, Storage, UringConfig, UringStorage};

const REGION_START: u64 = 16384;

struct Args {
    items: u64,
    value_bytes: usize,
    chunk: u64,
    region_mib: u64,
    updates: u64,
    rounds: u64,
    dir: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        items: 1_000_000,
        value_bytes: 64,
        chunk: 100_000,
        region_mib: 512,
        updates: 0,
        rounds: 3,
        dir: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/refd-btree-bench"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--items" => a.items = num()?,
            "--value-bytes" => a.value_bytes = num()? as usize,
            "--chunk" => a.chunk = num()?.max(1),
            "--region-mib" => a.region_mib = num()?.max(1),
            "--updates" => a.updates = num()?,
            "--rounds" => a.rounds = num()?,
            "--dir" => a.dir = PathBuf::from(&value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    let path = args.dir.join(format!("tree-{}", std::process::id()));
    let region_bytes = args.region_mib << 20;
    let size = REGION_START + region_bytes;
    let device = Device::create_file(&path, size, FileAllocation::Reserve)?;
    let result = run(&args, device, region_bytes, &path);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(
    args: &Args,
    device: Device,
    region_bytes: u64,
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let dev = UringStorage::new(device, UringConfig::default())?;
    let mut sb = Superblock::empty(
        FsId([0xB7; 16]),
        dev.geometry(),
        Layout {
            log_start: 8192,
            log_bytes: 8192,
            node_region_start: REGION_START,
            node_region_bytes: region_bytes,
        },
    );
    dev.write_durable(sb.addr(), &sb.encode()?)?;
    let config = TreeConfig {
        cache_bytes: 256 << 20,
        ..TreeConfig::default()
    };
    let tree = BTree::open_superblock(dev, &sb, config)?;

    let started = Instant::now();
    let mut build_s = 0.0;
    let mut apply_s = 0.0;
    let mut next = 0u64;
    while next < args.items {
        let end = (next + args.chunk).min(args.items);
        let t0 = Instant::now();
        let changes: Vec<(Key, Change)> = (next..end)
            .map(|i| {
                let mut v = vec![0u8; args.value_bytes];
                let n = v.len().min(8);
                v[..n].copy_from_slice(&i.to_le_bytes()[..n]);
                (Key::new(i * 4096, 168, 4096), Change::Put(v))
            })
            .collect();
        let t1 = Instant::now();
        tree.apply_sorted(changes)?;
        build_s += (t1 - t0).as_secs_f64();
        apply_s += t1.elapsed().as_secs_f64();
        next = end;
    }
    let t_commit = Instant::now();
    sb.generation += 1;
    let info = tree.commit(sb.generation)?;
    let commit_s = t_commit.elapsed().as_secs_f64();
    info.apply_to(&mut sb);
    let t_sb = Instant::now();
    tree.storage().write_durable(sb.addr(), &sb.encode()?)?;
    tree.release_pending(sb.generation)?;
    let sb_s = t_sb.elapsed().as_secs_f64();
    let total_s = started.elapsed().as_secs_f64();
    let mut update_lines = Vec::new();
    if args.updates > 0 && args.items > 0 {
        let step = (args.items / args.updates.min(args.items)).max(1);
        for round in 0..args.rounds {
            let changes: Vec<(Key, Change)> = (0..args.items)
                .step_by(step as usize)
                .map(|i| {
                    let mut v = vec![1u8; args.value_bytes];
                    let n = v.len().min(8);
                    v[..n].copy_from_slice(&(i ^ round).to_le_bytes()[..n]);
                    (Key::new(i * 4096, 168, 4096), Change::Put(v))
                })
                .collect();
            let n = changes.len();
            let t0 = Instant::now();
            tree.apply_sorted(changes)?;
            let apply = t0.elapsed().as_secs_f64();
            sb.generation += 1;
            let t1 = Instant::now();
            let info = tree.commit(sb.generation)?;
            let commit = t1.elapsed().as_secs_f64();
            info.apply_to(&mut sb);
            tree.storage().write_durable(sb.addr(), &sb.encode()?)?;
            tree.release_pending(sb.generation)?;
            update_lines.push(format!(
                "  update round {round}: {n} replaced values, apply_sorted {apply:.3} s, \
                 commit {commit:.3} s ({} nodes)",
                info.nodes_written
            ));
        }
    }
    drop(tree);

    let device = Device::open(path, REGION_START + region_bytes)?;
    let dev = UringStorage::new(device, UringConfig::default())?;
    let t_check = Instant::now();
    let tree = BTree::open_superblock(dev, &sb, config)?;
    let check = tree.check()?;
    let check_s = t_check.elapsed().as_secs_f64();

    println!(
        "items {} x {} B values, apply_sorted chunks of {}",
        args.items, args.value_bytes, args.chunk
    );
    println!(
        "  build changes {build_s:.3} s (not counted), apply_sorted {apply_s:.3} s, commit {commit_s:.3} s \
         ({} nodes, {:.1} MiB), superblock {sb_s:.4} s",
        info.nodes_written,
        info.nodes_written as f64 * NODE_BYTES as f64 / (1 << 20) as f64
    );
    println!(
        "  apply + commit + superblock: {:.3} s = {:.0} inserts/s",
        total_s - build_s,
        args.items as f64 / (total_s - build_s)
    );
    for l in &update_lines {
        println!("{l}");
    }
    println!(
        "  tree: {} levels, {} leaves, {} nodes, {} items; reopen + check {check_s:.3} s",
        check.levels, check.leaves, check.nodes, check.items
    );
    Ok(())
}
