//! The online directory: which shards hold which user's devices.
//!
//! Shards register a connection when its login completes and unregister it when it closes.
//! The store writer asks, after each commit, which shards need the new entries, so a message
//! wakes only the shards with a device of the recipient or the sender. The directory holds
//! no connection state beyond (shard, conn, device) triples and does no I/O.

pub mod presence;

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::{ConnId, ShardId, UserId};

/// Stripes of the directory map. Logins on different shards rarely contend for one stripe.
const DIRECTORY_STRIPES: usize = 64;

/// One online device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub shard: ShardId,
    pub conn: ConnId,
    pub device: Box<str>,
}

pub struct Directory {
    stripes: Vec<Mutex<HashMap<UserId, Vec<Presence>>>>,
    /// Who is online and who watches whom (`presence`); shared with the directory so every
    /// shard reaches it through the same handle.
    pub presence: presence::PresenceBoard,
}

impl Default for Directory {
    fn default() -> Directory {
        Directory::new()
    }
}

impl Directory {
    pub fn new() -> Directory {
        Directory {
            stripes: (0..DIRECTORY_STRIPES)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            presence: presence::PresenceBoard::new(),
        }
    }

    fn stripe(&self, user: UserId) -> std::sync::MutexGuard<'_, HashMap<UserId, Vec<Presence>>> {
        // A poisoned stripe means a shard panicked while holding it: a bug, so crash loudly.
        self.stripes[(user.0 as usize) % DIRECTORY_STRIPES]
            .lock()
            .expect("directory stripe poisoned")
    }

    /// Records that `device` of `user` is online at (shard, conn). Returns the presence it
    /// replaced when the same device was already online: that connection must be kicked.
    pub fn register(
        &self,
        user: UserId,
        device: &str,
        shard: ShardId,
        conn: ConnId,
    ) -> Option<Presence> {
        let mut map = self.stripe(user);
        let devices = map.entry(user).or_default();
        let presence = Presence {
            shard,
            conn,
            device: device.into(),
        };
        match devices.iter_mut().find(|p| &*p.device == device) {
            Some(old) => Some(std::mem::replace(old, presence)),
            None => {
                devices.push(presence);
                None
            }
        }
    }

    /// Removes (shard, conn) if it is still the registered connection of its device. A
    /// connection that was already replaced by a newer login leaves the newer one alone.
    pub fn unregister(&self, user: UserId, shard: ShardId, conn: ConnId) {
        let mut map = self.stripe(user);
        if let Some(devices) = map.get_mut(&user) {
            devices.retain(|p| !(p.shard == shard && p.conn == conn));
            if devices.is_empty() {
                map.remove(&user);
            }
        }
    }

    /// Appends to `shards` each shard with a device of `user` online, once each.
    pub fn shards_of(&self, user: UserId, shards: &mut Vec<ShardId>) {
        let map = self.stripe(user);
        if let Some(devices) = map.get(&user) {
            for p in devices {
                if !shards.contains(&p.shard) {
                    shards.push(p.shard);
                }
            }
        }
    }

    /// Appends to `out` every logged-in connection of `user` (any shard).
    pub fn connections_of(&self, user: UserId, out: &mut Vec<Presence>) {
        if let Some(devices) = self.stripe(user).get(&user) {
            out.extend(devices.iter().cloned());
        }
    }

    pub fn is_online(&self, user: UserId) -> bool {
        self.stripe(user).contains_key(&user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(index: u32) -> ConnId {
        ConnId {
            index,
            generation: 1,
        }
    }

    #[test]
    fn same_device_login_replaces_and_reports_old_connection() {
        let dir = Directory::new();
        assert_eq!(dir.register(UserId(1), "phone", ShardId(0), conn(1)), None);
        assert_eq!(dir.register(UserId(1), "laptop", ShardId(1), conn(2)), None);
        let old = dir
            .register(UserId(1), "phone", ShardId(1), conn(3))
            .unwrap();
        assert_eq!((old.shard, old.conn), (ShardId(0), conn(1)));
        // The kicked connection's close must not remove the new login.
        dir.unregister(UserId(1), ShardId(0), conn(1));
        let mut shards = Vec::new();
        dir.shards_of(UserId(1), &mut shards);
        assert_eq!(shards, vec![ShardId(1)]);
    }

    #[test]
    fn shards_are_listed_once_and_offline_users_vanish() {
        let dir = Directory::new();
        dir.register(UserId(7), "a", ShardId(2), conn(1));
        dir.register(UserId(7), "b", ShardId(2), conn(2));
        dir.register(UserId(7), "c", ShardId(0), conn(3));
        let mut shards = Vec::new();
        dir.shards_of(UserId(7), &mut shards);
        assert_eq!(shards, vec![ShardId(2), ShardId(0)]);
        for i in 1..=3 {
            let shard = if i == 3 { ShardId(0) } else { ShardId(2) };
            dir.unregister(UserId(7), shard, conn(i));
        }
        assert!(!dir.is_online(UserId(7)));
        shards.clear();
        dir.shards_of(UserId(7), &mut shards);
        assert!(shards.is_empty());
    }
}
