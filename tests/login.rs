//! End-to-end tests of logins against a real `tern` node: password checks off the shard
//! threads (a full queue answers `busy`), failed-login throttling per account and per
//! source address, and floods of connections that never log in.

#[macro_use]
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{Io, RawConn, TestNode, wait_until};
use tern::limits::{SHARD_UNAUTHENTICATED_MAX, SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX};
use tern::protocol::{Credential, ErrorCode, Kind, Login};

const PASSWORD: &str = "right-password";

fn ip(a: u8, b: u8) -> IpAddr {
    IpAddr::from([127, 0, a, b])
}

fn password(p: &str) -> Credential {
    Credential::Password(p.to_owned())
}

fn login_from(
    node: &TestNode,
    source: IpAddr,
    user: &str,
    credential: Credential,
) -> Result<tern::protocol::LoginOk, (u16, String)> {
    node.raw_from(source).try_login(user, "dev", credential)
}

/// The wait a `throttled` message states, in ms.
fn stated_wait_ms(message: &str) -> u64 {
    message
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no wait in {message:?}"))
}

/// Guesses wrong passwords for `user`, guess `n` from `source(n)`, waiting out each
/// throttle, until the node states a wait of at least `wait_ms_min`; returns how many
/// guesses it checked (answered `auth_failed`).
fn guess_until_throttled_for(
    node: &TestNode,
    source: impl Fn(u8) -> IpAddr,
    user: &str,
    wait_ms_min: u64,
) -> u32 {
    let mut checked = 0;
    for guess in 0..200u8 {
        match login_from(
            node,
            source(guess),
            user,
            password(&format!("wrong-{guess}")),
        ) {
            Err((code, _)) if code == ErrorCode::AuthFailed as u16 => checked += 1,
            Err((code, message)) if code == ErrorCode::Throttled as u16 => {
                let wait_ms = stated_wait_ms(&message);
                if wait_ms >= wait_ms_min {
                    return checked;
                }
                // Wait this one out: the next guess is checked and doubles the wait.
                std::thread::sleep(Duration::from_millis(wait_ms + 10));
            }
            other => panic!("a wrong password got {other:?}"),
        }
    }
    panic!("never throttled");
}

fn failed_passwords_are_throttled_per_account(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("alice", PASSWORD);
    let token = login_from(&node, ip(0, 1), "alice", password(PASSWORD))
        .expect("first login")
        .token;
    // Each guess from a new address: only the account's record holds them back. The
    // free guesses and one more are checked before the first wait (500 ms), then one
    // after each wait, until the wait has doubled to 4 s. (A `throttled` answer is held
    // for up to 1 s, so it states 3 s.)
    let checked = guess_until_throttled_for(&node, |n| ip(1, n + 1), "alice", 2_500);
    assert_eq!(checked, 7);
    // While the account waits, even the right password is refused, from anywhere, with a
    // code of its own and the wait in the message.
    for source in [ip(3, 1), ip(3, 2)] {
        let (code, message) = login_from(&node, source, "alice", password(PASSWORD))
            .expect_err("a throttled account");
        assert_eq!(code, ErrorCode::Throttled as u16, "{message}");
        assert!(stated_wait_ms(&message) > 0, "{message}");
    }
    // A device with a token is not held back.
    login_from(&node, ip(3, 3), "alice", Credential::Token(token)).expect("token login");
    // Another account is not held back either.
    node.add_user("bob", PASSWORD);
    login_from(&node, ip(3, 4), "bob", password(PASSWORD)).expect("bob's login");
    // Once the wait is over the right password gets in, and the record is forgotten.
    assert!(wait_until(Duration::from_secs(30), || {
        login_from(&node, ip(3, 5), "alice", password(PASSWORD)).is_ok()
    }));
    let (code, _) = login_from(&node, ip(3, 6), "alice", password("wrong")).unwrap_err();
    assert_eq!(
        code,
        ErrorCode::AuthFailed as u16,
        "a success forgets the account's failures"
    );
}

fn failed_logins_are_throttled_per_source_address(io: Io) {
    let node = TestNode::start(io, &[]);
    node.add_user("bob", PASSWORD);
    // Unknown users and wrong passwords of several accounts, all from one address.
    let guesser = ip(4, 1);
    for i in 0..12 {
        let user = if i % 2 == 0 {
            format!("nobody-{i}")
        } else {
            "bob".to_owned()
        };
        let _ = login_from(&node, guesser, &user, password("wrong"));
        if i == 5 {
            // bob gets in meanwhile (from elsewhere), which clears his account's record
            // but not the address's.
            login_from(&node, ip(4, 9), "bob", password(PASSWORD)).expect("bob's login");
        }
    }
    guess_until_throttled_for(&node, |_| guesser, "nobody", 2_500);
    let (code, message) = login_from(&node, guesser, "bob", password(PASSWORD)).unwrap_err();
    assert_eq!(code, ErrorCode::Throttled as u16, "{message}");
    // Everyone else is served.
    login_from(&node, ip(4, 2), "bob", password(PASSWORD)).expect("login from elsewhere");
}

