//! Exactly-once, in-order delivery check.
//!
//! The ledger is compact: for every acknowledged message, its node msg_id, the sender and
//! the recipient user or group (24 bytes); for every device, the msg_ids it received in the
//! order it received them (8 bytes each). A 1:1 message belongs to the timelines of both
//! its recipient and its sender (the sender's other devices see what it sent), a group
//! message to the timeline of every member, so every device of those users must receive
//! it exactly once. Within one timeline msg_ids grow with seq (the node allocates both in
//! commit order), so a device must see strictly increasing msg_ids: a repeat is a
//! duplicate, a smaller id an out-of-order delivery.
//! Pure: no I/O.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// A message the node acknowledged durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckedMsg {
    pub msg_id: u64,
    /// Global user index (`load-<index>`).
    pub from_user: u32,
    pub to: To,
    /// When the send was due, µs since the worker's epoch: the outage report counts the
    /// messages sent before the link came back.
    pub intended_us: u64,
}

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To {
    /// One user (global index): the sender's and the recipient's timelines hold it.
    User(u32),
    /// A group (index into the `groups` given to `verify`): every member's timeline holds
    /// it, the sender's included.
    Group(u32),
}

/// What one device received, in order.
#[derive(Debug, Clone, Default)]
pub struct DeviceLog {
    /// Global client index: user `client / devices_per_user`, device `client % devices_per_user`.
    pub client: u32,
    pub delivered: Vec<u64>,
    /// When each of `delivered` arrived, µs since the worker's epoch; kept only in a run
    /// with an outage (empty otherwise).
    pub delivered_at_us: Vec<u64>,
    /// The device finished a sync run that started after every send was acknowledged, so
    /// `delivered` must be complete.
    pub synced: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// (message, device) pairs that had to arrive.
    pub expected: u64,
    /// Of those, how many arrived (exactly once or more).
    pub delivered: u64,
    /// Expected pairs that never arrived, on devices that completed their final sync.
    pub lost: u64,
    /// Extra copies of a message on one device.
    pub duplicated: u64,
    /// Deliveries with a smaller msg_id than one the device already had.
    pub out_of_order: u64,
    pub devices_verified: u64,
    /// Devices that never completed the final sync; their losses cannot be counted.
    pub devices_unverified: u64,
    /// Deliveries of messages this run did not see acknowledged (an earlier run's, or a
    /// send whose ack was lost with its connection and never resent).
    pub foreign: u64,
}

impl Verdict {
    pub fn add(&mut self, other: &Verdict) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.devices_verified += other.devices_verified;
        self.devices_unverified += other.devices_unverified;
        self.foreign += other.foreign;
    }

    /// Nothing lost, duplicated or reordered, and every device checked.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.out_of_order == 0
            && self.devices_unverified == 0
    }
}

/// Checks `logs` against `acked`; `groups` holds the member users (global indexes) of each
/// group a message may have gone to.
pub fn verify(
    acked: &[AckedMsg],
    devices_per_user: u32,
    groups: &[Vec<u32>],
    logs: &[DeviceLog],
) -> Verdict {
    assert!(devices_per_user > 0);
    let index: HashMap<u32, usize> = logs
        .iter()
        .enumerate()
        .map(|(i, log)| (log.client, i))
        .collect();
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); logs.len()];
    let mut acked_ids = HashSet::with_capacity(acked.len());
    for msg in acked {
        if !acked_ids.insert(msg.msg_id) {
            continue;
        }
        for_each_recipient(msg, devices_per_user, groups, |client| {
            if let Some(&i) = index.get(&client) {
                expected[i].push(msg.msg_id);
            }
        });
    }

    let mut verdict = Verdict::default();
    for (log, expected) in logs.iter().zip(&mut expected) {
        let (duplicated, out_of_order) = order_faults(&log.delivered);
        verdict.duplicated += duplicated;
        verdict.out_of_order += out_of_order;
        let mut seen = log.delivered.clone();
        seen.sort_unstable();
        seen.dedup();
        verdict.foreign += seen.iter().filter(|id| !acked_ids.contains(id)).count() as u64;
        expected.sort_unstable();
        let arrived = expected
            .iter()
            .filter(|id| seen.binary_search(id).is_ok())
            .count() as u64;
        verdict.expected += expected.len() as u64;
        verdict.delivered += arrived;
        if log.synced {
            verdict.devices_verified += 1;
            verdict.lost += expected.len() as u64 - arrived;
        } else {
            verdict.devices_unverified += 1;
        }
    }
    verdict
}

/// Calls `f` with the global client index of every device whose timeline holds `msg`.
pub fn for_each_recipient(
    msg: &AckedMsg,
    devices_per_user: u32,
    groups: &[Vec<u32>],
    mut f: impl FnMut(u32),
) {
    let pair;
    let users: &[u32] = match msg.to {
        To::User(to) if to == msg.from_user => std::slice::from_ref(&msg.from_user),
        To::User(to) => {
            pair = [msg.from_user, to];
            &pair
        }
        To::Group(g) => &groups[g as usize],
    };
    for &user in users {
        for device in 0..devices_per_user {
            f(user * devices_per_user + device);
        }
    }
}

