//! Arbitrary bytes against the B+tree node decoders (`NodeHeader::decode`
//! and the tree's item decoder), with the contract of
//! `refd_ioring::selftest::node_round_trip`: no panic, bounded allocation,
//! a typed error or a node that re-encodes to the same bytes.
//!
//! The first input byte steers (see `selftest::fuzz_node`): raw bytes
//! (zero-padded to a node or kept short, checksum optionally recomputed),
//! or the rest wrapped into a node with a valid header and checksum so
//! that the item decoder is reached.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| refd_ioring::selftest::fuzz_node(data));
