//! One shard: the per-core loop's state and the one place that composes io, session,
//! routing and storage.
//!
//! A shard owns its connections outright. It reads the store through short read
//! transactions (never blocking), hands writes to the store writer through a bounded queue,
//! and learns of commits through its mailbox. Architecture invariant: a shard thread never
//! blocks outside its backend's wait (password hashes run on `login::HashPool`).

mod account;
mod files;
pub mod login;
pub mod mailbox;
mod preauth;
mod presence;
mod team;
pub mod timer_wheel;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::auth::TokenKey;
use crate::ids::{ConnId, ShardId, UserId};
use crate::io::{Handler, ListenerIndex, Transmit};
use crate::limits::{
    CONNECTION_BACKLOG_MAX, CONNECTION_INFLIGHT_MAX, HANDSHAKE_TIMEOUT_MS,
    HEARTBEAT_COALESCE_QUIET_MS, IDLE_TIMEOUT_INTERVAL_TENTHS, SHARD_CONNECTIONS_MAX,
    SHARD_UNAUTHENTICATED_MAX, SHARD_WRITER_WAITING_MAX, SYNC_PAGE_BYTES_MAX,
    SYNC_PAGE_ENTRIES_MAX, TIMER_SLOTS, TIMER_TICK_MS,
};
use crate::protocol::{EntryRef, ErrorCode, SyncPageRef};
use crate::routing::Directory;
use crate::session::{Conn, Request, SessionConfig};
use crate::storage::{Delivery, OpResult, Origin, Store, WriteOp, WriterHandle};
use crate::transport::ListenerKind;
use crate::transport::tls::{Inbound, TlsLayer};

use mailbox::{KickWhy, Mailbox, ShardMsg};
use timer_wheel::TimerWheel;

/// Everything a shard shares with the rest of the node.
#[derive(Clone)]
pub struct ShardContext {
    pub store: Store,
    pub writer: WriterHandle,
    pub directory: Arc<Directory>,
    pub mailboxes: Arc<[Mailbox]>,
    pub token_key: Arc<TokenKey>,
    /// The node's password-checking threads.
    pub hash_pool: login::HashPool,
    /// Failed password logins per account and per source address, node-wide.
    pub throttle: Arc<login::SharedThrottle>,
    /// Shared so that handing it to a connection per received chunk costs no allocation.
    pub session: Arc<SessionConfig>,
    /// Whether quiet spells of heartbeats may stretch the loop's waits (`serve
    /// --heartbeat-coalescing`).
    pub heartbeat_coalescing: bool,
    /// What each of the backend's listeners speaks, by `ListenerIndex`.
    pub listeners: Arc<[ListenerKind]>,
    /// The node's TLS settings; present exactly when a listener is `ListenerKind::Tls`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub stop: Arc<AtomicBool>,
}

/// Counters for stats and tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShardStats {
    pub connections: usize,
    pub unauthenticated: usize,
    pub logins: u64,
    pub timeouts: u64,
    pub kicks: u64,
    pub backlog_overflows: u64,
    /// Reads that waited for the writer to apply the journal first.
    pub reads_parked: u64,
    /// Ops that found the writer's queue full and waited in the shard's line.
    pub writer_waits: u64,
    /// Connections that had not logged in, closed to make room for newer ones.
    pub preauth_evictions: u64,
    /// TLS connections closed because their bytes broke TLS (garbage, a client that
    /// refused our certificate, a bad record).
    pub tls_failures: u64,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
    /// Where the connection came from: failed logins are throttled per source address.
    peer: std::net::IpAddr,
    /// The connection counts in the table of connections that have not logged in
    /// (`stats.unauthenticated`, `preauth`).
    preauth: bool,
    /// Present exactly for connections accepted on a TLS listener: every byte to and from
    /// the session goes through it.
    tls: Option<Box<TlsLayer>>,
    /// Close once the pending output is flushed, without a frame of our own: TLS failed
    /// (its alert is the last thing sent) or the peer sent close_notify.
    close_after_flush: bool,
}

