//! Property tests of the dump-tree and ftrace parsers on mutated real
//! kernel text: the cargo-fuzz targets of `fuzz/` (`docs/fuzzing.md`) run
//! as part of the normal test suite.
//!
//! The seeds are a few hundred lines of every capture in
//! `../shared/traces/` (the first lines of `trace.txt`, `before.txt`, and
//! `after.txt` from its first leaf on); a built-in sample stands in when
//! the captures are missing. Each case takes a window of consecutive
//! lines, mutates it (bit flips, truncation, extension, byte edits,
//! number and keyword edits, deleted, duplicated and swapped lines, the
//! fsid or an item type rewritten everywhere, whitespace edits, splices
//! of two captures, pure random bytes) and feeds the result to the checks
//! of [`refd_btrfs::selftest`]: no panic, bounded memory, a typed error
//! with a line of the input, or a value that survives printing and
//! parsing again. An unmutated window may only fail at its edges (a ref
//! whose head came before it, an extent cut off).
//!
//! Seeded (`ChaCha8Rng`), so a failure is reproducible:
//! `REFD_FUZZ_SEED=<n>` changes the seed, `REFD_FUZZ_CASES=<n>` the
//! number of cases per parser (never fewer than 100,000).

use std::io::BufRead;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use refd_btrfs::dump::{DumpError, DumpOptions, NODESIZE_DEFAULT};
use refd_btrfs::open;
use refd_btrfs::selftest::*;
use refd_btrfs::trace::{Strictness, TraceError, TraceOptions, TraceReader};

const CASES_MIN: u64 = 100_000;
/// Lines taken from each capture file.
const SEED_LINES: usize = 400;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn setup(salt: u64) -> (ChaCha8Rng, u64) {
    let seed = env_u64("REFD_FUZZ_SEED").unwrap_or(0x5EED_B7F5);
    let cases = env_u64("REFD_FUZZ_CASES")
        .unwrap_or(CASES_MIN)
        .max(CASES_MIN);
    (ChaCha8Rng::seed_from_u64(seed ^ salt), cases)
}

// ----------------------------------------------------------------- seeds

fn captures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no captures at {}: built-in samples only", dir.display());
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("trace.txt.zst").is_file())
        .collect();
    out.sort();
    out
}

/// Up to `n` lines of `path` (with their `\n`), from the first line that
/// starts with `from`.
fn lines_of(path: &Path, from: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut input = open::open(path).expect("open capture");
    let mut out = Vec::new();
    let mut started = from.is_empty();
    let mut line = Vec::new();
    while out.len() < n {
        line.clear();
        if input.read_until(b'\n', &mut line).expect("read capture") == 0 {
            break;
        }
        started |= line.starts_with(from);
        if started {
            out.push(line.clone());
        }
    }
    out
}

const SAMPLE_TRACE: &str = "\
           <...>-19711   [000] ...1.  3852.462545: add_delayed_ref_head: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=30441472 num_bytes=16384 action=ADD_DELAYED_EXTENT is_data=0
           <...>-19711   [000] .....  3852.462574: add_delayed_tree_ref: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=30441472 num_bytes=16384 action=ADD_DELAYED_REF parent=0(-) ref_root=256(-) level=0 type=TREE_BLOCK_REF seq=0
    kworker/u8:2-8619 [001] ...1. 2569.958601: add_delayed_ref_head: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=13631488 num_bytes=8192 action=ADD_DELAYED_EXTENT is_data=1
    kworker/u8:2-8619 [001] ..... 2569.958613: add_delayed_data_ref: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=13631488 num_bytes=8192 action=ADD_DELAYED_REF parent=0(-) ref_root=5(FS_TREE) owner=257 offset=0 type=EXTENT_DATA_REF seq=0
  kworker/u8:0-6533    [001] .....  3852.717529: run_delayed_data_ref: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=13631488 num_bytes=8192 action=ADD_DELAYED_REF parent=0(-) ref_root=5(FS_TREE) owner=257 offset=0 type=EXTENT_DATA_REF seq=0
  kworker/u8:0-6533    [001] .....  3852.717530: run_delayed_ref_head: 1260dcc0-55e9-453f-8dbf-2e1d81813d6c: bytenr=13631488 num_bytes=8192 action=0x0 is_data=1
";

const SAMPLE_DUMP: &str = "\
leaf 30408704 items 12 free space 15614 generation 6 owner EXTENT_TREE
\titem 2 key (22036480 METADATA_ITEM 0) itemoff 16202 itemsize 33
\t\trefs 1 gen 6 flags TREE_BLOCK
\t\ttree block skinny level 0
\t\ttree block backref root CHUNK_TREE
\titem 0 key (13631488 EXTENT_ITEM 36864) itemoff 16188 itemsize 95
\t\trefs 3 gen 7 flags DATA
\t\textent data backref root 261 objectid 260 offset 0 count 1
\t\textent data backref root 258 objectid 260 offset 0 count 1
\t\tshared data backref parent 41320448 count 1
";

