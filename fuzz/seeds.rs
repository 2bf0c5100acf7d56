//! Writes the seed corpora of the fuzz targets (`fuzz/seeds/<target>/`): the golden frames
//! of `tests/golden/` and real frame sequences as a client and a node send them, each with
//! the mode byte its target reads first. Run from the repository root:
//! `cargo run --example fuzz-seeds`. The output is committed; libFuzzer grows its own corpus
//! from it in `fuzz/corpus/` (not committed).

use std::path::{Path, PathBuf};
use std::time::Instant;

use rkyv::rancor::Failure;
use tern::client::{ClientConfig, ClientSession, MemoryStore};
use tern::protocol::{self, *};

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let seeds = root.join("fuzz").join("seeds");
    let golden = golden_frames(&root.join("tests").join("golden"));
    let stream: Vec<u8> = golden.iter().flat_map(|(_, b)| b.clone()).collect();
    let client = client_stream();
    let node = node_stream();

    let dir = target_dir(&seeds, "frame");
    for (name, bytes) in &golden {
        write(&dir, name, &with_mode(0, bytes));
    }
    write(&dir, "golden_stream_by_7", &with_mode(6, &stream));
    write(&dir, "client_stream", &with_mode(255, &client));
    write(&dir, "node_stream_by_13", &with_mode(12, &node));

    let dir = target_dir(&seeds, "session");
    // Mode bit 0: already logged in; bits 1..=7: read size - 1.
    let login = login_stream();
    write(
        &dir,
        "login_then_all_requests",
        &with_mode(0xfe, &[login.clone(), client.clone()].concat()),
    );
    write(
        &dir,
        "login_then_all_requests_by_5",
        &with_mode(4 << 1, &[login.clone(), client.clone()].concat()),
    );
    write(
        &dir,
        "refused_login_then_requests",
        &with_mode(0xfe, &[login_stream_with_id(3), client.clone()].concat()),
    );
    write(&dir, "established_all_requests", &with_mode(0xff, &client));
    write(&dir, "established_by_1", &with_mode(1, &client));
    write(&dir, "golden_stream", &with_mode(0xfe, &stream));

    let dir = target_dir(&seeds, "client_session");
    // Mode bits 0..=6: read size - 1; bit 7: time jumps past the request timeout.
    let answers = client_answers();
    write(&dir, "answers", &with_mode(0x7f, &answers));
    write(&dir, "answers_by_3", &with_mode(2, &answers));
    write(&dir, "answers_with_timeouts", &with_mode(0xff, &answers));
    write(&dir, "node_stream", &with_mode(0x7f, &node));
}

fn target_dir(seeds: &Path, target: &str) -> PathBuf {
    let dir = seeds.join(target);
    std::fs::create_dir_all(&dir).expect("create seed folder");
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![mode];
    out.extend_from_slice(bytes);
    out
}

fn golden_frames(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("tests/golden exists")
        .map(|e| e.expect("read tests/golden").path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("read golden file");
            let bytes = text
                .split_ascii_whitespace()
                .map(|pair| u8::from_str_radix(pair, 16).expect("golden files hold hex"))
                .collect();
            let name = path.file_stem().expect("a file name").to_string_lossy();
            (format!("golden_{name}"), bytes)
        })
        .collect()
}

fn frame<T>(out: &mut Vec<u8>, kind: Kind, request_id: u32, value: &T)
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                Failure,
            >,
        >,
{
    protocol::encode(out, kind, request_id, value);
}

fn login_stream() -> Vec<u8> {
    login_stream_with_id(2)
}

/// Hello and a password login; the session target accepts a login with an even id.
fn login_stream_with_id(login_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "tern-cli/1.0".into(),
    };
    frame(&mut out, Kind::Hello, 1, &hello);
    let login = Login {
        user: "alice".into(),
        device: "phone".into(),
        credential: Credential::Password("correct horse".into()),
    };
    frame(&mut out, Kind::Login, login_id, &login);
    out
}

