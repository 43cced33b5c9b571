//! Arbitrary bytes as `btrfs inspect-internal dump-tree -t extent` text
//! (`refd_btrfs::dump::parse_dump`; the first byte picks the node size),
//! with the contract of `refd_btrfs::selftest::dump_round_trip`: no panic,
//! a typed error naming a line of the input, or an extent tree whose every
//! item passes `ExtentItem::check` and which prints (`write_dump_items`)
//! as text that parses back to the same tree.
//!
//! Seed it with windows of the real captures: see `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_btrfs::selftest::fuzz_dump(data));