fn split_lines(text: &str) -> Vec<Vec<u8>> {
    text.split_inclusive('\n')
        .map(|l| l.as_bytes().to_vec())
        .collect()
}

/// Lines of text, each with its `\n`.
type Lines = Vec<Vec<u8>>;

/// Seed line sets for the trace parser and for the dump parser.
fn seeds() -> (Vec<Lines>, Vec<Lines>) {
    let mut traces = vec![split_lines(SAMPLE_TRACE)];
    let mut dumps = vec![split_lines(SAMPLE_DUMP)];
    for dir in captures() {
        traces.push(lines_of(&dir.join("trace.txt.zst"), b"", SEED_LINES));
        dumps.push(lines_of(&dir.join("before.txt.zst"), b"", SEED_LINES));
        dumps.push(lines_of(&dir.join("after.txt.zst"), b"leaf ", SEED_LINES));
    }
    (traces, dumps)
}

// ------------------------------------------------------------- mutations

const TRACE_WORDS: [&str; 24] = [
    "add_delayed_ref_head:",
    "add_delayed_tree_ref:",
    "add_delayed_data_ref:",
    "run_delayed_ref_head:",
    "run_delayed_tree_ref:",
    "run_delayed_data_ref:",
    "ADD_DELAYED_REF",
    "DROP_DELAYED_REF",
    "ADD_DELAYED_EXTENT",
    "UPDATE_DELAYED_HEAD",
    "TREE_BLOCK_REF",
    "SHARED_BLOCK_REF",
    "EXTENT_DATA_REF",
    "SHARED_DATA_REF",
    "bytenr=",
    "num_bytes=",
    "is_data=",
    "parent=",
    "ref_root=",
    "level=",
    "owner=",
    "seq=",
    "[LOST 3 EVENTS]",
    "0x0",
];

const DUMP_WORDS: [&str; 24] = [
    "EXTENT_ITEM",
    "METADATA_ITEM",
    "TREE_BLOCK_REF",
    "SHARED_BLOCK_REF",
    "EXTENT_DATA_REF",
    "SHARED_DATA_REF",
    "BLOCK_GROUP_ITEM",
    "item",
    "key",
    "itemoff",
    "itemsize",
    "refs",
    "gen",
    "flags",
    "DATA",
    "TREE_BLOCK",
    "TREE_BLOCK|FULL_BACKREF",
    "tree block skinny level",
    "tree block backref root",
    "shared block backref parent",
    "extent data backref root",
    "shared data backref parent",
    "count",
    "FS_TREE",
];

const NUMBERS: [&str; 14] = [
    "0",
    "1",
    "7",
    "8",
    "255",
    "256",
    "4096",
    "16384",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "-1",
    "01",
    "",
];

fn random_bytes(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v[..]);
    v
}

