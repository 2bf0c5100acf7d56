//! The client session (`client::ClientSession`) fed arbitrary bytes from a hostile node
//! after a normal handshake, with requests of every family in flight.
//!
//! Input: one mode byte, then the node's stream. Mode bits 0..=6 fix the read size
//! (1..=128 bytes); bit 7 makes the clock jump past the request timeout between reads, so
//! timeouts, reconnects and backoff run too. Reconnects are answered at once and the stream
//! goes on feeding the new connection. Checked, besides never panicking:
//! - the session writes only whole, valid client frames;
//! - messages reach the app exactly in timeline order (each seq one past the last), and
//!   `last_seq` follows them;
//! - a send is acknowledged or failed at most once, and only one the app queued;
//! - the outbox stays within `OUTBOX_MAX`.
#![no_main]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tern::client::{Action, ClientConfig, ClientSession, Event, MemoryStore, OUTBOX_MAX};
use tern::protocol::{self, *};

const HEARTBEAT_MS: u32 = 1_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let mut now = Instant::now();
    let mut session = ClientSession::new(config(), MemoryStore::default());
    let mut sent = Sent::default();
    handshake(&mut session, now);
    queue_requests(&mut session, &mut sent, now);
    drain(&mut session, &mut sent, now);

    let read_size = usize::from(mode & 0x7f) + 1;
    let jump = if mode & 0x80 != 0 {
        REQUEST_TIMEOUT + Duration::from_millis(1)
    } else {
        Duration::from_millis(10)
    };
    for chunk in stream.chunks(read_size) {
        session.received(chunk, now);
        drain(&mut session, &mut sent, now);
        now += jump;
        if session.next_timeout().is_some_and(|at| at <= now) {
            session.handle_timeout(now);
            drain(&mut session, &mut sent, now);
        }
    }
});

fn config() -> ClientConfig {
    let mut config = ClientConfig::new("alice", "phone")
        .with_password("secret")
        .with_seed(7);
    config.request_timeout = REQUEST_TIMEOUT;
    config.backoff_base = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(1);
    config.sync_page_limit = 50;
    config
}

/// What the app asked for and heard back, for the checks.
#[derive(Default)]
struct Sent {
    client_msg_ids: HashSet<u64>,
    settled: HashSet<u64>,
    delivered_seq: u64,
}

fn handshake(session: &mut ClientSession<MemoryStore>, now: Instant) {
    session.connect(now);
    assert_eq!(session.poll_action(), Some(Action::Connect));
    session.connected(now);
    let hello_id = first_request_id(session);
    let mut bytes = Vec::new();
    let ok = HelloOk {
        protocol_version: PROTOCOL_VERSION,
        heartbeat_interval_ms: HEARTBEAT_MS,
        frame_size_max: tern::limits::FRAME_SIZE_MAX as u32,
        node: "node".into(),
    };
    protocol::encode(&mut bytes, Kind::HelloOk, hello_id, &ok);
    session.received(&bytes, now);
    let login_id = first_request_id(session);
    bytes.clear();
    let ok = LoginOk {
        user_id: 1,
        token: "token".into(),
        token_expires_at_ms: u64::MAX,
        head_seq: 0,
        acked_seq: 0,
    };
    protocol::encode(&mut bytes, Kind::LoginOk, login_id, &ok);
    session.received(&bytes, now);
    assert!(session.is_established());
}

fn first_request_id(session: &mut ClientSession<MemoryStore>) -> u32 {
    let mut bytes = Vec::new();
    session.take_transmit(&mut bytes);
    let mut id = None;
    FrameReader::new()
        .feed(&bytes, |header, _| {
            id.get_or_insert(header.request_id);
            true
        })
        .expect("the session writes well-formed frames");
    id.expect("the session wrote a request")
}

/// One request of each family in flight, so the node's answers have something to answer.
fn queue_requests(session: &mut ClientSession<MemoryStore>, sent: &mut Sent, now: Instant) {
    for (to, text) in [("bob", "hello bob"), ("carol", "hi")] {
        let id = session.send(to, text, now).expect("the outbox has room");
        sent.client_msg_ids.insert(id);
    }
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
}

fn drain(session: &mut ClientSession<MemoryStore>, sent: &mut Sent, now: Instant) {
    check_transmit(session);
    while let Some(action) = session.poll_action() {
        if action == Action::Connect {
            session.connected(now);
            check_transmit(session);
        }
    }
    while let Some(event) = session.poll_event() {
        match event {
            Event::Message(message) => {
                assert_eq!(
                    message.seq,
                    sent.delivered_seq + 1,
                    "a message out of order"
                );
                sent.delivered_seq = message.seq;
            }
            Event::SendAcked { client_msg_id, .. } | Event::SendFailed { client_msg_id, .. } => {
                assert!(
                    sent.client_msg_ids.contains(&client_msg_id),
                    "an ack of a send the app never queued"
                );
                assert!(sent.settled.insert(client_msg_id), "a send settled twice");
            }
            _ => {}
        }
    }
    assert_eq!(session.last_seq(), sent.delivered_seq);
    assert!(session.outbox_len() <= OUTBOX_MAX);
}

/// The session's output holds whole frames of client kinds, each valid.
fn check_transmit(session: &mut ClientSession<MemoryStore>) {
    let mut bytes = Vec::new();
    session.take_transmit(&mut bytes);
    let mut reader = FrameReader::new();
    reader
        .feed(&bytes, |header, payload| {
            let kind = header.kind;
            let valid = match kind {
                Kind::Hello => access::<ArchivedHello>(kind, payload).is_ok(),
                Kind::Login => access::<ArchivedLogin>(kind, payload).is_ok(),
                Kind::Ping => access::<ArchivedPing>(kind, payload).is_ok(),
                Kind::Send => access::<ArchivedSend>(kind, payload).is_ok(),
                Kind::Sync => access::<ArchivedSync>(kind, payload).is_ok(),
                Kind::DeviceAck => access::<ArchivedDeviceAck>(kind, payload).is_ok(),
                Kind::GroupOp => access::<ArchivedGroupOp>(kind, payload).is_ok(),
                Kind::GroupSend => access::<ArchivedGroupSend>(kind, payload).is_ok(),
                Kind::History => access::<ArchivedHistory>(kind, payload).is_ok(),
                Kind::Conversations => access::<ArchivedConversations>(kind, payload).is_ok(),
                Kind::Read => access::<ArchivedRead>(kind, payload).is_ok(),
                Kind::PresenceSubscribe => {
                    access::<ArchivedPresenceSubscribe>(kind, payload).is_ok()
                }
                Kind::UploadStart => access::<ArchivedUploadStart>(kind, payload).is_ok(),
                Kind::Download => access::<ArchivedDownload>(kind, payload).is_ok(),
                Kind::Typing => access::<ArchivedTyping>(kind, payload).is_ok(),
                other => panic!("the client wrote a {other:?} frame"),
            };
            assert!(valid, "the client wrote an invalid {kind:?} frame");
            true
        })
        .expect("the session writes well-formed frames");
    assert_eq!(reader.buffered(), 0, "the session wrote a partial frame");
}
