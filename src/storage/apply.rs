//! The schema rules of each write op, applied inside one LMDB write transaction.
//!
//! Everything here runs on the writer thread. An op either applies completely or returns an
//! error, after which the caller must drop the transaction (abort): nothing here commits a
//! part of an op, and nothing here may panic on what a client sent.

use std::sync::Arc;

use heed::{PutFlags, RwTxn};

use super::conversations::{self, NoteKind};
use super::files::{self, FileCommitFields, FileSendFields};
use super::groups::{self, GroupOpFields, GroupSendFields};
use super::journal::{Journal, LoggedEntry};
use super::schema::{self, Dbs, DedupEntry, DeviceKey};
use super::writer::{Delivery, OpResult, Origin, WriteOp};
use super::{Store, StoreError};
use crate::ids::UserId;
use crate::protocol::{ErrorCode, Message, RECORD_MARKER, Record, SendAck};

/// Bytes of an archived `Message` beyond its three strings: five u64 fields and three
/// string headers, rounded up. Only sizes the serialisation buffer.
const MESSAGE_ARCHIVE_OVERHEAD: usize = 64;

/// Refuses an op that can never apply, without a transaction: the writer fails it alone
/// instead of letting it abort its whole batch.
pub(super) fn check(op: &WriteOp) -> Result<(), StoreError> {
    match op {
        WriteOp::Send { .. }
        | WriteOp::GroupOp { .. }
        | WriteOp::GroupSend { .. }
        | WriteOp::Read { .. }
        | WriteOp::FileCommit { .. }
        | WriteOp::FileSend(_)
        | WriteOp::Flush { .. }
        | WriteOp::Account(_) => Ok(()),
        WriteOp::DeviceAck { user, device, .. } => match DeviceKey::new(*user, device) {
            Some(_) => Ok(()),
            None => Err(StoreError::InvalidArgument("device name")),
        },
    }
}

/// Whether a batch's transaction applies the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApplyJournal {
    /// Only where an op needs the derived tables current (`Read`, `Flush`).
    WhenNeeded,
    /// Also at the end of the batch (the journal is due: old or large enough).
    AtEnd,
}

