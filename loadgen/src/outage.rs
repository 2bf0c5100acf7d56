//! What a network outage did to the devices (`--outage-at`): how long after the link came
//! back every message sent before then reached every device that must receive it, how long
//! the last device took to log in again, and how many connection attempts the reconnect
//! backoff made on the way. Pure: no I/O; times are µs since the worker's epoch.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::verify::{AckedMsg, DeviceLog, for_each_recipient};

/// Most connection attempts and logins one device keeps for the outage report: far more
/// than a backoff capped at seconds makes in any outage a run can hold (the first ones are
/// the ones that count).
pub const DEVICE_EVENTS_MAX: usize = 4096;

/// One device's connection history from the moment the link went down.
#[derive(Debug, Clone, Default)]
pub struct DeviceOutage {
    /// Connection attempts (sockets opened) at or after the link went down, oldest first,
    /// at most `DEVICE_EVENTS_MAX`.
    pub attempts_us: Vec<u64>,
    /// Logins at or after the link went down, oldest first, at most `DEVICE_EVENTS_MAX`.
    pub logins_us: Vec<u64>,
}

impl DeviceOutage {
    pub fn attempt(&mut self, at_us: u64) {
        if self.attempts_us.len() < DEVICE_EVENTS_MAX {
            self.attempts_us.push(at_us);
        }
    }

    pub fn login(&mut self, at_us: u64) {
        if self.logins_us.len() < DEVICE_EVENTS_MAX {
            self.logins_us.push(at_us);
        }
    }
}

/// The outage section of one worker's result (merged over workers by `add`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutageResult {
    /// When the link went down and came back (the down and up commands had returned), µs
    /// since the epoch of the worker that ran them.
    pub down_us: u64,
    pub up_us: u64,
    /// Seconds from link-up until every message due before it had reached every device
    /// whose timeline holds it; 0 when all had arrived by then, None when one never did
    /// (the verification fails then).
    pub converged_seconds: Option<f64>,
    /// (message, device) deliveries of messages due before link-up that were still
    /// outstanding at link-up: the backlog the devices had to catch up on.
    pub deliveries_pending_at_up: u64,
    /// Devices that opened a new connection between the link going down and their first
    /// login after it came back (the others kept their connection through the outage).
    pub devices_reconnected: u64,
    /// Of those, devices with no login after link-up by the end of the run.
    pub devices_not_back: u64,
    /// Seconds from link-up until the last reconnecting device had logged in again; None
    /// when no device reconnected.
    pub reconnected_seconds: Option<f64>,
    /// Connection attempts of the reconnecting devices over that span, all together and
    /// the most one device made.
    pub connect_attempts: u64,
    pub connect_attempts_per_device_max: u64,
    /// The down or up command failed: the run does not pass.
    pub command_error: Option<String>,
}

