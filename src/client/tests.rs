//! Deterministic tests of the sans-IO client session: a hand-driven fake node builds its
//! frames with `protocol::encode`, and the test controls `now`. No sockets, no sleeps.

use std::time::{Duration, Instant};

use rkyv::rancor::Failure;

use super::*;
use crate::limits::FRAME_HEADER_SIZE;
use crate::protocol::{
    self, ArchivedDeviceAck, ArchivedHello, ArchivedLogin, ArchivedPing, ArchivedSend,
    ArchivedSync, Credential, DeviceAck, Entry, ErrorBody, ErrorCode, FrameReader, Hello, HelloOk,
    Kicked, Kind, Login, LoginOk, Message, PROTOCOL_VERSION, Ping, Pong, Push, SendAck, SyncPage,
};

const HEARTBEAT_MS: u32 = 1_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A frame the session wrote, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Hello(Hello),
    Login(Login),
    Ping(Ping),
    Send(protocol::Send),
    Sync(protocol::Sync),
    DeviceAck(DeviceAck),
}

fn config() -> ClientConfig {
    let mut config = ClientConfig::new("alice", "phone")
        .with_password("secret")
        .with_seed(42);
    config.request_timeout = REQUEST_TIMEOUT;
    config.connect_timeout = CONNECT_TIMEOUT;
    config.backoff_base = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(10);
    config.busy_retry = Duration::from_millis(200);
    config.sync_page_limit = 50;
    config
}

/// The session plus the fake node's clock.
struct Harness {
    session: ClientSession<MemoryStore>,
    now: Instant,
}

impl Harness {
    fn new(config: ClientConfig, store: MemoryStore) -> Harness {
        Harness {
            session: ClientSession::new(config, store),
            now: Instant::now(),
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.session.received(bytes, self.now);
    }

    /// Every frame the session queued since the last call, with its request id.
    fn sent(&mut self) -> Vec<(u32, Out)> {
        let mut bytes = Vec::new();
        self.session.take_transmit(&mut bytes);
        let mut frames = Vec::new();
        let mut reader = FrameReader::new();
        let fed = reader.feed(&bytes, |header, payload| {
            frames.push((header.request_id, decode_out(header.kind, payload)));
            true
        });
        assert!(fed.is_ok(), "the session wrote a malformed frame");
        assert_eq!(reader.buffered(), 0, "the session wrote a partial frame");
        frames
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.session.poll_action()).collect()
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }

    /// Connect, hello and login with the fake node's answers; returns the request id and
    /// `after_seq` of the sync the session sent after login. Events are drained.
    fn establish(&mut self, head_seq: u64) -> (u32, u64) {
        self.session.connect(self.now);
        assert_eq!(self.actions(), vec![Action::Connect]);
        self.session.connected(self.now);
        let hello = self.sent();
        let (hello_id, _) = hello[0];
        self.feed(&hello_ok(hello_id, HEARTBEAT_MS));
        let login = self.sent();
        let (login_id, _) = login[0];
        self.feed(&login_ok(login_id, head_seq, 0));
        let sent = self.sent();
        let (sync_id, Out::Sync(sync)) = &sent[0] else {
            panic!("expected a sync first after login, got {sent:?}");
        };
        assert!(self.session.is_established());
        self.events();
        (*sync_id, sync.after_seq)
    }

    /// `establish`, then answer the initial sync with an empty page.
    fn establish_synced(&mut self) {
        let (sync_id, _) = self.establish(self.session.last_seq());
        self.feed(&sync_page(sync_id, &[], self.session.last_seq(), false));
        self.events();
        self.sent();
    }

    fn delivered_seqs(events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.seq),
                _ => None,
            })
            .collect()
    }
}

fn decode_out(kind: Kind, payload: &[u8]) -> Out {
    match kind {
        Kind::Hello => {
            let archived = protocol::access::<ArchivedHello>(kind, payload).unwrap();
            Out::Hello(rkyv::deserialize::<Hello, Failure>(archived).unwrap())
        }
        Kind::Login => {
            let archived = protocol::access::<ArchivedLogin>(kind, payload).unwrap();
            Out::Login(rkyv::deserialize::<Login, Failure>(archived).unwrap())
        }
        Kind::Ping => {
            let archived = protocol::access::<ArchivedPing>(kind, payload).unwrap();
            Out::Ping(rkyv::deserialize::<Ping, Failure>(archived).unwrap())
        }
        Kind::Send => {
            let archived = protocol::access::<ArchivedSend>(kind, payload).unwrap();
            Out::Send(rkyv::deserialize::<protocol::Send, Failure>(archived).unwrap())
        }
        Kind::Sync => {
            let archived = protocol::access::<ArchivedSync>(kind, payload).unwrap();
            Out::Sync(rkyv::deserialize::<protocol::Sync, Failure>(archived).unwrap())
        }
        Kind::DeviceAck => {
            let archived = protocol::access::<ArchivedDeviceAck>(kind, payload).unwrap();
            Out::DeviceAck(rkyv::deserialize::<DeviceAck, Failure>(archived).unwrap())
        }
        other => panic!("the client sent a node-only kind {other:?}"),
    }
}

// ----- the fake node's frames ------------------------------------------------------------

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
    protocol::encode(&mut out, kind, request_id, value);
    out
}

fn hello_ok(request_id: u32, heartbeat_interval_ms: u32) -> Vec<u8> {
    let ok = HelloOk {
        protocol_version: PROTOCOL_VERSION,
        heartbeat_interval_ms,
        frame_size_max: 65_536,
        node: "fake".into(),
    };
    frame(Kind::HelloOk, request_id, &ok)
}

fn login_ok(request_id: u32, head_seq: u64, acked_seq: u64) -> Vec<u8> {
    let ok = LoginOk {
        user_id: 7,
        token: "v1.7.99.token".into(),
        token_expires_at_ms: 99,
        head_seq,
        acked_seq,
    };
    frame(Kind::LoginOk, request_id, &ok)
}