/// Applies `ops` in one write transaction and commits it. On success `results` and
/// `deliveries` hold what the ops produced, and the return says whether the transaction
/// left the journal fully applied (then the caller calls `Journal::applied`). On error
/// nothing was committed: what was pushed to `results` and `deliveries` must be discarded
/// and the journal's memory reloaded (`Journal::reload`).
pub(super) fn in_one_txn(
    store: &Store,
    journal: &mut Journal,
    when: ApplyJournal,
    ops: &mut [WriteOp],
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<bool, StoreError> {
    let dbs = store.dbs();
    // The gate keeps the map from being resized under the transaction (`Store::write_txn`).
    let (_gate, mut txn) = store.write_txn()?;
    // Once the journal was applied in this transaction, it is applied again at the end, so
    // the transaction leaves nothing half-applied in the memory of the journal.
    let mut applied = false;
    for op in ops.iter_mut() {
        let needs_current = matches!(op, WriteOp::Read { .. } | WriteOp::Flush { .. });
        if needs_current && journal.logged_since_apply() {
            journal.apply(&mut txn, store, wall_clock_ms(), deliveries)?;
            applied = true;
        }
        match op {
            WriteOp::Flush { origin } => results.push(OpResult::Flushed { origin: *origin }),
            WriteOp::Send {
                origin,
                from,
                from_name,
                to,
                to_name,
                client_msg_id,
                text,
                sent_at_ms,
            } => {
                let send = SendFields {
                    origin: *origin,
                    from: *from,
                    from_name,
                    to: *to,
                    to_name,
                    client_msg_id: *client_msg_id,
                    text,
                    sent_at_ms: *sent_at_ms,
                };
                apply_send(&mut txn, dbs, journal, send, results, deliveries)?;
            }
            WriteOp::DeviceAck {
                user,
                device,
                up_to_seq,
            } => {
                // Clamped now, not when the journal is applied: entries logged after this
                // ack were not on the device, and must not move its cursor or send
                // delivery receipts for them.
                let head = journal.head(&txn, dbs, *user)?;
                journal.device_ack(*user, device, (*up_to_seq).min(head));
            }
            WriteOp::GroupOp {
                origin,
                actor,
                actor_name,
                op,
                group_id,
                name,
                users,
                at_ms,
            } => {
                let fields = GroupOpFields {
                    origin: *origin,
                    actor: *actor,
                    actor_name,
                    op: *op,
                    group_id: *group_id,
                    name,
                    users,
                    at_ms: *at_ms,
                };
                groups::apply_group_op(&mut txn, dbs, journal, fields, results, deliveries)?;
            }
            WriteOp::GroupSend {
                origin,
                from,
                from_name,
                group_id,
                client_msg_id,
                text,
                sent_at_ms,
            } => {
                let fields = GroupSendFields {
                    origin: *origin,
                    from: *from,
                    from_name,
                    group_id: *group_id,
                    client_msg_id: *client_msg_id,
                    text,
                    sent_at_ms: *sent_at_ms,
                };
                groups::apply_group_send(&mut txn, dbs, journal, fields, results, deliveries)?;
            }
            WriteOp::Read {
                origin,
                user,
                user_name,
                conv,
                up_to_seq,
                at_ms,
            } => {
                conversations::apply_read(
                    &mut txn, dbs, journal, *origin, *user, user_name, *conv, *up_to_seq, *at_ms,
                    results, deliveries,
                )?;
            }
            WriteOp::FileCommit {
                origin,
                owner,
                name,
                mime,
                size,
                sha256,
                at_ms,
            } => {
                let fields = FileCommitFields {
                    origin: *origin,
                    owner: *owner,
                    name,
                    mime,
                    size: *size,
                    sha256: *sha256,
                    files_dir: store.files_dir(),
                    at_ms: *at_ms,
                };
                files::apply_file_commit(&mut txn, dbs, fields, results)?;
            }
            WriteOp::FileSend(op) => {
                let fields = FileSendFields {
                    origin: op.origin,
                    from: op.from,
                    from_name: &op.from_name,
                    to: op.to,
                    group_id: op.group_id,
                    client_msg_id: op.client_msg_id,
                    file_id: op.file_id,
                    thumbnail_id: op.thumbnail_id,
                    media: op.media,
                    duration_ms: op.duration_ms,
                    width: op.width,
                    height: op.height,
                    text: &op.text,
                    sent_at_ms: op.sent_at_ms,
                };
                files::apply_file_send(&mut txn, dbs, journal, fields, results, deliveries)?;
            }
            WriteOp::Account(op) => super::account::apply_account(&mut txn, dbs, op, results)?,
        }
    }
    let at_end = applied || (when == ApplyJournal::AtEnd && !journal.is_empty());
    if at_end && journal.logged_since_apply() {
        journal.apply(&mut txn, store, wall_clock_ms(), deliveries)?;
    }
    // Dropping `txn` on an error above aborts it.
    txn.commit().map_err(StoreError::lmdb("commit write txn"))?;
    Ok(at_end)
}

/// The fields of a `WriteOp::Send`, with the strings borrowed mutably: they are moved into
/// the archived message and moved back afterwards, so the op stays whole for a retry
/// without copying the text.
struct SendFields<'a> {
    origin: Origin,
    from: UserId,
    from_name: &'a mut String,
    to: UserId,
    to_name: &'a mut String,
    client_msg_id: u64,
    text: &'a mut String,
    sent_at_ms: u64,
}