pub struct Shard {
    id: ShardId,
    ctx: ShardContext,
    slots: Vec<Slot>,
    /// Established connections per user on this shard.
    online: HashMap<UserId, Vec<ConnId>>,
    wheel: TimerWheel,
    /// Connections with output or a close pending, each once.
    dirty: Vec<ConnId>,
    epoch: Instant,
    requests: Vec<Request>,
    expired: Vec<ConnId>,
    deliveries: Vec<Delivery>,
    /// Kicks for other shards whose mailboxes were full; retried next turn.
    kicks_pending: Vec<(ShardId, ConnId, KickWhy)>,
    /// Something other than heartbeats was handled since `heartbeats_only` last asked.
    urgent: bool,
    /// Monotonic ms of the last urgent work; heartbeat coalescing waits for a quiet spell.
    last_urgent_ms: u64,
    /// Monotonic ms of the latest event this shard saw.
    now_ms: u64,
    /// Presence watches and typing rate of this shard's connections.
    presence_conns: HashMap<ConnId, presence::ConnPresence>,
    /// Presence changes and typing indicators for other shards whose mailboxes were full;
    /// retried next turn.
    ephemeral_pending: Vec<(ShardId, ShardMsg)>,
    /// Reads of derived state waiting for the writer to apply the journal
    /// (`WriteOp::Flush`), by (connection, request id). Each counts against its
    /// connection's in-flight bound.
    parked: HashMap<(ConnId, u32), Request>,
    /// Ops for the writer that found its queue full, in arrival order: they go out first on
    /// later turns, and every new op queues behind them (one connection's sends stay in
    /// order; every connection waits its turn instead of being told `busy`). At most
    /// `SHARD_WRITER_WAITING_MAX`.
    writer_waiting: VecDeque<WriteOp>,
    /// Uploads in progress per connection (at most `UPLOADS_PER_CONNECTION_MAX` each).
    uploads: HashMap<ConnId, Vec<files::Upload>>,
    next_upload_id: u64,
    /// Connections that have not logged in: arrival order, count per source address.
    preauth: preauth::PreAuth,
    /// `throttled` login answers held back for a while (at most one per connection that
    /// has not logged in).
    held_refusals: Vec<login::HeldRefusal>,
    /// Plaintext of the TLS bytes of one `received` call (reused allocation).
    tls_plaintext: Vec<u8>,
    stats: ShardStats,
}

impl Shard {
    pub fn new(id: ShardId, ctx: ShardContext) -> Shard {
        let epoch = Instant::now();
        Shard {
            id,
            ctx,
            slots: Vec::new(),
            online: HashMap::new(),
            wheel: TimerWheel::new(TIMER_SLOTS, TIMER_TICK_MS, 0),
            dirty: Vec::new(),
            epoch,
            requests: Vec::new(),
            expired: Vec::new(),
            deliveries: Vec::new(),
            kicks_pending: Vec::new(),
            urgent: false,
            last_urgent_ms: 0,
            now_ms: 0,
            presence_conns: HashMap::new(),
            ephemeral_pending: Vec::new(),
            parked: HashMap::new(),
            writer_waiting: VecDeque::new(),
            uploads: HashMap::new(),
            next_upload_id: 0,
            preauth: preauth::PreAuth::default(),
            held_refusals: Vec::new(),
            tls_plaintext: Vec::new(),
            stats: ShardStats::default(),
        }
    }

    pub fn stats(&self) -> ShardStats {
        self.stats
    }

    fn now_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn idle_timeout_ms(&self) -> u64 {
        u64::from(self.ctx.session.heartbeat_interval_ms) * IDLE_TIMEOUT_INTERVAL_TENTHS / 10
    }

    fn conn_mut(&mut self, conn: ConnId) -> Option<&mut Conn> {
        let slot = self.slots.get_mut(conn.index as usize)?;
        if slot.generation != conn.generation {
            return None;
        }
        slot.conn.as_mut()
    }

    fn mark_dirty(&mut self, conn: ConnId) {
        self.output_over_bound(conn);
        // Linear scan is fine: the list holds the connections touched in one turn.
        if !self.dirty.contains(&conn) {
            self.dirty.push(conn);
        }
    }

    /// Whether `conn` holds more output than `CONNECTION_BACKLOG_MAX`; if so it is closed
    /// (once), without a frame, as a backlog overflow. Output builds up during a turn and
    /// the backend takes it only at the end, so without this check a burst of requests with
    /// large answers (a pipelined run of full sync pages: ~2,000 times its request) or of
    /// pushes could make one connection hold any amount of memory before the backlog check
    /// in `flush` saw it. With it, a connection holds at most the bound plus one frame here
    /// and the bound in the backend.
    fn output_over_bound(&mut self, conn_id: ConnId) -> bool {
        let Some(conn) = self.conn_mut(conn_id) else {
            return false;
        };
        if conn.output().len() <= CONNECTION_BACKLOG_MAX {
            return false;
        }
        if !conn.is_closing() {
            // A reader this slow loses its pushes; it resyncs from its timeline.
            conn.close_without_frame();
            self.stats.backlog_overflows += 1;
        }
        true
    }

