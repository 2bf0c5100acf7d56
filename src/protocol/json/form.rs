//! The JSON form of each payload type: one `form!` line per type names its fields in
//! declaration order with the format each travels in, and yields both directions (archived
//! value → JSON fields, JSON fields → owned value). A field added to a protocol type fails
//! to compile here until its JSON form is chosen.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rkyv::Archive;
use rkyv::rancor::Failure;
use rkyv::vec::ArchivedVec;

use super::JsonProblem;
use super::parse::Value;
use crate::protocol::*;

/// Largest integer a JSON number carries exactly in every client (IEEE double): 2⁵³.
pub const JSON_SAFE_INTEGER_MAX: u64 = 1 << 53;

/// A JSON object being written: commas between its fields.
pub(super) struct ObjWriter<'a> {
    pub out: &'a mut String,
    empty: bool,
}

impl<'a> ObjWriter<'a> {
    /// Opens an object: writes `{`.
    pub fn open(out: &'a mut String) -> ObjWriter<'a> {
        out.push('{');
        ObjWriter { out, empty: true }
    }

    /// Writes `"name":` (after a comma unless first); the caller writes the value.
    pub fn key(&mut self, name: &str) {
        if !self.empty {
            self.out.push(',');
        }
        self.empty = false;
        write_str(self.out, name);
        self.out.push(':');
    }

    pub fn close(self) {
        self.out.push('}');
    }
}

/// A JSON string literal: quotes, backslash and control characters escaped.
pub(super) fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON number.
pub(super) fn write_num(out: &mut String, n: u64) {
    let _ = write!(out, "{n}");
}

/// The fields of one JSON object being read. Every key must be taken: `finish` refuses
/// the rest, since a v1 payload has no room for fields it does not define.
pub(super) struct Fields {
    fields: Vec<(String, Value)>,
}

impl Fields {
    pub fn new(fields: Vec<(String, Value)>) -> Fields {
        Fields { fields }
    }

    /// Removes and returns `name`'s value, if present.
    pub fn take_raw(&mut self, name: &str) -> Option<Value> {
        let at = self.fields.iter().position(|(k, _)| k == name)?;
        Some(self.fields.swap_remove(at).1)
    }

    /// Reads the required field `name` in format `F`.
    pub fn take<F: Format>(&mut self, name: &str) -> Result<F::Native, JsonProblem> {
        let value = self
            .take_raw(name)
            .ok_or_else(|| JsonProblem::MissingField(name.to_owned()))?;
        F::read(value).map_err(|p| p.at(name))
    }