/// A flood of password logins queues at most `LOGIN_HASH_QUEUE_MAX` checks; the rest are
/// answered `busy` at once instead of stalling the shard, and afterwards logins work.
fn a_flood_of_password_logins_gets_busy_answers(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    node.add_user("carol", PASSWORD);
    let mut conns: Vec<RawConn> = (0..200u16)
        .map(|i| {
            let mut conn = node.raw_from(ip(5, i as u8 + 1));
            conn.hello();
            conn
        })
        .collect();
    for (i, conn) in conns.iter_mut().enumerate() {
        let login = Login {
            user: format!("nobody-{i}"),
            device: "dev".into(),
            credential: password("guess"),
        };
        conn.send(Kind::Login, 2, &login);
    }
    let mut busy = 0;
    for conn in &mut conns {
        let (h, p) = conn
            .read_frame(Duration::from_secs(60))
            .expect("every login is answered");
        assert_eq!(h.kind, Kind::Error);
        let e =
            tern::protocol::access::<tern::protocol::ArchivedErrorBody>(Kind::Error, &p).unwrap();
        let code = e.code.to_native();
        assert!(
            code == ErrorCode::AuthFailed as u16 || code == ErrorCode::Busy as u16,
            "code {code}: {}",
            e.message.as_str()
        );
        busy += u32::from(code == ErrorCode::Busy as u16);
    }
    assert!(busy > 0, "200 checks at once cannot all fit the queue");
    login_from(&node, ip(6, 1), "carol", password(PASSWORD)).expect("a login after the flood");
}

/// Whether the node closed `conn` (its output drained): a non-blocking read sees EOF.
fn closed_by_node(conn: &mut RawConn) -> bool {
    use std::io::Read;
    conn.stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match conn.stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    conn.stream.set_nonblocking(false).unwrap();
    closed
}

/// A half-open client: connects, and half of them send three bytes of a header.
fn silent_conn(node: &TestNode, source: IpAddr, i: usize) -> RawConn {
    let mut conn = node.raw_from(source);
    if i % 2 == 1 {
        conn.write_bytes(&[0x20, 0, 0]);
    }
    conn
}

/// Regression: connections that never logged in filled the shard's table and the node
/// stopped accepting, so a real login waited for handshake timeouts. One address now gets
/// a bounded share of the table; the rest of its connections are refused at accept.
fn one_address_cannot_fill_the_table_of_waiting_connections(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    node.add_user("dave", PASSWORD);
    let extra = 40;
    let flooder = ip(7, 1);
    let mut flood: Vec<RawConn> = (0..SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX + extra)
        .map(|i| silent_conn(&node, flooder, i))
        .collect();
    login_from(&node, ip(0, 1), "dave", password(PASSWORD)).expect("a login beside the flood");
    let mut closed = vec![false; flood.len()];
    let mut count = |flood: &mut Vec<RawConn>| {
        for (conn, closed) in flood.iter_mut().zip(closed.iter_mut()) {
            *closed = *closed || closed_by_node(conn);
        }
        closed.iter().filter(|c| **c).count()
    };
    assert!(wait_until(Duration::from_secs(8), || count(&mut flood) >= extra));
    assert_eq!(
        count(&mut flood),
        extra,
        "only the connections past the share are refused"
    );
}

/// A full table of waiting connections (from many addresses) closes its oldest member for
/// each newcomer, so a real client still logs in at once.
fn a_full_table_of_waiting_connections_closes_its_oldest(io: Io) {
    let node = TestNode::start(io, &["--shards", "1"]);
    node.add_user("erin", PASSWORD);
    let per_address = SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX;
    let mut flood: Vec<RawConn> = (0..SHARD_UNAUTHENTICATED_MAX)
        .map(|i| {
            silent_conn(
                &node,
                ip(
                    8 + (i / per_address) as u8 / 250,
                    (i / per_address) as u8 % 250 + 1,
                ),
                i,
            )
        })
        .collect();
    login_from(&node, ip(0, 1), "erin", password(PASSWORD)).expect("a login beside the flood");
    // The login's connection took the place of the oldest waiting one, which was told why.
    let frames = flood[0]
        .read_until_closed(Duration::from_secs(8))
        .expect("the oldest waiting connection is closed");
    let (header, payload) = frames.last().expect("an error before the close");
    assert_eq!(header.kind, Kind::Error);
    let error =
        tern::protocol::access::<tern::protocol::ArchivedErrorBody>(Kind::Error, payload).unwrap();
    assert_eq!(error.code.to_native(), ErrorCode::Timeout as u16);
    assert!(
        !closed_by_node(&mut flood[2]),
        "only as many close as newcomers came"
    );
}

io_tests!(
    one_address_cannot_fill_the_table_of_waiting_connections,
    a_full_table_of_waiting_connections_closes_its_oldest,
    failed_passwords_are_throttled_per_account,
    failed_logins_are_throttled_per_source_address,
    a_flood_of_password_logins_gets_busy_answers,
);
