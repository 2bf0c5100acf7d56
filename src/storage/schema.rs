//! The LMDB schema: database names, key and value layouts, and the helpers that encode them.
//!
//! Every integer in a key or value is big-endian, so LMDB's byte order is numeric order and
//! a range scan over `user ‖ seq` walks one timeline in seq order.
//!
//! | database      | key                               | value                                 |
//! |---------------|-----------------------------------|---------------------------------------|
//! | `meta`        | counter name                      | u64                                   |
//! | `users`       | user name (UTF-8)                 | user id u64 ‖ password hash (UTF-8)   |
//! | `user_names`  | user id u64                       | user name (UTF-8)                     |
//! | `messages`    | msg id u64                        | archived `protocol::Message` (rkyv)   |
//! | `timelines`   | user id u64 ‖ seq u64             | msg id u64                            |
//! | `heads`       | user id u64                       | last seq of that timeline, u64        |
//! | `dedup`       | sender id u64 ‖ client msg id u64 | msg id u64 ‖ sender seq ‖ sent_at_ms  |
//! | `device_acks` | user id u64 ‖ device name         | acked seq u64                         |
//! | `groups`      | group id u64                      | owner u64 ‖ created ms u64 ‖ member count u32 ‖ name |
//! | `members`     | group id u64 ‖ user id u64        | role u8 (1 owner, 0 member)           |
//! | `user_groups` | user id u64 ‖ group id u64        | empty                                 |
//! | `conv_entries`| user ‖ conv u64 ‖ seq u64         | msg id u64 ‖ from id u64 ‖ flags u8   |
//! | `convs`       | user id u64 ‖ conv u64            | `ConvState` (5 × u64)                 |
//! | `conv_recent` | user id u64 ‖ last seq u64        | conv u64                              |
//! | `delivered`   | user id u64                       | seq u64: delivery receipts sent up to |
//! | `files`       | file id u64                       | `FileMeta` (owner, size, time, SHA-256, name, MIME) |
//! | `file_shares` | file id u64 ‖ user id or group conv u64 | empty: who may download       |
//! | `file_usage`  | user id u64                       | bytes of files the user stored u64    |
//! | `journal`     | msg id u64                        | placements of a logged, unapplied entry (`journal.rs`) |
//!
//! File contents live outside LMDB, in `<data>/files/<sha256 hex>` (content-addressed,
//! written to `files/tmp/` first, fsynced and renamed into place).
//!
//! `messages` also holds records (group messages, membership changes, read marks): the
//! value is then `protocol::RECORD_MARKER` followed by an archived `protocol::Record`.
//! A conversation id (`conv`) is the other user's id for 1:1, `GROUP_CONV_BIT | group id`
//! for a group. `conv_entries` lists the entries of one conversation in one user's
//! timeline (history pages read it backwards), `convs` holds each conversation's last
//! entry, read mark and unread count, and `conv_recent` orders conversations by their
//! last seq (the conversation list reads it backwards).
//!
//! `messages` and `journal` are the log: keys only grow, so they are appended (MDB_APPEND)
//! and a commit dirties only their tail pages. Every other table above `files` except
//! `users`, `user_names` and the group tables is derived from the log and brought up to
//! date in batches (`journal.rs`).
//!
//! This file must not hold a transaction or cache a counter: another process (the `tern
//! add-user` command) may write between two of our transactions, so counters are read
//! inside the transaction that bumps them.

use heed::types::Bytes;
use heed::{CommitOrAbort, Env, RoTxn, RwTxn, WithoutTls};

use super::StoreError;
use crate::ids::UserId;
use crate::limits::DEVICE_NAME_SIZE_MAX;

/// Every database in this schema is raw bytes both ways; the layouts above are encoded by
/// the helpers below, so no codec sits between the map and the caller.
pub(crate) type Db = heed::Database<'static, Bytes, Bytes>;

/// Version of the layout above. A store written by another layout is refused at open
/// rather than misread. 2: the `journal` table (entries are logged first and the derived
/// tables applied later), and a stored `FILE_MESSAGE` record's attachment carries the file's
/// SHA-256 (so version-1 records cannot be read as they are).
pub(crate) const SCHEMA_VERSION: u64 = 2;

