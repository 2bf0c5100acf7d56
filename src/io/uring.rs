//! The io_uring backend: completion-based, one submit-and-wait per loop turn.
//!
//! One multishot accept on each of the shard's listeners; one multishot recv per connection that
//! draws from a shard-wide provided-buffer ring, so an idle connection holds no read
//! buffer; sends straight from the connection's output buffer, which exists only while a
//! send is in flight; a read on an eventfd for wake-ups from other threads. Every
//! operation the loop queues reaches the kernel in the one `io_uring_enter` that also
//! waits for the next completions.
//!
//! Architecture invariant: a slot (and its output buffer) is reused or freed only after the
//! kernel has completed every operation that names it, so the kernel never reads or
//! writes memory that belongs to another connection or to nobody.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};

use super::probe::errno_name;
use super::{
    Backend, BackendStats, Handler, LISTENERS_MAX, ListenerIndex, StatsCell, Transmit, Wake,
};
use crate::ids::ConnId;
use crate::limits::{
    CLOSE_LINGER_MS, HEARTBEAT_COALESCE_US, URING_RECV_BUFFER_SIZE, URING_RECV_BUFFERS,
};

/// Submission queue entries. A turn that queues more submits early (one extra enter).
const SQ_ENTRIES: u32 = 4096;
/// Completion queue entries; the kernel keeps overflow (IORING_FEAT_NODROP) beyond them.
const CQ_ENTRIES: u32 = 16384;
/// The buffer group of the shard's provided-buffer ring (one ring per io_uring).
const BUFFER_GROUP: u16 = 0;
/// After a failed accept (EMFILE, ENFILE, ENOMEM) the next try waits this long, so a full
/// fd table does not spin the loop.
const ACCEPT_RETRY_MS: u64 = 10;
/// Input read and discarded from a closing connection before its recv is cancelled. The
/// drain keeps unread input from turning our close into a reset that destroys our last
/// frame in flight (same bound as epoll's).
const CLOSE_DRAIN_BYTES_MAX: u32 = 64 * 1024;
/// An output buffer larger than this is freed rather than kept for the next burst.
const OUTPUT_KEEP_BYTES_MAX: usize = 64 * 1024;
/// A stretched heartbeat wait ends early once this many completions have arrived: a burst
/// is served at once rather than at the end of the window.
const COALESCE_BATCH: usize = 64;
/// A stretched wait needs a general timeout beyond its window (or the kernel ends it at the
/// window with nothing to return); this one stands in when the shard has no timer due.
const COALESCE_IDLE_WAIT: Duration = Duration::from_secs(1);
/// Completions handled at exit, waiting for the listener's and the wake-up's cancellation.
const EXIT_WAIT_MS: u64 = 1_000;

/// Bits of a slot's generation carried in `user_data` beside the op and the slot index.
const GENERATION_BITS: u32 = 24;
const GENERATION_MASK: u64 = (1 << GENERATION_BITS) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Wake = 2,
    Recv = 3,
    Send = 4,
    Cancel = 5,
}

fn user_data(op: Op, conn: ConnId) -> u64 {
    ((op as u64) << 56)
        | ((u64::from(conn.generation) & GENERATION_MASK) << 32)
        | u64::from(conn.index)
}

/// The accept of listener `listener`: the index field carries the listener.
fn accept_user_data(listener: usize) -> u64 {
    user_data(
        Op::Accept,
        ConnId {
            index: listener as u32,
            generation: 0,
        },
    )
}

