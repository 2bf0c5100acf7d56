//! The JSON form of frames (`protocol::json`): every kind both ways, the golden JSON
//! examples in `tests/golden/json/` against the golden binary frames beside them, u64
//! values as strings, every refusal with its error, the session's verdicts on translated
//! frames, and a seeded mutation run that no text makes panic.
//!
//! `TERN_BLESS=1 cargo test --test json_frames` rewrites the golden JSON files from the
//! binary ones; a change in them is a change of the WebSocket protocol and must be
//! deliberate (and shown in docs/protocol.md).

use std::collections::BTreeSet;
use std::path::PathBuf;

use rkyv::rancor::Failure;
use serde_json::{Value, json};
use tern::ids::UserId;
use tern::limits::{FRAME_HEADER_SIZE, FRAME_SIZE_MAX, JSON_DEPTH_MAX, JSON_TEXT_SIZE_MAX};
use tern::protocol::json::{
    JSON_SAFE_INTEGER_MAX, JsonError, JsonProblem, error_to_json, frame_from_json, frame_to_json,
    kind_name,
};
use tern::protocol::*;
use tern::session::{Conn, Identity, Request, SessionConfig};

type Ser<'a> =
    rkyv::api::high::HighSerializer<Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, Failure>;

fn frame<T: for<'a> rkyv::Serialize<Ser<'a>>>(kind: Kind, id: u32, value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out, kind, id, value);
    out
}

fn archived<T: for<'a> rkyv::Serialize<Ser<'a>>>(value: &T) -> Vec<u8> {
    rkyv::api::high::to_bytes_in::<_, Failure>(value, Vec::new()).unwrap()
}

fn record_bytes(record: &Record) -> Vec<u8> {
    let mut bytes = RECORD_MARKER.to_vec();
    bytes.extend_from_slice(&archived(record));
    bytes
}

const BIG: u64 = u64::MAX - 6;
const CONV: u64 = GROUP_CONV_BIT | 7;

fn message() -> Message {
    Message {
        msg_id: 4990,
        from_id: 43,
        from: "bob".into(),
        to_id: 42,
        to: "alice".into(),
        client_msg_id: BIG,
        sent_at_ms: 1_764_547_100_000,
        text: "line one\nline \"two\" \\ \u{1} é 😀".into(),
    }
}

fn attachment() -> Attachment {
    Attachment {
        file_id: 9,
        thumbnail_id: 10,
        media: media::IMAGE,
        size: 123_456,
        duration_ms: 0,
        width: 640,
        height: 480,
        mime: "image/png".into(),
        name: "cat.png".into(),
        sha256: (0..32).collect(),
    }
}

/// One record of every kind this build knows, and one of a kind it does not.
fn records() -> Vec<Record> {
    (1..=10u16)
        .map(|kind| Record {
            kind,
            msg_id: 5000 + u64::from(kind),
            conv: CONV,
            from_id: 42,
            from: "alice".into(),
            users: if kind == 2 { vec![42, 43, 44] } else { vec![] },
            client_msg_id: if kind == 1 { BIG } else { 0 },
            sent_at_ms: 1_764_547_200_000,
            up_to: if kind >= 7 { 4990 } else { 0 },
            text: "team".into(),
            attachments: if kind == 9 {
                vec![attachment()]
            } else {
                vec![]
            },
        })
        .collect()
}

fn entries() -> Vec<Entry> {
    let mut entries = vec![Entry {
        seq: 13,
        message: archived(&message()),
    }];
    for (i, r) in records().iter().enumerate() {
        entries.push(Entry {
            seq: 14 + i as u64,
            message: record_bytes(r),
        });
    }
    entries
}

