//! Fixtures shared by the wall-clock benches (`benches/hot_paths.rs`, criterion) and the
//! instruction-count benches (`benches/perf_gate.rs`, gungraun under callgrind).
//!
//! Everything here is deterministic: texts come from a fixed-seed generator, timestamps and
//! client message ids from counters, never from the clock or the OS's randomness, so the
//! same binary executes the same instructions on every run. Only `NodeFixture` runs
//! threads; the instruction-count benches do not use it.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tern::client::{BlockingClient, ClientConfig, Event};
use tern::ids::{ConnId, ShardId, UserId};
use tern::io::IoKind;
use tern::limits::{FRAME_HEADER_SIZE, SYNC_PAGE_BYTES_MAX, TIMER_SLOTS, TIMER_TICK_MS};
use tern::node::{Node, NodeConfig};
use tern::protocol::{self, ArchivedSend, DecodeError, EntryRef, Kind, SyncPageRef};
use tern::shard::timer_wheel::TimerWheel;
use tern::storage::{
    Delivery, Durability, OpResult, Origin, Store, StoreConfig, WriteOp, apply_batch, log_batch,
};

/// Text sizes of the codec benches: a chat line, a paragraph, the largest text allowed.
pub const TEXT_SIZES: [(&str, usize); 3] = [
    ("small", 16),
    ("1k", 1024),
    ("16k", tern::limits::MESSAGE_TEXT_SIZE_MAX),
];

/// Seed of every generated text.
const TEXT_SEED: u64 = 0x7e57_7e57;

/// Map size of bench stores: room for every bench's appends, small enough for any box.
const BENCH_MAP_SIZE: usize = 1 << 30;

/// A password hash is only stored, never verified, in the store benches.
const BENCH_PASSWORD_HASH: &str = "bench-not-a-hash";

/// Name prefix of the users made by `StoreFixture::add_senders`.
const SENDER_PREFIX: &str = "sender-";

/// Text size of the write-path bench's messages: the load generator's `--size 100..100`,
/// the workload the store's bytes per message are measured with.
pub const WRITE_PATH_TEXT_LEN: usize = 100;

/// Batch sizes of the write-path bench: a quiet node's batch, and the writer's largest
/// (`WRITER_BATCH_MAX`), which a node under load fills.
pub const WRITE_PATH_BATCHES: [usize; 2] = [64, tern::limits::WRITER_BATCH_MAX];

/// Users of the write-path fixture: one per send of the largest batch.
pub const WRITE_PATH_USERS: usize = tern::limits::WRITER_BATCH_MAX;

/// Batches of the write-path fixture applied before measuring, so every user's timeline
/// and conversation already hold entries, as on a node that has run a while.
pub const WRITE_PATH_PREFILL_BATCHES: usize = 2;