/// A listener-level operation (wake, cancel) that names no connection.
fn loop_user_data(op: Op) -> u64 {
    user_data(
        op,
        ConnId {
            index: u32::MAX,
            generation: 0,
        },
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Open,
    /// The loop closed it (handler, peer or error); waiting for its operations to end.
    Closing,
}

/// One connection's place in the slab. Small on purpose: 15k idle connections cost
/// 15k × `size_of::<Slot>()` here and nothing else in this backend.
struct Slot {
    generation: u32,
    fd: RawFd,
    phase: Phase,
    /// A multishot recv is armed (its last completion carried IORING_CQE_F_MORE).
    recv_armed: bool,
    /// Graceful close: half-close once the output in flight has drained.
    shut_wr_pending: bool,
    /// Bytes read and discarded since the close began.
    drained: u32,
    /// Present exactly while a send is in flight; its memory belongs to the kernel until
    /// that send completes.
    out: Option<Box<Output>>,
}

struct Output {
    /// Bytes of the send in flight. Never touched while it is.
    sending: Vec<u8>,
    /// How much of `sending` the kernel has taken.
    sent: usize,
    /// Bytes written while a send was in flight; sent next.
    queued: Vec<u8>,
}

impl Output {
    fn pending(&self) -> usize {
        self.sending.len() - self.sent + self.queued.len()
    }
}

impl Slot {
    const FREE: Slot = Slot {
        generation: 0,
        fd: -1,
        phase: Phase::Free,
        recv_armed: false,
        shut_wr_pending: false,
        drained: 0,
        out: None,
    };
}

/// The shard-wide pool of receive buffers, shared with the kernel as a provided-buffer
/// ring: the kernel picks a buffer per recv completion, the loop gives it back once the
/// handler has consumed the bytes.
struct BufRing {
    /// Page-aligned ring of `URING_RECV_BUFFERS` entries the kernel reads.
    entries: *mut BufRingEntry,
    entries_bytes: usize,
    /// `URING_RECV_BUFFERS` × `URING_RECV_BUFFER_SIZE` bytes the kernel writes into.
    memory: *mut u8,
    memory_bytes: usize,
    /// Our copy of the ring's tail: entries published so far.
    tail: u16,
    /// Buffers the kernel handed to us and we have not given back yet.
    held: usize,
}

impl BufRing {
    fn new() -> io::Result<BufRing> {
        let count = usize::from(URING_RECV_BUFFERS);
        let entries_bytes = count * std::mem::size_of::<BufRingEntry>();
        let memory_bytes = count * URING_RECV_BUFFER_SIZE;
        let entries = mmap_anonymous(entries_bytes)? as *mut BufRingEntry;
        let memory = match mmap_anonymous(memory_bytes) {
            Ok(memory) => memory,
            Err(e) => {
                // SAFETY: unmapping the region mapped just above, not yet shared.
                unsafe { libc::munmap(entries.cast(), entries_bytes) };
                return Err(e);
            }
        };
        let mut ring = BufRing {
            entries,
            entries_bytes,
            memory,
            memory_bytes,
            tail: 0,
            held: 0,
        };
        for bid in 0..URING_RECV_BUFFERS {
            ring.publish(bid);
        }
        Ok(ring)
    }

    /// Appends buffer `bid` to the ring and makes it visible to the kernel.
    fn publish(&mut self, bid: u16) {
        assert!(bid < URING_RECV_BUFFERS);
        let index = usize::from(self.tail & (URING_RECV_BUFFERS - 1));
        // SAFETY: `index` < the ring's entry count; the kernel reads entries only up to
        // the tail, which still excludes this one.
        unsafe {
            let entry = &mut *self.entries.add(index);
            entry.set_addr(self.memory.add(usize::from(bid) * URING_RECV_BUFFER_SIZE) as u64);
            entry.set_len(URING_RECV_BUFFER_SIZE as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field overlays the first entry's reserved field (kernel ABI); it
        // is 2-aligned and lives as long as the mapping.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries) as *const AtomicU16) };
        // Release: the entry must be written before the kernel sees the new tail.
        tail.store(self.tail, Ordering::Release);
    }

    /// The first `len` bytes of buffer `bid`, which the kernel just filled.
    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < URING_RECV_BUFFERS);
        assert!(len <= URING_RECV_BUFFER_SIZE);
        // SAFETY: buffer `bid` lies inside the mapping; the kernel finished writing it
        // (its completion arrived) and does not reuse it until we publish it again.
        unsafe {
            std::slice::from_raw_parts(
                self.memory.add(usize::from(bid) * URING_RECV_BUFFER_SIZE),
                len,
            )
        }
    }

    fn register(&self, ring: &IoUring) -> io::Result<()> {
        // SAFETY: the entries stay mapped until this BufRing drops, which happens after
        // the io_uring (field order in UringBackend) or after unregistering (probe).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                self.entries as u64,
                URING_RECV_BUFFERS,
                BUFFER_GROUP,
                0,
            )
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both regions were mapped by `new` with these sizes and are not used
        // after this point.
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_bytes);
            libc::munmap(self.memory.cast(), self.memory_bytes);
        }
    }
}

