//! `refd serve` as a library: its flags, the configuration they make,
//! logging, signals and systemd's readiness notification. The `refd`
//! binary runs it; so does `refd-bench` (a hidden subcommand) when it
//! starts a daemon of its own and no `refd` binary is at hand.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::{Listen, LogFormat, RecoveryModeArg, ServeConfig, StoreImpl};

/// `refd serve`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Serve {
    /// The device: a block device or a file. A path that does not exist
    /// becomes a new file device (see --device-size), formatted; an
    /// existing device without a refd file system is refused.
    #[arg(long, default_value = crate::config::DEVICE_DEFAULT)]
    pub device: PathBuf,
    /// Size of a device file created on first start (K, M, G, T).
    #[arg(long, default_value = "1G")]
    pub device_size: String,
    /// Where to listen: unix:PATH, tcp:HOST:PORT or a bare path (a unix
    /// socket); repeatable. Default unix:./refd.sock.
    #[arg(long = "listen")]
    pub listen: Vec<Listen>,
    /// Prometheus metrics endpoint (HOST:PORT), or "off".
    #[arg(long, default_value = crate::config::METRICS_DEFAULT)]
    pub metrics: String,
    /// Longest time between commits while ops are pending.
    #[arg(long, default_value_t = 1000)]
    pub commit_interval_ms: u64,
    /// Commit once the pending ops are estimated to dirty this many MiB of
    /// B+tree nodes (bounds a commit's pinned working set; default half the
    /// node cache; 0: off, commits then start on interval, ops or log fill)
    #[arg(long, default_value_t = refd_durable::DIRTY_BYTES_TRIGGER_DEFAULT >> 20)]
    pub dirty_trigger_mib: u64,
    /// The delayed-ref store.
    #[arg(long = "impl", value_enum, default_value_t = StoreImpl::Lockfree)]
    pub store: StoreImpl,
    /// ref-verify: check every op against a shadow of the extent tree
    /// before it is queued.
    #[arg(long)]
    pub verify: bool,
    /// A file holding the token clients give in HELLO (required on TCP
    /// listeners; a TCP listener off loopback refuses to start without it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Client sessions kept (the least recently used is evicted).
    #[arg(long, default_value_t = refd_durable::service::SESSIONS_MAX_DEFAULT)]
    pub sessions_max: usize,
    /// Connections served at once.
    #[arg(long, default_value_t = crate::config::CONNECTIONS_MAX_DEFAULT)]
    pub connections_max: usize,
    /// Largest request frame body accepted (bytes, 1048576 ..= 16777216),
    /// announced in HELLO; SUBMIT's op limit follows it up to what one log
    /// record holds.
    #[arg(long, default_value_t = refd_proto::BODY_BYTES_MAX_DEFAULT)]
    pub frame_bytes_max: u32,
    /// Seq barrier lease (released unless renewed within it).
    #[arg(long, default_value_t = crate::config::BARRIER_LEASE_MS_DEFAULT)]
    pub barrier_lease_ms: u32,
    /// Most heads seq barriers may hold back from commits (memory): when a
    /// commit holds more, the barrier with the lowest seq is revoked (its
    /// holder's next BARRIER_RENEW gets BARRIER_UNKNOWN), one per commit.
    #[arg(long, default_value_t = crate::config::HELD_HEADS_MAX_DEFAULT)]
    pub held_heads_max: u64,
    /// Idle connections are closed after this many seconds.
    #[arg(long, default_value_t = crate::config::IDLE_TIMEOUT_S_DEFAULT)]
    pub idle_timeout_s: u64,
    /// A connection that has not completed HELLO this many milliseconds
    /// after it was accepted is closed (so that connections that never
    /// authenticate cannot hold `--connections-max` slots).
    #[arg(long, default_value_t = crate::config::HELLO_TIMEOUT_MS_DEFAULT)]
    pub hello_timeout_ms: u64,
    /// Freed extents kept on the device for consumers.
    #[arg(long, default_value_t = refd_durable::service::FREED_KEPT_MAX_DEFAULT)]
    pub freed_kept_max: u64,
    /// Heap touched before the engine opens (MiB; 0: none), so that the
    /// first commits reuse memory the kernel already faulted in.
    #[arg(long, default_value_t = 0)]
    pub prefault_mib: usize,
    /// Time slice (µs, clamped to 100–100000; 0: the kernel's default) asked for
    /// the threads that answer requests, so that on busy cores they
    /// preempt the commit's threads when a request or a durable write
    /// wakes them (Linux 6.12+; ignored by older kernels).
    #[arg(long, default_value_t = crate::config::LATENCY_SLICE_US_DEFAULT)]
    pub latency_slice_us: u64,
    /// Real-time (SCHED_FIFO) priority, 1–99, of a commit's apply while it
    /// holds the extent tree's write lock, so that a lookup waits for the
    /// apply's current step, not for the scheduler to give the apply a
    /// core back (0: none). Needs CAP_SYS_NICE; refused, it is left off
    /// with a warning.
    #[arg(long, default_value_t = crate::config::APPLY_RT_PRIORITY_DEFAULT, value_parser = clap::value_parser!(u8).range(0..=99))]
    pub apply_rt_priority: u8,
    /// CPU time (ms per second) that the connections' readers may spend
    /// at the apply's real-time priority while they serve LOOKUPs of at
    /// most 64 bytenrs and wait for the next request, so that a LOOKUP is
    /// neither woken late nor preempted on busy cores (0: none; off too
    /// with --apply-rt-priority 0). Past it, LOOKUPs are served at the
    /// normal priority until the budget refills.
    #[arg(long, default_value_t = crate::config::LOOKUP_RT_MS_PER_S_DEFAULT)]
    pub lookup_rt_ms_per_s: u32,
    /// Wake every CPU this often (µs, at least 100; 0: never) with a
    /// thread pinned to it at SCHED_FIFO priority 1, so that a thread
    /// woken on a busy CPU (a log write's completion, a request) waits
    /// for that, not for the kernel's next scheduler tick (4 ms at HZ=250).
    /// Ticks only while requests come and for a second after the last;
    /// each wake-up costs its CPU some µs (~23 on a VM). Refused a
    /// real-time priority, the threads tick at the normal one (less
    /// effective).
    #[arg(long, default_value_t = crate::config::RESCHED_TICK_US_DEFAULT)]
    pub resched_tick_us: u64,
    /// Decode and answer every request but apply nothing (SUBMITs are
    /// validated and acknowledged at once): measures clients and the wire.
    #[arg(long)]
    pub dry_run: bool,
    /// Log lines as human text or JSON (level from RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// What recovery does when the log is damaged in the middle (an
    /// unreadable batch followed by intact ones: acknowledged ops lost on
    /// the device): strict refuses to start; tolerate-tail and skip-corrupt
    /// go on, dropping what they say, logged and recorded in the
    /// superblock. Check with `refctl fsck` first.
    #[arg(long, value_enum, default_value_t = RecoveryModeArg::Strict)]
    pub recovery_mode: RecoveryModeArg,
    /// Use a device extended since it was formatted (a file made larger, a
    /// volume grown): the node region is extended to the device's end,
    /// recorded by the superblock written at start. The way out of a full
    /// node region (`b+tree: node region ... is full`).
    #[arg(long)]
    pub grow: bool,
}

