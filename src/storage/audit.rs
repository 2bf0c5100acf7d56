//! A consistency check of a whole store (`tern store check`, and the end of a kill loop):
//! what the invariants in docs/architecture.md promise, read back from the tables.
//!
//! In one read transaction: every user's timeline is contiguous from seq 1 to its head and
//! each entry's message is stored; every conversation's unread count equals a recount of
//! its entries after the read mark; every recorded file has its blob, of the recorded size
//! and SHA-256. Entries still in the journal are counted, not judged: the derived tables
//! may legitimately trail the log until the next apply (a clean stop leaves none).
//!
//! This module must not write, and must not hold its transaction beyond one call; the
//! check runs beside a live node (a long read transaction only pins old pages meanwhile).

use std::ops::Bound;

use super::{Store, StoreError, schema};
use crate::ids::UserId;

/// Most problems kept with their details; beyond it only the counts grow.
const AUDIT_DETAILS_MAX: usize = 100;

/// What `Store::audit` found. Clean when every count of problems is zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    pub users: u64,
    /// Timeline entries checked, over all users.
    pub timeline_entries: u64,
    /// Entries whose seq is not one past the previous one (a hole or a repeat), or past or
    /// short of the user's head.
    pub timeline_gaps: u64,
    /// Timeline entries whose message is not in `messages`.
    pub missing_messages: u64,
    pub conversations: u64,
    /// Conversations whose stored unread count differs from a recount.
    pub unread_mismatches: u64,
    pub files: u64,
    /// Recorded files whose blob is missing, short, long or of another SHA-256.
    pub bad_files: u64,
    /// Entries logged and not yet applied to the derived tables.
    pub journal_entries: u64,
    /// The first problems found, one line each (at most `AUDIT_DETAILS_MAX`).
    pub details: Vec<String>,
    /// Size of each table: where the store's bytes go.
    pub tables: Vec<TableStat>,
}

/// One table's entries and pages (LMDB's `mdb_stat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStat {
    pub name: &'static str,
    pub entries: u64,
    pub leaf_pages: u64,
    pub branch_pages: u64,
    pub overflow_pages: u64,
}

impl Audit {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.timeline_gaps == 0
            && self.missing_messages == 0
            && self.unread_mismatches == 0
            && self.bad_files == 0
    }

    pub(super) fn problem(&mut self, line: impl FnOnce() -> String) {
        if self.details.len() < AUDIT_DETAILS_MAX {
            self.details.push(line());
        }
    }
}

impl Store {
    /// Checks the whole store (module docs). Hashes every file blob, so it reads every
    /// byte of `files/`; takes one read transaction for the tables.
    pub fn audit(&self) -> Result<Audit, StoreError> {
        let view = self.read()?;
        let (txn, dbs) = (view.txn(), view.dbs());
        let mut audit = Audit {
            journal_entries: dbs
                .journal
                .len(txn)
                .map_err(StoreError::lmdb("count journal"))?,
            ..Audit::default()
        };
        for item in dbs
            .user_names
            .iter(txn)
            .map_err(StoreError::lmdb("open users"))?
        {
            let (key, _) = item.map_err(StoreError::lmdb("read user"))?;
            let user = UserId(schema::decode_u64(key, "user id key")?);
            audit.users += 1;
            audit_timeline(txn, dbs, user, &mut audit)?;
            super::conversations::audit_unread(txn, dbs, user, &mut audit)?;
        }
        super::files::audit_blobs(txn, dbs, self.files_dir(), &mut audit)?;
        for (name, db) in dbs.named() {
            let stat = db.stat(txn).map_err(StoreError::lmdb("table stat"))?;
            audit.tables.push(TableStat {
                name,
                entries: stat.entries as u64,
                leaf_pages: stat.leaf_pages as u64,
                branch_pages: stat.branch_pages as u64,
                overflow_pages: stat.overflow_pages as u64,
            });
        }
        Ok(audit)
    }
}

fn audit_timeline(
    txn: &heed::RoTxn<'_, heed::WithoutTls>,
    dbs: &schema::Dbs,
    user: UserId,
    audit: &mut Audit,
) -> Result<(), StoreError> {
    let head = schema::head(txn, dbs, user)?;
    let start = schema::timeline_key(user, 0);
    let end = schema::timeline_key(user, u64::MAX);
    let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
    let mut last = 0u64;
    for item in dbs
        .timelines
        .range(txn, &range)
        .map_err(StoreError::lmdb("open timeline"))?
    {
        let (key, value) = item.map_err(StoreError::lmdb("read timeline"))?;
        let seq = schema::decode_u64(&key[8..], "timeline key")?;
        let msg_id = schema::decode_u64(value, "timeline value")?;
        audit.timeline_entries += 1;
        if seq != last + 1 {
            audit.timeline_gaps += 1;
            audit.problem(|| format!("user {}: seq {seq} follows {last}", user.0));
        }
        last = seq;
        let stored = dbs
            .messages
            .get(txn, &schema::msg_key(msg_id))
            .map_err(StoreError::lmdb("read message"))?;
        if stored.is_none() {
            audit.missing_messages += 1;
            audit.problem(|| format!("user {}: seq {seq} names missing msg {msg_id}", user.0));
        }
    }
    if last != head {
        audit.timeline_gaps += 1;
        audit.problem(|| format!("user {}: timeline ends at {last}, head is {head}", user.0));
    }
    Ok(())
}
