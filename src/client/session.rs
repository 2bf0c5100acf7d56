//! One device's side of the protocol as a sans-IO state machine.
//!
//! `ClientSession` takes what happened (a connection came up or failed, bytes arrived, the
//! connection closed, time passed) with the current `Instant`, and answers with bytes to
//! write (`take_transmit`), socket actions (`poll_action`: connect, disconnect), events for
//! the app (`poll_event`) and the next instant it wants to be woken (`next_timeout`). It
//! never touches a socket, a file or the clock, and its only randomness is a PRNG seeded
//! from the config, so a test replays any scenario exactly.
//!
//! What it does on its own: hello and login (token first, the password once if the token is
//! refused), heartbeats, per-request timeouts, reconnect with jittered exponential backoff,
//! timeline sync with gap detection (entries are delivered strictly in seq order, a gap is
//! refetched, never skipped), device acks after the store committed, and the outbox:
//! every send stays in it, and is resent with the same `client_msg_id` after a reconnect,
//! until the node acknowledges it durably.
//!
//! It must not trust the node: every frame is validated (rkyv checked access) before a field
//! is read, and a malformed or unexpected frame ends the connection (then a reconnect), never
//! the process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::store::{ClientStore, MemoryStore, OutboxItem};
use super::team::{self, TeamAnswer};
use super::{
    BACKOFF_BASE_MS_DEFAULT, BACKOFF_MAX_MS_DEFAULT, BUSY_RETRY_MS_DEFAULT,
    CONNECT_TIMEOUT_MS_DEFAULT, HEARTBEAT_INTERVAL_MS_MIN, OUTBOX_MAX,
    RECONNECT_ATTEMPTS_MAX_DEFAULT, REQUEST_TIMEOUT_MS_DEFAULT, SENDS_IN_FLIGHT_MAX,
    SYNC_PAGE_LIMIT_DEFAULT,
};
use crate::limits::{
    CLIENT_NAME_SIZE_MAX, DEVICE_NAME_SIZE_MAX, MESSAGE_TEXT_SIZE_MAX, PASSWORD_SIZE_MAX,
    TOKEN_SIZE_MAX, USER_NAME_SIZE_MAX,
};
use crate::protocol::{
    self, ArchivedEntry, ArchivedErrorBody, ArchivedHelloOk, ArchivedKicked, ArchivedLoginOk,
    ArchivedMessage, ArchivedPong, ArchivedPush, ArchivedRecord, ArchivedSendAck, ArchivedSyncPage,
    Credential, DeviceAck, ErrorCode, FrameHeader, FrameReader, Hello, Kind, Login,
    PROTOCOL_VERSION, Ping,
};

/// Everything a session needs to know before it starts.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub user: String,
    /// Names this device within the account. A second login of the same user and device
    /// kicks the first.
    pub device: String,
    /// Used at the first login, and again if a token is refused.
    pub password: Option<String>,
    /// A token from an earlier `LoginOk`, presented instead of the password.
    pub token: Option<String>,
    /// Sent in `Hello`, for the node's logs. Cut to `CLIENT_NAME_SIZE_MAX` bytes.
    pub client_name: String,
    /// How long any request (hello, login, send, sync, ping) may wait for its answer before
    /// the session gives up on the connection and reconnects.
    pub request_timeout: Duration,
    /// How long the driver may take to open the connection asked for by `Action::Connect`.
    /// Past it the session asks for `Action::Disconnect` and counts a failed attempt, then
    /// retries after backoff: on a network that drops packets without a word, the kernel
    /// retries a connect for minutes, at ever longer intervals, and would notice the
    /// network's return only at its next retry.
    pub connect_timeout: Duration,
    /// Consecutive failed connection attempts (connect, hello or login failed) before the
    /// session gives up with `Event::Offline`. A successful login resets the count.
    pub reconnect_attempts_max: u32,
    /// Backoff before reconnect attempt n is drawn from [d/2, d] with
    /// d = min(backoff_max, backoff_base × 2^(n-1)); after losing an established
    /// connection, from [0, backoff_base).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How long the outbox pauses after the node answered a send with `busy`.
    pub busy_retry: Duration,
    /// Seeds the PRNG behind client message ids, ping nonces and backoff jitter. Must differ
    /// between devices and between restarts of one device, or client message ids collide
    /// and the node takes a new message for a resend of an old one. `ClientConfig::new`
    /// draws it from the operating system; tests set it.
    pub seed: u64,
    /// `Sync.limit`: entries per sync page; 0 asks for the node's maximum.
    pub sync_page_limit: u32,
    /// Ping at this interval instead of the one the node announces in `HelloOk` (a load
    /// generator models phones that ping less often). The node closes a connection silent
    /// for 2.5 of its own intervals, so a longer interval than the node's only works against
    /// a node configured for it.
    pub heartbeat_interval: Option<Duration>,
}

impl ClientConfig {
    /// Defaults from `client::*_DEFAULT`, no credentials, and a seed from the OS.
    pub fn new(user: impl Into<String>, device: impl Into<String>) -> ClientConfig {
        ClientConfig {
            user: user.into(),
            device: device.into(),
            password: None,
            token: None,
            client_name: concat!("tern-client/", env!("CARGO_PKG_VERSION")).to_owned(),
            request_timeout: Duration::from_millis(REQUEST_TIMEOUT_MS_DEFAULT),
            connect_timeout: Duration::from_millis(CONNECT_TIMEOUT_MS_DEFAULT),
            reconnect_attempts_max: RECONNECT_ATTEMPTS_MAX_DEFAULT,
            backoff_base: Duration::from_millis(BACKOFF_BASE_MS_DEFAULT),
            backoff_max: Duration::from_millis(BACKOFF_MAX_MS_DEFAULT),
            busy_retry: Duration::from_millis(BUSY_RETRY_MS_DEFAULT),
            seed: os_seed(),
            sync_page_limit: SYNC_PAGE_LIMIT_DEFAULT,
            heartbeat_interval: None,
        }
    }

    pub fn with_password(mut self, password: impl Into<String>) -> ClientConfig {
        self.password = Some(password.into());
        self
    }

    pub fn with_token(mut self, token: impl Into<String>) -> ClientConfig {
        self.token = Some(token.into());
        self
    }

    pub fn with_seed(mut self, seed: u64) -> ClientConfig {
        self.seed = seed;
        self
    }
}

/// A seed that differs between processes and calls: the OS's randomness, or if that is
/// unavailable, the time mixed with the process id and a counter.
fn os_seed() -> u64 {
    if let Ok(seed) = getrandom::u64() {
        return seed;
    }
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut mix = SplitMix64(nanos ^ (u64::from(std::process::id()) << 32) ^ calls);
    mix.next_u64()
}

/// What the driver must do with the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a connection to the node, then report `connected` or `connect_failed`.
    Connect,
    /// Close the connection. The session already considers it gone: bytes still arriving
    /// on it must be dropped, and `closed` need not be reported for it.
    Disconnect,
}

