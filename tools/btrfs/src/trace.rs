//! Streaming parser of btrfs delayed-ref ftrace text into refd [`Op`]s.
//!
//! Each line is `<comm>-<pid> [<cpu>] <flags> <timestamp>: <event>: <fsid>:
//! <fields>` (see `../shared/traces/README.md`). `comm` may be `<...>` and
//! may contain dashes and spaces, so the pid is the number after the last
//! dash before the `[cpu]` field.
//!
//! # Pairing and order
//!
//! The kernel queues one operation with one `add_delayed_ref_head` event,
//! printed while `delayed_refs->lock` is held, then (unless the action is
//! `UPDATE_DELAYED_HEAD`) one `add_delayed_tree_ref` / `add_delayed_data_ref`
//! event printed just after the lock is released, from the same task. So:
//! - a ref event pairs with the pending head of the same pid (a task has at
//!   most one: it prints the ref before it can queue anything else);
//! - head events are in the kernel's queue order (they are printed under
//!   the lock and merged by a clock shared by all CPUs), ref events are not:
//!   two tasks' ref events may come in either order.
//!
//! Ops are therefore emitted in *head* order. A head whose ref has not
//! arrived holds back everything behind it; the queue of held-back slots is
//! bounded by [`HOLDBACK_SLOTS_MAX`] (a ref normally follows its head within
//! a few lines; the deepest holdback of each capture is reported in
//! [`TraceStats::holdback_max`]).
//!
//! # Mapping (btrfs vocabulary)
//!
//! | head action | ref event | refd op |
//! |---|---|---|
//! | `ADD_DELAYED_EXTENT` | `ADD_DELAYED_REF` | [`Action::AddExtent`] with the ref's key |
//! | `ADD_DELAYED_REF` | `ADD_DELAYED_REF` | [`Action::AddRef`] |
//! | `DROP_DELAYED_REF` | `DROP_DELAYED_REF` | [`Action::DropRef`] |
//! | `UPDATE_DELAYED_HEAD` | none | [`Action::UpdateHead`] setting `FULL_BACKREF` |
//!
//! - keys: `TREE_BLOCK_REF` → [`RefKey::TreeBlock`] `{root: ref_root}`,
//!   `SHARED_BLOCK_REF` → [`RefKey::SharedBlock`] `{parent}`,
//!   `EXTENT_DATA_REF` → [`RefKey::ExtentData`] `{root: ref_root, objectid:
//!   owner, offset}`, `SHARED_DATA_REF` → [`RefKey::SharedData`] `{parent}`.
//!   For the shared kinds `ref_root` only says who queued the op; it is not
//!   part of the key (it is kept in [`TracedOp::ref_root`]).
//! - `UPDATE_DELAYED_HEAD`: the only producer of a bare extent_op in the
//!   kernel is `btrfs_set_disk_extent_flags()`, and every caller passes
//!   `BTRFS_BLOCK_FLAG_FULL_BACKREF` (README: "in these traces: setting
//!   FULL_BACKREF"); the event does not print the flags, so the op carries
//!   `flags_to_set = BLOCK_FLAG_FULL_BACKREF`. The event has no level
//!   either: the op's kind is `Tree { level: 0 }` as a placeholder, and an
//!   applier must take the level from the extent item.
//! - a tree-block `ADD_DELAYED_EXTENT` whose ref is `SHARED_BLOCK_REF` is a
//!   block allocated for a relocation tree: `btrfs_alloc_tree_block()` then
//!   sets `parent` (to the block itself when none is given) and always adds
//!   `BTRFS_BLOCK_FLAG_FULL_BACKREF` to the extent_op; the op carries that
//!   extent_op too, so the extent is created with the flag the kernel gave
//!   it.
//!
//! # Refs printed after their node ran
//!
//! The kernel prints the ref event from the delayed-ref node it has just
//! queued, after `delayed_refs->lock` is released (`btrfs_add_delayed_*_ref`
//! in `delayed-ref.c`). A node that was inserted (not merged) is then in the
//! head's tree, and another task running delayed refs can run and free it
//! before the event is printed; the event then reads freed memory. On
//! kernel 6.18 the slab freelist pointer sits in the middle of the node,
//! on its `seq`: such an event prints a garbage seq (a hardened freelist
//! pointer, e.g. `seq=7398869659294574876`) and correct other fields. The
//! capture racy-1 (writers, snapshot deletion, balance and backref walks at
//! once; 1.8 M ops) has one: head at 1341.343673 s, the node run by another
//! worker at .343765 (`run_delayed_tree_ref ... seq=2`), the ref event at
//! .343814 with the garbage seq. A run event printed the node while it was
//! alive, and it comes after the head (it ran a node queued by it) and
//! before the ref event, so it is still held back behind the head. A ref
//! event whose seq is above [`refd_core::model::SEQ_MAX`] (no tree-mod-log
//! seq comes near it) takes the seq of the latest such run event of the
//! same extent, kind and key, counted in [`TraceStats::seq_from_run`];
//! without one it stays an invalid op. A garbage seq at or below `SEQ_MAX`
//! (1 in 256 freelist pointers) cannot be told from a real one; it affects
//! only which refs a held seq keeps back, not the final tree.
//!
//! # run_* events
//!
//! `run_delayed_tree_ref` / `run_delayed_data_ref` / `run_delayed_ref_head`
//! are not ops: they record what the kernel applied after merging. They are
//! returned as [`TraceItem::Run`] items, in the same order slot as their
//! line, so a consumer can show them next to the ops around a mismatch.
//!
//! # Errors
//!
//! Unknown events and lines that are not ftrace events are counted with
//! examples ([`TraceStats`]). In [`Strictness::Strict`] mode (the default)
//! every anomaly of a known event is a [`TraceError`] with its line number:
//! a malformed line, a ref with no pending head of its pid, a second head
//! before the ref of the first, a head whose ref never arrives, a lost-events
//! marker, another filesystem's fsid, a full holdback queue. In
//! [`Strictness::Lenient`] mode they are counted with examples instead and
//! the offending line or head is dropped: the op stream is then incomplete
//! and the replay invariant no longer holds. I/O errors (a truncated `.zst`)
//! are always errors.

//!
//! # Files
//!
//! `event.rs` (the items of the stream and the options), `header.rs` (the
//! ftrace line header), `fields.rs` (the `key=value` fields of the six
//! events), `reader.rs` ([`TraceReader`]: the head-ordered holdback queue
//! and the iterator), `line.rs` (one line: classify, check, dispatch),
//! `pairing.rs` (a head event with its ref event), `stats.rs`,
//! `error.rs`.

#[cfg(doc)]
use refd_core::model::{Action, Op, RefKey};

mod error;
mod event;
mod fields;
mod header;
mod line;
mod pairing;
mod reader;
mod stats;
#[cfg(test)]
mod tests;

pub use error::TraceError;
pub use event::{EventType, KernelAction, RunEvent, Strictness, TraceItem, TraceOptions, TracedOp};
pub use reader::TraceReader;
pub use stats::TraceStats;

/// Most slots (ops waiting for their ref, completed ops and run events
/// behind them) held back to restore head order. A ref event normally
/// follows its head within a handful of lines; this bound only stops a
/// broken trace from growing memory without limit.
pub const HOLDBACK_SLOTS_MAX: usize = 1 << 16;