    /// When `conn` must next hear from its peer.
    fn deadline_ms(&self, conn: &Conn) -> u64 {
        if conn.is_authenticated() {
            conn.last_rx_ms + self.idle_timeout_ms()
        } else {
            conn.opened_ms + HANDSHAKE_TIMEOUT_MS
        }
    }

    /// Forgets `conn`: directory, online map, counters. The caller closes or has closed
    /// the socket.
    fn forget(&mut self, conn_id: ConnId) -> Option<Conn> {
        let slot = self.slots.get_mut(conn_id.index as usize)?;
        if slot.generation != conn_id.generation {
            return None;
        }
        let conn = slot.conn.take()?;
        slot.tls = None;
        slot.close_after_flush = false;
        self.stats.connections -= 1;
        self.leave_preauth(conn_id);
        // The temp files stay: a later start of the same content resumes them.
        self.uploads.remove(&conn_id);
        if let Some(identity) = conn.identity() {
            self.ctx
                .directory
                .unregister(identity.user, self.id, conn_id);
            if let Some(conns) = self.online.get_mut(&identity.user) {
                conns.retain(|c| *c != conn_id);
                if conns.is_empty() {
                    self.online.remove(&identity.user);
                }
            }
            self.presence_forgotten(conn_id, identity.user);
        }
        Some(conn)
    }

    /// Takes `conn_id` out of the table of connections that have not logged in, if it is
    /// there (it logged in, closed, or was evicted).
    fn leave_preauth(&mut self, conn_id: ConnId) {
        let Some(slot) = self.slots.get_mut(conn_id.index as usize) else {
            return;
        };
        if slot.generation != conn_id.generation || !slot.preauth {
            return;
        }
        slot.preauth = false;
        self.stats.unauthenticated -= 1;
        self.preauth.left(slot.peer);
    }

    /// Makes room in a full table of connections that have not logged in: closes the one
    /// that has waited longest.
    fn evict_oldest_preauth(&mut self) {
        let slots = &self.slots;
        let Some(oldest) = self.preauth.oldest(|c| waiting_for_login(slots, c)) else {
            return;
        };
        self.stats.preauth_evictions += 1;
        if let Some(conn) = self.conn_mut(oldest) {
            conn.fail(
                0,
                ErrorCode::Timeout,
                "closed before login: too many connections are waiting to log in",
            );
        }
        self.leave_preauth(oldest);
        self.mark_dirty(oldest);
    }

    fn handle_requests(&mut self, conn_id: ConnId, now_ms: u64) {
        while !self.requests.is_empty() {
            let requests = std::mem::take(&mut self.requests);
            for request in requests {
                // Past its output bound the connection is closing: nothing more it asked
                // for is carried out.
                if !self.output_over_bound(conn_id) {
                    self.handle_request(conn_id, request, now_ms);
                }
            }
        }
    }

    fn handle_request(&mut self, conn_id: ConnId, request: Request, now_ms: u64) {
        if let Some(request) = self.park_until_applied(conn_id, request) {
            self.dispatch(conn_id, request, now_ms);
        }
    }

    /// A read of the user's timeline, history or conversation list while the writer has
    /// entries of that user that the derived tables do not show yet: asks the writer to
    /// apply them (`WriteOp::Flush`) and keeps the request in `parked` until the answer
    /// comes (`run_parked`). Returns the request back when it can run now. A full queue
    /// answers `busy` and drops the request: a read from a view that lacks acknowledged
    /// entries would tell a device it is up to date.
    fn park_until_applied(&mut self, conn_id: ConnId, request: Request) -> Option<Request> {
        if !matches!(
            request,
            Request::Sync { .. } | Request::History { .. } | Request::Conversations { .. }
        ) {
            return Some(request);
        }
        let Some(user) = self
            .conn_mut(conn_id)
            .and_then(|c| c.identity().map(|i| i.user))
        else {
            return Some(request);
        };
        if !self.ctx.store.derived_pending(user) {
            return Some(request);
        }
        let request_id = request_id_of(&request);
        let origin = Origin {
            shard: self.id,
            conn: conn_id,
            request_id,
        };
        // `submit` answers a refusal itself.
        if self.submit(conn_id, request_id, WriteOp::Flush { origin }) {
            self.stats.reads_parked += 1;
            self.parked.insert((conn_id, request_id), request);
        }
        None
    }

