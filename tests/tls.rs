//! TLS beyond the end-to-end suite's `tls::` variants: refusals, garbage, a TLS port beside
//! the plain one, and resumption.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Io, TestNode, generate_certs, tls_name};
use tern::client::{BlockingClient, ClientConfig, ClientError};
use tern::transport::tls::{HandshakeKind, client_config};

const PASSWORD: &str = "correct horse battery staple";

fn config(user: &str, device: &str) -> ClientConfig {
    ClientConfig::new(user, device).with_password(PASSWORD)
}

#[test]
fn a_client_that_does_not_trust_the_ca_is_refused_cleanly() {
    let node = TestNode::start(Io::EpollTls, &[]);
    node.add_user("alice", PASSWORD);
    let other = tempfile::tempdir().unwrap();
    let other_ca = generate_certs(&other.path().join("certs"), &["127.0.0.1"]).join("ca.pem");

    let mut stranger = BlockingClient::new(node.addr, config("alice", "phone"))
        .with_tls(client_config(&other_ca).unwrap(), tls_name());
    match stranger.connect() {
        Err(ClientError::Offline {
            last_error: Some(why),
        }) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("a client pinning another CA connected: {other:?}"),
    }
    // The CLI says so and fails, without retrying for a minute.
    let out = common::tern_command()
        .args([
            "send",
            "--to",
            "alice",
            "hi",
            "--user",
            "alice",
            "--password",
            PASSWORD,
        ])
        .args(["--server", &node.addr.to_string(), "--tls", "--ca"])
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls handshake"), "{stderr}");
    // A plain client on the TLS port gets nowhere either, and the node serves on.
    let mut plain = BlockingClient::new(node.addr, config("alice", "laptop"))
        .with_operation_timeout(Duration::from_secs(2));
    assert!(plain.connect().is_err());
    let mut alice = node.client(config("alice", "desk"));
    alice
        .connect()
        .expect("a client pinning the node's CA connects");
    alice.send("alice", "note to self").expect("send over TLS");
}

#[test]
fn garbage_on_the_tls_port_is_closed_and_the_node_serves_on() {
    let node = TestNode::start(Io::EpollTls, &[]);
    node.add_user("bob", PASSWORD);
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3][..],
        &[0u8; 4096][..],
    ] {
        let mut stream = std::net::TcpStream::connect(node.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(garbage);
        // An alert, then EOF (or a reset after it): never a hang.
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    assert!(
                        !matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ),
                        "the node kept a garbage connection open"
                    );
                    break;
                }
            }
        }
    }
    let mut bob = node.client(config("bob", "phone"));
    bob.connect().unwrap();
    bob.send("bob", "still here").unwrap();
    let stats = node.stats();
    assert!(
        common::wait_until(Duration::from_secs(10), || node.stats()["connections_open"]
            == 1),
        "{stats:?}"
    );
}

#[test]
fn a_tls_port_beside_the_plain_one_serves_the_same_node() {
    let dir = tempfile::tempdir().unwrap();
    let certs = generate_certs(dir.path(), &["127.0.0.1", "tern.local"]);
    let cert = certs.join("server.pem").display().to_string();
    let key = certs.join("server.key").display().to_string();
    let node = TestNode::start(
        Io::Epoll,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-listen",
            "127.0.0.1:0",
        ],
    );
    let tls_addr = node.tls_addr.expect("the node names its TLS port");
    assert_ne!(tls_addr, node.addr);
    node.add_user("carol", PASSWORD);
    node.add_user("dave", PASSWORD);
    let tls = client_config(&certs.join("ca.pem")).unwrap();
    // By DNS name this time: the certificate carries both names.
    let name = tern::transport::tls::server_name(Some("tern.local"), tls_addr).unwrap();
    let mut carol = BlockingClient::new(tls_addr, config("carol", "phone")).with_tls(tls, name);
    carol.connect().unwrap();
    let mut dave = BlockingClient::new(node.addr, config("dave", "phone"));
    dave.connect().unwrap();
    let acked = carol.send("dave", "over tls").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let got = dave.run_until(
        deadline,
        |e| matches!(e, tern::client::Event::Message(m) if m.text == "over tls"),
    );
    assert!(got, "the plain client got the TLS client's message");
    assert!(acked.seq >= 1);
    // The plain port does not speak TLS.
    let mut confused = BlockingClient::new(node.addr, config("carol", "laptop"))
        .with_tls(client_config(&certs.join("ca.pem")).unwrap(), tls_name());
    assert!(confused.connect().is_err());
}

#[test]
fn a_reconnect_resumes_the_tls_session() {
    let node = TestNode::start(Io::EpollTls, &[]);
    node.add_user("erin", PASSWORD);
    let tls = node.tls_config().unwrap();
    let mut erin =
        BlockingClient::new(node.addr, config("erin", "phone")).with_tls(tls.clone(), tls_name());
    erin.connect().unwrap();
    assert_eq!(erin.tls_handshake_kind(), Some(HandshakeKind::Full));
    // The ticket came after the handshake; a round trip makes sure it was read.
    erin.send("erin", "one").unwrap();
    erin.close();
    erin.connect().unwrap();
    assert_eq!(erin.tls_handshake_kind(), Some(HandshakeKind::Resumed));
    erin.send("erin", "two").unwrap();
    // Another client of the same process (same settings, same ticket cache) resumes too.
    let mut again =
        BlockingClient::new(node.addr, config("erin", "tablet")).with_tls(tls, tls_name());
    again.connect().unwrap();
    assert_eq!(again.tls_handshake_kind(), Some(HandshakeKind::Resumed));
}
