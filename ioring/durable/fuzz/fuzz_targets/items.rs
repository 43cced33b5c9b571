//! Arbitrary bytes as B+tree items (`selftest::items_from_bytes`: objectid
//! deltas, item types, offsets, values) streamed through `ExtentLoader`
//! `push`/`finish`, with the contract of
//! `refd_durable::selftest::items_round_trip`: no panic, extents in
//! strictly ascending order that pass `ExtentItem::check` and re-encode to
//! the same items (keyed EXTENT_DATA_REF key offsets, a probed hash, left
//! out), or a typed error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_durable::selftest::fuzz_items(data));
