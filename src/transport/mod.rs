//! Transports: what a listening socket speaks, and the sans-IO layers between a socket's
//! bytes and a session's frames.
//!
//! The io backends hand the shard raw bytes and say which listener accepted each
//! connection (`io::ListenerIndex`); the shard maps that listener to a `ListenerKind` and,
//! for a TLS listener, puts a `tls::TlsLayer` between the socket and the session. The
//! frames inside are the same on every transport (docs/protocol.md).
//!
//! This module does not touch sockets, files (except `tls::*_config` and `cert`, which read
//! and write PEM files at start-up) or the clock.

pub mod cert;
pub mod tls;

/// What a listener's connections speak. A new kind (an HTTP port carrying WebSocket) is a
/// new variant here and a new layer beside `tls`; the backends do not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The binary protocol straight over TCP.
    Plain,
    /// The binary protocol inside TLS (rustls, the node's certificate).
    Tls,
}

impl ListenerKind {
    /// The name used in the node's log lines.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Plain => "plain",
            ListenerKind::Tls => "tls",
        }
    }
}