/// Every request a logged-in client sends, once each.
fn client_stream() -> Vec<u8> {
    let mut out = Vec::new();
    let mut id = 10;
    let mut next = || {
        id += 1;
        id
    };
    frame(&mut out, Kind::Ping, next(), &Ping { nonce: 7 });
    let send = Send {
        to: "bob".into(),
        client_msg_id: 1001,
        text: "hello, bob!".into(),
    };
    frame(&mut out, Kind::Send, next(), &send);
    frame(
        &mut out,
        Kind::Sync,
        next(),
        &Sync {
            after_seq: 0,
            limit: 50,
        },
    );
    frame(&mut out, Kind::DeviceAck, 0, &DeviceAck { up_to_seq: 3 });
    let op = GroupOp {
        op: group_op::CREATE,
        group_id: 0,
        name: "team".into(),
        users: vec!["bob".into(), "carol".into()],
    };
    frame(&mut out, Kind::GroupOp, next(), &op);
    frame(
        &mut out,
        Kind::GroupQuery,
        next(),
        &GroupQuery { group_id: 1 },
    );
    let list = GroupList {
        after_group_id: 0,
        limit: 10,
    };
    frame(&mut out, Kind::GroupList, next(), &list);
    let send = GroupSend {
        group_id: 1,
        client_msg_id: 1002,
        text: "hi team".into(),
    };
    frame(&mut out, Kind::GroupSend, next(), &send);
    let history = History {
        conv: group_conv(1),
        before_seq: 0,
        limit: 20,
    };
    frame(&mut out, Kind::History, next(), &history);
    let list = Conversations {
        offset: 0,
        limit: 20,
    };
    frame(&mut out, Kind::Conversations, next(), &list);
    let read = Read {
        conv: group_conv(1),
        up_to_seq: 4,
    };
    frame(&mut out, Kind::Read, next(), &read);
    let users = vec!["bob".to_owned()];
    frame(
        &mut out,
        Kind::PresenceSubscribe,
        next(),
        &PresenceSubscribe {
            users: users.clone(),
        },
    );
    frame(
        &mut out,
        Kind::PresenceQuery,
        next(),
        &PresenceQuery { users },
    );
    frame(&mut out, Kind::Typing, next(), &Typing { conv: 2 });
    let start = UploadStart {
        name: "notes.txt".into(),
        mime: "text/plain".into(),
        size: 5,
        sha256: vec![7; 32],
    };
    frame(&mut out, Kind::UploadStart, next(), &start);
    let chunk = UploadChunk {
        upload_id: 1,
        offset: 0,
        data: b"hello".to_vec(),
    };
    frame(&mut out, Kind::UploadChunk, next(), &chunk);
    frame(
        &mut out,
        Kind::UploadFinish,
        next(),
        &UploadFinish { upload_id: 1 },
    );
    let send = FileSend {
        to: "bob".into(),
        group_id: 0,
        client_msg_id: 1003,
        file_id: 1,
        thumbnail_id: 0,
        media: media::FILE,
        duration_ms: 0,
        width: 0,
        height: 0,
        text: "the notes".into(),
    };
    frame(&mut out, Kind::FileSend, next(), &send);
    let download = Download {
        file_id: 1,
        offset: 0,
        length: 0,
    };
    frame(&mut out, Kind::Download, next(), &download);
    out
}

fn message(msg_id: u64, text: &str) -> Vec<u8> {
    let message = Message {
        msg_id,
        from_id: 2,
        from: "bob".into(),
        to_id: 1,
        to: "alice".into(),
        client_msg_id: msg_id + 100,
        sent_at_ms: 1_764_547_200_000 + msg_id,
        text: text.into(),
    };
    rkyv::to_bytes::<Failure>(&message)
        .expect("serialise message")
        .to_vec()
}