/// A timeline entry this device received, decoded from the node's archived `Message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// Position in this user's timeline.
    pub seq: u64,
    pub msg_id: u64,
    pub from_id: u64,
    pub from: String,
    pub to_id: u64,
    pub to: String,
    pub client_msg_id: u64,
    pub sent_at_ms: u64,
    pub text: String,
    /// Set when the entry is a record (group message, membership change, read mark) rather
    /// than a 1:1 message. Then `to_id` is the record's conversation id and `to` is empty.
    pub record: Option<EntryRecord>,
}

/// The fields of a timeline record that a 1:1 message does not have (`protocol::Record`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    /// `protocol::record_kind`.
    pub kind: u16,
    /// Conversation id (`protocol::group_conv` for groups).
    pub conv: u64,
    /// Members added or removed, or the initial members of a created group.
    pub users: Vec<u64>,
    /// For a read mark or a delivery receipt: the last msg id it covers.
    pub up_to: u64,
    /// For a file message: the file it carries.
    pub attachment: Option<protocol::Attachment>,
}

impl ReceivedMessage {
    /// The group this entry belongs to, if any.
    pub fn group_id(&self) -> Option<u64> {
        self.record
            .as_ref()
            .and_then(|r| protocol::conv_group(r.conv))
    }

    /// Whether this is a message (1:1, group, or carrying a file) rather than a
    /// membership change, a read mark or a receipt.
    pub fn is_message(&self) -> bool {
        self.record.as_ref().is_none_or(|r| {
            matches!(
                r.kind,
                protocol::record_kind::GROUP_MESSAGE | protocol::record_kind::FILE_MESSAGE
            )
        })
    }
}

/// What happened, for the app. Codes are `ErrorCode` numbers (`ErrorCode::from_u16`); they
/// stay raw because a newer node may send codes this build does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The transport is up; hello and login follow.
    Connected,
    /// Connection attempt `attempt` (consecutive, from 1) failed before login completed.
    /// Without `will_retry`, `Offline` follows.
    ConnectFailed { attempt: u32, will_retry: bool },
    /// An established connection was lost; the session reconnects on its own.
    Disconnected { reason: &'static str },
    /// Logged in.
    AuthOk { user_id: u64, head_seq: u64 },
    /// The node refused the credentials (or none were configured). `Offline` follows.
    AuthFailed { code: u16, message: String },
    /// The node reported an error that ends the connection (shutdown, timeout, a refused
    /// hello, a failed sync). The session reconnects unless it says `Offline` next.
    NodeError { code: u16, message: String },
    /// The next entry of the timeline, already in the store. Delivered in seq order only.
    Message(ReceivedMessage),
    /// The node stored the message durably.
    SendAcked {
        client_msg_id: u64,
        msg_id: u64,
        seq: u64,
        duplicate: bool,
    },
    /// The node refused the message for good; it left the outbox.
    SendFailed {
        client_msg_id: u64,
        code: u16,
        message: String,
    },
    /// Another login of this device replaced this one. `Offline` follows, and the session
    /// does not reconnect (two copies would keep kicking each other).
    Kicked { code: u16, message: String },
    /// The session stopped trying; `connect` starts it again.
    Offline,
    /// A sync run (the one after login, or one that filled a gap) reached the timeline's end.
    SyncDone { head_seq: u64 },
    /// A ping was answered.
    Pong { rtt: Duration },
    /// A page of a timeline read started with `fetch_timeline`. These entries bypass the
    /// store and `last_seq`.
    TimelinePage {
        request_id: u32,
        after_seq: u64,
        entries: Vec<ReceivedMessage>,
        head_seq: u64,
        has_more: bool,
    },
    /// The answer to a team request (groups, history, conversations, read marks; see
    /// `client::team`), or its refusal.
    Team { request_id: u32, answer: TeamAnswer },
    /// A watched user came online or went offline (`ClientSession::presence_subscribe`).
    /// Of two events about one user, the higher `version` is the newer.
    Presence {
        user_id: u64,
        online: bool,
        version: u64,
    },
    /// `from` is typing in conversation `conv`. Ephemeral: never in the timeline.
    Typing {
        conv: u64,
        from_id: u64,
        from: String,
    },
}

/// Receives every event a driver takes from the session, in order.
pub trait Listener {
    fn on_event(&mut self, event: &Event);
}

impl<F: FnMut(&Event)> Listener for F {
    fn on_event(&mut self, event: &Event) {
        self(event)
    }
}

/// Why `send` refused a message before it reached the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The text is longer than `MESSAGE_TEXT_SIZE_MAX` bytes.
    TooLarge { len: usize },
    /// The recipient name is empty or longer than `USER_NAME_SIZE_MAX` bytes.
    InvalidRecipient,
    /// `OUTBOX_MAX` sends are waiting for their acks.
    OutboxFull,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::TooLarge { len } => {
                write!(f, "text of {len} bytes is over {MESSAGE_TEXT_SIZE_MAX}")
            }
            SendError::InvalidRecipient => write!(f, "recipient name empty or too long"),
            SendError::OutboxFull => write!(f, "outbox full ({OUTBOX_MAX} unacknowledged sends)"),
        }
    }
}

impl std::error::Error for SendError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Not started, or closed by the app.
    Idle,
    /// `Action::Connect` was issued; waiting for `connected` or `connect_failed` until
    /// `deadline` (`ClientConfig::connect_timeout`).
    Connecting {
        deadline: Instant,
    },
    AwaitHelloOk,
    AwaitLoginOk,
    Established,
    /// Backing off before the next connection attempt.
    Waiting {
        until: Instant,
    },
    /// Gave up: too many failures, credentials refused, or kicked.
    Offline,
}

impl Phase {
    fn has_connection(self) -> bool {
        matches!(
            self,
            Phase::AwaitHelloOk | Phase::AwaitLoginOk | Phase::Established
        )
    }
}

/// What a request in flight was, to interpret its answer.
#[derive(Debug, Clone, Copy)]
enum Request {
    Hello,
    Login {
        with_token: bool,
    },
    Ping {
        nonce: u64,
        sent_at: Instant,
    },
    /// `order` keys the outbox.
    Send {
        order: u64,
    },
    Sync,
    Fetch {
        after_seq: u64,
    },
    /// A team request (`client::team`); its answer becomes `Event::Team`.
    Team,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    deadline: Instant,
    request: Request,
}

/// One outbox entry.
#[derive(Debug)]
struct Outgoing {
    item: OutboxItem,
    /// The request id of the `Send` on the current connection; None while it waits.
    in_flight: Option<u32>,
}

/// The sync run of the current connection. At most one `Sync` is in flight.
#[derive(Debug, Default)]
struct SyncState {
    in_flight: Option<u32>,
    /// `last_seq` when the request in flight was sent, to tell whether a page made progress.
    start_seq: u64,
    /// A push showed a gap while a sync was in flight: sync again when the run ends, if
    /// `gap_seq` is still beyond `last_seq`.
    rerun: bool,
    /// Highest seq seen beyond a gap.
    gap_seq: u64,
}

