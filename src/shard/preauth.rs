//! The shard's table of connections that have not logged in yet: their order of arrival
//! and how many each source address holds.
//!
//! A flood of connections that never log in must not lock others out. So the table never
//! refuses a newcomer for being full: the shard closes the oldest connection in it instead
//! (a legitimate client logs in within milliseconds of connecting, so the oldest are the
//! ones that came to wait). And one source address may hold at most
//! `SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX` of them; past that its new connections are
//! refused at accept, so one address cannot fill the table at all. No I/O here: the shard
//! closes what this names.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use crate::ids::ConnId;
use crate::limits::{SHARD_UNAUTHENTICATED_MAX, SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX};

#[derive(Debug, Default)]
pub(super) struct PreAuth {
    /// Connections in order of arrival. May also hold connections that have left the
    /// table since (logged in, closed): those are skipped at the front and dropped when
    /// the queue grows past twice the table, so it stays under `2 ×
    /// SHARD_UNAUTHENTICATED_MAX + 1` entries.
    order: VecDeque<ConnId>,
    /// Connections in the table per source address; no zero counts.
    per_address: HashMap<IpAddr, usize>,
}

impl PreAuth {
    /// Whether `address` already holds its share of the table.
    pub fn address_full(&self, address: IpAddr) -> bool {
        self.per_address.get(&address).copied().unwrap_or(0)
            >= SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX
    }

    /// Records a new connection from `address`. `waiting` says whether a connection is
    /// still in the table.
    pub fn admit(&mut self, conn: ConnId, address: IpAddr, waiting: impl Fn(ConnId) -> bool) {
        debug_assert!(!self.address_full(address));
        *self.per_address.entry(address).or_insert(0) += 1;
        self.order.push_back(conn);
        if self.order.len() > 2 * SHARD_UNAUTHENTICATED_MAX {
            self.order.retain(|c| waiting(*c));
        }
        assert!(self.order.len() <= 2 * SHARD_UNAUTHENTICATED_MAX + 1);
    }

    /// A connection from `address` left the table (logged in, closed, or evicted).
    pub fn left(&mut self, address: IpAddr) {
        let count = self
            .per_address
            .get_mut(&address)
            .expect("a connection in the table has a count");
        *count -= 1;
        if *count == 0 {
            self.per_address.remove(&address);
        }
    }

    /// The connection that has waited longest, if any.
    pub fn oldest(&mut self, waiting: impl Fn(ConnId) -> bool) -> Option<ConnId> {
        while let Some(&front) = self.order.front() {
            if waiting(front) {
                return Some(front);
            }
            self.order.pop_front();
        }
        None
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
    fn the_oldest_waiting_connection_comes_first() {
        let mut table = PreAuth::default();
        let a = IpAddr::from([10, 0, 0, 1]);
        for i in 0..3 {
            table.admit(conn(i), a, |_| true);
        }
        // conn 0 logged in: skipped.
        assert_eq!(table.oldest(|c| c != conn(0)), Some(conn(1)));
        table.left(a);
        table.left(a);
        table.left(a);
        assert!(table.per_address.is_empty());
        assert_eq!(table.oldest(|_| false), None);
    }

    #[test]
    fn one_address_gets_a_bounded_share() {
        let mut table = PreAuth::default();
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        for i in 0..SHARD_UNAUTHENTICATED_PER_ADDRESS_MAX as u32 {
            assert!(!table.address_full(a));
            table.admit(conn(i), a, |_| true);
        }
        assert!(table.address_full(a));
        assert!(!table.address_full(b));
        table.left(a);
        assert!(!table.address_full(a));
    }

    #[test]
    fn the_order_queue_stays_bounded_when_connections_log_in() {
        let mut table = PreAuth::default();
        let a = IpAddr::from([10, 0, 0, 1]);
        // One connection keeps waiting at the front while many others log in behind it.
        table.admit(conn(0), a, |_| true);
        for i in 1..10 * SHARD_UNAUTHENTICATED_MAX as u32 {
            table.admit(conn(i), a, |c| c == conn(0));
            table.left(a);
        }
        assert!(table.order.len() <= 2 * SHARD_UNAUTHENTICATED_MAX + 1);
        assert_eq!(table.oldest(|c| c == conn(0)), Some(conn(0)));
    }
}
