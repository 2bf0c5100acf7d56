//! The JSON form of every frame, for clients that speak JSON over WebSocket text frames
//! (docs/protocol.md, "WebSocket and JSON").
//!
//! One JSON object mirrors one binary frame: `{"kind": "<snake_case kind>", "request_id":
//! N, …the payload's fields}`. `frame_from_json` turns a client's text into the exact frame
//! bytes the node's session reads, so the session and the shard judge it as they judge a
//! binary frame (limits, errors, kinds not allowed in the connection's state);
//! `frame_to_json` turns a frame the node wrote into its text. Both directions cover every
//! kind. No I/O and no state: a transport calls these per message.
//!
//! Field formats: integers are JSON numbers, except the u64 values that can exceed 2⁵³
//! (conversation ids `conv`, `client_msg_id`, ping `nonce`), which are decimal strings;
//! bytes (`sha256`, `data`) are standard padded base64; a `Credential` is
//! `{"password": …}` or `{"token": …}`; timeline entries are `{"seq", "message"}` or
//! `{"seq", "record"}`; `Error` and `Kicked` add the code's `name`.

mod form;
mod parse;
#[cfg(test)]
mod tests;

use std::fmt;

use form::{Fields, Form, ObjWriter, Str, U32};
use parse::{ParseError, Value};

pub use form::JSON_SAFE_INTEGER_MAX;

use crate::limits::{
    ERROR_MESSAGE_SIZE_MAX, FRAME_HEADER_SIZE, FRAME_SIZE_MAX, JSON_TEXT_SIZE_MAX,
};
use crate::protocol::*;

/// Why a client's JSON text is not a frame. Each is answered like the binary frame it
/// stands for: `code()` (`malformed_frame`, which closes the connection), under
/// `request_id` when the text got that far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// The object's `request_id`, once read; None when the text is not an object or its
    /// `request_id` is missing or not a u32.
    pub request_id: Option<u32>,
    /// The frame kind named by `kind`, once read.
    pub kind: Option<Kind>,
    pub problem: JsonProblem,
}

/// What is wrong with a client's JSON text. Field paths name nested fields as
/// `credential.password` or `entries[2].message.text`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonProblem {
    /// The text has more than `JSON_TEXT_SIZE_MAX` bytes (`len`); it was not parsed.
    TooLong {
        len: usize,
    },
    /// Not one JSON value (or not UTF-8): serde_json's description.
    Syntax(String),
    /// Arrays and objects nested deeper than `JSON_DEPTH_MAX`.
    TooDeep,
    /// An object with more than `JSON_OBJECT_KEYS_MAX` keys.
    TooManyKeys,
    /// An object with a key twice.
    DuplicateKey(String),
    /// The value is not an object.
    NotAnObject,
    /// `kind` names no frame kind.
    UnknownKind(String),
    MissingField(String),
    /// The field's value has another JSON type or is out of its range.
    WrongType {
        field: String,
        expected: &'static str,
    },
    /// A key the kind's payload does not have.
    UnknownField(String),
    /// The frame the text stands for would be `size` bytes, over `FRAME_SIZE_MAX`.
    FrameTooLarge {
        size: usize,
    },
}

impl JsonProblem {
    /// The same problem inside field `outer`.
    fn at(self, outer: &str) -> JsonProblem {
        let join = |inner: String| {
            if inner.is_empty() {
                outer.to_owned()
            } else if inner.starts_with('[') {
                format!("{outer}{inner}")
            } else {
                format!("{outer}.{inner}")
            }
        };
        match self {
            JsonProblem::MissingField(f) => JsonProblem::MissingField(join(f)),
            JsonProblem::UnknownField(f) => JsonProblem::UnknownField(join(f)),
            JsonProblem::WrongType { field, expected } => JsonProblem::WrongType {
                field: join(field),
                expected,
            },
            other => other,
        }
    }
}

impl JsonError {
    /// The error code the node answers with: a text that is not a valid frame is a
    /// malformed frame, as in the binary protocol (docs/protocol.md §5). It closes the
    /// connection.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::MalformedFrame
    }
}