/// Named databases in the schema; `max_dbs` of the environment.
pub(crate) const DATABASES_MAX: u32 = 24;

pub(crate) const META_SCHEMA_VERSION: &[u8] = b"schema_version";
pub(crate) const META_NEXT_USER_ID: &[u8] = b"next_user_id";
pub(crate) const META_NEXT_GROUP_ID: &[u8] = b"next_group_id";
pub(crate) const META_NEXT_FILE_ID: &[u8] = b"next_file_id";
/// Bytes of files the node stores (u64; absent: 0).
pub(crate) const META_FILES_BYTES: &[u8] = b"files_bytes";

/// Value of a `dedup` entry: what a resend's ack repeats.
pub(crate) const DEDUP_VALUE_SIZE: usize = 24;

/// Handles of the schema's databases. Plain integers inside: `Copy` and valid for the life
/// of the environment.
#[derive(Clone, Copy)]
pub(crate) struct Dbs {
    pub meta: Db,
    pub users: Db,
    pub user_names: Db,
    pub messages: Db,
    pub timelines: Db,
    pub heads: Db,
    pub dedup: Db,
    pub device_acks: Db,
    pub groups: Db,
    pub members: Db,
    pub user_groups: Db,
    pub conv_entries: Db,
    pub convs: Db,
    pub conv_recent: Db,
    pub delivered: Db,
    pub files: Db,
    pub file_shares: Db,
    pub file_usage: Db,
    pub journal: Db,
}

impl Dbs {
    /// Every table with its name, in the order of the layout above.
    pub(crate) fn named(&self) -> [(&'static str, Db); 19] {
        [
            ("meta", self.meta),
            ("users", self.users),
            ("user_names", self.user_names),
            ("messages", self.messages),
            ("timelines", self.timelines),
            ("heads", self.heads),
            ("dedup", self.dedup),
            ("device_acks", self.device_acks),
            ("groups", self.groups),
            ("members", self.members),
            ("user_groups", self.user_groups),
            ("conv_entries", self.conv_entries),
            ("convs", self.convs),
            ("conv_recent", self.conv_recent),
            ("delivered", self.delivered),
            ("files", self.files),
            ("file_shares", self.file_shares),
            ("file_usage", self.file_usage),
            ("journal", self.journal),
        ]
    }
}

/// Creates (or opens) every database and records the schema version, in one transaction.
pub(crate) fn create(env: &Env<WithoutTls>) -> Result<Dbs, StoreError> {
    let wtxn = env
        .write_txn()
        .map_err(StoreError::lmdb("begin schema txn"))?;
    let outcome = env
        .create_databases_and_commit(wtxn, |opener, wtxn| -> Result<_, heed::Error> {
            let meta: heed::Database<'_, Bytes, Bytes> =
                opener.create_database(wtxn, Some("meta"))?;
            match meta.get(wtxn, META_SCHEMA_VERSION)? {
                None => meta.put(wtxn, META_SCHEMA_VERSION, &SCHEMA_VERSION.to_be_bytes())?,
                Some(v) if v == SCHEMA_VERSION.to_be_bytes() => {}
                Some(_) => return Ok(CommitOrAbort::Abort(StoreError::Corrupt("schema version"))),
            }
            Ok(CommitOrAbort::Commit((
                meta,
                opener.create_database(wtxn, Some("users"))?,
                opener.create_database(wtxn, Some("user_names"))?,
                opener.create_database(wtxn, Some("messages"))?,
                opener.create_database(wtxn, Some("timelines"))?,
                opener.create_database(wtxn, Some("heads"))?,
                opener.create_database(wtxn, Some("dedup"))?,
                opener.create_database(wtxn, Some("device_acks"))?,
                (
                    opener.create_database(wtxn, Some("groups"))?,
                    opener.create_database(wtxn, Some("members"))?,
                    opener.create_database(wtxn, Some("user_groups"))?,
                    opener.create_database(wtxn, Some("conv_entries"))?,
                    opener.create_database(wtxn, Some("convs"))?,
                    opener.create_database(wtxn, Some("conv_recent"))?,
                    opener.create_database(wtxn, Some("delivered"))?,
                ),
                (
                    opener.create_database(wtxn, Some("files"))?,
                    opener.create_database(wtxn, Some("file_shares"))?,
                    opener.create_database(wtxn, Some("file_usage"))?,
                    opener.create_database(wtxn, Some("journal"))?,
                ),
            )))
        })
        .map_err(StoreError::lmdb("create databases"))?;
    match outcome {
        CommitOrAbort::Commit((
            meta,
            users,
            user_names,
            messages,
            timelines,
            heads,
            dedup,
            device_acks,
            (groups, members, user_groups, conv_entries, convs, conv_recent, delivered),
            (files, file_shares, file_usage, journal),
        )) => Ok(Dbs {
            meta,
            users,
            user_names,
            messages,
            timelines,
            heads,
            dedup,
            device_acks,
            groups,
            members,
            user_groups,
            conv_entries,
            convs,
            conv_recent,
            delivered,
            files,
            file_shares,
            file_usage,
            journal,
        }),
        CommitOrAbort::Abort(error) => Err(error),
    }
}

pub(crate) fn user_key(user: UserId) -> [u8; 8] {
    user.0.to_be_bytes()
}

pub(crate) fn msg_key(msg_id: u64) -> [u8; 8] {
    msg_id.to_be_bytes()
}

pub(crate) fn pair_key(a: u64, b: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&a.to_be_bytes());
    key[8..].copy_from_slice(&b.to_be_bytes());
    key
}