/// SplitMix64: a fixed-seed generator with no state beyond one u64.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `len` bytes of printable ASCII, the same for the same `len` on every run.
pub fn text(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,0123456789";
    let mut rng = SplitMix64(TEXT_SEED ^ len as u64);
    (0..len)
        .map(|_| ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

/// The `Send` request a client encodes for a text of `text_len` bytes.
pub fn send_request(text_len: usize) -> protocol::Send {
    protocol::Send {
        to: "bob".to_owned(),
        client_msg_id: 0x0123_4567_89ab_cdef,
        text: text(text_len),
    }
}

/// Appends one `Send` frame to `out` (the client's encode path). Returns the frame size.
pub fn encode_send(out: &mut Vec<u8>, request: &protocol::Send) -> usize {
    protocol::encode(out, Kind::Send, 7, request)
}

/// The node's receive path for one complete frame: header checks, then rkyv validation
/// of the payload in place. Returns the validated archive.
pub fn validate_send(frame: &[u8]) -> Result<&ArchivedSend, DecodeError> {
    let header = protocol::read_header(frame)?;
    assert_eq!(header.kind, Kind::Send);
    protocol::access::<ArchivedSend>(header.kind, &frame[FRAME_HEADER_SIZE..])
}

/// A store with two users in a temporary directory under `parent` (use /dev/shm for
/// tmpfs, a folder under `target/` for disk). The directory goes with the fixture.
pub struct StoreFixture {
    pub store: Store,
    pub alice: UserId,
    pub bob: UserId,
    /// Users `sender-0 …` made by `add_senders`; empty until then.
    pub senders: Vec<UserId>,
    /// Counts every op made, so each send has a fresh client message id and timestamp.
    ops_made: Cell<u64>,
    results: Vec<OpResult>,
    deliveries: Vec<Delivery>,
    // Declared last: the store closes before its directory is removed.
    _dir: TempDir,
}

impl StoreFixture {
    pub fn new(parent: &Path, durability: Durability) -> StoreFixture {
        let dir = tempfile::Builder::new()
            .prefix("tern-bench-store-")
            .tempdir_in(parent)
            .expect("create bench store dir");
        let config = StoreConfig {
            map_size: BENCH_MAP_SIZE,
            durability,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), &config).expect("open bench store");
        let alice = store.add_user("alice", BENCH_PASSWORD_HASH).expect("alice");
        let bob = store.add_user("bob", BENCH_PASSWORD_HASH).expect("bob");
        StoreFixture {
            store,
            alice,
            bob,
            senders: Vec::new(),
            ops_made: Cell::new(0),
            results: Vec::new(),
            deliveries: Vec::new(),
            _dir: dir,
        }
    }

    /// `n` sends alternating alice → bob and bob → alice, each with a fresh client message
    /// id (so none is taken for a resend). Each one appends to two timelines.
    pub fn sends(&self, n: usize, text_len: usize) -> Vec<WriteOp> {
        let body = text(text_len);
        (0..n)
            .map(|i| {
                let made = self.ops_made.get() + 1;
                self.ops_made.set(made);
                let (from, from_name, to, to_name) = if i % 2 == 0 {
                    (self.alice, "alice", self.bob, "bob")
                } else {
                    (self.bob, "bob", self.alice, "alice")
                };
                WriteOp::Send {
                    origin: Origin {
                        shard: ShardId(0),
                        conn: ConnId {
                            index: 0,
                            generation: 0,
                        },
                        request_id: i as u32,
                    },
                    from,
                    from_name: from_name.to_owned(),
                    to,
                    to_name: to_name.to_owned(),
                    client_msg_id: made,
                    text: body.clone(),
                    sent_at_ms: 1_700_000_000_000 + made,
                }
            })
            .collect()
    }

    /// Makes `count` more users (`sender-0 …`, in one write transaction) for
    /// `sends_from_distinct_users`.
    pub fn add_senders(&mut self, count: usize) {
        let bulk = self
            .store
            .add_users_bulk(SENDER_PREFIX, 0, count as u64, BENCH_PASSWORD_HASH)
            .expect("add senders");
        assert_eq!(bulk.ids.len(), count);
        self.senders = bulk.ids;
    }

    /// `n` sends (even, at most `senders.len()`), one from each of the first `n` senders:
    /// sender 2k writes to 2k+1 and 2k+1 to 2k (the load generator's `pairs`), so a
    /// batch touches `n` timelines spread over the store rather than two. Fresh client
    /// message ids, so none is taken for a resend.
    pub fn sends_from_distinct_users(&self, n: usize, text_len: usize) -> Vec<WriteOp> {
        assert!(n.is_multiple_of(2), "senders come in pairs");
        assert!(n <= self.senders.len(), "add_senders({n}) first");
        let body = text(text_len);
        (0..n)
            .map(|i| {
                let made = self.ops_made.get() + 1;
                self.ops_made.set(made);
                WriteOp::Send {
                    origin: Origin {
                        shard: ShardId(0),
                        conn: ConnId {
                            index: i as u32,
                            generation: 0,
                        },
                        request_id: made as u32,
                    },
                    from: self.senders[i],
                    from_name: format!("{SENDER_PREFIX}{i}"),
                    to: self.senders[i ^ 1],
                    to_name: format!("{SENDER_PREFIX}{}", i ^ 1),
                    client_msg_id: made,
                    text: body.clone(),
                    sent_at_ms: 1_700_000_000_000 + made,
                }
            })
            .collect()
    }

    /// Applies `ops` as one writer batch through `storage::apply_batch` and returns how many
    /// sends it acknowledged: an acknowledged send is durable (committed), whatever the
    /// store derives from it now or later, so this counts what the batch committed without
    /// assuming how the store lays it out.
    pub fn apply_acked(&mut self, ops: &mut [WriteOp]) -> usize {
        self.results.clear();
        self.deliveries.clear();
        apply_batch(&self.store, ops, &mut self.results, &mut self.deliveries)
            .expect("apply bench batch");
        assert_eq!(self.results.len(), ops.len());
        self.results
            .iter()
            .filter(|r| matches!(r, OpResult::SendAcked { .. }))
            .count()
    }

    /// Logs `ops` as one writer batch without applying the journal (the ack commit the
    /// writer makes between applies) and returns the number of sends it acknowledged.
    pub fn log_acked(&mut self, ops: &mut [WriteOp]) -> usize {
        self.results.clear();
        self.deliveries.clear();
        log_batch(&self.store, ops, &mut self.results, &mut self.deliveries)
            .expect("log bench batch");
        assert_eq!(self.results.len(), ops.len());
        self.results
            .iter()
            .filter(|r| matches!(r, OpResult::SendAcked { .. }))
            .count()
    }

    /// A write-path fixture: `WRITE_PATH_USERS` senders whose timelines already hold
    /// `WRITE_PATH_PREFILL_BATCHES` batches of their pairs' messages.
    pub fn write_path(parent: &Path, durability: Durability) -> StoreFixture {
        let mut fixture = StoreFixture::new(parent, durability);
        fixture.add_senders(WRITE_PATH_USERS);
        for _ in 0..WRITE_PATH_PREFILL_BATCHES {
            let mut ops = fixture.sends_from_distinct_users(WRITE_PATH_USERS, WRITE_PATH_TEXT_LEN);
            assert_eq!(fixture.apply_acked(&mut ops), WRITE_PATH_USERS);
        }
        fixture
    }

    /// Applies `ops` as one writer batch (one transaction, one commit) and returns the
    /// number of timeline entries it appended.
    pub fn apply(&mut self, ops: &mut [WriteOp]) -> usize {
        self.results.clear();
        self.deliveries.clear();
        apply_batch(&self.store, ops, &mut self.results, &mut self.deliveries)
            .expect("apply bench batch");
        assert_eq!(self.results.len(), ops.len());
        self.deliveries.len()
    }

    /// Stores `n` messages alice → bob in batches as large as the writer's.
    pub fn fill_bob(&mut self, n: usize, text_len: usize) {
        let mut left = n;
        while left > 0 {
            let take = left.min(tern::limits::WRITER_BATCH_MAX);
            let mut ops = self.sends(take, text_len);
            // Every op alice → bob, so bob's timeline holds all of them.
            for op in &mut ops {
                if let WriteOp::Send {
                    from,
                    from_name,
                    to,
                    to_name,
                    ..
                } = op
                {
                    *from = self.alice;
                    *from_name = "alice".to_owned();
                    *to = self.bob;
                    *to_name = "bob".to_owned();
                }
            }
            self.apply(&mut ops);
            left -= take;
        }
    }
}

/// The node's sync read path: one read transaction, up to `limit` entries of `user`'s
/// timeline after `after_seq` taken from the map, encoded as a `SyncPage` frame into
/// `out` (the connection's write buffer). Returns the number of entries.
pub fn sync_page(
    store: &Store,
    user: UserId,
    after_seq: u64,
    limit: u32,
    out: &mut Vec<u8>,
) -> usize {
    let view = store.read().expect("read view");
    let head_seq = view.head_seq(user).expect("head seq");
    let mut entries = Vec::with_capacity(limit as usize);
    let has_more = view
        .timeline(
            user,
            after_seq,
            limit,
            SYNC_PAGE_BYTES_MAX,
            |seq, message| {
                entries.push(EntryRef { seq, message });
            },
        )
        .expect("timeline");
    let count = entries.len();
    protocol::encode(
        out,
        Kind::SyncPage,
        9,
        &SyncPageRef {
            entries,
            head_seq,
            has_more,
        },
    );
    count
}

/// Idle timeout of a connection at the default heartbeat: what the wheel's deadlines span.
pub const IDLE_TIMEOUT_MS: u64 = tern::limits::HEARTBEAT_INTERVAL_MS_DEFAULT as u64
    * tern::limits::IDLE_TIMEOUT_INTERVAL_TENTHS
    / 10;

/// Connections of the timer-wheel benches.
pub const WHEEL_CONNECTIONS: u32 = 100_000;

/// A wheel as a shard builds it, empty, at time 0.
pub fn empty_wheel() -> TimerWheel {
    TimerWheel::new(TIMER_SLOTS, TIMER_TICK_MS, 0)
}

/// Deadline of connection `i`: spread over one idle timeout by a fixed permutation, as
/// connections that logged in at different times would be.
fn wheel_deadline_ms(i: u32) -> u64 {
    1 + (u64::from(i) * 7919) % IDLE_TIMEOUT_MS
}

/// Inserts connections `0..n` into `wheel`.
pub fn wheel_insert(wheel: &mut TimerWheel, n: u32) {
    for i in 0..n {
        wheel.insert(
            ConnId {
                index: i,
                generation: 1,
            },
            wheel_deadline_ms(i),
        );
    }
}

/// A wheel holding `n` connections.
pub fn full_wheel(n: u32) -> TimerWheel {
    let mut wheel = empty_wheel();
    wheel_insert(&mut wheel, n);
    wheel
}

/// A wheel holding `n` connections whose loop has run tick by tick to half an idle timeout,
/// as in a steady state: about half the entries fired, the rest wait. Returns the time.
pub fn wheel_mid_timeout(n: u32) -> (TimerWheel, u64) {
    let mut wheel = full_wheel(n);
    let ticks = IDLE_TIMEOUT_MS / 2 / TIMER_TICK_MS;
    wheel_advance(&mut wheel, 0, ticks, &mut Vec::new());
    (wheel, ticks * TIMER_TICK_MS)
}

/// Advances `wheel` tick by tick through `ticks` ticks from `from_ms`, as a shard loop
/// does; returns how many entries fired.
pub fn wheel_advance(
    wheel: &mut TimerWheel,
    from_ms: u64,
    ticks: u64,
    expired: &mut Vec<ConnId>,
) -> usize {
    let mut fired = 0;
    for tick in 1..=ticks {
        expired.clear();
        wheel.advance(from_ms + tick * TIMER_TICK_MS, expired);
        fired += expired.len();
    }
    fired
}

/// Ticks in one idle timeout: advancing this far fires every entry of `full_wheel`.
pub const IDLE_TIMEOUT_TICKS: u64 = IDLE_TIMEOUT_MS.div_ceil(TIMER_TICK_MS) + 1;

/// A node started in-process on a temporary data folder and a loopback port, with users
/// alice and bob, and alice logged in over the blocking client.
pub struct NodeFixture {
    pub alice: BlockingClient,
    node: Option<Node>,
    addr: SocketAddr,
    // Declared last: removed after the node stopped.
    _dir: TempDir,
}

const NODE_PASSWORD: &str = "bench-password";

impl NodeFixture {
    pub fn start(parent: &Path, durability: Durability) -> NodeFixture {
        let dir = tempfile::Builder::new()
            .prefix("tern-bench-node-")
            .tempdir_in(parent)
            .expect("create bench node dir");
        {
            // Closed again before the node opens the same environment.
            let store = Store::open(dir.path(), &StoreConfig::default()).expect("open store");
            let hash = tern::auth::hash_password(NODE_PASSWORD).expect("hash password");
            store.add_user("alice", &hash).expect("alice");
            store.add_user("bob", &hash).expect("bob");
        }
        let config = NodeConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().expect("loopback address"),
            tls: None,
            shards: 1,
            durability,
            heartbeat_interval_ms: tern::limits::HEARTBEAT_INTERVAL_MS_DEFAULT,
            heartbeat_coalescing: false,
            io: IoKind::Epoll,
            map_size: Some(BENCH_MAP_SIZE),
            journal_interval_ms: tern::limits::JOURNAL_APPLY_INTERVAL_MS,
        };
        let node = Node::start(&config).expect("start node");
        let addr = node.local_addr();
        let mut alice = BlockingClient::new(
            addr,
            ClientConfig::new("alice", "bench").with_password(NODE_PASSWORD),
        );
        alice.connect().expect("alice logs in");
        NodeFixture {
            alice,
            node: Some(node),
            addr,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `n` messages alice → bob without waiting for each ack, then runs the client
    /// until every one is acknowledged (committed by the node). Returns the time taken.
    pub fn send_burst(&mut self, n: usize, text: &str) -> Duration {
        assert!(n <= tern::client::SENDS_IN_FLIGHT_MAX);
        let start = Instant::now();
        for _ in 0..n {
            self.alice.send_nowait("bob", text).expect("queue send");
        }
        let mut acked = 0;
        let deadline = start + Duration::from_secs(60);
        let done = self.alice.run_until(deadline, |event| {
            if let Event::SendAcked { .. } = event {
                acked += 1;
            }
            acked == n
        });
        let elapsed = start.elapsed();
        assert!(done, "{acked} of {n} sends acknowledged within 60 s");
        // alice's own timeline carries her sends; they are not what this measures.
        self.alice.take_received();
        elapsed
    }
}

impl Drop for NodeFixture {
    fn drop(&mut self) {
        self.alice.close();
        if let Some(node) = self.node.take() {
            node.shutdown().expect("node shuts down");
        }
    }
}
