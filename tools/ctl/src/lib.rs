//! refd-ctl: the pieces behind the `refctl` command line, composed from
//! refd-core, refd-ioring, refd-durable and refd-btrfs.
//!
//! - [`replay`]: replay a kernel btrfs delayed-ref trace through refd and
//!   compare with the kernel's extent tree.

pub mod device;
pub mod replay;
