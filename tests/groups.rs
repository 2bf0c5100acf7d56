//! End-to-end tests of groups against a real `tern` node with two shards: fan-out to every
//! member device exactly once and in order (online, multi-device and offline members),
//! and a removed member that stops receiving and can no longer read the group.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Io, TestNode};
use tern::client::{BlockingClient, ClientConfig, ClientError, ReceivedMessage};
use tern::protocol::{ErrorCode, group_conv, record_kind};

const PASSWORD: &str = "pw-groups";
/// Bound on waiting for every device to hold every message. Never reached when the node
/// works; the loop stops as soon as the condition holds.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

fn user_name(i: usize) -> String {
    format!("u{i:02}")
}

/// Creates users in the node's store from this process (LMDB allows several processes),
/// which is much faster than one `tern user add` process per user.
fn add_users(node: &TestNode, count: usize) {
    let store = tern::storage::Store::open(&node.data, &Default::default()).expect("open store");
    let hash = tern::auth::hash_password(PASSWORD).expect("hash");
    for i in 0..count {
        store.add_user(&user_name(i), &hash).expect("add user");
    }
}

fn device(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client = node.client(config);
    client.connect().expect("connect");
    client
}

/// Msg ids of the group messages of `group_id` a device stored, in timeline order.
fn group_messages(entries: &[ReceivedMessage], group_id: u64) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| {
            e.group_id() == Some(group_id)
                && e.record.as_ref().unwrap().kind == record_kind::GROUP_MESSAGE
        })
        .map(|e| e.msg_id)
        .collect()
}

/// Pumps `clients` round robin until `done` holds for each or the timeout passes.
fn pump_until(
    clients: &mut [(String, BlockingClient)],
    mut done: impl FnMut(&BlockingClient) -> bool,
) {
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    loop {
        let mut all = true;
        for (_, client) in clients.iter_mut() {
            if !done(client) {
                all = false;
                client.pump(Instant::now() + Duration::from_millis(20));
            }
        }
        if all || Instant::now() > deadline {
            return;
        }
    }
}

