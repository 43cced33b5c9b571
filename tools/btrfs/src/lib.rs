//! btrfs conformance for refd (see `docs/btrfs.md`).
//!
//! Real kernel captures (`../shared/traces/`) hold the extent tree before a
//! workload (`before.txt`, `btrfs inspect-internal dump-tree -t extent`),
//! every delayed-ref event of the workload (`trace.txt`, ftrace text) and
//! the extent tree after it (`after.txt`). The invariant: the extents of
//! `before.txt` with every traced op applied in order equal the extents of
//! `after.txt`. This crate reads all three and checks that:
//!
//! - [`open`]: plain or zstd input as a streaming `BufRead`;
//! - [`dump`]: dump-tree text → [`refd_core::extent_tree::ExtentTree`];
//! - [`trace`]: ftrace text → refd [`refd_core::model::Op`]s in the kernel's
//!   queue order, plus the kernel's `run_*` records;
//! - [`export`]: an `ExtentTree` back to dump-tree text, and the canonical
//!   one-line-per-extent form the invariant compares;
//! - [`compare`]: the invariant itself, as a list of typed mismatches;
//! - [`oracle`]: the simple sequential applier that is the reference
//!   semantics for replaying a trace;
//! - [`progs`]: btrfs-progs naming conventions (tree ids, key types, the
//!   `EXTENT_DATA_REF` hash);
//! - [`selftest`]: the round-trip contract of the two parsers, shared by
//!   the property test `tests/fuzz_decoders.rs` and the cargo-fuzz targets
//!   in `fuzz/` (`docs/fuzzing.md`).
//!
//! Vocabulary follows btrfs (head, ref, extent_op, seq, FULL_BACKREF).

pub mod compare;
pub mod dump;
pub mod export;
mod lex;
pub mod open;
pub mod oracle;
pub mod progs;
pub mod selftest;
pub mod trace;

pub use lex::{LineSample, Tally, LINE_BYTES_MAX, SAMPLES_MAX};
