//! Instruction counts of tern's hot paths under callgrind (gungraun), for the CI regression
//! gate: `tools/perf-gate` runs this file and compares against `bench/perf-baseline.json`.
//!
//! Every benchmark is single-threaded and deterministic (fixed texts, counters for ids and
//! timestamps, no clock), and its setup (opening a store, filling it, building a wheel) runs
//! outside the counted region, so the same binary counts the same instructions every run.
//! The in-process node (`NodeFixture`) is left out: its shard and writer threads race, so
//! its counts would move from run to run; criterion measures it (`hot_paths.rs`).
//!
//! Sizes are smaller than the wall-clock benches' where valgrind time would grow without
//! the count telling more.

use std::hint::black_box;
use std::path::{Path, PathBuf};

use gungraun::prelude::*;
use tern::ids::ConnId;
use tern::shard::timer_wheel::TimerWheel;
use tern::storage::{Durability, WriteOp};
use tern_bench::{
    IDLE_TIMEOUT_TICKS, StoreFixture, WHEEL_CONNECTIONS, WRITE_PATH_TEXT_LEN, empty_wheel,
    encode_send, full_wheel, send_request, sync_page, validate_send, wheel_advance, wheel_insert,
    wheel_mid_timeout,
};

fn encode_input(text_len: usize) -> (tern::protocol::Send, Vec<u8>) {
    let request = send_request(text_len);
    let out = Vec::with_capacity(text_len + 256);
    (request, out)
}

#[library_benchmark]
#[bench::small(encode_input(16))]
#[bench::text_1k(encode_input(1024))]
#[bench::text_16k(encode_input(16 * 1024))]
fn encode_send_frame(input: (tern::protocol::Send, Vec<u8>)) -> Vec<u8> {
    let (request, mut out) = input;
    encode_send(&mut out, black_box(&request));
    out
}

fn frame(text_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_send(&mut out, &send_request(text_len));
    out
}

#[library_benchmark]
#[bench::small(frame(16))]
#[bench::text_1k(frame(1024))]
#[bench::text_16k(frame(16 * 1024))]
fn validate_send_frame(frame: Vec<u8>) -> usize {
    let send = validate_send(black_box(&frame)).expect("valid frame");
    send.text.len()
}

/// Where the gated stores live: tmpfs when there is one.
fn bench_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A fresh store on tmpfs and `n` sends to apply. No fsync: its cost is in the kernel,
/// which callgrind does not count, and tmpfs keeps valgrind's wall time down.
fn store_with_sends(n: usize) -> (StoreFixture, Vec<WriteOp>) {
    let fixture = StoreFixture::new(&bench_parent(), Durability::None);
    // A timeline that already holds entries, as on a node that has run a while.
    fixture_prefill(&fixture);
    let ops = fixture.sends(n, 64);
    (fixture, ops)
}

fn fixture_prefill(fixture: &StoreFixture) {
    let mut ops = fixture.sends(256, 64);
    let mut results = Vec::new();
    let mut deliveries = Vec::new();
    tern::storage::apply_batch(&fixture.store, &mut ops, &mut results, &mut deliveries)
        .expect("prefill");
}

#[library_benchmark]
#[bench::n1(store_with_sends(1))]
#[bench::n64(store_with_sends(64))]
#[bench::n1024(store_with_sends(1024))]
fn store_batch(input: (StoreFixture, Vec<WriteOp>)) -> StoreFixture {
    let (mut fixture, mut ops) = input;
    let entries = fixture.apply(black_box(&mut ops));
    assert_eq!(entries, 2 * ops.len());
    fixture
}

/// The write-path fixture on tmpfs without fsync, and a batch of `n` sends from `n`
/// distinct users.
fn write_path_batch(n: usize) -> (StoreFixture, Vec<WriteOp>) {
    let fixture = StoreFixture::write_path(&bench_parent(), Durability::None);
    let ops = fixture.sends_from_distinct_users(n, WRITE_PATH_TEXT_LEN);
    (fixture, ops)
}

