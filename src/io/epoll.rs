//! The mio (epoll) backend: readiness-based, edge-triggered.
//!
//! Reads go into one shard-wide buffer, so an idle connection holds no read buffer. Output
//! is written once per loop turn per connection; what the kernel does not take stays in a
//! per-connection backlog until the socket is writable again.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::{
    Backend, BackendStats, Handler, LISTENERS_MAX, ListenerIndex, StatsCell, Transmit, Wake,
};
use crate::ids::ConnId;

const WAKER: Token = Token(usize::MAX - 1);
/// Listener `i` registers as `Token(LISTENER_FIRST - i)`, above every connection's token.
const LISTENER_FIRST: usize = usize::MAX - 2;

/// Shard-wide read buffer.
const READ_BUFFER_SIZE: usize = 64 * 1024;
/// Capacity an empty output buffer keeps: none, so an idle connection holds no output
/// buffer at all (as on io_uring); a pong costs one small allocation instead. Keeping
/// 1 KiB cost an idle connection ~80 B more, keeping 64 B about 64 B more (tools/hb-bench,
/// 15k idle).
const OUTPUT_BUFFER_KEEP_MAX: usize = 0;
/// Bytes read from one connection per turn before others get their turn.
const READ_TURN_BYTES_MAX: usize = 4 * READ_BUFFER_SIZE;
/// Readiness events taken per wait.
const EVENTS_MAX: usize = 1024;
/// Connections accepted per listener event before other work runs.
const ACCEPTS_PER_TURN_MAX: usize = 256;
/// Bytes read and discarded from a closing socket so that unread input does not turn the
/// close into a reset that destroys our last frame in flight.
const CLOSE_DRAIN_BYTES_MAX: usize = 64 * 1024;

struct Sock {
    stream: TcpStream,
    /// Bytes the kernel has not taken yet; empty for almost every connection.
    backlog: Vec<u8>,
    /// WRITABLE interest is registered (only while the backlog is not empty).
    write_interest: bool,
}

struct Slot {
    generation: u32,
    sock: Option<Sock>,
}

pub struct EpollBackend {
    poll: Poll,
    /// In the order given to `new`; the index is the `ListenerIndex` handlers learn.
    listeners: Vec<TcpListener>,
    waker: Arc<MioWake>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    read_buffer: Box<[u8]>,
    /// Connections that still had input when their read budget ran out, and listeners
    /// (`index` u32::MAX, `generation` the listener) with connections still queued.
    ready: Vec<ConnId>,
    stats: BackendStats,
    stats_cell: Arc<StatsCell>,
}

struct MioWake(Waker);

impl Wake for MioWake {
    fn wake(&self) {
        // A failed eventfd write means the loop is gone; nothing to wake.
        let _ = self.0.wake();
    }
}

impl EpollBackend {
    /// A loop serving `listeners` (1 to `LISTENERS_MAX`).
    pub fn new(
        listeners: Vec<std::net::TcpListener>,
        stats_cell: Arc<StatsCell>,
    ) -> io::Result<EpollBackend> {
        assert!(!listeners.is_empty() && listeners.len() <= LISTENERS_MAX);
        let poll = Poll::new()?;
        let mut registered = Vec::with_capacity(listeners.len());
        for (i, listener) in listeners.into_iter().enumerate() {
            listener.set_nonblocking(true)?;
            let mut listener = TcpListener::from_std(listener);
            poll.registry().register(
                &mut listener,
                Token(LISTENER_FIRST - i),
                Interest::READABLE,
            )?;
            registered.push(listener);
        }
        let waker = Arc::new(MioWake(Waker::new(poll.registry(), WAKER)?));
        Ok(EpollBackend {
            poll,
            listeners: registered,
            waker,
            slots: Vec::new(),
            free: Vec::new(),
            read_buffer: vec![0u8; READ_BUFFER_SIZE].into_boxed_slice(),
            ready: Vec::new(),
            stats: BackendStats::default(),
            stats_cell,
        })
    }

    fn sock(&mut self, conn: ConnId) -> Option<&mut Sock> {
        let slot = self.slots.get_mut(conn.index as usize)?;
        if slot.generation != conn.generation {
            return None;
        }
        slot.sock.as_mut()
    }

