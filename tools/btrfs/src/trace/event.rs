//! The items of the op stream ([`TraceItem`]: an op with where it came
//! from, or a kernel `run_*` record), the event and action names, and the
//! reading options.

use refd_core::model::Op;

/// What to do with anomalies of known events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strictness {
    /// Every anomaly is an error (the default).
    #[default]
    Strict,
    /// Anomalies are counted with examples and skipped.
    Lenient,
}

/// How to read a trace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceOptions {
    /// Strict or lenient handling of anomalies.
    pub strictness: Strictness,
}

/// The six btrfs delayed-ref trace events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    /// `add_delayed_ref_head`.
    AddHead,
    /// `add_delayed_tree_ref`.
    AddTreeRef,
    /// `add_delayed_data_ref`.
    AddDataRef,
    /// `run_delayed_ref_head`.
    RunHead,
    /// `run_delayed_tree_ref`.
    RunTreeRef,
    /// `run_delayed_data_ref`.
    RunDataRef,
}

impl EventType {
    /// All events, in [`EventType::index`] order.
    pub const ALL: [EventType; 6] = [
        EventType::AddHead,
        EventType::AddTreeRef,
        EventType::AddDataRef,
        EventType::RunHead,
        EventType::RunTreeRef,
        EventType::RunDataRef,
    ];

    /// The kernel's event name.
    pub fn name(self) -> &'static str {
        match self {
            EventType::AddHead => "add_delayed_ref_head",
            EventType::AddTreeRef => "add_delayed_tree_ref",
            EventType::AddDataRef => "add_delayed_data_ref",
            EventType::RunHead => "run_delayed_ref_head",
            EventType::RunTreeRef => "run_delayed_tree_ref",
            EventType::RunDataRef => "run_delayed_data_ref",
        }
    }

    /// Position in [`EventType::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub(super) fn from_name(name: &[u8]) -> Option<EventType> {
        EventType::ALL
            .into_iter()
            .find(|e| e.name().as_bytes() == name)
    }
}

/// The `action=` of an event, as the kernel names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelAction {
    /// `ADD_DELAYED_REF` (`BTRFS_ADD_DELAYED_REF`).
    AddRef,
    /// `DROP_DELAYED_REF`.
    DropRef,
    /// `ADD_DELAYED_EXTENT`.
    AddExtent,
    /// `UPDATE_DELAYED_HEAD`.
    UpdateHead,
}

impl KernelAction {
    /// All actions, in [`KernelAction::index`] order.
    pub const ALL: [KernelAction; 4] = [
        KernelAction::AddRef,
        KernelAction::DropRef,
        KernelAction::AddExtent,
        KernelAction::UpdateHead,
    ];

    /// The kernel's name.
    pub fn name(self) -> &'static str {
        match self {
            KernelAction::AddRef => "ADD_DELAYED_REF",
            KernelAction::DropRef => "DROP_DELAYED_REF",
            KernelAction::AddExtent => "ADD_DELAYED_EXTENT",
            KernelAction::UpdateHead => "UPDATE_DELAYED_HEAD",
        }
    }

    /// Position in [`KernelAction::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub(super) fn parse(s: &[u8]) -> Option<KernelAction> {
        KernelAction::ALL
            .into_iter()
            .find(|a| a.name().as_bytes() == s)
    }
}

/// One op of the stream with where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracedOp {
    /// The op.
    pub op: Op,
    /// Task that queued it.
    pub pid: u32,
    /// Line of the `add_delayed_ref_head` event.
    pub head_line: u64,
    /// Line of the ref event (`None` for `UpdateHead`).
    pub ref_line: Option<u64>,
    /// Timestamp of the head event, nanoseconds of `trace_clock=global`.
    pub ts_ns: u64,
    /// `ref_root` of the ref event: the owner for `TREE_BLOCK_REF` and
    /// `EXTENT_DATA_REF`, the tree that queued the op for shared kinds; 0
    /// for `UpdateHead`.
    pub ref_root: u64,
}

/// A `run_delayed_*` event: what the kernel applied after merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEvent {
    /// `run_delayed_tree_ref` / `run_delayed_data_ref`: one merged node was
    /// applied; `op.action` is its sign (`AddRef` or `DropRef`; the merged
    /// count is not printed).
    Ref {
        /// Line number.
        line: u64,
        /// Task that ran it.
        pid: u32,
        /// Timestamp (ns).
        ts_ns: u64,
        /// The node as an op (key, kind, size, seq).
        op: Op,
        /// `ref_root` as printed.
        ref_root: u64,
    },
    /// `run_delayed_ref_head`: the head is fully processed.
    Head {
        /// Line number.
        line: u64,
        /// Task that ran it.
        pid: u32,
        /// Timestamp (ns).
        ts_ns: u64,
        /// Extent.
        bytenr: u64,
        /// Extent size.
        num_bytes: u64,
        /// Data or tree block.
        is_data: bool,
    },
}

/// One item of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceItem {
    /// An op, in the kernel's queue order.
    Op(TracedOp),
    /// A run event, placed after the ops whose heads precede it.
    Run(RunEvent),
}
