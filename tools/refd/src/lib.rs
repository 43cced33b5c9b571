//! refd, the daemon: serves a refd device (a raw block device, or a file)
//! over the binary protocol of `docs/protocol.md` to storage systems that
//! count and back-reference their extents.
//!
//! A request's path, by file: `listen.rs` (accept on a unix socket or
//! TCP), `conn.rs` (a reader thread decodes frames, a writer thread sends
//! replies in order once they may go; a bounded queue between them is
//! the back-pressure), `handler.rs` (HELLO, then each opcode onto the
//! durable engine; `ops.rs` validates a SUBMIT's wire ops), then the
//! durable engine (`refd-durable`): a SUBMIT batch is one log record,
//! acknowledged once durable, exactly once per session and request
//! number. Around them: `server.rs` (start, committer, barrier reaper,
//! graceful stop), `barrier.rs` (seq barriers as leases), `metrics.rs`
//! (Prometheus), `stats.rs` (STATS), `device.rs` (open, create, lock),
//! `config.rs` (every bound).

pub mod barrier;
pub mod cli;
pub mod config;
pub mod conn;
pub mod device;
pub mod handler;
pub mod listen;
pub mod metrics;
pub mod ops;
pub mod sched;
pub mod server;
pub mod stats;

pub use config::{Listen, LogFormat, RecoveryModeArg, ServeConfig, StoreImpl};
pub use server::{start, Running, ServeError};
