//! Store and writer tests against real LMDB environments in temporary directories.
//!
//! Batching is made deterministic without timing: a gated sink blocks the writer inside
//! its first `committed` call, the test queues ops meanwhile, then opens the gate, so the
//! queued ops provably form the next batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tempfile::TempDir;

use super::schema::{self, META_SCHEMA_VERSION};
use super::*;
use crate::ids::{ConnId, ShardId, UserId};
use crate::limits::{SYNC_PAGE_BYTES_MAX, USER_NAME_SIZE_MAX, WRITER_BATCH_MAX, WRITER_QUEUE_MAX};
use crate::protocol::{ErrorCode, Message, SendAck};

/// Guard against a hung writer failing a test by hanging forever. Never reached when the
/// code works; not a wait for a condition.
const RESULT_TIMEOUT: Duration = Duration::from_secs(60);

const MIB: usize = 1 << 20;

struct TestSink {
    results: Sender<OpResult>,
    deliveries: Sender<Delivery>,
    /// Number of send results of each `committed` call.
    batch_sizes: Sender<usize>,
    /// Signalled on entry to each `committed` call.
    entered: Sender<()>,
    /// While set, each call waits for a message on it; once its sender is dropped the sink
    /// stops waiting for good.
    gate: Option<Receiver<()>>,
}

impl CommitSink for TestSink {
    fn committed(&mut self, results: &mut Vec<OpResult>, deliveries: &mut Vec<Delivery>) {
        let _ = self.entered.send(());
        if let Some(gate) = &self.gate
            && gate.recv().is_err()
        {
            self.gate = None;
        }
        self.batch_sizes.send(results.len()).unwrap();
        // Deliveries first: a test that has a batch's result can then drain that batch's
        // deliveries without racing this thread.
        for delivery in deliveries.drain(..) {
            self.deliveries.send(delivery).unwrap();
        }
        for result in results.drain(..) {
            self.results.send(result).unwrap();
        }
    }
}

struct Harness {
    dir: TempDir,
    store: Store,
    writer: Option<WriterHandle>,
    thread: Option<JoinHandle<WriterStats>>,
    results: Receiver<OpResult>,
    deliveries: Receiver<Delivery>,
    batch_sizes: Receiver<usize>,
    entered: Receiver<()>,
    gate: Option<Sender<()>>,
    next_request_id: u32,
}

const ALICE: UserId = UserId(1);
const BOB: UserId = UserId(2);
const CAROL: UserId = UserId(3);

fn names() -> HashMap<UserId, &'static str> {
    HashMap::from([(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")])
}

fn config(map_size: usize, durability: Durability) -> StoreConfig {
    StoreConfig {
        map_size,
        durability,
        ..StoreConfig::default()
    }
}

impl Harness {
    /// A writer that applies the journal with every commit, so the test can read derived
    /// state straight from the store; `deferred` keeps the node's default interval.
    fn new(mut config: StoreConfig, gated: bool) -> Harness {
        config.journal_interval_ms = 0;
        Harness::deferred(config, gated)
    }

    fn deferred(config: StoreConfig, gated: bool) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &config).unwrap();
        for (id, name) in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")] {
            assert_eq!(store.add_user(name, "$argon2id$test").unwrap(), id);
        }
        Harness::start(dir, store, gated)
    }

    fn start(dir: TempDir, store: Store, gated: bool) -> Harness {
        let (results_tx, results) = crossbeam_channel::unbounded();
        let (deliveries_tx, deliveries) = crossbeam_channel::unbounded();
        let (batch_sizes_tx, batch_sizes) = crossbeam_channel::unbounded();
        let (entered_tx, entered) = crossbeam_channel::unbounded();
        let (gate_tx, gate_rx) = crossbeam_channel::unbounded();
        let sink = TestSink {
            results: results_tx,
            deliveries: deliveries_tx,
            batch_sizes: batch_sizes_tx,
            entered: entered_tx,
            gate: gated.then_some(gate_rx),
        };
        let (writer, thread) = spawn_writer(store.clone(), sink).unwrap();
        Harness {
            dir,
            store,
            writer: Some(writer),
            thread: Some(thread),
            results,
            deliveries,
            batch_sizes,
            entered,
            gate: gated.then_some(gate_tx),
            next_request_id: 1,
        }
    }

    fn submit_send(&mut self, from: UserId, to: UserId, client_msg_id: u64, text: &str) -> u32 {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let names = names();
        let op = WriteOp::Send {
            origin: Origin {
                shard: ShardId(0),
                conn: ConnId {
                    index: 7,
                    generation: 1,
                },
                request_id,
            },
            from,
            from_name: names[&from].to_owned(),
            to,
            to_name: names[&to].to_owned(),
            client_msg_id,
            text: text.to_owned(),
            sent_at_ms: 1_000 + u64::from(request_id),
        };
        self.writer.as_ref().unwrap().try_submit(op).unwrap();
        request_id
    }

    fn submit_ack(&self, user: UserId, device: &str, up_to_seq: u64) {
        let op = WriteOp::DeviceAck {
            user,
            device: device.to_owned(),
            up_to_seq,
        };
        self.writer.as_ref().unwrap().try_submit(op).unwrap();
    }

    fn result(&self) -> OpResult {
        self.results
            .recv_timeout(RESULT_TIMEOUT)
            .expect("writer answered")
    }

    /// Sends and waits for its result; returns (request id, result).
    fn send(&mut self, from: UserId, to: UserId, client_msg_id: u64, text: &str) -> OpResult {
        let request_id = self.submit_send(from, to, client_msg_id, text);
        let result = self.result();
        assert_eq!(origin(&result).request_id, request_id);
        result
    }

    fn send_acked(&mut self, from: UserId, to: UserId, client_msg_id: u64, text: &str) -> SendAck {
        match self.send(from, to, client_msg_id, text) {
            OpResult::SendAcked { ack, .. } => ack,
            other => panic!("send failed: {other:?}"),
        }
    }

    /// Waits until the writer is inside the sink with the gate closed.
    fn wait_entered(&self) {
        self.entered
            .recv_timeout(RESULT_TIMEOUT)
            .expect("writer reached the sink");
    }

    fn open_gate(&mut self) {
        self.gate = None;
    }

    fn drain_deliveries(&self) -> Vec<Delivery> {
        self.deliveries.try_iter().collect()
    }

    fn finish(mut self) -> (TempDir, Store, WriterStats, Vec<usize>) {
        self.gate = None;
        drop(self.writer.take());
        let stats = self.thread.take().unwrap().join().unwrap();
        let sizes = self.batch_sizes.try_iter().collect();
        (self.dir, self.store, stats, sizes)
    }
}

