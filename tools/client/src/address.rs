//! Where the daemon listens (`unix:PATH`, `tcp:HOST:PORT`, or a bare path
//! meaning a unix socket) and the connected byte stream. Public so that
//! other speakers of the protocol (`refd-bench load`'s raw connections)
//! parse and connect exactly as the client does.
//!
//! Connecting is bounded in time: TCP uses `connect_timeout` for every
//! address the host name resolves to; a unix socket is retried with a
//! short backoff while the path does not exist yet or the listener's
//! backlog is full (a daemon that is starting), until the timeout.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::error::Error;

/// First pause between two attempts to connect a unix socket.
const UNIX_RETRY_PAUSE_MIN: Duration = Duration::from_millis(5);
/// Longest pause between two attempts to connect a unix socket.
const UNIX_RETRY_PAUSE_MAX: Duration = Duration::from_millis(100);

/// A daemon address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A unix stream socket.
    Unix(PathBuf),
    /// TCP: a host name or IP address (without brackets) and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Address {
    /// Parses `unix:PATH`, `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6) or
    /// a bare path (a unix socket).
    pub fn parse(text: &str) -> Result<Address, Error> {
        let bad = |reason| Error::Address {
            addr: text.to_owned(),
            reason,
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty unix socket path"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("tcp:") {
            let (host, port) = rest.rsplit_once(':').ok_or(bad("expected tcp:HOST:PORT"))?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            let port = port
                .parse()
                .map_err(|_| bad("port is not a number 0..=65535"))?;
            return Ok(Address::Tcp {
                host: host.to_owned(),
                port,
            });
        }
        if text.is_empty() {
            return Err(bad("empty address"));
        }
        Ok(Address::Unix(PathBuf::from(text)))
    }

    /// Connects within `timeout`: TCP tries every address the host
    /// resolves to with `connect_timeout` and sets `TCP_NODELAY` (requests
    /// are small frames, sent whole); a unix socket is retried with a
    /// short backoff while it does not exist yet or nobody accepts (a
    /// daemon that is starting). No HELLO: that is the caller's.
    pub fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        let deadline = Instant::now() + timeout;
        match self {
            Address::Tcp { host, port } => connect_tcp(host, *port, deadline),
            Address::Unix(path) => connect_unix(path, deadline),
        }
    }
}

impl FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

/// A connected socket of either kind ([`Address::connect`]): a byte
/// stream ([`Read`], [`Write`]) whose halves can be used from two threads
/// through [`Stream::try_clone`].
#[derive(Debug)]
pub enum Stream {
    /// A unix stream socket.
    Unix(UnixStream),
    /// A TCP connection (`TCP_NODELAY` set).
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle on the same socket (e.g. a reader thread's).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts both directions down: a thread blocked reading or writing
    /// the socket returns at once.
    pub fn shutdown(&self) {
        // An error means it is already shut down or closed: nothing to do.
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Read and write timeouts (`None`: block; a zero one is taken as
    /// 1 ms, since std refuses zero).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        // A zero timeout is refused by std: round it up.
        let fix = |d: Option<Duration>| d.map(|d| d.max(Duration::from_millis(1)));
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(fix(read))?;
                s.set_write_timeout(fix(write))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(fix(read))?;
                s.set_write_timeout(fix(write))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

fn connect_unix(path: &Path, deadline: Instant) -> io::Result<Stream> {
    let mut pause = UNIX_RETRY_PAUSE_MIN;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(Stream::Unix(s)),
            // A signal of the caller's: try again at once (a new socket
            // each time).
            Err(e) if e.kind() == io::ErrorKind::Interrupted && Instant::now() < deadline => {}
            Err(e) if unix_retryable(&e) && Instant::now() + pause < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(UNIX_RETRY_PAUSE_MAX);
            }
            Err(e) => return Err(e),
        }
    }
}

fn connect_tcp(host: &str, port: u16, deadline: Instant) -> io::Result<Stream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host resolves to no address");
    for addr in (host, port).to_socket_addrs()? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(Stream::Tcp(s));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A unix socket that may appear or accept soon: no file yet, nobody
/// listening yet, or the backlog is full.
fn unix_retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(
            Address::parse("unix:/run/refd.sock").unwrap(),
            Address::Unix("/run/refd.sock".into())
        );
        assert_eq!(
            Address::parse("./refd.sock").unwrap(),
            Address::Unix("./refd.sock".into())
        );
        assert_eq!(
            Address::parse("tcp:127.0.0.1:7000").unwrap(),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 7000
            }
        );
        let v6 = Address::parse("tcp:[::1]:9").unwrap();
        assert_eq!(
            v6,
            Address::Tcp {
                host: "::1".into(),
                port: 9
            }
        );
        assert_eq!(v6.to_string(), "tcp:[::1]:9");
        assert_eq!("unix:x".parse::<Address>().unwrap().to_string(), "unix:x");
        for bad in ["", "unix:", "tcp:host", "tcp::80", "tcp:h:99999", "tcp:h:x"] {
            assert!(
                matches!(Address::parse(bad), Err(Error::Address { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn missing_unix_socket_times_out() {
        let path = std::env::temp_dir().join(format!("refd-client-none-{}", std::process::id()));
        let started = Instant::now();
        let e = Address::Unix(path)
            .connect(Duration::from_millis(60))
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
