//! Wall-clock benches of tern's hot paths (criterion). For people and boards, not for CI:
//! the regression gate counts instructions instead (`perf_gate.rs`, tools/perf-gate).
//!
//! `cargo bench -p tern-bench` runs them all; `cargo bench -p tern-bench -- codec` one group.
//! The store and end-to-end benches commit with fsync on disk (under `target/tmp`) and on
//! tmpfs (/dev/shm): the difference is what the disk costs.

use std::cell::RefCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tern::storage::Durability;
use tern_bench::{
    IDLE_TIMEOUT_TICKS, NodeFixture, StoreFixture, TEXT_SIZES, WHEEL_CONNECTIONS,
    WRITE_PATH_BATCHES, WRITE_PATH_TEXT_LEN, empty_wheel, encode_send, full_wheel, send_request,
    sync_page, text, validate_send, wheel_advance, wheel_insert, wheel_mid_timeout,
};

/// Where the store benches put their files: tmpfs and a real disk.
fn store_places() -> [(&'static str, PathBuf); 2] {
    let shm = Path::new("/dev/shm");
    let tmpfs = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    [
        ("tmpfs", tmpfs),
        ("disk", PathBuf::from(env!("CARGO_TARGET_TMPDIR"))),
    ]
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (name, len) in TEXT_SIZES {
        let request = send_request(len);
        let mut frame = Vec::new();
        let frame_size = encode_send(&mut frame, &request);
        group.throughput(Throughput::Bytes(frame_size as u64));
        let mut out = Vec::with_capacity(frame_size);
        group.bench_function(BenchmarkId::new("encode_send", name), |b| {
            b.iter(|| {
                out.clear();
                encode_send(&mut out, black_box(&request))
            })
        });
        group.bench_function(BenchmarkId::new("validate_send", name), |b| {
            b.iter(|| {
                let send = validate_send(black_box(&frame)).expect("valid frame");
                send.text.len()
            })
        });
    }
    group.finish();
}

fn store_batch(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_batch");
    // A disk commit takes milliseconds; fewer samples keep the group within minutes.
    group.sample_size(20);
    for (place, dir) in store_places() {
        // The setup makes ops while the routine applies them: both need the fixture.
        let fixture = RefCell::new(StoreFixture::new(&dir, Durability::Fsync));
        for n in [1usize, 64, 1024] {
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new(place, n), |b| {
                b.iter_batched_ref(
                    // The shard builds the ops, not the writer: outside the timed part.
                    || fixture.borrow().sends(n, 64),
                    |ops| fixture.borrow_mut().apply(ops),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

/// The store write path: a batch of N sends from N distinct users (pairs writing to each
/// other) applied and committed with `storage::apply_batch`, as the writer does for one
/// group commit. Unlike `store_batch` (two users), every send touches timelines of its own.
fn write_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_path");
    group.sample_size(20);
    for (place, dir) in store_places() {
        let fixture = RefCell::new(StoreFixture::write_path(&dir, Durability::Fsync));
        for n in WRITE_PATH_BATCHES {
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(
                BenchmarkId::new(format!("distinct_users/{place}"), n),
                |b| {
                    b.iter_batched_ref(
                        || {
                            fixture
                                .borrow()
                                .sends_from_distinct_users(n, WRITE_PATH_TEXT_LEN)
                        },
                        |ops| {
                            let acked = fixture.borrow_mut().apply_acked(ops);
                            assert_eq!(acked, n, "every send of the batch is committed");
                        },
                        BatchSize::PerIteration,
                    )
                },
            );
        }
    }
    group.finish();
}

fn sync_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("sync_read");
    let [(_, tmpfs), _] = store_places();
    let mut fixture = StoreFixture::new(&tmpfs, Durability::None);
    fixture.fill_bob(10_000, 64);
    let bob = fixture.bob;
    group.throughput(Throughput::Elements(100));
    let mut out = Vec::with_capacity(64 * 1024);
    group.bench_function("page_of_100", |b| {
        let mut after_seq = 0;
        b.iter(|| {
            out.clear();
            let entries = sync_page(&fixture.store, bob, after_seq, 100, &mut out);
            assert_eq!(entries, 100);
            // Walk the timeline so reads are not all served from the same pages.
            after_seq = (after_seq + 100) % 9_900;
            out.len()
        })
    });
    group.finish();
}

fn timer_wheel(c: &mut Criterion) {
    let mut group = c.benchmark_group("timer_wheel");
    group.throughput(Throughput::Elements(u64::from(WHEEL_CONNECTIONS)));
    group.bench_function("insert_100k", |b| {
        b.iter_batched_ref(
            empty_wheel,
            |wheel| wheel_insert(wheel, WHEEL_CONNECTIONS),
            BatchSize::LargeInput,
        )
    });
    group.bench_function("expire_100k_over_idle_timeout", |b| {
        let mut expired = Vec::new();
        b.iter_batched_ref(
            || full_wheel(WHEEL_CONNECTIONS),
            |wheel| {
                let fired = wheel_advance(wheel, 0, IDLE_TIMEOUT_TICKS, &mut expired);
                assert_eq!(fired, WHEEL_CONNECTIONS as usize);
            },
            BatchSize::LargeInput,
        )
    });
    // The steady state: one loop turn's advance with 100k connections waiting.
    group.throughput(Throughput::Elements(1));
    group.bench_function("one_tick_100k_pending", |b| {
        let mut expired = Vec::new();
        b.iter_batched_ref(
            || wheel_mid_timeout(WHEEL_CONNECTIONS),
            |(wheel, now_ms)| wheel_advance(wheel, *now_ms, 1, &mut expired),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn end_to_end(c: &mut Criterion) {
    let mut group = c.benchmark_group("end_to_end");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(10));
    const BURST: usize = 200;
    let body = text(64);
    for (place, dir) in store_places() {
        let mut node = NodeFixture::start(&dir, Durability::Fsync);
        group.throughput(Throughput::Elements(BURST as u64));
        group.bench_function(BenchmarkId::new("send_burst_200", place), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| node.send_burst(BURST, &body)).sum())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    codec,
    store_batch,
    write_path,
    sync_read,
    timer_wheel,
    end_to_end
);
criterion_main!(benches);
