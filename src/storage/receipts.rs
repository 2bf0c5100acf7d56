//! Delivery receipts: when the first device of a user acknowledges timeline entries, each
//! sender of a message among them gets one `DELIVERED` record in its timeline, naming the
//! newest of its messages that reached the user. Runs inside the writer's transaction
//! with the device ack that triggered it.
//!
//! Bounded per ack: at most `DELIVERY_SCAN_MAX` entries are examined; the per-user
//! `delivered` cursor remembers where the scan stopped, and the next ack goes on from there.

use std::ops::Bound;
use std::sync::Arc;

use heed::RwTxn;

use super::StoreError;
use super::apply::{archive_record, next_msg_id, put_message};
use super::journal::{Journal, LoggedEntry};
use super::schema::{self, Dbs};
use super::writer::Delivery;
use crate::ids::UserId;
use crate::limits::{DELIVERY_SCAN_MAX, GROUP_MEMBERS_MAX};
use crate::protocol::{self, ArchivedMessage, ArchivedRecord, Record, record_kind};

/// The sender and conversation (as the recipient names it) of a stored message, or None
/// for a record that is not a message.
fn message_origin(bytes: &[u8]) -> Result<Option<(UserId, u64)>, StoreError> {
    if protocol::is_record(bytes) {
        let record = rkyv::access::<ArchivedRecord, rkyv::rancor::Failure>(
            &bytes[protocol::RECORD_MARKER.len()..],
        )
        .map_err(|_| StoreError::Corrupt("stored record"))?;
        let from = record.from_id.to_native();
        let conv = record.conv.to_native();
        return Ok(match record.kind.to_native() {
            record_kind::GROUP_MESSAGE => Some((UserId(from), conv)),
            // A file message is a message too (a photo gets its ✓✓). A 1:1 one names the
            // recipient in `conv`; the recipient names the conversation by the sender.
            record_kind::FILE_MESSAGE if protocol::conv_group(conv).is_some() => {
                Some((UserId(from), conv))
            }
            record_kind::FILE_MESSAGE => Some((UserId(from), from)),
            _ => None,
        });
    }
    let message = rkyv::access::<ArchivedMessage, rkyv::rancor::Failure>(bytes)
        .map_err(|_| StoreError::Corrupt("stored message"))?;
    let from = message.from_id.to_native();
    Ok(Some((UserId(from), from)))
}

/// `user` has a device that stored every entry up to `acked_seq`: sends the receipts the
/// entries past the user's `delivered` cursor call for, and moves the cursor.
pub(super) fn on_device_ack(
    txn: &mut RwTxn,
    dbs: &Dbs,
    journal: &mut Journal,
    user: UserId,
    acked_seq: u64,
    at_ms: u64,
    deliveries: &mut Vec<Delivery>,
) -> Result<(), StoreError> {
    let key = schema::user_key(user);
    let delivered = match dbs
        .delivered
        .get(txn, &key)
        .map_err(StoreError::lmdb("read delivered"))?
    {
        Some(bytes) => schema::decode_u64(bytes, "delivered value length")?,
        None => 0,
    };
    if acked_seq <= delivered {
        return Ok(());
    }
    // (sender, conversation, newest msg id delivered)
    let mut receipts: Vec<(UserId, u64, u64)> = Vec::new();
    let mut scanned_to = delivered;
    {
        let start = schema::timeline_key(user, delivered + 1);
        let end = schema::timeline_key(user, acked_seq);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let entries = dbs
            .timelines
            .range(txn, &range)
            .map_err(StoreError::lmdb("open timeline range"))?;
        for item in entries.take(DELIVERY_SCAN_MAX) {
            let (key, value) = item.map_err(StoreError::lmdb("read timeline"))?;
            let (_, seq) = schema::decode_pair(key, "timeline key length")?;
            scanned_to = seq;
            let msg_id = schema::decode_u64(value, "timeline value length")?;
            let bytes = dbs
                .messages
                .get(txn, &schema::msg_key(msg_id))
                .map_err(StoreError::lmdb("read message"))?
                .ok_or(StoreError::Corrupt("timeline entry without message"))?;
            let Some((sender, conv)) = message_origin(bytes)? else {
                continue;
            };
            if sender == user {
                continue;
            }
            let known = receipts
                .iter()
                .position(|(s, c, _)| *s == sender && *c == conv);
            match known {
                Some(index) => receipts[index].2 = receipts[index].2.max(msg_id),
                // Bounded like a group: past it, the rest of this scan sends no receipts.
                None if receipts.len() < GROUP_MEMBERS_MAX => receipts.push((sender, conv, msg_id)),
                None => {}
            }
        }
    }
    dbs.delivered
        .put(txn, &key, &scanned_to.to_be_bytes())
        .map_err(StoreError::lmdb("write delivered"))?;
    if receipts.is_empty() {
        return Ok(());
    }
    let name = dbs
        .user_names
        .get(txn, &key)
        .map_err(StoreError::lmdb("read user name"))?
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .ok_or(StoreError::Corrupt("device ack of a missing user"))?;
    for (sender, conv, up_to) in receipts {
        let msg_id = next_msg_id(txn, dbs)?;
        let record = Record {
            kind: record_kind::DELIVERED,
            msg_id,
            conv,
            from_id: user.0,
            from: name.clone(),
            users: Vec::new(),
            client_msg_id: 0,
            sent_at_ms: at_ms,
            up_to,
            text: String::new(),
            attachments: Vec::new(),
        };
        let bytes: Arc<[u8]> = archive_record(&record)?.into();
        put_message(txn, dbs, msg_id, &bytes)?;
        let mut entry = LoggedEntry::new(msg_id, user, at_ms);
        let seq = journal.place(txn, dbs, &mut entry, sender, None)?;
        journal.log(txn, dbs, entry)?;
        deliveries.push(Delivery {
            user: sender,
            seq,
            message: bytes,
        });
    }
    Ok(())
}
