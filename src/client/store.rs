//! The interface behind which a device keeps its state, and the in-memory implementation
//! used by the load generator, the CLI and tests.
//!
//! The session calls the store synchronously and trusts that a call that returned has
//! committed: it acknowledges an entry to the node only after `store_entry` returned, and
//! forgets a send only after `outbox_remove`. This module does no I/O; a persistent store
//! (LMDB on a device) implements the same trait elsewhere.

use super::session::ReceivedMessage;

/// A send the node has not acknowledged yet. Persisted so that an app that restarts resends
/// it with the same `client_msg_id` (the node deduplicates on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub client_msg_id: u64,
    pub to: String,
    pub text: String,
}

/// A device's durable state.
pub trait ClientStore {
    /// Highest seq such that every timeline entry `1..=last_seq` is stored.
    fn last_seq(&self) -> u64;
    /// Commits `message` and advances `last_seq` to `message.seq`. The session calls it only
    /// with `message.seq == self.last_seq() + 1`.
    fn store_entry(&mut self, message: &ReceivedMessage);
    /// Adds (or replaces) an unacknowledged send.
    fn outbox_put(&mut self, item: &OutboxItem);
    /// Forgets a send once the node acknowledged it or refused it for good. Unknown ids are
    /// ignored.
    fn outbox_remove(&mut self, client_msg_id: u64);
    /// Every unacknowledged send, in the order they were put.
    fn outbox_list(&self) -> Vec<OutboxItem>;
}

/// Keeps everything in memory. Entries are kept unless built with `without_entries`, in
/// which case only `last_seq` and a count are (the load generator runs for hours and checks
/// delivery through events, not through a growing list).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    last_seq: u64,
    /// Every stored entry in seq order, when `keep_entries`.
    entries: Vec<ReceivedMessage>,
    keep_entries: bool,
    entries_stored: u64,
    /// Insertion order; bounded by the session's `OUTBOX_MAX`.
    outbox: Vec<OutboxItem>,
}

impl Default for MemoryStore {
    fn default() -> MemoryStore {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store that keeps every entry.
    pub fn new() -> MemoryStore {
        MemoryStore {
            last_seq: 0,
            entries: Vec::new(),
            keep_entries: true,
            entries_stored: 0,
            outbox: Vec::new(),
        }
    }

    /// A store that tracks `last_seq` and the outbox but drops entry contents.
    pub fn without_entries() -> MemoryStore {
        MemoryStore {
            keep_entries: false,
            ..MemoryStore::new()
        }
    }

    /// A store that already holds everything up to `last_seq` (entries not kept from
    /// before), as a device's persisted state would after a restart.
    pub fn starting_at(last_seq: u64) -> MemoryStore {
        MemoryStore {
            last_seq,
            ..MemoryStore::new()
        }
    }

    /// Entries stored since creation, in seq order (empty with `without_entries`).
    pub fn entries(&self) -> &[ReceivedMessage] {
        &self.entries
    }

    /// Hands over the kept entries and forgets them (`last_seq` stays).
    pub fn take_entries(&mut self) -> Vec<ReceivedMessage> {
        std::mem::take(&mut self.entries)
    }

    /// Entries stored since creation, kept or not.
    pub fn entries_stored(&self) -> u64 {
        self.entries_stored
    }
}

impl ClientStore for MemoryStore {
    fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn store_entry(&mut self, message: &ReceivedMessage) {
        assert_eq!(message.seq, self.last_seq + 1, "store_entry out of order");
        self.last_seq = message.seq;
        self.entries_stored += 1;
        if self.keep_entries {
            self.entries.push(message.clone());
        }
    }

    fn outbox_put(&mut self, item: &OutboxItem) {
        match self
            .outbox
            .iter_mut()
            .find(|o| o.client_msg_id == item.client_msg_id)
        {
            Some(existing) => *existing = item.clone(),
            None => self.outbox.push(item.clone()),
        }
    }

    fn outbox_remove(&mut self, client_msg_id: u64) {
        self.outbox.retain(|o| o.client_msg_id != client_msg_id);
    }

    fn outbox_list(&self) -> Vec<OutboxItem> {
        self.outbox.clone()
    }
}
