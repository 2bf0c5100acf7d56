//! The rkyv types carried in frames, one per frame kind, plus the stored message.
//!
//! Field types are fixed-width (`u32`, `u64`) on purpose: an archived `usize` is 32 bits
//! on every target, and a 64-bit node must never truncate a value a 32-bit client sent.

use rkyv::{Archive, Deserialize, Serialize};

/// Client → node, first frame of a connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol_version: u32,
    /// Free-form client description, for logs.
    pub client: String,
}

/// Node → client, answer to `Hello`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HelloOk {
    pub protocol_version: u32,
    /// The client pings at this interval; a connection silent for 2.5 intervals is closed.
    pub heartbeat_interval_ms: u32,
    pub frame_size_max: u32,
    pub node: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    Password(String),
    /// A token from an earlier `LoginOk`.
    Token(String),
}

/// Client → node. `device` names the device within the user's account; a second login
/// of the same user and device kicks the first connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub device: String,
    pub credential: Credential,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LoginOk {
    pub user_id: u64,
    /// Present this on reconnect instead of the password.
    pub token: String,
    pub token_expires_at_ms: u64,
    /// Highest seq in the user's timeline at login.
    pub head_seq: u64,
    /// Highest seq this device acknowledged.
    pub acked_seq: u64,
}

/// Heartbeat. Sent as a request; the node answers `Pong` with the same nonce.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub nonce: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub nonce: u64,
}

/// Client → node: a 1:1 text message. `client_msg_id` is chosen by the sending device and
/// must be unique per sender; a resend with the same id returns the original ack.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub to: String,
    pub client_msg_id: u64,
    pub text: String,
}

/// Node → client, sent only after the message is committed to disk.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAck {
    pub msg_id: u64,
    /// Seq of the message in the sender's own timeline.
    pub seq: u64,
    pub sent_at_ms: u64,
    /// True when this ack answers a resend of an already stored message.
    pub duplicate: bool,
}

/// Client → node: timeline entries with seq > `after_seq`, at most `limit`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    pub after_seq: u64,
    pub limit: u32,
}

/// One timeline entry on the wire. `message` holds the archived `Message` exactly as it is
/// stored, so the node copies it from the map without re-encoding; the client validates it
/// as an archive of its own.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub message: Vec<u8>,
}

/// Node → client: answer to `Sync`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    pub entries: Vec<Entry>,
    /// Highest seq in the timeline when the page was read.
    pub head_seq: u64,
    /// More entries follow after the last one in this page.
    pub has_more: bool,
}

/// Node → client, unsolicited: new timeline entries, in seq order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub entries: Vec<Entry>,
}

/// Encoding-side twin of `Entry` that borrows the stored message bytes. Its archive has the
/// same layout as `Entry`'s (a relative pointer and a 32-bit length).
#[derive(Archive, Serialize)]
pub struct EntryRef<'a> {
    pub seq: u64,
    #[rkyv(with = rkyv::with::InlineAsBox)]
    pub message: &'a [u8],
}

#[derive(Archive, Serialize)]
pub struct SyncPageRef<'a> {
    pub entries: Vec<EntryRef<'a>>,
    pub head_seq: u64,
    pub has_more: bool,
}

#[derive(Archive, Serialize)]
pub struct PushRef<'a> {
    pub entries: Vec<EntryRef<'a>>,
}

/// Client → node: this device has stored every entry up to `up_to_seq`. No answer.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAck {
    pub up_to_seq: u64,
}

/// Node → client before it closes a connection that another login of the same device
/// replaced.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Kicked {
    pub code: u16,
    pub message: String,
}

/// Node → client: a request failed (request id set) or the connection is being closed for
/// a protocol error (request id 0). See `ErrorCode`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

/// A stored 1:1 message: the value in the message map and the bytes inside `Entry`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_id: u64,
    pub from_id: u64,
    pub from: String,
    pub to_id: u64,
    pub to: String,
    pub client_msg_id: u64,
    pub sent_at_ms: u64,
    pub text: String,
}
