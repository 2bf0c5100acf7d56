//! Frame header, encoding into a caller's buffer, and reassembly of frames from a byte
//! stream. Decoding never allocates except to hold one partially received frame.

use rkyv::api::high::HighSerializer;
use rkyv::rancor::Failure;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::{Portable, Serialize};

use crate::limits::{FRAME_HEADER_SIZE, FRAME_SIZE_MAX};

/// Frame kinds. The numbers are protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    HelloOk = 2,
    Login = 3,
    LoginOk = 4,
    Ping = 5,
    Pong = 6,
    Send = 7,
    SendAck = 8,
    Sync = 9,
    SyncPage = 10,
    Push = 11,
    DeviceAck = 12,
    Kicked = 13,
    Error = 14,
    // Team messaging (src/protocol/team.rs).
    GroupOp = 15,
    GroupQuery = 16,
    GroupInfo = 17,
    GroupList = 18,
    GroupListPage = 19,
    GroupSend = 20,
    History = 21,
    HistoryPage = 22,
    Conversations = 23,
    ConversationsPage = 24,
    Read = 25,
    ReadOk = 26,
    // Presence and typing (src/protocol/presence.rs).
    PresenceSubscribe = 27,
    PresenceQuery = 28,
    PresenceState = 29,
    PresencePush = 30,
    Typing = 31,
    TypingPush = 32,
    // Files (src/protocol/files.rs).
    UploadStart = 33,
    UploadReady = 34,
    UploadChunk = 35,
    UploadAck = 36,
    UploadFinish = 37,
    FileInfo = 38,
    FileSend = 39,
    Download = 40,
    FileChunk = 41,
    // Account: logout, password change, devices (src/protocol/account.rs).
    Logout = 42,
    ChangePassword = 43,
    Devices = 44,
    DevicesPage = 45,
}