    /// The writer applied the journal for a parked read: carry it out now. The user may have
    /// new unapplied entries by now; those were committed after the flush and reach the
    /// device by push, so the read does not wait again.
    fn run_parked(&mut self, origin: Origin, now_ms: u64) {
        if let Some(conn) = self.conn_mut(origin.conn) {
            conn.inflight = conn.inflight.saturating_sub(1);
        }
        if let Some(request) = self.parked.remove(&(origin.conn, origin.request_id)) {
            self.dispatch(origin.conn, request, now_ms);
        }
    }

    /// Hands `op` to the writer, behind any op of this shard still waiting for room. A full
    /// writer queue keeps the op here (FIFO) to go out on a later turn; the op comes back
    /// only when this shard's waiting line is full too (`busy` to the client).
    pub(super) fn hand_to_writer(&mut self, op: WriteOp) -> Result<(), WriteOp> {
        if self.writer_waiting.is_empty() {
            match self.ctx.writer.try_submit(op) {
                Ok(()) => return Ok(()),
                Err(op) if self.writer_waiting.len() < SHARD_WRITER_WAITING_MAX => {
                    self.writer_waiting.push_back(op);
                    self.stats.writer_waits += 1;
                    return Ok(());
                }
                Err(op) => return Err(op),
            }
        }
        if self.writer_waiting.len() >= SHARD_WRITER_WAITING_MAX {
            return Err(op);
        }
        self.writer_waiting.push_back(op);
        Ok(())
    }

    /// Moves waiting ops into the writer's queue while it has room.
    fn drain_writer_waiting(&mut self) {
        while let Some(op) = self.writer_waiting.pop_front() {
            if let Err(op) = self.ctx.writer.try_submit(op) {
                self.writer_waiting.push_front(op);
                break;
            }
        }
    }

    fn dispatch(&mut self, conn_id: ConnId, request: Request, now_ms: u64) {
        match request {
            Request::Login {
                request_id,
                user,
                device,
                credential,
            } => self.login(conn_id, request_id, user, device, credential, now_ms),
            Request::Send {
                request_id,
                to,
                client_msg_id,
                text,
            } => self.send(conn_id, request_id, to, client_msg_id, text, now_ms),
            Request::Sync {
                request_id,
                after_seq,
                limit,
            } => self.sync(conn_id, request_id, after_seq, limit),
            Request::DeviceAck { up_to_seq } => {
                let Some(identity) = self.conn_mut(conn_id).and_then(|c| c.identity().cloned())
                else {
                    return;
                };
                // The cursor is advisory (the device keeps its own last seq), so a full writer
                // queue drops this one; the next ack carries a higher seq anyway.
                let _ = self.hand_to_writer(WriteOp::DeviceAck {
                    user: identity.user,
                    device: identity.device,
                    up_to_seq,
                });
            }
            other => {
                let unhandled = self
                    .handle_team_request(conn_id, other)
                    .and_then(|other| self.handle_account_request(conn_id, other))
                    .and_then(|other| self.handle_presence_request(conn_id, other, now_ms))
                    .and_then(|other| self.handle_file_request(conn_id, other));
                debug_assert!(unhandled.is_none(), "request without a handler");
            }
        }
    }

    fn kick(&mut self, shard: ShardId, conn: ConnId, why: KickWhy) {
        self.stats.kicks += 1;
        if shard == self.id {
            self.kick_here(conn, why);
        } else if let Err(ShardMsg::Kick { conn, why }) =
            self.ctx.mailboxes[shard.0 as usize].try_put(ShardMsg::Kick { conn, why })
        {
            self.kicks_pending.push((shard, conn, why));
        } else {
            self.ctx.mailboxes[shard.0 as usize].wake();
        }
    }

    fn kick_here(&mut self, conn: ConnId, why: KickWhy) {
        if let Some(c) = self.conn_mut(conn) {
            match why {
                KickWhy::Replaced => c.kick("another login replaced this device"),
                KickWhy::Revoked(message) => c.kick_with(ErrorCode::Revoked, message),
            }
            self.mark_dirty(conn);
        }
    }

