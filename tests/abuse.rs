//! Resource bounds under abuse, on both loops: a device that never reads is cut at its
//! output bound while others are served, and resyncs later with nothing lost or repeated;
//! 10,000 requests pipelined in one write are each answered once, or the connection is cut
//! at the documented output bound; and the node's resident memory (`/proc/PID/status`)
//! stays within a stated bound through each scenario. The memory check is a leak check
//! with a generous margin, not a speed assertion.

#[macro_use]
mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::{Duration, Instant};

use common::{Io, NodeMemory, RawConn, TestNode, error_code, wait_until};
use tern::client::{BlockingClient, ClientConfig, Event, ReceivedMessage};
use tern::limits::{
    CONNECTION_BACKLOG_MAX, FRAME_HEADER_SIZE, LOGIN_HASH_THREADS, SYNC_PAGE_ENTRIES_MAX,
};
use tern::protocol::*;

/// Bound on every wait for the node; a test that hits it fails with what it saw.
const WAIT: Duration = Duration::from_secs(30);
/// Slice of one pump of a blocking client while a condition is polled.
const PUMP_SLICE: Duration = Duration::from_millis(20);

/// Requests pipelined in one write.
const PIPELINED: u32 = 10_000;
/// Request id of the first pipelined request (hello and login use 1 and 2).
const FIRST_ID: u32 = 100;

/// Working memory of one password check (argon2id, `limits::LOGIN_HASH_THREADS`): the
/// node's peak includes it once logins ran.
const PASSWORD_CHECK_BYTES: u64 = 19 << 20;
/// Room over the node's start-up RSS and its password checks for everything these
/// scenarios fill, all of it bounded: the output of a handful of connections (each at most
/// twice `CONNECTION_BACKLOG_MAX` plus a frame, well under 1 MiB), 10,000 queued sends
/// (~300 B each with their text), the writer's batches and journal for ~10,000 messages,
/// and the store's pages mapped while they are read (a few MiB of messages here). That
/// comes to well under 32 MiB; the margin is twice that so allocator slack never trips it.
/// Without the output bound, the pipelined full sync pages alone made the node hold
/// hundreds of MiB.
const RSS_MARGIN_BYTES: u64 = 64 << 20;

const MIB: f64 = (1 << 20) as f64;

/// Asserts the node's peak and current RSS are within the bound stated above.
fn assert_memory_bounded(node: &TestNode, baseline: NodeMemory, scenario: &str) {
    let bound =
        baseline.rss_bytes + LOGIN_HASH_THREADS as u64 * PASSWORD_CHECK_BYTES + RSS_MARGIN_BYTES;
    let now = node.memory();
    eprintln!(
        "{scenario} ({:?}): node RSS at start {:.1} MiB, peak {:.1} MiB, at the end {:.1} MiB, \
         bound {:.1} MiB",
        node.io,
        baseline.rss_bytes as f64 / MIB,
        now.hwm_bytes as f64 / MIB,
        now.rss_bytes as f64 / MIB,
        bound as f64 / MIB,
    );
    assert!(
        now.hwm_bytes <= bound,
        "{scenario}: the node's peak RSS {:.1} MiB is over its bound {:.1} MiB",
        now.hwm_bytes as f64 / MIB,
        bound as f64 / MIB
    );
    assert!(
        now.rss_bytes <= bound,
        "{scenario}: the node's RSS {:.1} MiB is over its bound {:.1} MiB",
        now.rss_bytes as f64 / MIB,
        bound as f64 / MIB
    );
}

fn client(node: &TestNode, user: &str, device: &str) -> BlockingClient {
    let config = ClientConfig::new(user, device).with_password("pw");
    let mut client = BlockingClient::new(node.addr, config);
    client.connect().expect("connect and log in");
    client
}

/// Queues every text from `client` to `to` and waits for all the acks; the client must
/// stay connected throughout.
fn send_all(client: &mut BlockingClient, to: &str, texts: &[String]) {
    let ids: Vec<u64> = texts
        .iter()
        .map(|text| client.send_nowait(to, text).expect("queue a send"))
        .collect();
    let mut acked = 0;
    let done = client.run_until(Instant::now() + WAIT, |event| {
        match event {
            Event::SendAcked { client_msg_id, .. } if ids.contains(client_msg_id) => acked += 1,
            Event::SendFailed { code, message, .. } => panic!("send refused ({code}): {message}"),
            Event::Disconnected { reason } => panic!("the sender lost its connection: {reason}"),
            _ => {}
        }
        acked == ids.len()
    });
    assert!(done, "{acked} of {} sends acked within {WAIT:?}", ids.len());
}