fn apply_send(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    mut send: SendFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    if ack_resend(
        txn,
        dbs,
        journal,
        send.from,
        send.client_msg_id,
        send.origin,
        results,
    )? {
        return Ok(());
    }

    let msg_id = next_msg_id(txn, dbs)?;
    let message: Arc<[u8]> = archive_message(msg_id, &mut send)?.into();
    put_message(txn, dbs, msg_id, &message)?;

    let mut entry = LoggedEntry::new(msg_id, send.from, send.sent_at_ms);
    // Each side of a 1:1 conversation names it by the other user.
    let to_seq = journal.place(
        txn,
        dbs,
        &mut entry,
        send.to,
        Some((send.from.0, NoteKind::Message)),
    )?;
    let from_seq = if send.from == send.to {
        // A note to oneself is one entry, seen once by each of the user's devices.
        to_seq
    } else {
        journal.place(
            txn,
            dbs,
            &mut entry,
            send.from,
            Some((send.to.0, NoteKind::Message)),
        )?
    };
    entry.set_dedup(send.client_msg_id, from_seq);
    journal.log(txn, dbs, entry)?;
    ack_first_send(send.origin, msg_id, from_seq, send.sent_at_ms, results);
    if send.from != send.to {
        deliveries.push(Delivery {
            user: send.to,
            seq: to_seq,
            message: Arc::clone(&message),
        });
    }
    deliveries.push(Delivery {
        user: send.from,
        seq: from_seq,
        message,
    });
    Ok(())
}

/// Archives the stored form of a send: the archived `protocol::Message`, exactly the bytes
/// that are stored, synced and pushed.
fn archive_message(msg_id: u64, send: &mut SendFields<'_>) -> Result<Vec<u8>, StoreError> {
    let message = Message {
        msg_id,
        from_id: send.from.0,
        from: std::mem::take(send.from_name),
        to_id: send.to.0,
        to: std::mem::take(send.to_name),
        client_msg_id: send.client_msg_id,
        sent_at_ms: send.sent_at_ms,
        text: std::mem::take(send.text),
    };
    let capacity =
        MESSAGE_ARCHIVE_OVERHEAD + message.from.len() + message.to.len() + message.text.len();
    let archived = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Failure>(
        &message,
        Vec::with_capacity(capacity),
    );
    // Give the strings back whatever happened: the op is retried alone if the batch fails.
    *send.from_name = message.from;
    *send.to_name = message.to;
    *send.text = message.text;
    // Serialising into a Vec fails only if a relative pointer overflows 32 bits, i.e. for
    // strings far past every limit the shard checks.
    archived.map_err(|_| StoreError::InvalidArgument("message too large to archive"))
}

/// The next message id (records share the id space of messages): one past the last key of
/// `messages`, which is where every id lives and only grows. Reading it from the tail page
/// (which the commit rewrites anyway) instead of a counter keeps the meta page out of each
/// commit. The caller stores the new entry under this id before asking again.
pub(super) fn next_msg_id(txn: &RwTxn, dbs: &Dbs) -> Result<u64, StoreError> {
    let last = dbs
        .messages
        .last(txn)
        .map_err(StoreError::lmdb("read last message id"))?;
    let next = match last {
        None => 1,
        Some((key, _)) => schema::decode_u64(key, "message key length")?
            .checked_add(1)
            .ok_or(StoreError::Corrupt("message ids exhausted"))?,
    };
    Ok(next)
}

/// Stores the bytes of a new message or record under `msg_id`.
pub(super) fn put_message(
    txn: &mut RwTxn,
    dbs: &Dbs,
    msg_id: u64,
    bytes: &[u8],
) -> Result<(), StoreError> {
    put_new(
        dbs.messages,
        txn,
        PutFlags::APPEND,
        &schema::msg_key(msg_id),
        bytes,
        "write message",
        "message id reused",
    )
}

/// The stored form of a record: `RECORD_MARKER` followed by the archived `Record`.
pub(super) fn archive_record(record: &Record) -> Result<Vec<u8>, StoreError> {
    let capacity = RECORD_MARKER.len()
        + MESSAGE_ARCHIVE_OVERHEAD
        + 32
        + record.from.len()
        + record.text.len()
        + 8 * record.users.len();
    let mut buf = Vec::with_capacity(capacity);
    buf.extend_from_slice(&RECORD_MARKER);
    // Relative pointers make the archive independent of where it starts in the buffer.
    rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Failure>(record, buf)
        .map_err(|_| StoreError::InvalidArgument("record too large to archive"))
}