/// Populated at once: the buffer pool is a fixed cost of the shard, resident from start-up
/// (the kernel's copies into it never fault, and the node's memory does not creep up as
/// recvs cycle through the pool).
fn mmap_anonymous(bytes: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Wakes the loop through an eventfd the loop keeps a read queued on. `pending` coalesces
/// wake-ups: one eventfd write until the loop has seen it.
struct UringWake {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Wake for UringWake {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local to an eventfd we own. A failure means
            // the counter is saturated, which wakes the loop anyway.
            unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }
}

/// The ring with the flags every node ring uses. SINGLE_ISSUER and DEFER_TASKRUN let the
/// kernel run completion work only inside our own enter (batched, no interrupts of the
/// loop); R_DISABLED lets the node build the ring on its main thread and hand it to the
/// shard thread, which enables it and becomes its only submitter.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled()
        .setup_cqsize(CQ_ENTRIES)
        .build(SQ_ENTRIES)
}

/// Whether this kernel and process can run the backend: ring set-up with our flags, the
/// features and opcodes we use, and a provided-buffer ring. Err names the first missing
/// piece (an errno name such as "ENOSYS", or the feature); Ok(Some) names an optional
/// feature the kernel lacks.
pub fn probe() -> super::probe::ProbeResult {
    let ring = build_ring().map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) => {
            "EINVAL on ring set-up (SINGLE_ISSUER/DEFER_TASKRUN need Linux 6.1)".to_owned()
        }
        _ => errno_name(&e),
    })?;
    let params = ring.params();
    if !params.is_feature_ext_arg() {
        return Err("no IORING_FEAT_EXT_ARG (needs Linux 5.11)".to_owned());
    }
    if !params.is_feature_nodrop() {
        return Err("no IORING_FEAT_NODROP (needs Linux 5.5)".to_owned());
    }
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("opcode probe: {}", errno_name(&e)))?;
    let needed = [
        (opcode::AcceptMulti::CODE, "ACCEPT"),
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::Read::CODE, "READ"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        // Multishot accept and recv reuse the ACCEPT and RECV opcodes, so the probe cannot
        // see them; SEND_ZC came in the same release as multishot recv (6.0), after
        // multishot accept (5.19).
        (
            opcode::SendZc::CODE,
            "SEND_ZC (marks Linux 6.0 multishot recv)",
        ),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!("opcode {name} unsupported"));
        }
    }
    let buffers = BufRing::new().map_err(|e| format!("buffer ring memory: {}", errno_name(&e)))?;
    buffers
        .register(&ring)
        .map_err(|e| format!("provided-buffer ring: {}", errno_name(&e)))?;
    ring.submitter()
        .unregister_buf_ring(BUFFER_GROUP)
        .map_err(|e| format!("provided-buffer ring: {}", errno_name(&e)))?;
    let limited =
        (!ring.params().is_feature_min_timeout()).then(|| super::probe::NO_MIN_TIMEOUT.to_owned());
    drop(ring);
    drop(buffers);
    Ok(limited)
}

pub struct UringBackend {
    // Declared first so it drops first: the kernel stops using the buffer ring, the wake
    // buffer and output buffers before they are freed.
    ring: IoUring,
    buffers: BufRing,
    /// In the order given to `new`; the index is the `ListenerIndex` handlers learn.
    listeners: Vec<Listen>,
    wake: Arc<UringWake>,
    /// Where the queued eventfd read lands.
    wake_buf: Box<u64>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Completions taken from the queue this turn (reused allocation).
    cqes: Vec<(u64, i32, u32)>,
    /// Connections whose multishot recv ended (ENOBUFS, or the kernel ended it) and must
    /// be re-armed before the next wait.
    rearm: Vec<ConnId>,
    /// Closing connections and when their remaining operations get cancelled.
    lingering: Vec<(ConnId, Instant)>,
    wake_armed: bool,
    /// The kernel has IORING_FEAT_MIN_TIMEOUT (Linux 6.12): a wait can sleep through a
    /// window of arrivals and wake once for all of them.
    min_timeout: bool,
    now: Instant,
    stats: BackendStats,
    stats_cell: Arc<StatsCell>,
}

/// One listening socket and the state of its multishot accept.
struct Listen {
    socket: TcpListener,
    /// A multishot accept is in flight.
    armed: bool,
    /// After a failed accept, when to try again.
    retry_at: Option<Instant>,
}

// SAFETY: the raw pointers in `BufRing` point at mappings this backend owns exclusively;
// moving the backend to its shard thread moves that ownership with it.
unsafe impl Send for UringBackend {}