/// The archived `Message` stored at `seq` of alice's timeline.
fn message_bytes(seq: u64) -> Vec<u8> {
    let message = Message {
        msg_id: 1000 + seq,
        from_id: 8,
        from: "bob".into(),
        to_id: 7,
        to: "alice".into(),
        client_msg_id: 500 + seq,
        sent_at_ms: 1_764_547_100_000 + seq,
        text: format!("message number {seq}"),
    };
    rkyv::api::high::to_bytes_in::<_, Failure>(&message, Vec::new()).unwrap()
}

fn entries(seqs: &[u64]) -> Vec<Entry> {
    seqs.iter()
        .map(|&seq| Entry {
            seq,
            message: message_bytes(seq),
        })
        .collect()
}

fn sync_page(request_id: u32, seqs: &[u64], head_seq: u64, has_more: bool) -> Vec<u8> {
    let page = SyncPage {
        entries: entries(seqs),
        head_seq,
        has_more,
    };
    frame(Kind::SyncPage, request_id, &page)
}

fn push(seqs: &[u64]) -> Vec<u8> {
    frame(
        Kind::Push,
        0,
        &Push {
            entries: entries(seqs),
        },
    )
}

fn send_ack(request_id: u32, msg_id: u64, seq: u64, duplicate: bool) -> Vec<u8> {
    let ack = SendAck {
        msg_id,
        seq,
        sent_at_ms: 5,
        duplicate,
    };
    frame(Kind::SendAck, request_id, &ack)
}

fn error(request_id: u32, code: ErrorCode) -> Vec<u8> {
    let body = ErrorBody {
        code: code as u16,
        message: code.name().into(),
    };
    frame(Kind::Error, request_id, &body)
}

fn kicked() -> Vec<u8> {
    let body = Kicked {
        code: ErrorCode::ReplacedByNewLogin as u16,
        message: "another login".into(),
    };
    frame(Kind::Kicked, 0, &body)
}

// ----- handshake and login -----------------------------------------------------------------

#[test]
fn handshake_is_hello_then_login_then_sync() {
    let mut h = Harness::new(config(), MemoryStore::new());
    assert!(h.sent().is_empty());
    assert_eq!(
        h.session.next_timeout(),
        None,
        "an idle session schedules nothing"
    );

    h.session.connect(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
    assert!(
        h.sent().is_empty(),
        "nothing is written before the transport is up"
    );

    h.session.connected(h.now);
    assert_eq!(h.events(), vec![Event::Connected]);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    let (hello_id, Out::Hello(hello)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_ne!(*hello_id, 0, "requests carry nonzero ids");
    assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
    assert!(hello.client.starts_with("tern-client/"));

    h.feed(&hello_ok(*hello_id, HEARTBEAT_MS));
    let sent = h.sent();
    assert_eq!(
        sent.len(),
        1,
        "login only, no sync before LoginOk: {sent:?}"
    );
    let (login_id, Out::Login(login)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_ne!(login_id, hello_id);
    assert_eq!(login.user, "alice");
    assert_eq!(login.device, "phone");
    assert_eq!(login.credential, Credential::Password("secret".into()));
    assert!(!h.session.is_established());

    h.feed(&login_ok(*login_id, 0, 0));
    assert_eq!(
        h.events(),
        vec![Event::AuthOk {
            user_id: 7,
            head_seq: 0
        }]
    );
    assert!(h.session.is_established());
    assert_eq!(h.session.token(), Some("v1.7.99.token"));
    assert_eq!(h.session.user_id(), Some(7));
    let sent = h.sent();
    let [(sync_id, Out::Sync(sync))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(
        *sync,
        protocol::Sync {
            after_seq: 0,
            limit: 50
        }
    );

    h.feed(&sync_page(*sync_id, &[], 0, false));
    assert_eq!(h.events(), vec![Event::SyncDone { head_seq: 0 }]);
    assert!(h.sent().is_empty(), "nothing to ack or resend");
}

#[test]
fn reconnect_logs_in_with_the_token_from_login_ok() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.session.closed(h.now);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Disconnected { .. }]
    ));
    let at = h.session.next_timeout().expect("a reconnect is scheduled");
    assert!(
        at < h.now + Duration::from_millis(100),
        "first reconnect within backoff_base"
    );
    h.now = at;
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let sent = h.sent();
    let (_, Out::Login(login)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(login.credential, Credential::Token("v1.7.99.token".into()));
}

#[test]
fn refused_token_is_retried_once_with_the_password() {
    let mut h = Harness::new(config().with_token("stale"), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let sent = h.sent();
    let (login_id, Out::Login(login)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(login.credential, Credential::Token("stale".into()));

    h.feed(&error(*login_id, ErrorCode::AuthFailed));
    // No failure counted, no backoff, no AuthFailed for the app: straight back.
    assert_eq!(h.actions(), vec![Action::Disconnect, Action::Connect]);
    assert_eq!(h.events(), vec![Event::Connected]);
    assert_eq!(h.session.token(), None);

    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let sent = h.sent();
    let (login_id, Out::Login(login)) = &sent[0] else {
        panic!("{sent:?}")
    };
    assert_eq!(login.credential, Credential::Password("secret".into()));

    // The password is refused too: that is final.
    h.feed(&error(*login_id, ErrorCode::AuthFailed));
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    let events = h.events();
    assert!(
        matches!(events[1], Event::AuthFailed { code: 4, .. }),
        "{events:?}"
    );
    assert_eq!(events[2], Event::Offline);
    assert!(h.session.is_stopped());
    assert_eq!(h.session.next_timeout(), None);
}

/// A throttled password login is final for the session (like a wrong password), so the
/// app shows the node's message instead of the session hammering a waiting account.
#[test]
fn throttled_password_login_is_reported_not_retried() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let sent = h.sent();
    let (login_id, Out::Login(_)) = &sent[0] else {
        panic!("{sent:?}")
    };
    h.feed(&error(*login_id, ErrorCode::Throttled));
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    let events = h.events();
    assert!(
        matches!(events[1], Event::AuthFailed { code: 22, .. }),
        "{events:?}"
    );
    assert!(h.session.is_stopped());
}

#[test]
fn login_without_credentials_fails_locally() {
    let mut config = config();
    config.password = None;
    let mut h = Harness::new(config, MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    assert!(h.sent().is_empty(), "no login frame without a credential");
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    let events = h.events();
    assert!(matches!(
        events.as_slice(),
        [Event::Connected, Event::AuthFailed { .. }, Event::Offline]
    ));
}

// ----- sync and the timeline --------------------------------------------------------------

#[test]
fn login_syncs_from_last_seq_and_pages_while_has_more() {
    let mut h = Harness::new(config(), MemoryStore::starting_at(5));
    let (sync_id, after_seq) = h.establish(9);
    assert_eq!(after_seq, 5, "sync starts after the stored last seq");

    h.feed(&sync_page(sync_id, &[6, 7], 9, true));
    let sent = h.sent();
    let [(next_id, Out::Sync(next)), (0, Out::DeviceAck(ack))] = sent.as_slice() else {
        panic!("{sent:?}");
    };
    assert_eq!(
        next.after_seq, 7,
        "the next page starts after the last stored entry"
    );
    assert_eq!(ack.up_to_seq, 7);
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![6, 7]);
    assert!(
        !events.iter().any(|e| matches!(e, Event::SyncDone { .. })),
        "the run goes on"
    );

    h.feed(&sync_page(*next_id, &[8, 9], 9, false));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![8, 9]);
    assert_eq!(events.last(), Some(&Event::SyncDone { head_seq: 9 }));
    assert_eq!(
        h.sent(),
        vec![(0, Out::DeviceAck(DeviceAck { up_to_seq: 9 }))]
    );
    assert_eq!(h.session.last_seq(), 9);
    assert_eq!(h.session.store().last_seq(), 9);

    let first = &h.session.store().entries()[0];
    assert_eq!(first.seq, 6);
    assert_eq!(first.msg_id, 1006);
    assert_eq!(first.from, "bob");
    assert_eq!(first.to, "alice");
    assert_eq!(first.client_msg_id, 506);
    assert_eq!(first.text, "message number 6");
}

#[test]
fn dropped_push_is_refetched_and_delivered_in_order() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();

    h.feed(&push(&[1]));
    assert_eq!(Harness::delivered_seqs(&h.events()), vec![1]);
    assert_eq!(
        h.sent(),
        vec![(0, Out::DeviceAck(DeviceAck { up_to_seq: 1 }))]
    );

    // The push of seq 2 was lost; 3 arrives.
    h.feed(&push(&[3]));
    assert!(h.events().is_empty(), "3 must not be delivered before 2");
    let sent = h.sent();
    let [(sync_id, Out::Sync(sync))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(sync.after_seq, 1);
    assert_eq!(h.session.last_seq(), 1);

    h.feed(&sync_page(*sync_id, &[2, 3], 3, false));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![2, 3]);
    assert_eq!(events.last(), Some(&Event::SyncDone { head_seq: 3 }));
    assert_eq!(
        h.sent(),
        vec![(0, Out::DeviceAck(DeviceAck { up_to_seq: 3 }))]
    );
    let stored: Vec<u64> = h.session.store().entries().iter().map(|m| m.seq).collect();
    assert_eq!(stored, vec![1, 2, 3]);
}