    fn send(
        &mut self,
        conn_id: ConnId,
        request_id: u32,
        to: String,
        client_msg_id: u64,
        text: String,
        _now_ms: u64,
    ) {
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        let Some(identity) = conn.identity().cloned() else {
            return;
        };
        if conn.inflight >= CONNECTION_INFLIGHT_MAX {
            conn.reply_error(request_id, ErrorCode::Busy, "too many sends in flight");
            self.mark_dirty(conn_id);
            return;
        }
        let recipient = self
            .ctx
            .store
            .read()
            .and_then(|view| view.user_by_name(&to));
        let recipient = match recipient {
            Ok(Some(record)) => record,
            Ok(None) => {
                let conn = self.conn_mut(conn_id).expect("looked up above");
                conn.reply_error(request_id, ErrorCode::UnknownUser, "no such user");
                self.mark_dirty(conn_id);
                return;
            }
            Err(e) => {
                let conn = self.conn_mut(conn_id).expect("looked up above");
                conn.reply_error(request_id, ErrorCode::StorageFailed, &e.to_string());
                self.mark_dirty(conn_id);
                return;
            }
        };
        let op = WriteOp::Send {
            origin: Origin {
                shard: self.id,
                conn: conn_id,
                request_id,
            },
            from: identity.user,
            from_name: identity.name,
            to: recipient.id,
            to_name: recipient.name,
            client_msg_id,
            text,
            sent_at_ms: wall_clock_ms(),
        };
        let submitted = self.hand_to_writer(op);
        let conn = self.conn_mut(conn_id).expect("looked up above");
        match submitted {
            Ok(()) => conn.inflight += 1,
            Err(_) => {
                conn.reply_error(
                    request_id,
                    ErrorCode::Busy,
                    "store queue full; resend later",
                );
                self.mark_dirty(conn_id);
            }
        }
    }

    fn sync(&mut self, conn_id: ConnId, request_id: u32, after_seq: u64, limit: u32) {
        let store = self.ctx.store.clone();
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        let Some(user) = conn.identity().map(|i| i.user) else {
            return;
        };
        let limit = if limit == 0 {
            SYNC_PAGE_ENTRIES_MAX
        } else {
            limit.min(SYNC_PAGE_ENTRIES_MAX)
        };
        let result = store.read().and_then(|view| {
            let head_seq = view.head_seq(user)?;
            let mut entries = Vec::new();
            let has_more = view.timeline(
                user,
                after_seq,
                limit,
                SYNC_PAGE_BYTES_MAX,
                |seq, message| {
                    entries.push(EntryRef { seq, message });
                },
            )?;
            // The entries borrow the map; encode them before the read transaction ends.
            conn.reply_sync_page(
                request_id,
                &SyncPageRef {
                    entries,
                    head_seq,
                    has_more,
                },
            );
            Ok(())
        });
        if let Err(e) = result {
            conn.reply_error(request_id, ErrorCode::StorageFailed, &e.to_string());
        }
        self.mark_dirty(conn_id);
    }

