use super::*;
use crate::limits::FRAME_HEADER_SIZE;
use crate::protocol::{ArchivedErrorBody, ArchivedHelloOk, ArchivedPong, Hello, Login, Ping, Send};

fn config() -> SessionConfig {
    SessionConfig {
        heartbeat_interval_ms: 1000,
        node_name: "test".into(),
    }
}

fn frame<T>(kind: Kind, id: u32, value: &T) -> Vec<u8>
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                Vec<u8>,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Failure,
            >,
        >,
{
    let mut out = Vec::new();
    protocol::encode(&mut out, kind, id, value);
    out
}

fn hello() -> Vec<u8> {
    frame(
        Kind::Hello,
        1,
        &Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            client: "t".into(),
        },
    )
}

fn login() -> Vec<u8> {
    frame(
        Kind::Login,
        2,
        &Login {
            user: "alice".into(),
            device: "phone".into(),
            credential: protocol::Credential::Password("pw".into()),
        },
    )
}

/// Splits the connection's output into (kind, request id, payload) triples.
fn take_frames(conn: &mut Conn) -> Vec<(Kind, u32, Vec<u8>)> {
    let bytes = std::mem::take(conn.output());
    let mut frames = Vec::new();
    let mut reader = FrameReader::new();
    reader
        .feed(&bytes, |h, p| {
            frames.push((h.kind, h.request_id, p.to_vec()));
            true
        })
        .unwrap();
    assert_eq!(reader.buffered(), 0);
    frames
}

fn error_code(payload: &[u8]) -> u16 {
    protocol::access::<ArchivedErrorBody>(Kind::Error, payload)
        .unwrap()
        .code
        .to_native()
}

fn established() -> Conn {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    conn.receive(&hello(), 0, &config(), &mut requests);
    conn.receive(&login(), 0, &config(), &mut requests);
    assert_eq!(requests.len(), 1);
    let identity = Identity {
        user: UserId(1),
        name: "alice".into(),
        device: "phone".into(),
    };
    let ok = LoginOk {
        user_id: 1,
        token: "t".into(),
        token_expires_at_ms: 1,
        head_seq: 0,
        acked_seq: 0,
    };
    conn.login_ok(2, identity, &ok, 0, &config(), &mut requests);
    take_frames(&mut conn);
    conn
}

#[test]
fn hello_is_answered_with_heartbeat_interval() {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    conn.receive(&hello(), 5, &config(), &mut requests);
    let frames = take_frames(&mut conn);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, Kind::HelloOk);
    assert_eq!(frames[0].1, 1);
    let ok = protocol::access::<ArchivedHelloOk>(Kind::HelloOk, &frames[0].2).unwrap();
    assert_eq!(ok.heartbeat_interval_ms.to_native(), 1000);
    assert_eq!(conn.phase(), &Phase::AwaitLogin);
    assert_eq!(conn.last_rx_ms, 5);
}

#[test]
fn wrong_version_is_refused_and_closes() {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    let bytes = frame(
        Kind::Hello,
        1,
        &Hello {
            protocol_version: 99,
            client: "t".into(),
        },
    );
    conn.receive(&bytes, 0, &config(), &mut requests);
    let frames = take_frames(&mut conn);
    assert_eq!(frames[0].0, Kind::Error);
    assert_eq!(
        error_code(&frames[0].2),
        ErrorCode::UnsupportedVersion as u16
    );
    assert!(conn.is_closing());
}

#[test]
fn send_before_login_is_refused_and_closes() {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    let mut bytes = hello();
    bytes.extend(frame(
        Kind::Send,
        3,
        &Send {
            to: "bob".into(),
            client_msg_id: 1,
            text: "x".into(),
        },
    ));
    conn.receive(&bytes, 0, &config(), &mut requests);
    let frames = take_frames(&mut conn);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1].0, Kind::Error);
    assert_eq!(frames[1].1, 3);
    assert_eq!(error_code(&frames[1].2), ErrorCode::NotAuthenticated as u16);
    assert!(conn.is_closing());
    assert!(requests.is_empty());
}

