//! End-to-end tests of history paging, the conversation list, unread counts and read
//! receipts against a real `tern` node.

#[macro_use]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Io, TestNode};
use tern::client::{BlockingClient, ClientConfig, FileMessage, ReceivedMessage};
use tern::protocol::{group_conv, record_kind};

const PASSWORD: &str = "pw-conv";
/// Bound on waiting for pushed entries; the loops stop as soon as they hold.
const WAIT: Duration = Duration::from_secs(30);

fn device(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client = node.client(config);
    client.connect().expect("connect");
    client
}

fn user_id(client: &BlockingClient) -> u64 {
    client.session().user_id().expect("logged in")
}

/// Pumps until `done` holds on what the client received, or the bound passes.
fn pump_until(client: &mut BlockingClient, done: impl Fn(&[ReceivedMessage]) -> bool) -> bool {
    let deadline = Instant::now() + WAIT;
    while !done(client.received()) && Instant::now() < deadline {
        client.pump(Instant::now() + Duration::from_millis(20));
    }
    done(client.received())
}

fn history_pages_return_every_message_once(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let mut bob = device(&node, "bob", "phone");
    // Interleave a 1:1 conversation, a group and another 1:1, so each history must pick
    // its own entries out of one timeline.
    let group = alice
        .group_create("pair", &["bob".to_owned()])
        .unwrap()
        .group_id;
    let mut direct = Vec::new();
    let mut in_group = Vec::new();
    for i in 0..23 {
        let from_alice = i % 3 != 0;
        let sender = if from_alice { &mut alice } else { &mut bob };
        let to = if from_alice { "bob" } else { "alice" };
        direct.push(sender.send(to, &format!("direct {i}")).unwrap().msg_id);
        in_group.push(
            sender
                .group_send(group, &format!("group {i}"))
                .unwrap()
                .msg_id,
        );
        alice.send("carol", &format!("other {i}")).unwrap();
    }

    let bob_id = user_id(&bob);
    for (conv, expected, membership) in [(bob_id, &direct, 0), (group_conv(group), &in_group, 1)] {
        for limit in [1, 7, 0] {
            let mut seen = Vec::new();
            let mut seqs = Vec::new();
            let mut before = 0;
            let mut pages = 0;
            loop {
                let (entries, has_more) = alice.history(conv, before, limit).unwrap();
                pages += 1;
                assert!(pages <= 100, "history does not end");
                for e in &entries {
                    seqs.push(e.seq);
                    if e.is_message() {
                        seen.push(e.msg_id);
                    }
                }
                match entries.last() {
                    Some(last) if has_more => before = last.seq,
                    _ => break,
                }
            }
            assert!(
                seqs.windows(2).all(|w| w[0] > w[1]),
                "newest first, no repeats"
            );
            seen.reverse();
            assert_eq!(&seen, expected, "conv {conv} limit {limit}");
            // The group history also holds its creation record.
            assert_eq!(seqs.len(), expected.len() + membership);
        }
    }
}

fn unread_counts_and_read_receipts_agree_across_devices(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let mut bob_phone = device(&node, "bob", "phone");
    let mut bob_laptop = device(&node, "bob", "laptop");
    let alice_id = user_id(&alice);
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send("bob", &format!("hello {i}")).unwrap());
    }

    let unread_of = |client: &mut BlockingClient| {
        let page = client.conversations(0, 0).unwrap();
        assert_eq!(page.total, 1);
        let item = &page.items[0];
        assert_eq!((item.conv, item.title.as_str()), (alice_id, "alice"));
        assert_eq!(item.preview, "hello 4");
        (item.unread, item.read_seq)
    };
    assert_eq!(unread_of(&mut bob_phone).0, 5);
    assert_eq!(unread_of(&mut bob_laptop).0, 5);

    // The phone reads the first three messages (bob's seqs 1..=3).
    assert!(pump_until(&mut bob_phone, |r| r.len() >= 5));
    let third = bob_phone.received()[2].clone();
    assert_eq!(third.msg_id, sent[2].msg_id);
    let ok = bob_phone.read(alice_id, third.seq).unwrap();
    assert_eq!((ok.read_seq, ok.unread), (third.seq, 2));
    // The laptop sees the same count from the node, and learns the mark by sync.
    assert_eq!(unread_of(&mut bob_laptop), (2, third.seq));
    assert!(pump_until(&mut bob_laptop, |r| r.iter().any(|e| e
        .record
        .as_ref()
        .is_some_and(|r| r.kind == record_kind::READ))));
    let mark = bob_laptop
        .received()
        .last()
        .unwrap()
        .record
        .clone()
        .unwrap();
    assert_eq!((mark.conv, mark.up_to), (alice_id, sent[2].msg_id));

    // Alice's devices get the read receipt in her timeline.
    assert!(pump_until(&mut alice, |r| r.iter().any(|e| e
        .record
        .as_ref()
        .is_some_and(|r| r.kind == record_kind::READ))));
    let receipt = alice
        .received()
        .iter()
        .find(|e| {
            e.record
                .as_ref()
                .is_some_and(|r| r.kind == record_kind::READ)
        })
        .unwrap()
        .clone();
    assert_eq!(receipt.from, "bob");
    assert_eq!(receipt.record.unwrap().up_to, sent[2].msg_id);

    // A mark never moves back; reading everything clears the count on both devices.
    let ok = bob_laptop.read(alice_id, 1).unwrap();
    assert_eq!((ok.read_seq, ok.unread), (third.seq, 2));
    bob_laptop.read(alice_id, u64::MAX).unwrap();
    assert_eq!(unread_of(&mut bob_phone).0, 0);
    assert_eq!(unread_of(&mut bob_laptop).0, 0);
    // Alice wrote every message herself: nothing unread for her.
    let page = alice.conversations(0, 0).unwrap();
    assert_eq!(page.items[0].unread, 0);
    let receipts: HashSet<u64> = alice
        .sync_all(0)
        .unwrap()
        .iter()
        .filter(|e| {
            e.record
                .as_ref()
                .is_some_and(|r| r.kind == record_kind::READ)
        })
        .map(|e| e.record.as_ref().unwrap().up_to)
        .collect();
    assert_eq!(receipts, HashSet::from([sent[2].msg_id, sent[4].msg_id]));
}

