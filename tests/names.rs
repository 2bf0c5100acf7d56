//! End-to-end tests of the naming rules against a real `tern` node and its admin tool: user
//! names are NFC and unique ignoring case; user, device and group names may not start or
//! end with whitespace or hold control characters.

#[macro_use]
mod common;

use common::{Io, TestNode};
use tern::client::{ClientConfig, ClientError};
use tern::protocol::{Credential, ErrorCode};

const PASSWORD: &str = "pw-names";

fn user_add(node: &TestNode, name: &str) -> std::process::Output {
    common::tern_command()
        .args(["user", "add", name, "--password", PASSWORD, "--data"])
        .arg(&node.data)
        .output()
        .expect("run tern user add")
}

/// Regression: `user add` accepted ` bob`, `BOB` and two Unicode encodings of one accented
/// name as separate accounts that look identical, and a group could be named with spaces.
fn names_that_look_alike_are_one_name_or_refused(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("bob", PASSWORD);
    node.add_user("Jos\u{e9}", PASSWORD);
    for (name, why) in [
        (" bob", "whitespace"),
        ("bob ", "whitespace"),
        ("BOB", "exists"),
        ("Jose\u{301}", "exists"),
        ("jos\u{c9}", "exists"),
        ("bo\u{7}b", "control"),
    ] {
        let out = user_add(&node, name);
        assert!(!out.status.success(), "{name:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(why), "{name:?}: {stderr}");
    }

    // A login or a recipient may be spelled in any case or encoding: one account.
    let bob = node
        .raw()
        .try_login("bob", "phone", Credential::Password(PASSWORD.into()))
        .unwrap();
    let as_upper = node
        .raw()
        .try_login("BOB", "laptop", Credential::Password(PASSWORD.into()))
        .unwrap();
    assert_eq!(as_upper.user_id, bob.user_id);
    let jose = node
        .raw()
        .try_login(
            "Jose\u{301}",
            "phone",
            Credential::Password(PASSWORD.into()),
        )
        .unwrap();
    let config = ClientConfig::new("jos\u{e9}", "tablet").with_password(PASSWORD);
    let mut client = node.client(config);
    client.connect().unwrap();
    client.send("BoB", "hello").unwrap();
    let entries = client.sync_all(0).unwrap();
    let message = entries
        .iter()
        .find(|e| e.record.is_none())
        .expect("the sent message");
    // Names are shown as stored.
    assert_eq!(
        (message.from.as_str(), message.to.as_str()),
        ("Jos\u{e9}", "bob")
    );
    assert_eq!(message.from_id, jose.user_id);

    // Device names follow the rules too.
    let (code, message) = node
        .raw()
        .try_login("bob", " phone", Credential::Password(PASSWORD.into()))
        .unwrap_err();
    assert_eq!(code, ErrorCode::AuthFailed as u16);
    assert!(message.contains("whitespace"), "{message}");

    // Group names: no blank or padded names, no control characters.
    for name in ["   ", " team", "team\t", "te\u{0}am"] {
        match client.group_create(name, &[]) {
            Err(ClientError::RequestFailed { code, .. }) => {
                assert_eq!(code, ErrorCode::InvalidArgument as u16, "{name:?}")
            }
            other => panic!("group {name:?}: {other:?}"),
        }
    }
    let group = client.group_create("Cafe\u{301} crew", &[]).unwrap();
    assert_eq!(group.name, "Caf\u{e9} crew", "stored in NFC");
}

io_tests!(names_that_look_alike_are_one_name_or_refused);
