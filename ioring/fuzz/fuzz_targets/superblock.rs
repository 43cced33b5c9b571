//! Arbitrary bytes against `Superblock::decode` and `pick_newest`, with
//! the contract of `refd_ioring::selftest::superblock_round_trip` and
//! `pick_newest_round_trip`: no panic, a typed error or a superblock that
//! re-encodes to the same block, and `pick_newest` agreeing with each copy
//! decoded alone.
//!
//! The first input byte steers (see `selftest::fuzz_superblock`): one raw
//! copy, two raw copies, or a valid superblock with the rest XOR-ed into
//! its fields and its checksum recomputed, so that `validate` is reached.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_ioring::selftest::fuzz_superblock(data));