/// Pumps `client` until `got` holds `count` messages; the client must stay connected.
fn receive_until(client: &mut BlockingClient, count: usize, got: &mut Vec<ReceivedMessage>) {
    let deadline = Instant::now() + WAIT;
    while got.len() < count && Instant::now() < deadline {
        client.run_until((Instant::now() + PUMP_SLICE).min(deadline), |event| {
            if let Event::Disconnected { reason } = event {
                panic!("a reading device lost its connection: {reason}");
            }
            false
        });
        got.extend(client.take_received());
    }
    assert_eq!(got.len(), count, "messages received within {WAIT:?}");
    assert_eq!(client.received_overflow(), 0);
}

/// Asserts `got` is the timeline `1..=texts.len()` carrying `texts` in order: every
/// message exactly once, in seq order, no gap.
fn assert_timeline(got: &[ReceivedMessage], texts: &[String]) {
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    let expected: Vec<u64> = (1..=texts.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs not 1..={} in order", texts.len());
    for (m, text) in got.iter().zip(texts) {
        assert_eq!(&m.text, text, "seq {}", m.seq);
    }
}

/// Writes `bytes` on a clone of `conn`'s socket from another thread, so the test can read
/// the answers while the node is still taking the requests.
fn write_in_background(conn: &RawConn, bytes: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut stream = conn.stream.try_clone().expect("clone the socket");
    std::thread::spawn(move || {
        // Fails once the node has closed the connection; the reader checks what it saw.
        let _ = stream.write_all(&bytes);
    })
}

/// Waits (bounded) for the writer thread: the node must take or refuse all its bytes.
fn join_writer(writer: std::thread::JoinHandle<()>) {
    assert!(
        wait_until(WAIT, || writer.is_finished()),
        "the node neither read nor refused the pipelined requests within {WAIT:?}"
    );
    writer.join().expect("writer thread");
}

/// Text of each message to the stalled device: 1 KiB, so a few hundred exceed its output
/// bound together with what the sockets buffer.
const STALL_TEXT_SIZE: usize = 1024;
/// Sends queued at once by the sender.
const SEND_BATCH: usize = 64;
/// Most messages sent while waiting for the node to cut the stalled device: 16 MiB of
/// pushes. The kernel buffers much of what the node writes before the node's own backlog
/// grows (on this box, with `tcp_wmem` up to 4 MiB, the cut came after ~3,900 messages),
/// so this leaves four times that.
const STALL_MESSAGES_MAX: usize = 16 * 1024;
/// Messages sent after the cut, which must be acked as before.
const AFTER_CUT_MESSAGES: usize = 2 * SEND_BATCH;

fn texts(first: usize, count: usize, size: usize) -> Vec<String> {
    (first..first + count)
        .map(|i| {
            let label = format!("message {i} ");
            format!("{label}{}", "x".repeat(size.saturating_sub(label.len())))
        })
        .collect()
}

fn a_device_that_never_reads_is_cut_at_its_backlog_bound_and_resyncs(io: Io) {
    let node = TestNode::start(io, &["--shards", "2", "--durability", "none"]);
    let baseline = node.memory();
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut alice = client(&node, "alice", "phone");
    let mut laptop = client(&node, "bob", "laptop");
    // Logs in and syncs, then does not read its socket until the end of the test.
    let mut stalled = client(&node, "bob", "phone");
    assert_eq!(node.stats()["connections_open"], 3);

    let mut sent: Vec<String> = Vec::new();
    let mut laptop_got = Vec::new();
    loop {
        let open = node.stats()["connections_open"];
        if open == 2 {
            break;
        }
        assert_eq!(open, 3, "a connection besides the stalled one changed");
        assert!(
            sent.len() < STALL_MESSAGES_MAX,
            "the node never cut a device that does not read, after {} messages of {} B",
            sent.len(),
            STALL_TEXT_SIZE
        );
        let batch = texts(sent.len(), SEND_BATCH, STALL_TEXT_SIZE);
        send_all(&mut alice, "bob", &batch);
        sent.extend(batch);
        // The other device reads as it goes and keeps up.
        receive_until(&mut laptop, sent.len(), &mut laptop_got);
    }
    let sent_before_cut = sent.len();
    eprintln!(
        "stalled reader ({io:?}): cut after {sent_before_cut} messages of {STALL_TEXT_SIZE} B"
    );
    assert!(
        sent_before_cut * STALL_TEXT_SIZE > CONNECTION_BACKLOG_MAX,
        "cut after {sent_before_cut} messages: less than the output bound was sent"
    );

    // Others are unaffected: sends are acked and the reading device gets them.
    let batch = texts(sent.len(), AFTER_CUT_MESSAGES, STALL_TEXT_SIZE);
    send_all(&mut alice, "bob", &batch);
    sent.extend(batch);
    receive_until(&mut laptop, sent.len(), &mut laptop_got);
    assert_timeline(&laptop_got, &sent);

    // The stalled device reads again: what its socket still held, then the close, then a
    // reconnect and a sync of the rest.
    let mut stalled_got = Vec::new();
    let mut disconnected = false;
    let deadline = Instant::now() + WAIT;
    while stalled_got.len() < sent.len() && Instant::now() < deadline {
        stalled.run_until((Instant::now() + PUMP_SLICE).min(deadline), |event| {
            disconnected |= matches!(event, Event::Disconnected { .. });
            false
        });
        stalled_got.extend(stalled.take_received());
    }
    assert!(
        disconnected,
        "the stalled device never saw its connection cut"
    );
    assert_eq!(stalled.received_overflow(), 0);
    assert_eq!(
        stalled_got.len(),
        sent.len(),
        "messages the stalled device got within {WAIT:?} after it read again"
    );
    assert_timeline(&stalled_got, &sent);
    assert_eq!(node.stats()["connections_open"], 3, "it reconnected");

    assert_memory_bounded(&node, baseline, "stalled reader");
}

fn pipelined_requests_are_each_answered_once_or_cut_at_the_output_bound(io: Io) {
    let node = TestNode::start(io, &["--shards", "2", "--durability", "none"]);
    let baseline = node.memory();
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut conn = RawConn::connect(node.addr);
    conn.login("alice", "pw", "phone");

    // Pings: their answers together fit the output bound even if the kernel took none of
    // them, so each is answered, in order.
    let mut pings = Vec::new();
    for i in 0..PIPELINED {
        encode(
            &mut pings,
            Kind::Ping,
            FIRST_ID + i,
            &Ping {
                nonce: u64::from(i),
            },
        );
    }
    let mut pong = Vec::new();
    encode(&mut pong, Kind::Pong, FIRST_ID, &Pong { nonce: 0 });
    assert!(pong.len() * PIPELINED as usize <= CONNECTION_BACKLOG_MAX);
    let writer = write_in_background(&conn, pings);
    for i in 0..PIPELINED {
        let (header, payload) = conn.read_frame(WAIT).unwrap_or_else(|| {
            panic!(
                "pong {i} of {PIPELINED} missing (connection closed: {})",
                conn.is_closed()
            )
        });
        assert_eq!((header.kind, header.request_id), (Kind::Pong, FIRST_ID + i));
        let pong = access::<ArchivedPong>(Kind::Pong, &payload).expect("pong body");
        assert_eq!(pong.nonce.to_native(), u64::from(i));
    }
    join_writer(writer);

    // Sends: past `CONNECTION_INFLIGHT_MAX` awaiting commit each is refused `busy`. Every
    // request gets one answer, unless the answers and pushes waiting for this connection
    // pass the output bound, which closes it without a frame (docs/protocol.md §6). Which
    // one happens depends on how much the node reads in one turn and how much of its
    // output the kernel takes at once: epoll's writes mostly go straight to the socket,
    // while io_uring counts a turn's output until its send completes, so a turn that
    // refuses thousands of sends passes the bound there.
    let mut sends = Vec::new();
    for i in 0..PIPELINED {
        encode(
            &mut sends,
            Kind::Send,
            FIRST_ID + i,
            &Send {
                to: "bob".into(),
                client_msg_id: u64::from(i) + 1,
                text: format!("pipelined {i}"),
            },
        );
    }
    let writer = write_in_background(&conn, sends);
    // Index of the request → msg id for an ack, None for `busy`.
    let mut answers: BTreeMap<u32, Option<u64>> = BTreeMap::new();
    while answers.len() < PIPELINED as usize {
        let Some((header, payload)) = conn.read_frame(WAIT) else {
            assert!(
                conn.is_closed(),
                "the node went silent with {} of {PIPELINED} sends answered",
                answers.len()
            );
            break;
        };
        let answer = match header.kind {
            // The sender's own timeline gained the entry.
            Kind::Push => continue,
            Kind::SendAck => {
                let ack = access::<ArchivedSendAck>(Kind::SendAck, &payload).expect("ack body");
                Some(ack.msg_id.to_native())
            }
            Kind::Error => {
                assert_eq!(
                    error_code(&payload),
                    ErrorCode::Busy as u16,
                    "request {} refused",
                    header.request_id
                );
                None
            }
            other => panic!("unexpected answer to a send: {other:?}"),
        };
        let index = header
            .request_id
            .checked_sub(FIRST_ID)
            .filter(|index| *index < PIPELINED)
            .unwrap_or_else(|| panic!("an answer to request {}, never sent", header.request_id));
        assert!(
            answers.insert(index, answer).is_none(),
            "request {} answered twice",
            header.request_id
        );
    }
    join_writer(writer);
    let busy = answers.values().filter(|a| a.is_none()).count();
    eprintln!(
        "{PIPELINED} pipelined sends ({io:?}): {} answered ({busy} busy){}",
        answers.len(),
        if conn.is_closed() {
            ", then cut at the output bound"
        } else {
            ""
        }
    );

    // What was acked is stored once, in request order; nothing refused is stored.
    let mut bob = client(&node, "bob", "phone");
    let timeline = bob.sync_all(0).expect("bob's timeline");
    let stored: Vec<(u32, u64)> = timeline
        .iter()
        .map(|m| {
            let index = m
                .text
                .strip_prefix("pipelined ")
                .and_then(|i| i.parse().ok())
                .unwrap_or_else(|| panic!("unexpected message {:?}", m.text));
            (index, m.msg_id)
        })
        .collect();
    for (i, m) in timeline.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "bob's timeline has a gap");
    }
    assert!(
        stored.windows(2).all(|w| w[0].0 < w[1].0),
        "stored out of order or twice"
    );
    let stored: HashMap<u32, u64> = stored.into_iter().collect();
    for (index, answer) in &answers {
        match answer {
            Some(msg_id) => assert_eq!(stored.get(index), Some(msg_id), "acked send {index}"),
            None => assert!(
                !stored.contains_key(index),
                "send {index} refused yet stored"
            ),
        }
    }

    // The node serves the same user as before.
    let mut alice = client(&node, "alice", "laptop");
    alice.send("bob", "after the pipeline").expect("ack");

    assert_memory_bounded(&node, baseline, "pipelined requests");
}