#[test]
fn gap_seen_while_a_sync_is_in_flight_is_synced_after_it() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&push(&[2]));
    let sent = h.sent();
    let [(sync_id, Out::Sync(sync))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(sync.after_seq, 0);

    // Another gap while the sync is in flight: no second sync at once.
    h.feed(&push(&[5]));
    assert!(h.sent().is_empty(), "one sync in flight at a time");

    // The page was read before 4 and 5 were committed.
    h.feed(&sync_page(*sync_id, &[1, 2, 3], 3, false));
    let sent = h.sent();
    let [(resync_id, Out::Sync(resync)), (0, Out::DeviceAck(_))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(resync.after_seq, 3);
    let events = h.events();
    assert!(!events.iter().any(|e| matches!(e, Event::SyncDone { .. })));

    h.feed(&sync_page(*resync_id, &[4, 5], 5, false));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![4, 5]);
    assert_eq!(events.last(), Some(&Event::SyncDone { head_seq: 5 }));
}

#[test]
fn duplicate_entries_are_ignored() {
    let mut h = Harness::new(config(), MemoryStore::new());
    let (sync_id, _) = h.establish(2);
    // Pushes and the login sync overlap.
    h.feed(&push(&[1, 2]));
    h.feed(&sync_page(sync_id, &[1, 2], 2, false));
    h.feed(&push(&[2]));
    h.feed(&push(&[1]));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![1, 2]);
    assert_eq!(h.session.store().entries_stored(), 2);
    assert_eq!(h.session.last_seq(), 2);
}

#[test]
fn device_ack_is_coalesced_per_input_and_sent_after_storing() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let mut bytes = push(&[1, 2]);
    bytes.extend(push(&[3]));
    h.feed(&bytes);
    assert_eq!(h.session.store().last_seq(), 3, "stored before the ack");
    assert_eq!(
        h.sent(),
        vec![(0, Out::DeviceAck(DeviceAck { up_to_seq: 3 }))]
    );
    // Nothing new: no ack.
    h.feed(&push(&[3]));
    assert!(h.sent().is_empty());
}

#[test]
fn entries_pushed_before_login_ok_are_acked_after_it() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    // The node registered the connection for pushes before answering the login.
    h.feed(&push(&[1]));
    assert!(h.sent().is_empty(), "no device ack before login");
    h.feed(&login_ok(login_id, 1, 0));
    let sent = h.sent();
    assert!(matches!(
        sent.as_slice(),
        [
            (_, Out::Sync(_)),
            (0, Out::DeviceAck(DeviceAck { up_to_seq: 1 }))
        ]
    ));
}

