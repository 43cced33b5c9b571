//! What `refd serve` runs with: the device, the listeners and every bound
//! of the server (the protocol's limits are announced to clients in
//! HELLO).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Default device: a file created (1 GiB) and formatted on first start.
pub const DEVICE_DEFAULT: &str = "./refd.img";
/// Size of a device file created on first start.
pub const DEVICE_CREATE_BYTES_DEFAULT: u64 = 1 << 30;
/// Default listener.
pub const LISTEN_DEFAULT: &str = "unix:./refd.sock";
/// Default metrics address.
pub const METRICS_DEFAULT: &str = "127.0.0.1:7451";
/// Requests of one connection read ahead of the replies sent.
pub const IN_FLIGHT_MAX_DEFAULT: u32 = 256;
/// Bytes of replies buffered per connection before reading stops.
pub const REPLY_BYTES_MAX_DEFAULT: usize = 4 << 20;
/// Default `--connections-max`.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Default `--barrier-lease-ms`.
pub const BARRIER_LEASE_MS_DEFAULT: u32 = 30_000;

/// Default `--held-heads-max`: as many heads as the pending ops' own bound
/// (twice the default commit trigger of 4M ops) would hold at one op each.
pub const HELD_HEADS_MAX_DEFAULT: u64 = 8_000_000;
/// Most barriers one session holds.
pub const BARRIERS_PER_SESSION_MAX: usize = 64;
/// Default `--idle-timeout-s`.
pub const IDLE_TIMEOUT_S_DEFAULT: u64 = 300;
/// Time slice of the request-answering threads (µs; see
/// [`ServeConfig::latency_slice`]).
pub const LATENCY_SLICE_US_DEFAULT: u64 = 100;
/// Default `--apply-rt-priority` (see [`ServeConfig::apply_rt_priority`]).
pub const APPLY_RT_PRIORITY_DEFAULT: u8 = 1;
/// Default `--lookup-rt-ms-per-s` (see [`ServeConfig::lookup_rt_per_s`]):
/// a tenth of one core.
pub const LOOKUP_RT_MS_PER_S_DEFAULT: u32 = 100;
/// Default `--resched-tick-us` (see [`ServeConfig::resched_tick`]).
pub const RESCHED_TICK_US_DEFAULT: u64 = 1000;
/// Default `--hello-timeout-ms`.
pub const HELLO_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// A frame whose first byte arrived must be complete within this.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// A reply the client does not take within this closes the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked read wakes up to look at the clock and at shutdown.
pub const READ_POLL: Duration = Duration::from_millis(200);
/// Log batch size of the daemon: a SUBMIT of the largest frame is one log
/// record, which must fit one batch.
pub const LOG_BATCH_BYTES_MAX: usize = 2 << 20;

/// The smallest device the daemon serves with its default layout: one
/// whose log admits [`refd_durable::engine::APPENDERS_MIN`] appends of
/// [`LOG_BATCH_BYTES_MAX`] batches (checked again at open, where a device
/// formatted otherwise is refused with what it needs).
pub fn device_bytes_min() -> u64 {
    let log_bytes_min = 4 * refd_durable::engine::APPENDERS_MIN as u64 * LOG_BATCH_BYTES_MAX as u64;
    refd_durable::device_bytes_min_for_log(log_bytes_min)
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix stream socket at this path (created 0660).
    Unix(PathBuf),
    /// TCP.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// `unix:PATH`, `tcp:HOST:PORT`, or a bare path (a unix socket).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: empty socket path"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            use std::net::ToSocketAddrs;
            let mut addrs = addr.to_socket_addrs().map_err(|e| format!("{s:?}: {e}"))?;
            return addrs
                .next()
                .map(Listen::Tcp)
                .ok_or_else(|| format!("{s:?}: no address"));
        }
        if s.is_empty() {
            return Err("empty listen address".into());
        }
        Ok(Listen::Unix(PathBuf::from(s)))
    }
}

/// Which delayed-ref store holds pending ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreImpl {
    /// Per-CPU shards feeding an epoch-reclaimed skiplist index.
    Lockfree,
    /// One mutex around a map of heads (the baseline).
    Mutex,
}

