//! The node's connection state machine (`session::Conn`) fed a hostile byte stream, before
//! and after login, driven the way the shard drives it.
//!
//! Input: one mode byte, then the stream. Mode bit 0: start from an established connection
//! (a valid hello and login already answered) instead of a fresh one; bits 1..=7 fix the
//! read size (1..=128 bytes). A login request is answered like the shard would: accepted
//! when its request id is even, refused otherwise. Checked, besides never panicking:
//! - everything the connection writes is a sequence of whole, valid node frames;
//! - a closing connection reads nothing more and writes nothing more;
//! - requests reach the shard only in the phase that allows them, with the bounds the
//!   shard relies on already checked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern::ids::UserId;
use tern::limits::*;
use tern::protocol::{self, *};
use tern::session::{Conn, Identity, Phase, Request, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let config = SessionConfig {
        heartbeat_interval_ms: 30_000,
        node_name: "fuzz".into(),
    };
    let mut now_ms = 1_000;
    let mut conn = Conn::new(now_ms);
    let mut requests = Vec::new();
    if mode & 1 == 1 {
        establish(&mut conn, &config, &mut requests);
    }
    let read_size = usize::from(mode >> 1) + 1;
    for chunk in stream.chunks(read_size) {
        now_ms += 1;
        let was_closing = conn.is_closing();
        let phase_before = conn.phase().clone();
        conn.receive(chunk, now_ms, &config, &mut requests);
        let written = std::mem::take(conn.output());
        if was_closing {
            assert!(written.is_empty(), "a closing connection wrote");
            assert!(requests.is_empty(), "a closing connection made requests");
        }
        check_output(&written);
        handle_requests(&mut conn, &config, &mut requests, now_ms, &phase_before);
        let written = std::mem::take(conn.output());
        check_output(&written);
    }
});

fn identity() -> Identity {
    Identity {
        user: UserId(1),
        name: "alice".into(),
        device: "phone".into(),
    }
}

fn login_ok() -> LoginOk {
    LoginOk {
        user_id: 1,
        token: "token".into(),
        token_expires_at_ms: 1,
        head_seq: 0,
        acked_seq: 0,
    }
}

fn establish(conn: &mut Conn, config: &SessionConfig, requests: &mut Vec<Request>) {
    let mut bytes = Vec::new();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "fuzz".into(),
    };
    protocol::encode(&mut bytes, Kind::Hello, 1, &hello);
    let login = Login {
        user: "alice".into(),
        device: "phone".into(),
        credential: Credential::Password("pw".into()),
    };
    protocol::encode(&mut bytes, Kind::Login, 2, &login);
    conn.receive(&bytes, 0, config, requests);
    assert!(matches!(requests.as_slice(), [Request::Login { .. }]));
    requests.clear();
    conn.login_ok(2, identity(), &login_ok(), 0, config, requests);
    assert!(conn.is_authenticated());
    conn.output().clear();
}

/// Answers the requests as a shard would, as far as the connection's side goes.
fn handle_requests(
    conn: &mut Conn,
    config: &SessionConfig,
    requests: &mut Vec<Request>,
    now_ms: u64,
    phase_before: &Phase,
) {
    // Replaying input held during a login can add requests: loop until none are left.
    let mut rounds = 0;
    while !requests.is_empty() {
        rounds += 1;
        assert!(rounds <= 2, "a login answer replayed input more than once");
        let batch: Vec<Request> = std::mem::take(requests);
        for request in batch {
            check_request(&request, phase_before, conn.identity().is_some());
            match request {
                Request::Login { request_id, .. } => {
                    assert_eq!(conn.phase(), &Phase::LoggingIn);
                    if request_id % 2 == 0 {
                        conn.login_ok(
                            request_id,
                            identity(),
                            &login_ok(),
                            now_ms,
                            config,
                            requests,
                        );
                    } else {
                        conn.login_failed(request_id, ErrorCode::AuthFailed, "refused");
                        assert!(conn.is_closing());
                    }
                }
                Request::Send { request_id, .. } => conn.reply_send_ack(
                    request_id,
                    &SendAck {
                        msg_id: 1,
                        seq: 1,
                        sent_at_ms: now_ms,
                        duplicate: false,
                    },
                ),
                Request::Sync { request_id, .. } => conn.reply_sync_page(
                    request_id,
                    &SyncPageRef {
                        entries: Vec::new(),
                        head_seq: 0,
                        has_more: false,
                    },
                ),
                Request::GroupSend { request_id, .. } => {
                    conn.reply_error(request_id, ErrorCode::NotMember, "not a member")
                }
                Request::DeviceAck { .. } | Request::Typing { .. } => {}
                other => {
                    if let Some(id) = request_id(&other) {
                        conn.reply_error(id, ErrorCode::Busy, "busy");
                    }
                }
            }
        }
    }
}

