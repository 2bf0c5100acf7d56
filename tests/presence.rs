//! End-to-end tests of presence and typing indicators against a real `tern` node with two
//! shards.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Io, TestNode};
use tern::client::{BlockingClient, ClientConfig, Event};
use tern::protocol::group_conv;

const PASSWORD: &str = "pw-presence";
/// Bound on waiting for a push; the loops stop as soon as it arrived.
const WAIT: Duration = Duration::from_secs(30);

type Seen = Arc<Mutex<Vec<Event>>>;

/// A logged-in device whose presence and typing events are collected in `Seen`.
fn device(node: &TestNode, user: &str, device: &str) -> (BlockingClient, Seen) {
    let seen: Seen = Arc::default();
    let sink = Arc::clone(&seen);
    let config = ClientConfig::new(user, device).with_password(PASSWORD);
    let mut client = node.client(config).with_listener(move |e: &Event| {
        if matches!(e, Event::Presence { .. } | Event::Typing { .. }) {
            sink.lock().unwrap().push(e.clone());
        }
    });
    client.connect().expect("connect");
    (client, seen)
}

/// Pumps until `seen` holds `count` events, or the bound passes.
fn wait_for(client: &mut BlockingClient, seen: &Seen, count: usize) -> Vec<Event> {
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().len() < count && Instant::now() < deadline {
        client.pump(Instant::now() + Duration::from_millis(20));
    }
    seen.lock().unwrap().clone()
}

fn presence(events: &[Event]) -> Vec<(u64, bool)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Presence {
                user_id, online, ..
            } => Some((*user_id, *online)),
            _ => None,
        })
        .collect()
}

fn presence_changes_reach_subscribers(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let (mut alice, seen) = device(&node, "alice", "phone");
    let watched = ["bob".to_owned(), "carol".to_owned()];
    let now = alice.presence_subscribe(&watched).unwrap();
    assert_eq!(now.len(), 2);
    assert!(now.iter().all(|p| !p.online));

    let (mut bob_phone, _) = device(&node, "bob", "phone");
    let bob_id = bob_phone.session().user_id().unwrap();
    assert_eq!(presence(&wait_for(&mut alice, &seen, 1)), [(bob_id, true)]);
    // A second device is no change; only the last one leaving is.
    let (mut bob_laptop, _) = device(&node, "bob", "laptop");
    bob_phone.close();
    let state = alice.presence_query(&["bob".to_owned()]).unwrap();
    assert!(state[0].online, "bob still has his laptop");
    bob_laptop.close();
    let events = wait_for(&mut alice, &seen, 2);
    assert_eq!(presence(&events), [(bob_id, true), (bob_id, false)]);
    let versions: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Presence { version, .. } => Some(*version),
            _ => None,
        })
        .collect();
    assert!(versions[0] < versions[1]);
    // Unwatched users are not reported: watch carol only, then bob comes and goes.
    alice.presence_subscribe(&["carol".to_owned()]).unwrap();
    let (mut bob_again, _) = device(&node, "bob", "phone");
    bob_again.close();
    let (_carol, _) = device(&node, "carol", "phone");
    let events = wait_for(&mut alice, &seen, 3);
    let carol_id = events
        .iter()
        .find_map(|e| match e {
            Event::Presence { user_id, .. } if *user_id != bob_id => Some(*user_id),
            _ => None,
        })
        .expect("carol's login reported");
    assert_eq!(
        presence(&events),
        [(bob_id, true), (bob_id, false), (carol_id, true)]
    );
}

fn typing_indicators_reach_the_other_side_and_are_not_stored(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    for user in ["alice", "bob", "carol"] {
        node.add_user(user, PASSWORD);
    }
    let (mut alice, _) = device(&node, "alice", "phone");
    let (mut bob, bob_seen) = device(&node, "bob", "phone");
    let (mut carol, carol_seen) = device(&node, "carol", "phone");
    let alice_id = alice.session().user_id().unwrap();
    let bob_id = bob.session().user_id().unwrap();
    alice.typing(bob_id).unwrap();
    let events = wait_for(&mut bob, &bob_seen, 1);
    assert_eq!(
        events,
        [Event::Typing {
            conv: alice_id,
            from_id: alice_id,
            from: "alice".to_owned()
        }]
    );
    // In a group, every other member hears it.
    let group = bob.group_create("typists", &["alice".to_owned(), "carol".to_owned()]);
    let conv = group_conv(group.unwrap().group_id);
    // One indicator per second per connection: the group one goes from alice's laptop.
    let (mut alice_laptop, _) = device(&node, "alice", "laptop");
    alice_laptop.typing(conv).unwrap();
    let events = wait_for(&mut carol, &carol_seen, 1);
    assert!(
        matches!(&events[..], [Event::Typing { conv: c, from_id, .. }] if *c == conv && *from_id == alice_id)
    );
    let events = wait_for(&mut bob, &bob_seen, 2);
    assert!(matches!(&events[1], Event::Typing { conv: c, .. } if *c == conv));
    // Nothing of it is in anyone's timeline beyond the group's creation.
    assert_eq!(carol.sync_all(0).unwrap().len(), 1);
}

io_tests!(
    presence_changes_reach_subscribers,
    typing_indicators_reach_the_other_side_and_are_not_stored,
);