/// Messages in the timeline the pipelined syncs read: more than a page, so every answer
/// is a full page of `SYNC_PAGE_ENTRIES_MAX` entries.
const TIMELINE_MESSAGES: usize = 300;
/// Text size that makes a full page ~50 KiB, each answer ~2,000 times its request.
const PAGE_TEXT_SIZE: usize = 150;

fn pipelined_syncs_of_full_pages_are_cut_at_the_output_bound(io: Io) {
    let node = TestNode::start(io, &["--shards", "2", "--durability", "none"]);
    let baseline = node.memory();
    node.add_user("alice", "pw");
    node.add_user("bob", "pw");
    let mut alice = client(&node, "alice", "phone");
    let sent = texts(0, TIMELINE_MESSAGES, PAGE_TEXT_SIZE);
    for batch in sent.chunks(SEND_BATCH) {
        send_all(&mut alice, "bob", batch);
    }

    let mut conn = RawConn::connect(node.addr);
    conn.login("bob", "pw", "phone");
    let sync = Sync {
        after_seq: 0,
        limit: 0,
    };
    // One sync first, answered alone: it also brings the derived tables up to date, so the
    // pipelined ones all read at once.
    conn.send(Kind::Sync, FIRST_ID - 1, &sync);
    let (header, payload) = conn.read_frame(WAIT).expect("sync page");
    assert_eq!(
        (header.kind, header.request_id),
        (Kind::SyncPage, FIRST_ID - 1)
    );
    let page = access::<ArchivedSyncPage>(Kind::SyncPage, &payload).expect("page body");
    assert_eq!(page.entries.len(), SYNC_PAGE_ENTRIES_MAX as usize);
    let page_size = FRAME_HEADER_SIZE + payload.len();
    // All the answers would be ~2,000 times the bound.
    assert!(page_size * PIPELINED as usize > 1000 * CONNECTION_BACKLOG_MAX);

    let mut syncs = Vec::new();
    for i in 0..PIPELINED {
        encode(&mut syncs, Kind::Sync, FIRST_ID + i, &sync);
    }
    let writer = write_in_background(&conn, syncs);
    let frames = conn
        .read_until_closed(WAIT)
        .expect("the node kept a connection whose answers are far over its output bound");
    join_writer(writer);
    // What came before the cut: full pages answering the first requests, in order, and no
    // error frame (the cut is silent, docs/protocol.md §6).
    assert!(frames.len() < PIPELINED as usize);
    for (i, (header, payload)) in frames.iter().enumerate() {
        assert_eq!(
            (header.kind, header.request_id),
            (Kind::SyncPage, FIRST_ID + i as u32)
        );
        assert_eq!(payload.len() + FRAME_HEADER_SIZE, page_size);
    }
    eprintln!(
        "{PIPELINED} pipelined syncs of {page_size} B pages ({io:?}): {} answered, then cut",
        frames.len()
    );

    assert_memory_bounded(&node, baseline, "pipelined syncs");

    // The user is served as before: a fresh device reads the whole timeline.
    let mut laptop = client(&node, "bob", "laptop");
    assert_timeline(&laptop.sync_all(0).expect("bob's timeline"), &sent);
}

plain_io_tests!(
    a_device_that_never_reads_is_cut_at_its_backlog_bound_and_resyncs,
    pipelined_requests_are_each_answered_once_or_cut_at_the_output_bound,
    pipelined_syncs_of_full_pages_are_cut_at_the_output_bound,
);
