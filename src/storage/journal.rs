//! The journal: where every logged entry goes, until the derived tables say so.
//!
//! A write op makes its entry durable by appending two values under its msg id, which only
//! grows: the entry's bytes to `messages` and its *placements* (which timelines it joins at
//! which seq, which conversation it belongs to, its dedup key) to `journal`. Both appends
//! dirty only the tail pages of their trees, so the commit that acknowledges a send is a
//! short, mostly sequential write. The derived tables (`timelines`, `heads`,
//! `conv_entries`, `convs`, `conv_recent`, `dedup`, `device_acks`, `delivered`) are brought
//! up to date later, for many entries at once (`Journal::apply`): a user who got fifty
//! entries since the last apply costs one rewritten leaf page per table instead of fifty.
//!
//! The journal is the truth until it is applied: applying it and deleting it happen in one
//! transaction, so after a crash at any point the store holds either the journal entries or
//! their derived rows, never both and never neither. The writer applies whatever is left
//! when it starts (`Journal::recover`).
//!
//! While entries are logged but not applied, the writer answers from memory what the
//! derived tables cannot yet: each user's head (so seqs stay contiguous) and the dedup
//! entries of first sends (so resends stay idempotent). Shards learn which users have
//! unapplied entries from `PendingUsers`; a read of such a user's timeline, history or
//! conversations first asks the writer to apply (`WriteOp::Flush`).
//!
//! Nothing here commits a transaction; the writer owns it. After a failed transaction the
//! writer must call `Journal::reload`: the memory above then describes entries that were
//! never committed.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use heed::{PutFlags, RoTxn, RwTxn};

use super::apply::{apply_device_ack, put_new};
use super::conversations::{self, NoteKind, Noted};
use super::receipts;
use super::schema::{self, Dbs, DedupEntry};
use super::writer::Delivery;
use super::{Store, StoreError};
use crate::ids::UserId;
use crate::limits::{JOURNAL_PLACEMENTS_MAX, PENDING_USERS_BITS};

/// Where one logged entry goes in one user's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Placement {
    pub user: UserId,
    pub seq: u64,
    /// The conversation the entry belongs to in `user`'s view, and how it counts there;
    /// `None` for entries that are in the timeline only (read marks, delivery receipts).
    pub conv: Option<(u64, NoteKind)>,
}

/// One entry being logged: built by an op, then handed to `Journal::log`.
#[derive(Debug)]
pub(super) struct LoggedEntry {
    msg_id: u64,
    from: UserId,
    at_ms: u64,
    /// `(client_msg_id, sender_seq)` of a first send, recorded in `dedup` when applied.
    dedup: Option<(u64, u64)>,
    placements: Vec<Placement>,
}

impl LoggedEntry {
    pub(super) fn new(msg_id: u64, from: UserId, at_ms: u64) -> LoggedEntry {
        LoggedEntry {
            msg_id,
            from,
            at_ms,
            dedup: None,
            placements: Vec::new(),
        }
    }

    /// Marks the entry as the first send of `(from, client_msg_id)`; a resend is answered
    /// with `sender_seq` (the entry's seq in the sender's timeline).
    pub(super) fn set_dedup(&mut self, client_msg_id: u64, sender_seq: u64) {
        debug_assert!(sender_seq > 0);
        self.dedup = Some((client_msg_id, sender_seq));
    }
}

/// Journal value: from u64 ‖ at_ms u64 ‖ client msg id u64 ‖ sender seq u64 (0: no dedup)
/// ‖ placement count u16 ‖ placements, each user u64 ‖ seq u64 ‖ conv u64 ‖ kind u8.
const RECORD_HEADER_SIZE: usize = 34;
const PLACEMENT_SIZE: usize = 25;
const KIND_TIMELINE_ONLY: u8 = 0;
const KIND_MESSAGE: u8 = 1;
const KIND_MEMBERSHIP: u8 = 2;

