//! A small blocking driver that runs a `ClientSession` over a `std::net::TcpStream`, plain
//! or inside TLS (`with_tls`): for the `tern` command line, tests and simple tools.
//!
//! It is deliberately thin: it carries out the session's actions (connect, disconnect),
//! writes what the session queues, feeds it what the socket reads, and sleeps in `read`
//! until the session's next timeout. Every protocol decision (reconnects, resends, gaps)
//! stays in the session. It must not grow logic of its own beyond waiting for outcomes.
//!
//! Events pass once: each goes to the listener, then to the stop predicate of the call
//! that took it from the session (`run_until` stops at the first event the predicate
//! accepts and leaves the rest queued for the next call).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::tls::{HandshakeKind, Inbound, TlsLayer};

use super::session::{
    Action, ClientConfig, ClientSession, Event, Listener, ReceivedMessage, SendError,
};
use super::store::{ClientStore, MemoryStore};
use super::{READ_BUFFER_SIZE, RECEIVED_BUFFER_MAX};

/// Default bound on one blocking call (`connect`, `send`, one page of `sync_all`),
/// reconnects included.
pub const OPERATION_TIMEOUT_MS_DEFAULT: u64 = 60_000;

/// A durable acknowledgement of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub client_msg_id: u64,
    pub msg_id: u64,
    /// Seq of the message in the sender's own timeline.
    pub seq: u64,
    /// The node had stored this client message id already (a resend).
    pub duplicate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The node refused the credentials (codes are `ErrorCode` numbers).
    AuthFailed { code: u16, message: String },
    /// Another login of this device replaced this one.
    Kicked { code: u16, message: String },
    /// The session gave up reconnecting. `last_error` is the latest socket error, if any.
    Offline { last_error: Option<String> },
    /// The node refused the message for good.
    SendFailed {
        client_msg_id: u64,
        code: u16,
        message: String,
    },
    /// The message was refused before it was queued.
    Refused(SendError),
    /// `connect` was not called, or `close` was.
    NotConnected,
    /// The operation did not finish within the client's operation timeout. A send stays in
    /// the outbox and goes out again on the next connection.
    Timeout,
    /// The node refused a team request (groups, history, conversations, read marks).
    RequestFailed { code: u16, message: String },
    /// The connection dropped before a group operation was answered; it may or may not
    /// have been applied (it is not resent, see `client::team`).
    Lost,
    /// A request was refused before it was sent; says why.
    Invalid(&'static str),
    /// The node answered with a frame of the wrong kind.
    Unexpected,
    /// A downloaded file's bytes do not match its SHA-256 (or its hash changed between
    /// chunks); the bytes were discarded.
    Corrupt(&'static str),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::AuthFailed { code, message } => {
                write!(f, "login refused ({}): {message}", code_name(*code))
            }
            ClientError::Kicked { code, message } => {
                write!(f, "kicked ({}): {message}", code_name(*code))
            }
            ClientError::Offline {
                last_error: Some(err),
            } => write!(f, "node unreachable: {err}"),
            ClientError::Offline { last_error: None } => write!(f, "node unreachable"),
            ClientError::SendFailed {
                client_msg_id,
                code,
                message,
            } => {
                write!(
                    f,
                    "send {client_msg_id} refused ({}): {message}",
                    code_name(*code)
                )
            }
            ClientError::Refused(err) => write!(f, "send refused: {err}"),
            ClientError::NotConnected => write!(f, "not connected"),
            ClientError::Timeout => write!(f, "timed out"),
            ClientError::RequestFailed { code, message } => {
                write!(f, "refused ({}): {message}", code_name(*code))
            }
            ClientError::Lost => write!(f, "connection lost before the answer; check the outcome"),
            ClientError::Invalid(why) => write!(f, "invalid request: {why}"),
            ClientError::Unexpected => write!(f, "the node answered with an unexpected frame"),
            ClientError::Corrupt(why) => write!(f, "download failed verification: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

fn code_name(code: u16) -> String {
    match crate::protocol::ErrorCode::from_u16(code) {
        Some(known) => known.name().to_owned(),
        None => format!("code {code}"),
    }
}

/// Runs one session over TCP, blocking the calling thread.
pub struct BlockingClient<S: ClientStore = MemoryStore> {
    server: SocketAddr,
    session: ClientSession<S>,
    /// The current connection; None between a disconnect and the next connect.
    stream: Option<TcpStream>,
    listener: Option<Box<dyn Listener + Send>>,
    /// Messages delivered since the last `take_received`, at most `RECEIVED_BUFFER_MAX`.
    received: Vec<ReceivedMessage>,
    received_overflow: u64,
    operation_timeout: Duration,
    read_buf: Box<[u8]>,
    write_buf: Vec<u8>,
    last_io_error: Option<String>,
    /// TLS settings and the name the node's certificate must carry (`with_tls`).
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// The current connection's TLS state; present exactly while `stream` is, when `tls`
    /// is set.
    layer: Option<Box<TlsLayer>>,
    /// Plaintext of one read and ciphertext of one write, under TLS (reused allocations).
    plain_buf: Vec<u8>,
    cipher_buf: Vec<u8>,
}

impl BlockingClient<MemoryStore> {
    /// A client keeping its state in memory. Nothing happens until `connect`.
    pub fn new(server: SocketAddr, config: ClientConfig) -> BlockingClient<MemoryStore> {
        BlockingClient::with_store(server, config, MemoryStore::new())
    }
}

impl<S: ClientStore> BlockingClient<S> {
    pub fn with_store(server: SocketAddr, config: ClientConfig, store: S) -> BlockingClient<S> {
        BlockingClient {
            server,
            session: ClientSession::new(config, store),
            stream: None,
            listener: None,
            received: Vec::new(),
            received_overflow: 0,
            operation_timeout: Duration::from_millis(OPERATION_TIMEOUT_MS_DEFAULT),
            read_buf: vec![0u8; READ_BUFFER_SIZE].into_boxed_slice(),
            write_buf: Vec::new(),
            last_io_error: None,
            tls: None,
            layer: None,
            plain_buf: Vec::new(),
            cipher_buf: Vec::new(),
        }
    }

    /// Speaks TLS to the node (`transport::tls::client_config`), checking its certificate
    /// against `name`. Connections made from the same `config` share its ticket cache, so a
    /// reconnect resumes the session (one cheap handshake). A handshake that fails (an
    /// untrusted certificate, a port that does not speak TLS) stops the session with the
    /// reason in `last_io_error` instead of retrying: the next try would fail alike.
    pub fn with_tls(
        mut self,
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    ) -> BlockingClient<S> {
        self.tls = Some((config, name));
        self
    }

    /// Whether the current connection's TLS handshake was full or resumed (None: plain,
    /// not connected, or still handshaking).
    pub fn tls_handshake_kind(&self) -> Option<HandshakeKind> {
        self.layer.as_ref().and_then(|layer| layer.handshake_kind())
    }

    /// Every event goes to `listener` first, in order.
    pub fn with_listener(mut self, listener: impl Listener + Send + 'static) -> BlockingClient<S> {
        self.listener = Some(Box::new(listener));
        self
    }

    /// Bound on one blocking call (default `OPERATION_TIMEOUT_MS_DEFAULT`).
    pub fn with_operation_timeout(mut self, timeout: Duration) -> BlockingClient<S> {
        self.operation_timeout = timeout;
        self
    }

    /// Connects, says hello, logs in and completes the initial sync.
    pub fn connect(&mut self) -> Result<(), ClientError> {
        if self.session.is_established() {
            return Ok(());
        }
        let deadline = Instant::now() + self.operation_timeout;
        // Events from an earlier run (the `Offline` after a kick) are old news now; hand
        // them to the listener so they do not end this wait.
        while let Some(event) = self.session.poll_event() {
            self.observe(&event);
        }
        self.session.connect(Instant::now());
        self.wait_established(deadline, true)
    }

    /// Sends a message and waits until the node stored it, reconnecting and resending as
    /// the session decides.
    pub fn send(&mut self, to: &str, text: &str) -> Result<Acked, ClientError> {
        let deadline = Instant::now() + self.operation_timeout;
        let id = self.send_nowait(to, text)?;
        let mut outcome = None;
        self.run_until(deadline, |event| {
            outcome = match event {
                Event::SendAcked {
                    client_msg_id,
                    msg_id,
                    seq,
                    duplicate,
                } if *client_msg_id == id => Some(Ok(Acked {
                    client_msg_id: id,
                    msg_id: *msg_id,
                    seq: *seq,
                    duplicate: *duplicate,
                })),
                Event::SendFailed {
                    client_msg_id,
                    code,
                    message,
                } if *client_msg_id == id => Some(Err(ClientError::SendFailed {
                    client_msg_id: id,
                    code: *code,
                    message: message.clone(),
                })),
                other => stop_error(other).map(Err),
            };
            outcome.is_some()
        });
        self.finish(outcome)
    }

    /// Queues a message and returns its client message id; its outcome arrives as an
    /// event during later calls (`pump`, `run_until`, `send`).
    pub fn send_nowait(&mut self, to: &str, text: &str) -> Result<u64, ClientError> {
        if self.session.is_stopped() {
            return Err(ClientError::NotConnected);
        }
        let id = self
            .session
            .send(to, text, Instant::now())
            .map_err(ClientError::Refused)?;
        self.drive_io();
        Ok(id)
    }

    /// Runs the session until `until`.
    pub fn pump(&mut self, until: Instant) {
        self.run_until(until, |_| false);
    }

    /// Runs the session until `stop` accepts an event (true), `deadline` passes, or the
    /// session stopped with nothing left to do (false).
    pub fn run_until(&mut self, deadline: Instant, mut stop: impl FnMut(&Event) -> bool) -> bool {
        loop {
            let now = Instant::now();
            if self.session.next_timeout().is_some_and(|at| at <= now) {
                self.session.handle_timeout(now);
            }
            self.drive_io();
            while let Some(event) = self.session.poll_event() {
                self.observe(&event);
                if stop(&event) {
                    return true;
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wake = self
                .session
                .next_timeout()
                .map_or(deadline, |at| at.min(deadline));
            if wake <= now {
                continue;
            }
            if self.stream.is_some() {
                self.read_once(wake - now);
            } else if self.session.next_timeout().is_some() {
                // Backing off before a reconnect: nothing to read, the timer is all.
                std::thread::sleep(wake - now);
            } else {
                return false;
            }
        }
    }

    /// Reads the whole timeline after `after_seq` afresh (not limited by, and not changing,
    /// the session's `last_seq`), page by page. Each page is bounded by the operation
    /// timeout; a connection lost mid-read is re-established and the page asked again.
    pub fn sync_all(&mut self, after_seq: u64) -> Result<Vec<ReceivedMessage>, ClientError> {
        let mut all = Vec::new();
        self.sync_each(after_seq, |message| all.push(message.clone()))?;
        Ok(all)
    }

    /// Like `sync_all`, handing each entry to `on_entry` instead of collecting them.
    /// Returns how many entries were read.
    pub fn sync_each(
        &mut self,
        after_seq: u64,
        mut on_entry: impl FnMut(&ReceivedMessage),
    ) -> Result<u64, ClientError> {
        let mut after = after_seq;
        let mut count = 0u64;
        loop {
            let deadline = Instant::now() + self.operation_timeout;
            self.wait_established(deadline, false)?;
            let Some(request_id) = self.session.fetch_timeline(after, Instant::now()) else {
                // Only one fetch at a time: let the one in flight (from an earlier call
                // that gave up) finish first.
                self.run_until(deadline, |event| {
                    matches!(event, Event::TimelinePage { .. })
                });
                continue;
            };
            self.drive_io();
            let mut page = None;
            let mut failure = None;
            self.run_until(deadline, |event| match event {
                Event::TimelinePage {
                    request_id: id,
                    entries,
                    has_more,
                    ..
                } if *id == request_id => {
                    page = Some((entries.clone(), *has_more));
                    true
                }
                // The connection the request went out on is gone; ask again on the next.
                Event::Disconnected { .. } => true,
                other => {
                    failure = stop_error(other);
                    failure.is_some()
                }
            });
            if let Some(err) = failure {
                return self.finish(Some(Err(err)));
            }
            match page {
                Some((entries, has_more)) => {
                    for entry in &entries {
                        on_entry(entry);
                    }
                    count += entries.len() as u64;
                    match entries.last() {
                        // A page that is not the last but holds nothing would repeat forever.
                        Some(last) if has_more => after = last.seq,
                        _ => return Ok(count),
                    }
                }
                None if Instant::now() >= deadline => return Err(self.not_finished()),
                None => {}
            }
        }
    }

    /// Closes the connection and stops reconnecting. Unacknowledged sends stay in the
    /// store's outbox.
    pub fn close(&mut self) {
        self.session.close(Instant::now());
        self.drive_io();
    }

    /// Messages delivered since the last `take_received` (up to `RECEIVED_BUFFER_MAX`).
    pub fn received(&self) -> &[ReceivedMessage] {
        &self.received
    }

    pub fn take_received(&mut self) -> Vec<ReceivedMessage> {
        std::mem::take(&mut self.received)
    }

    /// Messages delivered but not buffered because the buffer was full. They are in the
    /// store and were given to the listener.
    pub fn received_overflow(&self) -> u64 {
        self.received_overflow
    }

    pub fn session(&self) -> &ClientSession<S> {
        &self.session
    }

    pub fn session_mut(&mut self) -> &mut ClientSession<S> {
        &mut self.session
    }

    /// The latest socket error (connect, read or write), for diagnostics.
    pub fn last_io_error(&self) -> Option<&str> {
        self.last_io_error.as_deref()
    }

    pub(super) fn operation_timeout(&self) -> Duration {
        self.operation_timeout
    }

    /// Waits until the session is established (logged in, initial sync not awaited).
    pub(super) fn wait_ready(&mut self, deadline: Instant) -> Result<(), ClientError> {
        self.wait_established(deadline, false)
    }

    /// The error for a wait that ended without its event.
    pub(super) fn timed_out(&self) -> ClientError {
        self.not_finished()
    }

    // ----- internals --------------------------------------------------------------------

    /// Waits until the session is established (and, with `initial_sync`, its first sync run
    /// is done), or fails with why it cannot be.
    fn wait_established(
        &mut self,
        deadline: Instant,
        initial_sync: bool,
    ) -> Result<(), ClientError> {
        if self.session.is_established() && !initial_sync {
            return Ok(());
        }
        if self.session.is_stopped() {
            return Err(ClientError::NotConnected);
        }
        let mut logged_in = false;
        let mut outcome = None;
        self.run_until(deadline, |event| {
            outcome = match event {
                Event::AuthOk { .. } if !initial_sync => Some(Ok(())),
                Event::AuthOk { .. } => {
                    logged_in = true;
                    None
                }
                Event::SyncDone { .. } if logged_in => Some(Ok(())),
                other => stop_error(other).map(Err),
            };
            outcome.is_some()
        });
        self.finish(outcome)
    }

    /// The result of a wait: its outcome, with the latest socket error added to `Offline`,
    /// or why it ended without one.
    pub(super) fn finish<T>(
        &self,
        outcome: Option<Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match outcome {
            Some(Err(ClientError::Offline { last_error: None })) => Err(ClientError::Offline {
                last_error: self.last_io_error.clone(),
            }),
            Some(result) => result,
            None => Err(self.not_finished()),
        }
    }

    /// The error for a wait that ended without its event.
    fn not_finished(&self) -> ClientError {
        if self.session.is_stopped() {
            ClientError::Offline {
                last_error: self.last_io_error.clone(),
            }
        } else {
            ClientError::Timeout
        }
    }

    fn observe(&mut self, event: &Event) {
        if let Some(listener) = &mut self.listener {
            listener.on_event(event);
        }
        if let Event::Message(message) = event {
            if self.received.len() < RECEIVED_BUFFER_MAX {
                self.received.push(message.clone());
            } else {
                self.received_overflow += 1;
            }
        }
    }

    /// Carries out the session's actions and writes what it queued, until neither is left.
    fn drive_io(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(action) = self.session.poll_action() {
                progressed = true;
                match action {
                    Action::Connect => self.open(),
                    Action::Disconnect => self.drop_stream(),
                }
            }
            if self.session.transmit_len() > 0 {
                progressed = true;
                self.write_buf.clear();
                self.session.take_transmit(&mut self.write_buf);
                // Without a stream the bytes were for a connection that is gone.
                if let Some(stream) = &mut self.stream
                    && let Err(err) = match self.layer.as_mut() {
                        None => stream.write_all(&self.write_buf),
                        Some(layer) => {
                            layer.send(&self.write_buf);
                            write_ciphertext(layer, stream, &mut self.cipher_buf)
                        }
                    }
                {
                    self.last_io_error = Some(format!("write: {err}"));
                    self.drop_stream();
                    self.session.closed(Instant::now());
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn open(&mut self) {
        self.drop_stream();
        let config = self.session.config();
        let timeout = config.request_timeout.max(Duration::from_millis(1));
        let connect_timeout = config.connect_timeout.max(Duration::from_millis(1));
        let opened = TcpStream::connect_timeout(&self.server, connect_timeout).and_then(|stream| {
            // Frames are small and latency matters more than packet count; the session
            // already batches what it writes per input.
            stream.set_nodelay(true)?;
            // A node that stops reading must not block this thread forever.
            stream.set_write_timeout(Some(timeout))?;
            Ok(stream)
        });
        let opened = opened.and_then(|stream| match &self.tls {
            None => Ok((stream, None)),
            Some((config, name)) => TlsLayer::client(config, name.clone())
                .map(|layer| (stream, Some(Box::new(layer))))
                .map_err(std::io::Error::other),
        });
        match opened {
            Ok((stream, layer)) => {
                self.stream = Some(stream);
                // The hello the session queues now waits in the layer until the handshake
                // (driven by `read_once`) completes.
                self.layer = layer;
                self.session.connected(Instant::now());
            }
            Err(err) => {
                self.last_io_error = Some(format!("connect {}: {err}", self.server));
                self.session.connect_failed(Instant::now());
            }
        }
    }

    fn drop_stream(&mut self) {
        let layer = self.layer.take();
        if let Some(mut stream) = self.stream.take() {
            if let Some(mut layer) = layer {
                // Best effort: tell the node the close is ours, not a truncation.
                layer.close();
                let _ = write_ciphertext(&mut layer, &mut stream, &mut self.cipher_buf);
            }
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Bytes read from the socket: straight to the session, or through TLS.
    fn deliver(&mut self, n: usize) {
        let now = Instant::now();
        let (Some(layer), Some(stream)) = (self.layer.as_mut(), self.stream.as_mut()) else {
            self.session.received(&self.read_buf[..n], now);
            return;
        };
        let handshaking = layer.is_handshaking();
        self.plain_buf.clear();
        let inbound = layer.receive(&self.read_buf[..n], &mut self.plain_buf);
        // Handshake flights and alerts (an error's too) go out before anything else.
        let written = write_ciphertext(layer, stream, &mut self.cipher_buf);
        match inbound {
            Ok(inbound) => {
                if !self.plain_buf.is_empty() {
                    self.session.received(&self.plain_buf, now);
                }
                if let Err(err) = written {
                    self.last_io_error = Some(format!("write: {err}"));
                    self.drop_stream();
                    self.session.closed(now);
                } else if inbound == Inbound::PeerClosed {
                    self.last_io_error = Some("connection closed by node".to_owned());
                    self.drop_stream();
                    self.session.closed(now);
                }
            }
            Err(err) if handshaking => {
                self.last_io_error = Some(format!("tls handshake with {}: {err}", self.server));
                self.drop_stream();
                self.session.close(now);
            }
            Err(err) => {
                self.last_io_error = Some(err.to_string());
                self.drop_stream();
                self.session.closed(now);
            }
        }
    }

    /// One read, waiting at most `wait`.
    fn read_once(&mut self, wait: Duration) {
        let Some(stream) = &mut self.stream else {
            return;
        };
        // A zero read timeout means "block forever" to the OS, so never pass one.
        if let Err(err) = stream.set_read_timeout(Some(wait.max(Duration::from_millis(1)))) {
            self.last_io_error = Some(format!("set read timeout: {err}"));
        }
        match stream.read(&mut self.read_buf) {
            Ok(0) => {
                self.last_io_error = Some("connection closed by node".to_owned());
                self.drop_stream();
                self.session.closed(Instant::now());
            }
            Ok(n) => self.deliver(n),
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                self.last_io_error = Some(format!("read: {err}"));
                self.drop_stream();
                self.session.closed(Instant::now());
            }
        }
    }
}

/// Writes everything `layer` has for the socket.
fn write_ciphertext(
    layer: &mut TlsLayer,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.clear();
    layer.take_ciphertext(buf);
    if buf.is_empty() {
        return Ok(());
    }
    stream.write_all(buf)
}

/// The error a wait ends with when the session reports that it cannot go on.
pub(super) fn stop_error(event: &Event) -> Option<ClientError> {
    match event {
        Event::AuthFailed { code, message } => Some(ClientError::AuthFailed {
            code: *code,
            message: message.clone(),
        }),
        Event::Kicked { code, message } => Some(ClientError::Kicked {
            code: *code,
            message: message.clone(),
        }),
        Event::Offline => Some(ClientError::Offline { last_error: None }),
        _ => None,
    }
}
