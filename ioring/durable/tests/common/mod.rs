//! Helpers shared by the integration tests that include it (`mod
//! common;`): test-only code kept out of the library's public API.

use std::sync::Arc;

use refd_durable::{DurableEngine, FormatOptions};
use refd_ioring::format::FsId;
use refd_ioring::{SimConfig, SimStorage};

/// A simulated device of `dev_bytes` (`seed` drives its simulated
/// crashes), formatted with a log of `log_bytes`.
pub fn formatted(dev_bytes: u64, log_bytes: u64, seed: u64) -> Arc<SimStorage> {
    let dev = Arc::new(SimStorage::new(SimConfig::new(dev_bytes, seed)).unwrap());
    DurableEngine::format(
        &dev,
        FormatOptions {
            log_bytes: Some(log_bytes),
            fs_id: Some(FsId([9; 16])),
        },
    )
    .unwrap();
    dev
}
