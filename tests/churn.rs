//! Connection churn on both loops: thousands of connects and disconnects, half-closed
//! peers and peers that vanish mid-frame leave no connection slot, buffer or backlog
//! behind (checked through the node's SIGUSR1 stats line).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::{Io, TestNode, wait_until};
use tern::protocol::*;

const CONNECTIONS: usize = 3000;
/// Connections open at once: keeps this process's descriptors far below its limit.
const WAVE: usize = 200;

/// How a churned connection behaves.
#[derive(Clone, Copy)]
enum Peer {
    /// Connects and closes without a byte.
    Silent,
    /// Says hello and closes without reading the answer.
    HelloAndGone,
    /// Says hello and half-closes; keeps reading until the node closes.
    HalfClosed,
    /// Sends a hello and half of a ping frame, then resets the connection.
    ResetMidFrame,
    /// Sends part of a frame header and closes.
    ClosedMidHeader,
}

const PEERS: [Peer; 5] = [
    Peer::Silent,
    Peer::HelloAndGone,
    Peer::HalfClosed,
    Peer::ResetMidFrame,
    Peer::ClosedMidHeader,
];

fn churn_leaves_no_slots_buffers_or_backlog(io: Io) {
    let node = TestNode::start(io, &["--shards", "2"]);
    let mut hello = Vec::new();
    encode(
        &mut hello,
        Kind::Hello,
        1,
        &Hello {
            protocol_version: PROTOCOL_VERSION,
            client: "churn".into(),
        },
    );
    let mut ping = Vec::new();
    encode(&mut ping, Kind::Ping, 2, &Ping { nonce: 7 });

    let mut half_closed_seen_closing = 0;
    for wave in 0..CONNECTIONS / WAVE {
        let mut open = Vec::with_capacity(WAVE);
        for i in 0..WAVE {
            let peer = PEERS[(wave * WAVE + i) % PEERS.len()];
            let mut stream = TcpStream::connect(node.addr).expect("connect");
            // Writes may fail once the node has closed; what matters is what it keeps.
            match peer {
                Peer::Silent => {}
                Peer::HelloAndGone => {
                    let _ = stream.write_all(&hello);
                }
                Peer::HalfClosed => {
                    let _ = stream.write_all(&hello);
                    let _ = stream.shutdown(Shutdown::Write);
                }
                Peer::ResetMidFrame => {
                    let _ = stream.write_all(&hello);
                    let _ = stream.write_all(&ping[..ping.len() / 2]);
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
                Peer::ClosedMidHeader => {
                    let _ = stream.write_all(&hello[..5]);
                }
            }
            open.push((peer, stream));
        }
        for (peer, mut stream) in open {
            if let Peer::HalfClosed = peer {
                // The node must close its side after reading our FIN.
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                        Ok(_) => {}
                    }
                }
                half_closed_seen_closing += 1;
            }
        }
    }
    assert_eq!(half_closed_seen_closing, CONNECTIONS / PEERS.len());

    let mut stats = node.stats();
    let settled = wait_until(Duration::from_secs(15), || {
        stats = node.stats();
        stats["connections_open"] == 0 && stats["connections_closing"] == 0
    });
    assert!(settled, "connections left behind: {stats:?}");
    assert_eq!(stats["accepted_total"], stats["closed_total"], "{stats:?}");
    // Every connection but the reset ones (which may die in the accept queue) was
    // accepted: the churn really ran.
    assert!(
        stats["accepted_total"] >= (CONNECTIONS * 4 / 5) as u64,
        "{stats:?}"
    );
    assert_eq!(stats["backlog_bytes"], 0, "{stats:?}");
    assert_eq!(stats["write_buffers"], 0, "{stats:?}");
    assert_eq!(stats["read_buffers_held"], 0, "{stats:?}");

    // And the node still serves.
    let mut conn = node.raw();
    conn.hello();
}

io_tests!(churn_leaves_no_slots_buffers_or_backlog);
