//! The node's side of one connection as a sans-IO state machine.
//!
//! `Conn` takes received bytes and the current time, validates every frame, answers what it
//! can answer alone (hello, ping, protocol errors) and hands the rest to the shard as owned
//! `Request`s. The shard answers through the `reply_*` and `push_*` methods, which encode
//! into the connection's output buffer. This module does not touch sockets, the store, the
//! clock or other connections. `team` parses the team-messaging frames.

use crate::ids::UserId;
use crate::limits::{
    CLIENT_NAME_SIZE_MAX, DEVICE_NAME_SIZE_MAX, ERROR_MESSAGE_SIZE_MAX, FRAME_SIZE_MAX,
    MESSAGE_TEXT_SIZE_MAX, PASSWORD_SIZE_MAX, TOKEN_SIZE_MAX, USER_NAME_SIZE_MAX,
};
use crate::protocol::{
    self, ArchivedCredential, ArchivedDeviceAck, ArchivedHello, ArchivedLogin, ArchivedPing,
    ArchivedSend, ArchivedSync, DecodeError, EntryRef, ErrorBody, ErrorCode, FrameHeader,
    FrameReader, HelloOk, Kicked, Kind, LoginOk, Pong, PushRef, SendAck, SyncPageRef,
};

/// Where the connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    AwaitHello,
    AwaitLogin,
    /// A login request is with the shard; further frames wait for its answer.
    LoggingIn,
    Established,
    /// An error or kick was queued; nothing more is read.
    Closing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub name: String,
    pub device: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Password(String),
    Token(String),
}

/// A request the shard must carry out. Owned: the bytes it came from are gone by the time
/// the store answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Login {
        request_id: u32,
        user: String,
        device: String,
        credential: Credential,
    },
    Send {
        request_id: u32,
        to: String,
        client_msg_id: u64,
        text: String,
    },
    Sync {
        request_id: u32,
        after_seq: u64,
        limit: u32,
    },
    DeviceAck {
        up_to_seq: u64,
    },
    // Team messaging (`session::team`, `shard::team`).
    GroupOp {
        request_id: u32,
        op: u8,
        group_id: u64,
        name: String,
        users: Vec<String>,
    },
    GroupQuery {
        request_id: u32,
        group_id: u64,
    },
    GroupList {
        request_id: u32,
        after_group_id: u64,
        limit: u32,
    },
    GroupSend {
        request_id: u32,
        group_id: u64,
        client_msg_id: u64,
        text: String,
    },
    History {
        request_id: u32,
        conv: u64,
        before_seq: u64,
        limit: u32,
    },
    Conversations {
        request_id: u32,
        offset: u32,
        limit: u32,
    },
    Read {
        request_id: u32,
        conv: u64,
        up_to_seq: u64,
    },
    PresenceSubscribe {
        request_id: u32,
        users: Vec<String>,
    },
    PresenceQuery {
        request_id: u32,
        users: Vec<String>,
    },
    /// No answer unless refused.
    Typing {
        request_id: u32,
        conv: u64,
    },
    // Account (`session::account`, `shard::account`).
    Logout {
        request_id: u32,
        everywhere: bool,
    },
    ChangePassword {
        request_id: u32,
        old: String,
        new: String,
    },
    Devices {
        request_id: u32,
        /// A device (NFC) to revoke first.
        revoke: Option<String>,
    },
    // Files (`session::files`, `shard::files`).
    UploadStart {
        request_id: u32,
        name: String,
        mime: String,
        size: u64,
        sha256: [u8; 32],
    },
    UploadChunk {
        request_id: u32,
        upload_id: u64,
        offset: u64,
        data: Vec<u8>,
    },
    UploadFinish {
        request_id: u32,
        upload_id: u64,
    },
    FileSend {
        request_id: u32,
        /// Empty for a group message.
        to: String,
        group_id: u64,
        client_msg_id: u64,
        file_id: u64,
        thumbnail_id: u64,
        media: u8,
        duration_ms: u32,
        width: u32,
        height: u32,
        text: String,
    },
    Download {
        request_id: u32,
        file_id: u64,
        offset: u64,
        length: u32,
    },
}

/// Settings the node announces to every connection.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub heartbeat_interval_ms: u32,
    pub node_name: String,
}

