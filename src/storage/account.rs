//! Account state in the store: the user's and each device's token generation, the device
//! list, and the writer's side of a logout, a password change or a device revoke.
//!
//! Generations live in the `meta` table under `gen ‖ user id` (the user's) and
//! `gen ‖ user id ‖ device name` (a device's), u64 big-endian; absent is 0. Every token
//! carries both as they were at issue (`auth::TokenClaims`), and a login compares them
//! with these, so bumping one revokes every token issued before.

use std::collections::BTreeMap;

use heed::{RoTxn, RwTxn};

use super::StoreError;
use super::read::ReadView;
use super::schema::{self, Dbs, DeviceKey};
use super::writer::{OpResult, Origin, Reply};
use crate::ids::UserId;

const GEN_PREFIX: &[u8] = b"gen";

fn user_gen_key(user: UserId) -> Vec<u8> {
    let mut key = GEN_PREFIX.to_vec();
    key.extend_from_slice(&schema::user_key(user));
    key
}

fn device_gen_key(device: &DeviceKey) -> Vec<u8> {
    let mut key = GEN_PREFIX.to_vec();
    key.extend_from_slice(device.as_bytes());
    key
}

fn read_gen(txn: &RoTxn, dbs: &Dbs, key: &[u8]) -> Result<u64, StoreError> {
    match dbs
        .meta
        .get(txn, key)
        .map_err(StoreError::lmdb("read generation"))?
    {
        Some(bytes) => schema::decode_u64(bytes, "generation value length"),
        None => Ok(0),
    }
}

fn bump_gen(txn: &mut RwTxn, dbs: &Dbs, key: &[u8]) -> Result<(), StoreError> {
    let next = read_gen(txn, dbs, key)?
        .checked_add(1)
        .ok_or(StoreError::Corrupt("generation exhausted"))?;
    dbs.meta
        .put(txn, key, &next.to_be_bytes())
        .map_err(StoreError::lmdb("write generation"))
}

/// What an `AccountOp` changes.
#[derive(Debug)]
pub enum AccountChange {
    /// Revokes one device's tokens (its logout, or a revoke from another device).
    RevokeDevice { device: String },
    /// Revokes every token of the user (logout everywhere).
    RevokeAll,
    /// Replaces the password hash (of the user's NFC `name`) and revokes every token.
    Password { name: String, password_hash: String },
}

/// A `WriteOp::Account`: answered with `Reply::Revoked` once committed.
#[derive(Debug)]
pub struct AccountOp {
    pub origin: Origin,
    pub user: UserId,
    pub change: AccountChange,
}

/// What an `AccountOp` revoked, for the shard to kick and answer.
#[derive(Debug)]
pub struct Revoked {
    pub user: UserId,
    /// The one device revoked; None: every device of the user.
    pub device: Option<String>,
    pub why: &'static str,
}

pub(super) fn apply_account(
    txn: &mut RwTxn,
    dbs: &Dbs,
    op: &AccountOp,
    results: &mut Vec<OpResult>,
) -> Result<(), StoreError> {
    let revoked = match &op.change {
        AccountChange::RevokeDevice { device } => {
            let key = DeviceKey::new(op.user, device)
                .ok_or(StoreError::InvalidArgument("device name"))?;
            bump_gen(txn, dbs, &device_gen_key(&key))?;
            Revoked {
                user: op.user,
                device: Some(device.clone()),
                why: "this device was logged out",
            }
        }
        AccountChange::RevokeAll => {
            bump_gen(txn, dbs, &user_gen_key(op.user))?;
            Revoked {
                user: op.user,
                device: None,
                why: "logged out everywhere",
            }
        }
        AccountChange::Password {
            name,
            password_hash,
        } => {
            let key = crate::names::user_key(name);
            let mut value = Vec::with_capacity(8 + password_hash.len());
            value.extend_from_slice(&op.user.0.to_be_bytes());
            value.extend_from_slice(password_hash.as_bytes());
            let stored = dbs
                .users
                .get(txn, key.as_bytes())
                .map_err(StoreError::lmdb("read user"))?;
            if stored.and_then(|v| v.get(..8)) != Some(&op.user.0.to_be_bytes()[..]) {
                return Err(StoreError::Corrupt("user name does not name the user"));
            }
            dbs.users
                .put(txn, key.as_bytes(), &value)
                .map_err(StoreError::lmdb("write user"))?;
            bump_gen(txn, dbs, &user_gen_key(op.user))?;
            Revoked {
                user: op.user,
                device: None,
                why: "the password was changed",
            }
        }
    };
    results.push(OpResult::Answered {
        origin: op.origin,
        reply: Reply::Revoked(revoked),
    });
    Ok(())
}

impl ReadView<'_> {
    /// The user's and `device`'s current token generations.
    pub fn generations(&self, user: UserId, device: &str) -> Result<(u64, u64), StoreError> {
        let user_gen = read_gen(self.txn(), self.dbs(), &user_gen_key(user))?;
        let device_gen = match DeviceKey::new(user, device) {
            Some(key) => read_gen(self.txn(), self.dbs(), &device_gen_key(&key))?,
            None => 0,
        };
        Ok((user_gen, device_gen))
    }

    /// The user's devices known to the store (with an ack cursor or a revocation), by
    /// name, with their acked seq.
    pub fn devices(&self, user: UserId) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut devices = BTreeMap::new();
        let prefix = schema::user_key(user);
        for item in self
            .dbs()
            .device_acks
            .prefix_iter(self.txn(), &prefix)
            .map_err(StoreError::lmdb("open device acks"))?
        {
            let (key, value) = item.map_err(StoreError::lmdb("read device ack"))?;
            let name = std::str::from_utf8(&key[prefix.len()..])
                .map_err(|_| StoreError::Corrupt("device name is not UTF-8"))?;
            devices.insert(
                name.to_owned(),
                schema::decode_u64(value, "device ack value length")?,
            );
        }
        let mut gen_prefix = GEN_PREFIX.to_vec();
        gen_prefix.extend_from_slice(&prefix);
        for item in self
            .dbs()
            .meta
            .prefix_iter(self.txn(), &gen_prefix)
            .map_err(StoreError::lmdb("open generations"))?
        {
            let (key, _) = item.map_err(StoreError::lmdb("read generation"))?;
            if key.len() == gen_prefix.len() {
                continue; // the user's own generation
            }
            let name = std::str::from_utf8(&key[gen_prefix.len()..])
                .map_err(|_| StoreError::Corrupt("device name is not UTF-8"))?;
            devices.entry(name.to_owned()).or_insert(0);
        }
        Ok(devices)
    }
}
