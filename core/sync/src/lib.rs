//! refd-sync: the concurrency primitives shared by the delayed-ref engine
//! (`refd-core`) and the storage layer (`refd-ioring`), in a leaf crate so
//! that the storage layer does not depend on the engine.
//!
//! - [`interlock`]: HAMMER's refcount + interlock word (the shard gate's
//!   buffers and the B+tree node cache's slots);
//! - [`shim`]: the atomics, mutex and condvar the interlock and the shard
//!   hand-off use, switched to loom's under `--cfg loom` so that both are
//!   model-checked;
//! - [`background`]: large collections freed off a commit's critical path;
//! - [`fanout`]: items dealt to worker threads in batches (the trace
//!   replays of `refctl` and `refd-bench`).
pub mod background;
pub mod fanout;
pub mod interlock;
pub mod shim;
