//! Helpers shared by the integration tests that include it (`mod
//! common;`), and by the crate's unit tests (`src/engine/tests.rs`
//! includes this file by path; `src/lib.rs` names the crate
//! `refd_durable` for them): test-only code kept out of the library's
//! public API, written against that API only.

use std::sync::Arc;

use refd_durable::{DurableEngine, FormatOptions};
use refd_ioring::format::{FsId, Superblock};
use refd_ioring::{SimConfig, SimStorage};

/// The file system id [`formatted`] gives a device.
pub const FS_ID: FsId = FsId([9; 16]);

/// A simulated device of `dev_bytes` (`seed` drives its simulated
/// crashes), formatted with a log of `log_bytes`.
pub fn formatted(dev_bytes: u64, log_bytes: u64, seed: u64) -> Arc<SimStorage> {
    formatted_with_superblock(dev_bytes, log_bytes, seed).0
}

/// [`formatted`], with the superblock the format wrote.
pub fn formatted_with_superblock(
    dev_bytes: u64,
    log_bytes: u64,
    seed: u64,
) -> (Arc<SimStorage>, Superblock) {
    let dev = Arc::new(SimStorage::new(SimConfig::new(dev_bytes, seed)).unwrap());
    let sb = DurableEngine::format(
        &dev,
        FormatOptions {
            log_bytes: Some(log_bytes),
            fs_id: Some(FS_ID),
        },
    )
    .unwrap();
    (dev, sb)
}
