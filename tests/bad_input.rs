//! Hostile bytes get an error frame and a closed connection for that client only; other
//! clients keep being served and no data is lost.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Io, RawConn, TestNode, error_code};
use tern::protocol::*;

const WAIT: Duration = Duration::from_secs(10);

/// Asserts the node answered with one Error frame of `code` and closed the connection.
fn assert_refused(conn: &mut RawConn, code: ErrorCode) {
    let frames = conn
        .read_until_closed(WAIT)
        .expect("node kept a hostile connection open");
    let errors: Vec<u16> = frames
        .iter()
        .filter(|(h, _)| h.kind == Kind::Error)
        .map(|(_, p)| error_code(p))
        .collect();
    assert_eq!(
        errors,
        vec![code as u16],
        "frames: {:?}",
        frames.iter().map(|f| f.0).collect::<Vec<_>>()
    );
}

fn send_frame(conn: &mut RawConn, id: u32, to: &str, client_msg_id: u64, text: &str) {
    conn.send(
        Kind::Send,
        id,
        &Send {
            to: to.into(),
            client_msg_id,
            text: text.into(),
        },
    );
}

fn expect_ack(conn: &mut RawConn, id: u32) -> (u64, u64) {
    loop {
        let (h, p) = conn.read_frame(WAIT).expect("send ack");
        if h.kind == Kind::SendAck {
            assert_eq!(h.request_id, id);
            let ack = access::<ArchivedSendAck>(Kind::SendAck, &p).unwrap();
            return (ack.msg_id.to_native(), ack.seq.to_native());
        }
        assert_ne!(h.kind, Kind::Error, "send refused: code {}", error_code(&p));
    }
}

fn hostile_clients_are_cut_off_while_others_are_served(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw-a");
    node.add_user("bob", "pw-b");

    let mut bob = node.raw();
    bob.login("bob", "pw-b", "phone");
    let mut alice = node.raw();
    alice.login("alice", "pw-a", "phone");
    send_frame(&mut alice, 10, "bob", 1, "before the attacks");
    let (first_msg, _) = expect_ack(&mut alice, 10);

    // Random bytes.
    let mut attacker = node.raw();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    attacker.write_bytes(&garbage);
    assert_refused(&mut attacker, ErrorCode::MalformedFrame);

    // A length prefix far over the frame limit.
    let mut attacker = node.raw();
    let mut huge = (1u32 << 30).to_le_bytes().to_vec();
    huge.extend_from_slice(&[Kind::Hello as u8, 0, 0, 0, 1, 0, 0, 0]);
    attacker.write_bytes(&huge);
    assert_refused(&mut attacker, ErrorCode::MalformedFrame);

    // A valid header over a corrupt archive, from a logged-in client.
    let mut attacker = node.raw();
    attacker.login("alice", "pw-a", "laptop");
    let mut frame = Vec::new();
    encode(
        &mut frame,
        Kind::Send,
        3,
        &Send {
            to: "bob".into(),
            client_msg_id: 2,
            text: "x".into(),
        },
    );
    let len = frame.len();
    for b in &mut frame[len - 24..len - 16] {
        *b = 0x80;
    }
    attacker.write_bytes(&frame);
    assert_refused(&mut attacker, ErrorCode::MalformedFrame);

    // A send before login.
    let mut attacker = node.raw();
    attacker.hello();
    send_frame(&mut attacker, 4, "bob", 3, "sneaky");
    assert_refused(&mut attacker, ErrorCode::NotAuthenticated);

    // A server-only frame kind from a client.
    let mut attacker = node.raw();
    attacker.hello();
    attacker.send(Kind::Push, 0, &Push { entries: vec![] });
    assert_refused(&mut attacker, ErrorCode::NotAuthenticated);

    // A wrong password.
    let mut attacker = node.raw();
    attacker.hello();
    attacker.send(
        Kind::Login,
        2,
        &Login {
            user: "bob".into(),
            device: "x".into(),
            credential: Credential::Password("nope".into()),
        },
    );
    assert_refused(&mut attacker, ErrorCode::AuthFailed);

    // The honest clients are still served, and nothing stored was lost.
    send_frame(&mut alice, 11, "bob", 4, "after the attacks");
    let (second_msg, _) = expect_ack(&mut alice, 11);
    assert!(second_msg > first_msg);
    assert!(!alice.is_closed());
    bob.send(
        Kind::Sync,
        20,
        &Sync {
            after_seq: 0,
            limit: 100,
        },
    );
    let page = loop {
        let (h, p) = bob.read_frame(WAIT).expect("sync page");
        if h.kind == Kind::SyncPage {
            break p;
        }
    };
    let page = access::<ArchivedSyncPage>(Kind::SyncPage, &page).unwrap();
    let texts: Vec<String> = page
        .entries
        .iter()
        .map(|e| {
            access::<ArchivedMessage>(Kind::SyncPage, e.message.as_slice())
                .unwrap()
                .text
                .to_string()
        })
        .collect();
    assert_eq!(texts, vec!["before the attacks", "after the attacks"]);
    let seqs: Vec<u64> = page.entries.iter().map(|e| e.seq.to_native()).collect();
    assert_eq!(seqs, vec![1, 2]);
}

fn oversized_text_is_refused_but_the_connection_stays(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    node.add_user("alice", "pw-a");
    node.add_user("bob", "pw-b");
    let mut alice = node.raw();
    alice.login("alice", "pw-a", "phone");
    let text = "x".repeat(tern::limits::MESSAGE_TEXT_SIZE_MAX + 1);
    send_frame(&mut alice, 5, "bob", 1, &text);
    let (h, p) = alice.read_frame(WAIT).expect("answer");
    assert_eq!(h.kind, Kind::Error);
    assert_eq!(h.request_id, 5);
    assert_eq!(error_code(&p), ErrorCode::TooLarge as u16);
    send_frame(&mut alice, 6, "nobody", 2, "hi");
    let (h, p) = alice.read_frame(WAIT).expect("answer");
    assert_eq!(
        (h.kind, error_code(&p)),
        (Kind::Error, ErrorCode::UnknownUser as u16)
    );
    send_frame(&mut alice, 7, "bob", 3, "fine");
    expect_ack(&mut alice, 7);
}

io_tests!(
    hostile_clients_are_cut_off_while_others_are_served,
    oversized_text_is_refused_but_the_connection_stays,
);