pub struct Conn {
    phase: Phase,
    reader: FrameReader,
    /// Encoded frames waiting for the shard to hand them to the backend.
    out: Vec<u8>,
    /// Monotonic ms of the last frame received; drives the idle timeout.
    pub last_rx_ms: u64,
    pub opened_ms: u64,
    /// Sends handed to the store writer and not yet answered.
    pub inflight: u32,
    /// Frames the peer sent while a login was pending; replayed once it completes.
    held: Vec<u8>,
    identity: Option<Identity>,
}

impl Conn {
    pub fn new(now_ms: u64) -> Conn {
        Conn {
            phase: Phase::AwaitHello,
            reader: FrameReader::new(),
            out: Vec::new(),
            last_rx_ms: now_ms,
            opened_ms: now_ms,
            inflight: 0,
            held: Vec::new(),
            identity: None,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// Who logged in on this connection. Stays set once the connection starts closing, so
    /// the shard can still unregister it.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// Whether a `Login` awaits its answer (`login_ok` or `login_failed`).
    pub fn is_logging_in(&self) -> bool {
        self.phase == Phase::LoggingIn
    }

    pub fn is_authenticated(&self) -> bool {
        matches!(self.phase, Phase::Established)
    }

    /// Output produced so far; the shard takes it to the backend.
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Feeds bytes from the peer. Requests for the shard are appended to `requests`.
    /// Returns true when these bytes completed at least one frame and every one was a
    /// ping: heartbeat traffic, which the loop may batch with others for a moment.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        now_ms: u64,
        config: &SessionConfig,
        requests: &mut Vec<Request>,
    ) -> bool {
        if self.phase == Phase::Closing {
            return false;
        }
        self.last_rx_ms = now_ms;
        if self.phase == Phase::LoggingIn {
            // Keep order: nothing after a login is handled before the login completes.
            if self.held.len() + bytes.len() > FRAME_SIZE_MAX {
                self.fail(
                    0,
                    ErrorCode::ProtocolViolation,
                    "too much data before login completed",
                );
                return false;
            }
            self.held.extend_from_slice(bytes);
            return false;
        }
        let mut only_pings = true;
        let mut frames = 0u32;
        let Conn {
            phase,
            reader,
            out,
            held,
            ..
        } = self;
        let result = reader.feed(bytes, |header, payload| {
            only_pings &= header.kind == Kind::Ping;
            frames += 1;
            match handle_frame(phase, out, config, header, payload, requests) {
                Ok(()) => {}
                Err((request_id, code, message)) => {
                    write_error(out, request_id, code, &message);
                    if code.closes_connection() {
                        *phase = Phase::Closing;
                    }
                }
            }
            if *phase == Phase::LoggingIn {
                // The rest of this input waits for the login's answer.
                return false;
            }
            *phase != Phase::Closing
        });
        match result {
            Err(error) => {
                self.fail(0, ErrorCode::MalformedFrame, &error.to_string());
                false
            }
            Ok(consumed) if *phase == Phase::LoggingIn => {
                // The reader stopped after the login frame; keep what followed it.
                held.extend_from_slice(&bytes[consumed..]);
                false
            }
            Ok(_) => frames > 0 && only_pings && *phase != Phase::Closing,
        }
    }

    /// Completes a login: the shard checked the credential.
    pub fn login_ok(
        &mut self,
        request_id: u32,
        identity: Identity,
        ok: &LoginOk,
        now_ms: u64,
        config: &SessionConfig,
        requests: &mut Vec<Request>,
    ) {
        assert_eq!(self.phase, Phase::LoggingIn);
        protocol::encode(&mut self.out, Kind::LoginOk, request_id, ok);
        self.phase = Phase::Established;
        self.identity = Some(identity);
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.receive(&held, now_ms, config, requests);
        }
    }

    /// Refuses a login and closes.
    pub fn login_failed(&mut self, request_id: u32, code: ErrorCode, message: &str) {
        assert_eq!(self.phase, Phase::LoggingIn);
        self.held = Vec::new();
        self.fail(request_id, code, message);
    }

    pub fn reply_send_ack(&mut self, request_id: u32, ack: &SendAck) {
        if self.phase != Phase::Closing {
            protocol::encode(&mut self.out, Kind::SendAck, request_id, ack);
        }
    }

    /// Answers a request with an error; closes the connection if the code says so.
    pub fn reply_error(&mut self, request_id: u32, code: ErrorCode, message: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        write_error(&mut self.out, request_id, code, message);
        if code.closes_connection() {
            self.phase = Phase::Closing;
        }
    }

