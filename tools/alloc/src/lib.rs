//! refd-alloc: the allocator every refd binary uses, and its settings, in
//! one place.
//!
//! - [`tune`]: keep freed memory committed for the life of the process,
//!   [`prefault`] heap before a working set is built,
//!   [`available_memory_bytes`] to size it (`tune.rs`);
//! - [`Counting`]: mimalloc wrapped to count live heap bytes, for the
//!   benchmarks that report bytes per pending ref (`counting.rs`).
//!
//! A binary declares `#[global_allocator] static GLOBAL: refd_alloc::MiMalloc
//! = refd_alloc::MiMalloc;` (or [`Counting`]) and calls [`tune`] first
//! thing in `main`.

mod counting;
mod tune;

pub use counting::{count_live, live_bytes, Counting};
pub use mimalloc::MiMalloc;
pub use tune::{available_memory_bytes, prefault, prefault_mib_capped, tune, PURGE_DELAY_MS};