    /// Refuses any key left over.
    pub fn finish(self) -> Result<(), JsonProblem> {
        match self.fields.into_iter().next() {
            Some((key, _)) => Err(JsonProblem::UnknownField(key)),
            None => Ok(()),
        }
    }
}

fn wrong(expected: &'static str) -> JsonProblem {
    JsonProblem::WrongType {
        field: String::new(),
        expected,
    }
}

/// How one field travels: its archived type on the binary side, its owned type after
/// reading JSON.
pub(super) trait Format {
    type Archived: ?Sized;
    type Native;
    fn write(a: &Self::Archived, out: &mut String, kind: Kind) -> Result<(), DecodeError>;
    fn read(value: Value) -> Result<Self::Native, JsonProblem>;
}

/// A payload type whose JSON form is an object of its fields.
pub(super) trait Form: Archive + Sized {
    fn write(a: &Self::Archived, w: &mut ObjWriter<'_>, kind: Kind) -> Result<(), DecodeError>;
    fn read(fields: &mut Fields) -> Result<Self, JsonProblem>;
}

macro_rules! number_format {
    ($name:ident, $ty:ty, $expected:literal) => {
        /// A JSON integer in the type's range.
        pub(super) struct $name;
        impl Format for $name {
            type Archived = rkyv::Archived<$ty>;
            type Native = $ty;
            fn write(a: &Self::Archived, out: &mut String, _: Kind) -> Result<(), DecodeError> {
                write_num(out, u64::from(<$ty>::from(*a)));
                Ok(())
            }
            fn read(value: Value) -> Result<$ty, JsonProblem> {
                match value {
                    Value::Int(n) => <$ty>::try_from(n).map_err(|_| wrong($expected)),
                    _ => Err(wrong($expected)),
                }
            }
        }
    };
}

number_format!(U8, u8, "an integer 0..=255");
number_format!(U16, u16, "an integer 0..=65535");
number_format!(U32, u32, "an integer 0..=4294967295");
number_format!(U64, u64, "an integer 0..=18446744073709551615");

/// A u64 that may exceed 2⁵³ (conversation ids, `client_msg_id`, ping nonces): written as a
/// decimal string; read from a decimal string (1 to 20 digits, no sign or space) or from
/// an integer of at most 2⁵³, which every client's numbers hold exactly.
pub(super) struct Id;

const ID_EXPECTED: &str = "a decimal string, or an integer of at most 2^53";

impl Format for Id {
    type Archived = rkyv::Archived<u64>;
    type Native = u64;
    fn write(a: &Self::Archived, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        let _ = write!(out, "\"{}\"", a.to_native());
        Ok(())
    }
    fn read(value: Value) -> Result<u64, JsonProblem> {
        match value {
            Value::Int(n) if n <= JSON_SAFE_INTEGER_MAX => Ok(n),
            Value::Str(s)
                if (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) =>
            {
                s.parse().map_err(|_| wrong(ID_EXPECTED))
            }
            _ => Err(wrong(ID_EXPECTED)),
        }
    }
}

pub(super) struct Bool;

impl Format for Bool {
    type Archived = bool;
    type Native = bool;
    fn write(a: &bool, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        out.push_str(if *a { "true" } else { "false" });
        Ok(())
    }
    fn read(value: Value) -> Result<bool, JsonProblem> {
        match value {
            Value::Bool(b) => Ok(b),
            _ => Err(wrong("true or false")),
        }
    }
}

pub(super) struct Str;

impl Format for Str {
    type Archived = rkyv::string::ArchivedString;
    type Native = String;
    fn write(a: &Self::Archived, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        write_str(out, a.as_str());
        Ok(())
    }
    fn read(value: Value) -> Result<String, JsonProblem> {
        match value {
            Value::Str(s) => Ok(s),
            _ => Err(wrong("a string")),
        }
    }
}

/// Bytes (`Vec<u8>`): standard base64 with padding (RFC 4648 §4), canonical on input.
pub(super) struct Bytes;

impl Format for Bytes {
    type Archived = ArchivedVec<u8>;
    type Native = Vec<u8>;
    fn write(a: &Self::Archived, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        out.push('"');
        BASE64.encode_string(a.as_slice(), out);
        out.push('"');
        Ok(())
    }
    fn read(value: Value) -> Result<Vec<u8>, JsonProblem> {
        const EXPECTED: &str = "a base64 string (standard alphabet, padded)";
        match value {
            Value::Str(s) => BASE64.decode(s).map_err(|_| wrong(EXPECTED)),
            _ => Err(wrong(EXPECTED)),
        }
    }
}

/// An array of values of format `F`.
pub(super) struct ListOf<F>(std::marker::PhantomData<F>);

impl<F: Format> Format for ListOf<F>
where
    F::Archived: Sized,
{
    type Archived = ArchivedVec<F::Archived>;
    type Native = Vec<F::Native>;
    fn write(a: &Self::Archived, out: &mut String, kind: Kind) -> Result<(), DecodeError> {
        out.push('[');
        for (i, item) in a.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            F::write(item, out, kind)?;
        }
        out.push(']');
        Ok(())
    }
    fn read(value: Value) -> Result<Vec<F::Native>, JsonProblem> {
        let Value::Array(items) = value else {
            return Err(wrong("an array"));
        };
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| F::read(item).map_err(|p| p.at(&format!("[{i}]"))))
            .collect()
    }
}

/// A nested object of a `Form` type.
pub(super) struct Obj<T>(std::marker::PhantomData<T>);

impl<T: Form> Format for Obj<T> {
    type Archived = T::Archived;
    type Native = T;
    fn write(a: &T::Archived, out: &mut String, kind: Kind) -> Result<(), DecodeError> {
        let mut w = ObjWriter::open(out);
        T::write(a, &mut w, kind)?;
        w.close();
        Ok(())
    }
    fn read(value: Value) -> Result<T, JsonProblem> {
        let Value::Object(fields) = value else {
            return Err(wrong("an object"));
        };
        let mut fields = Fields::new(fields);
        let value = T::read(&mut fields)?;
        fields.finish()?;
        Ok(value)
    }
}