fn record(msg_id: u64, kind: u16, text: &str) -> Vec<u8> {
    let record = Record {
        kind,
        msg_id,
        conv: group_conv(1),
        from_id: 2,
        from: "bob".into(),
        users: vec![1, 2, 3],
        client_msg_id: msg_id + 100,
        sent_at_ms: 1_764_547_200_000 + msg_id,
        up_to: 0,
        text: text.into(),
        attachments: Vec::new(),
    };
    let mut out = RECORD_MARKER.to_vec();
    out.extend_from_slice(&rkyv::to_bytes::<Failure>(&record).expect("serialise record"));
    out
}

/// Timeline entries 1..=4: 1:1 messages and group records.
fn entries() -> Vec<Entry> {
    vec![
        Entry {
            seq: 1,
            message: message(1, "hi alice"),
        },
        Entry {
            seq: 2,
            message: record(2, record_kind::GROUP_CREATED, "team"),
        },
        Entry {
            seq: 3,
            message: record(3, record_kind::GROUP_MESSAGE, "hi team"),
        },
        Entry {
            seq: 4,
            message: message(4, "see you"),
        },
    ]
}

/// Frames a node sends, unrelated to any request of the target's.
fn node_stream() -> Vec<u8> {
    let mut out = Vec::new();
    let all = entries();
    let page = SyncPage {
        entries: all[..3].to_vec(),
        head_seq: 4,
        has_more: true,
    };
    frame(&mut out, Kind::SyncPage, 3, &page);
    let push = Push {
        entries: all[3..].to_vec(),
    };
    frame(&mut out, Kind::Push, 0, &push);
    let presence = PresencePush {
        user_id: 2,
        online: true,
        version: 3,
    };
    frame(&mut out, Kind::PresencePush, 0, &presence);
    let typing = TypingPush {
        conv: 2,
        from_id: 2,
        from: "bob".into(),
    };
    frame(&mut out, Kind::TypingPush, 0, &typing);
    let error = ErrorBody {
        code: ErrorCode::ShuttingDown as u16,
        message: "node is shutting down".into(),
    };
    frame(&mut out, Kind::Error, 0, &error);
    out
}