impl OutageResult {
    /// Merges another worker's result: sums of counts, maxima of times.
    pub fn add(&mut self, other: &OutageResult) {
        let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.down_us = self.down_us.max(other.down_us);
        self.up_us = self.up_us.max(other.up_us);
        // A worker whose messages never all arrived leaves the run unconverged.
        self.converged_seconds = match (self.converged_seconds, other.converged_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        self.deliveries_pending_at_up += other.deliveries_pending_at_up;
        self.devices_reconnected += other.devices_reconnected;
        self.devices_not_back += other.devices_not_back;
        self.reconnected_seconds = max(self.reconnected_seconds, other.reconnected_seconds);
        self.connect_attempts += other.connect_attempts;
        self.connect_attempts_per_device_max = self
            .connect_attempts_per_device_max
            .max(other.connect_attempts_per_device_max);
        if self.command_error.is_none() {
            self.command_error.clone_from(&other.command_error);
        }
    }
}

/// The outage result of one worker: `logs[i]` and `devices[i]` are the same device.
pub fn outage_result(
    acked: &[AckedMsg],
    devices_per_user: u32,
    groups: &[Vec<u32>],
    logs: &[DeviceLog],
    devices: &[DeviceOutage],
    down_us: u64,
    up_us: u64,
) -> OutageResult {
    assert_eq!(logs.len(), devices.len(), "one history per device log");
    let mut result = OutageResult {
        down_us,
        up_us,
        ..OutageResult::default()
    };

    // First arrival of each message on each device.
    let index: HashMap<u32, usize> = logs
        .iter()
        .enumerate()
        .map(|(i, l)| (l.client, i))
        .collect();
    let arrivals: Vec<HashMap<u64, u64>> = logs
        .iter()
        .map(|log| {
            debug_assert_eq!(log.delivered.len(), log.delivered_at_us.len());
            let mut first = HashMap::with_capacity(log.delivered.len());
            for (&id, &at) in log.delivered.iter().zip(&log.delivered_at_us) {
                first.entry(id).or_insert(at);
            }
            first
        })
        .collect();
    let mut last_us = up_us;
    let mut missing = false;
    let mut seen = HashSet::new();
    for msg in acked.iter().filter(|m| m.intended_us < up_us) {
        if !seen.insert(msg.msg_id) {
            continue;
        }
        for_each_recipient(msg, devices_per_user, groups, |client| {
            let Some(&i) = index.get(&client) else {
                return;
            };
            match arrivals[i].get(&msg.msg_id) {
                Some(&at) => {
                    last_us = last_us.max(at);
                    result.deliveries_pending_at_up += u64::from(at >= up_us);
                }
                None => missing = true,
            }
        });
    }
    result.converged_seconds = (!missing).then(|| (last_us - up_us) as f64 / 1e6);

    let mut back_us: Option<u64> = None;
    for device in devices {
        let first_login = device.logins_us.iter().copied().find(|&at| at >= up_us);
        let attempts = device
            .attempts_us
            .iter()
            .filter(|&&at| at >= down_us && first_login.is_none_or(|login| at <= login))
            .count() as u64;
        if attempts == 0 {
            continue;
        }
        result.devices_reconnected += 1;
        result.connect_attempts += attempts;
        result.connect_attempts_per_device_max =
            result.connect_attempts_per_device_max.max(attempts);
        match first_login {
            Some(at) => back_us = Some(back_us.map_or(at, |b| b.max(at))),
            None => result.devices_not_back += 1,
        }
    }
    result.reconnected_seconds = back_us.map(|at| (at - up_us) as f64 / 1e6);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::To;

    const S: u64 = 1_000_000;

    fn msg(msg_id: u64, from_user: u32, to_user: u32, intended_s: u64) -> AckedMsg {
        AckedMsg {
            msg_id,
            from_user,
            to: To::User(to_user),
            intended_us: intended_s * S,
        }
    }

    fn log(client: u32, arrivals: &[(u64, u64)]) -> DeviceLog {
        DeviceLog {
            client,
            delivered: arrivals.iter().map(|a| a.0).collect(),
            delivered_at_us: arrivals.iter().map(|a| a.1 * S).collect(),
            synced: true,
        }
    }

    #[test]
    fn convergence_is_the_last_arrival_of_a_message_due_before_link_up() {
        // Down at 10 s, up at 30 s. Message 1 arrived everywhere before the outage;
        // message 2 was due during it and reached the sender's device at 31 s and the
        // recipient's at 34 s; message 3 was due after link-up and does not count.
        let acked = [msg(1, 0, 1, 5), msg(2, 0, 1, 20), msg(3, 1, 0, 40)];
        let logs = [
            log(0, &[(1, 5), (2, 31), (3, 41)]),
            log(1, &[(1, 6), (2, 34), (3, 50)]),
        ];
        let devices = vec![DeviceOutage::default(); 2];
        let r = outage_result(&acked, 1, &[], &logs, &devices, 10 * S, 30 * S);
        assert_eq!(r.converged_seconds, Some(4.0));
        assert_eq!(r.deliveries_pending_at_up, 2);
        assert_eq!(r.devices_reconnected, 0);
        assert_eq!(r.reconnected_seconds, None);
    }

    #[test]
    fn a_message_that_never_arrives_leaves_the_run_unconverged() {
        let acked = [msg(2, 0, 1, 20)];
        let logs = [log(0, &[(2, 31)]), log(1, &[])];
        let devices = vec![DeviceOutage::default(); 2];
        let r = outage_result(&acked, 1, &[], &logs, &devices, 10 * S, 30 * S);
        assert_eq!(r.converged_seconds, None);
        let mut merged = OutageResult {
            converged_seconds: Some(1.0),
            ..OutageResult::default()
        };
        merged.add(&r);
        assert_eq!(merged.converged_seconds, None);
    }

    #[test]
    fn attempts_count_from_link_down_to_the_first_login_after_link_up() {
        let logs = [log(0, &[]), log(1, &[]), log(2, &[])];
        let devices = [
            // Lost its connection: four attempts, back at 32 s, then one unrelated
            // reconnect later that is not the outage's.
            DeviceOutage {
                attempts_us: vec![12 * S, 14 * S, 22 * S, 31 * S, 50 * S],
                logins_us: vec![32 * S, 51 * S],
            },
            // Kept its connection through the outage.
            DeviceOutage::default(),
            // Never came back.
            DeviceOutage {
                attempts_us: vec![15 * S, 25 * S],
                logins_us: vec![],
            },
        ];
        let r = outage_result(&[], 1, &[], &logs, &devices, 10 * S, 30 * S);
        assert_eq!(r.devices_reconnected, 2);
        assert_eq!(r.devices_not_back, 1);
        assert_eq!(r.connect_attempts, 6);
        assert_eq!(r.connect_attempts_per_device_max, 4);
        assert_eq!(r.reconnected_seconds, Some(2.0));
        assert_eq!(r.converged_seconds, Some(0.0));
    }
}
