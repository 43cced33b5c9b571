//! Opening the device refd lives on, and its [`Geometry`].
//!
//! A device is either a block device, opened `O_RDWR | O_DIRECT | O_EXCL` so
//! that a mounted or otherwise claimed device is refused, or a regular file,
//! opened `O_RDWR | O_DIRECT` (useful for tests and for running on top of a
//! file system) and locked with an exclusive `flock`, so that a second
//! opener is refused ([`DeviceError::Locked`]). The lock belongs to the open
//! file and lasts until its last reference goes, which includes I/O still in
//! flight in the io_uring of a killed process: a restart cannot write over
//! a batch that a dead process's late write could still land on. Block device sizes come from the `BLKGETSIZE64`,
//! `BLKSSZGET` and `BLKPBSZGET` ioctls; a regular file reports its length and
//! 4096-byte blocks, which satisfies the `O_DIRECT` rules of every Linux file
//! system refd targets.
//!
//! Invariant of every opened [`Device`]: its geometry passed
//! [`Geometry::check`], so the size is a non-zero multiple of
//! [`BLOCK_BYTES`] and the logical block size divides 4096.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::aligned::BLOCK_BYTES;

/// Smallest logical block size accepted, in bytes.
pub const LOGICAL_BLOCK_BYTES_MIN: u32 = 512;
/// Largest physical block size accepted, in bytes.
pub const PHYSICAL_BLOCK_BYTES_MAX: u32 = 1 << 20;
/// Block size reported for regular files, in bytes.
pub const FILE_BLOCK_BYTES: u32 = BLOCK_BYTES as u32;

/// Size and block sizes of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Usable size in bytes.
    pub size_bytes: u64,
    /// Smallest unit the device can address; every I/O offset and length must
    /// be a multiple of it.
    pub logical_block_bytes: u32,
    /// Unit the device writes atomically at best; writes smaller than this
    /// are read-modify-write inside the device and may tear on power loss.
    pub physical_block_bytes: u32,
}

/// Why a [`Geometry`] is not usable by refd.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    /// The logical or physical block size is not a power of two in the
    /// supported range.
    #[error(
        "unsupported block sizes: logical {logical_block_bytes} bytes, physical \
         {physical_block_bytes} bytes (need powers of two, logical in \
         {LOGICAL_BLOCK_BYTES_MIN}..={BLOCK_BYTES}, physical in \
         logical..={PHYSICAL_BLOCK_BYTES_MAX})"
    )]
    BlockSize {
        /// Reported logical block size.
        logical_block_bytes: u32,
        /// Reported physical block size.
        physical_block_bytes: u32,
    },
    /// The size is zero or not a multiple of [`BLOCK_BYTES`].
    #[error("size {size_bytes} bytes is not a non-zero multiple of the {block_bytes}-byte block")]
    SizeNotMultiple {
        /// Reported size.
        size_bytes: u64,
        /// Required granule.
        block_bytes: u64,
    },
}

impl Geometry {
    /// Checks the invariants documented in the module docs.
    pub fn check(&self) -> Result<(), GeometryError> {
        let logical = self.logical_block_bytes;
        let physical = self.physical_block_bytes;
        let logical_ok = logical.is_power_of_two()
            && (LOGICAL_BLOCK_BYTES_MIN..=BLOCK_BYTES as u32).contains(&logical);
        let physical_ok =
            physical.is_power_of_two() && (logical..=PHYSICAL_BLOCK_BYTES_MAX).contains(&physical);
        if !logical_ok || !physical_ok {
            return Err(GeometryError::BlockSize {
                logical_block_bytes: logical,
                physical_block_bytes: physical,
            });
        }
        let block_bytes = BLOCK_BYTES as u64;
        if self.size_bytes == 0 || !self.size_bytes.is_multiple_of(block_bytes) {
            return Err(GeometryError::SizeNotMultiple {
                size_bytes: self.size_bytes,
                block_bytes,
            });
        }
        Ok(())
    }

    /// True if `value` is a multiple of the logical block size.
    pub fn is_block_aligned(&self, value: u64) -> bool {
        value.is_multiple_of(u64::from(self.logical_block_bytes))
    }
}