/// What to do after a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    /// Reconnect with backoff, or give up after too many failures.
    Retry,
    /// Reconnect at once without counting a failure (a refused token, retried with the
    /// password).
    RetryNow,
    Offline,
}

/// SplitMix64: small, seedable, good enough for jitter and ids. Not for secrets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi] (hi below lo counts as lo).
    fn duration_between(&mut self, lo: Duration, hi: Duration) -> Duration {
        let span = hi
            .saturating_sub(lo)
            .as_nanos()
            .min(u128::from(u64::MAX - 1)) as u64;
        lo + Duration::from_nanos(self.next_u64() % (span + 1))
    }
}

/// The client side of one device. `S` keeps the durable state.
pub struct ClientSession<S: ClientStore = MemoryStore> {
    config: ClientConfig,
    store: S,
    phase: Phase,
    /// Bumped whenever a connection ends, so a frame loop notices that the frame it just
    /// handled ended the connection it was reading.
    conn_generation: u64,
    reader: FrameReader,
    /// Bytes for the current connection not yet taken by the driver. Cleared when the
    /// connection ends: nothing meant for one connection goes out on the next.
    tx: Vec<u8>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    rng: SplitMix64,
    request_id_last: u32,
    /// Requests of the current connection awaiting an answer. Bounded by
    /// `SENDS_IN_FLIGHT_MAX` sends plus one each of hello, login, ping, sync and fetch.
    pending: HashMap<u32, Pending>,
    token: Option<String>,
    user_id: Option<u64>,
    /// Mirrors `store.last_seq()`.
    last_seq: u64,
    /// Highest `up_to_seq` the node has from this device on this connection.
    acked_seq_sent: u64,
    sync: SyncState,
    fetch_in_flight: Option<u32>,
    heartbeat_interval: Option<Duration>,
    ping_at: Option<Instant>,
    ping_in_flight: Option<u32>,
    rtt_last: Option<Duration>,
    /// Consecutive connection attempts that failed before login.
    failures: u32,
    /// Unacknowledged sends in the order they were made, keyed by a local counter. Mirrors
    /// the store's outbox.
    outbox: BTreeMap<u64, Outgoing>,
    outbox_order_next: u64,
    /// Entries of `outbox` with `in_flight` set. At most `SENDS_IN_FLIGHT_MAX`.
    sends_in_flight: usize,
    /// No sends go out before this instant (the node said `busy`).
    outbox_paused_until: Option<Instant>,
    /// Sends the node answered with `busy` since the session was made (each was retried).
    busy_answers: u64,
    /// High 32 bits of client message ids, nonzero; the low 32 bits count.
    msg_id_prefix: u64,
    msg_id_counter: u32,
}

impl<S: ClientStore> std::fmt::Debug for ClientSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("user", &self.config.user)
            .field("device", &self.config.device)
            .field("phase", &self.phase)
            .field("last_seq", &self.last_seq)
            .field("pending", &self.pending.len())
            .field("outbox", &self.outbox.len())
            .finish_non_exhaustive()
    }
}

impl<S: ClientStore> ClientSession<S> {
    /// A session that has not connected yet; `connect` starts it. Sends left in the store's
    /// outbox by an earlier run are taken up and resent after the first login.
    pub fn new(config: ClientConfig, store: S) -> ClientSession<S> {
        let mut rng = SplitMix64(config.seed);
        let msg_id_prefix = fresh_prefix(&mut rng);
        let token = config.token.clone().filter(|t| token_is_usable(t));
        let last_seq = store.last_seq();
        let mut session = ClientSession {
            config,
            store,
            phase: Phase::Idle,
            conn_generation: 0,
            reader: FrameReader::new(),
            tx: Vec::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            rng,
            request_id_last: 0,
            pending: HashMap::new(),
            token,
            user_id: None,
            last_seq,
            acked_seq_sent: 0,
            sync: SyncState::default(),
            fetch_in_flight: None,
            heartbeat_interval: None,
            ping_at: None,
            ping_in_flight: None,
            rtt_last: None,
            failures: 0,
            outbox: BTreeMap::new(),
            outbox_order_next: 0,
            sends_in_flight: 0,
            outbox_paused_until: None,
            busy_answers: 0,
            msg_id_prefix,
            msg_id_counter: 0,
        };
        for item in session.store.outbox_list() {
            // A persisted send that could never be encoded would fail on every connection.
            let refusal = if item.client_msg_id == 0 {
                Some("client message id 0".to_owned())
            } else {
                check_send(&item.to, &item.text)
                    .err()
                    .map(|err| err.to_string())
            };
            match refusal {
                Some(why) => {
                    session.store.outbox_remove(item.client_msg_id);
                    session.events.push_back(Event::SendFailed {
                        client_msg_id: item.client_msg_id,
                        code: ErrorCode::InvalidArgument as u16,
                        message: format!("stored send refused: {why}"),
                    });
                }
                None => session.outbox_insert(item),
            }
        }
        session
    }

    // ----- inputs -----------------------------------------------------------------------

    /// Starts connecting (from idle or offline, resetting the failure count), or skips the
    /// rest of a backoff wait. Does nothing while a connection is up or being opened.
    pub fn connect(&mut self, now: Instant) {
        match self.phase {
            Phase::Idle | Phase::Offline | Phase::Waiting { .. } => {
                if !matches!(self.phase, Phase::Waiting { .. }) {
                    self.failures = 0;
                }
                self.start_connecting(now);
            }
            Phase::Connecting { .. }
            | Phase::AwaitHelloOk
            | Phase::AwaitLoginOk
            | Phase::Established => {}
        }
    }

    /// Stops the session for good (until `connect`): closes any connection, stops
    /// reconnecting. The outbox is kept. No event.
    pub fn close(&mut self, _now: Instant) {
        if self.phase.has_connection() || self.is_connecting() {
            self.actions.push_back(Action::Disconnect);
        }
        self.reset_connection();
        self.phase = Phase::Idle;
    }