/// What recovery does with a log damaged in the middle
/// (`refd_ioring::log::RecoveryMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RecoveryModeArg {
    /// Refuse to start (the default): nothing acknowledged is dropped
    /// without an operator's decision.
    #[default]
    Strict,
    /// Keep the log up to the first damaged batch; drop it and every batch
    /// after it.
    TolerateTail,
    /// Drop only the damaged batches; keep every intact batch after them.
    SkipCorrupt,
}

impl RecoveryModeArg {
    /// The engine's mode.
    pub fn mode(self) -> refd_ioring::log::RecoveryMode {
        use refd_ioring::log::RecoveryMode as M;
        match self {
            RecoveryModeArg::Strict => M::Strict,
            RecoveryModeArg::TolerateTail => M::TolerateTail,
            RecoveryModeArg::SkipCorrupt => M::SkipCorrupt,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The whole server configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The device (file or block device).
    pub device: PathBuf,
    /// Size of the file created when `device` does not exist.
    pub device_create_bytes: u64,
    /// Listeners.
    pub listen: Vec<Listen>,
    /// Prometheus endpoint (`None`: off).
    pub metrics: Option<SocketAddr>,
    /// Commit interval.
    pub commit_interval_ms: u64,
    /// The dirty-bytes commit trigger in MiB (0: off).
    pub dirty_trigger_mib: u64,
    /// The store.
    pub store: StoreImpl,
    /// ref-verify every op.
    pub verify: bool,
    /// Token required on TCP listeners (and accepted on unix ones).
    pub token: Option<Vec<u8>>,
    /// Sessions kept.
    pub sessions_max: usize,
    /// Connections served at once.
    pub connections_max: usize,
    /// Largest frame body accepted.
    pub frame_bytes_max: u32,
    /// Requests read ahead per connection.
    pub in_flight_max: u32,
    /// Reply bytes buffered per connection.
    pub reply_bytes_max: usize,
    /// Barrier lease.
    pub barrier_lease_ms: u32,
    /// Most heads seq barriers may hold back from commits: past it, the
    /// barrier with the lowest seq is revoked (see `barrier.rs`).
    pub held_heads_max: u64,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
    /// A connection without a successful HELLO this long after it was
    /// accepted is closed.
    pub hello_timeout: Duration,
    /// Freed extents kept on the device.
    pub freed_kept_max: u64,
    /// Heap touched before the engine opens (MiB).
    pub prefault_mib: usize,
    /// Time slice asked for the threads that answer requests (each
    /// connection's reader and writer; see `sched.rs`); zero keeps the
    /// kernel's default.
    pub latency_slice: Duration,
    /// `SCHED_FIFO` priority of a commit's apply while it holds the
    /// extent tree's write lock, so that lookups do not wait for it to be
    /// scheduled again (`refd_core::priority`); 0: none. Refused by the
    /// kernel (no `CAP_SYS_NICE`), it is left off with a warning.
    pub apply_rt_priority: u8,
    /// CPU time per second the connections' readers may spend at the
    /// apply's real-time priority serving short LOOKUPs (`sched.rs`,
    /// [`crate::sched::ReadBoost`]); zero, or no apply priority: none.
    pub lookup_rt_per_s: Duration,
    /// A wake-up on every CPU this often (`refd_core::priority::ReschedTick`),
    /// so that a thread woken on a busy CPU (a log write's completion, a
    /// request) waits for it, not for the kernel's next scheduler tick;
    /// zero: none. At `SCHED_FIFO` priority 1 when the kernel allows it,
    /// while requests come and for `server::RESCHED_TICK_LINGER` after.
    pub resched_tick: Duration,
    /// Decode every frame and answer, but apply nothing (a SUBMIT is
    /// validated and acknowledged, not logged): measures the load
    /// generator and the wire without the engine.
    pub dry_run: bool,
    /// Print the ready line as JSON too.
    pub log_format: LogFormat,
    /// What recovery does with a damaged log (default: refuse to start).
    pub recovery_mode: RecoveryModeArg,
    /// Extend the node region to the device's end when the device is
    /// larger than its superblock records (`OpenOptions::grow`).
    pub grow: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            device: PathBuf::from(DEVICE_DEFAULT),
            device_create_bytes: DEVICE_CREATE_BYTES_DEFAULT,
            listen: vec![LISTEN_DEFAULT.parse().expect("default listener")],
            metrics: Some(METRICS_DEFAULT.parse().expect("default metrics address")),
            commit_interval_ms: 1000,
            dirty_trigger_mib: refd_durable::DIRTY_BYTES_TRIGGER_DEFAULT >> 20,
            store: StoreImpl::Lockfree,
            verify: false,
            token: None,
            sessions_max: refd_durable::service::SESSIONS_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            frame_bytes_max: refd_proto::BODY_BYTES_MAX_DEFAULT,
            in_flight_max: IN_FLIGHT_MAX_DEFAULT,
            reply_bytes_max: REPLY_BYTES_MAX_DEFAULT,
            barrier_lease_ms: BARRIER_LEASE_MS_DEFAULT,
            held_heads_max: HELD_HEADS_MAX_DEFAULT,
            idle_timeout: Duration::from_secs(IDLE_TIMEOUT_S_DEFAULT),
            hello_timeout: Duration::from_millis(HELLO_TIMEOUT_MS_DEFAULT),
            freed_kept_max: refd_durable::service::FREED_KEPT_MAX_DEFAULT,
            prefault_mib: 0,
            latency_slice: Duration::from_micros(LATENCY_SLICE_US_DEFAULT),
            apply_rt_priority: APPLY_RT_PRIORITY_DEFAULT,
            lookup_rt_per_s: Duration::from_millis(u64::from(LOOKUP_RT_MS_PER_S_DEFAULT)),
            resched_tick: Duration::from_micros(RESCHED_TICK_US_DEFAULT),
            dry_run: false,
            log_format: LogFormat::Human,
            recovery_mode: RecoveryModeArg::Strict,
            grow: false,
        }
    }
}

