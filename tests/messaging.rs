//! 1:1 messaging end to end: push and sync, multi-device, idempotent resends, durability
//! across SIGKILL and restart, clean shutdown, and the `tern send` / `tern sync` commands.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Io, RawConn, TERN, TestNode};
use tern::client::{BlockingClient, ClientConfig, Event, ReceivedMessage};
use tern::protocol::*;

const WAIT: Duration = Duration::from_secs(30);

fn client(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password("pw");
    let mut client = node.client(config);
    client.connect().expect("connect and log in");
    client
}

/// Runs `client` until it holds `count` received messages (or `WAIT` passes).
fn receive(client: &mut BlockingClient, count: usize) -> Vec<ReceivedMessage> {
    let deadline = Instant::now() + WAIT;
    while client.received().len() < count && Instant::now() < deadline {
        client.pump((Instant::now() + Duration::from_millis(20)).min(deadline));
    }
    client.take_received()
}

fn assert_contiguous(messages: &[ReceivedMessage], first_seq: u64) {
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m.seq,
            first_seq + i as u64,
            "seqs not contiguous: {messages:?}"
        );
    }
}

fn online_push_and_offline_sync_arrive_in_order_with_contiguous_seqs(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut alice = client(&node, "alice", "phone");
    let mut bob = client(&node, "bob", "phone");

    for i in 0..20 {
        let acked = alice.send("bob", &format!("online {i}")).expect("ack");
        assert_eq!(acked.seq, i + 1, "sender's own timeline is contiguous");
        assert!(!acked.duplicate);
    }
    let online = receive(&mut bob, 20);
    assert_eq!(online.len(), 20);
    assert_contiguous(&online, 1);
    for (i, m) in online.iter().enumerate() {
        assert_eq!(m.text, format!("online {i}"));
        assert_eq!((m.from.as_str(), m.to.as_str()), ("alice", "bob"));
    }

    // Bob goes offline; what is sent meanwhile arrives through the sync at his next login.
    bob.close();
    for i in 0..10 {
        alice.send("bob", &format!("offline {i}")).expect("ack");
    }
    bob.connect().expect("reconnect");
    let synced = receive(&mut bob, 10);
    assert_eq!(synced.len(), 10, "only what bob missed: {synced:?}");
    assert_contiguous(&synced, 21);
    for (i, m) in synced.iter().enumerate() {
        assert_eq!(m.text, format!("offline {i}"));
    }

    // A device that never saw anything gets the whole timeline, once.
    let mut tablet = client(&node, "bob", "tablet");
    let all = receive(&mut tablet, 30);
    assert_eq!(all.len(), 30);
    assert_contiguous(&all, 1);
}

fn every_device_of_the_recipient_and_the_senders_other_devices_see_a_message(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    // Several connections per user so that, with two shards, devices land on both.
    let mut alice_phone = client(&node, "alice", "phone");
    let mut alice_laptop = client(&node, "alice", "laptop");
    let mut bob_devices: Vec<_> = ["phone", "laptop", "tablet"]
        .iter()
        .map(|d| client(&node, "bob", d))
        .collect();

    let mut sent = Vec::new();
    for i in 0..8 {
        let text = format!("hello {i}");
        let acked = alice_phone.send("bob", &text).expect("ack");
        sent.push((acked.msg_id, text));
    }
    for device in &mut bob_devices {
        let got = receive(device, sent.len());
        let got: Vec<_> = got.into_iter().map(|m| (m.msg_id, m.text)).collect();
        assert_eq!(got, sent);
    }
    // The sender's timeline also holds the delivery receipts (records) of bob's devices'
    // acks, interleaved with the messages: keep reading until every message is there.
    let deadline = Instant::now() + WAIT;
    let mut timeline = Vec::new();
    while timeline
        .iter()
        .filter(|m: &&ReceivedMessage| m.record.is_none())
        .count()
        < sent.len()
        && Instant::now() < deadline
    {
        timeline.extend(receive(&mut alice_laptop, 1));
    }
    assert_contiguous(&timeline, 1);
    let mirrored: Vec<_> = timeline
        .iter()
        .filter(|m| m.record.is_none())
        .map(|m| (m.msg_id, m.text.clone()))
        .collect();
    assert_eq!(
        mirrored, sent,
        "the sender's other device sees what was sent"
    );
}

