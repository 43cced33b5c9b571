//! Arbitrary bytes as one log record of any kind
//! (`refd_durable::codec::decode_record`: op, SUBMIT, REGISTER, SUBSCRIBE,
//! FREED_ACK), with the contract of `refd_durable::selftest::record_round_trip`:
//! no panic, a typed error or a record that re-encodes to the same bytes,
//! and `decode_op` accepting exactly the op records.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_durable::selftest::fuzz_record(data));