fn config(a: Serve) -> Result<ServeConfig, String> {
    let token = match &a.token_file {
        Some(p) => {
            let mut t = std::fs::read(p).map_err(|e| format!("token file {}: {e}", p.display()))?;
            while t.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                t.pop();
            }
            if t.is_empty() || t.len() > refd_proto::HELLO_TOKEN_BYTES_MAX {
                return Err(format!(
                    "token file {}: the token must be 1..={} bytes",
                    p.display(),
                    refd_proto::HELLO_TOKEN_BYTES_MAX
                ));
            }
            Some(t)
        }
        None => None,
    };
    let metrics = match a.metrics.as_str() {
        "off" | "none" | "" => None,
        m => Some(
            m.parse::<SocketAddr>()
                .map_err(|e| format!("--metrics {m:?}: {e}"))?,
        ),
    };
    let defaults = ServeConfig::default();
    Ok(ServeConfig {
        device: a.device,
        device_create_bytes: parse_size(&a.device_size)?,
        listen: if a.listen.is_empty() {
            defaults.listen.clone()
        } else {
            a.listen
        },
        metrics,
        commit_interval_ms: a.commit_interval_ms,
        dirty_trigger_mib: a.dirty_trigger_mib,
        store: a.store,
        verify: a.verify,
        token,
        sessions_max: a.sessions_max,
        connections_max: a.connections_max,
        frame_bytes_max: a.frame_bytes_max,
        barrier_lease_ms: a.barrier_lease_ms,
        held_heads_max: a.held_heads_max,
        idle_timeout: Duration::from_secs(a.idle_timeout_s),
        hello_timeout: Duration::from_millis(a.hello_timeout_ms),
        freed_kept_max: a.freed_kept_max,
        prefault_mib: a.prefault_mib,
        latency_slice: Duration::from_micros(a.latency_slice_us),
        apply_rt_priority: a.apply_rt_priority,
        lookup_rt_per_s: Duration::from_millis(u64::from(a.lookup_rt_ms_per_s)),
        resched_tick: Duration::from_micros(a.resched_tick_us),
        dry_run: a.dry_run,
        log_format: a.log_format,
        recovery_mode: a.recovery_mode,
        grow: a.grow,
        ..defaults
    })
}