fn conversation_list_orders_by_last_activity_and_pages(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "bob", "carol", "dave"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    alice.send("bob", "to bob").unwrap();
    let group = alice
        .group_create("crew", &["carol".to_owned()])
        .unwrap()
        .group_id;
    alice.send("dave", "to dave").unwrap();
    alice.group_send(group, "to the crew").unwrap();
    let titles = |page: &tern::protocol::ConversationsPage| {
        page.items
            .iter()
            .map(|i| i.title.clone())
            .collect::<Vec<_>>()
    };
    let page = alice.conversations(0, 0).unwrap();
    assert_eq!(page.total, 3);
    assert_eq!(titles(&page), ["crew", "dave", "bob"]);
    assert_eq!(page.items[0].preview, "to the crew");
    let second = alice.conversations(1, 1).unwrap();
    assert_eq!(titles(&second), ["dave"]);
    // New activity moves a conversation to the top.
    alice.send("bob", "again").unwrap();
    assert_eq!(titles(&alice.conversations(0, 2).unwrap()), ["bob", "crew"]);
}

fn delivery_receipt_reaches_the_sender_once_per_delivery(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let alice_id = user_id(&alice);
    let sent: Vec<u64> = (0..3)
        .map(|i| alice.send("bob", &format!("m{i}")).unwrap().msg_id)
        .collect();
    let delivered = |entries: &[ReceivedMessage]| -> Vec<(String, u64, u64)> {
        entries
            .iter()
            .filter_map(|e| {
                let r = e.record.as_ref()?;
                (r.kind == record_kind::DELIVERED).then(|| (e.from.clone(), r.conv, r.up_to))
            })
            .collect()
    };
    // Bob was offline; his phone's login sync and ack deliver all three at once.
    let _bob_phone = device(&node, "bob", "phone");
    assert!(pump_until(&mut alice, |r| !delivered(r).is_empty()));
    assert_eq!(
        delivered(alice.received()),
        [("bob".to_owned(), alice_id, sent[2])]
    );
    // A second device of bob acknowledging the same entries sends no second receipt. Its
    // ack is applied before the send it made after (one writer, in queue order).
    let mut bob_laptop = device(&node, "bob", "laptop");
    bob_laptop.send("bob", "note to self").unwrap();
    assert_eq!(delivered(&alice.sync_all(0).unwrap()).len(), 1);
}

/// Regression: file messages produced no delivery receipts (1:1 or group) and their
/// conversation preview was empty even with a caption.
fn file_messages_get_delivery_receipts_and_a_preview(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let alice_id = user_id(&alice);
    let group = alice
        .group_create("photos", &["carol".to_owned()])
        .unwrap()
        .group_id;
    let file = alice
        .upload("cat.jpg", "image/jpeg", b"not really a cat")
        .unwrap();
    let captioned = FileMessage {
        caption: "the cat".to_owned(),
        ..FileMessage::default()
    };
    let to_bob = alice
        .send_file(Some("bob"), None, file.file_id, &captioned)
        .unwrap()
        .msg_id;
    let to_group = alice
        .send_file(None, Some(group), file.file_id, &FileMessage::default())
        .unwrap()
        .msg_id;
    let page = alice.conversations(0, 0).unwrap();
    let preview = |title: &str| {
        page.items
            .iter()
            .find(|i| i.title == title)
            .map(|i| i.preview.clone())
            .unwrap()
    };
    assert_eq!(preview("bob"), "the cat", "the caption");
    assert_eq!(preview("photos"), "cat.jpg", "no caption: the file's name");

    let delivered = |entries: &[ReceivedMessage]| -> HashSet<(String, u64, u64)> {
        entries
            .iter()
            .filter_map(|e| {
                let r = e.record.as_ref()?;
                (r.kind == record_kind::DELIVERED).then(|| (e.from.clone(), r.conv, r.up_to))
            })
            .collect()
    };
    let _bob = device(&node, "bob", "phone");
    let _carol = device(&node, "carol", "phone");
    assert!(pump_until(&mut alice, |r| delivered(r).len() == 2));
    assert_eq!(
        delivered(alice.received()),
        HashSet::from([
            ("bob".to_owned(), alice_id, to_bob),
            ("carol".to_owned(), group_conv(group), to_group),
        ])
    );
}

io_tests!(
    file_messages_get_delivery_receipts_and_a_preview,
    history_pages_return_every_message_once,
    unread_counts_and_read_receipts_agree_across_devices,
    conversation_list_orders_by_last_activity_and_pages,
    delivery_receipt_reaches_the_sender_once_per_delivery,
);
