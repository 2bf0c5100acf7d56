//! Event-loop backends under one contract.
//!
//! A backend owns one shard's listening socket and accepted sockets and runs the loop:
//! it waits for readiness or completions, hands received bytes to the shard's `Handler`,
//! and takes the handler's output to the kernel. The handler owns all protocol state;
//! the backend owns sockets, the bytes the kernel has not taken yet, and nothing else.
//!
//! Architecture invariant: a backend never interprets bytes and never blocks outside its
//! own wait call. Both backends pass the same end-to-end suite.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::ConnId;

pub mod epoll;

/// What a shard does when its backend reports something. Every method is called on the
/// shard's own thread, never concurrently.
pub trait Handler {
    /// A connection was accepted. Return false to refuse it (the backend closes it).
    fn accepted(&mut self, conn: ConnId, peer: SocketAddr, now: Instant) -> bool;
    /// Bytes arrived on `conn`. The slice is only valid during the call.
    fn received(&mut self, conn: ConnId, bytes: &[u8], now: Instant);
    /// The peer closed `conn` or its socket failed. The backend already released it.
    fn closed(&mut self, conn: ConnId);
    /// Runs once per loop turn after events: mailbox, timers. Returns how long the backend
    /// may wait before the next turn (None: until something happens).
    fn tick(&mut self, now: Instant) -> Option<Duration>;
    /// Hands every pending output and close to the backend.
    fn flush(&mut self, transmit: &mut dyn Transmit);
    /// True once the shard wants its loop to end.
    fn should_stop(&self) -> bool;
}

/// The backend side of output, given to `Handler::flush`.
pub trait Transmit {
    /// Takes all of `bytes` (leaving it empty) and writes or queues them for `conn`.
    /// Returns the bytes now queued in the backend for `conn`, not yet taken by the kernel.
    fn write(&mut self, conn: ConnId, bytes: &mut Vec<u8>) -> usize;
    /// Closes `conn` after a best-effort flush of what is queued. No `closed` call follows.
    fn close(&mut self, conn: ConnId);
}

/// Wakes a shard's loop from another thread (the store writer, another shard).
pub trait Wake: Send + Sync {
    fn wake(&self);
}

/// Counters a backend exposes for tests and stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub connections_open: usize,
    pub accepted_total: u64,
    pub closed_total: u64,
    /// Bytes queued for the kernel across all connections.
    pub backlog_bytes: usize,
}

/// A shard's event loop.
pub trait Backend {
    /// Runs until `handler.should_stop()`.
    fn run(&mut self, handler: &mut dyn Handler) -> io::Result<()>;
    fn waker(&self) -> Arc<dyn Wake>;
    fn local_addr(&self) -> io::Result<SocketAddr>;
    fn stats(&self) -> BackendStats;
}

/// Which loop a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Epoll,
}

impl IoKind {
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Epoll => "epoll",
        }
    }
}