/// How [`Device::create_file`] obtains the file's space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAllocation {
    /// Reserve every block with `fallocate` now, so that a write inside the
    /// file can never fail with `ENOSPC` later (which would latch the
    /// storage). The first write of each block still converts an unwritten
    /// extent, which makes first writes slower. Falls back to `Sparse` where
    /// `fallocate` is not supported.
    Reserve,
    /// A sparse file: instant to create, blocks allocated on first write,
    /// which may fail with `ENOSPC` if the file system fills up. For tests
    /// and benchmarks.
    Sparse,
}

/// What kind of object a [`Device`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A block device (opened with `O_EXCL`).
    BlockDevice,
    /// A regular file.
    RegularFile,
}

/// Errors opening or creating a device. Every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// `stat` on the path failed (for example it does not exist).
    #[error("cannot stat device {path}: {source}")]
    Stat {
        /// Device path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The path is neither a block device nor a regular file.
    #[error("device {path} is a {file_type}, expected a block device or a regular file")]
    UnsupportedFileType {
        /// Device path.
        path: PathBuf,
        /// What it is instead.
        file_type: &'static str,
    },
    /// The file system does not support `O_DIRECT` (open returned `EINVAL`).
    #[error("device {path} does not support O_DIRECT: {source}")]
    DirectIoUnsupported {
        /// Device path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The block device is claimed by someone else (mounted, in a RAID or
    /// already opened by refd): `O_EXCL` open returned `EBUSY`.
    #[error("block device {path} is busy (mounted or opened exclusively by another user)")]
    Busy {
        /// Device path.
        path: PathBuf,
    },
    /// The regular file is locked by another opener (another refd, a
    /// `refctl` command, or a killed process whose I/O is still in flight):
    /// `flock(LOCK_EX | LOCK_NB)` failed.
    #[error(
        "device file {path} is in use by another process (its exclusive lock is held): {source}"
    )]
    Locked {
        /// Device path.
        path: PathBuf,
        /// The flock error (`EWOULDBLOCK` when held).
        #[source]
        source: io::Error,
    },
    /// Opening failed for another reason.
    #[error("cannot open {kind:?} {path}: {source}")]
    Open {
        /// Device path.
        path: PathBuf,
        /// What we tried to open.
        kind: DeviceKind,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating or sizing a regular file failed.
    #[error("cannot create file {path} with {size_bytes} bytes: {source}")]
    Create {
        /// File path.
        path: PathBuf,
        /// Requested size.
        size_bytes: u64,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A block-device ioctl failed.
    #[error("ioctl {ioctl} on {path} failed: {source}")]
    Ioctl {
        /// Device path.
        path: PathBuf,
        /// Name of the ioctl.
        ioctl: &'static str,
        /// Underlying error.
        #[source]
        source: nix::Error,
    },
    /// The device is smaller than the caller's minimum.
    #[error("device {path} has {size_bytes} bytes, need at least {min_size_bytes}")]
    TooSmall {
        /// Device path.
        path: PathBuf,
        /// Actual size.
        size_bytes: u64,
        /// Required minimum.
        min_size_bytes: u64,
    },
    /// The geometry is unusable (block sizes or size alignment).
    #[error("device {path}: {source}")]
    BadGeometry {
        /// Device path.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: GeometryError,
    },
}

mod ioctls {
    // BLKGETSIZE64 is _IOR(0x12, 114, size_t) but the kernel writes a u64.
    nix::ioctl_read_bad!(
        blk_get_size64,
        nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
        u64
    );
    nix::ioctl_read_bad!(blk_ssz_get, libc::BLKSSZGET, libc::c_int);
    nix::ioctl_read_bad!(blk_pbsz_get, libc::BLKPBSZGET, libc::c_uint);
}

/// An open device (block device or regular file) with its geometry; see the
/// module docs.
#[derive(Debug)]
pub struct Device {
    file: File,
    path: PathBuf,
    kind: DeviceKind,
    geometry: Geometry,
    /// Set by an owner that may leave asynchronous I/O in flight (an
    /// io_uring): it releases the lock itself, only when idle
    /// ([`Device::unlock_idle`]). Otherwise the drop releases it.
    keep_lock_on_drop: bool,
}

impl Drop for Device {
    fn drop(&mut self) {
        // A device on its own does synchronous I/O only: nothing of ours
        // is in flight, so the lock goes now, whoever else still holds a
        // copy of the descriptor (see `Device::unlock_idle`). Measured:
        // `round_trip_on_a_file` (create, drop, open) was refused as
        // `Locked` while the loop-device test of the same binary started
        // `losetup`.
        if !self.keep_lock_on_drop {
            self.unlock_idle();
        }
    }
}

impl Device {
    /// Opens an existing block device or regular file at `path` for direct
    /// I/O and checks that it holds at least `min_size_bytes`.
    pub fn open(path: impl AsRef<Path>, min_size_bytes: u64) -> Result<Self, DeviceError> {
        let path = path.as_ref().to_path_buf();
        let meta = std::fs::metadata(&path).map_err(|source| DeviceError::Stat {
            path: path.clone(),
            source,
        })?;
        let file_type = meta.file_type();
        let kind = if file_type.is_block_device() {
            DeviceKind::BlockDevice
        } else if file_type.is_file() {
            DeviceKind::RegularFile
        } else {
            return Err(DeviceError::UnsupportedFileType {
                path,
                file_type: describe_file_type(&file_type),
            });
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        let mut flags = libc::O_DIRECT | libc::O_CLOEXEC;
        if kind == DeviceKind::BlockDevice {
            flags |= libc::O_EXCL;
        }
        options.custom_flags(flags);
        let file = options
            .open(&path)
            .map_err(|source| open_error(&path, kind, source))?;
        Self::from_open_file(file, path, kind, min_size_bytes)
    }

    /// Creates a new regular file of `size_bytes` at `path` (it must not
    /// exist yet) and opens it for direct I/O. Blocks read as zero until
    /// written. See [`FileAllocation`] for how space is obtained.
    pub fn create_file(
        path: impl AsRef<Path>,
        size_bytes: u64,
        allocation: FileAllocation,
    ) -> Result<Self, DeviceError> {
        let path = path.as_ref().to_path_buf();
        let create_error = |source| DeviceError::Create {
            path: path.clone(),
            size_bytes,
            source,
        };
        // Reject a bad size before touching the file system.
        let geometry = file_geometry(size_bytes);
        geometry
            .check()
            .map_err(|source| DeviceError::BadGeometry {
                path: path.clone(),
                source,
            })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EINVAL) => DeviceError::DirectIoUnsupported {
                    path: path.clone(),
                    source,
                },
                _ => create_error(source),
            })?;
        match allocation {
            FileAllocation::Reserve => preallocate(&file, size_bytes),
            FileAllocation::Sparse => file.set_len(size_bytes),
        }
        .map_err(create_error)?;
        Self::from_open_file(file, path, DeviceKind::RegularFile, 0)
    }

    fn from_open_file(
        file: File,
        path: PathBuf,
        kind: DeviceKind,
        min_size_bytes: u64,
    ) -> Result<Self, DeviceError> {
        // Re-check the kind on the descriptor itself: the path may have been
        // replaced between `stat` and `open`.
        let meta = file.metadata().map_err(|source| DeviceError::Stat {
            path: path.clone(),
            source,
        })?;
        let actual_kind = if meta.file_type().is_block_device() {
            DeviceKind::BlockDevice
        } else if meta.file_type().is_file() {
            DeviceKind::RegularFile
        } else {
            return Err(DeviceError::UnsupportedFileType {
                path,
                file_type: describe_file_type(&meta.file_type()),
            });
        };
        if actual_kind != kind {
            return Err(DeviceError::UnsupportedFileType {
                path,
                file_type: "file whose type changed while it was being opened",
            });
        }
        if kind == DeviceKind::RegularFile {
            lock_exclusive(&file).map_err(|source| DeviceError::Locked {
                path: path.clone(),
                source,
            })?;
        }
        let geometry = match kind {
            DeviceKind::RegularFile => file_geometry(meta.len()),
            DeviceKind::BlockDevice => block_device_geometry(&file, &path)?,
        };
        if geometry.size_bytes < min_size_bytes {
            return Err(DeviceError::TooSmall {
                path,
                size_bytes: geometry.size_bytes,
                min_size_bytes,
            });
        }
        geometry
            .check()
            .map_err(|source| DeviceError::BadGeometry {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            file,
            path,
            kind,
            geometry,
            keep_lock_on_drop: false,
        })
    }

    /// Path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Block device or regular file.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// Size and block sizes, read once at open.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The open file (opened with `O_DIRECT`).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Reserves `size_bytes` for `file` (which is empty), or makes it sparse if
