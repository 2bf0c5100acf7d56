//! End-to-end tests of revocation against a real `tern` node: logout, password change and
//! device revoke make the tokens they cover fail at the next login and close the live
//! connections they cover with `Kicked { code: revoked }`.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Io, RawConn, TestNode};
use tern::client::{BlockingClient, ClientConfig, ClientError};
use tern::protocol::{ArchivedKicked, Credential, ErrorCode, Kind, access};

const PASSWORD: &str = "pw-account";

fn login(node: &TestNode, device: &str, credential: Credential) -> Result<RawConn, u16> {
    let mut conn = node.raw();
    match conn.try_login("alice", device, credential) {
        Ok(_) => Ok(conn),
        Err((code, _)) => Err(code),
    }
}

fn token(node: &TestNode, device: &str) -> (RawConn, String) {
    let mut conn = node.raw();
    let ok = conn
        .try_login("alice", device, Credential::Password(PASSWORD.into()))
        .expect("password login");
    (conn, ok.token)
}

fn client(node: &TestNode, device: &str, password: &str) -> BlockingClient {
    let config = ClientConfig::new("alice", device).with_password(password);
    let mut client = node.client(config);
    client.connect().expect("connect");
    client
}

/// The node closes `conn` with `Kicked { code: revoked }`.
fn assert_revoked(conn: &mut RawConn) {
    let frames = conn
        .read_until_closed(Duration::from_secs(10))
        .expect("the connection is closed");
    let (header, payload) = frames.last().expect("a Kicked frame before the close");
    assert_eq!(header.kind, Kind::Kicked);
    let kicked = access::<ArchivedKicked>(Kind::Kicked, payload).unwrap();
    assert_eq!(kicked.code.to_native(), ErrorCode::Revoked as u16);
}

/// Regression: there was no logout; a token stayed valid for 30 days whatever happened.
fn logout_revokes_this_device_only(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("alice", PASSWORD);
    let (_, phone_token) = token(&node, "phone");
    let (mut laptop, laptop_token) = token(&node, "laptop");
    // A token is bound to its device.
    assert_eq!(
        login(&node, "tablet", Credential::Token(laptop_token.clone())).err(),
        Some(ErrorCode::AuthFailed as u16)
    );

    let mut phone = client(&node, "phone", PASSWORD);
    phone.logout(false).expect("logout");
    assert_eq!(
        login(&node, "phone", Credential::Token(phone_token)).err(),
        Some(ErrorCode::AuthFailed as u16),
        "the logged-out device's token fails"
    );
    // The other device is untouched: its connection stays, its token works.
    laptop.send(Kind::Ping, 9, &tern::protocol::Ping { nonce: 1 });
    let (header, _) = laptop.read_frame(Duration::from_secs(10)).expect("pong");
    assert_eq!(header.kind, Kind::Pong);
    drop(laptop);
    login(&node, "laptop", Credential::Token(laptop_token)).expect("laptop token");
    // The password logs the phone in again, with a working token.
    let (_, fresh) = token(&node, "phone");
    login(&node, "phone", Credential::Token(fresh)).expect("fresh token");

    // Logout everywhere: every device's token fails, every connection is closed.
    let (mut laptop, laptop_token) = token(&node, "laptop");
    let mut phone = client(&node, "phone", PASSWORD);
    phone.logout(true).expect("logout everywhere");
    assert_revoked(&mut laptop);
    assert_eq!(
        login(&node, "laptop", Credential::Token(laptop_token)).err(),
        Some(ErrorCode::AuthFailed as u16)
    );
}

/// Regression: a password could not be changed; now a change revokes every token and
/// closes every connection of the user.
fn password_change_revokes_every_token(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("alice", PASSWORD);
    let (mut phone, phone_token) = token(&node, "phone");
    let mut cli = client(&node, "cli", PASSWORD);
    match cli.change_password("not-the-password", "new-password") {
        Err(ClientError::AuthFailed { code, .. }) => assert_eq!(code, ErrorCode::AuthFailed as u16),
        other => panic!("a wrong old password: {other:?}"),
    }
    let mut cli = client(&node, "cli", PASSWORD);
    cli.change_password(PASSWORD, "new-password")
        .expect("change");
    assert_revoked(&mut phone);
    assert_eq!(
        login(&node, "phone", Credential::Token(phone_token)).err(),
        Some(ErrorCode::AuthFailed as u16)
    );
    assert_eq!(
        login(&node, "phone", Credential::Password(PASSWORD.into())).err(),
        Some(ErrorCode::AuthFailed as u16)
    );
    login(&node, "phone", Credential::Password("new-password".into())).expect("new password");
}

/// Devices can be listed and one revoked from another.
fn a_device_is_listed_and_revoked_from_another(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("alice", PASSWORD);
    let (mut phone, phone_token) = token(&node, "phone");
    let mut laptop = client(&node, "laptop", PASSWORD);
    let devices = laptop.devices(None).unwrap();
    let names: Vec<(&str, bool, bool)> = devices
        .iter()
        .map(|d| (d.name.as_str(), d.online, d.current))
        .collect();
    assert_eq!(names, [("laptop", true, true), ("phone", true, false)]);

    let left = laptop.devices(Some("phone")).unwrap();
    assert_revoked(&mut phone);
    assert_eq!(
        login(&node, "phone", Credential::Token(phone_token)).err(),
        Some(ErrorCode::AuthFailed as u16)
    );
    let phone_item = left
        .iter()
        .find(|d| d.name == "phone")
        .expect("still known");
    assert!(!phone_item.online);
    // The revoking device goes on.
    assert!(laptop.devices(None).is_ok());
}

io_tests!(
    logout_revokes_this_device_only,
    password_change_revokes_every_token,
    a_device_is_listed_and_revoked_from_another,
);
