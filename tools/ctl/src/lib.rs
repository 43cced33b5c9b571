//! refd-ctl: the pieces behind the `refctl` command line, composed from
//! refd-core, refd-ioring, refd-durable, refd-btrfs and refd-client.
//!
//! - [`replay`]: replay a kernel btrfs delayed-ref trace through refd and
//!   compare with the kernel's extent tree.
//! - [`device`]: `format`, `fsck`, `dump` of a refd device.
//! - [`client`]: the subcommands that talk to a running `refd` daemon
//!   (`add`, `drop`, `alloc`, `update`, `submit`, `get`, `backrefs`,
//!   `commit`, `stats`, `freed`, `barrier`).
//! - [`opfile`]: ops as text (the op file grammar of `refctl submit`) and
//!   the one builder of a wire op from its fields.

pub mod client;
pub mod device;
pub mod opfile;
pub mod replay;