    fn handle_mail(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Result(result) => {
                let (origin, outcome) = match result {
                    OpResult::SendAcked { origin, ack } => (origin, Ok(ack)),
                    OpResult::SendFailed { origin, code } => (origin, Err(code)),
                    OpResult::Answered { origin, reply } => {
                        if let Some(conn) = self.conn_mut(origin.conn) {
                            conn.inflight = conn.inflight.saturating_sub(1);
                        }
                        self.answer_reply(origin.conn, origin.request_id, reply);
                        return;
                    }
                    OpResult::Flushed { origin } => {
                        self.run_parked(origin, self.now_ms);
                        return;
                    }
                    OpResult::Refused {
                        origin,
                        code,
                        message,
                    } => {
                        if let Some(conn) = self.conn_mut(origin.conn) {
                            conn.inflight = conn.inflight.saturating_sub(1);
                            conn.reply_error(origin.request_id, code, message);
                            self.mark_dirty(origin.conn);
                        }
                        return;
                    }
                };
                // A failed flush is a parked read's: forget it whether or not the
                // connection is still here.
                let parked_read = outcome.is_err()
                    && self
                        .parked
                        .remove(&(origin.conn, origin.request_id))
                        .is_some();
                let Some(conn) = self.conn_mut(origin.conn) else {
                    return;
                };
                debug_assert!(conn.inflight > 0);
                conn.inflight = conn.inflight.saturating_sub(1);
                match outcome {
                    Ok(ack) => conn.reply_send_ack(origin.request_id, &ack),
                    // The flush a parked read waited for failed (a full disk or map): the
                    // derived tables may lack entries, so the read is refused, not served.
                    Err(code) if parked_read => {
                        let message = match code {
                            ErrorCode::StorageFull => {
                                "the node's store is full; this read needs a write first"
                            }
                            _ => "the store failed; this read needs a write first",
                        };
                        conn.reply_error(origin.request_id, code, message);
                    }
                    Err(code) => {
                        let message = match code {
                            ErrorCode::StorageFull => {
                                "the node's store is full; message not stored"
                            }
                            _ => "the store failed; message not stored",
                        };
                        conn.reply_error(origin.request_id, code, message);
                    }
                }
                self.mark_dirty(origin.conn);
            }
            ShardMsg::Deliver(delivery) => self.deliveries.push(delivery),
            ShardMsg::Login(verdict) => self.login_verified(verdict, self.now_ms),
            ShardMsg::Kick { conn, why } => self.kick_here(conn, why),
            msg @ (ShardMsg::Presence { .. } | ShardMsg::Typing { .. }) => {
                self.handle_ephemeral(msg)
            }
        }
    }

    /// Pushes the deliveries gathered this turn, one push frame per connection per run of
    /// entries for the same user.
    fn push_deliveries(&mut self) {
        let deliveries = std::mem::take(&mut self.deliveries);
        let mut start = 0;
        while start < deliveries.len() {
            let user = deliveries[start].user;
            let mut end = start + 1;
            let mut bytes = deliveries[start].message.len();
            while end < deliveries.len()
                && deliveries[end].user == user
                && end - start < SYNC_PAGE_ENTRIES_MAX as usize
                && bytes + deliveries[end].message.len() <= SYNC_PAGE_BYTES_MAX
            {
                bytes += deliveries[end].message.len();
                end += 1;
            }
            let conns = self.online.get(&user).cloned().unwrap_or_default();
            for conn_id in conns {
                let Some(conn) = self.conn_mut(conn_id) else {
                    continue;
                };
                let entries = deliveries[start..end]
                    .iter()
                    .map(|d| EntryRef {
                        seq: d.seq,
                        message: &d.message,
                    })
                    .collect();
                conn.push(entries);
                self.mark_dirty(conn_id);
            }
            start = end;
        }
        self.deliveries = deliveries;
        self.deliveries.clear();
    }
}

impl Shard {
    /// The session's bytes of `conn_id` (after TLS, where the connection has it).
    fn received_plain(&mut self, conn_id: ConnId, bytes: &[u8], now: Instant) {
        let now_ms = self.now_ms(now);
        let session = self.ctx.session.clone();
        let mut requests = std::mem::take(&mut self.requests);
        let Some(conn) = self.conn_mut(conn_id) else {
            return;
        };
        let heartbeat = conn.receive(bytes, now_ms, &session, &mut requests);
        let has_output = !conn.output().is_empty() || conn.is_closing();
        self.now_ms = now_ms;
        if !heartbeat {
            self.urgent = true;
        }
        self.requests = requests;
        self.handle_requests(conn_id, now_ms);
        if has_output {
            self.mark_dirty(conn_id);
        }
    }
}