#[test]
fn fetch_timeline_reads_without_touching_last_seq() {
    let mut h = Harness::new(config(), MemoryStore::starting_at(3));
    let (sync_id, _) = h.establish(3);
    h.feed(&sync_page(sync_id, &[], 3, false));
    h.events();
    h.sent();
    let request_id = h.session.fetch_timeline(0, h.now).unwrap();
    assert_eq!(
        h.session.fetch_timeline(0, h.now),
        None,
        "one fetch at a time"
    );
    let sent = h.sent();
    assert_eq!(
        sent,
        vec![(
            request_id,
            Out::Sync(protocol::Sync {
                after_seq: 0,
                limit: 50
            })
        )]
    );
    h.feed(&sync_page(request_id, &[1, 2], 3, true));
    let events = h.events();
    let [
        Event::TimelinePage {
            request_id: id,
            after_seq: 0,
            entries,
            head_seq: 3,
            has_more: true,
        },
    ] = events.as_slice()
    else {
        panic!("{events:?}")
    };
    assert_eq!(*id, request_id);
    assert_eq!(
        entries.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(h.session.last_seq(), 3);
    assert!(h.sent().is_empty(), "a fetch is not acknowledged");
}

// ----- sends and the outbox ---------------------------------------------------------------

#[test]
fn send_is_acked_and_leaves_the_outbox() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let id = h.session.send("bob", "hello", h.now).unwrap();
    assert_ne!(id, 0);
    assert_eq!(h.session.outbox_len(), 1);
    assert_eq!(
        h.session.store().outbox_list().len(),
        1,
        "persisted before it goes out"
    );
    let sent = h.sent();
    let [(request_id, Out::Send(send))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(
        *send,
        protocol::Send {
            to: "bob".into(),
            client_msg_id: id,
            text: "hello".into()
        }
    );
    h.feed(&send_ack(*request_id, 77, 1, false));
    assert_eq!(
        h.events(),
        vec![Event::SendAcked {
            client_msg_id: id,
            msg_id: 77,
            seq: 1,
            duplicate: false
        }]
    );
    assert_eq!(h.session.outbox_len(), 0);
    assert!(h.session.store().outbox_list().is_empty());
}

#[test]
fn unacked_sends_are_resent_with_the_same_id_after_reconnect() {
    let mut h = Harness::new(config(), MemoryStore::new());
    // Queued while offline: goes out after the first login.
    let first = h.session.send("bob", "one", h.now).unwrap();
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    let sent = h.sent();
    assert!(
        matches!(&sent[0], (_, Out::Sync(_))),
        "sync goes before resends: {sent:?}"
    );
    let (_, Out::Send(send)) = &sent[1] else {
        panic!("{sent:?}")
    };
    assert_eq!(send.client_msg_id, first);
    let second = h.session.send("bob", "two", h.now).unwrap();
    assert_ne!(first, second);
    let sent_ids: Vec<u32> = h.sent().iter().map(|(id, _)| *id).collect();
    assert_eq!(sent_ids.len(), 1);

    // The connection drops before either is acknowledged.
    h.session.closed(h.now);
    assert_eq!(h.session.outbox_len(), 2);
    let at = h.session.next_timeout().unwrap();
    h.now = at;
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    let sent = h.sent();
    let resent: Vec<(u32, u64, String)> = sent
        .iter()
        .filter_map(|(rid, out)| match out {
            Out::Send(s) => Some((*rid, s.client_msg_id, s.text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        resent
            .iter()
            .map(|(_, id, text)| (*id, text.as_str()))
            .collect::<Vec<_>>(),
        vec![(first, "one"), (second, "two")],
        "resent in order with the same client message ids"
    );
    // The node answers a resend of a stored message with the original ack.
    h.feed(&send_ack(resent[0].0, 70, 1, true));
    h.feed(&send_ack(resent[1].0, 71, 2, false));
    let events = h.events();
    assert!(events.contains(&Event::SendAcked {
        client_msg_id: first,
        msg_id: 70,
        seq: 1,
        duplicate: true
    }));
    assert!(events.contains(&Event::SendAcked {
        client_msg_id: second,
        msg_id: 71,
        seq: 2,
        duplicate: false
    }));
    assert_eq!(h.session.outbox_len(), 0);
}

#[test]
fn persisted_outbox_is_resent_after_a_restart() {
    // What an app that crashed with an unacknowledged send finds in its store.
    let mut store = MemoryStore::new();
    let item = OutboxItem {
        client_msg_id: 0xABCD_0000_0001,
        to: "bob".into(),
        text: "left over".into(),
    };
    store.outbox_put(&item);
    let mut h = Harness::new(config(), store);
    assert_eq!(h.session.outbox_len(), 1);
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    let sent = h.sent();
    let (_, Out::Send(send)) = &sent[1] else {
        panic!("{sent:?}")
    };
    assert_eq!(send.client_msg_id, 0xABCD_0000_0001);
    assert_eq!(send.text, "left over");
}

#[test]
fn busy_send_is_retried_with_the_same_id_after_a_pause() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let id = h.session.send("bob", "hi", h.now).unwrap();
    let (request_id, _) = h.sent()[0];
    assert_eq!(h.session.busy_answers(), 0);
    h.feed(&error(request_id, ErrorCode::Busy));
    assert!(h.events().is_empty(), "busy is not a failure");
    assert_eq!(h.session.busy_answers(), 1, "counted for load generators");
    assert!(h.sent().is_empty(), "no resend during the pause");
    assert_eq!(h.session.outbox_len(), 1);
    // The pause is the earliest timer.
    assert_eq!(
        h.session.next_timeout(),
        Some(h.now + Duration::from_millis(200))
    );
    h.advance(Duration::from_millis(200));
    h.session.handle_timeout(h.now);
    let sent = h.sent();
    let [(retry_id, Out::Send(send))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(send.client_msg_id, id);
    assert_ne!(*retry_id, request_id);
}

#[test]
fn final_send_errors_are_reported_and_leave_the_outbox() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    for code in [
        ErrorCode::UnknownUser,
        ErrorCode::StorageFull,
        ErrorCode::StorageFailed,
    ] {
        let id = h.session.send("nobody", "hi", h.now).unwrap();
        let (request_id, _) = h.sent()[0];
        h.feed(&error(request_id, code));
        assert_eq!(
            h.events(),
            vec![Event::SendFailed {
                client_msg_id: id,
                code: code as u16,
                message: code.name().into()
            }]
        );
        assert_eq!(h.session.outbox_len(), 0);
        assert!(h.session.is_established(), "{code:?} keeps the connection");
    }
}

#[test]
fn send_is_checked_before_it_enters_the_outbox() {
    let mut h = Harness::new(config(), MemoryStore::new());
    let big = "x".repeat(crate::limits::MESSAGE_TEXT_SIZE_MAX + 1);
    assert_eq!(
        h.session.send("bob", &big, h.now),
        Err(SendError::TooLarge { len: big.len() })
    );
    assert_eq!(
        h.session.send("", "hi", h.now),
        Err(SendError::InvalidRecipient)
    );
    for _ in 0..OUTBOX_MAX {
        h.session.send("bob", "hi", h.now).unwrap();
    }
    assert_eq!(
        h.session.send("bob", "hi", h.now),
        Err(SendError::OutboxFull)
    );
}

#[test]
fn sends_in_flight_are_bounded() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    for _ in 0..SENDS_IN_FLIGHT_MAX + 10 {
        h.session.send("bob", "hi", h.now).unwrap();
    }
    let sent = h.sent();
    assert_eq!(sent.len(), SENDS_IN_FLIGHT_MAX);
    let (first_request, _) = sent[0];
    h.feed(&send_ack(first_request, 1, 1, false));
    assert_eq!(h.sent().len(), 1, "one ack makes room for one more");
}

#[test]
fn client_msg_ids_are_unique_nonzero_and_differ_across_seeds() {
    let mut a = Harness::new(config().with_seed(1), MemoryStore::new());
    let mut b = Harness::new(config().with_seed(2), MemoryStore::new());
    let mut ids = std::collections::HashSet::new();
    for _ in 0..100 {
        let ia = a.session.send("bob", "x", a.now).unwrap();
        a.session.store_mut().outbox_remove(ia);
        let ib = b.session.send("bob", "x", b.now).unwrap();
        assert!(ia != 0 && ib != 0);
        assert!(ids.insert(ia) && ids.insert(ib), "ids collide");
    }
}

// ----- timeouts, heartbeats, reconnects ---------------------------------------------------

#[test]
fn request_timeout_drops_the_connection_and_reconnects() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.session.send("bob", "hi", h.now).unwrap();
    h.sent();
    h.advance(REQUEST_TIMEOUT - Duration::from_millis(1));
    h.session.handle_timeout(h.now);
    assert!(h.actions().is_empty(), "not yet");
    // Keep the heartbeat answered so only the send can time out.
    for (id, out) in h.sent() {
        if let Out::Ping(ping) = out {
            h.feed(&frame(Kind::Pong, id, &Pong { nonce: ping.nonce }));
        }
    }
    h.events();
    h.advance(Duration::from_millis(1));
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    assert_eq!(
        h.events(),
        vec![Event::Disconnected {
            reason: "request timed out"
        }]
    );
    assert!(!h.session.is_established());
    assert_eq!(
        h.session.outbox_len(),
        1,
        "the send waits for the next connection"
    );
    let at = h.session.next_timeout().expect("reconnect scheduled");
    h.now = at;
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
}

#[test]
fn handshake_timeout_counts_as_a_failed_attempt() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    h.sent();
    assert_eq!(h.session.next_timeout(), Some(h.now + REQUEST_TIMEOUT));
    h.advance(REQUEST_TIMEOUT);
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    let events = h.events();
    assert_eq!(
        events[1],
        Event::ConnectFailed {
            attempt: 1,
            will_retry: true
        }
    );
}