impl ServeConfig {
    /// Checks what the flags cannot: a TCP listener off loopback needs a
    /// token.
    pub fn check(&self) -> Result<(), String> {
        if self.listen.is_empty() {
            return Err("no listener".into());
        }
        for l in &self.listen {
            if let Listen::Tcp(addr) = l {
                if !addr.ip().is_loopback() && self.token.is_none() {
                    return Err(format!(
                        "{l} is not a loopback address: give --token-file (clients must \
                         authenticate on a network listener)"
                    ));
                }
            }
        }
        // Clients may refuse a server announcing less than 1 MiB.
        if self.frame_bytes_max < 1 << 20 || self.frame_bytes_max > 16 << 20 {
            return Err(format!(
                "--frame-bytes-max {} out of 1048576..=16777216",
                self.frame_bytes_max
            ));
        }
        if !self.resched_tick.is_zero() && self.resched_tick < refd_core::priority::RESCHED_TICK_MIN
        {
            return Err(format!(
                "--resched-tick-us {} is below {} (0 turns the tick off)",
                self.resched_tick.as_micros(),
                refd_core::priority::RESCHED_TICK_MIN.as_micros()
            ));
        }
        if self.hello_timeout.is_zero() {
            return Err("--hello-timeout-ms must be at least 1".into());
        }
        // 0 is not "off" for these two: every connection would be closed
        // at its first pause of 200 ms, every barrier handed out expired.
        if self.idle_timeout.is_zero() {
            return Err("--idle-timeout-s must be at least 1".into());
        }
        if self.barrier_lease_ms == 0 {
            return Err("--barrier-lease-ms must be at least 1".into());
        }
        if self.connections_max == 0 || self.sessions_max == 0 {
            return Err("--connections-max and --sessions-max must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Listen>(),
            Ok(Listen::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "./a.sock".parse::<Listen>(),
            Ok(Listen::Unix("./a.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7450".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:7450".parse().unwrap()))
        );
        assert!("tcp:nonsense".parse::<Listen>().is_err());
        assert!("unix:".parse::<Listen>().is_err());
    }

    #[test]
    fn a_network_listener_needs_a_token() {
        let mut c = ServeConfig {
            listen: vec![Listen::Tcp("0.0.0.0:7450".parse().unwrap())],
            ..ServeConfig::default()
        };
        assert!(c.check().unwrap_err().contains("--token-file"));
        c.token = Some(b"secret".to_vec());
        c.check().unwrap();
        c.listen = vec![Listen::Tcp("127.0.0.1:7450".parse().unwrap())];
        c.token = None;
        c.check().unwrap();
    }
}
