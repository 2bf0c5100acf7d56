//! Golden frames: one complete frame per kind, encoded from fixed example values and kept as
//! hex in `tests/golden/`. A change in the bytes is a change of wire protocol v1, so it must
//! be deliberate: re-run with `TERN_BLESS=1` to rewrite the files, and update the annotated
//! dumps in `docs/protocol.md`. Each file is also decoded with `FrameReader` and checked
//! field by field, so the files double as decoding fixtures for clients in other languages.

use std::path::PathBuf;

use rkyv::rancor::Failure;
use tern::limits::FRAME_HEADER_SIZE;
use tern::protocol::*;

const BLESS_HINT: &str = "wire format changed: if deliberate, regenerate with TERN_BLESS=1 cargo test --test golden_frames";

// The example values. docs/protocol.md shows some of these frames byte by byte.
const TOKEN: &str =
    "v1.42.1767225600000.5d41402abc4b2a76b9719d911017c592a94e3d2b8e0a3f6c1b5e7d9f0a2c4e6b";
const SENT_AT_MS: u64 = 1_764_547_200_123;

fn message_from_bob() -> Message {
    Message {
        msg_id: 4990,
        from_id: 43,
        from: "bob".into(),
        to_id: 42,
        to: "alice".into(),
        client_msg_id: 77,
        sent_at_ms: 1_764_547_100_000,
        text: "hi alice".into(),
    }
}

fn message_to_bob() -> Message {
    Message {
        msg_id: 4991,
        from_id: 42,
        from: "alice".into(),
        to_id: 43,
        to: "bob".into(),
        client_msg_id: 1000,
        sent_at_ms: 1_764_547_150_000,
        text: "see you at noon".into(),
    }
}

/// The message the `Send` frame below creates, as stored and pushed.
fn message_sent() -> Message {
    Message {
        msg_id: 5000,
        from_id: 42,
        from: "alice".into(),
        to_id: 43,
        to: "bob".into(),
        client_msg_id: 1001,
        sent_at_ms: SENT_AT_MS,
        text: "hello, bob!".into(),
    }
}

/// A stored message: a complete archive of `Message` on its own.
fn archived(message: &Message) -> Vec<u8> {
    rkyv::api::high::to_bytes_in::<_, Failure>(message, Vec::new()).expect("serialize message")
}