impl fmt::Display for JsonProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonProblem::TooLong { len } => {
                write!(f, "text of {len} bytes exceeds {JSON_TEXT_SIZE_MAX}")
            }
            JsonProblem::Syntax(e) => write!(f, "not JSON: {e}"),
            JsonProblem::TooDeep => {
                write!(f, "nested deeper than {}", crate::limits::JSON_DEPTH_MAX)
            }
            JsonProblem::TooManyKeys => write!(
                f,
                "an object has more than {} keys",
                crate::limits::JSON_OBJECT_KEYS_MAX
            ),
            JsonProblem::DuplicateKey(k) => write!(f, "key {k:?} appears twice"),
            JsonProblem::NotAnObject => write!(f, "not a JSON object"),
            JsonProblem::UnknownKind(k) => write!(f, "unknown kind {k:?}"),
            JsonProblem::MissingField(k) => write!(f, "missing field {k}"),
            JsonProblem::WrongType { field, expected } => {
                write!(f, "field {field}: expected {expected}")
            }
            JsonProblem::UnknownField(k) => write!(f, "unknown field {k}"),
            JsonProblem::FrameTooLarge { size } => {
                write!(f, "frame of {size} bytes exceeds {FRAME_SIZE_MAX}")
            }
        }
    }
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.problem.fmt(f)
    }
}

impl std::error::Error for JsonError {}

impl From<ParseError> for JsonProblem {
    fn from(e: ParseError) -> JsonProblem {
        match e {
            ParseError::Syntax(s) => JsonProblem::Syntax(s),
            ParseError::TooDeep => JsonProblem::TooDeep,
            ParseError::TooManyKeys => JsonProblem::TooManyKeys,
            ParseError::DuplicateKey(k) => JsonProblem::DuplicateKey(k),
        }
    }
}

/// Every kind with its payload type and JSON name. The matches below are exhaustive, so a
/// kind added to `Kind` without a line here fails to compile.
macro_rules! kinds {
    ($($kind:ident => $ty:ident, $name:literal;)*) => {
        /// The JSON name of `kind` (`"hello_ok"`, …): `Kind`'s name in snake case.
        pub fn kind_name(kind: Kind) -> &'static str {
            match kind {
                $(Kind::$kind => $name,)*
            }
        }

        /// The kind whose JSON name is `name`.
        pub fn kind_from_name(name: &str) -> Option<Kind> {
            match name {
                $($name => Some(Kind::$kind),)*
                _ => None,
            }
        }

        fn write_payload(
            kind: Kind,
            payload: &[u8],
            w: &mut ObjWriter<'_>,
        ) -> Result<(), DecodeError> {
            match kind {
                $(Kind::$kind => {
                    let archived = access::<<$ty as rkyv::Archive>::Archived>(kind, payload)?;
                    <$ty as Form>::write(archived, w, kind)
                })*
            }
        }

        fn read_payload(kind: Kind, fields: &mut Fields) -> Result<Vec<u8>, JsonProblem> {
            Ok(match kind {
                $(Kind::$kind => form::archive(&<$ty as Form>::read(fields)?),)*
            })
        }
    };
}

kinds! {
    Hello => Hello, "hello";
    HelloOk => HelloOk, "hello_ok";
    Login => Login, "login";
    LoginOk => LoginOk, "login_ok";
    Ping => Ping, "ping";
    Pong => Pong, "pong";
    Send => Send, "send";
    SendAck => SendAck, "send_ack";
    Sync => Sync, "sync";
    SyncPage => SyncPage, "sync_page";
    Push => Push, "push";
    DeviceAck => DeviceAck, "device_ack";
    Kicked => Kicked, "kicked";
    Error => ErrorBody, "error";
    GroupOp => GroupOp, "group_op";
    GroupQuery => GroupQuery, "group_query";
    GroupInfo => GroupInfo, "group_info";
    GroupList => GroupList, "group_list";
    GroupListPage => GroupListPage, "group_list_page";
    GroupSend => GroupSend, "group_send";
    History => History, "history";
    HistoryPage => HistoryPage, "history_page";
    Conversations => Conversations, "conversations";
    ConversationsPage => ConversationsPage, "conversations_page";
    Read => Read, "read";
    ReadOk => ReadOk, "read_ok";
    PresenceSubscribe => PresenceSubscribe, "presence_subscribe";
    PresenceQuery => PresenceQuery, "presence_query";
    PresenceState => PresenceState, "presence_state";
    PresencePush => PresencePush, "presence_push";
    Typing => Typing, "typing";
    TypingPush => TypingPush, "typing_push";
    UploadStart => UploadStart, "upload_start";
    UploadReady => UploadReady, "upload_ready";
    UploadChunk => UploadChunk, "upload_chunk";
    UploadAck => UploadAck, "upload_ack";
    UploadFinish => UploadFinish, "upload_finish";
    FileInfo => FileInfo, "file_info";
    FileSend => FileSend, "file_send";
    Download => Download, "download";
    FileChunk => FileChunk, "file_chunk";
    Logout => Logout, "logout";
    ChangePassword => ChangePassword, "change_password";
    Devices => Devices, "devices";
    DevicesPage => DevicesPage, "devices_page";
}