impl UringBackend {
    /// Builds the ring (disabled until `run` enables it on the shard thread) and registers
    /// the buffer ring, so set-up errors surface at start-up.
    ///
    /// Serves `listeners` (1 to `LISTENERS_MAX`).
    pub fn new(
        listeners: Vec<TcpListener>,
        stats_cell: Arc<StatsCell>,
    ) -> io::Result<UringBackend> {
        assert!(!listeners.is_empty() && listeners.len() <= LISTENERS_MAX);
        let mut listens = Vec::with_capacity(listeners.len());
        for socket in listeners {
            socket.set_nonblocking(true)?;
            listens.push(Listen {
                socket,
                armed: false,
                retry_at: None,
            });
        }
        let ring = build_ring()?;
        let buffers = BufRing::new()?;
        buffers.register(&ring)?;
        let min_timeout = ring.params().is_feature_min_timeout();
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(UringBackend {
            ring,
            buffers,
            listeners: listens,
            wake: Arc::new(UringWake {
                fd,
                pending: AtomicBool::new(false),
            }),
            wake_buf: Box::new(0),
            slots: Vec::new(),
            free: Vec::new(),
            cqes: Vec::new(),
            rearm: Vec::new(),
            lingering: Vec::new(),
            wake_armed: false,
            min_timeout,
            now: Instant::now(),
            stats: BackendStats::default(),
            stats_cell,
        })
    }

