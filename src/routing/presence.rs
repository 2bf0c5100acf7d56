//! Presence: whether each user has any device online, and which connections watch whom.
//!
//! Shards report every established connection when it logs in (`connected`) and when it
//! goes away (`disconnected`); a user is online while it has at least one. A transition
//! (first device in, last device out) bumps the user's presence version and names the
//! connections subscribed to that user, so the shard can forward the change to their
//! shards. Versions let a subscriber order changes that reach it through different shards:
//! the highest version wins. Holds no I/O and no connection state beyond (shard, conn).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::ids::{ConnId, ShardId, UserId};

/// Stripes of the presence map, as in the directory.
const PRESENCE_STRIPES: usize = 64;

/// A connection subscribed to a user's presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watcher {
    pub shard: ShardId,
    pub conn: ConnId,
}

/// A user's presence changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub user: UserId,
    pub online: bool,
    pub version: u64,
    pub watchers: Vec<Watcher>,
}

#[derive(Debug, Default)]
struct UserPresence {
    /// Established connections of the user, on all shards.
    devices: u32,
    /// Bumped at each online/offline transition; 0 before the first.
    version: u64,
    watchers: Vec<Watcher>,
}

pub struct PresenceBoard {
    stripes: Vec<Mutex<HashMap<UserId, UserPresence>>>,
}

impl Default for PresenceBoard {
    fn default() -> PresenceBoard {
        PresenceBoard::new()
    }
}

impl PresenceBoard {
    pub fn new() -> PresenceBoard {
        PresenceBoard {
            stripes: (0..PRESENCE_STRIPES)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn stripe(&self, user: UserId) -> std::sync::MutexGuard<'_, HashMap<UserId, UserPresence>> {
        // A poisoned stripe means a shard panicked while holding it: a bug, so crash loudly.
        self.stripes[(user.0 as usize) % PRESENCE_STRIPES]
            .lock()
            .expect("presence stripe poisoned")
    }

    /// A connection of `user` logged in. Returns the change if the user came online.
    pub fn connected(&self, user: UserId) -> Option<Change> {
        let mut map = self.stripe(user);
        let entry = map.entry(user).or_default();
        entry.devices += 1;
        (entry.devices == 1).then(|| {
            entry.version += 1;
            Change {
                user,
                online: true,
                version: entry.version,
                watchers: entry.watchers.clone(),
            }
        })
    }

    /// A logged-in connection of `user` went away. Returns the change if the user went
    /// offline.
    pub fn disconnected(&self, user: UserId) -> Option<Change> {
        let mut map = self.stripe(user);
        let entry = map.get_mut(&user)?;
        assert!(
            entry.devices > 0,
            "presence of {user:?} disconnected more than connected"
        );
        entry.devices -= 1;
        if entry.devices > 0 {
            return None;
        }
        entry.version += 1;
        let change = Change {
            user,
            online: false,
            version: entry.version,
            watchers: entry.watchers.clone(),
        };
        Some(change)
    }

    /// Adds a watcher of `user`; returns the user's presence (online, version) now.
    pub fn subscribe(&self, user: UserId, watcher: Watcher) -> (bool, u64) {
        let mut map = self.stripe(user);
        let entry = map.entry(user).or_default();
        if !entry.watchers.contains(&watcher) {
            entry.watchers.push(watcher);
        }
        (entry.devices > 0, entry.version)
    }

    pub fn unsubscribe(&self, user: UserId, watcher: Watcher) {
        let mut map = self.stripe(user);
        if let Some(entry) = map.get_mut(&user) {
            entry.watchers.retain(|w| *w != watcher);
            // Offline users keep their version, so a later login still orders after it.
            if entry.devices == 0 && entry.watchers.is_empty() && entry.version == 0 {
                map.remove(&user);
            }
        }
    }

    /// (online, version) without subscribing.
    pub fn query(&self, user: UserId) -> (bool, u64) {
        self.stripe(user)
            .get(&user)
            .map_or((false, 0), |e| (e.devices > 0, e.version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watcher(index: u32) -> Watcher {
        Watcher {
            shard: ShardId(1),
            conn: ConnId {
                index,
                generation: 1,
            },
        }
    }

    #[test]
    fn first_in_and_last_out_are_the_only_changes() {
        let board = PresenceBoard::new();
        let user = UserId(5);
        assert_eq!(board.subscribe(user, watcher(1)), (false, 0));
        let online = board.connected(user).unwrap();
        assert_eq!((online.online, online.version), (true, 1));
        assert_eq!(online.watchers, vec![watcher(1)]);
        assert!(
            board.connected(user).is_none(),
            "a second device changes nothing"
        );
        assert!(board.disconnected(user).is_none());
        let offline = board.disconnected(user).unwrap();
        assert_eq!((offline.online, offline.version), (false, 2));
        assert_eq!(board.query(user), (false, 2));
        board.unsubscribe(user, watcher(1));
        let again = board.connected(user).unwrap();
        assert!(again.watchers.is_empty());
        assert_eq!(
            again.version, 3,
            "versions keep growing across subscriptions"
        );
        assert_eq!(board.query(UserId(6)), (false, 0));
    }
}