fn group_of_50_gets_every_message_once_in_order_and_removed_member_stops_reading(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    const USERS: usize = 50;
    add_users(&node, USERS);

    // u00..u09 with two devices each, u10..u39 with one, u40..u49 offline during the sends.
    // 60 connections spread over the two SO_REUSEPORT listeners by the kernel's hash.
    let mut online: Vec<(String, BlockingClient)> = Vec::new();
    for i in 0..40 {
        let user = user_name(i);
        online.push((user.clone(), device(&node, &user, "phone")));
        if i < 10 {
            online.push((user.clone(), device(&node, &user, "laptop")));
        }
    }
    let members: Vec<String> = (1..USERS).map(user_name).collect();
    let info = online[0]
        .1
        .group_create("all-hands", &members)
        .expect("create");
    assert_eq!(info.members.len(), USERS);
    assert_eq!(
        info.owner_id,
        info.members.iter().find(|m| m.owner).unwrap().user_id
    );
    let group_id = info.group_id;

    // Phase 1: five senders (one of them on its second device) interleave 50 messages.
    let senders = [0usize, 1, 7, 20, 35];
    let mut acked: Vec<u64> = Vec::new();
    for round in 0..10 {
        for &sender in &senders {
            let client = &mut online[sender].1;
            let ack = client
                .group_send(group_id, &format!("round {round} from {sender}"))
                .expect("group send");
            assert!(!ack.duplicate);
            acked.push(ack.msg_id);
        }
    }
    let phase1 = acked.clone();

    // Phase 2: the owner removes u39; the group goes on without it.
    let removed = user_name(39);
    let index_removed = online.iter().position(|(u, _)| *u == removed).unwrap();
    let after = online[0]
        .1
        .group_remove(group_id, std::slice::from_ref(&removed))
        .expect("remove");
    assert_eq!(after.members.len(), USERS - 1);
    for n in 0..10 {
        let ack = online[0]
            .1
            .group_send(group_id, &format!("after removal {n}"))
            .expect("send");
        acked.push(ack.msg_id);
    }
    let mut sorted = acked.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, acked,
        "acks come back in commit order from one sender at a time"
    );

    // Every online device but the removed member's: all 60, once each, in commit order.
    let mut removed_client = online.remove(index_removed);
    pump_until(&mut online, |c| {
        group_messages(c.received(), group_id).len() >= acked.len()
    });
    for (user, client) in &online {
        assert_eq!(
            group_messages(client.received(), group_id),
            acked,
            "device of {user} ({:?})",
            client.session().config().device
        );
    }
    // Both devices of a user hold the same timeline.
    let mut by_user: HashMap<&str, Vec<Vec<u64>>> = HashMap::new();
    for (user, client) in &online {
        let seqs = client.received().iter().map(|e| e.msg_id).collect();
        by_user.entry(user).or_default().push(seqs);
    }
    for (user, timelines) in &by_user {
        assert!(
            timelines.windows(2).all(|w| w[0] == w[1]),
            "devices of {user} disagree"
        );
    }

    // Members offline during the sends catch up from their timelines on login.
    let mut late: Vec<(String, BlockingClient)> = (40..USERS)
        .map(|i| (user_name(i), device(&node, &user_name(i), "tablet")))
        .collect();
    pump_until(&mut late, |c| {
        group_messages(c.received(), group_id).len() >= acked.len()
    });
    for (user, client) in &late {
        assert_eq!(
            group_messages(client.received(), group_id),
            acked,
            "late {user}"
        );
    }

    // The removed member: phase 1 and the record of its removal, nothing after.
    pump_until(std::slice::from_mut(&mut removed_client), |c| {
        c.received().iter().any(|e| {
            e.record
                .as_ref()
                .is_some_and(|r| r.kind == record_kind::MEMBERS_REMOVED)
        })
    });
    let client = &mut removed_client.1;
    assert_eq!(group_messages(client.received(), group_id), phase1);
    let synced = client.sync_all(0).expect("sync");
    assert_eq!(
        group_messages(&synced, group_id),
        phase1,
        "sync returns nothing after removal"
    );
    let removal = synced.last().unwrap();
    assert_eq!(
        removal.record.as_ref().unwrap().kind,
        record_kind::MEMBERS_REMOVED
    );
    match client.history(group_conv(group_id), 0, 0) {
        Err(ClientError::RequestFailed { code, .. }) => {
            assert_eq!(code, ErrorCode::NotMember as u16)
        }
        other => panic!("history of a removed member: {other:?}"),
    }
    match client.group_send(group_id, "still here?") {
        Err(ClientError::RequestFailed { code, .. }) => {
            assert_eq!(code, ErrorCode::NotMember as u16)
        }
        other => panic!("send of a removed member: {other:?}"),
    }
}

fn group_rules_are_enforced(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    add_users(&node, 4);
    let mut owner = device(&node, "u00", "d");
    let mut member = device(&node, "u01", "d");
    let mut outsider = device(&node, "u03", "d");
    let info = owner
        .group_create("rules", &["u01".to_owned(), "u02".to_owned()])
        .unwrap();
    let g = info.group_id;
    fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> u16 {
        match r {
            Err(ClientError::RequestFailed { code, .. }) => code,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // Only the owner removes; members may add; outsiders may do nothing.
    assert_eq!(
        code(member.group_remove(g, &["u02".to_owned()])),
        ErrorCode::NotOwner as u16
    );
    assert_eq!(code(outsider.group_info(g)), ErrorCode::NotMember as u16);
    assert_eq!(
        code(outsider.group_send(g, "hi")),
        ErrorCode::NotMember as u16
    );
    assert_eq!(
        code(outsider.history(group_conv(g), 0, 0)),
        ErrorCode::NotMember as u16
    );
    assert_eq!(
        code(owner.group_info(g + 100)),
        ErrorCode::UnknownGroup as u16
    );
    assert_eq!(
        code(owner.group_add(g, &["nobody".to_owned()])),
        ErrorCode::UnknownUser as u16
    );
    assert_eq!(
        code(owner.group_leave(g)),
        ErrorCode::InvalidArgument as u16
    );
    let added = member.group_add(g, &["u03".to_owned()]).unwrap();
    assert_eq!(added.members.len(), 4);
    // Now a member: the outsider sees the group and may post.
    assert_eq!(outsider.group_info(g).unwrap().members.len(), 4);
    outsider.group_send(g, "hello").unwrap();
    let renamed = outsider.group_rename(g, "renamed").unwrap();
    assert_eq!(renamed.name, "renamed");
    let left = outsider.group_leave(g).unwrap();
    assert_eq!(left.members.len(), 3);
    assert!(outsider.group_list().unwrap().is_empty());
    let listed = member.group_list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].members), ("renamed", 3));
    // The membership history reached every member's timeline.
    let kinds: Vec<u16> = member
        .sync_all(0)
        .unwrap()
        .iter()
        .filter_map(|e| e.record.as_ref().map(|r| r.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            record_kind::GROUP_CREATED,
            record_kind::MEMBERS_ADDED,
            record_kind::GROUP_MESSAGE,
            record_kind::GROUP_RENAMED,
            record_kind::MEMBER_LEFT,
        ]
    );
}