fn origin(result: &OpResult) -> Origin {
    result.origin()
}

fn decode(bytes: &[u8]) -> Message {
    rkyv::from_bytes::<Message, rkyv::rancor::Failure>(bytes).unwrap()
}

/// Whole timeline of `user` as (seq, message).
fn timeline(store: &Store, user: UserId) -> Vec<(u64, Message)> {
    let view = store.read().unwrap();
    let mut entries = Vec::new();
    let has_more = view
        .timeline(user, 0, u32::MAX, usize::MAX, |seq, bytes| {
            entries.push((seq, decode(bytes)))
        })
        .unwrap();
    assert!(!has_more);
    entries
}

#[test]
fn seqs_are_contiguous_from_one_on_both_sides() {
    let mut h = Harness::new(StoreConfig::default(), false);
    let mut alice_acks = Vec::new();
    for i in 0..3 {
        alice_acks.push(h.send_acked(ALICE, BOB, 100 + i, &format!("a{i}")));
    }
    let bob_acks: Vec<_> = (0..2)
        .map(|i| h.send_acked(BOB, ALICE, 200 + i, "b"))
        .collect();
    let note = h.send_acked(ALICE, ALICE, 300, "note to self");

    // Ack seq is the sender's own seq.
    assert_eq!(
        alice_acks.iter().map(|a| a.seq).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(bob_acks.iter().map(|a| a.seq).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(note.seq, 6);
    let msg_ids: Vec<_> = alice_acks
        .iter()
        .chain(&bob_acks)
        .chain([&note])
        .map(|a| a.msg_id)
        .collect();
    assert_eq!(msg_ids, [1, 2, 3, 4, 5, 6]);
    assert!(alice_acks.iter().all(|a| !a.duplicate));

    let view = h.store.read().unwrap();
    assert_eq!(view.head_seq(ALICE).unwrap(), 6);
    assert_eq!(view.head_seq(BOB).unwrap(), 5);
    assert_eq!(view.head_seq(CAROL).unwrap(), 0);
    drop(view);
    let alice = timeline(&h.store, ALICE);
    assert_eq!(
        alice.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );
    assert_eq!(alice[5].1.text, "note to self");
    assert_eq!(alice[5].1.to_id, ALICE.0);
    let bob = timeline(&h.store, BOB);
    assert_eq!(
        bob.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let first = &bob[0].1;
    assert_eq!(
        (first.msg_id, first.from_id, first.to_id),
        (1, ALICE.0, BOB.0)
    );
    assert_eq!(
        (first.from.as_str(), first.to.as_str(), first.text.as_str()),
        ("alice", "bob", "a0")
    );
    assert_eq!(first.client_msg_id, 100);
    assert_eq!(first.sent_at_ms, alice_acks[0].sent_at_ms);

    // Deliveries: one per timeline entry, per user contiguous and increasing.
    let deliveries = h.drain_deliveries();
    assert_eq!(deliveries.len(), 3 * 2 + 2 * 2 + 1);
    for (user, head) in [(ALICE, 6), (BOB, 5)] {
        let seqs: Vec<_> = deliveries
            .iter()
            .filter(|d| d.user == user)
            .map(|d| d.seq)
            .collect();
        assert_eq!(seqs, (1..=head).collect::<Vec<_>>());
    }
    h.finish();
}

#[test]
fn message_is_stored_once_for_both_timelines() {
    let mut h = Harness::new(StoreConfig::default(), false);
    let sends = [
        (ALICE, BOB),
        (BOB, ALICE),
        (ALICE, CAROL),
        (CAROL, CAROL),
        (BOB, CAROL),
    ];
    for (i, (from, to)) in sends.iter().enumerate() {
        h.send_acked(*from, *to, i as u64 + 1, "hello");
    }
    let view = h.store.read().unwrap();
    assert_eq!(view.message_count().unwrap(), sends.len() as u64);
    drop(view);
    // Each timeline entry refers to the stored message of that id.
    let mut referenced = HashMap::<u64, usize>::new();
    for user in [ALICE, BOB, CAROL] {
        for (_, message) in timeline(&h.store, user) {
            *referenced.entry(message.msg_id).or_default() += 1;
            let view = h.store.read().unwrap();
            let stored = decode(view.message(message.msg_id).unwrap().unwrap());
            assert_eq!(stored, message);
        }
    }
    // Two entries per message, one for a note to oneself (msg 4).
    let expected: HashMap<u64, usize> = HashMap::from([(1, 2), (2, 2), (3, 2), (4, 1), (5, 2)]);
    assert_eq!(referenced, expected);
    // Both deliveries of a message share one allocation.
    let deliveries = h.drain_deliveries();
    assert_eq!(deliveries.len(), 9);
    assert!(Arc::ptr_eq(&deliveries[0].message, &deliveries[1].message));
    assert_ne!(deliveries[0].user, deliveries[1].user);
    h.finish();
}

#[test]
fn resend_returns_the_first_ack() {
    let mut h = Harness::new(StoreConfig::default(), false);
    let first = h.send_acked(ALICE, BOB, 42, "once");
    assert_eq!(h.drain_deliveries().len(), 2);
    let again = h.send_acked(ALICE, BOB, 42, "different text, same id");
    assert_eq!(
        again,
        SendAck {
            duplicate: true,
            ..first
        }
    );
    assert!(!first.duplicate);
    assert!(h.drain_deliveries().is_empty());
    let view = h.store.read().unwrap();
    assert_eq!(view.message_count().unwrap(), 1);
    assert_eq!(view.head_seq(ALICE).unwrap(), 1);
    assert_eq!(view.head_seq(BOB).unwrap(), 1);
    drop(view);
    // The key is (sender, client id): another sender's 42 is a new message.
    let bobs = h.send_acked(BOB, ALICE, 42, "bob's own 42");
    assert!(!bobs.duplicate);
    assert_eq!(bobs.msg_id, 2);
    h.finish();
}

#[test]
fn copies_in_one_batch_are_deduplicated() {
    let mut h = Harness::new(StoreConfig::default(), true);
    h.submit_send(CAROL, CAROL, 1, "warm-up");
    h.wait_entered();
    // The writer is parked in the sink: these three form the next batch.
    h.submit_send(ALICE, BOB, 7, "copy one");
    h.submit_send(ALICE, BOB, 7, "copy two");
    h.submit_send(ALICE, BOB, 8, "other");
    h.open_gate();
    let results: Vec<_> = (0..4).map(|_| h.result()).collect();
    let acks: Vec<SendAck> = results
        .into_iter()
        .map(|r| match r {
            OpResult::SendAcked { ack, .. } => ack,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(!acks[1].duplicate);
    assert_eq!(
        acks[2],
        SendAck {
            duplicate: true,
            ..acks[1]
        }
    );
    assert_eq!(
        (acks[3].msg_id, acks[3].seq, acks[3].duplicate),
        (3, 2, false)
    );
    assert_eq!(h.store.read().unwrap().message_count().unwrap(), 3);
    assert_eq!(timeline(&h.store, BOB).len(), 2);
    let (_, _, stats, sizes) = h.finish();
    assert_eq!(sizes, [1, 3]);
    assert_eq!(
        stats,
        WriterStats {
            batches: 2,
            ops: 4,
            ops_failed: 0,
            applies: 2,
        }
    );
}

#[test]
fn group_commit_batches_queued_ops() {
    let mut h = Harness::new(StoreConfig::default(), true);
    h.submit_send(ALICE, BOB, 1, "first");
    h.wait_entered();
    let queued = 300;
    for i in 0..queued {
        h.submit_send(BOB, ALICE, 1_000 + i, "queued");
    }
    h.open_gate();
    for _ in 0..=queued {
        assert!(matches!(h.result(), OpResult::SendAcked { .. }));
    }
    assert_eq!(timeline(&h.store, ALICE).len(), queued as usize + 1);
    let (_, _, stats, sizes) = h.finish();
    assert_eq!(sizes, [1, queued as usize]);
    assert_eq!(
        stats,
        WriterStats {
            batches: 2,
            ops: queued + 1,
            ops_failed: 0,
            applies: 2,
        }
    );
}

#[test]
fn batches_stop_at_writer_batch_max() {
    let mut h = Harness::new(config(64 * MIB, Durability::None), true);
    h.submit_send(ALICE, BOB, 1, "first");
    h.wait_entered();
    let queued = WRITER_BATCH_MAX as u64 + 10;
    for i in 0..queued {
        h.submit_send(BOB, ALICE, 1_000 + i, "q");
    }
    h.open_gate();
    for _ in 0..=queued {
        assert!(matches!(h.result(), OpResult::SendAcked { .. }));
    }
    let (_, _, stats, sizes) = h.finish();
    assert_eq!(sizes, [1, WRITER_BATCH_MAX, 10]);
    assert_eq!(stats.batches, 3);
}

#[test]
fn writer_commits_everything_queued_before_exit() {
    let mut h = Harness::new(StoreConfig::default(), false);
    for i in 0..50 {
        h.submit_send(ALICE, BOB, i + 1, "bye");
    }
    let results = h.results.clone();
    let (_, store, stats, sizes) = h.finish();
    assert_eq!(stats.ops, 50);
    assert_eq!(sizes.iter().sum::<usize>(), 50);
    assert_eq!(results.try_iter().count(), 50);
    assert_eq!(store.read().unwrap().head_seq(BOB).unwrap(), 50);
}

#[test]
fn full_queue_hands_the_op_back() {
    let mut h = Harness::new(config(64 * MIB, Durability::None), true);
    h.submit_send(ALICE, BOB, 1, "first");
    h.wait_entered();
    // The writer is parked in the sink, so nothing leaves the queue.
    let writer = h.writer.clone().unwrap();
    let ack = |n: u64| WriteOp::DeviceAck {
        user: BOB,
        device: "phone".to_owned(),
        up_to_seq: n,
    };
    for n in 0..WRITER_QUEUE_MAX as u64 {
        writer.try_submit(ack(n)).unwrap();
    }
    match writer.try_submit(ack(u64::MAX)) {
        Err(WriteOp::DeviceAck { up_to_seq, .. }) => assert_eq!(up_to_seq, u64::MAX),
        other => panic!("{other:?}"),
    }
    drop(writer);
    h.open_gate();
    assert!(matches!(h.result(), OpResult::SendAcked { .. }));
    let (_, store, stats, _) = h.finish();
    assert_eq!(stats.ops, WRITER_QUEUE_MAX as u64 + 1);
    assert_eq!(
        store
            .read()
            .unwrap()
            .device_acked_seq(BOB, "phone")
            .unwrap(),
        1
    );
}

struct PanickingSink;

impl CommitSink for PanickingSink {
    fn committed(&mut self, _: &mut Vec<OpResult>, _: &mut Vec<Delivery>) {
        panic!("test sink gives up");
    }
}

#[test]
fn writer_gone_hands_the_op_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let (writer, thread) = spawn_writer(store, PanickingSink).unwrap();
    let ack = |n: u64| WriteOp::DeviceAck {
        user: ALICE,
        device: "phone".to_owned(),
        up_to_seq: n,
    };
    writer.try_submit(ack(1)).unwrap();
    assert!(thread.join().is_err());
    match writer.try_submit(ack(2)) {
        Err(WriteOp::DeviceAck { up_to_seq, .. }) => assert_eq!(up_to_seq, 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn timeline_pages_by_limit_and_bytes() {
    let mut h = Harness::new(StoreConfig::default(), false);
    for i in 0..10u64 {
        let text = "x".repeat(100 * (i as usize + 1));
        h.send_acked(ALICE, BOB, i + 1, &text);
    }
    let view = h.store.read().unwrap();
    let page = |after, limit, bytes_max| {
        let mut seqs = Vec::new();
        let mut sizes = Vec::new();
        let more = view
            .timeline(BOB, after, limit, bytes_max, |seq, bytes| {
                seqs.push(seq);
                sizes.push(bytes.len());
            })
            .unwrap();
        (seqs, sizes, more)
    };
    let (seqs, sizes, more) = page(0, 3, SYNC_PAGE_BYTES_MAX);
    assert_eq!((seqs, more), (vec![1, 2, 3], true));
    assert!(sizes.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(page(3, 3, SYNC_PAGE_BYTES_MAX).0, [4, 5, 6]);
    assert_eq!(
        page(9, 3, SYNC_PAGE_BYTES_MAX),
        (vec![10], page(9, 3, usize::MAX).1, false)
    );
    assert!(!page(7, 3, SYNC_PAGE_BYTES_MAX).2);
    assert_eq!(page(10, 3, SYNC_PAGE_BYTES_MAX), (vec![], vec![], false));
    assert_eq!(
        page(u64::MAX, 3, SYNC_PAGE_BYTES_MAX),
        (vec![], vec![], false)
    );
    // Byte budget: exactly the first two messages' bytes fit two entries, one byte less
    // fits one.
    let all = page(0, 100, usize::MAX).1;
    assert_eq!(page(0, 100, all[0] + all[1]).0, [1, 2]);
    assert!(page(0, 100, all[0] + all[1]).2);
    assert_eq!(page(0, 100, all[0] + all[1] - 1).0, [1]);
    // A budget smaller than one message still hands out one, so a page always progresses.
    assert_eq!(page(4, 100, 1), (vec![5], vec![all[4]], true));
    // Slices live as long as the view, so a page can be encoded after the scan without
    // copying (what a shard does for a sync page).
    let mut borrowed: Vec<(u64, &[u8])> = Vec::new();
    view.timeline(BOB, 0, 2, usize::MAX, |seq, bytes| {
        borrowed.push((seq, bytes))
    })
    .unwrap();
    assert_eq!(decode(borrowed[1].1).client_msg_id, 2);
    // limit 0 only tells whether anything is there.
    assert_eq!(page(0, 0, usize::MAX), (vec![], vec![], true));
    assert_eq!(page(10, 0, usize::MAX), (vec![], vec![], false));
    // Unknown user: empty.
    let more = view.timeline(UserId(99), 0, 10, usize::MAX, |_, _| panic!("no entries"));
    assert!(!more.unwrap());
    drop(view);
    h.finish();
}

#[test]
fn device_ack_cursor_only_moves_forward() {
    let mut h = Harness::new(StoreConfig::default(), false);
    for i in 0..3 {
        h.send_acked(ALICE, BOB, i + 1, "m");
    }
    let mut barrier_id = 1_000;
    let mut acked = |h: &mut Harness, device: &str, up_to: u64| {
        h.submit_ack(BOB, device, up_to);
        // FIFO: once a later send is answered, the ack before it has committed.
        barrier_id += 1;
        h.send_acked(CAROL, CAROL, barrier_id, "barrier");
        h.store
            .read()
            .unwrap()
            .device_acked_seq(BOB, device)
            .unwrap()
    };
    assert_eq!(
        h.store
            .read()
            .unwrap()
            .device_acked_seq(BOB, "phone")
            .unwrap(),
        0
    );
    assert_eq!(acked(&mut h, "phone", 2), 2);
    assert_eq!(acked(&mut h, "phone", 1), 2);
    assert_eq!(acked(&mut h, "phone", 0), 2);
    // Clamped to the head: a device cannot have stored what does not exist.
    assert_eq!(acked(&mut h, "phone", 10), 3);
    assert_eq!(acked(&mut h, "laptop", 1), 1);
    assert_eq!(
        h.store
            .read()
            .unwrap()
            .device_acked_seq(BOB, "phone")
            .unwrap(),
        3
    );
    // A name no device can have: refused by the writer without stopping it.
    assert_eq!(acked(&mut h, "", 1), 0);
    let long = "d".repeat(crate::limits::DEVICE_NAME_SIZE_MAX + 1);
    assert_eq!(acked(&mut h, &long, 1), 0);
    let (_, _, stats, _) = h.finish();
    assert_eq!(stats.ops_failed, 2);
}

#[test]
fn invalid_op_fails_alone() {
    let mut h = Harness::new(StoreConfig::default(), true);
    h.submit_send(CAROL, CAROL, 1, "warm-up");
    h.wait_entered();
    h.submit_send(ALICE, BOB, 1, "before");
    h.submit_ack(BOB, "", 1);
    h.submit_send(ALICE, BOB, 2, "after");
    h.open_gate();
    // The warm-up is carol's seq 1; alice's two sends are her seqs 1 and 2.
    for seq in [1, 1, 2] {
        match h.result() {
            OpResult::SendAcked { ack, .. } => assert_eq!(ack.seq, seq),
            other => panic!("{other:?}"),
        }
    }
    let (_, store, stats, sizes) = h.finish();
    assert_eq!(sizes, [1, 2]);
    assert_eq!(
        stats,
        WriterStats {
            batches: 2,
            ops: 4,
            ops_failed: 1,
            applies: 2,
        }
    );
    assert_eq!(store.read().unwrap().head_seq(BOB).unwrap(), 2);
}

#[test]
fn reopen_keeps_everything() {
    let mut h = Harness::new(StoreConfig::default(), false);
    h.send_acked(ALICE, BOB, 1, "before restart");
    h.send_acked(BOB, ALICE, 2, "reply");
    h.submit_ack(BOB, "phone", 2);
    let (dir, store, _, _) = h.finish();
    drop(store);

    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let view = store.read().unwrap();
    assert_eq!(view.user_by_name("bob").unwrap().unwrap().id, BOB);
    assert_eq!(view.user_name(CAROL).unwrap().as_deref(), Some("carol"));
    // Alice's third entry is the delivery receipt for bob's ack of her message.
    assert_eq!(view.head_seq(ALICE).unwrap(), 3);
    assert_eq!(view.head_seq(BOB).unwrap(), 2);
    assert_eq!(view.device_acked_seq(BOB, "phone").unwrap(), 2);
    drop(view);
    assert_eq!(timeline(&store, BOB)[0].1.text, "before restart");
    assert_eq!(store.add_user("dave", "$argon2id$x").unwrap(), UserId(4));

    // Counters and dedup entries survive too.
    let mut h = Harness::start(dir, store, false);
    let resent = h.send_acked(ALICE, BOB, 1, "before restart");
    assert_eq!((resent.msg_id, resent.seq, resent.duplicate), (1, 1, true));
    let next = h.send_acked(ALICE, BOB, 3, "after restart");
    // Msg id 3 and alice's seq 3 went to the delivery receipt.
    assert_eq!((next.msg_id, next.seq), (4, 4));
    h.finish();
}

#[test]
fn users_are_unique_and_names_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    assert_eq!(store.add_user("alice", "h1").unwrap(), UserId(1));
    assert_eq!(store.add_user("bob", "h2").unwrap(), UserId(2));
    assert!(matches!(
        store.add_user("alice", "h3"),
        Err(StoreError::AlreadyExists)
    ));
    assert!(matches!(
        store.add_user("", "h"),
        Err(StoreError::InvalidArgument(_))
    ));
    let long = "n".repeat(USER_NAME_SIZE_MAX + 1);
    assert!(matches!(
        store.add_user(&long, "h"),
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        store.add_user("carol", ""),
        Err(StoreError::InvalidArgument(_))
    ));
    let max = "n".repeat(USER_NAME_SIZE_MAX);
    assert_eq!(store.add_user(&max, "h4").unwrap(), UserId(3));

    let view = store.read().unwrap();
    let alice = view.user_by_name("alice").unwrap().unwrap();
    assert_eq!(
        alice,
        UserRecord {
            id: UserId(1),
            name: "alice".into(),
            password_hash: "h1".into()
        }
    );
    assert_eq!(view.user_name(UserId(2)).unwrap().as_deref(), Some("bob"));
    assert_eq!(view.user_name(UserId(9)).unwrap(), None);
    assert_eq!(view.user_by_name("nobody").unwrap(), None);
    assert_eq!(view.user_by_name("").unwrap(), None);
    assert_eq!(view.user_by_name(&long).unwrap(), None);
    // Two views at once on one thread (no thread-local reader slot).
    let second = store.read().unwrap();
    assert_eq!(second.user_by_name(&max).unwrap().unwrap().id, UserId(3));
}

#[test]
fn full_map_fails_sends_with_storage_full() {
    let mut h = Harness::new(config(MIB, Durability::None), false);
    let text = "f".repeat(4096);
    let mut acked = Vec::new();
    let mut full = false;
    for i in 0..1_000 {
        match h.send(ALICE, BOB, i + 1, &text) {
            OpResult::SendAcked { ack, .. } => acked.push(ack),
            OpResult::SendFailed { code, .. } => {
                assert_eq!(code, ErrorCode::StorageFull);
                full = true;
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(full, "a 1 MiB map must fill");
    assert!(!acked.is_empty());
    // The writer is still there and still answers, with the same code.
    match h.send(BOB, ALICE, 1, &text) {
        OpResult::SendFailed { code, .. } => assert_eq!(code, ErrorCode::StorageFull),
        other => panic!("{other:?}"),
    }
    // Everything acknowledged before is intact and readable.
    let bob = timeline(&h.store, BOB);
    assert_eq!(bob.len(), acked.len());
    for ((seq, message), ack) in bob.iter().zip(&acked) {
        assert_eq!(
            (*seq, message.msg_id, message.text.len()),
            (ack.seq, ack.msg_id, 4096)
        );
    }
    let (_, _, stats, _) = h.finish();
    assert_eq!(stats.ops_failed, 2);
}

#[test]
fn full_map_mid_batch_keeps_the_ops_that_fit() {
    let mut h = Harness::new(config(MIB, Durability::None), true);
    h.submit_send(CAROL, CAROL, 1, "warm-up");
    h.wait_entered();
    let text = "g".repeat(4096);
    let queued = 300;
    for i in 0..queued {
        h.submit_send(ALICE, BOB, i + 1, &text);
    }
    h.open_gate();
    assert!(matches!(h.result(), OpResult::SendAcked { .. }));
    let mut acked = Vec::new();
    let mut failed = 0;
    for _ in 0..queued {
        match h.result() {
            OpResult::SendAcked { ack, .. } => acked.push(ack),
            OpResult::SendFailed { code, .. } => {
                assert_eq!(code, ErrorCode::StorageFull);
                failed += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!acked.is_empty(), "some ops fit");
    assert!(failed > 0, "300 × 4 KiB cannot fit a 1 MiB map");
    // The ops that fit form a contiguous timeline, readable in full.
    assert_eq!(
        acked.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (1..=acked.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(timeline(&h.store, BOB).len(), acked.len());
    // Deliveries only for what committed.
    let deliveries = h.drain_deliveries();
    assert_eq!(deliveries.len(), 1 + 2 * acked.len());
    let (_, _, stats, sizes) = h.finish();
    assert_eq!(sizes, [1, queued as usize]);
    assert_eq!(stats.ops_failed, failed);
}

#[test]
fn durability_none_sets_no_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &config(16 * MIB, Durability::None)).unwrap();
    assert_eq!(store.durability(), Durability::None);
    let flags = store.env().get_flags().unwrap();
    assert_ne!(flags & heed::EnvFlags::NO_SYNC.bits(), 0);
    store.add_user("alice", "h").unwrap();
    store.sync().unwrap();
    drop(store);
    let store = Store::open(dir.path(), &config(16 * MIB, Durability::Fsync)).unwrap();
    assert_eq!(store.durability(), Durability::Fsync);
    assert_eq!(
        store.env().get_flags().unwrap() & heed::EnvFlags::NO_SYNC.bits(),
        0
    );
    assert!(
        store
            .read()
            .unwrap()
            .user_by_name("alice")
            .unwrap()
            .is_some()
    );
    store.sync().unwrap();
}

#[test]
fn map_size_is_checked_and_rounded() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open(dir.path(), &config(0, Durability::Fsync)),
        Err(StoreError::InvalidArgument(_))
    ));
    let store = Store::open(dir.path(), &config(MIB + 1, Durability::Fsync)).unwrap();
    let map_size = store.env().info().map_size;
    assert!(map_size > MIB && map_size < 2 * MIB, "{map_size}");
    // One environment per path per process: a second open is refused, not shared.
    assert!(matches!(
        Store::open(dir.path(), &config(MIB, Durability::Fsync)),
        Err(StoreError::Lmdb { op: "open env", .. })
    ));
}

#[test]
fn default_config() {
    let config = StoreConfig::default();
    assert_eq!(config.durability, Durability::Fsync);
    #[cfg(target_pointer_width = "64")]
    assert_eq!(config.map_size, crate::limits::MAP_SIZE_DEFAULT_64);
}

#[test]
fn other_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreConfig::default()).unwrap();
    let mut txn = store.env().write_txn().unwrap();
    store
        .dbs()
        .meta
        .put(
            &mut txn,
            META_SCHEMA_VERSION,
            &(schema::SCHEMA_VERSION + 1).to_be_bytes(),
        )
        .unwrap();
    txn.commit().unwrap();
    drop(store);
    assert!(matches!(
        Store::open(dir.path(), &StoreConfig::default()),
        Err(StoreError::Corrupt("schema version"))
    ));
}

#[test]
fn timeline_gap_is_reported_not_panicked() {
    let mut h = Harness::new(StoreConfig::default(), false);
    for i in 0..3 {
        h.send_acked(ALICE, BOB, i + 1, "m");
    }
    let (_, store, _, _) = h.finish();
    let mut txn = store.env().write_txn().unwrap();
    assert!(
        store
            .dbs()
            .timelines
            .delete(&mut txn, &schema::timeline_key(BOB, 2))
            .unwrap()
    );
    txn.commit().unwrap();
    let view = store.read().unwrap();
    let mut seen = Vec::new();
    let result = view.timeline(BOB, 0, 10, usize::MAX, |seq, _| seen.push(seq));
    assert!(matches!(
        result,
        Err(StoreError::Corrupt("timeline has a gap"))
    ));
    assert_eq!(seen, [1]);
    // Reading from past the gap is fine.
    assert!(!view.timeline(BOB, 2, 10, usize::MAX, |_, _| {}).unwrap());
}

/// Set in the child process of `add_user_works_beside_a_running_writer`.
const CHILD_STORE_DIR_ENV: &str = "TERN_TEST_CHILD_STORE_DIR";

#[test]
fn add_user_works_beside_a_running_writer() {
    // Child: a second process adding a user, as `tern add-user` does beside a live node.
    if let Some(dir) = std::env::var_os(CHILD_STORE_DIR_ENV) {
        let store = Store::open(std::path::Path::new(&dir), &StoreConfig::default()).unwrap();
        let id = store.add_user("dave", "$argon2id$child").unwrap();
        assert_eq!(id, UserId(4));
        return;
    }
    let mut h = Harness::new(StoreConfig::default(), false);
    h.send_acked(ALICE, BOB, 1, "node is live");
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "storage::tests::add_user_works_beside_a_running_writer",
            "--quiet",
        ])
        .env(CHILD_STORE_DIR_ENV, h.dir.path())
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "child process failed: {}\n{}\n{}",
        child.status,
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    // The child really ran the test (a filter that matched nothing would also succeed).
    assert!(String::from_utf8_lossy(&child.stdout).contains("1 passed"));
    let view = h.store.read().unwrap();
    assert_eq!(view.user_by_name("dave").unwrap().unwrap().id, UserId(4));
    drop(view);
    // The node's own add_user reads the counter the child bumped.
    assert_eq!(h.store.add_user("erin", "h").unwrap(), UserId(5));
    // The writer keeps going, and its message counter was untouched by the child.
    let ack = h.send_acked(ALICE, BOB, 2, "after the child");
    assert_eq!(ack.msg_id, 2);
    h.finish();
}

// ----- groups and conversations -------------------------------------------------------

fn test_origin(request_id: u32) -> Origin {
    Origin {
        shard: ShardId(0),
        conn: ConnId {
            index: 7,
            generation: 1,
        },
        request_id,
    }
}

impl Harness {
    fn group_op(&mut self, actor: UserId, op: u8, group_id: u64, users: &[UserId]) -> OpResult {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let op = WriteOp::GroupOp {
            origin: test_origin(request_id),
            actor,
            actor_name: format!("user{}", actor.0),
            op,
            group_id,
            name: "g".to_owned(),
            users: users.to_vec(),
            at_ms: 5,
        };
        self.writer.as_ref().unwrap().try_submit(op).unwrap();
        self.result()
    }

    fn group_send(&mut self, from: UserId, group_id: u64, client_msg_id: u64) -> OpResult {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let op = WriteOp::GroupSend {
            origin: test_origin(request_id),
            from,
            from_name: format!("user{}", from.0),
            group_id,
            client_msg_id,
            text: "hello group".to_owned(),
            sent_at_ms: 6,
        };
        self.writer.as_ref().unwrap().try_submit(op).unwrap();
        self.result()
    }

    fn read_mark(&mut self, user: UserId, conv: u64, up_to_seq: u64) -> OpResult {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let op = WriteOp::Read {
            origin: test_origin(request_id),
            user,
            user_name: "reader".to_owned(),
            conv,
            up_to_seq,
            at_ms: 7,
        };
        self.writer.as_ref().unwrap().try_submit(op).unwrap();
        self.result()
    }
}

fn refusal(result: OpResult) -> ErrorCode {
    match result {
        OpResult::Refused { code, .. } => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn group_message_is_stored_once_and_referenced_by_every_member() {
    use crate::limits::GROUP_MEMBERS_MAX;
    use crate::protocol::{group_conv, group_op};
    let mut h = Harness::new(config(64 * MIB, Durability::None), false);
    let mut users = vec![BOB, CAROL];
    for i in users.len() + 1..=GROUP_MEMBERS_MAX + 1 {
        let id = h
            .store
            .add_user(&format!("member{i}"), "$argon2id$test")
            .unwrap();
        users.push(id);
    }
    // The creator plus 255 others fill the group; one more is refused.
    let (fits, over) = users.split_at(GROUP_MEMBERS_MAX - 1);
    let group_id = match h.group_op(ALICE, group_op::CREATE, 0, fits) {
        OpResult::Answered {
            reply: Reply::Group(info),
            ..
        } => {
            assert_eq!(info.members.len(), GROUP_MEMBERS_MAX);
            info.group_id
        }
        other => panic!("create failed: {other:?}"),
    };
    assert_eq!(
        refusal(h.group_op(BOB, group_op::ADD, group_id, over)),
        ErrorCode::GroupFull
    );
    h.drain_deliveries();
    let before = h.store.read().unwrap().message_count().unwrap();
    let ack = match h.group_send(CAROL, group_id, 1) {
        OpResult::SendAcked { ack, .. } => ack,
        other => panic!("send failed: {other:?}"),
    };
    // Stored once, one delivery per member, all sharing the one allocation.
    assert_eq!(h.store.read().unwrap().message_count().unwrap(), before + 1);
    let deliveries = h.drain_deliveries();
    assert_eq!(deliveries.len(), GROUP_MEMBERS_MAX);
    assert!(
        deliveries
            .windows(2)
            .all(|w| Arc::ptr_eq(&w[0].message, &w[1].message))
    );
    let view = h.store.read().unwrap();
    let stored = view.message(ack.msg_id).unwrap().unwrap();
    assert_eq!(stored, &*deliveries[0].message);
    // Unread for everyone but the sender; the sender's own conversation is read.
    let conv = group_conv(group_id);
    assert_eq!(
        view.conversation_state(ALICE, conv)
            .unwrap()
            .unwrap()
            .unread,
        1
    );
    assert_eq!(
        view.conversation_state(CAROL, conv)
            .unwrap()
            .unwrap()
            .unread,
        0
    );
    drop(view);
    // A resend is a duplicate, stored nowhere new.
    match h.group_send(CAROL, group_id, 1) {
        OpResult::SendAcked { ack: again, .. } => {
            assert!(again.duplicate);
            assert_eq!(again.msg_id, ack.msg_id);
        }
        other => panic!("resend failed: {other:?}"),
    }
    assert!(h.drain_deliveries().is_empty());
    h.finish();
}

#[test]
fn group_rules_refuse_without_writing() {
    use crate::protocol::{group_conv, group_op};
    let mut h = Harness::new(config(16 * MIB, Durability::None), false);
    let group_id = match h.group_op(ALICE, group_op::CREATE, 0, &[BOB]) {
        OpResult::Answered {
            reply: Reply::Group(info),
            ..
        } => info.group_id,
        other => panic!("create failed: {other:?}"),
    };
    h.drain_deliveries();
    let head = |h: &Harness, u| h.store.read().unwrap().head_seq(u).unwrap();
    let heads = [head(&h, ALICE), head(&h, BOB), head(&h, CAROL)];
    assert_eq!(
        refusal(h.group_send(CAROL, group_id, 9)),
        ErrorCode::NotMember
    );
    assert_eq!(
        refusal(h.group_send(ALICE, group_id + 1, 9)),
        ErrorCode::UnknownGroup
    );
    assert_eq!(
        refusal(h.group_op(BOB, group_op::REMOVE, group_id, &[ALICE])),
        ErrorCode::NotOwner
    );
    assert_eq!(
        refusal(h.group_op(ALICE, group_op::REMOVE, group_id, &[CAROL])),
        ErrorCode::NotMember
    );
    assert_eq!(
        refusal(h.group_op(ALICE, group_op::LEAVE, group_id, &[])),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        refusal(h.read_mark(CAROL, group_conv(group_id), 1)),
        ErrorCode::NotMember
    );
    assert!(h.drain_deliveries().is_empty());
    assert_eq!([head(&h, ALICE), head(&h, BOB), head(&h, CAROL)], heads);
    h.finish();
}

// The journal: entries logged now, derived tables applied later (`journal.rs`).

impl Harness {
    /// Asks the writer to apply the journal and waits for the answer.
    fn flush(&mut self) {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let origin = test_origin(request_id);
        self.writer
            .as_ref()
            .unwrap()
            .try_submit(WriteOp::Flush { origin })
            .unwrap();
        match self.result() {
            OpResult::Flushed { origin: got } => assert_eq!(got, origin),
            other => panic!("flush answered {other:?}"),
        }
    }
}

/// A config whose journal is never due by age within a test: only a flush, a read mark,
/// the pending bound or the writer's exit applies it.
fn deferred_config() -> StoreConfig {
    StoreConfig {
        journal_interval_ms: 3_600_000,
        ..config(64 * MIB, Durability::None)
    }
}

#[test]
fn acked_entries_wait_in_the_journal_until_a_flush() {
    let mut h = Harness::deferred(deferred_config(), false);
    let first = h.send_acked(ALICE, BOB, 1, "one");
    let second = h.send_acked(ALICE, BOB, 2, "two");
    assert_eq!(
        (first.seq, second.seq),
        (1, 2),
        "seqs come from the journal's heads"
    );
    // Logged, acknowledged, not yet derived: readers are told to flush first.
    assert!(h.store.derived_pending(ALICE) && h.store.derived_pending(BOB));
    assert!(!h.store.derived_pending(CAROL));
    assert_eq!(h.store.read().unwrap().message_count().unwrap(), 2);
    assert!(timeline(&h.store, BOB).is_empty());
    // A resend of an unapplied send is answered from the journal's memory.
    match h.send(ALICE, BOB, 1, "one again") {
        OpResult::SendAcked { ack, .. } => assert_eq!(
            ack,
            SendAck {
                duplicate: true,
                ..first
            }
        ),
        other => panic!("{other:?}"),
    }
    h.flush();
    assert!(!h.store.derived_pending(ALICE) && !h.store.derived_pending(BOB));
    let bob = timeline(&h.store, BOB);
    assert_eq!(
        bob.iter()
            .map(|(s, m)| (*s, m.text.as_str()))
            .collect::<Vec<_>>(),
        [(1, "one"), (2, "two")]
    );
    assert_eq!(h.store.read().unwrap().head_seq(ALICE).unwrap(), 2);
    // After the apply the resend is answered from `dedup`, still with the first ack.
    match h.send(ALICE, BOB, 2, "two again") {
        OpResult::SendAcked { ack, .. } => assert_eq!(
            ack,
            SendAck {
                duplicate: true,
                ..second
            }
        ),
        other => panic!("{other:?}"),
    }
    let third = h.send_acked(BOB, ALICE, 1, "three");
    assert_eq!(third.seq, 3, "seqs continue from the applied head");
    let (_, _, stats, _) = h.finish();
    // The flush, then the exit's apply of the last send.
    assert_eq!(stats.applies, 2);
}

#[test]
fn a_journal_left_by_a_crash_is_applied_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &deferred_config()).unwrap();
    for (id, name) in [(ALICE, "alice"), (BOB, "bob"), (CAROL, "carol")] {
        assert_eq!(store.add_user(name, "$argon2id$test").unwrap(), id);
    }
    // Batches applied and committed as the writer would, without a writer thread: what a
    // node that was killed before its next apply leaves behind.
    let names = names();
    let mut acked = Vec::new();
    for batch in 0..3u64 {
        let mut ops: Vec<WriteOp> = (0..5u64)
            .map(|i| WriteOp::Send {
                origin: test_origin(0),
                from: ALICE,
                from_name: names[&ALICE].to_owned(),
                to: BOB,
                to_name: names[&BOB].to_owned(),
                client_msg_id: batch * 5 + i + 1,
                text: format!("m{}", batch * 5 + i),
                sent_at_ms: 1,
            })
            .collect();
        let (mut results, mut deliveries) = (Vec::new(), Vec::new());
        log_batch(&store, &mut ops, &mut results, &mut deliveries).unwrap();
        for result in results {
            match result {
                OpResult::SendAcked { ack, .. } => acked.push(ack),
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(
        acked.iter().map(|a| a.seq).collect::<Vec<_>>(),
        (1..=15).collect::<Vec<_>>()
    );
    assert!(timeline(&store, BOB).is_empty(), "nothing applied yet");
    let journal_len = |store: &Store| {
        let txn = store.env().read_txn().unwrap();
        store.dbs().journal.len(&txn).unwrap()
    };
    assert_eq!(journal_len(&store), 15);
    drop(store);

    let store = Store::open(dir.path(), &deferred_config()).unwrap();
    let mut h = Harness::start(dir, store, false);
    // The writer applied the journal before taking any op.
    assert_eq!(journal_len(&h.store), 0);
    let bob = timeline(&h.store, BOB);
    assert_eq!(bob.len(), 15);
    for ((seq, message), ack) in bob.iter().zip(&acked) {
        assert_eq!((*seq, message.msg_id), (ack.seq, ack.msg_id));
    }
    // Dedup survived: a resend of the first send gets its ack back.
    match h.send(ALICE, BOB, 1, "again") {
        OpResult::SendAcked { ack, .. } => assert_eq!(
            ack,
            SendAck {
                duplicate: true,
                ..acked[0]
            }
        ),
        other => panic!("{other:?}"),
    }
    let next = h.send_acked(CAROL, BOB, 1, "after restart");
    assert_eq!(next.seq, 1);
    h.flush();
    assert_eq!(h.store.read().unwrap().head_seq(BOB).unwrap(), 16);
    h.finish();
}

#[test]
fn device_acks_and_their_receipts_wait_for_the_apply() {
    let mut h = Harness::deferred(deferred_config(), false);
    let ack = h.send_acked(ALICE, BOB, 1, "hi");
    h.drain_deliveries();
    h.submit_ack(BOB, "phone", 1);
    // The cursor is not written yet and no receipt went out.
    h.flush();
    let view = h.store.read().unwrap();
    assert_eq!(view.device_acked_seq(BOB, "phone").unwrap(), 1);
    drop(view);
    // The apply sent alice one DELIVERED record naming the message, and applied it too.
    let receipts: Vec<Delivery> = h.drain_deliveries();
    assert_eq!(receipts.len(), 1);
    assert_eq!((receipts[0].user, receipts[0].seq), (ALICE, ack.seq + 1));
    assert!(crate::protocol::is_record(&receipts[0].message));
    assert_eq!(h.store.read().unwrap().head_seq(ALICE).unwrap(), 2);
    assert!(!h.store.derived_pending(ALICE));
    h.finish();
}

/// Found by the `store_model` fuzz target: an ack past the head was clamped when the
/// journal was applied, so entries logged between the ack and the apply moved the device's
/// cursor and sent their senders delivery receipts the device never earned.
#[test]
fn a_device_ack_past_the_head_is_clamped_when_taken_not_when_applied() {
    let mut h = Harness::deferred(deferred_config(), false);
    h.send_acked(ALICE, BOB, 1, "seen");
    h.submit_ack(BOB, "phone", 100);
    // Logged after the ack, before any apply: not on the phone.
    h.send_acked(CAROL, BOB, 1, "not seen");
    h.flush();
    let view = h.store.read().unwrap();
    assert_eq!(view.device_acked_seq(BOB, "phone").unwrap(), 1);
    drop(view);
    // Receipts are the only records here.
    let receipt_users: Vec<UserId> = h
        .drain_deliveries()
        .iter()
        .filter(|d| crate::protocol::is_record(&d.message))
        .map(|d| d.user)
        .collect();
    assert_eq!(
        receipt_users,
        vec![ALICE],
        "only alice's message was delivered"
    );
    h.finish();
}

#[test]
fn a_read_mark_applies_the_journal_first() {
    let mut h = Harness::deferred(deferred_config(), false);
    for i in 0..3 {
        h.send_acked(ALICE, BOB, i + 1, "unread");
    }
    // The conversation exists only in the journal; the read mark must see it.
    match h.read_mark(BOB, ALICE.0, 2) {
        OpResult::Answered {
            reply: Reply::Read(ok),
            ..
        } => assert_eq!((ok.read_seq, ok.unread), (2, 1)),
        other => panic!("{other:?}"),
    }
    let state = h
        .store
        .read()
        .unwrap()
        .conversation_state(BOB, ALICE.0)
        .unwrap()
        .unwrap();
    assert_eq!((state.last_seq, state.read_seq, state.unread), (3, 2, 1));
    h.finish();
}

#[test]
fn a_full_map_with_a_deferred_journal_keeps_timelines_contiguous() {
    let mut h = Harness::deferred(
        StoreConfig {
            journal_interval_ms: 3_600_000,
            ..config(MIB, Durability::None)
        },
        true,
    );
    h.submit_send(CAROL, CAROL, 1, "warm-up");
    h.wait_entered();
    let text = "g".repeat(4096);
    for i in 0..300 {
        h.submit_send(ALICE, BOB, i + 1, &text);
    }
    h.open_gate();
    let mut acked = Vec::new();
    for _ in 0..=300 {
        match h.result() {
            OpResult::SendAcked { ack, .. } => acked.push(ack),
            OpResult::SendFailed { code, .. } => assert_eq!(code, ErrorCode::StorageFull),
            other => panic!("{other:?}"),
        }
    }
    assert!(acked.len() > 1 && acked.len() < 301);
    // Whatever was acknowledged is in the journal; an apply may not fit any more, but
    // nothing acknowledged is lost and the seqs handed out stay contiguous.
    let bob_seqs: Vec<u64> = acked[1..].iter().map(|a| a.seq).collect();
    assert_eq!(bob_seqs, (1..=bob_seqs.len() as u64).collect::<Vec<_>>());
    let (dir, store, _, _) = h.finish();
    drop(store);
    // Reopened with room, the journal applies and every acknowledged entry is there.
    let store = Store::open(dir.path(), &config(64 * MIB, Durability::None)).unwrap();
    let h = Harness::start(dir, store, false);
    assert_eq!(timeline(&h.store, BOB).len(), bob_seqs.len());
    h.finish();
}

#[test]
fn the_audit_passes_a_sound_store_and_names_each_kind_of_damage() {
    let mut h = Harness::deferred(deferred_config(), false);
    for i in 0..4 {
        h.send_acked(ALICE, BOB, i + 1, "hello");
        h.send_acked(BOB, ALICE, i + 1, "hi");
    }
    match h.read_mark(BOB, ALICE.0, 3) {
        OpResult::Answered { .. } => {}
        other => panic!("{other:?}"),
    }
    let (_dir, store, _, _) = h.finish();
    let audit = store.audit().unwrap();
    assert!(audit.is_clean(), "{audit:?}");
    assert_eq!(audit.users, 3);
    assert_eq!(audit.journal_entries, 0, "a clean stop applies the journal");
    let entries = timeline(&store, ALICE).len() + timeline(&store, BOB).len();
    assert!(entries >= 16, "both sides of eight messages");
    assert_eq!(audit.timeline_entries, entries as u64);
    assert_eq!(audit.conversations, 2);

    // Damage: an unread count off by one, and a hole in Bob's timeline.
    let dbs = *store.dbs();
    {
        let (_gate, mut txn) = store.write_txn().unwrap();
        let key = schema::pair_key(ALICE.0, BOB.0);
        let mut state = dbs.convs.get(&txn, &key).unwrap().unwrap().to_vec();
        state[39] = state[39].wrapping_add(1);
        dbs.convs.put(&mut txn, &key, &state).unwrap();
        dbs.timelines
            .delete(&mut txn, &schema::timeline_key(BOB, 2))
            .unwrap();
        txn.commit().unwrap();
    }
    let audit = store.audit().unwrap();
    assert!(!audit.is_clean());
    assert_eq!(audit.unread_mismatches, 1, "{audit:?}");
    assert_eq!(audit.timeline_gaps, 1, "{audit:?}");
    assert_eq!(audit.details.len(), 2);
}
