//! The store writer: the one thread that writes messages, with group commit.
//!
//! Shards hand it `WriteOp`s through a bounded queue. It blocks for the first op, drains
//! whatever else has queued (up to `WRITER_BATCH_MAX`), applies the whole batch in one
//! write transaction and commits it (one fsync for the batch), then gives the results and
//! the new timeline entries to its `CommitSink`. So a burst that arrives while one fsync
//! runs shares the next one.
//!
//! A batch's transaction appends each new entry to the log (`messages` and `journal`, see
//! `journal.rs`); the derived tables are brought up to date in the same transaction only
//! when the journal is due (`JOURNAL_APPLY_INTERVAL_MS` old or `JOURNAL_PLACEMENTS_PENDING_MAX`
//! placements), when an op needs them current (`Read`, `Flush`), or, with nothing queued,
//! when the interval runs out. Device acks wait in memory for the same apply.
//!
//! A failed batch never takes the thread down: the batch transaction is aborted and each op
//! is retried in a transaction of its own, so one bad op (or the op that filled the map)
//! fails alone. This thread must not call back into shards other than through the sink, and
//! must not acknowledge anything before its transaction committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::apply::ApplyJournal;
use super::ballast::Ballast;
use super::journal::Journal;
use super::{Store, StoreError, apply};
use crate::ids::{ConnId, ShardId, UserId};
use crate::limits::{JOURNAL_PLACEMENTS_PENDING_MAX, WRITER_BATCH_MAX, WRITER_QUEUE_MAX};
use crate::protocol::{ErrorCode, FileInfo, GroupInfo, ReadOk, SendAck};

/// Where a send came from, so its result finds its way back to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub shard: ShardId,
    pub conn: ConnId,
    pub request_id: u32,
}

/// One write. Ids and names are resolved by the shard; the writer trusts them.
#[derive(Debug)]
pub enum WriteOp {
    /// A 1:1 message. Idempotent per `(from, client_msg_id)`: a resend gets the first ack
    /// back with `duplicate: true`, whatever its other fields say.
    Send {
        origin: Origin,
        from: UserId,
        from_name: String,
        to: UserId,
        to_name: String,
        client_msg_id: u64,
        text: String,
        sent_at_ms: u64,
    },
    /// A device stored every entry up to `up_to_seq`. The cursor only moves forward and
    /// never past the timeline's head. No result is reported; the cursor (and the delivery
    /// receipts it calls for) is written with the next journal apply.
    DeviceAck {
        user: UserId,
        device: String,
        up_to_seq: u64,
    },
    /// A group operation (`protocol::group_op`). The writer checks membership and roles;
    /// answered with `Reply::Group` or `Refused`.
    GroupOp {
        origin: Origin,
        actor: UserId,
        actor_name: String,
        op: u8,
        group_id: u64,
        name: String,
        users: Vec<UserId>,
        at_ms: u64,
    },
    /// A message to a group. Idempotent per `(from, client_msg_id)` like `Send`; refused
    /// unless `from` is a member.
    GroupSend {
        origin: Origin,
        from: UserId,
        from_name: String,
        group_id: u64,
        client_msg_id: u64,
        text: String,
        sent_at_ms: u64,
    },
    /// A read mark; answered with `Reply::Read` or `Refused`.
    Read {
        origin: Origin,
        user: UserId,
        user_name: String,
        conv: u64,
        up_to_seq: u64,
        at_ms: u64,
    },
    /// Finishes an upload whose bytes are in `files/tmp` (see `storage::files`): checks
    /// quota, size and SHA-256, publishes the blob, records the file. `Reply::File`.
    FileCommit {
        origin: Origin,
        owner: UserId,
        name: String,
        mime: String,
        size: u64,
        sha256: [u8; 32],
        at_ms: u64,
    },
    /// A message carrying a file, 1:1 (`to`) or to a group. Answered like a send. Boxed:
    /// it is the largest op, and every queue slot would pay for it.
    FileSend(Box<FileSendOp>),
    /// Applies the journal, so that a read transaction begun after the answer
    /// (`OpResult::Flushed`) sees every entry committed before this op was taken. A shard
    /// sends it before a read of derived state for a user with unapplied entries.
    Flush { origin: Origin },
    /// A logout, password change or device revoke (`storage::account`). Answered with
    /// `Reply::Revoked`.
    Account(Box<super::account::AccountOp>),
}