fn raw_send(
    conn: &mut RawConn,
    request_id: u32,
    to: &str,
    client_msg_id: u64,
    text: &str,
) -> SendAck {
    let send = Send {
        to: to.into(),
        client_msg_id,
        text: text.into(),
    };
    conn.send(Kind::Send, request_id, &send);
    // The sending device is itself a device of the sender: its own timeline entry may be
    // pushed to it before or after the ack.
    let (header, payload) = loop {
        let (header, payload) = conn.read_frame(WAIT).expect("send ack");
        if header.kind != Kind::Push {
            break (header, payload);
        }
    };
    if header.kind != Kind::SendAck {
        panic!(
            "expected a send ack, got {:?} (error code {})",
            header.kind,
            common::error_code(&payload)
        );
    }
    assert_eq!(header.request_id, request_id);
    let ack = access::<ArchivedSendAck>(Kind::SendAck, &payload).expect("valid ack");
    SendAck {
        msg_id: ack.msg_id.to_native(),
        seq: ack.seq.to_native(),
        sent_at_ms: ack.sent_at_ms.to_native(),
        duplicate: ack.duplicate,
    }
}

fn resending_a_client_message_id_returns_the_original_ack_and_stores_nothing(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut conn = node.raw();
    conn.login("alice", "pw", "phone");
    let first = raw_send(&mut conn, 10, "bob", 0xfeed_0001, "only once");
    assert!(!first.duplicate);
    let again = raw_send(&mut conn, 11, "bob", 0xfeed_0001, "only once");
    assert!(again.duplicate);
    assert_eq!(
        (again.msg_id, again.seq, again.sent_at_ms),
        (first.msg_id, first.seq, first.sent_at_ms)
    );

    // The resend after a reconnect, as a client does when an ack was lost with its
    // connection, is answered the same way.
    drop(conn);
    let mut conn = node.raw();
    conn.login("alice", "pw", "phone");
    let after_reconnect = raw_send(&mut conn, 1, "bob", 0xfeed_0001, "only once");
    assert!(after_reconnect.duplicate);
    assert_eq!(after_reconnect.msg_id, first.msg_id);
    let next = raw_send(&mut conn, 2, "bob", 0xfeed_0002, "second");
    assert!(!next.duplicate);
    assert_eq!(next.seq, first.seq + 1);

    let mut bob = client(&node, "bob", "phone");
    let timeline = bob.sync_all(0).expect("sync");
    let texts: Vec<_> = timeline.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["only once", "second"]);
    assert_contiguous(&timeline, 1);
}

fn every_acknowledged_message_survives_sigkill_exactly_once(io: Io) {
    let mut node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");

    // client_msg_id → msg_id of every ack alice's session reported.
    let acked: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let record = acked.clone();
    let config = ClientConfig::new("alice", "phone").with_password("pw");
    let mut alice = node.client(config).with_listener(move |event: &Event| {
        if let Event::SendAcked {
            client_msg_id,
            msg_id,
            ..
        } = event
        {
            let previous = record.lock().unwrap().insert(*client_msg_id, *msg_id);
            assert!(
                previous.is_none_or(|p| p == *msg_id),
                "one client message id, two msg ids"
            );
        }
    });
    alice.connect().expect("connect");

    const TOTAL: usize = 600;
    const KILL_AFTER_ACKS: usize = 200;
    let mut sent = 0;
    let mut killed = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        // Keep sends streaming: up to 50 waiting for their acks at any time.
        while sent < TOTAL && sent - acked.lock().unwrap().len().min(sent) < 50 {
            alice
                .send_nowait("bob", &format!("m{sent}"))
                .expect("queue");
            sent += 1;
        }
        // Checked right after queueing (send_nowait writes at once), so the kill finds
        // sends on the wire: some committed and not yet acked, some not yet read.
        let count = acked.lock().unwrap().len();
        if !killed && count >= KILL_AFTER_ACKS {
            // Mid-stream: sends are in flight, some committed but not yet acked.
            assert!(sent > count, "nothing in flight at the kill");
            node.kill();
            killed = true;
            let acked_before_kill: Vec<u64> = acked.lock().unwrap().values().copied().collect();
            node.restart();
            // Everything acked before the kill is there after the restart.
            let mut bob = client(&node, "bob", "phone");
            let stored: Vec<u64> = bob.sync_all(0).unwrap().iter().map(|m| m.msg_id).collect();
            for msg_id in acked_before_kill {
                assert!(
                    stored.contains(&msg_id),
                    "acked message {msg_id} lost by SIGKILL"
                );
            }
            bob.close();
        }
        if killed && count == TOTAL {
            break;
        }
        alice.pump(Instant::now() + Duration::from_millis(5));
    }
    assert!(killed);
    assert_eq!(
        acked.lock().unwrap().len(),
        TOTAL,
        "the session resent everything unacked"
    );

    // Bob's timeline holds each of the 600 messages exactly once, in send order, seqs 1..=600.
    let mut bob = client(&node, "bob", "laptop");
    let timeline = bob.sync_all(0).expect("sync");
    assert_eq!(timeline.len(), TOTAL, "lost or duplicated messages");
    assert_contiguous(&timeline, 1);
    let by_text: BTreeMap<&str, u64> = timeline
        .iter()
        .map(|m| (m.text.as_str(), m.msg_id))
        .collect();
    assert_eq!(by_text.len(), TOTAL, "a text appears twice");
    let acked = acked.lock().unwrap();
    for m in &timeline {
        assert_eq!(acked.get(&m.client_msg_id), Some(&m.msg_id));
    }
    // One sender, one connection at a time: the timeline keeps the order of sending.
    let order: Vec<usize> = timeline
        .iter()
        .map(|m| m.text[1..].parse().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted);
}