    /// Sends an error frame and stops reading. The shard closes once the output is taken.
    pub fn fail(&mut self, request_id: u32, code: ErrorCode, message: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        write_error(&mut self.out, request_id, code, message);
        self.phase = Phase::Closing;
    }

    /// Stops reading and closes once the output is taken, without a frame: the node holds
    /// more output for this connection than it allows (`limits::CONNECTION_BACKLOG_MAX`).
    /// What is already in the output still goes out.
    pub fn close_without_frame(&mut self) {
        self.phase = Phase::Closing;
    }

    /// Another login took this device: tell the peer why, then close.
    pub fn kick(&mut self, message: &str) {
        self.kick_with(ErrorCode::ReplacedByNewLogin, message);
    }

    /// Sends `Kicked { code }` and closes: the node ends this session for a reason of its
    /// own (`ReplacedByNewLogin`, `Revoked`).
    pub fn kick_with(&mut self, code: ErrorCode, message: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        let kicked = Kicked {
            code: code as u16,
            message: truncate(message, ERROR_MESSAGE_SIZE_MAX).to_owned(),
        };
        protocol::encode(&mut self.out, Kind::Kicked, 0, &kicked);
        self.phase = Phase::Closing;
    }

    pub fn reply_sync_page(&mut self, request_id: u32, page: &SyncPageRef<'_>) {
        if self.phase != Phase::Closing {
            protocol::encode(&mut self.out, Kind::SyncPage, request_id, page);
        }
    }

    /// Answers a request with one frame of `kind` carrying `value`.
    pub fn reply<T>(&mut self, kind: Kind, request_id: u32, value: &T)
    where
        T: for<'a> rkyv::Serialize<
                rkyv::api::high::HighSerializer<
                    Vec<u8>,
                    rkyv::ser::allocator::ArenaHandle<'a>,
                    rkyv::rancor::Failure,
                >,
            >,
    {
        if self.phase != Phase::Closing {
            protocol::encode(&mut self.out, kind, request_id, value);
        }
    }

    /// Pushes timeline entries (already committed) to an established connection.
    pub fn push(&mut self, entries: Vec<EntryRef<'_>>) {
        if self.is_authenticated() && !entries.is_empty() {
            protocol::encode(&mut self.out, Kind::Push, 0, &PushRef { entries });
        }
    }
}

