//! Failed-login throttling: per account and per source address, growing waits.
//!
//! Sans-IO: the caller passes `now_ms` (any monotonic clock) and keeps the one instance a
//! node shares between its shards. Only password logins are throttled; a token costs one
//! HMAC and cannot be guessed, so a device with a token logs in even while its account or
//! address waits.
//!
//! After `free` failures, the n-th further failure makes every attempt wait
//! `LOGIN_THROTTLE_DELAY_MS_BASE · 2ⁿ⁻¹` ms (at most `LOGIN_THROTTLE_DELAY_MS_MAX`) from
//! that failure. An attempt during the wait is refused without checking the password, so
//! a guesser gets a few guesses per minute per account, whatever its connection count.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;

use crate::ids::UserId;
use crate::limits::{
    LOGIN_FAILURES_FREE_ACCOUNT, LOGIN_FAILURES_FREE_ADDRESS, LOGIN_THROTTLE_DELAY_MS_BASE,
    LOGIN_THROTTLE_DELAY_MS_MAX, LOGIN_THROTTLE_ENTRIES_MAX, LOGIN_THROTTLE_FORGET_MS,
};

#[derive(Debug, Clone, Copy)]
struct Failures {
    /// Failures since the record was created (or last forgotten).
    count: u32,
    last_ms: u64,
    /// Attempts before this are refused.
    wait_until_ms: u64,
}

/// One map of failure records, bounded by `LOGIN_THROTTLE_ENTRIES_MAX`.
#[derive(Debug)]
struct Records<K> {
    map: HashMap<K, Failures>,
    free: u32,
}

impl<K: Hash + Eq + Copy> Records<K> {
    fn new(free: u32) -> Records<K> {
        Records {
            map: HashMap::new(),
            free,
        }
    }

    /// Ms left to wait for `key`, or 0.
    fn wait_ms(&self, key: &K, now_ms: u64) -> u64 {
        self.map
            .get(key)
            .map_or(0, |f| f.wait_until_ms.saturating_sub(now_ms))
    }

    fn failed(&mut self, key: K, now_ms: u64) {
        if !self.map.contains_key(&key) && self.map.len() >= LOGIN_THROTTLE_ENTRIES_MAX {
            self.evict(now_ms);
        }
        let free = self.free;
        let record = self.map.entry(key).or_insert(Failures {
            count: 0,
            last_ms: now_ms,
            wait_until_ms: 0,
        });
        if now_ms.saturating_sub(record.last_ms) >= LOGIN_THROTTLE_FORGET_MS {
            record.count = 0;
        }
        record.count = record.count.saturating_add(1);
        record.last_ms = now_ms;
        if record.count > free {
            let doublings = (record.count - free - 1).min(32);
            let delay = LOGIN_THROTTLE_DELAY_MS_BASE
                .saturating_mul(1u64 << doublings)
                .min(LOGIN_THROTTLE_DELAY_MS_MAX);
            record.wait_until_ms = now_ms + delay;
        }
    }

    fn forget(&mut self, key: &K) {
        self.map.remove(key);
    }

    /// Makes room for one record: drops the stale ones, or else the stalest. O(n), and
    /// only when the map is full.
    fn evict(&mut self, now_ms: u64) {
        self.map
            .retain(|_, f| now_ms.saturating_sub(f.last_ms) < LOGIN_THROTTLE_FORGET_MS);
        if self.map.len() >= LOGIN_THROTTLE_ENTRIES_MAX {
            let stalest = self
                .map
                .iter()
                .min_by_key(|(_, f)| f.last_ms)
                .map(|(k, _)| *k)
                .expect("the map is full");
            self.map.remove(&stalest);
        }
        debug_assert!(self.map.len() < LOGIN_THROTTLE_ENTRIES_MAX);
    }
}

/// The failure records of a node's password logins.
#[derive(Debug)]
pub struct LoginThrottle {
    accounts: Records<UserId>,
    addresses: Records<IpAddr>,
}

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        LoginThrottle::new()
    }
}

impl LoginThrottle {
    pub fn new() -> LoginThrottle {
        LoginThrottle {
            accounts: Records::new(LOGIN_FAILURES_FREE_ACCOUNT),
            addresses: Records::new(LOGIN_FAILURES_FREE_ADDRESS),
        }
    }

    /// How long a password login for `account` (None: no such user) from `address` must
    /// still wait, in ms; 0: it may be checked now.
    pub fn wait_ms(&self, account: Option<UserId>, address: IpAddr, now_ms: u64) -> u64 {
        let by_account = account.map_or(0, |a| self.accounts.wait_ms(&a, now_ms));
        by_account.max(self.addresses.wait_ms(&address, now_ms))
    }

