//! The command line of the client subcommands (clap derive), flattened
//! into refctl's own subcommands by `src/bin/refctl.rs`.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Subcommand};
use refd_client::ExtentOpKey;

use crate::opfile::{self, OpAction, OpFields, OpKind, OpSpec, GRAMMAR};

/// Default daemon address (`refd serve`'s default listener).
pub const CONNECT_DEFAULT: &str = "./refd.sock";
/// Default request timeout of refctl.
pub const TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Default poll interval of `refctl freed --follow`.
pub const FOLLOW_INTERVAL_MS_DEFAULT: u64 = 1000;
/// Longest poll interval of `refctl freed --follow`.
pub const FOLLOW_INTERVAL_MS_MAX: u64 = 60_000;
/// Shortest poll interval of `refctl freed --follow`.
pub const FOLLOW_INTERVAL_MS_MIN: u64 = 10;

const EXIT_CODES: &str = "\
Exit status: 0 done; 1 only from `stats`, when the daemon's engine latched
a failure; 2 on any error (bad flags or input, cannot connect, an error
from the daemon), printed on stderr with the daemon's error code.";

/// The client subcommands of refctl: each connects to a running `refd`.
#[derive(Debug, Subcommand)]
pub enum ClientCmd {
    /// ADD_REF: add one reference (one SUBMIT, durable when it returns).
    #[command(after_help = EXIT_CODES)]
    Add(OpCmd),
    /// DROP_REF: drop one reference.
    #[command(after_help = EXIT_CODES)]
    Drop(OpCmd),
    /// ADD_EXTENT: allocate an extent with its first reference (btrfs
    /// must_insert_reserved); a tree block may carry --full-backref and
    /// --key.
    #[command(after_help = EXIT_CODES)]
    Alloc(OpCmd),
    /// UPDATE_HEAD: only an extent_op (--full-backref and/or --key) on the
    /// extent's head; the kind is --data, or --tree with --level.
    #[command(after_help = EXIT_CODES)]
    Update(OpCmd),
    /// Submit the ops of FILE (`-`: stdin), batched into atomic SUBMITs;
    /// prints each batch's LSN and a total. On an error names the line and
    /// exits 2 (batches before it stay applied; that batch and the rest
    /// are not).
    #[command(after_help = EXIT_CODES, after_long_help = format!("{GRAMMAR}\n{EXIT_CODES}"))]
    Submit(SubmitArgs),
    /// LOOKUP: the reference count of each BYTENR (committed + pending),
    /// its flags, size and kind.
    #[command(after_help = EXIT_CODES)]
    Get(GetArgs),
    /// BACKREFS: every backref of BYTENR with its count, in btrfs key
    /// order (all pages).
    #[command(after_help = EXIT_CODES)]
    Backrefs(BackrefsArgs),
    /// COMMIT: checkpoint now; prints the generation and what it ran.
    #[command(after_help = EXIT_CODES)]
    Commit(ConnectOnly),
    /// STATS: a summary of the daemon's state (--json: the raw object).
    /// Exit status 1 when the engine latched a failure.
    #[command(after_help = EXIT_CODES)]
    Stats(ConnectOnly),
    /// FREED: the extents freed by commits, from a cursor, one per line.
    #[command(after_help = EXIT_CODES)]
    Freed(FreedArgs),
    /// Seq barriers (btrfs tree-mod-log seqs) held as leases.
    #[command(subcommand)]
    Barrier(BarrierCmd),
}

/// How to reach the daemon, and the output form.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Daemon address: unix:PATH, tcp:HOST:PORT, or a path (a unix socket).
    #[arg(long = "connect", value_name = "ADDR", default_value = CONNECT_DEFAULT)]
    pub addr: String,
    /// File holding the auth token (trailing newlines removed).
    #[arg(long, value_name = "F")]
    pub token_file: Option<PathBuf>,
    /// Machine-readable output: one JSON object per result, JSON lines for
    /// streams.
    #[arg(long)]
    pub json: bool,
    /// Give up on a request (reconnects included) after this many ms;
    /// connecting waits at most 5 s of it.
    #[arg(long, value_name = "MS", default_value_t = TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
}

/// Subcommands with no arguments of their own.
#[derive(Debug, Args)]
pub struct ConnectOnly {
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// One op from flags.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("kind").required(true)
    .args(["data", "tree", "shared_data", "shared_block"])))]