/// The node's answers to what the client target's session has in flight after its
/// prelude, in the order it asked. The prelude is repeated here to learn the request ids;
/// keep it in step with `fuzz_targets/client_session.rs`.
fn client_answers() -> Vec<u8> {
    let now = Instant::now();
    let mut config = ClientConfig::new("alice", "phone")
        .with_password("secret")
        .with_seed(7);
    config.request_timeout = std::time::Duration::from_secs(5);
    config.sync_page_limit = 50;
    let mut session = ClientSession::new(config, MemoryStore::default());
    session.connect(now);
    session.connected(now);
    let hello_id = requests(&mut session)[0].1;
    let mut bytes = Vec::new();
    let ok = HelloOk {
        protocol_version: PROTOCOL_VERSION,
        heartbeat_interval_ms: 1_000,
        frame_size_max: tern::limits::FRAME_SIZE_MAX as u32,
        node: "node".into(),
    };
    frame(&mut bytes, Kind::HelloOk, hello_id, &ok);
    session.received(&bytes, now);
    let login_id = requests(&mut session)[0].1;
    bytes.clear();
    let ok = LoginOk {
        user_id: 1,
        token: "token".into(),
        token_expires_at_ms: u64::MAX,
        head_seq: 0,
        acked_seq: 0,
    };
    frame(&mut bytes, Kind::LoginOk, login_id, &ok);
    session.received(&bytes, now);
    session.send("bob", "hello bob", now).expect("room");
    session.send("carol", "hi", now).expect("room");
    session.fetch_timeline(0, now);
    session.group_op(group_op::CREATE, 0, "team", &["bob".to_owned()], now);
    session.group_send(1, 99, "to the team", now);
    session.history(2, 0, 10, now);
    session.conversations(0, 10, now);
    session.read(2, 5, now);
    session.presence_subscribe(&["bob".to_owned()], now);
    session.upload_start("a.txt", "text/plain", 3, [0; 32], now);
    session.download(1, 0, 0, now);
    session.typing(2);

    let mut out = Vec::new();
    let mut seq = 0;
    let mut fetched = false;
    for (kind, id) in requests(&mut session) {
        match kind {
            Kind::Sync if !fetched => {
                // The sync after login.
                let page = SyncPage {
                    entries: entries()[..2].to_vec(),
                    head_seq: 4,
                    has_more: false,
                };
                frame(&mut out, Kind::SyncPage, id, &page);
                seq = 2;
                fetched = true;
            }
            Kind::Sync => {
                let page = SyncPage {
                    entries: entries(),
                    head_seq: 4,
                    has_more: false,
                };
                frame(&mut out, Kind::SyncPage, id, &page);
            }
            Kind::Send => {
                seq += 1;
                let ack = SendAck {
                    msg_id: 10 + seq,
                    seq,
                    sent_at_ms: 1_764_547_200_000,
                    duplicate: false,
                };
                frame(&mut out, Kind::SendAck, id, &ack);
            }
            Kind::GroupOp => {
                let info = GroupInfo {
                    group_id: 1,
                    name: "team".into(),
                    owner_id: 1,
                    members: vec![GroupMember {
                        user_id: 1,
                        name: "alice".into(),
                        owner: true,
                    }],
                    seq: 5,
                };
                frame(&mut out, Kind::GroupInfo, id, &info);
            }
            Kind::GroupSend => {
                let error = ErrorBody {
                    code: ErrorCode::NotMember as u16,
                    message: "not a member of this group".into(),
                };
                frame(&mut out, Kind::Error, id, &error);
            }
            Kind::History => {
                let page = HistoryPage {
                    entries: entries().into_iter().rev().collect(),
                    has_more: false,
                };
                frame(&mut out, Kind::HistoryPage, id, &page);
            }
            Kind::Conversations => {
                let item = ConversationItem {
                    conv: 2,
                    title: "bob".into(),
                    last_seq: 4,
                    last_at_ms: 1,
                    last_from: "bob".into(),
                    preview: "see you".into(),
                    unread: 1,
                    read_seq: 3,
                };
                let page = ConversationsPage {
                    items: vec![item],
                    total: 1,
                };
                frame(&mut out, Kind::ConversationsPage, id, &page);
            }
            Kind::Read => {
                let ok = ReadOk {
                    conv: 2,
                    read_seq: 4,
                    unread: 0,
                };
                frame(&mut out, Kind::ReadOk, id, &ok);
            }
            Kind::PresenceSubscribe => {
                let item = PresenceItem {
                    user_id: 2,
                    name: "bob".into(),
                    online: true,
                    version: 1,
                };
                let state = PresenceState { users: vec![item] };
                frame(&mut out, Kind::PresenceState, id, &state);
            }
            Kind::UploadStart => {
                let ready = UploadReady {
                    upload_id: 1,
                    offset: 0,
                };
                frame(&mut out, Kind::UploadReady, id, &ready);
            }
            Kind::Download => {
                let chunk = FileChunk {
                    file_id: 1,
                    offset: 0,
                    size: 3,
                    data: b"abc".to_vec(),
                    // SHA-256 of "abc".
                    sha256: vec![
                        0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde,
                        0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c,
                        0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
                    ],
                };
                frame(&mut out, Kind::FileChunk, id, &chunk);
            }
            _ => {}
        }
    }
    out.extend_from_slice(&node_stream()[..]);
    frame(&mut out, Kind::Pong, 0, &Pong { nonce: 1 });
    let kicked = Kicked {
        code: ErrorCode::ReplacedByNewLogin as u16,
        message: "another login replaced this device".into(),
    };
    frame(&mut out, Kind::Kicked, 0, &kicked);
    out
}

/// (kind, request id) of each frame the session wrote since the last call.
fn requests(session: &mut ClientSession<MemoryStore>) -> Vec<(Kind, u32)> {
    let mut bytes = Vec::new();
    session.take_transmit(&mut bytes);
    let mut out = Vec::new();
    FrameReader::new()
        .feed(&bytes, |header, _| {
            out.push((header.kind, header.request_id));
            true
        })
        .expect("the session writes well-formed frames");
    out
}
