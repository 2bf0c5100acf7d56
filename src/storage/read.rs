//! `ReadView`: one short LMDB read transaction and the queries shards run in it.
//!
//! A view never blocks and never blocks the writer; what it returns is a consistent
//! snapshot as of its start. It must not be kept across requests (a live reader pins the
//! pages it sees, so the file grows and the map fills sooner), and it must not write.

use std::ops::Bound;

use heed::{RoTxn, WithoutTls};

use super::schema::{self, Dbs, DeviceKey};
use super::{StoreError, UserRecord};
use crate::ids::UserId;
use crate::limits::USER_NAME_SIZE_MAX;

/// A read transaction on the store. Slices it hands out borrow the map and live as long as
/// the view.
pub struct ReadView<'s> {
    // Field order is drop order: the transaction ends before the gate is released.
    txn: RoTxn<'s, WithoutTls>,
    dbs: &'s Dbs,
    /// Held while the transaction lives, so the map is never resized under it
    /// (`Store::adopt_map_size`).
    _gate: std::sync::RwLockReadGuard<'s, ()>,
}

impl<'s> ReadView<'s> {
    pub(super) fn new(
        txn: RoTxn<'s, WithoutTls>,
        dbs: &'s Dbs,
        gate: std::sync::RwLockReadGuard<'s, ()>,
    ) -> ReadView<'s> {
        ReadView {
            txn,
            dbs,
            _gate: gate,
        }
    }

    pub(super) fn txn(&self) -> &RoTxn<'s, WithoutTls> {
        &self.txn
    }

    pub(super) fn dbs(&self) -> &'s Dbs {
        self.dbs
    }

    /// The account named `name`, if any: compared in NFC and ignoring case
    /// (`names::user_key`). The record holds the name as stored (in its own case), so
    /// every answer spells a user one way.
    pub fn user_by_name(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        // No stored name breaks the rules (empty, over the limit, outer whitespace), and
        // LMDB rejects an empty key with an error, so answer "no such user" without
        // asking it.
        let Ok(name) = crate::names::normalize(name, USER_NAME_SIZE_MAX) else {
            return Ok(None);
        };
        let value = self
            .dbs
            .users
            .get(&self.txn, crate::names::user_key(&name).as_bytes())
            .map_err(StoreError::lmdb("read user"))?;
        let Some(value) = value else { return Ok(None) };
        if value.len() < 8 {
            return Err(StoreError::Corrupt("user value length"));
        }
        let id = UserId(schema::decode_u64(&value[..8], "user value length")?);
        let password_hash = std::str::from_utf8(&value[8..])
            .map_err(|_| StoreError::Corrupt("password hash is not UTF-8"))?;
        let name = self
            .user_name(id)?
            .ok_or(StoreError::Corrupt("user without a name"))?;
        Ok(Some(UserRecord {
            id,
            name,
            password_hash: password_hash.to_owned(),
        }))
    }

    /// The name of user `id`, if it exists.
    pub fn user_name(&self, id: UserId) -> Result<Option<String>, StoreError> {
        let value = self
            .dbs
            .user_names
            .get(&self.txn, &schema::user_key(id))
            .map_err(StoreError::lmdb("read user name"))?;
        match value {
            None => Ok(None),
            Some(bytes) => match std::str::from_utf8(bytes) {
                Ok(name) => Ok(Some(name.to_owned())),
                Err(_) => Err(StoreError::Corrupt("user name is not UTF-8")),
            },
        }
    }

    /// Last seq of `user`'s timeline; 0 when it is empty.
    pub fn head_seq(&self, user: UserId) -> Result<u64, StoreError> {
        schema::head(&self.txn, self.dbs, user)
    }

    /// Highest seq `device` of `user` acknowledged; 0 if it never did.
    pub fn device_acked_seq(&self, user: UserId, device: &str) -> Result<u64, StoreError> {
        // A name no device can have was never stored.
        let Some(key) = DeviceKey::new(user, device) else {
            return Ok(0);
        };
        let value = self
            .dbs
            .device_acks
            .get(&self.txn, key.as_bytes())
            .map_err(StoreError::lmdb("read device ack"))?;
        match value {
            None => Ok(0),
            Some(bytes) => schema::decode_u64(bytes, "device ack value length"),
        }
    }

    /// Calls `f(seq, message_bytes)` for the entries of `user`'s timeline with seq above
    /// `after_seq`, in seq order. Stops after `limit` entries, or before the entry that
    /// would take the message bytes handed out past `bytes_max`; the first entry is handed
    /// out whatever its size, so a page always makes progress. `message_bytes` is the
    /// archived `protocol::Message` borrowed from the map (no copy).
    ///
    /// Returns whether entries remain after the last one handed out. `limit == 0` hands out
    /// nothing and says whether there is anything to hand out.
    pub fn timeline<'v>(
        &'v self,
        user: UserId,
        after_seq: u64,
        limit: u32,
        bytes_max: usize,
        mut f: impl FnMut(u64, &'v [u8]),
    ) -> Result<bool, StoreError> {
        let Some(first_seq) = after_seq.checked_add(1) else {
            return Ok(false);
        };
        let start = schema::timeline_key(user, first_seq);
        let end = schema::timeline_key(user, u64::MAX);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let entries = self
            .dbs
            .timelines
            .range(&self.txn, &range)
            .map_err(StoreError::lmdb("open timeline range"))?;
        let mut bytes_taken: usize = 0;
        // `index` entries were handed out so far. The index-th entry of the range has a
        // seq of at least `first_seq + index`, so that sum cannot overflow.
        for (index, entry) in entries.enumerate() {
            let (key, value) = entry.map_err(StoreError::lmdb("read timeline"))?;
            if index >= limit as usize {
                return Ok(true);
            }
            let (key_user, seq) = schema::decode_pair(key, "timeline key length")?;
            if key_user != user.0 {
                return Err(StoreError::Corrupt("timeline range left its user"));
            }
            // Seqs are contiguous from 1 (the writer asserts it on every append). A gap here
            // is damage on disk, not a bug to crash a shard over: report it.
            if seq != first_seq + index as u64 {
                return Err(StoreError::Corrupt("timeline has a gap"));
            }
            let msg_id = schema::decode_u64(value, "timeline value length")?;
            let message = self
                .dbs
                .messages
                .get(&self.txn, &schema::msg_key(msg_id))
                .map_err(StoreError::lmdb("read message"))?
                .ok_or(StoreError::Corrupt("timeline entry without message"))?;
            if index > 0 && bytes_taken.saturating_add(message.len()) > bytes_max {
                return Ok(true);
            }
            f(seq, message);
            bytes_taken = bytes_taken.saturating_add(message.len());
        }
        Ok(false)
    }

    /// Number of stored messages (each stored once, whatever the number of timelines
    /// referring to it).
    #[cfg(test)]
    pub(crate) fn message_count(&self) -> Result<u64, StoreError> {
        self.dbs
            .messages
            .len(&self.txn)
            .map_err(StoreError::lmdb("count messages"))
    }

    /// Looks up one stored message by id.
    #[cfg(test)]
    pub(crate) fn message(&self, msg_id: u64) -> Result<Option<&[u8]>, StoreError> {
        self.dbs
            .messages
            .get(&self.txn, &schema::msg_key(msg_id))
            .map_err(StoreError::lmdb("read message"))
    }
}
