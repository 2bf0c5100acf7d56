//! Hashed timer wheel for connection deadlines (handshake and idle timeout).
//!
//! Each connection holds at most one entry. A heartbeat does not touch the wheel: the
//! connection records when it last heard from the peer, and when its entry fires the shard
//! compares the real deadline and re-inserts the entry if it moved. So the steady-state cost
//! of a heartbeating connection is one wheel visit per idle-timeout period, not per beat.

use crate::ids::ConnId;

pub struct TimerWheel {
    /// `slots[tick % slots.len()]` holds entries due at that tick or a later revolution.
    slots: Vec<Vec<Entry>>,
    tick_ms: u64,
    /// Every tick up to and including this one has been processed.
    current_tick: u64,
    len: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    conn: ConnId,
    deadline_tick: u64,
}

impl TimerWheel {
    pub fn new(slots: usize, tick_ms: u64, now_ms: u64) -> TimerWheel {
        assert!(slots.is_power_of_two());
        assert!(tick_ms > 0);
        TimerWheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            tick_ms,
            current_tick: now_ms / tick_ms,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `conn` at `deadline_ms`, rounded up to the next tick. A deadline in the
    /// past fires on the next advance.
    pub fn insert(&mut self, conn: ConnId, deadline_ms: u64) {
        let deadline_tick = deadline_ms
            .div_ceil(self.tick_ms)
            .max(self.current_tick + 1);
        let mask = self.slots.len() as u64 - 1;
        self.slots[(deadline_tick & mask) as usize].push(Entry {
            conn,
            deadline_tick,
        });
        self.len += 1;
    }

    /// Moves time to `now_ms` and appends every entry now due to `expired`.
    pub fn advance(&mut self, now_ms: u64, expired: &mut Vec<ConnId>) {
        let now_tick = now_ms / self.tick_ms;
        if now_tick <= self.current_tick {
            return;
        }
        let mask = self.slots.len() as u64 - 1;
        // A jump of more than one revolution visits each slot once.
        let steps = (now_tick - self.current_tick).min(self.slots.len() as u64);
        for step in 1..=steps {
            let slot = &mut self.slots[((self.current_tick + step) & mask) as usize];
            let before = slot.len();
            slot.retain(|entry| {
                if entry.deadline_tick <= now_tick {
                    expired.push(entry.conn);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.current_tick = now_tick;
    }

    /// Milliseconds until the next tick that could fire an entry, if any entry exists.
    pub fn timeout_ms(&self, now_ms: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let next_tick_ms = (self.current_tick + 1) * self.tick_ms;
        Some(next_tick_ms.saturating_sub(now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(index: u32) -> ConnId {
        ConnId {
            index,
            generation: 0,
        }
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut wheel = TimerWheel::new(8, 100, 0);
        wheel.insert(conn(1), 250);
        let mut expired = Vec::new();
        wheel.advance(200, &mut expired);
        assert!(expired.is_empty());
        wheel.advance(300, &mut expired);
        assert_eq!(expired, vec![conn(1)]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_one_revolution_wait_their_turn() {
        let mut wheel = TimerWheel::new(8, 100, 0);
        wheel.insert(conn(1), 2_000); // 20 ticks, 2.5 revolutions
        let mut expired = Vec::new();
        for now in (100..2_000).step_by(100) {
            wheel.advance(now, &mut expired);
            assert!(expired.is_empty(), "fired early at {now}");
        }
        wheel.advance(2_000, &mut expired);
        assert_eq!(expired, vec![conn(1)]);
    }

    #[test]
    fn a_long_jump_fires_everything_due_once() {
        let mut wheel = TimerWheel::new(8, 100, 0);
        for i in 0..100 {
            wheel.insert(conn(i), 100 + u64::from(i) * 37);
        }
        wheel.insert(conn(1000), 1_000_000);
        let mut expired = Vec::new();
        wheel.advance(50_000, &mut expired);
        expired.sort_by_key(|c| c.index);
        assert_eq!(expired.len(), 100);
        assert!(expired.iter().enumerate().all(|(i, c)| c.index == i as u32));
        assert_eq!(wheel.len(), 1);
    }

    #[test]
    fn past_deadline_fires_on_next_tick_and_timeout_reflects_entries() {
        let mut wheel = TimerWheel::new(8, 100, 1_000);
        assert_eq!(wheel.timeout_ms(1_000), None);
        wheel.insert(conn(7), 10);
        assert_eq!(wheel.timeout_ms(1_050), Some(50));
        let mut expired = Vec::new();
        wheel.advance(1_100, &mut expired);
        assert_eq!(expired, vec![conn(7)]);
    }

    #[test]
    fn hundred_thousand_connections() {
        let mut wheel = TimerWheel::new(512, 100, 0);
        for i in 0..100_000u32 {
            wheel.insert(conn(i), 75_000 + u64::from(i % 1000));
        }
        let mut expired = Vec::new();
        wheel.advance(74_900, &mut expired);
        assert!(expired.is_empty());
        wheel.advance(76_000, &mut expired);
        assert_eq!(expired.len(), 100_000);
    }
}