/// the file system does not support `fallocate`.
fn preallocate(file: &File, size_bytes: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(size_bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size does not fit in off_t"))?;
    match nix::fcntl::fallocate(
        file.as_raw_fd(),
        nix::fcntl::FallocateFlags::empty(),
        0,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => file.set_len(size_bytes),
        Err(e) => Err(io::Error::from(e)),
    }
}

fn file_geometry(size_bytes: u64) -> Geometry {
    Geometry {
        size_bytes,
        logical_block_bytes: FILE_BLOCK_BYTES,
        physical_block_bytes: FILE_BLOCK_BYTES,
    }
}

fn block_device_geometry(file: &File, path: &Path) -> Result<Geometry, DeviceError> {
    let fd = file.as_raw_fd();
    let ioctl_error = |ioctl: &'static str| {
        move |source| DeviceError::Ioctl {
            path: path.to_path_buf(),
            ioctl,
            source,
        }
    };
    let mut size_bytes: u64 = 0;
    // SAFETY: `fd` is an open block device owned by `file`, and BLKGETSIZE64
    // writes exactly one u64 through the pointer, which points to a live local.
    unsafe { ioctls::blk_get_size64(fd, &mut size_bytes) }.map_err(ioctl_error("BLKGETSIZE64"))?;
    let mut logical: libc::c_int = 0;
    // SAFETY: as above; BLKSSZGET writes one int.
    unsafe { ioctls::blk_ssz_get(fd, &mut logical) }.map_err(ioctl_error("BLKSSZGET"))?;
    let mut physical: libc::c_uint = 0;
    // SAFETY: as above; BLKPBSZGET writes one unsigned int.
    unsafe { ioctls::blk_pbsz_get(fd, &mut physical) }.map_err(ioctl_error("BLKPBSZGET"))?;
    Ok(Geometry {
        size_bytes,
        // A negative size is nonsense; map it to 0, which `check` rejects with
        // the numbers in the error.
        logical_block_bytes: u32::try_from(logical).unwrap_or(0),
        physical_block_bytes: physical,
    })
}