fn encode(entry: &LoggedEntry, out: &mut Vec<u8>) {
    out.clear();
    let (client_msg_id, sender_seq) = entry.dedup.unwrap_or((0, 0));
    for field in [entry.from.0, entry.at_ms, client_msg_id, sender_seq] {
        out.extend_from_slice(&field.to_be_bytes());
    }
    let count = u16::try_from(entry.placements.len()).expect("placements are bounded");
    out.extend_from_slice(&count.to_be_bytes());
    for p in &entry.placements {
        let (conv, kind) = match p.conv {
            None => (0, KIND_TIMELINE_ONLY),
            Some((conv, NoteKind::Message)) => (conv, KIND_MESSAGE),
            Some((conv, NoteKind::Membership)) => (conv, KIND_MEMBERSHIP),
        };
        out.extend_from_slice(&p.user.0.to_be_bytes());
        out.extend_from_slice(&p.seq.to_be_bytes());
        out.extend_from_slice(&conv.to_be_bytes());
        out.push(kind);
    }
    debug_assert_eq!(
        out.len(),
        RECORD_HEADER_SIZE + PLACEMENT_SIZE * entry.placements.len()
    );
}

fn decode(msg_id: u64, bytes: &[u8]) -> Result<LoggedEntry, StoreError> {
    const WHAT: &str = "journal value";
    if bytes.len() < RECORD_HEADER_SIZE {
        return Err(StoreError::Corrupt(WHAT));
    }
    let u64_at = |at: usize| schema::decode_u64(&bytes[at..at + 8], WHAT);
    let count = u16::from_be_bytes([bytes[32], bytes[33]]) as usize;
    if bytes.len() != RECORD_HEADER_SIZE + PLACEMENT_SIZE * count {
        return Err(StoreError::Corrupt(WHAT));
    }
    let sender_seq = u64_at(24)?;
    let mut entry = LoggedEntry {
        msg_id,
        from: UserId(u64_at(0)?),
        at_ms: u64_at(8)?,
        dedup: (sender_seq != 0).then_some((u64_at(16)?, sender_seq)),
        placements: Vec::with_capacity(count),
    };
    for index in 0..count {
        let at = RECORD_HEADER_SIZE + index * PLACEMENT_SIZE;
        let conv = u64_at(at + 16)?;
        let conv = match bytes[at + 24] {
            KIND_TIMELINE_ONLY => None,
            KIND_MESSAGE => Some((conv, NoteKind::Message)),
            KIND_MEMBERSHIP => Some((conv, NoteKind::Membership)),
            _ => return Err(StoreError::Corrupt(WHAT)),
        };
        entry.placements.push(Placement {
            user: UserId(u64_at(at)?),
            seq: u64_at(at + 8)?,
            conv,
        });
    }
    Ok(entry)
}

/// Which users have journal entries not yet applied, as a bitmap of hashed user ids shared
/// between the writer (sets bits before the commit that logs an entry, clears them all
/// after the commit that applies the journal) and the shards (read one bit before a read
/// of derived state). A collision only costs a read an unneeded flush.
///
/// Cost: `PENDING_USERS_BITS / 8` bytes (8 KiB) per node.
pub(crate) struct PendingUsers {
    words: Box<[AtomicU64]>,
}

