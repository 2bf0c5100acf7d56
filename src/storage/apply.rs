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
use super::receipts;
use super::schema::{self, Dbs, DedupEntry, DeviceKey, META_NEXT_MSG_ID};
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
        | WriteOp::Account(_) => Ok(()),
        WriteOp::DeviceAck { user, device, .. } => match DeviceKey::new(*user, device) {
            Some(_) => Ok(()),
            None => Err(StoreError::InvalidArgument("device name")),
        },
    }
}

/// Applies `ops` in one write transaction and commits it. On success `results` and
/// `deliveries` hold what the ops produced; on error nothing was committed and what was
/// pushed to them must be discarded.
pub(super) fn in_one_txn(
    store: &Store,
    ops: &mut [WriteOp],
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let dbs = store.dbs();
    // The gate keeps the map from being resized under the transaction (`Store::write_txn`).
    let (_gate, mut txn) = store.write_txn()?;
    for op in ops.iter_mut() {
        match op {
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
                apply_send(&mut txn, dbs, send, results, deliveries)?;
            }
            WriteOp::DeviceAck {
                user,
                device,
                up_to_seq,
            } => {
                let acked = apply_device_ack(&mut txn, dbs, *user, device, *up_to_seq)?;
                receipts::on_device_ack(&mut txn, dbs, *user, acked, wall_clock_ms(), deliveries)?;
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
                groups::apply_group_op(&mut txn, dbs, fields, results, deliveries)?;
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
                groups::apply_group_send(&mut txn, dbs, fields, results, deliveries)?;
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
                    &mut txn, dbs, *origin, *user, user_name, *conv, *up_to_seq, *at_ms, results,
                    deliveries,
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
                files::apply_file_send(&mut txn, dbs, fields, results, deliveries)?;
            }
            WriteOp::Account(op) => super::account::apply_account(&mut txn, dbs, op, results)?,
        }
    }
    // Dropping `txn` on an error above aborts it.
    txn.commit().map_err(StoreError::lmdb("commit write txn"))
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
    mut send: SendFields<'_>,
    results: &mut Vec<OpResult>,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let dedup_key = schema::dedup_key(send.from, send.client_msg_id);
    if ack_resend(txn, dbs, &dedup_key, send.origin, results)? {
        return Ok(());
    }

    let msg_id = schema::counter_next(txn, dbs, META_NEXT_MSG_ID)?;
    let message: Arc<[u8]> = archive_message(msg_id, &mut send)?.into();
    put_new(
        dbs.messages,
        txn,
        PutFlags::APPEND,
        &schema::msg_key(msg_id),
        &message,
        "write message",
        "message id reused",
    )?;
    schema::counter_set(txn, dbs, META_NEXT_MSG_ID, msg_id + 1)?;

    let to_seq = append_to_timeline(txn, dbs, send.to, msg_id)?;
    conversations::note(
        txn,
        dbs,
        send.to,
        send.from.0,
        to_seq,
        msg_id,
        send.from,
        send.sent_at_ms,
        NoteKind::Message,
    )?;
    let from_seq = if send.from == send.to {
        // A note to oneself is one entry, seen once by each of the user's devices.
        to_seq
    } else {
        let seq = append_to_timeline(txn, dbs, send.from, msg_id)?;
        conversations::note(
            txn,
            dbs,
            send.from,
            send.to.0,
            seq,
            msg_id,
            send.from,
            send.sent_at_ms,
            NoteKind::Message,
        )?;
        seq
    };
    ack_first_send(
        txn,
        dbs,
        &dedup_key,
        send.origin,
        msg_id,
        from_seq,
        send.sent_at_ms,
        results,
    )?;
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

/// Takes the next message id (records share the id space of messages).
pub(super) fn next_msg_id(txn: &mut RwTxn, dbs: &Dbs) -> Result<u64, StoreError> {
    let msg_id = schema::counter_next(txn, dbs, META_NEXT_MSG_ID)?;
    schema::counter_set(txn, dbs, META_NEXT_MSG_ID, msg_id + 1)?;
    Ok(msg_id)
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

/// Appends `msg_id` to `user`'s timeline at head + 1 and moves the head. Returns the seq.
pub(super) fn append_to_timeline(
    txn: &mut RwTxn,
    dbs: &Dbs,
    user: UserId,
    msg_id: u64,
) -> Result<u64, StoreError> {
    let head = schema::head(txn, dbs, user)?;
    #[cfg(debug_assertions)]
    {
        // Invariant: a timeline holds exactly seqs 1..=head. Checked on the last entry.
        let last = last_timeline_seq(txn, dbs, user)?;
        assert_eq!(
            last, head,
            "timeline of {user:?} is out of step with its head"
        );
    }
    let seq = head
        .checked_add(1)
        .ok_or(StoreError::Corrupt("timeline seq exhausted"))?;
    put_new(
        dbs.timelines,
        txn,
        PutFlags::NO_OVERWRITE,
        &schema::timeline_key(user, seq),
        &schema::msg_key(msg_id),
        "write timeline",
        "timeline entry past head",
    )?;
    dbs.heads
        .put(txn, &schema::user_key(user), &seq.to_be_bytes())
        .map_err(StoreError::lmdb("write head"))?;
    Ok(seq)
}

/// Seq of the last entry in `user`'s timeline, 0 if it has none.
#[cfg(debug_assertions)]
fn last_timeline_seq(txn: &RwTxn, dbs: &Dbs, user: UserId) -> Result<u64, StoreError> {
    let mut entries = dbs
        .timelines
        .rev_prefix_iter(txn, &schema::user_key(user))
        .map_err(StoreError::lmdb("open timeline prefix"))?;
    match entries.next() {
        None => Ok(0),
        Some(entry) => {
            let (key, _) = entry.map_err(StoreError::lmdb("read timeline"))?;
            Ok(schema::decode_pair(key, "timeline key length")?.1)
        }
    }
}

/// Moves a device's cursor; returns the cursor now.
fn apply_device_ack(
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
/// earlier one (the transaction sees its own writes), acks with the first send's ids and
/// returns true.
pub(super) fn ack_resend(
    txn: &RwTxn,
    dbs: &Dbs,
    dedup_key: &[u8],
    origin: Origin,
    results: &mut Vec<OpResult>,
) -> Result<bool, StoreError> {
    let stored = dbs
        .dedup
        .get(txn, dedup_key)
        .map_err(StoreError::lmdb("read dedup"))?;
    let Some(value) = stored else {
        return Ok(false);
    };
    let first = DedupEntry::decode(value)?;
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

/// Records the dedup entry of a first send and acknowledges it: a resend of the same
/// (sender, client message id) finds the entry and gets this same ack back.
#[allow(clippy::too_many_arguments)]
pub(super) fn ack_first_send(
    txn: &mut RwTxn,
    dbs: &Dbs,
    dedup_key: &[u8],
    origin: Origin,
    msg_id: u64,
    sender_seq: u64,
    sent_at_ms: u64,
    results: &mut Vec<OpResult>,
) -> Result<(), StoreError> {
    let first = DedupEntry {
        msg_id,
        sender_seq,
        sent_at_ms,
    };
    put_new(
        dbs.dedup,
        txn,
        PutFlags::NO_OVERWRITE,
        dedup_key,
        &first.encode(),
        "write dedup",
        "dedup entry exists",
    )?;
    results.push(OpResult::SendAcked {
        origin,
        ack: SendAck {
            msg_id,
            seq: sender_seq,
            sent_at_ms,
            duplicate: false,
        },
    });
    Ok(())
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