fn request_id(request: &Request) -> Option<u32> {
    Some(match request {
        Request::Login { request_id, .. }
        | Request::Send { request_id, .. }
        | Request::Sync { request_id, .. }
        | Request::GroupOp { request_id, .. }
        | Request::GroupQuery { request_id, .. }
        | Request::GroupList { request_id, .. }
        | Request::GroupSend { request_id, .. }
        | Request::History { request_id, .. }
        | Request::Conversations { request_id, .. }
        | Request::Read { request_id, .. }
        | Request::PresenceSubscribe { request_id, .. }
        | Request::PresenceQuery { request_id, .. }
        | Request::Typing { request_id, .. }
        | Request::UploadStart { request_id, .. }
        | Request::UploadChunk { request_id, .. }
        | Request::UploadFinish { request_id, .. }
        | Request::FileSend { request_id, .. }
        | Request::Download { request_id, .. }
        | Request::Logout { request_id, .. }
        | Request::ChangePassword { request_id, .. }
        | Request::Devices { request_id, .. } => *request_id,
        Request::DeviceAck { .. } => return None,
    })
}

/// The bounds the shard trusts the session to have checked.
fn check_request(request: &Request, phase_before: &Phase, logged_in: bool) {
    let name_ok = |name: &str| !name.is_empty() && name.len() <= USER_NAME_SIZE_MAX;
    match request {
        Request::Login {
            user,
            device,
            credential,
            ..
        } => {
            assert!(matches!(
                phase_before,
                Phase::AwaitHello | Phase::AwaitLogin
            ));
            assert!(name_ok(user));
            assert!(!device.is_empty() && device.len() <= DEVICE_NAME_SIZE_MAX);
            match credential {
                tern::session::Credential::Password(p) => assert!(p.len() <= PASSWORD_SIZE_MAX),
                tern::session::Credential::Token(t) => assert!(t.len() <= TOKEN_SIZE_MAX),
            }
            return;
        }
        Request::Send {
            to,
            client_msg_id,
            text,
            ..
        } => {
            assert!(name_ok(to));
            assert_ne!(*client_msg_id, 0);
            assert!(text.len() <= MESSAGE_TEXT_SIZE_MAX);
        }
        Request::GroupOp { name, users, .. } => {
            assert!(name.len() <= GROUP_NAME_SIZE_MAX);
            assert!(users.len() <= GROUP_MEMBERS_MAX);
            assert!(users.iter().all(|u| name_ok(u)));
        }
        Request::GroupSend {
            client_msg_id,
            text,
            ..
        } => {
            assert_ne!(*client_msg_id, 0);
            assert!(text.len() <= MESSAGE_TEXT_SIZE_MAX);
        }
        Request::PresenceSubscribe { users, .. } | Request::PresenceQuery { users, .. } => {
            assert!(users.len() <= PRESENCE_WATCH_MAX);
            assert!(users.iter().all(|u| name_ok(u)));
        }
        Request::UploadStart {
            name, mime, size, ..
        } => {
            assert!(!name.is_empty() && name.len() <= FILE_NAME_SIZE_MAX);
            assert!(mime.len() <= FILE_MIME_SIZE_MAX);
            assert!(*size <= FILE_SIZE_MAX);
        }
        Request::UploadChunk { data, .. } => assert!(data.len() <= FILE_CHUNK_SIZE_MAX),
        Request::FileSend {
            to,
            group_id,
            client_msg_id,
            text,
            ..
        } => {
            assert_ne!(*client_msg_id, 0);
            assert!(text.len() <= MESSAGE_TEXT_SIZE_MAX);
            assert_ne!(*group_id == 0, to.is_empty());
            assert!(to.len() <= USER_NAME_SIZE_MAX);
        }
        _ => {}
    }
    // Everything but a login needs an accepted login (input held during a login is
    // replayed only once it was accepted).
    assert!(logged_in, "{request:?} before the login was accepted");
}

/// Output holds whole frames only, each of a kind the node sends, each valid.
fn check_output(bytes: &[u8]) {
    let mut reader = FrameReader::new();
    reader
        .feed(bytes, |header, payload| {
            let valid = match header.kind {
                Kind::HelloOk => access::<ArchivedHelloOk>(header.kind, payload).is_ok(),
                Kind::LoginOk => access::<ArchivedLoginOk>(header.kind, payload).is_ok(),
                Kind::Pong => access::<ArchivedPong>(header.kind, payload).is_ok(),
                Kind::SendAck => access::<ArchivedSendAck>(header.kind, payload).is_ok(),
                Kind::SyncPage => access::<ArchivedSyncPage>(header.kind, payload).is_ok(),
                Kind::Kicked => access::<ArchivedKicked>(header.kind, payload).is_ok(),
                Kind::Error => access::<ArchivedErrorBody>(header.kind, payload).is_ok_and(|e| {
                    e.message.len() <= ERROR_MESSAGE_SIZE_MAX
                        && ErrorCode::from_u16(e.code.to_native()).is_some()
                }),
                other => panic!("the session wrote a {other:?} frame"),
            };
            assert!(
                valid,
                "the session wrote an invalid {:?} frame",
                header.kind
            );
            true
        })
        .expect("the session writes well-formed frames");
    assert_eq!(reader.buffered(), 0, "the session wrote a partial frame");
}