/// `Credential`: `{"password": "…"}` or `{"token": "…"}`.
pub(super) struct Cred;

impl Format for Cred {
    type Archived = ArchivedCredential;
    type Native = Credential;
    fn write(a: &ArchivedCredential, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        let mut w = ObjWriter::open(out);
        let secret = match a {
            ArchivedCredential::Password(p) => {
                w.key("password");
                p
            }
            ArchivedCredential::Token(t) => {
                w.key("token");
                t
            }
        };
        write_str(w.out, secret.as_str());
        w.close();
        Ok(())
    }
    fn read(value: Value) -> Result<Credential, JsonProblem> {
        const EXPECTED: &str = "an object with one string field, password or token";
        let Value::Object(mut fields) = value else {
            return Err(wrong(EXPECTED));
        };
        match (fields.pop(), fields.is_empty()) {
            (Some((key, Value::Str(s))), true) if key == "password" => Ok(Credential::Password(s)),
            (Some((key, Value::Str(s))), true) if key == "token" => Ok(Credential::Token(s)),
            _ => Err(wrong(EXPECTED)),
        }
    }
}

/// `Record.kind`: its name in docs/protocol.md §11.1, lower case (`group_message`, …). A
/// number this build has no name for is written as its decimal string and read back.
pub(super) struct RecordKind;

const RECORD_KINDS: [(u16, &str); 9] = [
    (record_kind::GROUP_MESSAGE, "group_message"),
    (record_kind::GROUP_CREATED, "group_created"),
    (record_kind::MEMBERS_ADDED, "members_added"),
    (record_kind::MEMBERS_REMOVED, "members_removed"),
    (record_kind::MEMBER_LEFT, "member_left"),
    (record_kind::GROUP_RENAMED, "group_renamed"),
    (record_kind::READ, "read"),
    (record_kind::DELIVERED, "delivered"),
    (record_kind::FILE_MESSAGE, "file_message"),
];

impl Format for RecordKind {
    type Archived = rkyv::Archived<u16>;
    type Native = u16;
    fn write(a: &Self::Archived, out: &mut String, _: Kind) -> Result<(), DecodeError> {
        let n = a.to_native();
        match RECORD_KINDS.iter().find(|(k, _)| *k == n) {
            Some((_, name)) => write_str(out, name),
            None => {
                let _ = write!(out, "\"{n}\"");
            }
        }
        Ok(())
    }
    fn read(value: Value) -> Result<u16, JsonProblem> {
        const EXPECTED: &str = "a record kind name (group_message, …) or its number as a string";
        let Value::Str(s) = value else {
            return Err(wrong(EXPECTED));
        };
        if let Some((n, _)) = RECORD_KINDS.iter().find(|(_, name)| *name == s) {
            return Ok(*n);
        }
        if (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map_err(|_| wrong(EXPECTED));
        }
        Err(wrong(EXPECTED))
    }
}

/// `Entry`: `{"seq": N, "message": {…}}` for a 1:1 `Message`, `{"seq": N, "record": {…}}`
/// for a `Record` (docs/protocol.md §3.5). The nested archive is validated on its own.
pub(super) struct EntryForm;

impl Format for EntryForm {
    type Archived = ArchivedEntry;
    type Native = Entry;
    fn write(a: &ArchivedEntry, out: &mut String, kind: Kind) -> Result<(), DecodeError> {
        let mut w = ObjWriter::open(out);
        w.key("seq");
        write_num(w.out, a.seq.to_native());
        let bytes = a.message.as_slice();
        if is_record(bytes) {
            let record = access::<ArchivedRecord>(kind, &bytes[RECORD_MARKER.len()..])?;
            w.key("record");
            Obj::<Record>::write(record, w.out, kind)?;
        } else {
            let message = access::<ArchivedMessage>(kind, bytes)?;
            w.key("message");
            Obj::<Message>::write(message, w.out, kind)?;
        }
        w.close();
        Ok(())
    }
    fn read(value: Value) -> Result<Entry, JsonProblem> {
        const EXPECTED: &str = "an object with seq and one of message or record";
        let Value::Object(fields) = value else {
            return Err(wrong(EXPECTED));
        };
        let mut fields = Fields::new(fields);
        let seq = fields.take::<U64>("seq")?;
        let message = match (fields.take_raw("message"), fields.take_raw("record")) {
            (Some(m), None) => {
                let m = Obj::<Message>::read(m).map_err(|p| p.at("message"))?;
                archive(&m)
            }
            (None, Some(r)) => {
                let r = Obj::<Record>::read(r).map_err(|p| p.at("record"))?;
                let mut bytes = RECORD_MARKER.to_vec();
                bytes.extend_from_slice(&archive(&r));
                bytes
            }
            _ => return Err(wrong(EXPECTED)),
        };
        fields.finish()?;
        Ok(Entry { seq, message })
    }
}

