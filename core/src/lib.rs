//! refd-core: the delayed-ref engine.
//!
//! See `docs/design.md` for the data flow and the invariants. Module map,
//! in the order an op travels:
//! - [`model`]: extents, backref keys, actions, ops and their validation;
//! - [`head`]: delayed-ref heads and their (commutative) merging;
//! - [`delayed`]: the stores holding pending heads: lock-free and mutex;
//! - [`barrier`]: seq barriers (tree-mod-log readers);
//! - [`run`]: running heads into the extent tree, head selection;
//! - `overlap`: refusing allocations that overlap a live extent;
//! - [`extent_tree`]: the in-memory extent tree (what btrfs stores);
//! - [`engine`]: ingest, lookups, commits, quarantine, ref-verify glue;
//! - [`priority`]: a real-time priority ceiling for a commit's apply;
//! - [`verify`]: the ref-verify shadow;
//! - [`oracle`]: a simple sequential model used as the test oracle.
pub mod barrier;
pub mod delayed;
pub mod engine;
pub mod extent_tree;
pub mod head;
pub mod model;
pub mod oracle;
mod overlap;
pub mod priority;
pub mod run;
pub mod verify;