fn frame<T>(kind: Kind, request_id: u32, value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                Failure,
            >,
        >,
{
    let mut out = Vec::new();
    let size = encode(&mut out, kind, request_id, value);
    assert_eq!(size, out.len());
    out
}

/// Every golden frame: file stem and bytes, encoded the way the node and the client SDK do.
fn golden_frames() -> Vec<(&'static str, Vec<u8>)> {
    let bob = archived(&message_from_bob());
    let to_bob = archived(&message_to_bob());
    let sent = archived(&message_sent());
    vec![
        (
            "hello",
            frame(
                Kind::Hello,
                1,
                &Hello {
                    protocol_version: 1,
                    client: "tern-cli/1.0".into(),
                },
            ),
        ),
        (
            "hello_ok",
            frame(
                Kind::HelloOk,
                1,
                &HelloOk {
                    protocol_version: 1,
                    heartbeat_interval_ms: 30_000,
                    frame_size_max: 65_536,
                    node: "pi-node".into(),
                },
            ),
        ),
        (
            "login_password",
            frame(
                Kind::Login,
                2,
                &Login {
                    user: "alice".into(),
                    device: "phone".into(),
                    credential: Credential::Password("correct horse".into()),
                },
            ),
        ),
        (
            "login_token",
            frame(
                Kind::Login,
                2,
                &Login {
                    user: "alice".into(),
                    device: "laptop".into(),
                    credential: Credential::Token(TOKEN.into()),
                },
            ),
        ),
        (
            "login_ok",
            frame(
                Kind::LoginOk,
                2,
                &LoginOk {
                    user_id: 42,
                    token: TOKEN.into(),
                    token_expires_at_ms: 1_767_225_600_000,
                    head_seq: 17,
                    acked_seq: 12,
                },
            ),
        ),
        ("ping", frame(Kind::Ping, 3, &Ping { nonce: 7 })),
        ("pong", frame(Kind::Pong, 3, &Pong { nonce: 7 })),
        (
            "send",
            frame(
                Kind::Send,
                4,
                &Send {
                    to: "bob".into(),
                    client_msg_id: 1001,
                    text: "hello, bob!".into(),
                },
            ),
        ),
        (
            "send_ack",
            frame(
                Kind::SendAck,
                4,
                &SendAck {
                    msg_id: 5000,
                    seq: 18,
                    sent_at_ms: SENT_AT_MS,
                    duplicate: false,
                },
            ),
        ),
        (
            "sync",
            frame(
                Kind::Sync,
                5,
                &Sync {
                    after_seq: 12,
                    limit: 2,
                },
            ),
        ),
        (
            "sync_page",
            // The node encodes pages from borrowed stored bytes (`SyncPageRef`).
            frame(
                Kind::SyncPage,
                5,
                &SyncPageRef {
                    entries: vec![
                        EntryRef {
                            seq: 13,
                            message: &bob,
                        },
                        EntryRef {
                            seq: 14,
                            message: &to_bob,
                        },
                    ],
                    head_seq: 18,
                    has_more: true,
                },
            ),
        ),
        (
            "push",
            frame(
                Kind::Push,
                0,
                &PushRef {
                    entries: vec![EntryRef {
                        seq: 18,
                        message: &sent,
                    }],
                },
            ),
        ),
        (
            "device_ack",
            frame(Kind::DeviceAck, 6, &DeviceAck { up_to_seq: 14 }),
        ),
        (
            "kicked",
            frame(
                Kind::Kicked,
                0,
                &Kicked {
                    code: ErrorCode::ReplacedByNewLogin as u16,
                    message: "another login replaced this device".into(),
                },
            ),
        ),
        (
            "error",
            frame(
                Kind::Error,
                7,
                &ErrorBody {
                    code: ErrorCode::UnknownUser as u16,
                    message: "no such user".into(),
                },
            ),
        ),
        ("file_info", frame(Kind::FileInfo, 8, &file_info())),
        ("file_chunk", frame(Kind::FileChunk, 9, &file_chunk())),
    ]
}

/// SHA-256 of "AB", the example file.
const FILE_SHA256: [u8; 32] = [
    0x38, 0x16, 0x4f, 0xbd, 0x17, 0x60, 0x3d, 0x73, 0xf6, 0x96, 0xb8, 0xb4, 0xd7, 0x26, 0x64, 0xd7,
    0x35, 0xbb, 0x6a, 0x7c, 0x88, 0x57, 0x76, 0x87, 0xfd, 0x2a, 0xe3, 0x3f, 0xd6, 0x96, 0x41, 0x53,
];

fn file_info() -> FileInfo {
    FileInfo {
        file_id: 3,
        name: "ab.txt".into(),
        mime: "text/plain".into(),
        size: 2,
        sha256: FILE_SHA256.to_vec(),
    }
}

fn file_chunk() -> FileChunk {
    FileChunk {
        file_id: 3,
        offset: 1,
        size: 2,
        data: b"B".to_vec(),
        sha256: FILE_SHA256.to_vec(),
    }
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn to_hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 3);
    for line in bytes.chunks(16) {
        let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
        text.push_str(&hex.join(" "));
        text.push('\n');
    }
    text
}

fn from_hex(name: &str, text: &str) -> Vec<u8> {
    text.split_ascii_whitespace()
        .map(|pair| {
            u8::from_str_radix(pair, 16)
                .unwrap_or_else(|_| panic!("{name}.hex: bad hex byte {pair:?}"))
        })
        .collect()
}

fn blessing() -> bool {
    std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1")
}

/// In bless mode, rewrites every file once, before any test reads one.
fn bless_once() {
    static BLESS: std::sync::Once = std::sync::Once::new();
    BLESS.call_once(|| {
        if !blessing() {
            return;
        }
        let dir = golden_dir();
        std::fs::create_dir_all(&dir).expect("create tests/golden");
        for (name, bytes) in golden_frames() {
            std::fs::write(dir.join(format!("{name}.hex")), to_hex(&bytes))
                .expect("write golden file");
        }
    });
}