/// `code` and, for the reader, `name` (the code's name, §5: output only, ignored on input)
/// and `message`: the fields of `ErrorBody` and `Kicked`.
fn write_coded(code: u16, message: &str, w: &mut ObjWriter<'_>) {
    w.key("code");
    write_num(w.out, u64::from(code));
    w.key("name");
    write_str(
        w.out,
        ErrorCode::from_u16(code).map_or("unknown", ErrorCode::name),
    );
    w.key("message");
    write_str(w.out, message);
}

fn read_coded(fields: &mut Fields) -> Result<(u16, String), JsonProblem> {
    let code = fields.take::<U16>("code")?;
    if let Some(name) = fields.take_raw("name") {
        Str::read(name).map_err(|p| p.at("name"))?;
    }
    Ok((code, fields.take::<Str>("message")?))
}

impl Form for ErrorBody {
    fn write(a: &ArchivedErrorBody, w: &mut ObjWriter<'_>, _: Kind) -> Result<(), DecodeError> {
        write_coded(a.code.to_native(), a.message.as_str(), w);
        Ok(())
    }
    fn read(fields: &mut Fields) -> Result<Self, JsonProblem> {
        let (code, message) = read_coded(fields)?;
        Ok(ErrorBody { code, message })
    }
}

impl Form for Kicked {
    fn write(a: &ArchivedKicked, w: &mut ObjWriter<'_>, _: Kind) -> Result<(), DecodeError> {
        write_coded(a.code.to_native(), a.message.as_str(), w);
        Ok(())
    }
    fn read(fields: &mut Fields) -> Result<Self, JsonProblem> {
        let (code, message) = read_coded(fields)?;
        Ok(Kicked { code, message })
    }
}

type Ser<'a> =
    rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, Failure>;

/// The archive of `value` alone, as the node's encoder lays it out.
pub(super) fn archive<T: for<'a> rkyv::Serialize<Ser<'a>>>(value: &T) -> Vec<u8> {
    rkyv::api::high::to_bytes_in::<_, Failure>(value, Vec::new())
        .expect("serializing into a Vec cannot fail")
}

macro_rules! form {
    ($ty:ident { $($field:ident: $fmt:ty),* $(,)? }) => {
        impl Form for $ty {
            fn write(
                a: &<Self as Archive>::Archived,
                w: &mut ObjWriter<'_>,
                kind: Kind,
            ) -> Result<(), DecodeError> {
                $(
                    w.key(stringify!($field));
                    <$fmt as Format>::write(&a.$field, w.out, kind)?;
                )*
                Ok(())
            }
            fn read(fields: &mut Fields) -> Result<Self, JsonProblem> {
                Ok($ty { $($field: fields.take::<$fmt>(stringify!($field))?,)* })
            }
        }
    };
}