impl Handler for Shard {
    fn accepted(
        &mut self,
        conn_id: ConnId,
        listener: ListenerIndex,
        peer: SocketAddr,
        now: Instant,
    ) -> bool {
        let kind = self.ctx.listeners[usize::from(listener.0)];
        let tls = match (kind, &self.ctx.tls) {
            (ListenerKind::Plain, _) => None,
            (ListenerKind::Tls, Some(config)) => match TlsLayer::server(config) {
                Ok(layer) => Some(Box::new(layer)),
                Err(e) => {
                    eprintln!("tern: tls connection refused: {e}");
                    return false;
                }
            },
            (ListenerKind::Tls, None) => unreachable!("a TLS listener without TLS settings"),
        };
        if self.stats.connections >= SHARD_CONNECTIONS_MAX
            || self.ctx.stop.load(Ordering::Relaxed)
            || self.preauth.address_full(peer.ip())
        {
            return false;
        }
        if self.stats.unauthenticated >= SHARD_UNAUTHENTICATED_MAX {
            self.evict_oldest_preauth();
        }
        let index = conn_id.index as usize;
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || Slot {
                generation: 0,
                conn: None,
                peer: std::net::IpAddr::from([0, 0, 0, 0]),
                preauth: false,
                tls: None,
                close_after_flush: false,
            });
        }
        let now_ms = self.now_ms(now);
        let slot = &mut self.slots[index];
        assert!(slot.conn.is_none(), "backend reused a live slot");
        slot.generation = conn_id.generation;
        slot.conn = Some(Conn::new(now_ms));
        slot.peer = peer.ip();
        slot.preauth = true;
        slot.tls = tls;
        slot.close_after_flush = false;
        self.stats.connections += 1;
        self.stats.unauthenticated += 1;
        let slots = &self.slots;
        self.preauth
            .admit(conn_id, peer.ip(), |c| waiting_for_login(slots, c));
        // One wheel entry per connection for its whole life. The first check comes no later
        // than either deadline it can have: the handshake's, or the idle timeout of a login
        // that completes at once. Later checks re-insert at the real deadline.
        self.wheel.insert(
            conn_id,
            now_ms + HANDSHAKE_TIMEOUT_MS.min(self.idle_timeout_ms()),
        );
        true
    }

    fn received(&mut self, conn_id: ConnId, bytes: &[u8], now: Instant) {
        let Some(slot) = self.slots.get_mut(conn_id.index as usize) else {
            return;
        };
        if slot.generation != conn_id.generation || slot.conn.is_none() {
            return;
        }
        let Some(tls) = slot.tls.as_mut() else {
            self.received_plain(conn_id, bytes, now);
            return;
        };
        let mut plaintext = std::mem::take(&mut self.tls_plaintext);
        plaintext.clear();
        let inbound = tls.receive(bytes, &mut plaintext);
        // Handshake flights, alerts and post-handshake tickets go out on this turn's flush.
        let wants_write = tls.wants_write();
        match inbound {
            Ok(Inbound::Open) => {}
            Ok(Inbound::PeerClosed) => slot.close_after_flush = true,
            Err(_) => {
                self.stats.tls_failures += 1;
                slot.close_after_flush = true;
            }
        }
        if wants_write || slot.close_after_flush {
            self.mark_dirty(conn_id);
        }
        if !plaintext.is_empty() {
            self.received_plain(conn_id, &plaintext, now);
        }
        if plaintext.capacity() > TLS_PLAINTEXT_KEEP_MAX {
            plaintext = Vec::new();
        }
        self.tls_plaintext = plaintext;
    }

    fn closed(&mut self, conn_id: ConnId) {
        self.forget(conn_id);
    }

    fn tick(&mut self, now: Instant) -> Option<Duration> {
        let now_ms = self.now_ms(now);
        self.now_ms = now_ms;
        for (shard, conn, why) in std::mem::take(&mut self.kicks_pending) {
            self.kick(shard, conn, why);
        }
        self.retry_ephemeral();
        self.drain_writer_waiting();
        let mailboxes = self.ctx.mailboxes.clone();
        let mailbox = &mailboxes[self.id.0 as usize];
        // Bounded: at most what was queued when the turn began, so a busy writer cannot
        // keep this loop from its sockets.
        for _ in 0..mailbox.len() {
            let Some(msg) = mailbox.take() else { break };
            self.urgent = true;
            self.handle_mail(msg);
        }
        self.push_deliveries();
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.advance(now_ms, &mut expired);
        for conn_id in expired.drain(..) {
            let Some(slot) = self.slots.get(conn_id.index as usize) else {
                continue;
            };
            if slot.generation != conn_id.generation {
                continue;
            }
            let Some(conn) = slot.conn.as_ref() else {
                continue;
            };
            let deadline = self.deadline_ms(conn);
            if deadline > now_ms {
                self.wheel.insert(conn_id, deadline);
                continue;
            }
            self.stats.timeouts += 1;
            self.urgent = true;
            let conn = self.conn_mut(conn_id).expect("checked above");
            let message = if conn.is_authenticated() {
                "idle timeout"
            } else {
                "handshake timeout"
            };
            conn.fail(0, ErrorCode::Timeout, message);
            self.mark_dirty(conn_id);
        }
        self.expired = expired;
        if self.ctx.stop.load(Ordering::Relaxed) {
            return Some(Duration::ZERO);
        }
        if !self.kicks_pending.is_empty()
            || !self.ephemeral_pending.is_empty()
            || !self.writer_waiting.is_empty()
        {
            return Some(Duration::from_millis(1));
        }
        let held_ms = self.answer_held_refusals(now_ms);
        let wheel_ms = self.wheel.timeout_ms(now_ms);
        match (held_ms, wheel_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
        .map(Duration::from_millis)
    }

    fn flush(&mut self, transmit: &mut dyn Transmit) {
        let stopping = self.ctx.stop.load(Ordering::Relaxed);
        if stopping {
            // Stop accepting and close everything once; clients reconnect elsewhere or later.
            for index in 0..self.slots.len() {
                let slot = &mut self.slots[index];
                let generation = slot.generation;
                if let Some(conn) = slot.conn.as_mut() {
                    conn.fail(0, ErrorCode::ShuttingDown, "node shutting down");
                    let conn_id = ConnId {
                        index: index as u32,
                        generation,
                    };
                    self.mark_dirty(conn_id);
                }
            }
        }
        for conn_id in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.slots.get_mut(conn_id.index as usize) else {
                continue;
            };
            if slot.generation != conn_id.generation {
                continue;
            }
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            let closing = conn.is_closing() || slot.close_after_flush;
            let backlog = match slot.tls.as_mut() {
                None => transmit.write(conn_id, conn.output()),
                Some(tls) => {
                    let plaintext = conn.output();
                    tls.send(plaintext);
                    // rustls holds its own copy now; an idle connection keeps no buffer.
                    *plaintext = Vec::new();
                    if closing {
                        tls.close();
                    }
                    let mut ciphertext = Vec::new();
                    tls.take_ciphertext(&mut ciphertext);
                    transmit.write(conn_id, &mut ciphertext)
                }
            };
            if closing {
                self.forget(conn_id);
                transmit.close(conn_id);
            } else if backlog > CONNECTION_BACKLOG_MAX {
                // A reader this slow loses its pushes; it resyncs from its timeline.
                self.stats.backlog_overflows += 1;
                self.forget(conn_id);
                transmit.close(conn_id);
            }
        }
    }

    fn should_stop(&self) -> bool {
        self.ctx.stop.load(Ordering::Relaxed) && self.stats.connections == 0
    }

    fn heartbeats_only(&mut self) -> bool {
        // Timeouts and kicks count as urgent too: they are rare and must not wait.
        if self.urgent || !self.kicks_pending.is_empty() {
            self.last_urgent_ms = self.now_ms;
        }
        self.urgent = false;
        // Coalesce only in a quiet spell without message traffic: while messages flow, no
        // wait is stretched.
        self.ctx.heartbeat_coalescing
            && self.now_ms.saturating_sub(self.last_urgent_ms) >= HEARTBEAT_COALESCE_QUIET_MS
    }
}