    fn accept(&mut self, listener: ListenerIndex, handler: &mut dyn Handler, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN_MAX {
            let (mut stream, peer) = match self.listeners[usize::from(listener.0)].accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the kernel queue for later turns.
                    eprintln!("tern: accept failed: {e}");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let index = match self.free.pop() {
                Some(index) => index,
                None => {
                    self.slots.push(Slot {
                        generation: 0,
                        sock: None,
                    });
                    (self.slots.len() - 1) as u32
                }
            };
            let slot = &mut self.slots[index as usize];
            debug_assert!(slot.sock.is_none());
            let conn = ConnId {
                index,
                generation: slot.generation,
            };
            if self
                .poll
                .registry()
                .register(&mut stream, Token(index as usize), Interest::READABLE)
                .is_err()
            {
                self.free.push(index);
                continue;
            }
            slot.sock = Some(Sock {
                stream,
                backlog: Vec::new(),
                write_interest: false,
            });
            self.stats.accepted_total += 1;
            self.stats.connections_open += 1;
            if !handler.accepted(conn, listener, peer, now) {
                self.release(conn, false);
            }
        }
        // More may be queued: come back next turn without waiting.
        self.ready.push(ConnId {
            index: u32::MAX,
            generation: u32::from(listener.0),
        });
    }