/// Byte ranges of the digit runs of `text`.
fn digit_runs(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii_digit() {
            let start = i;
            while i < text.len() && text[i].is_ascii_digit() {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

/// Byte ranges of the space-separated words of `text`.
fn word_runs(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, &c) in text.iter().enumerate() {
        let sep = matches!(c, b' ' | b'\t' | b'\n' | b'=' | b'(' | b')');
        match (start, sep) {
            (None, false) => start = Some(i),
            (Some(s), true) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

fn replace_run(rng: &mut ChaCha8Rng, text: &mut Vec<u8>, runs: &[(usize, usize)], with: &[u8]) {
    if runs.is_empty() {
        return;
    }
    let (a, b) = runs[rng.gen_range(0..runs.len())];
    text.splice(a..b, with.iter().copied());
}

/// Rewrites the token after the third `: ` of every line (a trace line's
/// fsid) to the same random token.
fn rewrite_fsid(rng: &mut ChaCha8Rng, lines: &mut [Vec<u8>]) {
    let token: Vec<u8> = match rng.gen_range(0..4) {
        0 => b"x".to_vec(),
        1 => vec![b'a', 0xFF, b'b'],
        2 => b"fsid\t".to_vec(),
        _ => random_bytes(rng, 6)
            .into_iter()
            .filter(|&c| c != b' ' && c != b'\n')
            .collect(),
    };
    for line in lines.iter_mut() {
        let Some(event) = line.windows(2).position(|w| w == b"_ref") else {
            continue;
        };
        let rest = &line[event..];
        let Some(a) = rest.windows(2).position(|w| w == b": ") else {
            continue;
        };
        let from = event + a + 2;
        let Some(b) = line[from..].windows(2).position(|w| w == b": ") else {
            continue;
        };
        line.splice(from..from + b, token.iter().copied());
    }
}

/// Mutates a window of lines into text; returns the mutation's number.
fn mutate(
    rng: &mut ChaCha8Rng,
    mut lines: Vec<Vec<u8>>,
    words: &[&str],
    other: &[Vec<u8>],
) -> (usize, Vec<u8>) {
    let m = rng.gen_range(0..12);
    match m {
        7 if !lines.is_empty() => {
            let i = rng.gen_range(0..lines.len());
            match rng.gen_range(0..3) {
                0 => {
                    lines.remove(i);
                }
                1 => {
                    let copy = lines[i].clone();
                    lines.insert(i, copy);
                }
                _ => {
                    let j = rng.gen_range(0..lines.len());
                    lines.swap(i, j);
                }
            }
        }
        8 => rewrite_fsid(rng, &mut lines),
        11 if !other.is_empty() => {
            let at = rng.gen_range(0..=lines.len());
            let from = rng.gen_range(0..other.len());
            let n = rng.gen_range(1..=4).min(other.len() - from);
            lines.splice(at..at, other[from..from + n].iter().cloned());
        }
        _ => {}
    }
    let mut text: Vec<u8> = lines.concat();
    let len = text.len();
    match m {
        1 if len > 0 => {
            for _ in 0..rng.gen_range(1..=3) {
                let bit = rng.gen_range(0..len * 8);
                text[bit / 8] ^= 1 << (bit % 8);
            }
        }
        2 => text.truncate(rng.gen_range(0..=len)),
        3 => {
            let n = rng.gen_range(1..40);
            text.extend(random_bytes(rng, n));
        }
        4 if len > 0 => {
            let at = rng.gen_range(0..len);
            const BYTES: [u8; 12] = [
                b' ', b'\t', b'\n', b'\r', b'(', b')', b'=', b':', b'-', b'|', b'0', 0xC3,
            ];
            if rng.gen_bool(0.5) {
                text[at] = BYTES[rng.gen_range(0..BYTES.len())];
            } else {
                text.insert(at, BYTES[rng.gen_range(0..BYTES.len())]);
            }
        }
        5 => {
            let runs = digit_runs(&text);
            let with = NUMBERS[rng.gen_range(0..NUMBERS.len())].as_bytes();
            replace_run(rng, &mut text, &runs, with);
        }
        6 => {
            let runs = word_runs(&text);
            let with = words[rng.gen_range(0..words.len())].as_bytes();
            replace_run(rng, &mut text, &runs, with);
        }
        9 if len > 0 => {
            // Whitespace: tabs and spaces swapped, indentation dropped,
            // CRLF line ends.
            let at = rng.gen_range(0..len);
            match rng.gen_range(0..3) {
                0 => {
                    for c in text[at..].iter_mut().take(40) {
                        *c = match *c {
                            b'\t' => b' ',
                            b' ' => b'\t',
                            c => c,
                        };
                    }
                }
                1 => text.retain(|&c| c != b'\t'),
                _ => {
                    text = text
                        .split_inclusive(|&c| c == b'\n')
                        .flat_map(|l| {
                            let mut l = l.to_vec();
                            if l.ends_with(b"\n") {
                                l.insert(l.len() - 1, b'\r');
                            }
                            l
                        })
                        .collect();
                }
            }
        }
        10 => {
            let n = rng.gen_range(0..300);
            text = random_bytes(rng, n);
        }
        _ => {}
    }
    (m, text)
}

/// A window of 1..=`max` consecutive lines of a random seed.
fn window(rng: &mut ChaCha8Rng, seeds: &[Vec<Vec<u8>>], max: usize) -> Vec<Vec<u8>> {
    let seed = &seeds[rng.gen_range(0..seeds.len())];
    if seed.is_empty() {
        return Vec::new();
    }
    let start = rng.gen_range(0..seed.len());
    let n = rng.gen_range(1..=max).min(seed.len() - start);
    seed[start..start + n].to_vec()
}

#[derive(Debug, Default)]
struct Tally {
    by_mutation: [u64; 12],
    ok: u64,
    errors: u64,
    items: u64,
}

// ---------------------------------------------------------------- traces

#[test]
fn traces_read_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(1);
    let (traces, _) = seeds();
    let other: Vec<Vec<u8>> = traces.concat();
    let mut t = Tally::default();
    for _ in 0..cases {
        let lines = window(&mut rng, &traces, 12);
        let (m, text) = mutate(&mut rng, lines, &TRACE_WORDS, &other);
        t.by_mutation[m] += 1;
        if rng.gen_ratio(1, 10) {
            fuzz_trace(&text);
            continue;
        }
        let outcome = trace_round_trip(&text);
        t.items += outcome.ops + outcome.runs;
        if outcome.strict_error {
            t.errors += 1;
        } else {
            t.ok += 1;
        }
        if m == 0 && outcome.strict_error {
            // A window of a real capture fails only at its edges.
            let err = TraceReader::new(&text[..], TraceOptions::default())
                .find_map(Result::err)
                .expect("an error");
            assert!(
                matches!(
                    err,
                    TraceError::OrphanRef { .. } | TraceError::HeadWithoutRef { .. }
                ),
                "unmutated window refused: {err}"
            );
        }
    }
    println!("traces: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 10 && t.errors > cases / 10 && t.items > cases);
}

/// The whole seed of every capture reads strictly up to its last pairs.
#[test]
fn trace_seeds_read_cleanly() {
    let (traces, _) = seeds();
    for seed in traces {
        let text = seed.concat();
        let outcome = trace_round_trip(&text);
        let mut r = TraceReader::new(
            &text[..],
            TraceOptions {
                strictness: Strictness::Lenient,
            },
        );
        let n = r.by_ref().count() as u64;
        let stats = r.into_stats();
        // At most the ref of the last head is cut off.
        assert!(stats.skipped() <= 1, "{stats:?}");
        assert!(n + 1 >= outcome.ops + outcome.runs);
        assert_eq!(stats.malformed.count, 0);
    }
}

// ----------------------------------------------------------------- dumps

#[test]
fn dumps_parse_to_typed_errors_or_round_trip() {
    let (mut rng, cases) = setup(2);
    let (_, dumps) = seeds();
    let other: Vec<Vec<u8>> = dumps.concat();
    let mut t = Tally::default();
    for _ in 0..cases {
        let lines = window(&mut rng, &dumps, 24);
        let (m, text) = mutate(&mut rng, lines, &DUMP_WORDS, &other);
        t.by_mutation[m] += 1;
        let steer = rng.gen_range(0..8u8);
        if rng.gen_ratio(1, 10) {
            let mut data = vec![steer];
            data.extend_from_slice(&text);
            fuzz_dump(&data);
            continue;
        }
        let opts = DumpOptions {
            nodesize: if steer < 6 {
                None
            } else {
                FUZZ_NODESIZES[usize::from(steer % 4)]
            },
        };
        match dump_round_trip(&text, &opts) {
            Ok((tree, _)) => {
                t.ok += 1;
                t.items += tree.len() as u64;
            }
            Err(e) => {
                t.errors += 1;
                if m == 0 && opts.nodesize.is_none() {
                    // A window of a real dump fails only where it cuts an
                    // extent or starts inside one; or, for a nodesize
                    // other than the default, where tree blocks before
                    // its first leaf header took the default.
                    assert!(
                        matches!(
                            e,
                            DumpError::KeyedWithoutExtent { .. }
                                | DumpError::MissingField { .. }
                                | DumpError::ItemSize { .. }
                                | DumpError::InvalidItem { .. }
                                | DumpError::Nodesize {
                                    expected: NODESIZE_DEFAULT,
                                    ..
                                }
                        ),
                        "unmutated window refused: {e}"
                    );
                }
            }
        }
    }
    println!("dumps: {cases} cases: {t:?}");
    assert!(t.by_mutation.iter().all(|&n| n > cases / 20));
    assert!(t.ok > cases / 10 && t.errors > cases / 10 && t.items > cases / 4);
}

/// The whole `before.txt` of every capture parses and round-trips.
#[test]
fn dump_seeds_parse_cleanly() {
    for dir in captures() {
        let text = lines_of(&dir.join("before.txt.zst"), b"", usize::MAX).concat();
        let (tree, stats) = dump_round_trip(&text, &DumpOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert!(!tree.is_empty());
        assert_eq!(stats.unrecognized.count, 0);
    }
}

/// Writes seed inputs for the cargo-fuzz targets (windows of the captures
/// in each target's input format) to `fuzz/corpus/<target>/`. Not part of
/// the normal run: `cargo test --release -p refd-btrfs --test
/// fuzz_decoders -- --ignored write_fuzz_seeds` (see `docs/fuzzing.md`).
#[test]
#[ignore = "writes files; run by hand to seed the fuzz corpora"]
fn write_fuzz_seeds() {
    let (mut rng, _) = setup(3);
    let (traces, dumps) = seeds();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds, steer) in [("trace", &traces, None), ("dump", &dumps, Some(0u8))] {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).expect("corpus dir");
        for i in 0..64 {
            let mut data: Vec<u8> = steer.into_iter().collect();
            data.extend(window(&mut rng, seeds, 16).concat());
            std::fs::write(d.join(format!("seed-{i:03}")), data).expect("seed");
        }
    }
}