/// Capacity the shard's TLS plaintext buffer keeps between calls: one record's worth. A
/// larger one (a burst of records in one read) is freed after use.
const TLS_PLAINTEXT_KEEP_MAX: usize = 16 * 1024;

/// The request id of a request that has one (every request but `DeviceAck`, which is
/// never parked).
fn request_id_of(request: &Request) -> u32 {
    match request {
        Request::Sync { request_id, .. }
        | Request::History { request_id, .. }
        | Request::Conversations { request_id, .. } => *request_id,
        _ => unreachable!("only reads of derived state are parked"),
    }
}

/// Whether `conn` is in its shard's table of connections that have not logged in.
fn waiting_for_login(slots: &[Slot], conn: ConnId) -> bool {
    slots
        .get(conn.index as usize)
        .is_some_and(|slot| slot.generation == conn.generation && slot.preauth)
}

/// The answer to a request the store could not serve: `storage_full` when the map or the
/// disk is full (the operator can make room), else `storage_failed`.
fn storage_failed(e: crate::storage::StoreError) -> (ErrorCode, String) {
    let code = if e.is_full() {
        ErrorCode::StorageFull
    } else {
        ErrorCode::StorageFailed
    };
    (code, e.to_string())
}

/// Wall-clock milliseconds since the Unix epoch, for message times and token expiry.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
