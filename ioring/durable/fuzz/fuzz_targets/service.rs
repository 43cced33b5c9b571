//! Arbitrary bytes as a service item value (session, freed-list chunk,
//! consumer, counters; the first byte picks which), with the contract of
//! `refd_durable::selftest::service_round_trip`: no panic, a typed error or
//! an item that re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_durable::selftest::fuzz_service(data));
