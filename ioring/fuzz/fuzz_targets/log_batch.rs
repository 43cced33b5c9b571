//! Arbitrary bytes against the log batch decoders (`decode_batch_header`,
//! `decode_batch` and its record framing), with the contract of
//! `refd_ioring::selftest::batch_round_trip`: no panic, no allocation, a
//! typed error or a batch whose records re-encode to the same header
//! fields and payload (log batches are not canonical: see
//! `docs/fuzzing.md`).
//!
//! The first input byte steers (see `selftest::fuzz_log_batch`): raw
//! bytes, the rest as the payload of a header with valid checksums,
//! records encoded then edited, or the rest as a header with its magic,
//! file system and offset put right.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_ioring::selftest::fuzz_log_batch(data));