/// Moves a device's cursor; returns the cursor now.
pub(super) fn apply_device_ack(
    txn: &mut RwTxn,
    dbs: &Dbs,
    user: UserId,
    device: &str,
    up_to_seq: u64,
) -> Result<u64, StoreError> {
    let key = DeviceKey::new(user, device).ok_or(StoreError::InvalidArgument("device name"))?;
    let head = schema::head(txn, dbs, user)?;
    let old = match dbs
        .device_acks
        .get(txn, key.as_bytes())
        .map_err(StoreError::lmdb("read device ack"))?
    {
        None => 0,
        Some(bytes) => schema::decode_u64(bytes, "device ack value length")?,
    };
    // Forward only, and never past what exists: a device cannot have stored an entry that
    // was not written yet.
    let new = old.max(up_to_seq.min(head));
    if new != old {
        dbs.device_acks
            .put(txn, key.as_bytes(), &new.to_be_bytes())
            .map_err(StoreError::lmdb("write device ack"))?;
    }
    Ok(new)
}

/// Unix ms for records the writer makes on its own (delivery receipts).
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Answers a resend: when (sender, client message id) was stored before, in this batch or an
/// earlier one (logged and not yet applied, or in `dedup`), acks with the first send's ids
/// and returns true.
pub(super) fn ack_resend(
    txn: &RwTxn,
    dbs: &Dbs,
    journal: &Journal,
    from: UserId,
    client_msg_id: u64,
    origin: Origin,
    results: &mut Vec<OpResult>,
) -> Result<bool, StoreError> {
    let first = match journal.dedup(from, client_msg_id) {
        Some(first) => first,
        None => {
            let stored = dbs
                .dedup
                .get(txn, &schema::dedup_key(from, client_msg_id))
                .map_err(StoreError::lmdb("read dedup"))?;
            let Some(value) = stored else {
                return Ok(false);
            };
            DedupEntry::decode(value)?
        }
    };
    results.push(OpResult::SendAcked {
        origin,
        ack: SendAck {
            msg_id: first.msg_id,
            seq: first.sender_seq,
            sent_at_ms: first.sent_at_ms,
            duplicate: true,
        },
    });
    Ok(true)
}

/// A refusal of an op that wrote nothing.
pub(super) fn refuse(
    results: &mut Vec<OpResult>,
    origin: Origin,
    code: ErrorCode,
    message: &'static str,
) {
    results.push(OpResult::Refused {
        origin,
        code,
        message,
    });
}

/// Acknowledges a first send. Its dedup entry travels in its journal entry
/// (`LoggedEntry::set_dedup`), so a resend finds it and gets this same ack back.
pub(super) fn ack_first_send(
    origin: Origin,
    msg_id: u64,
    sender_seq: u64,
    sent_at_ms: u64,
    results: &mut Vec<OpResult>,
) {
    results.push(OpResult::SendAcked {
        origin,
        ack: SendAck {
            msg_id,
            seq: sender_seq,
            sent_at_ms,
            duplicate: false,
        },
    });
}

/// Puts a key that must not exist yet; finding it is a broken invariant of the stored data,
/// reported as `what`.
pub(super) fn put_new(
    db: schema::Db,
    txn: &mut RwTxn,
    flags: PutFlags,
    key: &[u8],
    value: &[u8],
    op: &'static str,
    what: &'static str,
) -> Result<(), StoreError> {
    match db.put_with_flags(txn, flags, key, value) {
        Ok(()) => Ok(()),
        Err(heed::Error::Mdb(heed::MdbError::KeyExist)) => Err(StoreError::Corrupt(what)),
        Err(error) => Err(StoreError::lmdb(op)(error)),
    }
}