impl Kind {
    pub fn from_u16(kind: u16) -> Option<Kind> {
        use Kind::*;
        Some(match kind {
            1 => Hello,
            2 => HelloOk,
            3 => Login,
            4 => LoginOk,
            5 => Ping,
            6 => Pong,
            7 => Send,
            8 => SendAck,
            9 => Sync,
            10 => SyncPage,
            11 => Push,
            12 => DeviceAck,
            13 => Kicked,
            14 => Error,
            15 => GroupOp,
            16 => GroupQuery,
            17 => GroupInfo,
            18 => GroupList,
            19 => GroupListPage,
            20 => GroupSend,
            21 => History,
            22 => HistoryPage,
            23 => Conversations,
            24 => ConversationsPage,
            25 => Read,
            26 => ReadOk,
            27 => PresenceSubscribe,
            28 => PresenceQuery,
            29 => PresenceState,
            30 => PresencePush,
            31 => Typing,
            32 => TypingPush,
            33 => UploadStart,
            34 => UploadReady,
            35 => UploadChunk,
            36 => UploadAck,
            37 => UploadFinish,
            38 => FileInfo,
            39 => FileSend,
            40 => Download,
            41 => FileChunk,
            42 => Logout,
            43 => ChangePassword,
            44 => Devices,
            45 => DevicesPage,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    pub request_id: u32,
    /// Bytes of the archive after the header.
    pub payload_len: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Length prefix below the header size or above `FRAME_SIZE_MAX`.
    BadLength(u32),
    UnknownKind(u16),
    /// Reserved flag bits set.
    BadFlags(u16),
    /// The archive failed rkyv validation for the frame's kind.
    BadArchive(Kind),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::BadLength(len) => write!(f, "frame length {len} out of range"),
            DecodeError::UnknownKind(kind) => write!(f, "unknown frame kind {kind}"),
            DecodeError::BadFlags(flags) => write!(f, "reserved flags set: {flags:#x}"),
            DecodeError::BadArchive(kind) => write!(f, "invalid {kind:?} archive"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Total frame size announced by the first 4 bytes, or None if fewer are present.
pub fn frame_len(bytes: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    // Saturating: on a 32-bit target a hostile prefix near u32::MAX would wrap to a tiny
    // length; any length this large is refused by `read_header` anyway.
    Some((u32::from_le_bytes(prefix) as usize).saturating_add(4))
}

/// Parses and checks a header. `bytes` holds at least `FRAME_HEADER_SIZE` bytes.
pub fn read_header(bytes: &[u8]) -> Result<FrameHeader, DecodeError> {
    assert!(bytes.len() >= FRAME_HEADER_SIZE);
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    // Compared without adding to `len`: `len + 4` overflows usize on 32-bit targets.
    if (len as usize) < FRAME_HEADER_SIZE - 4 || len as usize > FRAME_SIZE_MAX - 4 {
        return Err(DecodeError::BadLength(len));
    }
    let kind_raw = u16::from_le_bytes(bytes[4..6].try_into().expect("2 bytes"));
    let flags = u16::from_le_bytes(bytes[6..8].try_into().expect("2 bytes"));
    let request_id = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let kind = Kind::from_u16(kind_raw).ok_or(DecodeError::UnknownKind(kind_raw))?;
    if flags != 0 {
        return Err(DecodeError::BadFlags(flags));
    }
    Ok(FrameHeader {
        kind,
        request_id,
        payload_len: len - (FRAME_HEADER_SIZE as u32 - 4),
    })
}

/// Validates `payload` in place as an archive of `T`.
pub fn access<T>(kind: Kind, payload: &[u8]) -> Result<&T, DecodeError>
where
    T: Portable + for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::low::LowValidator<'a, Failure>>,
{
    rkyv::api::low::access::<T, Failure>(payload).map_err(|_| DecodeError::BadArchive(kind))
}

type Ser<'a> = HighSerializer<Vec<u8>, ArenaHandle<'a>, Failure>;

/// Appends one frame carrying `value` to `out`. Returns the frame's size.
///
/// Panics if the frame exceeds `FRAME_SIZE_MAX`: callers bound what they encode (texts,
/// page byte budgets), so an oversized frame is a bug in the node, not peer input.
pub fn encode<T>(out: &mut Vec<u8>, kind: Kind, request_id: u32, value: &T) -> usize
where
    T: for<'a> Serialize<Ser<'a>>,
{
    encode_with(out, kind, request_id, |out| {
        // The serializer takes its writer by value; lend it the buffer and take it back.
        let buf = std::mem::take(out);
        *out = rkyv::api::high::to_bytes_in::<_, Failure>(value, buf)
            .expect("serializing into a Vec cannot fail");
    })
}

/// Appends one frame whose payload `write` appends to the buffer.
pub fn encode_with(
    out: &mut Vec<u8>,
    kind: Kind,
    request_id: u32,
    write: impl FnOnce(&mut Vec<u8>),
) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_SIZE]);
    write(out);
    let size = out.len() - start;
    assert!(
        size <= FRAME_SIZE_MAX,
        "encoded {kind:?} frame of {size} bytes"
    );
    let len = (size - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 6].copy_from_slice(&(kind as u16).to_le_bytes());
    out[start + 6..start + 8].copy_from_slice(&0u16.to_le_bytes());
    out[start + 8..start + 12].copy_from_slice(&request_id.to_le_bytes());
    size
}

/// Reassembles frames from a byte stream. Holds bytes only while a frame is incomplete, so
/// an idle connection owns no buffer.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes of one incomplete frame; empty between frames. Never longer than
    /// `FRAME_SIZE_MAX`.
    partial: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// Bytes buffered for an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.partial.len()
    }

