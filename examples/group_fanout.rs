//! Group fan-out cost: what one message to a 100-member group costs the store writer
//! (timeline entries, conversation indexes, one stored record) and the shards (one push
//! frame per member connection).
//!
//! Run: `cargo run --release --example group_fanout [-- MESSAGES [MEMBERS]]`. Prints
//! medians and p99 over MESSAGES sends (default 2,000) to a group of MEMBERS (default 100),
//! each committed alone, without and with fsync.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tern::ids::{ConnId, ShardId, UserId};
use tern::protocol::{EntryRef, Kind, PushRef, group_op};
use tern::storage::{
    CommitSink, Delivery, Durability, OpResult, Origin, Reply, Store, StoreConfig, WriteOp,
    spawn_writer,
};

/// Default group size: the figure asked for in the design review.
const MEMBERS_DEFAULT: usize = 100;

struct Sink {
    results: mpsc::Sender<(OpResult, Vec<Delivery>)>,
}

impl CommitSink for Sink {
    fn committed(&mut self, results: &mut Vec<OpResult>, deliveries: &mut Vec<Delivery>) {
        let batch: Vec<Delivery> = std::mem::take(deliveries);
        for result in results.drain(..) {
            let _ = self.results.send((result, batch.clone()));
        }
    }
}

fn origin(request_id: u32) -> Origin {
    Origin {
        shard: ShardId(0),
        conn: ConnId {
            index: 0,
            generation: 1,
        },
        request_id,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn run(durability: Durability, messages: u32, members: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        dir.path(),
        &StoreConfig {
            map_size: 1 << 30,
            durability,
            ..StoreConfig::default()
        },
    )
    .expect("open store");
    let users: Vec<UserId> = (0..members)
        .map(|i| {
            store
                .add_user(&format!("m{i}"), "$argon2id$bench")
                .expect("user")
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    let (writer, thread) = spawn_writer(store.clone(), Sink { results: tx }).expect("writer");
    let create = WriteOp::GroupOp {
        origin: origin(0),
        actor: users[0],
        actor_name: "m0".into(),
        op: group_op::CREATE,
        group_id: 0,
        name: "bench".into(),
        users: users[1..].to_vec(),
        at_ms: 1,
    };
    writer.try_submit(create).expect("queue");
    let group_id = match rx.recv().expect("create answered").0 {
        OpResult::Answered {
            reply: Reply::Group(info),
            ..
        } => info.group_id,
        other => panic!("create failed: {other:?}"),
    };
    let text = "a typical chat line of about sixty bytes, give or take a few".to_owned();
    let mut store_times = Vec::with_capacity(messages as usize);
    let mut push_times = Vec::with_capacity(messages as usize);
    let mut out = Vec::with_capacity(64 * 1024);
    for i in 1..=messages {
        let op = WriteOp::GroupSend {
            origin: origin(i),
            from: users[(i as usize) % members],
            from_name: "sender".into(),
            group_id,
            client_msg_id: u64::from(i),
            text: text.clone(),
            sent_at_ms: 2,
        };
        let started = Instant::now();
        writer.try_submit(op).expect("queue");
        let (result, deliveries) = rx.recv().expect("send answered");
        store_times.push(started.elapsed());
        assert!(matches!(result, OpResult::SendAcked { .. }));
        assert_eq!(deliveries.len(), members);
        // What the shards do with the batch: one push frame per member connection, the
        // stored bytes copied into each connection's output.
        let started = Instant::now();
        out.clear();
        for delivery in &deliveries {
            let entries = vec![EntryRef {
                seq: delivery.seq,
                message: &delivery.message,
            }];
            tern::protocol::encode(&mut out, Kind::Push, 0, &PushRef { entries });
        }
        push_times.push(started.elapsed());
        std::hint::black_box(&out);
    }
    drop(writer);
    thread.join().expect("writer exits");
    store_times.sort();
    push_times.sort();
    println!(
        "durability {:>5}: {members}-member group message, {messages} sends: store (submit→commit) median {:?} p99 {:?}; push encode for {members} connections median {:?} p99 {:?} ({} B of frames)",
        match durability {
            Durability::Fsync => "fsync",
            Durability::None => "none",
        },
        percentile(&store_times, 0.5),
        percentile(&store_times, 0.99),
        percentile(&push_times, 0.5),
        percentile(&push_times, 0.99),
        out.len(),
    );
}

fn main() {
    let messages = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MESSAGES is a number"))
        .unwrap_or(2_000);
    let members = std::env::args()
        .nth(2)
        .map(|a| a.parse().expect("MEMBERS is a number"))
        .unwrap_or(MEMBERS_DEFAULT);
    assert!((2..=tern::limits::GROUP_MEMBERS_MAX).contains(&members));
    run(Durability::None, messages, members);
    run(Durability::Fsync, messages / 4, members);
}