/// `64M`, `1G`, `4096` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s:?}: unknown unit {c:?}")),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("size {s:?}: not a size"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false)
        .with_writer(|| LossyStderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Standard error that drops what it cannot write: a daemon whose stderr
/// was closed (a pipe whose reader went away) keeps serving, and its
/// threads never panic on a log line.
#[derive(Debug, Clone, Copy)]
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// systemd's readiness notification (`Type=notify`), if it asked for one.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = PathBuf::from(path);
    if path.to_string_lossy().starts_with('@') {
        return; // Abstract sockets: not used by the unit shipped here.
    }
    if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = s.send_to(b"READY=1\n", &path);
    }
}

/// Runs `refd serve` with `a` until SIGTERM, SIGINT or SIGHUP (see the module docs).
pub fn serve(a: Serve) -> Result<(), String> {
    init_logging(a.log_format);
    refd_alloc::tune();
    let config = config(a)?;
    let server = crate::start(config).map_err(|e| e.to_string())?;
    // The handlers are installed before the ready line: a SIGTERM sent
    // as soon as it is read must stop the daemon gracefully, not kill it
    // (seen: a test's SIGTERM right after the ready line, under load,
    // ended the process by the default action).
    // SIGHUP too: a daemon started from a terminal that goes away (an ssh
    // session closed) was ended by its default action, as by kill -9.
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(|e| format!("signals: {e}"))?;
    // Not `println!`: a closed stdout must not stop the daemon.
    let _ = writeln!(std::io::stdout(), "{}", server.ready_line());
    let _ = std::io::stdout().flush();
    notify_ready();
    let stop = server.stop_handle();
    std::thread::spawn(move || {
        let mut seen = 0;
        for sig in signals.forever() {
            seen += 1;
            if seen == 1 {
                // First stop, then say so: nothing may keep the stop from
                // happening.
                stop();
                tracing::info!(signal = sig, "stopping gracefully (again to exit at once)");
            } else {
                tracing::warn!(
                    signal = sig,
                    "exiting at once; the log replays at the next start"
                );
                std::process::exit(1);
            }
        }
    });
    server.wait().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Args;

    /// Each flag of `refd serve` (long name) with its default, if any.
    fn flags() -> Vec<(String, Option<String>)> {
        let cmd = Serve::augment_args(clap::Command::new("serve"));
        cmd.get_arguments()
            .filter_map(|a| {
                let long = a.get_long()?;
                let default = a
                    .get_default_values()
                    .first()
                    .map(|v| v.to_string_lossy().into_owned());
                Some((format!("--{long}"), default))
            })
            .collect()
    }

    fn read(relative: &str) -> String {
        let path = format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The `--flag` words of `text`.
    fn flag_words(text: &str) -> std::collections::BTreeSet<String> {
        text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w[2..].starts_with(|c: char| c.is_ascii_lowercase()))
            .map(str::to_string)
            .collect()
    }

    /// The synopsis of `tools/refd/README.md` ("Starting") names every
    /// flag `refd serve` has, and no other.
    #[test]
    fn readme_synopsis_is_the_flags() {
        let readme = read("README.md");
        let synopsis: String = readme
            .lines()
            .skip_while(|l| !l.starts_with("    refd serve"))
            .take_while(|l| !l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let documented = flag_words(&synopsis);
        let flags: std::collections::BTreeSet<String> =
            flags().into_iter().map(|(f, _)| f).collect();
        assert_eq!(documented, flags, "README synopsis against `refd serve`");
    }

    /// A default of `docs/protocol.md`'s "Limits and timeouts" table as
    /// the flag's number: `1 MiB`, `8,000,000`, `30 s` (in ms for a
    /// `-ms` flag).
    fn table_default(flag: &str, text: &str) -> u64 {
        let text = text.split('(').next().unwrap().replace(',', "");
        let mut words = text.split_whitespace();
        let n: u64 = words.next().unwrap().parse().unwrap();
        match words.next() {
            None => n,
            Some("MiB") => n << 20,
            Some("s") if flag.ends_with("-ms") => n * 1000,
            Some("s") if flag.ends_with("-s") => n,
            Some(unit) => panic!("{flag}: unit {unit:?}"),
        }
    }

    /// Every row of `docs/protocol.md`'s "Limits and timeouts" that names a
    /// flag gives that flag's default; every flag it names exists.
    #[test]
    fn protocol_limits_are_the_flag_defaults() {
        let doc = read("../../docs/protocol.md");
        let flags = flags();
        let mut rows = 0;
        for line in doc
            .lines()
            .skip_while(|l| !l.starts_with("## Limits and timeouts"))
            .filter(|l| l.starts_with('|'))
        {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (default, flag_cell) = (cells[2], cells[3]);
            let Some(flag) = flag_words(flag_cell).into_iter().next() else {
                continue;
            };
            let (_, clap_default) = flags
                .iter()
                .find(|(f, _)| *f == flag)
                .unwrap_or_else(|| panic!("{flag} of the limits table is no flag"));
            let clap_default: u64 = clap_default.as_deref().unwrap().parse().unwrap();
            assert_eq!(table_default(&flag, default), clap_default, "{line}");
            rows += 1;
        }
        assert!(rows >= 8, "{rows} rows with a flag");
    }
}