    /// The connection asked for by `Action::Connect` is up.
    pub fn connected(&mut self, now: Instant) {
        if !self.is_connecting() {
            return;
        }
        self.phase = Phase::AwaitHelloOk;
        self.events.push_back(Event::Connected);
        let request_id = self.request(now, Request::Hello);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            client: truncate_str(&self.config.client_name, CLIENT_NAME_SIZE_MAX).to_owned(),
        };
        protocol::encode(&mut self.tx, Kind::Hello, request_id, &hello);
    }

    /// The connection asked for by `Action::Connect` could not be opened.
    pub fn connect_failed(&mut self, now: Instant) {
        if !self.is_connecting() {
            return;
        }
        self.end_connection(now, false, "connect failed", After::Retry);
    }

    /// The connection was closed by the node or the network (EOF, reset, write error).
    pub fn closed(&mut self, now: Instant) {
        if !(self.phase.has_connection() || self.is_connecting()) {
            return;
        }
        self.end_connection(now, false, "connection closed", After::Retry);
    }

    /// Bytes read from the connection. Bytes arriving when no connection is up (after
    /// `Action::Disconnect`) are dropped.
    pub fn received(&mut self, bytes: &[u8], now: Instant) {
        if !self.phase.has_connection() {
            return;
        }
        let generation = self.conn_generation;
        // The reader is lent out so frames can be handled with `&mut self`; a handler that
        // ends the connection makes the reader stop, and the connection's fresh reader stays.
        let mut reader = std::mem::take(&mut self.reader);
        let fed = reader.feed(bytes, |header, payload| {
            self.on_frame(header, payload, now);
            self.conn_generation == generation
        });
        if self.conn_generation == generation {
            self.reader = reader;
            if fed.is_err() {
                self.end_connection(now, true, "malformed frame from node", After::Retry);
            }
        }
        self.after_input(now);
    }

    /// Time passed: reconnect after backoff, connect and request timeouts, heartbeats, the
    /// end of a `busy` pause. Call it when `next_timeout` is reached (calling it early is
    /// harmless).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::Waiting { until } => {
                if now >= until {
                    self.start_connecting(now);
                }
                return;
            }
            Phase::Connecting { deadline } => {
                if now >= deadline {
                    self.end_connection(now, true, "connect timed out", After::Retry);
                }
                return;
            }
            _ => {}
        }
        if !self.phase.has_connection() {
            return;
        }
        if self.pending.values().any(|p| p.deadline <= now) {
            self.end_connection(now, true, "request timed out", After::Retry);
            return;
        }
        if let (Some(at), Some(interval)) = (self.ping_at, self.heartbeat_interval)
            && now >= at
        {
            // Only an established connection pings; during login the handshake requests
            // carry their own timeouts. A ping still in flight is enough: its timeout
            // catches a dead connection.
            if self.phase == Phase::Established && self.ping_in_flight.is_none() {
                self.send_ping(now);
            }
            self.ping_at = Some(now + interval);
        }
        if self.outbox_paused_until.is_some_and(|until| now >= until) {
            self.outbox_paused_until = None;
        }
        self.after_input(now);
    }

    // ----- app requests -----------------------------------------------------------------

    /// Queues a 1:1 message and returns its client message id. It goes out at once when
    /// the session is established, otherwise after the next login, and stays in the outbox
    /// (and the store's) until `SendAcked` or `SendFailed`.
    pub fn send(&mut self, to: &str, text: &str, now: Instant) -> Result<u64, SendError> {
        check_send(to, text)?;
        if self.outbox.len() >= OUTBOX_MAX {
            return Err(SendError::OutboxFull);
        }
        let client_msg_id = self.next_client_msg_id();
        let item = OutboxItem {
            client_msg_id,
            to: to.to_owned(),
            text: text.to_owned(),
        };
        self.store.outbox_put(&item);
        self.outbox_insert(item);
        self.pump_outbox(now);
        Ok(client_msg_id)
    }

    /// Starts a sync run from `last_seq` now (the answer ends in `Event::SyncDone`), as a
    /// device does when the app comes to the foreground. False when not established or
    /// when a sync run is already in flight (its `SyncDone` will follow).
    pub fn sync_now(&mut self, now: Instant) -> bool {
        if self.phase != Phase::Established || self.sync.in_flight.is_some() {
            return false;
        }
        self.start_sync(now);
        true
    }

    /// Reads the timeline after `after_seq` (one page; the answer is `Event::TimelinePage`
    /// with this request id), independently of `last_seq` and without storing anything.
    /// None when not established or when a fetch is already in flight.
    pub fn fetch_timeline(&mut self, after_seq: u64, now: Instant) -> Option<u32> {
        if self.phase != Phase::Established || self.fetch_in_flight.is_some() {
            return None;
        }
        let request_id = self.request(now, Request::Fetch { after_seq });
        let sync = protocol::Sync {
            after_seq,
            limit: self.config.sync_page_limit,
        };
        protocol::encode(&mut self.tx, Kind::Sync, request_id, &sync);
        self.fetch_in_flight = Some(request_id);
        Some(request_id)
    }

    /// Sends a team request encoded by `write` (given the request id); its answer arrives
    /// as `Event::Team` with the returned id. None when not established.
    pub(super) fn team_request(
        &mut self,
        now: Instant,
        write: impl FnOnce(&mut Vec<u8>, u32),
    ) -> Option<u32> {
        if self.phase != Phase::Established {
            return None;
        }
        let request_id = self.request(now, Request::Team);
        write(&mut self.tx, request_id);
        Some(request_id)
    }

    /// Writes a frame that has no answer but may be refused (a typing indicator). It gets
    /// a request id of its own that nothing waits for, so a refusal is dropped rather than
    /// taken for a connection-level error. False when not established.
    pub(super) fn fire_and_forget(&mut self, write: impl FnOnce(&mut Vec<u8>, u32)) -> bool {
        if self.phase != Phase::Established {
            return false;
        }
        let request_id = loop {
            self.request_id_last = self.request_id_last.wrapping_add(1);
            let id = self.request_id_last;
            if id != 0 && !self.pending.contains_key(&id) {
                break id;
            }
        };
        write(&mut self.tx, request_id);
        true
    }

    /// A fresh client message id, for sends outside the outbox (group sends).
    pub(super) fn fresh_client_msg_id(&mut self) -> u64 {
        self.next_client_msg_id()
    }

    // ----- outputs ----------------------------------------------------------------------

    /// Appends the bytes to write to the connection to `out`.
    pub fn take_transmit(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tx);
        self.tx.clear();
    }

    /// Bytes waiting for `take_transmit`.
    pub fn transmit_len(&self) -> usize {
        self.tx.len()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should be called next; None when nothing is scheduled (idle,
    /// offline).
    pub fn next_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Waiting { until } => Some(until),
            Phase::Connecting { deadline } => Some(deadline),
            Phase::AwaitHelloOk | Phase::AwaitLoginOk | Phase::Established => {
                let deadlines = self.pending.values().map(|p| p.deadline);
                deadlines
                    .chain(self.ping_at)
                    .chain(self.outbox_paused_until)
                    .min()
            }
            Phase::Idle | Phase::Offline => None,
        }
    }

    // ----- getters ----------------------------------------------------------------------

    /// Highest seq such that every entry up to it is stored.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Gave up (too many failures, refused credentials, kicked) or never started / closed.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Offline)
    }

    /// Sends not yet acknowledged by the node.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// How many times the node answered a send of this session with `busy` (counted per
    /// answer: a send refused twice counts twice). `busy` is not a failure and raises no
    /// event; the send is retried after `ClientConfig::busy_retry`. For load generators and
    /// diagnostics.
    pub fn busy_answers(&self) -> u64 {
        self.busy_answers
    }

    /// The token of the latest login, to present next time instead of the password.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn user_id(&self) -> Option<u64> {
        self.user_id
    }

    /// Round trip of the latest answered ping.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt_last
    }

    /// Whether the request with this id still awaits its answer on the current connection
    /// (false once answered or once the connection it was sent on ended).
    pub fn is_request_pending(&self, request_id: u32) -> bool {
        self.pending.contains_key(&request_id)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    // ----- frames -----------------------------------------------------------------------

    fn on_frame(&mut self, header: FrameHeader, payload: &[u8], now: Instant) {
        match header.kind {
            Kind::HelloOk
            | Kind::LoginOk
            | Kind::Pong
            | Kind::SendAck
            | Kind::SyncPage
            | Kind::GroupInfo
            | Kind::GroupListPage
            | Kind::HistoryPage
            | Kind::ConversationsPage
            | Kind::ReadOk
            | Kind::PresenceState
            | Kind::UploadReady
            | Kind::UploadAck
            | Kind::FileInfo
            | Kind::FileChunk
            | Kind::DevicesPage => self.on_response(header, payload, now),
            Kind::PresencePush | Kind::TypingPush => {
                match team::decode_push(header.kind, payload) {
                    Some(event) => self.events.push_back(event),
                    None => self.peer_fault(now, "malformed presence or typing push"),
                }
            }
            Kind::Error if header.request_id != 0 => self.on_response(header, payload, now),
            Kind::Error => self.on_connection_error(payload, now),
            Kind::Push => self.on_push(payload, now),
            Kind::Kicked => self.on_kicked(payload, now),
            Kind::Hello
            | Kind::Login
            | Kind::Ping
            | Kind::Send
            | Kind::Sync
            | Kind::DeviceAck
            | Kind::GroupOp
            | Kind::GroupQuery
            | Kind::GroupList
            | Kind::GroupSend
            | Kind::History
            | Kind::Conversations
            | Kind::Read
            | Kind::PresenceSubscribe
            | Kind::PresenceQuery
            | Kind::Typing
            | Kind::UploadStart
            | Kind::UploadChunk
            | Kind::UploadFinish
            | Kind::FileSend
            | Kind::Download
            | Kind::Logout
            | Kind::ChangePassword
            | Kind::Devices => self.peer_fault(now, "client-only frame kind from node"),
        }
    }

    fn on_response(&mut self, header: FrameHeader, payload: &[u8], now: Instant) {
        // An answer nobody waits for (its request is gone) is dropped: it cannot change
        // anything the session already decided.
        let Some(pending) = self.pending.remove(&header.request_id) else {
            return;
        };
        match (pending.request, header.kind) {
            (Request::Hello, Kind::HelloOk) => self.on_hello_ok(payload, now),
            (Request::Login { .. }, Kind::LoginOk) => self.on_login_ok(payload, now),
            (Request::Ping { nonce, sent_at }, Kind::Pong) => {
                self.on_pong(nonce, sent_at, payload, now)
            }
            (Request::Send { order }, Kind::SendAck) => self.on_send_ack(order, payload, now),
            (Request::Sync, Kind::SyncPage) => self.on_sync_page(payload, now),
            (Request::Fetch { after_seq }, Kind::SyncPage) => {
                self.on_fetch_page(header.request_id, after_seq, payload, now)
            }
            (Request::Team, kind) => match team::decode_answer(kind, payload) {
                Some(answer) => {
                    let closes = matches!(
                        &answer,
                        TeamAnswer::Failed { code, .. }
                            if ErrorCode::from_u16(*code).is_some_and(ErrorCode::closes_connection)
                    );
                    self.events.push_back(Event::Team {
                        request_id: header.request_id,
                        answer,
                    });
                    if closes {
                        self.end_connection(now, true, "node closed the connection", After::Retry);
                    }
                }
                None => self.peer_fault(now, "malformed answer to a team request"),
            },
            (request, Kind::Error) => self.on_error_response(request, payload, now),
            _ => self.peer_fault(now, "answer of the wrong kind"),
        }
    }

    fn on_hello_ok(&mut self, payload: &[u8], now: Instant) {
        let Ok(ok) = protocol::access::<ArchivedHelloOk>(Kind::HelloOk, payload) else {
            return self.peer_fault(now, "malformed HelloOk");
        };
        if ok.protocol_version.to_native() != PROTOCOL_VERSION {
            return self.peer_fault(now, "HelloOk with another protocol version");
        }
        let announced_ms = u64::from(ok.heartbeat_interval_ms.to_native());
        let chosen_ms = match self.config.heartbeat_interval {
            Some(interval) => u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            None => announced_ms,
        };
        let interval_ms = chosen_ms.max(HEARTBEAT_INTERVAL_MS_MIN);
        let interval = Duration::from_millis(interval_ms);
        self.heartbeat_interval = Some(interval);
        self.ping_at = Some(now + interval);
        self.phase = Phase::AwaitLoginOk;
        self.send_login(now);
    }

    fn send_login(&mut self, now: Instant) {
        let (credential, with_token) = match (&self.token, &self.config.password) {
            (Some(token), _) => (Credential::Token(token.clone()), true),
            (None, Some(password)) => (Credential::Password(password.clone()), false),
            (None, None) => {
                return self.local_auth_failure(now, "no password or token configured");
            }
        };
        let user = &self.config.user;
        let device = &self.config.device;
        if user.is_empty() || user.len() > USER_NAME_SIZE_MAX {
            return self.local_auth_failure(now, "user name empty or too long");
        }
        if device.is_empty() || device.len() > DEVICE_NAME_SIZE_MAX {
            return self.local_auth_failure(now, "device name empty or too long");
        }
        if let Credential::Password(password) = &credential
            && password.len() > PASSWORD_SIZE_MAX
        {
            return self.local_auth_failure(now, "password too long");
        }
        // Tokens were checked against TOKEN_SIZE_MAX when they were taken in.
        let login = Login {
            user: user.clone(),
            device: device.clone(),
            credential,
        };
        let request_id = self.request(now, Request::Login { with_token });
        protocol::encode(&mut self.tx, Kind::Login, request_id, &login);
    }

    fn local_auth_failure(&mut self, now: Instant, message: &str) {
        self.events.push_back(Event::AuthFailed {
            code: ErrorCode::AuthFailed as u16,
            message: message.to_owned(),
        });
        self.end_connection(now, true, "login impossible", After::Offline);
    }

    fn on_login_ok(&mut self, payload: &[u8], now: Instant) {
        let Ok(ok) = protocol::access::<ArchivedLoginOk>(Kind::LoginOk, payload) else {
            return self.peer_fault(now, "malformed LoginOk");
        };
        let user_id = ok.user_id.to_native();
        let head_seq = ok.head_seq.to_native();
        let acked_seq = ok.acked_seq.to_native();
        // A token we could not present again (too long for a login frame) is not kept.
        if token_is_usable(ok.token.as_str()) {
            self.token = Some(ok.token.as_str().to_owned());
        }
        self.phase = Phase::Established;
        self.failures = 0;
        self.user_id = Some(user_id);
        // The node already has this device's cursor up to acked_seq; ack only beyond it.
        self.acked_seq_sent = acked_seq;
        self.events.push_back(Event::AuthOk { user_id, head_seq });
        // Sync first, then the outbox (pumped in after_input): the resends go out in the
        // same flush, pipelined behind the sync.
        self.start_sync(now);
    }

    fn on_pong(&mut self, nonce: u64, sent_at: Instant, payload: &[u8], now: Instant) {
        self.ping_in_flight = None;
        let Ok(pong) = protocol::access::<ArchivedPong>(Kind::Pong, payload) else {
            return self.peer_fault(now, "malformed Pong");
        };
        if pong.nonce.to_native() != nonce {
            return self.peer_fault(now, "Pong with the wrong nonce");
        }
        let rtt = now.saturating_duration_since(sent_at);
        self.rtt_last = Some(rtt);
        self.events.push_back(Event::Pong { rtt });
    }

    fn on_send_ack(&mut self, order: u64, payload: &[u8], now: Instant) {
        let Ok(ack) = protocol::access::<ArchivedSendAck>(Kind::SendAck, payload) else {
            return self.peer_fault(now, "malformed SendAck");
        };
        let (msg_id, seq, duplicate) = (ack.msg_id.to_native(), ack.seq.to_native(), ack.duplicate);
        let Some(out) = self.outbox_take(order) else {
            return;
        };
        self.store.outbox_remove(out.item.client_msg_id);
        self.events.push_back(Event::SendAcked {
            client_msg_id: out.item.client_msg_id,
            msg_id,
            seq,
            duplicate,
        });
    }

    fn on_sync_page(&mut self, payload: &[u8], now: Instant) {
        self.sync.in_flight = None;
        let Ok(page) = protocol::access::<ArchivedSyncPage>(Kind::SyncPage, payload) else {
            return self.peer_fault(now, "malformed SyncPage");
        };
        // A gap inside a page (which an honest node never sends) just ends the page: the
        // progress check below keeps a lying node from making the session loop.
        if self.take_entries(page.entries.as_slice()).is_err() {
            return self.peer_fault(now, "malformed timeline entry");
        }
        // Page on while pages make progress; then once more if a push showed a gap while
        // this run was in flight and the run did not fill it.
        let progressed = self.last_seq > self.sync.start_seq;
        let more_pages = page.has_more && progressed;
        let gap_open = self.sync.rerun && self.sync.gap_seq > self.last_seq;
        if more_pages || gap_open {
            self.start_sync(now);
        } else {
            self.sync.rerun = false;
            self.events.push_back(Event::SyncDone {
                head_seq: page.head_seq.to_native(),
            });
        }
    }

    fn on_fetch_page(&mut self, request_id: u32, after_seq: u64, payload: &[u8], now: Instant) {
        self.fetch_in_flight = None;
        let Ok(page) = protocol::access::<ArchivedSyncPage>(Kind::SyncPage, payload) else {
            return self.peer_fault(now, "malformed SyncPage");
        };
        let mut entries = Vec::with_capacity(page.entries.len());
        for entry in page.entries.iter() {
            match decode_entry(entry) {
                Some(message) => entries.push(message),
                None => return self.peer_fault(now, "malformed timeline entry"),
            }
        }
        self.events.push_back(Event::TimelinePage {
            request_id,
            after_seq,
            entries,
            head_seq: page.head_seq.to_native(),
            has_more: page.has_more,
        });
    }

    fn on_push(&mut self, payload: &[u8], now: Instant) {
        // The node registers a connection for pushes while answering its login, so a push
        // may precede LoginOk, but never HelloOk.
        if self.phase == Phase::AwaitHelloOk {
            return self.peer_fault(now, "push before login");
        }
        let Ok(push) = protocol::access::<ArchivedPush>(Kind::Push, payload) else {
            return self.peer_fault(now, "malformed Push");
        };
        match self.take_entries(push.entries.as_slice()) {
            Err(()) => self.peer_fault(now, "malformed timeline entry"),
            Ok(None) => {}
            Ok(Some(gap_seq)) => {
                self.sync.gap_seq = self.sync.gap_seq.max(gap_seq);
                // Before login the sync that follows LoginOk fills the gap.
                if self.phase == Phase::Established {
                    if self.sync.in_flight.is_some() {
                        self.sync.rerun = true;
                    } else {
                        self.start_sync(now);
                    }
                }
            }
        }
    }

    fn on_kicked(&mut self, payload: &[u8], now: Instant) {
        let Ok(kicked) = protocol::access::<ArchivedKicked>(Kind::Kicked, payload) else {
            return self.peer_fault(now, "malformed Kicked");
        };
        self.events.push_back(Event::Kicked {
            code: kicked.code.to_native(),
            message: kicked.message.as_str().to_owned(),
        });
        self.end_connection(now, true, "kicked", After::Offline);
    }

    /// An `Error` with request id 0: the node is closing this connection.
    fn on_connection_error(&mut self, payload: &[u8], now: Instant) {
        let Ok(body) = protocol::access::<ArchivedErrorBody>(Kind::Error, payload) else {
            return self.peer_fault(now, "malformed Error");
        };
        let code = body.code.to_native();
        self.events.push_back(Event::NodeError {
            code,
            message: body.message.as_str().to_owned(),
        });
        // Being replaced by another login is a kick whatever frame carried it.
        let after = if code == ErrorCode::ReplacedByNewLogin as u16 {
            After::Offline
        } else {
            After::Retry
        };
        self.end_connection(now, true, "node closed the connection", after);
    }

    fn on_error_response(&mut self, request: Request, payload: &[u8], now: Instant) {
        if let Request::Send { order } = request
            && let Some(out) = self.outbox.get(&order)
            && out.in_flight.is_some()
        {
            // The send is no longer on the wire, whatever the answer says.
            self.outbox_mark_waiting(order);
        }
        if let Request::Ping { .. } = request {
            self.ping_in_flight = None;
        }
        if let Request::Sync = request {
            self.sync.in_flight = None;
        }
        if let Request::Fetch { .. } = request {
            self.fetch_in_flight = None;
        }
        let Ok(body) = protocol::access::<ArchivedErrorBody>(Kind::Error, payload) else {
            return self.peer_fault(now, "malformed Error");
        };
        let code = body.code.to_native();
        let message = body.message.as_str().to_owned();
        let known = ErrorCode::from_u16(code);
        match request {
            Request::Hello => {
                self.events.push_back(Event::NodeError { code, message });
                // Another protocol version will not be accepted on the next try either.
                let after = if known == Some(ErrorCode::UnsupportedVersion) {
                    After::Offline
                } else {
                    After::Retry
                };
                self.end_connection(now, true, "hello refused", after);
            }
            Request::Login { with_token } => {
                if known == Some(ErrorCode::AuthFailed)
                    && with_token
                    && self.config.password.is_some()
                {
                    // A refused token (expired, revoked, new node secret): once more with the
                    // password. `token` is None from now on, so this happens once.
                    self.token = None;
                    self.end_connection(now, true, "token refused", After::RetryNow);
                } else if matches!(known, Some(ErrorCode::AuthFailed | ErrorCode::Throttled)) {
                    // Final for this session: retrying a throttled password only meets the
                    // wait again; the app decides when (the message says how long).
                    self.events.push_back(Event::AuthFailed { code, message });
                    self.end_connection(now, true, "login refused", After::Offline);
                } else {
                    // Any error answering a login closes the connection (storage failure,
                    // shutdown): a failed attempt, retried with backoff.
                    self.events.push_back(Event::NodeError { code, message });
                    self.end_connection(now, true, "login failed", After::Retry);
                }
            }
            Request::Send { order } => self.on_send_error(order, code, known, message, now),
            Request::Ping { .. } | Request::Sync | Request::Fetch { .. } | Request::Team => {
                // These cannot fail on a healthy connection; start over on a new one.
                self.events.push_back(Event::NodeError { code, message });
                self.end_connection(now, true, "request failed", After::Retry);
            }
        }
    }

    fn on_send_error(
        &mut self,
        order: u64,
        code: u16,
        known: Option<ErrorCode>,
        message: String,
        now: Instant,
    ) {
        match known {
            Some(ErrorCode::Busy) => {
                // The node is overloaded: hold every send back for a while, then resend
                // this one with the same client message id.
                self.busy_answers += 1;
                self.outbox_paused_until = Some(now + self.config.busy_retry);
            }
            Some(closing)
                if closing.closes_connection()
                    && !matches!(
                        closing,
                        ErrorCode::MalformedFrame | ErrorCode::ProtocolViolation
                    ) =>
            {
                // The connection is going away (timeout, shutdown); the send stays in the
                // outbox for the next one.
                self.events.push_back(Event::NodeError { code, message });
                self.end_connection(now, true, "node closed the connection", After::Retry);
            }
            _ => {
                // Final: unknown user, too large, invalid argument, storage full or failed,
                // a code this build does not know, or a send the node could not parse
                // (resending the same bytes would fail the same way).
                if let Some(out) = self.outbox_take(order) {
                    self.store.outbox_remove(out.item.client_msg_id);
                    self.events.push_back(Event::SendFailed {
                        client_msg_id: out.item.client_msg_id,
                        code,
                        message,
                    });
                }
                if known.is_some_and(ErrorCode::closes_connection) {
                    self.end_connection(now, true, "node closed the connection", After::Retry);
                }
            }
        }
    }

    /// Stores and delivers the entries that extend the timeline, in order. Entries at or
    /// below `last_seq` are duplicates (pages and pushes overlap) and skipped. Stops at the
    /// first gap and returns the seq beyond it; Err for an entry whose message does not
    /// validate.
    fn take_entries(&mut self, entries: &[ArchivedEntry]) -> Result<Option<u64>, ()> {
        for entry in entries {
            let seq = entry.seq.to_native();
            if seq <= self.last_seq {
                continue;
            }
            // seq > last_seq, so last_seq + 1 cannot overflow.
            if seq != self.last_seq + 1 {
                return Ok(Some(seq));
            }
            let message = decode_entry(entry).ok_or(())?;
            self.store.store_entry(&message);
            self.last_seq = seq;
            debug_assert_eq!(self.store.last_seq(), seq);
            self.events.push_back(Event::Message(message));
        }
        Ok(None)
    }

    // ----- requests ---------------------------------------------------------------------

    /// Allocates a request id (nonzero, wrapping, not in use) and records what it asks.
    fn request(&mut self, now: Instant, request: Request) -> u32 {
        let request_id = loop {
            self.request_id_last = self.request_id_last.wrapping_add(1);
            let id = self.request_id_last;
            // 0 marks the node's unsolicited frames; a wrapped id may still be in flight.
            if id != 0 && !self.pending.contains_key(&id) {
                break id;
            }
        };
        let deadline = now + self.config.request_timeout;
        self.pending
            .insert(request_id, Pending { deadline, request });
        request_id
    }

    fn start_sync(&mut self, now: Instant) {
        debug_assert!(self.sync.in_flight.is_none());
        let request_id = self.request(now, Request::Sync);
        let sync = protocol::Sync {
            after_seq: self.last_seq,
            limit: self.config.sync_page_limit,
        };
        protocol::encode(&mut self.tx, Kind::Sync, request_id, &sync);
        self.sync.in_flight = Some(request_id);
        self.sync.start_seq = self.last_seq;
        self.sync.rerun = false;
    }

    fn send_ping(&mut self, now: Instant) {
        let nonce = self.rng.next_u64();
        let request_id = self.request(
            now,
            Request::Ping {
                nonce,
                sent_at: now,
            },
        );
        protocol::encode(&mut self.tx, Kind::Ping, request_id, &Ping { nonce });
        self.ping_in_flight = Some(request_id);
    }

    /// Work due after any input: one coalesced device ack, and sends from the outbox.
    fn after_input(&mut self, now: Instant) {
        if self.phase != Phase::Established {
            return;
        }
        if self.last_seq > self.acked_seq_sent {
            // Everything up to last_seq is in the store: take_entries stored each entry
            // before advancing last_seq.
            let ack = DeviceAck {
                up_to_seq: self.last_seq,
            };
            protocol::encode(&mut self.tx, Kind::DeviceAck, 0, &ack);
            self.acked_seq_sent = self.last_seq;
        }
        self.pump_outbox(now);
    }

    /// Puts waiting sends on the wire, oldest first, up to `SENDS_IN_FLIGHT_MAX`.
    fn pump_outbox(&mut self, now: Instant) {
        if self.phase != Phase::Established || self.outbox_paused_until.is_some() {
            return;
        }
        let room = SENDS_IN_FLIGHT_MAX.saturating_sub(self.sends_in_flight);
        if room == 0 || self.sends_in_flight == self.outbox.len() {
            return;
        }
        let ready: Vec<u64> = self
            .outbox
            .iter()
            .filter(|(_, out)| out.in_flight.is_none())
            .map(|(order, _)| *order)
            .take(room)
            .collect();
        for order in ready {
            let request_id = self.request(now, Request::Send { order });
            let out = self.outbox.get_mut(&order).expect("order collected above");
            let send = protocol::Send {
                to: out.item.to.clone(),
                client_msg_id: out.item.client_msg_id,
                text: out.item.text.clone(),
            };
            protocol::encode(&mut self.tx, Kind::Send, request_id, &send);
            out.in_flight = Some(request_id);
            self.sends_in_flight += 1;
        }
        debug_assert!(self.sends_in_flight <= SENDS_IN_FLIGHT_MAX);
    }

    // ----- outbox -----------------------------------------------------------------------

    fn outbox_insert(&mut self, item: OutboxItem) {
        let order = self.outbox_order_next;
        self.outbox_order_next += 1;
        self.outbox.insert(
            order,
            Outgoing {
                item,
                in_flight: None,
            },
        );
    }

    /// Removes an entry, keeping the in-flight count right.
    fn outbox_take(&mut self, order: u64) -> Option<Outgoing> {
        let out = self.outbox.remove(&order)?;
        if out.in_flight.is_some() {
            self.sends_in_flight -= 1;
        }
        Some(out)
    }

    fn outbox_mark_waiting(&mut self, order: u64) {
        if let Some(out) = self.outbox.get_mut(&order)
            && out.in_flight.take().is_some()
        {
            self.sends_in_flight -= 1;
        }
    }

    fn next_client_msg_id(&mut self) -> u64 {
        if self.msg_id_counter == u32::MAX {
            self.msg_id_prefix = fresh_prefix(&mut self.rng);
            self.msg_id_counter = 0;
        }
        self.msg_id_counter += 1;
        (self.msg_id_prefix << 32) | u64::from(self.msg_id_counter)
    }

    // ----- connection end ---------------------------------------------------------------

    /// The node sent something it must not: drop the connection and start over.
    fn peer_fault(&mut self, now: Instant, reason: &'static str) {
        self.end_connection(now, true, reason, After::Retry);
    }

    /// Forgets everything tied to the current connection. Sends in flight go back to
    /// waiting in the outbox, to be resent with their ids on the next connection.
    fn reset_connection(&mut self) {
        self.conn_generation += 1;
        self.reader = FrameReader::new();
        self.tx.clear();
        self.pending.clear();
        self.sync = SyncState::default();
        self.fetch_in_flight = None;
        self.heartbeat_interval = None;
        self.ping_at = None;
        self.ping_in_flight = None;
        self.acked_seq_sent = 0;
        self.outbox_paused_until = None;
        for out in self.outbox.values_mut() {
            out.in_flight = None;
        }
        self.sends_in_flight = 0;
    }

    fn end_connection(
        &mut self,
        now: Instant,
        disconnect: bool,
        reason: &'static str,
        after: After,
    ) {
        let was_established = self.phase == Phase::Established;
        if disconnect {
            self.actions.push_back(Action::Disconnect);
        }
        self.reset_connection();
        match after {
            After::Offline => {
                self.phase = Phase::Offline;
                self.events.push_back(Event::Offline);
            }
            After::RetryNow => self.start_connecting(now),
            After::Retry if was_established => {
                // Losing a working connection is not a failed attempt; come back soon,
                // jittered so a node restart does not bring every device back at once.
                self.events.push_back(Event::Disconnected { reason });
                let delay = self
                    .rng
                    .duration_between(Duration::ZERO, self.config.backoff_base);
                self.phase = Phase::Waiting { until: now + delay };
            }
            After::Retry => {
                self.failures = self.failures.saturating_add(1);
                let will_retry = self.failures < self.config.reconnect_attempts_max;
                self.events.push_back(Event::ConnectFailed {
                    attempt: self.failures,
                    will_retry,
                });
                if will_retry {
                    let delay = self.backoff(self.failures);
                    self.phase = Phase::Waiting { until: now + delay };
                } else {
                    self.phase = Phase::Offline;
                    self.events.push_back(Event::Offline);
                }
            }
        }
    }

    /// Asks the driver for a connection, due by `now + connect_timeout`.
    fn start_connecting(&mut self, now: Instant) {
        self.phase = Phase::Connecting {
            deadline: now + self.config.connect_timeout,
        };
        self.actions.push_back(Action::Connect);
    }

    fn is_connecting(&self) -> bool {
        matches!(self.phase, Phase::Connecting { .. })
    }

    /// Delay before attempt `attempt + 1` after `attempt` consecutive failures (>= 1).
    fn backoff(&mut self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let ceiling = self
            .config
            .backoff_base
            .saturating_mul(1 << doublings)
            .min(self.config.backoff_max);
        self.rng.duration_between(ceiling / 2, ceiling)
    }
}