/// The fields of `WriteOp::FileSend`.
#[derive(Debug)]
pub struct FileSendOp {
    pub origin: Origin,
    pub from: UserId,
    pub from_name: String,
    pub to: Option<UserId>,
    pub group_id: u64,
    pub client_msg_id: u64,
    pub file_id: u64,
    pub thumbnail_id: u64,
    pub media: u8,
    pub duration_ms: u32,
    pub width: u32,
    pub height: u32,
    pub text: String,
    pub sent_at_ms: u64,
}

/// The answer to an op other than a send.
#[derive(Debug)]
pub enum Reply {
    Group(GroupInfo),
    Read(ReadOk),
    File(FileInfo),
    Revoked(super::account::Revoked),
}

/// The outcome of one `WriteOp::Send`.
#[derive(Debug)]
pub enum OpResult {
    SendAcked {
        origin: Origin,
        ack: SendAck,
    },
    /// Nothing was stored. `code` is `StorageFull` or `StorageFailed`.
    SendFailed {
        origin: Origin,
        code: ErrorCode,
    },
    /// An op other than a send committed; `reply` answers it.
    Answered {
        origin: Origin,
        reply: Reply,
    },
    /// The op broke a rule (not a member, not the owner, group full); nothing was written.
    Refused {
        origin: Origin,
        code: ErrorCode,
        message: &'static str,
    },
    /// A `Flush` committed: the derived tables hold every entry logged before it.
    Flushed {
        origin: Origin,
    },
}

impl OpResult {
    /// The request this result answers.
    pub fn origin(&self) -> Origin {
        match self {
            OpResult::SendAcked { origin, .. }
            | OpResult::SendFailed { origin, .. }
            | OpResult::Answered { origin, .. }
            | OpResult::Refused { origin, .. }
            | OpResult::Flushed { origin } => *origin,
        }
    }
}

/// A committed timeline entry to push to the user's online devices.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub user: UserId,
    pub seq: u64,
    /// Archived `protocol::Message`, the same bytes as stored. The entries of both sides of
    /// a message share one allocation.
    pub message: Arc<[u8]>,
}

/// Receives what each batch produced.
pub trait CommitSink: std::marker::Send + 'static {
    /// Called on the writer thread once per batch after its transaction committed (or
    /// failed: then only `SendFailed` results and no deliveries). Deliveries are in commit
    /// order (per user, increasing seq). The sink drains both vectors; the writer clears
    /// and reuses them.
    fn committed(&mut self, results: &mut Vec<OpResult>, deliveries: &mut Vec<Delivery>);
}

/// What the writer did, returned when it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Batches handled (one write transaction each, unless a batch failed and was retried
    /// op by op).
    pub batches: u64,
    /// Ops received.
    pub ops: u64,
    /// Ops that were not applied (sends answered `SendFailed`, device acks dropped).
    pub ops_failed: u64,
    /// Journal applies that committed (each brought the derived tables up to date).
    pub applies: u64,
}

/// The writer's running counters, readable from any thread while it runs (`tern serve`'s
/// stats line). Relaxed atomics: each is exact, the set is not one snapshot.
#[derive(Debug, Default)]
pub struct WriterCounters {
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Ops taken from the queue.
    pub ops: AtomicU64,
    /// Commits that applied the journal.
    pub applies: AtomicU64,
    /// Placements (entry × timeline) applied to the derived tables.
    pub placements_applied: AtomicU64,
    /// Bytes the writer thread made the kernel write (`/proc/thread-self/io`
    /// `write_bytes`) in commits that applied the journal, and in the others.
    pub apply_write_bytes: AtomicU64,
    pub log_write_bytes: AtomicU64,
}