    /// Records a wrong password (or an unknown user) from `address`.
    pub fn failed(&mut self, account: Option<UserId>, address: IpAddr, now_ms: u64) {
        if let Some(account) = account {
            self.accounts.failed(account, now_ms);
        }
        self.addresses.failed(address, now_ms);
    }

    /// Records a correct password: the account's failures are forgotten. The address's
    /// stay, so a guesser cannot wipe them by logging into an account of its own.
    pub fn succeeded(&mut self, account: UserId) {
        self.accounts.forget(&account);
    }

    /// Failure records held (accounts, addresses).
    pub fn len(&self) -> (usize, usize) {
        (self.accounts.map.len(), self.addresses.map.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: UserId = UserId(7);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn an_account_waits_longer_after_each_failure_past_the_free_ones() {
        let mut t = LoginThrottle::new();
        let mut now = 1_000;
        // Each guess from a new address: only the account's record counts.
        for i in 0..LOGIN_FAILURES_FREE_ACCOUNT {
            assert_eq!(t.wait_ms(Some(A), ip(i as u8), now), 0);
            t.failed(Some(A), ip(i as u8), now);
        }
        assert_eq!(
            t.wait_ms(Some(A), ip(100), now),
            0,
            "the free failures cost nothing"
        );
        let mut expected = LOGIN_THROTTLE_DELAY_MS_BASE;
        for i in 0..10u8 {
            t.failed(Some(A), ip(200 + i), now);
            assert_eq!(t.wait_ms(Some(A), ip(50), now), expected);
            assert_eq!(t.wait_ms(Some(UserId(8)), ip(50), now), 0, "other accounts");
            now += expected;
            assert_eq!(t.wait_ms(Some(A), ip(50), now), 0, "the wait ends");
            expected = (expected * 2).min(LOGIN_THROTTLE_DELAY_MS_MAX);
        }
        assert_eq!(
            expected, LOGIN_THROTTLE_DELAY_MS_MAX,
            "the wait stops growing"
        );
        t.succeeded(A);
        t.failed(Some(A), ip(1), now);
        assert_eq!(
            t.wait_ms(Some(A), ip(60), now),
            0,
            "a success forgets the account"
        );
    }

    #[test]
    fn an_address_is_throttled_across_accounts_and_unknown_users() {
        let mut t = LoginThrottle::new();
        for i in 0..=LOGIN_FAILURES_FREE_ADDRESS {
            let account = (i % 2 == 0).then_some(UserId(u64::from(i) + 100));
            t.failed(account, ip(9), 5_000);
        }
        assert_eq!(t.wait_ms(None, ip(9), 5_000), LOGIN_THROTTLE_DELAY_MS_BASE);
        assert_eq!(
            t.wait_ms(Some(UserId(1)), ip(9), 5_000),
            LOGIN_THROTTLE_DELAY_MS_BASE
        );
        assert_eq!(t.wait_ms(Some(UserId(1)), ip(10), 5_000), 0);
        // A success on an account does not clear the address.
        t.succeeded(UserId(100));
        assert_eq!(t.wait_ms(None, ip(9), 5_000), LOGIN_THROTTLE_DELAY_MS_BASE);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_spell() {
        let mut t = LoginThrottle::new();
        for _ in 0..LOGIN_FAILURES_FREE_ACCOUNT + 2 {
            t.failed(Some(A), ip(1), 0);
        }
        assert!(t.wait_ms(Some(A), ip(2), 0) > 0);
        let later = LOGIN_THROTTLE_FORGET_MS;
        t.failed(Some(A), ip(2), later);
        assert_eq!(t.wait_ms(Some(A), ip(3), later), 0, "counting starts over");
    }

    #[test]
    fn records_stay_bounded() {
        let mut t = LoginThrottle::new();
        for i in 0..LOGIN_THROTTLE_ENTRIES_MAX as u64 + 10 {
            t.failed(Some(UserId(i)), IpAddr::from((i as u32).to_be_bytes()), i);
        }
        let (accounts, addresses) = t.len();
        assert_eq!(accounts, LOGIN_THROTTLE_ENTRIES_MAX);
        assert_eq!(addresses, LOGIN_THROTTLE_ENTRIES_MAX);
        // The stalest went first.
        assert!(!t.accounts.map.contains_key(&UserId(0)));
        assert!(
            t.accounts
                .map
                .contains_key(&UserId(LOGIN_THROTTLE_ENTRIES_MAX as u64 + 9))
        );
    }
}
