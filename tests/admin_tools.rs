//! End-to-end tests of the admin tools run beside a real `tern` node on the same data
//! folder: nothing they do may stop the node serving.

#[macro_use]
mod common;

use common::{Io, TestNode};
use tern::client::ClientConfig;

const PASSWORD: &str = "pw-admin";

fn add_bulk(node: &TestNode, prefix: &str, extra: &[&str]) -> std::process::Output {
    common::tern_command()
        .args(["user", "add-bulk", "--prefix", prefix, "--count", "20000"])
        .args(["--password", PASSWORD, "--data"])
        .arg(&node.data)
        .args(extra)
        .output()
        .expect("run tern user add-bulk")
}

/// alice logs in with her password, sends to bob, and bob syncs it: the node serves.
fn serves(node: &TestNode, text: &str) {
    let config = ClientConfig::new("alice", "phone").with_password(PASSWORD);
    let mut alice = node.client(config);
    alice.connect().expect("alice logs in");
    alice.send("bob", text).expect("send");
    let config = ClientConfig::new("bob", "phone").with_password(PASSWORD);
    let mut bob = node.client(config);
    bob.connect().expect("bob logs in");
    let entries = bob.sync_all(0).expect("sync");
    assert!(entries.iter().any(|e| e.text == text), "bob has {text:?}");
}

/// Regression: `user add-bulk` beside a node started with `--map-size-mib 4` grew the map
/// to its own default, and from then on every login, sync and send of the node failed with
/// `MDB_MAP_RESIZED` until a restart. Now a tool keeps the node's map size (and says the
/// store is full when the users do not fit), and a node whose map another process grew on
/// purpose adopts the new size.
fn user_tools_beside_a_running_node_never_stop_it(io: Io) {
    let node = TestNode::start(io, &["--map-size-mib", "4"]);
    node.add_user("alice", PASSWORD);
    node.add_user("bob", PASSWORD);
    serves(&node, "before");

    let out = add_bulk(&node, "z", &[]);
    assert!(!out.status.success(), "20,000 users do not fit in 4 MiB");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("store full"), "{stderr}");
    serves(&node, "after a tool ran out of room");

    // Asked to, a tool grows the map; the node adopts the new size and goes on.
    let out = add_bulk(&node, "y", &["--map-size-mib", "64"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serves(&node, "after a tool grew the map");
    let config = ClientConfig::new("y19999", "phone").with_password(PASSWORD);
    let mut newcomer = node.client(config);
    newcomer.connect().expect("a bulk user logs in");
    newcomer.send("alice", "hi").expect("and sends");
}

io_tests!(user_tools_beside_a_running_node_never_stop_it);
