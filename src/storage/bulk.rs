//! Creating many accounts at once, for load tests and provisioning scripts.
//!
//! One write transaction for the whole batch: a user per transaction would pay one commit
//! (and one fsync) each, and hashing a password per user with argon2 would cost tens of
//! milliseconds each. The caller hashes one password for the batch.

use super::schema::{self, META_NEXT_USER_ID};
use super::{Store, StoreError};
use crate::ids::UserId;
use crate::limits::USER_NAME_SIZE_MAX;

/// Most accounts one `add_users_bulk` call creates. Its transaction dirties about 100 bytes
/// of pages per user, so a million users stay far below any map size the node runs with.
pub const BULK_USERS_MAX: u64 = 1_000_000;

/// What `add_users_bulk` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkUsers {
    /// `ids[i]` is the id of `{prefix}{first + i}`, created now or found existing.
    pub ids: Vec<UserId>,
    /// How many of them this call created.
    pub created: u64,
}

impl Store {
    /// Makes sure users `{prefix}{first}` … `{prefix}{first + count - 1}` exist, creating
    /// the missing ones with `password_hash` in one write transaction. Existing users keep
    /// their password. Safe beside a running node (LMDB serialises writers across
    /// processes).
    pub fn add_users_bulk(
        &self,
        prefix: &str,
        first: u64,
        count: u64,
        password_hash: &str,
    ) -> Result<BulkUsers, StoreError> {
        if count > BULK_USERS_MAX {
            return Err(StoreError::InvalidArgument("too many users in one batch"));
        }
        if password_hash.is_empty() {
            return Err(StoreError::InvalidArgument("password hash is empty"));
        }
        let last = first
            .checked_add(count.saturating_sub(1))
            .ok_or(StoreError::InvalidArgument("user number overflows"))?;
        if prefix.len() + last.to_string().len() > USER_NAME_SIZE_MAX {
            return Err(StoreError::InvalidArgument("user name is too long"));
        }
        // The numbers are ASCII digits: checking the first name checks them all.
        let prefix = super::user_name_checked(&format!("{prefix}{first}"))?
            .strip_suffix(&first.to_string())
            .expect("NFC keeps ASCII digits")
            .to_owned();
        let dbs = self.dbs();
        let mut txn = self
            .env()
            .write_txn()
            .map_err(StoreError::lmdb("begin add_users_bulk txn"))?;
        let mut next_id = schema::counter_next(&txn, dbs, META_NEXT_USER_ID)?;
        let mut ids = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
        let mut created = 0u64;
        let mut name = String::with_capacity(USER_NAME_SIZE_MAX);
        let mut value = Vec::with_capacity(8 + password_hash.len());
        for number in first..first + count {
            name.clear();
            name.push_str(&prefix);
            name.push_str(&number.to_string());
            let key = crate::names::user_key(&name);
            let existing = dbs
                .users
                .get(&txn, key.as_bytes())
                .map_err(StoreError::lmdb("read user"))?;
            if let Some(existing) = existing {
                let head = existing
                    .get(..8)
                    .ok_or(StoreError::Corrupt("user value length"))?;
                ids.push(UserId(schema::decode_u64(head, "user value length")?));
                continue;
            }
            if next_id == u64::MAX {
                return Err(StoreError::Corrupt("counter exhausted"));
            }
            let user = UserId(next_id);
            value.clear();
            value.extend_from_slice(&next_id.to_be_bytes());
            value.extend_from_slice(password_hash.as_bytes());
            dbs.users
                .put(&mut txn, key.as_bytes(), &value)
                .map_err(StoreError::lmdb("write user"))?;
            dbs.user_names
                .put(&mut txn, &schema::user_key(user), name.as_bytes())
                .map_err(StoreError::lmdb("write user name"))?;
            ids.push(user);
            created += 1;
            next_id += 1;
        }
        schema::counter_set(&mut txn, dbs, META_NEXT_USER_ID, next_id)?;
        txn.commit()
            .map_err(StoreError::lmdb("commit add_users_bulk"))?;
        debug_assert_eq!(ids.len() as u64, count);
        Ok(BulkUsers { ids, created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StoreConfig;

    fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            map_size: 64 << 20,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), &config).expect("open store");
        (dir, store)
    }

    #[test]
    fn bulk_users_are_readable_and_a_rerun_creates_none() {
        let (_dir, store) = open();
        let single = store.add_user("alice", "hash-a").expect("add alice");
        let first = store
            .add_users_bulk("load-", 0, 1000, "hash-b")
            .expect("bulk");
        assert_eq!(first.created, 1000);
        assert_eq!(first.ids.len(), 1000);
        assert!(first.ids.iter().all(|id| *id != single));
        let view = store.read().expect("read");
        let user = view
            .user_by_name("load-999")
            .expect("read")
            .expect("exists");
        assert_eq!(user.id, first.ids[999]);
        assert_eq!(user.password_hash, "hash-b");
        assert_eq!(
            view.user_name(first.ids[7]).expect("read").as_deref(),
            Some("load-7")
        );
        drop(view);

        // Overlapping range: the first 1000 exist, 500 are new, ids stay stable.
        let second = store
            .add_users_bulk("load-", 500, 1000, "other")
            .expect("bulk again");
        assert_eq!(second.created, 500);
        assert_eq!(second.ids[..500], first.ids[500..]);
        let next = store.add_user("bob", "hash").expect("add bob");
        assert!(second.ids.iter().all(|id| id.0 < next.0));
    }

    #[test]
    fn bulk_refuses_names_over_the_limit() {
        let (_dir, store) = open();
        let prefix = "x".repeat(USER_NAME_SIZE_MAX);
        assert!(matches!(
            store.add_users_bulk(&prefix, 0, 1, "hash"),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.add_users_bulk("p", 0, 1, ""),
            Err(StoreError::InvalidArgument(_))
        ));
    }
}
