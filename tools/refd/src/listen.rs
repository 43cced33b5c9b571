//! Listeners: a unix stream socket (created 0660, never through a
//! symlink, never over another daemon's live socket or another file) or
//! TCP, and the byte stream of one accepted connection.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::Listen;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// A unix socket and the inode it was bound to (removed at exit only
    /// if it is still that one).
    Unix(UnixListener, PathBuf, (u64, u64)),
    /// TCP.
    Tcp(TcpListener),
}

/// An accepted connection's stream.
#[derive(Debug)]
pub enum Stream {
    /// Unix.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Listener {
    /// Binds `at` (see the module docs).
    pub fn bind(at: &Listen) -> Result<Listener, String> {
        match at {
            Listen::Tcp(addr) => TcpListener::bind(addr)
                .map(Listener::Tcp)
                .map_err(|e| format!("{at}: bind: {e}")),
            Listen::Unix(path) => bind_unix(path).map_err(|e| format!("{at}: {e}")),
        }
    }

    /// What it listens on (with the port the kernel chose for TCP port 0).
    pub fn address(&self) -> String {
        match self {
            Listener::Unix(_, p, _) => format!("unix:{}", p.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
        }
    }

    /// True for TCP (where a token is required if one is configured).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Listener::Tcp(_))
    }

    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, ..) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Waits up to `timeout` for a connection; `Ok(None)` when none came.
    pub fn accept_timeout(&self, timeout: Duration) -> io::Result<Option<(Stream, String)>> {
        if !poll_readable(self.fd(), timeout)? {
            return Ok(None);
        }
        match self {
            Listener::Unix(l, p, _) => match l.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false)?;
                    Ok(Some((Stream::Unix(s), format!("unix:{}", p.display()))))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            },
            Listener::Tcp(l) => match l.accept() {
                Ok((s, peer)) => {
                    s.set_nonblocking(false)?;
                    let _ = s.set_nodelay(true);
                    Ok(Some((Stream::Tcp(s), format!("tcp:{peer}"))))
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Removes the unix socket file if it is still the one bound.
    pub fn remove(&self) {
        if let Listener::Unix(_, path, (dev, ino)) = self {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                if m.file_type().is_socket() && (m.dev(), m.ino()) == (*dev, *ino) {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

fn bind_unix(path: &Path) -> Result<Listener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err("is a symlink; refd does not follow symlinks for its socket".into())
        }
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err("a server is listening on it already".into());
            }
            // A stale socket of a daemon that is gone.
            std::fs::remove_file(path).map_err(|e| format!("remove stale socket: {e}"))?;
        }
        Ok(_) => return Err("exists and is not a socket; refd does not overwrite it".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("stat: {e}")),
    }
    // Created 0660 from the start: no moment where others may connect.
    // SAFETY: umask only sets the process's file mode mask; the listeners
    // are bound while the daemon starts, before it creates other files.
    let old = unsafe { libc::umask(0o117) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let l = bound.map_err(|e| format!("bind: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("set non-blocking: {e}"))?;
    let m = std::fs::symlink_metadata(path).map_err(|e| format!("stat after bind: {e}"))?;
    Ok(Listener::Unix(l, path.to_path_buf(), (m.dev(), m.ino())))
}

/// Waits up to `timeout` for `fd` to be readable.
fn poll_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    match r {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

impl Stream {
    /// A second handle (the writer thread's).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Read timeout.
    pub fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(d),
            Stream::Tcp(s) => s.set_read_timeout(d),
        }
    }

    /// Write timeout.
    pub fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(d),
            Stream::Tcp(s) => s.set_write_timeout(d),
        }
    }

    /// Shuts the writing direction down (the peer reads the end).
    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Shuts both directions down (wakes the other thread).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
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