fn read_golden(name: &str) -> Vec<u8> {
    bless_once();
    let path = golden_dir().join(format!("{name}.hex"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}\n{BLESS_HINT}", path.display()));
    from_hex(name, &text)
}

#[test]
fn encoding_matches_golden_files() {
    bless_once();
    let mut changed = Vec::new();
    for (name, bytes) in golden_frames() {
        if read_golden(name) != bytes {
            eprintln!("{name}.hex differs; encoded now:\n{}", to_hex(&bytes));
            changed.push(name);
        }
    }
    assert!(changed.is_empty(), "{BLESS_HINT}\nchanged: {changed:?}");
}

#[test]
fn every_kind_has_a_golden_frame() {
    let mut kinds: Vec<u16> = golden_frames()
        .iter()
        .map(|(name, bytes)| {
            u16::from_le_bytes(bytes[4..6].try_into().unwrap_or_else(|_| panic!("{name}")))
        })
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    // Every kind of the core protocol, and the file kinds whose layout carries the hash.
    let mut expected: Vec<u16> = (1..=14).collect();
    expected.extend([Kind::FileInfo as u16, Kind::FileChunk as u16]);
    assert_eq!(kinds, expected);
}

#[test]
fn owned_and_borrowed_entries_encode_alike() {
    // Clients decode `SyncPage`/`Push`; the node encodes `SyncPageRef`/`PushRef`.
    let bob = archived(&message_from_bob());
    let to_bob = archived(&message_to_bob());
    let owned = SyncPage {
        entries: vec![
            Entry {
                seq: 13,
                message: bob.clone(),
            },
            Entry {
                seq: 14,
                message: to_bob.clone(),
            },
        ],
        head_seq: 18,
        has_more: true,
    };
    let borrowed = SyncPageRef {
        entries: vec![
            EntryRef {
                seq: 13,
                message: &bob,
            },
            EntryRef {
                seq: 14,
                message: &to_bob,
            },
        ],
        head_seq: 18,
        has_more: true,
    };
    assert_eq!(
        frame(Kind::SyncPage, 5, &owned),
        frame(Kind::SyncPage, 5, &borrowed)
    );
    let sent = archived(&message_sent());
    let owned = Push {
        entries: vec![Entry {
            seq: 18,
            message: sent.clone(),
        }],
    };
    let borrowed = PushRef {
        entries: vec![EntryRef {
            seq: 18,
            message: &sent,
        }],
    };
    assert_eq!(
        frame(Kind::Push, 0, &owned),
        frame(Kind::Push, 0, &borrowed)
    );
}

/// Reads the one frame a golden file holds, checking the header.
fn decode_golden(name: &str, kind: Kind, request_id: u32) -> Vec<u8> {
    let bytes = read_golden(name);
    let mut reader = FrameReader::new();
    let mut frames = Vec::new();
    let consumed = reader
        .feed(&bytes, |header, payload| {
            frames.push((header, payload.to_vec()));
            true
        })
        .unwrap_or_else(|e| panic!("{name}.hex: {e}"));
    assert_eq!(consumed, bytes.len(), "{name}.hex");
    assert_eq!(reader.buffered(), 0, "{name}.hex holds a partial frame");
    assert_eq!(frames.len(), 1, "{name}.hex holds {} frames", frames.len());
    let (header, payload) = frames.pop().expect("one frame");
    assert_eq!(header.kind, kind, "{name}.hex");
    assert_eq!(header.request_id, request_id, "{name}.hex");
    assert_eq!(
        header.payload_len as usize,
        bytes.len() - FRAME_HEADER_SIZE,
        "{name}.hex"
    );
    assert_eq!(
        u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize,
        bytes.len() - 4
    );
    assert_eq!(&bytes[6..8], &[0, 0], "{name}.hex: flags");
    payload
}

fn assert_message(bytes: &[u8], expected: &Message) {
    let m = access::<ArchivedMessage>(Kind::SyncPage, bytes)
        .expect("entry holds a valid Message archive");
    assert_eq!(m.msg_id.to_native(), expected.msg_id);
    assert_eq!(m.from_id.to_native(), expected.from_id);
    assert_eq!(m.from.as_str(), expected.from);
    assert_eq!(m.to_id.to_native(), expected.to_id);
    assert_eq!(m.to.as_str(), expected.to);
    assert_eq!(m.client_msg_id.to_native(), expected.client_msg_id);
    assert_eq!(m.sent_at_ms.to_native(), expected.sent_at_ms);
    assert_eq!(m.text.as_str(), expected.text);
}

#[test]
fn golden_files_decode_to_the_example_values() {
    let p = decode_golden("hello", Kind::Hello, 1);
    let hello = access::<ArchivedHello>(Kind::Hello, &p).unwrap();
    assert_eq!(hello.protocol_version.to_native(), 1);
    assert_eq!(hello.client.as_str(), "tern-cli/1.0");

    let p = decode_golden("hello_ok", Kind::HelloOk, 1);
    let ok = access::<ArchivedHelloOk>(Kind::HelloOk, &p).unwrap();
    assert_eq!(ok.protocol_version.to_native(), 1);
    assert_eq!(ok.heartbeat_interval_ms.to_native(), 30_000);
    assert_eq!(ok.frame_size_max.to_native(), 65_536);
    assert_eq!(ok.node.as_str(), "pi-node");

    let p = decode_golden("login_password", Kind::Login, 2);
    let login = access::<ArchivedLogin>(Kind::Login, &p).unwrap();
    assert_eq!(login.user.as_str(), "alice");
    assert_eq!(login.device.as_str(), "phone");
    assert!(
        matches!(&login.credential, ArchivedCredential::Password(p) if p.as_str() == "correct horse")
    );

    let p = decode_golden("login_token", Kind::Login, 2);
    let login = access::<ArchivedLogin>(Kind::Login, &p).unwrap();
    assert_eq!(login.user.as_str(), "alice");
    assert_eq!(login.device.as_str(), "laptop");
    assert!(matches!(&login.credential, ArchivedCredential::Token(t) if t.as_str() == TOKEN));

    let p = decode_golden("login_ok", Kind::LoginOk, 2);
    let ok = access::<ArchivedLoginOk>(Kind::LoginOk, &p).unwrap();
    assert_eq!(ok.user_id.to_native(), 42);
    assert_eq!(ok.token.as_str(), TOKEN);
    assert_eq!(ok.token_expires_at_ms.to_native(), 1_767_225_600_000);
    assert_eq!(ok.head_seq.to_native(), 17);
    assert_eq!(ok.acked_seq.to_native(), 12);

    let p = decode_golden("ping", Kind::Ping, 3);
    assert_eq!(
        access::<ArchivedPing>(Kind::Ping, &p)
            .unwrap()
            .nonce
            .to_native(),
        7
    );
    let p = decode_golden("pong", Kind::Pong, 3);
    assert_eq!(
        access::<ArchivedPong>(Kind::Pong, &p)
            .unwrap()
            .nonce
            .to_native(),
        7
    );

    let p = decode_golden("send", Kind::Send, 4);
    let send = access::<ArchivedSend>(Kind::Send, &p).unwrap();
    assert_eq!(send.to.as_str(), "bob");
    assert_eq!(send.client_msg_id.to_native(), 1001);
    assert_eq!(send.text.as_str(), "hello, bob!");

    let p = decode_golden("send_ack", Kind::SendAck, 4);
    let ack = access::<ArchivedSendAck>(Kind::SendAck, &p).unwrap();
    assert_eq!(ack.msg_id.to_native(), 5000);
    assert_eq!(ack.seq.to_native(), 18);
    assert_eq!(ack.sent_at_ms.to_native(), SENT_AT_MS);
    assert!(!ack.duplicate);

    let p = decode_golden("sync", Kind::Sync, 5);
    let sync = access::<ArchivedSync>(Kind::Sync, &p).unwrap();
    assert_eq!(sync.after_seq.to_native(), 12);
    assert_eq!(sync.limit.to_native(), 2);

    let p = decode_golden("sync_page", Kind::SyncPage, 5);
    let page = access::<ArchivedSyncPage>(Kind::SyncPage, &p).unwrap();
    assert_eq!(page.entries.len(), 2);
    assert_eq!(page.entries[0].seq.to_native(), 13);
    assert_message(page.entries[0].message.as_slice(), &message_from_bob());
    assert_eq!(page.entries[1].seq.to_native(), 14);
    assert_message(page.entries[1].message.as_slice(), &message_to_bob());
    assert_eq!(page.head_seq.to_native(), 18);
    assert!(page.has_more);

    let p = decode_golden("push", Kind::Push, 0);
    let push = access::<ArchivedPush>(Kind::Push, &p).unwrap();
    assert_eq!(push.entries.len(), 1);
    assert_eq!(push.entries[0].seq.to_native(), 18);
    assert_message(push.entries[0].message.as_slice(), &message_sent());

    let p = decode_golden("device_ack", Kind::DeviceAck, 6);
    assert_eq!(
        access::<ArchivedDeviceAck>(Kind::DeviceAck, &p)
            .unwrap()
            .up_to_seq
            .to_native(),
        14
    );

    let p = decode_golden("kicked", Kind::Kicked, 0);
    let kicked = access::<ArchivedKicked>(Kind::Kicked, &p).unwrap();
    assert_eq!(kicked.code.to_native(), 12);
    assert_eq!(
        kicked.message.as_str(),
        "another login replaced this device"
    );

    let p = decode_golden("error", Kind::Error, 7);
    let error = access::<ArchivedErrorBody>(Kind::Error, &p).unwrap();
    assert_eq!(error.code.to_native(), 5);
    assert_eq!(
        ErrorCode::from_u16(error.code.to_native()),
        Some(ErrorCode::UnknownUser)
    );
    assert_eq!(error.message.as_str(), "no such user");

    let p = decode_golden("file_info", Kind::FileInfo, 8);
    let info = access::<ArchivedFileInfo>(Kind::FileInfo, &p).unwrap();
    let info: FileInfo = rkyv::deserialize::<_, Failure>(info).unwrap();
    assert_eq!(info, file_info());
    assert_eq!(info.sha256.len(), 32);

    let p = decode_golden("file_chunk", Kind::FileChunk, 9);
    let chunk = access::<ArchivedFileChunk>(Kind::FileChunk, &p).unwrap();
    let chunk: FileChunk = rkyv::deserialize::<_, Failure>(chunk).unwrap();
    assert_eq!(chunk, file_chunk());
}

#[test]
fn golden_frames_reassemble_from_one_stream_byte_by_byte() {
    // All files back to back, fed one byte at a time: what a client's read loop sees.
    let names: Vec<&str> = golden_frames().iter().map(|(name, _)| *name).collect();
    let stream: Vec<u8> = names.iter().flat_map(|name| read_golden(name)).collect();
    let mut reader = FrameReader::new();
    let mut kinds = Vec::new();
    for byte in &stream {
        reader
            .feed(std::slice::from_ref(byte), |header, _| {
                kinds.push(header.kind);
                true
            })
            .expect("golden stream decodes");
    }
    assert_eq!(kinds.len(), names.len());
    assert_eq!(reader.buffered(), 0);
}

/// docs/protocol.md §3.2: an empty `Vec` must point where its elements would start (the end
/// of the out-of-line data written before it), not at offset 0. The frame a client wrote
/// from the old wording (offset 0) is refused; rkyv's own form is the worked example.
#[test]
fn an_empty_vec_points_where_its_elements_would_start() {
    let rename = GroupOp {
        op: group_op::RENAME,
        group_id: 1,
        name: "x".into(),
        users: Vec::new(),
    };
    let bytes = frame(Kind::GroupOp, 3, &rename);
    let payload = &bytes[FRAME_HEADER_SIZE..];
    assert_eq!(
        payload.len(),
        25,
        "no out-of-line data: the payload is the root"
    );
    // users @17: offset -17 (to payload start, where elements would be), length 0.
    assert_eq!(&payload[17..25], &[0xef, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    assert!(access::<ArchivedGroupOp>(Kind::GroupOp, payload).is_ok());
    let mut documented_before = payload.to_vec();
    documented_before[17..21].copy_from_slice(&0i32.to_le_bytes());
    assert!(access::<ArchivedGroupOp>(Kind::GroupOp, &documented_before).is_err());
}
