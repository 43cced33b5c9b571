//! Arbitrary bytes against the allocator's bitmap run decoder (the run of
//! sealed bitmap nodes read at open, `Allocator::load`), with the contract
//! of `refd_ioring::selftest::bitmap_round_trip`: no panic, a typed error
//! or an allocator whose bitmap run and superblock fields re-encode to the
//! same bytes.
//!
//! The first bytes steer (see `selftest::fuzz_bitmap`): the region size,
//! high-water mark, run position and generation, then either a bitmap
//! wrapped into sealed bitmap nodes or raw bytes read as the run.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_ioring::selftest::fuzz_bitmap(data));