/// A connect the driver never completes (its SYNs go into a network that drops every
/// packet) ends at the connect timeout as a failed attempt and is retried after backoff,
/// rather than waiting out the kernel's own retries, which grow to minutes apart: a device
/// notices a network back from an outage within one backoff.
#[test]
fn a_connect_that_never_completes_times_out_and_is_retried_after_backoff() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
    let deadline = h
        .session
        .next_timeout()
        .expect("the connect has a deadline");
    assert_eq!(deadline, h.now + CONNECT_TIMEOUT);
    h.session
        .handle_timeout(deadline - Duration::from_millis(1));
    assert!(h.actions().is_empty(), "not before the deadline");
    h.now = deadline;
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    assert_eq!(
        h.events(),
        vec![Event::ConnectFailed {
            attempt: 1,
            will_retry: true
        }]
    );
    let at = h.session.next_timeout().expect("a retry is scheduled");
    assert!(
        at > h.now && at <= h.now + Duration::from_millis(100),
        "first backoff"
    );
    // The abandoned connect completing late changes nothing.
    h.session.connected(h.now);
    assert!(h.sent().is_empty());
    assert!(h.events().is_empty());
    h.now = at;
    h.session.handle_timeout(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
    h.session.connected(h.now);
    assert!(matches!(h.sent().as_slice(), [(_, Out::Hello(_))]));
}