fn sigterm_stops_the_node_cleanly_and_restart_keeps_every_message(io: Io) {
    let mut node = TestNode::start(io, &["--shards", "2"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut alice = client(&node, "alice", "phone");
    let mut bob = client(&node, "bob", "phone");
    for i in 0..25 {
        alice.send("bob", &format!("before {i}")).expect("ack");
    }
    assert!(node.terminate(), "tern serve did not exit 0 on SIGTERM");
    node.restart();
    // Both sessions reconnect by themselves; the messages are all there.
    alice
        .send("bob", "after restart")
        .expect("ack after restart");
    let got = receive(&mut bob, 26);
    assert_eq!(got.len(), 26);
    assert_contiguous(&got, 1);
    assert_eq!(got[25].text, "after restart");
}

/// Runs `tern COMMAND --server S --user U --password P REST…`; returns (success, stdout, stderr).
fn tern(
    command: &str,
    node: &TestNode,
    user: &str,
    password: &str,
    rest: &[&str],
) -> (bool, String, String) {
    let out = Command::new(TERN)
        .arg(command)
        .args(node.cli_server_args())
        .args(["--user", user, "--password", password])
        .args(rest)
        .output()
        .expect("run tern");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn cli_send_and_sync_print_json(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut msg_ids = Vec::new();
    for text in ["first", "second \"quoted\" ünïcode"] {
        let (ok, out, err) = tern("send", &node, "alice", "pw", &["--to", "bob", text]);
        assert!(ok, "tern send failed: {err}");
        let ack: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert!(ack["msg_id"].as_u64().is_some());
        msg_ids.push(ack["msg_id"].as_u64().unwrap());
        assert_eq!(ack["seq"].as_u64(), Some(msg_ids.len() as u64));
    }
    let (ok, out, err) = tern("sync", &node, "bob", "pw", &[]);
    assert!(ok, "tern sync failed: {err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["text"], "second \"quoted\" ünïcode");
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["seq"].as_u64(), Some(i as u64 + 1));
        assert_eq!(line["msg_id"].as_u64(), Some(msg_ids[i]));
        assert_eq!(
            (line["from"].as_str(), line["to"].as_str()),
            (Some("alice"), Some("bob"))
        );
    }
    let (ok, out, _) = tern("sync", &node, "bob", "pw", &["--after", "1"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1);

    // Errors are one clear line and a non-zero exit, not a hang.
    let (ok, _, err) = tern("send", &node, "alice", "wrong", &["--to", "bob", "x"]);
    assert!(!ok);
    assert!(err.contains("tern:"), "{err}");
    let (ok, _, err) = tern("send", &node, "alice", "pw", &["--to", "nobody", "x"]);
    assert!(!ok);
    assert!(err.to_lowercase().contains("user"), "{err}");
}

io_tests!(
    online_push_and_offline_sync_arrive_in_order_with_contiguous_seqs,
    every_device_of_the_recipient_and_the_senders_other_devices_see_a_message,
    resending_a_client_message_id_returns_the_original_ack_and_stores_nothing,
    every_acknowledged_message_survives_sigkill_exactly_once,
    sigterm_stops_the_node_cleanly_and_restart_keeps_every_message,
    cli_send_and_sync_print_json,
);
