//! Opening the daemon's device: an existing refd device as it is; a path
//! that does not exist becomes a new file device, created and formatted;
//! anything else (a file or block device without a refd superblock) is
//! refused: only `refctl format --force` overwrites what is not refd's.
//!
//! One daemon per device: a block device is opened `O_EXCL` by the storage
//! layer, and the daemon takes an exclusive `flock` on the descriptor it
//! does its I/O through, held until the last reference to that open file
//! goes away (in-flight I/O included), so a second daemon is refused.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refd_durable::{read_newest_superblock, DurableEngine, FormatOptions};
use refd_ioring::{Device, FileAllocation, UringConfig, UringStorage};

/// The daemon's storage handle.
pub type Dev = Arc<UringStorage>;

/// Why the device cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The device could not be opened or created.
    #[error("{path}: {reason}")]
    Open {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The block device is open exclusively elsewhere.
    #[error("{path}: {reason}")]
    Busy {
        /// Path.
        path: String,
        /// The open error.
        reason: String,
    },
    /// Another process holds the device.
    #[error("{path} is in use by another process (another refd?): {source}")]
    Locked {
        /// Path.
        path: String,
        /// The flock error.
        source: std::io::Error,
    },
    /// A new file device would be too small to serve.
    #[error(
        "{path}: --device-size {bytes} is too small for a new device: refd needs at least \
         {min} bytes ({} MiB), for a log that holds its 2 MiB batches; nothing was created",
        min.div_ceil(1 << 20)
    )]
    TooSmall {
        /// Path.
        path: String,
        /// The size asked for.
        bytes: u64,
        /// The smallest size served.
        min: u64,
    },
    /// The device holds no refd file system.
    #[error(
        "{path} exists but holds no refd file system ({reason}); refd never formats it: run \
         `refctl format --force {path}` to make it one"
    )]
    NotRefd {
        /// Path.
        path: String,
        /// What the superblock read said.
        reason: String,
    },
}

/// An opened device and whether it was created now.
#[derive(Debug)]
pub struct Opened {
    /// Storage.
    pub storage: Dev,
    /// Created and formatted by this start.
    pub created: bool,
}

/// How long a start waits for a busy device: after a crash (SIGKILL) the
/// kernel releases a dead process's device only once its io_uring is torn
/// down, which can take a moment.
pub const BUSY_WAIT: Duration = Duration::from_secs(15);

/// Opens `path` for serving (see the module docs); a missing path becomes
/// a formatted file of `create_bytes`. A device busy with another process
/// is waited for up to [`BUSY_WAIT`].
pub fn open_device(path: &Path, create_bytes: u64) -> Result<Opened, DeviceError> {
    let start = Instant::now();
    let mut logged = false;
    loop {
        match try_open(path, create_bytes) {
            Err(e @ (DeviceError::Locked { .. } | DeviceError::Busy { .. }))
                if start.elapsed() < BUSY_WAIT =>
            {
                if !logged {
                    tracing::warn!(error = %e, "device busy; waiting for it to be released");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn try_open(path: &Path, create_bytes: u64) -> Result<Opened, DeviceError> {
    let display = path.display().to_string();
    let open_err = |reason: String| DeviceError::Open {
        path: display.clone(),
        reason,
    };
    let created = !path.exists() && std::fs::symlink_metadata(path).is_err();
    let min = crate::config::device_bytes_min();
    if created && create_bytes < min {
        return Err(DeviceError::TooSmall {
            path: display,
            bytes: create_bytes,
            min,
        });
    }
    let storage: Dev = if created {
        let device = Device::create_file(path, create_bytes, FileAllocation::Reserve)
            .map_err(|e| open_err(e.to_string()))?;
        Arc::new(
            UringStorage::new(device, UringConfig::default())
                .map_err(|e| open_err(format!("io_uring setup: {e}")))?,
        )
    } else {
        let device = match Device::open(path, 0) {
            Ok(d) => d,
            Err(e @ refd_ioring::DeviceError::Busy { .. }) => {
                return Err(DeviceError::Busy {
                    path: display,
                    reason: e.to_string(),
                })
            }
            Err(refd_ioring::DeviceError::Locked { source, .. }) => {
                return Err(DeviceError::Locked {
                    path: display,
                    source,
                })
            }
            Err(e) => return Err(open_err(e.to_string())),
        };
        Arc::new(
            UringStorage::new(device, UringConfig::default())
                .map_err(|e| open_err(format!("io_uring setup: {e}")))?,
        )
    };
    lock(&storage, &display)?;
    if created {
        DurableEngine::format(&storage, FormatOptions::default())
            .map_err(|e| open_err(format!("format: {e}")))?;
    } else if let Err(e) = read_newest_superblock(&*storage) {
        return Err(DeviceError::NotRefd {
            path: display,
            reason: e.to_string(),
        });
    }
    Ok(Opened { storage, created })
}

/// Takes the exclusive lock of the device's I/O descriptor.
fn lock(storage: &Dev, path: &str) -> Result<(), DeviceError> {
    let fd = storage.device().as_raw_fd();
    // SAFETY: flock on a descriptor the storage keeps open for its whole
    // life; it neither reads nor writes memory.
    let r = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(DeviceError::Locked {
            path: path.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