#[library_benchmark]
#[bench::n64(write_path_batch(64))]
#[bench::n1024(write_path_batch(1024))]
fn write_batch_distinct_users(input: (StoreFixture, Vec<WriteOp>)) -> StoreFixture {
    let (mut fixture, mut ops) = input;
    let acked = fixture.apply_acked(black_box(&mut ops));
    assert_eq!(acked, ops.len());
    fixture
}

// The ack commit alone: what the writer commits for a batch between journal applies
// (messages and journal appended; the derived tables untouched).
#[library_benchmark]
#[bench::n2(write_path_batch(2))]
#[bench::n64(write_path_batch(64))]
#[bench::n1024(write_path_batch(1024))]
fn log_batch_distinct_users(input: (StoreFixture, Vec<WriteOp>)) -> StoreFixture {
    let (mut fixture, mut ops) = input;
    let acked = fixture.log_acked(black_box(&mut ops));
    assert_eq!(acked, ops.len());
    fixture
}

fn store_with_timeline() -> (StoreFixture, Vec<u8>) {
    let (mut fixture, _) = store_with_sends(0);
    fixture.fill_bob(300, 64);
    (fixture, Vec::with_capacity(64 * 1024))
}

#[library_benchmark]
#[bench::page_of_100(store_with_timeline())]
fn sync_read(input: (StoreFixture, Vec<u8>)) -> (StoreFixture, Vec<u8>) {
    let (fixture, mut out) = input;
    let entries = sync_page(&fixture.store, fixture.bob, black_box(100), 100, &mut out);
    assert_eq!(entries, 100);
    (fixture, out)
}

#[library_benchmark]
#[bench::insert_100k(empty_wheel())]
fn timer_wheel_insert(mut wheel: TimerWheel) -> TimerWheel {
    wheel_insert(&mut wheel, black_box(WHEEL_CONNECTIONS));
    wheel
}

fn wheel_and_buffer() -> (TimerWheel, Vec<ConnId>) {
    (full_wheel(WHEEL_CONNECTIONS), Vec::new())
}

#[library_benchmark]
#[bench::expire_100k(wheel_and_buffer())]
fn timer_wheel_expire_all(input: (TimerWheel, Vec<ConnId>)) -> (TimerWheel, Vec<ConnId>) {
    let (mut wheel, mut expired) = input;
    let fired = wheel_advance(&mut wheel, 0, black_box(IDLE_TIMEOUT_TICKS), &mut expired);
    assert_eq!(fired, WHEEL_CONNECTIONS as usize);
    (wheel, expired)
}

fn wheel_mid_timeout_and_buffer() -> (TimerWheel, u64, Vec<ConnId>) {
    let (wheel, now_ms) = wheel_mid_timeout(WHEEL_CONNECTIONS);
    (wheel, now_ms, Vec::new())
}

#[library_benchmark]
#[bench::tick_100k_pending(wheel_mid_timeout_and_buffer())]
fn timer_wheel_one_tick(input: (TimerWheel, u64, Vec<ConnId>)) -> (TimerWheel, Vec<ConnId>) {
    let (mut wheel, now_ms, mut expired) = input;
    wheel_advance(&mut wheel, black_box(now_ms), 1, &mut expired);
    (wheel, expired)
}

library_benchmark_group!(
    name = codec,
    benchmarks = [encode_send_frame, validate_send_frame]
);

library_benchmark_group!(
    name = storage,
    benchmarks = [
        store_batch,
        write_batch_distinct_users,
        log_batch_distinct_users,
        sync_read
    ]
);

library_benchmark_group!(
    name = timers,
    benchmarks = [
        timer_wheel_insert,
        timer_wheel_expire_all,
        timer_wheel_one_tick
    ]
);

main!(library_benchmark_groups = codec, storage, timers);