#[test]
fn backoff_grows_with_jitter_and_gives_up_after_six_failures() {
    let mut delays = Vec::new();
    for seed in [1u64, 2] {
        let mut h = Harness::new(config().with_seed(seed), MemoryStore::new());
        h.session.connect(h.now);
        let mut seen = Vec::new();
        for attempt in 1..=6u32 {
            assert_eq!(h.actions(), vec![Action::Connect], "attempt {attempt}");
            h.session.connect_failed(h.now);
            let will_retry = attempt < 6;
            assert_eq!(h.events(), {
                let mut expected = vec![Event::ConnectFailed {
                    attempt,
                    will_retry,
                }];
                if !will_retry {
                    expected.push(Event::Offline);
                }
                expected
            });
            if !will_retry {
                break;
            }
            let at = h.session.next_timeout().expect("a retry is scheduled");
            let delay = at - h.now;
            let ceiling = Duration::from_millis(100) * (1 << (attempt - 1));
            assert!(
                delay >= ceiling / 2 && delay <= ceiling,
                "attempt {attempt}: {delay:?}"
            );
            seen.push(delay);
            // Early wake-ups do nothing.
            h.session.handle_timeout(at - Duration::from_millis(1));
            assert!(h.actions().is_empty());
            h.now = at;
            h.session.handle_timeout(h.now);
        }
        assert!(
            seen.windows(2).all(|w| w[0] <= w[1]),
            "backoff grows: {seen:?}"
        );
        assert!(h.actions().is_empty(), "no attempt after giving up");
        assert_eq!(h.session.next_timeout(), None);
        assert!(h.session.is_stopped());
        delays.push(seen);
    }
    assert_ne!(delays[0], delays[1], "jitter differs between seeds");

    // A successful login resets the count.
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connect_failed(h.now);
    h.events();
    h.now = h.session.next_timeout().unwrap();
    h.session.handle_timeout(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    h.session.closed(h.now);
    h.events();
    h.now = h.session.next_timeout().unwrap();
    h.session.handle_timeout(h.now);
    h.actions();
    h.session.connect_failed(h.now);
    assert_eq!(
        h.events(),
        vec![Event::ConnectFailed {
            attempt: 1,
            will_retry: true
        }]
    );
}

#[test]
fn kicked_goes_offline_without_reconnecting() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&kicked());
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    assert_eq!(
        h.events(),
        vec![
            Event::Kicked {
                code: ErrorCode::ReplacedByNewLogin as u16,
                message: "another login".into()
            },
            Event::Offline,
        ]
    );
    assert_eq!(h.session.next_timeout(), None);
    h.advance(Duration::from_secs(3600));
    h.session.handle_timeout(h.now);
    h.session.closed(h.now);
    assert!(
        h.actions().is_empty(),
        "a kicked device does not come back by itself"
    );
    assert!(h.events().is_empty());
    // The app may bring it back explicitly.
    h.session.connect(h.now);
    assert_eq!(h.actions(), vec![Action::Connect]);
}

#[test]
fn connection_level_error_reconnects() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&error(0, ErrorCode::ShuttingDown));
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    let events = h.events();
    assert!(matches!(events[0], Event::NodeError { code: 14, .. }));
    assert!(matches!(events[1], Event::Disconnected { .. }));
    assert!(h.session.next_timeout().is_some());
}

#[test]
fn heartbeat_pings_at_the_interval_and_matches_the_pong() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    let interval = Duration::from_millis(u64::from(HEARTBEAT_MS));
    // The login takes longer than an interval: no ping while it is pending.
    h.advance(interval);
    h.session.handle_timeout(h.now);
    assert!(h.sent().is_empty(), "no ping before login");
    h.feed(&login_ok(login_id, 0, 0));
    let (sync_id, _) = h.sent()[0];
    h.feed(&sync_page(sync_id, &[], 0, false));
    h.events();

    assert_eq!(h.session.next_timeout(), Some(h.now + interval));
    h.advance(interval);
    h.session.handle_timeout(h.now);
    let sent = h.sent();
    let [(ping_id, Out::Ping(ping))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    h.advance(Duration::from_millis(30));
    h.feed(&frame(Kind::Pong, *ping_id, &Pong { nonce: ping.nonce }));
    assert_eq!(
        h.events(),
        vec![Event::Pong {
            rtt: Duration::from_millis(30)
        }]
    );
    assert_eq!(h.session.rtt(), Some(Duration::from_millis(30)));

    h.advance(interval);
    h.session.handle_timeout(h.now);
    let sent = h.sent();
    let [(ping_id, Out::Ping(ping))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    h.feed(&frame(
        Kind::Pong,
        *ping_id,
        &Pong {
            nonce: ping.nonce ^ 1,
        },
    ));
    assert_eq!(
        h.actions(),
        vec![Action::Disconnect],
        "a pong for another ping is a fault"
    );
}

#[test]
fn unanswered_ping_is_not_repeated_and_times_out() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let interval = Duration::from_millis(u64::from(HEARTBEAT_MS));
    h.advance(interval);
    h.session.handle_timeout(h.now);
    assert!(matches!(h.sent().as_slice(), [(_, Out::Ping(_))]));
    let ping_deadline = h.now + REQUEST_TIMEOUT;
    while h.now + interval < ping_deadline {
        h.advance(interval);
        h.session.handle_timeout(h.now);
        assert!(h.sent().is_empty(), "one ping in flight at a time");
        assert!(h.actions().is_empty());
    }
    h.now = ping_deadline;
    h.session.handle_timeout(h.now);
    assert_eq!(
        h.actions(),
        vec![Action::Disconnect],
        "a dead connection is dropped"
    );
}

#[test]
fn absurd_heartbeat_interval_is_clamped() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, 0));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    h.sent();
    let at = h.session.next_timeout().unwrap();
    assert_eq!(at, h.now + Duration::from_millis(HEARTBEAT_INTERVAL_MS_MIN));
}

#[test]
fn configured_heartbeat_interval_overrides_the_nodes() {
    let mut config = config();
    config.heartbeat_interval = Some(Duration::from_secs(270));
    let mut h = Harness::new(config, MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    let (hello_id, _) = h.sent()[0];
    h.feed(&hello_ok(hello_id, HEARTBEAT_MS));
    let (login_id, _) = h.sent()[0];
    h.feed(&login_ok(login_id, 0, 0));
    let (sync_id, _) = h.sent()[0];
    h.feed(&sync_page(sync_id, &[], 0, false));
    h.events();
    assert_eq!(
        h.session.next_timeout(),
        Some(h.now + Duration::from_secs(270))
    );
}

#[test]
fn sync_now_runs_one_sync_at_a_time_and_reports_done() {
    let mut h = Harness::new(config(), MemoryStore::new());
    assert!(!h.session.sync_now(h.now), "no sync before login");
    h.establish_synced();
    assert!(h.session.sync_now(h.now));
    assert!(!h.session.sync_now(h.now), "one sync run at a time");
    let sent = h.sent();
    let [(sync_id, Out::Sync(sync))] = sent.as_slice() else {
        panic!("{sent:?}")
    };
    assert_eq!(sync.after_seq, 0);
    h.feed(&sync_page(*sync_id, &[1, 2], 2, false));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![1, 2]);
    assert_eq!(events.last(), Some(&Event::SyncDone { head_seq: 2 }));
    assert!(h.session.sync_now(h.now));
}