    /// Reads what `conn` has, within its per-turn budget.
    ///
    /// A read shorter than the buffer emptied the socket's receive queue, and any later
    /// segment raises a new edge, so the read that would only return EAGAIN is skipped: one
    /// syscall fewer per heartbeat. Not when the peer's FIN or an error was already
    /// signalled (`until_would_block`): no later edge would report them.
    fn read(
        &mut self,
        conn: ConnId,
        handler: &mut dyn Handler,
        now: Instant,
        until_would_block: bool,
    ) {
        let mut read_total = 0usize;
        loop {
            let Some(slot) = self.slots.get_mut(conn.index as usize) else {
                return;
            };
            if slot.generation != conn.generation {
                return;
            }
            let Some(sock) = slot.sock.as_mut() else {
                return;
            };
            match sock.stream.read(&mut self.read_buffer) {
                Ok(0) => {
                    self.release(conn, false);
                    handler.closed(conn);
                    return;
                }
                Ok(n) => {
                    handler.received(conn, &self.read_buffer[..n], now);
                    read_total += n;
                    if read_total >= READ_TURN_BYTES_MAX {
                        self.ready.push(conn);
                        return;
                    }
                    if n < self.read_buffer.len() && !until_would_block {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.release(conn, false);
                    handler.closed(conn);
                    return;
                }
            }
        }
    }

    /// Writes the backlog of `conn`; keeps WRITABLE interest only while some remains.
    /// Returns false if the socket failed (the caller releases it).
    fn write_backlog(poll: &Poll, conn: ConnId, sock: &mut Sock) -> bool {
        while !sock.backlog.is_empty() {
            match sock.stream.write(&sock.backlog) {
                Ok(0) => return false,
                Ok(n) => {
                    sock.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        if sock.backlog.is_empty() && sock.backlog.capacity() > OUTPUT_BUFFER_KEEP_MAX {
            // Give the memory back: after a sync page or a stalled peer's backlog, an idle
            // connection would otherwise keep tens of KiB for the rest of its life.
            sock.backlog = Vec::new();
        }
        let want_write = !sock.backlog.is_empty();
        if want_write != sock.write_interest {
            let interest = if want_write {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            if poll
                .registry()
                .reregister(&mut sock.stream, Token(conn.index as usize), interest)
                .is_err()
            {
                return false;
            }
            sock.write_interest = want_write;
        }
        true
    }

    /// Frees the slot of `conn`. With `graceful`, flushes once, half-closes and drains input
    /// first so the peer can read our last frames.
    fn release(&mut self, conn: ConnId, graceful: bool) {
        let Some(slot) = self.slots.get_mut(conn.index as usize) else {
            return;
        };
        if slot.generation != conn.generation {
            return;
        }
        let Some(mut sock) = slot.sock.take() else {
            return;
        };
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(conn.index);
        self.stats.connections_open -= 1;
        self.stats.closed_total += 1;
        if graceful {
            let _ = sock.stream.write(&sock.backlog);
            let _ = sock.stream.shutdown(Shutdown::Write);
            let mut drained = 0usize;
            while drained < CLOSE_DRAIN_BYTES_MAX {
                match sock.stream.read(&mut self.read_buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        }
        let _ = self.poll.registry().deregister(&mut sock.stream);
    }
}

impl Transmit for EpollBackend {
    fn write(&mut self, conn: ConnId, bytes: &mut Vec<u8>) -> usize {
        let registry_poll = &self.poll;
        let Some(slot) = self.slots.get_mut(conn.index as usize) else {
            bytes.clear();
            return 0;
        };
        if slot.generation != conn.generation || slot.sock.is_none() {
            bytes.clear();
            return 0;
        }
        let sock = slot.sock.as_mut().expect("checked above");
        if sock.backlog.is_empty() {
            std::mem::swap(&mut sock.backlog, bytes);
        } else {
            sock.backlog.extend_from_slice(bytes);
            bytes.clear();
            if bytes.capacity() > OUTPUT_BUFFER_KEEP_MAX {
                *bytes = Vec::new();
            }
        }
        if !Self::write_backlog(registry_poll, conn, sock) {
            // The peer is gone; the read side reports the close.
            sock.backlog.clear();
            return 0;
        }
        sock.backlog.len()
    }

    fn close(&mut self, conn: ConnId) {
        self.release(conn, true);
    }
}

impl Backend for EpollBackend {
    fn run(&mut self, handler: &mut dyn Handler) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_MAX);
        loop {
            let now = Instant::now();
            self.stats_cell.publish_if_requested(|| self.stats());
            let timeout = handler.tick(now);
            handler.flush(self);
            if handler.should_stop() {
                return Ok(());
            }
            let timeout = if self.ready.is_empty() {
                timeout
            } else {
                Some(std::time::Duration::ZERO)
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for conn in std::mem::take(&mut self.ready) {
                if conn.index == u32::MAX {
                    self.accept(ListenerIndex(conn.generation as u8), handler, now);
                } else {
                    // Stopped by the budget: the edge that reported this input is spent.
                    self.read(conn, handler, now, true);
                }
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    Token(token) if token > LISTENER_FIRST - LISTENERS_MAX => {
                        let listener = ListenerIndex((LISTENER_FIRST - token) as u8);
                        self.accept(listener, handler, now);
                    }
                    Token(index) => {
                        let Some(slot) = self.slots.get(index) else {
                            continue;
                        };
                        let conn = ConnId {
                            index: index as u32,
                            generation: slot.generation,
                        };
                        if event.is_writable() {
                            let poll = &self.poll;
                            let ok = match self.slots[index].sock.as_mut() {
                                Some(sock) => Self::write_backlog(poll, conn, sock),
                                None => true,
                            };
                            if !ok {
                                self.release(conn, false);
                                handler.closed(conn);
                                continue;
                            }
                        }
                        let hangup = event.is_read_closed() || event.is_error();
                        if event.is_readable() || hangup {
                            self.read(conn, handler, now, hangup);
                        }
                    }
                }
            }
            handler.flush(self);
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.waker.clone()
    }

    fn local_addr(&self, listener: ListenerIndex) -> io::Result<SocketAddr> {
        self.listeners[usize::from(listener.0)].local_addr()
    }

    fn stats(&self) -> BackendStats {
        let mut stats = self.stats;
        for sock in self.slots.iter().filter_map(|s| s.sock.as_ref()) {
            stats.backlog_bytes += sock.backlog.len();
            stats.write_buffers += usize::from(sock.backlog.capacity() > 0);
        }
        stats
    }
}

impl EpollBackend {
    /// Whether `conn` still has a socket here (for tests and assertions).
    pub fn is_open(&mut self, conn: ConnId) -> bool {
        self.sock(conn).is_some()
    }
}
