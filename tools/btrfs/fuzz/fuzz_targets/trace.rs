//! Arbitrary bytes as delayed-ref ftrace text (`refd_btrfs::trace::
//! TraceReader`, strict and lenient), with the contract of
//! `refd_btrfs::selftest::trace_round_trip`: no panic, bounded holdback, a
//! typed error naming a line of the input, or items in head order that
//! the lenient reader reads alike and that render
//! (`selftest::render_trace`) as text that reads back to the same items.
//!
//! Seed it with windows of the real captures: see `docs/fuzzing.md`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_btrfs::selftest::fuzz_trace(data));
