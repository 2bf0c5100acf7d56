//! Event-loop backends under one contract.
//!
//! A backend owns one shard's listening sockets (at most `LISTENERS_MAX`: say a plain and a
//! TLS port) and accepted sockets and runs the loop:
//! it waits for readiness or completions, hands received bytes to the shard's `Handler`,
//! and takes the handler's output to the kernel. The handler owns all protocol state;
//! the backend owns sockets, the bytes the kernel has not taken yet, and nothing else.
//!
//! Architecture invariant: a backend never interprets bytes and never blocks outside its
//! own wait call. Both backends pass the same end-to-end suite.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::ConnId;

pub mod epoll;

/// Listening sockets one backend serves. Each accepted connection is reported with the
/// index of its listener, so the shard (not the backend) decides what the bytes mean.
pub const LISTENERS_MAX: usize = 4;

/// Which of a backend's listeners accepted a connection: the index into the list the
/// backend was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenerIndex(pub u8);
pub mod probe;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod uring;

/// What a shard does when its backend reports something. Every method is called on the
/// shard's own thread, never concurrently.
pub trait Handler {
    /// A connection was accepted on `listener`. Return false to refuse it (the backend
    /// closes it).
    fn accepted(
        &mut self,
        conn: ConnId,
        listener: ListenerIndex,
        peer: SocketAddr,
        now: Instant,
    ) -> bool;
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
    /// True in a quiet spell: the shard has handled nothing but heartbeats (pings in, pongs
    /// out) for `limits::HEARTBEAT_COALESCE_QUIET_MS`, so the backend may let its next wait
    /// gather completions for a bounded moment (`limits::HEARTBEAT_COALESCE_US`) before it
    /// runs a turn. Message traffic (requests, store completions, pushes), timeouts and
    /// kicks end the spell.
    fn heartbeats_only(&mut self) -> bool {
        false
    }
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

/// Counters a backend exposes for tests and stats. At rest (no traffic, no connections)
/// every gauge here is zero; the churn test checks that.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub connections_open: usize,
    /// Connections the loop closed whose socket still waits for the kernel's last
    /// completions (io_uring: cancelled or lingering operations; epoll: always 0).
    pub connections_closing: usize,
    pub accepted_total: u64,
    pub closed_total: u64,
    /// Bytes queued for the kernel across all connections.
    pub backlog_bytes: usize,
    /// Connections holding an output buffer (allocated only while output is pending).
    pub write_buffers: usize,
    /// Shard-wide read buffers handed out and not yet given back (io_uring provided
    /// buffers outside the ring; epoll: always 0, it reads into one shard buffer).
    pub read_buffers_held: usize,
}

impl BackendStats {
    pub fn add(&mut self, other: &BackendStats) {
        self.connections_open += other.connections_open;
        self.connections_closing += other.connections_closing;
        self.accepted_total += other.accepted_total;
        self.closed_total += other.closed_total;
        self.backlog_bytes += other.backlog_bytes;
        self.write_buffers += other.write_buffers;
        self.read_buffers_held += other.read_buffers_held;
    }
}

/// Where a backend publishes its stats when another thread asks (`tern serve` on SIGUSR1).
/// The loop checks one flag per turn; the O(connections) count runs only when asked.
#[derive(Default)]
pub struct StatsCell {
    requested: AtomicBool,
    published: AtomicU64,
    snapshot: Mutex<BackendStats>,
}

impl StatsCell {
    /// Asks for a snapshot; returns the publication count to wait past.
    pub fn request(&self) -> u64 {
        let seen = self.published.load(Ordering::Acquire);
        self.requested.store(true, Ordering::Release);
        seen
    }

    /// Called by the loop once per turn.
    pub fn publish_if_requested(&self, stats: impl FnOnce() -> BackendStats) {
        if self.requested.load(Ordering::Relaxed) && self.requested.swap(false, Ordering::AcqRel) {
            *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = stats();
            self.published.fetch_add(1, Ordering::Release);
        }
    }

    /// The snapshot published after `seen`, if one was.
    pub fn published_after(&self, seen: u64) -> Option<BackendStats> {
        if self.published.load(Ordering::Acquire) > seen {
            Some(*self.snapshot.lock().unwrap_or_else(|e| e.into_inner()))
        } else {
            None
        }
    }
}

/// A shard's event loop.
pub trait Backend {
    /// Runs until `handler.should_stop()`.
    fn run(&mut self, handler: &mut dyn Handler) -> io::Result<()>;
    fn waker(&self) -> Arc<dyn Wake>;
    /// The address of listener `listener` (in the order the backend was built with).
    fn local_addr(&self, listener: ListenerIndex) -> io::Result<SocketAddr>;
    fn stats(&self) -> BackendStats;
}

/// Which loop a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Epoll,
    /// Only on targets where io_uring is built (x86_64, aarch64), and only after the
    /// start-up probe passed; see `probe::select`.
    Uring,
}

impl IoKind {
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Epoll => "epoll",
            IoKind::Uring => "uring",
        }
    }
}