/// One frame of every kind, with values that exercise each field format.
fn samples() -> Vec<Vec<u8>> {
    let s = |v: &str| v.to_owned();
    vec![
        frame(
            Kind::Hello,
            1,
            &Hello {
                protocol_version: 1,
                client: s("web"),
            },
        ),
        frame(
            Kind::HelloOk,
            1,
            &HelloOk {
                protocol_version: 1,
                heartbeat_interval_ms: 30_000,
                frame_size_max: 65_536,
                node: s("tern 0.1.0"),
            },
        ),
        frame(
            Kind::Login,
            2,
            &Login {
                user: s("ann"),
                device: s("laptop"),
                credential: Credential::Password(s("pw \"quoted\"")),
            },
        ),
        frame(
            Kind::Login,
            2,
            &Login {
                user: s("ann"),
                device: s("laptop"),
                credential: Credential::Token(s("v2.1.0.0.1.abc")),
            },
        ),
        frame(
            Kind::LoginOk,
            2,
            &LoginOk {
                user_id: 42,
                token: s("v2.42.0.0.1767225600000.ab"),
                token_expires_at_ms: 1_767_225_600_000,
                head_seq: 18,
                acked_seq: 12,
            },
        ),
        frame(Kind::Ping, 3, &Ping { nonce: u64::MAX }),
        frame(Kind::Pong, 3, &Pong { nonce: u64::MAX }),
        frame(
            Kind::Send,
            4,
            &Send {
                to: s("bob"),
                client_msg_id: BIG,
                text: s("hi"),
            },
        ),
        frame(
            Kind::SendAck,
            4,
            &SendAck {
                msg_id: 5000,
                seq: 19,
                sent_at_ms: 1_764_547_200_123,
                duplicate: true,
            },
        ),
        frame(
            Kind::Sync,
            5,
            &Sync {
                after_seq: u64::MAX,
                limit: 0,
            },
        ),
        frame(
            Kind::SyncPage,
            5,
            &SyncPage {
                entries: entries(),
                head_seq: 24,
                has_more: true,
            },
        ),
        frame(
            Kind::SyncPage,
            5,
            &SyncPage {
                entries: vec![],
                head_seq: 0,
                has_more: false,
            },
        ),
        frame(Kind::Push, 0, &Push { entries: entries() }),
        frame(Kind::DeviceAck, 6, &DeviceAck { up_to_seq: 24 }),
        frame(
            Kind::Kicked,
            0,
            &Kicked {
                code: ErrorCode::ReplacedByNewLogin as u16,
                message: s("new login"),
            },
        ),
        frame(
            Kind::Error,
            7,
            &ErrorBody {
                code: ErrorCode::Busy as u16,
                message: s("busy"),
            },
        ),
        frame(
            Kind::Error,
            0,
            &ErrorBody {
                code: 999,
                message: s("from the future"),
            },
        ),
        frame(
            Kind::GroupOp,
            8,
            &GroupOp {
                op: group_op::CREATE,
                group_id: 0,
                name: s("team"),
                users: vec![s("bob"), s("carol")],
            },
        ),
        frame(Kind::GroupQuery, 9, &GroupQuery { group_id: 7 }),
        frame(
            Kind::GroupInfo,
            9,
            &GroupInfo {
                group_id: 7,
                name: s("team"),
                owner_id: 42,
                members: vec![
                    GroupMember {
                        user_id: 42,
                        name: s("alice"),
                        owner: true,
                    },
                    GroupMember {
                        user_id: 43,
                        name: s("bob"),
                        owner: false,
                    },
                ],
                seq: 20,
            },
        ),
        frame(
            Kind::GroupList,
            10,
            &GroupList {
                after_group_id: 0,
                limit: 0,
            },
        ),
        frame(
            Kind::GroupListPage,
            10,
            &GroupListPage {
                groups: vec![GroupSummary {
                    group_id: 7,
                    name: s("team"),
                    owner_id: 42,
                    members: 3,
                }],
                has_more: false,
            },
        ),
        frame(
            Kind::GroupSend,
            11,
            &GroupSend {
                group_id: 7,
                client_msg_id: 1,
                text: s("all"),
            },
        ),
        frame(
            Kind::History,
            12,
            &History {
                conv: CONV,
                before_seq: 0,
                limit: 50,
            },
        ),
        frame(
            Kind::HistoryPage,
            12,
            &HistoryPage {
                entries: entries(),
                has_more: true,
            },
        ),
        frame(
            Kind::Conversations,
            13,
            &Conversations {
                offset: 0,
                limit: 64,
            },
        ),
        frame(
            Kind::ConversationsPage,
            13,
            &ConversationsPage {
                items: vec![ConversationItem {
                    conv: CONV,
                    title: s("team"),
                    last_seq: 24,
                    last_at_ms: 1_764_547_200_000,
                    last_from: s("bob"),
                    preview: s("see you"),
                    unread: 2,
                    read_seq: 20,
                }],
                total: 1,
            },
        ),
        frame(
            Kind::Read,
            14,
            &Read {
                conv: CONV,
                up_to_seq: 24,
            },
        ),
        frame(
            Kind::ReadOk,
            14,
            &ReadOk {
                conv: CONV,
                read_seq: 24,
                unread: 0,
            },
        ),
        frame(
            Kind::PresenceSubscribe,
            15,
            &PresenceSubscribe {
                users: vec![s("bob")],
            },
        ),
        frame(Kind::PresenceQuery, 16, &PresenceQuery { users: vec![] }),
        frame(
            Kind::PresenceState,
            16,
            &PresenceState {
                users: vec![PresenceItem {
                    user_id: 43,
                    name: s("bob"),
                    online: true,
                    version: 3,
                }],
            },
        ),
        frame(
            Kind::PresencePush,
            0,
            &PresencePush {
                user_id: 43,
                online: false,
                version: 4,
            },
        ),
        frame(Kind::Typing, 17, &Typing { conv: CONV }),
        frame(
            Kind::TypingPush,
            0,
            &TypingPush {
                conv: CONV,
                from_id: 43,
                from: s("bob"),
            },
        ),
        frame(
            Kind::UploadStart,
            18,
            &UploadStart {
                name: s("cat.png"),
                mime: s("image/png"),
                size: 3,
                sha256: vec![0xab; 32],
            },
        ),
        frame(
            Kind::UploadReady,
            18,
            &UploadReady {
                upload_id: 1,
                offset: 0,
            },
        ),
        frame(
            Kind::UploadChunk,
            19,
            &UploadChunk {
                upload_id: 1,
                offset: 0,
                data: vec![0, 255, 7],
            },
        ),
        frame(
            Kind::UploadAck,
            19,
            &UploadAck {
                upload_id: 1,
                offset: 3,
            },
        ),
        frame(Kind::UploadFinish, 20, &UploadFinish { upload_id: 1 }),
        frame(
            Kind::FileInfo,
            20,
            &FileInfo {
                file_id: 9,
                name: s("cat.png"),
                mime: s("image/png"),
                size: 3,
                sha256: vec![0xab; 32],
            },
        ),
        frame(
            Kind::FileSend,
            21,
            &FileSend {
                to: s(""),
                group_id: 7,
                client_msg_id: BIG,
                file_id: 9,
                thumbnail_id: 0,
                media: media::VOICE,
                duration_ms: 1500,
                width: 0,
                height: 0,
                text: s("listen"),
            },
        ),
        frame(
            Kind::Download,
            22,
            &Download {
                file_id: 9,
                offset: 0,
                length: 0,
            },
        ),
        frame(
            Kind::FileChunk,
            22,
            &FileChunk {
                file_id: 9,
                offset: 0,
                size: 3,
                data: vec![0, 255, 7],
                sha256: vec![0xab; 32],
            },
        ),
        frame(Kind::Logout, 23, &Logout { everywhere: true }),
        frame(
            Kind::ChangePassword,
            24,
            &ChangePassword {
                old: s("a"),
                new: s("b"),
            },
        ),
        frame(Kind::Devices, 25, &Devices { revoke: s("") }),
        frame(
            Kind::DevicesPage,
            25,
            &DevicesPage {
                devices: vec![DeviceItem {
                    name: s("laptop"),
                    acked_seq: 24,
                    online: true,
                    current: true,
                }],
            },
        ),
    ]
}

