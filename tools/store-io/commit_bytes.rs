//! Bytes the kernel is asked to write per store commit, by kind, without a network: batches
//! of 1:1 sends between random pairs of `USERS` users applied with `apply_batch` on one
//! thread, and this thread's `/proc/thread-self/io` `write_bytes` read around each commit.
//!
//! Every `apply_every`-th batch also applies the journal (as the writer does when the
//! journal is due); the others only log.
//!
//! usage: cargo run --release --example commit-bytes -- [users] [batch] [batches] [apply_every]

use std::time::Instant;

use tern::ids::{ConnId, ShardId, UserId};
use tern::storage::{Durability, Origin, Store, StoreConfig, WriteOp, apply_batch, log_batch};

fn thread_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("write_bytes: "))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let users = *args.first().unwrap_or(&2000);
    let batch = *args.get(1).unwrap_or(&190);
    let batches = *args.get(2).unwrap_or(&400);
    let apply_every = (*args.get(3).unwrap_or(&50)).max(1);
    let dir = tempfile::Builder::new()
        .prefix("tern-commit-bytes-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let config = StoreConfig {
        map_size: 4 << 30,
        durability: Durability::Fsync,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), &config).expect("open");
    let ids: Vec<UserId> = (0..users)
        .map(|i| {
            store
                .add_user(&format!("u{i}"), "$argon2id$x")
                .expect("user")
        })
        .collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut results, mut deliveries) = (Vec::new(), Vec::new());
    let (mut log, mut apply) = ((0u64, 0u64), (0u64, 0u64));
    let mut apply_ms_max = 0f64;
    // The store file's length follows its last page: how far one apply grows it is what a
    // full disk must still hold (`DISK_BALLAST_BYTES`).
    let file_len = || {
        std::fs::metadata(dir.path().join("data.mdb"))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let mut apply_growth_max = 0u64;
    let counters = store.writer_counters();
    let started = Instant::now();
    for b in 0..batches {
        let mut ops: Vec<WriteOp> = (0..batch)
            .map(|i| {
                let from = ids[(next() % users) as usize];
                let to = ids[(next() % users) as usize];
                WriteOp::Send {
                    origin: Origin {
                        shard: ShardId(0),
                        conn: ConnId {
                            index: 0,
                            generation: 0,
                        },
                        request_id: 0,
                    },
                    from,
                    from_name: format!("u{}", from.0),
                    to,
                    to_name: format!("u{}", to.0),
                    client_msg_id: b * batch + i + 1,
                    text: "x".repeat(100),
                    sent_at_ms: 1,
                }
            })
            .collect();
        let applies_before = counters.applies.load(std::sync::atomic::Ordering::Relaxed);
        let before = thread_write_bytes();
        let len_before = file_len();
        let commit_started = Instant::now();
        if (b + 1) % apply_every == 0 {
            apply_batch(&store, &mut ops, &mut results, &mut deliveries).expect("batch");
        } else {
            log_batch(&store, &mut ops, &mut results, &mut deliveries).expect("batch");
        }
        let commit_ms = commit_started.elapsed().as_secs_f64() * 1e3;
        let written = thread_write_bytes() - before;
        results.clear();
        deliveries.clear();
        let applied = counters.applies.load(std::sync::atomic::Ordering::Relaxed) > applies_before;
        if applied {
            apply_ms_max = apply_ms_max.max(commit_ms);
            apply_growth_max = apply_growth_max.max(file_len().saturating_sub(len_before));
        }
        let slot = if applied { &mut apply } else { &mut log };
        slot.0 += 1;
        slot.1 += written;
    }
    let messages = batches * batch;
    println!(
        "users {users} batch {batch} batches {batches} apply every {apply_every}: {:.1} s; \
         log commits {} at {:.1} KiB each; applying commits {} at {:.1} KiB each; \
         {:.0} B per message; longest applying commit {:.0} ms; \
         largest growth of the file by one applying commit {:.1} MiB",
        started.elapsed().as_secs_f64(),
        log.0,
        log.1 as f64 / log.0.max(1) as f64 / 1024.0,
        apply.0,
        apply.1 as f64 / apply.0.max(1) as f64 / 1024.0,
        (log.1 + apply.1) as f64 / messages as f64,
        apply_ms_max,
        apply_growth_max as f64 / (1 << 20) as f64
    );
}