    /// Queues `entry` for the next enter; submits early if the queue is full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry names (output, wake, provided buffers) is
            // owned by this backend and outlives the operation (module invariant).
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            if let Err(e) = self.ring.submit()
                && !retryable(&e)
            {
                return Err(e);
            }
        }
    }

    fn conn_at(&self, index: u32, generation: u32) -> Option<ConnId> {
        let slot = self.slots.get(index as usize)?;
        if slot.phase == Phase::Free
            || u64::from(slot.generation) & GENERATION_MASK != u64::from(generation)
        {
            return None;
        }
        Some(ConnId {
            index,
            generation: slot.generation,
        })
    }

    fn open_slot(&mut self, conn: ConnId) -> Option<&mut Slot> {
        let slot = self.slots.get_mut(conn.index as usize)?;
        (slot.generation == conn.generation && slot.phase == Phase::Open).then_some(slot)
    }

    fn arm_recv(&mut self, conn: ConnId) -> io::Result<()> {
        let slot = &mut self.slots[conn.index as usize];
        debug_assert_eq!(slot.phase, Phase::Open);
        debug_assert!(!slot.recv_armed);
        slot.recv_armed = true;
        let entry = opcode::RecvMulti::new(Fd(slot.fd), BUFFER_GROUP)
            .build()
            .user_data(user_data(Op::Recv, conn));
        self.push(&entry)
    }

    /// Queues a send of what remains of the slot's `sending` buffer.
    fn submit_send(&mut self, conn: ConnId) -> io::Result<()> {
        let slot = &self.slots[conn.index as usize];
        let out = slot.out.as_ref().expect("a send needs an output buffer");
        let rest = &out.sending[out.sent..];
        assert!(!rest.is_empty());
        let len = rest.len().min(u32::MAX as usize) as u32;
        let entry = opcode::Send::new(Fd(slot.fd), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(Op::Send, conn));
        self.push(&entry)
    }

    fn cancel(&mut self, target: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(loop_user_data(Op::Cancel));
        self.push(&entry)
    }

    /// Starts closing an open connection. Graceful: the output in flight drains, then a
    /// half-close, then input is drained until the peer's FIN (bounded in bytes and by
    /// `CLOSE_LINGER_MS`). Otherwise every operation is cancelled at once.
    fn begin_close(&mut self, conn: ConnId, graceful: bool) -> io::Result<()> {
        let slot = &mut self.slots[conn.index as usize];
        assert_eq!(slot.phase, Phase::Open);
        slot.phase = Phase::Closing;
        self.stats.connections_open -= 1;
        self.stats.connections_closing += 1;
        let send_inflight = slot.out.is_some();
        let recv_armed = slot.recv_armed;
        if graceful {
            if send_inflight {
                slot.shut_wr_pending = true;
            } else {
                shutdown_write(slot.fd);
            }
        } else {
            if let Some(out) = slot.out.as_mut() {
                out.queued = Vec::new();
            }
            if send_inflight {
                self.cancel(user_data(Op::Send, conn))?;
            }
            if recv_armed {
                self.cancel(user_data(Op::Recv, conn))?;
            }
        }
        self.lingering
            .push((conn, self.now + Duration::from_millis(CLOSE_LINGER_MS)));
        self.try_finish(conn);
        Ok(())
    }

    /// Frees a closing slot once the kernel holds no operation on it.
    fn try_finish(&mut self, conn: ConnId) {
        let slot = &mut self.slots[conn.index as usize];
        debug_assert_eq!(slot.generation, conn.generation);
        if slot.phase != Phase::Closing || slot.recv_armed || slot.out.is_some() {
            return;
        }
        // SAFETY: closing a descriptor this slot owns; no operation refers to it any more.
        unsafe { libc::close(slot.fd) };
        *slot = Slot {
            generation: slot.generation.wrapping_add(1),
            ..Slot::FREE
        };
        self.free.push(conn.index);
        self.stats.connections_closing -= 1;
        self.stats.closed_total += 1;
    }

    /// Cancels what closing connections past their linger deadline still have queued.
    fn expire_lingering(&mut self) -> io::Result<()> {
        if self.lingering.is_empty() {
            return Ok(());
        }
        let now = self.now;
        let mut lingering = std::mem::take(&mut self.lingering);
        let mut cancels = Vec::new();
        lingering.retain(|&(conn, deadline)| {
            let slot = &self.slots[conn.index as usize];
            if slot.generation != conn.generation || slot.phase != Phase::Closing {
                return false;
            }
            if deadline > now {
                return true;
            }
            if slot.out.is_some() {
                cancels.push(user_data(Op::Send, conn));
            }
            if slot.recv_armed {
                cancels.push(user_data(Op::Recv, conn));
            }
            false
        });
        self.lingering = lingering;
        for target in cancels {
            self.cancel(target)?;
        }
        Ok(())
    }

    /// Queues what must be in flight before the loop waits: the accept, the wake-up read,
    /// recvs that ended.
    fn rearm(&mut self, stopping: bool) -> io::Result<()> {
        for i in 0..self.listeners.len() {
            let listen = &mut self.listeners[i];
            if listen.armed || stopping || listen.retry_at.is_some_and(|t| t > self.now) {
                continue;
            }
            listen.retry_at = None;
            listen.armed = true;
            let entry = opcode::AcceptMulti::new(Fd(listen.socket.as_raw_fd()))
                .flags(libc::SOCK_CLOEXEC)
                .build()
                .user_data(accept_user_data(i));
            self.push(&entry)?;
        }
        if !self.wake_armed {
            self.wake_armed = true;
            let entry = opcode::Read::new(
                Fd(self.wake.fd.as_raw_fd()),
                (&mut *self.wake_buf as *mut u64).cast(),
                8,
            )
            .build()
            .user_data(loop_user_data(Op::Wake));
            self.push(&entry)?;
        }
        for conn in std::mem::take(&mut self.rearm) {
            if self.open_slot(conn).is_some_and(|s| !s.recv_armed) {
                self.arm_recv(conn)?;
            }
        }
        Ok(())
    }

    /// One enter: submits everything queued and waits for a completion or `timeout`.
    ///
    /// With `coalesce` (a quiet spell of heartbeats, see `Handler::heartbeats_only`, on a
    /// kernel with IORING_FEAT_MIN_TIMEOUT) the wait is stretched so that one wake-up
    /// serves many pings: the kernel sleeps for `HEARTBEAT_COALESCE_US` unless
    /// `COALESCE_BATCH` completions arrive first, then returns with whatever came (or, if
    /// nothing did, at the first arrival). The caller has reaped the completions of its own
    /// sends before, so only new input ends the window.
    fn submit_and_wait(&mut self, timeout: Option<Duration>, coalesce: bool) -> io::Result<()> {
        let submitter = self.ring.submitter();
        let result = if coalesce {
            debug_assert!(self.min_timeout);
            let window = Duration::from_micros(u64::from(HEARTBEAT_COALESCE_US));
            // Without a general timeout past the window the kernel would end the wait at
            // the window's end even with nothing to return. A timer due within the window
            // shortens it: the kernel then returns at the timer with whatever came.
            let limit = timeout.unwrap_or(COALESCE_IDLE_WAIT);
            let min_wait = u32::try_from(window.min(limit).as_micros()).unwrap_or(u32::MAX);
            let ts = Timespec::from(limit);
            let args = SubmitArgs::new().min_wait_usec(min_wait).timespec(&ts);
            submitter.submit_with_args(COALESCE_BATCH, &args)
        } else {
            match timeout {
                Some(timeout) => {
                    let ts = Timespec::from(timeout);
                    submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts))
                }
                None => submitter.submit_and_wait(1),
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if retryable(&e) || e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Submits what is queued without waiting, so the sends it carries complete now and
    /// their completions can be reaped before a stretched wait. True if completions are
    /// ready.
    fn submit_now(&mut self) -> io::Result<bool> {
        if !self.ring.submission().is_empty()
            && let Err(e) = self.ring.submit()
            && !retryable(&e)
        {
            return Err(e);
        }
        Ok(!self.ring.completion().is_empty())
    }

    fn complete(&mut self, handler: &mut dyn Handler) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result(), cqe.flags())),
        );
        let mut result = Ok(());
        for &(data, res, flags) in &cqes {
            result = self.on_completion(data, res, flags, handler);
            if result.is_err() {
                break;
            }
        }
        self.cqes = cqes;
        result
    }

    fn on_completion(
        &mut self,
        data: u64,
        res: i32,
        flags: u32,
        handler: &mut dyn Handler,
    ) -> io::Result<()> {
        let op = (data >> 56) as u8;
        let index = data as u32;
        let generation = ((data >> 32) & GENERATION_MASK) as u32;
        match op {
            x if x == Op::Accept as u8 => self.on_accept(index as usize, res, flags, handler),
            x if x == Op::Wake as u8 => {
                self.wake_armed = false;
                // Before the next tick reads the mailbox: a wake after this point writes
                // the eventfd again.
                self.wake.pending.store(false, Ordering::Release);
                if res < 0 && res != -libc::ECANCELED {
                    return Err(io::Error::from_raw_os_error(-res));
                }
                Ok(())
            }
            x if x == Op::Recv as u8 => self.on_recv(index, generation, res, flags, handler),
            x if x == Op::Send as u8 => self.on_send(index, generation, res, handler),
            x if x == Op::Cancel as u8 => Ok(()),
            _ => unreachable!("completion with unknown user_data {data:#x}"),
        }
    }

    fn on_accept(
        &mut self,
        listener: usize,
        res: i32,
        flags: u32,
        handler: &mut dyn Handler,
    ) -> io::Result<()> {
        let listen = &mut self.listeners[listener];
        if !cqueue::more(flags) {
            listen.armed = false;
            if res < 0 {
                listen.retry_at = Some(self.now + Duration::from_millis(ACCEPT_RETRY_MS));
            }
        }
        if res < 0 {
            if res != -libc::ECANCELED {
                eprintln!(
                    "tern: accept failed: {}",
                    io::Error::from_raw_os_error(-res)
                );
            }
            return Ok(());
        }
        // SAFETY: the completion hands us a new descriptor that nobody else owns.
        let stream = unsafe { OwnedFd::from_raw_fd(res) };
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_tcp_nodelay(true);
        // A peer that reset before we looked has no address; its recv reports the reset.
        let peer = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot::FREE);
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        assert_eq!(slot.phase, Phase::Free);
        assert!(slot.out.is_none());
        slot.phase = Phase::Open;
        slot.fd = std::os::fd::IntoRawFd::into_raw_fd(stream);
        let conn = ConnId {
            index,
            generation: slot.generation,
        };
        self.stats.accepted_total += 1;
        self.stats.connections_open += 1;
        if handler.accepted(conn, ListenerIndex(listener as u8), peer, self.now) {
            self.arm_recv(conn)
        } else {
            self.begin_close(conn, false)
        }
    }

    fn on_recv(
        &mut self,
        index: u32,
        generation: u32,
        res: i32,
        flags: u32,
        handler: &mut dyn Handler,
    ) -> io::Result<()> {
        let buffer = cqueue::buffer_select(flags);
        if buffer.is_some() {
            self.buffers.held += 1;
        }
        let Some(conn) = self.conn_at(index, generation) else {
            unreachable!("recv completion for a freed slot");
        };
        let more = cqueue::more(flags);
        let slot = &mut self.slots[index as usize];
        if !more {
            slot.recv_armed = false;
        }
        let phase = slot.phase;
        if res > 0 {
            let bid = buffer.expect("a recv completion with data names its buffer");
            let len = res as usize;
            match phase {
                Phase::Open => handler.received(conn, self.buffers.bytes(bid, len), self.now),
                Phase::Closing => {
                    let before = slot.drained;
                    slot.drained = slot.drained.saturating_add(len as u32);
                    // Cancel once, when the drain budget runs out.
                    if before <= CLOSE_DRAIN_BYTES_MAX
                        && slot.drained > CLOSE_DRAIN_BYTES_MAX
                        && more
                    {
                        self.cancel(user_data(Op::Recv, conn))?;
                    }
                }
                Phase::Free => unreachable!(),
            }
            self.buffers.publish(bid);
            self.buffers.held -= 1;
            if !more {
                match phase {
                    Phase::Open => self.rearm.push(conn),
                    _ => self.try_finish(conn),
                }
            }
            return Ok(());
        }
        if let Some(bid) = buffer {
            self.buffers.publish(bid);
            self.buffers.held -= 1;
        }
        if more {
            // A multishot recv reports an error or EOF only as its last completion.
            return Ok(());
        }
        match phase {
            Phase::Open if res == -libc::ENOBUFS => {
                // The pool ran dry: the connection waits for buffers the next turn gives
                // back. Its data stays in the socket.
                self.rearm.push(conn);
                Ok(())
            }
            Phase::Open => {
                // EOF, reset or another socket error.
                self.begin_close(conn, false)?;
                handler.closed(conn);
                Ok(())
            }
            _ => {
                self.try_finish(conn);
                Ok(())
            }
        }
    }

    fn on_send(
        &mut self,
        index: u32,
        generation: u32,
        res: i32,
        handler: &mut dyn Handler,
    ) -> io::Result<()> {
        let Some(conn) = self.conn_at(index, generation) else {
            unreachable!("send completion for a freed slot");
        };
        let slot = &mut self.slots[index as usize];
        let out = slot.out.as_mut().expect("a send completion has its buffer");
        if res <= 0 {
            // The kernel is done with the buffer: drop it with whatever was queued.
            slot.out = None;
            if slot.phase == Phase::Open {
                self.begin_close(conn, false)?;
                handler.closed(conn);
            } else {
                self.try_finish(conn);
            }
            return Ok(());
        }
        out.sent += res as usize;
        debug_assert!(out.sent <= out.sending.len());
        // A connection closed without grace sends nothing more.
        let keep_going = slot.phase == Phase::Open || slot.shut_wr_pending;
        if keep_going && out.sent < out.sending.len() {
            // Short write: the socket buffer filled up; the rest goes when it drains.
            return self.submit_send(conn);
        }
        if keep_going && !out.queued.is_empty() {
            std::mem::swap(&mut out.sending, &mut out.queued);
            out.queued.clear();
            if out.queued.capacity() > OUTPUT_KEEP_BYTES_MAX {
                out.queued = Vec::new();
            }
            out.sent = 0;
            return self.submit_send(conn);
        }
        // Nothing more to send: an idle connection holds no write buffer.
        slot.out = None;
        if slot.phase == Phase::Closing {
            if slot.shut_wr_pending {
                slot.shut_wr_pending = false;
                shutdown_write(slot.fd);
            }
            self.try_finish(conn);
        }
        Ok(())
    }

    /// Cancels the listener's accept and the wake-up read and waits (bounded) for their
    /// completions, so no operation refers to the wake buffer once the backend drops.
    fn quiesce(&mut self) -> io::Result<()> {
        for i in 0..self.listeners.len() {
            if self.listeners[i].armed {
                self.cancel(accept_user_data(i))?;
            }
        }
        if self.wake_armed {
            self.cancel(loop_user_data(Op::Wake))?;
        }
        let deadline = Instant::now() + Duration::from_millis(EXIT_WAIT_MS);
        let accepting = |listeners: &[Listen]| listeners.iter().any(|l| l.armed);
        while (accepting(&self.listeners) || self.wake_armed) && Instant::now() < deadline {
            self.submit_and_wait(Some(Duration::from_millis(10)), false)?;
            for cqe in self.ring.completion() {
                let op = (cqe.user_data() >> 56) as u8;
                if op == Op::Accept as u8 && !cqueue::more(cqe.flags()) {
                    self.listeners[cqe.user_data() as u32 as usize].armed = false;
                    if cqe.result() >= 0 {
                        // SAFETY: a connection accepted after the end; close it.
                        unsafe { libc::close(cqe.result()) };
                    }
                } else if op == Op::Accept as u8 && cqe.result() >= 0 {
                    // SAFETY: as above.
                    unsafe { libc::close(cqe.result()) };
                } else if op == Op::Wake as u8 {
                    self.wake_armed = false;
                }
            }
        }
        Ok(())
    }

    fn wait_timeout(&self, handler_timeout: Option<Duration>) -> Option<Duration> {
        let mut timeout = handler_timeout;
        let mut consider = |at: Instant| {
            let d = at.saturating_duration_since(self.now);
            timeout = Some(timeout.map_or(d, |t| t.min(d)));
        };
        for at in self.listeners.iter().filter_map(|l| l.retry_at) {
            consider(at);
        }
        if let Some(at) = self.lingering.iter().map(|&(_, at)| at).min() {
            consider(at);
        }
        if !self.rearm.is_empty() {
            // Recvs that hit ENOBUFS wait for the buffers this turn gave back; poll soon.
            consider(self.now + Duration::from_millis(1));
        }
        timeout
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: the descriptor is open and owned by the slot; shutdown passes no memory.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    // The peer may be gone already; the close that follows is all that matters then.
    let _ = socket2::SockRef::from(&fd).shutdown(std::net::Shutdown::Write);
}