#[test]
fn frames_after_login_wait_for_its_answer_and_keep_order() {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    let mut bytes = hello();
    bytes.extend(login());
    bytes.extend(frame(
        Kind::Send,
        3,
        &Send {
            to: "bob".into(),
            client_msg_id: 9,
            text: "x".into(),
        },
    ));
    bytes.extend(frame(Kind::Ping, 4, &Ping { nonce: 77 }));
    conn.receive(&bytes, 0, &config(), &mut requests);
    assert_eq!(requests.len(), 1);
    assert!(matches!(requests[0], Request::Login { request_id: 2, .. }));
    assert_eq!(conn.phase(), &Phase::LoggingIn);
    requests.clear();
    let identity = Identity {
        user: UserId(1),
        name: "alice".into(),
        device: "phone".into(),
    };
    let ok = LoginOk {
        user_id: 1,
        token: "t".into(),
        token_expires_at_ms: 1,
        head_seq: 0,
        acked_seq: 0,
    };
    conn.login_ok(2, identity, &ok, 0, &config(), &mut requests);
    assert_eq!(
        requests,
        vec![Request::Send {
            request_id: 3,
            to: "bob".into(),
            client_msg_id: 9,
            text: "x".into()
        }]
    );
    let frames = take_frames(&mut conn);
    let kinds: Vec<Kind> = frames.iter().map(|f| f.0).collect();
    assert_eq!(kinds, vec![Kind::HelloOk, Kind::LoginOk, Kind::Pong]);
    let pong = protocol::access::<ArchivedPong>(Kind::Pong, &frames[2].2).unwrap();
    assert_eq!(pong.nonce.to_native(), 77);
}