/// The checks the node would make on a send, made before the send enters the outbox.
fn check_send(to: &str, text: &str) -> Result<(), SendError> {
    if to.is_empty() || to.len() > USER_NAME_SIZE_MAX {
        return Err(SendError::InvalidRecipient);
    }
    if text.len() > MESSAGE_TEXT_SIZE_MAX {
        return Err(SendError::TooLarge { len: text.len() });
    }
    Ok(())
}

/// Whether a token fits in a login frame.
fn token_is_usable(token: &str) -> bool {
    !token.is_empty() && token.len() <= TOKEN_SIZE_MAX
}

/// A nonzero 32-bit prefix for client message ids (so no id is ever 0).
fn fresh_prefix(rng: &mut SplitMix64) -> u64 {
    loop {
        let prefix = rng.next_u64() >> 32;
        if prefix != 0 {
            return prefix;
        }
    }
}

/// Validates an entry's nested `Message` or `Record` archive and copies it out.
pub(super) fn decode_entry(entry: &ArchivedEntry) -> Option<ReceivedMessage> {
    let bytes = entry.message.as_slice();
    if protocol::is_record(bytes) {
        let record = protocol::access::<ArchivedRecord>(
            Kind::SyncPage,
            &bytes[protocol::RECORD_MARKER.len()..],
        )
        .ok()?;
        return Some(ReceivedMessage {
            seq: entry.seq.to_native(),
            msg_id: record.msg_id.to_native(),
            from_id: record.from_id.to_native(),
            from: record.from.as_str().to_owned(),
            to_id: record.conv.to_native(),
            to: String::new(),
            client_msg_id: record.client_msg_id.to_native(),
            sent_at_ms: record.sent_at_ms.to_native(),
            text: record.text.as_str().to_owned(),
            record: Some(EntryRecord {
                kind: record.kind.to_native(),
                conv: record.conv.to_native(),
                users: record.users.iter().map(|u| u.to_native()).collect(),
                up_to: record.up_to.to_native(),
                attachment: match record.attachments.first() {
                    Some(a) => Some(
                        rkyv::deserialize::<protocol::Attachment, rkyv::rancor::Failure>(a).ok()?,
                    ),
                    None => None,
                },
            }),
        });
    }
    let message = protocol::access::<ArchivedMessage>(Kind::SyncPage, bytes).ok()?;
    Some(ReceivedMessage {
        seq: entry.seq.to_native(),
        msg_id: message.msg_id.to_native(),
        from_id: message.from_id.to_native(),
        from: message.from.as_str().to_owned(),
        to_id: message.to_id.to_native(),
        to: message.to.as_str().to_owned(),
        client_msg_id: message.client_msg_id.to_native(),
        sent_at_ms: message.sent_at_ms.to_native(),
        text: message.text.as_str().to_owned(),
        record: None,
    })
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