    /// Feeds `input`; calls `on_frame` for each complete frame in order. Stops at the first
    /// malformed header, or when `on_frame` returns false. Returns how many bytes of `input`
    /// were consumed (all of them unless `on_frame` stopped early; the caller keeps the rest).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_frame: impl FnMut(FrameHeader, &[u8]) -> bool,
    ) -> Result<usize, DecodeError> {
        let total_len = input.len();
        let mut input = input;
        if !self.partial.is_empty() {
            // Complete the buffered frame first: its header, then its body.
            if self.partial.len() < FRAME_HEADER_SIZE {
                let take = (FRAME_HEADER_SIZE - self.partial.len()).min(input.len());
                self.partial.extend_from_slice(&input[..take]);
                input = &input[take..];
                if self.partial.len() < FRAME_HEADER_SIZE {
                    return Ok(total_len);
                }
            }
            let header = read_header(&self.partial)?;
            let total = FRAME_HEADER_SIZE + header.payload_len as usize;
            let take = (total - self.partial.len()).min(input.len());
            self.partial.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.partial.len() < total {
                return Ok(total_len);
            }
            let frame = std::mem::take(&mut self.partial);
            if !on_frame(header, &frame[FRAME_HEADER_SIZE..]) {
                return Ok(total_len - input.len());
            }
        }
        while input.len() >= FRAME_HEADER_SIZE {
            let header = read_header(input)?;
            let total = FRAME_HEADER_SIZE + header.payload_len as usize;
            if input.len() < total {
                break;
            }
            let frame_ok = on_frame(header, &input[FRAME_HEADER_SIZE..total]);
            input = &input[total..];
            if !frame_ok {
                return Ok(total_len - input.len());
            }
        }
        if !input.is_empty() {
            if input.len() >= FRAME_HEADER_SIZE {
                // Reject a bad header now rather than after buffering its body.
                read_header(input)?;
            }
            self.partial.reserve_exact(input.len());
            self.partial.extend_from_slice(input);
        }
        debug_assert!(self.partial.len() <= FRAME_SIZE_MAX);
        Ok(total_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::*;

    fn frames(
        reader: &mut FrameReader,
        bytes: &[u8],
    ) -> Result<Vec<(FrameHeader, Vec<u8>)>, DecodeError> {
        let mut out = Vec::new();
        reader.feed(bytes, |h, p| {
            out.push((h, p.to_vec()));
            true
        })?;
        Ok(out)
    }

    #[test]
    fn stopping_early_reports_consumed_bytes() {
        let mut buf = Vec::new();
        let first = encode(&mut buf, Kind::Ping, 1, &Ping { nonce: 1 });
        encode(&mut buf, Kind::Ping, 2, &Ping { nonce: 2 });
        let mut reader = FrameReader::new();
        let consumed = reader.feed(&buf, |_, _| false).unwrap();
        assert_eq!(consumed, first);
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let mut buf = Vec::new();
        let send = Send {
            to: "bob".into(),
            client_msg_id: 7,
            text: "hi there".into(),
        };
        let size = encode(&mut buf, Kind::Send, 42, &send);
        assert_eq!(size, buf.len());
        let mut reader = FrameReader::new();
        let got = frames(&mut reader, &buf).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.kind, Kind::Send);
        assert_eq!(got[0].0.request_id, 42);
        let archived = access::<ArchivedSend>(Kind::Send, &got[0].1).unwrap();
        assert_eq!(archived.to.as_str(), "bob");
        assert_eq!(archived.client_msg_id.to_native(), 7);
        assert_eq!(archived.text.as_str(), "hi there");
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn byte_at_a_time_reassembles_every_frame() {
        let mut buf = Vec::new();
        for i in 0..5u64 {
            encode(&mut buf, Kind::Ping, i as u32 + 1, &Ping { nonce: i });
        }
        let mut reader = FrameReader::new();
        let mut got = Vec::new();
        for b in &buf {
            got.extend(frames(&mut reader, std::slice::from_ref(b)).unwrap());
        }
        assert_eq!(got.len(), 5);
        for (i, (h, p)) in got.iter().enumerate() {
            assert_eq!(h.request_id, i as u32 + 1);
            assert_eq!(
                access::<ArchivedPing>(Kind::Ping, p)
                    .unwrap()
                    .nonce
                    .to_native(),
                i as u64
            );
        }
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn oversized_length_prefix_is_rejected_before_buffering() {
        let mut bytes = ((FRAME_SIZE_MAX as u32) * 4).to_le_bytes().to_vec();
        bytes.extend_from_slice(&[5, 0, 0, 0, 1, 0, 0, 0]);
        let mut reader = FrameReader::new();
        assert!(matches!(
            frames(&mut reader, &bytes),
            Err(DecodeError::BadLength(_))
        ));
    }

    /// On 32-bit targets `len + 4` used to overflow (a panic in debug builds, a wrapped
    /// length accepted in release) for prefixes within 4 of u32::MAX.
    #[test]
    fn length_prefix_near_u32_max_is_rejected_on_every_target() {
        for len in [u32::MAX, u32::MAX - 3, u32::MAX - 4] {
            let mut bytes = len.to_le_bytes().to_vec();
            bytes.extend_from_slice(&[5, 0, 0, 0, 1, 0, 0, 0]);
            assert_eq!(read_header(&bytes), Err(DecodeError::BadLength(len)));
            assert!(matches!(
                frames(&mut FrameReader::new(), &bytes),
                Err(DecodeError::BadLength(_))
            ));
            assert!(frame_len(&bytes).is_some_and(|total| total > FRAME_SIZE_MAX));
        }
    }

    #[test]
    fn short_length_unknown_kind_and_flags_are_rejected() {
        let mut reader = FrameReader::new();
        let short = [2u8, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            frames(&mut reader, &short),
            Err(DecodeError::BadLength(2))
        ));
        let unknown = [8u8, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(
            frames(&mut FrameReader::new(), &unknown),
            Err(DecodeError::UnknownKind(99))
        ));
        let flags = [8u8, 0, 0, 0, 5, 0, 1, 0, 0, 0, 0, 0];
        assert!(matches!(
            frames(&mut FrameReader::new(), &flags),
            Err(DecodeError::BadFlags(1))
        ));
    }

    #[test]
    fn corrupt_archive_fails_validation() {
        let mut buf = Vec::new();
        encode(
            &mut buf,
            Kind::Send,
            1,
            &Send {
                to: "bob".into(),
                client_msg_id: 1,
                text: "x".into(),
            },
        );
        let payload = &mut buf[FRAME_HEADER_SIZE..];
        // The root sits at the end; its first field is the `to` string. Make its
        // representation claim an out-of-line string far outside the buffer.
        let root = payload.len() - 24;
        for b in &mut payload[root..root + 8] {
            *b = 0x80;
        }
        let payload = &buf[FRAME_HEADER_SIZE..];
        assert!(access::<ArchivedSend>(Kind::Send, payload).is_err());
        assert!(access::<ArchivedSend>(Kind::Send, &[]).is_err());
    }

    #[test]
    fn entry_ref_archive_reads_as_entry() {
        let msg = Message {
            msg_id: 9,
            from_id: 1,
            from: "alice".into(),
            to_id: 2,
            to: "bob".into(),
            client_msg_id: 3,
            sent_at_ms: 4,
            text: "hello".into(),
        };
        let stored = rkyv::api::high::to_bytes_in::<_, Failure>(&msg, Vec::new()).unwrap();
        let page = SyncPageRef {
            entries: vec![
                EntryRef {
                    seq: 1,
                    message: &stored,
                },
                EntryRef {
                    seq: 2,
                    message: &stored,
                },
            ],
            head_seq: 2,
            has_more: false,
        };
        let mut buf = Vec::new();
        encode(&mut buf, Kind::SyncPage, 5, &page);
        let archived =
            access::<ArchivedSyncPage>(Kind::SyncPage, &buf[FRAME_HEADER_SIZE..]).unwrap();
        assert_eq!(archived.entries.len(), 2);
        assert_eq!(archived.entries[1].seq.to_native(), 2);
        let inner =
            access::<ArchivedMessage>(Kind::SyncPage, archived.entries[1].message.as_slice())
                .unwrap();
        assert_eq!(inner.text.as_str(), "hello");
        assert_eq!(inner.msg_id.to_native(), 9);
    }
}