#[test]
fn random_bytes_get_malformed_frame_and_close() {
    let mut conn = Conn::new(0);
    let mut requests = Vec::new();
    let garbage: Vec<u8> = (0..200u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    conn.receive(&garbage, 0, &config(), &mut requests);
    let frames = take_frames(&mut conn);
    assert_eq!(frames.len(), 1);
    assert_eq!(error_code(&frames[0].2), ErrorCode::MalformedFrame as u16);
    assert!(conn.is_closing());
    // Nothing after closing is read.
    conn.receive(&hello(), 1, &config(), &mut requests);
    assert!(take_frames(&mut conn).is_empty());
}

#[test]
fn corrupt_archive_behind_valid_header_is_malformed() {
    let mut conn = established();
    let mut requests = Vec::new();
    let mut bytes = frame(
        Kind::Send,
        3,
        &Send {
            to: "bob".into(),
            client_msg_id: 1,
            text: "x".into(),
        },
    );
    let len = bytes.len();
    for b in &mut bytes[len - 24..len - 16] {
        *b = 0x80;
    }
    conn.receive(&bytes, 0, &config(), &mut requests);
    assert!(requests.is_empty());
    let frames = take_frames(&mut conn);
    assert_eq!(error_code(&frames[0].2), ErrorCode::MalformedFrame as u16);
    assert!(conn.is_closing());
}

#[test]
fn oversized_text_is_refused_without_closing() {
    let mut conn = established();
    let mut requests = Vec::new();
    let text = "x".repeat(crate::limits::MESSAGE_TEXT_SIZE_MAX + 1);
    let bytes = frame(
        Kind::Send,
        3,
        &Send {
            to: "bob".into(),
            client_msg_id: 1,
            text,
        },
    );
    conn.receive(&bytes, 0, &config(), &mut requests);
    assert!(requests.is_empty());
    let frames = take_frames(&mut conn);
    assert_eq!(error_code(&frames[0].2), ErrorCode::TooLarge as u16);
    assert!(!conn.is_closing());
}

#[test]
fn server_only_frame_from_client_is_a_violation() {
    let mut conn = established();
    let mut requests = Vec::new();
    let bytes = frame(Kind::Pong, 3, &Pong { nonce: 1 });
    conn.receive(&bytes, 0, &config(), &mut requests);
    let frames = take_frames(&mut conn);
    assert_eq!(
        error_code(&frames[0].2),
        ErrorCode::ProtocolViolation as u16
    );
    assert!(conn.is_closing());
}

#[test]
fn a_close_over_the_output_bound_keeps_the_output_and_adds_nothing() {
    let mut conn = established();
    let ping = frame(Kind::Ping, 7, &Ping { nonce: 1 });
    let mut requests = Vec::new();
    conn.receive(&ping, 0, &config(), &mut requests);
    let pending = conn.output().len();
    conn.close_without_frame();
    assert!(conn.is_closing());
    conn.receive(&ping, 0, &config(), &mut requests);
    conn.reply_error(8, ErrorCode::Busy, "busy");
    assert!(requests.is_empty());
    let frames = take_frames(&mut conn);
    assert_eq!(
        frames.len(),
        1,
        "the pong from before the close, nothing after"
    );
    assert_eq!((frames[0].0, frames[0].1), (Kind::Pong, 7));
    assert!(pending > 0);
}

#[test]
fn kick_sends_kicked_and_closes() {
    let mut conn = established();
    conn.kick("replaced");
    let frames = take_frames(&mut conn);
    assert_eq!(frames[0].0, Kind::Kicked);
    assert!(conn.is_closing());
    assert!(frames[0].2.len() < FRAME_HEADER_SIZE + 300);
}

#[test]
fn bad_team_and_file_fields_are_refused_without_closing() {
    use crate::protocol::{GroupOp, GroupSend, PresenceQuery, UploadChunk, UploadStart};
    let mut conn = established();
    let mut requests = Vec::new();
    let mut input = Vec::new();
    let op = |op: u8, name: &str, users: Vec<String>| GroupOp {
        op,
        group_id: 1,
        name: name.into(),
        users,
    };
    input.extend(frame(Kind::GroupOp, 10, &op(9, "x", vec![])));
    input.extend(frame(Kind::GroupOp, 11, &op(1, &"n".repeat(65), vec![])));
    input.extend(frame(Kind::GroupOp, 12, &op(2, "", vec![String::new()])));
    input.extend(frame(Kind::GroupOp, 13, &op(2, "", vec!["u".into(); 257])));
    let send = |client_msg_id, text: String| GroupSend {
        group_id: 1,
        client_msg_id,
        text,
    };
    input.extend(frame(Kind::GroupSend, 14, &send(0, "hi".into())));
    input.extend(frame(
        Kind::GroupSend,
        15,
        &send(1, "x".repeat(16 * 1024 + 1)),
    ));
    let start = |sha256: Vec<u8>, size| UploadStart {
        name: "f".into(),
        mime: "m".into(),
        size,
        sha256,
    };
    input.extend(frame(Kind::UploadStart, 16, &start(vec![0; 31], 10)));
    input.extend(frame(
        Kind::UploadStart,
        17,
        &start(vec![0; 32], (64 << 20) + 1),
    ));
    let chunk = UploadChunk {
        upload_id: 1,
        offset: 0,
        data: vec![0; 48 * 1024 + 1],
    };
    input.extend(frame(Kind::UploadChunk, 18, &chunk));
    let query = PresenceQuery {
        users: vec!["u".into(); 257],
    };
    input.extend(frame(Kind::PresenceQuery, 19, &query));
    // A valid one at the end: the connection is still reading.
    input.extend(frame(Kind::GroupSend, 20, &send(1, "fine".into())));
    conn.receive(&input, 1, &config(), &mut requests);
    let codes: Vec<(u32, u16)> = take_frames(&mut conn)
        .iter()
        .map(|(kind, id, payload)| {
            assert_eq!(*kind, Kind::Error);
            (*id, error_code(payload))
        })
        .collect();
    use ErrorCode::*;
    let expected = [
        (10, InvalidArgument),
        (11, TooLarge),
        (12, UnknownUser),
        (13, GroupFull),
        (14, InvalidArgument),
        (15, TooLarge),
        (16, InvalidArgument),
        (17, TooLarge),
        (18, TooLarge),
        (19, TooLarge),
    ];
    assert_eq!(codes, expected.map(|(id, code)| (id, code as u16)).to_vec());
    assert!(!conn.is_closing());
    assert_eq!(
        requests,
        vec![Request::GroupSend {
            request_id: 20,
            group_id: 1,
            client_msg_id: 1,
            text: "fine".into(),
        }]
    );
}