form!(Hello {
    protocol_version: U32,
    client: Str
});
form!(HelloOk {
    protocol_version: U32,
    heartbeat_interval_ms: U32,
    frame_size_max: U32,
    node: Str
});
form!(Login {
    user: Str,
    device: Str,
    credential: Cred
});
form!(LoginOk {
    user_id: U64,
    token: Str,
    token_expires_at_ms: U64,
    head_seq: U64,
    acked_seq: U64
});
form!(Ping { nonce: Id });
form!(Pong { nonce: Id });
form!(Send {
    to: Str,
    client_msg_id: Id,
    text: Str
});
form!(SendAck {
    msg_id: U64,
    seq: U64,
    sent_at_ms: U64,
    duplicate: Bool
});
form!(Sync {
    after_seq: U64,
    limit: U32
});
form!(SyncPage { entries: ListOf<EntryForm>, head_seq: U64, has_more: Bool });
form!(Push { entries: ListOf<EntryForm> });
form!(DeviceAck { up_to_seq: U64 });
form!(Message {
    msg_id: U64,
    from_id: U64,
    from: Str,
    to_id: U64,
    to: Str,
    client_msg_id: Id,
    sent_at_ms: U64,
    text: Str,
});
form!(Record {
    kind: RecordKind,
    msg_id: U64,
    conv: Id,
    from_id: U64,
    from: Str,
    users: ListOf<U64>,
    client_msg_id: Id,
    sent_at_ms: U64,
    up_to: U64,
    text: Str,
    attachments: ListOf<Obj<Attachment>>,
});
form!(GroupOp { op: U8, group_id: U64, name: Str, users: ListOf<Str> });
form!(GroupQuery { group_id: U64 });
form!(GroupMember {
    user_id: U64,
    name: Str,
    owner: Bool
});
form!(GroupInfo {
    group_id: U64,
    name: Str,
    owner_id: U64,
    members: ListOf<Obj<GroupMember>>,
    seq: U64,
});
form!(GroupList {
    after_group_id: U64,
    limit: U32
});
form!(GroupSummary {
    group_id: U64,
    name: Str,
    owner_id: U64,
    members: U32
});
form!(GroupListPage { groups: ListOf<Obj<GroupSummary>>, has_more: Bool });
form!(GroupSend {
    group_id: U64,
    client_msg_id: Id,
    text: Str
});
form!(History {
    conv: Id,
    before_seq: U64,
    limit: U32
});
form!(HistoryPage { entries: ListOf<EntryForm>, has_more: Bool });
form!(Conversations {
    offset: U32,
    limit: U32
});
form!(ConversationItem {
    conv: Id,
    title: Str,
    last_seq: U64,
    last_at_ms: U64,
    last_from: Str,
    preview: Str,
    unread: U32,
    read_seq: U64,
});
form!(ConversationsPage { items: ListOf<Obj<ConversationItem>>, total: U32 });
form!(Read {
    conv: Id,
    up_to_seq: U64
});
form!(ReadOk {
    conv: Id,
    read_seq: U64,
    unread: U32
});
form!(PresenceSubscribe { users: ListOf<Str> });
form!(PresenceQuery { users: ListOf<Str> });
form!(PresenceItem {
    user_id: U64,
    name: Str,
    online: Bool,
    version: U64
});
form!(PresenceState { users: ListOf<Obj<PresenceItem>> });
form!(PresencePush {
    user_id: U64,
    online: Bool,
    version: U64
});
form!(Typing { conv: Id });
form!(TypingPush {
    conv: Id,
    from_id: U64,
    from: Str
});
form!(UploadStart {
    name: Str,
    mime: Str,
    size: U64,
    sha256: Bytes
});
form!(UploadReady {
    upload_id: U64,
    offset: U64
});
form!(UploadChunk {
    upload_id: U64,
    offset: U64,
    data: Bytes
});
form!(UploadAck {
    upload_id: U64,
    offset: U64
});
form!(UploadFinish { upload_id: U64 });
form!(FileInfo {
    file_id: U64,
    name: Str,
    mime: Str,
    size: U64,
    sha256: Bytes
});
form!(Attachment {
    file_id: U64,
    thumbnail_id: U64,
    media: U8,
    size: U64,
    duration_ms: U32,
    width: U32,
    height: U32,
    mime: Str,
    name: Str,
    sha256: Bytes,
});
form!(FileSend {
    to: Str,
    group_id: U64,
    client_msg_id: Id,
    file_id: U64,
    thumbnail_id: U64,
    media: U8,
    duration_ms: U32,
    width: U32,
    height: U32,
    text: Str,
});
form!(Download {
    file_id: U64,
    offset: U64,
    length: U32
});
form!(FileChunk {
    file_id: U64,
    offset: U64,
    size: U64,
    data: Bytes,
    sha256: Bytes
});
form!(Logout { everywhere: Bool });
form!(ChangePassword { old: Str, new: Str });
form!(Devices { revoke: Str });
form!(DeviceItem {
    name: Str,
    acked_seq: U64,
    online: Bool,
    current: Bool
});
form!(DevicesPage { devices: ListOf<Obj<DeviceItem>> });