/// Takes the exclusive, non-blocking `flock` of `file`'s open file
/// description (released when its last reference is closed).
impl Device {
    /// [`Device::open`], waiting up to `wait` while another opener holds
    /// the device ([`DeviceError::Busy`] / [`DeviceError::Locked`]): a
    /// killed process's `O_EXCL` open or `flock` lasts until the kernel has
    /// torn down its io_uring, after its last in-flight I/O, so a restart
    /// right after a SIGKILL may find the device taken for a moment.
    pub fn open_when_free(
        path: impl AsRef<Path>,
        min_size_bytes: u64,
        wait: std::time::Duration,
    ) -> Result<Self, DeviceError> {
        let path = path.as_ref();
        let deadline = std::time::Instant::now() + wait;
        loop {
            match Device::open(path, min_size_bytes) {
                Err(DeviceError::Busy { .. } | DeviceError::Locked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => return r,
            }
        }
    }

    /// The owner releases the lock ([`Device::unlock_idle`]) when it knows
    /// none of its I/O is in flight; dropping the device then keeps the
    /// lock with the open file (for an io_uring owner, see
    /// `UringStorage`'s drop).
    pub(crate) fn keep_lock_on_drop(&mut self) {
        self.keep_lock_on_drop = true;
    }

    /// Releases the exclusive lock of a regular-file device now, instead of
    /// when the last reference to the open file goes. Other references can
    /// outlive our close: a child that another thread of this process is
    /// starting holds a copy of every descriptor between its fork and its
    /// exec, and an io_uring may hold the file for a while after its last
    /// completion; a close followed at once by an open (in this process or
    /// another) was then refused as [`DeviceError::Locked`]. Only for a
    /// device with no I/O of ours in flight: the lock is what keeps a
    /// restarted process from writing where a late write of ours could
    /// still land. A killed process never gets here, and its lock lasts as
    /// long as its I/O.
    pub fn unlock_idle(&self) {
        if self.kind == DeviceKind::RegularFile {
            // SAFETY: flock on a descriptor `self.file` keeps open for the
            // call; it neither reads nor writes memory.
            unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor `file` keeps open for the call; it
    // neither reads nor writes memory.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn open_error(path: &Path, kind: DeviceKind, source: io::Error) -> DeviceError {
    match source.raw_os_error() {
        Some(libc::EINVAL) => DeviceError::DirectIoUnsupported {
            path: path.to_path_buf(),
            source,
        },
        Some(libc::EBUSY) if kind == DeviceKind::BlockDevice => DeviceError::Busy {
            path: path.to_path_buf(),
        },
        _ => DeviceError::Open {
            path: path.to_path_buf(),
            kind,
            source,
        },
    }
}

fn describe_file_type(file_type: &std::fs::FileType) -> &'static str {
    if file_type.is_dir() {
        "directory"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_symlink() {
        "symlink"
    } else {
        "special file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{LoopDevice, Scratch};

    #[test]
    fn geometry_check() {
        let ok = Geometry {
            size_bytes: 1 << 20,
            logical_block_bytes: 512,
            physical_block_bytes: 4096,
        };
        assert!(ok.check().is_ok());
        assert!(ok.is_block_aligned(1024));
        assert!(!ok.is_block_aligned(100));
        let bad_logical = Geometry {
            logical_block_bytes: 8192,
            physical_block_bytes: 8192,
            ..ok
        };
        assert!(matches!(
            bad_logical.check(),
            Err(GeometryError::BlockSize { .. })
        ));
        let bad_physical = Geometry {
            physical_block_bytes: 256,
            ..ok
        };
        assert!(matches!(
            bad_physical.check(),
            Err(GeometryError::BlockSize { .. })
        ));
        let not_pow2 = Geometry {
            logical_block_bytes: 1000,
            ..ok
        };
        assert!(matches!(
            not_pow2.check(),
            Err(GeometryError::BlockSize { .. })
        ));
        let odd_size = Geometry {
            size_bytes: (1 << 20) + 512,
            ..ok
        };
        assert_eq!(
            odd_size.check(),
            Err(GeometryError::SizeNotMultiple {
                size_bytes: (1 << 20) + 512,
                block_bytes: 4096
            })
        );
        let empty = Geometry {
            size_bytes: 0,
            ..ok
        };
        assert!(empty.check().is_err());
    }

    #[test]
    fn regular_file_open_and_checks() {
        let Some(scratch) = Scratch::new("device-file") else {
            return;
        };
        let path = scratch.path().join("dev.img");
        let dev = Device::create_file(&path, 1 << 20, FileAllocation::Reserve).expect("create");
        assert_eq!(dev.kind(), DeviceKind::RegularFile);
        assert_eq!(
            dev.geometry(),
            Geometry {
                size_bytes: 1 << 20,
                logical_block_bytes: 4096,
                physical_block_bytes: 4096
            }
        );
        assert_eq!(dev.path(), path.as_path());
        drop(dev);

        // Creating again refuses to clobber.
        assert!(matches!(
            Device::create_file(&path, 1 << 20, FileAllocation::Sparse),
            Err(DeviceError::Create { .. })
        ));
        // Bad size is refused before the file is created.
        let odd = scratch.path().join("odd.img");
        assert!(matches!(
            Device::create_file(&odd, 5000, FileAllocation::Sparse),
            Err(DeviceError::BadGeometry { .. })
        ));
        assert!(!odd.exists());

        let dev = Device::open(&path, 1 << 20).expect("open");
        assert_eq!(dev.geometry().size_bytes, 1 << 20);
        drop(dev);

        match Device::open(&path, 2 << 20) {
            Err(DeviceError::TooSmall {
                path: p,
                size_bytes,
                min_size_bytes,
            }) => {
                assert_eq!(p, path);
                assert_eq!(size_bytes, 1 << 20);
                assert_eq!(min_size_bytes, 2 << 20);
            }
            other => panic!("expected TooSmall, got {other:?}"),
        }

        // A file whose size is not a multiple of 4096 is refused with numbers.
        let file = OpenOptions::new().write(true).open(&path).expect("reopen");
        file.set_len((1 << 20) + 100).expect("set_len");
        drop(file);
        let err = Device::open(&path, 0).expect_err("odd size must be refused");
        let text = err.to_string();
        assert!(text.contains("1048676"), "{text}");
        assert!(text.contains(path.to_str().expect("utf8")), "{text}");

        assert!(matches!(
            Device::open(scratch.path().join("missing"), 0),
            Err(DeviceError::Stat { .. })
        ));
        assert!(matches!(
            Device::open(scratch.path(), 0),
            Err(DeviceError::UnsupportedFileType {
                file_type: "directory",
                ..
            })
        ));
    }

    /// Review item 1: a regular file gets no `O_EXCL`, so a second opener
    /// (another process, or a restart while a killed process's I/O is
    /// still in flight) must be refused by an exclusive lock held as long
    /// as the open file (and any I/O in flight on it) lives.
    #[test]
    fn a_regular_file_is_opened_exclusively() {
        let Some(scratch) = Scratch::new("device-file-lock") else {
            return;
        };
        let path = scratch.path().join("dev.img");
        let dev = Device::create_file(&path, 1 << 20, FileAllocation::Sparse).expect("create");
        match Device::open(&path, 0) {
            Err(DeviceError::Locked { path: p, .. }) => assert_eq!(p, path),
            other => panic!("expected Locked while created, got {other:?}"),
        }
        drop(dev);
        let dev = Device::open(&path, 0).expect("open after close");
        let err = Device::open(&path, 0).expect_err("a second opener is refused");
        assert!(matches!(err, DeviceError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("in use"), "{err}");
        drop(dev);
        Device::open(&path, 0).expect("open after the first is closed");
    }

    /// A device closed while a child process still holds a copy of its
    /// descriptor (as a child another thread is starting does between its
    /// fork and its exec) does not keep the file locked: the drop releases
    /// the lock. `round_trip_on_a_file` (create, drop, open) was refused
    /// as `Locked` while a test beside it started `losetup`.
    #[test]
    fn a_closed_device_is_not_held_locked_by_a_forked_child() {
        let Some(scratch) = Scratch::new("device-fork-lock") else {
            return;
        };
        let path = scratch.path().join("dev.img");
        let dev = Device::create_file(&path, 1 << 20, FileAllocation::Sparse).expect("create");
        // SAFETY: the child only sleeps and exits (async-signal-safe
        // calls: no allocation, no locks), holding the copies of every
        // descriptor that fork gave it.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: plain system calls in the child, see above.
            unsafe {
                libc::sleep(3);
                libc::_exit(0);
            }
        }
        assert!(child > 0, "fork: {}", std::io::Error::last_os_error());
        drop(dev);
        let reopened = Device::open(&path, 0);
        // SAFETY: kill and waitpid on the child started above.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
        reopened.expect("open while a forked child holds the old descriptor");
    }

    #[test]
    fn block_device_geometry_and_exclusive_open() {
        let Some(scratch) = Scratch::new("device-loop") else {
            return;
        };
        let Some(lo) = LoopDevice::attach(&scratch, "loop.img", 4 << 20) else {
            return;
        };
        let dev = Device::open(lo.path(), 1 << 20).expect("open loop device");
        assert_eq!(dev.kind(), DeviceKind::BlockDevice);
        let geometry = dev.geometry();
        assert_eq!(geometry.size_bytes, 4 << 20);
        assert!([512, 1024, 2048, 4096].contains(&geometry.logical_block_bytes));
        assert!(geometry.physical_block_bytes >= geometry.logical_block_bytes);
        // O_EXCL: a second exclusive open of the same device is refused.
        match Device::open(lo.path(), 0) {
            Err(DeviceError::Busy { path }) => assert_eq!(path, lo.path()),
            other => panic!("expected Busy, got {other:?}"),
        }
        match Device::open(lo.path(), 8 << 20) {
            Err(DeviceError::Busy { .. }) => {}
            other => panic!("expected Busy while held, got {other:?}"),
        }
        drop(dev);
        match Device::open(lo.path(), 8 << 20) {
            Err(DeviceError::TooSmall { size_bytes, .. }) => assert_eq!(size_bytes, 4 << 20),
            other => panic!("expected TooSmall, got {other:?}"),
        }
    }
}