fn write_error(out: &mut Vec<u8>, request_id: u32, code: ErrorCode, message: &str) {
    let body = ErrorBody {
        code: code as u16,
        message: truncate(message, ERROR_MESSAGE_SIZE_MAX).to_owned(),
    };
    protocol::encode(out, Kind::Error, request_id, &body);
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

type FrameError = (u32, ErrorCode, String);

fn handle_frame(
    phase: &mut Phase,
    out: &mut Vec<u8>,
    config: &SessionConfig,
    header: FrameHeader,
    payload: &[u8],
    requests: &mut Vec<Request>,
) -> Result<(), FrameError> {
    let id = header.request_id;
    let malformed = |e: DecodeError| (id, ErrorCode::MalformedFrame, e.to_string());
    match (&*phase, header.kind) {
        (Phase::AwaitHello, Kind::Hello) => {
            let hello =
                protocol::access::<ArchivedHello>(header.kind, payload).map_err(malformed)?;
            if hello.protocol_version.to_native() != protocol::PROTOCOL_VERSION {
                return Err((
                    id,
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {} not supported; this node speaks {}",
                        hello.protocol_version.to_native(),
                        protocol::PROTOCOL_VERSION
                    ),
                ));
            }
            if hello.client.len() > CLIENT_NAME_SIZE_MAX {
                // A hello the node refuses ends the connection, like a wrong version.
                return Err((
                    id,
                    ErrorCode::ProtocolViolation,
                    "client name too long".into(),
                ));
            }
            let ok = HelloOk {
                protocol_version: protocol::PROTOCOL_VERSION,
                heartbeat_interval_ms: config.heartbeat_interval_ms,
                frame_size_max: FRAME_SIZE_MAX as u32,
                node: config.node_name.clone(),
            };
            protocol::encode(out, Kind::HelloOk, id, &ok);
            *phase = Phase::AwaitLogin;
            Ok(())
        }
        (Phase::AwaitHello, _) => Err((
            id,
            ErrorCode::NotAuthenticated,
            "the first frame must be a hello".into(),
        )),
        (Phase::AwaitLogin, Kind::Login) => {
            let login =
                protocol::access::<ArchivedLogin>(header.kind, payload).map_err(malformed)?;
            let (user, device) = (login.user.as_str(), login.device.as_str());
            if user.is_empty() || user.len() > USER_NAME_SIZE_MAX {
                return Err((id, ErrorCode::AuthFailed, "bad user name".into()));
            }
            // Devices are named like users (NFC, no outer whitespace or control
            // characters), so two spellings of one device share its cursor.
            let device = crate::names::normalize(device, DEVICE_NAME_SIZE_MAX)
                .map_err(|e| (id, ErrorCode::AuthFailed, format!("bad device name: {e}")))?;
            let credential = match &login.credential {
                ArchivedCredential::Password(p) if p.len() <= PASSWORD_SIZE_MAX => {
                    Credential::Password(p.as_str().to_owned())
                }
                ArchivedCredential::Token(t) if t.len() <= TOKEN_SIZE_MAX => {
                    Credential::Token(t.as_str().to_owned())
                }
                _ => return Err((id, ErrorCode::AuthFailed, "credential too long".into())),
            };
            requests.push(Request::Login {
                request_id: id,
                user: user.to_owned(),
                device,
                credential,
            });
            *phase = Phase::LoggingIn;
            Ok(())
        }
        (Phase::AwaitLogin, Kind::Ping) => answer_ping(out, header, payload),
        (Phase::AwaitLogin, Kind::Hello) => Err((
            id,
            ErrorCode::ProtocolViolation,
            "hello was already answered".into(),
        )),
        (Phase::AwaitLogin, _) => Err((id, ErrorCode::NotAuthenticated, "log in first".into())),
        (Phase::Established, Kind::Ping) => answer_ping(out, header, payload),
        (Phase::Established, Kind::Send) => {
            let send = protocol::access::<ArchivedSend>(header.kind, payload).map_err(malformed)?;
            if send.text.len() > MESSAGE_TEXT_SIZE_MAX {
                // Answer without closing: the client can split or drop the message.
                write_error(out, id, ErrorCode::TooLarge, "message text too long");
                return Ok(());
            }
            if send.to.is_empty() || send.to.len() > USER_NAME_SIZE_MAX {
                write_error(out, id, ErrorCode::UnknownUser, "no such user");
                return Ok(());
            }
            if send.client_msg_id.to_native() == 0 {
                write_error(
                    out,
                    id,
                    ErrorCode::InvalidArgument,
                    "client_msg_id must be nonzero",
                );
                return Ok(());
            }
            requests.push(Request::Send {
                request_id: id,
                to: send.to.as_str().to_owned(),
                client_msg_id: send.client_msg_id.to_native(),
                text: send.text.as_str().to_owned(),
            });
            Ok(())
        }
        (Phase::Established, Kind::Sync) => {
            let sync = protocol::access::<ArchivedSync>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::Sync {
                request_id: id,
                after_seq: sync.after_seq.to_native(),
                limit: sync.limit.to_native(),
            });
            Ok(())
        }
        (Phase::Established, Kind::DeviceAck) => {
            let ack =
                protocol::access::<ArchivedDeviceAck>(header.kind, payload).map_err(malformed)?;
            requests.push(Request::DeviceAck {
                up_to_seq: ack.up_to_seq.to_native(),
            });
            Ok(())
        }
        (Phase::Established, kind) if team::is_team_request(kind) => {
            team::handle_frame(out, header, payload, requests)
        }
        (Phase::Established, kind) if files::is_file_request(kind) => {
            files::handle_frame(out, header, payload, requests)
        }
        (Phase::Established, kind) if account::is_account_request(kind) => {
            account::handle_frame(out, header, payload, requests)
        }
        (_, kind) => Err((
            id,
            ErrorCode::ProtocolViolation,
            format!("{kind:?} frames are not accepted here"),
        )),
    }
}

fn answer_ping(out: &mut Vec<u8>, header: FrameHeader, payload: &[u8]) -> Result<(), FrameError> {
    let ping = protocol::access::<ArchivedPing>(header.kind, payload)
        .map_err(|e| (header.request_id, ErrorCode::MalformedFrame, e.to_string()))?;
    protocol::encode(
        out,
        Kind::Pong,
        header.request_id,
        &Pong {
            nonce: ping.nonce.to_native(),
        },
    );
    Ok(())
}

mod account;
mod files;
mod team;

#[cfg(test)]
mod tests;
