//! The store's journal end to end: entries acknowledged while the derived tables (timelines,
//! history, the conversation list, unread counts) are still behind the message log are read
//! by every device at once, and survive a SIGKILL exactly once.
//!
//! The nodes here run with `--journal-interval-ms 600000`, so within a test nothing applies
//! the journal by age: only a read's flush, a read mark, or the start after a kill does.

#[macro_use]
mod common;

use std::collections::HashSet;

use common::{Io, TestNode};
use tern::client::{BlockingClient, ClientConfig, ReceivedMessage};
use tern::protocol::{group_conv, record_kind};

const PASSWORD: &str = "pw-journal";
/// Far beyond any test's length: the journal is never due by age.
const NEVER: &str = "600000";

fn device(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client = node.client(config);
    client.connect().expect("connect");
    client
}

fn user_id(client: &BlockingClient) -> u64 {
    client.session().user_id().expect("logged in")
}

fn assert_once_and_contiguous(timeline: &[ReceivedMessage]) {
    for (index, entry) in timeline.iter().enumerate() {
        assert_eq!(
            entry.seq,
            index as u64 + 1,
            "timeline has a hole or a repeat"
        );
    }
    let ids: HashSet<u64> = timeline.iter().map(|m| m.msg_id).collect();
    assert_eq!(ids.len(), timeline.len(), "an entry appears twice");
}

fn texts(entries: &[ReceivedMessage]) -> Vec<&str> {
    entries.iter().map(|m| m.text.as_str()).collect()
}

fn acked_entries_survive_sigkill_while_derived_state_is_behind(io: Io) {
    let mut node = TestNode::start(io, &["--shards", "2", "--journal-interval-ms", NEVER]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let mut carol = device(&node, "carol", "phone");
    let alice_id = user_id(&alice);
    let carol_id = user_id(&carol);
    let group = alice
        .group_create("crew", &["bob".to_owned(), "carol".to_owned()])
        .unwrap()
        .group_id;
    let mut direct = Vec::new();
    let mut in_group = Vec::new();
    let mut from_carol = Vec::new();
    for i in 0..40 {
        direct.push(alice.send("bob", &format!("direct {i}")).unwrap().msg_id);
        if i % 4 == 0 {
            from_carol.push(carol.send("bob", &format!("carol {i}")).unwrap().msg_id);
        }
        if i % 2 == 0 {
            in_group.push(
                alice
                    .group_send(group, &format!("group {i}"))
                    .unwrap()
                    .msg_id,
            );
        }
    }
    // Every send above was acknowledged; bob never read, so nothing asked for an apply:
    // the kill finds bob's whole timeline in the journal only.
    node.kill();
    node.restart();

    let mut bob = device(&node, "bob", "phone");
    let timeline = bob.sync_all(0).expect("sync");
    assert_once_and_contiguous(&timeline);
    // The group's creation, then every message in send order.
    assert_eq!(
        timeline[0].record.as_ref().map(|r| r.kind),
        Some(record_kind::GROUP_CREATED)
    );
    let ids: Vec<u64> = timeline[1..].iter().map(|m| m.msg_id).collect();
    let mut expected: Vec<u64> = direct
        .iter()
        .chain(&in_group)
        .chain(&from_carol)
        .copied()
        .collect();
    expected.sort_unstable();
    assert_eq!(ids, expected, "an acknowledged entry is missing or extra");

    // History of each conversation holds exactly its entries, newest first.
    let (page, has_more) = bob.history(alice_id, 0, 100).unwrap();
    assert!(!has_more);
    let mut newest_first = direct.clone();
    newest_first.reverse();
    assert_eq!(
        page.iter().map(|m| m.msg_id).collect::<Vec<_>>(),
        newest_first
    );
    let (page, _) = bob.history(group_conv(group), 0, 100).unwrap();
    assert_eq!(page.len(), in_group.len() + 1, "messages and the creation");
    let (page, _) = bob.history(carol_id, 0, 100).unwrap();
    assert_eq!(page.len(), from_carol.len());

    // Unread counts match what was sent, once each.
    let list = bob.conversations(0, 10).unwrap();
    assert_eq!(list.total, 3);
    let unread = |conv: u64| {
        list.items
            .iter()
            .find(|item| item.conv == conv)
            .map(|item| item.unread)
    };
    assert_eq!(unread(alice_id), Some(direct.len() as u32));
    assert_eq!(unread(group_conv(group)), Some(in_group.len() as u32));
    assert_eq!(unread(carol_id), Some(from_carol.len() as u32));
    // Activity order: alice's last direct message was the last entry.
    assert_eq!(list.items[0].conv, alice_id);
    assert_eq!(list.items[0].preview, "direct 39");
}

fn reads_wait_for_unapplied_entries_and_never_miss_them(io: Io) {
    let node = TestNode::start(io, &["--shards", "2", "--journal-interval-ms", NEVER]);
    for user in ["alice", "bob"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let alice_id = user_id(&alice);
    for i in 0..5 {
        alice.send("bob", &format!("before {i}")).unwrap();
    }
    // bob's first device logs in after the sends: its sync reads entries that are only in
    // the journal, so the shard has the writer apply them first.
    let mut bob = device(&node, "bob", "phone");
    let timeline = bob.sync_all(0).unwrap();
    assert_eq!(
        texts(&timeline),
        (0..5).map(|i| format!("before {i}")).collect::<Vec<_>>()
    );
    // More sends while bob is online, then every derived read at once.
    for i in 0..7 {
        alice.send("bob", &format!("after {i}")).unwrap();
    }
    let (page, _) = bob.history(alice_id, 0, 3).unwrap();
    assert_eq!(texts(&page), ["after 6", "after 5", "after 4"]);
    let list = bob.conversations(0, 10).unwrap();
    assert_eq!(
        (list.items[0].unread, list.items[0].preview.as_str()),
        (12, "after 6")
    );
    let mut laptop = device(&node, "bob", "laptop");
    let timeline = laptop.sync_all(0).unwrap();
    assert_eq!(timeline.len(), 12);
    assert_once_and_contiguous(&timeline);
    // A read mark applies the journal inside the writer and counts what it holds.
    for i in 0..2 {
        alice.send("bob", &format!("late {i}")).unwrap();
    }
    let ok = bob.read(alice_id, 12).unwrap();
    assert_eq!((ok.read_seq, ok.unread), (12, 2));
}

io_tests!(
    acked_entries_survive_sigkill_while_derived_state_is_behind,
    reads_wait_for_unapplied_entries_and_never_miss_them,
);
