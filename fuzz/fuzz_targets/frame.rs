//! The frame reader and every payload validator of `protocol`.
//!
//! Input: one byte choosing how the rest is cut into reads, then a byte stream as a peer
//! would send it. Checked:
//! - `FrameReader` never panics, never buffers more than `FRAME_SIZE_MAX`, and yields the
//!   same frames and the same verdict whether the stream arrives whole or in pieces;
//! - each frame's payload goes through the checked access of its kind, and of every other
//!   kind too (the validators must refuse what is not theirs without panicking);
//! - an archive that validates deserialises, re-encodes and validates again to the same
//!   value; timeline entries inside pages validate as a `Message` or a `Record`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rkyv::rancor::Failure;
use tern::limits::FRAME_SIZE_MAX;
use tern::protocol::*;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = read_frames(stream, stream.len().max(1));
    // Reads of 1..=256 bytes, the size fixed by the first byte.
    let pieces = read_frames(stream, usize::from(cut) + 1);
    assert_eq!(whole, pieces, "frames depend on how the stream was cut");
    for (kind, payload) in &whole.frames {
        validate(*kind, payload);
    }
    // The stream itself as a payload of every kind: the validators see raw bytes the frame
    // layer would have let through.
    for raw in 1..=41u16 {
        let kind = Kind::from_u16(raw).expect("kinds 1..=41 exist");
        validate(kind, stream);
    }
    let _ = ErrorCode::from_u16(u16::from_le_bytes([cut, cut]));
});

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<(Kind, Vec<u8>)>,
    error: Option<DecodeError>,
}

fn read_frames(stream: &[u8], read_size: usize) -> Outcome {
    let mut reader = FrameReader::new();
    let mut frames = Vec::new();
    let mut error = None;
    for chunk in stream.chunks(read_size) {
        let fed = reader.feed(chunk, |header, payload| {
            assert_eq!(header.payload_len as usize, payload.len());
            frames.push((header.kind, payload.to_vec()));
            true
        });
        assert!(reader.buffered() <= FRAME_SIZE_MAX);
        match fed {
            Ok(consumed) => assert_eq!(consumed, chunk.len()),
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    Outcome { frames, error }
}

/// Checked access, then a round trip of what validated.
macro_rules! round_trip {
    ($kind:expr, $payload:expr, $ty:ty) => {{
        if let Ok(archived) = access::<<$ty as rkyv::Archive>::Archived>($kind, $payload) {
            let owned: $ty =
                rkyv::deserialize::<$ty, Failure>(archived).expect("a valid archive deserialises");
            let bytes = rkyv::to_bytes::<Failure>(&owned).expect("serialising into memory");
            let again = access::<<$ty as rkyv::Archive>::Archived>($kind, &bytes)
                .expect("a re-encoded archive validates");
            let back: $ty = rkyv::deserialize::<$ty, Failure>(again).expect("deserialises");
            assert_eq!(owned, back);
            Some(owned)
        } else {
            None
        }
    }};
}

fn entry(bytes: &[u8]) {
    if is_record(bytes) {
        round_trip!(Kind::Push, &bytes[RECORD_MARKER.len()..], Record);
    } else {
        round_trip!(Kind::Push, bytes, Message);
    }
}

fn entries(list: &[Entry]) {
    for e in list {
        entry(&e.message);
    }
}

fn validate(kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Hello => drop(round_trip!(kind, payload, Hello)),
        Kind::HelloOk => drop(round_trip!(kind, payload, HelloOk)),
        Kind::Login => drop(round_trip!(kind, payload, Login)),
        Kind::LoginOk => drop(round_trip!(kind, payload, LoginOk)),
        Kind::Ping => drop(round_trip!(kind, payload, Ping)),
        Kind::Pong => drop(round_trip!(kind, payload, Pong)),
        Kind::Send => drop(round_trip!(kind, payload, Send)),
        Kind::SendAck => drop(round_trip!(kind, payload, SendAck)),
        Kind::Sync => drop(round_trip!(kind, payload, Sync)),
        Kind::SyncPage => {
            if let Some(page) = round_trip!(kind, payload, SyncPage) {
                entries(&page.entries);
            }
        }
        Kind::Push => {
            if let Some(push) = round_trip!(kind, payload, Push) {
                entries(&push.entries);
            }
        }
        Kind::DeviceAck => drop(round_trip!(kind, payload, DeviceAck)),
        Kind::Kicked => drop(round_trip!(kind, payload, Kicked)),
        Kind::Error => drop(round_trip!(kind, payload, ErrorBody)),
        Kind::GroupOp => drop(round_trip!(kind, payload, GroupOp)),
        Kind::GroupQuery => drop(round_trip!(kind, payload, GroupQuery)),
        Kind::GroupInfo => drop(round_trip!(kind, payload, GroupInfo)),
        Kind::GroupList => drop(round_trip!(kind, payload, GroupList)),
        Kind::GroupListPage => drop(round_trip!(kind, payload, GroupListPage)),
        Kind::GroupSend => drop(round_trip!(kind, payload, GroupSend)),
        Kind::History => drop(round_trip!(kind, payload, History)),
        Kind::HistoryPage => {
            if let Some(page) = round_trip!(kind, payload, HistoryPage) {
                entries(&page.entries);
            }
        }
        Kind::Conversations => drop(round_trip!(kind, payload, Conversations)),
        Kind::ConversationsPage => drop(round_trip!(kind, payload, ConversationsPage)),
        Kind::Read => drop(round_trip!(kind, payload, Read)),
        Kind::ReadOk => drop(round_trip!(kind, payload, ReadOk)),
        Kind::PresenceSubscribe => drop(round_trip!(kind, payload, PresenceSubscribe)),
        Kind::PresenceQuery => drop(round_trip!(kind, payload, PresenceQuery)),
        Kind::PresenceState => drop(round_trip!(kind, payload, PresenceState)),
        Kind::PresencePush => drop(round_trip!(kind, payload, PresencePush)),
        Kind::Typing => drop(round_trip!(kind, payload, Typing)),
        Kind::TypingPush => drop(round_trip!(kind, payload, TypingPush)),
        Kind::UploadStart => drop(round_trip!(kind, payload, UploadStart)),
        Kind::UploadReady => drop(round_trip!(kind, payload, UploadReady)),
        Kind::UploadChunk => drop(round_trip!(kind, payload, UploadChunk)),
        Kind::UploadAck => drop(round_trip!(kind, payload, UploadAck)),
        Kind::UploadFinish => drop(round_trip!(kind, payload, UploadFinish)),
        Kind::FileInfo => drop(round_trip!(kind, payload, FileInfo)),
        Kind::FileSend => drop(round_trip!(kind, payload, FileSend)),
        Kind::Download => drop(round_trip!(kind, payload, Download)),
        Kind::FileChunk => drop(round_trip!(kind, payload, FileChunk)),
        Kind::Logout => drop(round_trip!(kind, payload, Logout)),
        Kind::ChangePassword => drop(round_trip!(kind, payload, ChangePassword)),
        Kind::Devices => drop(round_trip!(kind, payload, Devices)),
        Kind::DevicesPage => drop(round_trip!(kind, payload, DevicesPage)),
    }
}