// ----- hostile input ----------------------------------------------------------------------

#[test]
fn malformed_bytes_drop_the_connection_and_reconnect() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&[0xFF; FRAME_HEADER_SIZE]);
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    assert!(matches!(
        h.events().as_slice(),
        [Event::Disconnected { .. }]
    ));
    // Bytes still in the socket after the disconnect are dropped.
    h.feed(&push(&[1]));
    assert!(h.events().is_empty());
    assert_eq!(h.session.last_seq(), 0);
}

#[test]
fn corrupt_message_inside_an_entry_is_not_delivered() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let mut bytes = message_bytes(1);
    let root = bytes.len() - 8;
    bytes[root..].fill(0x80); // the text field now points outside the archive
    let bad = Push {
        entries: vec![Entry {
            seq: 1,
            message: bytes,
        }],
    };
    h.feed(&frame(Kind::Push, 0, &bad));
    assert_eq!(h.actions(), vec![Action::Disconnect]);
    assert_eq!(h.session.last_seq(), 0);
    assert!(!h.events().iter().any(|e| matches!(e, Event::Message(_))));
}

#[test]
fn unexpected_frames_are_faults_not_panics() {
    // A client-only kind from the node.
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&frame(Kind::Ping, 1, &Ping { nonce: 1 }));
    assert_eq!(h.actions(), vec![Action::Disconnect]);

    // An answer of the wrong kind for its request id.
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.session.send("bob", "x", h.now).unwrap();
    let (send_id, _) = h.sent()[0];
    h.feed(&sync_page(send_id, &[], 0, false));
    assert_eq!(h.actions(), vec![Action::Disconnect]);

    // An answer to nothing is ignored.
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    h.feed(&send_ack(999, 1, 1, false));
    assert!(h.actions().is_empty());
    assert!(h.events().is_empty());

    // A push before HelloOk.
    let mut h = Harness::new(config(), MemoryStore::new());
    h.session.connect(h.now);
    h.actions();
    h.session.connected(h.now);
    h.feed(&push(&[1]));
    assert_eq!(h.actions(), vec![Action::Disconnect]);
}

#[test]
fn lying_sync_pages_cannot_make_the_session_loop() {
    let mut h = Harness::new(config(), MemoryStore::new());
    let (sync_id, _) = h.establish(10);
    // has_more, but the page holds nothing usable (a gap at its start).
    h.feed(&sync_page(sync_id, &[5, 6], 10, true));
    let events = h.events();
    assert_eq!(
        events,
        vec![Event::SyncDone { head_seq: 10 }],
        "the run ends without progress"
    );
    assert!(h.sent().is_empty());
}

#[test]
fn mutated_node_frames_never_panic() {
    // A seeded walk over corrupted copies of every frame the node sends.
    let mut rng = 0x1234_5678_9ABC_DEF0u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let samples = [
        hello_ok(1, HEARTBEAT_MS),
        login_ok(2, 3, 0),
        sync_page(3, &[1, 2, 3], 3, false),
        push(&[1, 2]),
        send_ack(4, 1, 1, false),
        error(5, ErrorCode::Busy),
        kicked(),
        frame(Kind::Pong, 6, &Pong { nonce: 1 }),
    ];
    for round in 0..2_000 {
        let mut h = Harness::new(config().with_seed(round), MemoryStore::new());
        h.establish_synced();
        h.session.send("bob", "x", h.now).unwrap();
        let mut bytes = samples[(next() % samples.len() as u64) as usize].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = next() as u8;
        }
        let cut = (next() % (bytes.len() as u64 + 1)) as usize;
        h.feed(&bytes[..cut]);
        h.feed(&bytes[cut..]);
        h.events();
        h.actions();
        h.sent();
        h.session.handle_timeout(h.now + Duration::from_secs(60));
    }
}

// ----- the blocking driver over loopback ----------------------------------------------------

/// A scripted node on a loopback port: serves `connections` connections one after the
/// other, answering hello, login (password "secret" or its token), sync from a fixed
/// timeline of `timeline_len` entries, sends, and pings.
fn fake_node(
    timeline_len: u64,
    connections: usize,
) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut next_seq = timeline_len + 1;
        for stream in listener.incoming().take(connections) {
            let mut stream = stream.unwrap();
            let mut reader = FrameReader::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut out = Vec::new();
                let mut close = false;
                reader
                    .feed(&buf[..n], |header, payload| {
                        let id = header.request_id;
                        match decode_out(header.kind, payload) {
                            Out::Hello(_) => out.extend(hello_ok(id, HEARTBEAT_MS)),
                            Out::Login(login) => match login.credential {
                                Credential::Password(p) if p == "secret" => {
                                    out.extend(login_ok(id, timeline_len, 0))
                                }
                                Credential::Token(t) if t == "v1.7.99.token" => {
                                    out.extend(login_ok(id, timeline_len, 0))
                                }
                                _ => {
                                    out.extend(error(id, ErrorCode::AuthFailed));
                                    close = true;
                                }
                            },
                            Out::Sync(sync) => {
                                let seqs: Vec<u64> =
                                    (sync.after_seq + 1..=timeline_len).take(2).collect();
                                let has_more = seqs.last().is_some_and(|&s| s < timeline_len);
                                out.extend(sync_page(id, &seqs, timeline_len, has_more));
                            }
                            Out::Send(_) => {
                                out.extend(send_ack(id, 9000 + next_seq, next_seq, false));
                                next_seq += 1;
                            }
                            Out::Ping(ping) => {
                                out.extend(frame(Kind::Pong, id, &Pong { nonce: ping.nonce }))
                            }
                            Out::DeviceAck(_) => {}
                        }
                        !close
                    })
                    .unwrap();
                stream.write_all(&out).unwrap();
                if close {
                    break;
                }
            }
        }
    });
    (addr, handle)
}

