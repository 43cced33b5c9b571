//! Arbitrary bytes as a held-heads stream (`refd_durable::codec::decode_held`),
//! with the contract of `refd_durable::selftest::held_round_trip`: no panic,
//! heap bounded by the stream, a typed error or heads that re-encode to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_durable::selftest::fuzz_held(data));