/// `write_bytes` of the calling thread so far, 0 where the kernel does not say.
fn thread_write_bytes() -> u64 {
    let Ok(io) = std::fs::read_to_string("/proc/thread-self/io") else {
        return 0;
    };
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Submits ops to the writer. The writer exits once every handle is dropped and the queue
/// is drained.
#[derive(Clone)]
pub struct WriterHandle {
    queue: Sender<WriteOp>,
}

impl WriterHandle {
    /// Queues `op` without blocking. A full queue or a writer that has exited hands the op
    /// back, so the shard can answer `busy` (or `shutting_down`).
    pub fn try_submit(&self, op: WriteOp) -> Result<(), WriteOp> {
        self.queue.try_send(op).map_err(|error| match error {
            TrySendError::Full(op) | TrySendError::Disconnected(op) => op,
        })
    }
}

/// Starts the writer thread on `store`, reporting each batch to `sink`. First applies, on
/// the calling thread, whatever journal a previous run left (after a crash); an error there
/// (a damaged journal, a full map) is returned and no thread starts.
pub fn spawn_writer(
    store: Store,
    sink: impl CommitSink,
) -> std::io::Result<(WriterHandle, JoinHandle<WriterStats>)> {
    let mut journal = Journal::new(store.pending_users());
    journal
        .recover(&store)
        .map_err(|error| std::io::Error::other(format!("applying the store journal: {error}")))?;
    let (queue, ops) = crossbeam_channel::bounded(WRITER_QUEUE_MAX);
    let data_dir = store.files_dir().parent().unwrap_or(store.files_dir());
    let ballast = Ballast::take(data_dir);
    let writer = Writer {
        ballast,
        store,
        journal,
        sink,
        batch: Vec::with_capacity(WRITER_BATCH_MAX),
        results: Vec::with_capacity(WRITER_BATCH_MAX),
        deliveries: Vec::with_capacity(2 * WRITER_BATCH_MAX),
        stats: WriterStats::default(),
        full_reported: false,
        write_bytes_seen: 0,
    };
    let thread = std::thread::Builder::new()
        // Linux keeps 15 bytes of a thread name; this one fits whole in `top -H`.
        .name("tern-writer".to_owned())
        .spawn(move || writer.run(ops))?;
    Ok((WriterHandle { queue }, thread))
}

/// Applies `ops` in one write transaction and commits it on the calling thread, as the
/// writer thread applies one batch whose journal is due: the entries are logged and the
/// journal (with any leftover from before) is applied in the same transaction, so the
/// derived tables are complete when it returns. No per-op retry after a failure. On success
/// `results` and `deliveries` hold what the ops produced; on error nothing was committed.
///
/// For benches and tools that measure the batch path without a thread in between. A running
/// node writes only through `spawn_writer`: two writers on one store would serialise on
/// LMDB's writer lock and break the writer's batching and its memory of the journal.
pub fn apply_batch(
    store: &Store,
    ops: &mut [WriteOp],
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    batch_on_this_thread(store, ApplyJournal::AtEnd, ops, results, deliveries)
}

/// Logs `ops` in one write transaction and commits it without applying the journal, as the
/// writer thread does between applies; the derived tables do not show the entries until a
/// later `apply_batch` or a writer's start applies them. Same uses and rules as
/// `apply_batch`; for benches and tools that measure the ack commit alone.
pub fn log_batch(
    store: &Store,
    ops: &mut [WriteOp],
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    batch_on_this_thread(store, ApplyJournal::WhenNeeded, ops, results, deliveries)
}

/// One batch in one transaction on the calling thread, with the journal's memory rebuilt
/// from the store first (`apply_batch`, `log_batch`).
fn batch_on_this_thread(
    store: &Store,
    when: ApplyJournal,
    ops: &mut [WriteOp],
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    for op in ops.iter() {
        apply::check(op)?;
    }
    let mut journal = Journal::new(store.pending_users());
    journal.reload(store)?;
    let counters = store.writer_counters();
    let applied = apply::in_one_txn(store, &mut journal, when, ops, results, deliveries)?;
    counters.commits.fetch_add(1, Ordering::Relaxed);
    if applied {
        counters.applies.fetch_add(1, Ordering::Relaxed);
        counters
            .placements_applied
            .fetch_add(journal.placements() as u64, Ordering::Relaxed);
        journal.applied();
    }
    Ok(())
}

/// Whether the next batch applies the journal at its end.
fn apply_when(store: &Store, journal: &Journal) -> ApplyJournal {
    let interval = Duration::from_millis(store.journal_interval_ms());
    // Interval 0: every batch applies what it logs.
    let old = interval.is_zero() || journal.oldest().is_some_and(|t| t.elapsed() >= interval);
    if old || journal.placements() >= JOURNAL_PLACEMENTS_PENDING_MAX {
        ApplyJournal::AtEnd
    } else {
        ApplyJournal::WhenNeeded
    }
}

struct Writer<S> {
    /// Disk space set aside for when the disk fills; while it is given up, new content is
    /// refused (`ballast`).
    ballast: Ballast,
    store: Store,
    /// What is logged and not yet applied to the derived tables.
    journal: Journal,
    sink: S,
    /// Ops of the batch being applied; empty between batches.
    batch: Vec<WriteOp>,
    /// Results and deliveries of the batch; handed to the sink, then cleared.
    results: Vec<OpResult>,
    deliveries: Vec<Delivery>,
    stats: WriterStats,
    /// A full map was reported on stderr and nothing has committed since: don't repeat it
    /// for every op that follows.
    full_reported: bool,
    /// This thread's `write_bytes` after the last transaction.
    write_bytes_seen: u64,
}

impl<S: CommitSink> Writer<S> {
    fn run(mut self, ops: Receiver<WriteOp>) -> WriterStats {
        // `recv` fails only once the queue is empty and every handle is gone, so everything
        // queued before shutdown is committed.
        loop {
            let first = match self.journal.oldest() {
                None => match ops.recv() {
                    Ok(op) => Some(op),
                    Err(_) => break,
                },
                Some(oldest) => {
                    let due = oldest + Duration::from_millis(self.store.journal_interval_ms());
                    match ops.recv_timeout(due.saturating_duration_since(Instant::now())) {
                        Ok(op) => Some(op),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let Some(first) = first else {
                // Quiet and the journal is due: apply it alone.
                self.apply_journal();
                continue;
            };
            debug_assert!(self.batch.is_empty());
            self.batch.push(first);
            while self.batch.len() < WRITER_BATCH_MAX {
                match ops.try_recv() {
                    Ok(op) => self.batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_batch();
            self.sink.committed(&mut self.results, &mut self.deliveries);
            self.results.clear();
            self.deliveries.clear();
            self.batch.clear();
        }
        // Leave the derived tables complete: the next start has nothing to recover.
        if !self.journal.is_empty() {
            self.apply_journal();
        }
        self.stats
    }

    /// Applies the journal in a transaction of its own.
    fn apply_journal(&mut self) {
        let outcome = apply::in_one_txn(
            &self.store,
            &mut self.journal,
            ApplyJournal::AtEnd,
            &mut [],
            &mut self.results,
            &mut self.deliveries,
        );
        if let Err(error) = self.after_txn(outcome) {
            self.deliveries.clear();
            if matches!(error, StoreError::DiskFull { .. }) {
                // The apply is retried an interval later, in the room the ballast leaves.
                self.ballast.release();
            }
            self.report(&error);
        }
        // Delivery receipts the acks called for.
        if !self.deliveries.is_empty() {
            self.sink.committed(&mut self.results, &mut self.deliveries);
            self.deliveries.clear();
        }
        debug_assert!(self.results.is_empty());
    }

    /// Brings the journal's memory in step with what the transaction did: fully applied,
    /// still pending, or (failed) what the committed journal says.
    fn after_txn(&mut self, outcome: Result<bool, StoreError>) -> Result<(), StoreError> {
        let written = thread_write_bytes();
        let delta = written.saturating_sub(self.write_bytes_seen);
        self.write_bytes_seen = written;
        let counters = self.store.writer_counters();
        match &outcome {
            Ok(true) => counters
                .apply_write_bytes
                .fetch_add(delta, Ordering::Relaxed),
            _ => counters.log_write_bytes.fetch_add(delta, Ordering::Relaxed),
        };
        match outcome {
            Ok(true) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                counters.applies.fetch_add(1, Ordering::Relaxed);
                counters
                    .placements_applied
                    .fetch_add(self.journal.placements() as u64, Ordering::Relaxed);
                self.stats.applies += 1;
                self.journal.applied();
                self.full_reported = false;
                Ok(())
            }
            Ok(false) => {
                counters.commits.fetch_add(1, Ordering::Relaxed);
                self.full_reported = false;
                Ok(())
            }
            Err(error) => {
                if let Err(reload) = self.journal.reload(&self.store) {
                    // The memory of unapplied entries cannot be trusted: seqs handed out
                    // from it could repeat. Better to stop than to write a broken timeline.
                    panic!("tern: store writer: journal reload failed after {error}: {reload}");
                }
                Err(error)
            }
        }
    }

    fn commit_batch(&mut self) {
        assert!(!self.batch.is_empty());
        assert!(self.batch.len() <= WRITER_BATCH_MAX);
        assert!(self.results.is_empty());
        assert!(self.deliveries.is_empty());
        self.stats.batches += 1;
        self.stats.ops += self.batch.len() as u64;
        self.store
            .writer_counters()
            .ops
            .fetch_add(self.batch.len() as u64, Ordering::Relaxed);
        self.drop_invalid_ops();
        if !self.ballast.recheck(Instant::now()) {
            self.refuse_content();
        }
        if self.batch.is_empty() {
            return;
        }
        let error = loop {
            // Results of dropped ops stay; what the batch itself produces comes after them.
            let results_len = self.results.len();
            let when = apply_when(&self.store, &self.journal);
            let outcome = apply::in_one_txn(
                &self.store,
                &mut self.journal,
                when,
                &mut self.batch,
                &mut self.results,
                &mut self.deliveries,
            );
            let Err(error) = self.after_txn(outcome) else {
                return;
            };
            // Nothing of the batch committed; forget what it produced.
            self.results.truncate(results_len);
            self.deliveries.clear();
            if !matches!(error, StoreError::DiskFull { .. }) || self.ballast.is_full() {
                break error;
            }
            // The disk just filled: give the ballast's room to what is not new content
            // (applies, acks, account changes) and retry that once.
            self.ballast.release();
            self.refuse_content();
            if self.batch.is_empty() {
                return;
            }
        };
        if self.batch.len() == 1 {
            // Retrying alone would repeat the same transaction.
            let origin = op_origin(&self.batch[0]);
            self.fail(origin, &error);
            return;
        }
        self.report(&error);
        // One op at a time: the ops that fit still commit, each with its own fsync; this
        // path runs only after a failure. An op whose transaction fails only with the
        // journal's apply in it (a full map) is retried without, so it does not fail
        // because of the apply.
        for index in 0..self.batch.len() {
            let results_len = self.results.len();
            let deliveries_len = self.deliveries.len();
            let mut when = apply_when(&self.store, &self.journal);
            let outcome = loop {
                let outcome = apply::in_one_txn(
                    &self.store,
                    &mut self.journal,
                    when,
                    &mut self.batch[index..index + 1],
                    &mut self.results,
                    &mut self.deliveries,
                );
                match self.after_txn(outcome) {
                    Err(_) if when == ApplyJournal::AtEnd => {
                        // Perhaps the apply did not fit; the op alone may.
                        self.results.truncate(results_len);
                        self.deliveries.truncate(deliveries_len);
                        when = ApplyJournal::WhenNeeded;
                    }
                    outcome => break outcome,
                }
            };
            if let Err(error) = outcome {
                self.results.truncate(results_len);
                self.deliveries.truncate(deliveries_len);
                let origin = op_origin(&self.batch[index]);
                self.fail(origin, &error);
            }
        }
    }

    /// Fails and removes the ops that could never apply, before they can abort the batch
    /// transaction and send every other op down the slow one-by-one path. Keeps the order
    /// of the rest (it decides seqs and which copy of a resend is the first).
    fn drop_invalid_ops(&mut self) {
        let mut index = 0;
        while index < self.batch.len() {
            match apply::check(&self.batch[index]) {
                Ok(()) => index += 1,
                Err(error) => {
                    let op = self.batch.remove(index);
                    self.fail(op_origin(&op), &error);
                }
            }
        }
    }

    /// While the disk is full: answers every op of the batch that would store new content
    /// `storage_full` and removes it (keeping the order of the rest). The ballast said why
    /// on stderr already.
    fn refuse_content(&mut self) {
        let (results, stats) = (&mut self.results, &mut self.stats);
        self.batch.retain(|op| {
            if !adds_content(op) {
                return true;
            }
            stats.ops_failed += 1;
            if let Some(origin) = op_origin(op) {
                results.push(OpResult::SendFailed {
                    origin,
                    code: ErrorCode::StorageFull,
                });
            }
            false
        });
    }

    /// Answers one op that was not applied.
    fn fail(&mut self, origin: Option<Origin>, error: &StoreError) {
        self.report(error);
        self.stats.ops_failed += 1;
        let code = if error.is_full() {
            ErrorCode::StorageFull
        } else {
            ErrorCode::StorageFailed
        };
        if let Some(origin) = origin {
            self.results.push(OpResult::SendFailed { origin, code });
        }
    }

    /// The sender only learns a code; the operator needs the reason. A full map or disk is
    /// said once until something commits again, other failures every time (they are rare
    /// and each one matters).
    fn report(&mut self, error: &StoreError) {
        match error {
            _ if error.is_full() && self.full_reported => {}
            StoreError::Full => {
                self.full_reported = true;
                eprintln!("tern: store writer: {error}; sends fail until map_size is raised");
            }
            StoreError::DiskFull { .. } => {
                self.full_reported = true;
                eprintln!("tern: store writer: {error}; sends fail until space is freed");
            }
            _ => eprintln!("tern: store writer: {error}"),
        }
    }
}

/// Whether `op` stores new content, refused while the disk is full. Applies (`Flush`),
/// device acks and account changes (logout and revocation must work on a full disk) are
/// small and go on in the ballast's room.
fn adds_content(op: &WriteOp) -> bool {
    match op {
        WriteOp::Send { .. }
        | WriteOp::GroupOp { .. }
        | WriteOp::GroupSend { .. }
        | WriteOp::Read { .. }
        | WriteOp::FileCommit { .. }
        | WriteOp::FileSend(_) => true,
        WriteOp::Flush { .. } | WriteOp::DeviceAck { .. } | WriteOp::Account(_) => false,
    }
}

fn op_origin(op: &WriteOp) -> Option<Origin> {
    match op {
        WriteOp::Send { origin, .. }
        | WriteOp::GroupOp { origin, .. }
        | WriteOp::GroupSend { origin, .. }
        | WriteOp::Read { origin, .. }
        | WriteOp::FileCommit { origin, .. }
        | WriteOp::Flush { origin } => Some(*origin),
        WriteOp::FileSend(op) => Some(op.origin),
        WriteOp::Account(op) => Some(op.origin),
        WriteOp::DeviceAck { .. } => None,
    }
}

const _: () = assert!(WRITER_BATCH_MAX <= WRITER_QUEUE_MAX);