#[test]
fn blocking_client_connects_syncs_sends_and_reads_the_timeline() {
    let (addr, node) = fake_node(5, 1);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen_by_listener = seen.clone();
    let mut client = BlockingClient::new(addr, config())
        .with_listener(move |event: &Event| seen_by_listener.lock().unwrap().push(event.clone()));
    client.connect().unwrap();
    // The initial sync paged through the whole timeline (pages of 2).
    let got: Vec<u64> = client.take_received().iter().map(|m| m.seq).collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    assert_eq!(client.session().last_seq(), 5);

    let acked = client.send("bob", "hi").unwrap();
    assert_eq!(acked.seq, 6);
    assert_eq!(acked.msg_id, 9006);
    assert!(!acked.duplicate);
    assert_eq!(client.session().outbox_len(), 0);

    let timeline = client.sync_all(2).unwrap();
    assert_eq!(
        timeline.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(
        client.session().last_seq(),
        5,
        "a fresh read leaves last_seq alone"
    );

    client.close();
    node.join().unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], Event::Connected);
    assert!(matches!(
        seen[1],
        Event::AuthOk {
            user_id: 7,
            head_seq: 5
        }
    ));
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::SendAcked { seq: 6, .. }))
    );
}

#[test]
fn blocking_client_reports_refused_credentials() {
    let (addr, node) = fake_node(0, 1);
    let mut config = config();
    config.password = Some("wrong".into());
    let mut client = BlockingClient::new(addr, config);
    let err = client.connect().unwrap_err();
    assert!(
        matches!(err, ClientError::AuthFailed { code: 4, .. }),
        "{err}"
    );
    node.join().unwrap();
}

#[test]
fn blocking_client_goes_offline_when_no_node_listens() {
    // Bind then drop: the port is very likely refused for the next few milliseconds.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = config();
    config.backoff_base = Duration::from_millis(1);
    config.backoff_max = Duration::from_millis(4);
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let events_in = events.clone();
    let mut client = BlockingClient::new(addr, config)
        .with_listener(move |event: &Event| events_in.lock().unwrap().push(event.clone()));
    let err = client.connect().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Offline {
                last_error: Some(_)
            }
        ),
        "{err}"
    );
    let failures = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::ConnectFailed { .. }))
        .count();
    assert_eq!(failures, RECONNECT_ATTEMPTS_MAX_DEFAULT as usize);
    assert_eq!(
        client.send("bob", "x").unwrap_err(),
        ClientError::NotConnected
    );
}

fn record_bytes(kind: u16, text: &str) -> Vec<u8> {
    let record = crate::protocol::Record {
        kind,
        msg_id: 77,
        conv: crate::protocol::group_conv(3),
        from_id: 8,
        from: "bob".into(),
        users: vec![7, 8],
        client_msg_id: 5,
        sent_at_ms: 1,
        up_to: 0,
        text: text.into(),
        attachments: Vec::new(),
    };
    let mut bytes = crate::protocol::RECORD_MARKER.to_vec();
    rkyv::api::high::to_bytes_in::<_, Failure>(&record, &mut bytes).unwrap();
    bytes
}

#[test]
fn record_entries_are_stored_in_order_with_their_fields() {
    use crate::protocol::record_kind;
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let push = Push {
        entries: vec![
            Entry {
                seq: 1,
                message: record_bytes(record_kind::GROUP_CREATED, "team"),
            },
            Entry {
                seq: 2,
                message: message_bytes(2),
            },
            Entry {
                seq: 3,
                message: record_bytes(record_kind::GROUP_MESSAGE, "hello all"),
            },
        ],
    };
    h.feed(&frame(Kind::Push, 0, &push));
    let events = h.events();
    assert_eq!(Harness::delivered_seqs(&events), vec![1, 2, 3]);
    let stored = h.session.store().entries();
    let created = stored[0].record.as_ref().unwrap();
    assert_eq!(
        (created.kind, created.users.as_slice()),
        (record_kind::GROUP_CREATED, &[7, 8][..])
    );
    assert_eq!(stored[0].group_id(), Some(3));
    assert!(!stored[0].is_message());
    assert!(stored[1].record.is_none() && stored[1].is_message());
    assert_eq!(
        (stored[2].text.as_str(), stored[2].is_message()),
        ("hello all", true)
    );
}

#[test]
fn corrupt_record_entry_drops_the_connection() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let mut bad = record_bytes(crate::protocol::record_kind::GROUP_MESSAGE, "x");
    let len = bad.len();
    bad.truncate(len - 3);
    let push = Push {
        entries: vec![Entry {
            seq: 1,
            message: bad,
        }],
    };
    h.feed(&frame(Kind::Push, 0, &push));
    assert!(h.actions().contains(&Action::Disconnect));
    assert_eq!(h.session.last_seq(), 0);
}

#[test]
fn refused_team_request_is_an_event_and_keeps_the_connection() {
    let mut h = Harness::new(config(), MemoryStore::new());
    h.establish_synced();
    let now = h.now;
    let id = h.session.group_query(9, now).expect("established");
    h.feed(&error(id, ErrorCode::NotMember));
    let events = h.events();
    assert!(matches!(
        &events[..],
        [Event::Team { request_id, answer: crate::client::TeamAnswer::Failed { code, .. } }]
            if *request_id == id && *code == ErrorCode::NotMember as u16
    ));
    assert!(h.session.is_established());
    assert!(h.actions().is_empty());
}