/// (duplicates, out-of-order) in one device's delivery sequence.
fn order_faults(delivered: &[u64]) -> (u64, u64) {
    if delivered.windows(2).all(|w| w[0] < w[1]) {
        return (0, 0);
    }
    let mut seen = HashSet::with_capacity(delivered.len());
    let mut highest = 0;
    let (mut duplicated, mut out_of_order) = (0, 0);
    for &id in delivered {
        if !seen.insert(id) {
            duplicated += 1;
        } else if id < highest {
            out_of_order += 1;
        }
        highest = highest.max(id);
    }
    (duplicated, out_of_order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(client: u32, delivered: &[u64]) -> DeviceLog {
        DeviceLog {
            client,
            delivered: delivered.to_vec(),
            delivered_at_us: Vec::new(),
            synced: true,
        }
    }

    fn msg(msg_id: u64, from_user: u32, to_user: u32) -> AckedMsg {
        AckedMsg {
            msg_id,
            from_user,
            to: To::User(to_user),
            intended_us: 0,
        }
    }

    #[test]
    fn complete_ordered_delivery_to_every_device_of_both_users_passes() {
        // Two devices per user: clients 0,1 are user 0; clients 2,3 user 1.
        let acked = [msg(10, 0, 1), msg(11, 1, 0), msg(12, 0, 1)];
        let logs: Vec<DeviceLog> = (0..4).map(|c| log(c, &[10, 11, 12])).collect();
        let verdict = verify(&acked, 2, &[], &logs);
        assert!(verdict.passed(), "{verdict:?}");
        assert_eq!(verdict.expected, 12);
        assert_eq!(verdict.delivered, 12);
        assert_eq!(verdict.devices_verified, 4);
    }

    #[test]
    fn a_missing_delivery_on_one_device_is_lost() {
        let acked = [msg(10, 0, 1), msg(11, 0, 1)];
        let logs = [log(0, &[10, 11]), log(1, &[11])];
        let verdict = verify(&acked, 1, &[], &logs);
        assert_eq!(verdict.lost, 1);
        assert!(!verdict.passed());
    }

    #[test]
    fn repeats_and_reorderings_are_counted_separately() {
        let acked = [msg(1, 0, 1), msg(2, 0, 1), msg(3, 0, 1)];
        let logs = [log(0, &[1, 2, 3]), log(1, &[1, 3, 2, 3, 1])];
        let verdict = verify(&acked, 1, &[], &logs);
        assert_eq!(verdict.duplicated, 2);
        assert_eq!(verdict.out_of_order, 1);
        assert_eq!(verdict.lost, 0);
        assert!(!verdict.passed());
    }

    #[test]
    fn an_unsynced_device_fails_the_run_without_counting_losses() {
        let acked = [msg(1, 0, 1)];
        let mut unsynced = log(1, &[]);
        unsynced.synced = false;
        let verdict = verify(&acked, 1, &[], &[log(0, &[1]), unsynced]);
        assert_eq!(verdict.lost, 0);
        assert_eq!(verdict.devices_unverified, 1);
        assert!(!verdict.passed());
    }

    #[test]
    fn deliveries_of_unacknowledged_messages_are_foreign_not_faults() {
        let acked = [msg(5, 0, 1)];
        let logs = [log(0, &[1, 2, 5]), log(1, &[2, 5])];
        let verdict = verify(&acked, 1, &[], &logs);
        assert!(verdict.passed());
        assert_eq!(verdict.foreign, 3);
    }

    #[test]
    fn a_message_to_oneself_is_expected_once_per_device() {
        let verdict = verify(&[msg(7, 0, 0)], 2, &[], &[log(0, &[7]), log(1, &[7])]);
        assert_eq!(verdict.expected, 2);
        assert!(verdict.passed());
    }

    #[test]
    fn a_group_message_is_expected_once_on_every_device_of_every_member() {
        // Group 0 is users 0, 1 and 2; two devices each (clients 0..6); user 3 is outside.
        let groups = [vec![0, 1, 2]];
        let acked = [
            AckedMsg {
                msg_id: 4,
                from_user: 1,
                to: To::Group(0),
                intended_us: 0,
            },
            AckedMsg {
                msg_id: 9,
                from_user: 0,
                to: To::Group(0),
                intended_us: 0,
            },
        ];
        let mut logs: Vec<DeviceLog> = (0..6).map(|c| log(c, &[4, 9])).collect();
        logs.push(log(6, &[]));
        logs.push(log(7, &[]));
        let verdict = verify(&acked, 2, &groups, &logs);
        assert!(verdict.passed(), "{verdict:?}");
        assert_eq!(verdict.expected, 12);
        // One member's device misses one, another gets one twice.
        logs[5] = log(5, &[9]);
        logs[2] = log(2, &[4, 4, 9]);
        let verdict = verify(&acked, 2, &groups, &logs);
        assert_eq!(verdict.lost, 1);
        assert_eq!(verdict.duplicated, 1);
    }
}