fn to_json(frame: &[u8]) -> String {
    let mut out = String::new();
    frame_to_json(frame, &mut out).unwrap_or_else(|e| panic!("{e} for {frame:?}"));
    out
}

fn from_json(text: &str) -> Result<Vec<u8>, JsonError> {
    let mut out = Vec::new();
    let header = frame_from_json(text.as_bytes(), &mut out)?;
    assert_eq!(out.len(), FRAME_HEADER_SIZE + header.payload_len as usize);
    Ok(out)
}

fn value(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

fn header(frame: &[u8]) -> FrameHeader {
    read_header(frame).unwrap()
}

fn payload(frame: &[u8]) -> &[u8] {
    &frame[FRAME_HEADER_SIZE..]
}

#[test]
fn every_kind_round_trips_binary_json_binary() {
    let all: BTreeSet<u16> = (0..=u16::MAX)
        .filter(|k| Kind::from_u16(*k).is_some())
        .collect();
    let mut seen = BTreeSet::new();
    for bytes in samples() {
        let json = to_json(&bytes);
        let parsed = value(&json);
        let h = header(&bytes);
        seen.insert(h.kind as u16);
        assert_eq!(parsed["kind"], kind_name(h.kind), "{json}");
        assert_eq!(parsed["request_id"], h.request_id, "{json}");
        let back = from_json(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, bytes, "{json}");
        // Key order and spacing do not matter on input.
        let pretty = serde_json::to_string_pretty(&parsed).unwrap();
        assert_eq!(from_json(&pretty).unwrap(), bytes, "{pretty}");
    }
    assert_eq!(seen, all, "a kind has no sample");
}

#[test]
fn binary_to_json_shows_the_documented_fields() {
    let ack = frame(
        Kind::SendAck,
        4,
        &SendAck {
            msg_id: 5000,
            seq: 19,
            sent_at_ms: 1_764_547_200_123,
            duplicate: false,
        },
    );
    assert_eq!(
        to_json(&ack),
        r#"{"kind":"send_ack","request_id":4,"msg_id":5000,"seq":19,"sent_at_ms":1764547200123,"duplicate":false}"#
    );
    let error = frame(
        Kind::Error,
        7,
        &ErrorBody {
            code: 7,
            message: "busy".into(),
        },
    );
    assert_eq!(
        value(&to_json(&error)),
        json!({"kind": "error", "request_id": 7, "code": 7, "name": "busy", "message": "busy"})
    );
    let push = value(&to_json(&frame(
        Kind::Push,
        0,
        &Push { entries: entries() },
    )));
    let list = push["entries"].as_array().unwrap();
    assert_eq!(list.len(), 11);
    assert_eq!(list[0]["seq"], 13);
    assert_eq!(list[0]["message"]["client_msg_id"], BIG.to_string());
    assert_eq!(list[0]["message"]["text"], message().text);
    let names: Vec<&str> = list[1..]
        .iter()
        .map(|e| e["record"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "group_message",
            "group_created",
            "members_added",
            "members_removed",
            "member_left",
            "group_renamed",
            "read",
            "delivered",
            "file_message",
            "10"
        ]
    );
    let created = &list[2]["record"];
    assert_eq!(created["conv"], CONV.to_string());
    assert_eq!(created["users"], json!([42, 43, 44]));
    let file = &list[9]["record"]["attachments"][0];
    assert_eq!(
        file["sha256"],
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    );
    assert_eq!(file["media"], 1);
    let chunk = frame(
        Kind::FileChunk,
        22,
        &FileChunk {
            file_id: 9,
            offset: 0,
            size: 3,
            data: vec![0, 255, 7],
            sha256: vec![],
        },
    );
    assert_eq!(value(&to_json(&chunk))["data"], "AP8H");
}

#[test]
fn json_to_binary_carries_the_intended_values() {
    let f = from_json(r#"{"kind":"hello","request_id":1,"protocol_version":1,"client":"web"}"#)
        .unwrap();
    assert_eq!(header(&f).kind, Kind::Hello);
    let hello = access::<ArchivedHello>(Kind::Hello, payload(&f)).unwrap();
    assert_eq!(
        (hello.protocol_version.to_native(), hello.client.as_str()),
        (1, "web")
    );

    let f = from_json(
        r#"{"kind":"login","request_id":2,"user":"ann","device":"laptop","credential":{"password":"pw"}}"#,
    )
    .unwrap();
    let login = access::<ArchivedLogin>(Kind::Login, payload(&f)).unwrap();
    assert_eq!(login.user.as_str(), "ann");
    assert!(matches!(&login.credential, ArchivedCredential::Password(p) if p.as_str() == "pw"));
    let f = from_json(
        r#"{"kind":"login","request_id":2,"user":"ann","device":"laptop","credential":{"token":"t"}}"#,
    )
    .unwrap();
    let login = access::<ArchivedLogin>(Kind::Login, payload(&f)).unwrap();
    assert!(matches!(&login.credential, ArchivedCredential::Token(t) if t.as_str() == "t"));

    let f =
        from_json(r#"{"kind":"send","request_id":3,"to":"bob","client_msg_id":42,"text":"hi"}"#)
            .unwrap();
    assert_eq!(header(&f).request_id, 3);
    let send = access::<ArchivedSend>(Kind::Send, payload(&f)).unwrap();
    assert_eq!(
        (
            send.to.as_str(),
            send.client_msg_id.to_native(),
            send.text.as_str()
        ),
        ("bob", 42, "hi")
    );

    let f = from_json(&format!(
        r#"{{"kind":"read","request_id":9,"conv":"{CONV}","up_to_seq":24}}"#
    ))
    .unwrap();
    let read = access::<ArchivedRead>(Kind::Read, payload(&f)).unwrap();
    assert_eq!(conv_group(read.conv.to_native()), Some(7));

    let f = from_json(
        r#"{"kind":"upload_chunk","request_id":5,"upload_id":1,"offset":0,"data":"AP8H"}"#,
    )
    .unwrap();
    let chunk = access::<ArchivedUploadChunk>(Kind::UploadChunk, payload(&f)).unwrap();
    assert_eq!(chunk.data.as_slice(), [0, 255, 7]);

    let f =
        from_json(r#"{"kind":"group_op","request_id":6,"op":9,"group_id":0,"name":"","users":[]}"#)
            .unwrap();
    let op = access::<ArchivedGroupOp>(Kind::GroupOp, payload(&f)).unwrap();
    assert_eq!(
        op.op, 9,
        "an op the node refuses still travels: the shard answers it"
    );
}

#[test]
fn u64_values_past_2_pow_53_travel_as_strings_both_ways() {
    let f = from_json(&format!(
        r#"{{"kind":"send","request_id":3,"to":"bob","client_msg_id":"{}","text":""}}"#,
        u64::MAX
    ))
    .unwrap();
    let send = access::<ArchivedSend>(Kind::Send, payload(&f)).unwrap();
    assert_eq!(send.client_msg_id.to_native(), u64::MAX);
    assert_eq!(value(&to_json(&f))["client_msg_id"], u64::MAX.to_string());

    // Numbers are accepted up to 2^53, which every client holds exactly; past it the
    // client may have rounded, so only the string form is taken.
    let with = |id: &str| from_json(&format!(r#"{{"kind":"ping","request_id":1,"nonce":{id}}}"#));
    let ping = with(&JSON_SAFE_INTEGER_MAX.to_string()).unwrap();
    assert_eq!(
        access::<ArchivedPing>(Kind::Ping, payload(&ping))
            .unwrap()
            .nonce
            .to_native(),
        1 << 53
    );
    assert_eq!(value(&to_json(&ping))["nonce"], (1u64 << 53).to_string());
    let e = with(&(JSON_SAFE_INTEGER_MAX + 1).to_string()).unwrap_err();
    assert!(
        matches!(&e.problem, JsonProblem::WrongType { field, .. } if field == "nonce"),
        "{e}"
    );
    assert!(with("\"18446744073709551616\"").is_err());
    assert!(with("-1").is_err());

    // Other u64 fields are numbers, exact over the whole range as written.
    let f = from_json(&format!(
        r#"{{"kind":"sync","request_id":5,"after_seq":{},"limit":0}}"#,
        u64::MAX
    ))
    .unwrap();
    let sync = access::<ArchivedSync>(Kind::Sync, payload(&f)).unwrap();
    assert_eq!(sync.after_seq.to_native(), u64::MAX);
    assert!(from_json(r#"{"kind":"sync","request_id":5,"after_seq":"1","limit":0}"#).is_err());
}

fn problem(text: &str) -> (Option<u32>, JsonProblem) {
    let mut out = vec![1, 2, 3];
    let e = frame_from_json(text.as_bytes(), &mut out).unwrap_err();
    assert_eq!(out, [1, 2, 3], "output is unchanged on error");
    assert_eq!(e.code(), ErrorCode::MalformedFrame);
    assert!(!e.to_string().is_empty());
    (e.request_id, e.problem)
}

#[test]
fn malformed_texts_are_refused_with_their_problem_and_request_id() {
    use JsonProblem::*;
    let wrong = |f: &str| WrongType {
        field: f.into(),
        expected: "",
    };
    let cases: Vec<(String, Option<u32>, JsonProblem)> = vec![
        ("{".into(), None, Syntax(String::new())),
        ("".into(), None, Syntax(String::new())),
        ("{\"kind\":\"ping\"} x".into(), None, Syntax(String::new())),
        ("\u{feff}{}".into(), None, Syntax(String::new())),
        ("[1]".into(), None, NotAnObject),
        ("\"ping\"".into(), None, NotAnObject),
        (r#"{"kind":"ping","request_id":1,"nonce":1,"nonce":2}"#.into(), None, DuplicateKey("nonce".into())),
        (r#"{"kind":"sendd","request_id":4}"#.into(), Some(4), UnknownKind("sendd".into())),
        (r#"{"kind":"Send","request_id":4}"#.into(), Some(4), UnknownKind("Send".into())),
        (r#"{"request_id":4}"#.into(), Some(4), MissingField("kind".into())),
        (r#"{"kind":7,"request_id":4}"#.into(), Some(4), wrong("kind")),
        (r#"{"kind":"ping","nonce":"1"}"#.into(), None, MissingField("request_id".into())),
        (r#"{"kind":"ping","request_id":-1,"nonce":"1"}"#.into(), None, wrong("request_id")),
        (r#"{"kind":"ping","request_id":4294967296,"nonce":"1"}"#.into(), None, wrong("request_id")),
        (r#"{"kind":"ping","request_id":1.0,"nonce":"1"}"#.into(), None, wrong("request_id")),
        (r#"{"kind":"ping","request_id":1}"#.into(), Some(1), MissingField("nonce".into())),
        (r#"{"kind":"ping","request_id":1,"nonce":"1","extra":0}"#.into(), Some(1), UnknownField("extra".into())),
        (r#"{"kind":"ping","request_id":1,"nonce":null}"#.into(), Some(1), wrong("nonce")),
        (r#"{"kind":"hello","request_id":1,"protocol_version":4294967296,"client":""}"#.into(), Some(1), wrong("protocol_version")),
        (r#"{"kind":"hello","request_id":1,"protocol_version":1,"client":7}"#.into(), Some(1), wrong("client")),
        (r#"{"kind":"logout","request_id":1,"everywhere":1}"#.into(), Some(1), wrong("everywhere")),
        (r#"{"kind":"group_op","request_id":1,"op":256,"group_id":0,"name":"","users":[]}"#.into(), Some(1), wrong("op")),
        (r#"{"kind":"group_op","request_id":1,"op":1,"group_id":0,"name":"","users":["a",2]}"#.into(), Some(1), wrong("users[1]")),
        (r#"{"kind":"login","request_id":2,"user":"a","device":"b","credential":{}}"#.into(), Some(2), wrong("credential")),
        (r#"{"kind":"login","request_id":2,"user":"a","device":"b","credential":{"password":"x","token":"y"}}"#.into(), Some(2), wrong("credential")),
        (r#"{"kind":"login","request_id":2,"user":"a","device":"b","credential":"x"}"#.into(), Some(2), wrong("credential")),
        (r#"{"kind":"upload_chunk","request_id":3,"upload_id":1,"offset":0,"data":"AP8"}"#.into(), Some(3), wrong("data")),
        (r#"{"kind":"push","request_id":0,"entries":[{"seq":1}]}"#.into(), Some(0), wrong("entries[0]")),
        (r#"{"kind":"push","request_id":0,"entries":[{"seq":1,"message":{}}]}"#.into(), Some(0), MissingField("entries[0].message.msg_id".into())),
        (r#"{"kind":"push","request_id":0,"entries":[{"seq":1,"record":{"kind":"nope"}}]}"#.into(), Some(0), wrong("entries[0].record.kind")),
    ];
    for (text, id, expected) in cases {
        let (got_id, got) = problem(&text);
        assert_eq!(got_id, id, "{text}");
        match (&got, &expected) {
            (Syntax(_), Syntax(_)) => {}
            (WrongType { field: a, .. }, WrongType { field: b, .. }) => assert_eq!(a, b, "{text}"),
            _ => assert_eq!(got, expected, "{text}"),
        }
    }
}

#[test]
fn size_depth_and_frame_bounds_are_refused() {
    let long = format!(
        r#"{{"kind":"send","request_id":1,"to":"bob","client_msg_id":1,"text":"{}"}}"#,
        "x".repeat(JSON_TEXT_SIZE_MAX)
    );
    assert_eq!(
        problem(&long),
        (None, JsonProblem::TooLong { len: long.len() })
    );
    let deep = format!(
        r#"{{"kind":"presence_query","request_id":1,"users":{}{}}}"#,
        "[".repeat(JSON_DEPTH_MAX),
        "]".repeat(JSON_DEPTH_MAX)
    );
    assert_eq!(problem(&deep), (None, JsonProblem::TooDeep));
    // Under the text bound but over the frame bound: the frame could not be sent in binary.
    let big = format!(
        r#"{{"kind":"send","request_id":6,"to":"bob","client_msg_id":1,"text":"{}"}}"#,
        "x".repeat(FRAME_SIZE_MAX)
    );
    assert!(big.len() <= JSON_TEXT_SIZE_MAX);
    assert!(matches!(
        problem(&big),
        (Some(6), JsonProblem::FrameTooLarge { .. })
    ));
}

#[test]
fn error_answers_are_json_error_frames() {
    let (id, p) = problem(r#"{"kind":"nope","request_id":8}"#);
    let mut out = String::new();
    error_to_json(
        id.unwrap_or(0),
        ErrorCode::MalformedFrame,
        &p.to_string(),
        &mut out,
    );
    assert_eq!(
        value(&out),
        json!({"kind": "error", "request_id": 8, "code": 1, "name": "malformed_frame",
               "message": "unknown kind \"nope\""})
    );
    out.clear();
    error_to_json(0, ErrorCode::Busy, &"é".repeat(200), &mut out);
    assert_eq!(value(&out)["message"].as_str().unwrap().len(), 256);
}

#[test]
fn frame_to_json_refuses_what_is_not_one_valid_frame() {
    let ping = frame(Kind::Ping, 1, &Ping { nonce: 1 });
    let mut out = String::from("kept");
    assert!(frame_to_json(&ping[..5], &mut out).is_err());
    assert!(frame_to_json(&[ping.clone(), ping.clone()].concat(), &mut out).is_err());
    let mut bad = frame(
        Kind::Push,
        0,
        &Push {
            entries: vec![Entry {
                seq: 1,
                message: vec![1, 2],
            }],
        },
    );
    assert_eq!(
        frame_to_json(&bad, &mut out),
        Err(DecodeError::BadArchive(Kind::Push))
    );
    bad[4] = 99;
    assert_eq!(
        frame_to_json(&bad, &mut out),
        Err(DecodeError::UnknownKind(99))
    );
    assert_eq!(out, "kept");
}

// ---- the golden JSON examples ------------------------------------------------------------

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn from_hex(text: &str) -> Vec<u8> {
    text.split_ascii_whitespace()
        .map(|p| u8::from_str_radix(p, 16).unwrap())
        .collect()
}

/// `tests/golden/json/<stem>.json` is the JSON form of `tests/golden/<stem>.hex`, and reads
/// back to exactly its bytes.
#[test]
fn golden_json_matches_the_golden_frames() {
    let bless = std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1");
    let json_dir = golden_dir().join("json");
    let mut checked = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "hex"))
        .collect();
    files.sort();
    for path in files {
        let bytes = from_hex(&std::fs::read_to_string(&path).unwrap());
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let json_path = json_dir.join(format!("{stem}.json"));
        let json = to_json(&bytes);
        if bless {
            std::fs::create_dir_all(&json_dir).unwrap();
            std::fs::write(&json_path, format!("{json}\n")).unwrap();
        }
        let stored = std::fs::read_to_string(&json_path)
            .unwrap_or_else(|_| panic!("{} missing: TERN_BLESS=1 writes it", json_path.display()));
        assert_eq!(stored.trim_end(), json, "{stem}: JSON form changed");
        assert_eq!(from_json(stored.trim_end()).unwrap(), bytes, "{stem}");
        checked += 1;
    }
    assert!(checked >= 17, "only {checked} golden frames found");
}

// ---- the session judges translated frames as it judges binary ones -----------------------

fn config() -> SessionConfig {
    SessionConfig {
        heartbeat_interval_ms: 30_000,
        node_name: "tern-test".into(),
    }
}

/// Feeds one JSON text to `conn` and returns the node's answers as JSON.
fn exchange(conn: &mut Conn, text: &str, requests: &mut Vec<Request>) -> Vec<Value> {
    let bytes = from_json(text).unwrap();
    conn.receive(&bytes, 0, &config(), requests);
    answers(conn)
}

fn answers(conn: &mut Conn) -> Vec<Value> {
    let out = std::mem::take(conn.output());
    let mut texts = Vec::new();
    let mut reader = FrameReader::new();
    reader
        .feed(&out, |h, p| {
            let mut text = String::new();
            tern::protocol::json::payload_to_json(h, p, &mut text).unwrap();
            texts.push(value(&text));
            true
        })
        .unwrap();
    texts
}

fn logged_in() -> Conn {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    let hello = exchange(
        &mut conn,
        r#"{"kind":"hello","request_id":1,"protocol_version":1,"client":"web"}"#,
        &mut requests,
    );
    assert_eq!(hello[0]["kind"], "hello_ok");
    assert_eq!(hello[0]["node"], "tern-test");
    exchange(
        &mut conn,
        r#"{"kind":"login","request_id":2,"user":"ann","device":"laptop","credential":{"password":"pw"}}"#,
        &mut requests,
    );
    assert!(matches!(
        &requests[..],
        [Request::Login { request_id: 2, .. }]
    ));
    let identity = Identity {
        user: UserId(1),
        name: "ann".into(),
        device: "laptop".into(),
    };
    let ok = LoginOk {
        user_id: 1,
        token: "t".into(),
        token_expires_at_ms: 1,
        head_seq: 0,
        acked_seq: 0,
    };
    conn.login_ok(2, identity, &ok, 0, &config(), &mut requests);
    let login = answers(&mut conn);
    assert_eq!(login[0]["kind"], "login_ok");
    conn
}

#[test]
fn a_node_to_client_kind_from_a_client_gets_the_binary_verdict() {
    let push = r#"{"kind":"push","request_id":0,"entries":[]}"#;
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    exchange(
        &mut conn,
        r#"{"kind":"hello","request_id":1,"protocol_version":1,"client":"web"}"#,
        &mut requests,
    );
    let before = exchange(&mut conn, push, &mut requests);
    assert_eq!(before[0]["name"], "not_authenticated");
    assert!(conn.is_closing());

    let mut conn = logged_in();
    let after = exchange(&mut conn, push, &mut Vec::new());
    assert_eq!(after[0]["name"], "protocol_violation");
    assert!(conn.is_closing());
}

#[test]
fn limits_of_the_kind_are_the_sessions_to_apply() {
    let mut conn = Conn::new(0);
    let long_client = format!(
        r#"{{"kind":"hello","request_id":1,"protocol_version":1,"client":"{}"}}"#,
        "c".repeat(65)
    );
    let answer = exchange(&mut conn, &long_client, &mut Vec::new());
    assert_eq!(answer[0]["name"], "protocol_violation");

    let mut conn = logged_in();
    let mut requests = Vec::new();
    let long_text = format!(
        r#"{{"kind":"send","request_id":3,"to":"bob","client_msg_id":"42","text":"{}"}}"#,
        "x".repeat(16 * 1024 + 1)
    );
    let answer = exchange(&mut conn, &long_text, &mut requests);
    assert_eq!(answer[0]["name"], "too_large");
    assert_eq!(answer[0]["request_id"], 3);
    assert!(!conn.is_closing());
    let pong = exchange(
        &mut conn,
        r#"{"kind":"ping","request_id":4,"nonce":"18446744073709551615"}"#,
        &mut requests,
    );
    assert_eq!(
        pong[0],
        json!({"kind": "pong", "request_id": 4, "nonce": "18446744073709551615"})
    );
    exchange(
        &mut conn,
        r#"{"kind":"send","request_id":5,"to":"bob","client_msg_id":"42","text":"hi"}"#,
        &mut requests,
    );
    assert!(matches!(
        &requests[..],
        [Request::Send {
            request_id: 5,
            client_msg_id: 42,
            ..
        }]
    ));
}

// ---- no text makes it panic ---------------------------------------------------------------

/// xorshift64*: a fixed seed makes every failure reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "\\",
    "null",
    "true",
    "-1",
    "0",
    "1.5",
    "1e999",
    "9007199254740993",
    "18446744073709551616",
    "\"kind\"",
    "\"request_id\"",
    "\"\\ud800\"",
    "\"entries\"",
    "\"record\"",
    "\"message\"",
    "\"AP8H\"",
    "\u{0}",
    "\u{ff}",
    "é",
];

fn mutate(rng: &mut Rng, text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if !bytes.is_empty() => {
                let end = (at + 1 + rng.below(8)).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())].as_bytes();
                bytes.splice(at..at, token.iter().copied());
            }
            2 if at < bytes.len() => bytes[at] = rng.next() as u8,
            3 => bytes.truncate(at),
            _ => {
                let from = rng.below(bytes.len());
                let len = rng.below(16).min(bytes.len() - from.min(bytes.len()));
                let piece = bytes[from..from + len].to_vec();
                bytes.splice(at..at, piece);
            }
        }
    }
    bytes
}

#[test]
fn arbitrary_texts_never_panic_and_what_translates_round_trips() {
    let seeds: Vec<String> = samples().iter().map(|f| to_json(f)).collect();
    let mut rng = Rng(0x7e57_0f7e_57a1);
    let mut accepted = 0;
    for round in 0..20_000 {
        let seed = &seeds[round % seeds.len()];
        let text = mutate(&mut rng, seed);
        let mut out = Vec::new();
        match frame_from_json(&text, &mut out) {
            Ok(h) => {
                accepted += 1;
                // What translates is one whole frame of a valid header, and its JSON form
                // translates back to the same bytes whenever its payload validates.
                assert_eq!(read_header(&out).unwrap(), h);
                let mut again = String::new();
                if frame_to_json(&out, &mut again).is_ok() {
                    assert_eq!(from_json(&again).unwrap(), out);
                }
            }
            Err(e) => {
                assert!(out.is_empty());
                assert_eq!(e.code(), ErrorCode::MalformedFrame);
            }
        }
        // The same bytes as a frame from the node: refused or translated, never a panic.
        let _ = frame_to_json(&text, &mut String::new());
    }
    assert!(
        accepted > 100,
        "the mutations reached valid frames only {accepted} times"
    );
}
