//! Arbitrary bytes as one op record (`refd_durable::codec::decode_op`), with
//! the contract of `refd_durable::selftest::op_round_trip`: no panic, a
//! typed error or an op that re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_durable::selftest::fuzz_op(data));
