//! Lookups and applies of a commit's shape on a large extent tree: sorted
//! lookups by search from the root (`get`) against a walking cursor
//! (`walker`), and a dense sorted apply one change at a time against
//! `apply_sorted`. Prints medians of `--rounds` (default 5); asserts
//! nothing.
//!
//! ```text
//! cargo run --release -p refd-core --example tree_walk -- [--extents 1000000] [--changes 600000]
//! ```

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use refd_core::extent_tree::{ExtentItem, ExtentTree};
use refd_core::model::{ExtentKind, RefKey};

fn item(n: u64) -> ExtentItem {
    let mut i = ExtentItem::new(8192, ExtentKind::Data, 1);
    i.add_ref(
        RefKey::ExtentData {
            root: 5,
            objectid: n,
            offset: 0,
        },
        1,
    );
    i
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut extents, mut changes, mut rounds) = (1_000_000u64, 600_000u64, 5usize);
    while let Some(flag) = args.next() {
        let v: u64 = args
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a number"));
        match flag.as_str() {
            "--extents" => extents = v,
            "--changes" => changes = v,
            "--rounds" => rounds = v as usize,
            _ => panic!("unknown flag {flag}"),
        }
    }
    let mut tree = ExtentTree::new();
    for e in 0..extents {
        tree.insert((1 << 30) + e * 16384, item(e));
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let (mut get_t, mut walk_t, mut one_t, mut sorted_t) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let mut picks: Vec<u64> = (0..changes)
            .map(|_| (1 << 30) + rng.gen_range(0..extents) * 16384)
            .collect();
        picks.sort_unstable();
        picks.dedup();
        let t = Instant::now();
        let found = picks.iter().filter(|&&b| tree.get(b).is_some()).count();
        get_t.push(t.elapsed());
        let t = Instant::now();
        let mut w = tree.walker();
        let walked = picks.iter().filter(|&&b| w.get(b).is_some()).count();
        walk_t.push(t.elapsed());
        assert_eq!(found, walked);
        let batch = |r: u64| -> Vec<(u64, Option<ExtentItem>)> {
            picks.iter().map(|&b| (b, Some(item(b ^ r)))).collect()
        };
        let c = batch(round as u64);
        let t = Instant::now();
        for (b, i) in c {
            if let Some(i) = i {
                tree.insert(b, i);
            }
        }
        one_t.push(t.elapsed());
        let c = batch(round as u64 + 1);
        let t = Instant::now();
        let displaced = tree.apply_sorted(c);
        sorted_t.push(t.elapsed());
        drop(displaced);
    }
    println!(
        "{extents} extents, ~{changes} sorted changes, medians of {rounds}: lookups get {:.1} ms, \
         walker {:.1} ms; apply one insert per change {:.1} ms, apply_sorted {:.1} ms",
        median(get_t),
        median(walk_t),
        median(one_t),
        median(sorted_t)
    );
}