pub(crate) fn timeline_key(user: UserId, seq: u64) -> [u8; 16] {
    pair_key(user.0, seq)
}

pub(crate) fn dedup_key(from: UserId, client_msg_id: u64) -> [u8; 16] {
    pair_key(from.0, client_msg_id)
}

pub(crate) fn triple_key(a: u64, b: u64, c: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&a.to_be_bytes());
    key[8..16].copy_from_slice(&b.to_be_bytes());
    key[16..].copy_from_slice(&c.to_be_bytes());
    key
}

/// `user ‖ device` on the stack. Device names are bounded, so the key always fits LMDB's
/// 511-byte key limit.
pub(crate) struct DeviceKey {
    buf: [u8; 8 + DEVICE_NAME_SIZE_MAX],
    len: usize,
}

impl DeviceKey {
    /// `None` for a name no device can have (empty or over `DEVICE_NAME_SIZE_MAX`).
    pub(crate) fn new(user: UserId, device: &str) -> Option<DeviceKey> {
        if device.is_empty() || device.len() > DEVICE_NAME_SIZE_MAX {
            return None;
        }
        let mut buf = [0u8; 8 + DEVICE_NAME_SIZE_MAX];
        buf[..8].copy_from_slice(&user.0.to_be_bytes());
        buf[8..8 + device.len()].copy_from_slice(device.as_bytes());
        Some(DeviceKey {
            buf,
            len: 8 + device.len(),
        })
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Decodes a big-endian u64 value; `what` names the value in the corruption error.
pub(crate) fn decode_u64(bytes: &[u8], what: &'static str) -> Result<u64, StoreError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StoreError::Corrupt(what))?;
    Ok(u64::from_be_bytes(array))
}

/// Splits a 16-byte `a ‖ b` key.
pub(crate) fn decode_pair(bytes: &[u8], what: &'static str) -> Result<(u64, u64), StoreError> {
    if bytes.len() != 16 {
        return Err(StoreError::Corrupt(what));
    }
    Ok((
        decode_u64(&bytes[..8], what)?,
        decode_u64(&bytes[8..], what)?,
    ))
}

/// A `dedup` value: what the first ack of a message said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupEntry {
    pub msg_id: u64,
    pub sender_seq: u64,
    pub sent_at_ms: u64,
}

impl DedupEntry {
    pub(crate) fn encode(&self) -> [u8; DEDUP_VALUE_SIZE] {
        let mut value = [0u8; DEDUP_VALUE_SIZE];
        value[..8].copy_from_slice(&self.msg_id.to_be_bytes());
        value[8..16].copy_from_slice(&self.sender_seq.to_be_bytes());
        value[16..].copy_from_slice(&self.sent_at_ms.to_be_bytes());
        value
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<DedupEntry, StoreError> {
        const WHAT: &str = "dedup value length";
        if bytes.len() != DEDUP_VALUE_SIZE {
            return Err(StoreError::Corrupt(WHAT));
        }
        Ok(DedupEntry {
            msg_id: decode_u64(&bytes[..8], WHAT)?,
            sender_seq: decode_u64(&bytes[8..16], WHAT)?,
            sent_at_ms: decode_u64(&bytes[16..], WHAT)?,
        })
    }
}

/// Reads a counter; a missing counter starts at 1 (ids and seqs are never 0).
pub(crate) fn counter_next(txn: &RoTxn, dbs: &Dbs, name: &'static [u8]) -> Result<u64, StoreError> {
    match dbs
        .meta
        .get(txn, name)
        .map_err(StoreError::lmdb("read counter"))?
    {
        None => Ok(1),
        Some(bytes) => match decode_u64(bytes, "counter value length")? {
            // A stored counter is always an id not yet handed out, so at least 1 and below
            // u64::MAX (the next bump must not wrap).
            0 => Err(StoreError::Corrupt("counter is zero")),
            u64::MAX => Err(StoreError::Corrupt("counter exhausted")),
            next => Ok(next),
        },
    }
}

pub(crate) fn counter_set(
    txn: &mut RwTxn,
    dbs: &Dbs,
    name: &'static [u8],
    next: u64,
) -> Result<(), StoreError> {
    dbs.meta
        .put(txn, name, &next.to_be_bytes())
        .map_err(StoreError::lmdb("write counter"))
}

/// Last seq of `user`'s timeline, 0 when it is empty.
pub(crate) fn head(txn: &RoTxn, dbs: &Dbs, user: UserId) -> Result<u64, StoreError> {
    match dbs
        .heads
        .get(txn, &user_key(user))
        .map_err(StoreError::lmdb("read head"))?
    {
        None => Ok(0),
        Some(bytes) => decode_u64(bytes, "head value length"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically() {
        // Big-endian keys make LMDB's byte order numeric: seq 255 before seq 256, and every
        // entry of user 1 before any of user 2.
        assert!(timeline_key(UserId(1), 255) < timeline_key(UserId(1), 256));
        assert!(timeline_key(UserId(1), u64::MAX) < timeline_key(UserId(2), 1));
        assert_eq!(decode_pair(&pair_key(7, 9), "x").unwrap(), (7, 9));
        assert!(matches!(
            decode_pair(&[0; 15], "x"),
            Err(StoreError::Corrupt("x"))
        ));
        assert!(matches!(
            decode_u64(&[0; 7], "y"),
            Err(StoreError::Corrupt("y"))
        ));
    }

    #[test]
    fn device_key_bounds() {
        let key = DeviceKey::new(UserId(3), "phone").unwrap();
        assert_eq!(&key.as_bytes()[..8], &3u64.to_be_bytes());
        assert_eq!(&key.as_bytes()[8..], b"phone");
        assert!(DeviceKey::new(UserId(3), "").is_none());
        let long = "d".repeat(DEVICE_NAME_SIZE_MAX + 1);
        assert!(DeviceKey::new(UserId(3), &long).is_none());
        let max = "d".repeat(DEVICE_NAME_SIZE_MAX);
        assert_eq!(
            DeviceKey::new(UserId(3), &max).unwrap().as_bytes().len(),
            8 + max.len()
        );
    }

    #[test]
    fn dedup_entry_round_trip() {
        let entry = DedupEntry {
            msg_id: 1,
            sender_seq: u64::MAX,
            sent_at_ms: 1 << 40,
        };
        assert_eq!(DedupEntry::decode(&entry.encode()).unwrap(), entry);
        assert!(DedupEntry::decode(&[0; 16]).is_err());
    }
}