/// Client → node: appends to `out` the binary frame (header and rkyv payload) that the JSON
/// object in `text` stands for, and returns its header. Any kind is translated, node→client
/// kinds too: the session then refuses those as it refuses them in binary
/// (`protocol_violation`, or `not_authenticated` before login), and it applies every limit
/// and check of the kind (text length, names, ids). Errors are what no binary frame could
/// carry: `text` over `JSON_TEXT_SIZE_MAX`, not JSON, nested over `JSON_DEPTH_MAX`, not an
/// object, an unknown `kind`, a missing, unknown or mistyped field, or a frame over
/// `FRAME_SIZE_MAX`. On error `out` is unchanged.
///
/// Memory: the parsed tree, at most a small multiple of `text`'s length.
pub fn frame_from_json(text: &[u8], out: &mut Vec<u8>) -> Result<FrameHeader, JsonError> {
    let fail = |request_id, kind, problem| JsonError {
        request_id,
        kind,
        problem,
    };
    if text.len() > JSON_TEXT_SIZE_MAX {
        return Err(fail(None, None, JsonProblem::TooLong { len: text.len() }));
    }
    let value = parse::parse(text).map_err(|e| fail(None, None, e.into()))?;
    let Value::Object(fields) = value else {
        return Err(fail(None, None, JsonProblem::NotAnObject));
    };
    let mut fields = Fields::new(fields);
    // Both header fields first, so that a later problem is reported under them.
    let request_id = fields.take::<U32>("request_id");
    let kind = fields
        .take::<Str>("kind")
        .and_then(|name| kind_from_name(&name).ok_or(JsonProblem::UnknownKind(name)));
    let (request_id, kind) = match (request_id, kind) {
        (Ok(id), Ok(kind)) => (id, kind),
        (Err(p), kind) => return Err(fail(None, kind.ok(), p)),
        (Ok(id), Err(p)) => return Err(fail(Some(id), None, p)),
    };
    let payload = read_payload(kind, &mut fields)
        .and_then(|payload| fields.finish().map(|()| payload))
        .map_err(|p| fail(Some(request_id), Some(kind), p))?;
    let size = FRAME_HEADER_SIZE + payload.len();
    if size > FRAME_SIZE_MAX {
        return Err(fail(
            Some(request_id),
            Some(kind),
            JsonProblem::FrameTooLarge { size },
        ));
    }
    encode_with(out, kind, request_id, |out| out.extend_from_slice(&payload));
    Ok(FrameHeader {
        kind,
        request_id,
        payload_len: payload.len() as u32,
    })
}

/// Node → client: appends to `out` the JSON object of one complete frame (header
/// included), as the node writes it. Every kind is translated, client→node kinds too. The
/// payload is validated with rkyv's checked access, and so is each timeline entry's nested
/// archive; a frame that fails (which the node never writes) is a `DecodeError` and leaves
/// `out` unchanged: `BadLength` also when `frame` is not exactly one frame.
///
/// Size: strings grow at most 6× (a control character becomes `\u00XX`), bytes 4/3
/// (base64), and each field adds its name.
pub fn frame_to_json(frame: &[u8], out: &mut String) -> Result<(), DecodeError> {
    if frame.len() < FRAME_HEADER_SIZE {
        return Err(DecodeError::BadLength(frame.len() as u32));
    }
    let header = read_header(frame)?;
    if frame.len() != FRAME_HEADER_SIZE + header.payload_len as usize {
        return Err(DecodeError::BadLength((frame.len() - 4) as u32));
    }
    payload_to_json(header, &frame[FRAME_HEADER_SIZE..], out)
}

/// `frame_to_json` for a frame already split by `FrameReader::feed`: its header and payload.
pub fn payload_to_json(
    header: FrameHeader,
    payload: &[u8],
    out: &mut String,
) -> Result<(), DecodeError> {
    let start = out.len();
    let mut w = ObjWriter::open(out);
    w.key("kind");
    form::write_str(w.out, kind_name(header.kind));
    w.key("request_id");
    form::write_num(w.out, u64::from(header.request_id));
    match write_payload(header.kind, payload, &mut w) {
        Ok(()) => {
            w.close();
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Appends the JSON of an `Error` frame: what a transport answers to a `JsonError` (with
/// `error.code()`, its request id or 0, and its text). `message` is cut to
/// `ERROR_MESSAGE_SIZE_MAX` bytes on a character boundary, as the node cuts its own.
pub fn error_to_json(request_id: u32, code: ErrorCode, message: &str, out: &mut String) {
    let mut end = message.len().min(ERROR_MESSAGE_SIZE_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let body = ErrorBody {
        code: code as u16,
        message: message[..end].to_owned(),
    };
    let mut frame = Vec::new();
    encode(&mut frame, Kind::Error, request_id, &body);
    frame_to_json(&frame, out).expect("an encoded error frame is valid");
}