pub struct OpCmd {
    /// Extent address (decimal or 0x-hex).
    #[arg(long, value_parser = number)]
    pub bytenr: u64,
    /// Extent size in bytes.
    #[arg(long, value_parser = number)]
    pub num_bytes: u64,
    /// A data extent by (root, inode, file offset): EXTENT_DATA_REF.
    #[arg(long)]
    pub data: bool,
    /// A tree block by root: TREE_BLOCK_REF (with --level).
    #[arg(long)]
    pub tree: bool,
    /// A data extent by parent tree block: SHARED_DATA_REF.
    #[arg(long)]
    pub shared_data: bool,
    /// A tree block by parent: SHARED_BLOCK_REF (with --level).
    #[arg(long)]
    pub shared_block: bool,
    /// Root (data, tree).
    #[arg(long, value_parser = number)]
    pub root: Option<u64>,
    /// Inode number (data).
    #[arg(long, value_parser = number)]
    pub objectid: Option<u64>,
    /// File offset (data).
    #[arg(long, value_parser = number)]
    pub offset: Option<u64>,
    /// Parent tree block (shared-data, shared-block).
    #[arg(long, value_parser = number)]
    pub parent: Option<u64>,
    /// Tree block level (tree, shared-block).
    #[arg(long)]
    pub level: Option<u8>,
    /// Tree-mod-log seq (default 0: none).
    #[arg(long, value_parser = number)]
    pub seq: Option<u64>,
    /// The extent_op sets FULL_BACKREF (alloc of a tree block, update).
    #[arg(long)]
    pub full_backref: bool,
    /// The extent_op sets a new first key OBJECTID,TYPE,OFFSET (alloc of
    /// a tree block, update --tree).
    #[arg(long, value_name = "OBJECTID,TYPE,OFFSET", value_parser = key)]
    pub key: Option<ExtentOpKey>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

impl OpCmd {
    /// The op these flags describe, for `action`.
    pub fn spec(&self, action: OpAction) -> OpSpec {
        let kind = if self.data {
            OpKind::Data
        } else if self.tree {
            OpKind::Tree
        } else if self.shared_data {
            OpKind::SharedData
        } else {
            OpKind::SharedBlock
        };
        OpSpec {
            action,
            kind,
            fields: OpFields {
                bytenr: Some(self.bytenr),
                num_bytes: Some(self.num_bytes),
                seq: self.seq,
                root: self.root,
                objectid: self.objectid,
                offset: self.offset,
                parent: self.parent,
                level: self.level,
                full_backref: self.full_backref.then_some(true),
                key: self.key,
            },
        }
    }
}

/// `refctl submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The op file (`-`: stdin): text ops or JSON lines, see below.
    pub file: String,
    /// Ops per SUBMIT (default and maximum: the daemon's submit_ops_max).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Option<u32>,
    /// Only parse the file and count its ops; do not connect.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// `refctl get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Extent addresses (decimal or 0x-hex).
    #[arg(required = true, value_parser = number)]
    pub bytenrs: Vec<u64>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// `refctl backrefs`.
#[derive(Debug, Args)]
pub struct BackrefsArgs {
    /// Extent address (decimal or 0x-hex).
    #[arg(value_parser = number)]
    pub bytenr: u64,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// `refctl freed`.
#[derive(Debug, Args)]
pub struct FreedArgs {
    /// Start after commit GEN: list what commits GEN+1 and later freed
    /// (default: after the consumer's acknowledged generation, or from
    /// the oldest list kept).
    #[arg(long, value_name = "GEN")]
    pub since: Option<u64>,
    /// Subscribe as consumer NAME (created if new: the daemon then keeps
    /// freed lists until NAME acknowledges them) and start after its
    /// acknowledged generation.
    #[arg(long, value_name = "NAME")]
    pub consumer: Option<String>,
    /// Remove consumer NAME or ID (read from `refctl stats`; a name
    /// wins over an id) instead of listing: the daemon no longer keeps
    /// freed lists for it, and the name may subscribe again later as a
    /// new consumer.
    #[arg(long, value_name = "NAME|ID",
          conflicts_with_all = ["since", "consumer", "ack", "follow"])]
    pub unsubscribe: Option<String>,
    /// Acknowledge, as --consumer, every commit whose extents were printed
    /// (written to stdout: a reader that may stop early should not rely
    /// on it).
    #[arg(long, requires = "consumer")]
    pub ack: bool,
    /// Keep polling for new commits until interrupted, printing each
    /// extent as it comes.
    #[arg(long)]
    pub follow: bool,
    /// Pause between two polls of --follow.
    #[arg(long, value_name = "MS", default_value_t = FOLLOW_INTERVAL_MS_DEFAULT,
          value_parser = clap::value_parser!(u64)
              .range(FOLLOW_INTERVAL_MS_MIN..=FOLLOW_INTERVAL_MS_MAX))]
    pub interval_ms: u64,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// `refctl barrier`.
#[derive(Debug, Subcommand)]
pub enum BarrierCmd {
    /// Register a session and acquire a barrier in it; prints the barrier
    /// id, its seq and the lease. The barrier is released when the lease
    /// passes without `barrier renew ID`, or when the session is evicted
    /// (the daemon keeps its --sessions-max most recent sessions).
    #[command(after_help = EXIT_CODES)]
    Acquire(ConnectOnly),
    /// Renew the lease of barrier ID.
    #[command(after_help = EXIT_CODES)]
    Renew(BarrierIdArgs),
    /// Release barrier ID.
    #[command(after_help = EXIT_CODES)]
    Release(BarrierIdArgs),
}

/// A barrier id.
#[derive(Debug, Args)]
pub struct BarrierIdArgs {
    /// The barrier id `barrier acquire` printed.
    #[arg(value_parser = number)]
    pub id: u64,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// Decimal or 0x-hex, for clap.
fn number(text: &str) -> Result<u64, String> {
    opfile::parse_u64(text).ok_or_else(|| format!("{text:?} is not a number (decimal or 0x-hex)"))
}

/// `OBJECTID,TYPE,OFFSET`, for clap.
fn key(text: &str) -> Result<ExtentOpKey, String> {
    opfile::parse_key(text).map_err(|e| e.with_flags())
}
