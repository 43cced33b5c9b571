//! refd-tools: the pieces behind the `refctl` command line (and later the
//! `refd` daemon), composed from refd-core, refd-ioring and refd-btrfs.
//!
//! - [`replay`]: replay a kernel btrfs delayed-ref trace through refd and
//!   compare with the kernel's extent tree.

pub mod alloc;
pub mod device;
pub mod replay;
