//! Synchronisation primitives, switched to loom's under `--cfg loom` so the
//! interlock and the shard hand-off can be model-checked.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(loom)]
pub use loom::sync::{Condvar, Mutex};

#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::{Condvar, Mutex};