impl Transmit for UringBackend {
    fn write(&mut self, conn: ConnId, bytes: &mut Vec<u8>) -> usize {
        let Some(slot) = self.open_slot(conn) else {
            bytes.clear();
            return 0;
        };
        if bytes.is_empty() {
            return slot.out.as_ref().map_or(0, |o| o.pending());
        }
        match slot.out.as_mut() {
            Some(out) => {
                if out.queued.is_empty() {
                    std::mem::swap(&mut out.queued, bytes);
                } else {
                    out.queued.extend_from_slice(bytes);
                    bytes.clear();
                }
                out.pending()
            }
            None => {
                let out = Box::new(Output {
                    sending: std::mem::take(bytes),
                    sent: 0,
                    queued: Vec::new(),
                });
                let pending = out.pending();
                slot.out = Some(out);
                if let Err(e) = self.submit_send(conn) {
                    // Only a broken ring fails here; the loop reports it on its next enter.
                    eprintln!("tern: io_uring submit failed: {e}");
                }
                pending
            }
        }
    }

    fn close(&mut self, conn: ConnId) {
        if self.open_slot(conn).is_some()
            && let Err(e) = self.begin_close(conn, true)
        {
            eprintln!("tern: io_uring submit failed: {e}");
        }
    }
}

impl Backend for UringBackend {
    fn run(&mut self, handler: &mut dyn Handler) -> io::Result<()> {
        self.ring.submitter().register_enable_rings()?;
        loop {
            self.now = Instant::now();
            self.stats_cell.publish_if_requested(|| self.stats());
            let timeout = handler.tick(self.now);
            handler.flush(self);
            self.expire_lingering()?;
            let stopping = handler.should_stop();
            if stopping && self.stats.connections_closing == 0 {
                return self.quiesce();
            }
            self.rearm(stopping)?;
            let timeout = if stopping {
                // Closing connections finish by completions or their linger deadline.
                Some(Duration::from_millis(10))
            } else {
                self.wait_timeout(timeout)
            };
            // Asked every turn: the shard tracks its quiet spell through these calls.
            let quiet = handler.heartbeats_only();
            let coalesce = quiet && self.min_timeout && !stopping;
            if coalesce && self.submit_now()? {
                // Completions first (mostly the pongs just sent): a stretched wait must
                // end for new input only.
                self.now = Instant::now();
                self.complete(handler)?;
                handler.flush(self);
                continue;
            }
            self.submit_and_wait(timeout, coalesce)?;
            self.now = Instant::now();
            self.complete(handler)?;
            handler.flush(self);
        }
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }

    fn local_addr(&self, listener: ListenerIndex) -> io::Result<SocketAddr> {
        self.listeners[usize::from(listener.0)].socket.local_addr()
    }

    fn stats(&self) -> BackendStats {
        let mut stats = self.stats;
        stats.backlog_bytes = 0;
        stats.write_buffers = 0;
        for out in self.slots.iter().filter_map(|s| s.out.as_ref()) {
            stats.backlog_bytes += out.pending();
            stats.write_buffers += 1;
        }
        stats.read_buffers_held = self.buffers.held;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_op_index_and_generation() {
        let conn = ConnId {
            index: 123_456,
            generation: (1 << GENERATION_BITS) + 7,
        };
        let data = user_data(Op::Send, conn);
        assert_eq!((data >> 56) as u8, Op::Send as u8);
        assert_eq!(data as u32, 123_456);
        assert_eq!((data >> 32) & GENERATION_MASK, 7);
    }

    #[test]
    fn an_idle_slot_is_small() {
        // The per-connection cost of this backend; see the heartbeat cost figures in
        // docs/architecture.md before letting it grow.
        assert!(
            std::mem::size_of::<Slot>() <= 24,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }
}