fn refusal<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::RequestFailed { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Audit: once removed (or gone), a member learns nothing of the group's later state from
/// any answer: conversation list (regression: its title showed the name given after the
/// removal), history, group info and list, timeline records, files shared later.
fn a_removed_member_learns_nothing_of_the_group_afterwards(io: Io) {
    let node = TestNode::start(io, &[]);
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        node.add_user(user, PASSWORD);
    }
    let mut alice = device(&node, "alice", "phone");
    let members = ["bob", "carol", "erin"].map(str::to_owned);
    let group = alice.group_create("crew", &members).unwrap().group_id;
    let conv = group_conv(group);
    alice.group_send(group, "before").unwrap();
    let mut carol = device(&node, "carol", "phone");
    let mut erin = device(&node, "erin", "phone");
    alice.group_remove(group, &["carol".to_owned()]).unwrap();
    erin.group_leave(group).unwrap();
    let seen_at_removal: Vec<_> = [&mut carol, &mut erin]
        .map(|c| c.sync_all(0).unwrap().len())
        .into();

    // The group moves on.
    alice.group_rename(group, "secret plans").unwrap();
    alice.group_add(group, &["dave".to_owned()]).unwrap();
    alice.group_send(group, "after").unwrap();
    let file = alice.upload("plan.txt", "text/plain", b"the plan").unwrap();
    alice
        .send_file(None, Some(group), file.file_id, &Default::default())
        .unwrap();

    for (gone, seen) in [
        (&mut carol, seen_at_removal[0]),
        (&mut erin, seen_at_removal[1]),
    ] {
        let page = gone.conversations(0, 0).unwrap();
        let item = page.items.iter().find(|i| i.conv == conv).expect("kept");
        assert_eq!(item.title, "crew", "the name as of the removal");
        assert!(!item.preview.contains("after") && !item.preview.contains("secret"));
        assert_eq!(gone.sync_all(0).unwrap().len(), seen, "no later records");
        assert_eq!(
            refusal(gone.history(conv, 0, 0)),
            ErrorCode::NotMember as u16
        );
        assert_eq!(refusal(gone.group_info(group)), ErrorCode::NotMember as u16);
        assert!(
            gone.group_list()
                .unwrap()
                .iter()
                .all(|g| g.group_id != group)
        );
        let mut got = Vec::new();
        assert_eq!(
            refusal(gone.download(file.file_id, &mut got)),
            ErrorCode::NotMember as u16
        );
        assert_eq!(
            refusal(gone.group_send(group, "still here?")),
            ErrorCode::NotMember as u16
        );
    }
    // Members see the new state.
    let mut bob = device(&node, "bob", "phone");
    let page = bob.conversations(0, 0).unwrap();
    let item = page.items.iter().find(|i| i.conv == conv).unwrap();
    assert_eq!(item.title, "secret plans");
}

io_tests!(
    a_removed_member_learns_nothing_of_the_group_afterwards,
    group_of_50_gets_every_message_once_in_order_and_removed_member_stops_reading,
    group_rules_are_enforced,
);