impl PendingUsers {
    pub(crate) fn new() -> PendingUsers {
        PendingUsers {
            words: (0..PENDING_USERS_BITS / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn bit(user: UserId) -> (usize, u64) {
        // Fibonacci hashing spreads consecutive ids over the words.
        let hash = user.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let bit = hash as usize % PENDING_USERS_BITS;
        (bit / 64, 1 << (bit % 64))
    }

    fn mark(&self, user: UserId) {
        let (word, mask) = PendingUsers::bit(user);
        // Set before the logging transaction commits, so no reader can see the entry's ack
        // or push without also seeing the bit (or the applied rows).
        self.words[word].fetch_or(mask, Ordering::SeqCst);
    }

    fn clear_all(&self) {
        for word in self.words.iter() {
            word.store(0, Ordering::SeqCst);
        }
    }

    /// Whether `user` may have entries the derived tables do not show yet. False means a
    /// read transaction begun after this call sees every entry of `user` that was
    /// acknowledged or pushed before it.
    pub(crate) fn contains(&self, user: UserId) -> bool {
        let (word, mask) = PendingUsers::bit(user);
        self.words[word].load(Ordering::SeqCst) & mask != 0
    }
}

/// The writer's memory of logged, unapplied entries, and its pending device acks.
pub(crate) struct Journal {
    pending: Arc<PendingUsers>,
    /// Head seq of every user with unapplied placements (the derived `heads` lag behind).
    heads: HashMap<UserId, u64>,
    /// Dedup entries of unapplied first sends, by (sender, client msg id).
    dedup: HashMap<(UserId, u64), DedupEntry>,
    /// Device cursors acknowledged since the last apply: (user, device) → seq.
    acks: HashMap<(UserId, String), u64>,
    /// Placements logged and not applied (bounds the next apply's work).
    placements: usize,
    /// When the oldest unapplied entry or ack arrived.
    oldest: Option<Instant>,
    /// Something was logged or acknowledged since the last `apply` (in this transaction or
    /// since the last commit that applied).
    dirty: bool,
    /// Reused encoding buffer.
    scratch: Vec<u8>,
}

impl Journal {
    pub(crate) fn new(pending: Arc<PendingUsers>) -> Journal {
        Journal {
            pending,
            heads: HashMap::new(),
            dedup: HashMap::new(),
            acks: HashMap::new(),
            placements: 0,
            oldest: None,
            dirty: false,
            scratch: Vec::new(),
        }
    }

    /// Whether nothing waits to be applied.
    pub(crate) fn is_empty(&self) -> bool {
        self.oldest.is_none()
    }

    /// When the oldest unapplied entry or ack arrived.
    pub(crate) fn oldest(&self) -> Option<Instant> {
        self.oldest
    }

    /// Placements waiting to be applied.
    pub(crate) fn placements(&self) -> usize {
        self.placements
    }

    /// Whether something was logged or acknowledged since the last `apply`.
    pub(crate) fn logged_since_apply(&self) -> bool {
        self.dirty
    }

    /// `user`'s head seq, counting entries logged and not yet applied.
    pub(super) fn head(&self, txn: &RoTxn, dbs: &Dbs, user: UserId) -> Result<u64, StoreError> {
        match self.heads.get(&user) {
            Some(head) => Ok(*head),
            // No unapplied placement: the derived head is current.
            None => schema::head(txn, dbs, user),
        }
    }

    /// Reserves the next seq of `user`'s timeline for `entry`.
    pub(super) fn place(
        &mut self,
        txn: &RoTxn,
        dbs: &Dbs,
        entry: &mut LoggedEntry,
        user: UserId,
        conv: Option<(u64, NoteKind)>,
    ) -> Result<u64, StoreError> {
        let seq = self
            .head(txn, dbs, user)?
            .checked_add(1)
            .ok_or(StoreError::Corrupt("timeline seq exhausted"))?;
        self.heads.insert(user, seq);
        entry.placements.push(Placement { user, seq, conv });
        Ok(seq)
    }

    /// Logs `entry` in the journal (inside the caller's transaction) and remembers its
    /// dedup entry until it is applied.
    pub(super) fn log(
        &mut self,
        txn: &mut RwTxn,
        dbs: &Dbs,
        entry: LoggedEntry,
    ) -> Result<(), StoreError> {
        assert!(entry.placements.len() <= JOURNAL_PLACEMENTS_MAX);
        for p in &entry.placements {
            self.pending.mark(p.user);
        }
        encode(&entry, &mut self.scratch);
        put_new(
            dbs.journal,
            txn,
            PutFlags::APPEND,
            &schema::msg_key(entry.msg_id),
            &self.scratch,
            "write journal",
            "journal entry exists",
        )?;
        if let Some((client_msg_id, sender_seq)) = entry.dedup {
            let first = DedupEntry {
                msg_id: entry.msg_id,
                sender_seq,
                sent_at_ms: entry.at_ms,
            };
            let previous = self.dedup.insert((entry.from, client_msg_id), first);
            debug_assert!(previous.is_none(), "a resend was logged as a first send");
        }
        self.placements += entry.placements.len();
        self.oldest.get_or_insert_with(Instant::now);
        self.dirty = true;
        Ok(())
    }

    /// The first send of `(from, client_msg_id)`, if it was logged and not yet applied.
    pub(super) fn dedup(&self, from: UserId, client_msg_id: u64) -> Option<DedupEntry> {
        self.dedup.get(&(from, client_msg_id)).copied()
    }

    /// Remembers that `device` of `user` stored every entry up to `up_to_seq`; applied (and
    /// its delivery receipts sent) with the journal.
    pub(crate) fn device_ack(&mut self, user: UserId, device: &str, up_to_seq: u64) {
        let seq = self.acks.entry((user, device.to_owned())).or_insert(0);
        *seq = (*seq).max(up_to_seq);
        self.oldest.get_or_insert_with(Instant::now);
        self.dirty = true;
    }

    /// Applies every journal entry and pending device ack to the derived tables and
    /// empties the journal, inside `txn`. Delivery receipts the acks call for are logged
    /// and applied in the same transaction; their deliveries are added to `deliveries`.
    /// After the commit succeeds, call `applied`.
    pub(crate) fn apply(
        &mut self,
        txn: &mut RwTxn,
        store: &Store,
        at_ms: u64,
        deliveries: &mut Vec<Delivery>,
    ) -> Result<(), StoreError> {
        let dbs = store.dbs();
        apply_logged(txn, dbs)?;
        if !self.acks.is_empty() {
            let mut acks: Vec<(&(UserId, String), &u64)> = self.acks.iter().collect();
            // Key order: each user's rows are written together, and the receipts (new
            // entries) come out in the same order on every run.
            acks.sort_unstable();
            let acks: Vec<(UserId, String, u64)> = acks
                .into_iter()
                .map(|((user, device), seq)| (*user, device.clone(), *seq))
                .collect();
            for (user, device, up_to_seq) in acks {
                let acked = apply_device_ack(txn, dbs, user, &device, up_to_seq)?;
                receipts::on_device_ack(txn, dbs, self, user, acked, at_ms, deliveries)?;
            }
            // The receipts just logged.
            apply_logged(txn, dbs)?;
        }
        self.dirty = false;
        Ok(())
    }

    /// The transaction holding an `apply` committed: nothing is pending any more.
    pub(crate) fn applied(&mut self) {
        self.heads.clear();
        self.dedup.clear();
        self.acks.clear();
        self.placements = 0;
        self.oldest = None;
        self.dirty = false;
        self.pending.clear_all();
    }

    /// A transaction failed: forgets what it logged by rebuilding the memory of unapplied
    /// entries from the committed journal. Pending device acks are kept (they were never
    /// in a transaction).
    pub(crate) fn reload(&mut self, store: &Store) -> Result<(), StoreError> {
        let view = store.read()?;
        let txn = view.txn();
        let dbs = store.dbs();
        self.heads.clear();
        self.dedup.clear();
        self.placements = 0;
        let mut any = false;
        for item in dbs
            .journal
            .iter(txn)
            .map_err(StoreError::lmdb("open journal"))?
        {
            let (key, value) = item.map_err(StoreError::lmdb("read journal"))?;
            let entry = decode(schema::decode_u64(key, "journal key")?, value)?;
            any = true;
            for p in &entry.placements {
                self.pending.mark(p.user);
                let head = self.heads.entry(p.user).or_insert(0);
                *head = (*head).max(p.seq);
            }
            self.placements += entry.placements.len();
            if let Some((client_msg_id, sender_seq)) = entry.dedup {
                self.dedup.insert(
                    (entry.from, client_msg_id),
                    DedupEntry {
                        msg_id: entry.msg_id,
                        sender_seq,
                        sent_at_ms: entry.at_ms,
                    },
                );
            }
        }
        self.dirty = any || !self.acks.is_empty();
        // A failed transaction restarts the interval: an apply that cannot commit (a full
        // map) is retried an interval later, not in a loop.
        self.oldest = self.dirty.then(Instant::now);
        Ok(())
    }

    /// At start-up: applies what a previous run logged and did not apply, in one
    /// transaction. Returns the number of journal entries applied.
    pub(crate) fn recover(&mut self, store: &Store) -> Result<u64, StoreError> {
        let (_gate, mut txn) = store.write_txn()?;
        let entries = store
            .dbs()
            .journal
            .len(&txn)
            .map_err(StoreError::lmdb("count journal"))?;
        if entries > 0 {
            apply_logged(&mut txn, store.dbs())?;
            txn.commit()
                .map_err(StoreError::lmdb("commit recovery txn"))?;
        }
        self.applied();
        Ok(entries)
    }
}

/// Applies every entry in the journal to the derived tables, then empties it.
fn apply_logged(txn: &mut RwTxn, dbs: &Dbs) -> Result<(), StoreError> {
    // (user, seq, msg id, conv, from, at_ms) of every placement, and the dedup entries.
    let mut rows: Vec<(Placement, u64, UserId, u64)> = Vec::new();
    let mut dedups: Vec<([u8; 16], DedupEntry)> = Vec::new();
    for item in dbs
        .journal
        .iter(txn)
        .map_err(StoreError::lmdb("open journal"))?
    {
        let (key, value) = item.map_err(StoreError::lmdb("read journal"))?;
        let entry = decode(schema::decode_u64(key, "journal key")?, value)?;
        for p in &entry.placements {
            rows.push((*p, entry.msg_id, entry.from, entry.at_ms));
        }
        if let Some((client_msg_id, sender_seq)) = entry.dedup {
            dedups.push((
                schema::dedup_key(entry.from, client_msg_id),
                DedupEntry {
                    msg_id: entry.msg_id,
                    sender_seq,
                    sent_at_ms: entry.at_ms,
                },
            ));
        }
    }
    if rows.is_empty() && dedups.is_empty() {
        return Ok(());
    }
    // One user's rows together and in seq order: each leaf page is rewritten once, and the
    // contiguity check below needs seq order.
    rows.sort_unstable_by_key(|(p, ..)| (p.user, p.seq));
    // One user's entries per conversation, in seq order: each conversation's state and
    // activity order move once per apply.
    let mut noted: Vec<(u64, Noted)> = Vec::new();
    let mut index = 0;
    while index < rows.len() {
        let user = rows[index].0.user;
        let mut head = schema::head(txn, dbs, user)?;
        noted.clear();
        while index < rows.len() && rows[index].0.user == user {
            let (p, msg_id, from, at_ms) = rows[index];
            // Invariant: a timeline holds exactly seqs 1..=head, and the journal continues
            // it without a gap or an overlap.
            if p.seq != head + 1 {
                return Err(StoreError::Corrupt("journal does not continue a timeline"));
            }
            put_new(
                dbs.timelines,
                txn,
                PutFlags::NO_OVERWRITE,
                &schema::timeline_key(user, p.seq),
                &schema::msg_key(msg_id),
                "write timeline",
                "timeline entry past head",
            )?;
            if let Some((conv, kind)) = p.conv {
                let entry = Noted {
                    seq: p.seq,
                    msg_id,
                    from,
                    at_ms,
                    kind,
                };
                noted.push((conv, entry));
            }
            head = p.seq;
            index += 1;
        }
        dbs.heads
            .put(txn, &schema::user_key(user), &head.to_be_bytes())
            .map_err(StoreError::lmdb("write head"))?;
        // Stable: within a conversation the entries stay in seq order.
        noted.sort_by_key(|(conv, _)| *conv);
        for run in noted.chunk_by(|a, b| a.0 == b.0) {
            let entries: Vec<Noted> = run.iter().map(|(_, n)| *n).collect();
            conversations::note_run(txn, dbs, user, run[0].0, &entries)?;
        }
    }
    dedups.sort_unstable_by_key(|(key, _)| *key);
    for (key, first) in dedups {
        put_new(
            dbs.dedup,
            txn,
            PutFlags::NO_OVERWRITE,
            &key,
            &first.encode(),
            "write dedup",
            "dedup entry exists",
        )?;
    }
    dbs.journal
        .clear(txn)
        .map_err(StoreError::lmdb("clear journal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let mut entry = LoggedEntry::new(7, UserId(3), 1_700_000_000_000);
        entry.placements.push(Placement {
            user: UserId(4),
            seq: 9,
            conv: Some((3, NoteKind::Message)),
        });
        entry.placements.push(Placement {
            user: UserId(3),
            seq: 2,
            conv: None,
        });
        entry.set_dedup(55, 2);
        let mut bytes = Vec::new();
        encode(&entry, &mut bytes);
        let back = decode(7, &bytes).unwrap();
        assert_eq!(back.from, entry.from);
        assert_eq!(back.at_ms, entry.at_ms);
        assert_eq!(back.dedup, Some((55, 2)));
        assert_eq!(back.placements, entry.placements);
        // A cut or padded value is damage, not a panic.
        assert!(decode(7, &bytes[..bytes.len() - 1]).is_err());
        bytes.push(0);
        assert!(decode(7, &bytes).is_err());
        assert!(decode(7, &[0; 10]).is_err());
    }

    #[test]
    fn pending_users_bits() {
        let pending = PendingUsers::new();
        assert!(!pending.contains(UserId(1)));
        pending.mark(UserId(1));
        assert!(pending.contains(UserId(1)));
        pending.clear_all();
        assert!(!pending.contains(UserId(1)));
    }
}
