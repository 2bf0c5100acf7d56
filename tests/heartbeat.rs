//! Idle timeout, heartbeats and kicks on duplicate device login.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::{Io, RawConn, TestNode, error_code};
use tern::protocol::*;

fn silent_client_is_closed_and_heartbeating_one_is_not(io: Io) {
    // 200 ms interval: the node closes connections silent for 500 ms.
    let node = TestNode::start(io, &["--heartbeat-ms", "200", "--shards", "1"]);
    node.add_user("alice", "pw");
    let mut silent = node.raw();
    silent.login("alice", "pw", "silent");
    let mut beating = node.raw();
    beating.login("alice", "pw", "beating");

    let start = Instant::now();
    let mut nonce = 0u64;
    let mut silent_frames = None;
    while start.elapsed() < Duration::from_secs(3) {
        nonce += 1;
        beating.send(Kind::Ping, nonce as u32, &Ping { nonce });
        let (h, p) = beating.read_frame(Duration::from_secs(5)).expect("pong");
        assert_eq!(h.kind, Kind::Pong);
        assert_eq!(
            access::<ArchivedPong>(Kind::Pong, &p)
                .unwrap()
                .nonce
                .to_native(),
            nonce
        );
        if silent_frames.is_none() {
            silent_frames = silent.read_until_closed(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let frames = silent_frames.expect("the silent client was never closed");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0.kind, Kind::Error);
    assert_eq!(error_code(&frames[0].1), ErrorCode::Timeout as u16);
    assert!(!beating.is_closed());
    // 30 pings over 3 s kept it open well past six idle timeouts.
    assert!(nonce >= 10);
}

fn connection_that_never_logs_in_is_closed_at_the_handshake_deadline(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    let mut idle = node.raw();
    let frames = idle
        .read_until_closed(Duration::from_millis(
            tern::limits::HANDSHAKE_TIMEOUT_MS + 5_000,
        ))
        .expect("handshake deadline not enforced");
    assert_eq!(frames.len(), 1);
    assert_eq!(error_code(&frames[0].1), ErrorCode::Timeout as u16);
}

fn duplicate_device_login_kicks_the_older_connection(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    let mut first = node.raw();
    first.login("alice", "pw", "phone");
    let mut other_device = node.raw();
    other_device.login("alice", "pw", "laptop");
    let mut second = node.raw();
    second.login("alice", "pw", "phone");

    let frames = first
        .read_until_closed(Duration::from_secs(10))
        .expect("old connection not kicked");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0.kind, Kind::Kicked);
    let kicked = access::<ArchivedKicked>(Kind::Kicked, &frames[0].1).unwrap();
    assert_eq!(
        kicked.code.to_native(),
        ErrorCode::ReplacedByNewLogin as u16
    );

    // The new login and the other device still work.
    for conn in [&mut second, &mut other_device] {
        conn.send(Kind::Ping, 9, &Ping { nonce: 9 });
        let (h, _) = conn.read_frame(Duration::from_secs(5)).expect("pong");
        assert_eq!(h.kind, Kind::Pong);
    }
}

/// Quiet spells of pings alone (which, with `--heartbeat-coalescing on`, let an io_uring
/// shard stretch its waits by `HEARTBEAT_COALESCE_US`) must still serve what arrives: pongs
/// for a pipelined burst, and a message that ends the spell, acknowledged and pushed.
fn quiet_spells_of_heartbeats_still_serve_pings_and_messages(io: Io) {
    serve_through_quiet_spells(io, &[]);
}

fn with_heartbeat_coalescing_quiet_spells_serve_the_same(io: Io) {
    serve_through_quiet_spells(io, &["--heartbeat-coalescing", "on"]);
}

fn serve_through_quiet_spells(io: Io, extra: &[&str]) {
    let mut args = vec!["--shards", "1"];
    args.extend_from_slice(extra);
    let node = TestNode::start(io, &args);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut alice = node.raw();
    alice.login("alice", "pw", "phone");
    let mut bob = node.raw();
    bob.login("bob", "pw", "phone");
    let mut nonce = 0u64;
    for round in 0..5u64 {
        // A quiet spell: only heartbeats for well over HEARTBEAT_COALESCE_QUIET_MS.
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(300) {
            for conn in [&mut alice, &mut bob] {
                nonce += 1;
                conn.send(Kind::Ping, nonce as u32, &Ping { nonce });
                let (h, p) = read_skipping_pushes(conn);
                assert_eq!(h.kind, Kind::Pong);
                let pong = access::<ArchivedPong>(Kind::Pong, &p).unwrap();
                assert_eq!(pong.nonce.to_native(), nonce);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // A pipelined burst of pings, all answered in order.
        let first = nonce + 1;
        let mut burst = Vec::new();
        for _ in 0..100 {
            nonce += 1;
            encode(&mut burst, Kind::Ping, nonce as u32, &Ping { nonce });
        }
        bob.write_bytes(&burst);
        for expected in first..=nonce {
            let (h, p) = read_skipping_pushes(&mut bob);
            assert_eq!(h.kind, Kind::Pong);
            let pong = access::<ArchivedPong>(Kind::Pong, &p).unwrap();
            assert_eq!(pong.nonce.to_native(), expected);
        }
        // A message ends the spell.
        let text = format!("after quiet spell {round}");
        alice.send(
            Kind::Send,
            1000 + round as u32,
            &Send {
                to: "bob".into(),
                client_msg_id: round + 1,
                text: text.clone(),
            },
        );
        // The sender's own device may get its copy pushed before the ack.
        let ack = read_skipping_pushes(&mut alice);
        assert_eq!(ack.0.kind, Kind::SendAck, "error {}", error_code(&ack.1));
        assert_eq!(ack.0.request_id, 1000 + round as u32);
        let (h, p) = bob.read_frame(Duration::from_secs(10)).expect("push");
        assert_eq!(h.kind, Kind::Push);
        let push = access::<ArchivedPush>(Kind::Push, &p).unwrap();
        assert_eq!(push.entries.len(), 1);
        let message =
            access::<ArchivedMessage>(Kind::Push, push.entries[0].message.as_slice()).unwrap();
        assert_eq!(message.text.as_str(), text);
    }
    assert!(!alice.is_closed() && !bob.is_closed());
}

/// The next frame that is not a push of the connection's own sent messages.
fn read_skipping_pushes(conn: &mut RawConn) -> (FrameHeader, Vec<u8>) {
    loop {
        let (h, p) = conn.read_frame(Duration::from_secs(10)).expect("frame");
        if h.kind != Kind::Push {
            return (h, p);
        }
    }
}

io_tests!(
    silent_client_is_closed_and_heartbeating_one_is_not,
    connection_that_never_logs_in_is_closed_at_the_handshake_deadline,
    duplicate_device_login_kicks_the_older_connection,
    quiet_spells_of_heartbeats_still_serve_pings_and_messages,
    with_heartbeat_coalescing_quiet_spells_serve_the_same,
);
