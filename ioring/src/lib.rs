//! refd storage layer: devices, the `Storage` abstraction, the io_uring
//! engine, the deterministic simulated device and the on-disk format.
//!
//! Nothing in this crate knows about delayed-ref semantics; it moves aligned
//! blocks to and from a device and defines how blocks are framed, checksummed
//! and addressed on disk. The engine built on top (ref log, copy-on-write
//! B+tree, recovery) is generic over [`Storage`], so the same commit and
//! recovery code runs against [`UringStorage`] in production and against
//! [`SimStorage`] in deterministic crash tests.
//!
//! Map of the crate:
//!
//! - [`aligned`]: [`AlignedBuf`], a zeroed heap buffer aligned to 4096 bytes.
//! - [`device`]: opening a block device or a regular file with `O_DIRECT`, and
//!   its [`Geometry`].
//! - [`storage`]: the [`Storage`] trait, [`StorageError`] and the failure
//!   latch shared by every implementation.
//! - [`uring`]: [`UringStorage`], the io_uring implementation.
//! - [`sim`]: [`SimStorage`], the in-memory implementation with crash, torn
//!   sector, EIO and bit-flip injection, reproducible from a seed.
//! - [`format`](mod@format): superblock, log batch framing and node header, byte by byte
//!   as documented in `docs/format.md`.
//! - [`btree`]: the copy-on-write B+tree ([`BTree`]) with its node
//!   allocator, bounded node cache and fsck walk, as documented in
//!   `docs/btree.md`.
//! - [`log`](mod@log): the durable ref log: [`RefLog`] (group commit of
//!   opaque records into the circular log region, trim, failure latch) and
//!   [`replay`] (recovery), as documented in `docs/log.md`.
//! - [`selftest`]: the round-trip contract of every on-device decoder,
//!   shared by the property test `tests/fuzz_decoders.rs` and the
//!   cargo-fuzz targets in `fuzz/` (`docs/fuzzing.md`).
//!
//! Rules every caller must know:
//!
//! - Offsets and lengths of every I/O are multiples of
//!   [`Geometry::logical_block_bytes`]; memory alignment is not required
//!   (implementations copy through their own aligned buffers).
//! - A completed write is not durable. Durability comes from
//!   [`Storage::write_durable`] or from [`Storage::flush`], which covers every
//!   write that completed before `flush` was called.
//! - The first write or flush error latches the storage: every later call
//!   returns [`StorageError::Failed`] naming that first failure. Nothing
//!   written after a failure may be acknowledged.

pub mod aligned;
pub mod btree;
pub mod device;
pub mod format;
pub mod log;
pub mod selftest;
pub mod sim;
pub mod storage;
pub mod uring;

#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use aligned::{AlignedBuf, AlignedBufError, BLOCK_BYTES};
pub use btree::{
    AllocInfo, ApplyReport, BTree, BTreeError, CommitInfo, Key, RootInfo, TreeCheck, TreeConfig,
    TreeLocation,
};
pub use device::{Device, DeviceError, DeviceKind, FileAllocation, Geometry, GeometryError};
pub use log::{
    replay, Durability, LogBounds, LogConfig, LogError, LogPosition, LogStats, Lsn, RecoveryReport,
    RefLog, Replay, Ticket, WriteLatency, WRITE_LATENCY_BUCKETS,
};
pub use sim::{CrashPolicy, FaultPlan, SimConfig, SimCounters, SimError, SimStorage};
pub use storage::{IoFailure, IoOp, Storage, StorageError};
pub use uring::{UringConfig, UringSetupError, UringStats, UringStorage};
