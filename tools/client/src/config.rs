//! [`ClientConfig`]: the client's own limits and timeouts. The server's
//! limits come from its HELLO reply ([`Client::hello`](crate::Client::hello)).

use std::time::Duration;

/// How the client connects, waits and retries. Start from
/// [`ClientConfig::default`] and set fields:
///
/// ```
/// let mut config = refd_client::ClientConfig::default();
/// config.name = "snapshotter".into();
/// config.request_timeout = std::time::Duration::from_secs(5);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Client name sent in HELLO, for the daemon's log (at most 64 bytes).
    pub name: String,
    /// Auth token sent in HELLO (at most 256 bytes; empty: none).
    pub token: Vec<u8>,
    /// One attempt to connect and HELLO.
    pub connect_timeout: Duration,
    /// How long a call waits for its reply, reconnects and resends
    /// included; then it returns [`Error::Timeout`](crate::Error::Timeout).
    pub request_timeout: Duration,
    /// How long a broken connection is retried (with backoff) before a
    /// call returns [`Error::Connect`](crate::Error::Connect).
    pub reconnect_timeout: Duration,
    /// First pause between reconnect attempts (doubles each time).
    pub backoff_min: Duration,
    /// Longest pause between reconnect attempts.
    pub backoff_max: Duration,
    /// Most times one request is resent after broken connections.
    pub resends_max: u32,
    /// Coalesced SUBMITs ([`Client::add`](crate::Client::add)) in flight
    /// at once; further ops wait and go out together.
    pub batches_in_flight_max: usize,
    /// Ops waiting to be coalesced; [`Client::add`](crate::Client::add)
    /// blocks beyond it.
    pub add_queue_ops_max: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            name: "refd-client".into(),
            token: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            resends_max: 64,
            batches_in_flight_max: 4,
            add_queue_ops_max: 1 << 16,
        }
    }
}
